//! Benchmarks over big stored state, seeded straight through the store (not through a quarter
//! of a million turns): `replay` (the last 10 events and the whole log of one session) and
//! `startup` (the real `opta` binary started on a home with many stored sessions).

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use opta_daemon::store::{SessionRow, Store, StoreOptions, WriteOp};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::load::thread_cpu;
use crate::{Rig, TOKEN, connect_ws, summary};

const SESSION: &str = "replay";
/// Rows per seeding transaction.
const SEED_BATCH: u64 = 20_000;

fn session_row(id: &str) -> SessionRow {
    let now = "2026-12-01T00:00:00.000Z".to_owned();
    SessionRow {
        id: id.to_owned(),
        model: "default".into(),
        title: Some(format!("seeded {id}")),
        metadata: None,
        created_at: now.clone(),
        updated_at: now,
        tool_call_count: 0,
        grants: None,
    }
}

/// Opens the store a daemon on `home` would use.
fn open_store(home: &Path) -> Result<Store> {
    let dir = opta_daemon::daemon::daemon_dir(home);
    std::fs::create_dir_all(&dir)?;
    Ok(Store::open(&dir.join("opta.db"), StoreOptions::default())?)
}

/// One session with `events` durable events (progress notes: never swept).
async fn seed_events(home: &Path, events: u64) -> Result<()> {
    let store = open_store(home)?;
    store
        .write(vec![WriteOp::InsertSession(session_row(SESSION))])
        .await?;
    let session: Arc<str> = Arc::from(SESSION);
    let mut seq = 0;
    while seq < events {
        let batch = (events - seq).min(SEED_BATCH);
        let ops = (seq + 1..=seq + batch)
            .map(|n| WriteOp::AppendEvent {
                session_id: session.clone(),
                seq: n,
                event: "turn.progress",
                turn_id: None,
                envelope: format!(
                    r#"{{"v":"3","event":"turn.progress","daemonId":"daemon_seeded0","sessionId":"{SESSION}","seq":{n},"ts":"2026-12-01T00:00:00.000Z","payload":{{"turnId":"turn_seeded","message":"seeded event {n} of a long session's log"}}}}"#
                )
                .into(),
            })
            .collect();
        store.write(ops).await?;
        seq += batch;
    }
    store.shutdown().await?;
    Ok(())
}

/// `replay`: per log size, `afterSeq=last-10` over WebSocket (connect → the 10th event) and
/// over the events route, then the whole log over WebSocket.
pub(crate) fn replay(sizes: &[u64], repeats: usize) -> Result<()> {
    for &events in sizes {
        let home = tempfile::tempdir()?;
        let seeding = Instant::now();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(seed_events(home.path(), events))?;
        let seeded = seeding.elapsed();
        let rig = Rig::start_in(home, StoreOptions::default(), |_| {})?;
        let mut report = rig
            .client_rt
            .block_on(replay_run(&rig.base, events, repeats))?;
        report["seedSecs"] = json!((seeded.as_secs_f64() * 10.0).round() / 10.0);
        println!("{}", serde_json::to_string(&report)?);
        rig.stop()?;
    }
    Ok(())
}

/// Reads `count` envelopes from `ws`; the last seq read.
async fn read_events(ws: &mut crate::WsStream, count: u64) -> Result<u64> {
    let mut read = 0;
    let mut last = 0;
    while read < count {
        match ws.next().await.context("the replay ended early")?? {
            Message::Text(text) => {
                if let Some(at) = text.as_str().find("\"seq\":") {
                    read += 1;
                    last = text.as_str()[at + 6..]
                        .split(|c: char| !c.is_ascii_digit())
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                }
            }
            Message::Close(frame) => bail!("closed during replay: {frame:?}"),
            _ => {}
        }
    }
    Ok(last)
}

