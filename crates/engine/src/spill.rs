//! Sorting more fixed-size records than memory should hold (an external
//! sort), for GC and verify: records are gathered in a buffer of a bounded
//! size; a full buffer is sorted and written to an unnamed temporary file
//! (a run); at the end the runs are merged with a heap, one small read
//! buffer per run. When [`FAN_IN`] runs pile up they are merged into one,
//! so the open files stay few however many records come.
//!
//! Memory: the buffer (`run_bytes`, [`crate::EngineOptions::spill_run_bytes`])
//! while gathering; 64 KiB per run while merging. The files are unnamed
//! (`O_TMPFILE`), so they vanish with the process, even after a crash.
//!
//! Chosen over a crate (extsort, ext-sort): those serialise every record
//! through serde or a codec trait and name their files; fixed records
//! copied as bytes keep this small and fast.

use crate::format::{ChunkId, PackEntry, PackId};
use crate::index::Location;
use crate::EngineError;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// More runs than this are merged into one before more are written.
const FAN_IN: usize = 64;
/// Read buffer per run while merging.
const READ_BUF: usize = 64 << 10;

/// A record of `LEN` bytes, sorted by its `Ord`.
pub(crate) trait Record: Ord + Copy {
    const LEN: usize;
    fn put(&self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
}

impl Record for ChunkId {
    const LEN: usize = 32;
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }
    fn get(b: &[u8]) -> Self {
        ChunkId(b.try_into().expect("32 bytes"))
    }
}

