//! Measures how fast a disk reads through this crate: the whole data map in
//! 4 MiB pieces into a page-aligned buffer and into a plain Vec, plus the
//! zero check. `cargo run --release -p vpsbackup-disk --example readspeed -- IMAGE`

use std::time::Instant;

use vpsbackup_disk::{is_zero, open_reader, AlignedBuf, DiskReader};

const PIECE: usize = 4 << 20;

fn read_all(reader: &dyn DiskReader, buf: &mut [u8]) -> (u64, u64) {
    let (mut bytes, mut zero) = (0u64, 0u64);
    let mut pos = 0;
    while let Some(e) = reader.next_data(pos).unwrap() {
        let mut at = e.offset;
        while at < e.offset + e.len {
            let n = (PIECE as u64).min(e.offset + e.len - at) as usize;
            reader.read_exact_at(&mut buf[..n], at).unwrap();
            if is_zero(&buf[..n]) {
                zero += n as u64;
            }
            bytes += n as u64;
            at += n as u64;
        }
        pos = e.offset + e.len;
    }
    (bytes, zero)
}

fn main() {
    let path = std::env::args().nth(1).expect("usage: readspeed IMAGE");
    let t = Instant::now();
    let reader = open_reader(path.as_ref()).unwrap();
    println!("open ({}): {:?}", reader.format(), t.elapsed());

    let mut aligned = AlignedBuf::new(PIECE);
    // A Vec offset by 64 bytes from a page boundary, as a plain allocation may be.
    let mut vec = vec![0u8; PIECE + 8192];
    let skew = 64 + (4096 - vec.as_ptr() as usize % 4096) % 4096;
    for round in 0..2 {
        for (name, buf) in [
            ("aligned", &mut aligned[..]),
            ("unaligned vec", &mut vec[skew..skew + PIECE]),
        ] {
            let t = Instant::now();
            let (bytes, zero) = read_all(reader.as_ref(), buf);
            let s = t.elapsed().as_secs_f64();
            println!(
                "round {round} {name:>14}: {:.0} MB in {s:.2} s = {:.0} MB/s ({:.0} MB zero pieces)",
                bytes as f64 / 1e6,
                bytes as f64 / 1e6 / s,
                zero as f64 / 1e6
            );
        }
    }
    let zeros = AlignedBuf::new(256 << 20);
    let t = Instant::now();
    for _ in 0..8 {
        assert!(is_zero(std::hint::black_box(&zeros)));
    }
    println!(
        "is_zero: {:.1} GB/s",
        8.0 * zeros.len() as f64 / 1e9 / t.elapsed().as_secs_f64()
    );
}
