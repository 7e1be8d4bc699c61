//! The single writer thread: drains whatever batches are waiting, commits them in one
//! transaction (each batch in its own savepoint so one bad batch fails alone), then acks.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::oneshot;

use super::WriteOp;
use crate::error::{Error, Result};

/// Upper bound of batches folded into one commit, so acks are not held back for long.
const MAX_BATCHES_PER_COMMIT: usize = 512;

pub(super) enum WriterMsg {
    Batch {
        ops: Vec<WriteOp>,
        ack: oneshot::Sender<Result<()>>,
    },
    Shutdown {
        ack: oneshot::Sender<Result<()>>,
    },
}

/// The write-ahead log and the size at which the writer checkpoints and truncates it.
pub(super) struct WalLimit {
    pub path: std::path::PathBuf,
    pub max_bytes: u64,
    /// The last truncation was held off (a reader on old frames, or the checkpointer's own
    /// passive checkpoint): the next ones do not wait.
    pub held_off: bool,
}

/// How long a truncation waits for readers of old frames, on the commit path, the first
/// time; while it stays held off, later tries do not wait at all.
const TRUNCATE_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

impl WalLimit {
    /// Checkpoints the whole log into the database and truncates it once it has outgrown its
    /// limit. Run between commits by the only writer, so no frame is appended meanwhile and
    /// the checkpoint can reach the log's end. Readers still reading old frames (a long
    /// replay), or the checkpointer's passive checkpoint, make it wait at most
    /// [`TRUNCATE_WAIT`]; while they hold it off, it is tried again after every commit
    /// without waiting (a few lock attempts: the frames up to the readers' mark are copied
    /// once), so a long read never stalls the commits behind it and the log is truncated at
    /// the first commit after it ends (a one-second back-off let a busy checkpointer grow
    /// the log by a second of commits).
    fn enforce(&mut self, conn: &Connection) {
        let size = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        if size <= self.max_bytes {
            return;
        }
        let wait = if self.held_off {
            std::time::Duration::ZERO
        } else {
            TRUNCATE_WAIT
        };
        let _ = conn.busy_timeout(wait);
        // One row: (busy, log frames, checkpointed frames); busy = 1 when readers held it off.
        // (busy, log frames, checkpointed frames): busy = 1 when it could not finish; the
        // frame counts are -1 when it could not run at all, which is another connection (the
        // checkpointer's passive checkpoint) holding the checkpoint lock.
        let truncate = || {
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            })
        };
        let mut result = truncate();
        // SQLite never waits for the checkpoint lock, and a loaded machine can make the
        // checkpointer's run slow enough for the log to grow many times its limit meanwhile:
        // past 4x, the commits wait for it (briefly: it always ends), unlike a long reader,
        // which they never wait for.
        let mut tries = 0;
        while matches!(result, Ok((1, -1))) && size > 4 * self.max_bytes && tries < 100 {
            std::thread::sleep(std::time::Duration::from_millis(5));
            result = truncate();
            tries += 1;
        }
        let result = result.map(|(busy, _)| busy);
        match result {
            Ok(0) => self.held_off = false,
            Ok(_) => self.held_off = true,
            Err(e) => {
                if !self.held_off {
                    tracing::warn!(error = %e, wal_bytes = size, "could not truncate the write-ahead log");
                }
                self.held_off = true;
            }
        }
        let _ = conn.busy_timeout(super::BUSY_TIMEOUT);
    }
}

