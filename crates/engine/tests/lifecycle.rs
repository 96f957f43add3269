//! Verify, corruption, delete, garbage collection (also beside a running
//! backup), cancellation and the read limit, on real images.

mod common;

use common::*;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vpsbackup_engine::{BackupRequest, DiskImage, EngineError, JobControl, Repository};

#[test]
fn corrupt_pack_is_found_by_verify_and_fails_restore() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let store = t.path().join("store");
    let repo = open_repo(&store);
    backup(&repo, "good", "srv1", &[&img]);
    assert!(repo
        .verify(Some("good"), &JobControl::new())
        .unwrap()
        .is_ok());

    let victim = rot_largest_pack(&store, 64);

    let report = repo.verify(None, &JobControl::new()).unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.backups.len(), 1);
    let b = &report.backups[0];
    assert_eq!(b.backup_id, "good");
    assert!(!b.corrupt_chunks.is_empty(), "{report:?}");

    let out = t.path().join("out.raw");
    let err = repo
        .restore("good", std::slice::from_ref(&out), &JobControl::new())
        .unwrap_err();
    match &err {
        EngineError::Corrupt { chunk, backup, .. } => {
            assert_eq!(backup.as_deref(), Some("good"));
            assert!(
                b.corrupt_chunks.contains(chunk),
                "{chunk} not in verify's list"
            );
        }
        other => panic!("expected a corrupt chunk error, got {other}"),
    }
    assert!(err.to_string().contains("good"), "{err}");
    assert!(
        !out.exists(),
        "a failed restore removes the new file it had started"
    );
    // An existing target is kept (and not blanked) when the restore fails.
    std::fs::File::create(&out)
        .unwrap()
        .set_len(std::fs::metadata(&img).unwrap().len())
        .unwrap();
    assert!(repo
        .restore("good", std::slice::from_ref(&out), &JobControl::new())
        .is_err());
    assert!(out.exists());

    // A deleted pack is reported as missing chunks.
    std::fs::remove_file(&victim).unwrap();
    let report = repo.verify(Some("good"), &JobControl::new()).unwrap();
    assert!(!report.backups[0].missing_chunks.is_empty());
    assert!(matches!(
        repo.restore("good", &[out], &JobControl::new()),
        Err(EngineError::MissingChunk { .. })
    ));
}

#[test]
fn delete_and_gc_free_space_and_keep_other_backups() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let other = t.path().join("other.raw");
    let tree = make_tree(t.path(), "tree2", &["/usr/share/perl5"]);
    make_ext4(&other, &tree, "24M");
    let changed = t.path().join("changed.raw");
    std::fs::copy(&img, &changed).unwrap();
    scatter_writes(&changed, 40, 9);

    let store = t.path().join("store");
    let repo = open_repo(&store);
    backup(&repo, "keep1", "srv1", &[&img]);
    let before_other = stored(&repo);
    backup(&repo, "drop", "srv2", &[&other]);
    let dropped = stored(&repo) - before_other;
    backup(&repo, "keep2", "srv1", &[&changed]);
    let full = stored(&repo);

    // GC with nothing to collect changes nothing.
    let r = repo.gc().unwrap();
    assert_eq!(r.packs_deleted, 0, "{r:?}");
    assert_eq!(stored(&repo), full);

    repo.delete_backup("drop").unwrap();
    repo.delete_backup("drop").unwrap(); // idempotent
    assert!(matches!(
        repo.backup_info("drop"),
        Err(EngineError::BackupNotFound(_))
    ));
    let r = repo.gc().unwrap();
    assert!(r.packs_deleted > 0 && r.bytes_freed > 0, "{r:?}");
    let after = stored(&repo);
    assert!(after < full, "{after} < {full}");
    // What "drop" alone held is gone (chunks it shared with the others stay).
    assert!(
        after <= full - dropped * 9 / 10,
        "gc left {after} of {full}, {dropped} were the deleted backup's"
    );
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
    let o = t.path().join("o1.raw");
    restore(&repo, "keep1", &[&o]);
    cmp(&img, &o);
    let o = t.path().join("o2.raw");
    restore(&repo, "keep2", &[&o]);
    cmp(&changed, &o);

    // Deleting the older backup leaves its packs mostly live (keep2 shares
    // all but 40 chunks): below the default threshold nothing is rewritten,
    // with a high one the packs are repacked and their dead chunks dropped.
    repo.delete_backup("keep1").unwrap();
    let r = repo.gc().unwrap();
    assert_eq!(r.packs_rewritten, 0, "{r:?}");
    let eager = repo.with_options(vpsbackup_engine::EngineOptions {
        repack_below: 0.999,
        ..test_options()
    });
    let before = stored(&repo);
    let r = eager.gc().unwrap();
    assert!(r.packs_rewritten > 0 && r.packs_deleted > 0, "{r:?}");
    assert!(r.chunks_removed > 0, "{r:?}");
    assert!(stored(&repo) < before);
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
    let o = t.path().join("o3.raw");
    restore(&repo, "keep2", &[&o]);
    cmp(&changed, &o);
    // A second GC finds nothing more to do and the index is one object.
    let r = repo.gc().unwrap();
    assert_eq!((r.packs_deleted, r.packs_rewritten), (0, 0), "{r:?}");
    assert_eq!(std::fs::read_dir(store.join("index")).unwrap().count(), 1);
}

