//! Backups of running servers (runtimes `qemu` and `libvirt`): the disks are
//! read from a point in time taken through the server's QMP socket
//! ([`vpsbackup_engine::PointInTime`]) or through libvirtd's pull-mode
//! backup ([`vpsbackup_engine::LibvirtPointInTime`]), not from their files,
//! through the engine's usual pipeline. The point in time is torn down on
//! every path: here after the read, on an error or a cancel by its drop,
//! and after a crash by the next job's `take`, which removes what it finds
//! by name.

use std::collections::BTreeMap;
use std::path::PathBuf;

use vpsbackup_catalog::{BackupRead, Consistency, JobKind};
use vpsbackup_engine::{
    BackupRequest, BackupSummary, ChangedSince, Checkpoint, DiskError, DiskFormat, DiskReader,
    Extent, JobControl, LibvirtOptions, LibvirtPointInTime, PointInTime, Repository, TakeOptions,
};

use crate::runner::{engine_failure, JobFailure};

/// How a running server's QEMU is reached.
pub(crate) enum Via {
    /// Its QMP socket, and the host end of its guest agent's channel.
    Qmp {
        socket: PathBuf,
        guest_agent: Option<PathBuf>,
    },
    /// libvirtd, by the domain's name (the agent is libvirt's to reach).
    Libvirt { domain: String },
}

/// Where a running server is reached.
pub(crate) struct Running {
    pub via: Via,
    /// Scratch overlays of this server's point in time.
    pub scratch: PathBuf,
    /// The earlier backup whose dirty bitmaps tell what changed (an
    /// incremental backup), or why there is none (a full read).
    pub base: Result<String, String>,
    /// Bytes the scratch overlays may take (`None`: the default).
    pub scratch_limit: Option<u64>,
}

impl Running {
    /// False for a libvirt domain that is shut off (nothing writes its
    /// disks: they are read from their files). An unanswered question
    /// counts as up: the point in time then says what went wrong.
    pub(crate) fn is_up(&self) -> bool {
        match &self.via {
            Via::Qmp { .. } => true,
            Via::Libvirt { domain } => match vpsbackup_engine::libvirt::domain_is_active(domain) {
                Ok(active) => {
                    if !active {
                        tracing::info!(
                            domain,
                            "the libvirt domain is not running: its disks are read from their files"
                        );
                    }
                    active
                }
                Err(_) => true,
            },
        }
    }
}

