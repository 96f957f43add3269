//! `vpsbackup status`: servers with their last and next backup and what is
//! kept, the store's size and dedup ratio from the engine, and the nodes
//! whose workers run the jobs (each `serve` or `agent` with workers, and
//! every node servers are on), a node with servers flagged when none of its
//! workers is live.

use std::collections::HashMap;
use std::fmt;

use time::OffsetDateTime;
use vpsbackup_catalog::{
    BackupRead, BackupType, Catalog, PageRequest, ScheduleCatalog, Scope, ServerId, TaskRun,
    WorkStatus,
};
use vpsbackup_engine::{Repository, StoreHealth};

use super::settings::ScheduleSettings;
use super::{window, SchedulerError, GC_TASK, VERIFY_TASK};
use crate::clock::rfc3339;
use crate::leader::{LeaderRecord, LEADER_TASK};
use crate::node::NodeRecord;

/// One server's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLine {
    pub server_id: ServerId,
    pub name: String,
    pub auto_backup_enabled: bool,
    /// "offline", "qemu" or "libvirt".
    pub runtime: &'static str,
    /// "HH:MM+Nm" UTC.
    pub window: String,
    /// The newest backup (any type): when and its status.
    pub last_backup: Option<(OffsetDateTime, WorkStatus)>,
    /// How the newest completed backup read the disks.
    pub last_read: Option<(OffsetDateTime, BackupRead)>,
    /// When the next automatic backup is planned (None: automatic backups off).
    pub next_backup: Option<OffsetDateTime>,
    pub automatic_kept: u32,
    pub manual_kept: u32,
    /// Backups verification found damaged.
    pub damaged: u32,
}

/// One node's line: a machine whose workers run its servers' jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLine {
    pub node: String,
    /// Its last record (None: its workers never ran).
    pub record: Option<NodeRecord>,
    /// Whether a worker of it had a heartbeat lately (see [`NodeRecord::live_at`]).
    pub live: bool,
    /// Jobs running on it.
    pub jobs_running: u64,
    /// Servers whose disks it holds.
    pub servers: usize,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    pub now: OffsetDateTime,
    pub servers: Vec<ServerLine>,
    /// Every node with servers or a heartbeat record, by name.
    pub nodes: Vec<NodeLine>,
    /// Servers on no node (added before nodes existed, not adopted yet).
    pub unassigned_servers: u64,
    /// Bytes of packs in the store.
    pub stored_bytes: u64,
    /// Disk data of every backup in the store, before dedup and compression.
    pub logical_bytes: u64,
    pub store_backups: u64,
    pub last_gc: Option<TaskRun>,
    pub last_verify: Option<TaskRun>,
    /// The process running the scheduler, as it last recorded itself
    /// (`crate::leader`; None: no scheduler ever led).
    pub leader: Option<LeaderRecord>,
    /// Damage the store knows of (quarantined copies, damaged index
    /// objects and manifests).
    pub health: StoreHealth,
    /// Where the store is and how its GC is kept exclusive
    /// ([`Repository::describe`]): S3 conditional writes honoured or not.
    pub store_location: String,
}

impl StatusReport {
    /// Logical bytes per stored byte (dedup and compression together).
    pub fn dedup_ratio(&self) -> f64 {
        if self.stored_bytes == 0 {
            0.0
        } else {
            self.logical_bytes as f64 / self.stored_bytes as f64
        }
    }
}

