//! Damage that heals, end to end on the built binary: a real `serve`
//! process takes backups over real HTTP (curl), while `vpsbackup verify`,
//! `restore`, `gc` and `status` run as other processes on the same data
//! dir. Bytes are flipped in real pack files; packs are truncated; index
//! objects and manifests are damaged. Each is reported, none stops `serve`,
//! and the next backup of the unchanged disk repairs the damaged ones.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{add_server, incompressible_disk, ok, same, vpsbackup};

/// A real ext4 image holding 3 MiB of incompressible data.
fn make_disk(path: &Path) {
    incompressible_disk(path, 3, 0x9e37_79b9_7f4a_7c15);
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else if !p.file_name().unwrap().to_string_lossy().starts_with(".tmp") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn largest_pack(dir: &Path) -> PathBuf {
    files(&dir.join("store/packs"))
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap()
}

fn flip(path: &Path, at: usize, len: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    for b in &mut bytes[at..at + len] {
        *b ^= 0xa5;
    }
    std::fs::write(path, bytes).unwrap();
}

/// A running `serve` on a free port, stopped with SIGTERM on drop.
struct Serve {
    child: Child,
    base: String,
    token: String,
}

impl Serve {
    fn start(dir: &Path, token: String) -> Serve {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_vpsbackup"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s = Serve {
            child,
            base: format!("http://127.0.0.1:{port}/api/v1"),
            token,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.call("GET", "/openapi.json", None).0 != 200 {
            assert!(Instant::now() < deadline, "serve did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    /// (status, body) of one request through curl.
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut c = Command::new("curl");
        c.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", self.token))
            .args(["-H", "Content-Type: application/json"]);
        if let Some(b) = body {
            c.args(["--data", b]);
        }
        let out = c.arg(format!("{}{path}", self.base)).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// A manual backup of server 5 taken through the API; its id once completed.
    fn backup(&self) -> u64 {
        let (st, body) = self.call("POST", "/backups/", Some(r#"{"server_id": 5}"#));
        assert_eq!(st, 201, "{body}");
        let id: u64 = field(&body, "\"id\":").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (st, body) = self.call("GET", &format!("/backups/{id}/"), None);
            assert_eq!(st, 200, "{body}");
            if body.contains("\"status\":\"completed\"") {
                return id;
            }
            assert!(
                body.contains("in_progress") && Instant::now() < deadline,
                "backup {id}: {body}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// The text after `key` up to the next `,` or `}` (enough for flat numbers).
fn field<'a>(body: &'a str, key: &str) -> &'a str {
    let at = body.find(key).unwrap_or_else(|| panic!("{key} in {body}")) + key.len();
    let rest = &body[at..];
    rest[..rest.find([',', '}']).unwrap()].trim()
}

/// A data dir with account acme (webhook to a closed port: the events stay
/// in the outbox), server 5 with one real disk, automatic backups off.
fn setup(tmp: &Path) -> (PathBuf, PathBuf, String) {
    let dir = tmp.join("data");
    ok(&dir, &["account", "create", "acme"]);
    ok(
        &dir,
        &[
            "account",
            "set",
            "acme",
            "--webhook-url",
            "http://127.0.0.1:9/hooks",
        ],
    );
    let token = ok(
        &dir,
        &["token", "create", "--account", "acme", "--name", "t"],
    )
    .lines()
    .last()
    .unwrap()
    .trim()
    .to_owned();
    let disk = tmp.join("vps5.img");
    make_disk(&disk);
    add_server(&dir, "5", &disk, &[]);
    std::fs::write(
        dir.join("config.toml"),
        "[schedule]\nenabled = false\ngc_grace_secs = 0\n",
    )
    .unwrap();
    (dir, disk, token)
}

fn events(dir: &Path) -> Vec<String> {
    let out = Command::new("sqlite3")
        .arg(dir.join("catalog.db"))
        .arg("SELECT event || ' ' || backup_id FROM webhook_events ORDER BY seq")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Parses "disk 0: bytes A-B (N chunk[s]) unreadable, written as zeros".
fn ranges(stdout: &str) -> Vec<(usize, usize)> {
    stdout
        .lines()
        .filter(|l| l.ends_with("unreadable, written as zeros"))
        .map(|l| {
            let span = l.split("bytes ").nth(1).unwrap().split(' ').next().unwrap();
            let (a, b) = span.split_once('-').unwrap();
            (a.parse().unwrap(), b.parse::<usize>().unwrap() + 1)
        })
        .collect()
}

#[test]
fn a_flipped_byte_is_healed_by_the_next_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, disk, token) = setup(tmp.path());
    let mut serve = Serve::start(&dir, token);
    let old = serve.backup();
    let old_s = old.to_string();

    // Damage a chunk of the only data pack: verify (its own process) marks
    // the backup damaged and quarantines the copy in the store.
    let pack = largest_pack(&dir);
    let mid = std::fs::metadata(&pack).unwrap().len() as usize / 2;
    flip(&pack, mid, 16);
    let out = vpsbackup(&dir, &["verify", "--backup", &old_s]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("DAMAGED"));
    assert_eq!(files(&dir.join("store/quarantine")).len(), 1);
    let (_, body) = serve.call("GET", &format!("/backups/{old}/"), None);
    assert!(body.contains("\"damaged\":true"), "{body}");
    // The customer API refuses to restore it.
    let (st, body) = serve.call(
        "POST",
        "/servers/5/restore/",
        Some(&format!(r#"{{"backup_id": {old}}}"#)),
    );
    assert!(st == 400 || st == 409, "{st} {body}");

    // The provider's restore refuses too, unless told to allow damage.
    let target = tmp.path().join("dr.raw");
    let out = vpsbackup(
        &dir,
        &[
            "restore",
            "--backup",
            &old_s,
            "--to",
            target.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("damaged") && err.contains("--allow-damaged"),
        "{err}"
    );
    assert!(!target.exists());
    let out = ok(
        &dir,
        &[
            "restore",
            "--backup",
            &old_s,
            "--to",
            target.to_str().unwrap(),
            "--allow-damaged",
        ],
    );
    let zeroed = ranges(&out);
    assert!(!zeroed.is_empty(), "{out}");
    assert!(
        out.contains("(1 chunk) unreadable, written as zeros"),
        "{out}"
    );
    // Zeros exactly in the printed ranges, the disk's bytes everywhere else.
    let want = std::fs::read(&disk).unwrap();
    let got = std::fs::read(&target).unwrap();
    assert_eq!(want.len(), got.len());
    let mut expected = want.clone();
    for (a, b) in &zeroed {
        assert_eq!((b - a) % 65536, 0, "{out}");
        assert!(want[*a..*b].iter().any(|x| *x != 0), "the range held data");
        expected[*a..*b].fill(0);
    }
    assert!(expected == got, "zeros exactly at the bad chunk: {out}");

    // The next backup of the unchanged disk, by serve (another process),
    // sees the quarantine and stores a fresh copy: it verifies clean and
    // restores byte-identical.
    let new = serve.backup();
    let new_s = new.to_string();
    let v = ok(&dir, &["verify", "--backup", &new_s]);
    assert!(v.contains(&format!("backup {new}: ok")), "{v}");
    let copy = tmp.path().join("new.raw");
    ok(
        &dir,
        &[
            "restore",
            "--backup",
            &new_s,
            "--to",
            copy.to_str().unwrap(),
        ],
    );
    assert!(same(&disk, &copy));

    // Verify the old backup: repaired, flag cleared, event in the outbox.
    let v = ok(&dir, &["verify", "--backup", &old_s]);
    assert!(v.contains(&format!("backup {old}: ok (repaired)")), "{v}");
    let (_, body) = serve.call("GET", &format!("/backups/{old}/"), None);
    assert!(body.contains("\"damaged\":false"), "{body}");
    let ev = events(&dir);
    assert!(ev.contains(&format!("backup.damaged {old}")), "{ev:?}");
    assert!(ev.contains(&format!("backup.repaired {old}")), "{ev:?}");
    let copy = tmp.path().join("old.raw");
    ok(
        &dir,
        &[
            "restore",
            "--backup",
            &old_s,
            "--to",
            copy.to_str().unwrap(),
        ],
    );
    assert!(same(&disk, &copy));
    assert!(serve.alive());
}

#[test]
fn damaged_packs_index_and_manifests_are_reported_and_serve_keeps_working() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, disk, token) = setup(tmp.path());
    let mut serve = Serve::start(&dir, token);
    let first = serve.backup();

    // A truncated pack: verify reports it, the next backup heals it.
    let pack = largest_pack(&dir);
    let len = std::fs::metadata(&pack).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out = vpsbackup(&dir, &["verify", "--backup", &first.to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("corrupt"));
    let st = ok(&dir, &["status"]);
    assert!(st.contains("chunk copies quarantined"), "{st}");
    serve.backup();
    let v = ok(&dir, &["verify"]);
    assert!(v.contains("0 damaged") && v.contains("(repaired)"), "{v}");

    // A missing pack likewise.
    std::fs::remove_file(largest_pack(&dir)).unwrap();
    let out = vpsbackup(&dir, &["verify"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("missing"));
    serve.backup();
    let v = ok(&dir, &["verify"]);
    assert!(v.contains("0 damaged"), "{v}");
    ok(&dir, &["gc"]);

    // A damaged index object: status names it, GC refuses and says how to
    // fix it, backups and the API go on; rebuild-index repairs it.
    let index = files(&dir.join("store/index"));
    assert_eq!(index.len(), 1, "GC consolidated the index");
    let ilen = std::fs::metadata(&index[0]).unwrap().len() as usize;
    flip(&index[0], ilen / 2, 1);
    let st = ok(&dir, &["status"]);
    assert!(
        st.contains("index object") && st.contains("rebuild-index"),
        "{st}"
    );
    let out = vpsbackup(&dir, &["gc"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without deleting anything") && err.contains("rebuild-index"),
        "{err}"
    );
    let after_index = serve.backup();
    let copy = tmp.path().join("i.raw");
    ok(
        &dir,
        &[
            "restore",
            "--backup",
            &after_index.to_string(),
            "--to",
            copy.to_str().unwrap(),
        ],
    );
    assert!(same(&disk, &copy));
    ok(
        &dir,
        &[
            "store",
            "rebuild-index",
            dir.join("store").to_str().unwrap(),
        ],
    );
    ok(&dir, &["gc"]);
    let v = ok(&dir, &["verify"]);
    assert!(v.contains("0 damaged"), "{v}");

    // A damaged manifest: verify and status report it, restore and GC
    // refuse naming it; the other backups still back up and restore.
    let m = dir.join(format!("store/backups/b{first}"));
    flip(&m, 40, 1);
    let out = vpsbackup(&dir, &["verify"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("backup {first}: DAMAGED")) && text.contains("manifest"),
        "{text}"
    );
    let st = ok(&dir, &["status"]);
    assert!(st.contains(&format!("backup b{first}")), "{st}");
    let out = vpsbackup(&dir, &["gc"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("backup b{first}")));
    let out = vpsbackup(
        &dir,
        &[
            "restore",
            "--backup",
            &first.to_string(),
            "--to",
            tmp.path().join("m.raw").to_str().unwrap(),
            "--allow-damaged",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
    let last = serve.backup();
    let copy = tmp.path().join("last.raw");
    ok(
        &dir,
        &[
            "restore",
            "--backup",
            &last.to_string(),
            "--to",
            copy.to_str().unwrap(),
        ],
    );
    assert!(same(&disk, &copy));
    let (st, _) = serve.call("GET", "/backups/", None);
    assert_eq!(st, 200);
    assert!(serve.alive(), "no damage stops serve");
}
