//! The job runner: a pool of workers reading the catalog's persistent queue.
//!
//! Each worker claims one job at a time (the catalog guarantees at most one
//! running job per server), runs the pre-hook, the engine call on a blocking
//! thread, then the post-hook (always), and records the outcome. While a job
//! runs, a companion task copies the engine's progress into the backup or
//! restore row about once a second; that write doubles as the job's
//! heartbeat, and when the catalog answers that the job is no longer ours
//! (deleted backup, taken over) the engine is cancelled.
//!
//! Leases: a claim holds its job until a wall-clock expiry
//! ([`vpsbackup_catalog::LEASE`]) that the companion task renews every
//! [`vpsbackup_catalog::LEASE_RENEW_EVERY`]. Every process (serve or agent)
//! runs [`sweep_leases`], which requeues (or fails) jobs whose lease ran
//! out: their process died or lost the catalog. A worker whose renewal is
//! refused, or that could not renew before its own lease ran out, cancels
//! the engine and abandons the attempt without recording anything (another
//! worker may hold the job by then); its partial packs are GC's.
//!
//! Crash safety: the engine writes a backup's manifest only at the end, so a
//! job interrupted by a crash left no backup behind; it is re-run from
//! scratch (after deleting any manifest of that name) or failed with a reason
//! once its attempts are used up. On graceful shutdown running jobs are
//! cancelled and handed back to the queue without counting the attempt; a
//! job whose engine work had already finished (shutdown during its post
//! hook) is recorded as finished instead, never redone.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{watch, Notify};
use tracing::Instrument;
use vpsbackup_catalog::{
    engine_backup_id, BackupRead, Catalog, Consistency, Hooks, ImageFormat, Job, JobClaim, JobId,
    JobKind, JobOutcome, JobState, Scope, Server, ServerRuntime, LEASE, LEASE_RENEW_EVERY,
};
use vpsbackup_engine::{BackupRequest, DiskFormat, DiskImage, EngineError, JobControl, Repository};

use crate::clock::Clock;
use crate::hooks::{run_hook, HookVars};
use crate::metrics::JobMetrics;
use crate::settings::Settings;

const MIB: u64 = 1024 * 1024;

/// Owns the workers; handlers use [`JobRunner::wake`] and [`JobRunner::cancel`].
pub struct JobRunner {
    catalog: Arc<dyn Catalog>,
    clock: Arc<dyn Clock>,
    repo: Repository,
    settings: Arc<Settings>,
    /// Names this process's claims: `host-pid-random`.
    instance: String,
    notify: Notify,
    /// Signalled after each recorded outcome: the webhook sender wakes on it.
    outcomes: Arc<Notify>,
    running: Mutex<HashMap<JobId, Arc<JobControl>>>,
    stopping: AtomicBool,
    /// Whether the catalog wakes the workers for jobs queued by any
    /// process: idle workers then look unwoken every [`IDLE_POLL_WOKEN`]
    /// rather than every [`IDLE_POLL`].
    woken_by_catalog: AtomicBool,
    metrics: JobMetrics,
}

/// An idle worker's wait between looks for work when only this process
/// wakes it (its API and scheduler do; jobs queued elsewhere are found so).
pub const IDLE_POLL: Duration = Duration::from_millis(500);

/// The wait once the catalog wakes workers for jobs queued by any process
/// ([`JobRunner::woken_by_catalog`]): a fallback for a lost notification
/// and for a retry whose time comes, without a claim statement per worker
/// twice a second on a shared database.
pub const IDLE_POLL_WOKEN: Duration = Duration::from_secs(5);

impl JobRunner {
    pub fn new(
        catalog: Arc<dyn Catalog>,
        clock: Arc<dyn Clock>,
        repo: Repository,
        settings: Arc<Settings>,
    ) -> JobRunner {
        let mut tag = [0u8; 4];
        let _ = getrandom::fill(&mut tag);
        let instance = format!(
            "pid{}-{:02x}{:02x}{:02x}{:02x}",
            std::process::id(),
            tag[0],
            tag[1],
            tag[2],
            tag[3]
        );
        JobRunner {
            catalog,
            clock,
            repo,
            instance,
            notify: Notify::new(),
            outcomes: Arc::new(Notify::new()),
            running: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            woken_by_catalog: AtomicBool::new(false),
            metrics: match &settings.node {
                Some(node) => JobMetrics::for_node(node),
                None => JobMetrics::default(),
            },
            settings,
        }
    }

