//! MQTT over WebSocket on the same port as raw MQTT, against real mosquitto brokers: paho-mqtt
//! (`transport="websockets"`, plain and TLS) and MQTT.js (`wss://`) publish and receive through
//! harbormaster; a WebSocket client lands on the broker a raw MQTT client of the same client-id
//! lands on; headless Chromium runs MQTT.js's browser bundle over `wss://`; a battery of bad
//! input (upgrade requests and frames), each with its answer,
//! its metric and its log line, while a live WebSocket session carries on untouched.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::mqtt::{self, MqttVersion};
use crate::support::tls;
use crate::support::*;

/// A paho-mqtt client over WebSocket: connects, subscribes to its topic, publishes to it and
/// prints `received PAYLOAD` once the message came back, then disconnects.
const PAHO_WS_PY: &str = r#"
import sys, ssl
import paho.mqtt.client as mqtt

port, cid, topic, ca = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, transport="websockets", protocol=mqtt.MQTTv311)
# Credentials a broker's own WebSocket listener may read: passed on by harbormaster.
c.ws_set_options(path="/mqtt", headers={"Cookie": "session=abc", "Authorization": "Bearer t0ken"})
if ca != "-":
    c.tls_set(ca_certs=ca)

def on_connect(client, userdata, flags, rc, props):
    print("connected", getattr(rc, "value", rc), flush=True)
    client.subscribe(topic, qos=1)

def on_subscribe(client, userdata, mid, rcs, props):
    client.publish(topic, b"hello from " + cid.encode(), qos=1)

def on_message(client, userdata, msg):
    print("received", msg.payload.decode(), flush=True)
    client.disconnect()

c.on_connect = on_connect
c.on_subscribe = on_subscribe
c.on_message = on_message
c.connect("localhost", port, keepalive=30)
c.loop_forever(retry_first_connection=False)
"#;

fn paho_ws(dir: &Path, port: u16, client_id: &str, ca: Option<&Path>) -> String {
    let ok = Command::new("python3").args(["-c", "import paho.mqtt.client"]).status().map(|s| s.success());
    assert!(matches!(ok, Ok(true)), "python3 with paho-mqtt 2.x is needed (scripts/test installs it)");
    let script = dir.join("paho_ws.py");
    std::fs::write(&script, PAHO_WS_PY).unwrap();
    let ca = ca.map(|p| p.to_str().unwrap().to_string()).unwrap_or_else(|| "-".into());
    let topic = format!("ws/{client_id}");
    let out = run_with_timeout(
        Command::new("python3").arg(&script).args([&port.to_string(), client_id, &topic, &ca]),
        CMD_TIMEOUT,
    );
    output_text(&out)
}

/// tests/node, where scripts/test installs MQTT.js (`npm ci`).
fn node_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    assert!(
        dir.join("node_modules/mqtt/package.json").exists(),
        "MQTT.js is needed in tests/node/node_modules (scripts/test runs `npm ci` there)"
    );
    require_program("node");
    dir
}

/// Starts `n` mosquitto brokers and harbormaster with a plain listener "ws" and a TLS
/// listener "wss" (ALPN `mqtt` and `http/1.1`), both with WebSocket, for one pool.
struct Setup {
    brokers: Vec<Mosquitto>,
    certs: Certs,
    hm: Harbormaster,
}

impl Setup {
    fn start(n: usize, listener_extra: &str, pool_extra: &str) -> Setup {
        let brokers = Mosquitto::start_n(n);
        let certs = Certs::new();
        let config = format!(
            r#"
[[listener]]
name = "ws"
bind = "127.0.0.1:0"
pool = "brokers"
websocket = {{ path = "/mqtt"{listener_extra} }}

[[listener]]
name = "wss"
bind = "127.0.0.1:0"
pool = "brokers"
websocket = {{ path = "/mqtt" }}
{tls}alpn = ["mqtt", "http/1.1"]

[pool.brokers]
backends = [{backends}]
proxy_protocol = "none"
{pool_extra}

[limits]
connect_timeout = "3s"

[admin]
bind = "127.0.0.1:0"
"#,
            tls = certs.listener_tls_toml("none"),
            backends = numbered_backends("m", &brokers),
        );
        let hm = Harbormaster::start(&config);
        Setup { brokers, certs, hm }
    }

    fn named(&self) -> Vec<(String, &Mosquitto)> {
        self.brokers.iter().enumerate().map(|(i, b)| (format!("m{i}"), b)).collect()
    }

