//! Connections move from the setup threads to the relay threads once they have relayed for a
//! while (`connections_settled_total`), and nothing about them changes: against a real
//! mosquitto and a real paho-mqtt client, a PUBLISH half-written before the move arrives whole
//! after it, a subscriber settled before it is published to receives it, and a drain after the
//! move still ends both at packet boundaries with their DISCONNECTs. A session that ends
//! sooner never moves.

use std::io::Write;

use crate::e2e_planned_close::{client_script, Paho};
use crate::support::mqtt::{self, MqttVersion};
use crate::support::*;

fn settled(admin: &str) -> f64 {
    metric_sum(admin, "harbormaster_connections_settled_total", &[("listener", "mqtt")])
}

#[test]
fn a_settled_connection_keeps_its_place_in_the_packets_and_closes_cleanly() {
    let m = Mosquitto::start();
    let policy = "planned_close_will = \"suppress\"\n\n[limits]\ndrain_timeout = \"2s\"";
    let mut hm = Harbormaster::start(&one_pool_config(0, 0, &[("b1", &m)], policy));
    let (port, admin) = (hm.port("mqtt"), hm.admin_addr());

    // A session that is over at once stays where it was set up.
    let (short, ack) = mqtt_connect(port, MqttVersion::V311, "settle-short");
    assert!(mqtt::connack_accepted(&ack));
    drop(short);
    let line = hm.wait_connection_log("client_id", "settle-short").unwrap();
    assert_eq!(line["close_reason"], "closed", "{line:?}");
    assert_eq!(settled(&admin), 0.0, "a session that ended at once was moved");

    let script = client_script(hm.dir.path());
    let mut sub = Paho::start(&script, "sub", port, "settle-sub", "5", "settle/t");
    let (mut publisher, ack) = mqtt_connect(port, MqttVersion::V311, "settle-pub");
    assert!(mqtt::connack_accepted(&ack));
    // Half a PUBLISH is in flight when the publisher's connection moves.
    let payload = vec![b'x'; 3000];
    let publish = mqtt::publish_qos0(MqttVersion::V311, "settle/t", &payload);
    publisher.write_all(&publish[..1500]).unwrap();
    assert!(wait_until(WAIT, || settled(&admin) >= 2.0), "both sessions should have moved:\n{}", hm.log());
    publisher.write_all(&publish[1500..]).unwrap();
    let want = format!("message settle/t {}", "x".repeat(3000));
    assert!(sub.wait_line(|l| l == want).is_some(), "the subscriber did not get the whole PUBLISH");

    // A drain after the move: the MQTT 5 subscriber is told why, the publisher's broker gets
    // a DISCONNECT in place of its Will, each at a packet boundary.
    hm.sigterm();
    assert_eq!(sub.disconnect_code(), 0x8B, "server shutting down");
    let (_, closed) = mqtt::read_until_close(&mut publisher, WAIT);
    assert!(closed);
    let line = hm.wait_connection_log("client_id", "settle-pub").unwrap();
    assert_eq!(line["close_reason"], "drained", "{line:?}");
    assert_eq!(line["broker_disconnect_sent"], "0x00", "{}", hm.log());
    let gone = wait_until(WAIT, || m.log().contains("Client settle-pub disconnected."));
    assert!(gone, "mosquitto did not see a clean DISCONNECT:\n{}", m.log());
    let line = hm.wait_connection_log("client_id", "settle-sub").unwrap();
    assert_eq!(line["disconnect_sent"], "0x8B", "{line:?}");
    assert!(hm.wait_exit(CMD_TIMEOUT).expect("exit after the drain").success(), "{}", hm.log());
}

/// Each thread of process `pid` whose name starts with `prefix`: its scheduling policy
/// (/proc/PID/task/TID/stat field 41: 0 normal, 5 `SCHED_IDLE`).
fn policies(pid: u32, prefix: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // The fields after the command name's closing parenthesis start at field 3.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        out.push(after.split(' ').nth(41 - 3).unwrap().parse().unwrap());
    }
    out
}

#[test]
fn by_default_setup_threads_run_at_idle_priority_and_relay_threads_at_normal() {
    let m = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("harbormaster.toml");
    std::fs::write(&config, one_pool_config(0, 0, &[("b1", &m)], "")).unwrap();
    let env = [("HARBORMASTER_SETUP_PRIORITY", "idle"), ("HARBORMASTER_WORKER_THREADS", "2")];
    let hm = Harbormaster::start_with_env(dir, config, &env);
    let (setup, relay) = (policies(hm.pid(), "hm-setup"), policies(hm.pid(), "hm-relay"));
    assert_eq!(setup, [5, 5], "setup threads: {setup:?}");
    assert_eq!(relay, [0, 0], "relay threads: {relay:?}");
    // And connections are served that way too, moved once settled.
    let (mut c, ack) = mqtt_connect(hm.port("mqtt"), MqttVersion::V311, "settle-idle");
    assert!(mqtt::connack_accepted(&ack));
    let admin = hm.admin_addr();
    assert!(wait_until(WAIT, || settled(&admin) >= 1.0), "{}", hm.log());
    c.write_all(&[0xC0, 0]).unwrap(); // PINGREQ
    let mut pingresp = [0u8; 2];
    use std::io::Read;
    c.read_exact(&mut pingresp).unwrap();
    assert_eq!(pingresp, [0xD0, 0]);
}
