//! `/v3/lmx/*`: the inference server's status, models and admin API, normalised. Servers
//! without LMX's admin API answer what they can (`/v1/models`) and 501 for the rest.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use opta_protocol::{
    LmxConfirmRequest, LmxDownload, LmxDownloadRequest, LmxDownloadsResponse, LmxLoadRequest,
    LmxLoadResponse, LmxModelsResponse, LmxStatusResponse, LmxUnloadRequest, LmxUnloadResponse,
    path_escape,
};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::AppState;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use crate::error::{Error, Result};
use crate::inference::admin;

/// FNV-1a: a stable content hash for ETags (not for security).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub async fn status(State(state): State<AppState>) -> Result<Json<LmxStatusResponse>> {
    let lmx = &state.ctx.lmx;
    let list = state.ctx.preflight.models(lmx).await?;
    // Servers without the admin API (and LMX versions without /admin/status) have no status
    // to add; the model list already proves the server is up.
    let mut server = match lmx.admin_get("/admin/status", "status").await {
        Ok(Value::Object(fields)) => fields,
        _ => Map::new(),
    };
    Ok(Json(LmxStatusResponse {
        status: "ok".into(),
        version: admin::take_str(&mut server, &["version"]),
        uptime_seconds: admin::take_f64(&mut server, &["uptime_seconds", "uptime_sec"]),
        models: list.models.clone(),
        url: lmx.base_url().to_owned(),
        admin_api: lmx.has_admin_api(),
    }))
}

pub async fn models(State(state): State<AppState>, headers: HeaderMap) -> Result<Response> {
    let list = state.ctx.preflight.models(&state.ctx.lmx).await?;
    let answer = LmxModelsResponse {
        models: list.models.clone(),
        source: list.source.as_str().to_owned(),
    };
    let body = serde_json::to_vec(&answer).map_err(|e| Error::Internal(e.to_string()))?;
    let etag = format!("\"{:016x}\"", fnv1a(&body));
    let etag_value = HeaderValue::from_str(&etag).map_err(|e| Error::Internal(e.to_string()))?;
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if matches {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    Ok((
        [
            (header::ETAG, etag_value),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
        ],
        body,
    )
        .into_response())
}

pub async fn memory(State(state): State<AppState>) -> Result<Json<Value>> {
    Ok(Json(
        state
            .ctx
            .lmx
            .admin_get("/admin/memory", "memory reporting")
            .await?,
    ))
}

pub async fn available(State(state): State<AppState>) -> Result<Json<Value>> {
    Ok(Json(
        state
            .ctx
            .lmx
            .admin_get("/admin/models/available", "listing available models")
            .await?,
    ))
}

pub async fn discovery(State(state): State<AppState>) -> Result<Json<Value>> {
    Ok(Json(state.ctx.lmx.discovery().await?))
}

/// Sends a v3 request to an LMX admin route as its snake_case body; `changes_models` drops
/// the model-list cache once the server accepted.
async fn forward<T: serde::Serialize>(
    state: &AppState,
    path: &str,
    request: &T,
    what: &str,
    changes_models: bool,
) -> Result<Value> {
    let body = admin::snake_case_body(request)?;
    let answer = state.ctx.lmx.admin_post(path, &body, what).await?;
    if changes_models {
        state.ctx.preflight.invalidate();
    }
    Ok(answer)
}

fn require(value: &str, field: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(Error::invalid(field, "must not be blank"));
    }
    Ok(())
}

pub async fn load(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<LmxLoadRequest>,
) -> Result<Json<LmxLoadResponse>> {
    require(&request.model_id, "modelId")?;
    let answer = forward(
        &state,
        "/admin/models/load",
        &request,
        "loading models",
        true,
    )
    .await?;
    Ok(Json(admin::normalise_load(answer, Some(&request.model_id))))
}

pub async fn confirm_load(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<LmxConfirmRequest>,
) -> Result<Json<LmxLoadResponse>> {
    require(&request.confirmation_token, "confirmationToken")?;
    let answer = forward(
        &state,
        "/admin/models/load/confirm",
        &request,
        "confirming downloads",
        true,
    )
    .await?;
    Ok(Json(admin::normalise_load(answer, None)))
}

pub async fn unload(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<LmxUnloadRequest>,
) -> Result<Json<LmxUnloadResponse>> {
    require(&request.model_id, "modelId")?;
    let answer = forward(
        &state,
        "/admin/models/unload",
        &request,
        "unloading models",
        true,
    )
    .await?;
    Ok(Json(admin::normalise_unload(
        answer,
        &request.model_id,
        "unloaded",
    )))
}

pub async fn delete_model(
    State(state): State<AppState>,
    ApiPath(model_id): ApiPath<String>,
) -> Result<Json<LmxUnloadResponse>> {
    require(&model_id, "path.modelId")?;
    let path = format!("/admin/models/{}", path_escape(&model_id));
    let answer = state.ctx.lmx.admin_delete(&path, "deleting models").await?;
    state.ctx.preflight.invalidate();
    Ok(Json(admin::normalise_unload(answer, &model_id, "deleted")))
}

pub async fn download(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<LmxDownloadRequest>,
) -> Result<Json<LmxDownload>> {
    require(&request.repo_id, "repoId")?;
    let answer = forward(
        &state,
        "/admin/models/download",
        &request,
        "downloading models",
        false,
    )
    .await?;
    Ok(Json(admin::normalise_download(answer, None)?))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DownloadsQuery {
    include_inactive: Option<bool>,
}

pub async fn downloads(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<DownloadsQuery>,
) -> Result<Json<LmxDownloadsResponse>> {
    let path = format!(
        "/admin/models/downloads?include_inactive={}",
        query.include_inactive.unwrap_or(false)
    );
    let answer = state.ctx.lmx.admin_get(&path, "listing downloads").await?;
    Ok(Json(admin::normalise_downloads(answer)?))
}

pub async fn download_progress(
    State(state): State<AppState>,
    ApiPath(download_id): ApiPath<String>,
) -> Result<Json<LmxDownload>> {
    require(&download_id, "path.downloadId")?;
    let path = format!(
        "/admin/models/download/{}/progress",
        path_escape(&download_id).replace('/', "%2F")
    );
    let answer = state.ctx.lmx.admin_get(&path, "download progress").await?;
    Ok(Json(admin::normalise_download(answer, Some(&download_id))?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn fnv_is_stable() {
        assert_eq!(super::fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
