//! `windlass-control`: the Windlass API server.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use windlass_control::store::{self, embedded::EmbeddedOptions, etcd::EtcdConfig, StoreConfig};
use windlass_control::ApiConfig;

#[derive(Parser)]
#[command(
    name = "windlass-control",
    version,
    about = "Windlass control plane: a Kubernetes-compatible API server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Kubernetes API over HTTPS (creates certificates and admin.kubeconfig on first start).
    Serve(ServeArgs),
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
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
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
        "service CIDR prefix length must be between 8 and 30"
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
        Command::Serve(args) => serve(args),
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

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = ApiConfig {
        listen: SocketAddr::new(args.bind_address, args.secure_port),
        data_dir: args.data_dir.clone(),
        tls_sans: args.tls_san,
        service_cidr: parse_cidr(&args.service_cluster_ip_range)?,
        node_ports: parse_port_range(&args.service_node_port_range)?,
        token_auth_file: args.token_auth_file,
        audit_log: args.audit_log_path,
        event_ttl: args.event_ttl,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
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
                },
            },
        };
        // Kept alive while serving: the embedded store also answers `snapshot save` through it.
        let opened = store::open(store_config).await?;
        windlass_control::serve(config, opened.store.clone()).await?;
        Ok(())
    })
}
