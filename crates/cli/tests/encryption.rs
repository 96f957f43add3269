//! Encrypted stores made and used by the built binary: `store init` (key
//! file or passphrase), the bare `store` commands, `store key
//! add/list/remove`, and `serve`, `verify`, `gc` and `restore` getting the
//! key from config.toml or VPSBACKUP_PASSPHRASE. A missing or wrong key is
//! one clear error line, never a panic or garbage.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{add_server, incompressible_disk, ok, same};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `vpsbackup ARGS` with extra environment variables (and none of the
/// key variables inherited).
fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vpsbackup"));
    cmd.args(args)
        .env("RUST_BACKTRACE", "0")
        .env_remove("VPSBACKUP_PASSPHRASE")
        .env_remove("VPSBACKUP_NEW_PASSPHRASE")
        .env_remove("VPSBACKUP_KEY_FILE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn ok_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run_env(args, env);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its stderr, checked to be a
/// plain error (no panic, no backtrace).
fn fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run_env(args, env);
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("Error: "), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    err
}

fn file_holds(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().any(|e| {
        let p = e.unwrap().path();
        if p.is_dir() {
            file_holds(&p, needle)
        } else {
            std::fs::read(&p)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
        }
    })
}

#[test]
fn store_commands_keys_and_passphrases() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let disk = t.join("disk.img");
    incompressible_disk(&disk, 2, 0x1234_5678_9abc_def1);
    let store = t.join("store");
    let key = t.join("store.key");

    // Encryption is the default: a key is needed.
    let e = fails(&["store", "init", s(&store)], &[]);
    assert!(
        e.contains("--key-file") && e.contains("--no-encryption"),
        "{e}"
    );
    let out = ok_env(&["store", "init", s(&store), "--key-file", s(&key)], &[]);
    assert!(
        out.contains("encrypted") && out.contains("keep a copy"),
        "{out}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the key file is private");
    assert_eq!(std::fs::read_to_string(&key).unwrap().trim().len(), 64);
    let e = fails(&["store", "init", s(&store), "--key-file", s(&key)], &[]);
    assert!(e.contains("not empty"), "{e}");

    let backup = [
        "store",
        "backup",
        s(&store),
        "--id",
        "b1",
        "--server-id",
        "srv",
        "--disk",
        s(&disk),
    ];
    let e = fails(&backup, &[]);
    assert!(
        e.contains("encrypted") && e.contains("--key-file"),
        "one clear error: {e}"
    );
    let mut with_key = backup.to_vec();
    with_key.extend(["--key-file", s(&key)]);
    ok_env(&with_key, &[]);
    // The disk's bytes are nowhere in the store.
    let raw = std::fs::read(&disk).unwrap();
    let sample = raw
        .chunks(65536)
        .find(|c| c.iter().filter(|b| **b != 0).count() > 60_000)
        .unwrap();
    assert!(!file_holds(&store, &sample[1000..1064]));

    let other = t.join("other.key");
    ok_env(
        &[
            "store",
            "init",
            s(&t.join("other-store")),
            "--key-file",
            s(&other),
        ],
        &[],
    );
    let e = fails(&["store", "ls", s(&store), "--key-file", s(&other)], &[]);
    assert!(e.contains("does not open this store"), "{e}");
    let e = fails(
        &["store", "ls", s(&store)],
        &[("VPSBACKUP_PASSPHRASE", "guess")],
    );
    assert!(e.contains("passphrase does not open"), "{e}");

    // A passphrase as a second key; the key file named in the environment.
    let out = ok_env(
        &[
            "store",
            "key",
            "add",
            s(&store),
            "--new-passphrase",
            "--json",
        ],
        &[
            ("VPSBACKUP_KEY_FILE", s(&key)),
            ("VPSBACKUP_NEW_PASSPHRASE", "a long passphrase"),
        ],
    );
    let added: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(added["kind"], "passphrase");
    let pass = [("VPSBACKUP_PASSPHRASE", "a long passphrase")];
    let list: serde_json::Value =
        serde_json::from_str(ok_env(&["store", "key", "list", s(&store), "--json"], &pass).trim())
            .unwrap();
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{list}");
    assert_eq!(keys[1]["argon2"]["memory_kib"], 65536);
    let file_key_id = keys[0]["id"].as_str().unwrap().to_owned();

    let out = t.join("restored.img");
    ok_env(
        &["store", "restore", s(&store), "b1", "--to", s(&out)],
        &pass,
    );
    assert!(same(&disk, &out));
    let v = ok_env(&["store", "verify", s(&store), "--json"], &pass);
    assert!(v.contains("\"ok\":true"), "{v}");

    // Rotate: the key file goes; the passphrase still opens; the last key stays.
    ok_env(&["store", "key", "remove", s(&store), &file_key_id], &pass);
    let e = fails(&["store", "ls", s(&store), "--key-file", s(&key)], &[]);
    assert!(e.contains("does not open"), "{e}");
    let e = fails(
        &[
            "store",
            "key",
            "remove",
            s(&store),
            added["id"].as_str().unwrap(),
        ],
        &pass,
    );
    assert!(e.contains("last key"), "{e}");
    ok_env(&["store", "ls", s(&store)], &pass);

    // A tampered pack: verify names the chunk as tampered and fails.
    let pack = std::fs::read_dir(store.join("packs"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&pack, bytes).unwrap();
    let out = run_env(&["store", "verify", s(&store)], &pass);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tampered"), "{text}");

    // Opting out: an unencrypted store, exactly as before.
    let plain = t.join("plain");
    let out = ok_env(&["store", "init", s(&plain), "--no-encryption"], &[]);
    assert!(out.contains("unencrypted"), "{out}");
    ok_env(
        &[
            "store",
            "backup",
            s(&plain),
            "--id",
            "p1",
            "--server-id",
            "srv",
            "--disk",
            s(&disk),
        ],
        &[],
    );
    assert!(file_holds(&plain, &sample[1000..1064]));
    let e = fails(
        &[
            "store",
            "init",
            s(&t.join("p2")),
            "--no-encryption",
            "--key-file",
            s(&key),
        ],
        &[],
    );
    assert!(e.contains("takes no key"), "{e}");
}

