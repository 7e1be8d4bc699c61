//! A scripted OpenAI-compatible inference server for deterministic tests and benchmarks.
//!
//! Replies are taken from a queue (see [`Reply`]); when the queue is empty the server echoes
//! the last user message word by word. It counts requests and notices streams the client
//! dropped before they finished.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use futures_util::stream;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The messages of a chat request after the daemon's system prompt (which it always sends
/// first).
pub fn conversation(request: &Value) -> Value {
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        messages.first().map(|m| m["role"].clone()),
        Some(json!("system")),
        "the request starts with the system prompt"
    );
    Value::Array(messages.into_iter().skip(1).collect())
}

/// What the server does with one chat request.
#[derive(Debug, Clone, PartialEq)]
pub enum Behaviour {
    /// Stream every chunk, then usage and `[DONE]`.
    Complete,
    /// Send the response headers, then no content ever: only SSE comments (which carry no
    /// event) every 50 ms, so the server notices at once when the client goes away.
    Hang,
    /// Accept the request and never send even the headers.
    Silent,
    /// Stream this many chunks, then break the connection.
    CutAfter(usize),
    /// Answer with this HTTP status and an OpenAI-style error message.
    Status(u16, String),
    /// Answer 200 with this content type and these body pieces, each after its pause, as
    /// given: for servers that send what the scripted ones do not (a BOM, `null` fields,
    /// comments, a whole JSON body, an error object).
    Raw {
        /// The `Content-Type` header.
        content_type: String,
        /// Body pieces and the pause before each.
        pieces: Vec<(Duration, Bytes)>,
    },
}

/// One scripted reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Reasoning deltas sent before the content.
    pub reasoning: Vec<String>,
    /// Content deltas.
    pub chunks: Vec<String>,
    /// Pause before each chunk.
    pub chunk_delay: Duration,
    /// Pause before the response headers.
    pub first_byte_delay: Duration,
    /// `(prompt, completion)` usage; `None` sends no usage chunk.
    pub usage: Option<(u64, u64)>,
    /// How the reply ends.
    pub behaviour: Behaviour,
    /// Tool calls `(name, arguments text)`, streamed after the content in fragments.
    pub tool_calls: Vec<(String, String)>,
    /// The finish reason (default `tool_calls` when there are calls, else `stop`).
    pub finish_reason: Option<String>,
    /// The id every call gets (default `call_<index>`): a server that repeats ids.
    pub call_id: Option<String>,
}

impl Reply {
    /// A complete reply streaming `chunks` without delay.
    pub fn chunks<S: Into<String>>(chunks: impl IntoIterator<Item = S>) -> Self {
        let chunks: Vec<String> = chunks.into_iter().map(Into::into).collect();
        let completion = chunks.len() as u64;
        Self {
            reasoning: Vec::new(),
            chunks,
            chunk_delay: Duration::ZERO,
            first_byte_delay: Duration::ZERO,
            usage: Some((10, completion)),
            behaviour: Behaviour::Complete,
            tool_calls: Vec::new(),
            finish_reason: None,
            call_id: None,
        }
    }

    /// A reply that only calls `name` with `arguments` (OpenAI `tool_calls`, streamed in
    /// fragments).
    pub fn tool_call(name: &str, arguments: Value) -> Self {
        Self::tool_call_raw(name, &arguments.to_string())
    }

    /// A call whose arguments text is sent exactly as given (malformed JSON included).
    pub fn tool_call_raw(name: &str, arguments: &str) -> Self {
        Self {
            tool_calls: vec![(name.to_owned(), arguments.to_owned())],
            ..Self::chunks(Vec::<String>::new())
        }
    }

    /// With another tool call after the ones it has.
    pub fn and_call(mut self, name: &str, arguments: Value) -> Self {
        self.tool_calls
            .push((name.to_owned(), arguments.to_string()));
        self
    }

    /// Every call with this id.
    pub fn with_call_id(mut self, id: &str) -> Self {
        self.call_id = Some(id.to_owned());
        self
    }

