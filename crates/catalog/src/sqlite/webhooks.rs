//! The webhook outbox on SQLite. Events are inserted by the transactions
//! that record job outcomes (`enqueue_event`), so an event exists iff its
//! outcome does; the service's delivery task drains them.

use sqlx::{Row, Sqlite, Transaction};
use time::OffsetDateTime;

use super::{secs, ts, SqliteCatalog};
use crate::{
    Account, AccountId, BackupId, CatalogError, RestoreId, Result, Webhook, WebhookAttempt,
    WebhookDelivery, WebhookEventKind, WebhookSubject,
};

/// Heads of the accounts' queues: the oldest pending event of each account.
const HEAD: &str = "e.state = 'pending' AND e.seq = \
     (SELECT MIN(p.seq) FROM webhook_events p WHERE p.account_id = e.account_id AND p.state = 'pending')";

/// The database's wall clock, unix seconds (claims expire on it).
const WALL: &str = "CAST(strftime('%s', 'now') AS INTEGER)";

/// An event with its account's endpoint.
const DELIVERY_SELECT: &str =
    "SELECT e.id, e.account_id, e.event, e.backup_id, e.restore_id, e.created_at, \
       e.attempts, e.payload, a.webhook_url, a.webhook_secret \
     FROM webhook_events e JOIN accounts a ON a.id = e.account_id";

fn deliveries(rows: &[sqlx::sqlite::SqliteRow]) -> Result<Vec<WebhookDelivery>> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let event: String = r.try_get("event")?;
        let Some(kind) = WebhookEventKind::parse(&event) else {
            continue;
        };
        let backup: Option<i64> = r.try_get("backup_id")?;
        let restore: Option<i64> = r.try_get("restore_id")?;
        let subject = match (restore, backup) {
            (Some(r), _) => WebhookSubject::Restore(RestoreId(r)),
            (None, b) => WebhookSubject::Backup(BackupId(b.unwrap_or(0))),
        };
        out.push(WebhookDelivery {
            id: r.try_get("id")?,
            account_id: AccountId(r.try_get("account_id")?),
            kind,
            subject,
            created_at: ts(r.try_get("created_at")?),
            attempts: r.try_get::<i64, _>("attempts")? as u32,
            payload: r.try_get("payload")?,
            webhook: Webhook {
                url: r.try_get("webhook_url")?,
                secret: r
                    .try_get::<Option<String>, _>("webhook_secret")?
                    .unwrap_or_default(),
            },
        });
    }
    Ok(out)
}

