//! The SQLite catalog: one file in the data dir, WAL mode, migrations from
//! `migrations/sqlite` applied at open.
//!
//! Two pools: one writer connection (SQLite has one writer at a time anyway;
//! queueing writes in the pool is cheaper than spinning on `SQLITE_BUSY`) and
//! a few readers that WAL lets run beside it. Multi-step writes start with
//! `BEGIN IMMEDIATE`, so they take the write lock before their first read and
//! a check-then-insert (the manual backup limit) cannot race another process
//! such as the `vpsbackup` command line working on the same file.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use time::OffsetDateTime;

use crate::error::map_db_error;
use crate::model::*;
use crate::webhook::*;
use crate::{
    Catalog, CatalogError, IdempotencyClaim, IdempotentRequest, Result, StoredResponse, TaskRun,
};

// Idempotency keys of create requests.
mod idempotency;
// Backup rows rebuilt from the store's manifests.
mod import;
// The per-request hot reads, inline on rusqlite.
mod reader;
// The scheduler's queries (issue 4), in their own file.
mod schedule;
// The webhook outbox.
mod webhooks;

/// The catalog in one SQLite file.
#[derive(Clone, Debug)]
pub struct SqliteCatalog {
    write: SqlitePool,
    read: SqlitePool,
    /// The per-request hot reads, inline on rusqlite (see `reader`).
    inline: std::sync::Arc<reader::InlineReader>,
    /// The threads those reads run on inside the service (started on first use).
    read_threads: std::sync::Arc<std::sync::OnceLock<reader::ReadThreads>>,
}

const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

