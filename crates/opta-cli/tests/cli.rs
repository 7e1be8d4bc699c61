//! The `opta` binary against a daemon it starts and the scripted inference server.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use expectrl::{ControlCode, Expect};
use opta_test_support::{Reply, ScriptedLmx, group_alive};
use pretty_assertions::assert_eq;
use serde_json::{Value, json};

/// A temporary home whose daemon is stopped when the test ends, whatever happens.
struct Home {
    dir: tempfile::TempDir,
    lmx_url: String,
}

impl Home {
    fn new(lmx_url: &str) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            lmx_url: lmx_url.to_owned(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_opta"));
        cmd.args(args)
            .env("OPTA_HOME", self.path())
            .env("OPTA_LMX_URL", &self.lmx_url)
            .env("OPTA_PORT", "0")
            .env("NO_COLOR", "1")
            .env_remove("OPTA_TOKEN")
            .env_remove("OPTA_MODEL");
        cmd
    }

    /// Runs `opta ARGS` to completion (off the async runtime).
    async fn opta(&self, args: &[&str]) -> Output {
        run(self.command(args)).await
    }

    /// `opta ARGS` run in `dir`.
    async fn opta_in(&self, dir: &Path, args: &[&str]) -> Output {
        let mut cmd = self.command(args);
        cmd.current_dir(dir);
        run(cmd).await
    }

    fn state(&self) -> Option<Value> {
        let bytes = std::fs::read(self.path().join("daemon/state.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = self.command(&["daemon", "stop"]).output();
    }
}

/// Runs `cmd` to its end off the runtime's threads (the test's servers share them).
async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that a command failed with exit code 1 and said `needle` on stderr.
fn assert_refused(out: &std::process::Output, needle: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(needle), "{stderr}");
}

/// Waits for `needle` in the chat's output; on failure says which step and what was seen.
/// `opta chat` in a pseudo-terminal, with `workspace` as its working directory.
fn chat_in(home: &Home, workspace: &Path) -> expectrl::session::OsSession {
    let mut command = home.command(&["chat"]);
    command.current_dir(workspace);
    expectrl::Session::spawn(command).unwrap()
}

fn step<N: expectrl::Needle + std::fmt::Debug>(chat: &mut impl Expect, needle: N) {
    let what = format!("{needle:?}");
    if let Err(e) = chat.expect(needle) {
        panic!("opta chat: waiting for {what}: {e}");
    }
}

/// Running (a zombie waiting for a reaper that never comes, as in some containers, counts as
/// gone: it has exited).
fn alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_start_twice_status_and_stop() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let first = home.opta(&["daemon", "start"]).await;
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(
        text(&first.stdout).contains("opta daemon started"),
        "{}",
        text(&first.stdout)
    );
    let pid = home.state().unwrap()["pid"].as_u64().unwrap();
    let second = home.opta(&["daemon", "start"]).await;
    assert!(second.status.success());
    let out = text(&second.stdout);
    assert!(
        out.contains("already running") && out.contains(&format!("pid {pid}")),
        "{out}"
    );
    assert_eq!(
        home.state().unwrap()["pid"].as_u64(),
        Some(pid),
        "still the one daemon"
    );

