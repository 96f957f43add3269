//! An NBD client for a named export of a running QEMU (or
//! `qemu-storage-daemon`): structured replies, metadata contexts and
//! `NBD_CMD_BLOCK_STATUS`.
//!
//! The small client in `nbd.rs` talks to our own `qemu-nbd` children with
//! simple replies. A point-in-time export of a running server needs more:
//! which clusters changed since the last backup (the meta context
//! `qemu:dirty-bitmap:NAME`) and which are allocated at all
//! (`base:allocation`), both answered by `NBD_CMD_BLOCK_STATUS`, which
//! exists only with structured replies. Structured READ replies may also
//! send holes as `OFFSET_HOLE` chunks instead of zero bytes.
//!
//! One connection carries one request at a time; open several for parallel
//! reads (the server serves many clients). Any protocol error marks the
//! connection broken: its stream may be out of step, so later calls fail.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::nbd_proto::{
    self, nbd_result, proto_err, read_u16, read_u32, read_u64, CMD_BLOCK_STATUS, CMD_DISC,
    CMD_FLUSH, CMD_READ, CMD_WRITE, MAX_NAME, SIMPLE_REPLY_MAGIC, TFLAG_READ_ONLY,
};

const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

/// The `base:allocation` context: a hole reads as zeros if the ZERO flag is
/// also set (bit 0 HOLE: not allocated; bit 1 ZERO: reads as zeros).
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the range reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// `base:allocation` flag: the range is not allocated.
pub const STATE_HOLE: u32 = 1;
/// `qemu:dirty-bitmap:NAME` flag: the range is dirty.
pub const STATE_DIRTY: u32 = 1;

/// Largest READ payload per request: QEMU accepts 32 MiB.
const MAX_READ: usize = 32 << 20;
/// Largest payload of one reply chunk we accept, against a broken server.
const MAX_CHUNK: usize = MAX_READ + 64;

/// One status run of a block status reply: `len` bytes with `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRun {
    pub offset: u64,
    pub len: u64,
    pub flags: u32,
}

/// A connection to one export, in the transmission phase.
pub struct NbdExport {
    sock: UnixStream,
    size: u64,
    read_only: bool,
    /// Negotiated metadata contexts: (server id, name).
    contexts: Vec<(u32, String)>,
    next_handle: u64,
    broken: bool,
}

