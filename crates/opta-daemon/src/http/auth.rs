//! Token check for every route but `GET /health` (the WebSocket route checks for itself, so
//! it can answer with close code 4001).

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::error::Error;

/// Routes reachable without a token: liveness, the web page (it carries no data) and the
/// exchange of a one-time sign-in code for the token.
const PUBLIC_PATHS: &[&str] = &["/health", "/", "/v3/web/exchange"];
/// Prefix of the web page's assets, public like the page.
const PUBLIC_PREFIX: &str = "/assets/";
/// Routes that authenticate inside the handler.
pub const SELF_AUTHENTICATED_PATHS: &[&str] = &["/v3/ws"];

/// Middleware: 401 `{"error":"Unauthorized"}` unless the token is given.
pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if PUBLIC_PATHS.contains(&path)
        || path.starts_with(PUBLIC_PREFIX)
        || SELF_AUTHENTICATED_PATHS.contains(&path)
    {
        return next.run(request).await;
    }
    if is_authorised(&state.token, request.headers(), request.uri().query()) {
        next.run(request).await
    } else {
        Error::Unauthorized.into_response()
    }
}

/// True when the bearer header or the `token` query parameter carries `expected`.
pub fn is_authorised(expected: &str, headers: &HeaderMap, query: Option<&str>) -> bool {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_credentials);
    if let Some(given) = from_header
        && tokens_match(expected, given)
    {
        return true;
    }
    query.is_some_and(|q| {
        form_urlencoded::parse(q.as_bytes())
            .any(|(k, v)| k == "token" && tokens_match(expected, &v))
    })
}

/// The credentials of a `Bearer` authorization value; the scheme name is case-insensitive
/// (RFC 9110, section 11.1).
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

fn tokens_match(expected: &str, given: &str) -> bool {
    // Length is not secret (tokens have a fixed format); the bytes are compared in constant time.
    expected.len() == given.len() && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn header_or_query() {
        let mut headers = HeaderMap::new();
        assert!(!is_authorised("abc", &headers, None));
        assert!(is_authorised("abc", &headers, Some("x=1&token=abc")));
        assert!(!is_authorised("abc", &headers, Some("token=abd")));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert!(is_authorised("abc", &headers, None));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer ab"));
        assert!(!is_authorised("abc", &headers, None));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc"),
        );
        assert!(is_authorised("abc", &headers, None));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(!is_authorised("abc", &headers, None));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearerabc"));
        assert!(!is_authorised("abc", &headers, None));
    }
}
