//! `vpsbackup-bench`: backs up and restores the benchmark images
//! (bench/make-images.sh) and prints wall time, throughput, store growth and
//! peak memory per step, optionally beside restic and borg on the same
//! images in the same run.
//!
//! Each engine step runs as a child process of this binary (the hidden
//! `step` subcommand), so peak memory is measured per step with `wait4`.
//! Errors: anyhow throughout (this is a binary).

mod index;
mod measure;
mod peers;
mod running;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::json;

use measure::{allocated_bytes, dir_usage, for_each_file, run_measured, same_guest_view, Measured};
use peers::Peer;

#[derive(Parser)]
#[command(
    name = "vpsbackup-bench",
    about = "Back up and restore the benchmark images; print speed, store growth and memory"
)]
struct Cli {
    #[command(subcommand)]
    step: Option<StepCommand>,
    /// Directory holding base.raw, day2.raw and base.qcow2 (bench/make-images.sh).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Also run restic and borg on the same images and print ratios.
    #[arg(long)]
    with_peers: bool,
    /// Repeat everything N times (fresh stores each time) and print medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Where stores and restored disks go (a temp dir inside it); needs
    /// about 3x the images' data free.
    #[arg(long)]
    work: Option<PathBuf>,
    /// Keep the work dir for inspection.
    #[arg(long)]
    keep: bool,
    /// Also run every step on an encrypted store (a key file; tool
    /// `ours-enc`) in the same run, and print its cost against ours.
    #[arg(long)]
    with_encryption: bool,
}

/// One engine step, run in a child process so its memory is measured alone.
#[derive(Subcommand)]
enum StepCommand {
    #[command(hide = true)]
    Step {
        #[command(subcommand)]
        op: EngineOp,
    },
    /// Backups of a running server (qemu-storage-daemon): first backup,
    /// today's full-read incremental and the dirty-bitmap incremental after
    /// a fixed amount of guest writes, per disk size (needs root).
    Running {
        /// Virtual disk sizes to measure, GiB (each holds base.qcow2's data).
        #[arg(long, value_delimiter = ',', default_values_t = [16u64])]
        sizes: Vec<u64>,
        /// MiB the guest rewrites between the backups (25: 400 x 64 KiB, as
        /// day2.raw, about 1% of the image's data; 164 is 1% of 16 GiB).
        #[arg(long, default_value_t = 25)]
        change_mib: u64,
    },
    /// The on-disk chunk index cache at scale: a synthetic store of
    /// `--chunks` index entries, its cold sync, warm start, lookups per
    /// second, and a full backup of base.qcow2 into it (peak RSS).
    Index {
        /// Chunk entries in the synthetic store (50 M for the report;
        /// fewer for a quick run).
        #[arg(long, default_value_t = 50_000_000)]
        chunks: u64,
        /// Also measure the whole index loaded into memory (how GC and
        /// verify held it before; ~52 bytes per chunk).
        #[arg(long)]
        whole: bool,
    },
    #[command(hide = true)]
    IndexStep {
        store: PathBuf,
        cache: PathBuf,
        chunks: u64,
        lookups: u64,
    },
    #[command(hide = true)]
    IndexMaintain {
        op: String,
        store: PathBuf,
        cache: PathBuf,
    },
}

