//! `windlass-control`: the control plane binary. Only argument parsing, logging and exit codes live here.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "windlass-control", version, about = "Windlass control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Backups of the embedded store (`snapshot save`, `snapshot restore`).
    #[command(subcommand)]
    Snapshot(windlass_control::store::snapshot::SnapshotCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Snapshot(command) => windlass_control::store::snapshot::run(&command)?,
    }
    Ok(())
}
