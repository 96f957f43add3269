//! Servers that run while they are backed up: the runtime recorded with each
//! server decides where a consistent view of its disks comes from, and a
//! disk a running QEMU holds is never read torn.

mod common;
#[path = "../../disk/tests/common/guest.rs"]
mod guest;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{make_disk, TestApp};
use guest::{fake_agent, Guest, Hammer};
use reqwest::StatusCode;
use serde_json::{json, Value};
use vpsbackup_catalog::{
    engine_backup_id, BackupId, BackupRead, Catalog, Consistency, Hooks, ImageFormat, NewServer,
    Scope, ServerDisk, ServerId, ServerRuntime, ServerUpdate,
};
use vpsbackup_engine::qmp::Qmp;
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
async fn a_libvirt_server_whose_domain_is_missing_fails_with_a_plain_reason() {
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
        err.contains("point in time") && err.contains("not read"),
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

/// A qcow2 disk (from a raw one made with `seed0`) and a raw disk (from
/// `seed1`), `mb` MB each, in `dir`.
fn qcow_and_raw(dir: &Path, seed0: u64, seed1: u64, mb: usize) -> (PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    make_disk(&base, seed0, mb);
    let qcow = dir.join("disk0.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&base)
        .arg(&qcow));
    let raw = dir.join("disk1.raw");
    make_disk(&raw, seed1, mb);
    (qcow, raw)
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
    let (qcow, raw) = qcow_and_raw(&dir, 1, 2, 6);
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
                    guest_agent: None,
                },
                node: None,
            },
            TestApp::now(),
        )
        .await
        .unwrap();

    let hammer = Hammer::start(guest.guests.clone());

    let (s, b) = app
        .post("/api/v1/backups/", &token, json!({"server_id": 21}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let id = BackupId(b["id"].as_i64().unwrap());
    wait_for(&dir.join("frozen")).await;
    // The guest is held from the reference copy until the NBD socket of the
    // point in time exists, which QMP starts only after the transaction.
    let held = hammer.gate.lock().unwrap();
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
    let at_pit = hammer.count();
    let done = app
        .wait_done(&format!("/api/v1/backups/{}/", id.0), &token)
        .await;
    let during = hammer.count() - at_pit;
    hammer.stop();
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

/// Adds server `id` with runtime qemu on `guest`'s QMP socket.
async fn add_running(
    app: &TestApp,
    id: i64,
    acc: vpsbackup_catalog::AccountId,
    disks: &[(&Path, ImageFormat)],
    qmp: &Path,
    agent: Option<&Path>,
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
                hooks: Hooks::default(),
                runtime: ServerRuntime::Qemu {
                    qmp_socket: qmp.to_string_lossy().into_owned(),
                    guest_agent: agent.map(|a| a.to_string_lossy().into_owned()),
                },
                node: None,
            },
            TestApp::now(),
        )
        .await
        .unwrap();
}