    /// The broker `client_id` connected to, and how many times.
    fn landed(&self, client_id: &str, times: usize) -> String {
        let mut found = Vec::new();
        wait_until(WAIT, || {
            found = self
                .named()
                .into_iter()
                .filter(|(_, m)| m.connection_count(client_id) > 0)
                .map(|(n, m)| (n, m.connection_count(client_id)))
                .collect();
            found.iter().map(|(_, c)| c).sum::<usize>() >= times
        });
        assert_eq!(found.len(), 1, "{client_id:?} connected to {found:?}");
        assert_eq!(found[0].1, times, "{client_id:?}: {found:?}");
        found[0].0.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal WebSocket client for the bad-input battery
// ---------------------------------------------------------------------------------------------

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n{extra}\r\n"
    )
}

fn dial(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Reads the HTTP response head (up to the blank line) byte by byte.
fn read_head(s: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A masked client frame.
fn frame(op: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![if fin { 0x80 } else { 0 } | op];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one server frame: (opcode, payload); None at EOF.
fn read_frame(s: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).ok()?;
    assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).ok()?;
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).ok()?;
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).ok()?;
    Some((h[0] & 0x0f, p))
}

/// A WebSocket session through harbormaster: upgraded, CONNECT sent in frames, CONNACK read.
fn ws_session(port: u16, client_id: &str) -> TcpStream {
    let mut s = dial(port);
    s.write_all(upgrade_request("/mqtt", "").as_bytes()).unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{head}");
    assert!(head.contains("Sec-WebSocket-Protocol: mqtt\r\n"), "{head}");
    // The CONNECT split over two frames with a ping between them.
    let connect = mqtt::connect(MqttVersion::V311, client_id);
    let mut wire = frame(0x2, false, &connect[..3]);
    wire.extend(frame(0x9, true, b"are you there"));
    wire.extend(frame(0x0, true, &connect[3..]));
    s.write_all(&wire).unwrap();
    assert_eq!(read_frame(&mut s), Some((0xA, b"are you there".to_vec())), "the pong");
    let (op, connack) = read_frame(&mut s).expect("CONNACK frame");
    assert_eq!(op, 0x2);
    assert!(mqtt::connack_accepted(&connack), "{connack:?}");
    s
}

/// PINGREQ in a frame, PINGRESP back in one: the session is alive.
fn ping(s: &mut TcpStream) {
    s.write_all(&frame(0x2, true, &mqtt::pingreq())).unwrap();
    let (op, p) = read_frame(s).expect("PINGRESP frame");
    assert_eq!((op, p), (0x2, vec![0xd0, 0x00]));
}

/// Everything the server sends until it closes the connection.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// paho-mqtt over WebSocket, plain and TLS, publishes and receives through harbormaster;
/// raw MQTT clients with the same client-ids, on the same ports, land on the same brokers.
#[test]
fn paho_over_websocket_and_raw_mqtt_share_the_port_and_the_broker() {
    let s = Setup::start(3, "", "");
    let dir = tempfile::tempdir().unwrap();
    for (listener, ca) in [("ws", None), ("wss", Some(s.certs.ca.as_path()))] {
        let port = s.hm.port(listener);
        for i in 0..4 {
            let cid = format!("paho-{listener}-{i}");
            let out = paho_ws(dir.path(), port, &cid, ca);
            assert!(out.contains("connected 0"), "{cid}: {out}");
            assert!(out.contains(&format!("received hello from {cid}")), "{cid}: {out}");
            let ws_broker = s.landed(&cid, 1);
            // The same client-id in raw MQTT, on the same port.
            if ca.is_none() {
                let (mut raw, ack) = mqtt_connect(port, MqttVersion::V311, &cid);
                assert!(mqtt::connack_accepted(&ack));
                raw.write_all(&mqtt::disconnect()).unwrap();
            } else {
                let cfg = tls::client_config(&s.certs, false, tls::ClientTlsChoice::Default);
                let mut t = tls::connect_tls(port, "localhost", cfg, None).unwrap();
                let ack = mqtt::connect_and_read_connack(&mut t, MqttVersion::V311, &cid).unwrap();
                assert!(mqtt::connack_accepted(&ack));
                let _ = t.write_all(&mqtt::disconnect());
            }
            assert_eq!(s.landed(&cid, 2), ws_broker, "{cid}: raw MQTT and WebSocket on one broker");
        }
    }
    let admin = s.hm.admin_addr();
    for listener in ["ws", "wss"] {
        let ok =
            metric_sum(&admin, "harbormaster_websocket_upgrades_total", &[("listener", listener), ("outcome", "ok")]);
        assert_eq!(ok, 4.0, "{listener}");
    }
    let line = s.hm.wait_connection_log("client_id", "paho-wss-0").expect("log line");
    assert_eq!(line["transport"], "websocket", "{line:?}");
    assert_eq!(line["tls_version"], "TLSv1.3", "{line:?}");
    let logs = s.hm.connection_logs();
    assert!(
        logs.iter().any(|l| l.get("client_id").map(String::as_str) == Some("paho-ws-0") && l["transport"] == "mqtt"),
        "the raw MQTT connection says so: {logs:?}"
    );
}

