//! The per-node on-disk chunk index cache: the store's `index/` objects as
//! sorted runs of fixed records in a local directory, so a backup or a
//! restore looks chunks up with one small positioned read instead of
//! holding the whole index in memory.
//!
//! One directory per store (`<cache dir>/<store id>/`, so two stores never
//! mix, and keyed ids of an encrypted store stay with that store):
//! - `state`: which index objects are applied (each with a source number
//!   and its entry count), the pack table (pack number -> pack id), the
//!   runs, the index objects found damaged; envelope with a crc32;
//! - `run-<rand>`: records of 56 bytes (id 32, source, pack number,
//!   offset, stored length, raw length, flags: 4 bytes each) sorted by id,
//!   in blocks of 64 records each followed by its crc32;
//! - `run-<rand>.fence`: the first 8 bytes of the first id of each block
//!   (with a crc32): the only part of a run held in memory (~0.13 bytes per
//!   record, 6 MiB for 50 M chunks);
//! - `lock`: an exclusive `flock` while syncing, so processes and threads
//!   of one node sharing the directory apply each index object once.
//!
//! Sync (at the start of every backup and restore): list `index/`; index
//! objects not yet applied are read and added as new runs (sorted in
//! batches of 1 Mi records, so memory stays bounded even on a cold start);
//! applied objects that are gone (GC consolidated or repacked them;
//! `rebuild-index` replaced them) have their source number marked dead,
//! and lookups ignore records of dead sources. This mirrors exactly what a
//! fresh load of the listed objects would hold. When runs pile up or dead
//! records pass a quarter of the total, the runs are merged into one,
//! dropping dead records.
//!
//! A missing, unreadable or foreign (other store id, other version) state,
//! or a run whose size or fence does not match, means a rebuild from the
//! store. A block failing its crc during a lookup reads as absent (a
//! backup then stores the chunk again, which is harmless) and removes the
//! state, so the next sync rebuilds. Runs are immutable and replaced by
//! new names, so a process still reading an old snapshot keeps its open
//! files while another one merges.

use crate::format::{ChunkId, IndexFile, PackId};
use crate::storage::{Storage, StorageError};
use crate::EngineError;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

const REC: usize = 56;
const BLOCK_RECS: usize = 64;
const BLOCK_BYTES: usize = BLOCK_RECS * REC + 4;
/// Records sorted in memory at once while syncing (56 MiB).
const SORT_BATCH: usize = 1 << 20;
/// More runs than this are merged into one.
const MAX_RUNS: usize = 6;
const STATE_MAGIC: &[u8; 8] = b"VPSBIDXC";
const STATE_VERSION: u32 = 1;

/// One cached index entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rec {
    pub id: ChunkId,
    pub source: u32,
    pub pack: u32,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub flags: u32,
}

impl Rec {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.0);
        for v in [
            self.source,
            self.pack,
            self.offset,
            self.stored_len,
            self.raw_len,
            self.flags,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn decode(b: &[u8]) -> Rec {
        let u = |i: usize| u32::from_le_bytes(b[32 + i * 4..36 + i * 4].try_into().expect("4"));
        Rec {
            id: ChunkId(b[..32].try_into().expect("32 bytes")),
            source: u(0),
            pack: u(1),
            offset: u(2),
            stored_len: u(3),
            raw_len: u(4),
            flags: u(5),
        }
    }
}

fn prefix(id: &ChunkId) -> u64 {
    u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"))
}

/// Why the cache could not be used as it is.
#[derive(Debug)]
enum Damage {
    /// Rebuild it from the store.
    Stale(String),
    /// The cache directory itself fails (full, unwritable).
    Io(std::io::Error),
}

impl From<std::io::Error> for Damage {
    fn from(e: std::io::Error) -> Self {
        Damage::Io(e)
    }
}

fn cache_error(dir: &Path, e: std::io::Error) -> EngineError {
    EngineError::Internal(format!(
        "the chunk index cache in {} cannot be used: {e}",
        dir.display()
    ))
}

