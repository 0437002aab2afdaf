//! `empty_client_id = "assign"` with three real mosquitto brokers: an MQTT 5 client (paho-mqtt,
//! MQTT.js) that connects without a client-id learns the id harbormaster assigned from the
//! CONNACK, leaves a persistent session with a subscription, and on its return with that id
//! finds the session — and the message published while it was away — on the same broker, every
//! time. Without the feature the return lands on the hash of the id, which is the broker that
//! took the first connection only one time in three.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

/// One resume per try: connect without a client-id (clean start off, session expiry 300 s),
/// learn the assigned id, subscribe QoS 1, disconnect; a message is published to the topic on
/// every broker directly while the client is away; reconnect with the assigned id and wait for
/// it. Prints one line per try.
const PAHO_PY: &str = r#"
import sys, threading
import paho.mqtt.client as mqtt
import paho.mqtt.publish as publish
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

port, tries = int(sys.argv[1]), int(sys.argv[2])
brokers = [int(p) for p in sys.argv[3].split(",")]

def session(cid, topic):
    got = {"id": None, "present": None, "messages": []}
    connected, subscribed, received = threading.Event(), threading.Event(), threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    def on_connect(client, userdata, flags, rc, props):
        got["id"] = getattr(props, "AssignedClientIdentifier", None)
        got["present"] = flags.session_present
        got["rc"] = rc.value
        connected.set()
    def on_subscribe(client, userdata, mid, rcs, props):
        subscribed.set()
    def on_message(client, userdata, msg):
        got["messages"].append(msg.payload.decode())
        received.set()
    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    p = Properties(PacketTypes.CONNECT)
    p.SessionExpiryInterval = 300
    c.connect("localhost", port, keepalive=30, clean_start=False, properties=p)
    c.loop_start()
    return c, got, connected, subscribed, received

for i in range(tries):
    topic = "assign/%d" % i
    c, got, connected, subscribed, _ = session("", topic)
    if not connected.wait(10) or got["rc"] != 0:
        print("try", i, "no connack", got, flush=True); sys.exit(1)
    cid = got["id"]
    c.subscribe(topic, qos=1)
    if not subscribed.wait(10):
        print("try", i, "no suback", flush=True); sys.exit(1)
    c.disconnect(); c.loop_stop()
    for b in brokers:
        publish.single(topic, "queued %d" % i, qos=1, hostname="127.0.0.1", port=b, client_id="pub-%d-%d" % (i, b))
    c, again, connected, _, received = session(cid, topic)
    connected.wait(10)
    received.wait(5)
    c.disconnect(); c.loop_stop()
    print("try", i, "id", cid, "present", again["present"], "messages", again["messages"], flush=True)
"#;

fn python_paho() {
    let ok = Command::new("python3").args(["-c", "import paho.mqtt.client"]).status().map(|s| s.success());
    assert!(matches!(ok, Ok(true)), "python3 with paho-mqtt 2.x is needed (scripts/test installs it)");
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

fn start(extra: &str) -> (Vec<Mosquitto>, Harbormaster) {
    let brokers = Mosquitto::start_n(3);
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "brokers"

[pool.brokers]
backends = [{backends}]
proxy_protocol = "none"
empty_client_id = "assign"
{extra}

[admin]
bind = "127.0.0.1:0"
"#,
        backends = numbered_backends("m", &brokers),
    ));
    (brokers, hm)
}

fn is_assigned_id(id: &str) -> bool {
    id.len() == 29
        && id.starts_with("hm-")
        && id[3..].bytes().all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
}

/// Checks one line of a client's report: the id has the documented form, the session was
/// found and the queued message arrived; returns the id.
fn check_try(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let id = words.get(3).copied().unwrap_or_default().to_string();
    assert!(is_assigned_id(&id), "{line}");
    assert!(line.contains("present True") || line.contains("present true"), "session not found: {line}");
    assert!(line.contains("queued"), "the queued message did not arrive: {line}");
    id
}

#[test]
fn paho_mqtt_5_clients_with_assigned_ids_find_their_sessions_again() {
    python_paho();
    // A connect policy composes with the assignment: the broker sees the assigned id too.
    let (brokers, hm) = start(r#"connect = { user_properties = ["client_id"] }"#);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("assign.py");
    std::fs::write(&script, PAHO_PY).unwrap();
    let ports: Vec<String> = brokers.iter().map(|b| b.port.to_string()).collect();
    let tries = 20;
    let out = run_with_timeout(
        Command::new("python3").arg(&script).args([&hm.port("mqtt").to_string(), &tries.to_string(), &ports.join(",")]),
        CMD_TIMEOUT * 4,
    );
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("try ")).collect();
    assert_eq!(lines.len(), tries, "{text}");
    let mut ids = std::collections::HashSet::new();
    for line in lines {
        let id = check_try(line);
        // Both connections of the id reached one broker, which saw the id in the CONNECT.
        let on: Vec<usize> = brokers.iter().map(|b| b.connection_count(&id)).collect();
        assert_eq!(on.iter().filter(|&&n| n > 0).count(), 1, "{id}: {on:?}");
        assert_eq!(on.iter().sum::<usize>(), 2, "{id}: {on:?}");
        assert!(ids.insert(id), "ids are unique");
    }
    let line = hm.wait_connection_log("client_id", ids.iter().next().unwrap()).unwrap();
    assert!(line["connect_rewrite"].contains("client_id assigned"), "{line:?}");
}

