//! Windlass container runtime: OCI bundles run as namespace + cgroup sandboxes, pod sandboxes, and the image store.
