//! `windlass-runtime`: a runc-compatible CLI over the `windlass_runtime` library.

use clap::{Parser, Subcommand};

mod image_cmd;

#[derive(Parser)]
#[command(
    name = "windlass-runtime",
    version,
    about = "Windlass OCI container runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage images: pull, list, inspect, rm, gc, import, export.
    Image(image_cmd::ImageArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Image(args) => image_cmd::run(args),
    }
}
