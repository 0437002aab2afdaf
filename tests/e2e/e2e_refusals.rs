//! What harbormaster answers, on its own, to clients it does not forward: a CONNACK refusal
//! where MQTT has one, a plain close otherwise; and nothing ever reaches the broker.
//! The backend is a test-owned TCP server that records every byte it receives.

use std::io::Write;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::mqtt::{self, ConnectOptions, MqttVersion};
use crate::support::*;

struct Setup {
    backend: RecordingBackend,
    hm: Harbormaster,
    port: u16,
}

fn start(empty_client_id: &str) -> Setup {
    let backend = RecordingBackend::start();
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "brokers"

[pool.brokers]
backends = ["{backend}"]
empty_client_id = "{empty_client_id}"
proxy_protocol = "none"

[limits]
connect_timeout = "1s"
max_connect_packet = 1024
"#,
        backend = backend.addr()
    ));
    let port = hm.port("mqtt");
    Setup { backend, hm, port }
}

impl Setup {
    fn connect(&self) -> TcpStream {
        tcp_client(self.port)
    }

    /// Sends `bytes` and returns what harbormaster wrote back before closing.
    fn exchange(&self, bytes: &[u8]) -> Vec<u8> {
        let mut s = self.connect();
        write_ignoring_errors(&mut s, bytes);
        let (got, closed) = mqtt::read_until_close(&mut s, WAIT);
        assert!(
            closed,
            "harbormaster kept the connection open after {}; got {}",
            hex(&bytes[..bytes.len().min(16)]),
            hex(&got)
        );
        got
    }

    fn assert_nothing_reached_backend(&self, what: &str) {
        // Give a wrongly forwarded byte time to arrive before concluding it did not.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(self.backend.total_bytes(), 0, "{what}: bytes reached the backend: {:?}", self.backend.received());
    }

    /// Positive control: a valid CONNECT does reach the recording backend, byte for byte, so
    /// the "nothing reached the backend" checks are not vacuous.
    fn assert_valid_connect_is_forwarded(&self) {
        let before = self.backend.total_bytes();
        let connect = mqtt::connect(MqttVersion::V311, "control");
        let mut s = self.connect();
        s.write_all(&connect).unwrap();
        assert!(
            wait_until(WAIT, || self.backend.total_bytes() >= before + connect.len()),
            "a valid CONNECT never reached the backend"
        );
        assert!(self.backend.received().contains(&connect));
    }
}

#[test]
fn not_connect_first_is_closed_and_nothing_reaches_the_broker() {
    let s = start("least_connections");
    // PUBLISH first
    let got = s.exchange(&mqtt::publish_qos0(MqttVersion::V311, "t", b"x"));
    assert!(got.is_empty(), "answered {}", hex(&got));
    // SUBSCRIBE first
    let got = s.exchange(&mqtt::subscribe(MqttVersion::V311, 1, "t"));
    assert!(got.is_empty(), "answered {}", hex(&got));
    // not MQTT at all
    let got = s.exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(got.is_empty(), "answered {}", hex(&got));
    // a CONNECT whose protocol name is neither MQTT nor MQIsdp
    let mut bad_name = mqtt::connect(MqttVersion::V311, "x");
    bad_name[4..8].copy_from_slice(b"MQTX");
    let got = s.exchange(&bad_name);
    assert!(got.is_empty() || got == vec![0x20, 0x02, 0x00, 0x01], "answered {}", hex(&got));
    // a CONNECT whose remaining length runs past its fields (client-id length 200, 1 byte)
    let malformed = vec![0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 200, b'x'];
    let got = s.exchange(&malformed);
    assert!(got.is_empty(), "answered {}", hex(&got));
    s.assert_nothing_reached_backend("not-CONNECT / malformed first packets");
    s.assert_valid_connect_is_forwarded();
}

#[test]
fn unsupported_protocol_level_gets_connack_1() {
    let s = start("least_connections");
    let level6 = mqtt::connect_with(
        MqttVersion::V311,
        "lvl6",
        &ConnectOptions { keep_alive: 60, clean: true, level_override: Some(6), ..Default::default() },
    );
    let got = s.exchange(&level6);
    assert_eq!(got, vec![0x20, 0x02, 0x00, 0x01], "got {}", hex(&got));
    s.assert_nothing_reached_backend("protocol level 6");
    s.assert_valid_connect_is_forwarded();
}

