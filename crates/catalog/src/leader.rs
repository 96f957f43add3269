//! Which process runs the scheduler when several `serve` replicas share one
//! catalog: the holder of [`LeaderLock`].
//!
//! On PostgreSQL leadership is a session-level advisory lock
//! (`pg_try_advisory_lock`) held on a connection of its own, outside the
//! pool (a pooled connection would be handed to other queries and could be
//! closed by the pool, silently dropping the lock). Why a lock and not a
//! lease row renewed by the leader: the database itself ties the lock to the
//! holder's session, so it goes the moment the holder's connection does
//! (kill -9, a crash; power loss once the server's TCP keepalive, set to
//! about 25 s on this connection by [`keep_alive`], finds the peer gone),
//! with no renewal traffic, no expiry to tune and no trust in the replicas'
//! clocks (which the scheduler may even simulate). The holder checks its
//! connection on every [`LeaderLock::hold`]: a broken one means the lock is
//! gone, so it steps down before a successor can have taken over for long.
//! Two schedulers running for a moment (a holder not yet aware of its lost
//! session) still create at most one automatic backup per server and day:
//! `create_backup` takes the day's slot and the unique index backs it.
//!
//! On SQLite (one box) the one process is always the leader.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection;

use crate::{CatalogError, Result};

/// The advisory lock's key: "vpsbackup" and "sched" in ASCII, one number
/// for every replica of one database (no other user of the database takes
/// it).
pub const SCHEDULER_LOCK_KEY: i64 = 0x7670_7362_7363_6864;

/// The advisory lock every GC of the store takes when the catalog is
/// shared ("vpsb" and "gclk" in ASCII): see [`crate::ScheduleCatalog::claim_gc_turn`].
pub const GC_LOCK_KEY: i64 = 0x7670_7362_6763_6c6b;

/// The store-wide turn to collect garbage, held until dropped. On
/// PostgreSQL a session advisory lock on a connection of its own (out of
/// the pool, so nothing else runs on it or returns it to the pool still
/// locked): dropping the connection ends the session and the lock, and so
/// does the holder's death, however it dies.
pub struct GcTurn {
    _session: Option<PgConnection>,
}

impl GcTurn {
    /// The turn on a catalog no other process shares (SQLite): one host,
    /// whose GCs the store's host lock keeps apart.
    pub fn local() -> GcTurn {
        GcTurn { _session: None }
    }

    pub(crate) fn held_by(session: PgConnection) -> GcTurn {
        GcTurn {
            _session: Some(session),
        }
    }
}

impl std::fmt::Debug for GcTurn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcTurn")
            .field("shared", &self._session.is_some())
            .finish()
    }
}

/// How long a leadership query may take before the connection is given up.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The right to run the scheduler. Dropping it releases it (the
/// PostgreSQL connection closes with it).
pub struct LeaderLock {
    kind: Kind,
}

enum Kind {
    /// A catalog no other process shares: always the leader.
    Local,
    Postgres {
        options: Box<PgConnectOptions>,
        conn: Option<PgConnection>,
        held: bool,
    },
}

impl std::fmt::Debug for LeaderLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderLock")
            .field("held", &self.is_held())
            .finish()
    }
}

impl LeaderLock {
    /// The lock of a catalog this process has to itself (SQLite).
    pub fn local() -> LeaderLock {
        LeaderLock { kind: Kind::Local }
    }

    pub(crate) fn postgres(options: PgConnectOptions) -> LeaderLock {
        LeaderLock {
            kind: Kind::Postgres {
                options: Box::new(keep_alive(options)),
                conn: None,
                held: false,
            },
        }
    }

    /// Whether the last [`LeaderLock::hold`] found this process the leader.
    pub fn is_held(&self) -> bool {
        match &self.kind {
            Kind::Local => true,
            Kind::Postgres { held, .. } => *held,
        }
    }

