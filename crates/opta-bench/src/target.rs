//! The daemon a benchmark measures, reached only through the public v3 protocol: either a
//! running one (`--base URL --token T`, optionally `--pid` for its memory and CPU), or a local
//! one: the `opta` binary beside `opta-bench`, started on a fresh home and streaming from a
//! zero-latency scripted server that runs in this process. Either way the daemon is its own
//! process, so its memory and CPU are its own and the client never shares its scheduler.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use opta_test_support::ScriptedLmx;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The token a local daemon is started with.
const LOCAL_TOKEN: &str = "bench-token";

/// How a benchmark reaches its daemon (the command line's global options).
#[derive(Clone, Debug, Default, clap::Args)]
pub(crate) struct TargetArgs {
    /// Measure a running v3 daemon at this URL (e.g. http://127.0.0.1:9999) instead of
    /// starting one. Point it at `opta-scripted-lmx --chunk-delay-ms 0`: turns are sized by
    /// their content, which that server echoes word by word.
    #[arg(long, global = true)]
    pub base: Option<String>,
    /// The running daemon's token (with `--base`).
    #[arg(long, global = true, env = "OPTA_BENCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The running daemon's process id (with `--base`): its RSS and CPU time are read from
    /// /proc.
    #[arg(long, global = true)]
    pub pid: Option<u32>,
    /// The inference server the running daemon streams from (with `--base`): `overhead`
    /// measures its own time to first byte there.
    #[arg(long, global = true)]
    pub lmx: Option<String>,
    /// How long one request, WebSocket handshake or wait for the next frame may take before
    /// the run fails (a stalled daemon ends the run instead of hanging it).
    #[arg(long, global = true, default_value_t = 30)]
    pub deadline_secs: u64,
}

/// Settings of a local daemon (flags of `opta daemon run`).
#[derive(Debug, Default)]
pub(crate) struct LocalDaemon {
    /// fsync every commit.
    pub sync_commits: bool,
    /// Idle threshold and scan interval of eviction, in seconds.
    pub eviction: Option<(u64, u64)>,
    /// Start on this home (seeded beforehand) instead of a fresh one.
    pub home: Option<tempfile::TempDir>,
}

/// A daemon under measurement and the runtime the benchmark's client runs on.
pub(crate) struct Target {
    pub api: Api,
    /// The daemon's process, when known.
    pub pid: Option<u32>,
    /// The scripted server a local daemon streams from (None with `--base`).
    pub lmx: Option<ScriptedLmx>,
    /// The URL of the daemon's inference server, when known.
    pub lmx_url: Option<String>,
    /// The client's runtime: one thread, so its CPU time is that thread's.
    pub rt: tokio::runtime::Runtime,
    local: Option<Local>,
}

/// What a local target owns besides the scripted server.
struct Local {
    child: std::process::Child,
    /// Runs the scripted server, apart from the client.
    lmx_rt: tokio::runtime::Runtime,
    _home: tempfile::TempDir,
}

impl Target {
    /// The daemon `args` name, or a local one started with `local`.
    pub fn open(args: &TargetArgs, local: LocalDaemon) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let deadline = Duration::from_secs(args.deadline_secs.max(1));
        match &args.base {
            Some(base) => {
                let token = args
                    .token
                    .clone()
                    .context("--base needs --token (or OPTA_BENCH_TOKEN)")?;
                let api = Api::new(base.trim_end_matches('/'), &token, deadline)?;
                rt.block_on(api.health())
                    .with_context(|| format!("no v3 daemon answers at {base}"))?;
                Ok(Self {
                    api,
                    pid: args.pid,
                    lmx: None,
                    lmx_url: args.lmx.clone(),
                    rt,
                    local: None,
                })
            }
            None => Self::start_local(rt, local, deadline),
        }
    }

    fn start_local(
        rt: tokio::runtime::Runtime,
        settings: LocalDaemon,
        deadline: Duration,
    ) -> Result<Self> {
        let opta = opta_binary()?;
        let home = match settings.home {
            Some(home) => home,
            None => tempfile::tempdir()?,
        };
        let lmx_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let lmx = lmx_rt.block_on(ScriptedLmx::start())?;
        let mut command = std::process::Command::new(&opta);
        command.args(["daemon", "run", "--port", "0", "--lmx-url", &lmx.url()]);
        if settings.sync_commits {
            command.arg("--sync-commits");
        }
        if let Some((idle, scan)) = settings.eviction {
            command.args([
                "--evict-idle-secs",
                &idle.to_string(),
                "--evict-scan-secs",
                &scan.to_string(),
            ]);
        }
        let child = command
            .env("OPTA_HOME", home.path())
            .env("OPTA_TOKEN", LOCAL_TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", opta.display()))?;
        let pid = child.id();
        let mut local = Local {
            child,
            lmx_rt,
            _home: home,
        };
        let port = rt.block_on(wait_for_health(
            local._home.path(),
            Instant::now() + Duration::from_secs(30),
        ));
        let port = match port {
            Ok(port) => port,
            Err(e) => {
                let _ = local.child.kill();
                return Err(e);
            }
        };
        Ok(Self {
            api: Api::new(&format!("http://127.0.0.1:{port}"), LOCAL_TOKEN, deadline)?,
            pid: Some(pid),
            lmx_url: Some(lmx.url()),
            lmx: Some(lmx),
            rt,
            local: Some(local),
        })
    }

    /// Runs `future` on the client's runtime.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.rt.block_on(future)
    }

    /// The scripted server, for benchmarks that script replies (local only).
    pub fn scripted(&self, benchmark: &str) -> Result<&ScriptedLmx> {
        self.lmx.as_ref().with_context(|| {
            format!("{benchmark} scripts the inference server's replies: it runs only on a local daemon (no --base)")
        })
    }

    /// The daemon's resident memory in KiB (None when its process is unknown).
    pub fn rss_kib(&self) -> Option<f64> {
        self.pid
            .and_then(|pid| status_field(pid, "VmRSS:"))
            .map(|kib| kib as f64)
    }

    /// The daemon's resident memory, or an error naming what is missing.
    pub fn require_rss_kib(&self) -> Result<f64> {
        self.rss_kib()
            .context("memory needs the daemon's process: give --pid with --base")
    }

    /// The daemon's CPU time so far (zero when its process is unknown).
    pub fn cpu(&self) -> Duration {
        self.pid.map_or(Duration::ZERO, process_cpu)
    }

    /// Stops a local daemon (SIGTERM, then waits); nothing for a running one.
    pub fn stop(mut self) -> Result<()> {
        if let Some(mut local) = self.local.take() {
            terminate(&mut local.child)?;
            drop(self.lmx.take());
            local.lmx_rt.shutdown_background();
        }
        Ok(())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(local) = self.local.as_mut() {
            let _ = local.child.kill();
            let _ = local.child.wait();
        }
    }
}

