//! Routing rules (`[[listener.route]]`) against real mosquitto brokers in separate pools and
//! real clients (mosquitto_pub, paho-mqtt): each kind of condition sends its client to its
//! pool, the first matching rule wins, the rest take the listener's `pool`; the rule is in the
//! log line; a reload changes the rules; `harbormaster route` and `/route` say which rule
//! matched; `check` reports bad rules by key path.

use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::support::*;

/// A paho-mqtt 3.1.1 client that connects to 127.0.0.1:PORT whatever host it is given, so the
/// host is only the TLS server name (SNI); optionally from another loopback address, with an
/// ALPN protocol, a client certificate and a username. Publishes one QoS 1 message.
const PAHO: &str = r#"
import json, socket, ssl, sys
import paho.mqtt.client as mqtt
o = json.loads(sys.argv[1])
class Client(mqtt.Client):
    def _create_socket_connection(self):
        return socket.create_connection(("127.0.0.1", o["port"]), timeout=10, source_address=(o.get("bind", "127.0.0.1"), 0))
c = Client(mqtt.CallbackAPIVersion.VERSION2, client_id=o["client_id"], protocol=mqtt.MQTTv311)
if "ca" in o:
    ctx = ssl.create_default_context(cafile=o["ca"])
    if "cert" in o:
        ctx.load_cert_chain(o["cert"], o["key"])
    c.tls_set_context(ctx)
    c.tls_insecure_set(True)
if "username" in o:
    c.username_pw_set(o["username"])
c.connect(o["host"], o["port"], 30)
c.loop_start()
c.publish("routing/t", "x", qos=1).wait_for_publish(20)
c.disconnect()
c.loop_stop()
print("published")
"#;

/// Runs the paho client with options `o` and asserts it published.
fn paho(dir: &Path, o: Value) {
    let script = dir.join("paho_route.py");
    if !script.exists() {
        fs::write(&script, PAHO).unwrap();
    }
    let python = require_program("python3");
    let out = run_with_timeout(Command::new(python).arg(&script).arg(o.to_string()), CMD_TIMEOUT);
    assert!(out.status.success() && output_text(&out).contains("published"), "paho {o}: {}", output_text(&out));
}

/// mosquitto_pub over TLS to `localhost` (SNI `localhost`), with extra arguments.
fn mosquitto_pub(certs: &Certs, port: u16, client_id: &str, with_cert: bool, extra: &[&str]) {
    let mut cmd = Command::new(require_program("mosquitto_pub"));
    cmd.args(["-h", "localhost", "-p", &port.to_string(), "-V", "mqttv311", "-i", client_id, "-q", "1"]);
    cmd.args(["--cafile", certs.ca.to_str().unwrap(), "-t", "routing/t", "-m", "x"]);
    if with_cert {
        cmd.args(["--cert", certs.client_cert.to_str().unwrap(), "--key", certs.client_key.to_str().unwrap()]);
    }
    cmd.args(extra);
    let out = run_with_timeout(&mut cmd, CMD_TIMEOUT);
    assert!(out.status.success(), "mosquitto_pub -i {client_id} {extra:?}: {}", output_text(&out));
}

fn config(certs: &Certs, main: &Mosquitto, a: &Mosquitto, b: &Mosquitto, fleet_b_pool: &str) -> String {
    format!(
        r#"
[[listener]]
name = "mqtts"
bind = "127.0.0.1:0"
pool = "main"
{tls}alpn = ["mqtt", "mqtt-b"]

[[listener.route]]
match = {{ sni = "Tenant-A.example.com" }}
pool = "a"

[[listener.route]]
match = {{ sni_suffix = "b.example.net" }}
pool = "b"

[[listener.route]]
match = {{ alpn = "mqtt-b" }}
pool = "b"

[[listener.route]]
match = {{ cert_cn = "device-001", username = "cn-user" }}
pool = "a"

[[listener.route]]
match = {{ cert_issuer_cn = "harbormaster test CA", client_id_prefix = "issuer-" }}
pool = "b"

[[listener.route]]
match = {{ username = "alice" }}
pool = "a"

[[listener.route]]
match = {{ client_id_prefix = "fleet-b-" }}
pool = "{fleet_b_pool}"

[[listener.route]]
match = {{ source = ["127.0.0.2/32", "::2"] }}
pool = "a"

[pool.main]
backends = [{{ name = "main-0", address = "{main}" }}]
proxy_protocol = "none"

[pool.a]
backends = [{{ name = "a-0", address = "{a}" }}]
proxy_protocol = "none"

[pool.b]
backends = [{{ name = "b-0", address = "{b}" }}]
proxy_protocol = "none"

[admin]
bind = "127.0.0.1:0"
"#,
        tls = certs.listener_tls_toml("optional"),
        main = main.addr(),
        a = a.addr(),
        b = b.addr(),
    )
}

