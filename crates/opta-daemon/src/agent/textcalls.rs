//! Tool calls that arrive as text in the model's answer, as small local models write them:
//!
//! - `<tool_call>{"name": .., "arguments": {..}}</tool_call>` (Hermes, Qwen);
//! - `<function=NAME><parameter=K>V</parameter>…</function>` (Qwen3-Coder; also inside a
//!   `<tool_call>`);
//! - an answer that is nothing but one JSON object `{"name": .., "arguments": ..}` naming a
//!   known tool.
//!
//! [`TextCallFilter`] sits in the stream: ordinary text passes at once, a possible tag prefix
//! (`<`, `<tool_`…) is held back only until it is decided, and markup never reaches clients.
//! An answer whose first non-blank character is `{` is held whole, then shown as text if it
//! is not a call.
//!
//! Markup counts as a call only where a call can be meant: at the start of a line (blanks
//! before it allowed) and outside fenced code blocks. A reply that quotes a README's
//! `<tool_call>` example inside a code block, or mid-sentence, shows it as text and runs
//! nothing; inline code never starts a line, so it is covered too. A reply that also made
//! native calls has its text-form calls ignored (the agent loop's rule).

use serde_json::{Map, Value};

use super::tools;

const TOOL_CALL_OPEN: &str = "<tool_call>";
const TOOL_CALL_CLOSE: &str = "</tool_call>";
const FUNCTION_OPEN: &str = "<function=";
const FUNCTION_CLOSE: &str = "</function>";

/// A call found in text.
#[derive(Debug, Clone, PartialEq)]
pub struct TextCall {
    /// Tool name as written.
    pub name: String,
    /// The arguments, or why they could not be read.
    pub arguments: Result<Value, String>,
}

/// Separates text-form tool calls from the text of one model round.
#[derive(Debug, Default)]
pub struct TextCallFilter {
    pending: String,
    shown_any: bool,
    whole_json: bool,
    calls: Vec<TextCall>,
    lines: LineState,
}

/// Where the shown text stands: at a line's start or not, inside a fenced code block or not.
#[derive(Debug)]
struct LineState {
    /// Only blanks so far on this line.
    at_start: bool,
    /// The fence character and how many of it open this line so far (`None` once the line
    /// holds anything else): three make a fence.
    lead: Option<(char, u8)>,
    /// The fence character (`` ` `` or `~`) of the code block the text is in.
    fence: Option<char>,
}

impl Default for LineState {
    fn default() -> Self {
        Self {
            at_start: true,
            lead: Some(('`', 0)),
            fence: None,
        }
    }
}

impl LineState {
    fn feed(&mut self, text: &str) {
        for c in text.chars() {
            if c == '\n' {
                self.at_start = true;
                self.lead = Some(('`', 0));
                continue;
            }
            if self.at_start && (c == ' ' || c == '\t') {
                continue;
            }
            self.at_start = false;
            self.lead = match self.lead {
                Some((mark, n)) if matches!(c, '`' | '~') && (n == 0 || mark == c) => {
                    if n == 2 {
                        // A block opened with one fence character is closed only by it.
                        self.fence = match self.fence {
                            None => Some(c),
                            Some(open) if open == c => None,
                            open => open,
                        };
                        None
                    } else {
                        Some((c, n + 1))
                    }
                }
                _ => None,
            };
        }
    }

    /// Whether markup here may be a call.
    fn may_call(&self) -> bool {
        self.at_start && self.fence.is_none()
    }
}

/// What was left when the round ended.
#[derive(Debug, PartialEq)]
pub enum Leftover {
    /// Nothing held.
    Nothing,
    /// Markup opened and never closed (the answer was cut, or the model forgot the end tag):
    /// its text.
    Unclosed(String),
}

impl TextCallFilter {
    /// Takes a content delta; returns the text to show now.
    pub fn push(&mut self, text: &str) -> String {
        self.pending.push_str(text);
        self.drain()
    }

