//! The agent loop end to end: a real daemon on an ephemeral port, the scripted inference
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report
//! server driving tool calls, clients over WebSocket and HTTP.

use std::path::Path;
use std::time::Duration;

use opta_test_support::{Reply, ScriptedLmx, TestDaemon, conversation, is_terminal_of};
use reqwest::StatusCode;
use serde_json::{Value, json};

type Dirs = opta_test_support::WorkspaceDirs;

fn dirs() -> Dirs {
    Dirs::new()
}

/// A scripted server, a daemon using it, and the directories.
async fn setup() -> (ScriptedLmx, TestDaemon, Dirs) {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    (lmx, d, dirs())
}

async fn session_in(d: &TestDaemon, ws: &Path) -> String {
    d.create_session_in(ws).await
}

async fn submit(
    d: &TestDaemon,
    session: &str,
    content: &str,
    mode: &str,
    overrides: Value,
) -> String {
    let (status, body) = d
        .post(
            &format!("/v3/sessions/{session}/turns"),
            json!({"clientId": "test", "writerId": "w1", "content": content, "mode": mode,
                   "overrides": overrides}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["turnId"].as_str().unwrap().to_owned()
}

fn named<'a>(events: &'a [Value], name: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == name).collect()
}

fn tokens(events: &[Value]) -> String {
    named(events, "turn.token")
        .iter()
        .map(|e| e["payload"]["text"].as_str().unwrap_or(""))
        .collect()
}

/// Runs one turn to its end; returns its events (from a subscription opened before it).
async fn run(d: &TestDaemon, session: &str, content: &str, mode: &str) -> Vec<Value> {
    let mut ws = d.ws(session, u64::MAX).await;
    let turn = submit(d, session, content, mode, json!({})).await;
    ws.envelopes_until(is_terminal_of(&turn)).await
}

