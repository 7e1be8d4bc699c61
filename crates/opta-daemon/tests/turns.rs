//! Turns end to end: streaming, ordering, optimistic concurrency, idempotency, cancel.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::Duration;

use opta_test_support::{
    Reply, ScriptedLmx, TestDaemon, assert_contiguous, is_terminal_of, token_text,
};
use pretty_assertions::assert_eq;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn names(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["event"].as_str()).collect()
}

#[tokio::test]
async fn a_turn_streams_tokens_then_done_then_session_updated() {
    let lmx = ScriptedLmx::start().await.unwrap();
    // One event per delta, to check each one's place in the order.
    let d = TestDaemon::start_with(&lmx.url(), |c| c.faults.deltas_kept_apart = true).await;
    let s = d.create_session(Some("stream-1")).await;
    let mut ws = d.ws(&s, 0).await;
    let turn = d.submit(&s, "hello there world").await;
    let events = ws
        .envelopes_until(|e| e["event"] == "session.updated" && e["seq"].as_u64() > Some(2))
        .await;
    assert_contiguous(&events, 1);
    assert_eq!(
        names(&events),
        vec![
            "session.snapshot",
            "turn.queued",
            "turn.start",
            "turn.token",
            "turn.token",
            "turn.token",
            "turn.token",
            "turn.done",
            "session.updated"
        ]
    );
    assert_eq!(token_text(&events, &turn), "echo: hello there world");
    let done = &events[7];
    assert_eq!(done["v"], "3");
    assert_eq!(done["sessionId"], s.as_str());
    assert_eq!(done["daemonId"], d.daemon().state().daemon_id.as_str());
    let stats = &done["payload"]["stats"];
    assert_eq!(
        (
            stats["promptTokens"].clone(),
            stats["completionTokens"].clone(),
            stats["tokens"].clone(),
            stats["toolCalls"].clone()
        ),
        (json!(10), json!(4), json!(4), json!(0))
    );
    assert!(stats["firstTokenLatencyMs"].as_f64().is_some(), "{stats}");
    assert!(stats["elapsed"].as_f64().is_some() && stats["speed"].as_f64().is_some());
    assert_eq!(
        done["payload"]["writerId"]
            .as_str()
            .zip(done["payload"]["clientId"].as_str()),
        Some(("w1", "test"))
    );
    // The history holds the user message and the reply; the inference server got the history.
    let (status, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        detail["messages"],
        json!([
            {"role": "user", "content": "hello there world"},
            {"role": "assistant", "content": "echo: hello there world"}
        ])
    );
    assert_eq!(detail["title"], "hello there world");
    assert_eq!(
        opta_test_support::conversation(&lmx.requests()[0]),
        json!([{"role": "user", "content": "hello there world"}])
    );
    assert_eq!(lmx.requests()[0]["stream"], json!(true));
}

#[tokio::test]
async fn reasoning_deltas_become_thinking_events() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.push(Reply::chunks(["Answer."]).with_reasoning(["Let me ", "think."]));
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let mut ws = d.ws(&s, 0).await;
    let turn = d.submit(&s, "why?").await;
    let events = ws.envelopes_until(is_terminal_of(&turn)).await;
    let thinking: String = events
        .iter()
        .filter(|e| e["event"] == "turn.thinking")
        .filter_map(|e| e["payload"]["text"].as_str())
        .collect();
    assert_eq!(thinking, "Let me think.");
    assert_eq!(token_text(&events, &turn), "Answer.");
}

