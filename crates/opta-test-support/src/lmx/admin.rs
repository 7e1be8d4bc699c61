//! Opta LMX's admin API, as the scripted server plays it: snake_case bodies only (a camelCase
//! key is a 422, as LMX's request validation answers), answers in LMX's own spellings
//! (`memory_gb`, epoch `loaded_at`, `success: true`), loads that need a download asked about
//! or started, downloads that finish after two progress polls, and a log of every admin
//! request for tests to check what the daemon sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::{Value, json};

use super::{Shared, lock, model_list_request};

/// Bytes every scripted download has.
const DOWNLOAD_BYTES: u64 = 2_000_000_000;
/// Epoch seconds every scripted load happened at.
const LOADED_AT: f64 = 1_700_000_000.0;

/// What the admin API knows beyond the loaded models.
#[derive(Default)]
pub(super) struct AdminState {
    /// On the server's disk: loadable at once.
    pub on_disk: Vec<String>,
    /// Not on disk, but downloadable.
    pub downloadable: Vec<String>,
    /// Downloads by id.
    pub downloads: HashMap<String, Download>,
    /// Confirmation tokens of loads that asked, and the model each is for.
    pub tokens: HashMap<String, String>,
    /// Every admin request: method, path with query, body.
    pub log: Vec<(String, String, Value)>,
}

pub(super) struct Download {
    repo_id: String,
    percent: f64,
    /// Load the model once downloaded (it came from a load).
    then_load: bool,
}

/// The admin routes.
pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/admin/status", get(status))
        .route("/admin/models", get(models))
        .route("/admin/models/available", get(available))
        .route("/admin/memory", get(memory))
        .route("/admin/models/load", post(load))
        .route("/admin/models/load/confirm", post(confirm))
        .route("/admin/models/unload", post(unload))
        .route("/admin/models/download", post(start_download))
        .route("/admin/models/downloads", get(downloads))
        .route("/admin/models/download/{id}/progress", get(progress))
        .route("/admin/models/{*id}", delete(delete_model))
        .route("/v1/discovery", get(discovery))
}

/// What a server without LMX's admin API answers there.
pub(super) fn missing() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"detail": "Not Found"})),
    )
        .into_response()
}

fn off(shared: &Shared) -> bool {
    !shared.admin.load(Ordering::SeqCst)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// Logs the request and checks its body: JSON with snake_case keys and the `required` ones.
/// Without the admin API, the route is missing.
fn accept(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    body: &Bytes,
    required: &[&str],
) -> Result<Value, Box<Response>> {
    if off(shared) {
        return Err(Box::new(missing()));
    }
    let value: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body).unwrap_or(Value::Null)
    };
    lock(&shared.admin_state)
        .log
        .push((method.to_string(), uri.to_string(), value.clone()));
    let keys: Vec<&String> = value
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    let mut problems: Vec<Value> = keys
        .iter()
        .filter(|k| k.chars().any(|c| c.is_ascii_uppercase()))
        .map(|k| json!({"type": "extra_forbidden", "loc": ["body", k], "msg": "Extra inputs are not permitted"}))
        .collect();
    for field in required {
        if value.get(*field).and_then(Value::as_str).is_none() {
            problems
                .push(json!({"type": "missing", "loc": ["body", field], "msg": "Field required"}));
        }
    }
    if problems.is_empty() {
        Ok(value)
    } else {
        Err(Box::new(
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(json!({"detail": problems})),
            )
                .into_response(),
        ))
    }
}

fn log_get(shared: &Shared, uri: &Uri) {
    lock(&shared.admin_state)
        .log
        .push(("GET".into(), uri.to_string(), Value::Null));
}

async fn status(State(shared): State<Arc<Shared>>, uri: Uri) -> Response {
    if off(&shared) {
        return missing();
    }
    log_get(&shared, &uri);
    axum::Json(json!({"version": "0.9.1", "uptime_seconds": 42.5,
        "memory": {"threshold_percent": 90}}))
    .into_response()
}

