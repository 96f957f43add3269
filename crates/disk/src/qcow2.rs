//! qcow2 images (backing chains, compressed clusters) through QEMU's tools.
//!
//! QEMU is the reference implementation of qcow2, so we do not parse the
//! format ourselves: `qemu-img map` gives the allocation map over the whole
//! backing chain, and a `qemu-nbd` child serves the guest view, which we read
//! and write with our NBD client ([`crate::nbd`]).
//!
//! The map is streamed line by line and merged into guest-contiguous data
//! extents as it is read, so memory follows the number of data runs, not the
//! number of clusters.
//!
//! Fast path: clusters stored plainly in a file of the chain (a qcow2 layer
//! that is not encrypted and has no external data file, or a raw backing
//! file; not compressed) are read straight from that file at the host offset
//! `qemu-img map` reports, at page-cache speed; NBD serves the rest
//! (compressed clusters, layers of other formats). Both
//! come from the same map, taken once when the reader opens, and the image
//! must not change while it is read (QEMU's image locks already refuse a
//! reader beside a running VM).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::nbd::NbdPool;
use crate::{DiskError, DiskFormat, DiskReader, DiskWriter, Extent};

/// Connections (and so requests in flight) per image: enough for the
/// engine's reader threads on a 2-core machine, with headroom.
const CONNECTIONS: usize = 4;

/// At most this many direct runs are kept (32 bytes each, 16 MiB); past
/// that, on a badly fragmented huge image, the rest is read through NBD so
/// memory stays bounded.
const MAX_DIRECT_RUNS: usize = 1 << 19;
/// At most this many data extents are kept (16 bytes each, 16 MiB). Beyond
/// that, neighbouring extents are merged across the holes between them:
/// an extent only says data *may* be there, and the holes swallowed read
/// as zeros, so the map stays correct and only gets coarser.
const MAX_EXTENTS: usize = 1 << 20;

/// A guest range stored verbatim at `host` in the file of chain layer
/// `layer` (0 = the image itself, 1 = its backing file, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirectRun {
    guest: u64,
    len: u64,
    host: u64,
    layer: u32,
}

/// A file of the backing chain we may read directly.
struct Layer {
    path: PathBuf,
    file: File,
}

/// Reads the guest view of a qcow2 image.
pub struct Qcow2Reader {
    pool: NbdPool,
    path: PathBuf,
    /// Sorted, non-overlapping, non-adjacent regions that may hold data.
    extents: Vec<Extent>,
    /// Sorted guest ranges readable straight from a layer's file.
    direct: Vec<DirectRun>,
    /// Indexed by depth; `None` where the layer must be read through NBD.
    layers: Vec<Option<Layer>>,
}

impl Qcow2Reader {
    pub fn open(path: &Path) -> Result<Qcow2Reader, DiskError> {
        let (layers, layer_lens) = direct_layers(path)?;
        let usable: Vec<bool> = layers.iter().map(Option::is_some).collect();
        let map = allocation_map(path, &usable)?;
        let extents = map.extents;
        // A run past the end of its file would mean the map and the files
        // disagree: trust only NBD then.
        let direct = if map
            .direct
            .iter()
            .all(|r| r.host + r.len <= layer_lens[r.layer as usize])
        {
            map.direct
        } else {
            Vec::new()
        };
        let pool = NbdPool::start(path, "qcow2", false, CONNECTIONS)?;
        let size = pool.size();
        if let Some(last) = extents.last() {
            if last.offset + last.len > size {
                return Err(DiskError::Tool {
                    tool: "qemu-img map",
                    path: path.to_owned(),
                    stderr: format!(
                        "map reaches {} bytes, past the virtual size {size}",
                        last.offset + last.len
                    ),
                });
            }
        }
        Ok(Qcow2Reader {
            pool,
            path: path.to_owned(),
            extents,
            direct,
            layers,
        })
    }

    /// Guest bytes this reader reads straight from files of the chain.
    pub fn direct_bytes(&self) -> u64 {
        self.direct.iter().map(|r| r.len).sum()
    }
}

