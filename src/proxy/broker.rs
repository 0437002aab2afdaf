//! What one broker of one pool is going through: its health and the streaks behind it,
//! discovery's drain flag, an operator's drain (admin state), its connection counters, its
//! last failed dial, and since when it has been out of use (what a pool that holds its
//! restarting brokers' connections measures `hold_timeout` from). One
//! [`BrokerState`] exists per (pool, broker identity); every snapshot that lists the broker
//! and every connection relayed to it share that one `Arc` (the control plane hands it out by
//! lookup, `control::brokers`), so nothing is copied from snapshot to snapshot and a write
//! through any of them is seen by all. Also the one place a health transition is reported.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use tokio::sync::Notify;

use super::balance::Backend;
use crate::admin::metrics::Metrics;

/// The mutable state of one broker in one pool. Health starts up: a broker is trusted until
/// probes or dials say otherwise. An operator's drain (the admin state) lives here beside
/// discovery's `draining`, so it lasts as long as the state does: while the broker stays in
/// the pool, across reloads and discovery updates; not across a restart.
#[derive(Debug)]
pub struct BrokerState {
    /// Written by health checking and by failed dials; a broker marked down keeps its place
    /// in every key's order, its clients just skip it until it is back.
    pub healthy: AtomicBool,
    /// Consecutive failures (probes and dials) since the last success.
    fails: AtomicU32,
    /// Consecutive successful probes since the last failure.
    passes: AtomicU32,
    /// Set by discovery for a broker that is shutting down (Kubernetes: serving and
    /// terminating): no new connections, established ones stay. Like a down broker it keeps
    /// its place in every key's order; unlike one it is never tried, even as a last resort.
    draining: AtomicBool,
    /// Drained by an operator (`POST /backends/{pool}/{broker}/drain`): skipped like a
    /// draining broker. The flag is what the data plane reads; `admin` is for `/backends`,
    /// and the flag is written under its lock.
    drained: AtomicBool,
    admin: Mutex<AdminState>,
    /// Connections relayed to it right now: what least-connections and `/backends` read.
    pub active: AtomicU64,
    /// Connections relayed to it since the state was created.
    pub total: AtomicU64,
    /// The last failed connect to it from the data plane, and when (`/backends`).
    last_error: Mutex<Option<(SystemTime, String)>>,
    /// Since when it has been marked down, and since when discovery has been draining it:
    /// written only when either changes.
    away: Mutex<Away>,
    /// Woken whenever it may have come back into use (marked up, no longer draining, enabled):
    /// connections held for it (`on_backend_restart = "hold"`) wait on it instead of polling.
    back: Notify,
    /// When it last came (back) into use: joined the pool (the state was created), was marked
    /// up, enabled by an operator or no longer drained by discovery. Connections are moved
    /// back to a broker only once it has stayed usable a while (`control::rebalance`). Tokio's
    /// clock, so that tests can move it.
    back_at: Mutex<tokio::time::Instant>,
}

/// When a broker went out of use, per cause.
#[derive(Debug, Default, Clone, Copy)]
struct Away {
    down: Option<Instant>,
    draining: Option<Instant>,
}

impl Default for BrokerState {
    fn default() -> BrokerState {
        BrokerState {
            healthy: AtomicBool::new(true),
            fails: AtomicU32::new(0),
            passes: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            admin: Mutex::new(AdminState::default()),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            last_error: Mutex::new(None),
            away: Mutex::new(Away::default()),
            back: Notify::new(),
            back_at: Mutex::new(tokio::time::Instant::now()),
        }
    }
}

impl BrokerState {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Discovery's word on whether the broker is shutting down (or, in a pool that holds, has
    /// just left it). The start of a drain is remembered; its end wakes the connections held
    /// for the broker.
    pub fn set_draining(&self, draining: bool) {
        if self.draining.swap(draining, Ordering::Relaxed) == draining {
            return;
        }
        self.away().draining = draining.then(Instant::now);
        if !draining {
            self.mark_back();
        }
    }

