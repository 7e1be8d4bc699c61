//! Token and thinking events of finished turns stay replayable for the retention time, then
//! are swept, also when the daemon stopped before their time was up; nothing else is.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::{Duration, Instant};

use opta_test_support::{Reply, ScriptedLmx, TestDaemon, WAIT, is_terminal_of, token_events};
use pretty_assertions::assert_eq;
use serde_json::{Value, json};

fn names(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect()
}

/// Polls the events route until no token event of `turn` is left; returns what is left.
async fn until_swept(d: &TestDaemon, session: &str, turn: &str) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let events = d.events(session, 0).await;
        if token_events(&events, turn).is_empty() {
            return events;
        }
        assert!(Instant::now() < deadline, "tokens of {turn} never swept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn deltas_of_finished_turns_are_swept_and_nothing_else_is() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.push(Reply::chunks(["one ", "two ", "three"]));
    lmx.push(Reply::slow(1000, Duration::from_millis(20)));
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.faults.deltas_kept_apart = true;
        c.limits.delta_retention = Duration::from_secs(1);
        c.limits.delta_sweep_interval = Duration::from_millis(20);
    })
    .await;
    let s = d.create_session(None).await;
    let mut ws = d.ws(&s, 0).await;
    let first = d.submit(&s, "count").await;
    ws.envelopes_until(is_terminal_of(&first)).await;
    // Within the retention the tokens replay.
    assert_eq!(token_events(&d.events(&s, 0).await, &first).len(), 3);

    // A second turn streams while the first one's tokens are swept.
    let second = d.submit(&s, "talk").await;
    ws.envelopes_until(|e| e["event"] == "turn.token" && e["payload"]["turnId"] == second)
        .await;
    let left = until_swept(&d, &s, &first).await;
    assert!(
        !token_events(&left, &second).is_empty(),
        "a running turn keeps its tokens"
    );
    let durable: Vec<&str> = names(&left)
        .into_iter()
        .filter(|n| *n != "turn.token")
        .collect();
    assert_eq!(
        durable,
        [
            "session.snapshot",
            "turn.queued",
            "turn.start",
            "turn.done",
            "session.updated",
            "turn.queued",
            "turn.start",
        ]
    );
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(
        detail["messages"][1],
        json!({"role": "assistant", "content": "one two three"})
    );
    d.post(
        &format!("/v3/sessions/{s}/cancel"),
        json!({"turnId": second}),
    )
    .await;
    ws.envelopes_until(is_terminal_of(&second)).await;
    until_swept(&d, &s, &second).await;
}

#[tokio::test]
async fn a_restart_before_the_retention_ends_does_not_keep_deltas_for_good() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.push(Reply::chunks(["kept ", "until ", "swept"]));
    // The first daemon keeps deltas for an hour: it stops long before that.
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.faults.deltas_kept_apart = true;
        c.limits.delta_retention = Duration::from_secs(3600);
    })
    .await;
    let s = d.create_session(None).await;
    let turn = d.submit(&s, "go").await;
    d.ws(&s, 0)
        .await
        .envelopes_until(is_terminal_of(&turn))
        .await;
    let before = d.events(&s, 0).await;
    assert_eq!(token_events(&before, &turn).len(), 3);

    let d = d
        .restart_with(|c| {
            c.faults.deltas_kept_apart = true;
            c.limits.delta_retention = Duration::from_millis(100);
            c.limits.delta_sweep_interval = Duration::from_millis(20);
        })
        .await;
    let after = until_swept(&d, &s, &turn).await;
    let durable: Vec<Value> = before
        .into_iter()
        .filter(|e| e["event"] != "turn.token")
        .collect();
    assert_eq!(after, durable, "only the token events went");
}
