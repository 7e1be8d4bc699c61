//! One background process's monitor: it owns the child, reads its output, stops it on
//! request or timeout (the whole group, escalating to SIGKILL), and reports every step.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use opta_protocol::{
    BackgroundOutput, BackgroundProcess, BackgroundStatus, Event, KillSignal, OutputChunk,
    OutputStream, ProcessState,
};
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;

use super::{RunnerCommand, StartSpec};
use crate::context::DaemonContext;
use crate::error::{Error, Result};
use crate::ids::now_iso;
use crate::session::SessionHandle;

/// After SIGTERM or SIGINT, the group gets this long before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// After a timeout's SIGTERM, the group gets this long before SIGKILL.
const TIMEOUT_GRACE: Duration = Duration::from_secs(3);
/// Bytes read at a time: one chunk (one event) per read.
const READ_SIZE: usize = 64 * 1024;

pub(super) struct Started {
    pub info: BackgroundProcess,
    pub control: mpsc::Sender<KillSignal>,
    pub monitor: tokio::task::JoinHandle<()>,
}

/// Starts `sh -c` in its own process group and its monitor.
pub(super) async fn spawn(
    id: &str,
    spec: &StartSpec,
    runner: mpsc::Sender<RunnerCommand>,
    ctx: &Arc<DaemonContext>,
) -> Result<Started> {
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(&spec.command)
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for name in &ctx.agent.command.env_remove {
        command.env_remove(name);
    }
    let cell = ctx
        .containment
        .prepare(&mut command)
        .map_err(|e| Error::Internal(format!("could not give the process its cgroup: {e}")))?;
    let spawned = if spec.sandboxed {
        ctx.sandbox.spawn(command, &spec.workspace).await
    } else {
        command.spawn()
    };
    let mut child = spawned.map_err(|e| Error::Internal(format!("could not start sh: {e}")))?;
    let pid = child.id().unwrap_or(0);
    let info = BackgroundProcess {
        process_id: id.to_owned(),
        session_id: spec.session_id.clone(),
        pid,
        command: spec.command.clone(),
        label: spec.label.clone(),
        cwd: spec.cwd.display().to_string(),
        state: ProcessState::Running,
        exit_code: None,
        started_at: now_iso(),
        ended_at: None,
        runtime_ms: 0,
        timeout_ms: spec
            .timeout
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        dropped_bytes: 0,
    };
    let (control, control_rx) = mpsc::channel(4);
    let (chunks_tx, chunks) = mpsc::channel(64);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(read_stream(out, OutputStream::Stdout, chunks_tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(read_stream(err, OutputStream::Stderr, chunks_tx));
    }
    let monitor = Monitor {
        info: info.clone(),
        group: i32::try_from(pid)
            .ok()
            .filter(|p| *p > 0)
            .map(Pid::from_raw),
        session: spec.session.clone(),
        cell,
        runner,
        seq: 0,
        started: std::time::Instant::now(),
        evented: 0,
        event_cap: ctx.background.output_cap_bytes,
        panics: ctx
            .faults
            .monitor_panics_on
            .is_some_and(|f| f(&spec.command)),
    };
    let task = tokio::spawn(monitor.run(child, chunks, control_rx, spec.timeout));
    Ok(Started {
        info,
        control,
        monitor: task,
    })
}

async fn read_stream(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    stream: OutputStream,
    chunks: mpsc::Sender<(OutputStream, String)>,
) {
    use futures_util::FutureExt as _;
    let mut buf = vec![0u8; READ_SIZE];
    // Bytes of a character the last read cut in two, kept for the next.
    let mut carried = 0;
    loop {
        let mut filled = carried;
        let mut ended = false;
        match reader.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => ended = true,
            Ok(n) => filled += n,
        }
        // What is there already joins this chunk: a chatty process makes few large events.
        while !ended && filled < buf.len() {
            match reader.read(&mut buf[filled..]).now_or_never() {
                Some(Ok(0) | Err(_)) => ended = true,
                Some(Ok(n)) => filled += n,
                None => break,
            }
        }
        carried = if ended {
            0
        } else {
            incomplete_tail(&buf[..filled])
        };
        let complete = filled - carried;
        if complete > 0 {
            let text = String::from_utf8_lossy(&buf[..complete]).into_owned();
            if chunks.send((stream, text)).await.is_err() {
                return;
            }
        }
        if ended {
            return;
        }
        buf.copy_within(complete..filled, 0);
    }
}

