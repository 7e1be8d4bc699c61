//! Inference servers that do what the OpenAI API allows but the common case does not: a
//! byte-order mark, `null` for absent fields, keep-alive comments, a whole JSON answer to a
//! streaming request, an error object mid-stream, a model list that never answers; and a turn
//! task that panics. Each ends in the documented outcome within a bounded time.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::{Duration, Instant};

use opta_test_support::{Reply, ScriptedLmx, TestDaemon, is_terminal_of, token_text};
use pretty_assertions::assert_eq;
use serde_json::{Value, json};

fn terminal(events: &[Value]) -> &Value {
    events.last().unwrap()
}

fn chunk(delta: Value) -> String {
    let chunk =
        json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]});
    format!("data: {chunk}\n\n")
}

#[tokio::test]
async fn a_stream_that_begins_with_a_byte_order_mark_is_read() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    lmx.push(Reply::sse([
        format!("\u{feff}{}", chunk(json!({"content": "hello"}))),
        chunk(json!({"content": " there"})),
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n".into(),
        "data: [DONE]\n\n".into(),
    ]));
    let (t, events) = d.turn(&s, "bom").await;
    assert_eq!(terminal(&events)["event"], "turn.done", "{events:?}");
    assert_eq!(token_text(&events, &t), "hello there");
}

