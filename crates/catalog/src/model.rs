//! The catalog's domain types: what the rows mean, independent of SQL.

use std::fmt;
use time::OffsetDateTime;

/// Most manual backups a server may hold (in progress or completed).
pub const MANUAL_BACKUP_LIMIT: u32 = 10;

/// Description given to automatic backups.
pub const AUTOMATIC_DESCRIPTION: &str = "Automatic daily backup";

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub i64);
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// An account (a hosting customer).
    AccountId
);
id_type!(
    /// An API token row (not the secret).
    TokenId
);
id_type!(
    /// A retention plan.
    PlanId
);
id_type!(
    /// The hosting provider's own server id.
    ServerId
);
id_type!(
    /// A backup.
    BackupId
);
id_type!(
    /// A restore.
    RestoreId
);
id_type!(
    /// A queued or past job.
    JobId
);

/// What a caller may see: one account's things, or everything (admin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    All,
    Account(AccountId),
}

impl Scope {
    /// The account to filter on, `None` for everything.
    pub fn account(self) -> Option<AccountId> {
        match self {
            Scope::All => None,
            Scope::Account(a) => Some(a),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: AccountId,
    pub name: String,
    pub created_at: OffsetDateTime,
    /// Where its events are POSTed (the secret is read only for delivery).
    pub webhook_url: Option<String>,
}

/// Whom a token acts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenOwner {
    Account(AccountId),
    Admin,
}

/// A token to store: only its hash, never the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct NewToken {
    pub hash: [u8; 32],
    /// The first characters of the token, for telling tokens apart.
    pub prefix: String,
    pub name: String,
    pub owner: TokenOwner,
}

impl fmt::Debug for NewToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewToken")
            .field("prefix", &self.prefix)
            .field("name", &self.name)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub id: TokenId,
    pub hash: [u8; 32],
    pub prefix: String,
    pub name: String,
    pub owner: TokenOwner,
    /// The owning account's name (None for admin tokens).
    pub account_name: Option<String>,
    pub created_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiToken")
            .field("id", &self.id)
            .field("prefix", &self.prefix)
            .field("name", &self.name)
            .field("owner", &self.owner)
            .field("revoked_at", &self.revoked_at)
            .finish_non_exhaustive()
    }
}

/// Which token to revoke.
#[derive(Debug, Clone)]
pub enum TokenRef {
    Id(TokenId),
    Hash([u8; 32]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub id: PlanId,
    pub name: String,
    /// How long automatic backups are kept, 7..=30.
    pub retention_days: u32,
    /// Start of the daily backup window, minutes after 00:00 UTC.
    pub window_start_minute: u32,
    /// Length of the window in minutes.
    pub window_minutes: u32,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// Default window start: 03:00 UTC.
pub const DEFAULT_WINDOW_START_MINUTE: u32 = 180;
/// Default window length: two hours.
pub const DEFAULT_WINDOW_MINUTES: u32 = 120;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPlan {
    pub name: String,
    pub retention_days: u32,
    pub window_start_minute: u32,
    pub window_minutes: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanUpdate {
    pub retention_days: Option<u32>,
    pub window_start_minute: Option<u32>,
    pub window_minutes: Option<u32>,
}

/// Commands run around a server's jobs. `None` means "use the global hook";
/// `Some("")` disables the hook for this server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    pub pre_backup: Option<String>,
    pub post_backup: Option<String>,
    pub pre_restore: Option<String>,
    pub post_restore: Option<String>,
}

/// What a server is doing now, derived from its running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerStatus {
    Active,
    BackingUp,
    Restoring,
}

impl ServerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerStatus::Active => "active",
            ServerStatus::BackingUp => "backing_up",
            ServerStatus::Restoring => "restoring",
        }
    }
}

/// How a disk's image is stored on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
    /// A block device, read and written as raw bytes.
    Block,
}

