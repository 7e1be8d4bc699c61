//! The opta daemon library: session actors, the SQLite store, the inference client and the
//! v3 HTTP/WebSocket/SSE edge. `opta daemon run` is a thin wrapper around [`RunningDaemon`].

mod actor;
pub mod agent;
pub mod context;
pub mod daemon;
pub mod error;
pub mod http;
pub mod ids;
pub mod inference;
pub mod metrics;
pub mod process;
pub mod session;
pub mod store;

pub use daemon::{DaemonConfig, DaemonState, RunningDaemon, read_state, state_path};
pub use error::{Error, Result};
