//! One backup: every disk of a server into new chunks, packs, an index
//! object and finally the manifest.
//!
//! Threads (bounded channels between them, so memory does not depend on
//! disk size):
//! - a reader walks each disk's data extents (holes are never read) in
//!   4 MiB page-aligned blocks taken from a fixed pool, honouring the read
//!   limit;
//! - workers zero-check and hash each chunk, look it up in the index and
//!   compress only new ones;
//! - a writer puts results back in disk order, builds the chunk lists and
//!   fills packs, returning each block's buffer to the pool;
//! - an uploader stores finished packs and, after them, index objects.
//!
//! The pool size bounds how far the reader may run ahead of the writer.

use crate::chunks::compress_into;
use crate::crypt::SEAL_OVERHEAD;
use crate::fence::WriterGuard;
use crate::format::{
    encode_chunk_list, now_ms, random_hex, ChunkId, IndexFile, Manifest, ManifestDisk,
    ManifestHeader, PackBuilder, PackEntry, PackId,
};
use crate::incremental::{self, BaseDisk, ChangedSince};
use crate::index::ChunkIndex;
use crate::job::ReadLimiter;
use crate::storage::Storage;
use crate::{manifest_key, validate_backup_id, BackupRequest, BackupSummary, EngineError};
use crate::{JobControl, RepoInner};
use crossbeam_channel::{bounded, Receiver, Sender};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use vpsbackup_disk::{is_zero, AlignedBuf, DiskReader};

/// Bytes per read block (a multiple of the chunk size).
const BLOCK: usize = 4 << 20;
/// Blocks in flight between reader and writer.
const WINDOW: usize = 6;
/// Entries in the per-backup set of new chunks (~48 bytes each): 1 Mi
/// entries cover 64 GiB of new data at 64 KiB chunks in about 50 MiB.
const CLAIMED_CAP: usize = 1 << 20;
/// The uploader writes an index object after this many packs, so its
/// memory stays bounded and a long backup's packs get indexed early.
const PACKS_PER_INDEX: usize = 64;
/// Pack buffers that can be out at once besides the open one (one queued,
/// one uploading): all of them come back for reuse.
const SPARE_PACKS: usize = 2;

enum Work {
    Data {
        seq: u64,
        disk: usize,
        len: usize,
        buf: AlignedBuf,
        /// Per chunk of the block, in an incremental backup: the base's id
        /// to reuse (that chunk was not read), or `None` (read: hash it).
        /// Empty: every chunk was read.
        reuse: Vec<Option<ChunkId>>,
    },
    /// A block whose every chunk is the base's, never read.
    Reused {
        seq: u64,
        disk: usize,
        len: u64,
        ids: Vec<ChunkId>,
    },
    Zero {
        seq: u64,
        disk: usize,
        len: u64,
    },
}

enum ChunkOut {
    Zero,
    Known(ChunkId),
    New {
        id: ChunkId,
        start: usize,
        len: usize,
        raw_len: u32,
        flags: u32,
    },
}

impl ChunkOut {
    /// A chunk taken from the base backup.
    fn reused(id: ChunkId) -> ChunkOut {
        if id.is_zero() {
            ChunkOut::Zero
        } else {
            ChunkOut::Known(id)
        }
    }
}

struct Done {
    seq: u64,
    disk: usize,
    len: u64,
    /// Empty for a zero range.
    chunks: Vec<ChunkOut>,
    payload: Vec<u8>,
    buf: Option<AlignedBuf>,
}

pub(crate) fn run(
    inner: &RepoInner,
    req: &BackupRequest,
    labels: &BTreeMap<String, String>,
    job: &JobControl,
) -> Result<BackupSummary, EngineError> {
    // Checked before any disk is opened; `run_readers` checks again for
    // callers that open their own readers.
    validate_backup_id(&req.backup_id)?;
    if inner.storage.head(&manifest_key(&req.backup_id))?.is_some() {
        return Err(EngineError::BackupExists(req.backup_id.clone()));
    }
    let mut readers = Vec::with_capacity(req.disks.len());
    for disk in &req.disks {
        readers.push(match disk.format {
            Some(format) => vpsbackup_disk::open_reader_as(&disk.path, format)?,
            None => vpsbackup_disk::open_reader(&disk.path)?,
        });
    }
    run_readers(inner, req, readers, None, labels, job)
}