#[test]
fn gc_beside_a_running_backup_loses_nothing() {
    let t = tempfile::tempdir().unwrap();
    let repo = open_repo(&t.path().join("store"));
    gc_beside_running_backups(&repo, t.path());
}

#[test]
fn cancelled_backup_leaves_no_manifest_and_gc_reclaims_it() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let repo = open_repo(&t.path().join("store"));
    let job = Arc::new(JobControl::new());
    let req = BackupRequest {
        backup_id: "c1".into(),
        server_id: "srv1".into(),
        server_name: String::new(),
        disks: vec![DiskImage::detect(&img)],
        read_limit: Some(8 << 20),
    };
    let (r2, j2) = (repo.clone(), job.clone());
    let h = std::thread::spawn(move || r2.backup(&req, &j2));
    // Let it get going, then cancel.
    let start = Instant::now();
    while job.progress().0 == 0 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (done, total) = job.progress();
    assert!(done > 0 && done < total, "{done}/{total}");
    assert!(job.percent() < 100);
    job.cancel();
    let res = h.join().unwrap();
    assert!(matches!(res, Err(EngineError::Cancelled)), "{res:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "cancellation is prompt"
    );
    assert!(repo.list_backups().unwrap().is_empty());
    assert!(matches!(
        repo.backup_info("c1"),
        Err(EngineError::BackupNotFound(_))
    ));
    assert!(std::fs::read_dir(t.path().join("store/writers"))
        .unwrap()
        .next()
        .is_none());
    // Whatever packs it wrote are reclaimed.
    repo.gc().unwrap();
    assert_eq!(repo.stats().unwrap().stored_bytes, 0);
    // The id is free to use.
    backup(&repo, "c1", "srv1", &[&img]);
}

#[test]
fn read_limit_is_respected() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let repo = open_repo(&t.path().join("store"));
    let data = {
        let s = backup(&repo, "probe", "srv1", &[&img]);
        s.data_bytes
    };
    let limit = 16u64 << 20;
    let start = Instant::now();
    let req = BackupRequest {
        backup_id: "limited".into(),
        server_id: "srv1".into(),
        server_name: String::new(),
        disks: vec![DiskImage::detect(&img)],
        read_limit: Some(limit),
    };
    repo.backup(&req, &JobControl::new()).unwrap();
    let secs = start.elapsed().as_secs_f64();
    // One second of burst, then `limit` bytes/s.
    let expected = data as f64 / limit as f64 - 1.0;
    assert!(
        secs >= expected * 0.9,
        "{secs:.2}s for {data} bytes at {limit}/s"
    );
}

#[test]
fn bad_requests_are_refused_with_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let repo = open_repo(&t.path().join("store"));
    let mk = |id: &str, disks: Vec<std::path::PathBuf>| BackupRequest {
        backup_id: id.into(),
        server_id: "s".into(),
        server_name: String::new(),
        disks: disks.into_iter().map(DiskImage::detect).collect(),
        read_limit: None,
    };
    let job = JobControl::new();
    assert!(matches!(
        repo.backup(&mk("../x", vec![img.clone()]), &job),
        Err(EngineError::InvalidRequest(_))
    ));
    assert!(matches!(
        repo.backup(&mk("x", vec![]), &job),
        Err(EngineError::InvalidRequest(_))
    ));
    let e = repo
        .backup(&mk("x", vec![t.path().join("nope.raw")]), &job)
        .unwrap_err();
    assert!(matches!(e, EngineError::Disk(_)), "{e}");
    backup(&repo, "x", "s", &[&img]);
    assert!(matches!(
        repo.backup(&mk("x", vec![img.clone()]), &job),
        Err(EngineError::BackupExists(_))
    ));
    assert!(matches!(
        repo.restore("nope", &[], &job),
        Err(EngineError::BackupNotFound(_))
    ));
    assert!(matches!(
        repo.verify(Some("nope"), &job),
        Err(EngineError::BackupNotFound(_))
    ));
    // Reopening finds the same store.
    let again = Repository::open_local(&t.path().join("store")).unwrap();
    assert_eq!(again.config(), repo.config());
    assert_eq!(again.list_backups().unwrap().len(), 1);
}

