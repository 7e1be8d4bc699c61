//! What a turn's events mean for a terminal: text for stdout, compact tool lines for stderr,
//! permission questions, the outcome. Pure logic, so it is tested with recorded events.

use opta_protocol::{Decision, Event, TurnErrorCode, TurnId, TurnStats};
use serde_json::Value;

use crate::sanitize;

/// How a turn ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `turn.done`.
    Done(TurnStats),
    /// `turn.error`.
    Failed {
        /// Machine code.
        code: Option<TurnErrorCode>,
        /// Message.
        message: String,
    },
}

/// A permission the daemon waits for.
#[derive(Debug, Clone, PartialEq)]
pub struct PermissionAsk {
    /// `perm_...`.
    pub request_id: String,
    /// The tool asking.
    pub tool_name: String,
    /// Its arguments.
    pub args: Value,
    /// One line saying what it would do (safe to print).
    pub summary: Option<String>,
    /// The unified diff of a write or edit (each line safe to print).
    pub diff: Option<String>,
}

/// One thing to show or do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Answer text, to stdout as it arrives.
    Text(String),
    /// Reasoning text (shown dimmed on stderr when asked for).
    Thinking(String),
    /// A compact line for stderr.
    Note(String),
    /// A permission request to answer.
    Permission(PermissionAsk),
    /// The turn ended.
    Finished(Outcome),
}

/// Follows one turn's events.
pub struct TurnRenderer {
    turn_id: TurnId,
}

impl TurnRenderer {
    /// Follows `turn_id`; other turns' events are ignored.
    pub fn new(turn_id: TurnId) -> Self {
        Self { turn_id }
    }

    /// What `event` means for this turn; every string in it is safe to print
    /// ([`crate::sanitize`]).
    pub fn on_event(&self, event: &Event) -> Option<Output> {
        if event.turn_id() != Some(&self.turn_id) {
            return None;
        }
        let output = self.output(event)?;
        Some(match output {
            Output::Text(t) => Output::Text(sanitize::text(&t).into_owned()),
            Output::Thinking(t) => Output::Thinking(sanitize::text(&t).into_owned()),
            Output::Note(t) => Output::Note(sanitize::line(&t).into_owned()),
            Output::Finished(Outcome::Failed { code, message }) => {
                Output::Finished(Outcome::Failed {
                    code,
                    message: sanitize::text(&message).into_owned(),
                })
            }
            // Its parts are printed through `compact` and `sanitize::line`.
            other @ (Output::Permission(_) | Output::Finished(Outcome::Done(_))) => other,
        })
    }

    fn output(&self, event: &Event) -> Option<Output> {
        match event {
            Event::TurnToken(t) => Some(Output::Text(t.text.clone())),
            Event::TurnThinking(t) => Some(Output::Thinking(t.text.clone())),
            Event::ToolStart(t) => Some(Output::Note(format!("→ {} {}", t.name, target(&t.args)))),
            Event::ToolEnd(t) => Some(Output::Note(tool_end_line(
                &t.name,
                &t.result,
                t.duration_ms,
            ))),
            Event::PermissionRequest(p) => Some(Output::Permission(PermissionAsk {
                request_id: p.request_id.clone(),
                tool_name: p.tool_name.clone(),
                args: p.args.clone(),
                summary: p.summary.as_deref().map(|s| sanitize::line(s).into_owned()),
                diff: p.diff.as_deref().map(|d| {
                    d.lines()
                        .map(|l| sanitize::line(l).into_owned())
                        .collect::<Vec<_>>()
                        .join("\n")
                }),
            })),
            Event::PermissionResolved(p) => Some(Output::Note(format!(
                "  permission {} by {}",
                match p.decision {
                    Decision::Allow => "allowed",
                    Decision::Deny => "denied",
                },
                p.decided_by
            ))),
            Event::TurnProgress(p) => Some(Output::Note(format!("  {}", p.message))),
            Event::TurnDone(d) => Some(Output::Finished(Outcome::Done(d.stats.clone()))),
            Event::TurnError(e) => Some(Output::Finished(Outcome::Failed {
                code: e.code,
                message: e.message.clone(),
            })),
            Event::TurnQueued(_) | Event::TurnStart(_) => None,
            Event::SessionSnapshot(_)
            | Event::SessionUpdated(_)
            | Event::SessionCancelled(_)
            | Event::BackgroundOutput(_)
            | Event::BackgroundStatus(_) => None,
        }
    }
}

