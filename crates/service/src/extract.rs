//! Request extractors that answer bad input in the contract's shapes
//! instead of axum's plain-text rejections: JSON bodies (415, 413, 400
//! "JSON parse error - ..."), query strings and integer path ids.
//!
//! Handlers then parse fields into domain values with the helpers here
//! (`required_int`, `optional_string`), collecting DRF-style field errors.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{header, request::Parts};
use serde_json::{Map, Value};

use crate::error::{ApiError, FieldErrors};
use crate::AppState;

/// A request body that is a JSON object. An empty body counts as `{}`
/// (clients send `Content-Type: application/json` with no body).
#[derive(Debug)]
pub struct JsonObject(pub Map<String, Value>);

impl FromRequest<AppState> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.settings.max_body_bytes;
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if let Some(len) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
        {
            if len > limit {
                return Err(ApiError::PayloadTooLarge(limit));
            }
        }
        let bytes: Bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| ApiError::PayloadTooLarge(limit))?;
        let is_json = content_type.as_deref().is_some_and(|ct| {
            let mime = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        });
        let empty = bytes.iter().all(u8::is_ascii_whitespace);
        // No content type and no body is fine (DELETE/POST with nothing to say).
        if !(is_json || content_type.is_none() && empty) {
            return Err(ApiError::UnsupportedMediaType(
                content_type.unwrap_or_default(),
            ));
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonObject(Map::new()));
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(JsonObject(map)),
            Ok(other) => {
                let got = match other {
                    Value::Array(_) => "list",
                    Value::String(_) => "str",
                    Value::Number(n) if n.is_f64() => "float",
                    Value::Number(_) => "int",
                    Value::Bool(_) => "bool",
                    _ => "NoneType",
                };
                let mut f = FieldErrors::new();
                f.insert(
                    "non_field_errors".into(),
                    vec![format!(
                        "Invalid data. Expected a dictionary, but got {got}."
                    )],
                );
                Err(ApiError::Fields(f))
            }
            Err(e) => Err(ApiError::BadRequest(format!("JSON parse error - {e}"))),
        }
    }
}

/// The query string as ordered pairs; a repeated key keeps its last value.
#[derive(Debug, Default)]
pub struct QueryPairs(pub Vec<(String, String)>);

impl QueryPairs {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q).unwrap_or_default();
        Ok(QueryPairs(pairs))
    }
}

/// DRF's IntegerField coercion: JSON integers, integral floats, and strings
/// holding an integer are accepted; anything else is "A valid integer is required."
pub fn coerce_int(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        }),
        Value::String(s) => parse_int_text(s),
        _ => None,
    }
}

/// An integer written as text ("12345", " 12345 ", "12345.0").
pub fn parse_int_text(s: &str) -> Option<i64> {
    let s = s.trim();
    let s = s
        .split_once('.')
        .filter(|(_, frac)| frac.chars().all(|c| c == '0'))
        .map(|(int, _)| int)
        .unwrap_or(s);
    s.parse::<i64>().ok()
}

const INVALID_INT: &str = "A valid integer is required.";

/// A required integer field; records the DRF message on failure.
pub fn required_int(map: &Map<String, Value>, name: &str, errors: &mut FieldErrors) -> Option<i64> {
    match map.get(name) {
        None => {
            errors.insert(name.into(), vec!["This field is required.".into()]);
            None
        }
        Some(Value::Null) => {
            errors.insert(name.into(), vec!["This field may not be null.".into()]);
            None
        }
        Some(v) => {
            let n = coerce_int(v);
            if n.is_none() {
                errors.insert(name.into(), vec![INVALID_INT.into()]);
            }
            n
        }
    }
}

/// An optional string field of at most `max` characters; numbers are
/// taken as their text, as DRF's CharField does.
pub fn optional_string(
    map: &Map<String, Value>,
    name: &str,
    max: usize,
    errors: &mut FieldErrors,
) -> Option<String> {
    let text = match map.get(name)? {
        Value::String(s) => s.trim().to_owned(),
        Value::Number(n) => n.to_string(),
        Value::Null => {
            errors.insert(name.into(), vec!["This field may not be null.".into()]);
            return None;
        }
        _ => {
            errors.insert(name.into(), vec!["Not a valid string.".into()]);
            return None;
        }
    };
    if text.chars().count() > max {
        errors.insert(
            name.into(),
            vec![format!(
                "Ensure this field has no more than {max} characters."
            )],
        );
        return None;
    }
    Some(text)
}

/// An id from the URL path: anything but a positive integer is "Not found."
/// (DRF's `<int:pk>` routes do not match it).
pub fn path_id(raw: &str) -> Result<i64, ApiError> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::not_found());
    }
    raw.parse::<i64>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(ApiError::not_found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn integers_coerce_like_drf() {
        assert_eq!(coerce_int(&json!(12345)), Some(12345));
        assert_eq!(coerce_int(&json!("12345")), Some(12345));
        assert_eq!(coerce_int(&json!(12345.0)), Some(12345));
        assert_eq!(coerce_int(&json!("12345.0")), Some(12345));
        assert_eq!(coerce_int(&json!(1.5)), None);
        assert_eq!(coerce_int(&json!("abc")), None);
        assert_eq!(coerce_int(&json!(true)), None);
        assert_eq!(coerce_int(&json!([1])), None);
        assert!(matches!(path_id("12"), Ok(12)));
        assert!(path_id("abc").is_err() && path_id("0").is_err() && path_id("-1").is_err());
    }
}
