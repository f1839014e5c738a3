//! Windlass container runtime: OCI bundles run as namespace + cgroup sandboxes, pod sandboxes, and the image store.
//!
//! Layout: `container/` (create/start/kill/delete of one OCI container), `sandbox/` (pod sandboxes: shared
//! network/IPC/UTS namespaces and the pod cgroup, CRI-format logs), `cgroups/` (v1 and v2 managers behind one
//! trait), `image/` (registry pulls, content store, layer unpacking, overlay root filesystems), `oci/` (config.json
//! loading and validation), `cli/` (the runc-compatible commands behind the `windlass-runtime` binary).
//!
//! Process model (see `container/init.rs`): `create` forks stage 1, which joins the container's cgroup and any
//! namespaces given by path, creates the rest (a new user namespace first, with its ID maps written by the runtime),
//! and forks stage 2, the container's init (PID 1 of a new PID namespace). The init sets up the root filesystem,
//! `pivot_root`s, applies the process attributes, reports "ready" on a pipe and blocks reading `exec.fifo` in the
//! state directory until `start` writes to it, so the CLI that ran `create` can exit. Callers that wait for a
//! container (foreground `run`, `exec`, the sandbox log shim) are child subreapers, since the init is a grandchild.
//!
//! Pod sandboxes (`sandbox/`): a forked holder process owns the pod's namespaces; each container is created by a
//! detached `windlass-runtime shim` process that owns its stdio, writes CRI logs and records its exit status, so
//! everything survives a restart of the calling kubelet and is found again from the state on disk.

pub mod cgroups;
pub mod cli;
mod container;
pub mod image;
pub mod oci;
mod sandbox;

pub use container::{
    become_subreaper, block_forwarded_signals, console_pair, copy_window_size, parse_signal,
    proxy_terminal, reap_children, receive_pty, wait_forwarding, Console, ContainerError,
    CreateOptions, ExecOptions, ExitStatus, RawTerminal, Runtime, State, Status,
};
pub use sandbox::{
    resize_terminal, run_shim, ContainerConfig, ContainerInfo, CriLogStream, ExecProcess,
    ExecResult, ExecSpec, SandboxConfig, SandboxError, SandboxInfo, SandboxManager, SandboxState,
};
