//! The HTTP edge: router, middleware, and the WebSocket and SSE planes.

mod auth;
mod background;
mod cors;
mod error;
mod extract;
mod lmx;
mod routes;
mod serve;
mod sse;
mod subscribe;
mod web;
mod ws;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{delete, get, post};

use crate::context::DaemonContext;
use crate::session::Registry;

pub use cors::is_loopback_origin;
pub use extract::BODY_LIMIT;
pub use routes::VERSION;
pub(crate) use serve::{ServeControl, serve};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The daemon's shared parts.
    pub ctx: Arc<DaemonContext>,
    /// The session registry.
    pub registry: Registry,
    /// The auth token.
    pub token: Arc<str>,
    /// The web page's outstanding one-time sign-in codes.
    pub sign_in: Arc<web::SignInCodes>,
}

impl AppState {
    /// The state of a router serving `registry` with `token`.
    pub fn new(ctx: Arc<DaemonContext>, registry: Registry, token: Arc<str>) -> Self {
        Self {
            ctx,
            registry,
            token,
            sign_in: Arc::default(),
        }
    }
}

/// The v3 router with auth, CORS and the body limit.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(web::index))
        .route("/assets/{*file}", get(web::asset))
        .route("/v3/web/code", post(web::issue_code))
        .route("/v3/web/exchange", post(web::exchange))
        .route("/v3/sse/sessions", get(sse::sessions))
        .route("/health", get(routes::health))
        .route("/v3/health", get(routes::v3_health))
        .route("/v3/metrics", get(routes::metrics))
        .route("/metrics", get(routes::prometheus))
        .route(
            "/v3/sessions",
            post(routes::create_session).get(routes::list_sessions),
        )
        .route(
            "/v3/sessions/{id}",
            get(routes::get_session).delete(routes::delete_session),
        )
        .route("/v3/sessions/{id}/turns", post(routes::submit_turn))
        .route("/v3/sessions/{id}/events", get(routes::session_events))
        .route("/v3/sessions/{id}/cancel", post(routes::cancel))
        .route(
            "/v3/sessions/{id}/permissions/{request_id}",
            post(routes::resolve_permission),
        )
        .route("/v3/sessions/{id}/grants", delete(routes::revoke_grants))
        .route("/v3/sse/events", get(sse::events))
        .route("/v3/ws", get(ws::connect))
        .route("/v3/background", get(background::list))
        .route("/v3/background/start", post(background::start))
        .route("/v3/background/{pid}/status", get(background::status))
        .route("/v3/background/{pid}/output", get(background::output))
        .route("/v3/background/{pid}/kill", post(background::kill))
        .route("/v3/lmx/status", get(lmx::status))
        .route("/v3/lmx/models", get(lmx::models))
        .route("/v3/lmx/memory", get(lmx::memory))
        .route("/v3/lmx/models/available", get(lmx::available))
        .route("/v3/lmx/discovery", get(lmx::discovery))
        .route("/v3/lmx/models/load", post(lmx::load))
        .route("/v3/lmx/models/load/confirm", post(lmx::confirm_load))
        .route("/v3/lmx/models/unload", post(lmx::unload))
        .route("/v3/lmx/models/download", post(lmx::download))
        .route("/v3/lmx/models/downloads", get(lmx::downloads))
        .route(
            "/v3/lmx/models/download/{download_id}/progress",
            get(lmx::download_progress),
        )
        .route("/v3/lmx/models/{*model_id}", delete(lmx::delete_model))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(middleware::from_fn(cors::loopback_cors))
        .layer(middleware::map_response(
            |mut response: axum::response::Response| async {
                web::add_security_headers(response.headers_mut());
                response
            },
        ))
        .with_state(state)
}