fn ts(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn opt_ts(secs: Option<i64>) -> Option<OffsetDateTime> {
    secs.map(ts)
}

fn secs(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

const BACKUP_SELECT: &str = "SELECT b.id, b.server_id, s.name AS server_name, b.account_id, \
     b.backup_type, b.status, b.description, b.created_at, b.expires_at, b.completed_at, \
     b.size_mb, b.stored_bytes, b.progress, b.error, b.engine_backup_id, b.scheduled_for, \
     b.verified_at, b.damaged, b.verify_error, b.incremental, b.bytes_read, b.full_reason, \
     b.consistency \
     FROM backups b JOIN servers s ON s.id = b.server_id";

fn backup_from_row(r: &SqliteRow) -> Result<Backup> {
    let id = BackupId(r.try_get("id")?);
    let backup_type: String = r.try_get("backup_type")?;
    let status: String = r.try_get("status")?;
    let engine_id: Option<String> = r.try_get("engine_backup_id")?;
    Ok(Backup {
        id,
        server_id: ServerId(r.try_get("server_id")?),
        server_name: r.try_get("server_name")?,
        account_id: AccountId(r.try_get("account_id")?),
        backup_type: BackupType::parse(&backup_type).unwrap_or(BackupType::Manual),
        status: WorkStatus::parse(&status).unwrap_or(WorkStatus::Failed),
        description: r.try_get("description")?,
        created_at: ts(r.try_get("created_at")?),
        expires_at: opt_ts(r.try_get("expires_at")?),
        completed_at: opt_ts(r.try_get("completed_at")?),
        size_mb: r.try_get::<Option<i64>, _>("size_mb")?.map(|v| v as u64),
        stored_bytes: r
            .try_get::<Option<i64>, _>("stored_bytes")?
            .map(|v| v as u64),
        progress: r.try_get::<i64, _>("progress")?.clamp(0, 100) as u8,
        error: r.try_get("error")?,
        engine_backup_id: engine_id.unwrap_or_else(|| engine_backup_id(id)),
        scheduled_for: opt_ts(r.try_get("scheduled_for")?),
        verified_at: opt_ts(r.try_get("verified_at")?),
        damaged: r.try_get::<i64, _>("damaged")? != 0,
        verify_error: r.try_get("verify_error")?,
        read: backup_read(
            r.try_get::<i64, _>("incremental")? != 0,
            r.try_get("bytes_read")?,
            r.try_get("full_reason")?,
            r.try_get("consistency")?,
        ),
    })
}

const RESTORE_SELECT: &str = "SELECT r.id, r.server_id, s.name AS server_name, r.account_id, \
     r.backup_id, r.status, r.progress, r.created_at, r.completed_at, r.error \
     FROM restores r JOIN servers s ON s.id = r.server_id";

fn restore_from_row(r: &SqliteRow) -> Result<Restore> {
    let status: String = r.try_get("status")?;
    Ok(Restore {
        id: RestoreId(r.try_get("id")?),
        server_id: ServerId(r.try_get("server_id")?),
        server_name: r.try_get("server_name")?,
        account_id: AccountId(r.try_get("account_id")?),
        backup_id: BackupId(r.try_get("backup_id")?),
        status: WorkStatus::parse(&status).unwrap_or(WorkStatus::Failed),
        progress: r.try_get::<i64, _>("progress")?.clamp(0, 100) as u8,
        created_at: ts(r.try_get("created_at")?),
        completed_at: opt_ts(r.try_get("completed_at")?),
        error: r.try_get("error")?,
    })
}

const PLAN_COLUMNS: &str =
    "id, name, retention_days, window_start_minute, window_minutes, created_at, updated_at";

fn plan_from_row(r: &SqliteRow, prefix: &str) -> Result<Plan> {
    let col = |c: &str| format!("{prefix}{c}");
    Ok(Plan {
        id: PlanId(r.try_get(col("id").as_str())?),
        name: r.try_get(col("name").as_str())?,
        retention_days: r.try_get::<i64, _>(col("retention_days").as_str())? as u32,
        window_start_minute: r.try_get::<i64, _>(col("window_start_minute").as_str())? as u32,
        window_minutes: r.try_get::<i64, _>(col("window_minutes").as_str())? as u32,
        created_at: ts(r.try_get(col("created_at").as_str())?),
        updated_at: ts(r.try_get(col("updated_at").as_str())?),
    })
}

const SERVER_SELECT: &str = "SELECT s.id, s.name, s.hostname, s.account_id, a.name AS account_name, \
     s.auto_backup_enabled, s.window_start_minute, s.hook_pre_backup, s.hook_post_backup, \
     s.hook_pre_restore, s.hook_post_restore, s.created_at, s.updated_at, \
     s.runtime, s.qmp_socket, s.libvirt_domain, s.guest_agent, s.node, \
     p.id AS p_id, p.name AS p_name, p.retention_days AS p_retention_days, \
     p.window_start_minute AS p_window_start_minute, p.window_minutes AS p_window_minutes, \
     p.created_at AS p_created_at, p.updated_at AS p_updated_at, \
     (SELECT j.kind FROM jobs j WHERE j.server_id = s.id AND j.state = 'running' LIMIT 1) AS running_kind, \
     (SELECT COUNT(*) FROM backups b WHERE b.server_id = s.id AND b.backup_type = 'manual' \
        AND b.status IN ('in_progress', 'completed')) AS manual_used \
     FROM servers s JOIN accounts a ON a.id = s.account_id JOIN plans p ON p.id = s.plan_id";

/// A qemu runtime needs its QMP socket, a libvirt one its domain.
fn check_runtime(runtime: &ServerRuntime) -> Result<()> {
    match runtime {
        ServerRuntime::Qemu { qmp_socket, .. } if qmp_socket.trim().is_empty() => Err(
            CatalogError::Invalid("A qemu runtime needs the path of its QMP socket.".into()),
        ),
        ServerRuntime::Libvirt { domain } if domain.trim().is_empty() => Err(
            CatalogError::Invalid("A libvirt runtime needs a domain name.".into()),
        ),
        _ => Ok(()),
    }
}

fn server_from_row(r: &SqliteRow, disks: Vec<ServerDisk>) -> Result<Server> {
    let running: Option<String> = r.try_get("running_kind")?;
    Ok(Server {
        id: ServerId(r.try_get("id")?),
        name: r.try_get("name")?,
        hostname: r.try_get("hostname")?,
        account_id: AccountId(r.try_get("account_id")?),
        account_name: r.try_get("account_name")?,
        plan: plan_from_row(r, "p_")?,
        disks,
        auto_backup_enabled: r.try_get::<i64, _>("auto_backup_enabled")? != 0,
        window_start_minute: r
            .try_get::<Option<i64>, _>("window_start_minute")?
            .map(|v| v as u32),
        hooks: Hooks {
            pre_backup: r.try_get("hook_pre_backup")?,
            post_backup: r.try_get("hook_post_backup")?,
            pre_restore: r.try_get("hook_pre_restore")?,
            post_restore: r.try_get("hook_post_restore")?,
        },
        runtime: {
            let kind: String = r.try_get("runtime")?;
            ServerRuntime::from_parts(
                &kind,
                r.try_get("qmp_socket")?,
                r.try_get("libvirt_domain")?,
                r.try_get("guest_agent")?,
            )
            .ok_or_else(|| {
                CatalogError::Invalid(format!(
                    "Server runtime {kind:?} lacks its socket or domain."
                ))
            })?
        },
        node: r.try_get("node")?,
        status: match running.as_deref() {
            Some("backup") => ServerStatus::BackingUp,
            Some("restore") => ServerStatus::Restoring,
            _ => ServerStatus::Active,
        },
        manual_backups_used: r.try_get::<i64, _>("manual_used")? as u32,
        created_at: ts(r.try_get("created_at")?),
        updated_at: ts(r.try_get("updated_at")?),
    })
}

const JOB_COLUMNS: &str = "id, kind, server_id, backup_id, restore_id, state, attempts, \
     max_attempts, claimed_by, heartbeat_at, created_at, error, error_detail, finished_at, \
     node, lease_expires_at";

fn job_from_row(r: &SqliteRow) -> Result<Job> {
    let kind: String = r.try_get("kind")?;
    let state: String = r.try_get("state")?;
    Ok(Job {
        id: JobId(r.try_get("id")?),
        kind: if kind == "restore" {
            JobKind::Restore
        } else {
            JobKind::Backup
        },
        server_id: ServerId(r.try_get::<Option<i64>, _>("server_id")?.unwrap_or(0)),
        backup_id: BackupId(r.try_get::<Option<i64>, _>("backup_id")?.unwrap_or(0)),
        restore_id: r.try_get::<Option<i64>, _>("restore_id")?.map(RestoreId),
        state: JobState::parse(&state).unwrap_or(JobState::Failed),
        attempts: r.try_get::<i64, _>("attempts")? as u32,
        max_attempts: r.try_get::<i64, _>("max_attempts")? as u32,
        claimed_by: r.try_get("claimed_by")?,
        heartbeat_at: opt_ts(r.try_get("heartbeat_at")?),
        created_at: ts(r.try_get("created_at")?),
        error: r.try_get("error")?,
        error_detail: r.try_get("error_detail")?,
        finished_at: opt_ts(r.try_get("finished_at")?),
        node: r.try_get("node")?,
        lease_expires_at: opt_ts(r.try_get("lease_expires_at")?),
    })
}

const TOKEN_SELECT: &str =
    "SELECT t.id, t.token_hash, t.prefix, t.name, t.account_id, t.is_admin, \
     a.name AS account_name, t.created_at, t.revoked_at \
     FROM api_tokens t LEFT JOIN accounts a ON a.id = t.account_id";

fn token_from_row(r: &SqliteRow) -> Result<ApiToken> {
    let hash_vec: Vec<u8> = r.try_get("token_hash")?;
    let mut hash = [0u8; 32];
    if hash_vec.len() == 32 {
        hash.copy_from_slice(&hash_vec);
    }
    let account: Option<i64> = r.try_get("account_id")?;
    let admin = r.try_get::<i64, _>("is_admin")? != 0;
    Ok(ApiToken {
        id: TokenId(r.try_get("id")?),
        hash,
        prefix: r.try_get("prefix")?,
        name: r.try_get("name")?,
        owner: match (admin, account) {
            (false, Some(a)) => TokenOwner::Account(AccountId(a)),
            _ => TokenOwner::Admin,
        },
        account_name: r.try_get("account_name")?,
        created_at: ts(r.try_get("created_at")?),
        revoked_at: opt_ts(r.try_get("revoked_at")?),
    })
}

fn account_from_row(r: &SqliteRow) -> Result<Account> {
    Ok(Account {
        id: AccountId(r.try_get("id")?),
        name: r.try_get("name")?,
        created_at: ts(r.try_get("created_at")?),
        webhook_url: r.try_get("webhook_url")?,
    })
}

fn offset(page: PageRequest) -> i64 {
    (page.number.max(1) as i64 - 1) * page.size as i64
}

impl SqliteCatalog {
    /// Opens (creating if needed) the catalog file and applies migrations.
    pub async fn open(path: &Path) -> Result<SqliteCatalog> {
        Self::open_with_readers(path, 4).await
    }

    /// Like [`SqliteCatalog::open`] with `readers` connections for reads.
    pub async fn open_with_readers(path: &Path, readers: u32) -> Result<SqliteCatalog> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL with NORMAL: a commit is durable once the WAL is synced at
            // checkpoint; a power cut may lose the last commits but never
            // corrupts the file, and commits stay well under a millisecond.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(readers.max(1))
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.pragma("query_only", "ON"))
            .await?;
        Ok(SqliteCatalog {
            write,
            read,
            inline: std::sync::Arc::new(reader::InlineReader::new(path)),
            read_threads: Default::default(),
        })
    }

    /// Closes both pools, checkpointing the WAL.
    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }

    /// The read-only pool (`catalog migrate` reads the whole catalog from it).
    pub(crate) fn read_pool(&self) -> &SqlitePool {
        &self.read
    }

    async fn begin(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.write.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Runs raw SQL on the writer. For tests and the benchmark seeder, which
    /// need to put the catalog in states the API cannot reach quickly.
    pub async fn execute_raw(&self, sql: &str) -> Result<u64> {
        Ok(sqlx::raw_sql(sql)
            .execute(&self.write)
            .await?
            .rows_affected())
    }

    async fn disks_of(
        &self,
        ids: &[i64],
    ) -> Result<std::collections::HashMap<i64, Vec<ServerDisk>>> {
        let mut map: std::collections::HashMap<i64, Vec<ServerDisk>> = Default::default();
        if ids.is_empty() {
            return Ok(map);
        }
        let placeholders = vec!["?"; ids.len()].join(",");
        let sql = format!(
            "SELECT server_id, path, format FROM server_disks WHERE server_id IN ({placeholders}) ORDER BY server_id, idx"
        );
        let mut q = sqlx::query(&sql);
        for id in ids {
            q = q.bind(id);
        }
        for r in q.fetch_all(&self.read).await? {
            // The column's CHECK admits only names `parse` knows.
            let format: Option<String> = r.try_get("format")?;
            let format = format.as_deref().and_then(ImageFormat::parse);
            map.entry(r.try_get("server_id")?)
                .or_default()
                .push(ServerDisk {
                    path: r.try_get("path")?,
                    format,
                });
        }
        Ok(map)
    }

    async fn server_in(
        tx: &mut Transaction<'static, Sqlite>,
        id: ServerId,
        scope: Scope,
    ) -> Result<Option<(i64, i64)>> {
        let row = sqlx::query("SELECT id, account_id, plan_id FROM servers WHERE id = ?")
            .bind(id.0)
            .fetch_optional(&mut **tx)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let account: i64 = row.try_get("account_id")?;
        if let Scope::Account(a) = scope {
            if a.0 != account {
                return Ok(None);
            }
        }
        Ok(Some((account, row.try_get("plan_id")?)))
    }

    async fn backup_tx(tx: &mut Transaction<'static, Sqlite>, id: i64) -> Result<Backup> {
        let row = sqlx::query(&format!("{BACKUP_SELECT} WHERE b.id = ?"))
            .bind(id)
            .fetch_one(&mut **tx)
            .await?;
        backup_from_row(&row)
    }

    async fn server_busy(tx: &mut Transaction<'static, Sqlite>, id: ServerId) -> Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE server_id = ? AND state IN ('queued', 'running') \
             AND kind IN ('backup', 'restore')",
        )
        .bind(id.0)
        .fetch_one(&mut **tx)
        .await?;
        Ok(n > 0)
    }

    /// Re-derives `expires_at` of automatic backups from their plan's retention.
    async fn reapply_retention(
        tx: &mut Transaction<'static, Sqlite>,
        plan: Option<i64>,
        server: Option<i64>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE backups SET expires_at = created_at + 86400 * \
               (SELECT p.retention_days FROM servers s JOIN plans p ON p.id = s.plan_id WHERE s.id = backups.server_id) \
             WHERE backup_type = 'automatic' AND server_id IN \
               (SELECT id FROM servers WHERE (?1 IS NULL OR plan_id = ?1) AND (?2 IS NULL OR id = ?2))",
        )
        .bind(plan)
        .bind(server)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