    fn away(&self) -> std::sync::MutexGuard<'_, Away> {
        self.away.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Since when the broker has been out of use for a reason that a restart explains: marked
    /// down, or drained by discovery (terminating, or gone from the pool), whichever came
    /// first. `None` while it is in use, and while an operator drains it: that drain is meant
    /// to move its clients, not to keep them waiting.
    pub fn away_since(&self) -> Option<Instant> {
        if self.is_admin_drained() {
            return None;
        }
        let away = *self.away();
        let down = away.down.filter(|_| !self.is_healthy());
        let draining = away.draining.filter(|_| self.is_draining());
        match (down, draining) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether new connections can be dialled to it now: up and in rotation.
    pub fn usable(&self) -> bool {
        self.is_healthy() && self.in_rotation()
    }

    /// A future that resolves the next time the broker may have come back into use. Created
    /// (and enabled) before the state is read, so a change in between is not missed.
    pub fn back(&self) -> tokio::sync::futures::Notified<'_> {
        self.back.notified()
    }

    /// When the broker last came (back) into use: joined, marked up, enabled, undrained.
    pub fn back_at(&self) -> tokio::time::Instant {
        *self.back_at.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// It may be back in use: wake the connections held for it, and remember when.
    fn mark_back(&self) {
        self.back.notify_waiters();
        *self.back_at.lock().unwrap_or_else(PoisonError::into_inner) = tokio::time::Instant::now();
    }

    /// Whether new connections may go to it: neither discovery nor an operator drains it.
    pub fn in_rotation(&self) -> bool {
        !self.is_draining() && !self.drained.load(Ordering::Relaxed)
    }

    /// Whether an operator has drained it (and not enabled it since).
    pub fn is_admin_drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    /// The operator's word on it now, and since when.
    pub fn admin_state(&self) -> AdminState {
        *self.admin.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An operator's drain: out of rotation from now. Returns the state after, and whether
    /// this call changed it (false: it was drained already, and keeps its first time).
    pub fn admin_drain(&self) -> (AdminState, bool) {
        self.set_admin(true)
    }

    /// An operator's enable: back in rotation. Returns the state after, and whether this call
    /// changed it.
    pub fn admin_enable(&self) -> (AdminState, bool) {
        self.set_admin(false)
    }

    fn set_admin(&self, drained: bool) -> (AdminState, bool) {
        let mut admin = self.admin.lock().unwrap_or_else(PoisonError::into_inner);
        if admin.drained == drained {
            return (*admin, false);
        }
        *admin = AdminState { drained, since: Some(SystemTime::now()) };
        self.drained.store(drained, Ordering::Relaxed);
        if !drained {
            self.mark_back();
        }
        (*admin, true)
    }

    /// Remember a failed connect to this broker, for `/backends`.
    pub fn set_last_error(&self, error: &str) {
        *self.last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some((SystemTime::now(), error.to_string()));
    }

    /// The last failed connect and when it happened, if any.
    pub fn last_error(&self) -> Option<(SystemTime, String)> {
        self.last_error.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// A failed probe or dial. Returns true when this failure marked the broker down (the
    /// `fall`-th in a row while it was up).
    pub fn record_failure(&self, fall: u32) -> bool {
        self.passes.store(0, Ordering::Relaxed);
        let n = bump(&self.fails);
        let down =
            n >= fall && self.healthy.compare_exchange(true, false, Ordering::Relaxed, Ordering::Relaxed).is_ok();
        if down {
            self.away().down = Some(Instant::now());
        }
        down
    }

    /// A successful probe. Returns true when this success brought the broker back (the
    /// `rise`-th in a row while it was down).
    pub fn record_success(&self, rise: u32) -> bool {
        self.fails.store(0, Ordering::Relaxed);
        let n = bump(&self.passes);
        let up = n >= rise && self.healthy.compare_exchange(false, true, Ordering::Relaxed, Ordering::Relaxed).is_ok();
        if up {
            self.away().down = None;
            self.mark_back();
        }
        up
    }

    /// A dial from the data plane. A failure counts toward the pool's `fall` when the pool
    /// has active checks (`fall` is `Some`): only they can bring a broker back, so without
    /// them a dial failure never marks one down, it only lengthens the failure streak (which
    /// keeps rebalancing from sending clients to it). A success resets the failure streak but
    /// does not count toward `rise`. Returns true when this dial marked the broker down.
    pub fn record_dial(&self, ok: bool, fall: Option<u32>) -> bool {
        if ok {
            // Read first: on the hot path the streak is 0 and the cache line stays shared.
            if self.fails.load(Ordering::Relaxed) != 0 {
                self.fails.store(0, Ordering::Relaxed);
            }
            return false;
        }
        match fall {
            Some(fall) => self.record_failure(fall),
            None => {
                bump(&self.fails);
                false
            }
        }
    }

    /// Consecutive failures since the last success (for logs).
    pub fn failure_streak(&self) -> u32 {
        self.fails.load(Ordering::Relaxed)
    }

    /// Back to the initial health: up, no streaks. For a pool without active checks, where
    /// nothing would ever bring a broker marked down back.
    pub fn forget_health(&self) {
        self.healthy.store(true, Ordering::Relaxed);
        self.fails.store(0, Ordering::Relaxed);
        self.passes.store(0, Ordering::Relaxed);
        self.away().down = None;
        self.back.notify_waiters();
    }
}

/// An operator's word on a broker (the admin state): drained or enabled, and since when.
/// `since` is `None` for a broker nobody has drained since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdminState {
    pub drained: bool,
    pub since: Option<SystemTime>,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        if self.drained {
            "drained"
        } else {
            "enabled"
        }
    }
}

/// Adds one to a streak counter without wrapping; returns the new value.
fn bump(counter: &AtomicU32) -> u32 {
    let old = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_add(1)));
    old.unwrap_or_else(|n| n).saturating_add(1)
}

