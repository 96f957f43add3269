//! The catalog: accounts, API tokens, plans, servers, backups, restores and
//! the persistent job queue, and the outbox of webhook events.
//!
//! [`Catalog`] is the one interface the service and the command line use; it
//! is object safe (`Arc<dyn Catalog>`). Two implementations sit behind it,
//! each with its own `migrations/` directory: [`SqliteCatalog`] (one file,
//! one box) and [`PgCatalog`] (one PostgreSQL database shared by several
//! processes, the same rules held with row locks and constraints).
//!
//! Every method that writes takes `now` from the caller instead of reading the
//! system clock, so the scheduler can drive the catalog with simulated time.
//!
//! Error policy: every method returns [`CatalogError`]. Database constraint
//! violations are mapped to [`CatalogError::Conflict`] / [`CatalogError::Invalid`]
//! in one place (`error::map_db_error`, shared by both backends), so callers
//! can turn them into 409/400 without looking at SQL error codes.

mod error;
mod idempotency;
pub mod labels;
mod leader;
pub mod migrate;
mod model;
mod open;
mod postgres;
mod schedule;
mod sqlite;
mod webhook;

pub use error::CatalogError;
pub use idempotency::{IdempotencyClaim, IdempotentRequest, StoredResponse};
pub use leader::{GcTurn, LeaderLock, GC_LOCK_KEY, SCHEDULER_LOCK_KEY};
pub use model::*;
pub use open::{redact, AnyCatalog, CatalogUrl};
pub use postgres::{Listening, PgCatalog, LISTING_APPLICATION};
pub use schedule::*;
pub use sqlite::SqliteCatalog;
pub use webhook::*;

use async_trait::async_trait;
use time::OffsetDateTime;

/// Result alias for catalog calls.
pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

/// The catalog's operations. Reads that a customer can trigger take a
/// [`Scope`]: anything outside it is reported exactly as if it did not exist.
#[async_trait]
pub trait Catalog: Send + Sync {
    // ---- accounts ----
    async fn create_account(&self, name: &str, now: OffsetDateTime) -> Result<Account>;
    async fn account(&self, id: AccountId) -> Result<Option<Account>>;
    async fn account_by_name(&self, name: &str) -> Result<Option<Account>>;
    async fn list_accounts(&self) -> Result<Vec<Account>>;
    /// Sets (or, with `None`, removes) an account's webhook. Removing it
    /// drops the account's pending events: there is nowhere to send them.
    async fn set_account_webhook(&self, name: &str, webhook: Option<Webhook>) -> Result<Account>;

    // ---- tokens ----
    async fn create_token(&self, token: NewToken, now: OffsetDateTime) -> Result<ApiToken>;
    /// The token with this SHA-256 hash, revoked or not (the caller decides).
    async fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiToken>>;
    async fn list_tokens(&self) -> Result<Vec<ApiToken>>;
    /// Revokes one token; `Ok(false)` when no live token matched.
    async fn revoke_token(&self, which: TokenRef, now: OffsetDateTime) -> Result<bool>;

    // ---- plans ----
    async fn create_plan(&self, plan: NewPlan, now: OffsetDateTime) -> Result<Plan>;
    /// Changes a plan. A new retention is applied to the `expires_at` of the
    /// plan's existing automatic backups in the same transaction.
    async fn update_plan(
        &self,
        name: &str,
        update: PlanUpdate,
        now: OffsetDateTime,
    ) -> Result<Plan>;
    async fn plan(&self, id: PlanId) -> Result<Option<Plan>>;
    async fn plan_by_name(&self, name: &str) -> Result<Option<Plan>>;
    async fn list_plans(&self) -> Result<Vec<Plan>>;

    // ---- servers ----
    async fn add_server(&self, server: NewServer, now: OffsetDateTime) -> Result<Server>;
    async fn update_server(
        &self,
        id: ServerId,
        update: ServerUpdate,
        now: OffsetDateTime,
    ) -> Result<Server>;
    /// Removes a server. Refused while it has a queued or running job; refused
    /// while it has backups unless `purge`, which deletes their rows too and
    /// returns them so the caller can delete their data from the store.
    async fn remove_server(&self, id: ServerId, purge: bool) -> Result<Vec<Backup>>;
    async fn server(&self, id: ServerId, scope: Scope) -> Result<Option<Server>>;
    /// Records the format of disk `disk` of a server when none is recorded
    /// yet (a disk added before formats were); a recorded format is kept.
    async fn record_disk_format(
        &self,
        id: ServerId,
        disk: usize,
        format: ImageFormat,
    ) -> Result<()>;
    async fn list_servers(&self, scope: Scope, page: PageRequest) -> Result<Paged<Server>>;

