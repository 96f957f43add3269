//! The admin command line and `serve --demo`, running the built binary on a
//! fresh data dir: the names, flags and outputs scripts depend on.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{ext4_image, ok, vpsbackup};

/// Fails with a non-zero exit and a reason on stderr containing `why`.
fn fails(dir: &Path, args: &[&str], why: &str) {
    let out = vpsbackup(dir, args);
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(why), "{args:?}: stderr {err:?} lacks {why:?}");
}

fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or("")
}

fn is_token(s: &str) -> bool {
    s.len() == 44
        && s.starts_with("vps_")
        && s[4..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn make_disk(path: &Path) {
    ext4_image(path, "hello.txt", "hello\n".repeat(10_000).as_bytes());
}

/// A plain HTTP/1.1 GET; returns (status, body).
fn http_get(addr: &str, path: &str, token: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn accounts_tokens_plans_and_servers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let disk = tmp.path().join("disk.img");
    make_disk(&disk);

    ok(&dir, &["account", "create", "acme"]);
    fails(&dir, &["account", "create", "acme"], "already exists");
    assert!(ok(&dir, &["account", "list"]).contains("acme"));

    let out = ok(
        &dir,
        &["token", "create", "--account", "acme", "--name", "ci"],
    );
    let token = last_line(&out).to_owned();
    assert!(is_token(&token), "last line is not a token: {out:?}");
    let admin = ok(&dir, &["token", "create", "--admin"]);
    assert!(is_token(last_line(&admin)));
    assert_ne!(last_line(&admin), token);
    fails(
        &dir,
        &["token", "create", "--account", "nobody"],
        "no account named",
    );
    fails(&dir, &["token", "create"], "--account");
    let list = ok(&dir, &["token", "list"]);
    assert!(
        list.contains(&token[..8]) && !list.contains(&token),
        "{list}"
    );

    ok(&dir, &["plan", "create", "gold", "--retention-days", "21"]);
    fails(
        &dir,
        &["plan", "create", "huge", "--retention-days", "40"],
        "between 7 and 30",
    );
    fails(
        &dir,
        &["plan", "create", "gold", "--retention-days", "8"],
        "already exists",
    );
    ok(
        &dir,
        &[
            "plan",
            "set",
            "gold",
            "--retention-days",
            "10",
            "--window-start",
            "01:30",
        ],
    );
    ok(&dir, &["plan", "update", "gold", "--window-minutes", "60"]);
    fails(
        &dir,
        &["plan", "set", "nope", "--retention-days", "10"],
        "not found",
    );
    let plans = ok(&dir, &["plan", "list"]);
    assert!(
        plans
            .lines()
            .any(|l| l.contains("gold") && l.contains("10 d") && l.contains("01:30")),
        "{plans}"
    );

    let d = disk.to_str().unwrap();
    ok(
        &dir,
        &[
            "server",
            "add",
            "--id",
            "12345",
            "--name",
            "web-server-01",
            "--account",
            "acme",
            "--disk",
            d,
            "--plan",
            "gold",
            "--hostname",
            "web.example.com",
        ],
    );
    fails(
        &dir,
        &[
            "server",
            "add",
            "--id",
            "12345",
            "--name",
            "x",
            "--account",
            "acme",
            "--disk",
            d,
        ],
        "already exists",
    );
    fails(
        &dir,
        &[
            "server",
            "add",
            "--id",
            "7",
            "--name",
            "x",
            "--account",
            "acme",
            "--disk",
            "/nonexistent.img",
        ],
        "does not exist",
    );
    fails(
        &dir,
        &[
            "server",
            "add",
            "--id",
            "7",
            "--name",
            "x",
            "--account",
            "ghost",
            "--disk",
            d,
        ],
        "no account named",
    );
    fails(
        &dir,
        &[
            "server",
            "add",
            "--id",
            "7",
            "--name",
            "x",
            "--account",
            "acme",
            "--disk",
            d,
            "--plan",
            "ghost",
        ],
        "no plan named",
    );
    fails(
        &dir,
        &[
            "server",
            "add",
            "--id",
            "0",
            "--name",
            "x",
            "--account",
            "acme",
            "--disk",
            d,
        ],
        "positive",
    );
    ok(
        &dir,
        &[
            "server",
            "set",
            "12345",
            "--auto-backup",
            "off",
            "--window-start",
            "04:15",
        ],
    );
    let servers = ok(&dir, &["server", "list"]);
    let row = servers.lines().find(|l| l.contains("12345")).unwrap();
    assert!(
        row.contains("web-server-01")
            && row.contains("gold")
            && row.contains("off")
            && row.contains("04:15")
            && row.contains(d),
        "{row}"
    );

    ok(&dir, &["token", "revoke", &token]);
    fails(&dir, &["token", "revoke", &token], "no active token");
    fails(&dir, &["server", "remove", "999"], "not found");
    ok(&dir, &["server", "remove", "12345"]);
    assert!(!ok(&dir, &["server", "list"]).contains("web-server-01"));
}

#[test]
fn serve_demo_answers_the_seed_request_and_admin_commands_work_beside_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vpsbackup"))
        .args(["serve", "--demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addr = None;
    let mut token = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while token.is_none() {
        assert!(Instant::now() < deadline, "no token printed");
        let line = lines.next().expect("serve exited early").unwrap();
        if let Some(rest) = line.split("http://").nth(1) {
            addr.get_or_insert_with(|| rest.split('/').next().unwrap().to_owned());
        }
        if is_token(line.trim()) {
            token = Some(line.trim().to_owned());
        }
    }
    let (addr, token) = (addr.unwrap(), token.unwrap());

    // The seed's first example, with only host and token changed.
    let mut answer = (0, String::new());
    for _ in 0..100 {
        if let Ok(s) = TcpStream::connect(&addr) {
            drop(s);
            answer = http_get(&addr, "/api/v1/backups/?server_id=12345", &token);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(answer.0, 200, "{}", answer.1);
    assert!(answer.1.contains("\"count\""), "{}", answer.1);
    let (status, servers) = http_get(&addr, "/api/v1/servers/12345/", &token);
    assert_eq!(status, 200);
    assert!(servers.contains("web-server-01"), "{servers}");

    // The admin command line writes to the same catalog while serve runs.
    let disk = tmp.path().join("second.img");
    make_disk(&disk);
    ok(
        &dir,
        &[
            "server",
            "add",
            "--id",
            "2",
            "--name",
            "db-01",
            "--account",
            "demo",
            "--disk",
            disk.to_str().unwrap(),
        ],
    );
    let (_, list) = http_get(&addr, "/api/v1/servers/", &token);
    assert!(list.contains("\"count\":2"), "{list}");
    // The demo's image is recorded as raw, like the one added beside it.
    let servers = ok(&dir, &["server", "list"]);
    assert_eq!(
        servers.lines().filter(|l| l.contains("(raw)")).count(),
        2,
        "{servers}"
    );
    ok(&dir, &["token", "revoke", &token]);
    assert_eq!(http_get(&addr, "/api/v1/servers/", &token).0, 401);

    // A second serve on the same data dir is refused.
    fails(
        &dir,
        &["serve", "--listen", "127.0.0.1:0"],
        "another `vpsbackup serve`",
    );

    // SIGTERM: a clean stop.
    assert!(Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");

    // Running --demo again keeps the data and says how to get a token.
    let mut again = Command::new(env!("CARGO_BIN_EXE_vpsbackup"))
        .args(["serve", "--demo", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Keep reading stdout to its end: closing the pipe early would make serve's
    // next println fail.
    let mut out = BufReader::new(again.stdout.take().unwrap()).lines();
    let first = out.next().unwrap().unwrap();
    assert!(first.contains("already set up"), "{first}");
    Command::new("kill")
        .arg("-TERM")
        .arg(again.id().to_string())
        .status()
        .unwrap();
    assert!(again.wait().unwrap().success());
}

#[test]
fn server_add_records_each_disks_format() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let raw = tmp.path().join("disk.img");
    make_disk(&raw);
    let qcow = tmp.path().join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow)
        .arg("8M")
        .output()
        .unwrap();
    assert!(out.status.success());
    let (raw, qcow) = (raw.to_str().unwrap(), qcow.to_str().unwrap());
    ok(&dir, &["account", "create", "acme"]);
    fn add<'a>(id: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "server",
            "add",
            "--id",
            id,
            "--name",
            "s",
            "--account",
            "acme",
        ];
        args.extend_from_slice(extra);
        args
    }

    // Detected at add time.
    let out = ok(&dir, &add("1", &["--disk", raw, "--disk", qcow]));
    assert!(
        out.contains(&format!("{raw} (raw)")) && out.contains(&format!("{qcow} (qcow2)")),
        "{out}"
    );
    // Given: once for every disk, or once per disk.
    ok(&dir, &add("2", &["--disk", qcow, "--disk-format", "raw"]));
    ok(
        &dir,
        &add(
            "3",
            &[
                "--disk",
                raw,
                "--disk",
                qcow,
                "--disk-format",
                "raw",
                "--disk-format",
                "qcow2",
            ],
        ),
    );
    fails(
        &dir,
        &add(
            "4",
            &[
                "--disk",
                raw,
                "--disk",
                qcow,
                "--disk",
                raw,
                "--disk-format",
                "raw",
                "--disk-format",
                "raw",
            ],
        ),
        "once per --disk",
    );
    fails(
        &dir,
        &add("5", &["--disk", raw, "--disk-format", "block"]),
        "not block",
    );
    fails(
        &dir,
        &add("6", &["--disk", raw, "--disk-format", "vmdk"]),
        "vmdk",
    );

    let list = ok(&dir, &["server", "list"]);
    let row = |id: &str| {
        list.lines()
            .find(|l| l.trim_start().starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("no server {id}: {list}"))
            .to_owned()
    };
    assert!(
        row("1").contains(&format!("{raw} (raw) {qcow} (qcow2)")),
        "{list}"
    );
    assert!(row("2").contains(&format!("{qcow} (raw)")), "{list}");
    assert!(
        row("3").contains(&format!("{raw} (raw) {qcow} (qcow2)")),
        "{list}"
    );

    // Corrected later by the provider.
    let out = ok(&dir, &["server", "set", "2", "--disk-format", "qcow2"]);
    assert!(out.contains(&format!("{qcow} (qcow2)")), "{out}");
    fails(
        &dir,
        &[
            "server",
            "set",
            "1",
            "--disk-format",
            "raw",
            "--disk-format",
            "raw",
            "--disk-format",
            "raw",
        ],
        "once per disk",
    );
    fails(
        &dir,
        &["server", "set", "1", "--disk-format", "block"],
        "not block",
    );
}

#[test]
fn account_set_webhook_sets_generates_and_clears_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    ok(&dir, &["account", "create", "acme"]);

    // A given secret is not echoed.
    let out = ok(
        &dir,
        &[
            "account",
            "set",
            "acme",
            "--webhook-url",
            "https://hooks.example.com/vps",
            "--webhook-secret",
            "given-secret",
        ],
    );
    assert!(out.contains("https://hooks.example.com/vps"), "{out}");
    assert!(!out.contains("given-secret"), "{out}");
    let list = ok(&dir, &["account", "list"]);
    assert!(list.contains("https://hooks.example.com/vps"), "{list}");

    // Without one, a secret is generated and printed once, as the last line.
    let out = ok(
        &dir,
        &[
            "account",
            "set",
            "acme",
            "--webhook-url",
            "http://127.0.0.1:9000/hook",
        ],
    );
    let secret = last_line(&out);
    assert!(
        secret.starts_with("whsec_") && secret.len() == 6 + 44,
        "{out}"
    );
    assert!(ok(&dir, &["account", "list"]).contains("http://127.0.0.1:9000/hook"));

    ok(&dir, &["account", "set", "acme", "--no-webhook"]);
    let list = ok(&dir, &["account", "list"]);
    assert!(!list.contains("http://"), "{list}");

    fails(
        &dir,
        &[
            "account",
            "set",
            "acme",
            "--webhook-url",
            "ftp://x.example/",
        ],
        "http",
    );
    fails(
        &dir,
        &[
            "account",
            "set",
            "nobody",
            "--webhook-url",
            "https://x.example/",
        ],
        "not found",
    );
    fails(&dir, &["account", "set", "acme"], "--webhook-url");
    fails(
        &dir,
        &[
            "account",
            "set",
            "acme",
            "--webhook-url",
            "https://x.example/",
            "--no-webhook",
        ],
        "cannot be used with",
    );
}

/// The server's hooks as the catalog holds them.
fn stored_hooks(dir: &Path, id: i64) -> vpsbackup_catalog::Hooks {
    use vpsbackup_catalog::Catalog;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let cat = vpsbackup_service::open_catalog(dir, 1).await.unwrap();
            let s = cat
                .server(
                    vpsbackup_catalog::ServerId(id),
                    vpsbackup_catalog::Scope::All,
                )
                .await
                .unwrap()
                .unwrap();
            cat.close().await;
            s.hooks
        })
}

/// Setting one hook keeps the other three: a freeze left without its thaw
/// keeps the guest frozen.
#[test]
fn server_set_changes_only_the_hooks_it_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let disk = tmp.path().join("disk.img");
    make_disk(&disk);
    ok(&dir, &["account", "create", "acme"]);
    let d = disk.to_str().unwrap();
    ok(
        &dir,
        &[
            "server",
            "add",
            "--id",
            "7",
            "--name",
            "web",
            "--account",
            "acme",
            "--disk",
            d,
            "--pre-backup",
            "fsfreeze -f /",
            "--post-backup",
            "fsfreeze -u /",
            "--pre-restore",
            "virsh shutdown {name}",
            "--post-restore",
            "virsh start {name}",
        ],
    );
    let some = |s: &str| Some(s.to_owned());
    let out = ok(
        &dir,
        &["server", "set", "7", "--pre-backup", "sync; fsfreeze -f /"],
    );
    assert_eq!(
        stored_hooks(&dir, 7),
        vpsbackup_catalog::Hooks {
            pre_backup: some("sync; fsfreeze -f /"),
            post_backup: some("fsfreeze -u /"),
            pre_restore: some("virsh shutdown {name}"),
            post_restore: some("virsh start {name}"),
        }
    );
    // The operator sees every hook in effect after the change.
    assert!(
        out.contains("post_backup: fsfreeze -u /") && out.contains("sync; fsfreeze -f /"),
        "{out}"
    );
    // "" turns one hook off for this server (the global one too); --reset-hook
    // forgets the server's own so the global one applies again.
    ok(&dir, &["server", "set", "7", "--post-restore", ""]);
    ok(&dir, &["server", "set", "7", "--reset-hook", "pre-restore"]);
    assert_eq!(
        stored_hooks(&dir, 7),
        vpsbackup_catalog::Hooks {
            pre_backup: some("sync; fsfreeze -f /"),
            post_backup: some("fsfreeze -u /"),
            pre_restore: None,
            post_restore: some(""),
        }
    );
    fails(
        &dir,
        &[
            "server",
            "set",
            "7",
            "--reset-hook",
            "pre-backup",
            "--pre-backup",
            "x",
        ],
        "cannot be used with",
    );
    fails(
        &dir,
        &["server", "set", "7", "--reset-hook", "thaw"],
        "invalid value",
    );
}

