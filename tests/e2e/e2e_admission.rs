//! Admission control against the real binary: connection limits (global and per listener)
//! close new connections at accept, the handshake queue and the per-source rate close them
//! before any TLS work, and a flapping client-id gets a CONNACK "connection rate exceeded".
//! Every refusal shows in `connections_refused_total` and in the connection's log line, and
//! the accept loop keeps serving afterwards. The backend is a test-owned recording server.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::mqtt::{self, MqttVersion};
use crate::support::*;

/// `GET /metrics` on the admin server: the sum of `harbormaster_connections_refused_total` samples whose
/// `reason` label is `reason`.
fn refused(admin: u16, reason: &str) -> f64 {
    metric_sum(&addr(admin), "harbormaster_connections_refused_total", &[("reason", reason)])
}

/// Whether harbormaster closes `s` without a byte (EOF or reset) within the wait.
fn closed_without_a_byte(s: &mut TcpStream) -> bool {
    let (got, closed) = mqtt::read_until_close(s, WAIT);
    closed && got.is_empty()
}

/// Whether `s` is still open after a short look (nothing to read, no EOF).
fn still_open(s: &mut TcpStream) -> bool {
    let (got, closed) = mqtt::read_until_close(s, Duration::from_millis(300));
    !closed && got.is_empty()
}

fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).unwrap()
}

#[test]
fn connection_limits_close_new_connections_at_accept_and_the_loop_keeps_serving() {
    let backend = RecordingBackend::start();
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "a"
bind = "127.0.0.1:0"
pool = "brokers"
max_connections = 2

[[listener]]
name = "b"
bind = "127.0.0.1:0"
pool = "brokers"

[pool.brokers]
backends = ["{backend}"]
proxy_protocol = "none"

[limits]
connect_timeout = "60s"
max_connections = 3

[admin]
bind = "127.0.0.1:0"
"#,
        backend = backend.addr()
    ));
    let (a, b, admin) = (hm.port("a"), hm.port("b"), hm.admin_port());
    // Let the start-up probes' connections end: they count against the limits until then.
    std::thread::sleep(Duration::from_millis(500));

    // Listener a holds 2: the third is closed at once, the first two stay.
    let mut held_a: Vec<TcpStream> = (0..2).map(|_| connect(a)).collect();
    let mut over_a = connect(a);
    assert!(closed_without_a_byte(&mut over_a), "the third connection on listener a was not closed");
    for s in &mut held_a {
        assert!(still_open(s), "a connection within the limit was closed");
    }
    let line = hm.wait_connection_log("close_reason", "listener_max_connections").expect("no log line");
    assert_eq!(line.get("listener").map(String::as_str), Some("a"), "{line:?}");

    // The process holds 3: one more on b fits, the next does not.
    let mut held_b = connect(b);
    let mut over_b = connect(b);
    assert!(closed_without_a_byte(&mut over_b), "the fourth connection of the process was not closed");
    assert!(still_open(&mut held_b));
    hm.wait_connection_log("close_reason", "max_connections").expect("no log line");
    assert!(
        wait_until(WAIT, || refused(admin, "listener_max_connections") >= 1.0),
        "listener_max_connections: {}",
        refused(admin, "listener_max_connections")
    );
    assert!(
        wait_until(WAIT, || refused(admin, "max_connections") >= 1.0),
        "max_connections: {}",
        refused(admin, "max_connections")
    );

    // Room again once one ends: a valid CONNECT then reaches the broker.
    drop(held_a.pop());
    let connect_packet = mqtt::connect(MqttVersion::V311, "after-the-limit");
    let reached = wait_until(WAIT, || {
        let mut s = connect(a);
        write_ignoring_errors(&mut s, &connect_packet);
        let before = backend.total_bytes();
        let ok = wait_until(Duration::from_secs(2), || backend.total_bytes() > before);
        // The backend's CONNACK came back through, and the connection stays.
        let (got, closed) = mqtt::read_until_close(&mut s, Duration::from_millis(300));
        ok && got == [0x20, 2, 0, 0] && !closed
    });
    assert!(reached, "after a connection ended, a new one was never served:\n{}", hm.log());
}

