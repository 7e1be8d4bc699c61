//! The event envelope and every event payload of the v3 protocol.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{Seq, SessionId, TurnId};
use crate::model::{ChatMessage, Mode, SessionSnapshot};

/// The `v` field every envelope carries.
pub const PROTOCOL_VERSION: &str = "3";

/// One event as a client receives it: the payload plus routing and ordering fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Always `"3"`.
    pub v: String,
    /// The event name (`event`) and its `payload`.
    #[serde(flatten)]
    pub event: Event,
    /// The daemon instance that emitted the event.
    pub daemon_id: String,
    /// The session the event belongs to.
    pub session_id: SessionId,
    /// Position in the session's event log.
    pub seq: Seq,
    /// Emission time, ISO-8601 UTC with milliseconds.
    pub ts: String,
}

/// A borrowed [`Envelope`] for serialising without copying the event or the ids (the daemon
/// serialises every event once, tokens included). Same JSON as [`Envelope`].
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvelopeRef<'a> {
    /// Always `"3"`.
    pub v: &'a str,
    /// The event name and payload.
    #[serde(flatten)]
    pub event: &'a Event,
    /// The daemon instance that emitted the event.
    pub daemon_id: &'a str,
    /// The session the event belongs to.
    pub session_id: &'a SessionId,
    /// Position in the session's event log.
    pub seq: Seq,
    /// Emission time.
    pub ts: &'a str,
}

/// An event name and its payload; serialises as `"event": ..., "payload": {...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "event", content = "payload")]
pub enum Event {
    /// The session was created or re-opened.
    #[serde(rename = "session.snapshot")]
    SessionSnapshot(SessionSnapshotEvent),
    /// A turn was accepted into the queue.
    #[serde(rename = "turn.queued")]
    TurnQueued(TurnQueued),
    /// The agent loop started a turn.
    #[serde(rename = "turn.start")]
    TurnStart(TurnStart),
    /// A model text delta.
    #[serde(rename = "turn.token")]
    TurnToken(TurnText),
    /// A reasoning delta.
    #[serde(rename = "turn.thinking")]
    TurnThinking(TurnText),
    /// A tool call began.
    #[serde(rename = "tool.start")]
    ToolStart(ToolStart),
    /// A tool call ended.
    #[serde(rename = "tool.end")]
    ToolEnd(ToolEnd),
    /// A tool waits for approval.
    #[serde(rename = "permission.request")]
    PermissionRequest(PermissionRequest),
    /// A permission request was decided.
    #[serde(rename = "permission.resolved")]
    PermissionResolved(PermissionResolved),
    /// Intermediate status of a turn.
    #[serde(rename = "turn.progress")]
    TurnProgress(TurnProgress),
    /// A turn finished.
    #[serde(rename = "turn.done")]
    TurnDone(TurnDone),
    /// A turn failed or was cancelled.
    #[serde(rename = "turn.error")]
    TurnError(TurnError),
    /// Session metadata changed after a turn.
    #[serde(rename = "session.updated")]
    SessionUpdated(SessionUpdated),
    /// A cancel removed turns.
    #[serde(rename = "session.cancelled")]
    SessionCancelled(SessionCancelled),
    /// Output of a background process.
    #[serde(rename = "background.output")]
    BackgroundOutput(BackgroundOutput),
    /// A background process changed state.
    #[serde(rename = "background.status")]
    BackgroundStatus(BackgroundStatus),
}

impl Event {
    /// Every event name this version knows; a client skips envelopes of other names (a newer
    /// daemon's events) instead of failing on them.
    pub const NAMES: [&'static str; 16] = [
        "session.snapshot",
        "turn.queued",
        "turn.start",
        "turn.token",
        "turn.thinking",
        "tool.start",
        "tool.end",
        "permission.request",
        "permission.resolved",
        "turn.progress",
        "turn.done",
        "turn.error",
        "session.updated",
        "session.cancelled",
        "background.output",
        "background.status",
    ];