/// MQTT.js (Node) over `wss://` publishes and receives through harbormaster, and lands where
/// a raw MQTT client of its client-id does.
#[test]
fn mqtt_js_over_wss_publishes_and_receives() {
    let node = node_dir();
    let s = Setup::start(2, "", "");
    let port = s.hm.port("wss");
    let script = r#"
const mqtt = require("mqtt");
const fs = require("fs");
const [url, cid, ca] = process.argv.slice(2);
const c = mqtt.connect(url, { clientId: cid, ca: fs.readFileSync(ca), protocolVersion: 4, reconnectPeriod: 0 });
const topic = "js/" + cid;
c.on("connect", () => {
  console.log("connected");
  c.subscribe(topic, { qos: 1 }, () => c.publish(topic, "hello from " + cid, { qos: 1 }));
});
c.on("message", (t, m) => { console.log("received " + m.toString()); c.end(() => process.exit(0)); });
c.on("error", (e) => { console.log("error " + e.message); process.exit(1); });
setTimeout(() => { console.log("timeout"); process.exit(1); }, 20000);
"#;
    let path = s.hm.dir.path().join("client.js");
    std::fs::write(&path, script).unwrap();
    for i in 0..3 {
        let cid = format!("mqttjs-{i}");
        let out = run_with_timeout(
            Command::new("node")
                .arg(&path)
                .args([&format!("wss://localhost:{port}/mqtt"), &cid, s.certs.ca.to_str().unwrap()])
                .env("NODE_PATH", node.join("node_modules")),
            CMD_TIMEOUT,
        );
        let text = output_text(&out);
        assert!(out.status.success() && text.contains(&format!("received hello from {cid}")), "{cid}: {text}");
        let ws_broker = s.landed(&cid, 1);
        let (mut raw, ack) = mqtt_connect(s.hm.port("ws"), MqttVersion::V311, &cid);
        assert!(mqtt::connack_accepted(&ack));
        raw.write_all(&mqtt::disconnect()).unwrap();
        assert_eq!(s.landed(&cid, 2), ws_broker, "{cid}");
    }
}

