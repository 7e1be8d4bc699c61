//! The tools a model may call. Each family lives in its own file as plain async functions
//! over a [`Workspace`]; this module names them, describes them to the model (a JSON Schema
//! generated from each argument type) and turns a call into either a result or a change that
//! needs approval first.

pub mod background;
pub mod command;
pub mod files;
mod read;
pub mod search;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::Workspace;
use super::workspace::Stamp;

/// What a tool does, which decides whether it asks first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolKind {
    /// Reads only; never asks.
    Read,
    /// Writes or edits a file.
    Write,
    /// Runs a command.
    Command,
}

/// One tool as the model sees it.
pub struct ToolSpec {
    /// The name the model calls it by.
    pub name: &'static str,
    /// What it does, for the model.
    pub description: &'static str,
    /// Read, write or command.
    pub kind: ToolKind,
    schema: fn() -> Value,
}

fn schema_of<T: JsonSchema>() -> Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(T)).unwrap_or(Value::Null);
    if let Some(map) = schema.as_object_mut() {
        map.remove("$schema");
        map.remove("title");
    }
    schema
}

/// Every tool, in the order they are described to the model.
pub const TOOLS: &[ToolSpec] = &[
    ToolSpec {
        name: "read_file",
        description: "Read a text file of the workspace. Lines come numbered; use offset and \
                      limit (in lines) for long files, and byteOffset to go on inside a line \
                      too long to show whole.",
        kind: ToolKind::Read,
        schema: schema_of::<files::ReadFileArgs>,
    },
    ToolSpec {
        name: "write_file",
        description: "Create a file, or replace the whole content of one you have read.",
        kind: ToolKind::Write,
        schema: schema_of::<files::WriteFileArgs>,
    },
    ToolSpec {
        name: "edit_file",
        description: "Replace an exact piece of text in a file you have read. old_string must \
                      occur exactly once unless replaceAll is true.",
        kind: ToolKind::Write,
        schema: schema_of::<files::EditFileArgs>,
    },
    ToolSpec {
        name: "multi_edit",
        description: "Several edit_file replacements in one file, applied in order, all or \
                      nothing.",
        kind: ToolKind::Write,
        schema: schema_of::<files::MultiEditArgs>,
    },
    ToolSpec {
        name: "list_dir",
        description: "List a directory of the workspace (directories end with /).",
        kind: ToolKind::Read,
        schema: schema_of::<files::ListDirArgs>,
    },
    ToolSpec {
        name: "find_files",
        description: "Find files whose path matches a glob such as **/*.rs (.gitignore is \
                      respected).",
        kind: ToolKind::Read,
        schema: schema_of::<search::FindFilesArgs>,
    },
    ToolSpec {
        name: "search_files",
        description: "Search file contents with a regular expression (.gitignore is \
                      respected); answers path:line: text.",
        kind: ToolKind::Read,
        schema: schema_of::<search::SearchFilesArgs>,
    },
    ToolSpec {
        name: "bg_start",
        description: "Start a long-running command (a dev server, a watcher) in the \
                      background in the workspace; answers its process id.",
        kind: ToolKind::Command,
        schema: schema_of::<background::BgStartArgs>,
    },
    ToolSpec {
        name: "bg_status",
        description: "The state of a background process you started.",
        kind: ToolKind::Read,
        schema: schema_of::<background::BgStatusArgs>,
    },
    ToolSpec {
        name: "bg_output",
        description: "New output of a background process (stdout and stderr as they came); \
                      pass the afterSeq the previous call gave to read on.",
        kind: ToolKind::Read,
        schema: schema_of::<background::BgOutputArgs>,
    },
    ToolSpec {
        name: "bg_kill",
        description: "Stop a background process you started, and everything it started.",
        kind: ToolKind::Command,
        schema: schema_of::<background::BgKillArgs>,
    },
    ToolSpec {
        name: "run_command",
        description: "Run a shell command (sh -c) in the workspace and return its exit code \
                      and output.",
        kind: ToolKind::Command,
        schema: schema_of::<command::RunCommandArgs>,
    },
];

