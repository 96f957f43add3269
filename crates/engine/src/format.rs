//! The store's on-disk (on-object) formats. Every object starts with an
//! 8-byte magic and a little-endian u32 format version and carries a
//! checksum, so any single object can be checked alone:
//!
//! - envelope objects (config, manifests, index files, writer markers,
//!   pending-delete lists, quarantine records): `magic, version u32, payload len u32, payload,
//!   crc32 u32` over everything before it;
//! - packs: `"VPSBPACK", version u32, 0u32`, then chunk payloads, then a
//!   trailer of [`PackEntry`] records and a fixed 24-byte footer
//!   (`count u32, crc32 u32 of the trailer, trailer offset u64, "VPSBPEND"`),
//!   so the index can be rebuilt from packs alone.
//!
//! Chunks are named by the BLAKE3 hash of their raw bytes; all-zero chunks
//! are never stored and appear in chunk lists as [`ChunkId::ZERO`].

use crate::EngineError;
use serde::{Deserialize, Serialize};
use std::fmt;

pub const FORMAT_VERSION: u32 = 1;

pub const CONFIG_MAGIC: &[u8; 8] = b"VPSBCONF";
pub const MANIFEST_MAGIC: &[u8; 8] = b"VPSBMANI";
pub const INDEX_MAGIC: &[u8; 8] = b"VPSBINDX";
pub const WRITER_MAGIC: &[u8; 8] = b"VPSBWRTR";
pub const PENDING_MAGIC: &[u8; 8] = b"VPSBPEND";
pub const QUARANTINE_MAGIC: &[u8; 8] = b"VPSBQUAR";
pub const PACK_MAGIC: &[u8; 8] = b"VPSBPACK";
pub const PACK_END_MAGIC: &[u8; 8] = b"VPSBPTRL";

pub const PACK_HEADER_LEN: usize = 16;
pub const PACK_FOOTER_LEN: usize = 24;
pub const PACK_ENTRY_LEN: usize = 48;

/// Entry flag: the payload is a zstd frame; otherwise the raw bytes.
pub const FLAG_ZSTD: u32 = 1;

/// A chunk's name: BLAKE3 of its raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Stands for an all-zero chunk (never stored).
    pub const ZERO: ChunkId = ChunkId([0; 32]);

    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    pub fn is_zero(&self) -> bool {
        *self == Self::ZERO
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

/// A pack's random name; stored as `packs/<2 hex>/<32 hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    pub fn random() -> Self {
        PackId(random_bytes())
    }

    pub fn key(&self) -> String {
        let h = hex::encode(self.0);
        format!("packs/{}/{}", &h[..2], h)
    }

    pub fn from_key(key: &str) -> Option<Self> {
        let name = key.strip_prefix("packs/")?.split('/').nth(1)?;
        let mut id = [0u8; 16];
        hex::decode_to_slice(name, &mut id).ok()?;
        (PackId(id).key() == key).then_some(PackId(id))
    }
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS RNG failing is not recoverable in any useful way.
    getrandom::fill(&mut b).expect("the operating system's random source works");
    b
}

pub(crate) fn random_hex(n: usize) -> String {
    let b: [u8; 16] = random_bytes();
    hex::encode(b)[..n * 2].to_owned()
}

/// Where one chunk sits in a pack.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PackEntry {
    pub id: ChunkId,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub flags: u32,
}