fn put_location(l: &Location, out: &mut Vec<u8>) {
    out.extend_from_slice(&l.pack.0);
    out.extend_from_slice(&l.entry.id.0);
    for v in [
        l.entry.offset,
        l.entry.stored_len,
        l.entry.raw_len,
        l.entry.flags,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn get_location(b: &[u8]) -> Location {
    let u = |i: usize| u32::from_le_bytes(b[48 + i * 4..52 + i * 4].try_into().expect("4"));
    Location {
        pack: PackId(b[..16].try_into().expect("16 bytes")),
        entry: PackEntry {
            id: ChunkId(b[16..48].try_into().expect("32 bytes")),
            offset: u(0),
            stored_len: u(1),
            raw_len: u(2),
            flags: u(3),
        },
    }
}

/// A chunk copy ordered by (pack, offset): a pack's copies in the order
/// they sit in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ByPackOffset(pub Location);

impl Ord for ByPackOffset {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        let (a, b) = (&self.0, &o.0);
        (a.pack, a.entry.offset, a.entry.id).cmp(&(b.pack, b.entry.offset, b.entry.id))
    }
}

impl PartialOrd for ByPackOffset {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Record for ByPackOffset {
    const LEN: usize = 64;
    fn put(&self, out: &mut Vec<u8>) {
        put_location(&self.0, out)
    }
    fn get(b: &[u8]) -> Self {
        ByPackOffset(get_location(b))
    }
}

/// A chunk copy ordered by (pack, chunk id): an index object's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ByPackId(pub Location);

impl Ord for ByPackId {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        let (a, b) = (&self.0, &o.0);
        (a.pack, a.entry.id, a.entry.offset).cmp(&(b.pack, b.entry.id, b.entry.offset))
    }
}

impl PartialOrd for ByPackId {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Record for ByPackId {
    const LEN: usize = 64;
    fn put(&self, out: &mut Vec<u8>) {
        put_location(&self.0, out)
    }
    fn get(b: &[u8]) -> Self {
        ByPackId(get_location(b))
    }
}

fn spill_error(dir: &Path, e: std::io::Error) -> EngineError {
    EngineError::Internal(format!(
        "the temporary sort files in {} cannot be used: {e}",
        dir.display()
    ))
}

/// Gathers records and hands them back sorted (and, if asked, without
/// repeats).
pub(crate) struct Sorter<T: Record> {
    dir: PathBuf,
    run_len: usize,
    dedup: bool,
    buf: Vec<T>,
    /// (file, records).
    runs: Vec<(File, u64)>,
    pushed: u64,
    spilled_runs: usize,
}

impl<T: Record> Sorter<T> {
    /// Runs of at most `run_bytes` of records go to unnamed files in `dir`.
    pub(crate) fn new(dir: &Path, run_bytes: usize, dedup: bool) -> Self {
        Sorter {
            dir: dir.to_owned(),
            run_len: (run_bytes / std::mem::size_of::<T>()).max(1),
            dedup,
            buf: Vec::new(),
            runs: Vec::new(),
            pushed: 0,
            spilled_runs: 0,
        }
    }

    pub(crate) fn push(&mut self, t: T) -> Result<(), EngineError> {
        if self.buf.capacity() == 0 {
            // Never more than one run's worth: the buffer must not double past its bound.
            self.buf.reserve_exact(self.run_len.min(1 << 16));
        }
        if self.buf.len() == self.buf.capacity() && self.buf.len() < self.run_len {
            let want = (self.buf.len() * 2).min(self.run_len);
            self.buf.reserve_exact(want - self.buf.len());
        }
        self.buf.push(t);
        self.pushed += 1;
        if self.buf.len() >= self.run_len {
            self.spill().map_err(|e| spill_error(&self.dir, e))?;
        }
        Ok(())
    }

    /// Records pushed so far (repeats included).
    pub(crate) fn pushed(&self) -> u64 {
        self.pushed
    }

    fn sort_buf(&mut self) {
        self.buf.sort_unstable();
        if self.dedup {
            self.buf.dedup();
        }
    }

    fn spill(&mut self) -> std::io::Result<()> {
        if self.runs.len() >= FAN_IN {
            let runs = std::mem::take(&mut self.runs);
            let merged = Merge::open(runs, self.dedup)?;
            let run = self.write_run(merged)?;
            self.runs.push(run);
        }
        self.sort_buf();
        let buf = std::mem::take(&mut self.buf);
        let run = self.write_run(buf.iter().map(|t| Ok(*t)))?;
        self.runs.push(run);
        // Reused for the next run.
        self.buf = buf;
        self.buf.clear();
        Ok(())
    }

    fn write_run(
        &mut self,
        records: impl Iterator<Item = std::io::Result<T>>,
    ) -> std::io::Result<(File, u64)> {
        let mut out = BufWriter::with_capacity(READ_BUF, tempfile::tempfile_in(&self.dir)?);
        let mut rec = Vec::with_capacity(T::LEN);
        let mut n = 0u64;
        for t in records {
            rec.clear();
            t?.put(&mut rec);
            out.write_all(&rec)?;
            n += 1;
        }
        let mut file = out.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(0))?;
        self.spilled_runs += 1;
        Ok((file, n))
    }

    /// Every record pushed, in order.
    pub(crate) fn finish(mut self) -> Result<Sorted<T>, EngineError> {
        if self.runs.is_empty() {
            self.sort_buf();
            return Ok(Sorted {
                inner: SortedInner::Memory(std::mem::take(&mut self.buf).into_iter()),
                dir: self.dir,
                runs_written: 0,
            });
        }
        if !self.buf.is_empty() {
            self.spill().map_err(|e| spill_error(&self.dir, e))?;
        }
        self.buf = Vec::new();
        let merge = Merge::open(std::mem::take(&mut self.runs), self.dedup)
            .map_err(|e| spill_error(&self.dir, e))?;
        Ok(Sorted {
            inner: SortedInner::Merge(merge),
            dir: self.dir,
            runs_written: self.spilled_runs,
        })
    }
}

impl<T: Record> Sorter<T> {
    /// Every record pushed, in order, as often as wanted: kept in memory
    /// when they fitted, else merged once into one file read back with
    /// positioned reads.
    pub(crate) fn finish_rewindable(self) -> Result<Rewindable<T>, EngineError> {
        let dir = self.dir.clone();
        let mut sorted = self.finish()?;
        let mut runs_written = sorted.runs_written;
        let inner = match std::mem::replace(
            &mut sorted.inner,
            SortedInner::Memory(Vec::new().into_iter()),
        ) {
            SortedInner::Memory(it) => RewindInner::Memory(it.collect()),
            SortedInner::Merge(merge) => {
                let mut out = BufWriter::with_capacity(
                    READ_BUF,
                    tempfile::tempfile_in(&dir).map_err(|e| spill_error(&dir, e))?,
                );
                let mut rec = Vec::with_capacity(T::LEN);
                let mut n = 0u64;
                for t in merge {
                    rec.clear();
                    t.map_err(|e| spill_error(&dir, e))?.put(&mut rec);
                    out.write_all(&rec).map_err(|e| spill_error(&dir, e))?;
                    n += 1;
                }
                let file = out
                    .into_inner()
                    .map_err(|e| spill_error(&dir, e.into_error()))?;
                runs_written += 1;
                RewindInner::File(file, n)
            }
        };
        Ok(Rewindable {
            inner,
            dir,
            runs_written,
        })
    }
}

/// See [`Sorter::finish_rewindable`].
pub(crate) struct Rewindable<T: Record> {
    inner: RewindInner<T>,
    dir: PathBuf,
    runs_written: usize,
}

enum RewindInner<T> {
    Memory(Vec<T>),
    File(File, u64),
}

impl<T: Record> Rewindable<T> {
    pub(crate) fn runs_written(&self) -> usize {
        self.runs_written
    }

    /// The records from the first.
    pub(crate) fn iter(&self) -> Box<dyn Iterator<Item = Result<T, EngineError>> + '_> {
        match &self.inner {
            RewindInner::Memory(v) => Box::new(v.iter().map(|t| Ok(*t))),
            RewindInner::File(file, n) => {
                let mut buf = Vec::new();
                let (mut at, mut pos, mut left) = (0usize, 0u64, *n);
                let mut failed = false;
                Box::new(std::iter::from_fn(move || {
                    use std::os::unix::fs::FileExt;
                    if failed {
                        return None;
                    }
                    if at == buf.len() {
                        if left == 0 {
                            return None;
                        }
                        let recs = left.min((READ_BUF / T::LEN) as u64);
                        buf.resize(recs as usize * T::LEN, 0);
                        if let Err(e) = file.read_exact_at(&mut buf, pos) {
                            failed = true;
                            return Some(Err(spill_error(&self.dir, e)));
                        }
                        pos += buf.len() as u64;
                        left -= recs;
                        at = 0;
                    }
                    let t = T::get(&buf[at..at + T::LEN]);
                    at += T::LEN;
                    Some(Ok(t))
                }))
            }
        }
    }
}

