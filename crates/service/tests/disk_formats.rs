//! Disk formats are recorded when the server is added and pinned on every
//! job: a guest that writes a qcow2 header (backing file: a host file) over
//! the start of its raw disk gets its raw bytes backed up and restored,
//! never the host file.

mod common;

use std::path::Path;
use std::process::Command;

use common::{same_bytes, TestApp};
use reqwest::StatusCode;
use serde_json::json;
use vpsbackup_catalog::{Catalog, Hooks, ImageFormat, Scope, ServerId};
use vpsbackup_engine::{detect_format, DiskFormat};

const MARKER: &[u8] = b"HOST-SECRET-0123456789abcdef-";

/// Writes, over the start of `disk`, a real qcow2 image backed by a host
/// file full of `MARKER`: what a hostile guest can do to its raw disk.
fn write_qcow2_header(dir: &Path, disk: &Path) {
    let secret = dir.join("host-secret.bin");
    std::fs::write(&secret, MARKER.repeat((1 << 20) / MARKER.len() + 1)).unwrap();
    let header = dir.join("hdr.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(&secret)
        .args(["-F", "raw"])
        .arg(&header)
        .arg("1M")
        .output()
        .expect("qemu-img is needed by the tests");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&header).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(disk).unwrap(),
        &bytes,
        0,
    )
    .unwrap();
    assert_eq!(detect_format(disk).unwrap(), DiskFormat::Qcow2);
}

fn holds_marker(path: &Path) -> bool {
    std::fs::read(path)
        .unwrap()
        .windows(MARKER.len())
        .any(|w| w == MARKER)
}

async fn run_job(app: &TestApp, token: &str, path: &str, body: serde_json::Value, poll: &str) {
    let (s, b) = app.post(path, token, body).await;
    assert!(
        s == StatusCode::CREATED || s == StatusCode::ACCEPTED,
        "{path}: {s} {b}"
    );
    let done = app.wait_done(&format!("{poll}{}/", b["id"]), token).await;
    assert_eq!(done["status"], "completed", "{done}");
}

#[tokio::test]
async fn a_guest_written_qcow2_header_is_backed_up_and_restored_as_raw_bytes() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    // Added while plain raw, as `vpsbackup server add` detects and records.
    let disk = app.server(12345, acc, Hooks::default()).await;
    let server = app
        .catalog
        .server(ServerId(12345), Scope::All)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(server.disks[0].format, Some(ImageFormat::Raw));

    write_qcow2_header(app.dir.path(), &disk);
    let snapshot = app.dir.path().join("snapshot.raw");
    std::fs::copy(&disk, &snapshot).unwrap();
    run_job(
        &app,
        &token,
        "/api/v1/servers/12345/backup/",
        json!({}),
        "/api/v1/backups/",
    )
    .await;
    let (_, page) = app.get("/api/v1/backups/", &token).await;
    let backup_id = page["results"][0]["id"].clone();
    // 16 MiB of raw disk, not the 1 MiB qcow2 view of the host file.
    assert!(
        page["results"][0]["size_mb"].as_u64().unwrap() > 1,
        "{page}"
    );

    // The guest changes its disk (header kept); the restore writes raw
    // bytes in place, and the result is the backed-up raw disk exactly.
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&disk).unwrap(),
        &[0xAA; 1 << 16],
        8 << 20,
    )
    .unwrap();
    assert!(!same_bytes(&disk, &snapshot));
    run_job(
        &app,
        &token,
        "/api/v1/servers/12345/restore/",
        json!({ "backup_id": backup_id }),
        "/api/v1/restores/",
    )
    .await;
    assert!(
        same_bytes(&disk, &snapshot),
        "restored disk differs from the raw disk"
    );
    assert!(
        !holds_marker(&disk),
        "the host file's bytes reached the disk"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_disk_without_a_recorded_format_is_detected_once_and_recorded() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    app.server(12345, acc, Hooks::default()).await;
    app.catalog
        .execute_raw("UPDATE server_disks SET format = NULL")
        .await
        .unwrap();
    run_job(
        &app,
        &token,
        "/api/v1/servers/12345/backup/",
        json!({}),
        "/api/v1/backups/",
    )
    .await;
    let server = app
        .catalog
        .server(ServerId(12345), Scope::All)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(server.disks[0].format, Some(ImageFormat::Raw));
    app.stop().await;
}
