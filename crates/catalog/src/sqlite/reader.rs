//! The two reads every API request makes (token lookup, a page of backups),
//! on plain rusqlite connections, run by [`off_runtime`] on a few reader
//! threads of their own: a read that stalls (a stalled disk, a lock held by
//! another process) must not hold a runtime thread the rest of the API needs.
//!
//! Why not sqlx here: its SQLite driver runs each connection on its own
//! thread and hands every statement and row across threads; for a 0.1 ms
//! indexed read the thread hand-offs cost more than the read, and capped
//! listing at ~2,000 requests/s on two cores. These reads are bounded
//! (one index lookup; at most 500 rows walked in index order) and WAL never
//! makes a reader wait for a writer, so one hop per read (the whole answer
//! built on the reader thread) is all they pay. Writes and every other read stay on sqlx.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row};

use crate::model::*;
use crate::{CatalogError, Result};

/// A hot read handed to the reader threads.
type ReadJob = Box<dyn FnOnce(&InlineReader) + Send>;

/// Threads of their own for the hot reads, so a read that stalls (a stalled
/// disk, a lock held by another process) holds one of them, never a runtime
/// worker: the rest of the API keeps answering. A fixed few threads, not
/// the blocking pool: under load they stay busy and take the next read
/// without a wake-up, where `spawn_blocking` grew to one thread per
/// connection (7,400 req/s listing against 14,500 inline) and
/// `block_in_place` handed a worker's core to a new thread on every call
/// (4,900 req/s).
#[derive(Debug)]
pub(crate) struct ReadThreads {
    jobs: crossbeam_channel::Sender<ReadJob>,
}

impl ReadThreads {
    /// Starts `n` reader threads over `reader`; they end when the last
    /// handle is dropped.
    pub(crate) fn start(reader: Arc<InlineReader>, n: usize) -> ReadThreads {
        let (jobs, queue) = crossbeam_channel::unbounded::<ReadJob>();
        for i in 0..n {
            let queue = queue.clone();
            let reader = reader.clone();
            std::thread::Builder::new()
                .name(format!("catalog-read-{i}"))
                .spawn(move || {
                    for job in queue {
                        job(&reader);
                    }
                })
                .expect("cannot start a catalog reader thread");
        }
        ReadThreads { jobs }
    }

    /// Runs `read` on a reader thread and waits for it without blocking the
    /// runtime.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        read: impl FnOnce(&InlineReader) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let gone = || {
            CatalogError::Database(sqlx::Error::Protocol(
                "catalog reader threads stopped".into(),
            ))
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |reader| {
                let _ = tx.send(read(reader));
            }))
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// Runs a hot read: on the reader threads under a multi-thread runtime (the
/// service), inline on a current-thread one (admin commands: nothing else
/// to serve, and no threads to start).
pub(crate) async fn off_runtime<T: Send + 'static>(
    reader: &Arc<InlineReader>,
    threads: &std::sync::OnceLock<ReadThreads>,
    read: impl FnOnce(&InlineReader) -> Result<T> + Send + 'static,
) -> Result<T> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            threads
                .get_or_init(|| {
                    let n = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
                    ReadThreads::start(reader.clone(), n)
                })
                .run(read)
                .await
        }
        _ => read(reader),
    }
}

/// Idle connections kept for reuse.
const KEEP_IDLE: usize = 8;

/// A small pool of read-only connections.
#[derive(Debug)]
pub(crate) struct InlineReader {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

fn db_err(e: rusqlite::Error) -> CatalogError {
    CatalogError::Database(sqlx::Error::Protocol(format!("sqlite read failed: {e}")))
}

impl InlineReader {
    pub(crate) fn new(path: &Path) -> InlineReader {
        InlineReader {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
        }
    }

    fn connect(&self) -> Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(db_err)?;
        conn.pragma_update(None, "query_only", true)
            .map_err(db_err)?;
        conn.set_prepared_statement_cache_capacity(32);
        Ok(conn)
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let taken = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match taken {
            Some(c) => c,
            None => self.connect()?,
        };
        let out = f(&conn).map_err(db_err);
        // A connection that failed may be left inside a transaction: drop it.
        if out.is_ok() {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < KEEP_IDLE {
                idle.push(conn);
            }
        }
        out
    }

