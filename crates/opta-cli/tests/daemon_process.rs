//! `opta daemon run` as a real process: state file, home lock, signals, kill -9 recovery.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use opta_test_support::{
    Reply, ScriptedLmx, WsClient, assert_contiguous, is_terminal_of, token_text,
};
use pretty_assertions::assert_eq;
use serde_json::{Value, json};

const TOKEN: &str = "process-test-token-0123456789abcdef";

fn spawn_daemon(home: &Path, lmx_url: &str) -> Child {
    spawn_daemon_with(home, lmx_url, &[])
}

fn spawn_daemon_with(home: &Path, lmx_url: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_opta"))
        .args(["daemon", "run", "--port", "0", "--lmx-url", lmx_url])
        .args(extra)
        .env("OPTA_HOME", home)
        .env("OPTA_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn opta daemon run")
}

fn state_file(home: &Path) -> PathBuf {
    home.join("daemon").join("state.json")
}

/// Waits until the daemon wrote its state file and answers /health; returns the state.
async fn wait_ready(home: &Path, child: &mut Child) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("daemon exited early: {status}");
        }
        if let Ok(bytes) = std::fs::read(state_file(home))
            && let Ok(state) = serde_json::from_slice::<Value>(&bytes)
            && state["pid"].as_u64() == Some(u64::from(child.id()))
        {
            let url = format!("http://127.0.0.1:{}/health", state["port"]);
            if reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return state;
            }
        }
        assert!(Instant::now() < deadline, "daemon not ready in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "daemon did not exit in time");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn call(port: u64, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("http://127.0.0.1:{port}{path}"))
        .bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn state_file_lock_and_graceful_stop() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut daemon = spawn_daemon(home.path(), &lmx.url());
    let state = wait_ready(home.path(), &mut daemon).await;

    let keys: Vec<_> = state.as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys,
        vec![
            "daemonId",
            "host",
            "logsPath",
            "pid",
            "port",
            "startedAt",
            "token"
        ]
    );
    assert_eq!(state["token"], TOKEN);
    assert_eq!(state["host"], "127.0.0.1");
    assert!(state["daemonId"].as_str().unwrap().starts_with("daemon_"));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state_file(home.path())), 0o600);
    assert_eq!(mode(&home.path().join("daemon")), 0o700);
    assert!(Path::new(state["logsPath"].as_str().unwrap()).exists());

    // A second daemon on the same home refuses with a clear message.
    let second = Command::new(env!("CARGO_BIN_EXE_opta"))
        .args(["daemon", "run", "--port", "0", "--lmx-url", &lmx.url()])
        .env("OPTA_HOME", home.path())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already running"), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", daemon.id())), "{stderr}");

    // SIGTERM: graceful stop, state file removed, exit 0; a subscriber is told 1001
    // (going away: reconnect later) before the process ends.
    let port = state["port"].as_u64().unwrap();
    let (status, session) =
        call(port, reqwest::Method::POST, "/v3/sessions", Some(json!({}))).await;
    assert_eq!(status, 201, "{session}");
    let mut ws = opta_test_support::WsClient::connect(&format!(
        "ws://127.0.0.1:{port}/v3/ws?sessionId={}&afterSeq=0&token={TOKEN}",
        session["sessionId"].as_str().unwrap()
    ))
    .await;
    ws.envelopes_until(|e| e["event"] == "session.snapshot")
        .await;
    signal(&daemon, "TERM");
    let closed = loop {
        match ws.next().await {
            Some(opta_test_support::WsItem::Json(_)) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(closed, Some(opta_test_support::WsItem::Closed(1001, _))),
        "{closed:?}"
    );
    let status = wait_exit(&mut daemon);
    assert!(status.success(), "{status}");
    assert!(!state_file(home.path()).exists());
    // The token never reaches the log.
    let log = std::fs::read_to_string(state["logsPath"].as_str().unwrap()).unwrap();
    assert!(!log.contains(TOKEN));
}

#[tokio::test]
async fn a_stale_state_file_does_not_block_a_start() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join("daemon")).unwrap();
    std::fs::write(
        state_file(home.path()),
        json!({"pid": 999_999, "daemonId": "daemon_deadbeef", "host": "127.0.0.1", "port": 1,
            "token": "x", "startedAt": "2020-01-01T00:00:00.000Z", "logsPath": "/nowhere"})
        .to_string(),
    )
    .unwrap();
    let mut daemon = spawn_daemon(home.path(), &lmx.url());
    let state = wait_ready(home.path(), &mut daemon).await;
    assert_ne!(state["daemonId"], "daemon_deadbeef");
    signal(&daemon, "INT");
    assert!(wait_exit(&mut daemon).success());
}

