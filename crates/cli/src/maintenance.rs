//! Maintenance commands on a data dir, usable while `serve` runs:
//! `vpsbackup gc`, `vpsbackup verify [--backup ID]`, `vpsbackup status` and
//! `vpsbackup failures`.
//! They drive the same [`Scheduler`] code the service runs on its schedule,
//! on the same catalog and store (the engine's GC is safe beside running
//! backups, also across processes).

use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use vpsbackup_catalog::{BackupId, Catalog, ScheduleCatalog};
use vpsbackup_engine::Repository;
use vpsbackup_service::scheduler::status::status_report;
use vpsbackup_service::scheduler::Scheduler;
use vpsbackup_service::{Clock, Settings, SystemClock};

use crate::admin::{load_settings, Global};

/// `vpsbackup verify` flags.
#[derive(Args)]
pub struct VerifyArgs {
    /// Only this backup (its API id); default: every completed backup.
    #[arg(long)]
    pub backup: Option<i64>,
}

struct Opened {
    settings: Settings,
    catalog: Arc<dyn Catalog>,
    schedule: Arc<dyn ScheduleCatalog>,
    repo: Repository,
}

async fn open(global: &Global) -> anyhow::Result<Opened> {
    let settings = load_settings(global)?;
    let sqlite = vpsbackup_service::open_catalog(&settings.data_dir, 1).await?;
    let store = settings.store_path();
    let key = settings.store_key();
    let repo = tokio::task::spawn_blocking(move || Repository::open_local_keyed(&store, &key))
        .await?
        .with_context(|| format!("open the store {}", settings.store_path().display()))?;
    Ok(Opened {
        catalog: Arc::new(sqlite.clone()),
        schedule: Arc::new(sqlite),
        settings,
        repo,
    })
}

fn scheduler(o: &Opened) -> Scheduler {
    Scheduler::new(
        o.catalog.clone(),
        o.schedule.clone(),
        Arc::new(SystemClock),
        o.repo.clone(),
        o.settings.schedule.clone(),
        None,
    )
}

/// `vpsbackup gc`: reclaims what no backup references and says what it freed.
pub async fn gc(global: Global) -> anyhow::Result<()> {
    let o = open(&global).await?;
    let out = scheduler(&o).gc_now().await.context("GC failed")?;
    println!("GC {}", out.summary());
    Ok(())
}

/// `vpsbackup verify`: re-reads backups, marks damaged ones, and exits
/// non-zero when any is damaged (so cron and scripts notice).
pub async fn verify(global: Global, args: VerifyArgs) -> anyhow::Result<()> {
    let o = open(&global).await?;
    let verdicts = scheduler(&o)
        .verify_now(args.backup.map(BackupId))
        .await
        .context("verification failed")?;
    let mut damaged = 0;
    for v in &verdicts {
        match &v.damage {
            None if v.repaired => println!("backup {}: ok (repaired)", v.backup),
            None => println!("backup {}: ok", v.backup),
            Some(reason) => {
                damaged += 1;
                println!("backup {}: DAMAGED: {reason}", v.backup);
            }
        }
    }
    println!("{} backups verified, {damaged} damaged", verdicts.len());
    if damaged > 0 {
        bail!("{damaged} damaged backups; they are marked in the API and cannot be restored");
    }
    Ok(())
}

/// `vpsbackup status`: the servers table and the store's figures.
pub async fn status(global: Global) -> anyhow::Result<()> {
    let o = open(&global).await?;
    let report = status_report(
        &*o.catalog,
        &*o.schedule,
        &o.repo,
        &o.settings.schedule,
        SystemClock.now(),
    )
    .await?;
    print!("{report}");
    if !o.settings.schedule.enabled {
        println!("Automatic backups are off in the config ([schedule] enabled = false).");
    }
    Ok(())
}

/// `vpsbackup failures` flags.
#[derive(Args)]
pub struct FailuresArgs {
    /// How many of the latest failed jobs to show.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
}

/// Failed jobs, newest first: what the customer was told, then the detail.
pub async fn failures(global: Global, args: FailuresArgs) -> anyhow::Result<()> {
    let settings = load_settings(&global)?;
    let cat = vpsbackup_service::open_catalog(&settings.data_dir, 1).await?;
    let jobs = cat.failed_jobs(args.limit).await?;
    if jobs.is_empty() {
        println!("No failed backups or restores.");
    }
    for j in jobs {
        let what = match (j.kind, j.restore_id) {
            (vpsbackup_catalog::JobKind::Restore, Some(r)) => {
                format!("restore {} of backup {}", r.0, j.backup_id.0)
            }
            _ => format!("backup {}", j.backup_id.0),
        };
        println!(
            "job {}: {what}, server {}, failed {}",
            j.id.0,
            j.server_id.0,
            j.finished_at
                .map(vpsbackup_service::clock::rfc3339)
                .unwrap_or_else(|| "-".into())
        );
        println!("  customer sees: {}", j.error.as_deref().unwrap_or("-"));
        println!(
            "  detail:        {}",
            j.error_detail.as_deref().unwrap_or("(none recorded)")
        );
    }
    cat.close().await;
    Ok(())
}
