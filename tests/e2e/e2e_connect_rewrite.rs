//! A pool's `connect` policy against a real mosquitto 2.0 (no PROXY protocol) that authorizes
//! by username with an ACL file: the client certificate's CN arrives as the username, the
//! password is dropped, a client without a certificate is refused with CONNACK "bad user name
//! or password" before any broker sees it, and the log line says what was rewritten (never
//! the password). With `backend_max_packet_size`, against a mosquitto with that
//! `max_packet_size`: a CONNECT the rewrite makes too large is refused before the broker sees it.

use std::fs;
use std::io::Write;
use std::process::Command;

use crate::support::*;

fn mosquitto_pub(certs: &Certs, port: u16, version: &str, args: &[&str], with_cert: bool) -> std::process::Output {
    let mut cmd = Command::new(require_program("mosquitto_pub"));
    cmd.args(["-h", "localhost", "-p", &port.to_string(), "-V", version, "--cafile", certs.ca.to_str().unwrap()]);
    if with_cert {
        cmd.args(["--cert", certs.client_cert.to_str().unwrap(), "--key", certs.client_key.to_str().unwrap()]);
    }
    cmd.args(args);
    run_with_timeout(&mut cmd, CMD_TIMEOUT)
}

#[test]
fn the_certificate_cn_arrives_as_the_username_and_no_certificate_is_refused() {
    let acl_dir = tempfile::tempdir().unwrap();
    let acl = acl_dir.path().join("acl");
    // Only the user named like the device may use its topics; nobody else may do anything.
    fs::write(&acl, "user device-001\ntopic readwrite devices/device-001/#\n").unwrap();
    let broker = Mosquitto::start_with(&format!("persistence false\nacl_file {}\n", acl.display()));
    let certs = Certs::new();
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "mqtts"
bind = "127.0.0.1:0"
pool = "hivemq"
{tls}
[pool.hivemq]
backends = [{{ name = "m0", address = "{addr}" }}]
proxy_protocol = "none"
connect = {{ username = "cert_cn", password = "drop", user_properties = ["client_address", "sni"] }}

[admin]
bind = "127.0.0.1:0"
"#,
        tls = certs.listener_tls_toml("optional"),
        addr = broker.addr(),
    ));
    let port = hm.port("mqtts");

    // A subscriber and a publisher, each with the device certificate and a username of their
    // own: the broker sees the CN, so its ACL lets them use the device's topics.
    let client = MqttClient::tls(port, MqttVersion::V311, certs.client_tls(true));
    let sub = client.subscribe("acl-sub", "devices/device-001/t", 1);
    assert!(broker.wait_subscribed("acl-sub"), "{}", broker.log());
    for (id, version) in [("acl-pub-311", "mqttv311"), ("acl-pub-5", "mqttv5")] {
        let out = mosquitto_pub(
            &certs,
            port,
            version,
            &["-i", id, "-u", "forged", "-P", "secret", "-q", "1", "-t", "devices/device-001/t", "-m", id],
            true,
        );
        assert!(out.status.success(), "{id}: {}", output_text(&out));
    }
    assert!(wait_until(WAIT, || !sub.messages().is_empty()), "{:?} {}", sub.messages(), sub.stderr());
    let log = broker.log();
    for id in ["acl-sub", "acl-pub-311", "acl-pub-5"] {
        assert!(log.contains(&format!("as {id} (")) && log.contains("u'device-001'"), "{id}:\n{log}");
    }
    assert!(!log.contains("u'forged'"), "{log}");

    let line = hm.wait_connection_log("client_id", "acl-pub-5").unwrap();
    let rewrite = &line["connect_rewrite"];
    assert!(rewrite.contains("device-001") && rewrite.contains("password dropped"), "{line:?}");
    assert!(rewrite.contains("user_properties=client_address+sni"), "{line:?}");
    assert!(!hm.log().contains("secret"), "the password must never be logged");

    // Without a certificate: CONNACK 4 (3.1.1) / 0x86 (5.0), and no broker sees the client.
    for (id, version) in [("anon-311", "mqttv311"), ("anon-5", "mqttv5")] {
        let out = mosquitto_pub(&certs, port, version, &["-i", id, "-t", "devices/device-001/t", "-m", "x"], false);
        assert!(!out.status.success(), "{id} was let through: {}", output_text(&out));
        let text = output_text(&out).to_lowercase();
        assert!(
            text.contains("bad user name or password") || text.contains("bad username or password"),
            "{id}: {text}"
        );
        let line = hm.wait_connection_log("client_id", id).unwrap();
        assert_eq!(line["close_reason"], "connect_rewrite_refused", "{line:?}");
        assert!(line["detail"].contains("{cert_cn}"), "{line:?}");
        assert!(!broker.has_client(id));
    }
    assert_eq!(rewrite_refusals(&hm.admin_addr()), (1.0, 1.0));
}

