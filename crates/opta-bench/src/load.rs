//! Load shapes clients really make: many subscribers on one turn (`fanout`, with or without a
//! subscriber that stops reading) and many sessions each running a turn at once
//! (`concurrent`). Every subscriber checks it saw every seq once, in order.

use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::StreamExt;
use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::summary;
use crate::target::{Api, LocalDaemon, Target, TargetArgs, WsStream, own_cpu, thread_cpu, words};

/// The `seq` of an envelope, read without parsing the whole JSON (the client must not be the
/// bottleneck: a fan-out run delivers millions of frames).
pub(crate) fn seq_of(frame: &str) -> Option<u64> {
    let at = frame.find("\"seq\":")? + 6;
    let digits = frame[at..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .fold(0u64, |n, b| n * 10 + u64::from(b - b'0'));
    Some(digits)
}

/// What one subscriber saw of a turn.
struct Watched {
    frames: u64,
    in_order: bool,
    done_at: Option<Instant>,
    last_seq: u64,
    closed_early: bool,
}

/// Reads `ws` until the `turn.done` of the turn, checking seqs follow `after` one by one.
async fn watch_turn(mut ws: WsStream, after: u64) -> Watched {
    let mut seen = Watched {
        frames: 0,
        in_order: true,
        done_at: None,
        last_seq: after,
        closed_early: false,
    };
    let deadline = tokio::time::Instant::now() + WATCH_LIMIT;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, ws.next()).await {
        let Ok(Message::Text(text)) = message else {
            if matches!(message, Ok(Message::Close(_)) | Err(_)) {
                seen.closed_early = true;
                break;
            }
            continue;
        };
        let Some(seq) = seq_of(text.as_str()) else {
            continue; // acks and error frames
        };
        seen.frames += 1;
        if seq != seen.last_seq + 1 {
            seen.in_order = false;
        }
        seen.last_seq = seq;
        if text.as_str().contains("\"event\":\"turn.done\"") {
            seen.done_at = Some(Instant::now());
            break;
        }
        if text.as_str().contains("\"event\":\"turn.error\"") {
            break;
        }
    }
    seen
}

/// What every watcher saw, and the time from `start` until the last saw its `turn.done`
/// (until now, if some never did).
async fn gather(
    watchers: Vec<tokio::task::JoinHandle<Watched>>,
    start: Instant,
) -> Result<(Vec<Watched>, Duration)> {
    let seen: Vec<Watched> = join_all(watchers)
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let last_done = seen.iter().filter_map(|w| w.done_at).max();
    let complete = seen.iter().all(|w| w.done_at.is_some());
    let elapsed = match last_done {
        Some(t) if complete => t - start,
        _ => start.elapsed(),
    };
    Ok((seen, elapsed))
}

/// What the daemon and this process spent during a run.
struct CpuMark {
    client: std::time::Duration,
    own: std::time::Duration,
    daemon: std::time::Duration,
}

impl CpuMark {
    fn now(target: &Target) -> Self {
        Self {
            client: thread_cpu(),
            own: own_cpu(),
            daemon: target.cpu(),
        }
    }

    /// CPU used since the mark: the daemon's (0 when its process is unknown), the client
    /// thread's, and this whole process's (client plus a local target's scripted server).
    fn report(&self, target: &Target, into: &mut Value) {
        into["daemonCpuMs"] = json!(target.cpu().saturating_sub(self.daemon).as_millis() as u64);
        into["clientCpuMs"] = json!(thread_cpu().saturating_sub(self.client).as_millis() as u64);
        into["benchProcessCpuMs"] = json!(own_cpu().saturating_sub(self.own).as_millis() as u64);
    }
}

/// One fan-out run: `subscribers` readers (and, with `stalled`, one that never reads) on one
/// session while a turn of `tokens` tokens streams.
async fn fanout_run(
    target: &Target,
    subscribers: usize,
    tokens: usize,
    stalled: Option<Duration>,
) -> Result<Value> {
    let api = &target.api;
    let session = api.create_session(json!({})).await?;
    let after = api.last_seq(&session).await?;
    let mut sockets = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        sockets.push(api.connect_ws(&session, after).await?);
    }
    let stuck = match stalled {
        Some(stall) => Some((api.connect_ws_small_buffer(&session, after).await?, stall)),
        None => None,
    };
    let content = words(tokens);
    let cpu = CpuMark::now(target);
    let start = Instant::now();
    let watchers: Vec<_> = sockets
        .into_iter()
        .map(|ws| tokio::spawn(watch_turn(ws, after)))
        .collect();
    api.submit(&session, &content).await?;
    let (seen, all_done) = gather(watchers, start).await?;
    let frames: u64 = seen.iter().map(|w| w.frames).sum();
    let complete = seen
        .iter()
        .all(|w| w.in_order && w.done_at.is_some() && !w.closed_early);
    let elapsed = all_done;
    let mut report = json!({
        "subscribers": subscribers,
        "tokens": tokens,
        "eventsPerSubscriber": seen.first().map(|w| w.frames),
        "allSawDoneMs": (elapsed.as_secs_f64() * 1e6).round() / 1e3,
        "deliveries": frames,
        "deliveriesPerSec": (frames as f64 / elapsed.as_secs_f64()).round(),
        // Deltas that reach the daemon together go out as one event: the text delivered is
        // the measure that does not depend on how it was framed.
        "tokenDeliveriesPerSec": ((subscribers * tokens) as f64 / elapsed.as_secs_f64()).round(),
        "everySeqOnceInOrder": complete,
        "subscribersCutOff": seen.iter().filter(|w| w.closed_early).count(),
    });
    cpu.report(target, &mut report);
    if let Some((stuck, stall)) = stuck {
        report["stalled"] = stalled_outcome(stuck, api, &session, after, stall).await?;
    }
    api.delete_session(&session).await?;
    Ok(report)
}

