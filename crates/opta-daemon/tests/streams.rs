//! The WebSocket and SSE planes: replay then live, reconnects, auth, inbound frames.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::Duration;

use futures_util::StreamExt;
use opta_test_support::{
    Reply, ScriptedLmx, SseClient, TestDaemon, WsClient, WsItem, assert_contiguous, is_terminal_of,
    token_events, token_text,
};
use pretty_assertions::assert_eq;
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn ws_replays_then_goes_live_without_gap_or_duplicate() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let first = d.submit(&s, "one two").await;
    let mut watcher = d.ws(&s, 0).await;
    watcher.envelopes_until(is_terminal_of(&first)).await;
    let stored = d.events(&s, 0).await;
    let last_stored = stored.last().unwrap()["seq"].as_u64().unwrap();

    // A client that saw up to seq 2 replays 3..=last, then sees a new turn live.
    let mut ws = d.ws(&s, 2).await;
    let replayed = ws
        .envelopes_until(|e| e["seq"].as_u64() == Some(last_stored))
        .await;
    assert_contiguous(&replayed, 3);
    let second = d.submit(&s, "three").await;
    let live = ws.envelopes_until(is_terminal_of(&second)).await;
    assert_contiguous(&live, last_stored + 1);
    assert_eq!(token_text(&live, &second), "echo: three");
}

#[tokio::test]
async fn sse_replays_then_goes_live_with_id_lines() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let first = d.submit(&s, "alpha").await;
    d.ws(&s, 0)
        .await
        .envelopes_until(is_terminal_of(&first))
        .await;
    let stored = d.events(&s, 0).await;
    let last_stored = stored.last().unwrap()["seq"].as_u64().unwrap();

    let mut sse = d.sse(&s, 1).await;
    assert_eq!(sse.status, StatusCode::OK);
    let replayed = sse
        .envelopes_until(|e| e["seq"].as_u64() == Some(last_stored))
        .await;
    assert_contiguous(&replayed, 2);
    let second = d.submit(&s, "beta gamma").await;
    let live = sse.envelopes_until(is_terminal_of(&second)).await;
    assert_contiguous(&live, last_stored + 1);
    assert_eq!(token_text(&live, &second), "echo: beta gamma");

    // Last-Event-ID counts as afterSeq.
    let url = format!("{}/v3/sse/events?sessionId={s}", d.base);
    let mut resumed = SseClient::connect(&d.http, &url, &d.token, Some(last_stored)).await;
    let first_resumed = resumed.next().await.unwrap();
    assert_eq!(first_resumed.data["seq"].as_u64(), Some(last_stored + 1));
}

#[tokio::test]
async fn ws_pings_every_keepalive_period() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.limits.keepalive = Duration::from_millis(100);
    })
    .await;
    let s = d.create_session(None).await;
    let mut ws = d.ws(&s, 1).await;
    ws.wait_for_ping().await;
    ws.wait_for_ping().await;
}

#[tokio::test]
async fn sse_opens_with_connected_and_pings() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.limits.keepalive = Duration::from_millis(100);
    })
    .await;
    let s = d.create_session(None).await;
    let resp = d
        .http
        .get(format!("{}/v3/sse/events?sessionId={s}&afterSeq=1", d.base))
        .bearer_auth(&d.token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    while !seen.contains(": ping\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("bytes in time")
            .expect("stream open")
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.starts_with(": connected\n\n"), "{seen:?}");
}

/// A client that drops mid-turn and reconnects with the last seq it saw gets every token.
async fn reconnect_mid_turn(use_sse: bool) {
    let lmx = ScriptedLmx::start().await.unwrap();
    let reply = Reply::slow(60, Duration::from_millis(10));
    let expected = reply.text();
    lmx.push(reply);
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let turn = d.submit(&s, "stream a lot").await;
    let mut first = d.ws(&s, 0).await;
    let before = first
        .envelopes_until(|e| {
            e["event"] == "turn.token"
            // Deltas that arrive together are joined (under load, often): contains, not equals.
            && e["payload"]["text"].as_str().is_some_and(|t| t.contains("w9 "))
        })
        .await;
    first.close().await;
    let last_seen = before.last().unwrap()["seq"].as_u64().unwrap();
    let after = if use_sse {
        d.sse(&s, last_seen)
            .await
            .envelopes_until(is_terminal_of(&turn))
            .await
    } else {
        d.ws(&s, last_seen)
            .await
            .envelopes_until(is_terminal_of(&turn))
            .await
    };
    assert_contiguous(&after, last_seen + 1);
    let mut all = before;
    all.extend(after);
    assert_contiguous(&all, 1);
    assert_eq!(token_text(&all, &turn), expected);
}

#[tokio::test]
async fn ws_reconnect_mid_turn_loses_no_token() {
    reconnect_mid_turn(false).await;
}

