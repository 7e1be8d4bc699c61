//! Bounded under hostile model replies: call ids clients can pair, a repeat guard that sees
//! through spacing, and metric labels no model can invent or forge.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use opta_test_support::{Reply, ScriptedLmx, TestDaemon, WorkspaceDirs, conversation};
use serde_json::{Value, json};

fn named<'a>(events: &'a [Value], name: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == name).collect()
}

fn ids(events: &[Value], name: &str) -> Vec<String> {
    named(events, name)
        .iter()
        .map(|e| e["payload"]["id"].as_str().unwrap_or("").to_owned())
        .collect()
}

async fn setup() -> (ScriptedLmx, TestDaemon, WorkspaceDirs, String) {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let dirs = WorkspaceDirs::new();
    std::fs::write(dirs.ws.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(dirs.ws.join("b.txt"), "beta\n").unwrap();
    let s = d.create_session_in(&dirs.ws).await;
    (lmx, d, dirs, s)
}

#[tokio::test]
async fn calls_that_share_an_id_get_ids_of_their_own() {
    let (lmx, d, _dirs, s) = setup().await;
    lmx.push(
        Reply::tool_call("read_file", json!({"path": "a.txt"}))
            .and_call("read_file", json!({"path": "b.txt"}))
            .with_call_id("same"),
    );
    // The next round's server reuses the id again.
    lmx.push(
        Reply::tool_call("read_file", json!({"path": "a.txt", "limit": 1})).with_call_id("same"),
    );
    lmx.push(Reply::chunks(["done"]));
    let (_, events) = d.turn(&s, "read both").await;
    assert_eq!(ids(&events, "tool.start"), ["same", "same-2", "same-3"]);
    assert_eq!(ids(&events, "tool.end"), ["same", "same-2", "same-3"]);
    let ends = named(&events, "tool.end");
    assert!(
        ends[1]["payload"]["result"]["output"]
            .as_str()
            .unwrap()
            .contains("beta")
    );
    // The model's history pairs each result with its call by the new ids.
    let history = conversation(lmx.requests().last().unwrap());
    let calls: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["tool_calls"].as_array())
        .flatten()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(calls, ["same", "same-2", "same-3"]);
    let results: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["tool_call_id"].as_str())
        .collect();
    assert_eq!(results, ["same", "same-2", "same-3"]);
}

#[tokio::test]
async fn the_same_call_spaced_differently_is_still_a_repeat() {
    let (lmx, d, _dirs, s) = setup().await;
    let spellings = [
        r#"{"path":"a.txt"}"#,
        r#"{ "path" : "a.txt" }"#,
        "{\n  \"path\": \"a.txt\"\n}",
        r#"{"path":   "a.txt"  }"#,
    ];
    for raw in spellings {
        lmx.push(Reply::tool_call_raw("read_file", raw));
    }
    lmx.push(Reply::chunks(["done"]));
    let (_, events) = d.turn(&s, "read it").await;
    let ends = named(&events, "tool.end");
    let ok: Vec<bool> = ends
        .iter()
        .map(|e| e["payload"]["result"]["ok"] == true)
        .collect();
    // Two run, the third is refused, the fourth ends the turn's tool use.
    assert_eq!(ok[..3], [true, true, false], "{ends:?}");
    let refused = ends[2]["payload"]["result"]["error"].as_str().unwrap_or("");
    assert!(refused.contains("three times"), "{refused}");
}

#[tokio::test]
async fn invented_tool_names_never_become_metric_labels() {
    let (lmx, d, _dirs, s) = setup().await;
    // Warm the families a normal turn fills, so the size compared is that of a used daemon.
    lmx.push(Reply::tool_call("read_file", json!({"path": "a.txt"})));
    lmx.push(Reply::chunks(["ok"]));
    d.turn(&s, "read").await;
    lmx.push(Reply::tool_call("made_up", json!({})));
    lmx.push(Reply::chunks(["ok"]));
    d.turn(&s, "call a tool that is not there").await;
    let before = d.prometheus().await;

    // A name that would forge a line, then 3,000 invented ones, in one reply.
    let forged = "x\"} 1\nopta_turns_total{outcome=\"forged\",code=\"\"} 999999\n#";
    let mut reply = Reply::tool_call(forged, json!({}));
    for i in 0..3000 {
        reply = reply.and_call(&format!("invented_tool_{i}"), json!({}));
    }
    lmx.push(reply);
    lmx.push(Reply::chunks(["ok"]));
    let (turn, events) = d.turn(&s, "call many tools").await;
    let ended = named(&events, "tool.end")
        .into_iter()
        .filter(|e| e["payload"]["turnId"] == turn.as_str())
        .count();
    assert_eq!(ended, 3001);

    let after = d.prometheus().await;
    assert!(!after.contains("forged"), "a forged line reached /metrics");
    assert!(
        !after.contains("invented_tool_"),
        "an invented name became a label"
    );
    // Only counts changed: the text is the same size give or take a few digits per line.
    assert!(
        after.len() <= before.len() + 200,
        "/metrics grew from {} to {} bytes",
        before.len(),
        after.len()
    );
    // Still valid: every sample line is `name{labels} value` or `name value`.
    for line in after
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a sample line: {line:?}");
    }
    assert!(after.contains("tool=\"unknown\""), "{after}");
}

