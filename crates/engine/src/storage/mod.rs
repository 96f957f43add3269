//! Where the store's objects live: a flat key space of immutable objects
//! that an object store (S3 and the like) can serve as well as a local
//! directory. Operations are only put-if-absent, a plain put for small
//! mutable markers, get, ranged get, list by prefix and delete: no rename,
//! no append, no access times.
//!
//! Keys are `/`-separated relative paths of `[A-Za-z0-9._-]` components.

mod local;
mod s3;
pub mod suite;

pub use local::LocalStorage;
pub use s3::{S3Config, S3Storage, DEFAULT_ATTEMPTS as DEFAULT_S3_ATTEMPTS};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

/// Where a store lives: a local directory or an S3 bucket and prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Local(PathBuf),
    S3(S3Config),
}

impl StoreLocation {
    /// `s3://BUCKET/PREFIX` (with the endpoint and region given, keys from
    /// the environment), else a directory path.
    pub fn parse(
        spec: &str,
        s3_endpoint: Option<&str>,
        s3_region: Option<&str>,
    ) -> Result<StoreLocation, StorageError> {
        if spec.starts_with("s3://") {
            return Ok(StoreLocation::S3(S3Config::from_url(
                spec,
                s3_endpoint,
                s3_region,
            )?));
        }
        if let Some((scheme, _)) = spec.split_once("://") {
            return Err(StorageError::Config(format!(
                "store addresses with {scheme}:// are not supported: give a directory or s3://BUCKET/PREFIX"
            )));
        }
        Ok(StoreLocation::Local(PathBuf::from(spec)))
    }

    /// Opens the backend (an S3 store is contacted and probed here).
    pub fn open(&self) -> Result<Arc<dyn Storage>, StorageError> {
        Ok(match self {
            StoreLocation::Local(dir) => Arc::new(LocalStorage::new(dir)?),
            StoreLocation::S3(cfg) => Arc::new(S3Storage::open(cfg.clone())?),
        })
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Local(dir) => write!(f, "{}", dir.display()),
            StoreLocation::S3(cfg) => write!(f, "{}", cfg.url()),
        }
    }
}

/// One stored object as a listing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// When the object was last written (object stores: Last-Modified).
    pub modified: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {0} does not exist")]
    NotFound(String),
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    /// The store's address or settings cannot be used (a bad `s3://` URL,
    /// missing credentials); a sentence for the operator.
    #[error("{0}")]
    Config(String),
    #[error("range {offset}+{len} is past the end of object {key} ({size} bytes)")]
    OutOfRange {
        key: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// The backend's filesystem (or quota) is full: ENOSPC or EDQUOT.
    #[error("no space left on the backup store ({op} {key})")]
    NoSpace { op: &'static str, key: String },
    /// An encrypted store's object that fails authentication (only the
    /// engine's sealing layer returns this, never a backend).
    #[error("object {key} was tampered with: {detail}")]
    Tampered { key: String, detail: String },
    #[error("{op} {key}: {source}")]
    Io {
        op: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
}

/// A backend that holds the store's objects. Every write is atomic: a reader
/// sees the whole object or nothing.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Writes `data` under `key` unless the key exists; returns whether it wrote.
    /// Durable when it returns.
    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool, StorageError>;
    /// Writes or replaces `key` atomically. Used only for small markers
    /// (running writers, GC state), never for packs or manifests.
    fn put(&self, key: &str, data: &[u8]) -> Result<(), StorageError>;
    fn get(&self, key: &str) -> Result<Vec<u8>, StorageError>;
    /// Reads `len` bytes at `offset`; fails if the range passes the end.
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, StorageError>;
    /// [`Storage::get_range`] into a caller's buffer (replaced contents), so
    /// hot loops reuse one allocation. The default just calls `get_range`.
    fn get_range_into(
        &self,
        key: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), StorageError> {
        *buf = self.get_range(key, offset, len)?;
        Ok(())
    }
    /// Metadata of `key`, or None when it does not exist.
    fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError>;
    /// Every object whose key starts with `prefix`, in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError>;
    /// Removes `key`; removing a missing key is not an error.
    fn delete(&self, key: &str) -> Result<(), StorageError>;
    /// Removes leftovers of interrupted writes older than `age` (backends
    /// whose writes are atomic by nature have none). Returns how many.
    fn remove_stale_temp(&self, age: std::time::Duration) -> Result<u64, StorageError> {
        let _ = age;
        Ok(0)
    }
    /// Whether [`Storage::put_if_absent`] is atomic against concurrent
    /// writers of the same key (exactly one wins). An S3 server that
    /// ignores `If-None-Match` makes it a look-then-write: fine for keys
    /// only one writer uses, not for a lock (see `Repository::gc_exclusive`).
    fn put_if_absent_is_atomic(&self) -> bool {
        true
    }
    /// Where the store is, for `status` and messages (no credentials).
    fn describe(&self) -> String {
        format!("{self:?}")
    }
    /// Requests worth having in flight at once: a backend whose requests
    /// wait on a network (S3) hides that latency with concurrency; a local
    /// disk gains nothing from more than one writer.
    fn io_concurrency(&self) -> usize {
        1
    }
    /// Requests sent so far, for backends that pay per request (None: not counted).
    fn request_counts(&self) -> Option<RequestCounts> {
        None
    }
}

/// Requests an object-store backend has sent (every retry counts).
/// HEADs count as GETs, as cloud price lists do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub put: u64,
    pub get: u64,
    pub list: u64,
    pub delete: u64,
}

impl RequestCounts {
    /// What was sent between `earlier` and `self`.
    pub fn since(&self, earlier: &RequestCounts) -> RequestCounts {
        RequestCounts {
            put: self.put.saturating_sub(earlier.put),
            get: self.get.saturating_sub(earlier.get),
            list: self.list.saturating_sub(earlier.list),
            delete: self.delete.saturating_sub(earlier.delete),
        }
    }
}

impl std::fmt::Display for RequestCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} PUT, {} GET, {} LIST, {} DELETE requests",
            self.put, self.get, self.list, self.delete
        )
    }
}

/// Test hook for crash tests: with `VPSBACKUP_CRASH_AFTER_OPS=N` in the
/// environment, the process SIGKILLs itself right after its Nth completed
/// mutating storage operation (put, put-if-absent, delete), so a test can
/// stop a real `vpsbackup` process at every point of GC's write sequence.
/// Unset (production), this costs one relaxed atomic load per write.
pub(crate) fn crash_point() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    static DONE: AtomicU64 = AtomicU64::new(0);
    let limit = LIMIT.get_or_init(|| {
        std::env::var("VPSBACKUP_CRASH_AFTER_OPS")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(n) = *limit {
        if DONE.fetch_add(1, Ordering::SeqCst) + 1 >= n {
            // SAFETY: kill(2) on our own pid with a constant signal touches no memory.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}

pub(crate) fn validate_key(key: &str) -> Result<(), StorageError> {
    let ok = !key.is_empty()
        && key.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && !c.starts_with(".tmp-")
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidKey(key.to_owned()))
    }
}
