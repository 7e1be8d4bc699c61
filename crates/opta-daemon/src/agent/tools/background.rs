//! Background tools: start a long-running command (a dev server, a watcher), read its output
//! as it comes, look at its state, stop it. They go through the daemon's one process runner,
//! so what the model starts is listed in `/v3/background`, reported to the session, and
//! stopped at shutdown like anything else.

use std::fmt::Write as _;
use std::time::Duration;

use opta_protocol::{BackgroundProcess, KillSignal, ProcessState};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Change, Prepared, command::simple_scope};
use crate::agent::Workspace;
use crate::process::{MAX_TIMEOUT, ProcessRunner, StartSpec};
use crate::session::SessionHandle;

/// `bg_start` arguments.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BgStartArgs {
    /// The command line, run with `sh -c` in the workspace and left running.
    pub command: String,
    /// A short name for it.
    #[serde(default)]
    pub label: Option<String>,
    /// Working directory inside the workspace.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Seconds before it is stopped (default 300; 0 for never).
    #[serde(default, alias = "timeout_secs")]
    pub timeout_secs: Option<u64>,
}

/// `bg_status` arguments.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BgStatusArgs {
    /// The id `bg_start` answered (`proc_...`).
    #[serde(alias = "process_id")]
    pub process_id: String,
}

/// `bg_output` arguments.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BgOutputArgs {
    /// The id `bg_start` answered (`proc_...`).
    #[serde(alias = "process_id")]
    pub process_id: String,
    /// Only output after this position (the `next` of the previous call).
    #[serde(default, alias = "after_seq")]
    pub after_seq: Option<u64>,
}

/// `bg_kill` arguments.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BgKillArgs {
    /// The id `bg_start` answered (`proc_...`).
    #[serde(alias = "process_id")]
    pub process_id: String,
}

/// What the background tools need: the runner and the session they work for.
pub struct Background<'a> {
    /// The daemon's runner.
    pub runner: &'a ProcessRunner,
    /// The session (its processes only).
    pub session: &'a SessionHandle,
    /// Start them under the sandbox (false for `dangerous` turns).
    pub sandboxed: bool,
    /// Timeout of a process started without one.
    pub default_timeout: Duration,
}

/// Output text returned per `bg_output` call at most.
const OUTPUT_CAP: usize = 16 * 1024;

/// `bg_start`, prepared: a command to approve.
pub fn prepare_start(args: BgStartArgs) -> Prepared {
    let command = args.command.trim();
    if command.is_empty() {
        return Prepared::Finished(Err("the command is empty".to_owned()));
    }
    Prepared::Change {
        summary: format!("start in the background: {command}"),
        diff: None,
        grant_scope: simple_scope(command),
        change: Change::BackgroundStart(args),
    }
}

/// `bg_kill`, prepared: a stop to approve (a grant covers every stop in the session).
pub fn prepare_kill(args: BgKillArgs) -> Prepared {
    Prepared::Change {
        summary: format!("stop background process {}", args.process_id),
        diff: None,
        grant_scope: Some("process".to_owned()),
        change: Change::BackgroundKill(args),
    }
}

fn describe(p: &BackgroundProcess) -> String {
    let state = match p.state {
        ProcessState::Running => "running",
        ProcessState::Completed => "completed",
        ProcessState::Failed => "failed",
        ProcessState::Killed => "killed",
        ProcessState::Timeout => "stopped by its timeout",
    };
    let mut text = format!(
        "{} ({}): {state}, {:.1} s",
        p.process_id,
        p.command,
        p.runtime_ms as f64 / 1000.0
    );
    if let Some(code) = p.exit_code {
        let _ = write!(text, ", exit code {code}");
    }
    text
}

/// Starts the process.
pub async fn start(
    bg: &Background<'_>,
    workspace: &Workspace,
    args: BgStartArgs,
) -> Result<String, String> {
    let requested = args.cwd.clone().unwrap_or_else(|| ".".to_owned());
    let ws = workspace.clone();
    let cwd = tokio::task::spawn_blocking(move || ws.command_dir(&requested))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let timeout = match args.timeout_secs {
        None => Some(bg.default_timeout).filter(|t| !t.is_zero()),
        Some(0) => None,
        Some(secs) => Some(Duration::from_secs(secs).min(MAX_TIMEOUT)),
    };
    let process = bg
        .runner
        .start(StartSpec {
            session: bg.session.clone(),
            session_id: bg.session.id().clone(),
            command: args.command.trim().to_owned(),
            label: args.label,
            cwd,
            workspace: workspace.root().to_owned(),
            timeout,
            sandboxed: bg.sandboxed,
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "started {}; read its output with bg_output, stop it with bg_kill",
        describe(&process)
    ))
}

