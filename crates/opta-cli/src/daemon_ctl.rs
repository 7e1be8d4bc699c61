//! Finding, starting and stopping the daemon of a home directory.

use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use opta_client::{DaemonClient, EventStream};
use opta_protocol::DaemonState;

/// How long `start` waits for a new daemon to answer, and `stop` for it to exit.
const WAIT: Duration = Duration::from_secs(30);

/// Flags of `opta daemon run`, shared by every command that may start the daemon.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Daemon options (when this command starts the daemon)")]
pub struct DaemonArgs {
    /// Address to bind; anything but loopback exposes the daemon to the network.
    #[arg(long, env = "OPTA_HOST", default_value = "127.0.0.1", global = true)]
    pub host: String,
    /// Port (9999 falls back to 10000..=10020 when taken; 0 takes any free port).
    #[arg(long, env = "OPTA_PORT", default_value_t = opta_daemon::daemon::DEFAULT_PORT, global = true)]
    pub port: u16,
    /// Auth token (default: a new random one, written to the state file).
    #[arg(long, env = "OPTA_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Base URL of the OpenAI-compatible inference server.
    #[arg(
        long,
        env = "OPTA_LMX_URL",
        default_value = "http://127.0.0.1:1234",
        global = true
    )]
    pub lmx_url: String,
    /// Model for new sessions (default: the inference server's first loaded model).
    #[arg(long, env = "OPTA_MODEL", default_value = "", global = true)]
    pub model: String,
    /// How long the inference server's model list is cached, in milliseconds.
    #[arg(
        long,
        env = "OPTA_PREFLIGHT_TTL_MS",
        default_value_t = 10_000,
        global = true
    )]
    pub preflight_ttl_ms: u64,
    /// Inference connect timeout in milliseconds.
    #[arg(
        long,
        env = "OPTA_LMX_CONNECT_TIMEOUT_MS",
        default_value_t = 5_000,
        global = true
    )]
    pub lmx_connect_timeout_ms: u64,
    /// Inference time-to-first-byte timeout in milliseconds.
    #[arg(
        long,
        env = "OPTA_LMX_FIRST_BYTE_TIMEOUT_MS",
        default_value_t = 120_000,
        global = true
    )]
    pub lmx_first_byte_timeout_ms: u64,
    /// Longest silence between two streamed chunks, in milliseconds.
    #[arg(
        long,
        env = "OPTA_LMX_IDLE_TIMEOUT_MS",
        default_value_t = 60_000,
        global = true
    )]
    pub lmx_idle_timeout_ms: u64,
    /// Longest wait for a reply's first token, however lively the server looks meanwhile
    /// (keep-alive comments do not extend it).
    #[arg(
        long,
        env = "OPTA_LMX_FIRST_TOKEN_TIMEOUT_MS",
        default_value_t = 300_000,
        global = true
    )]
    pub lmx_first_token_timeout_ms: u64,
    /// Largest size of the session database in MiB (0: no limit). Beyond it writes fail
    /// with `storage-full` (HTTP 507) and nothing is half-written.
    #[arg(long, env = "OPTA_MAX_DB_MB", default_value_t = 0, global = true)]
    pub max_db_mb: u64,
    /// fsync every commit: acknowledged turns and events then survive an OS crash or power
    /// loss too (by default they survive a crash of the daemon, kill -9 included).
    #[arg(long, env = "OPTA_SYNC_COMMITS", global = true,
        value_parser = clap::builder::BoolishValueParser::new())]
    pub sync_commits: bool,
    /// Timeout of model-list and admin requests, in milliseconds.
    #[arg(
        long,
        env = "OPTA_LMX_ADMIN_TIMEOUT_MS",
        default_value_t = 10_000,
        global = true
    )]
    pub lmx_admin_timeout_ms: u64,
    /// A session with no turn, no subscriber and no request for this many seconds leaves
    /// memory (it is loaded again from the store on its next use).
    #[arg(long, env = "OPTA_EVICT_IDLE_SECS", default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub evict_idle_secs: u64,
    /// How often idle sessions are looked for, in seconds.
    #[arg(long, env = "OPTA_EVICT_SCAN_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub evict_scan_secs: u64,
    /// Most tokens the model may write in one reply (each model round); 0 leaves it to the
    /// inference server, which may let a small model ramble to the end of its context.
    #[arg(long, env = "OPTA_MAX_TOKENS", default_value_t = 0, global = true)]
    pub max_tokens: u32,
    /// Model rounds one turn may take before it ends with `tool-limit`.
    #[arg(long, env = "OPTA_MAX_TOOL_ROUNDS", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_tool_rounds: u32,
    /// Seconds a permission request waits for an answer before it is denied.
    #[arg(long, env = "OPTA_PERMISSION_TIMEOUT_SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub permission_timeout_secs: u64,
    /// The longest a `run_command` call may run, in seconds (its default is 120).
    #[arg(long, env = "OPTA_MAX_COMMAND_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub max_command_secs: u64,
    /// A file whose text replaces the opening of the agent's system prompt.
    #[arg(long, env = "OPTA_SYSTEM_PROMPT_FILE", global = true)]
    pub system_prompt_file: Option<PathBuf>,
    /// Workspace of sessions created without one (default: the daemon's working directory).
    #[arg(long, env = "OPTA_WORKSPACE", global = true)]
    pub workspace: Option<PathBuf>,
    /// Background processes running at once, daemon-wide (the next start gets 409).
    #[arg(long, env = "OPTA_MAX_BACKGROUND", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub max_background: u64,
    /// Timeout of a background process started without one, in seconds (0 = none).
    #[arg(
        long,
        env = "OPTA_BACKGROUND_TIMEOUT_SECS",
        default_value_t = 300,
        global = true
    )]
    pub background_timeout_secs: u64,
    /// Output kept per background process, in KiB (the oldest goes first).
    #[arg(long, env = "OPTA_BACKGROUND_OUTPUT_KIB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub background_output_kib: u64,
    /// How long an ended background process stays listed and readable, in seconds.
    #[arg(
        long,
        env = "OPTA_BACKGROUND_KEEP_SECS",
        default_value_t = 300,
        global = true
    )]
    pub background_keep_secs: u64,
    /// Where sandboxed commands may write besides the workspace and the temporary directory
    /// (repeatable, e.g. `--sandbox-write ~/.cargo`).
    #[arg(
        long = "sandbox-write",
        env = "OPTA_SANDBOX_WRITE",
        value_delimiter = ':',
        global = true
    )]
    pub sandbox_write: Vec<PathBuf>,
    /// Let a session's workspace be `/` or a directory that holds the daemon's home (refused
    /// by default: 400 `workspace-refused`). The tools never reach the home either way.
    #[arg(long, env = "OPTA_ALLOW_ANY_WORKSPACE", global = true,
        value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_any_workspace: bool,
    /// Processes (and threads) one command may run at once (0: no limit).
    #[arg(
        long,
        env = "OPTA_COMMAND_MAX_PROCS",
        default_value_t = 256,
        global = true
    )]
    pub command_max_procs: u64,
    /// Memory one command may use, in MiB (0: no limit).
    #[arg(
        long,
        env = "OPTA_COMMAND_MAX_MEMORY_MB",
        default_value_t = 4096,
        global = true
    )]
    pub command_max_memory_mb: u64,
    /// How each command's processes are tracked to their end: `auto` (a cgroup where one can
    /// be made, else a PID namespace, else the process group), `pid-namespace` or
    /// `process-group`.
    #[arg(
        long,
        env = "OPTA_COMMAND_TRACKING",
        default_value = "auto",
        global = true
    )]
    pub command_tracking: opta_daemon::process::contain::Tracking,
    /// The most of one tool result the model and clients get, in KiB; past it the result is
    /// cut with a note of what was left out and how to page on.
    #[arg(
        long,
        env = "OPTA_TOOL_RESULT_KIB",
        default_value_t = 64,
        global = true
    )]
    pub tool_result_kib: u64,
    /// The most text one `edit_file` or `multi_edit` may add to a file, in KiB (an edit that
    /// would add more is refused before it is built).
    #[arg(long, env = "OPTA_MAX_EDIT_KIB", default_value_t = 1024, global = true)]
    pub max_edit_kib: u64,
    /// Mode of `do` and `chat` turns when `--mode` is not given (else `do` for do, `chat` for
    /// chat). A client setting: the daemon does not use it.
    #[arg(long, env = "OPTA_DEFAULT_MODE", global = true, value_parser = crate::do_cmd::parse_mode)]
    pub default_mode: Option<opta_protocol::Mode>,
}

