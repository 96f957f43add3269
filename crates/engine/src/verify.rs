//! Verify: re-read and re-hash every chunk (list chunks included) of one
//! backup or of all, and report per backup what is missing or corrupt.
//!
//! The work happens in a [`VerifySession`]: backups verified one after
//! another in one session share the verdict of every chunk already
//! checked, so a chunk shared by thirty daily backups is read once per
//! session, not thirty times. A damaged chunk is remembered as damaged, so
//! every backup that references it is reported with it. A chunk list whose
//! every chunk was good is remembered as a whole: a later backup holding
//! the same list (the same 128 MiB of disk unchanged) reads nothing for it.
//!
//! A session is registered as a writer for its whole life (see
//! [`crate::fence`]): GC deletes no pack it may still read, whatever the
//! index it loaded at the start names. Its index is the node's on-disk
//! cache (a private one in a temporary directory when none is configured,
//! see [`crate::index_cache`]), so its memory does not grow with the
//! store: the index costs ~0.13 bytes per chunk, the remembered verdicts
//! are capped, and the rest is one backup's working set (one chunk list
//! at a time, the ids found damaged). The index is reloaded only
//! when a chunk is missing from it and the store's index objects changed
//! (a backup that finished after the session began), and, while it knows
//! damaged chunks, before each backup when the index objects changed: a
//! backup since may have stored a good copy, which repairs every backup
//! referencing the chunk.
//!
//! Every copy found bad is quarantined in the store (see
//! [`crate::quarantine`]) at the end of each backup's verification, so
//! the next backup of the same bytes stores a fresh copy.

use crate::chunks::{self, ChunkFault};
use crate::fence::WriterGuard;
use crate::format::{decode_chunk_list, ChunkId, Manifest};
use crate::index::{ChunkIndex, Location};
use crate::{BackupVerification, EngineError, JobControl, RepoInner, VerifyReport};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// How many chunk verdicts a session remembers by default: 3.67 M, the
/// most a hash table of 2^22 buckets holds, which covers 224 GiB of unique
/// 64 KiB chunks. Each bucket takes 17 bytes (a 16-byte key and a control
/// byte), so a full table is 68 MiB; before it is full a remembered chunk
/// costs 19 to 39 bytes (the table doubles as it grows). Damaged chunks
/// also keep their reason (about 100 bytes more each; there are few).
/// Past the cap new verdicts are not remembered: those chunks are simply
/// read again by the next backup that needs them.
pub const DEFAULT_VERIFY_MEMORY_CHUNKS: usize = 3_670_016;

/// Verifies backups one after another, reading each distinct chunk once.
///
/// Made by [`crate::Repository::verify_session`]. It holds the store's
/// chunk index (loaded once) and a writer marker that keeps GC from
/// deleting packs it may read; both go when it is dropped, so keep a
/// session for one pass over a set of backups, not for days.
pub struct VerifySession {
    inner: Arc<RepoInner>,
    index: ChunkIndex,
    /// Where `index` is loaded from (dropped after it: a private cache's
    /// directory goes last).
    source: crate::index_cache::BoundedIndex,
    memory: Verdicts,
    /// Copies found bad during the current backup, quarantined at its end.
    found_bad: crate::quarantine::Found,
    /// Declared last: the marker goes only after the rest is dropped.
    _guard: WriterGuard,
}

impl std::fmt::Debug for VerifySession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifySession")
            .field("indexed_chunks", &self.index.len())
            .field("remembered", &self.memory.len())
            .field("limit", &self.memory.limit)
            .finish()
    }
}

impl VerifySession {
    pub(crate) fn open(inner: Arc<RepoInner>, limit: usize) -> Result<Self, EngineError> {
        // Registered before the index is read: every pack it names is then
        // fenced from GC for as long as the session lives.
        let guard = WriterGuard::register(&inner, "verify")?;
        let source = inner.bounded_index()?;
        let index = source.load(&*inner.storage, &Default::default())?;
        Ok(VerifySession {
            inner,
            index,
            source,
            memory: Verdicts::new(limit),
            found_bad: Default::default(),
            _guard: guard,
        })
    }

