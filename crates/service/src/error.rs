//! The one error type of the HTTP layer, shaped like Django REST
//! Framework's errors because VPS.org's clients parse those:
//! `{"detail": "..."}`, or `{"field": ["..."]}` for bad input.
//!
//! Catalog errors are mapped here once ([`From<CatalogError>`]); database
//! and internal failures become a logged 500 whose cause never reaches the client.

use std::collections::BTreeMap;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use vpsbackup_catalog::CatalogError;

/// Field name -> messages, as DRF reports validation errors.
pub type FieldErrors = BTreeMap<String, Vec<String>>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401; the text is one of the two the contract allows.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// 400 with per-field messages.
    #[error("invalid fields: {0:?}")]
    Fields(FieldErrors),
    /// 400 with a sentence.
    #[error("{0}")]
    BadRequest(String),
    /// 404 with a sentence ("Not found.", "Server not found.").
    #[error("{0}")]
    NotFound(String),
    /// 405.
    #[error("Method \"{0}\" not allowed.")]
    MethodNotAllowed(String),
    /// 409.
    #[error("{0}")]
    Conflict(String),
    /// 413.
    #[error("Request body is too large; the limit is {0} bytes.")]
    PayloadTooLarge(usize),
    /// 415.
    #[error("Unsupported media type \"{0}\" in request.")]
    UnsupportedMediaType(String),
    /// 422: well-formed, but it cannot be done as asked.
    #[error("{0}")]
    Unprocessable(String),
    /// 429, DRF's `Throttled` text; the seconds also go in `Retry-After`.
    #[error("Request was throttled. Expected available in {0} second{s}.", s = if *.0 == 1 { "" } else { "s" })]
    Throttled(u64),
    /// 500; the text is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

pub const NO_CREDENTIALS: &str = "Authentication credentials were not provided.";
pub const INVALID_TOKEN: &str = "Invalid token.";

impl ApiError {
    /// One field error.
    pub fn field(name: &str, message: impl Into<String>) -> ApiError {
        let mut m = FieldErrors::new();
        m.insert(name.to_owned(), vec![message.into()]);
        ApiError::Fields(m)
    }

    /// DRF's plain 404.
    pub fn not_found() -> ApiError {
        ApiError::NotFound("Not found.".into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Fields(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::NotFound(what) => ApiError::NotFound(format!("{what} not found.")),
            CatalogError::Conflict(m) | CatalogError::Busy(m) => ApiError::Conflict(m),
            CatalogError::Invalid(m) => ApiError::BadRequest(m),
            e @ CatalogError::ManualLimit { .. } => ApiError::BadRequest(e.to_string()),
            e @ (CatalogError::Database(_)
            | CatalogError::Migrate(_)
            | CatalogError::Unreachable(_)) => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            ApiError::Fields(fields) => json!(fields),
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "request failed");
                json!({"detail": "A server error occurred."})
            }
            other => json!({"detail": other.to_string()}),
        };
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ApiError::Throttled(wait) = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(wait));
        }
        resp
    }
}
