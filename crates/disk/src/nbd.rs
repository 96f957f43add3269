//! A small NBD client over UNIX sockets, and the `qemu-nbd` process it talks to.
//!
//! Why our own client: we need only the fixed-newstyle handshake with
//! `NBD_OPT_GO` and five commands (READ, WRITE, WRITE_ZEROES, FLUSH, DISC)
//! with simple replies; that is a few hundred lines, and the NBD crates on
//! crates.io are either async-only or bind libnbd. The handshake is shared
//! with `nbd_export.rs` (`nbd_proto`). There are no `/dev/nbd*`
//! devices here, so `qemu-nbd` serves a socket in a private temp directory.
//!
//! Threads: one connection carries one request at a time, so [`NbdPool`]
//! keeps several connections (each behind a mutex) and `qemu-nbd` is started
//! with `--shared` to accept them all.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::nbd_proto::{
    self, nbd_result, proto_err, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_WRITE, CMD_WRITE_ZEROES,
    SIMPLE_REPLY_MAGIC, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH, TFLAG_SEND_WRITE_ZEROES,
};
use crate::DiskError;

/// Largest READ/WRITE payload per request. qemu-nbd accepts up to 32 MiB;
/// staying well below keeps each connection's hold time short.
const MAX_PAYLOAD: usize = 8 << 20;
/// Pieces of one read or write sent as separate requests in flight at once.
const READ_PIECE: usize = 1 << 20;
const WRITE_PIECE: usize = 1 << 20;
/// Requests in flight per connection (qemu-nbd serves 16 per client).
const MAX_IN_FLIGHT: usize = 16;
/// Largest WRITE_ZEROES length per request (the field is 32 bits).
const MAX_ZERO_LEN: u64 = 1 << 30;

/// One NBD connection in the transmission phase.
struct NbdConnection {
    sock: UnixStream,
    size: u64,
    flags: u16,
    next_handle: u64,
    /// Set after any failed request: the stream may be out of step.
    broken: bool,
}

impl NbdConnection {
    /// Negotiates the default ("") export on a fresh connection.
    fn handshake(mut sock: UnixStream) -> io::Result<NbdConnection> {
        let export = nbd_proto::negotiate(&mut sock, "", false, &[])?;
        Ok(NbdConnection {
            sock,
            size: export.size,
            flags: export.flags,
            next_handle: 1,
            broken: false,
        })
    }

    fn send_request(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        nbd_proto::send_request(&mut self.sock, cmd, handle, offset, len, payload)?;
        Ok(handle)
    }

    /// Reads one simple reply header: (handle, NBD error).
    fn recv_header(&mut self) -> io::Result<(u64, u32)> {
        let mut hdr = [0u8; 16];
        self.sock.read_exact(&mut hdr)?;
        let magic = u32::from_be_bytes(hdr[0..4].try_into().expect("4 bytes"));
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(proto_err(format!("bad reply magic {magic:#x}")));
        }
        let error = u32::from_be_bytes(hdr[4..8].try_into().expect("4 bytes"));
        let handle = u64::from_be_bytes(hdr[8..16].try_into().expect("8 bytes"));
        Ok((handle, error))
    }

    /// Waits for the reply to `handle` and fails on a server error.
    fn recv_reply(&mut self, handle: u64) -> io::Result<()> {
        let (got, error) = self.recv_header()?;
        if got != handle {
            return Err(proto_err(format!(
                "reply for request {got}, expected {handle}"
            )));
        }
        nbd_result(error)
    }

    /// Runs a READ or WRITE over `len` bytes as requests of at most `piece`
    /// bytes, up to [`MAX_IN_FLIGHT`] at once, so qemu-nbd works on several
    /// while earlier replies stream back. Replies may come in any order; the
    /// handle tells which piece each one is. `on_reply(piece index, range)`
    /// consumes a read's payload.
    fn pipelined(
        &mut self,
        cmd: u16,
        offset: u64,
        len: usize,
        piece: usize,
        payload: Option<&[u8]>,
        mut on_reply: impl FnMut(&mut UnixStream, std::ops::Range<usize>) -> io::Result<()>,
    ) -> io::Result<()> {
        let pieces = len.div_ceil(piece);
        let range = |i: usize| i * piece..((i + 1) * piece).min(len);
        let mut batch = 0;
        while batch < pieces {
            let end = (batch + MAX_IN_FLIGHT).min(pieces);
            let base = self.next_handle;
            for i in batch..end {
                let r = range(i);
                let data = payload.map_or(&[][..], |p| &p[r.clone()]);
                self.send_request(cmd, offset + r.start as u64, r.len() as u32, data)?;
            }
            let mut seen = 0u32;
            for _ in batch..end {
                let (handle, error) = self.recv_header()?;
                let idx = handle.wrapping_sub(base);
                if idx >= (end - batch) as u64 || seen & (1 << idx) != 0 {
                    return Err(proto_err(format!("unexpected reply handle {handle}")));
                }
                seen |= 1 << idx;
                // Simple replies carry no payload on error: the stream stays
                // in step, but we stop at the first failure anyway.
                nbd_result(error)?;
                on_reply(&mut self.sock, range(batch + idx as usize))?;
            }
            batch = end;
        }
        Ok(())
    }

    fn read(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len();
        self.pipelined(CMD_READ, offset, len, READ_PIECE, None, |sock, r| {
            sock.read_exact(&mut buf[r])
        })
    }

    fn write(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.pipelined(
            CMD_WRITE,
            offset,
            buf.len(),
            WRITE_PIECE,
            Some(buf),
            |_, _| Ok(()),
        )
    }

    fn write_zeroes(&mut self, offset: u64, len: u32) -> io::Result<()> {
        let handle = self.send_request(CMD_WRITE_ZEROES, offset, len, &[])?;
        self.recv_reply(handle)
    }

    fn flush(&mut self) -> io::Result<()> {
        let handle = self.send_request(CMD_FLUSH, 0, 0, &[])?;
        self.recv_reply(handle)
    }

    fn disconnect(&mut self) {
        // DISC has no reply; the server closes the connection.
        let _ = self.send_request(CMD_DISC, 0, 0, &[]);
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
    }
}

