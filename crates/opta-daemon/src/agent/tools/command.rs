//! `run_command`: `sh -c` in the workspace, in its own process group, with a timeout, the
//! output kept within a cap (head and tail), and the whole group killed when the call ends
//! by timeout or cancel (dropping the call's future kills it).

use std::process::Stdio;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;

use super::{Change, Prepared, head_and_tail};
use crate::agent::Workspace;

/// `run_command` arguments.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunCommandArgs {
    /// The command line, run with `sh -c` in the workspace.
    pub command: String,
    /// Seconds before the command is killed (default 120).
    #[serde(default, alias = "timeout_secs", alias = "timeout")]
    pub timeout_secs: Option<u64>,
    /// For a command that may keep running (a dev server): after this many seconds, leave it
    /// running in the background and answer with its process id instead of killing it.
    #[serde(default, alias = "background_after_secs")]
    pub background_after_secs: Option<u64>,
}

/// Limits of `run_command`, from the daemon's flags.
#[derive(Debug, Clone)]
pub struct CommandLimits {
    /// Timeout when the call names none.
    pub default_timeout: Duration,
    /// The most a call may ask for.
    pub max_timeout: Duration,
    /// Output bytes kept (head and tail) for the model.
    pub output_cap: usize,
    /// Environment variables the command does not inherit (the daemon's token).
    pub env_remove: Vec<String>,
}

impl Default for CommandLimits {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(120),
            max_timeout: Duration::from_secs(600),
            output_cap: 32 * 1024,
            env_remove: vec!["OPTA_TOKEN".to_owned()],
        }
    }
}

/// The command, prepared: nothing to check before approval but its shape.
pub fn prepare(args: RunCommandArgs) -> Prepared {
    let command = args.command.trim();
    if command.is_empty() {
        return Prepared::Finished(Err("the command is empty".to_owned()));
    }
    Prepared::Change {
        summary: command.to_owned(),
        diff: None,
        grant_scope: simple_scope(command),
        change: Change::Command(args),
    }
}

/// Arguments that make a granted program do something else than it did when the user
/// allowed it: run other programs, write where they name, or read another configuration or
/// repository. A command with one of them is never covered by a grant and always asks.
pub const GRANT_BREAKING_FLAGS: &[&str] = &[
    "-exec",
    "-execdir",
    "-ok",
    "-okdir",
    "-delete",
    "-o",
    "--output",
    "-c",
    "-C",
    "--git-dir",
    "--work-tree",
    "--exec-path",
];

/// The first of `arguments` (unquoted, the program left out) that is one of
/// [`GRANT_BREAKING_FLAGS`] (`--output=FILE` counts as `--output`).
fn breaking_flag<'a>(mut arguments: impl Iterator<Item = &'a str>) -> Option<&'static str> {
    arguments.find_map(|word| {
        GRANT_BREAKING_FLAGS.iter().copied().find(|flag| {
            word == *flag
                || (flag.starts_with("--")
                    && word
                        .strip_prefix(flag)
                        .is_some_and(|rest| rest.starts_with('=')))
        })
    })
}

/// The first argument of `command`, simple or not, that is one of [`GRANT_BREAKING_FLAGS`]
/// once the shell's quoting is removed (`-ex''ec` is `-exec`).
pub fn grant_breaking_flag(command: &str) -> Option<&'static str> {
    let words: Vec<String> = brush_parser::tokenize_str(command)
        .ok()?
        .iter()
        .filter_map(|t| match t {
            brush_parser::Token::Word(word, _) => Some(brush_parser::unquote_str(word)),
            brush_parser::Token::Operator(..) => None,
        })
        .collect();
    breaking_flag(words.iter().skip(1).map(String::as_str))
}

/// Whether the shell would expand something in `word` (a parameter, a substitution, a glob,
/// a brace list): its words are then not what the user saw. Quoting is followed: `'$x'`
/// and `"*"` are plain.
fn expands(word: &str) -> bool {
    let mut chars = word.chars();
    let (mut single, mut double) = (false, false);
    while let Some(c) = chars.next() {
        match c {
            '\'' if !double => single = !single,
            _ if single => {}
            '"' => double = !double,
            '\\' => {
                chars.next();
            }
            '$' | '`' => return true,
            '*' | '?' | '[' | '{' if !double => return true,
            _ => {}
        }
    }
    false
}

/// Words that start a compound command rather than name a program.
const RESERVED: &[&str] = &[
    "if", "then", "else", "elif", "fi", "for", "while", "until", "do", "done", "case", "esac",
    "select", "function", "{", "}", "!", "[[", "]]", "time", "coproc",
];

