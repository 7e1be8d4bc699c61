//! Random interleavings of writers, cancels, stale submits, subscribers coming and going,
//! daemon restarts and misbehaving inference replies, from fixed seeds; then the event log's invariants are
//! checked on what was stored and on what every subscriber saw.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use opta_test_support::{Reply, ScriptedLmx, TestDaemon, WAIT, WsClient, WsItem};
use pretty_assertions::assert_eq;
use rand::{RngExt, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// A seeded generator, so a failing seed replays.
type Rng = rand::rngs::SmallRng;

/// A subscriber that reads until told to stop, keeping every envelope it got.
struct Subscriber {
    stop: oneshot::Sender<()>,
    seen: tokio::task::JoinHandle<(u64, Vec<Value>)>,
}

fn subscribe(mut ws: WsClient, after: u64) -> Subscriber {
    let (stop, mut stopped) = oneshot::channel();
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                item = ws.next() => match item {
                    Some(WsItem::Json(v)) if v.get("seq").is_some() => seen.push(v),
                    Some(WsItem::Json(_)) => {}
                    // Too slow or gone: what it saw so far still has to be right.
                    Some(WsItem::Closed(..)) | None => break,
                },
            }
        }
        (after, seen)
    });
    Subscriber { stop, seen }
}

fn reply(rng: &mut Rng) -> Reply {
    match rng.random_range(0..6) {
        0 => Reply::slow(rng.random_range(1..31), Duration::from_millis(2)),
        1 => Reply::chunks(["partial ", "then ", "cut ", "off"]).cut_after(2),
        2 => Reply::status(500, "scripted failure"),
        _ => Reply::chunks((0..rng.random_range(1..9)).map(|i| format!("t{i} "))),
    }
}

