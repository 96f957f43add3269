//! An image a running QEMU holds for writing is refused, for reading and for
//! writing, instead of being read torn; the lock is seen from QEMU's own
//! OFD locks, with a real qemu-storage-daemon holding raw and qcow2 images.

mod common;

use std::process::Command;

use common::*;
use vpsbackup_disk::{open_reader_as, open_writer_as, DiskError, DiskFormat};

fn images(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let raw = make_ext4(dir, "disk.raw", 16);
    let qcow = dir.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow));
    (raw, qcow)
}

fn assert_in_use<T>(r: Result<T, DiskError>, what: &str) {
    match r {
        Err(e @ DiskError::InUse { .. }) => {
            let text = e.to_string();
            assert!(text.contains("running QEMU"), "{what}: {text}");
            assert!(!text.contains('/'), "{what}: a host path in {text:?}");
        }
        Err(e) => panic!("{what}: another error: {e}"),
        Ok(_) => panic!("{what}: opened an image a running QEMU writes to"),
    }
}

#[test]
fn images_held_by_a_running_qemu_are_refused_until_it_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let (raw, qcow) = images(tmp.path());
    let size = std::fs::metadata(&raw).unwrap().len();
    let before = std::fs::read(&raw).unwrap();

    let mut qsd = Qsd::start(tmp.path(), &[(&raw, "raw"), (&qcow, "qcow2")], false);
    // The guest writes meanwhile: exactly the moment a read would tear.
    run(Command::new("qemu-io").args(["-f", "raw", &qsd.uri(0), "-c", "write -P 0xab 1M 64k"]));
    assert_in_use(open_reader_as(&raw, DiskFormat::Raw), "raw reader");
    assert_in_use(open_reader_as(&qcow, DiskFormat::Qcow2), "qcow2 reader");
    assert_in_use(open_writer_as(&raw, size, DiskFormat::Raw), "raw restore");
    assert_in_use(
        open_writer_as(&qcow, size, DiskFormat::Qcow2),
        "qcow2 restore",
    );
    // Refusing wrote nothing: only the guest's write changed the image.
    let now = std::fs::read(&raw).unwrap();
    assert_eq!(now.len(), before.len());
    assert_eq!(&now[..1 << 20], &before[..1 << 20]);
    assert!(now[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0xab));

    // kill -9 drops the locks with the process: the images open again.
    qsd.kill();
    let r = open_reader_as(&raw, DiskFormat::Raw).expect("raw after QEMU stopped");
    assert_eq!(read_via_extents(r.as_ref()), now);
    let q = open_reader_as(&qcow, DiskFormat::Qcow2).expect("qcow2 after QEMU stopped");
    assert_eq!(read_via_extents(q.as_ref()), before);
}

#[test]
fn a_qemu_that_only_reads_an_image_does_not_block_a_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let (raw, qcow) = images(tmp.path());
    let _qsd = Qsd::start(tmp.path(), &[(&raw, "raw"), (&qcow, "qcow2")], true);
    let r = open_reader_as(&raw, DiskFormat::Raw).expect("raw read by a read-only QEMU");
    assert_eq!(read_via_extents(r.as_ref()), std::fs::read(&raw).unwrap());
}