#[tokio::test]
async fn null_in_every_optional_field_is_absence() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let nulls = json!({"id": null, "object": "chat.completion.chunk", "model": null,
        "usage": {"prompt_tokens": null, "completion_tokens": null, "total_tokens": null},
        "choices": [{"index": 0, "logprobs": null, "finish_reason": null,
            "delta": {"role": null, "content": "text kept", "reasoning_content": null,
                "tool_calls": null, "function_call": null, "refusal": null}}]});
    let end = json!({"choices": [{"index": null, "delta": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": null}});
    lmx.push(Reply::sse([
        format!("data: {nulls}\n\n"),
        format!("data: {}\n\n", json!({"choices": null, "usage": null})),
        format!("data: {end}\n\n"),
        "data: [DONE]\n\n".into(),
    ]));
    let (t, events) = d.turn(&s, "nulls").await;
    assert_eq!(terminal(&events)["event"], "turn.done", "{events:?}");
    assert_eq!(token_text(&events, &t), "text kept");
    assert_eq!(terminal(&events)["payload"]["stats"]["promptTokens"], 7);
}

#[tokio::test]
async fn a_whole_json_answer_to_a_streaming_request_is_the_reply() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let body = json!({"id": "x", "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "<think>hm</think>The whole answer"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4}});
    lmx.push(Reply::raw(
        "application/json",
        [(Duration::ZERO, body.to_string())],
    ));
    let (t, events) = d.turn(&s, "no stream please").await;
    assert_eq!(terminal(&events)["event"], "turn.done", "{events:?}");
    assert_eq!(token_text(&events, &t), "The whole answer");
    assert!(events.iter().any(|e| e["event"] == "turn.thinking"));
    assert_eq!(terminal(&events)["payload"]["stats"]["completionTokens"], 4);
    // The model cache was kept: the next turn does not ask for the list again.
    let before = lmx.model_list_requests();
    let (_, events) = d.turn(&s, "again").await;
    assert_eq!(terminal(&events)["event"], "turn.done");
    assert_eq!(lmx.model_list_requests(), before);
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(detail["messages"][1]["content"], "The whole answer");
}

#[tokio::test]
async fn an_error_object_mid_stream_carries_the_servers_message() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    lmx.push(Reply::sse([
        chunk(json!({"content": "partial"})),
        "data: {\"error\":{\"message\":\"CUDA out of memory\",\"type\":\"server_error\"}}\n\n"
            .into(),
    ]));
    let (_, events) = d.turn(&s, "oom").await;
    let end = terminal(&events);
    assert_eq!(end["event"], "turn.error");
    let message = end["payload"]["message"].as_str().unwrap();
    assert!(message.contains("CUDA out of memory"), "{message}");
    // The text streamed before the error is kept as a partial reply.
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(detail["messages"][1]["content"], "partial");
    // A JSON error body with status 200 is the server's error too.
    lmx.push(Reply::raw(
        "application/json",
        [(Duration::ZERO, r#"{"error":"model crashed"}"#)],
    ));
    let (_, events) = d.turn(&s, "crash").await;
    let message = terminal(&events)["payload"]["message"].as_str().unwrap();
    assert!(message.contains("model crashed"), "{message}");
}

#[tokio::test]
async fn keep_alive_comments_are_not_silence() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.lmx_timeouts.first_byte = Duration::from_millis(600);
        c.lmx_timeouts.idle = Duration::from_millis(600);
    })
    .await;
    let s = d.create_session(None).await;
    let beat = Duration::from_millis(200);
    let mut pieces: Vec<(Duration, String)> = Vec::new();
    // 2 s of comments before the first token, 2 s more mid-stream: several times both
    // timeouts, but never 600 ms without a byte.
    pieces.extend((0..10).map(|_| (beat, ": keep-alive\n\n".to_owned())));
    pieces.push((beat, chunk(json!({"content": "slow"}))));
    pieces.extend((0..10).map(|_| (beat, ": keep-alive\n\n".to_owned())));
    pieces.push((beat, chunk(json!({"content": " model"}))));
    pieces.push((
        Duration::ZERO,
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n"
            .into(),
    ));
    lmx.push(Reply::raw("text/event-stream", pieces));
    let (t, events) = d.turn(&s, "think long").await;
    assert_eq!(terminal(&events)["event"], "turn.done", "{events:?}");
    assert_eq!(token_text(&events, &t), "slow model");
}

#[tokio::test]
async fn waiters_on_a_model_list_that_never_answers_share_one_check_and_fail_together() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.lmx_timeouts.admin = Duration::from_millis(800);
    })
    .await;
    lmx.set_model_list_hangs(true);
    let mut sessions = Vec::new();
    for _ in 0..6 {
        sessions.push(d.create_session(None).await);
    }
    let mut streams = Vec::new();
    for s in &sessions {
        streams.push(d.ws(s, 0).await);
    }
    let started = Instant::now();
    let mut turns = Vec::new();
    for s in &sessions {
        turns.push(d.submit(s, "hello").await);
    }
    let mut waits = Vec::new();
    for (ws, t) in streams.iter_mut().zip(&turns) {
        let events = ws.envelopes_until(is_terminal_of(t)).await;
        assert_eq!(terminal(&events)["payload"]["code"], "lmx-timeout");
        waits.push(started.elapsed());
    }
    // One check, shared: all six end about one admin timeout after the start, not k of them.
    let last = *waits.iter().max().unwrap();
    assert!(last < Duration::from_millis(2000), "{waits:?}");
    assert_eq!(lmx.model_list_requests(), 1);
    // The failure is not cached: once the server answers, the next turn works.
    lmx.set_model_list_hangs(false);
    let (_, events) = d.turn(&sessions[0], "now").await;
    assert_eq!(terminal(&events)["event"], "turn.done");
}

/// A turn task reports its end and returns on another thread; when the actor sees the join
/// before that report (forced here by a fault hook), the turn still ends as it reported.
#[tokio::test]
async fn a_report_that_races_the_task_join_still_ends_the_turn() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.faults.join_before_reports_on = Some(|content| content.starts_with("race"));
    })
    .await;
    let s = d.create_session(None).await;
    let mut ws = d.ws(&s, 0).await;
    let a = d.submit(&s, "race the join").await;
    let b = d.submit(&s, "race it again").await;
    let events = ws.envelopes_until(is_terminal_of(&b)).await;
    for (turn, text) in [(&a, "echo: race the join"), (&b, "echo: race it again")] {
        let end = events.iter().find(|e| is_terminal_of(turn)(e)).unwrap();
        assert_eq!(end["event"], "turn.done", "{end}");
        assert_eq!(token_text(&events, turn), text);
    }
    let (_, snapshot) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(snapshot["activeTurnId"], Value::Null);
}

