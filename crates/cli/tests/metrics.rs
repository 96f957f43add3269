//! `vpsbackup serve --metrics-listen`: the operational endpoints on a second
//! listener of the real binary, over real HTTP (curl).

use std::path::Path;
use std::process::Command;

mod common;
use common::{free_port, ok, Serve};

/// GET with curl: (status, body).
fn fetch(url: &str, headers: &[&str]) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// A data dir with account "acme" and its token.
fn account(dir: &Path) -> String {
    ok(dir, &["account", "create", "acme"]);
    let out = ok(dir, &["token", "create", "--account", "acme"]);
    out.lines().last().unwrap().trim().to_owned()
}

#[test]
fn metrics_listen_serves_health_and_readiness_apart_from_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let token = account(&dir);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let serve = Serve::start_with(&[], &dir, &token, &["--metrics-listen", &listen]);
    let ops = format!("http://{listen}");
    assert_eq!(fetch(&format!("{ops}/healthz"), &[]), (200, "ok\n".into()));
    assert_eq!(
        fetch(&format!("{ops}/readyz"), &[]),
        (200, "ready\n".into())
    );
    // Only the operational endpoints there: not the customer API.
    let auth = format!("Authorization: Bearer {token}");
    assert_eq!(fetch(&format!("{ops}/api/v1/account/me/"), &[&auth]).0, 404);
    // And the API listener answers them too.
    let api = serve.base.trim_end_matches("/api/v1");
    assert_eq!(fetch(&format!("{api}/healthz"), &[]), (200, "ok\n".into()));
    assert_eq!(
        fetch(&format!("{api}/readyz"), &[]),
        (200, "ready\n".into())
    );
}

#[test]
fn a_metrics_listen_address_in_use_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    account(&dir);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_vpsbackup"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            &addr,
        ])
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on {addr} (--metrics-listen)")),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
