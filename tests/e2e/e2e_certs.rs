//! Certificates of the operator's own: `harbormaster certs` writes a CA, a server and a device
//! certificate (keys 0600, nothing overwritten) that carry a real mosquitto_pub through
//! harbormaster to mosquitto; `check` and `run` warn about a listener that serves or trusts a
//! certificate of the demo set shipped in config/certs (whose private keys are public), and
//! stay quiet for the fresh ones.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::support::*;

const DEMO_WARNING: &str = "whose private key is published with harbormaster";

/// One TLS listener "mqtts" (on a port of the kernel's choosing) in front of `broker`, with
/// the certificate files of `dir`.
fn config(broker: &str, server: &str, key: &str, ca: &str) -> String {
    format!(
        r#"
[[listener]]
name = "mqtts"
bind = "127.0.0.1:0"
pool = "brokers"
[listener.tls]
certs = [{{ cert = {server}, key = {key} }}]
client_ca = {ca}
client_auth = "required"

[pool.brokers]
backends = ["{broker}"]
"#,
        server = toml_str(server),
        key = toml_str(key),
        ca = toml_str(ca),
    )
}

#[test]
fn check_and_run_warn_about_the_shipped_demo_certificates() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/certs");
    let p = |f: &str| shipped.join(f).to_str().unwrap().to_string();
    let dir = tempfile::Builder::new().prefix("hm-demo-set-").tempdir().unwrap();
    let path = dir.path().join("hm.toml");
    fs::write(&path, config("127.0.0.1:1", &p("server.pem"), &p("server.key"), &p("ca.pem"))).unwrap();

    let out = harbormaster(&["check", "--config", path.to_str().unwrap()]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    let warnings: Vec<&str> = text.lines().filter(|l| l.starts_with("warning: ")).collect();
    let served =
        warnings.iter().find(|l| l.contains("listener[0].tls.certs[0].cert")).unwrap_or_else(|| panic!("{text}"));
    assert!(
        served.contains("serves the demo certificate config/certs/server.pem") && served.contains(DEMO_WARNING),
        "{served}"
    );
    assert!(served.contains("harbormaster certs --out DIR --name HOST"), "{served}");
    let trusted = warnings.iter().find(|l| l.contains("listener[0].tls.client_ca")).unwrap_or_else(|| panic!("{text}"));
    assert!(trusted.contains("trusts the demo certificate config/certs/ca.pem"), "{trusted}");

    // The same warnings when it starts.
    let hm = Harbormaster::start_with_file(dir, path);
    let log = hm.log();
    assert!(
        log.lines().any(|l| l.contains("WARN") && l.contains("certs[0].cert") && l.contains(DEMO_WARNING)),
        "{log}"
    );
    assert!(log.lines().any(|l| l.contains("WARN") && l.contains("client_ca") && l.contains(DEMO_WARNING)), "{log}");
}

#[test]
fn certs_made_by_the_certs_command_carry_mosquitto_pub_and_raise_no_warning() {
    let dir = tempfile::Builder::new().prefix("hm-own-certs-").tempdir().unwrap();
    let out_dir = dir.path().join("certs");
    let out_s = out_dir.to_str().unwrap();
    let out =
        harbormaster(&["certs", "--out", out_s, "--name", "localhost", "--name", "127.0.0.1", "--device", "truck-42"]);
    assert!(out.status.success(), "{}", output_text(&out));
    for (file, mode) in [
        ("ca.pem", 0o644),
        ("ca.key", 0o600),
        ("server.pem", 0o644),
        ("server.key", 0o600),
        ("truck-42.pem", 0o644),
        ("truck-42.key", 0o600),
    ] {
        let meta = fs::metadata(out_dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let got = meta.permissions().mode() & 0o777;
        if mode == 0o600 {
            assert_eq!(got, 0o600, "{file}");
        } else {
            assert_eq!(got & 0o600, 0o600, "{file}: {got:o}");
        }
    }
    // Never over what is there.
    let ca_before = fs::read(out_dir.join("ca.key")).unwrap();
    let again = harbormaster(&["certs", "--out", out_s, "--name", "localhost"]);
    assert!(!again.status.success(), "{}", output_text(&again));
    assert!(
        output_text(&again).contains("already has ca.pem, ca.key, server.pem, server.key"),
        "{}",
        output_text(&again)
    );
    assert_eq!(fs::read(out_dir.join("ca.key")).unwrap(), ca_before);

    let m = Mosquitto::start();
    let path = dir.path().join("hm.toml");
    fs::write(&path, config(&m.addr(), "certs/server.pem", "certs/server.key", "certs/ca.pem")).unwrap();
    let out = harbormaster(&["check", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(!output_text(&out).contains("warning"), "{}", output_text(&out));

    let hm = Harbormaster::start_with_file(dir, path);
    let port = hm.port("mqtts");
    let certs_dir = hm.dir.path().join("certs");
    let tls = ClientTls {
        cafile: certs_dir.join("ca.pem"),
        cert: Some(certs_dir.join("truck-42.pem")),
        key: Some(certs_dir.join("truck-42.key")),
    };
    MqttClient::tls(port, MqttVersion::V311, tls.clone()).publish_ok("truck-42", "own/certs", "hello");
    assert!(m.wait_for_client("truck-42", 1), "{}", m.log());
    // Without the device certificate the listener (client_auth = required) refuses.
    let anonymous = ClientTls { cert: None, key: None, ..tls };
    let out = MqttClient::tls(port, MqttVersion::V311, anonymous).publish("anonymous", "own/certs", "x");
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(!m.has_client("anonymous"));
    assert!(!hm.log().contains(DEMO_WARNING), "{}", hm.log());
}