#[tokio::test]
async fn four_queued_turns_run_in_order_without_interleaving() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.set_echo_delay(Duration::from_millis(5));
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let mut ws = d.ws(&s, 0).await;
    let mut turns = Vec::new();
    for i in 0..4 {
        turns.push(d.submit(&s, &format!("turn number {i}")).await);
    }
    let last = turns[3].clone();
    let events = ws
        .envelopes_until(|e| {
            e["event"] == "session.updated" && {
                // the session.updated that follows the last turn's terminal event
                e["payload"]["snapshot"]["activeTurnId"].is_null()
                    && e["payload"]["snapshot"]["queuedTurns"] == 0
            }
        })
        .await;
    assert_contiguous(&events, 1);
    // Exactly one terminal event per turn, all turn.done.
    for t in &turns {
        let terminals: Vec<_> = events
            .iter()
            .filter(|e| is_terminal_of(t)(e))
            .map(|e| e["event"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(terminals, vec!["turn.done"], "turn {t}");
    }
    // Starts in submission order; between a turn's start and its end only its own events.
    let starts: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "turn.start")
        .map(|e| {
            e["payload"]["turnId"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(starts, turns);
    let mut running: Option<String> = None;
    for e in &events {
        let turn_id = e["payload"]["turnId"].as_str().map(str::to_owned);
        match e["event"].as_str().unwrap_or_default() {
            "turn.start" => {
                assert!(running.is_none(), "a turn started while another ran: {e}");
                running = turn_id;
            }
            "turn.token" => assert_eq!(turn_id, running, "token of another turn: {e}"),
            "turn.done" | "turn.error" => {
                assert_eq!(turn_id, running);
                running = None;
            }
            _ => {}
        }
    }
    for (i, t) in turns.iter().enumerate() {
        assert_eq!(token_text(&events, t), format!("echo: turn number {i}"));
    }
    assert!(is_terminal_of(&last)(
        events
            .iter()
            .rev()
            .find(|e| e["event"] == "turn.done")
            .unwrap()
    ));
}

#[tokio::test]
async fn stale_last_seen_seq_is_refused_and_queues_nothing() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let mut ws = d.ws(&s, 0).await;
    // Writer A sees seq 1 (snapshot) and submits; writer B also saw only seq 1.
    let (status, body) = d
        .post(
            &format!("/v3/sessions/{s}/turns"),
            json!({"clientId": "a", "writerId": "A", "content": "first", "mode": "chat", "lastSeenSeq": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let turn_a = body["turnId"].as_str().unwrap().to_owned();
    assert_eq!(body["queued"], true);
    ws.envelopes_until(|e| e["event"] == "session.updated" && e["seq"].as_u64() > Some(1))
        .await;
    let before = d.events(&s, 0).await;
    let (status, body) = d
        .post(
            &format!("/v3/sessions/{s}/turns"),
            json!({"clientId": "b", "writerId": "B", "content": "second", "mode": "chat", "lastSeenSeq": 1}),
        )
        .await;
    let current = before.last().unwrap()["seq"].as_u64().unwrap();
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "state-conflict");
    assert_eq!(body["seq"], json!(current));
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("Session state conflict")
    );
    assert_eq!(
        d.events(&s, 0).await,
        before,
        "a refused turn changes nothing"
    );
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(detail["queuedTurns"], 0);
    assert_eq!(detail["messages"].as_array().unwrap().len(), 2);
    // Caught up, B succeeds; a lastSeenSeq equal to the current seq is fine.
    let (status, _) = d
        .post(
            &format!("/v3/sessions/{s}/turns"),
            json!({"clientId": "b", "writerId": "B", "content": "second", "mode": "chat", "lastSeenSeq": current}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // Writer A's turn ran to completion first (B's accepted turn may have finished since).
    let dones: Vec<_> = d
        .events(&s, 0)
        .await
        .iter()
        .filter(|e| e["event"] == "turn.done")
        .map(|e| e["payload"]["turnId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(dones.first(), Some(&turn_a));
}

#[tokio::test]
async fn two_writers_race_on_one_seq_and_exactly_one_wins() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.push(Reply::hang());
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let submit = |writer: &'static str| {
        let d = &d;
        let s = s.clone();
        async move {
            d.post(
                &format!("/v3/sessions/{s}/turns"),
                json!({"clientId": writer, "writerId": writer, "content": "go", "mode": "chat", "lastSeenSeq": 1}),
            )
            .await
        }
    };
    let (a, b) = tokio::join!(submit("A"), submit("B"));
    let mut statuses = vec![a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, vec![StatusCode::ACCEPTED, StatusCode::CONFLICT]);
    let queued = d
        .events(&s, 0)
        .await
        .iter()
        .filter(|e| e["event"] == "turn.queued")
        .count();
    assert_eq!(queued, 1);
}

#[tokio::test]
async fn idempotency_key_returns_the_first_turn() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let body = json!({"clientId": "c", "writerId": "w", "content": "once", "mode": "do", "idempotencyKey": "k-1"});
    let (s1, first) = d
        .post(&format!("/v3/sessions/{s}/turns"), body.clone())
        .await;
    let (s2, second) = d.post(&format!("/v3/sessions/{s}/turns"), body).await;
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(first["queued"], true);
    assert_eq!(second, json!({"turnId": first["turnId"], "queued": false}));
    let queued = d
        .events(&s, 0)
        .await
        .iter()
        .filter(|e| e["event"] == "turn.queued")
        .count();
    assert_eq!(queued, 1);
}

#[tokio::test]
async fn cancel_removes_queued_turns_and_aborts_the_active_one() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.push(Reply::slow(1000, Duration::from_millis(20)));
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let mut ws = d.ws(&s, 0).await;
    let active = d.submit_as(&s, "A", "long").await;
    let queued_b = d.submit_as(&s, "B", "queued b").await;
    let queued_a = d.submit_as(&s, "A", "queued a").await;
    // Wait until the active turn streams.
    ws.envelopes_until(|e| e["event"] == "turn.token").await;

    // Cancel one queued turn by id.
    let (status, body) = d
        .post(
            &format!("/v3/sessions/{s}/cancel"),
            json!({"turnId": queued_b}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"ok": true, "cancelled": 1, "cancelledQueued": 1, "cancelledActive": false})
    );
    // An empty body cancels nothing.
    let (_, body) = d.post(&format!("/v3/sessions/{s}/cancel"), json!({})).await;
    assert_eq!(body["cancelled"], 0);

    // Cancel writer A: its queued turn and the active turn.
    let (_, body) = d
        .post(
            &format!("/v3/sessions/{s}/cancel"),
            json!({"writerId": "A"}),
        )
        .await;
    assert_eq!(
        body,
        json!({"ok": true, "cancelled": 2, "cancelledQueued": 1, "cancelledActive": true})
    );
    // The HTTP stream to the inference server is dropped promptly.
    tokio::time::timeout(Duration::from_secs(5), lmx.wait_streams_dropped(1))
        .await
        .expect("inference stream dropped after cancel");

    let events = ws.envelopes_until(is_terminal_of(&active)).await;
    let tail: Vec<_> = events
        .iter()
        .filter(|e| e["event"] != "turn.token")
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_owned(),
                e["payload"]["turnId"].clone(),
                e["payload"]["code"].clone(),
            )
        })
        .collect();
    assert_eq!(
        tail,
        vec![
            ("session.cancelled".to_owned(), json!(queued_b), Value::Null),
            ("turn.error".to_owned(), json!(queued_b), json!("cancelled")),
            ("session.updated".to_owned(), Value::Null, Value::Null),
            ("session.cancelled".to_owned(), Value::Null, Value::Null),
            ("turn.error".to_owned(), json!(queued_a), json!("cancelled")),
            ("turn.error".to_owned(), json!(active), json!("cancelled")),
        ]
    );
    // Every turn got exactly one terminal event in the durable log.
    let stored = d.events(&s, 0).await;
    for t in [&active, &queued_a, &queued_b] {
        assert_eq!(
            stored.iter().filter(|e| is_terminal_of(t)(e)).count(),
            1,
            "{t}"
        );
    }
    // The partial reply is kept in history.
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    let messages = detail["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{detail}");
    assert!(messages[1]["content"].as_str().unwrap().starts_with("w0 "));
    assert_eq!(detail["activeTurnId"], Value::Null);
    // The session still serves turns.
    let next = d.submit(&s, "after cancel").await;
    let events = ws.envelopes_until(is_terminal_of(&next)).await;
    assert_eq!(token_text(&events, &next), "echo: after cancel");
}