#[derive(Subcommand)]
enum EngineOp {
    Backup {
        store: PathBuf,
        id: String,
        server: String,
        disks: Vec<PathBuf>,
        /// The store's key file: an empty store is created encrypted.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Look chunks up through this on-disk index cache.
        #[arg(long)]
        index_cache: Option<PathBuf>,
    },
    Restore {
        store: PathBuf,
        id: String,
        targets: Vec<PathBuf>,
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.step {
        Some(StepCommand::Step { op }) => return run_engine_step(op),
        Some(StepCommand::Running {
            ref sizes,
            change_mib,
        }) => {
            return running::run(&running::Args {
                images: cli
                    .images
                    .clone()
                    .context("--images DIR is required (see bench/make-images.sh)")?,
                work: cli.work.clone(),
                sizes: sizes.clone(),
                change_mib,
                runs: cli.runs,
            })
        }
        Some(StepCommand::Index { chunks, whole }) => {
            return index::run(&index::Args {
                images: cli
                    .images
                    .clone()
                    .context("--images DIR is required (see bench/make-images.sh)")?,
                work: cli.work.clone(),
                chunks,
                keep: cli.keep,
                whole,
            })
        }
        Some(StepCommand::IndexStep {
            ref store,
            ref cache,
            chunks,
            lookups,
        }) => return index::step(store, cache, chunks, lookups),
        Some(StepCommand::IndexMaintain {
            ref op,
            ref store,
            ref cache,
        }) => return index::maintain(op, store, cache),
        None => {}
    }
    let images = cli
        .images
        .clone()
        .context("--images DIR is required (see bench/make-images.sh)")?;
    let bench = Bench::new(&images, &cli)?;
    let mut all: Vec<StepResult> = Vec::new();
    for run in 1..=cli.runs.max(1) {
        eprintln!("== run {run} of {}", cli.runs.max(1));
        all.extend(bench.run_once(run)?);
    }
    print_report(&all, cli.runs.max(1), &bench);
    Ok(())
}

/// The child side: one backup or restore through the engine, summary as JSON.
fn run_engine_step(op: EngineOp) -> anyhow::Result<()> {
    use vpsbackup_engine::{BackupRequest, DiskImage, JobControl, Repository, StoreKey};
    let job = JobControl::new();
    let key = |k: Option<PathBuf>| k.map_or(StoreKey::None, StoreKey::KeyFile);
    let out = match op {
        EngineOp::Backup {
            store,
            id,
            server,
            disks,
            key_file,
            index_cache,
        } => {
            let repo = Repository::open_local_keyed(&store, &key(key_file))?;
            let repo = repo.with_options(vpsbackup_engine::EngineOptions {
                index_cache,
                ..repo.options().clone()
            });
            let s = repo.backup(
                &BackupRequest {
                    backup_id: id,
                    server_id: server.clone(),
                    server_name: server,
                    disks: disks.into_iter().map(DiskImage::detect).collect(),
                    read_limit: None,
                },
                &job,
            )?;
            json!({
                "data_bytes": s.data_bytes,
                "stored_bytes": s.stored_bytes,
                "chunks_total": s.chunks_total,
                "chunks_new": s.chunks_new,
            })
        }
        EngineOp::Restore {
            store,
            id,
            targets,
            key_file,
        } => {
            let repo = Repository::open_local_keyed(&store, &key(key_file))?;
            let s = repo.restore(&id, &targets, &job)?;
            json!({
                "bytes_written": s.bytes_written,
                "chunks_written": s.chunks_written,
                "chunks_skipped": s.chunks_skipped,
            })
        }
    };
    println!("{out}");
    Ok(())
}

/// One measured step of one tool in one run.
#[derive(Debug, Clone)]
struct StepResult {
    step: &'static str,
    tool: &'static str,
    wall: Duration,
    cpu: Duration,
    /// Bytes of source data the step processed (for MB/s).
    data: u64,
    /// Store/repository growth in bytes (backups only).
    growth: Option<u64>,
    max_rss: u64,
    note: String,
}

struct Bench {
    base_raw: PathBuf,
    day2_raw: PathBuf,
    base_qcow2: PathBuf,
    /// Allocated data of base.raw: the MB/s numerator for raw steps.
    base_data: u64,
    day2_data: u64,
    qcow2_data: u64,
    work: tempfile::TempDir,
    peers: Vec<&'static str>,
    with_encryption: bool,
    exe: PathBuf,
}

const STEP_FULL: &str = "backup base.raw (full)";
const STEP_DAY2: &str = "backup day2.raw (1% changed)";
const STEP_QCOW2: &str = "backup base.qcow2 (2nd server)";
const STEP_RESTORE_NEW: &str = "restore base -> new raw";
const STEP_RESTORE_INPLACE: &str = "restore base -> day2 copy (in place)";
const STEP_RESTORE_QCOW2: &str = "restore base -> new qcow2";
const STEPS: [&str; 6] = [
    STEP_FULL,
    STEP_DAY2,
    STEP_QCOW2,
    STEP_RESTORE_NEW,
    STEP_RESTORE_INPLACE,
    STEP_RESTORE_QCOW2,
];

impl Bench {
    fn new(images: &Path, cli: &Cli) -> anyhow::Result<Bench> {
        let abs = |name: &str| peers::absolute(&images.join(name));
        let base_raw = abs("base.raw")?;
        let day2_raw = abs("day2.raw")?;
        let base_qcow2 = abs("base.qcow2")?;
        let mut peers = Vec::new();
        if cli.with_peers {
            for name in ["restic", "borg"] {
                if !Peer::available(name) {
                    bail!("--with-peers needs {name}: apt-get install -y restic borgbackup");
                }
                peers.push(name);
            }
        }
        let work_parent = cli.work.clone().unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&work_parent)?;
        let work = tempfile::Builder::new()
            .prefix("vpsbackup-bench-")
            .tempdir_in(&work_parent)?;
        eprintln!("work dir: {}", work.path().display());
        Ok(Bench {
            base_data: allocated_bytes(&base_raw)?,
            day2_data: allocated_bytes(&day2_raw)?,
            qcow2_data: std::fs::metadata(&base_qcow2)?.len(),
            base_raw,
            day2_raw,
            base_qcow2,
            work,
            peers,
            with_encryption: cli.with_encryption,
            exe: std::env::current_exe().context("locate own binary")?,
        })
        .map(|b| {
            if cli.keep {
                eprintln!("keeping the work dir");
            }
            b.keep_if(cli.keep)
        })
    }

