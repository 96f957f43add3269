//! Backup and restore round trips on real images: raw, qcow2 with a backing
//! file, a two-disk server, restores onto existing disks, and dedup across
//! servers cloned from one template.

mod common;

use common::*;
use std::process::Command;
use vpsbackup_engine::JobControl;

#[test]
fn raw_round_trip_is_identical_and_sparse() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let repo = open_repo(&t.path().join("store"));
    let s = backup(&repo, "b1", "srv1", &[&img]);
    assert_eq!(s.logical_bytes, 64 << 20);
    assert!(s.data_bytes > 10 << 20, "data {}", s.data_bytes);
    assert!(s.data_bytes < 64 << 20);
    assert!(s.stored_bytes < s.data_bytes, "compression helps on files");
    assert_eq!(s.chunks_new, s.chunks_total);

    let out = t.path().join("out.raw");
    let r = restore(&repo, "b1", &[&out]);
    cmp(&img, &out);
    assert!(r.chunks_written > 0);
    // Zero chunks became holes: the copy allocates no more than the data.
    assert!(
        allocated(&out) <= s.data_bytes + (1 << 20),
        "restored {} allocated for {} of data",
        allocated(&out),
        s.data_bytes
    );

    // A second backup of the unchanged disk stores nothing new.
    let s2 = backup(&repo, "b2", "srv1", &[&img]);
    assert_eq!(s2.chunks_new, 0);
    assert_eq!(s2.stored_bytes, 0);
    let info = repo.backup_info("b2").unwrap();
    assert_eq!(info.server_id, "srv1");
    assert_eq!(info.disks.len(), 1);
    assert_eq!(info.disks[0].format, "raw");
    let ids: Vec<String> = repo
        .list_backups()
        .unwrap()
        .into_iter()
        .map(|b| b.backup_id)
        .collect();
    assert_eq!(ids, ["b1", "b2"]);
    assert!(repo.verify(None, &JobControl::new()).unwrap().is_ok());
}

#[test]
fn restore_onto_existing_disk_writes_only_differences() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let repo = open_repo(&t.path().join("store"));
    let s = backup(&repo, "b1", "srv1", &[&img]);

    let out = t.path().join("out.raw");
    restore(&repo, "b1", &[&out]);
    // The server's disk moves on: 5 scattered 64 KiB writes.
    scatter_writes(&out, 5, 42);
    let r = restore(&repo, "b1", &[&out]);
    cmp(&img, &out);
    assert!(r.chunks_written >= 1 && r.chunks_written <= 5, "{r:?}");
    assert!(r.chunks_skipped >= s.chunks_total - 5, "{r:?}");
    // Nothing differs now: nothing is written.
    let r = restore(&repo, "b1", &[&out]);
    assert_eq!(r.chunks_written, 0);
    assert_eq!(r.bytes_written, 0);
}

#[test]
fn qcow2_with_backing_file_round_trips() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let base_q = t.path().join("template.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&img)
        .arg(&base_q));
    let overlay = t.path().join("server.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base_q)
        .arg(&overlay));
    // The server's own changes live in the overlay: convert a changed copy
    // with the template as backing file, so only differing clusters land there.
    let changed = t.path().join("changed.raw");
    std::fs::copy(&img, &changed).unwrap();
    scatter_writes(&changed, 20, 7);
    run(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2", "-F", "qcow2", "-B"])
        .arg(&base_q)
        .arg(&changed)
        .arg(&overlay));

    let repo = open_repo(&t.path().join("store"));
    let s = backup(&repo, "q1", "srv1", &[&overlay]);
    assert_eq!(repo.backup_info("q1").unwrap().disks[0].format, "qcow2");
    assert_eq!(s.logical_bytes, 64 << 20);

    let out = t.path().join("out.raw");
    restore(&repo, "q1", &[&out]);
    cmp(&changed, &out);

    let outq = t.path().join("out.qcow2");
    restore(&repo, "q1", &[&outq]);
    let back = t.path().join("back.raw");
    to_raw(&outq, &back);
    cmp(&changed, &back);

    // Rolling that qcow2 disk back to the template's state rewrites only the
    // chunks the server changed (20 scattered writes).
    backup(&repo, "t1", "template", &[&img]);
    let r = restore(&repo, "t1", &[&outq]);
    assert!(r.chunks_written >= 1 && r.chunks_written <= 20, "{r:?}");
    assert!(r.chunks_skipped > 0, "{r:?}");
    let back = t.path().join("back2.raw");
    to_raw(&outq, &back);
    cmp(&img, &back);
}

