//! Clients that stall, retry, send extreme numbers or conflicting positions, and a store that
//! fills up: each gets the documented outcome within a bounded time, and nothing is stranded.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use opta_test_support::{Reply, ScriptedLmx, TestDaemon, is_terminal_of, token_text};
use pretty_assertions::assert_eq;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "test-token-0123456789abcdef0123456789";

fn addr(d: &TestDaemon) -> String {
    d.base.trim_start_matches("http://").to_owned()
}

/// Sends request headers announcing a 100-byte body and half of it, then stalls.
async fn stalled_body_client(d: &TestDaemon) -> TcpStream {
    let mut tcp = TcpStream::connect(addr(d)).await.unwrap();
    let head = format!(
        "POST /v3/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"title\": \"half"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp
}

#[tokio::test]
async fn a_half_sent_body_gets_408_and_changes_nothing() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.limits.body_read_timeout = Duration::from_millis(300);
    })
    .await;
    let mut tcp = stalled_body_client(&d).await;
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .expect("the daemon answers and closes in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request-timeout"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let (_, list) = d.get("/v3/sessions").await;
    assert_eq!(list["sessions"], json!([]));
}

#[tokio::test]
async fn shutdown_is_bounded_by_stalled_and_non_reading_clients() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.limits.shutdown_grace = Duration::from_millis(500);
        // Neither timeout comes to the rescue here: the grace period does.
        c.limits.body_read_timeout = Duration::from_secs(600);
        c.limits.write_timeout = Duration::from_secs(600);
    })
    .await;
    let s = d.create_session(None).await;
    big_history(&d, &s).await;
    // One client stalls mid-body, one asks for a large replay and never reads it.
    let _stalled = stalled_body_client(&d).await;
    let _sse = non_reading_sse_client(&d, &s).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), d.stop())
        .await
        .expect("shutdown ends in time");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_by_the_write_timeout() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.limits.write_timeout = Duration::from_millis(400);
    })
    .await;
    let s = d.create_session(None).await;
    big_history(&d, &s).await;
    let _sse = non_reading_sse_client(&d, &s).await;
    let started = Instant::now();
    loop {
        let (_, metrics) = d.get("/v3/metrics").await;
        if metrics["runtime"]["subscriberCount"] == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the non-reading subscriber is still connected: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The daemon serves everyone else meanwhile.
    let (status, _) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(status, StatusCode::OK);
}

/// Fills a session's event log with ~24 MB (more than loopback socket buffers hold).
async fn big_history(d: &TestDaemon, s: &str) {
    let big = "x".repeat(2 * 1024 * 1024);
    let mut ws = d.ws(s, 0).await;
    for _ in 0..6 {
        let t = d.submit(s, &big).await;
        ws.envelopes_until(is_terminal_of(&t)).await;
    }
}

/// Asks for the whole replay over SSE and never reads a byte.
async fn non_reading_sse_client(d: &TestDaemon, s: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr(d)).await.unwrap();
    let head = format!(
        "GET /v3/sse/events?sessionId={s}&afterSeq=0 HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {TOKEN}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp
}

#[tokio::test]
async fn storage_full_mid_turn_does_not_strand_the_queue() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.store.max_bytes = Some(1024 * 1024);
        c.faults.deltas_kept_apart = true;
    })
    .await;
    let s = d.create_session(None).await;
    lmx.push(Reply::chunks((0..50_000).map(|i| format!("t{i} "))));
    let mut ws = d.ws(&s, 0).await;
    let a = d.submit(&s, "fill it up").await;
    let b = d.submit(&s, "then me").await;
    let started = Instant::now();
    let events = ws.envelopes_until(is_terminal_of(&b)).await;
    let end_a = events.iter().find(|e| is_terminal_of(&a)(e)).unwrap();
    assert_eq!(end_a["payload"]["code"], "storage-full", "{end_a}");
    let end_b = events.last().unwrap();
    assert_eq!(end_b["event"], "turn.done", "{end_b}");
    assert_eq!(token_text(&events, &b), "echo: then me");
    assert!(started.elapsed() < Duration::from_secs(15));
    let (_, snapshot) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(snapshot["activeTurnId"], Value::Null);
    assert_eq!(snapshot["queuedTurns"], 0);
}