/// The bridge bit (0x80) on a 3.x level is a broker's bridge: forwarded with its level byte
/// unchanged. On levels that do not exist, or on 5.0 (which has no bridge bit), it is refused
/// in the layout the level's client reads.
#[test]
fn bridge_levels_are_forwarded_unchanged_and_others_refused() {
    let s = start("least_connections");
    let with_level = |level: u8| {
        mqtt::connect_with(
            MqttVersion::V311,
            "lvl",
            &ConnectOptions { keep_alive: 60, clean: true, level_override: Some(level), ..Default::default() },
        )
    };
    let got = s.exchange(&with_level(0x85));
    assert_eq!(got, vec![0x20, 0x03, 0x00, 0x84, 0x00], "0x85: got {}", hex(&got));
    let got = s.exchange(&with_level(0x82));
    assert_eq!(got, vec![0x20, 0x02, 0x00, 0x01], "0x82: got {}", hex(&got));
    s.assert_nothing_reached_backend("protocol levels 0x85 and 0x82");

    let bridge = with_level(0x84);
    let mut c = s.connect();
    c.write_all(&bridge).unwrap();
    assert!(
        wait_until(WAIT, || s.backend.total_bytes() >= bridge.len()),
        "the bridge's CONNECT never reached the backend: {}",
        s.hm.log()
    );
    assert!(s.backend.received().contains(&bridge), "not forwarded byte for byte: {:?}", s.backend.received());
}

#[test]
fn empty_client_id_is_rejected_when_the_pool_says_reject() {
    let s = start("reject");
    let got = s.exchange(&mqtt::connect(MqttVersion::V311, ""));
    assert_eq!(got, vec![0x20, 0x02, 0x00, 0x02], "3.1.1: got {}", hex(&got));
    let got = s.exchange(&mqtt::connect(MqttVersion::V5, ""));
    assert_eq!(got, vec![0x20, 0x03, 0x00, 0x85, 0x00], "5.0: got {}", hex(&got));
    let got = s.exchange(&mqtt::connect(MqttVersion::V31, ""));
    assert_eq!(got, vec![0x20, 0x02, 0x00, 0x02], "3.1: got {}", hex(&got));
    s.assert_nothing_reached_backend("empty client-id with reject");
    s.assert_valid_connect_is_forwarded();
    // the refusal is logged like any connection
    let logs = s.hm.connection_logs();
    assert!(logs.len() >= 3, "{}", s.hm.log());
}

#[test]
fn silent_or_slow_clients_are_closed_after_connect_timeout() {
    let s = start("least_connections");
    // nothing at all
    let mut c = s.connect();
    let (got, closed) = mqtt::read_until_close(&mut c, WAIT);
    assert!(closed, "a silent client was never closed");
    assert!(got.is_empty(), "{}", hex(&got));
    // half a CONNECT
    let connect = mqtt::connect(MqttVersion::V311, "slowpoke");
    let mut c = s.connect();
    c.write_all(&connect[..connect.len() / 2]).unwrap();
    let (got, closed) = mqtt::read_until_close(&mut c, WAIT);
    assert!(closed, "a client that sent half a CONNECT was never closed");
    assert!(got.is_empty(), "{}", hex(&got));
    s.assert_nothing_reached_backend("connect timeout");
    s.assert_valid_connect_is_forwarded();
}

#[test]
fn oversized_connect_is_not_forwarded() {
    let s = start("least_connections");
    for v in [MqttVersion::V311, MqttVersion::V5] {
        let big = mqtt::connect_with(
            v,
            "big",
            &ConnectOptions {
                keep_alive: 60,
                clean: true,
                username: Some("u".into()),
                password: Some(vec![b'p'; 4000]),
                ..Default::default()
            },
        );
        let got = s.exchange(&big);
        assert!(
            got.is_empty() || (v == MqttVersion::V5 && got == vec![0x20, 0x03, 0x00, 0x95, 0x00]),
            "{v:?}: answered {}",
            hex(&got)
        );
    }
    s.assert_nothing_reached_backend("CONNECT over max_connect_packet");
    s.assert_valid_connect_is_forwarded();
}

#[test]
fn all_brokers_down_gives_connack_server_unavailable() {
    let dead: Vec<String> = (0..3).map(|_| toml_str(addr(free_port()))).collect();
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "brokers"

[pool.brokers]
backends = [{}]
proxy_protocol = "none"
backend_connect_timeout = "2s"
backend_attempts = 3
"#,
        dead.join(", ")
    ));
    let port = hm.port("mqtt");
    for (v, want) in [
        (MqttVersion::V311, vec![0x20, 0x02, 0x00, 0x03]),
        (MqttVersion::V5, vec![0x20, 0x03, 0x00, 0x88, 0x00]),
        (MqttVersion::V31, vec![0x20, 0x02, 0x00, 0x03]),
    ] {
        let mut c = tcp_client(port);
        c.write_all(&mqtt::connect(v, &format!("nobody-home-{v:?}"))).unwrap();
        let (got, closed) = mqtt::read_until_close(&mut c, WAIT);
        assert_eq!(got, want, "{v:?}: got {}", hex(&got));
        assert!(closed, "{v:?}: not closed after the refusal");
    }
    let log = hm
        .wait_connection_log("client_id", "nobody-home-V311")
        .unwrap_or_else(|| panic!("no connection log:\n{}", hm.log()));
    assert!(log.contains_key("close_reason"), "{log:?}");
}