/// A backup of `readers` (one per `req.disks`, whose paths the manifest
/// records as the disks' sources): readers opened by the caller, such as a
/// running server's point-in-time export. With `changed`, chunks outside
/// the changed extents are taken from the base backup instead of read.
pub(crate) fn run_readers(
    inner: &RepoInner,
    req: &BackupRequest,
    readers: Vec<Box<dyn DiskReader>>,
    changed: Option<&ChangedSince>,
    labels: &BTreeMap<String, String>,
    job: &JobControl,
) -> Result<BackupSummary, EngineError> {
    validate_backup_id(&req.backup_id)?;
    if readers.len() != req.disks.len() || readers.is_empty() {
        return Err(EngineError::InvalidRequest(
            "a backup needs one reader per disk, and at least one disk".into(),
        ));
    }
    let storage = &*inner.storage;
    if storage.head(&manifest_key(&req.backup_id))?.is_some() {
        return Err(EngineError::BackupExists(req.backup_id.clone()));
    }
    let total: u64 = readers.iter().map(|r| r.size()).sum();
    job.set_total(total);

    // Register before reading the index: from here on GC keeps everything
    // this backup may reference or write.
    let guard = WriterGuard::register(inner, &req.backup_id)?;
    let mut base_manifest: Option<Result<crate::format::Manifest, String>> = None;
    let mut full_reasons;
    let mut attempt = 0;
    let out = loop {
        // Each attempt registers with the other backups of this process
        // (see [`crate::inflight`]); a retry borrows nothing.
        let share = inner.inflight.join(attempt == 0);
        let (condemned, _) = crate::fence::load_pending(storage)?;
        let index = inner.load_index(&condemned.keys().copied().collect())?;
        // The base is read after the index: its chunks are reused only where
        // the index (which excludes what GC condemned) still offers them.
        if base_manifest.is_none() {
            base_manifest = changed.map(|c| incremental::load_manifest(inner, c));
        }
        let bases = incremental::bases(inner, &index, changed, base_manifest.as_ref(), &readers);
        full_reasons = bases.full_reasons;

        let pipeline = Pipeline {
            inner,
            fence: &guard,
            index: &index,
            job,
            share: &share,
            abort: AtomicBool::new(false),
            spare_payloads: bounded(WINDOW),
            spare_packs: bounded(SPARE_PACKS),
            chunk_size: inner.config.chunk_size as usize,
            block: BLOCK.max(inner.config.chunk_size as usize),
        };
        let out = pipeline.run(&readers, bases.disks, req.read_limit)?;
        job.check()?;
        share.indexed();
        // Chunks taken from other running backups must be in the store
        // before a manifest names them.
        if share.wait_borrowed() {
            break out;
        }
        // One of them failed: read again; what is missing is stored now.
        attempt += 1;
        job.restart();
        if attempt > 2 {
            return Err(EngineError::Internal(
                "concurrent backups kept failing while this one used their chunks".into(),
            ));
        }
    };
    job.check()?;

    let header = ManifestHeader {
        backup_id: req.backup_id.clone(),
        server_id: req.server_id.clone(),
        server_name: req.server_name.clone(),
        created_at_ms: guard.started_at_ms,
        chunk_size: inner.config.chunk_size,
        list_fanout: inner.config.list_fanout,
        disks: req
            .disks
            .iter()
            .zip(&readers)
            .zip(&out.data_bytes)
            .map(|((p, r), data)| ManifestDisk {
                source_path: p.path.display().to_string(),
                format: r.format().as_str().to_owned(),
                size: r.size(),
                data_bytes: *data,
            })
            .collect(),
        labels: labels.clone(),
    };
    let manifest = Manifest {
        header,
        lists: out.lists,
    };
    // The packs and their index objects are durable (the uploader wrote them in
    // that order); only now may a manifest reference their chunks, and only
    // if GC has counted this backup as live all along.
    guard.check()?;
    if !storage.put_if_absent(&manifest_key(&req.backup_id), &manifest.encode())? {
        return Err(EngineError::BackupExists(req.backup_id.clone()));
    }
    drop(guard);
    Ok(BackupSummary {
        backup_id: req.backup_id.clone(),
        logical_bytes: total,
        data_bytes: out.data_bytes.iter().sum(),
        stored_bytes: out.stored_bytes,
        chunks_total: out.chunks_total,
        chunks_new: out.chunks_new,
        bytes_read: out.bytes_read,
        incremental: changed.is_some() && full_reasons.is_empty(),
        full_reasons,
    })
}