/// Bad upgrade requests and bad frames: each gets its HTTP status or close code, a metric and
/// a log line, and a live WebSocket session is untouched by all of them.
#[test]
fn bad_websocket_input_is_answered_and_harms_no_live_session() {
    let s = Setup::start(1, r#", origins = ["https://app.example"]"#, "empty_client_id = \"reject\"");
    let port = s.hm.port("ws");
    let admin = s.hm.admin_addr();
    let mut live = ws_session(port, "live-ws");

    // (what, request bytes, expected status line start, metric outcome)
    let big = format!("X-Filler: {}\r\n", "a".repeat(9000));
    let requests: Vec<(&str, String, &str, &str)> = vec![
        ("garbage", "GARBAGE\x01\r\n\r\n".into(), "HTTP/1.1 400 ", "bad_request"),
        ("POST", upgrade_request("/mqtt", "").replacen("GET", "POST", 1), "HTTP/1.1 400 ", "bad_request"),
        (
            "version 8",
            upgrade_request("/mqtt", "").replace("Version: 13", "Version: 8"),
            "HTTP/1.1 426 ",
            "unsupported_version",
        ),
        (
            "no key",
            upgrade_request("/mqtt", "").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), ""),
            "HTTP/1.1 400 ",
            "bad_request",
        ),
        ("wrong path", upgrade_request("/other", ""), "HTTP/1.1 404 ", "not_found"),
        (
            "wrong origin",
            upgrade_request("/mqtt", "Origin: https://evil.example\r\n"),
            "HTTP/1.1 403 ",
            "forbidden_origin",
        ),
        (
            "not MQTT",
            upgrade_request("/mqtt", "").replace("Protocol: mqtt", "Protocol: graphql-ws"),
            "HTTP/1.1 400 ",
            "bad_request",
        ),
        ("oversized", upgrade_request("/mqtt", &big), "HTTP/1.1 431 ", "too_large"),
    ];
    for (what, req, status, outcome) in &requests {
        let mut c = dial(port);
        let _ = c.write_all(req.as_bytes());
        let head = read_head(&mut c);
        assert!(head.starts_with(status), "{what}: {head:?}");
        let _ = read_to_close(&mut c);
        let n =
            metric_sum(&admin, "harbormaster_websocket_upgrades_total", &[("listener", "ws"), ("outcome", outcome)]);
        assert!(n >= 1.0, "{what}: no {outcome} in the metric");
    }
    // An accepted origin upgrades.
    let mut ok = dial(port);
    ok.write_all(upgrade_request("/mqtt", "Origin: https://APP.example\r\n").as_bytes()).unwrap();
    assert!(read_head(&mut ok).starts_with("HTTP/1.1 101 "));
    drop(ok);

    // A partial request, then the client goes: no answer, closed.
    let mut c = dial(port);
    c.write_all(b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert!(read_to_close(&mut c).is_empty());

    // A slow upgrade: answered 408 once connect_timeout is over.
    let mut c = dial(port);
    c.write_all(b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    let head = read_head(&mut c);
    assert!(head.starts_with("HTTP/1.1 408 "), "slow upgrade: {head:?}");
    let timeouts = [("listener", "ws"), ("outcome", "timeout")];
    assert_eq!(metric_sum(&admin, "harbormaster_websocket_upgrades_total", &timeouts), 1.0);

    // Frames after a good upgrade: (what, bytes, close code expected).
    let connect = mqtt::connect(MqttVersion::V311, "bad-frames");
    let mut unmasked = vec![0x82, connect.len() as u8];
    unmasked.extend_from_slice(&connect);
    let mut huge = vec![0x82, 0xff];
    huge.extend_from_slice(&(1u64 << 20).to_be_bytes());
    huge.extend_from_slice(&[1, 2, 3, 4]);
    let frames: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", unmasked, 1002),
        ("text", frame(0x1, true, b"hello"), 1003),
        ("oversized", huge, 1009),
        ("reserved opcode", frame(0x5, true, b""), 1002),
    ];
    for (what, bytes, code) in &frames {
        let mut c = dial(port);
        c.write_all(upgrade_request("/mqtt", "").as_bytes()).unwrap();
        assert!(read_head(&mut c).starts_with("HTTP/1.1 101 "));
        c.write_all(bytes).unwrap();
        let got = read_frame(&mut c);
        assert_eq!(got, Some((0x8, code.to_be_bytes().to_vec())), "{what}");
        assert!(read_to_close(&mut c).is_empty(), "{what}: closed after the close frame");
        let n = metric_sum(
            &admin,
            "harbormaster_websocket_protocol_errors_total",
            &[("listener", "ws"), ("code", &code.to_string())],
        );
        assert!(n >= 1.0, "{what}: metric");
    }

    // A frame whose length lies (more announced than sent), then the client goes.
    let mut c = dial(port);
    c.write_all(upgrade_request("/mqtt", "").as_bytes()).unwrap();
    assert!(read_head(&mut c).starts_with("HTTP/1.1 101 "));
    let mut lying = frame(0x2, true, &connect);
    lying[1] = 0x80 | 100; // 100 announced, 14 sent
    c.write_all(&lying).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let _ = read_to_close(&mut c);

    // A close frame before the CONNECT: echoed, then closed.
    let mut c = dial(port);
    c.write_all(upgrade_request("/mqtt", "").as_bytes()).unwrap();
    assert!(read_head(&mut c).starts_with("HTTP/1.1 101 "));
    c.write_all(&frame(0x8, true, &1001u16.to_be_bytes())).unwrap();
    assert_eq!(read_frame(&mut c), Some((0x8, 1001u16.to_be_bytes().to_vec())));

    // A refusal over WebSocket: the CONNACK in a binary frame, then a close frame.
    let mut c = dial(port);
    c.write_all(upgrade_request("/mqtt", "").as_bytes()).unwrap();
    assert!(read_head(&mut c).starts_with("HTTP/1.1 101 "));
    c.write_all(&frame(0x2, true, &mqtt::connect(MqttVersion::V311, ""))).unwrap();
    assert_eq!(read_frame(&mut c), Some((0x2, MqttVersion::V311.connack_identifier_rejected())));
    assert_eq!(read_frame(&mut c), Some((0x8, 1000u16.to_be_bytes().to_vec())));

    // Every refusal was counted under its close reason and logged.
    let closed = |reason: &str| {
        metric_sum(&admin, "harbormaster_connections_closed_total", &[("listener", "ws"), ("reason", reason)])
    };
    // (Counted when each connection's polite close is over.)
    assert!(wait_until(WAIT, || closed("bad_websocket_upgrade") >= requests.len() as f64));
    assert!(wait_until(WAIT, || closed("websocket_protocol") >= frames.len() as f64));
    assert!(wait_until(WAIT, || closed("empty_client_id_rejected") >= 1.0));
    let line = s.hm.wait_connection_log("close_reason", "bad_websocket_upgrade").expect("log line");
    assert_eq!(line["transport"], "mqtt", "no WebSocket session was set up: {line:?}");
    let line = s.hm.wait_connection_log("close_reason", "websocket_protocol").expect("log line");
    assert_eq!(line["transport"], "websocket", "{line:?}");

    // The live session never noticed.
    ping(&mut live);
    live.write_all(&frame(0x2, true, &mqtt::disconnect())).unwrap();
    live.write_all(&frame(0x8, true, &1000u16.to_be_bytes())).unwrap();
    assert_eq!(read_frame(&mut live), Some((0x8, 1000u16.to_be_bytes().to_vec())));
    let line = s.hm.wait_connection_log("client_id", "live-ws").expect("log line");
    assert_eq!(line["close_reason"], "closed", "{line:?}");
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// Idle memory per session: N idle raw MQTT sessions over TLS, then N idle WebSocket sessions
/// over TLS on the same listener, each measured as the growth of harbormaster's VmRSS over
/// its sessions. An idle WebSocket session holds no buffer, only its frame state: within
/// 1.1 times a raw one.
#[test]
fn an_idle_websocket_session_costs_about_what_a_raw_one_does() {
    const N: usize = 600;
    let _heavy = heavy();
    let s = Setup::start(1, "", "");
    let port = s.hm.port("wss");
    let pid = s.hm.pid();
    let cfg = tls::client_config(&s.certs, false, tls::ClientTlsChoice::Default);
    let raw_session = |cid: &str| {
        let mut t = tls::connect_tls(port, "localhost", cfg.clone(), None).unwrap();
        let ack = mqtt::connect_and_read_connack(&mut t, MqttVersion::V311, cid).unwrap();
        assert!(mqtt::connack_accepted(&ack));
        t
    };
    let ws_session = |cid: &str| {
        let mut t = tls::connect_tls(port, "localhost", cfg.clone(), None).unwrap();
        t.write_all(upgrade_request("/mqtt", "").as_bytes()).unwrap();
        assert!(read_head(&mut t).starts_with("HTTP/1.1 101 "));
        t.write_all(&frame(0x2, true, &mqtt::connect(MqttVersion::V311, cid))).unwrap();
        let (op, ack) = read_frame(&mut t).expect("CONNACK");
        assert!(op == 0x2 && mqtt::connack_accepted(&ack));
        t
    };
    // Warm-up: the code and buffers of both kinds of session are in memory.
    for i in 0..20 {
        drop((raw_session(&format!("warm-raw-{i}")), ws_session(&format!("warm-ws-{i}"))));
    }
    let admin = s.hm.admin_addr();
    let active = || metric_sum(&admin, "harbormaster_connections_active", &[]);
    assert!(wait_until(WAIT, || active() == 0.0));
    std::thread::sleep(std::time::Duration::from_secs(1));
    let before = vm_rss_kib(pid);
    let raw: Vec<_> = (0..N).map(|i| raw_session(&format!("idle-raw-{i}"))).collect();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let after_raw = vm_rss_kib(pid);
    let ws: Vec<_> = (0..N).map(|i| ws_session(&format!("idle-ws-{i}"))).collect();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let after_ws = vm_rss_kib(pid);
    let per_raw = (after_raw - before) as f64 * 1024.0 / N as f64;
    let per_ws = after_ws.saturating_sub(after_raw) as f64 * 1024.0 / N as f64;
    eprintln!("idle memory per TLS session: raw MQTT {per_raw:.0} B, WebSocket {per_ws:.0} B");
    assert!(per_ws <= per_raw * 1.1 + 256.0, "WebSocket {per_ws:.0} B vs raw {per_raw:.0} B per idle session");
    drop((raw, ws));
}

/// A page that connects with MQTT.js's browser bundle over `wss://` to `port`, subscribes,
/// publishes and writes what happened into `#status`.
const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>harbormaster websocket</title></head>
<body><div id="status">starting</div>
<script src="/mqtt.min.js"></script>
<script>
const show = (s) => { document.getElementById("status").textContent = s; };
const done = (s) => { show(s); fetch("/done"); };
const c = mqtt.connect("wss://localhost:PORT/mqtt", { clientId: "browser-1", protocolVersion: 4, reconnectPeriod: 0 });
c.on("connect", () => {
  show("connected");
  c.subscribe("browser/t", { qos: 1 }, () => c.publish("browser/t", "hello from the browser", { qos: 1 }));
});
c.on("message", (t, m) => { c.end(); done("received " + m.toString()); });
c.on("error", (e) => done("error " + e.message));
</script>
<!-- Held by the test's server until the page is done: the page's load event, after which
     the browser dumps the DOM, waits for it, however slow the machine. -->
<img src="/hold" alt="">
</body></html>
"#;

/// Serves `/` (the page), `/mqtt.min.js`, and `/hold`, answered once `/done` was asked for
/// (or after [`WAIT`]), over plain HTTP on loopback, one request per connection, until the
/// test ends; returns its port.
fn serve_page(page: String, bundle: Vec<u8>) -> u16 {
    use std::sync::{Arc, Condvar, Mutex};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (page, bundle) = (Arc::new(page), Arc::new(bundle));
    let finished = Arc::new((Mutex::new(false), Condvar::new()));
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(c) = conn else { continue };
            let (page, bundle, finished) = (page.clone(), bundle.clone(), finished.clone());
            std::thread::spawn(move || serve_one(c, &page, &bundle, &finished));
        }
    });
    port
}

