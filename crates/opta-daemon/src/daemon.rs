//! Daemon lifecycle: home lock, store, session registry, listener, state file, shutdown.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use opta_protocol::DaemonState;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::context::{DaemonContext, FaultHooks, RuntimeCounters, Tunables};
use crate::error::{Error, Result};
use crate::http::{AppState, ServeControl, router, serve};
use crate::ids::{new_daemon_id, new_token, now_iso};
use crate::inference::{LmxClient, LmxTimeouts, PreflightCache};
use crate::session::{Registry, sweep_deltas_periodically};
use crate::store::{Store, StoreOptions};

/// The default port; when it is taken the daemon tries [`FALLBACK_PORTS`].
pub const DEFAULT_PORT: u16 = 9999;
/// Ports tried in order when [`DEFAULT_PORT`] is taken.
pub const FALLBACK_PORTS: std::ops::RangeInclusive<u16> = 10000..=10020;

/// How to run a daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Address to bind (loopback unless the user opts out).
    pub host: String,
    /// Port; [`DEFAULT_PORT`] falls back to [`FALLBACK_PORTS`]; 0 takes any free port.
    pub port: u16,
    /// Home directory; daemon files live in `home/daemon/`.
    pub home: PathBuf,
    /// Auth token; a random one when `None`.
    pub token: Option<String>,
    /// Base URL of the inference server.
    pub lmx_url: String,
    /// Model for sessions created without one; empty means the server's first loaded model.
    pub model: String,
    /// Inference timeouts.
    pub lmx_timeouts: LmxTimeouts,
    /// How long the loaded-model list is trusted.
    pub preflight_ttl: Duration,
    /// `max_tokens` of every chat request (a model round's reply); `None` leaves it to the
    /// server, which may let a small model ramble to the end of its context.
    pub max_tokens: Option<u32>,
    /// Session actor tunables.
    pub limits: Tunables,
    /// Largest size the database may grow to, and whether every commit is fsynced.
    pub store: StoreOptions,
    /// Log file reported in the state file.
    pub logs_path: Option<PathBuf>,
    /// Injected faults, for tests.
    pub faults: FaultHooks,
    /// Tool loop, permissions, commands, prompt and default workspace.
    pub agent: crate::agent::AgentConfig,
    /// Limits of background processes.
    pub background: crate::process::BackgroundLimits,
}

impl DaemonConfig {
    /// Defaults for `home`: loopback, port 9999, LMX at 127.0.0.1:1234.
    pub fn new(home: impl Into<PathBuf>) -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: DEFAULT_PORT,
            home: home.into(),
            token: None,
            lmx_url: "http://127.0.0.1:1234".into(),
            model: String::new(),
            lmx_timeouts: LmxTimeouts::default(),
            preflight_ttl: Duration::from_secs(10),
            max_tokens: None,
            store: StoreOptions::default(),
            limits: Tunables::default(),
            logs_path: None,
            faults: FaultHooks::default(),
            agent: crate::agent::AgentConfig::default(),
            background: crate::process::BackgroundLimits::default(),
        }
    }

    /// `home/daemon`.
    pub fn daemon_dir(&self) -> PathBuf {
        daemon_dir(&self.home)
    }
}

/// `home/daemon`, where the state file, lock, log and database live.
pub fn daemon_dir(home: &Path) -> PathBuf {
    home.join("daemon")
}

/// `home/daemon/state.json`.
pub fn state_path(home: &Path) -> PathBuf {
    daemon_dir(home).join(opta_protocol::STATE_FILE_NAME)
}

/// A running daemon; dropping it does not stop it, call [`RunningDaemon::shutdown`].
pub struct RunningDaemon {
    addr: SocketAddr,
    state: DaemonState,
    state_path: PathBuf,
    ctx: Arc<DaemonContext>,
    registry: Registry,
    runner: crate::process::ProcessRunner,
    server: JoinHandle<()>,
    force: CancellationToken,
    _lock: File,
}

impl std::fmt::Debug for RunningDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningDaemon")
            .field("addr", &self.addr)
            .field("daemon_id", &self.state.daemon_id)
            .finish_non_exhaustive()
    }
}