/// The tool called `name`.
pub fn spec(name: &str) -> Option<&'static ToolSpec> {
    TOOLS.iter().find(|t| t.name == name)
}

impl ToolSpec {
    /// The JSON Schema of its arguments.
    pub fn parameters(&self) -> Value {
        (self.schema)()
    }
}

/// The `tools` array of a chat request (OpenAI function format), built once.
pub fn definitions() -> &'static Value {
    static DEFINITIONS: std::sync::LazyLock<Value> = std::sync::LazyLock::new(build_definitions);
    &DEFINITIONS
}

fn build_definitions() -> Value {
    Value::Array(
        TOOLS
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.parameters(),
                }})
            })
            .collect(),
    )
}

/// The names of all tools, for error messages.
pub fn names() -> String {
    TOOLS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
}

/// What the session remembers between tool calls: which files the model has read (and what
/// they were then), so a write of a file it has not seen, or that changed since, is refused,
/// and a short-lived cache of read results. Files are keyed by their real path relative to
/// the workspace.
#[derive(Debug, Default)]
pub struct FileMemory {
    read: HashMap<PathBuf, Stamp>,
    cache: HashMap<String, CachedRead>,
}

#[derive(Debug)]
struct CachedRead {
    stamp: Stamp,
    at: std::time::Instant,
    output: String,
}

/// Read results kept per session.
const CACHE_ENTRIES: usize = 200;
/// How long a cached read result stays usable.
const CACHE_TTL: Duration = Duration::from_secs(30);

impl FileMemory {
    /// Notes that the model has seen `key` as `stamp` says.
    pub fn saw(&mut self, key: &std::path::Path, stamp: Stamp) {
        self.read.insert(key.to_owned(), stamp);
    }

    /// Why a write to `key`, now as `now` says (`None`: absent), must wait for a read.
    pub fn stale(&self, key: &std::path::Path, now: Option<Stamp>, shown: &str) -> Option<String> {
        let now = now?;
        match self.read.get(key) {
            None => Some(format!(
                "{shown} exists and you have not read it in this session: read it with \
                 read_file first, then write or edit it"
            )),
            Some(seen) if *seen != now => Some(format!(
                "{shown} changed on disk since you read it: read it again with read_file \
                 first, then write or edit it"
            )),
            Some(_) => None,
        }
    }

    /// A cached result for `key` that is still valid for a file now as `now` says.
    pub fn cached(&self, key: &str, now: Stamp) -> Option<String> {
        let hit = self.cache.get(key)?;
        (hit.at.elapsed() < CACHE_TTL && hit.stamp == now).then(|| hit.output.clone())
    }

    /// Keeps a read result of a file as `stamp` says under `key`.
    pub fn remember(&mut self, key: String, stamp: Stamp, output: &str) {
        if self.cache.len() >= CACHE_ENTRIES {
            // Stale entries first; else the oldest goes.
            self.cache.retain(|_, c| c.at.elapsed() < CACHE_TTL);
            if self.cache.len() >= CACHE_ENTRIES
                && let Some(oldest) = self
                    .cache
                    .iter()
                    .min_by_key(|(_, c)| c.at)
                    .map(|(k, _)| k.clone())
            {
                self.cache.remove(&oldest);
            }
        }
        self.cache.insert(
            key,
            CachedRead {
                stamp,
                at: std::time::Instant::now(),
                output: output.to_owned(),
            },
        );
    }

    /// Forgets cached reads (after any write, edit or command).
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }
}

/// A change a tool wants to make, prepared (validated, diffed) but not yet done.
#[derive(Debug, Clone)]
pub enum Change {
    /// Write `content` to `path` (created with its parent directories when missing).
    Write {
        /// Where, relative to the workspace.
        path: PathBuf,
        /// The whole new content.
        content: String,
        /// What the file was when the change was prepared (`None`: absent); a file no longer
        /// so is not written.
        expected: Option<Stamp>,
    },
    /// Run a shell command.
    Command(command::RunCommandArgs),
    /// Start a background process.
    BackgroundStart(background::BgStartArgs),
    /// Stop a background process.
    BackgroundKill(background::BgKillArgs),
}