fn serve_one(mut c: TcpStream, page: &str, bundle: &[u8], finished: &(std::sync::Mutex<bool>, std::sync::Condvar)) {
    let head = read_head(&mut c);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (lock, cond) = finished;
    match path.as_str() {
        "/hold" => {
            let done = lock.lock().unwrap();
            let _ = cond.wait_timeout_while(done, WAIT, |done| !*done).unwrap();
        }
        "/done" => {
            *lock.lock().unwrap() = true;
            cond.notify_all();
        }
        _ => {}
    }
    {
        {
            let (ctype, body): (&str, &[u8]) = match path.as_str() {
                "/mqtt.min.js" => ("application/javascript", bundle),
                "/" => ("text/html; charset=utf-8", page.as_bytes()),
                "/hold" | "/done" => ("text/plain", b"ok"), // (not an image: the page shows none)
                _ => ("text/plain", b"not found"),
            };
            let status = if body == b"not found" { "404 Not Found" } else { "200 OK" };
            let _ = write!(
                c,
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = c.write_all(body);
        }
    }
}

/// A real browser (headless Chromium) loads a page served here that uses MQTT.js's browser
/// bundle over `wss://` through harbormaster: it connects, publishes and receives its message,
/// and the listener's `origins` lets the page's origin in.
#[test]
fn a_browser_publishes_and_receives_over_wss() {
    let node = node_dir();
    let chromium = require_program("chromium");
    let bundle = std::fs::read(node.join("node_modules/mqtt/dist/mqtt.min.js")).unwrap();
    let s = Setup::start(2, "", "");
    let port = s.hm.port("wss");
    let http = serve_page(PAGE.replace("PORT", &port.to_string()), bundle);
    let profile = tempfile::tempdir().unwrap();
    // The server key's SPKI hash, which the browser is told to accept: the test CA is not in
    // its store. (The listener asks for no client certificate: headless Chromium abandons a
    // handshake that asks for one, having no one to ask which to send.)
    let spki = run_with_timeout(
        Command::new("sh").arg("-c").arg(format!(
            "openssl x509 -in {} -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
            s.certs.server_cert.display()
        )),
        CMD_TIMEOUT,
    );
    let spki = String::from_utf8_lossy(&spki.stdout).trim().to_string();
    let out = run_with_timeout(
        Command::new(chromium).args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            &format!("--ignore-certificate-errors-spki-list={spki}"),
            &format!("--user-data-dir={}", profile.path().display()),
            "--dump-dom",
            &format!("http://127.0.0.1:{http}/"),
        ]),
        CMD_TIMEOUT,
    );
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dom.contains(r#"<div id="status">received hello from the browser</div>"#),
        "the page's status: {dom}\n{}\nharbormaster:\n{}",
        String::from_utf8_lossy(&out.stderr).lines().filter(|l| !l.contains("dbus")).collect::<Vec<_>>().join("\n"),
        s.hm.log()
    );
    let line = s.hm.wait_connection_log("client_id", "browser-1").expect("log line");
    assert_eq!(line["transport"], "websocket", "{line:?}");
    assert_eq!(line["close_reason"], "closed", "{line:?}");
    s.landed("browser-1", 1);
}

