//! Closing on purpose, the MQTT way, against real mosquitto brokers and real clients (paho-mqtt
//! 2.x, which reports the reason code of a DISCONNECT it receives): an MQTT 5 client gets
//! DISCONNECT 0x8B when the process drains and 0x9C when its broker leaves the pool; 3.1.1
//! clients are closed plainly; with `planned_close_will = "suppress"` a device that is only
//! moved leaves no Will, while one that really dies still does.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::{fs, thread};

use crate::support::mqtt::{self, MqttVersion};
use crate::support::*;

/// A paho-mqtt client in a child process, printing what happens to it, one event a line:
/// `connected RC`, `subscribed`, `message TOPIC PAYLOAD`, `disconnected RC` (then it exits:
/// no reconnect).
const CLIENT_PY: &str = r#"
import os, sys
import paho.mqtt.client as mqtt

mode, port, cid, version, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
proto = {"5": mqtt.MQTTv5, "311": mqtt.MQTTv311}[version]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto)

def say(*words):
    print(*words, flush=True)

def code(rc):
    return getattr(rc, "value", rc)

if mode == "device":
    c.will_set(topic, b"gone:" + cid.encode(), qos=1)

def on_connect(client, userdata, flags, rc, props):
    say("connected", code(rc))
    if mode == "sub":
        client.subscribe(topic, qos=1)

def on_subscribe(client, userdata, mid, rcs, props):
    say("subscribed")

def on_message(client, userdata, msg):
    say("message", msg.topic, msg.payload.decode())

def on_disconnect(client, userdata, flags, rc, props):
    say("disconnected", code(rc))
    os._exit(0)

c.on_connect = on_connect
c.on_subscribe = on_subscribe
c.on_message = on_message
c.on_disconnect = on_disconnect
c.connect("127.0.0.1", port, keepalive=60)
c.loop_forever()
"#;

/// One paho client process and the lines it printed.
pub(crate) struct Paho {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Paho {
    /// `mode` "device" (with a Will on `topic`), "sub" (subscribed to `topic`) or "plain".
    pub(crate) fn start(script: &Path, mode: &str, port: u16, client_id: &str, version: &str, topic: &str) -> Paho {
        let mut child = Command::new("python3")
            .arg(script)
            .args([mode, &port.to_string(), client_id, version, topic])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Paho { child, lines, seen: Vec::new() };
        let ready = if mode == "sub" { "subscribed" } else { "connected 0" };
        p.wait_line(|l| l == ready).unwrap_or_else(|| panic!("{client_id}: no {ready:?}; saw {:?}", p.seen));
        p
    }

    /// The first line (from now on) that `pred` accepts, waiting at most [`WAIT`].
    pub(crate) fn wait_line(&mut self, mut pred: impl FnMut(&str) -> bool) -> Option<String> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if pred(&line) {
                return Some(line);
            }
        }
    }

    /// The reason code of the disconnection it reports.
    pub(crate) fn disconnect_code(&mut self) -> u32 {
        let line = self
            .wait_line(|l| l.starts_with("disconnected "))
            .unwrap_or_else(|| panic!("no disconnection; saw {:?}", self.seen));
        line["disconnected ".len()..].trim().parse().unwrap()
    }
}

impl Drop for Paho {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The paho client script, written into `dir`; skips nothing: paho-mqtt is installed by
/// scripts/test.
pub(crate) fn client_script(dir: &Path) -> PathBuf {
    let ok = Command::new("python3").args(["-c", "import paho.mqtt.client"]).status().map(|s| s.success());
    assert!(matches!(ok, Ok(true)), "python3 with paho-mqtt 2.x is needed (scripts/test installs it)");
    let path = dir.join("client.py");
    fs::write(&path, CLIENT_PY).unwrap();
    path
}

/// The first `n` client-ids `PREFIX-NNN` whose first choice is `broker`.
pub(crate) fn ids_routed_to(config: &Path, prefix: &str, broker: &str, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..500)
        .map(|i| format!("{prefix}-{i:03}"))
        .filter(|id| route(config, id, None)[0] == broker)
        .take(n)
        .collect();
    assert_eq!(ids.len(), n, "fewer than {n} of 500 ids route to {broker}");
    ids
}

