//! harbormaster in front of real mosquitto 2.0 brokers (`proxy_protocol = "none"`): TLS
//! termination with client certificates for MQTT 3.1, 3.1.1 and 5.0, client-id routing that
//! matches `harbormaster route`, failover to the next broker, pipelined CONNECT + PUBLISH; a
//! mosquitto bridge (`try_private`) connecting through harbormaster as a bridge.

use std::collections::{BTreeMap, BTreeSet};

use crate::support::mqtt::{self, MqttVersion};
use crate::support::tls::{self, ClientTlsChoice};
use crate::support::*;

/// Three brokers behind a TLS listener with client_auth = required, one with optional and a
/// plain one.
struct Setup {
    brokers: Vec<Mosquitto>,
    certs: Certs,
    hm: Harbormaster,
    required_port: u16,
    optional_port: u16,
    plain_port: u16,
}

impl Setup {
    fn start(n_brokers: usize, extra_backends: &[String]) -> Setup {
        let brokers = Mosquitto::start_n(n_brokers);
        let certs = Certs::new();
        let mut backends: Vec<String> = brokers.iter().map(|b| toml_str(b.addr())).collect();
        backends.extend(extra_backends.iter().map(toml_str));
        let config = format!(
            r#"
[[listener]]
name = "mqtts-required"
bind = "127.0.0.1:0"
pool = "brokers"
{tls_required}
[[listener]]
name = "mqtts-optional"
bind = "127.0.0.1:0"
pool = "brokers"
{tls_optional}
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "brokers"

[pool.brokers]
backends = [{backends}]
hash_key = "client_id"
empty_client_id = "least_connections"
proxy_protocol = "none"
backend_connect_timeout = "2s"
backend_attempts = 3

[limits]
connect_timeout = "10s"
drain_timeout = "2s"
"#,
            tls_required = certs.listener_tls_toml("required"),
            tls_optional = certs.listener_tls_toml("optional"),
            backends = backends.join(", "),
        );
        let hm = Harbormaster::start(&config);
        let (required_port, optional_port, plain_port) =
            (hm.port("mqtts-required"), hm.port("mqtts-optional"), hm.port("mqtt"));
        Setup { brokers, certs, hm, required_port, optional_port, plain_port }
    }

    fn broker(&self, addr: &str) -> &Mosquitto {
        self.brokers
            .iter()
            .find(|b| b.addr() == addr)
            .unwrap_or_else(|| panic!("route named {addr}, which is none of the brokers"))
    }

    /// Asserts that `client_id` connected `n` times to the broker at `addr` with protocol
    /// `v`, and never to any other broker.
    fn assert_landed(&self, client_id: &str, addr: &str, n: usize, v: MqttVersion) {
        let b = self.broker(addr);
        assert!(
            b.wait_for_client(client_id, n),
            "{client_id} did not connect {n} time(s) to {addr} (its route); broker log:\n{}",
            b.log()
        );
        for c in b.connections().iter().filter(|c| c.client_id == client_id) {
            assert_eq!(c.protocol, mosquitto_protocol_tag(v), "{client_id}: {c:?}");
        }
        assert_eq!(b.connection_count(client_id), n, "{client_id} on {addr}");
        for other in self.brokers.iter().filter(|o| o.addr() != addr) {
            assert_eq!(
                other.connection_count(client_id),
                0,
                "{client_id} also connected to {} (route says {addr})",
                other.addr()
            );
        }
    }
}

/// A client-id (prefix + counter) whose first route choice is `target`.
fn id_routed_to(hm: &Harbormaster, prefix: &str, target: &str) -> String {
    for k in 0..200 {
        let id = format!("{prefix}-{k}");
        if hm.route(&id)[0] == target {
            return id;
        }
    }
    panic!("no client-id {prefix}-* routes to {target} in 200 tries");
}

