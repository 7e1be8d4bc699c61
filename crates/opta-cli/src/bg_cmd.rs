//! `opta bg`: the daemon's background processes — list, start, read the output (`-f` follows
//! it until the process ends), kill.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use opta_protocol::{
    BackgroundProcess, CreateSessionRequest, KillSignal, ProcessState, SessionId,
    StartBackgroundRequest,
};
use serde_json::json;

use crate::daemon_ctl::{self, DaemonArgs};
use crate::sanitize;
use crate::sessions_cmd::print_json;
use crate::ui;

#[derive(Subcommand)]
pub enum BgAction {
    /// Running processes, and those ended in the last 5 minutes.
    List {
        /// Only this session's.
        #[arg(long)]
        session: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start a command in the background (`sh -c`, in the session's workspace).
    Start {
        /// The command line.
        command: String,
        /// The owning session (default: a session for the current directory, created).
        #[arg(long)]
        session: Option<String>,
        /// A name for people.
        #[arg(long)]
        label: Option<String>,
        /// Working directory inside the workspace.
        #[arg(long)]
        cwd: Option<String>,
        /// Seconds before it is stopped (default 300; 0 = none).
        #[arg(long)]
        timeout_secs: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A process's output (stdout and stderr as they came).
    Logs {
        /// The process id (`proc_...`).
        id: String,
        /// Keep printing until the process ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Stop a process and everything it started.
    Kill {
        /// The process id.
        id: String,
        /// SIGTERM (default), SIGINT or SIGKILL.
        #[arg(long, default_value = "SIGTERM", value_parser = parse_signal)]
        signal: KillSignal,
    },
}

fn parse_signal(s: &str) -> Result<KillSignal, String> {
    match s.to_ascii_uppercase().trim_start_matches("SIG") {
        "TERM" => Ok(KillSignal::Term),
        "INT" => Ok(KillSignal::Int),
        "KILL" => Ok(KillSignal::Kill),
        _ => Err(format!("unknown signal {s:?} (SIGTERM, SIGINT, SIGKILL)")),
    }
}

pub async fn bg(action: BgAction, home: &Path, daemon: &DaemonArgs) -> Result<ExitCode> {
    let client = daemon_ctl::ensure(home, daemon).await?;
    match action {
        BgAction::List { session, json } => {
            let session = session.as_deref().map(SessionId::parse).transpose()?;
            let list = client.background_list(session.as_ref()).await?;
            if json {
                return print_json(&json!({"processes": list})).map(|_| ExitCode::SUCCESS);
            }
            outln!("{}", table(&list));
        }
        BgAction::Start {
            command,
            session,
            label,
            cwd,
            timeout_secs,
            json,
        } => {
            let session_id = match session {
                Some(s) => SessionId::parse(&s)?,
                None => {
                    let workspace = std::env::current_dir()?;
                    client
                        .create_session(&CreateSessionRequest {
                            metadata: Some(json!({"workspace": workspace, "client": "opta-cli"})),
                            ..CreateSessionRequest::default()
                        })
                        .await?
                        .session_id
                }
            };
            let process = client
                .background_start(&StartBackgroundRequest {
                    session_id,
                    command,
                    label,
                    cwd,
                    timeout_ms: timeout_secs.map(|s| s.saturating_mul(1000)),
                })
                .await?;
            if json {
                return print_json(&process).map(|_| ExitCode::SUCCESS);
            }
            outln!(
                "started {} (pid {}) in session {}",
                process.process_id,
                process.pid,
                process.session_id
            );
        }
        BgAction::Logs { id, follow } => {
            let mut after = 0;
            loop {
                let page = client.background_output(&id, after, 500).await?;
                for chunk in &page.chunks {
                    let mut out = std::io::stdout();
                    write!(out, "{}", sanitize::text(&chunk.text))?;
                    out.flush()?;
                }
                after = page.next_seq;
                if page.has_more {
                    continue;
                }
                if !follow || page.process.state != ProcessState::Running {
                    if follow {
                        eprintln!("{}", ui::dim(&ended_line(&page.process)));
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        BgAction::Kill { id, signal } => {
            let answer = client.background_kill(&id, Some(signal)).await?;
            if answer.killed {
                outln!("sent {} to {}", signal.as_str(), answer.process.process_id);
            } else {
                outln!(
                    "{} is not running ({})",
                    answer.process.process_id,
                    state_name(answer.process.state)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn state_name(state: ProcessState) -> &'static str {
    match state {
        ProcessState::Running => "running",
        ProcessState::Completed => "completed",
        ProcessState::Failed => "failed",
        ProcessState::Killed => "killed",
        ProcessState::Timeout => "timeout",
    }
}

fn ended_line(p: &BackgroundProcess) -> String {
    match p.exit_code {
        Some(code) => format!(
            "{} {} (exit code {code})",
            p.process_id,
            state_name(p.state)
        ),
        None => format!("{} {}", p.process_id, state_name(p.state)),
    }
}

fn table(list: &[BackgroundProcess]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            vec![
                p.process_id.clone(),
                p.pid.to_string(),
                state_name(p.state).to_owned(),
                format!("{:.1} s", p.runtime_ms as f64 / 1000.0),
                p.session_id.to_string(),
                p.label.clone().unwrap_or_else(|| p.command.clone()),
            ]
        })
        .collect();
    ui::table(
        &["ID", "PID", "STATE", "RUNTIME", "SESSION", "COMMAND"],
        &rows,
    )
}
