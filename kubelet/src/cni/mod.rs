//! A CNI client: how the kubelet gives a pod sandbox its network.
//!
//! Ref: containernetworking/cni SPEC.md 1.0.0 (sections 2–5) and libcni's `AddNetworkList`/`CheckNetworkList`/
//! `DelNetworkList`. ADD runs the plugin chain in order, each plugin getting the previous one's result as
//! `prevResult`; the final result is cached per (network, container ID, interface) under the kubelet's root dir, and
//! CHECK and DEL give that cached result back to the plugins as `prevResult`. DEL runs the chain in reverse and
//! tolerates a missing cache (the spec requires plugins to accept a DEL without `prevResult`).

mod cache;
mod config;
mod exec;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use tracing::Instrument;

pub use cache::CachedResult;
pub use config::{load_file, load_first, NetworkConfigList, PluginConfig};
pub use exec::{find_in_path, ExecError, ExecOutput, PluginExec, ProcessExec};

/// The `runtimeConfig` capabilities the kubelet knows how to fill (upstream: `portMappings`, `dns`, `bandwidth`,
/// `ipRanges`); a plugin gets one only if its config declares it under `capabilities`.
pub const KNOWN_CAPABILITIES: &[&str] = &["portMappings", "dns", "bandwidth", "ipRanges"];

/// The error a plugin reported on stdout (SPEC.md "Error" section), with its exit code.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PluginError {
    #[serde(default)]
    pub code: u32,
    #[serde(default)]
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "code {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

/// What went wrong talking to the network plugins.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no CNI network configuration (*.conflist, *.conf, *.json) in {dir}")]
    NoConfig { dir: PathBuf },
    #[error("cannot read CNI configuration {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid CNI configuration {path}: {reason}")]
    InvalidConfig { path: PathBuf, reason: String },
    #[error("CNI plugin {plugin:?} not found in {search_path}")]
    PluginNotFound { plugin: String, search_path: String },
    #[error("CNI plugin {plugin} {command} for network {network} failed: {error}")]
    Plugin {
        plugin: String,
        command: &'static str,
        network: String,
        error: PluginError,
    },
    #[error(
        "CNI plugin {plugin} {command} failed (exit {code:?}) without an error object: {stderr}"
    )]
    PluginCrashed {
        plugin: String,
        command: &'static str,
        code: Option<i32>,
        stderr: String,
    },
    #[error("CNI plugin {plugin} {command}: {source}")]
    Exec {
        plugin: String,
        command: &'static str,
        source: ExecError,
    },
    #[error("CNI plugin {plugin} ADD returned an invalid result: {reason}")]
    InvalidResult { plugin: String, reason: String },
    #[error("CNI result cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CNI CHECK for network {network}: no cached ADD result for container {container_id} {ifname}")]
    NotAttached {
        network: String,
        container_id: String,
        ifname: String,
    },
    /// ADD failed and the clean-up DEL failed too: both are reported.
    #[error("{add}; and cleaning up after it failed: {}", join(.cleanup))]
    AddAndCleanup {
        add: Box<CniError>,
        cleanup: Vec<CniError>,
    },
    /// DEL went through the whole chain; these plugins failed.
    #[error("CNI DEL: {}", join(.0))]
    Teardown(Vec<CniError>),
}

impl CniError {
    /// The error that explains the failure: for a failed ADD whose clean-up also failed, the ADD's error.
    pub fn primary(&self) -> &CniError {
        match self {
            CniError::AddAndCleanup { add, .. } => add.primary(),
            other => other,
        }
    }
}