#[tokio::test]
async fn kill_9_mid_turn_loses_nothing_acknowledged_and_seq_continues() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.push(Reply::slow(400, Duration::from_millis(5)));
    let home = tempfile::tempdir().unwrap();
    let mut daemon = spawn_daemon(home.path(), &lmx.url());
    let state = wait_ready(home.path(), &mut daemon).await;
    let port = state["port"].as_u64().unwrap();

    let (status, _) = call(
        port,
        reqwest::Method::POST,
        "/v3/sessions",
        Some(json!({"sessionId": "crash"})),
    )
    .await;
    assert_eq!(status, 201);
    let ws_url = |p: u64, after: u64| {
        format!("ws://127.0.0.1:{p}/v3/ws?sessionId=crash&afterSeq={after}&token={TOKEN}")
    };
    let mut ws = WsClient::connect(&ws_url(port, 0)).await;
    let (status, body) = call(
        port,
        reqwest::Method::POST,
        "/v3/sessions/crash/turns",
        Some(json!({"clientId": "c", "writerId": "w", "content": "go", "mode": "chat"})),
    )
    .await;
    assert_eq!(status, 202);
    let turn = body["turnId"].as_str().unwrap().to_owned();
    // A second turn is acknowledged (202) and must survive the crash.
    let (status, body) = call(
        port,
        reqwest::Method::POST,
        "/v3/sessions/crash/turns",
        Some(
            json!({"clientId": "c", "writerId": "w", "content": "after the crash", "mode": "chat"}),
        ),
    )
    .await;
    assert_eq!(status, 202);
    let survivor = body["turnId"].as_str().unwrap().to_owned();
    let before = ws
        .envelopes_until(|e| {
            e["event"] == "turn.token"
            // Deltas that arrive together are joined (under load, often): contains, not equals.
            && e["payload"]["text"].as_str().is_some_and(|t| t.contains("w20 "))
        })
        .await;
    daemon.kill().unwrap();
    wait_exit(&mut daemon);
    let seen = before.last().unwrap()["seq"].as_u64().unwrap();

    let mut daemon = spawn_daemon(home.path(), &lmx.url());
    let state = wait_ready(home.path(), &mut daemon).await;
    let port = state["port"].as_u64().unwrap();
    let mut ws = WsClient::connect(&ws_url(port, seen)).await;
    let after = ws.envelopes_until(is_terminal_of(&survivor)).await;
    // Every seq after the last one seen arrives once, in order; nothing is reused.
    assert_contiguous(&after, seen + 1);
    let interrupted: Vec<_> = after.iter().filter(|e| is_terminal_of(&turn)(e)).collect();
    assert_eq!(interrupted.len(), 1);
    assert_eq!(interrupted[0]["payload"]["code"], "interrupted");
    assert_eq!(after.last().unwrap()["event"], "turn.done");
    // The partial reply is exactly the text streamed before the crash.
    let mut all = before;
    all.extend(after);
    let streamed = token_text(&all, &turn);
    assert!(
        streamed.starts_with("w0 w1 ") && streamed.contains("w20 "),
        "{streamed}"
    );
    let (_, detail) = call(port, reqwest::Method::GET, "/v3/sessions/crash", None).await;
    assert_eq!(
        detail["messages"][1],
        json!({"role": "assistant", "content": streamed})
    );
    assert_eq!(
        detail["messages"][3],
        json!({"role": "assistant", "content": "echo: after the crash"})
    );
    signal(&daemon, "TERM");
    assert!(wait_exit(&mut daemon).success());
}