/// A run opened for lookups.
#[derive(Debug)]
struct Run {
    file: File,
    count: u64,
    fences: Vec<u64>,
}

impl Run {
    fn open(dir: &Path, name: &str, count: u64) -> Result<Run, Damage> {
        let file = File::open(dir.join(name))
            .map_err(|e| Damage::Stale(format!("run {name} cannot be opened: {e}")))?;
        let blocks = (count as usize).div_ceil(BLOCK_RECS);
        let want = count * REC as u64 + blocks as u64 * 4;
        let have = file.metadata()?.len();
        if have != want {
            return Err(Damage::Stale(format!(
                "run {name} has {have} bytes, not {want}"
            )));
        }
        let raw = std::fs::read(dir.join(format!("{name}.fence")))
            .map_err(|e| Damage::Stale(format!("fence of {name} cannot be read: {e}")))?;
        if raw.len() != blocks * 8 + 4 || !crc_ok(&raw) {
            return Err(Damage::Stale(format!("fence of {name} is damaged")));
        }
        let fences = raw[..blocks * 8]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok(Run {
            file,
            count,
            fences,
        })
    }

    fn block_len(&self, b: usize) -> usize {
        let recs = (self.count as usize - b * BLOCK_RECS).min(BLOCK_RECS);
        recs * REC + 4
    }

    /// Appends the records of `id` to `out`; false if a block is damaged.
    fn find(&self, id: &ChunkId, buf: &mut [u8; BLOCK_BYTES], out: &mut Vec<Rec>) -> bool {
        let p = prefix(id);
        let first = self.fences.partition_point(|f| *f < p).saturating_sub(1);
        for b in first..self.fences.len() {
            if b > first && self.fences[b] > p {
                break;
            }
            let len = self.block_len(b);
            let block = &mut buf[..len];
            if self
                .file
                .read_exact_at(block, (b * BLOCK_BYTES) as u64)
                .is_err()
                || !crc_ok(block)
            {
                return false;
            }
            for r in block[..len - 4].chunks_exact(REC) {
                match r[..32].cmp(&id.0[..]) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => out.push(Rec::decode(r)),
                    std::cmp::Ordering::Greater => return true,
                }
            }
        }
        true
    }
}

fn crc_ok(b: &[u8]) -> bool {
    let (body, crc) = b.split_at(b.len() - 4);
    crc32fast::hash(body).to_le_bytes() == crc
}

/// Writes one sorted run.
struct RunWriter {
    name: String,
    path: PathBuf,
    out: BufWriter<File>,
    count: u64,
    fences: Vec<u8>,
    block: Vec<u8>,
}

impl RunWriter {
    fn create(dir: &Path) -> std::io::Result<RunWriter> {
        let name = format!("run-{}", crate::format::random_hex(8));
        let path = dir.join(&name);
        let out = BufWriter::with_capacity(1 << 20, File::create(&path)?);
        Ok(RunWriter {
            name,
            path,
            out,
            count: 0,
            fences: Vec::new(),
            block: Vec::with_capacity(BLOCK_BYTES),
        })
    }

    fn push(&mut self, r: &Rec) -> std::io::Result<()> {
        if self.block.is_empty() {
            self.fences.extend_from_slice(&prefix(&r.id).to_le_bytes());
        }
        r.encode(&mut self.block);
        self.count += 1;
        if self.block.len() == BLOCK_RECS * REC {
            self.end_block()?;
        }
        Ok(())
    }

    fn end_block(&mut self) -> std::io::Result<()> {
        let crc = crc32fast::hash(&self.block);
        self.block.extend_from_slice(&crc.to_le_bytes());
        self.out.write_all(&self.block)?;
        self.block.clear();
        Ok(())
    }

