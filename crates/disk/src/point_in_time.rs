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
//! removed. The guest is not frozen: the view is crash-consistent.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use crate::nbd_export::{NbdExport, StatusRun, BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};
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

/// The point in time of one server's disks, live until dropped.
pub struct PointInTime {
    qmp: Qmp,
    qmp_socket: PathBuf,
    scratch: PathBuf,
    nbd_socket: PathBuf,
    /// Per disk: (export name, guest size).
    exports: Vec<(String, u64)>,
    torn_down: bool,
}

/// A block node that holds an image file, from `query-named-block-nodes`.
fn node_for(nodes: &[Value], path: &Path) -> Option<(String, u64)> {
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
        .find_map(|n| {
            Some((
                n["node-name"].as_str()?.to_owned(),
                n["image"]["virtual-size"].as_u64()?,
            ))
        })
}

impl PointInTime {
    /// Takes the point in time of `disks` (image paths, as the running QEMU
    /// opened them) through the QMP socket `qmp_socket`, with scratch files
    /// in `scratch` (created; one directory per server, used by one job at
    /// a time).
    pub fn take(
        qmp_socket: &Path,
        disks: &[PathBuf],
        scratch: &Path,
    ) -> Result<PointInTime, DiskError> {
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
            exports: Vec::new(),
            torn_down: false,
        };
        let mut actions = Vec::new();
        let mut sized = Vec::new();
        for (i, disk) in disks.iter().enumerate() {
            let (node, size) = node_for(&nodes, disk).ok_or_else(|| DiskError::Unsupported {
                path: disk.clone(),
                reason: "the running QEMU has no block node for this disk".into(),
            })?;
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
            sized.push(size);
        }
        // The instant: all disks at once.
        pit.qmp
            .execute("transaction", json!({ "actions": actions }))
            .map_err(&err)?;
        pit.qmp
            .execute(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": pit.nbd_socket}}}),
            )
            .map_err(&err)?;
        for (i, size) in sized.into_iter().enumerate() {
            let name = format!("{PREFIX}exp{i}");
            pit.qmp
                .execute(
                    "block-export-add",
                    json!({"type": "nbd", "id": name, "node-name": format!("{PREFIX}fleece{i}"),
                           "name": name, "writable": false}),
                )
                .map_err(&err)?;
            pit.exports.push((name, size));
        }
        Ok(pit)
    }

    /// A reader of disk `i` as it was at the point in time, reporting
    /// `format` (the disk's recorded one: the guest view is the same).
    pub fn reader(&self, i: usize, format: DiskFormat) -> Result<NbdExportReader, DiskError> {
        let (name, size) = self.exports.get(i).ok_or_else(|| DiskError::Unsupported {
            path: self.qmp_socket.clone(),
            reason: format!("no disk {i} in the point in time"),
        })?;
        NbdExportReader::open(&self.nbd_socket, name, *size, format)
    }

    /// Ends the exports and the jobs and removes the overlays; errors are
    /// collected, not stopped at, so as much as possible is removed.
    pub fn finish(mut self) -> Result<(), DiskError> {
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
        let r = remove_leftovers(&mut self.qmp, &self.nbd_socket);
        remove_overlays(&self.scratch);
        r.map_err(qmp_err(&self.qmp_socket))
    }
}

impl Drop for PointInTime {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

/// Deletes the overlay files in `scratch` (ours or a crashed job's).
fn remove_overlays(scratch: &Path) {
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
        let data = runs
            .iter()
            // A hole that does not read as zeros (a backing file's data)
            // must be read.
            .filter(|r| r.flags & STATE_ZERO == 0 || r.flags & STATE_HOLE == 0)
            .fold(Vec::<Extent>::new(), |mut v, r| {
                match v.last_mut() {
                    Some(l) if l.offset + l.len == r.offset => l.len += r.len,
                    _ => v.push(Extent {
                        offset: r.offset,
                        len: r.len,
                    }),
                }
                v
            });
        Ok(NbdExportReader {
            conns: conns.into_iter().map(Mutex::new).collect(),
            size,
            format,
            data,
            socket: socket.to_owned(),
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
