//! `windlass-runtime`: a runc-compatible CLI over the `windlass_runtime` library.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "windlass-runtime",
    version,
    about = "Windlass OCI container runtime"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("windlass-runtime: no command implemented yet")
}