    let status = home.opta(&["daemon", "status", "--json"]).await;
    assert!(status.status.success());
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["running"], true);
    assert_eq!(status["pid"].as_u64(), Some(pid));
    assert_eq!(status["runtime"]["activeTurnCount"], 0);
    assert!(status["uptimeSeconds"].as_i64().unwrap() >= 0);
    let human = home.opta(&["daemon", "status"]).await;
    assert!(
        text(&human.stdout).contains(&format!("pid        {pid}")),
        "{}",
        text(&human.stdout)
    );

    let logs = home.opta(&["daemon", "logs", "-n", "5"]).await;
    assert!(
        text(&logs.stdout).contains("daemon listening"),
        "{}",
        text(&logs.stdout)
    );

    // `logs -f` follows the log: a refused request written now shows up.
    let mut follow = home.command(&["daemon", "logs", "-f", "-n", "0"]);
    follow.stdout(std::process::Stdio::piped());
    let mut follower = follow.spawn().unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let state = home.state().unwrap();
    let url = format!("http://127.0.0.1:{}/v3/sessions/nope-{pid}", state["port"]);
    let followed = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            // Refused requests are logged at warn; repeat until the follower prints one.
            let _ = std::process::Command::new("curl")
                .args(["-s", "-o", "/dev/null", &url])
                .status();
            if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(300))
                && line.contains("request refused")
            {
                return line;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "logs -f printed nothing new"
            );
        }
    })
    .await
    .unwrap();
    assert!(followed.contains("unauthorized"), "{followed}");
    follower.kill().unwrap();
    let _ = follower.wait();

    // restart: a new daemon on the same home.
    let restart = home.opta(&["daemon", "restart"]).await;
    assert!(restart.status.success(), "{}", text(&restart.stderr));
    assert!(text(&restart.stdout).contains("opta daemon started"));
    let old_pid = pid;
    let pid = home.state().unwrap()["pid"].as_u64().unwrap();
    assert_ne!(pid, old_pid);
    assert!(!alive(old_pid));

    let stop = home.opta(&["daemon", "stop"]).await;
    assert!(stop.status.success());
    assert!(text(&stop.stdout).contains(&format!("stopped (pid {pid})")));
    assert!(!home.path().join("daemon/state.json").exists());
    assert!(!alive(pid), "the daemon process is gone");
    let status = home.opta(&["daemon", "status", "--json"]).await;
    assert_eq!(status.status.code(), Some(3));
    assert_eq!(
        serde_json::from_slice::<Value>(&status.stdout).unwrap()["running"],
        false
    );
    // Stopping again is fine.
    assert!(home.opta(&["daemon", "stop"]).await.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn do_starts_the_daemon_and_streams_the_answer() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let out = home.opta(&["do", "hello", "there"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "echo: hello there\n");
    assert!(home.state().is_some(), "the daemon was started on demand");
    // The task ran with the current directory as its workspace.
    let request = lmx.requests().last().cloned().unwrap();
    assert_eq!(lmx.last_conversation()[0]["content"], "hello there");
    let system = request["messages"][0]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
    assert!(
        system.contains(&format!("Workspace: {}", cwd.display())),
        "{system}"
    );

    let out = home.opta(&["do", "--json", "as", "json"]).await;
    assert!(out.status.success());
    let envelopes: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = envelopes
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(names.first(), Some(&"turn.queued"));
    assert_eq!(names.last(), Some(&"turn.done"));
    assert!(names.contains(&"turn.token"));

    let sessions = home.opta(&["sessions", "list", "--json"]).await;
    let sessions: Value = serde_json::from_slice(&sessions.stdout).unwrap();
    assert_eq!(sessions["sessions"].as_array().unwrap().len(), 2);
    let id = sessions["sessions"][0]["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let show = home.opta(&["sessions", "show", &id]).await;
    assert!(
        text(&show.stdout).contains("echo: as json"),
        "{}",
        text(&show.stdout)
    );
    let events = home.opta(&["sessions", "events", &id]).await;
    assert!(text(&events.stdout).contains("turn.done"));
    let models = home.opta(&["models", "--json"]).await;
    let models: Value = serde_json::from_slice(&models.stdout).unwrap();
    assert_eq!(models["models"][0]["model_id"], "default");
    let table = home.opta(&["models"]).await;
    assert!(
        text(&table.stdout).starts_with("MODEL"),
        "{}",
        text(&table.stdout)
    );
    // Piped output carries no colour codes even without NO_COLOR.
    let mut cmd = home.command(&["models"]);
    cmd.env_remove("NO_COLOR");
    let piped = run(cmd).await;
    assert!(
        !text(&piped.stdout).contains('\x1b'),
        "{:?}",
        text(&piped.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn do_on_an_inference_error_exits_non_zero_with_the_code_and_a_hint() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let home = Home::new(&closed);
    let out = home.opta(&["do", "anyone?"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("[lmx-connection-refused]"), "{stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");
    assert_eq!(text(&out.stdout), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_answers_and_ctrl_c_cancels_a_long_turn() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let cmd = home.command(&["chat"]);
    let lmx_for_slow = &lmx;
    let mut chat = expectrl::Session::spawn(cmd).unwrap();
    chat.set_expect_timeout(Some(Duration::from_secs(20)));
    tokio::task::block_in_place(|| {
        step(&mut chat, "opta› ");
        chat.send_line("hello pty").unwrap();
        step(&mut chat, "echo: hello pty");
        step(&mut chat, "opta› ");

        // Another client writes into the same session: it shows up live at the prompt.
        let state = home.state().unwrap();
        let base = format!("http://127.0.0.1:{}", state["port"]);
        let token = state["token"].as_str().unwrap().to_owned();
        tokio::runtime::Handle::current().block_on(async {
            let http = reqwest::Client::new();
            let sessions: Value = http
                .get(format!("{base}/v3/sessions"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let id = sessions["sessions"][0]["sessionId"]
                .as_str()
                .unwrap()
                .to_owned();
            let resp = http
                .post(format!("{base}/v3/sessions/{id}/turns"))
                .bearer_auth(&token)
                .json(&serde_json::json!({"clientId": "web", "writerId": "web-1",
                    "content": "from the web page", "mode": "chat"}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 202);
        });
        step(&mut chat, "turn from web (web-1): from the web page");
        step(&mut chat, "echo: from the web page");

        lmx_for_slow.push(Reply::slow(2000, Duration::from_millis(20)));
        chat.send_line("talk for a long time").unwrap();
        step(&mut chat, "w3 ");
        chat.send(ControlCode::EndOfText).unwrap();
        step(&mut chat, "[cancelled]");
        step(&mut chat, "opta› ");

        // The session still works, and /exit leaves.
        chat.send_line("after cancel").unwrap();
        step(&mut chat, "echo: after cancel");
        step(&mut chat, "opta› ");
        // Ctrl-C at the prompt (no turn running) leaves.
        chat.send(ControlCode::EndOfText).unwrap();
        step(&mut chat, expectrl::Eof);
    });
    // The scripted server notices the dropped stream on its next write: wait for it.
    lmx.wait_streams_dropped(1).await;
    assert_eq!(
        lmx.streams_dropped(),
        1,
        "the cancel dropped the inference stream, and only that one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_load_unload_and_sessions_cancel_and_delete() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());

    let load = home.opta(&["models", "load", "other-model"]).await;
    assert!(load.status.success(), "{}", text(&load.stderr));
    assert_eq!(text(&load.stdout), "loaded other-model (1.5 GiB, 0.2 s)\n");
    let models = home.opta(&["models", "--json"]).await;
    let models: Value = serde_json::from_slice(&models.stdout).unwrap();
    let ids: Vec<&str> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["default", "other-model"], "the load shows at once");
    let unload = home
        .opta(&["models", "unload", "other-model", "--json"])
        .await;
    assert!(unload.status.success(), "{}", text(&unload.stderr));
    let answer: Value = serde_json::from_slice(&unload.stdout).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"model_id": "other-model", "status": "unloaded",
            "freed_bytes": 1_610_612_736u64})
    );
    let refused = home.opta(&["models", "load", "no-such-model"]).await;
    assert_refused(&refused, "no-such-model is not available");
    lmx.set_admin_api(false);
    let unsupported = home.opta(&["models", "load", "other-model"]).await;
    assert_refused(&unsupported, "501");

    // `sessions cancel ID` stops the running turn of an `opta do` elsewhere, which exits 130.
    lmx.push(Reply::slow(2000, Duration::from_millis(20)));
    let mut task = home.command(&["do", "talk for a long time"]);
    task.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let task = task.spawn().unwrap();
    lmx.wait_chat_requests(1).await;
    let sessions = home.opta(&["sessions", "list", "--json"]).await;
    let sessions: Value = serde_json::from_slice(&sessions.stdout).unwrap();
    let id = sessions["sessions"][0]["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        sessions["sessions"][0]["activeTurnId"].is_string(),
        "{sessions}"
    );
    let cancel = home.opta(&["sessions", "cancel", &id]).await;
    assert!(cancel.status.success(), "{}", text(&cancel.stderr));
    assert_eq!(
        text(&cancel.stdout),
        "cancelled 1 turn(s): 0 queued, active yes\n"
    );
    let task = tokio::task::spawn_blocking(move || task.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(task.status.code(), Some(130), "{}", text(&task.stderr));
    lmx.wait_streams_dropped(1).await;
    let again = home.opta(&["sessions", "cancel", &id, "--json"]).await;
    let again: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(
        again,
        serde_json::json!({"ok": true, "cancelled": 0, "cancelledQueued": 0, "cancelledActive": false})
    );

    let deleted = home.opta(&["sessions", "delete", &id]).await;
    assert!(deleted.status.success(), "{}", text(&deleted.stderr));
    assert_eq!(text(&deleted.stdout), format!("deleted session {id}\n"));
    let gone = home.opta(&["sessions", "show", &id]).await;
    assert_refused(&gone, "Session not found");
    let list = home.opta(&["sessions", "list", "--json"]).await;
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list["sessions"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_slash_commands() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let mut chat = expectrl::Session::spawn(home.command(&["chat"])).unwrap();
    chat.set_expect_timeout(Some(Duration::from_secs(20)));
    tokio::task::block_in_place(|| {
        let mut say = |line: &str, expect: &str| {
            step(&mut chat, "opta› ");
            chat.send_line(line).unwrap();
            step(&mut chat, expect);
        };
        say("/help", "/model [id]");
        say("/mode", "mode: chat");
        say("/mode dance", "unknown mode \"dance\"");
        say("/mode do", "mode: do");
        // A model the server has not loaded: the turn fails with the code and a hint.
        say("/model other-model", "model: other-model");
        say("first try", "[no-model-loaded]");
        say("/model default", "model: default");
        say("/model", "model: default");
        say("second try", "echo: second try");
        say("/cancel", "no turn is running");
        say("/sessions", "ID");
        say("/bogus", "unknown command /bogus");
        step(&mut chat, "opta› ");
        // The daemon restarts on another port (OPTA_PORT=0): chat finds it and carries on.
        let restart = home.command(&["daemon", "restart"]).output().unwrap();
        assert!(restart.status.success(), "{}", text(&restart.stderr));
        step(&mut chat, "reconnected to the daemon at");
        chat.send_line("after the restart").unwrap();
        step(&mut chat, "echo: after the restart");
        step(&mut chat, "opta› ");
        chat.send_line("/exit").unwrap();
        step(&mut chat, expectrl::Eof);
    });
    // The turns ran in the mode chosen, with the model chosen.
    let sessions = home.opta(&["sessions", "list", "--json"]).await;
    let sessions: Value = serde_json::from_slice(&sessions.stdout).unwrap();
    let id = sessions["sessions"][0]["sessionId"].as_str().unwrap();
    let events = home.opta(&["sessions", "events", id, "--json"]).await;
    let starts: Vec<Value> = text(&events.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["event"] == "turn.start")
        .map(|e| e["payload"]["mode"].clone())
        .collect();
    assert_eq!(starts, vec![serde_json::json!("do"); 3]);
    assert_eq!(lmx.requests().last().unwrap()["model"], "default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn do_follows_a_restarted_daemon_and_gives_up_on_a_stopped_one() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let spawn_do = |args: &[&str]| {
        let mut cmd = home.command(args);
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd.spawn().unwrap()
    };
    let finish = |child: std::process::Child| {
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
    };

    // Restarted (on another port, as OPTA_PORT=0 gives): `do` follows it and reports the
    // turn the restart interrupted.
    lmx.push(Reply::slow(2000, Duration::from_millis(20)));
    let task = spawn_do(&["do", "a long task"]);
    lmx.wait_chat_requests(1).await;
    let restart = home.opta(&["daemon", "restart"]).await;
    assert!(restart.status.success(), "{}", text(&restart.stderr));
    let out = finish(task).await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("[interrupted]"),
        "{}",
        text(&out.stderr)
    );

    // Stopped for good: `do` waits as long as it was told, then says what happened.
    lmx.push(Reply::slow(2000, Duration::from_millis(20)));
    let task = spawn_do(&["do", "--daemon-wait", "2", "another long task"]);
    lmx.wait_chat_requests(2).await;
    let stop = home.opta(&["daemon", "stop"]).await;
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    let out = finish(task).await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("did not come back within 2 s") && stderr.contains("interrupted"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn do_and_chat_attach_to_an_existing_session() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let first = home.opta(&["do", "--session", "work-1", "first"]).await;
    assert!(first.status.success(), "{}", text(&first.stderr));
    let second = home.opta(&["do", "--session", "work-1", "second"]).await;
    assert_eq!(text(&second.stdout), "echo: second\n");
    // The second turn saw the first one's history: one session, not two.
    let sent = lmx.last_conversation();
    assert_eq!(
        sent,
        serde_json::json!([
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "echo: first"},
            {"role": "user", "content": "second"}
        ])
    );
    let list = home.opta(&["sessions", "list", "--json"]).await;
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1);

    // chat --session joins it too, and names a missing one.
    let mut missing =
        expectrl::Session::spawn(home.command(&["chat", "--session", "nope"])).unwrap();
    missing.set_expect_timeout(Some(Duration::from_secs(20)));
    tokio::task::block_in_place(|| {
        step(&mut missing, "no session nope");
        step(&mut missing, expectrl::Eof);
    });
    let mut chat =
        expectrl::Session::spawn(home.command(&["chat", "--session", "work-1"])).unwrap();
    chat.set_expect_timeout(Some(Duration::from_secs(20)));
    tokio::task::block_in_place(|| {
        step(&mut chat, "session work-1");
        step(&mut chat, "opta› ");
        chat.send_line("third").unwrap();
        step(&mut chat, "echo: third");
        step(&mut chat, "opta› ");
        chat.send_line("/exit").unwrap();
        step(&mut chat, expectrl::Eof);
    });
    assert_eq!(
        lmx.last_conversation().as_array().unwrap().len(),
        5,
        "chat continued the same history"
    );
}

/// Bytes a terminal would obey: ESC, BEL, CSI (as UTF-8), CR, and a bidi override.
fn has_terminal_controls(out: &str) -> bool {
    out.contains(['\u{1b}', '\u{7}', '\u{9b}', '\r', '\u{202e}'])
}

#[tokio::test]
async fn strings_from_the_wire_cannot_drive_the_terminal() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    assert!(home.opta(&["daemon", "start"]).await.status.success());
    let state = home.state().unwrap();
    let base = format!("http://127.0.0.1:{}", state["port"]);
    let token = state["token"].as_str().unwrap().to_owned();
    // Any client can set these: a title that retitles the terminal, clears the screen and
    // forges a table row; a model name and history with escapes and a bidi override.
    let evil = "evil \u{1b}]0;pwned\u{7} \u{1b}[2J\nforged-row  x  y\r\u{202e}txt";
    let body = serde_json::json!({
        "sessionId": "evil", "title": evil, "model": format!("m{evil}"),
        "messages": [{"role": "user", "content": format!("hello {evil}")}],
    });
    let created = reqwest::Client::new()
        .post(format!("{base}/v3/sessions"))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    lmx.set_loaded(&[&format!("m{evil}")]);
    let list = home.opta(&["sessions", "list"]).await;
    let list_out = text(&list.stdout);
    assert!(!has_terminal_controls(&list_out), "{list_out:?}");
    assert!(list_out.contains("\\x1b]0;pwned\\x07"), "{list_out:?}");
    // Header plus one row: the newline did not forge a second one.
    assert_eq!(list_out.trim_end().lines().count(), 2, "{list_out}");
    let show = home.opta(&["sessions", "show", "evil"]).await;
    let stdout = text(&show.stdout);
    assert!(!has_terminal_controls(&stdout), "{stdout:?}");
    assert!(stdout.contains("\\x1b[2J"), "{stdout:?}");
    // A model's answer and an inference error pass through the same gate.
    lmx.push(Reply::chunks([format!("answer {evil}")]));
    let answered = home.opta(&["do", "--session", "evil", "go"]).await;
    let (stdout, stderr) = (text(&answered.stdout), text(&answered.stderr));
    assert!(answered.status.success(), "{stderr}");
    assert!(!has_terminal_controls(&stdout), "{stdout:?}");
    assert!(stdout.contains("answer evil \\x1b]0;pwned"), "{stdout:?}");
    lmx.push(Reply::status(500, &format!("boom {evil}")));
    let failed = home.opta(&["do", "--session", "evil", "again"]).await;
    let stderr = text(&failed.stderr);
    assert!(!failed.status.success());
    assert!(!has_terminal_controls(&stderr), "{stderr:?}");
    assert!(stderr.contains("boom evil \\x1b"), "{stderr:?}");
    let events = home.opta(&["sessions", "events", "evil"]).await;
    let stdout = text(&events.stdout);
    assert!(!has_terminal_controls(&stdout), "{stdout:?}");
    assert!(stdout.contains("answer evil \\x1b"), "{stdout:?}");
}

#[tokio::test]
async fn models_load_asks_before_a_download_and_shows_its_progress() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.set_downloadable(&["org/big-model"]);
    let home = Home::new(&lmx.url());
    // Nobody to ask (stdin is not a terminal) and no --yes: declined, nothing downloaded.
    let declined = home.opta(&["models", "load", "org/big-model"]).await;
    assert_eq!(declined.status.code(), Some(1));
    let stderr = text(&declined.stderr);
    assert!(stderr.contains("rerun with --yes"), "{stderr}");
    assert!(
        !lmx.admin_requests()
            .iter()
            .any(|(_, path, _)| path.contains("confirm")),
        "nothing was confirmed"
    );
    // With --yes: confirmed, followed to the end, loaded.
    let loaded = home
        .opta(&["models", "load", "org/big-model", "--yes"])
        .await;
    let (stdout, stderr) = (text(&loaded.stdout), text(&loaded.stderr));
    assert!(loaded.status.success(), "{stderr}");
    assert_eq!(stdout, "loaded org/big-model (1.5 GiB, 0.2 s)\n");
    for step in [
        "downloading org/big-model: 50%",
        "downloading org/big-model: 100%",
    ] {
        assert!(stderr.contains(step), "{stderr}");
    }
    let models = home.opta(&["models", "--json"]).await;
    let models: Value = serde_json::from_slice(&models.stdout).unwrap();
    assert_eq!(models["models"][1]["model_id"], "org/big-model");
    let table = text(&home.opta(&["models"]).await.stdout);
    assert!(
        table.contains("org/big-model  loaded  1.5 GiB  8192"),
        "{table}"
    );
}

#[tokio::test]
async fn a_token_with_url_special_characters_works_for_do() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let token = "t&k=n#x+y%25z/?";
    let mut start = home.command(&["daemon", "start"]);
    start.env("OPTA_TOKEN", token);
    let started = run(start).await;
    assert!(started.status.success(), "{}", text(&started.stderr));
    assert_eq!(home.state().unwrap()["token"], token);
    let out = home.opta(&["do", "special", "token"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "echo: special token\n");
}

/// Runs `opta ARGS` with stdout a pipe whose read end is closed after `keep` bytes.
async fn opta_into_closed_pipe(home: &Home, args: &[&str], keep: usize) -> Output {
    use std::io::Read;
    let mut cmd = home.command(args);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut first = vec![0u8; keep];
        stdout.read_exact(&mut first).unwrap();
        drop(stdout); // what `| head -c N` does
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_quietly_and_cancels_the_turn() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    // `opta do … | head -c 20`: a long answer whose reader leaves after 20 bytes.
    lmx.push(Reply::slow(2000, Duration::from_millis(5)));
    let out = opta_into_closed_pipe(&home, &["do", "talk", "a", "lot"], 20).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(
        !stderr.contains("Broken pipe") && !stderr.contains("panicked"),
        "{stderr}"
    );
    // Its turn was cancelled, not left running: the model's stream is dropped, and the
    // listing (published after the cancel's records are committed) soon shows no active turn.
    lmx.wait_streams_dropped(1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let sessions = loop {
        let listed = home.opta(&["sessions", "list", "--json"]).await;
        let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
        if listed["sessions"][0]["activeTurnId"].is_null() {
            break listed;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still active: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let id = sessions["sessions"][0]["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    // A listing read only in part: no panic, no backtrace. A turn of 1,500 tool calls makes
    // 3,000 events the daemon never joins (deltas it may join under load), so the listing is
    // far larger than a pipe's buffer and its writes do hit the closed end.
    let mut calls = Reply::tool_call("no_such_tool", json!({"n": 0}));
    for n in 1..1500 {
        calls = calls.and_call("no_such_tool", json!({"n": n}));
    }
    lmx.push(calls);
    lmx.push(Reply::chunks(["done"]));
    let long = home.opta(&["do", "--session", &id, "long answer"]).await;
    assert!(long.status.success(), "{}", text(&long.stderr));
    for args in [
        &["sessions", "events", id.as_str()][..],
        &["sessions", "events", id.as_str(), "--json"][..],
    ] {
        let out = opta_into_closed_pipe(&home, args, 8).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ctrl_c_quits_at_once_when_the_daemon_does_not_answer() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    lmx.push(Reply::slow(2000, Duration::from_millis(20)));
    let mut task = home.command(&["do", "a long one"]);
    task.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let task = task.spawn().unwrap();
    lmx.wait_chat_requests(1).await;
    let daemon_pid = home.state().unwrap()["pid"].as_u64().unwrap().to_string();
    let signal = |name: &str, pid: &str| {
        let status = Command::new("kill").args([name, pid]).status().unwrap();
        assert!(status.success());
    };
    // The daemon stops answering anything.
    signal("-STOP", &daemon_pid);
    let do_pid = task.id().to_string();
    signal("-INT", &do_pid);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    signal("-INT", &do_pid);
    let out = tokio::task::spawn_blocking(move || task.wait_with_output().unwrap())
        .await
        .unwrap();
    let took = started.elapsed();
    signal("-CONT", &daemon_pid);
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(
        text(&out.stderr).contains("cancelling"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_that_cannot_run_leave_no_session_behind() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    // `opta chat` with stdin piped: refused before a session exists.
    let mut chat = home.command(&["chat"]);
    chat.stdin(std::process::Stdio::piped());
    let out = run(chat).await;
    assert_refused(&out, "needs a terminal");
    // `opta chat` on a terminal that cannot edit lines (TERM=dumb): refused likewise, and
    // without colour.
    let mut dumb = home.command(&["chat"]);
    dumb.env("TERM", "dumb").env_remove("NO_COLOR");
    let mut dumb = expectrl::Session::spawn(dumb).unwrap();
    dumb.set_expect_timeout(Some(Duration::from_secs(20)));
    tokio::task::block_in_place(|| {
        let said = dumb.expect("(TERM=dumb)").unwrap();
        let said = String::from_utf8_lossy(said.before()).into_owned();
        assert!(
            said.contains("needs a terminal") && !said.contains('\u{1b}'),
            "{said:?}"
        );
        step(&mut dumb, expectrl::Eof);
    });
    // `opta do ""` and `opta do "  "`: refused before a session exists.
    for task in ["", "   "] {
        let out = home.opta(&["do", task]).await;
        assert_eq!(out.status.code(), Some(1));
        assert!(
            text(&out.stderr).contains("the task is empty"),
            "{}",
            text(&out.stderr)
        );
    }
    let list = home.opta(&["sessions", "list", "--json"]).await;
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list["sessions"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_slash_command_does_not_end_the_chat() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let mut chat = expectrl::Session::spawn(home.command(&["chat"])).unwrap();
    chat.set_expect_timeout(Some(Duration::from_secs(20)));
    tokio::task::block_in_place(|| {
        step(&mut chat, "opta› ");
        // The daemon goes away; /sessions fails, and the chat goes on.
        let stop = home.command(&["daemon", "stop"]).output().unwrap();
        assert!(stop.status.success(), "{}", text(&stop.stderr));
        chat.send_line("/sessions").unwrap();
        step(&mut chat, "error:");
        step(&mut chat, "opta› ");
        chat.send_line("/mode").unwrap();
        step(&mut chat, "mode: chat");
        step(&mut chat, "opta› ");
        chat.send_line("/exit").unwrap();
        step(&mut chat, expectrl::Eof);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_logs_follow_survives_log_rotation() {
    use std::io::Read;
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    assert!(home.opta(&["daemon", "start"]).await.status.success());
    let log = home.path().join("daemon/daemon.log");
    let mut follow = home.command(&["daemon", "logs", "-f", "-n", "1"]);
    follow
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut follow = follow.spawn().unwrap();
    let mut stdout = follow.stdout.take().unwrap();
    let (seen_tx, seen) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || seen_tx.send(text(&buf[..n])).is_err() {
                return;
            }
        }
    });
    let wait_for = |needle: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut all = String::new();
        while !all.contains(needle) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match seen.recv_timeout(left) {
                Ok(piece) => all.push_str(&piece),
                Err(_) => panic!("`logs -f` never printed {needle:?}; it printed {all:?}"),
            }
        }
    };
    // Rotation by rename: the old file goes, a new one takes its name.
    tokio::time::sleep(Duration::from_millis(400)).await;
    std::fs::rename(&log, home.path().join("daemon/daemon.log.1")).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    std::fs::write(&log, "first line after rotation\n").unwrap();
    tokio::task::block_in_place(|| wait_for("first line after rotation"));
    // And it keeps following the new file.
    let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut file, b"second line\n").unwrap();
    tokio::task::block_in_place(|| wait_for("second line"));
    assert!(follow.try_wait().unwrap().is_none(), "`logs -f` exited");
    follow.kill().unwrap();
    let _ = follow.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_management_edges() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    // A relative home is recorded as an absolute one.
    let mut start = home.command(&["daemon", "start"]);
    start
        .current_dir(home.path().parent().unwrap())
        .env("OPTA_HOME", home.path().file_name().unwrap());
    let started = run(start).await;
    assert!(started.status.success(), "{}", text(&started.stderr));
    let logs_path = home.state().unwrap()["logsPath"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(Path::new(&logs_path).is_absolute(), "{logs_path}");
    // `--limit 0` is refused, not silently 1.
    let zero = home.opta(&["sessions", "list", "--limit", "0"]).await;
    assert_eq!(zero.status.code(), Some(2), "{}", text(&zero.stderr));
    assert!(
        text(&zero.stderr).contains("--limit"),
        "{}",
        text(&zero.stderr)
    );
    // A daemon that holds its lock but does not answer is not "not running".
    let pid = home.state().unwrap()["pid"].as_u64().unwrap().to_string();
    let signal = |name: &str| {
        assert!(
            Command::new("kill")
                .args([name, pid.as_str()])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    let status = home.opta(&["daemon", "status"]).await;
    signal("-CONT");
    assert_eq!(status.status.code(), Some(4), "{}", text(&status.stdout));
    assert!(
        text(&status.stdout).contains("does not answer"),
        "{}",
        text(&status.stdout)
    );
    assert!(home.opta(&["daemon", "stop"]).await.status.success());
    // Garbage where the state file was, and no daemon: stale, so `stop` tidies up.
    let state = home.path().join("daemon/state.json");
    std::fs::write(&state, "{not json").unwrap();
    let stop = home.opta(&["daemon", "stop"]).await;
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    assert_eq!(text(&stop.stdout), "opta daemon is not running\n");
    assert!(!state.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_keeps_pasted_and_typed_ahead_lines_in_order() {
    use expectrl::process::Termios;
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let mut chat = expectrl::Session::spawn(home.command(&["chat"])).unwrap();
    // A terminal as people have it: echo on (so echo during a turn would show).
    chat.set_echo(true).unwrap();
    chat.set_expect_timeout(Some(Duration::from_secs(20)));
    tokio::task::block_in_place(|| {
        step(&mut chat, "opta› ");
        // A paste of three lines at once.
        chat.send("alpha one\rbravo two\rcharlie three\r").unwrap();
        step(&mut chat, "echo: alpha one");
        step(&mut chat, "echo: bravo two");
        step(&mut chat, "echo: charlie three");
        step(&mut chat, "opta› ");
    });
    // Typed while a turn streams: kept, and run after it.
    lmx.push(Reply::slow(30, Duration::from_millis(30)));
    tokio::task::block_in_place(|| {
        chat.send_line("slow one").unwrap();
        step(&mut chat, "w1 ");
        chat.send("delta four\recho five\r").unwrap();
        // Not echoed into the streaming answer.
        let streamed = chat.expect("w29").unwrap();
        let streamed = String::from_utf8_lossy(streamed.before()).into_owned();
        assert!(!streamed.contains("delta four"), "{streamed:?}");
        step(&mut chat, "echo: delta four");
        step(&mut chat, "echo: echo five");
        step(&mut chat, "opta› ");
        chat.send_line("/exit").unwrap();
        step(&mut chat, expectrl::Eof);
    });
    // Every line became a turn, in the order typed.
    let list = home.opta(&["sessions", "list", "--json"]).await;
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    let id = list["sessions"][0]["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let show = home.opta(&["sessions", "show", &id, "--json"]).await;
    let show: Value = serde_json::from_slice(&show.stdout).unwrap();
    let asked: Vec<&str> = show["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        asked,
        [
            "alpha one",
            "bravo two",
            "charlie three",
            "slow one",
            "delta four",
            "echo five"
        ]
    );
}

#[tokio::test]
async fn help_completions_man_page_and_human_times() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    // A command's own options come first; the daemon's under their own heading.
    let help = text(&home.opta(&["do", "--help"]).await.stdout);
    let own = help.find("--session").unwrap();
    let heading = help.find("Daemon options").unwrap();
    let daemon_flag = help.find("--lmx-url").unwrap();
    assert!(own < heading && heading < daemon_flag, "{help}");
    for (shell, marker) in [
        ("bash", "complete"),
        ("zsh", "#compdef opta"),
        ("fish", "complete -c opta"),
    ] {
        let out = home.opta(&["completions", shell]).await;
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(
            script.contains(marker) && script.contains("sessions"),
            "{shell}: {script}"
        );
    }
    let man = home.opta(&["man"]).await;
    assert!(
        text(&man.stdout).starts_with(".ie"),
        "{}",
        &text(&man.stdout)[..200.min(man.stdout.len())]
    );
    assert!(text(&man.stdout).contains(".TH opta"));
    // Tables say when in words; JSON keeps ISO-8601.
    assert!(home.opta(&["do", "hello"]).await.status.success());
    let table = text(&home.opta(&["sessions", "list"]).await.stdout);
    assert!(table.contains("just now"), "{table}");
    let json = home.opta(&["sessions", "list", "--json"]).await;
    let json: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(
        json["sessions"][0]["updatedAt"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_says_what_works_and_what_to_do_about_what_does_not() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    assert!(home.opta(&["daemon", "start"]).await.status.success());
    let out = home.opta(&["doctor"]).await;
    let report = text(&out.stdout);
    assert!(out.status.success(), "{report}{}", text(&out.stderr));
    for line in [
        "ok    config       no settings file",
        "ok    daemon       running at",
        "ok    inference    ",
        "ok    server kind  Opta LMX (admin API)",
        "ok    models       loaded: default",
        "ok    tools        default accepts tool definitions",
        "ok    disk         ",
    ] {
        assert!(report.contains(line), "{line:?} in\n{report}");
    }
    // The sandbox line says what the daemon's kernel allows: ok with Landlock, else a warning.
    let sandbox = report
        .lines()
        .find(|l| l.contains("sandbox"))
        .unwrap_or_default();
    assert!(
        sandbox.starts_with("ok    sandbox      landlock")
            || sandbox.starts_with("warn  sandbox      none"),
        "{report}"
    );
    // JSON for scripts; a server that refuses tools is a warning, not a failure.
    lmx.set_rejects_tools(true);
    let out = home.opta(&["doctor", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true);
    let tools = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tools")
        .unwrap();
    assert_eq!(tools["status"], "warn", "{tools}");
    assert!(
        tools["detail"]
            .as_str()
            .unwrap()
            .contains("does not support tools")
    );
    // Model ids come from the server: they reach the terminal escaped.
    lmx.set_rejects_tools(false);
    lmx.set_loaded(&["evil\u{1b}]0;pwned\u{7}\u{1b}[2J"]);
    let out = home.opta(&["doctor"]).await;
    let report = text(&out.stdout);
    assert!(!has_terminal_controls(&report), "{report:?}");
    assert!(report.contains("evil\\x1b]0;pwned"), "{report}");
    // The inference server goes away: a failure with a hint, exit 1.
    lmx.stop().await;
    let out = home.opta(&["doctor"]).await;
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains("fail  inference"), "{report}");
    assert!(report.contains("→ start your inference server"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_from_the_config_file_caps_every_model_request() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    // By default the server decides how long a reply may be.
    assert!(home.opta(&["do", "hi"]).await.status.success());
    let sent = lmx.requests().last().cloned().unwrap();
    assert_eq!(sent.get("max_tokens"), None, "{sent}");
    assert!(home.opta(&["daemon", "stop"]).await.status.success());
    let too_big = home
        .opta(&["config", "set", "max-tokens", "5000000000"])
        .await;
    assert_refused(&too_big, "config key max-tokens");
    let set = home.opta(&["config", "set", "max-tokens", "64"]).await;
    assert!(set.status.success(), "{}", text(&set.stderr));
    // The daemon `do` starts takes it from the file and sends it with each request.
    assert!(home.opta(&["do", "hi"]).await.status.success());
    let sent = lmx.requests().last().cloned().unwrap();
    assert_eq!(sent["max_tokens"], 64, "{sent}");
    assert!(home.opta(&["daemon", "stop"]).await.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_file_sits_between_the_environment_and_the_defaults() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let file = home.path().join("config.toml");
    std::fs::create_dir_all(home.path()).unwrap();
    std::fs::write(
        &file,
        "# my settings\nlmx-url = \"http://127.0.0.1:7\" # a server that is not there\n",
    )
    .unwrap();
    let origin = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .find(|l| l.starts_with("lmx-url = "))
            .unwrap()
            .to_owned()
    };
    // The harness sets OPTA_LMX_URL; without it the file wins over the default.
    let mut cmd = home.command(&["config", "list", "--origin"]);
    cmd.env_remove("OPTA_LMX_URL");
    assert_eq!(origin(&mut cmd), "lmx-url = http://127.0.0.1:7  (file)");
    let mut cmd = home.command(&["config", "list", "--origin"]);
    assert_eq!(origin(&mut cmd), format!("lmx-url = {}  (env)", lmx.url()));
    let mut cmd = home.command(&[
        "config",
        "list",
        "--origin",
        "--lmx-url",
        "http://127.0.0.1:8",
    ]);
    assert_eq!(origin(&mut cmd), "lmx-url = http://127.0.0.1:8  (flag)");
    // A daemon started with only the file uses the file's server.
    let mut cmd = home.command(&["do", "--daemon-wait", "1", "hi"]);
    cmd.env_remove("OPTA_LMX_URL");
    let out = run(cmd).await;
    assert!(
        text(&out.stderr).contains("lmx-connection-refused"),
        "{}",
        text(&out.stderr)
    );
    assert!(home.opta(&["daemon", "stop"]).await.status.success());

    // `set` keeps the user's comments; bad values name their key.
    assert!(
        home.opta(&["config", "set", "model", "qwen"])
            .await
            .status
            .success()
    );
    assert!(
        home.opta(&["config", "set", "max-db-mb", "512"])
            .await
            .status
            .success()
    );
    let kept = std::fs::read_to_string(&file).unwrap();
    assert_eq!(
        kept,
        "# my settings\nlmx-url = \"http://127.0.0.1:7\" # a server that is not there\nmodel = \"qwen\"\nmax-db-mb = 512\n"
    );
    let bad = home.opta(&["config", "set", "port", "70000"]).await;
    assert_refused(&bad, "config key port");
    assert_eq!(
        text(&home.opta(&["config", "get", "model"]).await.stdout),
        "qwen\n"
    );

    // A broken file stops the daemon from starting on silent defaults, and names the key.
    std::fs::write(&file, "max-db-mb = \"lots\"\nbogus = 1\n").unwrap();
    let refused = home.opta(&["daemon", "start"]).await;
    assert_refused(&refused, "max-db-mb");
    assert!(home.state().is_none(), "no daemon started");
    // `doctor` says so (and still checks the rest).
    let doctor = home.opta(&["doctor"]).await;
    assert_eq!(doctor.status.code(), Some(1));
    let report = text(&doctor.stdout);
    assert!(
        report.contains("fail  config") && report.contains("max-db-mb"),
        "{report}"
    );
    assert!(report.contains("inference"), "{report}");
    // It can be repaired with the same command.
    assert!(
        home.opta(&["config", "unset", "bogus"])
            .await
            .status
            .success()
    );
    assert!(
        home.opta(&["config", "unset", "max-db-mb"])
            .await
            .status
            .success()
    );
    assert!(home.opta(&["daemon", "start"]).await.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_shows_its_own_turn_without_a_header_and_its_figures_after() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let mut chat = expectrl::Session::spawn(home.command(&["chat"])).unwrap();
    chat.set_expect_timeout(Some(Duration::from_secs(20)));
    tokio::task::block_in_place(|| {
        step(&mut chat, "opta› ");
        chat.send_line("hello there").unwrap();
        let answer = chat.expect("echo: hello there").unwrap();
        let before = String::from_utf8_lossy(answer.before()).into_owned();
        assert!(!before.contains("turn from"), "{before:?}");
        let figures = chat.expect("opta› ").unwrap();
        let figures = String::from_utf8_lossy(figures.before()).into_owned();
        assert!(figures.contains("tokens ·"), "{figures:?}");
        chat.send_line("/exit").unwrap();
        step(&mut chat, expectrl::Eof);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_is_tunable_by_flags() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let start = home
        .opta(&[
            "daemon",
            "start",
            "--evict-idle-secs",
            "1",
            "--evict-scan-secs",
            "1",
        ])
        .await;
    assert!(start.status.success(), "{}", text(&start.stderr));
    assert!(home.opta(&["do", "hello"]).await.status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = home.opta(&["daemon", "status", "--json"]).await;
        let status: Value = serde_json::from_slice(&status.stdout).unwrap();
        if status["runtime"]["evictedSessionCount"] == 1 {
            assert_eq!(status["runtime"]["sessionCount"], 0, "{status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never evicted: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Evicted, not lost: it loads again on use.
    let list = home.opta(&["sessions", "list", "--json"]).await;
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    let id = list["sessions"][0]["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let show = home.opta(&["sessions", "show", &id]).await;
    assert!(
        text(&show.stdout).contains("echo: hello"),
        "{}",
        text(&show.stdout)
    );
    let zero = home
        .opta(&["daemon", "start", "--evict-idle-secs", "0"])
        .await;
    assert_eq!(zero.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_permission_prompts_show_the_diff_and_read_a_fresh_answer() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let workspace = tempfile::tempdir().unwrap();
    let mut chat = chat_in(&home, workspace.path());
    chat.set_expect_timeout(Some(Duration::from_secs(20)));
    // The model talks for a while, then asks to write a file.
    let mut call = Reply::tool_call(
        "write_file",
        json!({"path": "fresh.txt", "content": "hello\u{1b}[2J\n"}),
    );
    call.chunks = (0..20).map(|i| format!("w{i} ")).collect();
    lmx.push(call.with_chunk_delay(Duration::from_millis(40)));
    lmx.push(Reply::chunks(["written"]));
    tokio::task::block_in_place(|| {
        step(&mut chat, "opta› ");
        chat.send_line("write it").unwrap();
        step(&mut chat, "w1 ");
        // Typed ahead while the answer streams: a message for later, not the answer.
        chat.send("y\r").unwrap();
        step(&mut chat, "wants to: write 10 bytes to fresh.txt");
        // The diff, with the escape shown, not obeyed.
        step(&mut chat, "+hello\\x1b[2J");
        step(&mut chat, "allow? ");
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !workspace.path().join("fresh.txt").exists(),
            "the typed-ahead line answered the prompt"
        );
        chat.send_line("a").unwrap();
        step(&mut chat, "written");
        // Then the typed-ahead line runs as a message of its own.
        step(&mut chat, "echo: y");
        step(&mut chat, "opta› ");
        chat.send_line("/exit").unwrap();
        step(&mut chat, expectrl::Eof);
    });
    assert_eq!(
        std::fs::read_to_string(workspace.path().join("fresh.txt")).unwrap(),
        "hello\u{1b}[2J\n"
    );
    // "a" became a session grant on the daemon.
    let list = home.opta(&["sessions", "list", "--json"]).await;
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    let id = list["sessions"][0]["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let show = home.opta(&["sessions", "show", &id, "--json"]).await;
    let show: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(show["grants"], json!(["write_file"]), "{show}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_mode_setting_applies_to_do_and_tool_lines_show_the_outcome() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let bad = home.opta(&["config", "set", "default-mode", "yolo"]).await;
    assert_refused(&bad, "config key default-mode");
    let set = home.opta(&["config", "set", "default-mode", "plan"]).await;
    assert!(set.status.success(), "{}", text(&set.stderr));
    lmx.push(Reply::tool_call(
        "write_file",
        json!({"path": "never.txt", "content": "x"}),
    ));
    lmx.push(Reply::chunks(["The plan: write never.txt."]));
    let out = home.opta(&["do", "write never.txt"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("→ write_file never.txt"), "{stderr}");
    assert!(stderr.contains("✗ write_file"), "{stderr}");
    assert!(stderr.contains("denied in plan mode"), "{stderr}");
    assert!(!std::path::Path::new("never.txt").exists());
    assert_eq!(text(&out.stdout), "The plan: write never.txt.\n");
    // A flag wins over the setting.
    let turn = lmx.requests().last().cloned().unwrap();
    assert!(
        turn["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("Mode: plan")
    );
    lmx.push(Reply::chunks(["chatting"]));
    let out = home.opta(&["do", "--mode", "chat", "hi"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let turn = lmx.requests().last().cloned().unwrap();
    assert!(
        turn["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("Mode: chat")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bg_starts_lists_follows_and_kills_background_processes() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let started = home
        .opta(&[
            "bg",
            "start",
            "--json",
            "--label",
            "greeter",
            "echo hi; sleep 0.3; echo err >&2",
        ])
        .await;
    assert!(started.status.success(), "{}", text(&started.stderr));
    let process: Value = serde_json::from_slice(&started.stdout).unwrap();
    let id = process["processId"].as_str().unwrap().to_owned();
    let logs = home.opta(&["bg", "logs", "-f", &id]).await;
    assert!(logs.status.success(), "{}", text(&logs.stderr));
    assert_eq!(text(&logs.stdout), "hi\nerr\n");
    assert!(
        text(&logs.stderr).contains("completed (exit code 0)"),
        "{}",
        text(&logs.stderr)
    );

    let sleeper = home.opta(&["bg", "start", "--json", "sleep 60"]).await;
    let sleeper: Value = serde_json::from_slice(&sleeper.stdout).unwrap();
    let sleeper_id = sleeper["processId"].as_str().unwrap().to_owned();
    let list = home.opta(&["bg", "list"]).await;
    let list = text(&list.stdout);
    assert!(
        list.contains("greeter") && list.contains("completed"),
        "{list}"
    );
    assert!(
        list.contains(&sleeper_id) && list.contains("running"),
        "{list}"
    );
    let killed = home.opta(&["bg", "kill", &sleeper_id]).await;
    assert_eq!(
        text(&killed.stdout),
        format!("sent SIGTERM to {sleeper_id}\n")
    );
    let again = home.opta(&["bg", "kill", "--signal", "kill", &id]).await;
    assert_eq!(
        text(&again.stdout),
        format!("{id} is not running (completed)\n")
    );
    let missing = home.opta(&["bg", "logs", "proc_missing"]).await;
    assert_refused(&missing, "not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_group_left_by_a_killed_daemon_is_stopped_and_reported_at_restart() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let started = home
        .opta(&["bg", "start", "--json", "sleep 60 & sleep 60; wait"])
        .await;
    assert!(started.status.success(), "{}", text(&started.stderr));
    let process: Value = serde_json::from_slice(&started.stdout).unwrap();
    let pgid = process["pid"].as_u64().unwrap();
    let session = process["sessionId"].as_str().unwrap().to_owned();
    assert!(group_alive(pgid));
    let daemon_pid = home.state().unwrap()["pid"].as_u64().unwrap().to_string();
    let status = Command::new("kill")
        .args(["-9", &daemon_pid])
        .status()
        .unwrap();
    assert!(status.success());
    // kill -9 leaves the group running: nothing of the daemon could stop it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        group_alive(pgid),
        "the group should outlive the daemon's kill -9"
    );
    let restarted = home.opta(&["daemon", "start"]).await;
    assert!(restarted.status.success(), "{}", text(&restarted.stderr));
    assert!(!group_alive(pgid), "the restart did not stop the old group");
    let events = home.opta(&["sessions", "events", &session, "--json"]).await;
    let last: Value = text(&events.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|e| e["event"] == "background.status")
        .unwrap();
    assert_eq!(last["payload"]["reason"], "daemon-restart", "{last}");
    assert_eq!(last["payload"]["process"]["state"], "killed", "{last}");
    assert_eq!(last["payload"]["previousState"], "running", "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_prints_a_one_time_link_that_signs_a_page_in() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let out = home.opta(&["web", "--no-open"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "the link is the only line: {stdout:?}");
    let state = home.state().expect("web started the daemon");
    let token = state["token"].as_str().unwrap();
    let base = format!("http://127.0.0.1:{}", state["port"]);
    let code = lines[0]
        .strip_prefix(&format!("{base}/#code="))
        .unwrap_or_else(|| panic!("a link to the page: {}", lines[0]));
    assert!(
        !lines[0].contains(token),
        "the link never carries the token"
    );
    let http = reqwest::Client::new();
    let exchange = |code: String| {
        let http = http.clone();
        let url = format!("{base}/v3/web/exchange");
        async move {
            let resp = http
                .post(url)
                .json(&serde_json::json!({ "code": code }))
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = exchange(code.to_owned()).await;
    assert_eq!((status, body["token"].as_str()), (200, Some(token)));
    assert_eq!(
        exchange(code.to_owned()).await.0,
        401,
        "the code works once"
    );

    // Without a display there is nothing to open the link with: it is printed all the same,
    // with a word on stderr.
    let mut bare = home.command(&["web"]);
    bare.env_remove("DISPLAY").env_remove("WAYLAND_DISPLAY");
    let out = run(bare).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with(&format!("{base}/#code=")));
    assert!(
        text(&out.stderr).contains("open the link"),
        "{}",
        text(&out.stderr)
    );

    // A closed stdout ends it quietly (141, as a shell reports SIGPIPE), never with a panic.
    let out = opta_into_closed_pipe(&home, &["web", "--no-open"], 0).await;
    assert!(
        matches!(out.status.code(), Some(0 | 141)),
        "{:?} {}",
        out.status,
        text(&out.stderr)
    );
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );

    // Neither the token nor a code reaches the daemon's log.
    let log = std::fs::read_to_string(home.path().join("daemon/daemon.log")).unwrap_or_default();
    assert!(!log.is_empty(), "the daemon logs");
    assert!(!log.contains(token), "the token is never logged");
    assert!(!log.contains(code), "sign-in codes are never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_tool_lines_fit_a_narrow_terminal() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let workspace = tempfile::tempdir().unwrap();
    let mut chat = chat_in(&home, workspace.path());
    chat.get_process_mut().set_window_size(50, 24).unwrap();
    chat.set_expect_timeout(Some(Duration::from_secs(20)));
    lmx.push(Reply::tool_call(
        "read_file",
        json!({"path": "a/path/that/does/not/exist/anywhere/in/the/workspace.txt"}),
    ));
    lmx.push(Reply::chunks(["no such file"]));
    tokio::task::block_in_place(|| {
        step(&mut chat, "opta› ");
        chat.send_line("read it").unwrap();
        step(&mut chat, "✗ read_file");
        let rest = chat.expect("\r\n").unwrap();
        let line = format!("  ✗ read_file{}", String::from_utf8_lossy(rest.before()));
        // Without colour codes (the pty is a terminal, so there may be some).
        let plain = console::strip_ansi_codes(&line).into_owned();
        assert!(plain.chars().count() < 50, "{plain:?}");
        assert!(plain.ends_with('…'), "{plain:?}");
        step(&mut chat, "no such file");
        step(&mut chat, "opta› ");
        chat.send_line("/exit").unwrap();
        step(&mut chat, expectrl::Eof);
    });
}

#[tokio::test]
async fn do_without_a_terminal_denies_what_it_would_ask_and_yes_allows_it() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    let workspace = tempfile::tempdir().unwrap();
    let call = || Reply::tool_call("write_file", json!({"path": "asked.txt", "content": "x\n"}));
    lmx.push(call());
    lmx.push(Reply::chunks(["not written"]));
    let out = home
        .opta_in(workspace.path(), &["do", "--mode", "chat", "write it"])
        .await;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("write 2 bytes to asked.txt: denied, no terminal to ask (--yes allows"),
        "{stderr}"
    );
    assert!(!workspace.path().join("asked.txt").exists());
    lmx.push(call());
    lmx.push(Reply::chunks(["written"]));
    let out = home
        .opta_in(
            workspace.path(),
            &["do", "--mode", "chat", "--yes", "write it"],
        )
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "written\n");
    assert_eq!(
        std::fs::read_to_string(workspace.path().join("asked.txt")).unwrap(),
        "x\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_opens_a_private_redirect_page_never_the_link_on_a_command_line() {
    use std::os::unix::fs::PermissionsExt as _;
    let lmx = ScriptedLmx::start().await.unwrap();
    let home = Home::new(&lmx.url());
    // A browser opener that records what it was given.
    let bin = tempfile::tempdir().unwrap();
    let opener = bin.path().join("xdg-open");
    let given = bin.path().join("given");
    std::fs::write(
        &opener,
        format!("#!/bin/sh\nprintf '%s\\n' \"$@\" > {}\n", given.display()),
    )
    .unwrap();
    std::fs::set_permissions(&opener, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut web = home.command(&["web"]);
    web.env("PATH", path).env("DISPLAY", ":99");
    let out = run(web).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let link = text(&out.stdout).trim().to_owned();
    let code = link.split("#code=").nth(1).unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !given.exists() {
        assert!(std::time::Instant::now() < deadline, "the opener never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let arg = std::fs::read_to_string(&given).unwrap();
    let arg = arg.trim();
    assert!(
        !arg.contains(&code),
        "the code was on a command line: {arg}"
    );
    let page = std::path::Path::new(arg);
    assert!(page.starts_with(home.path()), "{arg}");
    let mode = std::fs::metadata(page).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let html = std::fs::read_to_string(page).unwrap();
    assert!(html.contains(&format!("url={link}")), "{html}");
}
