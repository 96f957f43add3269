//! Reading one stored chunk back: find it through the index, fetch its
//! bytes from a pack, decompress, and check it hashes to its name. Every
//! reader (restore, verify, GC's repack) goes through here, so no path
//! hands out bytes that were not verified.

use crate::crypt::Crypt;
use crate::format::{ChunkId, FLAG_ZSTD};
use crate::index::{ChunkIndex, Location};
use crate::storage::{Storage, StorageError};

/// Why a chunk could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ChunkFault {
    /// No index entry, or every pack that held it is gone.
    Missing,
    /// Stored, but the bytes do not decode to the chunk's hash.
    Corrupt(String),
    /// In an encrypted store: the stored bytes fail authentication (they
    /// were modified, swapped for others, or truncated).
    Tampered(String),
}

impl ChunkFault {
    /// The error for chunk `id` (of `backup`, when known) with this fault.
    pub(crate) fn into_error(self, id: &ChunkId, backup: Option<&str>) -> crate::EngineError {
        let backup = backup.map(str::to_owned);
        match self {
            ChunkFault::Missing => crate::EngineError::MissingChunk {
                chunk: id.to_hex(),
                backup,
            },
            ChunkFault::Corrupt(detail) => crate::EngineError::Corrupt {
                chunk: id.to_hex(),
                backup,
                detail,
            },
            ChunkFault::Tampered(detail) => crate::EngineError::Tampered {
                object: match backup {
                    Some(b) => format!("chunk {id} of backup {b}"),
                    None => format!("chunk {id}"),
                },
                detail,
            },
        }
    }
}

/// Fetches, decompresses and verifies chunk `id`; tries every known copy
/// (good ones first) and adds each copy found bad (pack gone, bytes that
/// fail) to `bad`, for the caller to quarantine. The outer error is a
/// storage failure (retryable); the inner is the chunk's fault.
pub(crate) fn fetch_noting(
    crypt: &Crypt,
    storage: &dyn Storage,
    index: &ChunkIndex,
    id: &ChunkId,
    bad: &mut Vec<(Location, ChunkFault)>,
) -> Result<Result<Vec<u8>, ChunkFault>, StorageError> {
    let mut fault = ChunkFault::Missing;
    for loc in index.locations(id) {
        match fetch_at(crypt, storage, &loc)? {
            Ok(data) => return Ok(Ok(data)),
            Err(ChunkFault::Missing) => bad.push((loc, ChunkFault::Missing)),
            Err(f) => {
                bad.push((loc, f.clone()));
                fault = f;
            }
        }
    }
    Ok(Err(fault))
}

/// Reads the stored (possibly compressed) payload of one location.
pub(crate) fn fetch_payload(
    crypt: &Crypt,
    storage: &dyn Storage,
    loc: &Location,
) -> Result<Result<Vec<u8>, ChunkFault>, StorageError> {
    match storage.get_range(
        &loc.pack.key(),
        loc.entry.offset as u64,
        loc.entry.stored_len as u64,
    ) {
        Ok(p) => Ok(Ok(p)),
        Err(StorageError::NotFound(_)) => Ok(Err(ChunkFault::Missing)),
        Err(StorageError::OutOfRange { .. }) => Ok(Err(truncated(crypt, loc))),
        Err(e) => Err(e),
    }
}

/// A chunk past the end of its pack: in an encrypted store, where nothing
/// changes without the key, that is tampering too.
pub(crate) fn truncated(crypt: &Crypt, loc: &Location) -> ChunkFault {
    let what = format!("pack {} is truncated", loc.pack.key());
    if crypt.is_sealed() {
        ChunkFault::Tampered(what)
    } else {
        ChunkFault::Corrupt(what)
    }
}

fn fetch_at(
    crypt: &Crypt,
    storage: &dyn Storage,
    loc: &Location,
) -> Result<Result<Vec<u8>, ChunkFault>, StorageError> {
    let payload = match fetch_payload(crypt, storage, loc)? {
        Ok(p) => p,
        Err(f) => return Ok(Err(f)),
    };
    Ok(decode(crypt, loc, &payload))
}