// ---------------------------------------------------------------------------------------------
// backend_transport = "websocket": RabbitMQ's web MQTT listener
// ---------------------------------------------------------------------------------------------

/// A TCP listener that keeps each request it gets (everything up to the blank line) and answers
/// 404: a broker whose WebSocket path is elsewhere, and a witness of the upgrade request
/// harbormaster sends.
fn recorder() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            c.set_read_timeout(Some(WAIT)).unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&b[..n]),
                }
            }
            kept.lock().unwrap().push(String::from_utf8_lossy(&req).into_owned());
            let _ = c.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (addr, seen)
}

/// `backend_transport = "websocket"` against RabbitMQ's web MQTT plugin (path `/ws`, PROXY
/// header required): paho-mqtt over `ws://` and MQTT.js over `wss://` publish and receive
/// through harbormaster, which routes them by the client-id read from their frames and relays
/// the frames untouched; a raw MQTT client is refused (such a pool serves only WebSocket
/// clients); a broker answering the upgrade with 404 is a failed dial (the next broker takes
/// the client, or the client is refused when there is none); the upgrade request carries the
/// forwarding fields and the client's credentials; log lines and `/route` name the transport.
#[test]
fn websocket_to_rabbitmq_relays_frames_untouched() {
    let node = node_dir();
    let rabbit = Rabbit::start_with_web_mqtt();
    let web = addr(rabbit.web_port.expect("web MQTT port"));
    let (recorder_addr, recorded) = recorder();
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[[listener]]
name = "ws"
bind = "127.0.0.1:0"
pool = "rabbit"
websocket = {{ path = "/mqtt" }}

[[listener]]
name = "wss"
bind = "127.0.0.1:0"
pool = "rabbit"
websocket = {{ path = "/mqtt" }}
{tls}
[[listener]]
name = "failover"
bind = "127.0.0.1:0"
pool = "failover"
websocket = {{ path = "/mqtt" }}

[[listener]]
name = "lost"
bind = "127.0.0.1:0"
pool = "lost"
websocket = {{ path = "/mqtt" }}

[pool.rabbit]
backends = ["{web}"]
backend_transport = "websocket"
websocket_path = "/ws"
proxy_protocol = "v1"

[pool.failover]
backends = [{{ name = "recorder", address = "{recorder_addr}" }}, {{ name = "rabbit", address = "{web}" }}]
backend_transport = "websocket"
websocket_path = "/ws"
proxy_protocol = "v1"
backend_attempts = 2

[pool.lost]
backends = ["{web}"]
backend_transport = "websocket"
websocket_path = "/nope"
proxy_protocol = "v1"

[limits]
connect_timeout = "5s"

[admin]
bind = "127.0.0.1:0"
"#,
        tls = certs.listener_tls_toml("none"),
    );
    let hm = Harbormaster::start(&config);

    // paho-mqtt over ws://: publishes and receives through RabbitMQ's WebSocket listener.
    let out = paho_ws(dir.path(), hm.port("ws"), "paho-rabbit", None);
    assert!(out.contains("received hello from paho-rabbit"), "{out}\n{}", hm.log());
    let line = hm.wait_connection_log("client_id", "paho-rabbit").expect("log line");
    assert_eq!(
        (line["transport"].as_str(), line["backend_transport"].as_str(), line["pool"].as_str()),
        ("websocket", "websocket", "rabbit"),
        "{line:?}"
    );
    assert_eq!(line["broker"], web, "{line:?}");

    // MQTT.js over wss://.
    let script = r#"