    /// Durable run and fence; returns (name, count).
    fn finish(mut self) -> std::io::Result<(String, u64)> {
        if !self.block.is_empty() {
            self.end_block()?;
        }
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let crc = crc32fast::hash(&self.fences);
        self.fences.extend_from_slice(&crc.to_le_bytes());
        write_durable(&self.path.with_extension("fence"), &self.fences)?;
        Ok((self.name, self.count))
    }
}

fn write_durable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads a run sequentially (merging).
struct RunReader {
    file: File,
    pos: u64,
    left: u64,
    block: Vec<u8>,
    at: usize,
}

impl RunReader {
    fn open(dir: &Path, name: &str, count: u64) -> std::io::Result<RunReader> {
        Ok(RunReader {
            file: File::open(dir.join(name))?,
            pos: 0,
            left: count,
            block: Vec::new(),
            at: 0,
        })
    }

    fn next(&mut self) -> Result<Option<Rec>, Damage> {
        if self.at + REC > self.block.len().saturating_sub(4) {
            if self.left == 0 {
                return Ok(None);
            }
            let recs = self.left.min(BLOCK_RECS as u64) as usize;
            self.block.resize(recs * REC + 4, 0);
            self.file.read_exact_at(&mut self.block, self.pos)?;
            self.pos += self.block.len() as u64;
            if !crc_ok(&self.block) {
                return Err(Damage::Stale("a run block is damaged".into()));
            }
            self.left -= recs as u64;
            self.at = 0;
        }
        let r = Rec::decode(&self.block[self.at..self.at + REC]);
        self.at += REC;
        Ok(Some(r))
    }
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct StateHead {
    store_id: String,
    /// Applied index objects: key -> (source number, entries).
    sources: HashMap<String, (u32, u64)>,
    /// Source numbers of objects gone from the store whose records are
    /// still in the runs, with their entry counts.
    dead: HashMap<u32, u64>,
    /// Index objects that could not be decoded, with the reason.
    damaged: Vec<(String, String)>,
    next_source: u32,
    /// (file name, records).
    runs: Vec<(String, u64)>,
    packs: usize,
}

#[derive(Debug, Default)]
struct State {
    head: StateHead,
    packs: Vec<PackId>,
}

impl State {
    fn encode(&self) -> Vec<u8> {
        let head = serde_json::to_vec(&self.head).expect("state serialises");
        let mut b = Vec::with_capacity(16 + head.len() + self.packs.len() * 16);
        b.extend_from_slice(STATE_MAGIC);
        b.extend_from_slice(&STATE_VERSION.to_le_bytes());
        b.extend_from_slice(&(head.len() as u32).to_le_bytes());
        b.extend_from_slice(&head);
        for p in &self.packs {
            b.extend_from_slice(&p.0);
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<State, String> {
        if b.len() < 20 || &b[..8] != STATE_MAGIC || !crc_ok(b) {
            return Err("the state is damaged".into());
        }
        if b[8..12] != STATE_VERSION.to_le_bytes() {
            return Err("the state is of another version".into());
        }
        let hl = u32::from_le_bytes(b[12..16].try_into().expect("4")) as usize;
        let body = &b[16..b.len() - 4];
        let head: StateHead = serde_json::from_slice(body.get(..hl).ok_or("short state")?)
            .map_err(|e| format!("the state is damaged: {e}"))?;
        let rest = &body[hl..];
        if rest.len() != head.packs * 16 {
            return Err("the state's pack table is short".into());
        }
        let packs = rest
            .chunks_exact(16)
            .map(|c| PackId(c.try_into().expect("16 bytes")))
            .collect();
        Ok(State { head, packs })
    }
}

/// The cache of one store on this node.
#[derive(Debug, Clone)]
pub(crate) struct IndexCache {
    dir: PathBuf,
    store_id: String,
}

/// What a sync did (tests and the benchmark read it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Why the cache was rebuilt from scratch (None: it was reused).
    pub rebuilt: Option<String>,
    pub objects_applied: usize,
    pub objects_removed: usize,
    pub records_added: u64,
    pub merged: bool,
    /// Records in the runs (dead ones included).
    pub records: u64,
    pub runs: usize,
}

/// A consistent view of the cache for one operation.
#[derive(Debug)]
pub(crate) struct Snapshot {
    dir: PathBuf,
    runs: Vec<Run>,
    pub(crate) packs: Vec<PackId>,
    dead: HashSet<u32>,
    pub(crate) sources: Vec<String>,
    pub(crate) damaged: Vec<(String, String)>,
    broken: AtomicBool,
    pub(crate) report: SyncReport,
}

impl Snapshot {
    /// Every live record of `id`.
    pub(crate) fn find(&self, id: &ChunkId) -> Vec<Rec> {
        let mut buf = [0u8; BLOCK_BYTES];
        let mut out = Vec::new();
        for run in &self.runs {
            if !run.find(id, &mut buf, &mut out) {
                self.mark_broken();
            }
        }
        if !self.dead.is_empty() {
            out.retain(|r| !self.dead.contains(&r.source));
        }
        out
    }

