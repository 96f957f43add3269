//! Disk images as the engine sees them: a guest-visible byte range with a
//! map of where data may be, read and written at offsets.
//!
//! Formats: raw image files (sparse: holes found with `SEEK_DATA`/`SEEK_HOLE`
//! are never read), block devices, and qcow2 (backing chains, compressed
//! clusters) through QEMU's own tools. Nothing here knows about chunks,
//! stores, HTTP or SQL.
//!
//! Error policy: every fallible call returns [`DiskError`], which names the
//! path and the operation; callers add their own context.

use std::io;
use std::path::{Path, PathBuf};

/// A region of a disk that may hold non-zero data. Bytes outside every
/// extent read as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// The on-disk format of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
    BlockDevice,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("{tool} failed for {path}: {stderr}")]
    Tool {
        tool: &'static str,
        path: PathBuf,
        stderr: String,
    },
}

/// Reads one disk's guest view. Methods take `&self` so several threads can
/// read at once (`pread`-style).
pub trait DiskReader: Send + Sync {
    /// Guest-visible size in bytes.
    fn size(&self) -> u64;
    /// The format the image was opened as.
    fn format(&self) -> DiskFormat;
    /// The first extent that may hold data at or after `from`, clipped to
    /// start at `from`; `None` when only zeros remain.
    fn next_data(&self, from: u64) -> Result<Option<Extent>, DiskError>;
    /// Fills `buf` from `offset`; fails if the range passes the end.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError>;
}

/// Writes one disk during a restore. `&self` methods so several threads can
/// write at once; `finish` makes everything durable and releases helpers
/// such as a `qemu-nbd` process.
pub trait DiskWriter: Send + Sync {
    fn size(&self) -> u64;
    /// Reads what the target holds now, so a restore onto an existing disk
    /// writes only the chunks that differ.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError>;
    /// Makes `len` bytes at `offset` read as zeros, leaving a hole where the
    /// format allows.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError>;
    fn finish(self: Box<Self>) -> Result<(), DiskError>;
}

/// Opens an image or block device for reading, detecting its format.
pub fn open_reader(path: &Path) -> Result<Box<dyn DiskReader>, DiskError> {
    let _ = path;
    Err(DiskError::Unsupported {
        path: path.to_owned(),
        reason: "disk readers are being written (issue 2)".into(),
    })
}