    /// Verifies backup `backup_id`, reading only the chunks whose verdict
    /// this session does not know yet. `job` carries this backup's progress
    /// and cancellation. A manifest that cannot be decoded is reported in
    /// [`BackupVerification::manifest_error`]; an unknown backup is
    /// [`EngineError::BackupNotFound`].
    pub fn verify(
        &mut self,
        backup_id: &str,
        job: &JobControl,
    ) -> Result<BackupVerification, EngineError> {
        let m = match self.inner.manifest(backup_id) {
            Ok(m) => m,
            Err(
                e @ (EngineError::BadObject { .. }
                | EngineError::Corrupt { .. }
                | EngineError::Tampered { .. }),
            ) => {
                job.set_finished();
                return Ok(BackupVerification {
                    backup_id: backup_id.to_owned(),
                    manifest_error: Some(e.to_string()),
                    ..Default::default()
                });
            }
            Err(e) => return Err(e),
        };
        job.set_total(m.header.disks.iter().map(|d| d.size).sum());
        let v = self.verify_manifest(backup_id, &m, job)?;
        job.set_finished();
        Ok(v)
    }

    /// Forgets every chunk found missing or corrupt, so the next backup
    /// that references one reads it again (to confirm damage before acting
    /// on it). Good verdicts are kept.
    pub fn forget_damage(&mut self) {
        self.memory.bad.clear();
    }

    /// Chunk verdicts remembered now (good and damaged).
    pub fn remembered(&self) -> usize {
        self.memory.len()
    }

    fn verify_manifest(
        &mut self,
        backup_id: &str,
        m: &Manifest,
        job: &JobControl,
    ) -> Result<BackupVerification, EngineError> {
        let mut v = BackupVerification {
            backup_id: backup_id.to_owned(),
            ..Default::default()
        };
        let (mut missing, mut corrupt) = (BTreeSet::new(), BTreeMap::new());
        // One index reload per backup at most: a chunk still missing after
        // it is missing.
        let mut may_reload = true;
        if !self.memory.bad.is_empty() && self.index_changed()? {
            // A backup stored since may hold good copies of the damaged
            // chunks, repairing this one: look again.
            self.index = self.load_index()?;
            self.memory.bad.clear();
        }
        let res = self.verify_lists(m, job, &mut v, &mut may_reload, &mut missing, &mut corrupt);
        // Quarantined even when cancelled: what was found bad stays found.
        self.quarantine_found()?;
        res?;
        v.missing_chunks = missing.into_iter().collect();
        v.tampered_chunks = corrupt
            .iter()
            .filter(|(_, tampered)| **tampered)
            .map(|(id, _)| id.clone())
            .collect();
        v.corrupt_chunks = corrupt.into_keys().collect();
        Ok(v)
    }

    /// Records the copies found bad since the last call in the store's
    /// quarantine (those not already quarantined) and in this index.
    fn quarantine_found(&mut self) -> Result<(), EngineError> {
        let found: Vec<(Location, ChunkFault)> = std::mem::take(&mut self.found_bad)
            .copies
            .into_iter()
            .filter(|(l, _)| !self.index.quarantined(l))
            .collect();
        crate::quarantine::record(&*self.inner.storage, "verify", &found)?;
        for (l, _) in &found {
            self.index.quarantine(l);
        }
        Ok(())
    }

