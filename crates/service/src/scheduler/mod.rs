//! The scheduler (issue 4): automatic daily backups, retries, expiry,
//! scheduled GC and throttled verification.
//!
//! Everything is a step function of the time so weeks of schedule run in
//! seconds under a [`crate::ManualClock`]:
//! - [`Scheduler::tick`]: expires automatic backups past their `expires_at`
//!   (catalog row, then the engine's manifest; manual backups never expire),
//!   then creates each server's automatic backup when its slot is due (see
//!   [`window`]) or queues a retry of a failed one. The jobs themselves run
//!   in the service's [`crate::JobRunner`], so the per-host job limit and the
//!   per-job read bandwidth limit apply to them like to manual backups.
//! - [`Scheduler::maintain`]: GC when its interval has passed (the last run
//!   is kept in the catalog, so restarts do not repeat it), then the
//!   verification pass: every completed backup is re-read within
//!   `verify_interval_days`, one at a time, only while no job runs, pausing
//!   between backups to stay under `verify_duty_percent` of wall time. One
//!   engine [`VerifySession`] spans the pass, so a chunk shared by many
//!   backups (a server's daily backups share most of theirs) is read once
//!   per pass, not once per backup; the pass logs the bytes it read.
//!
//! [`Scheduler::spawn`] runs each in its own task on an interval until the
//! shutdown watch channel turns true (a long verification never delays a
//! backup window), and with [`Scheduler::led_by`] only while this process
//! is the one leader among the replicas sharing the catalog
//! ([`crate::leader`]). [`Scheduler::gc_now`] and [`Scheduler::verify_now`]
//! serve `vpsbackup gc` and `vpsbackup verify` (one session per call too).
//! GC and verification take turns in one process (a GC may still run in a
//! verification pass's pauses, or in another process: the session's writer
//! marker keeps it from deleting packs the session may read). Damage is
//! confirmed before a backup is marked damaged: the session forgets the
//! damaged chunks it knows and reads them again.
//!
//! Error policy: [`SchedulerError`] (thiserror) wraps catalog and engine
//! errors; the background loops log them and try again at the next tick.
//! Customer-facing texts (a damaged backup's `verify_error`) are sentences
//! that say what to do.

pub mod settings;
pub mod status;
pub mod window;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vpsbackup_catalog::{
    Backup, BackupId, BackupType, Catalog, CatalogError, NewBackup, ScheduleCatalog, Scope,
    ServerId, WorkStatus, AUTOMATIC_DESCRIPTION,
};
use vpsbackup_engine::{
    BackupVerification, EngineError, EngineOptions, JobControl, Repository, VerifySession,
};

use crate::clock::Clock;
use crate::runner::JobRunner;
pub use settings::ScheduleSettings;
use window::Decision;

/// Name of the GC task in the catalog's `scheduler_tasks`.
pub const GC_TASK: &str = "gc";
/// Name of the verification task in the catalog's `scheduler_tasks`.
pub const VERIFY_TASK: &str = "verify";
/// Expired backups deleted per tick at most, so one tick stays short.
const EXPIRE_BATCH: u32 = 200;
/// Backups looked at per verification pass.
const VERIFY_BATCH: u32 = 100;

/// Why a scheduler step failed (it is retried on the next tick).
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("the backup store failed: {0}")]
    Engine(#[from] EngineError),
    #[error("a background task failed: {0}")]
    Task(String),
}

/// What one [`Scheduler::tick`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    /// Automatic backups created (their jobs queued).
    pub created: Vec<BackupId>,
    /// Failed automatic backups queued for another attempt.
    pub retried: Vec<BackupId>,
    /// Expired automatic backups deleted.
    pub expired: Vec<BackupId>,
}