impl ImageFormat {
    /// The stored name, the same as the disk layer's.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Block => "block",
        }
    }

    pub fn parse(s: &str) -> Option<ImageFormat> {
        match s {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            "block" => Some(ImageFormat::Block),
            _ => None,
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One disk of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerDisk {
    /// The image file or block device.
    pub path: String,
    /// Recorded when the server was added, a trusted moment: a guest can
    /// write any bytes at the start of its raw disk, so the format is never
    /// probed from the image at backup or restore time. `None` only on disks
    /// added before formats were recorded.
    pub format: Option<ImageFormat>,
}

impl ServerDisk {
    pub fn new(path: impl Into<String>, format: ImageFormat) -> ServerDisk {
        ServerDisk {
            path: path.into(),
            format: Some(format),
        }
    }
}

/// How a server runs, and so where a backup gets a consistent view of its
/// disks from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ServerRuntime {
    /// Read the image files or block devices from the host. The server must
    /// be stopped (or its filesystems frozen by hooks); an image a running
    /// QEMU holds open is refused rather than read torn.
    #[default]
    Offline,
    /// A QEMU driven directly: the point in time is taken through its QMP
    /// socket, and disks are matched to its block nodes by file path. With
    /// a guest agent (the host end of its channel, a unix socket), the
    /// guest's filesystems are frozen for the instant.
    Qemu {
        qmp_socket: String,
        guest_agent: Option<String>,
    },
    /// A libvirt domain: the point in time is libvirt's pull-mode backup
    /// with its checkpoints (`virsh`), disks matched by file path; the
    /// guest is frozen through libvirt when its agent answers.
    Libvirt { domain: String },
}

impl ServerRuntime {
    /// The stored name: "offline", "qemu" or "libvirt".
    pub fn kind(&self) -> &'static str {
        match self {
            ServerRuntime::Offline => "offline",
            ServerRuntime::Qemu { .. } => "qemu",
            ServerRuntime::Libvirt { .. } => "libvirt",
        }
    }

    /// Builds a runtime from its stored columns; `None` when they do not
    /// fit together (a qemu runtime without a socket path, say).
    pub fn from_parts(
        kind: &str,
        qmp_socket: Option<String>,
        domain: Option<String>,
        guest_agent: Option<String>,
    ) -> Option<ServerRuntime> {
        match (kind, qmp_socket, domain) {
            ("offline", _, _) => Some(ServerRuntime::Offline),
            ("qemu", Some(qmp_socket), _) if !qmp_socket.is_empty() => Some(ServerRuntime::Qemu {
                qmp_socket,
                guest_agent: guest_agent.filter(|g| !g.is_empty()),
            }),
            ("libvirt", _, Some(domain)) if !domain.is_empty() => {
                Some(ServerRuntime::Libvirt { domain })
            }
            _ => None,
        }
    }

    pub fn qmp_socket(&self) -> Option<&str> {
        match self {
            ServerRuntime::Qemu { qmp_socket, .. } => Some(qmp_socket),
            _ => None,
        }
    }

    pub fn guest_agent(&self) -> Option<&str> {
        match self {
            ServerRuntime::Qemu { guest_agent, .. } => guest_agent.as_deref(),
            _ => None,
        }
    }

    pub fn domain(&self) -> Option<&str> {
        match self {
            ServerRuntime::Libvirt { domain } => Some(domain),
            _ => None,
        }
    }
}