    fn verify_lists(
        &mut self,
        m: &Manifest,
        job: &JobControl,
        v: &mut BackupVerification,
        may_reload: &mut bool,
        missing: &mut BTreeSet<String>,
        corrupt: &mut BTreeMap<String, bool>,
    ) -> Result<(), EngineError> {
        let cs = m.header.chunk_size as u64;
        for (d, lists) in m.lists.iter().enumerate() {
            let size = m.header.disks[d].size;
            let mut covered = 0u64;
            for list_id in lists {
                job.check()?;
                let span = (m.header.list_fanout as u64 * cs).min(size - covered.min(size));
                covered += span;
                if list_id.is_zero() {
                    job.add_done(span);
                    continue;
                }
                if self.memory.list_good(list_id) {
                    v.chunks_remembered += 1;
                    job.add_done(span);
                    continue;
                }
                if let Some(f) = self.memory.fault(list_id) {
                    v.chunks_remembered += 1;
                    record(*list_id, f, missing, corrupt);
                    job.add_done(span);
                    continue;
                }
                let raw = match self.read_list(list_id, may_reload, v)? {
                    Ok(raw) => raw,
                    Err(f) => {
                        record(*list_id, &f, missing, corrupt);
                        self.memory.remember(list_id, Some(f));
                        job.add_done(span);
                        continue;
                    }
                };
                let Some(ids) = decode_chunk_list(&raw) else {
                    // Its bytes match its hash, so the backup wrote a bad list.
                    let f = ChunkFault::Corrupt("not a valid chunk list".into());
                    record(*list_id, &f, missing, corrupt);
                    self.memory.remember(list_id, Some(f));
                    job.add_done(span);
                    continue;
                };
                let faults = self.check(&ids, may_reload, v)?;
                if faults.is_empty() {
                    self.memory.remember_list(list_id);
                }
                for (cid, fault) in &faults {
                    record(*cid, fault, missing, corrupt);
                }
                job.add_done(span);
            }
        }
        Ok(())
    }

    /// Fetches and checks a chunk list; a list missing from a stale index is
    /// looked up again in a fresh one.
    fn read_list(
        &mut self,
        id: &ChunkId,
        may_reload: &mut bool,
        v: &mut BackupVerification,
    ) -> Result<Result<Vec<u8>, ChunkFault>, EngineError> {
        let mut found = self.fetch_counted(id, v)?;
        if found == Err(ChunkFault::Missing) && self.reload_index(may_reload)? {
            found = self.fetch_counted(id, v)?;
        }
        Ok(found)
    }

    fn fetch_counted(
        &mut self,
        id: &ChunkId,
        v: &mut BackupVerification,
    ) -> Result<Result<Vec<u8>, ChunkFault>, EngineError> {
        if let Some(loc) = self.index.preferred(id) {
            v.chunks_read += 1;
            v.bytes_read += loc.entry.stored_len as u64;
        }
        let mut bad = Vec::new();
        let found = chunks::fetch_noting(
            &self.inner.crypt,
            &*self.inner.storage,
            &self.index,
            id,
            &mut bad,
        )?;
        self.found_bad.add(&*self.inner.storage, &self.index, bad)?;
        Ok(found)
    }

    /// Reloads the index if this backup has not done so yet and the
    /// store's index objects differ from those loaded. True if reloaded.
    fn reload_index(&mut self, may_reload: &mut bool) -> Result<bool, EngineError> {
        if !*may_reload {
            return Ok(false);
        }
        *may_reload = false;
        // A damaged block of the node's cache read as absent: the reload
        // rebuilds the cache, so the chunk is not reported missing for it.
        if !self.index_changed()? && !self.index.cache_broken() {
            return Ok(false);
        }
        self.index = self.load_index()?;
        Ok(true)
    }

    fn load_index(&self) -> Result<ChunkIndex, EngineError> {
        self.source.load(&*self.inner.storage, &Default::default())
    }

    /// Whether the store's index objects differ from those loaded.
    fn index_changed(&self) -> Result<bool, EngineError> {
        let now: HashSet<String> = self
            .inner
            .storage
            .list("index/")?
            .into_iter()
            .map(|m| m.key)
            .collect();
        let loaded: HashSet<String> = self
            .index
            .sources
            .iter()
            .chain(self.index.damaged_sources.iter().map(|(k, _)| k))
            .cloned()
            .collect();
        Ok(now != loaded)
    }

