//! The running kubelet: the Node and its Lease, a watch of the pods bound to this node, and one worker per pod
//! that drives the runtime towards the pod's spec.
//!
//! Layout: `node_status` (register the Node, post its status, renew its Lease), `pods` (the pod watch and the
//! static pods, one worker task per pod UID, adoption and clean-up at start), `worker` (one pod's sync and
//! termination), `runtime` (the runtime and image store as the sync sees them), `api` (configMaps/secrets, pull
//! secrets, status, Events, final deletion), `static_source` (`--pod-manifest-path`, watched) and `mirror` (the
//! static pods' mirror pods in the API).
//!
//! Ref: upstream `pkg/kubelet/kubelet.go` (`syncLoop`), `pod_workers.go` (one goroutine per pod UID),
//! `kuberuntime_manager.go` (`SyncPod`, `KillPod`), `status/status_manager.go`, `nodestatus/` and
//! `nodelease/`. Containers are not restarted when the kubelet restarts: sandboxes and containers live on in
//! their own processes and are found again from their state on disk.

mod api;
mod exit_watch;
mod healthz;
mod host_network;
mod mirror;
mod node_status;
mod pods;
mod runtime;
mod static_source;
mod tokens;
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
pub use tokens::DEFAULT_REFRESH_FRACTION;

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
    /// Fraction of a projected service-account token's lifetime after which it is replaced
    /// ([`DEFAULT_REFRESH_FRACTION`], upstream's 80 %; tests lower it to see rotation without waiting).
    pub token_refresh_fraction: f64,
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
    /// Events to post, in order, by one task (upstream's broadcaster writes to the API one event at a time, so
    /// a burst of pod starts does not put dozens of event writes next to their status patches).
    pub events_tx: tokio::sync::mpsc::Sender<crate::events::EventAction>,
    /// The node's allocatable resources (what an unset limit reads as through the downward API).
    pub allocatable: RwLock<BTreeMap<String, Quantity>>,
    /// Projected service-account tokens, cached and rotated.
    pub tokens: tokens::TokenManager,
    /// Static pods and their mirror pods in the API.
    pub mirrors: mirror::MirrorPods,
    /// The cluster's Services as the kubelet's watch sees them (containers' service environment variables).
    pub services: kube::runtime::reflector::Store<Service>,
}

impl Shared {
    /// Every Service, for the service environment of a starting container, from the kubelet's watch of
    /// Services (upstream's service informer): no API call on the pod start path. Until the first list arrived
    /// a start waits for it (bounded), as upstream refuses to build service variables before it has read the
    /// Services once.
    pub async fn services(&self) -> Vec<Service> {
        if tokio::time::timeout(SERVICES_SYNC_WAIT, self.services.wait_until_ready())
            .await
            .is_err()
        {
            tracing::warn!(
                "services not listed yet; starting without service environment variables"
            );
        }
        self.services
            .state()
            .iter()
            .map(|s| (**s).clone())
            .collect()
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
        if self.events_tx.try_send(action).is_err() {
            tracing::debug!(reason, "event queue full; event dropped");
        }
    }
}

/// Hands memory the allocator holds but no longer uses back to the system. A burst of pod starts spreads
/// allocations over many blocking threads and malloc arenas; once they are freed, glibc keeps most of them mapped
/// (it only trims the top of the main heap by itself), which would show as resident memory of an idle kubelet.
pub(crate) fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own arenas; it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Events waiting to be posted before new ones are dropped (upstream `maxQueuedEvents`).
const EVENT_QUEUE: usize = 1000;

/// How long a container start waits for the first list of Services.
const SERVICES_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps `writer` in step with the cluster's Services until aborted. Only what the service environment reads is
/// kept (name, namespace, spec): managed fields, annotations and status would only cost memory.
async fn watch_services(client: Client, writer: kube::runtime::reflector::store::Writer<Service>) {
    use futures_util::StreamExt;
    use kube::runtime::WatchStreamExt;
    let api: kube::Api<Service> = kube::Api::all(client);
    let stream = kube::runtime::watcher(api, kube::runtime::watcher::Config::default())
        .default_backoff()
        .modify(|svc| {
            svc.metadata.managed_fields = None;
            svc.metadata.annotations = None;
            svc.status = None;
        })
        .reflect(writer);
    futures_util::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        if let Err(e) = ev {
            tracing::debug!(error = %e, "service watch failed; retrying");
        }
    }
}

async fn client_from_kubeconfig(path: &Path) -> Result<Client, AgentError> {
    windlass_kubeclient::client(Some(path), "windlass-kubelet")
        .await
        .map_err(|e| match e {
            windlass_kubeclient::ClientError::Client(e) => AgentError::Client(e),
            other => AgentError::Kubeconfig {
                path: path.to_path_buf(),
                message: other.to_string(),
            },
        })
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
    let (services_reader, services_writer) = kube::runtime::reflector::store();
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
    let event_poster = {
        let client = client.clone();
        tokio::spawn(async move {
            while let Some(action) = events_rx.recv().await {
                api::post_event(&client, action).await;
            }
        })
    };
    let services = tokio::spawn(watch_services(client.clone(), services_writer));
    let shared = Arc::new(Shared {
        client,
        volumes: VolumeManager::new(&cfg.root_dir),
        events: Mutex::new(EventRecorder::new(cfg.node_name.clone())),
        events_tx,
        allocatable: RwLock::new(BTreeMap::new()),
        tokens: tokens::TokenManager::new(agent.token_refresh_fraction),
        mirrors: mirror::MirrorPods::default(),
        services: services_reader,
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
    // Static pods are the kubelet's own config source: read before anything else, run whether or not the API
    // server answers (upstream kubeadm runs the API server itself this way).
    let statics = shared
        .cfg
        .pod_manifest_path
        .clone()
        .map(|dir| static_source::start(shared.clone(), &dir));
    let pods = tokio::spawn(pods::run(shared.clone(), statics));
    let mirrors = tokio::spawn(mirror::run(shared.clone()));
    shutdown.await;
    tracing::info!("shutting down; pods keep running");
    node.abort();
    pods.abort();
    mirrors.abort();
    services.abort();
    event_poster.abort();
    server.abort();
    healthz.abort();
    Ok(())
}