/// The sorted records of a [`Sorter`]; an error ends the walk.
pub(crate) struct Sorted<T: Record> {
    inner: SortedInner<T>,
    dir: PathBuf,
    runs_written: usize,
}

impl<T: Record> Sorted<T> {
    /// Runs the sort wrote to disk (merges of runs included); 0 when the
    /// records fitted in memory.
    pub(crate) fn runs_written(&self) -> usize {
        self.runs_written
    }
}

enum SortedInner<T: Record> {
    Memory(std::vec::IntoIter<T>),
    Merge(Merge<T>),
}

impl<T: Record> Iterator for Sorted<T> {
    type Item = Result<T, EngineError>;
    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.inner {
            SortedInner::Memory(it) => it.next().map(Ok),
            SortedInner::Merge(m) => m.next().map(|r| r.map_err(|e| spill_error(&self.dir, e))),
        }
    }
}

/// A k-way merge of sorted runs.
struct Merge<T: Record> {
    readers: Vec<(BufReader<File>, u64)>,
    heap: BinaryHeap<Reverse<(T, usize)>>,
    dedup: bool,
    last: Option<T>,
    rec: Vec<u8>,
    failed: bool,
}

impl<T: Record> Merge<T> {
    fn open(runs: Vec<(File, u64)>, dedup: bool) -> std::io::Result<Self> {
        let mut m = Merge {
            readers: runs
                .into_iter()
                .map(|(f, n)| (BufReader::with_capacity(READ_BUF, f), n))
                .collect(),
            heap: BinaryHeap::new(),
            dedup,
            last: None,
            rec: vec![0; T::LEN],
            failed: false,
        };
        for i in 0..m.readers.len() {
            if let Some(t) = m.read(i)? {
                m.heap.push(Reverse((t, i)));
            }
        }
        Ok(m)
    }

