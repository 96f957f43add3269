//! Writers: restore targets created fresh or updated in place, raw and
//! qcow2, checked byte for byte against the expected guest view and, for
//! raw, for sparseness.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use vpsbackup_disk::{detect_format, open_reader, open_writer, DiskFormat, DiskWriter};

const SIZE: u64 = 24 << 20;

/// Writes a scatter of data and zero ranges from several threads and
/// returns the guest view the target must then hold (starting from `base`).
fn write_scatter(writer: Box<dyn DiskWriter>, mut base: Vec<u8>, seed: u64) -> Vec<u8> {
    let plan: Vec<(u64, usize, bool)> = vec![
        (0, 64 << 10, false),
        (1 << 20, 3 << 20, false),  // several NBD requests long
        (2 << 20, 256 << 10, true), // zeroes inside written data
        (9 << 20, 5000, false),     // not block aligned
        (12 << 20, 4 << 20, true),
        (SIZE - 8192, 8192, false), // the last bytes
    ];
    // Apply to the expected view in plan order, write in the same order but
    // spread over threads so ranges that overlap go to the same thread.
    let mut jobs = Vec::new();
    for (i, &(offset, len, zero)) in plan.iter().enumerate() {
        let range = offset as usize..offset as usize + len;
        if zero {
            base[range].fill(0);
        } else {
            base[range].copy_from_slice(&pattern(seed + i as u64, len));
        }
        jobs.push((offset, len, zero, i as u64));
    }
    let (first, rest): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|j| j.0 < 4 << 20);
    // Scoped threads borrow the writer, as the engine does, and the Box is
    // still ours to finish afterwards.
    std::thread::scope(|s| {
        for jobs in [first, rest] {
            let writer = &*writer;
            s.spawn(move || {
                for (offset, len, zero, i) in jobs {
                    if zero {
                        writer.write_zeroes(offset, len as u64).unwrap();
                    } else {
                        writer
                            .write_all_at(&pattern(seed + i, len), offset)
                            .unwrap();
                    }
                }
            });
        }
    });
    // Read-back through the writer sees the new data before finish.
    let mut probe = vec![0u8; 5000];
    writer.read_exact_at(&mut probe, 9 << 20).unwrap();
    assert_eq!(&probe[..], &base[9 << 20..(9 << 20) + 5000]);
    writer.finish().unwrap();
    base
}

fn guest_view(path: &Path, dir: &Path) -> Vec<u8> {
    match detect_format(path).unwrap() {
        DiskFormat::Qcow2 => qemu_raw(path, dir),
        _ => std::fs::read(path).unwrap(),
    }
}

#[test]
fn new_raw_target_is_sparse_and_exact() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("restored.raw");
    let writer = open_writer(&target, SIZE).unwrap();
    assert!(writer.created(), "a new file reads as zeros");
    let want = write_scatter(writer, vec![0; SIZE as usize], 10);
    assert_eq!(detect_format(&target).unwrap(), DiskFormat::Raw);
    assert_same(&std::fs::read(&target).unwrap(), &want, "new raw");
    let allocated = allocated_bytes(&target);
    assert!(
        allocated < 6 << 20,
        "only written data is allocated: {allocated} bytes of {SIZE}"
    );
}

#[test]
fn existing_raw_target_updated_in_place_and_holes_punched() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk.raw");
    let old = pattern(99, SIZE as usize);
    std::fs::write(&target, &old).unwrap();
    let full = allocated_bytes(&target);
    let writer = open_writer(&target, SIZE).unwrap();
    assert!(!writer.created(), "an existing disk is not fresh");
    let mut existing = vec![0u8; 4096];
    writer.read_exact_at(&mut existing, 5 << 20).unwrap();
    assert_eq!(&existing[..], &old[5 << 20..(5 << 20) + 4096]);
    let want = write_scatter(writer, old, 20);
    assert_same(&std::fs::read(&target).unwrap(), &want, "raw in place");
    // 4 MiB + 256 KiB were zeroed: punched, not written.
    assert!(
        allocated_bytes(&target) <= full - (4 << 20),
        "zeroes punch holes: {} of {full}",
        allocated_bytes(&target)
    );
}

#[test]
fn raw_target_of_another_size_is_resized() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk.img");
    std::fs::write(&target, pattern(5, 40 << 20)).unwrap();
    let writer = open_writer(&target, SIZE).unwrap();
    assert_eq!(writer.size(), SIZE);
    assert!(!writer.created(), "a resized disk keeps its old data");
    writer.finish().unwrap();
    assert_eq!(std::fs::metadata(&target).unwrap().len(), SIZE);
}

