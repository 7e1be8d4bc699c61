//! What the model is sent: the system prompt (workspace, mode, tools, `AGENTS.md`, output
//! format) and the history as the server accepts it.
//!
//! For a server that takes `tools`, the history goes as stored (OpenAI `tool_calls` and
//! `tool` messages). For a model known to refuse `tools`, calls are described in the system
//! prompt and replayed as text: an assistant message's calls become
//! `<tool_call>{"name":..,"arguments":..}</tool_call>` lines in its content, and each tool
//! result becomes a `user` message `<tool_response name="..">..</tool_response>`, which every
//! chat template accepts.

use std::fmt::Write as _;
use std::sync::Arc;

use opta_protocol::{ChatMessage, Format, Mode, Role};
use serde_json::{Value, json};

use super::Workspace;
use super::tools::{self, TOOLS};

/// Largest `AGENTS.md` text added to the prompt.
const AGENTS_MD_CAP: usize = 16 * 1024;
/// Tool results (newest first) kept whole in the prompt; older ones are shortened.
pub const TOOL_RESULTS_BUDGET: usize = 24 * 1024;
/// What is left of a shortened tool result.
const SHORTENED_KEEP: usize = 300;

fn mode_rule(mode: Mode) -> &'static str {
    match mode {
        Mode::Chat => {
            "chat: answer the user; file changes and commands run only once a person \
             approves them"
        }
        Mode::Do => "do: carry out the task; you may create and edit files, commands need approval",
        Mode::Plan => "plan: read and search, then write a plan; you cannot change anything",
        Mode::Review => "review: read and search, then review the work; you cannot change anything",
        Mode::Research => {
            "research: read and search to answer the question; you cannot change anything"
        }
    }
}

/// The system prompt of a turn. `custom` replaces the opening text (`--system-prompt-file`);
/// `agents` is the workspace's `AGENTS.md` ([`agents_md`]); with `text_tools` the tools are
/// described for text-form calls.
pub fn system_prompt(
    custom: Option<&str>,
    workspace: &Workspace,
    agents: Option<&str>,
    mode: Mode,
    format: Option<Format>,
    text_tools: bool,
) -> String {
    let root = workspace.root().display();
    let mut prompt = match custom {
        Some(text) => text.trim_end().to_owned(),
        None => format!(
            "You are opta, a coding agent. You work in the workspace {root}: use the tools to \
             look at its files, change them and run commands there, with paths relative to \
             it. Read a file before you change it, prefer edit_file for small changes, and \
             check your work. When the task is done, say briefly what you did."
        ),
    };
    let _ = write!(
        prompt,
        "\n\nWorkspace: {root}\nMode: {}\nTools: {}",
        mode_rule(mode),
        tools::names()
    );
    if text_tools {
        prompt.push_str(
            "\n\nTo call a tool, write exactly one line per call and nothing after it:\n\
             <tool_call>{\"name\": \"TOOL\", \"arguments\": {...}}</tool_call>\n\
             The result comes back as <tool_response>. The tools and their JSON arguments:\n",
        );
        for tool in TOOLS {
            let _ = writeln!(
                prompt,
                "- {}: {} Arguments: {}",
                tool.name,
                tool.description,
                tool.parameters()
            );
        }
    }
    if let Some(agents) = agents {
        let _ = write!(prompt, "\n\nProject instructions (AGENTS.md):\n{agents}");
    }
    match format {
        Some(Format::Text) => prompt.push_str("\n\nAnswer in plain text, without markdown."),
        Some(Format::Json) => prompt.push_str(
            "\n\nYour final answer must be one valid JSON value and nothing else (no prose, \
             no code fence).",
        ),
        Some(Format::Markdown) | None => {}
    }
    prompt
}

