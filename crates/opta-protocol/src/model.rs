//! Data shapes shared by events and routes: messages, snapshots, modes.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{SessionId, TurnId};

/// Role of a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the model.
    System,
    /// The person.
    User,
    /// The model.
    Assistant,
    /// A tool result.
    Tool,
}

/// An OpenAI chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// Its text (null for an assistant message that only calls tools).
    #[serde(default)]
    pub content: Option<String>,
    /// Tool calls requested by an assistant message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    /// The call a tool message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Optional author name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A plain text message.
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: Some(content.into()),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// Agent mode of a turn; `chat` when a request leaves it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Conversation.
    #[default]
    Chat,
    /// Carry out a task.
    Do,
    /// Make a plan.
    Plan,
    /// Review work.
    Review,
    /// Research a question.
    Research,
}

impl Mode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Chat => "chat",
            Mode::Do => "do",
            Mode::Plan => "plan",
            Mode::Review => "review",
            Mode::Research => "research",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "chat" => Some(Mode::Chat),
            "do" => Some(Mode::Do),
            "plan" => Some(Mode::Plan),
            "review" => Some(Mode::Review),
            "research" => Some(Mode::Research),
            _ => None,
        }
    }
}

/// A session's metadata as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionSnapshot {
    /// The session.
    pub session_id: SessionId,
    /// Model used for its turns.
    pub model: String,
    /// Optional title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Creation time (ISO-8601 UTC).
    pub created_at: String,
    /// Last change (ISO-8601 UTC).
    pub updated_at: String,
    /// The running turn, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_turn_id: Option<TurnId>,
    /// Turns waiting behind the running one.
    pub queued_turns: usize,
    /// Tool calls made in the session so far.
    pub tool_call_count: u64,
    /// Distinct writers among the active and queued turns.
    pub writer_count: usize,
}

/// Output format requested for a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Markdown.
    Markdown,
    /// Plain text.
    Text,
    /// JSON.
    Json,
}

/// Per-turn overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TurnOverrides {
    /// Model for this turn only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Provider for this turn only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Allow dangerous tools without asking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dangerous: Option<bool>,
    /// Approve permission prompts automatically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<bool>,
    /// Output format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// Further fields, kept as given.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}
