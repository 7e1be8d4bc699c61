//! Confinement attacked through the daemon, as a hostile repository or local process would:
//! links planted at temporary names, directories swapped while a prompt waits, a workspace
//! renamed and replaced, the daemon's own home inside a workspace, FIFOs where files should be.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

use opta_test_support::{Reply, ScriptedLmx, TestDaemon, WsClient, is_terminal_of};
use reqwest::StatusCode;
use serde_json::{Value, json};

type Dirs = opta_test_support::WorkspaceDirs;

/// A scripted server, a daemon using it, the directories and a session in the workspace.
async fn setup() -> (ScriptedLmx, TestDaemon, Dirs, String) {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let dirs = Dirs::new();
    let s = d.create_session_in(&dirs.ws).await;
    (lmx, d, dirs, s)
}

async fn submit(d: &TestDaemon, session: &str, content: &str, mode: &str) -> (StatusCode, Value) {
    submit_with(d, session, content, mode, json!({})).await
}

async fn submit_with(
    d: &TestDaemon,
    session: &str,
    content: &str,
    mode: &str,
    overrides: Value,
) -> (StatusCode, Value) {
    d.post(
        &format!("/v3/sessions/{session}/turns"),
        json!({"clientId": "test", "writerId": "w1", "content": content, "mode": mode,
               "overrides": overrides}),
    )
    .await
}

async fn run(d: &TestDaemon, session: &str, content: &str, mode: &str) -> Vec<Value> {
    run_with(d, session, content, mode, json!({})).await
}

async fn run_with(
    d: &TestDaemon,
    session: &str,
    content: &str,
    mode: &str,
    overrides: Value,
) -> Vec<Value> {
    let mut ws = d.ws(session, u64::MAX).await;
    let (status, body) = submit_with(d, session, content, mode, overrides).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let turn = body["turnId"].as_str().unwrap().to_owned();
    ws.envelopes_until(is_terminal_of(&turn)).await
}

fn tool_ends(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["event"] == "tool.end")
        .map(|e| &e["payload"]["result"])
        .collect()
}

