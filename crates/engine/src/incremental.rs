//! Incremental backups: what a backup may take from an earlier one instead
//! of reading it.
//!
//! The caller (a running server's point in time) knows, per disk, which
//! byte ranges may have changed since an earlier backup (QEMU's dirty
//! bitmap). Every chunk outside them is taken from the earlier backup's
//! chunk list instead of being read and hashed; the result is a complete,
//! independent backup like any other (its manifest lists every chunk).
//!
//! Trust is checked here as well as by the caller: the base must be a
//! readable manifest of the same chunk geometry with a disk of the same
//! size, else that disk is read in full and the reason is reported. A
//! reused chunk must be in the index for dedup (not quarantined, not in a
//! pack GC condemned); one that is not is read from the disk, so a damaged
//! or collected base can cost reads but never a wrong chunk.

use crate::chunks;
use crate::format::{decode_chunk_list, ChunkId, Manifest};
use crate::index::ChunkIndex;
use crate::{EngineError, RepoInner};
use vpsbackup_disk::{DiskReader, Extent};

/// What may have changed since an earlier backup, per disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedSince {
    /// The earlier backup (its id in this store).
    pub base: String,
    /// Per disk of the request: the extents that may differ from the base
    /// (sorted, non-overlapping), or why there is no trusted map for it
    /// (then the disk is read in full and the reason reported).
    pub disks: Vec<Result<Vec<Extent>, String>>,
}

/// One disk's view of the base: its chunk ids, a list chunk at a time
/// (the backup reads in disk order), and the dirty extents.
pub(crate) struct BaseDisk<'a> {
    inner: &'a RepoInner,
    index: &'a ChunkIndex,
    manifest: &'a Manifest,
    disk: usize,
    dirty: &'a [Extent],
    /// The loaded list chunk: its number and ids (`None`: unreadable).
    loaded: Option<(u64, Option<Vec<ChunkId>>)>,
}

impl BaseDisk<'_> {
    /// True if any byte of `[offset, offset + len)` may have changed.
    pub(crate) fn dirty(&self, offset: u64, len: u64) -> bool {
        let i = self.dirty.partition_point(|e| e.offset + e.len <= offset);
        self.dirty
            .get(i)
            .is_some_and(|e| e.offset < offset + len && e.len > 0)
    }

    /// The base's id of chunk number `n`, when it can be reused: zero, or
    /// stored in a copy the index offers for dedup. `None`: read the chunk.
    pub(crate) fn reusable(&mut self, n: u64) -> Option<ChunkId> {
        let fanout = u64::from(self.manifest.header.list_fanout);
        let list = n / fanout;
        if self.loaded.as_ref().map(|(l, _)| *l) != Some(list) {
            let ids = self.load_list(list);
            self.loaded = Some((list, ids));
        }
        let ids = self.loaded.as_ref()?.1.as_ref()?;
        let id = *ids.get((n % fanout) as usize)?;
        (id.is_zero() || self.index.has_for_dedup(&id)).then_some(id)
    }

    fn load_list(&self, list: u64) -> Option<Vec<ChunkId>> {
        let list_id = self.manifest.lists[self.disk].get(list as usize)?;
        let h = &self.manifest.header;
        let count = h.disks[self.disk].size.div_ceil(u64::from(h.chunk_size));
        let n = u64::from(h.list_fanout).min(count.saturating_sub(list * u64::from(h.list_fanout)));
        if list_id.is_zero() {
            return Some(vec![ChunkId::ZERO; n as usize]);
        }
        // A list that cannot be read costs reads, not the backup: its
        // chunks are read from the disk (verify and heal deal with it).
        let mut bad = Vec::new();
        let storage = &*self.inner.storage;
        let raw = chunks::fetch_noting(&self.inner.crypt, storage, self.index, list_id, &mut bad)
            .ok()?
            .ok()?;
        decode_chunk_list(&raw).filter(|ids| ids.len() as u64 == n)
    }
}

/// The base of each disk of a backup (`None`: read it in full), and the
/// reasons for the disks read in full.
pub(crate) struct Bases<'a> {
    pub(crate) disks: Vec<Option<BaseDisk<'a>>>,
    pub(crate) full_reasons: Vec<String>,
}

/// Loads the base manifest of `changed`; any disk that cannot use it is
/// read in full, with the reason.
pub(crate) fn load_manifest(inner: &RepoInner, changed: &ChangedSince) -> Result<Manifest, String> {
    let m = inner.manifest(&changed.base).map_err(|e| match e {
        EngineError::BackupNotFound(_) => "the previous backup is gone from the store".to_owned(),
        e => format!("the previous backup's manifest cannot be read ({e})"),
    })?;
    if m.header.chunk_size != inner.config.chunk_size
        || m.header.list_fanout != inner.config.list_fanout
    {
        return Err("the previous backup was made with another chunk size".into());
    }
    Ok(m)
}

/// Pairs each disk with the base: `manifest` is the base's (or why there
/// is none, which then applies to every disk).
pub(crate) fn bases<'a>(
    inner: &'a RepoInner,
    index: &'a ChunkIndex,
    changed: Option<&'a ChangedSince>,
    manifest: Option<&'a Result<Manifest, String>>,
    readers: &[Box<dyn DiskReader>],
) -> Bases<'a> {
    let mut out = Bases {
        disks: Vec::with_capacity(readers.len()),
        full_reasons: Vec::new(),
    };
    let (Some(changed), Some(manifest)) = (changed, manifest) else {
        out.disks.resize_with(readers.len(), || None);
        return out;
    };
    for (disk, r) in readers.iter().enumerate() {
        let base = match (manifest, changed.disks.get(disk)) {
            (Err(why), _) => Err(why.clone()),
            (_, None) => Err("no change map was given for it".to_owned()),
            (_, Some(Err(why))) => Err(why.clone()),
            (Ok(m), Some(Ok(dirty))) => match m.header.disks.get(disk) {
                None => Err("the previous backup has fewer disks".to_owned()),
                Some(d) if d.size != r.size() => Err(format!(
                    "it was resized (from {} to {} bytes) since the previous backup",
                    d.size,
                    r.size()
                )),
                Some(_) => Ok(BaseDisk {
                    inner,
                    index,
                    manifest: m,
                    disk,
                    dirty,
                    loaded: None,
                }),
            },
        };
        match base {
            Ok(b) => out.disks.push(Some(b)),
            Err(why) => {
                out.full_reasons
                    .push(format!("disk {disk} was read in full: {why}"));
                out.disks.push(None);
            }
        }
    }
    out
}
