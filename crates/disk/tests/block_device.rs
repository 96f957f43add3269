//! Block devices, through a loop device over a real ext4 image (needs root
//! and /dev/loop-control, as on the CI machine).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use vpsbackup_disk::{detect_format, open_reader, open_writer, DiskFormat};

/// A loop device attached to a file, detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn attach(file: &Path) -> LoopDevice {
        let out = run(Command::new("losetup").args(["-f", "--show"]).arg(file));
        LoopDevice(PathBuf::from(String::from_utf8(out).unwrap().trim()))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn block_device_reads_and_writes() {
    assert!(
        Path::new("/dev/loop-control").exists(),
        "this test needs loop devices (run as root on a machine with /dev/loop-control)"
    );
    let dir = tempfile::tempdir().unwrap();
    let image = make_ext4(dir.path(), "fs.raw", 16);
    let want = std::fs::read(&image).unwrap();
    let dev = LoopDevice::attach(&image);

    assert_eq!(detect_format(&dev.0).unwrap(), DiskFormat::BlockDevice);
    let reader = open_reader(&dev.0).unwrap();
    assert_eq!(reader.format(), DiskFormat::BlockDevice);
    assert_eq!(reader.size(), want.len() as u64);
    assert_eq!(extents(reader.as_ref()).len(), 1, "a device is one extent");
    assert_same(
        &read_via_extents(reader.as_ref()),
        &want,
        "loop device read",
    );
    drop(reader);

    let writer = open_writer(&dev.0, want.len() as u64).unwrap();
    assert!(!writer.created());
    let data = pattern(4, 100_000);
    writer.write_all_at(&data, 1 << 20).unwrap();
    writer.write_zeroes(4 << 20, 1 << 20).unwrap();
    writer.write_zeroes(8 << 20, 1000).unwrap(); // unaligned: written as zeros
    writer.finish().unwrap();
    let mut expected = want;
    expected[1 << 20..(1 << 20) + data.len()].copy_from_slice(&data);
    expected[4 << 20..5 << 20].fill(0);
    expected[8 << 20..(8 << 20) + 1000].fill(0);
    let mut got = vec![0u8; expected.len()];
    open_reader(&dev.0)
        .unwrap()
        .read_exact_at(&mut got, 0)
        .unwrap();
    assert_same(&got, &expected, "loop device after writes");

    // A device smaller than the disk to restore is refused.
    assert!(open_writer(&dev.0, expected.len() as u64 + 4096).is_err());
}
