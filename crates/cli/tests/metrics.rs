//! `vpsbackup serve --metrics-listen`: the operational endpoints on a second
//! listener of the real binary, over real HTTP (curl); `/metrics` scraped and
//! parsed while real backups and a restore of real ext4 images run.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

mod common;
use common::{add_server, free_port, incompressible_disk, ok, same, wait_for, Serve};

/// One sample of the exposition: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A small parser of the Prometheus text format: every sample line, and a
/// check that each belongs to a family with `# HELP` and `# TYPE` lines.
fn parse(text: &str) -> Vec<Sample> {
    let mut typed: Vec<String> = Vec::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap().to_owned();
            let kind = parts.next().unwrap();
            assert!(
                ["counter", "gauge", "histogram", "unknown"].contains(&kind),
                "{line}"
            );
            typed.push(name);
            continue;
        }
        if line.starts_with('#') {
            assert!(line.starts_with("# HELP "), "{line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                let mut labels = BTreeMap::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (key, after) = rest.split_once("=\"").unwrap();
                    let end = after.find('"').unwrap();
                    labels.insert(key.to_owned(), after[..end].to_owned());
                    rest = after[end + 1..].trim_start_matches(',');
                }
                (name.to_owned(), labels)
            }
        };
        assert!(
            typed.iter().any(|t| name == *t
                || ["_bucket", "_sum", "_count", "_total"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(t.as_str()))),
            "no # TYPE for {name}"
        );
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

/// The value of the sample `name` whose labels include `labels` (0 if none).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .find(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map_or(0.0, |s| s.value)
}

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
    // /metrics: open on the operational listener; on the public one only
    // when the operator set a metrics token, and none is set here.
    let (code, text) = fetch(&format!("{ops}/metrics"), &[]);
    assert_eq!(code, 200);
    assert!(!parse(&text).is_empty());
    assert_eq!(fetch(&format!("{api}/metrics"), &[&auth]).0, 404);
}

