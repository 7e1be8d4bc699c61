//! Request and response bodies of the HTTP control plane.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::events::{Decision, Envelope};
use crate::ids::{Seq, SessionId, TurnId};
use crate::model::{ChatMessage, Mode, SessionSnapshot, TurnOverrides};

/// Name of the wire contract reported by `GET /v3/health`.
pub const CONTRACT_NAME: &str = "opta-daemon-v3";
/// Version of the wire contract reported by `GET /v3/health`.
pub const CONTRACT_VERSION: u32 = 1;

/// `GET /health` (no auth).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthResponse {
    /// `"ok"`.
    pub status: String,
    /// Daemon version.
    pub version: String,
    /// Always true: tells a daemon apart from other servers on the port.
    pub daemon: bool,
}

/// The contract a daemon speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Contract {
    /// [`CONTRACT_NAME`].
    pub name: String,
    /// [`CONTRACT_VERSION`].
    pub version: u32,
}

impl Contract {
    /// The contract this crate describes.
    pub fn current() -> Self {
        Self {
            name: CONTRACT_NAME.into(),
            version: CONTRACT_VERSION,
        }
    }
}

/// Live figures of a daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeStats {
    /// Sessions resident in memory.
    pub session_count: usize,
    /// Turns running now.
    pub active_turn_count: usize,
    /// Turns waiting in queues.
    pub queued_turn_count: usize,
    /// Open WebSocket and SSE subscriptions.
    pub subscriber_count: usize,
    /// Sessions in the store (resident or not); reported by `/v3/metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_session_count: Option<u64>,
    /// Idle sessions evicted from memory since the daemon started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted_session_count: Option<u64>,
}

/// `GET /v3/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct V3HealthResponse {
    /// `"ok"`.
    pub status: String,
    /// Daemon version.
    pub version: String,
    /// This daemon instance.
    pub daemon_id: String,
    /// The wire contract.
    pub contract: Contract,
    /// Live figures.
    pub runtime: RuntimeStats,
    /// How commands are confined: `landlock`, or `none` where the kernel cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// How a command's processes are tracked to their end: `cgroup` (each command in its own,
    /// killed whole, those that called setsid included), `pid-namespace` (each command in a
    /// PID namespace of its own, which ends with it and with the daemon), or `process-group`
    /// where neither can be had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<String>,
    /// What sandboxed commands may do to a repository's `.git/config`, `.git/hooks` and
    /// `.git/info` (which run programs): `writable` (the daemon has no mount namespace to make
    /// them read-only; the file tools ask before writing there and a `git` grant is asked again
    /// once they changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_metadata: Option<String>,
}

/// `GET /v3/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsResponse {
    /// This daemon instance.
    pub daemon_id: String,
    /// Live figures.
    pub runtime: RuntimeStats,
    /// Time of the reading.
    pub ts: String,
}

/// `POST /v3/sessions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateSessionRequest {
    /// Id to create or re-open; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<SessionId>,
    /// Model for the session's turns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Initial history (only used when the session is new).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Free-form metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

/// `GET /v3/sessions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionListResponse {
    /// One page, most recently updated first.
    pub sessions: Vec<SessionSnapshot>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// `GET /v3/sessions/:id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionDetail {
    /// The snapshot fields.
    #[serde(flatten)]
    pub snapshot: SessionSnapshot,
    /// The history.
    pub messages: Vec<ChatMessage>,
    /// The seq these messages reflect: a subscription from it continues without a gap, and
    /// it is the `lastSeenSeq` of a writer that has seen them. Absent from older daemons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<Seq>,
    /// Session grants (`remember: "session"`): a tool name, or `run_command:<program>
    /// <first argument>`. Revoke with `DELETE /v3/sessions/:id/grants`.
    #[serde(default)]
    pub grants: Vec<String>,
}

