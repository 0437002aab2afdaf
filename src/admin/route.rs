//! Route lookup: which pool a connection's facts pick by a listener's routing rules, then
//! which broker a routing key (a client-id, by default) goes to there, and its whole
//! preference order. One implementation behind `harbormaster route` and the admin server's
//! `/route`, built on the data plane's own [`routing::first_match`], [`Pool::ranking`] and
//! [`Pool::candidates`].

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::proxy::balance::{Backend, EmptyKey, HashKey, Pool};
use crate::proxy::routing::{self, RouteInput};
use crate::proxy::snapshot::{ListenerSpec, Snapshot};

/// The facts a connection would offer the routing rules (`--sni`, `sni=`, ...), the listener
/// it arrives on, or a pool named outright (which skips the rules).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// The listener whose rules apply; the first listener when not given.
    pub listener: Option<String>,
    /// Look in this pool, whatever the rules say.
    pub pool: Option<String>,
    pub sni: Option<String>,
    pub alpn: Option<String>,
    pub cert_cn: Option<String>,
    pub cert_issuer_cn: Option<String>,
    pub username: Option<String>,
    pub source: Option<IpAddr>,
}

/// Which of a listener's rules picked the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    pub listener: String,
    /// The rule's index in the listener's `route`; `None`: no rule matched, the listener's
    /// own `pool`.
    pub rule: Option<usize>,
    /// The rule's conditions in config spelling.
    pub conditions: String,
}

impl fmt::Display for Matched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rule {
            Some(i) => write!(f, "listener {:?}: route[{i}] matched ({})", self.listener, self.conditions),
            None => write!(f, "listener {:?}: no route matched, the listener's pool", self.listener),
        }
    }
}

/// The answer for one key in one pool.
#[derive(Debug)]
pub struct Route<'a> {
    pub pool: &'a Arc<Pool>,
    /// Every broker, best first, whatever its health: what `harbormaster route` prints, and
    /// where the key goes when all brokers are up.
    pub preference: Vec<&'a Arc<Backend>>,
    /// The brokers the data plane dials now, in order: the first `backend_attempts` healthy
    /// ones of `preference` (all of them when none is healthy).
    pub candidates: Vec<&'a Arc<Backend>>,
    /// The rule that picked the pool, when the pool came from a listener's rules.
    pub matched: Option<Matched>,
}

impl Route<'_> {
    /// The broker the key lands on now, when it is up; `None` when every broker is draining
    /// (the data plane then refuses the client with "server unavailable").
    pub fn now(&self) -> Option<&Arc<Backend>> {
        self.candidates.first().copied()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// The named pool does not exist.
    NoPool(String),
    /// The named listener does not exist.
    NoListener(String),
    /// No pool was named and none is the obvious one.
    NoDefaultPool,
    /// Empty keys are not hashed; such clients follow the pool's `empty_client_id`.
    EmptyKey { pool: String, policy: &'static str },
    /// The pool has no brokers (yet): a discovered pool before its first answer, or when
    /// asked offline by `harbormaster route`, which runs no discovery.
    NoBrokers(String),
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteError::NoPool(name) => write!(f, "no pool {name:?}"),
            RouteError::NoListener(name) => write!(f, "no listener {name:?}"),
            RouteError::NoDefaultPool => write!(f, "no pool given and no default pool"),
            RouteError::EmptyKey { pool, policy } => write!(
                f,
                "an empty key is not hashed: pool {pool:?} routes clients without one by empty_client_id = {policy}"
            ),
            RouteError::NoBrokers(pool) => write!(
                f,
                "pool {pool:?} has no brokers: a pool discovered by DNS or Kubernetes has none until discovery \
                 answers (ask the running process: GET /route on the admin server)"
            ),
        }
    }
}

impl std::error::Error for RouteError {}

/// The pool used when none is named: the only pool, or else the first listener's pool.
pub fn default_pool(snap: &Snapshot) -> Option<&Arc<Pool>> {
    if snap.pools.len() == 1 {
        return snap.pools.first();
    }
    snap.listeners.first().and_then(|l| snap.pool(&l.pool))
}

/// Where `key` goes in `pool` (or the default pool).
pub fn lookup<'a>(snap: &'a Snapshot, key: &[u8], pool: Option<&str>) -> Result<Route<'a>, RouteError> {
    let pool = match pool {
        Some(name) => snap.pool(name).ok_or_else(|| RouteError::NoPool(name.to_string()))?,
        None => default_pool(snap).ok_or(RouteError::NoDefaultPool)?,
    };
    if key.is_empty() {
        return Err(RouteError::EmptyKey { pool: pool.name.clone(), policy: empty_key_name(pool.empty_key) });
    }
    let preference = pool.ranking(key);
    if preference.is_empty() {
        return Err(RouteError::NoBrokers(pool.name.clone()));
    }
    Ok(Route { pool, preference, candidates: pool.candidates(key, pool.backend_attempts), matched: None })
}

