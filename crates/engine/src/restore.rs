//! Restore: a backup's disks written to raw or qcow2 targets.
//!
//! A producer thread reads each disk's chunk lists (verified like any
//! chunk) and hands out runs of chunk ids; workers fetch, decompress and
//! verify each chunk and write it, coalescing neighbours into large writes.
//! A fresh target already reads as zeros, so zero chunks stay holes; on an
//! existing target of the same size each chunk is read back and written
//! only if it differs. A chunk that is missing or fails its hash stops the
//! restore with an error naming it: nothing unverified is ever written.
//!
//! With [`RestoreOptions::allow_damaged`] (the provider's disaster
//! recovery, never the customer API) a chunk or chunk list that cannot be
//! read becomes zeros instead, and the summary lists the byte ranges so
//! written. Either way every copy found bad is quarantined in the store.

use crate::chunks;
use crate::format::{decode_chunk_list, ChunkId, Manifest};
use crate::index::{ChunkIndex, Location};
use crate::{DamagedRange, DiskImage, EngineError, JobControl, RepoInner, RestoreSummary};
use crossbeam_channel::{bounded, Receiver, Sender};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use vpsbackup_disk::{is_zero, AlignedBuf, DiskWriter};

/// Largest single write: neighbouring chunks are merged up to this size.
const MAX_WRITE: usize = 4 << 20;

/// How a restore treats damage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// Write zeros where a chunk (or a whole chunk list) cannot be read and
    /// go on, listing those ranges in [`RestoreSummary::damaged`]. Off by
    /// default: the first bad chunk stops the restore.
    pub allow_damaged: bool,
}

