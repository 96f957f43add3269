//! `vpsbackup` on a store in S3 (real Garage and Ceph radosgw servers):
//! the bare-store disaster-recovery commands, `serve` with the store in
//! config.toml and the admin commands beside it, a backup whose upload
//! fails for good, and the GC lock raced by real processes.

mod common;
#[path = "../../engine/tests/common/fault_proxy.rs"]
mod fault_proxy;
#[path = "../../engine/tests/common/s3.rs"]
mod s3;

use common::{incompressible_disk, same};
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn run(env: &[(String, String)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vpsbackup"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run vpsbackup")
}

fn ok(env: &[(String, String)], args: &[&str]) -> String {
    let out = run(env, args);
    assert!(
        out.status.success(),
        "vpsbackup {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn ok_json(env: &[(String, String)], args: &[&str]) -> Value {
    let out = ok(env, args);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Account "acme" with its server 1 (`vps-1`) on `disk`, in data dir `d`.
fn acme_with_server(env: &[(String, String)], d: &str, disk: &Path) {
    ok(env, &["--data-dir", d, "account", "create", "acme"]);
    let disk = p(disk);
    ok(
        env,
        &[
            "--data-dir",
            d,
            "server",
            "add",
            "--id",
            "1",
            "--name",
            "vps-1",
            "--account",
            "acme",
            "--disk",
            disk,
        ],
    );
}

/// `vpsbackup serve` on data dir `d`, on a free port, output discarded.
fn serve(env: &[(String, String)], d: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vpsbackup"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", d])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// SIGTERM to `child` (a graceful stop); waits for it.
fn terminate(mut child: Child) -> std::process::ExitStatus {
    assert!(Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success());
    child.wait().unwrap()
}

#[test]
fn bare_store_commands_round_trip_on_garage() {
    let t = tempfile::tempdir().unwrap();
    let srv = s3::garage();
    let (url, env) = srv.cli_env("cli");
    let img = t.path().join("disk.raw");
    incompressible_disk(&img, 4, 7);

    let b1 = ok_json(
        &env,
        &[
            "store",
            "backup",
            &url,
            "--id",
            "b1",
            "--server-id",
            "s1",
            "--disk",
            p(&img),
            "--json",
        ],
    );
    let puts = b1["requests"]["put"].as_u64().unwrap();
    assert!(
        (2..20).contains(&puts),
        "PUTs are per pack, not per chunk: {b1}"
    );
    let b2 = ok_json(
        &env,
        &[
            "store",
            "backup",
            &url,
            "--id",
            "b2",
            "--server-id",
            "s1",
            "--disk",
            p(&img),
            "--json",
        ],
    );
    assert!(
        b2["stored_bytes"].as_u64().unwrap() * 10 < b1["stored_bytes"].as_u64().unwrap(),
        "the second backup deduplicates: {b1} {b2}"
    );
    let human = ok(
        &env,
        &[
            "store",
            "backup",
            &url,
            "--id",
            "b3",
            "--server-id",
            "s1",
            "--disk",
            p(&img),
        ],
    );
    assert!(
        human.contains("store requests: ") && human.contains(" PUT"),
        "{human}"
    );

    let ls = ok_json(&env, &["store", "ls", &url, "--json"]);
    assert_eq!(ls["backups"].as_array().unwrap().len(), 3, "{ls}");
    let out = t.path().join("out.raw");
    ok_json(
        &env,
        &["store", "restore", &url, "b1", "--to", p(&out), "--json"],
    );
    assert!(same(&img, &out));
    let v = ok_json(&env, &["store", "verify", &url, "--json"]);
    assert_eq!(v["ok"], true, "{v}");

    ok(&env, &["store", "delete", &url, "b1"]);
    // Garage ignores If-None-Match: the store's GC lock proves nothing.
    let refused = run(&env, &["store", "gc", &url, "--grace", "0"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("--exclusive"), "{why}");
    ok_json(
        &env,
        &["store", "gc", &url, "--grace", "0", "--exclusive", "--json"],
    );
    let out2 = t.path().join("out2.raw");
    ok_json(
        &env,
        &["store", "restore", &url, "b2", "--to", p(&out2), "--json"],
    );
    assert!(same(&img, &out2));
    ok_json(&env, &["store", "rebuild-index", &url, "--json"]);
    let stats = ok(&env, &["store", "stats", &url]);
    assert!(stats.contains("conditional writes ignored"), "{stats}");

    // A prefix with no store in it is no store, and nothing is created.
    let (empty, _) = srv.cli_env("nothing");
    let out = run(&env, &["store", "ls", &empty]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a vpsbackup store"));
    // Bad keys: a plain error that never shows them.
    let mut bad = env.clone();
    for (k, v) in &mut bad {
        if k == "AWS_SECRET_ACCESS_KEY" {
            *v = "f".repeat(64);
        }
    }
    let out = run(&bad, &["store", "ls", &url]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains(&"f".repeat(64)) && !text.contains(&srv.secret_access_key),
        "{text}"
    );
}

/// Starts a GC command that holds the lock 5 s once taken, so racers overlap.
fn racing_gc(env: &[(String, String)], args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vpsbackup"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("VPSBACKUP_TEST_GC_HOLD_MS", "5000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs `n` copies of a GC command at once: (winners, losers' stderr).
fn race(env: &[(String, String)], args: &[&str], n: usize) -> (usize, Vec<String>) {
    let children: Vec<Child> = (0..n).map(|_| racing_gc(env, args)).collect();
    let mut wins = 0;
    let mut lost = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        if out.status.success() {
            wins += 1;
        } else {
            lost.push(String::from_utf8_lossy(&out.stderr).into_owned());
        }
    }
    (wins, lost)
}

#[test]
fn processes_racing_for_the_gc_lock_on_ceph_have_one_winner() {
    let t = tempfile::tempdir().unwrap();
    let (url, env) = s3::ceph().cli_env("race");
    let img = t.path().join("disk.raw");
    incompressible_disk(&img, 2, 3);
    ok(
        &env,
        &[
            "store",
            "backup",
            &url,
            "--id",
            "b1",
            "--server-id",
            "s1",
            "--disk",
            p(&img),
        ],
    );
    let stats = ok(&env, &["store", "stats", &url]);
    assert!(stats.contains("conditional writes honoured"), "{stats}");
    let (wins, lost) = race(&env, &["store", "gc", &url, "--grace", "0"], 4);
    assert_eq!(wins, 1, "exactly one GC wins the lock: {lost:?}");
    for l in &lost {
        assert!(l.contains("another garbage collection is running"), "{l}");
    }
}

#[test]
fn serve_backs_up_to_garage_and_the_admin_commands_follow() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("data");
    let srv = s3::garage();
    let (url, mut env) = srv.cli_env("serve");
    // The store in config.toml; endpoint and region there too, keys from
    // the environment only.
    env.retain(|(k, _)| k.starts_with("AWS_"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "store = \"{url}\"\ns3_endpoint = \"{}\"\ns3_region = \"{}\"\n[schedule]\ntick_secs = 1\ngc_grace_secs = 0\nverify_interval_days = 0\n",
            srv.endpoint, srv.region
        ),
    )
    .unwrap();
    let d = p(&dir);
    let disk = t.path().join("vps1.img");
    incompressible_disk(&disk, 3, 5);
    acme_with_server(&env, d, &disk);
    let status = ok(&env, &["--data-dir", d, "status"]);
    assert!(
        status.contains(&format!("Store location: {url}")) && status.contains("lock file"),
        "{status}"
    );

    // serve's scheduler takes the (catch-up) automatic backup at once.
    let child = serve(&env, d);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = ok(&env, &["--data-dir", d, "status"]);
        if s.contains("completed") {
            break;
        }
        assert!(Instant::now() < deadline, "no automatic backup: {s}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let verified = ok(&env, &["--data-dir", d, "verify"]);
    assert!(
        verified.contains("1 backups verified, 0 damaged"),
        "{verified}"
    );
    let gc = ok(&env, &["--data-dir", d, "gc"]);
    assert!(gc.starts_with("GC freed"), "{gc}");
    // Two GCs of one data dir at once: the data dir's lock file lets one
    // through (Garage's conditional writes cannot).
    let (wins, lost) = race(&env, &["--data-dir", d, "gc"], 2);
    assert_eq!(wins, 1, "{lost:?}");
    assert!(
        lost[0].contains("another garbage collection is running"),
        "{lost:?}"
    );

    let out = t.path().join("restored.img");
    ok(
        &env,
        &["--data-dir", d, "restore", "--backup", "1", "--to", p(&out)],
    );
    assert!(same(&disk, &out));
    // The store alone, as after losing the data dir: the same backup.
    let (_, flags) = srv.cli_env("unused");
    let mut bare = env.clone();
    bare.extend(flags.into_iter().filter(|(k, _)| !k.starts_with("AWS_")));
    let ls = ok_json(&bare, &["store", "ls", &url, "--json"]);
    assert_eq!(ls["backups"].as_array().unwrap().len(), 1, "{ls}");

    assert!(terminate(child).success());
}

/// `serve`'s backup loses its link to the store part-way through the
/// upload, for good: the job ends failed with the plain reason the customer
/// sees (the operator gets the detail), and no manifest is left.
#[test]
fn a_backup_whose_upload_fails_for_good_ends_failed_with_a_plain_reason() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("data");
    let srv = s3::garage();
    let cfg = srv.config("upload-fails");
    let url = format!("s3://{}/{}", cfg.bucket, cfg.prefix);
    let proxy = fault_proxy::FaultProxy::start(&srv.endpoint, 17);
    // Every request held a while: the backup is still uploading when the
    // link goes down.
    proxy.set_faults(0, 1000);
    let env = vec![
        ("AWS_ACCESS_KEY_ID".to_owned(), srv.access_key_id.clone()),
        (
            "AWS_SECRET_ACCESS_KEY".to_owned(),
            srv.secret_access_key.clone(),
        ),
    ];
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "store = \"{url}\"\ns3_endpoint = \"{}\"\ns3_region = \"{}\"\n[schedule]\ntick_secs = 1\nverify_interval_days = 0\n",
            proxy.endpoint(),
            srv.region
        ),
    )
    .unwrap();
    let d = p(&dir);
    // A raw disk of 48 MiB (several packs): past the first, the link is down.
    let disk = t.path().join("vps1.img");
    std::fs::write(&disk, common::incompressible_bytes(48, 9)).unwrap();
    acme_with_server(&env, d, &disk);
    let direct = vpsbackup_engine::S3Storage::open(cfg.clone()).unwrap();
    let child = serve(&env, d);
    // The link goes down for good once the first pack is stored.
    let deadline = Instant::now() + Duration::from_secs(120);
    while vpsbackup_engine::Storage::list(&direct, "packs/")
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "no pack was ever uploaded");
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.set_down(true);
    let failures = loop {
        let f = ok(&env, &["--data-dir", d, "failures"]);
        if f.contains("customer sees") {
            break f;
        }
        assert!(Instant::now() < deadline, "the backup never failed: {f}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        failures.contains("customer sees: The backup store could not be read or written."),
        "{failures}"
    );
    // The operator's detail names the store operation that gave up.
    assert!(
        failures.contains("detail:") && !failures.contains("(none recorded)"),
        "{failures}"
    );
    terminate(child);
    proxy.set_down(false);
    // No manifest: the store lists no backup, though packs were uploaded.
    assert!(vpsbackup_engine::Storage::list(&direct, "backups/")
        .unwrap()
        .is_empty());
    assert!(!vpsbackup_engine::Storage::list(&direct, "packs/")
        .unwrap()
        .is_empty());
}