/// The messages the model got in request `n` (system prompt left out).
fn sent(lmx: &ScriptedLmx, n: usize) -> Vec<Value> {
    conversation(&lmx.requests()[n])
        .as_array()
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn a_read_runs_without_asking_and_its_result_reaches_the_model() {
    let (lmx, d, dirs) = setup().await;
    std::fs::write(dirs.ws.join("notes.txt"), "alpha\nbeta\n").unwrap();
    let s = session_in(&d, &dirs.ws).await;
    lmx.push(Reply::tool_call("read_file", json!({"path": "notes.txt"})));
    lmx.push(Reply::chunks(["It says alpha."]));
    let events = run(&d, &s, "what is in notes.txt?", "chat").await;

    let start = named(&events, "tool.start");
    let end = named(&events, "tool.end");
    assert_eq!(start.len(), 1);
    assert_eq!(start[0]["payload"]["name"], "read_file");
    assert_eq!(start[0]["payload"]["args"], json!({"path": "notes.txt"}));
    assert_eq!(end[0]["payload"]["result"]["ok"], true);
    assert_eq!(
        end[0]["payload"]["result"]["output"],
        "     1\talpha\n     2\tbeta\n"
    );
    assert_eq!(end[0]["payload"]["approvedBy"], "mode");
    assert!(named(&events, "permission.request").is_empty());
    let done = named(&events, "turn.done");
    assert_eq!(done[0]["payload"]["stats"]["toolCalls"], 1);
    assert_eq!(tokens(&events), "It says alpha.");

    // The first request offered the tools; the second carried the call and its result.
    let first = &lmx.requests()[0];
    let offered: Vec<&str> = first["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert!(offered.contains(&"read_file") && offered.contains(&"run_command"));
    let second = sent(&lmx, 1);
    assert_eq!(second[1]["role"], "assistant");
    assert_eq!(second[1]["tool_calls"][0]["function"]["name"], "read_file");
    assert_eq!(second[2]["role"], "tool");
    assert_eq!(second[2]["tool_call_id"], second[1]["tool_calls"][0]["id"]);
    assert!(second[2]["content"].as_str().unwrap().contains("alpha"));

    // The stored history holds the whole exchange; the snapshot counts the call.
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    let roles: Vec<&str> = detail["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
    assert_eq!(detail["toolCallCount"], 1);
    assert_eq!(detail["messages"][3]["content"], "It says alpha.");
}

#[tokio::test]
async fn a_write_in_chat_asks_and_a_second_client_allows_it() {
    let (lmx, d, dirs) = setup().await;
    let s = session_in(&d, &dirs.ws).await;
    lmx.push(Reply::tool_call(
        "write_file",
        json!({"path": "src/new.rs", "content": "fn main() {}\n"}),
    ));
    lmx.push(Reply::chunks(["Written."]));
    let mut watcher = d.ws(&s, u64::MAX).await;
    let turn = submit(&d, &s, "create src/new.rs", "chat", json!({})).await;
    let asked = watcher
        .envelopes_until(|e| e["event"] == "permission.request")
        .await;
    let request = &asked.last().unwrap()["payload"];
    assert_eq!(request["toolName"], "write_file");
    assert_eq!(request["summary"], "write 13 bytes to src/new.rs");
    assert!(
        request["diff"].as_str().unwrap().contains("+fn main() {}"),
        "{request}"
    );
    assert!(
        !dirs.ws.join("src/new.rs").exists(),
        "nothing is written before the answer"
    );

    // Another client, connecting late, sees the request on replay and answers it over WS.
    let mut other = d.ws(&s, 0).await;
    let replayed = other
        .envelopes_until(|e| e["event"] == "permission.request")
        .await;
    let request_id = replayed.last().unwrap()["payload"]["requestId"]
        .as_str()
        .unwrap()
        .to_owned();
    other
        .send(
            json!({"type": "permission.resolve", "sessionId": s, "requestId": request_id,
                     "decision": "allow", "decidedBy": "web-tab"}),
        )
        .await;
    let rest = watcher.envelopes_until(is_terminal_of(&turn)).await;
    let resolved = named(&rest, "permission.resolved");
    assert_eq!(resolved[0]["payload"]["decision"], "allow");
    assert_eq!(resolved[0]["payload"]["decidedBy"], "web-tab");
    let end = named(&rest, "tool.end");
    assert_eq!(end[0]["payload"]["approvedBy"], "web-tab");
    assert_eq!(end[0]["payload"]["result"]["ok"], true);
    assert_eq!(
        std::fs::read_to_string(dirs.ws.join("src/new.rs")).unwrap(),
        "fn main() {}\n"
    );
    assert_eq!(named(&rest, "turn.done").len(), 1);
    // A late answer is a conflict.
    let (status, body) = d
        .post(
            &format!("/v3/sessions/{s}/permissions/{request_id}"),
            json!({"requestId": request_id, "decision": "deny", "decidedBy": "late"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["conflict"], true);
    // The call and the decision are counted (a client's own name is never a label).
    let metrics = d.prometheus().await;
    for line in [
        "opta_tool_calls_total{tool=\"write_file\",outcome=\"ok\"} 1",
        "opta_permission_decisions_total{decision=\"allow\",decided_by=\"client\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in\n{metrics}"
        );
    }
}

#[tokio::test]
async fn a_denial_reaches_the_model_and_nothing_is_written() {
    let (lmx, d, dirs) = setup().await;
    let s = session_in(&d, &dirs.ws).await;
    lmx.push(Reply::tool_call(
        "run_command",
        json!({"command": "touch made"}),
    ));
    lmx.push(Reply::chunks(["OK, I will not."]));
    let mut ws = d.ws(&s, u64::MAX).await;
    let turn = submit(&d, &s, "make a file", "do", json!({})).await;
    d.answer_next(&mut ws, &s, json!({"decision": "deny", "decidedBy": "cli"}))
        .await;
    let rest = ws.envelopes_until(is_terminal_of(&turn)).await;
    let end = named(&rest, "tool.end");
    assert_eq!(end[0]["payload"]["result"]["ok"], false);
    assert!(end[0]["payload"].get("approvedBy").is_none());
    assert!(!dirs.ws.join("made").exists());
    let second = sent(&lmx, 1);
    let result = second[2]["content"].as_str().unwrap();
    assert!(result.contains("denied"), "{result}");
}

#[tokio::test]
async fn an_unanswered_request_is_denied_by_the_timeout() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.agent.permission_timeout = Duration::from_millis(300);
    })
    .await;
    let dirs = dirs();
    let s = session_in(&d, &dirs.ws).await;
    lmx.push(Reply::tool_call(
        "write_file",
        json!({"path": "a.txt", "content": "x"}),
    ));
    lmx.push(Reply::chunks(["Nobody answered."]));
    let events = run(&d, &s, "write a.txt", "chat").await;
    let resolved = named(&events, "permission.resolved");
    assert_eq!(resolved[0]["payload"]["decision"], "deny");
    assert_eq!(resolved[0]["payload"]["decidedBy"], "timeout");
    assert!(!dirs.ws.join("a.txt").exists());
    assert!(
        sent(&lmx, 1)[2]["content"]
            .as_str()
            .unwrap()
            .contains("no one answered")
    );
    assert_eq!(named(&events, "turn.done").len(), 1);
}

#[tokio::test]
async fn two_clients_answering_at_once_one_wins_the_other_gets_409() {
    let (lmx, d, dirs) = setup().await;
    let s = session_in(&d, &dirs.ws).await;
    lmx.push(Reply::tool_call(
        "write_file",
        json!({"path": "a.txt", "content": "x"}),
    ));
    lmx.push(Reply::chunks(["done"]));
    let mut ws = d.ws(&s, u64::MAX).await;
    let turn = submit(&d, &s, "write", "chat", json!({})).await;
    let asked = ws
        .envelopes_until(|e| e["event"] == "permission.request")
        .await;
    let id = asked.last().unwrap()["payload"]["requestId"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/v3/sessions/{s}/permissions/{id}");
    let (a, b) = tokio::join!(
        d.post(
            &path,
            json!({"requestId": id, "decision": "allow", "decidedBy": "a"})
        ),
        d.post(
            &path,
            json!({"requestId": id, "decision": "deny", "decidedBy": "b"})
        ),
    );
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::CONFLICT],
        "{a:?} {b:?}"
    );
    let rest = ws.envelopes_until(is_terminal_of(&turn)).await;
    assert_eq!(named(&rest, "permission.resolved").len(), 1);
    // Unknown ids are 404.
    let (status, _) = d
        .post(
            &format!("/v3/sessions/{s}/permissions/perm_nope"),
            json!({"requestId": "perm_nope", "decision": "allow", "decidedBy": "a"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn plan_mode_refuses_changes_without_asking() {
    let (lmx, d, dirs) = setup().await;
    let s = session_in(&d, &dirs.ws).await;
    lmx.push(
        Reply::tool_call("write_file", json!({"path": "a.txt", "content": "x"}))
            .and_call("run_command", json!({"command": "touch b"})),
    );
    lmx.push(Reply::chunks(["Here is the plan."]));
    let events = run(&d, &s, "plan it", "plan").await;
    assert!(named(&events, "permission.request").is_empty());
    let ends = named(&events, "tool.end");
    assert_eq!(ends.len(), 2);
    for end in &ends {
        let error = end["payload"]["result"]["error"].as_str().unwrap();
        assert!(error.contains("denied in plan mode"), "{error}");
    }
    assert!(!dirs.ws.join("a.txt").exists() && !dirs.ws.join("b").exists());
    // `do` writes without asking; `dangerous` runs commands without asking.
    lmx.push(Reply::tool_call(
        "write_file",
        json!({"path": "a.txt", "content": "x"}),
    ));
    lmx.push(Reply::chunks(["ok"]));
    let events = run(&d, &s, "write it", "do").await;
    assert!(named(&events, "permission.request").is_empty());
    assert_eq!(
        named(&events, "tool.end")[0]["payload"]["approvedBy"],
        "mode"
    );
    assert!(dirs.ws.join("a.txt").exists());
    lmx.push(Reply::tool_call(
        "run_command",
        json!({"command": "touch b"}),
    ));
    lmx.push(Reply::chunks(["ok"]));
    let mut ws = d.ws(&s, u64::MAX).await;
    let turn = submit(&d, &s, "touch", "chat", json!({"dangerous": true})).await;
    let events = ws.envelopes_until(is_terminal_of(&turn)).await;
    assert!(named(&events, "permission.request").is_empty());
    assert_eq!(
        named(&events, "tool.end")[0]["payload"]["approvedBy"],
        "dangerous"
    );
    assert!(dirs.ws.join("b").exists());
}

#[tokio::test]
async fn a_session_grant_answers_later_requests_and_can_be_revoked() {
    let (lmx, d, dirs) = setup().await;
    let s = session_in(&d, &dirs.ws).await;
    lmx.push(Reply::tool_call(
        "run_command",
        json!({"command": "echo one"}),
    ));
    lmx.push(Reply::chunks(["ran"]));
    let mut ws = d.ws(&s, u64::MAX).await;
    let turn = submit(&d, &s, "echo", "chat", json!({})).await;
    d.answer_next(
        &mut ws,
        &s,
        json!({"decision": "allow", "decidedBy": "cli", "remember": "session"}),
    )
    .await;
    ws.envelopes_until(is_terminal_of(&turn)).await;
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(detail["grants"], json!(["run_command:echo one"]));

    // Same program and first argument: no question. A compound command: asked again.
    lmx.push(
        Reply::tool_call("run_command", json!({"command": "echo one two"}))
            .and_call("run_command", json!({"command": "echo one; touch x"})),
    );
    lmx.push(Reply::chunks(["ran"]));
    let mut ws = d.ws(&s, u64::MAX).await;
    let turn = submit(&d, &s, "echo again", "chat", json!({})).await;
    let before = ws
        .envelopes_until(|e| e["event"] == "permission.request")
        .await;
    let first_end = named(&before, "tool.end");
    assert_eq!(first_end[0]["payload"]["approvedBy"], "grant");
    assert!(
        first_end[0]["payload"]["result"]["output"]
            .as_str()
            .unwrap()
            .contains("one two")
    );
    let id = before.last().unwrap()["payload"]["requestId"]
        .as_str()
        .unwrap()
        .to_owned();
    d.post(
        &format!("/v3/sessions/{s}/permissions/{id}"),
        json!({"requestId": id, "decision": "deny", "decidedBy": "cli"}),
    )
    .await;
    ws.envelopes_until(is_terminal_of(&turn)).await;
    assert!(!dirs.ws.join("x").exists());

    // Revoked, it asks again; the grant survives nothing it should not.
    let (status, _) = d
        .request(
            reqwest::Method::DELETE,
            &format!("/v3/sessions/{s}/grants?grant=nope"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = d
        .request(
            reqwest::Method::DELETE,
            &format!("/v3/sessions/{s}/grants"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["grants"], json!([]));
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(detail["grants"], json!([]));
}

#[tokio::test]
async fn text_form_calls_of_three_shapes_run_and_their_markup_is_never_streamed() {
    let (lmx, d, dirs) = setup().await;
    std::fs::write(dirs.ws.join("a.txt"), "AAA\n").unwrap();
    let s = session_in(&d, &dirs.ws).await;
    // Hermes, cut into awkward pieces.
    lmx.push(Reply::chunks([
        "Let me read it.\n<tool",
        "_call>\n{\"name\": \"read_file\", \"argu",
        "ments\": {\"path\": \"a.txt\"}}\n</tool_call>",
    ]));
    // Qwen3-Coder.
    lmx.push(Reply::chunks([
        "<function=list_dir>\n<parameter=path>\n.\n</parameter>\n</function>",
    ]));
    // A bare JSON object.
    lmx.push(Reply::chunks([
        "{\"name\": \"find_files\", ",
        "\"arguments\": {\"pattern\": \"*.txt\"}}",
    ]));
    lmx.push(Reply::chunks(["All done: a < b."]));
    let events = run(&d, &s, "look around", "chat").await;
    let names: Vec<&str> = named(&events, "tool.end")
        .iter()
        .map(|e| e["payload"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["read_file", "list_dir", "find_files"]);
    for end in named(&events, "tool.end") {
        assert_eq!(end["payload"]["result"]["ok"], true, "{end}");
    }
    let text = tokens(&events);
    assert_eq!(text, "Let me read it.\nAll done: a < b.");
    assert!(!text.contains("tool_call") && !text.contains("function="));
    // The calls went back to the server as real calls.
    let last = sent(&lmx, 3);
    let called: Vec<&str> = last
        .iter()
        .filter_map(|m| m["tool_calls"][0]["function"]["name"].as_str())
        .collect();
    assert_eq!(called, ["read_file", "list_dir", "find_files"]);
}

#[tokio::test]
async fn a_call_cut_by_the_length_limit_is_not_run_and_bad_calls_become_errors() {
    let (lmx, d, dirs) = setup().await;
    let s = session_in(&d, &dirs.ws).await;
    lmx.push(
        Reply::tool_call_raw("write_file", "{\"path\": \"big.txt\", \"content\": \"aaaa")
            .with_finish("length"),
    );
    lmx.push(Reply::tool_call_raw(
        "write_file",
        "{\"path\": \"b.txt\", content: oops}",
    ));
    lmx.push(Reply::tool_call("teleport", json!({"to": "mars"})));
    lmx.push(Reply::tool_call("read_file", json!({"path": 7})));
    lmx.push(Reply::chunks(["giving up"]));
    let events = run(&d, &s, "write a big file", "do").await;
    assert!(!dirs.ws.join("big.txt").exists());
    let second = sent(&lmx, 1);
    let note = second.last().unwrap();
    assert_eq!(note["role"], "user");
    assert!(
        note["content"]
            .as_str()
            .unwrap()
            .contains("cut off by the length limit")
    );
    let ends = named(&events, "tool.end");
    assert_eq!(ends.len(), 3, "the cut call never started");
    let errors: Vec<&str> = ends
        .iter()
        .map(|e| e["payload"]["result"]["error"].as_str().unwrap())
        .collect();
    assert!(errors[0].contains("not valid JSON"), "{}", errors[0]);
    assert!(errors[1].contains("no tool called \"teleport\"") && errors[1].contains("read_file"));
    assert!(
        errors[2].contains("invalid arguments for read_file at path"),
        "{}",
        errors[2]
    );
    assert_eq!(named(&events, "turn.done").len(), 1);
    assert!(
        named(&events, "turn.progress")[0]["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("cut off")
    );
}

#[tokio::test]
async fn a_reply_cut_by_the_length_limit_says_so() {
    let (lmx, d, dirs) = setup().await;
    let s = session_in(&d, &dirs.ws).await;
    lmx.push(Reply::chunks(["The answer is"]).with_finish("length"));
    lmx.push(Reply::chunks(["Whole."]));
    let events = run(&d, &s, "a long answer", "chat").await;
    assert_eq!(named(&events, "turn.done").len(), 1);
    let notes = named(&events, "turn.progress");
    assert_eq!(notes.len(), 1, "{notes:?}");
    let note = notes[0]["payload"]["message"].as_str().unwrap();
    assert!(note.contains("cut off by the length limit"), "{note}");
    // A reply that ended by itself gets no such note.
    let events = run(&d, &s, "a short one", "chat").await;
    assert!(named(&events, "turn.progress").is_empty());
}

#[tokio::test]
async fn a_server_that_refuses_tools_gets_them_as_text_from_then_on() {
    let (lmx, d, dirs) = setup().await;
    std::fs::write(dirs.ws.join("a.txt"), "AAA\n").unwrap();
    let s = session_in(&d, &dirs.ws).await;
    lmx.set_rejects_tools(true);
    lmx.push(Reply::chunks([
        "<tool_call>{\"name\": \"read_file\", \"arguments\": {\"path\": \"a.txt\"}}</tool_call>",
    ]));
    lmx.push(Reply::chunks(["It holds AAA."]));
    let events = run(&d, &s, "read a.txt", "chat").await;
    let progress = named(&events, "turn.progress");
    assert_eq!(progress.len(), 1);
    assert!(
        progress[0]["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("does not take tools")
    );
    assert_eq!(
        named(&events, "tool.end")[0]["payload"]["result"]["ok"],
        true
    );
    assert_eq!(tokens(&events), "It holds AAA.");
    // Three requests: refused (not kept by the scripted server), then without tools (the
    // call), then the answer.
    assert_eq!(lmx.chat_requests(), 3);
    let requests = lmx.requests();
    assert!(requests[0].get("tools").is_none() && requests[1].get("tools").is_none());
    let system = requests[0]["messages"][0]["content"].as_str().unwrap();
    assert!(
        system.contains("<tool_call>") && system.contains("read_file"),
        "{system}"
    );
    // The call and its result are replayed as text the server accepts.
    let last = conversation(&requests[1]);
    assert!(last[1]["content"].as_str().unwrap().contains("<tool_call>"));
    assert!(last[1].get("tool_calls").is_none());
    assert_eq!(last[2]["role"], "user");
    assert!(
        last[2]["content"]
            .as_str()
            .unwrap()
            .starts_with("<tool_response name=\"read_file\">")
    );
    // The next turn does not try tools again and says nothing about it.
    let events = run(&d, &s, "thanks", "chat").await;
    assert!(named(&events, "turn.progress").is_empty());
    assert_eq!(lmx.chat_requests(), 4);
}

#[tokio::test]
async fn paths_outside_the_workspace_are_refused_by_every_tool() {
    let (lmx, d, dirs) = setup().await;
    std::os::unix::fs::symlink(&dirs.outside, dirs.ws.join("link")).unwrap();
    let s = session_in(&d, &dirs.ws).await;
    let secret = dirs.outside.join("secret.txt");
    let attempts = [
        ("read_file", json!({"path": "../outside/secret.txt"})),
        ("read_file", json!({"path": secret})),
        ("read_file", json!({"path": "link/secret.txt"})),
        (
            "write_file",
            json!({"path": "../outside/secret.txt", "content": "pwned"}),
        ),
        (
            "write_file",
            json!({"path": "link/new.txt", "content": "pwned"}),
        ),
        (
            "edit_file",
            json!({"path": "link/secret.txt", "oldString": "top", "newString": "no"}),
        ),
        ("list_dir", json!({"path": "link"})),
        (
            "search_files",
            json!({"pattern": "secret", "path": "../outside"}),
        ),
        ("search_files", json!({"pattern": "top.secret"})),
        ("find_files", json!({"pattern": "*.txt", "path": "link"})),
        ("find_files", json!({"pattern": "**/secret.txt"})),
    ];
    let mut reply = Reply::tool_call(attempts[0].0, attempts[0].1.clone());
    for (name, args) in &attempts[1..] {
        reply = reply.and_call(name, args.clone());
    }
    lmx.push(reply);
    lmx.push(Reply::chunks(["nothing"]));
    let events = run(&d, &s, "escape", "do").await;
    let ends = named(&events, "tool.end");
    assert_eq!(ends.len(), attempts.len());
    for (end, (name, args)) in ends.iter().zip(&attempts) {
        let result = &end["payload"]["result"];
        let shown = result.to_string();
        assert!(!shown.contains("top secret"), "{name} {args}: {shown}");
        match name {
            // A search of the whole workspace finds nothing (the symlink is not followed).
            &"search_files" | &"find_files" if args.get("path").is_none() => {
                assert_eq!(result["ok"], true, "{name} {args}: {shown}");
            }
            _ => assert!(
                result["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("outside the workspace"),
                "{name} {args}: {shown}"
            ),
        }
    }
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "top secret\n");
    assert!(!dirs.outside.join("new.txt").exists());
}

fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

async fn wait_for_file(path: &Path) -> String {
    for _ in 0..200 {
        if let Ok(text) = std::fs::read_to_string(path)
            && text.ends_with('\n')
        {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} never appeared", path.display());
}

#[tokio::test]
async fn run_command_is_killed_with_its_whole_group_on_cancel_and_on_timeout() {
    let (lmx, d, dirs) = setup().await;
    let s = session_in(&d, &dirs.ws).await;
    // A shell that starts a grandchild and waits: cancel must take both.
    let command = "sleep 60 & echo $! > child.pid; echo $$ >> child.pid; wait";
    lmx.push(Reply::tool_call("run_command", json!({"command": command})));
    let mut ws = d.ws(&s, u64::MAX).await;
    let turn = submit(&d, &s, "run", "chat", json!({"dangerous": true})).await;
    let pids = wait_for_file(&dirs.ws.join("child.pid")).await;
    let pids: Vec<i32> = pids.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert!(pids.iter().all(|p| alive(*p)));
    let (status, _) = d
        .post(&format!("/v3/sessions/{s}/cancel"), json!({"turnId": turn}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let events = ws.envelopes_until(is_terminal_of(&turn)).await;
    let end = named(&events, "tool.end");
    assert_eq!(end.len(), 1, "the running call got its tool.end");
    assert!(
        end[0]["payload"]["result"]["error"]
            .as_str()
            .unwrap()
            .contains("cancelled")
    );
    for _ in 0..100 {
        if pids.iter().all(|p| !alive(*p)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "{pids:?} survived the cancel"
    );

    // A timeout kills the group too and tells the model.
    std::fs::remove_file(dirs.ws.join("child.pid")).unwrap();
    lmx.push(Reply::tool_call(
        "run_command",
        json!({"command": command, "timeoutSecs": 1}),
    ));
    lmx.push(Reply::chunks(["too slow"]));
    let events = {
        let mut ws = d.ws(&s, u64::MAX).await;
        let turn = submit(&d, &s, "run", "chat", json!({"dangerous": true})).await;
        ws.envelopes_until(is_terminal_of(&turn)).await
    };
    let error = named(&events, "tool.end")[0]["payload"]["result"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(error.contains("timed out after 1 s"), "{error}");
    let pids: Vec<i32> = std::fs::read_to_string(dirs.ws.join("child.pid"))
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "{pids:?} survived the timeout"
    );
}

#[tokio::test]
async fn repeated_calls_and_too_many_rounds_end_the_turn_with_tool_limit() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| c.agent.max_tool_rounds = 6).await;
    let dirs = dirs();
    let s = session_in(&d, &dirs.ws).await;
    for _ in 0..4 {
        lmx.push(Reply::tool_call("list_dir", json!({})));
    }
    let events = run(&d, &s, "loop", "chat").await;
    let ends = named(&events, "tool.end");
    assert_eq!(ends.len(), 4);
    assert!(
        ends[2]["payload"]["result"]["error"]
            .as_str()
            .unwrap()
            .contains("three times in a row")
    );
    let error = named(&events, "turn.error");
    assert_eq!(error[0]["payload"]["code"], "tool-limit");
    assert_eq!(lmx.requests().len(), 4);

    for i in 0..6 {
        lmx.push(Reply::tool_call(
            "list_dir",
            json!({"path": format!("d{i}")}),
        ));
    }
    let events = run(&d, &s, "wander", "chat").await;
    let error = named(&events, "turn.error");
    assert_eq!(error[0]["payload"]["code"], "tool-limit");
    assert!(
        error[0]["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("6 tool rounds")
    );
    assert_eq!(named(&events, "tool.end").len(), 6);
}

#[tokio::test]
async fn a_restart_resolves_the_waiting_request_and_ends_the_open_call() {
    let (lmx, d, dirs) = setup().await;
    let s = session_in(&d, &dirs.ws).await;
    lmx.push(Reply::tool_call(
        "write_file",
        json!({"path": "a.txt", "content": "x"}),
    ));
    let mut ws = d.ws(&s, u64::MAX).await;
    let turn = submit(&d, &s, "write", "chat", json!({})).await;
    ws.envelopes_until(|e| e["event"] == "permission.request")
        .await;
    drop(ws);
    let d = d.restart().await;
    let events = d.events(&s, 0).await;
    let after: Vec<&Value> = events
        .iter()
        .skip_while(|e| e["event"] != "permission.request")
        .collect();
    let order: Vec<&str> = after.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        &order[..4],
        [
            "permission.request",
            "permission.resolved",
            "tool.end",
            "turn.error"
        ],
        "{order:?}"
    );
    assert_eq!(after[1]["payload"]["decidedBy"], "interrupted");
    let request_id = after[0]["payload"]["requestId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(after[3]["payload"]["code"], "interrupted");
    assert_eq!(after[3]["payload"]["turnId"], turn.as_str());
    // The next turn's request answers the interrupted call, so servers accept it.
    lmx.push(Reply::chunks(["fine"]));
    let events = run(&d, &s, "again", "chat").await;
    assert_eq!(named(&events, "turn.done").len(), 1);
    let sent = conversation(lmx.requests().last().unwrap());
    let calls = sent
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m.get("tool_calls").is_some())
        .count();
    let results = sent
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .count();
    assert_eq!((calls, results), (1, 1), "{sent}");

    // A late answer from a client that missed all this is told the request was decided
    // (409), also by a daemon that has not seen it since it started.
    let d = d.restart().await;
    let answer = |id: &str| json!({"requestId": id, "decision": "allow", "decidedBy": "late"});
    let path = |id: &str| format!("/v3/sessions/{s}/permissions/{id}");
    let (status, body) = d.post(&path(&request_id), answer(&request_id)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["conflict"], true, "{body}");
    // One it never issued is unknown.
    let (status, body) = d.post(&path("perm_never"), answer("perm_never")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(!std::path::Path::new(&dirs.ws.join("a.txt")).exists());
}

#[tokio::test]
async fn a_session_workspace_must_be_an_existing_absolute_directory() {
    let (_lmx, d, dirs) = setup().await;
    let file = dirs.ws.join("file.txt");
    std::fs::write(&file, "x").unwrap();
    for bad in [
        json!("relative/dir"),
        json!(dirs.ws.join("missing")),
        json!(file),
        json!(42),
    ] {
        let (status, body) = d
            .post("/v3/sessions", json!({"metadata": {"workspace": bad}}))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["details"][0]["path"], "metadata.workspace", "{body}");
    }
    let (status, list) = d.get("/v3/sessions").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["sessions"], json!([]), "nothing was created");
    let (status, _) = d
        .post("/v3/sessions", json!({"metadata": {"workspace": null}}))
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "null is absence: the daemon's workspace"
    );
}

#[tokio::test]
async fn a_panic_inside_a_tool_call_still_ends_the_call_and_the_turn() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.faults.tool_panics_on = Some(|args| args.contains("boom"));
    })
    .await;
    let dirs = dirs();
    let s = session_in(&d, &dirs.ws).await;
    lmx.push(Reply::tool_call("read_file", json!({"path": "boom"})));
    let events = run(&d, &s, "explode", "chat").await;
    let order: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .filter(|e| e.starts_with("tool.") || e.starts_with("turn.e"))
        .collect();
    assert_eq!(order, ["tool.start", "tool.end", "turn.error"]);
    let end = named(&events, "tool.end");
    assert!(
        end[0]["payload"]["result"]["error"]
            .as_str()
            .unwrap()
            .contains("not finished")
    );
    // The session goes on.
    lmx.push(Reply::chunks(["still here"]));
    let events = run(&d, &s, "hello", "chat").await;
    assert_eq!(tokens(&events), "still here");
}