#[tokio::test]
async fn sse_reconnect_mid_turn_loses_no_token() {
    reconnect_mid_turn(true).await;
}

#[tokio::test]
async fn ws_without_token_is_closed_with_4001() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let url = format!("{}/v3/ws?sessionId={s}", d.base.replacen("http", "ws", 1));
    let mut ws = WsClient::connect(&url).await;
    assert_eq!(
        ws.next().await,
        Some(WsItem::Json(json!({"error": "Unauthorized"})))
    );
    assert!(matches!(ws.next().await, Some(WsItem::Closed(4001, _))));
    let bad = format!("{url}&token=wrong");
    let mut ws = WsClient::connect(&bad).await;
    assert_eq!(
        ws.next().await,
        Some(WsItem::Json(json!({"error": "Unauthorized"})))
    );
    assert!(matches!(ws.next().await, Some(WsItem::Closed(4001, _))));
}

#[tokio::test]
async fn ws_without_session_is_closed_with_4000_and_unknown_with_4004() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let base = d.base.replacen("http", "ws", 1);
    for query in ["", "sessionId=a/b&", "sessionId=ok&afterSeq=x&"] {
        let mut ws = WsClient::connect(&format!("{base}/v3/ws?{query}token={}", d.token)).await;
        let frame = ws.next_json().await;
        assert_eq!(frame["code"], "invalid-request", "{query}: {frame}");
        assert!(
            matches!(ws.next().await, Some(WsItem::Closed(4000, _))),
            "{query}"
        );
    }
    let mut ws = WsClient::connect(&format!("{base}/v3/ws?sessionId=nope&token={}", d.token)).await;
    assert_eq!(ws.next_json().await["code"], "session-not-found");
    assert!(matches!(ws.next().await, Some(WsItem::Closed(4004, _))));
}

#[tokio::test]
async fn ws_inbound_frames_are_acked_or_answered_with_error_frames() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.push(Reply::hang());
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(Some("inbound")).await;
    let mut ws = d.ws(&s, 1).await;

    ws.send(json!({"type": "hello", "clientId": "c1", "sessionId": s}))
        .await;
    assert_eq!(
        ws.next_json().await,
        json!({"type": "ack", "action": "hello", "clientId": "c1", "sessionId": s, "lastSeq": 1})
    );

    // Bad frames get error frames and the connection stays open. An unknown type has no
    // action; a known one names it.
    ws.send(json!({"type": "dance", "sessionId": s})).await;
    let frame = ws.next_json().await;
    assert_eq!(
        (frame["code"].clone(), frame.get("action")),
        (json!("invalid-request"), None)
    );
    ws.send(json!({"type": "turn.submit", "sessionId": "other", "clientId": "c", "writerId": "w", "content": "x", "mode": "chat"})).await;
    let frame = ws.next_json().await;
    assert_eq!(
        (frame["code"].clone(), frame["action"].clone()),
        (json!("invalid-request"), json!("turn.submit"))
    );
    assert!(
        frame["error"].as_str().unwrap().contains("inbound"),
        "{frame}"
    );
    ws.send(json!({"type": "turn.submit", "sessionId": s, "clientId": "c", "writerId": "w", "content": "x", "mode": "sing"})).await;
    let frame = ws.next_json().await;
    assert_eq!(
        (frame["details"][0]["path"].clone(), frame["action"].clone()),
        (json!("mode"), json!("turn.submit")),
        "{frame}"
    );
    ws.send(json!({"type": "hello", "sessionId": s})).await;
    let frame = ws.next_json().await;
    assert_eq!(
        (frame["code"].clone(), frame["action"].clone()),
        (json!("invalid-request"), json!("hello")),
        "{frame}"
    );
    ws.send(json!({"type": "turn.submit", "sessionId": s, "clientId": "c", "writerId": "w", "content": "x", "mode": "chat", "lastSeenSeq": 0})).await;
    let frame = ws.next_json().await;
    assert_eq!(
        (frame["code"].clone(), frame["seq"].clone()),
        (json!("state-conflict"), json!(1))
    );
    // Raw invalid JSON.
    ws.send(Value::String("not json".into())).await;
    assert_eq!(ws.next_json().await["code"], "invalid-request");

    ws.send(json!({"type": "turn.submit", "sessionId": s, "clientId": "c", "writerId": "w", "content": "hang", "mode": "chat", "lastSeenSeq": 1})).await;
    let ack = ws.next_json().await;
    assert_eq!(
        (
            ack["type"].clone(),
            ack["action"].clone(),
            ack["queued"].clone()
        ),
        (json!("ack"), json!("turn.submit"), json!(true))
    );
    let turn = ack["turnId"].as_str().unwrap().to_owned();
    ws.envelopes_until(|e| e["event"] == "turn.start").await;

    ws.send(json!({"type": "permission.resolve", "sessionId": s, "requestId": "perm_x", "decision": "allow", "decidedBy": "c"})).await;
    assert_eq!(ws.next_json().await["code"], "permission-not-found");

    ws.send(json!({"type": "turn.cancel", "sessionId": s, "turnId": turn}))
        .await;
    // The ack comes before the cancellation events it caused.
    assert_eq!(
        ws.next_json().await,
        json!({"type": "ack", "action": "turn.cancel", "ok": true, "cancelled": 1,
            "cancelledQueued": 0, "cancelledActive": true})
    );
    let events = ws.envelopes_until(is_terminal_of(&turn)).await;
    let codes: Vec<_> = events
        .iter()
        .map(|e| e["payload"]["code"].clone())
        .collect();
    assert_eq!(codes.last(), Some(&json!("cancelled")));
}

