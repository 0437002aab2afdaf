//! A pool's `connect` policy against a real mosquitto 2.0 (no PROXY protocol) that authorizes
//! by username with an ACL file: the client certificate's CN arrives as the username, the
//! password is dropped, a client without a certificate is refused with CONNACK "bad user name
//! or password" before any broker sees it, and the log line says what was rewritten (never
//! the password).

use std::fs;
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
    let admin = hm.admin_addr();
    let refused = |code| {
        metric_sum(
            &admin,
            "harbormaster_connections_refused_total",
            &[("reason", "connect_rewrite_refused"), ("connack", code)],
        )
    };
    assert_eq!((refused("0x04"), refused("0x86")), (1.0, 1.0));
}
