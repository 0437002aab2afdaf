//! Configuration: the raw TOML shape (serde, unknown keys rejected), validation that reports
//! every problem with its key path, and the build of a data-plane snapshot from it.
//! `harbormaster check`, `route` and `run` all go through [`load`].

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use super::discovery::DiscoverySpec;
use crate::proxy::admission::{AdmissionLimits, Flapping};
use crate::proxy::balance::{
    Backend, BackendTransport, CheckKind, EmptyKey, HashKey, HealthSpec, Hold, HttpCheck, PlannedCloseWill, Pool,
    ProxyProtocol, Rebalance,
};
use crate::proxy::mqtt::{MAX_PACKET_LEN, MIN_CONNECT_LEN};
use crate::proxy::proxy_header::Tlv;
use crate::proxy::rewrite::{Fact, Piece, Policy as ConnectPolicy, Template};
use crate::proxy::routing::{Conditions, RouteRule};
use crate::proxy::snapshot::{Limits, ListenerSpec, RefusalStyle, Snapshot};
use crate::proxy::websocket::WebSocketSpec;

/// One thing wrong with a config, at a key path such as `pool.brokers.backends[2]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a config; loading fails when this is non-empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub listener: Vec<RawListener>,
    #[serde(default)]
    pub pool: BTreeMap<String, RawPool>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub admin: RawAdmin,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: String,
    pub bind: String,
    pub pool: String,
    #[serde(default)]
    pub accept_proxy: bool,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    pub tls: Option<RawTls>,
    /// Connections held at once on this listener (within `limits.max_connections`).
    pub max_connections: Option<usize>,
    /// How a refusal for want of a broker is told: `"connack"` (default) or `"close"`.
    #[serde(default)]
    pub refusal: RawRefusal,
    /// MQTT over WebSocket on this listener too: `websocket = { path = "/mqtt", origins = [] }`.
    pub websocket: Option<RawWebSocket>,
    /// `[[listener.route]]`: ordered routing rules, first match wins, `pool` the default.
    #[serde(default)]
    pub route: Vec<RawRoute>,
}

/// A listener's `websocket` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebSocket {
    #[serde(default = "default_websocket_path")]
    pub path: String,
    /// `Origin` values accepted (scheme://host[:port]); empty: any.
    #[serde(default)]
    pub origins: Vec<String>,
}

fn default_websocket_path() -> String {
    "/mqtt".to_string()
}

/// One `[[listener.route]]`: `match = { ... }` and the pool it sends matching connections to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(rename = "match")]
    pub when: RawMatch,
    pub pool: String,
}

/// A rule's conditions, all of which must hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub sni: Option<String>,
    pub sni_suffix: Option<String>,
    pub alpn: Option<String>,
    pub cert_cn: Option<String>,
    pub cert_issuer_cn: Option<String>,
    pub username: Option<String>,
    pub client_id_prefix: Option<String>,
    /// A CIDR (or address) or a list of them.
    pub source: Option<StringOrList>,
}

/// `connect = { username = "keep" | "cert_cn" | TEMPLATE, password = "keep" | "drop",
/// user_properties = [FACT, ...] }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConnect {
    #[serde(default = "default_keep")]
    pub username: String,
    #[serde(default)]
    pub password: RawPassword,
    #[serde(default)]
    pub user_properties: Vec<String>,
}

fn default_keep() -> String {
    "keep".into()
}

/// `connect.password`: `"keep"` (default) or `"drop"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawPassword {
    #[default]
    Keep,
    Drop,
}

/// A key that takes one string or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

/// `refusal`: `"connack"` (default) or `"close"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawRefusal {
    #[default]
    Connack,
    Close,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub certs: Vec<RawCert>,
    pub client_ca: Option<String>,
    /// Certificate revocation lists for client certificates: one file or a list, PEM or DER.
    #[serde(default)]
    pub client_crl: OneOrMany,
    #[serde(default)]
    pub client_auth: ClientAuth,
    #[serde(default)]
    pub alpn: Vec<String>,
    /// File of session ticket keys shared by replicas (src/control/tickets.rs).
    pub ticket_keys: Option<String>,
}

/// A key that takes one file (`"a.crl"`) or a list (`["a.crl", "b.crl"]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OneOrMany {
    pub files: Vec<String>,
    /// Written as a list: its problems are reported at `key[i]`.
    pub is_list: bool,
}

impl OneOrMany {
    /// The key path of the `i`th file below `key`.
    pub fn key(&self, key: &str, i: usize) -> String {
        if self.is_list {
            format!("{key}[{i}]")
        } else {
            key.to_string()
        }
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Files;
        impl<'de> serde::de::Visitor<'de> for Files {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a file name or a list of file names")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany { files: vec![v.to_string()], is_list: false })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut files = Vec::new();
                while let Some(f) = seq.next_element::<String>()? {
                    files.push(f);
                }
                Ok(OneOrMany { files, is_list: true })
            }
        }
        d.deserialize_any(Files)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCert {
    pub cert: String,
    pub key: String,
    /// A DER OCSP response for `cert`, stapled as is to every handshake that asks for one.
    pub ocsp: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    #[default]
    None,
    Optional,
    Required,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawBackend {
    Address(String),
    Named { name: String, address: String },
}

/// `dns = { name = "hivemq-headless.mqtt.svc.cluster.local.", port = 1883, interval = "10s",
/// resolver = "10.96.0.10:53" }`: A/AAAA with `port`, SRV without it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    pub name: String,
    pub port: Option<u16>,
    #[serde(default = "default_dns_interval", deserialize_with = "duration")]
    pub interval: Duration,
    /// `IP:port` (or `IP`, port 53) of the DNS server to ask instead of /etc/resolv.conf's.
    pub resolver: Option<String>,
}

fn default_dns_interval() -> Duration {
    Duration::from_secs(10)
}

/// Shortest `dns.interval`: resolving more often only loads the DNS server.
const MIN_DNS_INTERVAL: Duration = Duration::from_millis(100);

/// `kubernetes = { namespace = "mqtt", service = "hivemq", port = "mqtt" }` (port by name or
/// number).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKubernetes {
    pub namespace: String,
    pub service: String,
    pub port: RawPortRef,
}

/// A Service port by name (`"mqtt"`) or number (`1883`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawPortRef {
    Number(u16),
    Name(String),
}

impl fmt::Display for RawPortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawPortRef::Number(n) => write!(f, "{n}"),
            RawPortRef::Name(s) => f.write_str(s),
        }
    }
}

/// `dns.resolver`: `IP:port`, or a bare IP on port 53.
fn parse_resolver(s: &str) -> Option<SocketAddr> {
    s.parse::<SocketAddr>().ok().or_else(|| s.parse::<std::net::IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    /// Static brokers. Empty (and absent) when `dns` or `kubernetes` discovers them.
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    /// Brokers from DNS: `dns = { name, port, interval = "10s", resolver }`.
    pub dns: Option<RawDns>,
    /// Brokers from a Service's EndpointSlices: `kubernetes = { namespace, service, port }`.
    pub kubernetes: Option<RawKubernetes>,
    #[serde(default = "default_hash_key")]
    pub hash_key: RawHashKey,
    #[serde(default = "default_empty")]
    pub empty_client_id: RawEmpty,
    #[serde(default = "default_proxy_protocol")]
    pub proxy_protocol: RawProxyProtocol,
    #[serde(default = "default_tlvs")]
    pub tlvs: Vec<RawTlv>,
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    #[serde(default = "default_backend_connect_timeout", deserialize_with = "duration")]
    pub backend_connect_timeout: Duration,
    /// Time allowed for a broker's first answer (CONNACK, or AUTH) to the CONNECT.
    #[serde(default = "default_backend_connack_timeout", deserialize_with = "duration")]
    pub backend_connack_timeout: Duration,
    #[serde(default = "default_backend_attempts")]
    pub backend_attempts: usize,
    /// The CONNECT rewrite for brokers that read no PROXY header.
    pub connect: Option<RawConnect>,
    /// The brokers' Maximum Packet Size: no larger CONNECT is sent to them.
    pub backend_max_packet_size: Option<usize>,
    /// Active health checks; absent: none.
    pub health: Option<RawHealth>,
    /// What happens to the client connections of a broker that leaves the pool.
    #[serde(default)]
    pub on_backend_removed: RawOnRemoved,
    /// With `on_backend_removed = "close"`: connections closed per second.
    #[serde(default = "default_close_rate")]
    pub close_rate: u32,
    /// When harbormaster closes a client on purpose (drain, broker removed): keep the broker's
    /// view (it publishes the Will, as for any lost client) or end the session on the client's
    /// behalf with a DISCONNECT, so that a device that is only moving leaves no Will.
    #[serde(default)]
    pub planned_close_will: RawPlannedCloseWill,
    /// What new connections do while their first-choice broker restarts: fail over at once
    /// (`"failover"`) or wait for it up to `hold_timeout` (`"hold"`).
    #[serde(default)]
    pub on_backend_restart: RawOnRestart,
    /// With `on_backend_restart = "hold"`: how long after a broker went down or away its new
    /// connections wait for it.
    #[serde(default = "default_hold_timeout", deserialize_with = "duration")]
    pub hold_timeout: Duration,
    /// With `on_backend_restart = "hold"`: connections held at once in the pool.
    #[serde(default = "default_hold_max")]
    pub hold_max: usize,
    /// Whether connections away from their first choice are moved back to it once it is in
    /// rotation again: `"off"` (default) or `"home"`.
    #[serde(default)]
    pub rebalance: RawRebalance,
    /// Connections per second moved back home (`rebalance = "home"`, and the admin server's
    /// rebalance of a pool with `rebalance = "home"`).
    #[serde(default = "default_rebalance_rate")]
    pub rebalance_rate: u32,
    /// What the brokers are spoken to in: `"mqtt"` (default; a WebSocket client's frames are
    /// unwrapped, so brokers need only their TCP listener) or `"websocket"` (a WebSocket to the
    /// broker's WebSocket listener, the client's frames relayed untouched).
    #[serde(default)]
    pub backend_transport: RawBackendTransport,
    /// With `backend_transport = "websocket"`: the path of the broker's WebSocket listener.
    pub websocket_path: Option<String>,
}

/// `on_backend_restart`: `"failover"` (default) or `"hold"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawOnRestart {
    #[default]
    Failover,
    Hold,
}

fn default_hold_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_hold_max() -> usize {
    10_000
}

/// `rebalance`: `"off"` (default) or `"home"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawRebalance {
    #[default]
    Off,
    Home,
}

fn default_rebalance_rate() -> u32 {
    20
}

/// `backend_transport`: `"mqtt"` (default) or `"websocket"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawBackendTransport {
    #[default]
    Mqtt,
    #[serde(rename = "websocket")]
    WebSocket,
}