#[tokio::test]
async fn a_message_over_the_size_limit_is_refused_with_1009_and_changes_nothing() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let mut ws = d.ws(&s, 1).await;
    let content = "x".repeat(opta_daemon::http::BODY_LIMIT);
    ws.send(
        json!({"type": "turn.submit", "sessionId": s, "clientId": "c", "writerId": "w",
        "content": content, "mode": "chat"}),
    )
    .await;
    let frame = ws.next_json().await;
    assert_eq!(frame["code"], "payload-too-large", "{frame}");
    assert!(matches!(ws.next().await, Some(WsItem::Closed(1009, _))));
    // Nothing was queued, and the session still takes turns over a new connection.
    let events = d.events(&s, 0).await;
    assert_eq!(events.len(), 1, "only the snapshot: {events:?}");
    let mut ws = d.ws(&s, 1).await;
    ws.send(
        json!({"type": "turn.submit", "sessionId": s, "clientId": "c", "writerId": "w",
        "content": "small", "mode": "chat"}),
    )
    .await;
    let ack = ws.next_json().await;
    assert_eq!(ack["queued"], true, "{ack}");
    let turn = ack["turnId"].as_str().unwrap().to_owned();
    let events = ws.envelopes_until(is_terminal_of(&turn)).await;
    assert_eq!(events.last().unwrap()["event"], "turn.done");
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_is_closed_with_4008_and_resumes() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let reply = Reply::chunks((0..3000).map(|i| format!("t{i} ")));
    let expected = reply.text();
    lmx.push(reply);
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.limits.subscriber_buffer = 8;
        c.faults.deltas_kept_apart = true;
    })
    .await;
    let s = d.create_session(None).await;
    let mut ws = d.ws(&s, 0).await;
    let turn = d.submit(&s, "flood").await;
    // Read nothing for a while: the daemon streams far more than 8 frames meanwhile.
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while lmx.streams_finished() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the scripted stream finishes");
    let mut all = Vec::new();
    let mut closes = Vec::new();
    // Drain; on every 4008 reconnect from the last seq seen, as a client would.
    loop {
        match ws.next().await {
            Some(WsItem::Json(v)) => {
                let done = is_terminal_of(&turn)(&v);
                all.push(v);
                if done {
                    break;
                }
            }
            Some(WsItem::Closed(code, _)) => {
                closes.push(code);
                let last = all.last().map_or(0, |e| e["seq"].as_u64().unwrap());
                ws = d.ws(&s, last).await;
            }
            None => panic!("socket ended without a close frame"),
        }
    }
    assert!(!closes.is_empty(), "the slow subscriber was never dropped");
    assert!(closes.iter().all(|c| *c == 4008), "{closes:?}");
    assert_contiguous(&all, 1);
    assert_eq!(token_text(&all, &turn), expected);
}

#[tokio::test]
async fn deltas_that_arrive_together_go_out_as_one_event_with_the_same_text() {
    let lmx = ScriptedLmx::start().await.unwrap();
    // A burst: 2,000 chunks with no pause between them reach the daemon faster than it
    // emits events, so most are joined; a spaced reply keeps one event per delta.
    let burst = Reply::chunks((0..2000).map(|i| format!("t{i} ")));
    let spaced = Reply::slow(5, std::time::Duration::from_millis(30));
    let (burst_text, spaced_text) = (burst.text(), spaced.text());
    lmx.push(burst);
    lmx.push(spaced);
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let (turn, events) = d.turn(&s, "burst").await;
    let tokens = token_events(&events, &turn).len();
    assert_eq!(token_text(&events, &turn), burst_text);
    assert!(tokens < 2000, "{tokens} token events for 2000 deltas");
    assert_contiguous(&events, events[0]["seq"].as_u64().unwrap());
    let (turn, events) = d.turn(&s, "spaced").await;
    let tokens = token_events(&events, &turn).len();
    assert_eq!(token_text(&events, &turn), spaced_text);
    assert_eq!(
        tokens, 5,
        "deltas that come apart are not held back to be joined"
    );
}
