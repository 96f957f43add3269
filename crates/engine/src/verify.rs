//! Verify: re-read and re-hash every chunk (list chunks included) of one
//! backup or of all, and report per backup what is missing or corrupt.
//! Each distinct chunk is read once even when many backups share it.

use crate::chunks::{self, ChunkFault};
use crate::format::{decode_chunk_list, ChunkId};
use crate::index::ChunkIndex;
use crate::{BackupVerification, EngineError, JobControl, RepoInner, VerifyReport};
use std::collections::{BTreeSet, HashMap};
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

struct Checker<'a> {
    inner: &'a RepoInner,
    index: &'a ChunkIndex,
    /// Verdicts so far: None = good.
    cache: HashMap<ChunkId, Option<ChunkFault>>,
    checked: u64,
}

impl Checker<'_> {
    /// Checks `ids` (in parallel, each distinct chunk once); returns the bad ones.
    fn check(&mut self, ids: &[ChunkId]) -> Result<Vec<(ChunkId, ChunkFault)>, EngineError> {
        let mut todo: Vec<ChunkId> = ids
            .iter()
            .filter(|id| !id.is_zero() && !self.cache.contains_key(id))
            .copied()
            .collect();
        todo.sort_unstable();
        todo.dedup();
        let workers = self.inner.options.workers.max(1);
        let results = Mutex::new(Vec::with_capacity(todo.len()));
        let per = todo.len().div_ceil(workers).max(1);
        let (inner, index) = (self.inner, self.index);
        std::thread::scope(|s| -> Result<(), EngineError> {
            let hs: Vec<_> = todo
                .chunks(per)
                .map(|part| {
                    let results = &results;
                    s.spawn(move || -> Result<(), EngineError> {
                        for id in part {
                            let verdict = chunks::fetch(&*inner.storage, index, id)?.err();
                            results.lock().expect("results lock").push((*id, verdict));
                        }
                        Ok(())
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
