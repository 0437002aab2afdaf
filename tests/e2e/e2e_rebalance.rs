//! Devices coming home after a rollout, against three real mosquitto brokers with TCP health
//! checks: a rolling restart with `rebalance = "home"` ends with every client on its first
//! choice and `harbormaster_connections_away_from_home` back to 0; with `rebalance = "off"`
//! the clients stay away until `POST /pools/{pool}/rebalance` moves them.
//!
//! The clients are cheap: one tokio task each that holds an MQTT 3.1.1 connection and
//! reconnects (after a short pause) whenever it is closed, as devices do.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::support::mqtt::{self, ConnectOptions, MqttVersion};
use crate::support::*;

const TOKEN: &str = "rebalance-operator-token";
/// Long enough for a rolling restart of three brokers and the moves home behind it.
const ROLLOUT_WAIT: Duration = Duration::from_secs(120);

/// `n` clients, each a task holding a connection to harbormaster's `port` under its own
/// client-id and reconnecting 50–250 ms after it is closed, until the runtime is dropped.
struct Fleet {
    ids: Vec<String>,
    stop: CancellationToken,
    _rt: tokio::runtime::Runtime,
}

impl Fleet {
    fn start(port: u16, prefix: &str, n: usize) -> Fleet {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let stop = CancellationToken::new();
        let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:04}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let (id, stop) = (id.clone(), stop.clone());
            let pause = Duration::from_millis(50 + (i as u64 * 37) % 200);
            rt.spawn(async move {
                // Keep-alive 0: the connections idle for the whole test without PINGREQs.
                let connect =
                    mqtt::connect_with(MqttVersion::V311, &id, &ConnectOptions { clean: true, ..Default::default() });
                while !stop.is_cancelled() {
                    if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        if s.write_all(&connect).await.is_ok() {
                            let mut buf = [0u8; 64];
                            loop {
                                tokio::select! {
                                    r = s.read(&mut buf) => if !matches!(r, Ok(n) if n > 0) { break },
                                    _ = stop.cancelled() => return,
                                }
                            }
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            });
        }
        Fleet { ids, stop, _rt: rt }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One authenticated POST over a fresh connection: the status and the JSON body.
fn post(admin: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let sa: SocketAddr = admin.parse().unwrap();
    let mut s = TcpStream::connect(sa).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "POST {path} HTTP/1.1\r\nHost: {admin}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response head: {text:?}"));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap();
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")))
}

/// Three brokers m1..m3 in pool "brokers", TCP health checks every 200 ms, `pool_extra`, and
/// the admin token file `admin.tokens` (written by the test).
fn config(brokers: &[(&str, &Mosquitto)], pool_extra: &str) -> String {
    let extra = format!(
        "health = {{ check = \"tcp\", interval = \"200ms\", timeout = \"200ms\", rise = 2, fall = 2 }}\n{pool_extra}"
    );
    format!("{}token_file = \"admin.tokens\"\n", one_pool_config(0, 0, brokers, &extra))
}

/// How many of `ids` each broker is the first choice of now, by `/route`.
fn expected_homes(admin: &str, ids: &[String]) -> BTreeMap<String, usize> {
    let mut homes = BTreeMap::new();
    for id in ids {
        let (status, body) = http_get(admin, &format!("/route?client_id={id}"));
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        *homes.entry(v["broker"].as_str().unwrap().to_string()).or_insert(0) += 1;
    }
    homes
}

/// The connections relayed to each broker now, by harbormaster's per-broker gauge.
fn relayed(text: &str, names: &[&str]) -> BTreeMap<String, usize> {
    names
        .iter()
        .map(|b| {
            let n =
                metric_sum_in(text, "harbormaster_broker_connections_active", &[("pool", "brokers"), ("broker", b)]);
            (b.to_string(), n as usize)
        })
        .collect()
}

fn away(text: &str) -> f64 {
    metric_sum_in(text, "harbormaster_connections_away_from_home", &[("pool", "brokers")])
}

fn healthy(admin: &str, broker: &str) -> f64 {
    metric_sum(admin, "harbormaster_broker_healthy", &[("pool", "brokers"), ("broker", broker)])
}

/// Kills broker `name` and waits until harbormaster has marked it down and every client of
/// the fleet is connected again (to its second choice, for the broker's own clients).
fn take_down(admin: &str, m: &mut Mosquitto, name: &str, names: &[&str], clients: usize) {
    m.stop();
    assert!(wait_until(WAIT, || healthy(admin, name) == 0.0), "{name} not marked down: {}", metrics_text(admin));
    let all_back = || relayed(&metrics_text(admin), names).values().sum::<usize>() == clients;
    assert!(wait_until(WAIT, all_back), "clients not reconnected: {:?}", relayed(&metrics_text(admin), names));
}

/// Starts broker `name` again on its port and waits until harbormaster marks it healthy.
fn bring_back(admin: &str, m: &mut Mosquitto, name: &str) {
    m.restart();
    assert!(wait_until(WAIT, || healthy(admin, name) == 1.0), "{name} not marked up: {}", metrics_text(admin));
}

/// Waits until no connection is away from home and each broker holds exactly the clients
/// whose first choice it is.
fn assert_all_home(admin: &str, names: &[&str], expected: &BTreeMap<String, usize>) {
    let mut last = String::new();
    let home = wait_until(ROLLOUT_WAIT, || {
        last = metrics_text(admin);
        away(&last) == 0.0 && relayed(&last, names) == *expected
    });
    assert!(home, "away {} relayed {:?} expected {expected:?}", away(&last), relayed(&last, names));
}

