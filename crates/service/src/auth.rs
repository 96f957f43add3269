//! API tokens and the [`Caller`] extractor.
//!
//! A token is `vps_` + 40 random URL-safe characters (240 bits), shown once
//! and stored only as its SHA-256. A request's token is hashed, looked up by
//! hash, and the stored hash compared in constant time.

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use vpsbackup_catalog::{AccountId, ApiToken, Scope, TokenOwner};

use crate::error::{ApiError, INVALID_TOKEN, NO_CREDENTIALS};
use crate::AppState;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
/// Every token starts with this.
pub const TOKEN_PREFIX: &str = "vps_";
const TOKEN_RANDOM_CHARS: usize = 40;

/// A freshly made token: the secret (show it once) and what to store.
pub struct GeneratedToken {
    pub secret: String,
    pub hash: [u8; 32],
    /// `vps_` and the first 4 random characters, to tell tokens apart.
    pub prefix: String,
}

/// Makes a new random token.
pub fn generate_token() -> Result<GeneratedToken, getrandom::Error> {
    let mut raw = [0u8; TOKEN_RANDOM_CHARS];
    getrandom::fill(&mut raw)?;
    // 64 symbols: `b & 63` maps bytes uniformly, no modulo bias.
    let random: String = raw
        .iter()
        .map(|b| ALPHABET[(b & 63) as usize] as char)
        .collect();
    let secret = format!("{TOKEN_PREFIX}{random}");
    Ok(GeneratedToken {
        hash: hash_token(&secret),
        prefix: secret[..TOKEN_PREFIX.len() + 4].to_owned(),
        secret,
    })
}

/// SHA-256 of the token text.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Who is calling, from a valid token.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token: ApiToken,
}

impl Caller {
    /// What this caller may see.
    pub fn scope(&self) -> Scope {
        match self.token.owner {
            TokenOwner::Account(a) => Scope::Account(a),
            TokenOwner::Admin => Scope::All,
        }
    }

    pub fn account(&self) -> Option<AccountId> {
        self.scope().account()
    }
}

/// The bearer token of a request, or why there is none.
fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::Unauthenticated(NO_CREDENTIALS))?
        .to_str()
        .map_err(|_| ApiError::Unauthenticated(NO_CREDENTIALS))?;
    let mut words = value.split_whitespace();
    let scheme = words.next().unwrap_or("");
    let token = words.next();
    if !(scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token")) {
        return Err(ApiError::Unauthenticated(NO_CREDENTIALS));
    }
    match (token, words.next()) {
        (Some(t), None) => Ok(t),
        _ => Err(ApiError::Unauthenticated(NO_CREDENTIALS)),
    }
}

/// A request's authentication, done once by the rate limiter (which needs
/// the caller before the handler runs) and kept in the request's extensions
/// so the [`Caller`] extractor does not look the token up a second time.
/// The error is the 401 text.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Result<Caller, &'static str>);

impl Caller {
    /// Authenticates a request: the caller from the request's extensions
    /// when a middleware already did, else from its bearer token.
    pub async fn of_request(parts: &Parts, state: &AppState) -> Result<Caller, ApiError> {
        match parts.extensions.get::<Authenticated>() {
            Some(Authenticated(outcome)) => outcome.clone().map_err(ApiError::Unauthenticated),
            None => Caller::from_token(parts, state).await,
        }
    }

    /// Looks the request's bearer token up in the catalog.
    pub async fn from_token(parts: &Parts, state: &AppState) -> Result<Caller, ApiError> {
        let token = bearer(parts)?;
        let hash = hash_token(token);
        let stored = state
            .catalog
            .token_by_hash(&hash)
            .await?
            .ok_or(ApiError::Unauthenticated(INVALID_TOKEN))?;
        if !bool::from(stored.hash.ct_eq(&hash)) || stored.revoked_at.is_some() {
            return Err(ApiError::Unauthenticated(INVALID_TOKEN));
        }
        Ok(Caller { token: stored })
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // The handler is the last to need it: take it rather than clone it.
        match parts.extensions.remove::<Authenticated>() {
            Some(Authenticated(outcome)) => outcome.map_err(ApiError::Unauthenticated),
            None => Caller::from_token(parts, state).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_contract_shape() {
        let t = generate_token().unwrap();
        assert_eq!(t.secret.len(), 44);
        assert!(t.secret.starts_with("vps_"));
        assert!(t.secret[4..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(t.hash, hash_token(&t.secret));
        assert_ne!(generate_token().unwrap().secret, t.secret);
    }
}
