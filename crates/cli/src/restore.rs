//! `vpsbackup restore --backup ID --to PATH [--allow-damaged]`: the
//! provider's restore of a catalog backup to image files of its choice,
//! beside a running `serve` (the engine's writer marker keeps GC off the
//! packs it reads).
//!
//! A backup verification marked damaged is refused unless
//! `--allow-damaged` is given: then every chunk that cannot be read is
//! written as zeros and the damaged byte ranges are printed, for disaster
//! recovery. The customer API never restores a damaged backup.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use vpsbackup_catalog::{BackupId, Catalog, Scope, WorkStatus};
use vpsbackup_engine::{DiskImage, JobControl, Repository, RestoreOptions};

use crate::admin::{load_settings, Global};

/// `vpsbackup restore` flags.
#[derive(Args)]
pub struct RestoreArgs {
    /// The backup (its API id).
    #[arg(long)]
    pub backup: i64,
    /// Where to write each disk, in the server's disk order: a new file
    /// (qcow2 when it ends in .qcow2, else raw), an existing image of that
    /// format, or a block device. Repeat for each disk.
    #[arg(long = "to", required = true)]
    pub to: Vec<PathBuf>,
    /// Restore a backup marked damaged: unreadable chunks are written as
    /// zeros and their byte ranges printed.
    #[arg(long)]
    pub allow_damaged: bool,
}

pub async fn run(global: Global, args: RestoreArgs) -> anyhow::Result<()> {
    let settings = load_settings(&global)?;
    let catalog = vpsbackup_service::open_catalog(&settings.data_dir, 1).await?;
    let b = catalog
        .backup(BackupId(args.backup), Scope::All)
        .await?
        .with_context(|| format!("there is no backup {}", args.backup))?;
    catalog.close().await;
    if b.status != WorkStatus::Completed {
        bail!(
            "backup {} is {}, not completed: there is nothing to restore",
            b.id,
            b.status.as_str()
        );
    }
    if b.damaged && !args.allow_damaged {
        bail!(
            "backup {} is marked damaged ({}); add --allow-damaged to restore what can be read, with zeros where it cannot",
            b.id,
            b.verify_error.as_deref().unwrap_or("found by verify")
        );
    }
    let store = settings.store_path();
    let key = settings.store_key();
    // The target's format from what it is and its name, never from the
    // bytes in it (an image's first bytes may be a guest's).
    let targets: Vec<DiskImage> = args
        .to
        .iter()
        .map(|p| DiskImage::pinned(p, vpsbackup_engine::format_by_name(p)))
        .collect();
    let opts = RestoreOptions {
        allow_damaged: args.allow_damaged,
    };
    let engine_id = b.engine_backup_id.clone();
    let summary = tokio::task::spawn_blocking(move || {
        let repo = Repository::open_local_keyed(&store, &key)?;
        repo.restore_with(&engine_id, &targets, opts, &JobControl::new())
    })
    .await?
    .with_context(|| format!("restore of backup {} failed", b.id))?;
    for r in &summary.damaged {
        println!("{r}");
    }
    let unreadable: u64 = summary.damaged.iter().map(|r| r.chunks).sum();
    println!(
        "restored backup {} of server {} ({}): {} bytes written, {} chunks unchanged, {} unreadable chunks written as zeros",
        b.id,
        b.server_id.0,
        b.server_name,
        summary.bytes_written,
        summary.chunks_skipped,
        unreadable
    );
    Ok(())
}
