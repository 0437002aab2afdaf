//! Bringing devices home after a rollout. A connection routed by its key stays on the broker
//! it reached until it ends: when its first choice was down (restarting, drained) it failed
//! over to its second, and stays there after the first is back. This task measures that —
//! `harbormaster_connections_away_from_home{pool}`, recomputed every [`TICK`] — and, for pools
//! with `rebalance = "home"`, moves such connections back: it closes them with the planned
//! "moved" close (`CloseCause::Rebalance`) and the client's reconnect is routed home by the
//! normal path. `POST /pools/{pool}/rebalance` runs one round of the same whatever the setting.
//!
//! Home is where a new connection with the same key would be routed now: the first of
//! `Pool::candidates` (healthy, in rotation). While a broker is down its failed-over clients
//! are therefore home for now; they count as away once it is back. Connections routed by
//! least-connections have no home and are never counted or moved. Moves are paced: oldest
//! first, at most the pool's rate per second, at most [`MAX_SHARE_PERCENT`] of any one
//! broker's connections per second, and never toward a broker that came back less than its
//! settle time ago ([`settle_time`]), so a flapping broker does not pull clients to and fro,
//! nor toward one whose last dial or probe failed.
//!
//! Cost: each tick copies the handles of connections routed by a key out of the registry (a
//! shard lock at a time) and scores every such connection against every broker of its pool —
//! one xxh3 of 8 bytes per (connection, broker): 100,000 connections over 10 brokers is a
//! million hashes, a few tens of milliseconds of one core per second. This task never touches
//! a socket: it cancels registry handles.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::drain;
use crate::admin::metrics::Metrics;
use crate::proxy::balance::{Backend, Pool, Rebalance};
use crate::proxy::broker::BrokerState;
use crate::proxy::registry::{CloseCause, ConnHandle, Registry};
use crate::proxy::snapshot::Snapshot;

/// How often the gauge is recomputed and a step of moves taken: rates are per tick.
pub const TICK: Duration = Duration::from_secs(1);
/// The most of one broker's connections (in its pool) closed for rebalancing in one tick, in
/// percent; at least one connection per tick whatever the count.
pub const MAX_SHARE_PERCENT: u64 = 10;
/// The shortest settle time: a broker must have been back this long before connections are
/// moved to it.
pub const MIN_SETTLE: Duration = Duration::from_secs(1);

/// How long a broker of `pool` must have been back in use (joined, marked up, enabled, no
/// longer drained by discovery) before connections are moved to it: one health-check
/// interval, and at least [`MIN_SETTLE`]. A broker that fails again within it is marked down
/// before anything was moved to it.
pub fn settle_time(pool: &Pool) -> Duration {
    pool.health.as_ref().map_or(MIN_SETTLE, |h| h.interval.max(MIN_SETTLE))
}

/// The most of a broker with `active` connections that one tick may move away from it.
pub fn share_cap(active: u64) -> usize {
    usize::try_from(active.saturating_mul(MAX_SHARE_PERCENT).div_ceil(100)).unwrap_or(usize::MAX).max(1)
}

/// One connection away from home.
#[derive(Debug, Clone)]
pub struct Away {
    pub handle: Arc<ConnHandle>,
    /// The index in the pool's brokers of the broker it is on.
    pub from: usize,
    /// Whether its home has been back long enough to move it there.
    pub settled: bool,
}

/// What one survey of the live connections found in one pool: its connections away from
/// home, oldest first.
#[derive(Debug)]
pub struct PoolSurvey {
    pub pool: Arc<Pool>,
    pub away: Vec<Away>,
}