/// What in a repository runs programs at the next `git` command: its configuration (an
/// `fsmonitor`, an alias; `config.worktree` too, by prefix), its hooks, its info
/// (attributes, excludes), and `commondir`, which sends git to another directory's
/// configuration and hooks.
pub const GIT_PROGRAM_PATHS: &[&str] =
    &[".git/config", ".git/hooks", ".git/info", ".git/commondir"];

impl Change {
    /// Why this change is asked about every time, even where the mode or a grant would let
    /// it run: a write to git's configuration, hooks or info (they run programs at the next
    /// `git` command), or a command with an argument that makes its program do more than a
    /// grant for it covers.
    pub fn always_ask(&self) -> Option<String> {
        match self {
            Change::Write { path, .. } => GIT_PROGRAM_PATHS
                .iter()
                .any(|p| path.starts_with(p))
                .then(|| {
                    "it changes git's configuration or hooks, which run programs at the next \
                     git command"
                        .to_owned()
                }),
            Change::Command(command::RunCommandArgs { command, .. })
            | Change::BackgroundStart(background::BgStartArgs { command, .. }) => {
                command::grant_breaking_flag(command).map(|flag| {
                    format!(
                        "{flag} can make the program run or write other things than a grant \
                         for it covers"
                    )
                })
            }
            Change::BackgroundKill(_) => None,
        }
    }
}

/// What a tool call works with.
pub struct ToolEnv<'a> {
    /// The session's workspace.
    pub workspace: &'a Workspace,
    /// The session's memory of reads.
    pub memory: &'a mut FileMemory,
    /// The runner and the session, for the background tools (absent: they are unavailable).
    pub background: Option<background::Background<'a>>,
    /// The sandbox commands run in (absent for `dangerous` turns).
    pub sandbox: Option<&'a crate::process::sandbox::Sandbox>,
    /// How commands are tracked to their end (every turn, `dangerous` included).
    pub containment: &'a crate::process::contain::Containment,
    /// The most text one edit may add to a file (`--max-edit-kib`).
    pub max_edit_bytes: usize,
    /// The most of one result the model gets (`--tool-result-kib`): a read stops short of it,
    /// so its note on how to read on is never what the cut leaves out.
    pub result_bytes: usize,
}

/// A call turned into what happens next.
#[derive(Debug)]
pub enum Prepared {
    /// Done already (read-only tools) or refused: the text the model sees.
    Finished(Result<String, String>),
    /// A change that runs only when approved.
    Change {
        /// One line for people: "write 120 bytes to src/main.rs", the command.
        summary: String,
        /// A unified diff of a write or edit.
        diff: Option<String>,
        /// The command's program and first argument when the command is simple (a grant
        /// can cover it), else `None` (always asks).
        grant_scope: Option<String>,
        /// What to do.
        change: Change,
    },
}

/// Parses a call's arguments into `T`, or the message the model sees.
pub fn parse_args<T: DeserializeOwned>(tool: &ToolSpec, args: &Value) -> Result<T, String> {
    let args = if args.is_null() {
        &Value::Object(Default::default())
    } else {
        args
    };
    serde_path_to_error::deserialize(args).map_err(|e| {
        let at = e.path().to_string();
        let place = if at == "." {
            String::new()
        } else {
            format!(" at {at}")
        };
        format!(
            "invalid arguments for {}{place}: {}. Expected arguments matching this JSON Schema: {}",
            tool.name,
            e.inner(),
            tool.parameters()
        )
    })
}

