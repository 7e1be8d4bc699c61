//! A daemon on an ephemeral port in a temporary home, with small HTTP helpers.

use std::path::PathBuf;
use std::time::Duration;

use opta_daemon::{DaemonConfig, RunningDaemon};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::clients::{SseClient, WsClient};

/// How long any single wait in a test may take before it fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(20);

/// A daemon started in-process for a test.
pub struct TestDaemon {
    daemon: Option<RunningDaemon>,
    home: tempfile::TempDir,
    lmx_url: String,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The auth token.
    pub token: String,
    /// Client for raw requests.
    pub http: reqwest::Client,
    configure: fn(&mut DaemonConfig),
}

impl TestDaemon {
    /// A scripted inference server and a daemon talking to it.
    pub async fn with_scripted_lmx() -> (crate::ScriptedLmx, Self) {
        let lmx = crate::ScriptedLmx::start()
            .await
            .expect("scripted inference server starts");
        let daemon = Self::start(&lmx.url()).await;
        (lmx, daemon)
    }

    /// `GET path` without the token (public routes, or checking they refuse).
    pub async fn get_anonymous(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request sent")
    }

    /// Starts a daemon talking to the inference server at `lmx_url`.
    pub async fn start(lmx_url: &str) -> Self {
        Self::start_with(lmx_url, |_| {}).await
    }

    /// Starts a daemon, letting `configure` adjust the config first.
    pub async fn start_with(lmx_url: &str, configure: fn(&mut DaemonConfig)) -> Self {
        let home = tempfile::tempdir().expect("temp home");
        Self::start_in(home, lmx_url.to_owned(), configure).await
    }

    async fn start_in(
        home: tempfile::TempDir,
        lmx_url: String,
        configure: fn(&mut DaemonConfig),
    ) -> Self {
        Self::start_on(home, lmx_url, configure, 0).await
    }

    async fn start_on(
        home: tempfile::TempDir,
        lmx_url: String,
        configure: fn(&mut DaemonConfig),
        port: u16,
    ) -> Self {
        let mut config = DaemonConfig::new(home.path());
        config.port = port;
        config.lmx_url = lmx_url.clone();
        config.token = Some("test-token-0123456789abcdef0123456789".into());
        configure(&mut config);
        let token = config.token.clone().unwrap_or_default();
        let daemon = RunningDaemon::start(config).await.expect("daemon starts");
        let base = format!("http://{}", daemon.addr());
        Self {
            daemon: Some(daemon),
            home,
            lmx_url,
            base,
            token,
            http: reqwest::Client::new(),
            configure,
        }
    }

    /// The daemon's home directory.
    pub fn home(&self) -> PathBuf {
        self.home.path().to_owned()
    }

    /// The running daemon.
    pub fn daemon(&self) -> &RunningDaemon {
        self.daemon.as_ref().expect("daemon is running")
    }

    /// Stops the daemon gracefully and starts a new one on the same home.
    pub async fn restart(self) -> Self {
        let configure = self.configure;
        self.restart_with(configure).await
    }

    /// Like [`TestDaemon::restart`], on the same port, so clients reconnect to it.
    pub async fn restart_on_same_port(mut self) -> Self {
        let port = self.daemon().addr().port();
        let home = self.shutdown_keeping_home().await;
        Self::start_on(home, self.lmx_url.clone(), self.configure, port).await
    }

    /// Like [`TestDaemon::restart_on_same_port`], with another configuration for the new
    /// daemon (a rotated token, say).
    pub async fn restart_on_same_port_with(mut self, configure: fn(&mut DaemonConfig)) -> Self {
        let port = self.daemon().addr().port();
        let home = self.shutdown_keeping_home().await;
        Self::start_on(home, self.lmx_url.clone(), configure, port).await
    }

    /// Like [`TestDaemon::restart`], with another configuration for the new daemon.
    pub async fn restart_with(mut self, configure: fn(&mut DaemonConfig)) -> Self {
        let home = self.shutdown_keeping_home().await;
        Self::start_in(home, self.lmx_url.clone(), configure).await
    }

    /// Stops the daemon gracefully and hands over its home (dropping `self` then leaves it).
    async fn shutdown_keeping_home(&mut self) -> tempfile::TempDir {
        if let Some(d) = self.daemon.take() {
            d.shutdown().await.expect("clean shutdown");
        }
        std::mem::replace(&mut self.home, tempfile::tempdir().expect("temp dir"))
    }

