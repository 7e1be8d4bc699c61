//! End to end against a real llama.cpp server with SmolLM2-135M-Instruct. Ignored in the fast
//! suite; `scripts/test.sh` starts the server and runs them with `--run-ignored all`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use opta_test_support::{TestDaemon, is_terminal_of, token_text};
use pretty_assertions::assert_eq;
use serde_json::{Value, json};

fn real_server() -> (String, String) {
    let url = std::env::var("OPTA_REAL_LMX_URL").expect(
        "OPTA_REAL_LMX_URL is not set: run scripts/test.sh, which starts the real server \
         (scripts/real-lmx.sh start) for these tests",
    );
    let model = std::env::var("OPTA_REAL_MODEL").unwrap_or_else(|_| "smollm2-135m-instruct".into());
    (url, model)
}

fn check_turn(events: &[Value], turn: &str) {
    let done = events
        .iter()
        .find(|e| is_terminal_of(turn)(e))
        .expect("terminal event");
    assert_eq!(done["event"], "turn.done", "{done}");
    let text = token_text(events, turn);
    assert!(!text.trim().is_empty(), "the model streamed no text");
    let tokens = events.iter().filter(|e| e["event"] == "turn.token").count();
    assert!(
        tokens >= 2,
        "expected a streamed reply, got {tokens} token events"
    );
    let stats = &done["payload"]["stats"];
    assert!(stats["completionTokens"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["promptTokens"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(stats["tokens"], stats["completionTokens"]);
    assert!(
        stats["firstTokenLatencyMs"].as_f64().unwrap() > 0.0,
        "{stats}"
    );
    assert!(stats["speed"].as_f64().unwrap() > 0.0, "{stats}");
}

#[tokio::test]
#[ignore = "needs the real SmolLM2 server: run scripts/test.sh"]
async fn a_real_model_streams_a_reply_over_ws_and_sse() {
    let (url, model) = real_server();
    let d = TestDaemon::start(&url).await;
    let (status, created) = d
        .post("/v3/sessions", json!({"sessionId": "real", "model": model}))
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{created}");
    let mut ws = d.ws("real", 0).await;
    let mut sse = d.sse("real", 0).await;
    let turn = d.submit("real", "Name three colours.").await;
    let over_ws = ws.envelopes_until(is_terminal_of(&turn)).await;
    let over_sse = sse.envelopes_until(is_terminal_of(&turn)).await;
    check_turn(&over_ws, &turn);
    assert_eq!(over_ws, over_sse, "both planes carry the same envelopes");
    // The reply is in history and the next turn sees it.
    let (_, detail) = d.get("/v3/sessions/real").await;
    assert_eq!(
        detail["messages"][1]["content"].as_str(),
        Some(token_text(&over_ws, &turn).as_str())
    );
    let second = d.submit("real", "Now name one more.").await;
    let events = ws.envelopes_until(is_terminal_of(&second)).await;
    check_turn(&events, &second);
    let (status, models) = d.get("/v3/lmx/models").await;
    assert_eq!(status, reqwest::StatusCode::OK);
    assert_eq!(models["source"], "v1");
    assert_eq!(models["models"][0]["model_id"], model.as_str());
    assert_eq!(models["models"][0]["status"], "loaded");
}

#[tokio::test]
#[ignore = "needs the real SmolLM2 server: run scripts/test.sh"]
async fn a_real_server_accepts_the_agent_request_with_its_tools() {
    let (url, model) = real_server();
    let d = TestDaemon::start(&url).await;
    let workspace = tempfile::tempdir().unwrap();
    std::fs::write(
        workspace.path().join("AGENTS.md"),
        "Answer in one sentence.\n",
    )
    .unwrap();
    let (status, created) = d
        .post(
            "/v3/sessions",
            json!({"sessionId": "agent", "model": model,
                   "metadata": {"workspace": workspace.path().canonicalize().unwrap()}}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{created}");
    let mut ws = d.ws("agent", 0).await;
    let (status, body) = d
        .post(
            "/v3/sessions/agent/turns",
            json!({"clientId": "t", "writerId": "w", "content": "List the files here.",
                   "mode": "do"}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{body}");
    let turn = body["turnId"].as_str().unwrap().to_owned();
    let events = ws.envelopes_until(is_terminal_of(&turn)).await;
    // The server took the system prompt, AGENTS.md and the tool schemas (about 1,500 tokens)
    // within its context: no refusal of `tools` (that would be a turn.progress), no context
    // error (that would be a turn.error).
    let end = events.last().unwrap();
    assert_eq!(end["event"], "turn.done", "{end}");
    assert!(
        !events.iter().any(|e| e["event"] == "turn.progress"),
        "the real server refused tools: {events:?}"
    );
    // Whatever the small model did with the tools, every call it made was answered.
    let starts = events.iter().filter(|e| e["event"] == "tool.start").count();
    let ends = events.iter().filter(|e| e["event"] == "tool.end").count();
    assert_eq!(starts, ends);
}
