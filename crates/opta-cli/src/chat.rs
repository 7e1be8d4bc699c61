//! `opta chat`: an interactive session. Lines are read with rustyline on a thread of their own;
//! events (ours and other clients') arrive on a live WebSocket subscription. While the prompt
//! is shown, output goes through rustyline's external printer so it does not garble the line
//! being typed; while a turn of ours runs, it goes straight to stdout and Ctrl-C cancels it.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use opta_client::{DaemonClient, StartAt, Transport};
use opta_protocol::{
    CancelRequest, CreateSessionRequest, Envelope, Event, Mode, SessionId, SubmitTurnRequest,
    TurnId,
};
use rustyline::ExternalPrinter;
use rustyline::error::ReadlineError;
use serde_json::json;
use tokio::sync::mpsc;

use crate::daemon_ctl::{self, DaemonArgs, StreamCheck};
use crate::do_cmd::{CLIENT_ID, ask_again, parse_mode, send_answer, show_permission};
use crate::render::{
    Answer, Outcome, Output, PermissionAsk, PermissionPolicy, TurnRenderer, Verdict, report_failure,
};
use crate::sanitize;
use crate::ui;

/// The prompt.
const PROMPT: &str = "opta› ";

#[derive(Args)]
pub struct ChatArgs {
    /// Attach to an existing session.
    #[arg(long)]
    session: Option<String>,
    /// Agent mode of the turns: chat, do, plan, review, research (default: the `default-mode`
    /// setting, else chat).
    #[arg(long, value_parser = parse_mode)]
    mode: Option<Mode>,
    /// Allow every permission request without asking.
    #[arg(short, long)]
    yes: bool,
    /// Show the model's reasoning (dimmed).
    #[arg(long)]
    thinking: bool,
    /// Print answers as they come, without rendering their markdown.
    #[arg(long)]
    plain: bool,
}

struct Chat<P: ExternalPrinter> {
    client: DaemonClient,
    session: SessionId,
    writer_id: String,
    mode: Mode,
    thinking: bool,
    policy: PermissionPolicy,
    /// Prints above the prompt while it is shown.
    printer: P,
    prompting: bool,
    /// Our running turn and its renderer.
    running: Option<(TurnId, TurnRenderer)>,
    cancel_sent: bool,
    /// Turns of other clients seen starting (their output is shown too).
    others: HashSet<TurnId>,
    /// Partial line of other clients' output waiting for the printer.
    pending: String,
    spinner: Option<indicatif::ProgressBar>,
    /// The last output did not end its line.
    line_open: bool,
    /// Terminal echo is off while our turn streams.
    echo_off: Option<EchoOff>,
    /// Lines typed while a turn ran that a permission prompt took out of the terminal (they
    /// are messages, never answers): run before the prompt comes back.
    typed_ahead: std::collections::VecDeque<String>,
    /// Renders our turn's answer.
    markdown: crate::markdown::MarkdownStream,
}

/// Whole lines already typed into the terminal (canonical mode hands out one per read),
/// without waiting for more.
fn typed_lines() -> Vec<String> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let stdin = std::io::stdin();
    let mut lines = Vec::new();
    loop {
        let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) if n > 0 => {}
            _ => return lines,
        }
        let mut buf = [0u8; 4096];
        match nix::unistd::read(stdin.as_fd(), &mut buf) {
            Ok(0) | Err(_) => return lines,
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                lines.extend(
                    text.lines()
                        .map(str::to_owned)
                        .filter(|l| !l.trim().is_empty()),
                );
            }
        }
    }
}

/// One line from the terminal, read straight from the descriptor (no buffer that could keep
/// bytes meant for the line editor).
fn read_terminal_line() -> std::io::Result<String> {
    let stdin = std::io::stdin();
    let mut buf = [0u8; 1024];
    let n = nix::unistd::read(stdin.as_fd(), &mut buf).map_err(std::io::Error::from)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Turns the terminal's echo off until dropped (then the saved settings come back).
struct EchoOff {
    saved: Option<nix::sys::termios::Termios>,
}

impl EchoOff {
    fn new() -> Self {
        use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok();
        if let Some(settings) = &saved {
            let mut quiet = settings.clone();
            quiet.local_flags.remove(LocalFlags::ECHO);
            let _ = tcsetattr(&stdin, SetArg::TCSADRAIN, &quiet);
        }
        Self { saved }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(settings) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSADRAIN,
                settings,
            );
        }
    }
}

