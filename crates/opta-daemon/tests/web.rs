//! The web client's routes: the page and assets (public, with security headers), the one-time
//! sign-in code, the session feed, and the token kept across restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::Duration;

use opta_test_support::{Reply, ScriptedLmx, SseClient, TestDaemon, is_terminal_of};
use pretty_assertions::assert_eq;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn daemon() -> (ScriptedLmx, TestDaemon) {
    TestDaemon::with_scripted_lmx().await
}

#[tokio::test]
async fn the_page_and_its_assets_are_public_and_locked_down() {
    let (_lmx, d) = daemon().await;
    let page = d.get_anonymous("/").await;
    assert_eq!(page.status(), StatusCode::OK);
    let headers = page.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let csp = headers["content-security-policy"].to_str().unwrap();
    for rule in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(rule), "{rule} in {csp}");
    }
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="/assets/app.js">"#));
    assert!(!html.contains("<script>"), "no inline script");

    for (asset, kind) in [
        ("app.js", "text/javascript"),
        ("style.css", "text/css"),
        ("vendor/marked.js", "text/javascript"),
        ("vendor/purify.js", "text/javascript"),
        ("vendor/LICENSE-dompurify.txt", "text/plain"),
    ] {
        let resp = d.get_anonymous(&format!("/assets/{asset}")).await;
        assert_eq!(resp.status(), StatusCode::OK, "{asset}");
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind),
            "{asset}"
        );
        assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    }
    // Nothing else is public: unknown assets are 404, a path escaping the assets is not a
    // way around the token, and every API route still wants it.
    for path in ["/assets/nope.js", "/assets/vendor"] {
        let resp = d.get_anonymous(path).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
    }
    // Sent as it is (a URL library would resolve the dots first).
    for path in ["/assets/../v3/sessions", "/assets/%2e%2e/v3/sessions"] {
        let raw = raw_get(&d.base, path).await;
        assert!(
            raw.starts_with("HTTP/1.1 404") || raw.starts_with("HTTP/1.1 401"),
            "{path}: {raw}"
        );
    }
    for path in ["/v3/sessions", "/v3/sse/sessions", "/metrics"] {
        let resp = d.get_anonymous(path).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{path}");
        // API answers carry the same headers.
        assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    }
    let post = d.http.post(format!("{}/", d.base)).send().await.unwrap();
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_sign_in_code_works_once_and_only_with_the_token_to_make_it() {
    let (_lmx, d) = daemon().await;
    let anonymous = d
        .http
        .post(format!("{}/v3/web/code", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    let (status, link) = d.post("/v3/web/code", json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    let code = link["code"].as_str().unwrap().to_owned();
    assert_eq!(code.len(), 32);
    let host = d.base.trim_start_matches("http://");
    assert_eq!(link["url"], format!("http://{host}/#code={code}"));
    assert!(!link["url"].as_str().unwrap().contains(&d.token));
    assert!(link["expiresAt"].as_str().unwrap().ends_with('Z'));

    let exchange = |body: Value| {
        let d = &d;
        async move {
            let resp = d
                .http
                .post(format!("{}/v3/web/exchange", d.base))
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, body) = exchange(json!({"code": "not-a-code"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["code"], "sign-in-code-rejected");
    assert!(body["error"].as_str().unwrap().contains("opta web"));
    let (status, body) = exchange(json!({"code": null})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = exchange(json!({"code": code})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"token": d.token}));
    let (status, _) = exchange(json!({"code": code})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a code works once");
}

/// A GET of `path` exactly as written; the response's head and body as text.
async fn raw_get(base: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// The next feed item (data lines only; `: connected` and pings are comments).
async fn next_item(feed: &mut SseClient) -> Value {
    feed.next().await.expect("the feed is open").data
}

#[tokio::test]
async fn the_session_feed_follows_creates_turns_and_deletes() {
    let (lmx, d) = daemon().await;
    let url = format!("{}/v3/sse/sessions", d.base);
    let mut feed = SseClient::connect(&d.http, &url, &d.token, None).await;
    assert_eq!(feed.status, StatusCode::OK);
    // The token may come in the query too (EventSource cannot set headers).
    let by_query = d
        .http
        .get(format!("{url}?token={}", d.token))
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), StatusCode::OK);
    drop(by_query);

    let id = d.create_session(None).await;
    let created = next_item(&mut feed).await;
    assert_eq!(created["event"], "session.changed");
    assert_eq!(created["session"]["sessionId"], id);
    assert!(created["session"]["activeTurnId"].is_null());

    lmx.push(Reply::slow(3, Duration::from_millis(50)));
    let turn = d.submit(&id, "hello").await;
    // Queued or started (depending on timing), then running, then idle again: the last item
    // of the turn shows the session idle, and no item is a repeat of the one before it.
    let mut items = Vec::new();
    loop {
        let item = next_item(&mut feed).await;
        assert_eq!(item["session"]["sessionId"], id);
        let idle = item["session"]["activeTurnId"].is_null()
            && item["session"]["queuedTurns"] == 0
            && item["session"]["updatedAt"] != created["session"]["updatedAt"];
        items.push(item);
        if idle {
            break;
        }
    }
    assert!(
        items
            .iter()
            .any(|i| i["session"]["activeTurnId"] == turn.as_str()),
        "the running state was published: {items:?}"
    );
    for pair in items.windows(2) {
        assert_ne!(
            pair[0], pair[1],
            "an unchanged state is not published twice"
        );
    }
    let events = d.events(&id, 0).await;
    assert!(
        events.iter().any(is_terminal_of(&turn)),
        "the turn had ended"
    );

    let (status, _) = d
        .request(reqwest::Method::DELETE, &format!("/v3/sessions/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let deleted = next_item(&mut feed).await;
    assert_eq!(
        deleted,
        json!({"event": "session.deleted", "sessionId": id})
    );
}

#[tokio::test]
async fn session_detail_carries_the_seq_its_messages_reflect() {
    let (lmx, d) = daemon().await;
    let id = d.create_session(None).await;
    lmx.push(Reply::chunks(["hi"]));
    let (_, events) = d.turn(&id, "hello").await;
    let (_, detail) = d.get(&format!("/v3/sessions/{id}")).await;
    let last = d.events(&id, 0).await.last().unwrap()["seq"].clone();
    assert_eq!(detail["lastSeq"], last);
    assert!(!events.is_empty());
}

#[tokio::test]
async fn without_a_given_token_the_daemon_keeps_one_across_restarts() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let first = TestDaemon::start_with(&lmx.url(), |c| c.token = None).await;
    let state = opta_daemon::daemon::read_state(&first.home()).unwrap();
    let kept = std::fs::read_to_string(first.home().join("daemon/token")).unwrap();
    assert_eq!(state.token, kept);
    let second = first.restart().await;
    let again = opta_daemon::daemon::read_state(&second.home()).unwrap();
    assert_eq!(
        again.token, kept,
        "a web page signed in before the restart stays signed in"
    );
}
