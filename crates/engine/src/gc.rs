//! Garbage collection without a global lock.
//!
//! 1. Fence: nothing newer than min(GC start - grace, oldest live writer's
//!    start) is touched, so packs of running backups are safe.
//! 2. Mark: every chunk (and chunk list) any manifest references is live;
//!    each live chunk gets one canonical copy, preferring packs not already
//!    condemned.
//! 3. Packs older than the fence with no canonical live chunk are dead;
//!    those with little live data are repacked (live chunks copied into new
//!    packs, indexed) and then dead too.
//! 4. Dead packs are condemned in `pending/` first: writers that start
//!    after that no longer dedup against them. A condemned pack is deleted
//!    only when no writer that started before its condemnation still runs,
//!    and after re-reading manifests that appeared meanwhile (a writer that
//!    finished may reference it). Otherwise a later GC deletes it.
//! 5. The index objects read are consolidated into as few as possible
//!    (4096 packs or 512 Ki entries each) without the deleted packs (written before the old
//!    ones are removed).
//!
//! A damaged manifest, chunk list or index object stops GC: it cannot know
//! what that backup references (or where an unindexed pack's chunks are
//! needed), so it deletes nothing.
//!
//! Memory does not grow with the number of chunks (see [`crate::spill`]):
//! the index is read through the node's on-disk cache (a private one in a
//! temporary directory when none is configured), walked in chunk id
//! order; the live chunk ids go through sorted runs on disk and are
//! walked beside it (a merge join), which gives each pack its live bytes
//! and each live chunk its canonical copy. What stays in memory is per
//! pack (sizes, live bytes, condemnations), one pack's chunks while
//! repacking, and one consolidated index object (at most
//! [`CONSOLIDATED_PACKS`] packs or [`CONSOLIDATED_ENTRIES`] entries) at a time. A block of the cache that
//! cannot be read stops GC (never a record taken for absent).
//!
//! Quarantine (see [`crate::quarantine`]): a quarantined copy is no live
//! copy. A live chunk's canonical copy is a good one when one exists (its
//! quarantined copies may then go with their packs); only a chunk with no
//! good copy left keeps its quarantined one. Copies GC itself finds bad
//! (reading chunk lists, repacking) are quarantined, and the records are
//! consolidated into one without the copies whose pack no longer exists.

use crate::backup::write_index;
use crate::chunks::{self, ChunkFault};
use crate::fence::{live_writers, load_pending, write_pending};
use crate::format::{
    decode_chunk_list, now_ms, ChunkId, IndexFile, PackBuilder, PackEntry, PackId,
};
use crate::index::{ChunkIndex, Location};
use crate::index_cache::BoundedIndex;
use crate::spill::{ByPackId, ByPackOffset, Sorter};
use crate::storage::ObjectMeta;
use crate::{EngineError, GcReport, RepoInner};
use std::collections::{HashMap, HashSet};
use std::time::UNIX_EPOCH;

/// Packs per index object GC's consolidation writes.
const CONSOLIDATED_PACKS: usize = 4096;
/// Index entries past which GC starts another index object (at a pack's
/// end): 512 Ki entries are 24 MiB held (and about as much encoded),
/// whatever the packs hold.
const CONSOLIDATED_ENTRIES: usize = 1 << 19;

/// See where `tc` is taken.
const CONDEMN_MARGIN_MS: u64 = 10_000;

