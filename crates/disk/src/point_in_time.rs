//! A point-in-time view of a running QEMU's disks, read over NBD.
//!
//! For a server whose runtime is `qemu`, the disks cannot be read from their
//! files (the guest writes them meanwhile). Through QMP, one `transaction`
//! starts a `blockdev-backup sync=none` job from each disk's block node into
//! a scratch qcow2 overlay backed by that node: from that instant QEMU
//! copies a cluster's old content into the overlay before the guest
//! overwrites it, so the overlay reads as every disk was at the transaction,
//! atomically for all of them (copy-before-write, as libvirt's pull-mode
//! backup does). Each overlay is exported read-only over NBD on a socket in
//! our scratch directory and read with [`crate::nbd_export`]. Scratch space
//! grows only with what the guest overwrites during the backup.
//!
//! Everything created in QEMU is named `vpsbackup-...`: teardown on every
//! path (end, error, cancel: [`PointInTime`] tears down on drop), and at
//! the next job's start whatever a crash left behind is found by name and
//! removed. With a guest agent ([`TakeOptions::guest_agent`]) the guest's
//! filesystems are frozen just before the transaction and thawed as soon as
//! it returns (milliseconds); without one, or when it does not answer, the
//! view is crash-consistent, as after a power cut, and
//! [`PointInTime::frozen`] says why.
//!
//! Checkpoints (dirty bitmaps): with a [`Checkpoint`], the same transaction
//! adds a bitmap named after the new backup to every disk (persistent on
//! qcow2, so it survives a clean QEMU restart; raw nodes only take
//! in-memory ones) and disables the base backup's bitmap, which then says
//! exactly what changed between the two points in time; it is exported
//! with the overlay (`qemu:dirty-bitmap:NAME`). After a backup that
//! completed, the base's bitmap is removed; after one that did not, the
//! new bitmap is merged back into the base's and the base records again,
//! so the chain from the last completed backup has no gap. A crash in
//! between leaves the base disabled and the new one recording: the next
//! job merges them the same way before it starts. A bitmap QEMU marks
//! inconsistent (it was killed), a missing one (QEMU restarted; raw
//! disks), or a disabled one with nothing recording after it cannot be
//! trusted: every bitmap of ours is removed and the disk is read in full,
//! with the reason.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::nbd_export::{
    NbdExport, StatusRun, BASE_ALLOCATION, STATE_DIRTY, STATE_HOLE, STATE_ZERO,
};
use crate::qga::GuestAgent;
use crate::qmp::{Qmp, QmpError};
use crate::{DiskError, DiskFormat, DiskReader, Extent};

/// Prefix of every node, job and export we create in a QEMU.
const PREFIX: &str = "vpsbackup-";
/// How long QEMU may take to end a job or an export.
const TEARDOWN_WAIT: Duration = Duration::from_secs(30);
/// Connections per disk: the engine reads a disk from one thread at a time
/// today, a second keeps a map query from waiting behind a read.
const CONNECTIONS: usize = 2;

fn qmp_err(socket: &Path) -> impl Fn(QmpError) -> DiskError + '_ {
    move |e| DiskError::Unsupported {
        path: socket.to_owned(),
        reason: format!("the running QEMU refused the point in time: {e}"),
    }
}

/// The bitmaps of a point in time: the backup it is taken for, and the
/// earlier backup whose bitmap tells what changed since (`None`: no
/// earlier backup to build on; every disk is read in full).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub new: String,
    pub base: Option<String>,
}

/// How to take a point in time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TakeOptions {
    /// Start the new backup's dirty bitmaps, and read the base's.
    pub checkpoint: Option<Checkpoint>,
    /// The host end of the guest agent's channel: freeze for the instant.
    pub guest_agent: Option<PathBuf>,
    /// Scratch bytes the overlays may take (what the guest overwrites while
    /// the backup reads): past it the reads fail and the point in time is
    /// torn down, before the scratch filesystem fills and the guest's own
    /// writes fail. `None`: a quarter of the disks' size, at least 1 GiB.
    /// Never more than 90% of the scratch filesystem's free space.
    pub scratch_limit: Option<u64>,
}

/// How often the scratch space is measured.
const SCRATCH_POLL: Duration = Duration::from_millis(100);

/// The dirty bitmap QEMU keeps for backup `id`.
pub fn bitmap_name(id: &str) -> String {
    format!("{PREFIX}{id}")
}

