//! A TCP proxy in front of a daemon: clients keep one address while the daemon behind it
//! restarts, and a test can cut every connection at once (a network drop, a laptop sleep)
//! while the daemon keeps running.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// The proxy; stops when dropped.
pub struct CutProxy {
    port: u16,
    target: Arc<AtomicU16>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl CutProxy {
    /// Listens on an ephemeral loopback port, forwarding to `127.0.0.1:target`.
    pub async fn start(target: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let target = Arc::new(AtomicU16::new(target));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = tokio::spawn({
            let target = target.clone();
            let connections = connections.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let to = target.load(Ordering::SeqCst);
                    let task = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(("127.0.0.1", to)).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    let mut live = connections.lock().expect("proxy lock");
                    live.retain(|c| !c.is_finished());
                    live.push(task.abort_handle());
                }
            }
        })
        .abort_handle();
        Ok(Self {
            port,
            target,
            connections,
            accept,
        })
    }

    /// `http://127.0.0.1:PORT` of the proxy.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Drops every open connection (both ends see a reset); new ones are accepted as before.
    pub fn cut(&self) -> usize {
        let live: Vec<AbortHandle> =
            std::mem::take(&mut *self.connections.lock().expect("proxy lock"));
        let open = live.iter().filter(|c| !c.is_finished()).count();
        for connection in live {
            connection.abort();
        }
        open
    }

    /// Forwards new connections to `127.0.0.1:target` from now on.
    pub fn retarget(&self, target: u16) {
        self.target.store(target, Ordering::SeqCst);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
