//! Webhooks over real HTTP both ways: the service on port 0 runs real
//! backups and restores, and a small axum receiver on port 0 records what it
//! is sent, checks signatures, and can answer 500 to force retries.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode as AxumStatus};
use axum::routing::post;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use common::TestApp;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Sha256;
use vpsbackup_catalog::{Catalog, Hooks, Webhook};

/// One POST as the receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    content_type: String,
    body: String,
    /// What the receiver answered.
    answered: u16,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    /// Answer 500 to this many requests first.
    fail_first: Arc<AtomicU32>,
}

impl Receiver {
    /// Serves on port 0; returns the receiver and its URL.
    async fn start(fail_first: u32) -> (Receiver, String) {
        let r = Receiver::default();
        r.fail_first.store(fail_first, Ordering::SeqCst);
        let state = r.clone();
        let app = axum::Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: String| {
                let state = state.clone();
                async move {
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let fail = state
                        .fail_first
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    let status = if fail {
                        AxumStatus::INTERNAL_SERVER_ERROR
                    } else {
                        AxumStatus::NO_CONTENT
                    };
                    state.got.lock().unwrap().push(Received {
                        id: h("webhook-id"),
                        timestamp: h("webhook-timestamp"),
                        signature: h("webhook-signature"),
                        content_type: h("content-type"),
                        body,
                        answered: status.as_u16(),
                    });
                    status
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (r, format!("http://{addr}/hook"))
    }

    fn all(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `n` requests arrived.
    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let all = self.all();
            if all.len() >= n {
                return all;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} webhook requests arrived: {all:?}",
                all.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Checks the signature as a receiver would, independently of the service's code.
/// A secret in the Standard Webhooks form (the specification's example key).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn assert_signed(r: &Received, secret: &str) {
    // As Standard Webhooks receivers do: the key is the base64 after `whsec_`.
    let key = match secret.strip_prefix("whsec_") {
        Some(b64) => BASE64.decode(b64).unwrap(),
        None => secret.as_bytes().to_vec(),
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.{}", r.id, r.timestamp, r.body).as_bytes());
    let expected = BASE64.encode(mac.finalize().into_bytes());
    assert_eq!(r.signature, format!("v1,{expected}"), "{r:?}");
    let ts: i64 = r.timestamp.parse().unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now - ts).abs() < 300, "timestamp {ts} vs now {now}");
    assert_eq!(r.content_type, "application/json");
    assert!(r.id.starts_with("evt_") && r.id.len() == 36, "{}", r.id);
}

async fn set_webhook(app: &TestApp, account: &str, url: &str, secret: &str) {
    app.catalog
        .set_account_webhook(
            account,
            Some(Webhook {
                url: url.into(),
                secret: secret.into(),
            }),
        )
        .await
        .unwrap();
}

async fn backup(app: &TestApp, token: &str, server: i64) -> Value {
    let (s, b) = app
        .post("/api/v1/backups/", token, json!({"server_id": server}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    app.wait_done(&format!("/api/v1/backups/{}/", b["id"]), token)
        .await
}

fn fast_retries(s: &mut vpsbackup_service::Settings) {
    s.webhooks.retry_base_secs = 1;
    s.webhooks.retry_max_secs = 2;
}

#[tokio::test]
async fn outcomes_are_posted_signed_with_the_object_as_the_api_shows_it() {
    let app = TestApp::start_with(fast_retries).await;
    let (acc, token) = app.account("acme").await;
    let disk = app.server(12345, acc, Hooks::default()).await;
    let (receiver, url) = Receiver::start(0).await;
    set_webhook(&app, "acme", &url, SECRET).await;
    let (s, me) = app.get("/api/v1/account/me/", &token).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(me["webhook_url"], url.as_str());
    assert!(!me.to_string().contains(SECRET), "{me}");

    // A completed backup.
    let done = backup(&app, &token, 12345).await;
    assert_eq!(done["status"], "completed");
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    assert_signed(&got[0], SECRET);
    let event = got[0].json();
    assert_eq!(event["event"], "backup.completed");
    assert_eq!(event["id"], got[0].id.as_str());
    assert!(event["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(event["data"], done, "data is the backup as GET shows it");

    // A restore of it.
    let (s, r) = app
        .post(
            "/api/v1/servers/12345/restore/",
            &token,
            json!({"backup_id": done["id"]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{r}");
    let restored = app
        .wait_done(&format!("/api/v1/restores/{}/", r["id"]), &token)
        .await;
    assert_eq!(restored["status"], "completed");
    let got = receiver.wait_for(2, Duration::from_secs(20)).await;
    assert_signed(&got[1], SECRET);
    let event = got[1].json();
    assert_eq!(event["event"], "restore.completed");
    assert_eq!(event["data"], restored);

    // A failed backup: the disk image is gone.
    std::fs::remove_file(&disk).unwrap();
    let failed = backup(&app, &token, 12345).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let got = receiver.wait_for(3, Duration::from_secs(20)).await;
    assert_signed(&got[2], SECRET);
    let event = got[2].json();
    assert_eq!(event["event"], "backup.failed");
    assert_eq!(event["data"], failed);
    assert!(event["data"]["error"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));

    // Each event once, each with its own id.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = receiver.all();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got[0].id != got[1].id && got[1].id != got[2].id);
    app.stop().await;
}

#[tokio::test]
async fn a_receiver_that_fails_gets_the_same_event_again_later() {
    let app = TestApp::start_with(fast_retries).await;
    let (acc, token) = app.account("acme").await;
    app.server(12345, acc, Hooks::default()).await;
    let (receiver, url) = Receiver::start(2).await;
    set_webhook(&app, "acme", &url, "k").await;

    let done = backup(&app, &token, 12345).await;
    let got = receiver.wait_for(3, Duration::from_secs(30)).await;
    assert_eq!(
        got.iter().map(|r| r.answered).collect::<Vec<_>>(),
        [500, 500, 204]
    );
    // The same event, byte for byte; a receiver dedups on Webhook-Id.
    assert!(got
        .iter()
        .all(|r| r.id == got[0].id && r.body == got[0].body));
    for r in &got {
        assert_signed(r, "k");
    }
    assert_eq!(got[2].json()["data"], done);
    // Delivered: not sent again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.all().len(), 3);
    app.stop().await;
}

#[tokio::test]
async fn events_go_only_to_their_own_accounts_webhook() {
    let app = TestApp::start_with(fast_retries).await;
    let (a, token_a) = app.account("acme").await;
    let (b, token_b) = app.account("globex").await;
    let (c, token_c) = app.account("initech").await;
    app.server(100, a, Hooks::default()).await;
    app.server(200, b, Hooks::default()).await;
    app.server(300, c, Hooks::default()).await;
    let (recv_a, url_a) = Receiver::start(0).await;
    let (recv_b, url_b) = Receiver::start(0).await;
    set_webhook(&app, "acme", &url_a, "ka").await;
    set_webhook(&app, "globex", &url_b, "kb").await;
    // initech has none.

    let ba = backup(&app, &token_a, 100).await;
    let bb = backup(&app, &token_b, 200).await;
    let bc = backup(&app, &token_c, 300).await;
    assert_eq!(bc["status"], "completed");
    let got_a = recv_a.wait_for(1, Duration::from_secs(20)).await;
    let got_b = recv_b.wait_for(1, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(recv_a.all().len(), 1);
    assert_eq!(recv_b.all().len(), 1);
    assert_eq!(got_a[0].json()["data"]["id"], ba["id"]);
    assert_eq!(got_b[0].json()["data"]["id"], bb["id"]);
    assert_signed(&got_a[0], "ka");
    assert_signed(&got_b[0], "kb");

    // Without a webhook no event is even recorded; removing one drops pending ones.
    assert_eq!(outbox_rows(&app).await, 2);
    app.catalog.set_account_webhook("acme", None).await.unwrap();
    let (_, me) = app.get("/api/v1/account/me/", &token_a).await;
    assert_eq!(me["webhook_url"], Value::Null);
    backup(&app, &token_a, 100).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(recv_a.all().len(), 1);
    assert_eq!(outbox_rows(&app).await, 2);
    app.stop().await;
}

/// Rows of the outbox (which has no API): an UPDATE that changes nothing
/// reports how many rows it touched.
async fn outbox_rows(app: &TestApp) -> u64 {
    app.catalog
        .execute_raw("UPDATE webhook_events SET seq = seq")
        .await
        .unwrap()
}

#[tokio::test]
async fn a_pending_event_survives_a_restart_and_is_sent_after_it() {
    let app = TestApp::start_with(fast_retries).await;
    let (acc, token) = app.account("acme").await;
    app.server(12345, acc, Hooks::default()).await;
    // Down for now: every attempt fails.
    let (receiver, url) = Receiver::start(u32::MAX).await;
    set_webhook(&app, "acme", &url, "k").await;
    let done = backup(&app, &token, 12345).await;
    receiver.wait_for(1, Duration::from_secs(20)).await;
    let (dir, settings) = app.stop().await;

    // The receiver is back; so is the service, on the same data dir.
    receiver.fail_first.store(0, Ordering::SeqCst);
    let app = TestApp::start_in(dir, settings).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let delivered = loop {
        if let Some(r) = receiver.all().into_iter().find(|r| r.answered == 204) {
            break r;
        }
        assert!(Instant::now() < deadline, "{:?}", receiver.all());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_signed(&delivered, "k");
    assert_eq!(delivered.id, receiver.all()[0].id, "the same event");
    assert_eq!(delivered.json()["data"], done);
    app.stop().await;
}
