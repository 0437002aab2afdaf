//! Broker choice: rendezvous (highest-random-weight) hashing of a routing key over a pool's
//! brokers, keyed by each broker's stable identity, plus the least-connections fallback for
//! clients without a key. Pure apart from the per-broker state (health, drain, connection
//! counts) it reads.
//!
//! The score of broker `b` for key `k` is `xxh3(le64(xxh3(k, SEED)), seed = xxh3(id(b), SEED))`.
//! xxh3's output is specified and fixed, and SEED never changes, so every replica and every
//! release ranks brokers identically for a key; `tests::golden_routes` pins this.

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::broker::BrokerState;
use super::proxy_header::Tlv;

/// Fixed forever: changing it re-routes every client of every fleet.
const SEED: u64 = 0x6861_7262_6f72_6d73; // "harborms"

/// Which part of a connection picks its broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKey {
    ClientId,
    Username,
    CertCn,
}

/// What to do with a client that has no routing key (empty client-id, no username, no CN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmptyKey {
    LeastConnections,
    SourceAddress,
    Reject,
    /// MQTT 5: harbormaster generates the client-id, routes by it, sends it to the broker and
    /// tells the client in the CONNACK (Assigned Client Identifier); a later resume with that
    /// id lands on the same broker. Older versions cannot learn an id: least connections.
    Assign,
}

/// Which PROXY header a pool's brokers expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    None,
    V1,
    V2,
}

/// How a pool's brokers are probed (config `health = { ... }`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connect within the timeout.
    Tcp,
    /// PROXY header (as the pool sends it) + MQTT 3.1.1 CONNECT, CONNACK 0 within the timeout.
    Mqtt,
    /// `GET http://<broker ip>:<port><path>` answered with the expected status within the
    /// timeout: the broker's own readiness endpoint.
    Http(Arc<HttpCheck>),
}

/// The request of an HTTP check and the status that passes it.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpCheck {
    /// Port on the broker's address (the broker's management or health port).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// The status that passes; any other fails.
    pub status: u16,
    /// `Authorization` header value (`Basic ...`), for endpoints that want a user.
    pub authorization: Option<String>,
}

/// Active health checking of a pool, and the thresholds passive failures count toward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    pub check: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successful probes that bring a down broker back.
    pub rise: u32,
    /// Consecutive failures (probes or data-plane dials) that mark a broker down.
    pub fall: u32,
}

/// One broker of a pool, as a snapshot lists it: an immutable value. `name` is its hashing
/// identity (the configured name, or the address string as written in the config), `addr`
/// where it is dialled. How it is doing lives in its [`BrokerState`], shared with the broker of
/// the same pool and identity in every other snapshot; a `Backend` reads through to it
/// (`b.is_healthy()`, `b.active`).
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    id_seed: u64,
    pub state: Arc<BrokerState>,
}

impl Backend {
    /// A broker with a state of its own (nothing to continue: tests, `check`, the first load).
    pub fn new(name: impl Into<String>, addr: SocketAddr) -> Backend {
        Backend::with_state(name, addr, Arc::default())
    }

    /// A broker that continues `state`, the state of its pool and identity.
    pub fn with_state(name: impl Into<String>, addr: SocketAddr, state: Arc<BrokerState>) -> Backend {
        let name = name.into();
        Backend { id_seed: xxh3_64_with_seed(name.as_bytes(), SEED), name, addr, state }
    }

    fn score(&self, key_hash: u64) -> u64 {
        xxh3_64_with_seed(&key_hash.to_le_bytes(), self.id_seed)
    }
}

impl Deref for Backend {
    type Target = BrokerState;
    fn deref(&self) -> &BrokerState {
        &self.state
    }
}

