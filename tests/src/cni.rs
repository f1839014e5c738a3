//! Invoking CNI plugins the way a container runtime does: inside the node's network namespace, `CNI_*` in the
//! environment, the network configuration on stdin, the result (or the spec's error JSON) on stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;

use crate::netns::NetnsGuard;

/// What a plugin invocation printed and how it exited.
#[derive(Debug, Clone)]
pub struct CniOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    /// stdout as JSON (panics with the output when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "plugin stdout is not JSON ({e}): {:?} (stderr: {})",
                self.stdout, self.stderr
            )
        })
    }

    /// Fails the test with the plugin's output unless it succeeded.
    pub fn ok(self) -> Self {
        assert!(
            self.success,
            "plugin failed:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    /// The spec error code printed on failure.
    pub fn error_code(&self) -> u64 {
        assert!(
            !self.success,
            "plugin unexpectedly succeeded: {}",
            self.stdout
        );
        self.json()["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no error code in {}", self.stdout))
    }
}

/// One CNI invocation.
pub struct CniCall<'a> {
    pub plugin: PathBuf,
    /// The node namespace the plugin runs in.
    pub node: &'a NetnsGuard,
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: Option<&'a Path>,
    pub ifname: &'a str,
    pub cni_path: String,
}

impl<'a> CniCall<'a> {
    pub fn new(
        plugin: impl Into<PathBuf>,
        node: &'a NetnsGuard,
        command: &'a str,
        container_id: &'a str,
    ) -> Self {
        Self {
            plugin: plugin.into(),
            node,
            command,
            container_id,
            netns: None,
            ifname: "eth0",
            cni_path: "/usr/lib/cni:/opt/cni/bin".to_string(),
        }
    }

    pub fn netns(mut self, netns: &'a Path) -> Self {
        self.netns = Some(netns);
        self
    }

    pub fn ifname(mut self, ifname: &'a str) -> Self {
        self.ifname = ifname;
        self
    }

    /// Runs the plugin with `config` on stdin.
    pub fn run(&self, config: &str) -> CniOutput {
        let plugin = self.plugin.to_string_lossy().into_owned();
        let mut cmd = self.node.command(&plugin);
        cmd.env("CNI_COMMAND", self.command)
            .env("CNI_CONTAINERID", self.container_id)
            .env("CNI_IFNAME", self.ifname)
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match self.netns {
            Some(ns) => cmd.env("CNI_NETNS", ns),
            None => cmd.env_remove("CNI_NETNS"),
        };
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {plugin}: {e}"));
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin may exit before reading (e.g. on a bad environment); a broken pipe is its answer, not ours.
            let _ = stdin.write_all(config.as_bytes());
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("cannot wait for {plugin}: {e}"));
        CniOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// A `windlass-cni` network configuration for a lab node (`mode` is `host-gw` or `vxlan`).
pub fn windlass_conf(name: &str, subnet: &str, data_dir: &Path, extra: Value) -> String {
    let mut conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": name,
        "type": "windlass-cni",
        "subnet": subnet,
        "dataDir": data_dir,
    });
    if let (Some(obj), Value::Object(extra)) = (conf.as_object_mut(), extra) {
        obj.extend(extra);
    }
    conf.to_string()
}

/// Adds `prevResult` to a configuration (for CHECK and DEL).
pub fn with_prev_result(conf: &str, prev: &Value) -> String {
    let mut v: Value = serde_json::from_str(conf).expect("config is JSON");
    v["prevResult"] = prev.clone();
    v.to_string()
}

/// Runs `ip -j <args>` inside `ns` and parses the JSON.
pub fn ip_json(ns: &NetnsGuard, args: &[&str]) -> Value {
    let mut argv = vec!["ip", "-j"];
    argv.extend_from_slice(args);
    let out = ns.exec(&argv).unwrap_or_else(|e| panic!("{e}"));
    if out.trim().is_empty() {
        return Value::Array(Vec::new());
    }
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("ip -j {args:?} printed non-JSON ({e}): {out}"))
}

/// Names of the links in `ns`.
pub fn link_names(ns: &NetnsGuard) -> Vec<String> {
    ip_json(ns, &["link", "show"])
        .as_array()
        .map(|links| {
            links
                .iter()
                .filter_map(|l| l["ifname"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `nft -j list ruleset` inside `ns`, as JSON.
pub fn nft_ruleset(ns: &NetnsGuard) -> Value {
    let out = ns
        .exec(&["nft", "-j", "list", "ruleset"])
        .unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nft -j printed non-JSON ({e}): {out}"))
}

/// The IPAM allocation files (addresses) under `<data_dir>/<network>`.
pub fn ipam_files(data_dir: &Path, network: &str) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(data_dir.join(network))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}