    fn keep_if(mut self, keep: bool) -> Bench {
        if keep {
            self.work.disable_cleanup(true);
        }
        self
    }

    fn run_once(&self, run: usize) -> anyhow::Result<Vec<StepResult>> {
        let dir = self.work.path().join(format!("run{run}"));
        std::fs::create_dir_all(&dir)?;
        let mut results = self.run_ours(&dir, None)?;
        if self.with_encryption {
            let key = dir.join("store.key");
            vpsbackup_engine::generate_key_file(&key).context("write the key file")?;
            results.extend(self.run_ours(&dir.join("enc"), Some(&key))?);
        }
        for &name in &self.peers {
            results.extend(self.run_peer(name, &dir)?);
        }
        std::fs::remove_dir_all(&dir)?;
        Ok(results)
    }

    fn engine(&self, op: &str) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.args(["step", op]);
        cmd
    }

    /// Every step on a fresh store in `dir`; with `key`, an encrypted
    /// store (tool `ours-enc`).
    fn run_ours(&self, dir: &Path, key: Option<&Path>) -> anyhow::Result<Vec<StepResult>> {
        let tool = if key.is_some() { "ours-enc" } else { "ours" };
        let with_key = |cmd: &mut Command| {
            if let Some(k) = key {
                cmd.arg("--key-file").arg(k);
            }
        };
        let store = dir.join("store");
        std::fs::create_dir_all(&store)?;
        let mut out = Vec::new();
        let backups = [
            (STEP_FULL, "base", "srv-a", &self.base_raw, self.base_data),
            (STEP_DAY2, "day2", "srv-a", &self.day2_raw, self.day2_data),
            (
                STEP_QCOW2,
                "qcow",
                "srv-b",
                &self.base_qcow2,
                self.qcow2_data,
            ),
        ];
        for (step, id, server, image, data) in backups {
            warm_page_cache(image)?;
            let before = dir_usage(&store)?.0;
            let mut cmd = self.engine("backup");
            cmd.arg(&store).arg(id).arg(server).arg(image);
            with_key(&mut cmd);
            let m = run_measured(&mut cmd, &dir.join(format!("backup-{id}.log")))?;
            let growth = dir_usage(&store)?.0.saturating_sub(before);
            let summary: serde_json::Value =
                serde_json::from_str(m.stdout.trim()).context("engine step output")?;
            let note = format!(
                "{} of {} chunks new",
                summary["chunks_new"], summary["chunks_total"]
            );
            out.push(result(step, tool, &m, data, Some(growth), note));
            eprintln!("  {tool}: {step}: {:.2} s", m.wall.as_secs_f64());
        }

        let (store_bytes, store_files) = dir_usage(&store)?;
        let new_raw = dir.join("restore-new.raw");
        let m = self.restore(&store, &new_raw, dir, key)?;
        let sparse = allocated_bytes(&new_raw)?;
        self.check_restored(&new_raw)?;
        out.push(result(
            STEP_RESTORE_NEW,
            tool,
            &m,
            self.base_data,
            None,
            format!(
                "byte-identical; {:.0} MB allocated of {:.0} MB",
                mb(sparse),
                mb(std::fs::metadata(&new_raw)?.len())
            ),
        ));
        std::fs::remove_file(&new_raw)?;

        let inplace = dir.join("restore-inplace.raw");
        copy_sparse(&self.day2_raw, &inplace)?;
        // The copy's writeback belongs to the setup, not to the restore.
        std::fs::File::open(&inplace)?.sync_all()?;
        let m = self.restore(&store, &inplace, dir, key)?;
        self.check_restored(&inplace)?;
        let summary: serde_json::Value = serde_json::from_str(m.stdout.trim())?;
        out.push(result(
            STEP_RESTORE_INPLACE,
            tool,
            &m,
            self.base_data,
            None,
            format!(
                "byte-identical; {} chunks written, {} unchanged",
                summary["chunks_written"], summary["chunks_skipped"]
            ),
        ));
        std::fs::remove_file(&inplace)?;

        let qcow = dir.join("restore-new.qcow2");
        let m = self.restore(&store, &qcow, dir, key)?;
        self.check_restored(&qcow)?;
        out.push(result(
            STEP_RESTORE_QCOW2,
            tool,
            &m,
            self.base_data,
            None,
            format!(
                "byte-identical guest view; file {:.0} MB",
                mb(allocated_bytes(&qcow)?)
            ),
        ));
        std::fs::remove_file(&qcow)?;

        // The store's own file count, for the "one file per 4 MiB" target.
        if let Some(first) = out.first_mut() {
            first.note = format!(
                "{}; store after 3 backups: {:.0} MB in {} files ({:.1} MiB per file)",
                first.note,
                mb(store_bytes),
                store_files,
                store_bytes as f64 / store_files.max(1) as f64 / (1 << 20) as f64
            );
        }
        Ok(out)
    }

    fn restore(
        &self,
        store: &Path,
        target: &Path,
        dir: &Path,
        key: Option<&Path>,
    ) -> anyhow::Result<Measured> {
        warm_tree(store)?;
        let mut cmd = self.engine("restore");
        cmd.arg(store).arg("base").arg(target);
        if let Some(k) = key {
            cmd.arg("--key-file").arg(k);
        }
        let log = dir.join(format!(
            "restore-{}.log",
            target.file_name().unwrap_or_default().to_string_lossy()
        ));
        let m = run_measured(&mut cmd, &log)?;
        eprintln!(
            "  {}: restore -> {}: {:.2} s",
            if key.is_some() { "ours-enc" } else { "ours" },
            target.display(),
            m.wall.as_secs_f64()
        );
        Ok(m)
    }

    fn check_restored(&self, target: &Path) -> anyhow::Result<()> {
        if !same_guest_view(target, &self.base_raw)? {
            bail!(
                "{} differs from {}: the restore is wrong",
                target.display(),
                self.base_raw.display()
            );
        }
        Ok(())
    }

    fn run_peer(&self, name: &'static str, dir: &Path) -> anyhow::Result<Vec<StepResult>> {
        let peer = Peer::init(name, dir)?;
        let mut out = Vec::new();
        let backups = [
            (STEP_FULL, "base", "srv-a", &self.base_raw, self.base_data),
            (STEP_DAY2, "day2", "srv-a", &self.day2_raw, self.day2_data),
            (
                STEP_QCOW2,
                "qcow",
                "srv-b",
                &self.base_qcow2,
                self.qcow2_data,
            ),
        ];
        for (step, id, host, image, data) in backups {
            warm_page_cache(image)?;
            let before = dir_usage(&peer.repo())?.0;
            let m = peer.backup(id, host, image)?;
            let growth = dir_usage(&peer.repo())?.0.saturating_sub(before);
            out.push(result(step, name, &m, data, Some(growth), String::new()));
            eprintln!("  {name}: {step}: {:.2} s", m.wall.as_secs_f64());
        }
        let target = dir.join(format!("{name}-restore"));
        warm_tree(&peer.repo())?;
        let (m, restored) = peer.restore("base", "srv-a", &self.base_raw, &target)?;
        // Ours ends with the disk durable (O_DIRECT writes, then fsync); the
        // peers leave it in the page cache. Their fsync time is shown apart.
        let synced = Instant::now();
        std::fs::File::open(&restored)?.sync_all()?;
        let fsync = synced.elapsed();
        self.check_restored(&restored)?;
        let note = format!(
            "byte-identical; {:.0} MB allocated; not synced: fsync after took {:.2} s",
            mb(allocated_bytes(&restored)?),
            fsync.as_secs_f64()
        );
        out.push(result(
            STEP_RESTORE_NEW,
            name,
            &m,
            self.base_data,
            None,
            note,
        ));
        eprintln!("  {name}: restore: {:.2} s", m.wall.as_secs_f64());
        std::fs::remove_dir_all(&target)?;
        Ok(out)
    }
}

