//! Idempotency keys: what a create request's retry needs to get the first
//! answer back instead of starting a second backup or restore.

use std::fmt;

use time::OffsetDateTime;

use crate::TokenOwner;

/// A keyed request, as the first request with the key claims it.
#[derive(Clone, PartialEq, Eq)]
pub struct IdempotentRequest {
    /// Whom the token acts for; keys of different owners never meet.
    pub owner: TokenOwner,
    /// The client's `Idempotency-Key`.
    pub key: String,
    /// A hash of what the request asks for (method, path, body), so a key
    /// reused for a different request can be told apart.
    pub fingerprint: [u8; 32],
}

// The key is the client's, possibly guessable: keep it out of debug logs.
impl fmt::Debug for IdempotentRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotentRequest")
            .field("owner", &self.owner)
            .field("key_len", &self.key.len())
            .finish()
    }
}

/// The answer given to the first request with a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// What claiming a key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// The key was free: this request runs, then completes or releases it.
    Claimed,
    /// The same request under this key is still running, since `started_at`
    /// (or was cut short by a crash, when that is long ago).
    InProgress { started_at: OffsetDateTime },
    /// The same request under this key already ran: answer with this.
    Completed(StoredResponse),
    /// The key was used for a different request.
    Mismatch,
}

/// How the key's owner is stored (`owner` column).
pub(crate) fn owner_text(owner: TokenOwner) -> String {
    match owner {
        TokenOwner::Account(a) => format!("account:{}", a.0),
        TokenOwner::Admin => "admin".into(),
    }
}
