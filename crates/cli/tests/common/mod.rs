//! Helpers the command-line tests share: run the built binary on a data dir,
//! make small real ext4 images with `mke2fs -d`, and run a real `serve`
//! driven over HTTP with curl.

#![allow(dead_code)] // each test file uses its own subset

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `vpsbackup --data-dir DIR ARGS...`, not started.
pub fn vpsbackup_command(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vpsbackup"));
    cmd.arg("--data-dir")
        .arg(dir)
        .args(args)
        .env("RUST_BACKTRACE", "0");
    cmd
}

/// Runs `vpsbackup --data-dir DIR ARGS...` to completion.
pub fn vpsbackup(dir: &Path, args: &[&str]) -> Output {
    vpsbackup_command(dir, args).output().unwrap()
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let out = vpsbackup(dir, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `server add --id ID --name vps-ID --account acme --disk DISK EXTRA...`:
/// the server most tests need, with any further flags.
pub fn add_server(dir: &Path, id: &str, disk: &Path, extra: &[&str]) -> String {
    let name = format!("vps-{id}");
    let mut args = vec![
        "server",
        "add",
        "--id",
        id,
        "--name",
        &name,
        "--account",
        "acme",
        "--disk",
        disk.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    ok(dir, &args)
}

/// An 8 MiB ext4 image holding `mib` MiB of incompressible data
/// (xorshift64 from `seed`) in one file.
pub fn incompressible_disk(path: &Path, mib: usize, seed: u64) {
    ext4_image(path, "data.bin", &incompressible_bytes(mib, seed));
}

/// `mib` MiB of xorshift bytes from `seed`: nothing for zstd to squeeze.
pub fn incompressible_bytes(mib: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..mib * 1024 * 1024 / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// An 8 MiB ext4 image at `path` holding one file `name` with `content`.
pub fn ext4_image(path: &Path, name: &str, content: &[u8]) {
    let dir = path.with_extension("d");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), content).unwrap();
    let out = Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&dir)
        .arg("-F")
        .arg(path)
        .arg("8M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mke2fs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `vpsbackup serve`; SIGKILLed on drop if still running.
pub struct Serve {
    child: Child,
    pub base: String,
}

impl Serve {
    pub fn start(dir: &Path, token: &str) -> Serve {
        Self::start_under(&[], dir, token)
    }

    /// `serve` run through `prefix` (e.g. `setpriv` to drop root).
    pub fn start_under(prefix: &[&str], dir: &Path, token: &str) -> Serve {
        Self::start_with(prefix, dir, token, &[])
    }

    /// `serve` with further flags of its own (`extra`).
    pub fn start_with(prefix: &[&str], dir: &Path, token: &str, extra: &[&str]) -> Serve {
        // A free port: bound, read, released (serve binds it right after).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(env!("CARGO_BIN_EXE_vpsbackup"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_vpsbackup")),
        };
        let child = cmd
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let serve = Serve {
            child,
            base: format!("http://127.0.0.1:{port}/api/v1"),
        };
        wait_for("serve to answer", || {
            serve.call("GET", "/account/me/", token, None).0 == 200
        });
        serve
    }

    /// One request with curl; returns the status and the JSON body (Null if none).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args(["-H", "Content-Type: application/json"]);
        if let Some(b) = body {
            cmd.args(["-d", b]);
        }
        let out = cmd.arg(format!("{}{path}", self.base)).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        )
    }

    pub fn get(&self, path: &str, token: &str) -> serde_json::Value {
        let (code, body) = self.call("GET", path, token, None);
        assert_eq!(code, 200, "GET {path}: {body}");
        body
    }

    /// SIGTERM (a graceful stop), then waits for the process to exit.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        self.child.wait().unwrap();
    }

    /// The process id (to tell replicas apart in `vpsbackup status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A port free now (bound, read, released), for a listener started next.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether two files hold the same bytes (`cmp`).
pub fn same(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

/// The PostgreSQL server the tests make databases on: a role that may
/// create databases (`.ci/postgres.sh` sets it up). Never skipped.
pub fn pg_admin_url() -> String {
    std::env::var("VPSBACKUP_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://vpsbackup:vpsbackup@127.0.0.1/vpsbackup".into())
}

/// An empty PostgreSQL database for one test (made and dropped with
/// `psql`), so tests run in parallel apart.
pub struct PgDatabase {
    pub url: String,
    name: String,
}

impl PgDatabase {
    pub fn create() -> PgDatabase {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "vpsbackup_cli_test_{}_{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        psql(&format!("CREATE DATABASE {name}"));
        let admin = pg_admin_url();
        let base = admin.rsplit_once('/').expect("a database URL").0;
        PgDatabase {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        psql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

fn psql(sql: &str) {
    psql_value(&pg_admin_url(), sql);
}

/// Runs `sql` on the database at `url` (which must succeed) and returns
/// its one value, unaligned.
pub fn psql_value(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .arg(url)
        .args(["-At", "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .expect("psql is needed by the PostgreSQL tests");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
