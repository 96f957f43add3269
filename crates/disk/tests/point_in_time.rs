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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use guest::{fake_agent, Guest, Hammer};
use vpsbackup_disk::point_in_time::{Checkpoint, PointInTime, TakeOptions};
use vpsbackup_disk::qmp::Qmp;
use vpsbackup_disk::{DiskFormat, DiskReader, Extent};

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
    let hammer = Hammer::start(qsd.guests.clone());

    // The instant: the guest is held between the reference copy and the
    // transaction, and runs again as soon as the point in time is taken.
    let held = hammer.gate.lock().unwrap();
    let reference: Vec<Vec<u8>> = qsd
        .guests
        .iter()
        .map(|g| std::fs::read(g).unwrap())
        .collect();
    let pit = PointInTime::take(
        &qsd.qmp,
        &[qcow.clone(), raw.clone()],
        &scratch,
        &TakeOptions::default(),
    )
    .unwrap();
    drop(held);
    let at_pit = hammer.count();

    let r0 = pit.reader(0, DiskFormat::Qcow2).unwrap();
    let r1 = pit.reader(1, DiskFormat::Raw).unwrap();
    let got0 = read_interleaved(&r0, Some(&hammer.writes));
    let got1 = read_interleaved(&r1, Some(&hammer.writes));
    let during = hammer.count() - at_pit;
    hammer.stop();
    assert!(during >= 1000, "only {during} guest writes during the read");
    assert_same(&got0, &reference[0], "qcow2 disk at the point in time");
    assert_same(&got1, &reference[1], "raw disk at the point in time");
    // The guest's disks did move on meanwhile.
    assert_ne!(std::fs::read(&qsd.guests[0]).unwrap(), reference[0]);

    drop((r0, r1));
    pit.finish(true).unwrap();
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
    let crashed = PointInTime::take(
        &qsd.qmp,
        &[qcow.clone(), raw.clone()],
        &scratch,
        &TakeOptions::default(),
    )
    .unwrap();
    crashed.abandon();
    assert!(!qsd.leftovers().is_empty());

    let guest = std::fs::OpenOptions::new()
        .write(true)
        .open(&qsd.guests[1])
        .unwrap();
    guest.write_all_at(&[0x77; 8192], 1 << 20).unwrap();
    let pit = PointInTime::take(
        &qsd.qmp,
        &[qcow.clone(), raw.clone()],
        &scratch,
        &TakeOptions::default(),
    )
    .unwrap();
    let r1 = pit.reader(1, DiskFormat::Raw).unwrap();
    assert_same(
        &read_all(&r1),
        &std::fs::read(&qsd.guests[1]).unwrap(),
        "raw after cleanup",
    );
    drop(r1);
    pit.finish(true).unwrap();
    assert_eq!(qsd.leftovers(), Vec::<String>::new());

    // A disk the QEMU does not have is refused by name of the cause.
    let other = tmp.path().join("other.raw");
    std::fs::write(&other, vec![0u8; 1 << 20]).unwrap();
    let err = PointInTime::take(&qsd.qmp, &[other], &scratch, &TakeOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("no block node"), "{err}");
    assert_eq!(qsd.leftovers(), Vec::<String>::new());
}

/// Our bitmaps on node `dev<i>`: (name, recording, persistent, inconsistent).
fn bitmaps(qmp: &Path, i: usize) -> Vec<(String, bool, bool, bool)> {
    let mut q = Qmp::connect(qmp).unwrap();
    let nodes = q
        .execute("query-named-block-nodes", serde_json::json!({"flat": true}))
        .unwrap();
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == format!("dev{i}").as_str())
        .unwrap()
        .clone();
    let mut v: Vec<_> = node["dirty-bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["name"].as_str().unwrap().starts_with("vpsbackup-"))
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["recording"] == true,
                b["persistent"] == true,
                b["inconsistent"] == true,
            )
        })
        .collect();
    v.sort();
    v
}

fn checkpoint(new: &str, base: Option<&str>) -> TakeOptions {
    TakeOptions {
        checkpoint: Some(Checkpoint {
            new: new.into(),
            base: base.map(Into::into),
        }),
        ..TakeOptions::default()
    }
}

/// Guest writes of `len` bytes at `offsets` on guest disk `i`.
fn guest_writes(qsd: &Guest, i: usize, offsets: &[u64], len: usize) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&qsd.guests[i])
        .unwrap();
    for (n, off) in offsets.iter().enumerate() {
        f.write_all_at(&vec![n as u8 + 1; len], *off).unwrap();
    }
}

/// The 64 KiB clusters (QEMU's default bitmap granularity) the writes touch.
fn clusters(offsets: &[u64], len: u64) -> Vec<Extent> {
    let mut c: Vec<u64> = offsets
        .iter()
        .flat_map(|o| (o / 65536)..(o + len).div_ceil(65536))
        .collect();
    c.sort();
    c.dedup();
    let mut v: Vec<Extent> = Vec::new();
    for k in c {
        match v.last_mut() {
            Some(l) if l.offset + l.len == k * 65536 => l.len += 65536,
            _ => v.push(Extent {
                offset: k * 65536,
                len: 65536,
            }),
        }
    }
    v
}