    /// Checks `ids`: chunks with a remembered verdict are not read, the
    /// others are read in parallel (each once, runs of neighbours in a pack
    /// with one ranged read). Returns each distinct bad chunk with its fault.
    fn check(
        &mut self,
        ids: &[ChunkId],
        may_reload: &mut bool,
        v: &mut BackupVerification,
    ) -> Result<Vec<(ChunkId, ChunkFault)>, EngineError> {
        let mut bad: Vec<(ChunkId, ChunkFault)> = Vec::new();
        let mut unknown: Vec<ChunkId> = Vec::new();
        let mut seen = HashSet::new();
        for id in ids {
            if id.is_zero() || !seen.insert(*id) {
                continue;
            }
            if self.memory.good(id) {
                v.chunks_remembered += 1;
            } else if let Some(f) = self.memory.fault(id) {
                v.chunks_remembered += 1;
                bad.push((*id, f.clone()));
            } else {
                unknown.push(*id);
            }
        }
        let mut verdicts = self.read_chunks(&unknown, v)?;
        let lost: Vec<ChunkId> = verdicts
            .iter()
            .filter(|(_, f)| f == &Some(ChunkFault::Missing))
            .map(|(id, _)| *id)
            .collect();
        if !lost.is_empty() && self.reload_index(may_reload)? {
            verdicts.retain(|(_, f)| f != &Some(ChunkFault::Missing));
            verdicts.extend(self.read_chunks(&lost, v)?);
        }
        for (id, verdict) in verdicts {
            if let Some(f) = &verdict {
                bad.push((id, f.clone()));
            }
            self.memory.remember(&id, verdict);
        }
        Ok(bad)
    }

