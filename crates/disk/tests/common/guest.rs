//! A running "server" for the point-in-time tests of the disk crate and of
//! the service: qemu-storage-daemon holding each image as block node
//! `dev<i>`, the guest's view of it on the FUSE-mounted file `guest<i>`
//! (writable: the guest's own writes), QMP on `qmp.sock`; and a guest that
//! hammers its disks with random writes.
//!
//! Shared by path (`#[path = ...] mod guest;`); the including test crate
//! brings `Qmp` into its root (`vpsbackup_disk::qmp::Qmp` or the engine's
//! re-export), so this file names no crate of its own.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::Qmp;

pub struct Guest {
    child: Child,
    pub qmp: PathBuf,
    pub guests: Vec<PathBuf>,
}

impl Guest {
    /// Starts QSD on `images` (path, QEMU driver) with its sockets in `dir`;
    /// ready once QMP listens and every FUSE export shows the disk's size.
    pub fn start(dir: &Path, images: &[(&Path, &str)]) -> Guest {
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
            .expect("qemu-storage-daemon (qemu-utils) is needed by the tests");
        let g = Guest { child, qmp, guests };
        let deadline = Instant::now() + Duration::from_secs(10);
        // The monitor's socket file exists from its bind, a moment before
        // it listens: wait until it accepts.
        while !(std::os::unix::net::UnixStream::connect(&g.qmp).is_ok()
            && g.guests
                .iter()
                .all(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0)))
        {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        g
    }

    /// Names starting with "vpsbackup-" among exports, jobs and nodes:
    /// what a point in time left in the QEMU.
    pub fn leftovers(&self) -> Vec<String> {
        let mut qmp = Qmp::connect(&self.qmp).unwrap();
        let mut left = Vec::new();
        for (cmd, key) in [
            ("query-block-exports", "id"),
            ("query-block-jobs", "device"),
            ("query-named-block-nodes", "node-name"),
        ] {
            let args = if cmd == "query-named-block-nodes" {
                json!({"flat": true})
            } else {
                json!({})
            };
            for v in qmp.execute(cmd, args).unwrap().as_array().unwrap() {
                if let Some(n) = v[key].as_str().filter(|n| n.starts_with("vpsbackup-")) {
                    left.push(n.to_owned());
                }
            }
        }
        left
    }
}

impl Guest {
    /// Kills QEMU with SIGKILL, as a host crash would (nothing is saved),
    /// and unmounts its exports.
    #[allow(dead_code)] // the disk crate's tests use it, the service's do not
    pub fn kill9(mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        // Drop unmounts; its SIGTERM finds no process.
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SIGTERM: it unmounts its FUSE exports on the way out.
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

/// The guest hammering its disks from a thread: random 4..64 KiB writes of
/// random bytes at random 4 KiB-aligned offsets, each one under `gate` (a
/// test holds it to stop the guest for an instant).
pub struct Hammer {
    pub gate: Arc<Mutex<()>>,
    /// Writes made so far.
    pub writes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Hammer {
    /// Starts the guest's writes; returns once it has made 50.
    pub fn start(guests: Vec<PathBuf>) -> Hammer {
        let gate = Arc::new(Mutex::new(()));
        let writes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, w, st) = (gate.clone(), writes.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let files: Vec<_> = guests
                .iter()
                .map(|g| std::fs::OpenOptions::new().write(true).open(g).unwrap())
                .collect();
            let sizes: Vec<u64> = files.iter().map(|f| f.metadata().unwrap().len()).collect();
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let mut next = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            while !st.load(Ordering::Relaxed) {
                let d = (next() % files.len() as u64) as usize;
                let len = 4096 * (1 + next() % 16);
                let at = (next() % ((sizes[d] - len) / 4096)) * 4096;
                let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                let _g = g.lock().unwrap();
                files[d].write_all_at(&data, at).unwrap();
                w.fetch_add(1, Ordering::Relaxed);
            }
        });
        while writes.load(Ordering::Relaxed) < 50 {
            std::thread::sleep(Duration::from_millis(5));
        }
        Hammer {
            gate,
            writes,
            stop,
            thread,
        }
    }

    /// Writes made so far.
    pub fn count(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Stops the guest's writes and waits for the thread.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
    }
}

/// A guest agent for a guest with no OS: answers on a unix socket like
/// qemu-ga, and "freezes" by holding the guest's writes (the gate) while
/// it copies the guest's disks: what a frozen guest would have on disk.
#[allow(dead_code)] // used by some of the including test crates
pub fn fake_agent(
    socket: &Path,
    gate: Arc<Mutex<()>>,
    guests: Vec<PathBuf>,
) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut out = stream.try_clone().unwrap();
        let mut lines = BufReader::new(stream);
        let mut held = None;
        let mut at_freeze = Vec::new();
        let mut line = Vec::new();
        while lines.read_until(b'\n', &mut line).unwrap() > 0 {
            let text = String::from_utf8_lossy(&line)
                .trim_start_matches('\u{fffd}')
                .to_owned();
            line.clear();
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(text.trim()) else {
                continue;
            };
            let reply = match msg["execute"].as_str().unwrap() {
                "guest-sync-delimited" => {
                    out.write_all(&[0xff]).unwrap();
                    json!({"return": msg["arguments"]["id"]})
                }
                "guest-fsfreeze-freeze" => {
                    held = Some(gate.lock().unwrap());
                    at_freeze = guests.iter().map(|g| std::fs::read(g).unwrap()).collect();
                    json!({"return": 2})
                }
                "guest-fsfreeze-thaw" => {
                    held = None;
                    json!({"return": 2})
                }
                other => panic!("unexpected agent command {other}"),
            };
            out.write_all(format!("{reply}\n").as_bytes()).unwrap();
        }
        assert!(held.is_none(), "the guest was left frozen");
        at_freeze
    })
}
