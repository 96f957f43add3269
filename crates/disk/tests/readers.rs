//! Readers against real images: sparse raw files, ext4 made by mke2fs,
//! qcow2 plain, with a backing file, and compressed, each compared byte for
//! byte with what QEMU itself sees.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;

use common::*;
use vpsbackup_disk::{
    detect_format, open_reader, open_reader_as, DiskFormat, DiskReader, Qcow2Reader,
};

#[test]
fn raw_sparse_extents_skip_holes_and_read_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.raw");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(32 << 20).unwrap();
    // Data at the start, in the middle (not block aligned) and at the very end.
    file.write_all_at(&pattern(1, 100_000), 0).unwrap();
    file.write_all_at(&pattern(2, 5_000), (10 << 20) + 123)
        .unwrap();
    file.write_all_at(&pattern(3, 4096), (32 << 20) - 4096)
        .unwrap();
    drop(file);

    let reader = open_reader(&path).unwrap();
    assert_eq!(reader.format(), DiskFormat::Raw);
    assert_eq!(reader.size(), 32 << 20);
    let ext = extents(reader.as_ref());
    let covered: u64 = ext.iter().map(|e| e.len).sum();
    assert!(ext.len() >= 3, "three separate data regions, got {ext:?}");
    assert!(
        covered <= allocated_bytes(&path),
        "extents cover {covered} bytes, more than the {} allocated",
        allocated_bytes(&path)
    );
    assert!(
        covered < 1 << 20,
        "holes must not be reported as data: {ext:?}"
    );
    let want = std::fs::read(&path).unwrap();
    assert_same(&read_via_extents(reader.as_ref()), &want, "sparse raw");

    // Reading across a hole returns zeros, and reading past the end fails.
    let mut buf = vec![0xffu8; 8192];
    reader.read_exact_at(&mut buf, 20 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert!(reader.read_exact_at(&mut buf, (32 << 20) - 4096).is_err());
    assert_eq!(reader.next_data(32 << 20).unwrap(), None);
}

#[test]
fn raw_ext4_image_reads_identically() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_ext4(dir.path(), "fs.raw", 48);
    let reader = open_reader(&image).unwrap();
    let ext = extents(reader.as_ref());
    let covered: u64 = ext.iter().map(|e| e.len).sum();
    assert!(covered <= allocated_bytes(&image));
    assert!(
        covered < reader.size() / 2,
        "mke2fs leaves most of the image sparse"
    );
    assert_same(
        &read_via_extents(reader.as_ref()),
        &std::fs::read(&image).unwrap(),
        "ext4 raw",
    );
}

/// Checks a qcow2 reader against `qemu-img convert -O raw` of the same image.
fn check_qcow2(image: &std::path::Path, dir: &std::path::Path) -> Box<dyn DiskReader> {
    assert_eq!(detect_format(image).unwrap(), DiskFormat::Qcow2);
    let reader = open_reader(image).unwrap();
    assert_eq!(reader.format(), DiskFormat::Qcow2);
    let want = qemu_raw(image, dir);
    assert_eq!(reader.size(), want.len() as u64);
    assert_same(
        &read_via_extents(reader.as_ref()),
        &want,
        "qcow2 via extents",
    );
    // A straight read of the whole guest view (holes included) agrees too.
    let mut whole = vec![0u8; want.len()];
    reader.read_exact_at(&mut whole, 0).unwrap();
    assert_same(&whole, &want, "qcow2 whole read");
    reader
}

#[test]
fn qcow2_plain_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let raw = make_ext4(dir.path(), "fs.raw", 40);
    let qcow = dir.path().join("fs.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow));
    let reader = check_qcow2(&qcow, dir.path());
    let covered: u64 = extents(reader.as_ref()).iter().map(|e| e.len).sum();
    assert!(
        covered < reader.size() / 2,
        "unallocated clusters are not data"
    );
    // Plain clusters of the top image are read straight from the file.
    let direct = Qcow2Reader::open(&qcow).unwrap().direct_bytes();
    assert_eq!(
        direct, covered,
        "every data cluster of a converted image is plain"
    );
    // The guest view is the raw image we converted from.
    assert_same(
        &read_via_extents(reader.as_ref()),
        &std::fs::read(&raw).unwrap(),
        "qcow2 vs source raw",
    );
}

#[test]
fn qcow2_with_backing_file_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_ext4(dir.path(), "base.raw", 32);
    let overlay = dir.path().join("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&overlay));
    // Overwrite some of the base, zero some of it, and write past its data.
    run(Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .args(["-c", "write -P 0xab 1M 64k"])
        .args(["-c", "write -z 0 64k"])
        .args(["-c", "write -P 0x5c 20M 192k"])
        .args(["-c", "write -P 0x11 31M 1M"])
        .arg(&overlay));
    let reader = check_qcow2(&overlay, dir.path());
    // Every data cluster sits plainly in the overlay or in the raw base, so
    // all of it is read straight from those files.
    // (One reader for both figures: a raw file's map may change as the
    // kernel writes back, so two opens can see different maps.)
    let direct_reader = Qcow2Reader::open(&overlay).unwrap();
    let covered: u64 = extents(&direct_reader).iter().map(|e| e.len).sum();
    assert_eq!(direct_reader.direct_bytes(), covered);
    let mut buf = vec![0u8; 64 << 10];
    reader.read_exact_at(&mut buf, 1 << 20).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0xab),
        "overlay data wins over the base"
    );
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "zeroed cluster reads as zeros");
    // The zeroed cluster must not be reported as data even though the base
    // has data there.
    let first = reader.next_data(0).unwrap().unwrap();
    assert!(
        first.offset >= 64 << 10,
        "zero cluster reported as data: {first:?}"
    );
}

