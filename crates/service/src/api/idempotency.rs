//! `Idempotency-Key` on the create routes (`POST /backups/`,
//! `/servers/{id}/backup/`, `/servers/{id}/restore/`): a retried create
//! answers what the first one did instead of starting a second job.
//!
//! The first request with a key claims it in the catalog (a primary key on
//! owner + key, so of two concurrent requests exactly one claims it), runs,
//! and stores its status and body if it succeeded (2xx). A retry of the same
//! request (method, path and body JSON) gets the stored answer with
//! `Idempotent-Replayed: true`; one while the first still runs gets 409, and
//! so does one whose first request a crash cut short (nobody knows whether
//! it took effect, so the key is never run twice). The key reused for a
//! different request gets 422: the request is well-formed but cannot be
//! processed with that key (the IETF idempotency-key draft's choice, which
//! keeps 409 for "still running"). Failed requests (4xx, 5xx)
//! are not stored: the key is released, so the client can fix the request
//! or wait and retry with the same key. Keys expire after 24 h.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use sha2::{Digest, Sha256};
use vpsbackup_catalog::{IdempotencyClaim, IdempotentRequest, StoredResponse};

use crate::auth::{Authenticated, Caller};
use crate::error::ApiError;
use crate::AppState;

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// A key claimed this long ago without an answer lost its request.
const INTERRUPTED_AFTER: time::Duration = time::Duration::minutes(2);
const KEY_INTERRUPTED: &str = "The first request with this Idempotency-Key was interrupted \
     by a service restart and may or may not have taken effect. Check the list, then use a new key.";
/// Longest key accepted.
pub const KEY_MAX: usize = 255;
/// How long a key is remembered.
pub const KEY_TTL: time::Duration = time::Duration::hours(24);

const BAD_KEY: &str = "Idempotency-Key must be 1 to 255 printable ASCII characters.";
const KEY_REUSED: &str = "This Idempotency-Key was already used for a different request. \
     Use a new key for a new request.";
const KEY_IN_PROGRESS: &str = "A request with this Idempotency-Key is still being processed. \
     Retry in a moment.";

/// The key of a request, if it has a valid one.
fn key_of(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > KEY_MAX || !bytes.iter().all(|b| (0x20..0x7f).contains(b))
    {
        return Err(ApiError::BadRequest(BAD_KEY.into()));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// JSON with object keys sorted, so key order does not make two bodies differ.
fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(k.clone()).to_string().as_bytes());
                out.push(b':');
                canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(v, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

/// What the request asks for: method, path (trailing slash already trimmed
/// by the root layer) and body, as JSON when it parses, else its bytes.
pub fn fingerprint(method: &Method, path: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update(b" ");
    h.update(path.as_bytes());
    h.update(b"\n");
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => {
            let mut out = Vec::with_capacity(body.len());
            canonical(&v, &mut out);
            h.update(b"json:");
            h.update(&out);
        }
        Err(_) => {
            h.update(b"raw:");
            h.update(body);
        }
    }
    h.finalize().into()
}

/// The middleware of the create routes.
pub async fn replay_or_run(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match run(state, req, next).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn run(state: AppState, req: Request, next: Next) -> Result<Response, ApiError> {
    // Unauthenticated requests go on to the handler, which answers 401
    // before anything about the key.
    let (mut parts, body) = req.into_parts();
    let caller = match Caller::of_request(&parts, &state).await {
        Ok(c) => c,
        Err(ApiError::Unauthenticated(_)) => {
            return Ok(next.run(Request::from_parts(parts, body)).await)
        }
        Err(e) => return Err(e),
    };
    let Some(key) = key_of(&parts.headers)? else {
        parts.extensions.insert(Authenticated(Ok(caller)));
        return Ok(next.run(Request::from_parts(parts, body)).await);
    };
    let limit = state.settings.max_body_bytes;
    let bytes: Bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(limit))?;
    let owner = caller.token.owner;
    let claim = IdempotentRequest {
        owner,
        key,
        fingerprint: fingerprint(&parts.method, parts.uri.path(), &bytes),
    };
    let now = state.clock.now();
    match state
        .catalog
        .claim_idempotency_key(&claim, now, now - KEY_TTL)
        .await?
    {
        IdempotencyClaim::Claimed => {}
        IdempotencyClaim::Completed(stored) => return Ok(replay(stored)),
        // A create only queues work and answers in milliseconds: a key
        // claimed long ago lost its request to a crash or restart, and
        // whether that request took effect is unknown.
        IdempotencyClaim::InProgress { started_at } if now - started_at > INTERRUPTED_AFTER => {
            return Err(ApiError::Conflict(KEY_INTERRUPTED.into()))
        }
        IdempotencyClaim::InProgress { .. } => {
            return Err(ApiError::Conflict(KEY_IN_PROGRESS.into()))
        }
        IdempotencyClaim::Mismatch => return Err(ApiError::Unprocessable(KEY_REUSED.into())),
    }
    parts.extensions.insert(Authenticated(Ok(caller)));
    let req = Request::from_parts(parts, Body::from(bytes));
    // Run to the end in a task of its own: a client that hangs up (the
    // usual reason to retry) must not leave its key claimed but unanswered,
    // nor its backup made but unrecorded.
    let catalog = state.catalog.clone();
    let key = claim.key;
    let task = tokio::spawn(async move {
        let resp = next.run(req).await;
        if !resp.status().is_success() {
            if let Err(e) = catalog.release_idempotency_key(owner, &key).await {
                tracing::error!(error = %e, "could not release an idempotency key");
            }
            return Ok(resp);
        }
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .map_err(|e| ApiError::Internal(format!("reading a response body: {e}")))?;
        let stored = StoredResponse {
            status: parts.status.as_u16(),
            body: bytes.to_vec(),
        };
        // Failing to store leaves the key claimed: its retries get 409,
        // never a second backup.
        if let Err(e) = catalog.complete_idempotency_key(owner, &key, &stored).await {
            tracing::error!(error = %e, "could not store an idempotent answer");
        }
        Ok(Response::from_parts(parts, Body::from(bytes)))
    });
    match task.await {
        Ok(resp) => resp,
        Err(e) => Err(ApiError::Internal(format!("a keyed request failed: {e}"))),
    }
}

fn replay(stored: StoredResponse) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut resp = (status, Body::from(stored.body)).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(path: &str, body: &str) -> [u8; 32] {
        fingerprint(&Method::POST, path, body.as_bytes())
    }

    #[test]
    fn same_json_same_fingerprint_whatever_the_layout() {
        let a = fp("/api/v1/backups", r#"{"server_id": 1, "description": "x"}"#);
        assert_eq!(
            a,
            fp("/api/v1/backups", r#"{"description":"x","server_id":1}"#)
        );
        assert_ne!(
            a,
            fp("/api/v1/backups", r#"{"server_id": 2, "description": "x"}"#)
        );
        assert_ne!(
            a,
            fp(
                "/api/v1/servers/1/backup",
                r#"{"server_id": 1, "description": "x"}"#
            )
        );
    }

    #[test]
    fn keys_are_checked() {
        let with = |k: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_bytes(k).unwrap());
            key_of(&headers)
        };
        assert_eq!(with(b"abc-123 x").unwrap().as_deref(), Some("abc-123 x"));
        assert!(with(b"").is_err());
        assert!(with(&[b'a'; 256]).is_err());
        assert!(with(&[b'a'; 255]).is_ok());
        assert!(with(b"caf\xc3\xa9").is_err());
    }
}