struct Pipeline<'a> {
    inner: &'a RepoInner,
    /// This backup's writer marker: checked as blocks are read, so a backup
    /// GC may have stopped protecting stops early.
    fence: &'a WriterGuard,
    index: &'a ChunkIndex,
    job: &'a JobControl,
    /// New chunks this backup or another running one of this process
    /// already took on ([`crate::inflight`]). Capped at [`CLAIMED_CAP`]
    /// entries per backup so memory does not grow with the disk: past the
    /// cap it starts afresh, and a chunk repeated far apart within one huge
    /// backup may be stored twice (harmless: GC keeps one copy).
    share: &'a crate::inflight::Share,
    abort: AtomicBool,
    /// Buffers handed back for reuse (payloads by the writer, packs by the
    /// uploader), so the steady state allocates nothing large: fresh large
    /// allocations each time fragment the heap and inflate peak RSS.
    spare_payloads: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    spare_packs: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    chunk_size: usize,
    block: usize,
}

struct WriterOut {
    lists: Vec<Vec<ChunkId>>,
    data_bytes: Vec<u64>,
    stored_bytes: u64,
    chunks_total: u64,
    chunks_new: u64,
    seqs: u64,
    /// Bytes read from the disks (filled in from the reader's count).
    bytes_read: u64,
}

fn join<T>(h: std::thread::ScopedJoinHandle<'_, Result<T, EngineError>>) -> Result<T, EngineError> {
    h.join()
        .unwrap_or_else(|_| Err(EngineError::Internal("a backup thread panicked".into())))
}

