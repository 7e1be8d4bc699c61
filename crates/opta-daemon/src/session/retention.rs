//! How long token and thinking events of finished turns stay replayable: a sweeper drops
//! them once their turn has been over for the retention time (their text lives on in the
//! stored assistant message). It works from the turns' stored finish times, so a restart or
//! crash never leaves a turn's deltas behind for good.

use std::sync::Arc;

use crate::context::DaemonContext;

/// Sweeps at once (catching up on whatever a stopped daemon left), then every
/// `delta_sweep_interval`, until shutdown.
pub async fn sweep_deltas_periodically(ctx: Arc<DaemonContext>) {
    let mut every = tokio::time::interval(ctx.limits.delta_sweep_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let retention =
            chrono::Duration::from_std(ctx.limits.delta_retention).unwrap_or(chrono::Duration::MAX);
        let Some(cutoff) = chrono::Utc::now().checked_sub_signed(retention) else {
            continue;
        };
        let cutoff = cutoff.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        match ctx.store.sweep_deltas(&cutoff).await {
            Ok(0) | Err(crate::Error::ShuttingDown) => {}
            Ok(turns) => tracing::debug!(turns, "dropped the token events of finished turns"),
            Err(e) => tracing::warn!(error = %e, "delta sweep failed; retrying later"),
        }
    }
}