impl SqliteCatalog {
    /// Writes the event of `subject` in `tx` when its account has a webhook.
    pub(super) async fn enqueue_event(
        tx: &mut Transaction<'static, Sqlite>,
        kind: WebhookEventKind,
        subject: WebhookSubject,
        now: OffsetDateTime,
    ) -> Result<()> {
        let (table, backup, restore) = match subject {
            WebhookSubject::Backup(b) => ("backups", Some(b.0), None),
            WebhookSubject::Restore(r) => ("restores", None, Some(r.0)),
        };
        let subject_id = backup.or(restore);
        sqlx::query(&format!(
            "INSERT INTO webhook_events (id, account_id, event, backup_id, restore_id, next_attempt_at, created_at) \
             SELECT 'evt_' || lower(hex(randomblob(16))), a.id, ?, ?, ?, ?, ? \
             FROM {table} t JOIN accounts a ON a.id = t.account_id \
             WHERE t.id = ? AND a.webhook_url IS NOT NULL"
        ))
        .bind(kind.as_str())
        .bind(backup)
        .bind(restore)
        .bind(secs(now))
        .bind(secs(now))
        .bind(subject_id)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    pub(super) async fn set_webhook(
        &self,
        name: &str,
        webhook: Option<Webhook>,
    ) -> Result<Account> {
        let mut tx = self.begin().await?;
        let (url, secret) = match &webhook {
            Some(w) => (Some(w.url.as_str()), Some(w.secret.as_str())),
            None => (None, None),
        };
        let row = sqlx::query(
            "UPDATE accounts SET webhook_url = ?, webhook_secret = ? WHERE name = ? \
             RETURNING id, name, created_at, webhook_url",
        )
        .bind(url)
        .bind(secret)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(CatalogError::NotFound("Account"))?;
        let account = super::account_from_row(&row)?;
        if webhook.is_none() {
            sqlx::query("DELETE FROM webhook_events WHERE account_id = ? AND state = 'pending'")
                .bind(account.id.0)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(account)
    }

    pub(super) async fn due_events(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>> {
        let rows = sqlx::query(&format!(
            "{DELIVERY_SELECT} WHERE {HEAD} AND e.next_attempt_at <= ? AND a.webhook_url IS NOT NULL \
             ORDER BY e.seq LIMIT ?"
        ))
        .bind(secs(now))
        .bind(limit as i64)
        .fetch_all(&self.read)
        .await?;
        deliveries(&rows)
    }

    pub(super) async fn claim_events(
        &self,
        now: OffsetDateTime,
        limit: u32,
        lease_secs: u32,
    ) -> Result<Vec<WebhookDelivery>> {
        // One writer (BEGIN IMMEDIATE): the read and the claim are one step
        // for every process on this file. The claim runs on the database's
        // wall clock, not `now`: a simulated clock jumping ahead must not
        // expire a claim whose POST is still in flight.
        let mut tx = self.begin().await?;
        let rows = sqlx::query(&format!(
            "{DELIVERY_SELECT} WHERE {HEAD} AND e.next_attempt_at <= ? AND a.webhook_url IS NOT NULL \
               AND (e.claimed_until IS NULL OR e.claimed_until <= {WALL}) \
             ORDER BY e.seq LIMIT ?"
        ))
        .bind(secs(now))
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await?;
        let out = deliveries(&rows)?;
        for d in &out {
            sqlx::query(&format!(
                "UPDATE webhook_events SET claimed_until = {WALL} + ? WHERE id = ?"
            ))
            .bind(i64::from(lease_secs))
            .bind(&d.id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    pub(super) async fn next_due(&self) -> Result<Option<OffsetDateTime>> {
        let at: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT MIN(e.next_attempt_at) FROM webhook_events e WHERE {HEAD}"
        ))
        .fetch_one(&self.read)
        .await?;
        Ok(at.map(ts))
    }

    pub(super) async fn set_payload(&self, id: &str, payload: &str) -> Result<()> {
        sqlx::query("UPDATE webhook_events SET payload = ? WHERE id = ? AND payload IS NULL")
            .bind(payload)
            .bind(id)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    pub(super) async fn record_attempt(
        &self,
        id: &str,
        attempt: WebhookAttempt,
        now: OffsetDateTime,
    ) -> Result<()> {
        let (state, next, error, finished) = match &attempt {
            WebhookAttempt::Delivered => ("delivered", now, None, Some(secs(now))),
            WebhookAttempt::Retry { at, error } => ("pending", *at, Some(error.as_str()), None),
            WebhookAttempt::Failed { error } => {
                ("failed", now, Some(error.as_str()), Some(secs(now)))
            }
        };
        sqlx::query(
            "UPDATE webhook_events SET state = ?, attempts = attempts + 1, next_attempt_at = ?, \
               last_error = COALESCE(?, last_error), finished_at = ?, claimed_until = NULL \
             WHERE id = ? AND state = 'pending'",
        )
        .bind(state)
        .bind(secs(next))
        .bind(error)
        .bind(finished)
        .bind(id)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    pub(super) async fn purge_events(&self, before: OffsetDateTime) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM webhook_events WHERE state <> 'pending' AND finished_at < ?")
                .bind(secs(before))
                .execute(&self.write)
                .await?
                .rows_affected(),
        )
    }
}
