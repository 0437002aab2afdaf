//! Self-tests of the harness: the real peers start, log what the other tests read, and tear
//! down. These do not involve harbormaster; when they fail, the machine (or the harness) is
//! broken, not the load balancer.

use std::io::Write;
use std::net::TcpStream;

use crate::support::mqtt::{self, MqttVersion};
use crate::support::*;

#[test]
fn mosquitto_starts_logs_client_ids_and_stops() {
    let mut m = Mosquitto::start();
    for v in MqttVersion::ALL {
        let id = format!("peer-selftest-{}", v.mosquitto_arg());
        MqttClient::plain(m.port, v).publish_ok(&id, "selftest", "hello");
        assert!(m.wait_for_client(&id, 1), "{id} not in log:\n{}", m.log());
        let c = m.connections().into_iter().find(|c| c.client_id == id).unwrap();
        assert_eq!(c.protocol, mosquitto_protocol_tag(v));
        assert!(c.from.starts_with("127.0.0.1:"), "{c:?}");
    }
    // pub/sub through the broker directly
    let client = MqttClient::plain(m.port, MqttVersion::V311);
    let sub = client.subscribe("peer-sub", "selftest/t", 1);
    assert!(m.wait_subscribed("peer-sub"), "{}", m.log());
    client.publish_ok("peer-pub", "selftest/t", "m1");
    let (status, msgs) = sub.finish();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(msgs, vec!["m1".to_string()]);
    // raw client
    let (s, ack) = mqtt_connect(m.port, MqttVersion::V5, "raw-5");
    assert_eq!(ack[0], 0x20);
    assert!(mqtt::connack_accepted(&ack), "{}", hex(&ack));
    drop(s);

    let port = m.port;
    m.stop();
    assert!(!m.is_running());
    assert!(wait_until(WAIT, || !port_accepts(port)));
}

#[test]
fn mosquitto_tls_clients_work_with_harness_certificates() {
    // The mosquitto clients accept the harness' server certificate for `localhost` and a
    // TLS server accepts its client certificate: checked against mosquitto's own TLS listener.
    let certs = Certs::new();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("m.conf");
    let log = dir.path().join("m.log");
    std::fs::write(
        &conf,
        format!(
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n\
             cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n\
             use_identity_as_username true\n\
             log_dest file {}\nlog_type all\nconnection_messages true\n",
            certs.ca.display(),
            certs.server_cert.display(),
            certs.server_key.display(),
            log.display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(require_program("mosquitto"))
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct KillOnDrop<'a>(&'a mut std::process::Child);
    impl Drop for KillOnDrop<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = KillOnDrop(&mut child);
    assert!(wait_until(WAIT, || port_accepts(port)));
    MqttClient::tls(port, MqttVersion::V311, certs.client_tls(true)).publish_ok("tls-selftest", "t", "m");
    let text = std::fs::read_to_string(&log).unwrap();
    // use_identity_as_username: the client certificate's CN is the username
    assert!(text.contains("as tls-selftest (p2, c1, k60, u'device-001')"), "{text}");
    // without a client certificate the broker (require_certificate) refuses
    let out = MqttClient::tls(port, MqttVersion::V311, certs.client_tls(false)).publish("tls-nocert", "t", "m");
    assert!(!out.status.success());
}

#[test]
fn haproxy_logs_proxy_v1_and_v2_sources() {
    let m = Mosquitto::start();
    let h = Haproxy::start(m.port);

    // PROXY v1 then a CONNECT: goes through to mosquitto
    let mut s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(format!("PROXY TCP4 192.0.2.8 127.0.0.1 6666 {}\r\n", h.port).as_bytes()).unwrap();
    let ack = mqtt::connect_and_read_connack(&mut s, MqttVersion::V311, "ha-v1").unwrap();
    assert_eq!(ack, vec![0x20, 0x02, 0x00, 0x00]);
    let line =
        h.wait_for_line(|l| l.src == "192.0.2.8").unwrap_or_else(|| panic!("no line for 192.0.2.8:\n{}", h.log()));
    assert_eq!(line.src_port, "6666");
    assert_eq!(line.rcvd_proxy, "1");
    assert_eq!(line.authority, "-");

    // PROXY v2 with an AUTHORITY TLV (built with ppp)
    let header = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "192.0.2.7:5555".parse::<std::net::SocketAddr>().unwrap(),
            format!("127.0.0.1:{}", h.port).parse::<std::net::SocketAddr>().unwrap(),
        ),
    )
    .write_tlv(ppp::v2::Type::Authority, b"localhost".as_slice())
    .unwrap()
    .build()
    .unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(&header).unwrap();
    let ack = mqtt::connect_and_read_connack(&mut s, MqttVersion::V5, "ha-v2").unwrap();
    assert!(mqtt::connack_accepted(&ack), "{}", hex(&ack));
    let line =
        h.wait_for_line(|l| l.src == "192.0.2.7").unwrap_or_else(|| panic!("no line for 192.0.2.7:\n{}", h.log()));
    assert_eq!(line.src_port, "5555");
    assert_eq!(line.authority, "localhost");
    assert_eq!(line.dst_port, h.port.to_string());
    assert!(m.wait_for_client("ha-v2", 1));
}