async fn models(State(shared): State<Arc<Shared>>) -> Response {
    model_list_request(&shared).await;
    if off(&shared) {
        return missing();
    }
    let loaded: Vec<Value> = lock(&shared.models)
        .iter()
        .map(|id| {
            json!({"id": id, "loaded": true, "memory_gb": 1.5, "loaded_at": LOADED_AT,
                "request_count": 3, "last_used_at": LOADED_AT + 60.0, "context_length": 8192})
        })
        .collect();
    let count = loaded.len();
    axum::Json(json!({"loaded": loaded, "count": count})).into_response()
}

async fn available(State(shared): State<Arc<Shared>>, uri: Uri) -> Response {
    if off(&shared) {
        return missing();
    }
    log_get(&shared, &uri);
    let list: Vec<Value> = lock(&shared.admin_state)
        .on_disk
        .iter()
        .map(|id| json!({"repo_id": id, "size_bytes": 4_000_000_000u64}))
        .collect();
    axum::Json(Value::Array(list)).into_response()
}

async fn memory(State(shared): State<Arc<Shared>>, uri: Uri) -> Response {
    if off(&shared) {
        return missing();
    }
    log_get(&shared, &uri);
    let used = 1.5 * lock(&shared.models).len() as f64;
    axum::Json(json!({"total_unified_memory_gb": 24.0, "used_gb": used, "threshold_percent": 90}))
        .into_response()
}

async fn discovery(State(shared): State<Arc<Shared>>, uri: Uri) -> Response {
    if off(&shared) {
        return missing();
    }
    log_get(&shared, &uri);
    axum::Json(json!({"service": "opta-lmx", "version": "0.9.1",
        "endpoints": {"openai": "/v1", "admin": "/admin"}}))
    .into_response()
}

fn loaded_answer(id: &str) -> Value {
    json!({"success": true, "model_id": id, "memory_gb": 1.5, "load_time_seconds": 0.25})
}

fn begin_download(shared: &Shared, repo_id: &str, then_load: bool) -> String {
    let mut state = lock(&shared.admin_state);
    let id = format!("dl-{}", state.downloads.len() + 1);
    state.downloads.insert(
        id.clone(),
        Download {
            repo_id: repo_id.to_owned(),
            percent: 0.0,
            then_load,
        },
    );
    id
}

async fn load(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let body = match accept(&shared, &method, &uri, &body, &["model_id"]) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let id = body["model_id"].as_str().unwrap_or_default().to_owned();
    if lock(&shared.models).contains(&id) || lock(&shared.admin_state).on_disk.contains(&id) {
        let mut loaded = lock(&shared.models);
        if !loaded.contains(&id) {
            loaded.push(id.clone());
        }
        return axum::Json(loaded_answer(&id)).into_response();
    }
    if !lock(&shared.admin_state).downloadable.contains(&id) {
        return error(
            StatusCode::NOT_FOUND,
            "model_not_found",
            &format!("model {id} is not available"),
        );
    }
    if body["auto_download"] == true {
        let download_id = begin_download(&shared, &id, true);
        return axum::Json(
            json!({"model_id": id, "status": "downloading", "download_id": download_id}),
        )
        .into_response();
    }
    let token = format!("confirm-{id}");
    lock(&shared.admin_state)
        .tokens
        .insert(token.clone(), id.clone());
    axum::Json(
        json!({"model_id": id, "status": "download_required", "confirmation_token": token,
        "message": format!("{id} is not on disk (2.0 GB to download)"), "estimated_size_gb": 2.0}),
    )
    .into_response()
}

async fn confirm(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let body = match accept(&shared, &method, &uri, &body, &["confirmation_token"]) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let token = body["confirmation_token"].as_str().unwrap_or_default();
    let Some(id) = lock(&shared.admin_state).tokens.remove(token) else {
        return error(
            StatusCode::NOT_FOUND,
            "token_not_found",
            "unknown or used confirmation token",
        );
    };
    let download_id = begin_download(&shared, &id, true);
    axum::Json(json!({"model_id": id, "status": "downloading", "download_id": download_id}))
        .into_response()
}

