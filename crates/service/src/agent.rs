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
use std::time::Duration;

use tokio::net::TcpListener;
use vpsbackup_catalog::{Catalog, CatalogError};

use crate::clock::Clock;
use crate::settings::Settings;
use crate::{connect_catalog, metrics, node, ops, runner, JobRunner, ServiceError};

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
    let for_store = settings.clone();
    let repo = tokio::task::spawn_blocking(move || for_store.open_store())
        .await
        .map_err(|e| ServiceError::Http(std::io::Error::other(e)))??;
    let schedule = opened.schedule();
    let catalog: Arc<dyn Catalog> = opened.catalog();
    runner::recover_at_start(&*catalog, true, &*clock, &settings).await?;

    let jobs = Arc::new(JobRunner::new(
        catalog.clone(),
        clock.clone(),
        repo.clone(),
        settings.clone(),
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let workers = jobs.start(stop_rx.clone());
    let sweeper = tokio::spawn(runner::sweep_leases(
        catalog.clone(),
        clock.clone(),
        Some(jobs.clone()),
        stop_rx.clone(),
    ));
    let node_task = tokio::spawn(node::record_heartbeats(
        schedule.clone(),
        jobs.clone(),
        clock.clone(),
        (settings.workers, "agent"),
        stop_rx.clone(),
    ));
    let ops_task = match ops_listener {
        Some(l) => {
            let state = ops::OpsState::new(
                schedule,
                repo,
                clock,
                Arc::new(metrics::Metrics::new(
                    jobs.metrics().clone(),
                    metrics::HttpMetrics::default(),
                )),
                None,
                None,
            );
            tracing::info!(addr = %l.local_addr()?, "serving /healthz, /readyz and /metrics");
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(async move {
                axum::serve(l, ops::router(state))
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await
            }))
        }
        None => None,
    };
    tracing::info!(
        node = settings.node.as_deref().unwrap_or("(any)"),
        workers = settings.workers,
        "agent running"
    );
    shutdown.await;

    tracing::info!("stopping: handing running jobs back to the queue");
    jobs.stop();
    let _ = stop_tx.send(true);
    for w in workers {
        if tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .is_err()
        {
            tracing::warn!("a worker did not stop in time");
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), sweeper).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), node_task).await;
    if let Some(task) = ops_task {
        if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(5), task).await {
            tracing::warn!(error = %e, "the operational listener failed");
        }
    }
    opened.close().await;
    Ok(())
}
