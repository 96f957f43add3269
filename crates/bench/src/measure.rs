//! Runs one step as a child process and measures it: wall time, peak
//! resident memory (from `wait4`'s rusage, which also covers the child's own
//! reaped children such as qemu-nbd), stdout, and a stderr log.
//!
//! A child per step is what makes peak memory honest: each step starts from
//! a fresh process, so one step's allocations never hide another's.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// What one measured child did.
#[derive(Debug, Clone)]
pub struct Measured {
    pub wall: Duration,
    /// Peak resident set, bytes.
    pub max_rss: u64,
    /// User + system CPU time: unlike wall time, not inflated when other
    /// work shares the machine.
    pub cpu: Duration,
    pub stdout: String,
}

/// Runs `cmd` to completion; fails with the tail of its stderr if it exits
/// unsuccessfully. stderr goes to `log` so a chatty tool cannot block.
pub fn run_measured(cmd: &mut Command, log: &Path) -> anyhow::Result<Measured> {
    let stderr = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout was piped")
        .read_to_string(&mut stdout)
        .with_context(|| format!("read output of {cmd:?}"))?;
    let (status, max_rss, cpu) = wait4(child.id())?;
    let wall = start.elapsed();
    if !exited_ok(status) {
        let log_text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = log_text.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{cmd:?} failed (wait status {status:#x}):\n{}",
            tail.join("\n")
        );
    }
    Ok(Measured {
        wall,
        max_rss,
        cpu,
        stdout,
    })
}

/// Reaps `pid` and returns (wait status, peak RSS in bytes, CPU time). std's
/// `Child::wait` drops the rusage, hence the raw call; the `Child` handle is
/// not waited on again afterwards.
fn wait4(pid: u32) -> anyhow::Result<(i32, u64, Duration)> {
    let mut status: libc::c_int = 0;
    #[allow(unsafe_code)]
    // SAFETY: rusage is plain old data, so all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        #[allow(unsafe_code)]
        // SAFETY: wait4 writes only to the status and rusage we pass, both
        // live locals; pid is our own child, not yet reaped.
        let rc = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
        if rc == pid as libc::pid_t {
            let secs = |t: libc::timeval| {
                Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
            };
            // ru_maxrss is in KiB on Linux.
            return Ok((
                status,
                usage.ru_maxrss as u64 * 1024,
                secs(usage.ru_utime) + secs(usage.ru_stime),
            ));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("wait4");
        }
    }
}

fn exited_ok(status: i32) -> bool {
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

/// Apparent bytes and number of files under `dir` (a store or a peer's repository).
pub fn dir_usage(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let (mut bytes, mut files) = (0, 0);
    for_each_file(dir, |_, meta| {
        bytes += meta.len();
        files += 1;
        Ok(())
    })?;
    Ok((bytes, files))
}

/// Calls `f` on every regular file under `dir`, at any depth.
pub fn for_each_file(
    dir: &Path,
    mut f: impl FnMut(&Path, &std::fs::Metadata) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut stack: Vec<PathBuf> = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("list {}", d.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                f(&entry.path(), &meta)?;
            }
        }
    }
    Ok(())
}

/// Bytes the file system allocated for `path` (sparse files count only data).
pub fn allocated_bytes(path: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .blocks()
        * 512)
}

/// Byte-compares two disks' guest views through vpsbackup-disk (so a qcow2
/// compares by content, not by file bytes). Holes read as zeros.
pub fn same_guest_view(a: &Path, b: &Path) -> anyhow::Result<bool> {
    use vpsbackup_disk::{open_reader, AlignedBuf};
    let ra = open_reader(a)?;
    let rb = open_reader(b)?;
    if ra.size() != rb.size() {
        return Ok(false);
    }
    const PIECE: u64 = 4 << 20;
    let mut ba = AlignedBuf::new(PIECE as usize);
    let mut bb = AlignedBuf::new(PIECE as usize);
    let mut at = 0;
    while at < ra.size() {
        let n = PIECE.min(ra.size() - at) as usize;
        ra.read_exact_at(&mut ba[..n], at)?;
        rb.read_exact_at(&mut bb[..n], at)?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}
