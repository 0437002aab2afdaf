//! Hot reload against real processes: SIGHUP and file rewrites under a live subscriber, a
//! broker removed (only its client-ids move; its connections stay, or are closed with
//! `on_backend_removed = "close"`), a certificate rotated (new handshakes only), an invalid
//! config rejected without effect, listeners added, removed and moved.

use crate::support;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use crate::support::mqtt::{self, MqttVersion};
use crate::support::*;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;

/// The value of one sample line of `/metrics` (exact name and labels), 0 when absent.
fn metric(admin: &str, series: &str) -> f64 {
    http_get(admin, "/metrics")
        .1
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')).map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0.0)
}

fn reloads(admin: &str, outcome: &str) -> f64 {
    metric(admin, &format!("harbormaster_config_reloads_total{{outcome=\"{outcome}\"}}"))
}

/// Waits until `n` reloads with `outcome` were counted.
fn wait_reloads(hm: &Harbormaster, admin: &str, outcome: &str, n: usize) {
    let ok = wait_until(WAIT, || reloads(admin, outcome) >= n as f64);
    assert!(ok, "expected {n} reloads {outcome}, got {}:\n{}", reloads(admin, outcome), hm.log());
}

/// A raw MQTT 3.1.1 client through harbormaster, CONNACK accepted.
fn open(port: u16, client_id: &str) -> TcpStream {
    let (s, ack) = mqtt_connect(port, MqttVersion::V311, client_id);
    assert!(mqtt::connack_accepted(&ack), "{client_id}: {ack:?}");
    s
}

/// PINGREQ answered by PINGRESP: the connection still relays both ways.
fn still_alive(s: &mut (impl Read + Write)) -> bool {
    s.write_all(&mqtt::pingreq()).is_ok() && mqtt::read_until_kind(s, 13).is_ok()
}

/// The first `n` client-ids `dev-NNN` whose first choice (`harbormaster route`) is `broker`.
fn ids_routed_to(config: &Path, broker: &str, n: usize) -> Vec<String> {
    let mut found = Vec::new();
    for i in 0..500 {
        let id = format!("dev-{i:03}");
        if route(config, &id, None)[0] == broker {
            found.push(id);
            if found.len() == n {
                return found;
            }
        }
    }
    panic!("fewer than {n} of 500 ids route to {broker}");
}