/// A pool of brokers and how connections are spread over them. A clone shares its brokers.
#[derive(Debug, Clone)]
pub struct Pool {
    pub name: String,
    pub backends: Vec<Arc<Backend>>,
    /// How the CONNECT is rewritten before it is sent to a broker (`connect`); the default
    /// changes nothing.
    pub connect: super::rewrite::Policy,
    pub hash_key: HashKey,
    pub empty_key: EmptyKey,
    pub proxy_protocol: ProxyProtocol,
    pub tlvs: Vec<Tlv>,
    pub max_header_bytes: usize,
    pub backend_connect_timeout: Duration,
    /// Time allowed for a broker's first bytes after the CONNECT; past it, the next broker.
    pub backend_connack_timeout: Duration,
    pub backend_attempts: usize,
    /// Active health checks; `None`: none, and brokers are only ever skipped per connection.
    pub health: Option<HealthSpec>,
    /// Whether a planned close (drain, broker removed) lets the broker publish the client's
    /// Will (`planned_close_will`).
    pub planned_close_will: PlannedCloseWill,
    /// Connections per second closed when brokers leave the pool or are drained through the
    /// admin server (`close_rate`).
    pub close_rate: u32,
    /// `on_backend_restart = "hold"`: new connections whose first choice is restarting wait for
    /// it; `None`: they fail over at once (`"failover"`).
    pub hold: Option<Hold>,
    /// Whether connections away from their first choice are moved back to it (`rebalance`).
    pub rebalance: Rebalance,
    /// Connections per second moved back to their first choice (`rebalance_rate`).
    pub rebalance_rate: u32,
    /// What the brokers are spoken to in (`backend_transport`).
    pub backend_transport: BackendTransport,
    /// The brokers' Maximum Packet Size (`backend_max_packet_size`): no CONNECT larger than
    /// this is sent to them. `None`: only `limits.max_connect_packet` bounds it.
    pub backend_max_packet_size: Option<usize>,
}

/// `backend_transport`: raw MQTT to the broker's TCP listener (a WebSocket client's frames
/// unwrapped), or a WebSocket of harbormaster's own to the broker's WebSocket listener over
/// which a WebSocket client's frames are relayed untouched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BackendTransport {
    #[default]
    Mqtt,
    /// The upgrade request's path (`websocket_path`).
    WebSocket { path: String },
}

impl BackendTransport {
    /// The log's `backend_transport` and `/route`'s.
    pub fn as_str(&self) -> &'static str {
        match self {
            BackendTransport::Mqtt => "mqtt",
            BackendTransport::WebSocket { .. } => "websocket",
        }
    }
}

/// `rebalance`: leave connections where they are until they reconnect (`"off"`), or move
/// those away from their first choice back to it (`"home"`) once it is back in rotation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Rebalance {
    #[default]
    Off,
    Home,
}

/// How a pool holds new connections for a restarting broker (`on_backend_restart = "hold"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    /// How long after a broker went down or away its clients wait for it (`hold_timeout`).
    pub timeout: std::time::Duration,
    /// Connections held at once in the pool (`hold_max`); more fail over at once.
    pub max: usize,
}

/// `planned_close_will`: on a planned close, the broker keeps its usual view of a lost client
/// (`"keep"`: it publishes the Will) or is sent a DISCONNECT on the client's behalf
/// (`"suppress"`: no Will for a device that is only moving).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlannedCloseWill {
    Keep,
    Suppress,
}

/// Hash of a routing key; computed once per connection.
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, SEED)
}

impl Pool {
    /// The `fall` that data-plane dial failures count toward: only with active checks.
    pub fn passive_fall(&self) -> Option<u32> {
        self.health.as_ref().map(|h| h.fall)
    }

    /// The first `k` brokers of `key`'s preference order, best first, whatever their health:
    /// what `harbormaster route` prints.
    pub fn preference(&self, key: &[u8], k: usize) -> Vec<&Arc<Backend>> {
        self.top(key_hash(key), k, |_| true)
    }

    /// The brokers to try for `key`: the first `k` healthy, non-draining ones in its preference
    /// order. When none is healthy, health information may be stale, so the plain order of the
    /// non-draining ones is tried. Draining brokers (by discovery or drained by an operator) are
    /// never tried: they are going away.
    pub fn candidates(&self, key: &[u8], k: usize) -> Vec<&Arc<Backend>> {
        self.candidates_by_hash(key_hash(key), k)
    }