impl SqliteCatalog {
    /// Requeues or fails the running jobs matching `stale` (a condition
    /// with one placeholder, bound to `bound`): the one path of stale-job
    /// recovery and lease expiry.
    async fn recover_where(
        &self,
        stale: &str,
        bound: i64,
        now: OffsetDateTime,
    ) -> Result<Vec<RecoveredJob>> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'running' \
             AND {stale} ORDER BY id"
        ))
        .bind(bound)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::new();
        for r in &rows {
            let job = job_from_row(r)?;
            let (table, target) = job.target();
            let requeue = job.requeued_when_lost();
            if requeue {
                sqlx::query(
                    "UPDATE jobs SET state = 'queued', claimed_by = NULL, heartbeat_at = NULL, lease_expires_at = NULL, run_after = ? \
                     WHERE id = ?",
                )
                .bind(secs(now))
                .bind(job.id.0)
                .execute(&mut *tx)
                .await?;
                sqlx::query(&format!(
                    "UPDATE {table} SET progress = 0 WHERE id = ? AND status = 'in_progress'"
                ))
                .bind(target)
                .execute(&mut *tx)
                .await?;
            } else {
                let reason = job.lost_reason();
                sqlx::query(
                    "UPDATE jobs SET state = 'failed', error = ?, finished_at = ? WHERE id = ?",
                )
                .bind(&reason)
                .bind(secs(now))
                .bind(job.id.0)
                .execute(&mut *tx)
                .await?;
                let failed = sqlx::query(&format!(
                    "UPDATE {table} SET status = 'failed', error = ?, completed_at = ? \
                     WHERE id = ? AND status = 'in_progress'"
                ))
                .bind(&reason)
                .bind(secs(now))
                .bind(target)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if let (1.., Some((event, subject))) = (failed, job.failure_event()) {
                    Self::enqueue_event(&mut tx, event, subject, now).await?;
                }
            }
            out.push(RecoveredJob {
                job: job.id,
                kind: job.kind,
                backup_id: job.backup_id,
                requeued: requeue,
            });
        }
        tx.commit().await?;
        Ok(out)
    }
}

#[async_trait]
impl Catalog for SqliteCatalog {
    async fn create_account(&self, name: &str, now: OffsetDateTime) -> Result<Account> {
        let row = sqlx::query(
            "INSERT INTO accounts (name, created_at) VALUES (?, ?) RETURNING id, name, created_at, webhook_url",
        )
        .bind(name)
        .bind(secs(now))
        .fetch_one(&self.write)
        .await
        .map_err(|e| map_db_error(e, &format!("An account named {name:?} already exists.")))?;
        account_from_row(&row)
    }

    async fn account(&self, id: AccountId) -> Result<Option<Account>> {
        sqlx::query("SELECT id, name, created_at, webhook_url FROM accounts WHERE id = ?")
            .bind(id.0)
            .fetch_optional(&self.read)
            .await?
            .map(|r| account_from_row(&r))
            .transpose()
    }

