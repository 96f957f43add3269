//! The fence between GC and running writers, without a global lock.
//!
//! A backup registers `writers/<id>` (start time, refreshed periodically)
//! before it reads the index or writes anything; restores and verifies
//! register too, so GC does not delete a pack they may still read. GC removes nothing newer
//! than the oldest live writer's start (nor than its own start minus a
//! grace period), and deletes a pack a writer might dedup against only
//! after condemning it in `pending/` and seeing no writer that started
//! before the condemnation still running. A marker not refreshed within
//! `writer_stale_after`, or whose process is gone from this host, is stale.
//!
//! The writer side holds up its end: [`WriterGuard::check`] fails once the
//! marker has gone unrefreshed for 3/4 of `writer_stale_after` (before GC
//! can call it stale) or was removed, and a backup checks it as it reads and
//! before it writes its manifest, so a backup GC may have stopped protecting
//! never records a manifest.

use crate::format::{
    decode_json, encode_json, now_ms, random_hex, PackId, PendingDeletes, WriterMarker,
    PENDING_MAGIC, WRITER_MAGIC,
};
use crate::storage::{Storage, StorageError};
use crate::{EngineError, RepoInner};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// A registered writer; dropping it removes the marker.
pub(crate) struct WriterGuard {
    storage: Arc<dyn Storage>,
    key: String,
    pub(crate) started_at_ms: u64,
    stop: Arc<(Mutex<bool>, Condvar)>,
    refresher: Option<JoinHandle<()>>,
    health: Arc<MarkerHealth>,
    /// Past this age (3/4 of `writer_stale_after`) the marker is lost.
    lost_after_ms: u64,
}

