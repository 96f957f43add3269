//! The structured-reply NBD client against real exports of
//! qemu-storage-daemon: reads (holes arrive as OFFSET_HOLE chunks), writes,
//! `base:allocation` and `qemu:dirty-bitmap:NAME` block status.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use vpsbackup_disk::nbd_export::{NbdExport, StatusRun, BASE_ALLOCATION, STATE_DIRTY, STATE_HOLE};

const MIB: u64 = 1 << 20;

/// A 16 MiB qcow2 with data written (before the bitmap existed) at
/// 0..2 MiB, then the persistent bitmap cp0, then guest writes at 1 MiB
/// (4 KiB) and 5 MiB (128 KiB) that the bitmap records; cp0 is disabled so
/// it can be exported.
fn image_with_bitmap(dir: &Path) -> PathBuf {
    let img = dir.join("d.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M"));
    let io = |cmd: &str| {
        run(Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(&img)
            .args(["-c", cmd]));
    };
    io("write -P 0x11 0 2M");
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("cp0"));
    io("write -P 0x22 1M 4k");
    io("write -P 0x33 5M 128k");
    run(Command::new("qemu-img")
        .args(["bitmap", "--disable"])
        .arg(&img)
        .arg("cp0"));
    img
}

fn dirty(runs: &[StatusRun]) -> Vec<(u64, u64)> {
    runs.iter()
        .filter(|r| r.flags & STATE_DIRTY != 0)
        .map(|r| (r.offset, r.len))
        .collect()
}

#[test]
fn reads_block_status_and_dirty_bitmap_match_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image_with_bitmap(tmp.path());
    let want = qemu_raw(&img, tmp.path());
    let qsd = Qsd::start_with(tmp.path(), &[(&img, "qcow2")], false, ",bitmaps.0=cp0");

    let ctx = "qemu:dirty-bitmap:cp0";
    let mut c = NbdExport::connect(&qsd.nbd, "disk0", &[BASE_ALLOCATION, ctx]).unwrap();
    assert_eq!(c.size(), 16 * MIB);
    assert!(c.has_context(BASE_ALLOCATION) && c.has_context(ctx));
    assert!(!c.has_context("qemu:dirty-bitmap:nope"));

    // The whole disk, in reads of several sizes (some all hole).
    let mut got = vec![0u8; want.len()];
    for (i, piece) in got.chunks_mut(3 * MIB as usize + 4096).enumerate() {
        let at = i as u64 * (3 * MIB + 4096);
        c.read_exact_at(piece, at).unwrap();
    }
    assert_same(&got, &want, "structured reads");

    // Whole bitmap clusters (64 KiB) around each write, nothing else.
    assert_eq!(
        dirty(&c.status_map(ctx).unwrap()),
        vec![(MIB, 64 << 10), (5 * MIB, 128 << 10)]
    );
    // Allocation: the data written, not the rest.
    let allocated: Vec<(u64, u64)> = c
        .status_map(BASE_ALLOCATION)
        .unwrap()
        .iter()
        .filter(|r| r.flags & STATE_HOLE == 0)
        .map(|r| (r.offset, r.len))
        .collect();
    assert_eq!(allocated, vec![(0, 2 * MIB), (5 * MIB, 128 << 10)]);
    // A query inside a run is clipped to start where asked.
    let runs = c.block_status(MIB + 4096, 8192, ctx).unwrap();
    assert_eq!(runs[0].offset, MIB + 4096);
    assert_eq!(runs[0].flags & STATE_DIRTY, STATE_DIRTY);

    // Errors: a context not negotiated, a read past the end; the
    // connection is still usable after the client-side refusals.
    assert!(c.block_status(0, 4096, "qemu:dirty-bitmap:nope").is_err());
    let mut past = vec![0u8; 8192];
    assert!(c.read_exact_at(&mut past, 16 * MIB - 4096).is_err());
    let mut one = vec![0u8; 4096];
    c.read_exact_at(&mut one, MIB).unwrap();
    assert!(one.iter().all(|&b| b == 0x22));

    // Writes through a second connection (the guest) are read back by the
    // first.
    let mut guest = NbdExport::connect(&qsd.nbd, "disk0", &[]).unwrap();
    guest.write_all_at(&[0x5a; 65536], 9 * MIB).unwrap();
    guest.flush().unwrap();
    let mut back = vec![0u8; 65536];
    c.read_exact_at(&mut back, 9 * MIB).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));

    // A missing export is refused by name.
    let err = NbdExport::connect(&qsd.nbd, "nope", &[]).err().unwrap();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn a_raw_export_reads_like_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = make_ext4(tmp.path(), "disk.raw", 16);
    let want = std::fs::read(&raw).unwrap();
    let qsd = Qsd::start(tmp.path(), &[(&raw, "raw")], true);
    let mut c = NbdExport::connect(&qsd.nbd, "disk0", &[BASE_ALLOCATION]).unwrap();
    assert!(c.read_only());
    let mut got = vec![0u8; want.len()];
    c.read_exact_at(&mut got, 0).unwrap();
    assert_same(&got, &want, "raw export");
    // Every byte outside the allocated runs is zero.
    let runs = c.status_map(BASE_ALLOCATION).unwrap();
    assert_eq!(runs.iter().map(|r| r.len).sum::<u64>(), want.len() as u64);
    for r in runs.iter().filter(|r| r.flags & STATE_HOLE != 0) {
        assert!(is_all_zero(
            &want[r.offset as usize..(r.offset + r.len) as usize]
        ));
    }
}

fn is_all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}
