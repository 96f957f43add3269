//! Verify sessions on real ext4 images and a real store directory: backups
//! verified one after another read each shared chunk once, damage in a
//! shared chunk is reported on every backup that holds it, and GC's fence
//! holds for the session's whole life.

mod common;

use common::*;
use vpsbackup_engine::{BackupVerification, EngineError, JobControl};

fn verify(s: &mut vpsbackup_engine::VerifySession, id: &str) -> BackupVerification {
    let job = JobControl::new();
    let v = s.verify(id, &job).unwrap();
    assert_eq!(job.percent(), 100);
    v
}

/// Two backups of one image, then one of the image after a 1% change: in
/// one session the second reads nothing and the third only what changed;
/// without memory each reads everything again.
#[test]
fn a_session_reads_each_shared_chunk_once() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let changed = t.path().join("changed.raw");
    std::fs::copy(&img, &changed).unwrap();
    scatter_writes(&changed, 10, 3);
    let store = t.path().join("store");
    let repo = open_repo(&store);
    backup(&repo, "day1", "srv1", &[&img]);
    backup(&repo, "day2", "srv1", &[&img]);
    let s3 = backup(&repo, "day3", "srv1", &[&changed]);
    assert!(s3.chunks_new > 0 && s3.chunks_new <= 10, "{s3:?}");

    let mut session = repo.verify_session().unwrap();
    let v1 = verify(&mut session, "day1");
    let v2 = verify(&mut session, "day2");
    let v3 = verify(&mut session, "day3");
    for v in [&v1, &v2, &v3] {
        assert!(v.is_ok(), "{v:?}");
    }
    assert!(v1.chunks_read > 100, "{v1:?}");
    assert!(v1.bytes_read > 1 << 20, "{v1:?}");
    assert_eq!(
        (v2.chunks_read, v2.bytes_read),
        (0, 0),
        "the same image again: every chunk list is remembered whole: {v2:?}"
    );
    assert!(v2.chunks_remembered >= 1, "{v2:?}");
    // The changed chunks, and the list naming them; the rest from memory.
    assert!(
        v3.chunks_read >= s3.chunks_new && v3.chunks_read <= s3.chunks_new + 1,
        "{v3:?} after {s3:?}"
    );
    assert!(v3.chunks_remembered > v1.chunks_read / 2, "{v3:?}");
    // Only those chunks' bytes (the changes are random, so stored raw).
    assert!(v3.bytes_read <= v3.chunks_read * 65536, "{v3:?}");
    assert!(v3.bytes_read * 5 < v1.bytes_read, "{v3:?} vs {v1:?}");
    assert!(session.remembered() as u64 >= v1.chunks_read);
    drop(session);

    // Remembering nothing, every backup reads all its chunks.
    let mut forgetful = repo.verify_session_remembering(0).unwrap();
    let w1 = verify(&mut forgetful, "day1");
    let w2 = verify(&mut forgetful, "day2");
    assert!(w1.is_ok() && w2.is_ok());
    assert_eq!(w1.chunks_read, v1.chunks_read);
    assert_eq!(w2.chunks_read, v1.chunks_read);
    assert_eq!(w2.chunks_remembered, 0);
    assert_eq!(forgetful.remembered(), 0);

    // The whole-store verify reads each distinct chunk once too.
    let all = repo.verify(None, &JobControl::new()).unwrap();
    assert!(all.is_ok());
    assert_eq!(all.chunks_checked, v1.chunks_read + v3.chunks_read);
    // A single backup's verify reads all of it.
    let one = repo.verify(Some("day2"), &JobControl::new()).unwrap();
    assert_eq!(one.chunks_checked, v1.chunks_read);
}