fn join(errors: &[CniError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// One sandbox's attachment parameters (the spec's `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS`, and
/// the runtime's `runtimeConfig` values).
#[derive(Debug, Clone, Default)]
pub struct RuntimeConf {
    pub container_id: String,
    /// Path of the sandbox's network namespace, e.g. `/run/netns/<name>`.
    pub netns: PathBuf,
    pub ifname: String,
    /// `CNI_ARGS` pairs, e.g. `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID` (upstream dockershim/CRI set these).
    pub args: Vec<(String, String)>,
    /// `runtimeConfig` values by capability name (e.g. `portMappings`: `[{"hostPort":..,"containerPort":..,
    /// "protocol":"tcp"}]`, `dns`: `{"servers":[..],"searches":[..],"options":[..]}`).
    pub capability_args: Map<String, Value>,
}

impl RuntimeConf {
    /// The attachment of `pod`'s sandbox as containerd's CRI plugin builds it: interface `eth0`, `CNI_ARGS`
    /// `IgnoreUnknown=1;K8S_POD_NAMESPACE;K8S_POD_NAME;K8S_POD_INFRA_CONTAINER_ID;K8S_POD_UID`, the
    /// `portMappings` capability from every container port with a `hostPort`, and the `dns` capability from the
    /// pod's resolver settings.
    pub fn for_pod(
        pod: &k8s_openapi::api::core::v1::Pod,
        sandbox_id: &str,
        netns: &Path,
        dns: Option<&crate::dns::ResolvConf>,
    ) -> Self {
        let meta = &pod.metadata;
        let args = vec![
            ("IgnoreUnknown".to_string(), "1".to_string()),
            (
                "K8S_POD_NAMESPACE".to_string(),
                meta.namespace.clone().unwrap_or_else(|| "default".into()),
            ),
            (
                "K8S_POD_NAME".to_string(),
                meta.name.clone().unwrap_or_default(),
            ),
            (
                "K8S_POD_INFRA_CONTAINER_ID".to_string(),
                sandbox_id.to_string(),
            ),
            (
                "K8S_POD_UID".to_string(),
                meta.uid.clone().unwrap_or_default(),
            ),
        ];
        let mut capability_args = Map::new();
        let mappings: Vec<Value> = pod
            .spec
            .iter()
            .flat_map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
            })
            .flat_map(|c| c.ports.iter().flatten())
            .filter(|p| p.host_port.is_some_and(|h| h > 0))
            .map(|p| {
                let mut m = serde_json::json!({
                    "hostPort": p.host_port,
                    "containerPort": p.container_port,
                    "protocol": p.protocol.as_deref().unwrap_or("TCP").to_lowercase(),
                });
                if let Some(ip) = p.host_ip.as_deref().filter(|ip| !ip.is_empty()) {
                    m["hostIP"] = Value::String(ip.to_string());
                }
                m
            })
            .collect();
        if !mappings.is_empty() {
            capability_args.insert("portMappings".into(), Value::Array(mappings));
        }
        if let Some(d) = dns {
            capability_args.insert(
                "dns".into(),
                serde_json::json!({"servers": d.nameservers, "searches": d.searches, "options": d.options}),
            );
        }
        Self {
            container_id: sandbox_id.to_string(),
            netns: netns.to_path_buf(),
            ifname: "eth0".into(),
            args,
            capability_args,
        }
    }
}

/// A successful ADD's result (SPEC.md "Success" section); `raw` is what the last plugin printed.
#[derive(Debug, Clone, PartialEq)]
pub struct CniResult {
    pub raw: Value,
}

#[derive(Deserialize)]
struct ResultIp {
    address: String,
    #[serde(default)]
    interface: Option<usize>,
}

#[derive(Deserialize)]
struct ResultInterface {
    name: String,
    #[serde(default)]
    sandbox: Option<String>,
}

impl CniResult {
    /// The pod's addresses: the IPs on the interface inside the sandbox named `ifname` (or, when a plugin gives no
    /// interface index, every IP), without prefix length, IPv4 first as upstream's `podIPs` orders them.
    pub fn ips_for(&self, ifname: &str) -> Vec<IpAddr> {
        let ips: Vec<ResultIp> = self
            .raw
            .get("ips")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        let ifaces: Vec<ResultInterface> = self
            .raw
            .get("interfaces")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        let mut out: Vec<IpAddr> = ips
            .iter()
            .filter(|ip| match ip.interface.and_then(|i| ifaces.get(i)) {
                Some(iface) => iface.name == ifname && iface.sandbox.is_some(),
                None => true,
            })
            .filter_map(|ip| ip.address.split('/').next()?.parse().ok())
            .collect();
        out.sort_by_key(|ip| ip.is_ipv6());
        out
    }
}

/// Client settings: where configs, plugins and the result cache are.
#[derive(Debug, Clone)]
pub struct CniSettings {
    /// `--cni-conf-dir`.
    pub conf_dir: PathBuf,
    /// `--cni-bin-dir`, already split on `:`.
    pub bin_dirs: Vec<PathBuf>,
    /// Where results are cached: `<root-dir>/cni/results`.
    pub cache_dir: PathBuf,
    /// How long one plugin invocation may take before it is killed.
    pub timeout: Duration,
}