/// `refusal` on a listener: with `"connack"` (default) a client refused for want of a broker
/// reads CONNACK "server unavailable", with `"close"` it sees the connection closed, which
/// sends clients that take the CONNACK as final back to their reconnect loop. Real clients
/// (mosquitto_pub, mosquitto_sub) against a pool whose only broker is a dead port.
#[test]
fn refusal_close_closes_instead_of_connack_and_clients_keep_reconnecting() {
    let dead = toml_str(addr(free_port()));
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "connack"
bind = "127.0.0.1:0"
pool = "brokers"

[[listener]]
name = "close"
bind = "127.0.0.1:0"
pool = "brokers"
refusal = "close"

[pool.brokers]
backends = [{dead}]
proxy_protocol = "none"

[admin]
bind = "127.0.0.1:0"
"#
    ));
    let admin = hm.admin_addr();
    let pub_bin = require_program("mosquitto_pub");
    let publish = |listener: &str, version: &str, id: &str| {
        let port = hm.port(listener).to_string();
        let out = run_with_timeout(
            Command::new(&pub_bin).args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                version,
                "-i",
                id,
                "-t",
                "t",
                "-m",
                "m",
            ]),
            WAIT,
        );
        assert!(!out.status.success(), "{listener}: mosquitto_pub succeeded: {}", output_text(&out));
        output_text(&out)
    };

    // "connack": the CONNACK's refusal, as mosquitto_pub words it.
    let out = publish("connack", "mqttv311", "refused-311");
    assert!(out.contains("Connection Refused: broker unavailable"), "{out}");
    let out = publish("connack", "mqttv5", "refused-5");
    assert!(out.contains("Server unavailable"), "{out}");
    // "close": no CONNACK, the connection is lost.
    for (version, id) in [("mqttv311", "closed-311"), ("mqttv5", "closed-5")] {
        let out = publish("close", version, id);
        assert!(out.contains("The connection was lost"), "{version}: {out}");
        assert!(!out.contains("unavailable"), "{version}: {out}");
        let line = hm.wait_connection_log("client_id", id).unwrap_or_else(|| panic!("no log line:\n{}", hm.log()));
        assert_eq!(line.get("close_reason").map(String::as_str), Some("no_broker_available"), "{line:?}");
        assert_eq!(line.get("listener").map(String::as_str), Some("close"), "{line:?}");
    }
    // The metric keeps the reason; the CONNACK label says what was sent: nothing on "close".
    let refused = |listener, connack| {
        metric_sum(
            &admin,
            "harbormaster_connections_refused_total",
            &[("listener", listener), ("reason", "no_broker_available"), ("connack", connack)],
        )
    };
    assert!(wait_until(WAIT, || refused("close", "none") >= 2.0), "{}", metrics_text(&admin));
    assert_eq!(refused("close", "0x03") + refused("close", "0x88"), 0.0, "{}", metrics_text(&admin));
    assert!(
        refused("connack", "none") == 0.0 && refused("connack", "0x03") >= 1.0 && refused("connack", "0x88") >= 1.0,
        "{}",
        metrics_text(&admin)
    );

    // mosquitto_sub gives up on the CONNACK but keeps reconnecting after a close.
    let sub_bin = require_program("mosquitto_sub");
    let sub = |listener: &str, id: &str| {
        let port = hm.port(listener).to_string();
        let mut cmd = Command::new(&sub_bin);
        cmd.args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv311", "-i", id, "-t", "t"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd.spawn().unwrap()
    };
    let mut gave_up = sub("connack", "sub-refused");
    assert!(wait_child(&mut gave_up, WAIT).is_some_and(|s| !s.success()), "mosquitto_sub did not exit on the CONNACK");
    let mut keeps_trying = sub("close", "sub-closed");
    let attempts =
        || hm.connection_logs().iter().filter(|l| l.get("client_id").map(String::as_str) == Some("sub-closed")).count();
    let reconnected = wait_until(WAIT, || attempts() >= 3);
    let still_running = keeps_trying.try_wait().unwrap().is_none();
    let _ = keeps_trying.kill();
    let _ = keeps_trying.wait();
    assert!(
        reconnected && still_running,
        "mosquitto_sub after closes: {} attempts, running: {still_running}",
        attempts()
    );
}
