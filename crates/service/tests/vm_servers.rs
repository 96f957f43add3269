//! Running servers on a real VM (qemu-system-x86_64 with no guest OS):
//! through libvirtd (runtime `libvirt`: pull-mode backups, checkpoints)
//! and driven directly (runtime `qemu`, and an offline disk the VM holds).
//! References are models of each disk: its bytes before the VM started,
//! with every guest write applied as it is made.

mod common;
#[path = "common/vm.rs"]
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{make_disk, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use vm::{apply, guest_bytes, Domain, Vm};
use vpsbackup_catalog::{
    engine_backup_id, AccountId, BackupId, BackupRead, Catalog, Consistency, Hooks, ImageFormat,
    NewServer, Scope, ServerDisk, ServerId, ServerRuntime,
};
use vpsbackup_engine::{
    Checkpoint, DiskFormat, JobControl, LibvirtOptions, LibvirtPointInTime, Repository,
};

const CLUSTER: u64 = 64 << 10;

async fn backup(app: &TestApp, token: &str, server: i64) -> Value {
    let (s, b) = app
        .post("/api/v1/backups/", token, json!({"server_id": server}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    app.wait_done(&format!("/api/v1/backups/{}/", b["id"]), token)
        .await
}

async fn read_of(app: &TestApp, done: &Value) -> BackupRead {
    assert_eq!(done["status"], "completed", "{done}");
    let id = BackupId(done["id"].as_i64().unwrap());
    let b = app.catalog.backup(id, Scope::All).await.unwrap().unwrap();
    b.read.expect("a completed backup records how it read")
}

fn checkpoint_of(done: &Value) -> String {
    format!(
        "vpsbackup-{}",
        engine_backup_id(BackupId(done["id"].as_i64().unwrap()))
    )
}

async fn add_server(
    app: &TestApp,
    id: i64,
    acc: AccountId,
    disks: &[(&Path, ImageFormat)],
    runtime: ServerRuntime,
    hooks: Hooks,
) {
    let plan = app.catalog.plan_by_name("standard").await.unwrap().unwrap();
    app.catalog
        .add_server(
            NewServer {
                id: ServerId(id),
                name: format!("vm{id}"),
                hostname: String::new(),
                account_id: acc,
                plan_id: plan.id,
                disks: disks
                    .iter()
                    .map(|(p, f)| ServerDisk::new(p.to_string_lossy(), *f))
                    .collect(),
                hooks,
                runtime,
                node: None,
            },
            TestApp::now(),
        )
        .await
        .unwrap();
}

/// A 16 MiB ext4 image as qcow2 in `dir`.
fn qcow2_disk(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let raw = dir.join(format!("{name}.src"));
    make_disk(&raw, seed, 6);
    let qcow = dir.join(format!("{name}.qcow2"));
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::remove_file(raw).unwrap();
    qcow
}

/// Restores backup `done` into fresh files and returns each disk's guest
/// view.
fn restored(app: &TestApp, done: &Value, names: &[&str]) -> Vec<Vec<u8>> {
    let repo = Repository::open_local(&app.settings.store_path()).unwrap();
    let outs: Vec<PathBuf> = names.iter().map(|n| app.dir.path().join(n)).collect();
    let id = engine_backup_id(BackupId(done["id"].as_i64().unwrap()));
    repo.restore(&id, &outs, &JobControl::new()).unwrap();
    let views = outs.iter().map(|o| guest_bytes(o)).collect();
    for o in outs {
        std::fs::remove_file(o).unwrap();
    }
    views
}

async fn restore_status(
    app: &TestApp,
    token: &str,
    server: i64,
    backup: &Value,
) -> (StatusCode, Value) {
    app.post(
        &format!("/api/v1/servers/{server}/restore/"),
        token,
        json!({"backup_id": backup["id"]}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libvirt_server_is_backed_up_in_full_then_incrementally_and_restored() {
    if !vm::available(&["qemu-system-x86_64", "virsh", "libvirtd", "virtlogd"]) {
        return;
    }
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    let dir = app.dir.path().to_owned();
    let qcow = qcow2_disk(&dir, "disk0", 41);
    let mut model = guest_bytes(&qcow);
    let dom = Domain::start(&dir, "vpsb-full-incr", &[(&qcow, "qcow2")]);
    add_server(
        &app,
        41,
        acc,
        &[(&qcow, ImageFormat::Qcow2)],
        ServerRuntime::Libvirt {
            domain: dom.name.clone(),
        },
        Hooks::default(),
    )
    .await;

    let first = backup(&app, &token, 41).await;
    let read = read_of(&app, &first).await;
    assert!(!read.incremental);
    assert!(read.full_reason.unwrap().contains("no completed"));
    // No guest agent answers a guest with no OS.
    assert_eq!(read.consistency, Consistency::CrashConsistent);
    assert_eq!(dom.checkpoints(), vec![checkpoint_of(&first)]);
    assert!(!dom.has_job(), "the backup job was ended");
    assert_eq!(restored(&app, &first, &["r1.qcow2"]), vec![model.clone()]);

    // Five dirty clusters: three writes in clusters of their own, two in
    // one cluster, and one across a cluster boundary.
    let writes = [
        (0xa1, CLUSTER * 16, 4096),
        (0xa2, CLUSTER * 48 + 8192, 4096),
        (0xa3, CLUSTER * 80, CLUSTER),
        (0xa4, CLUSTER * 80 + 4096, 4096),
        (0xa5, CLUSTER * 112 - 4096, 8192),
    ];
    for (byte, at, len) in writes {
        dom.write(0, byte, at, len);
        apply(&mut model, byte, at, len);
    }
    let second = backup(&app, &token, 41).await;
    let read = read_of(&app, &second).await;
    assert!(read.incremental, "{:?}", read.full_reason);
    assert_eq!(read.full_reason, None);
    assert_eq!(read.bytes_read, 5 * CLUSTER, "exactly the dirty clusters");
    assert_eq!(restored(&app, &second, &["r2.qcow2"]), vec![model.clone()]);
    // The base's checkpoint went, the new one is the next base.
    assert_eq!(dom.checkpoints(), vec![checkpoint_of(&second)]);

    // Restore: refused while the domain runs, done once it is shut off.
    let (s, b) = restore_status(&app, &token, 41, &first).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    dom.destroy();
    let (s, b) = restore_status(&app, &token, 41, &first).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let done = app
        .wait_done(&format!("/api/v1/restores/{}/", b["id"]), &token)
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    let at_first = restored(&app, &first, &["r3.qcow2"]).remove(0);
    assert!(
        guest_bytes(&qcow) == at_first,
        "the disk is as at the first backup"
    );

    // After a restore the chain starts again: a full read, and the stale
    // checkpoint is gone.
    dom.boot();
    dom.write(0, 0xb1, CLUSTER * 3, 4096);
    let mut model = at_first;
    apply(&mut model, 0xb1, CLUSTER * 3, 4096);
    let third = backup(&app, &token, 41).await;
    let read = read_of(&app, &third).await;
    assert!(!read.incremental);
    assert!(read.full_reason.unwrap().contains("since its last restore"));
    assert_eq!(dom.checkpoints(), vec![checkpoint_of(&third)]);
    assert_eq!(restored(&app, &third, &["r4.qcow2"]), vec![model]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirt_fallbacks_read_in_full_with_the_reason() {
    if !vm::available(&["qemu-system-x86_64", "virsh", "libvirtd", "virtlogd"]) {
        return;
    }
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    let dir = app.dir.path().to_owned();
    let qcow = qcow2_disk(&dir, "disk0", 42);
    let raw = dir.join("disk1.raw");
    make_disk(&raw, 43, 4);
    let mut models = [guest_bytes(&qcow), std::fs::read(&raw).unwrap()];
    let dom = Domain::start(&dir, "vpsb-fallback", &[(&qcow, "qcow2"), (&raw, "raw")]);
    add_server(
        &app,
        42,
        acc,
        &[(&qcow, ImageFormat::Qcow2), (&raw, ImageFormat::Raw)],
        ServerRuntime::Libvirt {
            domain: dom.name.clone(),
        },
        Hooks::default(),
    )
    .await;
    let write = |models: &mut [Vec<u8>; 2], disk: usize, byte: u8, at: u64| {
        dom.write(disk, byte, at, 4096);
        apply(&mut models[disk], byte, at, 4096);
    };

    let first = backup(&app, &token, 42).await;
    let full = read_of(&app, &first).await;
    assert!(!full.incremental);
    // The raw disk keeps no checkpoint; the qcow2 one builds on its own,
    // the raw one is read in full and the backup says why.
    write(&mut models, 0, 0xc1, CLUSTER * 20);
    write(&mut models, 1, 0xc2, CLUSTER * 30);
    let second = backup(&app, &token, 42).await;
    let read = read_of(&app, &second).await;
    assert!(!read.incremental);
    assert!(read.full_reason.unwrap().contains("raw"));
    // The qcow2 disk holds over 6 MiB of data: read incrementally, it
    // adds one cluster to the raw disk's full read.
    let incremental_only_raw = |bytes_read: u64| bytes_read + (4 << 20) < full.bytes_read;
    assert!(
        incremental_only_raw(read.bytes_read),
        "the qcow2 disk was read incrementally: {} of {} bytes",
        read.bytes_read,
        full.bytes_read
    );
    assert_eq!(
        restored(&app, &second, &["r1.qcow2", "r1.raw"]),
        models.to_vec()
    );

    // The checkpoint deleted by hand: a full read with the reason.
    let cp = checkpoint_of(&second);
    assert_eq!(dom.checkpoints(), vec![cp.clone()]);
    let out = Command::new("virsh")
        .args([
            "checkpoint-delete",
            "--domain",
            &dom.name,
            "--checkpointname",
            &cp,
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    write(&mut models, 0, 0xc3, CLUSTER * 40);
    let third = backup(&app, &token, 42).await;
    let read = read_of(&app, &third).await;
    assert!(!read.incremental);
    assert!(
        read.full_reason
            .as_deref()
            .unwrap()
            .contains("no checkpoint of the previous backup"),
        "{:?}",
        read.full_reason
    );
    assert_eq!(
        restored(&app, &third, &["r2.qcow2", "r2.raw"]),
        models.to_vec()
    );

    // A job that crashed with its backup job running in libvirt: the next
    // job ends it and removes its checkpoint, then builds on the last
    // completed backup.
    let scratch = app.settings.data_dir.join("scratch/server-42");
    let crashed = LibvirtPointInTime::take(
        &dom.name,
        &[
            (qcow.clone(), DiskFormat::Qcow2),
            (raw.clone(), DiskFormat::Raw),
        ],
        &scratch,
        &LibvirtOptions {
            checkpoint: Some(Checkpoint {
                new: "crashed".into(),
                base: Some(engine_backup_id(BackupId(third["id"].as_i64().unwrap()))),
            }),
            scratch_limit: None,
        },
    )
    .unwrap();
    crashed.abandon();
    assert!(dom.has_job());
    assert_eq!(dom.checkpoints().len(), 2);
    write(&mut models, 0, 0xc4, CLUSTER * 50);
    let fourth = backup(&app, &token, 42).await;
    let read = read_of(&app, &fourth).await;
    assert!(
        read.full_reason.unwrap().contains("raw"),
        "only the raw disk in full"
    );
    assert!(incremental_only_raw(read.bytes_read), "{}", read.bytes_read);
    assert!(!dom.has_job());
    assert_eq!(dom.checkpoints(), vec![checkpoint_of(&fourth)]);
    assert_eq!(
        restored(&app, &fourth, &["r3.qcow2", "r3.raw"]),
        models.to_vec()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vms_backup_under_guest_writes_is_its_point_in_time() {
    if !vm::available(&["qemu-system-x86_64"]) {
        return;
    }
    // A read limit keeps the read going while the guest writes.
    let app = TestApp::start_with(|s| s.read_limit_mb_per_s = Some(8)).await;
    let (acc, token) = app.account("acme").await;
    let dir = app.dir.path().to_owned();
    let qcow = qcow2_disk(&dir, "disk0", 51);
    let raw = dir.join("disk1.raw");
    make_disk(&raw, 52, 6);
    let models = Arc::new(Mutex::new([
        guest_bytes(&qcow),
        std::fs::read(&raw).unwrap(),
    ]));
    let vm = Arc::new(Vm::start(&dir, &[(&qcow, "qcow2"), (&raw, "raw")]));
    // pre_backup announces the job and waits for "go": the test takes its
    // reference there, with the guest held, and lets the guest go once the
    // point in time exists.
    let hooks = Hooks {
        pre_backup: Some(format!(
            "touch {d}/frozen; while [ ! -e {d}/go ]; do sleep 0.01; done",
            d = dir.display()
        )),
        ..Hooks::default()
    };
    add_server(
        &app,
        51,
        acc,
        &[(&qcow, ImageFormat::Qcow2), (&raw, ImageFormat::Raw)],
        ServerRuntime::Qemu {
            qmp_socket: vm.qmp.to_string_lossy().into_owned(),
            guest_agent: None,
        },
        hooks,
    )
    .await;

    // The guest: random 4..64 KiB writes through its virtio devices, each
    // applied to the model under the same lock.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let size = models.lock().unwrap()[0].len() as u64;
    let guest = {
        let (vm, models, stop, writes) = (vm.clone(), models.clone(), stop.clone(), writes.clone());
        std::thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let disk = (x % 2) as usize;
                let len = 4096 * (1 + (x >> 8) % 16);
                let at = ((x >> 16) % ((size - len) / 4096)) * 4096;
                let byte = (x >> 40) as u8;
                let mut m = models.lock().unwrap();
                vm.write(disk, byte, at, len);
                apply(&mut m[disk], byte, at, len);
                writes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let (s, b) = app
        .post("/api/v1/backups/", &token, json!({"server_id": 51}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir.join("frozen").exists() {
        assert!(Instant::now() < deadline, "no pre_backup hook");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The guest is held from the reference until the point in time exists.
    let reference = {
        let held = models.lock().unwrap();
        std::fs::write(dir.join("go"), b"").unwrap();
        let nbd = app.settings.data_dir.join("scratch/server-51/nbd.sock");
        while !nbd.exists() {
            assert!(Instant::now() < deadline, "no point in time was taken");
            std::thread::sleep(Duration::from_millis(2));
        }
        held.clone()
    };
    let at_pit = writes.load(Ordering::Relaxed);
    let done = app
        .wait_done(&format!("/api/v1/backups/{}/", b["id"]), &token)
        .await;
    let during = writes.load(Ordering::Relaxed) - at_pit;
    stop.store(true, Ordering::Relaxed);
    guest.join().unwrap();
    assert_eq!(done["status"], "completed", "{done}");
    assert!(during >= 20, "only {during} guest writes during the backup");
    assert_eq!(
        restored(&app, &done, &["r.qcow2", "r.raw"]),
        reference.to_vec(),
        "the backup is the disks at the point in time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_raw_disk_a_running_vm_holds_is_refused_not_read_torn() {
    if !vm::available(&["qemu-system-x86_64"]) {
        return;
    }
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    let dir = app.dir.path().to_owned();
    let raw = dir.join("disk0.raw");
    make_disk(&raw, 61, 4);
    let _vm = Vm::start(&dir, &[(&raw, "raw")]);
    add_server(
        &app,
        61,
        acc,
        &[(&raw, ImageFormat::Raw)],
        ServerRuntime::Offline,
        Hooks::default(),
    )
    .await;
    let done = backup(&app, &token, 61).await;
    assert_eq!(done["status"], "failed", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(err.contains("running QEMU"), "{err}");
    assert!(!err.contains('/'), "no host path: {err}");
}