pub async fn run(args: ChatArgs, home: &Path, daemon: &DaemonArgs) -> Result<ExitCode> {
    // The terminal first, the session last: a chat that cannot run leaves nothing behind.
    if !std::io::stdin().is_terminal() {
        bail!("opta chat needs a terminal on stdin; for scripts and pipes use `opta do TASK`");
    }
    let terminal_error = || {
        format!(
            "opta chat needs a terminal it can edit lines on (TERM={}); for scripts use `opta do TASK`",
            std::env::var("TERM").unwrap_or_default()
        )
    };
    let mut editor = rustyline::DefaultEditor::new().with_context(terminal_error)?;
    // History survives across chats; a missing or unreadable file just starts empty.
    let history_path = home.join("chat_history");
    let _ = editor.load_history(&history_path);
    let printer = editor
        .create_external_printer()
        .with_context(terminal_error)?;
    // The chat waits for a daemon that went away as long as the person does (Ctrl-C leaves).
    let client = daemon_ctl::ensure(home, daemon)
        .await?
        .with_reconnect_deadline(None);
    let snapshot = match &args.session {
        Some(id) => {
            let id = SessionId::parse(id)?;
            match client.get_session(&id).await {
                Ok(detail) => detail.snapshot,
                Err(e) if e.status() == Some(404) => {
                    bail!("no session {id}; `opta sessions list` shows them")
                }
                Err(e) => return Err(e.into()),
            }
        }
        None => {
            let workspace = std::env::current_dir().context("reading the current directory")?;
            client
                .create_session(&CreateSessionRequest {
                    model: Some(daemon.model.clone()).filter(|m| !m.is_empty()),
                    metadata: Some(json!({"workspace": workspace, "client": CLIENT_ID})),
                    ..CreateSessionRequest::default()
                })
                .await?
        }
    };
    let session = snapshot.session_id.clone();
    let mut events = client
        .subscribe(&session, StartAt::Live, Transport::WebSocket)
        .await?;
    let model = if snapshot.model.is_empty() {
        "the server's default model"
    } else {
        &snapshot.model
    };
    println!(
        "{}",
        ui::dim(&ui::fit(&format!(
            "session {session} · {} · /help for commands, Ctrl-C cancels a turn",
            sanitize::line(model)
        )))
    );

    let (line_tx, mut lines) = mpsc::channel::<Result<String, ReadlineError>>(1);
    let (prompt_tx, prompt_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        while prompt_rx.recv().is_ok() {
            let line = editor.readline(PROMPT);
            if let Ok(l) = &line
                && !l.trim().is_empty()
            {
                let _ = editor.add_history_entry(l.as_str());
                let _ = editor.append_history(&history_path);
            }
            if line_tx.blocking_send(line).is_err() {
                return;
            }
        }
    });
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the Ctrl-C handler")?;
    let mut chat = Chat {
        client,
        session,
        writer_id: format!("{CLIENT_ID}-chat-{}", std::process::id()),
        mode: args.mode.or(daemon.default_mode).unwrap_or(Mode::Chat),
        thinking: args.thinking,
        policy: PermissionPolicy::new(true, args.yes),
        printer,
        prompting: false,
        running: None,
        cancel_sent: false,
        others: HashSet::new(),
        pending: String::new(),
        spinner: None,
        line_open: false,
        echo_off: None,
        markdown: crate::markdown::MarkdownStream::for_stdout(args.plain),
        typed_ahead: std::collections::VecDeque::new(),
    };
    chat.prompt(&prompt_tx);
    let mut watchdog = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut told_waiting = false;
    loop {
        tokio::select! {
            _ = watchdog.tick() => {
                chat.follow_daemon(home, &mut events, &mut told_waiting).await?;
            }
            line = lines.recv() => {
                chat.prompting = false;
                match line {
                    Some(Ok(line)) => match chat.on_line(line.trim()).await? {
                        LineResult::Exit => return Ok(ExitCode::SUCCESS),
                        LineResult::Prompt => chat.prompt(&prompt_tx),
                        LineResult::TurnRunning => {}
                    },
                    // Ctrl-C or Ctrl-D at the prompt: leave.
                    Some(Err(ReadlineError::Interrupted | ReadlineError::Eof)) | None => {
                        return Ok(ExitCode::SUCCESS);
                    }
                    Some(Err(e)) => return Err(e.into()),
                }
            }
            event = events.recv() => {
                let Some(event) = event else {
                    chat.say("the session was closed");
                    return Ok(ExitCode::SUCCESS);
                };
                if chat.on_event(event?).await?
                    && let Some(code) = chat.resume(&prompt_tx).await?
                {
                    return Ok(code);
                }
            }
            _ = interrupts.recv() => {
                if chat.running.is_none() {
                    return Ok(ExitCode::SUCCESS);
                }
                if chat.cancel_sent {
                    return Ok(ExitCode::from(130));
                }
                chat.cancel_running().await;
            }
        }
    }
}

