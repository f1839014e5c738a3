//! `windlass-cni`: the CNI plugin binary. Invoked by a runtime with no arguments (configuration on stdin,
//! `CNI_*` in the environment); prints the result or the spec's error JSON on stdout.

use std::io::Read;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "windlass-cni",
    version,
    about = "Windlass CNI plugin: run by a container runtime with CNI_COMMAND set and the network configuration on stdin"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    // Logs go to stderr only: stdout belongs to the CNI result.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WINDLASS_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,netlink_packet_route=error")
            }),
        )
        .init();
    let mut stdin = Vec::new();
    // VERSION may come with an empty or closed stdin; a read error leaves the input empty and the configuration
    // parser reports it.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let out = windlass_cni::run(
        |k| std::env::var(k).ok(),
        &stdin,
        &windlass_cni::PluginEnv::default(),
    );
    println!("{}", out.stdout);
    std::process::exit(out.exit_code);
}