    /// The wire name of the event (`turn.token`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Event::SessionSnapshot(_) => "session.snapshot",
            Event::TurnQueued(_) => "turn.queued",
            Event::TurnStart(_) => "turn.start",
            Event::TurnToken(_) => "turn.token",
            Event::TurnThinking(_) => "turn.thinking",
            Event::ToolStart(_) => "tool.start",
            Event::ToolEnd(_) => "tool.end",
            Event::PermissionRequest(_) => "permission.request",
            Event::PermissionResolved(_) => "permission.resolved",
            Event::TurnProgress(_) => "turn.progress",
            Event::TurnDone(_) => "turn.done",
            Event::TurnError(_) => "turn.error",
            Event::SessionUpdated(_) => "session.updated",
            Event::SessionCancelled(_) => "session.cancelled",
            Event::BackgroundOutput(_) => "background.output",
            Event::BackgroundStatus(_) => "background.status",
        }
    }

    /// True for streaming deltas, which durable history may drop once their turn has ended.
    pub fn is_stream_delta(&self) -> bool {
        matches!(self, Event::TurnToken(_) | Event::TurnThinking(_))
    }

    /// True for the events after which a client stops waiting on a turn.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Event::TurnDone(_) | Event::TurnError(_))
    }

    /// The turn this event belongs to, if any.
    pub fn turn_id(&self) -> Option<&TurnId> {
        match self {
            Event::TurnQueued(p) => Some(&p.turn_id),
            Event::TurnStart(p) => Some(&p.turn_id),
            Event::TurnToken(p) | Event::TurnThinking(p) => Some(&p.turn_id),
            Event::ToolStart(p) => Some(&p.turn_id),
            Event::ToolEnd(p) => Some(&p.turn_id),
            Event::PermissionRequest(p) => Some(&p.turn_id),
            Event::PermissionResolved(p) => Some(&p.turn_id),
            Event::TurnProgress(p) => Some(&p.turn_id),
            Event::TurnDone(p) => Some(&p.turn_id),
            Event::TurnError(p) => Some(&p.turn_id),
            Event::SessionSnapshot(_)
            | Event::SessionUpdated(_)
            | Event::SessionCancelled(_)
            | Event::BackgroundOutput(_)
            | Event::BackgroundStatus(_) => None,
        }
    }
}

/// Payload of `session.snapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionSnapshotEvent {
    /// The session's metadata.
    pub snapshot: SessionSnapshot,
    /// The whole conversation history, only when the session was just created: a re-open
    /// leaves it out (clients fetch it with `GET /v3/sessions/:id`), so re-opening a long
    /// session does not store its history again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
}

/// Payload of `turn.queued`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TurnQueued {
    /// The accepted turn.
    pub turn_id: TurnId,
    /// The writer that submitted it.
    pub writer_id: String,
    /// The client that submitted it.
    pub client_id: String,
    /// Turns waiting in the queue, this one included (the running turn is not counted).
    pub queue_size: usize,
}

/// Payload of `turn.start`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TurnStart {
    /// The turn that started.
    pub turn_id: TurnId,
    /// Its writer.
    pub writer_id: String,
    /// Its client.
    pub client_id: String,
    /// The agent mode it runs in.
    pub mode: Mode,
    /// The user's message (beyond the contract's minimum: lets other clients show what was
    /// asked).
    #[serde(default)]
    pub content: String,
}

/// Payload of `turn.token` and `turn.thinking`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TurnText {
    /// The turn being streamed.
    pub turn_id: TurnId,
    /// The delta.
    pub text: String,
}

/// Payload of `tool.start`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolStart {
    /// The running turn.
    pub turn_id: TurnId,
    /// Tool name.
    pub name: String,
    /// Tool call id.
    pub id: String,
    /// Tool arguments.
    pub args: Value,
}

/// Payload of `tool.end`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolEnd {
    /// The running turn.
    pub turn_id: TurnId,
    /// Tool name.
    pub name: String,
    /// Tool call id.
    pub id: String,
    /// Tool result: `{ok: true, output}` or `{ok: false, error}`.
    pub result: Value,
    /// How the call was approved: `mode`, `grant`, `dangerous`, or the deciding client's
    /// `decidedBy`; absent for a call that did not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    /// How long the call took, approval included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// Payload of `permission.request`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PermissionRequest {
    /// The running turn.
    pub turn_id: TurnId,
    /// `perm_...` id to answer with.
    pub request_id: String,
    /// The tool asking.
    pub tool_name: String,
    /// Its arguments.
    pub args: Value,
    /// One line for people: "write 120 bytes to src/main.rs", or the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// A unified diff of a write or edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
}