#[test]
fn index_is_rebuilt_from_packs_alone() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let store = t.path().join("store");
    let repo = open_repo(&store);
    let s = backup(&repo, "b1", "srv1", &[&img]);
    // The index objects are lost.
    std::fs::remove_dir_all(store.join("index")).unwrap();
    let report = repo.verify(None, &JobControl::new()).unwrap();
    assert!(!report.is_ok());
    assert!(!report.backups[0].missing_chunks.is_empty());

    let r = repo.rebuild_index().unwrap();
    assert!(r.damaged_packs.is_empty());
    assert_eq!(r.packs, pack_files(&store).len() as u64);
    // Every data chunk plus the chunk list.
    assert_eq!(r.chunks, s.chunks_new + 1);
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
    let o = t.path().join("o.raw");
    restore(&repo, "b1", &[&o]);
    cmp(&img, &o);
    // Deduplication works against the rebuilt index.
    assert_eq!(backup(&repo, "b2", "srv1", &[&img]).chunks_new, 0);

    // A pack with a damaged trailer is reported, the rest indexed.
    let victim = pack_files(&store).pop().unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let n = bytes.len();
    bytes[n - 30] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();
    let r = repo.rebuild_index().unwrap();
    assert_eq!(r.damaged_packs.len(), 1, "{r:?}");
    assert!(!repo.verify(Some("b1"), &JobControl::new()).unwrap().is_ok());
}

/// Writes a writer marker as a running backup in another process would.
fn fake_writer(store: &Path, name: &str, pid: u32, started_ago_ms: u64, refreshed_ago_ms: u64) {
    fake_marker(
        store,
        &format!("writers/{name}"),
        pid,
        started_ago_ms,
        refreshed_ago_ms,
    )
}

fn fake_marker(store: &Path, key: &str, pid: u32, started_ago_ms: u64, refreshed_ago_ms: u64) {
    use vpsbackup_engine::format::{encode_json, now_ms, WriterMarker, WRITER_MAGIC};
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let m = WriterMarker {
        backup_id: "other".into(),
        host: host.trim().into(),
        pid,
        started_at_ms: now_ms() - started_ago_ms,
        refreshed_at_ms: now_ms() - refreshed_ago_ms,
    };
    let s = vpsbackup_engine::LocalStorage::new(store).unwrap();
    vpsbackup_engine::Storage::put(&s, key, &encode_json(WRITER_MAGIC, &m)).unwrap();
}

#[test]
fn gc_condemns_but_keeps_packs_while_an_older_writer_runs() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let store = t.path().join("store");
    let repo = open_repo(&store);
    backup(&repo, "old", "srv1", &[&img]);
    repo.delete_backup("old").unwrap();
    let full = stored(&repo);

    // A live writer (this very process) that started before the GC, after
    // the packs were written: it may have loaded an index offering them.
    std::thread::sleep(Duration::from_millis(20));
    fake_writer(&store, "live", std::process::id(), 0, 0);
    // Stale markers block nothing: one not refreshed for an hour, one whose
    // process is gone from this host.
    fake_writer(&store, "stale", std::process::id(), 7_200_000, 3_600_000);
    fake_writer(&store, "dead", u32::MAX - 1, 1_000, 0);
    let r = repo.gc().unwrap();
    assert_eq!(r.packs_deleted, 0, "{r:?}");
    assert!(r.packs_pending > 0, "{r:?}");
    assert_eq!(stored(&repo), full);
    assert!(!store.join("writers/stale").exists() && !store.join("writers/dead").exists());
    assert!(store.join("writers/live").exists());
    // Condemned packs are no longer offered for dedup: a new backup of the
    // same disk stores its chunks afresh rather than lean on them.
    let s = backup(&repo, "new", "srv1", &[&img]);
    assert_eq!(s.chunks_new, s.chunks_total, "{s:?}");

    // The writer finishes: the next GC deletes what no manifest needs.
    std::fs::remove_file(store.join("writers/live")).unwrap();
    let r = repo.gc().unwrap();
    assert!(r.packs_deleted > 0, "{r:?}");
    assert_eq!(r.packs_pending, 0, "{r:?}");
    assert!(stored(&repo) <= full + full / 10);
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
    let o = t.path().join("o.raw");
    restore(&repo, "new", &[&o]);
    cmp(&img, &o);
}

