//! Benchmarks over big stored state, seeded straight through the store (not through a quarter
//! of a million turns): `replay` (the last 10 events and the whole log of one session) and
//! `startup` (the real `opta` binary started on a home with many stored sessions).

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use opta_daemon::store::{SessionRow, Store, StoreOptions, WriteOp};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::load::seq_of;
use crate::summary;
use crate::target::{
    Api, LocalDaemon, Target, TargetArgs, WsStream, opta_binary, terminate, thread_cpu,
    wait_for_health,
};

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
        workspace_pin: None,
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
/// over the events route, then the whole log over WebSocket. With `--base`, the stored log of
/// `session` is replayed instead (a running daemon cannot be seeded through its store).
pub(crate) fn replay(
    args: &TargetArgs,
    sizes: &[u64],
    repeats: usize,
    session: Option<&str>,
) -> Result<()> {
    if args.base.is_some() {
        let session = session.context(
            "replay with --base needs --session ID: a session whose stored log it replays \
             (seeding a million events through turns would take hours)",
        )?;
        let target = Target::open(args, LocalDaemon::default())?;
        let report = target.block_on(replay_run(&target, session, repeats))?;
        println!("{}", serde_json::to_string(&report)?);
        return target.stop();
    }
    for &events in sizes {
        let home = tempfile::tempdir()?;
        let seeding = Instant::now();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(seed_events(home.path(), events))?;
        let seeded = seeding.elapsed();
        let target = Target::open(
            args,
            LocalDaemon {
                home: Some(home),
                ..LocalDaemon::default()
            },
        )?;
        let mut report = target.block_on(replay_run(&target, SESSION, repeats))?;
        report["seedSecs"] = json!((seeded.as_secs_f64() * 10.0).round() / 10.0);
        println!("{}", serde_json::to_string(&report)?);
        target.stop()?;
    }
    Ok(())
}

/// Reads envelopes from `ws` until the one with seq `last`; how many were read.
async fn read_until(api: &Api, ws: &mut WsStream, last: u64) -> Result<u64> {
    let mut read = 0;
    loop {
        match api
            .next_message(ws)
            .await
            .context("the replay ended early")?
        {
            Message::Text(text) => {
                if let Some(seq) = seq_of(text.as_str()) {
                    read += 1;
                    if seq >= last {
                        if seq > last {
                            bail!("the replay went past seq {last} to {seq}");
                        }
                        return Ok(read);
                    }
                }
            }
            Message::Close(frame) => bail!("closed during replay: {frame:?}"),
            _ => {}
        }
    }
}

async fn replay_run(target: &Target, session: &str, repeats: usize) -> Result<Value> {
    let api = &target.api;
    let last = api.last_seq(session).await?;
    let after = last.saturating_sub(10);
    let warmup = 20;
    let mut ws_last10 = Vec::with_capacity(repeats);
    let mut tail = 0;
    for i in 0..warmup + repeats {
        let start = Instant::now();
        let mut ws = api.connect_ws(session, after).await?;
        tail = read_until(api, &mut ws, last).await?;
        if i >= warmup {
            ws_last10.push(start.elapsed());
        }
    }
    let mut http_last10 = Vec::with_capacity(repeats);
    for i in 0..warmup + repeats {
        let start = Instant::now();
        let body: Value = api
            .request(
                reqwest::Method::GET,
                &format!("/v3/sessions/{session}/events?afterSeq={after}"),
            )
            .send()
            .await?
            .json()
            .await?;
        let took = start.elapsed();
        let got = body["events"].as_array().map_or(0, Vec::len) as u64;
        if got != tail {
            bail!("the events route gave {got} events after {after}, the WebSocket {tail}");
        }
        if i >= warmup {
            http_last10.push(took);
        }
    }
    let cpu = thread_cpu();
    let start = Instant::now();
    let mut ws = api.connect_ws(session, 0).await?;
    let events = read_until(api, &mut ws, last).await?;
    let full = start.elapsed();
    Ok(json!({
        "benchmark": "replay",
        "storedEvents": events,
        "lastSeq": last,
        "tailEvents": tail,
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
pub(crate) fn startup(args: &TargetArgs, counts: &[u64], repeats: usize) -> Result<()> {
    if args.base.is_some() {
        bail!("startup spawns the daemon itself: it has no --base mode");
    }
    let opta = opta_binary()?;
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
    let start = Instant::now();
    let mut child = std::process::Command::new(opta)
        .args([
            "daemon",
            "run",
            "--port",
            "0",
            "--lmx-url",
            "http://127.0.0.1:9",
        ])
        .env("OPTA_HOME", home)
        .env("OPTA_TOKEN", "bench-token")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let answered = wait_for_health(home, start + Duration::from_secs(30)).await;
    let took = start.elapsed();
    terminate(&mut child)?;
    answered?;
    Ok(took)
}
