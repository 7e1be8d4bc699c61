//! Every process a command starts ends with it: children that call `setsid` or fork twice
//! are killed when the command ends, times out, is cancelled or killed, and when the daemon
//! stops; each command is held to its process and memory limits.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::{Duration, Instant};

use opta_daemon::process::contain::Tracking;
use opta_test_support::{
    Reply, ScriptedLmx, TestDaemon, WorkspaceDirs, host_has_cgroups, host_has_user_namespaces,
    is_terminal_of, process_alive, record_own_pid,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A command that leaves two processes running outside its process group (one calls
/// `setsid`, one is forked twice), which write their pids as the host sees them to `pids` in
/// the workspace, waits until both did, then does `then`.
fn escaping(then: &str) -> String {
    let record = record_own_pid("pids").replace('$', "\\$");
    format!(
        "setsid sh -c \"{record}; exec sleep 300\" & sh -c \"sh -c '{record}; exec sleep 301' &\"; \
         until [ \"$(cat pids 2>/dev/null | wc -l)\" -ge 2 ]; do sleep 0.05; done; {then}"
    )
}

/// The pids the command wrote, once both are there.
async fn escaped_pids(dirs: &WorkspaceDirs) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pids: Vec<u64> = std::fs::read_to_string(dirs.ws.join("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.len() == 2 {
            return pids;
        }
        assert!(
            Instant::now() < deadline,
            "the command never wrote its pids"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until none of `pids` runs (bounded); says which still do.
async fn all_gone(pids: &[u64]) -> Result<(), Vec<u64>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<u64> = pids.iter().copied().filter(|p| process_alive(*p)).collect();
        if alive.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(alive);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ways this host can track every process of a command, each with the name the daemon
/// gives it in `/v3/health`: a cgroup (as root with cgroup v2) and a PID namespace (where user
/// namespaces are allowed). Without either, processes that leave their group are beyond
/// reach, and the daemon says `process-group` (checked by [`untracked_hosts_say_so`]).
fn trackings() -> Vec<(Tracking, &'static str)> {
    let mut ways = Vec::new();
    if host_has_cgroups() {
        ways.push((Tracking::Auto, "cgroup"));
    }
    if host_has_user_namespaces() {
        ways.push((Tracking::PidNamespace, "pid-namespace"));
    }
    if ways.is_empty() {
        eprintln!("neither cgroups nor user namespaces here: setsid children are not tracked");
    }
    ways
}

async fn setup(tracking: Tracking, kind: &str) -> (ScriptedLmx, TestDaemon, WorkspaceDirs, String) {
    let lmx = ScriptedLmx::start().await.unwrap();
    let configure: fn(&mut opta_daemon::DaemonConfig) = match tracking {
        Tracking::PidNamespace => |c| c.agent.command_tracking = Tracking::PidNamespace,
        Tracking::ProcessGroup => |c| c.agent.command_tracking = Tracking::ProcessGroup,
        Tracking::Auto => |_| {},
    };
    let d = TestDaemon::start_with(&lmx.url(), configure).await;
    let (_, health) = d.get("/v3/health").await;
    assert_eq!(health["processes"], kind, "true to the host: {health}");
    let dirs = WorkspaceDirs::new();
    let s = d.create_session_in(&dirs.ws).await;
    (lmx, d, dirs, s)
}

#[tokio::test]
async fn untracked_hosts_say_so() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |config| {
        config.agent.command_tracking = Tracking::ProcessGroup;
    })
    .await;
    let (_, health) = d.get("/v3/health").await;
    assert_eq!(health["processes"], "process-group", "{health}");
    let d = TestDaemon::start(&lmx.url()).await;
    let (_, health) = d.get("/v3/health").await;
    let expected = if host_has_cgroups() {
        "cgroup"
    } else if host_has_user_namespaces() {
        "pid-namespace"
    } else {
        "process-group"
    };
    assert_eq!(health["processes"], expected, "{health}");
}

/// Submits a `dangerous` turn (commands run without asking) and answers its turn id.
async fn submit(d: &TestDaemon, s: &str) -> String {
    let (status, body) = d
        .post(
            &format!("/v3/sessions/{s}/turns"),
            json!({"clientId": "t", "writerId": "w", "content": "run", "mode": "do",
                   "overrides": {"dangerous": true}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["turnId"].as_str().unwrap().to_owned()
}

async fn start_background(d: &TestDaemon, s: &str, command: &str, extra: Value) -> String {
    let mut body = json!({"sessionId": s, "command": command});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let (status, answer) = d.post("/v3/background/start", body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    answer["process"]["processId"].as_str().unwrap().to_owned()
}

async fn wait_state(d: &TestDaemon, id: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = d.get(&format!("/v3/background/{id}/status")).await;
        if done(body["process"]["state"].as_str().unwrap_or("")) {
            return;
        }
        assert!(Instant::now() < deadline, "never reached: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_run_command_that_ends_leaves_nothing_behind() {
    for (tracking, kind) in trackings() {
        a_run_command_ends(tracking, kind).await;
    }
}

async fn a_run_command_ends(tracking: Tracking, kind: &str) {
    let (lmx, d, dirs, s) = setup(tracking, kind).await;
    lmx.push(Reply::tool_call(
        "run_command",
        json!({"command": escaping("echo done")}),
    ));
    lmx.push(Reply::chunks(["ok"]));
    let mut ws = d.ws(&s, u64::MAX).await;
    let turn = submit(&d, &s).await;
    ws.envelopes_until(is_terminal_of(&turn)).await;
    let pids = escaped_pids(&dirs).await;
    assert_eq!(all_gone(&pids).await, Ok(()), "{kind}");
}

#[tokio::test]
async fn a_run_command_that_times_out_or_is_cancelled_leaves_nothing_behind() {
    for (tracking, kind) in trackings() {
        a_run_command_times_out_or_is_cancelled(tracking, kind).await;
    }
}

async fn a_run_command_times_out_or_is_cancelled(tracking: Tracking, kind: &str) {
    let (lmx, d, dirs, s) = setup(tracking, kind).await;
    lmx.push(Reply::tool_call(
        "run_command",
        json!({"command": escaping("sleep 60"), "timeoutSecs": 1}),
    ));
    lmx.push(Reply::chunks(["ok"]));
    let mut ws = d.ws(&s, u64::MAX).await;
    let turn = submit(&d, &s).await;
    ws.envelopes_until(is_terminal_of(&turn)).await;
    let pids = escaped_pids(&dirs).await;
    assert_eq!(all_gone(&pids).await, Ok(()), "after a timeout ({kind})");

    std::fs::remove_file(dirs.ws.join("pids")).unwrap();
    lmx.push(Reply::tool_call(
        "run_command",
        json!({"command": escaping("sleep 60")}),
    ));
    let turn = submit(&d, &s).await;
    let pids = escaped_pids(&dirs).await;
    let (status, _) = d
        .post(&format!("/v3/sessions/{s}/cancel"), json!({"turnId": turn}))
        .await;
    assert_eq!(status, StatusCode::OK);
    ws.envelopes_until(is_terminal_of(&turn)).await;
    assert_eq!(all_gone(&pids).await, Ok(()), "after a cancel ({kind})");
}

#[tokio::test]
async fn a_background_process_killed_timed_out_ended_or_stopped_with_the_daemon_leaves_nothing() {
    for (tracking, kind) in trackings() {
        a_background_process_ends(tracking, kind).await;
    }
}

async fn a_background_process_ends(tracking: Tracking, kind: &str) {
    let (_lmx, d, dirs, s) = setup(tracking, kind).await;
    // Killed.
    let id = start_background(&d, &s, &escaping("sleep 300"), json!({})).await;
    let pids = escaped_pids(&dirs).await;
    let (status, _) = d
        .post(
            &format!("/v3/background/{id}/kill"),
            json!({"signal": "SIGTERM"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    wait_state(&d, &id, |s| s == "killed").await;
    assert_eq!(all_gone(&pids).await, Ok(()), "after a kill ({kind})");
    // Timed out.
    std::fs::remove_file(dirs.ws.join("pids")).unwrap();
    let id = start_background(&d, &s, &escaping("sleep 300"), json!({"timeoutMs": 500})).await;
    let pids = escaped_pids(&dirs).await;
    wait_state(&d, &id, |s| s == "timeout").await;
    assert_eq!(all_gone(&pids).await, Ok(()), "after a timeout ({kind})");
    // Ended by itself, leaving its children.
    std::fs::remove_file(dirs.ws.join("pids")).unwrap();
    let id = start_background(&d, &s, &escaping("true"), json!({})).await;
    let pids = escaped_pids(&dirs).await;
    wait_state(&d, &id, |s| s == "completed").await;
    assert_eq!(all_gone(&pids).await, Ok(()), "after it ended ({kind})");
    // Running when the daemon stops.
    std::fs::remove_file(dirs.ws.join("pids")).unwrap();
    start_background(&d, &s, &escaping("sleep 300"), json!({})).await;
    let pids = escaped_pids(&dirs).await;
    d.stop().await;
    assert_eq!(
        all_gone(&pids).await,
        Ok(()),
        "after the daemon stopped ({kind})"
    );
}

fn small_caps(config: &mut opta_daemon::DaemonConfig) {
    config.agent.command_caps = opta_daemon::process::contain::CommandCaps {
        max_procs: 16,
        max_memory_bytes: 64 << 20,
    };
}

#[tokio::test]
async fn a_command_is_held_to_its_process_and_memory_limits() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), small_caps).await;
    let dirs = WorkspaceDirs::new();
    let s = d.create_session_in(&dirs.ws).await;
    // 40 processes at once, beyond 16: some forks fail, and the command says so.
    let forks = "n=0; for i in $(seq 40); do sleep 3 & n=$((n+1)); done 2> forks.err; \
                 wait; if [ -s forks.err ]; then echo fork-refused; fi";
    let id = start_background(&d, &s, forks, json!({})).await;
    wait_state(&d, &id, |s| s != "running").await;
    let (_, health) = d.get("/v3/health").await;
    let limited = health["processes"] == "cgroup";
    let out = std::fs::read_to_string(dirs.ws.join("forks.err")).unwrap_or_default();
    if limited {
        assert!(!out.is_empty(), "40 processes ran under a limit of 16");
    }
    // 256 MiB under a 64 MiB limit: the allocation fails or the command is killed.
    let memory = "python3 -c 'b = bytearray(256 << 20); b[-1] = 1; print(\"allocated\")' \
                  > memory.out 2>&1";
    let id = start_background(&d, &s, memory, json!({})).await;
    wait_state(&d, &id, |s| s != "running").await;
    let (_, status) = d.get(&format!("/v3/background/{id}/status")).await;
    assert_eq!(status["process"]["state"], "failed", "{status}");
    let out = std::fs::read_to_string(dirs.ws.join("memory.out")).unwrap_or_default();
    assert!(!out.contains("allocated"), "{out}");
}
