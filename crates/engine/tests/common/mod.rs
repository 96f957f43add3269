//! Helpers shared by the engine's integration tests: real ext4 images made
//! with `mke2fs -d` from real files, qcow2 images made with `qemu-img`, and
//! byte-for-byte comparison with `cmp`.
#![allow(dead_code)]

pub mod fault_proxy;
pub mod s3;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use vpsbackup_engine::{
    BackupRequest, BackupSummary, DiskImage, EngineOptions, JobControl, LocalStorage, Repository,
};

pub fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copies real files (a slice of /usr) into `dir/root`, about `mb` MB.
pub fn make_tree(dir: &Path, name: &str, sources: &[&str]) -> PathBuf {
    let root = dir.join(name);
    std::fs::create_dir_all(&root).unwrap();
    for s in sources {
        run(Command::new("cp").arg("-a").arg(s).arg(&root));
    }
    root
}

/// A raw ext4 image of `size` (e.g. "48M") holding `tree`.
pub fn make_ext4(path: &Path, tree: &Path, size: &str) {
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
        .arg(tree)
        .arg("-F")
        .arg(path)
        .arg(size));
}

/// The standard test image: ~25 MB of Perl modules in a 64 MiB ext4.
pub fn base_image(dir: &Path) -> PathBuf {
    let tree = make_tree(dir, "tree", &["/usr/share/perl"]);
    let img = dir.join("base.raw");
    make_ext4(&img, &tree, "64M");
    img
}

pub fn cmp(a: &Path, b: &Path) {
    let out = Command::new("cmp").arg(a).arg(b).output().unwrap();
    assert!(
        out.status.success(),
        "{} and {} differ: {}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Converts a qcow2 (or any image) to raw for comparison.
pub fn to_raw(src: &Path, dst: &Path) {
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(src)
        .arg(dst));
}

/// Test options: small packs so tests exercise many packs, no GC grace,
/// backups and restores through the on-disk index cache (one directory
/// per store id under a shared temp dir, so every test store has its own).
pub fn test_options() -> EngineOptions {
    EngineOptions {
        pack_target: 2 << 20,
        gc_grace: std::time::Duration::ZERO,
        index_cache: Some(std::env::temp_dir().join("vpsbackup-engine-tests-index-cache")),
        ..EngineOptions::default()
    }
}

pub fn open_repo(dir: &Path) -> Repository {
    Repository::open_with(
        Arc::new(LocalStorage::new(dir).unwrap()),
        test_options(),
        vpsbackup_engine::DEFAULT_CHUNK_SIZE,
    )
    .unwrap()
}

/// [`open_repo`], or with `encrypted` an encrypted store opened with the
/// key file beside it (`<dir>.key`, written on first use).
pub fn open_repo_as(dir: &Path, encrypted: bool) -> Repository {
    if !encrypted {
        return open_repo(dir);
    }
    let key = dir.with_extension("key");
    if !key.exists() {
        vpsbackup_engine::generate_key_file(&key).unwrap();
    }
    Repository::open_keyed(
        Arc::new(LocalStorage::new(dir).unwrap()),
        test_options(),
        vpsbackup_engine::DEFAULT_CHUNK_SIZE,
        &vpsbackup_engine::StoreKey::KeyFile(key),
    )
    .unwrap()
}

pub fn backup(repo: &Repository, id: &str, server: &str, disks: &[&Path]) -> BackupSummary {
    let req = BackupRequest {
        backup_id: id.into(),
        server_id: server.into(),
        server_name: format!("{server}.example"),
        disks: disks.iter().map(|p| DiskImage::detect(*p)).collect(),
        read_limit: None,
    };
    let job = JobControl::new();
    let s = repo.backup(&req, &job).unwrap();
    assert_eq!(job.percent(), 100);
    s
}

pub fn restore(repo: &Repository, id: &str, targets: &[&Path]) -> vpsbackup_engine::RestoreSummary {
    let targets: Vec<PathBuf> = targets.iter().map(|p| p.to_path_buf()).collect();
    repo.restore(id, &targets, &JobControl::new()).unwrap()
}

/// Sum of pack sizes in the store.
pub fn stored(repo: &Repository) -> u64 {
    repo.stats().unwrap().stored_bytes
}

/// Overwrites `count` 64 KiB regions of `img` with random bytes (seeded).
pub fn scatter_writes(img: &Path, count: u32, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    let size = f.metadata().unwrap().len();
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..count {
        let off = next() % (size / 65536) * 65536;
        let data: Vec<u8> = (0..65536).map(|_| next() as u8).collect();
        f.write_all_at(&data, off).unwrap();
    }
}

/// Every pack file of a local store, sorted.
pub fn pack_files(store: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in std::fs::read_dir(store.join("packs")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            v.push(f.unwrap().path());
        }
    }
    v.sort();
    v
}

