//! The running kubelet: the Node and its Lease, a watch of the pods bound to this node, and one worker per pod
//! that drives the runtime towards the pod's spec.
//!
//! Layout: `node_status` (register the Node, post its status, renew its Lease), `pods` (the pod watch, one worker
//! task per pod UID, adoption and clean-up at start), `worker` (one pod's sync and termination), `runtime` (the
//! runtime and image store as the sync sees them), `api` (configMaps/secrets, pull secrets, status, Events,
//! final deletion).
//!
//! Ref: upstream `pkg/kubelet/kubelet.go` (`syncLoop`), `pod_workers.go` (one goroutine per pod UID),
//! `kuberuntime_manager.go` (`SyncPod`, `KillPod`), `status/status_manager.go`, `nodestatus/` and
//! `nodelease/`. Containers are not restarted when the kubelet restarts: sandboxes and containers live on in
//! their own processes and are found again from their state on disk.

mod api;
mod exit_watch;
mod healthz;
mod node_status;
mod pods;
mod runtime;
mod worker;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::Client;

use crate::cni::{CniClient, CniSettings, ProcessExec};
use crate::config::Config;
use crate::dns::{DnsSettings, ResolvConf};
use crate::events::EventRecorder;
use crate::volumes::VolumeManager;

pub use runtime::RuntimeError;

/// Where the cgroup hierarchies are mounted on a normal host.
pub const DEFAULT_CGROUP_MOUNT: &str = "/sys/fs/cgroup";

/// Everything the running kubelet needs beyond its flags.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub config: Config,
    /// The `windlass-runtime` executable (each container's log shim and `exec` run through it).
    pub runtime_binary: PathBuf,
    /// Mount point of the cgroup hierarchies ([`DEFAULT_CGROUP_MOUNT`]).
    pub cgroup_mount: PathBuf,
    /// The kubelet API's TLS and client-CA settings; it serves on `--port` next to the pod workers.
    pub server: crate::server::ServerFlags,
}

