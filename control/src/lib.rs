//! Windlass control plane: a Kubernetes-compatible API server over a pluggable [`store::Store`].

pub mod store;