    /// Reads and hashes `ids` (distinct, none zero); the verdict of each.
    fn read_chunks(
        &mut self,
        ids: &[ChunkId],
        v: &mut BackupVerification,
    ) -> Result<Vec<(ChunkId, Option<ChunkFault>)>, EngineError> {
        let mut todo: Vec<Location> = Vec::new();
        let mut verdicts: Vec<(ChunkId, Option<ChunkFault>)> = Vec::new();
        for id in ids {
            match self.index.preferred(id) {
                Some(loc) => todo.push(loc),
                None => verdicts.push((*id, Some(ChunkFault::Missing))),
            }
        }
        v.chunks_read += todo.len() as u64;
        todo.sort_unstable_by_key(|l| (l.pack, l.entry.offset));
        let mut groups: Vec<&[Location]> = Vec::new();
        let mut start = 0;
        for i in 1..=todo.len() {
            let split = i == todo.len() || {
                let (a, b) = (&todo[i - 1], &todo[i]);
                a.pack != b.pack
                    || a.entry.offset + a.entry.stored_len != b.entry.offset
                    || (b.entry.offset - todo[start].entry.offset) as usize > GROUP_BYTES
            };
            if split {
                groups.push(&todo[start..i]);
                start = i;
            }
        }
        let workers = self.inner.options.workers.max(1);
        let next = AtomicUsize::new(0);
        let bytes_read = std::sync::atomic::AtomicU64::new(0);
        let results = Mutex::new(verdicts);
        let found_bad = Mutex::new(Vec::new());
        let (inner, index) = (&*self.inner, &self.index);
        std::thread::scope(|s| -> Result<(), EngineError> {
            let hs: Vec<_> = (0..workers)
                .map(|_| {
                    let (results, next, groups, bytes_read, found_bad) =
                        (&results, &next, &groups, &bytes_read, &found_bad);
                    s.spawn(move || -> Result<(), EngineError> {
                        let mut dec = zstd::bulk::Decompressor::new()
                            .map_err(|e| EngineError::Internal(format!("zstd: {e}")))?;
                        let mut buf = Vec::new();
                        let mut bad = Vec::new();
                        loop {
                            let g = next.fetch_add(1, Ordering::Relaxed);
                            let Some(group) = groups.get(g) else {
                                return Ok(());
                            };
                            let base = group[0].entry.offset as u64;
                            let last = group[group.len() - 1].entry;
                            let len = last.offset as u64 + last.stored_len as u64 - base;
                            bytes_read.fetch_add(len, Ordering::Relaxed);
                            let payload = inner
                                .storage
                                .get_range_into(&group[0].pack.key(), base, len, &mut buf)
                                .ok()
                                .map(|()| &buf);
                            let mut out = Vec::with_capacity(group.len());
                            for loc in *group {
                                let good = payload.as_ref().is_some_and(|p| {
                                    let at = (loc.entry.offset as u64 - base) as usize;
                                    let bytes = &p[at..at + loc.entry.stored_len as usize];
                                    chunks::decode_with(&inner.crypt, Some(&mut dec), loc, bytes)
                                        .is_ok()
                                });
                                // A bad first copy: the slow path tries every copy and
                                // tells missing from corrupt.
                                let verdict = if good {
                                    None
                                } else {
                                    bytes_read
                                        .fetch_add(loc.entry.stored_len as u64, Ordering::Relaxed);
                                    chunks::fetch_noting(
                                        &inner.crypt,
                                        &*inner.storage,
                                        index,
                                        &loc.entry.id,
                                        &mut bad,
                                    )?
                                    .err()
                                };
                                out.push((loc.entry.id, verdict));
                            }
                            results.lock().expect("results lock").extend(out);
                            if !bad.is_empty() {
                                found_bad.lock().expect("bad lock").append(&mut bad);
                            }
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap_or_else(|_| {
                    Err(EngineError::Internal("a verify thread panicked".into()))
                })?;
            }
            Ok(())
        })?;
        v.bytes_read += bytes_read.into_inner();
        let bad = found_bad.into_inner().expect("bad lock");
        self.found_bad.add(&*self.inner.storage, &self.index, bad)?;
        Ok(results.into_inner().expect("results lock"))
    }
}

/// `Repository::verify`: one session over one backup or over all of them.
pub(crate) fn run(
    inner: &Arc<RepoInner>,
    backup_id: Option<&str>,
    job: &JobControl,
) -> Result<VerifyReport, EngineError> {
    let ids: Vec<String> = match backup_id {
        Some(b) => {
            // Fails with BackupNotFound for an unknown id.
            inner.manifest(b)?;
            vec![b.to_owned()]
        }
        None => {
            let mut v: Vec<String> = inner
                .storage
                .list("backups/")?
                .into_iter()
                .map(|m| m.key["backups/".len()..].to_owned())
                .collect();
            v.sort();
            v
        }
    };
    let mut session = VerifySession::open(inner.clone(), DEFAULT_VERIFY_MEMORY_CHUNKS)?;
    let mut manifests = Vec::new();
    let mut total = 0;
    for id in &ids {
        let m = inner.manifest(id);
        if let Ok(m) = &m {
            total += m.header.disks.iter().map(|d| d.size).sum::<u64>();
        }
        manifests.push(m);
    }
    job.set_total(total);
    let mut report = VerifyReport::default();
    for (id, m) in ids.iter().zip(manifests) {
        let m = match m {
            Ok(m) => m,
            // Deleted since the listing: nothing to verify.
            Err(EngineError::BackupNotFound(_)) if backup_id.is_none() => continue,
            Err(e) => {
                report.backups.push(BackupVerification {
                    backup_id: id.clone(),
                    manifest_error: Some(e.to_string()),
                    ..Default::default()
                });
                continue;
            }
        };
        let v = session.verify_manifest(id, &m, job)?;
        report.chunks_checked += v.chunks_read;
        report.backups.push(v);
    }
    Ok(report)
}

fn record(
    id: ChunkId,
    f: &ChunkFault,
    missing: &mut BTreeSet<String>,
    corrupt: &mut BTreeMap<String, bool>,
) {
    match f {
        ChunkFault::Missing => missing.insert(id.to_hex()),
        ChunkFault::Corrupt(_) => {
            corrupt.entry(id.to_hex()).or_insert(false);
            true
        }
        ChunkFault::Tampered(_) => {
            corrupt.insert(id.to_hex(), true);
            true
        }
    };
}

/// Largest ranged read when checking neighbouring chunks.
const GROUP_BYTES: usize = 4 << 20;

/// Remembered chunk ids are the first 16 bytes of their BLAKE3 name:
/// half the memory of the full id, and two distinct chunks of one store
/// share a 128-bit prefix with odds of about n^2 / 2^129 (1e-25 at the cap).
type Key = u128;

fn key(id: &ChunkId) -> Key {
    let mut k = [0u8; 16];
    k.copy_from_slice(&id.0[..16]);
    u128::from_le_bytes(k)
}

/// A chunk list remembered whole sits under its key changed by this salt:
/// "these bytes are good" (a data chunk) and "this list and every chunk it
/// names are good" must never be taken for each other, even when a disk
/// holds a chunk whose bytes happen to be a chunk list.
const LIST_SALT: Key = 0x5be0_cd19_137e_2179_1f83_d9ab_fb41_bd6b;

/// The key is already uniformly random (a BLAKE3 prefix): its low 64 bits
/// are the hash, with none of SipHash's cost.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u128 keys are hashed here; kept correct for any other use.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type KeyBuild = BuildHasherDefault<KeyHasher>;

/// The verdicts a session remembers, at most `limit` of them.
struct Verdicts {
    good: HashSet<Key, KeyBuild>,
    bad: HashMap<Key, ChunkFault, KeyBuild>,
    limit: usize,
}

impl Verdicts {
    fn new(limit: usize) -> Self {
        Verdicts {
            good: HashSet::default(),
            bad: HashMap::default(),
            limit,
        }
    }

    fn len(&self) -> usize {
        self.good.len() + self.bad.len()
    }

    fn good(&self, id: &ChunkId) -> bool {
        self.good.contains(&key(id))
    }

    fn list_good(&self, id: &ChunkId) -> bool {
        self.good.contains(&(key(id) ^ LIST_SALT))
    }

    fn fault(&self, id: &ChunkId) -> Option<&ChunkFault> {
        self.bad.get(&key(id))
    }

    fn remember(&mut self, id: &ChunkId, verdict: Option<ChunkFault>) {
        if self.len() >= self.limit {
            return;
        }
        match verdict {
            None => {
                self.good.insert(key(id));
            }
            Some(f) => {
                self.bad.insert(key(id), f);
            }
        }
    }

    fn remember_list(&mut self, id: &ChunkId) {
        if self.len() < self.limit {
            self.good.insert(key(id) ^ LIST_SALT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::of(&[n; 100])
    }

    #[test]
    fn verdicts_stop_growing_at_the_cap_and_keep_lists_apart() {
        let mut m = Verdicts::new(3);
        m.remember(&id(1), None);
        m.remember(&id(2), Some(ChunkFault::Missing));
        assert!(m.good(&id(1)));
        assert!(!m.list_good(&id(1)), "a good chunk is not a good list");
        m.remember_list(&id(3));
        assert!(m.list_good(&id(3)));
        assert!(!m.good(&id(3)), "a good list is not a good chunk");
        assert_eq!(m.fault(&id(2)), Some(&ChunkFault::Missing));
        assert_eq!(m.len(), 3);
        m.remember(&id(4), None);
        m.remember(&id(5), Some(ChunkFault::Missing));
        m.remember_list(&id(6));
        assert_eq!(m.len(), 3, "past the cap nothing more is remembered");
        assert!(!m.good(&id(4)) && m.fault(&id(5)).is_none() && !m.list_good(&id(6)));
    }

    #[test]
    fn the_key_hasher_takes_the_low_bits_of_the_key() {
        let mut h = KeyHasher::default();
        std::hash::Hash::hash(&key(&id(7)), &mut h);
        assert_eq!(h.finish(), key(&id(7)) as u64);
        assert_ne!(key(&id(7)), key(&id(8)));
    }
}
