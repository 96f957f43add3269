//! This node's liveness in the catalog, for the node section of
//! `vpsbackup status`.
//!
//! A node is a machine whose job workers read and write its servers' disks,
//! named by `--node` (default its hostname); its workers are those of a
//! `vpsbackup serve` or a `vpsbackup agent` running there. Every
//! [`RECORD_INTERVAL`], each process with workers records when they last
//! reached the catalog (their heartbeat: an empty claim or a running job's
//! progress write), how many did recently, its role (serve or agent) and
//! the jobs it runs. A graceful stop records "stopped". The record is a
//! periodic task row named `node:<name>` (one process per node is the
//! deployment: a second one of the same name overwrites the row).

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;
use vpsbackup_catalog::{ScheduleCatalog, TaskRun};

use crate::clock::Clock;
use crate::metrics::JobMetrics;
use crate::runner::JobRunner;

/// The periodic task name of a node's record is this prefix and its name.
pub const TASK_PREFIX: &str = "node:";
/// How often `serve` records its node's heartbeat.
pub const RECORD_INTERVAL: Duration = Duration::from_secs(10);
/// A worker whose heartbeat is older than this is not live (three missed
/// records: a worker idles at most half a second between claims, and a
/// running job writes its progress every second).
pub const LIVE_WITHIN: time::Duration = time::Duration::seconds(30);

/// A node's last record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub node: String,
    /// The latest heartbeat of any of its workers.
    pub last_heartbeat: OffsetDateTime,
    /// Workers it runs, and how many of them had a heartbeat within
    /// [`LIVE_WITHIN`] when it recorded; `None` after a graceful stop.
    pub workers: Option<(u32, u32)>,
    /// "serve" or "agent" (None: recorded by an older build).
    pub role: Option<String>,
    /// Jobs its workers ran when it recorded.
    pub running: Option<u32>,
}

impl NodeRecord {
    fn summary(&self) -> String {
        let mut s = match self.workers {
            Some((total, live)) => format!("workers={total} live={live}"),
            None => "stopped".to_owned(),
        };
        if let Some(role) = &self.role {
            s.push_str(&format!(" role={role}"));
        }
        if let (Some(running), Some(_)) = (self.running, self.workers) {
            s.push_str(&format!(" running={running}"));
        }
        s
    }

    /// The record stored as `task` (None: not a node record).
    pub fn from_task(task: &TaskRun) -> Option<NodeRecord> {
        let node = task.name.strip_prefix(TASK_PREFIX)?.to_owned();
        let text = |key: &str| -> Option<&str> {
            task.summary
                .split(' ')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        };
        let field = |key: &str| -> Option<u32> { text(key)?.parse().ok() };
        let workers = if task.summary.starts_with("stopped") {
            None
        } else {
            Some((field("workers")?, field("live")?))
        };
        Some(NodeRecord {
            node,
            last_heartbeat: task.last_run,
            workers,
            role: text("role").map(str::to_owned),
            running: field("running"),
        })
    }

    /// Whether the node has a live worker at `now`.
    pub fn live_at(&self, now: OffsetDateTime) -> bool {
        matches!(self.workers, Some((_, live)) if live > 0)
            && now - self.last_heartbeat <= LIVE_WITHIN
    }
}

/// This process's record at `now` (None before any worker reached the catalog).
fn this_node(
    metrics: &JobMetrics,
    (workers, role, running): (usize, &str, usize),
    now: OffsetDateTime,
) -> Option<NodeRecord> {
    let beats = metrics.worker_beats();
    let last = beats.values().copied().max()?;
    let live = beats
        .values()
        .filter(|&&t| now.unix_timestamp() - t <= LIVE_WITHIN.whole_seconds())
        .count();
    Some(NodeRecord {
        node: metrics.node().to_owned(),
        last_heartbeat: OffsetDateTime::from_unix_timestamp(last).ok()?,
        workers: Some((workers as u32, live as u32)),
        role: Some(role.to_owned()),
        running: Some(running as u32),
    })
}

async fn write(schedule: &dyn ScheduleCatalog, record: &NodeRecord) {
    let name = format!("{TASK_PREFIX}{}", record.node);
    if let Err(e) = schedule
        .record_task_run(&name, record.last_heartbeat, &record.summary())
        .await
    {
        tracing::warn!(error = %e, "cannot record this node's heartbeat");
    }
}

/// Records this node's heartbeat every [`RECORD_INTERVAL`] until `stop`
/// turns true, then records it stopped.
pub async fn record_heartbeats(
    schedule: Arc<dyn ScheduleCatalog>,
    runner: Arc<JobRunner>,
    clock: Arc<dyn Clock>,
    (workers, role): (usize, &'static str),
    mut stop: watch::Receiver<bool>,
) {
    let metrics = runner.metrics().clone();
    loop {
        // Until a worker's first claim, look again soon rather than a full
        // interval later.
        let now = clock.now();
        let wait = match this_node(&metrics, (workers, role, runner.running_jobs()), now) {
            Some(record) => {
                write(&*schedule, &record).await;
                RECORD_INTERVAL
            }
            None => Duration::from_millis(200),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    let stopped = NodeRecord {
        node: metrics.node().to_owned(),
        last_heartbeat: clock.now(),
        workers: None,
        role: Some(role.to_owned()),
        running: None,
    };
    write(&*schedule, &stopped).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn records_round_trip_and_age_out() {
        let live = NodeRecord {
            node: "hv-01".into(),
            last_heartbeat: t(0),
            workers: Some((2, 2)),
            role: Some("agent".into()),
            running: Some(1),
        };
        let task = TaskRun {
            name: "node:hv-01".into(),
            last_run: t(0),
            summary: live.summary(),
        };
        assert_eq!(NodeRecord::from_task(&task), Some(live.clone()));
        assert!(live.live_at(t(30)));
        assert!(!live.live_at(t(31)), "no heartbeat for over 30 s");
        let none_live = NodeRecord {
            workers: Some((2, 0)),
            ..live.clone()
        };
        assert!(!none_live.live_at(t(1)));
        let stopped = NodeRecord {
            workers: None,
            running: None,
            ..live
        };
        assert!(!stopped.live_at(t(1)));
        let task = TaskRun {
            summary: stopped.summary(),
            ..task
        };
        assert_eq!(NodeRecord::from_task(&task), Some(stopped));
        let gc = TaskRun {
            name: "gc".into(),
            ..task
        };
        assert_eq!(NodeRecord::from_task(&gc), None);
    }

    #[test]
    fn this_node_counts_live_workers() {
        let metrics = JobMetrics::default();
        assert_eq!(
            this_node(&metrics, (2, "serve", 0), t(0)),
            None,
            "no heartbeat yet"
        );
        metrics.beat(0, t(0));
        metrics.beat(1, t(5));
        let r = this_node(&metrics, (2, "serve", 1), t(32)).unwrap();
        assert_eq!((r.last_heartbeat, r.workers), (t(5), Some((2, 1))));
        assert_eq!((r.role.as_deref(), r.running), (Some("serve"), Some(1)));
    }
}
