//! Wire types of the opta daemon's v3 protocol: envelopes, event payloads, HTTP bodies and
//! WebSocket frames. No I/O lives here; every other crate speaks through these types.

pub mod api;
pub mod events;
pub mod ids;
pub mod lmx;
pub mod model;
pub mod openapi;
pub mod serde_util;
pub mod ws;

pub use api::*;
pub use events::*;
pub use ids::*;
pub use lmx::*;
pub use model::*;
pub use openapi::openapi;
pub use ws::*;