impl PackEntry {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Self {
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[..32]);
        PackEntry {
            id: ChunkId(id),
            offset: u32_at(b, 32),
            stored_len: u32_at(b, 36),
            raw_len: u32_at(b, 40),
            flags: u32_at(b, 44),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Accumulates chunk payloads into one pack.
#[derive(Debug)]
pub struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl PackBuilder {
    pub fn new(capacity: usize) -> Self {
        Self::with_buffer(Vec::with_capacity(capacity))
    }

    /// Builds into a recycled buffer (its contents are discarded).
    pub fn with_buffer(mut buf: Vec<u8>) -> Self {
        buf.clear();
        buf.extend_from_slice(PACK_MAGIC);
        buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        Self {
            buf,
            entries: Vec::new(),
        }
    }

    pub fn add(&mut self, id: ChunkId, payload: &[u8], raw_len: u32, flags: u32) {
        self.entries.push(PackEntry {
            id,
            offset: self.buf.len() as u32,
            stored_len: payload.len() as u32,
            raw_len,
            flags,
        });
        self.buf.extend_from_slice(payload);
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends the trailer and footer; returns the pack bytes and its entries.
    pub fn finish(self) -> (Vec<u8>, Vec<PackEntry>) {
        self.finish_as(&crate::crypt::Crypt::plain(), None)
    }

    /// [`PackBuilder::finish`] for pack `id` of a store sealed by `crypt`:
    /// an encrypted store's pack has version 2 and a sealed trailer.
    pub(crate) fn finish_as(
        mut self,
        crypt: &crate::crypt::Crypt,
        id: Option<PackId>,
    ) -> (Vec<u8>, Vec<PackEntry>) {
        let trailer_offset = self.buf.len() as u64;
        let mut trailer = Vec::with_capacity(self.entries.len() * PACK_ENTRY_LEN);
        for e in &self.entries {
            e.encode(&mut trailer);
        }
        if let Some(id) = id.filter(|_| crypt.is_sealed()) {
            self.buf[8..12].copy_from_slice(&crypt.pack_version().to_le_bytes());
            trailer = crypt.seal_bytes(PACK_END_MAGIC, &id.key(), &trailer);
        }
        let crc = crc32fast::hash(&trailer);
        self.buf.extend_from_slice(&trailer);
        self.buf
            .extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf.extend_from_slice(&trailer_offset.to_le_bytes());
        self.buf.extend_from_slice(PACK_END_MAGIC);
        (self.buf, self.entries)
    }
}

/// Parses a pack's footer: (trailer offset, entry count, trailer crc).
pub fn decode_pack_footer(name: &str, footer: &[u8]) -> Result<(u64, u32, u32), EngineError> {
    if footer.len() != PACK_FOOTER_LEN || &footer[16..24] != PACK_END_MAGIC {
        return Err(EngineError::bad_object(name, "pack footer magic is wrong"));
    }
    Ok((u64_at(footer, 8), u32_at(footer, 0), u32_at(footer, 4)))
}

/// Parses a pack trailer checked against its crc.
pub fn decode_pack_trailer(
    name: &str,
    trailer: &[u8],
    count: u32,
    crc: u32,
) -> Result<Vec<PackEntry>, EngineError> {
    if crc32fast::hash(trailer) != crc {
        return Err(EngineError::bad_object(
            name,
            "pack trailer checksum mismatch",
        ));
    }
    decode_pack_entries(name, trailer, count)
}

/// Parses a trailer's entries (opened, in an encrypted store).
pub(crate) fn decode_pack_entries(
    name: &str,
    trailer: &[u8],
    count: u32,
) -> Result<Vec<PackEntry>, EngineError> {
    if trailer.len() != count as usize * PACK_ENTRY_LEN {
        return Err(EngineError::bad_object(
            name,
            "pack trailer length does not match its count",
        ));
    }
    Ok(trailer
        .chunks_exact(PACK_ENTRY_LEN)
        .map(PackEntry::decode)
        .collect())
}

/// Parses a whole pack's header and trailer (not the payloads).
pub fn decode_pack(name: &str, pack: &[u8]) -> Result<Vec<PackEntry>, EngineError> {
    if pack.len() < PACK_HEADER_LEN + PACK_FOOTER_LEN || &pack[..8] != PACK_MAGIC {
        return Err(EngineError::bad_object(name, "not a pack (magic is wrong)"));
    }
    let version = u32_at(pack, 8);
    if version != FORMAT_VERSION {
        return Err(EngineError::bad_object(
            name,
            format!("pack format version {version} is not supported"),
        ));
    }
    let (off, count, crc) = decode_pack_footer(name, &pack[pack.len() - PACK_FOOTER_LEN..])?;
    let end = pack.len() - PACK_FOOTER_LEN;
    if off as usize > end || (off as usize) < PACK_HEADER_LEN {
        return Err(EngineError::bad_object(
            name,
            "pack trailer offset out of range",
        ));
    }
    let entries = decode_pack_trailer(name, &pack[off as usize..end], count, crc)?;
    for e in &entries {
        if e.offset as u64 + e.stored_len as u64 > off || (e.offset as usize) < PACK_HEADER_LEN {
            return Err(EngineError::bad_object(name, "pack entry out of range"));
        }
    }
    Ok(entries)
}

/// Wraps `payload` in the envelope: magic, version, length, payload, crc32.
pub fn seal(magic: &[u8; 8], payload: &[u8]) -> Vec<u8> {
    seal_versioned(magic, FORMAT_VERSION, payload)
}

/// [`seal`] with another format version (2: written by encrypted stores,
/// so builds that predate encryption refuse them).
pub fn seal_versioned(magic: &[u8; 8], version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 20);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Checks and strips the envelope; returns the payload.
pub fn open_seal<'a>(magic: &[u8; 8], name: &str, obj: &'a [u8]) -> Result<&'a [u8], EngineError> {
    open_seal_versioned(magic, name, obj, &[FORMAT_VERSION]).map(|(_, p)| p)
}

/// [`open_seal`] accepting any of `versions`; returns the version too.
pub fn open_seal_versioned<'a>(
    magic: &[u8; 8],
    name: &str,
    obj: &'a [u8],
    versions: &[u32],
) -> Result<(u32, &'a [u8]), EngineError> {
    if obj.len() < 20 || &obj[..8] != magic {
        return Err(EngineError::bad_object(name, "magic is wrong"));
    }
    let version = u32_at(obj, 8);
    if !versions.contains(&version) {
        return Err(EngineError::bad_object(
            name,
            format!("format version {version} is not supported by this build"),
        ));
    }
    let len = u32_at(obj, 12) as usize;
    if obj.len() != len + 20 {
        return Err(EngineError::bad_object(name, "length does not match"));
    }
    let crc = u32_at(obj, 16 + len);
    if crc32fast::hash(&obj[..16 + len]) != crc {
        return Err(EngineError::bad_object(name, "checksum mismatch"));
    }
    Ok((version, &obj[16..16 + len]))
}

