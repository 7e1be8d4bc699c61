//! Read queries, run on reader threads through [`Store::read`].

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};

use super::{SessionRow, Store, TurnRow, TurnState};
use crate::error::{Error, Result};

/// Everything needed to bring a stored session back into memory.
#[derive(Debug, Clone)]
pub struct LoadedSession {
    /// Metadata row.
    pub row: SessionRow,
    /// History as stored message JSON, in order.
    pub messages: Vec<String>,
    /// Highest seq used.
    pub last_seq: u64,
    /// Turns still queued or running, in queue order.
    pub open_turns: Vec<TurnRow>,
    /// Idempotency key → turn id for every turn of the session.
    pub idempotency: HashMap<String, String>,
    /// Text streamed so far by each running turn (from its stored token events).
    pub running: HashMap<String, RunningTrace>,
}

/// What a turn that was running when the daemon stopped left behind.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RunningTrace {
    /// Its text since its last tool call (earlier rounds' text is in the history).
    pub text: String,
    /// Calls started and never ended: (id, name).
    pub open_tools: Vec<(String, String)>,
    /// A permission request never resolved: its id.
    pub open_permission: Option<String>,
}

impl RunningTrace {
    fn apply(&mut self, event: &str, payload: &serde_json::Value) {
        let field = |k: &str| {
            payload
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned()
        };
        match event {
            "turn.token" => self.text.push_str(&field("text")),
            "tool.start" => {
                self.text.clear();
                self.open_tools.push((field("id"), field("name")));
            }
            "tool.end" => {
                let id = field("id");
                self.open_tools.retain(|(open, _)| *open != id);
            }
            "permission.request" => self.open_permission = Some(field("requestId")),
            "permission.resolved" => self.open_permission = None,
            _ => {}
        }
    }
}

/// One page of stored sessions.
#[derive(Debug, Clone)]
pub struct SessionPage {
    /// Rows, most recently updated first.
    pub rows: Vec<SessionRow>,
    /// Whether more rows follow.
    pub has_more: bool,
}

fn session_row(conn: &Connection, id: &str) -> Result<Option<SessionRow>> {
    Ok(conn
        .prepare_cached(
            "SELECT id, model, title, metadata, created_at, updated_at, tool_call_count, grants,
             workspace_pin FROM sessions WHERE id = ?1",
        )?
        .query_row(params![id], map_session_row)
        .optional()?)
}

fn map_session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRow> {
    Ok(SessionRow {
        id: r.get(0)?,
        model: r.get(1)?,
        title: r.get(2)?,
        metadata: r.get(3)?,
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
        tool_call_count: r.get(6)?,
        grants: r.get(7).ok().flatten(),
        workspace_pin: r.get(8).ok().flatten(),
    })
}

fn parse_turn_state(s: &str) -> rusqlite::Result<TurnState> {
    Ok(match s {
        "queued" => TurnState::Queued,
        "running" => TurnState::Running,
        "done" => TurnState::Done,
        "failed" => TurnState::Failed,
        "cancelled" => TurnState::Cancelled,
        "interrupted" => TurnState::Interrupted,
        other => {
            return Err(rusqlite::Error::FromSqlConversionFailure(
                0,
                rusqlite::types::Type::Text,
                format!("unknown turn state {other:?}").into(),
            ));
        }
    })
}