impl DiskReader for Qcow2Reader {
    fn size(&self) -> u64 {
        self.pool.size()
    }

    fn format(&self) -> DiskFormat {
        DiskFormat::Qcow2
    }

    fn next_data(&self, from: u64) -> Result<Option<Extent>, DiskError> {
        Ok(next_in_map(&self.extents, from))
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        crate::raw::check_range(&self.path, self.size(), offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        let mut cur = offset;
        while cur < end {
            let piece = |to: u64| (cur - offset) as usize..(to - offset) as usize;
            let i = self.direct.partition_point(|r| r.guest + r.len <= cur);
            match self.direct.get(i) {
                Some(r) if r.guest <= cur => {
                    let to = end.min(r.guest + r.len);
                    let layer = self.layers[r.layer as usize]
                        .as_ref()
                        .expect("direct runs only name usable layers");
                    layer
                        .file
                        .read_exact_at(&mut buf[piece(to)], r.host + (cur - r.guest))
                        .map_err(|source| DiskError::Io {
                            op: "read",
                            path: layer.path.clone(),
                            source,
                        })?;
                    cur = to;
                }
                next => {
                    let to = next.map_or(end, |r| r.guest.min(end));
                    self.pool.read_exact_at(&mut buf[piece(to)], cur)?;
                    cur = to;
                }
            }
        }
        Ok(())
    }
}

/// The first extent of `map` that ends after `from`, clipped to start at `from`.
fn next_in_map(map: &[Extent], from: u64) -> Option<Extent> {
    let i = map.partition_point(|e| e.offset + e.len <= from);
    map.get(i).map(|e| {
        let start = e.offset.max(from);
        Extent {
            offset: start,
            len: e.offset + e.len - start,
        }
    })
}

/// What `qemu-img map` told us, merged.
struct AllocationMap {
    extents: Vec<Extent>,
    direct: Vec<DirectRun>,
}

/// One line of `qemu-img map --output=json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapEntry {
    start: u64,
    length: u64,
    /// Reads as something other than zeros.
    data: bool,
    depth: u64,
    compressed: bool,
    offset: Option<u64>,
}

impl MapEntry {
    fn extent(&self) -> Option<Extent> {
        (self.data && self.length > 0).then_some(Extent {
            offset: self.start,
            len: self.length,
        })
    }

    /// Stored plainly at `offset` in the file of layer `depth`.
    fn direct(&self) -> Option<DirectRun> {
        match (self.offset, u32::try_from(self.depth)) {
            (Some(host), Ok(layer)) if self.data && !self.compressed && self.length > 0 => {
                Some(DirectRun {
                    guest: self.start,
                    len: self.length,
                    host,
                    layer,
                })
            }
            _ => None,
        }
    }
}

/// Runs `qemu-img map --output=json` and merges the regions that hold data
/// (and those stored plainly in a layer marked in `usable`).
fn allocation_map(path: &Path, usable: &[bool]) -> Result<AllocationMap, DiskError> {
    let tool_err = |stderr: String| DiskError::Tool {
        tool: "qemu-img map",
        path: path.to_owned(),
        stderr,
    };
    let mut child = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2", "--"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| DiskError::Io {
            op: "spawn qemu-img map for",
            path: path.to_owned(),
            source,
        })?;
    // stderr is drained on its own thread so a chatty qemu-img cannot block
    // on a full pipe while we read stdout.
    let mut stderr_pipe = child.stderr.take().expect("stderr was piped");
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s);
        s
    });
    let stdout = BufReader::new(child.stdout.take().expect("stdout was piped"));
    let mut extents = ExtentList::default();
    let mut direct: Vec<DirectRun> = Vec::new();
    let mut parse_error = None;
    for line in stdout.lines() {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                parse_error = Some(format!("reading output: {e}"));
                break;
            }
        };
        match parse_map_line(&line) {
            Ok(Some(entry)) => {
                if let Some(e) = entry.extent() {
                    extents.push(e);
                }
                if let Some(run) = entry
                    .direct()
                    .filter(|r| usable.get(r.layer as usize) == Some(&true))
                {
                    push_direct(&mut direct, run);
                }
            }
            Ok(None) => {}
            Err(msg) => {
                parse_error = Some(msg);
                break;
            }
        }
    }
    let status = child.wait().map_err(|source| DiskError::Io {
        op: "wait for qemu-img map on",
        path: path.to_owned(),
        source,
    })?;
    let stderr = stderr_reader.join().unwrap_or_default();
    if !status.success() {
        return Err(tool_err(format!("{status}: {}", stderr.trim())));
    }
    if let Some(msg) = parse_error {
        return Err(tool_err(msg));
    }
    Ok(AllocationMap {
        extents: extents.list,
        direct,
    })
}