async fn read_of(app: &TestApp, done: &Value) -> BackupRead {
    let id = BackupId(done["id"].as_i64().unwrap());
    let b = app.catalog.backup(id, Scope::All).await.unwrap().unwrap();
    b.read.expect("a completed backup records how it read")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_servers_next_backup_reads_only_what_changed() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    let dir = app.dir.path().to_owned();
    let (qcow, raw) = qcow_and_raw(&dir, 3, 4, 8);
    let guest = Guest::start(&dir, &[(&qcow, "qcow2"), (&raw, "raw")]);
    add_running(
        &app,
        31,
        acc,
        &[(&qcow, ImageFormat::Qcow2), (&raw, ImageFormat::Raw)],
        &guest.qmp,
        None,
    )
    .await;

    let first = backup(&app, &token, 31).await;
    assert_eq!(first["status"], "completed", "{first}");
    let read = read_of(&app, &first).await;
    assert!(!read.incremental);
    assert_eq!(read.consistency, Consistency::CrashConsistent);
    assert!(read.full_reason.unwrap().contains("no completed"));

    // The guest writes 4 KiB in three places of disk 0 and one of disk 1.
    let write = |disk: usize, at: u64| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&guest.guests[disk])
            .unwrap();
        f.write_all_at(&[0xc3; 4096], at).unwrap();
    };
    write(0, 1 << 20);
    write(0, 3 << 20);
    write(0, (5 << 20) + 8192);
    write(1, 2 << 20);
    let second = backup(&app, &token, 31).await;
    assert_eq!(second["status"], "completed", "{second}");
    let read = read_of(&app, &second).await;
    assert!(read.incremental, "{:?}", read.full_reason);
    assert_eq!(read.full_reason, None);
    // Four 64 KiB chunks at most (their unwritten parts may be holes).
    assert!(
        (4 * 4096..=4 * 65536).contains(&read.bytes_read),
        "{}",
        read.bytes_read
    );

    // Each backup restores to the guest's disks as they were.
    let repo = Repository::open_local(&app.settings.store_path()).unwrap();
    let out0 = dir.join("restored0.qcow2");
    let out1 = dir.join("restored1.raw");
    let id = BackupId(second["id"].as_i64().unwrap());
    repo.restore(
        &engine_backup_id(id),
        &[out0.clone(), out1.clone()],
        &JobControl::new(),
    )
    .unwrap();
    assert!(guest_view(&out0) == std::fs::read(&guest.guests[0]).unwrap());
    assert!(std::fs::read(&out1).unwrap() == std::fs::read(&guest.guests[1]).unwrap());

    // The newest backup deleted: the one before has no bitmap any more, so
    // the next backup reads in full and says why.
    let (s, _) = app
        .delete(&format!("/api/v1/backups/{}/", id.0), &token)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let third = backup(&app, &token, 31).await;
    assert_eq!(third["status"], "completed", "{third}");
    let read = read_of(&app, &third).await;
    assert!(!read.incremental);
    assert!(read.full_reason.unwrap().contains("no dirty bitmap"));
    // ... and the one after builds on it again.
    write(1, 6 << 20);
    let fourth = backup(&app, &token, 31).await;
    assert!(read_of(&app, &fourth).await.incremental);

    // Restoring into the running server is refused; once it is stopped,
    // the restore runs, and the next backup reads in full: the disks
    // changed behind the bitmaps.
    let restore = json!({"backup_id": fourth["id"]});
    let (s, b) = app
        .post("/api/v1/servers/31/restore/", &token, restore.clone())
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert!(b["detail"].as_str().unwrap().contains("running"), "{b}");
    drop(guest);
    let (s, b) = app
        .post("/api/v1/servers/31/restore/", &token, restore)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let done = app
        .wait_done(&format!("/api/v1/restores/{}/", b["id"]), &token)
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    let guest = Guest::start(&dir, &[(&qcow, "qcow2"), (&raw, "raw")]);
    let after = backup(&app, &token, 31).await;
    let read = read_of(&app, &after).await;
    assert!(!read.incremental);
    assert!(read.full_reason.unwrap().contains("since its last restore"));
    drop(guest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_incrementals_with_deletions_restores_every_point() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    let dir = app.dir.path().to_owned();
    let qcow = dir.join("disk0.qcow2");
    let base = dir.join("base.raw");
    make_disk(&base, 5, 6);
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&base)
        .arg(&qcow));
    let guest = Guest::start(&dir, &[(&qcow, "qcow2")]);
    add_running(
        &app,
        41,
        acc,
        &[(&qcow, ImageFormat::Qcow2)],
        &guest.qmp,
        None,
    )
    .await;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&guest.guests[0])
        .unwrap();

    // Six backups, the guest writing between them. Deleting an older
    // backup (the second, once the third exists) leaves the chain alone;
    // deleting the newest (the fourth, at once) makes the next one full.
    let mut kept: Vec<(i64, Vec<u8>)> = Vec::new();
    for round in 0..6u64 {
        if round > 0 {
            for k in 0..8 {
                f.write_all_at(&[round as u8; 8192], (round * 8 + k) * 97 % 1400 * 4096)
                    .unwrap();
            }
        }
        let reference = std::fs::read(&guest.guests[0]).unwrap();
        let done = backup(&app, &token, 41).await;
        assert_eq!(done["status"], "completed", "{done}");
        let read = read_of(&app, &done).await;
        let expect_incremental = !matches!(round, 0 | 4);
        assert_eq!(
            read.incremental, expect_incremental,
            "round {round}: {:?}",
            read.full_reason
        );
        if expect_incremental {
            // 8 writes of 8 KiB: at most 16 clusters.
            assert!(
                read.bytes_read <= 16 * 65536,
                "round {round}: {}",
                read.bytes_read
            );
        }
        let id = done["id"].as_i64().unwrap();
        kept.push((id, reference));
        let delete = match round {
            2 => Some(kept.remove(1).0),
            3 => Some(kept.pop().unwrap().0),
            _ => None,
        };
        if let Some(gone) = delete {
            let (s, _) = app
                .delete(&format!("/api/v1/backups/{gone}/"), &token)
                .await;
            assert_eq!(s, StatusCode::NO_CONTENT);
        }
    }
    assert_eq!(kept.len(), 4);
    let repo = Repository::open_local(&app.settings.store_path()).unwrap();
    for (id, reference) in kept {
        let out = dir.join(format!("restored-{id}.qcow2"));
        repo.restore(
            &engine_backup_id(BackupId(id)),
            std::slice::from_ref(&out),
            &JobControl::new(),
        )
        .unwrap();
        assert!(
            guest_view(&out) == reference,
            "backup {id} differs from its point in time"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_agent_freezes_the_guest_for_the_instant_and_the_backup_says_so() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    let dir = app.dir.path().to_owned();
    let raw = dir.join("disk0.raw");
    make_disk(&raw, 6, 4);
    let guest = Guest::start(&dir, &[(&raw, "raw")]);
    let socket = dir.join("qga.sock");
    let agent = fake_agent(&socket, Arc::new(Mutex::new(())), guest.guests.clone());
    add_running(
        &app,
        51,
        acc,
        &[(&raw, ImageFormat::Raw)],
        &guest.qmp,
        Some(&socket),
    )
    .await;
    let done = backup(&app, &token, 51).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(read_of(&app, &done).await.consistency, Consistency::Frozen);
    // The agent saw a freeze and a thaw (it asserts the thaw) and hung up.
    assert_eq!(agent.join().unwrap().len(), 1);

    // The agent gone: crash-consistent, and the backup still completes.
    let done = backup(&app, &token, 51).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        read_of(&app, &done).await.consistency,
        Consistency::CrashConsistent
    );
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