/// Waits for the next permission request; returns its id.
async fn next_request(ws: &mut WsClient) -> String {
    let asked = ws
        .envelopes_until(|e| e["event"] == "permission.request")
        .await;
    asked.last().unwrap()["payload"]["requestId"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn allow(d: &TestDaemon, s: &str, id: &str) {
    let (status, body) = d
        .post(
            &format!("/v3/sessions/{s}/permissions/{id}"),
            json!({"requestId": id, "decision": "allow", "decidedBy": "test"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_link_planted_at_the_old_temporary_name_is_not_written_through() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let dirs = Dirs::new();
    let target = dirs.outside.join("victim");
    std::fs::write(&target, "untouched").unwrap();
    // The in-process daemon's pid is this test's.
    symlink(
        &target,
        dirs.ws.join(format!(".f.txt.opta-{}", std::process::id())),
    )
    .unwrap();
    let s = d.create_session_in(&dirs.ws).await;
    lmx.push(Reply::tool_call(
        "write_file",
        json!({"path": "f.txt", "content": "pwned"}),
    ));
    lmx.push(Reply::chunks(["done"]));
    let events = run(&d, &s, "write", "do").await;
    assert_eq!(tool_ends(&events)[0]["ok"], true, "{events:?}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
    assert_eq!(
        std::fs::read_to_string(dirs.ws.join("f.txt")).unwrap(),
        "pwned"
    );
}

#[tokio::test]
async fn a_parent_swapped_for_a_link_while_the_prompt_waits_is_not_followed() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let dirs = Dirs::new();
    std::fs::create_dir_all(dirs.ws.join("sub")).unwrap();
    let s = d.create_session_in(&dirs.ws).await;
    lmx.push(Reply::tool_call(
        "write_file",
        json!({"path": "sub/new.txt", "content": "escaped"}),
    ));
    lmx.push(Reply::chunks(["done"]));
    let mut ws = d.ws(&s, u64::MAX).await;
    let (status, body) = submit(&d, &s, "write", "chat").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let turn = body["turnId"].as_str().unwrap().to_owned();
    let id = next_request(&mut ws).await;
    std::fs::rename(dirs.ws.join("sub"), dirs.ws.join("sub-real")).unwrap();
    symlink(&dirs.outside, dirs.ws.join("sub")).unwrap();
    allow(&d, &s, &id).await;
    let events = ws.envelopes_until(is_terminal_of(&turn)).await;
    let result = tool_ends(&events)[0];
    assert_eq!(result["ok"], false, "{result}");
    assert!(
        result["error"]
            .as_str()
            .unwrap_or_default()
            .contains("outside the workspace"),
        "{result}"
    );
    assert!(!dirs.outside.join("new.txt").exists());
}

#[tokio::test]
async fn a_line_added_while_the_prompt_waits_is_not_overwritten() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let dirs = Dirs::new();
    std::fs::write(dirs.ws.join("notes.txt"), "one\n").unwrap();
    let s = d.create_session_in(&dirs.ws).await;
    lmx.push(Reply::tool_call("read_file", json!({"path": "notes.txt"})));
    lmx.push(Reply::tool_call(
        "edit_file",
        json!({"path": "notes.txt", "oldString": "one", "newString": "ONE"}),
    ));
    lmx.push(Reply::chunks(["done"]));
    let mut ws = d.ws(&s, u64::MAX).await;
    let (_, body) = submit(&d, &s, "edit", "chat").await;
    let turn = body["turnId"].as_str().unwrap().to_owned();
    let id = next_request(&mut ws).await;
    std::fs::write(dirs.ws.join("notes.txt"), "one\nthe user's line\n").unwrap();
    allow(&d, &s, &id).await;
    let events = ws.envelopes_until(is_terminal_of(&turn)).await;
    let result = tool_ends(&events)[0];
    assert_eq!(result["ok"], false, "{result}");
    assert!(
        result["error"]
            .as_str()
            .unwrap_or_default()
            .contains("changed on disk"),
        "{result}"
    );
    assert_eq!(
        std::fs::read_to_string(dirs.ws.join("notes.txt")).unwrap(),
        "one\nthe user's line\n"
    );
}

#[tokio::test]
async fn a_workspace_renamed_and_replaced_by_a_link_is_refused_with_workspace_moved() {
    let (lmx, d, dirs, s) = setup().await;
    lmx.push(Reply::chunks(["hello"]));
    run(&d, &s, "hi", "do").await;
    std::fs::rename(&dirs.ws, dirs.ws.with_file_name("ws-old")).unwrap();
    symlink(&dirs.outside, &dirs.ws).unwrap();
    let (status, body) = submit(&d, &s, "again", "do").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "workspace-moved");
    // Still refused after a restart: the pin is stored with the session.
    let d = d.restart().await;
    let (status, body) = submit(&d, &s, "again", "do").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "workspace-moved");
    // Setting the workspace again, the same path too, takes what is there now.
    let (status, _) = d
        .post(
            "/v3/sessions",
            json!({"sessionId": s, "metadata": {"workspace": dirs.ws}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    lmx.push(Reply::chunks(["back"]));
    let events = run(&d, &s, "again", "do").await;
    assert!(events.iter().any(|e| e["event"] == "turn.done"));
}

#[tokio::test]
async fn a_workspace_swapped_before_the_first_turn_is_refused_too() {
    // Pinned when it was set, not when a turn first used it.
    let (_lmx, d, dirs, s) = setup().await;
    std::fs::rename(&dirs.ws, dirs.ws.with_file_name("ws-old")).unwrap();
    symlink(&dirs.outside, &dirs.ws).unwrap();
    let (status, body) = submit(&d, &s, "first", "do").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "workspace-moved");
    // The pin taken at creation is stored with the session.
    let d = d.restart().await;
    let (status, body) = submit(&d, &s, "first", "do").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "workspace-moved");
    // A background process asks the same question.
    let (status, body) = d
        .post(
            "/v3/background/start",
            json!({"sessionId": s, "command": "true"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "workspace-moved");
}

fn allow_any(config: &mut opta_daemon::DaemonConfig) {
    config.agent.allow_any_workspace = true;
}

#[tokio::test]
async fn a_workspace_holding_the_home_is_refused_and_when_allowed_the_home_is_out_of_reach() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let home = d.home().canonicalize().unwrap();
    for dir in [Path::new("/"), home.as_path()] {
        let (status, body) = d
            .post("/v3/sessions", json!({"metadata": {"workspace": dir}}))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{dir:?}: {body}");
        assert_eq!(body["code"], "workspace-refused", "{body}");
    }
    d.stop().await;

    let d = TestDaemon::start_with(&lmx.url(), allow_any).await;
    let home = d.home().canonicalize().unwrap();
    let token_path = home.join("daemon/token");
    std::fs::write(&token_path, "TOKEN-SECRET-123").unwrap();
    std::fs::write(home.join("config.toml"), "port = 9999\n").unwrap();
    let s = d.create_session_in(&home).await;
    // Plan mode never asks: it must still never read the token.
    lmx.push(Reply::tool_call(
        "read_file",
        json!({"path": "daemon/token"}),
    ));
    lmx.push(Reply::tool_call(
        "search_files",
        json!({"pattern": "SECRET-1.3"}),
    ));
    lmx.push(Reply::chunks(["nothing"]));
    let events = run(&d, &s, "read the token", "plan").await;
    for result in tool_ends(&events) {
        assert!(
            !result.to_string().contains("TOKEN-SECRET-123"),
            "the token reached the model: {result}"
        );
    }
    assert_eq!(tool_ends(&events)[0]["ok"], false);
    // `do` writes without asking: still never the home's files.
    lmx.push(Reply::tool_call(
        "write_file",
        json!({"path": "config.toml", "content": "port = 1\n"}),
    ));
    lmx.push(Reply::tool_call(
        "write_file",
        json!({"path": "daemon/token", "content": "mine"}),
    ));
    lmx.push(Reply::chunks(["done"]));
    let events = run(&d, &s, "rewrite", "do").await;
    for result in tool_ends(&events) {
        assert_eq!(result["ok"], false, "{result}");
    }
    // `dangerous` runs every tool without asking: the home is still out of reach.
    lmx.push(Reply::tool_call(
        "read_file",
        json!({"path": "daemon/token"}),
    ));
    lmx.push(Reply::tool_call(
        "edit_file",
        json!({"path": "config.toml", "oldString": "9999", "newString": "1"}),
    ));
    lmx.push(Reply::chunks(["done"]));
    let events = run_with(&d, &s, "anything", "do", json!({"dangerous": true})).await;
    for result in tool_ends(&events) {
        assert_eq!(result["ok"], false, "{result}");
        assert!(!result.to_string().contains("TOKEN-SECRET-123"));
    }
    assert_eq!(
        std::fs::read_to_string(home.join("config.toml")).unwrap(),
        "port = 9999\n"
    );
    assert_eq!(
        std::fs::read_to_string(&token_path).unwrap(),
        "TOKEN-SECRET-123"
    );
    for request in lmx.requests() {
        assert!(!request.to_string().contains("TOKEN-SECRET-123"));
    }
}

fn mkfifo(path: &Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success());
}

#[tokio::test]
async fn a_fifo_agents_md_and_a_fifo_read_never_stall_the_daemon() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let dirs = Dirs::new();
    mkfifo(&dirs.ws.join("AGENTS.md"));
    mkfifo(&dirs.ws.join("pipe"));
    let s = d.create_session_in(&dirs.ws).await;
    lmx.push(Reply::tool_call("read_file", json!({"path": "pipe"})));
    lmx.push(Reply::chunks(["done"]));
    let started = Instant::now();
    let turn = tokio::time::timeout(Duration::from_secs(20), run(&d, &s, "read", "do"))
        .await
        .expect("the turn finished");
    let result = tool_ends(&turn)[0];
    assert_eq!(result["ok"], false);
    assert!(
        result["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not a regular file"),
        "{result}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let (status, _) = d.get("/v3/health").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn an_answer_that_names_a_daemon_decider_is_refused_and_decides_nothing() {
    let (lmx, d, dirs, s) = setup().await;
    lmx.push(Reply::tool_call(
        "write_file",
        json!({"path": "a.txt", "content": "x"}),
    ));
    lmx.push(Reply::chunks(["done"]));
    let mut ws = d.ws(&s, u64::MAX).await;
    let (_, body) = submit(&d, &s, "write", "chat").await;
    let turn = body["turnId"].as_str().unwrap().to_owned();
    let id = next_request(&mut ws).await;
    for reserved in [
        "timeout",
        "cancel",
        "interrupted",
        "mode",
        "grant",
        "Grant",
        "error",
        "dangerous",
    ] {
        let (status, body) = d
            .post(
                &format!("/v3/sessions/{s}/permissions/{id}"),
                json!({"requestId": id, "decision": "allow", "decidedBy": reserved}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{reserved}: {body}");
        assert_eq!(body["details"][0]["path"], "decidedBy");
    }
    assert!(!dirs.ws.join("a.txt").exists(), "nothing was decided");
    let (status, _) = d
        .post(
            &format!("/v3/sessions/{s}/permissions/{id}"),
            json!({"requestId": id, "decision": "allow", "decidedBy": ""}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let events = ws.envelopes_until(is_terminal_of(&turn)).await;
    let end = events.iter().find(|e| e["event"] == "tool.end").unwrap();
    assert_eq!(end["payload"]["approvedBy"], "client");
}

#[tokio::test]
async fn a_command_grant_never_covers_arguments_that_run_or_write_other_things() {
    let (lmx, d, dirs, s) = setup().await;
    lmx.push(Reply::tool_call(
        "run_command",
        json!({"command": "find . -name '*.rs'"}),
    ));
    lmx.push(Reply::tool_call(
        "run_command",
        json!({"command": "find . -exec touch pwned ;"}),
    ));
    lmx.push(Reply::chunks(["done"]));
    let mut ws = d.ws(&s, u64::MAX).await;
    let (_, body) = submit(&d, &s, "find", "do").await;
    let turn = body["turnId"].as_str().unwrap().to_owned();
    d.answer_next(
        &mut ws,
        &s,
        json!({"decision": "allow", "decidedBy": "cli", "remember": "session"}),
    )
    .await;
    // The grant for `find .` does not cover -exec: asked, with the reason; denied here.
    let request = d
        .answer_next(&mut ws, &s, json!({"decision": "deny", "decidedBy": "cli"}))
        .await;
    assert!(
        request["summary"]
            .as_str()
            .unwrap_or_default()
            .contains("-exec"),
        "{request}"
    );
    ws.envelopes_until(is_terminal_of(&turn)).await;
    assert!(!dirs.ws.join("pwned").exists());
}

#[tokio::test]
async fn writes_to_git_hooks_and_config_ask_even_in_do_mode_and_under_a_grant() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let dirs = Dirs::new();
    std::fs::create_dir_all(dirs.ws.join(".git/hooks")).unwrap();
    let s = d.create_session_in(&dirs.ws).await;
    lmx.push(Reply::tool_call(
        "write_file",
        json!({"path": "notes.txt", "content": "fine"}),
    ));
    lmx.push(Reply::tool_call(
        "write_file",
        json!({"path": ".git/hooks/pre-commit", "content": "#!/bin/sh\ntouch pwned\n"}),
    ));
    lmx.push(Reply::chunks(["done"]));
    let mut ws = d.ws(&s, u64::MAX).await;
    let (_, body) = submit(&d, &s, "write", "do").await;
    let turn = body["turnId"].as_str().unwrap().to_owned();
    let request = d
        .answer_next(&mut ws, &s, json!({"decision": "deny", "decidedBy": "cli"}))
        .await;
    assert_eq!(
        request["args"]["path"], ".git/hooks/pre-commit",
        "{request}"
    );
    assert!(
        request["summary"]
            .as_str()
            .unwrap_or_default()
            .contains("git's configuration or hooks"),
        "{request}"
    );
    let events = ws.envelopes_until(is_terminal_of(&turn)).await;
    assert_eq!(tool_ends(&events)[0]["ok"], false);
    assert!(dirs.ws.join("notes.txt").exists(), "an ordinary write ran");
    assert!(!dirs.ws.join(".git/hooks/pre-commit").exists());
}

#[tokio::test]
async fn a_git_grant_asks_again_once_a_hook_or_the_config_changed() {
    let (lmx, d, dirs, s) = setup().await;
    std::fs::create_dir_all(dirs.ws.join(".git/hooks")).unwrap();
    std::fs::write(dirs.ws.join(".git/config"), "[core]\n").unwrap();
    // One grant key (`git status`), different calls (a call repeated a third time is not
    // run). The first is allowed for the session, the second runs on the grant.
    lmx.push(Reply::tool_call(
        "run_command",
        json!({"command": "git status"}),
    ));
    lmx.push(Reply::tool_call(
        "run_command",
        json!({"command": "git status --short"}),
    ));
    lmx.push(Reply::chunks(["done"]));
    let mut ws = d.ws(&s, u64::MAX).await;
    let (_, body) = submit(&d, &s, "status", "do").await;
    let turn = body["turnId"].as_str().unwrap().to_owned();
    d.answer_next(
        &mut ws,
        &s,
        json!({"decision": "allow", "decidedBy": "cli", "remember": "session"}),
    )
    .await;
    let events = ws.envelopes_until(is_terminal_of(&turn)).await;
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "tool.end" && e["payload"]["approvedBy"] == "grant"),
        "the second call ran on the grant"
    );
    // A hook appears: the same grant no longer covers git.
    std::fs::write(
        dirs.ws.join(".git/hooks/post-checkout"),
        "#!/bin/sh\ntouch pwned\n",
    )
    .unwrap();
    lmx.push(Reply::tool_call(
        "run_command",
        json!({"command": "git status --branch"}),
    ));
    lmx.push(Reply::chunks(["done"]));
    let (_, body) = submit(&d, &s, "again", "do").await;
    let turn = body["turnId"].as_str().unwrap().to_owned();
    let request = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        d.answer_next(&mut ws, &s, json!({"decision": "deny", "decidedBy": "cli"})),
    )
    .await
    .expect("the call after the hook appeared asks");
    assert!(
        request["summary"]
            .as_str()
            .unwrap_or_default()
            .contains("asks again"),
        "{request}"
    );
    ws.envelopes_until(is_terminal_of(&turn)).await;
}
