//! The client library's error type.

use std::path::PathBuf;

use opta_protocol::{ErrorBody, TurnErrorCode};

/// What can go wrong talking to a daemon.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// No state file: the daemon is not running for this home. Start it first.
    #[error("no opta daemon is running for this home (no state file at {})", .path.display())]
    NotRunning {
        /// Where the state file was looked for.
        path: PathBuf,
    },
    /// The state file exists but cannot be read. Retrying will not help.
    #[error("the daemon state file {} is unreadable: {reason}", .path.display())]
    BadStateFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The daemon speaks another contract; upgrade the client or the daemon.
    #[error(
        "the daemon speaks contract {found}, this client needs {expected}; upgrade whichever is older"
    )]
    ContractMismatch {
        /// What this client speaks.
        expected: String,
        /// What the daemon reported.
        found: String,
    },
    /// The daemon answered with an error status.
    #[error("daemon answered {status}: {}", .body.error)]
    Api {
        /// HTTP status.
        status: u16,
        /// The error body.
        body: ErrorBody,
    },
    /// The daemon could not be reached (or the connection broke). Retrying may help.
    #[error("could not reach the daemon: {0}")]
    Transport(String),
    /// An event stream lost the daemon and it did not come back in time (at its address, or
    /// where its home's state file points). Start the daemon, then subscribe again.
    #[error("the daemon went away and did not come back within {} s", .waited.as_secs())]
    DaemonGone {
        /// How long the stream kept trying.
        waited: std::time::Duration,
    },
    /// The daemon's answer did not parse.
    #[error("unexpected answer from the daemon: {0}")]
    Decode(String),
    /// A turn ended with `turn.error`.
    #[error("turn failed{}: {message}", .code.map(|c| format!(" ({})", c.as_str())).unwrap_or_default())]
    Turn {
        /// The turn.
        turn_id: String,
        /// Its error code.
        code: Option<TurnErrorCode>,
        /// Its message.
        message: String,
    },
}

impl ClientError {
    /// The machine code of an API or turn error, if any.
    pub fn code(&self) -> Option<String> {
        match self {
            ClientError::Api { body, .. } => body.code.clone(),
            ClientError::Turn { code, .. } => code.map(|c| c.as_str().to_owned()),
            ClientError::NotRunning { .. }
            | ClientError::BadStateFile { .. }
            | ClientError::ContractMismatch { .. }
            | ClientError::Transport(_)
            | ClientError::DaemonGone { .. }
            | ClientError::Decode(_) => None,
        }
    }

    /// HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub(crate) fn transport(e: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// A failed WebSocket handshake: an HTTP refusal (a wrong token's 401, an unknown session)
/// is the daemon's answer, anything else a transport failure.
pub(crate) fn ws_handshake(e: tokio_tungstenite::tungstenite::Error) -> ClientError {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<ErrorBody>(b).ok())
                .unwrap_or_else(|| {
                    ErrorBody::message(format!("the WebSocket handshake was refused ({status})"))
                });
            ClientError::Api { status, body }
        }
        other => transport(other),
    }
}