/// Sorts the connections routed by a key (`handles`, oldest first) by pool (of `pools`, a
/// snapshot's) and finds those away from home. A connection whose broker is no longer in its
/// pool is left out: what happens to it is `on_backend_removed`'s business.
pub fn survey(pools: &[Arc<Pool>], handles: &[Arc<ConnHandle>]) -> Vec<PoolSurvey> {
    let now = Instant::now();
    let mut where_is: HashMap<*const BrokerState, (usize, usize)> = HashMap::new();
    let mut out = Vec::with_capacity(pools.len());
    // Per pool: the settled flag of each broker, read once.
    let mut settled: Vec<Vec<bool>> = Vec::with_capacity(pools.len());
    for (pi, pool) in pools.iter().enumerate() {
        let settle = settle_time(pool);
        for (bi, b) in pool.backends.iter().enumerate() {
            where_is.insert(Arc::as_ptr(&b.state), (pi, bi));
        }
        // A broker whose last dial or probe failed is no target either: without health checks
        // a dead broker is never marked down, and its clients would be sent back to fail over
        // again and again.
        let ready = |b: &Backend| b.failure_streak() == 0 && now.duration_since(b.back_at()) >= settle;
        settled.push(pool.backends.iter().map(|b| ready(b)).collect());
        out.push(PoolSurvey { pool: pool.clone(), away: Vec::new() });
    }
    for h in handles {
        // One being closed is on its way home already (or out).
        if h.is_closing() {
            continue;
        }
        let (Some(state), Some(key)) = (h.backend(), h.key_hash()) else { continue };
        let Some(&(pi, from)) = where_is.get(&Arc::as_ptr(state)) else { continue };
        let pool = &pools[pi];
        let Some(home) = pool.home(key) else { continue };
        if Arc::ptr_eq(&home.state, state) {
            continue;
        }
        let home_index = where_is.get(&Arc::as_ptr(&home.state)).map_or(0, |&(_, bi)| bi);
        out[pi].away.push(Away { handle: h.clone(), from, settled: settled[pi][home_index] });
    }
    out
}

/// Whether `h` is still away from home in `pool` (and not already closing): checked again
/// right before each close, since its home may have gone down in between.
fn still_away(pool: &Pool, h: &ConnHandle) -> bool {
    if h.is_closing() {
        return false;
    }
    match (h.backend(), h.key_hash().and_then(|k| pool.home(k))) {
        (Some(state), Some(home)) => !Arc::ptr_eq(state, &home.state),
        _ => false,
    }
}

/// The connections one tick moves, from `away` (oldest first): the oldest settled ones, at
/// most `budget` in all and at most [`share_cap`] of each broker's `active(from)` connections.
pub fn select(away: &[Away], budget: usize, active: impl Fn(usize) -> u64) -> Vec<Arc<ConnHandle>> {
    let mut taken: HashMap<usize, usize> = HashMap::new();
    let mut picked = Vec::new();
    for a in away.iter().filter(|a| a.settled) {
        if picked.len() >= budget {
            break;
        }
        let n = taken.entry(a.from).or_insert(0);
        if *n >= share_cap(active(a.from)) {
            continue;
        }
        *n += 1;
        picked.push(a.handle.clone());
    }
    picked
}

/// What `POST /pools/{pool}/rebalance` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundStart {
    /// Connections of the pool away from home now.
    pub away: usize,
    /// Those whose home has settled: the round moves them.
    pub moving: usize,
    /// Connections per second: `rebalance_rate` with `rebalance = "home"`, else `close_rate`.
    pub rate: u32,
    /// A round started earlier is still moving this pool's connections: this call started none.
    pub already_running: bool,
}

/// The rebalancer: the periodic task ([`Rebalancer::run`]) and the rounds the admin server
/// asks for ([`Rebalancer::start_round`]).
pub struct Rebalancer {
    current: Arc<ArcSwap<Snapshot>>,
    conns: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Pools with a round from the admin server in progress: the periodic step leaves them to
    /// it, so the two never add up to twice the rate.
    rounds: Mutex<HashSet<String>>,
    /// Cancelled when the periodic task stops (the process drains): rounds stop too.
    halt: CancellationToken,
}

impl Rebalancer {
    pub fn new(current: Arc<ArcSwap<Snapshot>>, conns: Arc<Registry>, metrics: Arc<Metrics>) -> Rebalancer {
        Rebalancer { current, conns, metrics, rounds: Mutex::new(HashSet::new()), halt: CancellationToken::new() }
    }

