//! Real S3 servers for tests: Garage 2.5.0 and Ceph radosgw on 127.0.0.1.
//!
//! `.ci/run` starts both once for the whole run (`.ci/s3/test-servers.sh`)
//! and exports `VPSBACKUP_TEST_<KIND>_*`; a test binary run without them
//! (a developer's `cargo test`) starts the server it needs itself, once per
//! process, with a watchdog that stops it when the process is gone. Every
//! caller gets its own random prefix in the server's bucket, so tests never
//! see each other's objects.
//!
//! Shared with the cli crate's tests through `#[path]`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use vpsbackup_engine::S3Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Garage,
    Ceph,
}

impl Kind {
    fn env_name(self) -> &'static str {
        match self {
            Kind::Garage => "GARAGE",
            Kind::Ceph => "CEPH",
        }
    }
    fn arg(self) -> &'static str {
        match self {
            Kind::Garage => "garage",
            Kind::Ceph => "ceph",
        }
    }
}

/// One running server and how to reach it.
#[derive(Debug, Clone)]
pub struct TestS3 {
    pub kind: Kind,
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl TestS3 {
    /// A config for a fresh, empty prefix of the bucket (`name-<random>`).
    pub fn config(&self, name: &str) -> S3Config {
        S3Config {
            bucket: self.bucket.clone(),
            prefix: format!("{name}-{}", random_hex()),
            endpoint: Some(self.endpoint.clone()),
            region: self.region.clone(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            max_attempts: vpsbackup_engine::storage::DEFAULT_S3_ATTEMPTS,
        }
    }

    /// `--store` URL, `--s3-endpoint`, `--s3-region` and the key variables
    /// for a `vpsbackup` process on a fresh prefix.
    pub fn cli_env(&self, name: &str) -> (String, Vec<(String, String)>) {
        let c = self.config(name);
        (
            format!("s3://{}/{}", c.bucket, c.prefix),
            vec![
                ("AWS_ACCESS_KEY_ID".into(), self.access_key_id.clone()),
                (
                    "AWS_SECRET_ACCESS_KEY".into(),
                    self.secret_access_key.clone(),
                ),
                ("VPSBACKUP_S3_ENDPOINT".into(), self.endpoint.clone()),
                ("VPSBACKUP_S3_REGION".into(), self.region.clone()),
            ],
        )
    }
}

fn random_hex() -> String {
    let mut b = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .expect("read /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn garage() -> &'static TestS3 {
    static S: OnceLock<TestS3> = OnceLock::new();
    S.get_or_init(|| from_env(Kind::Garage).unwrap_or_else(|| start(Kind::Garage)))
}

pub fn ceph() -> &'static TestS3 {
    static S: OnceLock<TestS3> = OnceLock::new();
    S.get_or_init(|| from_env(Kind::Ceph).unwrap_or_else(|| start(Kind::Ceph)))
}

pub fn server(kind: Kind) -> &'static TestS3 {
    match kind {
        Kind::Garage => garage(),
        Kind::Ceph => ceph(),
    }
}

fn from_env(kind: Kind) -> Option<TestS3> {
    let var = |f: &str| std::env::var(format!("VPSBACKUP_TEST_{}_{f}", kind.env_name())).ok();
    Some(TestS3 {
        kind,
        endpoint: var("ENDPOINT")?,
        region: var("REGION")?,
        bucket: var("BUCKET")?,
        access_key_id: var("ACCESS_KEY_ID")?,
        secret_access_key: var("SECRET_ACCESS_KEY")?,
    })
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Starts the server through `.ci/s3/test-servers.sh` under a watchdog
/// shell that stops it once this process has exited.
// The watchdog outlives this process by design: never waited for.
#[allow(clippy::zombie_processes)]
fn start(kind: Kind) -> TestS3 {
    let dir = tempfile::Builder::new()
        .prefix("vpsbackup-s3-")
        .tempdir()
        .expect("temp dir")
        .keep();
    let script = repo_root().join(".ci/s3/test-servers.sh");
    let log = dir.join("start.log");
    let watchdog = format!(
        r#"s="$1"; d="$2"; "$s" start "$d/srv" {kind} 2>>"$d/start.log" || exit 1
echo READY
exec >/dev/null 2>&1
while kill -0 {pid} 2>/dev/null; do sleep 1; done
"$s" stop "$d/srv"; rm -rf "$d""#,
        kind = kind.arg(),
        pid = std::process::id()
    );
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(watchdog)
        .arg("watchdog")
        .arg(&script)
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the S3 test server script");
    let out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut vars = Vec::new();
    for line in out.lines() {
        let line = line.expect("read the script's output");
        if line == "READY" {
            break;
        }
        if let Some((k, v)) = line.trim_start_matches("export ").split_once('=') {
            vars.push((k.to_owned(), v.trim_matches('\'').to_owned()));
        }
    }
    let get = |f: &str| {
        let name = format!("VPSBACKUP_TEST_{}_{f}", kind.env_name());
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| {
                panic!(
                    "the {} test server did not start: {}",
                    kind.arg(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
    };
    TestS3 {
        kind,
        endpoint: get("ENDPOINT"),
        region: get("REGION"),
        bucket: get("BUCKET"),
        access_key_id: get("ACCESS_KEY_ID"),
        secret_access_key: get("SECRET_ACCESS_KEY"),
    }
}