enum LineResult {
    Exit,
    Prompt,
    TurnRunning,
}

impl<P: ExternalPrinter> Chat<P> {
    /// Once a second: a daemon that restarted on another port is followed there, from the
    /// last event seen; one that is gone is said once.
    async fn follow_daemon(
        &mut self,
        home: &Path,
        events: &mut opta_client::EventStream,
        told_waiting: &mut bool,
    ) -> Result<()> {
        match daemon_ctl::check_stream(home, events, &self.client).await {
            StreamCheck::Fine => {}
            StreamCheck::Moved(r) => {
                self.client = r.client.with_reconnect_deadline(None);
                let after = StartAt::After(events.last_seq());
                *events = self
                    .client
                    .subscribe(&self.session, after, Transport::WebSocket)
                    .await?;
                *told_waiting = false;
                let line = format!("reconnected to the daemon at {}", self.client.base_url());
                self.say(&line);
            }
            StreamCheck::DaemonGone(_) if !*told_waiting => {
                *told_waiting = true;
                self.say("lost the daemon; waiting for it to come back (Ctrl-C leaves)");
            }
            StreamCheck::DaemonGone(_) => {}
        }
        Ok(())
    }

    /// After our turn: lines a permission prompt set aside run first, in order; then the
    /// prompt comes back. `Some` when one of them ends the chat.
    async fn resume(
        &mut self,
        prompt_tx: &std::sync::mpsc::Sender<()>,
    ) -> Result<Option<ExitCode>> {
        while let Some(line) = self.typed_ahead.pop_front() {
            println!("{PROMPT}{}", sanitize::line(&line));
            match self.on_line(line.trim()).await? {
                LineResult::Exit => return Ok(Some(ExitCode::SUCCESS)),
                LineResult::Prompt => {}
                LineResult::TurnRunning => return Ok(None),
            }
        }
        self.prompt(prompt_tx);
        Ok(None)
    }

    /// Asks a permission question and reads an answer typed after it appeared: whole lines
    /// already waiting in the terminal were typed ahead as messages and are kept as such.
    async fn ask_fresh(&mut self, ask: &PermissionAsk) -> Result<Answer> {
        if let Some(s) = self.spinner.take() {
            s.finish_and_clear();
        }
        if self.line_open {
            eprintln!();
            self.line_open = false;
        }
        let waiting = tokio::task::spawn_blocking(typed_lines).await?;
        self.typed_ahead.extend(waiting);
        // The answer echoes; the rest of the turn does not.
        self.echo_off = None;
        show_permission(ask);
        let answer = loop {
            let line = tokio::task::spawn_blocking(read_terminal_line).await??;
            if let Some(a) = self.policy.answer(&line) {
                break a;
            }
            ask_again();
        };
        self.echo_off = Some(EchoOff::new());
        Ok(answer)
    }

    fn prompt(&mut self, prompt_tx: &std::sync::mpsc::Sender<()>) {
        // The line editor takes the terminal over again, echo restored.
        self.echo_off = None;
        self.prompting = true;
        let _ = prompt_tx.send(());
    }