/// Parses one line of `qemu-img map --output=json` (one JSON object per line,
/// inside a JSON array).
fn parse_map_line(line: &str) -> Result<Option<MapEntry>, String> {
    let obj = line
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches(',')
        .trim();
    if obj.is_empty() {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_str(obj).map_err(|e| format!("unexpected map line {line:?}: {e}"))?;
    let number = |name: &str| {
        v.get(name)
            .and_then(|n| n.as_u64())
            .ok_or_else(|| format!("map line lacks {name}: {line}"))
    };
    let flag = |name: &str| v.get(name).and_then(|b| b.as_bool());
    let start = number("start")?;
    let length = number("length")?;
    let data = flag("data").ok_or_else(|| format!("map line lacks data: {line}"))?;
    // "zero": true means the region reads as zeros whatever "data" says
    // (preallocated zero clusters have both).
    let zero = flag("zero").unwrap_or(false);
    Ok(Some(MapEntry {
        start,
        length,
        data: data && !zero,
        depth: number("depth").unwrap_or(0),
        compressed: flag("compressed").unwrap_or(false),
        offset: v.get("offset").and_then(|o| o.as_u64()),
    }))
}

fn push_direct(runs: &mut Vec<DirectRun>, run: DirectRun) {
    if let Some(last) = runs.last_mut() {
        if last.layer == run.layer
            && last.guest + last.len == run.guest
            && last.host + last.len == run.host
        {
            last.len += run.len;
            return;
        }
    }
    if runs.len() < MAX_DIRECT_RUNS {
        runs.push(run);
    }
}

/// Data extents in guest order, merged when adjacent and coarsened when
/// there are more than `cap` of them.
struct ExtentList {
    list: Vec<Extent>,
    cap: usize,
    /// Holes up to this long are merged into the extent before them.
    bridge: u64,
}

impl Default for ExtentList {
    fn default() -> Self {
        ExtentList {
            list: Vec::new(),
            cap: MAX_EXTENTS,
            bridge: 0,
        }
    }
}

impl ExtentList {
    fn push(&mut self, e: Extent) {
        if let Some(last) = self.list.last_mut() {
            // saturating_sub: an entry overlapping the last one (qemu-img never
            // sends one) merges instead of underflowing.
            let last_end = last.offset + last.len;
            if e.offset.saturating_sub(last_end) <= self.bridge {
                last.len = (e.offset + e.len).max(last_end) - last.offset;
                return;
            }
        }
        self.list.push(e);
        if self.list.len() >= self.cap {
            self.coarsen();
        }
    }

    /// Doubles the hole size bridged until the list is at most half full.
    fn coarsen(&mut self) {
        while self.list.len() > self.cap / 2 {
            self.bridge = (self.bridge * 2).max(64 << 10);
            let mut merged: Vec<Extent> = Vec::with_capacity(self.list.len());
            for e in self.list.drain(..) {
                match merged.last_mut() {
                    Some(last)
                        if e.offset.saturating_sub(last.offset + last.len) <= self.bridge =>
                    {
                        last.len = (e.offset + e.len).max(last.offset + last.len) - last.offset;
                    }
                    _ => merged.push(e),
                }
            }
            self.list = merged;
        }
    }
}

#[cfg(test)]
fn push_merged(extents: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = extents.last_mut() {
        if last.offset + last.len == e.offset {
            last.len += e.len;
            return;
        }
    }
    extents.push(e);
}

/// Writes a qcow2 image in place through a writable qemu-nbd.
pub struct Qcow2Writer {
    pool: NbdPool,
    created: bool,
}

impl Qcow2Writer {
    /// Opens an existing qcow2 of exactly `size` bytes, or (re)creates an
    /// empty one when `recreate` is set.
    pub fn open(path: &Path, size: u64, recreate: bool) -> Result<Qcow2Writer, DiskError> {
        if recreate {
            create(path, size)?;
        }
        let pool = NbdPool::start(path, "qcow2", true, CONNECTIONS)?;
        if pool.size() != size {
            return Err(DiskError::Unsupported {
                path: path.to_owned(),
                reason: format!(
                    "the qcow2 image holds {} bytes, the disk needs {size}",
                    pool.size()
                ),
            });
        }
        Ok(Qcow2Writer {
            pool,
            created: recreate,
        })
    }
}

/// Opens the files of the backing chain whose clusters can be read
/// directly, by depth, with their lengths. A layer is usable when it is a
/// regular file holding qcow2 without encryption or external data file, or
/// raw; anything else (other formats, `json:` pseudo-filenames, protocols)
/// is left to NBD.
#[allow(clippy::type_complexity)]
fn direct_layers(path: &Path) -> Result<(Vec<Option<Layer>>, Vec<u64>), DiskError> {
    let out = run_tool(
        "qemu-img info",
        path,
        Command::new("qemu-img")
            .args([
                "info",
                "--backing-chain",
                "--output=json",
                "-f",
                "qcow2",
                "--",
            ])
            .arg(path),
    )?;
    let chain: Vec<serde_json::Value> =
        serde_json::from_slice(&out).map_err(|e| DiskError::Tool {
            tool: "qemu-img info",
            path: path.to_owned(),
            stderr: format!("unexpected output: {e}"),
        })?;
    let mut layers = Vec::with_capacity(chain.len());
    let mut lens = Vec::with_capacity(chain.len());
    for (depth, info) in chain.iter().enumerate() {
        let file_path = if depth == 0 {
            Some(path.to_owned())
        } else {
            // qemu resolves a backing file relative to its overlay's directory.
            chain[depth - 1]
                .get("full-backing-filename")
                .or_else(|| info.get("filename"))
                .and_then(|f| f.as_str())
                .map(PathBuf::from)
        };
        let plain = match info.get("format").and_then(|f| f.as_str()) {
            Some("raw") => true,
            Some("qcow2") => {
                info.get("encrypted").and_then(|e| e.as_bool()) != Some(true)
                    && info.pointer("/format-specific/data/data-file").is_none()
            }
            _ => false,
        };
        let layer = file_path.filter(|_| plain).and_then(|p| {
            let file = File::open(&p).ok()?;
            let meta = file.metadata().ok()?;
            meta.is_file()
                .then_some((Layer { path: p, file }, meta.len()))
        });
        lens.push(layer.as_ref().map_or(0, |(_, len)| *len));
        layers.push(layer.map(|(l, _)| l));
    }
    Ok((layers, lens))
}

/// `qemu-img info --output=json` of a qcow2 image.
fn image_info(path: &Path) -> Result<serde_json::Value, DiskError> {
    let out = run_tool(
        "qemu-img info",
        path,
        Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2", "--"])
            .arg(path),
    )?;
    serde_json::from_slice(&out).map_err(|e| DiskError::Tool {
        tool: "qemu-img info",
        path: path.to_owned(),
        stderr: format!("unexpected output: {e}"),
    })
}

/// Virtual size of a qcow2 image, from `qemu-img info`.
pub fn virtual_size(path: &Path) -> Result<u64, DiskError> {
    image_info(path)?
        .get("virtual-size")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| DiskError::Tool {
            tool: "qemu-img info",
            path: path.to_owned(),
            stderr: "no virtual-size in output".into(),
        })
}

