//! The JSON objects the API returns, built from catalog rows. Field names
//! and types follow the seed document; added fields never replace seed ones.

use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;
use vpsbackup_catalog::{Backup, Plan, Restore, Server, MANUAL_BACKUP_LIMIT};

use crate::clock::rfc3339;

// The closed sets of words the views carry as `&'static str`, declared to
// the OpenAPI document as enums (`value_type`); never built at run time.

/// How a backup was made.
#[derive(Serialize, ToSchema)]
#[schema(as = BackupType)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum BackupTypeDoc {
    Manual,
    Automatic,
}

/// Where a backup or restore job is.
#[derive(Serialize, ToSchema)]
#[schema(as = JobStatus)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum JobStatusDoc {
    InProgress,
    Completed,
    Failed,
}

/// What a server is doing.
#[derive(Serialize, ToSchema)]
#[schema(as = ServerStatus)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum ServerStatusDoc {
    Active,
    BackingUp,
    Restoring,
}

/// A server as other objects name it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServerRef {
    pub id: i64,
    pub name: String,
}

/// A backup of one server's disks.
#[derive(Debug, Serialize, ToSchema)]
pub struct BackupView {
    pub id: i64,
    pub server: ServerRef,
    #[schema(value_type = BackupTypeDoc)]
    pub backup_type: &'static str,
    #[schema(value_type = JobStatusDoc)]
    pub status: &'static str,
    /// MiB of disk data captured (zeros excluded), rounded up; null until completed.
    #[schema(required)]
    pub size_mb: Option<u64>,
    #[schema(format = DateTime, example = "2025-01-16T03:00:00Z")]
    pub created_at: String,
    /// Null for manual backups; created_at + the plan's retention for automatic ones.
    #[schema(required, format = DateTime)]
    pub expires_at: Option<String>,
    pub description: String,
    /// 0..100; 100 once completed.
    #[schema(maximum = 100)]
    pub progress: u8,
    /// Why a failed backup failed.
    #[schema(required)]
    pub error: Option<String>,
    #[schema(required, format = DateTime)]
    pub completed_at: Option<String>,
    /// When the backup's data was last re-read and checked.
    #[schema(required, format = DateTime)]
    pub verified_at: Option<String>,
    /// True when verification found the backup's data damaged; it cannot be restored.
    pub damaged: bool,
    /// What verification found wrong (null when not damaged).
    #[schema(required)]
    pub verify_error: Option<String>,
    /// Present on the answer to a create.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub message: Option<&'static str>,
}

impl From<&Backup> for BackupView {
    fn from(b: &Backup) -> Self {
        BackupView {
            id: b.id.0,
            server: ServerRef {
                id: b.server_id.0,
                name: b.server_name.clone(),
            },
            backup_type: b.backup_type.as_str(),
            status: b.status.as_str(),
            size_mb: b.size_mb,
            created_at: rfc3339(b.created_at),
            expires_at: b.expires_at.map(rfc3339),
            description: b.description.clone(),
            progress: b.progress,
            error: b.error.clone(),
            completed_at: b.completed_at.map(rfc3339),
            verified_at: b.verified_at.map(rfc3339),
            damaged: b.damaged,
            verify_error: b.verify_error.clone(),
            message: None,
        }
    }
}

/// A restore of a backup onto its server.
#[derive(Debug, Serialize, ToSchema)]
pub struct RestoreView {
    pub id: i64,
    pub server: ServerRef,
    pub backup_id: i64,
    #[schema(value_type = JobStatusDoc)]
    pub status: &'static str,
    /// 0..100; 100 once completed.
    #[schema(maximum = 100)]
    pub progress: u8,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(required, format = DateTime)]
    pub completed_at: Option<String>,
    /// Why a failed restore failed.
    #[schema(required)]
    pub error: Option<String>,
    /// Present on the answer to a create.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub message: Option<&'static str>,
}

impl From<&Restore> for RestoreView {
    fn from(r: &Restore) -> Self {
        RestoreView {
            id: r.id.0,
            server: ServerRef {
                id: r.server_id.0,
                name: r.server_name.clone(),
            },
            backup_id: r.backup_id.0,
            status: r.status.as_str(),
            progress: r.progress,
            created_at: rfc3339(r.created_at),
            completed_at: r.completed_at.map(rfc3339),
            error: r.error.clone(),
            message: None,
        }
    }
}