/// Asserts that `client_id` reached exactly the broker named `want` among `brokers`, and that
/// harbormaster's log line for it names `rule` (empty: the listener's own pool).
fn landed(hm: &Harbormaster, brokers: &[(&str, &Mosquitto)], client_id: &str, want: &str, rule: &str) {
    let (_, broker) = brokers.iter().find(|(n, _)| *n == want).unwrap();
    assert!(broker.wait_for_client(client_id, 1), "{client_id} never reached {want}");
    for (name, other) in brokers.iter().filter(|(n, _)| *n != want) {
        assert!(!other.has_client(client_id), "{client_id} reached {name} as well as {want}");
    }
    let line = hm.wait_connection_log("client_id", client_id).unwrap_or_else(|| panic!("no log line for {client_id}"));
    assert_eq!(line.get("route").map(String::as_str).unwrap_or(""), rule, "{client_id}: {line:?}");
    assert_eq!(line.get("pool").map(String::as_str), Some(want), "{client_id}: {line:?}");
}

#[test]
fn each_condition_routes_to_its_pool_and_a_reload_changes_the_rules() {
    let (main, a, b) = (Mosquitto::start(), Mosquitto::start(), Mosquitto::start());
    let brokers = [("main", &main), ("a", &a), ("b", &b)];
    let certs = Certs::new();
    let hm = Harbormaster::start(&config(&certs, &main, &a, &b, "b"));
    let (port, admin) = (hm.port("mqtts"), hm.admin_addr());
    let dir = hm.dir.path();
    let tls = |o: Value| {
        let mut o = o;
        o["port"] = port.into();
        o["ca"] = certs.ca.to_str().unwrap().into();
        o
    };

    // SNI, exactly (any case) and by suffix on a label boundary.
    paho(dir, tls(serde_json::json!({ "host": "tenant-a.example.com", "client_id": "sni-1" })));
    landed(&hm, &brokers, "sni-1", "a", "route[0]");
    paho(dir, tls(serde_json::json!({ "host": "dev.b.example.net", "client_id": "suffix-1" })));
    landed(&hm, &brokers, "suffix-1", "b", "route[1]");
    paho(dir, tls(serde_json::json!({ "host": "notb.example.net", "client_id": "suffix-2" })));
    landed(&hm, &brokers, "suffix-2", "main", "");
    // ALPN.
    mosquitto_pub(&certs, port, "alpn-1", false, &["--tls-alpn", "mqtt-b"]);
    landed(&hm, &brokers, "alpn-1", "b", "route[2]");
    mosquitto_pub(&certs, port, "alpn-2", false, &["--tls-alpn", "mqtt"]);
    landed(&hm, &brokers, "alpn-2", "main", "");
    // The certificate's CN and a username: both must hold.
    mosquitto_pub(&certs, port, "cn-1", true, &["-u", "cn-user"]);
    landed(&hm, &brokers, "cn-1", "a", "route[3]");
    mosquitto_pub(&certs, port, "cn-2", true, &[]);
    landed(&hm, &brokers, "cn-2", "main", "");
    // The issuer's CN with a client-id prefix.
    mosquitto_pub(&certs, port, "issuer-1", true, &[]);
    landed(&hm, &brokers, "issuer-1", "b", "route[4]");
    mosquitto_pub(&certs, port, "issuer-2", false, &[]);
    landed(&hm, &brokers, "issuer-2", "main", "");
    // A username alone; a client-id prefix alone.
    mosquitto_pub(&certs, port, "user-1", false, &["-u", "alice"]);
    landed(&hm, &brokers, "user-1", "a", "route[5]");
    mosquitto_pub(&certs, port, "fleet-b-1", false, &[]);
    landed(&hm, &brokers, "fleet-b-1", "b", "route[6]");
    // The source address: a client from 127.0.0.2.
    paho(dir, tls(serde_json::json!({ "host": "localhost", "client_id": "src-1", "bind": "127.0.0.2" })));
    landed(&hm, &brokers, "src-1", "a", "route[7]");
    // First match wins: the SNI rule before the username rule.
    paho(dir, tls(serde_json::json!({ "host": "tenant-a.example.com", "client_id": "fleet-b-2", "username": "x" })));
    landed(&hm, &brokers, "fleet-b-2", "a", "route[0]");

    // /route says the same as the data plane did.
    let (status, body) = http_get(&admin, "/route?client_id=cn-9&cert_cn=device-001&username=cn-user");
    assert_eq!(status, 200, "{body}");
    let r: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["pool"], "a", "{r}");
    assert_eq!(r["rule"], "route[3]", "{r}");
    assert_eq!(r["rule_match"], "cert_cn=device-001,username=cn-user", "{r}");
    assert_eq!(r["broker"], "a-0", "{r}");

    // A reload sends fleet-b-* to pool a.
    fs::write(&hm.config_path, config(&certs, &main, &a, &b, "a")).unwrap();
    hm.sighup();
    let reloaded =
        wait_until(WAIT, || metric_sum(&admin, "harbormaster_config_reloads_total", &[("outcome", "ok")]) >= 1.0);
    assert!(reloaded, "{}", hm.log());
    mosquitto_pub(&certs, port, "fleet-b-3", false, &[]);
    landed(&hm, &brokers, "fleet-b-3", "a", "route[6]");
    let (_, body) = http_get(&admin, "/route?client_id=fleet-b-4");
    let r: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((&r["pool"], &r["rule"]), (&Value::from("a"), &Value::from("route[6]")), "{r}");
}

