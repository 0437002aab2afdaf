//! Draining one broker at run time through the admin server, against real mosquitto brokers
//! and a real MQTT 5 client (paho-mqtt): the bearer tokens of `[admin] token_file`, the
//! evacuation (DISCONNECT 0x9C, the client's second choice), the admin state in `/backends`
//! across a reload, enable, and the refusals (403 without a token file, 401, 404, 405).

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;

use serde_json::Value;

use crate::e2e_planned_close::{client_script, ids_routed_to, Paho};
use crate::support::mqtt::{self, MqttVersion};
use crate::support::*;

const TOKEN: &str = "s3cret-operator-token";

/// One request over a fresh connection: the status, the response head and the body.
fn call(admin: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String, String) {
    let sa: SocketAddr = admin.parse().unwrap();
    let mut s = TcpStream::connect(sa).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {admin}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response head: {text:?}"));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap();
    (status, head.to_string(), body.to_string())
}

fn post(admin: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let (status, _, body) = call(admin, "POST", path, token);
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")))
}

/// The `/backends` entry of broker `name` of pool "brokers".
fn broker_entry(admin: &str, name: &str) -> Value {
    let (status, body) = http_get(admin, "/backends");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let pool = v["pools"].as_array().unwrap().iter().find(|p| p["name"] == "brokers").unwrap().clone();
    pool["brokers"].as_array().unwrap().iter().find(|b| b["identity"] == name).unwrap().clone()
}

fn config_with_tokens(both: &[(&str, &Mosquitto)], extra_comment: &str) -> String {
    format!("{}token_file = \"admin.tokens\"\n{extra_comment}", one_pool_config(0, 0, both, "close_rate = 50"))
}

#[test]
fn a_drained_broker_moves_its_clients_to_their_second_choice_until_enabled() {
    let (m1, m2) = (Mosquitto::start(), Mosquitto::start());
    let both = [("b1", &m1), ("b2", &m2)];
    let hm = Harbormaster::start(&config_with_tokens(&both, ""));
    // The file is read at request time: written after the start, it counts.
    fs::write(hm.dir.path().join("admin.tokens"), format!("# operators\n{TOKEN}\n")).unwrap();
    let (port, admin) = (hm.port("mqtt"), hm.admin_addr());
    let script = client_script(hm.dir.path());
    let ids = ids_routed_to(&hm.config_path, "evac", "b2", 3);
    let mut v5 = Paho::start(&script, "plain", port, &ids[0], "5", "");
    let (mut v311, ack) = mqtt_connect(port, MqttVersion::V311, &ids[1]);
    assert!(mqtt::connack_accepted(&ack));
    assert!(m2.wait_for_client(&ids[0], 1) && m2.wait_for_client(&ids[1], 1));
    assert_eq!(broker_entry(&admin, "b2")["admin_state"], "enabled");

    // No token, a wrong one, another scheme: 401 with the challenge; nothing changes.
    for token in [None, Some("wrong"), Some("")] {
        let (status, head, _) = call(&admin, "POST", "/backends/brokers/b2/drain", token);
        assert_eq!(status, 401, "{token:?}");
        assert!(head.to_ascii_lowercase().contains("www-authenticate: bearer"), "{head}");
    }
    assert_eq!(broker_entry(&admin, "b2")["admin_state"], "enabled");

    let (status, body) = post(&admin, "/backends/brokers/b2/drain", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["admin_state"], "drained");
    assert_eq!(body["changed"], true);
    assert_eq!(body["close_rate"], 50);
    assert!(body["since"].is_string(), "{body}");

    // The MQTT 5 client is told to use another server; the 3.1.1 one is closed plainly.
    assert_eq!(v5.disconnect_code(), 0x9C);
    let (bytes, closed) = mqtt::read_until_close(&mut v311, WAIT);
    assert!(closed && bytes.is_empty(), "{bytes:02x?}");
    let line = hm.wait_connection_log("client_id", &ids[0]).unwrap();
    assert_eq!(line["close_reason"], "broker_drained");
    assert_eq!(line["disconnect_sent"], "0x9C");

    // Reconnecting, and connecting anew, they land on their second choice.
    for id in [&ids[0], &ids[2]] {
        let (_c, ack) = mqtt_connect(port, MqttVersion::V5, id);
        assert!(mqtt::connack_accepted(&ack));
        assert!(m1.wait_for_client(id, 1), "{id} on b1");
    }
    assert_eq!(m2.connection_count(&ids[2]), 0, "never sent to the drained broker");

    let entry = broker_entry(&admin, "b2");
    assert_eq!(entry["admin_state"], "drained");
    assert_eq!(entry["admin_state_since"], body["since"]);
    assert_eq!(broker_entry(&admin, "b1")["admin_state"], "enabled");
    let (_, again) = post(&admin, "/backends/brokers/b2/drain", Some(TOKEN));
    assert_eq!((again["changed"].clone(), again["since"].clone()), (Value::Bool(false), body["since"].clone()));

    // A reload keeps the broker's state, and so its drain.
    let reloads = |outcome: &str| metric_sum(&admin, "harbormaster_config_reloads_total", &[("outcome", outcome)]);
    let before = reloads("ok");
    fs::write(&hm.config_path, config_with_tokens(&both, "# reloaded\n")).unwrap();
    hm.sighup();
    assert!(wait_until(WAIT, || reloads("ok") > before), "{}", hm.log());
    assert_eq!(broker_entry(&admin, "b2")["admin_state"], "drained");
    let (_c, ack) = mqtt_connect(port, MqttVersion::V311, &ids[2]);
    assert!(mqtt::connack_accepted(&ack));
    assert!(m1.wait_for_client(&ids[2], 2), "still avoided after the reload");
    assert_eq!(m2.connection_count(&ids[2]), 0);

    // The tokens file is re-read when it changes.
    fs::write(hm.dir.path().join("admin.tokens"), "another-token-entirely\n").unwrap();
    assert_eq!(post(&admin, "/backends/brokers/b2/enable", Some(TOKEN)).0, 401);
    let (status, body) = post(&admin, "/backends/brokers/b2/enable", Some("another-token-entirely"));
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["admin_state"].as_str(), body["changed"].as_bool()), (Some("enabled"), Some(true)));
    let entry = broker_entry(&admin, "b2");
    assert_eq!(entry["admin_state"], "enabled");
    assert!(entry["admin_state_since"].is_string());
    let (_c, ack) = mqtt_connect(port, MqttVersion::V311, &ids[1]);
    assert!(mqtt::connack_accepted(&ack));
    assert!(m2.wait_for_client(&ids[1], 2), "back in rotation: {}", m2.log());
}

