//! The memory budget of connections in setup. A CONNECT can be up to `max_connect_packet`
//! bytes and has `connect_timeout` to arrive, so clients that send all but the last bytes of
//! large CONNECTs could otherwise make the process hold that much per connection until memory
//! runs out and every session on the process dies with it. Every connection charges the
//! buffers it holds for its CONNECT to one process-wide counter before it allocates them and
//! gives the charge back when they are freed ([`SetupCharge`] is RAII); a charge that would
//! take the total over `limits.max_setup_bytes` is refused, and the connection is closed.
//! Established connections charge nothing and are never touched.
//!
//! Buffers past [`SMALL`] may grow only while the total stays within half the budget: a
//! device's CONNECT is well under 1 KiB, so however many large CONNECTs are in flight, half
//! the budget is left for a fleet reconnecting with small ones.

use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus::IntGauge;

/// The largest buffer that may use the whole budget: room for a CONNECT with a long token as
/// its password.
pub const SMALL: usize = 4096;

/// Bytes held by connections in setup, process-wide. The limit is not stored here: each
/// charge is checked against the `max_setup_bytes` of the caller's snapshot, so a reload
/// applies to the next charge.
#[derive(Debug)]
pub struct SetupBudget {
    used: AtomicUsize,
    /// The most bytes charged at once since [`SetupBudget::take_peak`] last looked.
    peak: AtomicUsize,
    /// `harbormaster_setup_bytes`, kept equal to `used`.
    gauge: IntGauge,
}

impl SetupBudget {
    pub fn new(gauge: IntGauge) -> SetupBudget {
        SetupBudget { used: AtomicUsize::new(0), peak: AtomicUsize::new(0), gauge }
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The most bytes charged at once since the last call (at least those charged now).
    pub fn take_peak(&self) -> usize {
        self.peak.swap(self.used(), Ordering::Relaxed).max(self.used())
    }

    /// A charge of nothing yet, for one connection.
    pub fn charge(&self) -> SetupCharge<'_> {
        SetupCharge { budget: self, held: 0 }
    }

    fn add(&self, n: usize) {
        let used = self.used.fetch_add(n, Ordering::Relaxed).saturating_add(n);
        self.peak.fetch_max(used, Ordering::Relaxed);
        self.gauge.add(i64::try_from(n).unwrap_or(i64::MAX));
    }

    fn sub(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
        self.gauge.sub(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// One connection's share of the [`SetupBudget`]; given back when dropped.
#[derive(Debug)]
pub struct SetupCharge<'a> {
    budget: &'a SetupBudget,
    held: usize,
}

impl SetupCharge<'_> {
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
        let Ok(before) = self.budget.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, fits) else {
            return false;
        };
        self.budget.peak.fetch_max(before + more, Ordering::Relaxed);
        self.budget.gauge.add(i64::try_from(more).unwrap_or(i64::MAX));
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

impl Drop for SetupCharge<'_> {
    fn drop(&mut self) {
        self.budget.sub(self.held);
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
        let mut small: Vec<SetupCharge<'_>> = Vec::new();
        for _ in 0..(max / 2048) {
            let mut c = b.charge();
            assert!(c.grow_to(2048, max));
            small.push(c);
        }
        assert_eq!(b.used(), max);
        assert_eq!(b.gauge.get(), max as i64);
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
        assert_eq!(b.gauge.get(), 0);
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
        let mut small: Vec<SetupCharge<'_>> = Vec::new();
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
