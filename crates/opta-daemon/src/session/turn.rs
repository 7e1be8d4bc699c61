//! The task that runs one turn against the inference server and reports back to its actor.

use std::sync::Arc;

use opta_protocol::ChatMessage;
use tokio::sync::mpsc;

use crate::context::DaemonContext;
use crate::inference::{AsyncDeltaSink, Completion, Delta, InferenceError, resolve_model};

/// What a turn task tells its session actor. `turn_no` tells a cancelled turn's late
/// messages apart from the current turn's.
pub(crate) enum TurnUpdate {
    /// The preflight check matched `requested` to this loaded id.
    Resolved {
        turn_no: u64,
        requested: String,
        model: String,
    },
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

/// Checks the model is loaded (through the daemon-wide cache), then streams one completion.
/// The actor aborts this task to cancel the turn, which drops the HTTP stream.
pub(crate) async fn run_turn(
    ctx: Arc<DaemonContext>,
    model: String,
    messages: Vec<Arc<ChatMessage>>,
    turn_no: u64,
    updates: mpsc::Sender<TurnUpdate>,
) {
    if let Some(panics) = ctx.faults.turn_panics_on
        && messages
            .last()
            .and_then(|m| m.content.as_deref())
            .is_some_and(panics)
    {
        panic!("injected fault: turn task panics");
    }
    let started = std::time::Instant::now();
    let result = complete(&ctx, &model, &messages, turn_no, &updates).await;
    ctx.metrics
        .inference_seconds
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        let code = e.code().map_or("other", |c| c.as_str());
        ctx.metrics
            .inference_errors
            .get_or_create(&crate::metrics::ErrorLabels {
                code: code.to_owned(),
            })
            .inc();
        if e.invalidates_model_cache() {
            ctx.preflight.invalidate();
        }
    }
    let _ = updates.send(TurnUpdate::Finished { turn_no, result }).await;
}

async fn complete(
    ctx: &DaemonContext,
    model: &str,
    messages: &[Arc<ChatMessage>],
    turn_no: u64,
    updates: &mpsc::Sender<TurnUpdate>,
) -> Result<Completion, InferenceError> {
    let list = ctx.preflight.models(&ctx.lmx).await?;
    let loaded = list.ids();
    if loaded.is_empty() {
        return Err(InferenceError::NoModelLoaded {
            url: ctx.lmx.base_url().to_owned(),
        });
    }
    let canonical =
        resolve_model(model, &loaded).ok_or_else(|| InferenceError::ModelNotLoaded {
            model: model.to_owned(),
            loaded: loaded.clone(),
        })?;
    if canonical != model {
        let _ = updates
            .send(TurnUpdate::Resolved {
                turn_no,
                requested: model.to_owned(),
                model: canonical.to_owned(),
            })
            .await;
    }
    let sink = ActorSink {
        turn_no,
        updates: updates.clone(),
    };
    ctx.lmx.stream_chat(canonical, messages, sink).await
}
