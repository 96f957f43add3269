//! The node's on-disk chunk index cache (engine::index_cache) on real
//! stores and real ext4 images: rebuilt when lost or damaged, catching up
//! with index objects another handle wrote, forgetting what GC removed;
//! and concurrent backups of identical disks storing the data about once.

mod common;

use common::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vpsbackup_engine::index::ChunkIndex;
use vpsbackup_engine::{
    BackupRequest, DiskImage, EngineOptions, JobControl, LocalStorage, Repository, SyncReport,
};

fn open_cached(store: &Path, cache: &Path) -> Repository {
    Repository::open_with(
        Arc::new(LocalStorage::new(store).unwrap()),
        EngineOptions {
            index_cache: Some(cache.to_path_buf()),
            ..test_options()
        },
        vpsbackup_engine::DEFAULT_CHUNK_SIZE,
    )
    .unwrap()
}

fn sync(repo: &Repository) -> SyncReport {
    repo.chunk_index().unwrap().cache_report().unwrap()
}

/// Entries of the index objects, loaded whole from the store.
fn indexed(repo: &Repository) -> u64 {
    ChunkIndex::load(&**repo.storage(), &HashSet::new())
        .unwrap()
        .len() as u64
}

/// The cache's only store directory under `cache`.
fn store_dir(cache: &Path) -> PathBuf {
    let mut dirs: Vec<_> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1);
    dirs.pop().unwrap()
}

fn runs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("run-") && !n.ends_with(".fence")
        })
        .collect();
    v.sort();
    v
}

fn restores_exactly(repo: &Repository, id: &str, original: &Path, dir: &Path) {
    let out = dir.join(format!("{id}.restored"));
    restore(repo, id, &[&out]);
    cmp(original, &out);
    std::fs::remove_file(out).unwrap();
}

#[test]
fn cache_is_rebuilt_when_lost_or_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let img = base_image(dir.path());
    let store = dir.path().join("store");
    let cache = dir.path().join("cache");
    let repo = open_cached(&store, &cache);
    let first = backup(&repo, "b1", "s1", &[&img]);
    assert!(first.chunks_new > 0);

    // The backup's own start built the cache; a sync now only reads it.
    let r = sync(&repo);
    assert_eq!(r.rebuilt, None, "{r:?}");
    assert_eq!(r.objects_applied, 1, "the first backup's index object");
    let r = sync(&repo);
    assert_eq!((r.rebuilt.clone(), r.objects_applied), (None, 0), "{r:?}");
    assert_eq!(r.records, indexed(&repo));
    // A second backup of the same disk dedups entirely through the cache.
    assert_eq!(backup(&repo, "b2", "s1", &[&img]).chunks_new, 0);

    let cdir = store_dir(&cache);
    // Lost: the whole directory.
    std::fs::remove_dir_all(&cache).unwrap();
    let r = sync(&repo);
    assert_eq!(r.rebuilt.as_deref(), Some("there was no cache"));
    assert_eq!(r.records, indexed(&repo));
    assert_eq!(backup(&repo, "b3", "s1", &[&img]).chunks_new, 0);

    // A damaged state file.
    let state = cdir.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    let r = sync(&repo);
    assert_eq!(r.rebuilt.as_deref(), Some("the state is damaged"));
    assert_eq!(backup(&repo, "b4", "s1", &[&img]).chunks_new, 0);

    // A truncated run.
    let run = runs(&cdir).pop().unwrap();
    let len = std::fs::metadata(&run).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&run)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let r = sync(&repo);
    assert!(
        r.rebuilt
            .as_deref()
            .is_some_and(|w| w.contains("bytes, not")),
        "{r:?}"
    );

    // Bit rot inside a run: lookups of the damaged block read as absent
    // (those chunks are stored again, harmless), and the next sync rebuilds.
    let run = runs(&cdir).pop().unwrap();
    let mut bytes = std::fs::read(&run).unwrap();
    for b in bytes.iter_mut().skip(100).step_by(3700) {
        *b ^= 0x5a;
    }
    std::fs::write(&run, &bytes).unwrap();
    let again = backup(&repo, "b5", "s1", &[&img]);
    assert!(again.chunks_new > 0, "damaged blocks are not trusted");
    let r = sync(&repo);
    assert_eq!(r.rebuilt.as_deref(), Some("there was no cache"), "{r:?}");
    assert_eq!(backup(&repo, "b6", "s1", &[&img]).chunks_new, 0);

    // Another store's cache is never used for this one.
    let other = dir.path().join("other-store");
    let repo2 = open_cached(&other, &cache);
    assert_eq!(sync(&repo2).records, 0);
    assert!(backup(&repo2, "o1", "s1", &[&img]).chunks_new > 0);

    for id in ["b1", "b4", "b5", "b6"] {
        restores_exactly(&repo, id, &img, dir.path());
    }
    let v = repo.verify(None, &JobControl::new()).unwrap();
    assert!(v.is_ok(), "{v:?}");
}