impl NbdExport {
    /// Connects to `export` on the unix socket `socket`, with structured
    /// replies and the metadata contexts `contexts` (e.g. [`BASE_ALLOCATION`],
    /// `qemu:dirty-bitmap:cp0`). A context the server does not offer is not
    /// an error here: ask [`NbdExport::has_context`].
    pub fn connect(socket: &Path, export: &str, contexts: &[&str]) -> io::Result<NbdExport> {
        if export.len() > MAX_NAME || contexts.iter().any(|c| c.len() > MAX_NAME) {
            return Err(proto_err("export or context name longer than 4096 bytes"));
        }
        let mut sock = UnixStream::connect(socket)?;
        // A server that stops answering must not hang a backup for ever.
        sock.set_read_timeout(Some(Duration::from_secs(120)))?;
        let negotiated = nbd_proto::negotiate(&mut sock, export, true, contexts)?;
        Ok(NbdExport {
            sock,
            size: negotiated.size,
            read_only: negotiated.flags & TFLAG_READ_ONLY != 0,
            contexts: negotiated.contexts,
            next_handle: 1,
            broken: false,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the server agreed to the metadata context `name`.
    pub fn has_context(&self, name: &str) -> bool {
        self.contexts.iter().any(|(_, n)| n == name)
    }

    fn check(&self) -> io::Result<()> {
        if self.broken {
            Err(proto_err("the NBD connection failed earlier"))
        } else {
            Ok(())
        }
    }

    fn send(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        nbd_proto::send_request(&mut self.sock, cmd, handle, offset, len, payload)?;
        Ok(handle)
    }

    /// Runs `f` and marks the connection broken if it fails.
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> io::Result<T>) -> io::Result<T> {
        self.check()?;
        let r = f(self);
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Receives every chunk of the reply to `handle`, handing each
    /// non-error chunk (type, payload length) to `on_chunk`, which must
    /// consume exactly that many bytes from the socket. A simple reply (the
    /// server may send one to a command without data) ends it too.
    fn recv_reply(
        &mut self,
        handle: u64,
        mut on_chunk: impl FnMut(&mut UnixStream, u16, usize) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut failure: Option<io::Error> = None;
        loop {
            let magic = read_u32(&mut self.sock)?;
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let error = read_u32(&mut self.sock)?;
                    let got = read_u64(&mut self.sock)?;
                    if got != handle {
                        return Err(proto_err(format!("reply for {got}, expected {handle}")));
                    }
                    return failure.map_or_else(|| nbd_result(error), Err);
                }
                STRUCTURED_REPLY_MAGIC => {
                    let flags = read_u16(&mut self.sock)?;
                    let kind = read_u16(&mut self.sock)?;
                    let got = read_u64(&mut self.sock)?;
                    let len = read_u32(&mut self.sock)? as usize;
                    if got != handle {
                        return Err(proto_err(format!("reply for {got}, expected {handle}")));
                    }
                    if len > MAX_CHUNK {
                        return Err(proto_err(format!("reply chunk of {len} bytes")));
                    }
                    if kind & REPLY_TYPE_ERROR_BIT != 0 {
                        let mut body = vec![0u8; len];
                        self.sock.read_exact(&mut body)?;
                        if body.len() < 6 {
                            return Err(proto_err("short error chunk"));
                        }
                        let error = u32::from_be_bytes(body[0..4].try_into().expect("4 bytes"));
                        let msg_len = u16::from_be_bytes([body[4], body[5]]) as usize;
                        let msg = String::from_utf8_lossy(&body[6..(6 + msg_len).min(body.len())]);
                        let at = if kind == REPLY_TYPE_ERROR_OFFSET && body.len() >= 6 + msg_len + 8
                        {
                            let o = &body[6 + msg_len..6 + msg_len + 8];
                            format!(
                                " at offset {}",
                                u64::from_be_bytes(o.try_into().expect("8"))
                            )
                        } else {
                            String::new()
                        };
                        let os =
                            io::Error::from_raw_os_error(if error == 0 { 5 } else { error as i32 });
                        failure
                            .get_or_insert(io::Error::new(os.kind(), format!("{os}{at}: {msg}")));
                    } else if kind == REPLY_TYPE_NONE {
                        if len != 0 {
                            return Err(proto_err("NONE chunk with a payload"));
                        }
                    } else {
                        on_chunk(&mut self.sock, kind, len)?;
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return failure.map_or(Ok(()), Err);
                    }
                }
                other => return Err(proto_err(format!("bad reply magic {other:#x}"))),
            }
        }
    }

    /// Fills `buf` with the export's bytes at `offset`.
    pub fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the export",
            ));
        }
        self.guarded(|c| {
            for (i, piece) in buf.chunks_mut(MAX_READ).enumerate() {
                let at = offset + (i * MAX_READ) as u64;
                c.read_piece(piece, at)?;
            }
            Ok(())
        })
    }

    fn read_piece(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let handle = self.send(CMD_READ, offset, buf.len() as u32, &[])?;
        let end = offset + buf.len() as u64;
        // Chunks may come in any order and must together cover the range.
        let mut covered = 0u64;
        self.recv_reply(handle, |sock, kind, len| {
            let at = read_u64(sock)?;
            let (start, n) = match kind {
                REPLY_TYPE_OFFSET_DATA => (
                    at,
                    len.checked_sub(8)
                        .ok_or_else(|| proto_err("short data chunk"))? as u64,
                ),
                REPLY_TYPE_OFFSET_HOLE if len == 12 => (at, u64::from(read_u32(sock)?)),
                _ => return Err(proto_err(format!("unexpected chunk type {kind} in a read"))),
            };
            if start < offset || start.checked_add(n).is_none_or(|e| e > end) {
                return Err(proto_err("read chunk outside the request"));
            }
            let range = (start - offset) as usize..(start - offset + n) as usize;
            if kind == REPLY_TYPE_OFFSET_DATA {
                sock.read_exact(&mut buf[range])?;
            } else {
                buf[range].fill(0);
            }
            covered += n;
            Ok(())
        })?;
        if covered != buf.len() as u64 {
            return Err(proto_err(format!(
                "read reply covered {covered} of {} bytes",
                buf.len()
            )));
        }
        Ok(())
    }

    /// Writes `buf` at `offset` (a writable export: a test's guest).
    pub fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.guarded(|c| {
            for (i, piece) in buf.chunks(MAX_READ).enumerate() {
                let at = offset + (i * MAX_READ) as u64;
                let handle = c.send(CMD_WRITE, at, piece.len() as u32, piece)?;
                c.recv_reply(handle, |_, kind, _| {
                    Err(proto_err(format!(
                        "unexpected chunk type {kind} in a write"
                    )))
                })?;
            }
            Ok(())
        })
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.guarded(|c| {
            let handle = c.send(CMD_FLUSH, 0, 0, &[])?;
            c.recv_reply(handle, |_, kind, _| {
                Err(proto_err(format!(
                    "unexpected chunk type {kind} in a flush"
                )))
            })
        })
    }

    /// The status of `[offset, offset + len)` in the metadata context
    /// `context` (negotiated at connect), as consecutive runs from `offset`.
    /// The server may answer for less than `len` (the caller asks again
    /// from the end of the last run), never for more than the export.
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u32,
        context: &str,
    ) -> io::Result<Vec<StatusRun>> {
        let id = self
            .contexts
            .iter()
            .find(|(_, n)| n == context)
            .map(|(id, _)| *id)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("metadata context {context:?} was not negotiated"),
                )
            })?;
        if len == 0 || offset >= self.size {
            return Ok(Vec::new());
        }
        let len = u64::from(len).min(self.size - offset) as u32;
        let size = self.size;
        self.guarded(|c| {
            let handle = c.send(CMD_BLOCK_STATUS, offset, len, &[])?;
            let mut runs = Vec::new();
            c.recv_reply(handle, |sock, kind, n| {
                if kind != REPLY_TYPE_BLOCK_STATUS || n < 4 || (n - 4) % 8 != 0 {
                    return Err(proto_err(format!(
                        "unexpected chunk type {kind} ({n} bytes) in block status"
                    )));
                }
                let ctx = read_u32(sock)?;
                let mut at = offset;
                for _ in 0..(n - 4) / 8 {
                    let run_len = u64::from(read_u32(sock)?);
                    let flags = read_u32(sock)?;
                    if ctx == id {
                        if run_len == 0 || at + run_len > size {
                            return Err(proto_err("block status run outside the export"));
                        }
                        runs.push(StatusRun {
                            offset: at,
                            len: run_len,
                            flags,
                        });
                    }
                    at += run_len;
                }
                Ok(())
            })?;
            if runs.is_empty() {
                return Err(proto_err(format!("no block status for {context:?}")));
            }
            Ok(runs)
        })
    }

    /// Every run of `context` over the whole export, asking as often as the
    /// server needs.
    pub fn status_map(&mut self, context: &str) -> io::Result<Vec<StatusRun>> {
        let mut runs: Vec<StatusRun> = Vec::new();
        let mut at = 0;
        while at < self.size {
            let ask = (self.size - at).min(1 << 30) as u32;
            for r in self.block_status(at, ask, context)? {
                at = r.offset + r.len;
                match runs.last_mut() {
                    Some(last) if last.flags == r.flags && last.offset + last.len == r.offset => {
                        last.len += r.len
                    }
                    _ => runs.push(r),
                }
            }
        }
        Ok(runs)
    }
}

impl Drop for NbdExport {
    fn drop(&mut self) {
        // DISC has no reply; the server closes the connection.
        if !self.broken {
            let _ = self.send(CMD_DISC, 0, 0, &[]);
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}
