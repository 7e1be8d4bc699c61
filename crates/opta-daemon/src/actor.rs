//! The request/reply step every actor handle takes: send a command carrying a `oneshot`,
//! await the answer.

use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

/// Sends the command `make` builds around a reply channel and awaits the reply; an actor
/// that is gone (the daemon is stopping) is [`Error::ShuttingDown`].
pub(crate) async fn ask<C, T>(
    commands: &mpsc::Sender<C>,
    make: impl FnOnce(oneshot::Sender<T>) -> C,
) -> Result<T> {
    let (reply, answer) = oneshot::channel();
    commands
        .send(make(reply))
        .await
        .map_err(|_| Error::ShuttingDown)?;
    answer.await.map_err(|_| Error::ShuttingDown)
}
