//! `vpsbackup-bench index`: the on-disk chunk index cache at a provider's
//! scale. A synthetic store gets `--chunks` index entries (index objects of
//! 64 packs x 256 chunks, random ids; the packs themselves are never
//! written, since no backup reads those chunks), then, each in a child
//! process so its memory is measured alone:
//! 1. the cold sync of a fresh node's cache (time, peak RSS);
//! 2. the warm start (index ready from the cache) and lookups per second,
//!    of chunks present and absent;
//! 3. a full backup of base.qcow2 into the store through the warm cache
//!    (wall time, peak RSS);
//! 4. a verify of that backup through the warm cache (its chunks are real);
//! 5. a GC of the whole store. For GC to have real work, the synthetic
//!    packs exist as sparse files of their indexed size (listed, never
//!    read), and a synthetic backup references three chunks of every four
//!    through real chunk lists stored in real packs: GC reads those lists,
//!    sorts the live ids, walks the whole index beside them and
//!    consolidates every index object;
//! 6. for contrast, the whole index loaded into memory, as GC and verify
//!    did before they went through the cache (`--whole`).
//!
//! Prints the figures and the cache's size on disk per million chunks.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::json;
use vpsbackup_engine::format::{
    encode_chunk_list, now_ms, ChunkId, IndexFile, Manifest, ManifestDisk, ManifestHeader,
    PackBuilder, PackEntry, PackId,
};
use vpsbackup_engine::{EngineOptions, LocalStorage, Repository};

use crate::measure::{dir_usage, run_measured};

const PACKS_PER_OBJECT: usize = 64;
const CHUNKS_PER_PACK: usize = 256;
const SEED: u64 = 0x5eed_1dc5;

pub struct Args {
    pub images: PathBuf,
    pub work: Option<PathBuf>,
    pub chunks: u64,
    pub keep: bool,
    /// Also load the whole index into memory (GC's and verify's way before).
    pub whole: bool,
}

/// One chunk in this many is referenced by no backup (GC's garbage).
const UNREFERENCED_EVERY: u64 = 4;
/// Chunk ids per chunk list, as backups write them.
const LIST_FANOUT: usize = vpsbackup_engine::DEFAULT_LIST_FANOUT as usize;

/// splitmix64: deterministic ids, so the lookup step can ask for chunks
/// the store holds without storing the list.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The id of synthetic entry `k` (absent ones use another seed).
fn synthetic_id(seed: u64, k: u64) -> ChunkId {
    let mut id = [0u8; 32];
    for (i, part) in id.chunks_exact_mut(8).enumerate() {
        part.copy_from_slice(
            &mix(seed ^ mix(k.wrapping_mul(4).wrapping_add(i as u64))).to_le_bytes(),
        );
    }
    ChunkId(id)
}

fn open(store: &Path, cache: &Path) -> anyhow::Result<Repository> {
    Ok(Repository::open_with(
        Arc::new(LocalStorage::new(store)?),
        EngineOptions {
            index_cache: Some(cache.to_path_buf()),
            ..EngineOptions::default()
        },
        vpsbackup_engine::DEFAULT_CHUNK_SIZE,
    )?)
}

/// Writes the synthetic index objects.
fn generate(store: &Path, cache: &Path, chunks: u64) -> anyhow::Result<u64> {
    let repo = open(store, cache)?;
    let storage = repo.storage().clone();
    let per_object = (PACKS_PER_OBJECT * CHUNKS_PER_PACK) as u64;
    let mut k = 0u64;
    let mut n = 0u64;
    while k < chunks {
        let mut file = IndexFile::default();
        let end = (k + per_object).min(chunks);
        while k < end {
            let mut pack = [0u8; 16];
            pack[..8].copy_from_slice(&mix(SEED ^ k).to_le_bytes());
            pack[8..].copy_from_slice(&mix(!SEED ^ k).to_le_bytes());
            let in_pack = (end - k).min(CHUNKS_PER_PACK as u64);
            let mut offset = 64u32;
            let entries = (0..in_pack)
                .map(|j| {
                    let e = PackEntry {
                        id: synthetic_id(SEED, k + j),
                        offset,
                        stored_len: 40_000,
                        raw_len: 65_536,
                        flags: 1,
                    };
                    offset += 40_000;
                    e
                })
                .collect();
            // Listed by GC like a real pack (sparse: no data is ever read).
            let path = store.join(PackId(pack).key());
            std::fs::create_dir_all(path.parent().context("pack dir")?)?;
            std::fs::File::create(&path)?.set_len(u64::from(offset))?;
            file.packs.push((PackId(pack), entries));
            k += in_pack;
        }
        storage.put_if_absent(
            &format!("index/{:013}-{:016x}", 1_000_000 + n, mix(n)),
            &file.encode(),
        )?;
        n += 1;
    }
    synthetic_backup(&*storage, chunks)?;
    Ok(n)
}