#[test]
fn sigterm_sends_an_mqtt5_client_disconnect_0x8b_and_closes_3_1_1_plainly() {
    let m = Mosquitto::start();
    let mut hm = Harbormaster::start(&format!(
        "[[listener]]\nname = \"mqtt\"\nbind = \"127.0.0.1:0\"\npool = \"brokers\"\n\n\
         [pool.brokers]\nbackends = [\"{}\"]\n\n[limits]\ndrain_timeout = \"1s\"\n",
        m.addr()
    ));
    let port = hm.port("mqtt");
    let script = client_script(hm.dir.path());
    let mut v5 = Paho::start(&script, "plain", port, "drain-v5", "5", "");
    let (mut v311, ack) = mqtt_connect(port, MqttVersion::V311, "drain-v311");
    assert!(mqtt::connack_accepted(&ack));

    hm.sigterm();
    assert_eq!(v5.disconnect_code(), 0x8B, "server shutting down");
    let (bytes, closed) = mqtt::read_until_close(&mut v311, WAIT);
    assert!(closed && bytes.is_empty(), "3.1.1: closed as before, nothing written: {bytes:02x?}");
    let status = hm.wait_exit(CMD_TIMEOUT).expect("exit after the drain");
    assert!(status.success(), "{}", hm.log());

    let line = hm.wait_connection_log("client_id", "drain-v5").unwrap();
    assert_eq!(line["close_reason"], "drained");
    assert_eq!(line["disconnect_sent"], "0x8B");
    let line = hm.wait_connection_log("client_id", "drain-v311").unwrap();
    assert_eq!(line["close_reason"], "drained");
    assert_eq!(line["disconnect_sent"], "");
}

#[test]
fn a_removed_broker_sends_its_mqtt5_clients_disconnect_0x9c() {
    let (m1, m2) = (Mosquitto::start(), Mosquitto::start());
    let both = [("b1", &m1), ("b2", &m2)];
    let policy = "on_backend_removed = \"close\"\nclose_rate = 50";
    let hm = Harbormaster::start(&one_pool_config(0, 0, &both, policy));
    let (port, admin) = (hm.port("mqtt"), hm.admin_addr());
    let script = client_script(hm.dir.path());
    let ids = ids_routed_to(&hm.config_path, "moved", "b2", 2);
    let mut v5 = Paho::start(&script, "plain", port, &ids[0], "5", "");
    let (mut v311, ack) = mqtt_connect(port, MqttVersion::V311, &ids[1]);
    assert!(mqtt::connack_accepted(&ack));
    assert!(m2.wait_for_client(&ids[0], 1) && m2.wait_for_client(&ids[1], 1));

    fs::write(&hm.config_path, one_pool_config(0, 0, &both[..1], policy)).unwrap();
    hm.sighup();
    assert_eq!(v5.disconnect_code(), 0x9C, "use another server");
    let (bytes, closed) = mqtt::read_until_close(&mut v311, WAIT);
    assert!(closed && bytes.is_empty(), "3.1.1: closed as before, nothing written: {bytes:02x?}");

    let line = hm.wait_connection_log("client_id", &ids[0]).unwrap();
    assert_eq!(line["close_reason"], "broker_removed");
    assert_eq!(line["disconnect_sent"], "0x9C");
    assert_eq!(line["broker_disconnect_sent"], "", "planned_close_will defaults to keep");
    let sent = [("to", "client"), ("reason_code", "0x9C")];
    assert!(wait_until(WAIT, || metric_sum(&admin, "harbormaster_planned_disconnects_total", &sent) == 1.0));
}

/// With `suppress`, devices moved off a removed broker (MQTT 5 and 3.1.1) leave no Will on
/// it, while a device that really dies does: a subscriber on the Will topic, connected to that
/// broker directly, receives the dead device's Will and then a marker published after the
/// moved devices were gone, and nothing from them in between or before.
#[test]
fn with_suppress_a_moved_device_leaves_no_will_and_a_dead_one_does() {
    let (m1, m2) = (Mosquitto::start(), Mosquitto::start());
    let both = [("b1", &m1), ("b2", &m2)];
    let policy = "on_backend_removed = \"close\"\nclose_rate = 50\nplanned_close_will = \"suppress\"";
    let hm = Harbormaster::start(&one_pool_config(0, 0, &both, policy));
    let port = hm.port("mqtt");
    let script = client_script(hm.dir.path());
    let ids = ids_routed_to(&hm.config_path, "dev", "b2", 3);
    let mut sub = Paho::start(&script, "sub", m2.port, "will-watcher", "5", "will/#");
    let mut moved5 = Paho::start(&script, "device", port, &ids[0], "5", &format!("will/{}", ids[0]));
    let mut moved311 = Paho::start(&script, "device", port, &ids[1], "311", &format!("will/{}", ids[1]));
    let dies = Paho::start(&script, "device", port, &ids[2], "311", &format!("will/{}", ids[2]));
    for id in &ids {
        assert!(m2.wait_for_client(id, 1));
    }

    // A device that really dies: its process is killed, its socket closes without DISCONNECT.
    drop(dies);
    let will = sub.wait_line(|l| l.starts_with("message ")).expect("the dead device's Will");
    assert_eq!(will, format!("message will/{0} gone:{0}", ids[2]));

    // The other two are moved: b2 leaves the pool.
    fs::write(&hm.config_path, one_pool_config(0, 0, &both[..1], policy)).unwrap();
    hm.sighup();
    assert_eq!(moved5.disconnect_code(), 0x9C);
    moved311.wait_line(|l| l.starts_with("disconnected")).expect("the 3.1.1 device is closed");
    for id in &ids[..2] {
        let line = hm.wait_connection_log("client_id", id).unwrap();
        assert_eq!(line["close_reason"], "broker_removed");
        assert_eq!(line["broker_disconnect_sent"], "0x00", "{id}");
        // The broker saw a DISCONNECT, not a lost connection.
        let gone = wait_until(WAIT, || m2.log().contains(&format!("Client {id} disconnected.")));
        assert!(gone, "{id}: mosquitto did not see a DISCONNECT:\n{}", m2.log());
    }
    MqttClient::plain(m2.port, MqttVersion::V311).publish_ok("marker-pub", "will/marker", "marker");
    let next = sub.wait_line(|l| l.starts_with("message ")).expect("the marker");
    assert_eq!(next, "message will/marker marker", "a moved device's Will was published");
}

