//! The storage conformance suite against every backend: the local
//! filesystem, and S3 on a real Garage and a real Ceph radosgw; plus what
//! only one backend can show (local temp files, S3 conditional writes).

mod common;

use common::s3;
use std::time::Duration;
use vpsbackup_engine::storage::suite::check_backend;
use vpsbackup_engine::{LocalStorage, S3Storage, Storage, StorageError};

#[test]
fn garage_passes_the_backend_suite() {
    let s = S3Storage::open(s3::garage().config("suite")).unwrap();
    // Measured: Garage 2.5 overwrites on If-None-Match: *; the probe must see it.
    assert!(!s.put_if_absent_is_atomic(), "Garage ignores If-None-Match");
    check_backend(&s);
}

#[test]
fn ceph_passes_the_backend_suite() {
    let s = S3Storage::open(s3::ceph().config("suite")).unwrap();
    assert!(s.put_if_absent_is_atomic(), "Ceph honours If-None-Match");
    check_backend(&s);
}

#[test]
fn s3_stores_under_other_prefixes_are_invisible() {
    let srv = s3::garage();
    let a = S3Storage::open(srv.config("prefix-a")).unwrap();
    let b = S3Storage::open(srv.config("prefix-a")).unwrap();
    a.put_if_absent("packs/x", b"a").unwrap();
    assert!(b.list("").unwrap().is_empty());
    assert!(b.head("packs/x").unwrap().is_none());
    assert_eq!(a.list("").unwrap().len(), 1);
}

#[test]
fn s3_refuses_bad_credentials_with_a_clear_error() {
    let mut cfg = s3::garage().config("badkey");
    cfg.secret_access_key = "0".repeat(64);
    let secret = cfg.secret_access_key.clone();
    let err = S3Storage::open(cfg.clone()).unwrap_err();
    assert!(matches!(err, StorageError::Io { .. }), "{err:?}");
    assert!(!err.to_string().contains(&secret));
    assert!(
        !format!("{cfg:?}").contains(&secret),
        "Debug hides the keys"
    );
    assert!(!format!("{cfg:?}").contains(&cfg.access_key_id));
}

#[test]
fn local_storage_passes_the_backend_suite() {
    let t = tempfile::tempdir().unwrap();
    check_backend(&LocalStorage::new(&t.path().join("s")).unwrap());
}

#[test]
fn buffered_local_storage_passes_the_backend_suite() {
    let t = tempfile::tempdir().unwrap();
    check_backend(&LocalStorage::new(&t.path().join("s")).unwrap().buffered());
}

#[test]
fn temp_files_of_crashed_writers_are_invisible_and_cleaned() {
    let t = tempfile::tempdir().unwrap();
    let s = LocalStorage::new(t.path()).unwrap();
    s.put_if_absent("packs/ab/x", b"data").unwrap();
    // What a writer killed between write and link leaves behind.
    std::fs::write(t.path().join("packs/ab/.tmp-deadbeef"), b"partial").unwrap();
    let keys: Vec<String> = s.list("").unwrap().into_iter().map(|m| m.key).collect();
    assert_eq!(keys, ["packs/ab/x"]);
    assert_eq!(s.remove_stale_temp(Duration::from_secs(3600)).unwrap(), 0);
    assert_eq!(s.remove_stale_temp(Duration::ZERO).unwrap(), 1);
    assert!(!t.path().join("packs/ab/.tmp-deadbeef").exists());
    assert!(t.path().join("packs/ab/x").exists());
}
