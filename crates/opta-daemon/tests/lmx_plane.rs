//! The `/v3/lmx/*` plane against an LMX-style admin server: what the server received (its
//! snake_case API) and what the client got (the v3 shapes the original client library reads),
//! whole values on both sides; and the same routes on a server without the admin API.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::Duration;

use opta_test_support::{ScriptedLmx, TestDaemon, is_terminal_of, token_text};
use pretty_assertions::assert_eq;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// The admin requests the server got since the last call, without the daemon's own model
/// list probes (`GET /admin/models` is not logged).
fn received(lmx: &ScriptedLmx, seen: &mut usize) -> Vec<Value> {
    let all = lmx.admin_requests();
    let new = all[*seen..]
        .iter()
        .map(|(method, path, body)| json!([method, path, body]))
        .collect();
    *seen = all.len();
    new
}

const DEFAULT_MODEL: &str = "default";

fn loaded_model(id: &str) -> Value {
    json!({"model_id": id, "status": "loaded", "memory_bytes": 1_610_612_736u64,
        "context_length": 8192, "loaded_at": "2023-11-14T22:13:20.000Z", "request_count": 3,
        "last_used_at": 1_700_000_060.0})
}

#[tokio::test]
async fn status_and_models_answer_the_shapes_the_client_reads() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let (status, body) = d.get("/v3/lmx/status").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"status": "ok", "version": "0.9.1", "uptime_seconds": 42.5,
            "models": [loaded_model(DEFAULT_MODEL)], "url": lmx.url(), "adminApi": true})
    );
    let resp = d
        .http
        .get(format!("{}/v3/lmx/models", d.base))
        .bearer_auth(&d.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"models": [loaded_model(DEFAULT_MODEL)], "source": "admin"})
    );
    let resp = d
        .http
        .get(format!("{}/v3/lmx/models", d.base))
        .bearer_auth(&d.token)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(lmx.model_list_requests(), 1, "served from the cache");
    let (_, body) = d.get("/v3/lmx/discovery").await;
    assert_eq!(
        body,
        json!({"service": "opta-lmx", "version": "0.9.1",
            "endpoints": {"openai": "/v1", "admin": "/admin"}})
    );
    let (_, body) = d.get("/v3/lmx/memory").await;
    assert_eq!(body["total_unified_memory_gb"], 24.0);
    let (_, body) = d.get("/v3/lmx/models/available").await;
    assert_eq!(body.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn load_unload_and_delete_are_translated_both_ways() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let mut seen = 0;
    d.get("/v3/lmx/status").await;
    received(&lmx, &mut seen);

    let (status, body) = d
        .post(
            "/v3/lmx/models/load",
            json!({"modelId": "other-model", "keepAliveSec": 600, "backend": "mlx",
                "performanceOverrides": {"kv_bits": 8}, "allowUnsupportedRuntime": false,
                "autoDownload": null}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        received(&lmx, &mut seen),
        vec![
            json!(["POST", "/admin/models/load", {"model_id": "other-model",
            "keep_alive_sec": 600, "backend": "mlx", "performance_overrides": {"kv_bits": 8},
            "allow_unsupported_runtime": false}])
        ]
    );
    assert_eq!(
        body,
        json!({"model_id": "other-model", "status": "loaded", "memory_bytes": 1_610_612_736u64,
            "load_time_seconds": 0.25})
    );
    // The load dropped the model cache: the list shows it at once.
    let (_, models) = d.get("/v3/lmx/models").await;
    assert_eq!(models["models"][1]["model_id"], "other-model");

    let (status, body) = d
        .post("/v3/lmx/models/unload", json!({"modelId": "other-model"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        received(&lmx, &mut seen),
        vec![json!(["POST", "/admin/models/unload", {"model_id": "other-model"}])]
    );
    assert_eq!(
        body,
        json!({"model_id": "other-model", "status": "unloaded", "freed_bytes": 1_610_612_736u64})
    );

    // Model ids with a slash are paths on LMX too; the client may encode the slash or not.
    lmx.set_downloadable(&[]);
    for (path, id) in [
        ("/v3/lmx/models/other-model", "other-model"),
        ("/v3/lmx/models/default", "default"),
    ] {
        let (status, body) = d.request(Method::DELETE, path, None).await;
        if id == "default" {
            // Loaded: LMX refuses, and says why.
            assert_eq!(status, StatusCode::CONFLICT, "{body}");
            assert_eq!(body["code"], "lmx-rejected");
        } else {
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(
                body,
                json!({"model_id": id, "status": "deleted", "freed_bytes": 4_000_000_000u64})
            );
        }
    }
    assert_eq!(
        received(&lmx, &mut seen),
        vec![
            json!(["DELETE", "/admin/models/other-model", null]),
            json!(["DELETE", "/admin/models/default", null])
        ]
    );
    let (status, _) = d
        .request(
            Method::DELETE,
            "/v3/lmx/models/mlx-community%2FQwen%202.5",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        received(&lmx, &mut seen),
        vec![json!([
            "DELETE",
            "/admin/models/mlx-community/Qwen%202.5",
            null
        ])]
    );

    // Bad input is refused before the server sees it.
    let before = lmx.admin_requests().len();
    for bad in [json!({}), json!({"modelId": " "}), json!({"modelId": 7})] {
        let (status, body) = d.post("/v3/lmx/models/load", bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    assert_eq!(lmx.admin_requests().len(), before);
    let (status, body) = d
        .post("/v3/lmx/models/load", json!({"modelId": "ghost"}))
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (StatusCode::NOT_FOUND, json!("lmx-rejected"))
    );
    assert!(body["error"].as_str().unwrap().contains("ghost"));
}

#[tokio::test]
async fn a_load_that_needs_a_download_is_confirmed_and_followed() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.set_downloadable(&["org/big-model"]);
    let d = TestDaemon::start(&lmx.url()).await;
    let mut seen = 0;
    let (_, asked) = d
        .post("/v3/lmx/models/load", json!({"modelId": "org/big-model"}))
        .await;
    assert_eq!(
        asked,
        json!({"model_id": "org/big-model", "status": "download_required",
            "confirmation_token": "confirm-org/big-model",
            "message": "org/big-model is not on disk (2.0 GB to download)",
            "estimated_size_gb": 2.0})
    );
    let (_, started) = d
        .post(
            "/v3/lmx/models/load/confirm",
            json!({"confirmationToken": asked["confirmation_token"]}),
        )
        .await;
    assert_eq!(
        started,
        json!({"model_id": "org/big-model", "status": "downloading", "download_id": "dl-1"})
    );
    let (_, list) = d.get("/v3/lmx/models/downloads").await;
    assert_eq!(list["downloads"][0]["status"], "downloading");
    let (_, half) = d.get("/v3/lmx/models/download/dl-1/progress").await;
    assert_eq!(
        half,
        json!({"download_id": "dl-1", "repo_id": "org/big-model", "status": "downloading",
            "progress_percent": 50.0, "downloaded_bytes": 1_000_000_000u64,
            "total_bytes": 2_000_000_000u64})
    );
    let (_, done) = d.get("/v3/lmx/models/download/dl-1/progress").await;
    assert_eq!(done["status"], "completed");
    let (_, list) = d.get("/v3/lmx/models/downloads").await;
    assert_eq!(
        list,
        json!({"downloads": []}),
        "finished downloads are inactive"
    );
    let (_, list) = d.get("/v3/lmx/models/downloads?includeInactive=true").await;
    assert_eq!(list["downloads"][0]["status"], "completed");
    let requests: Vec<Value> = received(&lmx, &mut seen);
    assert_eq!(
        requests,
        vec![
            json!(["POST", "/admin/models/load", {"model_id": "org/big-model"}]),
            json!(["POST", "/admin/models/load/confirm",
                {"confirmation_token": "confirm-org/big-model"}]),
            json!([
                "GET",
                "/admin/models/downloads?include_inactive=false",
                null
            ]),
            json!(["GET", "/admin/models/download/dl-1/progress", null]),
            json!(["GET", "/admin/models/download/dl-1/progress", null]),
            json!([
                "GET",
                "/admin/models/downloads?include_inactive=false",
                null
            ]),
            json!(["GET", "/admin/models/downloads?include_inactive=true", null]),
        ]
    );
    // The downloaded model is loaded and serves turns.
    let (_, session) = d
        .post("/v3/sessions", json!({"model": "org/big-model"}))
        .await;
    let s = session["sessionId"].as_str().unwrap();
    let t = d.submit(s, "hello big").await;
    let events = d.ws(s, 0).await.envelopes_until(is_terminal_of(&t)).await;
    assert_eq!(token_text(&events, &t), "echo: hello big");

    // A plain download, started by repo.
    let (_, started) = d
        .post(
            "/v3/lmx/models/download",
            json!({"repoId": "org/other", "allowPatterns": ["*.gguf"], "revision": null}),
        )
        .await;
    assert_eq!(
        started,
        json!({"download_id": "dl-2", "repo_id": "org/other", "status": "downloading"})
    );
    assert_eq!(
        received(&lmx, &mut seen).last().unwrap(),
        &json!(["POST", "/admin/models/download",
            {"repo_id": "org/other", "allow_patterns": ["*.gguf"]}])
    );
    let (status, body) = d.get("/v3/lmx/models/download/nope/progress").await;
    assert_eq!(
        (status, body["code"].clone()),
        (StatusCode::NOT_FOUND, json!("lmx-rejected"))
    );
}

#[tokio::test]
async fn without_the_admin_api_the_lmx_plane_answers_what_it_can() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.set_admin_api(false);
    let d = TestDaemon::start_with(&lmx.url(), |c| c.preflight_ttl = Duration::ZERO).await;
    let (_, body) = d.get("/v3/lmx/models").await;
    assert_eq!(
        body,
        json!({"models": [{"model_id": "default", "status": "loaded", "object": "model"}],
            "source": "v1"})
    );
    let (_, body) = d.get("/v3/lmx/status").await;
    assert_eq!(
        body,
        json!({"status": "ok",
            "models": [{"model_id": "default", "status": "loaded", "object": "model"}],
            "url": lmx.url(), "adminApi": false})
    );
    let gets = [
        "/v3/lmx/memory",
        "/v3/lmx/models/available",
        "/v3/lmx/discovery",
        "/v3/lmx/models/downloads",
        "/v3/lmx/models/download/dl-1/progress",
    ];
    for path in gets {
        let (status, body) = d.get(path).await;
        assert_eq!(
            (status, body["code"].clone()),
            (StatusCode::NOT_IMPLEMENTED, json!("unsupported")),
            "{path}"
        );
        assert!(body["error"].as_str().unwrap().contains("LMX admin API"));
    }
    let posts = [
        ("/v3/lmx/models/load", json!({"modelId": "x"})),
        (
            "/v3/lmx/models/load/confirm",
            json!({"confirmationToken": "t"}),
        ),
        ("/v3/lmx/models/unload", json!({"modelId": "x"})),
        ("/v3/lmx/models/download", json!({"repoId": "r"})),
    ];
    for (path, body) in posts {
        let (status, answer) = d.post(path, body).await;
        assert_eq!(
            (status, answer["code"].clone()),
            (StatusCode::NOT_IMPLEMENTED, json!("unsupported")),
            "{path}"
        );
    }
    let (status, _) = d.request(Method::DELETE, "/v3/lmx/models/x", None).await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
    assert!(lmx.admin_requests().is_empty());
}

#[tokio::test]
async fn a_websocket_closed_by_the_client_gets_its_close_frame_echoed() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    for code in [1000, 1001] {
        let mut ws = d.ws(&s, 0).await;
        // After the replay (the session's snapshot).
        ws.envelopes_until(|e| e["event"] == "session.snapshot")
            .await;
        assert_eq!(ws.close_handshake(code).await, Some(code));
    }
    // Closed before the replay was read, too.
    let ws = d.ws(&s, 0).await;
    assert_eq!(ws.close_handshake(1000).await, Some(1000));
}

#[tokio::test]
async fn a_turn_without_a_mode_is_a_chat_turn() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let s = d.create_session(None).await;
    for body in [
        json!({"clientId": "c", "writerId": "w", "content": "no mode"}),
        json!({"clientId": "c", "writerId": "w", "content": "null mode", "mode": null}),
    ] {
        let (status, answer) = d.post(&format!("/v3/sessions/{s}/turns"), body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    }
    // Over the WebSocket too.
    let mut ws = d.ws(&s, 0).await;
    ws.send(
        json!({"type": "turn.submit", "clientId": "c", "writerId": "w",
        "sessionId": s, "content": "ws without mode"}),
    )
    .await;
    let done = std::cell::Cell::new(0);
    let events = ws
        .envelopes_until(|e| {
            if e["event"] == "turn.done" {
                done.set(done.get() + 1);
            }
            done.get() == 3
        })
        .await;
    let modes: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "turn.start")
        .map(|e| &e["payload"]["mode"])
        .collect();
    assert_eq!(modes, vec!["chat", "chat", "chat"]);
}
