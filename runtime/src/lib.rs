//! Windlass container runtime: OCI bundles run as namespace + cgroup sandboxes, pod sandboxes, and the image store.
//!
//! Layout: `container/` (create/start/kill/delete of one OCI container), `sandbox/` (pod sandboxes: shared
//! network/IPC/UTS namespaces and the pod cgroup, CRI-format logs), `cgroups/` (v1 and v2 managers behind one
//! trait), `image/` (registry pulls, content store, layer unpacking, overlay root filesystems), `oci/` (config.json
//! loading and validation), `cli/` (the runc-compatible commands behind the `windlass-runtime` binary).

pub mod cgroups;
pub mod cli;
mod container;
pub mod oci;
mod sandbox;

pub use container::{
    become_subreaper, block_forwarded_signals, console_pair, copy_window_size, parse_signal,
    proxy_terminal, reap_children, receive_pty, wait_forwarding, Console, ContainerError,
    CreateOptions, ExecOptions, ExitStatus, RawTerminal, Runtime, State, Status,
};
pub use sandbox::{
    run_shim, ContainerConfig, ContainerInfo, CriLogStream, ExecResult, SandboxConfig,
    SandboxError, SandboxInfo, SandboxManager, SandboxState,
};
