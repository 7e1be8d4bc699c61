//! The loaded-model list, normalised from LMX's `/admin/models` or OpenAI's `/v1/models` into
//! the v3 shape, and matching of model ids the way people type them.

use opta_protocol::LmxModel;
use serde::Serialize;
use serde_json::{Map, Value};

use super::InferenceError;
use super::admin::{bytes_field, take_str, take_timestamp, take_u64};

/// Where a model list came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelSource {
    /// LMX's `GET /admin/models`.
    Admin,
    /// OpenAI's `GET /v1/models`.
    V1,
}

impl ModelSource {
    /// `"admin"` or `"v1"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelSource::Admin => "admin",
            ModelSource::V1 => "v1",
        }
    }
}

/// The loaded models, normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelList {
    /// Which endpoint answered.
    pub source: ModelSource,
    /// The models.
    pub models: Vec<LmxModel>,
}

impl ModelList {
    /// From `{loaded: [{id, memory_gb, loaded_at, ...}]}`.
    pub fn from_admin(body: &Value) -> Result<Self, InferenceError> {
        Self::from_array(body.get("loaded"), ModelSource::Admin, "loaded")
    }

    /// From `{data: [{id, ...}]}`.
    pub fn from_v1(body: &Value) -> Result<Self, InferenceError> {
        Self::from_array(body.get("data"), ModelSource::V1, "data")
    }

    fn from_array(
        items: Option<&Value>,
        source: ModelSource,
        field: &str,
    ) -> Result<Self, InferenceError> {
        let items = items.and_then(Value::as_array).ok_or_else(|| {
            InferenceError::InvalidResponse(format!("model list without `{field}` array"))
        })?;
        Ok(Self {
            source,
            models: items.iter().filter_map(normalise_model).collect(),
        })
    }

    /// The model ids.
    pub fn ids(&self) -> Vec<String> {
        self.models.iter().map(|m| m.model_id.clone()).collect()
    }
}

/// One model item (`{id | model_id, ...}` or a bare id string) in the v3 shape; the fields it
/// does not map stay in `extra`.
pub fn normalise_model(item: &Value) -> Option<LmxModel> {
    if let Value::String(id) = item {
        return Some(LmxModel {
            model_id: id.clone(),
            status: "loaded".into(),
            memory_bytes: None,
            context_length: None,
            loaded_at: None,
            request_count: None,
            extra: Map::new(),
        });
    }
    let mut fields = item.as_object()?.clone();
    let model_id = take_str(&mut fields, &["model_id", "id", "modelId"])?;
    let loaded = fields.remove("loaded");
    let status = take_str(&mut fields, &["status"]).unwrap_or_else(|| {
        match loaded {
            Some(Value::Bool(false)) => "unloaded",
            _ => "loaded",
        }
        .into()
    });
    Some(LmxModel {
        model_id,
        status,
        memory_bytes: bytes_field(&mut fields, "memory"),
        context_length: take_u64(&mut fields, &["context_length", "max_context_length"]),
        loaded_at: take_timestamp(&mut fields, &["loaded_at"]),
        request_count: take_u64(&mut fields, &["request_count"]),
        extra: fields,
    })
}

/// Finds `requested` among `loaded`: exactly, then ignoring case, then by the last path segment
/// (`mlx-community/Qwen2.5-7B` matches `Qwen2.5-7B` and the reverse). An empty request takes the
/// first loaded model. Returns the server's (canonical) id.
pub fn resolve_model<'a>(requested: &str, loaded: &'a [String]) -> Option<&'a str> {
    if requested.is_empty() {
        return loaded.first().map(String::as_str);
    }
    let last = |s: &str| s.rsplit('/').next().unwrap_or(s).to_ascii_lowercase();
    loaded
        .iter()
        .find(|m| m.as_str() == requested)
        .or_else(|| loaded.iter().find(|m| m.eq_ignore_ascii_case(requested)))
        .or_else(|| {
            let wanted = last(requested);
            loaded.iter().find(|m| last(m) == wanted)
        })
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn matching_order() {
        let loaded = vec![
            "mlx-community/Qwen2.5-7B".to_owned(),
            "Llama-3-8B".to_owned(),
            "llama-3-8b".to_owned(),
        ];
        assert_eq!(resolve_model("llama-3-8b", &loaded), Some("llama-3-8b"));
        assert_eq!(resolve_model("LLAMA-3-8B", &loaded), Some("Llama-3-8B"));
        assert_eq!(
            resolve_model("qwen2.5-7b", &loaded),
            Some("mlx-community/Qwen2.5-7B")
        );
        assert_eq!(
            resolve_model("other-org/Qwen2.5-7B", &loaded),
            Some("mlx-community/Qwen2.5-7B")
        );
        assert_eq!(resolve_model("mistral", &loaded), None);
        assert_eq!(resolve_model("", &loaded), Some("mlx-community/Qwen2.5-7B"));
        assert_eq!(resolve_model("", &[]), None);
    }

    #[test]
    fn normalises_both_shapes() {
        let admin = ModelList::from_admin(&json!({"loaded": [{"id": "a", "loaded": true,
            "memory_gb": 1.5, "loaded_at": 1_700_000_000.5, "request_count": 3,
            "context_length": 8192, "last_used_at": 1_700_000_100.0}], "count": 1}))
        .unwrap();
        assert_eq!(
            serde_json::to_value(&admin.models).unwrap(),
            json!([{"model_id": "a", "status": "loaded", "memory_bytes": 1_610_612_736u64,
                "context_length": 8192, "loaded_at": "2023-11-14T22:13:20.500Z",
                "request_count": 3, "last_used_at": 1_700_000_100.0}])
        );
        let v1 = ModelList::from_v1(
            &json!({"object": "list", "data": [{"id": "b", "object": "model"}, "c"]}),
        )
        .unwrap();
        assert_eq!(v1.ids(), vec!["b", "c"]);
        assert_eq!(
            serde_json::to_value(&v1.models[0]).unwrap(),
            json!({"model_id": "b", "status": "loaded", "object": "model"})
        );
        assert!(ModelList::from_v1(&json!({"nope": 1})).is_err());
    }
}