/// What a GC run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcOutcome {
    pub bytes_freed: u64,
    pub packs_deleted: u64,
    pub packs_rewritten: u64,
    pub chunks_removed: u64,
    /// Packs condemned but kept for a writer still running; a later GC deletes them.
    pub packs_pending: u64,
    /// Store backups with no catalog row (a crash between the two deletes), removed.
    pub orphans_removed: u64,
    /// Bytes in packs after the run.
    pub stored_bytes: u64,
}

impl GcOutcome {
    /// One line for logs, `scheduler_tasks` and `vpsbackup gc`.
    pub fn summary(&self) -> String {
        format!(
            "freed {} in {} packs deleted and {} rewritten ({} chunks removed, {} packs pending, {} orphan backups removed); store now {}",
            status::human_bytes(self.bytes_freed),
            self.packs_deleted,
            self.packs_rewritten,
            self.chunks_removed,
            self.packs_pending,
            self.orphans_removed,
            status::human_bytes(self.stored_bytes),
        )
    }
}

/// The verdict on one backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub backup: BackupId,
    /// `None`: intact. `Some(reason)`: damaged, the reason as shown in the API.
    pub damage: Option<String>,
    /// The backup was marked damaged and is intact now: a newer backup
    /// stored good copies of its damaged chunks (`backup.repaired`).
    pub repaired: bool,
    /// Stored bytes read from the store to verify it (a damage confirmation
    /// included).
    pub bytes_read: u64,
    /// Chunks read and hashed to verify it.
    pub chunks_read: u64,
    /// Chunks whose verdict was already known in the pass (shared with a
    /// backup verified before it), so not read again.
    pub chunks_remembered: u64,
}

/// One verification pass (or `verify_now` call): the engine session shared
/// by its backups, opened at the first backup, and what the pass read.
#[derive(Default)]
struct VerifyPass {
    session: Option<VerifySession>,
    bytes_read: u64,
    chunks_read: u64,
    chunks_remembered: u64,
}

impl VerifyPass {
    /// The line recorded in `scheduler_tasks` and logged.
    fn summary(&self, verdicts: &[Verdict]) -> String {
        let damaged = verdicts.iter().filter(|v| v.damage.is_some()).count();
        format!(
            "{} backups verified, {damaged} damaged; read {} ({} chunks read, {} shared with backups verified before them in the pass)",
            verdicts.len(),
            status::human_bytes(self.bytes_read),
            self.chunks_read,
            self.chunks_remembered,
        )
    }

    /// Logs the pass's `summary` and what it read; `kind` says which pass.
    fn log(&self, summary: &str, kind: &'static str) {
        tracing::info!(
            summary,
            kind,
            bytes_read = self.bytes_read,
            chunks_read = self.chunks_read,
            chunks_remembered = self.chunks_remembered,
            "verification"
        );
    }

    /// Ends the session (its writer marker is removed off the async threads).
    async fn finish(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = tokio::task::spawn_blocking(move || drop(s)).await;
        }
    }
}

/// The daily scheduler of one service (or of one admin command).
pub struct Scheduler {
    catalog: Arc<dyn Catalog>,
    schedule: Arc<dyn ScheduleCatalog>,
    clock: Arc<dyn Clock>,
    /// The store, with the GC grace of the settings.
    repo: Repository,
    settings: ScheduleSettings,
    /// Woken when jobs were queued, if a runner lives in this process.
    jobs: Option<Arc<JobRunner>>,
    /// GC and verification take turns.
    maintenance: tokio::sync::Mutex<()>,
    /// The running verification, cancelled on stop.
    verifying: Mutex<Option<Arc<JobControl>>>,
    stopping: AtomicBool,
    /// Wakes the verification pass out of its throttling pause on stop.
    stop_pause: tokio::sync::Notify,
    /// Whether this process leads the replicas sharing the catalog
    /// (`crate::leader`); `None`: always (tests, admin commands).
    leading: Option<watch::Receiver<bool>>,
}

