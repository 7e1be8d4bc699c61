//! Minimal WebSocket and SSE clients for tests: every wait is bounded by [`WAIT`].

use eventsource_stream::Eventsource;
use futures_util::{SinkExt, Stream, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::daemon::WAIT;

/// What arrived on a WebSocket.
#[derive(Debug, Clone, PartialEq)]
pub enum WsItem {
    /// A JSON text frame (envelope, ack or error frame).
    Json(Value),
    /// The server closed with this code and reason.
    Closed(u16, String),
}

/// A WebSocket connection to the daemon.
pub struct WsClient {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    /// Connects to `url` (with query parameters already in it).
    pub async fn connect(url: &str) -> Self {
        let (stream, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::connect_async_with_config(url, None, true),
        )
        .await
        .expect("ws connect in time")
        .expect("ws connect");
        Self { stream }
    }

    /// Sends a JSON text frame.
    pub async fn send(&mut self, value: Value) {
        self.stream
            .send(Message::Text(value.to_string().into()))
            .await
            .expect("ws send");
    }

    /// Next JSON frame or close; `None` when the stream ended without a close frame.
    pub async fn next(&mut self) -> Option<WsItem> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("ws frame in time");
            match msg {
                None | Some(Err(_)) => return None,
                Some(Ok(Message::Text(t))) => {
                    return Some(WsItem::Json(
                        serde_json::from_str(t.as_str()).expect("ws JSON frame"),
                    ));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Some(match frame {
                        Some(f) => WsItem::Closed(f.code.into(), f.reason.to_string()),
                        None => WsItem::Closed(1005, String::new()),
                    });
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Next JSON frame; panics on close.
    pub async fn next_json(&mut self) -> Value {
        match self.next().await {
            Some(WsItem::Json(v)) => v,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// Envelopes (frames with a `seq`) until one satisfies `stop`, which is included.
    /// Non-envelope frames (acks, errors) are skipped.
    pub async fn envelopes_until(&mut self, stop: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let v = self.next_json().await;
            if v.get("seq").is_none() {
                continue;
            }
            let done = stop(&v);
            out.push(v);
            if done {
                return out;
            }
        }
    }

    /// Reads frames (dropping them) until a ping arrives; panics after [`WAIT`].
    pub async fn wait_for_ping(&mut self) {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.stream.next().await {
                    Some(Ok(Message::Ping(_))) => return,
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => panic!("ws ended before a ping"),
                }
            }
        })
        .await
        .expect("a ping in time");
    }

    /// Closes the connection from the client side.
    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }

    /// Sends a close frame with `code` and returns the code of the close frame the server
    /// answers with; `None` when the connection ended without one (seen as 1006).
    pub async fn close_handshake(mut self, code: u16) -> Option<u16> {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        let frame = CloseFrame {
            code: code.into(),
            reason: "bye".into(),
        };
        self.stream.send(Message::Close(Some(frame))).await.ok()?;
        tokio::time::timeout(WAIT, async {
            loop {
                match self.stream.next().await {
                    Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => return None,
                }
            }
        })
        .await
        .expect("the close handshake ends in time")
    }
}

/// One SSE message as the test sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SseMessage {
    /// The `id:` line.
    pub id: String,
    /// The parsed `data:` line.
    pub data: Value,
}

type BoxedSse = std::pin::Pin<Box<dyn Stream<Item = Option<SseMessage>> + Send>>;

/// An SSE connection to the daemon.
pub struct SseClient {
    /// The raw first bytes seen, for checking the `: connected` comment.
    pub status: reqwest::StatusCode,
    events: BoxedSse,
}

impl SseClient {
    /// Opens `url` with the token and an optional `Last-Event-ID`.
    pub async fn connect(
        http: &reqwest::Client,
        url: &str,
        token: &str,
        last_event_id: Option<u64>,
    ) -> Self {
        let mut req = http.get(url).bearer_auth(token);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = tokio::time::timeout(WAIT, req.send())
            .await
            .expect("sse connect in time")
            .expect("sse connect");
        let status = resp.status();
        let events = resp.bytes_stream().eventsource().map(|e| match e {
            Ok(ev) => Some(SseMessage {
                id: ev.id,
                data: serde_json::from_str(&ev.data).unwrap_or(Value::Null),
            }),
            Err(_) => None,
        });
        Self {
            status,
            events: Box::pin(events),
        }
    }

    /// Next message; `None` when the stream ended.
    pub async fn next(&mut self) -> Option<SseMessage> {
        tokio::time::timeout(WAIT, self.events.next())
            .await
            .expect("sse event in time")
            .flatten()
    }

    /// Envelopes until one satisfies `stop`, which is included.
    pub async fn envelopes_until(&mut self, stop: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let m = self.next().await.expect("sse stream open");
            assert_eq!(
                m.id,
                m.data["seq"]
                    .as_u64()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                "id line must equal the envelope seq"
            );
            let done = stop(&m.data);
            out.push(m.data);
            if done {
                return out;
            }
        }
    }
}

/// True for the terminal event of `turn_id`.
pub fn is_terminal_of(turn_id: &str) -> impl Fn(&Value) -> bool + '_ {
    move |v| {
        matches!(v["event"].as_str(), Some("turn.done" | "turn.error"))
            && v["payload"]["turnId"] == turn_id
    }
}

/// Asserts that `events` have consecutive seqs starting at `first`.
pub fn assert_contiguous(events: &[Value], first: u64) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e["seq"].as_u64(),
            Some(first + i as u64),
            "seq gap or duplicate at position {i}: {e}"
        );
    }
}

/// The `turn.token` events of `turn_id` in `events`, in order.
pub fn token_events<'a>(events: &'a [Value], turn_id: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["event"] == "turn.token" && e["payload"]["turnId"] == turn_id)
        .collect()
}

/// Concatenated `turn.token` text of `turn_id` in `events`.
pub fn token_text(events: &[Value], turn_id: &str) -> String {
    token_events(events, turn_id)
        .into_iter()
        .filter_map(|e| e["payload"]["text"].as_str())
        .collect()
}
