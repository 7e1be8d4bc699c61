//! `opta do "task"`: one task in the current directory, streamed to the terminal.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use opta_client::{DaemonClient, StartAt, Transport};
use opta_protocol::{
    CancelRequest, CreateSessionRequest, Decision, Mode, ResolvePermissionRequest, SessionId,
    SubmitTurnRequest, TurnErrorCode, TurnId,
};
use serde_json::json;

use crate::daemon_ctl::{self, DaemonArgs, StreamCheck};
use crate::render::{
    Answer, Outcome, Output, PermissionAsk, PermissionPolicy, TurnRenderer, Verdict, report_failure,
};
use crate::ui;

/// The name this CLI gives itself as client and writer.
pub const CLIENT_ID: &str = "opta-cli";

#[derive(Args)]
pub struct DoArgs {
    /// The task.
    #[arg(required = true)]
    task: Vec<String>,
    /// Print every event envelope as a JSON line instead of the text.
    #[arg(long)]
    json: bool,
    /// Allow every permission request without asking.
    #[arg(short, long)]
    yes: bool,
    /// Run in this session (created if missing) instead of a new one.
    #[arg(long)]
    session: Option<String>,
    /// Agent mode: chat, do, plan, review, research (default: the `default-mode` setting, else
    /// do).
    #[arg(long, value_parser = parse_mode)]
    mode: Option<Mode>,
    /// Show the model's reasoning (dimmed, on stderr).
    #[arg(long)]
    thinking: bool,
    /// Print the answer as it comes, without rendering its markdown.
    #[arg(long)]
    plain: bool,
    /// Seconds to wait for a daemon that went away mid-turn to come back before giving up.
    #[arg(long, default_value_t = 30)]
    daemon_wait: u64,
}

pub fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::parse(s).ok_or_else(|| format!("unknown mode {s:?} (chat, do, plan, review, research)"))
}