impl std::fmt::Display for ServerRuntime {
    /// "offline", "qemu (QMP /run/vm1.qmp)", "libvirt (domain vm1)".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerRuntime::Offline => f.write_str("offline"),
            ServerRuntime::Qemu {
                qmp_socket,
                guest_agent: None,
            } => write!(f, "qemu (QMP {qmp_socket})"),
            ServerRuntime::Qemu {
                qmp_socket,
                guest_agent: Some(agent),
            } => write!(f, "qemu (QMP {qmp_socket}, guest agent {agent})"),
            ServerRuntime::Libvirt { domain } => write!(f, "libvirt (domain {domain})"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub id: ServerId,
    pub name: String,
    pub hostname: String,
    pub account_id: AccountId,
    pub account_name: String,
    pub plan: Plan,
    /// Disks in order (disk 0 first).
    pub disks: Vec<ServerDisk>,
    pub auto_backup_enabled: bool,
    /// Overrides the plan's window start when set.
    pub window_start_minute: Option<u32>,
    pub hooks: Hooks,
    pub runtime: ServerRuntime,
    /// The hypervisor node holding its disks: only that node's workers run
    /// its jobs. `None`: added before nodes existed (the first `serve` with
    /// workers adopts it).
    pub node: Option<String>,
    pub status: ServerStatus,
    /// Manual backups that count against the limit (in progress or completed).
    pub manual_backups_used: u32,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewServer {
    pub id: ServerId,
    pub name: String,
    pub hostname: String,
    pub account_id: AccountId,
    pub plan_id: PlanId,
    pub disks: Vec<ServerDisk>,
    pub hooks: Hooks,
    pub runtime: ServerRuntime,
    /// The node holding its disks (`None`: any worker may run its jobs).
    pub node: Option<String>,
}

/// Changes to a server; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerUpdate {
    pub name: Option<String>,
    pub hostname: Option<String>,
    pub plan_id: Option<PlanId>,
    pub disks: Option<Vec<ServerDisk>>,
    pub auto_backup_enabled: Option<bool>,
    /// `Some(None)` clears the override.
    pub window_start_minute: Option<Option<u32>>,
    pub hooks: HookUpdate,
    pub runtime: Option<ServerRuntime>,
    /// Moves the server to another node.
    pub node: Option<String>,
}

/// A change to some of a server's hooks; each one not named stays as it is
/// (a freeze hook must never lose its thaw because another one was set).
/// `Some(None)` makes the server follow the global hook again;
/// `Some(Some(""))` disables it for the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookUpdate {
    pub pre_backup: Option<Option<String>>,
    pub post_backup: Option<Option<String>>,
    pub pre_restore: Option<Option<String>>,
    pub post_restore: Option<Option<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupType {
    Manual,
    Automatic,
}

impl BackupType {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupType::Manual => "manual",
            BackupType::Automatic => "automatic",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "manual" => Some(BackupType::Manual),
            "automatic" => Some(BackupType::Automatic),
            _ => None,
        }
    }
}

/// Status of a backup or a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkStatus {
    InProgress,
    Completed,
    Failed,
}

impl WorkStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkStatus::InProgress => "in_progress",
            WorkStatus::Completed => "completed",
            WorkStatus::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "in_progress" => Some(WorkStatus::InProgress),
            "completed" => Some(WorkStatus::Completed),
            "failed" => Some(WorkStatus::Failed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub id: BackupId,
    pub server_id: ServerId,
    pub server_name: String,
    pub account_id: AccountId,
    pub backup_type: BackupType,
    pub status: WorkStatus,
    pub description: String,
    pub created_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
    pub completed_at: Option<OffsetDateTime>,
    pub size_mb: Option<u64>,
    /// How much the store grew for this backup (compressed new chunks).
    pub stored_bytes: Option<u64>,
    pub progress: u8,
    pub error: Option<String>,
    /// The backup's name in the engine's store ("b<id>").
    pub engine_backup_id: String,
    pub scheduled_for: Option<OffsetDateTime>,
    pub verified_at: Option<OffsetDateTime>,
    pub damaged: bool,
    pub verify_error: Option<String>,
    /// How the backup read its disks, once it completed (`None` for
    /// backups made before this was recorded).
    pub read: Option<BackupRead>,
}

/// How a backup read its server's disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRead {
    /// Only what changed since the previous backup was read (QEMU's dirty
    /// bitmaps); the backup is still complete on its own.
    pub incremental: bool,
    pub bytes_read: u64,
    /// Why the disks (or some) were read in full when the server runs
    /// under QEMU (first backup, bitmap lost, disk resized, ...).
    pub full_reason: Option<String>,
    pub consistency: Consistency,
}

/// A backup's [`BackupRead`] from its columns (none before it completed).
pub(crate) fn backup_read(
    incremental: bool,
    bytes_read: Option<i64>,
    full_reason: Option<String>,
    consistency: Option<String>,
) -> Option<BackupRead> {
    Some(BackupRead {
        incremental,
        bytes_read: bytes_read? as u64,
        full_reason,
        consistency: consistency
            .as_deref()
            .and_then(Consistency::parse)
            .unwrap_or(Consistency::Offline),
    })
}

