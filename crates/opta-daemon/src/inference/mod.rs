//! Client for an OpenAI-compatible inference server ("LMX"): streamed chat completions, the
//! model list (LMX's `/admin/models` or `/v1/models`) and LMX's admin API.

pub mod admin;
mod models;
mod preflight;
mod sse;
mod think;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use opta_protocol::{ChatMessage, TurnErrorCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use models::{ModelList, ModelSource, normalise_model, resolve_model};
pub use preflight::PreflightCache;
pub use sse::SseDecoder;
pub use think::ThinkSplitter;

/// Timeouts for talking to the inference server.
#[derive(Debug, Clone, Copy)]
pub struct LmxTimeouts {
    /// TCP connect.
    pub connect: Duration,
    /// From sending a chat request to the response headers, and to the first chunk.
    pub first_byte: Duration,
    /// Between two pieces of a streaming reply (any bytes: keep-alive comments count).
    pub idle: Duration,
    /// From sending a chat request to the reply's first delta, however lively the server
    /// looks meanwhile (a server sending only comments cannot hold a turn forever).
    pub first_token: Duration,
    /// Whole model-list and admin requests.
    pub admin: Duration,
}

impl Default for LmxTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(120),
            idle: Duration::from_secs(60),
            first_token: Duration::from_secs(300),
            admin: Duration::from_secs(10),
        }
    }
}

/// Why a request to the inference server failed; chat failures map to `turn.error` codes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferenceError {
    /// Nothing listens at the server's address. Retrying helps once it is started.
    #[error("The inference server at {url} refused the connection; is it running?")]
    ConnectionRefused {
        /// Base URL.
        url: String,
    },
    /// Connect, first byte or the gap between chunks took too long. Retrying may help.
    #[error("The inference server did not answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The server kept the stream open but produced no token in time. Retrying may help.
    #[error("The inference server sent no token within {} ms", .0.as_millis())]
    FirstTokenTimeout(Duration),
    /// The stream ended before the reply was complete. Retrying may help.
    #[error("The inference stream closed before the reply was complete")]
    StreamClosed,
    /// The server has no model loaded. Load one first.
    #[error(
        "No model is loaded on the inference server at {url}. Load one (for example `opta models load <id>`, or in your server's UI) and try again."
    )]
    NoModelLoaded {
        /// Base URL.
        url: String,
    },
    /// The requested model is not among the loaded ones.
    #[error(
        "Model {model:?} is not loaded on the inference server (loaded: {}). Load it, or switch the session to a loaded model.",
        .loaded.join(", ")
    )]
    ModelNotLoaded {
        /// Requested model.
        model: String,
        /// What is loaded.
        loaded: Vec<String>,
    },
    /// The server answered 404 to a chat request: it does not know the model.
    #[error("The inference server does not know model {model:?}: {message}")]
    ModelNotFound {
        /// Requested model.
        model: String,
        /// Server's message.
        message: String,
    },
    /// Any other HTTP failure, with the server's message.
    #[error("The inference server answered HTTP {status}: {message}")]
    Http {
        /// Status code.
        status: u16,
        /// Server's message.
        message: String,
    },
    /// The server does not offer this (no LMX admin API).
    #[error("The inference server at {url} does not support {what} (it has no LMX admin API)")]
    Unsupported {
        /// Base URL.
        url: String,
        /// The missing capability.
        what: String,
    },
    /// The server reported an error inside a successful answer (an `error` object in the
    /// stream or body), with its message.
    #[error("The inference server reported an error: {0}")]
    Reported(String),
    /// The server's answer was not what the API promises.
    #[error("The inference server sent an unexpected answer: {0}")]
    InvalidResponse(String),
    /// A transport failure that is none of the above.
    #[error("Inference request failed: {0}")]
    Transport(String),
}

