//! The immutable configuration snapshot the data plane runs on. The control plane builds it
//! (reading files, resolving names, loading certificates); the data plane only reads it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::balance::Pool;

/// Everything a connection reads, and nothing else (the settings only the control plane
/// uses sit beside it), swapped whole on reload. A clone shares its listeners and pools.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub listeners: Vec<Arc<ListenerSpec>>,
    pub pools: Vec<Arc<Pool>>,
    pub limits: Limits,
}

impl Snapshot {
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// The listener named `name`: accept loops look it up at each accept, so a reload's new
    /// certificates apply to the next handshake.
    pub fn listener(&self, name: &str) -> Option<&Arc<ListenerSpec>> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

/// One listening socket and what runs on it.
#[derive(Debug)]
pub struct ListenerSpec {
    pub name: String,
    pub bind: SocketAddr,
    /// The default pool: where connections no rule of `routes` matches go.
    pub pool: String,
    /// `[[listener.route]]`, in order: the first rule that matches picks the pool.
    pub routes: Vec<super::routing::RouteRule>,
    pub accept_proxy: bool,
    pub trusted_proxies: Vec<IpNet>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Each certificate file of `tls` with its leaf's expiry (Unix seconds), for the metrics.
    pub cert_expiry: Vec<(String, i64)>,
    /// Connections held at once on this listener; beyond it new ones are closed at accept.
    pub max_connections: Option<usize>,
    /// How a refusal for want of a broker (none answered, or a flapping client-id) is told.
    pub refusal: RefusalStyle,
    /// MQTT over WebSocket on this listener too (`websocket`), told apart from raw MQTT by
    /// the first bytes.
    pub websocket: Option<super::websocket::WebSocketSpec>,
}

/// How a client refused for want of a broker is told (`refusal`). Some client libraries take
/// CONNACK "server unavailable" (3.1.1: 3, 5.0: 0x88) as final and stop reconnecting, while a
/// close sends them back to their reconnect loop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RefusalStyle {
    /// The CONNACK of the refusal, then a polite close.
    #[default]
    Connack,
    /// A polite close without a CONNACK.
    Close,
}

impl ListenerSpec {
    /// Whether a PROXY header from `peer` is believed.
    pub fn trusts(&self, peer: std::net::IpAddr) -> bool {
        let peer = canonical_ip(peer);
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }
}

/// IPv4-mapped IPv6 addresses (dual-stack sockets) compare as IPv4.
pub fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The process-wide limits a connection reads. (The connection cap and the drain settings
/// are the control plane's, beside the snapshot: `control::config::ProcessLimits`.)
#[derive(Debug, Clone)]
pub struct Limits {
    /// TLS handshake + CONNECT must be done within this.
    pub connect_timeout: Duration,
    pub max_connect_packet: usize,
    /// Bytes all connections in setup may hold together for their CONNECTs
    /// ([`super::budget`]).
    pub max_setup_bytes: usize,
    /// Once one side of a relayed connection has closed, how long the other may stay silent.
    pub half_close_timeout: Duration,
    /// Handshake rate, per-source rate and flapping detection.
    pub admission: super::admission::AdmissionLimits,
}
