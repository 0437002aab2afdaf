//! The admin server and logs end to end, with real mosquitto brokers on ephemeral ports:
//! readiness transitions (in process with a shutdown the test controls, and over SIGTERM with
//! the real binary), `/metrics` parsed by an independent parser (Python's
//! `prometheus_client`), `/backends` and `/route` against `harbormaster route` and against
//! where clients really land (mosquitto's logs), and JSON logs parsed line by line. Also what
//! must never take the process down: a stderr nobody reads, and idle admin connections.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::mqtt::{self, ConnectOptions, MqttVersion};
use crate::support::*;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// JSON over the support's HTTP client
// ---------------------------------------------------------------------------------------------

fn get_json(addr: &str, path: &str) -> (u16, Value) {
    let r = http_request(addr, path);
    assert_eq!(r.content_type, "application/json", "GET {path}: {r:?}");
    let v = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {}", r.body));
    (r.status, v)
}

/// Percent-encodes everything but unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

/// Waits (bounded) for `/readyz` to answer `status`; returns the last answer.
fn wait_ready_status(admin: &str, status: u16) -> (u16, Value) {
    let mut last = (0, Value::Null);
    let ok = wait_until(WAIT, || {
        if let Ok(r) = try_http_get(admin, "/readyz", WAIT) {
            last = (r.status, serde_json::from_str(&r.body).unwrap_or(Value::Null));
        }
        last.0 == status
    });
    assert!(ok, "/readyz never answered {status}; last answer {last:?}");
    last
}

// ---------------------------------------------------------------------------------------------
// Prometheus text, parsed by prometheus_client (PyPI), not by us
// ---------------------------------------------------------------------------------------------

const PARSE_METRICS: &str = r#"
import json, math, sys
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as e:
    sys.stderr.write("prometheus_client is missing (pip install prometheus_client): %s\n" % e)
    sys.exit(3)
out = []
with open(sys.argv[1]) as f:
    for family in text_string_to_metric_families(f.read()):
        for s in family.samples:
            v = s.value
            out.append({"family": family.name, "type": family.type, "name": s.name,
                        "labels": s.labels, "value": v if math.isfinite(v) else str(v)})
print(json.dumps(out))
"#;

#[derive(Debug, Clone)]
struct Sample {
    family_type: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

struct Scrape(Vec<Sample>);

impl Scrape {
    fn of(admin: &str) -> Scrape {
        let r = http_request(admin, "/metrics");
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.content_type.starts_with("text/plain; version=0.0.4"), "{r:?}");
        Scrape::parse(&r.body)
    }

    fn parse(text: &str) -> Scrape {
        let file = tempfile::NamedTempFile::new().unwrap();
        fs::write(file.path(), text).unwrap();
        let python = require_program("python3");
        let out = run_with_timeout(Command::new(python).arg("-c").arg(PARSE_METRICS).arg(file.path()), CMD_TIMEOUT);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() != Some(3),
            "Python's prometheus_client is missing: `pip install prometheus_client` (scripts/test does)\n{stderr}"
        );
        assert!(out.status.success(), "prometheus_client rejected /metrics: {stderr}\n{text}");
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("parser output");
        Scrape(
            rows.iter()
                .map(|r| Sample {
                    family_type: r["type"].as_str().unwrap().to_string(),
                    name: r["name"].as_str().unwrap().to_string(),
                    labels: r["labels"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                        .collect(),
                    value: r["value"].as_f64().unwrap_or(f64::NAN),
                })
                .collect(),
        )
    }