#[test]
fn per_source_rate_closes_the_excess_of_one_address() {
    let backend = RecordingBackend::start();
    let limits = "\n[limits]\nconnect_timeout = \"60s\"\nper_source_rate = 1\nper_source_burst = 2\n";
    let pool = one_pool_config(0, 0, &[("b", backend.addr())], "proxy_protocol = \"none\"");
    let hm = Harbormaster::start(&(pool + limits));
    let (port, admin) = (hm.port("mqtt"), hm.admin_port());
    // A burst of 2 then 1 per second: of 10 back-to-back connections, most are closed.
    let mut conns: Vec<TcpStream> = (0..10).map(|_| connect(port)).collect();
    let closed = conns.iter_mut().map(closed_without_a_byte_quickly).filter(|c| *c).count();
    // The start-up probe of the port took a token too.
    assert!((5..=9).contains(&closed), "{closed} of 10 closed");
    let line = hm.wait_connection_log("close_reason", "per_source_rate").expect("no log line");
    assert_eq!(line.get("client_addr").map(|a| a.starts_with("127.0.0.1:")), Some(true), "{line:?}");
    assert!(
        wait_until(WAIT, || refused(admin, "per_source_rate") >= 5.0),
        "per_source_rate: {}",
        refused(admin, "per_source_rate")
    );
}

/// Closed within a short look (the refused ones are closed at once).
fn closed_without_a_byte_quickly(s: &mut TcpStream) -> bool {
    let (got, closed) = mqtt::read_until_close(s, Duration::from_millis(500));
    closed && got.is_empty()
}

#[test]
fn handshakes_over_the_rate_wait_in_a_bounded_queue_and_the_rest_is_closed_before_tls() {
    let backend = RecordingBackend::start();
    let certs = Certs::new();
    // A TLS listener with these `[limits]`, three connections at once: how many are closed
    // without a TLS byte, and the close reason logged and counted.
    let run = |limits: &str, closed_range: std::ops::RangeInclusive<usize>, reason: &str| {
        let hm = Harbormaster::start(&format!(
            r#"
[[listener]]
name = "mqtts"
bind = "127.0.0.1:0"
pool = "brokers"
{tls}
[pool.brokers]
backends = ["{backend}"]

[limits]
{limits}

[admin]
bind = "127.0.0.1:0"
"#,
            tls = certs.listener_tls_toml("none"),
            backend = backend.addr()
        ));
        let (port, admin) = (hm.port("mqtts"), hm.admin_port());
        let mut conns: Vec<TcpStream> = (0..3).map(|_| connect(port)).collect();
        let closed = conns.iter_mut().map(closed_without_a_byte_quickly).filter(|c| *c).count();
        assert!(closed_range.contains(&closed), "{reason}: {closed} closed\n{}", hm.log());
        hm.wait_connection_log("close_reason", reason).expect("no log line");
        assert!(wait_until(WAIT, || refused(admin, reason) >= 1.0), "{reason}: {}", refused(admin, reason));
    };
    // One gets a token at once (unless the start-up probe's handshake took it), one waits
    // about a second in the queue, and for the rest the queue (of 1) is full: closed at once
    // without a TLS byte. Which is which is up to the order the runtime runs their tasks in.
    run(
        "connect_timeout = \"60s\"\nhandshake_rate = 1\nhandshake_queue = 1\nhandshake_queue_timeout = \"30s\"",
        1..=2,
        "handshake_queue_full",
    );
    // With a queue deadline shorter than the wait, excess is closed at once too.
    run(
        "handshake_rate = 1\nhandshake_queue = 100\nhandshake_queue_timeout = \"100ms\"",
        2..=3,
        "handshake_queue_timeout",
    );
}

#[test]
fn a_flapping_client_id_gets_connection_rate_exceeded() {
    let backend = RecordingBackend::start();
    let limits = "\n[limits]\nflapping = { max_connects = 2, window = \"10m\", ban = \"10m\" }\n";
    let pool = one_pool_config(0, 0, &[("b", backend.addr())], "proxy_protocol = \"none\"");
    let hm = Harbormaster::start(&(pool + limits));
    let (port, admin) = (hm.port("mqtt"), hm.admin_port());
    for (version, id, want) in [
        (MqttVersion::V311, "flappy-311", vec![0x20, 2, 0, 3]),
        (MqttVersion::V31, "flappy-31", vec![0x20, 2, 0, 3]),
        (MqttVersion::V5, "flappy-5", vec![0x20, 3, 0, 0x9F, 0]),
    ] {
        let packet = mqtt::connect(version, id);
        for _ in 0..2 {
            let before = backend.total_bytes();
            let mut s = connect(port);
            s.write_all(&packet).unwrap();
            assert!(wait_until(WAIT, || backend.total_bytes() >= before + packet.len()), "{id}: not forwarded");
        }
        let mut s = connect(port);
        let before = backend.total_bytes();
        s.write_all(&packet).unwrap();
        let started = Instant::now();
        let (got, closed) = mqtt::read_until_close(&mut s, WAIT);
        assert!(closed && started.elapsed() < WAIT, "{id}: not closed");
        assert_eq!(got, want, "{id}: {}", hex(&got));
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(backend.total_bytes(), before, "{id}: the refused CONNECT reached the broker");
    }
    let line = hm.wait_connection_log("close_reason", "flapping").expect("no log line");
    assert!(line.get("client_id").is_some_and(|c| c.starts_with("flappy-")), "{line:?}");
    assert!(wait_until(WAIT, || refused(admin, "flapping") >= 3.0), "flapping: {}", refused(admin, "flapping"));
    // Another id is unaffected.
    let packet = mqtt::connect(MqttVersion::V311, "steady");
    let before = backend.total_bytes();
    let mut s = connect(port);
    s.write_all(&packet).unwrap();
    assert!(wait_until(WAIT, || backend.total_bytes() >= before + packet.len()));
}

