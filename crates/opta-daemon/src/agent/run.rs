//! The agent loop of one turn: call the model with the tools, run the calls it makes (in
//! order, each behind its permission), hand the results back, and call it again until it
//! answers without a call or a budget ends the turn.
//!
//! The loop runs in the turn's own task and owns nothing of the session: every event and
//! every message goes to the session actor as a [`TurnUpdate`], in order, and permission
//! questions go there too (the actor owns grants and pending requests). Cancelling the turn
//! aborts this task, which drops whatever tool is running (a command's process group is
//! killed when its future is dropped).

use std::sync::Arc;
use std::time::Instant;

use opta_protocol::{ChatMessage, Mode, Role, TurnErrorCode, TurnOverrides};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::permissions::{self, Policy};
use super::textcalls::{self, Leftover, TextCallFilter};
use super::tools::{self, FileMemory, Prepared};
use super::{AgentConfig, Workspace, prompt};
use crate::context::DaemonContext;
use crate::inference::{AsyncDeltaSink, Completion, Delta, InferenceError, Usage, resolve_model};

/// Why a turn's loop failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The inference server failed.
    #[error(transparent)]
    Inference(#[from] InferenceError),
    /// A tool budget ran out (rounds, or one call repeated).
    #[error("{0}")]
    ToolLimit(String),
}

impl AgentError {
    /// The `turn.error` code.
    pub fn code(&self) -> Option<TurnErrorCode> {
        match self {
            AgentError::Inference(e) => e.code(),
            AgentError::ToolLimit(_) => Some(TurnErrorCode::ToolLimit),
        }
    }
}

/// A question for the clients: may this call run?
#[derive(Debug, Clone)]
pub(crate) struct PermissionAsk {
    pub tool_name: String,
    pub args: Value,
    pub summary: String,
    pub diff: Option<String>,
    /// The grant that would cover it (`None`: no grant can).
    pub grant_key: Option<String>,
    /// For a `git` command: what git's configuration, hooks and info are now. A grant given
    /// when they were otherwise does not cover the call.
    pub guard: Option<u64>,
}

/// Whether a grant is for `git` (what it runs depends on the repository's configuration
/// and hooks).
fn is_git_grant(key: &str) -> bool {
    key.split_once(':')
        .is_some_and(|(_, scope)| scope == "git" || scope.starts_with("git "))
}

/// The answer: allowed or not, and by whom (`grant`, a client's `decidedBy`, `timeout`,
/// `cancel`).
#[derive(Debug, Clone)]
pub(crate) struct Verdict {
    pub allowed: bool,
    pub by: String,
}

/// A finished tool call.
#[derive(Debug)]
pub(crate) struct ToolEnded {
    pub id: String,
    pub name: String,
    pub result: Value,
    pub approved_by: Option<String>,
    pub duration_ms: u64,
    /// The `tool` message for the history.
    pub message: ChatMessage,
}

/// What a turn task tells its session actor. `turn_no` tells a cancelled turn's late
/// messages apart from the current turn's.
pub(crate) enum TurnUpdate {
    /// The preflight check matched `requested` to this loaded id.
    Resolved {
        turn_no: u64,
        requested: String,
        model: String,
    },
    Delta {
        turn_no: u64,
        delta: Delta,
    },
    Progress {
        turn_no: u64,
        message: String,
    },
    /// Messages for the history: the assistant's calls of a round, or a note to the model.
    Messages {
        turn_no: u64,
        messages: Vec<ChatMessage>,
    },
    ToolStart {
        turn_no: u64,
        id: String,
        name: String,
        args: Value,
    },
    Permission {
        turn_no: u64,
        ask: PermissionAsk,
        reply: oneshot::Sender<Verdict>,
    },
    ToolEnd {
        turn_no: u64,
        end: ToolEnded,
    },
    Finished {
        turn_no: u64,
        result: Result<Completion, AgentError>,
        memory: FileMemory,
    },
}

/// What the actor gives a turn to run.
pub(crate) struct TurnPlan {
    pub model: String,
    /// The history, the turn's user message last.
    pub history: Vec<Arc<ChatMessage>>,
    pub mode: Mode,
    pub overrides: Option<TurnOverrides>,
    pub workspace: Workspace,
    /// The session's memory of reads, handed back in `Finished`.
    pub memory: FileMemory,
    /// The session itself (background processes started by the turn report to it).
    pub session: Option<crate::session::SessionHandle>,
}

