//! The session actor: owns history, queue, the active turn and `seq`.
//!
//! Every event is numbered here, committed to the store, and only then broadcast, so the
//! order subscribers see is the seq order and anything a client saw is on disk.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opta_protocol::{
    CancelRequest, CancelResponse, ChatMessage, Decision, EnvelopeRef, Event, Mode,
    PROTOCOL_VERSION, PermissionRequest, PermissionResolved, Remember, ResolvePermissionRequest,
    ResolvePermissionResponse, Role, Seq, SessionCancelled, SessionDetail, SessionId,
    SessionSnapshot, SessionSnapshotEvent, SessionUpdated, SubmitTurnRequest, SubmitTurnResponse,
    ToolEnd, ToolStart, TurnDone, TurnError, TurnErrorCode, TurnId, TurnOverrides, TurnProgress,
    TurnQueued, TurnStart, TurnStats, TurnText,
};
use serde_json::json;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::{JoinError, JoinHandle};

use super::feed::Listed;
use super::{Frame, SessionChanges, SessionCommand, SessionHandle, Subscription, WorkspacePin};
use crate::agent::Workspace;
use crate::agent::run::{PermissionAsk, ToolEnded, TurnPlan, TurnUpdate, Verdict, run_turn};
use crate::agent::tools::FileMemory;
use crate::context::{Counter, DaemonContext};
use crate::error::{Error, Result};
use crate::ids::{new_turn_id, now_iso};
use crate::inference::{Completion, Delta};
use crate::store::{LoadedSession, RunningTrace, SessionRow, TurnRow, TurnState, WriteOp};

/// Deltas folded into one store commit when the model outpaces the disk.
const MAX_DELTAS_PER_COMMIT: usize = 256;
/// Decided permission request ids remembered (to answer a late decision 409, not 404).
const DECIDED_KEPT: usize = 256;
/// First and longest wait before an unrecorded turn ending is written again.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// A turn waiting in the queue.
#[derive(Debug, Clone)]
struct PendingTurn {
    turn_id: TurnId,
    writer_id: String,
    client_id: String,
    content: String,
    mode: Mode,
    overrides: Option<TurnOverrides>,
}

/// The turn being run.
struct ActiveTurn {
    turn: PendingTurn,
    turn_no: u64,
    /// False when `overrides.model` chose the model, so the session's own stays as it is.
    uses_session_model: bool,
    started: Instant,
    first_delta_at: Option<Instant>,
    text: String,
    delta_count: u64,
    /// `None` for a turn recovered after a crash, which has no task.
    task: Option<JoinHandle<()>>,
    /// Tool calls started (each counted once).
    tool_calls: u64,
    /// Calls with a `tool.start` and no `tool.end` yet: (id, name).
    open_tools: Vec<(String, String)>,
    /// The permission request the turn waits on.
    permission: Option<PendingPermission>,
}

/// A permission request waiting for a client.
struct PendingPermission {
    request_id: String,
    tool_name: String,
    grant_key: Option<String>,
    guard: Option<u64>,
    reply: oneshot::Sender<Verdict>,
    deadline: tokio::time::Instant,
}

/// A turn start prepared but not yet committed.
struct TurnStartPlan {
    events: Vec<Event>,
    ops: Vec<WriteOp>,
    meta: SessionRow,
    user: Arc<ChatMessage>,
    active: ActiveTurn,
}

impl TurnStartPlan {
    /// Stops the inference request of a start that could not be committed.
    fn abort(self) {
        if let Some(task) = self.active.task {
            task.abort();
        }
    }
}

/// A turn's terminal events that could not be committed (the store was full). The queue
/// waits until they are: each turn gets exactly one terminal event, in order.
struct OwedRecord {
    events: Vec<Event>,
    ops: Vec<WriteOp>,
    /// The reply to add to the history once recorded.
    reply: Option<ChatMessage>,
}

/// How the active turn ends.
enum TurnEnding {
    Done(Completion),
    Failed {
        code: Option<TurnErrorCode>,
        message: String,
        state: TurnState,
    },
}

pub(crate) struct SessionActor {
    ctx: Arc<DaemonContext>,
    id: SessionId,
    id_arc: Arc<str>,
    meta: SessionRow,
    /// Shared, so a turn's request takes the history without copying it.
    history: Vec<Arc<ChatMessage>>,
    seq: Seq,
    queue: VecDeque<PendingTurn>,
    active: Option<ActiveTurn>,
    next_turn_no: u64,
    idempotency: HashMap<String, TurnId>,
    /// Live subscribers' channel; only while there are any (its ring buffer is
    /// `subscriber_buffer` frames, too much to keep for every resident session).
    events: Option<broadcast::Sender<Frame>>,
    updates_tx: mpsc::Sender<TurnUpdate>,
    updates: mpsc::Receiver<TurnUpdate>,
    stopping: bool,
    /// Shared with the handles: last use on the daemon's clock.
    touched: Arc<AtomicU64>,
    /// A turn ending still to be recorded, and when to try again.
    owed: Option<OwedRecord>,
    retry_at: Option<tokio::time::Instant>,
    retry_delay: Duration,
    /// Session grants (`remember: "session"`), stored with the session row.
    grants: Vec<String>,
    /// For `git` grants, what git's configuration, hooks and info were when given (kept in
    /// memory: after a restart such a grant asks once more).
    grant_guards: HashMap<String, u64>,
    /// Recently decided permission request ids.
    decided: VecDeque<String>,
    /// The agent's memory of reads; lent to the running turn.
    memory: Option<FileMemory>,
    /// Background processes of this session still running (it is not evicted meanwhile).
    processes: HashSet<String>,
    /// Its own address, without keeping its channel open: lent to turns (their background
    /// processes report to this session).
    own: mpsc::WeakSender<SessionCommand>,
    /// What the session feed last heard of this session (`None`: not yet announced).
    listed: Option<Listed>,
    /// The workspace directory, open, with the path it was set by, once it was set or a
    /// turn needed it.
    workspace: Option<WorkspacePin>,
}

impl SessionActor {
    /// Starts the actor for a loaded (or just created) session.
    pub(crate) fn spawn(ctx: Arc<DaemonContext>, loaded: LoadedSession) -> Result<SessionHandle> {
        let id = SessionId::parse(&loaded.row.id)
            .map_err(|e| Error::Storage(format!("stored session id is invalid: {e}")))?;
        let history = loaded
            .messages
            .iter()
            .map(|body| serde_json::from_str::<ChatMessage>(body).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Storage(format!("corrupt message in session {id}: {e}")))?;
        let (commands_tx, commands) = mpsc::channel(256);
        let touched = Arc::new(AtomicU64::new(ctx.now_ms()));
        let (updates_tx, updates) = mpsc::channel(256);
        let grants = loaded
            .row
            .grants
            .as_deref()
            .and_then(|g| serde_json::from_str(g).ok())
            .unwrap_or_default();
        let actor = SessionActor {
            id_arc: Arc::from(id.as_str()),
            id: id.clone(),
            meta: loaded.row,
            history,
            seq: loaded.last_seq,
            queue: VecDeque::new(),
            active: None,
            next_turn_no: 0,
            idempotency: loaded
                .idempotency
                .into_iter()
                .map(|(k, v)| (k, TurnId(v)))
                .collect(),
            events: None,
            updates_tx,
            updates,
            stopping: false,
            touched: touched.clone(),
            owed: None,
            retry_at: None,
            retry_delay: RETRY_FIRST,
            grants,
            grant_guards: HashMap::new(),
            decided: VecDeque::new(),
            memory: Some(FileMemory::default()),
            processes: HashSet::new(),
            own: commands_tx.downgrade(),
            listed: None,
            workspace: None,
            ctx: ctx.clone(),
        };
        ctx.counters.add(Counter::Sessions, 1);
        tokio::spawn(actor.run(commands, loaded.open_turns, loaded.running));
        Ok(SessionHandle {
            id,
            commands: commands_tx,
            touched,
        })
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<SessionCommand>,
        open_turns: Vec<TurnRow>,
        running: HashMap<String, RunningTrace>,
    ) {
        self.recover(open_turns, running).await;
        self.maybe_start_next().await;
        loop {
            if let Some(joined) = self.injected_join_before_reports().await {
                self.on_task_exit(joined).await;
                self.maybe_start_next().await;
                self.publish_listing();
                continue;
            }
            let permission_deadline = self
                .active
                .as_ref()
                .and_then(|a| a.permission.as_ref())
                .map(|p| p.deadline);
            let task = self.active.as_mut().and_then(|a| a.task.as_mut());
            let retry_at = self.retry_at;
            tokio::select! {
                biased;
                command = commands.recv() => {
                    let Some(command) = command else { break };
                    if self.handle(command).await.is_break() {
                        break;
                    }
                }
                Some(update) = self.updates.recv() => self.on_update(update).await,
                // A task reports its end on `updates` before it returns; `on_task_exit`
                // takes any report that raced the join, so what is left ended unreported.
                joined = join_running(task) => self.on_task_exit(joined).await,
                () = sleep_until(retry_at) => self.retry_at = None,
                () = sleep_until(permission_deadline) => {
                    self.decide_permission(Verdict { allowed: false, by: "timeout".into() }, None)
                        .await;
                }
            }
            // Whatever happened (a turn ended, a record was owed or paid, a cancel), the
            // queue moves on from here.
            self.maybe_start_next().await;
            self.publish_listing();
        }
        // `Drop` releases what the actor holds.
    }