#[tokio::test]
async fn a_turn_task_that_panics_ends_its_turn_and_the_queue_moves_on() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.set_echo_delay(Duration::from_millis(20));
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.faults.turn_panics_on = Some(|content| content == "panic now");
    })
    .await;
    let s = d.create_session(None).await;
    let mut ws = d.ws(&s, 0).await;
    let started = Instant::now();
    let a = d.submit(&s, "panic now").await;
    let b = d.submit(&s, "after the panic").await;
    let events = ws.envelopes_until(is_terminal_of(&b)).await;
    let end_a = events
        .iter()
        .find(|e| is_terminal_of(&a)(e))
        .expect("the panicked turn has a terminal event");
    assert_eq!(end_a["event"], "turn.error");
    assert!(
        end_a["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("panicked"),
        "{end_a}"
    );
    assert_eq!(terminal(&events)["event"], "turn.done");
    assert_eq!(token_text(&events, &b), "echo: after the panic");
    assert!(started.elapsed() < Duration::from_secs(5));
    let (_, snapshot) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(snapshot["activeTurnId"], Value::Null);
    assert_eq!(snapshot["queuedTurns"], 0);
    let (_, metrics) = d.get("/v3/metrics").await;
    assert_eq!(metrics["runtime"]["activeTurnCount"], 0, "{metrics}");
}

#[tokio::test]
async fn a_session_actor_that_panics_is_reloaded_from_the_store() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.faults.session_panics_on = Some(|content| content == "crash the actor");
    })
    .await;
    let s = d.create_session(None).await;
    let (_, events) = d.turn(&s, "before").await;
    assert_eq!(terminal(&events)["event"], "turn.done");
    let (status, body) = d
        .post(
            &format!("/v3/sessions/{s}/turns"),
            json!({"clientId": "c", "writerId": "w", "content": "crash the actor", "mode": "chat"}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    // The next request finds the session again, with everything it had committed.
    let (status, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{detail}");
    assert_eq!(detail["messages"][1]["content"], "echo: before");
    let (t, events) = d.turn(&s, "after").await;
    assert_eq!(terminal(&events)["event"], "turn.done");
    assert_eq!(token_text(&events, &t), "echo: after");
    opta_test_support::assert_contiguous(&d.events(&s, 0).await, 1);
    // The dead actor was forgotten by the counters: one resident session, no turn.
    let (_, metrics) = d.get("/v3/metrics").await;
    assert_eq!(metrics["runtime"]["sessionCount"], 1, "{metrics}");
    assert_eq!(metrics["runtime"]["activeTurnCount"], 0, "{metrics}");
}

#[tokio::test]
async fn a_call_in_the_old_function_call_form_runs() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let finish = |reason: &str| {
        format!(
            "data: {}\n\n",
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
        )
    };
    // Streamed: the name first, the arguments in pieces.
    lmx.push(Reply::sse([
        chunk(json!({"function_call": {"name": "list_dir", "arguments": ""}})),
        chunk(json!({"function_call": {"arguments": "{\"path\":"}})),
        chunk(json!({"function_call": {"arguments": "\".\"}"}})),
        finish("function_call"),
        "data: [DONE]\n\n".into(),
    ]));
    lmx.push(Reply::chunks(["listed"]));
    // Whole: a non-streamed answer carrying it in `message`.
    let body = json!({"object": "chat.completion", "choices": [{"index": 0,
        "finish_reason": "function_call", "message": {"role": "assistant", "content": null,
            "function_call": {"name": "list_dir", "arguments": "{}"}}}]});
    lmx.push(Reply::raw(
        "application/json",
        [(Duration::ZERO, body.to_string())],
    ));
    lmx.push(Reply::chunks(["listed again"]));
    for (content, args, answer) in [
        ("streamed", json!({"path": "."}), "listed"),
        ("whole", json!({}), "listed again"),
    ] {
        let (t, events) = d.turn(&s, content).await;
        assert_eq!(terminal(&events)["event"], "turn.done", "{events:?}");
        let of_turn = |name: &str| {
            events
                .iter()
                .find(|e| e["event"] == name && e["payload"]["turnId"] == t.as_str())
                .unwrap()
        };
        let start = of_turn("tool.start");
        assert_eq!(start["payload"]["name"], "list_dir");
        assert_eq!(start["payload"]["args"], args);
        let end = of_turn("tool.end");
        assert_eq!(end["payload"]["result"]["ok"], true, "{end}");
        assert_eq!(token_text(&events, &t), answer);
    }
}
