//! The listings' connections: handed out and taken back without a round trip.
//!
//! sqlx's pool pings every connection it takes back (in a task of its own,
//! to flush whatever a cancelled statement left on it), so a listing through
//! it costs two round trips to PostgreSQL where one does the work, and the
//! second keeps the connection from the next request meanwhile. Here a
//! connection goes back only when its user says its statements completed
//! ([`Leased::release`]); a lease dropped before that (an error, a request
//! cancelled mid-read) closes its connection instead, so a half-read
//! connection is never handed out again. A connection unused for
//! [`TRUSTED_IDLE`] is pinged before reuse, and replaced if it does not
//! answer (a restarted server); one that died within that time fails its
//! statement, which the listing then runs once more on a new connection
//! ([`connection_lost`], [`SessionPool::discard_idle`]).

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::TRUSTED_IDLE;

/// Idle connections older than this are closed when one is taken back, so a
/// burst's connections do not hold PostgreSQL backends forever (sqlx's
/// pool's default idle timeout).
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

pub(crate) struct SessionPool {
    options: PgConnectOptions,
    /// Most recently used last: the next lease takes the warmest.
    idle: Mutex<Vec<(PgConnection, Instant)>>,
    slots: Semaphore,
    acquire_timeout: Duration,
}

impl std::fmt::Debug for SessionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPool")
            .field("idle", &self.idle.lock().map(|i| i.len()).unwrap_or(0))
            .field("free", &self.slots.available_permits())
            .finish()
    }
}

/// One connection of a [`SessionPool`], its own until released or dropped.
pub(crate) struct Leased<'p> {
    conn: Option<PgConnection>,
    pool: &'p SessionPool,
    _slot: SemaphorePermit<'p>,
}

impl SessionPool {
    /// At most `connections` connections made with `options`, none made yet;
    /// a lease waits at most `acquire_timeout` for a free one.
    pub(crate) fn new(
        options: PgConnectOptions,
        connections: u32,
        acquire_timeout: Duration,
    ) -> SessionPool {
        SessionPool {
            options,
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(connections as usize),
            acquire_timeout,
        }
    }

    /// A connection: the warmest idle one that answers, else a new one;
    /// waiting for a slot, pings and connecting all within the acquire
    /// timeout (a server that stopped answering must not hang a listing).
    pub(crate) async fn acquire(&self) -> Result<Leased<'_>, sqlx::Error> {
        tokio::time::timeout(self.acquire_timeout, self.lease())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
    }

    async fn lease(&self) -> Result<Leased<'_>, sqlx::Error> {
        let slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let conn = loop {
            let popped = self.idle.lock().expect("idle connections").pop();
            match popped {
                Some((conn, since)) if since.elapsed() < TRUSTED_IDLE => break conn,
                Some((mut conn, _)) => {
                    if conn.ping().await.is_ok() {
                        break conn;
                    }
                }
                None => break PgConnection::connect_with(&self.options).await?,
            }
        };
        Ok(Leased {
            conn: Some(conn),
            pool: self,
            _slot: slot,
        })
    }

    /// Drops every idle connection: after one was found dead, the others
    /// idle beside it most likely died with it (a restarted server).
    pub(crate) fn discard_idle(&self) {
        self.idle.lock().expect("idle connections").clear();
    }

    /// Refuses new leases and closes the idle connections.
    pub(crate) async fn close(&self) {
        self.slots.close();
        let idle = std::mem::take(&mut *self.idle.lock().expect("idle connections"));
        for (conn, _) in idle {
            let _ = conn.close().await;
        }
    }
}

/// True when `e` says the connection itself is gone (closed, reset, or its
/// session ended by the server: SQLSTATE class 57P, operator intervention)
/// rather than that a statement failed.
pub(crate) fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| code.starts_with("57P")),
        _ => false,
    }
}

impl Leased<'_> {
    /// Gives the connection back for reuse: call only when every statement
    /// run on it has been read to its end.
    pub(crate) fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            let mut idle = self.pool.idle.lock().expect("idle connections");
            // The oldest are first; those past the timeout are dropped
            // (closing their sockets; PostgreSQL ends such a session quietly).
            let stale = idle
                .iter()
                .take_while(|(_, since)| since.elapsed() >= IDLE_TIMEOUT)
                .count();
            idle.drain(..stale);
            idle.push((conn, Instant::now()));
        }
    }
}

impl Deref for Leased<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn.as_ref().expect("a lease holds its connection")
    }
}

impl DerefMut for Leased<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("a lease holds its connection")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that accepts connections and never answers (a hung host, a
    /// network that drops everything): a lease gives up at the timeout.
    #[tokio::test]
    async fn a_server_that_never_answers_times_the_lease_out() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut sockets = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                sockets.push(socket);
            }
        });
        let options = PgConnectOptions::new()
            .host("127.0.0.1")
            .port(port)
            .username("nobody");
        let pool = SessionPool::new(options, 1, Duration::from_millis(300));
        let started = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(10), pool.acquire())
            .await
            .expect("the lease returns");
        assert!(matches!(outcome, Err(sqlx::Error::PoolTimedOut)));
        assert!(started.elapsed() < Duration::from_secs(5));
        // The slot is free again for the next lease.
        assert_eq!(pool.slots.available_permits(), 1);
        held.abort();
    }
}
