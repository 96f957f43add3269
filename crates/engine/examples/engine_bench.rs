//! Quick measurements of the engine alone (the `vpsbackup store` commands
//! need the whole binary): `engine_bench STORE backup ID DISK...`,
//! `engine_bench STORE restore ID TARGET...`, `engine_bench STORE verify`,
//! `engine_bench STORE gc`. Prints time, store size and peak RSS.

use std::path::PathBuf;
use std::time::Instant;
use vpsbackup_engine::{BackupRequest, DiskImage, JobControl, Repository};

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let chunk_size = match std::env::var("CHUNK_SIZE") {
        Ok(c) => c.parse()?,
        Err(_) => vpsbackup_engine::DEFAULT_CHUNK_SIZE,
    };
    let storage = std::sync::Arc::new(vpsbackup_engine::LocalStorage::new(std::path::Path::new(
        &args[0],
    ))?);
    let mut repo = Repository::open_with(storage, Default::default(), chunk_size)?;
    // Knobs for measuring alternatives without rebuilding.
    if let Ok(w) = std::env::var("WORKERS") {
        let mut o = repo.options().clone();
        o.workers = w.parse()?;
        repo = repo.with_options(o);
    }
    if let Ok(level) = std::env::var("ZSTD_LEVEL") {
        let mut o = repo.options().clone();
        o.zstd_level = level.parse()?;
        repo = repo.with_options(o);
    }
    let job = JobControl::new();
    let t = Instant::now();
    let what = match args[1].as_str() {
        "backup" => format!(
            "{:?}",
            repo.backup(
                &BackupRequest {
                    backup_id: args[2].clone(),
                    server_id: "bench".into(),
                    server_name: "bench".into(),
                    disks: args[3..].iter().map(DiskImage::detect).collect(),
                    read_limit: None,
                },
                &job,
            )?
        ),
        "restore" => {
            let targets: Vec<PathBuf> = args[3..].iter().map(PathBuf::from).collect();
            format!("{:?}", repo.restore(&args[2], &targets, &job)?)
        }
        "verify" => {
            let r = repo.verify(args.get(2).map(|s| s.as_str()), &job)?;
            format!("ok={} checked={}", r.is_ok(), r.chunks_checked)
        }
        "gc" => format!("{:?}", repo.gc()?),
        other => return Err(format!("unknown op {other}").into()),
    };
    let secs = t.elapsed().as_secs_f64();
    let st = repo.stats()?;
    println!(
        "{} {:.2}s peak_rss={:.0}MiB store={:.1}MB objects={} | {what}",
        args[1],
        secs,
        peak_rss_mib(),
        st.stored_bytes as f64 / 1e6,
        st.objects
    );
    Ok(())
}