    /// With this finish reason (`length` for a reply cut by the context limit).
    pub fn with_finish(mut self, reason: &str) -> Self {
        self.finish_reason = Some(reason.to_owned());
        self
    }

    /// `count` chunks `"w0 "`, `"w1 "`, ... with `delay` before each: a long, slow reply.
    pub fn slow(count: usize, delay: Duration) -> Self {
        Self {
            chunk_delay: delay,
            ..Self::chunks((0..count).map(|i| format!("w{i} ")))
        }
    }

    /// A reply whose content never comes (the stream stays open).
    pub fn hang() -> Self {
        Self {
            behaviour: Behaviour::Hang,
            ..Self::chunks(Vec::<String>::new())
        }
    }

    /// No answer at all, not even headers.
    pub fn silent() -> Self {
        Self {
            behaviour: Behaviour::Silent,
            ..Self::chunks(Vec::<String>::new())
        }
    }

    /// An HTTP error.
    pub fn status(code: u16, message: &str) -> Self {
        Self {
            behaviour: Behaviour::Status(code, message.to_owned()),
            ..Self::chunks(Vec::<String>::new())
        }
    }

    /// A 200 answer of `content_type` made of `pieces`, sent as they are.
    pub fn raw<B: Into<Bytes>>(
        content_type: &str,
        pieces: impl IntoIterator<Item = (Duration, B)>,
    ) -> Self {
        Self {
            behaviour: Behaviour::Raw {
                content_type: content_type.to_owned(),
                pieces: pieces.into_iter().map(|(d, b)| (d, b.into())).collect(),
            },
            ..Self::chunks(Vec::<String>::new())
        }
    }

    /// An event stream of `pieces`, sent at once.
    pub fn sse<B: Into<Bytes>>(pieces: impl IntoIterator<Item = B>) -> Self {
        Self::raw(
            "text/event-stream",
            pieces.into_iter().map(|b| (Duration::ZERO, b)),
        )
    }

    /// With `delay` before every chunk.
    pub fn with_chunk_delay(mut self, delay: Duration) -> Self {
        self.chunk_delay = delay;
        self
    }

    /// With reasoning deltas before the content.
    pub fn with_reasoning<S: Into<String>>(mut self, parts: impl IntoIterator<Item = S>) -> Self {
        self.reasoning = parts.into_iter().map(Into::into).collect();
        self
    }

    /// Cut after `n` content chunks.
    pub fn cut_after(mut self, n: usize) -> Self {
        self.behaviour = Behaviour::CutAfter(n);
        self
    }

    /// The echo reply for a user message: `"echo:"` then one chunk per word.
    pub fn echo(content: &str) -> Self {
        let mut chunks = vec!["echo:".to_owned()];
        chunks.extend(content.split_whitespace().map(|w| format!(" {w}")));
        Self::chunks(chunks)
    }

    /// The full text the reply streams.
    pub fn text(&self) -> String {
        self.chunks.concat()
    }
}

mod admin;

#[derive(Default)]
struct Shared {
    replies: Mutex<VecDeque<Reply>>,
    default_chunk_delay: Mutex<Duration>,
    models: Mutex<Vec<String>>,
    /// LMX's admin API beyond the loaded models.
    admin_state: Mutex<admin::AdminState>,
    /// Serve LMX's `/admin/*` API (404 there when false, like llama.cpp or Ollama).
    admin: std::sync::atomic::AtomicBool,
    /// Model lists (`/admin/models`, `/v1/models`) are accepted and never answered.
    models_hang: std::sync::atomic::AtomicBool,
    /// Pause before answering a model list.
    models_delay: Mutex<Duration>,
    /// Chat requests carrying `tools` get a 400, as Ollama answers for models without tool
    /// support.
    rejects_tools: std::sync::atomic::AtomicBool,
    /// The most recent chat request bodies (at most [`KEPT_REQUESTS`]).
    requests: Mutex<std::collections::VecDeque<Value>>,
    chat_requests: AtomicUsize,
    model_list_requests: AtomicUsize,
    streams_dropped: AtomicUsize,
    streams_finished: AtomicUsize,
    dropped: Notify,
    chat_seen: Notify,
    /// A reply was pushed.
    pushed: Notify,
    /// Requests that find no reply wait for one (see `set_waits_for_replies`).
    waits_for_replies: std::sync::atomic::AtomicBool,
}