/// The point in time of one server's disks, live until dropped.
pub struct PointInTime {
    qmp: Qmp,
    qmp_socket: PathBuf,
    scratch: PathBuf,
    nbd_socket: PathBuf,
    disks: Vec<PitDisk>,
    /// The new backup's bitmap, once the transaction made it.
    new_bitmap: Option<String>,
    /// Set by [`PointInTime::finish`] after a completed backup.
    completed: bool,
    /// Filesystems the guest agent froze for the instant, or why none.
    frozen: Result<u64, String>,
    /// Set when the overlays outgrew the scratch limit: reads fail.
    overran: Arc<AtomicBool>,
    /// Stops the scratch watchdog.
    watch_stop: Arc<AtomicBool>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    torn_down: bool,
}

struct PitDisk {
    /// The disk's block node.
    node: String,
    export: String,
    size: u64,
    /// The base's bitmap exported with the overlay, or why there is none.
    changes: Result<String, String>,
}

/// A block node that holds an image file, from `query-named-block-nodes`.
fn node_for<'a>(nodes: &'a [Value], path: &Path) -> Option<&'a Value> {
    let want = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    nodes
        .iter()
        .filter(|n| n["drv"] != "file" && n["drv"] != "host_device")
        .filter(|n| {
            let f = n["image"]["filename"].as_str().unwrap_or("");
            let f = Path::new(f);
            f == path || fs::canonicalize(f).is_ok_and(|c| c == want)
        })
        // A node of ours (an overlay backed by the disk) names its own file.
        .filter(|n| !n["node-name"].as_str().unwrap_or("").starts_with(PREFIX))
        .find(|n| n["node-name"].is_string() && n["image"]["virtual-size"].is_u64())
}

/// Brings one disk's bitmaps of ours down to the base's alone, recording,
/// and says whether it can be trusted (`Ok`: its name) or why not (then
/// none of ours is left). `node` is the disk's `query-named-block-nodes`
/// entry.
fn settle_bitmaps(
    qmp: &mut Qmp,
    node: &Value,
    base: Option<&str>,
) -> Result<Result<String, String>, QmpError> {
    let name = node["node-name"].as_str().unwrap_or_default().to_owned();
    let ours: Vec<&Value> = node["dirty-bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["name"].as_str().is_some_and(|n| n.starts_with(PREFIX)))
        .collect();
    let base = base.map(bitmap_name);
    let found = base
        .as_deref()
        .and_then(|b| ours.iter().find(|m| m["name"] == b));
    let recording_others: Vec<&str> = ours
        .iter()
        .filter(|m| Some(m["name"].as_str().unwrap_or_default()) != base.as_deref())
        .filter(|m| m["recording"] == true && m["inconsistent"] != true)
        .filter_map(|m| m["name"].as_str())
        .collect();
    let verdict = match (found, base.as_deref()) {
        (_, None) => Err("there is no earlier backup to build on".to_owned()),
        (None, Some(_)) => Err(
            "QEMU has no dirty bitmap for the previous backup (QEMU was \
             restarted since, and raw disks keep bitmaps only in memory; or the backup after \
             it was deleted)"
                .to_owned(),
        ),
        (Some(m), _) if m["inconsistent"] == true => {
            Err("its dirty bitmap is inconsistent (QEMU stopped without saving it)".to_owned())
        }
        (Some(m), _) if m["recording"] == true => Ok(()),
        // Disabled: a job stopped between its point in time and its end.
        // What the guest wrote since is in that job's bitmap, if any.
        (Some(_), Some(_)) if recording_others.is_empty() => {
            Err("its dirty bitmap stopped recording and nothing recorded after it".to_owned())
        }
        (Some(_), Some(b)) => {
            resume_base(qmp, &name, b, &recording_others)?;
            Ok(())
        }
    };
    let keep = verdict.as_ref().ok().and(base.as_deref());
    for m in &ours {
        let n = m["name"].as_str().unwrap_or_default();
        if Some(n) != keep {
            remove_bitmap(qmp, &name, n)?;
        }
    }
    Ok(verdict.map(|()| base.unwrap_or_default()))
}

/// Makes the disabled bitmap `base` record again with what `others`
/// recorded since it stopped, in one transaction (no write falls between).
fn resume_base(qmp: &mut Qmp, node: &str, base: &str, others: &[&str]) -> Result<(), QmpError> {
    qmp.execute(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": base}},
            {"type": "block-dirty-bitmap-merge",
             "data": {"node": node, "target": base, "bitmaps": others}},
        ]}),
    )?;
    Ok(())
}

