//! End to end against a real llama.cpp server with SmolLM2-135M-Instruct. Ignored in the fast
//! suite; `scripts/test.sh` starts the server and runs them with `--run-ignored all`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::path::Path;

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

/// Replies of the small model are cut at this many tokens (`--max-tokens`): left alone it may
/// ramble on to the end of its 8,192-token context, minutes on this machine's CPU.
const REPLY_TOKEN_CAP: u32 = 300;

/// A daemon in front of `url` whose model rounds are capped at [`REPLY_TOKEN_CAP`] tokens.
async fn real_daemon(url: &str) -> TestDaemon {
    TestDaemon::start_with(url, |c| c.max_tokens = Some(REPLY_TOKEN_CAP)).await
}

fn check_turn(events: &[Value], turn: &str) {
    let done = events
        .iter()
        .find(|e| is_terminal_of(turn)(e))
        .expect("terminal event");
    assert_eq!(done["event"], "turn.done", "{done}");
    let text = token_text(events, turn);
    assert!(!text.trim().is_empty(), "the model streamed no text");
    // (How many `turn.token` events carry it is not fixed: deltas that reach the session
    // together travel as one, so a short reply on a busy machine may be a single event.)
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
    let d = real_daemon(&url).await;
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

/// A session of `model` in `workspace` and one `do` turn in it, followed to its end.
async fn agent_turn(d: &TestDaemon, model: &str, workspace: &Path, content: &str) -> Vec<Value> {
    let (status, created) = d
        .post(
            "/v3/sessions",
            json!({"sessionId": "agent", "model": model,
                   "metadata": {"workspace": workspace.canonicalize().unwrap()}}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{created}");
    let mut ws = d.ws("agent", 0).await;
    let (status, body) = d
        .post(
            "/v3/sessions/agent/turns",
            json!({"clientId": "t", "writerId": "w", "content": content, "mode": "do"}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{body}");
    let turn = body["turnId"].as_str().unwrap().to_owned();
    ws.envelopes_until(is_terminal_of(&turn)).await
}

#[tokio::test]
#[ignore = "needs the real SmolLM2 server: run scripts/test.sh"]
async fn a_real_server_accepts_the_agent_request_with_its_tools() {
    let (url, model) = real_server();
    let (proxy, seen) = real_server_proxy(url, None).await;
    let d = real_daemon(&proxy).await;
    let workspace = tempfile::tempdir().unwrap();
    std::fs::write(
        workspace.path().join("AGENTS.md"),
        "Answer in one sentence.\n",
    )
    .unwrap();
    let events = agent_turn(&d, &model, workspace.path(), "List the files here.").await;
    // The server took the system prompt, AGENTS.md and the tool schemas (about 1,500 tokens)
    // within its context: no refusal of `tools` (that would be a turn.progress saying so;
    // a reply cut at the token cap gets one too, about that), no context error (that would
    // be a turn.error).
    let end = events.last().unwrap();
    assert_eq!(end["event"], "turn.done", "{end}");
    assert!(
        !events.iter().any(|e| e["event"] == "turn.progress"
            && e["payload"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("does not take tools"))),
        "the real server refused tools: {events:?}"
    );
    // Whatever the small model did with the tools, every call it made was answered.
    let starts = events.iter().filter(|e| e["event"] == "tool.start").count();
    let ends = events.iter().filter(|e| e["event"] == "tool.end").count();
    assert_eq!(starts, ends);
    // Every request the daemon made carried the tools and the reply cap, and the real
    // server took them.
    let requests = seen.lock().unwrap().clone();
    assert!(!requests.is_empty());
    for request in &requests {
        assert!(
            request["tools"].as_array().is_some_and(|t| !t.is_empty()),
            "{request}"
        );
        assert_eq!(request["max_tokens"], REPLY_TOKEN_CAP, "{request}");
    }
}

/// What the proxy saw: the chat requests it forwarded, in order.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<Value>>>;

/// A proxy in front of the real server that records each chat request and, given a `tool`,
/// adds `tool_choice` naming it to the first one offering tools. llama-cpp-python then
/// constrains that reply, by a grammar, to a call of the tool: the small model makes a real,
/// streamed tool call, and every later request goes through unchanged.
async fn real_server_proxy(upstream: String, tool: Option<&'static str>) -> (String, Seen) {
    use axum::body::{Body, Bytes};
    use axum::http::{Method, StatusCode, Uri, header};
    use axum::response::Response;

    let seen: Seen = Default::default();
    let forced = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = reqwest::Client::new();
    let log = seen.clone();
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
        let (client, upstream, seen, forced) = (
            client.clone(),
            upstream.clone(),
            log.clone(),
            forced.clone(),
        );
        async move {
            let mut body = body.to_vec();
            if uri.path().ends_with("/chat/completions")
                && let Ok(mut request) = serde_json::from_slice::<Value>(&body)
            {
                if let Some(tool) = tool
                    && request.get("tools").is_some()
                    && !forced.swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    request["tool_choice"] =
                        json!({"type": "function", "function": {"name": tool}});
                }
                seen.lock().unwrap().push(request.clone());
                body = serde_json::to_vec(&request).unwrap();
            }
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            let answer = client
                .request(
                    reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap(),
                    format!("{upstream}{path}"),
                )
                .header(header::CONTENT_TYPE.as_str(), "application/json")
                .body(body)
                .send()
                .await;
            match answer {
                Ok(answer) => Response::builder()
                    .status(answer.status().as_u16())
                    .header(
                        header::CONTENT_TYPE,
                        answer
                            .headers()
                            .get(reqwest::header::CONTENT_TYPE)
                            .map_or("application/json", |v| v.to_str().unwrap_or("")),
                    )
                    .body(Body::from_stream(answer.bytes_stream()))
                    .unwrap(),
                Err(e) => Response::builder()
                    .status(StatusCode::BAD_GATEWAY)
                    .body(Body::from(e.to_string()))
                    .unwrap(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

#[tokio::test]
#[ignore = "needs the real SmolLM2 server: run scripts/test.sh"]
async fn a_real_tool_call_makes_the_round_trip() {
    let (url, model) = real_server();
    let (proxy, seen) = real_server_proxy(url, Some("list_dir")).await;
    let d = real_daemon(&proxy).await;
    let workspace = tempfile::tempdir().unwrap();
    std::fs::write(workspace.path().join("notes.txt"), "hello\n").unwrap();
    let events = agent_turn(
        &d,
        &model,
        workspace.path(),
        "List the files in the current directory.",
    )
    .await;
    let starts: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "tool.start")
        .collect();
    let ends: Vec<&Value> = events.iter().filter(|e| e["event"] == "tool.end").collect();
    // The server streamed the call (repeating its name and id in every fragment, as
    // llama-cpp-python does): one call of the forced tool.
    let first = &starts.first().expect("the forced call")["payload"];
    assert_eq!(first["name"], "list_dir", "{first}");
    assert_eq!(starts.len(), ends.len());
    assert_eq!(ends[0]["payload"]["id"], first["id"]);
    if !first["args"].is_object() {
        // Now and then the small model puts a raw newline inside the grammar's JSON string:
        // the call is answered with the parse error, which goes back like any result.
        let error = ends[0]["payload"]["result"]["error"].as_str().unwrap_or("");
        assert!(error.contains("not valid JSON"), "{error}");
    }
    // Its result went back to the real server, which took the request with it.
    let requests = seen.lock().unwrap().clone();
    assert!(requests.len() >= 2, "{requests:?}");
    let followed = &requests[1]["messages"];
    let answered = followed
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["role"] == "tool" && m["tool_call_id"] == first["id"]);
    assert!(answered, "{followed}");
    let end = events.last().unwrap();
    assert_eq!(end["event"], "turn.done", "{end}");
}