/// The store's `config` object.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub store_id: String,
    pub chunk_size: u32,
    /// Chunk ids per chunk-list chunk (the manifest's second level).
    pub list_fanout: u32,
    pub created_at_ms: u64,
    /// Set in encrypted stores (whose config is format version 2, so builds
    /// that predate encryption refuse them); absent in unencrypted ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionConfig>,
}

impl StoreConfig {
    /// The bytes an encrypted store's config MAC covers: every parameter.
    pub(crate) fn mac_input(&self) -> Vec<u8> {
        let enc = self.encryption.as_ref();
        format!(
            "{}\n{}\n{}\n{}\n{}\n{}",
            self.store_id,
            self.chunk_size,
            self.list_fanout,
            self.created_at_ms,
            enc.map_or("", |e| e.cipher.as_str()),
            enc.map_or("", |e| e.chunk_ids.as_str()),
        )
        .into_bytes()
    }
}

/// How an encrypted store seals (see `crate::crypt`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct EncryptionConfig {
    /// `xchacha20poly1305`.
    pub cipher: String,
    /// `blake3-keyed`.
    pub chunk_ids: String,
    /// BLAKE3 keyed MAC (key derived from the data key) over the config's
    /// parameters, hex: a config edited by someone without the key fails.
    pub config_mac: String,
}

/// One disk in a manifest header.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ManifestDisk {
    pub source_path: String,
    pub format: String,
    pub size: u64,
    /// Bytes in non-zero chunks.
    pub data_bytes: u64,
}

/// The JSON header of a manifest.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ManifestHeader {
    pub backup_id: String,
    pub server_id: String,
    pub server_name: String,
    pub created_at_ms: u64,
    pub chunk_size: u32,
    pub list_fanout: u32,
    pub disks: Vec<ManifestDisk>,
    /// What the caller said about the backup (the service: its type,
    /// description, expiry), so a lost catalog can be rebuilt from the
    /// store. Added after the first format: absent in older manifests (read
    /// as empty), and older readers ignore it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A backup's manifest `backups/<id>`. Each disk's chunk ids are held in
/// list chunks (stored like data chunks, `list_fanout` ids each, so a
/// manifest stays small and its memory bounded for any disk size); the
/// manifest holds the ids of those list chunks, per disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub header: ManifestHeader,
    pub lists: Vec<Vec<ChunkId>>,
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(&self.header).expect("manifest header serialises");
        let mut p = Vec::new();
        p.extend_from_slice(&(json.len() as u32).to_le_bytes());
        p.extend_from_slice(&json);
        for list in &self.lists {
            p.extend_from_slice(&(list.len() as u32).to_le_bytes());
            for id in list {
                p.extend_from_slice(&id.0);
            }
        }
        seal(MANIFEST_MAGIC, &p)
    }

    pub fn decode(name: &str, obj: &[u8]) -> Result<Self, EngineError> {
        let p = open_seal(MANIFEST_MAGIC, name, obj)?;
        let bad = |d: &str| EngineError::bad_object(name, d.to_owned());
        if p.len() < 4 {
            return Err(bad("truncated"));
        }
        let jlen = u32_at(p, 0) as usize;
        let json = p.get(4..4 + jlen).ok_or_else(|| bad("truncated header"))?;
        let header: ManifestHeader =
            serde_json::from_slice(json).map_err(|e| bad(&format!("bad header: {e}")))?;
        let mut at = 4 + jlen;
        let mut lists = Vec::with_capacity(header.disks.len());
        for _ in &header.disks {
            let n = p.get(at..at + 4).ok_or_else(|| bad("truncated list"))?;
            let n = u32_at(n, 0) as usize;
            at += 4;
            let ids = p
                .get(at..at + n * 32)
                .ok_or_else(|| bad("truncated list"))?;
            lists.push(
                ids.chunks_exact(32)
                    .map(|c| ChunkId(c.try_into().expect("32 bytes")))
                    .collect(),
            );
            at += n * 32;
        }
        if at != p.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(Manifest { header, lists })
    }
}