/// Bytes sent after a planned close's DISCONNECT never reach the broker: a device moved while
/// sending keeps every packet it had sent whole.
#[test]
fn a_planned_close_ends_at_a_packet_boundary_of_a_publishing_client() {
    let (m1, m2) = (Mosquitto::start(), Mosquitto::start());
    let both = [("b1", &m1), ("b2", &m2)];
    let policy = "on_backend_removed = \"close\"\nplanned_close_will = \"suppress\"";
    let hm = Harbormaster::start(&one_pool_config(0, 0, &both, policy));
    let (port, admin) = (hm.port("mqtt"), hm.admin_addr());
    let id = ids_routed_to(&hm.config_path, "busy", "b2", 1).remove(0);
    let (mut c, ack) = mqtt_connect(port, MqttVersion::V311, &id);
    assert!(mqtt::connack_accepted(&ack));
    // Half a PUBLISH is in flight when the close comes.
    let publish = mqtt::publish_qos0(MqttVersion::V311, "busy/t", &[7u8; 3000]);
    use std::io::Write;
    c.write_all(&publish[..1500]).unwrap();
    assert!(m2.wait_for_client(&id, 1));
    fs::write(&hm.config_path, one_pool_config(0, 0, &both[..1], policy)).unwrap();
    hm.sighup();
    // The rest follows once the reload is applied; the close waits for it, then the broker
    // gets the DISCONNECT.
    let reloaded = [("outcome", "ok")];
    assert!(wait_until(WAIT, || metric_sum(&admin, "harbormaster_config_reloads_total", &reloaded) >= 1.0));
    c.write_all(&publish[1500..]).unwrap();
    let line = hm.wait_connection_log("client_id", &id).unwrap();
    assert_eq!(line["close_reason"], "broker_removed");
    assert_eq!(line["broker_disconnect_sent"], "0x00", "{}", hm.log());
    let gone = wait_until(WAIT, || m2.log().contains(&format!("Client {id} disconnected.")));
    assert!(gone, "mosquitto did not see a clean DISCONNECT:\n{}", m2.log());
}

/// A client stalled in the middle of a packet: the planned close gives up waiting for the
/// boundary and closes plainly, writing nothing into the broker's stream.
#[test]
fn a_client_stalled_mid_packet_is_closed_plainly() {
    let (m1, m2) = (Mosquitto::start(), Mosquitto::start());
    let both = [("b1", &m1), ("b2", &m2)];
    let policy = "on_backend_removed = \"close\"\nplanned_close_will = \"suppress\"";
    let hm = Harbormaster::start(&one_pool_config(0, 0, &both, policy));
    let port = hm.port("mqtt");
    let id = ids_routed_to(&hm.config_path, "stalled", "b2", 1).remove(0);
    let (mut c, ack) = mqtt_connect(port, MqttVersion::V311, &id);
    assert!(mqtt::connack_accepted(&ack));
    let publish = mqtt::publish_qos0(MqttVersion::V311, "stalled/t", &[7u8; 3000]);
    use std::io::Write;
    c.write_all(&publish[..1500]).unwrap();
    assert!(m2.wait_for_client(&id, 1));
    fs::write(&hm.config_path, one_pool_config(0, 0, &both[..1], policy)).unwrap();
    hm.sighup();
    let (_, closed) = mqtt::read_until_close(&mut c, WAIT);
    assert!(closed, "the stalled client was not closed");
    let line = hm.wait_connection_log("client_id", &id).unwrap();
    assert_eq!(line["close_reason"], "broker_removed");
    assert_eq!(line["broker_disconnect_sent"], "");
    assert_eq!(line["detail"], "no packet boundary in time");
    // mosquitto logs a lost connection as "closed its connection." or "disconnected: REASON",
    // a DISCONNECT as "disconnected.".
    let lost = [format!("Client {id} closed its connection."), format!("Client {id} disconnected: ")];
    let ended = wait_until(WAIT, || lost.iter().any(|l| m2.log().contains(l.as_str())));
    assert!(ended, "mosquitto did not see the connection end:\n{}", m2.log());
    assert!(!m2.log().contains(&format!("Client {id} disconnected.")), "a DISCONNECT reached the broker");
}
