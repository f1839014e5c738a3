//! `windlass-proxy`: not yet written; exits non-zero so nothing mistakes it for a working component.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "windlass-proxy",
    version,
    about = "Windlass proxy (not yet implemented)"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("windlass-proxy is not implemented yet")
}
