//! The accept loop: the router on hyper HTTP/1.1 connections with WebSocket upgrades, in
//! place of `axum::serve`, for what that one does not set: TCP_NODELAY, a header-read timeout
//! (a client that never finishes its request headers does not hold a connection), a write
//! timeout (nor does one that stops reading what it is sent), and a bounded shutdown.
//! On shutdown it stops accepting and lets open responses end (the event planes end theirs on
//! the same signal) for at most `grace`, or until `force`; then it drops what is left.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::context::Tunables;

/// When the accept loop stops and how long it waits for open connections.
pub(crate) struct ServeControl {
    /// Stop accepting; let open responses end.
    pub shutdown: CancellationToken,
    /// Stop waiting for open responses: drop their connections now.
    pub force: CancellationToken,
}

/// Serves `app` on `listener` until `control.shutdown`, then waits for open connections to
/// close, for at most `limits.shutdown_grace` (or until `control.force`).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    control: ServeControl,
    limits: Tunables,
) {
    let ServeControl { shutdown, force } = control;
    let connections = TaskTracker::new();
    // Cancelled when the grace period ends: every connection still open is dropped.
    let drop_all = CancellationToken::new();
    loop {
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Events are many small writes (one per token): without TCP_NODELAY, Nagle holds
        // each one back until the client's (delayed, ~40 ms) ACK of the previous one.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
        }
        // A write pending this long means the client stopped reading: the connection fails
        // (an upgraded WebSocket keeps this stream, so it is covered too).
        let mut io = TimeoutStream::new(tcp);
        io.set_write_timeout(Some(limits.write_timeout));
        let io = TokioIo::new(Box::pin(io));
        let service = TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        let drop_all = drop_all.clone();
        connections.spawn(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let conn = builder.serve_connection_with_upgrades(io, service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            tokio::select! {
                result = conn => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error during shutdown");
                    }
                }
                _ = drop_all.cancelled() => {
                    tracing::debug!("connection dropped at the end of the shutdown grace period");
                }
            }
        });
    }
    drop(listener);
    connections.close();
    tokio::select! {
        _ = connections.wait() => return,
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(open = connections.len(),
                "connections still open after the shutdown grace period; dropping them");
        }
        _ = force.cancelled() => {
            tracing::warn!(open = connections.len(), "stopping now: dropping open connections");
        }
    }
    drop_all.cancel();
    connections.wait().await;
}
