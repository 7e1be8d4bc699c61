//! `opta-bench`: measures the daemon's own overhead against a zero-latency scripted
//! inference server and prints percentiles as JSON.
//!
//! `overhead`: N sequential turns, each timed from the moment the client sends
//! `POST /v3/sessions/:id/turns` to the first `turn.token` and to `turn.done` on a WebSocket
//! subscriber. The scripted server's own time to first byte is measured the same way
//! (a direct streaming request), so the ratio shows what the daemon adds.
//!
//! `tools`: what one tool round adds to a turn: turns whose model calls `read_file` once
//! and then answers, against plain turns, alternating on one session; also the call's own
//! time (`tool.start` → `tool.end`) and `tool.end` → the next round's first token.
//!
//! `memory`: RSS idle, after 1,000 sessions that each had a subscriber and a turn, after
//! their eviction, and per idle WebSocket subscriber. In process: the figures include the
//! scripted server and the benchmark's own client sockets (an upper bound for the daemon).
//!
//! `soak`: many rounds of a session's whole life with clients that misbehave (vanish
//! mid-turn, send bad input), reporting the process's memory, file descriptors and threads
//! after a warm-up and at the end, and what the daemon still holds: leaks show as growth.
//! Then the memory one idle resident session costs (1000 created, RSS growth per session).
//!
//! `fanout`, `slow-consumer`, `concurrent` (in `load.rs`) and `replay`, `startup` (in
//! `replay.rs`): what clients do at scale; one JSON line per run.

mod load;
mod replay;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use opta_daemon::store::{Store, StoreOptions, WriteOp};
use opta_daemon::{DaemonConfig, RunningDaemon};
use opta_test_support::ScriptedLmx;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
#[command(about = "opta benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Submit → first token and submit → done over sequential turns.
    Overhead {
        /// fsync every commit (the daemon's `--sync-commits`).
        #[arg(long)]
        sync_commits: bool,
        /// Measured turns.
        #[arg(long, default_value_t = 200)]
        turns: usize,
        /// Unmeasured turns first (connection set-up, caches).
        #[arg(long, default_value_t = 20)]
        warmup: usize,
    },
    /// Session lifecycles with vanishing and misbehaving clients; reports resource growth.
    Soak {
        /// Measured rounds.
        #[arg(long, default_value_t = 2000)]
        rounds: usize,
        /// Rounds before the first resource sample.
        #[arg(long, default_value_t = 200)]
        warmup: usize,
    },
    /// What one tool round adds: turns with one `read_file` round against plain turns,
    /// alternating, on one session.
    Tools {
        /// Measured turns of each kind.
        #[arg(long, default_value_t = 200)]
        turns: usize,
        /// Unmeasured turns of each kind first.
        #[arg(long, default_value_t = 20)]
        warmup: usize,
    },
    /// Memory: RSS idle, after sessions that each had a WebSocket subscriber and a turn (the
    /// subscribers closed), after those sessions were evicted, and per idle subscriber.
    Memory {
        /// Sessions, each with a subscriber and one turn.
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        /// Idle WebSocket subscribers on one session.
        #[arg(long, default_value_t = 2000)]
        subscribers: usize,
    },
    /// N WebSocket subscribers on one session while one turn streams: time until all saw
    /// `turn.done`, deliveries per second, every seq once and in order. One line per run.
    Fanout {
        /// Subscriber counts (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "50,500")]
        subscribers: Vec<usize>,
        /// Turn lengths in tokens (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "2000,20000")]
        tokens: Vec<usize>,
    },
    /// Fan-out without and then with one subscriber that stops reading: the others' time,
    /// and whether the stalled one was cut off and could resume.
    SlowConsumer {
        /// Reading subscribers.
        #[arg(long, default_value_t = 50)]
        subscribers: usize,
        /// Turn length in tokens.
        #[arg(long, default_value_t = 20000)]
        tokens: usize,
        /// Seconds the stalled reader waits before it looks (the daemon drops a connection
        /// whose writes make no progress for 30 s).
        #[arg(long, default_value_t = 32)]
        stall_secs: u64,
    },
    /// Sessions each with a subscriber, one turn each, all submitted at once: turns/s.
    Concurrent {
        /// Session counts (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        sessions: Vec<usize>,
        /// Tokens per turn.
        #[arg(long, default_value_t = 32)]
        tokens: usize,
    },
    /// Replay from a stored log (seeded through the store): the last 10 events, and the whole
    /// log over WebSocket. One line per log size.
    Replay {
        /// Stored events (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
        events: Vec<u64>,
        /// Measured `afterSeq=last-10` subscriptions per size.
        #[arg(long, default_value_t = 200)]
        repeats: usize,
    },
    /// Start-up: the `opta` binary beside this one spawned on a home with N stored sessions,
    /// until `/health` answers. One line per count.
    Startup {
        /// Stored sessions (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "0,10000,100000")]
        sessions: Vec<u64>,
        /// Starts measured per count.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// Round trip of one event commit through the store's writer thread.
    Store {
        /// fsync every commit (the daemon's `--sync-commits`).
        #[arg(long)]
        sync_commits: bool,
        /// Measured commits.
        #[arg(long, default_value_t = 3000)]
        commits: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Bench::Overhead {
            turns,
            warmup,
            sync_commits,
        } => overhead(turns, warmup, sync_commits),
        Bench::Store {
            commits,
            sync_commits,
        } => store(commits, sync_commits),
        Bench::Soak { rounds, warmup } => soak(rounds, warmup),
        Bench::Tools { turns, warmup } => tools(turns, warmup),
        Bench::Memory {
            sessions,
            subscribers,
        } => memory(sessions, subscribers),
        Bench::Fanout {
            subscribers,
            tokens,
        } => load::fanout(&subscribers, &tokens),
        Bench::SlowConsumer {
            subscribers,
            tokens,
            stall_secs,
        } => load::slow_consumer(subscribers, tokens, Duration::from_secs(stall_secs)),
        Bench::Concurrent { sessions, tokens } => load::concurrent(&sessions, tokens),
        Bench::Replay { events, repeats } => replay::replay(&events, repeats),
        Bench::Startup { sessions, repeats } => replay::startup(&sessions, repeats),
    }
}

