//! A guest owns every byte of its raw disk, including the first ones: it can
//! write a qcow2 header there whose backing file names a host file. With the
//! format pinned to raw, the backup holds the disk's raw bytes and nothing of
//! that host file, and a restore writes raw bytes over the disk.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use vpsbackup_engine::{detect_format, BackupRequest, DiskFormat, DiskImage, JobControl};

/// A host file the guest must never get into its backup.
fn host_secret(dir: &Path) -> (PathBuf, Vec<u8>) {
    let marker = b"HOST-SECRET-0123456789abcdef-".to_vec();
    let path = dir.join("host-secret.bin");
    std::fs::write(&path, marker.repeat((1 << 20) / marker.len() + 1)).unwrap();
    (path, marker)
}

/// A raw ext4 disk, then what a hostile guest does to it: the whole of a
/// real qcow2 image whose backing file is `secret` written over its start.
fn hostile_raw_disk(dir: &Path, secret: &Path) -> PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("notes.txt"), "guest data\n".repeat(20_000)).unwrap();
    let disk = dir.join("guest.raw");
    make_ext4(&disk, &tree, "8M");
    assert_eq!(detect_format(&disk).unwrap(), DiskFormat::Raw);

    let header = dir.join("hdr.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(secret)
        .args(["-F", "raw"])
        .arg(&header)
        .arg("1M"));
    run(Command::new("dd")
        .arg(format!("if={}", header.display()))
        .arg(format!("of={}", disk.display()))
        .args(["conv=notrunc", "status=none"]));
    // Probing would now take it for qcow2 backed by the host file.
    assert_eq!(detect_format(&disk).unwrap(), DiskFormat::Qcow2);
    disk
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_pinned_raw_disk_is_backed_up_as_its_raw_bytes_whatever_its_header() {
    let t = tempfile::tempdir().unwrap();
    let (secret, marker) = host_secret(t.path());
    let disk = hostile_raw_disk(t.path(), &secret);
    let repo = open_repo(&t.path().join("store"));

    let req = BackupRequest {
        backup_id: "b1".into(),
        server_id: "s".into(),
        server_name: "s".into(),
        disks: vec![DiskImage::pinned(&disk, DiskFormat::Raw)],
        read_limit: None,
    };
    let summary = repo.backup(&req, &JobControl::new()).unwrap();
    assert_eq!(
        summary.logical_bytes,
        std::fs::metadata(&disk).unwrap().len()
    );
    let info = repo.backup_info("b1").unwrap();
    assert_eq!(info.disks[0].format, "raw");

    // Restored to a fresh file: exactly the raw disk, nothing of the host file.
    let out = t.path().join("restored.raw");
    repo.restore_as(
        "b1",
        &[DiskImage::pinned(&out, DiskFormat::Raw)],
        &JobControl::new(),
    )
    .unwrap();
    cmp(&disk, &out);
    assert!(!contains(&std::fs::read(&out).unwrap(), &marker));

    // Restored in place over the disk after the guest changed it again (its
    // qcow2 header still there): written as raw, not through qemu-nbd.
    let snapshot = t.path().join("snapshot.raw");
    std::fs::copy(&disk, &snapshot).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&[0xAA; 65536], 4 << 20).unwrap();
    }
    assert_eq!(detect_format(&disk).unwrap(), DiskFormat::Qcow2);
    repo.restore_as(
        "b1",
        &[DiskImage::pinned(&disk, DiskFormat::Raw)],
        &JobControl::new(),
    )
    .unwrap();
    cmp(&snapshot, &disk);
}