/// Runs the turn and reports every step to the actor, the end included.
pub(crate) async fn run_turn(
    ctx: Arc<DaemonContext>,
    plan: TurnPlan,
    turn_no: u64,
    updates: mpsc::Sender<TurnUpdate>,
) {
    if let Some(panics) = ctx.faults.turn_panics_on
        && plan
            .history
            .last()
            .and_then(|m| m.content.as_deref())
            .is_some_and(panics)
    {
        panic!("injected fault: turn task panics");
    }
    let started = Instant::now();
    let mut turn = Turn {
        ctx: &ctx,
        turn_no,
        updates: &updates,
        memory: FileMemory::default(),
        session: None,
    };
    let TurnPlan {
        model,
        history,
        mode,
        overrides,
        workspace,
        memory,
        session,
    } = plan;
    turn.memory = memory;
    turn.session = session;
    let result = turn
        .drive(&model, history, mode, overrides.as_ref(), &workspace)
        .await;
    ctx.metrics
        .inference_seconds
        .observe(started.elapsed().as_secs_f64());
    if let Err(AgentError::Inference(e)) = &result {
        let code = e.code().map_or("other", |c| c.as_str());
        ctx.metrics
            .inference_errors
            .get_or_create(&crate::metrics::ErrorLabels {
                code: code.to_owned(),
            })
            .inc();
        if e.invalidates_model_cache() {
            ctx.preflight.invalidate();
        }
    }
    let memory = std::mem::take(&mut turn.memory);
    let _ = updates
        .send(TurnUpdate::Finished {
            turn_no,
            result,
            memory,
        })
        .await;
}

/// A call to run, from the server's `tool_calls` or from the text.
/// `output` cut to `cap` bytes (on a character boundary) with a note of what was left out
/// and how the tool pages on; as it is when it fits. Every tool's result goes through here,
/// to the model and to clients alike.
fn cap_result(tool: &str, mut output: String, cap: usize) -> String {
    if output.len() <= cap {
        return output;
    }
    let total = output.len();
    let mut end = cap;
    while !output.is_char_boundary(end) {
        end -= 1;
    }
    output.truncate(end);
    let how = match tool {
        "read_file" => "read on with `offset` (and `limit`)",
        "list_dir" => "list a subdirectory",
        "find_files" => "use a narrower `pattern` or `path`",
        "search_files" => "narrow the search with `path` or `glob`",
        "run_command" | "bg_output" => "filter the output (e.g. `| head`, `| tail`, `grep`)",
        _ => "ask for less at a time",
    };
    output.push_str(&format!(
        "\n[… {} of {total} bytes left out (the result limit is {} KiB): {how} …]",
        total - end,
        cap / 1024
    ));
    output
}

/// `id`, or when this turn gave it out already, `id-2`, `id-3`, ...: the model's history and
/// every event use the id returned.
fn unique_id(given: &mut std::collections::HashSet<String>, id: String) -> String {
    if given.insert(id.clone()) {
        return id;
    }
    (2u32..)
        .map(|n| format!("{id}-{n}"))
        .find(|candidate| given.insert(candidate.clone()))
        .unwrap_or(id)
}

/// What makes two calls the same for the repeat guard: the tool and its parsed arguments,
/// written canonically (keys sorted, no whitespace), so spacing or key order never makes a
/// repeat look new; arguments that do not parse compare as written, trimmed.
fn repeat_key(call: &PlannedCall) -> String {
    fn canonical(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, key) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(key.clone()).to_string());
                    out.push(':');
                    canonical(&map[key], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canonical(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut key = format!("{}\0", call.name);
    match &call.arguments {
        Ok(value) => canonical(value, &mut key),
        Err(_) => key.push_str(call.raw.trim()),
    }
    key
}

struct PlannedCall {
    id: String,
    name: String,
    arguments: Result<Value, String>,
    /// The arguments as the model wrote them (for the history).
    raw: String,
}

struct Turn<'a> {
    ctx: &'a DaemonContext,
    turn_no: u64,
    updates: &'a mpsc::Sender<TurnUpdate>,
    memory: FileMemory,
    session: Option<crate::session::SessionHandle>,
}

