//! Sessions as actors: one task owns each live session, and every change goes through it.

mod actor;
mod feed;
mod registry;
mod retention;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opta_protocol::{
    CancelRequest, CancelResponse, ResolvePermissionRequest, ResolvePermissionResponse, Seq,
    SessionDetail, SessionId, SessionSnapshot, SubmitTurnRequest, SubmitTurnResponse,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::error::{Error, Result};

pub use feed::SessionFeed;
pub use registry::{Opened, Registry};
pub use retention::sweep_deltas_periodically;

/// A serialised envelope, shared by every subscriber (serialised once).
#[derive(Debug, Clone)]
pub struct Frame {
    /// The envelope's seq.
    pub seq: Seq,
    /// The envelope as JSON text.
    pub json: Arc<str>,
}

/// A live subscription: every event after `current_seq` arrives on `receiver`; events up to
/// `current_seq` are in the store.
pub struct Subscription {
    /// Live events.
    pub receiver: broadcast::Receiver<Frame>,
    /// Seq of the last event emitted before the subscription began.
    pub current_seq: Seq,
}

/// Optional changes applied when a session is (re-)opened.
#[derive(Debug, Clone, Default)]
pub struct SessionChanges {
    /// New model.
    pub model: Option<String>,
    /// New title.
    pub title: Option<String>,
    /// New metadata.
    pub metadata: Option<serde_json::Value>,
    /// The workspace `metadata.workspace` names, opened when the request was checked: the
    /// session pins it (see [`WorkspacePin`]).
    pub workspace: Option<WorkspacePin>,
}

/// The workspace a session took: the path it was given and the directory opened then. Its
/// stored form (`{"path", "identity"}`, identity `dev:ino`) lets a reload refuse a path that
/// names another directory since.
#[derive(Debug, Clone)]
pub struct WorkspacePin {
    /// `metadata.workspace` as given.
    pub path: String,
    /// The directory, open.
    pub workspace: crate::agent::Workspace,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredPin {
    path: String,
    identity: String,
}

impl WorkspacePin {
    /// The stored form.
    pub fn stored(&self) -> String {
        serde_json::to_string(&StoredPin {
            path: self.path.clone(),
            identity: self.workspace.identity().to_string(),
        })
        .unwrap_or_default()
    }

    /// The identity a stored pin gives `path`, if it pins that path.
    pub fn identity_of(stored: &str, path: &str) -> Option<crate::agent::workspace::Identity> {
        let pin: StoredPin = serde_json::from_str(stored).ok()?;
        (pin.path == path).then(|| pin.identity.parse().ok())?
    }
}

pub(crate) enum SessionCommand {
    Open {
        changes: SessionChanges,
        /// The session was just created: the snapshot event carries its messages.
        created: bool,
        reply: oneshot::Sender<Result<SessionSnapshot>>,
    },
    Submit {
        request: Box<SubmitTurnRequest>,
        reply: oneshot::Sender<Result<SubmitTurnResponse>>,
    },
    Cancel {
        request: CancelRequest,
        reply: oneshot::Sender<Result<CancelResponse>>,
    },
    ResolvePermission {
        request_id: String,
        request: ResolvePermissionRequest,
        reply: oneshot::Sender<Result<ResolvePermissionResponse>>,
    },
    /// Revoke one grant (`None`: all); answers the grants left.
    RevokeGrants {
        grant: Option<String>,
        reply: oneshot::Sender<Result<Vec<String>>>,
    },
    Subscribe {
        reply: oneshot::Sender<Subscription>,
    },
    Snapshot {
        reply: oneshot::Sender<SessionSnapshot>,
    },
    Detail {
        reply: oneshot::Sender<SessionDetail>,
    },
    Delete {
        reply: oneshot::Sender<Result<()>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    /// Emit a background process's event; `process` = (id, still running) for status events.
    Background {
        event: Box<opta_protocol::Event>,
        process: Option<(String, bool)>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// The session's workspace.
    Workspace {
        reply: oneshot::Sender<Result<crate::agent::Workspace>>,
    },
    /// A subscriber went away: free the broadcast channel if it was the last.
    SubscriberLeft,
    /// Leave memory if idle since `idle_since_ms`; answers whether it did.
    Evict {
        idle_since_ms: u64,
        reply: oneshot::Sender<bool>,
    },
}

/// Address of a session actor; cheap to clone.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    id: SessionId,
    commands: mpsc::Sender<SessionCommand>,
    /// Last use (ms on the daemon's clock); the registry touches it on every lookup, so a
    /// handle just handed out is never evicted before it is used.
    touched: Arc<AtomicU64>,
}

impl SessionHandle {
    /// The session's id.
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> SessionCommand) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| Error::SessionNotFound(self.id.clone()))?;
        // The actor took the request and ended without answering: it failed (a restart of
        // it, from the store, happens on the next lookup).
        answer.await.map_err(|_| {
            Error::Internal(format!(
                "session {} failed while handling the request; retry",
                self.id
            ))
        })
    }

