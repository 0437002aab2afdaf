//! Bad input against the real binary with a real mosquitto behind it: each case has its
//! expected outcome, a `connections_closed_total{reason}` increase (scraped from /metrics) and a
//! `connection closed` log line, while a good client (mosquitto_sub over TLS through the same
//! listener) keeps receiving. After each case the connection counters settle exactly:
//! `connections_active` is back to the connections the test holds open and
//! `accepted - closed = active`. Afterwards the process is alive, /readyz is 200 and its memory
//! is back near its baseline.
//!
//! Decisions this test pins down: a client-id, will topic or username that is not a valid MQTT
//! UTF-8 string is refused by harbormaster itself and never reaches the broker (which would
//! close without a CONNACK: a failed dial that passive health counts against it); duplicated
//! 5.0 properties and a second CONNECT pipelined behind the first are forwarded — the broker
//! decides (when it closes without a byte, that is a failed dial, answered with CONNACK 0x88
//! once no broker is left); CONNECT split into 1-byte TLS records is done with a rustls client that writes one
//! byte per record.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::mqtt::{self, put_varint, MqttVersion};
use crate::support::tls::{client_config, ClientTlsChoice};
use crate::support::*;

/// connect_timeout of the harbormaster under test: silent connections end after it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections that open and never speak.
const IDLE: usize = 5_000;

/// `harbormaster_connections_closed_total{reason=...}`, summed over listeners.
fn closed_metric(admin: u16, reason: &str) -> f64 {
    metric_sum(&addr(admin), "harbormaster_connections_closed_total", &[("reason", reason)])
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

/// A 5.0 CONNECT with raw property bytes (`props_len` as declared) and `client_id`.
fn connect_v5_props(props_len: usize, props: &[u8], client_id: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    put_bytes(&mut body, b"MQTT");
    body.extend_from_slice(&[5, 0x02, 0, 60]);
    put_varint(&mut body, props_len);
    body.extend_from_slice(props);
    put_bytes(&mut body, client_id);
    packet(0x10, &body)
}

/// A 3.1.1 CONNECT with a raw client-id.
fn connect_raw_id(client_id: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    put_bytes(&mut body, b"MQTT");
    body.extend_from_slice(&[4, 0x02, 0, 60]);
    put_bytes(&mut body, client_id);
    packet(0x10, &body)
}

/// A CONNECT of `level` (4 or 5) with a will and a username, all three strings given raw.
fn connect_raw_strings(level: u8, client_id: &[u8], will_topic: &[u8], username: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    put_bytes(&mut body, b"MQTT");
    body.extend_from_slice(&[level, 0x86, 0, 60]);
    if level == 5 {
        body.push(0);
    }
    put_bytes(&mut body, client_id);
    if level == 5 {
        body.push(0);
    }
    put_bytes(&mut body, will_topic);
    put_bytes(&mut body, b"gone");
    put_bytes(&mut body, username);
    packet(0x10, &body)
}

/// Connections mosquitto accepted (its `New connection from` lines).
fn broker_connections(broker: &Mosquitto) -> usize {
    broker.log().matches("New connection from ").count()
}

/// Deterministic noise (xorshift) that does not start like TLS or MQTT.
fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    out[0] = 0xAB;
    out
}

struct Battery {
    hm: Harbormaster,
    admin: u16,
    plain: u16,
    tls: u16,
    proxied: u16,
    untrusted: u16,
    certs: Certs,
}

impl Battery {
    fn count_logs(&self, reason: &str) -> usize {
        self.hm.connection_logs().iter().filter(|m| m.get("close_reason").map(String::as_str) == Some(reason)).count()
    }

    /// Waits (bounded) until the connection counters of /metrics settle: `connections_active`
    /// equals the connections the test holds open (the good subscriber), and
    /// `connections_accepted_total - connections_closed_total = connections_active`.
    fn settled(&self, what: &str) {
        const HELD: f64 = 1.0;
        let mut last = (0.0, 0.0, 0.0);
        let ok = wait_until(WAIT, || {
            let text = metrics_text(&addr(self.admin));
            let accepted = metric_sum_in(&text, "harbormaster_connections_accepted_total", &[]);
            let closed = metric_sum_in(&text, "harbormaster_connections_closed_total", &[]);
            let active = metric_sum_in(&text, "harbormaster_connections_active", &[]);
            last = (accepted, closed, active);
            active == HELD && accepted - closed == active
        });
        let (accepted, closed, active) = last;
        assert!(
            ok,
            "{what}: counters did not settle: accepted {accepted}, closed {closed}, active {active} \
             (held open: {HELD})\n{}",
            self.hm.log()
        );
    }