    /// A whole line of information, wherever output goes now; on a line of its own even when
    /// an answer is streaming mid-line.
    fn say(&mut self, line: &str) {
        let fresh_line = if self.line_open { "\n" } else { "" };
        self.emit(&format!("{fresh_line}{}\n", ui::dim(line)));
    }

    /// A tool line or a prompt comes between two pieces of the answer: the answer's open
    /// line is finished first (drawn styled), so the next round's text starts afresh.
    fn end_answer_line(&mut self) {
        let rest = self.markdown.finish();
        if self.line_open {
            self.emit(&format!("{rest}\n"));
        }
    }

    fn emit(&mut self, text: &str) {
        // The spinner only fills the wait for the first output: clear it before anything
        // is printed, so its line does not stay in the scrollback.
        if let Some(spinner) = self.spinner.take() {
            spinner.finish_and_clear();
        }
        if let Some(last) = text.chars().last() {
            self.line_open = last != '\n';
        }
        if self.prompting {
            // The external printer wants whole lines; keep the rest until it is complete.
            self.pending.push_str(text);
            if let Some(end) = self.pending.rfind('\n') {
                let ready: String = self.pending.drain(..=end).collect();
                let _ = self.printer.print(ready);
            }
        } else {
            if !self.pending.is_empty() {
                print!("{}", std::mem::take(&mut self.pending));
            }
            print!("{text}");
            let _ = std::io::stdout().flush();
        }
    }

    async fn on_line(&mut self, line: &str) -> Result<LineResult> {
        if line.is_empty() {
            return Ok(LineResult::Prompt);
        }
        if let Some(command) = line.strip_prefix('/') {
            // A failing command (say `/sessions` while the daemon is away) is reported like a
            // failing message: the chat goes on.
            return match self.on_command(command).await {
                Ok(result) => Ok(result),
                Err(e) => {
                    eprintln!(
                        "{} {}",
                        ui::error_label(),
                        sanitize::text(&format!("{e:#}"))
                    );
                    Ok(LineResult::Prompt)
                }
            };
        }
        let submitted = self
            .client
            .submit_turn(
                &self.session,
                &SubmitTurnRequest::new(CLIENT_ID, self.writer_id.clone(), line, self.mode),
            )
            .await;
        match submitted {
            Ok(answer) => {
                self.running = Some((answer.turn_id.clone(), TurnRenderer::new(answer.turn_id)));
                self.cancel_sent = false;
                self.spinner = ui::spinner("waiting for the model…");
                // What is typed while the answer streams is kept for after it (the line
                // editor's buffer holds it) but must not echo into the answer.
                self.echo_off = Some(EchoOff::new());
                Ok(LineResult::TurnRunning)
            }
            Err(e) => {
                eprintln!("{} {e}", ui::error_label());
                Ok(LineResult::Prompt)
            }
        }
    }

    async fn on_command(&mut self, command: &str) -> Result<LineResult> {
        let mut parts = command.split_whitespace();
        let name = parts.next().unwrap_or_default();
        let arg = parts.next();
        match (name, arg) {
            ("exit" | "quit", _) => return Ok(LineResult::Exit),
            ("help", _) => {
                println!("/model [id]   show or switch the session's model");
                println!(
                    "/mode [mode]  show or switch the mode (chat, do, plan, review, research)"
                );
                println!("/cancel       cancel the session's running turn (any client's)");
                println!("/sessions     list recent sessions");
                println!("/exit         leave (Ctrl-D works too)");
            }
            ("model", None) => {
                let detail = self.client.get_session(&self.session).await?;
                println!("model: {}", sanitize::line(&detail.snapshot.model));
            }
            ("model", Some(model)) => {
                let snapshot = self
                    .client
                    .create_session(&CreateSessionRequest {
                        session_id: Some(self.session.clone()),
                        model: Some(model.to_owned()),
                        ..CreateSessionRequest::default()
                    })
                    .await?;
                println!("model: {}", sanitize::line(&snapshot.model));
            }
            ("mode", None) => println!("mode: {}", self.mode.as_str()),
            ("mode", Some(mode)) => match Mode::parse(mode) {
                Some(m) => {
                    self.mode = m;
                    println!("mode: {}", m.as_str());
                }
                None => println!("unknown mode {mode:?} (chat, do, plan, review, research)"),
            },
            ("cancel", _) => {
                let active = self
                    .client
                    .get_session(&self.session)
                    .await?
                    .snapshot
                    .active_turn_id;
                match active {
                    Some(turn_id) => {
                        let request = CancelRequest {
                            turn_id: Some(turn_id),
                            writer_id: None,
                        };
                        let answer = self.client.cancel(&self.session, &request).await?;
                        println!("cancelled {} turn(s)", answer.cancelled);
                    }
                    None => println!("no turn is running"),
                }
            }
            ("sessions", _) => {
                let page = self.client.list_sessions(Some(20), None).await?;
                println!("{}", crate::sessions_cmd::sessions_table(&page.sessions));
            }
            (other, _) => println!("unknown command /{other}; /help lists them"),
        }
        Ok(LineResult::Prompt)
    }

