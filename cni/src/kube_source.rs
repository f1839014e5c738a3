//! The production [`NodeSource`]: Node objects watched on the API server with kube-rs.
//!
//! A Node contributes its name, `spec.podCIDR` (the first IPv4 entry of `spec.podCIDRs` when only that is set)
//! and its first IPv4 `InternalIP` in `status.addresses`. Nodes without both are left out — the node IPAM
//! controller has not given them a range yet, or their kubelet has not reported an address — exactly as if they
//! had not joined; they appear as soon as an update fills them in. A node that is deleted leaves the set, so the
//! agent removes its routes.
//!
//! The watch runs on a thread of its own (with its own single-threaded async runtime) and hands complete node sets
//! to the agent loop over a channel, only when the routing-relevant facts changed: kubelets update their Node
//! status every few seconds, and those heartbeats must not cost a netlink reconcile each.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tracing::{info, warn};

use crate::routes::{NodeEvent, NodeNet, NodeSource};

/// Why the Node watch could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("cannot read kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("no API server configuration (no --kubeconfig, in-cluster or default config): {0}")]
    NoConfig(String),
    #[error("cannot build the API client: {0}")]
    Client(String),
    #[error("cannot start the Node watch: {0}")]
    Start(std::io::Error),
}

/// The routing facts of one Node, or `None` while it lacks a pod CIDR or an IPv4 InternalIP.
pub fn node_net(node: &Node) -> Option<NodeNet> {
    let name = node.metadata.name.as_deref()?;
    let spec = node.spec.as_ref()?;
    let pod_cidr = spec
        .pod_cidr
        .iter()
        .chain(spec.pod_cidrs.iter().flatten())
        .find_map(|c| c.parse::<Ipv4Net>().ok())?;
    let node_ip = node
        .status
        .as_ref()?
        .addresses
        .iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| match a.address.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => Some(v4),
            _ => None,
        })?;
    Some(NodeNet::new(name, pod_cidr, node_ip))
}

/// Keeps the current node set from watch events; returns it whenever it changed.
#[derive(Default)]
struct NodeSet {
    current: BTreeMap<String, NodeNet>,
    listing: Option<BTreeMap<String, NodeNet>>,
    /// The last set handed to the agent (none yet before the first complete list).
    sent: Option<Vec<NodeNet>>,
}

impl NodeSet {
    fn apply(&mut self, event: watcher::Event<Node>) -> Option<Vec<NodeNet>> {
        match event {
            watcher::Event::Init => {
                self.listing = Some(BTreeMap::new());
                return None;
            }
            watcher::Event::InitApply(n) => {
                if let (Some(listing), Some(net)) = (self.listing.as_mut(), node_net(&n)) {
                    listing.insert(net.name.clone(), net);
                }
                return None;
            }
            watcher::Event::InitDone => {
                // A (re-)list is complete: it replaces everything, so nodes deleted while the watch was down go.
                self.current = self.listing.take().unwrap_or_default();
            }
            watcher::Event::Apply(n) => {
                let name = n.metadata.name.clone()?;
                match node_net(&n) {
                    Some(net) => self.current.insert(name, net),
                    // The node lost its pod CIDR or address: it cannot be routed to any more.
                    None => self.current.remove(&name),
                };
            }
            watcher::Event::Delete(n) => {
                if let Some(name) = n.metadata.name.as_deref() {
                    self.current.remove(name);
                }
            }
        }
        // Nothing goes out before the first complete list: a partial set would remove routes to nodes not yet seen.
        if self.listing.is_some() {
            return None;
        }
        let set: Vec<NodeNet> = self.current.values().cloned().collect();
        if self.sent.as_ref() == Some(&set) {
            return None;
        }
        self.sent = Some(set.clone());
        Some(set)
    }
}

async fn client(kubeconfig: Option<PathBuf>) -> Result<Client, KubeSourceError> {
    use windlass_kubeclient::ClientError;
    windlass_kubeclient::client(kubeconfig.as_deref(), "windlass-cni")
        .await
        .map_err(|e| match e {
            ClientError::Kubeconfig { path, message } => {
                KubeSourceError::Kubeconfig { path, message }
            }
            ClientError::NoConfig(message) => KubeSourceError::NoConfig(message),
            other => KubeSourceError::Client(other.to_string()),
        })
}