/// `POST /v3/sessions/:id/turns`, and the body of a WebSocket `turn.submit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubmitTurnRequest {
    /// The submitting client.
    pub client_id: String,
    /// The writer within the client.
    pub writer_id: String,
    /// The user's message.
    pub content: String,
    /// Agent mode; `chat` when absent or `null` (as in the original protocol).
    #[serde(default, deserialize_with = "crate::serde_util::null_as_default")]
    pub mode: Mode,
    /// Free-form metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Highest seq the writer has seen; stale values are refused with 409.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_seq: Option<Seq>,
    /// Per-turn overrides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<TurnOverrides>,
    /// Repeating a key on the same session returns the first turn's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl SubmitTurnRequest {
    /// A plain turn: no metadata, no `lastSeenSeq`, no overrides, no idempotency key.
    pub fn new(
        client_id: impl Into<String>,
        writer_id: impl Into<String>,
        content: impl Into<String>,
        mode: Mode,
    ) -> Self {
        Self {
            client_id: client_id.into(),
            writer_id: writer_id.into(),
            content: content.into(),
            mode,
            metadata: None,
            last_seen_seq: None,
            overrides: None,
            idempotency_key: None,
        }
    }
}

/// 202 answer to a turn submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubmitTurnResponse {
    /// The turn's id.
    pub turn_id: TurnId,
    /// True when this request queued the turn; false when an idempotency key matched.
    pub queued: bool,
}

/// `GET /v3/sessions/:id/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventsResponse {
    /// Envelopes ascending by seq.
    pub events: Vec<Envelope>,
    /// The session's highest stored seq; `events` ends there, so a subscription after it
    /// continues without a gap (also when `events` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<Seq>,
    /// Session grants (`remember: "session"`): a tool name, or `run_command:<program>
    /// <first argument>`. Revoke with `DELETE /v3/sessions/:id/grants`.
    #[serde(default)]
    pub grants: Vec<String>,
}

/// `POST /v3/sessions/:id/cancel`, and the body of a WebSocket `turn.cancel`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CancelRequest {
    /// A queued or active turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_id: Option<TurnId>,
    /// Every turn of this writer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer_id: Option<String>,
}

/// Answer to a cancel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CancelResponse {
    /// Always true.
    pub ok: bool,
    /// Turns cancelled in all.
    pub cancelled: usize,
    /// Queued turns removed.
    pub cancelled_queued: usize,
    /// Whether the active turn was aborted.
    pub cancelled_active: bool,
}

/// `POST /v3/sessions/:id/permissions/:requestId`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvePermissionRequest {
    /// Must equal the path's request id.
    pub request_id: String,
    /// The answer.
    pub decision: Decision,
    /// Who answers.
    pub decided_by: String,
    /// `session` with `allow`: allow the same tool (for commands: the same program and
    /// first argument of a simple command) for the rest of the session without asking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remember: Option<Remember>,
}

/// Answer of `DELETE /v3/sessions/:id/grants`: the grants left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GrantsResponse {
    /// The session's grants after the revocation.
    pub grants: Vec<String>,
}

/// How long an allow decision holds beyond its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Remember {
    /// For the rest of the session, for every client.
    Session,
}

/// Answer to a permission resolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvePermissionResponse {
    /// True when this answer decided the request.
    pub ok: bool,
    /// True when the request had already been decided.
    pub conflict: bool,
    /// Why, on conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One validation problem in a 400 answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetail {
    /// Where in the input (`mode`, `messages[2].role`, `query.limit`...).
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

/// Body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Human message.
    pub error: String,
    /// Machine code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Validation issues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<ErrorDetail>>,
    /// The session's current seq, on `state-conflict`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<Seq>,
}

impl ErrorBody {
    /// A body with only a message.
    pub fn message(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            code: None,
            details: None,
            seq: None,
        }
    }
}

/// File name of the state file in `$OPTA_HOME/daemon/`.
pub const STATE_FILE_NAME: &str = "state.json";

/// The state file (`$OPTA_HOME/daemon/state.json`, mode 0600) clients read to find and
/// authenticate to the daemon. Written once the daemon listens, removed on clean shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DaemonState {
    /// Process id.
    pub pid: u32,
    /// Daemon instance id.
    pub daemon_id: String,
    /// Bound host.
    pub host: String,
    /// Bound port.
    pub port: u16,
    /// Auth token.
    pub token: String,
    /// Start time (ISO-8601 UTC).
    pub started_at: String,
    /// Log file.
    pub logs_path: String,
}

