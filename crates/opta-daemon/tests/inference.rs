//! The link to the inference server: cached preflight, error codes, streaming details and the
//! `/v3/lmx/*` routes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::{Duration, Instant};

use opta_test_support::{Reply, ScriptedLmx, TestDaemon, is_terminal_of, token_text};
use pretty_assertions::assert_eq;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn terminal(events: &[Value]) -> &Value {
    events.last().unwrap()
}

async fn assert_normal_turn_works(d: &TestDaemon, session: &str) {
    let (t, events) = d.turn(session, "still fine").await;
    assert_eq!(
        terminal(&events)["event"],
        "turn.done",
        "{:?}",
        terminal(&events)
    );
    assert_eq!(token_text(&events, &t), "echo: still fine");
}

#[tokio::test]
async fn fifty_turns_within_one_ttl_make_one_model_list_request() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let mut ws = d.ws(&s, 0).await;
    for i in 0..50 {
        let t = d.submit(&s, &format!("turn {i}")).await;
        let events = ws.envelopes_until(is_terminal_of(&t)).await;
        assert_eq!(terminal(&events)["event"], "turn.done");
    }
    assert_eq!(lmx.chat_requests(), 50);
    assert_eq!(lmx.model_list_requests(), 1);
}

#[tokio::test]
async fn a_zero_ttl_asks_before_every_turn() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| c.preflight_ttl = Duration::ZERO).await;
    let s = d.create_session(None).await;
    for i in 0..3 {
        d.turn(&s, &format!("t{i}")).await;
    }
    assert_eq!(lmx.model_list_requests(), 3);
}

#[tokio::test]
async fn concurrent_cold_cache_turns_share_one_request() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let mut sessions = Vec::new();
    for i in 0..8 {
        sessions.push(d.create_session(Some(&format!("cold-{i}"))).await);
    }
    let runs = sessions.iter().map(|s| d.turn(s, "at once"));
    for (_, events) in futures_util::future::join_all(runs).await {
        assert_eq!(terminal(&events)["event"], "turn.done");
    }
    assert_eq!(lmx.model_list_requests(), 1);
}

#[tokio::test]
async fn a_refused_connection_drops_the_cache_and_the_next_turn_asks_again() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let port = lmx.port();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    assert_normal_turn_works(&d, &s).await;
    assert_eq!(lmx.model_list_requests(), 1);
    lmx.stop().await;

    // The cache is warm, so the chat request itself meets the closed port.
    let (_, events) = d.turn(&s, "anyone there?").await;
    let error = terminal(&events);
    assert_eq!(error["event"], "turn.error");
    assert_eq!(error["payload"]["code"], "lmx-connection-refused");
    assert!(
        error["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("refused")
    );

    let lmx = ScriptedLmx::start_on(port).await.unwrap();
    assert_normal_turn_works(&d, &s).await;
    assert_eq!(
        lmx.model_list_requests(),
        1,
        "the next turn asked for the list again"
    );
}

