//! Measures restore-style writes through this crate: 2 GiB written to a new
//! raw file in 1 MiB pieces from a page-aligned buffer and from a Vec offset
//! from a page boundary, then fsync.
//! `cargo run --release -p vpsbackup-disk --example writespeed -- DIR`

use std::time::Instant;

use vpsbackup_disk::{open_writer, AlignedBuf};

const PIECE: usize = 1 << 20;
const TOTAL: u64 = 2 << 30;

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: writespeed DIR"));
    let mut aligned = AlignedBuf::new(PIECE);
    let mut vec = vec![0u8; PIECE + 8192];
    let skew = 64 + (4096 - vec.as_ptr() as usize % 4096) % 4096;
    for (i, b) in aligned.iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    for (i, b) in vec.iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    for round in 0..2 {
        for (name, buf) in [
            ("aligned", &aligned[..]),
            ("unaligned vec", &vec[skew..skew + PIECE]),
        ] {
            let path = dir.join("writespeed.raw");
            let _ = std::fs::remove_file(&path);
            let t = Instant::now();
            let w = open_writer(&path, TOTAL).unwrap();
            let mut at = 0;
            while at < TOTAL {
                w.write_all_at(buf, at).unwrap();
                at += PIECE as u64;
            }
            let written = t.elapsed().as_secs_f64();
            w.finish().unwrap();
            let total = t.elapsed().as_secs_f64();
            println!(
                "round {round} {name:>14}: writes {:.0} MB/s, with fsync {:.0} MB/s",
                TOTAL as f64 / 1e6 / written,
                TOTAL as f64 / 1e6 / total
            );
            std::fs::remove_file(&path).unwrap();
        }
    }
}
