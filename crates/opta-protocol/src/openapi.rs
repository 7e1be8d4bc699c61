//! The HTTP control plane as an OpenAPI 3.1 document, built from the wire types, for clients
//! in other languages (code generators, API explorers). It is checked in as
//! `docs/openapi.json`; tests keep that file, these types and the daemon's router in step.

use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema};
use serde_json::{Map, Value, json};

use crate::api::*;
use crate::events::Envelope;
use crate::lmx::*;
use crate::model::SessionSnapshot;
use crate::ws::{AckFrame, ClientFrame};

/// Builds the document: every route of the v3 contract with its parameters, bodies and
/// answers; schemas under `components/schemas`.
pub fn openapi() -> Value {
    let mut doc = Doc::new();
    doc.health_and_metrics();
    doc.sessions();
    doc.event_planes();
    doc.background();
    doc.lmx();
    doc.web();
    doc.finish()
}

/// A route's answer on success.
enum Answer {
    /// A JSON body of this schema.
    Json(u16, Schema),
    /// No body.
    Empty(u16),
    /// Something other than a JSON body: the whole response object.
    Other(u16, Value),
}

struct Doc {
    generator: SchemaGenerator,
    paths: Map<String, Value>,
}

impl Doc {
    fn new() -> Self {
        let settings = SchemaSettings::draft2020_12().with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        });
        Self {
            generator: settings.into_generator(),
            paths: Map::new(),
        }
    }

    fn schema<T: JsonSchema>(&mut self) -> Schema {
        self.generator.subschema_for::<T>()
    }

    /// Adds one operation. Path parameters are taken from `{name}` segments of `path`.
    fn route(
        &mut self,
        method: &str,
        path: &str,
        summary: &str,
        request: Option<Schema>,
        query: &[(&str, &str, Value)],
        answer: Answer,
    ) {
        let mut parameters: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| {
                let schema = if name == "sessionId" {
                    json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"})
                } else {
                    json!({"type": "string"})
                };
                json!({"name": name, "in": "path", "required": true, "schema": schema})
            })
            .collect();
        parameters.extend(query.iter().map(|(name, description, schema)| {
            json!({"name": name, "in": "query", "required": false,
                "description": description, "schema": schema})
        }));
        let error = json!({"description": "PROTOCOL.md error body",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}});
        let mut responses = Map::new();
        let (status, ok) = match answer {
            Answer::Json(status, schema) => (
                status,
                json!({"description": "success",
                    "content": {"application/json": {"schema": schema}}}),
            ),
            Answer::Empty(status) => (status, json!({"description": "success, no body"})),
            Answer::Other(status, response) => (status, response),
        };
        responses.insert(status.to_string(), ok);
        responses.insert("default".into(), error);
        let mut operation = json!({
            "summary": summary,
            "operationId": operation_id(method, path),
            "parameters": parameters,
            "responses": responses,
        });
        if let Some(schema) = request {
            operation["requestBody"] = json!({"required": true,
                "content": {"application/json": {"schema": schema}}});
        }
        if matches!(
            path,
            "/health" | "/" | "/assets/{file}" | "/v3/web/exchange"
        ) {
            operation["security"] = json!([]);
        }
        let entry = self
            .paths
            .entry(path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[method] = operation;
    }

    fn web(&mut self) {
        let page = |kind: &str| {
            json!({"description": format!("the web page's {kind}, embedded in the daemon; served with a strict Content-Security-Policy"),
                "content": {"text/html": {"schema": {"type": "string"}}}})
        };
        self.route(
            "get",
            "/",
            "The web client (no token: it carries no data)",
            None,
            &[],
            Answer::Other(200, page("HTML")),
        );
        self.route(
            "get",
            "/assets/{file}",
            "The web client's scripts, styles and licences (no token)",
            None,
            &[],
            Answer::Other(200, page("asset")),
        );
        let code = self.schema::<WebCodeResponse>();
        self.route(
            "post",
            "/v3/web/code",
            "A one-time sign-in code for the web page (works once, for a minute)",
            None,
            &[],
            Answer::Json(201, code),
        );
        let exchange = self.schema::<WebExchangeRequest>();
        let token = self.schema::<WebExchangeResponse>();
        self.route("post", "/v3/web/exchange",
            "Trades a one-time code for the token (no token; 401 for an unknown, used or expired code)",
            Some(exchange), &[], Answer::Json(200, token));
        let feed = self.schema::<SessionFeedEvent>();
        self.route("get", "/v3/sse/sessions",
            "Server-sent session changes: `: connected`, then `data: <SessionFeedEvent>` for every session created, changed or deleted; `: ping` every 15 s",
            None, &[("token", "the token (EventSource cannot set headers)", json!({"type": "string"}))],
            Answer::Other(200, json!({"description": "an event stream of session changes",
                "content": {"text/event-stream": {"schema": {"type": "string",
                    "description": "each event's `data:` is a SessionFeedEvent (x-event-schema)"}}},
                "x-event-schema": feed})));
    }

    fn health_and_metrics(&mut self) {
        let health = self.schema::<HealthResponse>();
        self.route(
            "get",
            "/health",
            "Liveness (no token)",
            None,
            &[],
            Answer::Json(200, health),
        );
        let v3 = self.schema::<V3HealthResponse>();
        self.route(
            "get",
            "/v3/health",
            "Health, contract and runtime figures",
            None,
            &[],
            Answer::Json(200, v3),
        );
        let metrics = self.schema::<MetricsResponse>();
        self.route(
            "get",
            "/v3/metrics",
            "Runtime figures",
            None,
            &[],
            Answer::Json(200, metrics),
        );
        self.route(
            "get",
            "/metrics",
            "Prometheus metrics (OpenMetrics text; not part of the v3 contract)",
            None,
            &[],
            Answer::Other(
                200,
                json!({"description": "OpenMetrics text",
                    "content": {"application/openmetrics-text": {"schema": {"type": "string"}}}}),
            ),
        );
    }

    fn sessions(&mut self) {
        let create = self.schema::<CreateSessionRequest>();
        let snapshot = self.schema::<SessionSnapshot>();
        self.route(
            "post",
            "/v3/sessions",
            "Create a session, or re-open an existing id",
            Some(create),
            &[],
            Answer::Json(201, snapshot),
        );
        let list = self.schema::<SessionListResponse>();
        self.route(
            "get",
            "/v3/sessions",
            "Sessions, most recently updated first",
            None,
            &[
                (
                    "limit",
                    "page size",
                    json!({"type": "integer", "minimum": 1, "maximum": 500, "default": 50}),
                ),
                (
                    "cursor",
                    "nextCursor of the previous page",
                    json!({"type": "string"}),
                ),
            ],
            Answer::Json(200, list),
        );
        let detail = self.schema::<SessionDetail>();
        self.route(
            "get",
            "/v3/sessions/{sessionId}",
            "A session and its history",
            None,
            &[],
            Answer::Json(200, detail),
        );
        self.route(
            "delete",
            "/v3/sessions/{sessionId}",
            "Delete a session (its turns are cancelled first)",
            None,
            &[],
            Answer::Empty(204),
        );
        let submit = self.schema::<SubmitTurnRequest>();
        let submitted = self.schema::<SubmitTurnResponse>();
        self.route(
            "post",
            "/v3/sessions/{sessionId}/turns",
            "Queue a turn (409 state-conflict when lastSeenSeq is stale)",
            Some(submit),
            &[],
            Answer::Json(202, submitted),
        );
        let events = self.schema::<EventsResponse>();
        self.route(
            "get",
            "/v3/sessions/{sessionId}/events",
            "Stored events after a seq",
            None,
            &[(
                "afterSeq",
                "only events with a greater seq",
                json!({"type": "integer", "minimum": 0, "default": 0}),
            )],
            Answer::Json(200, events),
        );
        let cancel = self.schema::<CancelRequest>();
        let cancelled = self.schema::<CancelResponse>();
        self.route(
            "post",
            "/v3/sessions/{sessionId}/cancel",
            "Cancel queued or running turns",
            Some(cancel),
            &[],
            Answer::Json(200, cancelled),
        );
        let resolve = self.schema::<ResolvePermissionRequest>();
        let resolved = self.schema::<ResolvePermissionResponse>();
        self.route(
            "post",
            "/v3/sessions/{sessionId}/permissions/{requestId}",
            "Answer a permission request (409 when already decided)",
            Some(resolve),
            &[],
            Answer::Json(200, resolved),
        );
        let grants = self.schema::<GrantsResponse>();
        self.route(
            "delete",
            "/v3/sessions/{sessionId}/grants",
            "Revoke the session's grant named by `grant` (404 when it has none such), or all of them",
            None,
            &[(
                "grant",
                "the grant to revoke, as listed in the session's `grants`; absent: all",
                json!({"type": "string"}),
            )],
            Answer::Json(200, grants),
        );
    }

    fn event_planes(&mut self) {
        let session = (
            "sessionId",
            "the session to follow",
            json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}),
        );
        let after = (
            "afterSeq",
            "replay stored events after this seq, then go live",
            json!({"type": "integer", "minimum": 0, "default": 0}),
        );
        let envelope = self.schema::<Envelope>();
        self.route("get", "/v3/sse/events",
            "Server-sent events: `: connected`, then `id: <seq>` + `data: <Envelope>`, `: ping` every 15 s; Last-Event-ID counts as afterSeq",
            None, &[session.clone(), after.clone()],
            Answer::Other(200, json!({"description": "an event stream of envelopes",
                "content": {"text/event-stream": {"schema": {"type": "string",
                    "description": "each event's `data:` is an Envelope (x-event-schema)"}}},
                "x-event-schema": envelope})));
        let inbound = self.schema::<ClientFrame>();
        let ack = self.schema::<AckFrame>();
        self.route("get", "/v3/ws",
            "WebSocket: envelopes, acks and error frames out; hello, turn.submit, permission.resolve and turn.cancel in",
            None,
            &[session, after, ("token", "the token (browsers cannot set headers here)", json!({"type": "string"}))],
            Answer::Other(101, json!({"description": "switching to the WebSocket protocol; \
                    text frames are JSON (x-client-frames in, x-server-frames out)",
                "x-client-frames": inbound,
                "x-server-frames": {"oneOf": [
                    {"$ref": "#/components/schemas/Envelope"}, ack,
                    {"$ref": "#/components/schemas/ErrorBody"}]}})));
    }

    fn background(&mut self) {
        let session = ("sessionId", "the owning session", json!({"type": "string"}));
        let list = self.schema::<BackgroundListResponse>();
        self.route(
            "get",
            "/v3/background",
            "Background processes (running, and ended in the last 5 minutes), oldest first",
            None,
            std::slice::from_ref(&session),
            Answer::Json(200, list),
        );
        let start = self.schema::<StartBackgroundRequest>();
        let one = self.schema::<BackgroundProcessResponse>();
        self.route(
            "post",
            "/v3/background/start",
            "Start a background process (`sh -c`, own process group, cwd inside the session's workspace); 409 `process-limit` when 5 run",
            Some(start),
            &[],
            Answer::Json(201, one.clone()),
        );
        self.route(
            "get",
            "/v3/background/{pid}/status",
            "A background process (`pid` is the daemon's processId)",
            None,
            &[session],
            Answer::Json(200, one),
        );
        let output = self.schema::<BackgroundOutputResponse>();
        self.route(
            "get",
            "/v3/background/{pid}/output",
            "A background process's output after `afterSeq` (the last 1 MiB is kept)",
            None,
            &[
                (
                    "afterSeq",
                    "chunks with a greater seq",
                    json!({"type": "integer", "minimum": 0, "default": 0}),
                ),
                (
                    "limit",
                    "at most this many chunks",
                    json!({"type": "integer", "minimum": 1, "maximum": 500, "default": 200}),
                ),
                (
                    "stream",
                    "which stream",
                    json!({"type": "string", "enum": ["both", "stdout", "stderr"], "default": "both"}),
                ),
            ],
            Answer::Json(200, output),
        );
        let kill = self.schema::<KillBackgroundRequest>();
        let killed = self.schema::<KillBackgroundResponse>();
        self.route(
            "post",
            "/v3/background/{pid}/kill",
            "Signal a background process's group (SIGTERM or SIGINT escalate to SIGKILL after 5 s)",
            Some(kill),
            &[],
            Answer::Json(200, killed),
        );
    }

    fn lmx(&mut self) {
        let status = self.schema::<LmxStatusResponse>();
        self.route(
            "get",
            "/v3/lmx/status",
            "The inference server's status and loaded models",
            None,
            &[],
            Answer::Json(200, status),
        );
        let models = self.schema::<LmxModelsResponse>();
        self.route(
            "get",
            "/v3/lmx/models",
            "Loaded models, normalised (ETag; If-None-Match answers 304)",
            None,
            &[],
            Answer::Json(200, models),
        );
        let any = || Schema::from(true);
        let lmx_only: [(&str, &str); 3] = [
            (
                "/v3/lmx/memory",
                "LMX memory figures (501 without the admin API)",
            ),
            (
                "/v3/lmx/models/available",
                "Models LMX can load (501 without the admin API)",
            ),
            (
                "/v3/lmx/discovery",
                "LMX's discovery document (501 without the admin API)",
            ),
        ];
        for (path, summary) in lmx_only {
            self.route("get", path, summary, None, &[], Answer::Json(200, any()));
        }
        let load = self.schema::<LmxLoadRequest>();
        let loaded = self.schema::<LmxLoadResponse>();
        self.route(
            "post",
            "/v3/lmx/models/load",
            "Load a model (LMX; `download_required` asks for a confirmation)",
            Some(load),
            &[],
            Answer::Json(200, loaded.clone()),
        );
        let confirm = self.schema::<LmxConfirmRequest>();
        self.route(
            "post",
            "/v3/lmx/models/load/confirm",
            "Go ahead with the download a load asked about",
            Some(confirm),
            &[],
            Answer::Json(200, loaded),
        );
        let unload = self.schema::<LmxUnloadRequest>();
        let unloaded = self.schema::<LmxUnloadResponse>();
        self.route(
            "post",
            "/v3/lmx/models/unload",
            "Unload a model",
            Some(unload),
            &[],
            Answer::Json(200, unloaded.clone()),
        );
        self.route(
            "delete",
            "/v3/lmx/models/{modelId}",
            "Delete a model from the server's disk (`status: deleted`)",
            None,
            &[],
            Answer::Json(200, unloaded),
        );
        let download = self.schema::<LmxDownloadRequest>();
        let one = self.schema::<LmxDownload>();
        self.route(
            "post",
            "/v3/lmx/models/download",
            "Start downloading a model",
            Some(download),
            &[],
            Answer::Json(200, one.clone()),
        );
        let list = self.schema::<LmxDownloadsResponse>();
        self.route(
            "get",
            "/v3/lmx/models/downloads",
            "Downloads (finished ones too with includeInactive=true)",
            None,
            &[(
                "includeInactive",
                "list finished and failed downloads too",
                json!({"type": "boolean"}),
            )],
            Answer::Json(200, list),
        );
        self.route(
            "get",
            "/v3/lmx/models/download/{downloadId}/progress",
            "One download's progress",
            None,
            &[],
            Answer::Json(200, one),
        );
    }

    fn finish(mut self) -> Value {
        // ErrorBody is referenced by every operation.
        self.schema::<ErrorBody>();
        let schemas = self.generator.take_definitions(true);
        json!({
            "openapi": "3.1.0",
            "info": {
                "title": "opta daemon v3",
                "version": "1",
                "description": "The HTTP control plane of the opta daemon (contract opta-daemon-v3, version 1). \
                    Every route but /health needs the token: `Authorization: Bearer <token>` or `?token=`.",
            },
            "servers": [{"url": "http://127.0.0.1:9999"}],
            "security": [{"bearer": []}, {"queryToken": []}],
            "paths": self.paths,
            "components": {
                "schemas": schemas,
                "securitySchemes": {
                    "bearer": {"type": "http", "scheme": "bearer"},
                    "queryToken": {"type": "apiKey", "in": "query", "name": "token"},
                },
            },
        })
    }
}

/// `get /v3/sessions/{sessionId}/events` → `getV3SessionsSessionIdEvents`.
fn operation_id(method: &str, path: &str) -> String {
    let mut id = method.to_owned();
    for word in path.split(|c: char| !c.is_ascii_alphanumeric()) {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            id.push(first.to_ascii_uppercase());
            id.extend(chars);
        }
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_ids_are_unique_and_refs_resolve() {
        let doc = openapi();
        let mut ids = std::collections::HashSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let id = op["operationId"].as_str().unwrap();
                assert!(ids.insert(id.to_owned()), "{method} {path}: duplicate {id}");
            }
        }
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = reference.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "unresolved $ref {name}");
        }
        assert_eq!(
            operation_id("get", "/v3/sessions/{sessionId}/events"),
            "getV3SessionsSessionIdEvents"
        );
    }
}
