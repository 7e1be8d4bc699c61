//! The adapter between the v3 `/v3/lmx/*` plane and Opta LMX's admin API: v3 requests
//! (camelCase) become LMX's snake_case bodies, and LMX's answers become the v3 shapes of
//! `opta_protocol::lmx`, whatever spelling or unit the server used (`memory_gb` or
//! `memory_bytes`, epoch seconds or ISO-8601, `success: true` or a `status`).

use opta_protocol::{LmxDownload, LmxDownloadsResponse, LmxLoadResponse, LmxUnloadResponse};
use serde::Serialize;
use serde_json::{Map, Value};

use super::InferenceError;

/// A v3 request body as LMX's admin API takes it: top-level keys in snake_case, absent
/// fields left out.
pub fn snake_case_body<T: Serialize>(request: &T) -> Result<Value, InferenceError> {
    let value = serde_json::to_value(request)
        .map_err(|e| InferenceError::InvalidResponse(format!("request encoding: {e}")))?;
    Ok(match value {
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (snake_case(&k), v))
                .collect(),
        ),
        other => other,
    })
}

/// `keepAliveSec` → `keep_alive_sec`; snake_case stays as it is.
pub fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            if !out.is_empty() {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A load's (or its confirmation's) answer. `model_id` is the requested one when the server
/// does not name it; an answer with `success: true` and no status is `loaded`.
pub fn normalise_load(answer: Value, model_id: Option<&str>) -> LmxLoadResponse {
    let mut fields = object(answer);
    let success = fields.remove("success");
    let status = take_str(&mut fields, &["status"]).unwrap_or_else(|| {
        match success {
            Some(Value::Bool(false)) => "failed",
            _ => "loaded",
        }
        .into()
    });
    LmxLoadResponse {
        model_id: take_str(&mut fields, &["model_id", "id", "modelId"])
            .or_else(|| model_id.map(str::to_owned))
            .unwrap_or_default(),
        status,
        memory_bytes: bytes_field(&mut fields, "memory"),
        load_time_seconds: take_f64(&mut fields, &["load_time_seconds", "load_time_sec"]),
        confirmation_token: take_str(&mut fields, &["confirmation_token"]),
        download_id: take_str(&mut fields, &["download_id"]),
        message: take_str(&mut fields, &["message", "detail"]),
        extra: fields,
    }
}

/// An unload's (`status` defaults to `unloaded`) or a delete's (`deleted`) answer.
pub fn normalise_unload(answer: Value, model_id: &str, done: &str) -> LmxUnloadResponse {
    let mut fields = object(answer);
    fields.remove("success");
    LmxUnloadResponse {
        model_id: take_str(&mut fields, &["model_id", "id", "modelId"])
            .unwrap_or_else(|| model_id.to_owned()),
        status: take_str(&mut fields, &["status"]).unwrap_or_else(|| done.to_owned()),
        freed_bytes: bytes_field(&mut fields, "freed")
            .or_else(|| bytes_field(&mut fields, "memory_freed")),
        extra: fields,
    }
}

/// A download (started, or its progress); `download_id` falls back to `known_id`.
pub fn normalise_download(
    answer: Value,
    known_id: Option<&str>,
) -> Result<LmxDownload, InferenceError> {
    let mut fields = object(answer);
    let download_id = take_str(&mut fields, &["download_id", "id"])
        .or_else(|| known_id.map(str::to_owned))
        .ok_or_else(|| {
            InferenceError::InvalidResponse("a download answer without `download_id`".into())
        })?;
    Ok(LmxDownload {
        download_id,
        repo_id: take_str(&mut fields, &["repo_id", "model_id"]),
        status: take_str(&mut fields, &["status"]).unwrap_or_else(|| "downloading".into()),
        progress_percent: take_f64(&mut fields, &["progress_percent", "progress"]),
        downloaded_bytes: take_u64(&mut fields, &["downloaded_bytes"]),
        total_bytes: take_u64(&mut fields, &["total_bytes"]),
        error: take_str(&mut fields, &["error", "message"]),
        extra: fields,
    })
}