/// The target of a call for its line: the path, pattern or command, else its arguments.
fn target(args: &Value) -> String {
    for key in ["path", "command", "pattern"] {
        if let Some(v) = args.get(key).filter(|v| v.is_string()) {
            return compact(v, 100);
        }
    }
    if args.as_object().is_some_and(serde_json::Map::is_empty) {
        return String::new();
    }
    compact(args, 100)
}

/// `  ✓ read_file · 12 ms · 40 lines` or `  ✗ write_file · denied in plan mode`.
fn tool_end_line(name: &str, result: &Value, duration_ms: Option<u64>) -> String {
    let took = duration_ms
        .map(|ms| format!(" · {}", human_ms(ms as f64)))
        .unwrap_or_default();
    match result.get("error").filter(|e| !e.is_null()) {
        Some(error) => format!("  ✗ {name}{took} · {}", compact(error, 100)),
        None => {
            let output = result.get("output").and_then(Value::as_str).unwrap_or("");
            let lines = output.lines().count();
            let size = match lines {
                0 => String::new(),
                1 => format!(" · {}", compact(&Value::String(output.to_owned()), 60)),
                n => format!(" · {n} lines"),
            };
            format!("  ✓ {name}{took}{size}")
        }
    }
}

/// One-line JSON, cut to `max` characters, safe to print.
pub fn compact(value: &Value, max: usize) -> String {
    let text = match value {
        Value::String(s) => s.replace('\n', " "),
        other => other.to_string(),
    };
    let text = sanitize::line(&text).into_owned();
    if text.chars().count() > max {
        let cut: String = text.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        text
    }
}

/// What to do with a permission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Answer without asking.
    Decide(Decision),
    /// Ask the person at the terminal.
    Ask,
}

/// Answers permission requests: asks on a terminal, and denies when nobody can be asked
/// (unless `--yes`). "Always" becomes a session grant on the daemon, which then stops asking
/// for that tool (or that simple command), for every client.
#[derive(Debug, Default)]
pub struct PermissionPolicy {
    interactive: bool,
    yes: bool,
}

/// A typed answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// Allow or deny.
    pub decision: Decision,
    /// `remember: "session"` (the person said "always").
    pub remember: bool,
}

impl PermissionPolicy {
    /// `interactive`: stdin is a terminal; `yes`: allow everything.
    pub fn new(interactive: bool, yes: bool) -> Self {
        Self { interactive, yes }
    }

    /// The verdict for a request.
    pub fn verdict(&self) -> Verdict {
        if self.yes {
            Verdict::Decide(Decision::Allow)
        } else if self.interactive {
            Verdict::Ask
        } else {
            Verdict::Decide(Decision::Deny)
        }
    }

    /// Reads a typed answer: `y`/`yes`, `n`/`no` (or nothing), `a`/`always` (for the rest
    /// of the session). `None` for anything else: ask again.
    pub fn answer(&self, input: &str) -> Option<Answer> {
        let (decision, remember) = match input.trim().to_ascii_lowercase().as_str() {
            "y" | "yes" => (Decision::Allow, false),
            "" | "n" | "no" => (Decision::Deny, false),
            "a" | "always" => (Decision::Allow, true),
            _ => return None,
        };
        Some(Answer { decision, remember })
    }
}

