//! The WebSocket event plane: replay then live events out; hello, turn.submit,
//! permission.resolve and turn.cancel in, each answered with an ack or an error frame.

use std::collections::HashMap;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use opta_protocol::{
    AckFrame, CLOSE_BAD_REQUEST, CLOSE_NOT_FOUND, CLOSE_TOO_SLOW, CLOSE_UNAUTHORIZED,
    CancelRequest, ClientFrame, ResolvePermissionRequest, Seq, SessionId, SubmitTurnRequest,
};
use serde::Serialize;
use serde_json::json;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::AppState;
use super::auth::is_authorised;
use super::extract::{BODY_LIMIT, parse_json};
use super::routes::validate_submit;
use super::subscribe::{EventFeed, open_feed};
use crate::error::Error;
use crate::session::SessionHandle;

type WsSink = futures_util::stream::SplitSink<WebSocket, Message>;

/// RFC 6455 close codes.
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;

pub async fn connect(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let authorised = is_authorised(&state.token, &headers, uri.query());
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(_) if !authorised => return Error::Unauthorized.into_response(),
        Err(rejection) => {
            return Error::invalid("upgrade", rejection.body_text()).into_response();
        }
    };
    let params: HashMap<String, String> = uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    upgrade
        .max_message_size(BODY_LIMIT)
        // Sized for what a subscriber sends (small JSON frames; a larger one grows it): the
        // default 128 KiB read buffer was allocated per connection and made an idle
        // subscriber cost ~137 KB.
        .read_buffer_size(WS_READ_BUFFER)
        .on_upgrade(move |socket| serve_socket(socket, state, params, authorised))
}

/// Initial read buffer of one WebSocket connection.
const WS_READ_BUFFER: usize = 4 * 1024;

