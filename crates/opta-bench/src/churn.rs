//! `churn`: many rounds of a session's whole life with clients that misbehave (vanish
//! mid-turn, send bad input), reporting the daemon's memory, file descriptors and threads
//! after a warm-up and at the end, and what it still holds: leaks show as growth. Then the
//! memory one idle resident session costs (1000 created, RSS growth per session).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::target::{LocalDaemon, Target, TargetArgs, status_field};

pub(crate) fn churn(args: &TargetArgs, rounds: usize, warmup: usize) -> Result<()> {
    let target = Target::open(args, LocalDaemon::default())?;
    let result = target.block_on(async {
        for i in 0..warmup {
            churn_round(&target, i).await?;
        }
        settle(&target).await?;
        let before = resources(target.pid);
        let started = Instant::now();
        for i in 0..rounds {
            churn_round(&target, i).await?;
        }
        let elapsed = started.elapsed();
        let held = settle(&target).await?;
        let at_end = resources(target.pid);
        let resident = resident_session_cost(&target, 1000).await?;
        anyhow::Ok(json!({
            "benchmark": "churn",
            "rounds": rounds,
            "warmup": warmup,
            "roundMeanMs": (elapsed.as_secs_f64() * 1000.0 / rounds.max(1) as f64 * 1000.0).round() / 1000.0,
            "daemonAfterWarmup": before,
            "daemonAtEnd": at_end,
            "daemonHoldsAtEnd": held,
            "residentSessionKib": resident,
        }))
    });
    target.stop()?;
    println!("{}", serde_json::to_string_pretty(&result?)?);
    Ok(())
}

/// The daemon's resident memory (KiB), open file descriptors and threads (null when its
/// process is unknown).
fn resources(pid: Option<u32>) -> Value {
    let Some(pid) = pid else {
        return Value::Null;
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    json!({"rssKib": status_field(pid, "VmRSS:"), "fds": fds,
           "threads": status_field(pid, "Threads:")})
}

/// Memory each idle resident session costs: RSS growth over creating `n` sessions (each
/// with its actor), in KiB per session (null when the daemon's process is unknown). The
/// sessions are deleted afterwards.
async fn resident_session_cost(target: &Target, n: usize) -> Result<Option<f64>> {
    let Some(before) = target.rss_kib() else {
        return Ok(None);
    };
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(target.api.create_session(json!({})).await?);
    }
    let per_session = (target.require_rss_kib()? - before) / n as f64;
    for id in ids {
        target.api.delete_session(&id).await?;
    }
    Ok(Some((per_session * 10.0).round() / 10.0))
}

/// Waits (bounded) until the daemon holds no session, subscriber or turn; returns its runtime.
async fn settle(target: &Target) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let runtime = target.api.runtime().await?;
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

/// One session's life: WS and SSE subscribers, bad input, a turn; odd rounds let it finish
/// and close politely, even rounds drop both subscribers mid-turn and delete the session
/// under the running turn.
async fn churn_round(target: &Target, round: usize) -> Result<()> {
    let api = &target.api;
    let (session, mut ws) = api.subscribed_session(json!({})).await?;
    let mut sse = api
        .request(
            reqwest::Method::GET,
            &format!("/v3/sse/events?sessionId={session}"),
        )
        .send()
        .await?
        .bytes_stream();
    sse.next().await.context("sse opened")??;
    ws.send(Message::Text("not json".into())).await?;
    let bad = api
        .request(
            reqwest::Method::POST,
            &format!("/v3/sessions/{session}/turns"),
        )
        .json(&json!({"clientId": "churn", "writerId": "churn", "content": "x", "mode": "sing"}))
        .send()
        .await?;
    if bad.status().as_u16() != 400 {
        bail!("bad input answered {}", bad.status());
    }
    api.submit(&session, "a few words to echo").await?;
    let polite = round % 2 == 1;
    loop {
        let msg = api.next_message(&mut ws).await?;
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
    let deleted = api.delete_session(&session).await?;
    if deleted != 204 {
        bail!("delete answered {deleted}");
    }
    Ok(())
}
