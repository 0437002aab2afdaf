//! Every Prometheus metric harbormaster exports, registered in one registry, with the two
//! helpers that feed them: a stream adapter that counts relayed bytes as they flow, and the
//! gauges read from the current snapshot at scrape time. The data plane holds an
//! `Arc<Metrics>` and updates these handles; nothing else defines metrics. No label ever
//! carries a client-id, a username or a client address: label values are listener, pool and
//! broker names from the config, or small fixed vocabularies (reasons, outcomes, versions).

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::snapshot::Snapshot;

/// The version in `harbormaster_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit in `harbormaster_build_info` (build.rs; "unknown" outside a git checkout).
pub const GIT_COMMIT: &str = env!("HARBORMASTER_GIT_COMMIT");

/// Buckets for handshakes, CONNECT waits and connection setup: 0.5 ms to 10 s.
const SETUP_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Buckets for TCP connects to brokers: 0.25 ms to 5 s (the longest sensible connect timeout).
const DIAL_BUCKETS: &[f64] = &[0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

pub struct Metrics {
    pub registry: Registry,

    /// Accepted TCP connections, by listener.
    pub accepted: IntCounterVec,
    /// Connections open right now, by listener.
    pub active: IntGaugeVec,
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
                "Client certificate CNs not passed on to brokers: a control character, or not decodable",
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

/// The `connack` label of a refusal: the CONNACK return/reason code sent, in hex as the MQTT
/// specifications write them, or "none".
pub fn connack_label(code: Option<u8>) -> &'static str {
    match code {
        None => "none",
        Some(0x01) => "0x01",
        Some(0x02) => "0x02",
        Some(0x03) => "0x03",
        Some(0x04) => "0x04",
        Some(0x05) => "0x05",
        Some(0x81) => "0x81",
        Some(0x84) => "0x84",
        Some(0x85) => "0x85",
        Some(0x88) => "0x88",
        Some(0x95) => "0x95",
        Some(0x97) => "0x97",
        Some(0x9F) => "0x9f",
        Some(_) => "other",
    }
}

/// The `outcome` label of a broker that closed the connection (FIN) before its first byte.
pub const DIAL_CLOSED: &str = "closed";

/// The `outcome` label of a failed broker connect.
pub fn dial_error_outcome(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::TimedOut => "timeout",
        // Reset by the broker (a broken pipe is a write after the reset was received).
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => "reset",
        _ => "error",
    }
}

/// A stream that adds the bytes read from it to a counter as they arrive, so that
/// `relayed_bytes_total` moves while long-lived connections relay, not only when they end.
/// Writes pass through untouched.
pub struct CountReads<S> {
    inner: S,
    counter: IntCounter,
}

impl<S> CountReads<S> {
    pub fn new(inner: S, counter: IntCounter) -> Self {
        CountReads { inner, counter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountReads<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.counter.inc_by(n as u64);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountReads<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: crate::proxy::relay::WriteLast + Unpin> crate::proxy::relay::WriteLast for CountReads<S> {
    fn poll_write_last(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_last(cx, buf)
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
        m.refused.with_label_values(&["mqtt", "no_broker_available", connack_label(Some(3))]).inc();
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
        m.broker_active.with_label_values(&["brokers", "b0"]).set(1);
        m.broker_healthy.with_label_values(&["brokers", "b0"]).set(1);
        m.health_transitions.with_label_values(&["brokers", "b0", "down"]).inc();
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

    #[test]
    fn connack_labels_are_a_fixed_vocabulary() {
        assert_eq!(connack_label(None), "none");
        assert_eq!(connack_label(Some(3)), "0x03");
        assert_eq!(connack_label(Some(0x88)), "0x88");
        assert_eq!(connack_label(Some(0x42)), "other");
    }

    #[test]
    fn dial_errors_map_to_outcomes() {
        assert_eq!(dial_error_outcome(&io::Error::from(io::ErrorKind::ConnectionRefused)), "refused");
        assert_eq!(dial_error_outcome(&io::Error::from(io::ErrorKind::TimedOut)), "timeout");
        assert_eq!(dial_error_outcome(&io::Error::from(io::ErrorKind::ConnectionReset)), "reset");
        assert_eq!(dial_error_outcome(&io::Error::from(io::ErrorKind::BrokenPipe)), "reset");
        assert_eq!(dial_error_outcome(&io::Error::other("x")), "error");
    }

    #[tokio::test]
    async fn count_reads_counts_what_is_read_as_it_is_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let m = Metrics::new();
        let counter = m.bytes.with_label_values(&["l", "client_to_broker"]);
        let (a, mut b) = tokio::io::duplex(64);
        let mut counted = CountReads::new(a, counter.clone());
        b.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 16];
        let n = counted.read(&mut buf).await.unwrap();
        assert_eq!((n, counter.get()), (5, 5));
        counted.write_all(b"not counted").await.unwrap();
        b.write_all(b"more").await.unwrap();
        drop(b);
        let mut rest = Vec::new();
        counted.read_to_end(&mut rest).await.unwrap();
        assert_eq!(counter.get(), 9);
    }
}