/// How many bytes at the end of `bytes` begin a UTF-8 character that is not complete yet
/// (0 to 3).
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if byte & 0xC0 == 0x80 {
            continue; // a continuation byte: the lead is further back
        }
        let needs = match byte {
            0xF0..=0xFF => 4,
            0xE0..=0xEF => 3,
            0xC0..=0xDF => 2,
            _ => 1,
        };
        return if needs > back { back } else { 0 };
    }
    0
}

struct Monitor {
    info: BackgroundProcess,
    group: Option<Pid>,
    /// Its cgroup: a SIGKILL reaches every process it started, those that left the group too;
    /// dropped (the monitor ends), it is emptied and removed.
    cell: crate::process::contain::Cell,
    session: SessionHandle,
    runner: mpsc::Sender<RunnerCommand>,
    seq: u64,
    started: std::time::Instant,
    /// Output bytes sent as `background.output` events so far, and the most there may be.
    evented: usize,
    event_cap: usize,
    /// Injected fault (tests only).
    panics: bool,
}

/// Resolves at `at`; never without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Monitor {
    fn signal(&self, signal: Signal) {
        if let Some(group) = self.group {
            let _ = killpg(group, signal);
        }
        if signal == Signal::SIGKILL {
            self.cell.kill();
        }
    }

    async fn run(
        mut self,
        mut child: tokio::process::Child,
        mut chunks: mpsc::Receiver<(OutputStream, String)>,
        mut control: mpsc::Receiver<KillSignal>,
        timeout: Option<Duration>,
    ) {
        self.status("started", None, None).await;
        if self.panics {
            panic!("injected fault: background monitor panics");
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut ending: Option<(ProcessState, &'static str, String)> = None;
        let mut escalate_at: Option<tokio::time::Instant> = None;
        let mut reading = true;
        let exit = loop {
            tokio::select! {
                biased;
                chunk = chunks.recv(), if reading => match chunk {
                    Some((stream, text)) => self.chunk(stream, text).await,
                    None => reading = false,
                },
                status = child.wait() => break status.ok(),
                Some(signal) = control.recv() => {
                    let sig = match signal {
                        KillSignal::Term => Signal::SIGTERM,
                        KillSignal::Kill => Signal::SIGKILL,
                        KillSignal::Int => Signal::SIGINT,
                    };
                    self.signal(sig);
                    if ending.is_none() {
                        ending = Some((ProcessState::Killed, "killed", signal.as_str().to_owned()));
                    }
                    if sig != Signal::SIGKILL && escalate_at.is_none() {
                        escalate_at = Some(tokio::time::Instant::now() + KILL_GRACE);
                    }
                }
                () = sleep_until(deadline), if ending.is_none() => {
                    self.signal(Signal::SIGTERM);
                    ending = Some((ProcessState::Timeout, "timeout", "SIGTERM".to_owned()));
                    escalate_at = Some(tokio::time::Instant::now() + TIMEOUT_GRACE);
                }
                () = sleep_until(escalate_at) => {
                    self.signal(Signal::SIGKILL);
                    escalate_at = None;
                    if let Some((_, _, signal)) = &mut ending {
                        *signal = "SIGKILL".to_owned();
                    }
                }
            }
        };
        // The process is gone; whatever it started in its group goes with it, and its output
        // still in the pipes is read (bounded: a pipe held open elsewhere cannot stall us).
        self.signal(Signal::SIGKILL);
        let drain = async {
            while let Some((stream, text)) = chunks.recv().await {
                self.chunk(stream, text).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        let code = exit.and_then(|s| s.code());
        let (state, reason, signal) = match ending {
            Some((state, reason, signal)) => (state, reason, Some(signal)),
            None if exit.is_some_and(|s| s.success()) => (ProcessState::Completed, "exited", None),
            None => (ProcessState::Failed, "exited", None),
        };
        self.info.state = state;
        self.info.exit_code = code;
        self.info.ended_at = Some(now_iso());
        self.info.runtime_ms =
            u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let _ = self
            .runner
            .send(RunnerCommand::Ended {
                process: self.info.clone(),
            })
            .await;
        self.status(reason, Some(ProcessState::Running), signal)
            .await;
    }

    /// Keeps a chunk in the runner's tail (for the output route) and sends it as a
    /// `background.output` event while the process is within its event cap; past it, events
    /// stop (live and stored alike) and one `background.status` with reason `output-capped`
    /// says so.
    async fn chunk(&mut self, stream: OutputStream, text: String) {
        self.seq += 1;
        let ts = now_iso();
        let room = self.event_cap.saturating_sub(self.evented);
        let mut sent = text.len().min(room);
        while !text.is_char_boundary(sent) {
            sent -= 1;
        }
        let was_capped = self.info.dropped_bytes > 0;
        self.info.dropped_bytes += (text.len() - sent) as u64;
        // The event's copy first (only what fits under the cap); the chunk itself moves on
        // to the runner's tail, so a capped process copies nothing per chunk.
        let evented = (sent > 0).then(|| text[..sent].to_owned());
        let _ = self
            .runner
            .send(RunnerCommand::Chunk {
                id: self.info.process_id.clone(),
                chunk: OutputChunk {
                    seq: self.seq,
                    stream,
                    text,
                    ts: ts.clone(),
                },
                dropped_bytes: self.info.dropped_bytes,
            })
            .await;
        if let Some(text) = evented {
            self.evented += text.len();
            let event = Event::BackgroundOutput(BackgroundOutput {
                process_id: self.info.process_id.clone(),
                session_id: self.info.session_id.clone(),
                pid: self.info.pid,
                seq: self.seq,
                ts,
                stream,
                text,
            });
            if let Err(e) = self.session.background(event, None).await {
                tracing::debug!(process = %self.info.process_id, error = %e, "output not recorded");
            }
        }
        if !was_capped && self.info.dropped_bytes > 0 {
            self.status("output-capped", Some(ProcessState::Running), None)
                .await;
        }
    }

    async fn status(
        &mut self,
        reason: &str,
        previous: Option<ProcessState>,
        signal: Option<String>,
    ) {
        let running = self.info.state == ProcessState::Running;
        let event = Event::BackgroundStatus(BackgroundStatus {
            process: self.info.clone(),
            reason: reason.to_owned(),
            previous_state: previous,
            signal,
        });
        let process = (self.info.process_id.clone(), running);
        if let Err(e) = self.session.background(event, Some(process)).await {
            tracing::warn!(process = %self.info.process_id, error = %e, "status not recorded");
        }
    }
}

/// The kernel's start time of `pid` in clock ticks since boot (`/proc/PID/stat` field 22),
/// which tells a process from a later one that reused its pid.
pub(crate) fn start_ticks(pid: u32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let after_name = stat.rsplit_once(')')?.1;
    after_name.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::incomplete_tail;

    #[test]
    fn a_cut_character_waits_for_its_rest() {
        let crab = "🦀".as_bytes();
        assert_eq!(incomplete_tail(b"plain"), 0);
        assert_eq!(incomplete_tail("ab€".as_bytes()), 0);
        assert_eq!(incomplete_tail(&crab[..1]), 1);
        assert_eq!(incomplete_tail(&crab[..3]), 3);
        assert_eq!(incomplete_tail(&[b'a', crab[0], crab[1]]), 2);
        // Not UTF-8 at all: nothing is held back (it decodes as replacement characters).
        assert_eq!(incomplete_tail(&[0x80, 0x80, 0x80, 0x80]), 0);
        assert_eq!(incomplete_tail(&[]), 0);
    }
}