#[test]
fn new_qcow2_target_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("restored.qcow2");
    let writer = open_writer(&target, SIZE).unwrap();
    assert!(writer.created());
    let want = write_scatter(writer, vec![0; SIZE as usize], 30);
    assert_eq!(detect_format(&target).unwrap(), DiskFormat::Qcow2);
    assert_same(&guest_view(&target, dir.path()), &want, "new qcow2");
    // Our reader agrees, and its map skips what was never written.
    let reader = open_reader(&target).unwrap();
    assert_same(
        &read_via_extents(reader.as_ref()),
        &want,
        "new qcow2 via reader",
    );
    let covered: u64 = extents(reader.as_ref()).iter().map(|e| e.len).sum();
    assert!(
        covered < 8 << 20,
        "unwritten clusters are not data: {covered}"
    );
}

#[test]
fn existing_qcow2_updated_in_place_keeps_its_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, pattern(7, SIZE as usize)).unwrap();
    let overlay = dir.path().join("vm.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&overlay));
    let before = std::fs::read(&base).unwrap();
    let writer = open_writer(&overlay, SIZE).unwrap();
    assert!(!writer.created());
    let want = write_scatter(writer, before.clone(), 40);
    assert_same(&guest_view(&overlay, dir.path()), &want, "qcow2 in place");
    assert_same(
        &std::fs::read(&base).unwrap(),
        &before,
        "backing file untouched",
    );
    let info = String::from_utf8(run(Command::new("qemu-img").arg("info").arg(&overlay))).unwrap();
    assert!(info.contains("backing file"), "{info}");
}

#[test]
fn qcow2_of_another_size_is_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("old.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&target)
        .arg("8M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x33 0 1M"])
        .arg(&target));
    let writer = open_writer(&target, SIZE).unwrap();
    assert!(writer.created());
    assert_eq!(writer.size(), SIZE);
    writer.write_all_at(&[1, 2, 3], SIZE - 3).unwrap();
    writer.finish().unwrap();
    let mut want = vec![0u8; SIZE as usize];
    want[SIZE as usize - 3..].copy_from_slice(&[1, 2, 3]);
    assert_same(&guest_view(&target, dir.path()), &want, "recreated qcow2");
}

#[test]
fn writes_past_the_end_fail() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a.raw", "a.qcow2"] {
        let writer = open_writer(&dir.path().join(name), 1 << 20).unwrap();
        assert!(
            writer.write_all_at(&[0; 16], (1 << 20) - 8).is_err(),
            "{name}"
        );
        assert!(writer.write_zeroes(1 << 20, 1).is_err(), "{name}");
        drop(writer);
    }
}

#[test]
fn raw_direct_and_buffered_writes_stay_coherent() {
    // Page-aligned writes of 64 KiB and more bypass the page cache; reads
    // through the writer and small buffered writes beside them must still
    // see every byte.
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("mixed.raw");
    std::fs::write(&target, pattern(1, 1 << 20)).unwrap();
    let writer = open_writer(&target, 1 << 20).unwrap();
    let mut want = std::fs::read(&target).unwrap();
    // Read first so the page cache holds the old bytes (as an in-place restore does).
    let mut old = vec![0u8; 1 << 20];
    writer.read_exact_at(&mut old, 0).unwrap();
    assert_same(&old, &want, "before");

    let mut aligned = vpsbackup_disk::AlignedBuf::new(128 << 10);
    aligned.copy_from_slice(&pattern(2, 128 << 10));
    let unaligned = pattern(3, 64 << 10); // a Vec: copied through the bounce buffer
    let small = pattern(4, 300);
    for (buf, at) in [
        (&aligned[..], 0usize),
        (&small[..], (128 << 10) + 100),
        (&unaligned[..], 256 << 10),
        (&unaligned[1..], 512 << 10), // odd length: buffered
    ] {
        writer.write_all_at(buf, at as u64).unwrap();
        want[at..at + buf.len()].copy_from_slice(buf);
    }
    let mut now = vec![0u8; 1 << 20];
    writer.read_exact_at(&mut now, 0).unwrap();
    assert_same(&now, &want, "read back through the writer");
    writer.finish().unwrap();
    assert_same(&std::fs::read(&target).unwrap(), &want, "after finish");
}
