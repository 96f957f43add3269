//! The storage conformance suite against the local filesystem backend, plus
//! what only a local directory can show (temp files, durability layout).

use std::time::Duration;
use vpsbackup_engine::storage::suite::check_backend;
use vpsbackup_engine::{LocalStorage, Storage};

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
