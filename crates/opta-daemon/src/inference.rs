//! Client for an OpenAI-compatible inference server ("LMX"): streamed chat completions.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use opta_protocol::{ChatMessage, TurnErrorCode};
use serde::{Deserialize, Serialize};

/// Timeouts for talking to the inference server.
#[derive(Debug, Clone, Copy)]
pub struct LmxTimeouts {
    /// TCP connect.
    pub connect: Duration,
    /// From sending the request to the response headers and first chunk.
    pub first_byte: Duration,
    /// Between two chunks of a streaming reply.
    pub idle: Duration,
}

impl Default for LmxTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(120),
            idle: Duration::from_secs(60),
        }
    }
}

/// Why a completion failed; each maps to a `turn.error` code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferenceError {
    /// Nothing listens at the server's address. Retrying helps once it is started.
    #[error("The inference server at {url} refused the connection; is it running?")]
    ConnectionRefused {
        /// Base URL.
        url: String,
    },
    /// Connect, first byte or the gap between chunks took too long.
    #[error("The inference server did not answer within {0:?}")]
    Timeout(Duration),
    /// The stream ended before the reply was complete.
    #[error("The inference stream closed before the reply was complete")]
    StreamClosed,
    /// The server does not have the requested model.
    #[error("Model {model:?} is not loaded on the inference server: {message}")]
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
    /// A transport failure that is none of the above.
    #[error("Inference request failed: {0}")]
    Transport(String),
}

impl InferenceError {
    /// The `turn.error` code for this failure, if it has one.
    pub fn code(&self) -> Option<TurnErrorCode> {
        match self {
            InferenceError::ConnectionRefused { .. } => Some(TurnErrorCode::LmxConnectionRefused),
            InferenceError::Timeout(_) => Some(TurnErrorCode::LmxTimeout),
            InferenceError::StreamClosed => Some(TurnErrorCode::LmxWsClosed),
            InferenceError::ModelNotFound { .. } => Some(TurnErrorCode::NoModelLoaded),
            InferenceError::Http { .. } | InferenceError::Transport(_) => None,
        }
    }
}

/// A piece of a streamed reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    /// Answer text.
    Content(String),
    /// Reasoning text.
    Reasoning(String),
}

/// Token counts reported by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Completion tokens.
    #[serde(default)]
    pub completion_tokens: u64,
}

/// How a completed stream ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    /// Final usage, if the server sent it.
    pub usage: Option<Usage>,
    /// The finish reason of the first choice.
    pub finish_reason: Option<String>,
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    stream: bool,
    stream_options: StreamOptions,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
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
}

/// An OpenAI-compatible server at a base URL.
#[derive(Debug, Clone)]
pub struct LmxClient {
    http: reqwest::Client,
    base_url: String,
    timeouts: LmxTimeouts,
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
        })
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Streams a chat completion, calling `on_delta` for every text or reasoning delta.
    /// Dropping the returned future drops the HTTP stream.
    pub async fn stream_chat(
        &self,
        model: &str,
        messages: &[ChatMessage],
        mut on_delta: impl AsyncDeltaSink,
    ) -> Result<Completion, InferenceError> {
        let body = ChatRequest {
            model,
            messages,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
        };
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
        let mut events = response.bytes_stream().eventsource();
        let mut completion = Completion::default();
        let mut wait = self.timeouts.first_byte;
        loop {
            let next = tokio::time::timeout(wait, events.next())
                .await
                .map_err(|_| InferenceError::Timeout(wait))?;
            wait = self.timeouts.idle;
            let event = match next {
                None => break,
                Some(Ok(event)) => event,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "inference stream failed");
                    return Err(InferenceError::StreamClosed);
                }
            };
            let data = event.data.trim();
            if data == "[DONE]" {
                return Ok(completion);
            }
            if data.is_empty() {
                continue;
            }
            let chunk: Chunk = match serde_json::from_str(data) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping unparseable inference chunk");
                    continue;
                }
            };
            if let Some(usage) = chunk.usage {
                completion.usage = Some(usage);
            }
            for choice in chunk.choices {
                if let Some(text) = choice.delta.reasoning_content.filter(|t| !t.is_empty()) {
                    on_delta.send(Delta::Reasoning(text)).await;
                }
                if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                    on_delta.send(Delta::Content(text)).await;
                }
                if choice.finish_reason.is_some() {
                    completion.finish_reason = choice.finish_reason;
                }
            }
        }
        // No [DONE]: complete only if the server said why it finished.
        if completion.finish_reason.is_some() {
            Ok(completion)
        } else {
            Err(InferenceError::StreamClosed)
        }
    }

    fn classify(&self, e: reqwest::Error) -> InferenceError {
        if e.is_timeout() {
            return InferenceError::Timeout(self.timeouts.connect);
        }
        if e.is_connect() {
            if is_connection_refused(&e) {
                return InferenceError::ConnectionRefused {
                    url: self.base_url.clone(),
                };
            }
            return InferenceError::Transport(error_chain(&e));
        }
        InferenceError::Transport(error_chain(&e))
    }
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

/// Pulls a human message out of an OpenAI-style error body, else returns the text itself.
fn server_message(body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
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
}
