//! `vpsbackup store ...` as child processes on a bare store directory: the
//! disaster-recovery path with no catalog, and a backup killed with SIGKILL
//! midway.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "vpsbackup-store-cli-{tag}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn vpsbackup(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vpsbackup"))
        .args(args)
        .output()
        .expect("run vpsbackup")
}

fn ok_json(args: &[&str]) -> Value {
    let out = vpsbackup(args);
    assert!(
        out.status.success(),
        "vpsbackup {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A real ext4 image of `size` holding a copy of `src`.
fn image(dir: &Path, name: &str, src: &str, size: &str) -> PathBuf {
    let tree = dir.join(format!("{name}-tree"));
    std::fs::create_dir_all(&tree).unwrap();
    run(Command::new("cp").arg("-a").arg(src).arg(&tree));
    let img = dir.join(format!("{name}.raw"));
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&tree)
        .arg("-F")
        .arg(&img)
        .arg(size));
    img
}

/// A directory of `files` files of `mib` MiB each of incompressible bytes
/// (xorshift64*), so a backup of it writes a known number of packs whatever
/// this machine's own trees hold.
fn incompressible_tree(dir: &Path, files: usize, mib: usize) -> PathBuf {
    let tree = dir.join("incompressible");
    std::fs::create_dir_all(&tree).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for f in 0..files {
        let mut bytes = Vec::with_capacity(mib << 20);
        while bytes.len() < mib << 20 {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            bytes.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        std::fs::write(tree.join(format!("f{f}")), bytes).unwrap();
    }
    tree
}

fn cmp(a: &Path, b: &Path) {
    let out = Command::new("cmp").arg(a).arg(b).output().unwrap();
    assert!(
        out.status.success(),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.map(|e| {
        let p = e.unwrap().path();
        if p.is_dir() {
            count_files(&p)
        } else {
            1
        }
    })
    .sum()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn bare_store_commands_round_trip() {
    let t = TempDir::new("rt");
    let img = image(&t.0, "disk0", "/usr/share/perl", "64M");
    let img2 = image(&t.0, "disk1", "/usr/share/perl5", "16M");
    let store = t.0.join("store");

    let b = ok_json(&[
        "store",
        "backup",
        s(&store),
        "--id",
        "b1",
        "--server-id",
        "srv-1",
        "--server-name",
        "web1",
        "--disk",
        s(&img),
        "--disk",
        s(&img2),
        "--json",
    ]);
    assert_eq!(b["backup_id"], "b1");
    assert_eq!(b["logical_bytes"], (64u64 << 20) + (16 << 20));
    assert!(b["chunks_new"].as_u64().unwrap() > 0);
    assert!(b["peak_rss_bytes"].as_u64().unwrap() > 0);

    let ls = ok_json(&["store", "ls", s(&store), "--json"]);
    assert_eq!(ls["backups"].as_array().unwrap().len(), 1);
    assert_eq!(ls["backups"][0]["server_id"], "srv-1");
    let show = ok_json(&["store", "show", s(&store), "b1", "--json"]);
    assert_eq!(show["server_name"], "web1");
    assert_eq!(show["disks"][1]["size"], 16u64 << 20);
    assert_eq!(show["disks"][0]["format"], "raw");

    // All disks, then one disk alone.
    let (o0, o1) = (t.0.join("o0.raw"), t.0.join("o1.raw"));
    ok_json(&[
        "store",
        "restore",
        s(&store),
        "b1",
        "--to",
        s(&o0),
        "--to",
        s(&o1),
        "--json",
    ]);
    cmp(&img, &o0);
    cmp(&img2, &o1);
    let o2 = t.0.join("o2.qcow2");
    ok_json(&[
        "store",
        "restore",
        s(&store),
        "b1",
        "--disk",
        "1",
        "--to",
        s(&o2),
        "--json",
    ]);
    let back = t.0.join("back.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&o2)
        .arg(&back));
    cmp(&img2, &back);

    let v = ok_json(&["store", "verify", s(&store), "--json"]);
    assert_eq!(v["ok"], true);
    assert!(v["chunks_checked"].as_u64().unwrap() > 0);
    let st = ok_json(&["store", "stats", s(&store), "--json"]);
    assert_eq!(st["backups"], 1);
    assert!(st["stored_bytes"].as_u64().unwrap() > 0);

    // Failures exit non-zero with a message.
    let out = vpsbackup(&["store", "restore", s(&store), "nope", "--to", s(&o0)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    let out = vpsbackup(&["store", "ls", s(&t.0.join("not-a-store"))]);
    assert!(!out.status.success());
    let out = vpsbackup(&[
        "store",
        "backup",
        s(&store),
        "--id",
        "b1",
        "--server-id",
        "x",
        "--disk",
        s(&img),
    ]);
    assert!(!out.status.success(), "a duplicate id is refused");

    // Disaster recovery: the index objects are lost; rebuilt from the packs.
    std::fs::remove_dir_all(store.join("index")).unwrap();
    assert!(!vpsbackup(&["store", "verify", s(&store)]).status.success());
    let r = ok_json(&["store", "rebuild-index", s(&store), "--json"]);
    assert!(r["chunks"].as_u64().unwrap() > 0);
    assert_eq!(
        ok_json(&["store", "verify", s(&store), "--json"])["ok"],
        true
    );

    let out = vpsbackup(&["store", "delete", s(&store), "b1"]);
    assert!(out.status.success());
    let g = ok_json(&["store", "gc", s(&store), "--grace", "0", "--json"]);
    assert!(g["packs_deleted"].as_u64().unwrap() > 0);
    let st = ok_json(&["store", "stats", s(&store), "--json"]);
    assert_eq!(st["stored_bytes"], 0);
    assert_eq!(st["backups"], 0);
}

#[test]
fn backup_killed_with_sigkill_leaves_a_consistent_store() {
    let t = TempDir::new("kill");
    let img = image(&t.0, "a", "/usr/share/perl", "64M");
    // 80 MiB that cannot compress: five packs, so every round below is
    // killed with packs still to write (a host tree's size is not stable).
    let tree = incompressible_tree(&t.0, 5, 16);
    let big = image(&t.0, "b", tree.to_str().unwrap(), "128M");
    let store = t.0.join("store");
    ok_json(&[
        "store",
        "backup",
        s(&store),
        "--id",
        "done",
        "--server-id",
        "a",
        "--disk",
        s(&img),
        "--json",
    ]);
    let baseline = ok_json(&["store", "stats", s(&store), "--json"])["stored_bytes"]
        .as_u64()
        .unwrap();

    // Kill at different moments of a slowed-down backup: as its first pack
    // lands, and a little later (mid-way through later packs and writes).
    let packs_now = || count_files(&store.join("packs"));
    for (round, extra_ms) in [0u64, 100, 300].into_iter().enumerate() {
        let before = packs_now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_vpsbackup"))
            .args([
                "store",
                "backup",
                s(&store),
                "--id",
                &format!("killed{round}"),
                "--server-id",
                "b",
                "--disk",
                s(&big),
                "--read-limit",
                "10000000",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while packs_now() == before && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(extra_ms));
        // SIGKILL: no destructor, no cleanup runs.
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "round {round}: the backup finished before the kill"
        );

        let ls = ok_json(&["store", "ls", s(&store), "--json"]);
        let ids: Vec<&str> = ls["backups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["backup_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            ["done"],
            "round {round}: no manifest for the killed backup"
        );
        let v = ok_json(&["store", "verify", s(&store), "--json"]);
        assert_eq!(v["ok"], true, "round {round}: {v}");
    }
    let before_gc = ok_json(&["store", "stats", s(&store), "--json"])["stored_bytes"]
        .as_u64()
        .unwrap();
    assert!(before_gc > baseline, "the killed backups left packs behind");

    // The writers are dead (their markers name gone processes): GC reclaims
    // everything they left, and the completed backup still restores.
    let g = ok_json(&["store", "gc", s(&store), "--grace", "0", "--json"]);
    assert!(g["packs_deleted"].as_u64().unwrap() > 0, "{g}");
    let after = ok_json(&["store", "stats", s(&store), "--json"]);
    assert_eq!(after["stored_bytes"].as_u64().unwrap(), baseline, "{after}");
    assert!(std::fs::read_dir(store.join("writers"))
        .unwrap()
        .next()
        .is_none());
    let out = t.0.join("out.raw");
    ok_json(&[
        "store",
        "restore",
        s(&store),
        "done",
        "--to",
        s(&out),
        "--json",
    ]);
    cmp(&img, &out);
    // And the store takes new backups, the killed id included.
    ok_json(&[
        "store",
        "backup",
        s(&store),
        "--id",
        "killed0",
        "--server-id",
        "b",
        "--disk",
        s(&big),
        "--json",
    ]);
    let v = ok_json(&["store", "verify", s(&store), "--json"]);
    assert_eq!(v["ok"], true);
}

#[test]
fn restore_whose_writes_fail_exits_with_the_error() {
    let t = TempDir::new("efbig");
    let img = image(&t.0, "disk0", "/usr/share/perl", "64M");
    let store = t.0.join("store");
    ok_json(&[
        "store",
        "backup",
        s(&store),
        "--id",
        "b1",
        "--server-id",
        "srv-1",
        "--disk",
        s(&img),
        "--json",
    ]);
    // An existing all-zero target of the right size, written in place. The
    // child may grow files to 1 MiB at most (`ulimit -f` counts 512-byte
    // blocks in dash, 1 KiB in bash) with SIGXFSZ ignored, so every write
    // past that fails with EFBIG, from whichever writer thread sends it.
    let target = t.0.join("target.raw");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 2048; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_vpsbackup"))
        .args(["store", "restore", s(&store), "b1", "--to", s(&target)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a restore with failing writes did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "the restore must fail");
    assert!(
        stderr.contains("too large") || stderr.contains("EFBIG"),
        "the error says why: {stderr}"
    );
}

#[test]
fn disk_format_pins_how_an_image_is_opened() {
    let t = TempDir::new("fmt");
    let store = t.0.join("store");
    let img = t.0.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("32M"));
    let backup = |id: &str, format: Option<&str>| {
        let mut args = vec![
            "store",
            "backup",
            s(&store),
            "--id",
            id,
            "--server-id",
            "srv",
            "--disk",
            s(&img),
            "--json",
        ];
        if let Some(f) = format {
            args.extend(["--disk-format", f]);
        }
        ok_json(&args);
        ok_json(&["store", "show", s(&store), id, "--json"])["disks"][0].clone()
    };
    // Detected: the guest view of the qcow2 image.
    let d = backup("detected", None);
    assert_eq!(
        (d["format"].as_str(), d["size"].as_u64()),
        (Some("qcow2"), Some(32 << 20))
    );
    // Pinned raw: the file's own bytes, header and all, never interpreted.
    let d = backup("pinned", Some("raw"));
    let file_len = std::fs::metadata(&img).unwrap().len();
    assert_eq!(
        (d["format"].as_str(), d["size"].as_u64()),
        (Some("raw"), Some(file_len))
    );

    let out = vpsbackup(&[
        "store",
        "backup",
        s(&store),
        "--id",
        "x",
        "--server-id",
        "srv",
        "--disk",
        s(&img),
        "--disk",
        s(&img),
        "--disk-format",
        "raw",
        "--disk-format",
        "raw",
        "--disk-format",
        "raw",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--disk-format"));
}