/// An MQTT 5 client (paho-mqtt) through harbormaster: connects as `argv[2]`, prints the
/// CONNACK's reason code as `rc=N`; when accepted, subscribes to a topic of its own, publishes
/// to it and prints `got=PAYLOAD` when the message comes back.
const PAHO_CONNECT_PY: &str = r#"
import sys, threading
import paho.mqtt.client as mqtt

port, cid = int(sys.argv[1]), sys.argv[2]
done, got = threading.Event(), {}
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
def on_connect(client, userdata, flags, rc, props):
    got["rc"] = rc.value
    if rc.value == 0:
        client.subscribe("cap/" + cid, qos=1)
    else:
        done.set()
def on_subscribe(client, userdata, mid, rcs, props):
    client.publish("cap/" + cid, "hello " + cid, qos=1)
def on_message(client, userdata, msg):
    got["msg"] = msg.payload.decode()
    done.set()
def on_disconnect(client, userdata, flags, rc, props):
    done.set()
c.on_connect, c.on_subscribe, c.on_message, c.on_disconnect = on_connect, on_subscribe, on_message, on_disconnect
c.connect("127.0.0.1", port, keepalive=30)
c.loop_start()
done.wait(20)
c.loop_stop()
print("rc=%s" % got.get("rc"), flush=True)
if "msg" in got:
    print("got=%s" % got["msg"], flush=True)
"#;

fn paho_connect(port: u16, client_id: &str) -> String {
    let ok = Command::new("python3").args(["-c", "import paho.mqtt.client"]).status().map(|s| s.success());
    assert!(matches!(ok, Ok(true)), "python3 with paho-mqtt 2.x is needed (scripts/test installs it)");
    let mut cmd = Command::new("python3");
    cmd.args(["-c", PAHO_CONNECT_PY, &port.to_string(), client_id]);
    output_text(&run_with_timeout(&mut cmd, CMD_TIMEOUT))
}

/// A client-id of `len` characters starting with `tag`.
fn id_of(tag: &str, len: usize) -> String {
    format!("{tag}{}", "x".repeat(len - tag.len()))
}

