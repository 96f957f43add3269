//! GC and verify in bounded memory: the same store, copied, collected and
//! verified once with the default sort runs (everything fits in memory)
//! and once with runs of a few records (live ids, canonical copies and the
//! consolidated index go through many sorted files on disk, merged, with
//! the index in a private temporary cache). The results must be the same,
//! and a damaged block of the node's index cache must stop GC, never make
//! it delete what it could not read, and must not fail a verify or a
//! restore (they rebuild the cache and look again).

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vpsbackup_engine::{EngineOptions, GcReport, JobControl, Repository};

/// Runs of 8 chunk copies (16 chunk ids): a few hundred runs for a test store.
const TINY_RUNS: usize = 8 * 64;

fn open(store: &Path, opts: EngineOptions) -> Repository {
    open_repo(store).with_options(opts)
}

/// The default options with this test's own cache directory (copied stores
/// share a store id, so they must not share a cache).
fn in_memory(cache: &Path) -> EngineOptions {
    EngineOptions {
        index_cache: Some(cache.to_owned()),
        ..test_options()
    }
}

fn spilling() -> EngineOptions {
    EngineOptions {
        index_cache: None,
        spill_run_bytes: TINY_RUNS,
        ..test_options()
    }
}

fn copy_store(from: &Path, to: &Path) {
    run(std::process::Command::new("cp").arg("-a").arg(from).arg(to));
}

/// Every indexed chunk with its stored length and how many copies: what
/// the index says, whatever the packs are named.
fn index_contents(repo: &Repository) -> BTreeMap<(String, u32), usize> {
    let mut m = BTreeMap::new();
    for l in repo.chunk_index().unwrap().iter() {
        *m.entry((l.entry.id.to_hex(), l.entry.stored_len))
            .or_default() += 1;
    }
    m
}

fn without_runs(r: &GcReport) -> GcReport {
    GcReport {
        sort_runs: 0,
        ..r.clone()
    }
}

/// A store with three backups of two servers; "drop" and "keep1" deleted,
/// so a GC deletes packs and (with `repack_below` high) repacks others.
fn store_with_garbage(dir: &Path) -> (PathBuf, PathBuf) {
    let img = base_image(dir);
    let other = dir.join("other.raw");
    let tree = make_tree(dir, "tree2", &["/usr/share/perl5"]);
    make_ext4(&other, &tree, "24M");
    let changed = dir.join("changed.raw");
    std::fs::copy(&img, &changed).unwrap();
    scatter_writes(&changed, 40, 9);
    let store = dir.join("store");
    let repo = open(&store, in_memory(&dir.join("cache-build")));
    backup(&repo, "keep1", "srv1", &[&img]);
    backup(&repo, "drop", "srv2", &[&other]);
    backup(&repo, "keep2", "srv1", &[&changed]);
    repo.delete_backup("drop").unwrap();
    repo.delete_backup("keep1").unwrap();
    (store, changed)
}

#[test]
fn gc_through_many_sorted_runs_matches_gc_in_memory() {
    let t = tempfile::tempdir().unwrap();
    let (store_a, changed) = store_with_garbage(t.path());
    let store_b = t.path().join("store-b");
    copy_store(&store_a, &store_b);

    let eager = |o: EngineOptions| EngineOptions {
        repack_below: 0.999,
        ..o
    };
    let a = open(&store_a, eager(in_memory(&t.path().join("cache-a"))));
    let b = open(&store_b, eager(spilling()));
    let ra = a.gc().unwrap();
    let rb = b.gc().unwrap();
    assert_eq!(
        ra.sort_runs, 0,
        "the default runs hold a test store: {ra:?}"
    );
    assert!(
        rb.sort_runs > 64,
        "tiny runs spill, and merge runs early: {rb:?}"
    );
    assert!(
        ra.packs_deleted > 0 && ra.packs_rewritten > 0 && ra.chunks_removed > 0,
        "{ra:?}"
    );
    assert_eq!(without_runs(&ra), without_runs(&rb));
    assert_eq!(stored(&a), stored(&b));
    assert_eq!(index_contents(&a), index_contents(&b));
    assert_eq!(pack_files(&store_a).len(), pack_files(&store_b).len());

    for repo in [&a, &b] {
        assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
        let o = t.path().join("o.raw");
        let _ = std::fs::remove_file(&o);
        restore(repo, "keep2", &[&o]);
        cmp(&changed, &o);
        // Nothing more to do, and the index is one object.
        let r = repo.gc().unwrap();
        assert_eq!((r.packs_deleted, r.packs_rewritten), (0, 0), "{r:?}");
    }
    assert_eq!(std::fs::read_dir(store_b.join("index")).unwrap().count(), 1);
}