/// The download list: an array, or an object holding one under `downloads`.
pub fn normalise_downloads(answer: Value) -> Result<LmxDownloadsResponse, InferenceError> {
    let items = match answer {
        Value::Array(items) => items,
        Value::Object(mut fields) => match fields.remove("downloads") {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    let downloads = items
        .into_iter()
        .map(|item| normalise_download(item, None))
        .collect::<Result<_, _>>()?;
    Ok(LmxDownloadsResponse { downloads })
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(fields) => fields,
        Value::Null => Map::new(),
        other => Map::from_iter([("value".to_owned(), other)]),
    }
}

/// Removes and returns the first of `names` holding a string (an integer is taken as text).
pub fn take_str(fields: &mut Map<String, Value>, names: &[&str]) -> Option<String> {
    names.iter().find_map(|name| match fields.get(*name)? {
        Value::String(_) | Value::Number(_) => match fields.remove(*name)? {
            Value::String(s) => Some(s),
            other => Some(other.to_string()),
        },
        _ => None,
    })
}

/// Removes and returns the first of `names` holding a non-negative number.
pub fn take_f64(fields: &mut Map<String, Value>, names: &[&str]) -> Option<f64> {
    names.iter().find_map(|name| {
        let n = fields.get(*name)?.as_f64().filter(|n| *n >= 0.0)?;
        fields.remove(*name);
        Some(n)
    })
}

/// Like [`take_f64`], rounded to a whole number.
pub fn take_u64(fields: &mut Map<String, Value>, names: &[&str]) -> Option<u64> {
    take_f64(fields, names).map(|n| n.round() as u64)
}

/// `<prefix>_bytes`, else `<prefix>_gb` (GiB) in bytes, else `<prefix>_mb` (MiB).
pub fn bytes_field(fields: &mut Map<String, Value>, prefix: &str) -> Option<u64> {
    take_u64(fields, &[&format!("{prefix}_bytes")])
        .or_else(|| take_f64(fields, &[&format!("{prefix}_gb")]).map(|gb| gib(gb, 30)))
        .or_else(|| take_f64(fields, &[&format!("{prefix}_mb")]).map(|mb| gib(mb, 20)))
}

fn gib(units: f64, shift: u32) -> u64 {
    (units * f64::from(1u32 << shift)).round() as u64
}

/// A time as ISO-8601 UTC: strings are kept, numbers are Unix seconds.
pub fn take_timestamp(fields: &mut Map<String, Value>, names: &[&str]) -> Option<String> {
    names.iter().find_map(|name| {
        let text = match fields.get(*name)? {
            Value::String(s) => s.clone(),
            Value::Number(n) => {
                let secs = n.as_f64()?;
                let millis = (secs * 1000.0).round() as i64;
                chrono::DateTime::from_timestamp_millis(millis)?
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            }
            _ => return None,
        };
        fields.remove(*name);
        Some(text)
    })
}

#[cfg(test)]
mod tests {
    use opta_protocol::LmxLoadRequest;
    use serde_json::json;

    use super::*;

    #[test]
    fn requests_become_snake_case_without_absent_fields() {
        let request = LmxLoadRequest {
            model_id: "m".into(),
            auto_download: Some(true),
            keep_alive_sec: Some(300),
            performance_overrides: Some(json!({"kv_bits": 8})),
            allow_unsupported_runtime: Some(false),
            ..LmxLoadRequest::default()
        };
        assert_eq!(
            snake_case_body(&request).unwrap(),
            json!({"model_id": "m", "auto_download": true, "keep_alive_sec": 300,
                "performance_overrides": {"kv_bits": 8}, "allow_unsupported_runtime": false})
        );
        assert_eq!(snake_case("already_snake"), "already_snake");
    }

    #[test]
    fn answers_in_every_spelling_become_the_v3_shapes() {
        let loaded = normalise_load(
            json!({"success": true, "memory_gb": 2.0, "load_time_sec": 1.5, "backend": "mlx"}),
            Some("m"),
        );
        assert_eq!(
            serde_json::to_value(loaded).unwrap(),
            json!({"model_id": "m", "status": "loaded", "memory_bytes": 2_147_483_648u64,
                "load_time_seconds": 1.5, "backend": "mlx"})
        );
        let asked = normalise_load(
            json!({"model_id": "big", "status": "download_required",
                "confirmation_token": "tok", "message": "12 GB"}),
            Some("big"),
        );
        assert_eq!(
            (asked.status.as_str(), asked.confirmation_token.as_deref()),
            ("download_required", Some("tok"))
        );
        let unloaded = normalise_unload(json!({"success": true}), "m", "unloaded");
        assert_eq!(
            serde_json::to_value(unloaded).unwrap(),
            json!({"model_id": "m", "status": "unloaded"})
        );
        let deleted = normalise_unload(json!({"success": true, "freed_bytes": 4}), "m", "deleted");
        assert_eq!(deleted.freed_bytes, Some(4));
        let list = normalise_downloads(json!({"downloads": [{"download_id": "d",
            "repo_id": "r", "status": "completed", "progress_percent": 100.0}]}))
        .unwrap();
        assert_eq!(list.downloads[0].status, "completed");
        assert!(normalise_download(json!({"status": "x"}), None).is_err());
        assert_eq!(
            normalise_download(json!({"progress_percent": 5}), Some("d"))
                .unwrap()
                .download_id,
            "d"
        );
    }
}
