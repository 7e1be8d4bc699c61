//! The web client in a real browser: headless Chromium driven by `tests/browser/web.test.mjs`
//! (playwright-core) against a real daemon, behind a proxy this test can cut, and the scripted
//! inference server. The script asks this side for what a browser cannot do (script replies,
//! cut every connection, restart the daemon) with `@@ {json}` lines; screenshots land in
//! `target/browser-screenshots/`.
//!
//! Needs Node.js, `npm ci` in `tests/browser` and Debian's `chromium` (`.ci/run` installs them).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use opta_test_support::{CutProxy, Reply, ScriptedLmx, TestDaemon};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// What the script asked for, done; the answer it reads back.
async fn act(
    request: &Value,
    lmx: &ScriptedLmx,
    proxy: &CutProxy,
    daemon: &mut Option<TestDaemon>,
) -> Value {
    match request["action"].as_str().unwrap_or("") {
        "reply" => {
            let kind = request["kind"].as_str().unwrap_or("");
            let replies = match kind {
                "markdown" => vec![
                    Reply::chunks([
                        "## Plan\n\n",
                        "- lex the input\n",
                        "- parse the tokens\n\n",
                        "```rust\nfn parse() {}\n```\n\n",
                        "[docs](https://example.com/) [x](javascript:document.title='owned') ",
                        "<script>document.title = 'owned'</script>done",
                    ])
                    .with_reasoning(["Weighing ", "a parser plan"]),
                ],
                "tool-then-slow" => vec![
                    Reply::tool_call("read_file", json!({"path": "notes.txt"})),
                    Reply::slow(40, Duration::from_millis(60)),
                ],
                "write" => vec![
                    Reply::tool_call(
                        "write_file",
                        json!({"path": "hello.txt", "content": "hello from the web\n"}),
                    ),
                    Reply::chunks(["Wrote hello.txt."]),
                ],
                "write-again" => vec![
                    Reply::tool_call(
                        "write_file",
                        json!({"path": "again.txt", "content": "no question asked\n"}),
                    ),
                    Reply::chunks(["Wrote again.txt."]),
                ],
                "slow" => vec![Reply::slow(100, Duration::from_millis(40))],
                "after-restart" => vec![Reply::chunks(["Back after the restart."])],
                other => return json!({"error": format!("unknown reply kind {other}")}),
            };
            let text = replies.last().map(Reply::text).unwrap_or_default();
            for reply in replies {
                lmx.push(reply);
            }
            json!({"text": text})
        }
        "cut" => json!({"cut": proxy.cut()}),
        "restart" => {
            let running = daemon.take().expect("a daemon runs");
            *daemon = Some(running.restart_on_same_port().await);
            json!({})
        }
        "rotate-token" => {
            let running = daemon.take().expect("a daemon runs");
            *daemon = Some(
                running
                    .restart_on_same_port_with(|c| {
                        c.token = Some("rotated-token-0123456789abcdef01234567".into());
                    })
                    .await,
            );
            json!({})
        }
        other => json!({"error": format!("unknown action {other}")}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_client_in_a_real_browser() {
    let root = repo_root();
    let script = root.join("tests/browser/web.test.mjs");
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .is_dir(),
        "playwright-core is missing: run `npm ci` in tests/browser (.ci/run does)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's chromium (.ci/run does)"
    );

    let lmx = ScriptedLmx::start().await.unwrap();
    let started = TestDaemon::start(&lmx.url()).await;
    let proxy = CutProxy::start(started.daemon().addr().port())
        .await
        .unwrap();
    let code = started
        .http
        .post(format!("{}/v3/web/code", proxy.base()))
        .bearer_auth(&started.token)
        .send()
        .await
        .unwrap();
    assert_eq!(code.status(), 201);
    let code: Value = code.json().await.unwrap();
    let link = code["url"].as_str().unwrap().to_owned();
    assert!(
        link.starts_with(&format!("{}/#code=", proxy.base())),
        "{link}"
    );
    assert!(
        !link.contains(&started.token),
        "the link never carries the token"
    );
    let mut daemon = Some(started);

    let workspace = tempfile::tempdir().unwrap();
    let shots = root.join("target/browser-screenshots");
    let mut node = Command::new("node")
        .arg(&script)
        .env("OPTA_BASE", proxy.base())
        .env("OPTA_LINK", &link)
        .env("OPTA_WORKSPACE", workspace.path())
        .env("OPTA_SCREENSHOTS", &shots)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut to_node = node.stdin.take().unwrap();
    let mut from_node = BufReader::new(node.stdout.take().unwrap()).lines();

    let mut finished = false;
    let run = async {
        while let Some(line) = from_node.next_line().await.unwrap() {
            let Some(request) = line.strip_prefix("@@ ") else {
                println!("node: {line}");
                continue;
            };
            let request: Value = serde_json::from_str(request).unwrap();
            if request["action"] == "done" {
                finished = true;
                break;
            }
            let answer = act(&request, &lmx, &proxy, &mut daemon).await;
            to_node
                .write_all(format!("{answer}\n").as_bytes())
                .await
                .unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser test finishes within 4 minutes");
    let status = node.wait().await.unwrap();
    assert!(status.success(), "the browser test failed: {status}");
    assert!(finished, "the browser test ran to its end");
    for shot in [
        "session-list.png",
        "streaming-tool-card.png",
        "permission-prompt.png",
        "phone.png",
        "wrong-token.png",
    ] {
        assert!(shots.join(shot).is_file(), "{shot} was taken");
    }
}