    // ---- backups ----
    /// Creates the backup row and enqueues its job in one transaction. For a
    /// manual backup the per-server limit is checked inside that transaction,
    /// so concurrent requests cannot exceed it.
    async fn create_backup(&self, backup: NewBackup, now: OffsetDateTime) -> Result<Backup>;
    async fn backup(&self, id: BackupId, scope: Scope) -> Result<Option<Backup>>;
    async fn list_backups(&self, filter: BackupFilter, page: PageRequest) -> Result<Paged<Backup>>;
    /// Deletes a backup row (and its queued or running job). Refused with
    /// [`CatalogError::Conflict`] while a running restore reads it.
    async fn delete_backup(&self, id: BackupId, scope: Scope) -> Result<DeletedBackup>;
    /// Every backup of every server (admin and scheduler use; unpaged).
    async fn all_backups(&self) -> Result<Vec<Backup>>;
    /// Records how a backup read its disks.
    async fn record_backup_read(&self, id: BackupId, read: &BackupRead) -> Result<()>;
    /// The backup an incremental backup of `server` may build on: its
    /// latest completed backup that is not damaged, unless the server was
    /// restored (or a restore was tried) since, which changed its disks
    /// behind QEMU's dirty bitmaps. `None`: read in full.
    async fn incremental_base(&self, server: ServerId) -> Result<Option<Backup>>;

    // ---- restores ----
    /// Creates the restore row and enqueues its job in one transaction;
    /// [`CatalogError::Busy`] while the server has a queued or running job.
    async fn create_restore(&self, restore: NewRestore, now: OffsetDateTime) -> Result<Restore>;
    async fn restore(&self, id: RestoreId, scope: Scope) -> Result<Option<Restore>>;

