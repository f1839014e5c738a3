//! A namespace [`Lab`] with a Windlass API server on the lab switch, for node agents (CNI daemon, proxy) that
//! talk to the real API.
//!
//! ```text
//!   [control 172.30.0.2: windlass-control serve]   [node0 172.30.0.10]  [node1 ...]  [client 172.30.0.250]
//!                       \__________________ switch netns: bridge sw0 ________________/
//! ```
//! The API server runs inside its own namespace plugged into the switch, bound to 172.30.0.2, so daemons started
//! in the node namespaces reach it over the lab switch; `kubectl` runs in the control namespace. Node objects are
//! created by the test (with the pod CIDRs and InternalIPs the lab gives them), standing in for kubelets
//! registering and for the node IPAM controller.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::{json, Value};

use crate::cni::CniCall;
use crate::control::ControlPlane;
use crate::lab::{Lab, LabNode};
use crate::netns::NetnsGuard;
use crate::{unique_name, workspace_binary, ChildGuard, TempDir};

/// The API server's address on the lab switch.
pub const CONTROL_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 2);

/// A lab with an API server. Field order is drop order: the server stops before its namespace goes.
pub struct ApiLab {
    pub control: ControlPlane,
    pub lab: Lab,
    control_ns: NetnsGuard,
}

impl ApiLab {
    /// A lab with `nodes` node namespaces (no Node objects yet) and a running API server.
    pub fn new(nodes: usize) -> Self {
        let lab = Lab::new(nodes).expect("namespace lab");
        let control_ns = NetnsGuard::new(&unique_name("wlcp")).expect("control netns");
        lab.plug(control_ns.name(), "cp", CONTROL_IP)
            .expect("plug the control namespace into the switch");
        // The tests play node IPAM (they set each Node's podCIDR, or leave it unset on purpose).
        let control = ControlPlane::start_in_netns(control_ns.name(), CONTROL_IP, |_| {
            vec!["--controllers=*,-nodeipam".into()]
        });
        Self {
            control,
            lab,
            control_ns,
        }
    }

    /// The admin kubeconfig (it names `https://172.30.0.2:<port>`, reachable from every lab namespace).
    pub fn kubeconfig(&self) -> PathBuf {
        self.control.kubeconfig()
    }

    pub fn control_netns(&self) -> &NetnsGuard {
        &self.control_ns
    }

    /// Registers `node` as a Node object with its lab InternalIP, and its lab pod CIDR when `with_pod_cidr`.
    pub fn register_node(&self, node: &LabNode, with_pod_cidr: bool) {
        let mut spec = json!({});
        if with_pod_cidr {
            spec = json!({"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]});
        }
        let obj = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name}, "spec": spec});
        self.control
            .kubectl_stdin_ok(&["create", "-f", "-"], &obj.to_string());
        self.set_node_ip(&node.name, node.ip);
    }

    /// Sets the Node's `status.addresses` (InternalIP and Hostname), as its kubelet reports them.
    pub fn set_node_ip(&self, name: &str, ip: Ipv4Addr) {
        let patch = json!({"status": {"addresses": [
            {"type": "InternalIP", "address": ip.to_string()},
            {"type": "Hostname", "address": name},
        ]}});
        self.control.kubectl_ok(&[
            "patch",
            "node",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ]);
    }

    /// Gives a registered Node its pod CIDR, as the node IPAM controller does.
    pub fn set_pod_cidr(&self, node: &LabNode) {
        let patch = json!({"spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]}});
        self.control.kubectl_ok(&[
            "patch",
            "node",
            &node.name,
            "--type=merge",
            "-p",
            &patch.to_string(),
        ]);
    }
}

/// A `windlass-cni daemon --kubeconfig` running in a lab node, writing its conflist to its own directory.
pub struct CniDaemon {
    _child: ChildGuard,
    pub conf_dir: TempDir,
    pub log: PathBuf,
}

impl CniDaemon {
    /// The conflist the daemon wrote, if any yet.
    pub fn conflist(&self) -> Option<Value> {
        std::fs::read_to_string(self.conf_dir.path().join("10-windlass.conflist"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl ApiLab {
    /// Starts `windlass-cni daemon` in `node` (`mode` is `host-gw` or `vxlan`), its log in `logs`.
    pub fn start_cni_daemon(&self, node: &LabNode, mode: &str, logs: &Path) -> CniDaemon {
        let conf_dir = tempfile::tempdir().expect("conf dir");
        let log = logs.join(format!("cni-{}.log", node.name));
        let child = ChildGuard::spawn(
            node.netns
                .command(workspace_binary("windlass-cni").to_str().expect("path"))
                .args(["daemon", "--node-name", &node.name, "--mode", mode])
                .arg("--kubeconfig")
                .arg(self.kubeconfig())
                .arg("--cni-conf-dir")
                .arg(conf_dir.path())
                .arg("--data-dir")
                .arg(node.data_dir.path())
                .args(["--mtu", "1450", "--resync-ms", "300"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("daemon log")),
        )
        .expect("start windlass-cni daemon");
        CniDaemon {
            _child: child,
            conf_dir,
            log,
        }
    }

    /// Attaches a new pod namespace on `node` with the conflist `daemon` wrote (as the kubelet would, through
    /// the plugin's ADD); returns the pod and its address.
    pub fn attach_pod(
        &self,
        node: &LabNode,
        daemon: &CniDaemon,
        id: &str,
    ) -> (NetnsGuard, Ipv4Addr) {
        let list = daemon.conflist().expect("the daemon wrote no conflist");
        let mut conf = list["plugins"][0].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        let pod = self.lab.pod_netns().expect("pod netns");
        let out = CniCall::new(workspace_binary("windlass-cni"), &node.netns, "ADD", id)
            .netns(&pod.path())
            .run(&conf.to_string())
            .ok()
            .json();
        let ip = out["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .expect("pod address");
        (pod, ip)
    }
}
