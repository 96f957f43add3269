//! The in-memory chunk index: chunk id -> where it is stored, loaded from
//! the `index/` objects at the start of each operation, with the store's
//! quarantine (copies found corrupt or missing, see [`crate::quarantine`]).
//!
//! Two forms with the same lookups:
//! - loaded whole ([`ChunkIndex::load`], backups and restores with no
//!   cache directory configured): a sorted vector of
//!   52-byte records (id 32, then pack number, offset, stored length, raw
//!   length and flags, 4 bytes each), so about 52 bytes per unique stored
//!   chunk: ~0.8 GiB per TiB of unique data at 64 KiB chunks;
//! - over the node's on-disk cache ([`ChunkIndex::load_cached`], backups
//!   and restores when a cache directory is configured, GC and verify
//!   always, in a private temporary cache when none is, see
//!   [`crate::index_cache`]): memory holds the pack table (16 bytes per
//!   pack) and the runs' fences (~0.13 bytes per chunk); a lookup is one
//!   positioned read of a 3.6 KiB block per run.

use crate::format::{ChunkId, IndexFile, PackEntry, PackId};
use crate::storage::Storage;
use crate::EngineError;
use std::borrow::Cow;
use std::collections::HashSet;

impl From<&crate::index_cache::Rec> for Slot {
    fn from(r: &crate::index_cache::Rec) -> Slot {
        Slot {
            id: r.id,
            pack: r.pack,
            offset: r.offset,
            stored_len: r.stored_len,
            raw_len: r.raw_len,
            flags: r.flags,
        }
    }
}

/// Where a chunk is: a pack and its entry in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: PackId,
    pub entry: PackEntry,
}

#[derive(Debug)]
enum Slots {
    Memory(Vec<Slot>),
    Cached(Box<crate::index_cache::Snapshot>),
}

