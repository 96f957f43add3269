//! The local filesystem backend: one file per object under a root directory.
//!
//! Writes go to a temp file in the target directory, are fsynced, then
//! published with `link` (put-if-absent: fails if the name exists) or
//! `rename` (put), and the directory is fsynced, so a crash leaves either
//! the whole object or none. Stray temp files (`.tmp-*`) from a crash are
//! invisible to `list` and removed by [`LocalStorage::clean_temp_files`].

use super::{validate_key, ObjectMeta, Storage, StorageError};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use vpsbackup_disk::{AlignedBuf, PAGE_SIZE};

/// The direct-write staging buffer grows in steps of this size.
const STAGING_STEP: usize = 4 << 20;
/// Objects at least this large (packs) are written with O_DIRECT.
const DIRECT_MIN: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
    /// Whether large objects bypass the page cache (see [`LocalStorage::write_temp`]).
    direct: bool,
    /// A page-aligned staging buffer kept between direct writes.
    staging: std::sync::Arc<std::sync::Mutex<Option<AlignedBuf>>>,
}

impl LocalStorage {
    /// Uses `root` as the store directory, creating it if needed.
    pub fn new(root: &Path) -> Result<Self, StorageError> {
        fs::create_dir_all(root).map_err(|e| io_err("create directory", root.display(), e))?;
        Ok(Self {
            root: root.to_owned(),
            direct: true,
            staging: Default::default(),
        })
    }

    /// Writes every object through the page cache (for filesystems where
    /// O_DIRECT misbehaves, or to measure the difference).
    pub fn buffered(mut self) -> Self {
        self.direct = false;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    /// Removes temp files older than `age` left by writers that crashed.
    fn clean_temp_files(&self, age: Duration) -> Result<u64, StorageError> {
        let mut removed = 0;
        let cutoff = SystemTime::now() - age;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in read_dir(&dir)? {
                let entry = entry.map_err(|e| io_err("list", dir.display(), e))?;
                let ty = entry
                    .file_type()
                    .map_err(|e| io_err("stat", entry.path().display(), e))?;
                if ty.is_dir() {
                    stack.push(entry.path());
                } else if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                    let old = entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .map(|m| m < cutoff)
                        .unwrap_or(false);
                    if old && fs::remove_file(entry.path()).is_ok() {
                        removed += 1;
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Creates `dir` (and parents) under the root if missing, syncing each
    /// parent so the new directory entries survive a crash along with the
    /// objects about to be linked into them.
    fn ensure_dir(&self, dir: &Path, key: &str) -> Result<(), StorageError> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            if parent.starts_with(&self.root) && parent != self.root {
                self.ensure_dir(parent, key)?;
            }
        }
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(io_err("create directory", key, e)),
        }
        sync_dir(dir.parent().expect("below the root"), key)
    }

    /// Writes `data` into a synced temp file next to `path`; returns its path.
    fn write_temp(&self, key: &str, path: &Path, data: &[u8]) -> Result<PathBuf, StorageError> {
        let dir = path.parent().expect("object paths have a parent");
        self.ensure_dir(dir, key)?;
        let mut name = [0u8; 8];
        getrandom::fill(&mut name)
            .map_err(|e| io_err("random", key, io::Error::other(e.to_string())))?;
        let tmp = dir.join(format!(".tmp-{}", hex::encode(name)));
        if self.direct && data.len() >= DIRECT_MIN {
            match self.write_direct(&tmp, data) {
                Ok(()) => return Ok(tmp),
                // EINVAL: this filesystem refuses O_DIRECT; write buffered instead.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    let _ = fs::remove_file(&tmp);
                }
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    return Err(io_err("write", key, e));
                }
            }
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_err("create", key, e))?;
        let res = f.write_all(data).and_then(|()| f.sync_all());
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("write", key, e));
        }
        Ok(tmp)
    }
}

fn io_err(op: &'static str, key: impl std::fmt::Display, source: io::Error) -> StorageError {
    if matches!(
        source.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT)
    ) {
        return StorageError::NoSpace {
            op,
            key: key.to_string(),
        };
    }
    StorageError::Io {
        op,
        key: key.to_string(),
        source,
    }
}