impl InferenceError {
    /// The `turn.error` code for this failure, if it has one.
    pub fn code(&self) -> Option<TurnErrorCode> {
        match self {
            InferenceError::ConnectionRefused { .. } => Some(TurnErrorCode::LmxConnectionRefused),
            InferenceError::Timeout(_) | InferenceError::FirstTokenTimeout(_) => {
                Some(TurnErrorCode::LmxTimeout)
            }
            InferenceError::StreamClosed => Some(TurnErrorCode::LmxWsClosed),
            InferenceError::NoModelLoaded { .. }
            | InferenceError::ModelNotLoaded { .. }
            | InferenceError::ModelNotFound { .. } => Some(TurnErrorCode::NoModelLoaded),
            InferenceError::Http { .. }
            | InferenceError::Unsupported { .. }
            | InferenceError::Reported(_)
            | InferenceError::InvalidResponse(_)
            | InferenceError::Transport(_) => None,
        }
    }

    /// Whether this failure makes the cached model list suspect.
    pub fn invalidates_model_cache(&self) -> bool {
        matches!(
            self.code(),
            Some(
                TurnErrorCode::NoModelLoaded
                    | TurnErrorCode::LmxConnectionRefused
                    | TurnErrorCode::LmxWsClosed
                    | TurnErrorCode::LmxTimeout
            )
        )
    }
}

/// A piece of a streamed reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    /// Answer text.
    Content(String),
    /// Reasoning text (`reasoning_content` or a `<think>` span).
    Reasoning(String),
}

/// Token counts reported by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    #[serde(
        default,
        deserialize_with = "opta_protocol::serde_util::null_as_default"
    )]
    pub prompt_tokens: u64,
    /// Completion tokens.
    #[serde(
        default,
        deserialize_with = "opta_protocol::serde_util::null_as_default"
    )]
    pub completion_tokens: u64,
}

/// A tool call assembled from streamed fragments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolCall {
    /// Call id.
    pub id: String,
    /// Function name.
    pub name: String,
    /// JSON arguments text.
    pub arguments: String,
}

/// How a completed stream ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    /// Final usage, if the server sent it.
    pub usage: Option<Usage>,
    /// The finish reason of the first choice.
    pub finish_reason: Option<String>,
    /// Tool calls, in index order.
    pub tool_calls: Vec<ToolCall>,
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: &'a [Arc<ChatMessage>],
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    stream: bool,
    stream_options: StreamOptions,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

// What the server sends. Every field is optional in practice and servers write `null` for
// "absent": each one accepts `null` and absence alike (`Option`, or `null_as_default`).

/// A streamed chunk, or the whole body of a non-streamed answer (`message` in place of
/// `delta`), or an error object.
#[derive(Deserialize)]
struct Chunk {
    #[serde(
        default,
        deserialize_with = "opta_protocol::serde_util::null_as_default"
    )]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(
        default,
        deserialize_with = "opta_protocol::serde_util::null_as_default",
        alias = "message"
    )]
    delta: ChunkDelta,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(
        default,
        deserialize_with = "opta_protocol::serde_util::null_as_default"
    )]
    tool_calls: Vec<ToolCallFragment>,
    /// The deprecated single-call form some servers still send instead of `tool_calls`.
    #[serde(default)]
    function_call: Option<FunctionFragment>,
}

#[derive(Deserialize)]
struct ToolCallFragment {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionFragment>,
}