impl Default for Slots {
    fn default() -> Self {
        Slots::Memory(Vec::new())
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    id: ChunkId,
    pack: u32,
    offset: u32,
    stored_len: u32,
    raw_len: u32,
    flags: u32,
}

/// Every indexed chunk. A chunk may be listed in several packs (two writers
/// stored it at once, GC repacked it, or a backup stored a fresh copy of a
/// quarantined one); lookups prefer good copies in packs not condemned by
/// GC, then good copies in condemned packs, then quarantined copies.
#[derive(Debug, Default)]
pub struct ChunkIndex {
    packs: Vec<PackId>,
    slots: Slots,
    /// Packs condemned by GC (indexes into `packs`): not used for dedup.
    condemned: HashSet<u32>,
    /// Quarantined copies (pack index, chunk): never used for dedup, tried
    /// last. Usually empty, so lookups skip the hash when it is.
    quarantined: HashSet<(u32, ChunkId)>,
    /// The index objects this was loaded from.
    pub(crate) sources: Vec<String>,
    /// The quarantine records as read with this index (GC consolidates
    /// exactly these).
    pub(crate) quarantine: crate::quarantine::Quarantine,
    /// Index objects that could not be decoded, with the reason: their
    /// chunks look missing (a backup stores them again; verify reports
    /// the backups that need them) and GC refuses to run until
    /// `rebuild-index` replaces them.
    pub(crate) damaged_sources: Vec<(String, String)>,
}

impl ChunkIndex {
    /// Loads every `index/` object and the quarantine; `condemned` packs
    /// stay readable but are never offered for dedup. A damaged index
    /// object is skipped and listed in `damaged_sources`.
    pub fn load(storage: &dyn Storage, condemned: &HashSet<PackId>) -> Result<Self, EngineError> {
        let mut idx = ChunkIndex::default();
        let mut slots = Vec::new();
        let mut pack_nums = std::collections::HashMap::new();
        for meta in storage.list("index/")? {
            let obj = match storage.get(&meta.key) {
                Ok(o) => o,
                // A concurrent GC consolidated it away; its entries are in a newer index.
                Err(crate::storage::StorageError::NotFound(_)) => continue,
                Err(e @ crate::storage::StorageError::Tampered { .. }) => {
                    idx.damaged_sources
                        .push((meta.key, EngineError::from(e).to_string()));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            idx.add_object(meta.key, &obj, &mut slots, &mut pack_nums);
        }
        // Index objects deleted by a concurrent GC are consolidated into one
        // written before the deletion; a second listing catches it.
        let seen: HashSet<String> = idx
            .sources
            .iter()
            .chain(idx.damaged_sources.iter().map(|(k, _)| k))
            .cloned()
            .collect();
        for meta in storage.list("index/")? {
            if !seen.contains(&meta.key) {
                if let Ok(obj) = storage.get(&meta.key) {
                    idx.add_object(meta.key, &obj, &mut slots, &mut pack_nums);
                }
            }
        }
        for (i, p) in idx.packs.iter().enumerate() {
            if condemned.contains(p) {
                idx.condemned.insert(i as u32);
            }
        }
        // Read after the index objects: a copy quarantined meanwhile is in
        // this listing, whatever index object names it.
        idx.quarantine = crate::quarantine::load(storage)?;
        for (chunk, pack) in &idx.quarantine.copies {
            if let Some(n) = pack_nums.get(pack) {
                idx.quarantined.insert((*n, *chunk));
            }
        }
        slots.sort_unstable_by_key(|s| s.id);
        idx.slots = Slots::Memory(slots);
        Ok(idx)
    }

    /// [`Self::load`] through the node's on-disk cache: brings it up to
    /// date with the store's index objects (reading only those not applied
    /// yet) and looks chunks up there, so memory does not grow with the
    /// store.
    pub(crate) fn load_cached(
        storage: &dyn Storage,
        condemned: &HashSet<PackId>,
        cache: &crate::index_cache::IndexCache,
    ) -> Result<Self, EngineError> {
        let mut snap = cache.sync(storage)?;
        let mut idx = ChunkIndex {
            packs: std::mem::take(&mut snap.packs),
            sources: std::mem::take(&mut snap.sources),
            damaged_sources: std::mem::take(&mut snap.damaged),
            ..ChunkIndex::default()
        };
        for (i, p) in idx.packs.iter().enumerate() {
            if condemned.contains(p) {
                idx.condemned.insert(i as u32);
            }
        }
        idx.quarantine = crate::quarantine::load(storage)?;
        if !idx.quarantine.copies.is_empty() {
            let wanted: HashSet<PackId> = idx.quarantine.copies.iter().map(|(_, p)| *p).collect();
            let nums: std::collections::HashMap<PackId, u32> = idx
                .packs
                .iter()
                .enumerate()
                .filter(|(_, p)| wanted.contains(p))
                .map(|(i, p)| (*p, i as u32))
                .collect();
            for (chunk, pack) in &idx.quarantine.copies {
                if let Some(n) = nums.get(pack) {
                    idx.quarantined.insert((*n, *chunk));
                }
            }
        }
        idx.slots = Slots::Cached(Box::new(snap));
        Ok(idx)
    }

    /// What the cache sync did, for a cached index.
    pub fn cache_report(&self) -> Option<crate::index_cache::SyncReport> {
        match &self.slots {
            Slots::Memory(_) => None,
            Slots::Cached(s) => Some(s.report.clone()),
        }
    }

    fn add_object(
        &mut self,
        key: String,
        obj: &[u8],
        slots: &mut Vec<Slot>,
        pack_nums: &mut std::collections::HashMap<PackId, u32>,
    ) {
        match IndexFile::decode(&key, obj) {
            Ok(file) => {
                self.add_file(&file, slots, pack_nums);
                self.sources.push(key);
            }
            Err(e) => self.damaged_sources.push((key, e.to_string())),
        }
    }

    fn add_file(
        &mut self,
        file: &IndexFile,
        slots: &mut Vec<Slot>,
        pack_nums: &mut std::collections::HashMap<PackId, u32>,
    ) {
        for (pack, entries) in &file.packs {
            let n = *pack_nums.entry(*pack).or_insert_with(|| {
                self.packs.push(*pack);
                (self.packs.len() - 1) as u32
            });
            slots.extend(entries.iter().map(|e| Slot {
                id: e.id,
                pack: n,
                offset: e.offset,
                stored_len: e.stored_len,
                raw_len: e.raw_len,
                flags: e.flags,
            }));
        }
    }

    fn range(&self, id: &ChunkId) -> Cow<'_, [Slot]> {
        match &self.slots {
            Slots::Memory(slots) => {
                let start = slots.partition_point(|s| s.id < *id);
                let end = start + slots[start..].partition_point(|s| s.id == *id);
                Cow::Borrowed(&slots[start..end])
            }
            Slots::Cached(snap) => Cow::Owned(snap.find(id).iter().map(Slot::from).collect()),
        }
    }

    fn location(&self, s: &Slot) -> Location {
        Location {
            pack: self.packs[s.pack as usize],
            entry: PackEntry {
                id: s.id,
                offset: s.offset,
                stored_len: s.stored_len,
                raw_len: s.raw_len,
                flags: s.flags,
            },
        }
    }

    fn is_quarantined(&self, s: &Slot) -> bool {
        !self.quarantined.is_empty() && self.quarantined.contains(&(s.pack, s.id))
    }

    /// 0 for a good copy in a live pack, 1 in a condemned pack, 2 and 3
    /// for the same quarantined: lower is tried first.
    fn rank(&self, s: &Slot) -> u8 {
        u8::from(self.is_quarantined(s)) * 2 + u8::from(self.condemned.contains(&s.pack))
    }

    /// Whether a backup may reference `id` without storing it again: only
    /// with a copy neither condemned nor quarantined.
    pub fn has_for_dedup(&self, id: &ChunkId) -> bool {
        self.range(id).iter().any(|s| self.rank(s) == 0)
    }

    /// The first of [`Self::locations`], without allocating: restores and
    /// verifies ask this once per chunk.
    pub fn preferred(&self, id: &ChunkId) -> Option<Location> {
        let slots = self.range(id);
        slots
            .iter()
            .find(|s| self.rank(s) == 0)
            .or_else(|| slots.iter().min_by_key(|s| self.rank(s)))
            .map(|s| self.location(s))
    }

    /// Every known location of `id`: good copies in live packs first, then
    /// in condemned packs, quarantined copies last.
    pub fn locations(&self, id: &ChunkId) -> Vec<Location> {
        let mut v: Vec<Slot> = self.range(id).into_owned();
        v.sort_by_key(|s| self.rank(s));
        v.into_iter().map(|s| self.location(&s)).collect()
    }

    /// Whether this copy is quarantined.
    pub fn quarantined(&self, loc: &Location) -> bool {
        // Usually nothing is: skip the scan of the pack table.
        !self.quarantined.is_empty()
            && self
                .pack_num(&loc.pack)
                .is_some_and(|n| self.quarantined.contains(&(n, loc.entry.id)))
    }

    /// Quarantines a copy in this index only (the caller records it in the
    /// store): later lookups try it last.
    pub(crate) fn quarantine(&mut self, loc: &Location) {
        if let Some(n) = self.pack_num(&loc.pack) {
            self.quarantined.insert((n, loc.entry.id));
        }
    }

    fn pack_num(&self, pack: &PackId) -> Option<u32> {
        // Rare (damage only): a scan of the pack list is fine.
        self.packs.iter().position(|p| p == pack).map(|n| n as u32)
    }

    /// Entries (in a cached index, records in its runs, including those
    /// of index objects removed since the last merge).
    pub fn len(&self) -> usize {
        match &self.slots {
            Slots::Memory(s) => s.len(),
            Slots::Cached(s) => s.len() as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn packs(&self) -> &[PackId] {
        &self.packs
    }

    /// Every (pack, entry) pair in chunk id order, read as it goes (a
    /// cached index merges its runs). A block of the cache that cannot be
    /// read is an error, never a record left out.
    pub(crate) fn sorted(&self) -> Box<dyn Iterator<Item = Result<Location, EngineError>> + '_> {
        match &self.slots {
            Slots::Memory(slots) => Box::new(slots.iter().map(|s| Ok(self.location(s)))),
            Slots::Cached(snap) => Box::new(
                snap.sorted_records()
                    .map(|r| r.map(|r| self.location(&Slot::from(&r)))),
            ),
        }
    }

    /// Whether a lookup in the node's cache met a damaged block (and
    /// answered "absent"): a fresh load rebuilds the cache.
    pub(crate) fn cache_broken(&self) -> bool {
        match &self.slots {
            Slots::Memory(_) => false,
            Slots::Cached(snap) => snap.broken(),
        }
    }

    /// Every (pack, entry) pair.
    pub fn iter(&self) -> Box<dyn Iterator<Item = Location> + '_> {
        match &self.slots {
            Slots::Memory(slots) => Box::new(slots.iter().map(|s| self.location(s))),
            Slots::Cached(snap) => Box::new(snap.records().map(|r| self.location(&Slot::from(&r)))),
        }
    }
}
