//! Incremental backups from a change map (what a running server's dirty
//! bitmap gives): only the changed chunks are read, every other chunk comes
//! from the base backup, and the result restores byte for byte on its own.
//! Whenever the base cannot be used for a disk, that disk is read in full
//! and the reason is reported; a base chunk that is no longer offered for
//! dedup is read from the disk instead of reused.

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vpsbackup_engine::{
    BackupRequest, BackupSummary, ChangedSince, DiskImage, Extent, JobControl, Repository,
    DEFAULT_CHUNK_SIZE,
};

const CHUNK: u64 = DEFAULT_CHUNK_SIZE as u64;

/// A fully allocated image of incompressible bytes (every chunk is data,
/// so bytes read are exact), `mib` MiB.
fn random_image(dir: &Path, name: &str, mib: u64, seed: u64) -> PathBuf {
    let path = dir.join(name);
    let mut x = seed | 1;
    let data: Vec<u8> = (0..mib << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&path, data).unwrap();
    path
}

/// Writes `len` bytes of `fill` at `offset` and returns the extent.
fn write(img: &Path, offset: u64, len: u64, fill: u8) -> Extent {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&vec![fill; len as usize], offset).unwrap();
    Extent { offset, len }
}

fn req(id: &str, disks: &[&Path]) -> BackupRequest {
    BackupRequest {
        backup_id: id.into(),
        server_id: "1".into(),
        server_name: "web1".into(),
        disks: disks.iter().map(|p| DiskImage::detect(*p)).collect(),
        read_limit: None,
    }
}

fn backup_changed(
    repo: &Repository,
    id: &str,
    disks: &[&Path],
    changed: Option<&ChangedSince>,
) -> BackupSummary {
    let readers = disks
        .iter()
        .map(|p| vpsbackup_engine::open_reader(p).unwrap())
        .collect();
    repo.backup_from(
        &req(id, disks),
        readers,
        changed,
        &Default::default(),
        &JobControl::new(),
    )
    .unwrap()
}

fn restored_equals(repo: &Repository, id: &str, dir: &Path, originals: &[&Path]) {
    let targets: Vec<PathBuf> = (0..originals.len())
        .map(|i| dir.join(format!("{id}-restored{i}.raw")))
        .collect();
    repo.restore(id, &targets, &JobControl::new()).unwrap();
    for (t, o) in targets.iter().zip(originals) {
        cmp(t, o);
        std::fs::remove_file(t).unwrap();
    }
}

#[test]
fn only_changed_chunks_are_read_and_the_result_is_a_whole_backup() {
    let t = tempfile::tempdir().unwrap();
    let img = random_image(t.path(), "disk.raw", 32, 7);
    let repo = open_repo(&t.path().join("store"));
    let full = backup_changed(&repo, "b1", &[&img], None);
    assert_eq!(full.bytes_read, 32 << 20);
    assert!(!full.incremental);

    // Known writes: two whole chunks, one 8 KiB write across a chunk
    // boundary (two chunks), one 512-byte write (one chunk), and one write
    // that makes a chunk zero.
    let dirty = vec![
        write(&img, 3 * CHUNK, CHUNK, 0xa1),
        write(&img, 10 * CHUNK + CHUNK - 4096, 8192, 0xa2),
        write(&img, 100 * CHUNK + 1000, 512, 0xa3),
        write(&img, 200 * CHUNK, CHUNK, 0),
        write(&img, 511 * CHUNK, CHUNK, 0xa4),
    ];
    let changed = ChangedSince {
        base: "b1".into(),
        disks: vec![Ok(dirty)],
    };
    let inc = backup_changed(&repo, "b2", &[&img], Some(&changed));
    assert!(inc.incremental, "{:?}", inc.full_reasons);
    assert!(inc.full_reasons.is_empty());
    // 3, 10, 11, 100, 200, 511: six chunks read, nothing else.
    assert_eq!(inc.bytes_read, 6 * CHUNK);
    assert_eq!(inc.logical_bytes, 32 << 20);
    assert_eq!(inc.data_bytes, (32 << 20) - CHUNK);
    // The five changed data chunks are new (the zero one is not stored).
    assert_eq!(inc.chunks_new, 5);

    // A complete, independent backup: restore it, and it still restores
    // after the base is deleted and GC ran.
    restored_equals(&repo, "b2", t.path(), &[&img]);
    repo.delete_backup("b1").unwrap();
    repo.gc().unwrap();
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
    restored_equals(&repo, "b2", t.path(), &[&img]);
}

