//! `windlass-control`: the Windlass API server.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use windlass_control::controllers::{self, ControllersConfig, LeaseSettings, ManagerOptions};
use windlass_control::store::{self, embedded::EmbeddedOptions, etcd::EtcdConfig, StoreConfig};
use windlass_control::ApiConfig;

#[derive(Parser)]
#[command(
    name = "windlass-control",
    version,
    about = "Windlass control plane: a Kubernetes-compatible API server, scheduler and controllers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Kubernetes API over HTTPS (creates certificates and admin.kubeconfig on first start), and run
    /// the scheduler and controllers against it (behind leader election).
    Serve(Box<ServeArgs>),
    /// Write a kubeconfig with a client certificate for a user (and groups), signed by the cluster CA.
    IssueKubeconfig {
        #[arg(long, default_value = "/var/lib/windlass/control")]
        data_dir: PathBuf,
        #[arg(long)]
        user: String,
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Server URL to put in the kubeconfig.
        #[arg(long, default_value = "https://127.0.0.1:6443")]
        server: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Backups of the embedded store (`snapshot save`, `snapshot restore`).
    #[command(subcommand)]
    Snapshot(windlass_control::store::snapshot::SnapshotCommand),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// State directory: the embedded store, PKI and admin.kubeconfig.
    #[arg(long, default_value = "/var/lib/windlass/control")]
    data_dir: PathBuf,
    #[arg(long, default_value = "0.0.0.0")]
    bind_address: IpAddr,
    #[arg(long, default_value_t = 6443)]
    secure_port: u16,
    /// Extra subject alternative names (DNS names or IPs) for the serving certificate.
    #[arg(long = "tls-san", value_delimiter = ',')]
    tls_san: Vec<String>,
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cluster_ip_range: String,
    #[arg(long, default_value = "30000-32767")]
    service_node_port_range: String,
    /// Static bearer tokens, one `token,user,uid[,"group1,group2"]` per line (as kube-apiserver's flag).
    #[arg(long)]
    token_auth_file: Option<PathBuf>,
    /// Append one JSON line per request (user, verb, resource, response code) to this file.
    #[arg(long)]
    audit_log_path: Option<PathBuf>,
    /// How long Events are kept (e.g. `1h`, `90s`, Go's `1h0m0s`).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    event_ttl: std::time::Duration,
    /// etcd endpoints (comma-separated URLs); without it the embedded store in `--data-dir` is used.
    #[arg(long)]
    etcd_servers: Option<String>,
    #[arg(long)]
    etcd_cafile: Option<PathBuf>,
    #[arg(long)]
    etcd_certfile: Option<PathBuf>,
    #[arg(long)]
    etcd_keyfile: Option<PathBuf>,
    /// Recent store events kept in memory for watches that resume from a past resourceVersion.
    #[arg(long, default_value_t = 5000)]
    watch_history: usize,
    /// Bound on the bytes of objects in that history (MiB); the oldest events go first.
    #[arg(long, default_value_t = 8)]
    watch_history_mib: usize,
    /// The embedded store's page cache (MiB). Lists are streamed and most reads come from the server's caches,
    /// so a small cache costs little; the OS page cache still holds the file.
    #[arg(long, default_value_t = 8)]
    store_cache_mib: usize,

    /// Controllers to run, kube-controller-manager style: `*` all, `foo` one, `-foo` all but one. Names:
    /// the controllers (`endpoints`, `endpointslice`, `nodeipam`, `nodelifecycle`, `serviceaccount`,
    /// `root-ca-cert-publisher`, ...) and
    /// `scheduler`.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    controllers: Vec<String>,
    /// Run the scheduler and controllers against the API server in this kubeconfig instead of our own.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Do not serve the API (and open no store): only the scheduler and controllers, against `--kubeconfig`.
    #[arg(long, requires = "kubeconfig")]
    disable_api: bool,
    /// CA bundle (PEM) the root-ca-cert-publisher puts in every namespace's `kube-root-ca.crt` (default: the CA
    /// of the controllers' kubeconfig).
    #[arg(long)]
    root_ca_file: Option<PathBuf>,
    /// Pod network that node IPAM carves per-node ranges from.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: String,
    /// Prefix length of each node's pod CIDR.
    #[arg(long, default_value_t = 24)]
    node_cidr_mask_size: u8,
    /// How often node lifecycle checks node heartbeats (Go duration: `5s`, `500ms`, `1m`).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    node_monitor_period: Duration,
    /// A node whose Lease/status has not changed for this long becomes Ready=Unknown and is tainted.
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    node_monitor_grace_period: Duration,
    /// Toleration seconds for the not-ready NoExecute taint given to new pods without one (how long they stay
    /// on a node that reports NotReady).
    #[arg(long, default_value_t = 300)]
    default_not_ready_toleration_seconds: u32,
    /// Toleration seconds for the unreachable NoExecute taint given to new pods without one (how long they stay
    /// on a node that stopped heartbeating before eviction).
    #[arg(long, default_value_t = 300)]
    default_unreachable_toleration_seconds: u32,
    /// Terminated (Succeeded/Failed) pods that may exist before the pod garbage collector deletes the oldest;
    /// 0 disables that check.
    #[arg(long, default_value_t = 12500)]
    terminated_pod_gc_threshold: usize,
    /// How long the node a pod is bound to must be missing before the pod garbage collector deletes the pod
    /// (Windlass-only: upstream fixes this at 40 s).
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    pod_gc_orphan_quarantine: Duration,
    /// Run the scheduler and controllers only while holding the leader Lease (several processes can share
    /// one etcd).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    leader_elect_lease_duration: Duration,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    leader_elect_renew_deadline: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    leader_elect_retry_period: Duration,
    #[arg(long, default_value = "kube-system")]
    leader_elect_resource_namespace: String,
    #[arg(long, default_value = "windlass-control")]
    leader_elect_resource_name: String,
}