impl DaemonArgs {
    /// The same flags as command-line arguments for `opta daemon run` (the token goes through
    /// a pipe to its stdin, so it shows neither in `ps` nor in `/proc/PID/environ`).
    fn to_run_args(&self) -> Vec<String> {
        let mut args = vec![
            "--host".into(),
            self.host.clone(),
            "--port".into(),
            self.port.to_string(),
            "--lmx-url".into(),
            self.lmx_url.clone(),
            "--model".into(),
            self.model.clone(),
            "--preflight-ttl-ms".into(),
            self.preflight_ttl_ms.to_string(),
            "--lmx-connect-timeout-ms".into(),
            self.lmx_connect_timeout_ms.to_string(),
            "--lmx-first-byte-timeout-ms".into(),
            self.lmx_first_byte_timeout_ms.to_string(),
            "--lmx-idle-timeout-ms".into(),
            self.lmx_idle_timeout_ms.to_string(),
            "--lmx-first-token-timeout-ms".into(),
            self.lmx_first_token_timeout_ms.to_string(),
            "--lmx-admin-timeout-ms".into(),
            self.lmx_admin_timeout_ms.to_string(),
            "--max-db-mb".into(),
            self.max_db_mb.to_string(),
            "--evict-idle-secs".into(),
            self.evict_idle_secs.to_string(),
            "--evict-scan-secs".into(),
            self.evict_scan_secs.to_string(),
            "--max-tokens".into(),
            self.max_tokens.to_string(),
            "--max-tool-rounds".into(),
            self.max_tool_rounds.to_string(),
            "--permission-timeout-secs".into(),
            self.permission_timeout_secs.to_string(),
            "--max-command-secs".into(),
            self.max_command_secs.to_string(),
            "--max-background".into(),
            self.max_background.to_string(),
            "--background-timeout-secs".into(),
            self.background_timeout_secs.to_string(),
            "--background-output-kib".into(),
            self.background_output_kib.to_string(),
            "--background-keep-secs".into(),
            self.background_keep_secs.to_string(),
            "--command-max-procs".into(),
            self.command_max_procs.to_string(),
            "--command-max-memory-mb".into(),
            self.command_max_memory_mb.to_string(),
            "--command-tracking".into(),
            self.command_tracking.as_str().into(),
            "--tool-result-kib".into(),
            self.tool_result_kib.to_string(),
            "--max-edit-kib".into(),
            self.max_edit_kib.to_string(),
        ];
        for path in &self.sandbox_write {
            args.push("--sandbox-write".into());
            args.push(path.display().to_string());
        }
        for (flag, path) in [
            ("--system-prompt-file", &self.system_prompt_file),
            ("--workspace", &self.workspace),
        ] {
            if let Some(path) = path {
                args.push(flag.into());
                args.push(path.display().to_string());
            }
        }
        if self.sync_commits {
            args.push("--sync-commits".into());
        }
        if self.allow_any_workspace {
            args.push("--allow-any-workspace".into());
        }
        args
    }
}