pub(crate) fn run(
    inner: &RepoInner,
    backup_id: &str,
    targets: &[DiskImage],
    only_disk: Option<usize>,
    opts: RestoreOptions,
    job: &JobControl,
) -> Result<RestoreSummary, EngineError> {
    let found_bad = Mutex::new(crate::quarantine::Found::default());
    let res = run_noting(inner, backup_id, targets, only_disk, opts, job, &found_bad);
    let found = found_bad
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .copies;
    // Whatever happened to the restore, copies found bad stay quarantined.
    let quarantined = crate::quarantine::record(&*inner.storage, "restore", &found);
    let summary = res?;
    quarantined?;
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
fn run_noting(
    inner: &RepoInner,
    backup_id: &str,
    targets: &[DiskImage],
    only_disk: Option<usize>,
    opts: RestoreOptions,
    job: &JobControl,
    found_bad: &Mutex<crate::quarantine::Found>,
) -> Result<RestoreSummary, EngineError> {
    let manifest = inner.manifest(backup_id)?;
    let disks: Vec<usize> = match only_disk {
        Some(d) if d < manifest.header.disks.len() => vec![d],
        Some(d) => {
            return Err(EngineError::InvalidRequest(format!(
                "backup {backup_id} has {} disk(s); there is no disk {d}",
                manifest.header.disks.len()
            )))
        }
        None => (0..manifest.header.disks.len()).collect(),
    };
    if targets.len() != disks.len() {
        return Err(EngineError::InvalidRequest(format!(
            "backup {backup_id} has {} disk(s) to restore but {} target(s) were given",
            disks.len(),
            targets.len()
        )));
    }
    // Registered before the index is read: GC keeps every pack it may name.
    let _guard = crate::fence::WriterGuard::register(inner, &format!("restore:{backup_id}"))?;
    let index = inner.load_index(&Default::default())?;
    let attempt = |index: &ChunkIndex| {
        restore_disks(
            inner, index, &manifest, &disks, targets, &opts, job, found_bad,
        )
    };
    let res = attempt(&index);
    if !index.cache_broken() {
        return res;
    }
    // A damaged block of this node's index cache answered "absent" for a
    // chunk the store has (the restore failed, or wrote it as damaged):
    // the reload rebuilds the cache; restore again from the start.
    let index = inner.load_index(&Default::default())?;
    attempt(&index)
}

/// Writes `disks` of the backup to `targets` with `index`; files it
/// created are removed again if a disk fails.
#[allow(clippy::too_many_arguments)]
fn restore_disks(
    inner: &RepoInner,
    index: &ChunkIndex,
    manifest: &Manifest,
    disks: &[usize],
    targets: &[DiskImage],
    opts: &RestoreOptions,
    job: &JobControl,
    found_bad: &Mutex<crate::quarantine::Found>,
) -> Result<RestoreSummary, EngineError> {
    job.set_total(disks.iter().map(|d| manifest.header.disks[*d].size).sum());
    let mut summary = RestoreSummary::default();
    // Files this restore made: a failed restore removes them all, since a
    // half-written new file would look like a restored disk. Existing
    // targets are left as the failure found them.
    let mut created = Vec::new();
    for (&d, target) in disks.iter().zip(targets) {
        let size = manifest.header.disks[d].size;
        let writer = match target.format {
            Some(format) => vpsbackup_disk::open_writer_as(&target.path, size, format)?,
            None => vpsbackup_disk::open_writer(&target.path, size)?,
        };
        let fresh = writer.created();
        if fresh {
            created.push(&target.path);
        }
        let ctx = DiskRestore {
            inner,
            index,
            manifest,
            disk: d,
            writer: &*writer,
            fresh,
            job,
            allow_damaged: opts.allow_damaged,
            found_bad,
            damaged: Mutex::new(Vec::new()),
            failed: AtomicBool::new(false),
            written: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        };
        let done = ctx.run();
        summary.bytes_written += ctx.bytes.into_inner();
        summary.chunks_written += ctx.written.into_inner();
        summary.chunks_skipped += ctx.skipped.into_inner();
        let damaged = ctx.damaged.into_inner().unwrap_or_else(|e| e.into_inner());
        summary
            .damaged
            .extend(merge_ranges(d, manifest.header.chunk_size as u64, damaged));
        let finished = match done {
            Ok(()) => writer.finish().map_err(EngineError::from),
            Err(e) => {
                drop(writer); // stops a qemu-nbd helper before the file goes
                Err(e)
            }
        };
        if let Err(e) = finished {
            for path in created {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
    }
    Ok(summary)
}

/// Neighbouring chunks gathered for one write.
struct Run {
    buf: AlignedBuf,
    len: usize,
    at: u64,
}

struct DiskRestore<'a> {
    inner: &'a RepoInner,
    index: &'a ChunkIndex,
    manifest: &'a Manifest,
    disk: usize,
    writer: &'a dyn DiskWriter,
    fresh: bool,
    job: &'a JobControl,
    allow_damaged: bool,
    /// Copies found bad, for the quarantine.
    found_bad: &'a Mutex<crate::quarantine::Found>,
    /// (disk offset, length) written as zeros for want of a readable chunk.
    damaged: Mutex<Vec<(u64, u64)>>,
    failed: AtomicBool,
    written: AtomicU64,
    bytes: AtomicU64,
    skipped: AtomicU64,
}

/// Reads the chunk ids of every list chunk of one disk, in order. With
/// `unreadable`, a list that cannot be read is reported there (first chunk
/// index, chunk count) and stands for zeros; without, it stops the walk.
pub(crate) fn for_each_list(
    inner: &RepoInner,
    index: &ChunkIndex,
    manifest: &Manifest,
    disk: usize,
    bad: &Mutex<crate::quarantine::Found>,
    mut unreadable: Option<&mut dyn FnMut(u64, u64)>,
    mut f: impl FnMut(u64, Vec<ChunkId>) -> Result<bool, EngineError>,
) -> Result<(), EngineError> {
    let h = &manifest.header;
    let size = h.disks[disk].size;
    let cs = h.chunk_size as u64;
    let count = size.div_ceil(cs);
    let fanout = h.list_fanout as u64;
    let mut first = 0u64;
    for list_id in &manifest.lists[disk] {
        let n = fanout.min(count.saturating_sub(first));
        let ids = if list_id.is_zero() {
            vec![ChunkId::ZERO; n as usize]
        } else {
            let read = fetch_or_fail(inner, index, list_id, &h.backup_id, bad).and_then(|raw| {
                decode_chunk_list(&raw).ok_or_else(|| EngineError::Corrupt {
                    chunk: list_id.to_hex(),
                    backup: Some(h.backup_id.clone()),
                    detail: "a chunk list of the wrong length".into(),
                })
            });
            match (read, unreadable.as_mut()) {
                (Ok(ids), _) => ids,
                (
                    Err(
                        EngineError::MissingChunk { .. }
                        | EngineError::Corrupt { .. }
                        | EngineError::Tampered { .. },
                    ),
                    Some(note),
                ) => {
                    note(first, n);
                    vec![ChunkId::ZERO; n as usize]
                }
                (Err(e), _) => return Err(e),
            }
        };
        if ids.len() as u64 != n || n == 0 {
            return Err(EngineError::bad_object(
                format!("backups/{}", h.backup_id),
                format!("disk {disk}'s chunk lists do not match its size"),
            ));
        }
        if !f(first, ids)? {
            return Ok(());
        }
        first += n;
    }
    if first != count {
        return Err(EngineError::bad_object(
            format!("backups/{}", h.backup_id),
            format!("disk {disk}'s chunk lists do not cover its size"),
        ));
    }
    Ok(())
}

pub(crate) fn fetch_or_fail(
    inner: &RepoInner,
    index: &ChunkIndex,
    id: &ChunkId,
    backup_id: &str,
    bad: &Mutex<crate::quarantine::Found>,
) -> Result<Vec<u8>, EngineError> {
    let mut found = Vec::new();
    let res = chunks::fetch_noting(&inner.crypt, &*inner.storage, index, id, &mut found);
    if !found.is_empty() {
        bad.lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(&*inner.storage, index, found)?;
    }
    res?.map_err(|f| f.into_error(id, Some(backup_id)))
}

impl DiskRestore<'_> {
    /// Runs the disk's restore with three kinds of threads: the caller
    /// reads chunk lists and hands out pieces; one worker per core fetches,
    /// decompresses and verifies chunks into run buffers; writer threads
    /// send full buffers to the disk. Writes (O_DIRECT on raw targets) wait
    /// on the device, so they get their own threads and both cores stay on
    /// decompression and hashing. Run buffers circulate through a fixed
    /// pool, which bounds memory and avoids faulting in fresh pages.
    fn run(&self) -> Result<(), EngineError> {
        // A network store's reads wait on round trips: more workers than
        // cores keep enough ranged GETs in flight to hide them.
        let workers = self
            .inner
            .options
            .workers
            .max(self.inner.storage.io_concurrency())
            .max(1);
        let (tx, rx) = bounded::<(u64, Vec<ChunkId>)>(workers * 2);
        let (full_tx, full_rx) = bounded::<Run>(POOL);
        let (free_tx, free_rx) = bounded::<AlignedBuf>(POOL + workers);
        let buf_len = MAX_WRITE.max(self.manifest.header.chunk_size as usize);
        for _ in 0..POOL + workers {
            let _ = free_tx.send(AlignedBuf::new(buf_len));
        }
        std::thread::scope(|s| {
            let mut hs = Vec::new();
            for _ in 0..WRITERS {
                let (full_rx, free_tx) = (full_rx.clone(), free_tx.clone());
                hs.push(s.spawn(move || -> Result<(), EngineError> {
                    let mut result = Ok(());
                    for run in full_rx {
                        // After a failure, buffers still go back so no worker
                        // waits forever for one; they stop at their next check.
                        if result.is_ok() && !self.failed.load(Ordering::Relaxed) {
                            result = self
                                .writer
                                .write_all_at(&run.buf[..run.len], run.at)
                                .map_err(EngineError::from);
                            match &result {
                                Ok(()) => {
                                    self.bytes.fetch_add(run.len as u64, Ordering::Relaxed);
                                }
                                Err(_) => self.failed.store(true, Ordering::SeqCst),
                            }
                        }
                        let _ = free_tx.send(run.buf);
                    }
                    result
                }));
            }
            drop((full_rx, free_tx));
            for _ in 0..workers {
                let (rx, full_tx, free_rx) = (rx.clone(), full_tx.clone(), free_rx.clone());
                hs.push(s.spawn(move || -> Result<(), EngineError> {
                    let mut w = Worker::new(self, full_tx, free_rx)?;
                    for (first, ids) in rx {
                        if self.failed.load(Ordering::Relaxed) {
                            continue;
                        }
                        if let Err(e) = w.restore_piece(first, &ids) {
                            self.failed.store(true, Ordering::SeqCst);
                            return Err(e);
                        }
                    }
                    Ok(())
                }));
            }
            drop((rx, full_tx, free_rx));
            // Split each list into pieces so all workers stay busy on small disks.
            let cs = self.manifest.header.chunk_size as u64;
            let size = self.manifest.header.disks[self.disk].size;
            let mut note = |first: u64, n: u64| {
                let at = first * cs;
                self.note_damaged(at, (n * cs).min(size - at));
            };
            let unreadable: Option<&mut dyn FnMut(u64, u64)> = if self.allow_damaged {
                Some(&mut note)
            } else {
                None
            };
            let produced = for_each_list(
                self.inner,
                self.index,
                self.manifest,
                self.disk,
                self.found_bad,
                unreadable,
                |first, ids| {
                    self.job.check()?;
                    for (i, piece) in ids.chunks(PIECE).enumerate() {
                        if self.failed.load(Ordering::Relaxed)
                            || tx
                                .send((first + (i * PIECE) as u64, piece.to_vec()))
                                .is_err()
                        {
                            return Ok(false);
                        }
                    }
                    Ok(true)
                },
            );
            drop(tx);
            let mut first_err = produced.err();
            for h in hs {
                let r = h.join().unwrap_or_else(|_| {
                    Err(EngineError::Internal("a restore thread panicked".into()))
                });
                if let (Err(e), None) = (r, &first_err) {
                    first_err = Some(e);
                }
            }
            match first_err {
                Some(e) => Err(e),
                None => self.job.check(),
            }
        })
    }
}

/// Chunks handed to a worker at once (16 MiB of disk at 64 KiB chunks).
const PIECE: usize = 256;
/// Threads writing full run buffers: two keep a device queue busy while
/// one write waits.
const WRITERS: usize = 2;
/// Run buffers in flight besides the one each worker fills.
const POOL: usize = 4;

/// One restore worker's state, kept across pieces so nothing is
/// reallocated per piece.
struct Worker<'a, 'r> {
    d: &'r DiskRestore<'a>,
    dec: zstd::bulk::Decompressor<'static>,
    run: Run,
    payload: Vec<u8>,
    target: Vec<u8>,
    full: Sender<Run>,
    free: Receiver<AlignedBuf>,
}

impl<'a, 'r> Worker<'a, 'r> {
    fn new(
        d: &'r DiskRestore<'a>,
        full: Sender<Run>,
        free: Receiver<AlignedBuf>,
    ) -> Result<Self, EngineError> {
        let buf = free
            .recv()
            .map_err(|_| EngineError::Internal("restore buffer pool closed".into()))?;
        Ok(Worker {
            d,
            dec: zstd::bulk::Decompressor::new()
                .map_err(|e| EngineError::Internal(format!("zstd: {e}")))?,
            run: Run { buf, len: 0, at: 0 },
            payload: Vec::new(),
            target: vec![0u8; d.manifest.header.chunk_size as usize],
            full,
            free,
        })
    }

    fn restore_piece(&mut self, first: u64, ids: &[ChunkId]) -> Result<(), EngineError> {
        let d = self.d;
        let h = &d.manifest.header;
        let cs = h.chunk_size as u64;
        let size = h.disks[d.disk].size;
        let span = |i: usize| {
            let off = (first + i as u64) * cs;
            (off, cs.min(size - off) as usize)
        };
        // Pass 1: zero chunks and chunks the target already holds.
        let mut needed = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            d.job.check()?;
            let (off, len) = span(i);
            let current = if d.fresh {
                None
            } else {
                d.writer.read_exact_at(&mut self.target[..len], off)?;
                Some(&self.target[..len])
            };
            if id.is_zero() {
                if current.is_some_and(|t| !is_zero(t)) {
                    d.writer.write_zeroes(off, len as u64)?;
                    d.written.fetch_add(1, Ordering::Relaxed);
                    d.bytes.fetch_add(len as u64, Ordering::Relaxed);
                }
                d.job.add_done(len as u64);
            } else if current.is_some_and(|t| d.inner.crypt.chunk_id(t) == *id) {
                d.skipped.fetch_add(1, Ordering::Relaxed);
                d.job.add_done(len as u64);
            } else {
                needed.push(i);
            }
        }
        // Pass 2: fetch the rest, one read per run of chunks lying back to
        // back in one pack (a backup writes neighbours together), and write
        // neighbouring chunks with one call. Chunks are decompressed straight
        // into a page-aligned run buffer, which the disk writer can send with
        // O_DIRECT without a copy.
        let mut k = 0;
        while k < needed.len() {
            d.job.check()?;
            let mut placed = 0;
            if let Some(locs) = d.read_group(&needed[k..], ids, &mut self.payload) {
                let base = locs[0].entry.offset as usize;
                for loc in &locs {
                    let (off, len) = span(needed[k + placed]);
                    let at = loc.entry.offset as usize - base;
                    let stored = loc.entry.stored_len as usize;
                    self.make_room(off, len)?;
                    let slot = &mut self.run.buf[self.run.len..self.run.len + len];
                    let p = &mut self.payload[at..at + stored];
                    // A bad copy: the slow path below tries every copy.
                    let crypt = &d.inner.crypt;
                    if crate::chunks::decode_into(crypt, &mut self.dec, loc, p, slot).is_err() {
                        break;
                    }
                    self.run.len += len;
                    placed += 1;
                }
            }
            if placed == 0 {
                let i = needed[k];
                let (off, len) = span(i);
                let fetched = fetch_or_fail(d.inner, d.index, &ids[i], &h.backup_id, d.found_bad)
                    .and_then(|raw| {
                        if raw.len() == len {
                            Ok(raw)
                        } else {
                            Err(EngineError::Corrupt {
                                chunk: ids[i].to_hex(),
                                backup: Some(h.backup_id.clone()),
                                detail: format!(
                                    "it holds {} bytes where the disk needs {len}",
                                    raw.len()
                                ),
                            })
                        }
                    });
                self.make_room(off, len)?;
                let slot = &mut self.run.buf[self.run.len..self.run.len + len];
                match fetched {
                    Ok(raw) => slot.copy_from_slice(&raw),
                    Err(
                        EngineError::MissingChunk { .. }
                        | EngineError::Corrupt { .. }
                        | EngineError::Tampered { .. },
                    ) if d.allow_damaged => {
                        slot.fill(0);
                        d.note_damaged(off, len as u64);
                    }
                    Err(e) => return Err(e),
                }
                self.run.len += len;
                placed = 1;
            }
            for &i in &needed[k..k + placed] {
                d.written.fetch_add(1, Ordering::Relaxed);
                d.job.add_done(span(i).1 as u64);
            }
            k += placed;
        }
        // A piece ends where the next worker's may begin: hand the run over.
        self.hand_over()
    }

    /// Makes the run buffer ready for the chunk at disk offset `off`,
    /// handing the run to the writers first if the chunk does not continue it.
    fn make_room(&mut self, off: u64, len: usize) -> Result<(), EngineError> {
        let run = &self.run;
        if run.len > 0 && (run.at + run.len as u64 != off || run.len + len > run.buf.len()) {
            self.hand_over()?;
        }
        if self.run.len == 0 {
            self.run.at = off;
        }
        Ok(())
    }

    /// Sends the filled run to the writer threads and takes a free buffer.
    fn hand_over(&mut self) -> Result<(), EngineError> {
        if self.run.len == 0 {
            return Ok(());
        }
        let closed = || EngineError::Internal("restore writers stopped".into());
        let buf = self.free.recv().map_err(|_| closed())?;
        let run = std::mem::replace(&mut self.run, Run { buf, len: 0, at: 0 });
        self.full.send(run).map_err(|_| closed())
    }
}