#[tokio::test]
async fn a_huge_listing_reaches_the_model_and_clients_cut_to_the_result_cap() {
    let (lmx, d, dirs, s) = setup().await;
    let many = dirs.ws.join("many");
    std::fs::create_dir(&many).unwrap();
    for i in 0..20_000 {
        std::fs::write(
            many.join(format!("a-rather-long-file-name-number-{i:06}.txt")),
            "",
        )
        .unwrap();
    }
    lmx.push(Reply::tool_call("list_dir", json!({"path": "many"})));
    lmx.push(Reply::chunks(["done"]));
    let (turn, events) = d.turn(&s, "list").await;
    let end = named(&events, "tool.end")
        .into_iter()
        .find(|e| e["payload"]["turnId"] == turn.as_str())
        .unwrap();
    let output = end["payload"]["result"]["output"].as_str().unwrap();
    assert!(output.len() <= 64 * 1024 + 200, "{} bytes", output.len());
    let tail = &output[output.len().saturating_sub(200)..];
    assert!(output.contains("bytes left out"), "{tail}");
    assert!(output.contains("list a subdirectory"));
    // The model got no more than that (its history may shorten it further), never the
    // whole listing.
    let history = conversation(lmx.requests().last().unwrap());
    let sent = history
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "tool")
        .unwrap()["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(sent.len() <= output.len(), "{} bytes sent", sent.len());
    assert!(sent.starts_with(&output[..200]), "{:?}", &sent[..100]);
}

/// This process's resident memory (the daemon runs in it), in MiB.
fn rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
        / 1024
}

async fn run_in(d: &TestDaemon, s: &str, mode: &str) -> Vec<Value> {
    let mut ws = d.ws(s, u64::MAX).await;
    let (status, body) = d
        .post(
            &format!("/v3/sessions/{s}/turns"),
            json!({"clientId": "t", "writerId": "w", "content": "go", "mode": mode}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{body}");
    let turn = body["turnId"].as_str().unwrap().to_owned();
    ws.envelopes_until(opta_test_support::is_terminal_of(&turn))
        .await
}

#[tokio::test]
async fn plan_mode_reads_and_edits_cannot_exhaust_the_daemons_memory() {
    let (lmx, d, dirs, s) = setup().await;
    // 20,000 occurrences, each to become 1 MiB: 20 GB if it were built.
    std::fs::write(dirs.ws.join("many.txt"), "ab\n".repeat(20_000)).unwrap();
    // A 1 GiB file of one line (sparse: zeros, no line end).
    let huge = std::fs::File::create(dirs.ws.join("huge.txt")).unwrap();
    huge.set_len(1 << 30).unwrap();
    let before = rss_mib();
    let big = "x".repeat(1 << 20);
    lmx.push(Reply::tool_call(
        "edit_file",
        json!({"path": "many.txt", "oldString": "ab", "newString": big, "replaceAll": true}),
    ));
    lmx.push(Reply::tool_call(
        "read_file",
        json!({"path": "huge.txt", "limit": 1}),
    ));
    lmx.push(Reply::tool_call(
        "read_file",
        json!({"path": "huge.txt", "byteOffset": 1_000_000_000u64}),
    ));
    lmx.push(Reply::chunks(["done"]));
    let events = run_in(&d, &s, "plan").await;
    let ends = named(&events, "tool.end");
    assert_eq!(ends.len(), 3);
    // Refused by the mode before anything was read or built (not by the edit cap).
    let refused = ends[0]["payload"]["result"]["error"].as_str().unwrap();
    assert!(refused.contains("denied in plan mode"), "{refused}");
    let read = ends[1]["payload"]["result"]["output"].as_str().unwrap();
    // 63 KiB shown: the note fits in the 64 KiB result.
    assert!(
        read.contains("read on with byteOffset 64512"),
        "{}",
        &read[read.len() - 300..]
    );
    assert!(read.len() < 70 * 1024, "{} bytes", read.len());
    let at = ends[2]["payload"]["result"]["output"].as_str().unwrap();
    assert!(at.starts_with("[from byte 1000000000]"), "{}", &at[..100]);
    let grown = rss_mib().saturating_sub(before);
    assert!(grown < 50, "the daemon grew by {grown} MiB");
    assert_eq!(
        std::fs::read_to_string(dirs.ws.join("many.txt"))
            .unwrap()
            .len(),
        60_000,
        "plan mode changed nothing"
    );
}

#[tokio::test]
async fn an_edit_that_would_add_more_than_the_cap_is_refused_before_it_is_built() {
    let (lmx, d, dirs, s) = setup().await;
    std::fs::write(dirs.ws.join("many.txt"), "ab\n".repeat(20_000)).unwrap();
    lmx.push(Reply::tool_call(
        "read_file",
        json!({"path": "many.txt", "limit": 1}),
    ));
    lmx.push(Reply::tool_call(
        "edit_file",
        json!({"path": "many.txt", "oldString": "ab", "newString": "x".repeat(100), "replaceAll": true}),
    ));
    lmx.push(Reply::tool_call(
        "edit_file",
        json!({"path": "many.txt", "oldString": "ab", "newString": "abc", "replaceAll": true}),
    ));
    lmx.push(Reply::chunks(["done"]));
    let events = run_in(&d, &s, "do").await;
    let ends = named(&events, "tool.end");
    let refused = ends[1]["payload"]["result"]["error"].as_str().unwrap();
    assert!(refused.contains("--max-edit-kib"), "{refused}");
    assert!(refused.contains("20000 replacements"), "{refused}");
    // 20 KB added: within the cap, made.
    assert_eq!(ends[2]["payload"]["result"]["ok"], true, "{:?}", ends[2]);
    assert_eq!(
        std::fs::read_to_string(dirs.ws.join("many.txt"))
            .unwrap()
            .len(),
        80_000
    );
}