#[test]
fn mqtt_js_5_clients_learn_the_assigned_id_and_find_their_sessions_again() {
    let node = node_dir();
    let (brokers, hm) = start("");
    let script = r#"
const mqtt = require("mqtt");
const [port, tries, brokers] = [process.argv[2], +process.argv[3], process.argv[4].split(",")];
// MQTT.js wants clean start for a client without an id; the session outlives the connection
// all the same (session expiry 300 s).
const opts = (cid) => ({ clientId: cid, protocolVersion: 5, clean: cid === "", reconnectPeriod: 0,
  properties: { sessionExpiryInterval: 300 } });
const once = (c, ev) => new Promise((ok, fail) => { c.once(ev, ok); c.once("error", fail); });
const end = (c) => new Promise((ok) => c.end(false, {}, ok));
(async () => {
  for (let i = 0; i < tries; i++) {
    const topic = "assign-js/" + i;
    let c = mqtt.connect("mqtt://localhost:" + port, opts(""));
    const ack = await once(c, "connect");
    const cid = ack.properties && ack.properties.assignedClientIdentifier;
    await c.subscribeAsync(topic, { qos: 1 });
    await end(c);
    for (const b of brokers) {
      const p = mqtt.connect("mqtt://127.0.0.1:" + b, { clientId: "pub-js-" + i + "-" + b, reconnectPeriod: 0 });
      await once(p, "connect");
      await p.publishAsync(topic, "queued " + i, { qos: 1 });
      await end(p);
    }
    c = mqtt.connect("mqtt://localhost:" + port, opts(cid));
    const got = [];
    c.on("message", (t, m) => got.push(m.toString()));
    const again = await once(c, "connect");
    await new Promise((ok) => { const t = setInterval(() => { if (got.length) { clearInterval(t); ok(); } }, 20);
      setTimeout(() => { clearInterval(t); ok(); }, 5000); });
    await end(c);
    console.log("try", i, "id", cid, "present", again.sessionPresent, "messages", JSON.stringify(got));
  }
  process.exit(0);
})().catch((e) => { console.log("error " + e.message); process.exit(1); });
setTimeout(() => { console.log("timeout"); process.exit(1); }, 120000);
"#;
    let path = hm.dir.path().join("assign.js");
    std::fs::write(&path, script).unwrap();
    let ports: Vec<String> = brokers.iter().map(|b| b.port.to_string()).collect();
    let tries = 20;
    let out = run_with_timeout(
        Command::new("node")
            .arg(&path)
            .args([&hm.port("mqtt").to_string(), &tries.to_string(), &ports.join(",")])
            .env("NODE_PATH", node.join("node_modules")),
        CMD_TIMEOUT * 4,
    );
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("try ")).collect();
    assert_eq!(lines.len(), tries, "{text}");
    for line in lines {
        let id = check_try(line);
        let on: Vec<usize> = brokers.iter().map(|b| b.connection_count(&id)).collect();
        assert_eq!(on.iter().sum::<usize>(), 2, "{id}: {on:?}");
        assert_eq!(on.iter().filter(|&&n| n > 0).count(), 1, "{id}: {on:?}");
    }
}

/// An MQTT 3.1.1 client without a client-id cannot learn one (its CONNACK has no properties):
/// its CONNACK is untouched, the broker assigns its own id, and it is routed by its address:
/// every such connection from one address reaches the same broker.
#[test]
fn mqtt_3_1_1_clients_without_a_client_id_keep_their_connack_and_are_routed_by_address() {
    let (_brokers, hm) = start("");
    let mut held = Vec::new();
    for _ in 0..6 {
        let (s, ack) = mqtt_connect(hm.port("mqtt"), MqttVersion::V311, "");
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
        held.push(s);
    }
    let (status, body) = http_get(&hm.admin_addr(), "/backends");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let active: Vec<u64> =
        v["pools"][0]["brokers"].as_array().unwrap().iter().map(|b| b["active"].as_u64().unwrap()).collect();
    assert_eq!(active.iter().filter(|&&n| n > 0).collect::<Vec<_>>(), vec![&6], "{body}");
}