    /// [`Pool::candidates`] of a key already hashed ([`key_hash`]).
    pub fn candidates_by_hash(&self, h: u64, k: usize) -> Vec<&Arc<Backend>> {
        let c = self.top(h, k, |b| b.is_healthy() && b.in_rotation());
        if c.is_empty() {
            self.top(h, k, |b| b.in_rotation())
        } else {
            c
        }
    }

    /// Where a new connection whose key hashes to `h` would be routed now, if anywhere: the
    /// first of its candidates. A connection on another broker is away from home.
    pub fn home(&self, h: u64) -> Option<&Arc<Backend>> {
        self.candidates_by_hash(h, 1).into_iter().next()
    }

    fn top(&self, h: u64, k: usize, usable: impl Fn(&Backend) -> bool) -> Vec<&Arc<Backend>> {
        let k = k.min(self.backends.len());
        // Partial selection: keep the k best (score, index) in descending order. k is the
        // attempt count (a handful), so this beats sorting every broker.
        let mut best: Vec<(u64, usize)> = Vec::with_capacity(k + 1);
        for (i, b) in self.backends.iter().enumerate() {
            if !usable(b) {
                continue;
            }
            let s = b.score(h);
            if best.len() == k && best.last().is_some_and(|&(ls, _)| ls >= s) {
                continue;
            }
            let pos = best.partition_point(|&(bs, _)| bs >= s);
            best.insert(pos, (s, i));
            best.truncate(k);
        }
        best.into_iter().map(|(_, i)| &self.backends[i]).collect()
    }

    /// Every broker in `key`'s preference order.
    pub fn ranking(&self, key: &[u8]) -> Vec<&Arc<Backend>> {
        self.preference(key, self.backends.len())
    }

