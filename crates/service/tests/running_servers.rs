//! Servers that run while they are backed up: the runtime recorded with each
//! server decides where a consistent view of its disks comes from, and a
//! disk a running QEMU holds is never read torn.

mod common;

use common::TestApp;
use reqwest::StatusCode;
use serde_json::{json, Value};
use vpsbackup_catalog::{Catalog, Hooks, ServerId, ServerRuntime, ServerUpdate};

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