    /// A damaged block: the next sync rebuilds (this lookup read it as absent).
    fn mark_broken(&self) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            let _ = std::fs::remove_file(self.dir.join("state"));
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.runs.iter().map(|r| r.count).sum()
    }

    /// Every live record, run after run (not in id order across runs). A
    /// damaged block ends the walk and makes the next sync rebuild.
    pub(crate) fn records(&self) -> impl Iterator<Item = Rec> + '_ {
        self.runs.iter().flat_map(move |run| {
            let mut reader = run.file.try_clone().ok().map(|file| RunReader {
                file,
                pos: 0,
                left: run.count,
                block: Vec::new(),
                at: 0,
            });
            if reader.is_none() {
                self.mark_broken();
            }
            std::iter::from_fn(move || {
                let r = reader.as_mut()?;
                match r.next() {
                    Ok(rec) => rec,
                    Err(_) => {
                        self.mark_broken();
                        None
                    }
                }
            })
            .filter(move |r| !self.dead.contains(&r.source))
        })
    }

    /// Every live record in id order (the runs merged, one block buffer
    /// each). Unlike [`Self::records`], a damaged block is an error: GC
    /// must never take a record it could not read for an absent one.
    pub(crate) fn sorted_records(&self) -> SortedRecords<'_> {
        SortedRecords {
            snap: self,
            readers: Vec::new(),
            heap: BinaryHeap::new(),
            started: false,
            failed: false,
        }
    }

    /// Whether a lookup met a damaged block (and read it as absent).
    pub(crate) fn broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }
}

/// See [`Snapshot::sorted_records`].
pub(crate) struct SortedRecords<'a> {
    snap: &'a Snapshot,
    readers: Vec<RunReader>,
    heap: BinaryHeap<std::cmp::Reverse<(Rec, usize)>>,
    started: bool,
    failed: bool,
}

impl SortedRecords<'_> {
    fn damaged(&mut self, why: String) -> EngineError {
        self.failed = true;
        self.snap.mark_broken();
        EngineError::Internal(format!(
            "the chunk index cache in {} is damaged ({why}); it is rebuilt on the next run",
            self.snap.dir.display()
        ))
    }

    fn step(&mut self) -> Result<Option<Rec>, Damage> {
        if !self.started {
            self.started = true;
            for run in &self.snap.runs {
                self.readers.push(RunReader {
                    file: run.file.try_clone()?,
                    pos: 0,
                    left: run.count,
                    block: Vec::new(),
                    at: 0,
                });
            }
            for i in 0..self.readers.len() {
                if let Some(r) = self.readers[i].next()? {
                    self.heap.push(std::cmp::Reverse((r, i)));
                }
            }
        }
        loop {
            let Some(std::cmp::Reverse((r, i))) = self.heap.pop() else {
                return Ok(None);
            };
            if let Some(next) = self.readers[i].next()? {
                self.heap.push(std::cmp::Reverse((next, i)));
            }
            if !self.snap.dead.contains(&r.source) {
                return Ok(Some(r));
            }
        }
    }
}