impl Pipeline<'_> {
    /// True if this caller is the first in this backup to take on chunk `id`.
    fn claim(&self, id: ChunkId) -> bool {
        self.share.claim(id, CLAIMED_CAP) == crate::inflight::Claim::Store
    }

    fn fail<T>(&self, e: EngineError) -> Result<T, EngineError> {
        self.abort.store(true, Ordering::SeqCst);
        Err(e)
    }

    fn run(
        &self,
        readers: &[Box<dyn DiskReader>],
        bases: Vec<Option<BaseDisk<'_>>>,
        read_limit: Option<u64>,
    ) -> Result<WriterOut, EngineError> {
        let (pool_tx, pool_rx) = bounded::<AlignedBuf>(WINDOW);
        for _ in 0..WINDOW {
            pool_tx
                .send(AlignedBuf::new(self.block))
                .expect("pool has room");
        }
        let (work_tx, work_rx) = bounded::<Work>(WINDOW);
        let (done_tx, done_rx) = bounded::<Done>(WINDOW * 2);
        let (pack_tx, pack_rx) = bounded::<(PackId, Vec<u8>, Vec<PackEntry>)>(1);
        let workers = self.inner.options.workers.max(1);

        std::thread::scope(|s| {
            let reader =
                s.spawn(move || self.read_disks(readers, bases, read_limit, pool_rx, work_tx));
            let mut hs = Vec::new();
            for _ in 0..workers {
                let (rx, tx) = (work_rx.clone(), done_tx.clone());
                hs.push(s.spawn(move || self.hash_and_compress(rx, tx)));
            }
            drop((work_rx, done_tx));
            let writer = s.spawn(move || self.write(readers.len(), done_rx, pool_tx, pack_tx));
            let uploader = s.spawn(move || self.upload(pack_rx));

            let read = join(reader);
            let hashed: Vec<_> = hs.into_iter().map(join).collect();
            let written = join(writer);
            let uploaded = join(uploader);
            // Report the root cause: the first failure in pipeline order.
            let (seqs, bytes_read) = read?;
            for h in hashed {
                h?;
            }
            // The writer fails only with "the uploader stopped" when the
            // uploader failed first: the uploader's error is the cause.
            let mut out = match (written, uploaded) {
                (Err(_), Err(e)) | (Ok(_), Err(e)) | (Err(e), Ok(())) => return Err(e),
                (Ok(out), Ok(())) => out,
            };
            out.bytes_read = bytes_read;
            if out.seqs != seqs {
                return Err(EngineError::Internal(
                    "the backup pipeline lost a block".into(),
                ));
            }
            Ok(out)
        })
    }

    /// Returns the number of work items sent and the bytes read.
    fn read_disks(
        &self,
        readers: &[Box<dyn DiskReader>],
        mut bases: Vec<Option<BaseDisk<'_>>>,
        read_limit: Option<u64>,
        pool: Receiver<AlignedBuf>,
        work: Sender<Work>,
    ) -> Result<(u64, u64), EngineError> {
        let mut limiter = read_limit.map(ReadLimiter::new);
        let mut seq = 0u64;
        let mut bytes_read = 0u64;
        let block = self.block as u64;
        let cs = self.chunk_size as u64;
        for (disk, r) in readers.iter().enumerate() {
            let mut base = bases.get_mut(disk).and_then(Option::take);
            let size = r.size();
            let mut pos = 0u64;
            while pos < size {
                if let Err(e) = self.job.check().and_then(|()| self.fence.check()) {
                    return self.fail(e);
                }
                if self.abort.load(Ordering::Relaxed) {
                    return Ok((seq, bytes_read));
                }
                let next = match r.next_data(pos) {
                    Ok(n) => n,
                    Err(e) => return self.fail(e.into()),
                };
                let data_at = match next {
                    Some(e) if e.offset < size => e.offset / block * block,
                    _ => size,
                };
                if data_at > pos {
                    let item = Work::Zero {
                        seq,
                        disk,
                        len: data_at - pos,
                    };
                    if work.send(item).is_err() {
                        return Ok((seq, bytes_read));
                    }
                    seq += 1;
                    pos = data_at;
                    continue;
                }
                let len = block.min(size - pos) as usize;
                // In an incremental backup, which chunks the base gives.
                let reuse: Vec<Option<ChunkId>> = match base.as_mut() {
                    None => Vec::new(),
                    Some(b) => (pos..pos + len as u64)
                        .step_by(cs as usize)
                        .map(|at| {
                            let n = cs.min(pos + len as u64 - at);
                            if b.dirty(at, n) {
                                None
                            } else {
                                b.reusable(at / cs)
                            }
                        })
                        .collect(),
                };
                if !reuse.is_empty() && reuse.iter().all(Option::is_some) {
                    let ids = reuse.into_iter().flatten().collect();
                    let item = Work::Reused {
                        seq,
                        disk,
                        len: len as u64,
                        ids,
                    };
                    if work.send(item).is_err() {
                        return Ok((seq, bytes_read));
                    }
                    seq += 1;
                    pos += len as u64;
                    continue;
                }
                let Ok(mut buf) = pool.recv() else {
                    return Ok((seq, bytes_read));
                };
                let read = if reuse.is_empty() {
                    fill_block(&**r, &mut buf[..len], pos)
                } else {
                    fill_chunks(&**r, &mut buf[..len], pos, self.chunk_size, &reuse)
                };
                let read = match read {
                    Ok(n) => n,
                    Err(e) => return self.fail(e),
                };
                bytes_read += read;
                if let Some(l) = limiter.as_mut() {
                    l.take(read, self.job);
                }
                if work
                    .send(Work::Data {
                        seq,
                        disk,
                        len,
                        buf,
                        reuse,
                    })
                    .is_err()
                {
                    return Ok((seq, bytes_read));
                }
                seq += 1;
                pos += len as u64;
            }
        }
        Ok((seq, bytes_read))
    }

    fn hash_and_compress(
        &self,
        work: Receiver<Work>,
        done: Sender<Done>,
    ) -> Result<(), EngineError> {
        let mut compressor = zstd::bulk::Compressor::new(self.inner.options.zstd_level)
            .map_err(|e| EngineError::Internal(format!("zstd: {e}")))?;
        let mut scratch = Vec::new();
        let crypt = &self.inner.crypt;
        for item in work {
            let out = match item {
                Work::Zero { seq, disk, len } => Done {
                    seq,
                    disk,
                    len,
                    chunks: Vec::new(),
                    payload: Vec::new(),
                    buf: None,
                },
                Work::Reused {
                    seq,
                    disk,
                    len,
                    ids,
                } => Done {
                    seq,
                    disk,
                    len,
                    chunks: ids.into_iter().map(ChunkOut::reused).collect(),
                    payload: Vec::new(),
                    buf: None,
                },
                Work::Data {
                    seq,
                    disk,
                    len,
                    buf,
                    reuse,
                } => {
                    let mut chunks = Vec::with_capacity(len.div_ceil(self.chunk_size));
                    let mut payload = self.spare_payloads.1.try_recv().unwrap_or_default();
                    payload.clear();
                    // Room for the worst case up front: no regrowth while compressing.
                    payload.reserve(len + len.div_ceil(self.chunk_size) * SEAL_OVERHEAD);
                    for (k, raw) in buf[..len].chunks(self.chunk_size).enumerate() {
                        if let Some(Some(id)) = reuse.get(k) {
                            chunks.push(ChunkOut::reused(*id));
                            continue;
                        }
                        if is_zero(raw) {
                            chunks.push(ChunkOut::Zero);
                            continue;
                        }
                        let id = crypt.chunk_id(raw);
                        if self.index.has_for_dedup(&id) || !self.claim(id) {
                            chunks.push(ChunkOut::Known(id));
                            continue;
                        }
                        let start = crypt.begin_chunk(&mut payload);
                        let flags = compress_into(&mut compressor, &mut scratch, raw, &mut payload);
                        crypt.end_chunk(&mut payload, start, &id, raw.len() as u32, flags);
                        chunks.push(ChunkOut::New {
                            id,
                            start,
                            len: payload.len() - start,
                            raw_len: raw.len() as u32,
                            flags,
                        });
                    }
                    Done {
                        seq,
                        disk,
                        len: len as u64,
                        chunks,
                        payload,
                        buf: Some(buf),
                    }
                }
            };
            if done.send(out).is_err() {
                return Ok(());
            }
        }
        Ok(())
    }

    fn write(
        &self,
        disks: usize,
        done: Receiver<Done>,
        pool: Sender<AlignedBuf>,
        packs: Sender<(PackId, Vec<u8>, Vec<PackEntry>)>,
    ) -> Result<WriterOut, EngineError> {
        let mut w = PackWriter {
            p: self,
            packs,
            pack: PackBuilder::new(self.inner.options.pack_target + BLOCK),
            lists: vec![Vec::new(); disks],
            current: Vec::with_capacity(self.inner.config.list_fanout as usize),
            current_disk: 0,
            compressor: zstd::bulk::Compressor::new(self.inner.options.zstd_level)
                .map_err(|e| EngineError::Internal(format!("zstd: {e}")))?,
            out: WriterOut {
                lists: Vec::new(),
                data_bytes: vec![0; disks],
                stored_bytes: 0,
                chunks_total: 0,
                chunks_new: 0,
                seqs: 0,
                bytes_read: 0,
            },
        };
        let mut waiting: BTreeMap<u64, Done> = BTreeMap::new();
        for d in done {
            waiting.insert(d.seq, d);
            while let Some(d) = waiting.remove(&w.out.seqs) {
                w.out.seqs += 1;
                if let Err(e) = w.take(&d) {
                    return self.fail(e);
                }
                self.job.add_done(d.len);
                if d.payload.capacity() > 0 {
                    // Zero ranges carry no buffer: they must not take a slot.
                    let _ = self.spare_payloads.0.try_send(d.payload);
                }
                if let Some(buf) = d.buf {
                    // The reader may be gone (cancelled); the buffer is then just freed.
                    let _ = pool.send(buf);
                }
            }
        }
        if self.abort.load(Ordering::Relaxed) || self.job.is_cancelled() {
            return Ok(w.out);
        }
        if let Err(e) = w.close_list() {
            return self.fail(e);
        }
        if !w.pack.is_empty() {
            if let Err(e) = w.flush_pack() {
                return self.fail(e);
            }
        }
        w.out.lists = std::mem::take(&mut w.lists);
        Ok(w.out)
    }

    /// Stores packs, then the index objects naming them: an index object
    /// names only packs already stored. Backends whose requests wait on a
    /// network (S3) get several packs in flight at once
    /// ([`Storage::io_concurrency`]); a local store keeps one.
    fn upload(
        &self,
        packs: Receiver<(PackId, Vec<u8>, Vec<PackEntry>)>,
    ) -> Result<(), EngineError> {
        let storage: &dyn Storage = &*self.inner.storage;
        let index = Mutex::new(IndexFile::default());
        let stream = |packs: Receiver<(PackId, Vec<u8>, Vec<PackEntry>)>| {
            for (id, bytes, entries) in packs {
                if self.abort.load(Ordering::Relaxed) {
                    return Ok(());
                }
                if let Err(e) = storage.put_if_absent(&id.key(), &bytes) {
                    return self.fail(e.into());
                }
                let _ = self.spare_packs.0.try_send(bytes);
                let full = {
                    let mut index = index.lock().unwrap_or_else(|e| e.into_inner());
                    index.packs.push((id, entries));
                    (index.packs.len() >= PACKS_PER_INDEX).then(|| std::mem::take(&mut *index))
                };
                if let Some(full) = full {
                    if let Err(e) = write_index(storage, &full) {
                        return self.fail(e);
                    }
                }
            }
            Ok(())
        };
        let streams = storage.io_concurrency().max(1);
        let results: Vec<Result<(), EngineError>> = std::thread::scope(|s| {
            let stream = &stream;
            let hs: Vec<_> = (0..streams)
                .map(|_| {
                    let packs = packs.clone();
                    s.spawn(move || stream(packs))
                })
                .collect();
            drop(packs);
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(EngineError::Internal("an upload thread panicked".into()))
                    })
                })
                .collect()
        });
        for r in results {
            r?;
        }
        let index = index.into_inner().unwrap_or_else(|e| e.into_inner());
        if !index.packs.is_empty() && !self.abort.load(Ordering::Relaxed) {
            if let Err(e) = write_index(storage, &index) {
                return self.fail(e);
            }
        }
        Ok(())
    }
}

