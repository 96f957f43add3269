//! The PostgreSQL catalog: one database shared by any number of `vpsbackup`
//! processes (API replicas, agents, the command line), migrations from
//! `migrations/postgres` applied at open.
//!
//! The SQLite catalog gets its guarantees from SQLite's single writer; here
//! several processes write at once under READ COMMITTED, so each rule that
//! reads before it writes takes a row lock or leans on a constraint:
//! - the manual backup limit and "no restore while a job is queued": the
//!   server's row is locked (`FOR NO KEY UPDATE`) before counting, so
//!   concurrent creates for one server run one after the other;
//! - one running job per server: the claim takes the oldest due job with
//!   `FOR UPDATE SKIP LOCKED`, and the partial unique index
//!   `jobs_one_running_per_server` refuses a second running job of a server
//!   claimed at the same instant by another process (that claim retries);
//! - one automatic backup per server and day, idempotency keys: unique indexes;
//! - stale-job recovery locks the jobs it takes over (`SKIP LOCKED`), so two
//!   processes recovering at once never handle one job twice.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Postgres, Row, Transaction};
use time::OffsetDateTime;

use crate::error::map_db_error;
use crate::model::*;
use crate::webhook::*;
use crate::{
    Catalog, CatalogError, IdempotencyClaim, IdempotentRequest, Result, StoredResponse, TaskRun,
};

// Idempotency keys of create requests.
mod idempotency;
// Backup rows rebuilt from the store's manifests, and id sequences.
mod import;
// The scheduler's queries.
mod schedule;
/// The listings' connections, handed out and taken back without pings.
mod session_pool;
// Listening on a notification channel across lost connections.
mod notify;
// The cache of token lookups.
mod tokens;
// The webhook outbox.
mod webhooks;

pub(crate) use import::move_sequence_past;
pub use notify::Listening;

/// The catalog in a PostgreSQL database.
#[derive(Clone, Debug)]
pub struct PgCatalog {
    pool: PgPool,
    /// The backup listings' own connections, whose sessions plan each
    /// statement once and never sort: see [`LISTING_SESSION`].
    listings: Arc<session_pool::SessionPool>,
    /// Token lookups, trusted while this process hears of every change.
    tokens: Arc<tokens::TokenCache>,
}

/// The session settings of the listing pool. A listing is the API's busiest
/// statement; planned afresh at every execution (PostgreSQL's default for a
/// statement with parameters) planning was a third of PostgreSQL's CPU under
/// the API bench. A generic plan is made once per connection, but from column
/// statistics rather than the values asked for: with one big account, the
/// generic plan of "this account's backups, newest first" walked the primary
/// key backwards, filtering, which for a small account reads the whole table.
/// So each listing statement is written to leave its generic plan no choice
/// (see [`listing_sql`]): its ORDER BY can only be given by the index that
/// leads with its narrowest filter, and with sorting off no other plan is
/// costed as viable. With sequential scans off too, the servers joined for
/// their names are found through their primary key (a generic plan that
/// expected one backup would otherwise scan the servers once per backup).
const LISTING_SESSION: [(&str, &str); 3] = [
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_sort", "off"),
    ("enable_seqscan", "off"),
];

/// The listing connections' `application_name`, by which `pg_stat_activity`
/// tells them from the rest.
pub const LISTING_APPLICATION: &str = "vpsbackup listings";

/// Connections per process unless the URL or caller says otherwise: the API's
/// reads and the workers' writes share them.
const DEFAULT_CONNECTIONS: u32 = 16;

/// A pooled connection used within this long is handed out without a ping.
/// sqlx pings every connection it hands out by default, a round trip as long
/// as a listing's own; a connection that answered this recently is as good
/// as pinged (HikariCP skips its check within 500 ms the same way), and one
/// that died since fails its statement like any connection lost mid-use.
const TRUSTED_IDLE: Duration = Duration::from_secs(1);

/// How long a statement waits for a free connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// The channel of migration 0006's trigger for a job queued for a server
/// on no node yet; a node's own is [`jobs_channel`].
const JOBS_CHANNEL: &str = "vpsbackup_jobs";

/// The channel of migration 0006's trigger for a job queued for a server
/// on `node`: `vpsbackup_jobs_` and the MD5 of the node's name.
fn jobs_channel(node: &str) -> String {
    use md5::{Digest, Md5};
    format!("{JOBS_CHANNEL}_{:x}", Md5::digest(node.as_bytes()))
}

/// How long opening the catalog waits for the server's first answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times a claim that lost a race for a server's running slot is
/// retried before the worker is told there is nothing to do (it polls again).
const CLAIM_RETRIES: usize = 8;

pub(crate) type PgTx = Transaction<'static, Postgres>;

fn ts(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn opt_ts(secs: Option<i64>) -> Option<OffsetDateTime> {
    secs.map(ts)
}

fn secs(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

/// A backup's own columns, on `b`; with its server's name, `server_name`,
/// they make the row [`backup_from_row`] reads.
macro_rules! backup_columns {
    () => {
        "b.id, b.server_id, b.account_id, b.backup_type, b.status, b.description, \
         b.created_at, b.expires_at, b.completed_at, b.size_mb, b.stored_bytes, b.progress, \
         b.error, b.engine_backup_id, b.scheduled_for, b.verified_at, b.damaged, \
         b.verify_error, b.incremental, b.bytes_read, b.full_reason, b.consistency"
    };
}

const BACKUP_SELECT: &str = concat!(
    "SELECT ",
    backup_columns!(),
    ", s.name AS server_name FROM backups b JOIN servers s ON s.id = b.server_id"
);

fn backup_from_row(r: &PgRow) -> Result<Backup> {
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
        damaged: r.try_get("damaged")?,
        verify_error: r.try_get("verify_error")?,
        read: crate::model::backup_read(
            r.try_get("incremental")?,
            r.try_get("bytes_read")?,
            r.try_get("full_reason")?,
            r.try_get("consistency")?,
        ),
    })
}

