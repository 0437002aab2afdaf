//! Admission control: the cheap checks a new connection passes before the expensive work —
//! the TLS handshake rate (a token bucket with a bounded wait queue), new connections per
//! source address, and client-ids that reconnect in a loop (flapping; counted per listener
//! and verified client certificate, so a client without one can never get a device with one
//! refused). It owns only the
//! process's shared state; the limits themselves come from the snapshot at each call, so a
//! reload applies to the next connection. Every map is bounded: when one is full, entries
//! that no longer matter are swept, and if none can go the check admits (fails open).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Source addresses tracked at once by `per_source_rate`: about 3 MiB at most.
pub const MAX_SOURCES: usize = 65_536;
/// Client-ids tracked at once by flapping detection: about 3 MiB at most (ids are hashed).
pub const MAX_CLIENT_IDS: usize = 65_536;
/// A full map is swept at most this often, so a scan from ever-new addresses costs one sweep
/// per interval and not one per connection.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The admission limits of a snapshot (`[limits]`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionLimits {
    /// New TLS handshakes per second across the process; 0: unlimited.
    pub handshake_rate: u32,
    /// Handshakes that may start at once after a quiet period.
    pub handshake_burst: u32,
    /// Connections that may wait for a handshake token; beyond it they are closed at once.
    pub handshake_queue: usize,
    /// Longest wait for a handshake token; a connection that would wait longer is closed
    /// at once.
    pub handshake_queue_timeout: Duration,
    /// New connections per second per client address; 0: unlimited.
    pub per_source_rate: u32,
    pub per_source_burst: u32,
    /// Refusal of client-ids that reconnect too often; `None`: off.
    pub flapping: Option<Flapping>,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            handshake_rate: 0,
            handshake_burst: 0,
            handshake_queue: 1024,
            handshake_queue_timeout: Duration::from_secs(2),
            per_source_rate: 0,
            per_source_burst: 0,
            flapping: None,
        }
    }
}

/// More than `max_connects` CONNECTs with one client-id within `window` refuse that id
/// for `ban`, within one [`Claimant`]'s key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flapping {
    pub max_connects: u32,
    pub window: Duration,
    pub ban: Duration,
}

/// Who a CONNECT's client-id is counted for by flapping detection: the listener it arrived
/// on and, when the client presented a certificate the listener verified, that certificate.
/// A client-id is counted and banned only within one such key space. Anyone can send any
/// client-id, but only the holder of a certificate's key can present it: CONNECTs without a
/// certificate (a plain listener, or TLS without a client certificate) can ban only other
/// CONNECTs without one on the same listener, never a device that authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Claimant<'a> {
    /// The listener's name.
    pub listener: &'a str,
    /// SHA-256 of the verified client certificate; `None`: unauthenticated.
    pub cert_sha256: Option<&'a [u8; 32]>,
}

/// Why admission refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `handshake_queue` connections are already waiting.
    HandshakeQueueFull,
    /// The wait for a handshake token would exceed `handshake_queue_timeout`.
    HandshakeQueueTimeout,
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Bucket {
        Bucket { tokens: f64::from(burst.max(1)), at: now }
    }

    fn refill(&mut self, rate: u32, burst: u32, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst.max(1)));
        self.at = now;
    }

    /// Takes a token if one is there.
    fn try_take(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled completely: it then holds nothing an absent entry
    /// would not.
    fn is_full(&self, rate: u32, burst: u32, now: Instant) -> bool {
        let mut b = *self;
        b.refill(rate, burst, now);
        b.tokens >= f64::from(burst.max(1))
    }
}

/// One client-id's recent CONNECTs.
#[derive(Debug, Clone, Copy)]
struct Flap {
    window_start: Instant,
    count: u32,
    banned_until: Option<Instant>,
}

impl Flap {
    fn expired(&self, cfg: &Flapping, now: Instant) -> bool {
        self.banned_until.is_none_or(|b| b <= now) && now.saturating_duration_since(self.window_start) >= cfg.window
    }
}

/// A map bounded to `cap` entries, swept of expired ones at most once per [`SWEEP_INTERVAL`].
#[derive(Debug)]
struct Bounded<K, V> {
    map: HashMap<K, V>,
    last_sweep: Option<Instant>,
}

impl<K: std::hash::Hash + Eq, V> Bounded<K, V> {
    fn new() -> Self {
        Bounded { map: HashMap::new(), last_sweep: None }
    }

    /// Whether an entry for a new key may be added; sweeps with `expired` if full.
    fn room(&mut self, cap: usize, now: Instant, expired: impl Fn(&V) -> bool) -> bool {
        if self.map.len() < cap {
            return true;
        }
        if self.last_sweep.is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_INTERVAL) {
            self.last_sweep = Some(now);
            self.map.retain(|_, v| !expired(v));
            self.map.shrink_to(cap);
        }
        self.map.len() < cap
    }
}

