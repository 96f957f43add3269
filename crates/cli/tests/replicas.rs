//! API replicas (issue 10, part 4), through real processes: two `serve`
//! replicas on one PostgreSQL database and one store, both with their
//! schedulers on and one simulated clock (a file both read,
//! `VPSBACKUP_TEST_CLOCK_FILE`), across three simulated days. Exactly one
//! of them leads (the `vpsbackup_scheduler_leader` gauge, `vpsbackup
//! status`); each server gets exactly one automatic backup a day; after
//! kill -9 of the leader the other takes scheduling over within a minute;
//! a webhook receiver (a real HTTP listener here) gets each event once.
//! On SQLite the one process always leads.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::{add_server, ext4_image, free_port, ok, wait_for, PgDatabase, Serve};

/// A webhook receiver: answers 200 to every POST and records its
/// `Webhook-Id`s in arrival order.
fn receiver() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got: Arc<Mutex<Vec<String>>> = Default::default();
    let seen = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let (mut id, mut length) = (None, 0usize);
                let mut line = String::new();
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = l.split_once(':') {
                        match k.trim().to_ascii_lowercase().as_str() {
                            "webhook-id" => id = Some(v.trim().to_owned()),
                            "content-length" => length = v.trim().parse().unwrap_or(0),
                            _ => {}
                        }
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                if let Some(id) = id {
                    seen.lock().unwrap().push(id);
                }
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            });
        }
    });
    (port, got)
}

/// The `vpsbackup_scheduler_leader` gauge of the ops listener on `port`
/// (None: no answer).
fn leader_gauge(port: u16) -> Option<i64> {
    let out = std::process::Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("vpsbackup_scheduler_leader "))
        .and_then(|v| v.trim().parse().ok())
}

/// Automatic backups per server, through one replica: (count, all completed).
fn automatic(serve: &Serve, tok: &str, servers: &[i64]) -> HashMap<i64, (usize, bool)> {
    servers
        .iter()
        .map(|&s| {
            let l = serve.get(
                &format!("/backups/?server_id={s}&backup_type=automatic"),
                tok,
            );
            let items = l["results"].as_array().unwrap();
            (
                s,
                (
                    l["count"].as_u64().unwrap() as usize,
                    items.iter().all(|b| b["status"] == "completed"),
                ),
            )
        })
        .collect()
}

/// Waits for every server's `day`-th automatic backup to complete, then
/// checks no second one of any day comes over a few more scheduler ticks.
fn one_backup_a_day(serve: &Serve, tok: &str, servers: &[i64], days: usize) {
    wait_for(&format!("day {days}'s automatic backups"), || {
        automatic(serve, tok, servers)
            .values()
            .all(|&(n, done)| n >= days && done)
    });
    std::thread::sleep(Duration::from_secs(4));
    let now = automatic(serve, tok, servers);
    for (s, (n, _)) in now {
        assert_eq!(n, days, "server {s} after {days} simulated days");
    }
}

fn set_clock(file: &Path, t: time::OffsetDateTime) {
    std::fs::write(file, t.unix_timestamp().to_string()).unwrap();
}

fn config(dir: &Path, store: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "store = {:?}\nworkers = 2\n\n[schedule]\ntick_secs = 1\nverify_interval_days = 0\ngc_interval_hours = 0\n",
            store.to_str().unwrap()
        ),
    )
    .unwrap();
}

