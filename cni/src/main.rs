//! `windlass-cni`: not yet written; exits non-zero so nothing mistakes it for a working component.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "windlass-cni",
    version,
    about = "Windlass cni (not yet implemented)"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("windlass-cni is not implemented yet")
}
