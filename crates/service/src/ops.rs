//! Operational endpoints for the provider's monitoring, outside the customer
//! API: `GET /healthz` (the process answers), `GET /readyz` (the catalog and
//! the store answer: 200, else 503 with a plain reason), `GET /metrics`
//! (Prometheus text format, see [`crate::metrics`]).
//!
//! They are not rate limited and not in the OpenAPI document: load
//! balancers, orchestrators and Prometheus call them, not customers. On the
//! separate operational listener (`serve --metrics-listen`, meant for the
//! provider's monitoring network) all three are open. On the public API
//! listener `/healthz` and `/readyz` are open (they say nothing about
//! anyone), and `/metrics` exists only when the operator set a metrics token,
//! and then answers only to it. Texts name no host path: the detail of a
//! failed check goes to the log only.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use vpsbackup_catalog::ScheduleCatalog;
use vpsbackup_engine::Repository;

use crate::clock::Clock;
use crate::metrics::Metrics;

/// How long one readiness check may wait for the catalog or the store
/// before it counts as unreachable (a stopped database server, a hung mount).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// What the operational endpoints read.
#[derive(Clone)]
pub struct OpsState {
    pub schedule: Arc<dyn ScheduleCatalog>,
    pub repo: Repository,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    /// `/metrics` on the API listener answers only to this bearer token.
    metrics_token: Option<String>,
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
        metrics: Arc<Metrics>,
        metrics_token: Option<String>,
        catalog_file: Option<PathBuf>,
    ) -> OpsState {
        OpsState {
            schedule,
            repo,
            clock,
            metrics,
            metrics_token: metrics_token.filter(|t| !t.is_empty()),
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

/// The operational listener: `/healthz`, `/readyz` and `/metrics`, open.
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Beside the customer API: `/healthz` and `/readyz`, and `/metrics` only
/// when a metrics token is set (provider only).
pub fn api_router(state: OpsState) -> Router {
    let r = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if state.metrics_token.is_some() {
        r.route("/metrics", get(metrics_with_token))
    } else {
        r
    }
    .with_state(state)
}

/// Encodes the metrics (the catalog and store gauges are read now).
async fn metrics(State(state): State<OpsState>) -> Response {
    let text = state
        .metrics
        .scrape(&*state.schedule, &state.repo, state.clock.now())
        .await;
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-store"),
        ],
        text,
    )
        .into_response()
}

/// [`metrics`] for the holder of the metrics token only.
async fn metrics_with_token(State(state): State<OpsState>, headers: HeaderMap) -> Response {
    use subtle::ConstantTimeEq;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = match (given, &state.metrics_token) {
        // Hashes first: equal lengths for the comparison, whatever was sent.
        (Some(g), Some(t)) => {
            bool::from(crate::auth::hash_token(g).ct_eq(&crate::auth::hash_token(t)))
        }
        _ => false,
    };
    if !ok {
        let mut resp = plain(
            StatusCode::UNAUTHORIZED,
            "The metrics token is required.\n".into(),
        );
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    metrics(State(state)).await
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
