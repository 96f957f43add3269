//! Verify: re-read and re-hash every chunk (list chunks included) of one
//! backup or of all, and report per backup what is missing or corrupt.
//! Each distinct chunk is read once even when many backups share it.

use crate::chunks::{self, ChunkFault};
use crate::format::{decode_chunk_list, ChunkId};
use crate::index::ChunkIndex;
use crate::index::Location;
use crate::{BackupVerification, EngineError, JobControl, RepoInner, VerifyReport};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

pub(crate) fn run(
    inner: &RepoInner,
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
    let _guard = crate::fence::WriterGuard::register(inner, "verify")?;
    let index = ChunkIndex::load(&*inner.storage, &Default::default())?;
    let mut checker = Checker {
        inner,
        index: &index,
        cache: HashMap::new(),
        checked: 0,
    };
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
        let mut v = BackupVerification {
            backup_id: id.clone(),
            ..Default::default()
        };
        let m = match m {
            Ok(m) => m,
            // Deleted since the listing: nothing to verify.
            Err(EngineError::BackupNotFound(_)) if backup_id.is_none() => continue,
            Err(e) => {
                v.manifest_error = Some(e.to_string());
                report.backups.push(v);
                continue;
            }
        };
        let (mut missing, mut corrupt) = (BTreeSet::new(), BTreeSet::new());
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
                let raw = match chunks::fetch(&*inner.storage, &index, list_id)? {
                    Ok(raw) => raw,
                    Err(f) => {
                        checker.cache.insert(*list_id, Some(f.clone()));
                        record(*list_id, &f, &mut missing, &mut corrupt);
                        job.add_done(span);
                        continue;
                    }
                };
                checker.checked += 1;
                let Some(ids) = decode_chunk_list(&raw) else {
                    corrupt.insert(list_id.to_hex());
                    continue;
                };
                for (cid, fault) in checker.check(&ids)? {
                    record(cid, &fault, &mut missing, &mut corrupt);
                }
                job.add_done(span);
            }
        }
        v.missing_chunks = missing.into_iter().collect();
        v.corrupt_chunks = corrupt.into_iter().collect();
        report.backups.push(v);
    }
    report.chunks_checked = checker.checked;
    Ok(report)
}

fn record(
    id: ChunkId,
    f: &ChunkFault,
    missing: &mut BTreeSet<String>,
    corrupt: &mut BTreeSet<String>,
) {
    match f {
        ChunkFault::Missing => missing.insert(id.to_hex()),
        ChunkFault::Corrupt(_) => corrupt.insert(id.to_hex()),
    };
}

/// Largest ranged read when checking neighbouring chunks.
const GROUP_BYTES: usize = 4 << 20;

struct Checker<'a> {
    inner: &'a RepoInner,
    index: &'a ChunkIndex,
    /// Verdicts so far: None = good.
    cache: HashMap<ChunkId, Option<ChunkFault>>,
    checked: u64,
}

impl Checker<'_> {
    /// Checks `ids` (in parallel, each distinct chunk once, reading runs of
    /// neighbours in a pack with one ranged read); returns the bad ones.
    fn check(&mut self, ids: &[ChunkId]) -> Result<Vec<(ChunkId, ChunkFault)>, EngineError> {
        let mut todo: Vec<Location> = Vec::new();
        let mut verdicts: Vec<(ChunkId, Option<ChunkFault>)> = Vec::new();
        let mut seen = HashSet::new();
        for id in ids {
            if id.is_zero() || self.cache.contains_key(id) || !seen.insert(*id) {
                continue;
            }
            match self.index.locations(id).into_iter().next() {
                Some(loc) => todo.push(loc),
                None => verdicts.push((*id, Some(ChunkFault::Missing))),
            }
        }
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
        let results = Mutex::new(verdicts);
        let (inner, index) = (self.inner, self.index);
        std::thread::scope(|s| -> Result<(), EngineError> {
            let hs: Vec<_> = (0..workers)
                .map(|_| {
                    let (results, next, groups) = (&results, &next, &groups);
                    s.spawn(move || -> Result<(), EngineError> {
                        let mut dec = zstd::bulk::Decompressor::new()
                            .map_err(|e| EngineError::Internal(format!("zstd: {e}")))?;
                        let mut buf = Vec::new();
                        loop {
                            let g = next.fetch_add(1, Ordering::Relaxed);
                            let Some(group) = groups.get(g) else {
                                return Ok(());
                            };
                            let base = group[0].entry.offset as u64;
                            let last = group[group.len() - 1].entry;
                            let len = last.offset as u64 + last.stored_len as u64 - base;
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
                                    chunks::decode_with(Some(&mut dec), loc, bytes).is_ok()
                                });
                                // A bad first copy: the slow path tries every copy and
                                // tells missing from corrupt.
                                let verdict = if good {
                                    None
                                } else {
                                    chunks::fetch(&*inner.storage, index, &loc.entry.id)?.err()
                                };
                                out.push((loc.entry.id, verdict));
                            }
                            results.lock().expect("results lock").extend(out);
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
        for (id, verdict) in results.into_inner().expect("results lock") {
            self.checked += 1;
            self.cache.insert(id, verdict);
        }
        Ok(ids
            .iter()
            .filter_map(|id| match self.cache.get(id) {
                Some(Some(f)) => Some((*id, f.clone())),
                _ => None,
            })
            .collect())
    }
}