impl CniSettings {
    /// Settings for a kubelet with `--root-dir root`, the given conf dir and bin search path (`a:b:c`).
    pub fn new(conf_dir: impl Into<PathBuf>, bin_path: &str, root_dir: &Path) -> Self {
        Self {
            conf_dir: conf_dir.into(),
            bin_dirs: std::env::split_paths(bin_path).collect(),
            cache_dir: root_dir.join("cni").join("results"),
            timeout: Duration::from_secs(60),
        }
    }
}

/// Runs CNI operations for pod sandboxes.
#[derive(Debug, Clone)]
pub struct CniClient<E: PluginExec = ProcessExec> {
    settings: CniSettings,
    exec: E,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Command {
    Add,
    Check,
    Del,
}

impl Command {
    fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Check => "CHECK",
            Command::Del => "DEL",
        }
    }
}

impl<E: PluginExec> CniClient<E> {
    pub fn new(settings: CniSettings, exec: E) -> Self {
        Self { settings, exec }
    }

    pub fn settings(&self) -> &CniSettings {
        &self.settings
    }

    /// The network currently configured in `--cni-conf-dir` (read on each call, so a config dropped in by a
    /// network add-on after start is picked up, as the kubelet's network-ready check does).
    pub fn network(&self) -> Result<NetworkConfigList, CniError> {
        load_first(&self.settings.conf_dir)
    }

    /// Attaches the sandbox to `net`: ADD over the chain. On failure the chain is torn down again (DEL in reverse
    /// over every plugin, which the spec requires to be idempotent), so a failed ADD leaves no veth or address.
    pub async fn add(
        &self,
        net: &NetworkConfigList,
        rt: &RuntimeConf,
    ) -> Result<CniResult, CniError> {
        let span =
            tracing::info_span!("cni_add", network = %net.name, container = %rt.container_id);
        self.add_and_cache(net, rt).instrument(span).await
    }

    async fn add_and_cache(
        &self,
        net: &NetworkConfigList,
        rt: &RuntimeConf,
    ) -> Result<CniResult, CniError> {
        match self.add_chain(net, rt).await {
            Ok(result) => {
                let entry = CachedResult::new(net, rt, result.raw.clone());
                if let Err(e) = cache::write(&self.settings.cache_dir, &entry) {
                    // Without the cache DEL would lose prevResult; undo rather than leave an unrecorded attachment.
                    let cleanup = self.del_chain(net, rt, Some(&result.raw)).await;
                    return Err(match cleanup {
                        Ok(()) => e,
                        Err(c) => CniError::AddAndCleanup {
                            add: Box::new(e),
                            cleanup: vec![c],
                        },
                    });
                }
                tracing::info!(ips = ?result.ips_for(&rt.ifname), "attached");
                Ok(result)
            }
            Err(add) => {
                tracing::warn!(error = %add, "ADD failed; deleting what the chain may have set up");
                match self.del_chain(net, rt, None).await {
                    Ok(()) => Err(add),
                    Err(cleanup) => Err(CniError::AddAndCleanup {
                        add: Box::new(add),
                        cleanup: vec![cleanup],
                    }),
                }
            }
        }
    }

    async fn add_chain(
        &self,
        net: &NetworkConfigList,
        rt: &RuntimeConf,
    ) -> Result<CniResult, CniError> {
        let mut prev: Option<Value> = None;
        for plugin in &net.plugins {
            let out = self
                .invoke(Command::Add, net, plugin, rt, prev.as_ref())
                .await?;
            let value: Value =
                serde_json::from_slice(&out).map_err(|e| CniError::InvalidResult {
                    plugin: plugin.plugin_type.clone(),
                    reason: format!("not JSON: {e}"),
                })?;
            if !value.is_object() {
                return Err(CniError::InvalidResult {
                    plugin: plugin.plugin_type.clone(),
                    reason: "not a JSON object".into(),
                });
            }
            prev = Some(value);
        }
        // parse() refuses an empty plugin list, so the loop ran at least once.
        Ok(CniResult {
            raw: prev.unwrap_or(Value::Null),
        })
    }

