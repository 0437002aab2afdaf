//! Every Prometheus metric harbormaster exports, registered in one registry, and the methods
//! that record them. Label names, their order and which type's vocabulary fills each one live
//! here only: callers pass names from the config and typed values (a
//! [`CloseReason`](crate::proxy::connection::CloseReason), a
//! [`Direction`](crate::proxy::stream::Direction)...) whose `as_str` sits next to the type.
//! Per-broker gauges are read from the current snapshot at scrape time. No label ever carries
//! a client-id, a username or a client address: label values are listener, pool and broker
//! names from the config, or small fixed vocabularies (reasons, outcomes, versions).

use std::sync::atomic::Ordering;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::proxy::balance::ProxyProtocol;
use crate::proxy::boundary::Disconnect;
use crate::proxy::connection::{CloseReason, DialOutcome, HandshakeFailure};
use crate::proxy::hold::HoldOutcome;
use crate::proxy::identity::CnRefusal;
use crate::proxy::mqtt::{self, MqttVersion};
use crate::proxy::proxy_header::Tlv;
use crate::proxy::snapshot::Snapshot;
use crate::proxy::stream::Direction;
use crate::proxy::websocket::UpgradeRefusal;

/// The version in `harbormaster_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit in `harbormaster_build_info` (build.rs; "unknown" outside a git checkout).
pub const GIT_COMMIT: &str = env!("HARBORMASTER_GIT_COMMIT");

