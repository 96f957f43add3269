//! What both NBD clients share: the protocol's numbers, big-endian readers,
//! the fixed-newstyle handshake up to `NBD_OPT_GO`, and the request header.
//!
//! The clients differ after the handshake: `nbd.rs` reads simple replies
//! from our own `qemu-nbd` children, `nbd_export.rs` structured replies
//! (and block status) from a running QEMU's exports. Each keeps its own
//! reply code; the handshake is one piece of code so the two cannot drift.

use std::io::{self, Read, Write};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_FLAG_ERROR: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
/// Largest option reply we read, against a broken server.
const MAX_OPTION_REPLY: usize = 1 << 20;
/// Longest export or context name the protocol allows.
pub(crate) const MAX_NAME: usize = 4096;

/// Transmission flags of the export.
pub(crate) const TFLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;
pub(crate) const CMD_BLOCK_STATUS: u16 = 7;

pub(crate) fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

pub(crate) fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
pub(crate) fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
pub(crate) fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// NBD error values are Linux errno values.
pub(crate) fn nbd_result(error: u32) -> io::Result<()> {
    if error == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(error as i32))
    }
}

/// Sends one request header and its payload (a WRITE's data, else empty).
pub(crate) fn send_request(
    sock: &mut impl Write,
    cmd: u16,
    handle: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) -> io::Result<()> {
    let mut req = [0u8; 28];
    req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    req[4..6].copy_from_slice(&0u16.to_be_bytes());
    req[6..8].copy_from_slice(&cmd.to_be_bytes());
    req[8..16].copy_from_slice(&handle.to_be_bytes());
    req[16..24].copy_from_slice(&offset.to_be_bytes());
    req[24..28].copy_from_slice(&len.to_be_bytes());
    sock.write_all(&req)?;
    if !payload.is_empty() {
        sock.write_all(payload)?;
    }
    Ok(())
}

/// What the handshake settled for the transmission phase.
pub(crate) struct Negotiated {
    /// The export's size in bytes.
    pub(crate) size: u64,
    /// Its transmission flags (`TFLAG_*`).
    pub(crate) flags: u16,
    /// The metadata contexts the server agreed to: (its id, name).
    pub(crate) contexts: Vec<(u32, String)>,
}

/// Runs the fixed-newstyle handshake on a fresh connection and enters the
/// transmission phase on `export` with `NBD_OPT_GO`. With `structured`, asks
/// for structured replies first (a refusal is an error), then for the
/// metadata `contexts` (which need structured replies); a context the server
/// does not offer is left out of [`Negotiated::contexts`], not an error.
/// A refused `NBD_OPT_GO` is `NotFound`, naming the export.
pub(crate) fn negotiate(
    sock: &mut (impl Read + Write),
    export: &str,
    structured: bool,
    contexts: &[&str],
) -> io::Result<Negotiated> {
    debug_assert!(
        structured || contexts.is_empty(),
        "contexts need structured replies"
    );
    if read_u64(sock)? != NBDMAGIC || read_u64(sock)? != IHAVEOPT {
        return Err(proto_err("not an NBD newstyle server"));
    }
    let server_flags = read_u16(sock)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto_err("server lacks fixed newstyle negotiation"));
    }
    let client_flags = u32::from(server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    sock.write_all(&client_flags.to_be_bytes())?;

    if structured {
        send_option(sock, OPT_STRUCTURED_REPLY, &[])?;
        let (reply, data) = recv_option_reply(sock, OPT_STRUCTURED_REPLY)?;
        if reply != REP_ACK {
            return Err(proto_err(format!(
                "server refused structured replies ({reply:#x}): {}",
                String::from_utf8_lossy(&data)
            )));
        }
    }

    let mut negotiated = Vec::new();
    if !contexts.is_empty() {
        let mut data = Vec::new();
        put_str(&mut data, export);
        data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
        for c in contexts {
            put_str(&mut data, c);
        }
        send_option(sock, OPT_SET_META_CONTEXT, &data)?;
        loop {
            let (reply, data) = recv_option_reply(sock, OPT_SET_META_CONTEXT)?;
            match reply {
                REP_ACK => break,
                REP_META_CONTEXT if data.len() >= 4 => {
                    let id = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes"));
                    negotiated.push((id, String::from_utf8_lossy(&data[4..]).into_owned()));
                }
                r if r & REP_FLAG_ERROR != 0 => {
                    return Err(proto_err(format!(
                        "server refused the metadata contexts ({r:#x}): {}",
                        String::from_utf8_lossy(&data)
                    )))
                }
                _ => {} // unknown informational reply: ignore, as the spec allows
            }
        }
    }

    let mut data = Vec::new();
    put_str(&mut data, export);
    // No info requests: the server always sends NBD_INFO_EXPORT.
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(sock, OPT_GO, &data)?;
    let mut info: Option<(u64, u16)> = None;
    loop {
        let (reply, data) = recv_option_reply(sock, OPT_GO)?;
        match reply {
            REP_ACK => break,
            REP_INFO
                if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
            {
                let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                info = Some((size, u16::from_be_bytes([data[10], data[11]])));
            }
            r if r & REP_FLAG_ERROR != 0 => {
                // Ends the negotiation politely instead of hanging up.
                let _ = send_option(sock, OPT_ABORT, &[]);
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "the server refused export {export:?} ({r:#x}): {}",
                        String::from_utf8_lossy(&data)
                    ),
                ));
            }
            _ => {} // unknown informational reply: ignore, as the spec allows
        }
    }
    let (size, flags) = info.ok_or_else(|| proto_err("server sent no export info"))?;
    Ok(Negotiated {
        size,
        flags,
        contexts: negotiated,
    })
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn send_option(sock: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    let mut opt = Vec::with_capacity(16 + data.len());
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&option.to_be_bytes());
    opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
    opt.extend_from_slice(data);
    sock.write_all(&opt)
}