#[test]
fn bitmaps_say_exactly_what_changed_between_two_points_in_time() {
    let tmp = tempfile::tempdir().unwrap();
    let (qcow, raw) = disks(tmp.path());
    let paths = [qcow.clone(), raw.clone()];
    let qsd = Guest::start(tmp.path(), &[(&qcow, "qcow2"), (&raw, "raw")]);
    let scratch = tmp.path().join("scratch");

    // The first backup: nothing to build on; its bitmaps start recording,
    // persistent on qcow2, in memory on raw.
    let pit = PointInTime::take(&qsd.qmp, &paths, &scratch, &checkpoint("b1", None)).unwrap();
    assert!(pit.changes(0).unwrap_err().contains("no earlier backup"));
    pit.finish(true).unwrap();
    assert_eq!(
        bitmaps(&qsd.qmp, 0),
        [("vpsbackup-b1".into(), true, true, false)]
    );
    assert_eq!(
        bitmaps(&qsd.qmp, 1),
        [("vpsbackup-b1".into(), true, false, false)]
    );

    let w0 = [0, 5 << 20, (9 << 20) + 4096];
    let w1 = [(3 << 20) + 65536 - 512];
    guest_writes(&qsd, 0, &w0, 4096);
    guest_writes(&qsd, 1, &w1, 1024);
    let pit = PointInTime::take(&qsd.qmp, &paths, &scratch, &checkpoint("b2", Some("b1"))).unwrap();
    // Written after the instant: not in this point in time's changes.
    guest_writes(&qsd, 0, &[12 << 20], 4096);
    assert_eq!(pit.changes(0).unwrap(), clusters(&w0, 4096));
    assert_eq!(pit.changes(1).unwrap(), clusters(&w1, 1024));
    pit.finish(true).unwrap();
    // b2's bitmap caught the late write; b1's is gone.
    assert_eq!(
        bitmaps(&qsd.qmp, 0),
        [("vpsbackup-b2".into(), true, true, false)]
    );

    // A failed backup hands its changes back to the base: nothing is lost.
    let pit = PointInTime::take(&qsd.qmp, &paths, &scratch, &checkpoint("b3", Some("b2"))).unwrap();
    guest_writes(&qsd, 0, &[14 << 20], 4096);
    pit.finish(false).unwrap();
    assert_eq!(
        bitmaps(&qsd.qmp, 0),
        [("vpsbackup-b2".into(), true, true, false)]
    );

    // A crashed job leaves b2 disabled and b4 recording; the next job
    // merges them, so its changes cover everything since b2.
    let crashed =
        PointInTime::take(&qsd.qmp, &paths, &scratch, &checkpoint("b4", Some("b2"))).unwrap();
    crashed.abandon();
    guest_writes(&qsd, 0, &[16 << 20], 4096);
    let pit = PointInTime::take(&qsd.qmp, &paths, &scratch, &checkpoint("b4", Some("b2"))).unwrap();
    assert_eq!(
        pit.changes(0).unwrap(),
        clusters(&[12 << 20, 14 << 20, 16 << 20], 4096)
    );
    pit.finish(true).unwrap();
    assert_eq!(
        bitmaps(&qsd.qmp, 0),
        [("vpsbackup-b4".into(), true, true, false)]
    );
    assert_eq!(qsd.leftovers(), Vec::<String>::new());

    // Asked to build on a backup whose bitmap is not there: full, and the
    // stale bitmap of ours goes.
    let pit = PointInTime::take(&qsd.qmp, &paths, &scratch, &checkpoint("b5", Some("b3"))).unwrap();
    assert!(pit.changes(0).unwrap_err().contains("no dirty bitmap"));
    pit.finish(true).unwrap();
    assert_eq!(
        bitmaps(&qsd.qmp, 0),
        [("vpsbackup-b5".into(), true, true, false)]
    );
}

