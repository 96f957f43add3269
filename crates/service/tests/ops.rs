//! The operational endpoints on a real service over real HTTP: `/healthz`
//! answers while the process runs; `/readyz` turns 503 with a plain reason
//! when the store directory is gone or the catalog's files are damaged, and
//! 200 again once they are back; neither needs a token nor is rate limited,
//! and neither is in the customer's OpenAPI document.

mod common;

use common::TestApp;

async fn get(app: &TestApp, path: &str) -> (u16, String, reqwest::header::HeaderMap) {
    let r = app.client.get(app.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.text().await.unwrap(), headers)
}

async fn ready(app: &TestApp) -> (u16, String) {
    let (status, text, _) = get(app, "/readyz").await;
    (status, text)
}

async fn healthy(app: &TestApp) -> bool {
    get(app, "/healthz").await.0 == 200
}

#[tokio::test]
async fn healthz_and_readyz_need_no_token_and_are_not_rate_limited() {
    // One read a caller: the API's own limit would answer 429 at once.
    let app = TestApp::start_with(|s| {
        s.rate_limit.read_per_second = 1;
        s.rate_limit.read_burst = 1;
    })
    .await;
    for _ in 0..20 {
        let (status, text, headers) = get(&app, "/healthz").await;
        assert_eq!((status, text.as_str()), (200, "ok\n"));
        assert!(headers.get("ratelimit-limit").is_none(), "{headers:?}");
        assert_eq!(
            headers["content-type"], "text/plain; charset=utf-8",
            "{headers:?}"
        );
        let (status, text, headers) = get(&app, "/readyz").await;
        assert_eq!((status, text.as_str()), (200, "ready\n"));
        assert!(headers.get("ratelimit-limit").is_none(), "{headers:?}");
    }
    // The customer API is still limited: the exemption is for these paths only.
    // (The start-up probe already spent this peer's one read.)
    let api = app
        .client
        .get(app.url("/api/v1/backups/"))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 429);
    // Not part of the customer's API document (schemathesis fuzzes that one).
    let (_, doc, _) = get(&app, "/api/v1/openapi.json").await;
    assert!(!doc.contains("healthz") && !doc.contains("readyz"));
    app.stop().await;
}

#[tokio::test]
async fn readyz_fails_while_the_store_directory_is_gone() {
    let app = TestApp::start().await;
    assert_eq!(ready(&app).await, (200, "ready\n".into()));
    let store = app.settings.store_path();
    let away = app.dir.path().join("store-away");
    std::fs::rename(&store, &away).unwrap();
    let (status, text) = ready(&app).await;
    assert_eq!(
        (status, text.as_str()),
        (503, "not ready: the backup store cannot be read\n")
    );
    assert!(healthy(&app).await, "the process itself is alive");
    // Something else where the store was: still not the store.
    std::fs::create_dir(&store).unwrap();
    assert_eq!(ready(&app).await.0, 503);
    std::fs::remove_dir(&store).unwrap();
    std::fs::rename(&away, &store).unwrap();
    assert_eq!(ready(&app).await, (200, "ready\n".into()));
    app.stop().await;
}

#[tokio::test]
async fn readyz_fails_while_the_catalog_cannot_be_read() {
    let app = TestApp::start().await;
    assert_eq!(ready(&app).await, (200, "ready\n".into()));
    let db = app.settings.catalog_path();
    let away = app.dir.path().join("catalog-away.db");
    let not_ready = (503, "not ready: the catalog cannot be read\n".to_owned());
    // Root ignores file modes, so the file goes away instead: the next
    // command or a restart would not find the catalog.
    std::fs::rename(&db, &away).unwrap();
    assert_eq!(ready(&app).await, not_ready);
    assert!(healthy(&app).await, "the process itself is alive");
    // Something that is not a database in its place.
    std::fs::write(&db, b"not a database at all").unwrap();
    assert_eq!(ready(&app).await, not_ready);
    // Back as it was: ready again, and the catalog lost nothing.
    std::fs::rename(&away, &db).unwrap();
    assert_eq!(ready(&app).await, (200, "ready\n".into()));
    let (_, token) = app.account("acme").await;
    let (status, body) = app.get("/api/v1/account/me/", &token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "acme");
    app.stop().await;
}