pub(crate) fn write_index(storage: &dyn Storage, index: &IndexFile) -> Result<String, EngineError> {
    let key = format!("index/{}-{}", now_ms(), random_hex(8));
    storage.put_if_absent(&key, &index.encode())?;
    Ok(key)
}

/// Fills `buf` with the disk's bytes at `pos`, reading only data extents and
/// zeroing holes. Returns the bytes actually read.
fn fill_block(r: &dyn DiskReader, buf: &mut [u8], pos: u64) -> Result<u64, EngineError> {
    let end = pos + buf.len() as u64;
    let mut cur = pos;
    let mut read = 0;
    while cur < end {
        let (start, stop) = match r.next_data(cur)? {
            // An empty extent would never advance: read the rest instead.
            Some(e) if e.offset < end && e.len == 0 => (cur, end),
            Some(e) if e.offset < end => (e.offset.max(cur), (e.offset + e.len).min(end)),
            _ => (end, end),
        };
        buf[(cur - pos) as usize..(start - pos) as usize].fill(0);
        if stop > start {
            r.read_exact_at(
                &mut buf[(start - pos) as usize..(stop - pos) as usize],
                start,
            )?;
            read += stop - start;
        }
        cur = stop.max(start);
    }
    Ok(read)
}

/// Fills the chunks of `buf` (the disk's bytes at `pos`) that `reuse` does
/// not give (`None`), merging neighbours into one read. Returns the bytes
/// actually read.
fn fill_chunks(
    r: &dyn DiskReader,
    buf: &mut [u8],
    pos: u64,
    chunk_size: usize,
    reuse: &[Option<ChunkId>],
) -> Result<u64, EngineError> {
    let mut read = 0;
    let mut k = 0;
    while k < reuse.len() {
        if reuse[k].is_some() {
            k += 1;
            continue;
        }
        let first = k;
        while k < reuse.len() && reuse[k].is_none() {
            k += 1;
        }
        let (a, b) = (first * chunk_size, (k * chunk_size).min(buf.len()));
        read += fill_block(r, &mut buf[a..b], pos + a as u64)?;
    }
    Ok(read)
}