/// Sorted, merged ranges of one disk (adjacent or overlapping ranges join).
/// `chunk_size` counts the chunks a range covers.
fn merge_ranges(disk: usize, chunk_size: u64, mut ranges: Vec<(u64, u64)>) -> Vec<DamagedRange> {
    ranges.sort_unstable();
    let mut out: Vec<DamagedRange> = Vec::new();
    for (offset, len) in ranges {
        match out.last_mut() {
            Some(r) if r.offset + r.len >= offset => {
                r.len = r.len.max(offset + len - r.offset);
            }
            _ => out.push(DamagedRange {
                disk,
                offset,
                len,
                chunks: 0,
            }),
        }
    }
    for r in &mut out {
        r.chunks = r.len.div_ceil(chunk_size);
    }
    out
}

impl DiskRestore<'_> {
    fn note_damaged(&self, offset: u64, len: u64) {
        self.damaged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((offset, len));
    }

    /// Reads the payloads of the longest prefix of `needed` whose preferred
    /// copies sit back to back in one pack, with one ranged read.
    fn read_group(
        &self,
        needed: &[usize],
        ids: &[ChunkId],
        payload: &mut Vec<u8>,
    ) -> Option<Vec<Location>> {
        let mut locs: Vec<Location> = Vec::new();
        for &i in needed {
            let Some(loc) = self.index.preferred(&ids[i]) else {
                break;
            };
            if let Some(last) = locs.last() {
                let end = last.entry.offset as u64 + last.entry.stored_len as u64;
                let total = end - locs[0].entry.offset as u64;
                if loc.pack != last.pack
                    || loc.entry.offset as u64 != end
                    || total + loc.entry.stored_len as u64 > MAX_WRITE as u64
                {
                    break;
                }
            }
            locs.push(loc);
        }
        let first = locs.first()?;
        let last = locs.last()?;
        let len =
            last.entry.offset as u64 + last.entry.stored_len as u64 - first.entry.offset as u64;
        self.inner
            .storage
            .get_range_into(&first.pack.key(), first.entry.offset as u64, len, payload)
            .ok()?;
        Some(locs)
    }
}