/// What became of the subscriber that never read: it should have been disconnected (close
/// 4008) and be able to resume from where it was.
async fn stalled_outcome(
    mut stuck: WsStream,
    api: &Api,
    session: &str,
    after: u64,
    stall: Duration,
) -> Result<Value> {
    // Read what was buffered for it before the daemon cut it off (or everything, when the
    // socket buffers held the whole turn).
    // The daemon gives a write that makes no progress 30 s before it drops the connection.
    tokio::time::sleep(stall).await;
    let mut last = after;
    let mut close_code = None;
    let mut saw_done = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !saw_done {
        match tokio::time::timeout(Duration::from_secs(2), stuck.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                if let Some(seq) = seq_of(text.as_str()) {
                    last = seq;
                    saw_done = text.as_str().contains("\"event\":\"turn.done\"");
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                close_code = frame.map(|f| u16::from(f.code));
                break;
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) | Err(_) => break,
        }
    }
    let resumed = if saw_done {
        None
    } else {
        let ws = api.connect_ws(session, last).await?;
        let watched = watch_turn(ws, last).await;
        Some(watched.in_order && watched.done_at.is_some())
    };
    Ok(json!({
        "cutOff": !saw_done,
        "closeCode": close_code,
        "readBeforeCut": last - after,
        "heldWholeTurnInSocketBuffers": saw_done,
        "resumedInOrderToDone": resumed,
    }))
}

/// Longest a subscriber waits for its turn to end.
const WATCH_LIMIT: Duration = Duration::from_secs(120);

/// `fanout`: each subscriber count × each turn length, one JSON line per run.
pub(crate) fn fanout(args: &TargetArgs, subscribers: &[usize], tokens: &[usize]) -> Result<()> {
    let target = Target::open(args, LocalDaemon::default())?;
    for &n in subscribers {
        for &t in tokens {
            let mut report = target.block_on(fanout_run(&target, n, t, None))?;
            report["benchmark"] = json!("fanout");
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    target.stop()
}

/// `slow-consumer`: the same fan-out without and then with one subscriber that stops
/// reading; the others' time should stay within 10 %.
pub(crate) fn slow_consumer(
    args: &TargetArgs,
    subscribers: usize,
    tokens: usize,
    stall: Duration,
) -> Result<()> {
    let target = Target::open(args, LocalDaemon::default())?;
    // A warm-up run first: the first run on a fresh daemon pays for its caches.
    target.block_on(fanout_run(&target, subscribers, tokens / 10, None))?;
    let without = target.block_on(fanout_run(&target, subscribers, tokens, None))?;
    let with = target.block_on(fanout_run(&target, subscribers, tokens, Some(stall)))?;
    let ms = |r: &Value| r["allSawDoneMs"].as_f64().unwrap_or(f64::NAN);
    let report = json!({
        "benchmark": "slow-consumer",
        "withoutStalledMs": ms(&without),
        "withStalledMs": ms(&with),
        "ratio": ((ms(&with) / ms(&without)) * 1000.0).round() / 1000.0,
        "without": without,
        "with": with,
    });
    println!("{}", serde_json::to_string(&report)?);
    target.stop()
}

/// `concurrent`: `sessions` sessions, each with a WebSocket subscriber, each sent one turn
/// at once; turns per second until the last `turn.done`, and each turn's submit → done.
pub(crate) fn concurrent(args: &TargetArgs, counts: &[usize], tokens: usize) -> Result<()> {
    let target = Target::open(args, LocalDaemon::default())?;
    for &sessions in counts {
        let report = target.block_on(concurrent_run(&target, sessions, tokens))?;
        println!("{}", serde_json::to_string(&report)?);
    }
    target.stop()
}

async fn concurrent_run(target: &Target, sessions: usize, tokens: usize) -> Result<Value> {
    let api = &target.api;
    let mut ids = Vec::with_capacity(sessions);
    let mut sockets = Vec::with_capacity(sessions);
    for _ in 0..sessions {
        let id = api.create_session(json!({})).await?;
        let after = api.last_seq(&id).await?;
        sockets.push((api.connect_ws(&id, after).await?, after));
        ids.push(id);
    }
    let content = words(tokens);
    let cpu = CpuMark::now(target);
    let start = Instant::now();
    let watchers: Vec<_> = sockets
        .into_iter()
        .map(|(ws, after)| tokio::spawn(watch_turn(ws, after)))
        .collect();
    let submits = join_all(ids.iter().map(|id| api.submit(id, &content))).await;
    let submitted = start.elapsed();
    let failed_submits = submits.iter().filter(|r| r.is_err()).count();
    let (seen, elapsed) = gather(watchers, start).await?;
    let per_turn: Vec<Duration> = seen
        .iter()
        .filter_map(|w| w.done_at)
        .map(|t| t - start)
        .collect();
    let completed = per_turn.len();
    let mut report = json!({
        "benchmark": "concurrent",
        "sessions": sessions,
        "tokensPerTurn": tokens,
        "completed": completed,
        "failedSubmits": failed_submits,
        "allSubmittedMs": (submitted.as_secs_f64() * 1e6).round() / 1e3,
        "allDoneMs": (elapsed.as_secs_f64() * 1e6).round() / 1e3,
        "turnsPerSec": (completed as f64 / elapsed.as_secs_f64()).round(),
        "submitToDoneMs": summary(per_turn),
        "everySeqOnceInOrder": seen.iter().all(|w| w.in_order && !w.closed_early),
    });
    cpu.report(target, &mut report);
    for id in &ids {
        api.delete_session(id).await?;
    }
    Ok(report)
}