/// The default home: `~/.config/opta`.
pub fn default_home() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set; pass --home or OPTA_HOME")?;
    Ok(PathBuf::from(home).join(".config").join("opta"))
}

/// A daemon that answered its health check.
pub struct Running {
    /// Its state file.
    pub state: DaemonState,
    /// A client for it.
    pub client: DaemonClient,
}

/// The daemon of `home` if one is running and answers as the state file says.
pub async fn running(home: &Path) -> Option<Running> {
    let state = DaemonClient::read_state(home).ok()?;
    let client = DaemonClient::from_state(&state);
    let health = tokio::time::timeout(Duration::from_secs(3), client.v3_health()).await;
    match health {
        Ok(Ok(h)) if h.daemon_id == state.daemon_id => Some(Running { state, client }),
        _ => None,
    }
}

/// Whether some process holds the daemon lock of `home` (a daemon that may not answer).
pub fn lock_held(home: &Path) -> bool {
    let path = opta_daemon::daemon::daemon_dir(home).join("daemon.lock");
    let Ok(file) = OpenOptions::new().write(true).open(&path) else {
        return false;
    };
    match file.try_lock() {
        Ok(()) => false,
        Err(std::fs::TryLockError::WouldBlock) => true,
        Err(std::fs::TryLockError::Error(_)) => false,
    }
}

/// Whether the daemon was already running or had to be started.
pub enum Started {
    /// It was running.
    Already(Running),
    /// This call started it.
    New(Running),
}

impl Started {
    /// The running daemon.
    pub fn running(&self) -> &Running {
        match self {
            Started::Already(r) | Started::New(r) => r,
        }
    }
}