#[test]
fn a_disk_that_cannot_build_on_the_base_is_read_in_full_and_says_why() {
    let t = tempfile::tempdir().unwrap();
    let a = random_image(t.path(), "a.raw", 8, 1);
    let b = random_image(t.path(), "b.raw", 8, 2);
    let repo = open_repo(&t.path().join("store"));
    backup_changed(&repo, "b1", &[&a, &b], None);

    // Disk 0 has a map; disk 1's bitmap was lost (the caller says why).
    write(&a, 0, CHUNK, 1);
    write(&b, 0, CHUNK, 2);
    let changed = ChangedSince {
        base: "b1".into(),
        disks: vec![
            Ok(vec![Extent {
                offset: 0,
                len: CHUNK,
            }]),
            Err("its dirty bitmap is gone".into()),
        ],
    };
    let s = backup_changed(&repo, "b2", &[&a, &b], Some(&changed));
    assert!(!s.incremental);
    assert_eq!(
        s.full_reasons,
        vec!["disk 1 was read in full: its dirty bitmap is gone"]
    );
    assert_eq!(s.bytes_read, CHUNK + (8 << 20));
    restored_equals(&repo, "b2", t.path(), &[&a, &b]);

    // Resized since the base: read in full.
    let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
    f.set_len(12 << 20).unwrap();
    let changed = ChangedSince {
        base: "b2".into(),
        disks: vec![Ok(vec![]), Ok(vec![])],
    };
    let s = backup_changed(&repo, "b3", &[&a, &b], Some(&changed));
    assert_eq!(s.bytes_read, 8 << 20, "only the resized disk is read");
    assert_eq!(s.full_reasons.len(), 1);
    assert!(
        s.full_reasons[0].contains("disk 1") && s.full_reasons[0].contains("resized"),
        "{:?}",
        s.full_reasons
    );
    restored_equals(&repo, "b3", t.path(), &[&a, &b]);

    // The base is gone from the store: every disk is read in full.
    let changed = ChangedSince {
        base: "nope".into(),
        disks: vec![Ok(vec![]), Ok(vec![])],
    };
    let s = backup_changed(&repo, "b4", &[&a, &b], Some(&changed));
    // Disk 1's new 4 MiB are a hole: never read.
    assert_eq!(s.bytes_read, 16 << 20);
    assert_eq!(s.full_reasons.len(), 2);
    assert!(s.full_reasons[0].contains("gone from the store"));
}

#[test]
fn a_base_chunk_found_damaged_is_read_again_not_reused() {
    let t = tempfile::tempdir().unwrap();
    let img = random_image(t.path(), "disk.raw", 16, 3);
    let store = t.path().join("store");
    let repo = open_repo(&store);
    backup_changed(&repo, "b1", &[&img], None);

    // Bit rot in the largest pack; verify quarantines its bad copies.
    rot_largest_pack(&store, 64);
    assert!(!repo.verify(None, &JobControl::new()).unwrap().is_ok());

    // Nothing changed on the disk, yet the damaged chunks are read again
    // (and stored afresh), so the new backup is whole and heals the old.
    let changed = ChangedSince {
        base: "b1".into(),
        disks: vec![Ok(vec![])],
    };
    let s = backup_changed(&repo, "b2", &[&img], Some(&changed));
    assert!(s.incremental);
    assert!(
        s.bytes_read > 0 && s.bytes_read < 16 << 20,
        "{}",
        s.bytes_read
    );
    assert!(s.chunks_new >= 1 && s.bytes_read >= s.chunks_new * CHUNK);
    restored_equals(&repo, "b2", t.path(), &[&img]);
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
}
