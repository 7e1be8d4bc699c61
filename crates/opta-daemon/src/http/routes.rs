//! Handlers of the HTTP control plane.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use opta_protocol::{
    CancelRequest, CancelResponse, Contract, CreateSessionRequest, HealthResponse, MetricsResponse,
    ResolvePermissionRequest, ResolvePermissionResponse, SessionDetail, SessionId,
    SessionListResponse, SessionSnapshot, SubmitTurnRequest, SubmitTurnResponse, V3HealthResponse,
};
use serde::Deserialize;

use super::AppState;
use super::extract::{ApiJson, ApiPath, ApiQuery, session_id};
use crate::error::{Error, Result};
use crate::ids::now_iso;
use crate::session::{Opened, SessionChanges, WorkspacePin};
use crate::store::SessionRow;

/// The daemon's version, reported by the health routes.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Longest client, writer or idempotency id accepted.
const MAX_ID_LEN: usize = 256;

pub async fn health() -> Json<HealthResponse> {
    Json(HealthResponse {
        status: "ok".into(),
        version: VERSION.into(),
        daemon: true,
    })
}

pub async fn v3_health(State(state): State<AppState>) -> Json<V3HealthResponse> {
    Json(V3HealthResponse {
        status: "ok".into(),
        version: VERSION.into(),
        daemon_id: state.ctx.daemon_id.clone(),
        contract: Contract::current(),
        runtime: state.ctx.counters.snapshot(),
        sandbox: Some(state.ctx.sandbox.kind().to_owned()),
        processes: Some(state.ctx.containment.kind().to_owned()),
        git_metadata: Some(crate::process::sandbox::GIT_METADATA.to_owned()),
    })
}