/// Several `serve` started at the same instant on one data dir: exactly one
/// runs (two would each requeue the other's running jobs); the others exit
/// at once with a clear reason. Repeated, since a check-then-write race
/// only shows on some rounds.
#[test]
fn serves_started_together_on_one_data_dir_leave_exactly_one_running() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    ok(&dir, &["account", "create", "acme"]); // catalog migrated up front
    for round in 0..3 {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
        let spawners: Vec<_> = (0..4)
            .map(|_| {
                let (dir, barrier) = (dir.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    Command::new(env!("CARGO_BIN_EXE_vpsbackup"))
                        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
                        .arg(&dir)
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped())
                        .spawn()
                        .unwrap()
                })
            })
            .collect();
        let mut children: Vec<_> = spawners.into_iter().map(|t| t.join().unwrap()).collect();
        // The losers exit; give them time, then whoever still runs is serving.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let exited = children
                .iter_mut()
                .filter_map(|c| c.try_wait().unwrap())
                .count();
            if exited >= 3 || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(1500));
        let mut running = Vec::new();
        for mut c in children {
            match c.try_wait().unwrap() {
                None => running.push(c),
                Some(status) => {
                    let mut err = String::new();
                    c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                    assert!(!status.success(), "round {round}: a serve exited 0: {err}");
                    assert!(
                        err.contains("another `vpsbackup serve`"),
                        "round {round}: {err}"
                    );
                }
            }
        }
        let n = running.len();
        for c in &mut running {
            Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status()
                .unwrap();
        }
        for mut c in running {
            c.wait().unwrap();
        }
        assert_eq!(n, 1, "round {round}: {n} serves run on one data dir");
    }
}