    fn drain(&mut self) -> String {
        let mut shown = String::new();
        loop {
            if self.whole_json {
                return shown;
            }
            if !self.shown_any && shown.trim().is_empty() {
                let start = self.pending.trim_start();
                if start.is_empty() {
                    // Leading blanks wait: they may precede a JSON call.
                    return shown;
                }
                if start.starts_with('{') {
                    self.whole_json = true;
                    return shown;
                }
            }
            let Some(at) = self.pending.find('<') else {
                self.lines.feed(&self.pending);
                shown.push_str(&self.pending);
                self.pending.clear();
                break;
            };
            self.lines.feed(&self.pending[..at]);
            shown.push_str(&self.pending[..at]);
            if !self.lines.may_call() {
                // Mid-line or in a code block: text, whatever follows.
                self.lines.feed("<");
                shown.push('<');
                self.pending.drain(..=at);
                continue;
            }
            let rest = &self.pending[at..];
            if let Some((open, close)) = [
                (TOOL_CALL_OPEN, TOOL_CALL_CLOSE),
                (FUNCTION_OPEN, FUNCTION_CLOSE),
            ]
            .into_iter()
            .find(|(open, _)| rest.starts_with(open))
            {
                let Some(end) = rest.find(close) else {
                    // Open markup: wait for its end.
                    self.pending.drain(..at);
                    break;
                };
                let block = rest[..end + close.len()].to_owned();
                let call = if open == TOOL_CALL_OPEN {
                    parse_tool_call_body(&block[open.len()..end])
                } else {
                    parse_function(&block)
                };
                self.calls.push(call);
                self.pending.drain(..at + block.len());
                continue;
            }
            if [TOOL_CALL_OPEN, FUNCTION_OPEN]
                .iter()
                .any(|tag| tag.starts_with(rest))
            {
                // Maybe the start of a tag: hold it until the next delta decides.
                self.pending.drain(..at);
                break;
            }
            self.lines.feed("<");
            shown.push('<');
            self.pending.drain(..=at);
        }
        if !shown.trim().is_empty() {
            self.shown_any = true;
        }
        shown
    }

    /// Ends the round: the text still held that turns out to be text, and what is left open.
    pub fn finish(&mut self) -> (String, Leftover) {
        let pending = std::mem::take(&mut self.pending);
        if self.whole_json {
            self.whole_json = false;
            if let Some(call) = parse_json_call(pending.trim(), true) {
                self.calls.push(call);
                return (String::new(), Leftover::Nothing);
            }
            self.shown_any = true;
            return (pending, Leftover::Nothing);
        }
        if pending.starts_with(TOOL_CALL_OPEN) || pending.starts_with(FUNCTION_OPEN) {
            return (String::new(), Leftover::Unclosed(pending));
        }
        (pending, Leftover::Nothing)
    }

    /// The calls found so far (taken).
    pub fn take_calls(&mut self) -> Vec<TextCall> {
        std::mem::take(&mut self.calls)
    }
}

/// An unclosed block read as well as it can be (a model that forgot the end tag).
pub fn parse_unclosed(block: &str) -> TextCall {
    if let Some(body) = block.strip_prefix(TOOL_CALL_OPEN) {
        return parse_tool_call_body(body);
    }
    parse_function(&format!("{block}{FUNCTION_CLOSE}"))
}

fn parse_tool_call_body(body: &str) -> TextCall {
    let body = body.trim();
    if body.starts_with(FUNCTION_OPEN) {
        return parse_function(body);
    }
    parse_json_call(body, false).unwrap_or_else(|| TextCall {
        name: String::new(),
        arguments: Err(format!(
            "the text inside <tool_call> is not a JSON object {{\"name\": .., \"arguments\": \
             {{..}}}}: {}",
            preview(body)
        )),
    })
}

/// `{"name": .., "arguments": ..}` (or `parameters`); with `known_only`, only when the name
/// is a tool's (an ordinary JSON answer is not a call).
fn parse_json_call(text: &str, known_only: bool) -> Option<TextCall> {
    let value: Value = serde_json::from_str(text).ok()?;
    let object = value.as_object()?;
    let name = object.get("name")?.as_str()?.to_owned();
    if known_only && tools::spec(&name).is_none() {
        return None;
    }
    let arguments = match object.get("arguments").or_else(|| object.get("parameters")) {
        None | Some(Value::Null) => Ok(Value::Object(Map::new())),
        Some(Value::String(s)) => serde_json::from_str(s)
            .map_err(|e| format!("the arguments are a string that is not JSON: {e}")),
        Some(v) => Ok(v.clone()),
    };
    Some(TextCall { name, arguments })
}

