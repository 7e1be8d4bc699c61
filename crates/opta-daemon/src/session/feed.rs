//! The daemon-level feed of session changes (`GET /v3/sse/sessions`): session actors publish
//! here when what a session list shows of them changes, so lists stay live without polling.

use std::sync::Arc;

use opta_protocol::{SessionFeedEvent, SessionId, SessionSnapshot};
use tokio::sync::broadcast;

/// Items a watcher may fall behind by before its stream is ended (it then re-lists).
const FEED_BUFFER: usize = 1024;

/// Publisher side of the feed; items are serialised once, for every watcher.
#[derive(Debug, Clone)]
pub struct SessionFeed {
    sender: broadcast::Sender<Arc<str>>,
}

impl Default for SessionFeed {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(FEED_BUFFER).0,
        }
    }
}

impl SessionFeed {
    /// A new watcher: every item published from now on.
    pub fn watch(&self) -> broadcast::Receiver<Arc<str>> {
        self.sender.subscribe()
    }

    /// True when someone watches (publishers skip building items otherwise).
    pub fn watched(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    /// Publishes a session's new listed state.
    pub fn changed(&self, session: SessionSnapshot) {
        self.publish(&SessionFeedEvent::Changed { session });
    }

    /// Publishes a deletion.
    pub fn deleted(&self, session_id: SessionId) {
        self.publish(&SessionFeedEvent::Deleted { session_id });
    }

    fn publish(&self, item: &SessionFeedEvent) {
        if !self.watched() {
            return;
        }
        match serde_json::to_string(item) {
            Ok(json) => {
                let _ = self.sender.send(json.into());
            }
            Err(e) => tracing::error!(error = %e, "session feed item not serialisable"),
        }
    }
}

/// What a session list shows of a session, to tell whether it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listed {
    active: Option<String>,
    queued: usize,
    updated_at: String,
    title: Option<String>,
    model: String,
    tool_calls: u64,
}

impl Listed {
    /// The listed state of `snapshot`-to-be, without building the snapshot.
    pub(crate) fn matches(
        &self,
        active: Option<&str>,
        queued: usize,
        meta: &crate::store::SessionRow,
    ) -> bool {
        self.active.as_deref() == active
            && self.queued == queued
            && self.updated_at == meta.updated_at
            && self.title == meta.title
            && self.model == meta.model
            && self.tool_calls == meta.tool_call_count
    }

    pub(crate) fn of(snapshot: &SessionSnapshot) -> Self {
        Self {
            active: snapshot.active_turn_id.as_ref().map(|t| t.0.clone()),
            queued: snapshot.queued_turns,
            updated_at: snapshot.updated_at.clone(),
            title: snapshot.title.clone(),
            model: snapshot.model.clone(),
            tool_calls: snapshot.tool_call_count,
        }
    }
}