/// Validates a call and, for read-only tools, runs it; writes and commands come back as a
/// [`Change`] to approve.
pub async fn prepare(tool: &ToolSpec, args: &Value, env: &mut ToolEnv<'_>) -> Prepared {
    let workspace = env.workspace;
    let result = match tool.name {
        "read_file" => match parse_args(tool, args) {
            Ok(a) => files::read_file(workspace, env.memory, a, env.result_bytes).await,
            Err(e) => Err(e),
        },
        "list_dir" => match parse_args(tool, args) {
            Ok(a) => files::list_dir(workspace, a).await,
            Err(e) => Err(e),
        },
        "find_files" => match parse_args(tool, args) {
            Ok(a) => search::find_files(workspace, a).await,
            Err(e) => Err(e),
        },
        "search_files" => match parse_args(tool, args) {
            Ok(a) => search::search_files(workspace, a).await,
            Err(e) => Err(e),
        },
        "write_file" => match parse_args(tool, args) {
            Ok(a) => return files::prepare_write(workspace, env.memory, a).await,
            Err(e) => Err(e),
        },
        "edit_file" => match parse_args::<files::EditFileArgs>(tool, args) {
            Ok(a) => {
                let edits = vec![a.edit];
                return files::prepare_edits(
                    workspace,
                    env.memory,
                    &a.path,
                    edits,
                    env.max_edit_bytes,
                )
                .await;
            }
            Err(e) => Err(e),
        },
        "multi_edit" => match parse_args::<files::MultiEditArgs>(tool, args) {
            Ok(a) => {
                return files::prepare_edits(
                    workspace,
                    env.memory,
                    &a.path,
                    a.edits,
                    env.max_edit_bytes,
                )
                .await;
            }
            Err(e) => Err(e),
        },
        "run_command" => match parse_args(tool, args) {
            Ok(a) => return command::prepare(a),
            Err(e) => Err(e),
        },
        "bg_start" | "bg_kill" | "bg_status" | "bg_output" if env.background.is_none() => {
            Err("background processes are not available to this turn".to_owned())
        }
        "bg_start" => match parse_args(tool, args) {
            Ok(a) => return background::prepare_start(a),
            Err(e) => Err(e),
        },
        "bg_kill" => match parse_args(tool, args) {
            Ok(a) => return background::prepare_kill(a),
            Err(e) => Err(e),
        },
        "bg_status" => match (parse_args(tool, args), &env.background) {
            (Ok(a), Some(bg)) => background::status(bg, a).await,
            (Err(e), _) => Err(e),
            (Ok(_), None) => Err("background processes are not available".to_owned()),
        },
        "bg_output" => match (parse_args(tool, args), &env.background) {
            (Ok(a), Some(bg)) => background::output(bg, a).await,
            (Err(e), _) => Err(e),
            (Ok(_), None) => Err("background processes are not available".to_owned()),
        },
        other => Err(format!(
            "no tool is called {other:?}; the tools are {}",
            names()
        )),
    };
    Prepared::Finished(result)
}

/// Makes an approved change.
pub async fn apply(
    change: Change,
    env: &mut ToolEnv<'_>,
    limits: &command::CommandLimits,
) -> Result<String, String> {
    env.memory.clear_cache();
    let workspace = env.workspace;
    match change {
        Change::Write {
            path,
            content,
            expected,
        } => {
            let shown = workspace.display(&path);
            let stamp = files::write(workspace, &path, &content, expected).await?;
            env.memory.saw(&path, stamp);
            Ok(format!("wrote {} bytes to {shown}", content.len()))
        }
        Change::Command(args) => match (&env.background, args.background_after_secs) {
            (Some(bg), Some(after)) => {
                background::run_or_detach(bg, workspace, args.command, after, limits).await
            }
            _ => command::run(workspace, args, limits, env.sandbox, env.containment).await,
        },
        Change::BackgroundStart(args) => match &env.background {
            Some(bg) => background::start(bg, workspace, args).await,
            None => Err("background processes are not available".to_owned()),
        },
        Change::BackgroundKill(args) => match &env.background {
            Some(bg) => background::kill(bg, args).await,
            None => Err("background processes are not available".to_owned()),
        },
    }
}

