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

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::nbd::NbdPool;
use crate::{DiskError, DiskFormat, DiskReader, DiskWriter, Extent};

/// Connections (and so requests in flight) per image: enough for the
/// engine's reader threads on a 2-core machine, with headroom.
const CONNECTIONS: usize = 4;

/// Reads the guest view of a qcow2 image.
pub struct Qcow2Reader {
    pool: NbdPool,
    /// Sorted, non-overlapping, non-adjacent regions that may hold data.
    extents: Vec<Extent>,
}

impl Qcow2Reader {
    pub fn open(path: &Path) -> Result<Qcow2Reader, DiskError> {
        let extents = allocation_map(path)?;
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
        Ok(Qcow2Reader { pool, extents })
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
        self.pool.read_exact_at(buf, offset)
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

/// Runs `qemu-img map --output=json` and merges the regions that hold data.
fn allocation_map(path: &Path) -> Result<Vec<Extent>, DiskError> {
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
    let mut extents: Vec<Extent> = Vec::new();
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
            Ok(Some(e)) => push_merged(&mut extents, e),
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
    Ok(extents)
}

/// Parses one line of `qemu-img map --output=json` (one JSON object per line,
/// inside a JSON array). Returns the region if it holds data.
fn parse_map_line(line: &str) -> Result<Option<Extent>, String> {
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
    let field = |name: &str| {
        v.get(name)
            .ok_or_else(|| format!("map line lacks {name}: {line}"))
    };
    let start = field("start")?
        .as_u64()
        .ok_or_else(|| format!("bad start in {line}"))?;
    let length = field("length")?
        .as_u64()
        .ok_or_else(|| format!("bad length in {line}"))?;
    let data = field("data")?.as_bool().unwrap_or(true);
    // "zero": true means the region reads as zeros whatever "data" says
    // (preallocated zero clusters have both).
    let zero = v.get("zero").and_then(|z| z.as_bool()).unwrap_or(false);
    if data && !zero && length > 0 {
        Ok(Some(Extent {
            offset: start,
            len: length,
        }))
    } else {
        Ok(None)
    }
}

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

/// Virtual size of a qcow2 image, from `qemu-img info`.
pub fn virtual_size(path: &Path) -> Result<u64, DiskError> {
    let out = run_tool(
        "qemu-img info",
        path,
        Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2", "--"])
            .arg(path),
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| DiskError::Tool {
        tool: "qemu-img info",
        path: path.to_owned(),
        stderr: format!("unexpected output: {e}"),
    })?;
    v.get("virtual-size")
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
    fn map_lines_parse_and_merge() {
        let out = r#"[{ "start": 0, "length": 1048576, "depth": 0, "present": false, "zero": true, "data": false, "compressed": false},
{ "start": 1048576, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 327680},
{ "start": 1114112, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true, "compressed": true},
{ "start": 1179648, "length": 65536, "depth": 0, "present": true, "zero": true, "data": true, "compressed": false, "offset": 9000},
{ "start": 4194304, "length": 131072, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 393216}]"#;
        let mut extents = Vec::new();
        for line in out.lines() {
            if let Some(e) = parse_map_line(line).unwrap() {
                push_merged(&mut extents, e);
            }
        }
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