impl Iterator for SortedRecords<'_> {
    type Item = Result<Rec, EngineError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.step() {
            Ok(r) => r.map(Ok),
            Err(Damage::Stale(why)) => Some(Err(self.damaged(why))),
            Err(Damage::Io(e)) => Some(Err(self.damaged(e.to_string()))),
        }
    }
}

/// The index for GC and verify (see [`crate::RepoInner::bounded_index`]):
/// the node's cache, or a private one in a temporary directory that
/// lives as long as this.
#[derive(Debug)]
pub(crate) struct BoundedIndex {
    cache: IndexCache,
    /// Where sorted runs of GC and verify go.
    spill_dir: PathBuf,
    /// A private cache's directory and its `owner.lock`, locked while this
    /// lives (declared after the directory: unlocked once it is gone).
    _private: Option<(tempfile::TempDir, File)>,
}

/// Private caches start with this, in the system's temporary directory.
const PRIVATE_PREFIX: &str = "vpsbackup-index-";
/// A private cache whose owner lock nobody holds is removed once its lock
/// file is this old (younger ones may be between creation and locking).
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

impl BoundedIndex {
    pub(crate) fn new(configured: Option<&Path>, store_id: &str) -> Result<Self, EngineError> {
        match configured {
            Some(base) => {
                std::fs::create_dir_all(base).map_err(|e| cache_error(base, e))?;
                Ok(BoundedIndex {
                    cache: IndexCache::new(base, store_id),
                    spill_dir: base.to_owned(),
                    _private: None,
                })
            }
            None => Self::private(&std::env::temp_dir(), store_id),
        }
    }

    /// A cache of its own in a new directory under `base`, which goes when
    /// this is dropped; one a killed process left behind is removed by the
    /// next one made (its owner lock is free).
    fn private(base: &Path, store_id: &str) -> Result<Self, EngineError> {
        remove_abandoned(base);
        let tmp = tempfile::Builder::new()
            .prefix(PRIVATE_PREFIX)
            .tempdir_in(base)
            .map_err(|e| cache_error(base, e))?;
        let owner =
            File::create(tmp.path().join("owner.lock")).map_err(|e| cache_error(tmp.path(), e))?;
        rustix::fs::flock(&owner, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| cache_error(tmp.path(), e.into()))?;
        Ok(BoundedIndex {
            cache: IndexCache::new(tmp.path(), store_id),
            spill_dir: tmp.path().to_owned(),
            _private: Some((tmp, owner)),
        })
    }
    /// The cache brought up to date, as an index (see
    /// [`crate::index::ChunkIndex::load_cached`]).
    pub(crate) fn load(
        &self,
        storage: &dyn Storage,
        condemned: &HashSet<PackId>,
    ) -> Result<crate::index::ChunkIndex, EngineError> {
        crate::index::ChunkIndex::load_cached(storage, condemned, &self.cache)
    }

    pub(crate) fn spill_dir(&self) -> &Path {
        &self.spill_dir
    }
}

impl IndexCache {
    pub(crate) fn new(base: &Path, store_id: &str) -> IndexCache {
        IndexCache {
            dir: base.join(store_id),
            store_id: store_id.to_owned(),
        }
    }

