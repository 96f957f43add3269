//! Point-in-time backups of a running QEMU's disks: a real
//! qemu-storage-daemon serves a qcow2 and a raw disk to a "guest" (writable
//! FUSE exports, written with pwrite) that hammers random writes while the
//! point in time is read; what is read equals, byte for byte, a reference
//! copy made at the instant of the transaction (the guest is held back
//! between the copy and the transaction, and only then).

mod common;
#[path = "common/guest.rs"]
mod guest;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use guest::{hammer, Guest};
use vpsbackup_disk::point_in_time::PointInTime;
use vpsbackup_disk::qmp::Qmp;
use vpsbackup_disk::{DiskFormat, DiskReader};

fn read_all(r: &dyn DiskReader) -> Vec<u8> {
    read_interleaved(r, None)
}

/// Reads the extents the reader names (the rest must be zeros) in 256 KiB
/// pieces; with `writes`, lets the guest make 16 more writes before each
/// piece, so the read and the guest's writes interleave whatever the speed
/// of either.
fn read_interleaved(r: &dyn DiskReader, writes: Option<&AtomicU64>) -> Vec<u8> {
    const PIECE: u64 = 256 << 10;
    let mut out = vec![0u8; r.size() as usize];
    let mut at = 0;
    while let Some(e) = r.next_data(at).unwrap() {
        let len = e.len.min(PIECE);
        if let Some(w) = writes {
            let want = w.load(Ordering::Relaxed) + 16;
            while w.load(Ordering::Relaxed) < want {
                std::thread::yield_now();
            }
        }
        let range = e.offset as usize..(e.offset + len) as usize;
        r.read_exact_at(&mut out[range], e.offset).unwrap();
        at = e.offset + len;
    }
    out
}

fn disks(dir: &Path) -> (PathBuf, PathBuf) {
    let raw = make_ext4(dir, "disk1.raw", 24);
    let base = make_ext4(dir, "base.raw", 32);
    let qcow = dir.join("disk0.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&base)
        .arg(&qcow));
    (qcow, raw)
}

#[test]
fn the_point_in_time_is_exact_while_the_guest_hammers_both_disks() {
    let tmp = tempfile::tempdir().unwrap();
    let (qcow, raw) = disks(tmp.path());
    let qsd = Guest::start(tmp.path(), &[(&qcow, "qcow2"), (&raw, "raw")]);
    let scratch = tmp.path().join("scratch");
    let gate = Arc::new(Mutex::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = hammer(
        qsd.guests.clone(),
        gate.clone(),
        stop.clone(),
        writes.clone(),
    );
    while writes.load(Ordering::Relaxed) < 50 {
        std::thread::sleep(Duration::from_millis(5));
    }

    // The instant: the guest is held between the reference copy and the
    // transaction, and runs again as soon as the point in time is taken.
    let held = gate.lock().unwrap();
    let reference: Vec<Vec<u8>> = qsd
        .guests
        .iter()
        .map(|g| std::fs::read(g).unwrap())
        .collect();
    let pit = PointInTime::take(&qsd.qmp, &[qcow.clone(), raw.clone()], &scratch).unwrap();
    drop(held);
    let at_pit = writes.load(Ordering::Relaxed);

    let r0 = pit.reader(0, DiskFormat::Qcow2).unwrap();
    let r1 = pit.reader(1, DiskFormat::Raw).unwrap();
    let got0 = read_interleaved(&r0, Some(&writes));
    let got1 = read_interleaved(&r1, Some(&writes));
    let during = writes.load(Ordering::Relaxed) - at_pit;
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(during >= 1000, "only {during} guest writes during the read");
    assert_same(&got0, &reference[0], "qcow2 disk at the point in time");
    assert_same(&got1, &reference[1], "raw disk at the point in time");
    // The guest's disks did move on meanwhile.
    assert_ne!(std::fs::read(&qsd.guests[0]).unwrap(), reference[0]);

    drop((r0, r1));
    pit.finish().unwrap();
    assert_eq!(qsd.leftovers(), Vec::<String>::new());
    let left: Vec<_> = std::fs::read_dir(&scratch)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "scratch files left: {left:?}");
}

#[test]
fn what_a_crashed_job_left_in_qemu_is_removed_by_the_next_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (qcow, raw) = disks(tmp.path());
    let qsd = Guest::start(tmp.path(), &[(&qcow, "qcow2"), (&raw, "raw")]);
    let scratch = tmp.path().join("scratch");
    // A job that dies with its exports, jobs, overlays and NBD server up.
    let crashed = PointInTime::take(&qsd.qmp, &[qcow.clone(), raw.clone()], &scratch).unwrap();
    crashed.abandon();
    assert!(!qsd.leftovers().is_empty());

    let guest = std::fs::OpenOptions::new()
        .write(true)
        .open(&qsd.guests[1])
        .unwrap();
    guest.write_all_at(&[0x77; 8192], 1 << 20).unwrap();
    let pit = PointInTime::take(&qsd.qmp, &[qcow.clone(), raw.clone()], &scratch).unwrap();
    let r1 = pit.reader(1, DiskFormat::Raw).unwrap();
    assert_same(
        &read_all(&r1),
        &std::fs::read(&qsd.guests[1]).unwrap(),
        "raw after cleanup",
    );
    drop(r1);
    pit.finish().unwrap();
    assert_eq!(qsd.leftovers(), Vec::<String>::new());

    // A disk the QEMU does not have is refused by name of the cause.
    let other = tmp.path().join("other.raw");
    std::fs::write(&other, vec![0u8; 1 << 20]).unwrap();
    let err = PointInTime::take(&qsd.qmp, &[other], &scratch)
        .err()
        .unwrap();
    assert!(err.to_string().contains("no block node"), "{err}");
    assert_eq!(qsd.leftovers(), Vec::<String>::new());
}
