//! Damage that heals, on real ext4 images and a real store directory: a
//! byte flipped in a real pack file, a deleted pack, a truncated pack, a
//! damaged index object and a damaged manifest. Each is reported, the
//! copies found bad are quarantined in the store, the next backup of the
//! unchanged disk stores fresh copies, and that repairs the older backups.
//! Every case runs on an unencrypted store (`plain::`) and on an encrypted
//! one (`encrypted::`), where damage is reported as tampering.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use vpsbackup_engine::{
    DiskImage, EngineError, EngineOptions, JobControl, Repository, RestoreOptions,
};

/// Flips one byte in the middle of the largest pack (a chunk's payload).
fn flip_byte_in_largest_pack(store: &Path) -> PathBuf {
    let victim = pack_files(store)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&victim, &bytes).unwrap();
    victim
}

fn objects(store: &Path, dir: &str) -> Vec<PathBuf> {
    match std::fs::read_dir(store.join(dir)) {
        Ok(rd) => {
            let mut v: Vec<PathBuf> = rd
                .map(|e| e.unwrap().path())
                .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with(".tmp"))
                .collect();
            v.sort();
            v
        }
        Err(_) => Vec::new(),
    }
}

fn verify_one(repo: &Repository, id: &str) -> vpsbackup_engine::BackupVerification {
    let mut r = repo.verify(Some(id), &JobControl::new()).unwrap();
    r.backups.remove(0)
}

fn restore_to(repo: &Repository, id: &str, target: &Path) -> Result<(), EngineError> {
    let _ = std::fs::remove_file(target);
    repo.restore(id, &[target.to_path_buf()], &JobControl::new())
        .map(|_| ())
}

/// The whole cycle: corrupt a chunk, verify (damaged, quarantined), back up
/// the unchanged disk from another handle on the store (one fresh chunk,
/// verifies clean, restores byte-identical), verify the old backup
/// (repaired, restores byte-identical); GC then drops the bad pack (a good
/// copy exists) and its quarantine record.
fn a_corrupt_chunk_is_quarantined_and_the_next_backup_repairs_it(enc: bool) {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let store = t.path().join("store");
    let repo = open_repo_as(&store, enc);
    backup(&repo, "old", "srv1", &[&img]);
    let victim = flip_byte_in_largest_pack(&store);

    let v = verify_one(&repo, "old");
    assert_eq!(v.corrupt_chunks.len(), 1, "{v:?}");
    assert!(v.missing_chunks.is_empty(), "{v:?}");
    assert_eq!(
        objects(&store, "quarantine").len(),
        1,
        "recorded in the store"
    );
    // Verifying again finds the same damage and records nothing new.
    assert_eq!(verify_one(&repo, "old").corrupt_chunks, v.corrupt_chunks);
    assert_eq!(objects(&store, "quarantine").len(), 1);

    // Another handle on the store (as another process would open it) sees
    // the quarantine: the unchanged disk's backup stores exactly the bad
    // chunk again, not a reference to the bad copy.
    let other = open_repo_as(&store, enc);
    let s = backup(&other, "new", "srv1", &[&img]);
    assert_eq!(s.chunks_new, 1, "only the quarantined chunk: {s:?}");
    let vn = verify_one(&other, "new");
    assert!(vn.is_ok(), "{vn:?}");
    let out = t.path().join("new.raw");
    restore_to(&other, "new", &out).unwrap();
    cmp(&img, &out);

    // Same chunk id, good copy: the old backup is repaired.
    let vo = verify_one(&repo, "old");
    assert!(vo.is_ok(), "{vo:?}");
    let out = t.path().join("old.raw");
    restore_to(&repo, "old", &out).unwrap();
    cmp(&img, &out);

    // GC: the bad pack's other chunks are live only there, so it stays
    // (with its record) at the default threshold...
    repo.gc().unwrap();
    assert!(victim.exists());
    assert_eq!(objects(&store, "quarantine").len(), 1);
    // ...and a GC that repacks everything not wholly live copies its good
    // chunks out, drops it (the quarantined copy is no live copy) and the
    // record naming it.
    let eager = repo.with_options(EngineOptions {
        repack_below: 1.0,
        ..repo.options().clone()
    });
    let r = eager.gc().unwrap();
    assert!(r.packs_rewritten >= 1 && r.packs_deleted >= 1, "{r:?}");
    assert!(!victim.exists(), "the pack with the bad copy is gone");
    assert!(
        objects(&store, "quarantine").is_empty(),
        "no record names a pack that is gone"
    );
    let all = repo.verify(None, &JobControl::new()).unwrap();
    assert!(all.is_ok(), "{all:?}");
    restore_to(&repo, "old", &out).unwrap();
    cmp(&img, &out);
}