    /// What the workers record for `/metrics` and `vpsbackup status`.
    pub fn metrics(&self) -> &JobMetrics {
        &self.metrics
    }

    /// Signalled (one stored permit) each time a job's outcome is recorded,
    /// which may have written a webhook event.
    pub fn outcomes(&self) -> Arc<Notify> {
        self.outcomes.clone()
    }

    /// Tells idle workers there may be new work.
    pub fn wake(&self) {
        self.notify.notify_waiters();
    }

    /// The catalog now wakes the workers for jobs queued by any process:
    /// idle workers look unwoken only every [`IDLE_POLL_WOKEN`].
    pub fn woken_by_catalog(&self) {
        self.woken_by_catalog.store(true, Ordering::Relaxed);
    }

    /// Cancels a job if it runs in this process (a deleted in-progress backup).
    pub fn cancel(&self, job: JobId) {
        if let Some(control) = self.lock_running().get(&job) {
            control.cancel();
        }
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Arc<JobControl>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Jobs of this process's workers that are running now.
    pub fn running_jobs(&self) -> usize {
        self.lock_running().len()
    }

    /// Starts the workers (none with `workers = 0`: an API-only replica);
    /// they stop when `shutdown` turns true.
    ///
    /// Leases are on the wall clock, not [`Clock`]: they are between
    /// processes, and the scheduler's simulated time may jump.
    pub fn start(
        self: &Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut handles = Vec::new();
        for n in 0..self.settings.workers {
            let me = self.clone();
            let rx = shutdown.clone();
            handles.push(tokio::spawn(async move { me.worker(n, rx).await }));
        }
        handles
    }

    /// Cancels every running job so workers hand them back to the queue.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for control in self.lock_running().values() {
            control.cancel();
        }
        self.notify.notify_waiters();
    }

    async fn worker(self: Arc<Self>, n: usize, mut shutdown: watch::Receiver<bool>) {
        let name = format!("{}-w{n}", self.instance);
        loop {
            if *shutdown.borrow() || self.stopping.load(Ordering::SeqCst) {
                return;
            }
            // Register interest before looking, so a wake between the empty
            // claim and the wait is not lost.
            let notified = self.notify.notified();
            let claim = JobClaim {
                worker: name.clone(),
                node: self.settings.node.clone(),
                lease_until: OffsetDateTime::now_utc() + LEASE,
            };
            let claimed = self
                .catalog
                .claim_job_leased(&claim, self.clock.now())
                .await;
            if claimed.is_ok() {
                self.metrics.beat(n, self.clock.now());
            }
            match claimed {
                Ok(Some(job)) => {
                    let span = tracing::info_span!(
                        "job",
                        id = job.id.0,
                        kind = job.kind.as_str(),
                        server = job.server_id.0,
                        backup = job.backup_id.0,
                        attempt = job.attempts
                    );
                    let (kind, began) = (job.kind, std::time::Instant::now());
                    self.metrics.started(kind);
                    let outcome = self.run_job(&name, n, job).instrument(span).await;
                    self.metrics.ended(kind, outcome, began.elapsed());
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "claiming a job failed"),
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(self.idle_poll()) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    fn idle_poll(&self) -> Duration {
        match self.woken_by_catalog.load(Ordering::Relaxed) {
            true => IDLE_POLL_WOKEN,
            false => IDLE_POLL,
        }
    }

    /// Runs a claimed job to its end; returns how it ended, for metrics:
    /// completed, failed, cancelled, requeued, or unrecorded (the catalog
    /// refused the outcome).
    async fn run_job(self: &Arc<Self>, worker: &str, n: usize, job: Job) -> &'static str {
        let control = Arc::new(JobControl::new());
        self.lock_running().insert(job.id, control.clone());
        tracing::info!("job started");

        let done = Arc::new(Notify::new());
        let lease_lost = Arc::new(AtomicBool::new(false));
        let progress = tokio::spawn(progress_loop(
            self.catalog.clone(),
            self.clock.clone(),
            (job.id, job.lease_expires_at),
            worker.to_owned(),
            control.clone(),
            (done.clone(), lease_lost.clone()),
            (self.metrics.clone(), n),
        ));

        let outcome = match self.catalog.server(job.server_id, Scope::All).await {
            Ok(Some(server)) => self.execute(&job, &server, &control).await,
            Ok(None) => Err(JobFailure::new(
                "The server was removed before the job ran.",
            )),
            Err(e) => Err(JobFailure::detailed(
                "The job could not start; it can be tried again.",
                format!("The catalog could not be read: {e}"),
            )),
        };

        done.notify_one();
        let _ = progress.await;
        self.lock_running().remove(&job.id);

        let now = self.clock.now();
        if lease_lost.load(Ordering::SeqCst) {
            // The job may be another worker's by now: record nothing and
            // delete nothing of `b<id>` (that name is the new attempt's).
            // This attempt wrote no manifest unless its engine finished, and
            // the next attempt clears one before it starts; its packs are
            // unreferenced and left for GC.
            tracing::warn!("the job's lease was lost; this attempt is abandoned");
            return "abandoned";
        }
        // Only a job the shutdown cut short goes back to the queue: one whose
        // engine work finished (shutdown during its post hook) is recorded,
        // or a finished restore would run again over what the guest wrote.
        let cut_short = matches!(&outcome, Err(f) if f.cancelled);
        if self.stopping.load(Ordering::SeqCst) && control.is_cancelled() && cut_short {
            // Shutdown, not the job's fault: back to the queue for the next start.
            if job.kind == JobKind::Backup {
                self.delete_engine_backup(&job).await;
            }
            match self.catalog.release_job(job.id, worker, now).await {
                Ok(_) => tracing::info!("job handed back to the queue for the next start"),
                Err(e) => tracing::error!(error = %e, "could not hand the job back"),
            }
            return "requeued";
        }
        let outcome = match outcome {
            Ok(o) => o,
            Err(f) => {
                if let Some(detail) = &f.detail {
                    tracing::warn!(reason = %f.reason, %detail, "job failed");
                }
                JobOutcome::Failed {
                    reason: f.reason,
                    detail: f.detail,
                }
            }
        };
        let failed = matches!(outcome, JobOutcome::Failed { .. });
        match self
            .catalog
            .finish_job(job.id, worker, outcome.clone(), now)
            .await
        {
            Ok(true) => {
                self.outcomes.notify_one();
                if failed {
                    tracing::warn!(?outcome, "job failed");
                    "failed"
                } else {
                    tracing::info!(?outcome, "job finished");
                    "completed"
                }
            }
            Ok(false) => {
                // Cancelled (the backup was deleted): whatever the engine
                // wrote for it must not outlive its row. Taken over (the
                // lease expired while the outcome was being recorded): the
                // name is the next attempt's, leave it.
                let taken_over = matches!(
                    self.catalog.job(job.id).await,
                    Ok(Some(j)) if j.state != JobState::Cancelled
                );
                if taken_over {
                    tracing::warn!("the job was taken over before its outcome was recorded");
                    return "abandoned";
                }
                tracing::info!("job was cancelled while running");
                if job.kind == JobKind::Backup {
                    self.delete_engine_backup(&job).await;
                }
                "cancelled"
            }
            Err(e) => {
                tracing::error!(error = %e, "could not record the job's outcome");
                "unrecorded"
            }
        }
    }

    async fn delete_engine_backup(&self, job: &Job) {
        let repo = self.repo.clone();
        let id = engine_backup_id(job.backup_id);
        match tokio::task::spawn_blocking(move || repo.delete_backup(&id)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not delete a cancelled backup's data"),
            Err(e) => tracing::warn!(error = %e, "delete task failed"),
        }
    }

    /// Hooks around the engine call.
    async fn execute(
        &self,
        job: &Job,
        server: &Server,
        control: &Arc<JobControl>,
    ) -> Result<JobOutcome, JobFailure> {
        let hooks = effective_hooks(&self.settings, &server.hooks);
        let vars = HookVars {
            server_id: server.id.0,
            name: server.name.clone(),
            hostname: server.hostname.clone(),
            backup_id: job.backup_id.0,
            disks: server.disks.iter().map(|d| d.path.clone()).collect(),
        };
        let timeout = Duration::from_secs(self.settings.hook_timeout_secs.max(1));
        let (pre_name, pre, post_name, post) = match job.kind {
            JobKind::Backup => (
                "pre_backup",
                hooks.pre_backup,
                "post_backup",
                hooks.post_backup,
            ),
            JobKind::Restore => (
                "pre_restore",
                hooks.pre_restore,
                "post_restore",
                hooks.post_restore,
            ),
        };

        let pre_result = match &pre {
            Some(cmd) => run_hook(pre_name, cmd, &vars, timeout).await,
            None => Ok(()),
        };
        let result = match pre_result {
            Err(detail) => Err(JobFailure::detailed(
                format!(
                    "The {} hook failed; the disks were not touched.",
                    hook_title(pre_name)
                ),
                capitalise(&detail),
            )),
            Ok(()) => self.engine_call(job, server, control).await,
        };
        // The post-hook always runs: a thaw or a VM start must follow even a failed job.
        if let Some(cmd) = &post {
            if let Err(reason) = run_hook(post_name, cmd, &vars, timeout).await {
                tracing::warn!(hook = post_name, %reason, "post hook failed");
                if job.kind == JobKind::Restore {
                    if let Ok(JobOutcome::RestoreCompleted) = result {
                        return Err(JobFailure::detailed(
                            format!(
                                "The disks were restored, but the {} hook failed; check the server.",
                                hook_title(post_name)
                            ),
                            capitalise(&reason),
                        ));
                    }
                }
            }
        }
        result
    }

    /// The server's disks for the engine, each pinned to the format recorded
    /// when the provider added the server, so a guest that writes a qcow2
    /// header over the start of its raw disk cannot make us open it as qcow2
    /// (and follow a backing file to a host file).
    ///
    /// A disk added before formats were recorded is detected here once and
    /// the result recorded: from its first job after the upgrade on, that
    /// disk is pinned like any other.
    async fn disk_images(&self, server: &Server) -> Result<Vec<DiskImage>, String> {
        let mut images = Vec::with_capacity(server.disks.len());
        for (i, disk) in server.disks.iter().enumerate() {
            let format = match disk.format {
                Some(f) => engine_format(f),
                None => {
                    let path = PathBuf::from(&disk.path);
                    let detected = tokio::task::spawn_blocking(move || {
                        vpsbackup_engine::detect_format(&path)
                    })
                    .await
                    .map_err(|e| format!("The disk check failed: {e}"))?
                    .map_err(|e| {
                        tracing::error!(disk = %disk.path, error = %e, "cannot detect disk format");
                        "A disk of the server cannot be read; the disks were not touched."
                            .to_string()
                    })?;
                    tracing::warn!(
                        server = server.id.0,
                        disk = %disk.path,
                        format = %detected,
                        "disk had no recorded format; detected and recorded it (check with `vpsbackup server list`, correct with `vpsbackup server set --disk-format`)"
                    );
                    if let Err(e) = self
                        .catalog
                        .record_disk_format(server.id, i, catalog_format(detected))
                        .await
                    {
                        tracing::warn!(error = %e, "cannot record the detected disk format");
                    }
                    detected
                }
            };
            images.push(DiskImage::pinned(&disk.path, format));
        }
        Ok(images)
    }

    async fn engine_call(
        &self,
        job: &Job,
        server: &Server,
        control: &Arc<JobControl>,
    ) -> Result<JobOutcome, JobFailure> {
        let repo = self.repo.clone();
        let control = control.clone();
        let engine_id = engine_backup_id(job.backup_id);
        let disks = self.disk_images(server).await.map_err(JobFailure::new)?;
        let span = tracing::Span::current();
        match job.kind {
            JobKind::Backup => {
                // The catalog's facts go into the manifest too, so a lost
                // catalog can be rebuilt from the store (`catalog import-store`).
                let labels = match self.catalog.backup(job.backup_id, Scope::All).await {
                    Ok(Some(b)) => vpsbackup_catalog::labels::backup_labels(&b),
                    _ => Default::default(),
                };
                let req = BackupRequest {
                    backup_id: engine_id.clone(),
                    server_id: server.id.0.to_string(),
                    server_name: server.name.clone(),
                    disks,
                    read_limit: self.settings.read_limit_mb_per_s.map(|mb| mb * 1_000_000),
                };
                let via = match &server.runtime {
                    ServerRuntime::Offline => None,
                    ServerRuntime::Qemu {
                        qmp_socket,
                        guest_agent,
                    } => Some(crate::running::Via::Qmp {
                        socket: PathBuf::from(qmp_socket),
                        guest_agent: guest_agent.as_ref().map(PathBuf::from),
                    }),
                    ServerRuntime::Libvirt { domain } => Some(crate::running::Via::Libvirt {
                        domain: domain.clone(),
                    }),
                };
                let running = match via {
                    None => None,
                    Some(via) => Some(crate::running::Running {
                        via,
                        scratch: self
                            .settings
                            .data_dir
                            .join("scratch")
                            .join(format!("server-{}", server.id.0)),
                        base: self.incremental_base(server).await,
                        scratch_limit: self.settings.scratch_limit_mb.map(|mb| mb << 20),
                    }),
                };
                let res = tokio::task::spawn_blocking(move || {
                    let _g = span.enter();
                    // A re-run after a crash: the engine only writes the
                    // manifest at the end, but a crash between that write and
                    // the catalog update leaves one behind; start clean.
                    repo.delete_backup(&engine_id)
                        .map_err(|e| engine_failure(JobKind::Backup, e))?;
                    let before = repo.storage().request_counts();
                    // A libvirt domain that is shut off is read from its
                    // files, like an offline server.
                    let res = match running.filter(crate::running::Running::is_up) {
                        None => repo
                            .backup_labelled(&req, &labels, &control)
                            .map(|s| {
                                let read = BackupRead {
                                    incremental: false,
                                    bytes_read: s.bytes_read,
                                    full_reason: None,
                                    consistency: Consistency::Offline,
                                };
                                (s, read)
                            })
                            .map_err(|e| engine_failure(JobKind::Backup, e)),
                        Some(running) => {
                            crate::running::backup(&repo, &req, &labels, running, &control)
                        }
                    };
                    // Object stores bill per request: the job log says how
                    // many this backup took (store-wide while it ran, so
                    // jobs running beside it are counted in too).
                    if let (Some(b), Some(now)) = (before, repo.storage().request_counts()) {
                        tracing::info!(requests = %now.since(&b), "store requests during the backup");
                    }
                    res
                })
                .await
                .map_err(|e| {
                    JobFailure::detailed(
                        "An internal error stopped the backup.",
                        format!("The backup worker failed: {e}"),
                    )
                })?;
                let (summary, read) = res?;
                self.metrics
                    .backup_bytes(read.bytes_read, summary.stored_bytes);
                if let Err(e) = self.catalog.record_backup_read(job.backup_id, &read).await {
                    tracing::warn!(error = %e, "cannot record how the backup read its disks");
                }
                Ok(JobOutcome::BackupCompleted {
                    size_mb: summary.data_bytes.div_ceil(MIB),
                    stored_bytes: summary.stored_bytes,
                })
            }
            JobKind::Restore => {
                let res = tokio::task::spawn_blocking(move || {
                    let _g = span.enter();
                    repo.restore_as(&engine_id, &disks, &control)
                })
                .await
                .map_err(|e| {
                    JobFailure::detailed(
                        "An internal error stopped the restore.",
                        format!("The restore worker failed: {e}"),
                    )
                })?;
                match res {
                    Ok(_) => Ok(JobOutcome::RestoreCompleted),
                    Err(e) => Err(engine_failure(job.kind, e)),
                }
            }
        }
    }
}

impl JobRunner {
    /// The engine id of the backup a running server's next backup may
    /// build on, or why it reads in full.
    async fn incremental_base(&self, server: &Server) -> Result<String, String> {
        match self.catalog.incremental_base(server.id).await {
            Ok(Some(b)) => Ok(b.engine_backup_id),
            Ok(None) => Err(
                "there is no completed, undamaged backup of this server since its \
                 last restore to build on"
                    .to_owned(),
            ),
            Err(e) => Err(format!(
                "the catalog could not name the previous backup ({e})"
            )),
        }
    }
}

/// Why a job did not complete.
#[derive(Debug)]
pub(crate) struct JobFailure {
    /// Shown to the customer on the backup or restore: a plain sentence,
    /// never a host path or a program's stderr.
    reason: String,
    /// For the operator (log, `vpsbackup failures`): the full error.
    detail: Option<String>,
    /// The engine stopped because the job was cancelled (a deleted backup,
    /// or shutdown): nothing of the job's work was finished.
    cancelled: bool,
}

impl JobFailure {
    fn new(reason: impl Into<String>) -> JobFailure {
        JobFailure {
            reason: reason.into(),
            detail: None,
            cancelled: false,
        }
    }

    pub(crate) fn detailed(reason: impl Into<String>, detail: impl Into<String>) -> JobFailure {
        JobFailure {
            detail: Some(detail.into()),
            ..JobFailure::new(reason)
        }
    }
}

/// `pre_backup` -> `pre-backup`, as customers read it.
fn hook_title(name: &str) -> String {
    name.replace('_', "-")
}

/// The one place an engine error becomes the customer's reason; the
/// error's own text (paths, QEMU's stderr) is kept as the operator's detail.
/// Exhaustive on purpose: a new error kind must choose its customer text.
pub(crate) fn engine_failure(kind: JobKind, e: EngineError) -> JobFailure {
    let disk = match kind {
        JobKind::Backup => "The server's disk could not be read.",
        JobKind::Restore => "The server's disk could not be written.",
    };
    let reason = match &e {
        EngineError::Cancelled => {
            return JobFailure {
                reason: "The job was cancelled.".to_owned(),
                detail: None,
                cancelled: true,
            }
        }
        EngineError::WriterLost(_) => {
            "The backup lost its place in the backup store before it finished; nothing was recorded, run it again."
        }
        EngineError::BackupNotFound(_) => "The backup's data is missing from the backup store.",
        EngineError::BackupExists(_) => {
            "The backup store already holds data under this backup's id; nothing was overwritten."
        }
        EngineError::Corrupt { .. }
        | EngineError::MissingChunk { .. }
        | EngineError::BadObject { .. }
        | EngineError::Tampered { .. } => {
            "The backup's data in the backup store is damaged; restore from another backup."
        }
        EngineError::Key(_) => "The backup store could not be unlocked.",
        EngineError::StoreFull => {
            "There is no space left on the backup store; nothing was recorded. Try again once the provider has freed space."
        }
        // Its own text is written for customers (and names no path).
        EngineError::Disk(d @ vpsbackup_engine::DiskError::InUse { .. }) => {
            return JobFailure::detailed(capitalise(&d.to_string()) + ".", e.to_string())
        }
        EngineError::Disk(_) => disk,
        EngineError::Storage(_) => "The backup store could not be read or written.",
        EngineError::InvalidRequest(_) => "The backup engine refused the job.",
        EngineError::Internal(_) => "An internal error stopped the job.",
    };
    JobFailure::detailed(reason, e.to_string())
}

fn engine_format(f: ImageFormat) -> DiskFormat {
    match f {
        ImageFormat::Raw => DiskFormat::Raw,
        ImageFormat::Qcow2 => DiskFormat::Qcow2,
        ImageFormat::Block => DiskFormat::BlockDevice,
    }
}

/// How the catalog records a disk format the engine detected.
pub fn catalog_format(f: DiskFormat) -> ImageFormat {
    match f {
        DiskFormat::Raw => ImageFormat::Raw,
        DiskFormat::Qcow2 => ImageFormat::Qcow2,
        DiskFormat::BlockDevice => ImageFormat::Block,
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// A server's own hook wins; `""` disables the global one for that server.
fn effective_hooks(settings: &Settings, server: &Hooks) -> Hooks {
    let pick = |own: &Option<String>, global: &Option<String>| -> Option<String> {
        own.clone()
            .or_else(|| global.clone())
            .filter(|c| !c.trim().is_empty())
    };
    let g = &settings.hooks;
    Hooks {
        pre_backup: pick(&server.pre_backup, &g.pre_backup),
        post_backup: pick(&server.post_backup, &g.post_backup),
        pre_restore: pick(&server.pre_restore, &g.pre_restore),
        post_restore: pick(&server.post_restore, &g.post_restore),
    }
}

/// Copies progress to the catalog about once a second (also the heartbeat);
/// cancels the engine when the job stops being ours.
async fn progress_loop(
    catalog: Arc<dyn Catalog>,
    clock: Arc<dyn Clock>,
    (job, claimed_until): (JobId, Option<OffsetDateTime>),
    worker: String,
    control: Arc<JobControl>,
    (done, lease_lost): (Arc<Notify>, Arc<AtomicBool>),
    (metrics, n): (JobMetrics, usize),
) {
    let mut last = None;
    // How long this worker surely holds the job (wall clock).
    let mut held_until = claimed_until.unwrap_or_else(|| OffsetDateTime::now_utc() + LEASE);
    let mut last_renewal = std::time::Instant::now();
    let abandon = |why: &str| {
        tracing::warn!(reason = why, "giving the job up");
        lease_lost.store(true, Ordering::SeqCst);
        control.cancel();
    };
    loop {
        tokio::select! {
            _ = done.notified() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if last_renewal.elapsed() >= LEASE_RENEW_EVERY {
            let until = OffsetDateTime::now_utc() + LEASE;
            match catalog.renew_lease(job, &worker, until).await {
                Ok(true) => {
                    held_until = until;
                    last_renewal = std::time::Instant::now();
                }
                Ok(false) => {
                    // Requeued or claimed by another worker after our lease
                    // ran out, or cancelled: stop at once.
                    match catalog.job(job).await {
                        Ok(Some(j)) if j.state == JobState::Cancelled => control.cancel(),
                        Ok(None) => control.cancel(),
                        _ => abandon("the lease was taken away"),
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew the job's lease");
                    // Fence ourselves before anyone may take the job over.
                    if OffsetDateTime::now_utc() + time::Duration::seconds(2) >= held_until {
                        abandon("the lease could not be renewed before it ran out");
                        return;
                    }
                }
            }
        }
        let pct = control.percent();
        // Write every tick even when unchanged: it is the heartbeat.
        match catalog.job_progress(job, &worker, pct, clock.now()).await {
            Ok(true) => {
                metrics.beat(n, clock.now());
                if last != Some(pct) {
                    tracing::debug!(progress = pct, "progress");
                    last = Some(pct);
                }
            }
            Ok(false) => {
                match catalog.job(job).await {
                    Ok(Some(j)) if j.state != JobState::Cancelled => {
                        abandon("the job was taken over")
                    }
                    _ => control.cancel(),
                }
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not record progress"),
        }
    }
}

/// What a starting `serve` or `agent` does with jobs left running. On a
/// catalog of its own (SQLite: one `serve` per data dir, no agents) every
/// running job belongs to a process that died: re-run or fail it now. On a
/// shared one, running jobs may be other processes' live ones: only those
/// whose lease ran out are taken, the same path as [`sweep_leases`].
/// Then, with workers and a node, servers on no node (added before nodes
/// existed) are adopted by this node, so a single box keeps running them.
pub async fn recover_at_start(
    catalog: &dyn Catalog,
    shared: bool,
    clock: &dyn Clock,
    settings: &Settings,
) -> Result<(), vpsbackup_catalog::CatalogError> {
    let now = clock.now();
    let recovered = if shared {
        catalog
            .expire_leases(OffsetDateTime::now_utc(), now)
            .await?
    } else {
        catalog
            .recover_stale_jobs(now + time::Duration::seconds(1), now)
            .await?
    };
    for job in &recovered {
        tracing::warn!(
            job = job.job.0,
            backup = job.backup_id.0,
            requeued = job.requeued,
            "recovered a job interrupted by a stopped service"
        );
    }
    if let (Some(node), 1..) = (&settings.node, settings.workers) {
        let adopted = catalog.adopt_unassigned_servers(node).await?;
        if adopted > 0 {
            tracing::info!(adopted, node = %node, "servers on no node now on this one");
        }
    }
    Ok(())
}

/// Every [`LEASE_RENEW_EVERY`] until `stop` turns true: requeues (or fails
/// with a reason) the running jobs whose lease ran out, whoever held them,
/// and wakes `runner`'s workers when it requeued any. Every process runs
/// one; the catalog hands each expired job to one sweeper.
pub async fn sweep_leases(
    catalog: Arc<dyn Catalog>,
    clock: Arc<dyn Clock>,
    runner: Option<Arc<JobRunner>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match catalog
            .expire_leases(OffsetDateTime::now_utc(), clock.now())
            .await
        {
            Ok(recovered) => {
                for job in &recovered {
                    tracing::warn!(
                        job = job.job.0,
                        backup = job.backup_id.0,
                        requeued = job.requeued,
                        "a job's lease ran out (its process died or lost the catalog)"
                    );
                }
                if recovered.iter().any(|j| j.requeued) {
                    if let Some(r) = &runner {
                        r.wake();
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not look for expired leases"),
        }
        tokio::select! {
            _ = tokio::time::sleep(LEASE_RENEW_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