/// What the refresher learned, for the job to check.
struct MarkerHealth {
    /// The `refreshed_at_ms` of the last marker written.
    refreshed_ms: AtomicU64,
    /// Why the marker is lost for good (set once, the first reason wins;
    /// never cleared, since a later refresh does not undo what GC did
    /// meanwhile).
    lost: OnceLock<String>,
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl WriterGuard {
    pub(crate) fn register(inner: &RepoInner, job: &str) -> Result<Self, EngineError> {
        let key = format!("writers/{}", random_hex(16));
        Self::register_at(inner, job, key)?
            .ok_or_else(|| EngineError::Internal("a random writer id collided".into()))
    }

    /// Takes the store's GC lock: one GC at a time (two could each delete
    /// what the other's index consolidation still names). A lock left by a
    /// dead GC is stale the same way writer markers are.
    pub(crate) fn lock_gc(inner: &RepoInner) -> Result<Self, EngineError> {
        for _ in 0..2 {
            if let Some(g) = Self::register_at(inner, "gc", GC_LOCK.to_owned())? {
                return Ok(g);
            }
            let live = match inner.storage.get(GC_LOCK) {
                Ok(obj) => decode_json::<WriterMarker>(WRITER_MAGIC, GC_LOCK, &obj)
                    .map(|m| is_live(inner, &m))
                    .unwrap_or(false),
                Err(StorageError::NotFound(_)) => continue,
                // A lock no one with the key wrote holds nothing.
                Err(StorageError::Tampered { .. }) => false,
                Err(e) => return Err(e.into()),
            };
            if live {
                return Err(EngineError::InvalidRequest(
                    "another garbage collection is running on this store; try again when it has finished".into(),
                ));
            }
            inner.storage.delete(GC_LOCK)?;
        }
        Err(EngineError::InvalidRequest(
            "the store's GC lock keeps changing hands; try again".into(),
        ))
    }

    /// Registers a marker under `key` unless the key exists (then None).
    fn register_at(inner: &RepoInner, job: &str, key: String) -> Result<Option<Self>, EngineError> {
        let started_at_ms = now_ms();
        let marker = WriterMarker {
            backup_id: job.to_owned(),
            host: hostname(),
            pid: std::process::id(),
            started_at_ms,
            refreshed_at_ms: started_at_ms,
        };
        if !inner
            .storage
            .put_if_absent(&key, &encode_json(WRITER_MAGIC, &marker))?
        {
            return Ok(None);
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let every = inner.options.writer_stale_after / 4;
        let health = Arc::new(MarkerHealth {
            refreshed_ms: AtomicU64::new(started_at_ms),
            lost: OnceLock::new(),
        });
        let refresher = {
            let (storage, key, stop) = (inner.storage.clone(), key.clone(), stop.clone());
            let health = health.clone();
            std::thread::Builder::new()
                .name("writer-marker".into())
                .spawn(move || {
                    let (lock, cv) = &*stop;
                    let mut stopped = lock.lock().expect("marker lock");
                    loop {
                        // Checked before each wait: a stop signalled before this
                        // thread first took the lock must not be missed.
                        if *stopped {
                            return;
                        }
                        let (s, timeout) = cv.wait_timeout(stopped, every).expect("marker lock");
                        stopped = s;
                        if *stopped {
                            return;
                        }
                        if timeout.timed_out() {
                            // Gone: GC found it stale and removed it, and may
                            // since have deleted packs this job relies on.
                            // Writing it back would hide that.
                            // (A failed look is a failed refresh: retried below.)
                            if let Ok(None) = storage.head(&key) {
                                let _ = health.lost.set("its marker was removed as stale".into());
                                return;
                            }
                            let m = WriterMarker {
                                refreshed_at_ms: now_ms(),
                                ..marker.clone()
                            };
                            // A failed refresh is retried at the next tick;
                            // `check` fails the job if they keep failing.
                            if storage.put(&key, &encode_json(WRITER_MAGIC, &m)).is_ok() {
                                health
                                    .refreshed_ms
                                    .store(m.refreshed_at_ms, Ordering::SeqCst);
                            }
                        }
                    }
                })
                .map_err(|e| EngineError::Internal(e.to_string()))?
        };
        Ok(Some(WriterGuard {
            storage: inner.storage.clone(),
            key,
            started_at_ms,
            stop,
            refresher: Some(refresher),
            health,
            lost_after_ms: (inner.options.writer_stale_after.as_millis() as u64) * 3 / 4,
        }))
    }

    /// Fails once GC may no longer count this writer as live: the marker was
    /// removed, or has not been refreshed for 3/4 of `writer_stale_after`.
    /// Cheap (two atomic loads and a clock read): call it often.
    pub(crate) fn check(&self) -> Result<(), EngineError> {
        let why = match self.health.lost.get() {
            Some(why) => why,
            None => {
                let age = now_ms().saturating_sub(self.health.refreshed_ms.load(Ordering::SeqCst));
                if age <= self.lost_after_ms {
                    return Ok(());
                }
                self.health.lost.get_or_init(|| {
                    format!("its marker could not be refreshed for {} s", age / 1000)
                })
            }
        };
        Err(EngineError::WriterLost(why.clone()))
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.stop;
            *lock.lock().expect("marker lock") = true;
            cv.notify_all();
        }
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        let _ = self.storage.delete(&self.key);
    }
}

const GC_LOCK: &str = "locks/gc";

/// Keeps a second GC out where the lock object cannot: on a store whose
/// put-if-absent is not atomic (an S3 server ignoring `If-None-Match`), by
/// [`crate::GcExclusion`]. The returned file holds the host lock until dropped.
pub(crate) fn claim_gc_turn(inner: &RepoInner) -> Result<Option<std::fs::File>, EngineError> {
    if inner.storage.put_if_absent_is_atomic() {
        return Ok(None);
    }
    match &inner.options.gc_exclusion {
        crate::GcExclusion::StoreLock => Err(EngineError::InvalidRequest(
            "this store's server ignores conditional writes (If-None-Match), so its GC lock cannot keep a second garbage collection out; run GC through `vpsbackup gc` or serve, or, when nothing else collects this store, `vpsbackup store gc --exclusive`".into(),
        )),
        crate::GcExclusion::Operator => Ok(None),
        crate::GcExclusion::HostLock(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .map_err(|e| {
                    EngineError::Internal(format!("open the GC lock file {}: {e}", path.display()))
                })?;
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => Ok(Some(file)),
                Err(rustix::io::Errno::WOULDBLOCK) => Err(EngineError::InvalidRequest(
                    "another garbage collection is running on this store; try again when it has finished".into(),
                )),
                Err(e) => Err(EngineError::Internal(format!(
                    "lock the GC lock file {}: {e}",
                    path.display()
                ))),
            }
        }
    }
}

