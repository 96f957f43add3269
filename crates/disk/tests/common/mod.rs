//! Helpers shared by the integration tests: real images made with mke2fs,
//! qemu-img and qemu-io, and whole-disk reads through our readers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use vpsbackup_disk::{DiskReader, Extent};

/// Runs a command and panics with its stderr if it fails.
pub fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A deterministic pseudo-random byte stream (xorshift), so test data does
/// not compress away and differs per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Makes a `size_mb` MiB ext4 image at `path` holding a few MiB of files
/// (random, text, and some duplicated), with mke2fs -d.
pub fn make_ext4(dir: &Path, name: &str, size_mb: u64) -> PathBuf {
    let root = dir.join(format!("{name}.root"));
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("data")).unwrap();
    for i in 0..8u64 {
        std::fs::write(
            root.join(format!("data/blob{i}")),
            pattern(i, 300_000 + i as usize * 7_001),
        )
        .unwrap();
    }
    let text: String = (0..20_000)
        .map(|i| format!("line {i} of a config file\n"))
        .collect();
    std::fs::write(root.join("etc/config.txt"), &text).unwrap();
    std::fs::write(root.join("etc/copy.txt"), &text).unwrap();
    let image = dir.join(name);
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-F", "-d"])
        .arg(&root)
        .arg(&image)
        .arg(format!("{size_mb}M")));
    std::fs::remove_dir_all(&root).unwrap();
    // Written back now, so SEEK_DATA/SEEK_HOLE (ours and qemu's) give the
    // same answers for the whole test instead of changing under it.
    std::fs::File::open(&image).unwrap().sync_all().unwrap();
    image
}

/// The guest view as `qemu-img convert -O raw` sees it.
pub fn qemu_raw(image: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.converted.raw",
        image.file_name().unwrap().to_string_lossy()
    ));
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(image)
        .arg(&out));
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// Every data extent of `reader`, checked to be sorted, in range and non-empty.
pub fn extents(reader: &dyn DiskReader) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(e) = reader.next_data(pos).unwrap() {
        assert!(e.offset >= pos, "extent {e:?} before {pos}");
        assert!(e.len > 0, "empty extent at {}", e.offset);
        assert!(
            e.offset + e.len <= reader.size(),
            "extent {e:?} past the end"
        );
        out.push(e);
        pos = e.offset + e.len;
    }
    out
}

/// The guest view rebuilt from the data extents only (zeros elsewhere), read
/// in odd-sized pieces so request splitting is exercised too.
pub fn read_via_extents(reader: &dyn DiskReader) -> Vec<u8> {
    let mut out = vec![0u8; reader.size() as usize];
    for e in extents(reader) {
        let mut at = e.offset;
        while at < e.offset + e.len {
            let n = (3 << 20).min(e.offset + e.len - at) as usize;
            reader
                .read_exact_at(&mut out[at as usize..at as usize + n], at)
                .unwrap();
            at += n as u64;
        }
    }
    out
}

/// Bytes the file system really allocated for `path`.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Asserts equality without dumping megabytes on failure.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: {:#x} != {:#x}",
            got[i], want[i]
        );
    }
}

/// A running `qemu-storage-daemon`: QMP on `qmp`, an NBD server on `nbd`,
/// each image a node `dev<i>` (its file node `file<i>`) with an NBD export
/// `disk<i>`, writable unless `read_only`. It holds the images' locks as a
/// running VM does; killed and reaped on drop.
pub struct Qsd {
    pub child: std::process::Child,
    pub qmp: PathBuf,
    pub nbd: PathBuf,
}

impl Qsd {
    pub fn start(dir: &Path, images: &[(&Path, &str)], read_only: bool) -> Qsd {
        Qsd::start_with(dir, images, read_only, "")
    }

    /// Like [`Qsd::start`], with `export_opts` (e.g. ",bitmaps.0=cp0")
    /// added to every export.
    pub fn start_with(
        dir: &Path,
        images: &[(&Path, &str)],
        read_only: bool,
        export_opts: &str,
    ) -> Qsd {
        let qmp = dir.join("qsd-qmp.sock");
        let nbd = dir.join("qsd-nbd.sock");
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&nbd);
        let mut cmd = Command::new("qemu-storage-daemon");
        let ro = if read_only { "on" } else { "off" };
        for (i, (path, format)) in images.iter().enumerate() {
            cmd.arg("--blockdev").arg(format!(
                "driver=file,filename={},node-name=file{i},read-only={ro}",
                path.display()
            ));
            cmd.arg("--blockdev").arg(format!(
                "driver={format},file=file{i},node-name=dev{i},read-only={ro}"
            ));
        }
        cmd.arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=m",
                qmp.display()
            ))
            .args(["--monitor", "chardev=m"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd.display()));
        for i in 0..images.len() {
            cmd.arg("--export").arg(format!(
                "type=nbd,id=disk{i},node-name=dev{i},name=disk{i},writable={}{export_opts}",
                if read_only { "off" } else { "on" }
            ));
        }
        let child = cmd
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon (qemu-utils) is needed by the tests");
        let qsd = Qsd { child, qmp, nbd };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // A socket file exists from its bind, a moment before it listens
        // (a connect in between is refused): wait until both accept.
        let accepts = |p: &Path| std::os::unix::net::UnixStream::connect(p).is_ok();
        while !(accepts(&qsd.qmp) && accepts(&qsd.nbd)) {
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        qsd
    }

    /// `nbd+unix:///disk<i>?socket=...` for qemu-io / qemu-img.
    pub fn uri(&self, i: usize) -> String {
        format!("nbd+unix:///disk{i}?socket={}", self.nbd.display())
    }

    /// kill -9 and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}