async fn own(bg: &Background<'_>, id: &str) -> Result<BackgroundProcess, String> {
    let process = bg
        .runner
        .status(id.to_owned())
        .await
        .map_err(|e| e.to_string())?;
    if &process.session_id != bg.session.id() {
        return Err(format!("no background process {id} in this session"));
    }
    Ok(process)
}

/// `run_command` with `backgroundAfterSecs`: the command runs as a background process from
/// the start; if it ends within that time its output is the answer, as for a plain command,
/// else it keeps running and the answer says how to reach it.
pub async fn run_or_detach(
    bg: &Background<'_>,
    workspace: &Workspace,
    command: String,
    after_secs: u64,
    limits: &super::command::CommandLimits,
) -> Result<String, String> {
    let process = bg
        .runner
        .start(StartSpec {
            session: bg.session.clone(),
            session_id: bg.session.id().clone(),
            command: command.trim().to_owned(),
            label: None,
            cwd: workspace.root().to_owned(),
            workspace: workspace.root().to_owned(),
            timeout: Some(bg.default_timeout).filter(|t| !t.is_zero()),
            sandboxed: bg.sandboxed,
        })
        .await
        .map_err(|e| e.to_string())?;
    let id = process.process_id.clone();
    // Until it is left running, the command belongs to this call like a plain one: a call
    // dropped by a cancel (or a failed look at it) kills its group.
    let mut foreground = KillOnDrop {
        runner: bg.runner.clone(),
        id: Some(id.clone()),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(after_secs.min(600));
    loop {
        let now = own(bg, &id).await?;
        if now.state != ProcessState::Running {
            foreground.id = None;
            let page = bg
                .runner
                .output(id.clone(), 0, 500, None)
                .await
                .map_err(|e| e.to_string())?;
            let text: String = page.chunks.iter().map(|c| c.text.as_str()).collect();
            let text = super::head_and_tail(&text, limits.output_cap);
            let answer = format!("{}\n{text}", describe(&now));
            return if now.state == ProcessState::Completed {
                Ok(answer)
            } else {
                Err(answer)
            };
        }
        if tokio::time::Instant::now() >= deadline {
            foreground.id = None;
            return Ok(format!(
                "still running after {after_secs} s, so it was left running in the background: \
                 {}; read its output with bg_output, stop it with bg_kill",
                describe(&now)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kills the process it names when dropped, unless `id` was taken out first.
struct KillOnDrop {
    runner: ProcessRunner,
    id: Option<String>,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let (Some(id), Ok(rt)) = (self.id.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let runner = self.runner.clone();
        rt.spawn(async move {
            if let Err(e) = runner.kill(id.clone(), KillSignal::Kill).await {
                tracing::debug!(process = %id, error = %e, "stopping a cancelled command");
            }
        });
    }
}

/// `bg_status`.
pub async fn status(bg: &Background<'_>, args: BgStatusArgs) -> Result<String, String> {
    own(bg, &args.process_id).await.map(|p| describe(&p))
}

/// `bg_output`: what came after `afterSeq`, both streams in order, capped.
pub async fn output(bg: &Background<'_>, args: BgOutputArgs) -> Result<String, String> {
    own(bg, &args.process_id).await?;
    let after = args.after_seq.unwrap_or(0);
    let page = bg
        .runner
        .output(args.process_id.clone(), after, 500, None)
        .await
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    let mut next = after;
    let mut more = page.has_more;
    for chunk in &page.chunks {
        if text.len() + chunk.text.len() > OUTPUT_CAP && !text.is_empty() {
            more = true;
            break;
        }
        text.push_str(&chunk.text);
        next = chunk.seq;
    }
    if let Some(first) = page.chunks.first()
        && first.seq > after + 1
    {
        text.insert_str(
            0,
            &format!("[… output before position {} was dropped …]\n", first.seq),
        );
    }
    if text.is_empty() {
        text.push_str("(no new output)\n");
    }
    let _ = write!(
        text,
        "\n[{}; next: call bg_output with afterSeq {next}{}]",
        describe(&page.process),
        if more { ", more output waits" } else { "" }
    );
    Ok(text)
}

/// `bg_kill`.
pub async fn kill(bg: &Background<'_>, args: BgKillArgs) -> Result<String, String> {
    own(bg, &args.process_id).await?;
    let answer = bg
        .runner
        .kill(args.process_id, KillSignal::Term)
        .await
        .map_err(|e| e.to_string())?;
    Ok(if answer.killed {
        format!("stopping {}", describe(&answer.process))
    } else {
        format!("not running: {}", describe(&answer.process))
    })
}