#[test]
fn recording_backend_records_bytes() {
    let b = RecordingBackend::start();
    let mut s = TcpStream::connect(("127.0.0.1", b.port)).unwrap();
    s.write_all(b"hello").unwrap();
    assert!(wait_until(WAIT, || b.total_bytes() == 5));
    assert_eq!(b.connection_count(), 1);
    assert_eq!(b.received(), vec![b"hello".to_vec()]);
}

#[test]
fn parsers() {
    let conns = parse_mosquitto_connections(
        "1795489146: New client connected from 127.0.0.1:55390 as dev abc (p5, c1, k60).\n\
         1795489146: New client connected from 127.0.0.1:55391 as x (p2, c1, k60, u'device-001').\n",
    );
    assert_eq!(conns.len(), 2);
    assert_eq!(conns[0].client_id, "dev abc");
    assert_eq!(conns[0].protocol, "p5");
    assert_eq!(conns[1].client_id, "x");
    assert_eq!(conns[1].protocol, "p2");

    let kv = parse_kv_line(
        "2026-01-01T00:00:00Z  INFO harbormaster: connection closed conn_id=7 \
         client_addr=127.0.0.1:5 listener=\"mqtts\" sni=localhost client_id=\"a b\" \
         broker=127.0.0.1:9 close_reason=\"client closed\"",
    );
    assert_eq!(kv["conn_id"], "7");
    assert_eq!(kv["listener"], "mqtts");
    assert_eq!(kv["client_id"], "a b");
    assert_eq!(kv["broker"], "127.0.0.1:9");
    assert_eq!(kv["close_reason"], "client closed");
    let kv = parse_kv_line("\u{1b}[2mx\u{1b}[0m conn_id\u{1b}[2m=\u{1b}[0m3");
    assert_eq!(kv["conn_id"], "3");
    let kv = parse_kv_line(r#"{"fields":{"conn_id":3,"broker":"127.0.0.1:1"},"level":"INFO"}"#);
    assert_eq!(kv["conn_id"], "3");
    assert_eq!(kv["broker"], "127.0.0.1:1");

    assert_eq!(
        config_binds("[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\n[admin]\nbind=\"127.0.0.1:0\""),
        (vec!["a".to_string()], true)
    );
    let bound = Bound::from_log(
        "2026-01-01T00:00:00Z  INFO harbormaster::admin::http: admin server listening addr=127.0.0.1:7 max_connections=256\n\
         2026-01-01T00:00:00Z  INFO harbormaster::proxy::listener: listening listener=mqtt addr=127.0.0.1:8 tls=false\n\
         2026-01-01T00:00:00Z  INFO harbormaster::proxy::listener: listener closed listener=mqtt addr=127.0.0.1:8\n\
         {\"msg\":\"listening\",\"listener\":\"mqtt\",\"addr\":\"127.0.0.1:9\"}\n",
    );
    assert_eq!(bound.admin.as_deref(), Some("127.0.0.1:7"));
    assert_eq!(bound.listeners["mqtt"], "127.0.0.1:9");
    let h = parse_haproxy_log("HMLOG 192.0.2.7:5555 127.0.0.1:80 localhost - 1\n");
    assert_eq!(h[0].src, "192.0.2.7");
    assert_eq!(h[0].src_port, "5555");
    assert_eq!(h[0].authority, "localhost");

    assert_eq!(
        mqtt::connect(MqttVersion::V311, "ab"),
        vec![0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 2, b'a', b'b']
    );
    assert_eq!(
        mqtt::connect(MqttVersion::V31, "ab"),
        vec![0x10, 16, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60, 0, 2, b'a', b'b']
    );
    assert_eq!(mqtt::connect(MqttVersion::V5, ""), vec![0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 0]);
    let mut v = Vec::new();
    mqtt::put_varint(&mut v, 321);
    assert_eq!(v, vec![0xC1, 0x02]);
}
