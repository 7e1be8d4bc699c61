//! Load shapes clients really make: many subscribers on one turn (`fanout`, with or without a
//! subscriber that stops reading) and many sessions each running a turn at once
//! (`concurrent`). Every subscriber checks it saw every seq once, in order.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use futures_util::future::join_all;
use opta_daemon::store::StoreOptions;
use opta_test_support::Reply;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::{Rig, TOKEN, WsStream, connect_ws, create_session, summary};

/// CPU time this thread has used (the client runtime runs on it), from the scheduler's
/// nanosecond counter.
pub(crate) fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// CPU time of the whole process (daemon, scripted server and client).
pub(crate) fn process_cpu() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
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

/// The `seq` of an envelope, read without parsing the whole JSON (the client must not be the
/// bottleneck: a fan-out run delivers millions of frames).
fn seq_of(frame: &str) -> Option<u64> {
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

/// `POST /v3/sessions/:id/turns`; fails unless 202.
async fn submit(http: &reqwest::Client, base: &str, session: &str) -> Result<()> {
    let resp = http
        .post(format!("{base}/v3/sessions/{session}/turns"))
        .bearer_auth(TOKEN)
        .json(&json!({"clientId": "bench", "writerId": "bench", "content": "go", "mode": "chat"}))
        .send()
        .await?;
    if resp.status().as_u16() != 202 {
        bail!("submit answered {}", resp.status());
    }
    Ok(())
}

/// The session's current seq.
async fn last_seq(http: &reqwest::Client, base: &str, session: &str) -> Result<u64> {
    let detail: Value = http
        .get(format!("{base}/v3/sessions/{session}"))
        .bearer_auth(TOKEN)
        .send()
        .await?
        .json()
        .await?;
    detail["lastSeq"].as_u64().context("lastSeq")
}

/// One fan-out run: `subscribers` readers (and, with `stalled`, one that never reads) on one
/// session while a turn of `tokens` tokens streams.
async fn fanout_run(
    rig: &Rig,
    subscribers: usize,
    tokens: usize,
    stalled: Option<Duration>,
) -> Result<Value> {
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let base = &rig.base;
    let session = create_session(&http, base, json!({})).await?;
    let after = last_seq(&http, base, &session).await?;
    let mut sockets = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        sockets.push(connect_ws(base, &session, after).await?);
    }
    let stuck = match stalled {
        Some(stall) => Some((connect_stalled(base, &session, after).await?, stall)),
        None => None,
    };
    rig.lmx
        .push(Reply::chunks((0..tokens).map(|i| format!("t{i} "))));
    let cpu = thread_cpu();
    let process = process_cpu();
    let start = Instant::now();
    let watchers: Vec<_> = sockets
        .into_iter()
        .map(|ws| tokio::spawn(watch_turn(ws, after)))
        .collect();
    submit(&http, base, &session).await?;
    let (seen, all_done) = gather(watchers, start).await?;
    let client_cpu = thread_cpu() - cpu;
    let process_cpu = process_cpu() - process;
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
        "clientCpuMs": client_cpu.as_millis() as u64,
        "processCpuMs": process_cpu.as_millis() as u64,
    });
    if let Some((stuck, stall)) = stuck {
        report["stalled"] = stalled_outcome(stuck, base, &session, after, stall).await?;
    }
    Ok(report)
}

/// A subscriber with a tiny receive buffer (4 KiB, as a slow link would keep it): once it
/// stops reading, the daemon's writes to it stall within a few frames.
async fn connect_stalled(base: &str, session: &str, after: u64) -> Result<WsStream> {
    let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse()?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4 * 1024)?;
    let stream = socket.connect(addr).await?;
    let url = format!("ws://{addr}/v3/ws?sessionId={session}&afterSeq={after}&token={TOKEN}");
    let (ws, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await?;
    Ok(ws)
}

/// What became of the subscriber that never read: it should have been disconnected (close
/// 4008) and be able to resume from where it was.
async fn stalled_outcome(
    mut stuck: WsStream,
    base: &str,
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
        let ws = connect_ws(base, session, last).await?;
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
pub(crate) fn fanout(subscribers: &[usize], tokens: &[usize]) -> Result<()> {
    let rig = Rig::start(StoreOptions::default())?;
    for &n in subscribers {
        for &t in tokens {
            let mut report = rig.client_rt.block_on(fanout_run(&rig, n, t, None))?;
            report["benchmark"] = json!("fanout");
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    rig.stop()
}

/// `slow-consumer`: the same fan-out without and then with one subscriber that stops
/// reading; the others' time should stay within 10 %.
pub(crate) fn slow_consumer(subscribers: usize, tokens: usize, stall: Duration) -> Result<()> {
    let rig = Rig::start(StoreOptions::default())?;
    // A warm-up run first: the first run on a fresh daemon pays for its caches.
    rig.client_rt
        .block_on(fanout_run(&rig, subscribers, tokens / 10, None))?;
    let without = rig
        .client_rt
        .block_on(fanout_run(&rig, subscribers, tokens, None))?;
    let with = rig
        .client_rt
        .block_on(fanout_run(&rig, subscribers, tokens, Some(stall)))?;
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
    rig.stop()
}

/// `concurrent`: `sessions` sessions, each with a WebSocket subscriber, each sent one turn
/// at once; turns per second until the last `turn.done`, and each turn's submit → done.
pub(crate) fn concurrent(counts: &[usize], tokens: usize) -> Result<()> {
    let rig = Rig::start(StoreOptions::default())?;
    for &sessions in counts {
        let report = rig
            .client_rt
            .block_on(concurrent_run(&rig, sessions, tokens))?;
        println!("{}", serde_json::to_string(&report)?);
    }
    rig.stop()
}

async fn concurrent_run(rig: &Rig, sessions: usize, tokens: usize) -> Result<Value> {
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let base = &rig.base;
    let mut ids = Vec::with_capacity(sessions);
    let mut sockets = Vec::with_capacity(sessions);
    for _ in 0..sessions {
        let id = create_session(&http, base, json!({})).await?;
        sockets.push(connect_ws(base, &id, 1).await?);
        ids.push(id);
    }
    for _ in 0..sessions {
        rig.lmx
            .push(Reply::chunks((0..tokens).map(|i| format!("t{i} "))));
    }
    let cpu = thread_cpu();
    let process = process_cpu();
    let start = Instant::now();
    let watchers: Vec<_> = sockets
        .into_iter()
        .map(|ws| tokio::spawn(watch_turn(ws, 1)))
        .collect();
    let submits = join_all(ids.iter().map(|id| submit(&http, base, id))).await;
    let submitted = start.elapsed();
    let failed_submits = submits.iter().filter(|r| r.is_err()).count();
    let (seen, elapsed) = gather(watchers, start).await?;
    let per_turn: Vec<Duration> = seen
        .iter()
        .filter_map(|w| w.done_at)
        .map(|t| t - start)
        .collect();
    let completed = per_turn.len();
    Ok(json!({
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
        "clientCpuMs": (thread_cpu() - cpu).as_millis() as u64,
        "processCpuMs": (process_cpu() - process).as_millis() as u64,
    }))
}