/// `websocket_path` when absent.
const DEFAULT_BACKEND_WEBSOCKET_PATH: &str = "/mqtt";

/// `planned_close_will`: `"keep"` (default) or `"suppress"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawPlannedCloseWill {
    #[default]
    Keep,
    Suppress,
}

/// `on_backend_removed`: `"keep"` (default) or `"close"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawOnRemoved {
    #[default]
    Keep,
    Close,
}

fn default_close_rate() -> u32 {
    100
}

/// What happens to the client connections of a broker that leaves its pool (reload or
/// discovery update): kept until they end by themselves, or closed `rate` per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRemoved {
    Keep,
    Close { rate: u32 },
}

/// `health = { check = "tcp" | "mqtt" | "http", interval = "5s", timeout = "2s", rise = 2,
/// fall = 3 }`; with `"http"` also `port`, `path = "/"`, `status = 200`, `basic_auth`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub check: RawCheck,
    #[serde(default = "default_health_interval", deserialize_with = "duration")]
    pub interval: Duration,
    #[serde(default = "default_health_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// `check = "http"`: the port of the broker's HTTP endpoint (required).
    pub port: Option<u16>,
    /// `check = "http"`: path and query of the request; default `/`.
    pub path: Option<String>,
    /// `check = "http"`: the status that passes; default 200.
    pub status: Option<u16>,
    /// `check = "http"`: `"user:password"` sent as HTTP basic authentication.
    pub basic_auth: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawCheck {
    Tcp,
    Mqtt,
    Http,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawHashKey {
    ClientId,
    Username,
    CertCn,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawEmpty {
    LeastConnections,
    SourceAddress,
    Reject,
    Assign,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawProxyProtocol {
    None,
    V1,
    V2,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawTlv {
    Alpn,
    Authority,
    UniqueId,
    Ssl,
    Crc32c,
    CertSha256,
    ClientId,
}

fn default_hash_key() -> RawHashKey {
    RawHashKey::ClientId
}
fn default_empty() -> RawEmpty {
    RawEmpty::LeastConnections
}
fn default_proxy_protocol() -> RawProxyProtocol {
    RawProxyProtocol::None
}
fn default_tlvs() -> Vec<RawTlv> {
    use RawTlv::*;
    vec![Alpn, Authority, UniqueId, Ssl, Crc32c, CertSha256, ClientId]
}
fn default_max_header_bytes() -> usize {
    500
}
fn default_backend_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_backend_connack_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_backend_attempts() -> usize {
    3
}
fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    pub max_connect_packet: usize,
    /// Bytes all connections in setup may hold together for their CONNECTs.
    pub max_setup_bytes: usize,
    #[serde(deserialize_with = "duration")]
    pub drain_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub drain_delay: Duration,
    pub max_connections: usize,
    #[serde(deserialize_with = "duration")]
    pub half_close_timeout: Duration,
    /// New TLS handshakes per second (token bucket); 0: unlimited.
    pub handshake_rate: u32,
    /// Default: `handshake_rate`.
    pub handshake_burst: Option<u32>,
    pub handshake_queue: usize,
    #[serde(deserialize_with = "duration")]
    pub handshake_queue_timeout: Duration,
    /// New connections per second per client address; 0: unlimited.
    pub per_source_rate: u32,
    /// Default: `per_source_rate`.
    pub per_source_burst: Option<u32>,
    /// Absent: off.
    pub flapping: Option<RawFlapping>,
}

/// `flapping = { max_connects = 15, window = "1m", ban = "5m" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlapping {
    #[serde(default = "default_flapping_max")]
    pub max_connects: u32,
    #[serde(default = "default_flapping_window", deserialize_with = "duration")]
    pub window: Duration,
    #[serde(default = "default_flapping_ban", deserialize_with = "duration")]
    pub ban: Duration,
}

fn default_flapping_max() -> u32 {
    15
}
fn default_flapping_window() -> Duration {
    Duration::from_secs(60)
}
fn default_flapping_ban() -> Duration {
    Duration::from_secs(300)
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            connect_timeout: Duration::from_secs(10),
            max_connect_packet: 262_144,
            max_setup_bytes: 64 * 1024 * 1024,
            drain_timeout: Duration::from_secs(30),
            drain_delay: Duration::ZERO,
            max_connections: 100_000,
            half_close_timeout: Duration::from_secs(60),
            handshake_rate: 0,
            handshake_burst: None,
            handshake_queue: 1024,
            handshake_queue_timeout: Duration::from_secs(2),
            per_source_rate: 0,
            per_source_burst: None,
            flapping: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    #[serde(default)]
    pub format: LogFormat,
    #[serde(default = "default_level")]
    pub level: String,
}

fn default_level() -> String {
    "info".into()
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog { format: LogFormat::Text, level: default_level() }
    }
}

/// `[admin]`: the admin HTTP server (`/healthz`, `/readyz`, `/metrics`, `/backends`, `/route`,
/// and with `token_file` the drain and enable of a broker).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[serde(default = "default_admin_enabled")]
    pub enabled: bool,
    pub bind: Option<String>,
    /// Bearer tokens for the mutating endpoints, one a line; without it they are refused.
    pub token_file: Option<String>,
}

fn default_admin_enabled() -> bool {
    true
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin { enabled: true, bind: None, token_file: None }
    }
}

/// Where the admin server listens unless `[admin] bind` says otherwise. Loopback: its `GET`s
/// need no authentication and `/backends` and `/route` show the broker topology, so it is
/// exposed only on purpose (in Kubernetes, `bind = "0.0.0.0:9090"` for probes and scrapes).
pub const DEFAULT_ADMIN_BIND: &str = "127.0.0.1:9090";

/// The admin server's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    pub enabled: bool,
    pub bind: SocketAddr,
    /// `bind` was not written in the config. Then an address already in use only disables
    /// the admin server (with a warning) instead of stopping the process.
    pub bind_is_default: bool,
    /// `[admin] token_file`, resolved against the config's folder: the bearer tokens that
    /// may use the mutating endpoints (re-read when it changes). `None`: they are refused.
    pub token_file: Option<PathBuf>,
}

/// Validates `[admin]`: a parsable address that no MQTT listener also binds.
fn check_admin(c: &mut Check, raw: &RawAdmin, listeners: &[Arc<ListenerSpec>], base: &Path) -> AdminSettings {
    let default: SocketAddr = DEFAULT_ADMIN_BIND.parse().expect("valid default");
    let bind = match raw.bind.as_deref().map(str::parse::<SocketAddr>) {
        None => default,
        Some(Ok(a)) => a,
        Some(Err(_)) => {
            c.add("admin.bind", format!("{:?} is not an IP:port address", raw.bind.as_deref().unwrap_or("")));
            default
        }
    };
    if raw.enabled {
        for l in listeners.iter().filter(|l| same_port_and_overlapping_ip(bind, l.bind)) {
            let what = if raw.bind.is_none() { format!("{bind} (the default)") } else { bind.to_string() };
            c.add(
                "admin.bind",
                format!(
                    "{what} collides with listener {:?} on {}: the admin server never shares a port with MQTT",
                    l.name, l.bind
                ),
            );
        }
    }
    let token_file = match raw.token_file.as_deref() {
        Some("") => {
            c.add("admin.token_file", "must not be empty (leave it out to turn the mutating endpoints off)");
            None
        }
        f => f.map(|f| relative(base, f)),
    };
    AdminSettings { enabled: raw.enabled, bind, bind_is_default: raw.bind.is_none(), token_file }
}

/// Whether two listening sockets would take the same port: same non-zero port, and the same
/// IP or either one a wildcard.
fn same_port_and_overlapping_ip(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// A loaded config: the snapshot for the data plane and the settings the process itself uses.
#[derive(Debug)]
pub struct Loaded {
    /// What a connection reads.
    pub snapshot: Snapshot,
    /// What the process does with `[limits]` beyond a connection: the connection cap, the drain.
    pub process: ProcessLimits,
    pub log: RawLog,
    pub admin: AdminSettings,
    /// The file it was read from ([`load`]); `None` from [`load_str`]. Reloads re-read it.
    pub source: Option<PathBuf>,
    /// Every certificate, key and CA file it references: reloads watch their folders.
    pub files: Vec<PathBuf>,
    /// Pools whose brokers come from discovery, and how.
    pub discovery: Vec<(String, DiscoverySpec)>,
    /// Per pool: what happens to a removed broker's connections.
    pub on_removed: BTreeMap<String, OnRemoved>,
    /// Not problems, but worth an operator's attention (a certificate close to its expiry):
    /// printed by `check`, logged at start and at every reload.
    pub warnings: Vec<Problem>,
}

/// The `[limits]` the process applies rather than a connection: kept beside the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessLimits {
    /// Connections held at once across all listeners; beyond it new ones are closed at
    /// accept, before any TLS work (a semaphore the listeners share).
    pub max_connections: usize,
    /// After SIGTERM (and `drain_delay`): the window over which live connections are closed.
    pub drain_timeout: Duration,
    /// After SIGTERM: how long listeners keep accepting while readiness is already false.
    pub drain_delay: Duration,
}

/// Read, parse, validate and build. Relative file paths are relative to the config's folder.
pub fn load(path: &Path) -> Result<Loaded, Problems> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Problems(vec![Problem { path: path.display().to_string(), message: format!("cannot read: {e}") }])
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut loaded = load_str(&text, &base)?;
    loaded.source = Some(path.to_path_buf());
    Ok(loaded)
}

/// The pools of `raw` whose brokers come from discovery (`dns`, `kubernetes`), with how.
/// Meant for a validated config: a pool that sets both gets its `dns`.
pub fn discovery_specs(raw: &RawConfig) -> Vec<(String, DiscoverySpec)> {
    raw.pool
        .iter()
        .filter_map(|(name, p)| {
            let spec = if let Some(d) = &p.dns {
                DiscoverySpec::Dns {
                    name: d.name.clone(),
                    port: d.port,
                    interval: d.interval,
                    resolver: d.resolver.as_deref().and_then(parse_resolver),
                }
            } else {
                let k = p.kubernetes.as_ref()?;
                DiscoverySpec::Kubernetes {
                    namespace: k.namespace.clone(),
                    service: k.service.clone(),
                    port: k.port.to_string(),
                }
            };
            Some((name.clone(), spec))
        })
        .collect()
}

