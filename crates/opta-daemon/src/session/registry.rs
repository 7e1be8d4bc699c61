//! The registry actor: owns the map of resident sessions, creates them and loads them from
//! the store on first use (one load per session, however many ask at once).

use std::collections::HashMap;
use std::sync::Arc;

use opta_protocol::{CreateSessionRequest, SessionId};
use tokio::sync::{mpsc, oneshot};

use super::SessionHandle;
use super::actor::SessionActor;
use crate::context::DaemonContext;
use crate::error::{Error, Result};
use crate::ids::{new_session_id, now_iso};
use crate::store::{LoadedSession, SessionRow, WriteOp};

/// Result of opening a session.
#[derive(Debug)]
pub enum Opened {
    /// A new session was created.
    Created(SessionHandle),
    /// The id named an existing session.
    Existing(SessionHandle),
}

enum RegistryCommand {
    Open {
        request: CreateSessionRequest,
        workspace: Option<super::WorkspacePin>,
        reply: oneshot::Sender<Result<Opened>>,
    },
    Get {
        id: SessionId,
        reply: oneshot::Sender<Result<SessionHandle>>,
    },
    Delete {
        id: SessionId,
        reply: oneshot::Sender<Result<()>>,
    },
    Resident {
        ids: Vec<SessionId>,
        reply: oneshot::Sender<Vec<Option<SessionHandle>>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Address of the registry actor; cheap to clone.
#[derive(Clone, Debug)]
pub struct Registry {
    commands: mpsc::Sender<RegistryCommand>,
}

impl Registry {
    /// Starts the registry actor.
    pub fn spawn(ctx: Arc<DaemonContext>) -> Self {
        let (commands, rx) = mpsc::channel(1024);
        let actor = RegistryActor {
            ctx,
            sessions: HashMap::new(),
            trim_at: None,
        };
        tokio::spawn(actor.run(rx));
        Self { commands }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> RegistryCommand) -> Result<T> {
        crate::actor::ask(&self.commands, make).await
    }

    /// Creates a session (pinned to `workspace`, opened when the request was checked), or
    /// finds the existing one the request names.
    pub async fn open(
        &self,
        request: CreateSessionRequest,
        workspace: Option<super::WorkspacePin>,
    ) -> Result<Opened> {
        self.ask(|reply| RegistryCommand::Open {
            request,
            workspace,
            reply,
        })
        .await?
    }

    /// The session's actor, loading it from the store if needed.
    pub async fn get(&self, id: SessionId) -> Result<SessionHandle> {
        self.ask(|reply| RegistryCommand::Get { id, reply }).await?
    }

    /// Cancels the session's turns and removes it with its stored data.
    pub async fn delete(&self, id: SessionId) -> Result<()> {
        self.ask(|reply| RegistryCommand::Delete { id, reply })
            .await?
    }

    /// For each of `ids`, its handle if that session is resident (without loading any).
    pub async fn resident(&self, ids: Vec<SessionId>) -> Result<Vec<Option<SessionHandle>>> {
        self.ask(|reply| RegistryCommand::Resident { ids, reply })
            .await
    }

    /// Stops every session actor (running turns end as `interrupted`).
    pub async fn shutdown(&self) {
        let _ = self.ask(|reply| RegistryCommand::Shutdown { reply }).await;
    }
}

struct RegistryActor {
    ctx: Arc<DaemonContext>,
    sessions: HashMap<SessionId, SessionHandle>,
    /// Sessions were evicted: their memory is handed back at this moment (their actors have
    /// exited by then).
    trim_at: Option<tokio::time::Instant>,
}

impl RegistryActor {
    async fn run(mut self, mut commands: mpsc::Receiver<RegistryCommand>) {
        let mut eviction = tokio::time::interval(self.ctx.limits.eviction_interval);
        eviction.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let command = tokio::select! {
                command = commands.recv() => match command {
                    Some(c) => c,
                    None => return,
                },
                _ = eviction.tick() => {
                    self.evict_idle().await;
                    continue;
                }
                () = at(self.trim_at) => {
                    self.trim_at = None;
                    return_freed_memory();
                    continue;
                }
            };
            match command {
                RegistryCommand::Open {
                    request,
                    workspace,
                    reply,
                } => {
                    let _ = reply.send(self.open(request, workspace).await);
                }
                RegistryCommand::Get { id, reply } => {
                    let _ = reply.send(self.get(&id).await);
                }
                RegistryCommand::Delete { id, reply } => {
                    let result = match self.get(&id).await {
                        Ok(handle) => handle.delete().await,
                        Err(e) => Err(e),
                    };
                    if result.is_ok() {
                        self.sessions.remove(&id);
                        self.trim_at.get_or_insert_with(|| {
                            tokio::time::Instant::now() + TRIM_AFTER_EVICTION
                        });
                    }
                    let _ = reply.send(result);
                }
                RegistryCommand::Resident { ids, reply } => {
                    let handles = ids.iter().map(|id| self.sessions.get(id).cloned());
                    let _ = reply.send(handles.collect());
                }
                RegistryCommand::Shutdown { reply } => {
                    let handles: Vec<_> = self.sessions.drain().map(|(_, h)| h).collect();
                    futures_util::future::join_all(handles.iter().map(SessionHandle::shutdown))
                        .await;
                    let _ = reply.send(());
                    return;
                }
            }
        }
    }

    /// Drops idle sessions from memory. Lookups and evictions are both handled here, one at a
    /// time, and a lookup touches the handle, so no handle is evicted while being handed out.
    async fn evict_idle(&mut self) {
        let Some(idle_since_ms) = self.ctx.now_ms().checked_sub(
            u64::try_from(self.ctx.limits.idle_eviction.as_millis()).unwrap_or(u64::MAX),
        ) else {
            return;
        };
        let mut evicted = Vec::new();
        for (id, handle) in &self.sessions {
            if handle.evict_if_idle(idle_since_ms).await {
                evicted.push(id.clone());
            }
        }
        if !evicted.is_empty() {
            self.trim_at = Some(tokio::time::Instant::now() + TRIM_AFTER_EVICTION);
        }
        for id in evicted {
            tracing::debug!(session = %id, "idle session evicted from memory");
            self.sessions.remove(&id);
        }
    }

    async fn get(&mut self, id: &SessionId) -> Result<SessionHandle> {
        if let Some(handle) = self.sessions.get(id) {
            if !handle.is_closed() {
                handle.touch(self.ctx.now_ms());
                return Ok(handle.clone());
            }
            // Its actor ended without being asked to (a panic): load the session again from
            // the store, which holds everything it committed (a running turn is then
            // reported interrupted).
            tracing::error!(session = %id, "session actor ended unexpectedly; reloading it");
            self.sessions.remove(id);
        }
        if self.ctx.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let loaded = self
            .ctx
            .store
            .load_session(id.to_string())
            .await?
            .ok_or_else(|| Error::SessionNotFound(id.clone()))?;
        let handle = SessionActor::spawn(self.ctx.clone(), loaded)?;
        self.sessions.insert(id.clone(), handle.clone());
        Ok(handle)
    }

    async fn open(
        &mut self,
        request: CreateSessionRequest,
        workspace: Option<super::WorkspacePin>,
    ) -> Result<Opened> {
        if let Some(id) = &request.session_id {
            match self.get(id).await {
                Ok(handle) => return Ok(Opened::Existing(handle)),
                Err(Error::SessionNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        } else if self.ctx.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let id = match request.session_id {
            Some(id) => id,
            None => SessionId::parse(&new_session_id())
                .map_err(|e| Error::Internal(format!("generated session id: {e}")))?,
        };
        let now = now_iso();
        let row = SessionRow {
            id: id.to_string(),
            model: request
                .model
                .unwrap_or_else(|| self.ctx.default_model.clone()),
            title: request.title,
            metadata: request.metadata.map(|m| m.to_string()),
            created_at: now.clone(),
            updated_at: now,
            tool_call_count: 0,
            grants: None,
            workspace_pin: workspace.as_ref().map(super::WorkspacePin::stored),
        };
        let messages = request
            .messages
            .unwrap_or_default()
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Internal(format!("message serialisation: {e}")))?;
        let session_arc: Arc<str> = Arc::from(id.as_str());
        let mut ops = vec![WriteOp::InsertSession(row.clone())];
        ops.extend(
            messages
                .iter()
                .enumerate()
                .map(|(i, body)| WriteOp::AppendMessage {
                    session_id: session_arc.clone(),
                    idx: i as u64,
                    turn_id: None,
                    body: body.clone(),
                    partial: false,
                }),
        );
        self.ctx.store.write(ops).await?;
        let loaded = LoadedSession {
            row,
            messages,
            last_seq: 0,
            open_turns: Vec::new(),
            idempotency: HashMap::new(),
            running: HashMap::new(),
        };
        let handle = SessionActor::spawn(self.ctx.clone(), loaded)?;
        self.sessions.insert(id, handle.clone());
        Ok(Opened::Created(handle))
    }
}

/// How long after an eviction or a delete the memory is handed back: the sessions' actors
/// exit (and free their state) within moments of being asked.
const TRIM_AFTER_EVICTION: std::time::Duration = std::time::Duration::from_secs(1);

/// Completes at `deadline`; never without one.
async fn at(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Hands memory the allocator keeps after frees back to the system. glibc's malloc keeps
/// freed pages of its arenas (measured: RSS stayed at its peak after 1,000 sessions were
/// evicted); `malloc_trim` returns them. Elsewhere this does nothing.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and shrinks the allocator's own arenas; it takes no
    // pointers and is safe to call at any time from any thread.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
