//! RabbitMQ 3.10 (MQTT plugin, `mqtt.proxy_protocol = true`) behind harbormaster with
//! `proxy_protocol = "v2"`: the broker-level oracle of the PROXY v2 header harbormaster
//! sends. RabbitMQ boots slowly, so this file has exactly one test with every assertion.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};

use crate::support::mqtt::{self, MqttVersion};
use crate::support::tls::{self, ClientTlsChoice};
use crate::support::*;

/// What RabbitMQ reports for one connection.
#[derive(Debug)]
struct Row {
    peer_host: String,
    peer_port: u64,
    ssl: bool,
    ssl_protocol: String,
    ssl_cipher: String,
    raw: serde_json::Value,
}

fn row(v: serde_json::Value) -> Row {
    Row {
        peer_host: rabbit_peer_host(&v["peer_host"]),
        peer_port: v["peer_port"].as_u64().unwrap_or(0),
        ssl: v["ssl"].as_bool().unwrap_or(false),
        ssl_protocol: v["ssl_protocol"].as_str().unwrap_or("").to_string(),
        ssl_cipher: v["ssl_cipher"].as_str().unwrap_or("").to_string(),
        raw: v,
    }
}

fn wait_row(rabbit: &Rabbit, client_id: &str) -> Row {
    let v = rabbit
        .wait_for_connection(client_id)
        .unwrap_or_else(|| panic!("{client_id} never listed by RabbitMQ: {:?}", rabbit.list_mqtt_connections()));
    row(v)
}

/// The harness' own PROXY v2 header (built with ppp, nested SSL TLV, CRC32C, custom TLVs in
/// 0xE0..0xEF) is understood by this RabbitMQ. If this part fails the machine is broken; if
/// only the harbormaster part fails, harbormaster's header is.
fn oracle_direct_header(rabbit: &Rabbit) {
    let dst: SocketAddr = rabbit.addr().parse().unwrap();
    let cases: [(&str, &str, &[u8], &str, &str); 2] = [
        ("oracle-13", "192.0.2.9:4444", b"TLSv1.3", "TLS_AES_128_GCM_SHA256", "tlsv1.3"),
        ("oracle-12", "192.0.2.10:4445", b"TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", "tlsv1.2"),
    ];
    let mut held = Vec::new();
    for (id, src, version, cipher, want_protocol) in cases {
        let ssl = pp2_ssl_value(
            0x07,
            0,
            &[
                (0x21, version),
                (0x22, b"device-001"),
                (0x23, cipher.as_bytes()),
                (0x24, b"ecdsa-with-SHA256"),
                (0x25, b"EC256"),
            ],
        );
        let header = proxy_v2_header(
            src.parse().unwrap(),
            dst,
            &[(0x02, b"localhost".to_vec()), (0x20, ssl), (0xE0, vec![0xAB; 32]), (0xE1, id.as_bytes().to_vec())],
            true,
        );
        let mut s = TcpStream::connect(dst).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(&header).unwrap();
        let ack = mqtt::connect_and_read_connack(&mut s, MqttVersion::V311, id)
            .unwrap_or_else(|e| panic!("oracle {id}: {e}"));
        assert_eq!(ack, vec![0x20, 0x02, 0x00, 0x00], "oracle {id}");
        let r = wait_row(rabbit, id);
        eprintln!("oracle row {id}: {}", r.raw);
        let (host, port) = src.rsplit_once(':').unwrap();
        assert_eq!(r.peer_host, host, "{:?}", r);
        assert_eq!(r.peer_port.to_string(), port, "{:?}", r);
        assert!(r.ssl, "{:?}", r);
        assert_eq!(r.ssl_protocol, want_protocol, "{:?}", r);
        assert_eq!(r.ssl_cipher, "aes_128_gcm", "{:?}", r);
        held.push(s);
    }
}