fn read_dir(dir: &Path) -> Result<fs::ReadDir, StorageError> {
    fs::read_dir(dir).map_err(|e| io_err("list", dir.display(), e))
}

fn sync_dir(dir: &Path, key: &str) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("sync directory of", key, e))
}

fn meta_of(key: String, m: &fs::Metadata) -> ObjectMeta {
    ObjectMeta {
        key,
        size: m.len(),
        modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

impl LocalStorage {
    /// Packs are written once and read rarely: writing them around the page
    /// cache saves the kernel copy and the reclaim of cache pages it forces
    /// (a quarter of a full backup's CPU when the cache is full), and keeps
    /// the disks being backed up in cache. The tail is padded to a page and
    /// cut back with `set_len`.
    fn write_direct(&self, tmp: &Path, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let padded = data.len().next_multiple_of(PAGE_SIZE);
        let mut staging = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        if staging.as_ref().is_none_or(|b| b.len() < padded) {
            // With headroom: packs vary a little in size, and regrowing by a
            // few pages each time would allocate (and zero) a fresh buffer.
            *staging = Some(AlignedBuf::new(padded.next_multiple_of(STAGING_STEP)));
        }
        let buf = staging.as_mut().expect("staging buffer allocated");
        buf[..data.len()].copy_from_slice(data);
        buf[data.len()..padded].fill(0);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(tmp)?;
        f.write_all(&buf[..padded])?;
        f.set_len(data.len() as u64)?;
        f.sync_all()
    }
}

impl Storage for LocalStorage {
    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool, StorageError> {
        let path = self.path(key)?;
        if path.exists() {
            return Ok(false);
        }
        let tmp = self.write_temp(key, &path, data)?;
        // link() refuses an existing name, unlike rename(): the no-clobber publish.
        let res = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match res {
            Ok(()) => {
                sync_dir(path.parent().expect("parent"), key)?;
                super::crash_point();
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io_err("publish", key, e)),
        }
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<(), StorageError> {
        let path = self.path(key)?;
        let tmp = self.write_temp(key, &path, data)?;
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("publish", key, e));
        }
        sync_dir(path.parent().expect("parent"), key)?;
        super::crash_point();
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StorageError> {
        let path = self.path(key)?;
        fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StorageError::NotFound(key.to_owned()),
            _ => io_err("read", key, e),
        })
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StorageError> {
        let mut buf = Vec::new();
        self.get_range_into(key, offset, len, &mut buf)?;
        Ok(buf)
    }

    fn get_range_into(
        &self,
        key: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StorageError> {
        let path = self.path(key)?;
        let f = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StorageError::NotFound(key.to_owned()),
            _ => io_err("open", key, e),
        })?;
        // Reused buffers are only zeroed where they grow.
        buf.resize(len as usize, 0);
        f.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                StorageError::OutOfRange {
                    key: key.to_owned(),
                    offset,
                    len,
                    size: f.metadata().map(|m| m.len()).unwrap_or(0),
                }
            } else {
                io_err("read", key, e)
            }
        })
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        let path = self.path(key)?;
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(meta_of(key.to_owned(), &m))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat", key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        // Walk from the deepest directory the prefix names fully.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = self.root.join(dir_part);
        let mut out = Vec::new();
        let mut stack = vec![(start, dir_part.to_owned())];
        while let Some((dir, rel)) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("list", dir.display(), e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| io_err("list", dir.display(), e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(".tmp-") {
                    continue;
                }
                let key = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let m = match entry.metadata() {
                    Ok(m) => m,
                    // Deleted between readdir and stat: not there any more.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err("stat", &key, e)),
                };
                if m.is_dir() {
                    if key.starts_with(prefix) || prefix.starts_with(&format!("{key}/")) {
                        stack.push((entry.path(), key));
                    }
                } else if key.starts_with(prefix) {
                    out.push(meta_of(key, &m));
                }
            }
        }
        Ok(out)
    }

    fn remove_stale_temp(&self, age: Duration) -> Result<u64, StorageError> {
        self.clean_temp_files(age)
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(path.parent().expect("parent"), key)?;
                super::crash_point();
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("delete", key, e)),
        }
    }
}
