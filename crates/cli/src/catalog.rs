//! `vpsbackup catalog import-store`: rebuilds the backup rows of a catalog
//! that was lost (a fresh `catalog.db`) from the store's manifests, once the
//! provider has added the accounts and servers again under their old ids.
//! Backups of servers the catalog does not know, foreign backups (made with
//! `vpsbackup store backup`) and damaged manifests are reported and skipped;
//! running it twice changes nothing the second time.

use anyhow::Context;
use clap::Subcommand;
use vpsbackup_catalog::labels::{imported_backup, StoredBackup};
use vpsbackup_catalog::{BackupId, Catalog, ImportOutcome};
use vpsbackup_engine::Repository;

use crate::admin::{load_settings, Global};

#[derive(Subcommand)]
pub enum CatalogCommand {
    /// Rebuild the catalog's backups from the store's manifests (servers
    /// matched by id; add the servers first). Safe to run twice.
    ImportStore,
}

pub async fn run(global: Global, cmd: CatalogCommand) -> anyhow::Result<()> {
    match cmd {
        CatalogCommand::ImportStore => import_store(&global).await,
    }
}

async fn import_store(global: &Global) -> anyhow::Result<()> {
    let settings = load_settings(global)?;
    let catalog = vpsbackup_service::open_catalog(&settings.data_dir, 1).await?;
    let store = settings.store_path();
    let key = settings.store_key();
    let (repo, ids) = tokio::task::spawn_blocking(move || {
        let repo = Repository::open_local_keyed(&store, &key)?;
        let ids = repo.backup_ids()?;
        anyhow::Ok((repo, ids))
    })
    .await?
    .with_context(|| format!("read the store {}", settings.store_path().display()))?;

    let (mut imported, mut present, mut skipped, mut unlabelled) = (0, 0, 0, 0);
    let mut highest = 0i64;
    for id in ids {
        let r = repo.clone();
        let lookup = id.clone();
        let info = match tokio::task::spawn_blocking(move || r.backup_info(&lookup)).await? {
            Ok(info) => info,
            Err(e) => {
                println!("Skipped {id}: its manifest cannot be read ({e})");
                skipped += 1;
                continue;
            }
        };
        let stored = StoredBackup {
            engine_backup_id: &info.backup_id,
            server_id: &info.server_id,
            created_at_ms: info
                .created_at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            data_bytes: info.data_bytes,
            labels: &info.labels,
        };
        let (backup, labelled) = match imported_backup(&stored) {
            Ok(b) => {
                highest = highest.max(b.0.id.0);
                b
            }
            Err(e) => {
                println!("Skipped {id}: {e}.");
                skipped += 1;
                continue;
            }
        };
        match catalog.import_backup(&backup).await? {
            ImportOutcome::Imported => {
                imported += 1;
                if !labelled {
                    unlabelled += 1;
                }
                println!(
                    "Imported backup {} of server {} ({}, {} MiB, taken {}).",
                    backup.id.0,
                    backup.server_id.0,
                    backup.backup_type.as_str(),
                    backup.size_mb,
                    backup
                        .created_at
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default()
                );
            }
            ImportOutcome::AlreadyPresent => present += 1,
            ImportOutcome::UnknownServer => {
                println!(
                    "Skipped {id}: no server with id {} in the catalog; add it (`vpsbackup server add --id {}`) and run import-store again.",
                    backup.server_id.0, backup.server_id.0
                );
                skipped += 1;
            }
        }
    }
    catalog.reserve_backup_ids(BackupId(highest)).await?;
    catalog.close().await;
    println!(
        "Imported {imported} backups; {present} were in the catalog already; {skipped} skipped."
    );
    if unlabelled > 0 {
        println!(
            "{unlabelled} of them were written before manifests carried the catalog's details: \
             imported as manual backups with no description and no expiry (delete them by hand \
             when no longer needed)."
        );
    }
    Ok(())
}