/// Checks a pool's broker source: exactly one of `backends`, `dns`, `kubernetes`, and the
/// discovery settings themselves.
fn check_broker_source(c: &mut Check, at: &str, p: &RawPool) {
    let given: Vec<&str> =
        [(!p.backends.is_empty(), "backends"), (p.dns.is_some(), "dns"), (p.kubernetes.is_some(), "kubernetes")]
            .into_iter()
            .filter_map(|(set, key)| set.then_some(key))
            .collect();
    match given.len() {
        0 => c.add(
            format!("{at}.backends"),
            "at least one broker is required (or discover them with dns = {...} or kubernetes = {...})",
        ),
        1 => {}
        _ => c.add(at, format!("set exactly one of backends, dns, kubernetes; found {}", given.join(" and "))),
    }
    if let Some(d) = &p.dns {
        let name = d.name.trim_end_matches('.');
        if name.is_empty() {
            c.add(format!("{at}.dns.name"), "must not be empty");
        } else if name.len() > 253
            || name.split('.').any(|l| l.is_empty() || l.len() > 63)
            || name.contains(char::is_whitespace)
        {
            c.add(format!("{at}.dns.name"), format!("{:?} is not a DNS name", d.name));
        }
        if d.port == Some(0) {
            c.add(format!("{at}.dns.port"), "must be between 1 and 65535 (omit it to look up SRV records)");
        }
        if d.interval < MIN_DNS_INTERVAL {
            c.add(format!("{at}.dns.interval"), format!("must be at least {MIN_DNS_INTERVAL:?}"));
        }
        if let Some(r) = d.resolver.as_deref().filter(|r| parse_resolver(r).is_none()) {
            c.add(format!("{at}.dns.resolver"), format!("{r:?} is not an IP:port address"));
        }
    }
    if let Some(k) = &p.kubernetes {
        for (key, value) in [("namespace", &k.namespace), ("service", &k.service)] {
            if !is_dns_label(value) {
                c.add(
                    format!("{at}.kubernetes.{key}"),
                    format!("{value:?} is not a Kubernetes name (lowercase letters, digits and '-', at most 63)"),
                );
            }
        }
        match &k.port {
            RawPortRef::Number(0) => c.add(format!("{at}.kubernetes.port"), "must be between 1 and 65535"),
            RawPortRef::Number(_) => {}
            RawPortRef::Name(n) => {
                let valid = (1..=15).contains(&n.len())
                    && n.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-')
                    && n.chars().any(|ch| ch.is_ascii_lowercase())
                    && !n.starts_with('-')
                    && !n.ends_with('-')
                    && !n.contains("--");
                if !valid {
                    c.add(
                        format!("{at}.kubernetes.port"),
                        format!(
                            "{n:?} is neither a port number nor a Kubernetes port name (at most 15 of a-z, 0-9, '-')"
                        ),
                    );
                }
            }
        }
    }
}

/// An RFC 1123 label: what Kubernetes accepts as a namespace or Service name.
fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Certificate, key, OCSP, CA, CRL and ticket key files a config references, resolved against `base`.
fn referenced_files(raw: &RawConfig, base: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for tls in raw.listener.iter().filter_map(|l| l.tls.as_ref()) {
        for pair in &tls.certs {
            files.push(relative(base, &pair.cert));
            files.push(relative(base, &pair.key));
            files.extend(pair.ocsp.iter().map(|o| relative(base, o)));
        }
        files.extend(tls.client_ca.iter().map(|ca| relative(base, ca)));
        files.extend(tls.client_crl.files.iter().map(|crl| relative(base, crl)));
        files.extend(tls.ticket_keys.iter().map(|k| relative(base, k)));
    }
    files.sort();
    files.dedup();
    files
}

/// [`load`] on text already read; `base` resolves relative paths.
pub fn load_str(text: &str, base: &Path) -> Result<Loaded, Problems> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let path = match e.span() {
            Some(span) => key_path_at(text, span.start),
            None => "config".into(),
        };
        Problems(vec![Problem { path, message: e.message().to_string() }])
    })?;
    build(raw, base)
}

/// Best-effort key path (`pool.brokers.backend_attempts (line 12)`) of a byte offset, for
/// errors that TOML parsing reports only by position.
fn key_path_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_no = text[..offset].matches('\n').count() + 1;
    let lines: Vec<&str> = text.lines().collect();
    let here = lines.get(line_no - 1).map(|l| l.trim()).unwrap_or("");
    let key = here.split_once('=').map(|(k, _)| k.trim()).filter(|k| !k.is_empty() && !k.starts_with('['));
    let table = lines[..(line_no - 1).min(lines.len())]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let path = match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}"),
        (Some(t), None) => t,
        (None, Some(k)) => k.to_string(),
        (None, None) => "config".to_string(),
    };
    format!("{path} (line {line_no})")
}

struct Check {
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Check {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem { path: path.into(), message: message.into() });
    }

    fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Problem { path: path.into(), message: message.into() });
    }
}

fn build(raw: RawConfig, base: &Path) -> Result<Loaded, Problems> {
    let mut c = Check { problems: Vec::new(), warnings: Vec::new() };

    let pools: Vec<Arc<Pool>> =
        raw.pool.iter().filter_map(|(name, p)| build_pool(&mut c, name, p).map(Arc::new)).collect();
    if raw.pool.is_empty() {
        c.add("pool", "at least one [pool.NAME] is required");
    }

    if raw.listener.is_empty() {
        c.add("listener", "at least one [[listener]] is required");
    }
    let mut names = HashSet::new();
    let mut binds = HashSet::new();
    let mut listeners = Vec::new();
    for (i, l) in raw.listener.iter().enumerate() {
        let at = format!("listener[{i}]");
        if l.name.is_empty() {
            c.add(format!("{at}.name"), "must not be empty");
        } else if !names.insert(l.name.as_str()) {
            c.add(format!("{at}.name"), format!("duplicate listener name {:?}", l.name));
        }
        let bind = match l.bind.parse::<SocketAddr>() {
            Ok(a) => {
                if a.port() != 0 && !binds.insert(a) {
                    c.add(format!("{at}.bind"), format!("{a} is bound by another listener"));
                }
                Some(a)
            }
            Err(_) => {
                c.add(format!("{at}.bind"), format!("{:?} is not an IP:port address", l.bind));
                None
            }
        };
        if !raw.pool.contains_key(&l.pool) {
            c.add(format!("{at}.pool"), format!("no pool named {:?}", l.pool));
        }
        if l.max_connections == Some(0) {
            c.add(format!("{at}.max_connections"), "must be greater than 0");
        }
        let mut trusted = Vec::new();
        for (j, t) in l.trusted_proxies.iter().enumerate() {
            match t.parse::<IpNet>().or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from)) {
                Ok(n) => trusted.push(n),
                Err(_) => c.add(format!("{at}.trusted_proxies[{j}]"), format!("{t:?} is not a CIDR or IP address")),
            }
        }
        if l.accept_proxy && l.trusted_proxies.is_empty() {
            c.add(
                format!("{at}.trusted_proxies"),
                "accept_proxy = true needs the CIDRs of the load balancers allowed to send PROXY headers",
            );
        }
        if !l.accept_proxy && !l.trusted_proxies.is_empty() {
            c.add(format!("{at}.trusted_proxies"), "set but accept_proxy is false");
        }
        let websocket = l.websocket.as_ref().map(|w| {
            if !w.path.starts_with('/') || w.path.contains(['?', '#', ' ']) {
                c.add(format!("{at}.websocket.path"), format!("{:?} is not an absolute path without a query", w.path));
            }
            for (j, o) in w.origins.iter().enumerate() {
                if !o.contains("://") || o.ends_with('/') {
                    c.add(
                        format!("{at}.websocket.origins[{j}]"),
                        format!("{o:?} is not an origin (scheme://host[:port], no path)"),
                    );
                }
            }
            WebSocketSpec { path: w.path.clone(), origins: w.origins.iter().map(|o| o.to_ascii_lowercase()).collect() }
        });
        let mut cert_expiry = Vec::new();
        let tls = l.tls.as_ref().and_then(|t| match super::tls::server_config(t, &l.name, base) {
            Ok(built) => {
                cert_expiry = built.cert_expiry;
                for (k, m) in built.warnings {
                    c.warn(format!("{at}.tls.{k}"), m);
                }
                Some(Arc::new(built.config))
            }
            Err(errs) => {
                for (k, m) in errs {
                    c.add(format!("{at}.tls{}{k}", if k.is_empty() { "" } else { "." }), m);
                }
                None
            }
        });
        let routes = check_routes(&mut c, &at, &l.route, &raw.pool, l.tls.as_ref());
        if let Some(bind) = bind {
            listeners.push(Arc::new(ListenerSpec {
                name: l.name.clone(),
                bind,
                pool: l.pool.clone(),
                routes,
                accept_proxy: l.accept_proxy,
                trusted_proxies: trusted,
                tls,
                cert_expiry,
                max_connections: l.max_connections,
                refusal: match l.refusal {
                    RawRefusal::Connack => RefusalStyle::Connack,
                    RawRefusal::Close => RefusalStyle::Close,
                },
                websocket,
            }));
        }
    }

    let lim = &raw.limits;
    if lim.connect_timeout.is_zero() {
        c.add("limits.connect_timeout", "must be greater than 0");
    }
    if lim.half_close_timeout.is_zero() {
        c.add("limits.half_close_timeout", "must be greater than 0");
    }
    if lim.drain_timeout.is_zero() {
        c.add("limits.drain_timeout", "must be greater than 0");
    }
    for (name, p) in &raw.pool {
        if p.close_rate == 0 {
            c.add(format!("pool.{name}.close_rate"), "must be at least 1 (connections per second)");
        }
        if p.rebalance_rate == 0 {
            c.add(format!("pool.{name}.rebalance_rate"), "must be at least 1 (connections per second)");
        }
    }
    // 268,435,455 is the largest remaining length MQTT can express.
    if !(16..=268_435_460).contains(&lim.max_connect_packet) {
        c.add("limits.max_connect_packet", "must be between 16 and 268435460 bytes");
    }
    // Buffers past 4 KiB may use half of it: a CONNECT of max_connect_packet must fit there.
    if lim.max_setup_bytes / 2 < lim.max_connect_packet {
        c.add("limits.max_setup_bytes", "must be at least twice limits.max_connect_packet");
    }
    if lim.max_connections == 0 {
        c.add("limits.max_connections", "must be greater than 0");
    }
    let admission = check_admission(&mut c, lim);
    if tracing_subscriber::EnvFilter::try_new(&raw.log.level).is_err() {
        c.add("log.level", format!("{:?} is not a valid log filter", raw.log.level));
    }
    let admin = check_admin(&mut c, &raw.admin, &listeners, base);
    warn_identity_never_there(&mut c, &raw, &pools);
    warn_websocket_pool_without_websocket(&mut c, &raw, &pools);

    if !c.problems.is_empty() {
        return Err(Problems(c.problems));
    }
    let files = referenced_files(&raw, base);
    let discovery = discovery_specs(&raw);
    let on_removed = raw
        .pool
        .iter()
        .map(|(name, p)| {
            let policy = match p.on_backend_removed {
                RawOnRemoved::Keep => OnRemoved::Keep,
                RawOnRemoved::Close => OnRemoved::Close { rate: p.close_rate },
            };
            (name.clone(), policy)
        })
        .collect();
    Ok(Loaded {
        snapshot: Snapshot {
            listeners,
            pools,
            limits: Limits {
                connect_timeout: lim.connect_timeout,
                max_connect_packet: lim.max_connect_packet,
                max_setup_bytes: lim.max_setup_bytes,
                half_close_timeout: lim.half_close_timeout,
                admission,
            },
        },
        process: ProcessLimits {
            max_connections: lim.max_connections,
            drain_timeout: lim.drain_timeout,
            drain_delay: lim.drain_delay,
        },
        log: raw.log,
        admin,
        source: None,
        files,
        discovery,
        on_removed,
        warnings: c.warnings,
    })
}