#[test]
fn without_a_token_file_mutations_are_forbidden_and_gets_are_unchanged() {
    let m = Mosquitto::start();
    let hm = Harbormaster::start(&one_pool_config(0, 0, &[("b1", &m)], ""));
    let admin = hm.admin_addr();
    let (status, body) = post(&admin, "/backends/brokers/b1/drain", Some(TOKEN));
    assert_eq!(status, 403);
    assert!(body["error"].as_str().unwrap().contains("[admin] token_file"), "{body}");
    let (status, head, _) = call(&admin, "GET", "/backends/brokers/b1/drain", None);
    assert_eq!(status, 405);
    assert!(head.to_ascii_lowercase().contains("allow: post"), "{head}");
    assert_eq!(http_get(&admin, "/backends").0, 200);
    assert_eq!(call(&admin, "POST", "/backends", Some(TOKEN)).0, 405, "reads stay GET-only");
    assert_eq!(broker_entry(&admin, "b1")["admin_state"], "enabled");
    assert!(!hm.log().contains(TOKEN), "tokens are never logged");
}

#[test]
fn unknown_names_are_404_and_concurrent_drains_and_enables_stay_consistent() {
    let (m1, m2) = (Mosquitto::start(), Mosquitto::start());
    let both = [("b1", &m1), ("b2", &m2)];
    let hm = Harbormaster::start(&config_with_tokens(&both, ""));
    fs::write(hm.dir.path().join("admin.tokens"), format!("{TOKEN}\n")).unwrap();
    let admin = hm.admin_addr();
    for path in ["/backends/nopool/b1/drain", "/backends/brokers/nobroker/drain", "/backends/brokers/nobroker/enable"] {
        let (status, body) = post(&admin, path, Some(TOKEN));
        assert_eq!(status, 404, "{path}: {body}");
    }
    let workers: Vec<_> = (0..8)
        .map(|i| {
            let admin = admin.clone();
            thread::spawn(move || {
                for j in 0..10 {
                    let action = if (i + j) % 2 == 0 { "drain" } else { "enable" };
                    let (status, body) = post(&admin, &format!("/backends/brokers/b1/{action}"), Some(TOKEN));
                    assert_eq!(status, 200, "{body}");
                    assert_eq!(body["admin_state"], if action == "drain" { "drained" } else { "enabled" });
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(post(&admin, "/backends/brokers/b1/drain", Some(TOKEN)).1["admin_state"], "drained");
    assert_eq!(broker_entry(&admin, "b1")["admin_state"], "drained");
    assert_eq!(post(&admin, "/backends/brokers/b1/enable", Some(TOKEN)).1["admin_state"], "enabled");
    assert_eq!(broker_entry(&admin, "b1")["admin_state"], "enabled");
    assert_eq!(broker_entry(&admin, "b2")["admin_state"], "enabled");
    assert!(!hm.log().contains(TOKEN), "tokens are never logged");
}