/// Starts the daemon of `home` detached, unless one is running; waits until it answers.
pub async fn start(home: &Path, args: &DaemonArgs) -> Result<Started> {
    if let Some(r) = running(home).await {
        return Ok(Started::Already(r));
    }
    let dir = opta_daemon::daemon::daemon_dir(home);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let err_path = dir.join("daemon.err");
    let err_file =
        File::create(&err_path).with_context(|| format!("creating {}", err_path.display()))?;
    let exe = std::env::current_exe().context("locating the opta binary")?;
    let mut command = Command::new(exe);
    command
        .args(["daemon", "run"])
        .args(args.token.is_some().then_some("--token-stdin"))
        .args(args.to_run_args())
        .env("OPTA_HOME", home)
        // The token goes through a pipe, never the environment or the command line, which
        // any local process can read in /proc.
        .env_remove("OPTA_TOKEN")
        .stdin(if args.token.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::from(err_file))
        // Its own process group: a Ctrl-C in this terminal must not reach the daemon.
        .process_group(0);
    if let Some(token) = &args.token {
        opta_daemon::daemon::check_token_line(token).map_err(anyhow::Error::msg)?;
    }
    let mut child = command.spawn().context("spawning the daemon")?;
    if let (Some(token), Some(mut stdin)) = (&args.token, child.stdin.take()) {
        use std::io::Write as _;
        // A daemon that died before it read the token is reported below with its stderr; the
        // broken pipe itself must not end this command as if our own reader had gone.
        let _ = writeln!(stdin, "{token}");
    }
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(r) = running(home).await
            && r.state.pid == child.id()
        {
            return Ok(Started::New(r));
        }
        if let Some(status) = child.try_wait()? {
            // Lost a race with another start? Then that daemon is the answer.
            if let Some(r) = running(home).await {
                return Ok(Started::Already(r));
            }
            let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            let reason = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output");
            bail!("the daemon exited during start ({status}): {reason}");
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon did not answer within {} s; see {}",
                WAIT.as_secs(),
                err_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// How long an event stream may be down before the daemon itself is looked for.
const LOOK_FOR_DAEMON_AFTER: Duration = Duration::from_secs(2);

/// Where a subscription stands whose connection may have dropped.
pub enum StreamCheck {
    /// Connected, or down only briefly, or the daemon answers where it did: nothing to do.
    Fine,
    /// The daemon answers at another address (it restarted there): subscribe again there.
    Moved(Box<Running>),
    /// No daemon answers; the stream has been down this long.
    DaemonGone(Duration),
}

/// Checks on `events` (subscribed through `client`): a daemon that restarted on another port
/// is found through the state file.
pub async fn check_stream(home: &Path, events: &EventStream, client: &DaemonClient) -> StreamCheck {
    let Some(down) = events
        .disconnected_for()
        .filter(|d| *d >= LOOK_FOR_DAEMON_AFTER)
    else {
        return StreamCheck::Fine;
    };
    match running(home).await {
        Some(r) if r.client.base_url() != client.base_url() => StreamCheck::Moved(Box::new(r)),
        Some(_) => StreamCheck::Fine,
        None => StreamCheck::DaemonGone(down),
    }
}

/// The daemon of `home`, started on demand.
pub async fn ensure(home: &Path, args: &DaemonArgs) -> Result<DaemonClient> {
    let started = start(home, args).await?;
    let client = started.running().client.clone();
    client.check_contract().await?;
    Ok(client)
}

/// Stops the daemon of `home` gracefully and waits until it exited. Returns its pid, or `None`
/// when none was running.
pub async fn stop(home: &Path) -> Result<Option<u32>> {
    let state = match DaemonClient::read_state(home) {
        Ok(s) => s,
        Err(opta_client::ClientError::NotRunning { .. }) => return Ok(None),
        // Garbage where the state file should be: stale, unless a daemon holds the lock (then
        // its pid is unknown and it cannot be signalled safely).
        Err(e @ opta_client::ClientError::BadStateFile { .. }) => {
            if lock_held(home) {
                bail!(
                    "{e}; a daemon holds this home's lock, but without its state its pid is unknown: stop it by hand"
                );
            }
            let _ = std::fs::remove_file(opta_daemon::state_path(home));
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    // Only signal a process proven to be our daemon: it answers as the state file says, or it
    // holds the home's lock. Otherwise the state file is stale (and the pid may be reused).
    if running(home).await.is_none() && !lock_held(home) {
        let _ = std::fs::remove_file(opta_daemon::state_path(home));
        return Ok(None);
    }
    let pid = Pid::from_raw(i32::try_from(state.pid).context("pid out of range")?);
    kill(pid, Signal::SIGTERM).with_context(|| format!("signalling pid {}", state.pid))?;
    let deadline = Instant::now() + WAIT;
    // The lock is released when the process ends (even as an unreaped zombie).
    while lock_held(home) || opta_daemon::state_path(home).exists() {
        if Instant::now() > deadline {
            bail!(
                "the daemon (pid {}) did not stop within {} s",
                state.pid,
                WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(Some(state.pid))
}