fn remove_bitmap(qmp: &mut Qmp, node: &str, name: &str) -> Result<(), QmpError> {
    qmp.execute(
        "block-dirty-bitmap-remove",
        json!({"node": node, "name": name}),
    )?;
    Ok(())
}

impl PointInTime {
    /// Takes the point in time of `disks` (image paths, as the running QEMU
    /// opened them) through the QMP socket `qmp_socket`, with scratch files
    /// in `scratch` (created; one directory per server, used by one job at
    /// a time).
    /// With a checkpoint, the transaction also starts the new backup's
    /// dirty bitmaps and freezes the base's, whose changes
    /// [`PointInTime::changes`] then gives.
    pub fn take(
        qmp_socket: &Path,
        disks: &[PathBuf],
        scratch: &Path,
        opts: &TakeOptions,
    ) -> Result<PointInTime, DiskError> {
        let checkpoint = opts.checkpoint.as_ref();
        let err = qmp_err(qmp_socket);
        let mut qmp = Qmp::connect(qmp_socket).map_err(&err)?;
        fs::create_dir_all(scratch).map_err(|source| DiskError::Io {
            op: "create the scratch directory",
            path: scratch.to_owned(),
            source,
        })?;
        let nbd_socket = scratch.join("nbd.sock");
        remove_leftovers(&mut qmp, &nbd_socket).map_err(&err)?;
        remove_overlays(scratch);

        let nodes = qmp
            .execute("query-named-block-nodes", json!({"flat": true}))
            .map_err(&err)?;
        let nodes = nodes.as_array().cloned().unwrap_or_default();
        let mut pit = PointInTime {
            qmp,
            qmp_socket: qmp_socket.to_owned(),
            scratch: scratch.to_owned(),
            nbd_socket,
            disks: Vec::new(),
            new_bitmap: None,
            completed: false,
            frozen: Err("no guest agent is configured".into()),
            overran: Arc::new(AtomicBool::new(false)),
            watch_stop: Arc::new(AtomicBool::new(false)),
            watchdog: None,
            torn_down: false,
        };
        let mut actions = Vec::new();
        for (i, disk) in disks.iter().enumerate() {
            let info = node_for(&nodes, disk).ok_or_else(|| DiskError::Unsupported {
                path: disk.clone(),
                reason: "the running QEMU has no block node for this disk".into(),
            })?;
            let node = info["node-name"].as_str().unwrap_or_default().to_owned();
            let size = info["image"]["virtual-size"].as_u64().unwrap_or_default();
            let changes = match checkpoint {
                None => Err("no checkpoint was asked for".to_owned()),
                Some(c) => {
                    let changes =
                        settle_bitmaps(&mut pit.qmp, info, c.base.as_deref()).map_err(&err)?;
                    actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                        "node": node, "name": bitmap_name(&c.new),
                        // Only qcow2 can store a bitmap; raw keeps it in memory.
                        "persistent": info["drv"] == "qcow2"}}));
                    if let Ok(base) = &changes {
                        // Frozen at the instant: what changed up to it.
                        actions.push(json!({"type": "block-dirty-bitmap-disable",
                            "data": {"node": node, "name": base}}));
                    }
                    changes
                }
            };
            let overlay = scratch.join(format!("fleece{i}.qcow2"));
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&overlay)
                .arg(size.to_string())
                .output()
                .map_err(|source| DiskError::Io {
                    op: "run qemu-img create for",
                    path: overlay.clone(),
                    source,
                })?;
            if !out.status.success() {
                return Err(DiskError::Tool {
                    tool: "qemu-img create",
                    path: overlay,
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
            let fleece = format!("{PREFIX}fleece{i}");
            pit.qmp
                .execute(
                    "blockdev-add",
                    json!({"driver": "qcow2", "node-name": fleece,
                           "file": {"driver": "file", "filename": overlay},
                           "backing": node}),
                )
                .map_err(&err)?;
            actions.push(json!({"type": "blockdev-backup", "data": {
                "job-id": format!("{PREFIX}job{i}"), "device": node,
                "target": fleece, "sync": "none"}}));
            pit.disks.push(PitDisk {
                node,
                export: format!("{PREFIX}exp{i}"),
                size,
                changes,
            });
        }
        // The instant: all disks at once, the guest frozen around it when
        // its agent answers.
        let frozen = opts.guest_agent.as_deref().map(|socket| {
            GuestAgent::connect(socket)
                .and_then(GuestAgent::freeze)
                .map_err(|e| format!("the guest agent did not freeze the guest ({e})"))
        });
        let taken = pit
            .qmp
            .execute("transaction", json!({ "actions": actions }));
        pit.frozen = match frozen {
            None => Err("no guest agent is configured".into()),
            Some(Ok(f)) => {
                let n = f.filesystems;
                f.thaw()
                    .map(|()| n)
                    .map_err(|e| format!("the guest agent did not confirm the thaw ({e})"))
            }
            Some(Err(why)) => Err(why),
        };
        taken.map_err(&err)?;
        pit.new_bitmap = checkpoint.map(|c| bitmap_name(&c.new));
        let sizes: u64 = pit.disks.iter().map(|d| d.size).sum();
        let limit = opts
            .scratch_limit
            .unwrap_or((sizes / 4).max(1 << 30))
            .min(free_space(scratch).map_or(u64::MAX, |f| f / 10 * 9));
        pit.watchdog = Some(watch_scratch(
            scratch.to_owned(),
            limit,
            pit.overran.clone(),
            pit.watch_stop.clone(),
        ));
        pit.qmp
            .execute(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": pit.nbd_socket}}}),
            )
            .map_err(&err)?;
        for (i, d) in pit.disks.iter().enumerate() {
            let mut export = json!({"type": "nbd", "id": d.export,
                "node-name": format!("{PREFIX}fleece{i}"), "name": d.export, "writable": false});
            if let Ok(bitmap) = &d.changes {
                // Found through the overlay's backing chain: the disk's node.
                export["bitmaps"] = json!([bitmap]);
            }
            pit.qmp.execute("block-export-add", export).map_err(&err)?;
        }
        Ok(pit)
    }

    /// How many filesystems the guest agent froze for the instant, or why
    /// the point in time is only crash-consistent.
    pub fn frozen(&self) -> Result<u64, String> {
        self.frozen.clone()
    }

    /// What may have changed on disk `i` since the base backup, as extents
    /// (sorted, whole bitmap clusters), or why it is not known (read the
    /// disk in full).
    pub fn changes(&self, i: usize) -> Result<Vec<Extent>, String> {
        let d = self.disks.get(i).ok_or("no such disk")?;
        let bitmap = d.changes.as_ref().map_err(Clone::clone)?;
        dirty_extents(
            &self.nbd_socket,
            &d.export,
            &format!("qemu:dirty-bitmap:{bitmap}"),
        )
    }

    /// A reader of disk `i` as it was at the point in time, reporting
    /// `format` (the disk's recorded one: the guest view is the same).
    pub fn reader(&self, i: usize, format: DiskFormat) -> Result<NbdExportReader, DiskError> {
        let d = self
            .disks
            .get(i)
            .ok_or_else(|| no_disk(&self.qmp_socket, i))?;
        export_reader(&self.nbd_socket, &d.export, d.size, format, &self.overran)
    }

    /// True when the guest overwrote more during the backup than the
    /// scratch limit allows (the reads were stopped).
    pub fn overran(&self) -> bool {
        self.overran.load(Ordering::SeqCst)
    }

    /// Ends the exports and the jobs and removes the overlays; errors are
    /// collected, not stopped at, so as much as possible is removed.
    /// `completed`: the backup read from it is complete (its bitmap becomes
    /// the next base); otherwise the chain goes back to the base's.
    pub fn finish(mut self, completed: bool) -> Result<(), DiskError> {
        self.completed = completed;
        self.teardown()
    }

    /// Hangs up without tearing anything down, as a crashed job would: the
    /// exports, jobs, overlays and NBD server stay for the next job's
    /// [`PointInTime::take`] to find and remove (for tests of that path).
    pub fn abandon(mut self) {
        self.torn_down = true;
    }

    fn teardown(&mut self) -> Result<(), DiskError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        self.watch_stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        let r = remove_leftovers(&mut self.qmp, &self.nbd_socket);
        remove_overlays(&self.scratch);
        // Bitmaps last: an export holds its bitmap busy.
        let b = r.and_then(|()| self.settle_checkpoint());
        b.map_err(qmp_err(&self.qmp_socket))
    }

    /// After a completed backup the base's bitmaps go (the new ones are the
    /// next base); otherwise the new ones are merged into the base's, which
    /// records again, or just removed when there is no base.
    fn settle_checkpoint(&mut self) -> Result<(), QmpError> {
        let Some(new) = self.new_bitmap.clone() else {
            return Ok(());
        };
        for d in &self.disks {
            let node = &d.node;
            match (&d.changes, self.completed) {
                (Ok(base), true) => remove_bitmap(&mut self.qmp, node, base)?,
                (Ok(base), false) => {
                    resume_base(&mut self.qmp, node, base, &[&new])?;
                    remove_bitmap(&mut self.qmp, node, &new)?;
                }
                (Err(_), true) => {}
                (Err(_), false) => remove_bitmap(&mut self.qmp, node, &new)?,
            }
        }
        Ok(())
    }
}

