//! Event streams over WebSocket or SSE that reconnect with exponential backoff from the last
//! delivered seq, so callers see each event once and in order.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::{SinkExt, Stream, StreamExt};
use opta_protocol::{Envelope, ErrorBody, Seq, SessionId};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::{ClientError, DaemonClient, Result};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// An `afterSeq` past any real seq: the daemon then sends live events only.
const LIVE: Seq = i64::MAX as Seq;

/// Which event plane to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `GET /v3/ws`.
    WebSocket,
    /// `GET /v3/sse/events`.
    Sse,
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// Every stored event with a greater seq, then live ones.
    After(Seq),
    /// Live events only: those after the session's seq at subscription time (learnt from the
    /// `hello` ack over WebSocket, from the events route's `lastSeq` over SSE).
    Live,
}

/// A subscription's events, in seq order, each once, across reconnects. Ends when the session
/// is deleted; yields an error (then ends) when reconnecting cannot help (bad token, unknown
/// session). Dropping it closes the connection.
pub struct EventStream {
    rx: mpsc::Receiver<Result<Envelope>>,
    task: JoinHandle<()>,
    status: Arc<Status>,
}

/// What the pump shares with the stream's owner.
struct Status {
    reconnects: AtomicUsize,
    /// The seq of the last event delivered (or the start).
    last_seq: AtomicU64,
    /// When the connection was lost, while it is: milliseconds since `epoch`, plus one
    /// (0 = connected).
    down_since: AtomicU64,
    epoch: std::time::Instant,
}

impl Status {
    fn set_down(&self, down: bool) {
        let value = if down {
            self.epoch.elapsed().as_millis() as u64 + 1
        } else {
            0
        };
        if !down || self.down_since.load(Ordering::Relaxed) == 0 {
            self.down_since.store(value, Ordering::Relaxed);
        }
    }
}

impl EventStream {
    /// The next event; `None` once the stream ended.
    pub async fn recv(&mut self) -> Option<Result<Envelope>> {
        self.rx.recv().await
    }

    /// How many times the stream reconnected.
    pub fn reconnects(&self) -> usize {
        self.status.reconnects.load(Ordering::Relaxed)
    }

    /// The seq of the last event delivered (or where the stream started): subscribe after it
    /// to continue elsewhere, say on a daemon that restarted on another port.
    pub fn last_seq(&self) -> Seq {
        self.status.last_seq.load(Ordering::Relaxed)
    }

    /// How long the stream has been trying to reconnect; `None` while it is connected.
    pub fn disconnected_for(&self) -> Option<Duration> {
        match self.status.down_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(
                self.status
                    .epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(since - 1)),
            ),
        }
    }
}