/// Warns about a listener without `websocket` whose connections reach a pool with
/// `backend_transport = "websocket"`: such a pool serves only WebSocket clients, so every raw
/// MQTT client sent there is refused.
fn warn_websocket_pool_without_websocket(c: &mut Check, raw: &RawConfig, pools: &[Arc<Pool>]) {
    for (i, l) in raw.listener.iter().enumerate().filter(|(_, l)| l.websocket.is_none()) {
        let names = std::iter::once(&l.pool).chain(l.route.iter().map(|r| &r.pool));
        let mut seen = HashSet::new();
        for name in names.filter(|n| seen.insert(*n)) {
            let ws = pools.iter().any(|p| &p.name == name && p.backend_transport != BackendTransport::Mqtt);
            if ws {
                c.warn(
                    format!("listener[{i}]"),
                    format!(
                        "pool {name:?} has backend_transport = \"websocket\" and serves only WebSocket clients, \
                         but this listener has no websocket: every connection it sends there is refused \
                         (CONNACK \"server unavailable\")"
                    ),
                );
            }
        }
    }
}

/// Warns about a listener whose connections reach a pool whose `connect.username` needs a fact
/// the listener never has — a client certificate it never asks for, or TLS facts (`{sni}`,
/// `{alpn}`, `{tls_version}`) without `[listener.tls]`: every one of them would be refused.
fn warn_identity_never_there(c: &mut Check, raw: &RawConfig, pools: &[Arc<Pool>]) {
    for (i, l) in raw.listener.iter().enumerate() {
        let tls = l.tls.is_some();
        let asks = l.tls.as_ref().is_some_and(|t| t.client_auth != ClientAuth::None);
        if asks {
            continue;
        }
        let names = std::iter::once(&l.pool).chain(l.route.iter().map(|r| &r.pool));
        let mut seen = HashSet::new();
        for name in names.filter(|n| seen.insert(*n)) {
            let Some(template) = pools.iter().find(|p| &p.name == name).and_then(|p| p.connect.username.as_ref())
            else {
                continue;
            };
            let never = template.0.iter().find_map(|p| match p {
                Piece::Fact(f @ (Fact::CertCn | Fact::CertIssuerCn | Fact::CertSha256)) => {
                    Some((*f, "asks for no client certificate"))
                }
                Piece::Fact(f @ (Fact::Sni | Fact::Alpn | Fact::TlsVersion)) if !tls => {
                    Some((*f, "has no [listener.tls]"))
                }
                _ => None,
            });
            if let Some((f, why)) = never {
                c.warn(
                    format!("listener[{i}]"),
                    format!(
                        "pool {name:?} makes the username from {{{}}}, but this listener {why}: every \
                         connection it sends there is refused (CONNACK \"bad user name or password\")",
                        f.as_str()
                    ),
                );
            }
        }
    }
}

/// Compiles a pool's `connect` policy: a username template whose placeholders are facts, and
/// User Properties naming facts, each once.
fn check_connect(c: &mut Check, at: &str, r: &RawConnect) -> ConnectPolicy {
    let username = match r.username.as_str() {
        "keep" => None,
        t => match Template::parse(t) {
            Ok(t) => Some(t),
            Err(e) => {
                c.add(
                    format!("{at}.username"),
                    format!("{e} (\"keep\", \"cert_cn\" or a template like \"{{cert_cn}}@{{sni}}\")"),
                );
                None
            }
        },
    };
    let mut user_properties = Vec::new();
    for (i, name) in r.user_properties.iter().enumerate() {
        match Fact::parse(name) {
            Some(f) if user_properties.contains(&f) => {
                c.add(format!("{at}.user_properties[{i}]"), format!("{name:?} is listed twice"))
            }
            Some(f) => user_properties.push(f),
            None => {
                let names: Vec<&str> = Fact::ALL.iter().map(|f| f.as_str()).collect();
                c.add(format!("{at}.user_properties[{i}]"), format!("{name:?} is not one of {}", names.join(", ")))
            }
        }
    }
    ConnectPolicy { username, drop_password: r.password == RawPassword::Drop, user_properties }
}

/// Compiles a listener's `[[listener.route]]` rules: pools that exist, conditions that parse
/// (names lowercased, CIDRs parsed), and no rule after one that matches every connection.
fn check_routes(
    c: &mut Check,
    at: &str,
    raw: &[RawRoute],
    pools: &BTreeMap<String, RawPool>,
    tls: Option<&RawTls>,
) -> Vec<RouteRule> {
    let mut rules = Vec::with_capacity(raw.len());
    let mut catch_all: Option<usize> = None;
    for (j, r) in raw.iter().enumerate() {
        let at = format!("{at}.route[{j}]");
        if !pools.contains_key(&r.pool) {
            c.add(format!("{at}.pool"), format!("no pool named {:?}", r.pool));
        }
        let m = &r.when;
        let mut when = Conditions {
            sni: m.sni.as_ref().map(|s| s.to_ascii_lowercase()),
            sni_suffix: m.sni_suffix.as_ref().map(|s| s.to_ascii_lowercase()),
            alpn: m.alpn.as_ref().map(|s| s.as_bytes().to_vec()),
            cert_cn: m.cert_cn.clone(),
            cert_issuer_cn: m.cert_issuer_cn.clone(),
            username: m.username.as_ref().map(|s| s.as_bytes().to_vec()),
            client_id_prefix: m.client_id_prefix.as_ref().map(|s| s.as_bytes().to_vec()),
            source: Vec::new(),
        };
        for (key, value) in [
            ("sni", &m.sni),
            ("sni_suffix", &m.sni_suffix),
            ("alpn", &m.alpn),
            ("cert_cn", &m.cert_cn),
            ("cert_issuer_cn", &m.cert_issuer_cn),
            ("username", &m.username),
        ] {
            if value.as_deref() == Some("") {
                c.add(format!("{at}.match.{key}"), "must not be empty");
            } else if value.is_some() && tls.is_none() && key != "username" {
                c.add(format!("{at}.match.{key}"), "can never match: the listener has no [listener.tls]");
            }
        }
        if tls.is_some_and(|t| t.client_auth == ClientAuth::None) {
            for (key, value) in [("cert_cn", &m.cert_cn), ("cert_issuer_cn", &m.cert_issuer_cn)] {
                if value.as_deref().is_some_and(|v| !v.is_empty()) {
                    c.add(
                        format!("{at}.match.{key}"),
                        "can never match: the listener asks for no client certificate (tls.client_auth = \"none\")",
                    );
                }
            }
        }
        if let (Some(alpn), Some(t)) = (&m.alpn, tls) {
            if !alpn.is_empty() && !t.alpn.contains(alpn) {
                c.add(
                    format!("{at}.match.alpn"),
                    format!("can never match: {alpn:?} is not among the listener's tls.alpn {:?}", t.alpn),
                );
            }
        }
        if when.sni_suffix.as_deref() == Some(".") {
            c.add(format!("{at}.match.sni_suffix"), "must name a domain");
        }
        match &m.source {
            None => {}
            Some(StringOrList::One(s)) => match parse_net(s) {
                Some(n) => when.source.push(n),
                None => c.add(format!("{at}.match.source"), format!("{s:?} is not a CIDR or IP address")),
            },
            Some(StringOrList::Many(list)) => {
                if list.is_empty() {
                    c.add(format!("{at}.match.source"), "must name at least one CIDR");
                }
                for (k, s) in list.iter().enumerate() {
                    match parse_net(s) {
                        Some(n) => when.source.push(n),
                        None => c.add(format!("{at}.match.source[{k}]"), format!("{s:?} is not a CIDR or IP address")),
                    }
                }
            }
        }
        if let Some(first) = catch_all {
            c.add(format!("{at}.match"), format!("can never match: route[{first}] before it matches every connection"));
        } else if when.catch_all() {
            catch_all = Some(j);
        }
        rules.push(RouteRule { pool: r.pool.clone(), when });
    }
    rules
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>().or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from)).ok()
}

/// Validates the admission limits of `[limits]`; burst sizes default to their rate.
fn check_admission(c: &mut Check, lim: &RawLimits) -> AdmissionLimits {
    if lim.handshake_burst == Some(0) {
        c.add("limits.handshake_burst", "must be greater than 0");
    }
    if lim.handshake_burst.is_some() && lim.handshake_rate == 0 {
        c.add("limits.handshake_burst", "set but handshake_rate is 0 (unlimited)");
    }
    if lim.handshake_rate > 0 && lim.handshake_queue_timeout.is_zero() && lim.handshake_queue > 0 {
        c.add("limits.handshake_queue_timeout", "must be greater than 0 when handshake_queue is");
    }
    if lim.per_source_burst == Some(0) {
        c.add("limits.per_source_burst", "must be greater than 0");
    }
    if lim.per_source_burst.is_some() && lim.per_source_rate == 0 {
        c.add("limits.per_source_burst", "set but per_source_rate is 0 (unlimited)");
    }
    let flapping = lim.flapping.as_ref().map(|f| {
        if f.max_connects == 0 {
            c.add("limits.flapping.max_connects", "must be greater than 0");
        }
        if f.window.is_zero() {
            c.add("limits.flapping.window", "must be greater than 0");
        }
        if f.ban.is_zero() {
            c.add("limits.flapping.ban", "must be greater than 0");
        }
        Flapping { max_connects: f.max_connects, window: f.window, ban: f.ban }
    });
    AdmissionLimits {
        handshake_rate: lim.handshake_rate,
        handshake_burst: lim.handshake_burst.unwrap_or(lim.handshake_rate).max(1),
        handshake_queue: lim.handshake_queue,
        handshake_queue_timeout: lim.handshake_queue_timeout,
        per_source_rate: lim.per_source_rate,
        per_source_burst: lim.per_source_burst.unwrap_or(lim.per_source_rate).max(1),
        flapping,
    }
}

/// Smallest PROXY v2 header with IPv6 addresses (16 + 36) and no TLVs: nothing fits below it.
const MIN_HEADER_BYTES: usize = 52;

