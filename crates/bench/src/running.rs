//! `vpsbackup-bench running`: backups of a running server (a real
//! qemu-storage-daemon holding a qcow2 disk, the guest's writes going
//! through its FUSE export so QEMU's dirty bitmap sees them), side by side
//! in one run:
//! - the first backup (a full read of the point in time);
//! - after a fixed amount of guest writes, today's full-read incremental
//!   (the point in time read whole, deduplicated against the store);
//! - the incremental from the dirty bitmap (only the changed clusters read).
//!
//! Each size (`--sizes`, GiB of virtual disk holding the benchmark image's
//! data) gets a fresh disk, QEMU and store per run; page caches are dropped
//! before every measured step and every store write is fsynced by the
//! engine. Medians over `--runs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::median;
use vpsbackup_engine::qmp::Qmp;
use vpsbackup_engine::{
    BackupRequest, ChangedSince, Checkpoint, DiskFormat, DiskImage, DiskReader, JobControl,
    PointInTime, Repository, TakeOptions,
};

#[allow(dead_code)] // the bench uses the running server, not the hammering guest
#[path = "../../disk/tests/common/guest.rs"]
mod guest;

/// One measured backup.
struct Step {
    wall: Duration,
    bytes_read: u64,
    incremental: bool,
}

pub struct Args {
    pub images: PathBuf,
    pub work: Option<PathBuf>,
    pub sizes: Vec<u64>,
    pub change_mib: u64,
    pub runs: usize,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let base = args.images.join("base.qcow2");
    if !base.exists() {
        bail!("{} is missing (see bench/make-images.sh)", base.display());
    }
    let work = match &args.work {
        Some(w) => tempfile::tempdir_in(w)?,
        None => tempfile::tempdir()?,
    };
    println!(
        "running-server backups: qcow2 disks holding base.qcow2's data, {} MiB rewritten by the guest \
         (64 KiB writes at random offsets) between the first backup and the next; medians of {} run(s), \
         cold page cache before each step\n",
        args.change_mib,
        args.runs.max(1)
    );
    println!(
        "{:>8}  {:<34} {:>9} {:>12} {:>9} {:>8}",
        "disk", "step", "wall s", "read MiB", "read %", "vs full"
    );
    for &gib in &args.sizes {
        let mut full = Vec::new();
        let mut reread = Vec::new();
        let mut inc = Vec::new();
        for run in 0..args.runs.max(1) {
            let dir = work.path().join(format!("{gib}g-{run}"));
            std::fs::create_dir_all(&dir)?;
            let [a, b, c] = one_run(&base, &dir, gib, args.change_mib)?;
            if !c.incremental || b.incremental {
                bail!("the incremental step did not build on the first backup");
            }
            full.push(a);
            reread.push(b);
            inc.push(c);
            std::fs::remove_dir_all(&dir)?;
        }
        let size = gib << 30;
        let med_wall = |v: &[Step]| median(v.iter().map(|s| s.wall.as_secs_f64()).collect());
        let med_read = |v: &[Step]| median(v.iter().map(|s| s.bytes_read as f64).collect());
        let reread_wall = med_wall(&reread);
        for (name, steps) in [
            ("first backup (full read)", &full),
            ("next, full read (today)", &reread),
            ("next, incremental (dirty bitmap)", &inc),
        ] {
            let wall = med_wall(steps);
            let read = med_read(steps);
            println!(
                "{:>6}Gi  {:<34} {:>9.2} {:>12.1} {:>8.2}% {:>7.3}x",
                gib,
                name,
                wall,
                read / (1 << 20) as f64,
                read * 100.0 / size as f64,
                wall / reread_wall
            );
        }
    }
    Ok(())
}

