//! `vpsbackup status`: servers with their last and next backup and what is
//! kept, plus the store's size and dedup ratio from the engine.

use std::collections::HashMap;
use std::fmt;

use time::OffsetDateTime;
use vpsbackup_catalog::{
    BackupType, Catalog, PageRequest, ScheduleCatalog, Scope, ServerId, TaskRun, WorkStatus,
};
use vpsbackup_engine::{Repository, StoreHealth};

use super::settings::ScheduleSettings;
use super::{window, SchedulerError, GC_TASK, VERIFY_TASK};
use crate::clock::rfc3339;

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
    /// When the next automatic backup is planned (None: automatic backups off).
    pub next_backup: Option<OffsetDateTime>,
    pub automatic_kept: u32,
    pub manual_kept: u32,
    /// Backups verification found damaged.
    pub damaged: u32,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    pub now: OffsetDateTime,
    pub servers: Vec<ServerLine>,
    /// Bytes of packs in the store.
    pub stored_bytes: u64,
    /// Disk data of every backup in the store, before dedup and compression.
    pub logical_bytes: u64,
    pub store_backups: u64,
    pub last_gc: Option<TaskRun>,
    pub last_verify: Option<TaskRun>,
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
    let store_location = repo.describe();
    let repo = repo.clone();
    let (stats, health) =
        tokio::task::spawn_blocking(move || -> Result<_, vpsbackup_engine::EngineError> {
            Ok((repo.stats()?, repo.health()?))
        })
        .await
        .map_err(|e| SchedulerError::Task(e.to_string()))??;
    let mut lines: Vec<ServerLine> = per_server.into_values().collect();
    lines.sort_by_key(|l| l.server_id);
    Ok(StatusReport {
        now,
        servers: lines,
        stored_bytes: stats.stored_bytes,
        logical_bytes: stats.logical_data_bytes,
        store_backups: stats.backups,
        last_gc: schedule.task_run(GC_TASK).await?,
        last_verify: schedule.task_run(VERIFY_TASK).await?,
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
            "NEXT BACKUP",
            "AUTO KEPT",
            "MANUAL KEPT",
            "DAMAGED",
        ];
        let rows: Vec<[String; 11]> = self
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
                    s.next_backup.map(rfc3339).unwrap_or_else(|| "off".into()),
                    s.automatic_kept.to_string(),
                    s.manual_kept.to_string(),
                    s.damaged.to_string(),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for r in &rows {
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
        for r in &rows {
            line(f, r)?;
        }
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
        Ok(())
    }
}
