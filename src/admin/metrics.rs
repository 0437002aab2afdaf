//! Every Prometheus metric harbormaster exports, registered in one registry. The data plane
//! holds an `Arc<Metrics>` and updates these handles; nothing else defines metrics.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    /// Accepted TCP connections, by listener.
    pub accepted: IntCounterVec,
    /// Connections open right now, by listener.
    pub active: IntGaugeVec,
    /// Connections refused before relaying, by listener and reason.
    pub refused: IntCounterVec,
    /// Connections relayed to a broker, by pool and broker.
    pub routed: IntCounterVec,
    /// Failed broker connection attempts, by pool and broker.
    pub backend_failures: IntCounterVec,
    /// Optional TLVs left out of a PROXY v2 header to stay within the budget, by pool and TLV.
    pub tlv_dropped: IntCounterVec,
    /// Bytes relayed, by direction ("up" client→broker, "down").
    pub bytes: IntCounterVec,
    /// Connection ends after relaying, by close reason.
    pub closed: IntCounterVec,
    /// Seconds from accept to the CONNECT being written to a broker.
    pub setup_seconds: Histogram,
    /// TLS handshakes completed, by TLS version.
    pub tls_handshakes: IntCounterVec,
    /// Accept errors (EMFILE and the like).
    pub accept_errors: IntCounter,
    /// 1 while draining after SIGTERM.
    pub draining: IntGauge,
    /// Size of CONNECT packets, by MQTT version.
    pub connect_bytes: HistogramVec,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("harbormaster".into()), None).expect("valid prefix");
        let active = IntGaugeVec::new(Opts::new("connections_active", "Client connections open now"), &["listener"])
            .expect("valid metric");
        registry.register(Box::new(active.clone())).expect("unique metric");
        let setup_seconds = Histogram::with_opts(
            HistogramOpts::new("connection_setup_seconds", "Accept to CONNECT forwarded to a broker").buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        registry.register(Box::new(setup_seconds.clone())).expect("unique metric");
        let accept_errors = IntCounter::new("accept_errors_total", "Errors accepting TCP connections").expect("valid");
        registry.register(Box::new(accept_errors.clone())).expect("unique metric");
        let draining = IntGauge::new("draining", "1 while draining after SIGTERM").expect("valid");
        registry.register(Box::new(draining.clone())).expect("unique metric");
        let connect_bytes = HistogramVec::new(
            HistogramOpts::new("connect_packet_bytes", "Size of CONNECT packets").buckets(vec![
                32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0, 65536.0,
            ]),
            &["mqtt_version"],
        )
        .expect("valid metric");
        registry.register(Box::new(connect_bytes.clone())).expect("unique metric");
        Metrics {
            accepted: counter_vec(&registry, "connections_accepted_total", "TCP connections accepted", &["listener"]),
            active,
            refused: counter_vec(
                &registry,
                "connections_refused_total",
                "Connections refused before relaying",
                &["listener", "reason"],
            ),
            routed: counter_vec(&registry, "connections_routed_total", "Connections relayed to a broker", &["pool", "broker"]),
            backend_failures: counter_vec(
                &registry,
                "backend_connect_failures_total",
                "Failed connection attempts to a broker",
                &["pool", "broker"],
            ),
            tlv_dropped: counter_vec(
                &registry,
                "proxy_tlv_dropped_total",
                "Optional PROXY v2 TLVs left out to fit max_header_bytes",
                &["pool", "tlv"],
            ),
            bytes: counter_vec(&registry, "relayed_bytes_total", "Bytes relayed", &["direction"]),
            closed: counter_vec(&registry, "connections_closed_total", "Relayed connections ended", &["reason"]),
            tls_handshakes: counter_vec(&registry, "tls_handshakes_total", "TLS handshakes completed", &["version"]),
            setup_seconds,
            accept_errors,
            draining,
            connect_bytes,
            registry,
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