#[test]
fn route_names_the_rule_and_check_rejects_bad_rules_by_key_path() {
    let (main, a, b) = (Mosquitto::start(), Mosquitto::start(), Mosquitto::start());
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    fs::write(&good, config(&certs, &main, &a, &b, "b")).unwrap();
    let cfg = good.to_str().unwrap();

    let out = harbormaster(&["route", "--config", cfg, "--client-id", "d1", "--sni", "x.b.example.net"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "b-0");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(r#"listener "mqtts": route[1] matched (sni_suffix=b.example.net): pool "b""#), "{err}");
    let out = harbormaster(&["route", "--config", cfg, "--client-id", "d1", "--source", "127.0.0.2"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "a-0", "{}", output_text(&out));
    let out = harbormaster(&["route", "--config", cfg, "--client-id", "d1", "--username", "bob"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "main-0", "{}", output_text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no route matched"), "{}", output_text(&out));

    // Unknown pool, a rule behind a catch-all, an ALPN the listener never offers, a bad CIDR,
    // an unknown condition.
    let text = config(&certs, &main, &a, &b, "nope")
        .replace(r#"match = { username = "alice" }"#, "match = {}")
        .replace(r#"alpn = "mqtt-b""#, r#"alpn = "mqtt-c""#)
        .replace("::2", "::2/129")
        .replace(r#"sni = "Tenant-A.example.com""#, r#"server_name = "a""#);
    let bad = dir.path().join("bad.toml");
    fs::write(&bad, text).unwrap();
    let out = harbormaster(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server_name"), "{err}");
    let text = fs::read_to_string(&bad).unwrap().replace(r#"server_name = "a""#, r#"sni = "a""#);
    fs::write(&bad, text).unwrap();
    let out = harbormaster(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "listener[0].route[2].match.alpn: can never match",
        "listener[0].route[6].pool: no pool named \"nope\"",
        "listener[0].route[6].match: can never match: route[5] before it matches every connection",
        "listener[0].route[7].match.source[1]:",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}