/// The base image and a second one with other data (zoneinfo).
fn two_images(dir: &Path) -> (PathBuf, PathBuf) {
    let img = base_image(dir);
    let img2 = dir.join("second.raw");
    let tree = make_tree(dir, "tree2", &["/usr/share/zoneinfo"]);
    make_ext4(&img2, &tree, "32M");
    (img, img2)
}

#[test]
fn cache_catches_up_with_what_another_process_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let (img, img2) = two_images(dir.path());
    let store = dir.path().join("store");
    let cache = dir.path().join("cache");
    let ours = open_cached(&store, &cache);
    backup(&ours, "a1", "s1", &[&img]);
    let before = sync(&ours);

    // Another process (its own handle, no cache of its own) writes a backup.
    let theirs = open_repo(&store);
    let b = backup(&theirs, "t1", "s2", &[&img2]);
    assert!(b.chunks_new > 0);

    let r = sync(&ours);
    assert_eq!(r.rebuilt, None, "caught up, not rebuilt: {r:?}");
    assert_eq!(r.objects_applied, 1, "only the new index object is read");
    assert_eq!(r.records, indexed(&ours));
    assert!(r.records > before.records + b.chunks_new);
    // Its chunks are known here now.
    assert_eq!(backup(&ours, "a2", "s3", &[&img2]).chunks_new, 0);
    restores_exactly(&ours, "t1", &img2, dir.path());
}

#[test]
fn cache_forgets_what_gc_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (img, img2) = two_images(dir.path());
    let store = dir.path().join("store");
    let cache = dir.path().join("cache");
    let repo = open_cached(&store, &cache);
    let first = backup(&repo, "g1", "s1", &[&img]);
    backup(&repo, "g2", "s2", &[&img2]);
    let before = sync(&repo);
    assert_eq!(before.objects_applied, 1);

    // g1 goes; GC deletes its packs and consolidates the index objects.
    repo.delete_backup("g1").unwrap();
    let gc = repo.gc().unwrap();
    assert!(gc.packs_deleted > 0, "{gc:?}");

    let r = sync(&repo);
    assert_eq!(r.rebuilt, None, "{r:?}");
    assert_eq!(r.objects_removed, 2, "both index objects were consolidated");
    assert_eq!(r.objects_applied, 1, "into one");
    // No stale location is offered: the same disk is stored again, and the
    // new backup references no deleted pack.
    let again = backup(&repo, "g3", "s1", &[&img]);
    assert!(
        again.chunks_new >= first.chunks_new * 9 / 10,
        "{} of {} chunks stored again",
        again.chunks_new,
        first.chunks_new
    );
    let v = repo.verify(None, &JobControl::new()).unwrap();
    assert!(v.is_ok(), "{v:?}");
    restores_exactly(&repo, "g3", &img, dir.path());
    restores_exactly(&repo, "g2", &img2, dir.path());

    // Dead records are merged away once they pass a quarter of the runs.
    repo.delete_backup("g3").unwrap();
    repo.gc().unwrap();
    let r = sync(&repo);
    assert!(r.merged, "{r:?}");
    assert_eq!(runs(&store_dir(&cache)).len(), 1);
    restores_exactly(&repo, "g2", &img2, dir.path());
}

