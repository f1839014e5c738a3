//! Windlass kubelet: the node agent that runs the pods bound to its node.
//!
//! This crate holds the kubelet's building blocks, each tested on its own. Where one needs the container
//! runtime, the image store or the API server, it goes through a small trait the kubelet's wiring implements:
//!
//! | trait | used by | implemented by (to come) |
//! |---|---|---|
//! | [`cni::PluginExec`] | running CNI plugins ([`cni::ProcessExec`], optionally via `ip netns exec`) | — (done) |
//! | [`env::ConfigSource`] | env `configMapKeyRef`/`secretKeyRef`/`envFrom`; configMap/secret volumes | the API watch cache ([`env::MapSource`] in tests) |
//! | [`volumes::TokenSource`] | projected service-account tokens | the API client's TokenRequest ([`volumes::NoTokens`] until then) |
//! | [`probes::ExecRunner`] | `exec` probes and lifecycle hooks | the runtime's exec ([`probes::NoExec`] until then) |
//! | [`probes::Prober`] | probe workers | [`probes::NetProber`] (HTTP/HTTPS/TCP + `ExecRunner`) |
//!
//! The runtime's state enters as plain data: [`status::RuntimeContainer`] (one container instance) and
//! [`sync::SandboxState`] (one sandbox); out come the API status ([`status::generate_pod_status`]) and the sync
//! plan ([`sync::compute_pod_actions`]).
//!
//! Modules:
//! - [`cni`]: CNI client (ADD/CHECK/DEL over a conflist, result cache, capabilities, typed plugin errors).
//! - [`status`], [`sync`], [`restart`]: pod status/phase/conditions, what a sync must do, restart policy and
//!   `CrashLoopBackOff` back-off — all as upstream computes them.
//! - [`qos`], [`quantity`]: QoS classes, cgroup layout, OCI resources, `oom_score_adj`; resource quantities.
//! - [`env`](mod@env), [`dns`]: container environment and `$(VAR)` expansion; resolv.conf, hosts, hostname.
//! - [`mounts`]: a container's bind mounts (volumeMounts with subPath, `/etc/hosts`, resolv.conf, hostname,
//!   termination log).
//! - [`volumes`]: emptyDir, hostPath, configMap, secret, downwardAPI, projected (atomic writer).
//! - [`pull`]: imagePullPolicy decisions and imagePullSecrets credential matching.
//! - [`lifecycle`]: postStart/preStop hooks, grace periods and the stop signal.
//! - [`probes`]: liveness/readiness/startup probe workers.
//! - [`events`]: Events with upstream's aggregation of repeats.
//! - [`layout`]: sandbox/container IDs, their labels and log paths (shared by pod workers and the kubelet API).
//! - [`node`], [`static_pods`], [`config`]: the Node object and Lease, static pod manifests and mirror pods, flags.
//! - [`agent`]: the running kubelet that wires all of the above to the API server, the runtime and CNI.
//! - [`server`]: the kubelet API (logs, exec, attach, stats, healthz, metrics) over HTTPS, authorised by the API server.

// Tests may unwrap: a panic there is a test failure with its message.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod agent;
pub mod cni;
pub mod config;
pub mod dns;
pub mod env;
pub mod events;
pub mod layout;
pub mod lifecycle;
pub mod mounts;
pub mod node;
pub mod probes;
pub mod pull;
pub mod qos;
pub mod quantity;
pub mod restart;
pub mod server;
pub mod static_pods;
pub mod status;
pub mod sync;
pub mod volumes;