/// `<function=NAME><parameter=K>V</parameter>…</function>`.
fn parse_function(block: &str) -> TextCall {
    let inner = block
        .strip_prefix(FUNCTION_OPEN)
        .and_then(|b| b.strip_suffix(FUNCTION_CLOSE))
        .unwrap_or(block);
    let Some((name, mut rest)) = inner.split_once('>') else {
        return TextCall {
            name: String::new(),
            arguments: Err(format!(
                "unreadable <function=…> markup: {}",
                preview(block)
            )),
        };
    };
    let name = name.trim().to_owned();
    let mut arguments = Map::new();
    while let Some(start) = rest.find("<parameter=") {
        let after = &rest[start + "<parameter=".len()..];
        let Some((key, value_and_rest)) = after.split_once('>') else {
            break;
        };
        let (value, next) = match value_and_rest.find("</parameter>") {
            Some(end) => (
                &value_and_rest[..end],
                &value_and_rest[end + "</parameter>".len()..],
            ),
            None => (value_and_rest, ""),
        };
        let key = key.trim().to_owned();
        let value = value.strip_prefix('\n').unwrap_or(value);
        let value = value.strip_suffix('\n').unwrap_or(value);
        let typed = coerce(&name, &key, value);
        arguments.insert(key, typed);
        rest = next;
    }
    TextCall {
        name,
        arguments: Ok(Value::Object(arguments)),
    }
}

/// A parameter's text as the type the tool's schema gives it (strings stay as written).
fn coerce(tool: &str, key: &str, raw: &str) -> Value {
    let declared = tools::spec(tool).and_then(|t| {
        let schema = t.parameters();
        let kind = &schema["properties"][key]["type"];
        match kind {
            Value::String(s) => Some(s.clone()),
            Value::Array(types) => types
                .iter()
                .filter_map(Value::as_str)
                .find(|t| *t != "null")
                .map(str::to_owned),
            _ => None,
        }
    });
    match declared.as_deref() {
        Some("string") | None => Value::String(raw.to_owned()),
        Some(_) => {
            serde_json::from_str(raw.trim()).unwrap_or_else(|_| Value::String(raw.to_owned()))
        }
    }
}

