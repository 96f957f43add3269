//! Rate limits and idempotency keys, over real HTTP against the real
//! service on port 0.

mod common;

use std::time::Duration;

use common::{send, TestApp};
use reqwest::{Method, Response, StatusCode};
use serde_json::{json, Value};
use vpsbackup_catalog::{Catalog, Hooks, IdempotencyClaim, IdempotentRequest, TokenOwner};
use vpsbackup_service::api::idempotency::fingerprint;

fn header(resp: &Response, name: &str) -> Option<u64> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().parse().unwrap())
}

/// Status, the three RateLimit headers (limit, remaining, reset), Retry-After, body.
async fn limited(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, Option<(u64, u64, u64)>, Option<u64>, Value) {
    let mut req = app.client.request(method.clone(), app.url(path));
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    if method == Method::POST {
        req = req
            .header("Content-Type", "application/json")
            .body(json!({"server_id": 7}).to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let limits = match (
        header(&resp, "ratelimit-limit"),
        header(&resp, "ratelimit-remaining"),
        header(&resp, "ratelimit-reset"),
    ) {
        (Some(l), Some(r), Some(s)) => Some((l, r, s)),
        (None, None, None) => None,
        other => panic!("some RateLimit headers only: {other:?}"),
    };
    let retry = header(&resp, "retry-after");
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, limits, retry, body)
}

#[tokio::test]
async fn rate_limits_throttle_one_token_and_recover_after_retry_after() {
    let app = TestApp::start_with(|s| {
        s.rate_limit.read_per_second = 1;
        s.rate_limit.read_burst = 3;
        s.rate_limit.write_per_second = 1;
        s.rate_limit.write_burst = 2;
    })
    .await;
    let (alice_id, alice) = app.account("alice").await;
    let (_, bob) = app.account("bob").await;
    let admin = app.token(TokenOwner::Admin).await;
    app.server(7, alice_id, Hooks::default()).await;
    let list = "/api/v1/backups/";

    // Three reads pass, counting down; the fourth is refused in DRF's words.
    for expect_remaining in [2, 1, 0] {
        let (status, limits, retry, _) = limited(&app, Method::GET, list, Some(&alice)).await;
        assert_eq!(status, StatusCode::OK);
        let (limit, remaining, reset) = limits.expect("RateLimit headers on a 200");
        assert_eq!((limit, remaining), (3, expect_remaining));
        // Full again after the missing requests refill at 1/s.
        assert!(
            (limit - remaining - 1..=limit - remaining).contains(&reset),
            "reset {reset} with {remaining} of {limit} left"
        );
        assert_eq!(retry, None);
    }
    let (status, limits, retry, body) = limited(&app, Method::GET, list, Some(&alice)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let (limit, remaining, reset) = limits.expect("RateLimit headers on a 429");
    assert_eq!((limit, remaining), (3, 0));
    assert!((2..=3).contains(&reset), "reset {reset}");
    assert_eq!(retry, Some(1));
    assert_eq!(
        body,
        json!({"detail": "Request was throttled. Expected available in 1 second."})
    );

    // Bob's token and alice's writes have buckets of their own.
    let (status, limits, _, _) = limited(&app, Method::GET, list, Some(&bob)).await;
    assert_eq!((status, limits.map(|l| l.1)), (StatusCode::OK, Some(2)));
    let (status, limits, _, body) = limited(&app, Method::POST, list, Some(&alice)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(limits.map(|l| (l.0, l.1)), Some((2, 1)));
    // Admin tokens are exempt by default: no headers, never throttled.
    for _ in 0..6 {
        let (status, limits, _, _) = limited(&app, Method::GET, list, Some(&admin)).await;
        assert_eq!((status, limits), (StatusCode::OK, None));
    }
    // Without a valid token the peer address is limited, and still told 401 first.
    let mut saw_429 = false;
    for _ in 0..5 {
        let (status, limits, _, _) = limited(&app, Method::GET, list, Some("vps_nope")).await;
        assert!(limits.is_some(), "RateLimit headers on {status}");
        match status {
            StatusCode::UNAUTHORIZED => assert!(!saw_429, "401 after a 429"),
            StatusCode::TOO_MANY_REQUESTS => saw_429 = true,
            other => panic!("{other}"),
        }
    }
    assert!(saw_429, "invalid tokens are throttled per peer");

    // Honour Retry-After: then alice passes again.
    tokio::time::sleep(Duration::from_secs(retry.unwrap())).await;
    let (status, limits, _, _) = limited(&app, Method::GET, list, Some(&alice)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(limits.map(|l| l.0), Some(3));
    app.stop().await;
}

#[tokio::test]
async fn rate_limits_can_be_turned_off_and_both_features_are_documented() {
    let app = TestApp::start_with(|s| {
        s.rate_limit.enabled = false;
        s.rate_limit.read_burst = 1;
    })
    .await;
    let (_, alice) = app.account("alice").await;
    for _ in 0..3 {
        let (status, limits, _, _) =
            limited(&app, Method::GET, "/api/v1/backups/", Some(&alice)).await;
        assert_eq!((status, limits), (StatusCode::OK, None));
    }
    // Both features are in the OpenAPI document.
    let (status, doc) = app.get("/api/v1/openapi.json", &alice).await;
    assert_eq!(status, StatusCode::OK);
    let create = &doc["paths"]["/api/v1/backups/"]["post"];
    assert!(create["responses"]["429"]["headers"]["Retry-After"].is_object());
    assert!(create["responses"]["201"]["headers"]["RateLimit-Remaining"].is_object());
    assert!(create["responses"]["422"].is_object());
    for path in ["/api/v1/backups/", "/api/v1/servers/{server_id}/restore/"] {
        let params = doc["paths"][path]["post"]["parameters"].as_array().unwrap();
        assert!(
            params
                .iter()
                .any(|p| p["name"] == "Idempotency-Key" && p["in"] == "header"),
            "{path}: {params:?}"
        );
    }
    app.stop().await;
}

/// POST with an Idempotency-Key; returns status, body and whether it was replayed.
async fn keyed(
    app: &TestApp,
    path: &str,
    token: &str,
    key: &str,
    body: &str,
) -> (StatusCode, Value, bool) {
    let resp = app
        .req(Method::POST, path, token)
        .header("Idempotency-Key", key)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let replayed = resp
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    (status, resp.json().await.unwrap(), replayed)
}

async fn backup_count(app: &TestApp, token: &str, server: i64) -> u64 {
    let (status, page) = app
        .get(&format!("/api/v1/backups/?server_id={server}"), token)
        .await;
    assert_eq!(status, StatusCode::OK);
    page["count"].as_u64().unwrap()
}

#[tokio::test]
async fn a_retried_create_makes_one_backup_and_one_restore() {
    let app = TestApp::start().await;
    let (alice_id, alice) = app.account("alice").await;
    let (bob_id, bob) = app.account("bob").await;
    app.server(21, alice_id, Hooks::default()).await;
    app.server(22, bob_id, Hooks::default()).await;
    let create = "/api/v1/backups/";
    let body = r#"{"server_id": 21, "description": "before upgrade"}"#;

    let (status, first, replayed) = keyed(&app, create, &alice, "upgrade-1", body).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert!(!replayed);
    // The same JSON, laid out differently, is the same request.
    let same = r#"{ "description":"before upgrade","server_id":21 }"#;
    let (status, again, replayed) = keyed(&app, create, &alice, "upgrade-1", same).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed, "a replay says so");
    assert_eq!(again, first, "the stored answer, same id");
    assert_eq!(backup_count(&app, &alice, 21).await, 1);

    // The key with another body, or on another route: refused, nothing made.
    let other = r#"{"server_id": 21, "description": "something else"}"#;
    let (status, refused, _) = keyed(&app, create, &alice, "upgrade-1", other).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .contains("already used for a different request"),
        "{refused}"
    );
    let (status, _, _) = keyed(
        &app,
        "/api/v1/servers/21/backup/",
        &alice,
        "upgrade-1",
        r#"{"description": "before upgrade"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(backup_count(&app, &alice, 21).await, 1);

    // Bob's "upgrade-1" is his own key: it runs, and shows nothing of alice's.
    let (status, bobs, replayed) = keyed(
        &app,
        create,
        &bob,
        "upgrade-1",
        r#"{"server_id": 22, "description": "before upgrade"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{bobs}");
    assert!(!replayed);
    assert_ne!(bobs["id"], first["id"]);
    assert_eq!(backup_count(&app, &bob, 22).await, 1);

    // A failed request is not stored: the key stays free for the fixed one.
    let (status, _, _) = keyed(&app, create, &alice, "fix-me", r#"{"server_id": "x"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, replayed) =
        keyed(&app, "/api/v1/servers/21/backup/", &alice, "fix-me", "{}").await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    assert_eq!(backup_count(&app, &alice, 21).await, 2);

    // Bad keys.
    for bad in [String::new(), "k".repeat(256)] {
        let (status, detail, _) = keyed(&app, create, &alice, &bad, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{detail}");
        assert!(detail["detail"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key"));
    }
    let (status, _, _) = keyed(&app, create, &alice, &"k".repeat(255), body).await;
    assert_eq!(status, StatusCode::CREATED);
    // Unauthenticated: 401 before the key is looked at.
    let resp = app
        .client
        .post(app.url(create))
        .header("Idempotency-Key", "")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // Restores too: a retried restore starts one restore.
    let id = first["id"].as_i64().unwrap();
    let done = app
        .wait_done(&format!("/api/v1/backups/{id}/"), &alice)
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    // Let the other backups of server 21 finish, or the restore is refused as busy.
    for b in app.catalog.all_backups().await.unwrap() {
        if b.server_id.0 == 21 {
            app.wait_done(&format!("/api/v1/backups/{}/", b.id.0), &alice)
                .await;
        }
    }
    let restore = "/api/v1/servers/21/restore/";
    let rbody = format!(r#"{{"backup_id": {id}}}"#);
    let (status, r1, replayed) = keyed(&app, restore, &alice, "restore-1", &rbody).await;
    assert_eq!((status, replayed), (StatusCode::ACCEPTED, false), "{r1}");
    let (status, r2, replayed) = keyed(&app, restore, &alice, "restore-1", &rbody).await;
    assert_eq!((status, replayed), (StatusCode::ACCEPTED, true), "{r2}");
    assert_eq!(r1["id"], r2["id"]);
    let (status, _) = send(app.req(
        Method::GET,
        &format!("/api/v1/restores/{}/", r1["id"].as_i64().unwrap() + 1),
        &alice,
    ))
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no second restore was made");
    app.stop().await;
}

#[tokio::test]
async fn simultaneous_posts_with_one_key_make_one_backup() {
    let app = TestApp::start().await;
    let (alice_id, alice) = app.account("alice").await;
    app.server(31, alice_id, Hooks::default()).await;
    let app = std::sync::Arc::new(app);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let app = app.clone();
        let alice = alice.clone();
        tasks.push(tokio::spawn(async move {
            keyed(
                &app,
                "/api/v1/backups/",
                &alice,
                "one-and-only",
                r#"{"server_id": 31}"#,
            )
            .await
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        let (status, body, _) = t.await.unwrap();
        match status {
            StatusCode::CREATED => ids.push(body["id"].as_i64().unwrap()),
            // The first is still running: "retry in a moment".
            StatusCode::CONFLICT => assert!(body["detail"]
                .as_str()
                .unwrap()
                .contains("still being processed")),
            other => panic!("{other}: {body}"),
        }
    }
    assert!(!ids.is_empty());
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    assert_eq!(backup_count(&app, &alice, 31).await, 1);
    // A retry now gets the stored answer.
    let (status, body, replayed) = keyed(
        &app,
        "/api/v1/backups/",
        &alice,
        "one-and-only",
        r#"{"server_id": 31}"#,
    )
    .await;
    assert_eq!((status, replayed), (StatusCode::CREATED, true));
    assert_eq!(body["id"].as_i64(), Some(ids[0]));

    // A key whose first request a crash cut short (claimed minutes ago, no
    // answer stored) is never run again: 409, and nothing is created.
    let crashed = r#"{"server_id": 31, "description": "cut short"}"#;
    let claimed_at = TestApp::now() - time::Duration::minutes(5);
    let claim = app
        .catalog
        .claim_idempotency_key(
            &IdempotentRequest {
                owner: TokenOwner::Account(alice_id),
                key: "crashed".into(),
                fingerprint: fingerprint(&Method::POST, "/api/v1/backups", crashed.as_bytes()),
            },
            claimed_at,
            claimed_at - time::Duration::hours(24),
        )
        .await
        .unwrap();
    assert_eq!(claim, IdempotencyClaim::Claimed);
    let (status, body, _) = keyed(&app, "/api/v1/backups/", &alice, "crashed", crashed).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        body["detail"].as_str().unwrap().contains("interrupted"),
        "{body}"
    );
    assert_eq!(backup_count(&app, &alice, 31).await, 1);
    let app = std::sync::Arc::into_inner(app).unwrap();
    app.stop().await;
}