#[derive(Deserialize)]
struct FunctionFragment {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// Builds a reply from chunks: splits `<think>` spans, assembles tool calls, and remembers
/// usage and the finish reason.
#[derive(Default)]
struct ReplyAssembler {
    think: ThinkSplitter,
    completion: Completion,
    /// A content, reasoning or tool-call delta arrived (the first-token deadline is met).
    has_delta: bool,
}

impl ReplyAssembler {
    /// Applies one chunk; an `error` object in it is the server's failure.
    async fn apply(
        &mut self,
        chunk: Chunk,
        sink: &mut impl AsyncDeltaSink,
    ) -> Result<(), InferenceError> {
        if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
            return Err(InferenceError::Reported(error_message(&error)));
        }
        if let Some(usage) = chunk.usage {
            self.completion.usage = Some(usage);
        }
        for choice in chunk.choices {
            if let Some(text) = choice.delta.reasoning_content.filter(|t| !t.is_empty()) {
                self.has_delta = true;
                sink.send(Delta::Reasoning(text)).await;
            }
            if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                self.has_delta = true;
                let (reasoning, content) = self.think.push(&text);
                send_split(sink, reasoning, content).await;
            }
            let mut fragments = choice.delta.tool_calls;
            if fragments.is_empty()
                && let Some(function) = choice.delta.function_call
            {
                // (Servers that send both repeat the call in each: `tool_calls` is taken.)
                fragments.push(ToolCallFragment {
                    index: Some(0),
                    id: None,
                    function: Some(function),
                });
            }
            for (position, fragment) in fragments.into_iter().enumerate() {
                self.has_delta = true;
                merge_tool_call(&mut self.completion.tool_calls, position, fragment);
            }
            if choice.finish_reason.is_some() {
                self.completion.finish_reason = choice.finish_reason;
            }
        }
        Ok(())
    }

    /// Flushes a `<think>` span left open and returns the completion.
    async fn finish(mut self, sink: &mut impl AsyncDeltaSink) -> Completion {
        let (reasoning, content) = self.think.finish();
        send_split(sink, reasoning, content).await;
        self.completion
    }
}

/// What kind of server this is, learned from its answers.
const FLAVOR_UNKNOWN: u8 = 0;
const FLAVOR_LMX: u8 = 1;
const FLAVOR_OPENAI: u8 = 2;

/// An OpenAI-compatible server at a base URL.
#[derive(Debug, Clone)]
pub struct LmxClient {
    http: reqwest::Client,
    base_url: String,
    timeouts: LmxTimeouts,
    flavor: Arc<AtomicU8>,
    max_tokens: Option<u32>,
}

