//! Controllers: each observes the cluster through the API server (watch + cache, as kube-runtime's reflector and
//! controller), diffs desired against current state and acts through the API, never the store.
//!
//! Every controller is one entry of [`CONTROLLERS`]: a name (`--controllers` takes these, as
//! kube-controller-manager does) and a function that runs it until it fails or the process stops. They share one
//! [`Context`].

mod deployment;
mod garbage_collector;
mod namespace;
mod ownership;
mod replicaset;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// What every controller gets.
#[derive(Clone)]
pub struct Context {
    /// A client of the API server, authenticated as the controller manager.
    pub client: kube::Client,
    pub config: Arc<ControllersConfig>,
}

/// Settings of the controllers (flags of `windlass-control serve`).
#[derive(Debug, Clone, Default)]
pub struct ControllersConfig {}

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
];
