//! Catalog queries of the scheduler (issue 4): automatic daily backups,
//! their retries, expiry, verification results and periodic task state.
//!
//! A second trait beside [`crate::Catalog`] so the scheduler's queries live
//! apart from the API's; [`crate::SqliteCatalog`] implements both. Like the
//! main trait, every write takes `now` from the caller (simulated time).

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::model::{Backup, BackupId, JobKind, JobState, ServerId, WorkStatus};
use crate::Result;

/// What the scheduler needs to know about one server to plan its next
/// automatic backup: its effective window, retention, and its latest slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoBackupServer {
    pub server_id: ServerId,
    pub server_name: String,
    pub auto_backup_enabled: bool,
    /// Window start in minutes after 00:00 UTC: the server's override, else the plan's.
    pub window_start_minute: u32,
    /// Window length in minutes (the plan's).
    pub window_minutes: u32,
    pub retention_days: u32,
    /// The automatic backup with the latest `scheduled_for`, if any.
    pub latest: Option<AutoBackupSlot>,
    /// The latest slot an automatic backup was created for, even if that
    /// backup has been deleted since (see [`ScheduleCatalog::record_slot`]).
    pub last_slot: Option<OffsetDateTime>,
}

/// The latest automatic backup of a server and how its attempts went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoBackupSlot {
    pub backup_id: BackupId,
    /// 00:00 UTC of the day whose window the backup belongs to.
    pub scheduled_for: OffsetDateTime,
    pub status: WorkStatus,
    pub created_at: OffsetDateTime,
    /// When the last attempt ended (failed or completed).
    pub completed_at: Option<OffsetDateTime>,
    /// Backup jobs started or queued for it so far (first run and retries).
    pub attempts: u32,
}

/// Jobs waiting or running, host-wide.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounts {
    /// Queued jobs whose `run_after` has come.
    pub queued_due: u64,
    pub running: u64,
}

/// The job queue by kind and state, for metrics: every process reads the
/// same catalog-wide figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Queued jobs (due or waiting for a retry) and running ones, per kind;
    /// kinds and states with no job are absent.
    pub jobs: Vec<QueueCount>,
    /// Since when the longest-waiting due queued job could have run (its
    /// `run_after`); `None` when no queued job is due.
    pub oldest_due_since: Option<OffsetDateTime>,
}

impl QueueStats {
    /// Adds one `(kind, state, jobs, due_since)` group of the queue query
    /// (both backends run the same GROUP BY); unknown kinds or states are
    /// skipped.
    pub(crate) fn add_group(
        &mut self,
        kind: &str,
        state: &str,
        jobs: u64,
        due_since: Option<OffsetDateTime>,
    ) {
        let kind = match kind {
            "backup" => JobKind::Backup,
            "restore" => JobKind::Restore,
            _ => return,
        };
        let Some(state) = JobState::parse(state) else {
            return;
        };
        self.jobs.push(QueueCount { kind, state, jobs });
        if let Some(t) = due_since {
            if self.oldest_due_since.is_none_or(|o| t < o) {
                self.oldest_due_since = Some(t);
            }
        }
    }
}

/// How many jobs of one kind are in one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCount {
    pub kind: JobKind,
    pub state: JobState,
    pub jobs: u64,
}

/// When a periodic task last ran and what it reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRun {
    pub name: String,
    pub last_run: OffsetDateTime,
    pub summary: String,
}

/// The scheduler's catalog operations.
#[async_trait]
pub trait ScheduleCatalog: Send + Sync {
    /// Every server with its effective window and its latest automatic backup.
    async fn auto_backup_servers(&self) -> Result<Vec<AutoBackupServer>>;

    /// [`Self::auto_backup_servers`] for the given servers only (unknown ids
    /// are skipped), so the API can show when each listed server's next
    /// automatic backup is planned.
    async fn auto_backup_servers_in(&self, ids: &[ServerId]) -> Result<Vec<AutoBackupServer>>;

    /// Records that the automatic backup of slot `day` was created, so the
    /// slot is not taken again if that backup is deleted. Never moves back.
    async fn record_slot(&self, server: ServerId, day: OffsetDateTime) -> Result<()>;

    /// Puts a failed automatic backup back in the queue for another attempt
    /// at `run_after`, in one transaction (row back to in progress, new job).
    /// `Ok(false)` when the backup is gone or no longer failed.
    async fn retry_backup(
        &self,
        id: BackupId,
        run_after: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<bool>;

    /// Automatic backups whose `expires_at` has passed and that are not in
    /// progress, oldest first, at most `limit`. Manual backups never appear.
    async fn expired_backups(&self, now: OffsetDateTime, limit: u32) -> Result<Vec<Backup>>;

    /// Completed backups never verified or last verified before `before`,
    /// and damaged backups of a server with a backup completed since their
    /// last check (its new copies of their chunks may have repaired them),
    /// the longest unchecked first, at most `limit`.
    async fn backups_due_for_verify(
        &self,
        before: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<Backup>>;

    /// Records a verification of one backup. `error` set means damaged;
    /// the first time a backup is found damaged, its `backup.damaged`
    /// webhook event is written in the same transaction. A damaged backup
    /// found good (`error` None) has `damaged` and `verify_error` cleared
    /// and its `backup.repaired` event written, in the same transaction.
    /// `Ok(false)` when the backup no longer exists.
    async fn record_verification(
        &self,
        id: BackupId,
        at: OffsetDateTime,
        error: Option<&str>,
    ) -> Result<bool>;

    /// Backup jobs queued (due) and running, host-wide.
    async fn job_counts(&self, now: OffsetDateTime) -> Result<JobCounts>;

    /// Queued and running jobs per kind, and the oldest due queued job.
    async fn queue_stats(&self, now: OffsetDateTime) -> Result<QueueStats>;

    /// The last run of a periodic task, `None` if it never ran.
    async fn task_run(&self, name: &str) -> Result<Option<TaskRun>>;

    /// Records a run of a periodic task.
    async fn record_task_run(&self, name: &str, at: OffsetDateTime, summary: &str) -> Result<()>;

    /// Claims the turn to collect garbage in the store across every process
    /// on this catalog, other hosts' included; `None` while another holds
    /// it. Where the store's server ignores conditional writes (Garage) its
    /// own lock object cannot keep two GCs apart, and a file lock only
    /// covers one host: this does, through the shared catalog.
    async fn claim_gc_turn(&self) -> Result<Option<crate::GcTurn>>;

    /// Whether processes on other hosts may share this catalog (PostgreSQL),
    /// so [`Self::claim_gc_turn`] keeps their GCs apart: for `status`.
    fn is_shared(&self) -> bool {
        false
    }
}
