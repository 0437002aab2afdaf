//! The registry of live client connections. Each connection registers a small handle at
//! accept (an id, a cancellation token, later the broker it was routed to and the hash of its
//! routing key), so the control
//! plane can close one connection at a time — the paced drain after SIGTERM, the clients of a
//! broker that left its pool — without ever touching a socket: the connection's own task sees
//! its token cancelled, ends its relay and logs the cause.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tokio_util::sync::CancellationToken;

use super::broker::BrokerState;

/// Shards of the map: registering and unregistering contend on one of these, not on one lock.
const SHARDS: usize = 16;

/// Why the control plane closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// Shutting down: the paced drain, or whatever is left when `drain_timeout` ends.
    Drain,
    /// Its broker left the pool and the pool has `on_backend_removed = "close"`.
    BrokerRemoved,
    /// Its broker was drained by an operator (`POST /backends/{pool}/{broker}/drain`).
    BrokerDrained,
    /// Moved back to its first choice (`rebalance = "home"`, `POST /pools/{pool}/rebalance`).
    Rebalance,
}

/// What a close on purpose means for the client: the process goes away, or the client is
/// being moved to another broker. It decides the DISCONNECT an MQTT 5 client is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaving {
    /// The process is shutting down (MQTT 5: 0x8B, server shutting down).
    ShuttingDown,
    /// The client is to connect again and be routed elsewhere (MQTT 5: 0x9C, use another
    /// server).
    Moved,
}

impl CloseCause {
    pub fn leaving(self) -> Leaving {
        match self {
            CloseCause::Drain => Leaving::ShuttingDown,
            CloseCause::BrokerRemoved | CloseCause::BrokerDrained | CloseCause::Rebalance => Leaving::Moved,
        }
    }
}

/// One live connection as the control plane sees it.
#[derive(Debug)]
pub struct ConnHandle {
    id: u64,
    token: CancellationToken,
    /// 0 until closed by [`ConnHandle::close`], then a [`CloseCause`] + 1.
    cause: AtomicU8,
    /// The state of the broker (of its pool) the connection is relayed to, once it is.
    backend: OnceLock<Arc<BrokerState>>,
    /// The hash of its routing key ([`crate::proxy::balance::key_hash`]), for a connection
    /// routed by one: where it belongs is recomputed from it (rebalancing). Connections
    /// routed by least-connections have none.
    key_hash: OnceLock<u64>,
}

impl ConnHandle {
    /// Registration order: lower is older.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Asks the connection's task to end; the first cause given wins.
    pub fn close(&self, cause: CloseCause) {
        let code = match cause {
            CloseCause::Drain => 1,
            CloseCause::BrokerRemoved => 2,
            CloseCause::BrokerDrained => 3,
            CloseCause::Rebalance => 4,
        };
        let _ = self.cause.compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
        self.token.cancel();
    }

    /// Resolves once the connection is to end, with why. A cancelled parent (the process's
    /// hard stop) counts as [`CloseCause::Drain`].
    pub async fn closed(&self) -> CloseCause {
        self.token.cancelled().await;
        match self.cause.load(Ordering::Relaxed) {
            2 => CloseCause::BrokerRemoved,
            3 => CloseCause::BrokerDrained,
            4 => CloseCause::Rebalance,
            _ => CloseCause::Drain,
        }
    }

    /// Whether the connection has been asked to end (by a cause, or by the hard stop).
    pub fn is_closing(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Records the broker the connection was relayed to (once), by its state, and the hash of
    /// the routing key that chose it, if one did.
    pub fn set_backend(&self, state: &Arc<BrokerState>, key_hash: Option<u64>) {
        let _ = self.backend.set(state.clone());
        if let Some(h) = key_hash {
            let _ = self.key_hash.set(h);
        }
    }

    /// The broker the connection is relayed to, once it is.
    pub fn backend(&self) -> Option<&Arc<BrokerState>> {
        self.backend.get()
    }

    /// The hash of the routing key that chose its broker; `None` before it was routed and for
    /// a connection routed without a key.
    pub fn key_hash(&self) -> Option<u64> {
        self.key_hash.get().copied()
    }

    /// Whether the connection is relayed to the broker whose state is `state`.
    pub fn is_relayed_to(&self, state: &Arc<BrokerState>) -> bool {
        self.backend.get().is_some_and(|b| Arc::ptr_eq(b, state))
    }
}

/// One shard: connection id to handle.
type Shard = HashMap<u64, Arc<ConnHandle>>;

/// Every live connection of the process.
#[derive(Debug)]
pub struct Registry {
    shards: Box<[Mutex<Shard>]>,
    next: AtomicU64,
    len: AtomicUsize,
    /// The most connections live at once since [`Registry::take_peak`] last looked.
    peak: AtomicUsize,
    /// Parent of every connection's token: cancelling it closes them all at once.
    root: CancellationToken,
}

impl Registry {
    /// A registry whose connections all close when `root` is cancelled.
    pub fn new(root: CancellationToken) -> Registry {
        Registry {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next: AtomicU64::new(1),
            len: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            root,
        }
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[(id % SHARDS as u64) as usize].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new connection; it is unregistered when the returned value is dropped.
    pub fn register(self: &Arc<Self>) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(ConnHandle {
            id,
            token: self.root.child_token(),
            cause: AtomicU8::new(0),
            backend: OnceLock::new(),
            key_hash: OnceLock::new(),
        });
        self.shard(id).insert(id, handle.clone());
        let len = self.len.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(len, Ordering::Relaxed);
        Registration { registry: self.clone(), handle }
    }

