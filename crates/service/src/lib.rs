//! The HTTP service: the VPS.org Backups API over the catalog, token auth,
//! the job runner that drives the engine, and webhook delivery.
//!
//! Entry point: [`run`] (or [`run_with_clock`], or [`run_with_ops`] with a
//! second listener for health and metrics) with settings, a bound listener
//! and a shutdown future, so tests bind port 0 and stop it at will.
//!
//! Error policy: thiserror types here ([`ServiceError`] for start-up,
//! [`error::ApiError`] for requests); the binary wraps them with anyhow.
//! Request errors never leak internals: a database failure is logged and
//! answered with a bare 500.

pub mod agent;
pub mod api;
pub mod auth;
pub mod clock;
pub mod demo;
pub mod error;
pub mod extract;
pub mod hooks;
pub mod leader;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod runner;
mod running;
pub mod scheduler;
pub mod settings;
pub mod webhooks;
mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::serve::ListenerExt;
use axum::ServiceExt;
use tokio::net::TcpListener;
use tower::Layer;
use tower_http::normalize_path::NormalizePathLayer;
use vpsbackup_catalog::{AnyCatalog, Catalog, CatalogError, CatalogUrl, SqliteCatalog};
use vpsbackup_engine::{EngineError, Repository};

pub use clock::{Clock, FileClock, ManualClock, SystemClock};
pub use runner::JobRunner;
pub use settings::{DatabaseUrl, HookCommands, MetricsSettings, Settings};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub catalog: Arc<dyn Catalog>,
    /// The scheduler's view of the catalog: the API shows each server's
    /// next automatic backup from it.
    pub schedule: Arc<dyn vpsbackup_catalog::ScheduleCatalog>,
    pub clock: Arc<dyn Clock>,
    pub settings: Arc<Settings>,
    pub jobs: Arc<JobRunner>,
    pub repo: Repository,
    /// Per-caller request limits; `None` when turned off.
    pub limiter: Option<Arc<api::ratelimit::RateLimiter>>,
}

