//! `vpsbackup store ...`: work on a bare store with no catalog (disaster
//! recovery, scripts, the benchmark): list, show, back up, restore, verify,
//! delete and collect. The store is a directory or `s3://BUCKET/PREFIX`
//! (with the global `--s3-endpoint` / `--s3-region`). Every command exits
//! non-zero with a message on failure; `--json` prints one machine-readable
//! line instead of the human summary.

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, UNIX_EPOCH};
use vpsbackup_engine::{
    BackupRequest, DiskImage, EngineOptions, GcExclusion, JobControl, LocalStorage, Repository,
    RequestCounts, StoreKey, StoreLocation,
};

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Create a new store in an empty (or absent) directory: encrypted by
    /// default, with the key file --key-file (written when it does not
    /// exist: keep a copy apart from the store) or the passphrase in
    /// VPSBACKUP_PASSPHRASE.
    Init {
        dir: PathBuf,
        /// Create an unencrypted store instead.
        #[arg(long)]
        no_encryption: bool,
        #[arg(long)]
        json: bool,
    },
    /// An encrypted store's keys: each one opens the store; add a new one
    /// and remove the old to rotate without rewriting data.
    #[command(subcommand)]
    Key(KeyCommand),
    /// List the backups a store holds.
    Ls {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show one backup: server, time, disks.
    Show {
        dir: PathBuf,
        backup: String,
        #[arg(long)]
        json: bool,
    },
    /// Back up a server's disks into the store (created if empty).
    Backup {
        dir: PathBuf,
        /// Backup id, unique in the store: [A-Za-z0-9._-]{1,128}.
        #[arg(long)]
        id: String,
        #[arg(long)]
        server_id: String,
        #[arg(long, default_value = "")]
        server_name: String,
        /// A disk image or block device; repeat for each disk, in order.
        #[arg(long = "disk", required = true)]
        disks: Vec<PathBuf>,
        /// Open the disks as this format instead of detecting it from their
        /// first bytes (which a guest controls): once for all, or per --disk.
        #[arg(long = "disk-format", value_parser = ["raw", "qcow2", "block"])]
        disk_formats: Vec<String>,
        /// Read at most this many bytes per second.
        #[arg(long)]
        read_limit: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup's disks (raw, or qcow2 when the target ends in .qcow2).
    Restore {
        dir: PathBuf,
        backup: String,
        /// Restore only this disk (0-based); then give one --to.
        #[arg(long)]
        disk: Option<usize>,
        /// Target path; repeat once per disk when --disk is not given.
        #[arg(long = "to", required = true)]
        to: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Re-read and re-hash every chunk of one backup or of all.
    Verify {
        dir: PathBuf,
        #[arg(long)]
        backup: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a backup's manifest (its data goes at the next gc).
    Delete { dir: PathBuf, backup: String },
    /// Reclaim space no backup references; safe beside running backups.
    Gc {
        dir: PathBuf,
        /// Keep objects younger than this many seconds.
        #[arg(long)]
        grace: Option<u64>,
        /// Run even where the store's server ignores conditional writes
        /// (Garage), so its GC lock cannot keep a second GC out: you vouch
        /// that nothing else collects this store meanwhile.
        #[arg(long)]
        exclusive: bool,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the index from the pack trailers (lost or damaged index objects).
    RebuildIndex {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Stored bytes, logical bytes, object counts.
    Stats {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// List the store's keys.
    List {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Add a key (opening the store with --key-file or VPSBACKUP_PASSPHRASE):
    /// a key file (written when it does not exist) or the passphrase in
    /// VPSBACKUP_NEW_PASSPHRASE.
    Add {
        dir: PathBuf,
        /// The new key file.
        #[arg(long, conflicts_with = "new_passphrase")]
        new_key_file: Option<PathBuf>,
        /// The new key is the passphrase in VPSBACKUP_NEW_PASSPHRASE.
        #[arg(long)]
        new_passphrase: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove a key by its id (refused for the last one).
    Remove { dir: PathBuf, id: String },
}

/// The global `--s3-endpoint` and `--s3-region`, set once by [`run`].
static S3_FLAGS: OnceLock<(Option<String>, Option<String>)> = OnceLock::new();

/// Opens an existing store; only `backup` may create one.
fn open_existing(dir: &Path, key: &StoreKey) -> anyhow::Result<Repository> {
    let location = location(dir)?;
    if let StoreLocation::Local(dir) = &location {
        if !dir.join("config").is_file() {
            bail!(
                "{} is not a vpsbackup store (no config object)",
                dir.display()
            );
        }
        return open(dir, key);
    }
    let storage = location
        .open()
        .with_context(|| format!("open store {location}"))?;
    if storage.head("config")?.is_none() {
        bail!("{location} is not a vpsbackup store (no config object)");
    }
    Repository::open_keyed(
        storage,
        EngineOptions::default(),
        vpsbackup_engine::DEFAULT_CHUNK_SIZE,
        key,
    )
    .with_context(|| format!("open store {location}"))
}

fn location(dir: &Path) -> anyhow::Result<StoreLocation> {
    let (endpoint, region) = S3_FLAGS.get().cloned().unwrap_or_default();
    Ok(StoreLocation::parse(
        &dir.to_string_lossy(),
        endpoint.as_deref(),
        region.as_deref(),
    )?)
}

/// Opens a store; an empty one is created, encrypted when a key is given.
fn open(dir: &Path, key: &StoreKey) -> anyhow::Result<Repository> {
    if let loc @ StoreLocation::S3(_) = location(dir)? {
        return Repository::open_location_keyed(&loc, key)
            .with_context(|| format!("open store {loc}"));
    }
    let storage =
        LocalStorage::new(dir).with_context(|| format!("open store {}", dir.display()))?;
    Repository::open_keyed(
        Arc::new(storage),
        EngineOptions::default(),
        vpsbackup_engine::DEFAULT_CHUNK_SIZE,
        key,
    )
    .with_context(|| format!("open store {}", dir.display()))
}

/// The key `--key-file` names, else the passphrase in VPSBACKUP_PASSPHRASE.
fn key_from(key_file: Option<PathBuf>) -> StoreKey {
    match key_file {
        Some(p) => StoreKey::KeyFile(p),
        None => vpsbackup_service::settings::passphrase_from_env(),
    }
}

/// A key file to make a key from: written first when it does not exist.
fn ensure_key_file(path: &Path) -> anyhow::Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    vpsbackup_engine::generate_key_file(path)
        .with_context(|| format!("write the key file {}", path.display()))?;
    Ok(true)
}

fn init(
    dir: &Path,
    no_encryption: bool,
    key_file: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let key = key_from(key_file);
    if no_encryption && !key.is_none() {
        bail!("--no-encryption takes no key: leave out --key-file and VPSBACKUP_PASSPHRASE");
    }
    let mut wrote_key_file = false;
    match &key {
        StoreKey::None if !no_encryption => bail!(
            "an encrypted store needs a key: give --key-file PATH (written when it does not exist) or set VPSBACKUP_PASSPHRASE; or create an unencrypted store with --no-encryption"
        ),
        StoreKey::KeyFile(p) => wrote_key_file = ensure_key_file(p)?,
        _ => {}
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let storage =
        LocalStorage::new(dir).with_context(|| format!("open store {}", dir.display()))?;
    let repo = Repository::init(
        Arc::new(storage),
        EngineOptions::default(),
        vpsbackup_engine::DEFAULT_CHUNK_SIZE,
        &key,
    )
    .with_context(|| format!("create a store in {}", dir.display()))?;
    let keys = repo.list_keys()?;
    if json {
        println!(
            "{}",
            json!({"op": "init", "store_id": repo.config().store_id, "encrypted": repo.is_encrypted(),
                   "key_ids": keys.iter().map(|k| &k.id).collect::<Vec<_>>()})
        );
    } else if repo.is_encrypted() {
        println!(
            "created encrypted store {} in {} (key {}, {})",
            repo.config().store_id,
            dir.display(),
            keys[0].id,
            keys[0].kind
        );
        if let (true, StoreKey::KeyFile(p)) = (wrote_key_file, &key) {
            println!(
                "wrote the key file {}: keep a copy apart from the store; without a key the data cannot be read",
                p.display()
            );
        }
    } else {
        println!(
            "created unencrypted store {} in {}",
            repo.config().store_id,
            dir.display()
        );
    }
    Ok(())
}

fn key_command(cmd: KeyCommand, key: &StoreKey) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::List { dir, json } => {
            let repo = open_existing(&dir, key)?;
            let keys = repo.list_keys()?;
            if json {
                let list: Vec<_> = keys
                    .iter()
                    .map(|k| json!({"id": k.id, "kind": k.kind, "created_at_ms": k.created_at_ms,
                                    "argon2": k.argon2.map(|(m, t, p)| json!({"memory_kib": m, "passes": t, "lanes": p}))}))
                    .collect();
                println!(
                    "{}",
                    json!({"encrypted": repo.is_encrypted(), "keys": list})
                );
            } else if !repo.is_encrypted() {
                println!("the store is not encrypted; it has no keys");
            } else {
                println!(
                    "{:<18} {:<11} {:<14} PARAMETERS",
                    "KEY", "KIND", "CREATED(ms)"
                );
                for k in keys {
                    let params = k
                        .argon2
                        .map(|(m, t, p)| format!("argon2id m={m}KiB t={t} p={p}"))
                        .unwrap_or_default();
                    println!(
                        "{:<18} {:<11} {:<14} {params}",
                        k.id, k.kind, k.created_at_ms
                    );
                }
            }
        }
        KeyCommand::Add {
            dir,
            new_key_file,
            new_passphrase,
            json,
        } => {
            let new = match (new_key_file, new_passphrase) {
                (Some(p), false) => StoreKey::KeyFile(p),
                (None, true) => match std::env::var("VPSBACKUP_NEW_PASSPHRASE") {
                    Ok(p) if !p.is_empty() => StoreKey::Passphrase(p),
                    _ => bail!("--new-passphrase reads the new passphrase from VPSBACKUP_NEW_PASSPHRASE, which is not set"),
                },
                _ => bail!("give the new key: --new-key-file PATH or --new-passphrase"),
            };
            let repo = open_existing(&dir, key)?;
            if !repo.is_encrypted() {
                bail!("the store is not encrypted, so it has no keys to add to");
            }
            if let StoreKey::KeyFile(p) = &new {
                ensure_key_file(p)?;
            }
            let k = repo.add_key(&new)?;
            if json {
                println!("{}", json!({"op": "key-add", "id": k.id, "kind": k.kind}));
            } else {
                println!("added key {} ({})", k.id, k.kind);
            }
        }
        KeyCommand::Remove { dir, id } => {
            let repo = open_existing(&dir, key)?;
            repo.remove_key(&id)?;
            println!("removed key {id}");
        }
    }
    Ok(())
}

/// Requests the store's backend sent since `before` (object stores only).
fn requests_since(repo: &Repository, before: Option<RequestCounts>) -> Option<RequestCounts> {
    Some(repo.storage().request_counts()?.since(&before?))
}

fn ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Peak resident memory of this process (VmHWM), bytes.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

pub fn run(cmd: StoreCommand, global: &crate::admin::Global) -> anyhow::Result<()> {
    let _ = S3_FLAGS.set((global.s3_endpoint.clone(), global.s3_region.clone()));
    let key = &match &cmd {
        // Init makes its key itself (and may write the key file).
        StoreCommand::Init { .. } => StoreKey::None,
        _ => key_from(global.key_file.clone()),
    };
    match cmd {
        StoreCommand::Init {
            dir,
            no_encryption,
            json,
        } => init(&dir, no_encryption, global.key_file.clone(), json)?,
        StoreCommand::Key(cmd) => key_command(cmd, key)?,
        StoreCommand::Ls { dir, json } => {
            let repo = open_existing(&dir, key)?;
            let backups = repo.list_backups()?;
            // Damaged manifests are left out of the list: name them.
            for id in repo.backup_ids()? {
                if !backups.iter().any(|b| b.backup_id == id) {
                    eprintln!("warning: backup {id} has a damaged manifest; run verify");
                }
            }
            if json {
                let list: Vec<_> = backups
                    .iter()
                    .map(|b| {
                        json!({"backup_id": b.backup_id, "server_id": b.server_id,
                               "server_name": b.server_name, "created_at_ms": ms(b.created_at),
                               "disks": b.disks.len(), "data_bytes": b.data_bytes})
                    })
                    .collect();
                println!("{}", json!({ "backups": list }));
            } else {
                println!(
                    "{:<24} {:<20} {:<14} {:>5} {:>12}",
                    "BACKUP", "SERVER", "CREATED(ms)", "DISKS", "DATA(MiB)"
                );
                for b in backups {
                    println!(
                        "{:<24} {:<20} {:<14} {:>5} {:>12.1}",
                        b.backup_id,
                        b.server_id,
                        ms(b.created_at),
                        b.disks.len(),
                        mib(b.data_bytes)
                    );
                }
            }
        }
        StoreCommand::Show { dir, backup, json } => {
            let repo = open_existing(&dir, key)?;
            let b = repo.backup_info(&backup)?;
            let disks: Vec<_> = b
                .disks
                .iter()
                .map(|d| json!({"index": d.index, "source_path": d.source_path, "size": d.size, "format": d.format}))
                .collect();
            let v = json!({"backup_id": b.backup_id, "server_id": b.server_id, "server_name": b.server_name,
                           "created_at_ms": ms(b.created_at), "data_bytes": b.data_bytes, "disks": disks});
            if json {
                println!("{v}");
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        StoreCommand::Backup {
            dir,
            id,
            server_id,
            server_name,
            disks,
            disk_formats,
            read_limit,
            json,
        } => {
            crate::admin::check_disk_format_count(disks.len(), disk_formats.len())?;
            let disks = disks
                .into_iter()
                .enumerate()
                .map(|(i, path)| {
                    // Without --disk-format the operator vouches for the images.
                    match disk_formats.get(i).or(disk_formats.first()) {
                        Some(f) => Ok(DiskImage::pinned(
                            path,
                            f.parse().map_err(|e: String| anyhow::anyhow!(e))?,
                        )),
                        None => Ok(DiskImage::detect(path)),
                    }
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let repo = open(&dir, key)?;
            let req = BackupRequest {
                backup_id: id,
                server_id,
                server_name,
                disks,
                read_limit,
            };
            let start = Instant::now();
            let before = repo.storage().request_counts();
            let s = repo.backup(&req, &JobControl::new())?;
            let secs = start.elapsed().as_secs_f64();
            let requests = requests_since(&repo, before);
            if json {
                let mut v = json!({"op": "backup", "backup_id": s.backup_id, "seconds": secs,
                           "logical_bytes": s.logical_bytes, "data_bytes": s.data_bytes,
                           "stored_bytes": s.stored_bytes, "chunks_total": s.chunks_total,
                           "chunks_new": s.chunks_new, "peak_rss_bytes": peak_rss()});
                if let Some(r) = requests {
                    v["requests"] =
                        json!({"put": r.put, "get": r.get, "list": r.list, "delete": r.delete});
                }
                println!("{v}");
            } else {
                println!(
                    "backup {}: {:.1} MiB of data from {:.1} MiB of disk in {secs:.2} s; {} of {} chunks new, store grew {:.1} MiB",
                    s.backup_id,
                    mib(s.data_bytes),
                    mib(s.logical_bytes),
                    s.chunks_new,
                    s.chunks_total,
                    mib(s.stored_bytes)
                );
                if let Some(r) = requests {
                    println!("store requests: {r}");
                }
            }
        }
        StoreCommand::Restore {
            dir,
            backup,
            disk,
            to,
            json,
        } => {
            let repo = open_existing(&dir, key)?;
            let start = Instant::now();
            let before = repo.storage().request_counts();
            let job = JobControl::new();
            let r = match disk {
                Some(d) => {
                    if to.len() != 1 {
                        bail!("--disk {d} takes exactly one --to");
                    }
                    repo.restore_disk(&backup, d, &to[0], &job)?
                }
                None => repo.restore(&backup, &to, &job)?,
            };
            let secs = start.elapsed().as_secs_f64();
            let requests = requests_since(&repo, before);
            if json {
                let mut v = json!({"op": "restore", "backup_id": backup, "seconds": secs,
                           "bytes_written": r.bytes_written, "chunks_written": r.chunks_written,
                           "chunks_skipped": r.chunks_skipped, "peak_rss_bytes": peak_rss()});
                if let Some(r) = requests {
                    v["requests"] =
                        json!({"put": r.put, "get": r.get, "list": r.list, "delete": r.delete});
                }
                println!("{v}");
            } else {
                println!(
                    "restored {backup} in {secs:.2} s: {:.1} MiB written, {} chunks written, {} unchanged",
                    mib(r.bytes_written),
                    r.chunks_written,
                    r.chunks_skipped
                );
            }
        }
        StoreCommand::Verify { dir, backup, json } => {
            let repo = open_existing(&dir, key)?;
            let start = Instant::now();
            let report = repo.verify(backup.as_deref(), &JobControl::new())?;
            let secs = start.elapsed().as_secs_f64();
            if json {
                let list: Vec<_> = report
                    .backups
                    .iter()
                    .map(|b| json!({"backup_id": b.backup_id, "ok": b.is_ok(),
                                    "missing_chunks": b.missing_chunks, "corrupt_chunks": b.corrupt_chunks,
                                    "tampered_chunks": b.tampered_chunks,
                                    "manifest_error": b.manifest_error}))
                    .collect();
                println!(
                    "{}",
                    json!({"op": "verify", "ok": report.is_ok(), "seconds": secs,
                           "chunks_checked": report.chunks_checked, "backups": list,
                           "peak_rss_bytes": peak_rss()})
                );
            } else {
                for b in &report.backups {
                    if b.is_ok() {
                        println!("{}: ok", b.backup_id);
                    } else {
                        println!(
                            "{}: DAMAGED ({} missing, {} corrupt chunks){}",
                            b.backup_id,
                            b.missing_chunks.len(),
                            b.corrupt_chunks.len(),
                            b.manifest_error
                                .as_deref()
                                .map(|e| format!("; manifest: {e}"))
                                .unwrap_or_default()
                        );
                        for c in &b.missing_chunks {
                            println!("  missing {c}");
                        }
                        for c in &b.corrupt_chunks {
                            if b.tampered_chunks.contains(c) {
                                println!("  tampered {c} (fails authentication)");
                            } else {
                                println!("  corrupt {c}");
                            }
                        }
                    }
                }
                println!("{} chunks checked in {secs:.2} s", report.chunks_checked);
            }
            if !report.is_ok() {
                let bad: Vec<&str> = report
                    .backups
                    .iter()
                    .filter(|b| !b.is_ok())
                    .map(|b| b.backup_id.as_str())
                    .collect();
                bail!("verify found damaged backups: {}", bad.join(", "));
            }
        }
        StoreCommand::Delete { dir, backup } => {
            let repo = open_existing(&dir, key)?;
            repo.backup_info(&backup)?;
            repo.delete_backup(&backup)?;
            println!("deleted {backup}; run gc to reclaim its space");
        }
        StoreCommand::Gc {
            dir,
            grace,
            exclusive,
            json,
        } => {
            let mut repo = open_existing(&dir, key)?;
            let mut o = repo.options().clone();
            if let Some(g) = grace {
                o.gc_grace = Duration::from_secs(g);
            }
            if exclusive {
                o.gc_exclusion = GcExclusion::Operator;
            }
            repo = repo.with_options(o);
            let start = Instant::now();
            let r = repo.gc()?;
            let secs = start.elapsed().as_secs_f64();
            if json {
                println!(
                    "{}",
                    json!({"op": "gc", "seconds": secs, "bytes_freed": r.bytes_freed,
                           "packs_deleted": r.packs_deleted, "packs_rewritten": r.packs_rewritten,
                           "chunks_removed": r.chunks_removed, "packs_pending": r.packs_pending,
                           "peak_rss_bytes": peak_rss()})
                );
            } else {
                println!(
                    "gc: freed {:.1} MiB, {} packs deleted, {} rewritten, {} chunks removed, {} packs pending",
                    mib(r.bytes_freed),
                    r.packs_deleted,
                    r.packs_rewritten,
                    r.chunks_removed,
                    r.packs_pending
                );
            }
        }
        StoreCommand::RebuildIndex { dir, json } => {
            let repo = open_existing(&dir, key)?;
            let r = repo.rebuild_index()?;
            if json {
                println!(
                    "{}",
                    json!({"op": "rebuild-index", "packs": r.packs, "chunks": r.chunks,
                           "damaged_packs": r.damaged_packs})
                );
            } else {
                println!("indexed {} chunks in {} packs", r.chunks, r.packs);
                for p in &r.damaged_packs {
                    println!("  damaged pack (not indexed): {p}");
                }
            }
            if !r.damaged_packs.is_empty() {
                bail!(
                    "{} pack(s) are damaged; run verify to see the backups affected",
                    r.damaged_packs.len()
                );
            }
        }
        StoreCommand::Stats { dir, json } => {
            let repo = open_existing(&dir, key)?;
            let s = repo.stats()?;
            if json {
                println!(
                    "{}",
                    json!({"op": "stats", "stored_bytes": s.stored_bytes,
                           "logical_data_bytes": s.logical_data_bytes, "backups": s.backups,
                           "packs": s.packs, "objects": s.objects})
                );
            } else {
                println!(
                    "{} backups, {:.1} MiB of disk data stored in {:.1} MiB ({} packs, {} objects)",
                    s.backups,
                    mib(s.logical_data_bytes),
                    mib(s.stored_bytes),
                    s.packs,
                    s.objects
                );
                println!("store: {}", repo.describe());
            }
        }
    }
    Ok(())
}