/// SIGTERM to `child`, then waits up to 15 s for it to exit (SIGKILL after that).
pub(crate) fn terminate(child: &mut std::process::Child) -> Result<()> {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!("the daemon did not stop within 15 s of SIGTERM")
}

/// The `opta` binary beside this one.
pub(crate) fn opta_binary() -> Result<PathBuf> {
    let opta = std::env::current_exe()?.with_file_name("opta");
    if !opta.exists() {
        bail!(
            "{} not found: build it beside opta-bench (cargo build --release -p opta-cli -p opta-bench)",
            opta.display()
        );
    }
    Ok(opta)
}

/// Waits until the daemon started on `home` has written its port and answers `/health`.
pub(crate) async fn wait_for_health(home: &Path, deadline: Instant) -> Result<u16> {
    let state_path = opta_daemon::daemon::daemon_dir(home).join("state.json");
    // Each try is short: a daemon that accepts and never answers must not outlast `deadline`.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    loop {
        if Instant::now() > deadline {
            bail!("the daemon did not answer /health in time");
        }
        let port = std::fs::read(&state_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["port"].as_u64())
            .and_then(|p| u16::try_from(p).ok());
        if let Some(port) = port
            && let Ok(resp) = http
                .get(format!("http://127.0.0.1:{port}/health"))
                .send()
                .await
            && resp.status().is_success()
        {
            return Ok(port);
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// A numeric field (first number after `name`) of `/proc/PID/status`.
pub(crate) fn status_field(pid: u32, name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// User + system CPU time of process `pid` (clock ticks of 10 ms).
fn process_cpu(pid: u32) -> Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            // After the command: state is field 3, utime 14 and stime 15 (1-based).
            let utime: u64 = rest.get(11)?.parse().ok()?;
            let stime: u64 = rest.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// CPU time this thread has used (the client runtime runs on it), from the scheduler's
/// nanosecond counter.
pub(crate) fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// CPU time of this process (the client, and a local target's scripted server).
pub(crate) fn own_cpu() -> Duration {
    process_cpu(std::process::id())
}

pub(crate) type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The daemon's public v3 API as the benchmarks use it.
#[derive(Clone)]
pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
    /// What one request, handshake or frame may take (`--deadline-secs`).
    pub deadline: Duration,
}

impl Api {
    fn new(base: &str, token: &str, deadline: Duration) -> Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .tcp_nodelay(true)
                .connect_timeout(deadline)
                .timeout(deadline)
                .build()?,
            base: base.to_owned(),
            token: token.to_owned(),
            deadline,
        })
    }

    /// An authenticated request to `path`.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    async fn health(&self) -> Result<()> {
        let resp = self
            .http
            .get(format!("{}/health", self.base))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("/health answered {}", resp.status());
        }
        Ok(())
    }

    /// `POST /v3/sessions` with `body`; the session's id.
    pub async fn create_session(&self, body: Value) -> Result<String> {
        let resp = self
            .request(reqwest::Method::POST, "/v3/sessions")
            .json(&body)
            .send()
            .await?;
        if resp.status().as_u16() != 201 {
            bail!("create session answered {}", resp.status());
        }
        let created: Value = resp.json().await?;
        Ok(created["sessionId"]
            .as_str()
            .context("session id")?
            .to_owned())
    }

    /// A session created with `body` and one WebSocket subscription to it from its current
    /// seq on (what comes next: the turns the caller submits).
    pub async fn subscribed_session(&self, body: Value) -> Result<(String, WsStream)> {
        let session = self.create_session(body).await?;
        let ws = self
            .connect_ws(&session, self.last_seq(&session).await?)
            .await?;
        Ok((session, ws))
    }

    /// `DELETE /v3/sessions/:id`; the status code.
    pub async fn delete_session(&self, session: &str) -> Result<u16> {
        let resp = self
            .request(reqwest::Method::DELETE, &format!("/v3/sessions/{session}"))
            .send()
            .await?;
        Ok(resp.status().as_u16())
    }

    /// Submits a chat turn with `content`; its `turnId`. Fails unless 202.
    pub async fn submit(&self, session: &str, content: &str) -> Result<String> {
        let resp = self
            .request(
                reqwest::Method::POST,
                &format!("/v3/sessions/{session}/turns"),
            )
            .json(&json!({"clientId": "bench", "writerId": "bench", "content": content, "mode": "chat"}))
            .send()
            .await?;
        if resp.status().as_u16() != 202 {
            bail!("submit answered {}", resp.status());
        }
        let answer: Value = resp.json().await?;
        Ok(answer["turnId"].as_str().context("turnId")?.to_owned())
    }

    /// The session's current seq.
    pub async fn last_seq(&self, session: &str) -> Result<u64> {
        let detail: Value = self
            .request(reqwest::Method::GET, &format!("/v3/sessions/{session}"))
            .send()
            .await?
            .json()
            .await?;
        detail["lastSeq"].as_u64().context("lastSeq")
    }

    /// The `runtime` object of `GET /v3/metrics`.
    pub async fn runtime(&self) -> Result<Value> {
        let metrics: Value = self
            .request(reqwest::Method::GET, "/v3/metrics")
            .send()
            .await?
            .json()
            .await?;
        Ok(metrics["runtime"].clone())
    }

    /// The WebSocket URL of a subscription to `session` after `after_seq`.
    fn ws_url(&self, session: &str, after_seq: u64) -> Result<reqwest::Url> {
        let mut url = reqwest::Url::parse(&format!("{}/v3/ws", self.base))?;
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        url.set_scheme(scheme)
            .map_err(|()| anyhow::anyhow!("cannot make a WebSocket URL of {}", self.base))?;
        url.query_pairs_mut()
            .append_pair("sessionId", session)
            .append_pair("afterSeq", &after_seq.to_string())
            .append_pair("token", &self.token);
        Ok(url)
    }

    /// A WebSocket subscription to `session` after `after_seq` (Nagle off, as the CLI has
    /// it; a small read buffer, as thousands of them share this process).
    pub async fn connect_ws(&self, session: &str, after_seq: u64) -> Result<WsStream> {
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(4 * 1024);
        let url = self.ws_url(session, after_seq)?;
        let connect =
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true);
        let (ws, _) = self
            .within_deadline("the WebSocket handshake", connect)
            .await??;
        Ok(ws)
    }

    /// `future`, failed with a message naming `what` when it outlasts the deadline.
    async fn within_deadline<F: std::future::Future>(
        &self,
        what: &str,
        future: F,
    ) -> Result<F::Output> {
        tokio::time::timeout(self.deadline, future)
            .await
            .map_err(|_| anyhow::anyhow!("{what} took longer than {:?}", self.deadline))
    }

    /// The next message on `ws`; an error when it closed or sent nothing within the deadline.
    pub async fn next_message(&self, ws: &mut WsStream) -> Result<Message> {
        let next = self
            .within_deadline("the next WebSocket frame", ws.next())
            .await?;
        Ok(next.context("the WebSocket closed")??)
    }

    /// A subscription whose socket has a tiny receive buffer (4 KiB, as a slow link would
    /// keep it): once it stops reading, the daemon's writes to it stall within a few frames.
    pub async fn connect_ws_small_buffer(&self, session: &str, after: u64) -> Result<WsStream> {
        let url = self.ws_url(session, after)?;
        let addr = url
            .socket_addrs(|| None)?
            .into_iter()
            .next()
            .context("the daemon's address")?;
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_recv_buffer_size(4 * 1024)?;
        let connect = async {
            let stream = socket.connect(addr).await?;
            let (ws, _) = tokio_tungstenite::client_async(
                url.as_str(),
                tokio_tungstenite::MaybeTlsStream::Plain(stream),
            )
            .await?;
            anyhow::Ok(ws)
        };
        self.within_deadline("the WebSocket handshake", connect)
            .await?
    }
}

/// Content whose echo streams `words` tokens (plus the echo's prefix).
pub(crate) fn words(words: usize) -> String {
    let mut content = String::with_capacity(words * 7);
    for i in 0..words {
        if i > 0 {
            content.push(' ');
        }
        content.push('t');
        content.push_str(&i.to_string());
    }
    content
}