/// A verify session that saw the damage, still open while the repairing
/// backup is made, finds the old backup good afterwards (the index changed,
/// so it looks again instead of trusting its memory of the damage).
fn a_long_verify_session_sees_the_repair(enc: bool) {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let store = t.path().join("store");
    let repo = open_repo_as(&store, enc);
    backup(&repo, "old", "srv1", &[&img]);
    flip_byte_in_largest_pack(&store);
    let mut session = repo.verify_session().unwrap();
    let v = session.verify("old", &JobControl::new()).unwrap();
    assert_eq!(v.corrupt_chunks.len(), 1);
    backup(&repo, "new", "srv1", &[&img]);
    let v = session.verify("new", &JobControl::new()).unwrap();
    assert!(v.is_ok(), "{v:?}");
    let v = session.verify("old", &JobControl::new()).unwrap();
    assert!(v.is_ok(), "{v:?}");
}

/// The provider's damaged restore: zeros exactly where the bad chunk sat
/// (every offset holding that content), the ranges listed; the default
/// restore still stops at the bad chunk. The restore quarantines the copy
/// it found bad, with no verify before it.
fn allow_damaged_restore_writes_zeros_exactly_at_the_bad_chunk(enc: bool) {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let store = t.path().join("store");
    let repo = open_repo_as(&store, enc);
    backup(&repo, "b", "srv1", &[&img]);
    flip_byte_in_largest_pack(&store);

    let out = t.path().join("out.raw");
    match restore_to(&repo, "b", &out) {
        Err(EngineError::Corrupt { .. }) if !enc => {}
        // An encrypted store tells tampering from random damage: it cannot.
        Err(EngineError::Tampered { .. }) if enc => {}
        other => panic!("the default restore must stop at the bad chunk: {other:?}"),
    }
    assert!(
        !out.exists(),
        "a failed restore leaves no half-written file"
    );
    assert_eq!(
        objects(&store, "quarantine").len(),
        1,
        "the restore quarantined it"
    );

    let s = repo
        .restore_with(
            "b",
            &[DiskImage::detect(&out)],
            RestoreOptions {
                allow_damaged: true,
            },
            &JobControl::new(),
        )
        .unwrap();
    assert!(!s.damaged.is_empty());
    // Where the bad chunk's content sits in the image, found by hashing it
    // (an encrypted store's ids are keyed: there, by its bytes).
    let bad = verify_one(&repo, "b").corrupt_chunks;
    assert_eq!(bad.len(), 1);
    assert_eq!(
        verify_one(&repo, "b").tampered_chunks.len(),
        usize::from(enc)
    );
    let disk = std::fs::read(&img).unwrap();
    let first_bad = s.damaged[0].offset as usize;
    let first_bad = &disk[first_bad..first_bad + 65536];
    let expected_offsets: Vec<u64> = disk
        .chunks(65536)
        .enumerate()
        .filter(|(_, c)| {
            if enc {
                c == &first_bad
            } else {
                blake3::hash(c).to_hex().as_str() == bad[0]
            }
        })
        .map(|(i, _)| i as u64 * 65536)
        .collect();
    assert!(!expected_offsets.is_empty());
    let got: Vec<(u64, u64)> = s
        .damaged
        .iter()
        .flat_map(|r| (0..r.chunks).map(move |k| (r.offset + k * 65536, 65536)))
        .collect();
    assert_eq!(
        got,
        expected_offsets
            .iter()
            .map(|o| (*o, 65536))
            .collect::<Vec<_>>(),
        "{:?}",
        s.damaged
    );
    let first = s.damaged[0];
    assert_eq!(
        first.to_string(),
        format!(
            "disk 0: bytes {}-{} ({} chunk{}) unreadable, written as zeros",
            first.offset,
            first.offset + first.len - 1,
            first.chunks,
            if first.chunks == 1 { "" } else { "s" }
        )
    );
    // The image with those chunks zeroed, byte for byte.
    let mut expected = disk.clone();
    for o in &expected_offsets {
        expected[*o as usize..*o as usize + 65536].fill(0);
    }
    let want = t.path().join("expected.raw");
    std::fs::write(&want, &expected).unwrap();
    cmp(&want, &out);
}

/// A deleted pack: verify reports its chunks missing, the next backup
/// stores them again, the old backup is repaired; GC drops the dead index
/// entries and the records naming the gone pack.
fn a_missing_pack_heals(enc: bool) {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let store = t.path().join("store");
    let repo = open_repo_as(&store, enc);
    backup(&repo, "old", "srv1", &[&img]);
    let victim = pack_files(&store).into_iter().next().unwrap();
    std::fs::remove_file(&victim).unwrap();

    let v = verify_one(&repo, "old");
    assert!(
        !v.missing_chunks.is_empty() && v.corrupt_chunks.is_empty(),
        "{v:?}"
    );
    let s = backup(&repo, "new", "srv1", &[&img]);
    // (chunks_new counts data chunks only; the lost pack may hold lists.)
    assert!(
        s.stored_bytes > 0,
        "the lost chunks are stored again: {s:?} {v:?}"
    );
    assert!(verify_one(&repo, "new").is_ok());
    assert!(verify_one(&repo, "old").is_ok());
    repo.gc().unwrap();
    assert!(objects(&store, "quarantine").is_empty());
    let out = t.path().join("old.raw");
    restore_to(&repo, "old", &out).unwrap();
    cmp(&img, &out);
}