#[test]
fn a_writer_that_used_a_condemned_pack_saves_it() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let store = t.path().join("store");
    let repo = open_repo(&store);
    backup(&repo, "old", "srv1", &[&img]);
    // A backup of the same disk starts (its marker is up) and dedups
    // against the packs of "old" ...
    std::thread::sleep(Duration::from_millis(20));
    fake_writer(&store, "w", std::process::id(), 0, 0);
    backup(&repo, "new", "srv1", &[&img]);
    // (its manifest is not written yet as far as the GC below can see)
    let aside = t.path().join("new.manifest");
    std::fs::rename(store.join("backups/new"), &aside).unwrap();
    // ... "old" is deleted and GC condemns its packs while that writer runs.
    repo.delete_backup("old").unwrap();
    let r = repo.gc().unwrap();
    assert!(r.packs_pending > 0 && r.packs_deleted == 0, "{r:?}");
    // The writer finishes: manifest written, marker removed.
    std::fs::rename(&aside, store.join("backups/new")).unwrap();
    std::fs::remove_file(store.join("writers/w")).unwrap();
    // Now the packs are referenced by "new": the next GC un-condemns them.
    let r = repo.gc().unwrap();
    assert_eq!(r.packs_deleted, 0, "{r:?}");
    assert_eq!(r.packs_pending, 0, "{r:?}");
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
    let o = t.path().join("o.raw");
    restore(&repo, "new", &[&o]);
    cmp(&img, &o);
}

#[test]
fn damaged_manifest_is_reported_and_stops_gc() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let store = t.path().join("store");
    let repo = open_repo(&store);
    backup(&repo, "a", "srv1", &[&img]);
    backup(&repo, "b", "srv1", &[&img]);
    let m = store.join("backups/b");
    let mut bytes = std::fs::read(&m).unwrap();
    bytes[40] ^= 1;
    std::fs::write(&m, &bytes).unwrap();

    let ids: Vec<String> = repo
        .list_backups()
        .unwrap()
        .into_iter()
        .map(|b| b.backup_id)
        .collect();
    assert_eq!(ids, ["a"]);
    assert_eq!(repo.backup_ids().unwrap(), ["a", "b"]);
    assert!(matches!(
        repo.backup_info("b"),
        Err(EngineError::BadObject { .. })
    ));
    let report = repo.verify(None, &JobControl::new()).unwrap();
    let b = report.backups.iter().find(|v| v.backup_id == "b").unwrap();
    assert!(b.manifest_error.is_some() && !b.is_ok());
    assert!(report
        .backups
        .iter()
        .find(|v| v.backup_id == "a")
        .unwrap()
        .is_ok());
    // GC cannot know what "b" references: it deletes nothing.
    let before = stored(&repo);
    let e = repo.gc().unwrap_err();
    assert!(e.to_string().contains("backup b"), "{e}");
    assert_eq!(stored(&repo), before);
    // Deleting the damaged backup lets GC run again.
    repo.delete_backup("b").unwrap();
    repo.gc().unwrap();
    let o = t.path().join("o.raw");
    restore(&repo, "a", &[&o]);
    cmp(&img, &o);
}

#[test]
fn concurrent_backups_of_one_disk_then_gc_keep_everything_restorable() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let store = t.path().join("store");
    let repo = open_repo(&store);
    // Two servers cloned from one image back up at the same moment: both
    // may store the same new chunks (in different packs).
    std::thread::scope(|s| {
        for id in ["x", "y"] {
            let (repo, img) = (repo.clone(), img.clone());
            s.spawn(move || backup(&repo, id, id, &[&img]));
        }
    });
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
    repo.delete_backup("x").unwrap();
    let eager = repo.with_options(vpsbackup_engine::EngineOptions {
        repack_below: 0.9,
        ..test_options()
    });
    eager.gc().unwrap();
    eager.gc().unwrap();
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
    let o = t.path().join("o.raw");
    restore(&repo, "y", &[&o]);
    cmp(&img, &o);
    // Duplicates are gone: the store holds about one copy.
    let one_copy = {
        let t2 = tempfile::tempdir().unwrap();
        let r2 = open_repo(t2.path());
        backup(&r2, "z", "z", &[&img]);
        stored(&r2)
    };
    assert!(
        stored(&repo) <= one_copy + one_copy / 5,
        "{} vs {one_copy}",
        stored(&repo)
    );
}

#[test]
fn one_gc_at_a_time_and_a_dead_gcs_lock_is_taken_over() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let repo = open_repo(&store);
    // Another GC runs (this process stands in for it).
    fake_marker(&store, "locks/gc", std::process::id(), 0, 0);
    let e = repo.gc().unwrap_err();
    assert!(e.to_string().contains("another garbage collection"), "{e}");
    // That GC died (its process is gone): its lock is stale.
    fake_marker(&store, "locks/gc", u32::MAX - 1, 0, 0);
    repo.gc().unwrap();
    assert!(!store.join("locks/gc").exists(), "the lock is released");
    repo.gc().unwrap();
}