/// Flapping is counted per listener and verified client certificate: a flood of CONNECTs
/// carrying a device's client-id on a plain listener bans only that listener's unauthenticated
/// CONNECTs, and the device, presenting its certificate on the mTLS listener, still connects
/// (mosquitto_pub, through to a real mosquitto). The device itself, reconnecting in a loop
/// with its certificate, is still banned.
#[test]
fn unauthenticated_connects_cannot_get_a_device_with_a_certificate_refused() {
    let broker = Mosquitto::start();
    let certs = Certs::with_client_cn("victim");
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
{tls}
[pool.brokers]
backends = [{backends}]
proxy_protocol = "none"

[limits]
flapping = {{ max_connects = 3, window = "10m", ban = "10m" }}

[admin]
bind = "127.0.0.1:0"
"#,
        tls = certs.listener_tls_toml("required"),
        backends = named_backends(&[("m", &broker)])
    ));
    let (plain, mtls, admin) = (hm.port("mqtt"), hm.port("mqtts"), hm.admin_port());

    // 20 CONNECTs with the device's client-id, no certificate: the first 3 reach the
    // broker, the rest are refused (their key space is banned).
    let mut codes = Vec::new();
    for _ in 0..20 {
        let mut s = connect(plain);
        s.set_read_timeout(Some(WAIT)).unwrap();
        codes.push(mqtt::connect_and_read_connack(&mut s, MqttVersion::V311, "victim").unwrap());
    }
    let accepted = [0x20, 2, 0, 0].to_vec();
    let refused_rc3 = [0x20, 2, 0, 3].to_vec();
    assert_eq!(codes[..3], [accepted.clone(), accepted.clone(), accepted], "{codes:?}");
    assert!(codes[3..].iter().all(|c| *c == refused_rc3), "{codes:?}");
    assert!(wait_until(WAIT, || refused(admin, "flapping") >= 17.0), "flapping: {}", refused(admin, "flapping"));
    let line = hm.wait_connection_log("close_reason", "flapping").expect("no log line");
    assert_eq!(line.get("listener").map(String::as_str), Some("mqtt"), "{line:?}");
    assert!(line.get("detail").is_some_and(|d| d.contains("without a client certificate")), "{line:?}");
    let before = broker.connection_count("victim");
    assert_eq!(before, 3);

    // The device with its certificate: not affected. It may connect up to the limit ...
    let device = MqttClient::tls(mtls, MqttVersion::V311, certs.client_tls(true));
    for n in 1..=3 {
        device.publish_ok("victim", "t", "hello");
        assert!(broker.wait_for_client("victim", before + n), "connection {n} of the device did not reach the broker");
    }
    // ... and reconnecting in a loop, it is banned too: CONNACK 3 to mosquitto_pub.
    let out = device.publish("victim", "t", "hello");
    assert!(!out.status.success(), "the flapping device was not refused: {}", output_text(&out));
    assert!(output_text(&out).contains("unavailable"), "{}", output_text(&out));
    let mut line = None;
    wait_until(WAIT, || {
        line = hm.connection_logs().into_iter().find(|l| {
            l.get("close_reason").map(String::as_str) == Some("flapping")
                && l.get("listener").map(String::as_str) == Some("mqtts")
        });
        line.is_some()
    });
    let line = line.unwrap_or_else(|| panic!("no flapping line for mqtts:\n{}", hm.log()));
    assert!(line.get("detail").is_some_and(|d| d.contains("with this client certificate")), "{line:?}");
    assert_eq!(broker.connection_count("victim"), before + 3, "the refused CONNECT reached the broker");
}