/// The writer thread's state: chunk lists and the open pack.
struct PackWriter<'a, 'b> {
    p: &'a Pipeline<'b>,
    packs: Sender<(PackId, Vec<u8>, Vec<PackEntry>)>,
    pack: PackBuilder,
    lists: Vec<Vec<ChunkId>>,
    /// The open list chunk of `current_disk`.
    current: Vec<ChunkId>,
    current_disk: usize,
    compressor: zstd::bulk::Compressor<'static>,
    out: WriterOut,
}

impl PackWriter<'_, '_> {
    fn take(&mut self, d: &Done) -> Result<(), EngineError> {
        if d.disk != self.current_disk {
            self.close_list()?;
            self.current_disk = d.disk;
        }
        let cs = self.p.chunk_size as u64;
        if d.chunks.is_empty() {
            for _ in 0..d.len.div_ceil(cs) {
                self.push(ChunkId::ZERO)?;
            }
            return Ok(());
        }
        let mut left = d.len;
        for c in &d.chunks {
            let this = left.min(cs);
            left -= this;
            match c {
                ChunkOut::Zero => self.push(ChunkId::ZERO)?,
                ChunkOut::Known(id) => {
                    self.out.chunks_total += 1;
                    self.out.data_bytes[d.disk] += this;
                    self.push(*id)?;
                }
                ChunkOut::New {
                    id,
                    start,
                    len,
                    raw_len,
                    flags,
                } => {
                    self.out.chunks_total += 1;
                    self.out.chunks_new += 1;
                    self.out.stored_bytes += *len as u64;
                    self.out.data_bytes[d.disk] += this;
                    self.pack
                        .add(*id, &d.payload[*start..*start + *len], *raw_len, *flags);
                    if self.pack.len() >= self.p.inner.options.pack_target {
                        self.flush_pack()?;
                    }
                    self.push(*id)?;
                }
            }
        }
        Ok(())
    }