/// First backup, full re-read, incremental: one fresh disk, QEMU and store.
fn one_run(base: &Path, dir: &Path, gib: u64, change_mib: u64) -> anyhow::Result<[Step; 3]> {
    let disk = dir.join("disk.qcow2");
    run_tool(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(base)
            .arg(&disk),
    )?;
    run_tool(
        Command::new("qemu-img")
            .args(["resize", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg(format!("{gib}G")),
    )?;
    let qsd = guest::Guest::start(dir, &[(&disk, "qcow2")]);
    let store = dir.join("store");
    let repo = Repository::open_local(&store)?;
    let scratch = dir.join("scratch");

    let full = backup(&repo, &qsd.qmp, &disk, &scratch, "b1", Some(None))?;
    guest_writes(&qsd.guests[0], gib << 30, change_mib)?;
    // Today's path on a copy of the store as the first backup left it, so
    // both next backups store the same new chunks; no checkpoint, so the
    // bitmap chain stays as it is for the incremental.
    let copy = dir.join("store-copy");
    run_tool(Command::new("cp").arg("-a").arg(&store).arg(&copy))?;
    let reread = backup(
        &Repository::open_local(&copy)?,
        &qsd.qmp,
        &disk,
        &scratch,
        "full2",
        None,
    )?;
    std::fs::remove_dir_all(&copy)?;
    let inc = backup(&repo, &qsd.qmp, &disk, &scratch, "b2", Some(Some("b1")))?;

    // The incremental is the disk as the guest sees it (no guest writes
    // meanwhile, so reading the image beside QEMU's lock is consistent).
    let restored = dir.join("restored.raw");
    repo.restore("b2", std::slice::from_ref(&restored), &JobControl::new())?;
    run_tool(
        Command::new("qemu-img")
            .args(["compare", "-q", "-U", "-f", "qcow2", "-F", "raw"])
            .arg(&disk)
            .arg(&restored),
    )
    .context("the incremental backup differs from the guest's disk")?;
    Ok([full, reread, inc])
}

/// One backup through a point in time. `checkpoint`: `None` reads in full
/// without touching bitmaps; `Some(base)` starts this backup's bitmap and,
/// with a base, reads only what changed since it.
fn backup(
    repo: &Repository,
    qmp: &Path,
    disk: &Path,
    scratch: &Path,
    id: &str,
    checkpoint: Option<Option<&str>>,
) -> anyhow::Result<Step> {
    drop_caches()?;
    let started = Instant::now();
    let opts = TakeOptions {
        checkpoint: checkpoint.map(|base| Checkpoint {
            new: id.to_owned(),
            base: base.map(str::to_owned),
        }),
        ..TakeOptions::default()
    };
    let pit = PointInTime::take(qmp, &[disk.to_owned()], scratch, &opts)?;
    let taken = started.elapsed();
    let reader: Box<dyn DiskReader> = Box::new(pit.reader(0, DiskFormat::Qcow2)?);
    let opened = started.elapsed();
    let changed = match &opts.checkpoint {
        Some(Checkpoint { base: Some(b), .. }) => Some(ChangedSince {
            base: b.clone(),
            disks: vec![pit.changes(0)],
        }),
        _ => None,
    };
    let req = BackupRequest {
        backup_id: id.to_owned(),
        server_id: "1".into(),
        server_name: "bench".into(),
        disks: vec![DiskImage::pinned(disk, DiskFormat::Qcow2)],
        read_limit: None,
    };
    let mapped = started.elapsed();
    let s = repo.backup_from(
        &req,
        vec![reader],
        changed.as_ref(),
        &Default::default(),
        &JobControl::new(),
    );
    let read = started.elapsed();
    pit.finish(s.is_ok())?;
    let s = s?;
    // Where the time went, for who wants to know (stderr).
    eprintln!(
        "{id}: point in time {:.2}s, export open {:.2}s, dirty map {:.2}s, engine {:.2}s, teardown {:.2}s",
        taken.as_secs_f64(),
        (opened - taken).as_secs_f64(),
        (mapped - opened).as_secs_f64(),
        (read - mapped).as_secs_f64(),
        (started.elapsed() - read).as_secs_f64()
    );
    Ok(Step {
        wall: started.elapsed(),
        bytes_read: s.bytes_read,
        incremental: s.incremental,
    })
}

/// `mib` MiB of 64 KiB guest writes at random 64 KiB-aligned offsets of a
/// disk of `size` bytes, through the guest's view (so QEMU tracks them).
fn guest_writes(guest: &Path, size: u64, mib: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(guest)?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = vec![0u8; 65536];
    for _ in 0..mib * 16 {
        buf.iter_mut().for_each(|b| *b = next() as u8);
        let off = next() % (size / 65536) * 65536;
        f.write_all_at(&buf, off)?;
    }
    f.sync_all()?;
    Ok(())
}

fn drop_caches() -> anyhow::Result<()> {
    run_tool(&mut Command::new("sync"))?;
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop the page cache (needs root)")
}

fn run_tool(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