/// An answer to a permission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Run the tool.
    Allow,
    /// Do not run the tool.
    Deny,
}

/// Payload of `permission.resolved`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PermissionResolved {
    /// The running turn.
    pub turn_id: TurnId,
    /// The decided request.
    pub request_id: String,
    /// The decision.
    pub decision: Decision,
    /// Who decided (`"timeout"` when no one answered).
    pub decided_by: String,
}

/// Payload of `turn.progress`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TurnProgress {
    /// The running turn.
    pub turn_id: TurnId,
    /// Human-readable status.
    pub message: String,
    /// Further fields.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// Figures of a finished turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TurnStats {
    /// Tokens generated (completion tokens).
    pub tokens: u64,
    /// Prompt tokens (from the server's usage, else estimated).
    pub prompt_tokens: u64,
    /// Completion tokens (from the server's usage, else estimated).
    pub completion_tokens: u64,
    /// Tool calls made during the turn.
    pub tool_calls: u64,
    /// Seconds from turn start to end.
    pub elapsed: f64,
    /// Completion tokens per second.
    pub speed: f64,
    /// Milliseconds from turn start to the first model delta, null if none arrived.
    pub first_token_latency_ms: Option<f64>,
}

/// Payload of `turn.done`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TurnDone {
    /// The finished turn.
    pub turn_id: TurnId,
    /// Its writer.
    pub writer_id: String,
    /// Its client.
    pub client_id: String,
    /// Its figures.
    pub stats: TurnStats,
}

/// Machine code of a failed turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TurnErrorCode {
    /// The session's model is not loaded on the inference server.
    NoModelLoaded,
    /// The inference stream broke mid-reply.
    LmxWsClosed,
    /// The inference server did not answer in time.
    LmxTimeout,
    /// The inference server refused the connection.
    LmxConnectionRefused,
    /// The daemon's disk is full.
    StorageFull,
    /// The session moved on since the writer's `lastSeenSeq`.
    StateConflict,
    /// The turn was cancelled.
    Cancelled,
    /// The turn was running when the daemon stopped or crashed.
    Interrupted,
    /// The turn reached its tool budget (rounds, or a call repeated).
    ToolLimit,
    /// A code this version does not know (a newer daemon's): a generic failure.
    #[serde(other)]
    Unknown,
}

impl TurnErrorCode {
    /// Every code, for exhaustive checks.
    pub const ALL: [TurnErrorCode; 9] = [
        TurnErrorCode::NoModelLoaded,
        TurnErrorCode::LmxWsClosed,
        TurnErrorCode::LmxTimeout,
        TurnErrorCode::LmxConnectionRefused,
        TurnErrorCode::StorageFull,
        TurnErrorCode::StateConflict,
        TurnErrorCode::Cancelled,
        TurnErrorCode::Interrupted,
        TurnErrorCode::ToolLimit,
    ];

    /// The wire name (`lmx-timeout`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            TurnErrorCode::NoModelLoaded => "no-model-loaded",
            TurnErrorCode::LmxWsClosed => "lmx-ws-closed",
            TurnErrorCode::LmxTimeout => "lmx-timeout",
            TurnErrorCode::LmxConnectionRefused => "lmx-connection-refused",
            TurnErrorCode::StorageFull => "storage-full",
            TurnErrorCode::StateConflict => "state-conflict",
            TurnErrorCode::Cancelled => "cancelled",
            TurnErrorCode::Interrupted => "interrupted",
            TurnErrorCode::ToolLimit => "tool-limit",
            TurnErrorCode::Unknown => "unknown",
        }
    }
}

/// Payload of `turn.error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TurnError {
    /// The failed turn.
    pub turn_id: TurnId,
    /// Its writer.
    pub writer_id: String,
    /// Its client.
    pub client_id: String,
    /// Human-readable reason.
    pub message: String,
    /// Machine code, when the failure has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<TurnErrorCode>,
}

/// Payload of `session.updated`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionUpdated {
    /// The session's metadata after the change.
    pub snapshot: SessionSnapshot,
}

/// Payload of `session.cancelled`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionCancelled {
    /// Number of turns cancelled.
    pub cancelled: usize,
    /// The `turnId` the cancel named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_id: Option<TurnId>,
    /// The `writerId` the cancel named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer_id: Option<String>,
}