#[test]
fn tls_clients_of_every_version_land_on_the_broker_route_names() {
    let s = Setup::start(3, &[]);
    let mut used_brokers = BTreeSet::new();
    let mut n = 0;
    for v in MqttVersion::ALL {
        for i in 0..4 {
            n += 1;
            // alternate the two TLS listeners; both with the client certificate
            let port = if n % 2 == 0 { s.required_port } else { s.optional_port };
            let client = MqttClient::tls(port, v, s.certs.client_tls(true));
            let pub_id = format!("dev-{}-{i}", v.mosquitto_arg());
            let route = s.hm.route(&pub_id);
            assert_eq!(route.len(), 3, "route lists every broker: {route:?}");
            let target = route[0].clone();
            used_brokers.insert(target.clone());
            // A subscriber whose id routes to the same broker, also through harbormaster.
            let sub_id = id_routed_to(&s.hm, &format!("sub-{}-{i}", v.mosquitto_arg()), &target);
            let topic = format!("hm/{pub_id}");
            let sub = client.subscribe(&sub_id, &topic, 1);
            assert!(
                s.broker(&target).wait_subscribed(&sub_id),
                "{sub_id} never subscribed on {target}: {}",
                sub.stderr()
            );
            let msg = format!("hello-{pub_id}");
            client.publish_ok(&pub_id, &topic, &msg);
            let (status, msgs) = sub.finish();
            assert!(status.is_some_and(|st| st.success()), "{sub_id}: {status:?}");
            assert_eq!(msgs, vec![msg.clone()], "{sub_id} via {target}");
            s.assert_landed(&pub_id, &target, 1, v);
            s.assert_landed(&sub_id, &target, 1, v);

            // Reconnect: the same broker again.
            client.publish_ok(&pub_id, &topic, &msg);
            s.assert_landed(&pub_id, &target, 2, v);

            // harbormaster's end-of-connection line names the broker and the TLS facts
            let log =
                s.hm.wait_connection_log("client_id", &pub_id)
                    .unwrap_or_else(|| panic!("no connection log for {pub_id}:\n{}", s.hm.log()));
            assert_eq!(log.get("broker"), Some(&target), "{log:?}");
            assert_eq!(log.get("sni").map(String::as_str), Some("localhost"), "{log:?}");
            let listener = if port == s.required_port { "mqtts-required" } else { "mqtts-optional" };
            assert_eq!(log.get("listener").map(String::as_str), Some(listener), "{log:?}");
            for key in [
                "conn_id",
                "client_addr",
                "tls_version",
                "mqtt_version",
                "bytes_in",
                "bytes_out",
                "duration",
                "close_reason",
            ] {
                assert!(log.contains_key(key), "{key} missing from {log:?}");
            }
            assert!(log["client_addr"].starts_with("127.0.0.1:"), "{log:?}");
            assert!(log["tls_version"].starts_with("TLSv1."), "{log:?}");
            assert!(!log["mqtt_version"].is_empty(), "{log:?}");
        }
    }
    assert!(used_brokers.len() >= 2, "12 client-ids all routed to one broker: {used_brokers:?}");
}

#[test]
fn client_auth_required_refuses_clients_without_a_certificate() {
    let s = Setup::start(1, &[]);
    let b = &s.brokers[0];
    // required: no certificate → the handshake fails, nothing reaches the broker
    let out = MqttClient::tls(s.required_port, MqttVersion::V311, s.certs.client_tls(false)).publish(
        "nocert-required",
        "t",
        "m",
    );
    assert!(!out.status.success(), "a client without certificate got through a client_auth = required listener");
    // optional: no certificate is fine
    MqttClient::tls(s.optional_port, MqttVersion::V5, s.certs.client_tls(false)).publish_ok(
        "nocert-optional",
        "t",
        "m",
    );
    // required, with the certificate
    MqttClient::tls(s.required_port, MqttVersion::V31, s.certs.client_tls(true)).publish_ok("cert-required", "t", "m");
    assert!(b.wait_for_client("nocert-optional", 1));
    assert!(b.wait_for_client("cert-required", 1));
    assert_eq!(b.connection_count("nocert-required"), 0, "{}", b.log());

    // A client certificate from another CA is refused on both TLS listeners.
    let other = Certs::with_client_cn("intruder");
    let foreign = ClientTls {
        cafile: s.certs.ca.clone(),
        cert: Some(other.client_cert.clone()),
        key: Some(other.client_key.clone()),
    };
    for port in [s.required_port, s.optional_port] {
        let out = MqttClient::tls(port, MqttVersion::V311, foreign.clone()).publish("foreign-cert", "t", "m");
        assert!(!out.status.success(), "foreign client cert accepted on {port}");
    }
    assert_eq!(b.connection_count("foreign-cert"), 0, "{}", b.log());
}