    async fn handle(&mut self, command: SessionCommand) -> ControlFlow<()> {
        if !matches!(
            command,
            SessionCommand::Evict { .. } | SessionCommand::SubscriberLeft
        ) {
            self.touched.fetch_max(self.ctx.now_ms(), Ordering::Relaxed);
        }
        match command {
            SessionCommand::Open {
                changes,
                created,
                reply,
            } => {
                let _ = reply.send(self.open(changes, created).await);
            }
            SessionCommand::Submit { request, reply } => {
                let _ = reply.send(self.submit(*request).await);
            }
            SessionCommand::Cancel { request, reply } => {
                let _ = reply.send(self.cancel(request).await);
            }
            SessionCommand::ResolvePermission {
                request_id,
                request,
                reply,
            } => {
                let _ = reply.send(self.resolve_permission(request_id, request).await);
            }
            SessionCommand::Subscribe { reply } => {
                let capacity = self.ctx.limits.subscriber_buffer;
                if self.events.is_none() {
                    self.ctx.counters.add(Counter::Channels, 1);
                }
                let sender = self
                    .events
                    .get_or_insert_with(|| broadcast::channel(capacity).0);
                let _ = reply.send(Subscription {
                    receiver: sender.subscribe(),
                    current_seq: self.seq,
                });
            }
            SessionCommand::Background {
                event,
                process,
                reply,
            } => {
                if let Some((id, running)) = process {
                    if running {
                        self.processes.insert(id);
                    } else {
                        self.processes.remove(&id);
                    }
                }
                let _ = reply.send(self.emit(&[*event], Vec::new()).await);
            }
            SessionCommand::Workspace { reply } => {
                let _ = reply.send(self.workspace().await);
            }
            SessionCommand::SubscriberLeft => {
                if self.subscribers() == 0 {
                    self.drop_channel();
                }
            }
            SessionCommand::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            SessionCommand::Detail { reply } => {
                let _ = reply.send(SessionDetail {
                    snapshot: self.snapshot(),
                    messages: self.messages(),
                    last_seq: Some(self.seq),
                    grants: self.grants.clone(),
                });
            }
            SessionCommand::RevokeGrants { grant, reply } => {
                let _ = reply.send(self.revoke_grants(grant).await);
            }
            SessionCommand::Delete { reply } => {
                let result = self.delete().await;
                let deleted = result.is_ok();
                let _ = reply.send(result);
                if deleted {
                    self.ctx.session_feed.deleted(self.id.clone());
                    return ControlFlow::Break(());
                }
            }
            SessionCommand::Shutdown { reply } => {
                self.shutdown().await;
                let _ = reply.send(());
                return ControlFlow::Break(());
            }
            SessionCommand::Evict {
                idle_since_ms,
                reply,
            } => {
                let idle = self.active.is_none()
                    && self.processes.is_empty()
                    && self.queue.is_empty()
                    && self.owed.is_none()
                    && self.subscribers() == 0
                    && self.touched.load(Ordering::Relaxed) <= idle_since_ms;
                let _ = reply.send(idle);
                if idle {
                    self.ctx.counters.add(Counter::Evictions, 1);
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    }

    /// Numbers `events`, commits them with `ops` in one batch, then broadcasts them.
    /// On failure nothing was committed or broadcast and `seq` is unchanged.
    async fn emit(&mut self, events: &[Event], mut ops: Vec<WriteOp>) -> Result<()> {
        let ts = now_iso();
        let mut frames = Vec::with_capacity(events.len());
        let mut seq = self.seq;
        for event in events {
            seq += 1;
            let name = event.name();
            // The owner an event is found by: its turn, or for output its process (swept
            // once the process has ended).
            let turn_id = match event {
                Event::BackgroundOutput(output) => Some(output.process_id.clone()),
                other => other.turn_id().map(|t| t.0.clone()),
            };
            let envelope = EnvelopeRef {
                v: PROTOCOL_VERSION,
                event,
                daemon_id: &self.ctx.daemon_id,
                session_id: &self.id,
                seq,
                ts: &ts,
            };
            let json: Arc<str> = serde_json::to_string(&envelope)
                .map_err(|e| Error::Internal(format!("envelope serialisation: {e}")))?
                .into();
            ops.push(WriteOp::AppendEvent {
                session_id: self.id_arc.clone(),
                seq,
                event: name,
                turn_id,
                envelope: json.clone(),
            });
            frames.push(Frame { seq, json });
        }
        let committing = Instant::now();
        self.ctx.store.write(ops).await?;
        let metrics = &self.ctx.metrics;
        metrics
            .commit_seconds
            .observe(committing.elapsed().as_secs_f64());
        metrics.events.inc_by(events.len() as u64);
        self.seq = seq;
        if self.subscribers() == 0 {
            // The last subscriber left: free the channel (the events are stored and replay).
            self.drop_channel();
        } else if let Some(sender) = &self.events {
            for frame in frames {
                let _ = sender.send(frame);
            }
        }
        Ok(())
    }

    /// Frees the broadcast channel (its ring of frames) if there is one.
    fn drop_channel(&mut self) {
        if self.events.take().is_some() {
            self.ctx.counters.sub(Counter::Channels, 1);
        }
    }

    fn subscribers(&self) -> usize {
        self.events
            .as_ref()
            .map_or(0, broadcast::Sender::receiver_count)
    }

    /// The history as owned messages, for answers and events.
    fn messages(&self) -> Vec<ChatMessage> {
        self.history.iter().map(|m| ChatMessage::clone(m)).collect()
    }

    /// Tells the session feed when what a session list shows of this session changed.
    /// Runs after every message the actor handles (every token delta too): with no watcher it
    /// costs one atomic load. A watcher that connects re-lists, so what changed unwatched is
    /// not owed to it.
    fn publish_listing(&mut self) {
        if !self.ctx.session_feed.watched() {
            return;
        }
        let active = self.active.as_ref().map(|a| a.turn.turn_id.0.as_str());
        if self
            .listed
            .as_ref()
            .is_some_and(|l| l.matches(active, self.queue.len(), &self.meta))
        {
            return;
        }
        let snapshot = self.snapshot();
        self.listed = Some(Listed::of(&snapshot));
        self.ctx.session_feed.changed(snapshot);
    }

    fn snapshot(&self) -> SessionSnapshot {
        let mut writers: HashSet<&str> = self.queue.iter().map(|t| t.writer_id.as_str()).collect();
        if let Some(active) = &self.active {
            writers.insert(&active.turn.writer_id);
        }
        SessionSnapshot {
            session_id: self.id.clone(),
            model: self.meta.model.clone(),
            title: self.meta.title.clone(),
            created_at: self.meta.created_at.clone(),
            updated_at: self.meta.updated_at.clone(),
            active_turn_id: self.active.as_ref().map(|a| a.turn.turn_id.clone()),
            queued_turns: self.queue.len(),
            tool_call_count: self.meta.tool_call_count,
            writer_count: writers.len(),
        }
    }

    /// The write of `message` as the next message of the history.
    fn message_op(
        &self,
        message: &ChatMessage,
        turn_id: &TurnId,
        partial: bool,
    ) -> Result<WriteOp> {
        self.message_op_at(self.history.len() as u64, message, turn_id, partial)
    }

    fn message_op_at(
        &self,
        idx: u64,
        message: &ChatMessage,
        turn_id: &TurnId,
        partial: bool,
    ) -> Result<WriteOp> {
        Ok(WriteOp::AppendMessage {
            session_id: self.id_arc.clone(),
            idx,
            turn_id: Some(turn_id.0.clone()),
            body: serde_json::to_string(message)
                .map_err(|e| Error::Internal(format!("message serialisation: {e}")))?,
            partial,
        })
    }

    async fn open(&mut self, changes: SessionChanges, created: bool) -> Result<SessionSnapshot> {
        let mut meta = self.meta.clone();
        let changed =
            changes.model.is_some() || changes.title.is_some() || changes.metadata.is_some();
        if let Some(model) = changes.model {
            meta.model = model;
        }
        if let Some(title) = changes.title {
            meta.title = Some(title);
        }
        if let Some(metadata) = changes.metadata {
            meta.metadata = Some(metadata.to_string());
        }
        let mut ops = Vec::new();
        if changed {
            meta.updated_at = now_iso();
            ops.push(WriteOp::UpdateSession(meta.clone()));
        }
        // A workspace set again (the same path too) is pinned as it is now.
        if let Some(pin) = &changes.workspace {
            let stored = pin.stored();
            meta.workspace_pin = Some(stored.clone());
            ops.push(WriteOp::SetWorkspacePin {
                session_id: self.id_arc.clone(),
                pin: stored,
            });
        }
        let previous = std::mem::replace(&mut self.meta, meta);
        let snapshot = self.snapshot();
        let event = Event::SessionSnapshot(SessionSnapshotEvent {
            snapshot: snapshot.clone(),
            messages: created.then(|| self.messages()),
        });
        if let Err(e) = self.emit(&[event], ops).await {
            self.meta = previous;
            return Err(e);
        }
        if changes.workspace.is_some() {
            self.workspace = changes.workspace;
        }
        Ok(snapshot)
    }

    async fn submit(&mut self, request: SubmitTurnRequest) -> Result<SubmitTurnResponse> {
        if let Some(panics) = self.ctx.faults.session_panics_on
            && panics(&request.content)
        {
            panic!("injected fault: session actor panics");
        }
        // A retry of a request whose answer was lost carries the same `lastSeenSeq`, which
        // the first attempt's own events have since passed: the key is checked first.
        if let Some(key) = &request.idempotency_key
            && let Some(turn_id) = self.idempotency.get(key)
        {
            return Ok(SubmitTurnResponse {
                turn_id: turn_id.clone(),
                queued: false,
            });
        }
        if let Some(last_seen) = request.last_seen_seq
            && last_seen < self.seq
        {
            return Err(Error::StateConflict {
                last_seen,
                current: self.seq,
            });
        }
        let turn = PendingTurn {
            turn_id: TurnId(new_turn_id()),
            writer_id: request.writer_id,
            client_id: request.client_id,
            content: request.content,
            mode: request.mode,
            overrides: request.overrides,
        };
        let row = TurnRow {
            turn_id: turn.turn_id.0.clone(),
            session_id: self.id.to_string(),
            writer_id: turn.writer_id.clone(),
            client_id: turn.client_id.clone(),
            content: turn.content.clone(),
            mode: turn.mode.as_str().to_owned(),
            metadata: request.metadata.map(|m| m.to_string()),
            overrides: turn
                .overrides
                .as_ref()
                .and_then(|o| serde_json::to_string(o).ok()),
            idempotency_key: request.idempotency_key.clone(),
            state: TurnState::Queued,
            queued_seq: self.seq + 1,
            created_at: now_iso(),
        };
        let event = Event::TurnQueued(TurnQueued {
            turn_id: turn.turn_id.clone(),
            writer_id: turn.writer_id.clone(),
            client_id: turn.client_id.clone(),
            queue_size: self.queue.len() + 1,
        });
        let response = SubmitTurnResponse {
            turn_id: turn.turn_id.clone(),
            queued: true,
        };
        let mut events = vec![event];
        let mut ops = vec![WriteOp::InsertTurn(row)];
        // A workspace moved or refused takes no turn (409 / 400 at once, not a failed turn).
        let workspace = self.workspace().await?;
        // An idle session starts the turn in the same commit as its queueing.
        let mut start = if self.active.is_none()
            && self.queue.is_empty()
            && self.owed.is_none()
            && !self.stopping
        {
            Some(self.prepare_start(turn.clone(), workspace)?)
        } else {
            None
        };
        if let Some(start) = start.as_mut() {
            events.append(&mut start.events);
            ops.append(&mut start.ops);
        }
        if let Err(e) = self.emit(&events, ops).await {
            if let Some(start) = start {
                start.abort();
            }
            return Err(e);
        }
        if let Some(key) = request.idempotency_key {
            self.idempotency.insert(key, turn.turn_id.clone());
        }
        match start {
            Some(start) => self.commit_start(start),
            None => {
                self.queue.push_back(turn);
                self.ctx.counters.add(Counter::QueuedTurns, 1);
            }
        }
        Ok(response)
    }

    /// Starts the next queued turn when none runs, once any owed turn ending is recorded; a
    /// turn that cannot be started gets its terminal event instead.
    async fn maybe_start_next(&mut self) {
        while self.active.is_none() && !self.stopping && self.pay_owed().await {
            let Some(turn) = self.queue.pop_front() else {
                return;
            };
            self.ctx.counters.sub(Counter::QueuedTurns, 1);
            match self.start_turn(turn.clone()).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::error!(session = %self.id, turn = %turn.turn_id, error = %e,
                        "could not start turn");
                    self.fail_unstarted(turn, &e).await;
                }
            }
        }
    }

    /// Records an owed turn ending if there is one and its retry is due; true when nothing
    /// is owed any more.
    async fn pay_owed(&mut self) -> bool {
        if self.retry_at.is_some() {
            return false;
        }
        let Some(owed) = self.owed.take() else {
            return true;
        };
        match self.emit(&owed.events, owed.ops.clone()).await {
            Ok(()) => {
                if let Some(reply) = owed.reply {
                    self.history.push(Arc::new(reply));
                }
                self.retry_delay = RETRY_FIRST;
                true
            }
            Err(e) => {
                tracing::warn!(session = %self.id, error = %e,
                    "still cannot record a turn's end; retrying in {:?}", self.retry_delay);
                self.owe(owed);
                false
            }
        }
    }

    /// Keeps `record` to commit later (after everything owed before it) and schedules the
    /// retry.
    fn owe(&mut self, record: OwedRecord) {
        match &mut self.owed {
            Some(owed) => {
                owed.events.extend(record.events);
                owed.ops.extend(record.ops);
                if record.reply.is_some() {
                    owed.reply = record.reply;
                }
            }
            None => self.owed = Some(record),
        }
        self.retry_at = Some(tokio::time::Instant::now() + self.retry_delay);
        self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
    }

    /// The join of the active turn's task, awaited first when the fault
    /// [`FaultHooks::join_before_reports_on`](crate::context::FaultHooks) picks its turn.
    async fn injected_join_before_reports(&mut self) -> Option<std::result::Result<(), JoinError>> {
        let picks = self.ctx.faults.join_before_reports_on?;
        let active = self.active.as_mut()?;
        if !picks(&active.turn.content) {
            return None;
        }
        Some(active.task.as_mut()?.await)
    }

    /// The active turn's task ended without reporting its result: it panicked or was
    /// aborted. The turn ends with `turn.error` and the queue moves on.
    async fn on_task_exit(&mut self, joined: std::result::Result<(), JoinError>) {
        // The task runs on another thread: it may have reported and returned between the
        // select's look at `updates` and its look at the join. What it reported comes first.
        let exited = self.active.as_ref().map(|a| a.turn.turn_id.clone());
        while self.active.as_ref().map(|a| &a.turn.turn_id) == exited.as_ref()
            && let Ok(update) = self.updates.try_recv()
        {
            self.on_update(update).await;
        }
        if self.active.as_ref().map(|a| &a.turn.turn_id) != exited.as_ref() {
            return;
        }
        let Some(active) = self.active.take() else {
            return;
        };
        let why = match joined {
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let text = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_owned());
                format!("it panicked: {text}")
            }
            Err(_) => "it was aborted".to_owned(),
            Ok(()) => "it ended without a result".to_owned(),
        };
        tracing::error!(session = %self.id, turn = %active.turn.turn_id, "turn task failed: {why}");
        let ending = TurnEnding::Failed {
            code: None,
            message: format!("The turn failed inside the daemon: {why}"),
            state: TurnState::Failed,
        };
        self.conclude(active, ending, Vec::new(), Vec::new()).await;
    }

    async fn start_turn(&mut self, turn: PendingTurn) -> Result<()> {
        let workspace = self.workspace().await?;
        let mut start = self.prepare_start(turn, workspace)?;
        let events = std::mem::take(&mut start.events);
        let ops = std::mem::take(&mut start.ops);
        match self.emit(&events, ops).await {
            Ok(()) => {
                self.commit_start(start);
                Ok(())
            }
            Err(e) => {
                start.abort();
                Err(e)
            }
        }
    }

    /// Builds the records of a turn start and launches the inference request at once, so
    /// the request overlaps the commit; the actor handles the task's deltas only after the
    /// commit (it awaits it), so event order is unaffected. The caller commits `events` and
    /// `ops`, then calls [`Self::commit_start`] (or [`TurnStartPlan::abort`] on failure).
    fn prepare_start(&mut self, turn: PendingTurn, workspace: Workspace) -> Result<TurnStartPlan> {
        let user = Arc::new(ChatMessage::text(Role::User, turn.content.clone()));
        let mut ops = vec![
            self.message_op(&user, &turn.turn_id, false)?,
            WriteOp::SetTurnState {
                turn_id: turn.turn_id.0.clone(),
                state: TurnState::Running,
                finished_at: None,
            },
        ];
        let mut meta = self.meta.clone();
        if meta.title.is_none() {
            meta.title = Some(title_from(&turn.content));
            ops.push(WriteOp::UpdateSession(meta.clone()));
        }
        let events = vec![Event::TurnStart(TurnStart {
            turn_id: turn.turn_id.clone(),
            writer_id: turn.writer_id.clone(),
            client_id: turn.client_id.clone(),
            mode: turn.mode,
            content: turn.content.clone(),
        })];
        let override_model = turn.overrides.as_ref().and_then(|o| o.model.clone());
        let uses_session_model = override_model.is_none();
        let model = override_model.unwrap_or_else(|| meta.model.clone());
        let mut history = Vec::with_capacity(self.history.len() + 1);
        history.extend(self.history.iter().cloned());
        history.push(user.clone());
        self.next_turn_no += 1;
        let turn_no = self.next_turn_no;
        let started = Instant::now();
        let plan = TurnPlan {
            model,
            history,
            mode: turn.mode,
            overrides: turn.overrides.clone(),
            workspace,
            // A turn whose task died took the memory with it: start afresh (the model reads
            // again before it writes).
            memory: self.memory.take().unwrap_or_default(),
            session: self.own.upgrade().map(|commands| SessionHandle {
                id: self.id.clone(),
                commands,
                touched: self.touched.clone(),
            }),
        };
        let task = tokio::spawn(run_turn(
            self.ctx.clone(),
            plan,
            turn_no,
            self.updates_tx.clone(),
        ));
        Ok(TurnStartPlan {
            events,
            ops,
            meta,
            user,
            active: ActiveTurn {
                turn,
                turn_no,
                uses_session_model,
                started,
                first_delta_at: None,
                text: String::new(),
                delta_count: 0,
                task: Some(task),
                tool_calls: 0,
                open_tools: Vec::new(),
                permission: None,
            },
        })
    }

    /// The session's workspace: `metadata.workspace` when set, else the daemon's. The
    /// directory was opened and pinned when the workspace was set (path and device:inode,
    /// stored with the session); a path that names another directory since is refused with
    /// `workspace-moved`, here and after an eviction or a restart, until a client sets the
    /// workspace again. Sessions stored before pins existed take theirs on first use.
    async fn workspace(&mut self) -> Result<Workspace> {
        let chosen = self
            .meta
            .metadata
            .as_deref()
            .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
            .and_then(|m| {
                m.get("workspace")
                    .and_then(|w| w.as_str())
                    .map(str::to_owned)
            });
        let Some(dir) = chosen else {
            let workspace = self
                .ctx
                .default_workspace
                .clone()
                .map_err(Error::WorkspaceRefused)?;
            workspace.ensure_in_place()?;
            return Ok(workspace);
        };
        if let Some(open) = self.workspace.as_ref().filter(|open| open.path == dir) {
            open.workspace.ensure_in_place()?;
            return Ok(open.workspace.clone());
        }
        let pinned = self
            .meta
            .workspace_pin
            .as_deref()
            .and_then(|stored| WorkspacePin::identity_of(stored, &dir));
        let protected = self.ctx.protected.clone();
        let path = std::path::PathBuf::from(&dir);
        let workspace = tokio::task::spawn_blocking(move || match pinned {
            Some(identity) => Workspace::reopen(&path, &protected, identity),
            None => Workspace::open(&path, &protected),
        })
        .await
        .map_err(|e| Error::Internal(format!("workspace task: {e}")))??;
        let pin = WorkspacePin {
            path: dir,
            workspace: workspace.clone(),
        };
        if pinned.is_none() {
            let stored = pin.stored();
            self.ctx
                .store
                .write(vec![WriteOp::SetWorkspacePin {
                    session_id: self.id_arc.clone(),
                    pin: stored.clone(),
                }])
                .await?;
            self.meta.workspace_pin = Some(stored);
        }
        self.workspace = Some(pin);
        Ok(workspace)
    }

    /// Makes a committed turn start the actor's state.
    fn commit_start(&mut self, start: TurnStartPlan) {
        self.meta = start.meta;
        self.history.push(start.user);
        self.active = Some(start.active);
        self.ctx.counters.add(Counter::ActiveTurns, 1);
    }

    /// Best effort terminal event for a turn whose start could not be recorded.
    async fn fail_unstarted(&mut self, turn: PendingTurn, error: &Error) {
        let code = match error {
            Error::StorageFull(_) => Some(TurnErrorCode::StorageFull),
            _ => None,
        };
        let event = Event::TurnError(TurnError {
            turn_id: turn.turn_id.clone(),
            writer_id: turn.writer_id,
            client_id: turn.client_id,
            message: error.to_string(),
            code,
        });
        let ops = vec![WriteOp::SetTurnState {
            turn_id: turn.turn_id.0,
            state: TurnState::Failed,
            finished_at: Some(now_iso()),
        }];
        let events = vec![event];
        if let Err(e) = self.emit(&events, ops.clone()).await {
            tracing::error!(session = %self.id, error = %e,
                "could not record a failed turn; retrying");
            self.owe(OwedRecord {
                events,
                ops,
                reply: None,
            });
        }
    }

    async fn on_update(&mut self, first: TurnUpdate) {
        let current = self.active.as_ref().map(|a| a.turn_no);
        let mut deltas = Vec::new();
        let mut other = None;
        let mut next = Some(first);
        // Consecutive deltas are folded into one commit; anything else ends the batch and is
        // handled after it, so the order of events is the order of updates.
        while let Some(update) = next.take() {
            match update {
                TurnUpdate::Delta { turn_no, delta } => {
                    if Some(turn_no) == current {
                        deltas.push(delta);
                    }
                }
                update => {
                    other = Some(update);
                    break;
                }
            }
            if deltas.len() >= MAX_DELTAS_PER_COMMIT {
                break;
            }
            next = self.updates.try_recv().ok();
        }
        if !deltas.is_empty() {
            self.emit_deltas(deltas).await;
        }
        let Some(update) = other else { return };
        // A turn that ended (cancelled, failed) may still have updates in flight: they are
        // dropped, except that a permission question is answered so nothing waits on it.
        let current = self.active.as_ref().map(|a| a.turn_no);
        match update {
            TurnUpdate::Delta { .. } => {}
            TurnUpdate::Resolved {
                turn_no,
                requested,
                model,
            } => {
                // The canonical id is stored with the turn's end (`conclude`), unless a
                // client picked another model meanwhile: that choice stands.
                if Some(turn_no) == current
                    && self.active.as_ref().is_some_and(|a| a.uses_session_model)
                    && self.meta.model == requested
                {
                    self.meta.model = model;
                }
            }
            TurnUpdate::Progress { turn_no, message } if Some(turn_no) == current => {
                if let Some(active) = &self.active {
                    let event = Event::TurnProgress(TurnProgress {
                        turn_id: active.turn.turn_id.clone(),
                        message,
                        extra: serde_json::Map::new(),
                    });
                    self.emit_or_fail(&[event], Vec::new()).await;
                }
            }
            TurnUpdate::Messages { turn_no, messages } if Some(turn_no) == current => {
                self.record_messages(messages).await;
            }
            TurnUpdate::ToolStart {
                turn_no,
                id,
                name,
                args,
            } if Some(turn_no) == current => self.tool_started(id, name, args).await,
            TurnUpdate::Permission {
                turn_no,
                ask,
                reply,
            } => {
                if Some(turn_no) == current {
                    self.ask_permission(ask, reply).await;
                } else {
                    let _ = reply.send(Verdict {
                        allowed: false,
                        by: "cancel".into(),
                    });
                }
            }
            TurnUpdate::ToolEnd { turn_no, end } if Some(turn_no) == current => {
                self.tool_ended(end).await;
            }
            TurnUpdate::Finished {
                turn_no,
                result,
                memory,
            } => {
                if Some(turn_no) != current {
                    return;
                }
                self.memory = Some(memory);
                if let Some(active) = self.active.take() {
                    let ending = match result {
                        Ok(completion) => TurnEnding::Done(completion),
                        Err(e) => TurnEnding::Failed {
                            code: e.code(),
                            message: e.to_string(),
                            state: TurnState::Failed,
                        },
                    };
                    self.conclude(active, ending, Vec::new(), Vec::new()).await;
                }
            }
            // Late updates of a turn that already ended.
            TurnUpdate::Progress { .. }
            | TurnUpdate::Messages { .. }
            | TurnUpdate::ToolStart { .. }
            | TurnUpdate::ToolEnd { .. } => {}
        }
    }

    /// Emits `events` with `ops`; a failure ends the active turn (as a failed delta commit
    /// does).
    async fn emit_or_fail(&mut self, events: &[Event], ops: Vec<WriteOp>) -> bool {
        match self.emit(events, ops).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(session = %self.id, error = %e, "could not record a turn step; failing turn");
                self.fail_active(&e).await;
                false
            }
        }
    }

    /// Ends the active turn because its events or messages could not be stored.
    async fn fail_active(&mut self, e: &Error) {
        if let Some(active) = self.active.take() {
            let code = matches!(e, Error::StorageFull(_)).then_some(TurnErrorCode::StorageFull);
            let ending = TurnEnding::Failed {
                code,
                message: e.to_string(),
                state: TurnState::Failed,
            };
            self.conclude(active, ending, Vec::new(), Vec::new()).await;
        }
    }

    /// Appends messages of the running turn (a round's calls, a note to the model) to the
    /// history. The round's text is in the message, so the turn's reply starts afresh.
    async fn record_messages(&mut self, messages: Vec<ChatMessage>) {
        let Some(turn_id) = self.active.as_ref().map(|a| a.turn.turn_id.clone()) else {
            return;
        };
        let mut ops = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            let idx = (self.history.len() + i) as u64;
            match self.message_op_at(idx, message, &turn_id, false) {
                Ok(op) => ops.push(op),
                Err(e) => tracing::error!(error = %e, "could not encode a message"),
            }
        }
        match self.ctx.store.write(ops).await {
            Ok(()) => {
                self.history.extend(messages.into_iter().map(Arc::new));
                if let Some(active) = self.active.as_mut() {
                    active.text.clear();
                }
            }
            Err(e) => {
                tracing::error!(session = %self.id, error = %e, "could not record messages");
                self.fail_active(&e).await;
            }
        }
    }

    async fn tool_started(&mut self, id: String, name: String, args: serde_json::Value) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        active.tool_calls += 1;
        active.open_tools.push((id.clone(), name.clone()));
        self.meta.tool_call_count += 1;
        let event = Event::ToolStart(ToolStart {
            turn_id: active.turn.turn_id.clone(),
            name,
            id,
            args,
        });
        let ops = vec![WriteOp::UpdateSession(self.meta.clone())];
        self.emit_or_fail(&[event], ops).await;
    }

    async fn tool_ended(&mut self, end: ToolEnded) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        active.open_tools.retain(|(id, _)| *id != end.id);
        let ok = end.result.get("ok").and_then(serde_json::Value::as_bool) == Some(true);
        let outcome = match (&end.approved_by, ok) {
            (_, true) => "ok",
            (None, false) => "denied",
            (Some(_), false) => "error",
        };
        self.ctx
            .metrics
            .tool_calls
            .get_or_create(&crate::metrics::ToolLabels {
                // A name the model made up is `unknown`: labels come from a bounded set.
                tool: crate::agent::tools::spec(&end.name).map_or("unknown", |t| t.name),
                outcome,
            })
            .inc();
        let turn_id = active.turn.turn_id.clone();
        let event = Event::ToolEnd(ToolEnd {
            turn_id: turn_id.clone(),
            name: end.name,
            id: end.id,
            result: end.result,
            approved_by: end.approved_by,
            duration_ms: Some(end.duration_ms),
        });
        let op = match self.message_op(&end.message, &turn_id, false) {
            Ok(op) => op,
            Err(e) => {
                tracing::error!(error = %e, "could not encode a tool message");
                return;
            }
        };
        if self.emit_or_fail(&[event], vec![op]).await {
            self.history.push(Arc::new(end.message));
        }
    }

    /// A call needs approval: a grant answers at once; else `permission.request` goes out
    /// and the answer waits for a client, the timeout or the turn's end.
    async fn ask_permission(&mut self, mut ask: PermissionAsk, reply: oneshot::Sender<Verdict>) {
        let granted = ask
            .grant_key
            .as_ref()
            .is_some_and(|key| self.grants.contains(key));
        let unchanged = ask.grant_key.as_ref().is_none_or(|key| {
            ask.guard.is_none() || self.grant_guards.get(key) == ask.guard.as_ref()
        });
        if granted && !unchanged {
            ask.summary.push_str(
                " (asks again: git's configuration, hooks or info changed since the grant, or \
                 the daemon restarted since)",
            );
        }
        if granted && unchanged {
            self.count_decision("allow", "grant");
            let _ = reply.send(Verdict {
                allowed: true,
                by: "grant".into(),
            });
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let request_id = crate::ids::new_permission_id();
        let event = Event::PermissionRequest(PermissionRequest {
            turn_id: active.turn.turn_id.clone(),
            request_id: request_id.clone(),
            tool_name: ask.tool_name.clone(),
            args: ask.args,
            summary: Some(ask.summary),
            diff: ask.diff,
        });
        active.permission = Some(PendingPermission {
            request_id,
            tool_name: ask.tool_name,
            grant_key: ask.grant_key,
            guard: ask.guard,
            reply,
            deadline: tokio::time::Instant::now() + self.ctx.agent.permission_timeout,
        });
        self.emit_or_fail(&[event], Vec::new()).await;
    }

    fn count_decision(&self, decision: &str, by: &str) {
        self.ctx
            .metrics
            .permission_decisions
            .get_or_create(&crate::metrics::DecisionLabels {
                decision: decision.to_owned(),
                decided_by: crate::agent::permissions::decider_label(by),
            })
            .inc();
    }

    /// Decides the pending request: emits `permission.resolved`, adds a grant when asked
    /// to, and lets the call go on.
    async fn decide_permission(&mut self, verdict: Verdict, remember: Option<Remember>) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(pending) = active.permission.take() else {
            return;
        };
        let event = Event::PermissionResolved(PermissionResolved {
            turn_id: active.turn.turn_id.clone(),
            request_id: pending.request_id.clone(),
            decision: if verdict.allowed {
                Decision::Allow
            } else {
                Decision::Deny
            },
            decided_by: verdict.by.clone(),
        });
        let mut ops = Vec::new();
        let granted = match (&pending.grant_key, remember, verdict.allowed) {
            (Some(key), Some(Remember::Session), true) if !self.grants.contains(key) => {
                Some(key.clone())
            }
            _ => None,
        };
        if let Some(key) = &granted {
            self.grants.push(key.clone());
            ops.push(self.grants_op());
        }
        // A grant for git holds for the repository as it is now.
        if let (Some(key), Some(guard), Some(Remember::Session), true) =
            (&pending.grant_key, pending.guard, remember, verdict.allowed)
        {
            self.grant_guards.insert(key.clone(), guard);
        }
        self.note_decided(pending.request_id);
        self.count_decision(if verdict.allowed { "allow" } else { "deny" }, &verdict.by);
        tracing::info!(session = %self.id, tool = %pending.tool_name, allowed = verdict.allowed,
            by = %verdict.by, "permission decided");
        if self.emit_or_fail(&[event], ops).await {
            let _ = pending.reply.send(verdict);
        } else if granted.is_some() {
            self.grants.pop();
        }
    }

    fn note_decided(&mut self, request_id: String) {
        if self.decided.len() == DECIDED_KEPT {
            self.decided.pop_front();
        }
        self.decided.push_back(request_id);
    }

    /// Stores the grants as they are now.
    fn grants_op(&self) -> WriteOp {
        WriteOp::SetGrants {
            session_id: self.id_arc.clone(),
            grants: serde_json::to_string(&self.grants).unwrap_or_else(|_| "[]".into()),
        }
    }

    /// Revokes one grant, or all of them when `grant` is `None`.
    async fn revoke_grants(&mut self, grant: Option<String>) -> Result<Vec<String>> {
        let previous = self.grants.clone();
        match &grant {
            Some(g) if !self.grants.contains(g) => return Err(Error::GrantNotFound(g.clone())),
            Some(g) => self.grants.retain(|x| x != g),
            None => self.grants.clear(),
        }
        let kept = &self.grants;
        self.grant_guards.retain(|key, _| kept.contains(key));
        if let Err(e) = self.ctx.store.write(vec![self.grants_op()]).await {
            self.grants = previous;
            return Err(e);
        }
        Ok(self.grants.clone())
    }

    async fn emit_deltas(&mut self, deltas: Vec<Delta>) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.first_delta_at.is_none() {
            let now = Instant::now();
            active.first_delta_at = Some(now);
            self.ctx
                .metrics
                .first_token_seconds
                .observe(now.duration_since(active.started).as_secs_f64());
        }
        let turn_id = active.turn.turn_id.clone();
        let mut content = String::new();
        let count = deltas.len() as u64;
        // Deltas that arrived together become one event per run of the same kind: the text
        // is the same, clients and the store see one frame instead of dozens under load,
        // and nothing waits for it (only what was already queued is joined).
        let mut events: Vec<Event> = Vec::new();
        for delta in deltas {
            let (thinking, text) = match delta {
                Delta::Content(text) => {
                    content.push_str(&text);
                    (false, text)
                }
                Delta::Reasoning(text) => (true, text),
            };
            let last = if self.ctx.faults.deltas_kept_apart {
                None
            } else {
                events.last_mut()
            };
            match (last, thinking) {
                (Some(Event::TurnToken(last)), false) | (Some(Event::TurnThinking(last)), true) => {
                    last.text.push_str(&text);
                }
                _ => {
                    let payload = TurnText {
                        turn_id: turn_id.clone(),
                        text,
                    };
                    events.push(if thinking {
                        Event::TurnThinking(payload)
                    } else {
                        Event::TurnToken(payload)
                    });
                }
            }
        }
        match self.emit(&events, Vec::new()).await {
            // Only what clients were sent becomes part of the reply.
            Ok(()) => {
                if let Some(active) = self.active.as_mut() {
                    active.text.push_str(&content);
                    active.delta_count += count;
                }
            }
            Err(e) => {
                tracing::error!(session = %self.id, error = %e, "could not record deltas; failing turn");
                self.fail_active(&e).await;
            }
        }
    }

    /// Ends `active` (already taken out of `self.active`): stores the reply (partial on
    /// failure), emits `events` + the terminal event + `session.updated` in one commit.
    async fn conclude(
        &mut self,
        mut active: ActiveTurn,
        ending: TurnEnding,
        mut events: Vec<Event>,
        mut ops: Vec<WriteOp>,
    ) {
        if let Some(task) = &active.task {
            task.abort();
            self.ctx.counters.sub(Counter::ActiveTurns, 1);
        }
        // No prompt stays open and no call stays running in any client's view.
        let (by, why) = match &ending {
            TurnEnding::Failed {
                code: Some(TurnErrorCode::Cancelled),
                ..
            } => ("cancel", "the turn was cancelled".to_owned()),
            TurnEnding::Failed {
                code: Some(TurnErrorCode::Interrupted),
                ..
            } => (
                "interrupted",
                "the daemon stopped during the call".to_owned(),
            ),
            TurnEnding::Failed { message, .. } => ("error", format!("the turn failed: {message}")),
            TurnEnding::Done(_) => ("error", "the turn ended".to_owned()),
        };
        if let Some(pending) = active.permission.take() {
            events.push(Event::PermissionResolved(PermissionResolved {
                turn_id: active.turn.turn_id.clone(),
                request_id: pending.request_id.clone(),
                decision: Decision::Deny,
                decided_by: by.to_owned(),
            }));
            self.count_decision("deny", by);
            self.note_decided(pending.request_id);
        }
        for (id, name) in active.open_tools.drain(..) {
            events.push(Event::ToolEnd(ToolEnd {
                turn_id: active.turn.turn_id.clone(),
                name,
                id,
                result: json!({"ok": false, "error": format!("not finished: {why}")}),
                approved_by: None,
                duration_ms: None,
            }));
        }
        let now = now_iso();
        let turn = &active.turn;
        let (reply, partial) = match &ending {
            TurnEnding::Done(_) => (Some(active.text.clone()), false),
            TurnEnding::Failed { .. } => {
                (Some(active.text.clone()).filter(|t| !t.is_empty()), true)
            }
        };
        let reply = reply.map(|text| ChatMessage::text(Role::Assistant, text));
        if let Some(message) = &reply {
            match self.message_op(message, &turn.turn_id, partial) {
                Ok(op) => ops.push(op),
                Err(e) => tracing::error!(error = %e, "could not encode reply"),
            }
        }
        let error_code = match &ending {
            TurnEnding::Failed { code, .. } => *code,
            TurnEnding::Done(_) => None,
        };
        let (state, terminal) = match ending {
            TurnEnding::Done(completion) => (
                TurnState::Done,
                Event::TurnDone(TurnDone {
                    turn_id: turn.turn_id.clone(),
                    writer_id: turn.writer_id.clone(),
                    client_id: turn.client_id.clone(),
                    stats: self.stats(&active, &completion),
                }),
            ),
            TurnEnding::Failed {
                code,
                message,
                state,
            } => (
                state,
                Event::TurnError(TurnError {
                    turn_id: turn.turn_id.clone(),
                    writer_id: turn.writer_id.clone(),
                    client_id: turn.client_id.clone(),
                    message,
                    code,
                }),
            ),
        };
        ops.push(WriteOp::SetTurnState {
            turn_id: turn.turn_id.0.clone(),
            state,
            finished_at: Some(now.clone()),
        });
        if error_code == Some(TurnErrorCode::StorageFull) {
            // A turn the full store ended leaves no token events behind, even when its end
            // fits as it is: they are what filled it, its text is in the reply stored here,
            // and the turns queued behind it need the room.
            ops.insert(
                0,
                WriteOp::DropTurnDeltas {
                    session_id: self.id_arc.clone(),
                    turn_id: turn.turn_id.0.clone(),
                },
            );
        }
        events.push(terminal);
        let previous_updated_at = std::mem::replace(&mut self.meta.updated_at, now);
        ops.push(WriteOp::UpdateSession(self.meta.clone()));
        events.push(Event::SessionUpdated(SessionUpdated {
            snapshot: self.snapshot(),
        }));
        // The turn has ended, recorded or not yet.
        self.ctx.metrics.turn_ended(
            outcome_name(state),
            error_code.map(TurnErrorCode::as_str),
            active.started.elapsed(),
        );
        // Whatever is owed goes first: terminal events stay in turn order.
        let result = match self.owed {
            Some(_) => Err(Error::StorageFull(
                "an earlier turn's end is not recorded yet".into(),
            )),
            None => self.emit(&events, ops.clone()).await,
        };
        let result = match result {
            Err(Error::StorageFull(_)) if error_code != Some(TurnErrorCode::StorageFull) => {
                // The turn's own token events are the likely space hog and its text is in
                // the reply being stored: drop them in the same commit to make room for its
                // end (whenever that commit happens).
                ops.insert(
                    0,
                    WriteOp::DropTurnDeltas {
                        session_id: self.id_arc.clone(),
                        turn_id: turn.turn_id.0.clone(),
                    },
                );
                match self.owed {
                    Some(_) => result,
                    None => {
                        tracing::warn!(session = %self.id, turn = %turn.turn_id,
                            "store full; dropping the turn's token events to record its end");
                        self.emit(&events, ops.clone()).await
                    }
                }
            }
            other => other,
        };
        match result {
            Ok(()) => {
                if let Some(message) = reply {
                    self.history.push(Arc::new(message));
                }
            }
            Err(e) => {
                self.meta.updated_at = previous_updated_at;
                tracing::error!(session = %self.id, turn = %turn.turn_id, error = %e,
                    "could not record the end of a turn; retrying (a restart meanwhile \
                     reports it interrupted)");
                self.owe(OwedRecord { events, ops, reply });
            }
        }
    }

    fn stats(&self, active: &ActiveTurn, completion: &Completion) -> TurnStats {
        let end = Instant::now();
        let elapsed = end.duration_since(active.started).as_secs_f64();
        let estimated_completion = (active.text.len() as u64)
            .div_ceil(4)
            .max(active.delta_count);
        let prompt_chars: usize = self
            .history
            .iter()
            .filter_map(|m| m.content.as_ref().map(String::len))
            .sum();
        let (prompt_tokens, completion_tokens) = match completion.usage {
            Some(u) => (u.prompt_tokens, u.completion_tokens),
            None => ((prompt_chars as u64).div_ceil(4), estimated_completion),
        };
        let generating = active
            .first_delta_at
            .map(|t| end.duration_since(t).as_secs_f64())
            .filter(|s| *s > 0.0)
            .unwrap_or(elapsed);
        TurnStats {
            tokens: completion_tokens,
            prompt_tokens,
            completion_tokens,
            tool_calls: active.tool_calls,
            elapsed,
            speed: if generating > 0.0 {
                completion_tokens as f64 / generating
            } else {
                0.0
            },
            first_token_latency_ms: active
                .first_delta_at
                .map(|t| t.duration_since(active.started).as_secs_f64() * 1000.0),
        }
    }

    /// Records what the running turn reported before now (a `tool.start` still queued, say):
    /// whatever ends the turn then closes it, so no call or prompt is left without its end.
    async fn flush_updates(&mut self) {
        while let Ok(update) = self.updates.try_recv() {
            self.on_update(update).await;
        }
    }

    async fn cancel(&mut self, request: CancelRequest) -> Result<CancelResponse> {
        self.flush_updates().await;
        let CancelRequest { turn_id, writer_id } = request;
        let (removed, active_hit) = match (&turn_id, &writer_id) {
            (None, None) => (Vec::new(), false),
            (Some(t), w) => {
                let removed = self.take_queued(|q| &q.turn_id == t);
                let hit = self.active.as_ref().is_some_and(|a| {
                    &a.turn.turn_id == t || w.as_deref() == Some(a.turn.writer_id.as_str())
                });
                (removed, hit)
            }
            (None, Some(w)) => {
                let removed = self.take_queued(|q| &q.writer_id == w);
                let hit = self.active.as_ref().is_some_and(|a| &a.turn.writer_id == w);
                (removed, hit)
            }
        };
        let response = CancelResponse {
            ok: true,
            cancelled: removed.len() + usize::from(active_hit),
            cancelled_queued: removed.len(),
            cancelled_active: active_hit,
        };
        if response.cancelled == 0 {
            return Ok(response);
        }
        let leading = SessionCancelled {
            cancelled: response.cancelled,
            turn_id,
            writer_id,
        };
        self.emit_cancellation(leading, removed, active_hit, "Turn cancelled")
            .await;
        Ok(response)
    }

    fn take_queued(&mut self, matches: impl Fn(&PendingTurn) -> bool) -> Vec<PendingTurn> {
        let (removed, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|q| matches(q));
        self.queue = kept;
        self.ctx.counters.sub(Counter::QueuedTurns, removed.len());
        removed.into()
    }

    /// Emits `session.cancelled`, then a `cancelled` `turn.error` for each removed queued turn
    /// and for the active turn when `active_hit`.
    async fn emit_cancellation(
        &mut self,
        leading: SessionCancelled,
        removed: Vec<PendingTurn>,
        active_hit: bool,
        message: &str,
    ) {
        let mut events = vec![Event::SessionCancelled(leading)];
        let mut ops = Vec::new();
        let now = now_iso();
        for turn in removed {
            ops.push(WriteOp::SetTurnState {
                turn_id: turn.turn_id.0.clone(),
                state: TurnState::Cancelled,
                finished_at: Some(now.clone()),
            });
            events.push(Event::TurnError(TurnError {
                turn_id: turn.turn_id,
                writer_id: turn.writer_id,
                client_id: turn.client_id,
                message: message.to_owned(),
                code: Some(TurnErrorCode::Cancelled),
            }));
        }
        let active = if active_hit { self.active.take() } else { None };
        match active {
            Some(active) => {
                let ending = TurnEnding::Failed {
                    code: Some(TurnErrorCode::Cancelled),
                    message: message.to_owned(),
                    state: TurnState::Cancelled,
                };
                self.conclude(active, ending, events, ops).await;
            }
            None => {
                events.push(Event::SessionUpdated(SessionUpdated {
                    snapshot: self.snapshot(),
                }));
                if let Err(e) = self.emit(&events, ops).await {
                    tracing::error!(session = %self.id, error = %e, "could not record cancellation");
                }
            }
        }
    }

    async fn resolve_permission(
        &mut self,
        request_id: String,
        request: ResolvePermissionRequest,
    ) -> Result<ResolvePermissionResponse> {
        // Checked first: a refused answer changes nothing, whatever the request's state.
        let decided_by = crate::agent::permissions::client_decider(&request.decided_by)
            .map_err(|e| Error::invalid("decidedBy", e))?;
        let pending = self
            .active
            .as_ref()
            .and_then(|a| a.permission.as_ref())
            .is_some_and(|p| p.request_id == request_id);
        if !pending {
            // Decided since this actor loaded the session, or before (its log says so).
            let decided = self.decided.contains(&request_id)
                || self
                    .ctx
                    .store
                    .permission_was_decided(self.id.to_string(), request_id.clone())
                    .await?;
            return Err(if decided {
                Error::PermissionConflict(request_id)
            } else {
                Error::PermissionNotFound(request_id)
            });
        }
        let verdict = Verdict {
            allowed: request.decision == Decision::Allow,
            by: decided_by,
        };
        self.decide_permission(verdict, request.remember).await;
        Ok(ResolvePermissionResponse {
            ok: true,
            conflict: false,
            message: None,
        })
    }

    async fn delete(&mut self) -> Result<()> {
        self.flush_updates().await;
        // Its background processes go with it.
        for id in std::mem::take(&mut self.processes) {
            let _ = self
                .ctx
                .runner
                .kill(id, opta_protocol::KillSignal::Kill)
                .await;
        }
        let removed = self.take_queued(|_| true);
        let active_hit = self.active.is_some();
        let cancelled = removed.len() + usize::from(active_hit);
        if cancelled > 0 {
            let leading = SessionCancelled {
                cancelled,
                turn_id: None,
                writer_id: None,
            };
            self.emit_cancellation(leading, removed, active_hit, "Session deleted")
                .await;
        }
        self.ctx
            .store
            .write(vec![WriteOp::DeleteSession {
                session_id: self.id.to_string(),
            }])
            .await
    }

    async fn shutdown(&mut self) {
        self.stopping = true;
        self.flush_updates().await;
        // A last try for an owed ending; if it fails, the restart reports the turn from the
        // store's state (interrupted, or queued again).
        self.retry_at = None;
        self.pay_owed().await;
        if let Some(active) = self.active.take() {
            let ending = TurnEnding::Failed {
                code: Some(TurnErrorCode::Interrupted),
                message: "The daemon stopped while this turn was running".into(),
                state: TurnState::Interrupted,
            };
            self.conclude(active, ending, Vec::new(), Vec::new()).await;
        }
    }

    /// Reports turns that were running when the daemon died and re-queues queued ones.
    async fn recover(
        &mut self,
        open_turns: Vec<TurnRow>,
        mut running: HashMap<String, RunningTrace>,
    ) {
        for row in open_turns {
            let turn = PendingTurn {
                turn_id: TurnId(row.turn_id.clone()),
                writer_id: row.writer_id,
                client_id: row.client_id,
                content: row.content,
                mode: Mode::parse(&row.mode).unwrap_or(Mode::Chat),
                overrides: row
                    .overrides
                    .as_deref()
                    .and_then(|o| serde_json::from_str(o).ok()),
            };
            match row.state {
                TurnState::Running => {
                    let trace = running.remove(&row.turn_id).unwrap_or_default();
                    // A prompt some client may still show: answered, so none stays stale.
                    let events: Vec<Event> = trace
                        .open_permission
                        .iter()
                        .map(|request_id| {
                            Event::PermissionResolved(PermissionResolved {
                                turn_id: turn.turn_id.clone(),
                                request_id: request_id.clone(),
                                decision: Decision::Deny,
                                decided_by: "interrupted".into(),
                            })
                        })
                        .collect();
                    let active = ActiveTurn {
                        turn,
                        turn_no: 0,
                        uses_session_model: false,
                        started: Instant::now(),
                        first_delta_at: None,
                        text: trace.text,
                        delta_count: 0,
                        task: None,
                        tool_calls: 0,
                        open_tools: trace.open_tools,
                        permission: None,
                    };
                    let ending = TurnEnding::Failed {
                        code: Some(TurnErrorCode::Interrupted),
                        message: "The daemon stopped while this turn was running".into(),
                        state: TurnState::Interrupted,
                    };
                    self.conclude(active, ending, events, Vec::new()).await;
                }
                TurnState::Queued => {
                    self.queue.push_back(turn);
                    self.ctx.counters.add(Counter::QueuedTurns, 1);
                }
                TurnState::Done
                | TurnState::Failed
                | TurnState::Cancelled
                | TurnState::Interrupted => {}
            }
        }
    }
}

