//! Frames a client sends on the WebSocket plane, and the daemon's acks.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{CancelRequest, ResolvePermissionRequest, SubmitTurnRequest};
use crate::ids::{Seq, SessionId};

/// Close code: the URL named no (valid) session.
pub const CLOSE_BAD_REQUEST: u16 = 4000;
/// Close code: missing or wrong token.
pub const CLOSE_UNAUTHORIZED: u16 = 4001;
/// Close code: the session does not exist.
pub const CLOSE_NOT_FOUND: u16 = 4004;
/// Close code: the subscriber fell too far behind; reconnect from the last seq.
pub const CLOSE_TOO_SLOW: u16 = 4008;

/// A client-to-daemon frame, routed on `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type")]
pub enum ClientFrame {
    /// Introduces the client.
    #[serde(rename = "hello", rename_all = "camelCase")]
    Hello {
        /// The client.
        client_id: String,
        /// Must be the connection's session.
        session_id: SessionId,
        /// Informational: the seq the client resumed from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after_seq: Option<Seq>,
    },
    /// Submits a turn.
    #[serde(rename = "turn.submit", rename_all = "camelCase")]
    TurnSubmit {
        /// Must be the connection's session.
        session_id: SessionId,
        /// The turn.
        #[serde(flatten)]
        turn: SubmitTurnRequest,
    },
    /// Answers a permission request.
    #[serde(rename = "permission.resolve", rename_all = "camelCase")]
    PermissionResolve {
        /// Must be the connection's session.
        session_id: SessionId,
        /// The answer.
        #[serde(flatten)]
        resolution: ResolvePermissionRequest,
    },
    /// Cancels turns.
    #[serde(rename = "turn.cancel", rename_all = "camelCase")]
    TurnCancel {
        /// Must be the connection's session.
        session_id: SessionId,
        /// What to cancel.
        #[serde(flatten)]
        cancel: CancelRequest,
    },
}

impl ClientFrame {
    /// Every frame `type` the daemon understands.
    pub const ACTIONS: [&'static str; 4] =
        ["hello", "turn.submit", "permission.resolve", "turn.cancel"];

    /// `kind` as a known frame `type`, for naming the action of a frame that failed to parse.
    pub fn known_action(kind: &str) -> Option<&'static str> {
        Self::ACTIONS.into_iter().find(|a| *a == kind)
    }

    /// The session the frame names.
    pub fn session_id(&self) -> &SessionId {
        match self {
            ClientFrame::Hello { session_id, .. }
            | ClientFrame::TurnSubmit { session_id, .. }
            | ClientFrame::PermissionResolve { session_id, .. }
            | ClientFrame::TurnCancel { session_id, .. } => session_id,
        }
    }

    /// The frame's `type`, echoed as the ack's `action`.
    pub fn action(&self) -> &'static str {
        match self {
            ClientFrame::Hello { .. } => "hello",
            ClientFrame::TurnSubmit { .. } => "turn.submit",
            ClientFrame::PermissionResolve { .. } => "permission.resolve",
            ClientFrame::TurnCancel { .. } => "turn.cancel",
        }
    }
}

/// `{"type":"ack","action":...,...result}`: the daemon's answer to a client frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AckFrame {
    /// Always `"ack"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The `type` of the frame answered.
    pub action: String,
    /// The result fields, as the matching HTTP route would answer.
    #[serde(flatten)]
    pub result: serde_json::Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Mode;

    #[test]
    fn every_variant_action_is_known() {
        let session = || crate::ids::SessionId::parse("s1").unwrap();
        let frames = [
            ClientFrame::Hello {
                client_id: "c".into(),
                session_id: session(),
                after_seq: None,
            },
            ClientFrame::TurnSubmit {
                session_id: session(),
                turn: SubmitTurnRequest::new("c", "w", "hi", Mode::Chat),
            },
            ClientFrame::PermissionResolve {
                session_id: session(),
                resolution: serde_json::from_value(serde_json::json!({
                    "requestId": "perm_1", "decision": "allow", "decidedBy": "me"
                }))
                .unwrap(),
            },
            ClientFrame::TurnCancel {
                session_id: session(),
                cancel: CancelRequest::default(),
            },
        ];
        let actions: Vec<&str> = frames.iter().map(ClientFrame::action).collect();
        assert_eq!(actions, ClientFrame::ACTIONS);
        for frame in &frames {
            let wire = serde_json::to_value(frame).unwrap();
            assert_eq!(wire["type"], frame.action());
            assert_eq!(
                ClientFrame::known_action(frame.action()),
                Some(frame.action())
            );
        }
        assert_eq!(ClientFrame::known_action("ack"), None);
    }

    #[test]
    fn submit_frame_parses_flat() {
        let frame: ClientFrame = serde_json::from_value(serde_json::json!({
            "type": "turn.submit", "sessionId": "s1", "clientId": "c", "writerId": "w",
            "content": "hi", "mode": "chat", "lastSeenSeq": 3, "someFutureField": 1
        }))
        .unwrap();
        match frame {
            ClientFrame::TurnSubmit { session_id, turn } => {
                assert_eq!(session_id.as_str(), "s1");
                assert_eq!(turn.mode, Mode::Chat);
                assert_eq!(turn.last_seen_seq, Some(3));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