#[test]
fn a_subscriber_keeps_receiving_while_the_config_is_reloaded() {
    let (m1, m2) = (Mosquitto::start(), Mosquitto::start());
    let brokers = [("b1", &m1), ("b2", &m2)];
    // Each version differs, so every rewrite is a change.
    let version =
        |i: usize| one_pool_config(0, 0, &brokers, "") + &format!("\n[limits]\nconnect_timeout = \"{}s\"\n", 10 + i);
    let hm = Harbormaster::start(&version(0));
    let (port, admin) = (hm.port("mqtt"), hm.admin_addr());

    let sub = MqttClient::plain(port, MqttVersion::V311).subscribe("keeper", "reload/keep", 7);
    let on = hm.route("keeper")[0].clone();
    let broker = if on == "b1" { &m1 } else { &m2 };
    assert!(broker.wait_subscribed("keeper"), "subscriber not subscribed on {on}");
    // Published straight to the subscriber's broker: only the subscriber's path is tested.
    let publisher = MqttClient::plain(broker.port, MqttVersion::V311);
    publisher.publish_ok("pub-0", "reload/keep", "m0");
    assert!(sub.wait_for_message("m0"), "{:?}", sub.messages());

    for i in 1..=6 {
        if i % 2 == 1 {
            hm.sighup();
        } else {
            fs::write(&hm.config_path, version(i)).unwrap();
        }
        wait_reloads(&hm, &admin, "ok", i);
        let msg = format!("m{i}");
        publisher.publish_ok(&format!("pub-{i}"), "reload/keep", &msg);
        assert!(sub.wait_for_message(&msg), "{msg} not received after reload {i}: {:?}", sub.messages());
    }
    assert_eq!(reloads(&admin, "error"), 0.0, "{}", hm.log());
    let (status, messages) = sub.finish();
    assert!(status.is_some_and(|s| s.success()), "mosquitto_sub: {status:?}");
    assert_eq!(messages, (0..=6).map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert_eq!(broker.connection_count("keeper"), 1, "the subscriber reconnected");
    let log = hm.log();
    assert_eq!(log.matches("config reloaded").count(), 6, "{log}");
    assert!(log.contains("SIGHUP") && log.contains("file change"), "{log}");
}

#[test]
fn removing_a_broker_moves_only_its_client_ids_and_keeps_its_connections() {
    let (m1, m2, m3) = (Mosquitto::start(), Mosquitto::start(), Mosquitto::start());
    let all = [("b1", &m1), ("b2", &m2), ("b3", &m3)];
    let hm = Harbormaster::start(&one_pool_config(0, 0, &all, ""));
    let (port, admin) = (hm.port("mqtt"), hm.admin_addr());

    let ids: Vec<String> = (0..40).map(|i| format!("veh-{i:02}")).collect();
    let before: Vec<Vec<String>> = ids.iter().map(|id| hm.route(id)).collect();
    let on_b3 = ids.iter().zip(&before).find(|(_, r)| r[0] == "b3").map(|(id, _)| id.clone()).expect("an id on b3");

    // A subscriber on the broker that is about to go.
    let sub = MqttClient::plain(port, MqttVersion::V311).subscribe(&on_b3, "removed/t", 2);
    assert!(m3.wait_subscribed(&on_b3));

    fs::write(&hm.config_path, one_pool_config(0, 0, &all[..2], "")).unwrap();
    wait_reloads(&hm, &admin, "ok", 1);

    let mut moved = 0;
    for (id, was) in ids.iter().zip(&before) {
        let now = hm.route(id);
        if was[0] == "b3" {
            // Its own second choice, not one neighbour for all.
            assert_eq!(now[0], was[1], "{id}: {was:?} -> {now:?}");
            moved += 1;
        } else {
            assert_eq!(now[0], was[0], "{id} moved although its broker stayed: {was:?} -> {now:?}");
        }
    }
    assert!(moved > 0 && moved < ids.len(), "moved {moved}");

    // The data plane agrees: a moved id now lands on its new broker.
    let moved_id = ids.iter().zip(&before).find(|(id, r)| r[0] == "b3" && **id != on_b3).map(|(id, _)| id.clone());
    if let Some(id) = moved_id {
        let to = hm.route(&id)[0].clone();
        MqttClient::plain(port, MqttVersion::V311).publish_ok(&id, "moved/t", "x");
        let target = if to == "b1" { &m1 } else { &m2 };
        assert!(target.wait_for_client(&id, 1), "{id} did not land on {to}");
        assert!(!m3.has_client(&id));
    }

    // on_backend_removed defaults to "keep": the subscriber on b3 is still connected.
    MqttClient::plain(m3.port, MqttVersion::V311).publish_ok("direct", "removed/t", "after-removal");
    assert!(sub.wait_for_message("after-removal"), "{:?}", sub.messages());
    assert_eq!(m3.connection_count(&on_b3), 1);
    assert!(!hm.log().contains("close_reason=broker_removed"));
}

#[test]
fn with_on_backend_removed_close_its_connections_are_closed() {
    let (m1, m2) = (Mosquitto::start(), Mosquitto::start());
    let both = [("b1", &m1), ("b2", &m2)];
    let policy = "on_backend_removed = \"close\"\nclose_rate = 20";
    let hm = Harbormaster::start(&one_pool_config(0, 0, &both, policy));
    let (port, admin) = (hm.port("mqtt"), hm.admin_addr());

    let to_b2 = ids_routed_to(&hm.config_path, "b2", 6);
    let to_b1 = ids_routed_to(&hm.config_path, "b1", 3);
    let mut on_b2: Vec<TcpStream> = to_b2.iter().map(|id| open(port, id)).collect();
    let mut on_b1: Vec<TcpStream> = to_b1.iter().map(|id| open(port, id)).collect();
    for id in &to_b2 {
        assert!(m2.wait_for_client(id, 1));
    }

    fs::write(&hm.config_path, one_pool_config(0, 0, &both[..1], policy)).unwrap();
    wait_reloads(&hm, &admin, "ok", 1);

    for (s, id) in on_b2.iter_mut().zip(&to_b2) {
        let (_, closed) = mqtt::read_until_close(s, WAIT);
        assert!(closed, "{id}: the removed broker's connection stayed open");
    }
    for (s, id) in on_b1.iter_mut().zip(&to_b1) {
        assert!(still_alive(s), "{id}: a connection to a broker that stayed was touched");
    }
    let ok = wait_until(WAIT, || {
        hm.connection_logs()
            .iter()
            .filter(|l| l.get("close_reason").map(String::as_str) == Some("broker_removed"))
            .count()
            == to_b2.len()
    });
    assert!(ok, "{}", hm.log());
    assert!(hm.log().contains("closing the connections of removed brokers"));
}

/// A client config trusting every CA in `cas`.
fn trusting(cas: &[&Certs]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in cas {
        roots.add(CertificateDer::from(c.ca_der.clone())).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn serial_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("certificate");
    cert.raw_serial_as_string()
}

fn serial_of_pem(path: &Path) -> String {
    serial_of(CertificateDer::from_pem_file(path).expect("PEM certificate").as_ref())
}

fn peer_serial(s: &support::tls::TlsStream) -> String {
    serial_of(s.conn.peer_certificates().expect("server certificate")[0].as_ref())
}

#[test]
fn a_rotated_certificate_is_used_by_new_handshakes_only() {
    let m = Mosquitto::start();
    let (old, new) = (Certs::new(), Certs::new());
    let dir = tempfile::Builder::new().prefix("hm-lb-").tempdir().unwrap();
    let tls = dir.path().join("tls");
    fs::create_dir(&tls).unwrap();
    fs::copy(&old.server_cert, tls.join("server.pem")).unwrap();
    fs::copy(&old.server_key, tls.join("server.key")).unwrap();
    let config_path = dir.path().join("harbormaster.toml");
    fs::write(
        &config_path,
        format!(
            r#"
[[listener]]
name = "mqtts"
bind = "127.0.0.1:0"
pool = "brokers"

[listener.tls]
certs = [{{ cert = "tls/server.pem", key = "tls/server.key" }}]

[pool.brokers]
backends = [{broker}]

[admin]
bind = "127.0.0.1:0"
"#,
            broker = toml_str(m.addr())
        ),
    )
    .unwrap();
    let hm = Harbormaster::start_with_file(dir, config_path);
    let (port, admin) = (hm.port("mqtts"), hm.admin_addr());
    let (old_serial, new_serial) = (serial_of_pem(&old.server_cert), serial_of_pem(&new.server_cert));
    assert_ne!(old_serial, new_serial);
    let client = trusting(&[&old, &new]);

    let mut first = support::tls::connect_tls(port, "localhost", client.clone(), None).unwrap();
    assert_eq!(peer_serial(&first), old_serial);
    let ack = mqtt::connect_and_read_connack(&mut first, MqttVersion::V311, "tls-before").unwrap();
    assert!(mqtt::connack_accepted(&ack), "{ack:?}");

    // Rotate as a person or a script would: new files beside the old, renamed over them.
    fs::copy(&new.server_key, tls.join(".server.key.tmp")).unwrap();
    fs::copy(&new.server_cert, tls.join(".server.pem.tmp")).unwrap();
    fs::rename(tls.join(".server.key.tmp"), tls.join("server.key")).unwrap();
    fs::rename(tls.join(".server.pem.tmp"), tls.join("server.pem")).unwrap();

    let mut seen = String::new();
    let rotated = wait_until(WAIT, || {
        if let Ok(s) = support::tls::connect_tls(port, "localhost", client.clone(), None) {
            seen = peer_serial(&s);
        }
        seen == new_serial
    });
    assert!(rotated, "new handshakes still get serial {seen}, want {new_serial}:\n{}", hm.log());
    assert!(reloads(&admin, "ok") >= 1.0);

    // A handshake after the rotation relays like any other.
    let mut second = support::tls::connect_tls(port, "localhost", client, None).unwrap();
    assert_eq!(peer_serial(&second), new_serial);
    let ack = mqtt::connect_and_read_connack(&mut second, MqttVersion::V311, "tls-after").unwrap();
    assert!(mqtt::connack_accepted(&ack), "{ack:?}");

    // The session established before keeps its certificate and still relays.
    assert_eq!(peer_serial(&first), old_serial);
    assert!(still_alive(&mut first), "the established TLS session broke");
    assert_eq!(m.connection_count("tls-before"), 1);
}

#[test]
fn an_invalid_config_is_rejected_and_the_running_one_stays() {
    let (m1, m2) = (Mosquitto::start(), Mosquitto::start());
    let both = [("b1", &m1), ("b2", &m2)];
    let good = one_pool_config(0, 0, &both, "");
    let hm = Harbormaster::start(&good);
    let (port, admin) = (hm.port("mqtt"), hm.admin_addr());
    let route_before = hm.route("steady");
    assert_eq!(reloads(&admin, "error"), 0.0);

    // Two problems, each with its key path; the second broker would also be dropped.
    let bad = one_pool_config(0, 0, &both[..1], "backend_attempts = 0\nmax_header_bytes = 10");
    fs::write(&hm.config_path, &bad).unwrap();
    wait_reloads(&hm, &admin, "error", 1);
    assert_eq!(metric(&admin, "harbormaster_config_last_reload_successful"), 0.0);
    assert_eq!(reloads(&admin, "ok"), 0.0);
    let log = hm.log();
    assert!(log.contains("config reload rejected"), "{log}");
    // The same validation as `harbormaster check`: every problem it prints is in the log.
    let check = harbormaster(&["check", "--config", hm.config_path.to_str().unwrap()]);
    assert!(!check.status.success());
    let problems: Vec<String> = String::from_utf8_lossy(&check.stderr).lines().map(str::to_string).collect();
    assert_eq!(problems.len(), 2, "{problems:?}");
    for p in &problems {
        assert!(log.contains(p.as_str()), "{p:?} not logged:\n{log}");
    }

    // The running configuration stays: both brokers, same routes.
    let b = &route_before[0];
    let landed = if b == "b1" { &m1 } else { &m2 };
    MqttClient::plain(port, MqttVersion::V311).publish_ok("steady", "t", "x");
    assert!(landed.wait_for_client("steady", 1), "steady did not land on {b}");
    let backends = http_get(&admin, "/backends").1;
    assert!(backends.contains("\"b1\"") && backends.contains("\"b2\""), "{backends}");

    // SIGHUP with the file still invalid: rejected and counted again.
    hm.sighup();
    wait_reloads(&hm, &admin, "error", 2);

    // Fixed: applied.
    fs::write(&hm.config_path, &good).unwrap();
    wait_reloads(&hm, &admin, "ok", 1);
    assert_eq!(metric(&admin, "harbormaster_config_last_reload_successful"), 1.0);
}

#[test]
fn listeners_are_bound_and_closed_as_the_config_says() {
    let m = Mosquitto::start();
    // Chosen ahead: the reloads move listeners to ports the config names.
    let (p1, p2, p3, p4, admin_port) = (free_port(), free_port(), free_port(), free_port(), free_port());
    let admin = addr(admin_port);
    let with = |listeners: &[(&str, u16)]| {
        let mut text = String::new();
        for (name, port) in listeners {
            text += &format!("[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:{port}\"\npool = \"brokers\"\n\n");
        }
        text + &format!(
            "[pool.brokers]\nbackends = [{}]\n\n[admin]\nbind = \"127.0.0.1:{admin_port}\"\n",
            toml_str(m.addr())
        )
    };
    let hm = Harbormaster::start(&with(&[("one", p1)]));
    let mut on_one = open(p1, "on-one");

    // Added: bound and relaying.
    fs::write(&hm.config_path, with(&[("one", p1), ("two", p2)])).unwrap();
    wait_reloads(&hm, &admin, "ok", 1);
    assert!(wait_until(WAIT, || port_accepts(p2)), "listener two not bound:\n{}", hm.log());
    MqttClient::plain(p2, MqttVersion::V5).publish_ok("via-two", "t", "x");
    assert!(m.wait_for_client("via-two", 1));

    // Removed: no longer accepting; its established connection carries on.
    fs::write(&hm.config_path, with(&[("two", p2), ("three", p3)])).unwrap();
    wait_reloads(&hm, &admin, "ok", 2);
    assert!(wait_until(WAIT, || !port_accepts(p1)), "listener one still accepts:\n{}", hm.log());
    assert!(port_accepts(p2) && port_accepts(p3));
    assert!(still_alive(&mut on_one), "the connection on the removed listener was closed");

    // Moved: bound on the new address, closed on the old one.
    fs::write(&hm.config_path, with(&[("two", p4), ("three", p3)])).unwrap();
    wait_reloads(&hm, &admin, "ok", 3);
    assert!(wait_until(WAIT, || port_accepts(p4) && !port_accepts(p2)), "{}", hm.log());
    MqttClient::plain(p4, MqttVersion::V311).publish_ok("via-moved", "t", "x");
    assert!(m.wait_for_client("via-moved", 1));
    assert!(still_alive(&mut on_one));
    assert!(hm.log().contains("listener closed"));
}
