//! Numbered schema migrations, tracked in `PRAGMA user_version`.

use rusqlite::Connection;

use crate::error::{Error, Result};

/// Migration `i` moves the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: sessions, messages, events, turns.
    "
    CREATE TABLE sessions (
        id              TEXT PRIMARY KEY,
        model           TEXT NOT NULL,
        title           TEXT,
        metadata        TEXT,
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        tool_call_count INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX sessions_by_updated ON sessions (updated_at DESC, id DESC);

    CREATE TABLE messages (
        session_id TEXT NOT NULL,
        idx        INTEGER NOT NULL,
        turn_id    TEXT,
        body       TEXT NOT NULL,
        partial    INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (session_id, idx)
    ) WITHOUT ROWID;

    CREATE TABLE events (
        session_id TEXT NOT NULL,
        seq        INTEGER NOT NULL,
        event      TEXT NOT NULL,
        turn_id    TEXT,
        envelope   TEXT NOT NULL,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID;

    CREATE TABLE turns (
        turn_id         TEXT PRIMARY KEY,
        session_id      TEXT NOT NULL,
        writer_id       TEXT NOT NULL,
        client_id       TEXT NOT NULL,
        content         TEXT NOT NULL,
        mode            TEXT NOT NULL,
        metadata        TEXT,
        overrides       TEXT,
        idempotency_key TEXT,
        state           TEXT NOT NULL,
        queued_seq      INTEGER NOT NULL,
        created_at      TEXT NOT NULL,
        finished_at     TEXT
    );
    CREATE INDEX turns_by_session ON turns (session_id, queued_seq);
    CREATE UNIQUE INDEX turns_idempotency ON turns (session_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX turns_open ON turns (state) WHERE state IN ('queued', 'running');
    ",
    // 2: finished turns whose token/thinking events are still stored, oldest first, for the
    // delta sweeper (turns finished before this migration are swept once).
    "
    ALTER TABLE turns ADD COLUMN deltas_pruned INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX turns_unswept ON turns (finished_at)
        WHERE deltas_pruned = 0 AND finished_at IS NOT NULL;
    ",
    "
    ALTER TABLE sessions ADD COLUMN grants TEXT;
    ",
    "
    CREATE TABLE processes (
        process_id  TEXT PRIMARY KEY,
        session_id  TEXT NOT NULL,
        pgid        INTEGER NOT NULL,
        start_ticks INTEGER NOT NULL,
        record      TEXT NOT NULL,
        ended       INTEGER NOT NULL DEFAULT 0,
        ended_at    TEXT,
        output_pruned INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX processes_running ON processes (ended) WHERE ended = 0;
    CREATE INDEX processes_unswept ON processes (ended_at)
        WHERE ended = 1 AND output_pruned = 0;
    ",
    // 5: decided permission requests by id, for a late answer to one (only those rows:
    // without it, each such answer read the session's whole log).
    "
    CREATE INDEX events_permission_decided
        ON events (session_id, json_extract(envelope, '$.payload.requestId'))
        WHERE event = 'permission.resolved';
    ",
    // 6: the workspace directory a session took (path and device:inode), so a path renamed
    // and replaced by another directory or a link is refused after an eviction or a restart.
    "
    ALTER TABLE sessions ADD COLUMN workspace_pin TEXT;
    ",
];

/// Applies the migrations the database has not seen yet, each in its own transaction.
/// Refuses a database whose schema is newer than this build's: running on would misread or
/// damage what a newer opta wrote.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    let current: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current > MIGRATIONS.len() {
        return Err(Error::Config(format!(
            "the session database has schema version {current}, newer than this opta's {}: \
             it was written by a newer opta; upgrade opta, or use another --home",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Schema version this build writes.
#[cfg(test)]
pub fn latest_version() -> usize {
    MIGRATIONS.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrate_is_idempotent() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let v: usize = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, latest_version());
    }

    #[test]
    fn a_newer_schema_is_refused_and_left_alone() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", latest_version() + 1)
            .unwrap();
        let e = migrate(&mut conn).unwrap_err().to_string();
        assert!(e.contains("newer than this opta"), "{e}");
        let v: usize = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, latest_version() + 1);
    }
}
