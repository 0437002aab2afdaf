//! SIGTERM: stop accepting at once, let live connections run up to drain_timeout, then close
//! them and exit 0.

use std::io::Write;
use std::time::Duration;

use crate::support::mqtt::{self, MqttVersion};
use crate::support::*;

fn start(m: &Mosquitto, drain: &str) -> (Harbormaster, u16) {
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "brokers"

[pool.brokers]
backends = ["{broker}"]
proxy_protocol = "none"

[limits]
drain_timeout = "{drain}"
"#,
        broker = m.addr()
    ));
    let port = hm.port("mqtt");
    (hm, port)
}

#[test]
fn sigterm_drains_live_connections_then_exits_0() {
    let m = Mosquitto::start();
    let (mut hm, port) = start(&m, "2s");

    // A live client through harbormaster, subscribed to a topic.
    let (mut c, ack) = mqtt_connect(port, MqttVersion::V311, "drainee");
    assert_eq!(ack, vec![0x20, 0x02, 0x00, 0x00]);
    c.write_all(&mqtt::subscribe(MqttVersion::V311, 1, "drain/in")).unwrap();
    let suback = mqtt::read_until_kind(&mut c, 9).unwrap();
    assert_eq!(suback.bytes(), vec![0x90, 0x03, 0x00, 0x01, 0x00]);

    hm.sigterm();

    // The live connection still works both ways during the drain.
    c.write_all(&mqtt::publish_qos1(MqttVersion::V311, 2, "drain/out", b"during-drain")).unwrap();
    let puback = mqtt::read_until_kind(&mut c, 4).expect("PUBACK during drain");
    assert_eq!(puback.bytes(), vec![0x40, 0x02, 0x00, 0x02]);
    MqttClient::plain(m.port, MqttVersion::V311).publish_ok("drain-pub", "drain/in", "inbound");
    let publish = mqtt::read_until_kind(&mut c, 3).expect("PUBLISH during drain");
    let (topic, payload) = publish.publish_topic_payload(MqttVersion::V311);
    assert_eq!((topic.as_str(), payload.as_slice()), ("drain/in", &b"inbound"[..]));

    // New connections are refused while the process is still draining.
    let mut refused_while_running = false;
    wait_until(WAIT, || {
        let refused = !port_accepts(port);
        let running = hm.wait_exit(Duration::ZERO).is_none();
        refused_while_running = refused && running;
        refused || !running
    });
    assert!(
        refused_while_running,
        "the listener still accepted after SIGTERM (or the process exited before the drain \
         ended); log:\n{}",
        hm.log()
    );

    // drain_timeout closes the client, then the process exits 0.
    let status =
        hm.wait_exit(CMD_TIMEOUT).unwrap_or_else(|| panic!("harbormaster did not exit after drain:\n{}", hm.log()));
    assert!(status.success(), "exit status {status:?}:\n{}", hm.log());
    let (_, closed) = mqtt::read_until_close(&mut c, WAIT);
    assert!(closed, "the drained client connection was not closed");
}

#[test]
fn sigterm_without_connections_exits_0() {
    let m = Mosquitto::start();
    let (mut hm, port) = start(&m, "10m");
    // One connection that came and went. The drain_timeout is long: an idle process must not
    // wait for it (the bounded wait below would fail).
    MqttClient::plain(port, MqttVersion::V5).publish_ok("short-lived", "t", "m");
    assert!(m.wait_for_client("short-lived", 1));
    hm.sigterm();
    let status =
        hm.wait_exit(CMD_TIMEOUT).unwrap_or_else(|| panic!("idle harbormaster did not exit on SIGTERM:\n{}", hm.log()));
    assert!(status.success(), "exit status {status:?}:\n{}", hm.log());
    assert!(!port_accepts(port));
}