impl RunningDaemon {
    /// Starts a daemon: takes the home lock, opens the store, resumes open turns, binds,
    /// writes the state file.
    pub async fn start(config: DaemonConfig) -> Result<Self> {
        check_lmx_url(&config.lmx_url)?;
        // Not dumpable: `/proc/PID/mem` and `environ` then need CAP_SYS_PTRACE, which no
        // sandboxed command holds, even one run as root (same-user access alone would do).
        if let Err(e) =
            rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        {
            tracing::warn!(error = %e, "could not make the daemon undumpable");
        }
        let dir = config.daemon_dir();
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        let lock = take_lock(&dir)?;

        let db_path = dir.join("opta.db");
        let options = config.store;
        let store = tokio::task::spawn_blocking(move || Store::open(&db_path, options))
            .await
            .map_err(|e| Error::Internal(format!("store open task: {e}")))??;
        let lmx = LmxClient::new(&config.lmx_url, config.lmx_timeouts)
            .map_err(|e| Error::Internal(e.to_string()))?
            .with_max_tokens(config.max_tokens);
        let shutdown = CancellationToken::new();
        let workspace_dir = match &config.agent.workspace {
            Some(dir) => dir.clone(),
            None => std::env::current_dir()
                .map_err(|e| Error::Config(format!("reading the working directory: {e}")))?,
        };
        let protected =
            crate::agent::workspace::Protected::new(&config.home, config.agent.allow_any_workspace);
        // A default that holds the home is refused for each session that would use it, not
        // at start: sessions that name their own workspace still work.
        let default_workspace = match crate::agent::Workspace::open(&workspace_dir, &protected) {
            Ok(workspace) => Ok(workspace),
            Err(e @ crate::agent::WorkspaceError::Refused { .. }) => Err(e.to_string()),
            Err(e) => return Err(Error::Config(format!("--workspace: {e}"))),
        };
        // Commands of a previous run killed with it are still in its cgroups: gone now.
        let containment = crate::process::contain::Containment::probe(
            &dir,
            config.agent.command_caps,
            config.agent.command_tracking,
        );
        let left = containment.recover();
        if left > 0 {
            tracing::info!(
                cgroups = left,
                "commands a previous run left behind were killed"
            );
        }
        containment.release();
        let (runner, runner_inbox) = crate::process::ProcessRunner::channel();
        let ctx = Arc::new(DaemonContext {
            daemon_id: new_daemon_id(),
            store,
            lmx,
            preflight: PreflightCache::new(config.preflight_ttl),
            default_model: config.model.clone(),
            limits: config.limits,
            counters: RuntimeCounters::default(),
            shutdown: shutdown.clone(),
            started: std::time::Instant::now(),
            faults: config.faults,
            metrics: crate::metrics::Metrics::default(),
            agent: config.agent.clone(),
            default_workspace,
            protected,
            tool_support: crate::agent::ToolSupport::default(),
            runner,
            sandbox: crate::process::sandbox::Sandbox::probe(
                &config.home,
                config.agent.sandbox_writes.clone(),
            ),
            containment,
            background: config.background,
            session_feed: crate::session::SessionFeed::default(),
        });
        let registry = Registry::spawn(ctx.clone());
        runner_inbox.start(ctx.clone());
        let runner = ctx.runner.clone();
        crate::process::recover(&ctx, &registry).await?;
        tokio::spawn(sweep_deltas_periodically(ctx.clone()));
        for id in ctx.store.sessions_with_open_turns().await? {
            match opta_protocol::SessionId::parse(&id) {
                Ok(id) => {
                    if let Err(e) = registry.get(id.clone()).await {
                        tracing::error!(session = %id, error = %e, "could not resume session");
                    }
                }
                Err(e) => tracing::error!(error = %e, "stored session id is invalid"),
            }
        }

        let listener = bind(&config.host, config.port).await?;
        let addr = listener.local_addr()?;
        let token: Arc<str> = match &config.token {
            Some(token) => {
                check_token_line(token).map_err(|e| Error::Config(format!("--token: {e}")))?;
                token.clone()
            }
            None => kept_token(&dir)?,
        }
        .into();
        let logs_path = config
            .logs_path
            .clone()
            .unwrap_or_else(|| dir.join("daemon.log"));
        let state = DaemonState {
            pid: std::process::id(),
            daemon_id: ctx.daemon_id.clone(),
            host: config.host.clone(),
            port: addr.port(),
            token: token.to_string(),
            started_at: now_iso(),
            logs_path: logs_path.display().to_string(),
        };
        let state_path = dir.join("state.json");
        write_state(&state_path, &state)?;

        let app = router(AppState::new(ctx.clone(), registry.clone(), token));
        let force = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            app,
            ServeControl {
                shutdown: shutdown.clone(),
                force: force.clone(),
            },
            config.limits,
        ));
        tracing::info!(%addr, daemon_id = %ctx.daemon_id, "daemon listening");
        Ok(Self {
            addr,
            state,
            state_path,
            ctx,
            registry,
            runner,
            server,
            force,
            _lock: lock,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the state file says.
    pub fn state(&self) -> &DaemonState {
        &self.state
    }

    /// Cancelled when shutdown begins.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.ctx.shutdown.clone()
    }

    /// Cancelling this during [`RunningDaemon::shutdown`] stops it waiting for open
    /// connections (a second Ctrl-C): they are dropped at once.
    pub fn force_token(&self) -> CancellationToken {
        self.force.clone()
    }

    /// Graceful stop: stop accepting, end streams (open connections get the shutdown grace
    /// period, then are dropped), interrupt running turns, flush the store, remove the state
    /// file, release the lock.
    pub async fn shutdown(self) -> Result<()> {
        self.ctx.shutdown.cancel();
        if let Err(e) = self.server.await {
            tracing::error!(error = %e, "server task failed");
        }
        // Background processes first: their ends are recorded in their sessions.
        self.runner.shutdown().await;
        self.registry.shutdown().await;
        self.ctx.containment.release();
        self.ctx.store.shutdown().await?;
        if let Err(e) = fs::remove_file(&self.state_path) {
            tracing::warn!(error = %e, "could not remove the state file");
        }
        tracing::info!(daemon_id = %self.ctx.daemon_id, "daemon stopped");
        Ok(())
    }
}

