//! Rate limits: a token bucket per caller and class of request, in memory.
//!
//! The caller is the API token (after authentication), or the peer's IP
//! address for requests without a valid token, so guessing tokens is
//! throttled too. Reads (GET, HEAD, OPTIONS) and writes (anything else: they
//! start backups and restores) have separate buckets with their own rate
//! and burst. Every limited response carries the IETF draft headers
//! `RateLimit-Limit` (the bucket size), `RateLimit-Remaining` and
//! `RateLimit-Reset` (seconds until the bucket is full again); an empty
//! bucket answers 429 in DRF's words with `Retry-After`.
//!
//! Cost: one uncontended mutex of 16 and a hash lookup per request. Memory
//! is bounded by `max_tracked`: a bucket that has refilled to its burst says
//! nothing a fresh one would not, so idle buckets are evicted (every minute,
//! and whenever a shard is full); callers that still do not fit share one
//! overflow bucket per class and shard.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use vpsbackup_catalog::TokenOwner;

use crate::auth::{Authenticated, Caller};
use crate::error::ApiError;
use crate::settings::RateLimitSettings;
use crate::AppState;

const SHARDS: usize = 16;
/// How often a shard drops its idle buckets even when not full.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// A full shard sweeps at most this often; in between, newcomers overflow.
const FULL_SWEEP_EVERY: Duration = Duration::from_secs(1);

pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Whose bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Who {
    /// An API token, by id.
    Token(i64),
    /// A request without a valid token, by peer address.
    Peer(IpAddr),
}

/// Which of the caller's two buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Read = 0,
    Write = 1,
}

impl Class {
    pub fn of(method: &Method) -> Class {
        if method == Method::GET || method == Method::HEAD || method == Method::OPTIONS {
            Class::Read
        } else {
            Class::Write
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Quota {
    per_second: f64,
    burst: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(q: Quota, now: Instant) -> Bucket {
        Bucket {
            tokens: q.burst,
            at: now,
        }
    }

    fn refill(&mut self, q: Quota, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * q.per_second).min(q.burst);
        self.at = now;
    }
}

struct Shard {
    buckets: HashMap<(Who, Class), Bucket>,
    overflow: [Bucket; 2],
    last_sweep: Instant,
}

/// What the limiter decided for one request, and the headers that say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The bucket size.
    pub limit: u32,
    /// Requests left right now.
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
    /// When refused: seconds until one request is allowed.
    pub retry_after_secs: u64,
}

impl Verdict {
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_LIMIT, HeaderValue::from(self.limit));
        headers.insert(RATELIMIT_REMAINING, HeaderValue::from(self.remaining));
        headers.insert(RATELIMIT_RESET, HeaderValue::from(self.reset_secs));
    }
}

/// The buckets of every caller.
pub struct RateLimiter {
    quotas: [Quota; 2],
    exempt_admin: bool,
    shard_capacity: usize,
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl RateLimiter {
    pub fn new(settings: &RateLimitSettings) -> RateLimiter {
        let quota = |rate: u32, burst: u32| Quota {
            per_second: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
        };
        let quotas = [
            quota(settings.read_per_second, settings.read_burst),
            quota(settings.write_per_second, settings.write_burst),
        ];
        let now = Instant::now();
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    buckets: HashMap::new(),
                    overflow: [Bucket::full(quotas[0], now), Bucket::full(quotas[1], now)],
                    last_sweep: now,
                })
            })
            .collect();
        RateLimiter {
            quotas,
            exempt_admin: settings.exempt_admin,
            shard_capacity: (settings.max_tracked / SHARDS).max(1),
            hasher: RandomState::new(),
            shards,
        }
    }

    /// Takes one request from `who`'s `class` bucket if it has one.
    pub fn check(&self, who: Who, class: Class, now: Instant) -> Verdict {
        let q = self.quotas[class as usize];
        let key = (who, class);
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if now.saturating_duration_since(shard.last_sweep) >= SWEEP_EVERY {
            self.sweep(&mut shard, now);
        }
        if !shard.buckets.contains_key(&key)
            && shard.buckets.len() >= self.shard_capacity
            && now.saturating_duration_since(shard.last_sweep) >= FULL_SWEEP_EVERY
        {
            self.sweep(&mut shard, now);
        }
        let bucket =
            if shard.buckets.contains_key(&key) || shard.buckets.len() < self.shard_capacity {
                shard
                    .buckets
                    .entry(key)
                    .or_insert_with(|| Bucket::full(q, now))
            } else {
                &mut shard.overflow[class as usize]
            };
        bucket.refill(q, now);
        let allowed = bucket.tokens >= 1.0;
        if allowed {
            bucket.tokens -= 1.0;
        }
        let retry_after_secs = if allowed {
            0
        } else {
            ((1.0 - bucket.tokens) / q.per_second).ceil().max(1.0) as u64
        };
        Verdict {
            allowed,
            limit: q.burst as u32,
            remaining: bucket.tokens.floor() as u32,
            reset_secs: ((q.burst - bucket.tokens) / q.per_second).ceil() as u64,
            retry_after_secs,
        }
    }

    /// Drops the buckets that have refilled to their burst.
    fn sweep(&self, shard: &mut Shard, now: Instant) {
        let quotas = self.quotas;
        shard.buckets.retain(|(_, class), b| {
            let mut b = *b;
            b.refill(quotas[*class as usize], now);
            b.tokens < quotas[*class as usize].burst
        });
        shard.last_sweep = now;
    }

    /// Buckets held (for tests of the memory bound).
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .buckets
                    .len()
            })
            .sum()
    }
}

