//! The backup engine: server disks into a deduplicated, compressed,
//! verifiable chunk store (issue 2). It knows nothing of HTTP or SQL.
//!
//! A store is a set of immutable objects behind the [`Storage`] trait:
//! `config`, packs of zstd-compressed 64 KiB chunks named by BLAKE3
//! (`packs/`), index objects saying where each chunk sits (`index/`),
//! one manifest per backup (`backups/<id>`), markers of running writers
//! (`writers/`), GC's pending deletions (`pending/`) and its lock
//! (`locks/gc`), and the quarantine of chunk copies found corrupt or
//! missing (`quarantine/`). See [`format`] for
//! the bytes and ARCHITECTURE.md for the flow.
//!
//! Ordering invariants that make a crash at any instant harmless:
//! packs are durable before the index object naming them, which is durable
//! before any manifest referencing their chunks; GC deletes only packs no
//! manifest needs, older than its fence, and (for packs a writer might
//! dedup against) only once every writer that could have seen them is gone.
//!
//! Error policy: every public call returns [`EngineError`], whose Display
//! text is a sentence a customer can act on. Internal threads never panic
//! on bad data: a corrupt object becomes [`EngineError::Corrupt`] or
//! [`EngineError::BadObject`] naming it.

mod backup;
mod chunks;
mod crypt;
mod error;
mod fence;
pub mod format;
mod gc;
mod incremental;
pub mod index;
mod index_cache;
mod inflight;
mod job;
mod keys;
mod quarantine;
mod rebuild;
mod restore;
mod spill;
pub mod storage;
mod verify;

pub use error::EngineError;
pub use incremental::ChangedSince;
pub use index_cache::SyncReport;
pub use job::JobControl;
pub use keys::{generate_key_file, KeyInfo, StoreKey};
pub use rebuild::RebuildReport;
pub use restore::RestoreOptions;
pub use storage::{
    LocalStorage, ObjectMeta, RequestCounts, S3Config, S3Storage, Storage, StorageError,
    StoreLocation,
};
pub use verify::{VerifySession, DEFAULT_VERIFY_MEMORY_CHUNKS};
pub use vpsbackup_disk::libvirt::{self, LibvirtOptions, LibvirtPointInTime};
pub use vpsbackup_disk::point_in_time::{Checkpoint, PointInTime, TakeOptions};
pub use vpsbackup_disk::qmp;
pub use vpsbackup_disk::{
    detect_format, ensure_not_in_use, format_by_name, open_reader, DiskError, DiskFormat,
    DiskReader, Extent,
};

use format::{Manifest, StoreConfig, CONFIG_MAGIC};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Default chunk size: chosen by measurement (see the crate README/report):
/// 64 KiB keeps a 1% scattered change to ~26 MB of new data.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Chunk ids per list chunk: 2048 ids (64 KiB) cover 128 MiB of disk.
pub const DEFAULT_LIST_FANOUT: u32 = 2048;

/// Tunables; defaults suit production.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Packs are closed once they reach this many bytes.
    pub pack_target: usize,
    /// GC never removes objects younger than this (clock skew, slow writers).
    pub gc_grace: Duration,
    /// A writer marker not refreshed for this long belongs to a dead writer.
    pub writer_stale_after: Duration,
    /// zstd level for new chunks.
    pub zstd_level: i32,
    /// Threads hashing and compressing during a backup (and decompressing
    /// during a restore).
    pub workers: usize,
    /// GC rewrites a pack whose live bytes are below this fraction.
    pub repack_below: f64,
    /// How GC keeps a second GC out on a store whose server ignores
    /// conditional writes (where the store's own lock object cannot).
    pub gc_exclusion: GcExclusion,
    /// This node's on-disk chunk index cache (one subdirectory per store,
    /// see [`index_cache`]): backups and restores look chunks up there
    /// instead of loading the whole index into memory. `None`: load it
    /// whole (memory grows with the store's unique data).
    pub index_cache: Option<PathBuf>,
    /// GC's and verify's sorts keep at most this many bytes of records in
    /// memory; more go to sorted runs in temporary files (see [`spill`])
    /// next to the index cache, or in the system's temporary directory.
    pub spill_run_bytes: usize,
}