/// Percentiles of a sample in milliseconds.
fn summary(mut samples: Vec<Duration>) -> Value {
    samples.sort();
    let ms = |d: Duration| (d.as_secs_f64() * 1_000_000.0).round() / 1000.0;
    let at = |q: f64| {
        let idx = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(idx).copied().map(ms)
    };
    let mean = samples.iter().map(|d| d.as_secs_f64()).sum::<f64>() / samples.len().max(1) as f64;
    json!({
        "n": samples.len(),
        "p50": at(0.50), "p90": at(0.90), "p99": at(0.99),
        "min": samples.first().copied().map(ms), "max": samples.last().copied().map(ms),
        "mean": (mean * 1_000_000.0).round() / 1000.0,
    })
}

fn store(commits: usize, sync_commits: bool) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let options = StoreOptions {
        max_bytes: None,
        sync_commits,
        ..StoreOptions::default()
    };
    let store = Store::open(&dir.path().join("bench.db"), options)?;
    let session: Arc<str> = Arc::from("bench");
    let envelope: Arc<str> = Arc::from(format!("{{\"payload\":\"{}\"}}", "x".repeat(300)));
    let samples = runtime.block_on(async {
        let mut samples = Vec::with_capacity(commits);
        for seq in 0..commits as u64 {
            let start = Instant::now();
            store
                .write(vec![WriteOp::AppendEvent {
                    session_id: session.clone(),
                    seq,
                    event: "turn.token",
                    turn_id: Some("turn_bench".into()),
                    envelope: envelope.clone(),
                }])
                .await?;
            samples.push(start.elapsed());
        }
        anyhow::Ok(samples)
    })?;
    let report = json!({"benchmark": "store", "syncCommits": sync_commits,
        "commitRoundTripMs": summary(samples)});
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// A daemon and a zero-latency scripted server on their own runtime (and threads), and a
/// client runtime, so a measurement does not share a scheduler with what it measures.
struct Rig {
    server_rt: tokio::runtime::Runtime,
    client_rt: tokio::runtime::Runtime,
    lmx: ScriptedLmx,
    daemon: RunningDaemon,
    base: String,
    _home: tempfile::TempDir,
}

impl Rig {
    fn start(store: StoreOptions) -> Result<Self> {
        Self::start_with(store, |_| {})
    }

    fn start_with(store: StoreOptions, configure: fn(&mut DaemonConfig)) -> Result<Self> {
        Self::start_in(tempfile::tempdir()?, store, configure)
    }