async fn replay_run(base: &str, events: u64, repeats: usize) -> Result<Value> {
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let after = events.saturating_sub(10);
    let warmup = 20;
    let mut ws_last10 = Vec::with_capacity(repeats);
    for i in 0..warmup + repeats {
        let start = Instant::now();
        let mut ws = connect_ws(base, SESSION, after).await?;
        let last = read_events(&mut ws, events - after).await?;
        let took = start.elapsed();
        if last != events {
            bail!("replay ended at seq {last}, not {events}");
        }
        if i >= warmup {
            ws_last10.push(took);
        }
    }
    let mut http_last10 = Vec::with_capacity(repeats);
    for i in 0..warmup + repeats {
        let start = Instant::now();
        let body: Value = http
            .get(format!(
                "{base}/v3/sessions/{SESSION}/events?afterSeq={after}"
            ))
            .bearer_auth(TOKEN)
            .send()
            .await?
            .json()
            .await?;
        let took = start.elapsed();
        let got = body["events"].as_array().map_or(0, Vec::len) as u64;
        if got != events - after {
            bail!("events route gave {got} events, not {}", events - after);
        }
        if i >= warmup {
            http_last10.push(took);
        }
    }
    let cpu = thread_cpu();
    let start = Instant::now();
    let mut ws = connect_ws(base, SESSION, 0).await?;
    let last = read_events(&mut ws, events).await?;
    let full = start.elapsed();
    if last != events {
        bail!("full replay ended at seq {last}");
    }
    Ok(json!({
        "benchmark": "replay",
        "storedEvents": events,
        "wsLast10Ms": summary(ws_last10),
        "httpLast10Ms": summary(http_last10),
        "wsFullReplayMs": (full.as_secs_f64() * 1e6).round() / 1e3,
        "wsFullReplayEventsPerSec": (events as f64 / full.as_secs_f64()).round(),
        "clientCpuFullReplayMs": (thread_cpu() - cpu).as_millis() as u64,
    }))
}

/// `count` stored sessions (no events: start-up must not read them).
async fn seed_sessions(home: &Path, count: u64) -> Result<()> {
    let store = open_store(home)?;
    let mut made = 0;
    while made < count {
        let batch = (count - made).min(SEED_BATCH);
        let ops = (made..made + batch)
            .map(|i| WriteOp::InsertSession(session_row(&format!("seeded-{i}"))))
            .collect();
        store.write(ops).await?;
        made += batch;
    }
    store.shutdown().await?;
    Ok(())
}

/// `startup`: spawn → first `GET /health` 200 of the `opta` binary beside this one.
pub(crate) fn startup(counts: &[u64], repeats: usize) -> Result<()> {
    let opta = std::env::current_exe()?.with_file_name("opta");
    if !opta.exists() {
        bail!(
            "{} not found: build it beside opta-bench (cargo build --release -p opta-cli -p opta-bench)",
            opta.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for &sessions in counts {
        let home = tempfile::tempdir()?;
        runtime.block_on(seed_sessions(home.path(), sessions))?;
        let mut samples = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            samples.push(runtime.block_on(start_once(&opta, home.path()))?);
        }
        let report = json!({
            "benchmark": "startup",
            "storedSessions": sessions,
            "spawnToHealthMs": summary(samples),
        });
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

/// One start of `opta daemon run` on `home`: spawn → `/health` answers; then a clean stop.
async fn start_once(opta: &Path, home: &Path) -> Result<Duration> {
    let state_path = opta_daemon::daemon::daemon_dir(home).join("state.json");
    let _ = std::fs::remove_file(&state_path);
    let http = reqwest::Client::new();
    let start = Instant::now();
    let mut child = tokio::process::Command::new(opta)
        .args([
            "daemon",
            "run",
            "--port",
            "0",
            "--lmx-url",
            "http://127.0.0.1:9",
        ])
        .env("OPTA_HOME", home)
        .env("OPTA_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let deadline = start + Duration::from_secs(30);
    let took = loop {
        if Instant::now() > deadline {
            bail!("the daemon did not answer /health within 30 s");
        }
        let port = std::fs::read(&state_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v["port"].as_u64());
        if let Some(port) = port
            && let Ok(resp) = http
                .get(format!("http://127.0.0.1:{port}/health"))
                .send()
                .await
            && resp.status().is_success()
        {
            break start.elapsed();
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    };
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .context("the daemon did not stop")??;
    Ok(took)
}