/// The backup `synthetic`: every chunk but one in [`UNREFERENCED_EVERY`],
/// through chunk lists stored (raw, as backups store them) in real packs
/// of 16 MiB, indexed by one object.
fn synthetic_backup(storage: &dyn vpsbackup_engine::Storage, chunks: u64) -> anyhow::Result<()> {
    let mut lists = Vec::new();
    let mut index = IndexFile::default();
    let mut builder = PackBuilder::new(17 << 20);
    let mut ids = Vec::with_capacity(LIST_FANOUT);
    let mut referenced = 0u64;
    let flush = |builder: &mut PackBuilder, index: &mut IndexFile| -> anyhow::Result<()> {
        let b = std::mem::replace(builder, PackBuilder::new(17 << 20));
        let id = PackId::random();
        let (bytes, entries) = b.finish();
        storage.put_if_absent(&id.key(), &bytes)?;
        index.packs.push((id, entries));
        Ok(())
    };
    for k in 0..chunks {
        if k % UNREFERENCED_EVERY != 0 {
            ids.push(synthetic_id(SEED, k));
            referenced += 1;
        }
        if ids.len() == LIST_FANOUT || (k + 1 == chunks && !ids.is_empty()) {
            let raw = encode_chunk_list(&ids);
            let id = ChunkId::of(&raw);
            builder.add(id, &raw, raw.len() as u32, 0);
            lists.push(id);
            ids.clear();
            if builder.len() >= 16 << 20 {
                flush(&mut builder, &mut index)?;
            }
        }
    }
    if !builder.is_empty() {
        flush(&mut builder, &mut index)?;
    }
    storage.put_if_absent(
        &format!("index/{:013}-synthetic-lists", 2_000_000),
        &index.encode(),
    )?;
    let size = referenced * u64::from(vpsbackup_engine::DEFAULT_CHUNK_SIZE);
    let m = Manifest {
        header: ManifestHeader {
            backup_id: "synthetic".into(),
            server_id: "synthetic".into(),
            server_name: "synthetic".into(),
            created_at_ms: now_ms(),
            chunk_size: vpsbackup_engine::DEFAULT_CHUNK_SIZE,
            list_fanout: LIST_FANOUT as u32,
            disks: vec![ManifestDisk {
                source_path: "synthetic".into(),
                format: "raw".into(),
                size,
                data_bytes: size,
            }],
            labels: Default::default(),
        },
        lists: vec![lists],
    };
    storage.put_if_absent("backups/synthetic", &m.encode())?;
    Ok(())
}

/// Child side of steps 4 to 6: `verify` (backup b1), `gc`, `whole`.
pub fn maintain(op: &str, store: &Path, cache: &Path) -> anyhow::Result<()> {
    let repo = open(store, cache)?;
    let t = Instant::now();
    let out = match op {
        "verify" => {
            let r = repo.verify(Some("b1"), &vpsbackup_engine::JobControl::new())?;
            if !r.is_ok() {
                bail!("backup b1 did not verify: {:?}", r.backups);
            }
            json!({"chunks_checked": r.chunks_checked})
        }
        "gc" => {
            let r = repo.gc()?;
            json!({
                "packs_deleted": r.packs_deleted,
                "packs_rewritten": r.packs_rewritten,
                "chunks_removed": r.chunks_removed,
                "sort_runs": r.sort_runs,
            })
        }
        "whole" => {
            let index =
                vpsbackup_engine::index::ChunkIndex::load(&**repo.storage(), &Default::default())?;
            json!({"entries": index.len()})
        }
        _ => bail!("unknown step {op}"),
    };
    let mut out = out;
    out["wall_s"] = json!(t.elapsed().as_secs_f64());
    println!("{out}");
    Ok(())
}