impl Stream for EventStream {
    type Item = Result<Envelope>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
type SseStream = Pin<Box<dyn Stream<Item = Option<String>> + Send>>;

enum Connection {
    Ws(Box<WsStream>),
    Sse(SseStream),
}

/// Why a connection ended.
enum Ended {
    /// The consumer dropped the stream.
    ReceiverGone,
    /// Reconnecting cannot help.
    Fatal(ClientError),
    /// The session was deleted.
    SessionGone,
    /// Try again.
    Retry,
}

struct Connector {
    client: DaemonClient,
    session: SessionId,
    transport: Transport,
}

impl DaemonClient {
    /// Subscribes to a session's events. The first connection is made before this returns, so a
    /// bad token or unknown session fails here and no event emitted afterwards is missed.
    ///
    /// ```no_run
    /// # async fn demo(client: opta_client::DaemonClient, session: opta_protocol::SessionId)
    /// # -> Result<(), opta_client::ClientError> {
    /// use opta_client::{StartAt, Transport};
    /// let mut events = client.subscribe(&session, StartAt::After(0), Transport::WebSocket).await?;
    /// while let Some(envelope) = events.recv().await {
    ///     let envelope = envelope?;
    ///     println!("{} {}", envelope.seq, envelope.event.name());
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn subscribe(
        &self,
        session: &SessionId,
        start: StartAt,
        transport: Transport,
    ) -> Result<EventStream> {
        let connector = Connector {
            client: self.clone(),
            session: session.clone(),
            transport,
        };
        let (tx, rx) = mpsc::channel(1024);
        let (connection, last) = match (start, transport) {
            (StartAt::After(seq), _) => (connector.connect(seq).await?, seq),
            (StartAt::Live, Transport::WebSocket) => {
                let Connection::Ws(mut ws) = connector.connect(LIVE).await? else {
                    return Err(ClientError::Transport("expected a WebSocket".into()));
                };
                let at = within_open_timeout(pin_current_seq(&mut ws, session, &tx)).await?;
                (Connection::Ws(ws), at)
            }
            (StartAt::Live, Transport::Sse) => {
                let at = self.events(session, LIVE).await?.last_seq.unwrap_or(0);
                (connector.connect(at).await?, at)
            }
        };
        let status = Arc::new(Status {
            reconnects: AtomicUsize::new(0),
            last_seq: AtomicU64::new(last),
            down_since: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        });
        let task = tokio::spawn(pump(connector, connection, last, tx, status.clone()));
        Ok(EventStream { rx, task, status })
    }
}

/// Sends `hello` and reads up to its ack; returns the seq the connection is at. Envelopes that
/// arrive first are delivered.
async fn pin_current_seq(
    ws: &mut WsStream,
    session: &SessionId,
    tx: &mpsc::Sender<Result<Envelope>>,
) -> Result<Seq> {
    let hello = json!({"type": "hello", "clientId": "opta-client", "sessionId": session});
    ws.send(Message::Text(hello.to_string().into()))
        .await
        .map_err(crate::error::transport)?;
    let mut delivered: Option<Seq> = None;
    while let Some(msg) = ws.next().await {
        let Message::Text(text) = msg.map_err(crate::error::transport)? else {
            continue;
        };
        let value: Value =
            serde_json::from_str(text.as_str()).map_err(|e| ClientError::Decode(e.to_string()))?;
        if value["type"] == "ack" && value["action"] == "hello" {
            let at = value["lastSeq"].as_u64().unwrap_or(0);
            return Ok(delivered.map_or(at, |d| d.max(at)));
        }
        if let Some(envelope) = as_envelope(&value)? {
            delivered = Some(envelope.seq);
            let _ = tx.send(Ok(envelope)).await;
        }
    }
    Err(ClientError::Transport(
        "connection closed before the hello ack".into(),
    ))
}

fn as_envelope(value: &Value) -> Result<Option<Envelope>> {
    let Some(name) = value.get("event").and_then(Value::as_str) else {
        return Ok(None);
    };
    if value.get("seq").is_none() {
        return Ok(None);
    }
    if !opta_protocol::Event::NAMES.contains(&name) {
        // A newer daemon's event: skipped, not an error.
        tracing::debug!(event = name, "skipping an event this client does not know");
        return Ok(None);
    }
    serde_json::from_value(value.clone())
        .map(Some)
        .map_err(|e| ClientError::Decode(format!("envelope: {e}")))
}

async fn pump(
    mut connector: Connector,
    mut connection: Connection,
    mut last: Seq,
    tx: mpsc::Sender<Result<Envelope>>,
    status: Arc<Status>,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let before = last;
        let ended = match &mut connection {
            Connection::Ws(ws) => read_ws(ws, &mut last, &tx, &status).await,
            Connection::Sse(sse) => read_sse(sse, &mut last, &tx, &status).await,
        };
        match ended {
            Ended::ReceiverGone | Ended::SessionGone => return,
            Ended::Fatal(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Ended::Retry => status.set_down(true),
        }
        if last != before {
            backoff = FIRST_BACKOFF;
        }
        let down_since = tokio::time::Instant::now();
        loop {
            if tx.is_closed() {
                return;
            }
            if let Some(deadline) = connector.client.reconnect_deadline
                && down_since.elapsed() >= deadline
            {
                let _ = tx
                    .send(Err(ClientError::DaemonGone { waited: deadline }))
                    .await;
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            // A daemon that restarted on another port is found through its state file.
            if let Some(moved) = connector.client.rediscover() {
                tracing::debug!(
                    url = moved.base_url(),
                    "following the daemon to a new address"
                );
                connector.client = moved;
            }
            match connector.connect(last).await {
                Ok(c) => {
                    status.reconnects.fetch_add(1, Ordering::Relaxed);
                    status.set_down(false);
                    connection = c;
                    break;
                }
                Err(
                    e @ ClientError::Api {
                        status: 400 | 401 | 404,
                        ..
                    },
                ) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Err(e) => tracing::debug!(error = %e, "event stream reconnect failed"),
            }
        }
    }
}

async fn deliver(
    envelope: Envelope,
    last: &mut Seq,
    tx: &mpsc::Sender<Result<Envelope>>,
    status: &Status,
) -> Option<Ended> {
    if envelope.seq <= *last {
        return None;
    }
    *last = envelope.seq;
    status.last_seq.store(envelope.seq, Ordering::Relaxed);
    tx.send(Ok(envelope))
        .await
        .err()
        .map(|_| Ended::ReceiverGone)
}

async fn read_ws(
    ws: &mut WsStream,
    last: &mut Seq,
    tx: &mpsc::Sender<Result<Envelope>>,
    status: &Status,
) -> Ended {
    let mut last_error: Option<ErrorBody> = None;
    loop {
        let msg = tokio::select! {
            _ = tx.closed() => return Ended::ReceiverGone,
            msg = ws.next() => msg,
        };
        match msg {
            None | Some(Err(_)) => return Ended::Retry,
            Some(Ok(Message::Text(text))) => {
                let Ok(value) = serde_json::from_str::<Value>(text.as_str()) else {
                    continue;
                };
                match as_envelope(&value) {
                    Ok(Some(envelope)) => {
                        if let Some(end) = deliver(envelope, last, tx, status).await {
                            return end;
                        }
                    }
                    Ok(None) => {
                        if value.get("error").is_some() {
                            last_error = serde_json::from_value(value).ok();
                        }
                    }
                    Err(e) => return Ended::Fatal(e),
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map_or(1005, |f| u16::from(f.code));
                let body = last_error.take().unwrap_or_else(|| {
                    ErrorBody::message(format!("connection closed with code {code}"))
                });
                return match code {
                    4000 => Ended::Fatal(ClientError::Api { status: 400, body }),
                    4001 => Ended::Fatal(ClientError::Api { status: 401, body }),
                    4004 => Ended::Fatal(ClientError::Api { status: 404, body }),
                    1000 => Ended::SessionGone,
                    _ => Ended::Retry,
                };
            }
            Some(Ok(_)) => {}
        }
    }
}

async fn read_sse(
    sse: &mut SseStream,
    last: &mut Seq,
    tx: &mpsc::Sender<Result<Envelope>>,
    status: &Status,
) -> Ended {
    loop {
        let data = tokio::select! {
            _ = tx.closed() => return Ended::ReceiverGone,
            data = sse.next() => data,
        };
        let Some(Some(data)) = data else {
            return Ended::Retry;
        };
        let envelope = match serde_json::from_str::<Value>(&data)
            .map_err(|e| ClientError::Decode(e.to_string()))
        {
            Ok(value) => as_envelope(&value),
            Err(e) => Err(e),
        };
        match envelope {
            Ok(Some(envelope)) => {
                if let Some(end) = deliver(envelope, last, tx, status).await {
                    return end;
                }
            }
            Ok(None) => {}
            Err(e) => return Ended::Fatal(e),
        }
    }
}

/// How long opening a subscription may take (handshake, headers, the `hello` ack): a daemon
/// that accepts the connection and never answers must not hold the caller.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// `work`, or a transport error once [`OPEN_TIMEOUT`] passed.
async fn within_open_timeout<T>(work: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(OPEN_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Transport(format!(
                "the daemon did not answer the subscription within {} s",
                OPEN_TIMEOUT.as_secs()
            )))
        })
}

impl Connector {
    async fn connect(&self, after: Seq) -> Result<Connection> {
        within_open_timeout(self.open(after)).await
    }

