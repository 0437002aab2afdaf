//! The memory budget of connections in setup. A CONNECT can be up to `max_connect_packet`
//! bytes and has `connect_timeout` to arrive, so clients that send all but the last bytes of
//! large CONNECTs could otherwise make the process hold that much per connection until memory
//! runs out and every session on the process dies with it. Every connection charges the
//! buffers it holds for its CONNECT to one process-wide counter before it allocates them and
//! gives the charge back when they are freed ([`SetupCharge`] is RAII); a charge that would
//! take the total over `limits.max_setup_bytes` is refused, and the connection is closed.
//! A TLS listener's receive buffer (an incomplete handshake record can announce 16 KiB, a
//! handshake message 64 KiB) is charged the same way from the first byte until the CONNECT is
//! complete ([`super::tls_stream`] holds a [`SetupCharge`] while in setup).
//! Established connections charge nothing and are never touched.
//!
//! Buffers past [`SMALL`] may grow only while the total stays within half the budget: a
//! device's CONNECT is well under 1 KiB, so however many large CONNECTs are in flight, half
//! the budget is left for a fleet reconnecting with small ones.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;

/// The largest buffer that may use the whole budget: room for a CONNECT with a long token as
/// its password.
pub const SMALL: usize = 4096;

/// Bytes held by connections in setup, process-wide. The limit is not stored here: each
/// charge is checked against the `max_setup_bytes` of the caller's snapshot, so a reload
/// applies to the next charge. Cloning shares the counter: a [`SetupCharge`] holds one, so a
/// charge can live in a stream that outlives any borrow of the process's state.
#[derive(Debug, Clone)]
pub struct SetupBudget(Arc<Counter>);

#[derive(Debug)]
struct Counter {
    used: AtomicUsize,
    /// The most bytes charged at once since [`SetupBudget::take_peak`] last looked.
    peak: AtomicUsize,
    /// `harbormaster_setup_bytes`, kept equal to `used`.
    gauge: IntGauge,
}

impl SetupBudget {
    pub fn new(gauge: IntGauge) -> SetupBudget {
        SetupBudget(Arc::new(Counter { used: AtomicUsize::new(0), peak: AtomicUsize::new(0), gauge }))
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.0.used.load(Ordering::Relaxed)
    }

    /// The most bytes charged at once since the last call (at least those charged now).
    pub fn take_peak(&self) -> usize {
        self.0.peak.swap(self.used(), Ordering::Relaxed).max(self.used())
    }

    /// A charge of nothing yet, for one connection.
    pub fn charge(&self) -> SetupCharge {
        SetupCharge { budget: self.clone(), held: 0 }
    }

    fn add(&self, n: usize) {
        let used = self.0.used.fetch_add(n, Ordering::Relaxed).saturating_add(n);
        self.0.peak.fetch_max(used, Ordering::Relaxed);
        self.0.gauge.add(i64::try_from(n).unwrap_or(i64::MAX));
    }

    fn sub(&self, n: usize) {
        self.0.used.fetch_sub(n, Ordering::Relaxed);
        self.0.gauge.sub(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// One connection's share of the [`SetupBudget`]; given back when dropped.
#[derive(Debug)]
pub struct SetupCharge {
    budget: SetupBudget,
    held: usize,
}

impl SetupCharge {
    /// Bytes this connection holds.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Raises this connection's charge to `to` bytes if the process's total stays within
    /// `max` (within `max / 2` for a charge past [`SMALL`]); `false`, and nothing charged,
    /// otherwise. A `to` at or below the current charge always succeeds and changes nothing.
    pub fn grow_to(&mut self, to: usize, max: usize) -> bool {
        let Some(more) = to.checked_sub(self.held).filter(|&n| n > 0) else {
            return true;
        };
        let limit = if to > SMALL { max / 2 } else { max };
        let fits = |used: usize| used.checked_add(more).filter(|&total| total <= limit);
        let Ok(before) = self.budget.0.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, fits) else {
            return false;
        };
        self.budget.0.peak.fetch_max(before + more, Ordering::Relaxed);
        self.budget.0.gauge.add(i64::try_from(more).unwrap_or(i64::MAX));
        self.held = to;
        true
    }

    /// Sets this connection's charge to `to` bytes whatever the total: for memory already
    /// decided on (the CONNECT copied behind a PROXY header), never for bytes still to come.
    pub fn set(&mut self, to: usize) {
        if to > self.held {
            self.budget.add(to - self.held);
        } else {
            self.budget.sub(self.held - to);
        }
        self.held = to;
    }
}

impl Drop for SetupCharge {
    fn drop(&mut self) {
        self.budget.sub(self.held);
    }
}

/// The error a stream's read returns when its buffer may not grow within the budget.
#[derive(Debug)]
pub struct OverBudget;

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no room in max_setup_bytes for a connection in setup")
    }
}

impl std::error::Error for OverBudget {}

impl OverBudget {
    pub fn error() -> io::Error {
        io::Error::new(io::ErrorKind::OutOfMemory, OverBudget)
    }

    /// `e` is [`OverBudget::error`].
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<OverBudget>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> SetupBudget {
        SetupBudget::new(IntGauge::new("setup_bytes", "test").unwrap())
    }

    #[test]
    fn charges_up_to_the_limit_and_gives_back_on_drop() {
        let b = budget();
        let max = 64 * 1024;
        let mut small: Vec<SetupCharge> = Vec::new();
        for _ in 0..(max / 2048) {
            let mut c = b.charge();
            assert!(c.grow_to(2048, max));
            small.push(c);
        }
        assert_eq!(b.used(), max);
        assert_eq!(b.0.gauge.get(), max as i64);
        let mut one_more = b.charge();
        assert!(!one_more.grow_to(512, max), "over the limit");
        assert_eq!(one_more.held(), 0);
        assert_eq!(b.used(), max, "a refused charge takes nothing");
        small.pop();
        assert!(one_more.grow_to(512, max));
        assert!(one_more.grow_to(512, max) && one_more.grow_to(100, max), "no growth always fits");
        assert_eq!(one_more.held(), 512);
        drop(small);
        drop(one_more);
        assert_eq!(b.used(), 0);
        assert_eq!(b.0.gauge.get(), 0);
        assert_eq!(b.take_peak(), max, "the high-water mark");
        assert_eq!(b.take_peak(), 0);
    }

    #[test]
    fn large_buffers_leave_half_the_budget_to_small_ones() {
        let b = budget();
        let max = 64 * 1024;
        let mut large = b.charge();
        assert!(large.grow_to(max / 2, max));
        let mut larger = b.charge();
        assert!(!larger.grow_to(SMALL + 1, max), "past SMALL only within half the budget");
        let mut small: Vec<SetupCharge> = Vec::new();
        for _ in 0..(max / 2 / SMALL) {
            let mut c = b.charge();
            assert!(c.grow_to(SMALL, max), "the other half is there for small buffers");
            small.push(c);
        }
        assert_eq!(b.used(), max);
        drop(large);
        assert!(!larger.grow_to(SMALL + 1, max), "small buffers hold half: no room left past SMALL");
        small.truncate(small.len() - 2);
        assert!(larger.grow_to(SMALL + 1, max));
    }

    #[test]
    fn set_charges_whatever_the_total() {
        let b = budget();
        let mut c = b.charge();
        assert!(c.grow_to(1000, 1000));
        c.set(1200);
        assert_eq!(b.used(), 1200);
        c.set(300);
        assert_eq!((b.used(), c.held()), (300, 300));
        drop(c);
        assert_eq!(b.used(), 0);
    }
}
