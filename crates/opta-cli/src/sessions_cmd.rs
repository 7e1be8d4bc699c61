//! `opta sessions list|show|events|cancel|delete` and `opta models [list]|load|unload`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use opta_protocol::{CancelRequest, Envelope, Event, SessionId, SessionSnapshot, TurnId};

use crate::daemon_ctl::{self, DaemonArgs};
use crate::render::compact;
use crate::sanitize;
use crate::ui;

#[derive(Subcommand)]
pub enum SessionsAction {
    /// Sessions, most recently updated first.
    List {
        /// How many (1..=500).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=500))]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A session's metadata and history.
    Show {
        /// Session id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A session's stored events.
    Events {
        /// Session id.
        id: String,
        /// Only events after this seq.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a session's running turn (or the turns given).
    Cancel {
        /// Session id.
        id: String,
        /// Cancel this turn.
        #[arg(long)]
        turn: Option<String>,
        /// Cancel every turn of this writer.
        #[arg(long)]
        writer: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a session: its turns are cancelled, its history and events are gone.
    Delete {
        /// Session id.
        id: String,
    },
}

pub fn print_json(value: &impl serde::Serialize) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub async fn sessions(
    action: SessionsAction,
    home: &Path,
    daemon: &DaemonArgs,
) -> Result<ExitCode> {
    let client = daemon_ctl::ensure(home, daemon).await?;
    match action {
        SessionsAction::List { limit, json } => {
            let page = client.list_sessions(Some(limit), None).await?;
            if json {
                return print_json(&page).map(|_| ExitCode::SUCCESS);
            }
            outln!("{}", sessions_table(&page.sessions));
        }
        SessionsAction::Show { id, json } => {
            let detail = client.get_session(&SessionId::parse(&id)?).await?;
            if json {
                return print_json(&detail).map(|_| ExitCode::SUCCESS);
            }
            let s = &detail.snapshot;
            outln!("session  {}", s.session_id);
            outln!(
                "title    {}",
                sanitize::line(s.title.as_deref().unwrap_or("-"))
            );
            outln!("model    {}", sanitize::line(&s.model));
            outln!("created  {}", sanitize::line(&s.created_at));
            outln!("updated  {}", sanitize::line(&s.updated_at));
            for m in &detail.messages {
                let role = serde_json::to_value(m.role)?;
                outln!(
                    "\n[{}]\n{}",
                    role.as_str().unwrap_or("?"),
                    sanitize::text(m.content.as_deref().unwrap_or(""))
                );
            }
        }
        SessionsAction::Events { id, after, json } => {
            let events = client.events(&SessionId::parse(&id)?, after).await?.events;
            for e in &events {
                if json {
                    outln!("{}", serde_json::to_string(e)?);
                } else {
                    outln!("{}", sanitize::line(&event_line(e)));
                }
            }
        }
        SessionsAction::Cancel {
            id,
            turn,
            writer,
            json,
        } => {
            let id = SessionId::parse(&id)?;
            let turn_id = match (turn, &writer) {
                (Some(t), _) => Some(TurnId(t)),
                (None, Some(_)) => None,
                (None, None) => client.get_session(&id).await?.snapshot.active_turn_id,
            };
            let answer = client
                .cancel(
                    &id,
                    &CancelRequest {
                        turn_id,
                        writer_id: writer,
                    },
                )
                .await?;
            if json {
                return print_json(&answer).map(|_| ExitCode::SUCCESS);
            }
            outln!(
                "cancelled {} turn(s): {} queued, active {}",
                answer.cancelled,
                answer.cancelled_queued,
                if answer.cancelled_active { "yes" } else { "no" }
            );
        }
        SessionsAction::Delete { id } => {
            let id = SessionId::parse(&id)?;
            client.delete_session(&id).await?;
            outln!("deleted session {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Sessions as a table for people.
pub fn sessions_table(sessions: &[SessionSnapshot]) -> String {
    let now = chrono::Utc::now();
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|s| {
            vec![
                s.session_id.to_string(),
                s.model.clone(),
                ui::ago(&s.updated_at, now),
                match &s.active_turn_id {
                    Some(_) => format!("running, {} queued", s.queued_turns),
                    None if s.queued_turns > 0 => format!("{} queued", s.queued_turns),
                    None => "idle".into(),
                },
                s.title.clone().unwrap_or_default(),
            ]
        })
        .collect();
    ui::table(&["ID", "MODEL", "UPDATED", "STATE", "TITLE"], &rows)
}

/// `seq  ts  event  summary`.
pub fn event_line(e: &Envelope) -> String {
    let summary = match &e.event {
        Event::TurnToken(t) | Event::TurnThinking(t) => {
            compact(&serde_json::Value::String(t.text.clone()), 60)
        }
        Event::TurnError(t) => format!(
            "{} {}",
            t.code.map(|c| c.as_str()).unwrap_or("error"),
            t.message
        ),
        other => other.turn_id().map(|t| t.to_string()).unwrap_or_default(),
    };
    format!("{:>6}  {}  {:<18} {}", e.seq, e.ts, e.event.name(), summary)
}
