//! A disk image the service may not read (issue 8, part 3). Root ignores
//! mode bits, so `serve` runs as the unprivileged user `nobody` (via
//! `setpriv`, a real process with dropped privileges) over a data dir it
//! owns, while the server's disk image stays root's with mode 0600: the
//! open fails with EACCES. The backup fails with the reason, the service
//! keeps running, and once the image is readable the next backup succeeds.
//! Skips with a message when not run as root (CI runs as root).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

mod common;
use common::{add_server, ext4_image, ok, wait_for, Serve};

const NOBODY: &str = "65534";

#[test]
fn a_disk_image_without_read_permission_fails_the_backup_with_a_reason() {
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        eprintln!("SKIPPED: dropping to an unprivileged user needs root (CI runs as root)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    std::fs::set_permissions(t, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = t.join("data");
    ok(&dir, &["account", "create", "acme"]);
    let token = ok(&dir, &["token", "create", "--account", "acme"]);
    let token = token.lines().last().unwrap().trim().to_owned();
    let disk = t.join("vps5.img");
    ext4_image(&disk, "data.bin", &[7u8; 1 << 20]);
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o600)).unwrap();
    add_server(&dir, "5", &disk, &[]);
    // Only the job under test: no automatic catch-up backup beside it.
    std::fs::write(dir.join("config.toml"), "[schedule]\nenabled = false\n").unwrap();
    let st = Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success());

    let prefix = [
        "setpriv",
        "--reuid",
        NOBODY,
        "--regid",
        NOBODY,
        "--clear-groups",
    ];
    let serve = Serve::start_under(&prefix, &dir, &token);
    let backup = |serve: &Serve| {
        let (code, b) = serve.call("POST", "/servers/5/backup/", &token, Some("{}"));
        assert_eq!(code, 201, "{b}");
        let id = b["id"].as_i64().unwrap();
        let mut last = serde_json::Value::Null;
        wait_for("the backup", || {
            last = serve.get(&format!("/backups/{id}/"), &token);
            last["status"] != "in_progress"
        });
        last
    };
    let failed = backup(&serve);
    assert_eq!(failed["status"], "failed", "{failed}");
    // The customer gets a plain reason; the operator's detail names the cause.
    let reason = failed["error"].as_str().unwrap_or_default();
    assert_eq!(reason, "The server's disk could not be read.");
    let detail = ok(&dir, &["failures"]);
    assert!(detail.contains("ermission denied"), "{detail}");
    assert_eq!(serve.get("/servers/5/", &token)["status"], "active");

    // The provider fixes the permission; the same service backs up.
    let st = Command::new("chown")
        .arg(format!("{NOBODY}:{NOBODY}"))
        .arg(&disk)
        .status()
        .unwrap();
    assert!(st.success());
    let done = backup(&serve);
    assert_eq!(done["status"], "completed", "{done}");
}
