//! `windlass-kubelet`: parses the flag contract from issue 6, checks it, and runs the node agent
//! ([`windlass_kubelet::agent`]) until SIGTERM or SIGINT. Pods keep running when it exits, as upstream's do.

use std::net::IpAddr;
use std::path::PathBuf;

use std::process::ExitCode;

use clap::Parser;
use windlass_kubelet::config::{default_node_name, defaults, Config, ConfigError};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "windlass-kubelet",
    version,
    about = "Windlass kubelet: runs the pods bound to this node"
)]
struct Cli {
    /// Kubeconfig for the API server.
    #[arg(long, default_value = defaults::KUBECONFIG)]
    kubeconfig: PathBuf,
    /// This node's name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// The node's InternalIP address.
    #[arg(long)]
    node_ip: Option<IpAddr>,
    /// State, pod volumes and logs.
    #[arg(long, default_value = defaults::ROOT_DIR)]
    root_dir: PathBuf,
    /// Parent cgroup of `kubepods` in every hierarchy.
    #[arg(long, default_value = defaults::CGROUP_ROOT)]
    cgroup_root: PathBuf,
    /// CNI plugin search path (colon-separated).
    #[arg(long, default_value = defaults::CNI_BIN_DIR)]
    cni_bin_dir: String,
    /// Directory of CNI network configurations (the lexically first one is used).
    #[arg(long, default_value = defaults::CNI_CONF_DIR)]
    cni_conf_dir: PathBuf,
    /// Most pods this node runs.
    #[arg(long, default_value_t = defaults::MAX_PODS)]
    max_pods: u32,
    /// Cluster DNS server(s) for ClusterFirst pods (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', default_value = defaults::CLUSTER_DNS)]
    cluster_dns: Vec<IpAddr>,
    /// Cluster DNS domain.
    #[arg(long, default_value = defaults::CLUSTER_DOMAIN)]
    cluster_domain: String,
    /// Directory of static pod manifests.
    #[arg(long)]
    pod_manifest_path: Option<PathBuf>,
    /// A registry (HOST:PORT) reached over plain HTTP; repeatable.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Kubelet API (HTTPS) port.
    #[arg(long, default_value_t = defaults::PORT)]
    port: u16,
    /// Health check port on loopback.
    #[arg(long, default_value_t = defaults::HEALTHZ_PORT)]
    healthz_port: u16,
    /// Resolver configuration given to pods with dnsPolicy Default.
    #[arg(long, default_value = defaults::RESOLV_CONF)]
    resolv_conf: PathBuf,
    /// The `windlass-runtime` executable (default: next to this program, else from PATH).
    #[arg(long)]
    runtime_binary: Option<PathBuf>,
    #[command(flatten)]
    server: windlass_kubelet::server::ServerFlags,
    /// Replace projected service-account tokens after this fraction of their lifetime (upstream: 0.8). A test
    /// knob, hidden: lowering it shows rotation without waiting for 10-minute tokens to age.
    #[arg(long, hide = true, default_value_t = windlass_kubelet::agent::DEFAULT_REFRESH_FRACTION,
        value_parser = parse_fraction)]
    token_refresh_fraction: f64,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("{s:?} is not a fraction in (0, 1]")),
    }
}

/// `windlass-runtime` next to the running executable, else the bare name for PATH lookup.
fn default_runtime_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("windlass-runtime")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("windlass-runtime"))
}

impl From<&Cli> for Config {
    fn from(c: &Cli) -> Self {
        let c = c.clone();
        Config {
            kubeconfig: c.kubeconfig,
            node_name: c.node_name.unwrap_or_else(default_node_name),
            node_ip: c.node_ip,
            root_dir: c.root_dir,
            cgroup_root: c.cgroup_root,
            cni_bin_dirs: std::env::split_paths(&c.cni_bin_dir).collect(),
            cni_conf_dir: c.cni_conf_dir,
            max_pods: c.max_pods,
            cluster_dns: c.cluster_dns,
            cluster_domain: c.cluster_domain,
            pod_manifest_path: c.pod_manifest_path,
            insecure_registries: c.insecure_registries,
            port: c.port,
            healthz_port: c.healthz_port,
            resolv_conf: c.resolv_conf,
        }
    }
}

/// Exit codes: 2 for flags that cannot work (as clap's usage errors), 1 for anything else.
/// Most glibc malloc arenas (the default is eight per core): the kubelet's many short blocking tasks would
/// otherwise each grow an arena of their own that stays resident when idle.
const MALLOC_ARENAS: i32 = 2;

fn main() -> ExitCode {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
    // The workspace enables both of rustls's crypto backends (ring here, aws-lc-rs through reqwest), so rustls
    // cannot pick one by itself: choose ring for the whole process before any TLS client or server is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("windlass-kubelet: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let mut config: Config = (&cli).into();
    config.validate()?;
    if config.node_ip.is_none() {
        config.node_ip = windlass_kubelet::node::detect_node_ip(std::path::Path::new("/proc"));
        match config.node_ip {
            Some(ip) => {
                tracing::info!(%ip, "--node-ip not given; using the default route's address")
            }
            None => tracing::warn!("--node-ip not given and no address found to use"),
        }
    }
    tracing::info!(node = %config.node_name, root_dir = %config.root_dir.display(), "windlass-kubelet configured");

    match windlass_kubelet::cni::load_first(&config.cni_conf_dir) {
        Ok(net) => tracing::info!(network = %net.name, file = %net.source.display(), "CNI network"),
        Err(e) => {
            tracing::warn!(error = %e, "no CNI network yet; the node reports NotReady until one appears")
        }
    }
    let agent = windlass_kubelet::agent::AgentConfig {
        config,
        runtime_binary: cli.runtime_binary.unwrap_or_else(default_runtime_binary),
        cgroup_mount: PathBuf::from(windlass_kubelet::agent::DEFAULT_CGROUP_MOUNT),
        server: cli.server.clone(),
        token_refresh_fraction: cli.token_refresh_fraction,
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch SIGTERM");
                        let _ = tokio::signal::ctrl_c().await;
                        return;
                    }
                };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
            }
        };
        windlass_kubelet::agent::run(agent, shutdown).await
    })?;
    // Blocking runtime calls in flight are not waited for: what they leave is found again at the next start.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}