async fn unload(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let body = match accept(&shared, &method, &uri, &body, &["model_id"]) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let id = body["model_id"].as_str().unwrap_or_default().to_owned();
    let mut loaded = lock(&shared.models);
    if !loaded.contains(&id) {
        return error(
            StatusCode::NOT_FOUND,
            "model_not_found",
            &format!("model {id} is not loaded"),
        );
    }
    loaded.retain(|m| *m != id);
    axum::Json(json!({"success": true, "memory_freed_gb": 1.5})).into_response()
}

async fn delete_model(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    Path(id): Path<String>,
) -> Response {
    if off(&shared) {
        return missing();
    }
    lock(&shared.admin_state)
        .log
        .push((method.to_string(), uri.to_string(), Value::Null));
    if lock(&shared.models).contains(&id) {
        return error(
            StatusCode::CONFLICT,
            "model_in_use",
            &format!("model {id} is loaded"),
        );
    }
    let mut state = lock(&shared.admin_state);
    if !state.on_disk.contains(&id) {
        return error(
            StatusCode::NOT_FOUND,
            "model_not_found",
            &format!("model {id} is not on disk"),
        );
    }
    state.on_disk.retain(|m| *m != id);
    axum::Json(json!({"success": true, "freed_bytes": 4_000_000_000u64})).into_response()
}

async fn start_download(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let body = match accept(&shared, &method, &uri, &body, &["repo_id"]) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let repo_id = body["repo_id"].as_str().unwrap_or_default().to_owned();
    let download_id = begin_download(&shared, &repo_id, false);
    axum::Json(json!({"download_id": download_id, "repo_id": repo_id, "status": "downloading"}))
        .into_response()
}

fn download_json(id: &str, d: &Download) -> Value {
    let status = if d.percent >= 100.0 {
        "completed"
    } else {
        "downloading"
    };
    json!({"download_id": id, "repo_id": d.repo_id, "status": status,
        "progress_percent": d.percent, "total_bytes": DOWNLOAD_BYTES,
        "downloaded_bytes": (DOWNLOAD_BYTES as f64 * d.percent / 100.0) as u64})
}

async fn progress(State(shared): State<Arc<Shared>>, uri: Uri, Path(id): Path<String>) -> Response {
    if off(&shared) {
        return missing();
    }
    log_get(&shared, &uri);
    let mut state = lock(&shared.admin_state);
    let Some(download) = state.downloads.get_mut(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            "download_not_found",
            &format!("no download {id}"),
        );
    };
    // Each poll moves it half-way: done on the second.
    download.percent = (download.percent + 50.0).min(100.0);
    let answer = download_json(&id, download);
    if download.percent >= 100.0 {
        let repo = download.repo_id.clone();
        let then_load = download.then_load;
        if !state.on_disk.contains(&repo) {
            state.on_disk.push(repo.clone());
        }
        state.downloadable.retain(|m| *m != repo);
        drop(state);
        if then_load {
            let mut loaded = lock(&shared.models);
            if !loaded.contains(&repo) {
                loaded.push(repo);
            }
        }
    }
    axum::Json(answer).into_response()
}

async fn downloads(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if off(&shared) {
        return missing();
    }
    log_get(&shared, &uri);
    let all = query.get("include_inactive").is_some_and(|v| v == "true");
    let state = lock(&shared.admin_state);
    let mut list: Vec<(&String, &Download)> = state
        .downloads
        .iter()
        .filter(|(_, d)| all || d.percent < 100.0)
        .collect();
    list.sort_by(|a, b| a.0.cmp(b.0));
    let downloads: Vec<Value> = list
        .into_iter()
        .map(|(id, d)| download_json(id, d))
        .collect();
    axum::Json(json!({"downloads": downloads})).into_response()
}
