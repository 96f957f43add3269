//! Backups of running servers (runtime `qemu`): the disks are read from a
//! point in time taken through the server's QMP socket
//! ([`vpsbackup_engine::PointInTime`]), not from their files, through the
//! engine's usual pipeline. The point in time is torn down on every path:
//! here after the read, on an error or a cancel by its drop, and after a
//! crash by the next job's `take`, which removes what it finds by name.

use std::collections::BTreeMap;
use std::path::Path;

use vpsbackup_catalog::JobKind;
use vpsbackup_engine::{
    BackupRequest, BackupSummary, DiskFormat, DiskReader, JobControl, PointInTime, Repository,
};

use crate::runner::{engine_failure, JobFailure};

/// Backs up `req`'s disks from a point in time of the QEMU on `qmp`, with
/// scratch overlays in `scratch`, recording `labels` in the manifest.
pub(crate) fn backup(
    repo: &Repository,
    req: &BackupRequest,
    labels: &BTreeMap<String, String>,
    qmp: &Path,
    scratch: &Path,
    control: &JobControl,
) -> Result<BackupSummary, JobFailure> {
    let paths: Vec<_> = req.disks.iter().map(|d| d.path.clone()).collect();
    let pit = PointInTime::take(qmp, &paths, scratch).map_err(|e| {
        JobFailure::detailed(
            "The point in time of the running server could not be taken; its disks were not read.",
            format!("Cannot take the point in time: {e}"),
        )
    })?;
    tracing::info!(
        disks = paths.len(),
        "point in time taken through QMP; the guest was not frozen, so the backup is crash-consistent"
    );
    let mut readers: Vec<Box<dyn DiskReader>> = Vec::with_capacity(paths.len());
    for (i, disk) in req.disks.iter().enumerate() {
        // The guest view is the same whatever the image's format; the
        // manifest records the one the server's disk has.
        let format = disk.format.unwrap_or(DiskFormat::Raw);
        readers.push(Box::new(pit.reader(i, format).map_err(|e| {
            JobFailure::detailed(
                "The point in time of the running server could not be read.",
                format!("Cannot open the point-in-time export of disk {i}: {e}"),
            )
        })?));
    }
    let res = repo.backup_from(req, readers, labels, control);
    if let Err(e) = pit.finish() {
        // The backup itself is whole; the next job removes what is left.
        tracing::warn!(error = %e, "cannot tear the point in time down");
    }
    res.map_err(|e| engine_failure(JobKind::Backup, e))
}
