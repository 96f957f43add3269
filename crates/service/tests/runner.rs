//! The job runner's edges, through a real service: shutdown while a post
//! hook runs, and what customers and operators each learn of a failure.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{same_bytes, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use vpsbackup_catalog::{BackupId, Catalog, Hooks, JobId, JobState, RestoreId, Scope, WorkStatus};

async fn wait_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Shutdown arriving while the post hook runs (the engine's work is done)
/// must record the job as finished: a finished restore handed back to the
/// queue would run again at the next start, over what the guest wrote since.
#[tokio::test]
async fn a_job_finished_before_shutdown_is_recorded_not_redone() {
    let dir = tempfile::tempdir().unwrap();
    let thawing = dir.path().join("thawing");
    let starting = dir.path().join("starting");
    let mut settings = common::test_settings(dir.path());
    settings.workers = 1;
    let app = TestApp::start_in(dir, settings).await;
    let (acc, token) = app.account("acme").await;
    let hooks = Hooks {
        post_backup: Some(format!("touch {}; sleep 3", thawing.display())),
        post_restore: Some(format!("touch {}; sleep 3", starting.display())),
        ..Hooks::default()
    };
    let disk = app.server(12345, acc, hooks).await;
    let at_backup = disk.with_extension("at-backup");
    std::fs::copy(&disk, &at_backup).unwrap();

    // A backup: stop while its post_backup hook runs.
    let (s, b) = app
        .post("/api/v1/backups/", &token, json!({"server_id": 12345}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let id = b["id"].as_i64().unwrap();
    wait_file(&thawing).await;
    let (dir, settings) = app.stop().await;
    let cat = vpsbackup_service::open_catalog(&settings.data_dir, 1)
        .await
        .unwrap();
    let job = cat.job(JobId(1)).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Done, "{job:?}");
    let row = cat.backup(BackupId(id), Scope::All).await.unwrap().unwrap();
    assert_eq!(row.status, WorkStatus::Completed, "{row:?}");
    cat.close().await;

    // It is not redone at the next start, and it restores.
    std::fs::remove_file(&thawing).unwrap();
    let app = TestApp::start_in(dir, settings).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!thawing.exists(), "the finished backup ran again");
    let (s, r) = app
        .post(
            "/api/v1/servers/12345/restore/",
            &token,
            json!({"backup_id": id}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{r}");
    let restore_id = r["id"].as_i64().unwrap();
    wait_file(&starting).await;
    assert!(same_bytes(&disk, &at_backup), "the restore wrote the disk");
    // The guest starts and writes; then the service stops.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(b"written by the guest after the restore", 1 << 20)
            .unwrap();
        f.sync_all().unwrap();
    }
    let (dir, settings) = app.stop().await;
    let cat = vpsbackup_service::open_catalog(&settings.data_dir, 1)
        .await
        .unwrap();
    let job = cat.job(JobId(2)).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Done, "{job:?}");
    let restore = cat
        .restore(RestoreId(restore_id), Scope::All)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(restore.status, WorkStatus::Completed, "{restore:?}");
    cat.close().await;

    std::fs::remove_file(&starting).unwrap();
    let app = TestApp::start_in(dir, settings).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!starting.exists(), "the finished restore ran again");
    assert!(
        !same_bytes(&disk, &at_backup),
        "the guest's write was overwritten by a second restore"
    );
    let (_, r) = app
        .get(&format!("/api/v1/restores/{restore_id}/"), &token)
        .await;
    assert_eq!(r["status"], "completed", "{r}");
    assert_eq!(r["error"], Value::Null);
    app.stop().await;
}

/// The data dir's lock belongs to the running service, not to a process id:
/// a second service on the same dir is refused even from the same process
/// (a pid check cannot tell itself apart, and between reading and writing a
/// pidfile another start can slip in).
#[tokio::test]
async fn a_second_service_on_the_same_data_dir_is_refused() {
    let app = TestApp::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second = tokio::time::timeout(
        Duration::from_secs(10),
        vpsbackup_service::run(app.settings.clone(), listener, std::future::pending()),
    )
    .await
    .expect("the second service ran instead of refusing");
    match second {
        Err(e @ vpsbackup_service::ServiceError::AlreadyRunning { .. }) => {
            assert!(e.to_string().contains("another `vpsbackup serve`"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    // Once the first stops, the dir is free again.
    let (dir, settings) = app.stop().await;
    let app = TestApp::start_in(dir, settings).await;
    app.stop().await;
}

/// Customers read a plain reason; the host's paths and the raw stderr of
/// hooks and QEMU stay with the operator (log and `vpsbackup failures`).
#[tokio::test]
async fn failures_show_customers_a_plain_reason_and_keep_the_detail_for_operators() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    let hooks = Hooks {
        pre_backup: Some("echo 'fsfreeze: /srv/guest-7: Device busy' >&2; exit 4".into()),
        ..Hooks::default()
    };
    app.server(7, acc, hooks).await;
    let gone = app.server(8, acc, Hooks::default()).await;
    std::fs::remove_file(&gone).unwrap();
    let host_dir = app.dir.path().to_string_lossy().into_owned();

    let run = |server: i64| {
        let app = &app;
        let token = &token;
        async move {
            let (s, b) = app
                .post("/api/v1/backups/", token, json!({"server_id": server}))
                .await;
            assert_eq!(s, StatusCode::CREATED, "{b}");
            let done = app
                .wait_done(&format!("/api/v1/backups/{}/", b["id"]), token)
                .await;
            assert_eq!(done["status"], "failed", "{done}");
            done
        }
    };
    let hook_failed = run(7).await;
    let err = hook_failed["error"].as_str().unwrap();
    assert_eq!(
        err, "The pre-backup hook failed; the disks were not touched.",
        "{hook_failed}"
    );
    let disk_gone = run(8).await;
    let err = disk_gone["error"].as_str().unwrap();
    assert_eq!(err, "The server's disk could not be read.", "{disk_gone}");
    for body in [&hook_failed, &disk_gone] {
        let text = body.to_string();
        assert!(
            !text.contains(&host_dir) && !text.contains("Device busy") && !text.contains("/srv"),
            "{text}"
        );
    }
    // The operator's detail, kept on the job (never in the API).
    let detail = |job| {
        let cat = app.catalog.clone();
        async move {
            cat.job(JobId(job))
                .await
                .unwrap()
                .unwrap()
                .error_detail
                .unwrap_or_default()
        }
    };
    let d = detail(1).await;
    assert!(
        d.contains("Device busy") && d.contains("exit status: 4"),
        "{d}"
    );
    let d = detail(2).await;
    assert!(d.contains(&gone.to_string_lossy().into_owned()), "{d}");
    app.stop().await;
}