/// A byte flipped in a pack chunk both backups share: both are reported
/// corrupt with the same chunk ids in one session, and forgetting the
/// damage makes the session read those chunks again (a confirmation), not
/// the whole backup. A deleted pack is reported missing on both likewise.
#[test]
fn damage_in_a_shared_chunk_is_reported_on_every_backup() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let store = t.path().join("store");
    let repo = open_repo(&store);
    backup(&repo, "a", "srv1", &[&img]);
    backup(&repo, "b", "srv1", &[&img]);

    let victim = rot_largest_pack(&store, 1);

    let mut session = repo.verify_session().unwrap();
    let va = verify(&mut session, "a");
    let vb = verify(&mut session, "b");
    assert_eq!(va.corrupt_chunks.len(), 1, "one byte, one chunk: {va:?}");
    assert!(va.missing_chunks.is_empty());
    assert_eq!(
        vb.corrupt_chunks, va.corrupt_chunks,
        "the same chunk on both"
    );
    assert!(!vb.is_ok());
    // The list naming the bad chunk is read again (it was not good as a
    // whole); the bad chunk's verdict comes from memory.
    assert_eq!(vb.chunks_read, 1, "{vb:?}");

    session.forget_damage();
    let again = verify(&mut session, "b");
    assert_eq!(again.corrupt_chunks, va.corrupt_chunks);
    assert_eq!(
        again.chunks_read, 2,
        "the list and the bad chunk: {again:?}"
    );

    // The whole-store verify agrees.
    let all = repo.verify(None, &JobControl::new()).unwrap();
    assert_eq!(all.backups.len(), 2);
    for v in &all.backups {
        assert_eq!(v.corrupt_chunks, va.corrupt_chunks, "{v:?}");
    }
    drop(session);

    // A lost pack: its chunks are missing from both backups.
    std::fs::remove_file(&victim).unwrap();
    let mut session = repo.verify_session().unwrap();
    let ma = verify(&mut session, "a");
    let mb = verify(&mut session, "b");
    assert!(ma.missing_chunks.len() > 1, "{ma:?}");
    assert!(ma.corrupt_chunks.is_empty(), "{ma:?}");
    assert_eq!(mb.missing_chunks, ma.missing_chunks);

    // An unknown backup is an error; the session stays usable.
    assert!(matches!(
        session.verify("nope", &JobControl::new()),
        Err(EngineError::BackupNotFound(_))
    ));
    assert_eq!(verify(&mut session, "a").missing_chunks, ma.missing_chunks);
}

/// A backup that finishes after the session loaded its index is verified
/// whole (the session reloads the index rather than calling its chunks
/// missing), and a cancelled verification stops.
#[test]
fn a_backup_made_during_the_session_is_verified() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let other = t.path().join("other.raw");
    let tree = make_tree(t.path(), "tree2", &["/usr/share/perl5"]);
    make_ext4(&other, &tree, "24M");
    let store = t.path().join("store");
    let repo = open_repo(&store);
    backup(&repo, "first", "srv1", &[&img]);

    let mut session = repo.verify_session().unwrap();
    assert!(verify(&mut session, "first").is_ok());
    let s = backup(&repo, "later", "srv2", &[&other]);
    let v = verify(&mut session, "later");
    assert!(v.is_ok(), "{v:?}");
    assert!(v.chunks_read >= s.chunks_new, "{v:?} {s:?}");

    let job = JobControl::new();
    job.cancel();
    session.forget_damage();
    assert!(matches!(
        session.verify("first", &job),
        Err(EngineError::Cancelled)
    ));
}

/// While a session lives, GC deletes no pack condemned after it began (it
/// may still read them); once it is dropped, the next GC does.
#[test]
fn gc_keeps_packs_a_running_session_may_read() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let other = t.path().join("other.raw");
    let tree = make_tree(t.path(), "tree2", &["/usr/share/perl5"]);
    make_ext4(&other, &tree, "24M");
    let store = t.path().join("store");
    let repo = open_repo(&store);
    backup(&repo, "keep", "srv1", &[&img]);
    backup(&repo, "drop", "srv2", &[&other]);

    let mut session = repo.verify_session().unwrap();
    assert!(verify(&mut session, "keep").is_ok());
    repo.delete_backup("drop").unwrap();
    let packs = pack_files(&store).len();
    let r = repo.gc().unwrap();
    assert_eq!(r.packs_deleted, 0, "{r:?}");
    assert!(r.packs_pending > 0, "{r:?}");
    assert_eq!(pack_files(&store).len(), packs);
    assert!(verify(&mut session, "keep").is_ok());
    drop(session);

    let r = repo.gc().unwrap();
    assert!(r.packs_deleted > 0, "{r:?}");
    assert!(pack_files(&store).len() < packs);
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
}