    // ---- jobs ----
    /// Claims the oldest queued job that may run now and whose server has no
    /// running job, atomically. `None` when there is nothing to do.
    async fn claim_job(&self, worker: &str, now: OffsetDateTime) -> Result<Option<Job>> {
        let claim = JobClaim {
            worker: worker.to_owned(),
            node: None,
            lease_until: now + LEASE,
        };
        self.claim_job_leased(&claim, now).await
    }
    /// As [`Catalog::claim_job`], for the servers of `claim.node` only,
    /// recording the node on the job and taking a lease until
    /// `claim.lease_until`.
    async fn claim_job_leased(&self, claim: &JobClaim, now: OffsetDateTime) -> Result<Option<Job>>;
    /// Extends the lease of a running job `worker` holds to `until`.
    /// `Ok(false)` when the job is no longer `worker`'s (its lease expired
    /// and it was requeued or taken, or it was cancelled): the worker must
    /// abandon its attempt and record nothing.
    async fn renew_lease(&self, job: JobId, worker: &str, until: OffsetDateTime) -> Result<bool>;
    /// Does for every running job whose lease ended before `expired_at`
    /// (wall clock) what [`Catalog::recover_stale_jobs`] does for stale
    /// ones. Safe to call from several processes at once: each job is
    /// handled by one of them.
    async fn expire_leases(
        &self,
        expired_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Vec<RecoveredJob>>;
    /// Gives every server with no node to `node`; returns how many.
    async fn adopt_unassigned_servers(&self, node: &str) -> Result<u64>;
    /// Servers and queued/running jobs per node, by node name.
    async fn node_loads(&self) -> Result<Vec<NodeLoad>>;
    /// Every periodic task record whose name starts with `prefix` (the
    /// nodes' heartbeats are `node:<name>`), by name.
    async fn task_runs_prefixed(&self, prefix: &str) -> Result<Vec<TaskRun>>;
    /// Records progress (0..=100) on the job's backup or restore and renews
    /// the claim. `Ok(false)` when the job is no longer ours (cancelled, or
    /// taken over): the worker must stop.
    async fn job_progress(
        &self,
        job: JobId,
        worker: &str,
        progress: u8,
        now: OffsetDateTime,
    ) -> Result<bool>;
    /// Gives a running job back to the queue without counting the attempt
    /// (graceful shutdown); its backup or restore restarts from scratch.
    async fn release_job(&self, job: JobId, worker: &str, now: OffsetDateTime) -> Result<bool>;
    /// Ends a job and its backup or restore row with the outcome; when the
    /// account has a webhook, its event is written in the same transaction.
    /// `Ok(false)` when the job was cancelled or taken over meanwhile (its
    /// backup row may be gone): the caller must clean up what it produced.
    async fn finish_job(
        &self,
        job: JobId,
        worker: &str,
        outcome: JobOutcome,
        now: OffsetDateTime,
    ) -> Result<bool>;
    /// Puts running backup jobs whose heartbeat is older than `stale_before`
    /// back in the queue (attempt counted) or fails them once their attempts
    /// are used up; fails such restore jobs at once (never re-run: the guest
    /// may have been started on the disk since). A failure carries a reason
    /// on the backup or restore (and its `*.failed` event, as `finish_job`).
    /// Returns what it did.
    async fn recover_stale_jobs(
        &self,
        stale_before: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Vec<RecoveredJob>>;
    async fn job(&self, id: JobId) -> Result<Option<Job>>;
    /// Puts back a completed backup found in the store under its own id
    /// (a catalog rebuilt after it was lost). Nothing changes when the id
    /// is taken (a second import) or the server does not exist.
    async fn import_backup(&self, backup: &ImportedBackup) -> Result<ImportOutcome>;
    /// New backups get ids above `through`: a backup left in the store but
    /// not imported (its server not added yet) keeps its id, so a new
    /// backup never takes it (the runner clears a leftover manifest of its
    /// own id before it starts).
    async fn reserve_backup_ids(&self, through: BackupId) -> Result<()>;
    /// The latest failed jobs, newest first, with the operator's detail.
    async fn failed_jobs(&self, limit: u32) -> Result<Vec<Job>>;

    // ---- idempotency keys ----
    /// Claims `req.key` for its owner, atomically (the key is unique per
    /// owner, so of concurrent claims exactly one gets
    /// [`IdempotencyClaim::Claimed`]). Keys created before `expired_before`
    /// are deleted first, so an expired key is free again.
    async fn claim_idempotency_key(
        &self,
        req: &IdempotentRequest,
        now: OffsetDateTime,
        expired_before: OffsetDateTime,
    ) -> Result<IdempotencyClaim>;
    /// Stores the answer of a claimed key's request, for its retries.
    async fn complete_idempotency_key(
        &self,
        owner: TokenOwner,
        key: &str,
        response: &StoredResponse,
    ) -> Result<()>;
    /// Frees a claimed key whose request is not to be remembered (it failed).
    async fn release_idempotency_key(&self, owner: TokenOwner, key: &str) -> Result<()>;

    // ---- webhook outbox ----
    /// Each account's oldest pending event, when it is due at `now`, oldest
    /// first, at most `limit`. An account's later events wait for it.
    async fn due_webhook_events(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>>;
    /// Claims the events [`Catalog::due_webhook_events`] would list that no
    /// other process holds, for `lease_secs` of the database's wall clock,
    /// so each attempt is made by one process however many replicas drain
    /// the outbox (a process that dies mid-attempt leaves its claim to
    /// expire). Recording the attempt frees the claim.
    async fn claim_webhook_events(
        &self,
        now: OffsetDateTime,
        limit: u32,
        lease_secs: u32,
    ) -> Result<Vec<WebhookDelivery>>;
    /// When the next of those falls due (`None`: nothing pending).
    async fn next_webhook_due(&self) -> Result<Option<OffsetDateTime>>;
    /// Freezes an event's body (first attempt only; a body already set is kept).
    async fn set_webhook_payload(&self, id: &str, payload: &str) -> Result<()>;
    /// Records one delivery attempt of a pending event.
    async fn record_webhook_attempt(
        &self,
        id: &str,
        attempt: WebhookAttempt,
        now: OffsetDateTime,
    ) -> Result<()>;
    /// Deletes delivered and failed events finished before `before`.
    async fn purge_webhook_events(&self, before: OffsetDateTime) -> Result<u64>;
}
