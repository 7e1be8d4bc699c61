//! The loaded-model list, normalised from LMX's `/admin/models` or OpenAI's `/v1/models`, and
//! matching of model ids the way people type them.

use serde::Serialize;
use serde_json::{Map, Value};

use super::InferenceError;

/// Where a model list came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelSource {
    /// LMX's `GET /admin/models`.
    Admin,
    /// OpenAI's `GET /v1/models`.
    V1,
}

/// One loaded model: its id plus whatever else the server said about it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelEntry {
    /// Model id.
    pub id: String,
    /// Always true: the list holds loaded models.
    pub loaded: bool,
    /// The server's other fields, kept as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The loaded models, normalised.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelList {
    /// Which endpoint answered.
    pub source: ModelSource,
    /// The models.
    pub models: Vec<ModelEntry>,
}

impl ModelList {
    /// From `{loaded: [{id, ...}]}`.
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
        let models = items
            .iter()
            .filter_map(|item| {
                let mut extra = item.as_object().cloned().unwrap_or_default();
                let id = match extra.remove("id") {
                    Some(Value::String(id)) => id,
                    _ => item.as_str()?.to_owned(),
                };
                extra.remove("loaded");
                Some(ModelEntry {
                    id,
                    loaded: true,
                    extra,
                })
            })
            .collect();
        Ok(Self { source, models })
    }

    /// The model ids.
    pub fn ids(&self) -> Vec<String> {
        self.models.iter().map(|m| m.id.clone()).collect()
    }
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
        let admin =
            ModelList::from_admin(&json!({"loaded": [{"id": "a", "memoryGb": 4}]})).unwrap();
        assert_eq!(
            serde_json::to_value(&admin).unwrap(),
            json!({"source": "admin", "models": [{"id": "a", "loaded": true, "memoryGb": 4}]})
        );
        let v1 = ModelList::from_v1(
            &json!({"object": "list", "data": [{"id": "b", "object": "model"}]}),
        )
        .unwrap();
        assert_eq!(v1.ids(), vec!["b"]);
        assert!(ModelList::from_v1(&json!({"nope": 1})).is_err());
    }
}
