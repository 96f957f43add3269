//! Is a running QEMU writing this image?
//!
//! QEMU announces what it does with an image file through open file
//! description (OFD) byte-range locks (`file-posix.c`): a shared lock on
//! byte 100 + n while it holds permission bit n, and on byte 200 + n while
//! it refuses to share it. Bit 1 is WRITE and bit 3 RESIZE, so a lock held
//! on byte 101 or 103 means some QEMU process (a VM, `qemu-storage-daemon`,
//! a writable `qemu-nbd`) may change the image while we read it: a read
//! then mixes blocks from different moments, which is a torn backup, and a
//! restore would write under a running guest. `F_OFD_GETLK` asks the
//! kernel whether a lock by any other open file description conflicts with
//! one we would take, without taking it.
//!
//! A QEMU started with `locking=off` takes no locks and cannot be seen here.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::DiskError;

/// Byte of QEMU's "holds the WRITE permission" lock.
const QEMU_LOCK_WRITE: i64 = 100 + 1;
/// Byte of QEMU's "holds the RESIZE permission" lock.
const QEMU_LOCK_RESIZE: i64 = 100 + 3;

/// True when another open file description holds a lock on byte `at` of
/// `file` that would conflict with an exclusive one.
fn locked_by_other(file: &File, at: i64) -> io::Result<bool> {
    let mut probe: libc::flock = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: at,
        l_len: 1,
        // OFD locks require l_pid 0 on the way in.
        l_pid: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: `probe` is a valid, initialised `flock` that lives across the call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut probe) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(probe.l_type != libc::F_UNLCK as libc::c_short)
}

/// Refuses an image a running QEMU may write to (see the module doc).
/// `Ok(())` when no process holds QEMU's write or resize lock on it; a
/// missing file is left for the caller's own open to report.
pub fn ensure_not_in_use(path: &Path) -> Result<(), DiskError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(DiskError::Io {
                op: "open",
                path: path.to_owned(),
                source,
            })
        }
    };
    for at in [QEMU_LOCK_WRITE, QEMU_LOCK_RESIZE] {
        let held = locked_by_other(&file, at).map_err(|source| DiskError::Io {
            op: "check the locks of",
            path: path.to_owned(),
            source,
        })?;
        if held {
            return Err(DiskError::InUse {
                path: path.to_owned(),
            });
        }
    }
    Ok(())
}