/// Repeated `kill -9` mid-turn: across every crash and restart a client following the session
/// sees each seq exactly once, in order; every acknowledged (202) turn ends exactly once.
#[tokio::test]
async fn repeated_kill_9_loses_no_acknowledged_turn_and_never_reuses_a_seq() {
    const CRASHES: usize = 6;
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.set_echo_delay(Duration::from_millis(4));
    let home = tempfile::tempdir().unwrap();
    let words: Vec<String> = (0..60).map(|i| format!("w{i}")).collect();
    let mut acknowledged: Vec<String> = Vec::new();
    let mut seen: Vec<Value> = Vec::new();
    let mut created = false;
    for crash in 0..=CRASHES {
        let mut daemon = spawn_daemon(home.path(), &lmx.url());
        let state = wait_ready(home.path(), &mut daemon).await;
        let port = state["port"].as_u64().unwrap();
        if !created {
            let (status, _) = call(
                port,
                reqwest::Method::POST,
                "/v3/sessions",
                Some(json!({"sessionId": "loop"})),
            )
            .await;
            assert_eq!(status, 201);
            created = true;
        }
        let last = seen.last().map_or(0, |e| e["seq"].as_u64().unwrap());
        let url =
            format!("ws://127.0.0.1:{port}/v3/ws?sessionId=loop&afterSeq={last}&token={TOKEN}");
        let mut ws = WsClient::connect(&url).await;
        if crash == CRASHES {
            // Final round: let everything acknowledged finish.
            let last_turn = acknowledged.last().cloned().unwrap();
            let rest = ws.envelopes_until(is_terminal_of(&last_turn)).await;
            seen.extend(rest);
            signal(&daemon, "TERM");
            assert!(wait_exit(&mut daemon).success());
            break;
        }
        for j in 0..2 {
            let content = format!("crash {crash} turn {j} {}", words.join(" "));
            let (status, body) = call(
                port,
                reqwest::Method::POST,
                "/v3/sessions/loop/turns",
                Some(json!({"clientId": "c", "writerId": "w", "content": content, "mode": "chat"})),
            )
            .await;
            assert_eq!(status, 202);
            acknowledged.push(body["turnId"].as_str().unwrap().to_owned());
        }
        // Some tokens of this round stream, then the daemon dies.
        let tokens = std::cell::Cell::new(0);
        let got = ws
            .envelopes_until(|e| {
                if e["event"] == "turn.token" {
                    tokens.set(tokens.get() + 1);
                }
                tokens.get() >= 5
            })
            .await;
        seen.extend(got);
        daemon.kill().unwrap();
        wait_exit(&mut daemon);
    }
    // What the client saw across all crashes: every seq once, in order.
    assert_contiguous(&seen, 1);
    // Every acknowledged turn ended exactly once (stored log of the final daemon's home).
    let mut daemon = spawn_daemon(home.path(), &lmx.url());
    let state = wait_ready(home.path(), &mut daemon).await;
    let port = state["port"].as_u64().unwrap();
    let (_, events) = call(port, reqwest::Method::GET, "/v3/sessions/loop/events", None).await;
    let events = events["events"].as_array().unwrap().clone();
    for turn in &acknowledged {
        let ends: Vec<_> = events.iter().filter(|e| is_terminal_of(turn)(e)).collect();
        assert_eq!(ends.len(), 1, "turn {turn} ended {} times", ends.len());
    }
    let interrupted = events
        .iter()
        .filter(|e| e["payload"]["code"] == "interrupted")
        .count();
    assert!(
        (1..=CRASHES).contains(&interrupted),
        "{interrupted} interrupted turns"
    );
    signal(&daemon, "TERM");
    assert!(wait_exit(&mut daemon).success());
}

/// Sends request headers announcing a body and half of it, then nothing.
async fn stall_mid_body(port: u64) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port as u16))
        .await
        .unwrap();
    let head = format!(
        "POST /v3/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Length: 100\r\n\r\n{{\"ti"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp
}

#[tokio::test]
async fn a_stalled_client_delays_sigterm_by_the_grace_period_and_a_second_signal_skips_it() {
    let lmx = ScriptedLmx::start().await.unwrap();
    for (signals, within) in [(1, Duration::from_secs(9)), (2, Duration::from_secs(2))] {
        let home = tempfile::tempdir().unwrap();
        let mut child = spawn_daemon(home.path(), &lmx.url());
        let state = wait_ready(home.path(), &mut child).await;
        let _stalled = stall_mid_body(state["port"].as_u64().unwrap()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        signal(&child, "TERM");
        if signals == 2 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            signal(&child, "INT");
        }
        let status = tokio::task::spawn_blocking(move || wait_exit(&mut child))
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(status.success(), "{signals} signal(s): {status}");
        assert!(took < within, "{signals} signal(s): exited after {took:?}");
        if signals == 1 {
            // It did wait for the client, up to the 5 s grace period.
            assert!(took >= Duration::from_secs(4), "{took:?}");
        }
        // Stopped cleanly: state file gone, lock free for the next daemon.
        assert!(!state_file(home.path()).exists());
    }
}

/// Whether `/proc/PID/environ` or `/proc/PID/cmdline` holds `secret`.
fn proc_shows(pid: u64, secret: &str) -> bool {
    ["environ", "cmdline"].iter().any(|file| {
        std::fs::read(format!("/proc/{pid}/{file}"))
            .map(|bytes| String::from_utf8_lossy(&bytes).contains(secret))
            .unwrap_or(false)
    })
}

