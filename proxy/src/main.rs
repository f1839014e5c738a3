//! `windlass-proxy`: Kubernetes Services on nftables. Parses flags, installs logging, maps errors to exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ipnet::Ipv4Net;
use windlass_proxy::{
    Conntrack, FileSource, KubeSource, Nft, RulesetConfig, RunConfig, SyncTiming,
};

#[derive(Parser)]
#[command(
    name = "windlass-proxy",
    version,
    about = "Windlass service proxy (nftables)"
)]
struct Cli {
    /// Kubeconfig of the API server to watch Services and EndpointSlices on (default: in-cluster or
    /// $KUBECONFIG / ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name (endpoints with this nodeName are local). Defaults to the host name.
    #[arg(long)]
    node_name: Option<String>,
    /// The cluster's pod CIDR: ClusterIP traffic from outside it is masqueraded.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: Ipv4Net,
    /// CIDRs of the node addresses NodePorts answer on (comma-separated); default: every local address.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<Ipv4Net>,
    /// Where `/metrics` is served.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: SocketAddr,
    /// Where `/healthz` is served.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: SocketAddr,
    /// How rules are applied: `libnftables` in the proxy's process (no process start per sync), the `nft` tool, or
    /// `auto` (the library when it loads, else the tool).
    #[arg(long, value_enum, default_value = "auto")]
    nft_backend: NftBackend,
    /// Remove the proxy's nftables table (and, with --dns-bind-address, that address from lo) and exit.
    #[arg(long)]
    cleanup: bool,
    /// Follow a JSON List of Services and EndpointSlices instead of an API server (labs and tests).
    #[arg(long, conflicts_with = "kubeconfig")]
    services_file: Option<PathBuf>,
    /// Quiet time after a change before the rules are synced (milliseconds), so bursts apply as one transaction.
    #[arg(long, default_value_t = 100)]
    debounce_ms: u64,
    /// Minimum time between two syncs (milliseconds).
    #[arg(long, default_value_t = 100)]
    min_sync_period_ms: u64,
    /// Period of the full resync that repairs drift (seconds).
    #[arg(long, default_value_t = 3600)]
    resync_period_s: u64,
    /// Serve cluster DNS on this address, UDP and TCP: the cluster DNS ClusterIP, 10.96.0.10:53 (the `kube-dns`
    /// Service). The proxy assigns it to `lo` when the node lacks it and leaves it out of the Service rules, so
    /// pods' queries reach this node's server. Without it no DNS server runs.
    #[arg(long)]
    dns_bind_address: Option<SocketAddr>,
    /// The cluster domain DNS answers for.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// TTL of cluster DNS records (seconds); 30 like CoreDNS's kubernetes plugin.
    #[arg(long, default_value_t = windlass_proxy::dns::DEFAULT_TTL)]
    dns_ttl: u32,
    /// resolv.conf naming the upstream resolvers other names are forwarded to (the node's own).
    #[arg(long, default_value = "/etc/resolv.conf")]
    dns_upstream_resolv_conf: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum NftBackend {
    Auto,
    Libnftables,
    Nft,
}

fn nft(backend: NftBackend) -> anyhow::Result<Nft> {
    let nft = match backend {
        NftBackend::Nft => Nft::default(),
        NftBackend::Libnftables => Nft::default()
            .with_library()
            .context("--nft-backend libnftables")?,
        NftBackend::Auto => Nft::default().with_library().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "falling back to the nft tool");
            Nft::default()
        }),
    };
    tracing::info!(backend = nft.backend(), "nftables backend");
    Ok(nft)
}

fn node_name(cli: &Cli) -> anyhow::Result<String> {
    if let Some(n) = &cli.node_name {
        return Ok(n.clone());
    }
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("--node-name not given and the host name is unreadable")?;
    Ok(h.trim().to_lowercase())
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let nft = nft(cli.nft_backend)?;
    if cli.cleanup {
        windlass_proxy::cleanup(&nft).context("cannot delete the proxy's nftables table")?;
        tracing::info!(table = windlass_proxy::TABLE, "cleaned up");
        // With --dns-bind-address, also the cluster DNS address the proxy put on lo.
        if let Some(std::net::IpAddr::V4(ip)) = cli.dns_bind_address.map(|a| a.ip()) {
            if !ip.is_unspecified() && !ip.is_loopback() {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start the async runtime")?;
                if rt.block_on(windlass_proxy::dns::remove_from_loopback(ip))? {
                    tracing::info!(address = %ip, "cluster DNS address removed from lo");
                }
            }
        }
        return Ok(());
    }
    let mut source: Box<dyn windlass_proxy::ServiceSource> = match &cli.services_file {
        Some(path) => {
            tracing::info!(path = %path.display(), "source: services file");
            Box::new(FileSource {
                path: path.clone(),
                poll: Duration::from_millis(100),
            })
        }
        None => {
            tracing::info!(kubeconfig = ?cli.kubeconfig, "source: API server watch");
            Box::new(KubeSource {
                kubeconfig: cli.kubeconfig.clone(),
            })
        }
    };
    // Cluster DNS follows the same watcher: the source is teed into the DNS server's model.
    let mut dns = None;
    if let Some(bind) = cli.dns_bind_address {
        let (tx, rx) = windlass_proxy::dns::zone_channel();
        let served_here = match bind.ip() {
            std::net::IpAddr::V4(ip) if !ip.is_unspecified() && !ip.is_loopback() => Some(ip),
            _ => None,
        };
        source = Box::new(windlass_proxy::dns::DnsTee {
            inner: source,
            zone: tx,
            served_here,
        });
        let config = windlass_proxy::dns::DnsConfig {
            bind,
            cluster_domain: cli.cluster_domain.clone(),
            ttl: cli.dns_ttl,
            upstream_resolv_conf: Some(cli.dns_upstream_resolv_conf.clone()),
            assign_address: served_here.is_some(),
        };
        dns = Some((config, rx));
    }
    let config = RunConfig {
        ruleset: RulesetConfig {
            node_name: node_name(&cli)?,
            cluster_cidr: cli.cluster_cidr,
            nodeport_addresses: cli.nodeport_addresses.clone(),
        },
        nft,
        conntrack: Conntrack::default(),
        metrics_addr: cli.metrics_bind_address,
        healthz_addr: cli.healthz_bind_address,
        timing: SyncTiming {
            debounce: Duration::from_millis(cli.debounce_ms),
            min_sync_period: Duration::from_millis(cli.min_sync_period_ms),
            resync_period: Duration::from_secs(cli.resync_period_s.max(1)),
        },
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let proxy = windlass_proxy::run(config, source);
        match dns {
            None => proxy.await.map_err(anyhow::Error::from),
            Some((dns_config, rx)) => tokio::select! {
                r = proxy => r.map_err(anyhow::Error::from),
                r = windlass_proxy::dns::serve(dns_config, rx) => {
                    r.context("cluster DNS stopped").and(Err(anyhow::anyhow!("cluster DNS stopped")))
                }
            },
        }
    })?;
    Ok(())
}

fn main() -> ExitCode {
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
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