fn result(
    step: &'static str,
    tool: &'static str,
    m: &Measured,
    data: u64,
    growth: Option<u64>,
    note: String,
) -> StepResult {
    StepResult {
        step,
        tool,
        wall: m.wall,
        cpu: m.cpu,
        data,
        growth,
        max_rss: m.max_rss,
        note,
    }
}

/// Reads a whole file once so it sits in the page cache. Called before every
/// tool's backup step: the restores of earlier steps write gigabytes and can
/// evict the images, and whichever tool ran first would otherwise pay for it.
fn warm_page_cache(path: &Path) -> anyhow::Result<()> {
    let mut file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    std::io::copy(&mut file, &mut std::io::sink())
        .with_context(|| format!("read {}", path.display()))?;
    Ok(())
}

/// Reads every file under a store or repository into the page cache before
/// a restore, so each tool restores from the same warm start (our backups
/// write packs with O_DIRECT, the peers through the page cache).
fn warm_tree(dir: &Path) -> anyhow::Result<()> {
    for_each_file(dir, |path, _| warm_page_cache(path))
}

fn copy_sparse(from: &Path, to: &Path) -> anyhow::Result<()> {
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .context("run cp")?;
    if !status.success() {
        bail!("cp {} {} failed", from.display(), to.display());
    }
    Ok(())
}