async fn run(seed: u64) {
    let mut rng = Rng::seed_from_u64(seed);
    let lmx = ScriptedLmx::start().await.unwrap();
    let mut d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let writers = ["w1", "w2", "w3"];
    let mut accepted: Vec<String> = Vec::new();
    let mut stale_refused = 0;
    let mut subscribers = Vec::new();
    for op in 0..80 {
        // Op 40 always falls through to the restart below.
        let draw = if op == 40 { 9 } else { rng.random_range(0..10) };
        match draw {
            0..=4 => {
                lmx.push(reply(&mut rng));
                let writer = writers[rng.random_range(0..3)];
                let (status, body) = d
                    .post(
                        &format!("/v3/sessions/{s}/turns"),
                        json!({"clientId": "chaos", "writerId": writer,
                            "content": format!("op {op}"), "mode": "chat"}),
                    )
                    .await;
                assert_eq!(status, StatusCode::ACCEPTED, "{body}");
                accepted.push(body["turnId"].as_str().unwrap().to_owned());
            }
            5 => {
                // A writer that saw nothing: refused once the session moved on, queues nothing.
                let (status, body) = d
                    .post(
                        &format!("/v3/sessions/{s}/turns"),
                        json!({"clientId": "chaos", "writerId": "stale", "content": "late",
                            "mode": "chat", "lastSeenSeq": 0}),
                    )
                    .await;
                assert_eq!(status, StatusCode::CONFLICT, "{body}");
                stale_refused += 1;
            }
            6 if !accepted.is_empty() => {
                let turn = &accepted[rng.random_range(0..accepted.len())];
                let (status, _) = d
                    .post(&format!("/v3/sessions/{s}/cancel"), json!({"turnId": turn}))
                    .await;
                assert_eq!(status, StatusCode::OK);
            }
            7 => {
                let writer = writers[rng.random_range(0..3)];
                let (status, _) = d
                    .post(
                        &format!("/v3/sessions/{s}/cancel"),
                        json!({"writerId": writer}),
                    )
                    .await;
                assert_eq!(status, StatusCode::OK);
            }
            8 => {
                let stored = d.events(&s, 0).await.len() as u64;
                let after = rng.random_range(0..stored + 1);
                subscribers.push(subscribe(d.ws(&s, after).await, after));
            }
            // A graceful restart, at least once per seed: the running turn ends `interrupted`,
            // queued ones resume, subscribers are closed (1001) and checked.
            _ if op == 40 || rng.random_range(0..12) == 0 => {
                let closed = std::mem::take(&mut subscribers);
                d = d.restart().await;
                for sub in closed {
                    check_subscriber(&d, &s, sub).await;
                }
            }
            _ => {
                if !subscribers.is_empty() && rng.random_range(0..2) == 0 {
                    let gone = subscribers.remove(rng.random_range(0..subscribers.len()));
                    check_subscriber(&d, &s, gone).await;
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..4))).await;
            }
        }
    }

    // Every accepted turn ends; then the log must hold the invariants.
    let deadline = Instant::now() + WAIT;
    let events = loop {
        let events = d.events(&s, 0).await;
        let ended = events.iter().filter(|e| is_terminal(e)).count();
        if ended == accepted.len() {
            break events;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: {ended} of {} turns ended",
            accepted.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    check_log(seed, &events, &accepted);
    for sub in subscribers {
        check_subscriber(&d, &s, sub).await;
    }
    // Refused submits left no trace: one turn.queued per 202, none for the 409s.
    assert!(
        events.iter().all(|e| e["payload"]["writerId"] != "stale"),
        "seed {seed}: {stale_refused} stale submits were refused, yet one queued"
    );
}

fn is_terminal(e: &Value) -> bool {
    matches!(e["event"].as_str(), Some("turn.done" | "turn.error"))
}

fn turn_of(e: &Value) -> Option<&str> {
    e["payload"]["turnId"].as_str()
}

/// seq runs 1, 2, 3...; every accepted turn is queued once and ends once; turns start in the
/// order they were queued (less the cancelled), one at a time, and only the running turn
/// streams.
fn check_log(seed: u64, events: &[Value], accepted: &[String]) {
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "seed {seed}: seq has a gap or a repeat");

    let mut queued: Vec<&str> = Vec::new();
    let mut started: Vec<&str> = Vec::new();
    let mut ended: HashMap<&str, usize> = HashMap::new();
    let mut active: Option<&str> = None;
    for e in events {
        let turn = turn_of(e);
        match e["event"].as_str().unwrap() {
            "turn.queued" => queued.push(turn.unwrap()),
            "turn.start" => {
                assert_eq!(active, None, "seed {seed}: {e} started while another ran");
                active = turn;
                started.push(turn.unwrap());
            }
            "turn.token" | "turn.thinking" => {
                assert_eq!(turn, active, "seed {seed}: {e} streamed outside its turn");
            }
            "turn.done" | "turn.error" => {
                *ended.entry(turn.unwrap()).or_default() += 1;
                if turn == active {
                    active = None;
                } else {
                    // A turn that never started can only have been cancelled from the queue.
                    assert_eq!(e["payload"]["code"], "cancelled", "seed {seed}: {e}");
                    assert!(!started.contains(&turn.unwrap()), "seed {seed}: {e}");
                }
            }
            _ => {}
        }
    }
    let accepted_set: HashSet<&str> = accepted.iter().map(String::as_str).collect();
    assert_eq!(
        queued.len(),
        accepted.len(),
        "seed {seed}: one turn.queued per 202"
    );
    assert_eq!(queued.iter().copied().collect::<HashSet<_>>(), accepted_set);
    for turn in accepted {
        assert_eq!(
            ended.get(turn.as_str()),
            Some(&1),
            "seed {seed}: {turn} ended once"
        );
    }
    let fifo: Vec<&str> = queued
        .iter()
        .copied()
        .filter(|t| started.contains(t))
        .collect();
    assert_eq!(
        started, fifo,
        "seed {seed}: turns started out of queue order"
    );
}

/// Stops the subscriber. What it saw is exactly the stored log from its `afterSeq` on, without gap,
/// repeat or change, for as far as it got.
async fn check_subscriber(d: &TestDaemon, s: &str, sub: Subscriber) {
    let _ = sub.stop.send(());
    let (after, seen) = sub.seen.await.unwrap();
    let stored = d.events(s, after).await;
    assert!(seen.len() <= stored.len());
    assert_eq!(seen[..], stored[..seen.len()], "subscriber from {after}");
}

/// Six seeds by default; `OPTA_CHAOS_SEEDS=200` searches further.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_interleavings_keep_the_event_log_invariants() {
    let seeds = std::env::var("OPTA_CHAOS_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    for seed in 0..seeds {
        run(seed).await;
    }
}