#[test]
fn gc_through_many_sorted_runs_beside_running_backups_loses_nothing() {
    let t = tempfile::tempdir().unwrap();
    let repo = open(&t.path().join("store"), spilling());
    gc_beside_running_backups(&repo, t.path());
}

#[test]
fn verify_through_a_private_cache_finds_the_same_damage() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let changed = t.path().join("changed.raw");
    std::fs::copy(&img, &changed).unwrap();
    scatter_writes(&changed, 40, 5);
    let store_a = t.path().join("store");
    // Backups one after another through one cache: it holds a run each.
    let a = open(&store_a, in_memory(&t.path().join("cache-a")));
    backup(&a, "b1", "srv1", &[&img]);
    backup(&a, "b2", "srv1", &[&changed]);
    assert!(a.chunk_index().unwrap().cache_report().unwrap().runs >= 2);
    rot_largest_pack(&store_a, 64);
    let store_b = t.path().join("store-b");
    copy_store(&store_a, &store_b);
    let b = open(&store_b, spilling());

    let va = a.verify(None, &JobControl::new()).unwrap();
    let vb = b.verify(None, &JobControl::new()).unwrap();
    assert!(!va.is_ok(), "the rotten pack is found: {va:?}");
    assert!(
        va.backups.iter().all(|v| !v.corrupt_chunks.is_empty()),
        "{va:?}"
    );
    assert_eq!(va.backups, vb.backups);
    assert_eq!(va.chunks_checked, vb.chunks_checked);
}

/// Flips a byte in the middle of the largest run of the store's cache.
fn damage_cache(cache: &Path, store_id: &str) {
    let dir = cache.join(store_id);
    let run = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with("run-") && !n.ends_with(".fence")
        })
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&run).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&run, &bytes).unwrap();
}

/// [`store_with_garbage`] opened with a node cache brought up to date,
/// then with one of its blocks broken.
fn store_with_a_damaged_cache(dir: &Path) -> (Repository, PathBuf, PathBuf) {
    let (store, changed) = store_with_garbage(dir);
    let cache = dir.join("cache");
    let repo = open(&store, in_memory(&cache));
    repo.chunk_index().unwrap();
    damage_cache(&cache, &repo.config().store_id);
    (repo, store, changed)
}

#[test]
fn a_damaged_index_cache_stops_gc_before_it_deletes_anything() {
    let t = tempfile::tempdir().unwrap();
    let (repo, store, changed) = store_with_a_damaged_cache(t.path());
    let packs = pack_files(&store);
    let index: Vec<_> = std::fs::read_dir(store.join("index")).unwrap().collect();

    let e = repo.gc().unwrap_err().to_string();
    assert!(e.contains("index cache"), "{e}");
    assert_eq!(pack_files(&store), packs, "nothing was deleted");
    assert_eq!(
        std::fs::read_dir(store.join("index")).unwrap().count(),
        index.len()
    );
    // The next GC rebuilds the cache and collects.
    let r = repo.gc().unwrap();
    assert!(r.packs_deleted > 0, "{r:?}");
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
    let o = t.path().join("o.raw");
    restore(&repo, "keep2", &[&o]);
    cmp(&changed, &o);
}

#[test]
fn a_damaged_index_cache_makes_verify_rebuild_it_not_report_damage() {
    let t = tempfile::tempdir().unwrap();
    let (repo, _, _) = store_with_a_damaged_cache(t.path());
    let v = repo.verify(None, &JobControl::new()).unwrap();
    assert!(v.is_ok(), "a cache block is no chunk of the store: {v:?}");
    assert!(
        repo.chunk_index()
            .unwrap()
            .cache_report()
            .unwrap()
            .rebuilt
            .is_none(),
        "verify rebuilt the cache already"
    );
}

#[test]
fn a_damaged_index_cache_makes_restore_rebuild_it_not_fail() {
    let t = tempfile::tempdir().unwrap();
    let (repo, _, changed) = store_with_a_damaged_cache(t.path());
    let o = t.path().join("o.raw");
    // Neither an error nor zeros for the chunks the damaged block held.
    let summary = restore(&repo, "keep2", &[&o]);
    assert!(summary.damaged.is_empty(), "{:?}", summary.damaged);
    cmp(&changed, &o);
}