/// A diff for the terminal: additions green, removals red, headers dim (lines already safe).
pub fn colour_diff(diff: &str) -> String {
    diff.lines()
        .map(|line| {
            if line.starts_with("+++") || line.starts_with("---") || line.starts_with("@@") {
                crate::ui::dim(line)
            } else if line.starts_with('+') {
                crate::ui::green(line)
            } else if line.starts_with('-') {
                crate::ui::red(line)
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The figures of a finished turn, for the dim line after an answer: tokens, speed, time to
/// the first token, tool calls, elapsed.
pub fn stats_line(stats: &TurnStats) -> String {
    let mut parts = vec![format!("{} tokens", stats.completion_tokens)];
    if stats.speed > 0.0 {
        parts.push(format!("{:.1} tok/s", stats.speed));
    }
    if let Some(ms) = stats.first_token_latency_ms {
        parts.push(format!("first token {}", human_ms(ms)));
    }
    if stats.tool_calls > 0 {
        parts.push(format!("{} tool calls", stats.tool_calls));
    }
    parts.push(human_ms(stats.elapsed * 1000.0));
    parts.join(" · ")
}

fn human_ms(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.1} s", ms / 1000.0)
    }
}

/// Prints a failed turn on stderr: the code, the message and (unless it was a cancel) a hint.
pub fn report_failure(code: Option<TurnErrorCode>, message: &str) {
    let label = code
        .map(|c| format!(" [{}]", c.as_str()))
        .unwrap_or_default();
    eprintln!(
        "{}{label} {}",
        crate::ui::error_label(),
        sanitize::text(message)
    );
    if code != Some(TurnErrorCode::Cancelled) {
        eprintln!("{} {}", crate::ui::dim("hint:"), hint(code));
    }
}

/// A hint for each error code: what the person can do next.
pub fn hint(code: Option<TurnErrorCode>) -> &'static str {
    match code {
        Some(TurnErrorCode::NoModelLoaded) => {
            "load a model on the inference server (`opta models load <id>`) or pick a loaded one with --model"
        }
        Some(TurnErrorCode::LmxConnectionRefused) => {
            "start your inference server, or point --lmx-url / OPTA_LMX_URL at it (then `opta daemon restart`)"
        }
        Some(TurnErrorCode::LmxTimeout) => {
            "the inference server is slow or stuck: check it, or raise --lmx-first-byte-timeout-ms"
        }
        Some(TurnErrorCode::LmxWsClosed) => {
            "the inference server dropped the stream: check its log and try again"
        }
        Some(TurnErrorCode::StorageFull) => "free disk space under OPTA_HOME and try again",
        Some(TurnErrorCode::StateConflict) => "another client changed the session: try again",
        Some(TurnErrorCode::Cancelled) => "the turn was cancelled",
        Some(TurnErrorCode::Interrupted) => "the daemon stopped during the turn: run it again",
        Some(TurnErrorCode::ToolLimit) => {
            "the model kept calling tools: split the task, or raise --max-tool-rounds"
        }
        Some(TurnErrorCode::Unknown) | None => {
            "see the message above; `opta daemon logs` has details"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opta_protocol::Envelope;
    use serde_json::json;

    /// Events as a daemon with tools records them (the tools arrive in a later issue).
    fn recorded() -> Vec<Event> {
        let lines = [
            json!({"event":"turn.start","payload":{"turnId":"t1","writerId":"w","clientId":"c","mode":"do"}}),
            json!({"event":"turn.token","payload":{"turnId":"t1","text":"Reading "}}),
            json!({"event":"turn.token","payload":{"turnId":"other","text":"not mine"}}),
            json!({"event":"tool.start","payload":{"turnId":"t1","name":"read_file","id":"call_1","args":{"path":"src/main.rs"}}}),
            json!({"event":"tool.end","payload":{"turnId":"t1","name":"read_file","id":"call_1","result":{"ok":true,"output":"1\ta\n2\tb\n"},"durationMs":12}}),
            json!({"event":"permission.request","payload":{"turnId":"t1","requestId":"perm_1","toolName":"run_command","args":{"command":"rm -rf target"},"summary":"rm -rf target\u{1b}[2J"}}),
            json!({"event":"permission.resolved","payload":{"turnId":"t1","requestId":"perm_1","decision":"deny","decidedBy":"opta-cli"}}),
            json!({"event":"tool.end","payload":{"turnId":"t1","name":"run_command","id":"call_2","result":{"error":"permission denied"}}}),
            json!({"event":"turn.error","payload":{"turnId":"t1","writerId":"w","clientId":"c","message":"boom","code":"lmx-timeout"}}),
        ];
        lines
            .into_iter()
            .enumerate()
            .map(|(i, mut v)| {
                v["v"] = json!("3");
                v["daemonId"] = json!("daemon_test");
                v["sessionId"] = json!("s");
                v["seq"] = json!(i + 1);
                v["ts"] = json!("2026-01-01T00:00:00.000Z");
                serde_json::from_value::<Envelope>(v).unwrap().event
            })
            .collect()
    }

    #[test]
    fn the_figures_line() {
        let stats = TurnStats {
            tokens: 42,
            prompt_tokens: 10,
            completion_tokens: 42,
            tool_calls: 2,
            elapsed: 3.25,
            speed: 14.04,
            first_token_latency_ms: Some(180.4),
        };
        assert_eq!(
            stats_line(&stats),
            "42 tokens · 14.0 tok/s · first token 180 ms · 2 tool calls · 3.2 s"
        );
    }

    #[test]
    fn renders_a_recorded_turn() {
        let r = TurnRenderer::new(TurnId("t1".into()));
        let outputs: Vec<Output> = recorded().iter().filter_map(|e| r.on_event(e)).collect();
        assert_eq!(
            outputs,
            vec![
                Output::Text("Reading ".into()),
                Output::Note("→ read_file src/main.rs".into()),
                Output::Note("  ✓ read_file · 12 ms · 2 lines".into()),
                Output::Permission(PermissionAsk {
                    request_id: "perm_1".into(),
                    tool_name: "run_command".into(),
                    args: json!({"command": "rm -rf target"}),
                    summary: Some("rm -rf target\\x1b[2J".into()),
                    diff: None,
                }),
                Output::Note("  permission denied by opta-cli".into()),
                Output::Note("  ✗ run_command · permission denied".into()),
                Output::Finished(Outcome::Failed {
                    code: Some(TurnErrorCode::LmxTimeout),
                    message: "boom".into()
                }),
            ]
        );
    }

    #[test]
    fn permissions_are_denied_without_a_terminal_unless_yes() {
        assert_eq!(
            PermissionPolicy::new(false, false).verdict(),
            Verdict::Decide(Decision::Deny)
        );
        assert_eq!(
            PermissionPolicy::new(false, true).verdict(),
            Verdict::Decide(Decision::Allow)
        );
        assert_eq!(PermissionPolicy::new(true, false).verdict(), Verdict::Ask);
    }

    #[test]
    fn always_asks_the_daemon_to_remember() {
        let p = PermissionPolicy::new(true, false);
        assert_eq!(p.answer("maybe"), None);
        let deny = Answer {
            decision: Decision::Deny,
            remember: false,
        };
        assert_eq!(p.answer("n"), Some(deny));
        assert_eq!(p.answer(""), Some(deny));
        assert_eq!(
            p.answer(" Always "),
            Some(Answer {
                decision: Decision::Allow,
                remember: true
            })
        );
        assert_eq!(p.answer("y").map(|a| a.remember), Some(false));
    }

    #[test]
    fn every_code_has_a_hint() {
        for code in TurnErrorCode::ALL {
            assert!(!hint(Some(code)).is_empty());
        }
    }
}
