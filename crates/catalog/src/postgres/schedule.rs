//! [`ScheduleCatalog`] on PostgreSQL. A child of the `postgres` module so it
//! shares its pool, row mappers and error mapping.

use async_trait::async_trait;
use sqlx::Row;
use time::OffsetDateTime;

use super::{backup_from_row, opt_ts, secs, ts, PgCatalog, BACKUP_SELECT};
use crate::model::*;
use crate::schedule::*;
use crate::{Result, WebhookEventKind, WebhookSubject};

#[async_trait]
impl ScheduleCatalog for PgCatalog {
    async fn auto_backup_servers(&self) -> Result<Vec<AutoBackupServer>> {
        self.fetch_auto_backup_servers(None).await
    }

    async fn auto_backup_servers_in(&self, ids: &[ServerId]) -> Result<Vec<AutoBackupServer>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.fetch_auto_backup_servers(Some(ids)).await
    }

    async fn record_slot(&self, server: ServerId, day: OffsetDateTime) -> Result<()> {
        sqlx::query(
            "INSERT INTO auto_backup_slots (server_id, last_slot) VALUES ($1, $2) \
             ON CONFLICT (server_id) DO UPDATE \
               SET last_slot = GREATEST(auto_backup_slots.last_slot, excluded.last_slot)",
        )
        .bind(server.0)
        .bind(secs(day))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn retry_backup(
        &self,
        id: BackupId,
        run_after: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        // The error is cleared while the retry runs: clients read a non-null
        // error as "this backup failed"; the attempt's outcome sets it again.
        // The row update is the guard: of two schedulers retrying at once,
        // one finds the row no longer failed.
        let server: Option<i64> = sqlx::query_scalar(
            "UPDATE backups SET status = 'in_progress', progress = 0, completed_at = NULL, \
               size_mb = NULL, error = NULL \
             WHERE id = $1 AND status = 'failed' RETURNING server_id",
        )
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(server) = server else {
            return Ok(false);
        };
        sqlx::query(
            "INSERT INTO jobs (kind, server_id, backup_id, state, run_after, created_at) \
             VALUES ('backup', $1, $2, 'queued', $3, $4)",
        )
        .bind(server)
        .bind(id.0)
        .bind(secs(run_after))
        .bind(secs(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn expired_backups(&self, now: OffsetDateTime, limit: u32) -> Result<Vec<Backup>> {
        sqlx::query(&format!(
            "{BACKUP_SELECT} WHERE b.backup_type = 'automatic' AND b.expires_at IS NOT NULL \
             AND b.expires_at <= $1 AND b.status <> 'in_progress' \
             ORDER BY b.expires_at, b.id LIMIT $2"
        ))
        .bind(secs(now))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(backup_from_row)
        .collect()
    }

    async fn backups_due_for_verify(
        &self,
        before: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<Backup>> {
        sqlx::query(&format!(
            "{BACKUP_SELECT} WHERE b.status = 'completed' \
             AND (b.verified_at IS NULL OR b.verified_at < $1 \
               OR (b.damaged AND EXISTS (SELECT 1 FROM backups n \
                 WHERE n.server_id = b.server_id AND n.id <> b.id \
                 AND n.status = 'completed' AND n.completed_at >= b.verified_at))) \
             ORDER BY b.verified_at IS NOT NULL, b.verified_at, b.id LIMIT $2"
        ))
        .bind(secs(before))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(backup_from_row)
        .collect()
    }

    async fn record_verification(
        &self,
        id: BackupId,
        at: OffsetDateTime,
        error: Option<&str>,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        // Locked: two verifiers recording at once see each other's verdict,
        // so the change of state (and its event) is written once.
        let was_damaged: Option<bool> =
            sqlx::query_scalar("SELECT damaged FROM backups WHERE id = $1 FOR UPDATE")
                .bind(id.0)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(was_damaged) = was_damaged else {
            return Ok(false);
        };
        sqlx::query(
            "UPDATE backups SET verified_at = $1, damaged = $2, verify_error = $3 WHERE id = $4",
        )
        .bind(secs(at))
        .bind(error.is_some())
        .bind(error)
        .bind(id.0)
        .execute(&mut *tx)
        .await?;
        // Once per change of state, not at every pass.
        let change = match (error.is_some(), was_damaged) {
            (true, false) => Some(WebhookEventKind::BackupDamaged),
            (false, true) => Some(WebhookEventKind::BackupRepaired),
            _ => None,
        };
        if let Some(kind) = change {
            Self::enqueue_event(&mut tx, kind, WebhookSubject::Backup(id), at).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn job_counts(&self, now: OffsetDateTime) -> Result<JobCounts> {
        let row = sqlx::query(
            "SELECT COUNT(*) FILTER (WHERE state = 'queued' AND run_after <= $1) AS queued, \
               COUNT(*) FILTER (WHERE state = 'running') AS running \
             FROM jobs WHERE state IN ('queued', 'running')",
        )
        .bind(secs(now))
        .fetch_one(&self.pool)
        .await?;
        Ok(JobCounts {
            queued_due: row.try_get::<i64, _>("queued")? as u64,
            running: row.try_get::<i64, _>("running")? as u64,
        })
    }

    async fn queue_stats(&self, now: OffsetDateTime) -> Result<QueueStats> {
        // Served by the jobs_queue index (state, run_after, id).
        let rows = sqlx::query(
            "SELECT kind, state, COUNT(*) AS n, \
               MIN(CASE WHEN state = 'queued' AND run_after <= $1 THEN run_after END) AS due_since \
             FROM jobs WHERE state IN ('queued', 'running') GROUP BY kind, state",
        )
        .bind(secs(now))
        .fetch_all(&self.pool)
        .await?;
        let mut stats = QueueStats::default();
        for r in rows {
            stats.add_group(
                r.try_get("kind")?,
                r.try_get("state")?,
                r.try_get::<i64, _>("n")? as u64,
                r.try_get::<Option<i64>, _>("due_since")?.map(ts),
            );
        }
        Ok(stats)
    }

    async fn task_run(&self, name: &str) -> Result<Option<TaskRun>> {
        sqlx::query("SELECT name, last_run, summary FROM scheduler_tasks WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| {
                Ok(TaskRun {
                    name: r.try_get("name")?,
                    last_run: ts(r.try_get("last_run")?),
                    summary: r.try_get("summary")?,
                })
            })
            .transpose()
    }

    async fn record_task_run(&self, name: &str, at: OffsetDateTime, summary: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO scheduler_tasks (name, last_run, summary) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET last_run = excluded.last_run, summary = excluded.summary",
        )
        .bind(name)
        .bind(secs(at))
        .bind(summary)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn claim_gc_turn(&self) -> Result<Option<crate::GcTurn>> {
        // A session of its own, never the pool's: the pool would hand it to
        // other queries, or close it, lock and all.
        let options = crate::leader::keep_alive((*self.pool.connect_options()).clone());
        let mut session = <sqlx::PgConnection as sqlx::Connection>::connect_with(&options).await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(crate::GC_LOCK_KEY)
            .fetch_one(&mut session)
            .await?;
        // Not ours: the connection closes here, with nothing held.
        Ok(got.then(|| crate::GcTurn::held_by(session)))
    }
}

impl PgCatalog {
    /// Servers with their window and latest automatic backup; all of them,
    /// or those in `only`.
    async fn fetch_auto_backup_servers(
        &self,
        only: Option<&[ServerId]>,
    ) -> Result<Vec<AutoBackupServer>> {
        let filter = match only {
            None => "",
            Some(_) => "WHERE s.id = ANY($1)",
        };
        let sql = format!(
            "SELECT s.id, s.name, s.auto_backup_enabled, \
               COALESCE(s.window_start_minute, p.window_start_minute) AS window_start, \
               p.window_minutes, p.retention_days, \
               b.id AS b_id, b.scheduled_for, b.status, b.created_at AS b_created, b.completed_at, \
               (SELECT COUNT(*) FROM jobs j WHERE j.backup_id = b.id AND j.kind = 'backup') AS attempts, \
               abs.last_slot \
             FROM servers s JOIN plans p ON p.id = s.plan_id \
             LEFT JOIN auto_backup_slots abs ON abs.server_id = s.id \
             LEFT JOIN backups b ON b.id = (SELECT b2.id FROM backups b2 \
                 WHERE b2.server_id = s.id AND b2.scheduled_for IS NOT NULL \
                 ORDER BY b2.scheduled_for DESC LIMIT 1) \
             {filter} ORDER BY s.id",
        );
        let mut query = sqlx::query(&sql);
        if let Some(ids) = only {
            query = query.bind(ids.iter().map(|i| i.0).collect::<Vec<i64>>());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let latest = match r.try_get::<Option<i64>, _>("b_id")? {
                    None => None,
                    Some(id) => {
                        let status: String = r.try_get("status")?;
                        Some(AutoBackupSlot {
                            backup_id: BackupId(id),
                            scheduled_for: ts(r.try_get("scheduled_for")?),
                            status: WorkStatus::parse(&status).unwrap_or(WorkStatus::Failed),
                            created_at: ts(r.try_get("b_created")?),
                            completed_at: opt_ts(r.try_get("completed_at")?),
                            attempts: r.try_get::<i64, _>("attempts")? as u32,
                        })
                    }
                };
                let recorded = opt_ts(r.try_get("last_slot")?);
                let last_slot = recorded.max(latest.as_ref().map(|l| l.scheduled_for));
                Ok(AutoBackupServer {
                    server_id: ServerId(r.try_get("id")?),
                    server_name: r.try_get("name")?,
                    auto_backup_enabled: r.try_get("auto_backup_enabled")?,
                    window_start_minute: r.try_get::<i64, _>("window_start")? as u32,
                    window_minutes: r.try_get::<i64, _>("window_minutes")? as u32,
                    retention_days: r.try_get::<i64, _>("retention_days")? as u32,
                    latest,
                    last_slot,
                })
            })
            .collect()
    }
}