/// A Go-style duration as Kubernetes flags take them: `300ms`, `40s`, `5m`, `1h`, `1m30s`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("invalid duration {s:?} (expected e.g. 500ms, 40s, 5m, 1h30m)");
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(err());
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        let value: f64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ms" => value / 1000.0,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            _ => return Err(err()),
        };
        total += Duration::try_from_secs_f64(secs).map_err(|_| err())?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

fn parse_cidr(s: &str) -> anyhow::Result<(Ipv4Addr, u8)> {
    let (ip, len) = s
        .split_once('/')
        .context("expected an IPv4 CIDR like 10.96.0.0/12")?;
    let ip: Ipv4Addr = ip
        .parse()
        .with_context(|| format!("invalid address in {s}"))?;
    let len: u8 = len
        .parse()
        .with_context(|| format!("invalid prefix length in {s}"))?;
    anyhow::ensure!(
        (8..=30).contains(&len),
        "CIDR prefix length must be between 8 and 30 in {s}"
    );
    Ok((ip, len))
}

fn parse_port_range(s: &str) -> anyhow::Result<(u16, u16)> {
    let (a, b) = s
        .split_once('-')
        .context("expected a port range like 30000-32767")?;
    let (a, b): (u16, u16) = (a.parse()?, b.parse()?);
    anyhow::ensure!(a > 0 && a <= b, "invalid port range {s}");
    Ok((a, b))
}

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options: two arenas (a control plane on a small VM, as glibc's were capped at two), and freed
/// pages given back within a second by a background thread, so RSS follows the live heap.
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: MallocConf =
    MallocConf(c"narenas:2,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// jemalloc reads its options through a `const char *` symbol.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);
// SAFETY: the pointer is to a static, immutable byte string.
unsafe impl Sync for MallocConf {}

fn main() -> anyhow::Result<()> {
    // The workspace enables both of rustls's crypto backends (ring here, aws-lc-rs through reqwest), so rustls
    // cannot pick one by itself: choose ring for the whole process before any TLS client or server is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::IssueKubeconfig {
            data_dir,
            user,
            groups,
            server,
            out,
        } => {
            let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
            windlass_control::pki::issue_client_kubeconfig(
                &data_dir, &user, &groups, &server, &out,
            )?;
            Ok(())
        }
        Command::Snapshot(command) => {
            windlass_control::store::snapshot::run(&command)?;
            Ok(())
        }
    }
}

/// A client for an in-process component. `agent` becomes its User-Agent product, which the API server records as
/// the field manager of writes that name none (as upstream's `kube-controller-manager/v1.x` is); kube-rs sends no
/// User-Agent by itself.
async fn client_from(path: &Path, agent: &str) -> anyhow::Result<kube::Client> {
    Ok(windlass_kubeclient::client(Some(path), agent).await?)
}

/// The cluster CA bundle for `kube-root-ca.crt`: `--root-ca-file`, else the kubeconfig's cluster CA (inline or
/// a file), as kube-controller-manager falls back to its client's CA.
fn root_ca(args: &ServeArgs, kubeconfig: &Path) -> anyhow::Result<Option<String>> {
    use base64::Engine as _;
    if let Some(file) = &args.root_ca_file {
        let pem = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read --root-ca-file {}", file.display()))?;
        return Ok(Some(pem));
    }
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("cannot read kubeconfig {}", kubeconfig.display()))?;
    let context = kc
        .current_context
        .as_deref()
        .and_then(|cur| kc.contexts.iter().find(|c| c.name == cur))
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone());
    let cluster = kc
        .clusters
        .iter()
        .find(|c| context.as_deref().is_none_or(|want| c.name == want))
        .and_then(|c| c.cluster.as_ref());
    let Some(cluster) = cluster else {
        return Ok(None);
    };
    if let Some(data) = &cluster.certificate_authority_data {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .context("the kubeconfig's certificate-authority-data is not base64")?;
        return Ok(Some(String::from_utf8_lossy(&pem).into_owned()));
    }
    match &cluster.certificate_authority {
        Some(path) => Ok(Some(std::fs::read_to_string(path).with_context(|| {
            format!("cannot read the kubeconfig's certificate-authority {path}")
        })?)),
        None => Ok(None),
    }
}

