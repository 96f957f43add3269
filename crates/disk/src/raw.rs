//! Raw image files and block devices, read and written with `pread`/`pwrite`.
//!
//! Raw files are treated as sparse: the data map comes from
//! `lseek(SEEK_DATA/SEEK_HOLE)`, so holes are never read, and zeroing punches
//! holes. A block device has no holes we can see: it is one extent, and
//! zeroing uses `BLKZEROOUT` (the device may offload it).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::{DiskError, DiskFormat, DiskReader, DiskWriter, Extent};

/// Largest zero buffer written at once when a hole cannot be punched.
const ZERO_WRITE_CHUNK: usize = 1 << 20;

/// A raw image file or a block device opened with plain file I/O.
struct RawFile {
    file: File,
    path: PathBuf,
    size: u64,
    block_device: bool,
}

impl RawFile {
    fn io(&self, op: &'static str) -> impl FnOnce(io::Error) -> DiskError + '_ {
        move |source| DiskError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(&self.path, self.size, offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(self.io("read"))
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        check_range(&self.path, self.size, offset, buf.len() as u64)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(self.io("write"))
    }

    /// `lseek` with SEEK_DATA/SEEK_HOLE; `None` when the kernel says ENXIO
    /// (no data at or after `from`).
    fn seek_data_hole(&self, from: u64, whence: libc::c_int) -> Result<Option<u64>, DiskError> {
        let offset = libc::off_t::try_from(from).map_err(|_| DiskError::Unsupported {
            path: self.path.clone(),
            reason: format!("offset {from} does not fit in off_t"),
        })?;
        #[allow(unsafe_code)]
        // SAFETY: lseek on a descriptor we own; it only moves the file position,
        // which nothing else here uses (all I/O is positional).
        let pos = unsafe { libc::lseek(self.file.as_raw_fd(), offset, whence) };
        if pos < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(self.io("lseek")(err)),
            };
        }
        Ok(Some(pos as u64))
    }

    fn next_data(&self, from: u64) -> Result<Option<Extent>, DiskError> {
        if from >= self.size {
            return Ok(None);
        }
        if self.block_device {
            return Ok(Some(Extent {
                offset: from,
                len: self.size - from,
            }));
        }
        let Some(start) = self.seek_data_hole(from, libc::SEEK_DATA)? else {
            return Ok(None);
        };
        if start >= self.size {
            return Ok(None);
        }
        // Every file has an implicit hole at its end, so SEEK_HOLE after a data
        // offset always answers; fall back to the end if it somehow does not.
        let end = self
            .seek_data_hole(start, libc::SEEK_HOLE)?
            .unwrap_or(self.size)
            .min(self.size);
        Ok(Some(Extent {
            offset: start,
            len: end - start,
        }))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        check_range(&self.path, self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let offloaded = if self.block_device {
            self.blkzeroout(offset, len)?
        } else {
            self.punch_hole(offset, len)?
        };
        if !offloaded {
            self.write_zero_buffers(offset, len)?;
        }
        Ok(())
    }

    /// Returns false when the filesystem cannot punch holes.
    fn punch_hole(&self, offset: u64, len: u64) -> Result<bool, DiskError> {
        #[allow(unsafe_code)]
        // SAFETY: fallocate on a descriptor we own; KEEP_SIZE means the file
        // length never changes, PUNCH_HOLE only deallocates the given range.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
            _ => Err(self.io("fallocate(PUNCH_HOLE)")(err)),
        }
    }

    /// Returns false when the device does not support BLKZEROOUT.
    fn blkzeroout(&self, offset: u64, len: u64) -> Result<bool, DiskError> {
        // _IO(0x12, 127) from <linux/fs.h>; the range must be 512-byte aligned.
        const BLKZEROOUT: libc::c_ulong = 0x127f;
        if offset % 512 != 0 || len % 512 != 0 {
            return Ok(false);
        }
        let range: [u64; 2] = [offset, len];
        #[allow(unsafe_code)]
        // SAFETY: BLKZEROOUT reads a u64[2] {start, len} from the pointer, which
        // points at a live local array for the duration of the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) => Ok(false),
            _ => Err(self.io("ioctl(BLKZEROOUT)")(err)),
        }
    }

    fn write_zero_buffers(&self, mut offset: u64, len: u64) -> Result<(), DiskError> {
        let zeros = crate::AlignedBuf::new(ZERO_WRITE_CHUNK.min(len as usize));
        let end = offset + len;
        while offset < end {
            let n = zeros.len().min((end - offset) as usize);
            self.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// Fails with `UnexpectedEof` if `[offset, offset + len)` passes `size`.
pub(crate) fn check_range(path: &Path, size: u64, offset: u64, len: u64) -> Result<(), DiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::Io {
            op: "access",
            path: path.to_owned(),
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("range {offset}+{len} passes the end of the disk ({size} bytes)"),
            ),
        }),
    }
}

