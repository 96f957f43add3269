//! Webhooks: an account's endpoint and the events of its outbox.

use std::fmt;
use time::OffsetDateTime;

use crate::{AccountId, BackupId, RestoreId};

/// Where an account's events are POSTed, and the key they are signed with.
#[derive(Clone, PartialEq, Eq)]
pub struct Webhook {
    /// An `http` or `https` URL.
    pub url: String,
    /// The HMAC key, kept as given: the service signs with it.
    pub secret: String,
}

// The secret signs every event: never print it.
impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookEventKind {
    BackupCompleted,
    BackupFailed,
    /// A scheduled verification found a completed backup's data damaged.
    BackupDamaged,
    /// A later verification found a damaged backup good again (a newer
    /// backup stored good copies of its damaged chunks).
    BackupRepaired,
    RestoreCompleted,
    RestoreFailed,
}

impl WebhookEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEventKind::BackupCompleted => "backup.completed",
            WebhookEventKind::BackupFailed => "backup.failed",
            WebhookEventKind::BackupDamaged => "backup.damaged",
            WebhookEventKind::BackupRepaired => "backup.repaired",
            WebhookEventKind::RestoreCompleted => "restore.completed",
            WebhookEventKind::RestoreFailed => "restore.failed",
        }
    }

    pub fn parse(s: &str) -> Option<WebhookEventKind> {
        Some(match s {
            "backup.completed" => WebhookEventKind::BackupCompleted,
            "backup.failed" => WebhookEventKind::BackupFailed,
            "backup.damaged" => WebhookEventKind::BackupDamaged,
            "backup.repaired" => WebhookEventKind::BackupRepaired,
            "restore.completed" => WebhookEventKind::RestoreCompleted,
            "restore.failed" => WebhookEventKind::RestoreFailed,
            _ => return None,
        })
    }
}

/// The object an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookSubject {
    Backup(BackupId),
    Restore(RestoreId),
}

/// A pending event due for delivery, with its account's current endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDelivery {
    /// The event id (`evt_` + 32 hex digits): the `Webhook-Id` receivers dedup on.
    pub id: String,
    pub account_id: AccountId,
    pub kind: WebhookEventKind,
    pub subject: WebhookSubject,
    pub created_at: OffsetDateTime,
    /// Attempts made so far.
    pub attempts: u32,
    /// The body, once frozen by the first attempt.
    pub payload: Option<String>,
    pub webhook: Webhook,
}

/// The result of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookAttempt {
    /// The receiver answered 2xx.
    Delivered,
    /// Try again at `at`.
    Retry { at: OffsetDateTime, error: String },
    /// Attempts used up: give up on this event.
    Failed { error: String },
}