/// Which way a broker's health went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

/// Logs and counts one health transition of broker `b` of `pool`, whichever of probes or
/// dials caused it; `reason` says what (the streak and the last result).
pub fn report_transition(metrics: &Metrics, pool: &str, b: &Backend, to: Transition, reason: &str) {
    let state = if to == Transition::Up { "up" } else { "down" };
    match to {
        Transition::Up => tracing::info!(
            target: "harbormaster::health",
            pool, broker = %b.name, addr = %b.addr, state, reason,
            "broker health changed"
        ),
        Transition::Down => tracing::warn!(
            target: "harbormaster::health",
            pool, broker = %b.name, addr = %b.addr, state, reason,
            "broker health changed"
        ),
    }
    metrics.health_transition(pool, &b.name, to == Transition::Up);
    metrics.set_broker_healthy(pool, &b.name, to == Transition::Up);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_consecutive_failures_mark_down_and_rise_successes_bring_back() {
        let b = BrokerState::default();
        assert!(!b.record_failure(3));
        assert!(!b.record_failure(3));
        assert!(!b.record_success(2), "a success resets the failure streak");
        assert!(!b.record_failure(3));
        assert!(!b.record_failure(3));
        assert!(b.is_healthy());
        assert!(b.record_failure(3), "third in a row: down");
        assert!(!b.is_healthy());
        assert!(!b.record_failure(3), "already down: no second transition");
        assert!(!b.record_success(2));
        assert!(!b.record_failure(3), "a failure resets the success streak");
        assert!(!b.record_success(2));
        assert!(b.record_success(2), "second in a row: up");
        assert!(b.is_healthy());
        assert!(!b.record_success(2));
    }

    #[test]
    fn passive_failures_count_only_with_active_checks() {
        let b = BrokerState::default();
        for _ in 0..100 {
            assert!(!b.record_dial(false, None));
        }
        assert!(b.is_healthy(), "without active checks nothing could bring it back");
        assert_eq!(b.failure_streak(), 100, "but the streak is kept");
        assert!(!b.record_dial(true, None));
        assert_eq!(b.failure_streak(), 0);
        let b = BrokerState::default();
        assert!(!b.record_dial(false, Some(2)));
        assert!(!b.record_dial(true, Some(2)), "a dial success resets the streak");
        assert!(!b.record_dial(false, Some(2)));
        assert!(b.record_dial(false, Some(2)));
        assert!(!b.is_healthy());
        assert!(!b.record_dial(true, Some(2)));
        assert!(!b.is_healthy(), "only probes bring a broker back");
        assert!(b.record_success(1));
        assert!(b.is_healthy());
    }

    #[test]
    fn an_operator_drain_takes_the_broker_out_of_rotation_until_enabled() {
        let b = BrokerState::default();
        assert!(b.in_rotation());
        assert_eq!(b.admin_state(), AdminState { drained: false, since: None });
        assert_eq!(b.admin_enable(), (AdminState::default(), false), "enabling an enabled broker changes nothing");
        let (drained, changed) = b.admin_drain();
        assert!(changed && drained.drained && drained.since.is_some());
        assert!(!b.in_rotation() && b.is_admin_drained());
        assert_eq!(b.admin_state(), drained);
        assert_eq!(b.admin_drain(), (drained, false), "a second drain keeps the first time");
        assert!(b.is_healthy() && !b.is_draining(), "health and discovery's flag are separate");
        let (enabled, changed) = b.admin_enable();
        assert!(changed && !enabled.drained && enabled.since.is_some());
        assert!(b.in_rotation() && !b.is_admin_drained());
        assert_eq!(b.admin_state().as_str(), "enabled");
        b.set_draining(true);
        assert!(!b.in_rotation(), "discovery's drain still counts");
    }

    #[tokio::test(start_paused = true)]
    async fn coming_back_into_use_is_timed() {
        let b = BrokerState::default();
        let joined = b.back_at();
        tokio::time::advance(std::time::Duration::from_secs(5)).await;
        assert!(b.record_failure(1));
        assert_eq!(b.back_at(), joined, "going down is not coming back");
        assert!(b.record_success(1));
        let up = b.back_at();
        assert!(up > joined, "marked up");
        tokio::time::advance(std::time::Duration::from_secs(5)).await;
        b.admin_drain();
        assert_eq!(b.back_at(), up);
        b.admin_enable();
        let enabled = b.back_at();
        assert!(enabled > up, "enabled");
        tokio::time::advance(std::time::Duration::from_secs(5)).await;
        b.set_draining(false);
        assert_eq!(b.back_at(), enabled, "not draining before: nothing changed");
        b.set_draining(true);
        b.set_draining(false);
        assert!(b.back_at() > enabled, "discovery's drain lifted");
    }

    #[test]
    fn away_since_is_the_first_of_down_and_draining_and_never_for_an_operators_drain() {
        let b = BrokerState::default();
        assert_eq!(b.away_since(), None);
        assert!(b.record_failure(1));
        let down = b.away_since().expect("marked down");
        b.set_draining(true);
        assert_eq!(b.away_since(), Some(down), "the earlier of the two");
        assert!(b.record_success(1));
        let draining = b.away_since().expect("still draining");
        assert!(draining >= down);
        b.admin_drain();
        assert_eq!(b.away_since(), None, "an operator's drain moves clients, it does not hold them");
        b.admin_enable();
        b.set_draining(false);
        assert_eq!(b.away_since(), None);
        assert!(b.usable());
    }

    #[tokio::test]
    async fn coming_back_wakes_those_waiting() {
        for bring_back in [
            (|b: &BrokerState| assert!(b.record_success(1))) as fn(&BrokerState),
            |b| b.set_draining(false),
            |b| b.forget_health(),
        ] {
            let b = BrokerState::default();
            assert!(b.record_failure(1));
            b.set_draining(true);
            let mut back = std::pin::pin!(b.back());
            back.as_mut().enable();
            bring_back(&b);
            tokio::time::timeout(std::time::Duration::from_secs(5), back).await.expect("woken");
        }
    }

    #[test]
    fn streaks_saturate_instead_of_wrapping() {
        let b = BrokerState::default();
        b.fails.store(u32::MAX - 1, Ordering::Relaxed);
        b.record_failure(3);
        b.record_failure(3);
        assert_eq!(b.failure_streak(), u32::MAX);
        assert!(!b.is_healthy());
    }

    #[test]
    fn forgetting_health_is_the_initial_state() {
        let b = BrokerState::default();
        assert!(b.record_failure(1));
        assert!(!b.record_success(3));
        b.forget_health();
        assert!(b.is_healthy());
        assert_eq!(b.failure_streak(), 0);
        assert!(!b.record_failure(2), "the failure streak starts again");
        assert!(b.record_failure(2));
        assert!(!b.record_success(2), "so does the success streak");
    }

    #[test]
    fn a_transition_is_logged_counted_and_mirrored_in_the_gauge() {
        let m = Metrics::new();
        let b = Backend::new("b0", ([127, 0, 0, 1], 1).into());
        report_transition(&m, "p", &b, Transition::Down, "3 failures in a row, last: dial: refused");
        assert_eq!(
            m.value("broker_health_transitions_total", &[("pool", "p"), ("broker", "b0"), ("state", "down")]),
            1.0
        );
        assert_eq!(m.value("broker_healthy", &[("pool", "p"), ("broker", "b0")]), 0.0);
        report_transition(&m, "p", &b, Transition::Up, "2 tcp checks passed in a row");
        assert_eq!(
            m.value("broker_health_transitions_total", &[("pool", "p"), ("broker", "b0"), ("state", "up")]),
            1.0
        );
        assert_eq!(m.value("broker_healthy", &[("pool", "p"), ("broker", "b0")]), 1.0);
    }
}