    fn push(&mut self, id: ChunkId) -> Result<(), EngineError> {
        self.current.push(id);
        if self.current.len() >= self.p.inner.config.list_fanout as usize {
            self.close_list()?;
        }
        Ok(())
    }

    /// Stores the open list chunk (unless all zero) and records its id.
    fn close_list(&mut self) -> Result<(), EngineError> {
        if self.current.is_empty() {
            return Ok(());
        }
        let id = if self.current.iter().all(ChunkId::is_zero) {
            ChunkId::ZERO
        } else {
            let raw = encode_chunk_list(&self.current);
            let crypt = &self.p.inner.crypt;
            let id = crypt.chunk_id(&raw);
            if !self.p.index.has_for_dedup(&id) && self.p.claim(id) {
                let mut payload = Vec::new();
                let start = crypt.begin_chunk(&mut payload);
                let flags =
                    compress_into(&mut self.compressor, &mut Vec::new(), &raw, &mut payload);
                crypt.end_chunk(&mut payload, start, &id, raw.len() as u32, flags);
                self.out.stored_bytes += payload.len() as u64;
                self.pack.add(id, &payload, raw.len() as u32, flags);
            }
            id
        };
        self.lists[self.current_disk].push(id);
        self.current.clear();
        Ok(())
    }

    fn flush_pack(&mut self) -> Result<(), EngineError> {
        let next = match self.p.spare_packs.1.try_recv() {
            Ok(buf) => PackBuilder::with_buffer(buf),
            Err(_) => PackBuilder::new(self.p.inner.options.pack_target + BLOCK),
        };
        let pack = std::mem::replace(&mut self.pack, next);
        let id = PackId::random();
        let (bytes, entries) = pack.finish_as(&self.p.inner.crypt, Some(id));
        self.packs
            .send((id, bytes, entries))
            .map_err(|_| EngineError::Internal("the pack uploader stopped".into()))
    }
}
