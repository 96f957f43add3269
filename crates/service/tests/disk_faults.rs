//! A server's disk image gone or cut short (issue 8, part 3), for real: the
//! image file deleted before the backup, and truncated while a backup
//! (slowed by the read limit) reads it. The backup fails with a reason,
//! nothing panics, and the service goes on: another server's backup
//! succeeds afterwards. (Permission denied is in the cli's tests: it needs
//! a `serve` process running as an unprivileged user.)

mod common;
use common::TestApp;
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};
use vpsbackup_catalog::Hooks;

/// Starts a backup of `server`; returns its path for polling.
async fn start_backup(app: &TestApp, token: &str, server: i64) -> String {
    let (code, b) = app
        .post(
            &format!("/api/v1/servers/{server}/backup/"),
            token,
            json!({}),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{b}");
    format!("/api/v1/backups/{}/", b["id"])
}

async fn still_serving(app: &TestApp, token: &str, server: i64) {
    let path = start_backup(app, token, server).await;
    let done = app.wait_done(&path, token).await;
    assert_eq!(done["status"], "completed", "{done}");
    let (code, s) = app.get(&format!("/api/v1/servers/{server}/"), token).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(s["status"], "active");
}

#[tokio::test]
async fn a_deleted_disk_image_fails_the_backup_with_a_reason() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    let disk = app.server(1, acc, Hooks::default()).await;
    app.server(2, acc, Hooks::default()).await;
    std::fs::remove_file(&disk).unwrap();

    let path = start_backup(&app, &token, 1).await;
    let done = app.wait_done(&path, &token).await;
    assert_eq!(done["status"], "failed", "{done}");
    let reason = done["error"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "{done}");
    assert!(!reason.to_lowercase().contains("panic"), "{reason}");
    eprintln!("failure reason: {reason}");
    let (_, s) = app.get("/api/v1/servers/1/", &token).await;
    assert_eq!(s["status"], "active", "{s}");
    still_serving(&app, &token, 2).await;
    app.stop().await;
}

#[tokio::test]
async fn a_disk_image_truncated_under_a_running_backup_fails_it_with_a_reason() {
    // 1 MB/s: the 4 MiB of data take seconds, time enough to cut the file.
    let app = TestApp::start_with(|s| s.read_limit_mb_per_s = Some(1)).await;
    let (acc, token) = app.account("acme").await;
    let disk = app.server(1, acc, Hooks::default()).await;

    let path = start_backup(&app, &token, 1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, b) = app.get(&path, &token).await;
        assert_eq!(b["status"], "in_progress", "finished before the cut: {b}");
        if b["progress"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Cut the image to 1 MiB while the backup reads it.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();

    let done = app.wait_done(&path, &token).await;
    assert_eq!(done["status"], "failed", "a cut disk was recorded: {done}");
    let reason = done["error"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "{done}");
    assert!(!reason.to_lowercase().contains("panic"), "{reason}");
    eprintln!("failure reason: {reason}");

    // The service goes on: the disk made whole again backs up.
    common::make_disk(&disk, 1, 4);
    let app = {
        let (dir, mut settings) = app.stop().await;
        settings.read_limit_mb_per_s = None;
        TestApp::start_in(dir, settings).await
    };
    still_serving(&app, &token, 1).await;
    app.stop().await;
}
