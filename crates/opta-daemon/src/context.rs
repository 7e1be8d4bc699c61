//! What every part of one daemon shares: its id, store, inference client and counters.
//! Passed explicitly (no globals), so one process can run several daemons.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opta_protocol::RuntimeStats;
use tokio_util::sync::CancellationToken;

use crate::inference::{LmxClient, PreflightCache};
use crate::store::Store;

/// Tunables of sessions and event streams.
#[derive(Debug, Clone, Copy)]
pub struct Tunables {
    /// Frames buffered per subscriber before it is dropped as too slow.
    pub subscriber_buffer: usize,
    /// How long token/thinking events of a finished turn stay replayable.
    pub delta_retention: Duration,
    /// How often token/thinking events past their retention are looked for.
    pub delta_sweep_interval: Duration,
    /// Interval of the SSE `: ping` comment and the WebSocket ping (which also finds peers
    /// that vanished without closing).
    pub keepalive: Duration,
    /// A client must send its request headers within this time, or its connection closes.
    pub header_read_timeout: Duration,
    /// A request body must arrive whole within this time from its headers (else 408).
    pub body_read_timeout: Duration,
    /// A write to a client that makes no progress for this long (the client stopped
    /// reading) closes its connection.
    pub write_timeout: Duration,
    /// On shutdown, open connections get this long to finish, then they are dropped.
    pub shutdown_grace: Duration,
    /// A session with no turn, no subscriber and no request for this long leaves memory (it
    /// is loaded again from the store on its next use).
    pub idle_eviction: Duration,
    /// How often idle sessions are looked for.
    pub eviction_interval: Duration,
}

impl Default for Tunables {
    fn default() -> Self {
        Self {
            subscriber_buffer: 4096,
            delta_retention: Duration::from_secs(60),
            delta_sweep_interval: Duration::from_secs(10),
            keepalive: Duration::from_secs(15),
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            idle_eviction: Duration::from_secs(30 * 60),
            eviction_interval: Duration::from_secs(60),
        }
    }
}

/// Faults a test can inject into a daemon, to prove what it does when a part fails; none by
/// default, and no flag or client can set them.
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultHooks {
    /// A turn task whose user message this accepts panics before calling the model.
    pub turn_panics_on: Option<fn(&str) -> bool>,
    /// A tool call whose arguments (as JSON text) this accepts panics inside the turn task.
    pub tool_panics_on: Option<fn(&str) -> bool>,
    /// A background process whose command this accepts has a monitor that panics after
    /// reporting its start.
    pub monitor_panics_on: Option<fn(&str) -> bool>,
    /// A session actor given a turn submission whose content this accepts panics.
    pub session_panics_on: Option<fn(&str) -> bool>,
    /// For a turn whose user message this accepts, the actor waits for the turn task to
    /// return and takes its join before the reports it left: the order a task on another
    /// thread makes when it reports its end and returns between the actor's look at its
    /// reports and its look at the join.
    pub join_before_reports_on: Option<fn(&str) -> bool>,
    /// Every model delta becomes its own event even when several arrived together (as a
    /// slow machine would emit them): floods subscribers with small frames.
    pub deltas_kept_apart: bool,
}

/// Live counters, updated by the actors and stream handlers.
#[derive(Debug, Default)]
pub struct RuntimeCounters {
    sessions: AtomicUsize,
    active_turns: AtomicUsize,
    queued_turns: AtomicUsize,
    subscribers: AtomicUsize,
    evictions: AtomicUsize,
    channels: AtomicUsize,
}

/// Which counter to move.
#[derive(Debug, Clone, Copy)]
pub enum Counter {
    /// Resident sessions.
    Sessions,
    /// Running turns.
    ActiveTurns,
    /// Queued turns.
    QueuedTurns,
    /// Open event subscriptions.
    Subscribers,
    /// Sessions evicted from memory since start.
    Evictions,
    /// Sessions holding a broadcast channel (only those with live subscribers should).
    Channels,
}

impl RuntimeCounters {
    fn slot(&self, c: Counter) -> &AtomicUsize {
        match c {
            Counter::Sessions => &self.sessions,
            Counter::ActiveTurns => &self.active_turns,
            Counter::QueuedTurns => &self.queued_turns,
            Counter::Subscribers => &self.subscribers,
            Counter::Evictions => &self.evictions,
            Counter::Channels => &self.channels,
        }
    }

    /// Adds `n`.
    pub fn add(&self, c: Counter, n: usize) {
        self.slot(c).fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts `n`.
    pub fn sub(&self, c: Counter, n: usize) {
        self.slot(c).fetch_sub(n, Ordering::Relaxed);
    }

    /// Sessions holding a broadcast channel now.
    pub fn channels(&self) -> usize {
        self.channels.load(Ordering::Relaxed)
    }

    /// A reading of all counters.
    pub fn snapshot(&self) -> RuntimeStats {
        RuntimeStats {
            session_count: self.sessions.load(Ordering::Relaxed),
            active_turn_count: self.active_turns.load(Ordering::Relaxed),
            queued_turn_count: self.queued_turns.load(Ordering::Relaxed),
            subscriber_count: self.subscribers.load(Ordering::Relaxed),
            stored_session_count: None,
            evicted_session_count: Some(self.evictions.load(Ordering::Relaxed) as u64),
        }
    }
}

/// The daemon's shared parts.
#[derive(Debug)]
pub struct DaemonContext {
    /// `daemon_` + 8 url-safe characters.
    pub daemon_id: String,
    /// The store.
    pub store: Store,
    /// The inference server.
    pub lmx: LmxClient,
    /// Cached model list for the pre-turn check and `/v3/lmx/models`.
    pub preflight: PreflightCache,
    /// Model for sessions created without one.
    pub default_model: String,
    /// Session and stream tunables.
    pub limits: Tunables,
    /// Live counters.
    pub counters: RuntimeCounters,
    /// Cancelled when the daemon begins to stop.
    pub shutdown: CancellationToken,
    /// When the daemon started (the clock of idle times).
    pub started: std::time::Instant,
    /// Injected faults (tests only).
    pub faults: FaultHooks,
    /// Prometheus metrics (`GET /metrics`).
    pub metrics: crate::metrics::Metrics,
    /// The agent's settings.
    pub agent: crate::agent::AgentConfig,
    /// Workspace of sessions created without one, or why it is refused.
    pub default_workspace: Result<crate::agent::Workspace, String>,
    /// What no workspace may reach (the daemon's home).
    pub protected: crate::agent::workspace::Protected,
    /// Models whose server refused `tools`.
    pub tool_support: crate::agent::ToolSupport,
    /// The background process runner.
    pub runner: crate::process::ProcessRunner,
    /// The sandbox commands run in.
    pub sandbox: crate::process::sandbox::Sandbox,
    /// How every command's processes are tracked to their end (a cgroup each).
    pub containment: crate::process::contain::Containment,
    /// Limits of background processes.
    pub background: crate::process::BackgroundLimits,
    /// Session changes, for live session lists.
    pub session_feed: crate::session::SessionFeed,
}

impl DaemonContext {
    /// Milliseconds since the daemon started.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}
