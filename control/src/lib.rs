//! Windlass control plane: a Kubernetes-compatible API server over a pluggable [`store::Store`].
//!
//! - [`store`]: the `Store` trait (etcd's revision semantics) and its backends.
//! - `api`: the HTTPS API server (discovery, OpenAPI, generic resource handlers, watch, patch).
//! - [`controllers`]: the controllers (ReplicaSet, Deployment, endpoints, node lifecycle, ...), each over the API.
//! - [`pki`]: first-start certificates and the admin kubeconfig.

mod api;
pub mod controllers;
pub mod pki;
pub mod scheduler;
pub mod store;

pub use api::{serve, ApiConfig, ServeError, User};
