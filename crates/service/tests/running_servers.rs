//! Servers that run while they are backed up: the runtime recorded with each
//! server decides where a consistent view of its disks comes from, and a
//! disk a running QEMU holds is never read torn.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{make_disk, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use vpsbackup_catalog::{
    engine_backup_id, BackupId, Catalog, Hooks, ImageFormat, NewServer, ServerDisk, ServerId,
    ServerRuntime, ServerUpdate,
};
use vpsbackup_engine::{JobControl, Repository};

async fn backup(app: &TestApp, token: &str, server: i64) -> Value {
    let (s, b) = app
        .post("/api/v1/backups/", token, json!({"server_id": server}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    app.wait_done(&format!("/api/v1/backups/{}/", b["id"]), token)
        .await
}

async fn set_runtime(app: &TestApp, server: i64, runtime: ServerRuntime) {
    app.catalog
        .update_server(
            ServerId(server),
            ServerUpdate {
                runtime: Some(runtime),
                ..Default::default()
            },
            TestApp::now(),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_libvirt_server_is_refused_with_a_clear_reason() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    app.server(7, acc, Hooks::default()).await;
    set_runtime(
        &app,
        7,
        ServerRuntime::Libvirt {
            domain: "vm7".into(),
        },
    )
    .await;
    let done = backup(&app, &token, 7).await;
    assert_eq!(done["status"], "failed", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(
        err.contains("libvirt") && err.contains("not supported yet"),
        "{err}"
    );
    assert!(!err.contains('/'), "no host path in a customer text: {err}");
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running "server": qemu-storage-daemon with each image as node
/// `dev<i>`, the guest's view of it on the FUSE-mounted file `guest<i>`
/// (writable, as the guest's own writes), QMP on `qmp.sock`.
struct Guest {
    child: Child,
    qmp: PathBuf,
    guests: Vec<PathBuf>,
}

impl Guest {
    fn start(dir: &Path, images: &[(&Path, &str)]) -> Guest {
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
        while !(g.qmp.exists()
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

    /// Names starting with "vpsbackup-" among exports, jobs and nodes.
    fn leftovers(&self) -> Vec<String> {
        let mut qmp = vpsbackup_engine::qmp::Qmp::connect(&self.qmp).unwrap();
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

/// The guest: random 4..64 KiB writes of random bytes at random offsets of
/// its disks until stopped, each one under `gate`.
fn hammer(
    guests: Vec<PathBuf>,
    gate: Arc<Mutex<()>>,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
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
        while !stop.load(Ordering::Relaxed) {
            let d = (next() % files.len() as u64) as usize;
            let len = 4096 * (1 + next() % 16);
            let at = (next() % ((sizes[d] - len) / 4096)) * 4096;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _g = gate.lock().unwrap();
            files[d].write_all_at(&data, at).unwrap();
            writes.fetch_add(1, Ordering::Relaxed);
        }
    })
}

async fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The guest view of a restored image.
fn guest_view(image: &Path) -> Vec<u8> {
    let raw = image.with_extension("view");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-O", "raw"])
        .arg(image)
        .arg(&raw));
    std::fs::read(raw).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_servers_backup_is_its_disks_at_the_point_in_time() {
    // A read limit keeps the read going while the guest writes.
    let app = TestApp::start_with(|s| s.read_limit_mb_per_s = Some(8)).await;
    let (acc, token) = app.account("acme").await;
    let dir = app.dir.path().to_owned();
    let base = dir.join("base.raw");
    make_disk(&base, 1, 6);
    let qcow = dir.join("disk0.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&base)
        .arg(&qcow));
    let raw = dir.join("disk1.raw");
    make_disk(&raw, 2, 6);
    let guest = Guest::start(&dir, &[(&qcow, "qcow2"), (&raw, "raw")]);

    // pre_backup lets the test make its reference copy: it announces the
    // job and waits for "go"; the point in time follows right after.
    let hooks = Hooks {
        pre_backup: Some(format!(
            "touch {d}/frozen; while [ ! -e {d}/go ]; do sleep 0.01; done",
            d = dir.display()
        )),
        ..Hooks::default()
    };
    let plan = app.catalog.plan_by_name("standard").await.unwrap().unwrap();
    app.catalog
        .add_server(
            NewServer {
                id: ServerId(21),
                name: "vm21".into(),
                hostname: String::new(),
                account_id: acc,
                plan_id: plan.id,
                disks: vec![
                    ServerDisk::new(qcow.to_string_lossy(), ImageFormat::Qcow2),
                    ServerDisk::new(raw.to_string_lossy(), ImageFormat::Raw),
                ],
                hooks,
                runtime: ServerRuntime::Qemu {
                    qmp_socket: guest.qmp.to_string_lossy().into_owned(),
                },
            },
            TestApp::now(),
        )
        .await
        .unwrap();

    let gate = Arc::new(Mutex::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = hammer(
        guest.guests.clone(),
        gate.clone(),
        stop.clone(),
        writes.clone(),
    );

    let (s, b) = app
        .post("/api/v1/backups/", &token, json!({"server_id": 21}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let id = BackupId(b["id"].as_i64().unwrap());
    wait_for(&dir.join("frozen")).await;
    // The guest is held from the reference copy until the NBD socket of the
    // point in time exists, which QMP starts only after the transaction.
    let held = gate.lock().unwrap();
    let reference: Vec<Vec<u8>> = guest
        .guests
        .iter()
        .map(|g| std::fs::read(g).unwrap())
        .collect();
    std::fs::write(dir.join("go"), b"").unwrap();
    let scratch = app.settings.data_dir.join("scratch/server-21");
    let nbd = scratch.join("nbd.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !nbd.exists() {
        assert!(Instant::now() < deadline, "no point in time was taken");
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(held);
    let at_pit = writes.load(Ordering::Relaxed);
    let done = app
        .wait_done(&format!("/api/v1/backups/{}/", id.0), &token)
        .await;
    let during = writes.load(Ordering::Relaxed) - at_pit;
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(done["status"], "completed", "{done}");
    assert!(during >= 50, "only {during} guest writes during the backup");

    // Nothing of the point in time is left, in QEMU or on disk.
    assert_eq!(guest.leftovers(), Vec::<String>::new());
    let left: Vec<_> = std::fs::read_dir(&scratch)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "scratch files left: {left:?}");

    // The backup restores to the disks as they were at the point in time.
    let repo = Repository::open_local(&app.settings.store_path()).unwrap();
    let out0 = dir.join("restored0.qcow2");
    let out1 = dir.join("restored1.raw");
    repo.restore(
        &engine_backup_id(id),
        &[out0.clone(), out1.clone()],
        &JobControl::new(),
    )
    .unwrap();
    assert!(
        guest_view(&out0) == reference[0],
        "qcow2 disk differs from the point in time"
    );
    assert!(
        std::fs::read(&out1).unwrap() == reference[1],
        "raw disk differs from the point in time"
    );
    assert_ne!(std::fs::read(&guest.guests[1]).unwrap(), reference[1]);
}

#[tokio::test]
async fn an_offline_servers_disk_held_by_a_running_qemu_is_refused() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    let disk = app.server(8, acc, Hooks::default()).await;
    let before = std::fs::read(&disk).unwrap();
    let guest = Guest::start(app.dir.path(), &[(&disk, "raw")]);
    let done = backup(&app, &token, 8).await;
    assert_eq!(done["status"], "failed", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(err.contains("running QEMU"), "{err}");
    assert!(!err.contains('/'), "no host path in a customer text: {err}");
    drop(guest);
    assert_eq!(std::fs::read(&disk).unwrap(), before);
    // Once QEMU has stopped, the same server backs up.
    let done = backup(&app, &token, 8).await;
    assert_eq!(done["status"], "completed", "{done}");
}