pub(crate) fn run(inner: &RepoInner) -> Result<GcReport, EngineError> {
    let storage = &*inner.storage;
    let opts = &inner.options;
    let _turn = crate::fence::claim_gc_turn(inner)?;
    let _lock = crate::fence::WriterGuard::lock_gc(inner)?;
    // Test hook: processes racing for the lock (tests/s3_gc_lock.rs) must
    // overlap, whatever the machine's speed. Unset in production.
    if let Some(ms) = std::env::var("VPSBACKUP_TEST_GC_HOLD_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let mut report = GcReport::default();
    let t0 = now_ms();
    storage.remove_stale_temp(opts.gc_grace.max(opts.writer_stale_after))?;

    let writers = live_writers(inner)?;
    let fence = writers
        .iter()
        .copied()
        .chain(std::iter::once(
            t0.saturating_sub(opts.gc_grace.as_millis() as u64),
        ))
        .min()
        .unwrap_or(0);

    let (mut condemned, pending_keys) = load_pending(storage)?;
    let source = inner.bounded_index()?;
    let spill_dir = source.spill_dir();
    let run_bytes = opts.spill_run_bytes;
    let index = source.load(storage, &condemned.keys().copied().collect())?;
    if let Some((key, why)) = index.damaged_sources.first() {
        // Its packs would look unindexed, hence dead.
        return Err(EngineError::InvalidRequest(format!(
            "garbage collection stopped without deleting anything: index object {key} is damaged ({why}); rebuild the index from the packs first (vpsbackup store rebuild-index)"
        )));
    }
    let mut found_bad = Vec::new();
    // Per pack its size and age only (not its key): a few tens of bytes each.
    let packs: HashMap<PackId, PackMeta> = storage
        .list("packs/")?
        .into_iter()
        .filter_map(|m| {
            PackId::from_key(&m.key).map(|p| {
                (
                    p,
                    PackMeta {
                        size: m.size,
                        ms: ms_of(&m),
                    },
                )
            })
        })
        .collect();

    let mut live = Sorter::new(spill_dir, run_bytes, true);
    let marked = mark(inner, &source, &index, None, &mut live, &mut found_bad);
    // Quarantined even when a damaged backup stops this GC.
    record_found(storage, &index, std::mem::take(&mut found_bad))?;
    let manifests_seen = marked?;

    // One walk of the index in id order beside the sorted live ids gives
    // the canonical copy of each live chunk and the bytes per pack.
    // Canonical: a good copy before a quarantined one; then, among copies
    // in packs not condemned, the newest pack's: after a GC killed
    // between writing a repacked pack (and its index) and condemning the
    // old one, the copies are in both, and choosing the new one for every
    // chunk leaves the old pack whole dead, so this run finishes the work
    // (a mixed choice would keep both alive, or repack again).
    let quarantined = &index.quarantine.copies;
    let condemned_at_mark: HashSet<PackId> = condemned.keys().copied().collect();
    let choose = |copies: &[Location]| -> Option<Location> {
        copies
            .iter()
            .filter(|l| packs.contains_key(&l.pack))
            .max_by_key(|l| {
                (
                    quarantined.is_empty() || !quarantined.contains(&(l.entry.id, l.pack)),
                    !condemned_at_mark.contains(&l.pack),
                    packs[&l.pack].ms,
                    l.pack,
                )
            })
            .copied()
    };
    let live = live.finish_rewindable()?;
    report.sort_runs += live.runs_written() as u64;
    let mut live_bytes: HashMap<PackId, u64> = HashMap::new();
    let mut pack_bytes: HashMap<PackId, u64> = HashMap::new();
    // Index entries per pack whose chunk is not live (the report's
    // `chunks_removed` for the packs deleted).
    let mut unlive_entries: HashMap<PackId, u64> = HashMap::new();
    join(index.sorted(), live.iter(), |copies, is_live| {
        for l in copies {
            *pack_bytes.entry(l.pack).or_default() += l.entry.stored_len as u64;
            if !is_live {
                *unlive_entries.entry(l.pack).or_default() += 1;
            }
        }
        if let Some(loc) = is_live.then(|| choose(copies)).flatten() {
            *live_bytes.entry(loc.pack).or_default() += loc.entry.stored_len as u64;
        }
        Ok(())
    })?;

    // Previously condemned packs that are live again (a writer that started
    // before the condemnation used them) are dropped from the list. Packs
    // that are gone but still named by an index object (a GC stopped between
    // deleting them and consolidating the index) stay condemned until this
    // run's consolidation drops their entries, so no writer dedups against them.
    let indexed_missing: HashSet<PackId> = pack_bytes
        .keys()
        .filter(|p| !packs.contains_key(p))
        .copied()
        .collect();
    condemned.retain(|p, _| packs.contains_key(p) && !live_bytes.contains_key(p));
    for p in &indexed_missing {
        condemned.entry(*p).or_insert(0);
    }

    let mut to_repack = HashSet::new();
    for (pack, meta) in &packs {
        if meta.ms >= fence || condemned.contains_key(pack) {
            continue;
        }
        let live = live_bytes.get(pack).copied().unwrap_or(0);
        if live == 0 {
            condemned.insert(*pack, 0);
        } else if (live as f64) < opts.repack_below * pack_bytes[pack] as f64 {
            to_repack.insert(*pack);
        }
    }

    // The index as consolidated at the end: the copies repack writes go
    // in as they are written, the old index's at the end.
    let mut consolidated = Sorter::new(spill_dir, run_bytes, true);
    let repacked = if to_repack.is_empty() {
        Ok(Repacked::default())
    } else {
        // A second walk takes the canonical copies in the packs to repack
        // (the same choice: `condemned_at_mark`), ordered by pack.
        let mut canonical = Sorter::new(spill_dir, run_bytes, false);
        join(
            index.sorted(),
            live.iter(),
            |copies, is_live| match choose(copies)
                .filter(|l| is_live && to_repack.contains(&l.pack))
            {
                Some(loc) => canonical.push(ByPackOffset(loc)),
                None => Ok(()),
            },
        )?;
        let canonical = canonical.finish()?;
        report.sort_runs += canonical.runs_written() as u64;
        repack(
            inner,
            canonical,
            &to_repack,
            &mut consolidated,
            &mut report,
            &mut found_bad,
        )
    };
    drop(live);
    record_found(storage, &index, found_bad)?;
    let repacked = repacked?;
    for p in &repacked.old {
        condemned.insert(*p, 0);
    }

    // Condemn, then look at the writers: one that started before this
    // point may have loaded an index offering these packs for dedup.
    // `since` must not be earlier than the moment the pending object becomes
    // visible, or a writer starting in between could be taken for a newer
    // one that saw it: the margin covers the time the put takes.
    let tc = now_ms() + CONDEMN_MARGIN_MS;
    for since in condemned.values_mut() {
        if *since == 0 {
            *since = tc;
        }
    }
    let mut step_pending = None;
    if !condemned.is_empty() {
        step_pending = Some(write_pending(storage, &condemned)?);
    }
    for k in &pending_keys {
        storage.delete(k)?;
    }
    let writers = live_writers(inner)?;
    let mut deletable: HashSet<PackId> = condemned
        .iter()
        .filter(|(p, since)| packs.contains_key(p) && writers.iter().all(|w| w > since))
        .map(|(p, _)| *p)
        .collect();

    // Backups finished since the mark may reference condemned packs.
    let mut late = Sorter::new(spill_dir, run_bytes, true);
    mark(
        inner,
        &source,
        &index,
        Some(&manifests_seen),
        &mut late,
        &mut Vec::new(),
    )?;
    if late.pushed() > 0 && !deletable.is_empty() {
        let late = late.finish()?;
        report.sort_runs += late.runs_written() as u64;
        join(index.sorted(), late, |copies, is_late| {
            if !is_late {
                return Ok(());
            }
            let locs: Vec<&Location> = copies
                .iter()
                .filter(|l| packs.contains_key(&l.pack) || repacked.new.contains(&l.pack))
                .collect();
            if !locs.is_empty() && locs.iter().all(|l| deletable.contains(&l.pack)) {
                for l in locs {
                    deletable.remove(&l.pack);
                }
            }
            Ok(())
        })?;
    }

    for pack in &deletable {
        storage.delete(&pack.key())?;
        report.packs_deleted += 1;
        report.bytes_freed += packs[pack].size;
        condemned.remove(pack);
    }
    report.chunks_removed = deletable.iter().filter_map(|p| unlive_entries.get(p)).sum();
    report.bytes_freed = report.bytes_freed.saturating_sub(repacked.bytes_written);
    report.packs_pending = condemned
        .keys()
        .filter(|p| !indexed_missing.contains(p))
        .count() as u64;

    // Consolidate the index objects read into few, without deleted packs.
    let mut sources = index.sources.clone();
    sources.extend(repacked.index_keys.iter().cloned());
    if !deletable.is_empty() || sources.len() > 1 || !indexed_missing.is_empty() {
        for loc in index.sorted() {
            let loc = loc?;
            if packs.contains_key(&loc.pack) && !deletable.contains(&loc.pack) {
                consolidated.push(ByPackId(loc))?;
            }
        }
        // In objects of at most CONSOLIDATED_PACKS packs or
        // CONSOLIDATED_ENTRIES entries (and one pack more): a reader (a
        // node's index cache catching up) never has to hold a whole large
        // store's index as one object, nor GC more than one such object.
        let mut file = IndexFile::default();
        let mut in_file = 0usize;
        let mut last: Option<(PackId, ChunkId)> = None;
        let consolidated = consolidated.finish()?;
        report.sort_runs += consolidated.runs_written() as u64;
        for loc in consolidated {
            let loc = loc?.0;
            if last == Some((loc.pack, loc.entry.id)) {
                continue;
            }
            last = Some((loc.pack, loc.entry.id));
            match file.packs.last_mut() {
                Some((p, entries)) if *p == loc.pack => entries.push(loc.entry),
                _ => {
                    if index_full(&file, in_file) {
                        write_index(storage, &file)?;
                        file.packs.clear();
                        in_file = 0;
                    }
                    file.packs.push((loc.pack, vec![loc.entry]));
                }
            }
            in_file += 1;
        }
        if !file.packs.is_empty() {
            write_index(storage, &file)?;
        }
        for k in &sources {
            storage.delete(k)?;
        }
    }

    consolidate_quarantine(storage, &index.quarantine, |p| {
        packs.contains_key(p) && !deletable.contains(p)
    })?;

    // Their entries are gone from the index now.
    condemned.retain(|p, _| !indexed_missing.contains(p));
    if let Some(k) = step_pending {
        if !condemned.is_empty() {
            write_pending(storage, &condemned)?;
        }
        storage.delete(&k)?;
    }
    Ok(report)
}

fn record_found(
    storage: &dyn crate::storage::Storage,
    index: &ChunkIndex,
    bad: Vec<(Location, ChunkFault)>,
) -> Result<(), EngineError> {
    let mut found = crate::quarantine::Found::default();
    found.add(storage, index, bad)?;
    crate::quarantine::record(storage, "gc", &found.copies)?;
    Ok(())
}

/// Replaces the quarantine records read at the start with one holding
/// their copies whose pack still exists; damaged records go too (a verify
/// finds their copies again). Records written meanwhile are not touched.
fn consolidate_quarantine(
    storage: &dyn crate::storage::Storage,
    q: &crate::quarantine::Quarantine,
    pack_exists: impl Fn(&PackId) -> bool,
) -> Result<(), EngineError> {
    let total: usize = q.records.iter().map(|(_, r)| r.copies.len()).sum();
    let mut seen = HashSet::new();
    let kept: Vec<_> = q
        .records
        .iter()
        .flat_map(|(_, r)| r.copies.iter())
        .filter(|c| {
            crate::quarantine::parse_copy(c)
                .is_some_and(|(chunk, pack)| pack_exists(&pack) && seen.insert((chunk, pack)))
        })
        .cloned()
        .collect();
    if q.records.len() <= 1 && kept.len() == total && q.unreadable.is_empty() {
        return Ok(());
    }
    if !kept.is_empty() {
        crate::quarantine::write(
            storage,
            &crate::format::QuarantineRecord {
                found_by: "gc".into(),
                found_at_ms: now_ms(),
                copies: kept,
            },
        )?;
    }
    for key in q
        .records
        .iter()
        .map(|(k, _)| k)
        .chain(q.unreadable.iter().map(|(k, _)| k))
    {
        storage.delete(key)?;
    }
    Ok(())
}

/// Whether an index object being written holds enough to be stored.
fn index_full(file: &IndexFile, entries: usize) -> bool {
    file.packs.len() >= CONSOLIDATED_PACKS || entries >= CONSOLIDATED_ENTRIES
}

/// What GC needs of a listed pack.
struct PackMeta {
    size: u64,
    /// Modification time, ms since the epoch.
    ms: u64,
}

fn ms_of(meta: &ObjectMeta) -> u64 {
    meta.modified
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Walks the index (in chunk id order) beside `ids` (sorted, distinct):
/// `f` gets every copy of one chunk at a time, and whether `ids` holds it.
/// Ids the index lacks are passed over.
fn join<J: Iterator<Item = Result<ChunkId, EngineError>>>(
    index: impl Iterator<Item = Result<Location, EngineError>>,
    ids: J,
    mut f: impl FnMut(&[Location], bool) -> Result<(), EngineError>,
) -> Result<(), EngineError> {
    let mut ids = ids.peekable();
    let mut copies: Vec<Location> = Vec::new();
    for loc in index {
        let loc = loc?;
        if let Some(c) = copies.first() {
            if c.entry.id != loc.entry.id {
                let held = advance_to(&mut ids, &c.entry.id)?;
                f(&copies, held)?;
                copies.clear();
            }
        }
        copies.push(loc);
    }
    if let Some(c) = copies.first() {
        let held = advance_to(&mut ids, &c.entry.id)?;
        f(&copies, held)?;
    }
    Ok(())
}

/// Skips the ids before `id`; whether `id` comes next.
fn advance_to<J: Iterator<Item = Result<ChunkId, EngineError>>>(
    ids: &mut std::iter::Peekable<J>,
    id: &ChunkId,
) -> Result<bool, EngineError> {
    loop {
        match ids.peek() {
            Some(Ok(next)) if next < id => {
                ids.next();
            }
            Some(Ok(next)) => return Ok(next == id),
            Some(Err(_)) => return Err(ids.next().and_then(Result::err).expect("peeked an error")),
            None => return Ok(false),
        }
    }
}

/// Adds every chunk referenced by the manifests (those not in `skip`) to
/// `live`; returns the manifest keys read.
fn mark(
    inner: &RepoInner,
    source: &BoundedIndex,
    index: &ChunkIndex,
    skip: Option<&HashSet<String>>,
    live: &mut Sorter<ChunkId>,
    bad: &mut Vec<(Location, ChunkFault)>,
) -> Result<HashSet<String>, EngineError> {
    let mut seen = HashSet::new();
    let mut fresh: Option<ChunkIndex> = None;
    for meta in inner.storage.list("backups/")? {
        if skip.is_some_and(|s| s.contains(&meta.key)) {
            continue;
        }
        let id = &meta.key["backups/".len()..];
        let m = match inner.manifest(id) {
            Ok(m) => m,
            Err(EngineError::BackupNotFound(_)) => continue,
            Err(e) => return Err(gc_stopped(id, e)),
        };
        for list_id in m.lists.iter().flatten() {
            if list_id.is_zero() {
                continue;
            }
            live.push(*list_id)?;
            let mut found =
                chunks::fetch_noting(&inner.crypt, &*inner.storage, index, list_id, bad)?;
            if found == Err(ChunkFault::Missing) {
                // A backup that finished after the index was loaded: its index
                // object was written before its manifest, so a fresh load has
                // it. (A damaged block of the node's cache, read as absent,
                // makes that load rebuild the cache.)
                if fresh.is_none() {
                    fresh = Some(source.load(&*inner.storage, &HashSet::new())?);
                }
                let fresh = fresh.as_ref().expect("loaded above");
                found = chunks::fetch_noting(&inner.crypt, &*inner.storage, fresh, list_id, bad)?;
            }
            let raw = match found {
                Ok(raw) => raw,
                Err(f) => return Err(gc_stopped(id, f.into_error(list_id, Some(id)))),
            };
            let ids = decode_chunk_list(&raw).ok_or_else(|| {
                gc_stopped(
                    id,
                    EngineError::bad_object(list_id.to_hex(), "bad chunk list"),
                )
            })?;
            for c in ids {
                if !c.is_zero() {
                    live.push(c)?;
                }
            }
        }
        seen.insert(meta.key);
    }
    Ok(seen)
}

fn gc_stopped(backup: &str, e: EngineError) -> EngineError {
    EngineError::InvalidRequest(format!(
        "garbage collection stopped without deleting anything: backup {backup} cannot be read ({e}); delete or repair it first"
    ))
}

#[derive(Default)]
struct Repacked {
    old: Vec<PackId>,
    new: HashSet<PackId>,
    index_keys: Vec<String>,
    bytes_written: u64,
}

/// Copies the canonical live chunks of the packs in `packs` into new
/// packs (payloads verified, stored as they were) and indexes them, an
/// index object per [`CONSOLIDATED_PACKS`] new packs or
/// [`CONSOLIDATED_ENTRIES`] entries. `canonical` holds
/// every canonical copy ordered by pack and offset, so one pack's copies
/// are in memory at a time; the new copies go to `consolidated`.
fn repack(
    inner: &RepoInner,
    canonical: impl Iterator<Item = Result<ByPackOffset, EngineError>>,
    packs: &HashSet<PackId>,
    consolidated: &mut Sorter<ByPackId>,
    report: &mut GcReport,
    bad: &mut Vec<(Location, ChunkFault)>,
) -> Result<Repacked, EngineError> {
    let storage = &*inner.storage;
    let mut out = Repacked::default();
    let mut file = IndexFile::default();
    let mut builder = PackBuilder::new(inner.options.pack_target + (4 << 20));
    let flush = |builder: &mut PackBuilder,
                 out: &mut Repacked,
                 file: &mut IndexFile,
                 consolidated: &mut Sorter<ByPackId>|
     -> Result<(), EngineError> {
        let b = std::mem::replace(
            builder,
            PackBuilder::new(inner.options.pack_target + (4 << 20)),
        );
        let id = PackId::random();
        let (bytes, entries) = b.finish_as(&inner.crypt, Some(id));
        storage.put_if_absent(&id.key(), &bytes)?;
        out.bytes_written += bytes.len() as u64;
        out.new.insert(id);
        for e in &entries {
            consolidated.push(ByPackId(Location {
                pack: id,
                entry: *e,
            }))?;
        }
        file.packs.push((id, entries));
        let in_file = file.packs.iter().map(|(_, e)| e.len()).sum();
        if index_full(file, in_file) {
            // New packs are durable; index them before their old copies go.
            out.index_keys.push(write_index(storage, file)?);
            file.packs.clear();
        }
        Ok(())
    };
    let mut canonical = canonical
        .filter(|r| match r {
            Ok(c) => packs.contains(&c.0.pack),
            Err(_) => true,
        })
        .peekable();
    let mut entries: Vec<PackEntry> = Vec::new();
    'packs: while let Some(first) = canonical.next() {
        let first = first?.0;
        let pack = first.pack;
        entries.clear();
        entries.push(first.entry);
        // An error is returned by the next turn's `first?`.
        while let Some(Ok(next)) = canonical.peek() {
            if next.0.pack != pack {
                break;
            }
            entries.push(canonical.next().expect("peeked")?.0.entry);
        }
        let mut moved = Vec::new();
        for e in &entries {
            let loc = Location { pack, entry: *e };
            let payload = match chunks::fetch_payload(&inner.crypt, storage, &loc)? {
                Ok(p) => p,
                Err(f) => {
                    bad.push((loc, f));
                    continue 'packs;
                }
            };
            // Never copy a damaged chunk: leave the pack for verify to report.
            if let Err(f) = chunks::decode(&inner.crypt, &loc, &payload) {
                bad.push((loc, f));
                continue 'packs;
            }
            moved.push((*e, payload));
        }
        for (e, payload) in moved {
            builder.add(e.id, &payload, e.raw_len, e.flags);
            if builder.len() >= inner.options.pack_target {
                flush(&mut builder, &mut out, &mut file, consolidated)?;
            }
        }
        out.old.push(pack);
        report.packs_rewritten += 1;
    }
    if !builder.is_empty() {
        flush(&mut builder, &mut out, &mut file, consolidated)?;
    }
    if !file.packs.is_empty() {
        // New packs are durable; index them before their old copies go.
        out.index_keys.push(write_index(storage, &file)?);
    }
    Ok(out)
}
