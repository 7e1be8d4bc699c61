//! The client library against a real daemon (and the scripted inference server).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use opta_client::{ClientError, DaemonClient, StartAt, Transport};
use opta_protocol::{
    CancelRequest, CreateSessionRequest, Decision, Envelope, Event, Mode, ResolvePermissionRequest,
    SessionId, SubmitTurnRequest, TurnErrorCode,
};
use opta_test_support::{Reply, ScriptedLmx, TestDaemon};
use pretty_assertions::assert_eq;

fn client(d: &TestDaemon) -> DaemonClient {
    DaemonClient::discover(&d.home()).expect("state file")
}

fn submit(content: &str) -> SubmitTurnRequest {
    SubmitTurnRequest::new("lib", "lib", content, Mode::Chat)
}

fn is_end_of(turn: &str) -> impl Fn(&Envelope) -> bool + '_ {
    move |e| e.event.is_terminal() && e.event.turn_id().map(|t| t.as_str()) == Some(turn)
}

async fn collect_until(
    events: &mut opta_client::EventStream,
    stop: impl Fn(&Envelope) -> bool,
) -> Vec<Envelope> {
    let mut out = Vec::new();
    loop {
        let e = tokio::time::timeout(std::time::Duration::from_secs(30), events.recv())
            .await
            .expect("event in time")
            .expect("stream open")
            .expect("no stream error");
        let done = stop(&e);
        out.push(e);
        if done {
            return out;
        }
    }
}