/// A `qemu-nbd` child serving one image on a socket in a private temp dir.
/// Killed and reaped on drop if [`NbdServer::wait_exit`] did not run.
pub(crate) struct NbdServer {
    child: Option<Child>,
    socket: PathBuf,
    stderr_path: PathBuf,
    image: PathBuf,
    // Dropped last: removes the socket and the stderr log.
    _dir: tempfile::TempDir,
}

impl NbdServer {
    /// Starts `qemu-nbd` on `image` with `format`, accepting `connections`
    /// clients at once. The server exits by itself once every client has
    /// disconnected (no `--persistent`), which is how writers know all data
    /// reached the image.
    pub(crate) fn start(
        image: &Path,
        format: &str,
        writable: bool,
        connections: usize,
    ) -> Result<NbdServer, DiskError> {
        let dir = tempfile::Builder::new()
            .prefix("vpsbackup-nbd-")
            .tempdir()
            .map_err(|source| DiskError::Io {
                op: "create temp dir for qemu-nbd",
                path: image.to_owned(),
                source,
            })?;
        let socket = dir.path().join("nbd.sock");
        let stderr_path = dir.path().join("qemu-nbd.log");
        let stderr = std::fs::File::create(&stderr_path).map_err(|source| DiskError::Io {
            op: "create qemu-nbd log",
            path: stderr_path.clone(),
            source,
        })?;
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg(format!("--format={format}"))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--shared={connections}"))
            .arg("--cache=writeback")
            .arg("--aio=threads");
        if writable {
            cmd.arg("--discard=unmap");
        } else {
            cmd.arg("--read-only");
        }
        // "--" so an image path starting with '-' is not taken as an option.
        cmd.arg("--").arg(image);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd.spawn().map_err(|source| DiskError::Io {
            op: "spawn qemu-nbd for",
            path: image.to_owned(),
            source,
        })?;
        Ok(NbdServer {
            child: Some(child),
            socket,
            stderr_path,
            image: image.to_owned(),
            _dir: dir,
        })
    }

    fn tool_error(&self, what: &str) -> DiskError {
        let log = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        DiskError::Tool {
            tool: "qemu-nbd",
            path: self.image.clone(),
            stderr: format!("{what}: {}", log.trim()),
        }
    }

    /// Connects once the socket is up, giving up if qemu-nbd exits or does
    /// not listen within 30 s. Only the socket's absence is waited out: a
    /// failed handshake (a refused export is `NotFound` too) fails at once.
    fn connect(&mut self) -> Result<NbdConnection, DiskError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut delay = Duration::from_millis(2);
        let sock = loop {
            match UnixStream::connect(&self.socket) {
                Ok(sock) => break sock,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    if let Some(child) = self.child.as_mut() {
                        if let Ok(Some(status)) = child.try_wait() {
                            self.child = None;
                            return Err(self.tool_error(&format!("exited with {status}")));
                        }
                    }
                    if Instant::now() > deadline {
                        return Err(self.tool_error("did not start listening within 30 s"));
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(50));
                }
                Err(e) => return Err(self.tool_error(&format!("NBD handshake failed ({e})"))),
            }
        };
        NbdConnection::handshake(sock)
            .map_err(|e| self.tool_error(&format!("NBD handshake failed ({e})")))
    }

    /// Waits for qemu-nbd to exit after every client disconnected; kills it
    /// after `timeout`. Errors if it exited unsuccessfully.
    fn wait_exit(&mut self, timeout: Duration) -> Result<(), DiskError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => return Err(self.tool_error(&format!("exited with {status}"))),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(self.tool_error("did not exit after the last client left"));
                }
                Err(source) => {
                    return Err(DiskError::Io {
                        op: "wait for qemu-nbd serving",
                        path: self.image.clone(),
                        source,
                    })
                }
            }
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Several connections to one `qemu-nbd`, usable from many threads.
pub(crate) struct NbdPool {
    conns: Vec<Mutex<NbdConnection>>,
    next: AtomicUsize,
    size: u64,
    flags: u16,
    disconnected: bool,
    // Drop below disconnects every connection before the server is reaped.
    server: NbdServer,
}