    /// Brings the cache up to date with the store's index objects and
    /// returns a snapshot for lookups.
    pub(crate) fn sync(&self, storage: &dyn Storage) -> Result<Snapshot, EngineError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| cache_error(&self.dir, e))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("lock"))
            .map_err(|e| cache_error(&self.dir, e))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| cache_error(&self.dir, e.into()))?;
        let mut report = SyncReport::default();
        let (mut state, runs) = match self.load() {
            Ok(s) => s,
            Err(Damage::Io(e)) => return Err(cache_error(&self.dir, e)),
            Err(Damage::Stale(why)) => {
                report.rebuilt = Some(why);
                self.clear().map_err(|e| cache_error(&self.dir, e))?;
                let head = StateHead {
                    store_id: self.store_id.clone(),
                    ..StateHead::default()
                };
                (
                    State {
                        head,
                        packs: Vec::new(),
                    },
                    Vec::new(),
                )
            }
        };
        drop(runs);
        match self.apply(storage, &mut state, &mut report) {
            Ok(Ok(())) => {}
            // A store error: the cache stays as it was.
            Ok(Err(e)) => return Err(e),
            Err(Damage::Io(e)) => return Err(cache_error(&self.dir, e)),
            Err(Damage::Stale(why)) => {
                // A run broke while merging: the next sync rebuilds.
                let _ = std::fs::remove_file(self.dir.join("state"));
                return Err(EngineError::Internal(format!(
                    "the chunk index cache in {} was damaged while updating ({why}); it is rebuilt on the next run",
                    self.dir.display()
                )));
            }
        }
        let runs = state
            .head
            .runs
            .iter()
            .map(|(n, c)| Run::open(&self.dir, n, *c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|d| match d {
                Damage::Io(e) => cache_error(&self.dir, e),
                Damage::Stale(why) => EngineError::Internal(why),
            })?;
        report.records = runs.iter().map(|r| r.count).sum();
        report.runs = runs.len();
        let mut sources: Vec<String> = state.head.sources.keys().cloned().collect();
        sources.sort();
        Ok(Snapshot {
            dir: self.dir.clone(),
            runs,
            packs: std::mem::take(&mut state.packs),
            dead: state.head.dead.keys().copied().collect(),
            sources,
            damaged: state.head.damaged.clone(),
            broken: AtomicBool::new(false),
            report,
        })
    }

    fn load(&self) -> Result<(State, Vec<Run>), Damage> {
        let raw = match std::fs::read(self.dir.join("state")) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Damage::Stale("there was no cache".into()))
            }
            Err(e) => return Err(Damage::Io(e)),
        };
        let state = State::decode(&raw).map_err(Damage::Stale)?;
        if state.head.store_id != self.store_id {
            return Err(Damage::Stale("the cache is another store's".into()));
        }
        // Opening checks every run's size and fence.
        let runs = state
            .head
            .runs
            .iter()
            .map(|(n, c)| Run::open(&self.dir, n, *c))
            .collect::<Result<Vec<_>, _>>()?;
        // Runs a sync that failed half-way left behind.
        let named: HashSet<String> = state
            .head
            .runs
            .iter()
            .flat_map(|(n, _)| [n.clone(), format!("{n}.fence")])
            .collect();
        for e in std::fs::read_dir(&self.dir)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if name.starts_with("run-") && !named.contains(&name) {
                let _ = std::fs::remove_file(self.dir.join(&name));
            }
        }
        Ok((state, runs))
    }

    /// Removes every file but the lock.
    fn clear(&self) -> std::io::Result<()> {
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            if e.file_name() != "lock" {
                std::fs::remove_file(e.path())?;
            }
        }
        Ok(())
    }

    fn apply(
        &self,
        storage: &dyn Storage,
        state: &mut State,
        report: &mut SyncReport,
    ) -> Result<Result<(), EngineError>, Damage> {
        let listed = match storage.list("index/") {
            Ok(l) => l,
            Err(e) => return Ok(Err(e.into())),
        };
        let listed: HashSet<String> = listed.into_iter().map(|m| m.key).collect();
        let head = &mut state.head;
        let gone: Vec<String> = head
            .sources
            .keys()
            .filter(|k| !listed.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            let (num, n) = head.sources.remove(&k).expect("listed above");
            head.dead.insert(num, n);
            report.objects_removed += 1;
        }
        head.damaged.retain(|(k, _)| listed.contains(k));
        let mut todo: Vec<String> = listed
            .iter()
            .filter(|k| {
                !head.sources.contains_key(*k) && !head.damaged.iter().any(|(d, _)| d == *k)
            })
            .cloned()
            .collect();
        todo.sort();
        let mut pack_nums: Option<HashMap<PackId, u32>> = None;
        let mut batch: Vec<Rec> = Vec::new();
        let mut new_runs: Vec<(String, u64)> = Vec::new();
        // Objects deleted by a concurrent GC are consolidated into one
        // written before the deletion; a second listing catches it.
        for pass in 0..2 {
            if pass == 1 {
                let again = match storage.list("index/") {
                    Ok(l) => l,
                    Err(e) => return Ok(Err(e.into())),
                };
                todo = again
                    .into_iter()
                    .map(|m| m.key)
                    .filter(|k| {
                        !state.head.sources.contains_key(k)
                            && !state.head.damaged.iter().any(|(d, _)| d == k)
                    })
                    .collect();
            }
            for key in &todo {
                let obj = match storage.get(key) {
                    Ok(o) => o,
                    Err(StorageError::NotFound(_)) => continue,
                    Err(e @ StorageError::Tampered { .. }) => {
                        state
                            .head
                            .damaged
                            .push((key.clone(), EngineError::from(e).to_string()));
                        continue;
                    }
                    Err(e) => return Ok(Err(e.into())),
                };
                let file = match IndexFile::decode(key, &obj) {
                    Ok(f) => f,
                    Err(e) => {
                        state.head.damaged.push((key.clone(), e.to_string()));
                        continue;
                    }
                };
                drop(obj);
                let nums = pack_nums.get_or_insert_with(|| {
                    state
                        .packs
                        .iter()
                        .enumerate()
                        .map(|(i, p)| (*p, i as u32))
                        .collect()
                });
                if batch.capacity() == 0 {
                    // Headroom for one pack past the bound (thousands of entries when
                    // chunks compress well), so the batch never doubles.
                    batch.reserve_exact(SORT_BATCH + (1 << 16));
                }
                let source = state.head.next_source;
                state.head.next_source += 1;
                let mut n = 0u64;
                for (pack, entries) in &file.packs {
                    let num = *nums.entry(*pack).or_insert_with(|| {
                        state.packs.push(*pack);
                        (state.packs.len() - 1) as u32
                    });
                    for e in entries {
                        batch.push(Rec {
                            id: e.id,
                            source,
                            pack: num,
                            offset: e.offset,
                            stored_len: e.stored_len,
                            raw_len: e.raw_len,
                            flags: e.flags,
                        });
                        n += 1;
                    }
                    // A large object (GC's consolidation) must not grow the batch past its bound.
                    if batch.len() >= SORT_BATCH {
                        new_runs.push(self.write_batch(&mut batch)?);
                    }
                }
                state.head.sources.insert(key.clone(), (source, n));
                report.objects_applied += 1;
                report.records_added += n;
            }
        }
        if !batch.is_empty() {
            new_runs.push(self.write_batch(&mut batch)?);
        }
        drop(batch);
        state.head.runs.extend(new_runs);
        let old_runs = state.head.runs.clone();
        let total: u64 = state.head.runs.iter().map(|(_, c)| c).sum();
        let dead: u64 = state.head.dead.values().sum();
        if state.head.runs.len() > MAX_RUNS || (dead > 0 && dead * 4 > total) {
            let merged = self.merge(&state.head.runs, &state.head.dead)?;
            state.head.runs = vec![merged];
            state.head.dead.clear();
            report.merged = true;
        }
        state.head.packs = state.packs.len();
        if report.objects_applied > 0 || report.objects_removed > 0 || report.rebuilt.is_some() {
            write_durable(&self.dir.join("state"), &state.encode())?;
            // Runs no longer named (merged): a reader of an older snapshot
            // keeps its open file.
            let keep: HashSet<&str> = state.head.runs.iter().map(|(n, _)| n.as_str()).collect();
            for (n, _) in &old_runs {
                if !keep.contains(n.as_str()) {
                    let _ = std::fs::remove_file(self.dir.join(n));
                    let _ = std::fs::remove_file(self.dir.join(format!("{n}.fence")));
                }
            }
        }
        Ok(Ok(()))
    }

    fn write_batch(&self, batch: &mut Vec<Rec>) -> Result<(String, u64), Damage> {
        batch.sort_unstable_by(|a, b| a.id.cmp(&b.id).then(a.source.cmp(&b.source)));
        let mut w = RunWriter::create(&self.dir)?;
        for r in batch.iter() {
            w.push(r)?;
        }
        batch.clear();
        Ok(w.finish()?)
    }

    /// Merges `runs` into one, without the records of `dead` sources.
    fn merge(
        &self,
        runs: &[(String, u64)],
        dead: &HashMap<u32, u64>,
    ) -> Result<(String, u64), Damage> {
        let mut readers = runs
            .iter()
            .map(|(n, c)| RunReader::open(&self.dir, n, *c))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut heap = BinaryHeap::new();
        for (i, r) in readers.iter_mut().enumerate() {
            if let Some(rec) = r.next()? {
                heap.push(std::cmp::Reverse((rec.id, rec.source, i, rec)));
            }
        }
        let mut w = RunWriter::create(&self.dir)?;
        while let Some(std::cmp::Reverse((_, _, i, rec))) = heap.pop() {
            if !dead.contains_key(&rec.source) {
                w.push(&rec)?;
            }
            if let Some(next) = readers[i].next()? {
                heap.push(std::cmp::Reverse((next.id, next.source, i, next)));
            }
        }
        Ok(w.finish()?)
    }
}

