//! The scheduler: picks a node for each unscheduled pod, like kube-scheduler's default profile.
//!
//! - [`Cache`]: nodes and placed pods with per-node aggregates, updated incrementally from watches.
//! - [`PodRequest`]: a pod's requirements computed once (requests with upstream's init-container rule, ports,
//!   selectors, tolerations, controlling owner).
//! - [`Scheduler`]: filters then scores (see `algorithm` for plugin order, weights and `percentageOfNodesToScore`).
//!
//! - [`SchedulingQueue`]: FIFO with upstream's backoff and retry-on-cluster-change.
//! - [`schedule_one`]: one cycle (pop, schedule, assume, bind, event) against the [`ClusterApi`] trait.
//!
//! - [`run`]: the loop that watches nodes and pods through the API server, keeps the cache and queue current and
//!   implements `ClusterApi` with `pods/binding` and `events` ([`ApiCluster`]).
//!
//! The algorithm itself is a pure library with no I/O.

mod algorithm;
mod cache;
mod driver;
mod pod;
mod quantity;
mod queue;
mod runner;

pub use algorithm::{FitError, Placement, ScheduleError, Scheduler};
pub use cache::{Cache, TAINT_NOT_READY, TAINT_UNREACHABLE, TAINT_UNSCHEDULABLE};
pub use driver::{schedule_one, ClusterApi, CycleOutcome};
pub use pod::PodRequest;
pub use queue::{backoff_for, SchedulingQueue};
pub use runner::{run, ApiCluster, RunError, SCHEDULER_NAME};

/// Pod or node data the scheduler cannot use (the API server's validation would normally have rejected it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error("invalid quantity {0:?}")]
    InvalidQuantity(String),
    #[error("invalid node selector: {0}")]
    InvalidSelector(String),
    #[error("object has no metadata.name")]
    MissingName,
    #[error("pod has no spec")]
    MissingSpec,
    #[error("pod {pod}: {source}")]
    InvalidPod {
        pod: String,
        source: Box<SchedulerError>,
    },
    #[error("node {node}: {source}")]
    InvalidNode {
        node: String,
        source: Box<SchedulerError>,
    },
}

pub(crate) use pod::tolerates;