/// Buckets for handshakes, CONNECT waits and connection setup: 0.5 ms to 10 s.
const SETUP_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Buckets for TCP connects to brokers: 0.25 ms to 5 s (the longest sensible connect timeout).
const DIAL_BUCKETS: &[f64] = &[0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// The metric handles. Labelled ones are recorded through the methods below, which know their
/// labels; the fields stay readable for tests and the scrape.
pub struct Metrics {
    pub registry: Registry,

    /// Accepted TCP connections, by listener.
    pub accepted: IntCounterVec,
    /// Connections open right now, by listener.
    pub active: IntGaugeVec,
    /// Connections moved from the setup runtime to the relay runtime, by listener.
    pub settled: IntCounterVec,
    /// Every connection end, refused or relayed, by listener and close reason.
    pub closed: IntCounterVec,
    /// Connections refused before relaying, by listener, reason and the CONNACK code sent
    /// ("none" when the connection was closed without one).
    pub refused: IntCounterVec,
    /// Accept errors (EMFILE and the like).
    pub accept_errors: IntCounter,
    /// Seconds from accept to the CONNECT being written to a broker.
    pub setup_seconds: Histogram,
    /// Seconds from accept until the whole CONNECT was read (PROXY header, TLS, CONNECT), by
    /// listener.
    pub accept_to_connect_seconds: HistogramVec,

    /// TLS handshakes, by listener, outcome ("ok", "error", "timeout") and TLS version
    /// ("none" when the handshake did not complete).
    pub tls_handshakes: IntCounterVec,
    /// Duration of completed TLS handshakes, by listener.
    pub tls_handshake_seconds: HistogramVec,
    /// Completed TLS handshakes that resumed a session from a ticket, by listener.
    pub tls_resumed: IntCounterVec,

    /// CONNECT packets read, by listener and MQTT version.
    pub connects: IntCounterVec,
    /// Size of CONNECT packets, by MQTT version.
    pub connect_bytes: HistogramVec,

    /// Connections relayed to a broker, by pool and broker.
    pub routed: IntCounterVec,
    /// TCP connects to brokers, by pool, broker and outcome ("ok", "refused", "timeout",
    /// "connack_timeout", "closed" and "reset" before the broker's first byte, "error").
    pub broker_attempts: IntCounterVec,
    /// Duration of successful TCP connects to brokers, by pool and broker.
    pub broker_connect_seconds: HistogramVec,
    /// Connections that reached a broker other than their first candidate because the
    /// earlier ones failed, by pool.
    pub failovers: IntCounterVec,
    /// Connections held for their restarting first-choice broker right now
    /// (`on_backend_restart = "hold"`), by pool.
    pub connections_held: IntGaugeVec,
    /// Holds ended (or refused), by pool and outcome ("home", "failover", "over_cap",
    /// "closed").
    pub holds: IntCounterVec,
    /// DISCONNECTs written by planned closes (drain, broker removed), by listener, side they
    /// went to ("client", "broker") and reason code.
    pub planned_disconnects: IntCounterVec,
    /// WebSocket upgrade requests, by listener and outcome ("ok": a WebSocket session, or the
    /// refusal: "bad_request", "not_found", "forbidden_origin", "unsupported_version",
    /// "too_large", "timeout").
    pub websocket_upgrades: IntCounterVec,
    /// WebSocket sessions ended by a client's frames breaking RFC 6455, by listener and the
    /// close code sent.
    pub websocket_protocol_errors: IntCounterVec,
    /// Connections relayed to each broker right now, by pool and broker; read from the
    /// snapshot at scrape time.
    pub broker_active: IntGaugeVec,
    /// Expiry (Unix seconds) of each listener's certificates, by listener and certificate file;
    /// read from the snapshot at scrape time.
    pub cert_expiry: IntGaugeVec,
    /// 1 while a broker is considered healthy, 0 while it is marked down; by pool and broker. Only
    /// brokers of pools with `health` checks have it.
    pub broker_healthy: IntGaugeVec,
    /// Broker health transitions, by pool, broker and new state ("up"/"down").
    pub health_transitions: IntCounterVec,
    /// Connections relayed by a routing key whose broker is not the one their key would be
    /// routed to now, by pool; recomputed every second by the control plane's rebalancer.
    pub away_from_home: IntGaugeVec,
    /// Connections closed to move them back to their first choice, by pool.
    pub rebalanced: IntCounterVec,

    /// Bytes relayed, by listener and direction ("client_to_broker", "broker_to_client").
    pub bytes: IntCounterVec,
    /// PROXY headers written to brokers, by pool and version ("v1", "v2").
    pub proxy_headers: IntCounterVec,
    /// Optional TLVs left out of a PROXY v2 header to stay within the budget, by pool and TLV.
    pub tlv_dropped: IntCounterVec,
    /// Client certificates whose subject CN was not passed on to brokers, by listener and
    /// reason ("control_character", "undecodable").
    pub cn_refused: IntCounterVec,

    /// Connections waiting for a TLS handshake token (`handshake_rate`) now.
    pub handshake_queue: IntGauge,
    /// Bytes held for TLS handshakes and CONNECTs by connections in setup now, within
    /// `limits.max_setup_bytes`.
    pub setup_bytes: IntGauge,
    /// 1 while draining after SIGTERM.
    pub draining: IntGauge,
    /// 1 while `/readyz` answers 200; computed at scrape time.
    pub ready: IntGauge,
    /// Config reloads, by outcome ("ok", "error").
    pub config_reloads: IntCounterVec,
    /// Unix time of the last configuration applied (the initial load counts).
    pub config_last_success: Gauge,
    /// 1 when the last load or reload was applied, 0 when it was rejected.
    pub config_last_successful: IntGauge,
    /// Membership updates applied by discovery, by pool.
    pub discovery_updates: IntCounterVec,
    /// Always 1, with the version and git commit as labels.
    pub build_info: IntGaugeVec,

    /// Log lines dropped because stderr did not take them fast enough (or failed); brought
    /// up to date from the log writer's count at scrape time.
    pub log_lines_dropped: IntCounter,
    /// Admin HTTP connections open now.
    pub admin_connections_active: IntGauge,
    /// Admin connections closed to make room for a new one at the admin connection cap (the
    /// one idle longest goes first).
    pub admin_connections_shed: IntCounter,
    /// Admin connections closed by a timeout: "header" (no complete request head in time),
    /// "idle" (no byte either way in time).
    pub admin_connections_timed_out: IntCounterVec,

    /// One scrape at a time: the scrape-time gauges are reset and refilled.
    scrape: Mutex<()>,
}

fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(registry, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

fn histogram_vec(registry: &Registry, name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(registry, HistogramVec::new(opts, labels).expect("valid metric"))
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new_custom(Some("harbormaster".into()), None).expect("valid prefix");
        let setup_seconds = register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new("connection_setup_seconds", "Accept to a broker's answer to the CONNECT")
                    .buckets(SETUP_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
        );
        let m = Metrics {
            accepted: counter_vec(&r, "connections_accepted_total", "TCP connections accepted", &["listener"]),
            active: gauge_vec(&r, "connections_active", "Client connections open now", &["listener"]),
            settled: counter_vec(
                &r,
                "connections_settled_total",
                "Connections that relayed long enough to move to the relay runtime's threads",
                &["listener"],
            ),
            closed: counter_vec(
                &r,
                "connections_closed_total",
                "Client connections ended, refused or relayed, by close reason",
                &["listener", "reason"],
            ),
            refused: counter_vec(
                &r,
                "connections_refused_total",
                "Connections refused before relaying, by reason and the CONNACK code sent",
                &["listener", "reason", "connack"],
            ),
            accept_errors: register(
                &r,
                IntCounter::new("accept_errors_total", "Errors accepting TCP connections").expect("valid"),
            ),
            setup_seconds,
            accept_to_connect_seconds: histogram_vec(
                &r,
                "accept_to_connect_seconds",
                "Accept until the whole CONNECT was read (PROXY header, TLS handshake, CONNECT)",
                SETUP_BUCKETS,
                &["listener"],
            ),
            tls_handshakes: counter_vec(
                &r,
                "tls_handshakes_total",
                "TLS handshakes by outcome (ok, error, timeout, revoked: a client certificate in a revocation list) and negotiated version",
                &["listener", "outcome", "version"],
            ),
            tls_handshake_seconds: histogram_vec(
                &r,
                "tls_handshake_seconds",
                "Duration of completed TLS handshakes",
                SETUP_BUCKETS,
                &["listener"],
            ),
            tls_resumed: counter_vec(
                &r,
                "tls_resumed_total",
                "Completed TLS handshakes that resumed a session from a ticket (counted in tls_handshakes_total too)",
                &["listener"],
            ),
            connects: counter_vec(
                &r,
                "mqtt_connects_total",
                "MQTT CONNECT packets read",
                &["listener", "mqtt_version"],
            ),
            connect_bytes: histogram_vec(
                &r,
                "connect_packet_bytes",
                "Size of CONNECT packets",
                &[32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0, 65536.0],
                &["mqtt_version"],
            ),
            routed: counter_vec(&r, "connections_routed_total", "Connections relayed to a broker", &["pool", "broker"]),
            broker_attempts: counter_vec(
                &r,
                "broker_connect_attempts_total",
                "TCP connects to brokers by outcome",
                &["pool", "broker", "outcome"],
            ),
            broker_connect_seconds: histogram_vec(
                &r,
                "broker_connect_seconds",
                "Duration of successful TCP connects to brokers",
                DIAL_BUCKETS,
                &["pool", "broker"],
            ),
            failovers: counter_vec(
                &r,
                "failovers_total",
                "Connections relayed to a later candidate because earlier brokers failed",
                &["pool"],
            ),
            connections_held: gauge_vec(
                &r,
                "connections_held",
                "New connections waiting for their restarting first-choice broker (on_backend_restart = \"hold\")",
                &["pool"],
            ),
            holds: counter_vec(
                &r,
                "holds_total",
                "Connections held for their restarting broker, by how the hold ended: home, failover (hold_timeout passed), over_cap (hold_max reached: failed over at once), closed (the connection ended while held)",
                &["pool", "outcome"],
            ),
            planned_disconnects: counter_vec(
                &r,
                "planned_disconnects_total",
                "DISCONNECT packets written by planned closes, to the client or to the broker on the client's behalf",
                &["listener", "to", "reason_code"],
            ),
            websocket_upgrades: counter_vec(
                &r,
                "websocket_upgrades_total",
                "WebSocket upgrade requests, by outcome: ok (a WebSocket session) or why it was refused",
                &["listener", "outcome"],
            ),
            websocket_protocol_errors: counter_vec(
                &r,
                "websocket_protocol_errors_total",
                "WebSocket sessions closed because the client's frames broke RFC 6455, by close code sent",
                &["listener", "code"],
            ),
            cert_expiry: gauge_vec(
                &r,
                "tls_certificate_expiry_seconds",
                "Unix time at which the listener's certificate expires",
                &["listener", "cert"],
            ),
            broker_active: gauge_vec(
                &r,
                "broker_connections_active",
                "Connections relayed to the broker now",
                &["pool", "broker"],
            ),
            broker_healthy: gauge_vec(
                &r,
                "broker_healthy",
                "1 while a health-checked broker is up, 0 while it is marked down",
                &["pool", "broker"],
            ),
            health_transitions: counter_vec(
                &r,
                "broker_health_transitions_total",
                "Brokers marked up or down by health checking",
                &["pool", "broker", "state"],
            ),
            away_from_home: gauge_vec(
                &r,
                "connections_away_from_home",
                "Relayed connections whose broker is not the first choice their routing key would get now",
                &["pool"],
            ),
            rebalanced: counter_vec(
                &r,
                "rebalanced_total",
                "Connections closed to move them back to their first choice",
                &["pool"],
            ),
            bytes: counter_vec(&r, "relayed_bytes_total", "Bytes relayed", &["listener", "direction"]),
            proxy_headers: counter_vec(
                &r,
                "proxy_headers_sent_total",
                "PROXY headers sent to brokers",
                &["pool", "version"],
            ),
            tlv_dropped: counter_vec(
                &r,
                "proxy_tlv_dropped_total",
                "Optional PROXY v2 TLVs left out to fit max_header_bytes",
                &["pool", "tlv"],
            ),
            cn_refused: counter_vec(
                &r,
                "tls_client_cn_refused_total",
                "Client certificate CNs not passed on to brokers: a control character, a Unicode non-character, or not decodable",
                &["listener", "reason"],
            ),
            handshake_queue: register(
                &r,
                IntGauge::new("handshake_queue", "Connections waiting for a TLS handshake token now").expect("valid"),
            ),
            setup_bytes: register(
                &r,
                IntGauge::new("setup_bytes", "Bytes held for TLS handshakes and CONNECTs by connections in setup now (max_setup_bytes)")
                    .expect("valid"),
            ),
            draining: register(&r, IntGauge::new("draining", "1 while draining after SIGTERM").expect("valid")),
            ready: register(&r, IntGauge::new("ready", "1 while /readyz answers 200").expect("valid")),
            config_reloads: counter_vec(&r, "config_reloads_total", "Configuration reloads by outcome", &["outcome"]),
            config_last_success: register(
                &r,
                Gauge::new(
                    "config_last_reload_success_timestamp_seconds",
                    "Unix time of the last configuration applied (the initial load counts)",
                )
                .expect("valid"),
            ),
            config_last_successful: register(
                &r,
                IntGauge::new(
                    "config_last_reload_successful",
                    "1 when the last configuration load or reload was applied, 0 when it was rejected",
                )
                .expect("valid"),
            ),
            discovery_updates: counter_vec(
                &r,
                "discovery_updates_total",
                "Pool membership updates applied by discovery",
                &["pool"],
            ),
            build_info: gauge_vec(&r, "build_info", "Always 1; the version and git commit", &["version", "commit"]),
            log_lines_dropped: register(
                &r,
                IntCounter::new("log_lines_dropped_total", "Log lines dropped because stderr did not keep up")
                    .expect("valid"),
            ),
            admin_connections_active: register(
                &r,
                IntGauge::new("admin_connections_active", "Admin HTTP connections open now").expect("valid"),
            ),
            admin_connections_shed: register(
                &r,
                IntCounter::new(
                    "admin_connections_shed_total",
                    "Admin connections closed, longest idle first, to make room for a new one at the cap",
                )
                .expect("valid"),
            ),
            admin_connections_timed_out: counter_vec(
                &r,
                "admin_connections_timed_out_total",
                "Admin connections closed because no request head (header) or no byte (idle) came in time",
                &["timeout"],
            ),
            scrape: Mutex::new(()),
            registry: r,
        };
        m.build_info.with_label_values(&[VERSION, GIT_COMMIT]).set(1);
        // Series that alerts take rate() of exist from the start, at 0.
        for outcome in ["ok", "error"] {
            m.config_reloads.with_label_values(&[outcome]);
        }
        for timeout in ["header", "idle"] {
            m.admin_connections_timed_out.with_label_values(&[timeout]);
        }
        m
    }

    /// The configuration was applied (at start, or by a reload).
    pub fn config_applied(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        self.config_last_success.set(now);
        self.config_last_successful.set(1);
    }

    /// A reload finished: applied (`ok`) or rejected.
    pub fn config_reloaded(&self, ok: bool) {
        self.config_reloads.with_label_values(&[if ok { "ok" } else { "error" }]).inc();
        if ok {
            self.config_applied();
        } else {
            self.config_last_successful.set(0);
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// [`render`](Self::render) after setting the gauges that are read at scrape time: active
    /// connections per broker of `snapshot` (brokers no longer in it disappear), certificate
    /// expiry and readiness.
    pub fn scrape(&self, snapshot: &Snapshot, ready: bool) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        self.broker_active.reset();
        for pool in &snapshot.pools {
            for b in &pool.backends {
                let n = i64::try_from(b.active.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
                self.broker_active.with_label_values(&[&pool.name, &b.name]).set(n);
            }
        }
        self.cert_expiry.reset();
        for l in &snapshot.listeners {
            for (cert, not_after) in &l.cert_expiry {
                self.cert_expiry.with_label_values(&[&l.name, cert]).set(*not_after);
            }
        }
        self.ready.set(i64::from(ready));
        let dropped = crate::admin::log::dropped_lines();
        self.log_lines_dropped.inc_by(dropped.saturating_sub(self.log_lines_dropped.get()));
        self.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Connections, by listener: the data plane's recording methods.
impl Metrics {
    /// The accepted-connections counter of `listener`, for its accept loop to hold.
    pub fn connections_accepted(&self, listener: &str) -> IntCounter {
        self.accepted.with_label_values(&[listener])
    }

    /// A connection of `listener` is open (its task runs).
    pub fn connection_opened(&self, listener: &str) {
        self.active.with_label_values(&[listener]).inc();
    }

    /// A connection of `listener` moved from the setup runtime to the relay runtime.
    pub fn connection_settled(&self, listener: &str) {
        self.settled.with_label_values(&[listener]).inc();
    }

    /// A connection that [opened](Self::connection_opened) ended, for `reason`; `connack` is
    /// the code of the CONNACK a refusal sent.
    pub fn connection_closed(&self, listener: &str, reason: CloseReason, connack: Option<u8>) {
        self.active.with_label_values(&[listener]).dec();
        self.ended(listener, reason, connack);
    }

    /// A connection closed at accept, before its task began (a connection limit).
    pub fn closed_at_accept(&self, listener: &str, reason: CloseReason) {
        self.ended(listener, reason, None);
    }

    fn ended(&self, listener: &str, reason: CloseReason, connack: Option<u8>) {
        if reason.refused() {
            self.refused.with_label_values(&[listener, reason.as_str(), mqtt::connack_label(connack)]).inc();
        }
        self.closed.with_label_values(&[listener, reason.as_str()]).inc();
    }

    /// A TLS handshake that did not complete.
    pub fn tls_handshake_failed(&self, listener: &str, failure: HandshakeFailure) {
        self.tls_handshakes.with_label_values(&[listener, failure.as_str(), "none"]).inc();
    }

    /// A completed TLS handshake: its `version` (as [`TlsInfo`](crate::proxy::identity::TlsInfo)
    /// spells it), how long it took and whether it resumed a session.
    pub fn tls_handshake_done(&self, listener: &str, version: &'static str, seconds: f64, resumed: bool) {
        self.tls_handshake_seconds.with_label_values(&[listener]).observe(seconds);
        self.tls_handshakes.with_label_values(&[listener, "ok", version]).inc();
        if resumed {
            self.tls_resumed.with_label_values(&[listener]).inc();
        }
    }

    /// A client certificate's CN not passed on to brokers.
    pub fn client_cn_refused(&self, listener: &str, reason: CnRefusal) {
        self.cn_refused.with_label_values(&[listener, reason.as_str()]).inc();
    }

    /// A whole CONNECT of `bytes` was read, `seconds` after accept.
    pub fn connect_read(&self, listener: &str, version: MqttVersion, bytes: usize, seconds: f64) {
        self.connect_bytes.with_label_values(&[version.as_str()]).observe(bytes as f64);
        self.connects.with_label_values(&[listener, version.as_str()]).inc();
        self.accept_to_connect_seconds.with_label_values(&[listener]).observe(seconds);
    }

    /// The relayed-bytes counter of `listener` in `direction`, for a relaying connection to
    /// hold ([`Counted`](crate::proxy::stream::Counted)).
    pub fn relayed_bytes(&self, listener: &str, direction: Direction) -> IntCounter {
        self.bytes.with_label_values(&[listener, direction.as_str()])
    }
}

/// Brokers, by pool and broker.
impl Metrics {
    /// One attempt to dial `broker`.
    pub fn dial_attempt(&self, pool: &str, broker: &str, outcome: DialOutcome) {
        self.broker_attempts.with_label_values(&[pool, broker, outcome.as_str()]).inc();
    }

    /// A TCP connect to `broker` succeeded after `seconds`.
    pub fn broker_connected(&self, pool: &str, broker: &str, seconds: f64) {
        self.broker_connect_seconds.with_label_values(&[pool, broker]).observe(seconds);
    }

    /// A connection reached a later candidate of `pool` because earlier ones failed.
    pub fn failed_over(&self, pool: &str) {
        self.failovers.with_label_values(&[pool]).inc();
    }

    /// A connection began waiting for its broker in `pool`.
    pub fn hold_began(&self, pool: &str) {
        self.connections_held.with_label_values(&[pool]).inc();
    }

    /// A hold in `pool` ended with `outcome`; `held` says whether it had begun (over the cap
    /// it never does).
    pub fn hold_ended(&self, pool: &str, outcome: HoldOutcome, held: bool) {
        if held {
            self.connections_held.with_label_values(&[pool]).dec();
        }
        self.holds.with_label_values(&[pool, outcome.as_str()]).inc();
    }

    /// A planned close wrote `d` (to the client, or to the broker on the client's behalf).
    pub fn planned_disconnect(&self, listener: &str, d: Disconnect) {
        self.planned_disconnects.with_label_values(&[listener, d.to().as_str(), d.as_str()]).inc();
    }

    /// A WebSocket upgrade request was accepted (`None`) or refused.
    pub fn websocket_upgrade(&self, listener: &str, refusal: Option<UpgradeRefusal>) {
        let outcome = refusal.map_or("ok", UpgradeRefusal::as_str);
        self.websocket_upgrades.with_label_values(&[listener, outcome]).inc();
    }

    /// A WebSocket client's frames broke the protocol; `code` is the close code it was sent.
    pub fn websocket_protocol_error(&self, listener: &str, code: u16) {
        self.websocket_protocol_errors.with_label_values(&[listener, &code.to_string()]).inc();
    }

    /// A connection was routed to `broker` (its CONNECT answered), with the PROXY header
    /// `proxy`, `setup_seconds` after accept.
    pub fn connection_routed(&self, pool: &str, broker: &str, proxy: ProxyProtocol, setup_seconds: f64) {
        self.routed.with_label_values(&[pool, broker]).inc();
        let version = match proxy {
            ProxyProtocol::None => None,
            ProxyProtocol::V1 => Some("v1"),
            ProxyProtocol::V2 => Some("v2"),
        };
        if let Some(version) = version {
            self.proxy_headers.with_label_values(&[pool, version]).inc();
        }
        self.setup_seconds.observe(setup_seconds);
    }

    /// A TLV left out of a PROXY v2 header to `pool`'s brokers.
    pub fn proxy_tlv_dropped(&self, pool: &str, tlv: Tlv) {
        self.tlv_dropped.with_label_values(&[pool, tlv.as_str()]).inc();
    }

    /// `broker` was marked up or down.
    pub fn health_transition(&self, pool: &str, broker: &str, up: bool) {
        self.health_transitions.with_label_values(&[pool, broker, if up { "up" } else { "down" }]).inc();
    }

    /// Whether a health-checked `broker` is considered healthy now.
    pub fn set_broker_healthy(&self, pool: &str, broker: &str, healthy: bool) {
        self.broker_healthy.with_label_values(&[pool, broker]).set(i64::from(healthy));
    }

    /// `n` connections of `pool` are away from their first choice now.
    pub fn set_away_from_home(&self, pool: &str, n: usize) {
        self.away_from_home.with_label_values(&[pool]).set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// `pool` is no longer configured: its away gauge goes.
    pub fn forget_away_from_home(&self, pool: &str) {
        let _ = self.away_from_home.remove_label_values(&[pool]);
    }

    /// `n` connections of `pool` were closed to move them back home.
    pub fn rebalanced(&self, pool: &str, n: usize) {
        self.rebalanced.with_label_values(&[pool]).inc_by(n as u64);
    }

    /// Discovery applied a membership update to `pool`.
    pub fn discovery_updated(&self, pool: &str) {
        self.discovery_updates.with_label_values(&[pool]).inc();
    }

    /// An admin connection closed by its `timeout` ("header" or "idle").
    pub fn admin_connection_timed_out(&self, timeout: &'static str) {
        self.admin_connections_timed_out.with_label_values(&[timeout]).inc();
    }
}

/// Reading, for tests.
#[cfg(test)]
impl Metrics {
    /// The sum of the counters or gauges of the family `harbormaster_{name}` whose labels
    /// include `labels` (by name, in any order); 0 when there is none.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        use prometheus::proto::MetricType;
        let name = format!("harbormaster_{name}");
        let mut sum = 0.0;
        for f in self.registry.gather().iter().filter(|f| f.name() == name) {
            for m in f.get_metric() {
                let has = |(k, v): &(&str, &str)| m.get_label().iter().any(|l| l.name() == *k && l.value() == *v);
                if labels.iter().all(has) {
                    sum += match f.get_field_type() {
                        MetricType::COUNTER => m.get_counter().get_value(),
                        MetricType::GAUGE => m.get_gauge().get_value(),
                        other => panic!("{name} is a {other:?}"),
                    };
                }
            }
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Touches every vector with plausible label values so that gather() returns them.
    fn populated() -> Metrics {
        let m = Metrics::new();
        m.accepted.with_label_values(&["mqtt"]).inc();
        m.active.with_label_values(&["mqtt"]).inc();
        m.closed.with_label_values(&["mqtt", "closed"]).inc();
        m.refused.with_label_values(&["mqtt", "no_broker_available", "0x03"]).inc();
        m.accept_to_connect_seconds.with_label_values(&["mqtt"]).observe(0.01);
        m.tls_handshakes.with_label_values(&["mqtts", "ok", "TLSv1.3"]).inc();
        m.tls_handshake_seconds.with_label_values(&["mqtts"]).observe(0.002);
        m.tls_resumed.with_label_values(&["mqtts"]).inc();
        m.connects.with_label_values(&["mqtt", "5.0"]).inc();
        m.connect_bytes.with_label_values(&["5.0"]).observe(40.0);
        m.routed.with_label_values(&["brokers", "b0"]).inc();
        m.broker_attempts.with_label_values(&["brokers", "b0", "ok"]).inc();
        m.broker_connect_seconds.with_label_values(&["brokers", "b0"]).observe(0.001);
        m.failovers.with_label_values(&["brokers"]).inc();
        m.connections_held.with_label_values(&["brokers"]).set(1);
        m.holds.with_label_values(&["brokers", "home"]).inc();
        m.broker_active.with_label_values(&["brokers", "b0"]).set(1);
        m.broker_healthy.with_label_values(&["brokers", "b0"]).set(1);
        m.health_transitions.with_label_values(&["brokers", "b0", "down"]).inc();
        m.away_from_home.with_label_values(&["brokers"]).set(0);
        m.rebalanced.with_label_values(&["brokers"]).inc();
        m.bytes.with_label_values(&["mqtt", "client_to_broker"]).inc_by(10);
        m.proxy_headers.with_label_values(&["brokers", "v2"]).inc();
        m.tlv_dropped.with_label_values(&["brokers", "client_id"]).inc();
        m.discovery_updates.with_label_values(&["brokers"]).inc();
        m
    }

    #[test]
    fn every_metric_is_prefixed_and_no_label_names_a_client() {
        let m = populated();
        let families = m.registry.gather();
        assert!(families.len() >= 28, "only {} families", families.len());
        let forbidden = ["client_id", "client", "username", "user", "client_addr", "address", "addr", "ip", "sni"];
        for f in &families {
            assert!(f.name().starts_with("harbormaster_"), "{}", f.name());
            assert!(!f.help().is_empty(), "{} has no help", f.name());
            for metric in f.get_metric() {
                for l in metric.get_label() {
                    assert!(!forbidden.contains(&l.name()), "{} has label {}", f.name(), l.name());
                }
            }
        }
        let text = m.render();
        assert!(text.contains(&format!("harbormaster_build_info{{commit=\"{GIT_COMMIT}\",version=\"{VERSION}\"}} 1")));
        assert!(text.contains("harbormaster_config_reloads_total{outcome=\"error\"} 0"), "{text}");
    }

    #[test]
    fn config_load_and_reloads_set_the_timestamp_and_flag() {
        let m = Metrics::new();
        assert_eq!(m.config_last_success.get(), 0.0);
        m.config_applied();
        let t = m.config_last_success.get();
        assert!(t > 1.6e9, "{t}");
        assert_eq!(m.config_last_successful.get(), 1);
        m.config_reloaded(false);
        assert_eq!(m.config_last_successful.get(), 0);
        assert_eq!(m.config_last_success.get(), t);
        m.config_reloaded(true);
        assert_eq!(m.config_last_successful.get(), 1);
        assert_eq!(m.config_reloads.with_label_values(&["ok"]).get(), 1);
        assert_eq!(m.config_reloads.with_label_values(&["error"]).get(), 1);
    }
}
