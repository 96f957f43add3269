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
