//! The scheduler's in-memory view of nodes and the pods placed on them, with per-node aggregates (requested
//! resources, pod count, host ports, replicas per owner) kept up to date on every change so that filtering and
//! scoring a node costs a few comparisons (upstream keeps the same aggregates in `framework.NodeInfo`).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Node, Pod};

use super::pod::{HostPort, PodRequest, Resources};
use super::quantity::parse_scaled;
use super::SchedulerError;

/// Taint the node lifecycle controller puts on nodes whose Ready condition is False (`TaintNodesByCondition`).
pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
/// Taint for nodes whose Ready condition is Unknown (or not reported yet).
pub const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";
/// Taint tolerated by pods allowed on cordoned nodes (DaemonSet pods), `node.kubernetes.io/unschedulable`.
pub const TAINT_UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";

#[derive(Debug, Clone)]
pub(crate) struct NodeTaint {
    pub(crate) key: String,
    pub(crate) value: String,
    pub(crate) effect: String,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct NodeInfo {
    /// `false` while only pods reference this node (a pod seen before its node, or a deleted node whose pods are
    /// still around); such entries are never candidates.
    pub(crate) present: bool,
    pub(crate) name: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) unschedulable: bool,
    /// Spec taints plus the not-ready/unreachable taint derived from the Ready condition.
    pub(crate) taints: Vec<NodeTaint>,
    /// Whether any taint is NoSchedule/NoExecute (filtered) or PreferNoSchedule (scored), so the common untainted
    /// node skips both loops.
    pub(crate) has_hard_taints: bool,
    pub(crate) has_soft_taints: bool,
    pub(crate) allocatable: Resources,
    pub(crate) allowed_pods: i64,
    pub(crate) requested: Resources,
    pub(crate) non_zero_requested: Resources,
    pub(crate) pod_count: i64,
    pub(crate) host_ports: Vec<HostPort>,
    /// Pods per controlling owner (interned owner id, count); short, so a linear scan beats hashing.
    pub(crate) owners: Vec<(u32, u32)>,
}

impl NodeInfo {
    pub(crate) fn owner_count(&self, owner: u32) -> u32 {
        self.owners
            .iter()
            .find(|(o, _)| *o == owner)
            .map_or(0, |(_, n)| *n)
    }
}

#[derive(Debug, Clone)]
struct PlacedPod {
    node: usize,
    requests: Resources,
    non_zero: Resources,
    host_ports: Vec<HostPort>,
    owner: Option<u32>,
}

/// Nodes and placed pods. Node entries are never moved, so indices stay valid for the scheduler's rotation.
#[derive(Debug, Default)]
pub struct Cache {
    pub(crate) nodes: Vec<NodeInfo>,
    node_index: HashMap<String, usize>,
    pods: HashMap<String, PlacedPod>,
    owner_ids: HashMap<String, u32>,
    present_nodes: usize,
}

impl Cache {
    pub fn new() -> Cache {
        Cache::default()
    }

    /// Number of nodes (API objects) known.
    pub fn node_count(&self) -> usize {
        self.present_nodes
    }

    /// Number of pods placed on nodes.
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    fn slot(&mut self, name: &str) -> usize {
        if let Some(i) = self.node_index.get(name) {
            return *i;
        }
        let i = self.nodes.len();
        self.nodes.push(NodeInfo {
            name: name.to_owned(),
            ..NodeInfo::default()
        });
        self.node_index.insert(name.to_owned(), i);
        i
    }

    pub(crate) fn owner_id(&self, uid: &str) -> Option<u32> {
        self.owner_ids.get(uid).copied()
    }