impl Turn<'_> {
    async fn send(&self, update: TurnUpdate) {
        // A closed channel means the actor is gone; nothing listens any more.
        let _ = self.updates.send(update).await;
    }

    async fn resolve_model(&self, model: &str) -> Result<String, InferenceError> {
        let list = self.ctx.preflight.models(&self.ctx.lmx).await?;
        let loaded = list.ids();
        if loaded.is_empty() {
            return Err(InferenceError::NoModelLoaded {
                url: self.ctx.lmx.base_url().to_owned(),
            });
        }
        let canonical =
            resolve_model(model, &loaded).ok_or_else(|| InferenceError::ModelNotLoaded {
                model: model.to_owned(),
                loaded: loaded.clone(),
            })?;
        if canonical != model {
            self.send(TurnUpdate::Resolved {
                turn_no: self.turn_no,
                requested: model.to_owned(),
                model: canonical.to_owned(),
            })
            .await;
        }
        Ok(canonical.to_owned())
    }

    async fn drive(
        &mut self,
        model: &str,
        mut history: Vec<Arc<ChatMessage>>,
        mode: Mode,
        overrides: Option<&TurnOverrides>,
        workspace: &Workspace,
    ) -> Result<Completion, AgentError> {
        let model = self.resolve_model(model).await?;
        let config: &AgentConfig = &self.ctx.agent;
        let definitions = tools::definitions();
        let format = overrides.and_then(|o| o.format);
        let mut usage: Option<Usage> = None;
        let mut rounds = 0u32;
        let mut repeats: Option<(String, u32)> = None;
        let mut next_call = 0u32;
        // Call ids given out in this turn: clients pair `tool.end` with `tool.start` by id.
        let mut ids = std::collections::HashSet::new();
        // Built once per turn (it reads AGENTS.md), again only if the model turns out to
        // refuse `tools` mid-turn.
        let mut system: Option<(bool, String)> = None;
        let agents = prompt::agents_md(workspace).await;
        loop {
            rounds += 1;
            let text_tools = self.ctx.tool_support.refuses(&model);
            if system
                .as_ref()
                .is_none_or(|(built_for, _)| *built_for != text_tools)
            {
                let text = prompt::system_prompt(
                    config.system_prompt.as_deref(),
                    workspace,
                    agents.as_deref(),
                    mode,
                    format,
                    text_tools,
                );
                system = Some((text_tools, text));
            }
            let system_text = system.as_ref().map_or("", |(_, text)| text.as_str());
            let wire = prompt::wire_messages(system_text, &history, text_tools);
            let mut sink = RoundSink {
                turn_no: self.turn_no,
                updates: self.updates,
                filter: TextCallFilter::default(),
                text: String::new(),
            };
            let offered = (!text_tools).then_some(definitions);
            let completion = match self
                .ctx
                .lmx
                .stream_chat(&model, &wire, offered, &mut sink)
                .await
            {
                Err(InferenceError::Http {
                    status: 400,
                    message,
                }) if !text_tools && refuses_tools(&message) => {
                    self.ctx.tool_support.mark_refuses(&model);
                    self.send(TurnUpdate::Progress {
                        turn_no: self.turn_no,
                        message: format!(
                            "The inference server does not take tools for {model} ({message}); \
                             the tools are described in the prompt instead, from now on"
                        ),
                    })
                    .await;
                    rounds -= 1;
                    continue;
                }
                Err(e) => return Err(e.into()),
                Ok(c) => c,
            };
            if let Some(u) = completion.usage {
                let total = usage.get_or_insert_with(Usage::default);
                total.prompt_tokens += u.prompt_tokens;
                total.completion_tokens += u.completion_tokens;
            }
            let (rest, leftover) = sink.filter.finish();
            if !rest.is_empty() {
                sink.text.push_str(&rest);
                self.send(TurnUpdate::Delta {
                    turn_no: self.turn_no,
                    delta: Delta::Content(rest),
                })
                .await;
            }
            let cut = completion.finish_reason.as_deref() == Some("length");
            let mut calls = Vec::new();
            let mut cut_calls = Vec::new();
            for call in &completion.tool_calls {
                if cut {
                    cut_calls.push(call.name.clone());
                    continue;
                }
                let arguments = if call.arguments.trim().is_empty() {
                    Ok(json!({}))
                } else {
                    serde_json::from_str::<Value>(&call.arguments)
                        .map_err(|e| format!("the arguments are not valid JSON ({e})"))
                };
                next_call += 1;
                let id = if call.id.is_empty() {
                    format!("call_{}_{next_call}", self.turn_no)
                } else {
                    call.id.clone()
                };
                calls.push(PlannedCall {
                    id: unique_id(&mut ids, id),
                    name: call.name.clone(),
                    arguments,
                    raw: call.arguments.clone(),
                });
            }
            let mut text_calls = sink.filter.take_calls();
            match leftover {
                Leftover::Nothing => {}
                Leftover::Unclosed(block) if cut => {
                    cut_calls.push(textcalls::parse_unclosed(&block).name);
                }
                Leftover::Unclosed(block) => text_calls.push(textcalls::parse_unclosed(&block)),
            }
            // A reply that made native calls meant those: markup in its text is quoted, not
            // called.
            if !completion.tool_calls.is_empty() {
                text_calls.clear();
            }
            for call in text_calls {
                next_call += 1;
                let raw = call
                    .arguments
                    .as_ref()
                    .map(Value::to_string)
                    .unwrap_or_default();
                calls.push(PlannedCall {
                    id: unique_id(&mut ids, format!("call_{}_{next_call}", self.turn_no)),
                    name: call.name,
                    arguments: call.arguments,
                    raw,
                });
            }
            if !cut_calls.is_empty() && calls.is_empty() {
                let names = cut_calls
                    .iter()
                    .map(|n| if n.is_empty() { "a tool" } else { n.as_str() })
                    .collect::<Vec<_>>()
                    .join(", ");
                let note = format!(
                    "Your reply was cut off by the length limit while you were writing a tool \
                     call ({names}), so it was not run. Make the call smaller (for example, \
                     write a large file with several edits), or answer without it."
                );
                let messages = vec![
                    ChatMessage::text(Role::Assistant, sink.text.clone()),
                    ChatMessage::text(Role::User, note.clone()),
                ];
                history.extend(messages.iter().cloned().map(Arc::new));
                self.send(TurnUpdate::Progress {
                    turn_no: self.turn_no,
                    message: format!(
                        "A tool call ({names}) was cut off by the length limit and not run"
                    ),
                })
                .await;
                self.send(TurnUpdate::Messages {
                    turn_no: self.turn_no,
                    messages,
                })
                .await;
                if rounds >= config.max_tool_rounds {
                    return Err(rounds_exhausted(config.max_tool_rounds));
                }
                continue;
            }
            if calls.is_empty() {
                if cut {
                    self.send(TurnUpdate::Progress {
                        turn_no: self.turn_no,
                        message: "The reply was cut off by the length limit (--max-tokens, the \
                                  server's own or the model's context): it may be incomplete"
                            .to_owned(),
                    })
                    .await;
                }
                let mut done = completion;
                done.usage = usage;
                return Ok(done);
            }
            let assistant = ChatMessage {
                content: Some(sink.text.clone()).filter(|t| !t.is_empty()),
                tool_calls: Some(
                    calls
                        .iter()
                        .map(|c| {
                            json!({"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": c.raw}})
                        })
                        .collect(),
                ),
                ..ChatMessage::text(Role::Assistant, "")
            };
            history.push(Arc::new(assistant.clone()));
            self.send(TurnUpdate::Messages {
                turn_no: self.turn_no,
                messages: vec![assistant],
            })
            .await;
            for call in calls {
                let key = repeat_key(&call);
                let count = match &mut repeats {
                    Some((last, n)) if *last == key => {
                        *n += 1;
                        *n
                    }
                    _ => {
                        repeats = Some((key, 1));
                        1
                    }
                };
                let args = call
                    .arguments
                    .clone()
                    .unwrap_or_else(|_| Value::String(call.raw.clone()));
                self.send(TurnUpdate::ToolStart {
                    turn_no: self.turn_no,
                    id: call.id.clone(),
                    name: call.name.clone(),
                    args: args.clone(),
                })
                .await;
                let started = Instant::now();
                let (outcome, approved_by) = match count {
                    1 | 2 => self.execute(&call, mode, overrides, workspace).await,
                    3 => (
                        Err(format!(
                            "you called {} with the same arguments three times in a row; it \
                             was not run again. Use the result you already have, or do \
                             something else",
                            call.name
                        )),
                        None,
                    ),
                    _ => {
                        let why = format!(
                            "the model called {} with the same arguments {count} times in a row",
                            call.name
                        );
                        self.end_tool(&call, Err(format!("not run: {why}")), None, started)
                            .await;
                        return Err(AgentError::ToolLimit(format!(
                            "The turn was stopped: {why}"
                        )));
                    }
                };
                let message = self.end_tool(&call, outcome, approved_by, started).await;
                history.push(Arc::new(message));
            }
            if rounds >= config.max_tool_rounds {
                return Err(rounds_exhausted(config.max_tool_rounds));
            }
        }
    }

    /// Sends `tool.end` and returns the `tool` message for the history.
    async fn end_tool(
        &self,
        call: &PlannedCall,
        outcome: Result<String, String>,
        approved_by: Option<String>,
        started: Instant,
    ) -> ChatMessage {
        let (result, content) = match outcome {
            Ok(output) => {
                let output = cap_result(&call.name, output, self.ctx.agent.tool_result_bytes);
                (json!({"ok": true, "output": output}), output)
            }
            Err(error) => {
                let content = format!("Error: {error}");
                (json!({"ok": false, "error": error}), content)
            }
        };
        let message = ChatMessage {
            tool_call_id: Some(call.id.clone()),
            ..ChatMessage::text(Role::Tool, content)
        };
        self.send(TurnUpdate::ToolEnd {
            turn_no: self.turn_no,
            end: ToolEnded {
                id: call.id.clone(),
                name: call.name.clone(),
                result,
                approved_by,
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                message: message.clone(),
            },
        })
        .await;
        message
    }

    /// Runs one call behind its permission: the outcome the model sees and who approved it.
    async fn execute(
        &mut self,
        call: &PlannedCall,
        mode: Mode,
        overrides: Option<&TurnOverrides>,
        workspace: &Workspace,
    ) -> (Result<String, String>, Option<String>) {
        let Some(spec) = tools::spec(&call.name) else {
            let name = if call.name.is_empty() {
                "(no name)"
            } else {
                call.name.as_str()
            };
            return (
                Err(format!(
                    "there is no tool called {name:?}; the tools are: {}",
                    tools::names()
                )),
                None,
            );
        };
        if let Some(panics) = self.ctx.faults.tool_panics_on
            && panics(&call.raw)
        {
            panic!("injected fault: tool call panics");
        }
        let args = match &call.arguments {
            Ok(args) => args,
            Err(e) => {
                return (
                    Err(format!(
                        "could not read the arguments of {}: {e}. Send one JSON object \
                         matching this schema: {}",
                        spec.name,
                        spec.parameters()
                    )),
                    None,
                );
            }
        };
        // A call the mode refuses whatever it is does no work first: a plan-mode edit must not
        // build its result and diff before it is refused.
        if let Policy::Deny(reason) = permissions::policy(mode, overrides, spec.kind) {
            return (Err(reason), None);
        }
        let ctx = self.ctx;
        let (updates, turn_no) = (self.updates, self.turn_no);
        let session = self.session.clone();
        let dangerous = overrides.and_then(|o| o.dangerous).unwrap_or(false);
        let mut env = tools::ToolEnv {
            workspace,
            memory: &mut self.memory,
            background: session
                .as_ref()
                .map(|session| tools::background::Background {
                    runner: &ctx.runner,
                    session,
                    sandboxed: !dangerous,
                    default_timeout: ctx.background.default_timeout,
                }),
            sandbox: (!dangerous).then_some(&ctx.sandbox),
            containment: &ctx.containment,
            max_edit_bytes: ctx.agent.max_edit_bytes,
            result_bytes: ctx.agent.tool_result_bytes,
        };
        match tools::prepare(spec, args, &mut env).await {
            Prepared::Finished(result) => (result, Some("mode".to_owned())),
            Prepared::Change {
                summary,
                diff,
                grant_scope,
                change,
            } => {
                let always_ask = change.always_ask();
                let policy = match (permissions::policy(mode, overrides, spec.kind), &always_ask) {
                    (Policy::Allow("mode"), Some(_)) => Policy::Ask,
                    (policy, _) => policy,
                };
                let approved_by = match policy {
                    Policy::Deny(reason) => return (Err(reason), None),
                    Policy::Allow(by) => by.to_owned(),
                    Policy::Ask => {
                        let (summary, grant_key) = match &always_ask {
                            Some(why) => (format!("{summary} (asks every time: {why})"), None),
                            None => (
                                summary,
                                permissions::grant_key(
                                    spec.name,
                                    spec.kind,
                                    grant_scope.as_deref(),
                                ),
                            ),
                        };
                        let guard = match grant_key.as_deref() {
                            Some(key) if is_git_grant(key) => {
                                let ws = workspace.clone();
                                tokio::task::spawn_blocking(move || {
                                    ws.fingerprint(tools::GIT_PROGRAM_PATHS)
                                })
                                .await
                                .ok()
                            }
                            _ => None,
                        };
                        let (reply, answer) = oneshot::channel();
                        let ask = PermissionAsk {
                            tool_name: spec.name.to_owned(),
                            args: args.clone(),
                            summary,
                            diff,
                            grant_key,
                            guard,
                        };
                        // The actor being gone answers below (the reply is dropped).
                        let _ = updates
                            .send(TurnUpdate::Permission {
                                turn_no,
                                ask,
                                reply,
                            })
                            .await;
                        let verdict = answer.await.unwrap_or(Verdict {
                            allowed: false,
                            by: "daemon".to_owned(),
                        });
                        if !verdict.allowed {
                            return (Err(denial(&verdict.by)), None);
                        }
                        verdict.by
                    }
                };
                let result = tools::apply(change, &mut env, &ctx.agent.command).await;
                (result, Some(approved_by))
            }
        }
    }
}