/// What keeps two GCs of one store apart when `locks/gc` cannot: on an
/// S3 server that ignores `If-None-Match` (Garage) two GCs would both
/// "win" the lock object. Stores with atomic put-if-absent (local
/// directories, Ceph radosgw) use the lock object whatever this says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GcExclusion {
    /// Only the store's lock object: GC refuses to run where it is not atomic.
    #[default]
    StoreLock,
    /// An exclusive `flock` on this local file, which every GC of the store
    /// takes (serve and the admin commands of one data dir share it).
    HostLock(PathBuf),
    /// The operator vouches that no other GC runs (`store gc --exclusive`).
    Operator,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            pack_target: 16 << 20,
            gc_grace: Duration::from_secs(15 * 60),
            writer_stale_after: Duration::from_secs(10 * 60),
            zstd_level: 1,
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .clamp(1, 8),
            repack_below: 0.5,
            gc_exclusion: GcExclusion::StoreLock,
            index_cache: None,
            spill_run_bytes: DEFAULT_SPILL_RUN_BYTES,
        }
    }
}

/// 64 MiB: 2 Mi chunk ids, or 1 Mi chunk locations, per sorted run.
pub const DEFAULT_SPILL_RUN_BYTES: usize = 64 << 20;

/// Handle on one store. Cheap to clone, Send + Sync.
#[derive(Clone, Debug)]
pub struct Repository {
    inner: Arc<RepoInner>,
}

#[derive(Debug)]
pub(crate) struct RepoInner {
    /// The store's objects; in an encrypted store a sealing view
    /// ([`crypt::SealedStorage`]) of the backend.
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) config: StoreConfig,
    pub(crate) options: EngineOptions,
    /// Chunk ids and chunk/trailer sealing: plain in an unencrypted store.
    pub(crate) crypt: crypt::Crypt,
    /// The data key of an encrypted store (to wrap it for new keys).
    data_key: Option<Arc<keys::DataKey>>,
    /// New chunks this handle's running backups are storing (shared by
    /// every handle made from it with [`Repository::with_options`]).
    pub(crate) inflight: Arc<inflight::Registry>,
}

/// What to back up.
#[derive(Debug, Clone)]
pub struct BackupRequest {
    /// Caller-chosen, unique in the store, `[A-Za-z0-9._-]{1,128}`.
    pub backup_id: String,
    pub server_id: String,
    pub server_name: String,
    pub disks: Vec<DiskImage>,
    /// Read bandwidth limit for this job, bytes per second (None = unlimited).
    pub read_limit: Option<u64>,
}

/// A disk image to back up or restore onto: its path and, when known, its
/// format.
///
/// A raw disk's first bytes belong to the guest, which can write a qcow2
/// header there; probing such a disk would hand it to QEMU as qcow2 and let
/// the guest name a backing file on the host. Callers that know the format
/// (the service records it when the provider adds the server) pin it;
/// `format: None` detects it from the image and is only for images the
/// caller trusts (`vpsbackup store`, benchmarks, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskImage {
    pub path: PathBuf,
    pub format: Option<DiskFormat>,
}

impl DiskImage {
    /// An image opened as `format`, never probed.
    pub fn pinned(path: impl Into<PathBuf>, format: DiskFormat) -> DiskImage {
        DiskImage {
            path: path.into(),
            format: Some(format),
        }
    }