    /// Verifies the attachment is still as ADD left it: CHECK over the chain with the cached result.
    pub async fn check(&self, net: &NetworkConfigList, rt: &RuntimeConf) -> Result<(), CniError> {
        if net.disable_check || !config::version_supports_check(&net.cni_version) {
            return Ok(());
        }
        let path = cache::path(
            &self.settings.cache_dir,
            &net.name,
            &rt.container_id,
            &rt.ifname,
        );
        let cached = cache::read(&path)?.ok_or_else(|| CniError::NotAttached {
            network: net.name.clone(),
            container_id: rt.container_id.clone(),
            ifname: rt.ifname.clone(),
        })?;
        for plugin in &net.plugins {
            self.invoke(Command::Check, net, plugin, rt, Some(&cached.result))
                .await?;
        }
        Ok(())
    }

    /// Detaches the sandbox: DEL in reverse order with the cached result as `prevResult` (none if the cache is
    /// missing), continuing past failures and reporting all of them; the cache entry goes only when all succeeded,
    /// so a retry still has it.
    pub async fn del(&self, net: &NetworkConfigList, rt: &RuntimeConf) -> Result<(), CniError> {
        let span =
            tracing::info_span!("cni_del", network = %net.name, container = %rt.container_id);
        self.del_cached(net, rt).instrument(span).await
    }

    async fn del_cached(&self, net: &NetworkConfigList, rt: &RuntimeConf) -> Result<(), CniError> {
        let path = cache::path(
            &self.settings.cache_dir,
            &net.name,
            &rt.container_id,
            &rt.ifname,
        );
        let cached = match cache::read(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable result cache; DEL without prevResult");
                None
            }
        };
        self.del_chain(net, rt, cached.as_ref().map(|c| &c.result))
            .await?;
        cache::remove(&path)
    }

    async fn del_chain(
        &self,
        net: &NetworkConfigList,
        rt: &RuntimeConf,
        prev: Option<&Value>,
    ) -> Result<(), CniError> {
        let mut errors = Vec::new();
        for plugin in net.plugins.iter().rev() {
            if let Err(e) = self.invoke(Command::Del, net, plugin, rt, prev).await {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(CniError::Teardown(errors))
        }
    }

    /// Builds the stdin config for one plugin (SPEC.md section 3: `name` and `cniVersion` from the list,
    /// `runtimeConfig` with the declared capabilities only, `prevResult`), runs it and maps its answer.
    async fn invoke(
        &self,
        command: Command,
        net: &NetworkConfigList,
        plugin: &PluginConfig,
        rt: &RuntimeConf,
        prev: Option<&Value>,
    ) -> Result<Vec<u8>, CniError> {
        let stdin = plugin_stdin(net, plugin, rt, prev);
        let search_path = std::env::join_paths(&self.settings.bin_dirs)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let binary =
            find_in_path(&plugin.plugin_type, &self.settings.bin_dirs).ok_or_else(|| {
                CniError::PluginNotFound {
                    plugin: plugin.plugin_type.clone(),
                    search_path: search_path.clone(),
                }
            })?;
        let cni_args = rt
            .args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";");
        let env = vec![
            ("CNI_COMMAND".to_string(), command.as_str().to_string()),
            ("CNI_CONTAINERID".to_string(), rt.container_id.clone()),
            ("CNI_NETNS".to_string(), rt.netns.display().to_string()),
            ("CNI_IFNAME".to_string(), rt.ifname.clone()),
            ("CNI_ARGS".to_string(), cni_args),
            ("CNI_PATH".to_string(), search_path),
        ];
        tracing::debug!(plugin = %plugin.plugin_type, command = command.as_str(), "invoking CNI plugin");
        let out = self
            .exec
            .exec(&binary, &env, &stdin, self.settings.timeout)
            .await
            .map_err(|source| CniError::Exec {
                plugin: plugin.plugin_type.clone(),
                command: command.as_str(),
                source,
            })?;
        if out.code == Some(0) {
            return Ok(out.stdout);
        }
        // SPEC.md: on failure the plugin prints an error object on stdout and exits non-zero.
        match serde_json::from_slice::<PluginError>(&out.stdout) {
            Ok(error) if !error.msg.is_empty() || error.code != 0 => Err(CniError::Plugin {
                plugin: plugin.plugin_type.clone(),
                command: command.as_str(),
                network: net.name.clone(),
                error,
            }),
            _ => Err(CniError::PluginCrashed {
                plugin: plugin.plugin_type.clone(),
                command: command.as_str(),
                code: out.code,
                stderr: String::from_utf8_lossy(if out.stderr.is_empty() {
                    &out.stdout
                } else {
                    &out.stderr
                })
                .trim()
                .to_string(),
            }),
        }
    }
}

