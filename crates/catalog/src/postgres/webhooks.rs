//! The webhook outbox on PostgreSQL. Events are inserted by the transactions
//! that record job outcomes (`enqueue_event`), so an event exists iff its
//! outcome does, whichever process recorded it.

use sqlx::Row;
use time::OffsetDateTime;

use super::{account_from_row, secs, ts, PgCatalog, PgTx, ACCOUNT_COLUMNS};
use crate::{
    Account, AccountId, BackupId, CatalogError, RestoreId, Result, Webhook, WebhookAttempt,
    WebhookDelivery, WebhookEventKind, WebhookSubject,
};

/// Heads of the accounts' queues: the oldest pending event of each account.
const HEAD: &str = "e.state = 'pending' AND e.seq = \
     (SELECT MIN(p.seq) FROM webhook_events p WHERE p.account_id = e.account_id AND p.state = 'pending')";

/// The database's wall clock, unix seconds (claims expire on it).
const WALL: &str = "EXTRACT(EPOCH FROM clock_timestamp())::BIGINT";

/// An event with its account's endpoint (`e` and `a`).
const DELIVERY_COLUMNS: &str =
    "e.id, e.account_id, e.event, e.backup_id, e.restore_id, e.created_at, \
     e.attempts, e.payload, a.webhook_url, a.webhook_secret";

fn deliveries(rows: &[sqlx::postgres::PgRow]) -> Result<Vec<WebhookDelivery>> {
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

impl PgCatalog {
    /// Writes the event of `subject` in `tx` when its account has a webhook.
    pub(super) async fn enqueue_event(
        tx: &mut PgTx,
        kind: WebhookEventKind,
        subject: WebhookSubject,
        now: OffsetDateTime,
    ) -> Result<()> {
        let (table, backup, restore) = match subject {
            WebhookSubject::Backup(b) => ("backups", Some(b.0), None),
            WebhookSubject::Restore(r) => ("restores", None, Some(r.0)),
        };
        let subject_id = backup.or(restore);
        // `evt_` + 32 hex digits, as on SQLite (gen_random_uuid is built in
        // since PostgreSQL 13; its 122 random bits never collide in practice).
        sqlx::query(&format!(
            "INSERT INTO webhook_events (id, account_id, event, backup_id, restore_id, next_attempt_at, created_at) \
             SELECT 'evt_' || replace(gen_random_uuid()::TEXT, '-', ''), a.id, $1, $2, $3, $4, $4 \
             FROM {table} t JOIN accounts a ON a.id = t.account_id \
             WHERE t.id = $5 AND a.webhook_url IS NOT NULL"
        ))
        .bind(kind.as_str())
        .bind(backup)
        .bind(restore)
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
        let row = sqlx::query(&format!(
            "UPDATE accounts SET webhook_url = $1, webhook_secret = $2 WHERE name = $3 \
             RETURNING {ACCOUNT_COLUMNS}"
        ))
        .bind(url)
        .bind(secret)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(CatalogError::NotFound("Account"))?;
        let account = account_from_row(&row)?;
        if webhook.is_none() {
            sqlx::query("DELETE FROM webhook_events WHERE account_id = $1 AND state = 'pending'")
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
            "SELECT {DELIVERY_COLUMNS} \
             FROM webhook_events e JOIN accounts a ON a.id = e.account_id \
             WHERE {HEAD} AND e.next_attempt_at <= $1 AND a.webhook_url IS NOT NULL \
             ORDER BY e.seq LIMIT $2"
        ))
        .bind(secs(now))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        deliveries(&rows)
    }

    pub(super) async fn claim_events(
        &self,
        now: OffsetDateTime,
        limit: u32,
        lease_secs: u32,
    ) -> Result<Vec<WebhookDelivery>> {
        // Every replica drains the outbox: the heads are locked SKIP LOCKED
        // and claimed in one statement, so of two replicas claiming at once
        // each gets other events (a row locked by the other is skipped, and
        // one it claimed and committed meanwhile fails the re-checked
        // `claimed_until` condition). The claim runs on the database's
        // clock, one for every replica, not on `now`: a simulated clock
        // jumping ahead must not expire a claim whose POST is in flight.
        let rows = sqlx::query(&format!(
            "UPDATE webhook_events e SET claimed_until = {WALL} + $3 \
             FROM accounts a \
             WHERE a.id = e.account_id AND e.seq IN ( \
               SELECT e.seq FROM webhook_events e JOIN accounts a ON a.id = e.account_id \
               WHERE {HEAD} AND e.next_attempt_at <= $1 AND a.webhook_url IS NOT NULL \
                 AND (e.claimed_until IS NULL OR e.claimed_until <= {WALL}) \
               ORDER BY e.seq LIMIT $2 FOR UPDATE OF e SKIP LOCKED) \
             RETURNING {DELIVERY_COLUMNS}"
        ))
        .bind(secs(now))
        .bind(limit as i64)
        .bind(i64::from(lease_secs))
        .fetch_all(&self.pool)
        .await?;
        let mut out = deliveries(&rows)?;
        // RETURNING keeps no order.
        out.sort_by_key(|d| d.created_at);
        Ok(out)
    }

    pub(super) async fn next_due(&self) -> Result<Option<OffsetDateTime>> {
        let at: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT MIN(e.next_attempt_at) FROM webhook_events e WHERE {HEAD}"
        ))
        .fetch_one(&self.pool)
        .await?;
        Ok(at.map(ts))
    }

    pub(super) async fn set_payload(&self, id: &str, payload: &str) -> Result<()> {
        sqlx::query("UPDATE webhook_events SET payload = $1 WHERE id = $2 AND payload IS NULL")
            .bind(payload)
            .bind(id)
            .execute(&self.pool)
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
            "UPDATE webhook_events SET state = $1, attempts = attempts + 1, next_attempt_at = $2, \
               last_error = COALESCE($3, last_error), finished_at = $4, claimed_until = NULL \
             WHERE id = $5 AND state = 'pending'",
        )
        .bind(state)
        .bind(secs(next))
        .bind(error)
        .bind(finished)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn purge_events(&self, before: OffsetDateTime) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM webhook_events WHERE state <> 'pending' AND finished_at < $1")
                .bind(secs(before))
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}