    async fn account_by_name(&self, name: &str) -> Result<Option<Account>> {
        sqlx::query("SELECT id, name, created_at, webhook_url FROM accounts WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.read)
            .await?
            .map(|r| account_from_row(&r))
            .transpose()
    }

    async fn list_accounts(&self) -> Result<Vec<Account>> {
        sqlx::query("SELECT id, name, created_at, webhook_url FROM accounts ORDER BY id")
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(account_from_row)
            .collect()
    }

    async fn set_account_webhook(&self, name: &str, webhook: Option<Webhook>) -> Result<Account> {
        self.set_webhook(name, webhook).await
    }

    async fn create_token(&self, token: NewToken, now: OffsetDateTime) -> Result<ApiToken> {
        let (account, admin) = match token.owner {
            TokenOwner::Account(a) => (Some(a.0), 0),
            TokenOwner::Admin => (None, 1),
        };
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO api_tokens (token_hash, prefix, name, account_id, is_admin, created_at) \
             VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(&token.hash[..])
        .bind(&token.prefix)
        .bind(&token.name)
        .bind(account)
        .bind(admin)
        .bind(secs(now))
        .fetch_one(&self.write)
        .await
        .map_err(|e| map_db_error(e, "This token already exists."))?;
        let row = sqlx::query(&format!("{TOKEN_SELECT} WHERE t.id = ?"))
            .bind(id)
            .fetch_one(&self.write)
            .await?;
        token_from_row(&row)
    }

    async fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiToken>> {
        let hash = *hash;
        reader::off_runtime(&self.inline, &self.read_threads, move |r| {
            r.token_by_hash(&hash)
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<ApiToken>> {
        sqlx::query(&format!("{TOKEN_SELECT} ORDER BY t.id"))
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(token_from_row)
            .collect()
    }

    async fn revoke_token(&self, which: TokenRef, now: OffsetDateTime) -> Result<bool> {
        let q = match &which {
            TokenRef::Id(id) => sqlx::query(
                "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            )
            .bind(secs(now))
            .bind(id.0),
            TokenRef::Hash(h) => sqlx::query(
                "UPDATE api_tokens SET revoked_at = ? WHERE token_hash = ? AND revoked_at IS NULL",
            )
            .bind(secs(now))
            .bind(&h[..]),
        };
        Ok(q.execute(&self.write).await?.rows_affected() > 0)
    }

    async fn create_plan(&self, plan: NewPlan, now: OffsetDateTime) -> Result<Plan> {
        if !(7..=30).contains(&plan.retention_days) {
            return Err(CatalogError::Invalid(format!(
                "Retention must be between 7 and 30 days, not {}.",
                plan.retention_days
            )));
        }
        let row = sqlx::query(&format!(
            "INSERT INTO plans (name, retention_days, window_start_minute, window_minutes, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?) RETURNING {PLAN_COLUMNS}"
        ))
        .bind(&plan.name)
        .bind(plan.retention_days as i64)
        .bind(plan.window_start_minute as i64)
        .bind(plan.window_minutes as i64)
        .bind(secs(now))
        .bind(secs(now))
        .fetch_one(&self.write)
        .await
        .map_err(|e| map_db_error(e, &format!("A plan named {:?} already exists.", plan.name)))?;
        plan_from_row(&row, "")
    }

    async fn update_plan(
        &self,
        name: &str,
        update: PlanUpdate,
        now: OffsetDateTime,
    ) -> Result<Plan> {
        if let Some(d) = update.retention_days {
            if !(7..=30).contains(&d) {
                return Err(CatalogError::Invalid(format!(
                    "Retention must be between 7 and 30 days, not {d}."
                )));
            }
        }
        let mut tx = self.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE plans SET retention_days = COALESCE(?, retention_days), \
               window_start_minute = COALESCE(?, window_start_minute), \
               window_minutes = COALESCE(?, window_minutes), updated_at = ? \
             WHERE name = ? RETURNING {PLAN_COLUMNS}"
        ))
        .bind(update.retention_days.map(|v| v as i64))
        .bind(update.window_start_minute.map(|v| v as i64))
        .bind(update.window_minutes.map(|v| v as i64))
        .bind(secs(now))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| map_db_error(e, "conflict"))?
        .ok_or(CatalogError::NotFound("Plan"))?;
        let plan = plan_from_row(&row, "")?;
        if update.retention_days.is_some() {
            Self::reapply_retention(&mut tx, Some(plan.id.0), None).await?;
        }
        tx.commit().await?;
        Ok(plan)
    }

    async fn plan(&self, id: PlanId) -> Result<Option<Plan>> {
        sqlx::query(&format!("SELECT {PLAN_COLUMNS} FROM plans WHERE id = ?"))
            .bind(id.0)
            .fetch_optional(&self.read)
            .await?
            .map(|r| plan_from_row(&r, ""))
            .transpose()
    }

    async fn plan_by_name(&self, name: &str) -> Result<Option<Plan>> {
        sqlx::query(&format!("SELECT {PLAN_COLUMNS} FROM plans WHERE name = ?"))
            .bind(name)
            .fetch_optional(&self.read)
            .await?
            .map(|r| plan_from_row(&r, ""))
            .transpose()
    }

    async fn list_plans(&self) -> Result<Vec<Plan>> {
        sqlx::query(&format!(
            "SELECT {PLAN_COLUMNS} FROM plans ORDER BY retention_days, id"
        ))
        .fetch_all(&self.read)
        .await?
        .iter()
        .map(|r| plan_from_row(r, ""))
        .collect()
    }

    async fn add_server(&self, server: NewServer, now: OffsetDateTime) -> Result<Server> {
        if server.id.0 <= 0 {
            return Err(CatalogError::Invalid(
                "A server id must be a positive integer.".into(),
            ));
        }
        if server.disks.is_empty() {
            return Err(CatalogError::Invalid(
                "A server needs at least one disk.".into(),
            ));
        }
        check_runtime(&server.runtime)?;
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO servers (id, name, hostname, account_id, plan_id, hook_pre_backup, \
               hook_post_backup, hook_pre_restore, hook_post_restore, created_at, updated_at, \
               runtime, qmp_socket, libvirt_domain, guest_agent, node) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(server.id.0)
        .bind(&server.name)
        .bind(&server.hostname)
        .bind(server.account_id.0)
        .bind(server.plan_id.0)
        .bind(&server.hooks.pre_backup)
        .bind(&server.hooks.post_backup)
        .bind(&server.hooks.pre_restore)
        .bind(&server.hooks.post_restore)
        .bind(secs(now))
        .bind(secs(now))
        .bind(server.runtime.kind())
        .bind(server.runtime.qmp_socket())
        .bind(server.runtime.domain())
        .bind(server.runtime.guest_agent())
        .bind(&server.node)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            map_db_error(
                e,
                &format!("A server with id {} already exists.", server.id),
            )
        })?;
        for (i, disk) in server.disks.iter().enumerate() {
            sqlx::query(
                "INSERT INTO server_disks (server_id, idx, path, format) VALUES (?, ?, ?, ?)",
            )
            .bind(server.id.0)
            .bind(i as i64)
            .bind(&disk.path)
            .bind(disk.format.map(ImageFormat::as_str))
            .execute(&mut *tx)
            .await
            .map_err(|e| map_db_error(e, "The same disk is listed twice."))?;
        }
        tx.commit().await?;
        self.server(server.id, Scope::All)
            .await?
            .ok_or(CatalogError::NotFound("Server"))
    }

