//! The web client: its page and assets (embedded in the binary, served without the token: they
//! carry no data) and its sign-in, a one-time code traded for the token.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use opta_protocol::{WebCodeResponse, WebExchangeRequest, WebExchangeResponse};
use subtle::ConstantTimeEq;

use super::AppState;
use super::extract::ApiJson;
use crate::error::{Error, Result};
use crate::ids::new_sign_in_code;

/// How long a sign-in code works.
pub const CODE_LIFETIME: Duration = Duration::from_secs(60);
/// Most codes outstanding at once (the oldest is dropped first).
const MAX_CODES: usize = 32;

/// The page's Content-Security-Policy: its own scripts and styles only, connections to its own
/// origin only (WebSocket included), no frames, no plugins, no forms elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $type:expr) => {
        Asset {
            path: $path,
            content_type: $type,
            body: include_bytes!(concat!("../../web/", $path)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Everything under `/assets/`.
const ASSETS: &[Asset] = &[
    asset!("app.js", JS),
    asset!("render.js", JS),
    asset!("api.js", JS),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("icon.svg", "image/svg+xml"),
    asset!("vendor/marked.js", JS),
    asset!("vendor/purify.js", JS),
    asset!("vendor/LICENSE-marked.txt", TEXT),
    asset!("vendor/LICENSE-dompurify.txt", TEXT),
    asset!("vendor/VERSIONS", TEXT),
];

const INDEX: &[u8] = include_bytes!("../../web/index.html");

/// `GET /`: the page.
pub async fn index() -> Response {
    let mut response = embedded("text/html; charset=utf-8", INDEX);
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    response
}

/// `GET /assets/{*file}`.
pub async fn asset(Path(file): Path<String>) -> Result<Response> {
    ASSETS
        .iter()
        .find(|a| a.path == file)
        .map(|a| embedded(a.content_type, a.body))
        .ok_or_else(|| Error::RouteNotFound(format!("/assets/{file}")))
}

fn embedded(content_type: &'static str, body: &'static [u8]) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Small, local and versioned with the daemon: revalidate rather than go stale
            // after an upgrade.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Middleware body: headers every response carries (API answers too).
pub fn add_security_headers(headers: &mut HeaderMap) {
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// Outstanding sign-in codes. A short list behind a lock: codes are created by a person
/// running `opta web` and redeemed once by a page, far too rarely for an actor to pay off.
#[derive(Default)]
pub struct SignInCodes {
    codes: Mutex<Vec<(String, Instant)>>,
}

impl SignInCodes {
    /// A new code, valid for [`CODE_LIFETIME`].
    pub fn issue(&self) -> String {
        let code = new_sign_in_code();
        let mut codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        codes.retain(|(_, expires)| *expires > now);
        if codes.len() >= MAX_CODES {
            codes.remove(0);
        }
        codes.push((code.clone(), now + CODE_LIFETIME));
        code
    }

    /// True (once) for an outstanding, unexpired code; the code is then used up.
    pub fn redeem(&self, given: &str) -> bool {
        let mut codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        codes.retain(|(_, expires)| *expires > now);
        let found = codes.iter().position(|(code, _)| {
            code.len() == given.len() && bool::from(code.as_bytes().ct_eq(given.as_bytes()))
        });
        found.map(|i| codes.remove(i)).is_some()
    }
}

/// `POST /v3/web/code`: a one-time code and the page's link carrying it.
pub async fn issue_code(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> (StatusCode, Json<WebCodeResponse>) {
    let code = state.sign_in.issue();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("127.0.0.1");
    let expires_at = chrono::Utc::now()
        + chrono::Duration::from_std(CODE_LIFETIME).unwrap_or(chrono::Duration::zero());
    (
        StatusCode::CREATED,
        Json(WebCodeResponse {
            url: format!("http://{host}/#code={code}"),
            code,
            expires_at: expires_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }),
    )
}

/// `POST /v3/web/exchange` (no token): the token for a valid code, once.
pub async fn exchange(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<WebExchangeRequest>,
) -> Result<Json<WebExchangeResponse>> {
    if state.sign_in.redeem(&request.code) {
        Ok(Json(WebExchangeResponse {
            token: state.token.to_string(),
        }))
    } else {
        Err(Error::SignInCodeRejected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_works_once() {
        let codes = SignInCodes::default();
        let code = codes.issue();
        assert!(!codes.redeem("nope"));
        assert!(!codes.redeem(&code[1..]));
        assert!(codes.redeem(&code));
        assert!(!codes.redeem(&code));
    }

    #[test]
    fn expired_codes_fail_and_old_ones_make_room() {
        let codes = SignInCodes::default();
        let first = codes.issue();
        for _ in 0..MAX_CODES {
            codes.issue();
        }
        assert!(!codes.redeem(&first), "the oldest code was dropped");
        let code = codes.issue();
        if let Some(entry) = codes.codes.lock().unwrap().iter_mut().find(|c| c.0 == code) {
            entry.1 = Instant::now();
        }
        assert!(!codes.redeem(&code), "an expired code is refused");
    }

    #[test]
    fn every_asset_is_embedded_and_typed() {
        assert!(!INDEX.is_empty());
        for a in ASSETS {
            assert!(!a.body.is_empty(), "{} is empty", a.path);
            let ext = a.path.rsplit('.').next().unwrap_or("");
            let expected = match ext {
                "js" => "text/javascript",
                "css" => "text/css",
                "svg" => "image/svg+xml",
                _ => "text/plain",
            };
            assert!(a.content_type.starts_with(expected), "{}", a.path);
        }
    }
}