/// The process's admission state, shared by every listener.
#[derive(Debug)]
pub struct Admission {
    handshakes: Mutex<Option<Bucket>>,
    /// Connections waiting for a handshake token: the exported gauge
    /// (`harbormaster_handshake_queue`) is the count itself.
    queued: prometheus::IntGauge,
    sources: Mutex<Bounded<IpAddr, Bucket>>,
    flaps: Mutex<Bounded<u64, Flap>>,
    /// Keys the hash of flapping entries with a secret of this process (SipHash), so no
    /// client can choose an id whose entry collides with another claimant's.
    flap_hasher: RandomState,
}

/// Tests' admission state, its queue gauge registered nowhere.
#[cfg(test)]
impl Default for Admission {
    fn default() -> Self {
        Admission::new(prometheus::IntGauge::new("handshake_queue", "unregistered").expect("valid metric"))
    }
}

impl Admission {
    /// `queued` counts the connections in the handshake queue.
    pub fn new(queued: prometheus::IntGauge) -> Admission {
        Admission {
            handshakes: Mutex::new(None),
            queued,
            sources: Mutex::new(Bounded::new()),
            flaps: Mutex::new(Bounded::new()),
            flap_hasher: RandomState::new(),
        }
    }
}

/// Leaves the handshake queue when dropped (the wait ended or the connection went away).
struct Queued<'a>(&'a Admission);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.dec();
    }
}

impl Admission {
    /// Connections waiting for a handshake token now.
    pub fn queued(&self) -> usize {
        usize::try_from(self.queued.get()).unwrap_or(0)
    }

