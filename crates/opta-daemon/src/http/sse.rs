//! The SSE event plane: `: connected`, replay, then live events; `: ping` every 15 s.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt, stream};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::AppState;
use super::extract::{ApiQuery, session_id};
use super::subscribe::open_feed;
use crate::error::{Error, Result};
use crate::session::Frame;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SseQuery {
    session_id: Option<String>,
    after_seq: Option<u64>,
}

fn sse_event(frame: &Frame) -> Event {
    // Envelopes are single-line JSON (serde_json escapes newlines), as SSE data must be.
    Event::default()
        .id(frame.seq.to_string())
        .data(&*frame.json)
}

pub async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<SseQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let raw = query
        .session_id
        .ok_or_else(|| Error::invalid("query.sessionId", "is required"))?;
    let id = session_id(&raw, "query.sessionId")?;
    // A browser's EventSource reconnects with its original URL plus `Last-Event-ID`: the
    // header is the newer position, so it wins over `afterSeq`. An empty one is absent.
    let last_event_id = match headers.get("last-event-id").map(|v| v.to_str()) {
        None => None,
        Some(Ok(s)) if s.trim().is_empty() => None,
        Some(v) => Some(
            v.ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| Error::invalid("header.Last-Event-ID", "must be a seq number"))?,
        ),
    };
    let after_seq = last_event_id.or(query.after_seq).unwrap_or(0);
    let feed = open_feed(&state, id, after_seq).await?;
    let shutdown = state.ctx.shutdown.clone();
    let ping = state.ctx.limits.keepalive;
    let connected = stream::once(async { Ok(Event::default().comment("connected")) });
    let replay = stream::iter(feed.replay.into_iter().map(|f| Ok(sse_event(&f))));
    let live_state = (feed.live, feed.current_seq);
    let live = stream::unfold(live_state, move |(mut receiver, last)| {
        let shutdown = shutdown.clone();
        async move {
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    next = receiver.recv() => next,
                };
                match next {
                    Ok(frame) if frame.seq <= last => continue,
                    Ok(frame) => {
                        let event = sse_event(&frame);
                        return Some((Ok(event), (receiver, frame.seq)));
                    }
                    // Too slow: end the stream; the client reconnects with Last-Event-ID.
                    Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok(Sse::new(connected.chain(replay).chain(live))
        .keep_alive(KeepAlive::new().interval(ping).text("ping")))
}

/// `GET /v3/sse/sessions`: `: connected`, then one `data:` line per session change. A watcher
/// that falls behind has its stream ended: it re-lists and watches again.
pub async fn sessions(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = state.ctx.session_feed.watch();
    let shutdown = state.ctx.shutdown.clone();
    let connected = stream::once(async { Ok(Event::default().comment("connected")) });
    let live = stream::unfold(receiver, move |mut receiver| {
        let shutdown = shutdown.clone();
        async move {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return None,
                next = receiver.recv() => next,
            };
            match next {
                Ok(json) => Some((Ok(Event::default().data(&*json)), receiver)),
                Err(RecvError::Lagged(_) | RecvError::Closed) => None,
            }
        }
    });
    Sse::new(connected.chain(live)).keep_alive(
        KeepAlive::new()
            .interval(state.ctx.limits.keepalive)
            .text("ping"),
    )
}
