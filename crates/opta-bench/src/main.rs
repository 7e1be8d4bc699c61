//! `opta-bench`: measures the daemon's own overhead against a zero-latency scripted
//! inference server and prints percentiles as JSON.
//!
//! `overhead`: N sequential turns, each timed from the moment the client sends
//! `POST /v3/sessions/:id/turns` to the first `turn.token` and to `turn.done` on a WebSocket
//! subscriber. The scripted server's own time to first byte is measured the same way
//! (a direct streaming request), so the ratio shows what the daemon adds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use opta_daemon::store::{Store, WriteOp};
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
        /// Measured turns.
        #[arg(long, default_value_t = 200)]
        turns: usize,
        /// Unmeasured turns first (connection set-up, caches).
        #[arg(long, default_value_t = 20)]
        warmup: usize,
    },
    /// Round trip of one event commit through the store's writer thread.
    Store {
        /// Measured commits.
        #[arg(long, default_value_t = 3000)]
        commits: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Bench::Overhead { turns, warmup } => overhead(turns, warmup),
        Bench::Store { commits } => store(commits),
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

fn store(commits: usize) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("bench.db"), None)?;
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
    let report = json!({"benchmark": "store", "commitRoundTripMs": summary(samples)});
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn overhead(turns: usize, warmup: usize) -> Result<()> {
    // Daemon and scripted server get their own runtime (and threads); the client another, so
    // the measurement does not share a scheduler with what it measures.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let home = tempfile::tempdir()?;
    let (lmx, daemon) = server_rt.block_on(async {
        let lmx = ScriptedLmx::start().await?;
        let mut config = DaemonConfig::new(home.path());
        config.port = 0;
        config.lmx_url = lmx.url();
        config.token = Some("bench-token".into());
        let daemon = RunningDaemon::start(config).await?;
        anyhow::Ok((lmx, daemon))
    })?;
    let base = format!("http://{}", daemon.addr());
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = client_rt
        .block_on(measure(&base, &lmx.url(), turns, warmup))
        .map(|mut report| {
            // With a warm preflight cache the whole run costs one model-list request.
            report["lmxModelListRequests"] = json!(lmx.model_list_requests());
            report
        });
    server_rt.block_on(daemon.shutdown())?;
    drop(lmx);
    let report = result?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

async fn measure(base: &str, lmx_url: &str, turns: usize, warmup: usize) -> Result<Value> {
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let created: Value = http
        .post(format!("{base}/v3/sessions"))
        .bearer_auth("bench-token")
        .json(&json!({"sessionId": "bench"}))
        .send()
        .await?
        .json()
        .await?;
    let session = created["sessionId"]
        .as_str()
        .context("session id")?
        .to_owned();
    let ws_url = format!(
        "{}/v3/ws?sessionId={session}&afterSeq=1&token=bench-token",
        base.replacen("http://", "ws://", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await?;
    let submit_url = format!("{base}/v3/sessions/{session}/turns");
    let mut first_token = Vec::with_capacity(turns);
    let mut done = Vec::with_capacity(turns);
    for i in 0..warmup + turns {
        let start = Instant::now();
        let resp = http
            .post(&submit_url)
            .bearer_auth("bench-token")
            .json(&json!({"clientId": "bench", "writerId": "bench", "content": "ping", "mode": "chat"}))
            .send()
            .await?;
        if resp.status().as_u16() != 202 {
            bail!("submit answered {}", resp.status());
        }
        let turn_id = resp.json::<Value>().await?["turnId"]
            .as_str()
            .context("turnId")?
            .to_owned();
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
        "submitToFirstTokenMs": summary(first_token),
        "submitToDoneMs": summary(done),
        "lmxTimeToFirstByteMs": summary(lmx_first_byte),
        "firstTokenP50OverLmxFirstByteP50": (ratio * 100.0).round() / 100.0,
    }))
}
