//! `windlass-cni`: the CNI plugin binary. Invoked by a runtime with no arguments (configuration on stdin,
//! `CNI_*` in the environment) it prints the result or the spec's error JSON on stdout. `windlass-cni daemon`
//! runs the node network agent (routes to other nodes' pod CIDRs, the node's conflist).

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use windlass_cni::{ConflistOptions, Mode, NodeRoutes};

#[derive(Parser)]
#[command(
    name = "windlass-cni",
    version,
    about = "Windlass CNI plugin (run by a container runtime with CNI_COMMAND set and the network configuration on \
             stdin), and the node network agent (`daemon`)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    HostGw,
    Vxlan,
}

#[derive(Subcommand)]
enum Sub {
    /// Keep this node's routes to every other node's pod CIDR converged (and its conflist written).
    ///
    /// Nodes come from a watch on Node objects (name, spec.podCIDR, InternalIP) through --kubeconfig (or the
    /// in-cluster / default configuration), or from --nodes-file (a JSON list of {name, podCIDR, nodeIP[,
    /// vtepMAC]}, re-read when it changes) on clusters run without an API server.
    Daemon {
        /// This node's name (its Node object's name).
        #[arg(long)]
        node_name: String,
        #[arg(long, value_enum, default_value = "host-gw")]
        mode: ModeArg,
        /// Kubeconfig of the API server whose Nodes are watched.
        #[arg(long, conflicts_with = "nodes_file")]
        kubeconfig: Option<PathBuf>,
        /// JSON list of nodes, instead of the API server.
        #[arg(long)]
        nodes_file: Option<PathBuf>,
        /// Write `10-windlass.conflist` here from the node's pod CIDR, once it has one.
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// Do not write a conflist (the kubelet's CNI configuration is managed by hand).
        #[arg(long)]
        no_conflist: bool,
        /// `dataDir` written into the conflist.
        #[arg(long, default_value = windlass_cni::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// `bridge` written into the conflist.
        #[arg(long, default_value = windlass_cni::DEFAULT_BRIDGE)]
        bridge: String,
        #[arg(long, default_value = windlass_cni::DEFAULT_CLUSTER_CIDR)]
        cluster_cidr: String,
        /// Pod MTU written into the conflist (vxlan: leave room for 50 bytes of headers).
        #[arg(long)]
        mtu: Option<u32>,
        /// Do not masquerade pod traffic leaving the cluster CIDR.
        #[arg(long)]
        no_masquerade: bool,
        /// Re-converge this often even without changes (repairs routes removed behind our back).
        #[arg(long, default_value_t = 10_000)]
        resync_ms: u64,
    },
}

fn main() -> anyhow::Result<()> {
    // The workspace enables both of rustls's crypto backends, so rustls cannot pick one by itself: choose ring
    // before the API client is built (only the daemon uses TLS).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    // Logs go to stderr only: stdout belongs to the CNI result.
    let default_filter = if cli.command.is_some() {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WINDLASS_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(format!(
                    "{default_filter},netlink_packet_route=error"
                ))
            }),
        )
        .init();
    match cli.command {
        None => plugin(),
        Some(Sub::Daemon {
            node_name,
            mode,
            kubeconfig,
            nodes_file,
            cni_conf_dir,
            no_conflist,
            data_dir,
            bridge,
            cluster_cidr,
            mtu,
            no_masquerade,
            resync_ms,
        }) => {
            let mode = match mode {
                ModeArg::HostGw => Mode::HostGw,
                ModeArg::Vxlan => Mode::Vxlan,
            };
            let cluster_cidr = cluster_cidr
                .parse()
                .map_err(|e| anyhow::anyhow!("--cluster-cidr {cluster_cidr:?}: {e}"))?;
            let conflist = (!no_conflist).then_some({
                (
                    cni_conf_dir,
                    ConflistOptions {
                        bridge,
                        data_dir,
                        mode,
                        mtu,
                        ip_masq: !no_masquerade,
                        cluster_cidr,
                    },
                )
            });
            let routes = NodeRoutes::new(mode, &node_name);
            let resync = Duration::from_millis(resync_ms);
            match nodes_file {
                Some(path) => {
                    tracing::info!(path = %path.display(), "node source: nodes file");
                    let source = windlass_cni::FileNodeSource::new(path);
                    windlass_cni::run_daemon(&routes, source, conflist, &node_name, resync);
                }
                None => {
                    tracing::info!(kubeconfig = ?kubeconfig, "node source: API server watch");
                    let source = windlass_cni::KubeNodeSource::start(kubeconfig)?;
                    windlass_cni::run_daemon(&routes, source, conflist, &node_name, resync);
                }
            }
            Ok(())
        }
    }
}

fn plugin() -> anyhow::Result<()> {
    let mut stdin = Vec::new();
    // VERSION may come with an empty or closed stdin; a read error leaves the input empty and the configuration
    // parser reports it.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let out = windlass_cni::run(
        |k| std::env::var(k).ok(),
        &stdin,
        &windlass_cni::PluginEnv::default(),
    );
    // DEL, CHECK, GC and STATUS print nothing on success.
    if !out.stdout.is_empty() {
        println!("{}", out.stdout);
    }
    std::process::exit(out.exit_code);
}