/// The controller manager's settings from the flags; `None` when nothing is enabled.
async fn manager_options(
    args: &ServeArgs,
    controller_kubeconfig: &Path,
    scheduler_kubeconfig: &Path,
) -> anyhow::Result<Option<ManagerOptions>> {
    let enabled = controllers::select(&args.controllers)?;
    if enabled.is_empty() {
        return Ok(None);
    }
    let config = ControllersConfig {
        cluster_cidr: parse_cidr(&args.cluster_cidr).context("invalid --cluster-cidr")?,
        node_cidr_mask_size: args.node_cidr_mask_size,
        node_monitor_period: args.node_monitor_period,
        node_monitor_grace_period: args.node_monitor_grace_period,
        pod_eviction_timeout: Duration::from_secs(
            args.default_unreachable_toleration_seconds.into(),
        ),
        terminated_pod_gc_threshold: args.terminated_pod_gc_threshold,
        pod_gc_orphan_quarantine: args.pod_gc_orphan_quarantine,
        root_ca: root_ca(args, controller_kubeconfig)?,
    };
    anyhow::ensure!(
        args.node_cidr_mask_size >= config.cluster_cidr.1 && args.node_cidr_mask_size <= 30,
        "--node-cidr-mask-size must be between the --cluster-cidr prefix length and 30"
    );
    let lease = args.leader_elect.then(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        // Unique per process, as upstream's `<hostname>_<uuid>`.
        let mut s = LeaseSettings::new(format!("{host}_{}", uuid::Uuid::new_v4()));
        s.namespace = args.leader_elect_resource_namespace.clone();
        s.name = args.leader_elect_resource_name.clone();
        s.lease_duration = args.leader_elect_lease_duration;
        s.renew_deadline = args.leader_elect_renew_deadline;
        s.retry_period = args.leader_elect_retry_period;
        s
    });
    if let Some(l) = &lease {
        anyhow::ensure!(
            l.lease_duration > l.renew_deadline && l.renew_deadline > l.retry_period,
            "leader election needs lease duration > renew deadline > retry period"
        );
    }
    Ok(Some(ManagerOptions {
        enabled,
        config,
        lease,
        controller_client: client_from(controller_kubeconfig, "windlass-controller-manager")
            .await?,
        scheduler_client: client_from(scheduler_kubeconfig, "windlass-scheduler").await?,
    }))
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    if args.disable_api {
        return runtime.block_on(async move {
            let kubeconfig = args
                .kubeconfig
                .clone()
                .context("--disable-api needs --kubeconfig")?;
            match manager_options(&args, &kubeconfig, &kubeconfig).await? {
                Some(opts) => controllers::run(opts).await?,
                None => tracing::warn!("--disable-api with no controllers enabled: nothing to do"),
            }
            Ok(())
        });
    }
    let config = ApiConfig {
        listen: SocketAddr::new(args.bind_address, args.secure_port),
        data_dir: args.data_dir.clone(),
        tls_sans: args.tls_san.clone(),
        service_cidr: parse_cidr(&args.service_cluster_ip_range)?,
        node_ports: parse_port_range(&args.service_node_port_range)?,
        token_auth_file: args.token_auth_file.clone(),
        audit_log: args.audit_log_path.clone(),
        event_ttl: args.event_ttl,
        default_toleration_seconds: (
            args.default_not_ready_toleration_seconds.into(),
            args.default_unreachable_toleration_seconds.into(),
        ),
    };
    runtime.block_on(async move {
        // The backend is chosen here, once; `store::open` logs which one.
        let store_config = match &args.etcd_servers {
            Some(servers) => StoreConfig::Etcd(
                EtcdConfig::from_flags(
                    servers,
                    args.etcd_cafile.as_deref(),
                    args.etcd_certfile.as_deref(),
                    args.etcd_keyfile.as_deref(),
                )
                .context("invalid --etcd-servers")?,
            ),
            None => StoreConfig::Embedded {
                dir: args.data_dir.join("store"),
                options: EmbeddedOptions {
                    history: args.watch_history,
                    history_bytes: args.watch_history_mib << 20,
                    cache_bytes: args.store_cache_mib << 20,
                    ..EmbeddedOptions::default()
                },
            },
        };
        // Certificates and the components' kubeconfigs first, so the controllers can connect as soon as the
        // server listens (their clients retry until then).
        let url = windlass_control::pki::server_url(config.listen.ip(), config.listen.port());
        let paths = windlass_control::pki::ensure(&config.data_dir, &config.tls_sans, &url)?;
        let (cm, sched) = match &args.kubeconfig {
            Some(k) => (k.clone(), k.clone()),
            None => (
                paths.controller_manager_kubeconfig.clone(),
                paths.scheduler_kubeconfig.clone(),
            ),
        };
        let manager = manager_options(&args, &cm, &sched).await?;
        // Kept alive while serving: the embedded store also answers `snapshot save` through it.
        let opened = store::open(store_config).await?;
        let api = windlass_control::serve(config, opened.store.clone());
        match manager {
            None => api.await?,
            Some(opts) => {
                tokio::select! {
                    r = api => r?,
                    r = controllers::run(opts) => r?,
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go_flags() {
        assert_eq!(parse_duration("40s"), Ok(Duration::from_secs(40)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
    }
}
