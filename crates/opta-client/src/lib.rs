//! Typed client for the opta daemon's v3 protocol.
//!
//! [`DaemonClient`] wraps every HTTP route; [`DaemonClient::subscribe`] opens an
//! [`EventStream`] over WebSocket or SSE that reconnects from the last delivered seq, so each
//! event is seen once and in order; [`DaemonClient::legacy_chat`] runs one `do` turn to the end
//! for scripts.
//!
//! ```no_run
//! # async fn demo() -> Result<(), opta_client::ClientError> {
//! use opta_client::DaemonClient;
//! let client = DaemonClient::discover(std::path::Path::new("/home/me/.config/opta"))?;
//! client.check_contract().await?;
//! let answer = client.legacy_chat("What is 2 + 2?", None).await?;
//! println!("{}", answer.response);
//! # Ok(())
//! # }
//! ```

mod error;
mod events;
mod legacy;

use std::path::Path;
use std::time::Duration;

use opta_protocol::{
    CancelRequest, CancelResponse, Contract, CreateSessionRequest, DaemonState, ErrorBody,
    EventsResponse, HealthResponse, LmxConfirmRequest, LmxDownload, LmxDownloadRequest,
    LmxDownloadsResponse, LmxLoadRequest, LmxLoadResponse, LmxModelsResponse, LmxStatusResponse,
    LmxUnloadRequest, LmxUnloadResponse, MetricsResponse, ResolvePermissionRequest,
    ResolvePermissionResponse, SessionDetail, SessionId, SessionListResponse, SessionSnapshot,
    SubmitTurnRequest, SubmitTurnResponse, V3HealthResponse, path_escape,
};
use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use error::ClientError;
pub use events::{EventStream, StartAt, Transport};
pub use legacy::LegacyChatResponse;

/// Result of client calls.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request (not an event stream) may take, answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an event stream keeps reconnecting to a daemon that went away, by default.
pub const DEFAULT_RECONNECT_DEADLINE: Duration = Duration::from_secs(60);

/// A connection to one daemon: base URL and token. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DaemonClient {
    base_url: String,
    token: String,
    http: reqwest::Client,
    /// The home whose state file named this daemon ([`DaemonClient::discover`]): event
    /// streams look there for a daemon that restarted on another port.
    home: Option<std::path::PathBuf>,
    /// How long event streams keep trying to reconnect; `None`: forever.
    reconnect_deadline: Option<Duration>,
}