#[test]
fn two_disk_server_round_trips() {
    let t = tempfile::tempdir().unwrap();
    let img = base_image(t.path());
    let tree2 = make_tree(t.path(), "tree2", &["/usr/share/perl5"]);
    let data = t.path().join("data.raw");
    make_ext4(&data, &tree2, "24M");

    let repo = open_repo(&t.path().join("store"));
    let s = backup(&repo, "m1", "srv1", &[&img, &data]);
    assert_eq!(s.logical_bytes, (64 << 20) + (24 << 20));
    let info = repo.backup_info("m1").unwrap();
    assert_eq!(info.disks.len(), 2);
    assert_eq!(info.disks[1].size, 24 << 20);

    let (o1, o2) = (t.path().join("o1.raw"), t.path().join("o2.raw"));
    restore(&repo, "m1", &[&o1, &o2]);
    cmp(&img, &o1);
    cmp(&data, &o2);

    // One disk alone.
    let o3 = t.path().join("o3.raw");
    repo.restore_disk("m1", 1, &o3, &JobControl::new()).unwrap();
    cmp(&data, &o3);
    // Wrong target count is refused.
    assert!(repo
        .restore("m1", std::slice::from_ref(&o1), &JobControl::new())
        .is_err());
}

#[test]
fn servers_cloned_from_one_template_share_chunks() {
    let t = tempfile::tempdir().unwrap();
    let template = base_image(t.path());
    let a = t.path().join("a.raw");
    let b = t.path().join("b.raw");
    std::fs::copy(&template, &a).unwrap();
    std::fs::copy(&template, &b).unwrap();
    // Each server diverged a little from the template (its own config, logs).
    scatter_writes(&a, 2, 1);
    scatter_writes(&b, 2, 2);

    let repo = open_repo(&t.path().join("store"));
    backup(&repo, "a1", "server-a", &[&a]);
    let before = stored(&repo);
    let s = backup(&repo, "b1", "server-b", &[&b]);
    let growth = stored(&repo) - before;
    assert!(
        (growth as f64) < before as f64 * 0.05,
        "second server grew the store by {growth} of {before}"
    );
    // Its own two changed chunks and its chunk list.
    assert!(s.chunks_new <= 3, "{s:?}");
    let out = t.path().join("out.raw");
    restore(&repo, "b1", &[&out]);
    cmp(&b, &out);
}

#[test]
fn odd_sized_sparse_file_round_trips() {
    use std::os::unix::fs::FileExt;
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("odd.raw");
    let size = (5u64 << 20) + 4097;
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size).unwrap();
    let noise: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    f.write_all_at(&noise, 1000).unwrap(); // unaligned data at the start
    f.write_all_at(&vec![0u8; 200_000], 2 << 20).unwrap(); // written zeros, not a hole
    f.write_all_at(&noise[..5000], size - 5000).unwrap(); // data in the short last chunk
    drop(f);

    let repo = open_repo(&t.path().join("store"));
    let s = backup(&repo, "odd", "srv1", &[&img]);
    assert_eq!(s.logical_bytes, size);
    // Zero chunks are not data: the start (5 chunks) and the last 1-2 chunks.
    assert!(s.data_bytes < 8 * 65536 + 4097, "{s:?}");
    let out = t.path().join("out.raw");
    restore(&repo, "odd", &[&out]);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
    cmp(&img, &out);
    assert!(allocated(&out) < (1 << 20), "restored copy stays sparse");
}