/// `backend_max_packet_size` against a real mosquitto configured with the same
/// `max_packet_size`: a CONNECT the pool's rewrite (username template, User Properties) makes
/// larger is refused by harbormaster (5.0: CONNACK 0x95 "packet too large", seen by paho-mqtt;
/// 3.1.1: a close without CONNACK), counted and logged with the limit named, and the broker
/// never sees it; one that stays under connects and works. A client's own CONNECT over the
/// limit (no rewrite) is refused the same way as `connect_too_large`, without a dial. Without
/// the key the broker closes on the oversized CONNECT without a CONNACK: a failed dial, and
/// the client is told "server unavailable".
#[test]
fn a_connect_the_rewrite_makes_larger_than_the_brokers_maximum_packet_size_is_refused() {
    const LIMIT: usize = 100;
    let broker = Mosquitto::start_with(&format!("persistence false\nmax_packet_size {LIMIT}\n"));
    let policy = r#"connect = { username = "tenant-a/{client_id}", user_properties = ["client_id"] }"#;
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "capped"
bind = "127.0.0.1:0"
pool = "capped"

[[listener]]
name = "uncapped"
bind = "127.0.0.1:0"
pool = "uncapped"

[[listener]]
name = "plain"
bind = "127.0.0.1:0"
pool = "plain"

[pool.capped]
backends = [{{ name = "m0", address = "{addr}" }}]
proxy_protocol = "none"
{policy}
backend_max_packet_size = {LIMIT}

[pool.uncapped]
backends = [{{ name = "m0", address = "{addr}" }}]
proxy_protocol = "none"
{policy}

[pool.plain]
backends = [{{ name = "m0", address = "{addr}" }}]
proxy_protocol = "none"
backend_max_packet_size = {LIMIT}

[admin]
bind = "127.0.0.1:0"
"#,
        addr = broker.addr(),
    ));
    let (capped, uncapped, plain) = (hm.port("capped"), hm.port("uncapped"), hm.port("plain"));
    let admin = hm.admin_addr();

    // Sizes: a 5.0 CONNECT with a client-id of L bytes and no other field is 15 + L bytes; the
    // username "tenant-a/<id>" adds 11 + L, the User Property harbormaster-client_id 27 + L:
    // 53 + 3L. A 3.1.1 one is 14 + L, rewritten 25 + 2L.
    let ok5 = id_of("p5-ok-", 10); // 83 bytes rewritten
    let big5 = id_of("p5-big-", 20); // 35 bytes sent, 113 rewritten
    let ok311 = id_of("r311-ok-", 20); // 65 rewritten
    let big311 = id_of("r311-big-", 40); // 54 sent, 105 rewritten

    // Under the limit: connected, and the broker sees the rewritten CONNECT.
    let out = paho_connect(capped, &ok5);
    assert!(out.contains("rc=0") && out.contains(&format!("got=hello {ok5}")), "{out}");
    let (mut s, ack) = mqtt_connect(capped, MqttVersion::V311, &ok311);
    assert_eq!(ack, MqttVersion::V311.connack(0, 0));
    s.write_all(&mqtt::pingreq()).unwrap();
    assert_eq!(mqtt::read_until_kind(&mut s, 13).unwrap().kind(), 13, "PINGRESP through the broker");
    drop(s);
    let log = broker.log();
    assert!(log.contains(&format!("u'tenant-a/{ok5}'")) && log.contains(&format!("u'tenant-a/{ok311}'")), "{log}");

    // Over it: 5.0 gets CONNACK 0x95 (149, "Packet too large") from harbormaster...
    let out = paho_connect(capped, &big5);
    assert!(out.contains("rc=149"), "{out}");
    // ... and 3.1.1, which has no such CONNACK, a close without one.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", capped)).unwrap();
    s.write_all(&mqtt::connect(MqttVersion::V311, &big311)).unwrap();
    let (answer, closed) = mqtt::read_until_close(&mut s, WAIT);
    assert!(closed && answer.is_empty(), "{answer:?} closed={closed}");
    for (id, len) in [(&big5, 53 + 3 * 20), (&big311, 25 + 2 * 40)] {
        let line = hm.wait_connection_log("client_id", id).unwrap();
        assert_eq!(line["close_reason"], "connect_rewrite_refused", "{line:?}");
        let want = format!(
            "the rewritten CONNECT of {len} bytes exceeds the brokers' Maximum Packet Size of {LIMIT} bytes \
             (pool \"capped\" backend_max_packet_size)"
        );
        assert_eq!(line["detail"], want, "{line:?}");
        assert!(!broker.has_client(id), "{id} reached the broker");
    }
    let text = metrics_text(&admin);
    let refused = |reason: &str, connack: &str| {
        metric_sum_in(&text, "harbormaster_connections_refused_total", &[("reason", reason), ("connack", connack)])
    };
    assert_eq!((refused("connect_rewrite_refused", "0x95"), refused("connect_rewrite_refused", "none")), (1.0, 1.0));
    let attempts = |pool: &str| metric_sum_in(&text, "harbormaster_broker_connect_attempts_total", &[("pool", pool)]);
    let ok_attempts =
        metric_sum_in(&text, "harbormaster_broker_connect_attempts_total", &[("pool", "capped"), ("outcome", "ok")]);
    assert_eq!((attempts("capped"), ok_attempts), (2.0, 2.0), "only the clients under the limit were dialled");

    // The client's own CONNECT over the limit, nothing rewritten: refused the same way, as
    // connect_too_large; one at the limit is the broker's.
    let at = id_of("plain-at-", LIMIT - 15);
    let over = id_of("plain-over-", LIMIT - 15 + 1);
    assert_eq!(mqtt::connect(MqttVersion::V5, &at).len(), LIMIT);
    let (_s, ack) = mqtt_connect(plain, MqttVersion::V5, &at);
    assert!(mqtt::connack_accepted(&ack), "{ack:?}");
    let (_s, ack) = mqtt_connect(plain, MqttVersion::V5, &over);
    assert_eq!(ack, MqttVersion::V5.connack(0, 0x95));
    let line = hm.wait_connection_log("client_id", &over).unwrap();
    assert_eq!(line["close_reason"], "connect_too_large", "{line:?}");
    assert!(line["detail"].contains(&format!("CONNECT of {} bytes exceeds the brokers'", LIMIT + 1)), "{line:?}");
    assert!(broker.wait_for_client(&at, 1) && !broker.has_client(&over), "{}", broker.log());
    assert_eq!(metric_sum(&admin, "harbormaster_broker_connect_attempts_total", &[("pool", "plain")]), 1.0);

    // Without the key the broker itself closes on the CONNECT, without a CONNACK: harbormaster
    // can only count a failed dial and answer "server unavailable".
    let (_s, ack) = mqtt_connect(uncapped, MqttVersion::V5, &big5);
    assert_eq!(ack, MqttVersion::V5.connack_server_unavailable());
    let failed = metric_sum(&admin, "harbormaster_broker_connect_attempts_total", &[("pool", "uncapped")])
        - metric_sum(&admin, "harbormaster_broker_connect_attempts_total", &[("pool", "uncapped"), ("outcome", "ok")]);
    assert_eq!(failed, 1.0);
    assert!(broker.log().contains("disconnected due to oversize packet"), "{}", broker.log());
}

