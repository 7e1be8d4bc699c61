//! Faults: a full store, clients vanishing mid-stream.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::Duration;

use opta_test_support::{Reply, ScriptedLmx, TestDaemon, is_terminal_of};
use pretty_assertions::assert_eq;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn a_full_store_refuses_turns_with_507_and_changes_nothing() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| c.store.max_bytes = Some(400 * 1024)).await;
    let s = d.create_session(None).await;
    let big = "x".repeat(60 * 1024);
    let mut refused = None;
    for i in 0..40 {
        let (status, body) = d
            .post(
                &format!("/v3/sessions/{s}/turns"),
                json!({"clientId": "c", "writerId": "w", "content": format!("{i} {big}"), "mode": "chat"}),
            )
            .await;
        if status == StatusCode::INSUFFICIENT_STORAGE {
            refused = Some(body);
            break;
        }
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let turn = body["turnId"].as_str().unwrap().to_owned();
        d.ws(&s, 0)
            .await
            .envelopes_until(is_terminal_of(&turn))
            .await;
    }
    let body = refused.expect("the quota was reached");
    assert_eq!(body["code"], "storage-full");
    // The refused turn left no trace; every accepted turn has exactly one terminal event.
    let events = d.events(&s, 0).await;
    let queued: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "turn.queued")
        .collect();
    for q in &queued {
        let t = q["payload"]["turnId"].as_str().unwrap();
        assert_eq!(
            events.iter().filter(|e| is_terminal_of(t)(e)).count(),
            1,
            "{t}"
        );
    }
    let (status, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(detail["queuedTurns"], 0);
    assert_eq!(
        detail["messages"].as_array().unwrap().len(),
        queued.len() * 2
    );
    // The daemon keeps serving.
    assert_eq!(d.get("/v3/health").await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_turn_that_fills_the_store_ends_with_storage_full_and_keeps_its_text() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.push(Reply::chunks((0..20_000).map(|i| format!("token-{i:05} "))));
    // Every delta its own event, as a fast server's are: the store fills while the turn
    // streams. (Joined deltas, as a loaded machine makes them, could fit the whole stream and
    // fill it at the turn's end instead, whose record then waits for space.)
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.store.max_bytes = Some(512 * 1024);
        c.faults.deltas_kept_apart = true;
    })
    .await;
    let s = d.create_session(None).await;
    let mut ws = d.ws(&s, 0).await;
    let turn = d.submit(&s, "flood the disk").await;
    let events = ws.envelopes_until(is_terminal_of(&turn)).await;
    let end = events.last().unwrap();
    assert_eq!(end["event"], "turn.error");
    assert_eq!(end["payload"]["code"], "storage-full");
    // The end is recorded, with the text streamed so far as a partial reply.
    let stored = d.events(&s, 0).await;
    assert_eq!(
        stored.iter().filter(|e| is_terminal_of(&turn)(e)).count(),
        1
    );
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    let reply = detail["messages"][1]["content"].as_str().unwrap();
    assert!(
        reply.starts_with("token-00000 token-00001 "),
        "{}",
        &reply[..40.min(reply.len())]
    );
    let streamed: String = events
        .iter()
        .filter(|e| e["event"] == "turn.token")
        .filter_map(|e| e["payload"]["text"].as_str())
        .collect();
    assert!(
        reply == streamed,
        "the stored reply ({} chars) is not exactly what clients saw ({} chars)",
        reply.len(),
        streamed.len()
    );
}

#[tokio::test]
async fn clients_vanishing_mid_stream_leave_no_subscriber_behind() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.push(Reply::slow(200, Duration::from_millis(10)));
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let turn = d.submit(&s, "long").await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut ws = d.ws(&s, 0).await;
        ws.envelopes_until(|e| e["event"] == "turn.token").await;
        clients.push(ws);
    }
    let mut sse = d.sse(&s, 0).await;
    sse.envelopes_until(|e| e["event"] == "turn.token").await;
    let (_, health) = d.get("/v3/health").await;
    assert_eq!(health["runtime"]["subscriberCount"], 6);
    // Vanish without a close handshake.
    drop(clients);
    drop(sse);
    // The turn goes on; once it ends every vanished subscriber has been noticed.
    d.ws(&s, 0)
        .await
        .envelopes_until(is_terminal_of(&turn))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, health) = d.get("/v3/health").await;
        if health["runtime"]["subscriberCount"] == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscribers leaked: {health}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
