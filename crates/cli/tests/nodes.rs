//! Nodes, agents and job leases (issue 10, parts 2, 3 and 7) over real
//! processes: two API replicas (`serve --workers 0`) and one `vpsbackup
//! agent` per node on one PostgreSQL database and one store directory.
//! Nodes are names here: every agent runs on this machine, each with the
//! disks of its own servers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{
    add_server, ext4_image, free_port, ok, psql_value, same, vpsbackup, wait_for, PgDatabase, Serve,
};

/// `vpsbackup --data-dir DIR --database-url URL --store STORE ARGS...`,
/// which must succeed.
fn ok_at(p: &Place, dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["--database-url", &p.db.url, "--store", p.store_arg()];
    all.extend_from_slice(args);
    ok(dir, &all)
}

/// One cluster's shared parts: the database, the store, a scratch dir.
struct Place {
    db: PgDatabase,
    tmp: tempfile::TempDir,
    store: String,
    token: String,
}

impl Place {
    fn new() -> Place {
        let db = PgDatabase::create();
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store").to_string_lossy().into_owned();
        let admin = tmp.path().join("admin");
        let mut p = Place {
            db,
            tmp,
            store,
            token: String::new(),
        };
        ok_at(&p, &admin, &["account", "create", "acme"]);
        p.token = ok_at(&p, &admin, &["token", "create", "--account", "acme"])
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_owned();
        p
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn store_arg(&self) -> &str {
        &self.store
    }

    /// A data dir of its own for one process, with no scheduler (its
    /// automatic catch-up backups would add jobs to the ones under test).
    fn data_dir(&self, name: &str) -> PathBuf {
        let dir = self.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.toml"), "[schedule]\nenabled = false\n").unwrap();
        dir
    }

    /// An API replica: `serve --workers 0` (API, lease sweeper, no workers).
    fn replica(&self, name: &str) -> Serve {
        let dir = self.data_dir(name);
        let env = format!("VPSBACKUP_DATABASE_URL={}", self.db.url);
        Serve::start_with(
            &["env", &env],
            &dir,
            &self.token,
            &["--workers", "0", "--store", &self.store],
        )
    }

    /// `server add` of server `id` on `node`, with `disk`.
    fn add_server_on(&self, id: &str, disk: &Path, node: &str) {
        let admin = self.path("admin");
        let out = add_server(
            &admin,
            id,
            disk,
            &["--database-url", &self.db.url, "--node", node],
        );
        assert!(out.contains(&format!("node {node}")), "{out}");
    }

    /// One row of the jobs of `backup`: `state|attempts|node|claimed_by`.
    fn job_of(&self, backup: i64) -> String {
        psql_value(
            &self.db.url,
            &format!(
                "SELECT state || '|' || attempts || '|' || COALESCE(node, '') || '|' || COALESCE(claimed_by, '') \
                 FROM jobs WHERE backup_id = {backup} AND kind = 'backup'"
            ),
        )
    }
}

/// A running `vpsbackup agent`; SIGKILLed on drop if still running.
struct Agent {
    child: Child,
    metrics: String,
}

impl Agent {
    fn start(p: &Place, node: &str, extra: &[&str]) -> Agent {
        let dir = p.data_dir(&format!("agent-{node}"));
        let port = free_port();
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vpsbackup"))
            .args(["--data-dir"])
            .arg(&dir)
            .args(["--database-url", &p.db.url, "--store", &p.store])
            .args(["agent", "--node", node, "--workers", "1"])
            .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let agent = Agent {
            child,
            metrics: format!("http://127.0.0.1:{port}"),
        };
        wait_for("the agent to be ready", || agent.http("/readyz") == 200);
        agent
    }

