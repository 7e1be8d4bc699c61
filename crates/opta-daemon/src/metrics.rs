//! Prometheus metrics for `GET /metrics` (OpenMetrics text), written with `prometheus-client`:
//! turns by outcome and code, turn duration and first-token latency, events emitted, store
//! commit latency, inference requests and their errors, tool calls and permission decisions,
//! and the live counts (sessions, subscribers, turns). `/v3/metrics` stays the protocol's JSON.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::context::RuntimeCounters;

/// How a turn ended, and its error code (empty for `done`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TurnLabels {
    /// `done`, `failed`, `cancelled` or `interrupted`.
    pub outcome: String,
    /// The `turn.error` code, if any.
    pub code: String,
}

/// An inference request's error code (`lmx-timeout`, ...; `other` without one).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The code.
    pub code: String,
}

/// A tool call: which tool and how it ended. Every label value comes from a fixed set, never
/// from a model or a client (a made-up tool name is `unknown`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolLabels {
    /// A known tool's name, or `unknown`.
    pub tool: &'static str,
    /// `ok`, `error` or `denied`.
    pub outcome: &'static str,
}

/// A permission decision and who made it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow` or `deny`.
    pub decision: String,
    /// `client` (whichever client), or the daemon's own: `timeout`, `cancel`,
    /// `interrupted`, `mode`, `grant`, `error`, `dangerous`.
    pub decided_by: &'static str,
}

/// The daemon's metrics; cheap to update from any task.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Turns ended, by outcome and code.
    pub turns: Family<TurnLabels, Counter>,
    /// Turn duration, start to end, in seconds.
    pub turn_seconds: Histogram,
    /// Submit-to-first-token latency, in seconds.
    pub first_token_seconds: Histogram,
    /// Events committed and broadcast.
    pub events: Counter,
    /// One store commit (a write batch), in seconds, queueing included.
    pub commit_seconds: Histogram,
    /// Inference requests (chat completions), in seconds to their end.
    pub inference_seconds: Histogram,
    /// Inference requests that failed, by code.
    pub inference_errors: Family<ErrorLabels, Counter>,
    /// Tool calls, by tool and outcome.
    pub tool_calls: Family<ToolLabels, Counter>,
    /// Permission decisions, by decision and decider.
    pub permission_decisions: Family<DecisionLabels, Counter>,
    sessions: Gauge,
    evicted: Gauge,
    subscribers: Gauge,
    channels: Gauge,
    active_turns: Gauge,
    queued_turns: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("opta");
        // 100 µs .. ~52 s for latencies; 10 ms .. ~1.4 h for whole turns.
        let latency = || Histogram::new(exponential_buckets(0.0001, 2.0, 20));
        let metrics = Self {
            turns: Family::default(),
            turn_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 20)),
            first_token_seconds: latency(),
            events: Counter::default(),
            commit_seconds: latency(),
            inference_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            inference_errors: Family::default(),
            tool_calls: Family::default(),
            permission_decisions: Family::default(),
            sessions: Gauge::default(),
            evicted: Gauge::default(),
            subscribers: Gauge::default(),
            channels: Gauge::default(),
            active_turns: Gauge::default(),
            queued_turns: Gauge::default(),
            registry: Registry::default(),
        };
        let m = &metrics;
        registry.register(
            "turns",
            "Turns ended, by outcome and error code",
            m.turns.clone(),
        );
        registry.register(
            "turn_duration_seconds",
            "Turn duration from start to end",
            m.turn_seconds.clone(),
        );
        registry.register(
            "first_token_seconds",
            "Time from a turn's start to its first token",
            m.first_token_seconds.clone(),
        );
        registry.register("events", "Events committed and broadcast", m.events.clone());
        registry.register(
            "store_commit_seconds",
            "Time for one store commit (a write batch), queueing included",
            m.commit_seconds.clone(),
        );
        registry.register(
            "inference_request_seconds",
            "Chat completion requests to the inference server, to their end",
            m.inference_seconds.clone(),
        );
        registry.register(
            "inference_errors",
            "Chat completion requests that failed, by code",
            m.inference_errors.clone(),
        );
        registry.register(
            "tool_calls",
            "Tool calls, by tool and outcome",
            m.tool_calls.clone(),
        );
        registry.register(
            "permission_decisions",
            "Permission decisions, by decision and decider",
            m.permission_decisions.clone(),
        );
        registry.register(
            "sessions_resident",
            "Sessions in memory",
            m.sessions.clone(),
        );
        registry.register(
            "sessions_evicted",
            "Idle sessions evicted from memory since start",
            m.evicted.clone(),
        );
        registry.register(
            "subscribers",
            "Open event subscriptions",
            m.subscribers.clone(),
        );
        registry.register(
            "session_channels",
            "Sessions holding a broadcast channel (those with live subscribers)",
            m.channels.clone(),
        );
        registry.register("turns_active", "Running turns", m.active_turns.clone());
        registry.register("turns_queued", "Queued turns", m.queued_turns.clone());
        Self {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    /// Counts a finished turn.
    pub fn turn_ended(&self, outcome: &str, code: Option<&str>, took: Duration) {
        self.turns
            .get_or_create(&TurnLabels {
                outcome: outcome.to_owned(),
                code: code.unwrap_or_default().to_owned(),
            })
            .inc();
        self.turn_seconds.observe(took.as_secs_f64());
    }

    /// The OpenMetrics text, live counts read from `counters` now.
    pub fn encode(&self, counters: &RuntimeCounters) -> Result<String, std::fmt::Error> {
        let now = counters.snapshot();
        let set = |gauge: &Gauge, value: usize| {
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        };
        set(&self.sessions, now.session_count);
        set(&self.subscribers, now.subscriber_count);
        set(&self.channels, counters.channels());
        set(&self.active_turns, now.active_turn_count);
        set(&self.queued_turns, now.queued_turn_count);
        set(
            &self.evicted,
            usize::try_from(now.evicted_session_count.unwrap_or(0)).unwrap_or(usize::MAX),
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}