    /// Like [`Rig::start_with`], on `home` (seeded beforehand, say).
    fn start_in(
        home: tempfile::TempDir,
        store: StoreOptions,
        configure: fn(&mut DaemonConfig),
    ) -> Result<Self> {
        let server_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (lmx, daemon) = server_rt.block_on(async {
            let lmx = ScriptedLmx::start().await?;
            let mut config = DaemonConfig::new(home.path());
            config.port = 0;
            config.lmx_url = lmx.url();
            config.token = Some(TOKEN.into());
            config.store = store;
            configure(&mut config);
            let daemon = RunningDaemon::start(config).await?;
            anyhow::Ok((lmx, daemon))
        })?;
        let base = format!("http://{}", daemon.addr());
        let client_rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            server_rt,
            client_rt,
            lmx,
            daemon,
            base,
            _home: home,
        })
    }

    fn stop(self) -> Result<()> {
        self.server_rt.block_on(self.daemon.shutdown())?;
        drop(self.lmx);
        Ok(())
    }
}

const TOKEN: &str = "bench-token";

fn overhead(turns: usize, warmup: usize, sync_commits: bool) -> Result<()> {
    let rig = Rig::start(StoreOptions {
        max_bytes: None,
        sync_commits,
        ..StoreOptions::default()
    })?;
    let result = rig
        .client_rt
        .block_on(measure(&rig.base, &rig.lmx.url(), turns, warmup))
        .map(|mut report| {
            // With a warm preflight cache the whole run costs one model-list request.
            report["lmxModelListRequests"] = json!(rig.lmx.model_list_requests());
            report["syncCommits"] = json!(sync_commits);
            report
        });
    rig.stop()?;
    let report = result?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// This process's resident memory (KiB), open file descriptors and threads.
fn resources() -> Result<Value> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    };
    let fds = std::fs::read_dir("/proc/self/fd")?.count();
    Ok(json!({"rssKib": field("VmRSS:"), "fds": fds, "threads": field("Threads:")}))
}

fn soak(rounds: usize, warmup: usize) -> Result<()> {
    let rig = Rig::start(StoreOptions::default())?;
    let result = rig.client_rt.block_on(async {
        let http = reqwest::Client::new();
        for i in 0..warmup {
            soak_round(&http, &rig.base, i).await?;
        }
        settle(&http, &rig.base).await?;
        let before = resources()?;
        let started = Instant::now();
        for i in 0..rounds {
            soak_round(&http, &rig.base, i).await?;
        }
        let elapsed = started.elapsed();
        let held = settle(&http, &rig.base).await?;
        let at_end = resources()?;
        let resident = resident_session_cost(&http, &rig.base, 1000).await?;
        anyhow::Ok(json!({
            "benchmark": "soak",
            "rounds": rounds,
            "warmup": warmup,
            "roundMeanMs": (elapsed.as_secs_f64() * 1000.0 / rounds.max(1) as f64 * 1000.0).round() / 1000.0,
            "afterWarmup": before,
            "atEnd": at_end,
            "daemonHoldsAtEnd": held,
            "residentSessionKib": resident,
        }))
    });
    rig.stop()?;
    println!("{}", serde_json::to_string_pretty(&result?)?);
    Ok(())
}

/// This process's resident memory in KiB.
fn rss() -> Result<f64> {
    resources()?["rssKib"]
        .as_f64()
        .context("VmRSS in /proc/self/status")
}

/// Memory each idle resident session costs: RSS growth over creating `n` sessions (each
/// with its actor), in KiB per session. The sessions are deleted afterwards.
async fn resident_session_cost(http: &reqwest::Client, base: &str, n: usize) -> Result<f64> {
    let before = rss()?;
    for i in 0..n {
        let created = http
            .post(format!("{base}/v3/sessions"))
            .bearer_auth(TOKEN)
            .json(&json!({"sessionId": format!("resident-{i}")}))
            .send()
            .await?;
        if created.status().as_u16() != 201 {
            bail!("create answered {}", created.status());
        }
    }
    let per_session = (rss()? - before) / n as f64;
    for i in 0..n {
        http.delete(format!("{base}/v3/sessions/resident-{i}"))
            .bearer_auth(TOKEN)
            .send()
            .await?;
    }
    Ok((per_session * 10.0).round() / 10.0)
}