/// How consistent a backup's point in time is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Read from the disk files of a server that was not running.
    Offline,
    /// A running server's disks at one instant, as after a power cut.
    CrashConsistent,
    /// A running server's disks at one instant with its filesystems frozen
    /// by the guest agent.
    Frozen,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Offline => "offline",
            Consistency::CrashConsistent => "crash-consistent",
            Consistency::Frozen => "frozen",
        }
    }

    pub fn parse(s: &str) -> Option<Consistency> {
        Some(match s {
            "offline" => Consistency::Offline,
            "crash-consistent" => Consistency::CrashConsistent,
            "frozen" => Consistency::Frozen,
            _ => return None,
        })
    }
}

/// The engine's name for a catalog backup.
pub fn engine_backup_id(id: BackupId) -> String {
    format!("b{}", id.0)
}

/// A completed backup read from the store's manifest, to be put back into
/// a catalog that lost it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedBackup {
    pub id: BackupId,
    pub server_id: ServerId,
    pub backup_type: BackupType,
    pub description: String,
    pub created_at: OffsetDateTime,
    pub completed_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
    pub scheduled_for: Option<OffsetDateTime>,
    pub size_mb: u64,
    pub engine_backup_id: String,
}

/// What [`crate::Catalog::import_backup`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportOutcome {
    Imported,
    /// A backup with this id is in the catalog already.
    AlreadyPresent,
    /// No server with this id: the provider must add it first.
    UnknownServer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBackup {
    pub server_id: ServerId,
    /// The caller's scope: a server outside it is "not found".
    pub scope: Scope,
    pub backup_type: BackupType,
    pub description: String,
    /// `None` for manual backups; created_at + retention for automatic ones.
    pub expires_at: Option<OffsetDateTime>,
    /// The automatic run's slot (one automatic backup per server per slot).
    pub scheduled_for: Option<OffsetDateTime>,
    /// Earliest time the job may start (retries with backoff).
    pub run_after: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackupFilter {
    pub scope: Option<AccountId>,
    pub server_id: Option<ServerId>,
    pub backup_type: Option<BackupType>,
}

impl BackupFilter {
    /// The counts table (kept exact by triggers) a listing's count sums for
    /// this filter: a server's own rows, or without a server filter the
    /// per-account rows, at most two per account however many servers it
    /// has (migrations 0013 / pg 0004).
    pub(crate) fn counts_table(&self) -> &'static str {
        match self.server_id {
            Some(_) => "backup_counts",
            None => "account_backup_counts",
        }
    }
}

/// `" WHERE a AND b"` of a listing's conditions, or nothing without any.
pub(crate) fn where_clause<S: AsRef<str>>(conds: &[S]) -> String {
    match conds {
        [] => String::new(),
        _ => {
            let conds: Vec<&str> = conds.iter().map(AsRef::as_ref).collect();
            format!(" WHERE {}", conds.join(" AND "))
        }
    }
}

/// A deleted backup and what was running for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedBackup {
    pub backup: Backup,
    /// The backup's job if it was queued or running; a running one must be
    /// cancelled by whoever runs it.
    pub job: Option<JobId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    pub id: RestoreId,
    pub server_id: ServerId,
    pub server_name: String,
    pub account_id: AccountId,
    pub backup_id: BackupId,
    pub status: WorkStatus,
    pub progress: u8,
    pub created_at: OffsetDateTime,
    pub completed_at: Option<OffsetDateTime>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRestore {
    pub server_id: ServerId,
    pub backup_id: BackupId,
    pub scope: Scope,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Backup,
    Restore,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Restore => "restore",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "done" => JobState::Done,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: JobId,
    pub kind: JobKind,
    pub server_id: ServerId,
    /// The backup taken (backup job) or read (restore job).
    pub backup_id: BackupId,
    pub restore_id: Option<RestoreId>,
    pub state: JobState,
    /// Attempts started so far, this one included once claimed.
    pub attempts: u32,
    pub max_attempts: u32,
    pub claimed_by: Option<String>,
    pub heartbeat_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
    pub error: Option<String>,
    /// The operator's detail of a failure (never shown by the API).
    pub error_detail: Option<String>,
    pub finished_at: Option<OffsetDateTime>,
    /// The node whose worker ran it (the latest attempt's).
    pub node: Option<String>,
    /// While running: until when its owner's lease holds (wall clock).
    pub lease_expires_at: Option<OffsetDateTime>,
}