/// A running scripted server; stops when dropped.
pub struct ScriptedLmx {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for ScriptedLmx {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl ScriptedLmx {
    /// Starts on an ephemeral loopback port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(0).await
    }

    /// Starts on `port` (0 for any) on loopback.
    pub async fn start_on(port: u16) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        shared
            .models
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push("default".into());
        lock(&shared.admin_state)
            .on_disk
            .extend(["default".to_owned(), "other-model".to_owned()]);
        shared.admin.store(true, Ordering::SeqCst);
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/models", get(models))
            .merge(admin::routes())
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        // A zero-latency server: chunks leave at once rather than wait for an ACK (Nagle).
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await;
        });
        Ok(Self {
            addr,
            shared,
            stop,
            server: Some(server),
        })
    }

    /// Stops the server and waits until its port is closed.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues a reply for the next chat request.
    pub fn push(&self, reply: Reply) {
        lock(&self.shared.replies).push_back(reply);
        self.shared.pushed.notify_waiters();
    }

    /// With `true`, a chat request that finds no queued reply waits for the next [`push`]
    /// instead of echoing (for replies that depend on what the daemon did meanwhile).
    ///
    /// [`push`]: Self::push
    pub fn set_waits_for_replies(&self, waits: bool) {
        self.shared.waits_for_replies.store(waits, Ordering::SeqCst);
    }

    /// Delay before each chunk of echo replies.
    pub fn set_echo_delay(&self, delay: Duration) {
        *lock(&self.shared.default_chunk_delay) = delay;
    }

    /// Replaces the loaded models.
    pub fn set_loaded(&self, models: &[&str]) {
        *lock(&self.shared.models) = models.iter().map(|m| (*m).to_owned()).collect();
    }

    /// Models the admin API can load only after downloading them.
    pub fn set_downloadable(&self, models: &[&str]) {
        lock(&self.shared.admin_state).downloadable =
            models.iter().map(|m| (*m).to_owned()).collect();
    }

    /// Every admin request received, oldest first: `(method, path with query, JSON body)`.
    pub fn admin_requests(&self) -> Vec<(String, String, Value)> {
        lock(&self.shared.admin_state).log.clone()
    }

    /// Whether LMX's `/admin/*` API is served (default true).
    pub fn set_admin_api(&self, enabled: bool) {
        self.shared.admin.store(enabled, Ordering::SeqCst);
    }

    /// Whether model lists are accepted and never answered (default false).
    pub fn set_model_list_hangs(&self, hangs: bool) {
        self.shared.models_hang.store(hangs, Ordering::SeqCst);
    }

    /// Whether chat requests with `tools` are refused with a 400 (default false).
    pub fn set_rejects_tools(&self, rejects: bool) {
        self.shared.rejects_tools.store(rejects, Ordering::SeqCst);
    }

    /// Pause before answering each model list.
    pub fn set_model_list_delay(&self, delay: Duration) {
        *lock(&self.shared.models_delay) = delay;
    }

    /// Chat requests received.
    pub fn chat_requests(&self) -> usize {
        self.shared.chat_requests.load(Ordering::SeqCst)
    }

    /// Model list requests received (`/admin/models` and `/v1/models` alike).
    pub fn model_list_requests(&self) -> usize {
        self.shared.model_list_requests.load(Ordering::SeqCst)
    }

    /// Streams the client dropped before they finished.
    pub fn streams_dropped(&self) -> usize {
        self.shared.streams_dropped.load(Ordering::SeqCst)
    }

    /// Streams sent to the end.
    pub fn streams_finished(&self) -> usize {
        self.shared.streams_finished.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` chat requests arrived; panics after 20 s.
    pub async fn wait_chat_requests(&self, n: usize) {
        let seen = &self.shared.chat_requests;
        wait_for_count(&self.shared.chat_seen, seen, n, "chat requests arrived").await;
    }

    /// Waits until at least `n` streams were dropped by the client; panics after 20 s.
    pub async fn wait_streams_dropped(&self, n: usize) {
        let dropped = &self.shared.streams_dropped;
        let what = "inference streams were dropped by the client";
        wait_for_count(&self.shared.dropped, dropped, n, what).await;
    }

    /// The messages of the last chat request after the daemon's system prompt.
    pub fn last_conversation(&self) -> Value {
        self.requests()
            .last()
            .map(conversation)
            .unwrap_or(Value::Null)
    }

    /// Bodies of the most recent chat requests (up to 256), oldest first.
    pub fn requests(&self) -> Vec<Value> {
        lock(&self.shared.requests).iter().cloned().collect()
    }
}

/// Waits until `counter` reaches `n`, woken by `notify`; panics after [`crate::WAIT`].
async fn wait_for_count(notify: &Notify, counter: &AtomicUsize, n: usize, what: &str) {
    let wait = async {
        loop {
            // Created before the check, so a notification in between is not lost.
            let notified = notify.notified();
            if counter.load(Ordering::SeqCst) >= n {
                return;
            }
            notified.await;
        }
    };
    if tokio::time::timeout(crate::WAIT, wait).await.is_err() {
        panic!("only {} of {n} {what}", counter.load(Ordering::SeqCst));
    }
}

/// How many chat request bodies [`ScriptedLmx::requests`] keeps.
const KEPT_REQUESTS: usize = 256;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts a model-list request; never returns while lists hang.
async fn model_list_request(shared: &Shared) {
    shared.model_list_requests.fetch_add(1, Ordering::SeqCst);
    if shared.models_hang.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let delay = *lock(&shared.models_delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

async fn models(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    model_list_request(&shared).await;
    let data: Vec<Value> = lock(&shared.models)
        .iter()
        .map(|id| json!({"id": id, "object": "model"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data}))
}

/// Counts the stream as dropped unless it reached its end.
struct StreamGuard {
    shared: Arc<Shared>,
    finished: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.finished {
            self.shared.streams_finished.fetch_add(1, Ordering::SeqCst);
        } else {
            self.shared.streams_dropped.fetch_add(1, Ordering::SeqCst);
            self.shared.dropped.notify_waiters();
        }
    }
}

fn chunk_json(model: &str, delta: Value, finish: Option<&str>) -> Bytes {
    let chunk = json!({
        "id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 0, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
    });
    Bytes::from(format!("data: {chunk}\n\n"))
}

async fn chat(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    shared.chat_requests.fetch_add(1, Ordering::SeqCst);
    shared.chat_seen.notify_waiters();
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = request["model"].as_str().unwrap_or("default").to_owned();
    if shared.rejects_tools.load(Ordering::SeqCst) && request.get("tools").is_some() {
        let message = format!("registry.ollama.ai/library/{model} does not support tools");
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": {"message": message}})),
        )
            .into_response();
    }
    while shared.waits_for_replies.load(Ordering::SeqCst) && lock(&shared.replies).is_empty() {
        let pushed = shared.pushed.notified();
        if !lock(&shared.replies).is_empty() {
            break;
        }
        pushed.await;
    }
    let reply = lock(&shared.replies).pop_front().unwrap_or_else(|| {
        let last_user = request["messages"]
            .as_array()
            .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str())
            .unwrap_or("")
            .to_owned();
        Reply::echo(&last_user).with_chunk_delay(*lock(&shared.default_chunk_delay))
    });
    {
        // Bounded, so a benchmark's thousands of turns do not pile up their histories here.
        let mut kept = lock(&shared.requests);
        if kept.len() == KEPT_REQUESTS {
            kept.pop_front();
        }
        kept.push_back(request);
    }
    if !reply.first_byte_delay.is_zero() {
        tokio::time::sleep(reply.first_byte_delay).await;
    }
    match &reply.behaviour {
        Behaviour::Status(code, message) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (status, axum::Json(json!({"error": {"message": message}}))).into_response();
        }
        // No stream is ever started, so none is counted as dropped.
        Behaviour::Silent => std::future::pending::<()>().await,
        Behaviour::Hang => {
            let guard = StreamGuard {
                shared,
                finished: false,
            };
            let body = stream::unfold(guard, |guard| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((
                    Ok::<_, std::io::Error>(Bytes::from_static(b": still thinking\n\n")),
                    guard,
                ))
            });
            return Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(Body::from_stream(body))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
        }
        Behaviour::Raw {
            content_type,
            pieces,
        } => {
            let guard = StreamGuard {
                shared,
                finished: false,
            };
            let body = stream::unfold(
                (pieces.clone().into_iter(), guard),
                |(mut pieces, mut guard)| async move {
                    let Some((delay, piece)) = pieces.next() else {
                        guard.finished = true;
                        drop(guard);
                        return None;
                    };
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Some((Ok::<_, std::io::Error>(piece), (pieces, guard)))
                },
            );
            return Response::builder()
                .header(header::CONTENT_TYPE, content_type.as_str())
                .body(Body::from_stream(body))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
        }
        Behaviour::Complete | Behaviour::CutAfter(_) => {}
    }
    let mut frames: Vec<(Duration, Result<Bytes, std::io::Error>)> = Vec::new();
    for part in &reply.reasoning {
        frames.push((
            reply.chunk_delay,
            Ok(chunk_json(&model, json!({"reasoning_content": part}), None)),
        ));
    }
    for (i, part) in reply.chunks.iter().enumerate() {
        if reply.behaviour == Behaviour::CutAfter(i) {
            break;
        }
        frames.push((
            reply.chunk_delay,
            Ok(chunk_json(&model, json!({"content": part}), None)),
        ));
    }
    match reply.behaviour {
        // The pause lets the chunks before the cut reach the client: a broken body aborts the
        // connection and would discard anything still in the server's write buffer.
        Behaviour::CutAfter(_) => frames.push((
            Duration::from_millis(50),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "scripted cut",
            )),
        )),
        _ => {
            for (index, (name, arguments)) in reply.tool_calls.iter().enumerate() {
                let id = reply
                    .call_id
                    .clone()
                    .unwrap_or_else(|| format!("call_{index}"));
                let call = json!({"tool_calls": [{"index": index, "id": id,
                    "type": "function", "function": {"name": name, "arguments": ""}}]});
                frames.push((reply.chunk_delay, Ok(chunk_json(&model, call, None))));
                // The arguments in three fragments, cut on char boundaries.
                let chars: Vec<char> = arguments.chars().collect();
                let third = chars.len().div_ceil(3).max(1);
                for piece in chars.chunks(third) {
                    let piece: String = piece.iter().collect();
                    let fragment = json!({"tool_calls": [{"index": index,
                        "function": {"arguments": piece}}]});
                    frames.push((reply.chunk_delay, Ok(chunk_json(&model, fragment, None))));
                }
            }
            let finish = reply.finish_reason.clone().unwrap_or_else(|| {
                if reply.tool_calls.is_empty() {
                    "stop"
                } else {
                    "tool_calls"
                }
                .to_owned()
            });
            frames.push((
                Duration::ZERO,
                Ok(chunk_json(&model, json!({}), Some(&finish))),
            ));
            if let Some((prompt, completion)) = reply.usage {
                let usage = json!({"id": "chatcmpl-scripted", "object": "chat.completion.chunk",
                    "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                    "total_tokens": prompt + completion}});
                frames.push((
                    Duration::ZERO,
                    Ok(Bytes::from(format!("data: {usage}\n\n"))),
                ));
            }
            frames.push((Duration::ZERO, Ok(Bytes::from_static(b"data: [DONE]\n\n"))));
        }
    }
    let guard = StreamGuard {
        shared,
        finished: false,
    };
    let body = stream::unfold(
        (frames.into_iter(), guard),
        |(mut frames, mut guard)| async move {
            match frames.next() {
                Some((delay, frame)) => {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Some((frame, (frames, guard)))
                }
                None => {
                    guard.finished = true;
                    drop(guard);
                    None
                }
            }
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
