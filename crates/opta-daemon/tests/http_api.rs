//! Every HTTP route's success and error answers, auth, CORS, limits and validation.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use opta_test_support::{Reply, ScriptedLmx, TestDaemon, is_terminal_of};
use pretty_assertions::assert_eq;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn daemon() -> (ScriptedLmx, TestDaemon) {
    TestDaemon::with_scripted_lmx().await
}

#[tokio::test]
async fn health_routes() {
    let (_lmx, d) = daemon().await;
    let resp = d
        .http
        .get(format!("{}/health", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "daemon": true})
    );

    let (status, mut body) = d.get("/v3/health").await;
    assert_eq!(status, StatusCode::OK);
    // Which one depends on the kernel (the background tests check it is true to it).
    let sandbox = body
        .as_object_mut()
        .and_then(|b| b.remove("sandbox"))
        .unwrap();
    assert!(sandbox == "landlock" || sandbox == "none", "{sandbox}");
    // Which one depends on the host (the process tests check it is true to it).
    let processes = body
        .as_object_mut()
        .and_then(|b| b.remove("processes"))
        .unwrap();
    assert!(
        ["cgroup", "pid-namespace", "process-group"].contains(&processes.as_str().unwrap()),
        "{processes}"
    );
    assert_eq!(
        body,
        json!({
            "gitMetadata": "writable",
            "status": "ok", "version": env!("CARGO_PKG_VERSION"),
            "daemonId": d.daemon().state().daemon_id,
            "contract": {"name": "opta-daemon-v3", "version": 1},
            "runtime": {"sessionCount": 0, "activeTurnCount": 0, "queuedTurnCount": 0, "subscriberCount": 0, "evictedSessionCount": 0}
        })
    );
    let (status, body) = d.get("/v3/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["daemonId"], d.daemon().state().daemon_id.as_str());
    assert!(body["ts"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn every_route_but_health_needs_the_token() {
    let (_lmx, d) = daemon().await;
    let s = d.create_session(Some("authz")).await;
    let routes = [
        (Method::GET, "/v3/health".to_owned()),
        (Method::GET, "/v3/metrics".to_owned()),
        (Method::POST, "/v3/sessions".to_owned()),
        (Method::GET, "/v3/sessions".to_owned()),
        (Method::GET, format!("/v3/sessions/{s}")),
        (Method::DELETE, format!("/v3/sessions/{s}")),
        (Method::POST, format!("/v3/sessions/{s}/turns")),
        (Method::GET, format!("/v3/sessions/{s}/events")),
        (Method::POST, format!("/v3/sessions/{s}/cancel")),
        (Method::POST, format!("/v3/sessions/{s}/permissions/perm_1")),
        (Method::GET, format!("/v3/sse/events?sessionId={s}")),
        (Method::GET, "/v3/nope".to_owned()),
    ];
    for (method, path) in routes {
        for auth in [None, Some("Bearer wrong"), Some("Basic abc")] {
            let mut req = d.http.request(method.clone(), format!("{}{path}", d.base));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(
                resp.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} {auth:?}"
            );
            assert_eq!(
                resp.json::<Value>().await.unwrap(),
                json!({"error": "Unauthorized"})
            );
        }
    }
    // The query token works too (browsers cannot set headers on EventSource).
    let resp = d
        .http
        .get(format!("{}/v3/health?token={}", d.base, d.token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Nothing was deleted by the refused DELETE.
    assert_eq!(d.get(&format!("/v3/sessions/{s}")).await.0, StatusCode::OK);
}

#[tokio::test]
async fn cors_echoes_only_loopback_origins_and_options_is_204() {
    let (_lmx, d) = daemon().await;
    for (origin, allowed) in [
        ("http://localhost:5173", true),
        ("https://127.0.0.1", true),
        ("http://[::1]:8080", true),
        ("http://evil.example", false),
        ("http://localhost.evil.example", false),
    ] {
        let resp = d
            .http
            .request(Method::OPTIONS, format!("{}/v3/sessions", d.base))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT, "{origin}");
        let echoed = resp
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(echoed, allowed.then(|| origin.to_owned()), "{origin}");
        if allowed {
            let h = resp.headers();
            assert_eq!(h["access-control-allow-credentials"], "true");
            assert!(
                h["access-control-allow-methods"]
                    .to_str()
                    .unwrap()
                    .contains("DELETE")
            );
            assert!(
                h["access-control-allow-headers"]
                    .to_str()
                    .unwrap()
                    .contains("Authorization")
            );
        }
        assert!(resp.headers().get_all("vary").iter().any(|v| v == "Origin"));
    }
    // A plain OPTIONS (no preflight headers) is 204 too, and a normal response carries CORS.
    let resp = d
        .http
        .request(Method::OPTIONS, format!("{}/anything", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = d
        .http
        .get(format!("{}/health", d.base))
        .header("origin", "http://localhost:3000")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json() {
    let (_lmx, d) = daemon().await;
    let (status, body) = d.get("/v3/nothing-here").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "not-found");
    let (status, body) = d.request(Method::PUT, "/v3/sessions", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["code"], "method-not-allowed");
    let (status, body) = d.post("/v1/chat", json!({"message": "hi"})).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "there is no v1 route: {body}"
    );
    // The background routes answer in JSON: an empty list, a 400 naming the missing field,
    // 404 for a process that does not exist.
    let (status, body) = d.get("/v3/background?sessionId=s1").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"processes": []})));
    let (status, body) = d.post("/v3/background/start", json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["details"][0]["path"], "sessionId", "{body}");
    for (method, path) in [
        (Method::GET, "/v3/background/4242/status?sessionId=s1"),
        (Method::GET, "/v3/background/4242/output"),
        (Method::POST, "/v3/background/4242/kill"),
    ] {
        let body = (method == Method::POST).then(|| json!({}));
        let (status, body) = d.request(method, path, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(body["code"], "process-not-found", "{path}: {body}");
    }
}

#[tokio::test]
async fn sessions_create_reopen_get_list_delete() {
    let (_lmx, d) = daemon().await;
    let (status, created) = d
        .post(
            "/v3/sessions",
            json!({"sessionId": "s-1", "model": "m1", "title": "T", "metadata": {"k": 1},
                "messages": [{"role": "system", "content": "be brief"}], "futureField": true}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let created_at = created["createdAt"].clone();
    assert_eq!(
        created,
        json!({"sessionId": "s-1", "model": "m1", "title": "T", "createdAt": created_at,
            "updatedAt": created["updatedAt"], "queuedTurns": 0, "toolCallCount": 0, "writerCount": 0})
    );
    // Re-open: same session, model change applied, history kept, snapshot event emitted.
    let (status, reopened) = d
        .post("/v3/sessions", json!({"sessionId": "s-1", "model": "m2"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        (reopened["model"].clone(), reopened["createdAt"].clone()),
        (json!("m2"), created_at)
    );
    let (status, detail) = d.get("/v3/sessions/s-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        detail["messages"],
        json!([{"role": "system", "content": "be brief"}])
    );
    let events = d.events("s-1", 0).await;
    let kinds: Vec<_> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["session.snapshot", "session.snapshot"]);
    // Created: the snapshot carries the history; re-opened: it does not (issue 8 #12), so
    // re-opening a long session does not store its history again.
    assert_eq!(events[0]["payload"]["messages"], detail["messages"]);
    assert!(
        events[1]["payload"].get("messages").is_none(),
        "{}",
        events[1]
    );

    // A generated id matches the pattern.
    let (_, generated) = d.post("/v3/sessions", json!({})).await;
    let id = generated["sessionId"].as_str().unwrap();
    assert!(
        id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    );
    assert_eq!(
        generated["model"], "",
        "no --model: the server's first loaded model, once known"
    );

    // Delete: 204, then 404 everywhere, and the id can be created afresh.
    let (status, body) = d.request(Method::DELETE, "/v3/sessions/s-1", None).await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null));
    for path in ["/v3/sessions/s-1", "/v3/sessions/s-1/events"] {
        let (status, body) = d.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body["code"], "session-not-found");
    }
    let (status, _) = d.request(Method::DELETE, "/v3/sessions/s-1", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = d
        .post(
            "/v3/sessions/s-1/turns",
            json!({"clientId": "c", "writerId": "w", "content": "x", "mode": "chat"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn delete_cancels_running_turns_first() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.push(opta_test_support::Reply::hang());
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let mut ws = d.ws(&s, 0).await;
    let turn = d.submit(&s, "hang").await;
    ws.envelopes_until(|e| e["event"] == "turn.start").await;
    // The request is under way at the inference server before the session goes.
    lmx.wait_chat_requests(1).await;
    let (status, _) = d
        .request(Method::DELETE, &format!("/v3/sessions/{s}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let events = ws.envelopes_until(is_terminal_of(&turn)).await;
    assert_eq!(events.last().unwrap()["payload"]["code"], "cancelled");
    lmx.wait_streams_dropped(1).await;
}

#[tokio::test]
async fn session_list_is_paginated_newest_first() {
    let (_lmx, d) = daemon().await;
    for i in 0..7 {
        d.create_session(Some(&format!("list-{i}"))).await;
    }
    // Touch list-2 so it becomes the most recently updated. updatedAt has millisecond
    // resolution: let the clock pass list-6's millisecond first, or the two tie.
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    d.post(
        "/v3/sessions",
        json!({"sessionId": "list-2", "title": "touched"}),
    )
    .await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v3/sessions?limit=3&cursor={c}"),
            None => "/v3/sessions?limit=3".to_owned(),
        };
        let (status, page) = d.get(&path).await;
        assert_eq!(status, StatusCode::OK);
        let ids: Vec<String> = page["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sessionId"].as_str().unwrap().to_owned())
            .collect();
        assert!(ids.len() <= 3);
        seen.extend(ids);
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7, "{seen:?}");
    assert_eq!(seen[0], "list-2");
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 7);
    for bad in ["limit=0", "limit=501", "limit=x", "cursor=%%%"] {
        let (status, body) = d.get(&format!("/v3/sessions?{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(
            body["details"][0]["path"]
                .as_str()
                .unwrap()
                .starts_with("query."),
            "{body}"
        );
    }
}

#[tokio::test]
async fn bad_input_is_400_with_details_and_changes_nothing() {
    let (_lmx, d) = daemon().await;
    let s = d.create_session(Some("valid")).await;
    let turns = format!("/v3/sessions/{s}/turns");
    let cases = [
        (
            json!({"writerId": "w", "content": "x", "mode": "chat"}),
            "clientId",
        ),
        (
            json!({"clientId": 5, "writerId": "w", "content": "x", "mode": "chat"}),
            "clientId",
        ),
        (
            json!({"clientId": "c", "writerId": "w", "content": "x", "mode": "dance"}),
            "mode",
        ),
        (
            json!({"clientId": "c", "writerId": "w", "content": "x", "mode": "chat", "lastSeenSeq": -1}),
            "lastSeenSeq",
        ),
        (
            json!({"clientId": "c", "writerId": "w", "content": "x", "mode": "chat", "overrides": {"format": "yaml"}}),
            "overrides.format",
        ),
        (
            json!({"clientId": "c", "writerId": "w", "content": "  ", "mode": "chat"}),
            "content",
        ),
        (
            json!({"clientId": "", "writerId": "w", "content": "x", "mode": "chat"}),
            "clientId",
        ),
        (json!([1, 2]), "body"),
    ];
    for (body, path) in cases {
        let (status, answer) = d.post(&turns, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(answer["code"], "invalid-request");
        assert_eq!(answer["details"][0]["path"], path, "{body}: {answer}");
        assert!(answer["error"].as_str().is_some());
    }
    // Malformed JSON.
    let resp = d
        .http
        .post(format!("{}{turns}", d.base))
        .bearer_auth(&d.token)
        .header("content-type", "application/json")
        .body("{\"clientId\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["code"],
        "invalid-request"
    );
    // Bad session ids never reach the store.
    for bad in ["a.b", "a%20b", "a%2Fb", &"x".repeat(65)] {
        let (status, body) = d.get(&format!("/v3/sessions/{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let (status, _) = d.post("/v3/sessions", json!({"sessionId": "../etc"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = d.get("/v3/sse/events").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = d.get("/v3/sse/events?sessionId=missing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = d.get(&format!("/v3/sessions/{s}/events?afterSeq=-3")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Nothing changed: only the creation event exists, nothing queued.
    assert_eq!(d.events(&s, 0).await.len(), 1);
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(detail["queuedTurns"], 0);
}

#[tokio::test]
async fn bodies_over_10_mib_are_413() {
    let (_lmx, d) = daemon().await;
    let s = d.create_session(None).await;
    let content = "x".repeat(10 * 1024 * 1024 + 1);
    let (status, body) = d
        .post(
            &format!("/v3/sessions/{s}/turns"),
            json!({"clientId": "c", "writerId": "w", "content": content, "mode": "chat"}),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["code"], "payload-too-large");
    assert_eq!(d.events(&s, 0).await.len(), 1);
}

#[tokio::test]
async fn events_route_filters_by_after_seq() {
    let (_lmx, d) = daemon().await;
    let s = d.create_session(None).await;
    let turn = d.submit(&s, "hi").await;
    d.ws(&s, 0)
        .await
        .envelopes_until(is_terminal_of(&turn))
        .await;
    let all = d.events(&s, 0).await;
    let tail = d.events(&s, 3).await;
    assert_eq!(tail, all[3..].to_vec());
    assert!(d.events(&s, 10_000).await.is_empty());
}

#[tokio::test]
async fn permission_route_validates_and_answers_404_for_unknown_requests() {
    let (_lmx, d) = daemon().await;
    let s = d.create_session(None).await;
    let path = format!("/v3/sessions/{s}/permissions/perm_abc");
    let (status, body) = d
        .post(
            &path,
            json!({"requestId": "perm_abc", "decision": "allow", "decidedBy": "me"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "permission-not-found");
    let (status, _) = d
        .post(
            &path,
            json!({"requestId": "perm_other", "decision": "allow", "decidedBy": "me"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = d
        .post(
            &path,
            json!({"requestId": "perm_abc", "decision": "maybe", "decidedBy": "me"}),
        )
        .await;
    assert_eq!(
        (status, body["details"][0]["path"].clone()),
        (StatusCode::BAD_REQUEST, json!("decision"))
    );
    let (status, _) = d
        .post(
            "/v3/sessions/none/permissions/perm_abc",
            json!({"requestId": "perm_abc", "decision": "deny", "decidedBy": "me"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn runtime_counters_follow_sessions_turns_and_subscribers() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.push(opta_test_support::Reply::hang());
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    let mut ws = d.ws(&s, 0).await;
    let t1 = d.submit(&s, "one").await;
    d.submit(&s, "two").await;
    ws.envelopes_until(|e| e["event"] == "turn.start").await;
    let (_, health) = d.get("/v3/health").await;
    assert_eq!(
        health["runtime"],
        json!({"sessionCount": 1, "activeTurnCount": 1, "queuedTurnCount": 1, "subscriberCount": 1, "evictedSessionCount": 0})
    );
    let (_, detail) = d.get(&format!("/v3/sessions/{s}")).await;
    assert_eq!(
        (
            detail["activeTurnId"].clone(),
            detail["queuedTurns"].clone(),
            detail["writerCount"].clone()
        ),
        (json!(t1), json!(1), json!(1))
    );
}

#[tokio::test]
async fn every_route_of_the_openapi_document_is_served() {
    let (_lmx, d) = daemon().await;
    let doc = opta_protocol::openapi();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        // An unknown session, request and process: the route answers for itself.
        let concrete = path
            .replace("{sessionId}", "nobody-here")
            .replace("{requestId}", "perm_nothing")
            .replace("{pid}", "42")
            .replace("{modelId}", "org/no-such-model")
            .replace("{downloadId}", "no-such-download")
            .replace("{file}", "app.js");
        for method in item.as_object().unwrap().keys() {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            if matches!(
                path.as_str(),
                "/metrics" | "/" | "/assets/{file}" | "/v3/sse/sessions"
            ) {
                // Text, a page or a stream, not JSON: the answer's status is enough.
                let resp = d
                    .http
                    .get(format!("{}{concrete}", d.base))
                    .bearer_auth(&d.token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
                checked += 1;
                continue;
            }
            let body = (method == Method::POST).then(|| json!({}));
            let (status, body) = d.request(method.clone(), &concrete, body).await;
            assert!(
                status != StatusCode::METHOD_NOT_ALLOWED
                    && !matches!(
                        body["code"].as_str(),
                        Some("not-found" | "method-not-allowed")
                    ),
                "{method} {path} is documented but not served: {status} {body}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 37, "operations in the document");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off_but_streams_live_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.limits.header_read_timeout = std::time::Duration::from_millis(200);
        c.limits.keepalive = std::time::Duration::from_millis(150);
    })
    .await;
    let s = d.create_session(None).await;
    // An SSE stream outlives the header timeout: it is past its headers.
    let mut sse = opta_test_support::SseClient::connect(
        &d.http,
        &format!("{}/v3/sse/events?sessionId={s}", d.base),
        &d.token,
        None,
    )
    .await;
    sse.next().await.expect("the snapshot replays");

    let addr = d.base.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        slow.read_to_end(&mut rest),
    )
    .await
    .expect("the daemon closes the connection")
    .ok();
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(150),
        "closed after {:?}, before the timeout",
        started.elapsed()
    );

    // Well past the timeout, the stream still delivers, and new requests are served.
    let turn = d.submit(&s, "still there?").await;
    let events = sse.envelopes_until(is_terminal_of(&turn)).await;
    assert_eq!(events.last().unwrap()["event"], "turn.done");
    let (status, _) = d.get("/v3/health").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn prometheus_metrics_have_every_family_and_move_with_a_turn() {
    let (lmx, d) = daemon().await;
    let scrape = || async {
        let resp = d
            .http
            .get(format!("{}/metrics", d.base))
            .bearer_auth(&d.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        resp.text().await.unwrap()
    };
    let before = scrape().await;
    let s = d.create_session(None).await;
    let t = d.submit(&s, "count me").await;
    d.ws(&s, 0).await.envelopes_until(is_terminal_of(&t)).await;
    lmx.push(Reply::status(500, "boom"));
    let t = d.submit(&s, "fail me").await;
    d.ws(&s, 0).await.envelopes_until(is_terminal_of(&t)).await;
    let after = scrape().await;
    // Every family that has had a sample (labelled families appear with their first one; tool
    // calls and permission decisions arrive with the agent's tools).
    for family in [
        "opta_turns",
        "opta_turn_duration_seconds",
        "opta_first_token_seconds",
        "opta_events",
        "opta_store_commit_seconds",
        "opta_inference_request_seconds",
        "opta_inference_errors",
        "opta_sessions_resident",
        "opta_sessions_evicted",
        "opta_subscribers",
        "opta_session_channels",
        "opta_turns_active",
        "opta_turns_queued",
    ] {
        assert!(
            after.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{after}"
        );
    }
    let value = |text: &str, line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(
        value(&after, "opta_turns_total{outcome=\"done\",code=\"\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        value(&after, "opta_turns_total{outcome=\"failed\",code=\"\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        value(&after, "opta_inference_errors_total{code=\"other\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        value(&after, "opta_turn_duration_seconds_count"),
        2.0,
        "{after}"
    );
    assert_eq!(
        value(&after, "opta_first_token_seconds_count"),
        1.0,
        "{after}"
    );
    assert!(value(&after, "opta_events_total") > value(&before, "opta_events_total"));
    assert!(
        value(&after, "opta_store_commit_seconds_count") >= 4.0,
        "{after}"
    );
    assert_eq!(value(&after, "opta_sessions_resident"), 1.0, "{after}");
    // The token is needed, as on every route but /health.
    let anonymous = d
        .http
        .get(format!("{}/metrics", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_sessions_channel_is_freed_as_soon_as_its_last_subscriber_leaves() {
    let (_lmx, d) = daemon().await;
    let channels = || async {
        let text = d.prometheus().await;
        text.lines()
            .find(|l| l.starts_with("opta_session_channels "))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
    };
    let s = d.create_session(None).await;
    let mut ws = d.ws(&s, 0).await;
    let mut sse = d.sse(&s, 0).await;
    let t = d.submit(&s, "hello").await;
    ws.envelopes_until(is_terminal_of(&t)).await;
    sse.envelopes_until(is_terminal_of(&t)).await;
    assert_eq!(channels().await, 1, "one channel while it has subscribers");
    drop(sse);
    ws.close().await;
    // No further event comes to this session: the subscribers' leaving alone frees it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while channels().await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the channel outlived its subscribers"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // A new subscriber gets a new one.
    let mut ws = d.ws(&s, 0).await;
    let t = d.submit(&s, "again").await;
    ws.envelopes_until(is_terminal_of(&t)).await;
    assert_eq!(channels().await, 1);
}
