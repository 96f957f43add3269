//! The HTTP API: one module per resource, each with its own `router()`,
//! merged here under `/api/v1`. Paths are registered without their trailing
//! slash; the root layer trims it, so `/backups/` and `/backups` both answer.

pub mod account;
pub mod backups;
pub mod idempotency;
pub mod openapi;
pub mod ratelimit;
pub mod restores;
pub mod servers;
pub mod views;

use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::trace::TraceLayer;
use vpsbackup_catalog::PageRequest;

use crate::error::ApiError;
use crate::extract::{parse_int_text, QueryPairs};
use crate::AppState;

/// Page size when the client gives none.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest page size accepted.
pub const MAX_PAGE_SIZE: u32 = 500;

/// Every route, with request tracing, rate limits, and JSON errors for
/// unknown paths and methods.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(backups::router(&state))
        .merge(servers::router(&state))
        .merge(restores::router())
        .merge(account::router())
        .merge(openapi::router())
        .fallback(|| async { ApiError::not_found() })
        .layer(axum::middleware::from_fn(json_method_not_allowed))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ratelimit::limit,
        ))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let route = req
                .extensions()
                .get::<MatchedPath>()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "<unmatched>".into());
            tracing::info_span!("request", method = %req.method(), route, path = %req.uri().path())
        }))
        .with_state(state)
}

/// axum answers a wrong method with a bare 405; clients expect DRF's JSON.
async fn json_method_not_allowed(req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let resp = next.run(req).await;
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED
        && resp.headers().get(header::CONTENT_TYPE).is_none()
    {
        let allow = resp.headers().get(header::ALLOW).cloned();
        let mut json = ApiError::MethodNotAllowed(method).into_response();
        if let Some(allow) = allow {
            json.headers_mut().insert(header::ALLOW, allow);
        }
        return json;
    }
    resp
}

/// `page` and `page_size` from the query. A bad page is DRF's 404
/// "Invalid page."; a page size that is not a whole number from 1 to
/// [`MAX_PAGE_SIZE`] is a 400 field error in DRF's words, as the OpenAPI
/// document says (DRF itself would quietly serve another size, so a client
/// could not tell what it got).
pub fn page_request(q: &QueryPairs) -> Result<PageRequest, ApiError> {
    let number = match q.get("page").map(str::trim) {
        None | Some("") => 1,
        Some(p) => match parse_int_text(p) {
            Some(n) if n >= 1 && n <= u32::MAX as i64 => n as u32,
            _ => return Err(invalid_page()),
        },
    };
    let size = match q.get("page_size").map(str::trim) {
        None | Some("") => DEFAULT_PAGE_SIZE,
        Some(v) => match parse_int_text(v) {
            Some(n) if (1..=i64::from(MAX_PAGE_SIZE)).contains(&n) => n as u32,
            Some(n) if n < 1 => {
                return Err(ApiError::field(
                    "page_size",
                    "Ensure this value is greater than or equal to 1.",
                ))
            }
            Some(_) => {
                return Err(ApiError::field(
                    "page_size",
                    format!("Ensure this value is less than or equal to {MAX_PAGE_SIZE}."),
                ))
            }
            None => return Err(ApiError::field("page_size", "A valid integer is required.")),
        },
    };
    Ok(PageRequest { number, size })
}

pub fn invalid_page() -> ApiError {
    ApiError::NotFound("Invalid page.".into())
}

/// Absolute `next` / `previous` links, built from the request's Host as DRF does.
pub fn page_links(
    headers: &HeaderMap,
    path: &str,
    q: &QueryPairs,
    page: PageRequest,
    count: u64,
) -> (Option<String>, Option<String>) {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|s| *s == "https" || *s == "http")
        .unwrap_or("http");
    let path = if path.ends_with('/') {
        path.to_owned()
    } else {
        format!("{path}/")
    };
    let link = |number: u32| {
        let mut pairs: Vec<(String, String)> =
            q.0.iter().filter(|(k, _)| k != "page").cloned().collect();
        if number > 1 {
            pairs.push(("page".into(), number.to_string()));
        }
        let query = serde_urlencoded::to_string(&pairs).unwrap_or_default();
        if query.is_empty() {
            format!("{scheme}://{host}{path}")
        } else {
            format!("{scheme}://{host}{path}?{query}")
        }
    };
    let shown = page.number as u64 * page.size as u64;
    let next = (shown < count).then(|| link(page.number + 1));
    let previous = (page.number > 1).then(|| link(page.number - 1));
    (next, previous)
}
