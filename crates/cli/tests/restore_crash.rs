//! kill -9 of `vpsbackup serve` during a restore (issue 8, part 3), over
//! real HTTP (curl) on a real socket: a real backup of a real ext4 image,
//! then a restore whose `pre_restore` hook sleeps (the job is running, the
//! server is "restoring") when the service is SIGKILLed. At the next start
//! the restore is failed with a reason, never re-run on its own (the guest
//! may have been started on the disk since); the server is active again; a
//! new restore succeeds and the disk is byte-identical to the backed-up one.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

mod common;
use common::{add_server, ext4_image, ok, same, wait_for, Serve};

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
    add_server(&dir, "5", &disk, &["--pre-restore", &hook]);

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