fn plugin_stdin(
    net: &NetworkConfigList,
    plugin: &PluginConfig,
    rt: &RuntimeConf,
    prev: Option<&Value>,
) -> Vec<u8> {
    let mut conf = plugin.raw.clone();
    conf.insert("name".into(), Value::String(net.name.clone()));
    conf.insert("cniVersion".into(), Value::String(net.cni_version.clone()));
    conf.remove("runtimeConfig");
    conf.remove("prevResult");
    let runtime_config: Map<String, Value> = rt
        .capability_args
        .iter()
        .filter(|(k, _)| plugin.has_capability(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !runtime_config.is_empty() {
        conf.insert("runtimeConfig".into(), Value::Object(runtime_config));
    }
    if let Some(prev) = prev {
        conf.insert("prevResult".into(), prev.clone());
    }
    // Serialising a Map of Values cannot fail.
    serde_json::to_vec(&Value::Object(conf)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_config_reaches_only_plugins_declaring_the_capability() {
        let net = config::parse(
            serde_json::json!({"cniVersion":"1.0.0","name":"n","plugins":[
                {"type":"bridge"},
                {"type":"portmap","capabilities":{"portMappings":true}}
            ]}),
            Path::new("x"),
        )
        .unwrap();
        let mut rt = RuntimeConf::default();
        rt.capability_args.insert(
            "portMappings".into(),
            serde_json::json!([{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]),
        );
        rt.capability_args
            .insert("dns".into(), serde_json::json!({"servers":["10.96.0.10"]}));
        let bridge: Value =
            serde_json::from_slice(&plugin_stdin(&net, &net.plugins[0], &rt, None)).unwrap();
        let portmap: Value = serde_json::from_slice(&plugin_stdin(
            &net,
            &net.plugins[1],
            &rt,
            Some(&serde_json::json!({"cniVersion":"1.0.0"})),
        ))
        .unwrap();
        assert!(bridge.get("runtimeConfig").is_none());
        assert_eq!(bridge["name"], "n");
        assert_eq!(bridge["cniVersion"], "1.0.0");
        assert_eq!(
            portmap["runtimeConfig"]["portMappings"][0]["hostPort"],
            8080
        );
        assert!(portmap["runtimeConfig"].get("dns").is_none());
        assert_eq!(portmap["prevResult"]["cniVersion"], "1.0.0");
    }

    #[test]
    fn a_pod_attachment_carries_its_identity_host_ports_and_dns() {
        use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodSpec};
        let pod = Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("nginx-pod".into()),
                namespace: Some("default".into()),
                uid: Some("u1".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "web".into(),
                    ports: Some(vec![
                        ContainerPort {
                            container_port: 80,
                            host_port: Some(8080),
                            ..Default::default()
                        },
                        ContainerPort {
                            container_port: 53,
                            protocol: Some("UDP".into()),
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let dns = crate::dns::ResolvConf {
            nameservers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        };
        let rt = RuntimeConf::for_pod(&pod, "sb1", Path::new("/run/netns/p"), Some(&dns));
        assert_eq!(rt.ifname, "eth0");
        assert_eq!(rt.container_id, "sb1");
        let args: Vec<String> = rt.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            args.join(";"),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=nginx-pod;K8S_POD_INFRA_CONTAINER_ID=sb1;K8S_POD_UID=u1"
        );
        assert_eq!(
            rt.capability_args["portMappings"],
            serde_json::json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}])
        );
        assert_eq!(rt.capability_args["dns"]["servers"][0], "10.96.0.10");
    }

    #[test]
    fn pod_ips_come_from_the_sandbox_interface_ipv4_first() {
        let r = CniResult {
            raw: serde_json::json!({
                "interfaces":[{"name":"cni0"},{"name":"veth1"},{"name":"eth0","sandbox":"/run/netns/p"}],
                "ips":[{"address":"fd00::5/64","interface":2},{"address":"10.244.1.5/24","interface":2},
                       {"address":"10.244.1.1/24","interface":0}]
            }),
        };
        assert_eq!(
            r.ips_for("eth0"),
            vec![
                "10.244.1.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }
}
