//! Windlass container runtime: OCI bundles run as namespace + cgroup sandboxes, pod sandboxes, and the image store.
//!
//! Layout: `container/` (create/start/kill/delete of one OCI container), `sandbox/` (pod sandboxes: shared
//! network/IPC/UTS namespaces and the pod cgroup, CRI-format logs), `cgroups/` (v1 and v2 managers behind one
//! trait), `image/` (registry pulls, content store, layer unpacking, overlay root filesystems), `oci/` (config.json
//! loading and validation).

pub mod cgroups;