#[test]
fn failover_to_the_second_choice_when_the_first_broker_is_down() {
    let dead = addr(free_port()); // nothing listens here
    let s = Setup::start(2, std::slice::from_ref(&dead));
    let mut dead_first = Vec::new();
    let mut alive_first = Vec::new();
    for i in 0..40 {
        let id = format!("fo-{i}");
        let route = s.hm.route(&id);
        assert_eq!(route.len(), 3, "{route:?}");
        if route[0] == dead {
            dead_first.push((id, route));
        } else if alive_first.len() < 3 {
            alive_first.push((id, route));
        }
    }
    assert!(!dead_first.is_empty(), "no client-id of 40 routes first to the dead broker");
    let versions = MqttVersion::ALL;
    for (k, (id, route)) in dead_first.iter().take(6).enumerate() {
        let v = versions[k % 3];
        let client = if k % 2 == 0 {
            MqttClient::plain(s.plain_port, v)
        } else {
            MqttClient::tls(s.required_port, v, s.certs.client_tls(true))
        };
        client.publish_ok(id, "fo/t", "m");
        s.assert_landed(id, &route[1], 1, v);
        let log =
            s.hm.wait_connection_log("client_id", id)
                .unwrap_or_else(|| panic!("no connection log for {id}:\n{}", s.hm.log()));
        assert_eq!(log.get("broker"), Some(&route[1]), "{log:?}");
    }
    for (id, route) in &alive_first {
        MqttClient::plain(s.plain_port, MqttVersion::V311).publish_ok(id, "fo/t", "m");
        s.assert_landed(id, &route[0], 1, MqttVersion::V311);
    }
}

#[test]
fn pipelined_connect_and_publish_in_one_write_are_delivered() {
    let s = Setup::start(1, &[]);
    let b = &s.brokers[0];
    let watcher = MqttClient::plain(b.port, MqttVersion::V311).subscribe("pipe-watch", "pipe/#", 2);
    assert!(b.wait_subscribed("pipe-watch"));

    // plain, 3.1.1: CONNECT + PUBLISH + PINGREQ in one write, before any CONNACK
    let mut bytes = mqtt::connect(MqttVersion::V311, "pipe-plain");
    bytes.extend(mqtt::publish_qos0(MqttVersion::V311, "pipe/plain", b"pipelined-plain"));
    bytes.extend(mqtt::pingreq());
    let mut c = tcp_client(s.plain_port);
    let connack = mqtt::send_and_read_connack(&mut c, &bytes).unwrap();
    assert_eq!(connack, vec![0x20, 0x02, 0x00, 0x00]);
    let pingresp = mqtt::read_packet(&mut c).unwrap().expect("PINGRESP");
    assert_eq!(pingresp.bytes(), vec![0xD0, 0x00]);

    // TLS, 5.0: the same in one TLS write
    let cfg = tls::client_config(&s.certs, true, ClientTlsChoice::Default);
    let mut t = tls::connect_tls(s.required_port, "localhost", cfg, None).unwrap();
    let mut bytes = mqtt::connect(MqttVersion::V5, "pipe-tls");
    bytes.extend(mqtt::publish_qos0(MqttVersion::V5, "pipe/tls", b"pipelined-tls"));
    let connack = mqtt::send_and_read_connack(&mut t, &bytes).unwrap();
    assert!(mqtt::connack_accepted(&connack), "{connack:?}");

    let (status, msgs) = watcher.finish();
    assert!(status.is_some_and(|st| st.success()), "{status:?} {msgs:?}");
    let got: BTreeSet<String> = msgs.into_iter().collect();
    let want: BTreeSet<String> = ["pipelined-plain", "pipelined-tls"].map(String::from).into();
    assert_eq!(got, want);
    assert!(b.has_client("pipe-plain") && b.has_client("pipe-tls"));
}

#[test]
fn route_spreads_client_ids_over_all_brokers() {
    // Cheap sanity check of the routing oracle used by the tests above, on a running setup.
    let s = Setup::start(3, &[]);
    let mut per_broker: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..60 {
        let r = s.hm.route(&format!("spread-{i}"));
        let mut sorted = r.clone();
        sorted.sort();
        let mut all: Vec<String> = s.brokers.iter().map(|b| b.addr()).collect();
        all.sort();
        assert_eq!(sorted, all, "route must list every broker once: {r:?}");
        *per_broker.entry(r[0].clone()).or_default() += 1;
    }
    assert_eq!(per_broker.len(), 3, "{per_broker:?}");
}