fn size_of(file: &mut File, path: &Path, block_device: bool) -> Result<u64, DiskError> {
    if block_device {
        // Seeking to the end is the portable way to size a block device
        // (metadata().len() is 0 for them).
        file.seek(SeekFrom::End(0)).map_err(|source| DiskError::Io {
            op: "size block device",
            path: path.to_owned(),
            source,
        })
    } else {
        file.metadata()
            .map(|m| m.len())
            .map_err(|source| DiskError::Io {
                op: "stat",
                path: path.to_owned(),
                source,
            })
    }
}

/// Reads a raw image file or a block device.
pub struct RawReader {
    inner: RawFile,
    /// The last map answer: a query from `.0` found `.1`. Callers walk the
    /// disk in blocks and ask again at every block; inside a long extent the
    /// answer is the same one clipped, and asking the kernel each time costs
    /// two `lseek`s that may walk the page cache. Like any map read without
    /// a snapshot, it describes the file as it was when first asked.
    last_map: Mutex<Option<(u64, Option<Extent>)>>,
}

impl RawReader {
    pub fn open(path: &Path, block_device: bool) -> Result<RawReader, DiskError> {
        let mut file = File::open(path).map_err(|source| DiskError::Io {
            op: "open",
            path: path.to_owned(),
            source,
        })?;
        let size = size_of(&mut file, path, block_device)?;
        Ok(RawReader {
            inner: RawFile {
                file,
                path: path.to_owned(),
                size,
                block_device,
            },
            last_map: Mutex::new(None),
        })
    }
}

impl DiskReader for RawReader {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn format(&self) -> DiskFormat {
        if self.inner.block_device {
            DiskFormat::BlockDevice
        } else {
            DiskFormat::Raw
        }
    }

    fn next_data(&self, from: u64) -> Result<Option<Extent>, DiskError> {
        let cached = *self.last_map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((asked, found)) = cached {
            if let Some(hit) = clip_cached(asked, found, from) {
                return Ok(hit);
            }
        }
        let found = self.inner.next_data(from)?;
        *self.last_map.lock().unwrap_or_else(|p| p.into_inner()) = Some((from, found));
        Ok(found)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.inner.read_exact_at(buf, offset)
    }
}

/// Answers a query from `from` out of an earlier answer `found` to a query
/// from `asked`, when it covers `from`: everything between `asked` and the
/// found extent is a hole, so any `from` in `[asked, end of extent)` gets the
/// same extent clipped (and `None` stays `None` further on).
fn clip_cached(asked: u64, found: Option<Extent>, from: u64) -> Option<Option<Extent>> {
    if from < asked {
        return None;
    }
    match found {
        None => Some(None),
        Some(e) if from < e.offset + e.len => {
            let start = e.offset.max(from);
            Some(Some(Extent {
                offset: start,
                len: e.offset + e.len - start,
            }))
        }
        Some(_) => None,
    }
}

/// Writes a raw image file (sparse) or a block device in place.
///
/// Page-aligned writes go through a second descriptor opened with
/// `O_DIRECT`: a restore writes each byte once and never reads it back, so
/// copying it into the page cache (and reclaiming that cache later, and
/// flushing it all at `finish`) is pure cost. Unaligned writes and file
/// systems without `O_DIRECT` (tmpfs) use the ordinary descriptor; the kernel
/// keeps the two coherent (a direct write flushes and drops cached pages of
/// its range), and our writes never share a page because direct ones cover
/// whole pages.
pub struct RawWriter {
    inner: RawFile,
    created: bool,
    direct: Option<File>,
}

