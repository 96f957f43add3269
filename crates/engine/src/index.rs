//! The in-memory chunk index: chunk id -> where it is stored, loaded from
//! the `index/` objects at the start of each operation.
//!
//! Memory: a sorted vector of 52-byte records (id 32, then pack number,
//! offset, stored length, raw length and flags, 4 bytes each), so about
//! 52 bytes per unique stored chunk: ~0.8 GiB per TiB of unique data at
//! 64 KiB chunks. It grows with the store's unique data, not with the size
//! of the disk backed up.

use crate::format::{ChunkId, IndexFile, PackEntry, PackId};
use crate::storage::Storage;
use crate::EngineError;
use std::collections::HashSet;

/// Where a chunk is: a pack and its entry in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: PackId,
    pub entry: PackEntry,
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
/// stored it at once, or GC repacked it); lookups prefer packs not
/// condemned by GC.
#[derive(Debug, Default)]
pub struct ChunkIndex {
    packs: Vec<PackId>,
    slots: Vec<Slot>,
    /// Packs condemned by GC (indexes into `packs`): not used for dedup.
    condemned: HashSet<u32>,
    /// The index objects this was loaded from.
    pub(crate) sources: Vec<String>,
}

impl ChunkIndex {
    /// Loads every `index/` object; `condemned` packs stay readable but are
    /// never offered for dedup.
    pub fn load(storage: &dyn Storage, condemned: &HashSet<PackId>) -> Result<Self, EngineError> {
        let mut idx = ChunkIndex::default();
        let mut pack_nums = std::collections::HashMap::new();
        for meta in storage.list("index/")? {
            let obj = match storage.get(&meta.key) {
                Ok(o) => o,
                // A concurrent GC consolidated it away; its entries are in a newer index.
                Err(crate::storage::StorageError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            let file = IndexFile::decode(&meta.key, &obj)?;
            idx.add_file(&file, &mut pack_nums);
            idx.sources.push(meta.key);
        }
        // Index objects deleted by a concurrent GC are consolidated into one
        // written before the deletion; a second listing catches it.
        let seen: HashSet<String> = idx.sources.iter().cloned().collect();
        for meta in storage.list("index/")? {
            if !seen.contains(&meta.key) {
                if let Ok(obj) = storage.get(&meta.key) {
                    let file = IndexFile::decode(&meta.key, &obj)?;
                    idx.add_file(&file, &mut pack_nums);
                    idx.sources.push(meta.key);
                }
            }
        }
        for (i, p) in idx.packs.iter().enumerate() {
            if condemned.contains(p) {
                idx.condemned.insert(i as u32);
            }
        }
        idx.slots.sort_unstable_by_key(|s| s.id);
        Ok(idx)
    }

    fn add_file(
        &mut self,
        file: &IndexFile,
        pack_nums: &mut std::collections::HashMap<PackId, u32>,
    ) {
        for (pack, entries) in &file.packs {
            let n = *pack_nums.entry(*pack).or_insert_with(|| {
                self.packs.push(*pack);
                (self.packs.len() - 1) as u32
            });
            self.slots.extend(entries.iter().map(|e| Slot {
                id: e.id,
                pack: n,
                offset: e.offset,
                stored_len: e.stored_len,
                raw_len: e.raw_len,
                flags: e.flags,
            }));
        }
    }

    fn range(&self, id: &ChunkId) -> &[Slot] {
        let start = self.slots.partition_point(|s| s.id < *id);
        let end = start + self.slots[start..].partition_point(|s| s.id == *id);
        &self.slots[start..end]
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

    /// Whether a backup may reference `id` without storing it again.
    pub fn has_for_dedup(&self, id: &ChunkId) -> bool {
        self.range(id)
            .iter()
            .any(|s| !self.condemned.contains(&s.pack))
    }

    /// The first of [`Self::locations`], without allocating: restores and
    /// verifies ask this once per chunk.
    pub fn preferred(&self, id: &ChunkId) -> Option<Location> {
        let slots = self.range(id);
        slots
            .iter()
            .find(|s| !self.condemned.contains(&s.pack))
            .or(slots.first())
            .map(|s| self.location(s))
    }

    /// Every known location of `id`, packs not condemned first.
    pub fn locations(&self, id: &ChunkId) -> Vec<Location> {
        let mut v: Vec<&Slot> = self.range(id).iter().collect();
        v.sort_by_key(|s| self.condemned.contains(&s.pack));
        v.into_iter().map(|s| self.location(s)).collect()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn packs(&self) -> &[PackId] {
        &self.packs
    }

    /// Every (pack, entry) pair.
    pub fn iter(&self) -> impl Iterator<Item = Location> + '_ {
        self.slots.iter().map(|s| self.location(s))
    }
}