#[test]
fn rabbitmq_sees_client_address_and_tls_facts_from_harbormaster() {
    let rabbit = Rabbit::start();
    oracle_direct_header(&rabbit);

    let certs = Certs::new();
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "mqtts"
bind = "127.0.0.1:0"
pool = "rabbit"
{tls}
[pool.rabbit]
backends = ["{rabbit}"]
hash_key = "client_id"
proxy_protocol = "v2"
tlvs = ["alpn", "authority", "unique_id", "ssl", "crc32c", "cert_sha256", "client_id"]
max_header_bytes = 500
"#,
        tls = certs.listener_tls_toml("optional"),
        rabbit = rabbit.addr(),
    ));
    let tls_port = hm.port("mqtts");

    // 1. mosquitto_sub -V mqttv311 with the client certificate stays connected through
    //    harbormaster; RabbitMQ sees loopback, TLS 1.3 and a TLS 1.3 cipher.
    let client = MqttClient::tls(tls_port, MqttVersion::V311, certs.client_tls(true));
    let sub = client.subscribe("rabbit-sub", "hm/rabbit", 100);
    let r = wait_row(&rabbit, "rabbit-sub");
    eprintln!("mosquitto_sub row: {}", r.raw);
    assert_eq!(r.peer_host, "127.0.0.1", "{r:?}");
    assert!(r.peer_port > 0, "{r:?}");
    assert!(r.ssl, "RabbitMQ did not see TLS facts in the PROXY header: {r:?}");
    assert_eq!(r.ssl_protocol, "tlsv1.3", "{r:?}");
    assert!(["aes_256_gcm", "aes_128_gcm", "chacha20_poly1305"].contains(&r.ssl_cipher.as_str()), "{r:?}");

    // 2. messages flow through RabbitMQ: 3.1.1 and 3.1 publishers, with and without a client
    //    certificate (client_auth = "optional").
    assert!(
        publish_until_received(&client, "rabbit-pub", "hm/rabbit", "via-rabbit-311", &sub),
        "message never arrived: {:?} {}",
        sub.messages(),
        sub.stderr()
    );
    let client31 = MqttClient::tls(tls_port, MqttVersion::V31, certs.client_tls(false));
    assert!(
        publish_until_received(&client31, "rabbit-pub31", "hm/rabbit", "via-rabbit-31", &sub),
        "3.1 message never arrived: {:?} {}",
        sub.messages(),
        sub.stderr()
    );
    let log = hm
        .wait_connection_log("client_id", "rabbit-pub")
        .unwrap_or_else(|| panic!("no connection log for rabbit-pub:\n{}", hm.log()));
    assert_eq!(log.get("broker"), Some(&rabbit.addr()), "{log:?}");
    assert_eq!(log.get("listener").map(String::as_str), Some("mqtts"), "{log:?}");
    assert_eq!(log.get("sni").map(String::as_str), Some("localhost"), "{log:?}");

    // 3. A rustls client offering only TLS_AES_128_GCM_SHA256: RabbitMQ reports exactly that
    //    cipher, and the client's own port as peer_port.
    let cfg = tls::client_config(&certs, true, ClientTlsChoice::Tls13Aes128);
    let mut s13 = tls::connect_tls(tls_port, "localhost", cfg, None).unwrap();
    assert_eq!(tls::negotiated_suite(&s13), "TLS13_AES_128_GCM_SHA256");
    let local13 = s13.sock.local_addr().unwrap();
    let ack = mqtt::connect_and_read_connack(&mut s13, MqttVersion::V311, "rabbit-raw13").unwrap();
    assert_eq!(ack, vec![0x20, 0x02, 0x00, 0x00]);
    let r = wait_row(&rabbit, "rabbit-raw13");
    eprintln!("TLS 1.3 AES-128 row: {}", r.raw);
    assert_eq!(r.peer_host, "127.0.0.1", "{r:?}");
    assert_eq!(r.peer_port, u64::from(local13.port()), "{r:?}");
    assert!(r.ssl, "{r:?}");
    assert_eq!(r.ssl_protocol, "tlsv1.3", "{r:?}");
    assert_eq!(r.ssl_cipher, "aes_128_gcm", "{r:?}");

    // 4. TLS 1.2 (ECDHE-ECDSA-AES128-GCM-SHA256), without a client certificate.
    let cfg = tls::client_config(&certs, false, ClientTlsChoice::Tls12EcdsaAes128);
    let mut s12 = tls::connect_tls(tls_port, "localhost", cfg, None).unwrap();
    let local12 = s12.sock.local_addr().unwrap();
    let ack = mqtt::connect_and_read_connack(&mut s12, MqttVersion::V31, "rabbit-raw12").unwrap();
    assert_eq!(ack, vec![0x20, 0x02, 0x00, 0x00]);
    let r = wait_row(&rabbit, "rabbit-raw12");
    eprintln!("TLS 1.2 row: {}", r.raw);
    assert_eq!(r.peer_port, u64::from(local12.port()), "{r:?}");
    assert!(r.ssl, "{r:?}");
    assert_eq!(r.ssl_protocol, "tlsv1.2", "{r:?}");
    assert_eq!(r.ssl_cipher, "aes_128_gcm", "{r:?}");
    assert_eq!(r.raw["ssl_key_exchange"], "ecdhe_ecdsa", "{r:?}");

    // 5. The raw clients still work: a QoS 1 publish from the TLS 1.3 client reaches the
    //    mosquitto_sub through RabbitMQ, and is acknowledged.
    s13.write_all(&mqtt::publish_qos1(MqttVersion::V311, 7, "hm/rabbit", b"raw-qos1")).unwrap();
    let puback = mqtt::read_until_kind(&mut s13, 4).unwrap();
    assert_eq!(puback.bytes(), vec![0x40, 0x02, 0x00, 0x07]);
    assert!(sub.wait_for_message("raw-qos1"), "{:?}", sub.messages());

    // 6. The mosquitto_sub's source port as harbormaster logged it is the peer_port RabbitMQ
    //    got from the header.
    let sub_port = wait_row(&rabbit, "rabbit-sub").peer_port;
    drop(sub);
    let log = hm
        .wait_connection_log("client_id", "rabbit-sub")
        .unwrap_or_else(|| panic!("no connection log for rabbit-sub:\n{}", hm.log()));
    assert_eq!(log.get("client_addr"), Some(&format!("127.0.0.1:{sub_port}")), "{log:?}");
}