const mqtt = require("mqtt");
const fs = require("fs");
const [url, cid, ca] = process.argv.slice(2);
const c = mqtt.connect(url, { clientId: cid, ca: fs.readFileSync(ca), protocolVersion: 4, reconnectPeriod: 0 });
c.on("connect", () => c.subscribe("js/" + cid, { qos: 1 }, () => c.publish("js/" + cid, "hello from " + cid, { qos: 1 })));
c.on("message", (t, m) => { console.log("received " + m.toString()); c.end(() => process.exit(0)); });
c.on("error", (e) => { console.log("error " + e.message); process.exit(1); });
setTimeout(() => { console.log("timeout"); process.exit(1); }, 20000);
"#;
    let path = dir.path().join("client.js");
    std::fs::write(&path, script).unwrap();
    let out = run_with_timeout(
        Command::new("node")
            .arg(&path)
            .args([&format!("wss://localhost:{}/mqtt", hm.port("wss")), "js-rabbit", certs.ca.to_str().unwrap()])
            .env("NODE_PATH", node.join("node_modules")),
        CMD_TIMEOUT,
    );
    let text = output_text(&out);
    assert!(out.status.success() && text.contains("received hello from js-rabbit"), "{text}");
    let line = hm.wait_connection_log("client_id", "js-rabbit").expect("log line");
    assert_eq!(line["backend_transport"], "websocket", "{line:?}");

    // A raw MQTT client on the same port: "server unavailable", with the reason in the log.
    let (_raw, ack) = mqtt_connect(hm.port("ws"), MqttVersion::V311, "raw-to-rabbit");
    assert_eq!(ack, vec![0x20, 0x02, 0x00, 0x03], "CONNACK server unavailable");
    let line = hm.wait_connection_log("client_id", "raw-to-rabbit").expect("log line");
    assert_eq!(line["close_reason"], "no_broker_available", "{line:?}");
    assert!(line["detail"].contains("serves only MQTT over WebSocket clients"), "{line:?}");

    // A first choice that answers the upgrade with 404: the next broker takes the client.
    let cid = (0..200)
        .map(|i| format!("failover-{i}"))
        .find(|c| hm.route_in(c, "failover").first().map(String::as_str) == Some("recorder"))
        .expect("a client-id whose first choice is the recorder");
    let out = paho_ws(dir.path(), hm.port("failover"), &cid, None);
    assert!(out.contains(&format!("received hello from {cid}")), "{out}");
    let line = hm.wait_connection_log("client_id", &cid).expect("log line");
    assert_eq!(line["broker"], "rabbit", "{line:?}");
    // (The log's detail names the failover unless the relay's end replaced it.)
    let admin = hm.admin_addr();
    let failed = [("pool", "failover"), ("broker", "recorder"), ("outcome", "error")];
    assert!(metric_sum(&admin, "harbormaster_broker_connect_attempts_total", &failed) >= 1.0);
    assert!(metric_sum(&admin, "harbormaster_failovers_total", &[("pool", "failover")]) >= 1.0);
    // What the broker was asked: after the PROXY header, the upgrade with the client's address
    // and credentials, and the subprotocol the client chose.
    let req = recorded.lock().unwrap().first().cloned().expect("the recorder saw a request");
    let want = [
        "PROXY TCP4 127.0.0.1 127.0.0.1 ".to_string(),
        "\r\nGET /ws HTTP/1.1\r\n".to_string(),
        format!("\r\nHost: {recorder_addr}\r\n"),
        "\r\nSec-WebSocket-Version: 13\r\n".into(),
        "\r\nSec-WebSocket-Protocol: mqtt\r\n".into(),
        "\r\nX-Forwarded-For: 127.0.0.1\r\n".into(),
        "\r\nForwarded: for=\"127.0.0.1:".into(),
        ";proto=http\r\n".into(),
        "\r\nCookie: session=abc\r\n".into(),
        "\r\nAuthorization: Bearer t0ken\r\n".into(),
    ];
    for w in want {
        assert!(req.contains(&w), "{w:?} not in {req:?}");
    }

    // The broker's WebSocket listener is elsewhere (404) and there is no other: refused.
    let out = paho_ws(dir.path(), hm.port("lost"), "lost-1", None);
    assert!(!out.contains("received"), "{out}");
    let line = hm.wait_connection_log("client_id", "lost-1").expect("log line");
    assert_eq!(line["close_reason"], "no_broker_available", "{line:?}");
    assert!(line["detail"].contains("404"), "{line:?}");

    // The same refusal as a WebSocket client sees it: the CONNACK in a binary frame, then a
    // close frame (nothing of a broker's reached it).
    let mut s = dial(hm.port("lost"));
    s.write_all(upgrade_request("/mqtt", "").as_bytes()).unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    s.write_all(&frame(0x2, true, &mqtt::connect(MqttVersion::V311, "lost-2"))).unwrap();
    assert_eq!(read_frame(&mut s), Some((0x2, vec![0x20, 0x02, 0x00, 0x03])), "CONNACK server unavailable");
    assert_eq!(read_frame(&mut s).map(|(op, _)| op), Some(0x8), "then a close frame");

    // /route names the pool's transport.
    let (status, body) = http_get(&hm.admin_addr(), "/route?client_id=x&pool=rabbit");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["backend_transport"], "websocket", "{body}");
}
