//! `memory`: the daemon's RSS idle, after many sessions that each had a WebSocket subscriber
//! and a turn (the subscribers closed), after those sessions were evicted, and per idle
//! subscriber on one session, with another session's submit → done latency (a probe) before
//! and while they are connected.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::summary;
use crate::target::{Api, LocalDaemon, Target, TargetArgs, WsStream};

/// Idle sessions leave a local daemon's memory after this long (the scan runs every second).
const LOCAL_IDLE_SECS: u64 = 5;

/// How long after the last eviction RSS is read.
const AFTER_EVICTION: Duration = Duration::from_secs(3);

/// The memory benchmark's shape.
pub(crate) struct MemoryShape {
    pub sessions: usize,
    pub subscribers: usize,
    /// How long to wait for the sessions' eviction (a running daemon evicts on its own
    /// schedule).
    pub eviction_wait: Duration,
}

pub(crate) fn memory(args: &TargetArgs, shape: &MemoryShape) -> Result<()> {
    let target = Target::open(
        args,
        LocalDaemon {
            eviction: Some((LOCAL_IDLE_SECS, 1)),
            ..LocalDaemon::default()
        },
    )?;
    target.require_rss_kib()?;
    let result = target.block_on(measure(&target, shape));
    target.stop()?;
    println!("{}", serde_json::to_string_pretty(&result?)?);
    Ok(())
}

/// Reads `ws` until a `turn.done`.
async fn until_done(api: &Api, ws: &mut WsStream) -> Result<()> {
    loop {
        let Message::Text(text) = api.next_message(ws).await? else {
            continue;
        };
        if text.as_str().contains("\"event\":\"turn.done\"") {
            return Ok(());
        }
    }
}

/// Submit → done of `n` turns on `session` watched through `ws`.
async fn probe(target: &Target, session: &str, ws: &mut WsStream, n: usize) -> Result<Value> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        target.api.submit(session, "probe").await?;
        until_done(&target.api, ws).await?;
        samples.push(start.elapsed());
    }
    Ok(summary(samples))
}

/// Polls the daemon's runtime metrics until `done` holds of them or `wait` passes.
async fn wait_for(target: &Target, wait: Duration, done: impl Fn(&Value) -> bool) -> Result<bool> {
    let deadline = Instant::now() + wait;
    loop {
        if done(&target.api.runtime().await?) {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn measure(target: &Target, shape: &MemoryShape) -> Result<Value> {
    let api = &target.api;
    let idle = target.require_rss_kib()?;
    let mut ids = Vec::with_capacity(shape.sessions);
    for _ in 0..shape.sessions {
        let (session, mut ws) = api.subscribed_session(json!({})).await?;
        api.submit(&session, "eight words to echo back in this turn")
            .await?;
        until_done(api, &mut ws).await?;
        ws.close(None).await?;
        ids.push(session);
    }
    // Subscribers gone (their channels with them), sessions still resident.
    if !wait_for(target, Duration::from_secs(10), |r| {
        r["subscriberCount"] == 0
    })
    .await?
    {
        bail!("subscribers did not close");
    }
    let resident = api.runtime().await?["sessionCount"].clone();
    let after_turns = target.require_rss_kib()?;
    let evicted = wait_for(target, shape.eviction_wait, |r| r["sessionCount"] == 0).await?;
    // The daemon hands freed memory back shortly after an eviction (this one a second later).
    tokio::time::sleep(AFTER_EVICTION).await;
    let after_eviction = target.require_rss_kib()?;
    for id in &ids {
        api.delete_session(id).await?;
    }
    // Idle subscribers on one session, and a probe's turns on another, timed before and
    // while they are connected: idle connections must cost neither memory nor time.
    let (probe_session, mut probe_ws) = api.subscribed_session(json!({})).await?;
    let probe_alone = probe(target, &probe_session, &mut probe_ws, 100).await?;
    let session = api.create_session(json!({})).await?;
    let before_subscribers = target.require_rss_kib()?;
    let mut open = Vec::with_capacity(shape.subscribers);
    for _ in 0..shape.subscribers {
        open.push(api.connect_ws(&session, 0).await?);
    }
    // Every one is past its replay and waiting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with_subscribers = target.require_rss_kib()?;
    let probe_with = probe(target, &probe_session, &mut probe_ws, 100).await?;
    for mut ws in open {
        let _ = ws.close(None).await;
    }
    api.delete_session(&session).await?;
    api.delete_session(&probe_session).await?;
    let mib = |kib: f64| (kib / 1024.0 * 10.0).round() / 10.0;
    let per = |kib: f64, n: usize| (kib / n.max(1) as f64 * 10.0).round() / 10.0;
    Ok(json!({
        "benchmark": "memory",
        "note": "RSS of the daemon's process; after eviction: 3 s after the last session left",
        "sessions": shape.sessions,
        "residentAfterTurns": resident,
        "rssIdleMib": mib(idle),
        "rssAfterSubscribedTurnsMib": mib(after_turns),
        "perSessionAfterTurnsKib": per(after_turns - idle, shape.sessions),
        "evicted": evicted,
        "rssAfterEvictionMib": evicted.then(|| mib(after_eviction)),
        "subscribers": shape.subscribers,
        "perIdleSubscriberKib": per(with_subscribers - before_subscribers, shape.subscribers),
        "probeSubmitToDoneMs": {"alone": probe_alone, "withIdleSubscribers": probe_with},
    }))
}
