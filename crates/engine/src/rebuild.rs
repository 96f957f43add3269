//! Rebuilding the index from the packs alone (disaster recovery: lost or
//! damaged `index/` objects). Every pack's trailer lists its chunks, so
//! reading the trailers is enough; pack payloads are not read.

use crate::backup::write_index;
use crate::format::{
    decode_pack_footer, decode_pack_trailer, IndexFile, PackId, PACK_FOOTER_LEN, PACK_HEADER_LEN,
};
use crate::{EngineError, RepoInner};

/// What a rebuild found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RebuildReport {
    pub packs: u64,
    pub chunks: u64,
    /// Packs whose trailer could not be read (named by key); their chunks
    /// are not indexed and verify will report them.
    pub damaged_packs: Vec<String>,
}

pub(crate) fn run(inner: &RepoInner) -> Result<RebuildReport, EngineError> {
    let storage = &*inner.storage;
    // Index objects first: every pack they name existed before they were
    // written, so the pack listing below covers them all.
    let old = storage.list("index/")?;
    let mut report = RebuildReport::default();
    let mut file = IndexFile::default();
    let mut packs = storage.list("packs/")?;
    packs.sort_by(|a, b| a.key.cmp(&b.key));
    for meta in packs {
        let Some(id) = PackId::from_key(&meta.key) else {
            continue;
        };
        match read_trailer(inner, &meta.key, meta.size) {
            Ok(entries) => {
                report.packs += 1;
                report.chunks += entries.len() as u64;
                file.packs.push((id, entries));
            }
            Err(EngineError::BadObject { .. } | EngineError::Tampered { .. }) => {
                report.damaged_packs.push(meta.key)
            }
            Err(e) => return Err(e),
        }
    }
    if !file.packs.is_empty() {
        write_index(storage, &file)?;
    }
    for meta in old {
        storage.delete(&meta.key)?;
    }
    Ok(report)
}

fn read_trailer(
    inner: &RepoInner,
    key: &str,
    size: u64,
) -> Result<Vec<crate::format::PackEntry>, EngineError> {
    let storage = &*inner.storage;
    if size < (PACK_HEADER_LEN + PACK_FOOTER_LEN) as u64 {
        return Err(EngineError::bad_object(key, "too short to be a pack"));
    }
    let footer = storage.get_range(key, size - PACK_FOOTER_LEN as u64, PACK_FOOTER_LEN as u64)?;
    let (off, count, crc) = decode_pack_footer(key, &footer)?;
    let end = size - PACK_FOOTER_LEN as u64;
    if off > end || off < PACK_HEADER_LEN as u64 {
        return Err(EngineError::bad_object(
            key,
            "pack trailer offset out of range",
        ));
    }
    let trailer = storage.get_range(key, off, end - off)?;
    let entries = if inner.crypt.is_sealed() {
        // The crc covers the sealed bytes; authentication covers the rest.
        decode_pack_trailer_sealed(inner, key, &trailer, count, crc)?
    } else {
        decode_pack_trailer(key, &trailer, count, crc)?
    };
    if entries.iter().any(|e| {
        e.offset as u64 + e.stored_len as u64 > off || (e.offset as usize) < PACK_HEADER_LEN
    }) {
        return Err(EngineError::bad_object(key, "pack entry out of range"));
    }
    Ok(entries)
}

/// An encrypted store's pack trailer: checked against its crc, opened
/// (bound to the pack's key, so another pack's trailer fails), parsed.
fn decode_pack_trailer_sealed(
    inner: &RepoInner,
    key: &str,
    trailer: &[u8],
    count: u32,
    crc: u32,
) -> Result<Vec<crate::format::PackEntry>, EngineError> {
    if crc32fast::hash(trailer) != crc {
        return Err(EngineError::bad_object(
            key,
            "pack trailer checksum mismatch",
        ));
    }
    let plain = inner
        .crypt
        .open_bytes(crate::format::PACK_END_MAGIC, key, trailer)
        .map_err(|detail| EngineError::Tampered {
            object: key.to_owned(),
            detail: format!("its trailer {detail}"),
        })?;
    crate::format::decode_pack_entries(key, &plain, count)
}