async fn watch_nodes(client: Client, out: Sender<Vec<NodeNet>>) {
    let mut nodes = NodeSet::default();
    let mut stream = watcher(Api::<Node>::all(client), watcher::Config::default())
        .default_backoff()
        .boxed();
    info!("watching Nodes");
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                if let Some(set) = nodes.apply(event) {
                    info!(nodes = set.len(), "node set changed");
                    if out.send(set).is_err() {
                        return;
                    }
                }
            }
            // The watcher re-lists (with backoff) on its next poll; the agent keeps the last good set meanwhile.
            Err(e) => warn!(error = %e, "Node watch error"),
        }
    }
}

/// A [`NodeSource`] fed by a watch on Node objects.
pub struct KubeNodeSource {
    rx: Receiver<Vec<NodeNet>>,
}

impl KubeNodeSource {
    /// Connects with `kubeconfig` (or the in-cluster / default configuration) and starts the watch thread.
    /// Configuration errors are returned here; an unreachable server is retried in the background.
    pub fn start(kubeconfig: Option<PathBuf>) -> Result<Self, KubeSourceError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(KubeSourceError::Start)?;
        let client = rt.block_on(client(kubeconfig))?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("node-watch".into())
            .spawn(move || rt.block_on(watch_nodes(client, tx)))
            .map_err(KubeSourceError::Start)?;
        Ok(Self { rx })
    }
}

impl NodeSource for KubeNodeSource {
    fn next_event(&mut self, timeout: Duration) -> NodeEvent {
        self.rx.next_event(timeout)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn node(name: &str, cidr: Option<&str>, ip: Option<&str>) -> Node {
        let mut v = serde_json::json!({"metadata": {"name": name}, "spec": {}, "status": {}});
        if let Some(c) = cidr {
            v["spec"]["podCIDR"] = c.into();
            v["spec"]["podCIDRs"] = serde_json::json!([c]);
        }
        if let Some(ip) = ip {
            v["status"]["addresses"] = serde_json::json!([
                {"type": "Hostname", "address": name},
                {"type": "InternalIP", "address": "fd00::1"},
                {"type": "InternalIP", "address": ip},
            ]);
        }
        serde_json::from_value(v).expect("node")
    }

    #[test]
    fn a_node_needs_a_pod_cidr_and_an_ipv4_internal_ip() {
        let n = node_net(&node("a", Some("10.244.3.0/24"), Some("172.30.0.3"))).expect("net");
        assert_eq!(n.pod_cidr.to_string(), "10.244.3.0/24");
        assert_eq!(n.node_ip, Ipv4Addr::new(172, 30, 0, 3));
        assert!(node_net(&node("b", None, Some("172.30.0.3"))).is_none());
        assert!(node_net(&node("c", Some("10.244.3.0/24"), None)).is_none());
    }

    #[test]
    fn sets_go_out_after_the_first_list_and_only_when_routing_facts_change() {
        let mut s = NodeSet::default();
        assert_eq!(s.apply(watcher::Event::Init), None);
        assert_eq!(
            s.apply(watcher::Event::InitApply(node(
                "a",
                Some("10.244.1.0/24"),
                Some("172.30.0.10")
            ))),
            None
        );
        let first = s.apply(watcher::Event::InitDone).expect("first set");
        assert_eq!(first.len(), 1);
        // A heartbeat (same facts) is not a change.
        assert_eq!(
            s.apply(watcher::Event::Apply(node(
                "a",
                Some("10.244.1.0/24"),
                Some("172.30.0.10")
            ))),
            None
        );
        // A node without a pod CIDR is not routable yet; once it gets one it joins.
        assert_eq!(
            s.apply(watcher::Event::Apply(node("b", None, Some("172.30.0.11")))),
            None
        );
        let two = s
            .apply(watcher::Event::Apply(node(
                "b",
                Some("10.244.2.0/24"),
                Some("172.30.0.11"),
            )))
            .expect("b joined");
        assert_eq!(two.len(), 2);
        let one = s
            .apply(watcher::Event::Delete(node("a", None, None)))
            .expect("a left");
        assert_eq!(
            one.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        // A re-list replaces the set: b vanished while the watch was down.
        assert_eq!(s.apply(watcher::Event::Init), None);
        assert_eq!(s.apply(watcher::Event::InitDone), Some(vec![]));
    }
}
