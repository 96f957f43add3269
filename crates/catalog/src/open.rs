//! One way in for the service and the command line: a database URL names
//! the backend (`sqlite://PATH` or `postgres://USER:PASS@HOST/DB`), and
//! [`AnyCatalog::open`] gives the catalog behind the traits, so no caller
//! names a backend.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{Catalog, CatalogError, PgCatalog, Result, ScheduleCatalog, SqliteCatalog};

/// Where a catalog lives.
#[derive(Clone, PartialEq, Eq)]
pub enum CatalogUrl {
    /// A SQLite file (created if missing).
    Sqlite(PathBuf),
    /// A PostgreSQL database, as a `postgres://` URL.
    Postgres(String),
}

impl CatalogUrl {
    /// Parses `sqlite://PATH` (`sqlite:PATH` too) or `postgres://...`
    /// (`postgresql://...`).
    pub fn parse(url: &str) -> Result<CatalogUrl> {
        let url = url.trim();
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                return Err(CatalogError::Invalid(
                    "A sqlite:// database URL needs the path of the catalog file, e.g. sqlite:///var/lib/vpsbackup/catalog.db."
                        .into(),
                ));
            }
            return Ok(CatalogUrl::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(CatalogUrl::Postgres(url.to_owned()));
        }
        Err(CatalogError::Invalid(format!(
            "The database URL {} is neither sqlite://PATH nor postgres://USER:PASS@HOST/DB.",
            redact(url)
        )))
    }

    /// The SQLite file of a data dir: the default catalog.
    pub fn in_data_dir(dir: &Path) -> CatalogUrl {
        CatalogUrl::Sqlite(dir.join("catalog.db"))
    }
}

/// The URL with any password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

impl std::fmt::Display for CatalogUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CatalogUrl::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            CatalogUrl::Postgres(u) => f.write_str(&redact(u)),
        }
    }
}

// The URL may hold a password: Debug shows it redacted, as Display does.
impl std::fmt::Debug for CatalogUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CatalogUrl({self})")
    }
}

/// An open catalog of either backend.
#[derive(Clone, Debug)]
pub enum AnyCatalog {
    Sqlite(SqliteCatalog),
    Postgres(PgCatalog),
}

impl AnyCatalog {
    /// Opens (creating a SQLite file if missing) and migrates the catalog at
    /// `url`. `connections`: SQLite's reader connections, PostgreSQL's pool.
    pub async fn open(url: &CatalogUrl, connections: u32) -> Result<AnyCatalog> {
        Ok(match url {
            CatalogUrl::Sqlite(path) => {
                AnyCatalog::Sqlite(SqliteCatalog::open_with_readers(path, connections).await?)
            }
            CatalogUrl::Postgres(url) => {
                // The listings get the readers asked for; the pool, which
                // also carries the workers' writes, a few more.
                let pool = connections.saturating_add(4);
                AnyCatalog::Postgres(PgCatalog::open_with_pools(url, pool, connections).await?)
            }
        })
    }

    /// The catalog behind the API's trait.
    pub fn catalog(&self) -> Arc<dyn Catalog> {
        match self {
            AnyCatalog::Sqlite(c) => Arc::new(c.clone()),
            AnyCatalog::Postgres(c) => Arc::new(c.clone()),
        }
    }

    /// The same catalog behind the scheduler's trait.
    pub fn schedule(&self) -> Arc<dyn ScheduleCatalog> {
        match self {
            AnyCatalog::Sqlite(c) => Arc::new(c.clone()),
            AnyCatalog::Postgres(c) => Arc::new(c.clone()),
        }
    }

    /// True when other machines' processes may share this catalog (so a
    /// running job is not necessarily one of a process that died).
    pub fn is_shared(&self) -> bool {
        matches!(self, AnyCatalog::Postgres(_))
    }

    /// The scheduler's leadership: a PostgreSQL advisory lock shared by
    /// every process on the database; on SQLite always held.
    pub fn leader_lock(&self) -> crate::LeaderLock {
        match self {
            AnyCatalog::Sqlite(_) => crate::LeaderLock::local(),
            AnyCatalog::Postgres(c) => c.leader_lock(),
        }
    }

    /// Calls `wake` when another process queues a job for `node`'s workers
    /// (see [`PgCatalog::wake_on_queued_jobs`]), until the handle is
    /// dropped. None on SQLite: its one process wakes its own workers.
    pub fn wake_on_queued_jobs(
        &self,
        node: &str,
        wake: impl Fn() + Send + 'static,
    ) -> Option<crate::Listening> {
        match self {
            AnyCatalog::Sqlite(_) => None,
            AnyCatalog::Postgres(c) => Some(c.wake_on_queued_jobs(node, wake)),
        }
    }

    /// Closes the connections (SQLite: checkpoints the WAL).
    pub async fn close(&self) {
        match self {
            AnyCatalog::Sqlite(c) => c.close().await,
            AnyCatalog::Postgres(c) => c.close().await,
        }
    }

    /// Runs raw SQL (the benchmark seeder and tests).
    pub async fn execute_raw(&self, sql: &str) -> Result<u64> {
        match self {
            AnyCatalog::Sqlite(c) => c.execute_raw(sql).await,
            AnyCatalog::Postgres(c) => c.execute_raw(sql).await,
        }
    }
}

impl std::ops::Deref for AnyCatalog {
    type Target = dyn Catalog;
    fn deref(&self) -> &Self::Target {
        match self {
            AnyCatalog::Sqlite(c) => c,
            AnyCatalog::Postgres(c) => c,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_backend_and_passwords_stay_hidden() {
        assert_eq!(
            CatalogUrl::parse("sqlite:///var/lib/v/catalog.db").unwrap(),
            CatalogUrl::Sqlite("/var/lib/v/catalog.db".into())
        );
        assert_eq!(
            CatalogUrl::parse("sqlite:rel/catalog.db").unwrap(),
            CatalogUrl::Sqlite("rel/catalog.db".into())
        );
        let pg = CatalogUrl::parse("postgres://app:s3cret@db.internal:5432/vpsbackup").unwrap();
        assert_eq!(
            pg.to_string(),
            "postgres://app:***@db.internal:5432/vpsbackup"
        );
        assert!(!format!("{pg:?}").contains("s3cret"));
        let bad = CatalogUrl::parse("mysql://root:hunter2@h/db").unwrap_err();
        assert!(matches!(bad, CatalogError::Invalid(_)));
        assert!(!bad.to_string().contains("hunter2"), "{bad}");
        assert!(CatalogUrl::parse("sqlite://").is_err());
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }
}