const RESTORE_SELECT: &str = "SELECT r.id, r.server_id, s.name AS server_name, r.account_id, \
     r.backup_id, r.status, r.progress, r.created_at, r.completed_at, r.error \
     FROM restores r JOIN servers s ON s.id = r.server_id";

fn restore_from_row(r: &PgRow) -> Result<Restore> {
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

fn plan_from_row(r: &PgRow, prefix: &str) -> Result<Plan> {
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

fn server_from_row(r: &PgRow, disks: Vec<ServerDisk>) -> Result<Server> {
    let running: Option<String> = r.try_get("running_kind")?;
    Ok(Server {
        id: ServerId(r.try_get("id")?),
        name: r.try_get("name")?,
        hostname: r.try_get("hostname")?,
        account_id: AccountId(r.try_get("account_id")?),
        account_name: r.try_get("account_name")?,
        plan: plan_from_row(r, "p_")?,
        disks,
        auto_backup_enabled: r.try_get("auto_backup_enabled")?,
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

fn job_from_row(r: &PgRow) -> Result<Job> {
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

fn token_from_row(r: &PgRow) -> Result<ApiToken> {
    let hash_vec: Vec<u8> = r.try_get("token_hash")?;
    let mut hash = [0u8; 32];
    if hash_vec.len() == 32 {
        hash.copy_from_slice(&hash_vec);
    }
    let account: Option<i64> = r.try_get("account_id")?;
    let admin: bool = r.try_get("is_admin")?;
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

const ACCOUNT_COLUMNS: &str = "id, name, created_at, webhook_url";

fn account_from_row(r: &PgRow) -> Result<Account> {
    Ok(Account {
        id: AccountId(r.try_get("id")?),
        name: r.try_get("name")?,
        created_at: ts(r.try_get("created_at")?),
        webhook_url: r.try_get("webhook_url")?,
    })
}

/// Binds a listing's filter values, in the order its SQL names them.
fn bind_filter<'q>(
    mut q: sqlx::query::Query<'q, Postgres, PgArguments>,
    filter: &BackupFilter,
) -> sqlx::query::Query<'q, Postgres, PgArguments> {
    if let Some(a) = filter.scope {
        q = q.bind(a.0);
    }
    if let Some(s) = filter.server_id {
        q = q.bind(s.0);
    }
    if let Some(t) = filter.backup_type {
        q = q.bind(t.as_str());
    }
    q
}

/// A backup listing's statement (the count as a scalar subquery, then the
/// page) and its count alone, for `filter`, binding the filter's values in
/// [`bind_filter`]'s order, then the page's size and offset.
///
/// Only the conditions in use go into the SQL, one statement per filter
/// shape, and each is written so that its generic plan (the listing pool's
/// sessions use nothing else, see [`LISTING_SESSION`]) walks one index: the
/// one that starts with the narrowest filter in use (server, then account,
/// then type), then the type when it is filtered on, then the id. The
/// filters on that index's columns are written as ranges of one value and
/// make up the ORDER BY with the id: an equality would make PostgreSQL drop
/// its column from the sort keys, and then the primary key (id order) or a
/// shorter index would give the order too, and the estimates would choose.
/// The account, when the server leads, is checked on the rows found.
/// The count comes from the counts tables (kept exact by triggers); without
/// a server filter from the per-account rows, at most two per account.
fn listing_sql(filter: &BackupFilter) -> (String, String) {
    let columns = [
        ("account_id", filter.scope.is_some()),
        ("server_id", filter.server_id.is_some()),
        ("backup_type", filter.backup_type.is_some()),
    ];
    let lead = if filter.server_id.is_some() {
        Some("server_id")
    } else if filter.scope.is_some() {
        Some("account_id")
    } else if filter.backup_type.is_some() {
        Some("backup_type")
    } else {
        None
    };
    // The index's columns (lead, then the type if filtered): sort keys.
    let mut keys: Vec<&str> = lead.into_iter().collect();
    if filter.backup_type.is_some() && lead != Some("backup_type") {
        keys.push("backup_type");
    }
    let mut counted = Vec::new();
    let mut paged = Vec::new();
    let mut n = 0;
    for (column, _) in columns.iter().filter(|(_, used)| *used) {
        n += 1;
        counted.push(format!("bc.{column} = ${n}"));
        paged.push(if keys.contains(column) {
            format!("b.{column} >= ${n} AND b.{column} <= ${n}")
        } else {
            format!("b.{column} = ${n}")
        });
    }
    let count_sql = format!(
        "SELECT COALESCE(SUM(n), 0)::BIGINT FROM {} bc{}",
        filter.counts_table(),
        where_clause(&counted)
    );
    let order: Vec<String> = keys
        .iter()
        .chain(&["id"])
        .map(|c| format!("b.{c} DESC"))
        .collect();
    let sql = format!(
        "SELECT ({count_sql}) AS total, {}, s.name AS server_name \
         FROM backups b LEFT JOIN servers s ON s.id = b.server_id{} \
         ORDER BY {} LIMIT ${} OFFSET ${}",
        backup_columns!(),
        where_clause(&paged),
        order.join(", "),
        n + 1,
        n + 2,
    );
    (sql, count_sql)
}

/// A pool of at most `connections`, whose connections are pinged when
/// handed out only after [`TRUSTED_IDLE`] unused.
fn pool_options(connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(connections.max(2))
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= TRUSTED_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

fn offset(page: PageRequest) -> i64 {
    (page.number.max(1) as i64 - 1) * page.size as i64
}

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

/// True when `e` is the refusal of a second running job of one server.
fn lost_running_race(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.constraint() == Some("jobs_one_running_per_server"))
}

impl PgCatalog {
    /// Connects to `url` (`postgres://USER:PASS@HOST/DB`) and applies the
    /// migrations. Several processes may open one database at once: sqlx
    /// serialises migrations with an advisory lock.
    pub async fn open(url: &str) -> Result<PgCatalog> {
        Self::open_with_connections(url, DEFAULT_CONNECTIONS).await
    }

    /// Like [`PgCatalog::open`] with at most `connections` pooled connections,
    /// and as many for the listings.
    pub async fn open_with_connections(url: &str, connections: u32) -> Result<PgCatalog> {
        Self::open_with_pools(url, connections, connections).await
    }

    /// Like [`PgCatalog::open`] with at most `connections` pooled connections
    /// for everything but the backup listings, which have at most
    /// `listing_connections` of their own. Listings are CPU-bound on the
    /// database: beyond about two per core of the PostgreSQL server, more
    /// connections only queue in its scheduler (on 2 shared cores, 16 instead
    /// of 4 raised the API bench's p99 from about 20 ms to over 100 ms).
    pub async fn open_with_pools(
        url: &str,
        connections: u32,
        listing_connections: u32,
    ) -> Result<PgCatalog> {
        let options = PgConnectOptions::from_str(url)?;
        // One plain connection first, so an unreachable server or a wrong
        // password is reported as itself within seconds, not as the pool's
        // timeout after half a minute of retries.
        let first = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
            .await
            .map_err(|_| {
                CatalogError::Unreachable(format!(
                    "no answer from the PostgreSQL server within {} seconds",
                    CONNECT_TIMEOUT.as_secs()
                ))
            })??;
        first.close().await?;
        let pool = pool_options(connections)
            .min_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        let listings = Arc::new(session_pool::SessionPool::new(
            options
                .clone()
                .options(LISTING_SESSION)
                .application_name(LISTING_APPLICATION),
            listing_connections.max(1),
            ACQUIRE_TIMEOUT,
        ));
        let tokens = tokens::TokenCache::new(options);
        Ok(PgCatalog {
            pool,
            listings,
            tokens,
        })
    }

    /// Closes the pools.
    pub async fn close(&self) {
        self.tokens.stop();
        self.listings.close().await;
        self.pool.close().await;
    }

    /// The scheduler's leadership on this database (a session advisory
    /// lock on a connection of its own; see [`crate::LeaderLock`]).
    pub fn leader_lock(&self) -> crate::LeaderLock {
        crate::LeaderLock::postgres((*self.pool.connect_options()).clone())
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn begin(&self) -> Result<PgTx> {
        Ok(self.pool.begin().await?)
    }

    /// Calls `wake` whenever any process queues a job for a server on
    /// `node` or on no node yet (which any node may adopt), and whenever it
    /// starts listening again after a lost connection (a notification may
    /// have been missed). Until the returned handle is dropped.
    pub fn wake_on_queued_jobs(
        &self,
        node: &str,
        wake: impl Fn() + Send + 'static,
    ) -> notify::Listening {
        let options = (*self.pool.connect_options())
            .clone()
            .application_name("vpsbackup job wakeups");
        let channels = vec![JOBS_CHANNEL.to_owned(), jobs_channel(node)];
        notify::spawn(options, channels, move |heard| {
            if !matches!(heard, notify::Heard::Lost) {
                wake();
            }
            true
        })
    }

    /// How many token lookups this process would answer from its cache now
    /// (see `postgres/tokens.rs`).
    pub fn cached_tokens(&self) -> usize {
        self.tokens.usable()
    }

    /// The plan a backup listing runs with on the listing pool, as EXPLAIN
    /// ANALYZE prints it, the values written into the EXECUTE: what a
    /// listing reads, for the tests and for an operator asking why one is
    /// slow.
    pub async fn explain_listing(
        &self,
        filter: &BackupFilter,
        page: PageRequest,
    ) -> Result<String> {
        let (sql, _) = listing_sql(filter);
        let mut values: Vec<String> = Vec::new();
        values.extend(filter.scope.map(|a| a.0.to_string()));
        values.extend(filter.server_id.map(|s| s.0.to_string()));
        values.extend(filter.backup_type.map(|t| format!("'{}'", t.as_str())));
        values.push(page.size.to_string());
        values.push(offset(page).to_string());
        let mut conn = self.listings.acquire().await?;
        sqlx::raw_sql(&format!("PREPARE vpsbackup_explained AS {sql}"))
            .execute(&mut *conn)
            .await?;
        let plan = sqlx::query_scalar::<_, String>(&format!(
            "EXPLAIN (ANALYZE, COSTS OFF) EXECUTE vpsbackup_explained({})",
            values.join(", ")
        ))
        .fetch_all(&mut *conn)
        .await;
        sqlx::raw_sql("DEALLOCATE vpsbackup_explained")
            .execute(&mut *conn)
            .await?;
        conn.release();
        Ok(plan?.join("\n"))
    }

    /// A listing's page and count, on a connection of the listing pool.
    async fn read_listing(
        &self,
        filter: &BackupFilter,
        page: PageRequest,
    ) -> std::result::Result<(Vec<PgRow>, i64), sqlx::Error> {
        // One statement, so the count and the page come from one snapshot.
        // A page past the end has no row to carry the count: then it is read
        // on its own.
        let (sql, count_sql) = listing_sql(filter);
        let mut conn = self.listings.acquire().await?;
        let rows = bind_filter(sqlx::query(&sql), filter)
            .bind(page.size as i64)
            .bind(offset(page))
            .fetch_all(&mut *conn)
            .await?;
        let count = match rows.first() {
            Some(r) => r.try_get::<i64, _>("total")?,
            None => bind_filter(sqlx::query(&count_sql), filter)
                .fetch_one(&mut *conn)
                .await?
                .try_get::<i64, _>(0)?,
        };
        conn.release();
        Ok((rows, count))
    }

    /// Runs raw SQL. For tests and the benchmark seeder, which need to put
    /// the catalog in states the API cannot reach quickly.
    pub async fn execute_raw(&self, sql: &str) -> Result<u64> {
        Ok(sqlx::raw_sql(sql)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn disks_of(&self, ids: &[i64]) -> Result<HashMap<i64, Vec<ServerDisk>>> {
        let mut map: HashMap<i64, Vec<ServerDisk>> = Default::default();
        if ids.is_empty() {
            return Ok(map);
        }
        let rows = sqlx::query(
            "SELECT server_id, path, format FROM server_disks WHERE server_id = ANY($1) \
             ORDER BY server_id, idx",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        for r in rows {
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

    /// The server's account and plan when it is in `scope`, its row locked
    /// until `tx` ends: the checks that follow (manual limit, busy) see every
    /// write of a concurrent call for the same server, which waits here.
    async fn lock_server_in(
        tx: &mut PgTx,
        id: ServerId,
        scope: Scope,
    ) -> Result<Option<(i64, i64)>> {
        let row = sqlx::query(
            "SELECT id, account_id, plan_id FROM servers WHERE id = $1 FOR NO KEY UPDATE",
        )
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

    async fn backup_tx(tx: &mut PgTx, id: i64) -> Result<Backup> {
        let row = sqlx::query(&format!("{BACKUP_SELECT} WHERE b.id = $1"))
            .bind(id)
            .fetch_one(&mut **tx)
            .await?;
        backup_from_row(&row)
    }

    async fn server_busy(tx: &mut PgTx, id: ServerId) -> Result<bool> {
        let busy: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE server_id = $1 \
               AND state IN ('queued', 'running') AND kind IN ('backup', 'restore'))",
        )
        .bind(id.0)
        .fetch_one(&mut **tx)
        .await?;
        Ok(busy)
    }

    /// Re-derives `expires_at` of automatic backups from their plan's retention.
    async fn reapply_retention(
        tx: &mut PgTx,
        plan: Option<i64>,
        server: Option<i64>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE backups SET expires_at = created_at + 86400 * \
               (SELECT p.retention_days FROM servers s JOIN plans p ON p.id = s.plan_id WHERE s.id = backups.server_id) \
             WHERE backup_type = 'automatic' AND server_id IN \
               (SELECT id FROM servers WHERE ($1::BIGINT IS NULL OR plan_id = $1) \
                  AND ($2::BIGINT IS NULL OR id = $2))",
        )
        .bind(plan)
        .bind(server)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn insert_disks(tx: &mut PgTx, id: ServerId, disks: &[ServerDisk]) -> Result<()> {
        for (i, disk) in disks.iter().enumerate() {
            sqlx::query(
                "INSERT INTO server_disks (server_id, idx, path, format) VALUES ($1, $2, $3, $4)",
            )
            .bind(id.0)
            .bind(i as i64)
            .bind(&disk.path)
            .bind(disk.format.map(ImageFormat::as_str))
            .execute(&mut **tx)
            .await
            .map_err(|e| map_db_error(e, "The same disk is listed twice."))?;
        }
        Ok(())
    }

    /// One attempt at claiming; `Err` with the unique violation when another
    /// process claimed a job of the same server in the same instant.
    async fn try_claim(
        &self,
        claim: &JobClaim,
        now: OffsetDateTime,
    ) -> sqlx::Result<Option<PgRow>> {
        // The candidate's server must have no running job (read in this
        // statement's snapshot); a claim racing ours for the same server is
        // caught by jobs_one_running_per_server.
        sqlx::query(&format!(
            "UPDATE jobs SET state = 'running', claimed_by = $1, heartbeat_at = $2, \
               attempts = attempts + 1, node = $3, lease_expires_at = $4 \
             WHERE id = (SELECT j.id FROM jobs j WHERE j.state = 'queued' AND j.run_after <= $2 \
                 AND ($3::TEXT IS NULL OR j.server_id IN (SELECT s.id FROM servers s WHERE s.node = $3)) \
                 AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.server_id = j.server_id AND r.state = 'running') \
                 ORDER BY j.id LIMIT 1 FOR UPDATE SKIP LOCKED) \
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(&claim.worker)
        .bind(secs(now))
        .bind(&claim.node)
        .bind(secs(claim.lease_until))
        .fetch_optional(&self.pool)
        .await
    }
}

impl PgCatalog {
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
        // Locked and skipped when locked: a job another process is
        // recovering (or whose worker is finishing it) is left to it.
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'running' \
             AND {stale} ORDER BY id FOR UPDATE SKIP LOCKED"
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
                    "UPDATE jobs SET state = 'queued', claimed_by = NULL, heartbeat_at = NULL, lease_expires_at = NULL, run_after = $1 \
                     WHERE id = $2",
                )
                .bind(secs(now))
                .bind(job.id.0)
                .execute(&mut *tx)
                .await?;
                sqlx::query(&format!(
                    "UPDATE {table} SET progress = 0 WHERE id = $1 AND status = 'in_progress'"
                ))
                .bind(target)
                .execute(&mut *tx)
                .await?;
            } else {
                let reason = job.lost_reason();
                sqlx::query(
                    "UPDATE jobs SET state = 'failed', error = $1, finished_at = $2 WHERE id = $3",
                )
                .bind(&reason)
                .bind(secs(now))
                .bind(job.id.0)
                .execute(&mut *tx)
                .await?;
                let failed = sqlx::query(&format!(
                    "UPDATE {table} SET status = 'failed', error = $1, completed_at = $2 \
                     WHERE id = $3 AND status = 'in_progress'"
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
impl Catalog for PgCatalog {
    async fn create_account(&self, name: &str, now: OffsetDateTime) -> Result<Account> {
        let row = sqlx::query(&format!(
            "INSERT INTO accounts (name, created_at) VALUES ($1, $2) RETURNING {ACCOUNT_COLUMNS}"
        ))
        .bind(name)
        .bind(secs(now))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| map_db_error(e, &format!("An account named {name:?} already exists.")))?;
        account_from_row(&row)
    }

    async fn account(&self, id: AccountId) -> Result<Option<Account>> {
        sqlx::query(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"
        ))
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| account_from_row(&r))
        .transpose()
    }

    async fn account_by_name(&self, name: &str) -> Result<Option<Account>> {
        sqlx::query(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| account_from_row(&r))
        .transpose()
    }

    async fn list_accounts(&self) -> Result<Vec<Account>> {
        sqlx::query(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY id"
        ))
        .fetch_all(&self.pool)
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
            TokenOwner::Account(a) => (Some(a.0), false),
            TokenOwner::Admin => (None, true),
        };
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO api_tokens (token_hash, prefix, name, account_id, is_admin, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(&token.hash[..])
        .bind(&token.prefix)
        .bind(&token.name)
        .bind(account)
        .bind(admin)
        .bind(secs(now))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| map_db_error(e, "This token already exists."))?;
        let row = sqlx::query(&format!("{TOKEN_SELECT} WHERE t.id = $1"))
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        token_from_row(&row)
    }

    async fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiToken>> {
        if let Some(token) = self.tokens.get(hash) {
            return Ok(Some(token));
        }
        let generation = self.tokens.generation();
        let token = sqlx::query(&format!("{TOKEN_SELECT} WHERE t.token_hash = $1"))
            .bind(&hash[..])
            .fetch_optional(&self.pool)
            .await?
            .map(|r| token_from_row(&r))
            .transpose()?;
        if let Some(token) = &token {
            self.tokens.put(token, generation);
        }
        Ok(token)
    }

    async fn list_tokens(&self) -> Result<Vec<ApiToken>> {
        sqlx::query(&format!("{TOKEN_SELECT} ORDER BY t.id"))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(token_from_row)
            .collect()
    }

    async fn revoke_token(&self, which: TokenRef, now: OffsetDateTime) -> Result<bool> {
        let q = match &which {
            TokenRef::Id(id) => sqlx::query(
                "UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
            )
            .bind(secs(now))
            .bind(id.0),
            TokenRef::Hash(h) => sqlx::query(
                "UPDATE api_tokens SET revoked_at = $1 WHERE token_hash = $2 AND revoked_at IS NULL",
            )
            .bind(secs(now))
            .bind(&h[..]),
        };
        Ok(q.execute(&self.pool).await?.rows_affected() > 0)
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
             VALUES ($1, $2, $3, $4, $5, $5) RETURNING {PLAN_COLUMNS}"
        ))
        .bind(&plan.name)
        .bind(plan.retention_days as i64)
        .bind(plan.window_start_minute as i64)
        .bind(plan.window_minutes as i64)
        .bind(secs(now))
        .fetch_one(&self.pool)
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
            "UPDATE plans SET retention_days = COALESCE($1, retention_days), \
               window_start_minute = COALESCE($2, window_start_minute), \
               window_minutes = COALESCE($3, window_minutes), updated_at = $4 \
             WHERE name = $5 RETURNING {PLAN_COLUMNS}"
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
        sqlx::query(&format!("SELECT {PLAN_COLUMNS} FROM plans WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| plan_from_row(&r, ""))
            .transpose()
    }

    async fn plan_by_name(&self, name: &str) -> Result<Option<Plan>> {
        sqlx::query(&format!("SELECT {PLAN_COLUMNS} FROM plans WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| plan_from_row(&r, ""))
            .transpose()
    }

    async fn list_plans(&self) -> Result<Vec<Plan>> {
        sqlx::query(&format!(
            "SELECT {PLAN_COLUMNS} FROM plans ORDER BY retention_days, id"
        ))
        .fetch_all(&self.pool)
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
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11, $12, $13, $14, $15)",
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
        Self::insert_disks(&mut tx, server.id, &server.disks).await?;
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
        if matches!(&update.disks, Some(d) if d.is_empty()) {
            return Err(CatalogError::Invalid(
                "A server needs at least one disk.".into(),
            ));
        }
        let mut tx = self.begin().await?;
        if Self::lock_server_in(&mut tx, id, Scope::All)
            .await?
            .is_none()
        {
            return Err(CatalogError::NotFound("Server"));
        }
        let hooks = &update.hooks;
        let set = |h: &Option<Option<String>>| h.is_some();
        let value = |h: &Option<Option<String>>| h.clone().flatten();
        sqlx::query(
            "UPDATE servers SET name = COALESCE($1, name), hostname = COALESCE($2, hostname), \
               plan_id = COALESCE($3, plan_id), auto_backup_enabled = COALESCE($4, auto_backup_enabled), \
               window_start_minute = CASE WHEN $5 THEN $6 ELSE window_start_minute END, \
               hook_pre_backup = CASE WHEN $7 THEN $8 ELSE hook_pre_backup END, \
               hook_post_backup = CASE WHEN $9 THEN $10 ELSE hook_post_backup END, \
               hook_pre_restore = CASE WHEN $11 THEN $12 ELSE hook_pre_restore END, \
               hook_post_restore = CASE WHEN $13 THEN $14 ELSE hook_post_restore END, \
               runtime = COALESCE($17, runtime), \
               qmp_socket = CASE WHEN $17 IS NULL THEN qmp_socket ELSE $18 END, \
               libvirt_domain = CASE WHEN $17 IS NULL THEN libvirt_domain ELSE $19 END, \
               guest_agent = CASE WHEN $17 IS NULL THEN guest_agent ELSE $20 END, \
               node = COALESCE($21, node), \
               updated_at = $15 WHERE id = $16",
        )
        .bind(&update.name)
        .bind(&update.hostname)
        .bind(update.plan_id.map(|p| p.0))
        .bind(update.auto_backup_enabled)
        .bind(update.window_start_minute.is_some())
        .bind(update.window_start_minute.flatten().map(|v| v as i64))
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
            sqlx::query("DELETE FROM server_disks WHERE server_id = $1")
                .bind(id.0)
                .execute(&mut *tx)
                .await?;
            Self::insert_disks(&mut tx, id, disks).await?;
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
        if Self::lock_server_in(&mut tx, id, Scope::All)
            .await?
            .is_none()
        {
            return Err(CatalogError::NotFound("Server"));
        }
        if Self::server_busy(&mut tx, id).await? {
            return Err(CatalogError::Busy(format!(
                "Server {id} has a backup or restore queued or running; remove it when that has finished."
            )));
        }
        let rows = sqlx::query(&format!(
            "{BACKUP_SELECT} WHERE b.server_id = $1 ORDER BY b.id"
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
        sqlx::query("DELETE FROM servers WHERE id = $1")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(backups)
    }

    async fn server(&self, id: ServerId, scope: Scope) -> Result<Option<Server>> {
        let row = sqlx::query(&format!(
            "{SERVER_SELECT} WHERE s.id = $1 AND ($2::BIGINT IS NULL OR s.account_id = $2)"
        ))
        .bind(id.0)
        .bind(scope.account().map(|a| a.0))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut disks = self.disks_of(&[id.0]).await?;
        Ok(Some(server_from_row(
            &row,
            disks.remove(&id.0).unwrap_or_default(),
        )?))
    }

    async fn record_disk_format(
        &self,
        id: ServerId,
        disk: usize,
        format: ImageFormat,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE server_disks SET format = $1 WHERE server_id = $2 AND idx = $3 AND format IS NULL",
        )
        .bind(format.as_str())
        .bind(id.0)
        .bind(disk as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_servers(&self, scope: Scope, page: PageRequest) -> Result<Paged<Server>> {
        let account = scope.account().map(|a| a.0);
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM servers WHERE $1::BIGINT IS NULL OR account_id = $1",
        )
        .bind(account)
        .fetch_one(&self.pool)
        .await?;
        let rows = sqlx::query(&format!(
            "{SERVER_SELECT} WHERE $1::BIGINT IS NULL OR s.account_id = $1 \
             ORDER BY s.id DESC LIMIT $2 OFFSET $3"
        ))
        .bind(account)
        .bind(page.size as i64)
        .bind(offset(page))
        .fetch_all(&self.pool)
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
        // The server's row lock makes concurrent creates for one server
        // (from any process) count one after the other.
        let (account, _plan) = Self::lock_server_in(&mut tx, backup.server_id, backup.scope)
            .await?
            .ok_or(CatalogError::NotFound("Server"))?;
        if backup.backup_type == BackupType::Manual {
            let used: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM backups WHERE server_id = $1 AND backup_type = 'manual' \
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
            // deleted the first (the index no longer sees it then), whichever
            // replica's scheduler tries.
            let taken = sqlx::query(
                "INSERT INTO auto_backup_slots (server_id, last_slot) VALUES ($1, $2) \
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
        // The id first, so the row is written once with its engine name.
        let id: i64 = sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('backups', 'id'))")
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO backups (id, server_id, account_id, backup_type, status, description, \
               created_at, expires_at, scheduled_for, engine_backup_id) \
             VALUES ($1, $2, $3, $4, 'in_progress', $5, $6, $7, $8, $9)",
        )
        .bind(id)
        .bind(backup.server_id.0)
        .bind(account)
        .bind(backup.backup_type.as_str())
        .bind(&backup.description)
        .bind(secs(now))
        .bind(backup.expires_at.map(secs))
        .bind(backup.scheduled_for.map(secs))
        .bind(engine_backup_id(BackupId(id)))
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            map_db_error(
                e,
                "An automatic backup of this server already exists for this day.",
            )
        })?;
        sqlx::query(
            "INSERT INTO jobs (kind, server_id, backup_id, state, run_after, created_at) \
             VALUES ('backup', $1, $2, 'queued', $3, $4)",
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
            "{BACKUP_SELECT} WHERE b.id = $1 AND ($2::BIGINT IS NULL OR b.account_id = $2)"
        ))
        .bind(id.0)
        .bind(scope.account().map(|a| a.0))
        .fetch_optional(&self.pool)
        .await?
        .map(|r| backup_from_row(&r))
        .transpose()
    }

    async fn list_backups(&self, filter: BackupFilter, page: PageRequest) -> Result<Paged<Backup>> {
        let (rows, count) = match self.read_listing(&filter, page).await {
            Err(e) if session_pool::connection_lost(&e) => {
                // A connection that died since its last use: a listing only
                // reads, so it runs once more, on a new connection.
                self.listings.discard_idle();
                self.read_listing(&filter, page).await?
            }
            read => read?,
        };
        let items = rows.iter().map(backup_from_row).collect::<Result<_>>()?;
        Ok(Paged {
            count: count.max(0) as u64,
            items,
        })
    }

    async fn delete_backup(&self, id: BackupId, scope: Scope) -> Result<DeletedBackup> {
        let mut tx = self.begin().await?;
        // Locked, so a restore created from it meanwhile waits and then
        // finds it gone (create_restore reads it FOR SHARE).
        let row = sqlx::query(&format!(
            "{BACKUP_SELECT} WHERE b.id = $1 AND ($2::BIGINT IS NULL OR b.account_id = $2) \
             FOR UPDATE OF b"
        ))
        .bind(id.0)
        .bind(scope.account().map(|a| a.0))
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(CatalogError::NotFound("Backup"))?;
        let backup = backup_from_row(&row)?;
        let reading: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM restores WHERE backup_id = $1 AND status = 'in_progress')",
        )
        .bind(id.0)
        .fetch_one(&mut *tx)
        .await?;
        if reading {
            return Err(CatalogError::Conflict(
                "A restore from this backup is running; delete it after the restore has finished."
                    .into(),
            ));
        }
        let job: Option<i64> = sqlx::query_scalar(
            "UPDATE jobs SET state = 'cancelled', error = 'The backup was deleted.' \
             WHERE backup_id = $1 AND kind = 'backup' AND state IN ('queued', 'running') RETURNING id",
        )
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM backups WHERE id = $1")
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
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(backup_from_row)
            .collect()
    }

    async fn record_backup_read(&self, id: BackupId, read: &BackupRead) -> Result<()> {
        sqlx::query(
            "UPDATE backups SET incremental = $1, bytes_read = $2, full_reason = $3, \
             consistency = $4 WHERE id = $5",
        )
        .bind(read.incremental)
        .bind(read.bytes_read as i64)
        .bind(&read.full_reason)
        .bind(read.consistency.as_str())
        .bind(id.0)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn incremental_base(&self, server: ServerId) -> Result<Option<Backup>> {
        // As on SQLite: a restore created at or after a backup ran after it.
        let row = sqlx::query(&format!(
            "{BACKUP_SELECT} WHERE b.server_id = $1 AND b.status = 'completed' \
             AND NOT b.damaged AND NOT EXISTS (SELECT 1 FROM restores r \
               WHERE r.server_id = b.server_id AND r.created_at >= b.created_at) \
             ORDER BY b.id DESC LIMIT 1"
        ))
        .bind(server.0)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(backup_from_row).transpose()
    }

    async fn create_restore(&self, restore: NewRestore, now: OffsetDateTime) -> Result<Restore> {
        let mut tx = self.begin().await?;
        // The server's lock orders this against other creates for it (the
        // busy check below), the backup's against its deletion.
        let (account, _) = Self::lock_server_in(&mut tx, restore.server_id, restore.scope)
            .await?
            .ok_or(CatalogError::NotFound("Server"))?;
        let row = sqlx::query(&format!(
            "{BACKUP_SELECT} WHERE b.id = $1 AND ($2::BIGINT IS NULL OR b.account_id = $2) \
             FOR SHARE OF b"
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
             VALUES ($1, $2, $3, 'in_progress', $4) RETURNING id",
        )
        .bind(restore.server_id.0)
        .bind(account)
        .bind(restore.backup_id.0)
        .bind(secs(now))
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO jobs (kind, server_id, backup_id, restore_id, state, run_after, created_at) \
             VALUES ('restore', $1, $2, $3, 'queued', $4, $4)",
        )
        .bind(restore.server_id.0)
        .bind(restore.backup_id.0)
        .bind(id)
        .bind(secs(now))
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(&format!("{RESTORE_SELECT} WHERE r.id = $1"))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        let created = restore_from_row(&row)?;
        tx.commit().await?;
        Ok(created)
    }

    async fn restore(&self, id: RestoreId, scope: Scope) -> Result<Option<Restore>> {
        sqlx::query(&format!(
            "{RESTORE_SELECT} WHERE r.id = $1 AND ($2::BIGINT IS NULL OR r.account_id = $2)"
        ))
        .bind(id.0)
        .bind(scope.account().map(|a| a.0))
        .fetch_optional(&self.pool)
        .await?
        .map(|r| restore_from_row(&r))
        .transpose()
    }

    async fn claim_job_leased(&self, claim: &JobClaim, now: OffsetDateTime) -> Result<Option<Job>> {
        for _ in 0..CLAIM_RETRIES {
            match self.try_claim(claim, now).await {
                Ok(row) => return row.map(|r| job_from_row(&r)).transpose(),
                // Another process's worker took a job of the same server in
                // the same instant; the next attempt's snapshot sees it.
                Err(e) if lost_running_race(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    async fn renew_lease(&self, job: JobId, worker: &str, until: OffsetDateTime) -> Result<bool> {
        // Conditional on the owner: a lease that expired and was taken over
        // (requeued, or claimed by another worker) cannot be renewed. The
        // row lock this takes orders it against a concurrent expiry.
        let renewed = sqlx::query(
            "UPDATE jobs SET lease_expires_at = GREATEST(COALESCE(lease_expires_at, 0), $1) \
             WHERE id = $2 AND state = 'running' AND claimed_by = $3",
        )
        .bind(secs(until))
        .bind(job.0)
        .bind(worker)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(renewed > 0)
    }

    async fn adopt_unassigned_servers(&self, node: &str) -> Result<u64> {
        Ok(
            sqlx::query("UPDATE servers SET node = $1 WHERE node IS NULL")
                .bind(node)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    async fn task_runs_prefixed(&self, prefix: &str) -> Result<Vec<TaskRun>> {
        // A prefix match without LIKE's wildcards: node names may hold `_`.
        let rows = sqlx::query(
            "SELECT name, last_run, summary FROM scheduler_tasks \
             WHERE substr(name, 1, length($1)) = $1 ORDER BY name",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
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
            "SELECT s.node AS node, COUNT(*)::BIGINT AS servers, \
               COUNT(*) FILTER (WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.server_id = s.id AND j.state = 'running'))::BIGINT AS running, \
               COALESCE(SUM((SELECT COUNT(*) FROM jobs j WHERE j.server_id = s.id AND j.state = 'queued')), 0)::BIGINT AS queued \
             FROM servers s GROUP BY s.node ORDER BY s.node",
        )
        .fetch_all(&self.pool)
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
        // One statement: renew the claim and, when it is still ours, move
        // the progress of its backup or restore.
        let progress = progress.min(99) as i64;
        let renewed: Option<i64> = sqlx::query_scalar(
            "WITH j AS (UPDATE jobs SET heartbeat_at = $1 \
                 WHERE id = $2 AND state = 'running' AND claimed_by = $3 \
                 RETURNING kind, backup_id, restore_id), \
             b AS (UPDATE backups SET progress = $4 FROM j \
                 WHERE j.kind <> 'restore' AND backups.id = j.backup_id AND backups.status = 'in_progress'), \
             r AS (UPDATE restores SET progress = $4 FROM j \
                 WHERE j.kind = 'restore' AND restores.id = j.restore_id AND restores.status = 'in_progress') \
             SELECT 1::BIGINT FROM j",
        )
        .bind(secs(now))
        .bind(job.0)
        .bind(worker)
        .bind(progress)
        .fetch_optional(&self.pool)
        .await?;
        Ok(renewed.is_some())
    }

    async fn release_job(&self, job: JobId, worker: &str, now: OffsetDateTime) -> Result<bool> {
        let released: Option<i64> = sqlx::query_scalar(
            "WITH j AS (UPDATE jobs SET state = 'queued', claimed_by = NULL, heartbeat_at = NULL, lease_expires_at = NULL, \
                   attempts = GREATEST(attempts - 1, 0), run_after = $1 \
                 WHERE id = $2 AND state = 'running' AND claimed_by = $3 \
                 RETURNING kind, backup_id, restore_id), \
             b AS (UPDATE backups SET progress = 0 FROM j \
                 WHERE j.kind <> 'restore' AND backups.id = j.backup_id AND backups.status = 'in_progress'), \
             r AS (UPDATE restores SET progress = 0 FROM j \
                 WHERE j.kind = 'restore' AND restores.id = j.restore_id AND restores.status = 'in_progress') \
             SELECT 1::BIGINT FROM j",
        )
        .bind(secs(now))
        .bind(job.0)
        .bind(worker)
        .fetch_optional(&self.pool)
        .await?;
        Ok(released.is_some())
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
            "UPDATE jobs SET state = $1, error = $2, error_detail = $3, finished_at = $4 \
             WHERE id = $5 AND state = 'running' AND claimed_by = $6 \
             RETURNING kind, backup_id, restore_id",
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
                "UPDATE backups SET status = 'completed', progress = 100, size_mb = $1, stored_bytes = $2, \
                   completed_at = $3, error = NULL WHERE id = $4 AND status = 'in_progress'",
            )
            .bind(*size_mb as i64)
            .bind(*stored_bytes as i64)
            .bind(secs(now))
            .bind(backup_id)
            .execute(&mut *tx)
            .await?
            .rows_affected(),
            (JobOutcome::RestoreCompleted, _) => sqlx::query(
                "UPDATE restores SET status = 'completed', progress = 100, completed_at = $1, error = NULL \
                 WHERE id = $2 AND status = 'in_progress'",
            )
            .bind(secs(now))
            .bind(restore_id)
            .execute(&mut *tx)
            .await?
            .rows_affected(),
            (JobOutcome::Failed { reason, .. }, "restore") => sqlx::query(
                "UPDATE restores SET status = 'failed', completed_at = $1, error = $2 \
                 WHERE id = $3 AND status = 'in_progress'",
            )
            .bind(secs(now))
            .bind(reason)
            .bind(restore_id)
            .execute(&mut *tx)
            .await?
            .rows_affected(),
            (JobOutcome::Failed { reason, .. }, _) => sqlx::query(
                "UPDATE backups SET status = 'failed', completed_at = $1, error = $2, size_mb = NULL \
                 WHERE id = $3 AND status = 'in_progress'",
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
            "(heartbeat_at IS NULL OR heartbeat_at < $1)",
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
        self.recover_where("lease_expires_at < $1", secs(expired_at), now)
            .await
    }

    async fn job(&self, id: JobId) -> Result<Option<Job>> {
        sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| job_from_row(&r))
            .transpose()
    }

    async fn import_backup(&self, backup: &ImportedBackup) -> Result<ImportOutcome> {
        self.import(backup).await
    }

    async fn reserve_backup_ids(&self, through: BackupId) -> Result<()> {
        let mut tx = self.begin().await?;
        import::move_sequence_past(&mut tx, "backups", through.0).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn failed_jobs(&self, limit: u32) -> Result<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'failed' ORDER BY id DESC LIMIT $1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
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