/// The extents of export `name` that meta context `context` (a dirty
/// bitmap) flags as changed, merged; or why they cannot be read.
pub(crate) fn dirty_extents(
    nbd_socket: &Path,
    name: &str,
    context: &str,
) -> Result<Vec<Extent>, String> {
    let runs = NbdExport::connect(nbd_socket, name, &[context])
        .and_then(|mut c| c.status_map(context))
        .map_err(|e| format!("its dirty bitmap cannot be read ({e})"))?;
    Ok(merge_runs(
        runs.iter().filter(|r| r.flags & STATE_DIRTY != 0),
    ))
}

/// A reader of export `name` that stops once `overran` is set (the scratch
/// watchdog's flag).
pub(crate) fn export_reader(
    nbd_socket: &Path,
    name: &str,
    size: u64,
    format: DiskFormat,
    overran: &Arc<AtomicBool>,
) -> Result<NbdExportReader, DiskError> {
    let mut r = NbdExportReader::open(nbd_socket, name, size, format)?;
    r.overran = Some(overran.clone());
    Ok(r)
}

/// The error for a disk index the point in time does not have.
pub(crate) fn no_disk(what: &Path, i: usize) -> DiskError {
    DiskError::Unsupported {
        path: what.to_owned(),
        reason: format!("no disk {i} in the point in time"),
    }
}

