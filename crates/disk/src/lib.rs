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
//!
//! Format detection reads the image's first bytes. A raw guest disk whose
//! guest wrote a qcow2 header at sector 0 would then be opened as qcow2 and
//! could name a host file as its backing file; where the caller knows the
//! format (the catalog records it), use [`open_reader_as`] and
//! [`open_writer_as`] instead of the detecting variants.

mod aligned;
pub mod libvirt;
mod lock;
mod nbd;
pub mod nbd_export;
mod nbd_proto;
pub mod point_in_time;
mod qcow2;
pub mod qga;
pub mod qmp;
mod raw;

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

pub use aligned::{is_zero, AlignedBuf, PAGE_SIZE};
pub use lock::ensure_not_in_use;
pub use qcow2::{Qcow2Reader, Qcow2Writer};
pub use raw::{RawReader, RawWriter};

/// The first four bytes of every qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

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

impl DiskFormat {
    /// Stable lower-case name, as stored in manifests and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::BlockDevice => "block",
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<DiskFormat, String> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            "block" => Ok(DiskFormat::BlockDevice),
            other => Err(format!("unknown disk format {other:?} (raw, qcow2, block)")),
        }
    }
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
    /// A running QEMU holds the image's write lock: reading it now would mix
    /// blocks from different moments. The text names no host path: it is a
    /// job's failure reason as customers see it.
    #[error("a disk of the server is open for writing by a running QEMU (it holds the image's write lock), so it was not read; stop the server first, or record its runtime as qemu for a point-in-time backup")]
    InUse { path: PathBuf },
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
    /// True when this writer created the target afresh, so it reads as zeros
    /// everywhere: a restore need not read it back nor write zero ranges.
    fn created(&self) -> bool {
        false
    }
    fn finish(self: Box<Self>) -> Result<(), DiskError>;
}

/// Tells the format of an existing image: a block device by its file type,
/// qcow2 by its magic, anything else is raw.
pub fn detect_format(path: &Path) -> Result<DiskFormat, DiskError> {
    let io_err = |op| {
        move |source| DiskError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    };
    let meta = std::fs::metadata(path).map_err(io_err("stat"))?;
    if meta.file_type().is_block_device() {
        return Ok(DiskFormat::BlockDevice);
    }
    if !meta.is_file() {
        return Err(DiskError::Unsupported {
            path: path.to_owned(),
            reason: "not a regular file or block device".into(),
        });
    }
    let mut magic = [0u8; 4];
    let mut file = File::open(path).map_err(io_err("open"))?;
    let mut got = 0;
    while got < magic.len() {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("read header")(e)),
        }
    }
    Ok(if got == 4 && magic == QCOW2_MAGIC {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    })
}

/// The format a restore target gets from what it is and its name, never
/// from the bytes in it: a block device by its file type, qcow2 when the
/// name ends in `.qcow2`, else raw.
pub fn format_by_name(path: &Path) -> DiskFormat {
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => DiskFormat::BlockDevice,
        _ if path.extension().is_some_and(|ext| ext == "qcow2") => DiskFormat::Qcow2,
        _ => DiskFormat::Raw,
    }
}

/// Opens an image or block device for reading, detecting its format.
pub fn open_reader(path: &Path) -> Result<Box<dyn DiskReader>, DiskError> {
    open_reader_as(path, detect_format(path)?)
}

/// Opens an image for reading as the given format, without probing.
/// Refused while a running QEMU may write to it ([`ensure_not_in_use`]).
pub fn open_reader_as(path: &Path, format: DiskFormat) -> Result<Box<dyn DiskReader>, DiskError> {
    ensure_not_in_use(path)?;
    Ok(match format {
        DiskFormat::Raw => Box::new(RawReader::open(path, false)?),
        DiskFormat::BlockDevice => Box::new(RawReader::open(path, true)?),
        DiskFormat::Qcow2 => Box::new(Qcow2Reader::open(path)?),
    })
}

/// Opens the target of a restore, `size` bytes of guest view.
///
/// An existing target keeps its format (qcow2 by magic, block device by file
/// type, else raw) and is updated in place when its size matches. A raw
/// file of another size is truncated or extended; a qcow2 of another size is
/// recreated. A missing target is created sparse: qcow2 when the path ends
/// in `.qcow2`, raw otherwise.
pub fn open_writer(path: &Path, size: u64) -> Result<Box<dyn DiskWriter>, DiskError> {
    let format = match std::fs::symlink_metadata(path) {
        Ok(_) => detect_format(path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => format_by_name(path),
        Err(source) => {
            return Err(DiskError::Io {
                op: "stat",
                path: path.to_owned(),
                source,
            })
        }
    };
    open_writer_as(path, size, format)
}

/// Opens the target of a restore as the given format, without probing an
/// existing file (see [`open_writer`] for what happens to it). Refused
/// while a running QEMU may write to it: a restore under a running guest
/// would be overwritten by the guest and corrupt its filesystem.
pub fn open_writer_as(
    path: &Path,
    size: u64,
    format: DiskFormat,
) -> Result<Box<dyn DiskWriter>, DiskError> {
    ensure_not_in_use(path)?;
    let exists = match std::fs::metadata(path) {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(source) => {
            return Err(DiskError::Io {
                op: "stat",
                path: path.to_owned(),
                source,
            })
        }
    };
    Ok(match format {
        DiskFormat::Raw => Box::new(RawWriter::open(path, size, false)?),
        DiskFormat::BlockDevice => Box::new(RawWriter::open(path, size, true)?),
        DiskFormat::Qcow2 => {
            let recreate = !exists || qcow2::virtual_size(path)? != size;
            Box::new(Qcow2Writer::open(path, size, recreate)?)
        }
    })
}
