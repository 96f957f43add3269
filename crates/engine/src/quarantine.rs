//! Quarantine: stored copies of chunks found corrupt or missing, recorded
//! in the store so every process and node using it stops trusting them.
//!
//! A copy is a *location* (chunk id, pack), not a chunk id: chunks are
//! named by their content, so the good copy a later backup stores has the
//! same id in another pack, and that copy repairs every older backup that
//! references the id. Records are small immutable objects
//! `quarantine/<ms>-<rand>` (the usual envelope, a JSON list), written by
//! whoever found the damage: verify, a restore, GC's reads. Index loading
//! reads them all: a quarantined copy is never offered for dedup (so the
//! next backup of the same bytes stores a fresh copy) and is tried last by
//! restores and verifies. GC treats it as no live copy and drops records
//! whose pack no longer exists.

use crate::chunks::ChunkFault;
use crate::format::{
    decode_json, encode_json, now_ms, random_hex, ChunkId, PackId, QuarantineRecord,
    QuarantinedCopy, QUARANTINE_MAGIC,
};
use crate::index::{ChunkIndex, Location};
use crate::storage::{Storage, StorageError};
use crate::EngineError;
use std::collections::HashSet;

/// Every quarantined copy of the store, as read at one moment.
#[derive(Debug, Default)]
pub(crate) struct Quarantine {
    pub(crate) copies: HashSet<(ChunkId, PackId)>,
    /// The records read, as (key, decoded record).
    pub(crate) records: Vec<(String, QuarantineRecord)>,
    /// Records that cannot be decoded, with the reason. Their copies are
    /// not known; a verify finds them again.
    pub(crate) unreadable: Vec<(String, String)>,
}

pub(crate) const PREFIX: &str = "quarantine/";

/// Copies found bad by one operation, to be recorded.
#[derive(Debug, Default)]
pub(crate) struct Found {
    pub(crate) copies: Vec<(Location, ChunkFault)>,
    /// Packs whose size was already checked.
    checked: HashSet<PackId>,
}

impl Found {
    /// Adds copies found bad. When one is bad because its pack is gone or
    /// shorter than the index says, every copy the index places past the
    /// pack's end is added too: a lost chunk list hides the chunks it
    /// names from a verify, and the next backup must not dedup against
    /// them either, or it would take two rounds to heal.
    pub(crate) fn add(
        &mut self,
        storage: &dyn Storage,
        index: &ChunkIndex,
        bad: Vec<(Location, ChunkFault)>,
    ) -> Result<(), EngineError> {
        for (loc, fault) in bad {
            let end = u64::from(loc.entry.offset) + u64::from(loc.entry.stored_len);
            if self.checked.insert(loc.pack) {
                let size = storage.head(&loc.pack.key())?.map_or(0, |m| m.size);
                if size < end {
                    let why = if size == 0 {
                        ChunkFault::Missing
                    } else {
                        ChunkFault::Corrupt(format!("pack {} is truncated", loc.pack.key()))
                    };
                    self.copies.extend(
                        index
                            .iter()
                            .filter(|l| {
                                l.pack == loc.pack
                                    && u64::from(l.entry.offset) + u64::from(l.entry.stored_len)
                                        > size
                                    && l.entry.id != loc.entry.id
                            })
                            .map(|l| (l, why.clone())),
                    );
                }
            }
            self.copies.push((loc, fault));
        }
        Ok(())
    }
}

/// Reads every quarantine record. A damaged record is skipped (and listed
/// in [`Quarantine::unreadable`]): quarantine is a hint to avoid bad
/// copies, whose loss only costs a re-detection.
pub(crate) fn load(storage: &dyn Storage) -> Result<Quarantine, EngineError> {
    let mut q = Quarantine::default();
    for meta in storage.list(PREFIX)? {
        let obj = match storage.get(&meta.key) {
            Ok(o) => o,
            // Consolidated away by a concurrent GC: it wrote the survivors first.
            Err(StorageError::NotFound(_)) => continue,
            Err(e @ StorageError::Tampered { .. }) => {
                q.unreadable.push((meta.key, e.to_string()));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match decode_json::<QuarantineRecord>(QUARANTINE_MAGIC, &meta.key, &obj) {
            Ok(r) => {
                for c in &r.copies {
                    if let Some(pair) = parse_copy(c) {
                        q.copies.insert(pair);
                    }
                }
                q.records.push((meta.key, r));
            }
            Err(e) => q.unreadable.push((meta.key, e.to_string())),
        }
    }
    Ok(q)
}

pub(crate) fn parse_copy(c: &QuarantinedCopy) -> Option<(ChunkId, PackId)> {
    let mut chunk = [0u8; 32];
    let mut pack = [0u8; 16];
    hex::decode_to_slice(&c.chunk, &mut chunk).ok()?;
    hex::decode_to_slice(&c.pack, &mut pack).ok()?;
    Some((ChunkId(chunk), PackId(pack)))
}

/// Writes one record of `found` (deduplicated); returns its key, or None
/// when there was nothing to record.
pub(crate) fn record(
    storage: &dyn Storage,
    found_by: &str,
    found: &[(Location, ChunkFault)],
) -> Result<Option<String>, EngineError> {
    let mut seen = HashSet::new();
    let copies: Vec<QuarantinedCopy> = found
        .iter()
        .filter(|(l, _)| seen.insert((l.entry.id, l.pack)))
        .map(|(l, f)| QuarantinedCopy {
            chunk: l.entry.id.to_hex(),
            pack: hex::encode(l.pack.0),
            reason: match f {
                ChunkFault::Missing => "missing".to_owned(),
                ChunkFault::Corrupt(d) => d.clone(),
                ChunkFault::Tampered(d) => format!("tampered: {d}"),
            },
        })
        .collect();
    if copies.is_empty() {
        return Ok(None);
    }
    let rec = QuarantineRecord {
        found_by: found_by.to_owned(),
        found_at_ms: now_ms(),
        copies,
    };
    write(storage, &rec).map(Some)
}

pub(crate) fn write(storage: &dyn Storage, rec: &QuarantineRecord) -> Result<String, EngineError> {
    let key = format!("{PREFIX}{}-{}", now_ms(), random_hex(8));
    storage.put_if_absent(&key, &encode_json(QUARANTINE_MAGIC, rec))?;
    Ok(key)
}