/// One option reply to `option`: (reply type, data).
fn recv_option_reply(sock: &mut impl Read, option: u32) -> io::Result<(u32, Vec<u8>)> {
    if read_u64(sock)? != OPTION_REPLY_MAGIC {
        return Err(proto_err("bad option reply magic"));
    }
    let got = read_u32(sock)?;
    let reply = read_u32(sock)?;
    let len = read_u32(sock)? as usize;
    if got != option {
        return Err(proto_err(format!(
            "reply to option {got}, expected {option}"
        )));
    }
    if len > MAX_OPTION_REPLY {
        return Err(proto_err("oversized option reply"));
    }
    let mut data = vec![0u8; len];
    sock.read_exact(&mut data)?;
    Ok((reply, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers from a script and records what the client sent.
    struct Scripted {
        answers: io::Cursor<Vec<u8>>,
        sent: Vec<u8>,
    }

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.answers.read(buf)
        }
    }
    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.sent.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn server(replies: &[(u32, u32, Vec<u8>)]) -> Scripted {
        let mut a = Vec::new();
        a.extend_from_slice(&NBDMAGIC.to_be_bytes());
        a.extend_from_slice(&IHAVEOPT.to_be_bytes());
        a.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        for (option, reply, data) in replies {
            a.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
            a.extend_from_slice(&option.to_be_bytes());
            a.extend_from_slice(&reply.to_be_bytes());
            a.extend_from_slice(&(data.len() as u32).to_be_bytes());
            a.extend_from_slice(data);
        }
        Scripted {
            answers: io::Cursor::new(a),
            sent: Vec::new(),
        }
    }

    fn export_info(size: u64, flags: u16) -> Vec<u8> {
        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        d
    }

    #[test]
    fn a_simple_handshake_sends_only_go_for_the_default_export() {
        let mut s = server(&[
            (OPT_GO, REP_INFO, export_info(1 << 30, TFLAG_READ_ONLY)),
            (OPT_GO, REP_ACK, Vec::new()),
        ]);
        let n = negotiate(&mut s, "", false, &[]).unwrap();
        assert_eq!((n.size, n.flags), (1 << 30, TFLAG_READ_ONLY));
        assert!(n.contexts.is_empty());
        // Client flags, then GO with an empty name and no info requests.
        let mut want = 3u32.to_be_bytes().to_vec();
        want.extend_from_slice(&IHAVEOPT.to_be_bytes());
        want.extend_from_slice(&OPT_GO.to_be_bytes());
        want.extend_from_slice(&6u32.to_be_bytes());
        want.extend_from_slice(&[0; 6]);
        assert_eq!(s.sent, want);
    }

    #[test]
    fn a_structured_handshake_keeps_the_contexts_the_server_agreed_to() {
        let mut ctx = 5u32.to_be_bytes().to_vec();
        ctx.extend_from_slice(b"base:allocation");
        let mut s = server(&[
            (OPT_STRUCTURED_REPLY, REP_ACK, Vec::new()),
            (OPT_SET_META_CONTEXT, REP_META_CONTEXT, ctx),
            (OPT_SET_META_CONTEXT, REP_ACK, Vec::new()),
            (OPT_GO, REP_INFO, export_info(4096, 0)),
            (OPT_GO, REP_ACK, Vec::new()),
        ]);
        let n = negotiate(&mut s, "disk0", true, &["base:allocation", "qemu:x"]).unwrap();
        assert_eq!(n.size, 4096);
        assert_eq!(n.contexts, vec![(5, "base:allocation".to_string())]);
    }

    #[test]
    fn a_refused_go_aborts_and_names_the_export() {
        let mut s = server(&[(OPT_GO, REP_FLAG_ERROR | 6, b"no such export".to_vec())]);
        let err = negotiate(&mut s, "nope", false, &[]).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("\"nope\""), "{err}");
        let mut abort = IHAVEOPT.to_be_bytes().to_vec();
        abort.extend_from_slice(&OPT_ABORT.to_be_bytes());
        abort.extend_from_slice(&0u32.to_be_bytes());
        assert!(s.sent.ends_with(&abort));
    }

    #[test]
    fn an_oversized_option_reply_is_refused_before_it_is_read() {
        let mut s = server(&[]);
        let mut a = s.answers.into_inner();
        a.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        a.extend_from_slice(&OPT_GO.to_be_bytes());
        a.extend_from_slice(&REP_INFO.to_be_bytes());
        a.extend_from_slice(&((MAX_OPTION_REPLY + 1) as u32).to_be_bytes());
        s.answers = io::Cursor::new(a);
        let err = negotiate(&mut s, "", false, &[]).err().unwrap();
        assert_eq!(err.to_string(), "oversized option reply");
    }
}