/// Builds the report at `now`.
pub async fn status_report(
    catalog: &dyn Catalog,
    schedule: &dyn ScheduleCatalog,
    repo: &Repository,
    settings: &ScheduleSettings,
    now: OffsetDateTime,
) -> Result<StatusReport, SchedulerError> {
    let servers = schedule.auto_backup_servers().await?;
    let runtimes: HashMap<ServerId, &'static str> = catalog
        .list_servers(
            Scope::All,
            PageRequest {
                number: 1,
                size: u32::MAX,
            },
        )
        .await?
        .items
        .into_iter()
        .map(|s| (s.id, s.runtime.kind()))
        .collect();
    let mut per_server: HashMap<ServerId, ServerLine> = HashMap::new();
    for s in &servers {
        per_server.insert(
            s.server_id,
            ServerLine {
                server_id: s.server_id,
                name: s.server_name.clone(),
                auto_backup_enabled: s.auto_backup_enabled,
                runtime: runtimes.get(&s.server_id).copied().unwrap_or("offline"),
                window: format!(
                    "{:02}:{:02}+{}m",
                    s.window_start_minute / 60,
                    s.window_start_minute % 60,
                    s.window_minutes
                ),
                last_backup: None,
                last_read: None,
                next_backup: window::next_backup(s, now, settings),
                automatic_kept: 0,
                manual_kept: 0,
                damaged: 0,
            },
        );
    }
    for b in catalog.all_backups().await? {
        let Some(line) = per_server.get_mut(&b.server_id) else {
            continue;
        };
        if line.last_backup.is_none_or(|(t, _)| b.created_at >= t) {
            line.last_backup = Some((b.created_at, b.status));
        }
        if let Some(read) = &b.read {
            if line
                .last_read
                .as_ref()
                .is_none_or(|(t, _)| b.created_at >= *t)
            {
                line.last_read = Some((b.created_at, read.clone()));
            }
        }
        if b.status == WorkStatus::Completed {
            match b.backup_type {
                BackupType::Automatic => line.automatic_kept += 1,
                BackupType::Manual => line.manual_kept += 1,
            }
        }
        if b.damaged {
            line.damaged += 1;
        }
    }
    let mut store_location = repo.describe();
    if schedule.is_shared() {
        store_location.push_str(
            "; across hosts, every GC through this catalog first takes its advisory lock",
        );
    }
    let repo = repo.clone();
    let (stats, health) =
        tokio::task::spawn_blocking(move || -> Result<_, vpsbackup_engine::EngineError> {
            Ok((repo.stats()?, repo.health()?))
        })
        .await
        .map_err(|e| SchedulerError::Task(e.to_string()))??;
    let mut lines: Vec<ServerLine> = per_server.into_values().collect();
    lines.sort_by_key(|l| l.server_id);
    // Every node that recorded a heartbeat, and every node holding servers
    // (one with servers and no record yet is exactly the one to flag).
    let mut nodes: std::collections::BTreeMap<String, NodeLine> = Default::default();
    let blank = |node: &str| NodeLine {
        node: node.to_owned(),
        record: None,
        live: false,
        jobs_running: 0,
        servers: 0,
    };
    for task in catalog.task_runs_prefixed(crate::node::TASK_PREFIX).await? {
        if let Some(record) = NodeRecord::from_task(&task) {
            let line = nodes
                .entry(record.node.clone())
                .or_insert_with(|| blank(&record.node));
            line.live = record.live_at(now);
            line.record = Some(record);
        }
    }
    let mut unassigned_servers = 0;
    for load in catalog.node_loads().await? {
        match &load.node {
            Some(node) => {
                let line = nodes.entry(node.clone()).or_insert_with(|| blank(node));
                line.servers += load.servers as usize;
                line.jobs_running += load.running_jobs;
            }
            None => unassigned_servers += load.servers,
        }
    }
    let nodes: Vec<NodeLine> = nodes.into_values().collect();
    Ok(StatusReport {
        now,
        servers: lines,
        nodes,
        unassigned_servers,
        stored_bytes: stats.stored_bytes,
        logical_bytes: stats.logical_data_bytes,
        store_backups: stats.backups,
        last_gc: schedule.task_run(GC_TASK).await?,
        last_verify: schedule.task_run(VERIFY_TASK).await?,
        leader: schedule
            .task_run(LEADER_TASK)
            .await?
            .as_ref()
            .and_then(LeaderRecord::from_task),
        health,
        store_location,
    })
}

