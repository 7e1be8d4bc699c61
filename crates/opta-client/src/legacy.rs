//! `legacy_chat`: one `do` turn run to its end, for scripts that want a single answer. Built on
//! v3 only (sessions, turns, SSE); there is no legacy route on the daemon.

use opta_protocol::{CreateSessionRequest, Event, Mode, SessionId, SubmitTurnRequest, TurnStats};

use crate::{ClientError, DaemonClient, Result, StartAt, Transport};

/// The answer of [`DaemonClient::legacy_chat`].
#[derive(Debug, Clone, PartialEq)]
pub struct LegacyChatResponse {
    /// The session the turn ran in.
    pub session_id: SessionId,
    /// The reply text.
    pub response: String,
    /// The turn's figures.
    pub stats: TurnStats,
    /// The model that answered.
    pub model: String,
}

impl DaemonClient {
    /// Creates (or re-opens) a session, submits `message` as a `do` turn, follows
    /// `GET /v3/sse/events` until that turn's terminal event and returns the reply.
    /// A `turn.error` becomes [`ClientError::Turn`]; a daemon that goes away mid-turn and
    /// stays away past the client's reconnect deadline, [`ClientError::DaemonGone`] (a client
    /// from [`DaemonClient::discover`] follows a daemon that restarted on another port).
    ///
    /// ```no_run
    /// # async fn demo(client: opta_client::DaemonClient) -> Result<(), opta_client::ClientError> {
    /// let answer = client.legacy_chat("Summarise README.md", None).await?;
    /// println!("{} ({} tokens)", answer.response, answer.stats.tokens);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn legacy_chat(
        &self,
        message: &str,
        session: Option<&SessionId>,
    ) -> Result<LegacyChatResponse> {
        let snapshot = self
            .create_session(&CreateSessionRequest {
                session_id: session.cloned(),
                ..CreateSessionRequest::default()
            })
            .await?;
        let session_id = snapshot.session_id;
        let mut events = self
            .subscribe(&session_id, StartAt::Live, Transport::Sse)
            .await?;
        let submitted = self
            .submit_turn(
                &session_id,
                &SubmitTurnRequest::new("opta-legacy-chat", "opta-legacy-chat", message, Mode::Do),
            )
            .await?;
        let turn_id = submitted.turn_id;
        let mut response = String::new();
        while let Some(envelope) = events.recv().await {
            let envelope = envelope?;
            if envelope.event.turn_id() != Some(&turn_id) {
                continue;
            }
            match envelope.event {
                Event::TurnToken(t) => response.push_str(&t.text),
                Event::TurnDone(done) => {
                    let detail = self.get_session(&session_id).await?;
                    return Ok(LegacyChatResponse {
                        session_id,
                        response,
                        stats: done.stats,
                        model: detail.snapshot.model,
                    });
                }
                Event::TurnError(e) => {
                    return Err(ClientError::Turn {
                        turn_id: turn_id.0,
                        code: e.code,
                        message: e.message,
                    });
                }
                _ => {}
            }
        }
        Err(ClientError::Transport(
            "the event stream ended before the turn did".into(),
        ))
    }
}