fn build_pool(c: &mut Check, name: &str, p: &RawPool) -> Option<Pool> {
    let at = format!("pool.{name}");
    let before = c.problems.len();
    // A pool with `dns` or `kubernetes` starts without brokers: discovery brings them.
    check_broker_source(c, &at, p);
    let mut ids = HashSet::new();
    let mut backends = Vec::new();
    for (i, b) in p.backends.iter().enumerate() {
        let (id, address) = match b {
            RawBackend::Address(a) => (a.as_str(), a.as_str()),
            RawBackend::Named { name, address } => (name.as_str(), address.as_str()),
        };
        let path = format!("{at}.backends[{i}]");
        if id.is_empty() {
            c.add(&path, "broker name must not be empty");
        } else if !ids.insert(id) {
            c.add(&path, format!("duplicate broker {id:?}: its identity must be unique in the pool"));
        }
        match resolve(address) {
            Ok(addr) => backends.push(Arc::new(Backend::new(id, addr))),
            Err(m) => c.add(&path, m),
        }
    }
    if p.max_header_bytes < MIN_HEADER_BYTES {
        c.add(format!("{at}.max_header_bytes"), format!("must be at least {MIN_HEADER_BYTES}"));
    }
    if p.backend_attempts == 0 {
        c.add(format!("{at}.backend_attempts"), "must be at least 1");
    }
    if p.backend_connect_timeout.is_zero() {
        c.add(format!("{at}.backend_connect_timeout"), "must be greater than 0");
    }
    if p.backend_connack_timeout.is_zero() {
        c.add(format!("{at}.backend_connack_timeout"), "must be greater than 0");
    }
    if p.hold_timeout.is_zero() {
        c.add(format!("{at}.hold_timeout"), "must be greater than 0");
    }
    if p.hold_max == 0 {
        c.add(format!("{at}.hold_max"), "must be at least 1");
    }
    if matches!(p.empty_client_id, RawEmpty::Assign) && !matches!(p.hash_key, RawHashKey::ClientId) {
        c.add(
            format!("{at}.empty_client_id"),
            "\"assign\" routes by the generated client-id: it needs hash_key = \"client_id\"",
        );
    }
    let mut seen = HashSet::new();
    for (i, t) in p.tlvs.iter().enumerate() {
        if !seen.insert(format!("{t:?}")) {
            c.add(format!("{at}.tlvs[{i}]"), "listed twice");
        }
    }
    if let Some(h) = &p.health {
        if h.interval.is_zero() {
            c.add(format!("{at}.health.interval"), "must be greater than 0");
        }
        if h.timeout.is_zero() {
            c.add(format!("{at}.health.timeout"), "must be greater than 0");
        } else if h.timeout > h.interval {
            c.add(format!("{at}.health.timeout"), "must not exceed health.interval");
        }
        if h.rise == 0 {
            c.add(format!("{at}.health.rise"), "must be at least 1");
        }
        if h.fall == 0 {
            c.add(format!("{at}.health.fall"), "must be at least 1");
        }
    }
    if let Some(n) = p.backend_max_packet_size {
        if !(MIN_CONNECT_LEN..=MAX_PACKET_LEN).contains(&n) {
            c.add(
                format!("{at}.backend_max_packet_size"),
                format!(
                    "{n} is not a Maximum Packet Size: it must be between {MIN_CONNECT_LEN} (the smallest CONNECT) \
                     and {MAX_PACKET_LEN} (the largest packet MQTT can express) bytes"
                ),
            );
        }
    }
    let check = p.health.as_ref().and_then(|h| check_kind(h, &format!("{at}.health"), c));
    let connect = p.connect.as_ref().map(|r| check_connect(c, &format!("{at}.connect"), r)).unwrap_or_default();
    let backend_transport = check_backend_transport(c, &at, p);
    if c.problems.len() > before {
        return None;
    }
    Some(Pool {
        name: name.to_string(),
        backends,
        connect,
        hash_key: match p.hash_key {
            RawHashKey::ClientId => HashKey::ClientId,
            RawHashKey::Username => HashKey::Username,
            RawHashKey::CertCn => HashKey::CertCn,
        },
        empty_key: match p.empty_client_id {
            RawEmpty::LeastConnections => EmptyKey::LeastConnections,
            RawEmpty::SourceAddress => EmptyKey::SourceAddress,
            RawEmpty::Reject => EmptyKey::Reject,
            RawEmpty::Assign => EmptyKey::Assign,
        },
        proxy_protocol: match p.proxy_protocol {
            RawProxyProtocol::None => ProxyProtocol::None,
            RawProxyProtocol::V1 => ProxyProtocol::V1,
            RawProxyProtocol::V2 => ProxyProtocol::V2,
        },
        tlvs: p
            .tlvs
            .iter()
            .map(|t| match t {
                RawTlv::Alpn => Tlv::Alpn,
                RawTlv::Authority => Tlv::Authority,
                RawTlv::UniqueId => Tlv::UniqueId,
                RawTlv::Ssl => Tlv::Ssl,
                RawTlv::Crc32c => Tlv::Crc32c,
                RawTlv::CertSha256 => Tlv::CertSha256,
                RawTlv::ClientId => Tlv::ClientId,
            })
            .collect(),
        max_header_bytes: p.max_header_bytes,
        backend_connect_timeout: p.backend_connect_timeout,
        backend_connack_timeout: p.backend_connack_timeout,
        backend_attempts: p.backend_attempts,
        backend_max_packet_size: p.backend_max_packet_size,
        close_rate: p.close_rate,
        hold: match p.on_backend_restart {
            RawOnRestart::Failover => None,
            RawOnRestart::Hold => Some(Hold { timeout: p.hold_timeout, max: p.hold_max }),
        },
        rebalance: match p.rebalance {
            RawRebalance::Off => Rebalance::Off,
            RawRebalance::Home => Rebalance::Home,
        },
        rebalance_rate: p.rebalance_rate,
        backend_transport,
        planned_close_will: match p.planned_close_will {
            RawPlannedCloseWill::Keep => PlannedCloseWill::Keep,
            RawPlannedCloseWill::Suppress => PlannedCloseWill::Suppress,
        },
        health: p.health.as_ref().zip(check).map(|(h, check)| HealthSpec {
            check,
            interval: h.interval,
            timeout: h.timeout,
            rise: h.rise,
            fall: h.fall,
        }),
    })
}

/// A broker address: `IP:port` as is, `host:port` resolved once here (the data plane never
/// resolves names).
fn resolve(address: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = address.parse::<SocketAddr>() {
        return Ok(a);
    }
    if !address.contains(':') {
        return Err(format!("{address:?} needs a port (HOST:PORT)"));
    }
    match address.to_socket_addrs() {
        Ok(mut it) => it.next().ok_or_else(|| format!("{address:?} resolves to no address")),
        Err(e) => Err(format!("cannot resolve {address:?}: {e}")),
    }
}

/// `backend_transport` and `websocket_path`. Over untouched frames harbormaster cannot rewrite
/// the CONNECT (`connect`, `empty_client_id = "assign"`) nor the CONNACK, and an MQTT probe
/// would speak raw MQTT to a WebSocket listener.
fn check_backend_transport(c: &mut Check, at: &str, p: &RawPool) -> BackendTransport {
    if p.backend_transport == RawBackendTransport::Mqtt {
        if p.websocket_path.is_some() {
            c.add(format!("{at}.websocket_path"), "only with backend_transport = \"websocket\"");
        }
        return BackendTransport::Mqtt;
    }
    let path = p.websocket_path.clone().unwrap_or_else(|| DEFAULT_BACKEND_WEBSOCKET_PATH.to_string());
    if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_control() || b == b' ' || b >= 0x80) {
        c.add(format!("{at}.websocket_path"), format!("{path:?} is not an absolute path (visible ASCII)"));
    }
    if p.connect.is_some() {
        c.add(
            format!("{at}.connect"),
            "not with backend_transport = \"websocket\": the CONNECT travels in the client's frames untouched",
        );
    }
    if matches!(p.empty_client_id, RawEmpty::Assign) {
        c.add(
            format!("{at}.empty_client_id"),
            "\"assign\" not with backend_transport = \"websocket\": the CONNECT and the CONNACK travel in \
             untouched frames",
        );
    }
    if p.health.as_ref().is_some_and(|h| h.check == RawCheck::Mqtt) {
        c.add(
            format!("{at}.health.check"),
            "\"mqtt\" speaks raw MQTT; with backend_transport = \"websocket\" use \"tcp\" or \"http\"",
        );
    }
    BackendTransport::WebSocket { path }
}

/// The probe of a `health` table (`at` is its key path): the HTTP keys are checked here,
/// and are errors with any other check.
fn check_kind(h: &RawHealth, at: &str, c: &mut Check) -> Option<CheckKind> {
    let http_keys = [
        ("port", h.port.is_some()),
        ("path", h.path.is_some()),
        ("status", h.status.is_some()),
        ("basic_auth", h.basic_auth.is_some()),
    ];
    if h.check != RawCheck::Http {
        for (key, _) in http_keys.into_iter().filter(|(_, set)| *set) {
            c.add(format!("{at}.{key}"), "only with check = \"http\"");
        }
        return Some(if h.check == RawCheck::Tcp { CheckKind::Tcp } else { CheckKind::Mqtt });
    }
    let before = c.problems.len();
    let port = match h.port {
        Some(0) => {
            c.add(format!("{at}.port"), "must be between 1 and 65535");
            0
        }
        Some(port) => port,
        None => {
            c.add(format!("{at}.port"), "required with check = \"http\" (the broker's HTTP port)");
            0
        }
    };
    let path = h.path.clone().unwrap_or_else(|| "/".to_string());
    // The path goes into the request line as written: no room for what would break it.
    if !path.starts_with('/') || path.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
        c.add(format!("{at}.path"), "must start with / and hold no spaces or control characters");
    }
    let status = h.status.unwrap_or(200);
    if !(100..=599).contains(&status) {
        c.add(format!("{at}.status"), "must be an HTTP status, 100 to 599");
    }
    let authorization = match &h.basic_auth {
        Some(pair) if pair.contains(':') && !pair.chars().any(char::is_control) => {
            use base64::Engine as _;
            Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)))
        }
        Some(_) => {
            c.add(format!("{at}.basic_auth"), "must be \"user:password\"");
            None
        }
        None => None,
    };
    (c.problems.len() == before).then(|| CheckKind::Http(Arc::new(HttpCheck { port, path, status, authorization })))
}

/// Resolve a config-relative path.
pub fn relative(base: &Path, file: &str) -> PathBuf {
    let p = Path::new(file);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match load_str(text, Path::new(".")) {
            Ok(_) => vec![],
            Err(p) => p.0.iter().map(|p| p.to_string()).collect(),
        }
    }

    const MINIMAL: &str = r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:1883"
pool = "brokers"

