//! Holding new connections for a restarting broker (`on_backend_restart = "hold"`): the
//! outcomes a hold ends with, and the per-pool count of connections held at once that
//! `hold_max` bounds. The wait itself is a step of the connection's setup
//! (`connection::Setup::hold`); it sleeps on the broker's own wake-up
//! ([`BrokerState::back`](super::broker::BrokerState::back)), never polls.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::admin::metrics::Metrics;

/// How a hold ended: the `outcome` label of `harbormaster_holds_total` and the log line's
/// `hold_outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldOutcome {
    /// Its broker came back and answered: the client went home.
    Home,
    /// `hold_timeout` passed (counted from when the broker went down or away): normal failover.
    Failover,
    /// The pool already held `hold_max` connections: failed over at once, never held.
    OverCap,
    /// The connection ended while held (the client left, or the connection was closed by a
    /// drain).
    Closed,
}

impl HoldOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldOutcome::Home => "home",
            HoldOutcome::Failover => "failover",
            HoldOutcome::OverCap => "over_cap",
            HoldOutcome::Closed => "closed",
        }
    }
}

/// Connections held right now, by pool: what `hold_max` is checked against. Touched only by
/// connections whose broker is restarting, so a lock is cheap enough; a pool's entry goes when
/// its last hold ends.
#[derive(Debug, Default)]
pub struct Holds {
    by_pool: Mutex<HashMap<String, usize>>,
}

impl Holds {
    /// A place among `pool`'s held connections, if it holds fewer than `max`; the gauge
    /// counts it until the place is dropped. Over the cap the `over_cap` outcome is counted
    /// here.
    pub fn enter<'a>(&'a self, metrics: &'a Metrics, pool: &'a str, max: usize) -> Option<HoldPlace<'a>> {
        {
            let mut by_pool = self.by_pool.lock().unwrap_or_else(PoisonError::into_inner);
            let n = by_pool.entry(pool.to_string()).or_insert(0);
            if *n >= max {
                drop(by_pool);
                metrics.hold_ended(pool, HoldOutcome::OverCap, false);
                return None;
            }
            *n += 1;
        }
        metrics.hold_began(pool);
        Some(HoldPlace { holds: self, metrics, pool, outcome: HoldOutcome::Closed })
    }

    /// Connections of `pool` held now.
    pub fn held(&self, pool: &str) -> usize {
        self.by_pool.lock().unwrap_or_else(PoisonError::into_inner).get(pool).copied().unwrap_or(0)
    }
}

/// One held connection's place under `hold_max`. Dropping it ends the hold with the outcome
/// set by [`HoldPlace::end`], or `closed` when the connection's setup was dropped while it
/// waited (the client left, or a drain closed it).
pub struct HoldPlace<'a> {
    holds: &'a Holds,
    metrics: &'a Metrics,
    pool: &'a str,
    outcome: HoldOutcome,
}

impl HoldPlace<'_> {
    /// Ends the hold with `outcome`.
    pub fn end(mut self, outcome: HoldOutcome) {
        self.outcome = outcome;
    }
}

impl Drop for HoldPlace<'_> {
    fn drop(&mut self) {
        {
            let mut by_pool = self.holds.by_pool.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = by_pool.get_mut(self.pool) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    by_pool.remove(self.pool);
                }
            }
        }
        self.metrics.hold_ended(self.pool, self.outcome, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_bounds_held_connections_per_pool_and_every_end_is_counted() {
        let (holds, m) = (Holds::default(), Metrics::new());
        let a = holds.enter(&m, "p", 2).expect("room");
        let b = holds.enter(&m, "p", 2).expect("room");
        assert!(holds.enter(&m, "p", 2).is_none(), "over the cap");
        let other = holds.enter(&m, "q", 2).expect("another pool has its own count");
        assert_eq!(m.value("connections_held", &[("pool", "p")]), 2.0);
        assert_eq!(m.value("holds_total", &[("pool", "p"), ("outcome", "over_cap")]), 1.0);
        a.end(HoldOutcome::Home);
        drop(b);
        drop(other);
        assert_eq!(holds.held("p"), 0);
        assert_eq!(m.value("connections_held", &[("pool", "p")]), 0.0);
        assert_eq!(m.value("holds_total", &[("pool", "p"), ("outcome", "home")]), 1.0);
        assert_eq!(m.value("holds_total", &[("pool", "p"), ("outcome", "closed")]), 1.0, "dropped while held");
        assert!(holds.by_pool.lock().unwrap().is_empty(), "no entry left behind");
        assert!(holds.enter(&m, "p", 2).is_some());
    }
}
