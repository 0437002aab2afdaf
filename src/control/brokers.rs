//! The table of per-broker state by (pool, broker identity): how a snapshot being built finds
//! the [`BrokerState`] its brokers continue. The table holds weak references only, so a state
//! lives exactly as long as something uses it — the applied snapshot, an older snapshot a
//! connection started on, or a connection relayed to the broker — and a broker that leaves its
//! pool and comes back after all of those are gone starts afresh: healthy, no streaks, zero
//! counters, no last error, like a broker new to the pool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use crate::proxy::balance::Backend;
use crate::proxy::broker::BrokerState;
use crate::proxy::snapshot::Snapshot;

/// Per-broker state by pool name and broker identity.
#[derive(Debug, Default)]
pub struct BrokerStates {
    by_identity: HashMap<(String, String), Weak<BrokerState>>,
}

impl BrokerStates {
    /// The table of the states `snapshot`'s brokers already have (the first loaded config).
    pub fn of(snapshot: &Snapshot) -> BrokerStates {
        let mut table = BrokerStates::default();
        for p in &snapshot.pools {
            for b in &p.backends {
                table.by_identity.insert((p.name.clone(), b.name.clone()), Arc::downgrade(&b.state));
            }
        }
        table
    }

    /// The state of broker `name` of `pool`: the live one if there is one, else a fresh one.
    pub fn state(&mut self, pool: &str, name: &str) -> Arc<BrokerState> {
        let key = (pool.to_string(), name.to_string());
        if let Some(s) = self.by_identity.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        let s = Arc::new(BrokerState::default());
        self.by_identity.insert(key, Arc::downgrade(&s));
        s
    }

    /// Broker `name` of `pool` at `addr`, continuing its state; `draining` is discovery's
    /// word on it (false for a broker from the config file).
    pub fn backend(&mut self, pool: &str, name: &str, addr: SocketAddr, draining: bool) -> Arc<Backend> {
        let state = self.state(pool, name);
        state.set_draining(draining);
        Arc::new(Backend::with_state(name, addr, state))
    }

    /// Drops the entries whose state nothing uses any more.
    pub fn forget_unused(&mut self) {
        self.by_identity.retain(|_, s| s.strong_count() > 0);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_identity.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn state_follows_pool_and_identity_while_something_holds_it() {
        let mut t = BrokerStates::default();
        let a = t.backend("p", "b0", ([127, 0, 0, 1], 1).into(), false);
        assert!(a.record_failure(1));
        a.active.fetch_add(1, Ordering::Relaxed);

        // Same identity at a new address, and draining: the same state.
        let moved = t.backend("p", "b0", ([127, 0, 0, 1], 9).into(), true);
        assert!(Arc::ptr_eq(&a.state, &moved.state));
        assert!(!moved.is_healthy() && a.is_draining());
        // Another pool, same name: its own state.
        let other = t.backend("q", "b0", ([127, 0, 0, 1], 1).into(), false);
        assert!(other.is_healthy() && !Arc::ptr_eq(&a.state, &other.state));

        // Nothing holds p/b0 any more: it starts afresh and its entry goes.
        drop((a, moved));
        t.forget_unused();
        assert_eq!(t.len(), 1);
        let back = t.backend("p", "b0", ([127, 0, 0, 1], 1).into(), false);
        assert!(back.is_healthy());
        assert_eq!(back.active.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_operators_drain_outlasts_discovery_updates_but_not_the_state() {
        let mut t = BrokerStates::default();
        let a = t.backend("p", "pod-0", ([127, 0, 0, 1], 1).into(), false);
        assert!(a.admin_drain().1);
        // Discovery answers again, the pod not terminating: discovery's flag only.
        let again = t.backend("p", "pod-0", ([127, 0, 0, 2], 1).into(), false);
        assert!(again.is_admin_drained() && !again.in_rotation(), "still drained");
        drop((a, again));
        t.forget_unused();
        let back = t.backend("p", "pod-0", ([127, 0, 0, 1], 1).into(), false);
        assert!(back.in_rotation(), "a state started afresh is enabled, as after a restart");
    }
}
