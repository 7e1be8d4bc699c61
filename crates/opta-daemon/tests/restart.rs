//! A daemon restarted on the same home keeps sessions, history, durable events and `seq`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use opta_test_support::{Reply, ScriptedLmx, TestDaemon, assert_contiguous, is_terminal_of};
use pretty_assertions::assert_eq;
use serde_json::{Value, json};

fn durable(events: &[Value]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| !matches!(e["event"].as_str(), Some("turn.token" | "turn.thinking")))
        .cloned()
        .collect()
}

#[tokio::test]
async fn restart_keeps_sessions_messages_events_and_seq() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(Some("keep-me")).await;
    let turn = d.submit(&s, "remember this").await;
    d.ws(&s, 0)
        .await
        .envelopes_until(is_terminal_of(&turn))
        .await;
    let (_, detail_before) = d.get(&format!("/v3/sessions/{s}")).await;
    let events_before = d.events(&s, 0).await;
    let last_seq = events_before.last().unwrap()["seq"].as_u64().unwrap();
    let old_daemon_id = d.daemon().state().daemon_id.clone();

    let d = d.restart().await;
    assert_ne!(d.daemon().state().daemon_id, old_daemon_id);
    let (status, detail_after) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(status, reqwest::StatusCode::OK);
    assert_eq!(detail_after, detail_before);
    assert_eq!(durable(&d.events(&s, 0).await), durable(&events_before));
    let (_, list) = d.get("/v3/sessions").await;
    assert_eq!(list["sessions"][0]["sessionId"], "keep-me");

    // seq continues where it stopped; the history reaches the model.
    let mut ws = d.ws(&s, last_seq).await;
    let next = d.submit(&s, "and now").await;
    let events = ws.envelopes_until(is_terminal_of(&next)).await;
    assert_contiguous(&events, last_seq + 1);
    let sent = lmx.last_conversation();
    assert_eq!(
        sent,
        json!([
            {"role": "user", "content": "remember this"},
            {"role": "assistant", "content": "echo: remember this"},
            {"role": "user", "content": "and now"}
        ])
    );
}

#[tokio::test]
async fn stop_interrupts_the_running_turn_and_queued_turns_run_after_restart() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.push(Reply::chunks(["partial ", "reply ", "never ", "finished"]).cut_after(2));
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let mut ws = d.ws(&s, 0).await;
    // First turn fails quickly (cut), second hangs, third waits in the queue.
    let first = d.submit(&s, "cut").await;
    ws.envelopes_until(is_terminal_of(&first)).await;
    lmx.push(Reply::hang());
    let running = d.submit(&s, "hang").await;
    let queued = d.submit(&s, "queued until restart").await;
    ws.envelopes_until(|e| e["event"] == "turn.start" && e["payload"]["turnId"] == running)
        .await;
    // The hanging reply must be taken by the running turn before the stop: on a loaded
    // machine its request can lag behind turn.start, and the queued turn would get it instead.
    lmx.wait_chat_requests(2).await;

    let d = d.restart().await;
    let events = d.events(&s, 0).await;
    assert_contiguous(&events, 1);
    let cut: Vec<_> = events
        .iter()
        .filter(|e| is_terminal_of(&first)(e))
        .collect();
    assert_eq!(cut[0]["payload"]["code"], "lmx-ws-closed");
    let terminal: Vec<_> = events
        .iter()
        .filter(|e| is_terminal_of(&running)(e))
        .collect();
    assert_eq!(terminal.len(), 1);
    assert_eq!(terminal[0]["event"], "turn.error");
    assert_eq!(terminal[0]["payload"]["code"], "interrupted");
    // The queued turn runs on the new daemon.
    let mut ws = d.ws(&s, 0).await;
    let all = ws.envelopes_until(is_terminal_of(&queued)).await;
    assert_contiguous(&all[..], all[0]["seq"].as_u64().unwrap());
    assert_eq!(all.last().unwrap()["event"], "turn.done");
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    let contents: Vec<_> = detail["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        contents,
        vec![
            ("user".to_owned(), "cut".to_owned()),
            ("assistant".to_owned(), "partial reply ".to_owned()),
            ("user".to_owned(), "hang".to_owned()),
            ("user".to_owned(), "queued until restart".to_owned()),
            (
                "assistant".to_owned(),
                "echo: queued until restart".to_owned()
            ),
        ]
    );
}