static DISK: AtomicI64 = AtomicI64::new(-1);

#[tokio::test]
async fn a_turn_whose_start_and_failure_both_hit_a_full_disk_ends_once_space_returns() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.store.full_disk_fault = Some(&DISK);
    })
    .await;
    let s = d.create_session(None).await;
    lmx.push(Reply::hang());
    let mut ws = d.ws(&s, 0).await;
    let a = d.submit(&s, "hang").await;
    let b = d.submit(&s, "queued behind").await;
    lmx.wait_chat_requests(1).await;
    // One more commit fits (A's cancellation); B's start and its failure record do not.
    DISK.store(1, Ordering::SeqCst);
    let (status, _) = d
        .post(&format!("/v3/sessions/{s}/cancel"), json!({"turnId": a}))
        .await;
    assert_eq!(status, StatusCode::OK);
    ws.envelopes_until(is_terminal_of(&a)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_, snapshot) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(snapshot["activeTurnId"], Value::Null, "{snapshot}");
    // Space returns: B gets its terminal event, exactly once.
    DISK.store(-1, Ordering::SeqCst);
    let events = ws.envelopes_until(is_terminal_of(&b)).await;
    let end_b = events.last().unwrap();
    assert_eq!(end_b["payload"]["code"], "storage-full", "{end_b}");
    let all = d.events(&s, 0).await;
    let terminals_of = |t: &str| all.iter().filter(|e| is_terminal_of(t)(e)).count();
    assert_eq!((terminals_of(&a), terminals_of(&b)), (1, 1));
    opta_test_support::assert_contiguous(&all, 1);
    // And the session works again.
    let c = d.submit(&s, "after").await;
    let events = ws.envelopes_until(is_terminal_of(&c)).await;
    assert_eq!(events.last().unwrap()["event"], "turn.done");
    // Across a restart nothing is reported again.
    let d = d.restart().await;
    let all = d.events(&s, 0).await;
    assert_eq!(all.iter().filter(|e| is_terminal_of(&b)(e)).count(), 1);
}