/// Backs up `req`'s disks from a point in time of the running QEMU,
/// recording `labels` in the manifest.
pub(crate) fn backup(
    repo: &Repository,
    req: &BackupRequest,
    labels: &BTreeMap<String, String>,
    running: Running,
    control: &JobControl,
) -> Result<(BackupSummary, BackupRead), JobFailure> {
    let Running {
        via,
        scratch,
        base,
        scratch_limit,
    } = running;
    let paths: Vec<_> = req.disks.iter().map(|d| d.path.clone()).collect();
    let checkpoint = Some(Checkpoint {
        new: req.backup_id.clone(),
        base: base.as_ref().ok().cloned(),
    });
    let (pit, how) = match via {
        Via::Qmp {
            socket,
            guest_agent,
        } => {
            let opts = TakeOptions {
                checkpoint,
                guest_agent,
                scratch_limit,
            };
            (
                PointInTime::take(&socket, &paths, &scratch, &opts).map(Pit::Qmp),
                "QMP",
            )
        }
        Via::Libvirt { domain } => {
            let opts = LibvirtOptions {
                checkpoint,
                scratch_limit,
            };
            // The guest view's format decides whether libvirt can keep a
            // checkpoint of the disk (qcow2 only).
            let disks: Vec<_> = req
                .disks
                .iter()
                .map(|d| (d.path.clone(), d.format.unwrap_or(DiskFormat::Raw)))
                .collect();
            (
                LibvirtPointInTime::take(&domain, &disks, &scratch, &opts).map(Pit::Libvirt),
                "libvirt",
            )
        }
    };
    let pit = pit.map_err(|e| {
        JobFailure::detailed(
            "The point in time of the running server could not be taken; its disks were not read.",
            format!("Cannot take the point in time: {e}"),
        )
    })?;
    let consistency = match pit.frozen() {
        Ok(filesystems) => {
            tracing::info!(
                disks = paths.len(),
                filesystems,
                via = how,
                "point in time taken with the guest's filesystems frozen"
            );
            Consistency::Frozen
        }
        Err(why) => {
            tracing::info!(
                disks = paths.len(),
                reason = %why,
                via = how,
                "point in time taken; the guest was not frozen, so the backup is crash-consistent"
            );
            Consistency::CrashConsistent
        }
    };
    let mut readers: Vec<Box<dyn DiskReader>> = Vec::with_capacity(paths.len());
    for (i, disk) in req.disks.iter().enumerate() {
        // The guest view is the same whatever the image's format; the
        // manifest records the one the server's disk has.
        let format = disk.format.unwrap_or(DiskFormat::Raw);
        readers.push(pit.reader(i, format).map_err(|e| {
            JobFailure::detailed(
                "The point in time of the running server could not be read.",
                format!("Cannot open the point-in-time export of disk {i}: {e}"),
            )
        })?);
    }
    let changed = base.as_ref().ok().map(|b| ChangedSince {
        base: b.clone(),
        disks: (0..paths.len()).map(|i| pit.changes(i)).collect(),
    });
    let res = repo.backup_from(req, readers, changed.as_ref(), labels, control);
    let overran = pit.overran();
    if let Err(e) = pit.finish(res.is_ok()) {
        // The backup itself is whole; the next job removes what is left
        // (and, with a bitmap it cannot trust, reads in full).
        tracing::warn!(error = %e, "cannot tear the point in time down");
    }
    let summary = res.map_err(|e| {
        if overran {
            JobFailure::detailed(
                "The server rewrote too much of its disks while they were being read; the \
                 backup was stopped to protect the server and will be tried again.",
                format!("The scratch space limit was reached ({e}); raise scratch_limit_mb or back up at a quieter time."),
            )
        } else {
            engine_failure(JobKind::Backup, e)
        }
    })?;
    let full_reason = match (&base, summary.incremental) {
        (_, true) => None,
        (Err(why), false) => Some(why.clone()),
        (Ok(_), false) => Some(summary.full_reasons.join("; ")),
    };
    match &full_reason {
        None => tracing::info!(
            bytes_read = summary.bytes_read,
            "incremental backup: read only what QEMU's dirty bitmaps marked as changed"
        ),
        Some(why) => tracing::info!(bytes_read = summary.bytes_read, reason = %why, "full read"),
    }
    let read = BackupRead {
        incremental: summary.incremental,
        bytes_read: summary.bytes_read,
        full_reason,
        consistency,
    };
    Ok((summary, read))
}

/// A point in time, through QMP or libvirt: the same four questions.
enum Pit {
    Qmp(PointInTime),
    Libvirt(LibvirtPointInTime),
}

impl Pit {
    fn frozen(&self) -> Result<u64, String> {
        match self {
            Pit::Qmp(p) => p.frozen(),
            Pit::Libvirt(p) => p.frozen(),
        }
    }

    fn changes(&self, i: usize) -> Result<Vec<Extent>, String> {
        match self {
            Pit::Qmp(p) => p.changes(i),
            Pit::Libvirt(p) => p.changes(i),
        }
    }

    fn reader(&self, i: usize, format: DiskFormat) -> Result<Box<dyn DiskReader>, DiskError> {
        Ok(match self {
            Pit::Qmp(p) => Box::new(p.reader(i, format)?),
            Pit::Libvirt(p) => Box::new(p.reader(i, format)?),
        })
    }

    fn overran(&self) -> bool {
        match self {
            Pit::Qmp(p) => p.overran(),
            Pit::Libvirt(p) => p.overran(),
        }
    }

    fn finish(self, completed: bool) -> Result<(), DiskError> {
        match self {
            Pit::Qmp(p) => p.finish(completed),
            Pit::Libvirt(p) => p.finish(completed),
        }
    }
}