impl DaemonClient {
    /// A client for `base_url` (`http://127.0.0.1:9999`) with `token`.
    ///
    /// ```
    /// let client = opta_client::DaemonClient::new("http://127.0.0.1:9999", "secret");
    /// assert_eq!(client.base_url(), "http://127.0.0.1:9999");
    /// ```
    pub fn new(base_url: impl Into<String>, token: impl Into<String>) -> Self {
        // Timeouts on connecting and on silence; whole requests get theirs in `send` (an
        // event stream is one long response and must not have one).
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            token: token.into(),
            http,
            home: None,
            reconnect_deadline: Some(DEFAULT_RECONNECT_DEADLINE),
        }
    }

    /// How long event streams keep reconnecting to a daemon that went away before they end
    /// with [`ClientError::DaemonGone`]; `None` keeps trying forever. Default 60 s.
    pub fn with_reconnect_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.reconnect_deadline = deadline;
        self
    }

    /// A client for the daemon a state file describes.
    pub fn from_state(state: &DaemonState) -> Self {
        let host = match state.host.as_str() {
            "0.0.0.0" | "" => "127.0.0.1".to_owned(),
            "::" => "[::1]".to_owned(),
            h if h.contains(':') && !h.starts_with('[') => format!("[{h}]"),
            h => h.to_owned(),
        };
        Self::new(format!("http://{host}:{}", state.port), state.token.clone())
    }

    /// Reads `$home/daemon/state.json`.
    ///
    /// ```no_run
    /// let state = opta_client::DaemonClient::read_state(std::path::Path::new("/home/me/.config/opta"))?;
    /// println!("daemon pid {}", state.pid);
    /// # Ok::<(), opta_client::ClientError>(())
    /// ```
    pub fn read_state(home: &Path) -> Result<DaemonState> {
        let path = home.join("daemon").join(opta_protocol::STATE_FILE_NAME);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ClientError::NotRunning { path });
            }
            Err(e) => {
                return Err(ClientError::BadStateFile {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadStateFile {
            path,
            reason: e.to_string(),
        })
    }

    /// Finds the daemon of `home` through its state file. Event streams of this client follow
    /// the daemon to a new port when it restarts (they read the state file again).
    pub fn discover(home: &Path) -> Result<Self> {
        let mut client = Self::read_state(home).map(|s| Self::from_state(&s))?;
        client.home = Some(home.to_owned());
        Ok(client)
    }

    /// The daemon the state file of this client's home names now, when it is another one
    /// than this client's (it restarted on another port); settings are kept.
    pub(crate) fn rediscover(&self) -> Option<Self> {
        let home = self.home.as_deref()?;
        let state = Self::read_state(home).ok()?;
        let found = Self::from_state(&state);
        (found.base_url != self.base_url || found.token != self.token).then(|| Self {
            home: self.home.clone(),
            reconnect_deadline: self.reconnect_deadline,
            ..found
        })
    }

    /// The daemon's base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The auth token.
    pub fn token(&self) -> &str {
        &self.token
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base_url))
            .timeout(REQUEST_TIMEOUT)
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(error::transport)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(error::transport)?;
        if !status.is_success() {
            let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| {
                ErrorBody::message(
                    String::from_utf8_lossy(&bytes)
                        .chars()
                        .take(500)
                        .collect::<String>(),
                )
            });
            return Err(ClientError::Api {
                status: status.as_u16(),
                body,
            });
        }
        let bytes = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(bytes).map_err(|e| ClientError::Decode(format!("{path}: {e}")))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(Method::GET, path, None::<&Value>).await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<T> {
        self.send(Method::POST, path, Some(body)).await
    }

    /// `GET /health` (no auth needed).
    pub async fn health(&self) -> Result<HealthResponse> {
        self.get("/health").await
    }

    /// `GET /v3/health`.
    pub async fn v3_health(&self) -> Result<V3HealthResponse> {
        self.get("/v3/health").await
    }

    /// `GET /v3/health`, failing with [`ClientError::ContractMismatch`] unless the daemon speaks
    /// the contract this crate was built for.
    pub async fn check_contract(&self) -> Result<V3HealthResponse> {
        let health = self.v3_health().await?;
        let expected = Contract::current();
        if health.contract != expected {
            return Err(ClientError::ContractMismatch {
                expected: format!("{} v{}", expected.name, expected.version),
                found: format!("{} v{}", health.contract.name, health.contract.version),
            });
        }
        Ok(health)
    }

    /// `GET /v3/metrics`.
    pub async fn metrics(&self) -> Result<MetricsResponse> {
        self.get("/v3/metrics").await
    }

    /// `POST /v3/sessions`: creates a session, or re-opens the one `request.session_id` names.
    pub async fn create_session(&self, request: &CreateSessionRequest) -> Result<SessionSnapshot> {
        self.post("/v3/sessions", request).await
    }

    /// `GET /v3/sessions`: one page, most recently updated first.
    pub async fn list_sessions(
        &self,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<SessionListResponse> {
        let mut query = Vec::new();
        if let Some(limit) = limit {
            query.push(format!("limit={limit}"));
        }
        if let Some(cursor) = cursor {
            query.push(format!("cursor={cursor}"));
        }
        let path = if query.is_empty() {
            "/v3/sessions".to_owned()
        } else {
            format!("/v3/sessions?{}", query.join("&"))
        };
        self.get(&path).await
    }

    /// `GET /v3/sessions/:id`.
    pub async fn get_session(&self, id: &SessionId) -> Result<SessionDetail> {
        self.get(&format!("/v3/sessions/{id}")).await
    }

    /// `DELETE /v3/sessions/:id`.
    pub async fn delete_session(&self, id: &SessionId) -> Result<()> {
        let _: Value = self
            .send(
                Method::DELETE,
                &format!("/v3/sessions/{id}"),
                None::<&Value>,
            )
            .await?;
        Ok(())
    }

    /// `POST /v3/sessions/:id/turns`: resolves once the turn is durably queued.
    pub async fn submit_turn(
        &self,
        id: &SessionId,
        request: &SubmitTurnRequest,
    ) -> Result<SubmitTurnResponse> {
        self.post(&format!("/v3/sessions/{id}/turns"), request)
            .await
    }

    /// `GET /v3/sessions/:id/events?afterSeq=`: stored envelopes, ascending, and the
    /// session's highest stored seq.
    pub async fn events(&self, id: &SessionId, after_seq: u64) -> Result<EventsResponse> {
        self.get(&format!("/v3/sessions/{id}/events?afterSeq={after_seq}"))
            .await
    }

    /// `POST /v3/sessions/:id/cancel`.
    pub async fn cancel(&self, id: &SessionId, request: &CancelRequest) -> Result<CancelResponse> {
        self.post(&format!("/v3/sessions/{id}/cancel"), request)
            .await
    }

    /// `POST /v3/sessions/:id/permissions/:requestId`.
    pub async fn resolve_permission(
        &self,
        id: &SessionId,
        request: &ResolvePermissionRequest,
    ) -> Result<ResolvePermissionResponse> {
        let path = format!("/v3/sessions/{id}/permissions/{}", request.request_id);
        self.post(&path, request).await
    }

    /// `DELETE /v3/sessions/:id/grants`: revokes `grant`, or every grant; the grants left.
    pub async fn revoke_grants(&self, id: &SessionId, grant: Option<&str>) -> Result<Vec<String>> {
        let query = grant
            .map(|g| {
                format!(
                    "?grant={}",
                    opta_protocol::path_escape(g).replace('/', "%2F")
                )
            })
            .unwrap_or_default();
        let answer: opta_protocol::GrantsResponse = self
            .send(
                Method::DELETE,
                &format!("/v3/sessions/{id}/grants{query}"),
                None::<&Value>,
            )
            .await?;
        Ok(answer.grants)
    }

    /// `GET /v3/background`: processes of `session`, or all.
    pub async fn background_list(
        &self,
        session: Option<&SessionId>,
    ) -> Result<Vec<opta_protocol::BackgroundProcess>> {
        let query = session
            .map(|s| format!("?sessionId={s}"))
            .unwrap_or_default();
        let answer: opta_protocol::BackgroundListResponse =
            self.get(&format!("/v3/background{query}")).await?;
        Ok(answer.processes)
    }

    /// `POST /v3/background/start`.
    pub async fn background_start(
        &self,
        request: &opta_protocol::StartBackgroundRequest,
    ) -> Result<opta_protocol::BackgroundProcess> {
        let answer: opta_protocol::BackgroundProcessResponse =
            self.post("/v3/background/start", request).await?;
        Ok(answer.process)
    }

    /// `GET /v3/background/:pid/status`.
    pub async fn background_status(
        &self,
        process_id: &str,
    ) -> Result<opta_protocol::BackgroundProcess> {
        let path = format!(
            "/v3/background/{}/status",
            opta_protocol::path_escape(process_id).replace('/', "%2F")
        );
        let answer: opta_protocol::BackgroundProcessResponse = self.get(&path).await?;
        Ok(answer.process)
    }

    /// `GET /v3/background/:pid/output` after `after_seq` (up to `limit` chunks).
    pub async fn background_output(
        &self,
        process_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<opta_protocol::BackgroundOutputResponse> {
        let path = format!(
            "/v3/background/{}/output?afterSeq={after_seq}&limit={limit}",
            opta_protocol::path_escape(process_id).replace('/', "%2F")
        );
        self.get(&path).await
    }

    /// `POST /v3/background/:pid/kill`.
    pub async fn background_kill(
        &self,
        process_id: &str,
        signal: Option<opta_protocol::KillSignal>,
    ) -> Result<opta_protocol::KillBackgroundResponse> {
        let path = format!(
            "/v3/background/{}/kill",
            opta_protocol::path_escape(process_id).replace('/', "%2F")
        );
        self.post(&path, &opta_protocol::KillBackgroundRequest { signal })
            .await
    }

    /// `POST /v3/web/code`: a one-time sign-in link for the web page (works once, for a
    /// minute; the link carries the code, never the token).
    pub async fn web_sign_in_code(&self) -> Result<opta_protocol::WebCodeResponse> {
        self.post("/v3/web/code", &serde_json::json!({})).await
    }

    /// `POST /v3/web/exchange`: the token for a one-time code (what the web page does).
    pub async fn web_exchange(&self, code: &str) -> Result<opta_protocol::WebExchangeResponse> {
        self.post(
            "/v3/web/exchange",
            &opta_protocol::WebExchangeRequest { code: code.into() },
        )
        .await
    }

    /// `GET /v3/lmx/status`.
    pub async fn lmx_status(&self) -> Result<LmxStatusResponse> {
        self.get("/v3/lmx/status").await
    }

    /// `GET /v3/lmx/models`.
    pub async fn lmx_models(&self) -> Result<LmxModelsResponse> {
        self.get("/v3/lmx/models").await
    }

    /// `GET /v3/lmx/memory` (LMX only).
    pub async fn lmx_memory(&self) -> Result<Value> {
        self.get("/v3/lmx/memory").await
    }

    /// `GET /v3/lmx/models/available` (LMX only).
    pub async fn lmx_available(&self) -> Result<Value> {
        self.get("/v3/lmx/models/available").await
    }

    /// `GET /v3/lmx/discovery` (LMX only): the server's discovery document.
    pub async fn lmx_discovery(&self) -> Result<Value> {
        self.get("/v3/lmx/discovery").await
    }

    /// `POST /v3/lmx/models/load` (LMX only). The answer's `status` is `loaded`,
    /// `download_required` (confirm with [`Self::lmx_confirm_load`]) or `downloading` (follow
    /// it with [`Self::lmx_download_progress`]).
    pub async fn lmx_load(&self, request: &LmxLoadRequest) -> Result<LmxLoadResponse> {
        self.post("/v3/lmx/models/load", request).await
    }

    /// `POST /v3/lmx/models/load/confirm` (LMX only): goes ahead with the download a load
    /// asked about.
    pub async fn lmx_confirm_load(&self, confirmation_token: &str) -> Result<LmxLoadResponse> {
        let request = LmxConfirmRequest {
            confirmation_token: confirmation_token.to_owned(),
        };
        self.post("/v3/lmx/models/load/confirm", &request).await
    }

    /// `POST /v3/lmx/models/unload` (LMX only).
    pub async fn lmx_unload(&self, model_id: &str) -> Result<LmxUnloadResponse> {
        let request = LmxUnloadRequest {
            model_id: model_id.to_owned(),
        };
        self.post("/v3/lmx/models/unload", &request).await
    }

    /// `DELETE /v3/lmx/models/:modelId` (LMX only): removes the model from the server's disk.
    pub async fn lmx_delete_model(&self, model_id: &str) -> Result<LmxUnloadResponse> {
        let path = format!("/v3/lmx/models/{}", path_escape(model_id));
        self.send(Method::DELETE, &path, None::<&Value>).await
    }

    /// `POST /v3/lmx/models/download` (LMX only).
    pub async fn lmx_download(&self, request: &LmxDownloadRequest) -> Result<LmxDownload> {
        self.post("/v3/lmx/models/download", request).await
    }

    /// `GET /v3/lmx/models/downloads` (LMX only); finished ones too with `include_inactive`.
    pub async fn lmx_downloads(&self, include_inactive: bool) -> Result<LmxDownloadsResponse> {
        self.get(&format!(
            "/v3/lmx/models/downloads?includeInactive={include_inactive}"
        ))
        .await
    }

    /// `GET /v3/lmx/models/download/:downloadId/progress` (LMX only).
    pub async fn lmx_download_progress(&self, download_id: &str) -> Result<LmxDownload> {
        let id = path_escape(download_id).replace('/', "%2F");
        self.get(&format!("/v3/lmx/models/download/{id}/progress"))
            .await
    }
}
