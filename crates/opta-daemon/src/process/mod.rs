//! Background processes: one runner, owned by the daemon, that starts commands in their own
//! process groups, keeps their output (per process, capped), reports them to their session
//! as `background.output` / `background.status` events, stops them on request, on timeout
//! and at shutdown, and never leaves a group behind.
//!
//! The runner is an actor: it owns the table of processes. Each process also has a monitor
//! task (`monitor.rs`) that owns the child: it reads its output, numbers the chunks, sends
//! each to the runner (for the output route) and to the session (as an event, awaited, so a
//! process's events are in order), handles kill and timeout escalation, and reports the end.

pub mod contain;
mod monitor;
mod pidns;
pub mod sandbox;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opta_protocol::{
    BackgroundOutputResponse, BackgroundProcess, KillBackgroundResponse, KillSignal, OutputChunk,
    OutputStream, ProcessState, SessionId,
};
use tokio::sync::{mpsc, oneshot};

use crate::context::DaemonContext;
use crate::error::{Error, Result};
use crate::session::{Registry, SessionHandle};
use crate::store::WriteOp;

/// The longest timeout a process may have.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Limits of background processes (flags `--max-background`, `--background-timeout-secs`,
/// `--background-output-kib`, `--background-keep-secs`).
#[derive(Debug, Clone, Copy)]
pub struct BackgroundLimits {
    /// Running at once, daemon-wide (`run_command` does not count).
    pub max_running: usize,
    /// Timeout of a process started without one (zero: none).
    pub default_timeout: Duration,
    /// Output kept per process; the oldest chunks go first.
    pub output_cap_bytes: usize,
    /// How long an ended process stays listed and readable.
    pub keep_ended: Duration,
}

impl Default for BackgroundLimits {
    fn default() -> Self {
        Self {
            max_running: 5,
            default_timeout: Duration::from_secs(300),
            output_cap_bytes: 1024 * 1024,
            keep_ended: Duration::from_secs(300),
        }
    }
}

/// What to start.
pub struct StartSpec {
    /// The owning session (its events go there).
    pub session: SessionHandle,
    /// Its id.
    pub session_id: SessionId,
    /// `sh -c` command line.
    pub command: String,
    /// A name for people.
    pub label: Option<String>,
    /// The working directory, already confined to the workspace.
    pub cwd: PathBuf,
    /// The session's workspace (where a sandboxed process may write).
    pub workspace: PathBuf,
    /// `None`: no timeout.
    pub timeout: Option<Duration>,
    /// Run under the sandbox (false only for `dangerous` turns).
    pub sandboxed: bool,
}

enum RunnerCommand {
    Start {
        spec: StartSpec,
        reply: oneshot::Sender<Result<BackgroundProcess>>,
    },
    List {
        session: Option<SessionId>,
        reply: oneshot::Sender<Vec<BackgroundProcess>>,
    },
    Status {
        id: String,
        reply: oneshot::Sender<Result<BackgroundProcess>>,
    },
    Output {
        id: String,
        after: u64,
        limit: usize,
        stream: Option<OutputStream>,
        reply: oneshot::Sender<Result<BackgroundOutputResponse>>,
    },
    Kill {
        id: String,
        signal: KillSignal,
        reply: oneshot::Sender<Result<KillBackgroundResponse>>,
    },
    /// From a monitor: a chunk read.
    Chunk {
        id: String,
        chunk: OutputChunk,
        /// The process's output past its event cap so far.
        dropped_bytes: u64,
    },
    /// From a monitor: the process ended (its final record).
    Ended {
        process: BackgroundProcess,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Address of the runner; cheap to clone.
#[derive(Clone, Debug)]
pub struct ProcessRunner {
    commands: mpsc::Sender<RunnerCommand>,
}

struct Proc {
    info: BackgroundProcess,
    started: Instant,
    ended: Option<Instant>,
    chunks: VecDeque<OutputChunk>,
    bytes: usize,
    control: mpsc::Sender<KillSignal>,
    monitor: tokio::task::JoinHandle<()>,
    session: SessionHandle,
}

struct Runner {
    ctx: Arc<DaemonContext>,
    procs: HashMap<String, Proc>,
    tx: mpsc::Sender<RunnerCommand>,
}

/// The runner's inbox, until [`RunnerInbox::start`] gives it its actor (the runner's handle
/// lives in the daemon context, which the actor needs in turn).
pub struct RunnerInbox {
    rx: mpsc::Receiver<RunnerCommand>,
    tx: mpsc::Sender<RunnerCommand>,
}

impl std::fmt::Debug for RunnerInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunnerInbox")
    }
}

