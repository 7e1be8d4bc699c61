//! The daemon library's error type. The HTTP edge maps it to status + code in one place
//! (`http::error`).

use std::path::PathBuf;

use opta_protocol::{ErrorDetail, Seq, SessionId};

/// Everything that can go wrong inside the daemon library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request was malformed or invalid; nothing changed. Retrying the same input fails again.
    #[error("{message}")]
    InvalidInput {
        /// Summary.
        message: String,
        /// Which fields are wrong.
        details: Vec<ErrorDetail>,
    },
    /// Missing or wrong token.
    #[error("Unauthorized")]
    Unauthorized,
    /// A web sign-in code that is unknown, already used or expired.
    #[error(
        "This sign-in link is unknown, used or expired (codes work once, for a minute): run `opta web` for a new one"
    )]
    SignInCodeRejected,
    /// No session with that id, in memory or on disk.
    #[error("Session not found: {0}")]
    SessionNotFound(SessionId),
    /// No permission request with that id in that session.
    #[error("Permission request not found: {0}")]
    PermissionNotFound(String),
    /// No background process with that id (ended ones are kept 5 minutes).
    #[error("Background process not found: {0}")]
    ProcessNotFound(String),
    /// The daemon-wide limit of running background processes is reached.
    #[error("{0} background processes are already running (the limit); stop one first")]
    ProcessLimit(usize),
    /// No session grant with that name.
    #[error("No grant {0:?} in this session")]
    GrantNotFound(String),
    /// No such route.
    #[error("Not found: {0}")]
    RouteNotFound(String),
    /// The route exists but not with that method.
    #[error("Method {0} not allowed here")]
    MethodNotAllowed(String),
    /// The writer's `lastSeenSeq` is behind the session; nothing was queued. Retry after catching up.
    #[error(
        "Session state conflict: lastSeenSeq {last_seen} is behind the session's seq {current}"
    )]
    StateConflict {
        /// What the writer sent.
        last_seen: Seq,
        /// The session's seq now.
        current: Seq,
    },
    /// The permission request was already decided.
    #[error("Permission request {0} was already decided")]
    PermissionConflict(String),
    /// The client did not send its whole request body in time; nothing changed.
    #[error("The request body did not arrive within {} s", .0.as_secs())]
    RequestTimeout(std::time::Duration),
    /// The session's workspace is no longer the directory it was given (renamed, replaced by
    /// a link); nothing was done.
    #[error("{0}")]
    WorkspaceMoved(String),
    /// A workspace that is `/` or contains the daemon's home (without `--allow-any-workspace`).
    #[error("{0}")]
    WorkspaceRefused(String),
    /// The request body exceeds the limit.
    #[error("Request body too large (limit {limit} bytes)")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The disk is full; nothing was written. Retry once space is freed.
    #[error("Storage is full: {0}")]
    StorageFull(String),
    /// The store failed for another reason.
    #[error("Storage error: {0}")]
    Storage(String),
    /// The daemon is stopping and takes no new work.
    #[error("The daemon is shutting down")]
    ShuttingDown,
    /// Another daemon holds the lock on this home directory.
    #[error(
        "Another opta daemon is already running with this home (lock {lock}{pid}); stop it first or use another --home"
    )]
    AlreadyRunning {
        /// The lock file.
        lock: PathBuf,
        /// `, pid N` when the state file names it.
        pid: String,
    },
    /// The daemon's configuration is unusable (at start). Fix the setting named.
    #[error("Invalid configuration: {0}")]
    Config(String),
    /// No port could be bound.
    #[error("Could not listen on {host} port {ports}: {reason}")]
    Bind {
        /// The host asked for.
        host: String,
        /// The port, or the ports tried.
        ports: String,
        /// What failed.
        reason: String,
    },
    /// A contract route this daemon does not implement yet. Retrying cannot help.
    #[error("{0}: not available in this version of the opta daemon")]
    NotImplemented(&'static str),
    /// The inference server failed or refused a proxied request (`/v3/lmx/*`).
    #[error("{0}")]
    Lmx(#[from] crate::inference::InferenceError),
    /// File system failure outside the store.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A bug: an invariant did not hold.
    #[error("Internal error: {0}")]
    Internal(String),
}

impl Error {
    /// A 400 with one detail.
    pub fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        let message = message.into();
        let path = path.into();
        Error::InvalidInput {
            message: format!("Invalid request: {path}: {message}"),
            details: vec![ErrorDetail { path, message }],
        }
    }
}

impl From<crate::agent::WorkspaceError> for Error {
    fn from(e: crate::agent::WorkspaceError) -> Self {
        use crate::agent::WorkspaceError as W;
        match e {
            W::Moved(_) => Error::WorkspaceMoved(e.to_string()),
            W::Refused { .. } => Error::WorkspaceRefused(e.to_string()),
            other => Error::invalid(
                "metadata.workspace",
                format!("the session's workspace is unusable: {other}"),
            ),
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => Error::StorageFull(e.to_string()),
            _ => Error::Storage(e.to_string()),
        }
    }
}

/// Shorthand for the library's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
