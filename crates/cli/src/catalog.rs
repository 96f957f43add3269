//! `vpsbackup catalog import-store`: rebuilds the backup rows of a catalog
//! that was lost (a fresh `catalog.db`) from the store's manifests, once the
//! provider has added the accounts and servers again under their old ids.
//! Backups of servers the catalog does not know, foreign backups (made with
//! `vpsbackup store backup`) and damaged manifests are reported and skipped;
//! running it twice changes nothing the second time.
//!
//! `vpsbackup catalog migrate --from sqlite://... --to postgres://...`
//! moves a single box's catalog to a PostgreSQL database (issue 10): every
//! row with its id, into an empty target only.

use anyhow::Context;
use clap::Subcommand;
use vpsbackup_catalog::labels::{imported_backup, StoredBackup};
use vpsbackup_catalog::{BackupId, CatalogUrl, ImportOutcome, PgCatalog, SqliteCatalog};

use crate::admin::{load_settings, Global};

#[derive(Subcommand)]
pub enum CatalogCommand {
    /// Rebuild the catalog's backups from the store's manifests (servers
    /// matched by id; add the servers first). Safe to run twice.
    ImportStore,
    /// Copy a SQLite catalog into a new, empty PostgreSQL database, ids
    /// intact (stop `serve` first). Refuses a target that is not empty.
    Migrate {
        /// The catalog to copy: sqlite://PATH [default: sqlite://<data-dir>/catalog.db].
        #[arg(long)]
        from: Option<String>,
        /// The empty catalog to fill: postgres://USER:PASS@HOST/DB.
        #[arg(long)]
        to: String,
    },
}

pub async fn run(global: Global, cmd: CatalogCommand) -> anyhow::Result<()> {
    match cmd {
        CatalogCommand::ImportStore => import_store(&global).await,
        CatalogCommand::Migrate { from, to } => migrate(&global, from.as_deref(), &to).await,
    }
}

async fn import_store(global: &Global) -> anyhow::Result<()> {
    let settings = load_settings(global)?;
    let catalog = vpsbackup_service::connect_catalog(&settings, 1).await?;
    let for_store = settings.clone();
    let (repo, ids) = tokio::task::spawn_blocking(move || {
        let repo = for_store.open_store()?;
        let ids = repo.backup_ids()?;
        anyhow::Ok((repo, ids))
    })
    .await?
    .with_context(|| format!("read the store {}", crate::admin::store_name(&settings)))?;

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

async fn migrate(global: &Global, from: Option<&str>, to: &str) -> anyhow::Result<()> {
    let settings = load_settings(global)?;
    let from = match from {
        Some(url) => CatalogUrl::parse(url)?,
        None => CatalogUrl::in_data_dir(&settings.data_dir),
    };
    let CatalogUrl::Sqlite(path) = &from else {
        anyhow::bail!("--from must name a SQLite catalog (sqlite://PATH), not {from}.");
    };
    let target = CatalogUrl::parse(to)?;
    let CatalogUrl::Postgres(to_url) = &target else {
        anyhow::bail!(
            "--to must name a PostgreSQL database (postgres://USER:PASS@HOST/DB), not {target}."
        );
    };
    if !path.is_file() {
        anyhow::bail!("There is no SQLite catalog at {}.", path.display());
    }
    let source = SqliteCatalog::open_with_readers(path, 1).await?;
    let dest = PgCatalog::open_with_connections(to_url, 2).await?;
    let report = vpsbackup_catalog::migrate::sqlite_to_postgres(&source, &dest).await;
    source.close().await;
    dest.close().await;
    let report = report?;
    for (table, n) in &report.tables {
        println!("{table}: {n} rows");
    }
    println!("Copied the catalog {from} to {target}. Start every process with --database-url (or VPSBACKUP_DATABASE_URL) set to it.");
    Ok(())
}
