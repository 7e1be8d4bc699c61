//! `soak`: sessions × subscribers, one turn per session per second, for a given duration:
//! every event's delivery latency (the envelope's `ts` stamped by the daemon → the moment a
//! subscriber read it), errors of every kind, and the daemon's RSS after a warm-up and at
//! the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use futures_util::StreamExt;
use futures_util::future::join_all;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::load::seq_of;
use crate::target::{LocalDaemon, Target, TargetArgs, WsStream, own_cpu, thread_cpu, words};

/// The soak's shape.
pub(crate) struct SoakShape {
    pub sessions: usize,
    pub subscribers: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub tokens: usize,
}

/// Delivery latencies in whole milliseconds (the envelope's `ts` has millisecond
/// resolution); the last bucket holds everything at or above it.
struct Histogram {
    buckets: Vec<AtomicU64>,
}

const HISTOGRAM_MS: usize = 5000;

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: (0..=HISTOGRAM_MS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn record(&self, ms: u64) {
        let bucket = usize::try_from(ms)
            .unwrap_or(HISTOGRAM_MS)
            .min(HISTOGRAM_MS);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The smallest bucket at or below which `q` of the samples lie.
    fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let wanted = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (ms, bucket) in self.buckets.iter().enumerate() {
            seen += bucket.load(Ordering::Relaxed);
            if seen >= wanted {
                return Some(ms as u64);
            }
        }
        Some(HISTOGRAM_MS as u64)
    }

    fn max(&self) -> Option<u64> {
        self.buckets
            .iter()
            .rposition(|b| b.load(Ordering::Relaxed) > 0)
            .map(|ms| ms as u64)
    }
}

/// Shared counters of one run.
struct Tally {
    latency: Histogram,
    submit_errors: AtomicUsize,
    turn_errors: AtomicUsize,
    out_of_order: AtomicUsize,
    closed_early: AtomicUsize,
    unfinished: AtomicUsize,
    frames: AtomicU64,
    turns_submitted: AtomicUsize,
    /// `turn.error` codes seen, with how many subscribers saw each.
    error_codes: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
}

/// Milliseconds since midnight UTC.
fn now_ms_of_day() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_millis() % 86_400_000) as u64
}

/// Milliseconds since midnight of an envelope's `"ts":"YYYY-MM-DDTHH:MM:SS.mmmZ"`.
fn ts_ms_of_day(frame: &str) -> Option<u64> {
    let at = frame.find("\"ts\":\"")? + 6;
    let time = frame.get(at + 11..at + 23)?; // HH:MM:SS.mmm
    let num = |range: std::ops::Range<usize>| time.get(range)?.parse::<u64>().ok();
    Some(((num(0..2)? * 60 + num(3..5)?) * 60 + num(6..8)?) * 1000 + num(9..12)?)
}