pub async fn run(args: DoArgs, home: &Path, daemon: &DaemonArgs) -> Result<ExitCode> {
    // Checked before anything is created: a task the daemon would refuse leaves no session.
    let task = args.task.join(" ");
    if task.trim().is_empty() {
        anyhow::bail!(
            "the task is empty: say what to do, e.g. `opta do \"add a test for the parser\"`"
        );
    }
    // The stream never gives up by itself: the watchdog below follows the daemon and gives
    // up after --daemon-wait.
    let mut client = daemon_ctl::ensure(home, daemon)
        .await?
        .with_reconnect_deadline(None);
    let workspace = std::env::current_dir().context("reading the current directory")?;
    let session_id = args.session.as_deref().map(SessionId::parse).transpose()?;
    let snapshot = client
        .create_session(&CreateSessionRequest {
            session_id,
            model: Some(daemon.model.clone()).filter(|m| !m.is_empty()),
            title: None,
            messages: None,
            metadata: Some(json!({"workspace": workspace, "client": CLIENT_ID})),
        })
        .await?;
    let session = snapshot.session_id;
    let mut events = client
        .subscribe(&session, StartAt::Live, Transport::WebSocket)
        .await?;
    // Installed before the submit: from the moment the turn may exist, Ctrl-C cancels it
    // (a signal that comes before the loop below waits in the stream until it is read).
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the Ctrl-C handler")?;
    let turn_id = client
        .submit_turn(
            &session,
            &SubmitTurnRequest {
                metadata: Some(json!({"workspace": workspace})),
                ..SubmitTurnRequest::new(
                    CLIENT_ID,
                    format!("{CLIENT_ID}-{}", std::process::id()),
                    task,
                    args.mode.or(daemon.default_mode).unwrap_or(Mode::Do),
                )
            },
        )
        .await?
        .turn_id;

    let interactive = std::io::stdin().is_terminal() && !args.json;
    let mut policy = PermissionPolicy::new(interactive, args.yes);
    let renderer = TurnRenderer::new(turn_id.clone());
    let mut spinner = if args.json {
        None
    } else {
        ui::spinner("waiting for the model…")
    };
    let mut stdout = std::io::stdout();
    let mut markdown = crate::markdown::MarkdownStream::for_stdout(args.plain || args.json);
    let mut cancel_sent = false;
    let mut wrote_text = false;
    let mut watchdog = tokio::time::interval(Duration::from_secs(1));
    let mut told_waiting = false;
    let daemon_wait = Duration::from_secs(args.daemon_wait);
    let outcome = loop {
        let envelope = tokio::select! {
            _ = watchdog.tick() => {
                match daemon_ctl::check_stream(home, &events, &client).await {
                    StreamCheck::Fine => {}
                    // Restarted elsewhere (another port): follow it from the last event seen.
                    StreamCheck::Moved(r) => {
                        client = r.client.with_reconnect_deadline(None);
                        let after = StartAt::After(events.last_seq());
                        events = client.subscribe(&session, after, Transport::WebSocket).await?;
                    }
                    StreamCheck::DaemonGone(down) if down >= daemon_wait => {
                        if let Some(s) = spinner.take() {
                            s.finish_and_clear();
                        }
                        anyhow::bail!(gone_for_good(&session, daemon_wait));
                    }
                    StreamCheck::DaemonGone(_) if !told_waiting => {
                        told_waiting = true;
                        eprintln!("\n{}", ui::dim("lost the daemon; waiting for it to come back…"));
                    }
                    StreamCheck::DaemonGone(_) => {}
                }
                continue;
            }
            next = events.recv() => match next {
                Some(e) => e?,
                None => anyhow::bail!("the daemon closed the session's event stream"),
            },
            _ = interrupts.recv() => {
                if cancel_sent {
                    return Ok(ExitCode::from(130));
                }
                cancel_sent = true;
                eprintln!("\n{}", ui::dim("cancelling… (Ctrl-C again to quit now)"));
                // Not awaited here: a second Ctrl-C must be heard while the daemon answers
                // (or does not: a stopped daemon never does).
                let (client, session, turn_id) = (client.clone(), session.clone(), turn_id.clone());
                tokio::spawn(async move { cancel(&client, &session, &turn_id).await });
                continue;
            }
        };
        if args.json {
            let line = serde_json::to_string(&envelope)?;
            if let Err(e) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
                return stdout_failed(e, &client, &session, &turn_id).await;
            }
        }
        let Some(output) = renderer.on_event(&envelope.event) else {
            continue;
        };
        if let Some(s) = spinner.take() {
            s.finish_and_clear();
        }
        match output {
            Output::Text(text) => {
                if !args.json {
                    let shown = markdown.push(&text);
                    if let Err(e) = write!(stdout, "{shown}").and_then(|()| stdout.flush()) {
                        return stdout_failed(e, &client, &session, &turn_id).await;
                    }
                    wrote_text = true;
                }
            }
            Output::Thinking(text) => {
                if args.thinking && !args.json {
                    eprint!("{}", ui::dim(&text));
                }
            }
            Output::Note(_) | Output::Permission(_) if wrote_text && !args.json => {
                // The answer's open line ends before a tool line or a prompt.
                let rest = markdown.finish();
                if let Err(e) = writeln!(stdout, "{rest}").and_then(|()| stdout.flush()) {
                    return stdout_failed(e, &client, &session, &turn_id).await;
                }
                wrote_text = false;
                match output {
                    Output::Note(line) => eprintln!("{}", ui::dim(&ui::fit(&line))),
                    Output::Permission(ask) => {
                        answer_permission(&client, &session, &ask, &mut policy).await?;
                    }
                    _ => {}
                }
            }
            Output::Note(line) => {
                if !args.json {
                    eprintln!("{}", ui::dim(&ui::fit(&line)));
                }
            }
            Output::Permission(ask) => {
                answer_permission(&client, &session, &ask, &mut policy).await?;
            }
            Output::Finished(outcome) => break outcome,
        }
    };
    let last_line = markdown.finish();
    if wrote_text && let Err(e) = writeln!(stdout, "{last_line}") {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
        return Ok(crate::exit_code_for_broken_pipe());
    }
    Ok(match outcome {
        Outcome::Done(stats) => {
            // The figures are for the person watching, not for scripts reading stdout.
            if !args.json && std::io::stderr().is_terminal() {
                eprintln!("{}", ui::dim(&crate::render::stats_line(&stats)));
            }
            ExitCode::SUCCESS
        }
        Outcome::Failed { code, message } => {
            report_failure(code, &message);
            if code == Some(TurnErrorCode::Cancelled) {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    })
}

fn gone_for_good(session: &SessionId, waited: Duration) -> String {
    format!(
        "the daemon stopped during the turn and did not come back within {} s; when it starts \
         again the turn is reported as interrupted (`opta sessions events {session}`)",
        waited.as_secs()
    )
}

/// How long a cancel request may take before the command stops waiting for it.
const CANCEL_WAIT: Duration = Duration::from_secs(3);

/// Asks the daemon to cancel `turn`, for at most [`CANCEL_WAIT`]; failures are reported.
pub async fn cancel(client: &DaemonClient, session: &SessionId, turn: &TurnId) {
    let request = CancelRequest {
        turn_id: Some(turn.clone()),
        writer_id: None,
    };
    match tokio::time::timeout(CANCEL_WAIT, client.cancel(session, &request)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => eprintln!("{} could not cancel: {e}", ui::error_label()),
        Err(_) => eprintln!(
            "{} the daemon did not answer the cancel within {} s",
            ui::error_label(),
            CANCEL_WAIT.as_secs()
        ),
    }
}

/// Writing the answer failed. When the reader went away (`opta do … | head`), nobody will
/// see the rest: the turn is cancelled and the command ends quietly.
async fn stdout_failed(
    e: std::io::Error,
    client: &DaemonClient,
    session: &SessionId,
    turn: &TurnId,
) -> Result<ExitCode> {
    if e.kind() != std::io::ErrorKind::BrokenPipe {
        return Err(e.into());
    }
    cancel(client, session, turn).await;
    Ok(crate::exit_code_for_broken_pipe())
}

/// Decides a permission request (asking on the terminal when the policy says so) and sends
/// the answer; a request already decided elsewhere is fine.
pub async fn answer_permission(
    client: &DaemonClient,
    session: &SessionId,
    ask: &PermissionAsk,
    policy: &mut PermissionPolicy,
) -> Result<()> {
    let answer = match policy.verdict() {
        Verdict::Decide(decision) => {
            if decision == Decision::Deny {
                eprintln!(
                    "{}",
                    ui::dim(&ui::fit(&format!(
                        "  {}: denied, no terminal to ask (--yes allows such calls)",
                        crate::sanitize::line(ask.summary.as_deref().unwrap_or(&ask.tool_name))
                    )))
                );
            }
            Answer {
                decision,
                remember: false,
            }
        }
        Verdict::Ask => {
            show_permission(ask);
            loop {
                let line = tokio::task::spawn_blocking(|| {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line).map(|_| line)
                })
                .await??;
                if let Some(a) = policy.answer(&line) {
                    break a;
                }
                ask_again();
            }
        }
    };
    send_answer(client, session, ask, answer).await
}