/// "1.5 GiB": binary units, one decimal.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header = [
            "ID",
            "NAME",
            "AUTO",
            "RUNTIME",
            "WINDOW",
            "LAST BACKUP",
            "STATUS",
            "LAST READ",
            "NEXT BACKUP",
            "AUTO KEPT",
            "MANUAL KEPT",
            "DAMAGED",
        ];
        let rows: Vec<[String; 12]> = self
            .servers
            .iter()
            .map(|s| {
                [
                    s.server_id.to_string(),
                    s.name.clone(),
                    if s.auto_backup_enabled { "on" } else { "off" }.to_owned(),
                    s.runtime.to_owned(),
                    s.window.clone(),
                    s.last_backup
                        .map(|(t, _)| rfc3339(t))
                        .unwrap_or_else(|| "never".into()),
                    s.last_backup
                        .map(|(_, st)| st.as_str().to_owned())
                        .unwrap_or_else(|| "-".into()),
                    s.last_read
                        .as_ref()
                        .map(|(_, r)| {
                            let kind = if r.incremental { "incremental" } else { "full" };
                            format!("{kind} {}", human_bytes(r.bytes_read))
                        })
                        .unwrap_or_else(|| "-".into()),
                    s.next_backup.map(rfc3339).unwrap_or_else(|| "off".into()),
                    s.automatic_kept.to_string(),
                    s.manual_kept.to_string(),
                    s.damaged.to_string(),
                ]
            })
            .collect();
        table(f, &header, &rows)?;
        writeln!(f)?;
        writeln!(
            f,
            "Store: {} stored for {} of disk data in {} backups (dedup and compression ratio {:.2}x)",
            human_bytes(self.stored_bytes),
            human_bytes(self.logical_bytes),
            self.store_backups,
            self.dedup_ratio()
        )?;
        writeln!(f, "Store location: {}", self.store_location)?;
        let task = |t: &Option<TaskRun>| match t {
            Some(t) => format!("{} ({})", rfc3339(t.last_run), t.summary),
            None => "never".to_owned(),
        };
        writeln!(f, "Last GC: {}", task(&self.last_gc))?;
        writeln!(f, "Last verification: {}", task(&self.last_verify))?;
        match &self.leader {
            Some(l) if l.live_at(self.now) => writeln!(
                f,
                "Scheduler leader: {} (checked in {})",
                l.holder,
                rfc3339(l.last_seen)
            )?,
            Some(l) => writeln!(
                f,
                "Scheduler leader: NONE LIVE (last: {}, checked in {}); automatic backups wait for a `serve` with the scheduler on",
                l.holder,
                rfc3339(l.last_seen)
            )?,
            None => writeln!(f, "Scheduler leader: none yet")?,
        }
        let h = &self.health;
        if h.quarantined_copies > 0 {
            writeln!(
                f,
                "Damaged: {} chunk copies quarantined; the next backup of the same data stores good copies, and verify then clears the backups they repair.",
                h.quarantined_copies
            )?;
        }
        for e in &h.damaged_index_objects {
            writeln!(
                f,
                "Damaged index object: {e} GC will not run until the index is rebuilt (vpsbackup store rebuild-index)."
            )?;
        }
        for e in &h.damaged_manifests {
            writeln!(
                f,
                "Damaged: {e} GC will not run until that backup is deleted."
            )?;
        }
        writeln!(f)?;
        self.fmt_nodes(f)
    }
}

impl StatusReport {
    /// The nodes table, then a line for each node with servers and no
    /// live worker.
    fn fmt_nodes(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header = [
            "NODE",
            "STATE",
            "ROLE",
            "LAST HEARTBEAT",
            "LIVE WORKERS",
            "JOBS RUNNING",
            "SERVERS",
        ];
        let rows: Vec<[String; 7]> = self
            .nodes
            .iter()
            .map(|n| {
                [
                    n.node.clone(),
                    if n.live { "live" } else { "NO LIVE WORKER" }.to_owned(),
                    n.record
                        .as_ref()
                        .and_then(|r| r.role.clone())
                        .unwrap_or_else(|| "-".into()),
                    n.record
                        .as_ref()
                        .map_or_else(|| "never".into(), |r| rfc3339(r.last_heartbeat)),
                    match n.record.as_ref().and_then(|r| r.workers) {
                        Some((total, live)) if n.live => format!("{live}/{total}"),
                        Some((total, _)) => format!("0/{total}"),
                        None => "-".into(),
                    },
                    n.jobs_running.to_string(),
                    n.servers.to_string(),
                ]
            })
            .collect();
        table(f, &header, &rows)?;
        for n in self.nodes.iter().filter(|n| !n.live && n.servers > 0) {
            let why = match &n.record {
                None => "no worker ever ran there".to_owned(),
                Some(r) if r.workers.is_none() => format!(
                    "its {} stopped at {}",
                    r.role.as_deref().unwrap_or("serve"),
                    rfc3339(r.last_heartbeat)
                ),
                Some(r) => format!(
                    "no worker heartbeat since {} ({}s ago)",
                    rfc3339(r.last_heartbeat),
                    (self.now - r.last_heartbeat).whole_seconds()
                ),
            };
            writeln!(
                f,
                "Node {} has no live worker: {why}. Its servers' backups and restores wait until `vpsbackup serve` or `vpsbackup agent --node {}` runs there.",
                n.node, n.node
            )?;
        }
        if self.unassigned_servers > 0 {
            writeln!(
                f,
                "{} server(s) are on no node: the next `vpsbackup serve` with workers takes them, or set one with `vpsbackup server set ID --node NAME`.",
                self.unassigned_servers
            )?;
        }
        Ok(())
    }
}

/// Left-aligned columns two spaces apart, headed by `header`.
fn table<const N: usize>(
    f: &mut fmt::Formatter<'_>,
    header: &[&str; N],
    rows: &[[String; N]],
) -> fmt::Result {
    let mut widths = header.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |f: &mut fmt::Formatter<'_>, cells: &[String]| -> fmt::Result {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(&format!("{c:<w$}"));
        }
        writeln!(f, "{}", out.trim_end())
    };
    line(f, &header.map(str::to_owned))?;
    for r in rows {
        line(f, r)?;
    }
    Ok(())
}
