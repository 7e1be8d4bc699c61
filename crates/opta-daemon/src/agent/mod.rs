//! The agent: what a turn may do besides talking. The loop ([`run`]), the tools
//! ([`tools`], plain async functions over a [`Workspace`]), who may run what
//! ([`permissions`]), tool calls written as text ([`textcalls`]) and what the model is sent
//! ([`prompt`]). The session actor owns the state (history, grants, pending requests); the
//! loop runs in the turn's task and reports to it.

pub mod permissions;
pub mod prompt;
pub(crate) mod run;
pub mod textcalls;
pub mod tools;
pub mod workspace;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

pub use workspace::{Workspace, WorkspaceError};

/// The agent's settings, from the daemon's flags.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Model rounds a turn may take (`--max-tool-rounds`).
    pub max_tool_rounds: u32,
    /// How long a permission request waits before it is denied (`--permission-timeout-secs`).
    pub permission_timeout: Duration,
    /// `run_command` limits (`--max-command-secs` and the output cap).
    pub command: tools::command::CommandLimits,
    /// Replaces the opening of the system prompt (`--system-prompt-file`).
    pub system_prompt: Option<String>,
    /// Workspace of sessions created without one (`--workspace`; default the daemon's
    /// working directory).
    pub workspace: Option<PathBuf>,
    /// Where sandboxed commands may write besides the workspace and the temporary directory
    /// (`--sandbox-write`).
    pub sandbox_writes: Vec<PathBuf>,
    /// Let a workspace be `/` or hold the daemon's home (`--allow-any-workspace`).
    pub allow_any_workspace: bool,
    /// What each command may use (`--command-max-procs`, `--command-max-memory-mb`).
    pub command_caps: crate::process::contain::CommandCaps,
    /// How each command's processes are tracked to their end (`--command-tracking`).
    pub command_tracking: crate::process::contain::Tracking,
    /// The most bytes of one tool result the model and clients get (`--tool-result-kib`).
    pub tool_result_bytes: usize,
    /// The most text one edit may add to a file (`--max-edit-kib`).
    pub max_edit_bytes: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            max_tool_rounds: 30,
            permission_timeout: Duration::from_secs(120),
            command: tools::command::CommandLimits::default(),
            system_prompt: None,
            workspace: None,
            sandbox_writes: Vec::new(),
            allow_any_workspace: false,
            command_caps: crate::process::contain::CommandCaps::default(),
            command_tracking: crate::process::contain::Tracking::default(),
            tool_result_bytes: 64 * 1024,
            max_edit_bytes: 1024 * 1024,
        }
    }
}

/// Models whose server refused `tools`: from then on their tools are described in the
/// prompt and called as text. Daemon-wide, like the model list.
#[derive(Debug, Default)]
pub struct ToolSupport {
    refusing: Mutex<HashSet<String>>,
}

impl ToolSupport {
    /// Whether `model`'s server refused tools.
    pub fn refuses(&self, model: &str) -> bool {
        self.refusing
            .lock()
            .map(|set| set.contains(model))
            .unwrap_or(false)
    }

    /// Remembers that `model`'s server refuses tools.
    pub fn mark_refuses(&self, model: &str) {
        if let Ok(mut set) = self.refusing.lock() {
            set.insert(model.to_owned());
        }
    }
}