impl Scheduler {
    pub fn new(
        catalog: Arc<dyn Catalog>,
        schedule: Arc<dyn ScheduleCatalog>,
        clock: Arc<dyn Clock>,
        repo: Repository,
        settings: ScheduleSettings,
        jobs: Option<Arc<JobRunner>>,
    ) -> Scheduler {
        let options = EngineOptions {
            gc_grace: Duration::from_secs(settings.gc_grace_secs),
            ..repo.options().clone()
        };
        Scheduler {
            catalog,
            schedule,
            clock,
            repo: repo.with_options(options),
            settings,
            jobs,
            maintenance: tokio::sync::Mutex::new(()),
            verifying: Mutex::new(None),
            stopping: AtomicBool::new(false),
            stop_pause: tokio::sync::Notify::new(),
            leading: None,
        }
    }

    /// Runs the loops of [`Scheduler::spawn`] only while `leading` says
    /// this process is the leader (`crate::leader::spawn`).
    pub fn led_by(mut self, leading: watch::Receiver<bool>) -> Scheduler {
        self.leading = Some(leading);
        self
    }

    /// Waits until this process leads (at once without a leadership
    /// channel) or stops. False when stopping.
    async fn await_lead(&self, stop: &mut watch::Receiver<bool>) -> bool {
        let Some(mut leading) = self.leading.clone() else {
            return !self.stopped(stop);
        };
        loop {
            if self.stopped(stop) {
                return false;
            }
            if *leading.borrow_and_update() {
                return true;
            }
            let ended = tokio::select! {
                changed = leading.changed() => changed.is_err(),
                _ = stop.changed() => false,
            };
            if ended {
                // The leadership task ends only when the service stops.
                return false;
            }
        }
    }

    pub fn settings(&self) -> &ScheduleSettings {
        &self.settings
    }

    /// Runs [`Scheduler::tick`] every `tick_secs` and, in a task of its own
    /// (a long throttled verification must not hold up a backup window),
    /// [`Scheduler::maintain`], until `shutdown` turns true. Errors are
    /// logged and retried next time.
    pub fn spawn(self: &Arc<Self>, shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let every = Duration::from_secs(self.settings.tick_secs.max(1));
        let me = self.clone();
        let mut stop = shutdown.clone();
        let ticks = tokio::spawn(async move {
            while me.await_lead(&mut stop).await {
                match me.tick(me.clock.now()).await {
                    Ok(r) if r != TickReport::default() => tracing::info!(
                        created = r.created.len(),
                        retried = r.retried.len(),
                        expired = r.expired.len(),
                        "scheduler tick"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "scheduler tick failed"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => {}
                }
            }
        });
        let me = self.clone();
        let mut stop = shutdown;
        let maintenance = tokio::spawn(async move {
            while me.await_lead(&mut stop).await {
                if let Err(e) = me.maintain(me.clock.now()).await {
                    tracing::error!(error = %e, "scheduled maintenance failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => {}
                }
            }
        });
        tokio::spawn(async move {
            let _ = ticks.await;
            let _ = maintenance.await;
        })
    }

    fn stopped(&self, shutdown: &watch::Receiver<bool>) -> bool {
        *shutdown.borrow() || self.stopping.load(Ordering::SeqCst)
    }

    /// Stops a running verification and its pauses; the loops end at their next check.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop_pause.notify_waiters();
        if let Some(c) = self
            .verifying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            c.cancel();
        }
    }