impl RunnerInbox {
    /// Starts the runner's actor.
    pub fn start(self, ctx: Arc<DaemonContext>) {
        let runner = Runner {
            ctx,
            procs: HashMap::new(),
            tx: self.tx,
        };
        tokio::spawn(runner.run(self.rx));
    }
}

impl ProcessRunner {
    /// The runner's handle and its inbox; nothing runs before [`RunnerInbox::start`].
    pub fn channel() -> (Self, RunnerInbox) {
        let (tx, rx) = mpsc::channel(1024);
        (
            Self {
                commands: tx.clone(),
            },
            RunnerInbox { rx, tx },
        )
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> RunnerCommand) -> Result<T> {
        crate::actor::ask(&self.commands, make).await
    }

    /// Starts a process; 409 when the limit of running processes is reached.
    pub async fn start(&self, spec: StartSpec) -> Result<BackgroundProcess> {
        self.ask(|reply| RunnerCommand::Start { spec, reply })
            .await?
    }

    /// Processes, of one session or all, oldest first.
    pub async fn list(&self, session: Option<SessionId>) -> Result<Vec<BackgroundProcess>> {
        self.ask(|reply| RunnerCommand::List { session, reply })
            .await
    }

    /// One process.
    pub async fn status(&self, id: String) -> Result<BackgroundProcess> {
        self.ask(|reply| RunnerCommand::Status { id, reply })
            .await?
    }

    /// Output chunks after `after`.
    pub async fn output(
        &self,
        id: String,
        after: u64,
        limit: usize,
        stream: Option<OutputStream>,
    ) -> Result<BackgroundOutputResponse> {
        self.ask(|reply| RunnerCommand::Output {
            id,
            after,
            limit,
            stream,
            reply,
        })
        .await?
    }

    /// Sends `signal` to the process's group (escalating to SIGKILL after 5 s).
    pub async fn kill(&self, id: String, signal: KillSignal) -> Result<KillBackgroundResponse> {
        self.ask(|reply| RunnerCommand::Kill { id, signal, reply })
            .await?
    }

    /// Stops every running process (SIGTERM, then SIGKILL) and waits for their ends to be
    /// reported (bounded).
    pub async fn shutdown(&self) {
        let _ = self.ask(|reply| RunnerCommand::Shutdown { reply }).await;
    }
}