/// A truncated pack: the chunks past the cut are corrupt ("truncated"),
/// those before it still good; the next backup heals it.
fn a_truncated_pack_heals(enc: bool) {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let store = t.path().join("store");
    let repo = open_repo_as(&store, enc);
    backup(&repo, "old", "srv1", &[&img]);
    let victim = pack_files(&store)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let len = std::fs::metadata(&victim).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);

    let v = verify_one(&repo, "old");
    assert!(!v.corrupt_chunks.is_empty(), "{v:?}");
    match restore_to(&repo, "old", &t.path().join("x.raw")) {
        Err(e @ EngineError::Corrupt { .. }) if !enc => {
            assert!(e.to_string().contains("truncated"), "{e}")
        }
        Err(e @ EngineError::Tampered { .. }) if enc => {
            assert!(e.to_string().contains("truncated"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    backup(&repo, "new", "srv1", &[&img]);
    assert!(verify_one(&repo, "old").is_ok());
    let out = t.path().join("old.raw");
    restore_to(&repo, "old", &out).unwrap();
    cmp(&img, &out);
}

/// A damaged index object: loading skips it (its chunks look missing, so
/// verify reports the backup and the next backup stores them again); GC
/// refuses to run, saying so, until the index is rebuilt from the packs.
fn a_damaged_index_object_is_reported_and_stops_only_gc(enc: bool) {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let store = t.path().join("store");
    let repo = open_repo_as(&store, enc);
    backup(&repo, "old", "srv1", &[&img]);
    let index = objects(&store, "index");
    assert_eq!(index.len(), 1);
    let mut bytes = std::fs::read(&index[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&index[0], &bytes).unwrap();

    let v = verify_one(&repo, "old");
    assert!(!v.missing_chunks.is_empty(), "{v:?}");
    let e = repo.gc().unwrap_err().to_string();
    assert!(
        e.contains("index object") && e.contains("rebuild-index") && e.contains("without deleting"),
        "{e}"
    );
    let packs = pack_files(&store).len();
    // Backups still work: everything is stored again.
    backup(&repo, "new", "srv1", &[&img]);
    assert!(verify_one(&repo, "new").is_ok());
    let out = t.path().join("new.raw");
    restore_to(&repo, "new", &out).unwrap();
    cmp(&img, &out);
    assert!(pack_files(&store).len() > packs);
    // The rebuilt index names every pack again; GC runs.
    repo.rebuild_index().unwrap();
    repo.gc().unwrap();
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
}

/// A damaged manifest: verify reports it, restore refuses with the reason,
/// GC stops naming the backup; the store's other backups are untouched.
fn a_damaged_manifest_is_reported(enc: bool) {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let store = t.path().join("store");
    let repo = open_repo_as(&store, enc);
    backup(&repo, "good", "srv1", &[&img]);
    backup(&repo, "bad", "srv2", &[&img]);
    let m = store.join("backups/bad");
    let mut bytes = std::fs::read(&m).unwrap();
    bytes[30] ^= 0x01;
    std::fs::write(&m, &bytes).unwrap();

    let all = repo.verify(None, &JobControl::new()).unwrap();
    let bad = all.backups.iter().find(|b| b.backup_id == "bad").unwrap();
    let said = if enc { "tampered with" } else { "damaged" };
    assert!(
        bad.manifest_error.as_deref().unwrap().contains(said),
        "{bad:?}"
    );
    assert!(all
        .backups
        .iter()
        .find(|b| b.backup_id == "good")
        .unwrap()
        .is_ok());
    let e = restore_to(&repo, "bad", &t.path().join("x.raw")).unwrap_err();
    if enc {
        assert!(matches!(e, EngineError::Tampered { .. }), "{e}");
    } else {
        assert!(matches!(e, EngineError::BadObject { .. }), "{e}");
    }
    let e = repo.gc().unwrap_err().to_string();
    assert!(
        e.contains("backup bad") && e.contains("without deleting"),
        "{e}"
    );
    let out = t.path().join("good.raw");
    restore_to(&repo, "good", &out).unwrap();
    cmp(&img, &out);
}

/// Each case above on an unencrypted and on an encrypted store.
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod plain {
            $(#[test]
            fn $name() {
                super::$name(false)
            })*
        }
        mod encrypted {
            $(#[test]
            fn $name() {
                super::$name(true)
            })*
        }
    };
}

both!(
    a_corrupt_chunk_is_quarantined_and_the_next_backup_repairs_it,
    a_long_verify_session_sees_the_repair,
    allow_damaged_restore_writes_zeros_exactly_at_the_bad_chunk,
    a_missing_pack_heals,
    a_truncated_pack_heals,
    a_damaged_index_object_is_reported_and_stops_only_gc,
    a_damaged_manifest_is_reported
);