/// `POST /v3/background/start`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartBackgroundRequest {
    /// The owning session; its workspace confines `cwd`.
    pub session_id: SessionId,
    /// The command line, run with `sh -c`.
    pub command: String,
    /// A name for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Working directory inside the session's workspace (default: the workspace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Milliseconds before the process is stopped (default 300,000; 0 = none; at most 24 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// One background process: the answer of start and status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BackgroundProcessResponse {
    /// The process.
    pub process: crate::events::BackgroundProcess,
}

/// `GET /v3/background`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BackgroundListResponse {
    /// Running and recently ended processes, oldest first.
    pub processes: Vec<crate::events::BackgroundProcess>,
}

/// One piece of a background process's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OutputChunk {
    /// Position in the process's output (1, 2, ...; both streams share it).
    pub seq: u64,
    /// Which stream.
    pub stream: crate::events::OutputStream,
    /// The text (as read: UTF-8, invalid bytes replaced).
    pub text: String,
    /// When it was read.
    pub ts: String,
}

/// `GET /v3/background/:pid/output`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackgroundOutputResponse {
    /// The process.
    pub process: crate::events::BackgroundProcess,
    /// Chunks after `afterSeq`, oldest first (older ones may have been dropped: the first
    /// chunk's seq then jumps).
    pub chunks: Vec<OutputChunk>,
    /// The `afterSeq` to ask with next.
    pub next_seq: u64,
    /// More chunks wait after these.
    pub has_more: bool,
}

/// `POST /v3/background/:pid/kill`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KillBackgroundRequest {
    /// `SIGTERM` (default), `SIGKILL` or `SIGINT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<KillSignal>,
}

/// A signal a client may send to a background process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum KillSignal {
    /// Ask it to stop (escalates to SIGKILL after 5 s).
    #[serde(rename = "SIGTERM")]
    Term,
    /// Stop it now.
    #[serde(rename = "SIGKILL")]
    Kill,
    /// Interrupt it, as Ctrl-C would (escalates to SIGKILL after 5 s).
    #[serde(rename = "SIGINT")]
    Int,
}

impl KillSignal {
    /// The signal's name.
    pub fn as_str(self) -> &'static str {
        match self {
            KillSignal::Term => "SIGTERM",
            KillSignal::Kill => "SIGKILL",
            KillSignal::Int => "SIGINT",
        }
    }
}

/// Answer of a kill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KillBackgroundResponse {
    /// True when the process was running and got the signal.
    pub killed: bool,
    /// The process.
    pub process: crate::events::BackgroundProcess,
}

/// One item of the daemon-level session feed (`GET /v3/sse/sessions`): what a session list
/// needs to stay current without polling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "event", rename_all_fields = "camelCase")]
pub enum SessionFeedEvent {
    /// A session was created, or its listed state changed (title, model, running or queued
    /// turns, tool calls, update time).
    #[serde(rename = "session.changed")]
    Changed {
        /// The session as the list shows it now.
        session: SessionSnapshot,
    },
    /// A session was deleted.
    #[serde(rename = "session.deleted")]
    Deleted {
        /// The deleted session.
        session_id: SessionId,
    },
}

/// `POST /v3/web/code`: a one-time sign-in code for the web page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebCodeResponse {
    /// The code: works once, until `expiresAt`.
    pub code: String,
    /// When the code stops working (ISO-8601 UTC).
    pub expires_at: String,
    /// The page's address with the code in its fragment (`http://HOST:PORT/#code=...`).
    pub url: String,
}

/// `POST /v3/web/exchange` (no token needed): trades a one-time code for the token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebExchangeRequest {
    /// The code from `POST /v3/web/code`.
    pub code: String,
}

/// Answer of `POST /v3/web/exchange`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebExchangeResponse {
    /// The daemon's token.
    pub token: String,
}