#[test]
fn server_runtime_is_recorded_changed_and_shown() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let disk = tmp.path().join("disk.img");
    make_disk(&disk);
    let disk = disk.to_str().unwrap();
    ok(&dir, &["account", "create", "acme"]);
    let add = |id: &str, name: &str, extra: &[&str]| {
        let mut args = vec![
            "server",
            "add",
            "--id",
            id,
            "--name",
            name,
            "--account",
            "acme",
            "--disk",
            disk,
        ];
        args.extend_from_slice(extra);
        ok(&dir, &args)
    };
    let row = |list: &str, id: &str| {
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no row {id} in {list}"))
            .to_owned()
    };

    assert!(add("1", "plain", &[]).contains("runtime offline"));
    let out = add(
        "2",
        "vm2",
        &["--runtime", "qemu", "--qmp-socket", "/run/vm2.qmp"],
    );
    assert!(out.contains("runtime qemu (QMP /run/vm2.qmp)"), "{out}");
    // The domain defaults to the server's name.
    let out = add("3", "vm3", &["--runtime", "libvirt"]);
    assert!(out.contains("runtime libvirt (domain vm3)"), "{out}");

    // Incomplete or contradictory flags are refused and add nothing.
    fails(
        &dir,
        &[
            "server",
            "add",
            "--id",
            "4",
            "--name",
            "x",
            "--account",
            "acme",
            "--disk",
            disk,
            "--runtime",
            "qemu",
        ],
        "needs --qmp-socket",
    );
    fails(
        &dir,
        &[
            "server",
            "add",
            "--id",
            "4",
            "--name",
            "x",
            "--account",
            "acme",
            "--disk",
            disk,
            "--runtime",
            "offline",
            "--domain",
            "x",
        ],
        "no --qmp-socket or --domain",
    );
    fails(
        &dir,
        &[
            "server",
            "add",
            "--id",
            "4",
            "--name",
            "x",
            "--account",
            "acme",
            "--disk",
            disk,
            "--qmp-socket",
            "/q",
            "--domain",
            "x",
        ],
        "not both",
    );
    fails(
        &dir,
        &["server", "set", "1", "--runtime", "qemu"],
        "needs --qmp-socket",
    );

    let list = ok(&dir, &["server", "list"]);
    assert!(row(&list, "1").contains(" offline "), "{list}");
    assert!(row(&list, "2").contains(" qemu "), "{list}");
    assert!(list.contains("QMP socket /run/vm2.qmp"), "{list}");
    assert!(row(&list, "3").contains(" libvirt "), "{list}");
    assert!(!list
        .lines()
        .any(|l| l.split_whitespace().next() == Some("4")));

    // --qmp-socket alone moves a qemu server's socket (a relative path is
    // made absolute); --runtime offline clears it; --domain alone switches
    // to libvirt.
    let out = ok(&dir, &["server", "set", "2", "--qmp-socket", "vm2-new.qmp"]);
    let cwd = std::env::current_dir().unwrap();
    assert!(
        out.contains(&format!("QMP {}", cwd.join("vm2-new.qmp").display())),
        "{out}"
    );
    let out = ok(&dir, &["server", "set", "2", "--runtime", "offline"]);
    assert!(out.contains("runtime offline"), "{out}");
    let out = ok(&dir, &["server", "set", "1", "--domain", "guest-1"]);
    assert!(out.contains("runtime libvirt (domain guest-1)"), "{out}");
    let out = ok(
        &dir,
        &[
            "server",
            "set",
            "3",
            "--name",
            "renamed",
            "--runtime",
            "libvirt",
        ],
    );
    assert!(
        out.contains("(domain vm3)"),
        "a kept domain is not renamed: {out}"
    );

    let list = ok(&dir, &["server", "list"]);
    assert!(row(&list, "1").contains(" libvirt "), "{list}");
    assert!(row(&list, "2").contains(" offline "), "{list}");
    assert!(!list.contains("QMP socket"), "{list}");

    let status = ok(&dir, &["status"]);
    assert!(
        status.lines().next().unwrap().contains("RUNTIME"),
        "{status}"
    );
    assert!(row(&status, "1").contains("libvirt"), "{status}");
    assert!(row(&status, "2").contains("offline"), "{status}");
}