    async fn open(&self, after: Seq) -> Result<Connection> {
        match self.transport {
            Transport::WebSocket => {
                let url = format!(
                    "{}/v3/ws?sessionId={}&afterSeq={after}",
                    self.client.base_url.replacen("http", "ws", 1),
                    self.session,
                );
                // The token goes in a header, not the URL: any character is fine there, and
                // it stays out of URLs that get logged.
                let mut request = url.into_client_request().map_err(crate::error::transport)?;
                let bearer = format!("Bearer {}", self.client.token);
                let value = tokio_tungstenite::tungstenite::http::HeaderValue::from_str(&bearer)
                    .map_err(|_| {
                        ClientError::Transport(
                            "the token holds characters an HTTP header cannot carry".into(),
                        )
                    })?;
                request.headers_mut().insert(
                    tokio_tungstenite::tungstenite::http::header::AUTHORIZATION,
                    value,
                );
                // No Nagle: frames are small and each should leave at once.
                let (ws, _) = tokio_tungstenite::connect_async_with_config(request, None, true)
                    .await
                    .map_err(crate::error::ws_handshake)?;
                Ok(Connection::Ws(Box::new(ws)))
            }
            Transport::Sse => {
                let url = format!(
                    "{}/v3/sse/events?sessionId={}&afterSeq={after}",
                    self.client.base_url, self.session
                );
                let response = self
                    .client
                    .http
                    .get(&url)
                    .bearer_auth(&self.client.token)
                    .send()
                    .await
                    .map_err(crate::error::transport)?;
                let status = response.status();
                if !status.is_success() {
                    let body = response
                        .json::<ErrorBody>()
                        .await
                        .unwrap_or_else(|e| ErrorBody {
                            error: e.to_string(),
                            code: None,
                            details: None,
                            seq: None,
                        });
                    return Err(ClientError::Api {
                        status: status.as_u16(),
                        body,
                    });
                }
                let events = response
                    .bytes_stream()
                    .eventsource()
                    .map(|e| e.ok().map(|event| event.data));
                Ok(Connection::Sse(Box::pin(events)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::as_envelope;

    #[test]
    fn a_newer_daemons_events_and_codes_do_not_break_decoding() {
        let base = |event: &str, payload: serde_json::Value| {
            json!({"v": "3", "event": event, "daemonId": "d", "sessionId": "s", "seq": 3,
                   "ts": "2026-01-01T00:00:00.000Z", "payload": payload})
        };
        let unknown = base("agent.dreamt", json!({"anything": [1, 2]}));
        assert!(matches!(as_envelope(&unknown), Ok(None)));
        let new_code = base(
            "turn.error",
            json!({"turnId": "t", "writerId": "w", "clientId": "c", "message": "m",
                   "code": "quota-exceeded"}),
        );
        let decoded = as_envelope(&new_code);
        assert!(matches!(decoded, Ok(Some(_))), "{decoded:?}");
        // A known event with a broken payload is still an error.
        let broken = base("turn.error", json!({"turnId": 5}));
        assert!(as_envelope(&broken).is_err());
    }
}
