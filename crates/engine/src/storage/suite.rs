//! One conformance suite for every [`Storage`] backend: each backend's tests
//! call [`check_backend`] on an empty instance (the local filesystem now,
//! S3-compatible stores on Garage and Ceph). It panics with a message on
//! the first contract violation.

use super::{Storage, StorageError};

/// Runs every check against `s`, which must be empty.
pub fn check_backend(s: &dyn Storage) {
    put_if_absent_writes_once(s);
    get_range_reads_exact_bytes(s);
    list_filters_by_prefix(s);
    put_replaces_and_delete_is_idempotent(s);
    invalid_keys_are_refused(s);
    if s.put_if_absent_is_atomic() {
        concurrent_put_if_absent_has_one_winner(s);
    }
    large_objects_round_trip(s);
    listing_returns_every_page(s);
}

/// More keys than one S3 LIST page holds (1000).
fn listing_returns_every_page(s: &dyn Storage) {
    let n = 1100u32;
    std::thread::scope(|scope| {
        for t in 0..8u32 {
            scope.spawn(move || {
                for i in (t..n).step_by(8) {
                    assert!(s.put_if_absent(&format!("t7/k{i:05}"), b"x").unwrap());
                }
            });
        }
    });
    let mut keys: Vec<String> = s.list("t7/").unwrap().into_iter().map(|m| m.key).collect();
    keys.sort();
    let want: Vec<String> = (0..n).map(|i| format!("t7/k{i:05}")).collect();
    assert_eq!(keys, want, "every key of a listing longer than a page");
}

fn large_objects_round_trip(s: &dyn Storage) {
    // Pack-sized, and not a multiple of any page or sector size.
    let data: Vec<u8> = (0..(3 << 20) + 123u32).map(|i| (i % 253) as u8).collect();
    assert!(s.put_if_absent("t6/big", &data).unwrap());
    assert_eq!(s.head("t6/big").unwrap().unwrap().size, data.len() as u64);
    assert_eq!(s.get("t6/big").unwrap(), data);
    let tail = s.get_range("t6/big", data.len() as u64 - 200, 200).unwrap();
    assert_eq!(tail, &data[data.len() - 200..]);
    assert!(!s.put_if_absent("t6/big", b"small").unwrap());
}

fn put_if_absent_writes_once(s: &dyn Storage) {
    assert!(
        s.put_if_absent("t1/a", b"first").unwrap(),
        "first put must write"
    );
    assert!(
        !s.put_if_absent("t1/a", b"second").unwrap(),
        "second put must not write"
    );
    assert_eq!(s.get("t1/a").unwrap(), b"first");
    let meta = s.head("t1/a").unwrap().expect("head of a stored object");
    assert_eq!(meta.size, 5);
    assert_eq!(meta.key, "t1/a");
    assert!(s.head("t1/missing").unwrap().is_none());
    assert!(matches!(
        s.get("t1/missing"),
        Err(StorageError::NotFound(_))
    ));
}

fn get_range_reads_exact_bytes(s: &dyn Storage) {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    s.put_if_absent("t2/obj", &data).unwrap();
    assert_eq!(s.get_range("t2/obj", 0, 10).unwrap(), &data[..10]);
    assert_eq!(s.get_range("t2/obj", 9_990, 10).unwrap(), &data[9_990..]);
    assert_eq!(s.get_range("t2/obj", 1234, 0).unwrap(), b"");
    assert!(
        s.get_range("t2/obj", 9_995, 10).is_err(),
        "range past the end"
    );
    assert!(matches!(
        s.get_range("t2/none", 0, 1),
        Err(StorageError::NotFound(_))
    ));
}

fn list_filters_by_prefix(s: &dyn Storage) {
    for k in ["t3/x/1", "t3/x/2", "t3/y/1", "t3/xz", "t3other"] {
        s.put_if_absent(k, k.as_bytes()).unwrap();
    }
    let mut keys: Vec<String> = s.list("t3/x").unwrap().into_iter().map(|m| m.key).collect();
    keys.sort();
    assert_eq!(keys, ["t3/x/1", "t3/x/2", "t3/xz"]);
    let mut keys: Vec<String> = s.list("t3/").unwrap().into_iter().map(|m| m.key).collect();
    keys.sort();
    assert_eq!(keys, ["t3/x/1", "t3/x/2", "t3/xz", "t3/y/1"]);
    assert!(s.list("t3/nothing/").unwrap().is_empty());
    let sizes: Vec<u64> = s.list("t3/y/").unwrap().iter().map(|m| m.size).collect();
    assert_eq!(sizes, [6]);
}

fn put_replaces_and_delete_is_idempotent(s: &dyn Storage) {
    s.put("t4/m", b"one").unwrap();
    s.put("t4/m", b"two!").unwrap();
    assert_eq!(s.get("t4/m").unwrap(), b"two!");
    s.delete("t4/m").unwrap();
    s.delete("t4/m").unwrap();
    assert!(s.head("t4/m").unwrap().is_none());
    assert!(s.list("t4/").unwrap().is_empty());
    // A deleted key can be written again.
    assert!(s.put_if_absent("t4/m", b"three").unwrap());
}

fn invalid_keys_are_refused(s: &dyn Storage) {
    for k in ["", "../x", "a//b", "a/./b", "/abs", "a/.tmp-x", "sp ace"] {
        assert!(
            matches!(s.put_if_absent(k, b"x"), Err(StorageError::InvalidKey(_))),
            "key {k:?} must be refused"
        );
    }
}

fn concurrent_put_if_absent_has_one_winner(s: &dyn Storage) {
    let wins = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for i in 0..8u8 {
            let wins = &wins;
            scope.spawn(move || {
                if s.put_if_absent("t5/race", &[i; 1000]).unwrap() {
                    wins.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    assert_eq!(wins.into_inner(), 1, "exactly one concurrent writer wins");
    let v = s.get("t5/race").unwrap();
    assert_eq!(v.len(), 1000);
    assert!(v.iter().all(|b| *b == v[0]), "the winner's object is whole");
}