impl NbdPool {
    /// Starts qemu-nbd on `image` and opens `connections` connections.
    pub(crate) fn start(
        image: &Path,
        format: &str,
        writable: bool,
        connections: usize,
    ) -> Result<NbdPool, DiskError> {
        let connections = connections.max(1);
        let mut server = NbdServer::start(image, format, writable, connections)?;
        let mut conns = Vec::with_capacity(connections);
        for _ in 0..connections {
            conns.push(Mutex::new(server.connect()?));
        }
        let (size, flags) = {
            let c = conns[0].lock().expect("fresh mutex");
            (c.size, c.flags)
        };
        if writable && flags & TFLAG_READ_ONLY != 0 {
            return Err(server.tool_error("exported the image read-only"));
        }
        Ok(NbdPool {
            conns,
            next: AtomicUsize::new(0),
            size,
            flags,
            disconnected: false,
            server,
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Runs `f` on a free connection if there is one, else waits on the next
    /// one round-robin. A failed request leaves its connection out of step;
    /// it is marked broken and refused from then on (every error here ends
    /// the job, so we do not try to resync).
    fn with_conn<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut NbdConnection) -> io::Result<T>,
    ) -> Result<T, DiskError> {
        let err = |source| DiskError::Io {
            op,
            path: self.server.image.clone(),
            source,
        };
        let run = |conn: &mut NbdConnection| {
            if conn.broken {
                return Err(err(io::Error::other(
                    "the NBD connection failed earlier in this job",
                )));
            }
            f(conn).map_err(|e| {
                conn.broken = true;
                err(e)
            })
        };
        for c in &self.conns {
            if let Ok(mut guard) = c.try_lock() {
                return run(&mut guard);
            }
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let mut guard = self.conns[i].lock().map_err(|_| {
            err(io::Error::other(
                "an NBD connection was poisoned by a panic",
            ))
        })?;
        run(&mut guard)
    }

    pub(crate) fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        crate::raw::check_range(&self.server.image, self.size, offset, buf.len() as u64)?;
        for (i, piece) in buf.chunks_mut(MAX_PAYLOAD).enumerate() {
            let at = offset + (i * MAX_PAYLOAD) as u64;
            self.with_conn("NBD read", |c| c.read(piece, at))?;
        }
        Ok(())
    }

    pub(crate) fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        crate::raw::check_range(&self.server.image, self.size, offset, buf.len() as u64)?;
        for (i, piece) in buf.chunks(MAX_PAYLOAD).enumerate() {
            let at = offset + (i * MAX_PAYLOAD) as u64;
            self.with_conn("NBD write", |c| c.write(piece, at))?;
        }
        Ok(())
    }

    pub(crate) fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        crate::raw::check_range(&self.server.image, self.size, offset, len)?;
        if self.flags & TFLAG_SEND_WRITE_ZEROES == 0 {
            let zeros = crate::AlignedBuf::new(MAX_PAYLOAD.min(len as usize));
            let mut at = offset;
            while at < offset + len {
                let n = zeros.len().min((offset + len - at) as usize);
                self.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            return Ok(());
        }
        let mut at = offset;
        while at < offset + len {
            let n = MAX_ZERO_LEN.min(offset + len - at);
            self.with_conn("NBD write zeroes", |c| c.write_zeroes(at, n as u32))?;
            at += n;
        }
        Ok(())
    }

    /// Flushes every connection (without NBD multi-conn a flush covers only
    /// the writes its own connection completed), disconnects, and waits for
    /// qemu-nbd to close the image cleanly.
    pub(crate) fn finish(mut self) -> Result<(), DiskError> {
        if self.flags & TFLAG_SEND_FLUSH != 0 {
            for c in &self.conns {
                let mut guard = c.lock().map_err(|_| DiskError::Io {
                    op: "NBD flush",
                    path: self.server.image.clone(),
                    source: io::Error::other("an NBD connection was poisoned by a panic"),
                })?;
                guard.flush().map_err(|source| DiskError::Io {
                    op: "NBD flush",
                    path: self.server.image.clone(),
                    source,
                })?;
            }
        }
        self.disconnect_all();
        self.server.wait_exit(Duration::from_secs(60))
    }

    fn disconnect_all(&mut self) {
        if std::mem::replace(&mut self.disconnected, true) {
            return;
        }
        for c in &mut self.conns {
            if let Ok(conn) = c.get_mut() {
                conn.disconnect();
            }
        }
    }
}

impl Drop for NbdPool {
    fn drop(&mut self) {
        // A reader is done (or a writer is abandoned): let qemu-nbd close the
        // image itself if it does so quickly, else NbdServer's drop kills it.
        self.disconnect_all();
        let _ = self.server.wait_exit(Duration::from_secs(5));
    }
}