    /// Adds or updates a node; aggregates of pods already placed on it are kept.
    pub fn upsert_node(&mut self, node: &Node) -> Result<(), SchedulerError> {
        let name = node
            .metadata
            .name
            .clone()
            .ok_or(SchedulerError::MissingName)?;
        let wrap = |e| SchedulerError::InvalidNode {
            node: name.clone(),
            source: Box::new(e),
        };
        let alloc = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
        let get = |res: &str, scale: u32| -> Result<i64, SchedulerError> {
            alloc
                .and_then(|a| a.get(res))
                .map_or(Ok(0), |q| parse_scaled(&q.0, scale))
        };
        let allocatable = Resources {
            milli_cpu: get("cpu", 3).map_err(wrap)?,
            memory: get("memory", 0).map_err(wrap)?,
        };
        let allowed_pods = get("pods", 0).map_err(wrap)?;
        let spec = node.spec.as_ref();
        let mut taints: Vec<NodeTaint> = spec
            .and_then(|s| s.taints.as_ref())
            .into_iter()
            .flatten()
            .map(|t| NodeTaint {
                key: t.key.clone(),
                value: t.value.clone().unwrap_or_default(),
                effect: t.effect.clone(),
            })
            .collect();
        // Upstream filters not-ready nodes through the taints the node lifecycle controller adds
        // (TaintNodesByCondition); derive them here too so a not-ready node is never chosen even before (or
        // without) that controller, and the FailedScheduling message reads as upstream's.
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.as_str());
        let derived = match ready {
            Some("True") => None,
            Some("False") => Some(TAINT_NOT_READY),
            _ => Some(TAINT_UNREACHABLE),
        };
        if let Some(key) = derived {
            if !taints
                .iter()
                .any(|t| t.key == key && t.effect == "NoSchedule")
            {
                taints.push(NodeTaint {
                    key: key.to_owned(),
                    value: String::new(),
                    effect: "NoSchedule".into(),
                });
            }
        }
        let i = self.slot(&name);
        let n = &mut self.nodes[i];
        if !n.present {
            self.present_nodes += 1;
        }
        n.present = true;
        n.labels = node.metadata.labels.clone().unwrap_or_default();
        n.unschedulable = spec.and_then(|s| s.unschedulable).unwrap_or(false);
        n.has_hard_taints = taints
            .iter()
            .any(|t| t.effect == "NoSchedule" || t.effect == "NoExecute");
        n.has_soft_taints = taints.iter().any(|t| t.effect == "PreferNoSchedule");
        n.taints = taints;
        n.allocatable = allocatable;
        n.allowed_pods = allowed_pods;
        Ok(())
    }

    /// Forgets a node; pods still bound to it keep counting until they are removed.
    pub fn remove_node(&mut self, name: &str) {
        if let Some(&i) = self.node_index.get(name) {
            if self.nodes[i].present {
                self.present_nodes -= 1;
            }
            let n = &mut self.nodes[i];
            n.present = false;
            n.labels.clear();
            n.taints.clear();
            n.has_hard_taints = false;
            n.has_soft_taints = false;
        }
    }

    /// Records a pod bound to `spec.nodeName` (from a watch); pods without a node are ignored. Re-adding a pod
    /// replaces its previous placement.
    pub fn add_pod(&mut self, pod: &Pod) -> Result<(), SchedulerError> {
        let Some(node) = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .filter(|n| !n.is_empty())
        else {
            return Ok(());
        };
        let node = node.to_owned();
        let req = PodRequest::from_pod(pod)?;
        self.assume(&req, &node);
        Ok(())
    }

    /// Places a scheduled pod on `node` right away (upstream's "assume"), before the binding is confirmed by the
    /// watch, so the next pod sees the capacity it used.
    pub fn assume(&mut self, pod: &PodRequest, node: &str) {
        self.remove_pod(&pod.key);
        let i = self.slot(node);
        let owner = pod.owner.as_ref().map(|uid| {
            let next = u32::try_from(self.owner_ids.len()).unwrap_or(u32::MAX);
            *self.owner_ids.entry(uid.clone()).or_insert(next)
        });
        let n = &mut self.nodes[i];
        n.requested.add(pod.requests);
        n.non_zero_requested.add(pod.non_zero);
        n.pod_count += 1;
        n.host_ports.extend(pod.host_ports.iter().cloned());
        if let Some(o) = owner {
            match n.owners.iter_mut().find(|(id, _)| *id == o) {
                Some((_, c)) => *c += 1,
                None => n.owners.push((o, 1)),
            }
        }
        self.pods.insert(
            pod.key.clone(),
            PlacedPod {
                node: i,
                requests: pod.requests,
                non_zero: pod.non_zero,
                host_ports: pod.host_ports.clone(),
                owner,
            },
        );
    }

    /// Removes a placed pod by `namespace/name` (deleted, or finished and no longer holding resources).
    pub fn remove_pod(&mut self, key: &str) {
        let Some(p) = self.pods.remove(key) else {
            return;
        };
        let n = &mut self.nodes[p.node];
        n.requested.sub(p.requests);
        n.non_zero_requested.sub(p.non_zero);
        n.pod_count -= 1;
        for hp in &p.host_ports {
            if let Some(pos) = n.host_ports.iter().position(|h| h == hp) {
                n.host_ports.swap_remove(pos);
            }
        }
        if let Some(o) = p.owner {
            if let Some(pos) = n.owners.iter().position(|(id, _)| *id == o) {
                n.owners[pos].1 -= 1;
                if n.owners[pos].1 == 0 {
                    n.owners.swap_remove(pos);
                }
            }
        }
    }
}
