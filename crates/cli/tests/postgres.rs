//! The catalog on PostgreSQL (issue 10, part 1), through the real binary:
//! admin commands and `serve` with `--database-url` / `VPSBACKUP_DATABASE_URL`
//! on a fresh database; two `serve` processes on that one database answer
//! the seed's calls (create, list, delete a backup) identically, whichever
//! of them took the request; a wrong URL is one clear error, no password.

use std::path::Path;

mod common;
use common::{
    add_server, ext4_image, ok, vpsbackup, vpsbackup_command, wait_for, PgDatabase, Serve,
};

/// `vpsbackup --data-dir DIR --database-url URL ARGS...`, which must succeed.
fn ok_pg(dir: &Path, url: &str, args: &[&str]) -> String {
    let mut all = vec!["--database-url", url];
    all.extend_from_slice(args);
    ok(dir, &all)
}

#[test]
fn two_serves_on_one_postgres_database_answer_the_same() {
    let db = PgDatabase::create();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (dir_a, dir_b) = (t.join("a"), t.join("b"));
    ok_pg(&dir_a, &db.url, &["account", "create", "acme"]);
    let tok = ok_pg(&dir_a, &db.url, &["token", "create", "--account", "acme"])
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned();
    let disk = t.join("vps12345.img");
    ext4_image(&disk, "site.txt", b"hello from the seed server");
    add_server(&dir_a, "12345", &disk, &["--database-url", &db.url]);
    // Nothing went to the data dir's SQLite file.
    assert!(!dir_a.join("catalog.db").exists());
    // The other data dir sees the same catalog through the env variable.
    let listed = vpsbackup(&dir_b, &["server", "list"]);
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains("vps-12345"),
        "without the URL the SQLite catalog of dir b is empty"
    );
    let servers = std::process::Command::new(env!("CARGO_BIN_EXE_vpsbackup"))
        .args(["--data-dir", dir_b.to_str().unwrap(), "server", "list"])
        .env("VPSBACKUP_DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(servers.status.success());
    assert!(String::from_utf8_lossy(&servers.stdout).contains("vps-12345"));

    let env = format!("VPSBACKUP_DATABASE_URL={}", db.url);
    let a = Serve::start_under(&["env", &env], &dir_a, &tok);
    let b = Serve::start_under(&["env", &env], &dir_b, &tok);

    // The seed's calls: create through one replica...
    let (code, created) = a.call(
        "POST",
        "/backups/",
        &tok,
        Some(r#"{"server_id": 12345, "description": "Pre-deployment backup"}"#),
    );
    assert_eq!(code, 201, "{created}");
    let id = created["id"].as_i64().unwrap();
    // ...followed through the other, until every job (the schedulers'
    // catch-up backups too) has finished.
    wait_for("the backups to finish", || {
        let l = b.get("/backups/?server_id=12345", &tok);
        l["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["status"] == "completed")
            && l["results"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["id"] == id)
    });
    // Both read one database: equal, unless a scheduler's write (a verify
    // pass) fell between the two reads, so compare until a quiet moment.
    let same = |path: &str| {
        wait_for(&format!("{path} to read the same from both"), || {
            a.get(path, &tok) == b.get(path, &tok)
        })
    };
    same("/backups/?server_id=12345");
    let from_a = a.get("/backups/?server_id=12345", &tok);
    // One automatic backup for the day, though both schedulers ran.
    let automatic = from_a["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["backup_type"] == "automatic")
        .count();
    assert!(automatic <= 1, "{from_a}");
    same(&format!("/backups/{id}/"));
    same("/servers/12345/");
    same("/account/me/");

    // Delete through the second; the first no longer has it.
    let (code, body) = b.call("DELETE", &format!("/backups/{id}/"), &tok, None);
    assert!(code == 204 || code == 200, "{code} {body}");
    let (code, _) = a.call("GET", &format!("/backups/{id}/"), &tok, None);
    assert_eq!(code, 404);
    same("/backups/?server_id=12345");
    assert!(!a.get("/backups/?server_id=12345", &tok)["results"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["id"] == id));

    // Revoked by a third process: both replicas (which cache their token
    // lookups) refuse it at once, not when their cache entries age out.
    ok_pg(&dir_a, &db.url, &["token", "revoke", &tok]);
    let t0 = std::time::Instant::now();
    for serve in [&a, &b] {
        loop {
            let (code, _) = serve.call("GET", "/backups/", &tok, None);
            if code == 401 {
                break;
            }
            assert_eq!(code, 200);
            assert!(t0.elapsed().as_secs() < 3, "the revoked token still works");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[test]
fn a_wrong_database_url_is_one_clear_error_without_the_password() {
    let tmp = tempfile::tempdir().unwrap();
    let db = PgDatabase::create();
    let wrong_password = db.url.replace("vpsbackup:vpsbackup@", "vpsbackup:hunter2@");
    for url in [
        wrong_password.as_str(),
        "postgres://vpsbackup:hunter2@127.0.0.1:1/none",
        "mysql://root:hunter2@localhost/db",
    ] {
        // An operator's shell may have RUST_BACKTRACE set: still one line.
        let out = vpsbackup_command(tmp.path(), &["--database-url", url, "account", "list"])
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("Error: "), "{stderr}");
    }
}

/// Issue 10, part 5: a single box's SQLite catalog, made by the command
/// line and a real `serve`, copied to PostgreSQL with `catalog migrate`:
/// every admin listing and every API answer is the same afterwards, the
/// token still works, new ids continue past the copied ones, and a second
/// migrate into the now non-empty database is refused.
#[test]
fn catalog_migrate_copies_a_box_to_postgres_with_ids_intact() {
    let db = PgDatabase::create();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let dir = t.join("box");
    // No scheduler: its verify pass would change answers between the two
    // serves on its own.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.toml"), "[schedule]\nenabled = false\n").unwrap();
    // Ids that do not start at 1, so an id off by one would show.
    ok(&dir, &["account", "create", "filler"]);
    ok(&dir, &["account", "create", "acme"]);
    ok(
        &dir,
        &[
            "account",
            "set",
            "acme",
            "--webhook-url",
            "http://127.0.0.1:9/hook",
            "--webhook-secret",
            "whsec_dGVzdA==",
        ],
    );
    ok(
        &dir,
        &[
            "plan",
            "create",
            "gold",
            "--retention-days",
            "21",
            "--window-start",
            "01:30",
        ],
    );
    let tok = ok(&dir, &["token", "create", "--account", "acme"])
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned();
    ok(&dir, &["token", "create", "--account", "filler"]);
    let disk = t.join("vps7.img");
    ext4_image(&disk, "a.txt", b"migrated box");
    add_server(&dir, "7", &disk, &["--plan", "gold"]);

    let serve = Serve::start(&dir, &tok);
    for body in [r#"{"description": "one"}"#, r#"{"description": "two"}"#] {
        let (code, b) = serve.call("POST", "/servers/7/backup/", &tok, Some(body));
        assert_eq!(code, 201, "{b}");
        let id = b["id"].as_i64().unwrap();
        wait_for("the backup", || {
            serve.get(&format!("/backups/{id}/"), &tok)["status"] == "completed"
        });
    }
    wait_for("every job", || {
        let l = serve.get("/backups/", &tok);
        l["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["status"] == "completed")
    });
    let answers = |s: &Serve| {
        [
            "/backups/",
            "/backups/?server_id=7",
            "/servers/",
            "/servers/7/",
            "/account/me/",
        ]
        .map(|p| s.get(p, &tok))
    };
    let before = answers(&serve);
    drop(serve);
    let admin = |url: Option<&str>| {
        ["account list", "token list", "plan list", "server list"].map(|c| {
            let mut args: Vec<&str> = c.split(' ').collect();
            if let Some(u) = url {
                args.splice(0..0, ["--database-url", u]);
            }
            ok(&dir, &args)
        })
    };
    let admin_before = admin(None);

    let out = ok(&dir, &["catalog", "migrate", "--to", &db.url]);
    assert!(out.contains("backups: "), "{out}");
    assert!(
        !out.contains("vpsbackup:vpsbackup@"),
        "password printed: {out}"
    );
    assert_eq!(admin(Some(&db.url)), admin_before);

    // The API on PostgreSQL: the same answers, the same token.
    let env = format!("VPSBACKUP_DATABASE_URL={}", db.url);
    let serve = Serve::start_under(&["env", &env], &dir, &tok);
    let after = answers(&serve);
    assert_eq!(after, before);
    // A new backup takes the next id, not a copied one.
    let highest = before[0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_i64().unwrap())
        .max()
        .unwrap();
    let (code, b) = serve.call("POST", "/servers/7/backup/", &tok, Some("{}"));
    assert_eq!(code, 201, "{b}");
    assert_eq!(b["id"].as_i64().unwrap(), highest + 1);
    drop(serve);

    // Into a catalog that is no longer empty: refused, nothing changed.
    let again = vpsbackup(&dir, &["catalog", "migrate", "--to", &db.url]);
    assert_eq!(again.status.code(), Some(1));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(admin(Some(&db.url))[0], admin_before[0]);
}

/// Hosts sharing one catalog (issue 11, part 2): while another process
/// holds the store's GC turn in the catalog (here a psql session holding
/// the advisory lock, as the leader's GC on another node would), `vpsbackup
/// gc` is refused with a plain reason and deletes nothing; once that
/// session ends, GC runs. `status` says GC is kept apart that way.
#[test]
fn a_gc_while_another_host_collects_is_refused_through_the_catalog() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let db = PgDatabase::create();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node-a");
    ok_pg(&dir, &db.url, &["account", "create", "acme"]);
    let status = ok_pg(&dir, &db.url, &["status"]);
    assert!(
        status.contains("every GC through this catalog first takes its advisory lock"),
        "{status}"
    );

    let mut holder = Command::new("psql")
        .arg(&db.url)
        .args(["-q", "-X", "-v", "ON_ERROR_STOP=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("psql");
    let mut stdin = holder.stdin.take().unwrap();
    writeln!(
        stdin,
        "SELECT pg_advisory_lock({});\n\\echo held",
        vpsbackup_catalog::GC_LOCK_KEY
    )
    .unwrap();
    let mut out = BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    while line.trim() != "held" {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "psql ended early");
    }

    let refused = vpsbackup(&dir, &["--database-url", &db.url, "gc"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another garbage collection of this store is running"),
        "{stderr}"
    );

    drop(stdin); // psql exits, its session and lock with it
    holder.wait().unwrap();
    let done = ok_pg(&dir, &db.url, &["gc"]);
    assert!(!done.trim().is_empty());
}
