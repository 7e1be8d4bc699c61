//! The `/v3/background` routes: thin over the process runner; `:pid` is the daemon's
//! `processId`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use opta_protocol::{
    BackgroundListResponse, BackgroundOutputResponse, BackgroundProcessResponse,
    KillBackgroundRequest, KillBackgroundResponse, KillSignal, OutputStream,
    StartBackgroundRequest,
};
use serde::Deserialize;

use super::AppState;
use super::extract::{ApiJson, ApiPath, ApiQuery, session_id};
use crate::error::{Error, Result};
use crate::process::{MAX_TIMEOUT, StartSpec};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionQuery {
    session_id: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<SessionQuery>,
) -> Result<Json<BackgroundListResponse>> {
    let session = query
        .session_id
        .as_deref()
        .map(|s| session_id(s, "query.sessionId"))
        .transpose()?;
    Ok(Json(BackgroundListResponse {
        processes: state.ctx.runner.list(session).await?,
    }))
}

pub async fn start(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<StartBackgroundRequest>,
) -> Result<(StatusCode, Json<BackgroundProcessResponse>)> {
    if request.command.trim().is_empty() {
        return Err(Error::invalid("command", "must not be empty"));
    }
    let timeout = match request.timeout_ms {
        None => Some(state.ctx.background.default_timeout).filter(|t| !t.is_zero()),
        Some(0) => None,
        Some(ms) if Duration::from_millis(ms) > MAX_TIMEOUT => {
            return Err(Error::invalid(
                "timeoutMs",
                format!("at most {} (24 h); 0 for none", MAX_TIMEOUT.as_millis()),
            ));
        }
        Some(ms) => Some(Duration::from_millis(ms)),
    };
    let handle = state.registry.get(request.session_id.clone()).await?;
    let workspace = handle.workspace().await?;
    let requested = request.cwd.clone().unwrap_or_else(|| ".".to_owned());
    let ws = workspace.clone();
    let cwd = tokio::task::spawn_blocking(move || ws.command_dir(&requested))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(|e| match e {
            crate::agent::WorkspaceError::Moved(_) => Error::from(e),
            e => Error::invalid("cwd", e.to_string()),
        })?;
    let process = state
        .ctx
        .runner
        .start(StartSpec {
            session: handle,
            session_id: request.session_id,
            command: request.command,
            label: request.label,
            cwd,
            workspace: workspace.root().to_owned(),
            timeout,
            sandboxed: true,
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(BackgroundProcessResponse { process }),
    ))
}

pub async fn status(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<SessionQuery>,
) -> Result<Json<BackgroundProcessResponse>> {
    let process = state.ctx.runner.status(id.clone()).await?;
    if let Some(session) = query.session_id
        && session != process.session_id.as_str()
    {
        return Err(Error::ProcessNotFound(id));
    }
    Ok(Json(BackgroundProcessResponse { process }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputQuery {
    after_seq: Option<u64>,
    limit: Option<usize>,
    stream: Option<String>,
}

pub async fn output(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<OutputQuery>,
) -> Result<Json<BackgroundOutputResponse>> {
    let limit = query.limit.unwrap_or(200);
    if !(1..=500).contains(&limit) {
        return Err(Error::invalid("query.limit", "must be 1..=500"));
    }
    let stream = match query.stream.as_deref() {
        None | Some("both") => None,
        Some("stdout") => Some(OutputStream::Stdout),
        Some("stderr") => Some(OutputStream::Stderr),
        Some(_) => {
            return Err(Error::invalid(
                "query.stream",
                "must be both, stdout or stderr",
            ));
        }
    };
    let answer = state
        .ctx
        .runner
        .output(id, query.after_seq.unwrap_or(0), limit, stream)
        .await?;
    Ok(Json(answer))
}

pub async fn kill(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<KillBackgroundRequest>,
) -> Result<Json<KillBackgroundResponse>> {
    let signal = request.signal.unwrap_or(KillSignal::Term);
    Ok(Json(state.ctx.runner.kill(id, signal).await?))
}
