//! Test support for opta: a scripted OpenAI-compatible inference server, an in-process
//! daemon harness and small WebSocket/SSE clients. Test-only code: helpers panic with a
//! message instead of returning errors, so tests read as the scenario they check.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod clients;
pub mod daemon;
pub mod lmx;
pub mod proxy;

pub use clients::{SseClient, WsClient, WsItem, assert_contiguous, is_terminal_of, token_text};
pub use daemon::{TestDaemon, WAIT};
pub use lmx::{Behaviour, Reply, ScriptedLmx, conversation};
pub use proxy::CutProxy;