    fn read(&mut self, i: usize) -> std::io::Result<Option<T>> {
        let (r, left) = &mut self.readers[i];
        if *left == 0 {
            return Ok(None);
        }
        r.read_exact(&mut self.rec)?;
        *left -= 1;
        Ok(Some(T::get(&self.rec)))
    }

    fn step(&mut self) -> std::io::Result<Option<T>> {
        loop {
            let Some(Reverse((t, i))) = self.heap.pop() else {
                return Ok(None);
            };
            if let Some(next) = self.read(i)? {
                self.heap.push(Reverse((next, i)));
            }
            if self.dedup && self.last == Some(t) {
                continue;
            }
            self.last = Some(t);
            return Ok(Some(t));
        }
    }
}

impl<T: Record> Iterator for Merge<T> {
    type Item = std::io::Result<T>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.step() {
            Ok(t) => t.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize, distinct: usize) -> Vec<ChunkId> {
        (0..n)
            .map(|i| ChunkId::of(&((i % distinct) as u64).to_le_bytes()))
            .collect()
    }

    fn sorted(
        dir: &Path,
        run_bytes: usize,
        dedup: bool,
        input: &[ChunkId],
    ) -> (Vec<ChunkId>, usize) {
        let mut s = Sorter::new(dir, run_bytes, dedup);
        for id in input {
            s.push(*id).unwrap();
        }
        assert_eq!(s.pushed(), input.len() as u64);
        let sorted = s.finish().unwrap();
        let runs = sorted.runs_written();
        (sorted.map(Result::unwrap).collect(), runs)
    }

    #[test]
    fn spilled_runs_merge_to_the_same_order_as_an_in_memory_sort() {
        let dir = tempfile::tempdir().unwrap();
        let input = ids(20_000, 7_000);
        let mut want = input.clone();
        want.sort();
        let (all, runs) = sorted(dir.path(), 32 * 100, false, &input);
        assert!(runs > FAN_IN, "enough runs to merge some early: {runs}");
        assert_eq!(all, want);
        want.dedup();
        let (distinct, _) = sorted(dir.path(), 32 * 100, true, &input);
        assert_eq!(distinct, want, "repeats across runs are dropped");
        let (memory, runs) = sorted(dir.path(), 1 << 30, true, &input);
        assert_eq!(runs, 0, "small inputs never touch the disk");
        assert_eq!(memory, want);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "runs are unnamed files"
        );
    }

    #[test]
    fn a_rewindable_sort_reads_the_same_twice() {
        let dir = tempfile::tempdir().unwrap();
        let input = ids(5_000, 3_000);
        let mut want = input.clone();
        want.sort();
        want.dedup();
        for run_bytes in [32 * 100, 1 << 30] {
            let mut s = Sorter::new(dir.path(), run_bytes, true);
            for id in &input {
                s.push(*id).unwrap();
            }
            let r = s.finish_rewindable().unwrap();
            assert_eq!(r.runs_written() > 0, run_bytes < 1 << 20);
            for _ in 0..2 {
                let got: Vec<ChunkId> = r.iter().map(Result::unwrap).collect();
                assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn locations_round_trip_and_sort_by_pack() {
        let dir = tempfile::tempdir().unwrap();
        let locs: Vec<Location> = (0..500u32)
            .map(|i| Location {
                pack: PackId([(i % 5) as u8; 16]),
                entry: PackEntry {
                    id: ChunkId::of(&i.to_le_bytes()),
                    offset: 1000 - i,
                    stored_len: i,
                    raw_len: i + 1,
                    flags: i % 2,
                },
            })
            .collect();
        let mut s = Sorter::new(dir.path(), 64 * 30, false);
        for l in &locs {
            s.push(ByPackOffset(*l)).unwrap();
        }
        let out: Vec<Location> = s.finish().unwrap().map(|r| r.unwrap().0).collect();
        let mut want = locs.clone();
        want.sort_by_key(|l| (l.pack, l.entry.offset));
        assert_eq!(out, want);
    }
}