/// Where a connection with client-id `key` and the facts of `q` goes: the pool `q` names, or
/// else the pool the listener's rules pick (the first listener's, when `q` names none), then
/// the broker in it. The rules are the data plane's, evaluated the same way.
pub fn lookup_query<'a>(snap: &'a Snapshot, key: &[u8], q: &Query) -> Result<Route<'a>, RouteError> {
    if q.pool.is_some() {
        return lookup(snap, key, q.pool.as_deref());
    }
    let listener: &ListenerSpec = match &q.listener {
        Some(name) => snap.listener(name).ok_or_else(|| RouteError::NoListener(name.clone()))?,
        None if snap.listeners.first().is_none_or(|l| l.routes.is_empty()) => return lookup(snap, key, None),
        None => &snap.listeners[0],
    };
    let input = RouteInput {
        sni: q.sni.as_deref(),
        alpn: q.alpn.as_deref().map(str::as_bytes),
        cert_cn: q.cert_cn.as_deref(),
        cert_issuer_cn: q.cert_issuer_cn.as_deref(),
        username: q.username.as_deref().map(str::as_bytes),
        client_id: key,
        source: q.source,
    };
    let found = routing::first_match(&listener.routes, &input);
    let pool = found.map_or(listener.pool.as_str(), |(_, r)| r.pool.as_str());
    let mut route = lookup(snap, key, Some(pool))?;
    route.matched = Some(Matched {
        listener: listener.name.clone(),
        rule: found.map(|(i, _)| i),
        conditions: found.map(|(_, r)| r.when.describe()).unwrap_or_default(),
    });
    Ok(route)
}

/// The config spelling of a pool's `hash_key`.
pub fn hash_key_name(k: HashKey) -> &'static str {
    match k {
        HashKey::ClientId => "client_id",
        HashKey::Username => "username",
        HashKey::CertCn => "cert_cn",
    }
}

/// The config spelling of a pool's `empty_client_id`.
pub fn empty_key_name(k: EmptyKey) -> &'static str {
    match k {
        EmptyKey::LeastConnections => "least_connections",
        EmptyKey::SourceAddress => "source_address",
        EmptyKey::Reject => "reject",
        EmptyKey::Assign => "assign",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::config::load_str;
    use std::path::Path;
    use std::sync::atomic::Ordering;

    fn snapshot() -> Snapshot {
        let text = r#"
[[listener]]
name = "one"
bind = "127.0.0.1:0"
pool = "second"

[pool.first]
backends = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]

[pool.second]
backends = [{ name = "s0", address = "127.0.0.1:4" }, { name = "s1", address = "127.0.0.1:5" }]
backend_attempts = 1
"#;
        load_str(text, Path::new(".")).unwrap().snapshot
    }

    fn names(v: &[&Arc<Backend>]) -> Vec<String> {
        v.iter().map(|b| b.name.clone()).collect()
    }

    #[test]
    fn the_default_pool_is_the_first_listeners_and_a_named_one_wins() {
        let snap = snapshot();
        let r = lookup(&snap, b"device-1", None).unwrap();
        assert_eq!(r.pool.name, "second");
        let r = lookup(&snap, b"device-1", Some("first")).unwrap();
        assert_eq!(r.pool.name, "first");
        assert_eq!(names(&r.preference), names(&r.pool.ranking(b"device-1")));
        assert_eq!(r.candidates.len(), 3);
        assert_eq!(lookup(&snap, b"x", Some("nope")).unwrap_err(), RouteError::NoPool("nope".into()));
    }

    #[test]
    fn now_skips_unhealthy_brokers_and_preference_does_not() {
        let snap = snapshot();
        let r = lookup(&snap, b"truck-7", Some("second")).unwrap();
        let first = r.preference[0].clone();
        assert_eq!(r.now().unwrap().name, first.name);
        first.healthy.store(false, Ordering::Relaxed);
        let r = lookup(&snap, b"truck-7", Some("second")).unwrap();
        assert_eq!(r.preference[0].name, first.name, "preference ignores health");
        assert_eq!(r.now().unwrap().name, r.preference[1].name, "the data plane skips the down broker");
        assert_eq!(r.candidates.len(), 1);
    }

    #[test]
    fn rules_pick_the_pool_and_say_which_matched() {
        let text = r#"
[[listener]]
name = "one"
bind = "127.0.0.1:0"
pool = "second"

[[listener.route]]
match = { username = "alice", source = "10.0.0.0/8" }
pool = "first"

[[listener]]
name = "two"
bind = "127.0.0.1:0"
pool = "first"

[pool.first]
backends = ["127.0.0.1:1"]

[pool.second]
backends = ["127.0.0.1:2"]
"#;
        let snap = load_str(text, Path::new(".")).unwrap().snapshot;
        let alice =
            Query { username: Some("alice".into()), source: Some("10.1.1.1".parse().unwrap()), ..Default::default() };
        let r = lookup_query(&snap, b"d", &alice).unwrap();
        assert_eq!(r.pool.name, "first");
        let m = r.matched.unwrap();
        assert_eq!((m.listener.as_str(), m.rule), ("one", Some(0)));
        assert_eq!(m.to_string(), r#"listener "one": route[0] matched (username=alice,source=10.0.0.0/8)"#);
        // Not every condition holds: the listener's own pool.
        let r = lookup_query(&snap, b"d", &Query { username: Some("alice".into()), ..Default::default() }).unwrap();
        assert_eq!((r.pool.name.as_str(), r.matched.unwrap().rule), ("second", None));
        // Another listener, another default; a pool named outright skips the rules.
        let two = Query { listener: Some("two".into()), ..alice.clone() };
        assert_eq!(lookup_query(&snap, b"d", &two).unwrap().pool.name, "first");
        let named = Query { pool: Some("second".into()), ..alice };
        let r = lookup_query(&snap, b"d", &named).unwrap();
        assert_eq!((r.pool.name.as_str(), r.matched), ("second", None));
        let nope = Query { listener: Some("nope".into()), ..Default::default() };
        assert_eq!(lookup_query(&snap, b"d", &nope).unwrap_err(), RouteError::NoListener("nope".into()));
    }

    #[test]
    fn empty_keys_are_not_hashed() {
        let snap = snapshot();
        let e = lookup(&snap, b"", Some("first")).unwrap_err();
        assert_eq!(e, RouteError::EmptyKey { pool: "first".into(), policy: "least_connections" });
        assert!(e.to_string().contains("empty_client_id = least_connections"));
    }
}
