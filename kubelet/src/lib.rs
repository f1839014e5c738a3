//! Windlass kubelet: the node agent that runs the pods bound to its node.
//!
//! This crate holds the kubelet's building blocks, each testable on its own; the runtime (sandboxes, containers,
//! images) and the API client plug in through small traits:
//! - [`cni`]: the CNI client that gives a pod sandbox its network (ADD/CHECK/DEL over a plugin chain).

// Tests may unwrap: a panic there is a test failure with its message.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cni;
pub mod config;
pub mod dns;
pub mod env;
pub mod node;
pub mod probes;
pub mod qos;
pub mod quantity;
pub mod restart;
pub mod static_pods;
pub mod status;
pub mod volumes;