    /// The status code of a GET on the agent's metrics listener.
    fn http(&self, path: &str) -> u16 {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("{}{path}", self.metrics))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for backup `id` to end (read through `api`); returns its status.
fn wait_backup(api: &Serve, token: &str, id: i64, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let b = api.get(&format!("/backups/{id}/"), token);
        let status = b["status"].as_str().unwrap().to_owned();
        if status != "in_progress" {
            return status;
        }
        assert!(Instant::now() < deadline, "backup {id} still running: {b}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Restores backup `id` over server `server`'s disk through `api` and
/// waits for it to complete.
fn restore(api: &Serve, token: &str, server: i64, id: i64) {
    let (code, r) = api.call(
        "POST",
        &format!("/servers/{server}/restore/"),
        token,
        Some(&format!("{{\"backup_id\": {id}}}")),
    );
    assert_eq!(code, 202, "{r}");
    let rid = r["id"].as_i64().unwrap();
    wait_for("the restore to complete", || {
        let r = api.get(&format!("/restores/{rid}/"), token);
        assert_ne!(r["status"], "failed", "{r}");
        r["status"] == "completed"
    });
}

/// Overwrites the start of an image (the restore must bring it back).
fn scribble(disk: &Path) {
    use std::io::{Seek, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    f.seek(std::io::SeekFrom::Start(0)).unwrap();
    f.write_all(&vec![0xa5; 2 << 20]).unwrap();
    f.sync_all().unwrap();
}

/// A raw disk of `mib` MiB of incompressible bytes (xorshift64 from `seed`).
fn random_disk(path: &Path, mib: usize, seed: u64) {
    let mut x = seed;
    let data: Vec<u8> = (0..mib * 1024 * 1024 / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(path, data).unwrap();
}

#[test]
fn two_replicas_and_two_agents_run_each_nodes_jobs() {
    let p = Place::new();
    let (disk1, disk2) = (p.path("vps1.img"), p.path("vps2.img"));
    ext4_image(&disk1, "a.txt", b"server one, on node n1");
    ext4_image(&disk2, "b.txt", b"server two, on node n2");
    p.add_server_on("1", &disk1, "n1");
    p.add_server_on("2", &disk2, "n2");
    let list = ok_at(&p, &p.path("admin"), &["server", "list"]);
    assert!(
        list.lines()
            .any(|l| l.contains("vps-1 ") && l.contains(" n1 ")),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.contains("vps-2 ") && l.contains(" n2 ")),
        "{list}"
    );

    let r1 = p.replica("r1");
    let r2 = p.replica("r2");
    // No agent yet: the API replicas run nothing, and status flags both nodes.
    let (code, b) = r1.call("POST", "/backups/", &p.token, Some(r#"{"server_id": 1}"#));
    assert_eq!(code, 201, "{b}");
    let first = b["id"].as_i64().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(p.job_of(first), "queued|0||", "no worker may run it");
    let status = ok_at(&p, &p.path("admin"), &["status"]);
    for node in ["n1", "n2"] {
        assert!(
            status.contains(&format!(
                "Node {node} has no live worker: no worker ever ran there."
            )),
            "{status}"
        );
    }

    let a1 = Agent::start(&p, "n1", &[]);
    let a2 = Agent::start(&p, "n2", &[]);
    let (code, b) = r1.call("POST", "/backups/", &p.token, Some(r#"{"server_id": 2}"#));
    assert_eq!(code, 201, "{b}");
    let second = b["id"].as_i64().unwrap();
    // Followed through the other replica.
    assert_eq!(wait_backup(&r2, &p.token, first, 60), "completed");
    assert_eq!(wait_backup(&r2, &p.token, second, 60), "completed");
    // Each ran on its server's node.
    let j1 = p.job_of(first);
    let j2 = p.job_of(second);
    assert!(j1.starts_with("done|1|n1|"), "{j1}");
    assert!(j2.starts_with("done|1|n2|"), "{j2}");

    // Restores through the second replica, run by each node's agent, give
    // back the very bytes.
    for (server, id, disk) in [(1, first, &disk1), (2, second, &disk2)] {
        let copy = disk.with_extension("orig");
        std::fs::copy(disk, &copy).unwrap();
        scribble(disk);
        assert!(!same(disk, &copy));
        restore(&r2, &p.token, server, id);
        assert!(
            same(disk, &copy),
            "server {server}'s disk differs after the restore"
        );
    }
    let node_of_restore = |server: i64| {
        psql_value(
            &p.db.url,
            &format!("SELECT node FROM jobs WHERE kind = 'restore' AND server_id = {server}"),
        )
    };
    assert_eq!(node_of_restore(1), "n1");
    assert_eq!(node_of_restore(2), "n2");

    // Both agents show in status: live, role agent, one server each.
    wait_for("both nodes to be live", || {
        let status = ok_at(&p, &p.path("admin"), &["status"]);
        ["n1", "n2"].iter().all(|n| {
            status.lines().any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() == 7
                    && cols[0] == *n
                    && cols[1] == "live"
                    && cols[2] == "agent"
                    && cols[6] == "1"
            })
        })
    });
    assert_eq!(a1.http("/healthz"), 200);
    assert_eq!(a2.http("/metrics"), 200);
    // The agent never serves the API.
    assert_eq!(a1.http("/api/v1/account/me/"), 404);

    // A stopped agent's node is flagged.
    a2.kill9();
    wait_for("n2 to be flagged", || {
        ok_at(&p, &p.path("admin"), &["status"])
            .contains("Node n2 has no live worker: no worker heartbeat since")
    });
    drop(a1);
}

#[test]
fn twenty_concurrent_manual_backups_over_two_replicas_make_ten() {
    let p = Place::new();
    let disk = p.path("vps3.img");
    ext4_image(&disk, "c.txt", b"server three");
    p.add_server_on("3", &disk, "n1");
    let r1 = p.replica("r1");
    let r2 = p.replica("r2");
    let codes: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let api = if i % 2 == 0 { &r1 } else { &r2 };
                let token = &p.token;
                s.spawn(move || {
                    api.call(
                        "POST",
                        "/backups/",
                        token,
                        Some(r#"{"server_id": 3, "description": "race"}"#),
                    )
                    .0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let created = codes.iter().filter(|&&c| c == 201).count();
    assert_eq!(created, 10, "{codes:?}");
    assert!(
        codes.iter().all(|&c| c == 201 || c == 409 || c == 400),
        "{codes:?}"
    );
    let listed = r2.get("/backups/?server_id=3", &p.token);
    assert_eq!(listed["count"], 10, "{listed}");
}

#[test]
fn a_killed_agents_job_is_requeued_when_its_lease_expires_and_finished_by_the_next() {
    let p = Place::new();
    let disk = p.path("vps4.img");
    // 32 MiB that do not compress, read at 2 MB/s: the backup runs ~16 s.
    random_disk(&disk, 32, 0x2545_f491_4f6c_dd1d);
    p.add_server_on("4", &disk, "n1");
    let api = p.replica("r1");
    let slow = Agent::start(&p, "n1", &["--read-limit-mb", "2"]);
    let (code, b) = api.call("POST", "/backups/", &p.token, Some(r#"{"server_id": 4}"#));
    assert_eq!(code, 201, "{b}");
    let id = b["id"].as_i64().unwrap();
    wait_for("the backup to be under way", || {
        api.get(&format!("/backups/{id}/"), &p.token)["progress"]
            .as_i64()
            .unwrap()
            >= 5
    });
    let running = p.job_of(id);
    assert!(running.starts_with("running|1|n1|"), "{running}");
    let killed_owner = running.rsplit('|').next().unwrap().to_owned();
    slow.kill9();
    let killed_at = Instant::now();

    // No agent of n1 is left: the replica's sweeper requeues the job once
    // its lease runs out (20 s), not before.
    let mut requeued_after = None;
    while requeued_after.is_none() {
        let j = p.job_of(id);
        if j.starts_with("queued|1|") {
            requeued_after = Some(killed_at.elapsed());
        } else {
            assert!(j.starts_with("running|1|"), "{j}");
            assert!(
                killed_at.elapsed() < Duration::from_secs(60),
                "never requeued: {j}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let requeued_after = requeued_after.unwrap();
    eprintln!(
        "requeued {:.1} s after the kill",
        requeued_after.as_secs_f64()
    );
    assert!(
        requeued_after >= Duration::from_secs(8),
        "requeued before the lease could have run out: {requeued_after:?}"
    );
    let b = api.get(&format!("/backups/{id}/"), &p.token);
    assert_eq!(b["status"], "in_progress", "{b}");

    // A restarted agent of the node completes it, as attempt 2.
    let again = Agent::start(&p, "n1", &[]);
    assert_eq!(wait_backup(&api, &p.token, id, 90), "completed");
    let done = p.job_of(id);
    assert!(done.starts_with("done|2|n1|"), "{done}");
    assert!(!done.ends_with(&killed_owner), "{done} vs {killed_owner}");

    // Nothing of the killed attempt is referenced: the store holds the one
    // backup, a GC with no grace keeps what it needs, and it verifies.
    let store = p.store_arg().to_owned();
    let admin = p.path("admin");
    let listed = ok(&admin, &["store", "ls", &store]);
    let names: Vec<&str> = listed
        .lines()
        .filter(|l| l.trim_start().starts_with('b'))
        .collect();
    assert_eq!(names.len(), 1, "{listed}");
    assert!(
        names[0].trim_start().starts_with(&format!("b{id} ")),
        "{listed}"
    );
    drop(again);
    let gc = vpsbackup(&admin, &["store", "gc", &store, "--grace", "0"]);
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    ok(&admin, &["store", "verify", &store]);

    // And it restores byte for byte.
    let copy = disk.with_extension("orig");
    std::fs::copy(&disk, &copy).unwrap();
    scribble(&disk);
    let restorer = Agent::start(&p, "n1", &[]);
    restore(&api, &p.token, 4, id);
    assert!(same(&disk, &copy));
    drop(restorer);
}
