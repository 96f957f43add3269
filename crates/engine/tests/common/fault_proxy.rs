//! A fault-injecting TCP proxy written for the S3 tests: it sits between
//! the backend and a real server and, for a chosen share of requests
//! (found by their method at the start of a read, since keep-alive
//! connections carry many), cuts the connection after a random number of
//! bytes of the request or of its response (a body torn off half-way, as
//! a reset does) or holds the request for a while before forwarding (a
//! slow network). `set_down` makes it drop every new connection at once (a
//! server gone for good).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
}

struct State {
    upstream: SocketAddr,
    /// Requests cut, per thousand.
    cut: AtomicU32,
    /// Requests delayed, per thousand.
    delay: AtomicU32,
    down: AtomicBool,
    stop: AtomicBool,
    rng: Mutex<u64>,
    pub cuts: AtomicU64,
    pub delays: AtomicU64,
    pub connections: AtomicU64,
}

impl State {
    fn next(&self) -> u64 {
        let mut x = self.rng.lock().unwrap();
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }
}

impl FaultProxy {
    /// Proxies to `upstream` (`http://host:port`), faults off; `seed` makes
    /// the sequence of fates repeatable.
    pub fn start(upstream: &str, seed: u64) -> FaultProxy {
        let hostport = upstream.trim_start_matches("http://").trim_end_matches('/');
        let upstream: SocketAddr = hostport.parse().expect("upstream is ip:port");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            upstream,
            cut: AtomicU32::new(0),
            delay: AtomicU32::new(0),
            down: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            rng: Mutex::new(seed | 1),
            cuts: AtomicU64::new(0),
            delays: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || serve(st, client));
            }
        });
        FaultProxy { addr, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts `cut` and delays `delay` of every thousand requests.
    pub fn set_faults(&self, cut: u32, delay: u32) {
        self.state.cut.store(cut, Ordering::SeqCst);
        self.state.delay.store(delay, Ordering::SeqCst);
    }

    /// Every new connection is closed at once, unanswered, and every
    /// request on an open one is cut.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// (connections, requests cut, requests delayed) so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.state.connections.load(Ordering::SeqCst),
            self.state.cuts.load(Ordering::SeqCst),
            self.state.delays.load(Ordering::SeqCst),
        )
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(st: Arc<State>, client: TcpStream) {
    st.connections.fetch_add(1, Ordering::SeqCst);
    if st.down.load(Ordering::SeqCst) {
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let Ok(server) = TcpStream::connect(st.upstream) else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (c2, s2) = match (client.try_clone(), server.try_clone()) {
        (Ok(c), Ok(s)) => (c, s),
        _ => return,
    };
    // Bytes of response still allowed through (u64::MAX: no cut pending).
    let budget = Arc::new(AtomicU64::new(u64::MAX));
    let (st2, budget2) = (st.clone(), budget.clone());
    let up = std::thread::spawn(move || requests(&st2, client, server, &budget2));
    responses(s2, c2, &budget);
    let _ = up.join();
}

/// What happens to one request.
enum Fate {
    Pass,
    /// Forward this many more bytes of the request, then cut.
    CutRequest(u64),
    /// Let this many bytes of its response through, then cut.
    CutResponse(u64),
    Delay(Duration),
}

fn roll(st: &State) -> Fate {
    if st.down.load(Ordering::SeqCst) {
        return Fate::CutRequest(0);
    }
    let roll = (st.next() % 1000) as u32;
    let cut = st.cut.load(Ordering::SeqCst);
    let delay = st.delay.load(Ordering::SeqCst);
    if roll < cut {
        st.cuts.fetch_add(1, Ordering::SeqCst);
        let at = st.next() % (256 << 10);
        if st.next() % 2 == 0 {
            Fate::CutRequest(at)
        } else {
            Fate::CutResponse(at)
        }
    } else if roll < cut + delay {
        st.delays.fetch_add(1, Ordering::SeqCst);
        Fate::Delay(Duration::from_millis(50 + st.next() % 400))
    } else {
        Fate::Pass
    }
}

fn close(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// Client to server. Each read that starts an HTTP request (a method
/// name: keep-alive connections carry many) rolls that request's fate.
fn requests(st: &State, mut from: TcpStream, mut to: TcpStream, budget: &AtomicU64) {
    let mut buf = vec![0u8; 64 << 10];
    let mut left = u64::MAX;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        let starts_request = [&b"GET "[..], b"PUT ", b"HEAD", b"POST", b"DELE"]
            .iter()
            .any(|m| buf[..n].starts_with(m));
        if starts_request {
            match roll(st) {
                Fate::Pass => {}
                Fate::CutRequest(at) => left = at,
                Fate::CutResponse(at) => budget.store(at, Ordering::SeqCst),
                Fate::Delay(d) => std::thread::sleep(d),
            }
        }
        let allowed = left.min(n as u64) as usize;
        if to.write_all(&buf[..allowed]).is_err() {
            close(&from, &to);
            return;
        }
        if left != u64::MAX {
            left -= allowed as u64;
            if left == 0 {
                close(&from, &to);
                return;
            }
        }
    }
}

/// Server to client, cut once a pending response budget runs out.
fn responses(mut from: TcpStream, mut to: TcpStream, budget: &AtomicU64) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        let left = budget.load(Ordering::SeqCst);
        let allowed = left.min(n as u64) as usize;
        if to.write_all(&buf[..allowed]).is_err() {
            close(&from, &to);
            return;
        }
        if left != u64::MAX {
            budget.store(left - allowed as u64, Ordering::SeqCst);
            if left == allowed as u64 {
                close(&from, &to);
                return;
            }
        }
    }
}
