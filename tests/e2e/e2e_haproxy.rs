//! HAProxy 2.6 (`bind ... accept-proxy`, a strict PROXY v2 validator) in front of mosquitto,
//! as a "PROXY-aware broker": what harbormaster's PROXY v2 header says about the client, as
//! HAProxy parsed it. Also harbormaster itself behind a PROXY-sending load balancer
//! (`accept_proxy = true`), played by the test client. And the SNI of a ClientHello that
//! `openssl s_client` sends in two records.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};

use crate::support::mqtt::{self, MqttVersion};
use crate::support::tls::{self, ClientTlsChoice};
use crate::support::*;

const ALL_TLVS: &str = r#"["alpn", "authority", "unique_id", "ssl", "crc32c", "cert_sha256", "client_id"]"#;

#[test]
fn haproxy_sees_client_address_and_sni_in_harbormaster_proxy_v2() {
    let m = Mosquitto::start();
    let h = Haproxy::start(m.port);
    let certs = Certs::new();
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "mqtts"
bind = "127.0.0.1:0"
pool = "pods"
{tls}
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "pods"

[pool.pods]
backends = ["{haproxy}"]
proxy_protocol = "v2"
tlvs = {ALL_TLVS}
"#,
        tls = certs.listener_tls_toml("optional"),
        haproxy = h.addr(),
    ));
    let (tls_port, plain_port) = (hm.port("mqtts"), hm.port("mqtt"));

    let watcher = MqttClient::plain(m.port, MqttVersion::V311).subscribe("ha-watch", "ha/#", 4);
    assert!(m.wait_subscribed("ha-watch"), "{}", m.log());

    // Over TLS with SNI `localhost`, every MQTT version, with and without a certificate.
    for (i, v) in MqttVersion::ALL.into_iter().enumerate() {
        let id = format!("ha-tls-{}", v.mosquitto_arg());
        let client = MqttClient::tls(tls_port, v, certs.client_tls(i != 1));
        client.publish_ok(&id, &format!("ha/{id}"), &format!("msg-{id}"));
        assert!(m.wait_for_client(&id, 1), "{id} never reached mosquitto");
        let log = hm
            .wait_connection_log("client_id", &id)
            .unwrap_or_else(|| panic!("no connection log for {id}:\n{}", hm.log()));
        let client_addr = log.get("client_addr").cloned().unwrap_or_default();
        let (chost, cport) =
            client_addr.rsplit_once(':').unwrap_or_else(|| panic!("client_addr {client_addr:?} in {log:?}"));
        assert_eq!(chost, "127.0.0.1", "{log:?}");
        let line = h
            .wait_for_line(|l| l.src_port == cport)
            .unwrap_or_else(|| panic!("HAProxy never logged source port {cport} of {id}:\n{}", h.log()));
        assert_eq!(line.src, "127.0.0.1", "{line:?}");
        assert_eq!(line.dst, "127.0.0.1", "{line:?}");
        assert_eq!(line.dst_port, tls_port.to_string(), "{line:?}");
        assert_eq!(line.authority, "localhost", "{line:?}");
        assert_eq!(line.rcvd_proxy, "1", "{line:?}");
        if let Some(conn_id) = log.get("conn_id") {
            assert_eq!(&line.unique_id, conn_id, "unique_id TLV vs log conn_id");
        }
    }

    // Plain listener: no SNI, so no authority.
    let id = "ha-plain";
    MqttClient::plain(plain_port, MqttVersion::V5).publish_ok(id, "ha/plain", "msg-ha-plain");
    let log =
        hm.wait_connection_log("client_id", id).unwrap_or_else(|| panic!("no connection log for {id}:\n{}", hm.log()));
    let cport = log["client_addr"].rsplit_once(':').unwrap().1.to_string();
    let line = h
        .wait_for_line(|l| l.src_port == cport)
        .unwrap_or_else(|| panic!("HAProxy never logged {cport}:\n{}", h.log()));
    assert_eq!(line.src, "127.0.0.1");
    assert_eq!(line.dst_port, plain_port.to_string());
    assert_eq!(line.authority, "-", "{line:?}");

    let (status, msgs) = watcher.finish();
    assert!(status.is_some_and(|s| s.success()), "{status:?} {msgs:?}");
    let mut msgs = msgs;
    msgs.sort();
    assert_eq!(msgs, vec!["msg-ha-plain", "msg-ha-tls-mqttv31", "msg-ha-tls-mqttv311", "msg-ha-tls-mqttv5"]);
}

