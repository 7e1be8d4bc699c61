//! `opta-bench`: measures a v3 daemon through its public protocol (its own, started locally
//! against a zero-latency scripted server, or any running one with `--base URL --token T`)
//! and prints JSON, one report per run.
//!
//! - `overhead`, `tools` (`turns.rs`): one client's turns back to back.
//! - `fanout`, `slow-consumer`, `concurrent` (`load.rs`): many subscribers, many sessions.
//! - `memory` (`memory.rs`): the daemon's RSS idle, after subscribed turns, after eviction,
//!   per idle subscriber.
//! - `soak` (`soak.rs`): sessions × subscribers with a turn per session per second.
//! - `churn` (`churn.rs`): session lifecycles with misbehaving clients; resource growth.
//! - `replay`, `startup` (`replay.rs`): big stored logs, many stored sessions.
//! - `store`: one event commit through the store's writer (in process, no daemon).

mod churn;
mod load;
mod memory;
mod replay;
mod soak;
mod target;
mod turns;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, Subcommand};
use opta_daemon::store::{Store, StoreOptions, WriteOp};
use serde_json::{Value, json};

use crate::target::TargetArgs;

#[derive(Parser)]
#[command(about = "opta benchmarks: any v3 daemon, through its public protocol")]
struct Cli {
    #[command(flatten)]
    target: TargetArgs,
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Submit → first token and submit → done over sequential turns.
    Overhead {
        /// fsync every commit (the daemon's `--sync-commits`).
        #[arg(long)]
        sync_commits: bool,
        /// Measured turns.
        #[arg(long, default_value_t = 200)]
        turns: usize,
        /// Unmeasured turns first (connection set-up, caches).
        #[arg(long, default_value_t = 20)]
        warmup: usize,
    },
    /// Session lifecycles with vanishing and misbehaving clients; reports resource growth.
    Churn {
        /// Measured rounds.
        #[arg(long, default_value_t = 2000)]
        rounds: usize,
        /// Rounds before the first resource sample.
        #[arg(long, default_value_t = 200)]
        warmup: usize,
    },
    /// What one tool round adds: turns with one `read_file` round against plain turns,
    /// alternating, on one session.
    Tools {
        /// Measured turns of each kind.
        #[arg(long, default_value_t = 200)]
        turns: usize,
        /// Unmeasured turns of each kind first.
        #[arg(long, default_value_t = 20)]
        warmup: usize,
    },
    /// Sessions × subscribers, a turn per session per second, for a duration: delivery
    /// latency percentiles, errors, the daemon's RSS after a warm-up and at the end.
    Soak {
        /// Sessions.
        #[arg(long, default_value_t = 100)]
        sessions: usize,
        /// WebSocket subscribers per session.
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 600)]
        duration_secs: u64,
        /// Seconds before the first RSS sample.
        #[arg(long, default_value_t = 10)]
        warmup_secs: u64,
        /// Tokens per turn.
        #[arg(long, default_value_t = 32)]
        tokens: usize,
    },
    /// Memory: RSS idle, after sessions that each had a WebSocket subscriber and a turn (the
    /// subscribers closed), after those sessions were evicted, and per idle subscriber.
    Memory {
        /// Sessions, each with a subscriber and one turn.
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        /// Idle WebSocket subscribers on one session.
        #[arg(long, default_value_t = 2000)]
        subscribers: usize,
        /// Seconds to wait for the sessions' eviction (a local daemon evicts after 5 s idle).
        #[arg(long, default_value_t = 120)]
        eviction_wait_secs: u64,
    },
    /// N WebSocket subscribers on one session while one turn streams: time until all saw
    /// `turn.done`, deliveries per second, every seq once and in order. One line per run.
    Fanout {
        /// Subscriber counts (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "50,500")]
        subscribers: Vec<usize>,
        /// Turn lengths in tokens (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "2000,20000")]
        tokens: Vec<usize>,
    },
    /// Fan-out without and then with one subscriber that stops reading: the others' time,
    /// and whether the stalled one was cut off and could resume.
    SlowConsumer {
        /// Reading subscribers.
        #[arg(long, default_value_t = 50)]
        subscribers: usize,
        /// Turn length in tokens.
        #[arg(long, default_value_t = 20000)]
        tokens: usize,
        /// Seconds the stalled reader waits before it looks (the daemon drops a connection
        /// whose writes make no progress for 30 s).
        #[arg(long, default_value_t = 32)]
        stall_secs: u64,
    },
    /// Sessions each with a subscriber, one turn each, all submitted at once: turns/s.
    Concurrent {
        /// Session counts (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        sessions: Vec<usize>,
        /// Tokens per turn.
        #[arg(long, default_value_t = 32)]
        tokens: usize,
    },
    /// Replay from a stored log (seeded through the store): the last 10 events, and the whole
    /// log over WebSocket. One line per log size.
    Replay {
        /// Stored events (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
        events: Vec<u64>,
        /// Measured `afterSeq=last-10` subscriptions per size.
        #[arg(long, default_value_t = 200)]
        repeats: usize,
        /// With `--base`: the session whose stored log is replayed.
        #[arg(long)]
        session: Option<String>,
    },
    /// Start-up: the `opta` binary beside this one spawned on a home with N stored sessions,
    /// until `/health` answers. One line per count.
    Startup {
        /// Stored sessions (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "0,10000,100000")]
        sessions: Vec<u64>,
        /// Starts measured per count.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// Round trip of one event commit through the store's writer thread.
    Store {
        /// fsync every commit (the daemon's `--sync-commits`).
        #[arg(long)]
        sync_commits: bool,
        /// Measured commits.
        #[arg(long, default_value_t = 3000)]
        commits: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let target = &cli.target;
    match cli.command {
        Bench::Overhead {
            turns,
            warmup,
            sync_commits,
        } => turns::overhead(target, turns, warmup, sync_commits),
        Bench::Store {
            commits,
            sync_commits,
        } => store(commits, sync_commits),
        Bench::Churn { rounds, warmup } => churn::churn(target, rounds, warmup),
        Bench::Soak {
            sessions,
            subscribers,
            duration_secs,
            warmup_secs,
            tokens,
        } => soak::soak(
            target,
            &soak::SoakShape {
                sessions,
                subscribers,
                duration: Duration::from_secs(duration_secs),
                warmup: Duration::from_secs(warmup_secs),
                tokens,
            },
        ),
        Bench::Tools { turns, warmup } => turns::tools(target, turns, warmup),
        Bench::Memory {
            sessions,
            subscribers,
            eviction_wait_secs,
        } => memory::memory(
            target,
            &memory::MemoryShape {
                sessions,
                subscribers,
                eviction_wait: Duration::from_secs(eviction_wait_secs),
            },
        ),
        Bench::Fanout {
            subscribers,
            tokens,
        } => load::fanout(target, &subscribers, &tokens),
        Bench::SlowConsumer {
            subscribers,
            tokens,
            stall_secs,
        } => load::slow_consumer(target, subscribers, tokens, Duration::from_secs(stall_secs)),
        Bench::Concurrent { sessions, tokens } => load::concurrent(target, &sessions, tokens),
        Bench::Replay {
            events,
            repeats,
            session,
        } => replay::replay(target, &events, repeats, session.as_deref()),
        Bench::Startup { sessions, repeats } => replay::startup(target, &sessions, repeats),
    }
}

/// Percentiles of a sample in milliseconds.
fn summary(mut samples: Vec<Duration>) -> Value {
    samples.sort();
    let ms = |d: Duration| (d.as_secs_f64() * 1_000_000.0).round() / 1000.0;
    let at = |q: f64| {
        let idx = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(idx).copied().map(ms)
    };
    let mean = samples.iter().map(|d| d.as_secs_f64()).sum::<f64>() / samples.len().max(1) as f64;
    json!({
        "n": samples.len(),
        "p50": at(0.50), "p90": at(0.90), "p99": at(0.99),
        "min": samples.first().copied().map(ms), "max": samples.last().copied().map(ms),
        "mean": (mean * 1_000_000.0).round() / 1000.0,
    })
}

fn store(commits: usize, sync_commits: bool) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let options = StoreOptions {
        max_bytes: None,
        sync_commits,
        ..StoreOptions::default()
    };
    let store = Store::open(&dir.path().join("bench.db"), options)?;
    let session: Arc<str> = Arc::from("bench");
    let envelope: Arc<str> = Arc::from(format!("{{\"payload\":\"{}\"}}", "x".repeat(300)));
    let samples = runtime.block_on(async {
        let mut samples = Vec::with_capacity(commits);
        for seq in 0..commits as u64 {
            let start = Instant::now();
            store
                .write(vec![WriteOp::AppendEvent {
                    session_id: session.clone(),
                    seq,
                    event: "turn.token",
                    turn_id: Some("turn_bench".into()),
                    envelope: envelope.clone(),
                }])
                .await?;
            samples.push(start.elapsed());
        }
        anyhow::Ok(samples)
    })?;
    let report = json!({"benchmark": "store", "syncCommits": sync_commits,
        "commitRoundTripMs": summary(samples)});
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
