//! kill -9 of `vpsbackup serve` during a restore (issue 8, part 3), over
//! real HTTP (curl) on a real socket: a real backup of a real ext4 image,
//! then a restore whose `pre_restore` hook sleeps (the job is running, the
//! server is "restoring") when the service is SIGKILLed. At the next start
//! the restore is failed with a reason, never re-run on its own (the guest
//! may have been started on the disk since); the server is active again; a
//! new restore succeeds and the disk is byte-identical to the backed-up one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{ext4_image, ok};

/// A running `vpsbackup serve`; SIGKILLed on drop if still running.
struct Serve {
    child: Child,
    base: String,
}

impl Serve {
    fn start(dir: &Path, token: &str) -> Serve {
        // A free port: bound, read, released (serve binds it right after).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_vpsbackup"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir)
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
    fn call(
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

    fn get(&self, path: &str, token: &str) -> serde_json::Value {
        let (code, body) = self.call("GET", path, token, None);
        assert_eq!(code, 200, "GET {path}: {body}");
        body
    }

    fn kill9(mut self) {
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

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills the hook's `sleep` (started by the killed serve) on every path.
struct HookPid(PathBuf);

impl Drop for HookPid {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
}

#[test]
fn a_restore_killed_with_the_service_is_failed_at_restart_and_a_new_one_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let t = tmp.path();
    ok(&dir, &["account", "create", "acme"]);
    let token = ok(&dir, &["token", "create", "--account", "acme"]);
    let token = token.lines().last().unwrap().trim().to_owned();
    let disk = t.join("vps5.img");
    let data: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    ext4_image(&disk, "data.bin", &data);
    let original = t.join("original.img");
    std::fs::copy(&disk, &original).unwrap();

    // The first restore's hook parks in a sleep (its pid recorded); later
    // restores pass straight through.
    let (once, pid) = (t.join("hook.once"), t.join("hook.pid"));
    let hook = format!(
        "if [ ! -e {o} ]; then touch {o}; echo $$ > {p}; exec sleep 120; fi",
        o = once.display(),
        p = pid.display()
    );
    let _hook_guard = HookPid(pid.clone());
    ok(
        &dir,
        &[
            "server",
            "add",
            "--id",
            "5",
            "--name",
            "vps-5",
            "--account",
            "acme",
            "--disk",
            disk.to_str().unwrap(),
            "--pre-restore",
            &hook,
        ],
    );

    let serve = Serve::start(&dir, &token);
    let (code, b) = serve.call("POST", "/servers/5/backup/", &token, Some("{}"));
    assert_eq!(code, 201, "{b}");
    let backup = b["id"].as_i64().unwrap();
    wait_for("the backup", || {
        serve.get(&format!("/backups/{backup}/"), &token)["status"] == "completed"
    });

    // The guest writes after the backup: the restore has work to do.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&[0xee; 1 << 20], 2 << 20).unwrap();
    }
    assert!(!same(&disk, &original));

    let body = format!("{{\"backup_id\": {backup}}}");
    let (code, r) = serve.call("POST", "/servers/5/restore/", &token, Some(&body));
    assert_eq!(code, 202, "{r}");
    let restore = r["id"].as_i64().unwrap();
    wait_for("the pre_restore hook", || pid.exists());
    assert_eq!(serve.get("/servers/5/", &token)["status"], "restoring");
    serve.kill9();
    drop(_hook_guard);

    let serve = Serve::start(&dir, &token);
    let r = serve.get(&format!("/restores/{restore}/"), &token);
    assert_eq!(r["status"], "failed", "{r}");
    let reason = r["error"].as_str().unwrap();
    assert!(reason.contains("service stopped"), "{reason}");
    assert!(
        !reason.contains('/'),
        "no host paths for customers: {reason}"
    );
    assert_eq!(serve.get("/servers/5/", &token)["status"], "active");
    // Not re-run behind the provider's back: the disk is as the guest left it.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!same(&disk, &original));

    let (code, r) = serve.call("POST", "/servers/5/restore/", &token, Some(&body));
    assert_eq!(code, 202, "{r}");
    let again = r["id"].as_i64().unwrap();
    wait_for("the new restore", || {
        let r = serve.get(&format!("/restores/{again}/"), &token);
        assert_ne!(r["status"], "failed", "{r}");
        r["status"] == "completed"
    });
    assert!(same(&disk, &original), "the restored disk differs");
    assert_eq!(serve.get("/servers/5/", &token)["status"], "active");
}

fn same(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}
