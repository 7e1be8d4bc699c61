//! Wire types of the opta daemon's v3 protocol: envelopes, event payloads, HTTP bodies and
//! WebSocket frames. No I/O lives here; every other crate speaks through these types.

pub mod api;
pub mod events;
pub mod ids;
pub mod model;
pub mod openapi;
pub mod ws;

pub use api::*;
pub use events::*;
pub use ids::*;
pub use model::*;
pub use openapi::openapi;
pub use ws::*;