/// A client's seq as an SQLite integer: beyond `i64::MAX` no seq can exist, so such a bound
/// means "after everything" and clamps rather than failing the query.
fn seq_bound(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Envelopes of a session with `after < seq <= up_to`, ascending.
fn select_events(
    conn: &Connection,
    session_id: &str,
    after: u64,
    up_to: u64,
) -> Result<Vec<(u64, Arc<str>)>> {
    Ok(conn
        .prepare_cached(
            "SELECT seq, envelope FROM events WHERE session_id = ?1 AND seq > ?2 AND seq <= ?3
             ORDER BY seq",
        )?
        .query_map(
            params![session_id, seq_bound(after), seq_bound(up_to)],
            |r| {
                Ok((
                    r.get::<_, u64>(0)?,
                    Arc::<str>::from(r.get::<_, String>(1)?),
                ))
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?)
}

impl Store {
    /// Loads a session with its history and open turns; `None` when it does not exist.
    pub async fn load_session(&self, id: String) -> Result<Option<LoadedSession>> {
        self.read(move |conn| {
            let Some(row) = session_row(conn, &id)? else {
                return Ok(None);
            };
            let messages = conn
                .prepare_cached("SELECT body FROM messages WHERE session_id = ?1 ORDER BY idx")?
                .query_map(params![id], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let last_seq: u64 = conn
                .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM events WHERE session_id = ?1")?
                .query_row(params![id], |r| r.get(0))?;
            let open_turns = conn
                .prepare_cached(
                    "SELECT turn_id, session_id, writer_id, client_id, content, mode, metadata,
                     overrides, idempotency_key, state, queued_seq, created_at
                     FROM turns WHERE session_id = ?1 AND state IN ('queued', 'running')
                     ORDER BY queued_seq",
                )?
                .query_map(params![id], |r| {
                    Ok(TurnRow {
                        turn_id: r.get(0)?,
                        session_id: r.get(1)?,
                        writer_id: r.get(2)?,
                        client_id: r.get(3)?,
                        content: r.get(4)?,
                        mode: r.get(5)?,
                        metadata: r.get(6)?,
                        overrides: r.get(7)?,
                        idempotency_key: r.get(8)?,
                        state: parse_turn_state(&r.get::<_, String>(9)?)?,
                        queued_seq: r.get(10)?,
                        created_at: r.get(11)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let idempotency = conn
                .prepare_cached(
                    "SELECT idempotency_key, turn_id FROM turns
                     WHERE session_id = ?1 AND idempotency_key IS NOT NULL",
                )?
                .query_map(params![id], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<HashMap<String, String>>>()?;
            let mut running = HashMap::new();
            for turn in open_turns.iter().filter(|t| t.state == TurnState::Running) {
                let mut trace = RunningTrace::default();
                let mut stmt = conn.prepare_cached(
                    "SELECT event, envelope FROM events WHERE session_id = ?1 AND turn_id = ?2
                     AND event IN ('turn.token', 'tool.start', 'tool.end',
                                   'permission.request', 'permission.resolved')
                     ORDER BY seq",
                )?;
                let rows = stmt.query_map(params![id, turn.turn_id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })?;
                for row in rows {
                    let (event, env) = row?;
                    let parsed: serde_json::Value = serde_json::from_str(&env)
                        .map_err(|e| Error::Storage(format!("corrupt event: {e}")))?;
                    trace.apply(&event, &parsed["payload"]);
                }
                running.insert(turn.turn_id.clone(), trace);
            }
            Ok(Some(LoadedSession {
                row,
                messages,
                last_seq,
                open_turns,
                idempotency,
                running,
            }))
        })
        .await
    }

    /// Stored envelopes of a session with `after < seq <= up_to`, ascending; `None` when the
    /// session does not exist.
    pub async fn events_after(
        &self,
        session_id: String,
        after: u64,
        up_to: u64,
    ) -> Result<Option<Vec<(u64, Arc<str>)>>> {
        self.read(move |conn| {
            if session_row(conn, &session_id)?.is_none() {
                return Ok(None);
            }
            select_events(conn, &session_id, after, up_to).map(Some)
        })
        .await
    }

    /// Every stored envelope of a session after `after`, with the highest stored seq: the
    /// list ends exactly there, so a subscription from that seq misses nothing. `None` when
    /// the session does not exist.
    pub async fn events_to_last(
        &self,
        session_id: String,
        after: u64,
    ) -> Result<Option<(Vec<(u64, Arc<str>)>, u64)>> {
        self.read(move |conn| {
            if session_row(conn, &session_id)?.is_none() {
                return Ok(None);
            }
            // Read the bound first: events committed meanwhile lie beyond it, not in between.
            let last: u64 = conn
                .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM events WHERE session_id = ?1")?
                .query_row(params![session_id], |r| r.get(0))?;
            let events = select_events(conn, &session_id, after, last)?;
            Ok(Some((events, last)))
        })
        .await
    }

    /// A page of sessions ordered by `(updated_at, id)` descending, starting after `cursor`.
    pub async fn list_sessions(
        &self,
        limit: usize,
        cursor: Option<(String, String)>,
    ) -> Result<SessionPage> {
        self.read(move |conn| {
            let fetch = (limit + 1) as i64;
            let mut rows = match cursor {
                Some((updated_at, id)) => conn
                    .prepare_cached(
                        "SELECT id, model, title, metadata, created_at, updated_at, tool_call_count
                         FROM sessions WHERE (updated_at, id) < (?1, ?2)
                         ORDER BY updated_at DESC, id DESC LIMIT ?3",
                    )?
                    .query_map(params![updated_at, id, fetch], map_session_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?,
                None => conn
                    .prepare_cached(
                        "SELECT id, model, title, metadata, created_at, updated_at, tool_call_count
                         FROM sessions ORDER BY updated_at DESC, id DESC LIMIT ?1",
                    )?
                    .query_map(params![fetch], map_session_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?,
            };
            let has_more = rows.len() > limit;
            rows.truncate(limit);
            Ok(SessionPage { rows, has_more })
        })
        .await
    }

    /// Ids of sessions with queued or running turns (to resume after a restart).
    pub async fn sessions_with_open_turns(&self) -> Result<Vec<String>> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT DISTINCT session_id FROM turns WHERE state IN ('queued', 'running')",
                )?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?)
        })
        .await
    }

    /// Whether session `session_id`'s log records a `permission.resolved` for `request_id`
    /// (decided before the session was last loaded: after an eviction or a restart).
    pub async fn permission_was_decided(
        &self,
        session_id: String,
        request_id: String,
    ) -> Result<bool> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(PERMISSION_DECIDED)?
                .query_row(rusqlite::params![session_id, request_id], |r| r.get(0))?)
        })
        .await
    }

    /// Background processes a previous run started and never saw end:
    /// `(process_id, session_id, pgid, start_ticks, record JSON)`.
    pub async fn unended_processes(&self) -> Result<Vec<(String, String, i64, i64, String)>> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT process_id, session_id, pgid, start_ticks, record
                     FROM processes WHERE ended = 0",
                )?
                .query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Up to `limit` ended background processes whose output events are still stored and
    /// that ended at or before `ended_before`: `(session_id, process_id)`.
    pub async fn processes_to_sweep(
        &self,
        ended_before: &str,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        let ended_before = ended_before.to_owned();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT session_id, process_id FROM processes
                     WHERE ended = 1 AND output_pruned = 0 AND ended_at <= ?1
                     ORDER BY ended_at LIMIT ?2",
                )?
                .query_map(params![ended_before, limit as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Up to `limit` finished turns not yet swept that finished at or before
    /// `finished_before`, oldest first: `(session_id, turn_id, queued_seq)`.
    pub async fn turns_to_sweep(
        &self,
        finished_before: &str,
        limit: usize,
    ) -> Result<Vec<(String, String, u64)>> {
        let cutoff = finished_before.to_owned();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT session_id, turn_id, queued_seq FROM turns
                     WHERE deltas_pruned = 0 AND finished_at IS NOT NULL AND finished_at <= ?1
                     ORDER BY finished_at LIMIT ?2",
                )?
                .query_map(params![cutoff, limit as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Number of stored sessions.
    pub async fn session_count(&self) -> Result<u64> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT COUNT(*) FROM sessions")?
                .query_row([], |r| r.get(0))?)
        })
        .await
    }
}

/// Whether a session's log holds a `permission.resolved` of a request id: one lookup in the
/// index `events_permission_decided` (its expression and condition, word for word; without
/// statistics the planner would take the primary key and read the session's whole log).
pub(super) const PERMISSION_DECIDED: &str = "SELECT EXISTS (SELECT 1
     FROM events INDEXED BY events_permission_decided
     WHERE session_id = ?1 AND event = 'permission.resolved'
       AND json_extract(envelope, '$.payload.requestId') = ?2)";
