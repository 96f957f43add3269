//! The QEMU guest agent, for freezing a guest's filesystems around the
//! instant of a point in time.
//!
//! The agent runs inside the guest and answers on a virtio-serial channel
//! that QEMU exposes on the host as a unix socket (a `-chardev socket`
//! behind `-device virtserialport,name=org.qemu.guest_agent.0`; libvirt
//! puts it under `/var/lib/libvirt/qemu/channel/target/`). Its protocol is QMP-like
//! JSON lines, but a guest may be slow, hung or have no agent at all: every
//! exchange is bounded by a short timeout, and the channel may hold a stale
//! reply from an earlier client, so each session starts with
//! `guest-sync-delimited` (its reply follows a 0xFF byte and echoes a random
//! id) and skips whatever came before it.
//!
//! A frozen guest blocks its own writes, so the freeze is held only for
//! the point in time's transaction: [`Frozen`] thaws on drop.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// How long the agent may take to answer a sync or a thaw.
const ANSWER_WAIT: Duration = Duration::from_secs(5);
/// How long a freeze may take (it flushes the guest's dirty pages).
const FREEZE_WAIT: Duration = Duration::from_secs(60);

/// A connection to a guest agent.
pub struct GuestAgent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// The guest's filesystems, frozen until this is dropped (or thawed).
pub struct Frozen {
    agent: GuestAgent,
    /// Filesystems the agent froze.
    pub filesystems: u64,
    thawed: bool,
}

impl GuestAgent {
    /// Connects and synchronises; an error means no agent answers (the
    /// caller goes on crash-consistent).
    pub fn connect(socket: &Path) -> io::Result<GuestAgent> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(ANSWER_WAIT))?;
        stream.set_write_timeout(Some(ANSWER_WAIT))?;
        let mut agent = GuestAgent {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        agent.sync()?;
        Ok(agent)
    }

    fn send(&mut self, command: &str, arguments: Option<Value>) -> io::Result<()> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())
    }

    /// `guest-sync-delimited`: skips anything before the 0xFF delimiter and
    /// any reply that does not echo our id.
    fn sync(&mut self) -> io::Result<()> {
        let id = u64::from(std::process::id()) << 32 | u64::from(rand_u32());
        // A 0xFF first resets the agent's parser after a half-sent command.
        self.writer.write_all(&[0xff])?;
        self.send("guest-sync-delimited", Some(json!({ "id": id })))?;
        loop {
            let mut byte = [0u8; 1];
            loop {
                self.reader.read_exact(&mut byte)?;
                if byte[0] == 0xff {
                    break;
                }
            }
            let reply = self.read_line()?;
            if reply["return"].as_u64() == Some(id) {
                return Ok(());
            }
        }
    }

    fn read_line(&mut self) -> io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the guest agent closed its channel",
            ));
        }
        serde_json::from_str(line.trim_start_matches('\u{ff}')).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the guest agent sent {:?}", line.trim()),
            )
        })
    }

    fn execute(&mut self, command: &str, wait: Duration) -> io::Result<Value> {
        self.writer.set_read_timeout(Some(wait))?;
        self.send(command, None)?;
        let reply = self.read_line()?;
        self.writer.set_read_timeout(Some(ANSWER_WAIT))?;
        if let Some(e) = reply.get("error") {
            return Err(io::Error::other(format!(
                "{command}: {}",
                e["desc"].as_str().unwrap_or("refused")
            )));
        }
        reply.get("return").cloned().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{command}: unexpected answer {reply}"),
            )
        })
    }

    /// Freezes the guest's filesystems; they thaw when the result drops.
    pub fn freeze(mut self) -> io::Result<Frozen> {
        match self.execute("guest-fsfreeze-freeze", FREEZE_WAIT) {
            Ok(n) => Ok(Frozen {
                agent: self,
                filesystems: n.as_u64().unwrap_or(0),
                thawed: false,
            }),
            Err(e) => {
                // A freeze that failed half way may have frozen some.
                let _ = self.execute("guest-fsfreeze-thaw", ANSWER_WAIT);
                Err(e)
            }
        }
    }
}

impl Frozen {
    /// Thaws the filesystems; an error means they may still be frozen (the
    /// agent's own timeout thaws them eventually).
    pub fn thaw(mut self) -> io::Result<()> {
        self.thawed = true;
        self.agent
            .execute("guest-fsfreeze-thaw", ANSWER_WAIT)
            .map(|_| ())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.thawed {
            let _ = self.agent.execute("guest-fsfreeze-thaw", ANSWER_WAIT);
        }
    }
}

/// An id for one sync: it only has to differ from an earlier client's.
fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}
