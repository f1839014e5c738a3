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
use std::path::PathBuf;

use serde_json::json;

use crate::control::ControlPlane;
use crate::lab::{Lab, LabNode};
use crate::netns::NetnsGuard;
use crate::unique_name;

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
        let control = ControlPlane::start_in_netns(control_ns.name(), CONTROL_IP, |_| Vec::new());
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