fn request(id: &str, disk: &Path, read_limit: Option<u64>) -> BackupRequest {
    BackupRequest {
        backup_id: id.into(),
        server_id: id.into(),
        server_name: format!("{id}.example"),
        disks: vec![DiskImage::detect(disk)],
        read_limit,
    }
}

/// N servers made from one image, backed up at the same time by one
/// process: the data is stored about once (one partly filled pack per job
/// at most), every backup restores exactly.
#[test]
fn concurrent_backups_of_identical_disks_store_the_data_once() {
    const N: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let img = base_image(dir.path());
    let copies: Vec<PathBuf> = (0..N)
        .map(|i| {
            let p = dir.path().join(format!("server{i}.raw"));
            std::fs::copy(&img, &p).unwrap();
            p
        })
        .collect();
    // One backup alone, for the size of the data once.
    let alone = open_repo(&dir.path().join("alone"));
    backup(&alone, "one", "s", &[&img]);
    let once = stored(&alone);

    let store = dir.path().join("store");
    let repo = open_cached(&store, &dir.path().join("cache"));
    // Paced reads keep the backups overlapping from start to end.
    let barrier = std::sync::Barrier::new(N);
    std::thread::scope(|s| {
        for (i, p) in copies.iter().enumerate() {
            let (repo, barrier) = (&repo, &barrier);
            s.spawn(move || {
                barrier.wait();
                repo.backup(
                    &request(&format!("c{i}"), p, Some(16 << 20)),
                    &JobControl::new(),
                )
                .unwrap()
            });
        }
    });
    let pack_target = test_options().pack_target as u64;
    let total = stored(&repo);
    assert!(
        total <= once + N as u64 * pack_target,
        "{N} concurrent backups stored {total} bytes; the data once is {once}"
    );
    for i in 0..N {
        restores_exactly(&repo, &format!("c{i}"), &img, dir.path());
    }
    let v = repo.verify(None, &JobControl::new()).unwrap();
    assert!(v.is_ok(), "{v:?}");
}

/// Across processes (two handles share nothing in memory) duplicates slip
/// through; GC's repack brings them down to one copy.
#[test]
fn gc_reduces_duplicates_of_concurrent_processes_to_one_copy() {
    let dir = tempfile::tempdir().unwrap();
    let img = base_image(dir.path());
    let copy = dir.path().join("copy.raw");
    std::fs::copy(&img, &copy).unwrap();
    let alone = open_repo(&dir.path().join("alone"));
    backup(&alone, "one", "s", &[&img]);
    let once = stored(&alone);

    let store = dir.path().join("store");
    let (a, b) = (open_repo(&store), open_repo(&store));
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        for (repo, id, disk) in [(&a, "p1", &img), (&b, "p2", &copy)] {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                repo.backup(&request(id, disk, Some(16 << 20)), &JobControl::new())
                    .unwrap()
            });
        }
    });
    let before = stored(&a);
    assert!(
        before > once * 3 / 2,
        "two processes stored {before} bytes, the data once is {once}: they overlapped"
    );
    a.gc().unwrap();
    a.gc().unwrap();
    let after = stored(&a);
    let pack_target = test_options().pack_target as u64;
    assert!(
        after <= once + 2 * pack_target,
        "after GC {after} bytes stay, the data once is {once}"
    );
    restores_exactly(&a, "p1", &img, dir.path());
    restores_exactly(&a, "p2", &img, dir.path());
    let v = a.verify(None, &JobControl::new()).unwrap();
    assert!(v.is_ok(), "{v:?}");
}
