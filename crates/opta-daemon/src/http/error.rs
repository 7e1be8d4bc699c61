//! The one place where library errors become HTTP statuses and JSON bodies.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use opta_protocol::ErrorBody;
use serde_json::json;

use crate::error::Error;
use crate::inference::InferenceError;

impl Error {
    /// HTTP status and machine code for this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Error::InvalidInput { .. } => (StatusCode::BAD_REQUEST, "invalid-request"),
            Error::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Error::SignInCodeRejected => (StatusCode::UNAUTHORIZED, "sign-in-code-rejected"),
            Error::SessionNotFound(_) => (StatusCode::NOT_FOUND, "session-not-found"),
            Error::PermissionNotFound(_) => (StatusCode::NOT_FOUND, "permission-not-found"),
            Error::GrantNotFound(_) => (StatusCode::NOT_FOUND, "grant-not-found"),
            Error::ProcessNotFound(_) => (StatusCode::NOT_FOUND, "process-not-found"),
            Error::ProcessLimit(_) => (StatusCode::CONFLICT, "process-limit"),
            Error::RouteNotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            Error::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed"),
            Error::StateConflict { .. } => (StatusCode::CONFLICT, "state-conflict"),
            Error::PermissionConflict(_) => (StatusCode::CONFLICT, "permission-conflict"),
            Error::WorkspaceMoved(_) => (StatusCode::CONFLICT, "workspace-moved"),
            Error::WorkspaceRefused(_) => (StatusCode::BAD_REQUEST, "workspace-refused"),
            Error::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large"),
            Error::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request-timeout"),
            Error::StorageFull(_) => (StatusCode::INSUFFICIENT_STORAGE, "storage-full"),
            Error::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting-down"),
            Error::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "unsupported"),
            Error::Lmx(e) => lmx_status(e),
            Error::Storage(_)
            | Error::AlreadyRunning { .. }
            | Error::Bind { .. }
            | Error::Config(_)
            | Error::Io(_)
            | Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// The PROTOCOL.md error body for this error.
    pub fn body(&self) -> serde_json::Value {
        let (_, code) = self.status_and_code();
        match self {
            // Exactly `{"error":"Unauthorized"}`, as clients match on it.
            Error::Unauthorized => json!({ "error": "Unauthorized" }),
            Error::PermissionConflict(_) => json!({
                "error": self.to_string(),
                "code": code,
                "ok": false,
                "conflict": true,
                "message": self.to_string(),
            }),
            other => {
                let body = ErrorBody {
                    error: other.to_string(),
                    code: Some(code.to_owned()),
                    details: match other {
                        Error::InvalidInput { details, .. } => Some(details.clone()),
                        _ => None,
                    },
                    seq: match other {
                        Error::StateConflict { current, .. } => Some(*current),
                        _ => None,
                    },
                };
                serde_json::to_value(body).unwrap_or_else(|_| json!({ "error": "internal" }))
            }
        }
    }
}

fn lmx_status(e: &InferenceError) -> (StatusCode, &'static str) {
    match e {
        InferenceError::ConnectionRefused { .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, "lmx-connection-refused")
        }
        InferenceError::Timeout(_) | InferenceError::FirstTokenTimeout(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, "lmx-timeout")
        }
        InferenceError::Unsupported { .. } => (StatusCode::NOT_IMPLEMENTED, "unsupported"),
        InferenceError::NoModelLoaded { .. }
        | InferenceError::ModelNotLoaded { .. }
        | InferenceError::ModelNotFound { .. } => (StatusCode::NOT_FOUND, "no-model-loaded"),
        // The server's own refusal of a request (unknown model to load, bad body...).
        InferenceError::Http { status, .. } if (400..500).contains(status) => (
            StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY),
            "lmx-rejected",
        ),
        InferenceError::Http { .. }
        | InferenceError::StreamClosed
        | InferenceError::Reported(_)
        | InferenceError::InvalidResponse(_)
        | InferenceError::Transport(_) => (StatusCode::BAD_GATEWAY, "lmx-error"),
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), code, error = %self, "request failed");
        } else {
            tracing::warn!(status = status.as_u16(), code, error = %self, "request refused");
        }
        (status, Json(self.body())).into_response()
    }
}