[pool.brokers]
backends = ["127.0.0.1:1884", { name = "b2", address = "127.0.0.1:1885" }]
"#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let loaded = load_str(MINIMAL, Path::new(".")).unwrap();
        let s = &loaded.snapshot;
        let p = s.pool("brokers").unwrap();
        assert_eq!(p.backends[0].name, "127.0.0.1:1884");
        assert_eq!(p.backends[1].name, "b2");
        assert_eq!(p.hash_key, HashKey::ClientId);
        assert_eq!(p.empty_key, EmptyKey::LeastConnections);
        assert_eq!(p.proxy_protocol, ProxyProtocol::None);
        assert_eq!(p.tlvs.len(), 7);
        assert_eq!(p.max_header_bytes, 500);
        assert_eq!(p.backend_attempts, 3);
        assert_eq!(p.backend_connect_timeout, Duration::from_secs(2));
        assert_eq!(p.backend_connack_timeout, Duration::from_secs(10));
        assert_eq!(s.limits.connect_timeout, Duration::from_secs(10));
        assert_eq!(s.limits.max_connect_packet, 262_144);
        assert_eq!(s.limits.max_setup_bytes, 64 * 1024 * 1024);
        assert_eq!(loaded.process.drain_timeout, Duration::from_secs(30));
        assert_eq!(s.listeners[0].refusal, RefusalStyle::Connack);
        assert_eq!(p.planned_close_will, PlannedCloseWill::Keep);
        assert_eq!((p.rebalance, p.rebalance_rate), (Rebalance::Off, 20));
    }

    #[test]
    fn rebalance_is_off_or_home_at_a_rate_of_at_least_one() {
        let text = format!("{MINIMAL}rebalance = \"home\"\nrebalance_rate = 5\n");
        let loaded = load_str(&text, Path::new(".")).unwrap();
        let p = loaded.snapshot.pool("brokers").unwrap();
        assert_eq!((p.rebalance, p.rebalance_rate), (Rebalance::Home, 5));
        let p = problems(&format!("{MINIMAL}rebalance = \"always\"\n"));
        assert!(p.iter().any(|p| p.contains("rebalance")), "{p:?}");
        let p = problems(&format!("{MINIMAL}rebalance_rate = 0\n"));
        assert!(p.iter().any(|p| p.contains("pool.brokers.rebalance_rate")), "{p:?}");
    }

    #[test]
    fn refusal_is_connack_or_close() {
        let close = MINIMAL.replace("pool = \"brokers\"\n", "pool = \"brokers\"\nrefusal = \"close\"\n");
        assert_eq!(load_str(&close, Path::new(".")).unwrap().snapshot.listeners[0].refusal, RefusalStyle::Close);
        let bad = MINIMAL.replace("pool = \"brokers\"\n", "pool = \"brokers\"\nrefusal = \"reset\"\n");
        let got = problems(&bad);
        assert!(got.iter().any(|g| g.contains("refusal") && g.contains("connack")), "{got:?}");
    }

    #[test]
    fn on_backend_restart_is_failover_or_hold_with_its_timeout_and_cap() {
        let loaded = load_str(MINIMAL, Path::new(".")).unwrap();
        assert_eq!(loaded.snapshot.pool("brokers").unwrap().hold, None, "failover by default");
        let held = format!("{MINIMAL}on_backend_restart = \"hold\"\n");
        let loaded = load_str(&held, Path::new(".")).unwrap();
        let hold = Hold { timeout: Duration::from_secs(10), max: 10_000 };
        assert_eq!(loaded.snapshot.pool("brokers").unwrap().hold, Some(hold));
        let set = format!("{held}hold_timeout = \"3s\"\nhold_max = 5\n");
        let loaded = load_str(&set, Path::new(".")).unwrap();
        let hold = Hold { timeout: Duration::from_secs(3), max: 5 };
        assert_eq!(loaded.snapshot.pool("brokers").unwrap().hold, Some(hold));
        let p = problems(&format!("{held}hold_timeout = \"0s\"\nhold_max = 0\n"));
        assert!(p.iter().any(|p| p.contains("pool.brokers.hold_timeout")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("pool.brokers.hold_max")), "{p:?}");
        let p = problems(&format!("{MINIMAL}on_backend_restart = \"wait\"\n"));
        assert!(p.iter().any(|p| p.contains("on_backend_restart")), "{p:?}");
    }

    #[test]
    fn backend_transport_is_mqtt_or_websocket_with_its_path() {
        let p = load_str(MINIMAL, Path::new(".")).unwrap().snapshot.pool("brokers").unwrap().clone();
        assert_eq!(p.backend_transport, BackendTransport::Mqtt);
        let loaded = load_str(&format!("{MINIMAL}backend_transport = \"websocket\"\n"), Path::new(".")).unwrap();
        let want = BackendTransport::WebSocket { path: "/mqtt".into() };
        assert_eq!(loaded.snapshot.pool("brokers").unwrap().backend_transport, want);
        // The listener has no `websocket`: every client it sends there would be refused.
        assert!(
            loaded.warnings.iter().any(|w| w.message.contains("serves only WebSocket clients")),
            "{:?}",
            loaded.warnings
        );
        let text = format!("{MINIMAL}backend_transport = \"websocket\"\nwebsocket_path = \"/ws\"\n");
        let text = text.replace("pool = \"brokers\"\n", "pool = \"brokers\"\nwebsocket = {}\n");
        let loaded = load_str(&text, Path::new(".")).unwrap();
        assert_eq!(
            loaded.snapshot.pool("brokers").unwrap().backend_transport,
            BackendTransport::WebSocket { path: "/ws".into() }
        );
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        for (extra, key) in [
            ("websocket_path = \"/ws\"\n", "websocket_path"),
            ("backend_transport = \"websocket\"\nwebsocket_path = \"ws\"\n", "websocket_path"),
            ("backend_transport = \"websocket\"\nconnect = { username = \"{client_id}\" }\n", "connect"),
            ("backend_transport = \"websocket\"\nhealth = { check = \"mqtt\" }\n", "health.check"),
            ("backend_transport = \"websocket\"\nempty_client_id = \"assign\"\n", "empty_client_id"),
            ("backend_transport = \"tcp\"\n", "backend_transport"),
        ] {
            let p = problems(&format!("{MINIMAL}{extra}"));
            assert!(p.iter().any(|p| p.contains(key)), "{extra}: {p:?}");
        }
    }

    #[test]
    fn planned_close_will_is_keep_or_suppress() {
        let loaded = load_str(&format!("{MINIMAL}planned_close_will = \"suppress\"\n"), Path::new(".")).unwrap();
        assert_eq!(loaded.snapshot.pool("brokers").unwrap().planned_close_will, PlannedCloseWill::Suppress);
        let p = problems(&format!("{MINIMAL}planned_close_will = \"drop\"\n"));
        assert!(p.iter().any(|p| p.contains("planned_close_will")), "{p:?}");
    }

    #[test]
    fn max_setup_bytes_must_hold_a_largest_connect_in_its_half() {
        let ok = format!("{MINIMAL}\n[limits]\nmax_connect_packet = 1024\nmax_setup_bytes = 2048\n");
        assert_eq!(load_str(&ok, Path::new(".")).unwrap().snapshot.limits.max_setup_bytes, 2048);
        let bad = format!("{MINIMAL}\n[limits]\nmax_setup_bytes = 300000\n");
        let got = problems(&bad);
        assert!(
            got.iter()
                .any(|g| g.starts_with("limits.max_setup_bytes: must be at least twice limits.max_connect_packet")),
            "{got:?}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
[[listener]]
name = "a"
bind = "nope"
pool = "missing"
accept_proxy = true

[[listener]]
name = "a"
bind = "127.0.0.1:1"
pool = "p"
trusted_proxies = ["10.0.0.0/33"]

[pool.p]
backends = ["127.0.0.1:1", "127.0.0.1:1", "no-port"]
backend_attempts = 0
max_header_bytes = 10

[limits]
connect_timeout = "0s"
"#;
        let got = problems(text);
        for want in [
            "listener[0].bind:",
            "listener[0].pool:",
            "listener[0].trusted_proxies:",
            "listener[1].name:",
            "listener[1].trusted_proxies[0]:",
            "pool.p.backends[1]:",
            "pool.p.backends[2]:",
            "pool.p.backend_attempts:",
            "pool.p.max_header_bytes:",
            "limits.connect_timeout:",
        ] {
            assert!(got.iter().any(|g| g.starts_with(want)), "missing {want} in {got:#?}");
        }
    }

    const ROUTED: &str = r#"
[[listener]]
name = "plain"
bind = "127.0.0.1:0"
pool = "main"

[[listener.route]]
match = { username = "tenant-a", client_id_prefix = "a-" }
pool = "a"

[[listener.route]]
match = { source = ["10.0.0.0/8", "192.0.2.7"] }
pool = "b"

[pool.main]
backends = ["127.0.0.1:1"]
[pool.a]
backends = ["127.0.0.1:2"]
[pool.b]
backends = ["127.0.0.1:3"]
"#;

    #[test]
    fn connect_policies_compile_or_say_why_not() {
        let with =
            |connect: &str| MINIMAL.replace("[pool.brokers]\n", &format!("[pool.brokers]\nconnect = {connect}\n"));
        let s = load_str(
            &with(r#"{ username = "{cert_cn}@{sni}", password = "drop", user_properties = ["sni", "cert_sha256"] }"#),
            Path::new("."),
        )
        .unwrap()
        .snapshot;
        let c = &s.pools[0].connect;
        assert_eq!(c.username.as_ref().unwrap().describe(), "{cert_cn}@{sni}");
        assert!(c.drop_password);
        assert_eq!(c.user_properties, [Fact::Sni, Fact::CertSha256]);
        let s = load_str(MINIMAL, Path::new(".")).unwrap().snapshot;
        assert_eq!(s.pools[0].connect, ConnectPolicy::default());
        let got = problems(&with(r#"{ username = "{cn}", user_properties = ["sni", "sni", "secret"] }"#));
        for want in [
            "pool.brokers.connect.username: \"{cn}\": unknown placeholder {cn}",
            "pool.brokers.connect.user_properties[1]: \"sni\" is listed twice",
            "pool.brokers.connect.user_properties[2]: \"secret\" is not one of",
        ] {
            assert!(got.iter().any(|g| g.starts_with(want)), "missing {want} in {got:#?}");
        }
        assert!(!problems(&with(r#"{ password = "forget" }"#)).is_empty());
        // Text a broker refuses in a username (Mosquitto closes on a control character).
        let got = problems(&with(r#"{ username = "dev\u0001{cert_cn}" }"#));
        assert!(
            got.len() == 1
                && got[0].starts_with(
                    "pool.brokers.connect.username: \"dev\\u{1}{cert_cn}\": the text holds a control character"
                ),
            "{got:?}"
        );
        let loaded = load_str(&with(r#"{ username = "cert_cn" }"#), Path::new(".")).unwrap();
        assert!(
            loaded
                .warnings
                .iter()
                .any(|w| w.to_string().starts_with("listener[0]: pool \"brokers\" makes the username from {cert_cn}")),
            "{:?}",
            loaded.warnings
        );
        // TLS facts on a listener without TLS: the same.
        let loaded = load_str(&with(r#"{ username = "{username}@{sni}" }"#), Path::new(".")).unwrap();
        let want = "listener[0]: pool \"brokers\" makes the username from {sni}, but this listener has no \
                    [listener.tls]: every connection it sends there is refused";
        assert!(loaded.warnings.iter().any(|w| w.to_string().starts_with(want)), "{:?}", loaded.warnings);
        let loaded = load_str(&with(r#"{ username = "{username}@{client_address}" }"#), Path::new(".")).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    }

    #[test]
    fn backend_max_packet_size_is_a_packet_size_mqtt_can_have() {
        let with = |n: &str| format!("{MINIMAL}backend_max_packet_size = {n}\n");
        let s = load_str(&with("1024"), Path::new(".")).unwrap().snapshot;
        assert_eq!(s.pools[0].backend_max_packet_size, Some(1024));
        assert_eq!(load_str(MINIMAL, Path::new(".")).unwrap().snapshot.pools[0].backend_max_packet_size, None);
        for ok in ["14", "268435460"] {
            assert_eq!(problems(&with(ok)), Vec::<String>::new(), "{ok}");
        }
        for bad in ["0", "13", "268435461"] {
            let got = problems(&with(bad));
            assert!(
                got.len() == 1
                    && got[0].starts_with(&format!(
                        "pool.brokers.backend_max_packet_size: {bad} is not a Maximum Packet Size: it must be between 14"
                    )),
                "{bad}: {got:?}"
            );
        }
        let got = problems(&with("-1"));
        assert!(got.len() == 1 && got[0].starts_with("pool.brokers.backend_max_packet_size"), "{got:?}");
    }

    #[test]
    fn routing_rules_are_compiled_in_order() {
        let s = load_str(ROUTED, Path::new(".")).unwrap().snapshot;
        let routes = &s.listeners[0].routes;
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].pool, "a");
        assert_eq!(routes[0].when.username.as_deref(), Some(&b"tenant-a"[..]));
        assert_eq!(routes[0].when.client_id_prefix.as_deref(), Some(&b"a-"[..]));
        assert_eq!(routes[1].pool, "b");
        let nets: Vec<String> = routes[1].when.source.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32"]);
    }

    #[test]
    fn bad_routing_rules_are_reported_with_their_paths() {
        let text = ROUTED.replace("pool = \"b\"", "pool = \"nope\"").replace("192.0.2.7", "192.0.2.300")
            + r#"
[[listener.route]]
match = {}
pool = "a"

[[listener.route]]
match = { username = "late" }
pool = "a"

[[listener.route]]
match = { sni = "x.example.com", sni_suffix = "" }
pool = "a"
"#;
        let got = problems(&text);
        for want in [
            "listener[0].route[1].pool: no pool named \"nope\"",
            "listener[0].route[1].match.source[1]:",
            "listener[0].route[3].match: can never match: route[2] before it matches every connection",
            "listener[0].route[4].match.sni: can never match: the listener has no [listener.tls]",
            "listener[0].route[4].match.sni_suffix: must not be empty",
        ] {
            assert!(got.iter().any(|g| g.starts_with(want)), "missing {want} in {got:#?}");
        }
        // Certificate conditions on a TLS listener that asks for no client certificate.
        let tls =
            "[listener.tls]\ncerts = [{ cert = \"config/certs/server.pem\", key = \"config/certs/server.key\" }]\n";
        let no_certs = ROUTED.replacen("pool = \"main\"\n", &format!("pool = \"main\"\n{tls}"), 1)
            + "[[listener.route]]\nmatch = { cert_issuer_cn = \"Fleet CA\" }\npool = \"a\"\n";
        let got = match load_str(&no_certs, Path::new(env!("CARGO_MANIFEST_DIR"))) {
            Ok(_) => vec![],
            Err(p) => p.0.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        };
        assert!(
            got.len() == 1
                && got[0].starts_with(
                    "listener[0].route[2].match.cert_issuer_cn: can never match: the listener asks for no client \
                     certificate"
                ),
            "{got:#?}"
        );
        let unknown = ROUTED.replace("username = \"tenant-a\"", "user = \"tenant-a\"");
        let got = problems(&unknown);
        assert!(got.iter().any(|g| g.contains("listener") && g.contains("user")), "{got:#?}");
    }

    #[test]
    fn admission_limits_default_off_and_bursts_default_to_their_rate() {
        let s = load_str(MINIMAL, Path::new(".")).unwrap().snapshot;
        assert_eq!(
            s.limits.admission,
            AdmissionLimits { handshake_burst: 1, per_source_burst: 1, ..Default::default() }
        );
        assert_eq!(s.listeners[0].max_connections, None);
        let text = MINIMAL.replacen("pool = \"brokers\"", "pool = \"brokers\"\nmax_connections = 500", 1)
            + "\n[limits]\nhandshake_rate = 200\nhandshake_queue = 50\nhandshake_queue_timeout = \"3s\"\n\
               per_source_rate = 5\nper_source_burst = 20\nflapping = { max_connects = 10 }\n";
        let s = load_str(&text, Path::new(".")).unwrap().snapshot;
        assert_eq!(s.listeners[0].max_connections, Some(500));
        let a = &s.limits.admission;
        assert_eq!((a.handshake_rate, a.handshake_burst, a.handshake_queue), (200, 200, 50));
        assert_eq!(a.handshake_queue_timeout, Duration::from_secs(3));
        assert_eq!((a.per_source_rate, a.per_source_burst), (5, 20));
        assert_eq!(
            a.flapping,
            Some(Flapping { max_connects: 10, window: Duration::from_secs(60), ban: Duration::from_secs(300) })
        );
    }

    #[test]
    fn bad_admission_limits_are_reported_with_their_paths() {
        let text = MINIMAL.replacen("pool = \"brokers\"", "pool = \"brokers\"\nmax_connections = 0", 1)
            + "\n[limits]\nhandshake_burst = 0\nhandshake_queue_timeout = \"0s\"\nper_source_rate = 1\n\
               per_source_burst = 0\nflapping = { max_connects = 0, window = \"0s\", ban = \"0s\" }\n";
        let got = problems(&text);
        for path in [
            "listener[0].max_connections:",
            "limits.handshake_burst: must be greater than 0",
            "limits.handshake_burst: set but handshake_rate is 0",
            "limits.per_source_burst: must be greater than 0",
            "limits.flapping.max_connects:",
            "limits.flapping.window:",
            "limits.flapping.ban:",
        ] {
            assert!(got.iter().any(|g| g.starts_with(path)), "{path} missing from {got:?}");
        }
        let text = format!("{MINIMAL}\n[limits]\nhandshake_rate = 10\nhandshake_queue_timeout = \"0s\"\n");
        assert!(problems(&text).iter().any(|g| g.starts_with("limits.handshake_queue_timeout:")));
        let text = format!("{MINIMAL}\n[limits]\nflapping = {{ max = 3 }}\n");
        assert!(problems(&text).iter().any(|g| g.starts_with("limits.flapping")), "{:?}", problems(&text));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let got = problems(&format!("{MINIMAL}\n[limits]\nconect_timeout = \"1s\"\n"));
        assert!(got.iter().any(|g| g.starts_with("limits.conect_timeout (line")), "{got:?}");
        let got = problems(&MINIMAL.replace("pool = \"brokers\"", "pool = \"brokers\"\nacept_proxy = true"));
        assert!(got.iter().any(|g| g.contains("acept_proxy")), "{got:?}");
    }

    #[test]
    fn health_is_optional_and_gets_documented_defaults() {
        let loaded = load_str(MINIMAL, Path::new(".")).unwrap();
        assert_eq!(loaded.snapshot.pool("brokers").unwrap().health, None);
        let loaded = load_str(&format!("{MINIMAL}health = {{ check = \"mqtt\" }}\n"), Path::new(".")).unwrap();
        let h = loaded.snapshot.pool("brokers").unwrap().health.clone().unwrap();
        assert_eq!(
            h,
            HealthSpec {
                check: CheckKind::Mqtt,
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
                rise: 2,
                fall: 3
            }
        );
        let text = format!(
            "{MINIMAL}health = {{ check = \"tcp\", interval = \"200ms\", timeout = \"100ms\", rise = 1, fall = 4 }}\n"
        );
        let h = load_str(&text, Path::new(".")).unwrap().snapshot.pool("brokers").unwrap().health.clone().unwrap();
        assert_eq!(
            (h.check, h.interval, h.timeout, h.rise, h.fall),
            (CheckKind::Tcp, Duration::from_millis(200), Duration::from_millis(100), 1, 4)
        );
    }

    #[test]
    fn http_health_check_takes_port_path_status_and_basic_auth() {
        let text = format!(
            "{MINIMAL}health = {{ check = \"http\", port = 15672, path = \"/api/health/checks/alarms\", basic_auth = \"guest:guest\" }}\n"
        );
        let h = load_str(&text, Path::new(".")).unwrap().snapshot.pool("brokers").unwrap().health.clone().unwrap();
        let want = HttpCheck {
            port: 15672,
            path: "/api/health/checks/alarms".into(),
            status: 200,
            authorization: Some("Basic Z3Vlc3Q6Z3Vlc3Q=".into()),
        };
        assert_eq!(h.check, CheckKind::Http(Arc::new(want)));
        let text = format!("{MINIMAL}health = {{ check = \"http\", port = 8889, status = 204 }}\n");
        let h = load_str(&text, Path::new(".")).unwrap().snapshot.pool("brokers").unwrap().health.clone().unwrap();
        let want = HttpCheck { port: 8889, path: "/".into(), status: 204, authorization: None };
        assert_eq!(h.check, CheckKind::Http(Arc::new(want)));

        let bad = format!(
            "{MINIMAL}health = {{ check = \"http\", path = \"status page\", status = 42, basic_auth = \"nocolon\" }}\n"
        );
        let got = problems(&bad);
        for want in [
            "pool.brokers.health.port: required",
            "pool.brokers.health.path:",
            "pool.brokers.health.status:",
            "pool.brokers.health.basic_auth:",
        ] {
            assert!(got.iter().any(|g| g.starts_with(want)), "{want} not in {got:?}");
        }
        let got = problems(&format!("{MINIMAL}health = {{ check = \"mqtt\", port = 1, path = \"/\" }}\n"));
        assert!(got.iter().any(|g| g.starts_with("pool.brokers.health.port: only with check = \"http\"")), "{got:?}");
        assert!(got.iter().any(|g| g.starts_with("pool.brokers.health.path: only with")), "{got:?}");
    }

    #[test]
    fn bad_health_settings_are_reported_with_their_paths() {
        let got = problems(&format!(
            "{MINIMAL}health = {{ check = \"tcp\", interval = \"1s\", timeout = \"2s\", rise = 0, fall = 0 }}\n"
        ));
        for want in ["pool.brokers.health.timeout:", "pool.brokers.health.rise:", "pool.brokers.health.fall:"] {
            assert!(got.iter().any(|g| g.starts_with(want)), "missing {want} in {got:#?}");
        }
        let got = problems(&format!("{MINIMAL}health = {{ check = \"tcp\", interval = \"0s\" }}\n"));
        assert!(got.iter().any(|g| g.starts_with("pool.brokers.health.interval:")), "{got:?}");
        assert!(!problems(&format!("{MINIMAL}health = {{ check = \"http\" }}\n")).is_empty());
        assert!(!problems(&format!("{MINIMAL}health = {{ interval = \"5s\" }}\n")).is_empty(), "check is required");
        let got = problems(&format!("{MINIMAL}health = {{ check = \"tcp\", intervall = \"5s\" }}\n"));
        assert!(got.iter().any(|g| g.contains("intervall")), "{got:?}");
    }

    #[test]
    fn admin_defaults_to_loopback_9090_and_can_be_moved_or_disabled() {
        let a = load_str(MINIMAL, Path::new(".")).unwrap().admin;
        assert_eq!(
            a,
            AdminSettings {
                enabled: true,
                bind: DEFAULT_ADMIN_BIND.parse().unwrap(),
                bind_is_default: true,
                token_file: None
            }
        );
        assert_eq!(DEFAULT_ADMIN_BIND, "127.0.0.1:9090");
        let a = load_str(&format!("{MINIMAL}\n[admin]\nbind = \"0.0.0.0:9191\"\n"), Path::new(".")).unwrap().admin;
        assert_eq!((a.enabled, a.bind, a.bind_is_default), (true, "0.0.0.0:9191".parse().unwrap(), false));
        let a = load_str(&format!("{MINIMAL}\n[admin]\nenabled = false\n"), Path::new(".")).unwrap().admin;
        assert!(!a.enabled);
    }

    #[test]
    fn the_admin_token_file_is_relative_to_the_config() {
        let a =
            load_str(&format!("{MINIMAL}\n[admin]\ntoken_file = \"admin.tokens\"\n"), Path::new("/etc/hm")).unwrap();
        assert_eq!(a.admin.token_file, Some(PathBuf::from("/etc/hm/admin.tokens")));
        let a = load_str(&format!("{MINIMAL}\n[admin]\ntoken_file = \"/run/t\"\n"), Path::new("/etc/hm")).unwrap();
        assert_eq!(a.admin.token_file, Some(PathBuf::from("/run/t")));
        let got = problems(&format!("{MINIMAL}\n[admin]\ntoken_file = \"\"\n"));
        assert!(got.iter().any(|g| g.starts_with("admin.token_file:")), "{got:?}");
    }

    #[test]
    fn admin_never_shares_a_port_with_a_listener() {
        for bind in ["127.0.0.1:1883", "0.0.0.0:1883", "[::]:1883"] {
            let got = problems(&format!("{MINIMAL}\n[admin]\nbind = \"{bind}\"\n"));
            assert!(got.iter().any(|g| g.starts_with("admin.bind:") && g.contains("\"mqtt\"")), "{bind}: {got:?}");
        }
        // Another port, or another loopback address on the same port, is fine.
        assert!(problems(&format!("{MINIMAL}\n[admin]\nbind = \"127.0.0.1:1884\"\n")).is_empty());
        assert!(problems(&format!("{MINIMAL}\n[admin]\nbind = \"127.0.0.2:1883\"\n")).is_empty());
        // A listener on the default admin port collides with the default; disabling admin fixes it.
        let on_9090 = MINIMAL.replace("127.0.0.1:1883", "0.0.0.0:9090");
        let got = problems(&on_9090);
        assert!(got.iter().any(|g| g.starts_with("admin.bind: 127.0.0.1:9090 (the default) collides")), "{got:?}");
        assert!(problems(&format!("{on_9090}\n[admin]\nenabled = false\n")).is_empty());
    }

    #[test]
    fn bad_admin_settings_are_reported_with_their_paths() {
        let got = problems(&format!("{MINIMAL}\n[admin]\nbind = \"localhost\"\n"));
        assert!(got.iter().any(|g| g.starts_with("admin.bind:")), "{got:?}");
        let got = problems(&format!("{MINIMAL}\n[admin]\nbnd = \"127.0.0.1:1\"\n"));
        assert!(got.iter().any(|g| g.contains("bnd")), "{got:?}");
    }

    #[test]
    fn bad_durations_and_enums_are_rejected() {
        assert!(!problems(&format!("{MINIMAL}backend_connect_timeout = \"soon\"\n")).is_empty());
        let p = problems(&format!("{MINIMAL}backend_connack_timeout = \"0s\"\n"));
        assert!(p.iter().any(|p| p.contains("backend_connack_timeout: must be greater than 0")), "{p:?}");
        assert!(!problems(&format!("{MINIMAL}hash_key = \"ip\"\n")).is_empty());
    }

    const LISTENER: &str =
        "[[listener]]\nname = \"mqtt\"\nbind = \"127.0.0.1:1883\"\npool = \"brokers\"\n\n[pool.brokers]\n";

    fn specs(pool_body: &str) -> Vec<(String, DiscoverySpec)> {
        let loaded = load_str(&format!("{LISTENER}{pool_body}"), Path::new(".")).unwrap();
        assert!(loaded.snapshot.pool("brokers").unwrap().backends.is_empty(), "discovery brings the brokers");
        loaded.discovery
    }

    #[test]
    fn a_dns_pool_starts_empty_and_carries_its_spec() {
        assert_eq!(
            specs("dns = { name = \"hivemq.mqtt.svc.cluster.local.\", port = 1883 }\n"),
            [(
                "brokers".to_string(),
                DiscoverySpec::Dns {
                    name: "hivemq.mqtt.svc.cluster.local.".into(),
                    port: Some(1883),
                    interval: Duration::from_secs(10),
                    resolver: None
                }
            )]
        );
        assert_eq!(
            specs(
                "dns = { name = \"_mqtt._tcp.brokers.test\", interval = \"200ms\", resolver = \"127.0.0.1:5353\" }\n"
            ),
            [(
                "brokers".to_string(),
                DiscoverySpec::Dns {
                    name: "_mqtt._tcp.brokers.test".into(),
                    port: None,
                    interval: Duration::from_millis(200),
                    resolver: Some("127.0.0.1:5353".parse().unwrap())
                }
            )]
        );
        let got = specs("backends = []\ndns = { name = \"b.test\", port = 1, resolver = \"10.96.0.10\" }\n");
        assert!(matches!(&got[0].1, DiscoverySpec::Dns { resolver: Some(r), .. } if r.to_string() == "10.96.0.10:53"));
    }

    #[test]
    fn a_kubernetes_pool_names_its_port_by_name_or_number() {
        for (port, want) in [("\"mqtt\"", "mqtt"), ("1883", "1883")] {
            assert_eq!(
                specs(&format!("kubernetes = {{ namespace = \"mqtt\", service = \"hivemq\", port = {port} }}\n")),
                [(
                    "brokers".to_string(),
                    DiscoverySpec::Kubernetes { namespace: "mqtt".into(), service: "hivemq".into(), port: want.into() }
                )]
            );
        }
    }

    #[test]
    fn static_pools_have_no_discovery() {
        assert!(load_str(MINIMAL, Path::new(".")).unwrap().discovery.is_empty());
    }

    #[test]
    fn empty_client_id_assign_needs_the_client_id_as_hash_key() {
        let loaded = load_str(&format!("{MINIMAL}empty_client_id = \"assign\"\n"), Path::new(".")).unwrap();
        assert_eq!(loaded.snapshot.pool("brokers").unwrap().empty_key, EmptyKey::Assign);
        let got = problems(&format!("{MINIMAL}empty_client_id = \"assign\"\nhash_key = \"username\"\n"));
        assert!(got.len() == 1 && got[0].starts_with("pool.brokers.empty_client_id: \"assign\""), "{got:?}");
    }

    #[test]
    fn exactly_one_broker_source_per_pool() {
        let dns = "dns = { name = \"b.test\", port = 1883 }\n";
        let kube = "kubernetes = { namespace = \"mqtt\", service = \"hivemq\", port = \"mqtt\" }\n";
        let got = problems(&format!("{LISTENER}backends = [\"127.0.0.1:1\"]\n{dns}"));
        assert_eq!(got, ["pool.brokers: set exactly one of backends, dns, kubernetes; found backends and dns"]);
        let got = problems(&format!("{LISTENER}{dns}{kube}"));
        assert_eq!(got, ["pool.brokers: set exactly one of backends, dns, kubernetes; found dns and kubernetes"]);
        let got = problems(&format!("{LISTENER}hash_key = \"username\"\n"));
        assert!(got.len() == 1 && got[0].starts_with("pool.brokers.backends: at least one broker"), "{got:?}");
    }

    #[test]
    fn bad_discovery_settings_are_reported_with_their_paths() {
        let got = problems(&format!(
            "{LISTENER}dns = {{ name = \"bad name\", port = 0, interval = \"10ms\", resolver = \"dns.local:53\" }}\n"
        ));
        for want in [
            "pool.brokers.dns.name:",
            "pool.brokers.dns.port:",
            "pool.brokers.dns.interval:",
            "pool.brokers.dns.resolver:",
        ] {
            assert!(got.iter().any(|g| g.starts_with(want)), "missing {want} in {got:#?}");
        }
        assert!(!problems(&format!("{LISTENER}dns = {{ name = \"\" , port = 1 }}\n")).is_empty());
        let got = problems(&format!(
            "{LISTENER}kubernetes = {{ namespace = \"MQTT\", service = \"-hivemq\", port = \"not a port\" }}\n"
        ));
        for want in
            ["pool.brokers.kubernetes.namespace:", "pool.brokers.kubernetes.service:", "pool.brokers.kubernetes.port:"]
        {
            assert!(got.iter().any(|g| g.starts_with(want)), "missing {want} in {got:#?}");
        }
        assert!(!problems(&format!(
            "{LISTENER}kubernetes = {{ namespace = \"mqtt\", service = \"hivemq\", port = 0 }}\n"
        ))
        .is_empty());
        assert!(!problems(&format!(
            "{LISTENER}kubernetes = {{ namespace = \"mqtt\", service = \"hivemq\", port = 70000 }}\n"
        ))
        .is_empty());
        let got = problems(&format!("{LISTENER}kubernetes = {{ namespace = \"mqtt\", service = \"hivemq\" }}\n"));
        assert!(got.iter().any(|g| g.contains("port")), "port is required: {got:?}");
        let got = problems(&format!("{LISTENER}dns = {{ name = \"b.test\", prot = 1 }}\n"));
        assert!(got.iter().any(|g| g.contains("prot")), "{got:?}");
    }
}