/// Runs until shutdown; sets `dirty` after every commit so the checkpointer knows, and keeps
/// the write-ahead log within `wal`.
pub(super) fn run(
    mut conn: Connection,
    rx: crossbeam_channel::Receiver<WriterMsg>,
    dirty: &AtomicBool,
    full_disk_fault: Option<&AtomicI64>,
    wal: &mut WalLimit,
) {
    let mut pending: Vec<(Vec<WriteOp>, oneshot::Sender<Result<()>>)> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut shutdown = None;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                WriterMsg::Batch { ops, ack } => pending.push((ops, ack)),
                WriterMsg::Shutdown { ack } => {
                    shutdown = Some(ack);
                    break;
                }
            }
            if pending.len() >= MAX_BATCHES_PER_COMMIT {
                break;
            }
            next = rx.try_recv().ok();
        }
        if let Some(budget) = full_disk_fault {
            inject_full_disk(budget, &mut pending);
        }
        if !pending.is_empty() {
            commit_batches(&mut conn, &mut pending);
            dirty.store(true, Ordering::Relaxed);
            wal.enforce(&conn);
        }
        if let Some(ack) = shutdown {
            let result = conn
                .pragma_update(None, "wal_checkpoint", "TRUNCATE")
                .map_err(Error::from);
            let _ = ack.send(result);
            return;
        }
    }
}

/// Fails the batches beyond the fault's commit budget as a full disk would.
fn inject_full_disk(
    budget: &AtomicI64,
    pending: &mut Vec<(Vec<WriteOp>, oneshot::Sender<Result<()>>)>,
) {
    let mut kept = Vec::with_capacity(pending.len());
    for (ops, ack) in pending.drain(..) {
        let healthy = budget.load(Ordering::SeqCst) < 0
            || budget
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                    (b > 0).then(|| b - 1)
                })
                .is_ok();
        if healthy {
            kept.push((ops, ack));
        } else {
            let _ = ack.send(Err(Error::StorageFull("injected fault: disk full".into())));
        }
    }
    *pending = kept;
}

/// Commits `pending` in one transaction and acks each batch with its own outcome.
///
/// Batches almost never fail, so they are first applied straight into the transaction; only
/// when one fails is it rolled back and redone with each batch in a savepoint, so that the
/// failing batch fails alone. (A savepoint per batch costs two statements and sub-journal
/// writes: a fifth of the writer's time when many sessions commit at once.)
fn commit_batches(
    conn: &mut Connection,
    pending: &mut Vec<(Vec<WriteOp>, oneshot::Sender<Result<()>>)>,
) {
    match apply_and_commit(conn, pending) {
        Ok(results) => {
            for ((_, ack), result) in pending.drain(..).zip(results) {
                let _ = ack.send(result);
            }
        }
        Err(err) => {
            tracing::error!(error = %err, "store commit failed");
            for (_, ack) in pending.drain(..) {
                let _ = ack.send(Err(clone_error(&err)));
            }
        }
    }
}

/// Each batch's outcome once committed, or the error that failed the whole transaction.
fn apply_and_commit(
    conn: &mut Connection,
    pending: &[(Vec<WriteOp>, oneshot::Sender<Result<()>>)],
) -> Result<Vec<Result<()>>> {
    let tx = conn.transaction()?;
    let applied = pending
        .iter()
        .flat_map(|(ops, _)| ops)
        .try_for_each(|op| apply(&tx, op));
    match applied {
        Ok(()) => {
            tx.commit()?;
            Ok(pending.iter().map(|_| Ok(())).collect())
        }
        Err(e) if pending.len() == 1 => {
            tracing::error!(error = %e, "store write failed; batch rolled back");
            drop(tx);
            Ok(vec![Err(e)])
        }
        Err(_) => {
            drop(tx);
            let mut tx = conn.transaction()?;
            let results = pending
                .iter()
                .map(|(ops, _)| apply_in_savepoint(&mut tx, ops))
                .collect();
            tx.commit()?;
            Ok(results)
        }
    }
}

fn clone_error(e: &Error) -> Error {
    match e {
        Error::StorageFull(m) => Error::StorageFull(m.clone()),
        other => Error::Storage(other.to_string()),
    }
}

fn apply_in_savepoint(tx: &mut Transaction<'_>, ops: &[WriteOp]) -> Result<()> {
    let mut sp = tx.savepoint()?;
    for op in ops {
        if let Err(e) = apply(&sp, op) {
            tracing::error!(error = %e, "store write failed; batch rolled back");
            sp.rollback()?;
            return Err(e);
        }
    }
    sp.commit()?;
    Ok(())
}