/// Waits (bounded) until the daemon holds no session, subscriber or turn; returns its runtime.
async fn settle(http: &reqwest::Client, base: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics: Value = http
            .get(format!("{base}/v3/metrics"))
            .bearer_auth(TOKEN)
            .send()
            .await?
            .json()
            .await?;
        let runtime = metrics["runtime"].clone();
        let idle = [
            "sessionCount",
            "subscriberCount",
            "activeTurnCount",
            "queuedTurnCount",
        ]
        .iter()
        .all(|k| runtime[k] == 0);
        if idle || Instant::now() > deadline {
            return Ok(runtime);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `POST /v3/sessions` with `body`; the session's id.
async fn create_session(http: &reqwest::Client, base: &str, body: Value) -> Result<String> {
    let created: Value = http
        .post(format!("{base}/v3/sessions"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    Ok(created["sessionId"]
        .as_str()
        .context("session id")?
        .to_owned())
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket subscription to `session` after `after_seq` (Nagle off, as the CLI has it).
async fn connect_ws(base: &str, session: &str, after_seq: u64) -> Result<WsStream> {
    let url = format!(
        "{}/v3/ws?sessionId={session}&afterSeq={after_seq}&token={TOKEN}",
        base.replacen("http://", "ws://", 1)
    );
    // A small read buffer: the benchmark's own subscribers share the process whose memory
    // `memory` measures.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4 * 1024);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(&url, Some(config), true).await?;
    Ok(ws)
}

/// One session's life: WS and SSE subscribers, bad input, a turn; odd rounds let it finish
/// and close politely, even rounds drop both subscribers mid-turn and delete the session
/// under the running turn.
async fn soak_round(http: &reqwest::Client, base: &str, round: usize) -> Result<()> {
    let session = create_session(http, base, json!({})).await?;
    let mut ws = connect_ws(base, &session, 0).await?;
    let mut sse = http
        .get(format!("{base}/v3/sse/events?sessionId={session}"))
        .bearer_auth(TOKEN)
        .send()
        .await?
        .bytes_stream();
    sse.next().await.context("sse opened")??;
    ws.send(Message::Text("not json".into())).await?;
    let bad = http
        .post(format!("{base}/v3/sessions/{session}/turns"))
        .bearer_auth(TOKEN)
        .json(&json!({"clientId": "soak", "writerId": "soak", "content": "x", "mode": "sing"}))
        .send()
        .await?;
    if bad.status().as_u16() != 400 {
        bail!("bad input answered {}", bad.status());
    }
    let submitted = http
        .post(format!("{base}/v3/sessions/{session}/turns"))
        .bearer_auth(TOKEN)
        .json(&json!({"clientId": "soak", "writerId": "soak", "content": "soak", "mode": "chat"}))
        .send()
        .await?;
    if submitted.status().as_u16() != 202 {
        bail!("submit answered {}", submitted.status());
    }
    let polite = round % 2 == 1;
    loop {
        let msg = ws.next().await.context("ws closed")??;
        let Message::Text(text) = msg else { continue };
        let v: Value = serde_json::from_str(text.as_str())?;
        match v["event"].as_str() {
            Some("turn.token") if !polite => break,
            Some("turn.done" | "turn.error") => break,
            _ => {}
        }
    }
    if polite {
        ws.close(None).await?;
    }
    drop(ws);
    drop(sse);
    let deleted = http
        .delete(format!("{base}/v3/sessions/{session}"))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    if deleted.status().as_u16() != 204 {
        bail!("delete answered {}", deleted.status());
    }
    Ok(())
}

async fn measure(base: &str, lmx_url: &str, turns: usize, warmup: usize) -> Result<Value> {
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let session = create_session(&http, base, json!({"sessionId": "bench"})).await?;
    let mut ws = connect_ws(base, &session, 1).await?;
    let submit_url = format!("{base}/v3/sessions/{session}/turns");
    let mut submit_ack = Vec::with_capacity(turns);
    let mut first_token = Vec::with_capacity(turns);
    let mut done = Vec::with_capacity(turns);
    for i in 0..warmup + turns {
        let start = Instant::now();
        let resp = http
            .post(&submit_url)
            .bearer_auth(TOKEN)
            .json(&json!({"clientId": "bench", "writerId": "bench", "content": "ping", "mode": "chat"}))
            .send()
            .await?;
        if resp.status().as_u16() != 202 {
            bail!("submit answered {}", resp.status());
        }
        let answer = resp.json::<Value>().await?;
        let acked = start.elapsed();
        let turn_id = answer["turnId"].as_str().context("turnId")?.to_owned();
        let mut first = None;
        loop {
            let msg = ws.next().await.context("ws closed")??;
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(text.as_str())?;
            if v["payload"]["turnId"] != turn_id.as_str() {
                continue;
            }
            match v["event"].as_str() {
                Some("turn.token") if first.is_none() => first = Some(start.elapsed()),
                Some("turn.done") => break,
                Some("turn.error") => bail!("turn failed: {v}"),
                _ => {}
            }
        }
        if i >= warmup {
            submit_ack.push(acked);
            first_token.push(first.context("no token")?);
            done.push(start.elapsed());
        }
    }
    // The scripted server alone: request → first streamed chunk.
    let mut lmx_first_byte = Vec::with_capacity(turns);
    for _ in 0..warmup + turns {
        let start = Instant::now();
        let resp = http
            .post(format!("{lmx_url}/v1/chat/completions"))
            .json(&json!({"model": "default", "stream": true,
                "messages": [{"role": "user", "content": "ping"}]}))
            .send()
            .await?;
        let mut body = resp.bytes_stream();
        body.next().await.context("no chunk")??;
        lmx_first_byte.push(start.elapsed());
        while body.next().await.is_some() {}
    }
    let lmx_first_byte = lmx_first_byte.split_off(warmup);
    let p50 = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2].as_secs_f64()
    };
    let ratio = p50(&first_token) / p50(&lmx_first_byte);
    Ok(json!({
        "benchmark": "overhead",
        "turns": turns,
        "warmup": warmup,
        "submitTo202Ms": summary(submit_ack),
        "submitToFirstTokenMs": summary(first_token),
        "submitToDoneMs": summary(done),
        "lmxTimeToFirstByteMs": summary(lmx_first_byte),
        "firstTokenP50OverLmxFirstByteP50": (ratio * 100.0).round() / 100.0,
    }))
}

fn tools(turns: usize, warmup: usize) -> Result<()> {
    let rig = Rig::start(StoreOptions::default())?;
    let workspace = tempfile::tempdir()?;
    std::fs::write(workspace.path().join("notes.txt"), "alpha\nbeta\ngamma\n")?;
    let result = rig.client_rt.block_on(measure_tools(
        &rig,
        &workspace.path().canonicalize()?,
        turns,
        warmup,
    ));
    rig.stop()?;
    println!("{}", serde_json::to_string_pretty(&result?)?);
    Ok(())
}

async fn measure_tools(
    rig: &Rig,
    workspace: &std::path::Path,
    turns: usize,
    warmup: usize,
) -> Result<Value> {
    use opta_test_support::Reply;
    let base = rig.base.as_str();
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let session = create_session(
        &http,
        base,
        json!({"sessionId": "bench-tools", "metadata": {"workspace": workspace}}),
    )
    .await?;
    let mut ws = connect_ws(base, &session, 1).await?;
    let submit_url = format!("{base}/v3/sessions/{session}/turns");
    let mut plain = Vec::with_capacity(turns);
    let mut with_tool = Vec::with_capacity(turns);
    let mut call = Vec::with_capacity(turns);
    let mut next_round = Vec::with_capacity(turns);
    for i in 0..(warmup + turns) * 2 {
        let tool_turn = i % 2 == 1;
        if tool_turn {
            rig.lmx
                .push(Reply::tool_call("read_file", json!({"path": "notes.txt"})));
        }
        rig.lmx.push(Reply::chunks(["ok"]));
        let start = Instant::now();
        let resp = http
            .post(&submit_url)
            .bearer_auth(TOKEN)
            .json(
                &json!({"clientId": "bench", "writerId": "bench", "content": "go", "mode": "chat"}),
            )
            .send()
            .await?;
        if resp.status().as_u16() != 202 {
            bail!("submit answered {}", resp.status());
        }
        let turn_id = resp.json::<Value>().await?["turnId"]
            .as_str()
            .context("turnId")?
            .to_owned();
        let (mut started, mut ended, mut token_after) = (None, None, None);
        loop {
            let msg = ws.next().await.context("ws closed")??;
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(text.as_str())?;
            if v["payload"]["turnId"] != turn_id.as_str() {
                continue;
            }
            match v["event"].as_str() {
                Some("tool.start") => started = Some(Instant::now()),
                Some("tool.end") => ended = Some(Instant::now()),
                Some("turn.token") if ended.is_some() && token_after.is_none() => {
                    token_after = Some(Instant::now());
                }
                Some("turn.done") => break,
                Some("turn.error") => bail!("turn failed: {v}"),
                _ => {}
            }
        }
        if i / 2 < warmup {
            continue;
        }
        if tool_turn {
            with_tool.push(start.elapsed());
            let (s, e, t) = (
                started.context("no tool.start")?,
                ended.context("no tool.end")?,
                token_after.context("no token after the call")?,
            );
            call.push(e.duration_since(s));
            next_round.push(t.duration_since(e));
        } else {
            plain.push(start.elapsed());
        }
    }
    let p50 = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1000.0
    };
    let added = p50(&with_tool) - p50(&plain);
    Ok(json!({
        "benchmark": "tools",
        "turns": turns,
        "warmup": warmup,
        "plainTurnSubmitToDoneMs": summary(plain),
        "toolTurnSubmitToDoneMs": summary(with_tool),
        "toolStartToEndMs": summary(call),
        "toolEndToNextTokenMs": summary(next_round),
        "addedPerToolRoundP50Ms": (added * 1000.0).round() / 1000.0,
        "lmxChatRequests": rig.lmx.chat_requests(),
    }))
}

/// Idle sessions leave memory after this long in `memory` (the scan runs every second).
const MEMORY_IDLE: Duration = Duration::from_secs(5);

fn memory(sessions: usize, subscribers: usize) -> Result<()> {
    let rig = Rig::start_with(StoreOptions::default(), |c| {
        c.limits.idle_eviction = MEMORY_IDLE;
        c.limits.eviction_interval = Duration::from_secs(1);
    })?;
    let result = rig.client_rt.block_on(async {
        let base = rig.base.as_str();
        let http = reqwest::Client::new();
        let idle = rss()?;
        for i in 0..sessions {
            let session =
                create_session(&http, base, json!({"sessionId": format!("mem-{i}")})).await?;
            let mut ws = connect_ws(base, &session, 0).await?;
            let resp = http
                .post(format!("{base}/v3/sessions/{session}/turns"))
                .bearer_auth(TOKEN)
                .json(&json!({"clientId": "bench", "writerId": "bench",
                    "content": "eight words to echo back in this turn", "mode": "chat"}))
                .send()
                .await?;
            if resp.status().as_u16() != 202 {
                bail!("submit answered {}", resp.status());
            }
            loop {
                let Message::Text(text) = ws.next().await.context("ws closed")?? else {
                    continue;
                };
                let v: Value = serde_json::from_str(text.as_str())?;
                if v["event"] == "turn.done" {
                    break;
                }
            }
            ws.close(None).await?;
        }
        let runtime = |http: reqwest::Client| async move {
            let m: Value = http
                .get(format!("{base}/v3/metrics"))
                .bearer_auth(TOKEN)
                .send()
                .await?
                .json()
                .await?;
            anyhow::Ok(m["runtime"].clone())
        };
        // Subscribers gone (their channels with them), sessions still resident.
        let deadline = Instant::now() + Duration::from_secs(10);
        while runtime(http.clone()).await?["subscriberCount"] != 0 {
            if Instant::now() > deadline {
                bail!("subscribers did not close");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let resident = runtime(http.clone()).await?["sessionCount"].clone();
        let after_turns = rss()?;
        let deadline = Instant::now() + MEMORY_IDLE + Duration::from_secs(30);
        while runtime(http.clone()).await?["sessionCount"] != 0 {
            if Instant::now() > deadline {
                bail!("sessions were not evicted");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let after_eviction = rss()?;
        // Idle subscribers on one session.
        let session = create_session(&http, base, json!({"sessionId": "mem-subscribed"})).await?;
        let before_subscribers = rss()?;
        let mut open = Vec::with_capacity(subscribers);
        for _ in 0..subscribers {
            open.push(connect_ws(base, &session, 0).await?);
        }
        // Every one is past its replay and waiting.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let with_subscribers = rss()?;
        for mut ws in open {
            let _ = ws.close(None).await;
        }
        let mib = |kib: f64| (kib / 1024.0 * 10.0).round() / 10.0;
        let per = |kib: f64, n: usize| (kib / n.max(1) as f64 * 10.0).round() / 10.0;
        anyhow::Ok(json!({
            "benchmark": "memory",
            "note": "RSS of the benchmark process: daemon, scripted server and the benchmark's own client sockets",
            "sessions": sessions,
            "residentAfterTurns": resident,
            "rssIdleMib": mib(idle),
            "rssAfterSubscribedTurnsMib": mib(after_turns),
            "perSessionAfterTurnsKib": per(after_turns - idle, sessions),
            "rssAfterEvictionMib": mib(after_eviction),
            "subscribers": subscribers,
            "perIdleSubscriberKib": per(with_subscribers - before_subscribers, subscribers),
        }))
    });
    rig.stop()?;
    println!("{}", serde_json::to_string_pretty(&result?)?);
    Ok(())
}