impl LmxClient {
    /// A client for `base_url` (e.g. `http://127.0.0.1:1234`).
    pub fn new(base_url: &str, timeouts: LmxTimeouts) -> Result<Self, InferenceError> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| InferenceError::Transport(e.to_string()))?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            timeouts,
            flavor: Arc::new(AtomicU8::new(FLAVOR_UNKNOWN)),
            max_tokens: None,
        })
    }

    /// Sends `max_tokens` with every chat request (`None`: the server decides).
    #[must_use]
    pub fn with_max_tokens(mut self, max_tokens: Option<u32>) -> Self {
        self.max_tokens = max_tokens;
        self
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// True once the server answered LMX's `/admin/models`.
    pub fn has_admin_api(&self) -> bool {
        self.flavor.load(Ordering::Relaxed) == FLAVOR_LMX
    }

    /// Lists the loaded models: `GET /admin/models` on LMX, else `GET /v1/models`. Which one
    /// works is remembered until the server refuses a connection, so later lists cost one
    /// request.
    pub async fn list_models(&self) -> Result<ModelList, InferenceError> {
        if self.flavor.load(Ordering::Relaxed) != FLAVOR_OPENAI
            && let Some(body) = self.admin_models().await?
        {
            return ModelList::from_admin(&body);
        }
        let body = self.get_json("/v1/models").await?;
        ModelList::from_v1(&body)
    }

    /// `GET /admin/models`: its answer on LMX, `None` on servers without the admin API;
    /// either way the server's kind is remembered.
    async fn admin_models(&self) -> Result<Option<Value>, InferenceError> {
        match self.get_json("/admin/models").await {
            Ok(body) => {
                self.flavor.store(FLAVOR_LMX, Ordering::Relaxed);
                Ok(Some(body))
            }
            Err(InferenceError::Http { status, .. }) if is_missing_route(status) => {
                self.flavor.store(FLAVOR_OPENAI, Ordering::Relaxed);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// `GET` an LMX admin route; [`InferenceError::Unsupported`] on servers without it.
    pub async fn admin_get(&self, path: &str, what: &str) -> Result<Value, InferenceError> {
        self.admin_send(reqwest::Method::GET, path, None, what)
            .await
    }

    /// `POST` to an LMX admin route; [`InferenceError::Unsupported`] on servers without it.
    pub async fn admin_post(
        &self,
        path: &str,
        body: &Value,
        what: &str,
    ) -> Result<Value, InferenceError> {
        self.admin_send(reqwest::Method::POST, path, Some(body), what)
            .await
    }

    /// `DELETE` an LMX admin resource; [`InferenceError::Unsupported`] on servers without it.
    pub async fn admin_delete(&self, path: &str, what: &str) -> Result<Value, InferenceError> {
        self.admin_send(reqwest::Method::DELETE, path, None, what)
            .await
    }

    /// LMX's discovery document (`/v1/discovery`, or `/.well-known/opta-lmx` on versions
    /// without it); [`InferenceError::Unsupported`] on servers without the admin API.
    pub async fn discovery(&self) -> Result<Value, InferenceError> {
        let what = "discovery";
        self.require_admin(what).await?;
        match self.get_json("/v1/discovery").await {
            Err(InferenceError::Http { status, .. }) if is_missing_route(status) => self
                .get_json("/.well-known/opta-lmx")
                .await
                .map_err(|e| self.unsupported_if_missing(e, what)),
            other => other,
        }
    }

    async fn admin_send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        what: &str,
    ) -> Result<Value, InferenceError> {
        self.require_admin(what).await?;
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base_url));
        if let Some(body) = body {
            request = request.json(body);
        }
        let request = request.send();
        match self.finish_json(request).await {
            // On LMX a 404 here is the server's answer (unknown model); it is a missing route
            // when another kind of server now answers at this URL. Asking again tells which.
            Err(e @ InferenceError::Http { status, .. }) if is_missing_route(status) => {
                self.flavor.store(FLAVOR_UNKNOWN, Ordering::Relaxed);
                self.require_admin(what).await?;
                Err(e)
            }
            other => other,
        }
    }

    async fn require_admin(&self, what: &str) -> Result<(), InferenceError> {
        // Admin calls are rare and made by people: unless the server is known to be LMX, ask
        // it again rather than trust an old answer, so an LMX started in place of another
        // server is found.
        if self.has_admin_api() || self.admin_models().await?.is_some() {
            Ok(())
        } else {
            Err(InferenceError::Unsupported {
                url: self.base_url.clone(),
                what: what.to_owned(),
            })
        }
    }

    fn unsupported_if_missing(&self, e: InferenceError, what: &str) -> InferenceError {
        match e {
            InferenceError::Http { status, .. } if is_missing_route(status) => {
                InferenceError::Unsupported {
                    url: self.base_url.clone(),
                    what: what.to_owned(),
                }
            }
            other => other,
        }
    }

    async fn get_json(&self, path: &str) -> Result<Value, InferenceError> {
        let request = self.http.get(format!("{}{path}", self.base_url)).send();
        self.finish_json(request).await
    }

    async fn finish_json(
        &self,
        request: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
    ) -> Result<Value, InferenceError> {
        let work = async {
            let response = request.await.map_err(|e| self.classify(e))?;
            let status = response.status();
            let text = response.text().await.map_err(|e| self.classify(e))?;
            if !status.is_success() {
                return Err(InferenceError::Http {
                    status: status.as_u16(),
                    message: server_message(&text),
                });
            }
            if text.trim().is_empty() {
                return Ok(Value::Null);
            }
            serde_json::from_str(&text).map_err(|e| InferenceError::InvalidResponse(e.to_string()))
        };
        tokio::time::timeout(self.timeouts.admin, work)
            .await
            .map_err(|_| InferenceError::Timeout(self.timeouts.admin))?
    }

    /// Streams a chat completion offering `tools` (an OpenAI `tools` array), calling
    /// `on_delta` for every text or reasoning delta. Dropping the returned future drops the
    /// HTTP stream.
    pub async fn stream_chat(
        &self,
        model: &str,
        messages: &[Arc<ChatMessage>],
        tools: Option<&Value>,
        mut on_delta: impl AsyncDeltaSink,
    ) -> Result<Completion, InferenceError> {
        let body = ChatRequest {
            model,
            messages,
            tools,
            max_tokens: self.max_tokens,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
        };
        let token_deadline = tokio::time::Instant::now() + self.timeouts.first_token;
        let request = self
            .http
            .post(format!("{}/v1/chat/completions", self.base_url))
            .json(&body)
            .send();
        let response = tokio::time::timeout(self.timeouts.first_byte, request)
            .await
            .map_err(|_| InferenceError::Timeout(self.timeouts.first_byte))?
            .map_err(|e| self.classify(e))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let message = server_message(&text);
            if status == reqwest::StatusCode::NOT_FOUND {
                return Err(InferenceError::ModelNotFound {
                    model: model.to_owned(),
                    message,
                });
            }
            return Err(InferenceError::Http {
                status: status.as_u16(),
                message,
            });
        }
        let is_json = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("application/json"));
        if is_json {
            // A server that ignores `stream: true` answers with the whole completion.
            return self.whole_reply(response, &mut on_delta).await;
        }
        let mut bytes = response.bytes_stream();
        let mut decoder = SseDecoder::default();
        let mut datas = Vec::new();
        let mut reply = ReplyAssembler::default();
        let mut wait = self.timeouts.first_byte;
        let mut done = false;
        while !done {
            // The idle timeout is about bytes (comments count); until the first delta an
            // overall deadline also runs.
            let token_left = token_deadline.saturating_duration_since(tokio::time::Instant::now());
            let limit = if reply.has_delta {
                wait
            } else {
                wait.min(token_left)
            };
            let next = match tokio::time::timeout(limit, bytes.next()).await {
                Ok(next) => next,
                Err(_) if !reply.has_delta && limit == token_left => {
                    return Err(InferenceError::FirstTokenTimeout(self.timeouts.first_token));
                }
                Err(_) => return Err(InferenceError::Timeout(wait)),
            };
            wait = self.timeouts.idle;
            match next {
                None => break,
                Some(Ok(piece)) => decoder.push(&piece, &mut datas),
                Some(Err(e)) => {
                    tracing::debug!(error = %error_chain(&e), "inference stream failed");
                    return Err(InferenceError::StreamClosed);
                }
            }
            for data in datas.drain(..) {
                let data = data.trim();
                if data == "[DONE]" {
                    done = true;
                    break;
                }
                if data.is_empty() {
                    continue;
                }
                match serde_json::from_str::<Chunk>(data) {
                    Ok(chunk) => reply.apply(chunk, &mut on_delta).await?,
                    Err(e) => tracing::warn!(error = %e, "skipping unparseable inference chunk"),
                }
            }
        }
        decoder.finish();
        let completion = reply.finish(&mut on_delta).await;
        // Without [DONE] the reply is complete only if the server said why it finished.
        if done || completion.finish_reason.is_some() {
            Ok(completion)
        } else {
            Err(InferenceError::StreamClosed)
        }
    }

    /// Reads a non-streamed `chat.completion` body as the reply.
    async fn whole_reply(
        &self,
        response: reqwest::Response,
        sink: &mut impl AsyncDeltaSink,
    ) -> Result<Completion, InferenceError> {
        let body = tokio::time::timeout(self.timeouts.first_byte, response.bytes())
            .await
            .map_err(|_| InferenceError::Timeout(self.timeouts.first_byte))?
            .map_err(|e| {
                tracing::debug!(error = %error_chain(&e), "inference body failed");
                InferenceError::StreamClosed
            })?;
        let chunk: Chunk = serde_json::from_slice(&body).map_err(|e| {
            InferenceError::InvalidResponse(format!("a JSON answer that is no completion: {e}"))
        })?;
        let mut reply = ReplyAssembler::default();
        reply.apply(chunk, sink).await?;
        let mut completion = reply.finish(sink).await;
        completion
            .finish_reason
            .get_or_insert_with(|| "stop".to_owned());
        Ok(completion)
    }

    fn classify(&self, e: reqwest::Error) -> InferenceError {
        if e.is_timeout() {
            return InferenceError::Timeout(self.timeouts.connect);
        }
        if is_connection_refused(&e) {
            // Whatever answers at this URL next may be another kind of server.
            self.flavor.store(FLAVOR_UNKNOWN, Ordering::Relaxed);
            return InferenceError::ConnectionRefused {
                url: self.base_url.clone(),
            };
        }
        InferenceError::Transport(error_chain(&e))
    }
}

