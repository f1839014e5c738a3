//! A CNI lab for kubelet tests: a "node" network namespace (where the kubelet and its plugins run), a "pod"
//! namespace (the sandbox), and the kubelet's dirs, all removed on drop. Nothing touches the root namespace.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::netns::NetnsGuard;
use crate::unique_name;

/// Where Debian's containernetworking-plugins install the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
/// The network name [`CniLab::write_bridge_conflist`] writes.
pub const NETWORK: &str = "windlass-test";

pub struct CniLab {
    pub node: NetnsGuard,
    pub pod: NetnsGuard,
    pub conf_dir: TempDir,
    pub root_dir: TempDir,
    pub ipam_dir: TempDir,
    /// Searched before [`REFERENCE_PLUGINS`], for test plugins.
    pub bin_dir: TempDir,
}

impl CniLab {
    /// Both namespaces; the pod's `lo` is down as in a fresh sandbox.
    pub fn new() -> io::Result<Self> {
        let lab = Self {
            node: NetnsGuard::new(&unique_name("kn"))?,
            pod: NetnsGuard::new(&unique_name("kp"))?,
            conf_dir: tempfile::tempdir()?,
            root_dir: tempfile::tempdir()?,
            ipam_dir: tempfile::tempdir()?,
            bin_dir: tempfile::tempdir()?,
        };
        lab.pod.exec(&["ip", "link", "set", "lo", "down"])?;
        Ok(lab)
    }

    /// `CNI_PATH`-style search path: our bin dir, then the reference plugins.
    pub fn bin_path(&self) -> String {
        format!("{}:{REFERENCE_PLUGINS}", self.bin_dir.path().display())
    }

    /// `ip netns exec <node>`: how the kubelet's plugins are run inside the node namespace.
    pub fn node_wrapper(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.node.name().into(),
        ]
    }

    /// Writes `10-test.conflist`: bridge `cni0` (gateway) with host-local IPAM in `subnet`, then `extra` plugins.
    pub fn write_bridge_conflist(
        &self,
        subnet: &str,
        extra: &[serde_json::Value],
    ) -> io::Result<PathBuf> {
        let mut plugins = vec![serde_json::json!({
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "subnet": subnet,
                "dataDir": self.ipam_dir.path(),
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        })];
        plugins.extend(extra.iter().cloned());
        let conf = serde_json::json!({"cniVersion": "1.0.0", "name": NETWORK, "plugins": plugins});
        let path = self.conf_dir.path().join("10-test.conflist");
        std::fs::write(&path, serde_json::to_vec_pretty(&conf)?)?;
        Ok(path)
    }

    /// A shell-script plugin in our bin dir.
    ///
    /// The executable is written by a child process (`install`), never through a descriptor of this process: a
    /// process forked by another test thread while we held one open would keep it until its own exec, and
    /// starting the plugin in that window fails with ETXTBSY ("Text file busy").
    pub fn write_plugin(&self, name: &str, script: &str) -> io::Result<()> {
        let source = self.bin_dir.path().join(format!(".{name}.source"));
        std::fs::write(&source, format!("#!/bin/sh\n{script}\n"))?;
        let status = std::process::Command::new("install")
            .args(["-m", "0755"])
            .arg(&source)
            .arg(self.bin_dir.path().join(name))
            .status()?;
        std::fs::remove_file(&source)?;
        if !status.success() {
            return Err(io::Error::other(format!(
                "install of plugin {name} failed: {status}"
            )));
        }
        Ok(())
    }

    pub fn node_links(&self) -> Vec<String> {
        links(&self.node)
    }

    pub fn pod_links(&self) -> Vec<String> {
        links(&self.pod)
    }

    /// Addresses host-local has handed out (one file per IP in `<dataDir>/<network>/`).
    pub fn reserved_ips(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.ipam_dir.path().join(NETWORK)) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect()
    }

    /// The kubelet's CNI result cache files.
    pub fn cache_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.root_dir.path().join("cni/results"))
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

/// Link names in a namespace (`ip -j link`).
pub fn links(ns: &NetnsGuard) -> Vec<String> {
    let out = ns.exec(&["ip", "-j", "link", "show"]).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect()
}

/// IPv4 addresses on `ifname` in a namespace.
pub fn ipv4_addresses(ns: &NetnsGuard, ifname: &str) -> Vec<String> {
    let out = ns
        .exec(&["ip", "-j", "-4", "addr", "show", "dev", ifname])
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().map(str::to_string))
        .collect()
}

/// Runs `f` on a fresh thread that has joined the network namespace at `netns` (network namespaces are per
/// thread), as a kubelet running inside a node namespace would; the calling thread stays where it is.
pub fn run_in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let file = std::fs::File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on an open namespace fd affects only this (new, scoped) thread; the fd outlives the
            // call.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        // A failed assertion inside `f` fails the test with its own message.
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
