//! `windlass-kubelet`: not yet written; exits non-zero so nothing mistakes it for a working component.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "windlass-kubelet",
    version,
    about = "Windlass kubelet (not yet implemented)"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("windlass-kubelet is not implemented yet")
}