async fn send_split(sink: &mut impl AsyncDeltaSink, reasoning: String, content: String) {
    if !reasoning.is_empty() {
        sink.send(Delta::Reasoning(reasoning)).await;
    }
    if !content.is_empty() {
        sink.send(Delta::Content(content)).await;
    }
}

/// Adds a fragment to the call at its `index` (a whole call without one, as non-streamed
/// answers send them, takes its position in the list).
fn merge_tool_call(calls: &mut Vec<ToolCall>, position: usize, fragment: ToolCallFragment) {
    let index = fragment.index.unwrap_or(position);
    if calls.len() <= index {
        calls.resize_with(index + 1, ToolCall::default);
    }
    let call = &mut calls[index];
    if let Some(id) = fragment.id {
        call.id = id;
    }
    if let Some(function) = fragment.function {
        // OpenAI sends the name once; llama-cpp-python repeats the whole name in every
        // fragment. A name already complete is not appended again.
        if let Some(name) = function.name
            && name != call.name
        {
            call.name.push_str(&name);
        }
        if let Some(arguments) = function.arguments {
            call.arguments.push_str(&arguments);
        }
    }
}

fn is_missing_route(status: u16) -> bool {
    matches!(status, 404 | 405 | 501)
}

/// Receives deltas as they arrive (an async callback).
pub trait AsyncDeltaSink: Send {
    /// Handles one delta.
    fn send(&mut self, delta: Delta) -> impl std::future::Future<Output = ()> + Send;
}