/// Why the service could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another `vpsbackup serve` (pid {pid}) is using {dir}; stop it first")]
    AlreadyRunning { pid: String, dir: PathBuf },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("cannot open the backup store: {0}")]
    Engine(#[from] EngineError),
    #[error("the HTTP server failed: {0}")]
    Http(#[from] std::io::Error),
}

/// Opens the SQLite catalog of a data dir (creating the directory and
/// database), whatever the settings say: for tests and tools that work on
/// a data dir. Commands use [`connect_catalog`].
pub async fn open_catalog(data_dir: &Path, readers: u32) -> Result<SqliteCatalog, ServiceError> {
    std::fs::create_dir_all(data_dir).map_err(|source| ServiceError::DataDir {
        path: data_dir.to_owned(),
        source,
    })?;
    Ok(SqliteCatalog::open_with_readers(&data_dir.join("catalog.db"), readers).await?)
}

/// Opens the catalog the settings name (`database_url`, else the data
/// dir's SQLite file, creating the directory), with `connections` for
/// reads: the one way `serve` and every command open it.
pub async fn connect_catalog(
    settings: &Settings,
    connections: u32,
) -> Result<AnyCatalog, ServiceError> {
    let url = settings.catalog_url()?;
    if let CatalogUrl::Sqlite(path) = &url {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|source| ServiceError::DataDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    Ok(AnyCatalog::open(&url, connections).await?)
}

/// Serves the API on `listener` until `shutdown` completes, with the system clock.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    run_with_clock(settings, Arc::new(SystemClock), listener, shutdown).await
}

/// [`run`] with an injected clock.
pub async fn run_with_clock(
    settings: Settings,
    clock: Arc<dyn Clock>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    run_with_ops(settings, clock, listener, None, shutdown).await
}

/// [`run_with_clock`], plus the operational endpoints (`/healthz`,
/// `/readyz`, `/metrics`, all open) on `ops_listener` when given (`serve
/// --metrics-listen`). The API listener always has `/healthz` and
/// `/readyz`, and `/metrics` only with `settings.metrics.token`.
pub async fn run_with_ops(
    settings: Settings,
    clock: Arc<dyn Clock>,
    listener: TcpListener,
    ops_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let settings = Arc::new(settings);
    std::fs::create_dir_all(&settings.data_dir).map_err(|source| ServiceError::DataDir {
        path: settings.data_dir.clone(),
        source,
    })?;
    let opened = connect_catalog(&settings, settings.catalog_readers).await?;
    let data_dir_lock = claim_data_dir(&settings.data_dir)?;
    let repo = workers::open_store(&settings).await?;
    let schedule_catalog = opened.schedule();
    let catalog: Arc<dyn Catalog> = opened.catalog();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let workers = workers::Workers::start(
        &opened,
        clock.clone(),
        repo.clone(),
        settings.clone(),
        "serve",
        &stop_rx,
    )
    .await?;
    let jobs = workers.jobs.clone();
    // Automatic backups, expiry, scheduled GC and verification (issue 4),
    // run by one process among those sharing the catalog: the leader. A
    // replica with the scheduler off never takes the lock.
    let leadership = settings.schedule.enabled.then(|| {
        leader::spawn(
            opened.leader_lock(),
            schedule_catalog.clone(),
            clock.clone(),
            jobs.metrics().clone(),
            stop_rx.clone(),
        )
    });
    let scheduler = leadership.as_ref().map(|(leading, _)| {
        Arc::new(
            scheduler::Scheduler::new(
                catalog.clone(),
                schedule_catalog.clone(),
                clock.clone(),
                repo.clone(),
                settings.schedule.clone(),
                Some(jobs.clone()),
            )
            .led_by(leading.clone()),
        )
    });
    let scheduler_task = scheduler.as_ref().map(|s| s.spawn(stop_rx.clone()));
    // Webhook events: written with job outcomes, sent from here.
    let webhook_task = if settings.webhooks.enabled {
        let sender = webhooks::WebhookSender::new(
            catalog.clone(),
            clock.clone(),
            settings.webhooks.clone(),
            jobs.outcomes(),
        )
        .map_err(|e| ServiceError::Http(std::io::Error::other(e)))?;
        Some(Arc::new(sender).spawn(stop_rx.clone()))
    } else {
        None
    };

    let http_metrics = metrics::HttpMetrics::default();
    let ops_state = ops::OpsState::new(
        schedule_catalog.clone(),
        repo.clone(),
        clock.clone(),
        Arc::new(metrics::Metrics::new(
            jobs.metrics().clone(),
            http_metrics.clone(),
        )),
        settings.metrics.token.clone(),
        // The SQLite file /readyz opens afresh; none on PostgreSQL.
        match settings.catalog_url() {
            Ok(vpsbackup_catalog::CatalogUrl::Sqlite(path)) => Some(path),
            _ => None,
        },
    );
    let ops_task = ops_listener
        .map(|l| workers::serve_ops(l, ops_state.clone(), &stop_rx))
        .transpose()?;
    let state = AppState {
        catalog: catalog.clone(),
        schedule: schedule_catalog,
        clock,
        settings: settings.clone(),
        jobs: jobs.clone(),
        repo,
        limiter: settings
            .rate_limit
            .enabled
            .then(|| Arc::new(api::ratelimit::RateLimiter::new(&settings.rate_limit))),
    };
    // The operational endpoints sit beside the API, outside its rate limits.
    let api = api::router(state).layer(axum::middleware::from_fn_with_state(
        http_metrics,
        metrics::track_http,
    ));
    let app =
        NormalizePathLayer::trim_trailing_slash().layer(ops::api_router(ops_state).merge(api));
    tracing::info!(addr = %listener.local_addr()?, data_dir = %settings.data_dir.display(), "serving");
    // With the peer's address: callers without a valid token are rate
    // limited by it.
    // Each response goes out when written: with Nagle's algorithm the last
    // segment of a response waits for the client's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY on an API connection: {e}");
        }
    });
    let served = axum::serve(
        listener,
        ServiceExt::<Request>::into_make_service_with_connect_info::<SocketAddr>(app),
    )
    .with_graceful_shutdown(shutdown)
    .await;

    tracing::info!("stopping: handing running jobs back to the queue");
    workers.hand_back();
    if let Some(s) = &scheduler {
        s.stop();
    }
    let _ = stop_tx.send(true);
    if let Some(task) = scheduler_task {
        if tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .is_err()
        {
            tracing::warn!("the scheduler did not stop in time");
        }
    }
    if let Some((_, task)) = leadership {
        // Released at once, so another replica takes over at its next check.
        if tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .is_err()
        {
            tracing::warn!("the scheduler's leadership did not stop in time");
        }
    }
    if let Some(task) = webhook_task {
        // An attempt cut short is simply retried at the next start.
        if tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .is_err()
        {
            tracing::warn!("webhook delivery did not stop in time");
        }
    }
    workers.join().await;
    workers::join_ops(ops_task).await;
    drop(data_dir_lock);
    served?;
    Ok(())
}

/// The exclusive claim of a data dir by one running service.
///
/// An `flock` on `<data_dir>/serve.pid`, held as long as this value lives:
/// the kernel grants it to one open file at a time and drops it when the
/// process dies, however it dies, so two starts racing each other cannot
/// both pass (a read-then-write pidfile check could) and a crashed service
/// leaves nothing to clean up. The file also holds the owner's pid, for the
/// error message; it is never deleted, because a process that opened it
/// before the deletion could lock the orphaned file while a newer start
/// locks a fresh one.
struct DataDirLock {
    file: std::fs::File,
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        // The lock itself goes with the file; an empty pidfile says "no owner".
        let _ = self.file.set_len(0);
    }
}

/// Takes `<data_dir>/serve.pid`'s lock, refusing when another service holds it.
fn claim_data_dir(data_dir: &Path) -> Result<DataDirLock, ServiceError> {
    use std::io::{Read, Seek, Write};
    let path = data_dir.join("serve.pid");
    let io_err = |source| ServiceError::DataDir {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err)?;
    use rustix::fs::{flock, FlockOperation};
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(ServiceError::AlreadyRunning {
                pid: text
                    .trim()
                    .parse::<u32>()
                    .map_or_else(|_| "unknown".to_owned(), |p| p.to_string()),
                dir: data_dir.to_owned(),
            });
        }
        Err(e) => return Err(io_err(e.into())),
    }
    file.set_len(0).map_err(io_err)?;
    file.rewind().map_err(io_err)?;
    writeln!(file, "{}", std::process::id()).map_err(io_err)?;
    Ok(DataDirLock { file })
}
