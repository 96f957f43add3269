//! Point-in-time backups of a running QEMU's disks: a real
//! qemu-storage-daemon serves a qcow2 and a raw disk to a "guest" (writable
//! FUSE exports, written with pwrite) that hammers random writes while the
//! point in time is read; what is read equals, byte for byte, a reference
//! copy made at the instant of the transaction (the guest is held back
//! between the copy and the transaction, and only then).

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use vpsbackup_disk::point_in_time::PointInTime;
use vpsbackup_disk::qmp::Qmp;
use vpsbackup_disk::{DiskFormat, DiskReader};

/// qemu-storage-daemon with each image as node `dev<i>`, its guest view
/// on the FUSE-mounted file `guest<i>` (writable), QMP on `qmp.sock`.
struct GuestQsd {
    child: Child,
    qmp: PathBuf,
    guests: Vec<PathBuf>,
}

impl GuestQsd {
    fn start(dir: &Path, images: &[(&Path, &str)]) -> GuestQsd {
        let qmp = dir.join("qmp.sock");
        let mut cmd = Command::new("qemu-storage-daemon");
        let mut guests = Vec::new();
        for (i, (path, format)) in images.iter().enumerate() {
            let guest = dir.join(format!("guest{i}"));
            std::fs::write(&guest, b"").unwrap();
            cmd.arg("--blockdev")
                .arg(format!(
                    "driver=file,filename={},node-name=file{i}",
                    path.display()
                ))
                .arg("--blockdev")
                .arg(format!("driver={format},file=file{i},node-name=dev{i}"))
                .arg("--export")
                .arg(format!(
                    "type=fuse,id=guest{i},node-name=dev{i},mountpoint={},writable=on",
                    guest.display()
                ));
            guests.push(guest);
        }
        cmd.arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=m",
                qmp.display()
            ))
            .args(["--monitor", "chardev=m"]);
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon");
        let q = GuestQsd { child, qmp, guests };
        let deadline = Instant::now() + Duration::from_secs(10);
        // Ready once QMP listens and every FUSE export shows the disk's size.
        while !(q.qmp.exists()
            && q.guests
                .iter()
                .all(|g| std::fs::metadata(g).is_ok_and(|m| m.len() > 0)))
        {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        q
    }

    fn names(&self, command: &str, key: &str) -> Vec<String> {
        let mut qmp = Qmp::connect(&self.qmp).unwrap();
        let args = if command == "query-named-block-nodes" {
            json!({"flat": true})
        } else {
            json!({})
        };
        qmp.execute(command, args)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v[key].as_str().map(str::to_owned))
            .collect()
    }

    /// Nothing of ours left in the QEMU.
    fn assert_clean(&self) {
        for (cmd, key) in [
            ("query-block-exports", "id"),
            ("query-block-jobs", "device"),
            ("query-named-block-nodes", "node-name"),
        ] {
            let left: Vec<_> = self
                .names(cmd, key)
                .into_iter()
                .filter(|n| n.starts_with("vpsbackup-"))
                .collect();
            assert!(left.is_empty(), "{cmd} still lists {left:?}");
        }
    }
}

impl Drop for GuestQsd {
    fn drop(&mut self) {
        // SIGTERM: QSD unmounts its FUSE exports on the way out.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        for g in &self.guests {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(g)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Random writes (4 KiB..64 KiB of random bytes at random 4 KiB-aligned
/// offsets) to the guest files until stopped, each under `gate`.
fn hammer(
    guests: Vec<PathBuf>,
    gate: Arc<Mutex<()>>,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let files: Vec<_> = guests
            .iter()
            .map(|g| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(g)
                    .unwrap()
            })
            .collect();
        let sizes: Vec<u64> = files.iter().map(|f| f.metadata().unwrap().len()).collect();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        while !stop.load(Ordering::Relaxed) {
            let d = (next() % files.len() as u64) as usize;
            let len = 4096 * (1 + next() % 16);
            let at = (next() % ((sizes[d] - len) / 4096)) * 4096;
            let data = pattern(next(), len as usize);
            let _g = gate.lock().unwrap();
            files[d].write_all_at(&data, at).unwrap();
            writes.fetch_add(1, Ordering::Relaxed);
        }
    })
}

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
    let qsd = GuestQsd::start(tmp.path(), &[(&qcow, "qcow2"), (&raw, "raw")]);
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
    qsd.assert_clean();
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
    let qsd = GuestQsd::start(tmp.path(), &[(&qcow, "qcow2"), (&raw, "raw")]);
    let scratch = tmp.path().join("scratch");
    // A job that dies with its exports, jobs, overlays and NBD server up.
    let crashed = PointInTime::take(&qsd.qmp, &[qcow.clone(), raw.clone()], &scratch).unwrap();
    crashed.abandon();
    assert!(qsd
        .names("query-block-exports", "id")
        .iter()
        .any(|n| n.starts_with("vpsbackup-")));

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
    qsd.assert_clean();

    // A disk the QEMU does not have is refused by name of the cause.
    let other = tmp.path().join("other.raw");
    std::fs::write(&other, vec![0u8; 1 << 20]).unwrap();
    let err = PointInTime::take(&qsd.qmp, &[other], &scratch)
        .err()
        .unwrap();
    assert!(err.to_string().contains("no block node"), "{err}");
    qsd.assert_clean();
}