#[test]
fn metrics_follow_real_backups_and_a_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let token = account(&dir);
    let (disk_a, disk_b) = (tmp.path().join("a.img"), tmp.path().join("b.img"));
    incompressible_disk(&disk_a, 2, 0x9e37_79b9_7f4a_7c15);
    incompressible_disk(&disk_b, 2, 0x2545_f491_4f6c_dd1d);
    add_server(&dir, "11", &disk_a, &[]);
    add_server(&dir, "12", &disk_b, &[]);
    // One worker and a pre-backup hook that waits: the second backup queues
    // behind the first, and each takes at least two seconds.
    let metrics_token = "provider-metrics-secret-31415";
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "workers = 1\n[schedule]\nenabled = false\n[hooks]\npre_backup = \"sleep 2\"\n\
             [metrics]\ntoken = \"{metrics_token}\"\n"
        ),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let serve = Serve::start_with(&[], &dir, &token, &["--metrics-listen", &listen]);
    let scrape_url = format!("http://{listen}/metrics");
    let scrape = || {
        let (code, text) = fetch(&scrape_url, &[]);
        assert_eq!(code, 200, "{text}");
        (parse(&text), text)
    };
    let node = String::from_utf8(Command::new("uname").arg("-n").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_owned();
    let heartbeat = "vpsbackup_node_last_heartbeat_timestamp_seconds";
    wait_for("a worker heartbeat", || {
        value(&scrape().0, heartbeat, &[("node", &node)]) > 0.0
    });
    let (before, _) = scrape();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((value(&before, heartbeat, &[("node", &node)]) - now).abs() < 30.0);
    let queue = |s: &[Sample], kind: &str, state: &str| {
        value(
            s,
            "vpsbackup_queue_jobs",
            &[("kind", kind), ("state", state)],
        )
    };
    assert_eq!(queue(&before, "backup", "queued"), 0.0);
    assert_eq!(queue(&before, "restore", "running"), 0.0);
    assert_eq!(value(&before, "vpsbackup_store_backups", &[]), 0.0);
    assert_eq!(value(&before, "vpsbackup_catalog_up", &[]), 1.0);

    // Two backups: one runs (in its hook), the other waits in the queue.
    let mut backups = Vec::new();
    for id in ["11", "12"] {
        let (code, body) = serve.call(
            "POST",
            "/backups/",
            &token,
            Some(&format!("{{\"server_id\": {id}}}")),
        );
        assert_eq!(code, 201, "{body}");
        backups.push(body["id"].as_i64().unwrap());
    }
    wait_for("one backup running and one queued", || {
        let s = scrape().0;
        queue(&s, "backup", "running") == 1.0
            && queue(&s, "backup", "queued") == 1.0
            && value(&s, "vpsbackup_worker_jobs_running", &[("kind", "backup")]) == 1.0
    });
    // The first holds the only worker for two seconds at least.
    wait_for("the queued backup to have waited a second", || {
        let s = scrape().0;
        assert_eq!(queue(&s, "backup", "queued"), 1.0, "it ran too soon");
        value(&s, "vpsbackup_queue_oldest_due_age_seconds", &[]) >= 1.0
    });
    for id in &backups {
        wait_for("the backup to complete", || {
            serve.get(&format!("/backups/{id}/"), &token)["status"] == "completed"
        });
    }
    let (after, text) = scrape();
    let completed = [("kind", "backup"), ("outcome", "completed")];
    assert_eq!(
        value(&after, "vpsbackup_jobs_finished_total", &completed),
        2.0
    );
    assert_eq!(
        value(&after, "vpsbackup_job_duration_seconds_count", &completed),
        2.0
    );
    // Each ran its two-second hook.
    assert!(value(&after, "vpsbackup_job_duration_seconds_sum", &completed) >= 4.0);
    assert_eq!(value(&after, "vpsbackup_backup_read_bytes_count", &[]), 2.0);
    // Two disks of 2 MiB of random data each, all read and all stored.
    assert!(value(&after, "vpsbackup_backup_read_bytes_sum", &[]) >= 4.0 * 1048576.0);
    assert!(value(&after, "vpsbackup_backup_stored_bytes_sum", &[]) >= 4.0 * 1048576.0);
    assert_eq!(value(&after, "vpsbackup_store_backups", &[]), 2.0);
    assert!(value(&after, "vpsbackup_store_stored_bytes", &[]) >= 4.0 * 1048576.0);
    assert!(value(&after, "vpsbackup_store_dedup_ratio", &[]) > 0.0);
    assert_eq!(queue(&after, "backup", "running"), 0.0);
    assert_eq!(
        value(
            &after,
            "vpsbackup_worker_jobs_running",
            &[("kind", "backup")]
        ),
        0.0
    );
    // Requests by route template: two creates, and the polls of both
    // backups under one series, never one per id.
    let post = [
        ("method", "POST"),
        ("route", "/api/v1/backups"),
        ("status", "201"),
    ];
    assert_eq!(value(&after, "vpsbackup_http_requests_total", &post), 2.0);
    let polls = [
        ("method", "GET"),
        ("route", "/api/v1/backups/{backup_id}"),
        ("status", "200"),
    ];
    assert!(value(&after, "vpsbackup_http_requests_total", &polls) >= 2.0);
    assert_eq!(
        value(
            &after,
            "vpsbackup_http_request_duration_seconds_count",
            &[("method", "POST"), ("route", "/api/v1/backups")]
        ),
        2.0
    );

    // A restore over a damaged disk brings its bytes back and is counted.
    let original = tmp.path().join("a-original.img");
    std::fs::copy(&disk_a, &original).unwrap();
    std::fs::write(&disk_a, vec![0xa5u8; 8 << 20]).unwrap();
    let (code, body) = serve.call(
        "POST",
        "/servers/11/restore/",
        &token,
        Some(&format!("{{\"backup_id\": {}}}", backups[0])),
    );
    assert_eq!(code, 202, "{body}");
    let restore = body["id"].as_i64().unwrap();
    wait_for("the restore to complete", || {
        serve.get(&format!("/restores/{restore}/"), &token)["status"] == "completed"
    });
    assert!(same(&disk_a, &original), "restored bytes differ");
    let (restored, _) = scrape();
    assert_eq!(
        value(
            &restored,
            "vpsbackup_jobs_finished_total",
            &[("kind", "restore"), ("outcome", "completed")]
        ),
        1.0
    );

    // An unknown path counts as one "unmatched" route, whatever the path.
    for n in 0..3 {
        serve.call("GET", &format!("/no-such-thing/{n}/"), &token, None);
    }
    let (last, text2) = scrape();
    assert_eq!(
        value(
            &last,
            "vpsbackup_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ),
        3.0
    );
    // No customer data in the figures: no server or account names, no
    // token, no host path, no raw request path.
    let raw_path = format!("/backups/{}", backups[0]);
    for t in [&text, &text2] {
        for secret in [
            "vps-11",
            "vps-12",
            "acme",
            token.as_str(),
            metrics_token,
            tmp.path().to_str().unwrap(),
            "no-such-thing",
            raw_path.as_str(),
        ] {
            assert!(!t.contains(secret), "{secret:?} in the metrics");
        }
    }

    // The same figures on the public listener, for the metrics token only.
    let api = serve.base.trim_end_matches("/api/v1");
    let public = format!("{api}/metrics");
    assert_eq!(fetch(&public, &[]).0, 401);
    assert_eq!(
        fetch(&public, &[&format!("Authorization: Bearer {token}")]).0,
        401,
        "a customer token is not the metrics token"
    );
    let (code, text) = fetch(
        &public,
        &[&format!("Authorization: Bearer {metrics_token}")],
    );
    assert_eq!(code, 200);
    assert_eq!(
        value(&parse(&text), "vpsbackup_jobs_finished_total", &completed),
        2.0
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

/// The node line of `vpsbackup status`, split into its columns.
fn node_line(dir: &Path, node: &str) -> (String, String) {
    let status = ok(dir, &["status"]);
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{node} ")))
        .unwrap_or_else(|| panic!("no line for node {node}: {status}"))
        .to_owned();
    (line, status)
}

#[test]
fn status_shows_this_node_and_flags_it_without_a_live_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let token = account(&dir);
    let disk = tmp.path().join("a.img");
    incompressible_disk(&disk, 2, 0x9e37_79b9_7f4a_7c15);
    add_server(&dir, "21", &disk, &[]);
    std::fs::write(
        dir.join("config.toml"),
        "[schedule]\nenabled = false\n[hooks]\npre_backup = \"sleep 3\"\n",
    )
    .unwrap();
    let node = String::from_utf8(Command::new("uname").arg("-n").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_owned();

    // Before any serve ran here.
    let (line, status) = node_line(&dir, &node);
    assert!(status.contains("NODE  STATE"), "{status}");
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        cols[1..],
        ["NO", "LIVE", "WORKER", "-", "never", "-", "0", "1"],
        "{status}"
    );
    assert!(
        status.contains(&format!(
            "Node {node} has no live worker: no worker ever ran there."
        )),
        "{status}"
    );

    // serve runs: its two workers are live, and a running backup shows.
    let serve = Serve::start(&dir, &token);
    wait_for("the node to be live", || {
        node_line(&dir, &node).0.split_whitespace().nth(1) == Some("live")
    });
    let (code, body) = serve.call("POST", "/backups/", &token, Some("{\"server_id\": 21}"));
    assert_eq!(code, 201, "{body}");
    let mut seen = String::new();
    wait_for("the node to run the backup", || {
        let (line, status) = node_line(&dir, &node);
        seen = status;
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols[1] == "live"
            && cols[2] == "serve"
            && cols[4] == "2/2"
            && cols[5] == "1"
            && cols[6] == "1"
    });
    assert!(!seen.contains("has no live worker"), "{seen}");
    let id = body["id"].as_i64().unwrap();
    wait_for("the backup to complete", || {
        serve.get(&format!("/backups/{id}/"), &token)["status"] == "completed"
    });

    // A graceful stop is recorded: the node is flagged at once.
    serve.stop();
    let (line, status) = node_line(&dir, &node);
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols[1..5], ["NO", "LIVE", "WORKER", "serve"], "{status}");
    assert_eq!(cols[6..], ["-", "0", "1"], "{status}");
    assert!(
        status.contains(&format!(
            "Node {node} has no live worker: its serve stopped at "
        )),
        "{status}"
    );
}
