//! A store that runs out of space (issue 8, part 3): the store lives on a
//! real, small tmpfs mount, so the kernel answers ENOSPC. The backup fails
//! with "no space left on the backup store", leaves no temp files, the store
//! stays consistent, GC runs, and after the mount grows the next backup
//! succeeds and restores byte-identical.
//!
//! Needs root for `mount`; skips with a message otherwise (CI runs as root).

mod common;
use common::{cmp, make_ext4, open_repo, restore, run};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use vpsbackup_engine::{BackupRequest, DiskImage, EngineError, JobControl};

/// A tmpfs mounted for the test; unmounted on drop, on every path.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        if std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(1)
            != 0
        {
            eprintln!("SKIPPED: mounting a tmpfs needs root (CI runs as root)");
            return None;
        }
        std::fs::create_dir_all(at).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at));
        Some(Tmpfs(at.to_owned()))
    }

    fn resize(&self, size: &str) {
        run(Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// An ext4 image holding `mb` MiB of incompressible bytes (seeded).
fn random_image(dir: &Path, name: &str, mb: usize, seed: u64) -> PathBuf {
    let tree = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&tree).unwrap();
    let mut x = seed | 1;
    let data: Vec<u8> = (0..mb * 1024 * 1024 / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(tree.join("data.bin"), data).unwrap();
    let img = dir.join(format!("{name}.raw"));
    make_ext4(&img, &tree, &format!("{}M", mb + 8));
    img
}

fn request(id: &str, disk: &Path) -> BackupRequest {
    BackupRequest {
        backup_id: id.into(),
        server_id: "7".into(),
        server_name: "vps-7".into(),
        disks: vec![DiskImage::detect(disk)],
        read_limit: None,
    }
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(temp_files(&p));
        } else if p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".tmp-")
        {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_full_store_fails_the_backup_cleanly_and_recovers_once_space_is_freed() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mount) = Tmpfs::mount(&tmp.path().join("mnt"), "6M") else {
        return;
    };
    let store = mount.0.join("store");
    let small = random_image(tmp.path(), "small", 1, 11);
    let big = random_image(tmp.path(), "big", 12, 12);

    let repo = open_repo(&store);
    common::backup(&repo, "b-small", "7", &[&small]);

    // 12 MiB of incompressible data cannot fit in what is left of 6 MiB.
    let err = repo
        .backup(&request("b-big", &big), &JobControl::new())
        .unwrap_err();
    assert!(matches!(err, EngineError::StoreFull), "{err:?}");
    assert!(
        err.to_string()
            .contains("no space left on the backup store"),
        "{err}"
    );
    assert!(temp_files(&store).is_empty(), "{:?}", temp_files(&store));
    assert_eq!(repo.backup_ids().unwrap(), vec!["b-small".to_owned()]);
    let report = repo.verify(None, &JobControl::new()).unwrap();
    assert!(report.is_ok(), "{report:?}");

    // GC still runs on the full store and reclaims the failed backup's packs.
    let before = common::stored(&repo);
    repo.gc().unwrap();
    assert!(common::stored(&repo) < before, "GC freed nothing");
    let out = tmp.path().join("small.out");
    restore(&repo, "b-small", &[&out]);
    cmp(&small, &out);

    // Space freed (the mount grows): the same backup now succeeds.
    mount.resize("64M");
    common::backup(&repo, "b-big", "7", &[&big]);
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
    let out = tmp.path().join("big.out");
    restore(&repo, "b-big", &[&out]);
    cmp(&big, &out);
}