    /// One scheduling step at `now`: expiry, then each server's automatic backup.
    pub async fn tick(&self, now: time::OffsetDateTime) -> Result<TickReport, SchedulerError> {
        let mut report = TickReport {
            expired: self.expire(now).await?,
            ..TickReport::default()
        };
        for server in self.schedule.auto_backup_servers().await? {
            match window::decide(&server, now, &self.settings) {
                Decision::Idle => {}
                Decision::Create { day } => {
                    let new = NewBackup {
                        server_id: server.server_id,
                        scope: Scope::All,
                        backup_type: BackupType::Automatic,
                        description: AUTOMATIC_DESCRIPTION.to_owned(),
                        expires_at: Some(
                            now + time::Duration::days(i64::from(server.retention_days)),
                        ),
                        scheduled_for: Some(day),
                        run_after: None,
                    };
                    let created = self.catalog.create_backup(new, now).await;
                    if matches!(created, Ok(_) | Err(CatalogError::Conflict(_))) {
                        self.schedule.record_slot(server.server_id, day).await?;
                    }
                    match created {
                        Ok(b) => {
                            tracing::info!(server = server.server_id.0, backup = b.id.0,
                                slot = %crate::clock::rfc3339(day), "automatic backup queued");
                            report.created.push(b.id);
                        }
                        // Another scheduler (a second process) made it first.
                        Err(CatalogError::Conflict(_)) => {}
                        // Removed since the listing.
                        Err(CatalogError::NotFound(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Decision::Retry { backup, attempt } => {
                    if self.schedule.retry_backup(backup, now, now).await? {
                        tracing::warn!(
                            server = server.server_id.0,
                            backup = backup.0,
                            attempt,
                            "retrying a failed automatic backup"
                        );
                        report.retried.push(backup);
                    }
                }
            }
        }
        if !report.created.is_empty() || !report.retried.is_empty() {
            if let Some(jobs) = &self.jobs {
                jobs.wake();
            }
        }
        Ok(report)
    }

    /// Deletes automatic backups past their `expires_at`: the catalog row
    /// first (so no client is offered a backup being deleted), then the data.
    /// A crash between the two leaves an orphan manifest that GC removes.
    async fn expire(&self, now: time::OffsetDateTime) -> Result<Vec<BackupId>, SchedulerError> {
        let mut gone = Vec::new();
        for b in self.schedule.expired_backups(now, EXPIRE_BATCH).await? {
            debug_assert_eq!(b.backup_type, BackupType::Automatic);
            match self.catalog.delete_backup(b.id, Scope::All).await {
                Ok(deleted) => {
                    if let (Some(job), Some(jobs)) = (deleted.job, &self.jobs) {
                        jobs.cancel(job);
                    }
                }
                // A restore is reading it: try again next tick.
                Err(CatalogError::Conflict(_)) => continue,
                Err(CatalogError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            }
            let repo = self.repo.clone();
            let engine_id = b.engine_backup_id.clone();
            match tokio::task::spawn_blocking(move || repo.delete_backup(&engine_id)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(backup = b.id.0, error = %e, "could not delete an expired backup's data; GC will")
                }
                Err(e) => {
                    tracing::warn!(backup = b.id.0, error = %e, "delete task failed; GC will")
                }
            }
            tracing::info!(
                backup = b.id.0,
                server = b.server_id.0,
                "expired automatic backup deleted"
            );
            gone.push(b.id);
        }
        Ok(gone)
    }

    /// Scheduled GC when due, then the verification pass.
    pub async fn maintain(&self, now: time::OffsetDateTime) -> Result<(), SchedulerError> {
        if self.settings.gc_interval_hours > 0 {
            let due = match self.schedule.task_run(GC_TASK).await? {
                None => true,
                Some(run) => {
                    run.last_run + time::Duration::hours(self.settings.gc_interval_hours as i64)
                        <= now
                }
            };
            if due {
                let out = self.gc_now().await?;
                tracing::info!(summary = %out.summary(), "scheduled GC");
            }
        }
        if self.settings.verify_interval_days > 0 {
            self.verify_pass(now).await?;
        }
        Ok(())
    }

    /// GC now: removes orphan store backups, then reclaims unreferenced data.
    /// Safe beside running backups (the engine fences their packs).
    pub async fn gc_now(&self) -> Result<GcOutcome, SchedulerError> {
        let _turn = self.maintenance.lock().await;
        // Across hosts sharing the catalog (an admin's `vpsbackup gc` on one
        // node while the leader's scheduled GC runs on another).
        let Some(_store_turn) = self.schedule.claim_gc_turn().await? else {
            return Err(CatalogError::Conflict(
                "another garbage collection of this store is running (in another process on this catalog); try again when it has finished".into(),
            )
            .into());
        };
        let orphans = self.remove_orphans().await?;
        let repo = self.repo.clone();
        let (report, stats) = tokio::task::spawn_blocking(move || -> Result<_, EngineError> {
            let report = repo.gc()?;
            Ok((report, repo.stats()?))
        })
        .await
        .map_err(|e| SchedulerError::Task(e.to_string()))??;
        let out = GcOutcome {
            bytes_freed: report.bytes_freed,
            packs_deleted: report.packs_deleted,
            packs_rewritten: report.packs_rewritten,
            chunks_removed: report.chunks_removed,
            packs_pending: report.packs_pending,
            orphans_removed: orphans,
            stored_bytes: stats.stored_bytes,
        };
        self.schedule
            .record_task_run(GC_TASK, self.clock.now(), &out.summary())
            .await?;
        Ok(out)
    }

    /// Store backups named like the catalog's ("b<id>") whose row is gone.
    /// Only ids at or below the highest catalog id count: a higher one may
    /// belong to a row created after the listing.
    async fn remove_orphans(&self) -> Result<u64, SchedulerError> {
        let rows = self.catalog.all_backups().await?;
        let Some(max_id) = rows.iter().map(|b| b.id.0).max() else {
            return Ok(0);
        };
        let known: HashSet<String> = rows.iter().map(|b| b.engine_backup_id.clone()).collect();
        let repo = self.repo.clone();
        let candidates = tokio::task::spawn_blocking(move || -> Result<_, EngineError> {
            let mut out = Vec::new();
            for info in repo.list_backups()? {
                let id = &info.backup_id;
                let Some(num) = id.strip_prefix('b').and_then(|s| s.parse::<i64>().ok()) else {
                    continue;
                };
                if num <= max_id && !known.contains(id) {
                    out.push((info.backup_id, info.server_id));
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| SchedulerError::Task(e.to_string()))??;
        // A backup of a server the catalog does not know is not an orphan
        // of a crashed delete: it waits for `catalog import-store` once the
        // provider re-adds that server (a catalog rebuilt after a loss).
        let mut orphans = Vec::new();
        for (id, server) in candidates {
            let Ok(server) = server.parse::<i64>() else {
                continue;
            };
            if self
                .catalog
                .server(ServerId(server), Scope::All)
                .await?
                .is_some()
            {
                orphans.push(id);
            }
        }
        let repo = self.repo.clone();
        let n = tokio::task::spawn_blocking(move || -> Result<u64, EngineError> {
            for id in &orphans {
                tracing::warn!(backup = %id, "removing a store backup that has no catalog row");
                repo.delete_backup(id)?;
            }
            Ok(orphans.len() as u64)
        })
        .await
        .map_err(|e| SchedulerError::Task(e.to_string()))??;
        Ok(n)
    }

    /// The throttled pass: verifies due backups one at a time while no job
    /// runs, pausing between them. Returns the verdicts it recorded.
    pub async fn verify_pass(
        &self,
        now: time::OffsetDateTime,
    ) -> Result<Vec<Verdict>, SchedulerError> {
        let before = now - time::Duration::days(self.settings.verify_interval_days as i64);
        let due = self
            .schedule
            .backups_due_for_verify(before, VERIFY_BATCH)
            .await?;
        let duty = f64::from(self.settings.verify_duty_percent.clamp(1, 100)) / 100.0;
        let mut verdicts = Vec::new();
        let mut pass = VerifyPass::default();
        let res = self.verify_due(due, duty, &mut pass, &mut verdicts).await;
        pass.finish().await;
        res?;
        if !verdicts.is_empty() {
            let summary = pass.summary(&verdicts);
            pass.log(&summary, "scheduled");
            self.schedule
                .record_task_run(VERIFY_TASK, self.clock.now(), &summary)
                .await?;
        }
        Ok(verdicts)
    }

    /// The loop of [`Scheduler::verify_pass`], one session for all of `due`.
    async fn verify_due(
        &self,
        due: Vec<Backup>,
        duty: f64,
        pass: &mut VerifyPass,
        verdicts: &mut Vec<Verdict>,
    ) -> Result<(), SchedulerError> {
        for backup in due {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            // Backups and restores come first: they have a window to keep.
            let jobs = self.schedule.job_counts(self.clock.now()).await?;
            if jobs.running > 0 || jobs.queued_due > 0 {
                break;
            }
            let started = Instant::now();
            let v = {
                let _turn = self.maintenance.lock().await;
                self.verify_one(&backup, pass).await?
            };
            verdicts.push(v);
            let pause = started.elapsed().mul_f64(1.0 / duty - 1.0);
            if !pause.is_zero() {
                let woken = self.stop_pause.notified();
                if self.stopping.load(Ordering::SeqCst) {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = woken => break,
                }
            }
        }
        Ok(())
    }

    /// Verifies one backup (or every completed backup with `None`) now, at
    /// full speed, and records the verdicts. For `vpsbackup verify`. One
    /// session serves the whole call: each distinct chunk is read once,
    /// however many backups share it.
    pub async fn verify_now(
        &self,
        backup: Option<BackupId>,
    ) -> Result<Vec<Verdict>, SchedulerError> {
        let _turn = self.maintenance.lock().await;
        let backups = match backup {
            Some(id) => vec![self
                .catalog
                .backup(id, Scope::All)
                .await?
                .ok_or(CatalogError::NotFound("Backup"))?],
            None => self
                .catalog
                .all_backups()
                .await?
                .into_iter()
                .filter(|b| b.status == WorkStatus::Completed)
                .collect(),
        };
        let mut pass = VerifyPass::default();
        let mut verdicts = Vec::new();
        let mut res = Ok(());
        for b in &backups {
            match self.verify_one(b, &mut pass).await {
                Ok(v) => verdicts.push(v),
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        pass.finish().await;
        res?;
        let summary = pass.summary(&verdicts);
        pass.log(&summary, "on demand");
        if backup.is_none() {
            self.schedule
                .record_task_run(VERIFY_TASK, self.clock.now(), &summary)
                .await?;
        }
        Ok(verdicts)
    }

    async fn record(&self, v: &Verdict) -> Result<(), SchedulerError> {
        self.schedule
            .record_verification(v.backup, self.clock.now(), v.damage.as_deref())
            .await?;
        if let (true, Some(jobs)) = (v.damage.is_some() || v.repaired, &self.jobs) {
            // A backup.damaged or backup.repaired event may have been written.
            jobs.outcomes().notify_one();
        }
        Ok(())
    }

    /// Verifies one backup in the pass's session and records the verdict.
    /// Damage is confirmed by a second read (the session forgets the
    /// damaged chunks it knows first), so a pack moved by a GC in another
    /// process, or a read error of the moment, is not mistaken for a loss.
    async fn verify_one(
        &self,
        b: &Backup,
        pass: &mut VerifyPass,
    ) -> Result<Verdict, SchedulerError> {
        let (bytes, chunks, remembered) =
            (pass.bytes_read, pass.chunks_read, pass.chunks_remembered);
        let mut damage = self.damage_of(b, pass).await?;
        if damage.is_some() {
            if let Some(s) = pass.session.as_mut() {
                s.forget_damage();
            }
            damage = self.damage_of(b, pass).await?;
        }
        let mut v = Verdict {
            backup: b.id,
            repaired: b.damaged && damage.is_none(),
            damage,
            bytes_read: pass.bytes_read - bytes,
            chunks_read: pass.chunks_read - chunks,
            chunks_remembered: pass.chunks_remembered - remembered,
        };
        if v.damage.is_some() {
            // Deleted meanwhile (expiry, a client): not damage.
            if self.catalog.backup(b.id, Scope::All).await?.is_none() {
                v.damage = None;
                return Ok(v);
            }
            tracing::error!(backup = b.id.0, reason = ?v.damage, "verification found a damaged backup");
        } else if v.repaired {
            tracing::info!(
                backup = b.id.0,
                "verification found a damaged backup intact again: a newer backup stored good copies of its chunks"
            );
        }
        self.record(&v).await?;
        Ok(v)
    }

    async fn damage_of(
        &self,
        b: &Backup,
        pass: &mut VerifyPass,
    ) -> Result<Option<String>, SchedulerError> {
        match self.engine_verify(b.engine_backup_id.clone(), pass).await {
            Ok(v) => Ok(damage_text(&v)),
            Err(EngineError::BackupNotFound(_)) => Ok(Some(
                "Verification found this backup's data missing from the store; it cannot be restored. Create a new backup."
                    .to_owned(),
            )),
            Err(EngineError::Cancelled) => Err(SchedulerError::Task("verification was stopped".into())),
            // A damaged index or chunk list surfaces as an error.
            Err(e @ (EngineError::Corrupt { .. } | EngineError::MissingChunk { .. } | EngineError::BadObject { .. } | EngineError::Tampered { .. })) => {
                Ok(Some(format!(
                    "Verification could not read this backup's data ({e}); it cannot be restored. Create a new backup."
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Verifies one store backup in the pass's session (opened on first
    /// use), off the async threads; adds what it read to the pass.
    async fn engine_verify(
        &self,
        id: String,
        pass: &mut VerifyPass,
    ) -> Result<BackupVerification, EngineError> {
        let control = Arc::new(JobControl::new());
        *self.verifying.lock().unwrap_or_else(|e| e.into_inner()) = Some(control.clone());
        if self.stopping.load(Ordering::SeqCst) {
            control.cancel();
        }
        let repo = self.repo.clone();
        let session = pass.session.take();
        let res = tokio::task::spawn_blocking(move || {
            let mut session = match session {
                Some(s) => s,
                None => match repo.verify_session() {
                    Ok(s) => s,
                    Err(e) => return (None, Err(e)),
                },
            };
            let res = session.verify(&id, &control);
            (Some(session), res)
        })
        .await;
        *self.verifying.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let (session, res) =
            res.map_err(|e| EngineError::Internal(format!("verify task failed: {e}")))?;
        pass.session = session;
        let v = res?;
        if !v.is_ok() {
            // The chunk ids are for the operator (and a repair); the
            // customer's text only says the backup is damaged.
            const SHOWN: usize = 8;
            tracing::warn!(
                engine_backup = %v.backup_id,
                corrupt = v.corrupt_chunks.len(),
                missing = v.missing_chunks.len(),
                first_corrupt = ?&v.corrupt_chunks[..v.corrupt_chunks.len().min(SHOWN)],
                first_missing = ?&v.missing_chunks[..v.missing_chunks.len().min(SHOWN)],
                manifest_error = ?v.manifest_error,
                "verification found damaged chunks"
            );
        }
        pass.bytes_read += v.bytes_read;
        pass.chunks_read += v.chunks_read;
        pass.chunks_remembered += v.chunks_remembered;
        Ok(v)
    }
}

/// The customer-facing reason a verification result means damage, if it does.
fn damage_text(v: &BackupVerification) -> Option<String> {
    if v.is_ok() {
        return None;
    }
    if let Some(e) = &v.manifest_error {
        return Some(format!(
            "Verification found this backup's manifest unreadable ({e}); it cannot be restored. Create a new backup."
        ));
    }
    Some(format!(
        "Verification found {} corrupt and {} missing chunks in this backup's data; it cannot be restored. Create a new backup.",
        v.corrupt_chunks.len(),
        v.missing_chunks.len()
    ))
}