    /// An image whose format is detected when it is opened: trusted images only.
    pub fn detect(path: impl Into<PathBuf>) -> DiskImage {
        DiskImage {
            path: path.into(),
            format: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    pub backup_id: String,
    /// Sum of disk sizes.
    pub logical_bytes: u64,
    /// Bytes of non-zero data captured.
    pub data_bytes: u64,
    /// How much the store grew (compressed bytes of chunks that were new).
    pub stored_bytes: u64,
    pub chunks_total: u64,
    pub chunks_new: u64,
    /// Bytes read from the disks: all their data in a full backup, only
    /// the changed extents' chunks in an incremental one.
    pub bytes_read: u64,
    /// True when every disk was read incrementally (only what changed
    /// since the base the caller gave).
    pub incremental: bool,
    /// Why disks of an incremental backup were read in full (empty when
    /// none was, or when no base was given: the caller knows why).
    pub full_reasons: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RestoreSummary {
    pub bytes_written: u64,
    pub chunks_written: u64,
    pub chunks_skipped: u64,
    /// Ranges written as zeros because their chunks could not be read,
    /// merged, in disk order (only with [`RestoreOptions::allow_damaged`];
    /// otherwise the first bad chunk fails the restore).
    pub damaged: Vec<DamagedRange>,
}

/// Bytes of a restored disk that could not be read from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DamagedRange {
    /// Index of the disk in the backup.
    pub disk: usize,
    pub offset: u64,
    pub len: u64,
    /// Chunks the range covers.
    pub chunks: u64,
}

impl std::fmt::Display for DamagedRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "disk {}: bytes {}-{} ({} chunk{}) unreadable, written as zeros",
            self.disk,
            self.offset,
            self.offset + self.len - 1,
            self.chunks,
            if self.chunks == 1 { "" } else { "s" }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    pub backups: Vec<BackupVerification>,
    pub chunks_checked: u64,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.backups.iter().all(|b| b.is_ok())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackupVerification {
    pub backup_id: String,
    /// Hex ids of chunks no pack holds.
    pub missing_chunks: Vec<String>,
    /// Hex ids of chunks whose stored bytes do not decode to their hash.
    pub corrupt_chunks: Vec<String>,
    /// Those of `corrupt_chunks` whose bytes failed authentication in an
    /// encrypted store: modified, swapped or truncated (tampering).
    pub tampered_chunks: Vec<String>,
    /// Set when the manifest itself cannot be read.
    pub manifest_error: Option<String>,
    /// Distinct chunks (lists included) whose bytes this verification read
    /// and hashed.
    pub chunks_read: u64,
    /// Chunk references answered from verdicts already known in the
    /// session (earlier backups, or earlier in this one) without reading.
    /// A chunk list remembered whole, with all it names, counts once.
    pub chunks_remembered: u64,
    /// Stored (compressed) bytes read from packs for this verification.
    pub bytes_read: u64,
}

impl BackupVerification {
    pub fn is_ok(&self) -> bool {
        self.missing_chunks.is_empty()
            && self.corrupt_chunks.is_empty()
            && self.manifest_error.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GcReport {
    pub bytes_freed: u64,
    pub packs_deleted: u64,
    pub packs_rewritten: u64,
    pub chunks_removed: u64,
    /// Packs condemned but kept because a writer that may use them still runs.
    pub packs_pending: u64,
    /// Sorted runs GC wrote to temporary files because its sets (live
    /// chunk ids, canonical copies, the index to consolidate) passed
    /// [`EngineOptions::spill_run_bytes`]; 0 when they fitted in memory.
    pub sort_runs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    pub backup_id: String,
    pub server_id: String,
    pub server_name: String,
    pub created_at: SystemTime,
    pub disks: Vec<DiskInfo>,
    pub data_bytes: u64,
    /// The labels given to [`Repository::backup_labelled`] (empty for
    /// backups written before labels existed).
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub index: usize,
    pub source_path: String,
    pub size: u64,
    pub format: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Bytes in packs.
    pub stored_bytes: u64,
    /// Sum of non-zero disk data over all backups.
    pub logical_data_bytes: u64,
    pub backups: u64,
    pub packs: u64,
    /// Every object in the store (packs, index, manifests, markers, config).
    pub objects: u64,
}

/// Damage the store knows of without reading chunk data: for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreHealth {
    /// Chunk copies quarantined (found corrupt or missing); the next backup
    /// of the same data stores good copies.
    pub quarantined_copies: u64,
    /// Index objects that cannot be decoded, each with the reason: GC
    /// refuses to run until `rebuild-index` replaces them.
    pub damaged_index_objects: Vec<String>,
    /// Backups whose manifest cannot be read, each with the reason.
    pub damaged_manifests: Vec<String>,
}

impl StoreHealth {
    pub fn is_ok(&self) -> bool {
        self.quarantined_copies == 0
            && self.damaged_index_objects.is_empty()
            && self.damaged_manifests.is_empty()
    }
}

impl Repository {
    /// Opens the store in `dir` (the local filesystem backend), creating it if empty.
    pub fn open_local(dir: &Path) -> Result<Repository, EngineError> {
        Self::open(Arc::new(LocalStorage::new(dir)?))
    }

    /// Opens the store at `location` (a directory or an S3 bucket and
    /// prefix), creating it if empty.
    pub fn open_location(location: &StoreLocation) -> Result<Repository, EngineError> {
        Self::open_location_keyed(location, &StoreKey::None)
    }

    /// [`Repository::open_location`] unlocking an encrypted store with `key`
    /// (see [`Repository::open_keyed`]).
    pub fn open_location_keyed(
        location: &StoreLocation,
        key: &StoreKey,
    ) -> Result<Repository, EngineError> {
        Self::open_keyed(
            location.open()?,
            EngineOptions::default(),
            DEFAULT_CHUNK_SIZE,
            key,
        )
    }

    /// Opens a store on any backend, creating its config if there is none.
    pub fn open(storage: Arc<dyn Storage>) -> Result<Repository, EngineError> {
        Self::open_with(storage, EngineOptions::default(), DEFAULT_CHUNK_SIZE)
    }

    /// Opens (or creates, with `chunk_size`) a store with explicit options.
    pub fn open_with(
        storage: Arc<dyn Storage>,
        options: EngineOptions,
        chunk_size: u32,
    ) -> Result<Repository, EngineError> {
        Self::open_keyed(storage, options, chunk_size, &StoreKey::None)
    }

    /// Opens the store in `dir` with `key` (see [`Repository::open_keyed`]).
    pub fn open_local_keyed(dir: &Path, key: &StoreKey) -> Result<Repository, EngineError> {
        Self::open_keyed(
            Arc::new(LocalStorage::new(dir)?),
            EngineOptions::default(),
            DEFAULT_CHUNK_SIZE,
            key,
        )
    }

    /// Opens a store, unlocking it with `key` if it is encrypted; an empty
    /// backend becomes a new store, encrypted when a key is given. An
    /// encrypted store without a key, or with a key that is not one of its
    /// own, is [`EngineError::Key`]; a key given for an unencrypted store is
    /// not needed and ignored.
    pub fn open_keyed(
        storage: Arc<dyn Storage>,
        options: EngineOptions,
        chunk_size: u32,
        key: &StoreKey,
    ) -> Result<Repository, EngineError> {
        check_chunk_size(chunk_size)?;
        let config = match read_config(&*storage)? {
            Some(c) => c,
            None => {
                create_config(&*storage, chunk_size, key)?;
                // Another process may have won the race: use whatever is stored.
                read_config(&*storage)?
                    .ok_or_else(|| EngineError::bad_object("config", "vanished"))?
            }
        };
        Self::unlock(storage, config, options, key)
    }

    /// Creates a new store on an empty backend: encrypted with `key` as its
    /// first key wrapper, or unencrypted with [`StoreKey::None`]. Fails if
    /// the backend already holds a store.
    pub fn init(
        storage: Arc<dyn Storage>,
        options: EngineOptions,
        chunk_size: u32,
        key: &StoreKey,
    ) -> Result<Repository, EngineError> {
        check_chunk_size(chunk_size)?;
        if storage.head("config")?.is_some() || !storage.list("")?.is_empty() {
            return Err(EngineError::InvalidRequest(
                "the store is not empty; a new store needs an empty directory".into(),
            ));
        }
        if !create_config(&*storage, chunk_size, key)? {
            return Err(EngineError::InvalidRequest(
                "another process created a store here at the same time".into(),
            ));
        }
        let config =
            read_config(&*storage)?.ok_or_else(|| EngineError::bad_object("config", "vanished"))?;
        Self::unlock(storage, config, options, key)
    }

    fn unlock(
        storage: Arc<dyn Storage>,
        config: StoreConfig,
        options: EngineOptions,
        key: &StoreKey,
    ) -> Result<Repository, EngineError> {
        if !config.chunk_size.is_power_of_two() || config.list_fanout == 0 {
            return Err(EngineError::bad_object(
                "config",
                "chunk size or fanout invalid",
            ));
        }
        let (storage, crypt, data_key): (Arc<dyn Storage>, _, _) = match &config.encryption {
            None => {
                // Key wrappers beside an unencrypted config: someone replaced
                // the config to make this build write plaintext.
                if keys::any(&*storage)? {
                    return Err(EngineError::Tampered {
                        object: "config".into(),
                        detail: "it says the store is unencrypted, but the store has keys".into(),
                    });
                }
                (storage, crypt::Crypt::plain(), None)
            }
            Some(enc) => {
                let unsupported = || {
                    EngineError::bad_object(
                        "config",
                        format!(
                            "encryption {} with {} chunk ids is not supported by this build",
                            enc.cipher, enc.chunk_ids
                        ),
                    )
                };
                if enc.chunk_ids != "blake3-keyed" {
                    return Err(unsupported());
                }
                let data_key = keys::unlock(&*storage, &config.store_id, key)?;
                let crypt =
                    crypt::Crypt::from_data_key(&data_key, &enc.cipher).ok_or_else(unsupported)?;
                if crypt.config_mac(&config.mac_input()).as_deref() != Some(&enc.config_mac) {
                    return Err(EngineError::Tampered {
                        object: "config".into(),
                        detail: "its parameters fail authentication".into(),
                    });
                }
                let sealed = crypt::SealedStorage::new(storage, crypt.clone());
                let sealed: Arc<dyn Storage> = Arc::new(sealed);
                (sealed, crypt, Some(Arc::new(keys::DataKey(data_key))))
            }
        };
        Ok(Repository {
            inner: Arc::new(RepoInner {
                storage,
                config,
                options,
                crypt,
                data_key,
                inflight: Arc::default(),
            }),
        })
    }

    /// Whether the store is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.inner.crypt.is_sealed()
    }

    /// The key wrappers of an encrypted store (empty for an unencrypted one).
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>, EngineError> {
        keys::list(&*self.inner.storage)
    }

    /// Adds a key wrapper opened by `key` (a key file or a passphrase);
    /// the data is not rewritten.
    pub fn add_key(&self, key: &StoreKey) -> Result<KeyInfo, EngineError> {
        let Some(data_key) = &self.inner.data_key else {
            return Err(EngineError::InvalidRequest(
                "the store is not encrypted, so it has no keys to add to".into(),
            ));
        };
        keys::add(
            &*self.inner.storage,
            &self.inner.config.store_id,
            &data_key.0,
            key,
        )
    }

    /// Removes key wrapper `id`; refuses to remove the last one.
    pub fn remove_key(&self, id: &str) -> Result<(), EngineError> {
        if !self.is_encrypted() {
            return Err(EngineError::InvalidRequest(
                "the store is not encrypted, so it has no keys".into(),
            ));
        }
        keys::remove(&*self.inner.storage, id)
    }

    /// The chunk index as a backup sees it: through this node's cache when
    /// [`EngineOptions::index_cache`] is set (brought up to date first;
    /// [`index::ChunkIndex::cache_report`] says what that took), else
    /// loaded whole.
    pub fn chunk_index(&self) -> Result<index::ChunkIndex, EngineError> {
        self.inner.load_index(&Default::default())
    }

    /// Same store, other tunables.
    pub fn with_options(&self, options: EngineOptions) -> Repository {
        Repository {
            inner: Arc::new(RepoInner {
                storage: self.inner.storage.clone(),
                config: self.inner.config.clone(),
                options,
                crypt: self.inner.crypt.clone(),
                data_key: self.inner.data_key.clone(),
                inflight: self.inner.inflight.clone(),
            }),
        }
    }

    pub fn options(&self) -> &EngineOptions {
        &self.inner.options
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.inner.storage
    }

    /// Where the store is and how GC is kept exclusive on it, for `status`.
    pub fn describe(&self) -> String {
        let s = &self.inner.storage;
        let gc = if s.put_if_absent_is_atomic() {
            "GC lock: the store's lock object (atomic put-if-absent)"
        } else {
            match &self.inner.options.gc_exclusion {
                GcExclusion::StoreLock => "GC lock: none possible on this server (conditional writes ignored); GC refused unless --exclusive",
                GcExclusion::HostLock(_) => "GC lock: a lock file in the data dir (the server ignores conditional writes)",
                GcExclusion::Operator => "GC lock: the operator's word (--exclusive; the server ignores conditional writes)",
            }
        };
        format!("{}; {gc}", s.describe())
    }

    /// Backs up every disk of one server into a new backup named `req.backup_id`.
    /// On success the manifest is durable; on error or cancellation there is no manifest.
    pub fn backup(
        &self,
        req: &BackupRequest,
        job: &JobControl,
    ) -> Result<BackupSummary, EngineError> {
        self.backup_labelled(req, &BTreeMap::new(), job)
    }

    /// [`Repository::backup`] recording `labels` in the manifest header
    /// ([`BackupInfo::labels`] reads them back): what the caller knows of the
    /// backup that it must be able to recover from the store alone.
    pub fn backup_labelled(
        &self,
        req: &BackupRequest,
        labels: &BTreeMap<String, String>,
        job: &JobControl,
    ) -> Result<BackupSummary, EngineError> {
        let res = backup::run(&self.inner, req, labels, job);
        if res.is_ok() {
            job.set_finished();
        }
        res
    }

    /// Like [`Repository::backup`], reading each disk from `readers[i]`
    /// (opened by the caller: e.g. a running server's point-in-time NBD
    /// export) instead of opening `req.disks[i]`, whose path the manifest
    /// still records as the disk's source; `labels` as in
    /// [`Repository::backup_labelled`]. With `changed`, an incremental
    /// backup: chunks outside the changed extents are taken from the base
    /// backup, not read (see [`ChangedSince`]).
    pub fn backup_from(
        &self,
        req: &BackupRequest,
        readers: Vec<Box<dyn vpsbackup_disk::DiskReader>>,
        changed: Option<&ChangedSince>,
        labels: &BTreeMap<String, String>,
        job: &JobControl,
    ) -> Result<BackupSummary, EngineError> {
        let res = backup::run_readers(&self.inner, req, readers, changed, labels, job);
        if res.is_ok() {
            job.set_finished();
        }
        res
    }

    /// Writes every disk of backup `backup_id` to `targets[i]`. A target that
    /// exists with the same size is updated in place (only differing chunks
    /// written); otherwise it is created (raw, or qcow2 when the path ends in
    /// .qcow2 or the existing file is qcow2).
    pub fn restore(
        &self,
        backup_id: &str,
        targets: &[PathBuf],
        job: &JobControl,
    ) -> Result<RestoreSummary, EngineError> {
        let targets: Vec<DiskImage> = targets.iter().cloned().map(DiskImage::detect).collect();
        self.restore_as(backup_id, &targets, job)
    }

    /// Like [`Repository::restore`], but each target with a known format is
    /// opened as that format without probing what it holds now (a restore
    /// over a raw disk whose guest wrote a qcow2 header stays raw).
    pub fn restore_as(
        &self,
        backup_id: &str,
        targets: &[DiskImage],
        job: &JobControl,
    ) -> Result<RestoreSummary, EngineError> {
        self.restore_with(backup_id, targets, RestoreOptions::default(), job)
    }

    /// [`Repository::restore_as`] with options: `allow_damaged` writes
    /// zeros where chunks cannot be read (the provider's disaster
    /// recovery) and lists those ranges in the summary.
    pub fn restore_with(
        &self,
        backup_id: &str,
        targets: &[DiskImage],
        opts: RestoreOptions,
        job: &JobControl,
    ) -> Result<RestoreSummary, EngineError> {
        let res = restore::run(&self.inner, backup_id, targets, None, opts, job);
        if res.is_ok() {
            job.set_finished();
        }
        res
    }

    /// Restores only disk `disk` of the backup to `target`.
    pub fn restore_disk(
        &self,
        backup_id: &str,
        disk: usize,
        target: &Path,
        job: &JobControl,
    ) -> Result<RestoreSummary, EngineError> {
        let res = restore::run(
            &self.inner,
            backup_id,
            &[DiskImage::detect(target)],
            Some(disk),
            RestoreOptions::default(),
            job,
        );
        if res.is_ok() {
            job.set_finished();
        }
        res
    }

    /// Re-reads and re-hashes the chunks of one backup (Some) or of all
    /// backups (None, each distinct chunk read once).
    pub fn verify(
        &self,
        backup_id: Option<&str>,
        job: &JobControl,
    ) -> Result<VerifyReport, EngineError> {
        let res = verify::run(&self.inner, backup_id, job);
        if res.is_ok() {
            job.set_finished();
        }
        res
    }

    /// A session for verifying several backups one after another (with
    /// pauses between them if the caller likes) while reading each
    /// distinct chunk once: see [`VerifySession`]. Loads the chunk index and
    /// registers with GC's fence; remembers up to
    /// [`DEFAULT_VERIFY_MEMORY_CHUNKS`] chunk verdicts.
    pub fn verify_session(&self) -> Result<VerifySession, EngineError> {
        VerifySession::open(self.inner.clone(), DEFAULT_VERIFY_MEMORY_CHUNKS)
    }

    /// [`Repository::verify_session`] remembering at most `max_chunks`
    /// verdicts (0: none, every backup reads all its chunks).
    pub fn verify_session_remembering(
        &self,
        max_chunks: usize,
    ) -> Result<VerifySession, EngineError> {
        VerifySession::open(self.inner.clone(), max_chunks)
    }

    /// Removes the backup's manifest. Idempotent: a missing backup is Ok.
    pub fn delete_backup(&self, backup_id: &str) -> Result<(), EngineError> {
        validate_backup_id(backup_id)?;
        self.inner.storage.delete(&manifest_key(backup_id))?;
        Ok(())
    }

    /// Reclaims what no manifest references; safe beside running backups.
    pub fn gc(&self) -> Result<GcReport, EngineError> {
        gc::run(&self.inner)
    }

    /// Rebuilds the index from the pack trailers alone, replacing the
    /// index objects (disaster recovery when they are lost or damaged).
    pub fn rebuild_index(&self) -> Result<RebuildReport, EngineError> {
        rebuild::run(&self.inner)
    }

    /// Every readable backup, oldest first. A backup whose manifest is
    /// damaged is left out (verify reports it; [`Repository::backup_ids`]
    /// lists it).
    pub fn list_backups(&self) -> Result<Vec<BackupInfo>, EngineError> {
        let mut out = Vec::new();
        for id in self.backup_ids()? {
            match self.backup_info(&id) {
                Ok(info) => out.push(info),
                // Deleted while listing, or damaged.
                Err(
                    EngineError::BackupNotFound(_)
                    | EngineError::BadObject { .. }
                    | EngineError::Tampered { .. },
                ) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.backup_id.cmp(&b.backup_id))
        });
        Ok(out)
    }

    /// The ids of every manifest in the store, readable or not, sorted.
    pub fn backup_ids(&self) -> Result<Vec<String>, EngineError> {
        let mut ids: Vec<String> = self
            .inner
            .storage
            .list("backups/")?
            .into_iter()
            .map(|m| m.key["backups/".len()..].to_owned())
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub fn backup_info(&self, backup_id: &str) -> Result<BackupInfo, EngineError> {
        let m = self.inner.manifest(backup_id)?;
        Ok(info_of(&m))
    }

    /// What is known damaged: quarantined copies, index objects and
    /// manifests that fail their checks. Reads the index objects and
    /// manifests (not the packs).
    pub fn health(&self) -> Result<StoreHealth, EngineError> {
        let storage = &*self.inner.storage;
        let mut h = StoreHealth {
            quarantined_copies: quarantine::load(storage)?.copies.len() as u64,
            ..Default::default()
        };
        for meta in storage.list("index/")? {
            match storage.get(&meta.key) {
                Ok(obj) => {
                    if let Err(e) = format::IndexFile::decode(&meta.key, &obj) {
                        h.damaged_index_objects.push(e.to_string());
                    }
                }
                Err(e @ StorageError::Tampered { .. }) => {
                    h.damaged_index_objects
                        .push(EngineError::from(e).to_string());
                }
                Err(StorageError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        for id in self.backup_ids()? {
            match self.backup_info(&id) {
                Ok(_) | Err(EngineError::BackupNotFound(_)) => {}
                Err(e @ (EngineError::BadObject { .. } | EngineError::Tampered { .. })) => {
                    h.damaged_manifests.push(format!("backup {id}: {e}"))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(h)
    }

    /// Stored bytes (packs) and logical bytes (disk data of all backups).
    pub fn stats(&self) -> Result<StoreStats, EngineError> {
        let mut st = StoreStats::default();
        for m in self.inner.storage.list("")? {
            st.objects += 1;
            if m.key.starts_with("packs/") {
                st.packs += 1;
                st.stored_bytes += m.size;
            }
        }
        for b in self.list_backups()? {
            st.backups += 1;
            st.logical_data_bytes += b.data_bytes;
        }
        Ok(st)
    }
}

fn check_chunk_size(chunk_size: u32) -> Result<(), EngineError> {
    if !chunk_size.is_power_of_two() || !(4096..=(16 << 20)).contains(&chunk_size) {
        return Err(EngineError::InvalidRequest(format!(
            "chunk size {chunk_size} must be a power of two between 4 KiB and 16 MiB"
        )));
    }
    Ok(())
}

/// The store's config; None for an empty backend. An unencrypted store's
/// config is format version 1, an encrypted one's version 2.
fn read_config(storage: &dyn Storage) -> Result<Option<StoreConfig>, EngineError> {
    let obj = match storage.get("config") {
        Ok(obj) => obj,
        Err(StorageError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let (version, p) = format::open_seal_versioned(
        CONFIG_MAGIC,
        "config",
        &obj,
        &[format::FORMAT_VERSION, crypt::SEALED_VERSION],
    )?;
    let config: StoreConfig =
        serde_json::from_slice(p).map_err(|e| EngineError::bad_object("config", e.to_string()))?;
    if (version == crypt::SEALED_VERSION) != config.encryption.is_some() {
        return Err(EngineError::Tampered {
            object: "config".into(),
            detail: "its format version does not match its encryption".into(),
        });
    }
    Ok(Some(config))
}

/// Writes a new store's config (and, for an encrypted store, first its
/// data key's first wrapper); false if a config was there already.
fn create_config(
    storage: &dyn Storage,
    chunk_size: u32,
    key: &StoreKey,
) -> Result<bool, EngineError> {
    let mut config = StoreConfig {
        store_id: format::random_hex(16),
        chunk_size,
        list_fanout: DEFAULT_LIST_FANOUT,
        created_at_ms: format::now_ms(),
        encryption: None,
    };
    if key.is_none() {
        return Ok(storage.put_if_absent("config", &format::encode_json(CONFIG_MAGIC, &config))?);
    }
    let data_key = zeroize::Zeroizing::new(format::random_bytes::<32>());
    config.encryption = Some(format::EncryptionConfig {
        cipher: crypt::DEFAULT_CIPHER.into(),
        chunk_ids: "blake3-keyed".into(),
        config_mac: String::new(),
    });
    let mac = crypt::Crypt::from_data_key(&data_key, crypt::DEFAULT_CIPHER)
        .expect("the default cipher is known")
        .config_mac(&config.mac_input())
        .expect("a keyed crypt has a config MAC");
    if let Some(e) = config.encryption.as_mut() {
        e.config_mac = mac;
    }
    // The wrapper first: a config that names encryption is only ever
    // published with a key that opens it.
    let info = keys::add(storage, &config.store_id, &data_key, key)?;
    let json = serde_json::to_vec(&config).expect("config serialises");
    let wrote = storage.put_if_absent(
        "config",
        &format::seal_versioned(CONFIG_MAGIC, crypt::SEALED_VERSION, &json),
    )?;
    if !wrote {
        // Lost a race with another creator: our wrapper opens nothing.
        storage.delete(&format!("keys/{}", info.id))?;
    }
    Ok(wrote)
}

pub(crate) fn manifest_key(backup_id: &str) -> String {
    format!("backups/{backup_id}")
}

pub(crate) fn validate_backup_id(id: &str) -> Result<(), EngineError> {
    let ok = (1..=128).contains(&id.len())
        && id != "."
        && id != ".."
        && !id.starts_with(".tmp-")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(EngineError::InvalidRequest(format!(
            "backup id {id:?} must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' or '-'"
        )))
    }
}

pub(crate) fn info_of(m: &Manifest) -> BackupInfo {
    BackupInfo {
        backup_id: m.header.backup_id.clone(),
        server_id: m.header.server_id.clone(),
        server_name: m.header.server_name.clone(),
        created_at: SystemTime::UNIX_EPOCH + Duration::from_millis(m.header.created_at_ms),
        disks: m
            .header
            .disks
            .iter()
            .enumerate()
            .map(|(index, d)| DiskInfo {
                index,
                source_path: d.source_path.clone(),
                size: d.size,
                format: d.format.clone(),
            })
            .collect(),
        data_bytes: m.header.disks.iter().map(|d| d.data_bytes).sum(),
        labels: m.header.labels.clone(),
    }
}

impl RepoInner {
    /// The chunk index for a backup or a restore: through this node's
    /// cache when one is configured, else loaded whole.
    pub(crate) fn load_index(
        &self,
        condemned: &std::collections::HashSet<format::PackId>,
    ) -> Result<index::ChunkIndex, EngineError> {
        match &self.options.index_cache {
            Some(dir) => index::ChunkIndex::load_cached(
                &*self.storage,
                condemned,
                &index_cache::IndexCache::new(dir, &self.config.store_id),
            ),
            None => index::ChunkIndex::load(&*self.storage, condemned),
        }
    }

    /// Where GC and verify read the index from, in bounded memory: this
    /// node's cache when one is configured, else a private cache in a
    /// temporary directory (removed when the source is dropped).
    pub(crate) fn bounded_index(&self) -> Result<index_cache::BoundedIndex, EngineError> {
        index_cache::BoundedIndex::new(self.options.index_cache.as_deref(), &self.config.store_id)
    }

    pub(crate) fn manifest(&self, backup_id: &str) -> Result<Manifest, EngineError> {
        validate_backup_id(backup_id)?;
        let key = manifest_key(backup_id);
        let obj = match self.storage.get(&key) {
            Ok(o) => o,
            Err(StorageError::NotFound(_)) => {
                return Err(EngineError::BackupNotFound(backup_id.to_owned()))
            }
            Err(e) => return Err(e.into()),
        };
        Manifest::decode(&key, &obj)
    }
}