#[test]
fn client_address_from_an_outer_proxy_header_is_passed_on() {
    let m = Mosquitto::start();
    let h = Haproxy::start(m.port);
    let certs = Certs::new();
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "edge"
bind = "127.0.0.1:0"
pool = "pods"
accept_proxy = true
trusted_proxies = ["127.0.0.0/8"]

[[listener]]
name = "edge-tls"
bind = "127.0.0.1:0"
pool = "pods"
accept_proxy = true
trusted_proxies = ["127.0.0.0/8"]
{tls}
[[listener]]
name = "untrusted"
bind = "127.0.0.1:0"
pool = "pods"
accept_proxy = true
trusted_proxies = ["192.0.2.0/24"]

[pool.pods]
backends = ["{haproxy}"]
proxy_protocol = "v2"
tlvs = {ALL_TLVS}
"#,
        tls = certs.listener_tls_toml("optional"),
        haproxy = h.addr(),
    ));
    let (edge, edge_tls, untrusted) = (hm.port("edge"), hm.port("edge-tls"), hm.port("untrusted"));
    let sa = |s: &str| s.parse::<SocketAddr>().unwrap();

    // PROXY v2 (built with ppp) claiming 192.0.2.7:5555, then CONNECT.
    let header = proxy_v2_header(sa("192.0.2.7:5555"), sa(&addr(edge)), &[], false);
    let mut c = TcpStream::connect(("127.0.0.1", edge)).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(&header).unwrap();
    let ack = mqtt::connect_and_read_connack(&mut c, MqttVersion::V311, "edge-v2").unwrap();
    assert_eq!(ack, vec![0x20, 0x02, 0x00, 0x00]);
    c.write_all(&mqtt::publish_qos1(MqttVersion::V311, 1, "edge/t", b"x")).unwrap();
    let puback = mqtt::read_until_kind(&mut c, 4).unwrap();
    assert_eq!(puback.bytes(), vec![0x40, 0x02, 0x00, 0x01]);
    let line = h
        .wait_for_line(|l| l.src == "192.0.2.7")
        .unwrap_or_else(|| panic!("HAProxy never logged 192.0.2.7:\n{}", h.log()));
    assert_eq!(line.src_port, "5555", "{line:?}");
    assert!(m.wait_for_client("edge-v2", 1));
    drop(c);
    let log =
        hm.wait_connection_log("client_id", "edge-v2").unwrap_or_else(|| panic!("no connection log:\n{}", hm.log()));
    assert_eq!(log.get("client_addr").map(String::as_str), Some("192.0.2.7:5555"), "{log:?}");

    // PROXY v1 claiming 192.0.2.8:6666.
    let mut c = TcpStream::connect(("127.0.0.1", edge)).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(format!("PROXY TCP4 192.0.2.8 127.0.0.1 6666 {edge}\r\n").as_bytes()).unwrap();
    let ack = mqtt::connect_and_read_connack(&mut c, MqttVersion::V5, "edge-v1").unwrap();
    assert!(mqtt::connack_accepted(&ack), "{}", hex(&ack));
    let line = h
        .wait_for_line(|l| l.src == "192.0.2.8")
        .unwrap_or_else(|| panic!("HAProxy never logged 192.0.2.8:\n{}", h.log()));
    assert_eq!(line.src_port, "6666", "{line:?}");

    // PROXY v2 before TLS: the address from the header, the SNI from the handshake.
    let header = proxy_v2_header(sa("192.0.2.9:7777"), sa(&addr(edge_tls)), &[], false);
    let cfg = tls::client_config(&certs, true, ClientTlsChoice::Default);
    let mut t = tls::connect_tls(edge_tls, "localhost", cfg, Some(&header)).unwrap();
    let ack = mqtt::connect_and_read_connack(&mut t, MqttVersion::V5, "edge-tls").unwrap();
    assert!(mqtt::connack_accepted(&ack), "{}", hex(&ack));
    let line = h
        .wait_for_line(|l| l.src == "192.0.2.9")
        .unwrap_or_else(|| panic!("HAProxy never logged 192.0.2.9:\n{}", h.log()));
    assert_eq!(line.src_port, "7777", "{line:?}");
    assert_eq!(line.authority, "localhost", "{line:?}");

    // A PROXY header on an accept_proxy listener from a peer not in trusted_proxies: closed,
    // nothing reaches the broker.
    let header = proxy_v2_header(sa("192.0.2.10:8888"), sa(&addr(untrusted)), &[], false);
    let mut c = TcpStream::connect(("127.0.0.1", untrusted)).unwrap();
    write_ignoring_errors(&mut c, &header);
    write_ignoring_errors(&mut c, &mqtt::connect(MqttVersion::V311, "edge-untrusted"));
    let (got, closed) = mqtt::read_until_close(&mut c, WAIT);
    assert!(closed, "untrusted proxy connection kept open");
    assert!(got.is_empty(), "{}", hex(&got));

    // No PROXY header on an accept_proxy listener: closed, nothing reaches the broker.
    let mut c = TcpStream::connect(("127.0.0.1", edge)).unwrap();
    write_ignoring_errors(&mut c, &mqtt::connect(MqttVersion::V311, "edge-noheader"));
    let (got, closed) = mqtt::read_until_close(&mut c, WAIT);
    assert!(closed, "header-less connection kept open");
    assert!(got.is_empty(), "{}", hex(&got));

    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!m.has_client("edge-untrusted"), "{}", m.log());
    assert!(!m.has_client("edge-noheader"), "{}", m.log());
    assert!(!h.log_lines().iter().any(|l| l.src == "192.0.2.10"), "{}", h.log());
}