fn tokens(events: &[Envelope]) -> String {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Event::TurnToken(t) => Some(t.text.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn every_route() {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let c = client(&d);
    assert!(c.health().await.unwrap().daemon);
    let health = c.check_contract().await.unwrap();
    assert_eq!(health.daemon_id, d.daemon().state().daemon_id);
    assert_eq!(c.metrics().await.unwrap().daemon_id, health.daemon_id);

    let created = c
        .create_session(&CreateSessionRequest {
            session_id: Some(SessionId::parse("lib-1").unwrap()),
            title: Some("Library".into()),
            ..CreateSessionRequest::default()
        })
        .await
        .unwrap();
    let id = created.session_id.clone();
    assert_eq!(created.title.as_deref(), Some("Library"));
    let mut events = c
        .subscribe(&id, StartAt::After(0), Transport::WebSocket)
        .await
        .unwrap();
    let queued = c.submit_turn(&id, &submit("hello library")).await.unwrap();
    assert!(queued.queued);
    let seen = collect_until(&mut events, is_end_of(queued.turn_id.as_str())).await;
    assert_eq!(tokens(&seen), "echo: hello library");
    let stored = c.events(&id, 0).await.unwrap();
    assert_eq!(stored.events[..seen.len()], seen[..]);
    assert_eq!(stored.last_seq, stored.events.last().map(|e| e.seq));
    let beyond = c.events(&id, 1000).await.unwrap();
    assert_eq!((beyond.events.len(), beyond.last_seq), (0, stored.last_seq));
    let detail = c.get_session(&id).await.unwrap();
    assert_eq!(detail.messages.len(), 2);
    let page = c.list_sessions(Some(10), None).await.unwrap();
    assert_eq!(page.sessions[0].session_id, id);

    let cancelled = c.cancel(&id, &CancelRequest::default()).await.unwrap();
    assert_eq!(cancelled.cancelled, 0);
    let err = c
        .resolve_permission(
            &id,
            &ResolvePermissionRequest {
                request_id: "perm_none".into(),
                decision: Decision::Deny,
                decided_by: "lib".into(),
                remember: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        (err.status(), err.code().as_deref()),
        (Some(404), Some("permission-not-found"))
    );

    let status = c.lmx_status().await.unwrap();
    assert_eq!(
        (
            status.version.as_deref(),
            status.models[0].model_id.as_str()
        ),
        (Some("0.9.1"), "default")
    );
    assert_eq!(c.lmx_models().await.unwrap().models[0].model_id, "default");
    assert!(c.lmx_memory().await.unwrap()["total_unified_memory_gb"].is_number());
    assert!(c.lmx_available().await.unwrap().is_array());
    assert_eq!(c.lmx_discovery().await.unwrap()["service"], "opta-lmx");
    let loaded = c
        .lmx_load(&opta_protocol::LmxLoadRequest {
            model_id: "other-model".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(loaded.status, "loaded");
    let unloaded = c.lmx_unload("other-model").await.unwrap();
    assert_eq!(unloaded.status, "unloaded");
    let deleted = c.lmx_delete_model("other-model").await.unwrap();
    assert_eq!(
        (deleted.status.as_str(), deleted.freed_bytes),
        ("deleted", Some(4_000_000_000))
    );
    let download = c
        .lmx_download(&opta_protocol::LmxDownloadRequest {
            repo_id: "org/new-model".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let progress = c
        .lmx_download_progress(&download.download_id)
        .await
        .unwrap();
    assert_eq!(progress.progress_percent, Some(50.0));
    assert_eq!(c.lmx_downloads(true).await.unwrap().downloads.len(), 1);

    c.delete_session(&id).await.unwrap();
    let err = c.get_session(&id).await.unwrap_err();
    assert_eq!(err.code().as_deref(), Some("session-not-found"));
    // The event stream ends when the session is deleted (after what was already sent).
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(e) = events.recv().await {
            e.unwrap();
        }
    })
    .await
    .expect("the stream ends");

    // A wrong token is an API error, not a panic or a hang.
    let bad = DaemonClient::new(c.base_url(), "wrong");
    assert_eq!(bad.v3_health().await.unwrap_err().status(), Some(401));
    let err = bad
        .subscribe(&id, StartAt::After(0), Transport::Sse)
        .await
        .err()
        .unwrap();
    assert_eq!(err.status(), Some(401));
}

#[tokio::test]
async fn discovery_and_contract_check() {
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        DaemonClient::discover(empty.path()),
        Err(ClientError::NotRunning { .. })
    ));
    // A server speaking another contract is refused with a clear message.
    let app = axum::Router::new().route(
        "/v3/health",
        axum::routing::get(|| async {
            axum::Json(serde_json::json!({"status": "ok", "version": "9", "daemonId": "daemon_x",
                "contract": {"name": "opta-daemon-v3", "version": 2},
                "runtime": {"sessionCount": 0, "activeTurnCount": 0, "queuedTurnCount": 0, "subscriberCount": 0}}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let err = DaemonClient::new(format!("http://{addr}"), "t")
        .check_contract()
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ClientError::ContractMismatch { .. }));
    assert!(
        message.contains("opta-daemon-v3 v2") && message.contains("opta-daemon-v3 v1"),
        "{message}"
    );
}

/// The daemon drops a subscriber that falls behind (4008 / SSE end); the stream reconnects from
/// its last seq and the caller sees every event once, in order.
async fn survives_forced_disconnects(transport: Transport) {
    let lmx = ScriptedLmx::start().await.unwrap();
    let reply = Reply::chunks((0..3000).map(|i| format!("t{i} ")));
    let expected = reply.text();
    lmx.push(reply);
    // One event per delta (deltas that arrive together are otherwise joined), far more than
    // the subscriber's 8-frame buffer.
    let d = TestDaemon::start_with(&lmx.url(), |c| {
        c.limits.subscriber_buffer = 8;
        c.faults.deltas_kept_apart = true;
    })
    .await;
    let c = client(&d);
    let id = SessionId::parse(&d.create_session(None).await).unwrap();
    let mut events = c
        .subscribe(&id, StartAt::After(0), transport)
        .await
        .unwrap();
    let turn = c.submit_turn(&id, &submit("flood")).await.unwrap().turn_id;
    // Do not read until the daemon has streamed everything, so this subscriber falls behind.
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while lmx.streams_finished() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let all = collect_until(&mut events, is_end_of(turn.as_str())).await;
    assert!(
        events.reconnects() >= 1,
        "the daemon never dropped the subscriber"
    );
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    let expected_seqs: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected_seqs);
    assert_eq!(tokens(&all), expected);
}

#[tokio::test]
async fn ws_stream_survives_forced_disconnects() {
    survives_forced_disconnects(Transport::WebSocket).await;
}

#[tokio::test]
async fn sse_stream_survives_forced_disconnects() {
    survives_forced_disconnects(Transport::Sse).await;
}

/// A live subscription sees only what happens after it began, also when it reconnects before
/// its first event (the daemon restarted on the same port meanwhile).
async fn live_subscription_starts_at_the_current_seq(transport: Transport) {
    let lmx = ScriptedLmx::start().await.unwrap();
    let d = TestDaemon::start(&lmx.url()).await;
    let c = client(&d);
    let id = SessionId::parse(&d.create_session(None).await).unwrap();
    let first = c.legacy_chat("one", Some(&id)).await.unwrap();
    assert_eq!(first.response, "echo: one");
    let mut live = c.subscribe(&id, StartAt::Live, transport).await.unwrap();
    let d = d.restart_on_same_port().await;
    let turn = c.submit_turn(&id, &submit("two")).await.unwrap().turn_id;
    let seen = collect_until(&mut live, is_end_of(turn.as_str())).await;
    assert!(
        matches!(&seen[0].event, Event::TurnQueued(q) if q.turn_id == turn),
        "{:?}",
        seen[0]
    );
    assert!(live.reconnects() >= 1, "the restart ended the stream");
    d.stop().await;
}

#[tokio::test]
async fn ws_live_subscription_starts_at_the_current_seq() {
    live_subscription_starts_at_the_current_seq(Transport::WebSocket).await;
}

#[tokio::test]
async fn sse_live_subscription_starts_at_the_current_seq() {
    live_subscription_starts_at_the_current_seq(Transport::Sse).await;
}

#[tokio::test]
async fn legacy_chat_returns_the_reply_and_surfaces_turn_errors() {
    let lmx = ScriptedLmx::start().await.unwrap();
    // TTL zero: the model list is read before every turn, so unloading shows at once.
    let d =
        TestDaemon::start_with(&lmx.url(), |c| c.preflight_ttl = std::time::Duration::ZERO).await;
    let c = client(&d);
    let answer = c.legacy_chat("what is up", None).await.unwrap();
    assert_eq!(answer.response, "echo: what is up");
    assert_eq!(answer.model, "default");
    assert_eq!(answer.stats.completion_tokens, 4);
    // Same session again: history grows.
    let again = c
        .legacy_chat("and now", Some(&answer.session_id))
        .await
        .unwrap();
    assert_eq!(again.session_id, answer.session_id);
    assert_eq!(
        c.get_session(&answer.session_id)
            .await
            .unwrap()
            .messages
            .len(),
        4
    );
    assert_eq!(
        lmx.last_conversation().as_array().unwrap().len(),
        3,
        "the history and the new message, after the system prompt"
    );

    lmx.push(Reply::status(500, "GPU on fire"));
    let err = c.legacy_chat("break", None).await.unwrap_err();
    match &err {
        ClientError::Turn { code, message, .. } => {
            assert_eq!(*code, None);
            assert!(message.contains("GPU on fire"), "{message}");
        }
        other => panic!("expected a turn error, got {other:?}"),
    }
    lmx.set_loaded(&[]);
    let err = c.legacy_chat("no model", None).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Turn {
                code: Some(TurnErrorCode::NoModelLoaded),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.code().as_deref(), Some("no-model-loaded"));
}

#[tokio::test]
async fn a_stream_follows_a_daemon_to_its_new_port_and_gives_up_on_one_that_stays_away() {
    let lmx = ScriptedLmx::start().await.unwrap();
    lmx.push(Reply::slow(500, std::time::Duration::from_millis(20)));
    let d = TestDaemon::start(&lmx.url()).await;
    let home = d.home();
    let c = DaemonClient::discover(&home).unwrap();
    let id = SessionId::parse(&d.create_session(None).await).unwrap();
    let mut events = c
        .subscribe(&id, StartAt::After(0), Transport::WebSocket)
        .await
        .unwrap();
    let turn = c.submit_turn(&id, &submit("long")).await.unwrap().turn_id;
    lmx.wait_chat_requests(1).await;
    // The daemon restarts on another port mid-turn: the stream finds it through the state
    // file and delivers the turn's end (interrupted) without a gap.
    let old_base = d.base.clone();
    let d = d.restart().await;
    assert_ne!(d.base, old_base);
    let all = collect_until(&mut events, is_end_of(turn.as_str())).await;
    let end = all.last().unwrap();
    assert_eq!(end.event.name(), "turn.error");
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());

    // A daemon that goes away for good: the stream ends with a typed error in bounded time.
    let c = DaemonClient::discover(&home)
        .unwrap()
        .with_reconnect_deadline(Some(std::time::Duration::from_millis(800)));
    let mut events = c
        .subscribe(&id, StartAt::Live, Transport::Sse)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    d.stop().await;
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match events.recv().await {
                Some(Ok(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream gives up in time");
    assert!(
        matches!(ended, Some(Err(ClientError::DaemonGone { .. }))),
        "{ended:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test]
async fn a_daemon_that_accepts_and_never_answers_does_not_hold_a_subscribe() {
    // Accepts connections, reads nothing, answers nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let c = DaemonClient::new(format!("http://{addr}"), "t");
    let id = SessionId::parse("s1").unwrap();
    // All three ways in, at once: each gives up by itself within its open timeout.
    let attempts = [
        (Transport::WebSocket, StartAt::After(0)),
        (Transport::WebSocket, StartAt::Live),
        (Transport::Sse, StartAt::After(0)),
    ]
    .map(|(transport, start)| {
        let (c, id) = (c.clone(), id.clone());
        async move {
            let started = std::time::Instant::now();
            let outcome = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                c.subscribe(&id, start, transport),
            )
            .await
            .expect("subscribe gives up by itself");
            (transport, outcome.err(), started.elapsed())
        }
    });
    for (transport, error, took) in futures_util::future::join_all(attempts).await {
        assert!(
            matches!(error, Some(ClientError::Transport(_))),
            "{transport:?}: {error:?}"
        );
        assert!(
            took < std::time::Duration::from_secs(15),
            "{transport:?}: {took:?}"
        );
    }
}
