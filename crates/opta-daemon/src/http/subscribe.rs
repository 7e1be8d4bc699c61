//! Shared start of the WebSocket and SSE planes: subscribe, then read the replay.

use std::sync::Arc;

use opta_protocol::{Seq, SessionId};
use tokio::sync::broadcast;

use super::AppState;
use crate::context::{Counter, DaemonContext};
use crate::error::{Error, Result};
use crate::session::{Frame, SessionHandle};

/// Counts an open subscription for as long as it lives.
pub struct SubscriberGuard(Arc<DaemonContext>);

impl SubscriberGuard {
    fn new(ctx: Arc<DaemonContext>) -> Self {
        ctx.counters.add(Counter::Subscribers, 1);
        Self(ctx)
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.counters.sub(Counter::Subscribers, 1);
    }
}

/// A subscription with its replay: `replay` holds every stored event in
/// `(after_seq, current_seq]`, `receiver` everything after `current_seq`.
pub struct EventFeed {
    pub handle: SessionHandle,
    pub replay: Vec<Frame>,
    pub receiver: broadcast::Receiver<Frame>,
    pub current_seq: Seq,
    pub guard: SubscriberGuard,
}

/// Subscribes first and reads the store second: the actor commits before it broadcasts, so
/// everything up to `current_seq` is in the store, and nothing after it is missed.
pub async fn open_feed(state: &AppState, id: SessionId, after_seq: Seq) -> Result<EventFeed> {
    let handle = state.registry.get(id.clone()).await?;
    let subscription = handle.subscribe().await?;
    let replay = if after_seq < subscription.current_seq {
        state
            .ctx
            .store
            .events_after(id.to_string(), after_seq, subscription.current_seq)
            .await?
            .ok_or(Error::SessionNotFound(id))?
            .into_iter()
            .map(|(seq, json)| Frame { seq, json })
            .collect()
    } else {
        Vec::new()
    };
    Ok(EventFeed {
        handle,
        replay,
        receiver: subscription.receiver,
        current_seq: subscription.current_seq,
        guard: SubscriberGuard::new(state.ctx.clone()),
    })
}