/// The ClientHello of `openssl s_client -max_send_frag 512` with a long `-alpn` list takes two
/// TLS records. The server name is the one rustls read from the whole ClientHello (it chose
/// the certificate by it too): the log line's `sni` and the AUTHORITY TLV that HAProxy parsed
/// both say `localhost`.
#[test]
fn sni_of_a_client_hello_in_two_records_reaches_the_log_and_the_authority_tlv() {
    let m = Mosquitto::start();
    let h = Haproxy::start(m.port);
    let certs = Certs::new();
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "mqtts"
bind = "127.0.0.1:0"
pool = "pods"
{tls}alpn = ["mqtt"]

[pool.pods]
backends = ["{haproxy}"]
proxy_protocol = "v2"
tlvs = {ALL_TLVS}
"#,
        tls = certs.listener_tls_toml("none"),
        haproxy = h.addr(),
    ));
    let port = hm.port("mqtts");

    // 40 protocols before "mqtt": about 520 bytes of ALPN alone.
    let mut alpn: Vec<String> = (0..40).map(|i| format!("mqtt-test-{i:02}")).collect();
    alpn.push("mqtt".into());
    let id = "sni-two-records";
    let mut input = mqtt::connect(MqttVersion::V311, id);
    input.extend(mqtt::disconnect());
    let mut cmd = Command::new(require_program("openssl"));
    cmd.args(["s_client", "-connect", &addr(port), "-servername", "localhost", "-ign_eof", "-msg"])
        .args(["-max_send_frag", "512", "-alpn", &alpn.join(","), "-verify_return_error"])
        .arg("-CAfile")
        .arg(&certs.ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("openssl s_client");
    child.stdin.take().unwrap().write_all(&input).unwrap();
    if wait_child(&mut child, CMD_TIMEOUT).is_none() {
        let _ = child.kill();
    }
    let out = output_text(&child.wait_with_output().unwrap());

    // What s_client wrote before the server's first record: at least two handshake records.
    let client_records: Vec<&str> = out
        .lines()
        .take_while(|l| !l.starts_with("<<<"))
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0].starts_with(">>>") && w[0].contains("RecordHeader"))
        .map(|w| w[1].trim())
        .collect();
    assert!(
        client_records.len() >= 2 && client_records.iter().all(|r| r.starts_with("16 03")),
        "the ClientHello did not take two handshake records: {client_records:?}\n{out}"
    );
    assert!(out.contains("ALPN protocol: mqtt"), "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");

    assert!(m.wait_for_client(id, 1), "{id} never reached mosquitto:\n{}", m.log());
    let log = hm.wait_connection_log("client_id", id).unwrap_or_else(|| panic!("no connection log:\n{}", hm.log()));
    assert_eq!(log.get("sni").map(String::as_str), Some("localhost"), "{log:?}");
    let cport = log["client_addr"].rsplit_once(':').unwrap().1.to_string();
    let line = h
        .wait_for_line(|l| l.src_port == cport)
        .unwrap_or_else(|| panic!("HAProxy never logged source port {cport}:\n{}", h.log()));
    assert_eq!(line.authority, "localhost", "{line:?}");
}