fn is_connection_refused(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = err.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The message of an OpenAI-style `error` value (`{"message": ..}` or a string).
fn error_message(error: &Value) -> String {
    error
        .get("message")
        .and_then(Value::as_str)
        .or_else(|| error.as_str())
        .map_or_else(|| error.to_string(), str::to_owned)
}

/// Pulls a human message out of an OpenAI-style error body, else returns the text itself.
fn server_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let from_json = parsed.as_ref().and_then(|v| {
        v.get("error")
            .and_then(|e| e.get("message").or(Some(e)))
            .and_then(|m| m.as_str())
            .or_else(|| v.get("message").and_then(|m| m.as_str()))
            .or_else(|| v.get("detail").and_then(|m| m.as_str()))
            .map(str::to_owned)
    });
    from_json.unwrap_or_else(|| body.chars().take(500).collect())
}

#[cfg(test)]
mod tests {
    use proptest::arbitrary::Arbitrary;

    use super::*;

    #[test]
    fn server_message_shapes() {
        assert_eq!(
            server_message(r#"{"error":{"message":"model x not found"}}"#),
            "model x not found"
        );
        assert_eq!(server_message(r#"{"error":"boom"}"#), "boom");
        assert_eq!(server_message(r#"{"detail":"nope"}"#), "nope");
        assert_eq!(server_message("plain text"), "plain text");
    }

    #[test]
    fn tool_call_fragments_assemble_by_index() {
        let mut calls = Vec::new();
        let frag =
            |index, id: Option<&str>, name: Option<&str>, args: Option<&str>| ToolCallFragment {
                index: Some(index),
                id: id.map(str::to_owned),
                function: Some(FunctionFragment {
                    name: name.map(str::to_owned),
                    arguments: args.map(str::to_owned),
                }),
            };
        merge_tool_call(
            &mut calls,
            0,
            frag(1, Some("b"), Some("write"), Some("{\"p")),
        );
        merge_tool_call(&mut calls, 0, frag(0, Some("a"), Some("read"), Some("{}")));
        // A server that repeats the id and the whole name with every fragment.
        merge_tool_call(
            &mut calls,
            0,
            frag(1, Some("b"), Some("write"), Some("\":")),
        );
        merge_tool_call(&mut calls, 0, frag(1, None, None, Some("1}")));
        assert_eq!(
            calls,
            vec![
                ToolCall {
                    id: "a".into(),
                    name: "read".into(),
                    arguments: "{}".into()
                },
                ToolCall {
                    id: "b".into(),
                    name: "write".into(),
                    arguments: "{\"p\":1}".into()
                },
            ]
        );
    }

    /// Collects deltas.
    #[derive(Default)]
    struct VecSink(Vec<Delta>);

    impl AsyncDeltaSink for VecSink {
        async fn send(&mut self, delta: Delta) {
            self.0.push(delta);
        }
    }

    /// Decodes `bytes` cut at `cuts` and assembles the reply as `stream_chat` does.
    fn deltas_of(bytes: &[u8], cuts: &[usize]) -> (Vec<Delta>, bool) {
        let mut decoder = SseDecoder::default();
        let mut datas = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            decoder.push(&bytes[start..cut], &mut datas);
            start = cut;
        }
        decoder.finish();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut sink = VecSink::default();
            let mut reply = ReplyAssembler::default();
            let mut done = false;
            for data in datas {
                if data == "[DONE]" {
                    done = true;
                    break;
                }
                let chunk: Chunk = serde_json::from_str(&data).unwrap();
                reply.apply(chunk, &mut sink).await.unwrap();
            }
            reply.finish(&mut sink).await;
            (sink.0, done)
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

        /// Any valid stream, cut into pieces anywhere (inside UTF-8 characters, `data:`
        /// lines and line ends), yields the same deltas as the whole stream.
        #[test]
        fn any_cut_of_a_valid_stream_yields_the_same_deltas(
            texts in proptest::collection::vec("(?s).{0,10}", 1..10),
            reasoning in proptest::collection::vec("[^<]{0,6}", 0..3),
            line_end in 0..3usize,
            bom: bool,
            comments: bool,
            pretty: bool,
            cuts in proptest::collection::vec(proptest::sample::Index::arbitrary(), 0..24),
        ) {
            let nl = ["\n", "\r\n", "\r"][line_end];
            let mut stream = String::new();
            if bom {
                stream.push('\u{feff}');
            }
            let deltas = reasoning
                .iter()
                .map(|r| serde_json::json!({"reasoning_content": r}))
                .chain(texts.iter().map(|t| serde_json::json!({"content": t, "tool_calls": null})));
            for delta in deltas {
                if comments {
                    stream.push_str(&format!(": keep-alive{nl}"));
                }
                let chunk = serde_json::json!({"choices": [{"index": 0, "delta": delta}]});
                if pretty {
                    // One event over several `data:` lines (joined by `\n`: still JSON).
                    for line in serde_json::to_string_pretty(&chunk).unwrap().lines() {
                        stream.push_str(&format!("data: {line}{nl}"));
                    }
                    stream.push_str(nl);
                } else {
                    stream.push_str(&format!("data: {chunk}{nl}{nl}"));
                }
            }
            stream.push_str(&format!("data: [DONE]{nl}{nl}"));
            let bytes = stream.as_bytes();
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let (whole, whole_done) = deltas_of(bytes, &[]);
            let (cut, cut_done) = deltas_of(bytes, &cuts);
            proptest::prop_assert!(whole_done && cut_done);
            proptest::prop_assert_eq!(&cut, &whole);
            // And they are the stream's own: every reasoning and content text, in order.
            let text = |d: &Delta| match d {
                Delta::Content(t) => ("c", t.clone()),
                Delta::Reasoning(t) => ("r", t.clone()),
            };
            let content: String = whole.iter().map(text).filter(|(k, _)| *k == "c").map(|(_, t)| t).collect();
            let thought: String = whole.iter().map(text).filter(|(k, _)| *k == "r").map(|(_, t)| t).collect();
            if !texts.concat().contains("<think") && !texts.concat().contains("</think") {
                proptest::prop_assert_eq!(content, texts.concat());
                proptest::prop_assert_eq!(thought, reasoning.concat());
            }
        }
    }

    #[test]
    fn cache_invalidating_codes() {
        assert!(InferenceError::StreamClosed.invalidates_model_cache());
        assert!(InferenceError::Timeout(Duration::ZERO).invalidates_model_cache());
        assert!(
            !InferenceError::Http {
                status: 500,
                message: String::new()
            }
            .invalidates_model_cache()
        );
    }
}
