//! Test support for opta: a scripted OpenAI-compatible inference server, an in-process
//! daemon harness and small WebSocket/SSE clients. Test-only code: helpers panic with a
//! message instead of returning errors, so tests read as the scenario they check.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod clients;
pub mod daemon;
pub mod lmx;
pub mod proxy;

pub use clients::{
    SseClient, WsClient, WsItem, assert_contiguous, is_terminal_of, token_events, token_text,
};
pub use daemon::{TestDaemon, WAIT, WorkspaceDirs};
pub use lmx::{Behaviour, Reply, ScriptedLmx, conversation};
pub use proxy::CutProxy;

/// Whether process `pid` is running (a zombie, exited but not yet reaped by whoever
/// inherited it, counts as gone).
pub fn process_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next()
            != Some("Z")
    })
}

/// Whether this host lets a root process make cgroup v2 directories (so a daemon tracks its
/// commands by cgroup): running as root, with a cgroup2 mount.
pub fn host_has_cgroups() -> bool {
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    });
    let mounted = std::fs::read_to_string("/proc/mounts")
        .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(2) == Some("cgroup2")));
    root && mounted
}

/// Whether this host lets a process make a user and PID namespace (so a daemon told to can
/// track its commands by PID namespace): tried with util-linux's `unshare`.
pub fn host_has_user_namespaces() -> bool {
    std::process::Command::new("unshare")
        .args(["--user", "--pid", "--fork", "true"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A shell snippet that appends the pid of the shell running it to `file`, as the host sees
/// it (`/proc/self` opened by the shell itself), even inside a PID namespace where `$$` is
/// the namespace's number.
pub fn record_own_pid(file: &str) -> String {
    format!("read -r p rest < /proc/self/stat; echo $p >> {file}")
}

/// Whether any live process is in process group `pgid` (zombies, exited but not yet reaped
/// by whoever inherited them, count as gone).
pub fn group_alive(pgid: u64) -> bool {
    let pgid = pgid.to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        std::fs::read_to_string(e.path().join("stat")).is_ok_and(|stat| {
            // After the command's closing parenthesis: state, ppid, pgrp.
            let fields: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            fields.first() != Some(&"Z") && fields.get(2) == Some(&pgid.as_str())
        })
    })
}
