//! The kubelet's settings: what `windlass-kubelet`'s flags (the contract scripts and the lab rely on) parse into.

use std::net::IpAddr;
use std::path::PathBuf;

/// Defaults (Windlass DEFAULTS.md; upstream values where they exist).
pub mod defaults {
    pub const ROOT_DIR: &str = "/var/lib/windlass/kubelet";
    pub const KUBECONFIG: &str = "/etc/windlass/kubelet.kubeconfig";
    pub const CGROUP_ROOT: &str = "/windlass";
    pub const CNI_BIN_DIR: &str = "/opt/cni/bin:/usr/lib/cni";
    pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
    pub const MAX_PODS: u32 = 110;
    pub const CLUSTER_DNS: &str = "10.96.0.10";
    pub const CLUSTER_DOMAIN: &str = "cluster.local";
    pub const PORT: u16 = 10250;
    pub const HEALTHZ_PORT: u16 = 10248;
    pub const RESOLV_CONF: &str = "/etc/resolv.conf";
}

/// A validated kubelet configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub kubeconfig: PathBuf,
    pub node_name: String,
    /// `None`: not given (the node's address is then detected when the kubelet starts).
    pub node_ip: Option<IpAddr>,
    pub root_dir: PathBuf,
    /// The cgroup parent of `kubepods`, relative to each hierarchy's mount (e.g. `/windlass`).
    pub cgroup_root: PathBuf,
    /// `--cni-bin-dir`, as a search path.
    pub cni_bin_dirs: Vec<PathBuf>,
    pub cni_conf_dir: PathBuf,
    pub max_pods: u32,
    pub cluster_dns: Vec<IpAddr>,
    pub cluster_domain: String,
    pub pod_manifest_path: Option<PathBuf>,
    /// `HOST:PORT`s pulled from over plain HTTP.
    pub insecure_registries: Vec<String>,
    pub port: u16,
    pub healthz_port: u16,
    pub resolv_conf: PathBuf,
}

/// A flag value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--node-name {0:?} is not a valid node name (lowercase RFC 1123 subdomain, at most 253 characters)")]
    NodeName(String),
    #[error("--cluster-domain {0:?} is not a DNS domain")]
    ClusterDomain(String),
    #[error("--max-pods must be at least 1")]
    MaxPods,
    #[error("--insecure-registry {0:?} is not HOST:PORT")]
    InsecureRegistry(String),
    #[error("--port and --healthz-port are both {0}")]
    PortClash(u16),
    #[error("--root-dir {0:?} must be an absolute path")]
    RootDir(PathBuf),
}

/// RFC 1123 subdomain: lowercase alphanumerics, '-' and '.', starting and ending alphanumeric.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl Config {
    /// Checks what the flags' types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_dns_subdomain(&self.node_name) {
            return Err(ConfigError::NodeName(self.node_name.clone()));
        }
        if !is_dns_subdomain(&self.cluster_domain) {
            return Err(ConfigError::ClusterDomain(self.cluster_domain.clone()));
        }
        if self.max_pods == 0 {
            return Err(ConfigError::MaxPods);
        }
        for r in &self.insecure_registries {
            let ok = r.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !ok {
                return Err(ConfigError::InsecureRegistry(r.clone()));
            }
        }
        if self.port == self.healthz_port {
            return Err(ConfigError::PortClash(self.port));
        }
        if !self.root_dir.is_absolute() {
            return Err(ConfigError::RootDir(self.root_dir.clone()));
        }
        Ok(())
    }
}

/// The node name when `--node-name` is not given: the host name, lowercased (upstream `nodeutil.GetHostname`).
pub fn default_node_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.trim().to_lowercase())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            kubeconfig: defaults::KUBECONFIG.into(),
            node_name: "node-a".into(),
            node_ip: None,
            root_dir: defaults::ROOT_DIR.into(),
            cgroup_root: defaults::CGROUP_ROOT.into(),
            cni_bin_dirs: vec!["/opt/cni/bin".into()],
            cni_conf_dir: defaults::CNI_CONF_DIR.into(),
            max_pods: 110,
            cluster_dns: vec!["10.96.0.10".parse().unwrap()],
            cluster_domain: "cluster.local".into(),
            pod_manifest_path: None,
            insecure_registries: vec!["127.0.0.1:5000".into()],
            port: 10250,
            healthz_port: 10248,
            resolv_conf: defaults::RESOLV_CONF.into(),
        }
    }

    #[test]
    fn a_default_config_is_valid_and_bad_values_are_named() {
        assert_eq!(config().validate(), Ok(()));
        let mut c = config();
        c.node_name = "Node_A".into();
        assert!(c.validate().unwrap_err().to_string().contains("Node_A"));
        let mut c = config();
        c.insecure_registries = vec!["localhost".into()];
        assert_eq!(
            c.validate(),
            Err(ConfigError::InsecureRegistry("localhost".into()))
        );
        let mut c = config();
        c.healthz_port = 10250;
        assert_eq!(c.validate(), Err(ConfigError::PortClash(10250)));
        let mut c = config();
        c.root_dir = "relative".into();
        assert!(c.validate().is_err());
        let mut c = config();
        c.max_pods = 0;
        assert_eq!(c.validate(), Err(ConfigError::MaxPods));
    }
}