/// Creates (or replaces) an empty qcow2 image of `size` bytes.
fn create(path: &Path, size: u64) -> Result<(), DiskError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(DiskError::Io {
                op: "remove old image",
                path: path.to_owned(),
                source,
            })
        }
    }
    run_tool(
        "qemu-img create",
        path,
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "--"])
            .arg(path)
            .arg(size.to_string()),
    )?;
    Ok(())
}

fn run_tool(tool: &'static str, path: &Path, cmd: &mut Command) -> Result<Vec<u8>, DiskError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| DiskError::Io {
            op: tool,
            path: PathBuf::from(path),
            source,
        })?;
    if !out.status.success() {
        return Err(DiskError::Tool {
            tool,
            path: path.to_owned(),
            stderr: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(out.stdout)
}

impl DiskWriter for Qcow2Writer {
    fn size(&self) -> u64 {
        self.pool.size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.pool.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.pool.write_all_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.pool.write_zeroes(offset, len)
    }

    fn created(&self) -> bool {
        self.created
    }

    fn finish(self: Box<Self>) -> Result<(), DiskError> {
        self.pool.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_list_stays_bounded_and_covers_every_extent() {
        let mut list = ExtentList {
            list: Vec::new(),
            cap: 64,
            bridge: 0,
        };
        // 10,000 data clusters with holes of growing size between them.
        let mut pushed = Vec::new();
        let mut at = 0u64;
        for i in 0..10_000u64 {
            let e = Extent {
                offset: at,
                len: 65536,
            };
            list.push(e);
            pushed.push(e);
            at += 65536 + (i % 7 + 1) * 65536;
        }
        assert!(list.list.len() < 64, "{} extents kept", list.list.len());
        // Sorted, disjoint, and every pushed extent lies inside one of them.
        for w in list.list.windows(2) {
            assert!(w[0].offset + w[0].len < w[1].offset);
        }
        for e in pushed {
            let inside = next_in_map(&list.list, e.offset).unwrap();
            assert_eq!(inside.offset, e.offset, "{e:?} not covered");
            assert!(inside.len >= e.len, "{e:?} cut short");
        }
    }

    #[test]
    fn map_lines_parse_and_merge() {
        let out = r#"[{ "start": 0, "length": 1048576, "depth": 0, "present": false, "zero": true, "data": false, "compressed": false},
{ "start": 1048576, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 327680},
{ "start": 1114112, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true, "compressed": true},
{ "start": 1179648, "length": 65536, "depth": 0, "present": true, "zero": true, "data": true, "compressed": false, "offset": 9000},
{ "start": 4194304, "length": 131072, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 393216}]"#;
        let mut extents = Vec::new();
        let mut direct = Vec::new();
        for line in out.lines() {
            if let Some(entry) = parse_map_line(line).unwrap() {
                if let Some(e) = entry.extent() {
                    push_merged(&mut extents, e);
                }
                if let Some(r) = entry.direct() {
                    push_direct(&mut direct, r);
                }
            }
        }
        // The compressed cluster (no offset) and the zero one are not direct.
        assert_eq!(
            direct,
            vec![
                DirectRun {
                    guest: 1048576,
                    len: 65536,
                    host: 327680,
                    layer: 0
                },
                DirectRun {
                    guest: 4194304,
                    len: 131072,
                    host: 393216,
                    layer: 0
                }
            ]
        );
        assert_eq!(
            extents,
            vec![
                Extent {
                    offset: 1048576,
                    len: 131072
                },
                Extent {
                    offset: 4194304,
                    len: 131072
                }
            ]
        );
        assert_eq!(next_in_map(&extents, 0), Some(extents[0]));
        assert_eq!(
            next_in_map(&extents, 1048576 + 100),
            Some(Extent {
                offset: 1048676,
                len: 131072 - 100
            })
        );
        assert_eq!(next_in_map(&extents, 1048576 + 131072), Some(extents[1]));
        assert_eq!(next_in_map(&extents, 4194304 + 131072), None);
        assert!(parse_map_line("not json").is_err());
    }
}
