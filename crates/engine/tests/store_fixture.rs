//! Store format stability (issue 8, part 3): a small store written by an
//! earlier version is committed under `tests/fixtures/store-v1/` (see the
//! README there). Every later version must list it, verify it clean and
//! restore each disk of each backup to the bytes recorded in
//! `checksums.txt` (SHA-256 by the real `sha256sum`, taken of the source
//! images when the fixture was written, not of a restore).
//!
//! `write_fixture` (ignored) is how it was made; run it only to make a new
//! fixture next to the old one, never to overwrite the committed store.

mod common;
use common::{cmp, make_ext4, run};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use vpsbackup_engine::{
    BackupRequest, DiskImage, EngineOptions, JobControl, LocalStorage, Repository,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The store in fixture `dir`, opened with the key file beside it if it has
/// one (an encrypted fixture).
fn open(dir: &Path, store: &Path) -> Repository {
    let storage = Arc::new(LocalStorage::new(store).unwrap());
    let key = dir.join("key");
    if !key.exists() {
        return Repository::open(storage).unwrap();
    }
    Repository::open_keyed(
        storage,
        EngineOptions::default(),
        vpsbackup_engine::DEFAULT_CHUNK_SIZE,
        &vpsbackup_engine::StoreKey::KeyFile(key),
    )
    .unwrap()
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// `backup_id disk_index sha256 size` per line.
fn checksums(dir: &Path) -> Vec<(String, usize, String, u64)> {
    std::fs::read_to_string(dir.join("checksums.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].to_owned(),
                f[1].parse().unwrap(),
                f[2].to_owned(),
                f[3].parse().unwrap(),
            )
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    run(Command::new("cp").arg("-a").arg(from).arg(to));
}

#[test]
fn the_committed_store_reads_verifies_and_restores_to_its_checksums() {
    reads_verifies_and_restores(&fixture("store-v1"));
}

/// An encrypted store written with XChaCha20-Poly1305 (before stores were
/// sealed with AES-256-GCM) reads, restores and takes new backups as ever.
#[test]
fn the_committed_xchacha_store_reads_restores_and_takes_backups() {
    let dir = fixture("store-v2-xchacha");
    let (tmp, repo) = reads_verifies_and_restores(&dir);
    let config = std::fs::read(tmp.path().join("store/config")).unwrap();
    assert!(String::from_utf8_lossy(&config).contains("xchacha20poly1305"));
    // A new backup into it is sealed with the store's own cipher and
    // deduplicates against what is there.
    let t = tmp.path();
    let lines =
        |n: usize, word: &str| -> String { (0..n).map(|i| format!("{word} line {i}\n")).collect() };
    let img = image(
        t,
        "raw3",
        &[
            ("notes.txt", lines(3000, "first")),
            ("third.txt", lines(300, "third")),
        ],
    );
    let req = BackupRequest {
        backup_id: "raw-3".into(),
        server_id: "101".into(),
        server_name: "vps-101".into(),
        disks: vec![DiskImage::detect(&img)],
        read_limit: None,
    };
    let summary = repo.backup(&req, &JobControl::new()).unwrap();
    assert!(summary.chunks_new < summary.chunks_total, "{summary:?}");
    let repo = open(&dir, &t.join("store"));
    let out = t.join("raw-3.restored");
    repo.restore_disk("raw-3", 0, &out, &JobControl::new())
        .unwrap();
    cmp(&img, &out);
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
}

/// Lists, verifies and restores every disk of the fixture in `dir` (on a
/// copy); returns the copy and the store opened on it.
fn reads_verifies_and_restores(dir: &Path) -> (tempfile::TempDir, Repository) {
    let tmp = tempfile::tempdir().unwrap();
    // Restores and verifies register markers in the store: work on a copy.
    let store = tmp.path().join("store");
    copy_dir(&dir.join("store"), &store);
    let repo = open(dir, &store);

    let expected = checksums(dir);
    let mut ids: Vec<String> = expected.iter().map(|c| c.0.clone()).collect();
    ids.dedup();
    let listed: Vec<String> = repo
        .list_backups()
        .unwrap()
        .into_iter()
        .map(|b| b.backup_id)
        .collect();
    let mut sorted = listed.clone();
    sorted.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(sorted, want);

    let report = repo.verify(None, &JobControl::new()).unwrap();
    assert!(report.is_ok(), "{report:?}");

    for (id, disk, sum, size) in &expected {
        let info = repo.backup_info(id).unwrap();
        assert_eq!(info.disks[*disk].size, *size, "{id} disk {disk}");
        let out = tmp.path().join(format!("{id}-{disk}.img"));
        repo.restore_disk(id, *disk, &out, &JobControl::new())
            .unwrap();
        assert_eq!(&sha256(&out), sum, "{id} disk {disk}");
    }
    (tmp, repo)
}

/// A small ext4 image holding `files` (name, content).
fn image(dir: &Path, name: &str, files: &[(&str, String)]) -> PathBuf {
    let tree = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&tree).unwrap();
    for (f, content) in files {
        std::fs::write(tree.join(f), content).unwrap();
    }
    let img = dir.join(format!("{name}.img"));
    make_ext4(&img, &tree, "4M");
    img
}

#[test]
#[ignore = "writes a new fixture store; see tests/fixtures/README.md"]
fn write_fixture() {
    let out = PathBuf::from(std::env::var("FIXTURE_OUT").expect("FIXTURE_OUT=dir"));
    assert!(
        !out.exists(),
        "{} exists; choose a new directory",
        out.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let lines =
        |n: usize, word: &str| -> String { (0..n).map(|i| format!("{word} line {i}\n")).collect() };

    let raw = image(t, "raw", &[("notes.txt", lines(3000, "first"))]);
    let qsrc = image(t, "qsrc", &[("app.conf", lines(2000, "qcow2"))]);
    let qcow = t.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&qsrc)
        .arg(&qcow));
    let sys = image(t, "sys", &[("os-release", lines(100, "system"))]);
    let data = image(t, "data", &[("db.bin", lines(4000, "data"))]);
    // The day after: the first disk changed a little (an incremental backup).
    let raw2 = image(
        t,
        "raw2",
        &[
            ("notes.txt", lines(3000, "first")),
            ("new.txt", lines(500, "second")),
        ],
    );

    let store = out.join("store");
    // FIXTURE_ENCRYPTED=1: an encrypted store, its key file beside it.
    let key = std::env::var_os("FIXTURE_ENCRYPTED").map(|_| {
        std::fs::create_dir_all(&out).unwrap();
        let key = out.join("key");
        vpsbackup_engine::generate_key_file(&key).unwrap();
        vpsbackup_engine::StoreKey::KeyFile(key)
    });
    let repo = Repository::open_keyed(
        Arc::new(LocalStorage::new(&store).unwrap()),
        EngineOptions::default(),
        vpsbackup_engine::DEFAULT_CHUNK_SIZE,
        key.as_ref().unwrap_or(&vpsbackup_engine::StoreKey::None),
    )
    .unwrap();
    let backups: [(&str, &str, Vec<&Path>); 4] = [
        ("raw-1", "101", vec![&raw]),
        ("qcow2-1", "102", vec![&qcow]),
        ("twodisks-1", "103", vec![&sys, &data]),
        ("raw-2", "101", vec![&raw2]),
    ];
    let mut sums = String::from("# backup_id disk_index sha256_of_guest_bytes size\n");
    for (id, server, disks) in &backups {
        let req = BackupRequest {
            backup_id: (*id).into(),
            server_id: (*server).into(),
            server_name: format!("vps-{server}"),
            disks: disks.iter().map(|d| DiskImage::detect(*d)).collect(),
            read_limit: None,
        };
        repo.backup(&req, &JobControl::new()).unwrap();
        for (i, d) in disks.iter().enumerate() {
            // The guest's bytes: a qcow2 image's as raw.
            let guest = t.join(format!("{id}-{i}.guest"));
            run(Command::new("qemu-img")
                .args(["convert", "-q", "-O", "raw"])
                .arg(d)
                .arg(&guest));
            let size = std::fs::metadata(&guest).unwrap().len();
            sums.push_str(&format!("{id} {i} {} {size}\n", sha256(&guest)));
            let restored = t.join(format!("{id}-{i}.restored"));
            repo.restore_disk(id, i, &restored, &JobControl::new())
                .unwrap();
            cmp(&guest, &restored);
        }
    }
    // Only the objects: no markers of this process, no empty directories.
    for d in ["writers", "locks", "pending"] {
        let _ = std::fs::remove_dir_all(store.join(d));
    }
    std::fs::write(out.join("checksums.txt"), sums).unwrap();
}