/// The 1-minute load average and the number of cores.
fn machine_load() -> (String, usize) {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (load, cores)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    v[v.len() / 2]
}

/// Medians per (step, tool), in step order, then ratios and targets.
fn print_report(all: &[StepResult], runs: usize, bench: &Bench) {
    let mut groups: BTreeMap<(usize, usize), Vec<&StepResult>> = BTreeMap::new();
    let tool_rank = |t: &str| match t {
        "ours" => 0,
        "ours-enc" => 1,
        "restic" => 2,
        _ => 3,
    };
    for r in all {
        let step = STEPS.iter().position(|s| *s == r.step).unwrap_or(99);
        groups.entry((step, tool_rank(r.tool))).or_default().push(r);
    }
    struct Row {
        step: &'static str,
        tool: &'static str,
        wall: f64,
        cpu: f64,
        mbps: f64,
        growth: Option<f64>,
        rss: f64,
        note: String,
    }
    let rows: Vec<Row> = groups
        .values()
        .map(|rs| {
            let wall = median(rs.iter().map(|r| r.wall.as_secs_f64()).collect());
            Row {
                step: rs[0].step,
                tool: rs[0].tool,
                wall,
                cpu: median(rs.iter().map(|r| r.cpu.as_secs_f64()).collect()),
                mbps: mb(rs[0].data) / wall,
                growth: rs[0]
                    .growth
                    .map(|_| median(rs.iter().map(|r| mb(r.growth.unwrap_or(0))).collect())),
                rss: median(
                    rs.iter()
                        .map(|r| r.max_rss as f64 / (1 << 20) as f64)
                        .collect(),
                ),
                note: rs[rs.len() / 2].note.clone(),
            }
        })
        .collect();

    println!();
    let (load1, cores) = machine_load();
    println!("machine: {cores} cores, load average {load1} at the end (wall times suffer when it exceeds the cores; cpu s does not)");
    println!(
        "vpsbackup-bench: {} ({:.0} MB data), {} ({:.0} MB), {} ({:.0} MB); {} run(s), medians",
        bench.base_raw.display(),
        mb(bench.base_data),
        bench.day2_raw.display(),
        mb(bench.day2_data),
        bench.base_qcow2.display(),
        mb(bench.qcow2_data),
        runs
    );
    println!(
        "{:<38} {:<7} {:>8} {:>7} {:>9} {:>11} {:>9}  notes",
        "step", "tool", "wall s", "cpu s", "MB/s", "store +MB", "peak MiB"
    );
    for r in &rows {
        println!(
            "{:<38} {:<7} {:>8.2} {:>7.2} {:>9.0} {:>11} {:>9.0}  {}",
            r.step,
            r.tool,
            r.wall,
            r.cpu,
            r.mbps,
            r.growth.map_or("-".to_string(), |g| format!("{g:.1}")),
            r.rss,
            r.note
        );
    }

    let find = |step: &str, tool: &str| rows.iter().find(|r| r.step == step && r.tool == tool);
    if rows.iter().any(|r| r.tool == "ours-enc") {
        println!();
        println!("encryption cost (ours-enc / ours, medians; target: under +10%):");
        for step in [STEP_FULL, STEP_DAY2, STEP_RESTORE_NEW] {
            if let (Some(o), Some(e)) = (find(step, "ours"), find(step, "ours-enc")) {
                let wall = e.wall / o.wall - 1.0;
                let cpu = e.cpu / o.cpu - 1.0;
                println!(
                    "  {} {step:<38} wall {:.2} s vs {:.2} s ({:+.1}%), cpu {:.2} s vs {:.2} s ({:+.1}%)",
                    if wall < 0.10 { "ok  " } else { "MISS" },
                    e.wall,
                    o.wall,
                    wall * 100.0,
                    e.cpu,
                    o.cpu,
                    cpu * 100.0
                );
            }
        }
    }
    if rows.iter().any(|r| r.tool == "restic" || r.tool == "borg") {
        println!();
        println!("speed ratios (their wall time / ours; higher is better for us):");
        for step in STEPS {
            let Some(ours) = find(step, "ours") else {
                continue;
            };
            let mut line = format!("  {step:<38}");
            let mut any = false;
            for peer in ["restic", "borg"] {
                if let Some(p) = find(step, peer) {
                    any = true;
                    line += &format!("  vs {peer}: {:>5.1}x", p.wall / ours.wall);
                    if let (Some(o), Some(t)) = (ours.growth, p.growth) {
                        line += &format!(" (store +{o:.0} MB vs +{t:.0} MB)");
                    }
                    line += &format!(" (peak {:.0} vs {:.0} MiB)", ours.rss, p.rss);
                }
            }
            if any {
                println!("{line}");
            }
        }
    }

    // The targets, checked where this run has the figures.
    println!();
    println!("targets (issue 2):");
    let check = |ok: bool| if ok { "ok  " } else { "MISS" };
    if let Some(d) = find(STEP_DAY2, "ours") {
        let g = d.growth.unwrap_or(f64::MAX);
        println!(
            "  {} day2 store growth {g:.1} MB <= 60 MB",
            check(g <= 60.0)
        );
    }
    let peak = rows
        .iter()
        .filter(|r| r.tool == "ours")
        .map(|r| r.rss)
        .fold(0.0, f64::max);
    println!(
        "  {} peak memory {peak:.0} MiB <= 256 MiB",
        check(peak <= 256.0)
    );
    let ratio_targets = [
        (STEP_FULL, "borg", 5.0),
        (STEP_FULL, "restic", 7.0),
        (STEP_DAY2, "restic", 10.0),
        (STEP_RESTORE_NEW, "restic", 5.0),
    ];
    for (step, peer, want) in ratio_targets {
        if let (Some(o), Some(p)) = (find(step, "ours"), find(step, peer)) {
            let r = p.wall / o.wall;
            println!(
                "  {} {step}: {r:.1}x {peer} (target {want}x)",
                check(r >= want)
            );
        }
    }
}