#[tokio::test]
async fn a_token_given_in_the_environment_or_on_the_command_line_never_stays_in_proc() {
    let lmx = ScriptedLmx::start().await.unwrap();
    for on_command_line in [false, true] {
        let home = tempfile::tempdir().unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_opta"));
        command
            .args(["daemon", "run", "--port", "0", "--lmx-url", &lmx.url()])
            .env("OPTA_HOME", home.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if on_command_line {
            command.args(["--token", TOKEN]).env_remove("OPTA_TOKEN");
        } else {
            command.env("OPTA_TOKEN", TOKEN);
        }
        let mut child = command.spawn().unwrap();
        let state = wait_ready(home.path(), &mut child).await;
        // The same process, re-executed without it: the token still authenticates.
        assert!(
            !proc_shows(u64::from(child.id()), TOKEN),
            "command line: {on_command_line}"
        );
        let (status, _) = call(
            state["port"].as_u64().unwrap(),
            reqwest::Method::GET,
            "/v3/sessions",
            None,
        )
        .await;
        assert_eq!(status, 200);
        signal(&child, "TERM");
        wait_exit(&mut child);
    }
}

/// `opta daemon start` on `home` with `token` in its environment.
fn daemon_start(home: &Path, lmx_url: &str, token: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_opta"))
        .args(["daemon", "start", "--port", "0", "--lmx-url", lmx_url])
        .env("OPTA_HOME", home)
        .env("OPTA_TOKEN", token)
        .output()
        .unwrap()
}

/// `opta daemon stop` on `home`, which must succeed.
fn daemon_stop(home: &Path) {
    let stopped = Command::new(env!("CARGO_BIN_EXE_opta"))
        .args(["daemon", "stop"])
        .env("OPTA_HOME", home)
        .output()
        .unwrap();
    assert!(stopped.status.success());
}

#[tokio::test]
async fn daemon_start_passes_its_token_through_a_pipe() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let started = daemon_start(home.path(), &lmx.url(), TOKEN);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let state: Value =
        serde_json::from_slice(&std::fs::read(state_file(home.path())).unwrap()).unwrap();
    let pid = state["pid"].as_u64().unwrap();
    assert!(!proc_shows(pid, TOKEN));
    assert_eq!(state["token"], TOKEN);
    daemon_stop(home.path());
}

#[tokio::test]
async fn a_piped_token_is_kept_exactly_and_an_unusable_one_is_refused() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let start = |home: &Path, token: &str| daemon_start(home, &lmx.url(), token);
    let home = tempfile::tempdir().unwrap();
    let broken = start(home.path(), "two\nlines");
    assert_eq!(broken.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&broken.stderr).contains("line break"),
        "{}",
        String::from_utf8_lossy(&broken.stderr)
    );
    for unusable in [" spaced", "tab\there"] {
        let refused = start(home.path(), unusable);
        assert_eq!(refused.status.code(), Some(1), "{unusable:?}");
    }
    let spaced = "inner spaces are kept";
    let started = start(home.path(), spaced);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let state: Value =
        serde_json::from_slice(&std::fs::read(state_file(home.path())).unwrap()).unwrap();
    assert_eq!(state["token"], spaced);
    daemon_stop(home.path());
}