    /// Connections registered and not yet ended.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most connections live at once since the last call (at least the number live now).
    pub fn take_peak(&self) -> usize {
        self.peak.swap(self.len(), Ordering::Relaxed).max(self.len())
    }

    /// Gives back the room of the shards' maps that a storm grew and that now stand mostly
    /// empty (a map never shrinks by itself).
    pub fn shrink(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            if shard.capacity() > 4 * shard.len().max(16) {
                shard.shrink_to_fit();
            }
        }
    }

    /// Whether connection `id` is still live.
    pub fn is_live(&self, id: u64) -> bool {
        self.shard(id).contains_key(&id)
    }

    /// Every live connection, oldest first.
    pub fn oldest_first(&self) -> Vec<Arc<ConnHandle>> {
        self.select(|_| true)
    }

    /// The live connections relayed to the broker whose state is `state`, oldest first.
    pub fn relayed_to(&self, state: &Arc<BrokerState>) -> Vec<Arc<ConnHandle>> {
        self.select(|h| h.is_relayed_to(state))
    }

    /// The live connections relayed by a routing key, oldest first: what rebalancing looks
    /// at. Each shard is locked only while its handles are copied out.
    pub fn routed_by_key(&self) -> Vec<Arc<ConnHandle>> {
        self.select(|h| h.key_hash.get().is_some() && h.backend.get().is_some())
    }

    fn select(&self, keep: impl Fn(&ConnHandle) -> bool) -> Vec<Arc<ConnHandle>> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            all.extend(shard.values().filter(|h| keep(h)).cloned());
        }
        all.sort_unstable_by_key(|h| h.id);
        all
    }
}

/// A connection's registration: dereferences to its handle, unregisters on drop.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    handle: Arc<ConnHandle>,
}

impl Deref for Registration {
    type Target = ConnHandle;
    fn deref(&self) -> &ConnHandle {
        &self.handle
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.registry.shard(self.handle.id).remove(&self.handle.id).is_some() {
            self.registry.len.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn registers_closes_and_unregisters() {
        let root = CancellationToken::new();
        let r = Arc::new(Registry::new(root.clone()));
        let a = r.register();
        let b = r.register();
        let c = r.register();
        assert_eq!(r.len(), 3);
        assert!(a.id() < b.id() && b.id() < c.id());

        let state = Arc::new(BrokerState::default());
        b.set_backend(&state, Some(7));
        c.set_backend(&state, None);
        let to_b: Vec<u64> = r.relayed_to(&state).iter().map(|h| h.id()).collect();
        assert_eq!(to_b, [b.id(), c.id()]);
        assert_eq!((b.key_hash(), c.key_hash(), a.key_hash()), (Some(7), None, None));
        let keyed: Vec<u64> = r.routed_by_key().iter().map(|h| h.id()).collect();
        assert_eq!(keyed, [b.id()], "routed by a key: only those have a home");
        assert!(r.relayed_to(&Arc::new(BrokerState::default())).is_empty(), "by identity of the state");

        b.close(CloseCause::BrokerRemoved);
        b.close(CloseCause::Drain);
        assert_eq!(b.closed().await, CloseCause::BrokerRemoved, "the first cause wins");
        assert_eq!(CloseCause::BrokerRemoved.leaving(), Leaving::Moved);
        assert_eq!(CloseCause::BrokerDrained.leaving(), Leaving::Moved);
        assert_eq!(CloseCause::Rebalance.leaving(), Leaving::Moved);
        assert_eq!(CloseCause::Drain.leaving(), Leaving::ShuttingDown);

        let order: Vec<u64> = r.oldest_first().iter().map(|h| h.id()).collect();
        assert_eq!(order, [a.id(), b.id(), c.id()]);
        let b_id = b.id();
        drop(b);
        assert!(!r.is_live(b_id));
        assert_eq!(r.len(), 2);

        root.cancel();
        assert_eq!(a.closed().await, CloseCause::Drain, "the hard stop closes everything");
        assert_eq!(c.closed().await, CloseCause::Drain);
        let late = r.register();
        assert_eq!(late.closed().await, CloseCause::Drain, "registered after the hard stop: closed at once");
        drop((a, c, late));
        assert!(r.is_empty());
    }

    #[test]
    fn peak_and_shrink_after_a_storm() {
        let r = Arc::new(Registry::new(CancellationToken::new()));
        let storm: Vec<Registration> = (0..5_000).map(|_| r.register()).collect();
        let kept = r.register();
        drop(storm);
        assert_eq!(r.take_peak(), 5_001);
        assert_eq!(r.take_peak(), 1, "the peak starts again from the connections live now");
        let capacity = |r: &Registry| r.shards.iter().map(|s| s.lock().unwrap().capacity()).sum::<usize>();
        assert!(capacity(&r) >= 5_001);
        r.shrink();
        assert!(capacity(&r) < 1_000, "{}", capacity(&r));
        assert!(r.is_live(kept.id()));
    }
}