#[test]
fn qcow2_bitmaps_survive_a_clean_restart_and_are_not_trusted_after_a_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let (qcow, raw) = disks(tmp.path());
    let paths = [qcow.clone(), raw.clone()];
    let images = [(qcow.as_path(), "qcow2"), (raw.as_path(), "raw")];
    let scratch = tmp.path().join("scratch");
    let qsd = Guest::start(tmp.path(), &images);
    let pit = PointInTime::take(&qsd.qmp, &paths, &scratch, &checkpoint("b1", None)).unwrap();
    pit.finish(true).unwrap();
    drop(qsd);

    // A clean restart: the qcow2 bitmap was stored in the image and goes
    // on recording; the raw one lived in memory only.
    let qsd = Guest::start(tmp.path(), &images);
    assert_eq!(
        bitmaps(&qsd.qmp, 0),
        [("vpsbackup-b1".into(), true, true, false)]
    );
    assert_eq!(bitmaps(&qsd.qmp, 1), []);
    guest_writes(&qsd, 0, &[1 << 20], 4096);
    guest_writes(&qsd, 1, &[1 << 20], 4096);
    let pit = PointInTime::take(&qsd.qmp, &paths, &scratch, &checkpoint("b2", Some("b1"))).unwrap();
    assert_eq!(pit.changes(0).unwrap(), clusters(&[1 << 20], 4096));
    assert!(pit.changes(1).unwrap_err().contains("no dirty bitmap"));
    pit.finish(true).unwrap();
    drop(qsd);

    // Killed while the image's bitmap was in use: it loads inconsistent.
    let qsd = Guest::start(tmp.path(), &images);
    guest_writes(&qsd, 0, &[2 << 20], 4096);
    qsd.kill9();
    let qsd = Guest::start(tmp.path(), &images);
    assert_eq!(
        bitmaps(&qsd.qmp, 0),
        [("vpsbackup-b2".into(), false, true, true)]
    );
    let pit = PointInTime::take(&qsd.qmp, &paths, &scratch, &checkpoint("b3", Some("b2"))).unwrap();
    assert!(pit.changes(0).unwrap_err().contains("inconsistent"));
    assert!(pit.changes(1).unwrap_err().contains("no dirty bitmap"));
    pit.finish(true).unwrap();
    assert_eq!(
        bitmaps(&qsd.qmp, 0),
        [("vpsbackup-b3".into(), true, true, false)]
    );
    assert_eq!(
        bitmaps(&qsd.qmp, 1),
        [("vpsbackup-b3".into(), true, false, false)]
    );
}

#[test]
fn with_a_guest_agent_the_instant_falls_inside_the_freeze() {
    let tmp = tempfile::tempdir().unwrap();
    let (qcow, raw) = disks(tmp.path());
    let paths = [qcow.clone(), raw.clone()];
    let qsd = Guest::start(tmp.path(), &[(&qcow, "qcow2"), (&raw, "raw")]);
    let scratch = tmp.path().join("scratch");
    let hammer = Hammer::start(qsd.guests.clone());
    let socket = tmp.path().join("qga.sock");
    let agent = fake_agent(&socket, hammer.gate.clone(), qsd.guests.clone());
    let opts = TakeOptions {
        checkpoint: None,
        guest_agent: Some(socket.clone()),
        scratch_limit: None,
    };
    let pit = PointInTime::take(&qsd.qmp, &paths, &scratch, &opts).unwrap();
    assert_eq!(pit.frozen(), Ok(2));
    let got0 = read_all(&pit.reader(0, DiskFormat::Qcow2).unwrap());
    let got1 = read_all(&pit.reader(1, DiskFormat::Raw).unwrap());
    hammer.stop();
    pit.finish(true).unwrap();
    let at_freeze = agent.join().unwrap();
    assert_same(&got0, &at_freeze[0], "qcow2 disk as frozen");
    assert_same(&got1, &at_freeze[1], "raw disk as frozen");

    // No agent listening: the point in time is taken all the same,
    // crash-consistent, and says why.
    std::fs::remove_file(&socket).unwrap();
    let pit = PointInTime::take(&qsd.qmp, &paths, &scratch, &opts).unwrap();
    assert!(pit.frozen().unwrap_err().contains("did not freeze"));
    pit.finish(true).unwrap();
    assert_eq!(qsd.leftovers(), Vec::<String>::new());
}

#[test]
fn a_guest_that_outgrows_the_scratch_limit_stops_the_read_not_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let (qcow, raw) = disks(tmp.path());
    let paths = [qcow.clone(), raw.clone()];
    let qsd = Guest::start(tmp.path(), &[(&qcow, "qcow2"), (&raw, "raw")]);
    let scratch = tmp.path().join("scratch");
    let opts = TakeOptions {
        scratch_limit: Some(1 << 20),
        ..TakeOptions::default()
    };
    let pit = PointInTime::take(&qsd.qmp, &paths, &scratch, &opts).unwrap();
    let r1 = pit.reader(1, DiskFormat::Raw).unwrap();
    let mut buf = vec![0u8; 65536];
    r1.read_exact_at(&mut buf, 0).unwrap();
    // The guest rewrites 4 MiB: each first write of a cluster copies the
    // old one into the overlay.
    let offsets: Vec<u64> = (0..64).map(|i| i * (256 << 10)).collect();
    guest_writes(&qsd, 1, &offsets, 65536);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !pit.overran() {
        assert!(
            std::time::Instant::now() < deadline,
            "the limit was never noticed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = r1.read_exact_at(&mut buf, 0).unwrap_err();
    assert!(err.to_string().contains("scratch space limit"), "{err}");
    drop(r1);
    pit.finish(false).unwrap();
    assert_eq!(qsd.leftovers(), Vec::<String>::new());
    // The guest's writes all landed.
    let f = std::fs::read(&qsd.guests[1]).unwrap();
    for (n, o) in offsets.iter().enumerate() {
        assert_eq!(f[*o as usize], n as u8 + 1);
    }
}