    async fn cancel_running(&mut self) {
        let Some((turn_id, _)) = &self.running else {
            return;
        };
        self.cancel_sent = true;
        if let Some(s) = self.spinner.take() {
            s.finish_and_clear();
        }
        println!("\n{}", ui::dim("cancelling… (Ctrl-C again to quit)"));
        // Not awaited: a second Ctrl-C must be heard while the daemon answers (or does not).
        let (client, session, turn_id) =
            (self.client.clone(), self.session.clone(), turn_id.clone());
        tokio::spawn(async move { crate::do_cmd::cancel(&client, &session, &turn_id).await });
    }

    /// Handles one event; true when our turn ended and the prompt should come back.
    async fn on_event(&mut self, envelope: Envelope) -> Result<bool> {
        let Some((turn_id, renderer)) = &self.running else {
            self.on_other_event(&envelope.event);
            return Ok(false);
        };
        // Our own turn is never announced as another client's.
        if envelope.event.turn_id() != Some(turn_id) {
            self.on_other_event(&envelope.event);
            return Ok(false);
        }
        match renderer.on_event(&envelope.event) {
            Some(output) => self.on_own_output(output).await,
            None => Ok(false),
        }
    }

    async fn on_own_output(&mut self, output: Output) -> Result<bool> {
        match output {
            Output::Text(text) => {
                let shown = self.markdown.push(&text);
                self.emit(&shown);
            }
            Output::Thinking(text) => {
                if self.thinking {
                    self.emit(&ui::dim(&text));
                }
            }
            Output::Note(line) => {
                self.end_answer_line();
                self.say(&ui::fit(&line));
            }
            Output::Permission(ask) => {
                self.end_answer_line();
                let answer = match self.policy.verdict() {
                    Verdict::Decide(decision) => Answer {
                        decision,
                        remember: false,
                    },
                    Verdict::Ask => self.ask_fresh(&ask).await?,
                };
                send_answer(&self.client, &self.session, &ask, answer).await?;
            }
            Output::Finished(outcome) => {
                let last_line = self.markdown.finish();
                self.emit(&format!("{last_line}\n"));
                match outcome {
                    Outcome::Done(stats) => self.say(&crate::render::stats_line(&stats)),
                    Outcome::Failed { code, message } => report_failure(code, &message),
                }
                self.running = None;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Shows what other clients' turns do in this session.
    fn on_other_event(&mut self, event: &Event) {
        match event {
            Event::TurnStart(start) => {
                self.others.insert(start.turn_id.clone());
                let asked = serde_json::Value::String(start.content.clone());
                self.say(&format!(
                    "── turn from {} ({}): {}",
                    sanitize::line(&start.client_id),
                    sanitize::line(&start.writer_id),
                    crate::render::compact(&asked, 200)
                ));
            }
            Event::TurnToken(t) if self.others.contains(&t.turn_id) => {
                self.emit(&sanitize::text(&t.text));
            }
            Event::TurnDone(d) if self.others.remove(&d.turn_id) => self.emit("\n"),
            Event::TurnError(e) if self.others.remove(&e.turn_id) => {
                self.emit("\n");
                self.say(&format!(
                    "(their turn ended: {})",
                    sanitize::line(&e.message)
                ));
            }
            _ => {}
        }
    }
}