async fn serve_socket(
    socket: WebSocket,
    state: AppState,
    params: HashMap<String, String>,
    authorised: bool,
) {
    let (mut sink, mut source) = socket.split();
    if !authorised {
        close_with_error(&mut sink, &Error::Unauthorized, CLOSE_UNAUTHORIZED).await;
        return;
    }
    let target = match parse_target(&params) {
        Ok(t) => t,
        Err(e) => {
            close_with_error(&mut sink, &e, CLOSE_BAD_REQUEST).await;
            return;
        }
    };
    let (session_id, after_seq) = target;
    let feed = match open_feed(&state, session_id.clone(), after_seq).await {
        Ok(feed) => feed,
        Err(e @ Error::SessionNotFound(_)) => {
            close_with_error(&mut sink, &e, CLOSE_NOT_FOUND).await;
            return;
        }
        Err(e) => {
            close_with_error(&mut sink, &e, 1011).await;
            return;
        }
    };
    let EventFeed {
        handle,
        replay,
        live: mut receiver,
        current_seq,
    } = feed;
    // A client claiming a seq beyond the session's (say, of a deleted and re-created
    // session) gets everything live rather than nothing.
    let mut last_sent: Seq = after_seq.min(current_seq);
    // Replay goes out in as few writes as the WebSocket layer's buffer allows.
    for frame in replay {
        if sink.feed(text(&frame.json)).await.is_err() {
            return;
        }
        last_sent = frame.seq;
    }
    if sink.flush().await.is_err() {
        return;
    }
    let period = state.ctx.limits.keepalive;
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            // Shutdown first: the session's channel closes during shutdown too, and that
            // must read as "going away" (reconnect), not as "session closed" (stop).
            biased;
            _ = state.ctx.shutdown.cancelled() => {
                close(&mut sink, 1001, "daemon shutting down").await;
                return;
            }
            _ = keepalive.tick() => {
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            incoming = source.next() => match incoming {
                None => return,
                Some(Ok(Message::Close(_))) => {
                    // The WebSocket layer has queued the echo of the client's close frame
                    // (same code); closing flushes it, so the client sees a clean close
                    // (1000) rather than a dropped connection (1006).
                    let _ = sink.close().await;
                    return;
                }
                Some(Err(e)) => {
                    close_after_read_error(&mut sink, e).await;
                    return;
                }
                Some(Ok(Message::Text(body))) => {
                    let reply = answer_frame(&handle, &session_id, body.as_bytes(), last_sent).await;
                    if sink.send(text(&reply)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    let reply = error_reply(&Error::invalid("frame", "binary frames are not supported"), None);
                    if sink.send(text(&reply)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            },
            live = receiver.recv() => {
                let mut next = live;
                let mut queued = 0;
                // Every frame already waiting goes out with this one: one write (and one
                // wake-up of the client) per batch rather than per event.
                loop {
                    match next {
                        Ok(frame) if frame.seq <= last_sent => {}
                        Ok(frame) => {
                            if sink.feed(text(&frame.json)).await.is_err() {
                                return;
                            }
                            last_sent = frame.seq;
                            queued += 1;
                        }
                        Err(RecvError::Lagged(_)) => {
                            let reason = format!("too slow; reconnect with afterSeq={last_sent}");
                            close(&mut sink, CLOSE_TOO_SLOW, &reason).await;
                            return;
                        }
                        Err(RecvError::Closed) if state.ctx.shutdown.is_cancelled() => {
                            close(&mut sink, 1001, "daemon shutting down").await;
                            return;
                        }
                        Err(RecvError::Closed) => {
                            close(&mut sink, 1000, "session closed").await;
                            return;
                        }
                    }
                    if queued >= MAX_FRAMES_PER_WRITE {
                        break;
                    }
                    next = match receiver.try_recv() {
                        Ok(frame) => Ok(frame),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                        Err(TryRecvError::Closed) => Err(RecvError::Closed),
                    };
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Most live frames written out together.
const MAX_FRAMES_PER_WRITE: usize = 256;

fn parse_target(params: &HashMap<String, String>) -> Result<(SessionId, Seq), Error> {
    let raw = params
        .get("sessionId")
        .ok_or_else(|| Error::invalid("query.sessionId", "is required"))?;
    let id = SessionId::parse(raw).map_err(|e| Error::invalid("query.sessionId", e.to_string()))?;
    let after_seq = match params.get("afterSeq") {
        None => 0,
        Some(v) => v
            .parse()
            .map_err(|_| Error::invalid("query.afterSeq", "must be a non-negative integer"))?,
    };
    Ok((id, after_seq))
}

fn text(json: &str) -> Message {
    Message::Text(Utf8Bytes::from(json))
}

fn ack<T: Serialize>(action: &str, result: &T) -> String {
    let result = match serde_json::to_value(result) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let frame = AckFrame {
        kind: "ack".into(),
        action: action.into(),
        result,
    };
    serde_json::to_string(&frame).unwrap_or_else(|_| json!({"error": "internal"}).to_string())
}

async fn answer_frame(
    handle: &SessionHandle,
    session_id: &SessionId,
    body: &[u8],
    last_sent: Seq,
) -> String {
    let frame = match parse_client_frame(body) {
        Ok(f) => f,
        Err((action, e)) => return error_reply(&e, action),
    };
    let action = frame.action();
    if frame.session_id() != session_id {
        let e = Error::invalid(
            "sessionId",
            format!("this connection is for session {session_id}"),
        );
        return error_reply(&e, Some(action));
    }
    let result = match frame {
        ClientFrame::Hello { client_id, .. } => Ok(ack(
            action,
            &json!({ "clientId": client_id, "sessionId": session_id, "lastSeq": last_sent }),
        )),
        ClientFrame::TurnSubmit { turn, .. } => match validate_submit(&turn) {
            Ok(()) => handle.submit(turn).await.map(|r| ack(action, &r)),
            Err(e) => Err(e),
        },
        ClientFrame::PermissionResolve { resolution, .. } => handle
            .resolve_permission(resolution.request_id.clone(), resolution)
            .await
            .map(|r| ack(action, &r)),
        ClientFrame::TurnCancel { cancel, .. } => {
            handle.cancel(cancel).await.map(|r| ack(action, &r))
        }
    };
    result.unwrap_or_else(|e| error_reply(&e, Some(action)))
}

/// The HTTP error body as a frame, plus `action` when the frame's type was understood.
fn error_reply(error: &Error, action: Option<&str>) -> String {
    let mut body = error.body();
    if let (Some(action), Some(map)) = (action, body.as_object_mut()) {
        map.insert("action".into(), action.into());
    }
    body.to_string()
}

/// Parses a client frame; a failure names the frame's action when its `type` is known. serde
/// reports errors inside an internally tagged enum without a path, so on failure the variant's
/// body is parsed again to name the offending field.
fn parse_client_frame(body: &[u8]) -> Result<ClientFrame, (Option<&'static str>, Error)> {
    let value: serde_json::Value = parse_json(body).map_err(|e| (None, e))?;
    let kind = value.get("type").and_then(serde_json::Value::as_str);
    let action = kind.and_then(ClientFrame::known_action);
    let has_type = kind.is_some();
    let precise = |e: serde_json::Error| {
        let reparsed = match action {
            Some("turn.submit") => parse_json::<SubmitTurnRequest>(body).err(),
            Some("permission.resolve") => parse_json::<ResolvePermissionRequest>(body).err(),
            Some("turn.cancel") => parse_json::<CancelRequest>(body).err(),
            _ => None,
        };
        let path = if has_type { "frame" } else { "type" };
        reparsed.unwrap_or_else(|| Error::invalid(path, e.to_string()))
    };
    serde_json::from_value::<ClientFrame>(value).map_err(|e| (action, precise(e)))
}

/// Closes the connection after a failed read: 1009 with an error frame for a message over
/// the size limit, 1002 for anything else (a protocol violation or a broken socket).
async fn close_after_read_error(sink: &mut WsSink, error: axum::Error) {
    let too_big = matches!(
        error.into_inner().downcast_ref::<tungstenite::Error>(),
        Some(tungstenite::Error::Capacity(_))
    );
    if too_big {
        let e = Error::PayloadTooLarge { limit: BODY_LIMIT };
        close_with_error(sink, &e, CLOSE_MESSAGE_TOO_BIG).await;
    } else {
        close(sink, CLOSE_PROTOCOL_ERROR, "protocol error").await;
    }
}

async fn close(sink: &mut WsSink, code: u16, reason: &str) {
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        })))
        .await;
}

async fn close_with_error(sink: &mut WsSink, error: &Error, code: u16) {
    let _ = sink.send(text(&error_reply(error, None))).await;
    // Close reasons are limited to 123 bytes.
    let mut reason = error.to_string();
    while reason.len() > 120 {
        reason.pop();
    }
    close(sink, code, &reason).await;
}