    async fn update_server(
        &self,
        id: ServerId,
        update: ServerUpdate,
        now: OffsetDateTime,
    ) -> Result<Server> {
        if let Some(runtime) = &update.runtime {
            check_runtime(runtime)?;
        }
        let mut tx = self.begin().await?;
        if Self::server_in(&mut tx, id, Scope::All).await?.is_none() {
            return Err(CatalogError::NotFound("Server"));
        }
        let (set_window, window) = match update.window_start_minute {
            Some(w) => (1, w.map(|v| v as i64)),
            None => (0, None),
        };
        let hooks = &update.hooks;
        let set = |h: &Option<Option<String>>| i64::from(h.is_some());
        let value = |h: &Option<Option<String>>| h.clone().flatten();
        sqlx::query(
            "UPDATE servers SET name = COALESCE(?1, name), hostname = COALESCE(?2, hostname), \
               plan_id = COALESCE(?3, plan_id), auto_backup_enabled = COALESCE(?4, auto_backup_enabled), \
               window_start_minute = CASE WHEN ?5 = 1 THEN ?6 ELSE window_start_minute END, \
               hook_pre_backup = CASE WHEN ?7 = 1 THEN ?8 ELSE hook_pre_backup END, \
               hook_post_backup = CASE WHEN ?9 = 1 THEN ?10 ELSE hook_post_backup END, \
               hook_pre_restore = CASE WHEN ?11 = 1 THEN ?12 ELSE hook_pre_restore END, \
               hook_post_restore = CASE WHEN ?13 = 1 THEN ?14 ELSE hook_post_restore END, \
               runtime = COALESCE(?17, runtime), \
               qmp_socket = CASE WHEN ?17 IS NULL THEN qmp_socket ELSE ?18 END, \
               libvirt_domain = CASE WHEN ?17 IS NULL THEN libvirt_domain ELSE ?19 END, \
               guest_agent = CASE WHEN ?17 IS NULL THEN guest_agent ELSE ?20 END, \
               node = COALESCE(?21, node), \
               updated_at = ?15 WHERE id = ?16",
        )
        .bind(&update.name)
        .bind(&update.hostname)
        .bind(update.plan_id.map(|p| p.0))
        .bind(update.auto_backup_enabled.map(i64::from))
        .bind(set_window)
        .bind(window)
        .bind(set(&hooks.pre_backup))
        .bind(value(&hooks.pre_backup))
        .bind(set(&hooks.post_backup))
        .bind(value(&hooks.post_backup))
        .bind(set(&hooks.pre_restore))
        .bind(value(&hooks.pre_restore))
        .bind(set(&hooks.post_restore))
        .bind(value(&hooks.post_restore))
        .bind(secs(now))
        .bind(id.0)
        .bind(update.runtime.as_ref().map(ServerRuntime::kind))
        .bind(update.runtime.as_ref().and_then(ServerRuntime::qmp_socket))
        .bind(update.runtime.as_ref().and_then(ServerRuntime::domain))
        .bind(update.runtime.as_ref().and_then(ServerRuntime::guest_agent))
        .bind(&update.node)
        .execute(&mut *tx)
        .await
        .map_err(|e| map_db_error(e, "conflict"))?;
        if let Some(disks) = &update.disks {
            if disks.is_empty() {
                return Err(CatalogError::Invalid(
                    "A server needs at least one disk.".into(),
                ));
            }
            sqlx::query("DELETE FROM server_disks WHERE server_id = ?")
                .bind(id.0)
                .execute(&mut *tx)
                .await?;
            for (i, disk) in disks.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO server_disks (server_id, idx, path, format) VALUES (?, ?, ?, ?)",
                )
                .bind(id.0)
                .bind(i as i64)
                .bind(&disk.path)
                .bind(disk.format.map(ImageFormat::as_str))
                .execute(&mut *tx)
                .await
                .map_err(|e| map_db_error(e, "The same disk is listed twice."))?;
            }
        }
        if update.plan_id.is_some() {
            Self::reapply_retention(&mut tx, None, Some(id.0)).await?;
        }
        tx.commit().await?;
        self.server(id, Scope::All)
            .await?
            .ok_or(CatalogError::NotFound("Server"))
    }

    async fn remove_server(&self, id: ServerId, purge: bool) -> Result<Vec<Backup>> {
        let mut tx = self.begin().await?;
        if Self::server_in(&mut tx, id, Scope::All).await?.is_none() {
            return Err(CatalogError::NotFound("Server"));
        }
        if Self::server_busy(&mut tx, id).await? {
            return Err(CatalogError::Busy(format!(
                "Server {id} has a backup or restore queued or running; remove it when that has finished."
            )));
        }
        let rows = sqlx::query(&format!(
            "{BACKUP_SELECT} WHERE b.server_id = ? ORDER BY b.id"
        ))
        .bind(id.0)
        .fetch_all(&mut *tx)
        .await?;
        let backups = rows
            .iter()
            .map(backup_from_row)
            .collect::<Result<Vec<_>>>()?;
        if !backups.is_empty() && !purge {
            return Err(CatalogError::Conflict(format!(
                "Server {id} still has {} backups; pass --purge to delete them with the server.",
                backups.len()
            )));
        }
        sqlx::query("DELETE FROM servers WHERE id = ?")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(backups)
    }

    async fn record_disk_format(
        &self,
        id: ServerId,
        disk: usize,
        format: ImageFormat,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE server_disks SET format = ? WHERE server_id = ? AND idx = ? AND format IS NULL",
        )
        .bind(format.as_str())
        .bind(id.0)
        .bind(disk as i64)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn server(&self, id: ServerId, scope: Scope) -> Result<Option<Server>> {
        let row = sqlx::query(&format!(
            "{SERVER_SELECT} WHERE s.id = ?1 AND (?2 IS NULL OR s.account_id = ?2)"
        ))
        .bind(id.0)
        .bind(scope.account().map(|a| a.0))
        .fetch_optional(&self.read)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut disks = self.disks_of(&[id.0]).await?;
        Ok(Some(server_from_row(
            &row,
            disks.remove(&id.0).unwrap_or_default(),
        )?))
    }

    async fn list_servers(&self, scope: Scope, page: PageRequest) -> Result<Paged<Server>> {
        let account = scope.account().map(|a| a.0);
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM servers WHERE ?1 IS NULL OR account_id = ?1")
                .bind(account)
                .fetch_one(&self.read)
                .await?;
        let rows = sqlx::query(&format!(
            "{SERVER_SELECT} WHERE ?1 IS NULL OR s.account_id = ?1 ORDER BY s.id DESC LIMIT ?2 OFFSET ?3"
        ))
        .bind(account)
        .bind(page.size as i64)
        .bind(offset(page))
        .fetch_all(&self.read)
        .await?;
        let ids: Vec<i64> = rows
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<Result<_, _>>()?;
        let mut disks = self.disks_of(&ids).await?;
        let items = rows
            .iter()
            .zip(ids)
            .map(|(r, id)| server_from_row(r, disks.remove(&id).unwrap_or_default()))
            .collect::<Result<_>>()?;
        Ok(Paged {
            count: count as u64,
            items,
        })
    }

    async fn create_backup(&self, backup: NewBackup, now: OffsetDateTime) -> Result<Backup> {
        let mut tx = self.begin().await?;
        let (account, _plan) = Self::server_in(&mut tx, backup.server_id, backup.scope)
            .await?
            .ok_or(CatalogError::NotFound("Server"))?;
        if backup.backup_type == BackupType::Manual {
            let used: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM backups WHERE server_id = ? AND backup_type = 'manual' \
                 AND status IN ('in_progress', 'completed')",
            )
            .bind(backup.server_id.0)
            .fetch_one(&mut *tx)
            .await?;
            if used >= MANUAL_BACKUP_LIMIT as i64 {
                return Err(CatalogError::ManualLimit {
                    limit: MANUAL_BACKUP_LIMIT,
                });
            }
        }
        if let Some(day) = backup.scheduled_for {
            // The day's slot is taken in the same transaction: beside the
            // unique index on (server_id, scheduled_for), this keeps a second
            // automatic backup of the day out even after the customer
            // deleted the first (the index no longer sees it then).
            let taken = sqlx::query(
                "INSERT INTO auto_backup_slots (server_id, last_slot) VALUES (?1, ?2) \
                 ON CONFLICT (server_id) DO UPDATE SET last_slot = excluded.last_slot \
                 WHERE auto_backup_slots.last_slot < excluded.last_slot",
            )
            .bind(backup.server_id.0)
            .bind(secs(day))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if taken == 0 {
                return Err(CatalogError::Conflict(
                    "An automatic backup of this server already exists for this day.".into(),
                ));
            }
        }
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO backups (server_id, account_id, backup_type, status, description, \
               created_at, expires_at, scheduled_for) \
             VALUES (?, ?, ?, 'in_progress', ?, ?, ?, ?) RETURNING id",
        )
        .bind(backup.server_id.0)
        .bind(account)
        .bind(backup.backup_type.as_str())
        .bind(&backup.description)
        .bind(secs(now))
        .bind(backup.expires_at.map(secs))
        .bind(backup.scheduled_for.map(secs))
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| {
            map_db_error(
                e,
                "An automatic backup of this server already exists for this day.",
            )
        })?;
        sqlx::query("UPDATE backups SET engine_backup_id = ? WHERE id = ?")
            .bind(engine_backup_id(BackupId(id)))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO jobs (kind, server_id, backup_id, state, run_after, created_at) \
             VALUES ('backup', ?, ?, 'queued', ?, ?)",
        )
        .bind(backup.server_id.0)
        .bind(id)
        .bind(secs(backup.run_after.unwrap_or(now)))
        .bind(secs(now))
        .execute(&mut *tx)
        .await?;
        let created = Self::backup_tx(&mut tx, id).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn backup(&self, id: BackupId, scope: Scope) -> Result<Option<Backup>> {
        sqlx::query(&format!(
            "{BACKUP_SELECT} WHERE b.id = ?1 AND (?2 IS NULL OR b.account_id = ?2)"
        ))
        .bind(id.0)
        .bind(scope.account().map(|a| a.0))
        .fetch_optional(&self.read)
        .await?
        .map(|r| backup_from_row(&r))
        .transpose()
    }

    async fn list_backups(&self, filter: BackupFilter, page: PageRequest) -> Result<Paged<Backup>> {
        reader::off_runtime(&self.inline, &self.read_threads, move |r| {
            r.list_backups(&filter, page)
        })
        .await
    }

    async fn delete_backup(&self, id: BackupId, scope: Scope) -> Result<DeletedBackup> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(&format!(
            "{BACKUP_SELECT} WHERE b.id = ?1 AND (?2 IS NULL OR b.account_id = ?2)"
        ))
        .bind(id.0)
        .bind(scope.account().map(|a| a.0))
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(CatalogError::NotFound("Backup"))?;
        let backup = backup_from_row(&row)?;
        let reading: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM restores WHERE backup_id = ? AND status = 'in_progress'",
        )
        .bind(id.0)
        .fetch_one(&mut *tx)
        .await?;
        if reading > 0 {
            return Err(CatalogError::Conflict(
                "A restore from this backup is running; delete it after the restore has finished."
                    .into(),
            ));
        }
        let job: Option<i64> = sqlx::query_scalar(
            "UPDATE jobs SET state = 'cancelled', error = 'The backup was deleted.' \
             WHERE backup_id = ? AND kind = 'backup' AND state IN ('queued', 'running') RETURNING id",
        )
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM backups WHERE id = ?")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(DeletedBackup {
            backup,
            job: job.map(JobId),
        })
    }

    async fn all_backups(&self) -> Result<Vec<Backup>> {
        sqlx::query(&format!("{BACKUP_SELECT} ORDER BY b.id"))
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(backup_from_row)
            .collect()
    }

    async fn record_backup_read(&self, id: BackupId, read: &BackupRead) -> Result<()> {
        sqlx::query(
            "UPDATE backups SET incremental = ?, bytes_read = ?, full_reason = ?, \
             consistency = ? WHERE id = ?",
        )
        .bind(read.incremental as i64)
        .bind(read.bytes_read as i64)
        .bind(&read.full_reason)
        .bind(read.consistency.as_str())
        .bind(id.0)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn incremental_base(&self, server: ServerId) -> Result<Option<Backup>> {
        // Restores and backups of a server never run at once (one job per
        // server), so a restore created at or after a backup's creation
        // ran after it.
        let row = sqlx::query(&format!(
            "{BACKUP_SELECT} WHERE b.server_id = ? AND b.status = 'completed' \
             AND b.damaged = 0 AND NOT EXISTS (SELECT 1 FROM restores r \
               WHERE r.server_id = b.server_id AND r.created_at >= b.created_at) \
             ORDER BY b.id DESC LIMIT 1"
        ))
        .bind(server.0)
        .fetch_optional(&self.read)
        .await?;
        row.as_ref().map(backup_from_row).transpose()
    }

    async fn create_restore(&self, restore: NewRestore, now: OffsetDateTime) -> Result<Restore> {
        let mut tx = self.begin().await?;
        let (account, _) = Self::server_in(&mut tx, restore.server_id, restore.scope)
            .await?
            .ok_or(CatalogError::NotFound("Server"))?;
        let row = sqlx::query(&format!(
            "{BACKUP_SELECT} WHERE b.id = ?1 AND (?2 IS NULL OR b.account_id = ?2)"
        ))
        .bind(restore.backup_id.0)
        .bind(restore.scope.account().map(|a| a.0))
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(CatalogError::NotFound("Backup"))?;
        let backup = backup_from_row(&row)?;
        if backup.server_id != restore.server_id {
            return Err(CatalogError::Invalid(format!(
                "Backup {} is a backup of server {}, not of server {}.",
                backup.id, backup.server_id, restore.server_id
            )));
        }
        if backup.status != WorkStatus::Completed {
            return Err(CatalogError::Invalid(format!(
                "Backup {} is {}; only a completed backup can be restored.",
                backup.id,
                match backup.status {
                    WorkStatus::InProgress => "still in progress",
                    _ => "failed",
                }
            )));
        }
        if backup.damaged {
            return Err(CatalogError::Invalid(format!(
                "Backup {} was found damaged by verification and cannot be restored; choose another backup.",
                backup.id
            )));
        }
        if Self::server_busy(&mut tx, restore.server_id).await? {
            return Err(CatalogError::Busy(
                "A backup or restore of this server is running; try again when it has finished."
                    .into(),
            ));
        }
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO restores (server_id, account_id, backup_id, status, created_at) \
             VALUES (?, ?, ?, 'in_progress', ?) RETURNING id",
        )
        .bind(restore.server_id.0)
        .bind(account)
        .bind(restore.backup_id.0)
        .bind(secs(now))
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO jobs (kind, server_id, backup_id, restore_id, state, run_after, created_at) \
             VALUES ('restore', ?, ?, ?, 'queued', ?, ?)",
        )
        .bind(restore.server_id.0)
        .bind(restore.backup_id.0)
        .bind(id)
        .bind(secs(now))
        .bind(secs(now))
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(&format!("{RESTORE_SELECT} WHERE r.id = ?"))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        let created = restore_from_row(&row)?;
        tx.commit().await?;
        Ok(created)
    }

    async fn restore(&self, id: RestoreId, scope: Scope) -> Result<Option<Restore>> {
        sqlx::query(&format!(
            "{RESTORE_SELECT} WHERE r.id = ?1 AND (?2 IS NULL OR r.account_id = ?2)"
        ))
        .bind(id.0)
        .bind(scope.account().map(|a| a.0))
        .fetch_optional(&self.read)
        .await?
        .map(|r| restore_from_row(&r))
        .transpose()
    }

    async fn claim_job_leased(&self, claim: &JobClaim, now: OffsetDateTime) -> Result<Option<Job>> {
        // One statement: SQLite runs it under the write lock, so two workers
        // can never claim the same job or two jobs of one server.
        sqlx::query(&format!(
            "UPDATE jobs SET state = 'running', claimed_by = ?1, heartbeat_at = ?2, attempts = attempts + 1, \
               node = ?3, lease_expires_at = ?4 \
             WHERE id = (SELECT j.id FROM jobs j WHERE j.state = 'queued' AND j.run_after <= ?2 \
                 AND (?3 IS NULL OR j.server_id IN (SELECT s.id FROM servers s WHERE s.node = ?3)) \
                 AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.server_id = j.server_id AND r.state = 'running') \
                 ORDER BY j.id LIMIT 1) \
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(&claim.worker)
        .bind(secs(now))
        .bind(&claim.node)
        .bind(secs(claim.lease_until))
        .fetch_optional(&self.write)
        .await?
        .map(|r| job_from_row(&r))
        .transpose()
    }

    async fn renew_lease(&self, job: JobId, worker: &str, until: OffsetDateTime) -> Result<bool> {
        // Conditional on the owner: a lease that expired and was taken over
        // (requeued, or claimed by another worker) cannot be renewed.
        let renewed = sqlx::query(
            "UPDATE jobs SET lease_expires_at = MAX(COALESCE(lease_expires_at, 0), ?1) \
             WHERE id = ?2 AND state = 'running' AND claimed_by = ?3",
        )
        .bind(secs(until))
        .bind(job.0)
        .bind(worker)
        .execute(&self.write)
        .await?
        .rows_affected();
        Ok(renewed > 0)
    }

    async fn adopt_unassigned_servers(&self, node: &str) -> Result<u64> {
        Ok(
            sqlx::query("UPDATE servers SET node = ? WHERE node IS NULL")
                .bind(node)
                .execute(&self.write)
                .await?
                .rows_affected(),
        )
    }

    async fn task_runs_prefixed(&self, prefix: &str) -> Result<Vec<TaskRun>> {
        // A prefix match without LIKE's wildcards: node names may hold `_`.
        let rows = sqlx::query(
            "SELECT name, last_run, summary FROM scheduler_tasks \
             WHERE substr(name, 1, length(?1)) = ?1 ORDER BY name",
        )
        .bind(prefix)
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TaskRun {
                    name: r.try_get("name")?,
                    last_run: ts(r.try_get("last_run")?),
                    summary: r.try_get("summary")?,
                })
            })
            .collect()
    }

    async fn node_loads(&self) -> Result<Vec<NodeLoad>> {
        let rows = sqlx::query(
            "SELECT s.node AS node, COUNT(*) AS servers, \
               COALESCE(SUM((SELECT COUNT(*) FROM jobs j WHERE j.server_id = s.id AND j.state = 'running')), 0) AS running, \
               COALESCE(SUM((SELECT COUNT(*) FROM jobs j WHERE j.server_id = s.id AND j.state = 'queued')), 0) AS queued \
             FROM servers s GROUP BY s.node ORDER BY s.node",
        )
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(NodeLoad {
                    node: r.try_get("node")?,
                    servers: r.try_get::<i64, _>("servers")? as u64,
                    running_jobs: r.try_get::<i64, _>("running")? as u64,
                    queued_jobs: r.try_get::<i64, _>("queued")? as u64,
                })
            })
            .collect()
    }

    async fn job_progress(
        &self,
        job: JobId,
        worker: &str,
        progress: u8,
        now: OffsetDateTime,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND state = 'running' AND claimed_by = ? \
             RETURNING kind, backup_id, restore_id",
        )
        .bind(secs(now))
        .bind(job.0)
        .bind(worker)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(false) };
        let kind: String = row.try_get("kind")?;
        let progress = progress.min(99) as i64;
        if kind == "restore" {
            sqlx::query("UPDATE restores SET progress = ? WHERE id = ? AND status = 'in_progress'")
                .bind(progress)
                .bind(row.try_get::<Option<i64>, _>("restore_id")?)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query("UPDATE backups SET progress = ? WHERE id = ? AND status = 'in_progress'")
                .bind(progress)
                .bind(row.try_get::<Option<i64>, _>("backup_id")?)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn release_job(&self, job: JobId, worker: &str, now: OffsetDateTime) -> Result<bool> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "UPDATE jobs SET state = 'queued', claimed_by = NULL, heartbeat_at = NULL, lease_expires_at = NULL, \
               attempts = MAX(attempts - 1, 0), run_after = ? \
             WHERE id = ? AND state = 'running' AND claimed_by = ? RETURNING kind, backup_id, restore_id",
        )
        .bind(secs(now))
        .bind(job.0)
        .bind(worker)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(false) };
        let kind: String = row.try_get("kind")?;
        let (table, target): (&str, Option<i64>) = if kind == "restore" {
            ("restores", row.try_get("restore_id")?)
        } else {
            ("backups", row.try_get("backup_id")?)
        };
        sqlx::query(&format!(
            "UPDATE {table} SET progress = 0 WHERE id = ? AND status = 'in_progress'"
        ))
        .bind(target)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn finish_job(
        &self,
        job: JobId,
        worker: &str,
        outcome: JobOutcome,
        now: OffsetDateTime,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let (state, error, detail) = match &outcome {
            JobOutcome::Failed { reason, detail } => {
                ("failed", Some(reason.as_str()), detail.as_deref())
            }
            _ => ("done", None, None),
        };
        let row = sqlx::query(
            "UPDATE jobs SET state = ?, error = ?, error_detail = ?, finished_at = ? \
             WHERE id = ? AND state = 'running' AND claimed_by = ? RETURNING kind, backup_id, restore_id",
        )
        .bind(state)
        .bind(error)
        .bind(detail)
        .bind(secs(now))
        .bind(job.0)
        .bind(worker)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(false) };
        let kind: String = row.try_get("kind")?;
        let backup_id: Option<i64> = row.try_get("backup_id")?;
        let restore_id: Option<i64> = row.try_get("restore_id")?;
        let changed = match (&outcome, kind.as_str()) {
            (JobOutcome::BackupCompleted { size_mb, stored_bytes }, _) => sqlx::query(
                "UPDATE backups SET status = 'completed', progress = 100, size_mb = ?, stored_bytes = ?, \
                   completed_at = ?, error = NULL WHERE id = ? AND status = 'in_progress'",
            )
            .bind(*size_mb as i64)
            .bind(*stored_bytes as i64)
            .bind(secs(now))
            .bind(backup_id)
            .execute(&mut *tx)
            .await?
            .rows_affected(),
            (JobOutcome::RestoreCompleted, _) => sqlx::query(
                "UPDATE restores SET status = 'completed', progress = 100, completed_at = ?, error = NULL \
                 WHERE id = ? AND status = 'in_progress'",
            )
            .bind(secs(now))
            .bind(restore_id)
            .execute(&mut *tx)
            .await?
            .rows_affected(),
            (JobOutcome::Failed { reason, .. }, "restore") => sqlx::query(
                "UPDATE restores SET status = 'failed', completed_at = ?, error = ? \
                 WHERE id = ? AND status = 'in_progress'",
            )
            .bind(secs(now))
            .bind(reason)
            .bind(restore_id)
            .execute(&mut *tx)
            .await?
            .rows_affected(),
            (JobOutcome::Failed { reason, .. }, _) => sqlx::query(
                "UPDATE backups SET status = 'failed', completed_at = ?, error = ?, size_mb = NULL \
                 WHERE id = ? AND status = 'in_progress'",
            )
            .bind(secs(now))
            .bind(reason)
            .bind(backup_id)
            .execute(&mut *tx)
            .await?
            .rows_affected(),
        };
        if changed > 0 {
            let failed = matches!(outcome, JobOutcome::Failed { .. });
            let (event, subject) = match (kind.as_str(), restore_id) {
                ("restore", Some(r)) => (
                    if failed {
                        WebhookEventKind::RestoreFailed
                    } else {
                        WebhookEventKind::RestoreCompleted
                    },
                    WebhookSubject::Restore(RestoreId(r)),
                ),
                _ => (
                    if failed {
                        WebhookEventKind::BackupFailed
                    } else {
                        WebhookEventKind::BackupCompleted
                    },
                    WebhookSubject::Backup(BackupId(backup_id.unwrap_or(0))),
                ),
            };
            Self::enqueue_event(&mut tx, event, subject, now).await?;
        }
        tx.commit().await?;
        Ok(changed > 0)
    }

    async fn recover_stale_jobs(
        &self,
        stale_before: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Vec<RecoveredJob>> {
        self.recover_where(
            "(heartbeat_at IS NULL OR heartbeat_at < ?)",
            secs(stale_before),
            now,
        )
        .await
    }

    async fn expire_leases(
        &self,
        expired_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Vec<RecoveredJob>> {
        self.recover_where("lease_expires_at < ?", secs(expired_at), now)
            .await
    }

    async fn import_backup(&self, backup: &ImportedBackup) -> Result<ImportOutcome> {
        self.import(backup).await
    }

    async fn reserve_backup_ids(&self, through: BackupId) -> Result<()> {
        self.reserve_ids(through).await
    }

    async fn failed_jobs(&self, limit: u32) -> Result<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'failed' ORDER BY id DESC LIMIT ?"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn job(&self, id: JobId) -> Result<Option<Job>> {
        sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"))
            .bind(id.0)
            .fetch_optional(&self.read)
            .await?
            .map(|r| job_from_row(&r))
            .transpose()
    }

    async fn claim_idempotency_key(
        &self,
        req: &IdempotentRequest,
        now: OffsetDateTime,
        expired_before: OffsetDateTime,
    ) -> Result<IdempotencyClaim> {
        self.claim_key(req, now, expired_before).await
    }

    async fn complete_idempotency_key(
        &self,
        owner: TokenOwner,
        key: &str,
        response: &StoredResponse,
    ) -> Result<()> {
        self.complete_key(owner, key, response).await
    }

    async fn release_idempotency_key(&self, owner: TokenOwner, key: &str) -> Result<()> {
        self.release_key(owner, key).await
    }

    async fn due_webhook_events(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>> {
        self.due_events(now, limit).await
    }

    async fn claim_webhook_events(
        &self,
        now: OffsetDateTime,
        limit: u32,
        lease_secs: u32,
    ) -> Result<Vec<WebhookDelivery>> {
        self.claim_events(now, limit, lease_secs).await
    }

    async fn next_webhook_due(&self) -> Result<Option<OffsetDateTime>> {
        self.next_due().await
    }

    async fn set_webhook_payload(&self, id: &str, payload: &str) -> Result<()> {
        self.set_payload(id, payload).await
    }

    async fn record_webhook_attempt(
        &self,
        id: &str,
        attempt: WebhookAttempt,
        now: OffsetDateTime,
    ) -> Result<()> {
        self.record_attempt(id, attempt, now).await
    }

    async fn purge_webhook_events(&self, before: OffsetDateTime) -> Result<u64> {
        self.purge_events(before).await
    }
}