/// The workspace's `AGENTS.md`, when it is a regular file (never a FIFO or a device), read
/// on a blocking thread, at most four times the cap, shortened to the cap.
pub async fn agents_md(workspace: &Workspace) -> Option<String> {
    let ws = workspace.clone();
    let read = tokio::task::spawn_blocking(move || {
        ws.read_text(std::path::Path::new("AGENTS.md"), 4 * AGENTS_MD_CAP as u64)
    });
    let (text, _, _) = read.await.ok()?.ok()?;
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    Some(tools::head_and_tail(text, AGENTS_MD_CAP))
}

/// The messages of a request: the system prompt, then the history with old tool results
/// shortened, every call answered (a call whose result is missing, from a turn that was
/// cancelled or interrupted, gets a note), and, with `text_tools`, calls and results as text.
pub fn wire_messages(
    system: &str,
    history: &[Arc<ChatMessage>],
    text_tools: bool,
) -> Vec<Arc<ChatMessage>> {
    let mut out = Vec::with_capacity(history.len() + 1);
    out.push(Arc::new(ChatMessage::text(Role::System, system)));
    // Newest tool results stay whole up to the budget.
    let mut budget = TOOL_RESULTS_BUDGET;
    let mut shorten = vec![false; history.len()];
    for (i, m) in history.iter().enumerate().rev() {
        if m.role == Role::Tool {
            let len = m.content.as_deref().map_or(0, str::len);
            if len > budget {
                shorten[i] = len > SHORTENED_KEEP;
                budget = 0;
            } else {
                budget -= len;
            }
        }
    }
    let mut open_calls: Vec<(String, String)> = Vec::new();
    for (i, message) in history.iter().enumerate() {
        if message.role != Role::Tool {
            answer_missing(&mut out, &mut open_calls, text_tools);
        }
        let message = if shorten[i] {
            let text = message.content.as_deref().unwrap_or("");
            let mut keep = SHORTENED_KEEP;
            while !text.is_char_boundary(keep) {
                keep -= 1;
            }
            Arc::new(ChatMessage {
                content: Some(format!(
                    "{}\n[… an old result, shortened from {} bytes; call the tool again if \
                     you need it …]",
                    &text[..keep],
                    text.len()
                )),
                ..ChatMessage::clone(message)
            })
        } else {
            message.clone()
        };
        match message.role {
            Role::Assistant => {
                for call in message.tool_calls.iter().flatten() {
                    let id = call["id"].as_str().unwrap_or_default().to_owned();
                    let name = call["function"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    open_calls.push((id, name));
                }
                if text_tools && message.tool_calls.is_some() {
                    out.push(Arc::new(calls_as_text(&message)));
                } else if message.content.is_none() {
                    // OpenAI allows `null` beside tool calls; llama-cpp-python (and others
                    // built on the same schema) answer 500 to anything but a string.
                    out.push(Arc::new(ChatMessage {
                        content: Some(String::new()),
                        ..ChatMessage::clone(&message)
                    }));
                } else {
                    out.push(message);
                }
            }
            Role::Tool => {
                let id = message.tool_call_id.clone().unwrap_or_default();
                let name = open_calls
                    .iter()
                    .position(|(open, _)| *open == id)
                    .map(|at| open_calls.remove(at).1)
                    .unwrap_or_default();
                if text_tools {
                    out.push(Arc::new(result_as_text(
                        &name,
                        message.content.as_deref().unwrap_or(""),
                    )));
                } else {
                    out.push(message);
                }
            }
            Role::System | Role::User => out.push(message),
        }
    }
    answer_missing(&mut out, &mut open_calls, text_tools);
    out
}

fn answer_missing(
    out: &mut Vec<Arc<ChatMessage>>,
    open: &mut Vec<(String, String)>,
    text_tools: bool,
) {
    const NOT_RUN: &str = "(no result: the turn ended before this call finished)";
    for (id, name) in open.drain(..) {
        out.push(Arc::new(if text_tools {
            result_as_text(&name, NOT_RUN)
        } else {
            ChatMessage {
                tool_call_id: Some(id),
                ..ChatMessage::text(Role::Tool, NOT_RUN)
            }
        }));
    }
}

fn calls_as_text(message: &ChatMessage) -> ChatMessage {
    let mut text = message.content.clone().unwrap_or_default();
    for call in message.tool_calls.iter().flatten() {
        let name = &call["function"]["name"];
        let arguments = call["function"]["arguments"]
            .as_str()
            .and_then(|a| serde_json::from_str::<Value>(a).ok())
            .unwrap_or_else(|| json!({}));
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        let _ = write!(
            text,
            "<tool_call>{}</tool_call>",
            json!({"name": name, "arguments": arguments})
        );
    }
    ChatMessage::text(Role::Assistant, text)
}

fn result_as_text(name: &str, result: &str) -> ChatMessage {
    ChatMessage::text(
        Role::User,
        format!("<tool_response name=\"{name}\">\n{result}\n</tool_response>"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_message() -> ChatMessage {
        ChatMessage {
            tool_calls: Some(vec![json!({"id": "c1", "type": "function",
                "function": {"name": "read_file", "arguments": "{\"path\":\"a\"}"}})]),
            ..ChatMessage::text(Role::Assistant, "Looking.")
        }
    }

    fn result(id: &str, text: &str) -> ChatMessage {
        ChatMessage {
            tool_call_id: Some(id.into()),
            ..ChatMessage::text(Role::Tool, text)
        }
    }

    #[test]
    fn text_tools_replay_calls_and_results_as_text() {
        let history = vec![
            Arc::new(ChatMessage::text(Role::User, "hi")),
            Arc::new(call_message()),
            Arc::new(result("c1", "1\tfn a()")),
        ];
        let wire = wire_messages("sys", &history, true);
        assert_eq!(wire.len(), 4);
        assert_eq!(
            wire[2].content.as_deref(),
            Some(
                "Looking.\n<tool_call>{\"arguments\":{\"path\":\"a\"},\"name\":\"read_file\"}</tool_call>"
            )
        );
        assert!(wire[2].tool_calls.is_none());
        assert_eq!(wire[3].role, Role::User);
        assert!(
            wire[3]
                .content
                .as_deref()
                .unwrap()
                .starts_with("<tool_response name=\"read_file\">")
        );
        let native = wire_messages("sys", &history, false);
        assert_eq!(native[2].tool_calls, call_message().tool_calls);
        assert_eq!(native[3].role, Role::Tool);
    }

    #[test]
    fn a_call_without_text_goes_with_empty_content_not_null() {
        let silent = ChatMessage {
            content: None,
            ..call_message()
        };
        let history = vec![
            Arc::new(ChatMessage::text(Role::User, "hi")),
            Arc::new(silent),
            Arc::new(result("c1", "1\tfn a()")),
        ];
        let native = wire_messages("sys", &history, false);
        assert_eq!(native[2].content.as_deref(), Some(""));
        assert_eq!(native[2].tool_calls, call_message().tool_calls);
    }

    #[test]
    fn unanswered_calls_get_a_note_and_old_results_are_shortened() {
        let big = "x".repeat(TOOL_RESULTS_BUDGET);
        let history = vec![
            Arc::new(call_message()),
            Arc::new(result("c1", &big)),
            Arc::new(call_message()),
            Arc::new(result("c1", &big)),
            Arc::new(call_message()),
            Arc::new(ChatMessage::text(Role::User, "next")),
        ];
        let wire = wire_messages("sys", &history, false);
        assert!(
            wire[2]
                .content
                .as_deref()
                .unwrap()
                .contains("shortened from")
        );
        assert_eq!(wire[4].content.as_deref().map(str::len), Some(big.len()));
        assert_eq!(wire[6].role, Role::Tool);
        assert!(wire[6].content.as_deref().unwrap().contains("no result"));
        assert_eq!(wire[7].role, Role::User);
    }
}