/// Alignment of offsets, lengths and memory for `O_DIRECT` writes.
const DIRECT_ALIGN: usize = crate::PAGE_SIZE;
/// Writes smaller than this stay buffered (not worth a synchronous device write).
const DIRECT_MIN: usize = 64 << 10;
/// Size of the per-thread aligned copy used when the caller's buffer is not aligned.
const BOUNCE_SIZE: usize = 1 << 20;

thread_local! {
    static BOUNCE: std::cell::RefCell<Option<crate::AlignedBuf>> =
        const { std::cell::RefCell::new(None) };
}

/// Writes `buf` at `offset` through an `O_DIRECT` descriptor, copying it
/// into an aligned per-thread buffer first when it is not page aligned.
fn write_direct(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    if buf.as_ptr() as usize % DIRECT_ALIGN == 0 {
        return file.write_all_at(buf, offset);
    }
    BOUNCE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let bounce = slot.get_or_insert_with(|| crate::AlignedBuf::new(BOUNCE_SIZE));
        for (i, piece) in buf.chunks(BOUNCE_SIZE).enumerate() {
            bounce[..piece.len()].copy_from_slice(piece);
            file.write_all_at(&bounce[..piece.len()], offset + (i * BOUNCE_SIZE) as u64)?;
        }
        Ok(())
    })
}

impl RawWriter {
    /// Opens (creating if needed) a raw file and gives it length `size`;
    /// a block device must be at least `size` bytes.
    pub fn open(path: &Path, size: u64, block_device: bool) -> Result<RawWriter, DiskError> {
        // create_new tells us atomically whether the file is ours and empty.
        let created = !block_device
            && match OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(_) => true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
                Err(source) => {
                    return Err(DiskError::Io {
                        op: "create",
                        path: path.to_owned(),
                        source,
                    })
                }
            };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| DiskError::Io {
                op: "open for writing",
                path: path.to_owned(),
                source,
            })?;
        if block_device {
            let device_size = size_of(&mut file, path, true)?;
            if device_size < size {
                return Err(DiskError::Unsupported {
                    path: path.to_owned(),
                    reason: format!(
                        "the block device holds {device_size} bytes, the disk needs {size}"
                    ),
                });
            }
        } else if size_of(&mut file, path, false)? != size {
            // set_len leaves a hole when growing, so a new target stays sparse.
            file.set_len(size).map_err(|source| DiskError::Io {
                op: "set length",
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(RawWriter {
            inner: RawFile {
                file,
                path: path.to_owned(),
                size,
                block_device,
            },
            created,
            direct: open_direct(path),
        })
    }
}

/// A second, `O_DIRECT` write descriptor, or `None` where the file system
/// refuses it (then every write is buffered).
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

impl DiskWriter for RawWriter {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.inner.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        check_range(&self.inner.path, self.inner.size, offset, buf.len() as u64)?;
        if let Some(direct) = &self.direct {
            if offset % DIRECT_ALIGN as u64 == 0
                && buf.len() % DIRECT_ALIGN == 0
                && buf.len() >= DIRECT_MIN
            {
                match write_direct(direct, buf, offset) {
                    Ok(()) => return Ok(()),
                    // The device wants a larger alignment than a page, or a
                    // short write left an unaligned rest: write it buffered.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    Err(e) => return Err(self.inner.io("write")(e)),
                }
            }
        }
        self.inner.write_all_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.inner.write_zeroes(offset, len)
    }

    fn created(&self) -> bool {
        self.created
    }

    fn finish(self: Box<Self>) -> Result<(), DiskError> {
        self.inner.file.sync_all().map_err(self.inner.io("fsync"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_map_answers_only_inside_what_it_saw() {
        let e = Extent {
            offset: 100,
            len: 50,
        };
        // Before the question: unknown.
        assert_eq!(clip_cached(10, Some(e), 5), None);
        // In the hole before the extent, and inside it: clipped extent.
        assert_eq!(clip_cached(10, Some(e), 10), Some(Some(e)));
        assert_eq!(clip_cached(10, Some(e), 99), Some(Some(e)));
        assert_eq!(
            clip_cached(10, Some(e), 120),
            Some(Some(Extent {
                offset: 120,
                len: 30
            }))
        );
        // At or past its end: unknown (another extent may follow).
        assert_eq!(clip_cached(10, Some(e), 150), None);
        // "No more data" holds for every later offset.
        assert_eq!(clip_cached(10, None, 1 << 40), Some(None));
        assert_eq!(clip_cached(10, None, 9), None);
    }
}