impl Runner {
    async fn run(mut self, mut commands: mpsc::Receiver<RunnerCommand>) {
        // Every second: a monitor that died (a panic) is noticed; ended processes past their
        // keeping time go.
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        loop {
            let command = tokio::select! {
                command = commands.recv() => match command {
                    Some(c) => c,
                    None => return,
                },
                _ = sweep.tick() => {
                    self.reap_dead_monitors().await;
                    let keep = self.ctx.background.keep_ended;
                    self.procs.retain(|_, p| p.ended.is_none_or(|t| t.elapsed() < keep));
                    continue;
                }
            };
            match command {
                RunnerCommand::Start { spec, reply } => {
                    let _ = reply.send(self.start(spec).await);
                }
                RunnerCommand::List { session, reply } => {
                    let mut list: Vec<&Proc> = self
                        .procs
                        .values()
                        .filter(|p| session.as_ref().is_none_or(|s| *s == p.info.session_id))
                        .collect();
                    list.sort_by_key(|p| p.started);
                    let _ = reply.send(list.into_iter().map(Proc::now).collect());
                }
                RunnerCommand::Status { id, reply } => {
                    let _ = reply.send(self.find(&id).map(Proc::now));
                }
                RunnerCommand::Output {
                    id,
                    after,
                    limit,
                    stream,
                    reply,
                } => {
                    let _ = reply.send(self.find(&id).map(|p| p.output(after, limit, stream)));
                }
                RunnerCommand::Kill { id, signal, reply } => {
                    let answer = match self.find(&id) {
                        Ok(p) => {
                            let running = p.info.state == ProcessState::Running;
                            let killed = running && p.control.try_send(signal).is_ok();
                            Ok(KillBackgroundResponse {
                                killed,
                                process: p.now(),
                            })
                        }
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(answer);
                }
                RunnerCommand::Chunk {
                    id,
                    chunk,
                    dropped_bytes,
                } => {
                    let cap = self.ctx.background.output_cap_bytes;
                    if let Some(p) = self.procs.get_mut(&id) {
                        p.keep(chunk, cap);
                        p.info.dropped_bytes = dropped_bytes;
                    }
                }
                RunnerCommand::Ended { process } => {
                    let ended = WriteOp::EndProcess {
                        process_id: process.process_id.clone(),
                    };
                    if let Err(e) = self.ctx.store.write(vec![ended]).await {
                        tracing::warn!(error = %e, "could not record a background process's end");
                    }
                    if let Some(p) = self.procs.get_mut(&process.process_id) {
                        p.info = process;
                        p.ended = Some(Instant::now());
                    }
                }
                RunnerCommand::Shutdown { reply } => {
                    self.shutdown(&mut commands).await;
                    let _ = reply.send(());
                    return;
                }
            }
        }
    }

    /// A monitor that ended without reporting its process's end (it panicked) leaves the
    /// process looking alive for ever: its group is killed and it is recorded as failed.
    async fn reap_dead_monitors(&mut self) {
        let dead: Vec<String> = self
            .procs
            .iter()
            .filter(|(_, p)| p.info.state == ProcessState::Running && p.monitor.is_finished())
            .map(|(id, _)| id.clone())
            .collect();
        for id in dead {
            let Some(p) = self.procs.get_mut(&id) else {
                continue;
            };
            if let Ok(pgid) = i32::try_from(p.info.pid) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            tracing::error!(process = %id, "the monitor of a background process failed; its group was killed");
            p.info.state = ProcessState::Failed;
            p.info.ended_at = Some(crate::ids::now_iso());
            p.ended = Some(Instant::now());
            let event = opta_protocol::Event::BackgroundStatus(opta_protocol::BackgroundStatus {
                process: p.info.clone(),
                reason: "monitor-failed".to_owned(),
                previous_state: Some(ProcessState::Running),
                signal: Some("SIGKILL".to_owned()),
            });
            let session = p.session.clone();
            let ended = WriteOp::EndProcess {
                process_id: id.clone(),
            };
            if let Err(e) = self.ctx.store.write(vec![ended]).await {
                tracing::warn!(error = %e, "could not record a background process's end");
            }
            // Its session learns it ended (and may be evicted again).
            if let Err(e) = session.background(event, Some((id, false))).await {
                tracing::warn!(error = %e, "could not report a failed monitor");
            }
        }
    }

    fn find(&self, id: &str) -> Result<&Proc> {
        self.procs
            .get(id)
            .ok_or_else(|| Error::ProcessNotFound(id.to_owned()))
    }

    async fn start(&mut self, spec: StartSpec) -> Result<BackgroundProcess> {
        let running = self
            .procs
            .values()
            .filter(|p| p.info.state == ProcessState::Running)
            .count();
        let max = self.ctx.background.max_running;
        if running >= max {
            return Err(Error::ProcessLimit(max));
        }
        let id = crate::ids::new_process_id();
        let started = monitor::spawn(&id, &spec, self.tx.clone(), &self.ctx).await?;
        let info = started.info.clone();
        // Recorded, so a daemon killed with -9 finds the group at its next start.
        let record = WriteOp::InsertProcess {
            process_id: id.clone(),
            session_id: info.session_id.to_string(),
            pgid: i64::from(info.pid),
            start_ticks: monitor::start_ticks(info.pid).unwrap_or(0),
            record: serde_json::to_string(&info)
                .map_err(|e| Error::Internal(format!("process record: {e}")))?,
        };
        if let Err(e) = self.ctx.store.write(vec![record]).await {
            // Unrecorded, it could outlive a crash unnoticed: it does not run at all.
            let _ = started.control.try_send(KillSignal::Kill);
            return Err(e);
        }
        self.procs.insert(
            id,
            Proc {
                info: started.info,
                started: Instant::now(),
                ended: None,
                chunks: VecDeque::new(),
                bytes: 0,
                control: started.control,
                monitor: started.monitor,
                session: spec.session.clone(),
            },
        );
        Ok(info)
    }

    /// Terminates every running group, then waits (bounded) for the monitors to report.
    async fn shutdown(&mut self, commands: &mut mpsc::Receiver<RunnerCommand>) {
        for p in self.procs.values() {
            if p.info.state == ProcessState::Running {
                let _ = p.control.try_send(KillSignal::Term);
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        let mut monitors: Vec<_> = self
            .procs
            .values_mut()
            .map(|p| std::mem::replace(&mut p.monitor, tokio::spawn(async {})))
            .collect();
        // Monitors send their chunks and ends here while they finish: keep taking them.
        let all = futures_util::future::join_all(monitors.iter_mut());
        tokio::pin!(all);
        loop {
            tokio::select! {
                _ = &mut all => break,
                command = commands.recv() => {
                    if let Some(RunnerCommand::Ended { process }) = command
                        && let Some(p) = self.procs.get_mut(&process.process_id)
                    {
                        p.info = process;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("background processes did not report their end in time");
                    break;
                }
            }
        }
    }
}

impl Proc {
    /// The record with its runtime as of now.
    fn now(&self) -> BackgroundProcess {
        let mut info = self.info.clone();
        if info.state == ProcessState::Running {
            info.runtime_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        }
        info
    }

    fn keep(&mut self, chunk: OutputChunk, cap: usize) {
        self.bytes += chunk.text.len();
        self.chunks.push_back(chunk);
        while self.bytes > cap {
            match self.chunks.pop_front() {
                Some(old) => self.bytes -= old.text.len(),
                None => break,
            }
        }
    }

    fn output(
        &self,
        after: u64,
        limit: usize,
        stream: Option<OutputStream>,
    ) -> BackgroundOutputResponse {
        let mut matching = self
            .chunks
            .iter()
            .filter(|c| c.seq > after && stream.is_none_or(|s| s == c.stream));
        let chunks: Vec<OutputChunk> = matching.by_ref().take(limit).cloned().collect();
        let has_more = matching.next().is_some();
        let next_seq = chunks.last().map_or(after, |c| c.seq);
        BackgroundOutputResponse {
            process: self.now(),
            chunks,
            next_seq,
            has_more,
        }
    }
}

/// At start: stops the groups of background processes a previous run of the daemon started
/// and never saw end (it was killed with -9, or the machine lost power), and reports each to
/// its session as `killed` with reason `daemon-restart`. A group is signalled only when its
/// leader's start time proves it is still that process (a pid may have been reused).
pub async fn recover(ctx: &DaemonContext, registry: &Registry) -> Result<()> {
    for (id, session, pgid, ticks, record) in ctx.store.unended_processes().await? {
        let still_ours = u32::try_from(pgid)
            .ok()
            .and_then(monitor::start_ticks)
            .is_some_and(|now| now == ticks && ticks != 0);
        if still_ours && let Ok(pgid) = i32::try_from(pgid) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        ctx.store
            .write(vec![WriteOp::EndProcess {
                process_id: id.clone(),
            }])
            .await?;
        let Ok(mut process) = serde_json::from_str::<BackgroundProcess>(&record) else {
            tracing::warn!(process = %id, "unreadable process record");
            continue;
        };
        process.state = ProcessState::Killed;
        process.ended_at = Some(crate::ids::now_iso());
        let event = opta_protocol::Event::BackgroundStatus(opta_protocol::BackgroundStatus {
            process,
            reason: "daemon-restart".to_owned(),
            previous_state: Some(ProcessState::Running),
            signal: still_ours.then(|| "SIGKILL".to_owned()),
        });
        let Ok(session_id) = SessionId::parse(&session) else {
            continue;
        };
        match registry.get(session_id).await {
            Ok(handle) => {
                if let Err(e) = handle.background(event, Some((id.clone(), false))).await {
                    tracing::warn!(process = %id, error = %e, "could not report a process the restart stopped");
                }
            }
            Err(e) => {
                tracing::warn!(process = %id, error = %e, "the session of a stopped process is gone")
            }
        }
        tracing::info!(process = %id, killed = still_ours, "background process of the previous run stopped");
    }
    Ok(())
}
