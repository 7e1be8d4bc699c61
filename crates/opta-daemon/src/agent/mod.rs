//! The agent: what a turn may do besides talking. So far the workspace a session's tools are
//! confined to; the tool loop, the tools and permissions build on it.

pub mod workspace;

pub use workspace::{Workspace, WorkspaceError};
pub mod tools;
