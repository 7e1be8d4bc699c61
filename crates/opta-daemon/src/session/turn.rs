//! The task that runs one turn against the inference server and reports back to its actor.

use opta_protocol::ChatMessage;
use tokio::sync::mpsc;

use crate::inference::{AsyncDeltaSink, Completion, Delta, InferenceError, LmxClient};

/// What a turn task tells its session actor. `turn_no` tells a cancelled turn's late
/// messages apart from the current turn's.
pub(crate) enum TurnUpdate {
    Delta {
        turn_no: u64,
        delta: Delta,
    },
    Finished {
        turn_no: u64,
        result: Result<Completion, InferenceError>,
    },
}

struct ActorSink {
    turn_no: u64,
    updates: mpsc::Sender<TurnUpdate>,
}

impl AsyncDeltaSink for ActorSink {
    async fn send(&mut self, delta: Delta) {
        // A closed channel means the actor is gone; the turn's output has nowhere to go.
        let _ = self
            .updates
            .send(TurnUpdate::Delta {
                turn_no: self.turn_no,
                delta,
            })
            .await;
    }
}

/// Streams one completion; the actor aborts this task to cancel the turn, which drops the
/// HTTP stream to the inference server.
pub(crate) async fn run_turn(
    lmx: LmxClient,
    model: String,
    messages: Vec<ChatMessage>,
    turn_no: u64,
    updates: mpsc::Sender<TurnUpdate>,
) {
    let sink = ActorSink {
        turn_no,
        updates: updates.clone(),
    };
    let result = lmx.stream_chat(&model, &messages, sink).await;
    let _ = updates.send(TurnUpdate::Finished { turn_no, result }).await;
}
