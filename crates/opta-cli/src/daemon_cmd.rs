//! `opta daemon run|start|stop|status|restart|logs`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use opta_daemon::context::Tunables;
use opta_daemon::inference::LmxTimeouts;
use opta_daemon::store::StoreOptions;
use opta_daemon::{DaemonConfig, RunningDaemon};
use serde_json::json;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::daemon_ctl::{self, DaemonArgs, Started};

#[derive(Subcommand)]
pub enum DaemonAction {
    /// Serve in the foreground until SIGINT/SIGTERM.
    Run {
        /// Read the token from the first line of stdin (how `daemon start` and the daemon's
        /// own re-execution pass it: never on a command line or in the environment, where
        /// any local process could read it from /proc).
        #[arg(long, hide = true)]
        token_stdin: bool,
    },
    /// Start in the background (if not running) and wait until it answers.
    Start,
    /// Stop gracefully and wait until it exited.
    Stop,
    /// Show pid, address, uptime, sessions and turns.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop, then start.
    Restart,
    /// Print the daemon log.
    Logs {
        /// Keep printing as the log grows.
        #[arg(short, long)]
        follow: bool,
        /// Lines to show from the end.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
    },
}

pub async fn run(action: DaemonAction, home: &Path, args: &DaemonArgs) -> Result<ExitCode> {
    match action {
        DaemonAction::Run { token_stdin } => {
            let mut args = args.clone();
            if token_stdin {
                args.token = Some(token_from_stdin()?);
            } else if let Some(token) = token_in_sight(&args) {
                reexec_without_token(&token)?;
            }
            run_foreground(home, &args).await?;
            Ok(ExitCode::SUCCESS)
        }
        DaemonAction::Start => {
            report_start(&daemon_ctl::start(home, args).await?)?;
            Ok(ExitCode::SUCCESS)
        }
        DaemonAction::Stop => {
            match daemon_ctl::stop(home).await? {
                Some(pid) => outln!("opta daemon stopped (pid {pid})"),
                None => outln!("opta daemon is not running"),
            }
            Ok(ExitCode::SUCCESS)
        }
        DaemonAction::Restart => {
            daemon_ctl::stop(home).await?;
            report_start(&daemon_ctl::start(home, args).await?)?;
            Ok(ExitCode::SUCCESS)
        }
        DaemonAction::Status { json } => status(home, json).await,
        DaemonAction::Logs { follow, lines } => {
            logs(home, follow, lines).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn report_start(started: &Started) -> Result<()> {
    let (verb, r) = match started {
        Started::Already(r) => ("already running", r),
        Started::New(r) => ("started", r),
    };
    outln!(
        "opta daemon {verb}: {} (pid {}, {})",
        r.client.base_url(),
        r.state.pid,
        r.state.daemon_id
    );
    Ok(())
}

async fn status(home: &Path, json: bool) -> Result<ExitCode> {
    let Some(r) = daemon_ctl::running(home).await else {
        // Not answering, but alive: it holds the lock (stopped, hung, or still starting).
        if daemon_ctl::lock_held(home) {
            let pid = opta_client::DaemonClient::read_state(home)
                .map(|s| s.pid.to_string())
                .unwrap_or_else(|_| "unknown".into());
            if json {
                outln!(
                    "{}",
                    json!({"running": true, "responding": false, "pid": pid})
                );
            } else {
                outln!(
                    "opta daemon (pid {pid}) holds its lock but does not answer: hung or stopped"
                );
            }
            return Ok(ExitCode::from(4));
        }
        if json {
            outln!("{}", json!({"running": false}));
        } else {
            outln!("opta daemon is not running");
        }
        return Ok(ExitCode::from(3));
    };
    let metrics = r.client.metrics().await?;
    let uptime = chrono::DateTime::parse_from_rfc3339(&r.state.started_at)
        .map(|t| {
            (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
                .num_seconds()
                .max(0)
        })
        .unwrap_or(0);
    let stored_count = metrics.runtime.stored_session_count.unwrap_or(0);
    if json {
        let body = json!({
            "running": true,
            "pid": r.state.pid,
            "daemonId": r.state.daemon_id,
            "url": r.client.base_url(),
            "host": r.state.host,
            "port": r.state.port,
            "startedAt": r.state.started_at,
            "uptimeSeconds": uptime,
            "logsPath": r.state.logs_path,
            "runtime": metrics.runtime,
        });
        outln!("{body}");
    } else {
        let rt = &metrics.runtime;
        outln!("opta daemon running");
        outln!("  pid        {}", r.state.pid);
        outln!("  id         {}", r.state.daemon_id);
        outln!("  url        {}", r.client.base_url());
        outln!("  uptime     {}", human_duration(uptime));
        outln!(
            "  sessions   {} in memory, {stored_count} stored",
            rt.session_count
        );
        outln!(
            "  turns      {} active, {} queued",
            rt.active_turn_count,
            rt.queued_turn_count
        );
        outln!("  clients    {} subscribed", rt.subscriber_count);
        outln!("  log        {}", r.state.logs_path);
    }
    Ok(ExitCode::SUCCESS)
}

fn human_duration(seconds: i64) -> String {
    let (h, m, s) = (seconds / 3600, (seconds % 3600) / 60, seconds % 60);
    if h > 0 {
        format!("{h}h {m}m {s}s")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

async fn logs(home: &Path, follow: bool, lines: usize) -> Result<()> {
    let path = daemon_ctl::running(home)
        .await
        .map(|r| PathBuf::from(r.state.logs_path))
        .unwrap_or_else(|| opta_daemon::daemon::daemon_dir(home).join("daemon.log"));
    let mut file =
        std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let all: Vec<&str> = text.lines().collect();
    let mut out = std::io::stdout().lock();
    for line in &all[all.len().saturating_sub(lines)..] {
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    drop(out);
    if !follow {
        return Ok(());
    }
    let mut position = file.stream_position()?;
    let mut identity = file_identity(&file.metadata()?);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // What the open file still gets (after a rename too, until the writer lets it go).
        copy_new_bytes(&mut file, &mut position)?;
        // Rotated: the path names another file now (or none yet: wait for it).
        match std::fs::metadata(&path) {
            Ok(meta) if file_identity(&meta) != identity => {
                file = std::fs::File::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                identity = file_identity(&file.metadata()?);
                position = 0;
                copy_new_bytes(&mut file, &mut position)?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("watching {}", path.display())),
        }
    }
}

/// Which file this is, whatever its name: device and inode.
fn file_identity(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// Copies what `file` holds past `position` to stdout; a file truncated below it (copy and
/// truncate rotation) is read again from its start.
fn copy_new_bytes(file: &mut std::fs::File, position: &mut u64) -> Result<()> {
    let len = file.metadata()?.len();
    if len < *position {
        *position = 0;
    }
    if len > *position {
        file.seek(SeekFrom::Start(*position))?;
        let mut chunk = Vec::new();
        file.read_to_end(&mut chunk)?;
        *position = file.stream_position()?;
        let mut stdout = std::io::stdout();
        stdout.write_all(&chunk)?;
        stdout.flush()?;
    }
    Ok(())
}

/// The agent's settings from the flags (the system prompt file is read now: a missing one
/// stops the start with a clear error).
fn agent_config(args: &DaemonArgs) -> Result<opta_daemon::agent::AgentConfig> {
    let system_prompt = args
        .system_prompt_file
        .as_ref()
        .map(|path| {
            std::fs::read_to_string(path)
                .with_context(|| format!("reading --system-prompt-file {}", path.display()))
        })
        .transpose()?;
    let workspace = args
        .workspace
        .as_ref()
        .map(|dir| {
            std::path::absolute(dir).with_context(|| format!("--workspace {}", dir.display()))
        })
        .transpose()?;
    let defaults = opta_daemon::agent::AgentConfig::default();
    Ok(opta_daemon::agent::AgentConfig {
        max_tool_rounds: args.max_tool_rounds,
        permission_timeout: Duration::from_secs(args.permission_timeout_secs),
        command: opta_daemon::agent::tools::command::CommandLimits {
            max_timeout: Duration::from_secs(args.max_command_secs),
            ..defaults.command
        },
        system_prompt,
        workspace,
        sandbox_writes: args
            .sandbox_write
            .iter()
            .map(std::path::absolute)
            .collect::<std::io::Result<_>>()
            .context("--sandbox-write")?,
        allow_any_workspace: args.allow_any_workspace,
        command_caps: opta_daemon::process::contain::CommandCaps {
            max_procs: args.command_max_procs,
            max_memory_bytes: args.command_max_memory_mb.saturating_mul(1 << 20),
        },
        command_tracking: args.command_tracking,
        tool_result_bytes: usize::try_from(args.tool_result_kib.max(1).saturating_mul(1024))
            .unwrap_or(usize::MAX),
        max_edit_bytes: usize::try_from(args.max_edit_kib.max(1).saturating_mul(1024))
            .unwrap_or(usize::MAX),
    })
}

/// The first line of stdin: the token `daemon start` (or the re-execution) piped in.
fn token_from_stdin() -> Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the token from stdin (--token-stdin)")?;
    // Only the line end goes: the token is used exactly as it was given.
    let token = line.strip_suffix('\n').unwrap_or(&line);
    let token = token.strip_suffix('\r').unwrap_or(token);
    if token.is_empty() {
        anyhow::bail!("--token-stdin: stdin held no token");
    }
    Ok(token.to_owned())
}

/// The token, when it was given where other local processes can read it: `OPTA_TOKEN` in
/// this process's environment (`/proc/PID/environ`) or `--token` on its command line
/// (`/proc/PID/cmdline`).
fn token_in_sight(args: &DaemonArgs) -> Option<String> {
    let on_command_line =
        std::env::args_os().any(|a| a == "--token" || a.to_string_lossy().starts_with("--token="));
    let in_environment = std::env::var_os("OPTA_TOKEN").is_some();
    (on_command_line || in_environment)
        .then(|| args.token.clone())
        .flatten()
}

/// Replaces this process with itself, minus `OPTA_TOKEN` and `--token`, the token piped to
/// its stdin (`--token-stdin`). Removing the variable at run time would not change
/// `/proc/PID/environ`; a new image does. Returns only on failure.
fn reexec_without_token(token: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::process::CommandExt as _;
    opta_daemon::daemon::check_token_line(token).map_err(anyhow::Error::msg)?;
    let exe = std::env::current_exe().context("locating the opta binary")?;
    let mut argv = std::env::args_os().skip(1);
    let mut kept = Vec::new();
    while let Some(arg) = argv.next() {
        if arg == "--token" {
            argv.next();
            continue;
        }
        if arg.to_string_lossy().starts_with("--token=") {
            continue;
        }
        kept.push(arg);
    }
    let Some(run) = kept
        .windows(2)
        .position(|w| w[0] == "daemon" && w[1] == "run")
    else {
        anyhow::bail!("cannot re-run the daemon without its token in sight: no `daemon run`");
    };
    kept.insert(run + 2, "--token-stdin".into());
    let (reader, mut writer) = std::io::pipe().context("a pipe for the token")?;
    // A token is far smaller than a pipe's buffer: the write cannot block.
    writeln!(writer, "{token}").context("writing the token to the pipe")?;
    drop(writer);
    let error = std::process::Command::new(exe)
        .args(kept)
        .env_remove("OPTA_TOKEN")
        .stdin(reader)
        .exec();
    Err(anyhow::anyhow!(
        "re-running the daemon without its token in sight: {error}"
    ))
}

/// Log lines queued for the log file's writer thread (more are dropped, never blocking).
const LOG_QUEUE_LINES: usize = 4096;

async fn run_foreground(home: &Path, args: &DaemonArgs) -> Result<()> {
    let dir = opta_daemon::daemon::daemon_dir(home);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let logs_path = dir.join("daemon.log");
    let file_appender = tracing_appender::rolling::never(&dir, "daemon.log");
    // The default queue holds 128,000 lines and allocates all of it up front (4 MB, a fifth of
    // an idle daemon's memory); 4,096 lines (128 KiB) absorb any burst the daemon logs.
    let (file_writer, _flush_guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .finish(file_appender);
    tracing_subscriber::registry()
        .with(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(file_writer),
        )
        .init();
    let config = DaemonConfig {
        host: args.host.clone(),
        port: args.port,
        home: home.to_owned(),
        token: args.token.clone(),
        lmx_url: args.lmx_url.clone(),
        model: args.model.clone(),
        lmx_timeouts: LmxTimeouts {
            connect: Duration::from_millis(args.lmx_connect_timeout_ms),
            first_byte: Duration::from_millis(args.lmx_first_byte_timeout_ms),
            idle: Duration::from_millis(args.lmx_idle_timeout_ms),
            first_token: Duration::from_millis(args.lmx_first_token_timeout_ms),
            admin: Duration::from_millis(args.lmx_admin_timeout_ms),
        },
        preflight_ttl: Duration::from_millis(args.preflight_ttl_ms),
        max_tokens: (args.max_tokens > 0).then_some(args.max_tokens),
        limits: Tunables {
            idle_eviction: Duration::from_secs(args.evict_idle_secs),
            eviction_interval: Duration::from_secs(args.evict_scan_secs),
            ..Tunables::default()
        },
        store: StoreOptions {
            max_bytes: (args.max_db_mb > 0).then(|| args.max_db_mb * 1024 * 1024),
            sync_commits: args.sync_commits,
            ..StoreOptions::default()
        },
        logs_path: Some(logs_path),
        faults: Default::default(),
        agent: agent_config(args)?,
        background: opta_daemon::process::BackgroundLimits {
            max_running: usize::try_from(args.max_background).unwrap_or(usize::MAX),
            default_timeout: Duration::from_secs(args.background_timeout_secs),
            output_cap_bytes: usize::try_from(args.background_output_kib.saturating_mul(1024))
                .unwrap_or(usize::MAX),
            keep_ended: Duration::from_secs(args.background_keep_secs),
        },
    };
    let daemon = RunningDaemon::start(config).await?;
    let state = daemon.state();
    eprintln!(
        "opta daemon {} listening on http://{}:{} (state file: {})",
        state.daemon_id,
        state.host,
        state.port,
        opta_daemon::state_path(home).display()
    );
    let mut signals = Signals::install()?;
    signals.next().await;
    tracing::info!("signal received; shutting down (again to stop waiting for connections)");
    // A second SIGTERM or Ctrl-C: stop waiting for open connections, drop them and exit.
    let force = daemon.force_token();
    tokio::spawn(async move {
        signals.next().await;
        tracing::warn!("second signal: not waiting for open connections");
        force.cancel();
    });
    daemon.shutdown().await?;
    Ok(())
}

/// SIGINT and SIGTERM, installed once so that a second one is caught too.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
