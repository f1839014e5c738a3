//! `windlass-control`: not yet written; exits non-zero so nothing mistakes it for a working component.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "windlass-control",
    version,
    about = "Windlass control (not yet implemented)"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("windlass-control is not implemented yet")
}
