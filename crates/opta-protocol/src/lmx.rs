//! The `/v3/lmx/*` plane: the inference server's status, models and (on Opta LMX) its admin
//! API. Requests are v3-style camelCase; answers keep the field names the original client
//! library reads (`model_id`, `memory_bytes`, ... in snake_case, as Opta LMX writes them), with
//! whatever else the server said kept in `extra`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One model, loaded or known to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LmxModel {
    /// The server's model id.
    pub model_id: String,
    /// `"loaded"` for the models a list of loaded models holds.
    pub status: String,
    /// Memory it takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Context window in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u64>,
    /// When it was loaded (ISO-8601 UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_at: Option<String>,
    /// Requests it served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_count: Option<u64>,
    /// The server's other fields, as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `GET /v3/lmx/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LmxStatusResponse {
    /// `"ok"` when the server answered.
    pub status: String,
    /// The server's version (LMX).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// How long the server has been up (LMX).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<f64>,
    /// Loaded models.
    pub models: Vec<LmxModel>,
    /// The inference server's base URL.
    pub url: String,
    /// Whether it offers LMX's admin API.
    #[serde(rename = "adminApi")]
    pub admin_api: bool,
}

/// `GET /v3/lmx/models`; carries an ETag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LmxModelsResponse {
    /// Loaded models.
    pub models: Vec<LmxModel>,
    /// `"admin"` (LMX's `/admin/models`) or `"v1"` (`/v1/models`).
    pub source: String,
}

/// `POST /v3/lmx/models/load`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LmxLoadRequest {
    /// The model to load.
    pub model_id: String,
    /// Inference backend to load it with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Download the model if it is not on disk, without asking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_download: Option<bool>,
    /// Unload after this many idle seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_sec: Option<u64>,
    /// Backend tuning, passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub performance_overrides: Option<Value>,
    /// Load even on a runtime the server does not vouch for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_unsupported_runtime: Option<bool>,
}

/// `POST /v3/lmx/models/load/confirm`: go ahead with a download a load asked about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LmxConfirmRequest {
    /// The `confirmation_token` of the load's `download_required` answer.
    pub confirmation_token: String,
}

/// `POST /v3/lmx/models/unload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LmxUnloadRequest {
    /// The model to unload.
    pub model_id: String,
}

/// `POST /v3/lmx/models/download`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LmxDownloadRequest {
    /// The repository to download (for example `mlx-community/Qwen2.5-7B`).
    pub repo_id: String,
    /// Revision (branch, tag or commit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Only files matching these patterns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_patterns: Option<Vec<String>>,
    /// No files matching these patterns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_patterns: Option<Vec<String>>,
}

/// What a load (or its confirmation) did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LmxLoadResponse {
    /// The model.
    pub model_id: String,
    /// `loaded`, `download_required` (confirm with the token) or `downloading`.
    pub status: String,
    /// Memory it takes, once loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// How long the load took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_time_seconds: Option<f64>,
    /// For `download_required`: what `load/confirm` takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmation_token: Option<String>,
    /// For `downloading`: the download to follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_id: Option<String>,
    /// The server's explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The server's other fields, as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What an unload or a delete did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LmxUnloadResponse {
    /// The model.
    pub model_id: String,
    /// `unloaded` (unload) or `deleted` (delete).
    pub status: String,
    /// Memory (unload) or disk (delete) freed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freed_bytes: Option<u64>,
    /// The server's other fields, as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A model download: started, listed, or its progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LmxDownload {
    /// The download.
    pub download_id: String,
    /// What it downloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_id: Option<String>,
    /// `downloading`, `completed`, `failed`, ...
    pub status: String,
    /// 0..100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_percent: Option<f64>,
    /// Bytes so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downloaded_bytes: Option<u64>,
    /// Bytes in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The server's other fields, as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `GET /v3/lmx/models/downloads`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LmxDownloadsResponse {
    /// The downloads.
    pub downloads: Vec<LmxDownload>,
}

/// A model id (or download id) as it stands in a URL path: what may not stand there as it is
/// is percent-encoded, `/` stays (ids such as `mlx-community/Qwen2.5-7B` are paths on LMX
/// too; `DELETE /v3/lmx/models/:modelId` takes the rest of the path).
pub fn path_escape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn paths_are_escaped_but_slashes_kept() {
        assert_eq!(
            super::path_escape("mlx-community/Qwen 2.5?x#é"),
            "mlx-community/Qwen%202.5%3Fx%23%C3%A9"
        );
    }
}
