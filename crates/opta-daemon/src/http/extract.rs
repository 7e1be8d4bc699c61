//! Extractors that turn every malformed input into a 400 (or 413) with the PROTOCOL.md body.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use opta_protocol::{ErrorDetail, SessionId};
use serde::de::DeserializeOwned;

use super::AppState;
use crate::error::Error;

/// Request bodies are limited to 10 MiB.
pub const BODY_LIMIT: usize = 10 * 1024 * 1024;

/// A JSON body; unknown fields are ignored, anything else wrong is a 400 naming the field.
/// An empty body reads as `{}`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        // A client that sends half its body and stalls must not hold the connection (nor a
        // shutdown) open: the whole body has a deadline.
        let deadline = state.ctx.limits.body_read_timeout;
        let bytes = tokio::time::timeout(deadline, Bytes::from_request(req, state))
            .await
            .map_err(|_| Error::RequestTimeout(deadline))?
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    Error::PayloadTooLarge { limit: BODY_LIMIT }
                } else {
                    Error::invalid("body", e.body_text())
                }
            })?;
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(Error::invalid("body", "must be a JSON object"));
        }
        parse_json(text).map(ApiJson)
    }
}

/// Parses JSON, naming the offending path on failure.
pub fn parse_json<T: DeserializeOwned>(text: &[u8]) -> Result<T, Error> {
    let de = &mut serde_json::Deserializer::from_slice(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let message = e.inner().to_string();
        let mut path = e.path().to_string();
        // serde names a missing field only in its message; make it part of the path.
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
        {
            path = if path == "." {
                field.to_owned()
            } else {
                format!("{path}.{field}")
            };
        }
        let path = if path == "." { "body".to_owned() } else { path };
        Error::InvalidInput {
            message: format!("Invalid request body: {path}: {message}"),
            details: vec![ErrorDetail { path, message }],
        }
    })
}

/// Query parameters; a bad value is a 400 naming the parameter.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(ApiQuery)
            .map_err(|e| {
                let path = format!("query.{}", e.path());
                Error::invalid(path, e.inner().to_string())
            })
    }
}

/// Checks a session id from a path or query before it touches anything.
pub fn session_id(raw: &str, path: &str) -> Result<SessionId, Error> {
    SessionId::parse(raw).map_err(|e| Error::invalid(path, e.to_string()))
}

/// Path parameters; undecodable segments are a 400.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| Error::invalid("path", e.body_text()))
    }
}
