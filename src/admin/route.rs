//! Route lookup: which broker a routing key (a client-id, by default) goes to, and its whole
//! preference order. One implementation behind `harbormaster route` and the admin server's
//! `/route`, built on the data plane's own [`Pool::ranking`] and [`Pool::candidates`].

use std::fmt;
use std::sync::Arc;

use crate::proxy::balance::{Backend, EmptyKey, HashKey, Pool};
use crate::proxy::snapshot::Snapshot;

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
    Ok(Route { pool, preference, candidates: pool.candidates(key, pool.backend_attempts) })
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
    fn empty_keys_are_not_hashed() {
        let snap = snapshot();
        let e = lookup(&snap, b"", Some("first")).unwrap_err();
        assert_eq!(e, RouteError::EmptyKey { pool: "first".into(), policy: "least_connections" });
        assert!(e.to_string().contains("empty_client_id = least_connections"));
    }
}