/// A retention plan.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanView {
    pub id: i64,
    pub name: String,
    /// Days automatic backups are kept (7..30).
    #[schema(minimum = 7, maximum = 30)]
    pub retention_days: u32,
}

impl From<&Plan> for PlanView {
    fn from(p: &Plan) -> Self {
        PlanView {
            id: p.id.0,
            name: p.name.clone(),
            retention_days: p.retention_days,
        }
    }
}

/// The daily window automatic backups start in (UTC).
#[derive(Debug, Serialize, ToSchema)]
pub struct BackupWindow {
    /// "HH:MM" UTC.
    #[schema(example = "03:00", pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]
    pub start: String,
    pub duration_minutes: u32,
}

/// A server of the account.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServerView {
    pub id: i64,
    pub name: String,
    pub hostname: String,
    #[schema(value_type = ServerStatusDoc)]
    pub status: &'static str,
    pub plan: PlanView,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// Manual backups in progress or completed (failed ones do not count).
    pub manual_backups_used: u32,
    pub manual_backups_limit: u32,
    /// How many more manual backups can be created now.
    pub manual_backups_left: u32,
    pub auto_backup_enabled: bool,
    pub backup_window: BackupWindow,
    /// When the next automatic backup is planned to start (UTC); null when
    /// automatic backups are off for this server or for the whole service.
    /// A backup that is due now, or a retry of today's failed one, shows the
    /// time it is planned for.
    #[schema(required, format = DateTime, example = "2025-01-17T03:12:00Z")]
    pub next_backup_at: Option<String>,
    pub disk_count: usize,
}

impl ServerView {
    /// The view of `s`, with its next automatic backup as the scheduler
    /// plans it.
    pub fn new(s: &Server, next_backup: Option<OffsetDateTime>) -> Self {
        let start = s.window_start_minute.unwrap_or(s.plan.window_start_minute);
        ServerView {
            id: s.id.0,
            name: s.name.clone(),
            hostname: s.hostname.clone(),
            status: s.status.as_str(),
            plan: PlanView::from(&s.plan),
            created_at: rfc3339(s.created_at),
            updated_at: rfc3339(s.updated_at),
            manual_backups_used: s.manual_backups_used,
            manual_backups_limit: MANUAL_BACKUP_LIMIT,
            manual_backups_left: MANUAL_BACKUP_LIMIT.saturating_sub(s.manual_backups_used),
            auto_backup_enabled: s.auto_backup_enabled,
            backup_window: BackupWindow {
                start: format!("{:02}:{:02}", start / 60, start % 60),
                duration_minutes: s.plan.window_minutes,
            },
            next_backup_at: next_backup.map(rfc3339),
            disk_count: s.disks.len(),
        }
    }
}

/// A page of a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T: ToSchema> {
    pub count: u64,
    /// The next page's URL; null on the last page.
    #[schema(required)]
    pub next: Option<String>,
    /// The previous page's URL; null on the first page.
    #[schema(required)]
    pub previous: Option<String>,
    pub results: Vec<T>,
}

/// The caller: its account and token.
#[derive(Debug, Serialize, ToSchema)]
pub struct MeView {
    /// The account id (null for an admin token).
    #[schema(required)]
    pub id: Option<i64>,
    /// The account name (null for an admin token).
    #[schema(required)]
    pub name: Option<String>,
    /// When the account was created (null for an admin token).
    #[schema(required, format = DateTime)]
    pub created_at: Option<String>,
    pub token_name: String,
    /// The first characters of the token.
    pub token_prefix: String,
    pub is_admin: bool,
    /// Where the account's events (`backup.completed`, ...) are POSTed; null
    /// when none is set. The signing secret is never shown.
    #[schema(required)]
    pub webhook_url: Option<String>,
}

/// An error with one sentence.
#[derive(Debug, Serialize, ToSchema)]
pub struct Detail {
    #[schema(example = "Not found.")]
    pub detail: String,
}

/// Bad input, field by field, as Django REST Framework reports it: each bad
/// field (or `non_field_errors`) with its messages.
#[derive(Serialize, ToSchema)]
#[schema(as = FieldErrors, example = json!({"server_id": ["This field is required."]}))]
#[allow(dead_code)]
pub struct FieldErrorsDoc(pub std::collections::BTreeMap<String, Vec<String>>);

/// A 400: one sentence, or bad input field by field.
#[derive(Serialize, ToSchema)]
#[schema(as = BadRequest)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum BadRequestDoc {
    Detail(Detail),
    Fields(FieldErrorsDoc),
}
