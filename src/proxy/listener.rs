//! Accept loops: bind a listener, accept connections and spawn each into its own task, where
//! the TLS handshake and everything after it run. Accept errors (EMFILE under a reconnect
//! storm) back off and never end the loop. Over a connection limit (the process's semaphore,
//! the listener's own count) a new connection is closed at once, before any TLS work: under a
//! storm the backlog then holds only connections that will be served.
//! [`ListenerSet`] keeps the running listeners in line with the current snapshot (reloads).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::connection::{self, CloseReason, Shared};
use super::snapshot::{ListenerSpec, Snapshot};

/// Pending connections the kernel queues while the process is busy: a reconnecting fleet
/// arrives faster than any handshake rate.
const BACKLOG: u32 = 4096;

/// TCP keepalive of client connections: a device that vanished without a FIN (power loss,
/// dead cellular link) is detected by the kernel after about 2 + 3 × 0.5 minutes even if its
/// broker never notices.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(120);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_RETRIES: u32 = 3;

/// Bind `addr` with SO_REUSEADDR, a deep backlog and TCP keepalive. Linux copies the
/// keepalive settings of a listening socket into every socket it accepts, so setting them
/// here costs no system call per connection.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    socket2::SockRef::from(&socket).set_tcp_keepalive(&keepalive)?;
    // Accepted sockets inherit TCP_NODELAY too: one system call fewer per connection.
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accept on `listener` until `stop` is cancelled. Each connection runs on the snapshot
/// current at its accept, with the listener named `name` as that snapshot has it (so a
/// reload's new certificates apply to the next handshake). Each connection is registered in
/// `shared.conns` before its task starts, so a drain that begins after the loop has stopped
/// sees every connection.
pub async fn serve(
    listener: TcpListener,
    name: String,
    current: Arc<ArcSwap<Snapshot>>,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let accepted = shared.metrics.connections_accepted(&name);
    // Connections of this listener alive now, for its own `max_connections`.
    let held = Arc::new(AtomicUsize::new(0));
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    shared.metrics.accept_errors.inc();
                    tracing::warn!(listener = %name, error = %e, "accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        accepted.inc();
        let snapshot = current.load_full();
        // Only between a reload's swap and this loop being stopped: the listener is gone, and
        // the connection it accepted ends as its listener's do, counted and logged.
        let Some(spec) = snapshot.listener(&name).cloned() else {
            drop(tcp);
            connection::refused_at_accept(&shared, &name, peer, CloseReason::Drained);
            continue;
        };
        if spec.max_connections.is_some_and(|max| held.load(Ordering::Relaxed) >= max) {
            drop(tcp);
            connection::refused_at_accept(&shared, &name, peer, CloseReason::ListenerMaxConnections);
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            drop(tcp);
            connection::refused_at_accept(&shared, &name, peer, CloseReason::MaxConnections);
            continue;
        };
        held.fetch_add(1, Ordering::Relaxed);
        let held = Held(held.clone());
        let conn = shared.conns.register();
        let shared = shared.clone();
        // The connection future itself, not wrapped in another async block: a wrapper would
        // keep a second copy of every argument for the connection's whole life.
        tracker.spawn(connection::handle(shared, snapshot, spec, tcp, peer, conn, (permit, held)));
    }
}

/// One connection counted against its listener's `max_connections`, until dropped.
struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The running listeners, keyed by name and configured `bind`. Applying a snapshot binds the
/// listeners that are new or whose `bind` changed and closes those that went away; a listener
/// that stays keeps its socket, its accept loop and its connections. Connections accepted on
/// a listener that is closed run on until they end.
pub struct ListenerSet {
    current: Arc<ArcSwap<Snapshot>>,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
    stop: CancellationToken,
    running: Vec<Running>,
}

struct Running {
    name: String,
    /// As configured (port 0 stays 0: a reload does not re-bind it).
    bind: SocketAddr,
    /// As bound.
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Sockets bound for a snapshot that is about to be applied.
pub struct Prepared {
    bound: Vec<(Arc<ListenerSpec>, TcpListener)>,
}

impl ListenerSet {
    /// No listeners yet; `stop` is the parent of every accept loop's stop.
    pub fn new(
        current: Arc<ArcSwap<Snapshot>>,
        shared: Arc<Shared>,
        limit: Arc<Semaphore>,
        tracker: TaskTracker,
        stop: CancellationToken,
    ) -> ListenerSet {
        ListenerSet { current, shared, limit, tracker, stop, running: Vec::new() }
    }

    /// Each running listener's name and bound address.
    pub fn addrs(&self) -> Vec<(String, SocketAddr)> {
        self.running.iter().map(|r| (r.name.clone(), r.addr)).collect()
    }