/// Shows what a permission request would do (its summary and diff) and asks.
pub fn show_permission(ask: &PermissionAsk) {
    let what = ask
        .summary
        .clone()
        .unwrap_or_else(|| crate::render::compact(&ask.args, 120));
    eprintln!(
        "{} {} wants to: {what}",
        ui::dim("permission:"),
        crate::sanitize::line(&ask.tool_name),
    );
    if let Some(diff) = &ask.diff {
        eprintln!("{}", crate::render::colour_diff(diff));
    }
    ask_again();
}

/// The question itself, again after an answer that was none of its choices.
pub fn ask_again() {
    eprint!("allow? [y]es / [n]o / [a]lways in this session: ");
    let _ = std::io::stderr().flush();
}

/// Sends a decided answer; a request already decided elsewhere is fine.
pub async fn send_answer(
    client: &DaemonClient,
    session: &SessionId,
    ask: &PermissionAsk,
    answer: Answer,
) -> Result<()> {
    let decision = answer.decision;
    let request = ResolvePermissionRequest {
        request_id: ask.request_id.clone(),
        decision,
        decided_by: CLIENT_ID.into(),
        remember: answer.remember.then_some(opta_protocol::Remember::Session),
    };
    match client.resolve_permission(session, &request).await {
        Ok(_) => {}
        Err(e) if e.status() == Some(409) => {
            eprintln!("{}", ui::dim("  (already decided elsewhere)"));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