    fn rounds(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.rounds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every [`TICK`] until `stop`: recomputes the away gauge of every pool and, in pools with
    /// `rebalance = "home"`, moves one tick's worth of connections home. Rounds asked for
    /// through the admin server end with it.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let _halt_rounds = self.halt.clone().drop_guard();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut gauged: HashSet<String> = HashSet::new();
        let mut was_away: HashMap<String, usize> = HashMap::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let snap = self.current.load_full();
            let surveys = survey(&snap.pools, &self.conns.routed_by_key());
            let names: HashSet<String> = surveys.iter().map(|s| s.pool.name.clone()).collect();
            for gone in gauged.difference(&names) {
                self.metrics.forget_away_from_home(gone);
            }
            gauged = names;
            was_away.retain(|name, _| gauged.contains(name));
            let mut steps = Vec::new();
            for s in &surveys {
                let name = &s.pool.name;
                self.metrics.set_away_from_home(name, s.away.len());
                let before = was_away.insert(name.clone(), s.away.len()).unwrap_or(0);
                if before == 0 && !s.away.is_empty() {
                    tracing::info!(
                        target: "harbormaster::rebalance", pool = %name, away = s.away.len(),
                        rebalance = if s.pool.rebalance == Rebalance::Home { "home" } else { "off" },
                        "connections away from their first choice"
                    );
                } else if before > 0 && s.away.is_empty() {
                    tracing::info!(target: "harbormaster::rebalance", pool = %name, "every connection is on its first choice");
                }
                if s.pool.rebalance == Rebalance::Home && !self.rounds().contains(name) {
                    let picked = select(&s.away, s.pool.rebalance_rate as usize, |i| active(&s.pool, i));
                    if !picked.is_empty() {
                        steps.push(self.step(&s.pool, picked, s.pool.rebalance_rate, s.away.len()));
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = futures::future::join_all(steps) => {}
            }
        }
    }

    /// Closes `picked` (oldest first) at `rate` per second, skipping those no longer away;
    /// counts and returns how many it closed.
    async fn step(&self, pool: &Arc<Pool>, picked: Vec<Arc<ConnHandle>>, rate: u32, away: usize) -> usize {
        tracing::debug!(target: "harbormaster::rebalance", pool = %pool.name, away, moving = picked.len(), rate, "moving connections home");
        let closed =
            drain::close_at_rate(&self.conns, &picked, rate, CloseCause::Rebalance, |h| still_away(pool, h)).await;
        self.metrics.rebalanced(&pool.name, closed);
        closed
    }

    /// One round for `pool` now, whatever its `rebalance`: the connections away from home now
    /// (and settled) are moved, a tick's worth per tick, at the pool's `rebalance_rate` with
    /// `rebalance = "home"` or its `close_rate` otherwise, within the share bound. `None` for
    /// an unknown pool. Must be called within the runtime (it spawns the round).
    pub fn start_round(self: &Arc<Self>, pool: &str) -> Option<RoundStart> {
        let snap = self.current.load_full();
        let p = snap.pool(pool)?.clone();
        let rate = if p.rebalance == Rebalance::Home { p.rebalance_rate } else { p.close_rate };
        let s = survey(&snap.pools, &self.conns.routed_by_key()).into_iter().find(|s| Arc::ptr_eq(&s.pool, &p))?;
        let ids: HashSet<u64> = s.away.iter().filter(|a| a.settled).map(|a| a.handle.id()).collect();
        let moving = ids.len();
        let mut start = RoundStart { away: s.away.len(), moving, rate, already_running: false };
        if moving == 0 {
            return Some(start);
        }
        if !self.rounds().insert(pool.to_string()) {
            start.already_running = true;
            return Some(start);
        }
        tracing::info!(target: "harbormaster::rebalance", pool, away = start.away, moving, rate, "rebalance round started");
        let this = self.clone();
        let name = pool.to_string();
        tokio::spawn(async move {
            let moved = this.round(&name, ids, rate).await;
            this.rounds().remove(&name);
            tracing::info!(target: "harbormaster::rebalance", pool = %name, moved, "rebalance round done");
        });
        Some(start)
    }

    /// Moves the connections of `ids` that are still away, a tick's worth per tick, until
    /// none is left or a tick finds nothing to move. Returns how many it closed.
    async fn round(&self, pool: &str, mut ids: HashSet<u64>, rate: u32) -> usize {
        let mut moved = 0;
        while !ids.is_empty() && !self.halt.is_cancelled() {
            let started = Instant::now();
            let snap = self.current.load_full();
            let Some(p) = snap.pool(pool).cloned() else { break };
            let handles: Vec<Arc<ConnHandle>> =
                self.conns.routed_by_key().into_iter().filter(|h| ids.contains(&h.id())).collect();
            let Some(s) = survey(&snap.pools, &handles).into_iter().find(|s| Arc::ptr_eq(&s.pool, &p)) else { break };
            let picked = select(&s.away, rate as usize, |i| active(&p, i));
            if picked.is_empty() {
                break;
            }
            for h in &picked {
                ids.remove(&h.id());
            }
            moved += self.step(&p, picked, rate, s.away.len()).await;
            tokio::select! {
                _ = tokio::time::sleep_until(started + TICK) => {}
                _ = self.halt.cancelled() => break,
            }
        }
        moved
    }
}

/// Connections relayed to broker `i` of `pool` now.
fn active(pool: &Pool, i: usize) -> u64 {
    pool.backends.get(i).map_or(0, |b| b.active.load(std::sync::atomic::Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::config::load_str;
    use std::path::Path;

    /// `n` registered connections; the registrations keep them live.
    fn registered(r: &Arc<Registry>, n: usize) -> Vec<crate::proxy::registry::Registration> {
        (0..n).map(|_| r.register()).collect()
    }

    fn away(regs: &[crate::proxy::registry::Registration], r: &Registry, from: &[usize], settled: bool) -> Vec<Away> {
        let handles = r.oldest_first();
        assert_eq!(handles.len(), regs.len());
        handles.into_iter().zip(from).map(|(handle, &from)| Away { handle, from, settled }).collect()
    }

    #[test]
    fn the_share_cap_is_a_tenth_and_at_least_one() {
        assert_eq!(share_cap(0), 1);
        assert_eq!(share_cap(5), 1);
        assert_eq!(share_cap(10), 1);
        assert_eq!(share_cap(11), 2);
        assert_eq!(share_cap(150), 15);
        assert_eq!(share_cap(u64::MAX), usize::try_from(u64::MAX.div_ceil(100)).unwrap_or(usize::MAX).max(1));
    }

    #[test]
    fn selection_is_oldest_first_within_the_rate() {
        let r = Arc::new(Registry::new(CancellationToken::new()));
        let regs = registered(&r, 30);
        let a = away(&regs, &r, &[0; 30], true);
        let picked: Vec<u64> = select(&a, 7, |_| 1_000).iter().map(|h| h.id()).collect();
        let oldest: Vec<u64> = regs.iter().take(7).map(|c| c.id()).collect();
        assert_eq!(picked, oldest, "the rate caps the tick, oldest first");
        assert!(select(&a, 0, |_| 1_000).is_empty());
    }

    #[test]
    fn selection_takes_at_most_a_share_of_each_broker() {
        let r = Arc::new(Registry::new(CancellationToken::new()));
        let regs = registered(&r, 40);
        // Alternating: even on broker 0 (100 connections), odd on broker 1 (20 connections).
        let from: Vec<usize> = (0..40).map(|i| i % 2).collect();
        let a = away(&regs, &r, &from, true);
        let picked = select(&a, 100, |b| if b == 0 { 100 } else { 20 });
        let on = |b: usize| picked.iter().filter(|h| a.iter().any(|x| x.from == b && x.handle.id() == h.id())).count();
        assert_eq!((on(0), on(1)), (10, 2), "10% of each broker's connections");
        let ids: Vec<u64> = picked.iter().map(|h| h.id()).collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(ids, sorted, "still oldest first");
        assert!(ids.contains(&regs[1].id()) && ids.contains(&regs[3].id()) && !ids.contains(&regs[5].id()));
    }

    #[test]
    fn selection_skips_connections_whose_home_has_not_settled() {
        let r = Arc::new(Registry::new(CancellationToken::new()));
        let regs = registered(&r, 4);
        let mut a = away(&regs, &r, &[0; 4], true);
        a[0].settled = false;
        a[2].settled = false;
        let picked: Vec<u64> = select(&a, 10, |_| 1_000).iter().map(|h| h.id()).collect();
        assert_eq!(picked, [regs[1].id(), regs[3].id()]);
    }

    const CONFIG: &str = r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "p"

[pool.p]
backends = [{ name = "a", address = "127.0.0.1:1" }, { name = "b", address = "127.0.0.1:2" }, { name = "c", address = "127.0.0.1:3" }]
rebalance = "home"
rebalance_rate = 1000

[pool.q]
backends = ["127.0.0.1:4"]
"#;

    /// Hashes of keys whose first two choices in `pool` are `a` then `b`.
    fn keys_preferring(pool: &Pool, a: &str, b: &str, n: usize) -> Vec<u64> {
        (0..)
            .map(|i| format!("dev-{i}"))
            .filter(|k| pool.preference(k.as_bytes(), 2).iter().map(|b| b.name.as_str()).eq([a, b]))
            .map(|k| crate::proxy::balance::key_hash(k.as_bytes()))
            .take(n)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn away_counts_connections_off_their_first_choice_and_a_round_moves_them() {
        let snap = Arc::new(load_str(CONFIG, Path::new(".")).unwrap().snapshot);
        let p = snap.pool("p").unwrap().clone();
        let conns = Arc::new(Registry::new(CancellationToken::new()));
        let homed_a = keys_preferring(&p, "a", "b", 5);
        // Three of a's clients failed over to b while a was down; two are home; one client
        // without a key sits on b too.
        let regs: Vec<_> = (0..6).map(|_| conns.register()).collect();
        for (i, reg) in regs.iter().take(5).enumerate() {
            let on = if i < 3 { 1 } else { 0 };
            reg.set_backend(&p.backends[on].state, Some(homed_a[i]));
        }
        regs[5].set_backend(&p.backends[1].state, None);
        p.backends[1].active.store(4, std::sync::atomic::Ordering::Relaxed);
        let a = &p.backends[0];

        // a down: its clients are home on their second choice for now.
        a.healthy.store(false, std::sync::atomic::Ordering::Relaxed);
        let s = survey(&snap.pools, &conns.routed_by_key());
        assert_eq!(s.iter().map(|s| (s.pool.name.as_str(), s.away.len())).collect::<Vec<_>>(), [("p", 2), ("q", 0)]);
        assert!(s[0].away.iter().all(|x| x.from == 0), "a's own two, now routed elsewhere");

        // a back: the three on b are away, not settled until a has been back a while.
        assert!(a.record_success(1));
        let s = survey(&snap.pools, &conns.routed_by_key());
        assert_eq!(s[0].away.len(), 3);
        assert!(s[0].away.iter().all(|x| x.from == 1 && !x.settled));
        let current = Arc::new(ArcSwap::from(snap.clone()));
        let rb = Arc::new(Rebalancer::new(current, conns.clone(), Arc::new(Metrics::new())));
        let start = rb.start_round("p").unwrap();
        assert_eq!(start, RoundStart { away: 3, moving: 0, rate: 1000, already_running: false });
        assert_eq!(rb.start_round("nope"), None);

        tokio::time::advance(MIN_SETTLE).await;
        // A failed dial since: not a target until it answers again.
        a.record_dial(false, None);
        assert_eq!(rb.start_round("p").unwrap().moving, 0);
        a.record_dial(true, None);
        let start = rb.start_round("p").unwrap();
        assert_eq!((start.away, start.moving), (3, 3));
        assert!(rb.start_round("p").unwrap().already_running);
        // b has 4 connections: one may move per tick.
        tokio::time::sleep(TICK / 2).await;
        for moved in 1..=3 {
            if moved > 1 {
                tokio::time::sleep(TICK).await;
            }
            let closing = regs.iter().filter(|r| r.is_closing()).count();
            assert_eq!(closing, moved, "one per tick from b");
        }
        for r in &regs[..3] {
            assert_eq!(r.closed().await, CloseCause::Rebalance);
        }
        assert!(!regs[3].is_closing() && !regs[4].is_closing() && !regs[5].is_closing());
        assert_eq!(rb.metrics.value("rebalanced_total", &[("pool", "p")]), 3.0);
    }
}
