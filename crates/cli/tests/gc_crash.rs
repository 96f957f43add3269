//! kill -9 during GC at every point (issue 8, part 3): a real `vpsbackup
//! store gc` process SIGKILLs itself after its Nth storage write
//! (`VPSBACKUP_CRASH_AFTER_OPS=N`, the engine's crash-test hook), for N = 1
//! up to the number of writes a whole GC makes, on a copy of one store that
//! gives GC all of its kinds of work: a dead pack to condemn and delete, a
//! mostly dead pack to repack, several index objects to consolidate. After
//! every kill every remaining backup verifies and restores byte-identical,
//! and the next GC ends with the store an uninterrupted GC leaves.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

fn store(args: &[&str], crash_after: Option<u64>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vpsbackup"));
    cmd.arg("store").args(args).env("RUST_BACKTRACE", "0");
    if let Some(n) = crash_after {
        cmd.env("VPSBACKUP_CRASH_AFTER_OPS", n.to_string());
    }
    cmd.output().unwrap()
}

fn store_ok(args: &[&str]) -> String {
    let out = store(args, None);
    assert!(
        out.status.success(),
        "store {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(store_ok(args).trim()).unwrap()
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// A 16 MiB ext4 image holding `keep.bin` (1 MiB, the same in every image)
/// and `change.bin` (4 MiB, from `seed`).
fn image(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let tree = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("keep.bin"), random(1 << 20, 99)).unwrap();
    std::fs::write(tree.join("change.bin"), random(4 << 20, seed)).unwrap();
    let img = dir.join(format!("{name}.raw"));
    let out = Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&tree)
        .arg("-F")
        .arg(&img)
        .arg("16M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

fn copy_store(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    // -a keeps the objects' mtimes: GC's fence reads them.
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

fn same(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

/// Stored bytes, pack count and object count (markers and locks left out).
fn shape(dir: &Path) -> (u64, u64, u64) {
    let s = json(&["stats", dir.to_str().unwrap(), "--json"]);
    (
        s["stored_bytes"].as_u64().unwrap(),
        s["packs"].as_u64().unwrap(),
        s["objects"].as_u64().unwrap(),
    )
}

#[test]
fn gc_killed_after_every_storage_write_loses_nothing_and_the_next_gc_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let b = base.to_str().unwrap();
    let a1 = image(tmp.path(), "a1", 1);
    let a2 = image(tmp.path(), "a2", 2);
    let other = image(tmp.path(), "other", 3);
    let kept = image(tmp.path(), "kept", 4);
    for (id, server, img) in [
        ("a1", "1", &a1),
        ("a2", "1", &a2),
        ("other", "2", &other),
        ("kept", "3", &kept),
    ] {
        store_ok(&[
            "backup",
            b,
            "--id",
            id,
            "--server-id",
            server,
            "--disk",
            img.to_str().unwrap(),
        ]);
    }
    // a1's pack keeps only keep.bin and metadata alive (repack); other's
    // pack dies whole (condemn, delete).
    store_ok(&["delete", b, "a1"]);
    store_ok(&["delete", b, "other"]);
    let remaining = [("a2", &a2), ("kept", &kept)];

    // An uninterrupted GC on a copy: what every crashed run must end as.
    let reference = tmp.path().join("reference");
    copy_store(&base, &reference);
    let r = json(&["gc", reference.to_str().unwrap(), "--grace", "0", "--json"]);
    assert!(r["packs_deleted"].as_u64().unwrap() >= 2, "{r}");
    assert!(r["packs_rewritten"].as_u64().unwrap() >= 1, "{r}");
    let expected = shape(&reference);

    let work = tmp.path().join("work");
    let w = work.to_str().unwrap();
    let out_img = tmp.path().join("restored.raw");
    let mut kills = 0;
    for n in 1.. {
        assert!(n < 500, "GC never finished within 500 storage writes");
        copy_store(&base, &work);
        let run = store(&["gc", w, "--grace", "0"], Some(n));
        if run.status.success() {
            break;
        }
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            run.status.signal(),
            Some(9),
            "gc with crash point {n} failed instead of being killed: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        kills += 1;

        // No completed backup lost a chunk.
        let v = store(&["verify", w], None);
        assert!(
            v.status.success(),
            "after a kill at write {n}: {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
        for (id, img) in remaining {
            let _ = std::fs::remove_file(&out_img);
            store_ok(&["restore", w, id, "--to", out_img.to_str().unwrap()]);
            assert!(same(img, &out_img), "{id} after a kill at write {n}");
        }

        // The next GC finishes the work.
        store_ok(&["gc", w, "--grace", "0"]);
        assert_eq!(shape(&work), expected, "after a kill at write {n}");
        store_ok(&["verify", w]);
    }
    assert!(kills >= 8, "a whole GC made only {kills} storage writes");
    eprintln!("GC killed at each of its {kills} storage writes");
}