#[test]
fn a_rolling_restart_with_rebalance_home_ends_with_every_client_on_its_first_choice() {
    let _heavy = heavy();
    let (mut m1, mut m2, mut m3) = (Mosquitto::start(), Mosquitto::start(), Mosquitto::start());
    let names = ["m1", "m2", "m3"];
    let brokers = [("m1", &m1), ("m2", &m2), ("m3", &m3)];
    let hm = Harbormaster::start(&config(&brokers, "rebalance = \"home\"\nrebalance_rate = 100"));
    fs::write(hm.dir.path().join("admin.tokens"), format!("{TOKEN}\n")).unwrap();
    let (port, admin) = (hm.port("mqtt"), hm.admin_addr());

    let fleet = Fleet::start(port, "roll", 300);
    let expected = expected_homes(&admin, &fleet.ids);
    assert_eq!(expected.len(), 3, "every broker is home to some: {expected:?}");
    assert!(expected.values().all(|&n| n >= 50), "{expected:?}");
    assert_all_home(&admin, &names, &expected);

    // The rollout: one broker after the other is restarted, the next once the last is healthy.
    for (name, m) in [("m1", &mut m1), ("m2", &mut m2), ("m3", &mut m3)] {
        take_down(&admin, m, name, &names, 300);
        bring_back(&admin, m, name);
    }
    assert_all_home(&admin, &names, &expected);
    assert_eq!(expected_homes(&admin, &fleet.ids), expected, "the same first choices after the rollout");
    assert!(metric_sum(&admin, "harbormaster_rebalanced_total", &[("pool", "brokers")]) > 0.0);
    let moved =
        hm.connection_logs().iter().filter(|l| l.get("close_reason").map(String::as_str) == Some("rebalanced")).count();
    assert!(moved > 0, "moves logged with close_reason=rebalanced");
    drop(fleet);
}

#[test]
fn with_rebalance_off_clients_stay_away_until_an_operator_rebalances() {
    let (mut m1, m2, m3) = (Mosquitto::start(), Mosquitto::start(), Mosquitto::start());
    let names = ["m1", "m2", "m3"];
    let brokers = [("m1", &m1), ("m2", &m2), ("m3", &m3)];
    let hm = Harbormaster::start(&config(&brokers, "close_rate = 100"));
    fs::write(hm.dir.path().join("admin.tokens"), format!("{TOKEN}\n")).unwrap();
    let (port, admin) = (hm.port("mqtt"), hm.admin_addr());

    let fleet = Fleet::start(port, "stay", 60);
    let expected = expected_homes(&admin, &fleet.ids);
    let on_m1 = expected.get("m1").copied().unwrap_or(0);
    assert!(on_m1 > 0, "{expected:?}");
    assert_all_home(&admin, &names, &expected);

    take_down(&admin, &mut m1, "m1", &names, 60);
    // While m1 is down its clients are home on their second choice.
    assert!(wait_until(WAIT, || away(&metrics_text(&admin)) == 0.0), "{}", metrics_text(&admin));
    // And an MQTT 5 device of m1's connects meanwhile, to its second choice.
    let v5_id = (0..)
        .map(|i| format!("stay-v5-{i}"))
        .find(|id| {
            let (_, body) = http_get(&admin, &format!("/route?client_id={id}"));
            serde_json::from_str::<Value>(&body).unwrap()["preference"][0] == "m1"
        })
        .unwrap();
    let (mut v5, ack) = mqtt_connect(port, MqttVersion::V5, &v5_id);
    assert!(mqtt::connack_accepted(&ack));
    let away_after = on_m1 + 1;
    bring_back(&admin, &mut m1, "m1");
    // Back and healthy: m1's clients count as away, and stay so.
    assert!(wait_until(WAIT, || away(&metrics_text(&admin)) == away_after as f64), "{}", metrics_text(&admin));
    assert_eq!(relayed(&metrics_text(&admin), &names)["m1"], 0, "nothing moved by itself");

    // The endpoint's refusals; then one round, once m1 has settled (moving > 0).
    assert_eq!(post(&admin, "/pools/brokers/rebalance", None).0, 401);
    assert_eq!(post(&admin, "/pools/nope/rebalance", Some(TOKEN)).0, 404);
    assert_eq!(http_get(&admin, "/pools/brokers/rebalance").0, 405);
    let mut answer = Value::Null;
    assert!(wait_until(WAIT, || {
        let (status, body) = post(&admin, "/pools/brokers/rebalance", Some(TOKEN));
        assert_eq!(status, 200, "{body}");
        answer = body;
        answer["moving"].as_u64() > Some(0)
    }));
    assert_eq!(answer["pool"], "brokers");
    assert_eq!(answer["away_from_home"].as_u64(), Some(away_after as u64), "{answer}");
    assert_eq!(answer["moving"].as_u64(), Some(away_after as u64), "{answer}");
    assert_eq!(answer["rate"], 100, "rebalance = \"off\": close_rate");
    // The MQTT 5 device is told to use another server (it does not reconnect here).
    let (bytes, closed) = mqtt::read_until_close(&mut v5, WAIT);
    assert!(closed, "closed");
    assert_eq!(bytes, [0xE0, 0x02, 0x9C, 0x00], "DISCONNECT 0x9C");
    assert_all_home(&admin, &names, &expected);
    assert_eq!(metric_sum(&admin, "harbormaster_rebalanced_total", &[("pool", "brokers")]), away_after as f64);
    let line = hm.wait_connection_log("client_id", &v5_id).expect("the MQTT 5 device's line");
    assert_eq!((line["close_reason"].as_str(), line["disconnect_sent"].as_str()), ("rebalanced", "0x9C"));
    let line = hm.wait_connection_log("close_reason", "rebalanced").expect("a move logged");
    assert_eq!(line["listener"], "mqtt");
    drop(fleet);
    drop((m2, m3));
}