/// Why the kubelet could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("API client: {0}")]
    Client(#[source] kube::Error),
    #[error("runtime: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("healthz on 127.0.0.1:{port}: {source}")]
    Healthz {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("kubelet API: {0}")]
    Server(#[source] crate::server::ServerError),
    #[error("--node-ip is not set and no address was found to use")]
    NoNodeIp,
}

/// State shared by the node loop, the pod manager and the pod workers.
pub(crate) struct Shared {
    pub client: Client,
    pub cfg: Config,
    pub node_ip: String,
    pub rt: runtime::PodRuntime,
    pub cni: CniClient<ProcessExec>,
    pub volumes: VolumeManager,
    pub dns: DnsSettings,
    /// The node's /etc/hosts, for host-network pods.
    pub node_hosts: String,
    pub events: Mutex<EventRecorder>,
    /// The node's allocatable resources (what an unset limit reads as through the downward API).
    pub allocatable: RwLock<BTreeMap<String, Quantity>>,
    /// The last list of Services (for containers' service environment variables) and when it was asked for.
    pub services: tokio::sync::Mutex<Option<(std::time::Instant, Arc<Vec<Service>>)>>,
}

impl Shared {
    /// Every Service, for the service environment of a starting container. Pods starting together share one
    /// LIST: a caller reuses a list that was asked for after the caller itself asked, which is as fresh as its own
    /// would be (upstream reads an informer cache instead; one list per burst keeps a node without one cheap).
    pub async fn services(&self) -> Arc<Vec<Service>> {
        let asked = std::time::Instant::now();
        let mut cached = self.services.lock().await;
        if let Some((at, list)) = cached.as_ref() {
            if *at >= asked {
                return list.clone();
            }
        }
        let at = std::time::Instant::now();
        let api: kube::Api<Service> = kube::Api::all(self.client.clone());
        let list = match api.list(&Default::default()).await {
            Ok(list) => Arc::new(list.items),
            Err(e) => {
                tracing::debug!(error = %e, "cannot list services for the service environment");
                Arc::new(Vec::new())
            }
        };
        *cached = Some((at, list.clone()));
        list
    }

    /// Records an Event about `object` and posts it in the background.
    pub fn event(
        &self,
        object: &k8s_openapi::api::core::v1::ObjectReference,
        type_: crate::events::EventType,
        reason: &str,
        message: &str,
    ) {
        let action = match self.events.lock() {
            Ok(mut rec) => rec.record(
                object,
                type_,
                reason,
                message,
                k8s_openapi::jiff::Timestamp::now(),
            ),
            Err(_) => return,
        };
        // Dropped by the spam filter.
        let Some(action) = action else { return };
        let client = self.client.clone();
        tokio::spawn(async move { api::post_event(&client, action).await });
    }
}

async fn client_from_kubeconfig(path: &Path) -> Result<Client, AgentError> {
    let err = |message: String| AgentError::Kubeconfig {
        path: path.to_path_buf(),
        message,
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(|e| err(e.to_string()))?;
    Client::try_from(config).map_err(AgentError::Client)
}

/// Runs the kubelet until `shutdown` completes. Pods keep running after it returns (upstream behaviour: a
/// kubelet restart must not restart containers).
pub async fn run(agent: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let cfg = agent.config;
    let node_ip = cfg.node_ip.ok_or(AgentError::NoNodeIp)?.to_string();
    let client = client_from_kubeconfig(&cfg.kubeconfig).await?;
    std::fs::create_dir_all(&cfg.root_dir).map_err(|source| AgentError::Io {
        path: cfg.root_dir.clone(),
        source,
    })?;
    let rt = runtime::PodRuntime::new(&cfg.root_dir, &agent.cgroup_mount, &agent.runtime_binary)?;
    let bin_path = std::env::join_paths(&cfg.cni_bin_dirs)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cni = CniClient::new(
        CniSettings::new(&cfg.cni_conf_dir, &bin_path, &cfg.root_dir),
        ProcessExec::default(),
    );
    let host_resolv = std::fs::read_to_string(&cfg.resolv_conf).unwrap_or_else(|e| {
        tracing::warn!(path = %cfg.resolv_conf.display(), error = %e, "cannot read the node's resolv.conf");
        String::new()
    });
    let dns = DnsSettings {
        cluster_dns: cfg.cluster_dns.iter().map(ToString::to_string).collect(),
        cluster_domain: cfg.cluster_domain.clone(),
        host: ResolvConf::parse(&host_resolv),
    };
    let node_hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let shared = Arc::new(Shared {
        client,
        volumes: VolumeManager::new(&cfg.root_dir),
        events: Mutex::new(EventRecorder::new(cfg.node_name.clone())),
        allocatable: RwLock::new(BTreeMap::new()),
        services: tokio::sync::Mutex::new(None),
        node_ip,
        rt,
        cni,
        dns,
        node_hosts,
        cfg,
    });
    tracing::info!(node = %shared.cfg.node_name, runtime = %agent.runtime_binary.display(), "kubelet starting");

    // The kubelet API (logs, exec, port-forward, stats): requests are authorised by the API server
    // (SubjectAccessReview), containers found from the runtime's state.
    let server_config = crate::server::ServerConfig::new(
        &shared.cfg,
        &agent.server,
        windlass_runtime::SandboxManager::new(
            crate::layout::sandboxes_dir(&shared.cfg.root_dir),
            &agent.cgroup_mount,
            &agent.runtime_binary,
        ),
    );
    let server = match crate::server::KubeletServer::bind(
        server_config,
        Arc::new(crate::server::SarAuthorizer::new(shared.client.clone())),
    )
    .await
    {
        Ok(s) => tokio::spawn(s.run()),
        Err(e) => return Err(AgentError::Server(e)),
    };
    let healthz = match healthz::bind(shared.cfg.healthz_port).await {
        Ok(serve) => tokio::spawn(serve),
        Err(source) => {
            server.abort();
            return Err(AgentError::Healthz {
                port: shared.cfg.healthz_port,
                source,
            });
        }
    };
    let node = tokio::spawn(node_status::run(shared.clone()));
    let pods = tokio::spawn(pods::run(shared.clone()));
    shutdown.await;
    tracing::info!("shutting down; pods keep running");
    node.abort();
    pods.abort();
    server.abort();
    healthz.abort();
    Ok(())
}
