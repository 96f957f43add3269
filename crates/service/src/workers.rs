//! What `serve` and `agent` both run to execute jobs: the store, start-up
//! recovery, the job workers, the lease sweeper and the node's heartbeat,
//! and the operational listener. One start and one stop sequence, so the
//! two commands cannot drift apart.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vpsbackup_catalog::{AnyCatalog, Listening};
use vpsbackup_engine::Repository;

use crate::clock::Clock;
use crate::settings::Settings;
use crate::{node, ops, runner, JobRunner, ServiceError};

/// Opens the store the settings name, off the runtime (opening an S3 store
/// or syncing the index cache blocks).
pub(crate) async fn open_store(settings: &Arc<Settings>) -> Result<Repository, ServiceError> {
    let settings = settings.clone();
    Ok(tokio::task::spawn_blocking(move || settings.open_store())
        .await
        .map_err(|e| ServiceError::Http(std::io::Error::other(e)))??)
}

/// The running job workers and their helpers.
pub(crate) struct Workers {
    pub jobs: Arc<JobRunner>,
    workers: Vec<JoinHandle<()>>,
    sweeper: JoinHandle<()>,
    heartbeat: Option<JoinHandle<()>>,
    /// Wakes the workers for jobs queued by other processes (PostgreSQL).
    wakeups: Option<Listening>,
}

impl Workers {
    /// Finishes or fails what a previous run left (on a shared catalog only
    /// this node's expired leases, as other processes may be running), then
    /// starts `settings.workers` job workers, the sweeper of expired leases
    /// (any process's) and, when there are workers, the node's heartbeat
    /// recorded as `role`. On PostgreSQL the catalog wakes the workers when
    /// any process queues a job for their node, so they need not poll often
    /// (on SQLite the one process wakes its own; workers of any node, no
    /// `settings.node`, poll). Everything stops when `stop` turns true.
    pub async fn start(
        opened: &AnyCatalog,
        clock: Arc<dyn Clock>,
        repo: Repository,
        settings: Arc<Settings>,
        role: &'static str,
        stop: &watch::Receiver<bool>,
    ) -> Result<Workers, ServiceError> {
        let catalog = opened.catalog();
        runner::recover_at_start(&*catalog, opened.is_shared(), &*clock, &settings).await?;
        let workers_n = settings.workers;
        let node = settings.node.clone();
        let jobs = Arc::new(JobRunner::new(
            catalog.clone(),
            clock.clone(),
            repo,
            settings,
        ));
        let wakeups = node.and_then(|node| {
            let woken = jobs.clone();
            opened.wake_on_queued_jobs(&node, move || woken.wake())
        });
        if wakeups.is_some() {
            jobs.woken_by_catalog();
        }
        let workers = jobs.start(stop.clone());
        // Jobs whose lease ran out (their process died), whoever held them.
        let sweeper = tokio::spawn(runner::sweep_leases(
            catalog,
            clock.clone(),
            Some(jobs.clone()),
            stop.clone(),
        ));
        // This node's heartbeat in the catalog, for `vpsbackup status` (an
        // API-only replica runs no node's jobs and records none).
        let heartbeat = (workers_n > 0).then(|| {
            tokio::spawn(node::record_heartbeats(
                opened.schedule(),
                jobs.clone(),
                clock,
                (workers_n, role),
                stop.clone(),
            ))
        });
        Ok(Workers {
            jobs,
            workers,
            sweeper,
            heartbeat,
            wakeups,
        })
    }

    /// Hands running jobs back to the queue; call before the stop signal.
    pub fn hand_back(&self) {
        self.jobs.stop();
    }

    /// Waits, after the stop signal, for the workers (a minute each: a job
    /// stops at its next chunk), then the sweeper and the heartbeat.
    pub async fn join(self) {
        drop(self.wakeups);
        for w in self.workers {
            if tokio::time::timeout(Duration::from_secs(60), w)
                .await
                .is_err()
            {
                tracing::warn!("a worker did not stop in time");
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.sweeper).await;
        if let Some(task) = self.heartbeat {
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                tracing::warn!("the node heartbeat did not stop in time");
            }
        }
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until `stop`
/// turns true.
pub(crate) fn serve_ops(
    listener: TcpListener,
    state: ops::OpsState,
    stop: &watch::Receiver<bool>,
) -> Result<JoinHandle<std::io::Result<()>>, ServiceError> {
    tracing::info!(addr = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
    let mut stop = stop.clone();
    Ok(tokio::spawn(async move {
        axum::serve(listener, ops::router(state))
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    }))
}

/// Waits up to 5 s for the operational listener to stop.
pub(crate) async fn join_ops(task: Option<JoinHandle<std::io::Result<()>>>) {
    if let Some(task) = task {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the operational listener failed"),
            Ok(_) => {}
            Err(_) => tracing::warn!("the operational listener did not stop in time"),
        }
    }
}
