//! Accept loops: bind a listener, accept connections and spawn each into its own task, where
//! the TLS handshake and everything after it run. Accept errors (EMFILE under a reconnect
//! storm) back off and never end the loop; a semaphore caps connections held at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::connection::{self, Shared};
use super::snapshot::{ListenerSpec, Snapshot};

/// Pending connections the kernel queues while the process is busy: a reconnecting fleet
/// arrives faster than any handshake rate.
const BACKLOG: u32 = 4096;

/// Bind `addr` with SO_REUSEADDR and a deep backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accept on `listener` until `stop` is cancelled. Each connection runs on the snapshot
/// current at its accept.
pub async fn serve(
    listener: TcpListener,
    spec: Arc<ListenerSpec>,
    current: Arc<ArcSwap<Snapshot>>,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let accepted = shared.metrics.accepted.with_label_values(&[&spec.name]);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.cancelled() => return,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    shared.metrics.accept_errors.inc();
                    tracing::warn!(listener = %spec.name, error = %e, "accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        accepted.inc();
        let snapshot = current.load_full();
        let shared = shared.clone();
        let spec = spec.clone();
        tracker.spawn(async move {
            connection::handle(shared, snapshot, spec, tcp, peer).await;
            drop(permit);
        });
    }
}