fn apply(conn: &Connection, op: &WriteOp) -> Result<()> {
    match op {
        WriteOp::InsertSession(row) => {
            conn.prepare_cached(
                "INSERT INTO sessions (id, model, title, metadata, created_at, updated_at,
                 tool_call_count, workspace_pin)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                row.id,
                row.model,
                row.title,
                row.metadata,
                row.created_at,
                row.updated_at,
                row.tool_call_count,
                row.workspace_pin
            ])?;
        }
        WriteOp::InsertProcess {
            process_id,
            session_id,
            pgid,
            start_ticks,
            record,
        } => {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO processes (process_id, session_id, pgid, start_ticks, record)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![process_id, session_id, pgid, start_ticks, record])?;
        }
        WriteOp::EndProcess { process_id } => {
            conn.prepare_cached(
                "UPDATE processes SET ended = 1, ended_at = ?2 WHERE process_id = ?1 AND ended = 0",
            )?
            .execute(params![process_id, crate::ids::now_iso()])?;
        }
        WriteOp::PruneProcessOutput {
            session_id,
            process_id,
        } => {
            conn.prepare_cached(
                "DELETE FROM events WHERE session_id = ?1 AND turn_id = ?2
                 AND event = 'background.output'",
            )?
            .execute(params![session_id, process_id])?;
            conn.prepare_cached("UPDATE processes SET output_pruned = 1 WHERE process_id = ?1")?
                .execute(params![process_id])?;
        }
        WriteOp::SetWorkspacePin { session_id, pin } => {
            conn.prepare_cached("UPDATE sessions SET workspace_pin = ?2 WHERE id = ?1")?
                .execute(params![session_id.as_ref(), pin])?;
        }
        WriteOp::SetGrants { session_id, grants } => {
            conn.prepare_cached("UPDATE sessions SET grants = ?2 WHERE id = ?1")?
                .execute(params![session_id.as_ref(), grants])?;
        }
        WriteOp::UpdateSession(row) => {
            conn.prepare_cached(
                "UPDATE sessions SET model = ?2, title = ?3, metadata = ?4, updated_at = ?5,
                 tool_call_count = ?6 WHERE id = ?1",
            )?
            .execute(params![
                row.id,
                row.model,
                row.title,
                row.metadata,
                row.updated_at,
                row.tool_call_count
            ])?;
        }
        WriteOp::AppendEvent {
            session_id,
            seq,
            event,
            turn_id,
            envelope,
        } => {
            conn.prepare_cached(
                "INSERT INTO events (session_id, seq, event, turn_id, envelope) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![&**session_id, seq, event, turn_id, &**envelope])?;
        }
        WriteOp::AppendMessage {
            session_id,
            idx,
            turn_id,
            body,
            partial,
        } => {
            conn.prepare_cached(
                "INSERT INTO messages (session_id, idx, turn_id, body, partial) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![&**session_id, idx, turn_id, body, partial])?;
        }
        WriteOp::InsertTurn(row) => {
            conn.prepare_cached(
                "INSERT INTO turns (turn_id, session_id, writer_id, client_id, content, mode, metadata,
                 overrides, idempotency_key, state, queued_seq, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?
            .execute(params![
                row.turn_id,
                row.session_id,
                row.writer_id,
                row.client_id,
                row.content,
                row.mode,
                row.metadata,
                row.overrides,
                row.idempotency_key,
                row.state.as_str(),
                row.queued_seq,
                row.created_at
            ])?;
        }
        WriteOp::SetTurnState {
            turn_id,
            state,
            finished_at,
        } => {
            conn.prepare_cached(
                "UPDATE turns SET state = ?2, finished_at = ?3 WHERE turn_id = ?1",
            )?
            .execute(params![turn_id, state.as_str(), finished_at])?;
        }
        WriteOp::PruneTurnDeltas {
            session_id,
            turn_id,
            after_seq,
        } => {
            // The turn's events lie between its turn.queued and its terminal event: bound the
            // delete by the latter, or it would scan every later event of the session (all of
            // them, for each turn, when an old database is swept the first time).
            let end: Option<u64> = conn
                .prepare_cached(
                    "SELECT seq FROM events WHERE session_id = ?1 AND seq > ?2 AND turn_id = ?3
                     AND event IN ('turn.done', 'turn.error') ORDER BY seq LIMIT 1",
                )?
                .query_row(params![session_id, after_seq, turn_id], |r| r.get(0))
                .optional()?;
            conn.prepare_cached(
                "DELETE FROM events WHERE session_id = ?1 AND seq > ?2 AND seq < ?3
                 AND turn_id = ?4 AND event IN ('turn.token', 'turn.thinking')",
            )?
            .execute(params![
                session_id,
                after_seq,
                end.unwrap_or(i64::MAX as u64),
                turn_id
            ])?;
            conn.prepare_cached("UPDATE turns SET deltas_pruned = 1 WHERE turn_id = ?1")?
                .execute(params![turn_id])?;
        }
        WriteOp::DropTurnDeltas {
            session_id,
            turn_id,
        } => {
            conn.prepare_cached(
                "DELETE FROM events WHERE session_id = ?1 AND turn_id = ?2
                 AND event IN ('turn.token', 'turn.thinking')",
            )?
            .execute(params![&**session_id, turn_id])?;
        }
        WriteOp::DeleteSession { session_id } => {
            for sql in [
                "DELETE FROM events WHERE session_id = ?1",
                "DELETE FROM messages WHERE session_id = ?1",
                "DELETE FROM turns WHERE session_id = ?1",
                "DELETE FROM processes WHERE session_id = ?1",
                "DELETE FROM sessions WHERE id = ?1",
            ] {
                conn.prepare_cached(sql)?.execute(params![session_id])?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SessionRow;

    fn session(id: &str) -> WriteOp {
        WriteOp::InsertSession(SessionRow {
            id: id.into(),
            model: "m".into(),
            title: None,
            metadata: None,
            created_at: "2026-12-01T00:00:00.000Z".into(),
            updated_at: "2026-12-01T00:00:00.000Z".into(),
            tool_call_count: 0,
            grants: None,
            workspace_pin: None,
        })
    }

    /// Commits `batches` as one writer round; each batch's outcome and the stored ids.
    fn commit(batches: Vec<Vec<WriteOp>>) -> (Vec<bool>, Vec<String>) {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::schema::migrate(&mut conn).unwrap();
        let mut pending = Vec::new();
        let mut acks = Vec::new();
        for ops in batches {
            let (tx, rx) = oneshot::channel();
            pending.push((ops, tx));
            acks.push(rx);
        }
        commit_batches(&mut conn, &mut pending);
        let outcomes = acks
            .into_iter()
            .map(|mut rx| rx.try_recv().unwrap().is_ok())
            .collect();
        let ids = conn
            .prepare("SELECT id FROM sessions ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        (outcomes, ids)
    }

    #[test]
    fn batches_that_all_apply_commit_together() {
        let (outcomes, ids) = commit(vec![vec![session("a")], vec![session("b"), session("c")]]);
        assert_eq!(outcomes, [true, true]);
        assert_eq!(ids, ["a", "b", "c"]);
    }

    #[test]
    fn a_failing_batch_fails_alone_and_the_others_commit() {
        // The middle batch inserts "a" twice: its first insert must not survive either.
        let (outcomes, ids) = commit(vec![
            vec![session("a")],
            vec![session("b"), session("a")],
            vec![session("c")],
        ]);
        assert_eq!(outcomes, [true, false, true]);
        assert_eq!(ids, ["a", "c"]);
        let (outcomes, ids) = commit(vec![vec![session("x"), session("x")]]);
        assert_eq!(outcomes, [false]);
        assert!(ids.is_empty());
    }
}