/// Cuts `text` to at most `max` bytes (on a char boundary), keeping the head and the tail
/// with a marker saying how much was left out.
pub fn head_and_tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let half = max / 2;
    let mut head_end = half;
    while !text.is_char_boundary(head_end) {
        head_end -= 1;
    }
    let mut tail_start = text.len() - half;
    while !text.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    format!(
        "{}\n[… {} bytes cut …]\n{}",
        &text[..head_end],
        tail_start - head_end,
        &text[tail_start..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_has_an_object_schema() {
        for tool in TOOLS {
            let schema = tool.parameters();
            assert_eq!(schema["type"], "object", "{}", tool.name);
            assert!(schema["properties"].is_object(), "{}", tool.name);
        }
        assert_eq!(definitions().as_array().map(Vec::len), Some(TOOLS.len()));
    }

    #[test]
    fn edit_file_takes_its_replacement_flat() {
        let schema = spec("edit_file")
            .map(ToolSpec::parameters)
            .unwrap_or_default();
        let mut properties: Vec<&String> = schema["properties"]
            .as_object()
            .map(|p| p.keys().collect())
            .unwrap_or_default();
        properties.sort();
        assert_eq!(properties, ["newString", "oldString", "path", "replaceAll"]);
        let mut required: Vec<&str> = schema["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        required.sort_unstable();
        assert_eq!(required, ["newString", "oldString", "path"]);
        // Small models write snake_case: the aliases still apply.
        let parsed = spec("edit_file").map(|t| {
            parse_args::<files::EditFileArgs>(
                t,
                &json!({"path": "a", "old_string": "x", "new_string": "y", "replace_all": true}),
            )
        });
        assert!(
            matches!(&parsed, Some(Ok(a)) if a.edit.old_string == "x" && a.edit.replace_all),
            "{parsed:?}"
        );
    }

    #[test]
    fn null_in_every_optional_argument_reads_as_absent() {
        let edit = spec("edit_file").map(|t| {
            parse_args::<files::EditFileArgs>(
                t,
                &json!({"path": "a", "oldString": "x", "newString": "y", "replaceAll": null}),
            )
        });
        assert!(matches!(edit, Some(Ok(a)) if !a.edit.replace_all));
        let search = spec("search_files").map(|t| {
            parse_args::<search::SearchFilesArgs>(
                t,
                &json!({"pattern": "x", "path": null, "glob": null, "caseInsensitive": null}),
            )
        });
        assert!(matches!(search, Some(Ok(_))));
        let read = spec("read_file").map(|t| {
            parse_args::<files::ReadFileArgs>(
                t,
                &json!({"path": "a", "offset": null, "limit": null}),
            )
        });
        assert!(matches!(read, Some(Ok(_))));
        let list = spec("list_dir").map(|t| parse_args::<files::ListDirArgs>(t, &Value::Null));
        assert!(matches!(list, Some(Ok(_))));
    }

    #[test]
    fn head_and_tail_keeps_both_ends() {
        let text = format!("{}{}", "a".repeat(100), "b".repeat(100));
        let cut = head_and_tail(&text, 20);
        assert!(
            cut.starts_with("aaaaaaaaaa\n[… 180 bytes cut …]\nbbbbbbbbbb"),
            "{cut}"
        );
        assert_eq!(head_and_tail("short", 20), "short");
        let wide = "é".repeat(50);
        assert!(head_and_tail(&wide, 11).contains("bytes cut"));
    }

    #[test]
    fn bad_arguments_name_the_field_and_the_schema() {
        let tool =
            spec("read_file").map(|t| parse_args::<files::ReadFileArgs>(t, &json!({"path": 3})));
        let Some(Err(message)) = tool else {
            panic!("expected an error")
        };
        assert!(message.contains("at path"), "{message}");
        assert!(message.contains("JSON Schema"), "{message}");
    }
}