    /// Stops the daemon gracefully.
    pub async fn stop(mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown().await.expect("clean shutdown");
        }
    }

    /// Sends a request with the token; returns status and JSON body (`Null` when empty).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(&self.token)
            .timeout(WAIT);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let bytes = resp.bytes().await.expect("body read");
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "non-JSON body for {path}: {e}: {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        (status, value)
    }

    /// GET with the token.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request(Method::GET, path, None).await
    }

    /// POST with the token.
    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.request(Method::POST, path, Some(body)).await
    }

    /// The Prometheus text of `GET /metrics`.
    pub async fn prometheus(&self) -> String {
        let resp = self
            .http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(resp.status(), StatusCode::OK, "GET /metrics");
        resp.text().await.expect("metrics text")
    }

    /// Creates a session (optionally with an id) and returns its id.
    pub async fn create_session(&self, id: Option<&str>) -> String {
        let body = match id {
            Some(id) => json!({"sessionId": id}),
            None => json!({}),
        };
        let (status, snapshot) = self.post("/v3/sessions", body).await;
        assert_eq!(status, StatusCode::CREATED, "create session: {snapshot}");
        snapshot["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_owned()
    }

    /// Creates a session whose workspace is `workspace` and returns its id.
    pub async fn create_session_in(&self, workspace: &std::path::Path) -> String {
        let (status, snapshot) = self
            .post(
                "/v3/sessions",
                json!({"metadata": {"workspace": workspace}}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "create session: {snapshot}");
        snapshot["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_owned()
    }

    /// Submits a chat turn for writer `w1` and returns its turn id.
    pub async fn submit(&self, session: &str, content: &str) -> String {
        self.submit_as(session, "w1", content).await
    }

    /// Submits a chat turn for `writer` and returns its turn id.
    pub async fn submit_as(&self, session: &str, writer: &str, content: &str) -> String {
        let (status, body) = self
            .post(
                &format!("/v3/sessions/{session}/turns"),
                json!({"clientId": "test", "writerId": writer, "content": content, "mode": "chat"}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "submit: {body}");
        body["turnId"].as_str().expect("turnId").to_owned()
    }

    /// Submits `content` and returns the turn id and the session's events from the start up
    /// to that turn's terminal event (the last one).
    pub async fn turn(&self, session: &str, content: &str) -> (String, Vec<Value>) {
        let turn = self.submit(session, content).await;
        let events = self
            .ws(session, 0)
            .await
            .envelopes_until(crate::is_terminal_of(&turn))
            .await;
        (turn, events)
    }

    /// Stored events after `after_seq`.
    pub async fn events(&self, session: &str, after_seq: u64) -> Vec<Value> {
        let (status, body) = self
            .get(&format!(
                "/v3/sessions/{session}/events?afterSeq={after_seq}"
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "events: {body}");
        body["events"].as_array().cloned().unwrap_or_default()
    }

    /// Waits on `ws` for the next permission request and answers it over HTTP with `body`
    /// (its `requestId` filled in); returns the request's payload.
    pub async fn answer_next(&self, ws: &mut WsClient, session: &str, mut body: Value) -> Value {
        let asked = ws
            .envelopes_until(|e| e["event"] == "permission.request")
            .await;
        let request = asked.last().expect("a permission request")["payload"].clone();
        let id = request["requestId"].as_str().unwrap_or_default().to_owned();
        body["requestId"] = json!(id);
        let (status, answer) = self
            .post(&format!("/v3/sessions/{session}/permissions/{id}"), body)
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        request
    }

    /// Opens the WebSocket plane for `session` after `after_seq`.
    pub async fn ws(&self, session: &str, after_seq: u64) -> WsClient {
        let url = format!(
            "{}/v3/ws?sessionId={session}&afterSeq={after_seq}&token={}",
            self.base.replacen("http://", "ws://", 1),
            self.token
        );
        WsClient::connect(&url).await
    }

    /// Opens the SSE plane for `session` after `after_seq`.
    pub async fn sse(&self, session: &str, after_seq: u64) -> SseClient {
        let url = format!(
            "{}/v3/sse/events?sessionId={session}&afterSeq={after_seq}",
            self.base
        );
        SseClient::connect(&self.http, &url, &self.token, None).await
    }
}

/// A workspace directory and, beside it, a directory outside it holding `secret.txt`; both
/// canonical, removed when dropped.
pub struct WorkspaceDirs {
    _base: tempfile::TempDir,
    /// The workspace.
    pub ws: PathBuf,
    /// A directory outside it.
    pub outside: PathBuf,
}

impl WorkspaceDirs {
    /// Makes both directories.
    pub fn new() -> Self {
        let base = tempfile::tempdir().expect("temp dir");
        let root = base.path().canonicalize().expect("canonical temp dir");
        let ws = root.join("ws");
        let outside = root.join("outside");
        std::fs::create_dir_all(&ws).expect("workspace");
        std::fs::create_dir_all(&outside).expect("outside");
        std::fs::write(outside.join("secret.txt"), "top secret\n").expect("secret");
        Self {
            _base: base,
            ws,
            outside,
        }
    }
}

impl Default for WorkspaceDirs {
    fn default() -> Self {
        Self::new()
    }
}
