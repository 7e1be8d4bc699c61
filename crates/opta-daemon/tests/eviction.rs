//! Idle sessions leave memory and come back from the store on their next use.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::Duration;

use opta_test_support::{ScriptedLmx, TestDaemon, is_terminal_of};
use pretty_assertions::assert_eq;
use serde_json::Value;

async fn runtime(d: &TestDaemon) -> Value {
    d.get("/v3/metrics").await.1["runtime"].clone()
}

/// Polls the metrics until `done` holds (bounded).
async fn wait_runtime(d: &TestDaemon, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = runtime(d).await;
        if done(&r) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "runtime never matched: {r}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn idle_sessions_are_evicted_and_reloaded_lazily() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.limits.idle_eviction = Duration::from_millis(100);
        c.limits.eviction_interval = Duration::from_millis(20);
    })
    .await;
    let idle = d.create_session(Some("idle")).await;
    let watched = d.create_session(Some("watched")).await;
    let turn = d.submit(&idle, "remember me").await;
    d.ws(&idle, 0)
        .await
        .envelopes_until(is_terminal_of(&turn))
        .await;
    let (_, before) = d.get(&format!("/v3/sessions/{idle}")).await;
    let events_before = d.events(&idle, 0).await;
    // A subscriber keeps `watched` resident.
    let mut ws = d.ws(&watched, 0).await;

    let r = wait_runtime(&d, |r| r["evictedSessionCount"] == 1).await;
    assert_eq!(
        r["sessionCount"], 1,
        "only the unwatched session left memory: {r}"
    );
    assert_eq!(r["storedSessionCount"], 2);
    // Several more eviction rounds pass; the watched session stays.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(runtime(&d).await["sessionCount"], 1);

    // Ten clients use the evicted session at once: one load, the same session for all.
    let path = format!("/v3/sessions/{idle}");
    let loads = futures_util::future::join_all((0..10).map(|_| d.get(&path))).await;
    for (status, after) in loads {
        assert_eq!(status, reqwest::StatusCode::OK);
        assert_eq!(after, before);
    }
    assert_eq!(runtime(&d).await["sessionCount"], 2);
    let last = events_before.last().unwrap()["seq"].as_u64().unwrap();
    let next = d.submit(&idle, "still there?").await;
    let events = d
        .ws(&idle, last)
        .await
        .envelopes_until(is_terminal_of(&next))
        .await;
    assert_eq!(events[0]["seq"].as_u64(), Some(last + 1));
    let sent = lmx.last_conversation().as_array().unwrap().len();
    assert_eq!(sent, 3, "the reloaded history reached the model");

    // The watched session's subscriber still works.
    let t = d.submit(&watched, "hi").await;
    ws.envelopes_until(is_terminal_of(&t)).await;
}
