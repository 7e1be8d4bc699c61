//! Background processes end to end: real processes started over HTTP, their output read by
//! seq, limits, kill escalation, timeouts, shutdown, and their events in the session.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::path::Path;
use std::time::{Duration, Instant};

use opta_test_support::{ScriptedLmx, TestDaemon, group_alive};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn session_in(d: &TestDaemon, ws: &Path) -> String {
    d.create_session_in(ws).await
}

async fn start(d: &TestDaemon, session: &str, command: &str, extra: Value) -> Value {
    let mut body = json!({"sessionId": session, "command": command});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let (status, answer) = d.post("/v3/background/start", body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    answer["process"].clone()
}

/// Polls the process until `done` holds (bounded).
/// A daemon on a scripted server and a session whose workspace is a new temporary directory
/// (kept alive by the returned guard).
async fn daemon_with_session() -> (ScriptedLmx, TestDaemon, tempfile::TempDir, String) {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let s = session_in(&d, &dir.path().canonicalize().unwrap()).await;
    (lmx, d, dir, s)
}

/// Submits a `do` turn with `dangerous: true` and answers its turn id.
async fn submit_dangerous(d: &TestDaemon, session: &str, content: &str) -> String {
    let (status, body) = d
        .post(
            &format!("/v3/sessions/{session}/turns"),
            json!({"clientId": "t", "writerId": "w", "content": content,
                   "mode": "do", "overrides": {"dangerous": true}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["turnId"].as_str().unwrap().to_owned()
}

async fn wait_for(d: &TestDaemon, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = d.get(&format!("/v3/background/{id}/status")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if done(&body["process"]) {
            return body["process"].clone();
        }
        assert!(Instant::now() < deadline, "never reached: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn output_is_read_by_seq_across_both_streams_and_events_reach_the_session() {
    let (_lmx, d, _dir, s) = daemon_with_session().await;
    let mut ws = d.ws(&s, u64::MAX).await;
    let process = start(
        &d,
        &s,
        "echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three; exit 3",
        json!({"label": "counter"}),
    )
    .await;
    let id = process["processId"].as_str().unwrap().to_owned();
    assert!(id.starts_with("proc_"));
    assert_eq!(process["state"], "running");
    assert_eq!(process["label"], "counter");
    let (_, list) = d.get(&format!("/v3/background?sessionId={s}")).await;
    assert_eq!(list["processes"][0]["processId"], id.as_str());

    let ended = wait_for(&d, &id, |p| p["state"] != "running").await;
    assert_eq!(ended["state"], "failed");
    assert_eq!(ended["exitCode"], 3);
    assert!(ended["endedAt"].is_string());

    let (status, all) = d.get(&format!("/v3/background/{id}/output")).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    let text: Vec<(&str, &str)> = all["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["stream"].as_str().unwrap(), c["text"].as_str().unwrap()))
        .collect();
    assert_eq!(
        text,
        [
            ("stdout", "one\n"),
            ("stderr", "two\n"),
            ("stdout", "three\n")
        ]
    );
    assert_eq!(all["nextSeq"], 3);
    assert_eq!(all["hasMore"], false);
    // Incrementally: after seq 1, one at a time, one stream.
    let (_, page) = d
        .get(&format!("/v3/background/{id}/output?afterSeq=1&limit=1"))
        .await;
    assert_eq!(page["chunks"][0]["seq"], 2);
    assert_eq!(
        (page["nextSeq"].as_u64(), page["hasMore"].as_bool()),
        (Some(2), Some(true))
    );
    let (_, stdout) = d
        .get(&format!("/v3/background/{id}/output?stream=stdout"))
        .await;
    assert_eq!(stdout["chunks"].as_array().unwrap().len(), 2);
    let (status, _) = d.get(&format!("/v3/background/{id}/output?limit=0")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The session saw it all as events, in order.
    let events = ws
        .envelopes_until(|e| {
            e["event"] == "background.status" && e["payload"]["process"]["state"] != "running"
        })
        .await;
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "background.status",
            "background.output",
            "background.output",
            "background.output",
            "background.status"
        ]
    );
    assert_eq!(events[0]["payload"]["reason"], "started");
    assert_eq!(events[4]["payload"]["previousState"], "running");
    assert_eq!(events[2]["payload"]["stream"], "stderr");
    let (status, _) = d.get("/v3/background/proc_nope/status").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn five_run_at_most_and_a_kill_escalates_and_leaves_no_process_of_the_group() {
    let (_lmx, d, _dir, s) = daemon_with_session().await;
    // Each ignores SIGTERM (the disposition is inherited by its child too).
    let stubborn = "trap '' TERM; sleep 60 & sleep 60; wait";
    let mut ids = Vec::new();
    for _ in 0..5 {
        let p = start(&d, &s, stubborn, json!({})).await;
        ids.push((
            p["processId"].as_str().unwrap().to_owned(),
            p["pid"].as_u64().unwrap(),
        ));
    }
    let (status, body) = d
        .post(
            "/v3/background/start",
            json!({"sessionId": s, "command": "true"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "process-limit");

    let (id, pgid) = ids[0].clone();
    let killed_at = Instant::now();
    let (status, answer) = d
        .post(&format!("/v3/background/{id}/kill"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["killed"], true);
    let ended = wait_for(&d, &id, |p| p["state"] != "running").await;
    assert_eq!(ended["state"], "killed");
    let took = killed_at.elapsed();
    assert!(
        took >= Duration::from_secs(4),
        "SIGTERM was ignored, so SIGKILL came after 5 s: {took:?}"
    );
    assert!(!group_alive(pgid), "the group survived the kill");
    // A kill of an ended process changes nothing.
    let (_, again) = d
        .post(
            &format!("/v3/background/{id}/kill"),
            json!({"signal": "SIGKILL"}),
        )
        .await;
    assert_eq!(again["killed"], false);
    // SIGKILL at once for the rest.
    for (id, pgid) in &ids[1..] {
        d.post(
            &format!("/v3/background/{id}/kill"),
            json!({"signal": "SIGKILL"}),
        )
        .await;
        wait_for(&d, id, |p| p["state"] == "killed").await;
        assert!(!group_alive(*pgid));
    }
    // A slot is free again.
    start(&d, &s, "true", json!({})).await;
}

#[tokio::test]
async fn a_timeout_stops_the_group_and_shutdown_stops_the_rest() {
    let (_lmx, d, _dir, s) = daemon_with_session().await;
    let timed = start(
        &d,
        &s,
        // It ignores SIGTERM: the timeout's SIGKILL comes 3 s later.
        "trap '' TERM; sleep 60 & sleep 60; wait",
        json!({"timeoutMs": 300}),
    )
    .await;
    let id = timed["processId"].as_str().unwrap().to_owned();
    assert_eq!(timed["timeoutMs"], 300);
    let started = Instant::now();
    let ended = wait_for(&d, &id, |p| p["state"] != "running").await;
    assert_eq!(ended["state"], "timeout");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(!group_alive(timed["pid"].as_u64().unwrap()));

    // cwd is confined to the workspace; a bad timeout is refused.
    let (status, body) = d
        .post(
            "/v3/background/start",
            json!({"sessionId": s, "command": "pwd", "cwd": "../"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = d
        .post(
            "/v3/background/start",
            json!({"sessionId": s, "command": "pwd", "timeoutMs": 90_000_000}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A running process keeps its session resident, and shutdown ends its group.
    let long = start(&d, &s, "sleep 60 & sleep 60; wait", json!({"timeoutMs": 0})).await;
    assert!(long["timeoutMs"].is_null());
    let pgid = long["pid"].as_u64().unwrap();
    assert!(group_alive(pgid));
    d.stop().await;
    assert!(!group_alive(pgid), "shutdown left the group running");
}

#[tokio::test]
async fn a_flood_of_output_keeps_the_last_mebibyte() {
    let (_lmx, d, _dir, s) = daemon_with_session().await;
    let rss_kib = || -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let before = rss_kib();
    let p = start(
        &d,
        &s,
        "head -c 5242880 /dev/zero | tr '\\0' a; echo END",
        json!({}),
    )
    .await;
    let id = p["processId"].as_str().unwrap().to_owned();
    wait_for(&d, &id, |p| p["state"] == "completed").await;
    let mut after = 0;
    let mut kept = 0usize;
    let mut first = None;
    let mut last_text = String::new();
    loop {
        let (_, page) = d
            .get(&format!(
                "/v3/background/{id}/output?afterSeq={after}&limit=500"
            ))
            .await;
        for chunk in page["chunks"].as_array().unwrap() {
            first.get_or_insert(chunk["seq"].as_u64().unwrap());
            kept += chunk["text"].as_str().unwrap().len();
            last_text = chunk["text"].as_str().unwrap().to_owned();
        }
        after = page["nextSeq"].as_u64().unwrap();
        if page["hasMore"] == false {
            break;
        }
    }
    assert!(kept <= 1024 * 1024, "{kept} bytes kept");
    assert!(kept > 900 * 1024, "{kept} bytes kept");
    assert!(
        first.unwrap() > 1,
        "the oldest chunks were dropped, and the seq says so"
    );
    assert!(last_text.ends_with("END\n"), "the newest output is kept");
    // The daemon runs in this process: 5 MiB went through it, far less stays.
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    assert!(
        grown_mib < 48,
        "memory grew by {grown_mib} MiB for 5 MiB of output"
    );
}

#[tokio::test]
async fn a_session_with_a_running_process_is_not_evicted() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.limits.idle_eviction = Duration::from_millis(100);
        c.limits.eviction_interval = Duration::from_millis(50);
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let s = session_in(&d, &dir.path().canonicalize().unwrap()).await;
    let p = start(&d, &s, "sleep 30", json!({})).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, metrics) = d.get("/v3/metrics").await;
    assert_eq!(metrics["runtime"]["sessionCount"], 1, "{metrics}");
    assert_eq!(metrics["runtime"]["evictedSessionCount"], 0, "{metrics}");
    let id = p["processId"].as_str().unwrap().to_owned();
    d.post(
        &format!("/v3/background/{id}/kill"),
        json!({"signal": "SIGKILL"}),
    )
    .await;
    wait_for(&d, &id, |p| p["state"] == "killed").await;
    // Ended, it no longer holds the session in memory.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = d.get("/v3/metrics").await;
        if metrics["runtime"]["evictedSessionCount"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never evicted: {metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_agent_turn_starts_a_server_reads_its_output_and_stops_it() {
    let (lmx, d, _dir, s) = daemon_with_session().await;
    lmx.set_waits_for_replies(true);
    lmx.push(opta_test_support::Reply::tool_call(
        "bg_start",
        json!({"command": "echo listening on 8080; sleep 60", "label": "server"}),
    ));
    let mut ws = d.ws(&s, u64::MAX).await;
    let turn = submit_dangerous(&d, &s, "start the server").await;
    let started = ws.envelopes_until(|e| e["event"] == "tool.end").await;
    let end = &started.last().unwrap()["payload"];
    assert_eq!(end["result"]["ok"], true, "{end}");
    // It runs, in the daemon's list, owned by the session.
    let (_, list) = d.get(&format!("/v3/background?sessionId={s}")).await;
    let process = list["processes"][0].clone();
    assert_eq!(process["state"], "running");
    assert_eq!(process["label"], "server");
    let id = process["processId"].as_str().unwrap().to_owned();
    assert!(end["result"]["output"].as_str().unwrap().contains(&id));
    let pgid = process["pid"].as_u64().unwrap();
    // Then the model reads its output and stops it.
    lmx.push(opta_test_support::Reply::tool_call(
        "bg_output",
        json!({"processId": id}),
    ));
    lmx.push(opta_test_support::Reply::tool_call(
        "bg_kill",
        json!({"processId": id}),
    ));
    lmx.push(opta_test_support::Reply::chunks([
        "The server said it listens on 8080.",
    ]));
    let rest = ws
        .envelopes_until(opta_test_support::is_terminal_of(&turn))
        .await;
    let ends: Vec<&Value> = rest.iter().filter(|e| e["event"] == "tool.end").collect();
    assert_eq!(ends.len(), 2);
    let output = ends[0]["payload"]["result"]["output"].as_str().unwrap();
    assert!(output.contains("listening on 8080"), "{output}");
    assert!(
        ends[1]["payload"]["result"]["output"]
            .as_str()
            .unwrap()
            .contains("stopping")
    );
    assert_eq!(rest.last().unwrap()["event"], "turn.done");
    let ended = wait_for(&d, &id, |p| p["state"] != "running").await;
    assert_eq!(ended["state"], "killed");
    assert!(!group_alive(pgid));
}

#[tokio::test]
async fn deleting_a_session_stops_its_processes() {
    let (_lmx, d, _dir, s) = daemon_with_session().await;
    let p = start(&d, &s, "sleep 60 & sleep 60; wait", json!({})).await;
    let pgid = p["pid"].as_u64().unwrap();
    let (status, _) = d
        .request(reqwest::Method::DELETE, &format!("/v3/sessions/{s}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let id = p["processId"].as_str().unwrap().to_owned();
    wait_for(&d, &id, |p| p["state"] == "killed").await;
    assert!(!group_alive(pgid));
}

/// Whether the kernel offers Landlock, asked directly (`landlock_create_ruleset` with the
/// version flag), not through the daemon.
fn kernel_has_landlock() -> bool {
    landlock_abi() > 0
}

/// The kernel's Landlock ABI version (0: none).
fn landlock_abi() -> i64 {
    const SYS_LANDLOCK_CREATE_RULESET: nix::libc::c_long = 444;
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: with a null attribute, size 0 and the version flag, the call only answers the
    // ABI version; it reads and writes no memory.
    let abi = unsafe {
        nix::libc::syscall(
            SYS_LANDLOCK_CREATE_RULESET,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    abi.max(0)
}

#[tokio::test]
async fn sandboxed_commands_write_only_in_the_workspace_and_cannot_read_the_daemons_home() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let (_, health) = d.get("/v3/health").await;
    let landlock = kernel_has_landlock();
    assert_eq!(
        health["sandbox"],
        if landlock { "landlock" } else { "none" },
        "the health field is true to the kernel"
    );
    if !landlock {
        eprintln!("this kernel has no Landlock: the confinement itself is not exercised");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let root = base.path().canonicalize().unwrap();
    let ws = root.join("ws");
    // Outside the workspace and outside the temporary directory (which commands may use):
    // the build's own scratch directory, or the home directory when that is in /tmp too.
    let temp = std::env::temp_dir().canonicalize().unwrap();
    let scratch = [
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()),
    ]
    .into_iter()
    .filter_map(|dir| dir.canonicalize().ok())
    .find(|dir| !dir.starts_with(&temp) && dir != Path::new("/"))
    .expect("a writable directory outside the temporary directory");
    let away = tempfile::tempdir_in(&scratch).unwrap();
    let outside = away.path().canonicalize().unwrap().join("outside");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let s = session_in(&d, &ws).await;
    let state = d.home().join("daemon/state.json");
    assert!(state.exists());
    // The daemon runs in this test process.
    let daemon = std::process::id();
    let script = format!(
        "echo inside > made.txt && echo wrote-inside; \
         echo outside > {out}/escaped.txt || echo write-outside-refused; \
         cat {state} > /dev/null || echo state-unreadable; \
         cat /proc/{daemon}/environ > /dev/null || echo environ-unreadable; \
         (exec 3< /proc/{daemon}/mem) 2> /dev/null || echo memory-unopenable; \
         mknod raw-disk b 8 0 2> /dev/null || echo mknod-refused; \
         kill -0 {daemon} || echo signal-refused; \
         cat /etc/hostname > /dev/null && echo reads-elsewhere",
        out = outside.display(),
        state = state.display()
    );
    let p = start(&d, &s, &script, json!({})).await;
    let id = p["processId"].as_str().unwrap().to_owned();
    wait_for(&d, &id, |p| p["state"] != "running").await;
    let (_, out) = d
        .get(&format!("/v3/background/{id}/output?stream=stdout"))
        .await;
    let stdout: String = out["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    let mut expected = vec![
        "wrote-inside",
        "write-outside-refused",
        "state-unreadable",
        "environ-unreadable",
        "memory-unopenable",
        "mknod-refused",
        "reads-elsewhere",
    ];
    // Signals are scoped from ABI 6 on.
    if landlock_abi() >= 6 {
        expected.push("signal-refused");
    }
    for line in expected {
        assert!(stdout.contains(line), "{line} missing from {stdout:?}");
    }
    assert_eq!(
        std::fs::read_to_string(ws.join("made.txt")).unwrap(),
        "inside\n"
    );
    assert!(!outside.join("escaped.txt").exists());
}

#[tokio::test]
async fn output_events_of_an_ended_process_are_swept_and_the_output_route_still_serves_them() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.limits.delta_retention = Duration::from_millis(200);
        c.limits.delta_sweep_interval = Duration::from_millis(100);
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let s = session_in(&d, &dir.path().canonicalize().unwrap()).await;
    let p = start(&d, &s, "echo a; sleep 0.1; echo b", json!({})).await;
    let id = p["processId"].as_str().unwrap().to_owned();
    wait_for(&d, &id, |p| p["state"] == "completed").await;
    let count = |events: &[Value], name: &str| events.iter().filter(|e| e["event"] == name).count();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = d.events(&s, 0).await;
        if count(&events, "background.output") == 0 {
            // The status events stay: they are durable.
            assert_eq!(count(&events, "background.status"), 2);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the output events were never swept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, out) = d.get(&format!("/v3/background/{id}/output")).await;
    assert_eq!(out["chunks"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_run_command_that_outlives_background_after_secs_is_left_running_in_the_background() {
    let (lmx, d, _dir, s) = daemon_with_session().await;
    lmx.push(opta_test_support::Reply::tool_call(
        "run_command",
        json!({"command": "echo quick", "backgroundAfterSecs": 5}),
    ));
    lmx.push(opta_test_support::Reply::tool_call(
        "run_command",
        json!({"command": "echo serving; sleep 60", "backgroundAfterSecs": 1}),
    ));
    lmx.push(opta_test_support::Reply::chunks(["The server runs."]));
    let mut ws = d.ws(&s, u64::MAX).await;
    let turn = submit_dangerous(&d, &s, "serve").await;
    let events = ws
        .envelopes_until(opta_test_support::is_terminal_of(&turn))
        .await;
    let ends: Vec<&Value> = events.iter().filter(|e| e["event"] == "tool.end").collect();
    let quick = ends[0]["payload"]["result"]["output"].as_str().unwrap();
    assert!(
        quick.contains("completed") && quick.contains("quick"),
        "{quick}"
    );
    let detached = ends[1]["payload"]["result"]["output"].as_str().unwrap();
    assert!(
        detached.contains("left running in the background"),
        "{detached}"
    );
    let (_, list) = d.get(&format!("/v3/background?sessionId={s}")).await;
    let running: Vec<&Value> = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["state"] == "running")
        .collect();
    assert_eq!(running.len(), 1, "{list}");
    assert_eq!(running[0]["command"], "echo serving; sleep 60");
    assert!(detached.contains(running[0]["processId"].as_str().unwrap()));
    let id = running[0]["processId"].as_str().unwrap().to_owned();
    d.post(
        &format!("/v3/background/{id}/kill"),
        json!({"signal": "SIGKILL"}),
    )
    .await;
}

#[tokio::test]
async fn a_monitor_that_panics_leaves_no_process_and_no_stale_running_state() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.faults.monitor_panics_on = Some(|command| command.contains("doomed"));
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let s = session_in(&d, &dir.path().canonicalize().unwrap()).await;
    let p = start(&d, &s, "sleep 60 # doomed", json!({})).await;
    let id = p["processId"].as_str().unwrap().to_owned();
    let ended = wait_for(&d, &id, |p| p["state"] != "running").await;
    assert_eq!(ended["state"], "failed");
    assert!(!group_alive(p["pid"].as_u64().unwrap()));
    let events = d.events(&s, 0).await;
    assert!(
        events.iter().any(
            |e| e["event"] == "background.status" && e["payload"]["reason"] == "monitor-failed"
        ),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_run_command_cancelled_before_background_after_secs_is_stopped_with_its_group() {
    let (lmx, d, _dir, s) = daemon_with_session().await;
    // Until the 60 s pass the command is the call's own, as a plain run_command is.
    lmx.push(opta_test_support::Reply::tool_call(
        "run_command",
        json!({"command": "sleep 60 & echo started; wait", "backgroundAfterSecs": 60}),
    ));
    let mut ws = d.ws(&s, u64::MAX).await;
    let turn = submit_dangerous(&d, &s, "serve").await;
    ws.envelopes_until(|e| e["event"] == "background.output")
        .await;
    let (_, list) = d.get(&format!("/v3/background?sessionId={s}")).await;
    let process = list["processes"][0].clone();
    assert_eq!(process["state"], "running", "{list}");
    let (id, pgid) = (
        process["processId"].as_str().unwrap().to_owned(),
        process["pid"].as_u64().unwrap(),
    );
    let (status, _) = d
        .post(&format!("/v3/sessions/{s}/cancel"), json!({"turnId": turn}))
        .await;
    assert_eq!(status, StatusCode::OK);
    ws.envelopes_until(opta_test_support::is_terminal_of(&turn))
        .await;
    let ended = wait_for(&d, &id, |p| p["state"] != "running").await;
    assert_eq!(ended["state"], "killed", "{ended}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while group_alive(pgid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!group_alive(pgid), "the group survived the cancel");
}

#[tokio::test]
async fn a_chatty_process_stores_no_more_output_events_than_its_cap() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.background.output_cap_bytes = 64 * 1024;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let s = session_in(&d, &dir.path().canonicalize().unwrap()).await;
    let mut ws = d.ws(&s, u64::MAX).await;
    // `yes` for 10 s: hundreds of megabytes offered.
    let p = start(&d, &s, "yes", json!({"timeoutMs": 10_000})).await;
    let id = p["processId"].as_str().unwrap().to_owned();
    let capped = ws
        .envelopes_until(|e| {
            e["event"] == "background.status" && e["payload"]["reason"] == "output-capped"
        })
        .await;
    let live: usize = capped
        .iter()
        .filter(|e| e["event"] == "background.output")
        .map(|e| e["payload"]["text"].as_str().unwrap().len())
        .sum();
    assert_eq!(live, 64 * 1024, "live events stop at the cap exactly");
    let ended = wait_for(&d, &id, |p| p["state"] != "running").await;
    assert_eq!(ended["state"], "timeout");
    let dropped = ended["droppedBytes"].as_u64().unwrap();
    assert!(dropped > 10 << 20, "only {dropped} bytes past the cap");
    // Stored as live: the cap, one notice, nothing after it.
    let events = d.events(&s, 0).await;
    let stored: usize = events
        .iter()
        .filter(|e| e["event"] == "background.output")
        .map(|e| e["payload"]["text"].as_str().unwrap().len())
        .sum();
    assert_eq!(stored, 64 * 1024);
    let notices = events
        .iter()
        .filter(|e| e["event"] == "background.status" && e["payload"]["reason"] == "output-capped")
        .count();
    assert_eq!(notices, 1);
    // The output route still has the latest output.
    let (_, out) = d.get(&format!("/v3/background/{id}/output")).await;
    let tail = out["chunks"].as_array().unwrap();
    assert!(
        tail.last().unwrap()["text"]
            .as_str()
            .unwrap()
            .ends_with("y\n")
    );
}

#[tokio::test]
async fn a_character_split_between_two_writes_arrives_whole() {
    let (_lmx, d, _dir, s) = daemon_with_session().await;
    // The euro sign's three bytes in two writes, 200 ms apart.
    let p = start(
        &d,
        &s,
        r"printf '\342\202'; sleep 0.2; printf '\254 and \360\237\246'; sleep 0.2; printf '\200\n'",
        json!({}),
    )
    .await;
    let id = p["processId"].as_str().unwrap().to_owned();
    wait_for(&d, &id, |p| p["state"] == "completed").await;
    let (_, out) = d.get(&format!("/v3/background/{id}/output")).await;
    let text: String = out["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "€ and 🦀\n");
}
