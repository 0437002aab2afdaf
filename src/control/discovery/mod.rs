//! Dynamic broker discovery for pools configured with `dns = {...}` or `kubernetes = {...}`:
//! each such pool gets a task that publishes the pool's current members on a watch channel.
//! The reload sources (src/control/reload/sources.rs) turn members into triggers and the
//! applier turns those into a new snapshot; nothing here
//! touches a snapshot or a client socket.

pub mod dns;
pub mod kubernetes;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// One discovered broker.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    /// Hashing identity: the pod name (Kubernetes `targetRef.name`) when known, else the
    /// address as `IP:port`.
    pub name: String,
    pub addr: SocketAddr,
    /// Serving but terminating: no new connections, existing ones stay.
    pub draining: bool,
}

impl Member {
    /// A member known only by its address: named `IP:port`.
    pub fn from_addr(addr: SocketAddr) -> Member {
        Member { name: addr.to_string(), addr, draining: false }
    }
}

/// A pool's members, sorted by name and deduplicated.
pub type Members = Arc<Vec<Member>>;

/// How a pool discovers its brokers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoverySpec {
    /// Resolve a (headless Service) name periodically: A/AAAA with `port`, SRV without it.
    /// `resolver`: a specific DNS server instead of the system's (/etc/resolv.conf).
    Dns { name: String, port: Option<u16>, interval: Duration, resolver: Option<SocketAddr> },
    /// Watch the EndpointSlices of a Service. `port`: the port's name or number.
    Kubernetes { namespace: String, service: String, port: String },
}

/// A running discovery task: `rx` holds `None` until the first answer, then the latest
/// members. The last good answer stays when a lookup fails.
pub struct Discovery {
    pub pool: String,
    pub spec: DiscoverySpec,
    pub rx: watch::Receiver<Option<Members>>,
}

/// Start discovering `spec` for `pool` until `stop` is cancelled or `rx` is dropped. Spawns a
/// task: call it inside a Tokio runtime.
pub fn start(pool: &str, spec: &DiscoverySpec, stop: CancellationToken) -> Discovery {
    let (tx, rx) = watch::channel(None);
    match spec.clone() {
        DiscoverySpec::Dns { name, port, interval, resolver } => {
            let target = dns::Target { pool: pool.to_string(), name, port, interval, server: resolver };
            tokio::spawn(dns::run(target, tx, stop));
        }
        DiscoverySpec::Kubernetes { namespace, service, port } => {
            let target = kubernetes::Target { pool: pool.to_string(), namespace, service, port };
            tokio::spawn(kubernetes::run(target, tx, stop));
        }
    }
    Discovery { pool: pool.to_string(), spec: spec.clone(), rx }
}

/// Sorts `members` by name, keeps the first of each name, and publishes them when they differ
/// from what `tx` holds (logging what changed). Returns whether anything was published.
pub(crate) fn publish(pool: &str, tx: &watch::Sender<Option<Members>>, mut members: Vec<Member>) -> bool {
    members.sort();
    members.dedup_by(|b, a| a.name == b.name);
    tx.send_if_modified(|current| {
        if current.as_deref() == Some(&members) {
            return false;
        }
        let old = current.as_deref().map(Vec::as_slice).unwrap_or_default();
        log_changes(pool, old, &members, current.is_none());
        *current = Some(Arc::new(std::mem::take(&mut members)));
        true
    })
}

/// One info line per membership change: which brokers came, went, moved or changed state.
fn log_changes(pool: &str, old: &[Member], new: &[Member], first: bool) {
    let before: BTreeMap<&str, &Member> = old.iter().map(|m| (m.name.as_str(), m)).collect();
    let after: BTreeMap<&str, &Member> = new.iter().map(|m| (m.name.as_str(), m)).collect();
    let show = |m: &Member| {
        let state = if m.draining { " (draining)" } else { "" };
        if m.name == m.addr.to_string() {
            format!("{}{state}", m.name)
        } else {
            format!("{}={}{state}", m.name, m.addr)
        }
    };
    let added: Vec<String> = new.iter().filter(|m| !before.contains_key(m.name.as_str())).map(show).collect();
    let removed: Vec<String> = old.iter().filter(|m| !after.contains_key(m.name.as_str())).map(show).collect();
    let changed: Vec<String> =
        new.iter().filter(|m| before.get(m.name.as_str()).is_some_and(|o| *o != *m)).map(show).collect();
    info!(
        pool,
        members = new.len(),
        added = %added.join(","),
        removed = %removed.join(","),
        changed = %changed.join(","),
        "{}",
        if first { "discovered the pool's first members" } else { "pool membership changed" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, addr: &str, draining: bool) -> Member {
        Member { name: name.into(), addr: addr.parse().unwrap(), draining }
    }

    #[test]
    fn publish_sorts_dedups_and_sends_only_changes() {
        let (tx, rx) = watch::channel(None);
        let a = m("127.0.0.2:1883", "127.0.0.2:1883", false);
        let b = m("127.0.0.1:1883", "127.0.0.1:1883", false);
        assert!(publish("p", &tx, vec![a.clone(), b.clone(), a.clone()]));
        assert_eq!(rx.borrow().as_deref().unwrap(), &vec![b.clone(), a.clone()]);
        assert!(!publish("p", &tx, vec![a.clone(), b.clone()]), "same set: nothing published");
        assert!(publish("p", &tx, vec![b.clone()]));
        assert_eq!(rx.borrow().as_deref().unwrap(), &vec![b.clone()]);
        let b_draining = m("127.0.0.1:1883", "127.0.0.1:1883", true);
        assert!(publish("p", &tx, vec![b_draining.clone()]), "a state change is a change");
        assert!(publish("p", &tx, vec![]), "an empty set is published too");
        assert_eq!(rx.borrow().as_deref().unwrap(), &Vec::<Member>::new());
    }

    #[test]
    fn from_addr_names_the_member_by_its_address() {
        let v6 = Member::from_addr("[2001:db8::1]:1883".parse().unwrap());
        assert_eq!(v6.name, "[2001:db8::1]:1883");
        assert!(!v6.draining);
    }
}