/// Consecutive runs as merged extents.
pub(crate) fn merge_runs<'a>(runs: impl Iterator<Item = &'a StatusRun>) -> Vec<Extent> {
    runs.fold(Vec::<Extent>::new(), |mut v, r| {
        match v.last_mut() {
            Some(l) if l.offset + l.len == r.offset => l.len += r.len,
            _ => v.push(Extent {
                offset: r.offset,
                len: r.len,
            }),
        }
        v
    })
}

impl Drop for PointInTime {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

/// Bytes the overlay files in `scratch` take on disk.
fn overlay_bytes(scratch: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::read_dir(scratch)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("fleece"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Free bytes on the filesystem holding `dir`.
pub(crate) fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value for the call to fill.
    #[allow(unsafe_code)]
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` lives across the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Measures the overlays until `stop`; past `limit` sets `overran`, which
/// makes every read of the point in time fail.
pub(crate) fn watch_scratch(
    scratch: PathBuf,
    limit: u64,
    overran: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            if overlay_bytes(&scratch) > limit {
                overran.store(true, Ordering::SeqCst);
                return;
            }
            std::thread::sleep(SCRATCH_POLL);
        }
    })
}

/// Deletes the overlay files in `scratch` (ours or a crashed job's).
pub(crate) fn remove_overlays(scratch: &Path) {
    for entry in fs::read_dir(scratch).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("fleece") && name.ends_with(".qcow2") {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Removes every export, job and node named `vpsbackup-...` from the QEMU,
/// in that order (an export holds its node, a job its target), and stops
/// the NBD server if it serves our socket.
pub fn remove_leftovers(qmp: &mut Qmp, nbd_socket: &Path) -> Result<(), QmpError> {
    let ours = |v: &Value, key: &str| v[key].as_str().is_some_and(|s| s.starts_with(PREFIX));
    let exports = qmp.execute("query-block-exports", json!({}))?;
    for e in exports
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| ours(e, "id"))
    {
        let id = e["id"].as_str().unwrap_or_default().to_owned();
        qmp.execute("block-export-del", json!({"id": id, "mode": "hard"}))?;
        qmp.wait_event(
            "BLOCK_EXPORT_DELETED",
            |d| d["id"] == id.as_str(),
            TEARDOWN_WAIT,
        )?;
    }
    // Our server is the one on our socket; a server someone else started
    // stays (QEMU runs one at most: then ours could not start).
    if nbd_socket.exists() {
        match qmp.execute("nbd-server-stop", json!({})) {
            Ok(_) | Err(QmpError::Command { .. }) => {}
            Err(e) => return Err(e),
        }
        let _ = fs::remove_file(nbd_socket);
    }
    let jobs = qmp.execute("query-block-jobs", json!({}))?;
    for j in jobs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|j| ours(j, "device"))
    {
        let id = j["device"].as_str().unwrap_or_default().to_owned();
        qmp.execute("block-job-cancel", json!({"device": id, "force": true}))?;
        qmp.wait_event(
            "BLOCK_JOB_CANCELLED",
            |d| d["device"] == id.as_str(),
            TEARDOWN_WAIT,
        )?;
    }
    let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    for n in nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| ours(n, "node-name"))
    {
        let name = n["node-name"].as_str().unwrap_or_default().to_owned();
        qmp.execute("blockdev-del", json!({"node-name": name}))?;
    }
    Ok(())
}

/// Reads one disk of a [`PointInTime`] over NBD, as a [`DiskReader`].
pub struct NbdExportReader {
    conns: Vec<Mutex<NbdExport>>,
    size: u64,
    format: DiskFormat,
    /// Runs that may hold data (from `base:allocation` at open: the
    /// overlay's map does not change for the point in time it shows).
    data: Vec<Extent>,
    socket: PathBuf,
    /// Set by the point in time's scratch watchdog: stop reading.
    pub(crate) overran: Option<Arc<AtomicBool>>,
}

impl NbdExportReader {
    pub fn open(
        socket: &Path,
        export: &str,
        size: u64,
        format: DiskFormat,
    ) -> Result<NbdExportReader, DiskError> {
        let io_err = |op| {
            move |source: io::Error| DiskError::Io {
                op,
                path: socket.to_owned(),
                source,
            }
        };
        let mut conns = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            conns.push(
                NbdExport::connect(socket, export, &[BASE_ALLOCATION])
                    .map_err(io_err("connect to the export on"))?,
            );
        }
        if conns[0].size() != size {
            return Err(DiskError::Unsupported {
                path: socket.to_owned(),
                reason: format!("export of {} bytes, expected {size}", conns[0].size()),
            });
        }
        let runs: Vec<StatusRun> = conns[0]
            .status_map(BASE_ALLOCATION)
            .map_err(io_err("read the allocation map of"))?;
        // A hole that does not read as zeros (a backing file's data) must
        // be read.
        let data = merge_runs(
            runs.iter()
                .filter(|r| r.flags & STATE_ZERO == 0 || r.flags & STATE_HOLE == 0),
        );
        Ok(NbdExportReader {
            conns: conns.into_iter().map(Mutex::new).collect(),
            size,
            format,
            data,
            socket: socket.to_owned(),
            overran: None,
        })
    }
}

impl DiskReader for NbdExportReader {
    fn size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> DiskFormat {
        self.format
    }

    fn next_data(&self, from: u64) -> Result<Option<Extent>, DiskError> {
        let i = self.data.partition_point(|e| e.offset + e.len <= from);
        Ok(self.data.get(i).map(|e| {
            let start = e.offset.max(from);
            Extent {
                offset: start,
                len: e.offset + e.len - start,
            }
        }))
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        if self
            .overran
            .as_ref()
            .is_some_and(|o| o.load(Ordering::SeqCst))
        {
            return Err(DiskError::Io {
                op: "read the point-in-time export on",
                path: self.socket.clone(),
                source: io::Error::other("the scratch space limit was reached"),
            });
        }
        // Any free connection; else wait on the first.
        let conn = self
            .conns
            .iter()
            .find_map(|c| c.try_lock().ok())
            .unwrap_or_else(|| self.conns[0].lock().unwrap_or_else(|p| p.into_inner()));
        let mut conn = conn;
        conn.read_exact_at(buf, offset)
            .map_err(|source| DiskError::Io {
                op: "read the point-in-time export on",
                path: self.socket.clone(),
                source,
            })
    }
}