#[tokio::test]
async fn server_not_listening_is_lmx_connection_refused() {
    let free_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let d = TestDaemon::start(&format!("http://127.0.0.1:{free_port}")).await;
    let s = d.create_session(None).await;
    let (_, events) = d.turn(&s, "hello?").await;
    assert_eq!(
        terminal(&events)["payload"]["code"],
        "lmx-connection-refused"
    );
    // The user message stays in history; the daemon still answers.
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(
        detail["messages"],
        json!([{"role": "user", "content": "hello?"}])
    );
    let (status, body) = d.get("/v3/lmx/status").await;
    assert_eq!(
        (status, body["code"].clone()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!("lmx-connection-refused")
        )
    );
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_and_cancel_still_works_meanwhile() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.lmx_timeouts.first_byte = Duration::from_millis(400);
        c.lmx_timeouts.first_token = Duration::from_millis(1200);
    })
    .await;
    let s = d.create_session(None).await;
    lmx.push(Reply::silent());
    let started = Instant::now();
    let (_, events) = d.turn(&s, "wait forever").await;
    let waited = started.elapsed();
    assert_eq!(terminal(&events)["payload"]["code"], "lmx-timeout");
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_normal_turn_works(&d, &s).await;
    // The timeout dropped the cache: the normal turn asked for the list again.
    assert_eq!(lmx.model_list_requests(), 2);
    // Headers, then nothing but keep-alive comments (every 50 ms): the bytes keep the
    // first-byte and idle timeouts quiet, the first-token deadline ends it.
    lmx.push(Reply::hang());
    let started = Instant::now();
    let (_, events) = d.turn(&s, "stuck after headers").await;
    let waited = started.elapsed();
    assert_eq!(terminal(&events)["payload"]["code"], "lmx-timeout");
    assert!(
        terminal(&events)["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("no token within 1200 ms"),
        "{}",
        terminal(&events)
    );
    assert!(
        waited >= Duration::from_millis(1200) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    lmx.wait_streams_dropped(1).await;

    // With a long timeout, a cancel ends the hanging turn at once.
    let d2 = TestDaemon::start(&lmx.url()).await;
    let s2 = d2.create_session(None).await;
    lmx.push(Reply::hang());
    let mut ws = d2.ws(&s2, 0).await;
    let requests_before = lmx.chat_requests();
    let t = d2.submit(&s2, "hang").await;
    ws.envelopes_until(|e| e["event"] == "turn.start").await;
    lmx.wait_chat_requests(requests_before + 1).await;
    let started = Instant::now();
    let (status, _) = d2
        .post(&format!("/v3/sessions/{s2}/cancel"), json!({"turnId": t}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let events = ws.envelopes_until(is_terminal_of(&t)).await;
    assert_eq!(terminal(&events)["payload"]["code"], "cancelled");
    assert!(started.elapsed() < Duration::from_secs(2));
    lmx.wait_streams_dropped(2).await;
}

#[tokio::test]
async fn a_silence_between_chunks_times_out() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.lmx_timeouts.idle = Duration::from_millis(200);
    })
    .await;
    let s = d.create_session(None).await;
    lmx.push(Reply::chunks(["quick ", "then slow"]).with_chunk_delay(Duration::from_millis(600)));
    let (_, events) = d.turn(&s, "x").await;
    // The first chunk is bounded by the first-byte timeout, the second by the idle one.
    assert_eq!(terminal(&events)["payload"]["code"], "lmx-timeout");
    assert_normal_turn_works(&d, &s).await;
}

#[tokio::test]
async fn a_stream_cut_mid_reply_is_lmx_ws_closed_and_keeps_the_partial_reply() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    lmx.push(Reply::chunks(["one ", "two ", "three"]).cut_after(2));
    let (t, events) = d.turn(&s, "count").await;
    assert_eq!(terminal(&events)["payload"]["code"], "lmx-ws-closed");
    assert_eq!(token_text(&events, &t), "one two ");
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(
        detail["messages"][1],
        json!({"role": "assistant", "content": "one two "})
    );
    assert_normal_turn_works(&d, &s).await;
    assert_eq!(lmx.model_list_requests(), 2, "the cut dropped the cache");
}

#[tokio::test]
async fn no_model_loaded_and_model_not_loaded() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.set_loaded(&[]);
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let (_, events) = d.turn(&s, "hi").await;
    let payload = &terminal(&events)["payload"];
    assert_eq!(payload["code"], "no-model-loaded");
    assert!(
        payload["message"]
            .as_str()
            .unwrap()
            .contains("No model is loaded"),
        "{payload}"
    );
    assert_eq!(lmx.chat_requests(), 0, "no chat request without a model");

    lmx.set_loaded(&["default"]);
    let (status, _) = d
        .post(
            "/v3/sessions",
            json!({"sessionId": "mistral", "model": "mistral-7b"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, events) = d.turn("mistral", "hi").await;
    let payload = &terminal(&events)["payload"];
    assert_eq!(payload["code"], "no-model-loaded");
    let message = payload["message"].as_str().unwrap();
    assert!(
        message.contains("mistral-7b") && message.contains("loaded: default"),
        "{message}"
    );
    assert_normal_turn_works(&d, &s).await;
}

#[tokio::test]
async fn http_404_is_no_model_loaded_and_500_carries_the_server_message() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    lmx.push(Reply::status(404, "model 'default' not found"));
    let (_, events) = d.turn(&s, "a").await;
    assert_eq!(terminal(&events)["payload"]["code"], "no-model-loaded");
    lmx.push(Reply::status(500, "CUDA out of memory"));
    let (_, events) = d.turn(&s, "b").await;
    let payload = &terminal(&events)["payload"];
    assert_eq!(payload["code"], Value::Null);
    assert!(
        payload["message"]
            .as_str()
            .unwrap()
            .contains("CUDA out of memory"),
        "{payload}"
    );
    assert_normal_turn_works(&d, &s).await;
}