/// A data dir whose store was made encrypted by `store init`: serve (key
/// file from config.toml) takes the automatic backup; `verify`, `gc` and
/// `restore` find the key the same way; without it each fails with one
/// clear error. Then the same with a passphrase from the environment.
#[test]
fn serve_verify_gc_and_restore_with_the_stores_key() {
    for passphrase in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir_all(&dir).unwrap();
        let key = tmp.path().join("store.key");
        let pass = "serve passphrase";
        let env: Vec<(&str, &str)> = if passphrase {
            vec![("VPSBACKUP_PASSPHRASE", pass)]
        } else {
            Vec::new()
        };
        let store = dir.join("store");
        if passphrase {
            ok_env(&["store", "init", s(&store)], &env);
        } else {
            ok_env(&["store", "init", s(&store), "--key-file", s(&key)], &[]);
        }
        ok(&dir, &["account", "create", "acme"]);
        let disk = tmp.path().join("vps5.img");
        incompressible_disk(&disk, 2, 0x2545_f491_4f6c_dd1d);
        add_server(&dir, "5", &disk, &[]);
        let schedule = "[schedule]\ntick_secs = 1\ngc_grace_secs = 0\nverify_interval_days = 0\n";
        let config = if passphrase {
            schedule.to_owned()
        } else {
            format!("store_key_file = \"{}\"\n{schedule}", key.display())
        };
        std::fs::write(dir.join("config.toml"), &config).unwrap();
        let d = ["--data-dir", s(&dir)];
        fn with<'a>(d: &[&'a str], args: &[&'a str]) -> Vec<&'a str> {
            [d, args].concat()
        }

        let mut child = Command::new(env!("CARGO_BIN_EXE_vpsbackup"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = ok_env(&with(&d, &["status"]), &env);
            if st
                .lines()
                .any(|l| l.contains("vps-5") && l.contains("completed"))
            {
                break;
            }
            assert!(Instant::now() < deadline, "no automatic backup: {st}");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap()
            .success());
        assert!(child.wait().unwrap().success());

        let v = ok_env(&with(&d, &["verify"]), &env);
        assert!(v.contains("1 backups verified, 0 damaged"), "{v}");
        let g = ok_env(&with(&d, &["gc"]), &env);
        assert!(g.starts_with("GC freed"), "{g}");
        let out = tmp.path().join("restored.img");
        ok_env(
            &with(&d, &["restore", "--backup", "1", "--to", s(&out)]),
            &env,
        );
        assert!(same(&disk, &out));

        // Without the key: one clear error from each, and serve does not start.
        let bare = tmp.path().join("bare.toml");
        std::fs::write(&bare, schedule).unwrap();
        let c = ["--data-dir", s(&dir), "--config", s(&bare)];
        for args in [
            &["verify"][..],
            &["gc"],
            &["restore", "--backup", "1", "--to", s(&out)],
        ] {
            let e = fails(&[&c[..], args].concat(), &[]);
            assert!(
                e.contains("encrypted") && e.contains("VPSBACKUP_PASSPHRASE"),
                "{args:?}: {e}"
            );
        }
        let e = fails(
            &[&c[..], &["serve", "--listen", "127.0.0.1:0"]].concat(),
            &[("VPSBACKUP_PASSPHRASE", "wrong")],
        );
        assert!(e.contains("does not open this store"), "{e}");
    }
}
