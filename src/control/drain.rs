//! Paced closing of live connections: after SIGTERM (spread over `drain_timeout`) and for the
//! clients of a broker that left its pool (`on_backend_removed = "close"`) or that an operator
//! drained (`POST /backends/{pool}/{broker}/drain`), at the pool's `close_rate` per second. Closing a connection cancels its registry handle; its own task ends the relay and
//! logs why. Spreading the closes turns a fleet's reconnects into a steady trickle that the
//! other replicas and brokers absorb, instead of one storm at the end of the window.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::proxy::broker::BrokerState;
use crate::proxy::registry::{CloseCause, ConnHandle, Registry};

/// Closes every live connection of `conns`, oldest first, evenly over `window`: each step
/// waits (time left) / (connections left) and closes the oldest one still open, so the last
/// closes as the window ends and connections that end by themselves make room for the rest.
/// Returns early once `tracker` (closed by the caller) has no task left. Returns how many
/// connections it closed. Connections registered after the call are not seen: stop
/// accepting first.
pub async fn paced_close(conns: &Registry, window: Duration, tracker: &TaskTracker) -> usize {
    let deadline = Instant::now() + window;
    let order = conns.oldest_first();
    let mut next = order.iter();
    // Closed but not yet unregistered (their tasks are still finishing): not "left".
    let mut closing: Vec<&Arc<ConnHandle>> = Vec::new();
    let mut closed = 0;
    loop {
        closing.retain(|h| conns.is_live(h.id()));
        let left = conns.len().saturating_sub(closing.len());
        let now = Instant::now();
        if left == 0 || now >= deadline {
            break;
        }
        let gap = (deadline - now) / u32::try_from(left).unwrap_or(u32::MAX);
        tokio::select! {
            _ = tokio::time::sleep(gap) => {}
            _ = tracker.wait() => break,
        }
        let Some(h) = next.by_ref().find(|h| conns.is_live(h.id())) else { break };
        h.close(CloseCause::Drain);
        closing.push(h);
        closed += 1;
    }
    closed
}

/// Moves an operator-drained broker's clients away (an evacuation): closes its connections,
/// oldest first, at `rate` per second with the planned "moved" close (MQTT 5: DISCONNECT
/// 0x9C), and stops closing once the broker is enabled again. Returns how many it closed.
pub async fn evacuate(conns: Arc<Registry>, broker: Arc<BrokerState>, rate: u32) -> usize {
    let mut victims = conns.relayed_to(&broker);
    victims.sort_unstable_by_key(|h| h.id());
    close_at_rate(&conns, &victims, rate, CloseCause::BrokerDrained, |_| broker.is_admin_drained()).await
}

/// Closes `victims` (oldest first) at `rate` per second, skipping those that ended already or
/// for which `still_wanted` turns false (their broker came back). Returns how many it closed.
pub async fn close_at_rate(
    conns: &Registry,
    victims: &[Arc<ConnHandle>],
    rate: u32,
    cause: CloseCause,
    mut still_wanted: impl FnMut(&ConnHandle) -> bool,
) -> usize {
    let gap = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut closed = 0;
    for h in victims {
        if !conns.is_live(h.id()) || !still_wanted(h) {
            continue;
        }
        if closed > 0 {
            tokio::time::sleep(gap).await;
            if !conns.is_live(h.id()) || !still_wanted(h) {
                continue;
            }
        }
        h.close(cause);
        closed += 1;
    }
    closed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio_util::sync::CancellationToken;

    /// Which connection closed, and when after the start.
    type CloseLog = Arc<Mutex<Vec<(u64, Duration)>>>;

    /// `n` registered "connections", each a task that ends when closed and records when.
    fn connections(n: usize, tracker: &TaskTracker, conns: &Arc<Registry>) -> (CloseLog, Vec<u64>) {
        let start = Instant::now();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut ids = Vec::new();
        for _ in 0..n {
            let reg = conns.register();
            ids.push(reg.id());
            let log = log.clone();
            tracker.spawn(async move {
                reg.closed().await;
                log.lock().unwrap().push((reg.id(), start.elapsed()));
            });
        }
        (log, ids)
    }

    #[tokio::test(start_paused = true)]
    async fn drain_spreads_closes_evenly_oldest_first() {
        let conns = Arc::new(Registry::new(CancellationToken::new()));
        let tracker = TaskTracker::new();
        let (log, ids) = connections(200, &tracker, &conns);
        tracker.close();
        let window = Duration::from_secs(4);
        let closed = paced_close(&conns, window, &tracker).await;
        tracker.wait().await;
        assert_eq!(closed, 200);
        let log = log.lock().unwrap().clone();
        let order: Vec<u64> = log.iter().map(|(id, _)| *id).collect();
        assert_eq!(order, ids, "oldest first");
        let (first, last) = (log[0].1, log[199].1);
        assert!(first <= Duration::from_millis(40), "first close at {first:?}");
        assert!(last >= Duration::from_millis(3_900) && last <= window, "last close at {last:?}");
        // Evenly: every tenth of the window sees about a tenth of the closes.
        for slice in 0..10u32 {
            let (a, b) = (window * slice / 10, window * (slice + 1) / 10);
            let n = log.iter().filter(|(_, t)| *t > a && *t <= b).count();
            assert!((15..=25).contains(&n), "{n} closes in slice {slice}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn drain_ends_when_the_last_connection_leaves_by_itself() {
        let conns = Arc::new(Registry::new(CancellationToken::new()));
        let tracker = TaskTracker::new();
        let reg = conns.register();
        tracker.spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(reg);
        });
        tracker.close();
        let started = Instant::now();
        assert_eq!(paced_close(&conns, Duration::from_secs(600), &tracker).await, 0);
        assert!(started.elapsed() < Duration::from_secs(2), "waited {:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn removed_brokers_connections_close_at_the_rate_unless_wanted_again() {
        let conns = Arc::new(Registry::new(CancellationToken::new()));
        let tracker = TaskTracker::new();
        let (log, _) = connections(10, &tracker, &conns);
        let victims = conns.oldest_first();
        let spare = victims[7].id();
        let started = Instant::now();
        let closed = close_at_rate(&conns, &victims, 5, CloseCause::BrokerRemoved, |h| h.id() != spare).await;
        assert_eq!(closed, 9);
        // 9 closes at 5 per second: 8 gaps of 200 ms.
        assert_eq!(started.elapsed(), Duration::from_millis(1_600));
        tracker.close();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(conns.is_live(spare));
        assert_eq!(log.lock().unwrap().len(), 9);
    }
}