    /// How long to wait before this connection's TLS handshake may start, having reserved
    /// its token: waiters are served in arrival order, each sleeping exactly until its turn.
    /// Refused at once when the queue is full or the wait would pass the queue's deadline.
    /// A non-zero wait has joined the queue (under the same lock as the check, so the queue
    /// never exceeds its bound); the caller leaves it with [`Queued`].
    pub fn reserve_handshake(&self, lim: &AdmissionLimits, now: Instant) -> Result<Duration, Refused> {
        if lim.handshake_rate == 0 {
            return Ok(Duration::ZERO);
        }
        let (rate, burst) = (lim.handshake_rate, lim.handshake_burst);
        let mut guard = self.handshakes.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = guard.get_or_insert_with(|| Bucket::full(burst, now));
        bucket.refill(rate, burst, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(Duration::ZERO);
        }
        if self.queued() >= lim.handshake_queue {
            return Err(Refused::HandshakeQueueFull);
        }
        let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / f64::from(rate));
        if wait > lim.handshake_queue_timeout {
            return Err(Refused::HandshakeQueueTimeout);
        }
        // Tokens go negative: the debt is what the connections queued before this one took.
        bucket.tokens -= 1.0;
        self.queued.inc();
        Ok(wait)
    }

    /// Waits for a handshake token (see [`Admission::reserve_handshake`]).
    pub async fn handshake(&self, lim: &AdmissionLimits) -> Result<(), Refused> {
        let wait = self.reserve_handshake(lim, Instant::now())?;
        if !wait.is_zero() {
            let _left = Queued(self);
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }

    /// Whether a new connection from `ip` is within `per_source_rate`.
    pub fn source_allowed(&self, lim: &AdmissionLimits, ip: IpAddr, now: Instant) -> bool {
        if lim.per_source_rate == 0 {
            return true;
        }
        let (rate, burst) = (lim.per_source_rate, lim.per_source_burst);
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = sources.map.get_mut(&ip) {
            return b.try_take(rate, burst, now);
        }
        if !sources.room(MAX_SOURCES, now, |b| b.is_full(rate, burst, now)) {
            return true;
        }
        let mut b = Bucket::full(burst, now);
        let ok = b.try_take(rate, burst, now);
        sources.map.insert(ip, b);
        ok
    }

    /// Counts a CONNECT of `client_id` by `who`; whether it is allowed (not flapping). Empty
    /// ids (assigned by the broker) are not tracked.
    pub fn connect_allowed(&self, lim: &AdmissionLimits, who: Claimant<'_>, client_id: &[u8], now: Instant) -> bool {
        let Some(cfg) = lim.flapping else { return true };
        if client_id.is_empty() {
            return true;
        }
        let key = self.flap_hasher.hash_one((who, client_id));
        let mut flaps = self.flaps.lock().unwrap_or_else(PoisonError::into_inner);
        if !flaps.map.contains_key(&key) && !flaps.room(MAX_CLIENT_IDS, now, |f| f.expired(&cfg, now)) {
            return true;
        }
        let f = flaps.map.entry(key).or_insert(Flap { window_start: now, count: 0, banned_until: None });
        if let Some(until) = f.banned_until {
            if until > now {
                return false;
            }
            *f = Flap { window_start: now, count: 0, banned_until: None };
        }
        if now.saturating_duration_since(f.window_start) >= cfg.window {
            f.window_start = now;
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        if f.count > cfg.max_connects {
            f.banned_until = Some(now + cfg.ban);
            return false;
        }
        true
    }

    /// Entries held by the per-source and flapping maps (for tests and sizing).
    pub fn tracked(&self) -> (usize, usize) {
        let s = self.sources.lock().unwrap_or_else(PoisonError::into_inner).map.len();
        let f = self.flaps.lock().unwrap_or_else(PoisonError::into_inner).map.len();
        (s, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn lim() -> AdmissionLimits {
        AdmissionLimits::default()
    }

    /// A client without a certificate on listener "mqtt".
    const ANON: Claimant<'static> = Claimant { listener: "mqtt", cert_sha256: None };

    #[test]
    fn unlimited_by_default() {
        let a = Admission::default();
        let t = Instant::now();
        for _ in 0..10_000 {
            assert_eq!(a.reserve_handshake(&lim(), t), Ok(Duration::ZERO));
            assert!(a.source_allowed(&lim(), IpAddr::from([10, 0, 0, 1]), t));
            assert!(a.connect_allowed(&lim(), ANON, b"dev", t));
        }
        assert_eq!(a.tracked(), (0, 0));
    }

    #[test]
    fn handshakes_burst_then_queue_in_order_then_refuse() {
        let a = Admission::default();
        let l = AdmissionLimits {
            handshake_rate: 10,
            handshake_burst: 2,
            handshake_queue: 100,
            handshake_queue_timeout: secs(0.35),
            ..lim()
        };
        let t = Instant::now();
        assert_eq!(a.reserve_handshake(&l, t), Ok(Duration::ZERO));
        assert_eq!(a.reserve_handshake(&l, t), Ok(Duration::ZERO));
        // Then one every 100 ms, each waiter after the one before.
        let waits: Vec<Duration> = (0..3).map(|_| a.reserve_handshake(&l, t).unwrap()).collect();
        for (w, want) in waits.iter().zip([0.1, 0.2, 0.3]) {
            assert!((w.as_secs_f64() - want).abs() < 1e-6, "{waits:?}");
        }
        assert_eq!(a.reserve_handshake(&l, t), Err(Refused::HandshakeQueueTimeout));
        assert_eq!(a.queued(), 3);
        let small = AdmissionLimits { handshake_queue: 3, handshake_queue_timeout: secs(30.0), ..l.clone() };
        assert_eq!(a.reserve_handshake(&small, t), Err(Refused::HandshakeQueueFull));
        // Time pays the debt back; then a burst of 2 again, never more.
        let later = t + secs(10.0);
        assert_eq!(a.reserve_handshake(&l, later), Ok(Duration::ZERO));
        assert_eq!(a.reserve_handshake(&l, later), Ok(Duration::ZERO));
        assert!(a.reserve_handshake(&l, later).unwrap() > Duration::ZERO);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let gauge = prometheus::IntGauge::new("q", "q").unwrap();
        let a = std::sync::Arc::new(Admission::new(gauge.clone()));
        let l = AdmissionLimits {
            handshake_rate: 1,
            handshake_burst: 1,
            handshake_queue: 1,
            handshake_queue_timeout: secs(30.0),
            ..lim()
        };
        assert_eq!(a.handshake(&l).await, Ok(()));
        let waiter = {
            let (a, l) = (a.clone(), l.clone());
            tokio::spawn(async move { a.handshake(&l).await })
        };
        while a.queued() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(a.handshake(&l).await, Err(Refused::HandshakeQueueFull));
        assert_eq!(gauge.get(), 1, "the gauge shows the waiter");
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(a.queued(), 0, "a waiter that goes away leaves the queue");
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn per_source_rate_slows_one_address_not_others() {
        let a = Admission::default();
        let l = AdmissionLimits { per_source_rate: 2, per_source_burst: 3, ..lim() };
        let t = Instant::now();
        let noisy = IpAddr::from([10, 0, 0, 1]);
        let got: Vec<bool> = (0..5).map(|_| a.source_allowed(&l, noisy, t)).collect();
        assert_eq!(got, [true, true, true, false, false]);
        assert!(a.source_allowed(&l, IpAddr::from([10, 0, 0, 2]), t), "another address is unaffected");
        assert!(!a.source_allowed(&l, noisy, t + secs(0.4)));
        assert!(a.source_allowed(&l, noisy, t + secs(0.6)), "half a second later: one more");
    }

    #[test]
    fn per_source_memory_stays_bounded_under_a_scan() {
        let a = Admission::default();
        let l = AdmissionLimits { per_source_rate: 1, per_source_burst: 1, ..lim() };
        let t = Instant::now();
        let n = MAX_SOURCES as u32 + 10_000;
        for i in 0..n {
            let ip = IpAddr::from((0x0a00_0000u32 + i).to_be_bytes());
            assert!(a.source_allowed(&l, ip, t), "first connection of each address");
        }
        assert_eq!(a.tracked().0, MAX_SOURCES, "full: new addresses fail open, untracked");
        // A second later every bucket has refilled: the next new address sweeps them.
        assert!(a.source_allowed(&l, IpAddr::from([192, 168, 0, 1]), t + secs(1.5)));
        assert_eq!(a.tracked().0, 1);
    }

    #[test]
    fn flapping_bans_for_the_cool_down_then_forgives() {
        let a = Admission::default();
        let cfg = Flapping { max_connects: 3, window: secs(60.0), ban: secs(300.0) };
        let l = AdmissionLimits { flapping: Some(cfg), ..lim() };
        let t = Instant::now();
        let got: Vec<bool> = (0..4).map(|i| a.connect_allowed(&l, ANON, b"dev-1", t + secs(f64::from(i)))).collect();
        assert_eq!(got, [true, true, true, false]);
        assert!(a.connect_allowed(&l, ANON, b"dev-2", t), "other ids are unaffected");
        assert!(
            a.connect_allowed(&l, ANON, b"", t) && a.connect_allowed(&l, ANON, b"", t),
            "empty ids are not tracked"
        );
        assert!(!a.connect_allowed(&l, ANON, b"dev-1", t + secs(200.0)), "still cooling down");
        assert!(a.connect_allowed(&l, ANON, b"dev-1", t + secs(304.0)), "after the ban");
        // A slow reconnect loop never trips it: a new window each time.
        let b = Admission::default();
        for i in 0..20 {
            assert!(b.connect_allowed(&l, ANON, b"slow", t + secs(61.0 * f64::from(i))));
        }
    }

    #[test]
    fn flapping_is_counted_per_listener_and_certificate() {
        let a = Admission::default();
        let cfg = Flapping { max_connects: 2, window: secs(60.0), ban: secs(300.0) };
        let l = AdmissionLimits { flapping: Some(cfg), ..lim() };
        let t = Instant::now();
        let (cert_a, cert_b) = ([1u8; 32], [2u8; 32]);
        let device = Claimant { listener: "mqtts", cert_sha256: Some(&cert_a) };
        let other_device = Claimant { listener: "mqtts", cert_sha256: Some(&cert_b) };
        let anon_tls = Claimant { listener: "mqtts", cert_sha256: None };
        // Any number of CONNECTs without a certificate, on the plain listener or on the TLS
        // one, ban only CONNECTs without a certificate on that same listener.
        for _ in 0..100 {
            a.connect_allowed(&l, ANON, b"victim", t);
        }
        assert!(!a.connect_allowed(&l, ANON, b"victim", t), "the flapping key space itself is banned");
        assert!(a.connect_allowed(&l, anon_tls, b"victim", t), "another listener's unauthenticated clients are not");
        assert!(a.connect_allowed(&l, device, b"victim", t), "the device with its certificate still connects");
        // A device that flaps is banned, with its certificate; another certificate is not.
        assert!(a.connect_allowed(&l, device, b"victim", t));
        assert!(!a.connect_allowed(&l, device, b"victim", t), "a genuinely flapping device is banned");
        assert!(a.connect_allowed(&l, other_device, b"victim", t));
        let elsewhere = Claimant { listener: "mqtts-2", ..device };
        assert!(a.connect_allowed(&l, elsewhere, b"victim", t), "counted per listener");
        assert_eq!(a.tracked().1, 5);
    }

    #[test]
    fn flapping_memory_stays_bounded() {
        let a = Admission::default();
        let cfg = Flapping { max_connects: 15, window: secs(60.0), ban: secs(60.0) };
        let l = AdmissionLimits { flapping: Some(cfg), ..lim() };
        let t = Instant::now();
        for i in 0..(MAX_CLIENT_IDS + 5_000) {
            assert!(a.connect_allowed(&l, ANON, format!("id-{i}").as_bytes(), t));
        }
        assert_eq!(a.tracked().1, MAX_CLIENT_IDS);
        assert!(a.connect_allowed(&l, ANON, b"late", t + secs(61.0)));
        assert_eq!(a.tracked().1, 1, "expired windows were swept");
    }
}