/// Child side: `sync` (cold or warm start) and lookups.
pub fn step(store: &Path, cache: &Path, chunks: u64, lookups: u64) -> anyhow::Result<()> {
    let repo = open(store, cache)?;
    let t = Instant::now();
    let index = repo.chunk_index()?;
    let ready = t.elapsed();
    let report = index.cache_report().context("no cache")?;
    let mut out = json!({
        "ready_s": ready.as_secs_f64(),
        "rebuilt": report.rebuilt,
        "objects_applied": report.objects_applied,
        "records": report.records,
        "runs": report.runs,
    });
    if lookups > 0 {
        let t = Instant::now();
        let mut found = 0u64;
        for i in 0..lookups {
            found += u64::from(index.has_for_dedup(&synthetic_id(SEED, mix(i) % chunks.max(1))));
        }
        let present = t.elapsed();
        if found != lookups {
            bail!("{found} of {lookups} stored chunks were found");
        }
        let t = Instant::now();
        for i in 0..lookups {
            if index.has_for_dedup(&synthetic_id(!SEED, i)) {
                bail!("an absent chunk was found");
            }
        }
        let absent = t.elapsed();
        out["lookups_present_per_s"] = json!(lookups as f64 / present.as_secs_f64());
        out["lookups_absent_per_s"] = json!(lookups as f64 / absent.as_secs_f64());
    }
    println!("{out}");
    Ok(())
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let image = args.images.join("base.qcow2");
    if !image.exists() {
        bail!("{} is missing (bench/make-images.sh)", image.display());
    }
    let work = tempfile::Builder::new()
        .prefix("vpsbackup-index-bench")
        .tempdir_in(args.work.clone().unwrap_or_else(std::env::temp_dir))?;
    let store = work.path().join("store");
    let cache = work.path().join("cache");
    let exe = std::env::current_exe()?;
    let log = |name: &str| work.path().join(format!("{name}.log"));

    eprintln!("generating {} index entries", args.chunks);
    let t = Instant::now();
    let objects = generate(&store, &cache, args.chunks)?;
    let generated = t.elapsed();
    let (index_bytes, _) = dir_usage(&store.join("index"))?;
    eprintln!("  {objects} index objects, {index_bytes} bytes, {generated:.1?}");

    let step_cmd = |lookups: u64| {
        let mut c = Command::new(&exe);
        c.arg("index-step")
            .arg(&store)
            .arg(&cache)
            .arg(args.chunks.to_string())
            .arg(lookups.to_string());
        c
    };
    eprintln!("cold sync");
    let cold = run_measured(&mut step_cmd(0), &log("cold"))?;
    let cold_out: serde_json::Value = serde_json::from_str(cold.stdout.trim())?;
    let (cache_bytes, _) = dir_usage(&cache)?;
    eprintln!("warm start and lookups");
    let warm = run_measured(&mut step_cmd(1_000_000), &log("warm"))?;
    let warm_out: serde_json::Value = serde_json::from_str(warm.stdout.trim())?;
    eprintln!("full backup of {}", image.display());
    let mut backup = Command::new(&exe);
    backup
        .args(["step", "backup"])
        .arg(&store)
        .args(["b1", "s1"])
        .arg(&image)
        .arg("--index-cache")
        .arg(&cache);
    let b = run_measured(&mut backup, &log("backup"))?;
    let maint = |op: &str| -> anyhow::Result<(crate::measure::Measured, serde_json::Value)> {
        eprintln!("{op}");
        let mut c = Command::new(&exe);
        c.args(["index-maintain", op]).arg(&store).arg(&cache);
        let m = run_measured(&mut c, &log(op))?;
        let v = serde_json::from_str(m.stdout.trim())?;
        Ok((m, v))
    };
    let verify = maint("verify")?;
    let whole = if args.whole {
        Some(maint("whole")?)
    } else {
        None
    };
    let gc = maint("gc")?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let per_m = args.chunks as f64 / 1e6;
    println!("Index cache benchmark: {} chunk entries ({objects} index objects, {:.0} MiB of index objects)", args.chunks, mib(index_bytes));
    println!("| step | wall | peak RSS | figures |");
    println!("|---|---|---|---|");
    println!(
        "| generate the synthetic store | {:.1} s | - | |",
        generated.as_secs_f64()
    );
    println!(
        "| cold sync (fresh node) | {:.1} s | {:.0} MiB | index ready in {:.1} s, {} records |",
        cold.wall.as_secs_f64(),
        mib(cold.max_rss),
        cold_out["ready_s"].as_f64().unwrap_or(0.0),
        cold_out["records"]
    );
    println!(
        "| warm start + 2 M lookups | {:.1} s | {:.0} MiB | index ready in {:.2} s; {:.0} lookups/s of present chunks, {:.0}/s of absent ones |",
        warm.wall.as_secs_f64(),
        mib(warm.max_rss),
        warm_out["ready_s"].as_f64().unwrap_or(0.0),
        warm_out["lookups_present_per_s"].as_f64().unwrap_or(0.0),
        warm_out["lookups_absent_per_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "| full backup of base.qcow2 (warm cache) | {:.1} s | {:.0} MiB | {} |",
        b.wall.as_secs_f64(),
        mib(b.max_rss),
        b.stdout.trim()
    );
    println!(
        "| verify of b1 (warm cache) | {:.1} s | {:.0} MiB | {} |",
        verify.0.wall.as_secs_f64(),
        mib(verify.0.max_rss),
        verify.1
    );
    if let Some((m, v)) = &whole {
        println!(
            "| the whole index loaded into memory (GC's and verify's way before) | {:.1} s | {:.0} MiB | {v} |",
            m.wall.as_secs_f64(),
            mib(m.max_rss)
        );
    }
    println!(
        "| GC: {} live chunk ids from the synthetic backup's lists, the whole index walked and consolidated | {:.1} s | {:.0} MiB | {} |",
        args.chunks - args.chunks.div_ceil(UNREFERENCED_EVERY),
        gc.0.wall.as_secs_f64(),
        mib(gc.0.max_rss),
        gc.1
    );
    println!(
        "cache on disk: {:.0} MiB, {:.1} MiB per million chunks",
        mib(cache_bytes),
        mib(cache_bytes) / per_m
    );
    if args.keep {
        let kept = work.keep();
        eprintln!("kept {}", kept.display());
    }
    Ok(())
}