/// Bit rot: flips `len` bytes in the middle of the store's largest pack (its
/// chunk payloads), in place, as a failing disk would (the name stays).
pub fn rot_largest_pack(store: &Path, len: usize) -> PathBuf {
    let victim = pack_files(store)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + len] {
        *b ^= 0x5a;
    }
    std::fs::write(&victim, &bytes).unwrap();
    victim
}
/// GCs run back to back beside running backups into `repo` (scratch files
/// in `dir`): everything the backups reference survives, and they restore
/// byte for byte.
pub fn gc_beside_running_backups(repo: &Repository, dir: &Path) {
    let img = base_image(dir);
    let changed = dir.join("changed.raw");
    std::fs::copy(&img, &changed).unwrap();
    scatter_writes(&changed, 60, 3);
    backup(repo, "old", "srv1", &[&img]);
    // The old backup is deleted: all its chunks are garbage, except that the
    // running backup below will reference most of them by dedup.
    repo.delete_backup("old").unwrap();

    let job = Arc::new(JobControl::new());
    let req = BackupRequest {
        backup_id: "new".into(),
        server_id: "srv1".into(),
        server_name: String::new(),
        disks: vec![DiskImage::detect(&changed)],
        // Slow enough that several GCs run while it is in flight.
        read_limit: Some(16 << 20),
    };
    let (repo2, job2) = (repo.clone(), job.clone());
    let writer = std::thread::spawn(move || repo2.backup(&req, &job2));
    let mut gcs = 0;
    while !writer.is_finished() {
        repo.gc().unwrap();
        gcs += 1;
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    writer.join().unwrap().unwrap();
    assert!(gcs >= 3, "only {gcs} GCs ran during the backup");
    // Everything the new backup references survived.
    assert!(repo
        .verify(Some("new"), &JobControl::new())
        .unwrap()
        .is_ok());
    // A GC now may collect what nothing references any more, and still the
    // backup restores byte for byte.
    repo.gc().unwrap();
    repo.gc().unwrap();
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
    let o = dir.join("o.raw");
    restore(repo, "new", &[&o]);
    cmp(&changed, &o);

    // Many backups finishing while GCs run back to back: each manifest that
    // appears mid-GC names chunks the GC's index may not hold yet.
    let versions: Vec<PathBuf> = (0..6u64)
        .map(|i| {
            let v = dir.join(format!("v{i}.raw"));
            std::fs::copy(&img, &v).unwrap();
            scatter_writes(&v, 30, 100 + i);
            v
        })
        .collect();
    let (repo2, vs) = (repo.clone(), versions.clone());
    let writer = std::thread::spawn(move || {
        for (i, v) in vs.iter().enumerate() {
            backup(&repo2, &format!("v{i}"), "srv1", &[v]);
        }
    });
    while !writer.is_finished() {
        repo.gc().unwrap();
    }
    writer.join().unwrap();
    repo.gc().unwrap();
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
    let o = dir.join("o5.raw");
    restore(repo, "v5", &[&o]);
    cmp(&versions[5], &o);
}