/// Which output stream a background chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Payload of `background.output`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackgroundOutput {
    /// The process.
    pub process_id: String,
    /// Its session.
    pub session_id: SessionId,
    /// OS process id.
    pub pid: u32,
    /// Chunk sequence within the process output.
    pub seq: u64,
    /// Time of the chunk.
    pub ts: String,
    /// Which stream.
    pub stream: OutputStream,
    /// The text.
    pub text: String,
}

/// State of a background process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProcessState {
    /// Still running.
    Running,
    /// Exited with status 0.
    Completed,
    /// Exited with a non-zero status.
    Failed,
    /// Killed on request.
    Killed,
    /// Killed after its timeout.
    Timeout,
}

/// A background process as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackgroundProcess {
    /// Daemon-generated id.
    pub process_id: String,
    /// Owning session.
    pub session_id: SessionId,
    /// OS process id.
    pub pid: u32,
    /// The command line.
    pub command: String,
    /// Optional label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Working directory.
    pub cwd: String,
    /// Current state.
    pub state: ProcessState,
    /// Exit code once exited.
    pub exit_code: Option<i32>,
    /// Start time.
    pub started_at: String,
    /// End time once ended.
    pub ended_at: Option<String>,
    /// Runtime so far in milliseconds.
    pub runtime_ms: u64,
    /// Timeout in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Output bytes past the event cap (`background-output-kib`): not sent as
    /// `background.output` events; the output route still has the latest of them.
    #[serde(default)]
    pub dropped_bytes: u64,
}

/// Payload of `background.status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackgroundStatus {
    /// The process after the change.
    pub process: BackgroundProcess,
    /// Why it changed.
    pub reason: String,
    /// The state before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_state: Option<ProcessState>,
    /// The signal involved, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_wire_shape_round_trips() {
        let env = Envelope {
            v: PROTOCOL_VERSION.into(),
            event: Event::TurnToken(TurnText {
                turn_id: TurnId("t1".into()),
                text: "Hel".into(),
            }),
            daemon_id: "daemon_ab12cd34".into(),
            session_id: SessionId::parse("s1").unwrap(),
            seq: 42,
            ts: "2026-03-01T10:00:00.000Z".into(),
        };
        let json = serde_json::to_value(&env).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"v":"3","event":"turn.token","daemonId":"daemon_ab12cd34",
                "sessionId":"s1","seq":42,"ts":"2026-03-01T10:00:00.000Z",
                "payload":{"turnId":"t1","text":"Hel"}})
        );
        let borrowed = EnvelopeRef {
            v: &env.v,
            event: &env.event,
            daemon_id: &env.daemon_id,
            session_id: &env.session_id,
            seq: env.seq,
            ts: &env.ts,
        };
        assert_eq!(
            serde_json::to_string(&borrowed).unwrap(),
            serde_json::to_string(&env).unwrap()
        );
        let back: Envelope = serde_json::from_value(json).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn turn_error_code_names_match_serde() {
        for code in TurnErrorCode::ALL {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::json!(code.as_str())
            );
        }
    }

    #[test]
    fn turn_error_code_is_kebab_case() {
        let v = serde_json::to_value(TurnErrorCode::LmxConnectionRefused).unwrap();
        assert_eq!(v, serde_json::json!("lmx-connection-refused"));
    }
}

#[cfg(test)]
mod unknown_tests {
    use super::*;

    #[test]
    fn unknown_events_and_codes_decode() {
        assert!(!Event::NAMES.contains(&"agent.dreamt"));
        for name in Event::NAMES {
            assert_eq!(Event::NAMES.iter().filter(|n| **n == name).count(), 1);
        }
        let err: TurnError = serde_json::from_str(
            r#"{"turnId":"t","writerId":"w","clientId":"c","message":"m","code":"brand-new"}"#,
        )
        .unwrap();
        assert_eq!(err.code, Some(TurnErrorCode::Unknown));
        let limit: TurnError = serde_json::from_str(
            r#"{"turnId":"t","writerId":"w","clientId":"c","message":"m","code":"tool-limit"}"#,
        )
        .unwrap();
        assert_eq!(limit.code, Some(TurnErrorCode::ToolLimit));
    }
}