#[test]
fn compressed_qcow2_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let raw = make_ext4(dir.path(), "fs.raw", 32);
    let qcow = dir.path().join("fs-compressed.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow));
    let map = String::from_utf8(run(Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(&qcow)))
    .unwrap();
    assert!(
        map.contains("\"compressed\": true"),
        "image has compressed clusters"
    );
    check_qcow2(&qcow, dir.path());
}

#[test]
fn qcow2_reads_from_many_threads() {
    let dir = tempfile::tempdir().unwrap();
    let raw = make_ext4(dir.path(), "fs.raw", 32);
    let qcow = dir.path().join("fs.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow));
    let want = Arc::new(std::fs::read(&raw).unwrap());
    let reader: Arc<dyn DiskReader> = Arc::from(open_reader(&qcow).unwrap());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let reader = reader.clone();
            let want = want.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 << 10];
                for i in 0..64u64 {
                    let offset =
                        ((t * 7919 + i * 104_729) * 4096) % (reader.size() - buf.len() as u64);
                    reader.read_exact_at(&mut buf, offset).unwrap();
                    assert_eq!(
                        &buf[..],
                        &want[offset as usize..offset as usize + buf.len()]
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn explicit_raw_format_ignores_a_qcow2_header() {
    // A guest may write qcow2's magic at the start of its raw disk; opened
    // as raw it must stay raw bytes.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tricky.raw");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(1 << 20).unwrap();
    file.write_all_at(b"QFI\xfb\0\0\0\x03", 0).unwrap();
    drop(file);
    assert_eq!(detect_format(&path).unwrap(), DiskFormat::Qcow2);
    let reader = open_reader_as(&path, DiskFormat::Raw).unwrap();
    assert_eq!(reader.size(), 1 << 20);
    let mut head = [0u8; 8];
    reader.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"QFI\xfb\0\0\0\x03");
    // Auto-detection hands it to QEMU, which rejects the bogus header loudly.
    assert!(open_reader(&path).is_err());
}

#[test]
fn missing_image_is_an_error_naming_the_path() {
    let err = match open_reader(std::path::Path::new("/nonexistent/disk.raw")) {
        Ok(_) => panic!("opened a missing image"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("/nonexistent/disk.raw"), "{err}");
}

#[test]
fn raw_map_answers_match_the_kernel_at_every_block() {
    // The raw reader remembers its last map answer; walking block by block
    // (as the engine does) must give what a fresh lseek gives.
    let dir = tempfile::tempdir().unwrap();
    let image = make_ext4(dir.path(), "fs.raw", 32);
    let walker = open_reader(&image).unwrap();
    let step = 64 << 10;
    let mut pos = 0;
    while pos < walker.size() {
        let fresh = open_reader(&image).unwrap().next_data(pos).unwrap();
        assert_eq!(walker.next_data(pos).unwrap(), fresh, "at {pos}");
        pos += step;
    }
}

#[test]
fn three_layer_chain_with_compressed_middle_matches_qemu() {
    // raw base <- qcow2 with compressed clusters <- qcow2 top: reads mix the
    // direct path (top and raw base) with NBD (the compressed middle).
    let dir = tempfile::tempdir().unwrap();
    let base = make_ext4(dir.path(), "base.raw", 32);
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&mid));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .args(["-c", "write -c -P 0x21 2M 256k"])
        .args(["-c", "write -c -P 0x22 8M 64k"])
        .arg(&mid));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&mid)
        .arg(&top));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .args(["-c", "write -P 0x31 2M 64k"]) // over compressed data
        .args(["-c", "write -P 0x32 9M 64k"])
        .arg(&top));
    let map = String::from_utf8(run(Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(&top)))
    .unwrap();
    assert!(map.contains("\"compressed\": true"), "{map}");
    let reader = check_qcow2(&top, dir.path());
    let direct_reader = Qcow2Reader::open(&top).unwrap();
    let covered: u64 = extents(&direct_reader).iter().map(|e| e.len).sum();
    assert_eq!(
        covered - direct_reader.direct_bytes(),
        (256 << 10) - (64 << 10) + (64 << 10),
        "exactly the compressed clusters still visible go through NBD"
    );
    let mut buf = vec![0u8; 128 << 10];
    reader.read_exact_at(&mut buf, 2 << 20).unwrap();
    assert!(buf[..64 << 10].iter().all(|&b| b == 0x31));
    assert!(buf[64 << 10..].iter().all(|&b| b == 0x21));
}