/// One subscriber: reads until the run is over and it has seen the end of every turn its
/// session was sent, recording each event's delivery latency and checking seq order.
async fn subscriber(
    mut ws: WsStream,
    after: u64,
    submitted: Arc<AtomicUsize>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    tally: Arc<Tally>,
    deadline: tokio::time::Instant,
) {
    let mut last = after;
    let mut ended = 0;
    loop {
        if *stopping.borrow() && ended >= submitted.load(Ordering::Relaxed) {
            return;
        }
        let next = tokio::select! {
            next = tokio::time::timeout_at(deadline, ws.next()) => next,
            // Look again at whether every turn has ended.
            _ = stopping.changed() => continue,
        };
        let frame = match next {
            Err(_) => {
                tally.unfinished.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => {
                tally.closed_early.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(Some(Ok(_))) => continue,
        };
        let frame = frame.as_str();
        let Some(seq) = seq_of(frame) else { continue };
        let received = now_ms_of_day();
        if let Some(stamped) = ts_ms_of_day(frame) {
            tally
                .latency
                .record((received + 86_400_000 - stamped) % 86_400_000);
        }
        tally.frames.fetch_add(1, Ordering::Relaxed);
        if seq != last + 1 {
            tally.out_of_order.fetch_add(1, Ordering::Relaxed);
        }
        last = seq;
        if frame.contains("\"event\":\"turn.done\"") {
            ended += 1;
        } else if frame.contains("\"event\":\"turn.error\"") {
            ended += 1;
            tally.turn_errors.fetch_add(1, Ordering::Relaxed);
            let code = serde_json::from_str::<serde_json::Value>(frame)
                .ok()
                .and_then(|v| v["payload"]["code"].as_str().map(str::to_owned))
                .unwrap_or_default();
            if let Ok(mut codes) = tally.error_codes.lock() {
                *codes.entry(code).or_default() += 1;
            }
        }
    }
}

/// One session's driver: a turn every second (starting at `offset`) until `end`.
async fn driver(
    api: Arc<crate::target::Api>,
    session: String,
    offset: Duration,
    end: Instant,
    content: Arc<str>,
    submitted: Arc<AtomicUsize>,
    tally: Arc<Tally>,
) {
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if Instant::now() >= end {
            return;
        }
        match api.submit(&session, &content).await {
            Ok(_) => {
                submitted.fetch_add(1, Ordering::Relaxed);
                tally.turns_submitted.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                tally.submit_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

pub(crate) fn soak(args: &TargetArgs, shape: &SoakShape) -> Result<()> {
    let target = Target::open(args, LocalDaemon::default())?;
    let result = target.block_on(soak_run(&target, shape));
    target.stop()?;
    println!("{}", serde_json::to_string(&result?)?);
    Ok(())
}

async fn soak_run(target: &Target, shape: &SoakShape) -> Result<serde_json::Value> {
    let api = Arc::new(target.api.clone());
    let tally = Arc::new(Tally {
        latency: Histogram::new(),
        submit_errors: AtomicUsize::new(0),
        turn_errors: AtomicUsize::new(0),
        out_of_order: AtomicUsize::new(0),
        closed_early: AtomicUsize::new(0),
        unfinished: AtomicUsize::new(0),
        frames: AtomicU64::new(0),
        turns_submitted: AtomicUsize::new(0),
        error_codes: std::sync::Mutex::default(),
    });
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let content: Arc<str> = Arc::from(words(shape.tokens));
    let rss_idle = target.rss_kib();
    // A generous end: the run, then time for the queued turns to drain.
    let deadline = tokio::time::Instant::now()
        + shape.duration
        + Duration::from_secs(60 + shape.sessions as u64);
    let mut readers = Vec::with_capacity(shape.sessions * shape.subscribers);
    let mut sessions = Vec::with_capacity(shape.sessions);
    for _ in 0..shape.sessions {
        let session = api.create_session(json!({})).await?;
        let after = api.last_seq(&session).await?;
        let submitted = Arc::new(AtomicUsize::new(0));
        for _ in 0..shape.subscribers {
            let ws = api.connect_ws(&session, after).await?;
            readers.push(tokio::spawn(subscriber(
                ws,
                after,
                submitted.clone(),
                stopping.clone(),
                tally.clone(),
                deadline,
            )));
        }
        sessions.push((session, submitted));
    }
    let cpu = thread_cpu();
    let own = own_cpu();
    let daemon_cpu = target.cpu();
    let started = Instant::now();
    let end = started + shape.duration;
    let drivers: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(i, (session, submitted))| {
            let offset = Duration::from_secs(1) * i as u32 / shape.sessions.max(1) as u32;
            tokio::spawn(driver(
                api.clone(),
                session.clone(),
                offset,
                end,
                content.clone(),
                submitted.clone(),
                tally.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(shape.warmup.min(shape.duration)).await;
    let rss_start = target.rss_kib();
    join_all(drivers).await;
    stop.send_replace(true);
    join_all(readers).await;
    let elapsed = started.elapsed();
    let rss_end = target.rss_kib();
    let mib = |kib: Option<f64>| kib.map(|k| (k / 1024.0 * 10.0).round() / 10.0);
    let growth = match (rss_start, rss_end) {
        (Some(start), Some(end)) => Some(((end - start) / start * 1000.0).round() / 10.0),
        _ => None,
    };
    let errors = tally.submit_errors.load(Ordering::Relaxed)
        + tally.turn_errors.load(Ordering::Relaxed)
        + tally.out_of_order.load(Ordering::Relaxed)
        + tally.closed_early.load(Ordering::Relaxed)
        + tally.unfinished.load(Ordering::Relaxed);
    for (session, _) in &sessions {
        api.delete_session(session).await?;
    }
    // What the sessions' state held: the daemon hands freed memory back shortly after deletes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after_delete = target.rss_kib();
    let error_codes = tally
        .error_codes
        .lock()
        .map(|codes| json!(*codes))
        .unwrap_or_default();
    Ok(json!({
        "benchmark": "soak",
        "sessions": shape.sessions,
        "subscribersPerSession": shape.subscribers,
        "durationSecs": shape.duration.as_secs(),
        "tokensPerTurn": shape.tokens,
        "turnsSubmitted": tally.turns_submitted.load(Ordering::Relaxed),
        "deliveries": tally.frames.load(Ordering::Relaxed),
        "deliveryLatencyMs": {
            "note": "daemon's envelope ts -> read by a subscriber; whole milliseconds",
            "p50": tally.latency.quantile(0.50),
            "p99": tally.latency.quantile(0.99),
            "p999": tally.latency.quantile(0.999),
            "max": tally.latency.max(),
        },
        "errors": errors,
        "errorKinds": {
            "submitFailed": tally.submit_errors.load(Ordering::Relaxed),
            "turnError": tally.turn_errors.load(Ordering::Relaxed),
            "turnErrorCodes": error_codes,
            "seqOutOfOrder": tally.out_of_order.load(Ordering::Relaxed),
            "subscriberClosed": tally.closed_early.load(Ordering::Relaxed),
            "subscriberUnfinished": tally.unfinished.load(Ordering::Relaxed),
        },
        "rssIdleMib": mib(rss_idle),
        "rssStartMib": mib(rss_start),
        "rssEndMib": mib(rss_end),
        "rssGrowthPct": growth,
        "rssAfterDeletingSessionsMib": mib(rss_after_delete),
        "rssStartAfterSecs": shape.warmup.min(shape.duration).as_secs(),
        "elapsedSecs": (elapsed.as_secs_f64() * 10.0).round() / 10.0,
        "daemonCpuMs": (target.cpu().saturating_sub(daemon_cpu)).as_millis() as u64,
        "clientCpuMs": (thread_cpu() - cpu).as_millis() as u64,
        "benchProcessCpuMs": (own_cpu().saturating_sub(own)).as_millis() as u64,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_timestamp_reads_as_milliseconds_of_the_day() {
        let frame = r#"{"v":"3","seq":4,"ts":"2026-12-01T07:25:56.123Z","payload":{}}"#;
        assert_eq!(
            ts_ms_of_day(frame),
            Some(((7 * 60 + 25) * 60 + 56) * 1000 + 123)
        );
        assert_eq!(ts_ms_of_day(r#"{"ts":"2026-12"}"#), None);
    }

    #[test]
    fn the_histogram_answers_quantiles_in_whole_milliseconds() {
        let h = Histogram::new();
        for ms in [1, 1, 1, 2, 2, 3, 3, 3, 9, 99_999] {
            h.record(ms);
        }
        assert_eq!(h.quantile(0.5), Some(2));
        assert_eq!(h.quantile(0.9), Some(9));
        assert_eq!(h.quantile(1.0), Some(HISTOGRAM_MS as u64));
        assert_eq!(h.max(), Some(HISTOGRAM_MS as u64));
        assert_eq!(Histogram::new().quantile(0.5), None);
    }
}
