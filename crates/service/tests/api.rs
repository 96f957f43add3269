//! The API contract, driven over real HTTP against a real service on port 0
//! with a fresh data dir, real SQLite and real disk images.

mod common;

use std::time::Duration;

use common::{same_bytes, send, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use vpsbackup_catalog::{Catalog, Hooks, TokenOwner, TokenRef};
use vpsbackup_service::auth::hash_token;
use vpsbackup_service::clock::rfc3339;
use vpsbackup_service::scheduler::window;

async fn completed_backup(app: &TestApp, token: &str, server: i64) -> Value {
    let (s, b) = app
        .post("/api/v1/backups/", token, json!({"server_id": server}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let done = app
        .wait_done(&format!("/api/v1/backups/{}/", b["id"]), token)
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    done
}

#[tokio::test]
async fn authentication_errors_follow_the_contract() {
    let app = TestApp::start().await;
    let (_acc, token) = app.account("acme").await;
    let url = app.url("/api/v1/backups/");

    for req in [
        app.client.get(&url),
        app.client.get(&url).header("Authorization", "Basic abc"),
        app.client.get(&url).header("Authorization", "Bearer"),
        app.client.get(&url).header("Authorization", "Bearer a b"),
    ] {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body,
            json!({"detail": "Authentication credentials were not provided."})
        );
    }
    let (s, b) = app.get("/api/v1/backups/", "vps_notarealtoken").await;
    assert_eq!(
        (s, b),
        (
            StatusCode::UNAUTHORIZED,
            json!({"detail": "Invalid token."})
        )
    );

    let (s, _) = app.get("/api/v1/backups/", &token).await;
    assert_eq!(s, StatusCode::OK);
    assert!(app
        .catalog
        .revoke_token(TokenRef::Hash(hash_token(&token)), TestApp::now())
        .await
        .unwrap());
    let (s, b) = app.get("/api/v1/backups/", &token).await;
    assert_eq!(
        (s, b),
        (
            StatusCode::UNAUTHORIZED,
            json!({"detail": "Invalid token."})
        )
    );
    // POST and DELETE are guarded too.
    let (s, _) = app
        .post("/api/v1/backups/", "x", json!({"server_id": 1}))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = app.delete("/api/v1/backups/1/", "x").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test]
async fn create_list_detail_delete_and_bad_input() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    app.server(12345, acc, Hooks::default()).await;

    // The seed's create, exactly.
    let (s, b) = app
        .post(
            "/api/v1/backups/",
            &token,
            json!({"server_id": 12345, "description": "Pre-deployment backup"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(
        b["server"],
        json!({"id": 12345, "name": "web-server-12345"})
    );
    assert_eq!(b["backup_type"], "manual");
    assert_eq!(b["status"], "in_progress");
    assert_eq!(b["size_mb"], Value::Null);
    assert_eq!(b["expires_at"], Value::Null);
    assert_eq!(b["description"], "Pre-deployment backup");
    assert_eq!(
        b["message"],
        "Backup is being created. This may take several minutes depending on server size."
    );
    let created_at = b["created_at"].as_str().unwrap();
    assert!(
        created_at.ends_with('Z') && created_at.len() == 20,
        "{created_at}"
    );
    let id = b["id"].as_i64().unwrap();

    let done = app
        .wait_done(&format!("/api/v1/backups/{id}/"), &token)
        .await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["progress"], 100);
    // 4 MiB of files (half compressible) plus ext4 metadata: a few MiB, not 16.
    let size = done["size_mb"].as_i64().unwrap();
    assert!((4..16).contains(&size), "size_mb {size}");
    assert!(done.get("message").is_none());

    // The path without its slash and the server-scoped create path.
    let (s, b) = app.get("/api/v1/backups", &token).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["count"], 1);
    let (s, b2) = app
        .post("/api/v1/servers/12345/backup/", &token, json!({}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b2}");
    assert_eq!(b2["description"], "");
    app.wait_done(&format!("/api/v1/backups/{}/", b2["id"]), &token)
        .await;

    // Field errors.
    let cases = [
        (json!({}), json!({"server_id": ["This field is required."]})),
        (
            json!({"server_id": "abc"}),
            json!({"server_id": ["A valid integer is required."]}),
        ),
        (
            json!({"server_id": 1.5}),
            json!({"server_id": ["A valid integer is required."]}),
        ),
        (
            json!({"server_id": null}),
            json!({"server_id": ["This field may not be null."]}),
        ),
        (
            json!({"server_id": 12345, "description": "x".repeat(256)}),
            json!({"description": ["Ensure this field has no more than 255 characters."]}),
        ),
        (
            json!({"server_id": 12345, "description": {"a": 1}}),
            json!({"description": ["Not a valid string."]}),
        ),
        (
            json!([1, 2]),
            json!({"non_field_errors": ["Invalid data. Expected a dictionary, but got list."]}),
        ),
    ];
    for (body, expected) in cases {
        let (s, b) = app.post("/api/v1/backups/", &token, body.clone()).await;
        assert_eq!((s, &b), (StatusCode::BAD_REQUEST, &expected), "{body}");
    }
    // A numeric string is an integer, as in DRF; unknown fields are ignored.
    let (s, _) = app
        .post(
            "/api/v1/backups/",
            &token,
            json!({"server_id": "999", "extra": true}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, b) = app
        .post("/api/v1/backups/", &token, json!({"server_id": 999}))
        .await;
    assert_eq!(
        (s, b),
        (
            StatusCode::NOT_FOUND,
            json!({"detail": "Server not found."})
        )
    );

    // Not JSON, wrong media type, too large, wrong method.
    let (s, b) = send(
        app.req(Method::POST, "/api/v1/backups/", &token)
            .body("{nope"),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .starts_with("JSON parse error - "),
        "{b}"
    );
    let (s, b) = send(
        app.client
            .post(app.url("/api/v1/backups/"))
            .header("Authorization", format!("Bearer {token}"))
            .header("Content-Type", "text/plain")
            .body("server_id=1"),
    )
    .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        b,
        json!({"detail": "Unsupported media type \"text/plain\" in request."})
    );
    let big = json!({"server_id": 12345, "description": "x".repeat(70_000)});
    let (s, b) = app.post("/api/v1/backups/", &token, big).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{b}");
    assert!(b["detail"].is_string());
    for (method, path) in [
        (Method::PUT, "/api/v1/backups/"),
        (Method::PATCH, "/api/v1/backups/1/"),
        (Method::GET, "/api/v1/servers/12345/restore/"),
        (Method::DELETE, "/api/v1/servers/"),
    ] {
        let (s, b) = send(app.req(method.clone(), path, &token)).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(
            b,
            json!({"detail": format!("Method \"{method}\" not allowed.")})
        );
    }
    let (s, b) = app.get("/api/v1/nothing-here/", &token).await;
    assert_eq!(
        (s, b),
        (StatusCode::NOT_FOUND, json!({"detail": "Not found."}))
    );

    // Detail and delete; unknown and malformed ids are 404.
    let (s, b) = app.get(&format!("/api/v1/backups/{id}/"), &token).await;
    assert_eq!((s, b["id"].as_i64()), (StatusCode::OK, Some(id)));
    for path in [
        "/api/v1/backups/999999/",
        "/api/v1/backups/abc/",
        "/api/v1/backups/0/",
    ] {
        let (s, b) = app.get(path, &token).await;
        assert_eq!(
            (s, b),
            (StatusCode::NOT_FOUND, json!({"detail": "Not found."})),
            "{path}"
        );
        let (s, _) = app.delete(path, &token).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
    let resp = app
        .req(Method::DELETE, &format!("/api/v1/backups/{id}/"), &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.bytes().await.unwrap().is_empty());
    let (s, _) = app.get(&format!("/api/v1/backups/{id}/"), &token).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app.delete(&format!("/api/v1/backups/{id}"), &token).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Its data is gone from the store too.
    let repo = vpsbackup_engine::Repository::open_local(&app.settings.store_path()).unwrap();
    let names: Vec<String> = repo
        .list_backups()
        .unwrap()
        .into_iter()
        .map(|b| b.backup_id)
        .collect();
    assert!(!names.contains(&format!("b{id}")), "{names:?}");
    assert!(names.contains(&format!("b{}", b2["id"])), "{names:?}");
    app.stop().await;
}

#[tokio::test]
async fn listing_filters_and_pages() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    app.server(1, acc, Hooks::default()).await;
    app.server(2, acc, Hooks::default()).await;
    // 120 completed rows straight into the catalog: 80 automatic of server 1,
    // 40 manual of server 2 (listing is what is tested here, not backups).
    app.catalog
        .execute_raw(&format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 120) \
             INSERT INTO backups (server_id, account_id, backup_type, status, description, created_at, size_mb, progress) \
             SELECT CASE WHEN i % 3 = 0 THEN 2 ELSE 1 END, {}, CASE WHEN i % 3 = 0 THEN 'manual' ELSE 'automatic' END, \
               'completed', 'd', 1700000000 + i, 10, 100 FROM n",
            acc.0
        ))
        .await
        .unwrap();

    let (s, b) = app.get("/api/v1/backups/", &token).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["count"], 120);
    assert_eq!(b["results"].as_array().unwrap().len(), 50);
    assert_eq!(b["previous"], Value::Null);
    let host = app.addr.to_string();
    assert_eq!(b["next"], format!("http://{host}/api/v1/backups/?page=2"));
    let ids: Vec<i64> = b["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first");

    let (_, p3) = app.get("/api/v1/backups/?page=3", &token).await;
    assert_eq!(p3["results"].as_array().unwrap().len(), 20);
    assert_eq!(p3["next"], Value::Null);
    assert_eq!(
        p3["previous"],
        format!("http://{host}/api/v1/backups/?page=2")
    );
    let (_, p2) = app.get("/api/v1/backups/?page=2", &token).await;
    assert_eq!(p2["previous"], format!("http://{host}/api/v1/backups/"));

    let (_, b) = app.get("/api/v1/backups/?server_id=2", &token).await;
    assert_eq!(b["count"], 40);
    assert!(b["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["server"]["id"] == 2 && r["backup_type"] == "manual"));
    let (_, b) = app
        .get(
            "/api/v1/backups/?backup_type=automatic&page_size=500",
            &token,
        )
        .await;
    assert_eq!(b["count"], 80);
    assert_eq!(b["results"].as_array().unwrap().len(), 80);
    let (_, b) = app
        .get("/api/v1/backups/?server_id=1&backup_type=manual", &token)
        .await;
    assert_eq!(b["count"], 0);
    let (_, b) = app
        .get("/api/v1/backups/?server_id=2&page_size=15&page=2", &token)
        .await;
    assert_eq!(
        b["next"],
        format!("http://{host}/api/v1/backups/?server_id=2&page_size=15&page=3")
    );
    // page_size is 1..=500 as the OpenAPI document says; anything else is a
    // field error, not a page of another size.
    for (bad, message) in [
        ("501", "Ensure this value is less than or equal to 500."),
        ("100000", "Ensure this value is less than or equal to 500."),
        ("0", "Ensure this value is greater than or equal to 1."),
        ("-3", "Ensure this value is greater than or equal to 1."),
        ("abc", "A valid integer is required."),
    ] {
        for list in ["backups", "servers"] {
            let (s, b) = app
                .get(&format!("/api/v1/{list}/?page_size={bad}"), &token)
                .await;
            assert_eq!(
                (s, b),
                (StatusCode::BAD_REQUEST, json!({"page_size": [message]})),
                "{list} page_size={bad}"
            );
        }
    }
    let (s, b) = app.get("/api/v1/backups/?page_size=", &token).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        b["results"].as_array().unwrap().len(),
        50,
        "empty: the default"
    );

    for bad in ["page=4", "page=0", "page=abc", "page=-1"] {
        let (s, b) = app.get(&format!("/api/v1/backups/?{bad}"), &token).await;
        assert_eq!(
            (s, b),
            (StatusCode::NOT_FOUND, json!({"detail": "Invalid page."})),
            "{bad}"
        );
    }
    let (s, b) = app.get("/api/v1/backups/?server_id=abc", &token).await;
    assert_eq!(
        (s, b),
        (
            StatusCode::BAD_REQUEST,
            json!({"server_id": ["A valid integer is required."]})
        )
    );
    let (s, b) = app.get("/api/v1/backups/?backup_type=weekly", &token).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        b["backup_type"][0].as_str().unwrap().contains("weekly"),
        "{b}"
    );
    // A GET that carries Content-Type: application/json and no body (the seed's examples).
    let (s, _) = app.get("/api/v1/backups/?server_id=12345", &token).await;
    assert_eq!(s, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn servers_account_and_openapi() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    app.server(12345, acc, Hooks::default()).await;
    let (s, b) = app.get("/api/v1/servers/", &token).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["count"], 1);
    let srv = &b["results"][0];
    assert_eq!(srv["id"], 12345);
    assert_eq!(srv["status"], "active");
    assert_eq!(
        srv["plan"],
        json!({"id": srv["plan"]["id"], "name": "standard", "retention_days": 14})
    );
    assert_eq!(srv["manual_backups_left"], 10);
    let (s, one) = app.get("/api/v1/servers/12345", &token).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(one["hostname"], "s12345.example.com");
    assert_eq!(
        one["backup_window"],
        json!({"start": "03:00", "duration_minutes": 120})
    );
    // The scheduler is off in these tests: nothing is planned.
    assert_eq!(one["next_backup_at"], Value::Null);
    let (s, b) = app.get("/api/v1/servers/777/", &token).await;
    assert_eq!(
        (s, b),
        (
            StatusCode::NOT_FOUND,
            json!({"detail": "Server not found."})
        )
    );

    let (s, me) = app.get("/api/v1/account/me/", &token).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(me["name"], "acme");
    assert_eq!(me["token_name"], "test");
    assert_eq!(me["is_admin"], false);

    let doc: Value = app
        .client
        .get(app.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/v1/backups/",
        "/api/v1/backups/{backup_id}/",
        "/api/v1/servers/",
        "/api/v1/servers/{server_id}/",
        "/api/v1/servers/{server_id}/backup/",
        "/api/v1/servers/{server_id}/restore/",
        "/api/v1/restores/{restore_id}/",
        "/api/v1/account/me/",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    let docs = app
        .client
        .get(app.url("/api/v1/docs/"))
        .send()
        .await
        .unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.unwrap().contains("openapi.json"));
    app.stop().await;
}