    /// Binds the listeners of `snap` that are not running yet. A listener about to go away
    /// that holds the same port is closed first. On error nothing new stays bound and what
    /// was closed early is bound again.
    pub async fn prepare(&mut self, snap: &Snapshot) -> Result<Prepared, String> {
        let mut bound = Vec::new();
        let mut retired: Vec<(String, SocketAddr)> = Vec::new();
        let new: Vec<Arc<ListenerSpec>> = snap
            .listeners
            .iter()
            .filter(|l| !self.running.iter().any(|r| r.name == l.name && r.bind == l.bind))
            .cloned()
            .collect();
        for spec in new {
            let result = match bind(spec.bind) {
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    let leaving: Vec<usize> = (0..self.running.len())
                        .filter(|&i| {
                            let r = &self.running[i];
                            !snap.listeners.iter().any(|l| l.name == r.name && l.bind == r.bind)
                                && overlaps(r.addr, spec.bind)
                        })
                        .collect();
                    if leaving.is_empty() {
                        Err(e)
                    } else {
                        for i in leaving.into_iter().rev() {
                            let r = self.running.remove(i);
                            retired.push((r.name.clone(), r.bind));
                            r.close().await;
                        }
                        bind(spec.bind)
                    }
                }
                other => other,
            };
            match result {
                Ok(l) => bound.push((spec, l)),
                Err(e) => {
                    drop(bound);
                    self.restore(&retired);
                    return Err(format!("listener {:?}: cannot bind {}: {e}", spec.name, spec.bind));
                }
            }
        }
        Ok(Prepared { bound })
    }

    /// Re-binds listeners of the current snapshot closed by a `prepare` that then failed.
    fn restore(&mut self, retired: &[(String, SocketAddr)]) {
        let snap = self.current.load_full();
        for (name, bind_addr) in retired {
            let Some(spec) = snap.listener(name).filter(|l| l.bind == *bind_addr).cloned() else { continue };
            match bind(spec.bind) {
                Ok(l) => self.start(&spec, l),
                Err(e) => tracing::error!(listener = %spec.name, bind = %spec.bind, error = %e, "cannot bind again"),
            }
        }
    }

    /// Starts the accept loops of `prepared` and closes the listeners `snap` no longer has.
    /// Call after `snap` was made current.
    pub async fn commit(&mut self, snap: &Snapshot, prepared: Prepared) {
        let mut keep = Vec::new();
        for r in std::mem::take(&mut self.running) {
            if snap.listeners.iter().any(|l| l.name == r.name && l.bind == r.bind) {
                keep.push(r);
            } else {
                tracing::info!(listener = %r.name, addr = %r.addr, "listener closed");
                r.close().await;
            }
        }
        self.running = keep;
        for (spec, l) in prepared.bound {
            self.start(&spec, l);
        }
    }

    fn start(&mut self, spec: &ListenerSpec, l: TcpListener) {
        let addr = l.local_addr().unwrap_or(spec.bind);
        tracing::info!(listener = %spec.name, addr = %addr, tls = spec.tls.is_some(), pool = %spec.pool, "listening");
        let stop = self.stop.child_token();
        let serving = {
            let (name, current, shared) = (spec.name.clone(), self.current.clone(), self.shared.clone());
            let (limit, tracker, stop) = (self.limit.clone(), self.tracker.clone(), stop.clone());
            move |l| serve(l, name, current, shared, limit, tracker, stop)
        };
        // On the setup runtime when there is one: the socket moves to its I/O driver, so
        // accepting and every connection's setup run there.
        let task = match self.shared.setup.clone() {
            Some(rt) => match l.into_std() {
                Ok(std) => {
                    let name = spec.name.clone();
                    rt.spawn(async move {
                        match TcpListener::from_std(std) {
                            Ok(l) => serving(l).await,
                            Err(e) => {
                                tracing::error!(listener = %name, error = %e, "cannot accept on the setup runtime")
                            }
                        }
                    })
                }
                Err(e) => {
                    tracing::error!(listener = %spec.name, error = %e, "cannot move the listening socket to the setup runtime");
                    return;
                }
            },
            None => tokio::spawn(serving(l)),
        };
        self.running.push(Running { name: spec.name.clone(), bind: spec.bind, addr, stop, task });
    }

    /// Stops every accept loop and closes every listening socket.
    pub async fn close_all(&mut self) {
        for r in std::mem::take(&mut self.running) {
            r.close().await;
        }
    }
}

impl Running {
    /// Stops the accept loop; its socket is closed when this returns.
    async fn close(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Whether binding `b` conflicts with the socket bound at `a`: same port, and the same IP or
/// either a wildcard.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_inherit_keepalive() {
        let l = bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let _c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_RETRIES);
    }
}