/// Whether a marker's process still runs: not gone from this host, and
/// refreshed within `writer_stale_after`.
fn is_live(inner: &RepoInner, m: &WriterMarker) -> bool {
    let stale_ms = inner.options.writer_stale_after.as_millis() as u64;
    let dead_here =
        m.host == hostname() && !std::path::Path::new(&format!("/proc/{}", m.pid)).exists();
    !dead_here && m.refreshed_at_ms + stale_ms >= now_ms()
}

/// The start times (ms) of writers still alive; stale markers are removed.
pub(crate) fn live_writers(inner: &RepoInner) -> Result<Vec<u64>, EngineError> {
    let now = now_ms();
    let stale_ms = inner.options.writer_stale_after.as_millis() as u64;
    let mut starts = Vec::new();
    for meta in inner.storage.list("writers/")? {
        let marker = match inner.storage.get(&meta.key) {
            Ok(o) => decode_json::<WriterMarker>(WRITER_MAGIC, &meta.key, &o),
            Err(StorageError::NotFound(_)) => continue,
            // Judged like a damaged marker, below.
            Err(e @ StorageError::Tampered { .. }) => Err(e.into()),
            Err(e) => return Err(e.into()),
        };
        let stale = match marker {
            Ok(m) => {
                if is_live(inner, &m) {
                    starts.push(m.started_at_ms);
                    false
                } else {
                    true
                }
            }
            // A torn marker cannot happen with atomic puts; treat a damaged one
            // by its age alone.
            Err(_) => {
                let age = std::time::SystemTime::now()
                    .duration_since(meta.modified)
                    .unwrap_or(Duration::ZERO);
                if age.as_millis() as u64 > stale_ms {
                    true
                } else {
                    starts.push(now.saturating_sub(age.as_millis() as u64));
                    false
                }
            }
        };
        if stale {
            inner.storage.delete(&meta.key)?;
        }
    }
    Ok(starts)
}

/// Every condemned pack with the time it was condemned (the earliest if
/// listed twice), and the pending objects read.
pub(crate) fn load_pending(
    storage: &dyn Storage,
) -> Result<(HashMap<PackId, u64>, Vec<String>), EngineError> {
    let mut packs: HashMap<PackId, u64> = HashMap::new();
    let mut keys = Vec::new();
    for meta in storage.list("pending/")? {
        let obj = match storage.get(&meta.key) {
            Ok(o) => o,
            Err(StorageError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let p: PendingDeletes = decode_json(PENDING_MAGIC, &meta.key, &obj)?;
        for (hex_id, since) in p.packs {
            let mut id = [0u8; 16];
            if hex::decode_to_slice(&hex_id, &mut id).is_ok() {
                let e = packs.entry(PackId(id)).or_insert(since);
                *e = (*e).min(since);
            }
        }
        keys.push(meta.key);
    }
    Ok((packs, keys))
}

pub(crate) fn write_pending(
    storage: &dyn Storage,
    packs: &HashMap<PackId, u64>,
) -> Result<String, EngineError> {
    let mut list: Vec<(String, u64)> = packs.iter().map(|(p, s)| (hex::encode(p.0), *s)).collect();
    list.sort();
    let key = format!("pending/{}-{}", now_ms(), random_hex(8));
    storage.put_if_absent(
        &key,
        &encode_json(PENDING_MAGIC, &PendingDeletes { packs: list }),
    )?;
    Ok(key)
}
