//! Helpers the command-line tests share: run the built binary on a data dir,
//! and make small real ext4 images with `mke2fs -d`.

#![allow(dead_code)] // each test file uses its own subset

use std::path::Path;
use std::process::{Command, Output};

/// Runs `vpsbackup --data-dir DIR ARGS...` to completion.
pub fn vpsbackup(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vpsbackup"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let out = vpsbackup(dir, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// An 8 MiB ext4 image at `path` holding one file `name` with `content`.
pub fn ext4_image(path: &Path, name: &str, content: &[u8]) {
    let dir = path.with_extension("d");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), content).unwrap();
    let out = Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&dir)
        .arg("-F")
        .arg(path)
        .arg("8M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mke2fs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