impl Drop for SessionActor {
    /// Runs however the actor ends, a panic included: its turn task stops and the counters
    /// forget it.
    fn drop(&mut self) {
        if let Some(active) = self.active.take()
            && let Some(task) = active.task
        {
            task.abort();
            self.ctx.counters.sub(Counter::ActiveTurns, 1);
        }
        self.ctx
            .counters
            .sub(Counter::QueuedTurns, self.queue.len());
        self.drop_channel();
        self.ctx.counters.sub(Counter::Sessions, 1);
    }
}

/// The `outcome` label of a turn that ended in `state`.
fn outcome_name(state: TurnState) -> &'static str {
    match state {
        TurnState::Done => "done",
        TurnState::Cancelled => "cancelled",
        TurnState::Interrupted => "interrupted",
        TurnState::Failed | TurnState::Queued | TurnState::Running => "failed",
    }
}

/// Resolves when the running turn's task ends; never without one.
async fn join_running(task: Option<&mut JoinHandle<()>>) -> std::result::Result<(), JoinError> {
    match task {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// Resolves at `at`; never without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// First line of the first message, trimmed to 80 characters.
fn title_from(content: &str) -> String {
    let line = content
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let mut title: String = line.chars().take(80).collect();
    if line.chars().count() > 80 {
        title.push('…');
    }
    title
}

#[cfg(test)]
mod tests {
    use super::title_from;

    #[test]
    fn titles() {
        assert_eq!(title_from("\n  hello world \nmore"), "hello world");
        assert_eq!(title_from(&"x".repeat(100)).chars().count(), 81);
        assert_eq!(title_from(""), "");
    }
}
