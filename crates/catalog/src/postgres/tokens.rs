//! A process's cache of token lookups on PostgreSQL, so an API request costs
//! one statement (its listing or action) rather than two.
//!
//! A revoked token must stop working at once, on every replica, whichever
//! process revoked it (`vpsbackup token revoke` is a process of its own). So
//! the cache is only trusted while this process listens on [`CHANNEL`]:
//! triggers (migration 0005) notify it whenever a statement changes or
//! deletes tokens or accounts, and every notification empties the cache.
//! PostgreSQL sends a notification when its transaction commits, so a lookup
//! that read a token before a revocation committed either put it in the
//! cache before the notification arrived (and the notification removes it)
//! or after (and then the cache's generation has moved on since the lookup
//! began, and the stale row is not put in). When the listening connection
//! is lost, notifications sent meanwhile are lost too: the cache is emptied
//! once it listens again, and is not used while it cannot. An entry is also
//! never used past [`FRESH`], which bounds what a connection that fails
//! without the listener noticing could cost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;

use super::notify::{self, Heard, Listening};
use crate::ApiToken;

/// The notification channel of migration 0005's triggers.
pub(super) const CHANNEL: &str = "vpsbackup_tokens";

/// The longest an entry is used without being read again.
const FRESH: Duration = Duration::from_secs(30);

/// Past this many entries the cache starts again empty: an account's tokens
/// are few, and a flood of distinct valid tokens is not a case to optimise.
const MAX_ENTRIES: usize = 10_000;

/// The `application_name` of the listening connection, as
/// `pg_stat_activity` shows it.
const LISTENER_NAME: &str = "vpsbackup token cache";

#[derive(Debug)]
pub(super) struct TokenCache {
    state: Mutex<State>,
    /// Where to listen; the listener starts with the first lookup, so
    /// commands that never authenticate a request never open it.
    options: PgConnectOptions,
    listener: OnceLock<Listening>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<[u8; 32], (ApiToken, Instant)>,
    /// Moves on at every emptying; a lookup's row goes in only if it has
    /// not moved since the lookup began.
    generation: u64,
    /// Whether this process listens on [`CHANNEL`] now.
    listening: bool,
}

impl TokenCache {
    pub(super) fn new(options: PgConnectOptions) -> Arc<TokenCache> {
        Arc::new(TokenCache {
            state: Mutex::default(),
            options: options.application_name(LISTENER_NAME),
            listener: OnceLock::new(),
        })
    }

    /// The token with this hash when the cache may answer for it.
    pub(super) fn get(&self, hash: &[u8; 32]) -> Option<ApiToken> {
        let state = self.state.lock().unwrap();
        let (token, at) = state.entries.get(hash).filter(|_| state.listening)?;
        (at.elapsed() < FRESH).then(|| token.clone())
    }

    /// What to hand [`TokenCache::put`] with a lookup's row: taken before
    /// the lookup. Starts the listener on first use.
    pub(super) fn generation(self: &Arc<Self>) -> u64 {
        self.listener
            .get_or_init(|| listen(Arc::downgrade(self), self.options.clone()));
        self.state.lock().unwrap().generation
    }

    /// Keeps a lookup's row unless the cache was emptied since `generation`
    /// was taken, or is not listening.
    pub(super) fn put(&self, token: &ApiToken, generation: u64) {
        let mut state = self.state.lock().unwrap();
        if !state.listening || state.generation != generation {
            return;
        }
        if state.entries.len() >= MAX_ENTRIES {
            state.entries.clear();
        }
        state
            .entries
            .insert(token.hash, (token.clone(), Instant::now()));
    }

    /// Empties the cache; it answers from now on only if `listening`.
    fn empty(&self, listening: bool) {
        let mut state = self.state.lock().unwrap();
        state.entries.clear();
        state.generation += 1;
        state.listening = listening;
    }

    /// How many entries the cache would answer for now (for the tests).
    pub(super) fn usable(&self) -> usize {
        let state = self.state.lock().unwrap();
        match state.listening {
            true => state
                .entries
                .values()
                .filter(|(_, at)| at.elapsed() < FRESH)
                .count(),
            false => 0,
        }
    }

    /// Stops the listener (the catalog is closing).
    pub(super) fn stop(&self) {
        if let Some(listener) = self.listener.get() {
            listener.stop();
        }
        self.empty(false);
    }
}

/// Listens on [`CHANNEL`] for as long as the cache lives (it holds the
/// returned handle), emptying it at every notification and every (re)start
/// of listening.
fn listen(cache: Weak<TokenCache>, options: PgConnectOptions) -> Listening {
    notify::spawn(options, vec![CHANNEL.to_owned()], move |heard| {
        let Some(cache) = cache.upgrade() else {
            return false;
        };
        cache.empty(!matches!(heard, Heard::Lost));
        true
    })
}
