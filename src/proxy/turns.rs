//! Turns for the expensive TLS handshake steps, taken only while established connections have
//! traffic to protect.
//!
//! In a reconnect storm hundreds of handshakes are runnable at once, each step tens of
//! microseconds of signing, and a runtime worker runs its tasks in arrival order and polls for
//! I/O only every 61 of them: an established connection's byte waited behind all of them
//! (30 ms at the 99th percentile, measured). A turn (one per worker, in arrival order; the
//! others wait outside the run queue) followed by a yield makes the worker run everything else
//! runnable and poll for I/O before each such step; that round trip through the scheduler
//! costs about 10% more CPU per new session (docs/benchmarks.md). It buys nothing when no
//! established connection is moving bytes, so turns are taken only within [`WINDOW`] of
//! traffic on a connection that has been relaying for at least [`ESTABLISHED_AFTER`]; the
//! sessions of the storm itself, younger than that, do not count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

/// How long a connection relays before its traffic counts as established traffic.
pub const ESTABLISHED_AFTER: Duration = Duration::from_millis(100);
/// How long after the last established traffic handshake steps keep taking turns.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Established traffic is recorded at most this often: a relay moving bytes mostly only reads
/// the shared timestamp, so busy workers do not fight over its cache line.
const RECORD_EVERY_US: u64 = 10_000;

/// The handshake turns of one process.
pub struct Turns {
    permits: Semaphore,
    base: Instant,
    /// When established traffic was last seen, in µs since `base` (0: never).
    last_traffic: AtomicU64,
}

impl Turns {
    /// One turn per runtime worker.
    pub fn new(workers: usize) -> Turns {
        Turns { permits: Semaphore::new(workers.max(1)), base: Instant::now(), last_traffic: AtomicU64::new(0) }
    }

    /// A relay that started at `relay_started` moved bytes.
    pub fn note_traffic(&self, relay_started: Instant) {
        let now = Instant::now();
        if now.saturating_duration_since(relay_started) < ESTABLISHED_AFTER {
            return;
        }
        let t = self.micros(now);
        let last = self.last_traffic.load(Ordering::Relaxed);
        if last == 0 || t.saturating_sub(last) >= RECORD_EVERY_US {
            self.last_traffic.store(t, Ordering::Relaxed);
        }
    }

    /// Whether established traffic was seen within [`WINDOW`] of `now`.
    fn protecting(&self, now: Instant) -> bool {
        let last = self.last_traffic.load(Ordering::Relaxed);
        last != 0 && self.micros(now).saturating_sub(last) < WINDOW.as_micros() as u64
    }

    /// Waits for a turn and for the worker to have run everything else runnable and polled
    /// for I/O, when established connections have recent traffic; otherwise returns at once.
    /// The step runs while the returned permit is held.
    pub async fn take(&self) -> Option<SemaphorePermit<'_>> {
        if !self.protecting(Instant::now()) {
            return None;
        }
        // Never closed; without a permit the step just runs.
        let permit = self.permits.acquire().await.ok();
        // Resumes once the worker has run everything else runnable and polled for I/O.
        tokio::task::yield_now().await;
        // Woken after that poll, this task takes the worker's next-task slot and pushes the
        // tasks the poll woke (the established connections' packets) behind everything else
        // queued. Going once to the back of the queue lets them run before this step: an
        // established session's round trip during a storm went from ~335 to ~225 µs at the
        // median, for ~2% more CPU per handshake.
        to_back_of_queue().await;
        permit
    }

    /// Turns not held by a step at the moment.
    #[cfg(test)]
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// Makes every step take a turn, as if established traffic had just been seen.
    #[cfg(test)]
    pub fn protect_now(&self) {
        self.last_traffic.store(self.micros(Instant::now()).max(1), Ordering::Relaxed);
    }

    fn micros(&self, t: Instant) -> u64 {
        // +1 keeps 0 free for "never".
        t.saturating_duration_since(self.base).as_micros() as u64 + 1
    }
}

/// Reschedules the task at the back of its worker's run queue: a task that wakes itself while
/// it runs is queued like a yield, without waiting for an I/O poll.
async fn to_back_of_queue() {
    let mut queued = false;
    std::future::poll_fn(|cx| {
        if queued {
            return Poll::Ready(());
        }
        queued = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_traffic_of_established_connections_turns_protection_on() {
        let turns = Turns::new(1);
        let now = Instant::now();
        assert!(!turns.protecting(now), "nothing seen yet");
        // A storm session relaying its CONNACK right after the handshake does not count.
        turns.note_traffic(now);
        assert!(!turns.protecting(Instant::now()));
        // A connection relaying for longer does.
        turns.note_traffic(now - ESTABLISHED_AFTER);
        assert!(turns.protecting(Instant::now()));
        // And the protection lapses a window after the last such traffic.
        assert!(!turns.protecting(Instant::now() + WINDOW));
    }

    #[tokio::test]
    async fn a_turn_is_taken_only_while_protecting() {
        let turns = Turns::new(1);
        assert!(turns.take().await.is_none());
        turns.protect_now();
        let permit = turns.take().await;
        assert!(permit.is_some());
        assert_eq!(turns.available(), 0);
        drop(permit);
        assert_eq!(turns.available(), 1);
    }
}
