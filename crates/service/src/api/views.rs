//! The JSON objects the API returns, built from catalog rows. Field names
//! and types follow the seed document; added fields never replace seed ones.

use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;
use vpsbackup_catalog::{Backup, Plan, Restore, Server, MANUAL_BACKUP_LIMIT};

use crate::clock::rfc3339;

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
    /// "manual" or "automatic".
    #[schema(example = "manual")]
    pub backup_type: &'static str,
    /// "in_progress", "completed" or "failed".
    #[schema(example = "completed")]
    pub status: &'static str,
    /// MiB of disk data captured (zeros excluded), rounded up; null until completed.
    pub size_mb: Option<u64>,
    #[schema(example = "2025-01-16T03:00:00Z")]
    pub created_at: String,
    /// Null for manual backups; created_at + the plan's retention for automatic ones.
    pub expires_at: Option<String>,
    pub description: String,
    /// 0..100; 100 once completed.
    pub progress: u8,
    /// Why a failed backup failed.
    pub error: Option<String>,
    pub completed_at: Option<String>,
    /// When the backup's data was last re-read and checked.
    pub verified_at: Option<String>,
    /// True when verification found the backup's data damaged; it cannot be restored.
    pub damaged: bool,
    /// What verification found wrong (null when not damaged).
    pub verify_error: Option<String>,
    /// Present on the answer to a create.
    #[serde(skip_serializing_if = "Option::is_none")]
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
    /// "in_progress", "completed" or "failed".
    pub status: &'static str,
    pub progress: u8,
    pub created_at: String,
    pub completed_at: Option<String>,
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
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
    #[schema(example = "03:00")]
    pub start: String,
    pub duration_minutes: u32,
}

/// A server of the account.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServerView {
    pub id: i64,
    pub name: String,
    pub hostname: String,
    /// "active", "backing_up" or "restoring".
    pub status: &'static str,
    pub plan: PlanView,
    pub created_at: String,
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
    #[schema(example = "2025-01-17T03:12:00Z")]
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
    pub next: Option<String>,
    pub previous: Option<String>,
    pub results: Vec<T>,
}

/// The caller: its account and token.
#[derive(Debug, Serialize, ToSchema)]
pub struct MeView {
    /// The account id (null for an admin token).
    pub id: Option<i64>,
    /// The account name (null for an admin token).
    pub name: Option<String>,
    pub created_at: Option<String>,
    pub token_name: String,
    /// The first characters of the token.
    pub token_prefix: String,
    pub is_admin: bool,
    /// Where the account's events (`backup.completed`, ...) are POSTed; null
    /// when none is set. The signing secret is never shown.
    pub webhook_url: Option<String>,
}

/// An error with one sentence.
#[derive(Debug, Serialize, ToSchema)]
pub struct Detail {
    #[schema(example = "Not found.")]
    pub detail: String,
}