#[tokio::test]
async fn tenants_see_nothing_of_each_other() {
    let app = TestApp::start().await;
    let (a, token_a) = app.account("alpha").await;
    let (_b, token_b) = app.account("beta").await;
    app.server(100, a, Hooks::default()).await;
    let backup = completed_backup(&app, &token_a, 100).await;
    let id = backup["id"].as_i64().unwrap();

    let (_, list) = app.get("/api/v1/backups/", &token_b).await;
    assert_eq!(list["count"], 0);
    let (_, list) = app.get("/api/v1/backups/?server_id=100", &token_b).await;
    assert_eq!(list["count"], 0);
    let (_, servers) = app.get("/api/v1/servers/", &token_b).await;
    assert_eq!(servers["count"], 0);
    let (s, _) = app.get(&format!("/api/v1/backups/{id}/"), &token_b).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, b) = app.get("/api/v1/servers/100/", &token_b).await;
    assert_eq!(
        (s, b),
        (
            StatusCode::NOT_FOUND,
            json!({"detail": "Server not found."})
        )
    );
    let (s, b) = app
        .post("/api/v1/backups/", &token_b, json!({"server_id": 100}))
        .await;
    assert_eq!(
        (s, b),
        (
            StatusCode::NOT_FOUND,
            json!({"detail": "Server not found."})
        )
    );
    let (s, _) = app
        .post("/api/v1/servers/100/backup/", &token_b, json!({}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, b) = app
        .delete(&format!("/api/v1/backups/{id}/"), &token_b)
        .await;
    assert_eq!(
        (s, b),
        (StatusCode::NOT_FOUND, json!({"detail": "Not found."}))
    );
    let (s, _) = app
        .post(
            "/api/v1/servers/100/restore/",
            &token_b,
            json!({"backup_id": id}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Beta's own server cannot be restored from alpha's backup either.
    let (bid, _) = (
        app.catalog
            .account_by_name("beta")
            .await
            .unwrap()
            .unwrap()
            .id,
        (),
    );
    app.server(200, bid, Hooks::default()).await;
    let (s, b) = app
        .post(
            "/api/v1/servers/200/restore/",
            &token_b,
            json!({"backup_id": id}),
        )
        .await;
    assert_eq!(
        (s, b),
        (
            StatusCode::NOT_FOUND,
            json!({"detail": "Backup not found."})
        )
    );

    // Alpha still has everything; an admin token sees both accounts.
    let (s, _) = app.get(&format!("/api/v1/backups/{id}/"), &token_a).await;
    assert_eq!(s, StatusCode::OK);
    let admin = app.token(TokenOwner::Admin).await;
    let (_, servers) = app.get("/api/v1/servers/", &admin).await;
    assert_eq!(servers["count"], 2);
    let (_, me) = app.get("/api/v1/account/me/", &admin).await;
    assert_eq!(me["is_admin"], true);
    app.stop().await;
}

#[tokio::test]
async fn manual_limit_holds_under_twenty_concurrent_posts() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    app.server(12345, acc, Hooks::default()).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let req = app
            .req(Method::POST, "/api/v1/backups/", &token)
            .body(json!({"server_id": 12345, "description": format!("n{i}")}).to_string());
        tasks.push(tokio::spawn(send(req)));
    }
    let mut created = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let (s, b) = t.await.unwrap();
        match s {
            StatusCode::CREATED => created.push(b["id"].as_i64().unwrap()),
            StatusCode::BAD_REQUEST => {
                assert!(
                    b["detail"].as_str().unwrap().contains("10 manual backups"),
                    "{b}"
                );
                refused += 1;
            }
            other => panic!("unexpected {other}: {b}"),
        }
    }
    assert_eq!((created.len(), refused), (10, 10));
    let (_, srv) = app.get("/api/v1/servers/12345/", &token).await;
    assert_eq!(srv["manual_backups_left"], 0);
    for id in &created {
        let done = app
            .wait_done(&format!("/api/v1/backups/{id}/"), &token)
            .await;
        assert_eq!(done["status"], "completed");
    }
    // Completed ones still count; deleting one frees a slot.
    let (s, _) = app
        .post("/api/v1/backups/", &token, json!({"server_id": 12345}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = app
        .delete(&format!("/api/v1/backups/{}/", created[0]), &token)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = app
        .post("/api/v1/backups/", &token, json!({"server_id": 12345}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    app.stop().await;
}

#[tokio::test]
async fn restore_brings_the_disk_back_byte_for_byte() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    let disk = app.server(12345, acc, Hooks::default()).await;
    let snapshot = disk.with_extension("at-backup");
    std::fs::copy(&disk, &snapshot).unwrap();
    let backup = completed_backup(&app, &token, 12345).await;
    let id = backup["id"].as_i64().unwrap();

    // Change the disk: overwrite a few regions, including in the middle of files.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        for (i, off) in [4096u64, 3 << 20, 7 << 20, (16 << 20) - 8192]
            .iter()
            .enumerate()
        {
            f.write_all_at(&vec![0xA5 ^ i as u8; 8192], *off).unwrap();
        }
        f.sync_all().unwrap();
    }
    assert!(!same_bytes(&disk, &snapshot));

    // Bad restore requests first.
    let (s, b) = app
        .post("/api/v1/servers/12345/restore/", &token, json!({}))
        .await;
    assert_eq!(
        (s, b),
        (
            StatusCode::BAD_REQUEST,
            json!({"backup_id": ["This field is required."]})
        )
    );
    let (s, b) = app
        .post(
            "/api/v1/servers/12345/restore/",
            &token,
            json!({"backup_id": "x"}),
        )
        .await;
    assert_eq!(
        (s, b),
        (
            StatusCode::BAD_REQUEST,
            json!({"backup_id": ["A valid integer is required."]})
        )
    );
    let (s, b) = app
        .post(
            "/api/v1/servers/12345/restore/",
            &token,
            json!({"backup_id": 99999}),
        )
        .await;
    assert_eq!(
        (s, b),
        (
            StatusCode::NOT_FOUND,
            json!({"detail": "Backup not found."})
        )
    );
    let (s, b) = app
        .post(
            "/api/v1/servers/4242/restore/",
            &token,
            json!({"backup_id": id}),
        )
        .await;
    assert_eq!(
        (s, b),
        (
            StatusCode::NOT_FOUND,
            json!({"detail": "Server not found."})
        )
    );
    app.server(777, acc, Hooks::default()).await;
    let (s, b) = app
        .post(
            "/api/v1/servers/777/restore/",
            &token,
            json!({"backup_id": id}),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "a backup of another server: {b}"
    );

    let (s, r) = app
        .post(
            "/api/v1/servers/12345/restore/",
            &token,
            json!({"backup_id": id}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{r}");
    assert_eq!(r["status"], "in_progress");
    assert_eq!(r["backup_id"], id);
    assert_eq!(
        r["server"],
        json!({"id": 12345, "name": "web-server-12345"})
    );
    assert_eq!(r["completed_at"], Value::Null);
    assert_eq!(r["error"], Value::Null);
    assert!(r["message"].is_string());
    let done = app
        .wait_done(&format!("/api/v1/restores/{}/", r["id"]), &token)
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["progress"], 100);
    assert!(done["completed_at"].is_string());
    assert!(
        same_bytes(&disk, &snapshot),
        "restored disk differs from the backup-time disk"
    );
    let (s, _) = app
        .get(&format!("/api/v1/restores/{}/", r["id"]), "vps_bad")
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = app.get("/api/v1/restores/424242/", &token).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    app.stop().await;
}

#[tokio::test]
async fn delete_during_a_backup_cancels_it_and_busy_servers_refuse_restores() {
    // 1 MB/s of reads makes a 16 MiB disk's backup last a few seconds.
    let app = TestApp::start_with(|s| s.read_limit_mb_per_s = Some(1)).await;
    let (acc, token) = app.account("acme").await;
    app.server(12345, acc, Hooks::default()).await;
    let (s, b) = app
        .post("/api/v1/backups/", &token, json!({"server_id": 12345}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let id = b["id"].as_i64().unwrap();

    // Wait until it is really running.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, srv) = app.get("/api/v1/servers/12345/", &token).await;
        let (_, bk) = app.get(&format!("/api/v1/backups/{id}/"), &token).await;
        if srv["status"] == "backing_up" && bk["progress"].as_i64().unwrap() > 0 {
            break;
        }
        assert_eq!(
            bk["status"], "in_progress",
            "the backup ended before the test could act: {bk}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "backup never showed progress"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A restore while the server is busy: 409 (there is no completed backup
    // of it yet, so make one of the catalog's rows completed to restore from).
    app.catalog
        .execute_raw(&format!(
            "INSERT INTO backups (server_id, account_id, backup_type, status, created_at, size_mb, progress, engine_backup_id) \
             VALUES (12345, {}, 'manual', 'completed', 1700000000, 1, 100, 'b-none')",
            acc.0
        ))
        .await
        .unwrap();
    let (_, list) = app.get("/api/v1/backups/?server_id=12345", &token).await;
    let other = list["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["status"] == "completed")
        .unwrap()["id"]
        .clone();
    let (s, b) = app
        .post(
            "/api/v1/servers/12345/restore/",
            &token,
            json!({"backup_id": other}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert!(b["detail"].is_string());

    let (s, _) = app.delete(&format!("/api/v1/backups/{id}/"), &token).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = app.get(&format!("/api/v1/backups/{id}/"), &token).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The job stops, the server is free again, and no backup data remains.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, srv) = app.get("/api/v1/servers/12345/", &token).await;
        if srv["status"] == "active" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cancelled job kept running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let repo = vpsbackup_engine::Repository::open_local(&app.settings.store_path()).unwrap();
    assert!(repo
        .list_backups()
        .unwrap()
        .iter()
        .all(|b| b.backup_id != format!("b{id}")));
    app.stop().await;
}

#[tokio::test]
async fn deleting_a_backup_a_restore_reads_is_refused() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    let hooks = Hooks {
        // Keeps the restore running long enough to try the delete.
        pre_restore: Some("sleep 2".into()),
        ..Hooks::default()
    };
    app.server(12345, acc, hooks).await;
    let backup = completed_backup(&app, &token, 12345).await;
    let id = backup["id"].as_i64().unwrap();
    let (s, r) = app
        .post(
            "/api/v1/servers/12345/restore/",
            &token,
            json!({"backup_id": id}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, b) = app.delete(&format!("/api/v1/backups/{id}/"), &token).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    let (s, _) = app
        .post(
            "/api/v1/servers/12345/restore/",
            &token,
            json!({"backup_id": id}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "a second restore while one runs");
    let done = app
        .wait_done(&format!("/api/v1/restores/{}/", r["id"]), &token)
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    let (s, _) = app.delete(&format!("/api/v1/backups/{id}/"), &token).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    app.stop().await;
}

#[tokio::test]
async fn hooks_run_around_jobs_and_a_failing_pre_hook_fails_the_job() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    let marker = app.dir.path().join("thawed");
    let hooks = Hooks {
        pre_backup: Some("echo cannot freeze {name} >&2; exit 4".into()),
        post_backup: Some(format!("echo {{server_id}} > {}", marker.display())),
        ..Hooks::default()
    };
    app.server(12345, acc, hooks).await;
    let (s, b) = app
        .post("/api/v1/backups/", &token, json!({"server_id": 12345}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let done = app
        .wait_done(&format!("/api/v1/backups/{}/", b["id"]), &token)
        .await;
    assert_eq!(done["status"], "failed");
    let err = done["error"].as_str().unwrap();
    // The customer reads a plain reason; the hook's stderr is the operator's.
    assert_eq!(
        err, "The pre-backup hook failed; the disks were not touched.",
        "{err}"
    );
    assert_eq!(done["size_mb"], Value::Null);
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap().trim(),
        "12345",
        "post hook ran"
    );
    // A failed backup does not count against the limit.
    let (_, srv) = app.get("/api/v1/servers/12345/", &token).await;
    assert_eq!(srv["manual_backups_used"], 0);
    app.stop().await;
}

#[tokio::test]
async fn interrupted_jobs_are_resumed_or_failed_after_a_restart() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    app.server(12345, acc, Hooks::default()).await;
    app.server(23456, acc, Hooks::default()).await;
    let (dir, settings) = app.stop().await;

    // What a process killed mid-job leaves behind: backups in progress whose
    // jobs are 'running' under a dead worker's claim. One still has attempts
    // left, one has used them all.
    let cat = vpsbackup_service::open_catalog(&settings.data_dir, 1)
        .await
        .unwrap();
    cat.execute_raw(&format!(
        "INSERT INTO backups (id, server_id, account_id, backup_type, status, description, created_at, progress, engine_backup_id) \
           VALUES (41, 12345, {a}, 'manual', 'in_progress', 'interrupted', 1700000000, 37, 'b41'), \
                  (42, 23456, {a}, 'manual', 'in_progress', 'hopeless', 1700000000, 80, 'b42'); \
         INSERT INTO jobs (kind, server_id, backup_id, state, attempts, max_attempts, claimed_by, heartbeat_at, run_after, created_at) \
           VALUES ('backup', 12345, 41, 'running', 1, 3, 'pid1-dead-w0', 1700000000, 1700000000, 1700000000), \
                  ('backup', 23456, 42, 'running', 3, 3, 'pid1-dead-w1', 1700000000, 1700000000, 1700000000);",
        a = acc.0
    ))
    .await
    .unwrap();
    cat.close().await;

    let app = TestApp::start_in(dir, settings).await;
    let resumed = app.wait_done("/api/v1/backups/41/", &token).await;
    assert_eq!(resumed["status"], "completed", "{resumed}");
    assert!(resumed["size_mb"].as_i64().unwrap() > 0);
    let failed = app.wait_done("/api/v1/backups/42/", &token).await;
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("service stopped"),
        "{failed}"
    );
    // The resumed backup is real: it restores.
    let (s, r) = app
        .post(
            "/api/v1/servers/12345/restore/",
            &token,
            json!({"backup_id": 41}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{r}");
    let done = app
        .wait_done(&format!("/api/v1/restores/{}/", r["id"]), &token)
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    app.stop().await;
}

#[tokio::test]
async fn a_graceful_stop_hands_running_jobs_back_and_the_next_start_finishes_them() {
    let app = TestApp::start_with(|s| s.read_limit_mb_per_s = Some(1)).await;
    let (acc, token) = app.account("acme").await;
    app.server(12345, acc, Hooks::default()).await;
    let (_, b) = app
        .post("/api/v1/backups/", &token, json!({"server_id": 12345}))
        .await;
    let id = b["id"].as_i64().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, bk) = app.get(&format!("/api/v1/backups/{id}/"), &token).await;
        if bk["progress"].as_i64().unwrap() > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no progress: {bk}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (dir, mut settings) = app.stop().await;

    let cat = vpsbackup_service::open_catalog(&settings.data_dir, 1)
        .await
        .unwrap();
    let job = cat.job(vpsbackup_catalog::JobId(1)).await.unwrap().unwrap();
    assert_eq!(job.state, vpsbackup_catalog::JobState::Queued);
    assert_eq!(job.attempts, 0, "a shutdown does not use up an attempt");
    let row = cat
        .backup(
            vpsbackup_catalog::BackupId(id),
            vpsbackup_catalog::Scope::All,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, vpsbackup_catalog::WorkStatus::InProgress);
    cat.close().await;

    settings.read_limit_mb_per_s = None;
    let app = TestApp::start_in(dir, settings).await;
    let done = app
        .wait_done(&format!("/api/v1/backups/{id}/"), &token)
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_show_when_their_next_automatic_backup_is_planned() {
    let app = TestApp::start_with(|s| {
        s.schedule.enabled = true;
        s.schedule.tick_secs = 1;
    })
    .await;
    let (acc, token) = app.account("acme").await;
    app.server(12345, acc, Hooks::default()).await;
    // A new server's first automatic backup is due at once (one catch-up);
    // wait until it is taken, then tomorrow's slot is the next one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (_, b) = app
            .get("/api/v1/backups/?backup_type=automatic", &token)
            .await;
        if b["count"] == 1 && b["results"][0]["status"] == "completed" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no automatic backup: {b}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let (s, one) = app.get("/api/v1/servers/12345/", &token).await;
    assert_eq!(s, StatusCode::OK);
    // The plan's window starts at 03:00 UTC and lasts 120 min; each server
    // starts at its own stable offset in the first half. The next start is
    // the first such time after now (today's, or tomorrow's).
    let now = TestApp::now();
    let today = now.replace_time(time::Time::MIDNIGHT);
    let start = |day: time::OffsetDateTime| {
        day + time::Duration::minutes(180) + window::spread_offset(12345, 120)
    };
    let expected = [start(today), start(today + time::Duration::days(1))]
        .into_iter()
        .find(|t| *t > now)
        .unwrap();
    assert_eq!(one["next_backup_at"], rfc3339(expected), "now is {now}");
    // The list says the same.
    let (_, list) = app.get("/api/v1/servers/", &token).await;
    assert_eq!(list["results"][0]["next_backup_at"], one["next_backup_at"]);

    // Automatic backups off for the server: nothing planned.
    app.catalog
        .update_server(
            vpsbackup_catalog::ServerId(12345),
            vpsbackup_catalog::ServerUpdate {
                auto_backup_enabled: Some(false),
                ..Default::default()
            },
            TestApp::now(),
        )
        .await
        .unwrap();
    let (_, one) = app.get("/api/v1/servers/12345/", &token).await;
    assert_eq!(one["next_backup_at"], Value::Null);
}

/// The OpenAPI document declares what the server does (issue 8): limits,
/// enums, status codes, headers, bodies and links. Where a declaration is a
/// limit, the server is asked at the limit and past it.
#[tokio::test]
async fn openapi_document_declares_what_the_server_does() {
    let app = TestApp::start().await;
    let (acc, token) = app.account("acme").await;
    app.server(12345, acc, Hooks::default()).await;
    let (status, doc) = app.get("/api/v1/openapi.json", &token).await;
    assert_eq!(status, StatusCode::OK);
    let schemas = &doc["components"]["schemas"];
    let resolve = |v: &Value| -> Value {
        match v["$ref"].as_str() {
            Some(r) => schemas[r.trim_start_matches("#/components/schemas/")].clone(),
            None => v.clone(),
        }
    };
    let param = |path: &str, method: &str, name: &str| -> Value {
        doc["paths"][path][method]["parameters"]
            .as_array()
            .unwrap_or_else(|| panic!("{method} {path} has no parameters"))
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{method} {path}: no parameter {name}"))
            .clone()
    };

    // Every operation: a unique operationId, the answers every operation
    // can give, and the rate-limit headers on each answer.
    let mut ids = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            ids.push(op["operationId"].as_str().unwrap().to_owned());
            let answers = op["responses"].as_object().unwrap();
            for code in ["401", "429", "500"] {
                assert!(answers.contains_key(code), "{method} {path}: no {code}");
            }
            assert_eq!(
                op["responses"]["401"]["headers"]["WWW-Authenticate"]["schema"]["enum"],
                json!(["Bearer"])
            );
            assert!(op["responses"]["429"]["headers"]["Retry-After"].is_object());
            for (code, answer) in answers {
                for h in ["RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"] {
                    assert!(
                        answer["headers"][h].is_object(),
                        "{method} {path} {code}: no {h}"
                    );
                }
            }
            if method == "post" {
                for code in ["400", "409", "413", "415", "422"] {
                    assert!(answers.contains_key(code), "{method} {path}: no {code}");
                }
                let key = param(path, "post", "Idempotency-Key");
                assert_eq!(key["in"], "header");
                assert_eq!(key["schema"]["type"], "string", "a key is never null");
                assert_eq!(key["schema"]["maxLength"], 255);
                let created = answers.iter().find(|(c, _)| c.starts_with('2')).unwrap().1;
                assert_eq!(
                    created["headers"]["Idempotent-Replayed"]["schema"]["enum"],
                    json!(["true"])
                );
            }
        }
    }
    let count = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!((count, ids.len()), (10, 10), "operationIds: {ids:?}");

    // Lists: page_size is 1..=500, and the server holds to it; a page past
    // the end is a documented 404.
    for list in ["backups", "servers"] {
        let path = format!("/api/v1/{list}/");
        let size = param(&path, "get", "page_size")["schema"]["anyOf"][0].clone();
        assert_eq!(
            (size["minimum"].as_i64(), size["maximum"].as_i64()),
            (Some(1), Some(500))
        );
        for (n, want) in [
            (0, StatusCode::BAD_REQUEST),
            (1, StatusCode::OK),
            (500, StatusCode::OK),
            (501, StatusCode::BAD_REQUEST),
        ] {
            let (s, _) = app.get(&format!("{path}?page_size={n}"), &token).await;
            assert_eq!(s, want, "{list} page_size={n}");
        }
        let answers = &doc["paths"][path.as_str()]["get"]["responses"];
        assert!(
            answers["400"].is_object() && answers["404"].is_object(),
            "{list}"
        );
        let (s, b) = app.get(&format!("{path}?page=2"), &token).await;
        assert_eq!(
            (s, b),
            (StatusCode::NOT_FOUND, json!({"detail": "Invalid page."}))
        );
    }

    // A list's query parameter given empty counts as not given (DRF's way):
    // each schema allows "" besides its values.
    for (list, name) in [
        ("backups", "server_id"),
        ("backups", "backup_type"),
        ("backups", "page"),
        ("servers", "page_size"),
    ] {
        let schema = &param(&format!("/api/v1/{list}/"), "get", name)["schema"];
        assert_eq!(
            schema["anyOf"][1],
            json!({"type": "string", "maxLength": 0}),
            "{list} {name}"
        );
        let (s, _) = app.get(&format!("/api/v1/{list}/?{name}="), &token).await;
        assert_eq!(s, StatusCode::OK, "{list} {name}=");
    }

    // backup_type is an enum of exactly what the server accepts.
    let kinds = resolve(&param("/api/v1/backups/", "get", "backup_type")["schema"]["anyOf"][0]);
    assert_eq!(kinds["enum"], json!(["manual", "automatic"]));
    for kind in kinds["enum"].as_array().unwrap() {
        let (s, _) = app
            .get(
                &format!("/api/v1/backups/?backup_type={}", kind.as_str().unwrap()),
                &token,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{kind}");
    }
    let (s, _) = app.get("/api/v1/backups/?backup_type=weekly", &token).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Bodies are objects (a JSON null is refused, and the schema does not
    // allow it); unknown fields are allowed, as the server ignores them.
    for (path, name, required) in [
        ("/api/v1/backups/", "CreateBackup", true),
        ("/api/v1/servers/{server_id}/backup/", "ServerBackup", false),
        ("/api/v1/servers/{server_id}/restore/", "Restore", true),
    ] {
        let body = &doc["paths"][path]["post"]["requestBody"];
        assert_eq!(
            body["required"].as_bool().unwrap_or(false),
            required,
            "{path}"
        );
        let schema = &body["content"]["application/json"]["schema"];
        assert_eq!(
            schema["$ref"],
            format!("#/components/schemas/{name}"),
            "{path}"
        );
        assert_eq!(schemas[name]["type"], "object");
        assert!(schemas[name]
            .get("additionalProperties")
            .is_none_or(|a| a == &json!(true)));
        let real = path.replace("{server_id}", "12345");
        let (s, b) = send(app.req(Method::POST, &real, &token).body("null")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {b}");
    }
    assert_eq!(schemas["CreateBackup"]["required"], json!(["server_id"]));
    let description = &schemas["CreateBackup"]["properties"]["description"];
    assert_eq!(description["anyOf"][0]["maxLength"], 255);
    let (s, b) = app
        .post(
            "/api/v1/backups/",
            &token,
            json!({"server_id": 12345, "description": "x".repeat(256), "extra": 1}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(b["description"].is_array(), "{b}");

    // The views: enums, and the fields that are always there even when null.
    let backup = &schemas["BackupView"];
    assert_eq!(
        resolve(&backup["properties"]["backup_type"])["enum"],
        json!(["manual", "automatic"])
    );
    assert_eq!(
        resolve(&backup["properties"]["status"])["enum"],
        json!(["in_progress", "completed", "failed"])
    );
    assert_eq!(
        resolve(&schemas["ServerView"]["properties"]["status"])["enum"],
        json!(["active", "backing_up", "restoring"])
    );
    let required = backup["required"].as_array().unwrap();
    for field in [
        "size_mb",
        "expires_at",
        "error",
        "completed_at",
        "verified_at",
        "verify_error",
    ] {
        assert!(required.contains(&json!(field)), "{field} is always sent");
    }
    assert!(
        !required.contains(&json!("message")),
        "message only on a create"
    );
    assert_eq!(backup["properties"]["message"]["type"], "string");

    // Links name real operations, in the OpenAPI spelling.
    let links =
        &doc["paths"]["/api/v1/servers/{server_id}/restore/"]["post"]["responses"]["202"]["links"];
    assert_eq!(links["GetRestore"]["operationId"], "restores_detail");
    assert_eq!(
        links["GetRestore"]["parameters"]["restore_id"],
        "$response.body#/id"
    );
    app.stop().await;
}