#[tokio::test]
async fn model_ids_match_as_typed_and_the_canonical_id_is_stored() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.set_loaded(&["mlx-community/Qwen2.5-7B"]);
    let d = TestDaemon::start(&lmx.url()).await;
    let (_, created) = d
        .post(
            "/v3/sessions",
            json!({"sessionId": "q", "model": "qwen2.5-7b"}),
        )
        .await;
    assert_eq!(created["model"], "qwen2.5-7b");
    let (_, events) = d.turn("q", "hi").await;
    assert_eq!(terminal(&events)["event"], "turn.done");
    assert_eq!(lmx.requests()[0]["model"], "mlx-community/Qwen2.5-7B");
    let (_, detail) = d.get("/v3/sessions/q").await;
    assert_eq!(detail["model"], "mlx-community/Qwen2.5-7B");
    // With no model configured, the first loaded one is used and stored.
    let s = d.create_session(None).await;
    d.turn(&s, "hi").await;
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(detail["model"], "mlx-community/Qwen2.5-7B");
}

#[tokio::test]
async fn think_spans_become_thinking_and_missing_usage_is_estimated() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let mut reply = Reply::chunks(["<thi", "nk>plan it</think>", "The ", "answer"]);
    reply.usage = None;
    lmx.push(reply);
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let (t, events) = d.turn(&s, "question").await;
    let thinking: String = events
        .iter()
        .filter(|e| e["event"] == "turn.thinking")
        .filter_map(|e| e["payload"]["text"].as_str())
        .collect();
    assert_eq!(thinking, "plan it");
    assert_eq!(token_text(&events, &t), "The answer");
    let stats = &terminal(&events)["payload"]["stats"];
    assert!(stats["completionTokens"].as_u64().unwrap() >= 3, "{stats}");
    assert!(stats["promptTokens"].as_u64().unwrap() >= 2, "{stats}");
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(detail["messages"][1]["content"], "The answer");
}

#[tokio::test]
async fn another_kind_of_server_started_at_the_same_url_is_recognised() {
    let plain = ScriptedLmx::start().await.unwrap();
    plain.set_admin_api(false);
    let port = plain.port();
    let d = TestDaemon::start(&plain.url()).await;
    let load = json!({"modelId": "other-model"});
    let (status, _) = d.post("/v3/lmx/models/load", load.clone()).await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
    let (_, body) = d.get("/v3/lmx/status").await;
    assert_eq!(body["adminApi"], false);

    // LMX takes the port: its admin API is found on the next admin call.
    plain.stop().await;
    let lmx = ScriptedLmx::start_on(port).await.unwrap();
    let (status, body) = d.post("/v3/lmx/models/load", load.clone()).await;
    assert_eq!(
        (status, body["status"].clone()),
        (StatusCode::OK, json!("loaded"))
    );
    let (_, body) = d.get("/v3/lmx/status").await;
    assert_eq!(body["adminApi"], true);
    // A model LMX does not have is its own 404, not "unsupported".
    let (status, body) = d
        .post("/v3/lmx/models/load", json!({"modelId": "nope"}))
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (StatusCode::NOT_FOUND, json!("lmx-rejected"))
    );

    // And back: a server without the admin API in LMX's place is "unsupported" at once.
    lmx.stop().await;
    let plain = ScriptedLmx::start_on(port).await.unwrap();
    plain.set_admin_api(false);
    let (status, body) = d.post("/v3/lmx/models/unload", load).await;
    assert_eq!(
        (status, body["code"].clone()),
        (StatusCode::NOT_IMPLEMENTED, json!("unsupported")),
        "{body}"
    );
    let (_, body) = d.get("/v3/lmx/status").await;
    assert_eq!(body["adminApi"], false);
}

#[tokio::test]
async fn a_connect_that_never_completes_is_lmx_timeout() {
    // A listener that never accepts, with its accept queue full: further connects hang in
    // SYN retries, as with an unreachable host.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        let attempt = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        match attempt {
            Ok(Ok(stream)) => fillers.push(stream),
            // The queue is full: connects now hang.
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let d = TestDaemon::start_with(&format!("http://{addr}"), |c| {
        c.lmx_timeouts.connect = Duration::from_millis(300);
    })
    .await;
    let s = d.create_session(None).await;
    let started = Instant::now();
    let (_, events) = d.turn(&s, "hello?").await;
    assert_eq!(
        terminal(&events)["payload"]["code"],
        "lmx-timeout",
        "{:?}",
        terminal(&events)
    );
    // Well under the 10 s admin timeout: it was the 300 ms connect timeout that fired.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(listener);
}