/// A mosquitto "edge" bridges to a "core" mosquitto through harbormaster, as mosquitto bridges
/// do by default (`try_private true`: protocol level 0x84, the bridge bit on 3.1.1). The core
/// must see a bridge at once, not an ordinary client after a refusal and a retry without the
/// bit: only a bridge gets mosquitto's loop detection, and a topic bridged `both` ways would
/// otherwise come back to the edge.
#[test]
fn a_mosquitto_bridge_connects_through_as_a_bridge() {
    let core = Mosquitto::start();
    let hm = Harbormaster::start(&one_pool_config(0, 0, &[("core", &core)], "proxy_protocol = \"none\""));
    let port = hm.port("mqtt");
    // After a refusal mosquitto would retry within a second, without the bridge bit: the
    // checks below see that retry.
    let edge = Mosquitto::start_with(&format!(
        "persistence false\n\
         connection core\n\
         address 127.0.0.1:{port}\n\
         remote_clientid edge-bridge\n\
         try_private true\n\
         cleansession true\n\
         restart_timeout 1\n\
         topic up/# out 1\n\
         topic down/# in 1\n\
         topic both/# both 1\n"
    ));

    // The core logs a bridge, with the 3.1.1 protocol tag: the level byte arrived as sent.
    assert!(wait_until(WAIT, || core.log().contains(" as edge-bridge (p2, ")), "the bridge never reached the core");
    assert!(core.wait_subscribed("edge-bridge"), "the bridge never subscribed on the core");
    let log = core.log();
    assert!(log.contains("New bridge connected from 127.0.0.1:"), "the core took the bridge for a client:\n{log}");
    assert_eq!(
        core.connections().iter().filter(|c| c.client_id == "edge-bridge").count(),
        0,
        "the bridge connected as an ordinary client:\n{log}"
    );
    assert!(!hm.log().contains("unsupported_protocol"), "harbormaster refused the bridge:\n{}", hm.log());

    // Out: published on the edge, received on the core.
    let core_sub = MqttClient::plain(core.port, MqttVersion::V311).subscribe("core-sub", "#", 100);
    assert!(core.wait_subscribed("core-sub"));
    MqttClient::plain(edge.port, MqttVersion::V311).publish_ok("edge-pub", "up/1", "edge-to-core");
    assert!(core_sub.wait_for_message("edge-to-core"), "edge → core did not arrive");

    // In: published on the core, received on the edge.
    let edge_sub = MqttClient::plain(edge.port, MqttVersion::V311).subscribe("edge-sub", "#", 100);
    assert!(edge.wait_subscribed("edge-sub"));
    MqttClient::plain(core.port, MqttVersion::V311).publish_ok("core-pub", "down/1", "core-to-edge");
    assert!(edge_sub.wait_for_message("core-to-edge"), "core → edge did not arrive");

    // Both ways: a message from the edge reaches the core once and is not sent back over the
    // bridge. A marker published on the core after the core had the message travels the same
    // connection behind any echo, so once the edge has the marker an echo would be there too.
    MqttClient::plain(edge.port, MqttVersion::V311).publish_ok("edge-pub", "both/1", "round-trip");
    assert!(core_sub.wait_for_message("round-trip"), "edge → core on a `both` topic did not arrive");
    MqttClient::plain(core.port, MqttVersion::V311).publish_ok("core-pub", "down/2", "marker");
    assert!(edge_sub.wait_for_message("marker"), "the marker did not arrive");
    let on_edge = edge_sub.messages().iter().filter(|m| *m == "round-trip").count();
    assert_eq!(on_edge, 1, "the edge got its own message back: {:?}", edge_sub.messages());
    let on_core = core_sub.messages().iter().filter(|m| *m == "round-trip").count();
    assert_eq!(on_core, 1, "the core got the message {on_core} times: {:?}", core_sub.messages());
    let echoes =
        core.log().lines().filter(|l| l.contains("Sending PUBLISH to edge-bridge") && l.contains("'both/1'")).count();
    assert_eq!(echoes, 0, "the core sent the bridge its own message back:\n{}", core.log());

    // harbormaster's connection line names the bridge once it ends.
    drop(edge);
    let line = hm.wait_connection_log("client_id", "edge-bridge").expect("a connection line for the bridge");
    assert_eq!(line.get("bridge").map(String::as_str), Some("true"), "{line:?}");
    assert_eq!(line.get("mqtt_version").map(String::as_str), Some("3.1.1"), "{line:?}");
    assert_eq!(line.get("broker").map(String::as_str), Some("core"), "{line:?}");
}