/// The pids a command wrote to `file`, once there are `n`.
async fn pids_in(file: &Path, n: usize) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pids: Vec<u64> = std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.len() == n {
            return pids;
        }
        assert!(
            Instant::now() < deadline,
            "the command never wrote its pids"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates session `procs` working in `ws`.
async fn create_procs_session(port: u64, ws: &Path) {
    let (status, _) = call(
        port,
        reqwest::Method::POST,
        "/v3/sessions",
        Some(json!({"sessionId": "procs", "metadata": {"workspace": ws}})),
    )
    .await;
    assert_eq!(status, 201);
}

/// Submits a `dangerous` turn (commands run without asking) to session `procs`.
async fn submit_dangerous_turn(port: u64) {
    let (status, body) = call(
        port,
        reqwest::Method::POST,
        "/v3/sessions/procs/turns",
        Some(
            json!({"clientId": "c", "writerId": "w", "content": "run", "mode": "do",
                    "overrides": {"dangerous": true}}),
        ),
    )
    .await;
    assert_eq!(status, 202, "{body}");
}

/// Starts a background process and a plain `run_command` in session `procs` (made in `ws`),
/// each with a child that called `setsid`; answers their pids as the host sees them.
async fn start_detaching_commands(port: u64, ws: &Path, lmx: &ScriptedLmx) -> Vec<u64> {
    use opta_test_support::record_own_pid;
    create_procs_session(port, ws).await;
    let detached = |file: &str| {
        format!(
            "setsid sh -c '{}; exec sleep 300' & {}; sleep 300",
            record_own_pid(file),
            record_own_pid(file)
        )
    };
    let (status, body) = call(
        port,
        reqwest::Method::POST,
        "/v3/background/start",
        Some(json!({"sessionId": "procs", "command": detached("bg.pids")})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    lmx.push(Reply::tool_call(
        "run_command",
        json!({"command": detached("cmd.pids")}),
    ));
    submit_dangerous_turn(port).await;
    let mut pids = pids_in(&ws.join("bg.pids"), 2).await;
    pids.extend(pids_in(&ws.join("cmd.pids"), 2).await);
    pids
}

/// Waits (bounded) until none of `pids` runs.
async fn wait_all_gone(pids: &[u64], when: &str) {
    use opta_test_support::process_alive;
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| process_alive(*p)) {
        assert!(Instant::now() < deadline, "still running {when}: {pids:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn commands_and_what_they_detached_die_with_a_killed_daemon_at_its_restart() {
    use opta_test_support::{host_has_cgroups, process_alive};
    if !host_has_cgroups() {
        eprintln!("no cgroups on this host: the cgroup recovery is not tried");
        return;
    }
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let ws = ws.path().canonicalize().unwrap();
    let mut daemon = spawn_daemon(home.path(), &lmx.url());
    let state = wait_ready(home.path(), &mut daemon).await;
    let port = state["port"].as_u64().unwrap();
    let pids = start_detaching_commands(port, &ws, &lmx).await;

    signal(&daemon, "KILL");
    wait_exit(&mut daemon);
    // Nothing killed them: the daemon could not.
    for pid in &pids {
        assert!(process_alive(*pid), "{pid} died with the daemon already");
    }
    let mut daemon = spawn_daemon(home.path(), &lmx.url());
    wait_ready(home.path(), &mut daemon).await;
    wait_all_gone(&pids, "after the restart").await;
    signal(&daemon, "TERM");
    wait_exit(&mut daemon);
}

#[tokio::test]
async fn in_pid_namespaces_commands_die_with_a_killed_daemon_at_once() {
    if !opta_test_support::host_has_user_namespaces() {
        eprintln!("no user namespaces on this host: PID namespaces are not tried");
        return;
    }
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let ws = ws.path().canonicalize().unwrap();
    let mut daemon = spawn_daemon_with(
        home.path(),
        &lmx.url(),
        &["--command-tracking", "pid-namespace"],
    );
    let state = wait_ready(home.path(), &mut daemon).await;
    let port = state["port"].as_u64().unwrap();
    let (_, health) = call(port, reqwest::Method::GET, "/v3/health", None).await;
    assert_eq!(health["processes"], "pid-namespace", "{health}");
    let pids = start_detaching_commands(port, &ws, &lmx).await;

    signal(&daemon, "KILL");
    wait_exit(&mut daemon);
    // No restart needed: each command's supervisor saw the daemon go and ended its namespace.
    wait_all_gone(&pids, "after the daemon's kill -9").await;
}

#[tokio::test]
async fn by_process_group_a_command_left_by_a_killed_daemon_is_ended_at_its_restart() {
    use opta_test_support::{process_alive, record_own_pid};
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let ws = tempfile::tempdir().unwrap();
    let ws = ws.path().canonicalize().unwrap();
    let tracking = ["--command-tracking", "process-group"];
    let mut daemon = spawn_daemon_with(home.path(), &lmx.url(), &tracking);
    let state = wait_ready(home.path(), &mut daemon).await;
    let port = state["port"].as_u64().unwrap();
    let (_, health) = call(port, reqwest::Method::GET, "/v3/health", None).await;
    assert_eq!(health["processes"], "process-group", "{health}");
    create_procs_session(port, &ws).await;
    // A plain run_command (not a background process): it stays in its process group.
    let command = format!(
        "sh -c '{}; exec sleep 300' & {}; sleep 300",
        record_own_pid("cmd.pids"),
        record_own_pid("cmd.pids")
    );
    lmx.push(Reply::tool_call("run_command", json!({"command": command})));
    submit_dangerous_turn(port).await;
    let pids = pids_in(&ws.join("cmd.pids"), 2).await;
    signal(&daemon, "KILL");
    wait_exit(&mut daemon);
    for pid in &pids {
        assert!(process_alive(*pid), "{pid} died with the daemon already");
    }
    let mut daemon = spawn_daemon_with(home.path(), &lmx.url(), &tracking);
    wait_ready(home.path(), &mut daemon).await;
    wait_all_gone(&pids, "after the restart").await;
    signal(&daemon, "TERM");
    wait_exit(&mut daemon);
}