/// `GET /metrics`: Prometheus (OpenMetrics) text.
pub async fn prometheus(State(state): State<AppState>) -> Result<Response> {
    let text = state
        .ctx
        .metrics
        .encode(&state.ctx.counters)
        .map_err(|e| Error::Internal(format!("metrics encoding: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

pub async fn metrics(State(state): State<AppState>) -> Result<Json<MetricsResponse>> {
    let mut runtime = state.ctx.counters.snapshot();
    runtime.stored_session_count = Some(state.ctx.store.session_count().await?);
    Ok(Json(MetricsResponse {
        daemon_id: state.ctx.daemon_id.clone(),
        runtime,
        ts: now_iso(),
    }))
}

pub async fn create_session(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CreateSessionRequest>,
) -> Result<(StatusCode, Json<SessionSnapshot>)> {
    if request
        .model
        .as_deref()
        .is_some_and(|m| m.trim().is_empty())
    {
        return Err(Error::invalid("model", "must not be empty"));
    }
    // The workspace is opened (and so pinned) when it is set: a swap after this is refused.
    let pin = match request
        .metadata
        .as_ref()
        .and_then(|m| m.get("workspace"))
        .filter(|w| !w.is_null())
    {
        Some(workspace) => {
            let path = workspace
                .as_str()
                .ok_or_else(|| Error::invalid("metadata.workspace", "must be a string"))?
                .to_owned();
            let dir = std::path::PathBuf::from(&path);
            let protected = state.ctx.protected.clone();
            let workspace = tokio::task::spawn_blocking(move || {
                crate::agent::Workspace::open(&dir, &protected)
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
            Some(WorkspacePin { path, workspace })
        }
        None => None,
    };
    let changes = SessionChanges {
        model: request.model.clone(),
        title: request.title.clone(),
        metadata: request.metadata.clone(),
        workspace: pin.clone(),
    };
    let snapshot = match state.registry.open(request, pin).await? {
        Opened::Created(handle) => handle.announce_created().await?,
        Opened::Existing(handle) => handle.open(changes).await?,
    };
    Ok((StatusCode::CREATED, Json(snapshot)))
}

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

pub async fn list_sessions(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<SessionListResponse>> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(Error::invalid("query.limit", "must be between 1 and 500"));
    }
    let cursor = query.cursor.as_deref().map(decode_cursor).transpose()?;
    let page = state.ctx.store.list_sessions(limit, cursor).await?;
    // Stored ids were validated on creation; a row that fails now is skipped, not served.
    let rows: Vec<(SessionId, &SessionRow)> = page
        .rows
        .iter()
        .filter_map(|row| Some((SessionId::parse(&row.id).ok()?, row)))
        .collect();
    let ids = rows.iter().map(|(id, _)| id.clone()).collect();
    let resident = state.registry.resident(ids).await?;
    let snapshots = rows
        .into_iter()
        .zip(resident)
        .map(|((id, row), handle)| async move {
            match handle {
                Some(h) => match h.snapshot().await {
                    Ok(snapshot) => snapshot,
                    Err(_) => stored_snapshot(id, row),
                },
                None => stored_snapshot(id, row),
            }
        });
    let sessions: Vec<SessionSnapshot> = futures_util::future::join_all(snapshots).await;
    let next_cursor = if page.has_more {
        page.rows.last().map(encode_cursor)
    } else {
        None
    };
    Ok(Json(SessionListResponse {
        sessions,
        next_cursor,
    }))
}

fn stored_snapshot(session_id: SessionId, row: &SessionRow) -> SessionSnapshot {
    SessionSnapshot {
        session_id,
        model: row.model.clone(),
        title: row.title.clone(),
        created_at: row.created_at.clone(),
        updated_at: row.updated_at.clone(),
        active_turn_id: None,
        queued_turns: 0,
        tool_call_count: row.tool_call_count,
        writer_count: 0,
    }
}

fn encode_cursor(row: &SessionRow) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}\n{}", row.updated_at, row.id))
}

fn decode_cursor(cursor: &str) -> Result<(String, String)> {
    let bad = || Error::invalid("query.cursor", "not a cursor this daemon issued");
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (updated_at, id) = text.split_once('\n').ok_or_else(bad)?;
    Ok((updated_at.to_owned(), id.to_owned()))
}

pub async fn get_session(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SessionDetail>> {
    let id = session_id(&id, "path.sessionId")?;
    Ok(Json(state.registry.get(id).await?.detail().await?))
}

pub async fn delete_session(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    let id = session_id(&id, "path.sessionId")?;
    state.registry.delete(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Checks the parts of a turn submission serde cannot (shared with the WebSocket plane).
pub fn validate_submit(request: &SubmitTurnRequest) -> Result<()> {
    for (path, value) in [
        ("clientId", Some(&request.client_id)),
        ("writerId", Some(&request.writer_id)),
        ("idempotencyKey", request.idempotency_key.as_ref()),
    ] {
        if let Some(value) = value
            && (value.is_empty() || value.len() > MAX_ID_LEN)
        {
            return Err(Error::invalid(
                path,
                format!("must be 1 to {MAX_ID_LEN} characters"),
            ));
        }
    }
    if request.content.trim().is_empty() {
        return Err(Error::invalid("content", "must not be empty"));
    }
    Ok(())
}

pub async fn submit_turn(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<SubmitTurnRequest>,
) -> Result<(StatusCode, Json<SubmitTurnResponse>)> {
    let id = session_id(&id, "path.sessionId")?;
    validate_submit(&request)?;
    let response = state.registry.get(id).await?.submit(request).await?;
    Ok((StatusCode::ACCEPTED, Json(response)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventsQuery {
    after_seq: Option<u64>,
}

pub async fn session_events(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Response> {
    let id = session_id(&id, "path.sessionId")?;
    let (events, last_seq) = state
        .ctx
        .store
        .events_to_last(id.to_string(), query.after_seq.unwrap_or(0))
        .await?
        .ok_or(Error::SessionNotFound(id))?;
    // Stored envelopes are already JSON: splice them rather than parse and re-serialise.
    let mut body =
        String::with_capacity(40 + events.iter().map(|(_, e)| e.len() + 1).sum::<usize>());
    body.push_str("{\"events\":[");
    for (i, (_, envelope)) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(envelope);
    }
    body.push_str("],\"lastSeq\":");
    body.push_str(&last_seq.to_string());
    body.push('}');
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

pub async fn cancel(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<CancelRequest>,
) -> Result<Json<CancelResponse>> {
    let id = session_id(&id, "path.sessionId")?;
    Ok(Json(state.registry.get(id).await?.cancel(request).await?))
}

pub async fn resolve_permission(
    State(state): State<AppState>,
    ApiPath((id, request_id)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<ResolvePermissionRequest>,
) -> Result<Json<ResolvePermissionResponse>> {
    let id = session_id(&id, "path.sessionId")?;
    if request.request_id != request_id {
        return Err(Error::invalid(
            "requestId",
            "must equal the request id in the path",
        ));
    }
    let handle = state.registry.get(id).await?;
    Ok(Json(handle.resolve_permission(request_id, request).await?))
}

#[derive(Deserialize)]
pub struct GrantQuery {
    grant: Option<String>,
}

pub async fn revoke_grants(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<GrantQuery>,
) -> Result<Json<opta_protocol::GrantsResponse>> {
    let id = session_id(&id, "path.sessionId")?;
    let handle = state.registry.get(id).await?;
    let grants = handle.revoke_grants(query.grant).await?;
    Ok(Json(opta_protocol::GrantsResponse { grants }))
}

pub async fn not_found(uri: Uri) -> Error {
    Error::RouteNotFound(uri.path().to_owned())
}

pub async fn method_not_allowed(method: axum::http::Method) -> Error {
    Error::MethodNotAllowed(method.to_string())
}