#[tokio::test]
async fn an_idempotent_retry_with_last_seen_seq_returns_the_first_turn() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(detail["lastSeq"], 1, "{detail}");
    let body = json!({"clientId": "c", "writerId": "w", "content": "once", "mode": "chat",
        "idempotencyKey": "k-1", "lastSeenSeq": detail["lastSeq"]});
    let (status, first) = d
        .post(&format!("/v3/sessions/{s}/turns"), body.clone())
        .await;
    assert_eq!(
        (status, first["queued"].clone()),
        (StatusCode::ACCEPTED, json!(true)),
        "{first} {detail}"
    );
    let (status, again) = d.post(&format!("/v3/sessions/{s}/turns"), body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["turnId"], first["turnId"]);
    assert_eq!(again["queued"], false);
    // A new request with a stale seq still conflicts.
    let stale = json!({"clientId": "c", "writerId": "w", "content": "two", "mode": "chat",
        "idempotencyKey": "k-2", "lastSeenSeq": 0});
    let (status, _) = d.post(&format!("/v3/sessions/{s}/turns"), stale).await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn seq_numbers_beyond_what_storage_holds_are_bounded_not_500() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    for after in ["9223372036854775808", "18446744073709551615"] {
        let (status, body) = d
            .get(&format!("/v3/sessions/{s}/events?afterSeq={after}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{after}: {body}");
        assert_eq!(body["events"], json!([]));
        assert_eq!(body["lastSeq"], 1);
    }
    let (status, body) = d
        .get(&format!(
            "/v3/sessions/{s}/events?afterSeq=18446744073709551616"
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // The WebSocket plane takes the same numbers: nothing to replay, live from now.
    let mut ws = d.ws(&s, u64::MAX).await;
    let t = d.submit(&s, "live").await;
    let events = ws.envelopes_until(is_terminal_of(&t)).await;
    assert_eq!(events.first().unwrap()["event"], "turn.queued");
}

#[tokio::test]
async fn sse_last_event_id_wins_over_after_seq_and_an_empty_one_is_absent() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let t = d.submit(&s, "one two three").await;
    d.ws(&s, 0).await.envelopes_until(is_terminal_of(&t)).await;
    let first_seq = |last_event_id: &'static str| {
        let url = format!("{}/v3/sse/events?sessionId={s}&afterSeq=1", d.base);
        let http = d.http.clone();
        async move {
            let resp = http
                .get(url)
                .bearer_auth(TOKEN)
                .header("Last-Event-ID", last_event_id)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let mut body = resp.bytes_stream();
            let mut text = String::new();
            use futures_util::StreamExt;
            while !text.contains("\nid: ") && !text.starts_with("id: ") {
                let piece = tokio::time::timeout(Duration::from_secs(5), body.next())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                text.push_str(&String::from_utf8_lossy(&piece));
            }
            let id_line = text.lines().find(|l| l.starts_with("id: ")).unwrap();
            id_line[4..].trim().parse::<u64>().unwrap()
        }
    };
    // A browser reconnecting: its original URL (afterSeq=1) plus the newer Last-Event-ID.
    assert_eq!(first_seq("4").await, 5);
    // Empty: the query's afterSeq applies.
    assert_eq!(first_seq("").await, 2);
    // Not a number: 400, as before.
    let resp = d
        .http
        .get(format!("{}/v3/sse/events?sessionId={s}", d.base))
        .bearer_auth(TOKEN)
        .header("Last-Event-ID", "abc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_model_picked_while_the_preflight_runs_is_kept() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.set_loaded(&["default", "other-model"]);
    let d = TestDaemon::start(&lmx.url()).await;
    let (_, created) = d.post("/v3/sessions", json!({"model": "DEFAULT"})).await;
    let s = created["sessionId"].as_str().unwrap().to_owned();
    let mut ws = d.ws(&s, 0).await;
    lmx.set_model_list_delay(Duration::from_millis(400));
    let t = d.submit(&s, "hi").await;
    // While the check runs, a client picks another model.
    let (status, _) = d
        .post(
            "/v3/sessions",
            json!({"sessionId": s, "model": "other-model"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let events = ws.envelopes_until(is_terminal_of(&t)).await;
    assert_eq!(events.last().unwrap()["event"], "turn.done");
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(detail["model"], "other-model");
    // Without a change meanwhile, the canonical id is written back.
    lmx.set_model_list_delay(Duration::ZERO);
    let (_, created) = d.post("/v3/sessions", json!({"model": "DEFAULT"})).await;
    let s2 = created["sessionId"].as_str().unwrap().to_owned();
    let t = d.submit(&s2, "hi").await;
    d.ws(&s2, 0).await.envelopes_until(is_terminal_of(&t)).await;
    let (_, detail) = d.get(&format!("/v3/sessions/{s2}")).await;
    assert_eq!(detail["model"], "default");
}

#[tokio::test]
async fn re_opening_a_session_does_not_store_its_history_again() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let history: Vec<Value> = (0..20)
        .map(|i| json!({"role": "user", "content": format!("{i} {}", "y".repeat(1000))}))
        .collect();
    let (status, _) = d
        .post(
            "/v3/sessions",
            json!({"sessionId": "long", "messages": history}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    for _ in 0..50 {
        let (status, _) = d.post("/v3/sessions", json!({"sessionId": "long"})).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let events = d.events("long", 0).await;
    assert_eq!(events.len(), 51);
    let size = |e: &Value| e.to_string().len();
    // The creation carries the ~20 KB history; the 50 re-opens carry none of it.
    assert!(size(&events[0]) > 20_000);
    let reopened: usize = events[1..].iter().map(size).sum();
    assert!(reopened < 50 * 1_000, "{reopened} bytes");
    assert!(
        events[1..]
            .iter()
            .all(|e| e["payload"].get("messages").is_none())
    );
}

#[tokio::test]
async fn a_database_from_a_newer_opta_stops_the_start_with_a_clear_message() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("daemon");
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("opta.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    let mut config = opta_daemon::DaemonConfig::new(home.path());
    config.port = 0;
    let e = opta_daemon::RunningDaemon::start(config).await.unwrap_err();
    let message = e.to_string();
    assert!(message.contains("schema version 99"), "{message}");
    assert!(message.contains("newer opta"), "{message}");
    // Untouched, and the lock is released: the state file was never written.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let v: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, 99);
    assert!(!dir.join("state.json").exists());
}
