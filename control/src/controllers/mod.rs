//! Controllers: each observes the cluster through the API server (watch + cache, as kube-runtime's reflector and
//! controller), diffs desired against current state and acts through the API, never the store.
//!
//! Every controller is one entry of [`CONTROLLERS`]: a name (`--controllers` takes these, as
//! kube-controller-manager does) and a function that runs it until it fails or the process stops. They share one
//! [`Context`]. [`run`] starts the selected ones (and the scheduler) behind leader election.

mod deployment;
mod garbage_collector;
mod namespace;
mod ownership;
mod replicaset;

use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

mod endpoints;
mod endpointslice;
mod leader;
mod manager;
mod nodeipam;
mod nodelifecycle;
mod podgc;
mod root_ca_publisher;
mod serviceaccount;
mod watch;

pub use leader::{LeaderElection, LeaseSettings};
pub use manager::{run, ManagerError, ManagerOptions};

/// What every controller gets.
#[derive(Clone)]
pub struct Context {
    /// A client of the API server, authenticated as the controller manager.
    pub client: kube::Client,
    pub config: Arc<ControllersConfig>,
}

/// Settings of the controllers (flags of `windlass-control serve`); defaults are upstream's.
#[derive(Debug, Clone)]
pub struct ControllersConfig {
    /// `--cluster-cidr`: the pod network node IPAM carves per-node ranges from.
    pub cluster_cidr: (Ipv4Addr, u8),
    /// `--node-cidr-mask-size`: prefix length of each node's `spec.podCIDR`.
    pub node_cidr_mask_size: u8,
    /// `--node-monitor-period`: how often node lifecycle checks heartbeats.
    pub node_monitor_period: Duration,
    /// `--node-monitor-grace-period`: a node silent this long becomes `Ready=Unknown`.
    pub node_monitor_grace_period: Duration,
    /// How long a pod without its own not-ready/unreachable toleration stays on such a node before eviction
    /// (`--default-unreachable-toleration-seconds`; the API server gives new pods that toleration, this covers
    /// pods created without it, like upstream's old `--pod-eviction-timeout`).
    pub pod_eviction_timeout: Duration,
    /// `--terminated-pod-gc-threshold`: how many terminated pods may exist before the pod garbage collector
    /// deletes the oldest (0 disables that check).
    pub terminated_pod_gc_threshold: usize,
    /// `--pod-gc-orphan-quarantine`: how long a node its pods name must be missing before the pod garbage
    /// collector deletes them (upstream's fixed `quarantineTime`).
    pub pod_gc_orphan_quarantine: Duration,
    /// The cluster CA bundle (PEM) the root-ca-cert-publisher puts in every namespace: `--root-ca-file`, else the
    /// CA of the controllers' kubeconfig, as kube-controller-manager does. `None`: that controller does nothing.
    pub root_ca: Option<String>,
}

impl Default for ControllersConfig {
    fn default() -> Self {
        Self {
            cluster_cidr: (Ipv4Addr::new(10, 244, 0, 0), 16),
            node_cidr_mask_size: 24,
            node_monitor_period: Duration::from_secs(5),
            node_monitor_grace_period: Duration::from_secs(40),
            pod_eviction_timeout: Duration::from_secs(300),
            terminated_pod_gc_threshold: 12500,
            pod_gc_orphan_quarantine: Duration::from_secs(40),
            root_ca: None,
        }
    }
}

/// Now in RFC 3339 with second precision, as `metav1.Time` serialises (condition and event timestamps).
pub(crate) fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or(jiff::Timestamp::now())
        .to_string()
}

/// Why a controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{controller}: API request failed: {source}")]
    Api {
        controller: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("{controller}: watch failed: {message}")]
    Watch {
        controller: &'static str,
        message: String,
    },
}

/// A running controller.
pub type ControllerFuture = Pin<Box<dyn Future<Output = Result<(), ControllerError>> + Send>>;

/// A controller: its `--controllers` name and how to start it.
pub struct ControllerEntry {
    pub name: &'static str,
    pub start: fn(Context) -> ControllerFuture,
}

/// The scheduler's name in `--controllers` (it runs with its own identity, not from [`CONTROLLERS`]).
pub const SCHEDULER: &str = "scheduler";

/// Every controller, in start order.
pub const CONTROLLERS: &[ControllerEntry] = &[
    ControllerEntry {
        name: "replicaset",
        start: replicaset::start,
    },
    ControllerEntry {
        name: "deployment",
        start: deployment::start,
    },
    ControllerEntry {
        name: "garbagecollector",
        start: garbage_collector::start,
    },
    ControllerEntry {
        name: "namespace",
        start: namespace::start,
    },
    ControllerEntry {
        name: "serviceaccount",
        start: serviceaccount::start,
    },
    ControllerEntry {
        name: "root-ca-cert-publisher",
        start: root_ca_publisher::start,
    },
    ControllerEntry {
        name: "nodeipam",
        start: nodeipam::start,
    },
    ControllerEntry {
        name: "nodelifecycle",
        start: nodelifecycle::start,
    },
    ControllerEntry {
        name: "podgc",
        start: podgc::start,
    },
    ControllerEntry {
        name: "endpoints",
        start: endpoints::start,
    },
    ControllerEntry {
        name: "endpointslice",
        start: endpointslice::start,
    },
];

/// A `--controllers` value that names a controller this binary does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--controllers: unknown controller {0:?} (known: {known})", known = known_names().join(", "))]
pub struct UnknownController(pub String);

/// Every name `--controllers` accepts.
pub fn known_names() -> Vec<&'static str> {
    CONTROLLERS
        .iter()
        .map(|c| c.name)
        .chain([SCHEDULER])
        .collect()
}

/// Which controllers `--controllers` selects, with kube-controller-manager's syntax: `*` enables every
/// controller, `foo` enables one, `-foo` disables one (a disable wins over `*`). Ref: kube-controller-manager
/// `IsControllerEnabled`.
pub fn select(spec: &[String]) -> Result<Vec<&'static str>, UnknownController> {
    let known = known_names();
    let mut star = false;
    let mut on = Vec::new();
    let mut off = Vec::new();
    for item in spec.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        if item == "*" {
            star = true;
            continue;
        }
        let (list, name) = match item.strip_prefix('-') {
            Some(n) => (&mut off, n),
            None => (&mut on, item),
        };
        let Some(k) = known.iter().find(|k| **k == name) else {
            return Err(UnknownController(name.to_owned()));
        };
        list.push(*k);
    }
    Ok(known
        .into_iter()
        .filter(|k| !off.contains(k) && (star || on.contains(k)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str) -> Result<Vec<&'static str>, UnknownController> {
        select(&s.split(',').map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn controllers_flag_follows_kube_controller_manager_syntax() {
        assert_eq!(sel("*").expect("star"), known_names());
        let without = sel("*,-nodeipam").expect("minus");
        assert!(!without.contains(&"nodeipam"));
        assert_eq!(without.len(), known_names().len() - 1);
        assert_eq!(
            sel("endpoints,scheduler").expect("list"),
            ["endpoints", "scheduler"]
        );
        assert_eq!(sel("-scheduler").expect("only minus"), Vec::<&str>::new());
        assert_eq!(sel("*,bogus"), Err(UnknownController("bogus".into())));
    }
}