/// A certificate CN that a username cannot carry, with `username = "cert_cn"` in front of a
/// real mosquitto (which closes without a CONNACK on a username holding a control character
/// or a Unicode non-character): a CN with either is not passed on at all (identity.rs holds it
/// to the characters a rewritten username may hold); the client is refused with "bad user name
/// or password" (3.1.1: 4, 5.0: 0x86), the log line's detail says why, and the broker never sees
/// the client.
#[test]
fn a_cn_a_username_cannot_carry_is_refused_with_the_reason() {
    let broker = Mosquitto::start();
    let control = Certs::with_client_cn("device\r\nforged");
    let nonchar = Certs::with_client_cn("device-\u{fffe}");
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "control"
bind = "127.0.0.1:0"
pool = "by-cn"
{control_tls}
[[listener]]
name = "nonchar"
bind = "127.0.0.1:0"
pool = "by-cn"
{nonchar_tls}
[pool.by-cn]
backends = [{{ name = "m0", address = "{addr}" }}]
proxy_protocol = "none"
connect = {{ username = "cert_cn" }}

[admin]
bind = "127.0.0.1:0"
"#,
        control_tls = control.listener_tls_toml("required"),
        nonchar_tls = nonchar.listener_tls_toml("required"),
        addr = broker.addr(),
    ));
    let cases = [
        (
            &control,
            hm.port("control"),
            "ctl",
            "the username needs {cert_cn}, which this connection does not have: the client certificate's CN is \
             not passed on (control_character)",
        ),
        (
            &nonchar,
            hm.port("nonchar"),
            "nonchar",
            "the username needs {cert_cn}, which this connection does not have: the client certificate's CN is \
             not passed on (noncharacter)",
        ),
    ];
    for (certs, port, tag, detail) in cases {
        for version in ["mqttv311", "mqttv5"] {
            let id = format!("{tag}-{version}");
            let out = mosquitto_pub(certs, port, version, &["-i", &id, "-t", "cn/t", "-m", "x"], true);
            assert!(!out.status.success(), "{id} was let through: {}", output_text(&out));
            let text = output_text(&out).to_lowercase();
            assert!(
                text.contains("bad user name or password") || text.contains("bad username or password"),
                "{id}: {text}"
            );
            let line = hm.wait_connection_log("client_id", &id).unwrap();
            assert_eq!(line["close_reason"], "connect_rewrite_refused", "{line:?}");
            assert_eq!(line["detail"], detail, "{line:?}");
            assert!(!broker.has_client(&id), "{id} reached the broker:\n{}", broker.log());
        }
    }
    let admin = hm.admin_addr();
    assert_eq!(rewrite_refusals(&admin), (2.0, 2.0));
    assert_eq!(metric_sum(&admin, "harbormaster_broker_connect_attempts_total", &[]), 0.0, "no broker was dialled");
}

/// Connections refused for their rewritten CONNECT: (3.1.1's CONNACK 0x04, 5.0's 0x86).
fn rewrite_refusals(admin: &str) -> (f64, f64) {
    let refused = |code| {
        metric_sum(
            admin,
            "harbormaster_connections_refused_total",
            &[("reason", "connect_rewrite_refused"), ("connack", code)],
        )
    };
    (refused("0x04"), refused("0x86"))
}