fn denial(by: &str) -> String {
    match by {
        "timeout" => "no one answered the permission request in time, so the call was denied \
                      and not run. Do not repeat it; say what you wanted to do instead"
            .to_owned(),
        _ => format!(
            "the user denied this call ({by}); it was not run. Do not repeat it: do something \
             else or ask the user"
        ),
    }
}

fn rounds_exhausted(max: u32) -> AgentError {
    AgentError::ToolLimit(format!(
        "The turn was stopped after {max} tool rounds without a final answer (raise \
         --max-tool-rounds for longer tasks)"
    ))
}

/// Whether a 400 answer says the model or server does not take `tools`.
fn refuses_tools(message: &str) -> bool {
    message.to_ascii_lowercase().contains("tool")
}

/// The sink of one model round: text goes through the text-call filter before it becomes a
/// `turn.token`; what was shown is kept for the round's message.
struct RoundSink<'a> {
    turn_no: u64,
    updates: &'a mpsc::Sender<TurnUpdate>,
    filter: TextCallFilter,
    text: String,
}

impl AsyncDeltaSink for &mut RoundSink<'_> {
    async fn send(&mut self, delta: Delta) {
        let delta = match delta {
            Delta::Content(text) => {
                let shown = self.filter.push(&text);
                if shown.is_empty() {
                    return;
                }
                self.text.push_str(&shown);
                Delta::Content(shown)
            }
            reasoning @ Delta::Reasoning(_) => reasoning,
        };
        let _ = self
            .updates
            .send(TurnUpdate::Delta {
                turn_no: self.turn_no,
                delta,
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::{PlannedCall, repeat_key, unique_id};

    #[test]
    fn results_past_the_cap_are_cut_with_a_note() {
        let small = super::cap_result("list_dir", "a\nb\n".into(), 64);
        assert_eq!(small, "a\nb\n");
        let big = "é".repeat(100); // 200 bytes
        let cut = super::cap_result("read_file", big, 51);
        assert!(
            cut.starts_with(&"é".repeat(25)),
            "cut on a character boundary"
        );
        assert!(!cut.starts_with(&"é".repeat(26)));
        assert!(cut.contains("150 of 200 bytes left out"), "{cut}");
        assert!(cut.contains("`offset`"), "{cut}");
    }

    #[test]
    fn ids_are_unique_in_a_turn() {
        let mut given = std::collections::HashSet::new();
        let ids: Vec<String> = ["same", "same", "other", "same", "same-2"]
            .into_iter()
            .map(|id| unique_id(&mut given, id.to_owned()))
            .collect();
        assert_eq!(ids, ["same", "same-2", "other", "same-3", "same-2-2"]);
    }

    #[test]
    fn repeats_are_found_whatever_the_spacing_and_key_order() {
        let call = |raw: &str| PlannedCall {
            id: String::new(),
            name: "read_file".into(),
            arguments: serde_json::from_str(raw).map_err(|e| e.to_string()),
            raw: raw.into(),
        };
        let a = repeat_key(&call(r#"{"path":"a.txt","offset":1}"#));
        let b = repeat_key(&call("{ \"offset\" : 1,\n  \"path\": \"a.txt\" }"));
        assert_eq!(a, b);
        let c = repeat_key(&call(r#"{"path":"b.txt","offset":1}"#));
        assert_ne!(a, c);
        let nested = repeat_key(&call(r#"{"x":{"b":[1, {"d":2,"c":3}],"a":null}}"#));
        let nested2 = repeat_key(&call(r#"{"x":{"a":null,"b":[1,{"c":3,"d":2}]}}"#));
        assert_eq!(nested, nested2);
        // Unparsed arguments compare as written, trimmed.
        assert_eq!(repeat_key(&call("{oops")), repeat_key(&call(" {oops\n")));
        assert_ne!(repeat_key(&call("{oops")), repeat_key(&call("{oops2")));
    }
}
