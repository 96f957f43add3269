//! `vpsbackup agent`: the job workers of one hypervisor node, without the
//! API.
//!
//! An agent runs on each machine that holds servers' disks. It claims only
//! jobs of servers on its node (`Settings::node`), reads and writes disk
//! paths on its own machine, renews the leases of the jobs it runs,
//! requeues jobs whose lease ran out (any process's), records its node's
//! heartbeat for `vpsbackup status`, and serves `/healthz`, `/readyz` and
//! `/metrics` on its own small listener when given one. It needs a shared
//! (PostgreSQL) catalog: on one box with SQLite, `serve` runs the workers.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use vpsbackup_catalog::CatalogError;

use crate::clock::Clock;
use crate::settings::Settings;
use crate::{connect_catalog, metrics, ops, workers, ServiceError};

/// Runs the agent until `shutdown` completes; running jobs are then handed
/// back to the queue (as `serve` does).
pub async fn run_agent(
    settings: Settings,
    clock: Arc<dyn Clock>,
    ops_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let settings = Arc::new(settings);
    if settings.workers == 0 {
        return Err(CatalogError::Invalid(
            "An agent needs at least one worker (--workers).".into(),
        )
        .into());
    }
    let opened = connect_catalog(&settings, 2).await?;
    if !opened.is_shared() {
        return Err(CatalogError::Invalid(
            "An agent needs a PostgreSQL catalog (--database-url postgres://...); on one machine with SQLite, `vpsbackup serve` runs the jobs."
                .into(),
        )
        .into());
    }
    let repo = workers::open_store(&settings).await?;
    let schedule = opened.schedule();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let workers = workers::Workers::start(
        &opened,
        clock.clone(),
        repo.clone(),
        settings.clone(),
        "agent",
        &stop_rx,
    )
    .await?;
    let ops_task = ops_listener
        .map(|l| {
            let state = ops::OpsState::new(
                schedule,
                repo,
                clock,
                Arc::new(metrics::Metrics::new(
                    workers.jobs.metrics().clone(),
                    metrics::HttpMetrics::default(),
                )),
                None,
                None,
            );
            workers::serve_ops(l, state, &stop_rx)
        })
        .transpose()?;
    tracing::info!(
        node = settings.node.as_deref().unwrap_or("(any)"),
        workers = settings.workers,
        "agent running"
    );
    shutdown.await;

    tracing::info!("stopping: handing running jobs back to the queue");
    workers.hand_back();
    let _ = stop_tx.send(true);
    workers.join().await;
    workers::join_ops(ops_task).await;
    opened.close().await;
    Ok(())
}
