//! `/v3/lmx/*`: the inference server's status, models and admin API, normalised. Servers
//! without LMX's admin API answer what they can (`/v1/models`) and 501 for the rest.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::extract::ApiJson;
use crate::error::{Error, Result};

/// FNV-1a: a stable content hash for ETags (not for security).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub async fn status(State(state): State<AppState>) -> Result<Json<Value>> {
    let lmx = &state.ctx.lmx;
    let list = state.ctx.preflight.models(lmx).await?;
    // Servers without the admin API (and LMX versions without /admin/status) have no status
    // to add; the model list already proves the server is up.
    let server = lmx.admin_get("/admin/status", "status").await.ok();
    Ok(Json(json!({
        "status": "ok",
        "url": lmx.base_url(),
        "adminApi": lmx.has_admin_api(),
        "loadedModels": list.ids(),
        "server": server,
    })))
}

pub async fn models(State(state): State<AppState>, headers: HeaderMap) -> Result<Response> {
    let list = state.ctx.preflight.models(&state.ctx.lmx).await?;
    let body = serde_json::to_vec(&*list).map_err(|e| Error::Internal(e.to_string()))?;
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

fn require_model_id(body: &Value) -> Result<()> {
    match body.get("modelId") {
        Some(Value::String(id)) if !id.trim().is_empty() => Ok(()),
        Some(_) => Err(Error::invalid("modelId", "must be a non-empty string")),
        None => Err(Error::invalid("modelId", "is required")),
    }
}

/// Forwards a load/unload to LMX; the model cache is dropped once the server accepted.
async fn model_action(
    state: &AppState,
    body: &Value,
    path: &str,
    what: &str,
) -> Result<Json<Value>> {
    require_model_id(body)?;
    let answer = state.ctx.lmx.admin_post(path, body, what).await?;
    state.ctx.preflight.invalidate();
    Ok(Json(answer))
}

pub async fn load(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>> {
    model_action(&state, &body, "/admin/models/load", "loading models").await
}

pub async fn unload(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>> {
    model_action(&state, &body, "/admin/models/unload", "unloading models").await
}

#[cfg(test)]
mod tests {
    #[test]
    fn fnv_is_stable() {
        assert_eq!(super::fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