    /// Brokers ordered by fewest active connections first (ties keep config order), healthy
    /// ones first, draining and operator-drained ones left out, for clients without a routing key.
    pub fn least_connections(&self, k: usize) -> Vec<&Arc<Backend>> {
        let mut v: Vec<&Arc<Backend>> = self.backends.iter().filter(|b| b.in_rotation()).collect();
        v.sort_by_key(|b| (!b.is_healthy(), b.active.load(Ordering::Relaxed)));
        v.truncate(k);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(names: &[&str]) -> Pool {
        Pool {
            name: "p".into(),
            connect: Default::default(),
            backends: names
                .iter()
                .enumerate()
                .map(|(i, n)| Arc::new(Backend::new(*n, SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)))))
                .collect(),
            hash_key: HashKey::ClientId,
            empty_key: EmptyKey::LeastConnections,
            proxy_protocol: ProxyProtocol::None,
            tlvs: vec![],
            max_header_bytes: 500,
            backend_connect_timeout: Duration::from_secs(1),
            backend_connack_timeout: Duration::from_secs(1),
            backend_max_packet_size: None,
            backend_attempts: 3,
            planned_close_will: PlannedCloseWill::Keep,
            close_rate: 100,
            rebalance: Rebalance::Off,
            rebalance_rate: 20,
            health: None,
            hold: None,
            backend_transport: BackendTransport::Mqtt,
        }
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:1883", 10 + i)).collect()
    }

    fn first(p: &Pool, key: &str) -> String {
        p.preference(key.as_bytes(), 1)[0].name.clone()
    }

    #[test]
    fn order_of_the_list_does_not_matter() {
        let n = names(10);
        let fwd: Vec<&str> = n.iter().map(|s| s.as_str()).collect();
        let mut rev = fwd.clone();
        rev.reverse();
        rev.swap(2, 7);
        let (a, b) = (pool(&fwd), pool(&rev));
        for i in 0..20_000 {
            let key = format!("device-{i}");
            let ra: Vec<_> = a.ranking(key.as_bytes()).iter().map(|b| b.name.clone()).collect();
            let rb: Vec<_> = b.ranking(key.as_bytes()).iter().map(|b| b.name.clone()).collect();
            assert_eq!(ra, rb, "key {key}");
        }
    }

    #[test]
    fn preference_is_a_prefix_of_the_ranking() {
        let n = names(7);
        let p = pool(&n.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        for i in 0..2_000 {
            let key = format!("c{i}");
            let full: Vec<_> = p.ranking(key.as_bytes()).iter().map(|b| b.name.clone()).collect();
            for k in 0..=8 {
                let part: Vec<_> = p.preference(key.as_bytes(), k).iter().map(|b| b.name.clone()).collect();
                assert_eq!(&full[..k.min(7)], &part[..]);
            }
        }
    }

    #[test]
    fn removing_a_broker_moves_only_its_keys_and_adding_moves_only_to_it() {
        let n = names(10);
        let all: Vec<&str> = n.iter().map(|s| s.as_str()).collect();
        let mut fewer = all.clone();
        let removed = fewer.remove(4);
        let (big, small) = (pool(&all), pool(&fewer));
        let mut moved = 0;
        let total = 100_000;
        for i in 0..total {
            let key = format!("vehicle-{i:08}");
            let (was, now) = (first(&big, &key), first(&small, &key));
            if was != now {
                assert_eq!(was, removed, "key {key} moved although its broker stayed");
                moved += 1;
            }
        }
        // Only the removed broker's share moves: ~1/10 of the keys.
        let share = moved as f64 / total as f64;
        assert!((0.09..0.11).contains(&share), "moved {share}");
    }

    #[test]
    fn load_is_balanced_within_five_percent() {
        let n = names(10);
        let p = pool(&n.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let mut count = std::collections::HashMap::new();
        let total = 100_000;
        for i in 0..total {
            *count.entry(first(&p, &format!("sensor-{i}"))).or_insert(0usize) += 1;
        }
        assert_eq!(count.len(), 10);
        let max = *count.values().max().unwrap() as f64;
        let avg = total as f64 / 10.0;
        assert!(max / avg <= 1.05, "max/avg = {}", max / avg);
    }

    #[test]
    fn failover_order_spreads_a_dead_brokers_clients() {
        // The second choice of the keys whose first choice is broker X is spread over all
        // the others, so a dead broker's clients do not pile onto one neighbour.
        let n = names(5);
        let p = pool(&n.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let mut second = std::collections::HashMap::new();
        for i in 0..50_000 {
            let key = format!("k{i}");
            let pref = p.preference(key.as_bytes(), 2);
            if pref[0].name == n[0] {
                *second.entry(pref[1].name.clone()).or_insert(0usize) += 1;
            }
        }
        assert_eq!(second.len(), 4);
        let (min, max) = (second.values().min().unwrap(), second.values().max().unwrap());
        assert!(*max as f64 / *min as f64 <= 1.2, "{second:?}");
    }

    /// Pinned answers: if this fails, routing changed for every deployed fleet.
    #[test]
    fn golden_routes() {
        let p = pool(&["10.0.0.11:1883", "10.0.0.12:1883", "10.0.0.13:1883"]);
        let got: Vec<String> = ["truck-0001", "boat-42", "sensor/a/b", "x"].iter().map(|k| first(&p, k)).collect();
        assert_eq!(got, GOLDEN);
    }
    const GOLDEN: [&str; 4] = ["10.0.0.11:1883", "10.0.0.12:1883", "10.0.0.12:1883", "10.0.0.13:1883"];

    #[test]
    fn a_down_broker_is_skipped_and_keeps_its_place() {
        let n = names(5);
        let p = pool(&n.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let down = &p.backends[2];
        down.healthy.store(false, Ordering::Relaxed);
        for i in 0..5_000 {
            let key = format!("k{i}");
            let order: Vec<_> = p.ranking(key.as_bytes()).iter().map(|b| b.name.clone()).collect();
            let expect: Vec<_> = order.iter().filter(|b| **b != down.name).take(3).cloned().collect();
            let got: Vec<_> = p.candidates(key.as_bytes(), 3).iter().map(|b| b.name.clone()).collect();
            assert_eq!(got, expect);
        }
        for b in &p.backends {
            b.healthy.store(false, Ordering::Relaxed);
        }
        assert_eq!(p.candidates(b"k1", 3).len(), 3, "all down: try the plain order anyway");
    }

    #[test]
    fn least_connections_prefers_the_idlest() {
        let p = pool(&["a", "b", "c"]);
        p.backends[0].active.store(5, Ordering::Relaxed);
        p.backends[1].active.store(1, Ordering::Relaxed);
        p.backends[2].active.store(3, Ordering::Relaxed);
        let order: Vec<_> = p.least_connections(3).iter().map(|b| b.name.as_str()).collect();
        assert_eq!(order, ["b", "c", "a"]);
    }

    #[test]
    fn a_draining_broker_keeps_its_place_and_is_never_tried() {
        let n = names(5);
        let p = pool(&n.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let draining = &p.backends[1];
        draining.set_draining(true);
        for i in 0..5_000 {
            let key = format!("k{i}");
            let order: Vec<_> = p.ranking(key.as_bytes()).iter().map(|b| b.name.clone()).collect();
            assert_eq!(order.len(), 5, "the ranking still lists it");
            let expect: Vec<_> = order.iter().filter(|b| **b != draining.name).take(3).cloned().collect();
            let got: Vec<_> = p.candidates(key.as_bytes(), 3).iter().map(|b| b.name.clone()).collect();
            assert_eq!(got, expect);
        }
        // Every other broker down: the fallback tries them, still not the draining one.
        for (i, b) in p.backends.iter().enumerate() {
            if i != 1 {
                b.healthy.store(false, Ordering::Relaxed);
            }
        }
        for i in 0..500 {
            let key = format!("k{i}");
            let got = p.candidates(key.as_bytes(), 5);
            assert_eq!(got.len(), 4);
            assert!(got.iter().all(|b| b.name != draining.name));
        }
        // Draining and down at once: the same.
        draining.healthy.store(false, Ordering::Relaxed);
        assert_eq!(p.candidates(b"k1", 5).len(), 4);
        // Every broker draining: nothing to try.
        for b in &p.backends {
            b.healthy.store(true, Ordering::Relaxed);
            b.set_draining(true);
        }
        assert!(p.candidates(b"k1", 3).is_empty());
        assert_eq!(p.preference(b"k1", 3).len(), 3, "route output still shows the order");
    }

    #[test]
    fn an_operator_drained_broker_is_skipped_like_a_draining_one() {
        let p = pool(&["a", "b", "c"]);
        let order: Vec<String> = p.ranking(b"dev-1").iter().map(|b| b.name.clone()).collect();
        let first = p.backends.iter().find(|b| b.name == order[0]).unwrap();
        first.admin_drain();
        let got: Vec<String> = p.candidates(b"dev-1", 3).iter().map(|b| b.name.clone()).collect();
        assert_eq!(got, order[1..], "its place kept, never tried");
        assert!(p.least_connections(3).iter().all(|b| b.name != first.name));
        first.admin_enable();
        assert_eq!(p.candidates(b"dev-1", 1)[0].name, order[0], "back first once enabled");
    }

    #[test]
    fn least_connections_leaves_draining_brokers_out() {
        let p = pool(&["a", "b", "c"]);
        p.backends[0].set_draining(true);
        p.backends[1].healthy.store(false, Ordering::Relaxed);
        let order: Vec<_> = p.least_connections(3).iter().map(|b| b.name.as_str()).collect();
        assert_eq!(order, ["c", "b"], "healthy first, draining never");
        for b in &p.backends {
            b.set_draining(true);
        }
        assert!(p.least_connections(3).is_empty());
    }
}
