//! The engine's error type. Display texts are full sentences for the
//! operator (they may name host paths and carry QEMU's stderr); the service
//! maps each kind to a plain customer reason (`runner::engine_failure`) and
//! keeps this text as the job's detail.

use crate::storage::StorageError;
use vpsbackup_disk::DiskError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("The job was cancelled before it finished; nothing was recorded.")]
    Cancelled,
    /// The job's writer marker was not refreshed in time, or GC removed it
    /// as stale: GC may have deleted packs the job deduplicated against.
    #[error("The backup lost its registration with the store ({0}); nothing was recorded, run the backup again.")]
    WriterLost(String),
    #[error("Backup {0} does not exist in the store.")]
    BackupNotFound(String),
    #[error("Backup {0} already exists in the store; choose another backup id.")]
    BackupExists(String),
    /// A chunk whose stored bytes do not hash to its name, or cannot be decoded.
    #[error("Chunk {chunk}{} is corrupt in the store ({detail}); restore from another backup or run verify.", backup_ctx(.backup))]
    Corrupt {
        chunk: String,
        backup: Option<String>,
        detail: String,
    },
    /// A chunk a manifest references but no index or pack holds.
    #[error("Chunk {chunk}{} is missing from the store; run verify to list the damaged backups.", backup_ctx(.backup))]
    MissingChunk {
        chunk: String,
        backup: Option<String>,
    },
    /// A stored object (config, manifest, index, pack trailer) that fails its magic or checksum.
    #[error("Stored object {object} is damaged: {detail}.")]
    BadObject { object: String, detail: String },
    /// An encrypted store's object or chunk that fails authentication: it
    /// was modified, swapped for another, or truncated (or damaged in a way
    /// no one can tell from that).
    #[error("Stored object {object} was tampered with: {detail}.")]
    Tampered { object: String, detail: String },
    /// An encrypted store opened without a key, or with a key that is not
    /// one of its keys; the text says which.
    #[error("{0}")]
    Key(String),
    #[error("Disk access failed: {0}")]
    Disk(#[from] DiskError),
    /// The store's filesystem is full. What the job wrote so far is
    /// unreferenced (GC reclaims it); nothing was recorded.
    #[error("There is no space left on the backup store; nothing was recorded. Free space on the store, then try again.")]
    StoreFull,
    #[error("Store access failed: {0}")]
    Storage(StorageError),
    #[error("Invalid request: {0}")]
    InvalidRequest(String),
    #[error("An engine worker thread failed: {0}")]
    Internal(String),
}

impl From<StorageError> for EngineError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::NoSpace { .. } => EngineError::StoreFull,
            StorageError::Tampered { key, detail } => EngineError::Tampered {
                object: key,
                detail,
            },
            e => EngineError::Storage(e),
        }
    }
}

fn backup_ctx(backup: &Option<String>) -> String {
    match backup {
        Some(b) => format!(" of backup {b}"),
        None => String::new(),
    }
}

impl EngineError {
    pub(crate) fn bad_object(object: impl Into<String>, detail: impl Into<String>) -> Self {
        EngineError::BadObject {
            object: object.into(),
            detail: detail.into(),
        }
    }
}
