//! Shared start of the WebSocket and SSE planes: subscribe, then read the replay.

use std::sync::Arc;

use opta_protocol::{Seq, SessionId};
use tokio::sync::broadcast;

use super::AppState;
use crate::context::{Counter, DaemonContext};
use crate::error::{Error, Result};
use crate::session::{Frame, SessionHandle};

/// The live half of a subscription. It counts as a subscriber while it lives; when it goes,
/// its receiver goes first and then its session hears of it, so a session whose last
/// subscriber left frees its broadcast channel at once (not at its next event, which may never
/// come).
pub struct LiveFeed {
    receiver: Option<broadcast::Receiver<Frame>>,
    handle: SessionHandle,
    ctx: Arc<DaemonContext>,
}

impl LiveFeed {
    fn new(
        receiver: broadcast::Receiver<Frame>,
        handle: SessionHandle,
        ctx: Arc<DaemonContext>,
    ) -> Self {
        ctx.counters.add(Counter::Subscribers, 1);
        Self {
            receiver: Some(receiver),
            handle,
            ctx,
        }
    }

    /// The next live frame.
    pub async fn recv(&mut self) -> Result<Frame, broadcast::error::RecvError> {
        match &mut self.receiver {
            Some(receiver) => receiver.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }

    /// The next live frame if one is waiting.
    pub fn try_recv(&mut self) -> Result<Frame, broadcast::error::TryRecvError> {
        match &mut self.receiver {
            Some(receiver) => receiver.try_recv(),
            None => Err(broadcast::error::TryRecvError::Closed),
        }
    }
}

impl Drop for LiveFeed {
    fn drop(&mut self) {
        drop(self.receiver.take());
        self.ctx.counters.sub(Counter::Subscribers, 1);
        self.handle.subscriber_left();
    }
}

/// A subscription with its replay: `replay` holds every stored event in
/// `(after_seq, current_seq]`, `receiver` everything after `current_seq`.
pub struct EventFeed {
    pub handle: SessionHandle,
    pub replay: Vec<Frame>,
    pub live: LiveFeed,
    pub current_seq: Seq,
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
        live: LiveFeed::new(subscription.receiver, handle.clone(), state.ctx.clone()),
        handle,
        replay,
        current_seq: subscription.current_seq,
    })
}