/// Opens (encrypted stores), decompresses a payload and checks its hash.
pub(crate) fn decode(crypt: &Crypt, loc: &Location, payload: &[u8]) -> Result<Vec<u8>, ChunkFault> {
    decode_with(crypt, None, loc, payload)
}

/// [`decode`] with a reusable decompression context (saves its setup per chunk).
pub(crate) fn decode_with(
    crypt: &Crypt,
    dec: Option<&mut zstd::bulk::Decompressor<'_>>,
    loc: &Location,
    payload: &[u8],
) -> Result<Vec<u8>, ChunkFault> {
    let mut scratch = Vec::new();
    let payload = crypt.open_chunk(loc, payload, &mut scratch)?;
    let raw = if loc.entry.flags & FLAG_ZSTD != 0 {
        let cap = loc.entry.raw_len as usize;
        match dec {
            Some(d) => d.decompress(payload, cap),
            None => zstd::bulk::decompress(payload, cap),
        }
        .map_err(|e| {
            ChunkFault::Corrupt(format!(
                "cannot decompress it from pack {}: {e}",
                loc.pack.key()
            ))
        })?
    } else {
        payload.to_vec()
    };
    if raw.len() != loc.entry.raw_len as usize || crypt.chunk_id(&raw) != loc.entry.id {
        return Err(ChunkFault::Corrupt(format!(
            "its bytes in pack {} do not match its hash",
            loc.pack.key()
        )));
    }
    Ok(raw)
}

/// Decodes a payload into `out` (exactly the chunk's length) and checks
/// its hash there, so the bytes need no further copy. In an encrypted store
/// the payload is decrypted where it lies (no copy either).
pub(crate) fn decode_into(
    crypt: &Crypt,
    dec: &mut zstd::bulk::Decompressor<'_>,
    loc: &Location,
    payload: &mut [u8],
    out: &mut [u8],
) -> Result<(), ChunkFault> {
    let payload = crypt.open_chunk_in_place(loc, payload)?;
    let bad = |what: String| ChunkFault::Corrupt(format!("{what} in pack {}", loc.pack.key()));
    if out.len() != loc.entry.raw_len as usize {
        return Err(bad(format!(
            "it holds {} bytes where {} are needed",
            loc.entry.raw_len,
            out.len()
        )));
    }
    if loc.entry.flags & FLAG_ZSTD != 0 {
        let n = dec
            .decompress_to_buffer(payload, out)
            .map_err(|e| bad(format!("it cannot be decompressed ({e})")))?;
        if n != out.len() {
            return Err(bad("it decompresses to the wrong length".into()));
        }
    } else if payload.len() == out.len() {
        out.copy_from_slice(payload);
    } else {
        return Err(bad("its stored length is wrong".into()));
    }
    if crypt.chunk_id(out) != loc.entry.id {
        return Err(bad("its bytes do not match its hash".into()));
    }
    Ok(())
}

/// Compresses `raw` with zstd when that saves space; appends the payload to
/// `out` and returns the entry flags. `scratch` is reused between calls so
/// compressing allocates nothing (allocation churn inflates peak RSS).
pub(crate) fn compress_into(
    compressor: &mut zstd::bulk::Compressor<'_>,
    scratch: &mut Vec<u8>,
    raw: &[u8],
    out: &mut Vec<u8>,
) -> u32 {
    // Only output smaller than the input is kept, so a scratch of the
    // input's size suffices: a compressor that runs out of room reports an
    // error and the chunk is stored raw.
    if scratch.len() < raw.len() {
        scratch.resize(raw.len(), 0);
    }
    match compressor.compress_to_buffer(raw, &mut scratch[..raw.len()]) {
        Ok(n) if n < raw.len() => {
            out.extend_from_slice(&scratch[..n]);
            FLAG_ZSTD
        }
        // Incompressible (or a compressor error, which only costs space): store raw.
        _ => {
            out.extend_from_slice(raw);
            0
        }
    }
}
