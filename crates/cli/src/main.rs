//! `vpsbackup`: the one binary. Thin: parses the command line and calls the crates.

mod store;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vpsbackup",
    version,
    about = "Self-hosted backups for VPS hosting"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work on a bare store directory with no catalog (disaster recovery).
    #[command(subcommand)]
    Store(store::StoreCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Store(cmd) => store::run(cmd),
    }
}
