//! One active scheduler among any number of `serve` replicas on one
//! catalog (issue 10, part 4).
//!
//! Every replica with the scheduler on runs [`spawn`]: every
//! [`CHECK_EVERY`] it tries the catalog's [`LeaderLock`] (a PostgreSQL
//! advisory lock on a connection of its own; on SQLite always held) or, when
//! it holds it, checks that its session still lives. The scheduler's loops
//! run only while the watch channel it returns says `true`. When the leader
//! dies its session ends and with it the lock, and the next check of another
//! replica takes it: scheduling moves within seconds (the check interval,
//! plus the time PostgreSQL takes to notice a dead peer: at once for a
//! killed process, whose kernel closes the socket).
//!
//! The leader also records itself in the catalog's periodic tasks (as
//! [`LEADER_TASK`], `node=... pid=...`) each check, which `vpsbackup
//! status` shows, and sets the `vpsbackup_scheduler_leader` gauge.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;
use vpsbackup_catalog::{LeaderLock, ScheduleCatalog, TaskRun};

use crate::clock::Clock;
use crate::metrics::JobMetrics;

/// The periodic task row the leader keeps fresh.
pub const LEADER_TASK: &str = "scheduler-leader";
/// How often leadership is tried or checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(3);
/// A leader record older than this (by the recording clock) is stale: its
/// process stopped checking.
pub const LEADER_LIVE_WITHIN: time::Duration = time::Duration::seconds(30);

/// Runs the leadership loop until `stop` turns true, then gives the lock up.
/// The receiver says whether this process leads now.
pub fn spawn(
    mut lock: LeaderLock,
    schedule: Arc<dyn ScheduleCatalog>,
    clock: Arc<dyn Clock>,
    metrics: JobMetrics,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let summary = format!("node={} pid={}", metrics.node(), std::process::id());
    let task = tokio::spawn(async move {
        while !*stop.borrow() {
            let was = *tx.borrow();
            let leads = match lock.hold().await {
                Ok(held) => held,
                Err(e) => {
                    if was {
                        tracing::error!(error = %e, "cannot check the scheduler's leadership: stepping down");
                    } else {
                        tracing::warn!(error = %e, "cannot claim the scheduler's leadership");
                    }
                    false
                }
            };
            match (was, leads) {
                (false, true) => tracing::info!("this process now runs the scheduler (leader)"),
                (true, false) => {
                    tracing::warn!("this process lost the scheduler's leadership")
                }
                _ => {}
            }
            tx.send_replace(leads);
            metrics.set_scheduler_leader(leads);
            if leads {
                if let Err(e) = schedule
                    .record_task_run(LEADER_TASK, clock.now(), &summary)
                    .await
                {
                    tracing::warn!(error = %e, "cannot record the scheduler's leader");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(CHECK_EVERY) => {}
                _ = stop.changed() => {}
            }
        }
        tx.send_replace(false);
        metrics.set_scheduler_leader(false);
        lock.release().await;
    });
    (rx, task)
}

/// The scheduler's leader as last recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderRecord {
    /// `node=NAME pid=PID` of the leading process.
    pub holder: String,
    pub last_seen: OffsetDateTime,
}

impl LeaderRecord {
    pub fn from_task(task: &TaskRun) -> Option<LeaderRecord> {
        (task.name == LEADER_TASK).then(|| LeaderRecord {
            holder: task.summary.clone(),
            last_seen: task.last_run,
        })
    }

    /// Whether the leader checked in lately, as of `now`.
    pub fn live_at(&self, now: OffsetDateTime) -> bool {
        now - self.last_seen <= LEADER_LIVE_WITHIN
    }
}
