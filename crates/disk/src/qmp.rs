//! A small synchronous QMP client: a unix socket, one JSON object a line.
//!
//! QMP interleaves asynchronous events (`{"event": ...}`) with command
//! replies; [`Qmp::execute`] keeps the events it passes over so that
//! [`Qmp::wait_event`] can find one that arrived before it was asked for.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A QMP failure: the connection, or an error reply (its class and text).
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP connection: {0}")]
    Io(#[from] io::Error),
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP: waited {0:?} for event {1}")]
    Timeout(Duration, String),
    #[error("QMP sent no greeting within {0:?}: another client holds the socket (QMP serves one at a time; give vpsbackup its own -qmp socket)")]
    Busy(Duration),
    #[error("QMP: unexpected message {0}")]
    Protocol(String),
}

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
}

/// How long QEMU may take to greet a new client.
pub const GREETING_WAIT: Duration = Duration::from_secs(10);
/// How long one command may take before the connection is given up.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation.
    ///
    /// A QMP socket serves one client at a time: while another is connected
    /// the greeting does not come, and this fails after [`GREETING_WAIT`].
    /// Give vpsbackup a QMP socket of its own (QEMU takes several `-qmp`).
    pub fn connect(socket: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(GREETING_WAIT))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: VecDeque::new(),
        };
        let greeting = match qmp.read_message() {
            Err(QmpError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(QmpError::Busy(GREETING_WAIT))
            }
            other => other?,
        };
        qmp.writer.set_read_timeout(Some(REPLY_TIMEOUT))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "QEMU closed the QMP socket",
            )));
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Protocol(line.trim().to_owned()))
    }

    /// Runs `command` with `arguments` (an object) and returns its `return`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                self.keep_event(reply);
                continue;
            }
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: e["class"].as_str().unwrap_or("").to_owned(),
                    desc: e["desc"].as_str().unwrap_or("").to_owned(),
                });
            }
            return Err(QmpError::Protocol(reply.to_string()));
        }
    }

    /// Keeps an event for [`Qmp::wait_event`]; a long job's stream of
    /// status events must not grow without bound.
    fn keep_event(&mut self, event: Value) {
        if self.events.len() >= 1024 {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Waits for event `name` whose `data` satisfies `matches`, at most
    /// `timeout`; events seen earlier by [`Qmp::execute`] count.
    pub fn wait_event(
        &mut self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let hit = |e: &Value| e["event"] == name && matches(&e["data"]);
        if let Some(i) = self.events.iter().position(hit) {
            return Ok(self.events.remove(i).expect("index found"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout(timeout, name.to_owned()));
            }
            self.writer.set_read_timeout(Some(left))?;
            let msg = match self.read_message() {
                Err(QmpError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(QmpError::Timeout(timeout, name.to_owned()))
                }
                other => other,
            };
            self.writer.set_read_timeout(Some(REPLY_TIMEOUT))?;
            let msg = msg?;
            if hit(&msg) {
                return Ok(msg);
            }
            if msg.get("event").is_some() {
                self.keep_event(msg);
            }
        }
    }
}
