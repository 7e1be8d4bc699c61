//! The wire types' JSON Schema is checked in (`docs/protocol.schema.json`), so a change to the
//! wire shows up in review and the reference cannot drift from the types. After an intended
//! change: `UPDATE_SCHEMA=1 cargo test -p opta-protocol --test schema`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use opta_protocol::*;
use schemars::schema_for;
use serde_json::{Map, Value};

fn current() -> String {
    let mut all = Map::new();
    let mut add = |name: &str, schema: schemars::Schema| {
        all.insert(name.to_owned(), schema.to_value());
    };
    add("Envelope", schema_for!(Envelope));
    add("ClientFrame", schema_for!(ClientFrame));
    add("AckFrame", schema_for!(AckFrame));
    add("ErrorBody", schema_for!(ErrorBody));
    add("DaemonState", schema_for!(DaemonState));
    add("HealthResponse", schema_for!(HealthResponse));
    add("V3HealthResponse", schema_for!(V3HealthResponse));
    add("MetricsResponse", schema_for!(MetricsResponse));
    add("CreateSessionRequest", schema_for!(CreateSessionRequest));
    add("SessionSnapshot", schema_for!(SessionSnapshot));
    add("SessionListResponse", schema_for!(SessionListResponse));
    add("SessionDetail", schema_for!(SessionDetail));
    add("SubmitTurnRequest", schema_for!(SubmitTurnRequest));
    add("SubmitTurnResponse", schema_for!(SubmitTurnResponse));
    add("EventsResponse", schema_for!(EventsResponse));
    add("CancelRequest", schema_for!(CancelRequest));
    add("CancelResponse", schema_for!(CancelResponse));
    add(
        "ResolvePermissionRequest",
        schema_for!(ResolvePermissionRequest),
    );
    add(
        "ResolvePermissionResponse",
        schema_for!(ResolvePermissionResponse),
    );
    add("LmxStatusResponse", schema_for!(LmxStatusResponse));
    add("LmxModelsResponse", schema_for!(LmxModelsResponse));
    add("LmxLoadRequest", schema_for!(LmxLoadRequest));
    add("LmxLoadResponse", schema_for!(LmxLoadResponse));
    add("LmxUnloadResponse", schema_for!(LmxUnloadResponse));
    add("LmxDownload", schema_for!(LmxDownload));
    add("SessionFeedEvent", schema_for!(SessionFeedEvent));
    add("WebCodeResponse", schema_for!(WebCodeResponse));
    add("WebExchangeRequest", schema_for!(WebExchangeRequest));
    add("WebExchangeResponse", schema_for!(WebExchangeResponse));
    let mut text = serde_json::to_string_pretty(&Value::Object(all)).unwrap();
    text.push('\n');
    text
}

/// Compares `docs/<file>` with `now` (rewriting it first under `UPDATE_SCHEMA=1`).
fn assert_checked_in(file: &str, now: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs")
        .join(file);
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, now).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == now,
        "docs/{file} is out of date with the wire types: review the change, then \
         run `UPDATE_SCHEMA=1 cargo test -p opta-protocol --test schema` and update docs/protocol.md"
    );
}

#[test]
fn checked_in_schema_matches_the_types() {
    assert_checked_in("protocol.schema.json", &current());
}

#[test]
fn checked_in_openapi_document_matches_the_types() {
    let mut text = serde_json::to_string_pretty(&opta_protocol::openapi()).unwrap();
    text.push('\n');
    assert_checked_in("openapi.json", &text);
}

#[test]
fn every_event_and_error_code_is_in_the_protocol_reference() {
    let schema = current();
    for name in opta_protocol::Event::NAMES {
        assert!(
            schema.contains(&format!("\"{name}\"")),
            "event {name} missing from the schema"
        );
    }
    let reference = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/protocol.md"),
    )
    .unwrap();
    for code in TurnErrorCode::ALL {
        assert!(
            reference.contains(code.as_str()),
            "docs/protocol.md does not mention {}",
            code.as_str()
        );
    }
}