/// The middleware: authenticates once (keeping the outcome for the
/// handler), picks the bucket, and answers 429 or passes the request on.
pub async fn limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(limiter) = state.limiter.clone() else {
        return next.run(req).await;
    };
    let (mut parts, body) = req.into_parts();
    let mut who = None;
    if parts.headers.contains_key(header::AUTHORIZATION) {
        let outcome = match Caller::from_token(&parts, &state).await {
            Ok(caller) => Ok(caller),
            Err(ApiError::Unauthenticated(text)) => Err(text),
            Err(other) => return other.into_response(),
        };
        if let Ok(caller) = &outcome {
            if limiter.exempt_admin && caller.token.owner == TokenOwner::Admin {
                parts.extensions.insert(Authenticated(outcome));
                return next.run(Request::from_parts(parts, body)).await;
            }
            who = Some(Who::Token(caller.token.id.0));
        }
        parts.extensions.insert(Authenticated(outcome));
    }
    let who = who.unwrap_or_else(|| {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        Who::Peer(peer)
    });
    let verdict = limiter.check(who, Class::of(&parts.method), Instant::now());
    let mut resp = if verdict.allowed {
        next.run(Request::from_parts(parts, body)).await
    } else {
        ApiError::Throttled(verdict.retry_after_secs).into_response()
    };
    verdict.write_headers(resp.headers_mut());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: u32, burst: u32, max_tracked: usize) -> RateLimiter {
        RateLimiter::new(&RateLimitSettings {
            enabled: true,
            read_per_second: rate,
            read_burst: burst,
            write_per_second: 1,
            write_burst: 1,
            exempt_admin: true,
            max_tracked,
        })
    }

    #[test]
    fn a_bucket_empties_then_refills_at_its_rate() {
        let l = limiter(2, 3, 1000);
        let t0 = Instant::now();
        let who = Who::Token(1);
        let seen: Vec<_> = (0..4)
            .map(|_| l.check(who, Class::Read, t0))
            .map(|v| (v.allowed, v.remaining))
            .collect();
        assert_eq!(seen, [(true, 2), (true, 1), (true, 0), (false, 0)]);
        let refused = l.check(who, Class::Read, t0);
        assert_eq!((refused.retry_after_secs, refused.reset_secs), (1, 2));
        // Half a second at 2/s is one request.
        let later = l.check(who, Class::Read, t0 + Duration::from_millis(500));
        assert!(later.allowed);
        // Writes and other callers have their own buckets.
        assert!(l.check(who, Class::Write, t0).allowed);
        assert!(!l.check(who, Class::Write, t0).allowed);
        assert_eq!(l.check(Who::Token(2), Class::Read, t0).remaining, 2);
    }

    #[test]
    fn idle_buckets_are_evicted_and_memory_stays_bounded() {
        let l = limiter(1000, 1, 32);
        let t0 = Instant::now();
        for i in 0..10_000 {
            l.check(Who::Token(i), Class::Read, t0);
        }
        assert!(l.tracked() <= 32, "{} buckets", l.tracked());
        // A second on, every bucket has refilled: the next newcomer sweeps them.
        let t1 = t0 + Duration::from_secs(2);
        for i in 0..10_000 {
            l.check(Who::Token(100_000 + i), Class::Read, t1);
        }
        assert!(l.tracked() <= 32);
        let t2 = t1 + SWEEP_EVERY;
        l.check(Who::Token(0), Class::Read, t2);
        assert!(l.tracked() <= 32);
    }
}