/// Encodes a chunk list chunk: the concatenated ids.
pub fn encode_chunk_list(ids: &[ChunkId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.len() * 32);
    for id in ids {
        out.extend_from_slice(&id.0);
    }
    out
}

pub fn decode_chunk_list(raw: &[u8]) -> Option<Vec<ChunkId>> {
    if raw.len() % 32 != 0 {
        return None;
    }
    Some(
        raw.chunks_exact(32)
            .map(|c| ChunkId(c.try_into().expect("32 bytes")))
            .collect(),
    )
}

/// An index file `index/<id>`: for some packs, where each chunk sits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IndexFile {
    pub packs: Vec<(PackId, Vec<PackEntry>)>,
}

impl IndexFile {
    pub fn encode(&self) -> Vec<u8> {
        let n: usize = self.packs.iter().map(|(_, e)| e.len()).sum();
        let mut p = Vec::with_capacity(4 + self.packs.len() * 20 + n * PACK_ENTRY_LEN);
        p.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        for (pack, entries) in &self.packs {
            p.extend_from_slice(&pack.0);
            p.extend_from_slice(&(entries.len() as u32).to_le_bytes());
            for e in entries {
                e.encode(&mut p);
            }
        }
        seal(INDEX_MAGIC, &p)
    }

    pub fn decode(name: &str, obj: &[u8]) -> Result<Self, EngineError> {
        let p = open_seal(INDEX_MAGIC, name, obj)?;
        let bad = || EngineError::bad_object(name, "truncated index");
        let count = u32_at(p.get(..4).ok_or_else(bad)?, 0) as usize;
        let mut at = 4;
        let mut packs = Vec::with_capacity(count);
        for _ in 0..count {
            let head = p.get(at..at + 20).ok_or_else(bad)?;
            let pack = PackId(head[..16].try_into().expect("16 bytes"));
            let n = u32_at(head, 16) as usize;
            at += 20;
            let body = p.get(at..at + n * PACK_ENTRY_LEN).ok_or_else(bad)?;
            packs.push((
                pack,
                body.chunks_exact(PACK_ENTRY_LEN)
                    .map(PackEntry::decode)
                    .collect(),
            ));
            at += n * PACK_ENTRY_LEN;
        }
        if at != p.len() {
            return Err(EngineError::bad_object(name, "trailing bytes in index"));
        }
        Ok(IndexFile { packs })
    }
}

/// A running writer's marker `writers/<id>`: GC never removes anything
/// newer than the oldest live writer's start.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WriterMarker {
    /// What runs: a backup id, or `restore:<id>` / `verify`.
    pub backup_id: String,
    pub host: String,
    pub pid: u32,
    pub started_at_ms: u64,
    pub refreshed_at_ms: u64,
}

/// Packs a GC condemned: writers loading the index skip them for dedup,
/// and a later step deletes them once no writer older than `since_ms` runs.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct PendingDeletes {
    /// (pack hex id, since when it is condemned, ms since the epoch)
    pub packs: Vec<(String, u64)>,
}

/// One quarantined copy of a chunk.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedCopy {
    /// Chunk id, hex.
    pub chunk: String,
    /// Pack id, hex (the 32 hex digits of `packs/<2>/<32>`).
    pub pack: String,
    /// Why: "missing" or what failed when it was read.
    pub reason: String,
}

/// A `quarantine/<ms>-<rand>` object: stored chunk copies found corrupt
/// or missing (see `crate::quarantine`). Quarantine names a copy (chunk
/// id and pack), never a chunk id alone: a good copy of the same id in
/// another pack stays usable.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct QuarantineRecord {
    /// What found the damage: `verify`, `restore`, `gc`.
    pub found_by: String,
    pub found_at_ms: u64,
    pub copies: Vec<QuarantinedCopy>,
}

pub fn encode_json<T: Serialize>(magic: &[u8; 8], v: &T) -> Vec<u8> {
    seal(magic, &serde_json::to_vec(v).expect("serialises"))
}

pub fn decode_json<T: for<'de> Deserialize<'de>>(
    magic: &[u8; 8],
    name: &str,
    obj: &[u8],
) -> Result<T, EngineError> {
    let p = open_seal(magic, name, obj)?;
    serde_json::from_slice(p).map_err(|e| EngineError::bad_object(name, e.to_string()))
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
