//! `vpsbackup store ...`: list, restore, verify and collect a bare store
//! directory without any catalog.

use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum StoreCommand {
    /// List the backups a store holds.
    Ls { dir: PathBuf },
}

pub fn run(cmd: StoreCommand) -> anyhow::Result<()> {
    match cmd {
        StoreCommand::Ls { dir } => {
            anyhow::bail!("store ls {}: the engine is being written", dir.display())
        }
    }
}
