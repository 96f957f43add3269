//! Operational endpoints for the provider's monitoring, outside the customer
//! API: `GET /healthz` (the process answers), `GET /readyz` (the catalog and
//! the store answer: 200, else 503 with a plain reason).
//!
//! They take no token, are not rate limited, and are not in the OpenAPI
//! document: load balancers and orchestrators call them, not customers.
//! They answer on the API listener and on the separate operational listener
//! (`serve --metrics-listen`). Their texts name no host path: the detail of a
//! failed check goes to the log only.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use vpsbackup_catalog::ScheduleCatalog;
use vpsbackup_engine::Repository;

use crate::clock::Clock;

/// How long one readiness check may wait for the catalog or the store
/// before it counts as unreachable (a stopped database server, a hung mount).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// What the operational endpoints read.
#[derive(Clone)]
pub struct OpsState {
    pub schedule: Arc<dyn ScheduleCatalog>,
    pub repo: Repository,
    pub clock: Arc<dyn Clock>,
    /// The SQLite catalog's file, when the catalog is one: see
    /// [`OpsState::check_catalog`].
    catalog_file: Option<PathBuf>,
    /// A store check still running (a hung mount): later checks answer 503
    /// at once instead of piling up blocked threads behind it.
    store_check_running: Arc<AtomicBool>,
}

impl OpsState {
    pub fn new(
        schedule: Arc<dyn ScheduleCatalog>,
        repo: Repository,
        clock: Arc<dyn Clock>,
        catalog_file: Option<PathBuf>,
    ) -> OpsState {
        OpsState {
            schedule,
            repo,
            clock,
            catalog_file,
            store_check_running: Arc::new(AtomicBool::new(false)),
        }
    }

    /// `Ok` when the catalog and the store both answer; else the first
    /// plain reason (the detail is logged).
    pub async fn readiness(&self) -> Result<(), &'static str> {
        self.check_catalog().await?;
        self.check_store().await
    }

    /// A real read of the job queue, the table every process depends on.
    /// That read alone misses a SQLite file deleted, replaced or emptied
    /// under the running service: its open connections keep the old file
    /// and answer from their page cache. So the file is also opened afresh
    /// by its path and its header read, as the next `vpsbackup` command or
    /// a restarted service would.
    async fn check_catalog(&self) -> Result<(), &'static str> {
        if let Some(path) = self.catalog_file.clone() {
            let header = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
                let mut head = [0u8; 16];
                std::fs::File::open(&path)?.read_exact(&mut head)?;
                Ok(&head == b"SQLite format 3\0")
            });
            match tokio::time::timeout(CHECK_TIMEOUT, header).await {
                Ok(Ok(Ok(true))) => {}
                Ok(Ok(Ok(false))) => {
                    tracing::warn!("readiness: the catalog file is not a SQLite database");
                    return Err("the catalog cannot be read");
                }
                Ok(Ok(Err(e))) => {
                    tracing::warn!(error = %e, "readiness: the catalog file cannot be read");
                    return Err("the catalog cannot be read");
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "readiness: the catalog check failed");
                    return Err("the catalog cannot be read");
                }
                Err(_) => {
                    tracing::warn!("readiness: the catalog file did not answer in time");
                    return Err("the catalog did not answer in time");
                }
            }
        }
        match tokio::time::timeout(CHECK_TIMEOUT, self.schedule.job_counts(self.clock.now())).await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness: the catalog cannot be read");
                Err("the catalog cannot be read")
            }
            Err(_) => {
                tracing::warn!("readiness: the catalog did not answer in time");
                Err("the catalog did not answer in time")
            }
        }
    }

    async fn check_store(&self) -> Result<(), &'static str> {
        if self.store_check_running.swap(true, Ordering::SeqCst) {
            return Err("the backup store did not answer in time");
        }
        let repo = self.repo.clone();
        let running = self.store_check_running.clone();
        // The store's config object: every store has it, and reading it
        // touches the same backend the jobs use (a directory, a bucket).
        let task = tokio::task::spawn_blocking(move || {
            let res = repo.storage().head("config");
            running.store(false, Ordering::SeqCst);
            res
        });
        match tokio::time::timeout(CHECK_TIMEOUT, task).await {
            Ok(Ok(Ok(Some(_)))) => Ok(()),
            Ok(Ok(Ok(None))) => {
                tracing::warn!(
                    "readiness: the backup store has no config object (moved or replaced?)"
                );
                Err("the backup store cannot be read")
            }
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "readiness: the backup store cannot be read");
                Err("the backup store cannot be read")
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness: the store check failed");
                Err("the backup store cannot be read")
            }
            Err(_) => {
                tracing::warn!("readiness: the backup store did not answer in time");
                Err("the backup store did not answer in time")
            }
        }
    }
}

/// `/healthz` and `/readyz`.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

fn plain(status: StatusCode, text: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        text,
    )
        .into_response()
}

/// The process is up and its HTTP server answers; touches nothing else, so a
/// slow catalog never gets a live process restarted.
async fn healthz() -> Response {
    plain(StatusCode::OK, "ok\n".into())
}

/// The catalog and the store answer: 200, or 503 with the reason.
async fn readyz(State(state): State<OpsState>) -> Response {
    match state.readiness().await {
        Ok(()) => plain(StatusCode::OK, "ready\n".into()),
        Err(reason) => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}
