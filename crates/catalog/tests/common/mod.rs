//! Fixtures the catalog test files share, and the two backends every
//! catalog test runs against: a SQLite file in a temp dir and a fresh
//! PostgreSQL database (see [`catalog_tests!`]).

#![allow(dead_code)] // each test file uses its own subset

use std::ops::Deref;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use sqlx::Connection;
use time::OffsetDateTime;
use vpsbackup_catalog::*;

/// Runs each test body once per backend, as the tests `NAME::sqlite` and
/// `NAME::postgres`, so one suite checks both and a failure names its
/// backend. The body gets `cat`, a [`TestCatalog`].
#[macro_export]
macro_rules! catalog_tests {
    ($( $(#[$meta:meta])* async fn $name:ident($cat:ident) $body:block )*) => {$(
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run($cat: common::TestCatalog) $body

            #[tokio::test]
            async fn sqlite() {
                run(common::sqlite().await).await
            }

            #[tokio::test]
            async fn postgres() {
                run(common::postgres().await).await
            }
        }
    )*};
}

/// Both catalog traits, so one handle answers the API's and the
/// scheduler's calls.
pub trait CatalogAndSchedule: Catalog + ScheduleCatalog {}
impl<T: Catalog + ScheduleCatalog> CatalogAndSchedule for T {}

/// A catalog of one backend, fresh for one test, with raw SQL for putting
/// it in states the API cannot reach quickly.
#[derive(Clone)]
pub struct TestCatalog {
    backend: Backend,
    /// The SQLite file's dir or the PostgreSQL database, removed on drop.
    _keep: Arc<Keep>,
}

#[derive(Clone)]
enum Backend {
    Sqlite(Arc<SqliteCatalog>),
    Postgres(Arc<PgCatalog>),
}

enum Keep {
    Dir(tempfile::TempDir),
    Database(PgDatabase),
}

impl Deref for TestCatalog {
    type Target = dyn CatalogAndSchedule;
    fn deref(&self) -> &Self::Target {
        match &self.backend {
            Backend::Sqlite(c) => &**c,
            Backend::Postgres(c) => &**c,
        }
    }
}

impl TestCatalog {
    /// Runs SQL written so it means the same on both backends.
    pub async fn execute_raw(&self, sql: &str) -> Result<u64> {
        match &self.backend {
            Backend::Sqlite(c) => c.execute_raw(sql).await,
            Backend::Postgres(c) => c.execute_raw(sql).await,
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Another handle on the same catalog, with its own connections, as a
    /// second process would open it.
    pub async fn another_handle(&self) -> Arc<dyn CatalogAndSchedule> {
        match &*self._keep {
            Keep::Dir(dir) => Arc::new(
                SqliteCatalog::open(&dir.path().join("catalog.db"))
                    .await
                    .unwrap(),
            ),
            Keep::Database(db) => {
                Arc::new(PgCatalog::open_with_connections(&db.url, 4).await.unwrap())
            }
        }
    }
}

/// A new SQLite catalog in a fresh temp dir.
pub async fn sqlite() -> TestCatalog {
    let (dir, cat) = fresh().await;
    TestCatalog {
        backend: Backend::Sqlite(cat),
        _keep: Arc::new(Keep::Dir(dir)),
    }
}

/// A new PostgreSQL catalog in a database of its own.
pub async fn postgres() -> TestCatalog {
    let db = PgDatabase::create().await;
    let cat = PgCatalog::open_with_connections(&db.url, 4)
        .await
        .expect("open the PostgreSQL catalog");
    TestCatalog {
        backend: Backend::Postgres(Arc::new(cat)),
        _keep: Arc::new(Keep::Database(db)),
    }
}

/// A new SQLite catalog in a fresh temp dir (kept alive by the returned guard).
pub async fn fresh() -> (tempfile::TempDir, Arc<SqliteCatalog>) {
    let dir = tempfile::tempdir().unwrap();
    let cat = SqliteCatalog::open(&dir.path().join("catalog.db"))
        .await
        .unwrap();
    (dir, Arc::new(cat))
}

/// The server the PostgreSQL tests make their databases on: a role that
/// may create databases (`.ci/run` sets it up). Never skipped: without a
/// server these tests fail.
pub fn pg_admin_url() -> String {
    std::env::var("VPSBACKUP_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://vpsbackup:vpsbackup@127.0.0.1/vpsbackup".into())
}

/// An empty database made for one test, dropped with it, so tests run in
/// parallel without seeing each other's rows.
pub struct PgDatabase {
    pub url: String,
    name: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "vpsbackup_test_{}_{}_{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let admin = pg_admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is needed by this test: {e}"));
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.ok();
        let base = admin.rsplit_once('/').expect("a database URL").0;
        PgDatabase {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // Drop runs outside async code's reach: a thread with its own
        // runtime does the DROP (FORCE ends the test's own connections).
        let name = self.name.clone();
        let admin = pg_admin_url();
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut conn = sqlx::PgConnection::connect(&admin).await?;
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await?;
                conn.close().await
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// A fixed "now" so times in assertions are exact.
pub fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_750_000_000).unwrap()
}

/// SQL inserting `count` completed backups of type `kind` for `server` of
/// `account`, created one second apart, whose description is the SQL
/// expression `description`: the rows the listing tests need, too many to
/// create through the catalog.
pub fn insert_backups_sql(
    server: i64,
    account: i64,
    kind: &str,
    count: i64,
    description: &str,
) -> String {
    format!(
        "INSERT INTO backups (server_id, account_id, backup_type, status, description, \
            created_at, completed_at, size_mb, progress) \
         SELECT {server}, {account}, '{kind}', 'completed', {description}, 1000 + i, 1060 + i, 1, 100 \
         FROM generate_series(1, {count}) AS i"
    )
}

/// Server `id` ("srv-<id>") of `account` on `plan`, with one raw disk.
pub fn new_server(id: i64, account: AccountId, plan: PlanId) -> NewServer {
    NewServer {
        id: ServerId(id),
        name: format!("srv-{id}"),
        hostname: String::new(),
        account_id: account,
        plan_id: plan,
        disks: vec![ServerDisk::new(
            format!("/tmp/disk-{id}.img"),
            ImageFormat::Raw,
        )],
        hooks: Hooks::default(),
        runtime: Default::default(),
        node: None,
    }
}