/// Takes an exclusive lock on `dir/daemon.lock`; held for the daemon's lifetime and released
/// by the OS if the process dies, so a stale state file never blocks a start.
fn take_lock(dir: &Path) -> Result<File> {
    let path = dir.join("daemon.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => {
            let pid = fs::read(dir.join("state.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<DaemonState>(&b).ok())
                .map(|s| format!(", pid {}", s.pid))
                .unwrap_or_default();
            Err(Error::AlreadyRunning { lock: path, pid })
        }
        Err(fs::TryLockError::Error(e)) => Err(Error::Io(e)),
    }
}

/// The inference server's URL must be plain `http://host[:port][/path]`: local servers speak
/// plain HTTP, and this build has no TLS. Refusing at start beats every turn failing.
fn check_lmx_url(url: &str) -> Result<()> {
    let invalid = |why: &str| Error::Config(format!("--lmx-url {url:?}: {why}"));
    if !url.contains("://") {
        return Err(invalid(&format!(
            "no scheme; did you mean \"http://{url}\"?"
        )));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
    match parsed.scheme() {
        "http" if parsed.host().is_some() => Ok(()),
        "http" => Err(invalid("needs a host")),
        "https" => Err(invalid(
            "https is not supported (this build has no TLS); local inference servers speak \
             http://",
        )),
        other => Err(invalid(&format!("scheme {other} is not http"))),
    }
}

async fn bind(host: &str, port: u16) -> Result<TcpListener> {
    let candidates: Vec<u16> = if port == DEFAULT_PORT {
        std::iter::once(DEFAULT_PORT)
            .chain(FALLBACK_PORTS)
            .collect()
    } else {
        vec![port]
    };
    let host_part = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let mut last_error = None;
    for candidate in candidates {
        match TcpListener::bind(format!("{host_part}:{candidate}")).await {
            Ok(listener) => {
                let addr = listener.local_addr()?;
                if !addr.ip().is_loopback() {
                    tracing::warn!(%addr, "listening on a non-loopback address: reachable from the network");
                }
                return Ok(listener);
            }
            Err(e) => last_error = Some(e),
        }
    }
    let ports = if port == DEFAULT_PORT {
        format!(
            "{DEFAULT_PORT} (or {}..={})",
            FALLBACK_PORTS.start(),
            FALLBACK_PORTS.end()
        )
    } else {
        port.to_string()
    };
    Err(Error::Bind {
        host: host.to_owned(),
        ports,
        reason: last_error.map_or_else(|| "no port to try".to_owned(), |e| e.to_string()),
    })
}

/// Writes the state file atomically with mode 0600.
fn write_state(path: &Path, state: &DaemonState) -> Result<()> {
    let json = serde_json::to_vec_pretty(state)
        .map_err(|e| Error::Internal(format!("state serialisation: {e}")))?;
    write_private(path, &json)
}

/// Writes `bytes` to `path` atomically (a synced temporary file renamed over it), mode 0600.
/// Why `token` is unusable: empty, with blanks at either end (HTTP drops them from the
/// `Authorization` header, so no client could match it) or with a control character (a line
/// break, which could not be passed on one line or sent in a header).
pub fn check_token_line(token: &str) -> std::result::Result<(), String> {
    if token.is_empty() {
        return Err("the token is empty".to_owned());
    }
    if token.chars().any(char::is_control) {
        return Err("the token holds a control character or a line break".to_owned());
    }
    if token.trim() != token {
        return Err("the token starts or ends with a blank".to_owned());
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// The token kept in `dir/token` (0600), made on first use: signed-in web pages and other
/// long-lived clients keep working across restarts. Delete the file to rotate the token.
fn kept_token(dir: &Path) -> Result<String> {
    let path = dir.join("token");
    if let Ok(text) = fs::read_to_string(&path) {
        let token = text.trim();
        if token.len() >= 48 && token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(token.to_owned());
        }
        tracing::warn!(path = %path.display(), "the kept token is malformed; making a new one");
    }
    let token = new_token();
    write_private(&path, token.as_bytes())?;
    Ok(token)
}

/// Reads the state file of `home`, if there is one.
pub fn read_state(home: &Path) -> Option<DaemonState> {
    let bytes = fs::read(state_path(home)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_kept_across_starts_and_a_bad_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let first = kept_token(dir.path()).unwrap();
        assert_eq!(kept_token(dir.path()).unwrap(), first);
        let mode = fs::metadata(dir.path().join("token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(dir.path().join("token"), "short").unwrap();
        let replaced = kept_token(dir.path()).unwrap();
        assert_ne!(replaced, first);
        assert_eq!(replaced.len(), 64);
    }

    #[test]
    fn only_plain_http_inference_urls_are_taken() {
        for ok in [
            "http://127.0.0.1:1234",
            "http://localhost:8080/",
            "http://[::1]:1/base",
        ] {
            assert!(check_lmx_url(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("https://127.0.0.1:1234", "no TLS"),
            ("127.0.0.1:1234", "did you mean \"http://127.0.0.1:1234\""),
            ("localhost:1234", "did you mean \"http://localhost:1234\""),
            ("ftp://host", "scheme ftp is not http"),
            ("http://", "empty host"),
        ] {
            let e = check_lmx_url(bad).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn the_default_port_falls_back_when_taken() {
        // Hold 9999 (if something else already holds it, that serves as well).
        let _hold = std::net::TcpListener::bind(("127.0.0.1", DEFAULT_PORT));
        let listener = bind("127.0.0.1", DEFAULT_PORT).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(FALLBACK_PORTS.contains(&port), "bound {port}");
    }

    #[tokio::test]
    async fn an_explicit_port_that_is_taken_is_an_error_and_zero_is_any() {
        let any = bind("127.0.0.1", 0).await.unwrap();
        let taken = any.local_addr().unwrap().port();
        assert_ne!(taken, 0);
        let err = bind("127.0.0.1", taken).await.unwrap_err();
        assert!(matches!(err, Error::Bind { .. }), "{err}");
        // The message names the port, not only the host.
        assert!(err.to_string().contains(&format!("port {taken}")), "{err}");
        let v6 = bind("::1", 0).await;
        if let Ok(l) = v6 {
            assert!(l.local_addr().unwrap().ip().is_loopback());
        }
    }
}