    /// Sum of the samples named `name` whose labels include all of `labels`; 0 when none.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&str, &str)]) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0.iter().filter(move |s| {
            s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    fn type_of(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|s| s.name == name || s.name.starts_with(&format!("{name}_")))
            .map(|s| s.family_type.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// Harbormaster as a child process started here (the harness waits for every port; these
// tests want to watch startup, or pass flags and environment)
// ---------------------------------------------------------------------------------------------

struct Spawned {
    child: Child,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Spawned {
    fn start(config: &str, args: &[&str], env: &[(&str, &str)]) -> Spawned {
        let dir = tempfile::Builder::new().prefix("hm-admin-").tempdir().unwrap();
        let config_path = dir.path().join("harbormaster.toml");
        fs::write(&config_path, config).unwrap();
        let log_path = dir.path().join("stderr.log");
        let log = fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(harbormaster_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("HARBORMASTER_LOG")
            .envs(env.iter().copied())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let child = cmd.spawn().expect("spawn harbormaster");
        Spawned { child, log_path, _dir: dir }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The addresses it logged binding, once the admin server and `listeners` are bound.
    fn wait_bound(&self, listeners: &[&str]) -> Bound {
        let mut bound = Bound::default();
        let up = wait_until(WAIT, || {
            bound = Bound::from_log(&self.log());
            bound.admin.is_some() && listeners.iter().all(|l| bound.listeners.contains_key(*l))
        });
        assert!(up, "harbormaster did not bind {listeners:?} and the admin server:\n{}", self.log());
        bound
    }

    /// SIGTERM, then wait (bounded) for exit 0.
    fn stop(&mut self) {
        send_signal(i64::from(self.child.id()), "TERM");
        let status = wait_child(&mut self.child, CMD_TIMEOUT).expect("harbormaster did not exit after SIGTERM");
        assert!(status.success(), "exit {status:?}:\n{}", self.log());
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- harbormaster stderr -----\n{}\n-----", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------------------------

/// starting → ready → every broker of a pool down → not ready → one back → ready → shutdown
/// → not ready while draining, each checked over HTTP. In process: `app::run_with` with a
/// shutdown future the test resolves, broker health flipped through the live snapshot (what
/// health checks write).
#[test]
fn readiness_transitions_in_process() {
    let (a0, a1, b0) = (Mosquitto::start(), Mosquitto::start(), Mosquitto::start());
    let config = format!(
        r#"
[[listener]]
name = "la"
bind = "127.0.0.1:0"
pool = "a"

[[listener]]
name = "lb"
bind = "127.0.0.1:0"
pool = "b"

[pool.a]
backends = [{a}]

[pool.b]
backends = [{b}]

[limits]
drain_timeout = "60s"

[admin]
bind = "127.0.0.1:0"
"#,
        a = named_backends(&[("a0", &a0), ("a1", &a1)]),
        b = named_backends(&[("b0", &b0)]),
    );
    let load = || harbormaster::control::config::load_str(&config, Path::new(".")).expect("valid config");
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Starting: the admin server is up, the listeners are not bound yet.
    {
        use harbormaster::admin::{http, metrics::Metrics, ready::Readiness};
        use harbormaster::control::rebalance::Rebalancer;
        let loaded = load();
        let current = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(loaded.snapshot));
        let metrics = std::sync::Arc::new(Metrics::new());
        let conns = std::sync::Arc::new(harbormaster::proxy::registry::Registry::new(Default::default()));
        let state = std::sync::Arc::new(http::AdminState {
            rebalancer: std::sync::Arc::new(Rebalancer::new(current.clone(), conns.clone(), metrics.clone())),
            current,
            metrics,
            readiness: std::sync::Arc::new(Readiness::new()),
            tokens: harbormaster::admin::auth::Tokens::new(None),
            conns,
        });
        let stop = tokio_util::sync::CancellationToken::new();
        let (addr, task) = rt.block_on(http::start(&loaded.admin, state.clone(), stop.clone())).unwrap().unwrap();
        let admin = addr.to_string();
        let (status, body) = get_json(&admin, "/readyz");
        assert_eq!(status, 503, "{body}");
        assert!(body["reason"].as_str().unwrap().starts_with("starting"), "{body}");
        state.readiness.set_snapshot_loaded();
        let (status, body) = get_json(&admin, "/readyz");
        assert_eq!((status, body["reason"].as_str().unwrap()), (503, "starting: listeners not bound yet"));
        assert_eq!(get_json(&admin, "/healthz").0, 200, "alive while starting");
        stop.cancel();
        rt.block_on(task).unwrap();
    }

    // The whole process, with a shutdown the test controls.
    let (tx_handles, rx_handles) = std::sync::mpsc::channel();
    let (tx_stop, rx_stop) = tokio::sync::oneshot::channel::<()>();
    let run = rt.spawn(harbormaster::app::run_with(
        load(),
        async move {
            let _ = rx_stop.await;
        },
        move |h| tx_handles.send(h.clone()).unwrap(),
    ));
    let h = rx_handles.recv_timeout(WAIT).expect("harbormaster started");
    let admin = h.admin.expect("admin server").to_string();
    let port = |name: &str| h.listeners.iter().find(|(n, _)| n == name).unwrap().1.port();

    let (status, body) = get_json(&admin, "/readyz");
    assert_eq!((status, body.clone()), (200, serde_json::json!({ "ready": true })), "{body}");
    MqttClient::plain(port("la"), MqttVersion::V311).publish_ok("ready-1", "t", "m");

    // Every broker of pool a marked down: not ready, and it says which pool.
    let snap = h.current.load_full();
    let pool_a = snap.pool("a").unwrap();
    for b in &pool_a.backends {
        b.healthy.store(false, Ordering::SeqCst);
    }
    let (status, body) = get_json(&admin, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["reason"], "pool \"a\": none of its 2 brokers is healthy");
    let (_, backends) = get_json(&admin, "/backends");
    let a = backends["pools"].as_array().unwrap().iter().find(|p| p["name"] == "a").unwrap().clone();
    assert!(a["brokers"].as_array().unwrap().iter().all(|b| b["healthy"] == false), "{a}");
    assert_eq!(Scrape::of(&admin).sum("harbormaster_ready", &[]), 0.0);

    // One broker back: ready again.
    pool_a.backends[1].healthy.store(true, Ordering::SeqCst);
    assert_eq!(get_json(&admin, "/readyz").0, 200);
    assert_eq!(Scrape::of(&admin).sum("harbormaster_ready", &[]), 1.0);

    // A live client keeps the drain going while we look.
    let live = mqtt_session(port("lb"), MqttVersion::V311, "drain-holder");

    tx_stop.send(()).unwrap();
    let (_, body) = wait_ready_status(&admin, 503);
    assert!(body["reason"].as_str().unwrap().starts_with("draining"), "{body}");
    assert_eq!(get_json(&admin, "/healthz").0, 200, "still alive while draining");
    let scrape = Scrape::of(&admin);
    assert_eq!((scrape.sum("harbormaster_draining", &[]), scrape.sum("harbormaster_ready", &[])), (1.0, 0.0));
    assert!(wait_until(WAIT, || !port_accepts(port("la"))), "listeners still accept while draining");

    // The last client leaves: run returns, and the admin server is gone with it.
    drop(live);
    let result = rt.block_on(async { tokio::time::timeout(WAIT, run).await });
    result.expect("run did not return after the drain").expect("run panicked").expect("run failed");
    assert!(try_http_get(&admin, "/healthz", WAIT).is_err(), "admin server still answering after exit");
}

/// The real binary: SIGTERM turns /readyz to 503 at once while live connections drain.
#[test]
fn sigterm_turns_readyz_503_while_draining() {
    let m = Mosquitto::start();
    let limits = "\n[limits]\ndrain_timeout = \"60s\"\n";
    let mut hm = Harbormaster::start(&(one_pool_config(0, 0, &[("m", &m)], "") + limits));
    let (port, admin_port) = (hm.port("mqtt"), hm.admin_port());
    let admin = addr(admin_port);
    wait_ready_status(&admin, 200);

    let live = mqtt_session(port, MqttVersion::V5, "sigterm-holder");

    hm.sigterm();
    let (_, body) = wait_ready_status(&admin, 503);
    assert!(body["reason"].as_str().unwrap().starts_with("draining"), "{body}");
    assert_eq!(get_json(&admin, "/healthz").0, 200);
    assert!(hm.wait_exit(Duration::ZERO).is_none(), "exited although a connection was live");
    assert_eq!(Scrape::of(&admin).sum("harbormaster_draining", &[]), 1.0);

    drop(live);
    let status = hm.wait_exit(CMD_TIMEOUT).expect("no exit after the last connection ended");
    assert!(status.success(), "{status:?}");
    assert!(!port_accepts(admin_port));
}

/// Polled from the moment the process starts, /readyz never says 200 before every MQTT
/// listener accepts, and anything before 200 is a 503 that says "starting".
#[test]
fn readyz_is_never_200_before_the_listeners_accept() {
    let m = Mosquitto::start();
    // Chosen ahead: /readyz is polled from the moment the process starts, before it could say
    // where it bound anything.
    let (p1, p2, admin_port) = (free_port(), free_port(), free_port());
    let mut hm = Spawned::start(
        &format!(
            r#"
[[listener]]
name = "one"
bind = "127.0.0.1:{p1}"
pool = "brokers"

[[listener]]
name = "two"
bind = "127.0.0.1:{p2}"
pool = "brokers"

[pool.brokers]
backends = [{broker}]

[admin]
bind = "127.0.0.1:{admin_port}"
"#,
            broker = toml_str(m.addr())
        ),
        &[],
        &[],
    );
    let admin = addr(admin_port);
    let mut seen = Vec::new();
    let ready = wait_until(WAIT, || match try_http_get(&admin, "/readyz", WAIT) {
        Ok(r) => {
            let ok = r.status == 200;
            seen.push((r.status, r.body));
            ok
        }
        Err(_) => false,
    });
    assert!(ready, "never ready: {seen:?}\n{}", hm.log());
    assert!(port_accepts(p1) && port_accepts(p2), "ready before the listeners accept");
    for (status, body) in &seen[..seen.len() - 1] {
        assert_eq!(*status, 503, "{body}");
        assert!(body.contains("\"starting"), "{body}");
    }
    hm.stop();
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// Scrapes /metrics before and after real traffic (relayed, refused, TLS failures, PROXY v2)
/// and checks, through an independent parser, that every counter moved by what happened.
#[test]
fn metrics_parse_and_count_what_happened() {
    let (m0, m1) = (Mosquitto::start(), Mosquitto::start());
    let brokers = [("m0", &m0), ("m1", &m1)];
    let recorder = RecordingBackend::start();
    let certs = Certs::new();
    let nothing_there = free_port(); // a broker address where nothing listens
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "brokers"

[[listener]]
name = "mqtts"
bind = "127.0.0.1:0"
pool = "brokers"
{tls_toml}
[[listener]]
name = "dead"
bind = "127.0.0.1:0"
pool = "nowhere"

[[listener]]
name = "rec"
bind = "127.0.0.1:0"
pool = "recorded"

[pool.brokers]
backends = [{brokers}]

[pool.nowhere]
backends = [{{ name = "gone", address = "127.0.0.1:{nothing_there}" }}]
backend_attempts = 1

[pool.recorded]
backends = [{{ name = "recorder", address = {recorder} }}]
proxy_protocol = "v2"

[admin]
bind = "127.0.0.1:0"
"#,
        tls_toml = certs.listener_tls_toml("none"),
        brokers = named_backends(&brokers),
        recorder = toml_str(recorder.addr()),
    ));
    let (plain, tls, dead, rec, admin_port) =
        (hm.port("mqtt"), hm.port("mqtts"), hm.port("dead"), hm.port("rec"), hm.admin_port());
    let admin = addr(admin_port);

    // The harness probed every port to see it up: wait until those probes have ended, so that
    // the counts below move only by what this test does.
    let mut before = Scrape::of(&admin);
    assert!(
        wait_until(WAIT, || {
            before = Scrape::of(&admin);
            let accepted = before.sum("harbormaster_connections_accepted_total", &[]);
            accepted > 0.0 && accepted == before.sum("harbormaster_connections_closed_total", &[])
        }),
        "the harness's probe connections never ended"
    );
    let logged_before = hm.connection_logs().len();
    let build = before.matching("harbormaster_build_info", &[]).next().expect("build_info").clone();
    assert_eq!(build.value, 1.0);
    assert_eq!(build.labels["version"], env!("CARGO_PKG_VERSION"));
    assert!(!build.labels["commit"].is_empty());
    assert!(before.sum("harbormaster_config_last_reload_success_timestamp_seconds", &[]) > 1.6e9);
    assert_eq!(before.sum("harbormaster_config_last_reload_successful", &[]), 1.0);
    assert_eq!(before.sum("harbormaster_ready", &[]), 1.0);
    assert_eq!(before.type_of("harbormaster_connection_setup_seconds"), Some("histogram"));

    // Relayed: three plain clients and two over TLS.
    let ids = ["metrics-plain-1", "metrics-plain-2", "metrics-plain-3", "metrics-tls-1", "metrics-tls-2"];
    for id in &ids[..3] {
        MqttClient::plain(plain, MqttVersion::V311).publish_ok(id, "t", "m");
    }
    for id in &ids[3..] {
        MqttClient::tls(tls, MqttVersion::V5, certs.client_tls(false)).publish_ok(id, "t", "m");
    }
    // Refused: no broker reachable (CONNACK 3), not MQTT, an unsupported protocol level
    // (whichever CONNACK code it gets, the metric must name the same), a TLS handshake that is
    // not TLS.
    let out = MqttClient::plain(dead, MqttVersion::V311).publish("metrics-refused", "t", "m");
    assert!(!out.status.success(), "publishing through a pool without brokers succeeded");
    let mut s = TcpStream::connect(("127.0.0.1", plain)).unwrap();
    write_ignoring_errors(&mut s, b"GET / HTTP/1.0\r\n\r\n");
    assert!(mqtt::read_until_close(&mut s, WAIT).1);
    let mut s = TcpStream::connect(("127.0.0.1", plain)).unwrap();
    let opts = ConnectOptions { keep_alive: 60, clean: true, level_override: Some(7), ..Default::default() };
    write_ignoring_errors(&mut s, &mqtt::connect_with(MqttVersion::V311, "metrics-level-7", &opts));
    let (bytes, closed) = mqtt::read_until_close(&mut s, WAIT);
    assert!(closed && bytes.len() >= 4 && bytes[0] == 0x20, "no CONNACK: {}", hex(&bytes));
    let level_7_connack = format!("0x{:02x}", bytes[3]);
    let mut s = TcpStream::connect(("127.0.0.1", tls)).unwrap();
    write_ignoring_errors(&mut s, &mqtt::connect(MqttVersion::V311, "metrics-not-tls"));
    mqtt::read_until_close(&mut s, WAIT);
    // A PROXY v2 header to the recording backend.
    let mut s = TcpStream::connect(("127.0.0.1", rec)).unwrap();
    write_ignoring_errors(&mut s, &mqtt::connect(MqttVersion::V311, "metrics-proxied"));
    assert!(wait_until(WAIT, || recorder.total_bytes() > 0));
    drop(s);

    let ends = logged_before + 5 + 4 + 1;
    assert!(
        wait_until(WAIT, || hm.connection_logs().len() >= ends),
        "expected {ends} connection log lines:\n{}",
        hm.log()
    );
    let after = Scrape::of(&admin);
    let n = |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);

    // Connections by listener and reason.
    assert_eq!(n("harbormaster_connections_accepted_total", &[("listener", "mqtt")]), 5.0);
    assert_eq!(n("harbormaster_connections_accepted_total", &[("listener", "mqtts")]), 3.0);
    assert_eq!(n("harbormaster_connections_accepted_total", &[("listener", "dead")]), 1.0);
    assert_eq!(n("harbormaster_connections_closed_total", &[("listener", "mqtt"), ("reason", "closed")]), 3.0);
    assert_eq!(n("harbormaster_connections_closed_total", &[("listener", "mqtts"), ("reason", "closed")]), 2.0);
    assert_eq!(n("harbormaster_connections_closed_total", &[("listener", "mqtt")]), 5.0);
    assert_eq!(n("harbormaster_connections_active", &[]), 0.0);
    let refused = |listener: &str, reason: &str, connack: &str| {
        n("harbormaster_connections_refused_total", &[("listener", listener), ("reason", reason), ("connack", connack)])
    };
    assert_eq!(refused("dead", "no_broker_available", "0x03"), 1.0);
    assert_eq!(refused("mqtt", "not_connect", "none"), 1.0);
    assert_eq!(refused("mqtt", "unsupported_protocol", &level_7_connack), 1.0);
    assert_eq!(refused("mqtts", "tls_handshake", "none"), 1.0);
    assert_eq!(n("harbormaster_connections_refused_total", &[]), 4.0);

    // TLS, CONNECT, setup.
    assert_eq!(
        n("harbormaster_tls_handshakes_total", &[("listener", "mqtts"), ("outcome", "ok"), ("version", "TLSv1.3")]),
        2.0
    );
    assert_eq!(n("harbormaster_tls_handshakes_total", &[("listener", "mqtts"), ("outcome", "error")]), 1.0);
    assert_eq!(after.type_of("harbormaster_tls_handshake_seconds"), Some("histogram"));
    assert_eq!(n("harbormaster_tls_handshake_seconds_count", &[("listener", "mqtts")]), 2.0);
    assert_eq!(
        n("harbormaster_tls_handshake_seconds_bucket", &[("listener", "mqtts"), ("le", "+Inf")]),
        2.0,
        "the +Inf bucket holds every observation"
    );
    assert_eq!(n("harbormaster_mqtt_connects_total", &[("listener", "mqtt"), ("mqtt_version", "3.1.1")]), 3.0);
    assert_eq!(n("harbormaster_mqtt_connects_total", &[("listener", "mqtts"), ("mqtt_version", "5.0")]), 2.0);
    assert_eq!(n("harbormaster_accept_to_connect_seconds_count", &[("listener", "mqtt")]), 3.0);
    assert_eq!(n("harbormaster_connection_setup_seconds_count", &[]), 6.0, "5 relayed + 1 proxied");

    // Brokers: routed where mosquitto saw the clients; attempts by outcome.
    assert_eq!(n("harbormaster_connections_routed_total", &[("pool", "brokers")]), 5.0);
    for (name, m) in &brokers {
        let seen = ids.iter().filter(|id| m.has_client(id)).count() as f64;
        assert_eq!(n("harbormaster_connections_routed_total", &[("broker", name)]), seen, "{name}");
    }
    assert_eq!(n("harbormaster_broker_connect_attempts_total", &[("pool", "brokers"), ("outcome", "ok")]), 5.0);
    assert_eq!(n("harbormaster_broker_connect_attempts_total", &[("pool", "brokers")]), 5.0);
    assert_eq!(
        n(
            "harbormaster_broker_connect_attempts_total",
            &[("pool", "nowhere"), ("broker", "gone"), ("outcome", "refused")]
        ),
        1.0
    );
    assert_eq!(n("harbormaster_broker_connect_seconds_count", &[("pool", "brokers")]), 5.0);
    assert_eq!(n("harbormaster_failovers_total", &[]), 0.0);
    assert_eq!(after.sum("harbormaster_broker_connections_active", &[("pool", "brokers")]), 0.0);
    assert_eq!(after.type_of("harbormaster_broker_connections_active"), Some("gauge"));

    // Bytes, PROXY headers.
    assert!(n("harbormaster_relayed_bytes_total", &[("listener", "mqtt"), ("direction", "client_to_broker")]) > 0.0);
    // Three CONNACKs of 4 bytes at least came back.
    assert!(n("harbormaster_relayed_bytes_total", &[("listener", "mqtt"), ("direction", "broker_to_client")]) >= 12.0);
    assert_eq!(n("harbormaster_proxy_headers_sent_total", &[("pool", "recorded"), ("version", "v2")]), 1.0);
    assert_eq!(n("harbormaster_proxy_headers_sent_total", &[("pool", "brokers")]), 0.0);

    // No label carries a client-id or an address.
    for s in &after.0 {
        for (k, v) in &s.labels {
            assert!(!v.contains("127.0.0.1") && !v.contains("metrics-"), "{}{{{k}={v:?}}}", s.name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /backends and /route
// ---------------------------------------------------------------------------------------------

/// For a dozen client-ids, /route agrees with `harbormaster route`, and the client really lands
/// there (mosquitto's log); /backends counts them per broker. A stopped broker's client fails
/// over to its second choice, which /backends (last_error) and /metrics (failovers) show.
#[test]
fn backends_and_route_agree_with_the_cli_and_with_mosquitto() {
    let (m0, m1, m2) = (Mosquitto::start(), Mosquitto::start(), Mosquitto::start());
    let mut brokers = [("m0", m0), ("m1", m1), ("m2", m2)];
    let list = brokers.iter().map(|(n, m)| (*n, m)).collect::<Vec<_>>();
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "fleet"

[pool.fleet]
backends = [{list}]

[admin]
bind = "127.0.0.1:0"
"#,
        list = named_backends(&list),
    ));
    let (port, admin_port) = (hm.port("mqtt"), hm.admin_port());
    let admin = addr(admin_port);
    let client = MqttClient::plain(port, MqttVersion::V311);

    let mut ids: Vec<String> = (0..10).map(|i| format!("vehicle-{i:03}")).collect();
    ids.push("fleet/truck 7".into());
    ids.push("sensor-ü+1".into());
    let mut per_broker: BTreeMap<String, u64> = BTreeMap::new();
    for id in &ids {
        let (status, r) = get_json(&admin, &format!("/route?client_id={}", encode(id)));
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["client_id"], id.as_str());
        assert_eq!(r["pool"], "fleet");
        let cli = hm.route(id);
        let preference: Vec<String> =
            r["preference"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        assert_eq!(preference, cli, "/route and `harbormaster route` disagree for {id:?}");
        assert_eq!(r["broker"], cli[0].as_str());
        let (_, with_pool) = get_json(&admin, &format!("/route?pool=fleet&client_id={}", encode(id)));
        assert_eq!(with_pool, r);

        client.publish_ok(id, "t", "m");
        let list = brokers.iter().map(|(n, m)| (*n, m)).collect::<Vec<_>>();
        assert_eq!(landed_on(&list, id), cli[0], "{id:?} did not land where /route said");
        *per_broker.entry(cli[0].clone()).or_default() += 1;
    }
    assert!(per_broker.len() >= 2, "a dozen ids all on one broker: {per_broker:?}");

    let backends = |admin: &str| {
        let (status, v) = get_json(admin, "/backends");
        assert_eq!(status, 200);
        let pools = v["pools"].as_array().unwrap().clone();
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0]["name"], "fleet");
        pools[0]["brokers"].as_array().unwrap().clone()
    };
    assert!(
        wait_until(WAIT, || backends(&admin).iter().all(|b| b["active"] == 0)),
        "connections still active: {:?}",
        backends(&admin)
    );
    for b in backends(&admin) {
        let name = b["identity"].as_str().unwrap();
        let (_, m) = brokers.iter().find(|(n, _)| *n == name).unwrap();
        assert_eq!(b["address"], m.addr().as_str());
        assert_eq!(b["total"], per_broker.get(name).copied().unwrap_or(0), "{b}");
        assert_eq!((b["healthy"].clone(), b["draining"].clone()), (Value::Bool(true), Value::Bool(false)));
        assert_eq!(b["last_error"], Value::Null);
    }

    // Stop the first choice of a fresh id: it lands on its second choice.
    let id = "failover-probe";
    let (_, r) = get_json(&admin, &format!("/route?client_id={id}"));
    let first = r["preference"][0].as_str().unwrap().to_string();
    let second = r["preference"][1].as_str().unwrap().to_string();
    brokers.iter_mut().find(|(n, _)| *n == first).unwrap().1.stop();
    client.publish_ok(id, "t", "m");
    let list = brokers.iter().map(|(n, m)| (*n, m)).collect::<Vec<_>>();
    assert_eq!(landed_on(&list, id), second);
    let stopped = backends(&admin).into_iter().find(|b| b["identity"] == first.as_str()).unwrap();
    let err = stopped["last_error"]["error"].as_str().expect("last_error of the stopped broker");
    assert!(err.to_lowercase().contains("refused"), "{err}");
    let scrape = Scrape::of(&admin);
    assert_eq!(scrape.sum("harbormaster_failovers_total", &[("pool", "fleet")]), 1.0);
    let refused = [("pool", "fleet"), ("broker", first.as_str()), ("outcome", "refused")];
    assert_eq!(scrape.sum("harbormaster_broker_connect_attempts_total", &refused), 1.0);
    // Without health checks the stopped broker stays healthy, so /route still names it first
    // and the data plane keeps trying it first, then fails over.
    let (_, r) = get_json(&admin, &format!("/route?client_id={id}"));
    assert_eq!(
        (r["broker"].as_str().unwrap(), r["candidates"][1].as_str().unwrap()),
        (first.as_str(), second.as_str())
    );

    // Errors are JSON too.
    assert_eq!(get_json(&admin, "/route").0, 400);
    assert_eq!(get_json(&admin, "/route?client_id=x&pool=nope").0, 404);
    assert_eq!(get_json(&admin, "/nope").0, 404);
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

/// Every line of `--log-format json` parses as a JSON object with ts/level/target/msg; the
/// per-connection line has its fields at the top level; flags override the config; nothing
/// secret (a password, the private key) appears.
#[test]
fn json_logs_parse_line_by_line_and_hold_no_secrets() {
    let m = Mosquitto::start();
    let certs = Certs::new();
    let config = format!(
        r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "brokers"

[[listener]]
name = "mqtts"
bind = "127.0.0.1:0"
pool = "brokers"
{tls_toml}
[pool.brokers]
backends = [{{ name = "m0", address = {broker} }}]

[log]
format = "text"
level = "error"

[admin]
bind = "127.0.0.1:0"
"#,
        tls_toml = certs.listener_tls_toml("none"),
        broker = toml_str(m.addr()),
    );
    let mut hm = Spawned::start(&config, &["--log-format", "json", "--log-level", "debug"], &[("RUST_LOG", "error")]);
    let bound = hm.wait_bound(&["mqtt", "mqtts"]);
    let (plain, tls, admin) =
        (port_of(&bound.listeners["mqtt"]), port_of(&bound.listeners["mqtts"]), bound.admin.unwrap());
    wait_ready_status(&admin, 200);

    let password = "s3cr3t-pa55w0rd";
    let mut s = tcp_client(plain);
    let opts = ConnectOptions {
        username: Some("fleet-user".into()),
        password: Some(password.as_bytes().to_vec()),
        keep_alive: 60,
        clean: true,
        level_override: None,
    };
    let ack = mqtt::send_and_read_connack(&mut s, &mqtt::connect_with(MqttVersion::V311, "json-log-1", &opts)).unwrap();
    assert!(mqtt::connack_accepted(&ack), "{ack:?}");
    s.write_all(&mqtt::disconnect()).unwrap();
    mqtt::read_until_close(&mut s, WAIT);
    drop(s);
    MqttClient::tls(tls, MqttVersion::V5, certs.client_tls(false)).publish_ok("json-log-2", "t", "m");
    assert!(
        wait_until(WAIT, || hm.log().matches("\"msg\":\"connection closed\"").count() >= 2),
        "no connection lines:\n{}",
        hm.log()
    );
    hm.stop();

    let log = hm.log();
    let lines: Vec<serde_json::Map<String, Value>> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str(l) {
            Ok(Value::Object(o)) => o,
            other => panic!("not a JSON object ({other:?}): {l}"),
        })
        .collect();
    assert!(lines.len() >= 5, "{log}");
    for l in &lines {
        for k in ["ts", "level", "target", "msg"] {
            assert!(l.get(k).is_some_and(Value::is_string), "{k} missing or not a string: {l:?}");
        }
        let ts = l["ts"].as_str().unwrap();
        assert!(ts.len() == 27 && ts.ends_with('Z') && &ts[10..11] == "T", "{ts}");
        assert!(["error", "warn", "info", "debug", "trace"].contains(&l["level"].as_str().unwrap()), "{l:?}");
        assert!(l["target"] != "log" && !l.contains_key("log.file"), "log-crate events keep their own target: {l:?}");
    }
    let starting = lines.iter().find(|l| l["msg"] == "starting").expect("starting line");
    assert_eq!(starting["log_filter"], "debug");
    assert_eq!(starting["log_filter_from"], "--log-level");
    assert_eq!(starting["version"], env!("CARGO_PKG_VERSION"));

    let conn = |id: &str| {
        lines
            .iter()
            .find(|l| l["msg"] == "connection closed" && l["client_id"] == id)
            .unwrap_or_else(|| panic!("no connection line for {id}:\n{log}"))
    };
    let c = conn("json-log-1");
    assert_eq!(c["target"], "harbormaster::connection");
    assert_eq!(c["listener"], "mqtt");
    assert_eq!(c["broker"], "m0");
    assert_eq!(c["mqtt_version"], "3.1.1");
    assert_eq!(c["close_reason"], "closed");
    assert!(c["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"), "{c:?}");
    assert!(c["conn_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(c["bytes_in"].as_u64().unwrap() > 0 && c["bytes_out"].as_u64().unwrap() >= 4, "{c:?}");
    assert!(c.get("duration").is_some());
    let c = conn("json-log-2");
    assert_eq!(
        (c["listener"].as_str(), c["tls_version"].as_str(), c["sni"].as_str()),
        (Some("mqtts"), Some("TLSv1.3"), Some("localhost"))
    );

    assert!(!log.contains(password), "the password was logged");
    let key = fs::read_to_string(&certs.server_key).unwrap();
    let key_body = key.lines().find(|l| !l.starts_with("-----") && l.len() > 20).unwrap();
    assert!(!log.contains("PRIVATE KEY") && !log.contains(key_body), "key material was logged");
}

/// Without flags, HARBORMASTER_LOG beats RUST_LOG, which beats the config's level; an invalid
/// --log-level is a usage error (exit 64).
#[test]
fn log_filter_precedence_and_bad_flags() {
    let m = Mosquitto::start();
    let config = |admin_port: u16| {
        format!(
            r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "brokers"

[pool.brokers]
backends = [{broker}]

[log]
format = "json"
level = "error"

[admin]
bind = "127.0.0.1:{admin_port}"
"#,
            broker = toml_str(m.addr())
        )
    };
    for (env, want) in [
        (vec![("RUST_LOG", "info")], "RUST_LOG"),
        (vec![("RUST_LOG", "info"), ("HARBORMASTER_LOG", "harbormaster=info")], "HARBORMASTER_LOG"),
    ] {
        // Chosen ahead, as below: at level error the bound addresses are not logged.
        let admin_port = free_port();
        let mut hm = Spawned::start(&config(admin_port), &[], &env);
        wait_ready_status(&addr(admin_port), 200);
        hm.stop();
        let log = hm.log();
        let starting = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["msg"] == "starting")
            .unwrap_or_else(|| panic!("no starting line with {env:?}:\n{log}"));
        assert_eq!(starting["log_filter_from"], want, "{env:?}");
    }
    // The config says error: without overrides, the info lines are gone.
    let admin_port = free_port();
    let mut hm = Spawned::start(&config(admin_port), &[], &[]);
    wait_ready_status(&addr(admin_port), 200);
    hm.stop();
    assert!(!hm.log().contains("\"level\":\"info\""), "{}", hm.log());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hm.toml");
    // It exits on the flag before binding anything.
    fs::write(&path, config(0)).unwrap();
    let out = harbormaster(&["run", "--config", path.to_str().unwrap(), "--log-level", "=nope=["]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--log-level"), "{out:?}");
}

// ---------------------------------------------------------------------------------------------
// Logging never blocks; the admin server survives idle connections
// ---------------------------------------------------------------------------------------------

/// Connections opened by [`refused_flood`] that each end in a refusal and one log line: far
/// more lines than a pipe (64 KiB) and the log queue (1 MiB) hold together.
const FLOOD: usize = 5000;

/// `FLOOD` connections from 4 threads, each sending an HTTP request where a CONNECT belongs
/// (refused as `not_connect`, one log line each) and waiting, bounded, for the close. Stops at
/// the first connection harbormaster does not close within 10 s; returns how many were closed.
fn refused_flood(port: u16) -> usize {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (done, stalled) = (done.clone(), stalled.clone());
            std::thread::spawn(move || {
                let sa: SocketAddr = addr(port).parse().unwrap();
                while !stalled.load(Ordering::Relaxed) && done.fetch_add(1, Ordering::Relaxed) < FLOOD {
                    let closed = TcpStream::connect_timeout(&sa, Duration::from_secs(10)).is_ok_and(|mut s| {
                        s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_ok()
                            && mqtt::read_until_close(&mut s, Duration::from_secs(10)).1
                    });
                    if !closed {
                        stalled.store(true, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    if stalled.load(Ordering::Relaxed) {
        0
    } else {
        FLOOD
    }
}

/// stderr on a pipe that nobody reads: once it is full, log lines are dropped and counted, and
/// nothing else notices. New sessions still reach mosquitto, an established session still gets
/// its PINGRESP, /healthz answers. When the pipe is read at last, every line in it is whole
/// JSON, down to the last line of the drain after SIGTERM.
#[test]
fn a_stderr_nobody_reads_never_stops_the_data_plane() {
    let m = Mosquitto::start();
    // Chosen ahead: nobody reads its log, where the bound addresses would be.
    let (port, admin_port) = (free_port(), free_port());
    let dir = tempfile::Builder::new().prefix("hm-stall-").tempdir().unwrap();
    let config_path = dir.path().join("harbormaster.toml");
    fs::write(&config_path, one_pool_config(port, admin_port, &[("m", &m)], "")).unwrap();
    let mut child = Command::new(harbormaster_bin())
        .args(["run", "--log-format", "json", "--config"])
        .arg(&config_path)
        .env_remove("RUST_LOG")
        .env_remove("HARBORMASTER_LOG")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn harbormaster");
    let _kill = KillOnDrop(child.id());
    // Held, not read, until the end.
    let mut stderr = child.stderr.take().unwrap();
    let admin = addr(admin_port);
    wait_ready_status(&admin, 200);

    let mut held = mqtt_session(port, MqttVersion::V311, "held-through-the-flood");

    let closed = refused_flood(port);
    assert_eq!(closed, FLOOD, "harbormaster stopped closing refused connections: the flood stalled");

    // New sessions, through to mosquitto, by a real client.
    for i in 0..5 {
        MqttClient::plain(port, MqttVersion::V5).publish_ok(&format!("after-flood-{i}"), "t", "m");
    }
    assert!(m.wait_for_client("after-flood-4", 1), "mosquitto never saw the sessions after the flood");
    // The established session is still relayed both ways.
    held.write_all(&mqtt::pingreq()).unwrap();
    let pong = mqtt::read_until_kind(&mut held, 13).expect("no PINGRESP on the established session");
    assert_eq!(pong.bytes(), [0xd0, 0x00]);
    let r = try_http_get(&admin, "/healthz", WAIT).expect("/healthz");
    assert_eq!(r.status, 200, "{r:?}");
    let dropped = Scrape::of(&admin).sum("harbormaster_log_lines_dropped_total", &[]);
    assert!(dropped > 0.0, "no log line was dropped, so the flood proved nothing");

    held.write_all(&mqtt::disconnect()).unwrap();
    drop(held);
    // Read the pipe at last: what was queued comes out. Sessions are made until one's line
    // comes through (the queue has room again), so that the drain's lines are not dropped.
    let read = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let into = read.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        loop {
            match stderr.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => into.lock().unwrap().extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    });
    let mut marker = 0;
    let through = wait_until(WAIT, || {
        marker += 1;
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let id = format!("marker-{marker}");
        let ack = mqtt::connect_and_read_connack(&mut s, MqttVersion::V311, &id).unwrap();
        assert!(mqtt::connack_accepted(&ack), "{ack:?}");
        s.write_all(&mqtt::disconnect()).unwrap();
        mqtt::read_until_close(&mut s, Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(200));
        let text = String::from_utf8_lossy(&read.lock().unwrap()).into_owned();
        text.contains("\"client_id\":\"marker-")
    });
    assert!(through, "no line came through the pipe after the flood");
    send_signal(i64::from(child.id()), "TERM");
    let status = wait_child(&mut child, CMD_TIMEOUT).expect("no exit after SIGTERM");
    assert!(status.success(), "{status:?}");
    reader.join().unwrap().expect("read stderr");
    let out = std::mem::take(&mut *read.lock().unwrap());
    let text = String::from_utf8(out).expect("UTF-8 log");
    assert!(text.ends_with('\n'), "the last line is cut: {:?}", &text[text.len().saturating_sub(200)..]);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a torn or mixed line ({e}): {l}")))
        .collect();
    let refused = lines.iter().filter(|l| l["close_reason"] == "not_connect").count();
    assert!(refused > 1000 && (refused as f64) < FLOOD as f64, "{refused} refusal lines of {FLOOD}, {dropped} dropped");
    assert_eq!(lines.last().unwrap()["msg"], "drained; exiting", "the exit did not flush the log");
    println!("flood of {FLOOD}: {refused} refusal lines written, {dropped} lines dropped (at the scrape)");
}

/// Sends SIGKILL to a process on drop (a test that fails midway leaves nothing running).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        send_signal(i64::from(self.0), "KILL");
    }
}

/// 1,000 TCP connections to the admin port that send nothing or half a request head: /healthz
/// still answers every probe within the kubelet's default timeout (1 s), because at the cap
/// the connection idle longest is closed for the new one.
#[test]
fn healthz_answers_with_a_thousand_idle_admin_connections_open() {
    let _heavy = heavy();
    let m = Mosquitto::start();
    let hm = Harbormaster::start(&one_pool_config(0, 0, &[("m", &m)], ""));
    let admin = hm.admin_addr();
    let sa: SocketAddr = admin.parse().unwrap();
    let mut idle = Vec::new();
    let mut refused = None;
    for i in 0..1000 {
        match TcpStream::connect_timeout(&sa, Duration::from_secs(5)) {
            Ok(mut s) => {
                if i % 4 == 0 {
                    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
                }
                idle.push(s);
            }
            // The admin port takes no more: probe it like that.
            Err(e) => {
                refused = Some(format!("connection {i}: {e}"));
                break;
            }
        }
    }
    // The kubelet's probe: one second to connect and answer.
    let probe = || try_http_get(&admin, "/healthz", Duration::from_secs(1)).map(|r| r.status);
    let mut failed = Vec::new();
    for i in 0..20 {
        match probe() {
            Ok(200) => {}
            other => failed.push((i, format!("{other:?}"))),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(failed.is_empty(), "{} of 20 /healthz probes failed: {failed:?} ({refused:?})", failed.len());
    assert_eq!((idle.len(), refused), (1000, None), "not every idle connection was accepted");
    let scrape = Scrape::of(&admin);
    assert!(scrape.sum("harbormaster_admin_connections_shed_total", &[]) >= 744.0);
    assert!(scrape.sum("harbormaster_admin_connections_active", &[]) <= 256.0);
    assert!(
        wait_until(WAIT, || hm.log().contains("admin connections cut short")),
        "no warning about the shed connections:\n{}",
        hm.log()
    );
    drop(idle);
}