impl Job {
    /// Whether a job whose process died (its lease ran out, or the service
    /// restarted) goes back to the queue: a backup with attempts left. A
    /// restore is never run again unasked: the provider may have started
    /// the guest on the half-written disk since, and a re-run would
    /// overwrite what it wrote. It fails with [`Job::lost_reason`] instead.
    pub fn requeued_when_lost(&self) -> bool {
        self.kind == JobKind::Backup && self.attempts < self.max_attempts
    }

    /// The table and row of what the job makes (backup) or performs
    /// (restore).
    pub fn target(&self) -> (&'static str, Option<i64>) {
        match self.kind {
            JobKind::Restore => ("restores", self.restore_id.map(|r| r.0)),
            JobKind::Backup => ("backups", Some(self.backup_id.0)),
        }
    }

    /// Why a lost job that is not requeued failed, for the customer.
    pub fn lost_reason(&self) -> String {
        match self.kind {
            JobKind::Restore => "The service stopped while this restore was running, so the server's disks may be \
                 partly restored. It was not run again on its own, because the server may have been \
                 started since. Start a new restore."
                .to_owned(),
            JobKind::Backup => format!(
                "The service stopped while this backup was running, {} times; it was not tried again. \
                 Start a new backup.",
                self.attempts
            ),
        }
    }

    /// The webhook event the job's failure sends, if any.
    pub fn failure_event(&self) -> Option<(crate::WebhookEventKind, crate::WebhookSubject)> {
        use crate::{WebhookEventKind, WebhookSubject};
        match (self.kind, self.restore_id) {
            (JobKind::Restore, Some(r)) => {
                Some((WebhookEventKind::RestoreFailed, WebhookSubject::Restore(r)))
            }
            (JobKind::Backup, _) => Some((
                WebhookEventKind::BackupFailed,
                WebhookSubject::Backup(self.backup_id),
            )),
            _ => None,
        }
    }
}

/// How long a claim holds a job unless renewed. The owner renews every
/// [`LEASE_RENEW_EVERY`]; any process finding a lease past requeues the job.
pub const LEASE: time::Duration = time::Duration::seconds(20);
/// How often a running job's owner renews its lease.
pub const LEASE_RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Who claims a job, for which node, and until when the claim holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobClaim {
    /// The owner: unique per worker of a process (`host-pid-random-wN`).
    pub worker: String,
    /// Only jobs of servers on this node; `None`: any server's.
    pub node: Option<String>,
    /// The lease's expiry (wall clock, not the scheduler's clock: leases
    /// are between processes).
    pub lease_until: OffsetDateTime,
}

/// One node's share of the catalog, for `vpsbackup status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLoad {
    /// `None`: servers not assigned to a node yet.
    pub node: Option<String>,
    pub servers: u64,
    pub running_jobs: u64,
    pub queued_jobs: u64,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    BackupCompleted {
        size_mb: u64,
        stored_bytes: u64,
    },
    RestoreCompleted,
    /// The reason is shown to the customer on the backup or restore; the
    /// detail (paths, stderr) only to operators, on the job.
    Failed {
        reason: String,
        detail: Option<String>,
    },
}

/// What `recover_stale_jobs` did with one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredJob {
    pub job: JobId,
    pub kind: JobKind,
    pub backup_id: BackupId,
    /// true: queued again; false: failed for good.
    pub requeued: bool,
}

/// Which page of a list to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// 1-based.
    pub number: u32,
    pub size: u32,
}

/// One page of a list plus the total count under the same filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paged<T> {
    pub count: u64,
    pub items: Vec<T>,
}
