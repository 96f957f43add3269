//! Test harness: a real service on port 0 over a fresh temp data dir, real
//! ext4 disk images made with `mke2fs -d`, and a reqwest client.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Client, Method, RequestBuilder, StatusCode};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::oneshot;
use vpsbackup_catalog::{
    AccountId, Catalog, Hooks, NewServer, NewToken, ServerId, SqliteCatalog, TokenOwner,
};
use vpsbackup_service::auth::generate_token;
use vpsbackup_service::Settings;

pub struct TestApp {
    pub dir: tempfile::TempDir,
    pub addr: std::net::SocketAddr,
    pub client: Client,
    pub catalog: Arc<SqliteCatalog>,
    pub settings: Settings,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), vpsbackup_service::ServiceError>>>,
}

pub fn test_settings(dir: &Path) -> Settings {
    let mut s = Settings {
        data_dir: dir.join("data"),
        workers: 2,
        ..Settings::default()
    };
    // The scheduler (issue 4) has its own tests; here it would add automatic
    // backups the assertions do not expect.
    s.schedule.enabled = false;
    s
}

impl TestApp {
    pub async fn start() -> TestApp {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = test_settings(dir.path());
        tweak(&mut settings);
        Self::start_in(dir, settings).await
    }

    /// Starts (or restarts) a service on an existing dir.
    pub async fn start_in(dir: tempfile::TempDir, settings: Settings) -> TestApp {
        let catalog = Arc::new(
            vpsbackup_service::open_catalog(&settings.data_dir, 2)
                .await
                .unwrap(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let s = settings.clone();
        let task = tokio::spawn(async move {
            vpsbackup_service::run(s, listener, async {
                let _ = rx.await;
            })
            .await
        });
        let app = TestApp {
            dir,
            addr,
            client: Client::new(),
            catalog,
            settings,
            stop: Some(tx),
            task: Some(task),
        };
        // Wait until it answers.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = app.client.get(app.url("/api/v1/openapi.json")).send().await {
                if r.status() == StatusCode::OK {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "service did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        app
    }

    /// Graceful stop; returns the temp dir so a test can restart on it.
    pub async fn stop(mut self) -> (tempfile::TempDir, Settings) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        self.catalog.close().await;
        (self.dir, self.settings)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn req(&self, method: Method, path: &str, token: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .header("Authorization", format!("Bearer {token}"))
            .header("Content-Type", "application/json")
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        send(self.req(Method::GET, path, token)).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        send(self.req(Method::POST, path, token).body(body.to_string())).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> (StatusCode, Value) {
        send(self.req(Method::DELETE, path, token)).await
    }

    pub fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    pub async fn account(&self, name: &str) -> (AccountId, String) {
        let acc = self
            .catalog
            .create_account(name, Self::now())
            .await
            .unwrap();
        let token = self.token(TokenOwner::Account(acc.id)).await;
        (acc.id, token)
    }

    pub async fn token(&self, owner: TokenOwner) -> String {
        let t = generate_token().unwrap();
        self.catalog
            .create_token(
                NewToken {
                    hash: t.hash,
                    prefix: t.prefix,
                    name: "test".into(),
                    owner,
                },
                Self::now(),
            )
            .await
            .unwrap();
        t.secret
    }

    /// A server with one fresh real disk image.
    pub async fn server(&self, id: i64, account: AccountId, hooks: Hooks) -> PathBuf {
        let disk = self.dir.path().join(format!("disk-{id}.img"));
        make_disk(&disk, id as u64, 4);
        let plan = self
            .catalog
            .plan_by_name("standard")
            .await
            .unwrap()
            .unwrap();
        self.catalog
            .add_server(
                NewServer {
                    id: ServerId(id),
                    name: format!("web-server-{id}"),
                    hostname: format!("s{id}.example.com"),
                    account_id: account,
                    plan_id: plan.id,
                    disks: vec![vpsbackup_catalog::ServerDisk::new(
                        disk.to_string_lossy(),
                        vpsbackup_catalog::ImageFormat::Raw,
                    )],
                    hooks,
                    runtime: Default::default(),
                    node: None,
                },
                Self::now(),
            )
            .await
            .unwrap();
        disk
    }

    /// Polls a backup or restore until it leaves in_progress.
    pub async fn wait_done(&self, path: &str, token: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = self.get(path, token).await;
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
            if body["status"] != "in_progress" {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{path} still in progress: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub async fn send(req: RequestBuilder) -> (StatusCode, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"))
    };
    (status, body)
}

/// A 16 MiB raw ext4 image holding `mb` MiB of pseudo-random files (seeded,
/// so each server's disk differs), made with `mke2fs -d`.
pub fn make_disk(path: &Path, seed: u64, mb: usize) {
    let content = path.with_extension("content");
    std::fs::create_dir_all(content.join("etc")).unwrap();
    std::fs::write(content.join("etc/hostname"), format!("server-{seed}\n")).unwrap();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for f in 0..mb {
        let mut data = vec![0u8; 1 << 20];
        for chunk in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        // Half text-like, half random: something for compression to do.
        for b in data.iter_mut().take(1 << 19) {
            *b = b'a' + (*b % 26);
        }
        std::fs::write(content.join(format!("file{f}.dat")), data).unwrap();
    }
    let out = Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&content)
        .arg("-F")
        .arg(path)
        .arg("16M")
        .output()
        .expect("mke2fs (e2fsprogs) is needed by the tests");
    assert!(
        out.status.success(),
        "mke2fs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&content).unwrap();
}

/// Byte-for-byte comparison with `cmp`.
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}