    /// Applies `changes` to an existing session, emits `session.snapshot` (without the
    /// messages) and returns the snapshot.
    pub async fn open(&self, changes: SessionChanges) -> Result<SessionSnapshot> {
        self.ask(|reply| SessionCommand::Open {
            changes,
            created: false,
            reply,
        })
        .await?
    }

    /// Emits the `session.snapshot` of a just created session (with its messages) and
    /// returns the snapshot.
    pub async fn announce_created(&self) -> Result<SessionSnapshot> {
        self.ask(|reply| SessionCommand::Open {
            changes: SessionChanges::default(),
            created: true,
            reply,
        })
        .await?
    }

    /// Queues a turn; resolves once it is durably queued.
    pub async fn submit(&self, request: SubmitTurnRequest) -> Result<SubmitTurnResponse> {
        self.ask(|reply| SessionCommand::Submit {
            request: Box::new(request),
            reply,
        })
        .await?
    }

    /// Cancels queued and/or active turns.
    pub async fn cancel(&self, request: CancelRequest) -> Result<CancelResponse> {
        self.ask(|reply| SessionCommand::Cancel { request, reply })
            .await?
    }

    /// Answers a pending permission request.
    pub async fn resolve_permission(
        &self,
        request_id: String,
        request: ResolvePermissionRequest,
    ) -> Result<ResolvePermissionResponse> {
        self.ask(|reply| SessionCommand::ResolvePermission {
            request_id,
            request,
            reply,
        })
        .await?
    }

    /// Revokes one session grant, or all when `grant` is `None`; the grants left.
    pub async fn revoke_grants(&self, grant: Option<String>) -> Result<Vec<String>> {
        self.ask(|reply| SessionCommand::RevokeGrants { grant, reply })
            .await?
    }

    /// Subscribes to live events.
    pub async fn subscribe(&self) -> Result<Subscription> {
        self.ask(|reply| SessionCommand::Subscribe { reply }).await
    }

    /// The session's snapshot.
    pub async fn snapshot(&self) -> Result<SessionSnapshot> {
        self.ask(|reply| SessionCommand::Snapshot { reply }).await
    }

    /// Snapshot plus history.
    pub async fn detail(&self) -> Result<SessionDetail> {
        self.ask(|reply| SessionCommand::Detail { reply }).await
    }

    pub(crate) async fn delete(&self) -> Result<()> {
        self.ask(|reply| SessionCommand::Delete { reply }).await?
    }

    /// Records and broadcasts a background process's event (`process`: its id and whether it
    /// still runs, for status events: a session with a running process is not evicted).
    pub(crate) async fn background(
        &self,
        event: opta_protocol::Event,
        process: Option<(String, bool)>,
    ) -> Result<()> {
        self.ask(|reply| SessionCommand::Background {
            event: Box::new(event),
            process,
            reply,
        })
        .await?
    }

    /// The session's workspace (`metadata.workspace`, else the daemon's).
    pub async fn workspace(&self) -> Result<crate::agent::Workspace> {
        self.ask(|reply| SessionCommand::Workspace { reply })
            .await?
    }

    /// Tells the actor a subscriber left (best effort: with a full queue, the actor frees
    /// the channel at its next event instead).
    pub(crate) fn subscriber_left(&self) {
        let _ = self.commands.try_send(SessionCommand::SubscriberLeft);
    }

    /// True once the actor is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }

    pub(crate) fn touch(&self, now_ms: u64) {
        self.touched.fetch_max(now_ms, Ordering::Relaxed);
    }

    /// Asks the actor to leave memory if it has been idle since `idle_since_ms`.
    pub(crate) async fn evict_if_idle(&self, idle_since_ms: u64) -> bool {
        self.ask(|reply| SessionCommand::Evict {
            idle_since_ms,
            reply,
        })
        .await
        .unwrap_or(false)
    }

    pub(crate) async fn shutdown(&self) {
        let _ = self.ask(|reply| SessionCommand::Shutdown { reply }).await;
    }
}