/// Removes private caches under `base` whose owner died (a GC or verify
/// killed before it could remove its own): its lock is free and old.
/// Best effort; another user's directories are not ours to open.
fn remove_abandoned(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(PRIVATE_PREFIX) {
            continue;
        }
        let lock = e.path().join("owner.lock");
        let Ok(f) = File::open(&lock) else {
            continue;
        };
        let old = f
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= ABANDONED_AFTER);
        if old
            && rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl PartialOrd for Rec {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Rec {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.id, self.source, self.pack, self.offset).cmp(&(
            other.id,
            other.source,
            other.pack,
            other.offset,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftover(base: &Path, name: &str, age_s: u64) -> (PathBuf, File) {
        let dir = base.join(format!("{PRIVATE_PREFIX}{name}"));
        std::fs::create_dir_all(dir.join("store")).unwrap();
        std::fs::write(dir.join("store").join("run-x"), b"records").unwrap();
        let f = File::create(dir.join("owner.lock")).unwrap();
        f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(age_s))
            .unwrap();
        (dir, f)
    }

    #[test]
    fn a_private_cache_whose_owner_died_is_removed_by_the_next() {
        let base = tempfile::tempdir().unwrap();
        let (dead, f) = leftover(base.path(), "dead", 120);
        drop(f);
        let (fresh, f) = leftover(base.path(), "fresh", 0);
        drop(f);
        let (alive, held) = leftover(base.path(), "alive", 120);
        rustix::fs::flock(&held, rustix::fs::FlockOperation::LockExclusive).unwrap();
        let other = base.path().join("not-ours");
        std::fs::create_dir(&other).unwrap();

        let b = BoundedIndex::private(base.path(), "store").unwrap();
        let own = b.spill_dir().to_owned();
        assert!(!dead.exists(), "its owner's lock was free and old");
        assert!(fresh.exists(), "a new one may not be locked yet");
        assert!(alive.exists(), "its owner holds the lock");
        assert!(other.exists());
        // Another process making its own cache leaves this one alone.
        let b2 = BoundedIndex::private(base.path(), "store").unwrap();
        assert!(own.exists());
        drop((b, b2));
        assert!(!own.exists(), "removed when dropped");
        drop(held);
    }
}
