//! `vpsbackup status`, `gc` and `verify` on the built binary, beside a
//! running `serve` whose scheduler takes the automatic backup.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{add_server, incompressible_disk, ok, vpsbackup};

/// A real ext4 image holding 2 MiB of incompressible data.
fn make_disk(path: &Path) {
    incompressible_disk(path, 2, 0x2545_f491_4f6c_dd1d);
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn server_row(status: &str) -> String {
    status
        .lines()
        .find(|l| l.contains("vps-5"))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn status_gc_and_verify_beside_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    ok(&dir, &["account", "create", "acme"]);
    let disk = tmp.path().join("vps5.img");
    make_disk(&disk);
    add_server(&dir, "5", &disk, &[]);
    std::fs::write(
        dir.join("config.toml"),
        "[schedule]\ntick_secs = 1\ngc_grace_secs = 0\nverify_interval_days = 0\n",
    )
    .unwrap();
    let before = ok(&dir, &["status"]);
    assert!(server_row(&before).contains("never"), "{before}");
    assert!(before.contains("Store:"), "{before}");

    // serve's scheduler takes the (catch-up) automatic backup at once.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vpsbackup"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let s = ok(&dir, &["status"]);
        if server_row(&s).contains("completed") {
            break s;
        }
        assert!(Instant::now() < deadline, "no automatic backup: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let row = server_row(&status);
    assert!(row.contains(" on ") && row.contains("03:00+120m"), "{row}");
    assert!(row.trim_end().ends_with(" 0"), "nothing damaged yet: {row}");

    let verified = ok(&dir, &["verify"]);
    assert!(
        verified.contains("1 backups verified, 0 damaged"),
        "{verified}"
    );
    let gc = ok(&dir, &["gc"]);
    assert!(gc.starts_with("GC freed"), "{gc}");

    // Damage the only data pack: verify says so and fails; status counts it.
    let (_, pack) = files(&dir.join("store").join("packs"))
        .into_iter()
        .map(|p| (std::fs::metadata(&p).unwrap().len(), p))
        .max()
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 4096] {
        *b ^= 0xa5;
    }
    std::fs::write(&pack, bytes).unwrap();
    let out = vpsbackup(&dir, &["verify", "--backup", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("DAMAGED"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
    let after = ok(&dir, &["status"]);
    assert!(server_row(&after).trim_end().ends_with(" 1"), "{after}");

    assert!(Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success());
    assert!(child.wait().unwrap().success());
}

/// `vpsbackup failures` shows the operator what the customer was not shown.
#[test]
fn failures_lists_the_customers_reason_and_the_operators_detail() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    common::ok(&dir, &["account", "create", "acme"]);
    assert!(common::ok(&dir, &["failures"]).contains("No failed backups"));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let cat = vpsbackup_service::open_catalog(&dir, 1).await.unwrap();
            cat.execute_raw(
                "INSERT INTO jobs (kind, server_id, backup_id, state, attempts, max_attempts, \
                   run_after, created_at, finished_at, error, error_detail) \
                 VALUES ('backup', NULL, 41, 'failed', 1, 3, 0, 0, 1700000000, \
                   'The server''s disk could not be read.', \
                   'Disk access failed: /srv/vm/41.img: No such file or directory')",
            )
            .await
            .unwrap();
            cat.close().await;
        });
    let out = common::ok(&dir, &["failures"]);
    assert!(out.contains("job 1: backup 41"), "{out}");
    assert!(
        out.contains("customer sees: The server's disk could not be read."),
        "{out}"
    );
    assert!(
        out.contains("detail:        Disk access failed: /srv/vm/41.img"),
        "{out}"
    );
}