#[test]
fn two_replicas_schedule_once_a_day_hand_over_on_kill_and_send_each_event_once() {
    let db = PgDatabase::create();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = t.join("store");
    let (dir_a, dir_b) = (t.join("a"), t.join("b"));
    config(&dir_a, &store);
    config(&dir_b, &store);
    let pg = |dir: &Path, args: &[&str]| {
        let mut all = vec!["--database-url", db.url.as_str()];
        all.extend_from_slice(args);
        ok(dir, &all)
    };
    pg(&dir_a, &["account", "create", "acme"]);
    let tok = pg(&dir_a, &["token", "create", "--account", "acme"])
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned();
    let (hook_port, received) = receiver();
    pg(
        &dir_a,
        &[
            "account",
            "set",
            "acme",
            "--webhook-url",
            &format!("http://127.0.0.1:{hook_port}/hook"),
        ],
    );
    let servers = [101, 102, 103];
    for s in servers {
        let disk = t.join(format!("vps{s}.img"));
        ext4_image(&disk, "site.txt", format!("server {s}").as_bytes());
        add_server(&dir_a, &s.to_string(), &disk, &["--database-url", &db.url]);
    }

    // Day 1 begins in the simulated future (after the servers were added),
    // late in the day: every server's window has passed, its slot is due.
    let clock = t.join("clock");
    let today = time::OffsetDateTime::now_utc().replace_time(time::Time::MIDNIGHT);
    let day = |n: i64| today + time::Duration::days(n) + time::Duration::hours(23);
    set_clock(&clock, day(1));
    let env_db = format!("VPSBACKUP_DATABASE_URL={}", db.url);
    let env_clock = format!("VPSBACKUP_TEST_CLOCK_FILE={}", clock.display());
    let prefix = ["env", env_db.as_str(), env_clock.as_str()];
    let (port_a, port_b) = (free_port(), free_port());
    let ops = |p: u16| format!("127.0.0.1:{p}");
    let (ops_a, ops_b) = (ops(port_a), ops(port_b));
    let a = Serve::start_with(&prefix, &dir_a, &tok, &["--metrics-listen", &ops_a]);
    let b = Serve::start_with(&prefix, &dir_b, &tok, &["--metrics-listen", &ops_b]);

    // Exactly one leads.
    wait_for("a leader", || {
        matches!(
            (leader_gauge(port_a), leader_gauge(port_b)),
            (Some(1), Some(0)) | (Some(0), Some(1))
        )
    });
    for _ in 0..5 {
        let both = (leader_gauge(port_a), leader_gauge(port_b));
        assert!(
            matches!(both, (Some(1), Some(0)) | (Some(0), Some(1))),
            "{both:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    one_backup_a_day(&a, &tok, &servers, 1);
    set_clock(&clock, day(2));
    one_backup_a_day(&b, &tok, &servers, 2);
    // Every event so far delivered before a replica dies (an attempt cut
    // by kill -9 would rightly be made again, by the other).
    wait_for("six events delivered", || {
        received.lock().unwrap().len() >= 6
    });

    let a_leads = leader_gauge(port_a) == Some(1);
    let (leader, survivor, survivor_port) = if a_leads {
        (a, b, port_b)
    } else {
        (b, a, port_a)
    };
    assert_eq!(leader_gauge(survivor_port), Some(0));
    let survivor_pid = survivor.pid();
    let killed = Instant::now();
    leader.kill9();
    wait_for("the other replica to take scheduling over", || {
        leader_gauge(survivor_port) == Some(1)
    });
    let takeover = killed.elapsed();
    eprintln!("leadership moved {takeover:?} after kill -9");
    assert!(takeover < Duration::from_secs(60), "{takeover:?}");

    set_clock(&clock, day(3));
    one_backup_a_day(&survivor, &tok, &servers, 3);
    let status = pg(&dir_b, &["status"]);
    assert!(
        status.contains("Scheduler leader: node=")
            && status.contains(&format!("pid={survivor_pid} ")),
        "{status}"
    );

    // Nine outcomes, nine events, each POSTed once.
    wait_for("nine events delivered", || {
        received.lock().unwrap().len() >= 9
    });
    std::thread::sleep(Duration::from_secs(3));
    let got = received.lock().unwrap().clone();
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for id in &got {
        *per_id.entry(id).or_default() += 1;
    }
    assert_eq!(per_id.len(), 9, "{got:?}");
    assert!(
        per_id.values().all(|&n| n == 1),
        "an event sent twice: {got:?}"
    );
    survivor.stop();
}

#[test]
fn on_sqlite_the_one_serve_leads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    config(&dir, &tmp.path().join("store"));
    ok(&dir, &["account", "create", "acme"]);
    let tok = ok(&dir, &["token", "create", "--account", "acme"])
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned();
    let port = free_port();
    let serve = Serve::start_with(
        &[],
        &dir,
        &tok,
        &["--metrics-listen", &format!("127.0.0.1:{port}")],
    );
    wait_for("the leader gauge", || leader_gauge(port) == Some(1));
    let pid = serve.pid();
    wait_for("the leader in status", || {
        let status = ok(&dir, &["status"]);
        status.contains("Scheduler leader: node=") && status.contains(&format!("pid={pid} "))
    });
    serve.stop();
}