    pub(crate) fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiToken>> {
        self.with(|c| {
            c.prepare_cached(
                "SELECT t.id, t.token_hash, t.prefix, t.name, t.account_id, t.is_admin, \
                   a.name, t.created_at, t.revoked_at \
                 FROM api_tokens t LEFT JOIN accounts a ON a.id = t.account_id WHERE t.token_hash = ?",
            )?
            .query_row([&hash[..]], |r| {
                let stored: Vec<u8> = r.get(1)?;
                let mut h = [0u8; 32];
                if stored.len() == 32 {
                    h.copy_from_slice(&stored);
                }
                let account: Option<i64> = r.get(4)?;
                let admin: i64 = r.get(5)?;
                Ok(ApiToken {
                    id: TokenId(r.get(0)?),
                    hash: h,
                    prefix: r.get(2)?,
                    name: r.get(3)?,
                    owner: match (admin != 0, account) {
                        (false, Some(a)) => TokenOwner::Account(AccountId(a)),
                        _ => TokenOwner::Admin,
                    },
                    account_name: r.get(6)?,
                    created_at: super::ts(r.get(7)?),
                    revoked_at: super::opt_ts(r.get(8)?),
                })
            })
            .optional()
        })
    }

    pub(crate) fn list_backups(
        &self,
        filter: &BackupFilter,
        page: PageRequest,
    ) -> Result<Paged<Backup>> {
        // Only the conditions in use go into the SQL, so SQLite walks the
        // narrowest index in id order; the count comes from backup_counts
        // or account_backup_counts (kept exact by triggers, migrations 0003
        // and 0013).
        let mut conds: Vec<&str> = Vec::new();
        let mut params: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(a) = filter.scope {
            conds.push("account_id = ?");
            params.push(a.0.into());
        }
        if let Some(s) = filter.server_id {
            conds.push("server_id = ?");
            params.push(s.0.into());
        }
        if let Some(t) = filter.backup_type {
            conds.push("backup_type = ?");
            params.push(t.as_str().to_owned().into());
        }
        let where_sql = where_clause(&conds);
        let counts = filter.counts_table();
        let count_sql = format!("SELECT COALESCE(SUM(n), 0) FROM {counts}{where_sql}");
        let page_where = where_sql
            .replace(" WHERE ", " WHERE b.")
            .replace(" AND ", " AND b.");
        let page_sql = format!(
            "SELECT b.id, b.server_id, s.name, b.account_id, b.backup_type, b.status, b.description, \
               b.created_at, b.expires_at, b.completed_at, b.size_mb, b.stored_bytes, b.progress, \
               b.error, b.engine_backup_id, b.scheduled_for, b.verified_at, b.damaged, b.verify_error, \
               b.incremental, b.bytes_read, b.full_reason, b.consistency \
             FROM backups b JOIN servers s ON s.id = b.server_id{page_where} \
             ORDER BY b.id DESC LIMIT ? OFFSET ?"
        );
        let offset = (page.number.max(1) as i64 - 1) * page.size as i64;
        self.with(|c| {
            // One read transaction: the count and the page see the same snapshot.
            c.prepare_cached("BEGIN")?.execute([])?;
            let result = (|| {
                let count: i64 = c
                    .prepare_cached(&count_sql)?
                    .query_row(rusqlite::params_from_iter(params.iter()), |r| r.get(0))?;
                let mut items = Vec::new();
                if count > offset {
                    let mut all = params.clone();
                    all.push((page.size as i64).into());
                    all.push(offset.into());
                    let mut stmt = c.prepare_cached(&page_sql)?;
                    let mut rows = stmt.query(rusqlite::params_from_iter(all.iter()))?;
                    while let Some(r) = rows.next()? {
                        items.push(backup_from(r)?);
                    }
                }
                Ok(Paged {
                    count: count as u64,
                    items,
                })
            })();
            c.prepare_cached("COMMIT")?.execute([])?;
            result
        })
    }
}

fn backup_from(r: &Row<'_>) -> rusqlite::Result<Backup> {
    let id = BackupId(r.get(0)?);
    let backup_type: String = r.get(4)?;
    let status: String = r.get(5)?;
    let engine_id: Option<String> = r.get(14)?;
    Ok(Backup {
        id,
        server_id: ServerId(r.get(1)?),
        server_name: r.get(2)?,
        account_id: AccountId(r.get(3)?),
        backup_type: BackupType::parse(&backup_type).unwrap_or(BackupType::Manual),
        status: WorkStatus::parse(&status).unwrap_or(WorkStatus::Failed),
        description: r.get(6)?,
        created_at: super::ts(r.get(7)?),
        expires_at: super::opt_ts(r.get(8)?),
        completed_at: super::opt_ts(r.get(9)?),
        size_mb: r.get::<_, Option<i64>>(10)?.map(|v| v as u64),
        stored_bytes: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
        progress: r.get::<_, i64>(12)?.clamp(0, 100) as u8,
        error: r.get(13)?,
        engine_backup_id: engine_id.unwrap_or_else(|| engine_backup_id(id)),
        scheduled_for: super::opt_ts(r.get(15)?),
        verified_at: super::opt_ts(r.get(16)?),
        damaged: r.get::<_, i64>(17)? != 0,
        verify_error: r.get(18)?,
        read: crate::model::backup_read(
            r.get::<_, i64>(19)? != 0,
            r.get(20)?,
            r.get(21)?,
            r.get(22)?,
        ),
    })
}
