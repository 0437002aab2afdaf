//! Giving memory back after a storm. Thousands of connections that come and go (a fleet
//! reconnecting, silent or oversized connections) leave the allocator with free memory spread
//! over every runtime worker thread. mimalloc keeps a thread's free pages with that thread
//! until the thread itself allocates again in those sizes or collects, so after a storm that
//! memory stayed resident, storm after storm (47 MB after 4,000 silent connections, from a
//! baseline of 18 MB).
//!
//! A control-plane task watches the live connections and the setup bytes; when they have
//! fallen well below their peak since it last looked, a storm has passed, and it starts a
//! new *reclaim round*, and one more at each of the next few ticks for the connections still
//! closing. Each worker thread, the next time it runs out of work, gives back its
//! free memory once per round: the relay's spare buffers, then whatever the binary's hook
//! does (harbormaster's `main` asks mimalloc to collect the thread's heap and return free
//! pages to the system). Workers that sleep through a round are woken by a few empty tasks.
//! The costs are a load and a compare each time a worker parks, and a collection per worker
//! per round, only after a storm.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::proxy::connection::Shared;
use crate::proxy::relay;

/// How often the task looks at the connection count and the setup bytes.
const TICK: Duration = Duration::from_secs(2);
/// Fewer connections than their peak by at least this much (and by an eighth of the peak)
/// is a storm that passed.
const CONNECTIONS_GONE: usize = 128;
/// Setup bytes below their peak by at least this much: large CONNECTs that came and went.
const SETUP_BYTES_GONE: usize = 1 << 20;

/// Rounds after the one a storm starts, one per tick: a storm of thousands of connections
/// takes a few seconds to close on a busy machine.
const SETTLE_ROUNDS: u32 = 5;

/// The current reclaim round; 0: none yet.
static ROUND: AtomicU64 = AtomicU64::new(0);
/// Workers that have given back their memory in the current round.
static DONE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The last round this thread took part in.
    static SEEN: Cell<u64> = const { Cell::new(0) };
}

/// Called by each runtime worker thread each time it runs out of work (tokio's
/// `on_thread_park`): once per reclaim round, frees the thread's spare relay buffers and
/// runs `give_back`, which returns the thread's free memory to the system. Otherwise a load
/// and a compare.
pub fn worker_parked(give_back: fn()) {
    let round = ROUND.load(Ordering::Acquire);
    if SEEN.with(Cell::get) == round {
        return;
    }
    SEEN.with(|s| s.set(round));
    relay::release_spare_buffers();
    give_back();
    DONE.fetch_add(1, Ordering::Release);
}

/// The reclaim round in progress (for tests).
pub fn round() -> u64 {
    ROUND.load(Ordering::Acquire)
}

/// Whether the live connections (`peak` → `now`) or the setup bytes fell enough since the
/// last look to call it a storm that passed.
fn storm_passed(conns: (usize, usize), setup: (usize, usize)) -> bool {
    let (peak, now) = conns;
    let gone = peak.saturating_sub(now);
    let (setup_peak, setup_now) = setup;
    (gone >= CONNECTIONS_GONE && gone >= peak / 8) || setup_peak.saturating_sub(setup_now) >= SETUP_BYTES_GONE
}

/// Watches `shared` every [`TICK`] until `stop`: after a storm, shrinks the registry's maps
/// and starts a reclaim round; while a round has workers that have not taken part, wakes
/// them with empty tasks.
pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    // This runtime's workers and the setup runtime's, which take part in every round too.
    let runtimes: Vec<_> = std::iter::once(tokio::runtime::Handle::current()).chain(shared.setup.clone()).collect();
    let workers = runtimes.iter().map(|rt| rt.metrics().num_workers()).sum::<usize>();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Rounds still to run after a storm: connections still closing when the first one ran,
    // and pages that only their last blocks kept in use, are given back by the later ones.
    let mut settle = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let conns = (shared.conns.take_peak(), shared.conns.len());
        let setup = (shared.setup_bytes.take_peak(), shared.setup_bytes.used());
        if storm_passed(conns, setup) {
            settle = SETTLE_ROUNDS + 1;
        }
        if settle > 0 {
            settle -= 1;
            shared.conns.shrink();
            DONE.store(0, Ordering::Release);
            let round = ROUND.fetch_add(1, Ordering::AcqRel) + 1;
            tracing::debug!(round, peak = conns.0, live = conns.1, setup_peak = setup.0, "memory: reclaim round");
        }
        let done = DONE.load(Ordering::Acquire);
        if ROUND.load(Ordering::Acquire) > 0 && done < workers {
            tracing::debug!(done, workers, "memory: waking workers for the reclaim round");
            // Idle workers park until there is work; a task for each, stolen from this
            // worker's queue, gets them to park again and take part.
            for rt in &runtimes {
                for _ in 0..rt.metrics().num_workers() * 2 {
                    rt.spawn(tokio::task::yield_now());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_is_a_large_fall_from_the_peak() {
        assert!(storm_passed((4_001, 1), (0, 0)), "4,000 silent connections closed");
        assert!(!storm_passed((50, 1), (0, 0)), "a few connections is no storm");
        assert!(!storm_passed((100_000, 99_000), (0, 0)), "churn of a large fleet");
        assert!(storm_passed((100_000, 80_000), (0, 0)));
        assert!(storm_passed((101, 1), (100 * 262_000, 0)), "large CONNECTs came and went");
        assert!(!storm_passed((1, 1), (4_096, 512)));
    }

    #[test]
    fn each_worker_takes_part_once_per_round() {
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        fn count() {
            CALLS.fetch_add(1, Ordering::Relaxed);
        }
        // The rounds are process-wide: other tests of this binary do not start any.
        worker_parked(count);
        let before = CALLS.load(Ordering::Relaxed);
        worker_parked(count);
        assert_eq!(CALLS.load(Ordering::Relaxed), before, "nothing new: nothing to do");
        ROUND.fetch_add(1, Ordering::AcqRel);
        worker_parked(count);
        worker_parked(count);
        assert_eq!(CALLS.load(Ordering::Relaxed), before + 1);
        let other = std::thread::spawn(|| worker_parked(count));
        other.join().unwrap();
        assert_eq!(CALLS.load(Ordering::Relaxed), before + 2, "another thread takes part too");
    }
}