/// `program firstArg` for a *simple* command (one program, plain words: no operators,
/// substitutions, expansions, globs, redirections or assignments, and none of the
/// [`GRANT_BREAKING_FLAGS`]), quoting removed, else `None`. Uses a shell tokenizer, so
/// quoting is understood: `echo "a;b"` is simple, `echo a;b` is not. A glob is never simple:
/// `find . -ex*` would meet a file named `-exec`.
pub fn simple_scope(command: &str) -> Option<String> {
    let tokens = brush_parser::tokenize_str(command).ok()?;
    let mut words = Vec::new();
    for token in &tokens {
        match token {
            brush_parser::Token::Operator(..) => return None,
            brush_parser::Token::Word(word, _) if expands(word) => return None,
            brush_parser::Token::Word(word, _) => words.push(word.as_str()),
        }
    }
    let program = *words.first()?;
    if RESERVED.contains(&program) || program.contains('=') {
        return None;
    }
    let words: Vec<String> = words.into_iter().map(brush_parser::unquote_str).collect();
    if breaking_flag(words.iter().skip(1).map(String::as_str)).is_some() {
        return None;
    }
    Some(words.iter().take(2).cloned().collect::<Vec<_>>().join(" "))
}

/// Kills the process group and everything in the command's cgroup when dropped (a cancel
/// drops the call), unless the group is known to be gone.
struct GroupGuard {
    pgid: Option<nix::unistd::Pid>,
    cell: crate::process::contain::Cell,
}

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
        self.cell.kill();
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the command; the result text has the exit status and the output (stdout then
/// stderr, each cut to the cap with a marker).
pub async fn run(
    workspace: &Workspace,
    args: RunCommandArgs,
    limits: &CommandLimits,
    sandbox: Option<&crate::process::sandbox::Sandbox>,
    containment: &crate::process::contain::Containment,
) -> Result<String, String> {
    let timeout = args
        .timeout_secs
        .filter(|s| *s > 0)
        .map_or(limits.default_timeout, Duration::from_secs)
        .min(limits.max_timeout);
    // The workspace must still be the directory the session opened; the command starts in
    // that directory (through its handle), whatever its path names by then.
    workspace.ensure_in_place().map_err(|e| e.to_string())?;
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(&args.command)
        .current_dir(workspace.handle_path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for name in &limits.env_remove {
        command.env_remove(name);
    }
    let cell = containment
        .prepare(&mut command)
        .map_err(|e| format!("could not give the command its cgroup: {e}"))?;
    let spawned = match sandbox {
        Some(sandbox) => sandbox.spawn_in(command, workspace).await,
        None => command.spawn(),
    };
    let mut child = spawned.map_err(|e| format!("could not start sh: {e}"))?;
    let mut cell = cell;
    if let Some(pid) = child.id() {
        containment.record(&mut cell, pid);
    }
    let mut guard = GroupGuard {
        pgid: child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(nix::unistd::Pid::from_raw),
        cell,
    };
    let cap = limits.output_cap;
    let stdout = child
        .stdout
        .take()
        .map(|s| tokio::spawn(read_capped(s, cap)));
    let stderr = child
        .stderr
        .take()
        .map(|s| tokio::spawn(read_capped(s, cap)));
    let started = std::time::Instant::now();
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => Some(status.map_err(|e| format!("waiting for the command: {e}"))?),
        Err(_) => None,
    };
    // Whatever the shell left running in its group goes with it (a process meant to
    // outlive the call belongs to the background tools).
    guard.kill();
    let collect = |task: Option<tokio::task::JoinHandle<String>>| async move {
        match task {
            Some(task) => tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default(),
            None => String::new(),
        }
    };
    let out = collect(stdout).await;
    let err = collect(stderr).await;
    let mut text = match status {
        Some(s) => match s.code() {
            Some(code) => format!("exit code {code}"),
            None => "killed by a signal".to_owned(),
        },
        None => format!(
            "timed out after {} s; the command and everything it started were killed",
            timeout.as_secs()
        ),
    };
    text.push_str(&format!(" ({:.1} s)", started.elapsed().as_secs_f64()));
    if !out.is_empty() {
        text.push_str("\nstdout:\n");
        text.push_str(&out);
    }
    if !err.is_empty() {
        text.push_str("\nstderr:\n");
        text.push_str(&err);
    }
    if out.is_empty() && err.is_empty() {
        text.push_str("\n(no output)");
    }
    match status {
        Some(s) if s.success() => Ok(text),
        _ => Err(text),
    }
}

/// Reads a stream to its end, keeping at most about `cap` bytes: the head, and the tail in
/// a window that slides, with a marker for what fell between.
async fn read_capped(mut reader: impl tokio::io::AsyncRead + Unpin, cap: usize) -> String {
    let mut kept = Vec::new();
    let mut dropped = 0usize;
    let mut buf = vec![0u8; 8192];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                // Keep the first half, slide the second.
                if kept.len() > cap * 2 {
                    let excess = kept.len() - cap * 2;
                    kept.drain(cap..cap + excess);
                    dropped += excess;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&kept).into_owned();
    let text = head_and_tail(&text, cap);
    if dropped > 0 && !text.contains("bytes cut") {
        return format!("{text}\n[… {dropped} bytes cut …]");
    }
    if dropped > 0 {
        // head_and_tail counted only what it saw; say what was cut in all.
        return text.replacen(" bytes cut …]", &format!(" bytes cut (+{dropped}) …]"), 1);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_that_change_what_a_program_does_take_the_grant_scope_away() {
        assert_eq!(simple_scope("find . -name x").as_deref(), Some("find ."));
        for risky in [
            "find . -exec touch pwned \\;",
            "find . -execdir sh \\;",
            "find . -delete",
            "git -c core.fsmonitor=evil status",
            "git status -C /",
            "git status --git-dir=/tmp/x",
            "git status --work-tree /",
            "git status --exec-path=/tmp",
            "sort in -o out",
            "curl --output=/tmp/x url",
            "python3 -c 'import os'",
        ] {
            assert_eq!(simple_scope(risky), None, "{risky:?}");
            assert!(grant_breaking_flag(risky).is_some(), "{risky:?}");
        }
        // Quoting does not hide a flag; a glob or a parameter could become one.
        for hidden in [
            "find . -ex''ec touch pwned \\;",
            "find . \"-exec\" touch pwned \\;",
            "find . -ex\\ec touch pwned \\;",
        ] {
            assert_eq!(simple_scope(hidden), None, "{hidden:?}");
            assert_eq!(grant_breaking_flag(hidden), Some("-exec"), "{hidden:?}");
        }
        for expanding in [
            "find . -ex? touch pwned \\;",
            "find . [-]exec touch pwned \\;",
            "find . -{exec,x} touch \\;",
            "ls *.rs",
            "find . $FLAGS",
            "echo \"$HOME\"",
        ] {
            assert_eq!(simple_scope(expanding), None, "{expanding:?}");
        }
        // Quoted, nothing expands: still simple, the key without its quotes.
        assert_eq!(
            simple_scope("grep '*.rs' src").as_deref(),
            Some("grep *.rs")
        );
        assert_eq!(simple_scope("\"find\" .").as_deref(), Some("find ."));
        // The program's own name is not an argument.
        assert_eq!(grant_breaking_flag("-c"), None);
        assert_eq!(grant_breaking_flag("ls --outputs"), None);
    }

    #[test]
    fn only_simple_commands_have_a_grant_scope() {
        assert_eq!(
            simple_scope("cargo test --all").as_deref(),
            Some("cargo test")
        );
        assert_eq!(simple_scope("ls").as_deref(), Some("ls"));
        assert_eq!(simple_scope("echo \"a;b\"").as_deref(), Some("echo a;b"));
        for compound in [
            "cargo test; rm -rf /",
            "a && b",
            "a || b",
            "a | b",
            "echo $(whoami)",
            "echo `id`",
            "echo hi > f",
            "cat < f",
            "(cd x)",
            "{ a; }",
            "X=1 cargo test",
            "if true; then a; fi",
            "a &",
            "a\nb",
        ] {
            assert_eq!(simple_scope(compound), None, "{compound:?}");
        }
    }

    #[tokio::test]
    async fn output_is_capped_and_failures_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::new(&dir.path().canonicalize().unwrap()).unwrap();
        let groups = crate::process::contain::Containment::process_groups_only();
        let limits = CommandLimits {
            output_cap: 1000,
            ..CommandLimits::default()
        };
        let args = |c: &str| RunCommandArgs {
            command: c.into(),
            timeout_secs: None,
            background_after_secs: None,
        };
        let out = run(&ws, args("seq 1 100000"), &limits, None, &groups)
            .await
            .unwrap();
        assert!(out.starts_with("exit code 0"), "{out}");
        assert!(out.contains("bytes cut"), "{out}");
        assert!(out.contains("\n100000"), "{out}");
        assert!(out.len() < 1300, "{}", out.len());
        let err = run(&ws, args("echo oops >&2; exit 3"), &limits, None, &groups)
            .await
            .unwrap_err();
        assert!(err.starts_with("exit code 3"), "{err}");
        assert!(err.contains("stderr:\noops"), "{err}");
    }
}