    /// Takes the lock if it is free, or checks it is still this process's:
    /// `Ok(true)` while this process leads. An error (the database cannot
    /// be reached) means not leading; the next call connects again.
    pub async fn hold(&mut self) -> Result<bool> {
        let Kind::Postgres {
            options,
            conn,
            held,
        } = &mut self.kind
        else {
            return Ok(true);
        };
        let result = Self::hold_pg(options, conn, *held).await;
        *held = matches!(result, Ok(true));
        if result.is_err() {
            // The session, and any lock it held, is gone or unusable.
            *conn = None;
        }
        result
    }

    async fn hold_pg(
        options: &PgConnectOptions,
        conn: &mut Option<PgConnection>,
        held: bool,
    ) -> Result<bool> {
        let timed_out =
            |what: &str| CatalogError::Unreachable(format!("no answer to {what} within 5 seconds"));
        if conn.is_none() {
            let c = tokio::time::timeout(QUERY_TIMEOUT, PgConnection::connect_with(options))
                .await
                .map_err(|_| timed_out("a connection"))??;
            *conn = Some(c);
        }
        let Some(c) = conn.as_mut() else {
            return Ok(false);
        };
        if held {
            // Still ours while the session lives: a round trip proves it.
            tokio::time::timeout(QUERY_TIMEOUT, sqlx::query("SELECT 1").execute(&mut *c))
                .await
                .map_err(|_| timed_out("a leadership check"))??;
            return Ok(true);
        }
        let got: bool = tokio::time::timeout(
            QUERY_TIMEOUT,
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(SCHEDULER_LOCK_KEY)
                .fetch_one(&mut *c),
        )
        .await
        .map_err(|_| timed_out("a leadership claim"))??;
        Ok(got)
    }

    /// Gives the lock up now (a clean stop), so another replica need not
    /// wait for this process's connection to be noticed closed.
    pub async fn release(&mut self) {
        if let Kind::Postgres { conn, held, .. } = &mut self.kind {
            *held = false;
            if let Some(mut c) = conn.take() {
                // Unlocked first: closing the session releases it too, but
                // only once the server has ended the backend, a moment later.
                let _ = tokio::time::timeout(
                    QUERY_TIMEOUT,
                    sqlx::query("SELECT pg_advisory_unlock($1)")
                        .bind(SCHEDULER_LOCK_KEY)
                        .execute(&mut c),
                )
                .await;
                let _ = tokio::time::timeout(QUERY_TIMEOUT, c.close()).await;
            }
        }
    }
}

/// Makes the server notice within about 25 s (10 s idle, then 3 probes 5 s
/// apart) that the peer of a session vanished without closing its socket
/// (power loss, a partition), rather than after the system's two hours: a
/// lock the session holds is then released. Set as startup options of the
/// lock sessions; they do not apply over a Unix socket.
pub(crate) fn keep_alive(options: PgConnectOptions) -> PgConnectOptions {
    options.options([
        ("tcp_keepalives_idle", "10"),
        ("tcp_keepalives_interval", "5"),
        ("tcp_keepalives_count", "3"),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lock sessions' keepalive, as the server applies it (over TCP,
    /// as the tests' PostgreSQL is reached).
    #[tokio::test]
    async fn a_lock_session_is_probed_within_seconds_not_hours() {
        let url = std::env::var("VPSBACKUP_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://vpsbackup:vpsbackup@127.0.0.1/vpsbackup".into());
        let options: PgConnectOptions = url.parse().unwrap();
        let mut c = PgConnection::connect_with(&keep_alive(options))
            .await
            .unwrap();
        for (name, want) in [
            ("tcp_keepalives_idle", "10"),
            ("tcp_keepalives_interval", "5"),
            ("tcp_keepalives_count", "3"),
        ] {
            let got: String = sqlx::query_scalar(&format!("SHOW {name}"))
                .fetch_one(&mut c)
                .await
                .unwrap();
            assert_eq!(got, want, "{name}");
        }
    }
}
