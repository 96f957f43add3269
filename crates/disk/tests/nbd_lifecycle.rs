//! qemu-nbd children never outlive their reader or writer. Alone in its own
//! test binary so no other test's children are counted.

mod common;

use std::process::Command;

use common::*;
use vpsbackup_disk::open_reader;

/// Live (not zombie) qemu-nbd processes whose parent is this test process.
fn our_qemu_nbd_children() -> usize {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                return false;
            };
            // pid (comm) state ppid ...
            let Some(close) = stat.rfind(')') else {
                return false;
            };
            let comm = &stat[stat.find('(').unwrap_or(0) + 1..close];
            let mut rest = stat[close + 1..].split_whitespace();
            let state = rest.next().unwrap_or("");
            let ppid = rest.next().unwrap_or("");
            comm == "qemu-nbd" && ppid == me && state != "Z"
        })
        .count()
}

#[test]
fn qemu_nbd_is_reaped_when_readers_and_writers_go() {
    let dir = tempfile::tempdir().unwrap();
    let qcow = dir.path().join("a.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow)
        .arg("4M"));
    let before = our_qemu_nbd_children();
    let reader = open_reader(&qcow).unwrap();
    assert_eq!(our_qemu_nbd_children(), before + 1);
    drop(reader);
    assert_eq!(our_qemu_nbd_children(), before, "reader's qemu-nbd reaped");

    // An abandoned writer (no finish) also takes its qemu-nbd with it.
    let writer = vpsbackup_disk::open_writer(&qcow, 4 << 20).unwrap();
    writer.write_all_at(&[9; 512], 0).unwrap();
    assert_eq!(our_qemu_nbd_children(), before + 1);
    drop(writer);
    assert_eq!(our_qemu_nbd_children(), before, "writer's qemu-nbd reaped");

    let writer = vpsbackup_disk::open_writer(&qcow, 4 << 20).unwrap();
    writer.finish().unwrap();
    assert_eq!(our_qemu_nbd_children(), before, "finish waits for qemu-nbd");
}