    /// Runs `case`, then checks the close reason's log lines and metric went up by `n`, and that
    /// the counters settle.
    fn expect(&self, what: &str, reason: &str, n: usize, case: impl FnOnce()) {
        let (logs, metric) = (self.count_logs(reason), closed_metric(self.admin, reason));
        case();
        assert!(
            wait_until(WAIT, || self.count_logs(reason) >= logs + n),
            "{what}: no close_reason={reason} log line\n{}",
            self.hm.log()
        );
        assert!(
            wait_until(WAIT, || closed_metric(self.admin, reason) >= metric + n as f64),
            "{what}: connections_closed_total{{reason={reason:?}}} did not go up"
        );
        self.settled(what);
    }

    /// Sends `bytes` on `port`; returns what came back before harbormaster closed.
    fn exchange(&self, port: u16, bytes: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write_ignoring_errors(&mut s, bytes);
        let (got, closed) = mqtt::read_until_close(&mut s, WAIT);
        assert!(closed, "not closed after {}; got {}", hex(&bytes[..bytes.len().min(16)]), hex(&got));
        got
    }
}

#[test]
fn bad_input_is_refused_cheaply_while_a_good_client_keeps_receiving() {
    let broker = Mosquitto::start();
    let certs = Certs::new();
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
name = "proxied"
bind = "127.0.0.1:0"
pool = "brokers"
accept_proxy = true
trusted_proxies = ["127.0.0.1"]

[[listener]]
name = "untrusted"
bind = "127.0.0.1:0"
pool = "brokers"
accept_proxy = true
trusted_proxies = ["10.0.0.0/8"]

[pool.brokers]
backends = [{{ name = "m0", address = "{broker}" }}]
proxy_protocol = "none"

[limits]
connect_timeout = "{timeout}ms"
max_connect_packet = 1024

[admin]
bind = "127.0.0.1:0"
"#,
        tls_toml = certs.listener_tls_toml("none"),
        broker = broker.addr(),
        timeout = CONNECT_TIMEOUT.as_millis(),
    ));
    let (plain, tls, proxied, untrusted, admin) =
        (hm.port("mqtt"), hm.port("mqtts"), hm.port("proxied"), hm.port("untrusted"), hm.admin_port());
    let b = Battery { hm, admin, plain, tls, proxied, untrusted, certs };
    std::thread::sleep(Duration::from_millis(500));
    let baseline = vm_rss_kib(b.hm.pid());

    // The good client: subscribed over TLS through the same listener for the whole run.
    let good = MqttClient::tls(b.tls, MqttVersion::V311, b.certs.client_tls(false));
    let sub = good.subscribe("good-sub", "battery/good", 1_000);
    assert!(broker.wait_subscribed("good-sub"), "{}", sub.stderr());
    let mut round = 0;
    let mut still_good = |what: &str| {
        round += 1;
        let msg = format!("after {what} ({round})");
        good.publish_ok("good-pub", "battery/good", &msg);
        assert!(sub.wait_for_message(&msg), "the good subscriber missed {msg:?}: {:?}", sub.messages());
    };

    b.expect("random bytes, plain", "not_connect", 1, || {
        assert!(b.exchange(b.plain, &noise(300)).is_empty());
    });
    b.expect("random bytes, TLS", "tls_handshake", 1, || {
        let _ = b.exchange(b.tls, &noise(300));
    });
    still_good("random bytes");

    let http = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n";
    b.expect("HTTP request, plain", "not_connect", 1, || assert!(b.exchange(b.plain, http).is_empty()));
    b.expect("HTTP request, TLS", "tls_handshake", 1, || {
        let _ = b.exchange(b.tls, http);
    });
    still_good("an HTTP request");

    // One handshake record of 64 zero bytes (sixteen empty HelloRequests), five times: each
    // gets a fatal alert and its close is counted and logged.
    let mut zeros = vec![0x16, 0x03, 0x01, 0x00, 0x40];
    zeros.extend([0u8; 64]);
    b.expect("a handshake record of zeros, TLS", "tls_handshake", 5, || {
        for _ in 0..5 {
            let got = b.exchange(b.tls, &zeros);
            assert_eq!(got.len(), 7, "one alert record expected: {}", hex(&got));
            assert_eq!(got[0], 0x15, "an alert record expected: {}", hex(&got));
        }
    });
    still_good("handshake records of zeros");

    // A real ClientHello, cut in half: the handshake deadline closes it.
    b.expect("half a ClientHello", "connect_timeout", 1, || {
        let cfg = client_config(&b.certs, false, ClientTlsChoice::Default);
        let mut conn = rustls::ClientConnection::new(cfg, support::tls::server_name("localhost")).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        assert!(hello.len() > 100 && hello[0] == 0x16);
        let got = b.exchange(b.tls, &hello[..hello.len() / 2]);
        assert!(got.is_empty(), "{}", hex(&got));
    });
    still_good("half a ClientHello");

    // A complete handshake, then nothing: slowloris.
    b.expect("handshake then silence", "connect_timeout", 1, || {
        let cfg = client_config(&b.certs, false, ClientTlsChoice::Default);
        let mut s = support::tls::connect_tls(b.tls, "localhost", cfg, None).unwrap();
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "expected a close, got {}", hex(&buf[..n]));
    });
    still_good("slowloris");

    // A CONNECT trickled at 1 byte per second: the deadline covers the handshake and the whole
    // CONNECT, so it ends at connect_timeout however steadily bytes arrive.
    b.expect("CONNECT at 1 byte per second", "connect_timeout", 1, || {
        let cfg = client_config(&b.certs, false, ClientTlsChoice::Default);
        let mut s = support::tls::connect_tls(b.tls, "localhost", cfg, None).unwrap();
        let connect = mqtt::connect(MqttVersion::V311, "trickle");
        s.sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut sent = 0;
        let closed = connect.iter().any(|byte| {
            s.conn.writer().write_all(std::slice::from_ref(byte)).unwrap();
            let wrote = s.conn.write_tls(&mut s.sock).is_ok();
            sent += 1;
            // Waits a second for the close (EOF or reset); a timeout means "still open, next
            // byte". Bytes before it (session tickets, a close_notify) are not the answer.
            let mut buf = [0u8; 512];
            let closed = loop {
                match s.sock.read(&mut buf) {
                    Ok(0) => break true,
                    Ok(_) => continue,
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        break false
                    }
                    Err(_) => break true,
                }
            };
            !wrote || closed
        });
        assert!(closed, "still open after the whole CONNECT was trickled");
        assert!(sent < connect.len(), "closed only after all {sent} bytes");
    });
    still_good("a CONNECT at 1 byte per second");

    // CONNECT in 1-byte TLS records: reassembled, forwarded, answered by the broker.
    {
        let cfg = client_config(&b.certs, false, ClientTlsChoice::Default);
        let mut s = support::tls::connect_tls(b.tls, "localhost", cfg, None).unwrap();
        let connect = mqtt::connect(MqttVersion::V311, "one-byte-records");
        for byte in &connect {
            s.conn.writer().write_all(std::slice::from_ref(byte)).unwrap();
            while s.conn.wants_write() {
                s.conn.write_tls(&mut s.sock).unwrap();
            }
        }
        let connack = mqtt::read_packet(&mut s).unwrap().expect("CONNACK");
        assert_eq!(connack.bytes(), [0x20, 2, 0, 0]);
        assert!(broker.wait_for_client("one-byte-records", 1));
    }
    still_good("1-byte TLS records");
    b.settled("1-byte TLS records");

    b.expect("remaining length over the limit", "connect_too_large", 1, || {
        assert!(b.exchange(b.plain, &[0x10, 0xFF, 0x7F]).is_empty(), "3.x/unknown version: no CONNACK");
    });
    b.expect("5-byte remaining length", "malformed_connect", 1, || {
        assert!(b.exchange(b.plain, &[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]).is_empty());
    });
    b.expect("5.0 CONNECT with truncated properties", "malformed_connect", 1, || {
        // Session expiry interval (0x11) needs 4 bytes; the property list says 5, has 2.
        let got = b.exchange(b.plain, &connect_v5_props(5, &[0x11, 0x00], b"")[..]);
        assert_eq!(got, [0x20, 3, 0, 0x81, 0], "{}", hex(&got));
    });
    b.expect("PUBLISH first", "not_connect", 1, || {
        assert!(b.exchange(b.plain, &mqtt::publish_qos0(MqttVersion::V311, "t", b"x")).is_empty());
    });
    b.expect("PROXY header where none is expected", "not_connect", 1, || {
        let hdr = b"PROXY TCP4 10.1.2.3 127.0.0.1 5555 1883\r\n";
        assert!(b.exchange(b.plain, hdr).is_empty());
    });
    b.expect("no PROXY header where one is expected", "bad_proxy_header", 1, || {
        assert!(b.exchange(b.proxied, &mqtt::connect(MqttVersion::V311, "no-header")).is_empty());
    });
    b.expect("PROXY header from an untrusted address", "untrusted_proxy", 1, || {
        let mut bytes = b"PROXY TCP4 10.1.2.3 127.0.0.1 5555 1883\r\n".to_vec();
        bytes.extend(mqtt::connect(MqttVersion::V311, "untrusted"));
        assert!(b.exchange(b.untrusted, &bytes).is_empty());
    });
    still_good("malformed packets and PROXY headers");

    // Strings that are not valid MQTT UTF-8 strings: refused by harbormaster with the
    // version's answer, and the broker never sees a connection (no health test probes here).
    let before = broker_connections(&broker);
    let no_connack: &[u8] = &[];
    for (what, bytes, answer) in [
        ("3.1.1 client-id not UTF-8", connect_raw_id(b"bad-utf8-\xC3\x28"), &[0x20, 2, 0, 2][..]),
        ("3.1.1 client-id with U+0000", connect_raw_id(b"nul-\0-id"), &[0x20, 2, 0, 2]),
        ("3.1.1 will topic not UTF-8", connect_raw_strings(4, b"will-bad", b"t/\xFF", b"u"), no_connack),
        ("3.1.1 username with U+0000", connect_raw_strings(4, b"user-bad", b"t/x", b"u\0"), no_connack),
        ("5.0 client-id not UTF-8", connect_raw_strings(5, b"\xED\xA0\x80", b"t/x", b"u"), &[0x20, 3, 0, 0x85, 0]),
        ("5.0 will topic with U+0000", connect_raw_strings(5, b"will-nul", b"t/\0", b"u"), &[0x20, 3, 0, 0x81, 0]),
        ("5.0 username not UTF-8", connect_raw_strings(5, b"user-bad5", b"t/x", b"\xC0\x80"), &[0x20, 3, 0, 0x81, 0]),
    ] {
        b.expect(what, "malformed_connect", 1, || {
            let got = b.exchange(b.plain, &bytes);
            assert_eq!(got, answer, "{what}: {}", hex(&got));
        });
    }
    let lines = b.hm.connection_logs();
    for field in ["client identifier", "will topic", "username"] {
        let named = lines.iter().any(|m| {
            m.get("close_reason").map(String::as_str) == Some("malformed_connect")
                && m.get("detail").is_some_and(|d| d.contains(field))
                && m.get("broker").is_none_or(String::is_empty)
        });
        assert!(named, "no malformed_connect line naming the {field}\n{}", b.hm.log());
    }
    assert_eq!(broker_connections(&broker), before, "the broker saw a connection:\n{}", broker.log());
    still_good("strings that are not valid MQTT UTF-8 strings");

    // Forwarded; the broker decides. Mosquitto closes each of these connections itself.
    for (what, bytes, id_prefix) in [
        (
            "duplicated 5.0 properties",
            connect_v5_props(10, &[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2], b"dup-props"),
            "dup-props",
        ),
        (
            "a second CONNECT pipelined",
            [mqtt::connect(MqttVersion::V311, "pipelined"), mqtt::connect(MqttVersion::V311, "pipelined")].concat(),
            "pipelined",
        ),
    ] {
        let _ = b.exchange(b.plain, &bytes);
        let mut line = None;
        wait_until(WAIT, || {
            line =
                b.hm.connection_logs()
                    .into_iter()
                    .find(|m| m.get("client_id").is_some_and(|c| c.starts_with(id_prefix)));
            line.is_some()
        });
        let line = line.unwrap_or_else(|| panic!("{what}: no log line\n{}", b.hm.log()));
        // Mosquitto closes on duplicated 5.0 properties without a CONNACK: a close before the
        // broker's first byte is a failed dial (the only broker: no_broker_available). This is
        // the documented limit of passive health: harbormaster does not read property lists.
        let forwarded = line.get("broker").map(String::as_str) == Some("m0")
            || line.get("detail").is_some_and(|d| d.starts_with("m0: closed the connection before answering CONNECT"));
        assert!(forwarded, "{what}: not forwarded: {line:?}");
    }
    still_good("input the broker decides on");
    b.settled("input the broker decides on");

    // Connections that open and never speak: each ends at connect_timeout, the good client is
    // served meanwhile, and the memory they held is returned.
    let mut idle: Vec<TcpStream> = Vec::new();
    b.expect("idle connections", "connect_timeout", IDLE, || {
        idle = (0..IDLE)
            .map(|i| {
                let port = if i % 2 == 0 { b.tls } else { b.plain };
                TcpStream::connect(("127.0.0.1", port)).unwrap()
            })
            .collect();
        still_good("5,000 idle connections opened");
    });
    drop(idle);
    still_good("5,000 idle connections closed");
    b.settled("5,000 idle connections closed");

    let state = std::fs::read_to_string(format!("/proc/{}/status", b.hm.pid())).unwrap_or_default();
    let state = state.lines().find(|l| l.starts_with("State:")).unwrap_or("").to_string();
    assert!(!state.is_empty() && !state.contains('Z'), "harbormaster is not running: {state:?}");
    assert_eq!(http_get(&addr(b.admin), "/readyz").0, 200);
    // Memory back near its baseline: allocators keep some, so the bound is generous.
    let mut rss = 0;
    let back = wait_until(WAIT, || {
        rss = vm_rss_kib(b.hm.pid());
        rss < baseline + 64 * 1024
    });
    assert!(back, "VmRSS {rss} KiB, baseline {baseline} KiB");
}