fn preview(text: &str) -> String {
    let cut: String = text.chars().take(200).collect();
    if cut.len() < text.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Feeds `text` in pieces of `step` chars; returns (shown text, calls, leftover).
    fn run(text: &str, step: usize) -> (String, Vec<TextCall>, Leftover) {
        let mut filter = TextCallFilter::default();
        let chars: Vec<char> = text.chars().collect();
        let mut shown = String::new();
        for piece in chars.chunks(step) {
            shown.push_str(&filter.push(&piece.iter().collect::<String>()));
        }
        let (rest, leftover) = filter.finish();
        shown.push_str(&rest);
        (shown, filter.take_calls(), leftover)
    }

    #[test]
    fn hermes_calls_are_taken_out_of_the_text_at_any_cut() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"a.rs\"}}\n</tool_call>";
        for step in [1, 2, 3, 7, 1000] {
            let (shown, calls, leftover) = run(text, step);
            assert_eq!(shown, "Let me look.\n", "step {step}");
            assert_eq!(leftover, Leftover::Nothing);
            assert_eq!(
                calls,
                vec![TextCall {
                    name: "read_file".into(),
                    arguments: Ok(json!({"path": "a.rs"}))
                }]
            );
        }
    }

    #[test]
    fn qwen_coder_calls_are_typed_by_the_schema() {
        let text = "<tool_call>\n<function=read_file>\n<parameter=path>\nsrc/x.rs\n</parameter>\n<parameter=limit>\n20\n</parameter>\n</function>\n</tool_call> done";
        for step in [1, 5, 1000] {
            let (shown, calls, _) = run(text, step);
            assert_eq!(shown, " done");
            assert_eq!(calls[0].name, "read_file");
            assert_eq!(
                calls[0].arguments,
                Ok(json!({"path": "src/x.rs", "limit": 20}))
            );
        }
        let (_, calls, _) = run(
            "<function=write_file><parameter=path>n.txt</parameter><parameter=content>123</parameter></function>",
            3,
        );
        assert_eq!(
            calls[0].arguments,
            Ok(json!({"path": "n.txt", "content": "123"}))
        );
    }

    #[test]
    fn a_bare_json_answer_is_a_call_only_when_it_names_a_tool() {
        let (shown, calls, _) = run(" {\"name\": \"list_dir\", \"arguments\": {}}", 4);
        assert_eq!(shown, "");
        assert_eq!(calls[0].name, "list_dir");
        let (shown, calls, _) = run("{\"name\": \"Ada\", \"age\": 36}", 4);
        assert_eq!(shown, "{\"name\": \"Ada\", \"age\": 36}");
        assert!(calls.is_empty());
    }

    #[test]
    fn ordinary_text_with_angle_brackets_passes_and_streams_at_once() {
        let mut filter = TextCallFilter::default();
        assert_eq!(filter.push("a < b and "), "a < b and ");
        assert_eq!(filter.push("<div>"), "<div>");
        // Mid-line markup is text at once; at a line's start a tag prefix waits for the
        // next delta.
        assert_eq!(filter.push("x <tool"), "x <tool");
        assert_eq!(filter.push("\n<tool"), "\n");
        assert_eq!(filter.push("s>"), "<tools>");
        assert_eq!(filter.finish(), (String::new(), Leftover::Nothing));
        let (shown, calls, _) = run("Vec<u8> is bytes", 1);
        assert_eq!(shown, "Vec<u8> is bytes");
        assert!(calls.is_empty());
    }

    #[test]
    fn quoted_markup_is_text_and_runs_nothing() {
        let readme = "The README shows how calls look:\n```\n<tool_call>{\"name\": \"write_file\", \"arguments\": {\"path\": \"x\", \"content\": \"y\"}}</tool_call>\n<function=write_file><parameter=path>z</parameter></function>\n```\nand inline `<tool_call>{}</tool_call>` or mid-line <function=run_command></function> too.";
        for step in [1, 4, 1000] {
            let (shown, calls, leftover) = run(readme, step);
            assert!(calls.is_empty(), "step {step}: {calls:?}");
            assert_eq!(shown, readme, "step {step}");
            assert_eq!(leftover, Leftover::Nothing);
        }
        // After the fence closes, a call at a line's start is a call again; blanks before it
        // are allowed.
        let text = "```\n<tool_call>{}</tool_call>\n```\n  <tool_call>{\"name\": \"list_dir\", \"arguments\": {}}</tool_call>";
        let (_, calls, _) = run(text, 3);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "list_dir");
        // A ~~~ line inside a ``` block does not close it.
        let mixed =
            "```\n~~~\n<tool_call>{\"name\": \"list_dir\", \"arguments\": {}}</tool_call>\n```";
        assert!(run(mixed, 2).1.is_empty());
        // Two calls one after the other on one line are both calls.
        let two = "<tool_call>{\"name\": \"list_dir\", \"arguments\": {}}</tool_call><tool_call>{\"name\": \"list_dir\", \"arguments\": {}}</tool_call>";
        assert_eq!(run(two, 5).1.len(), 2);
    }

    #[test]
    fn unclosed_and_malformed_markup() {
        let (shown, calls, leftover) = run("ok\n<tool_call>{\"name\": \"write_file\", \"argu", 3);
        assert_eq!(shown, "ok\n");
        assert!(calls.is_empty());
        assert!(matches!(leftover, Leftover::Unclosed(_)));
        let (_, calls, _) = run("<tool_call>not json</tool_call>", 100);
        assert!(
            calls[0]
                .arguments
                .as_ref()
                .is_err_and(|e| e.contains("not a JSON object"))
        );
        let call = parse_unclosed("<tool_call>{\"name\": \"list_dir\", \"arguments\": {}}");
        assert_eq!(call.name, "list_dir");
    }
}
