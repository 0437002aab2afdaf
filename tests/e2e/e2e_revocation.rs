//! Client certificate revocation (`[listener.tls] client_crl`) end to end: a device CA run with
//! `openssl ca` (two device certificates, `openssl ca -revoke`, `openssl ca -gencrl`), real
//! clients (mosquitto_pub/sub, `openssl s_client` with a saved session) through harbormaster
//! to a real mosquitto. The revoked device is refused with a `certificate revoked` alert, a
//! log line that says so and `tls_handshakes_total{outcome="revoked"}`; the other gets in. A
//! second revocation and a rewritten list reach the running process by its file watch: that
//! device is refused from then on, its ticket from before does not resume, and the session it
//! already has is left alone. `check` names a broken list by its key.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::mqtt::MqttVersion;
use crate::support::*;

/// A device CA as an operator runs one: `openssl ca` with its index, serial and CRL number.
struct DeviceCa {
    dir: PathBuf,
}

const CA_CNF: &str = r#"
[ ca ]
default_ca = fleet

[ fleet ]
dir = .
database = $dir/index.txt
new_certs_dir = $dir
certificate = $dir/fleet-ca.pem
private_key = $dir/fleet-ca.key
serial = $dir/serial
crlnumber = $dir/crlnumber
default_md = sha256
default_days = 30
default_crl_days = 7
policy = any_name
unique_subject = no

[ any_name ]
commonName = supplied

[ req ]
distinguished_name = dn

[ dn ]

[ ca_ext ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[ device ]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
"#;

impl DeviceCa {
    fn new(dir: &Path) -> DeviceCa {
        let dir = dir.join("fleet");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("ca.cnf"), CA_CNF).unwrap();
        fs::write(dir.join("index.txt"), "").unwrap();
        fs::write(dir.join("serial"), "1000\n").unwrap();
        fs::write(dir.join("crlnumber"), "01\n").unwrap();
        let ca = DeviceCa { dir };
        ca.openssl(&[
            "req",
            "-x509",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "fleet-ca.key",
            "-out",
            "fleet-ca.pem",
            "-days",
            "30",
            "-subj",
            "/CN=fleet CA",
            "-config",
            "ca.cnf",
            "-extensions",
            "ca_ext",
        ]);
        ca
    }

    fn openssl(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(require_program("openssl"));
        cmd.args(args).current_dir(&self.dir);
        let out = run_with_timeout(&mut cmd, CMD_TIMEOUT);
        assert!(out.status.success(), "openssl {args:?}:\n{}", output_text(&out));
        output_text(&out)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A device key and its certificate, signed by `openssl ca`.
    fn device(&self, name: &str) {
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        let subject = format!("/CN={name}");
        self.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subject,
            "-config",
            "ca.cnf",
        ]);
        self.openssl(&[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-extensions",
            "device",
            "-notext",
            "-in",
            &csr,
            "-out",
            &pem,
        ]);
    }

    fn revoke(&self, name: &str) {
        self.openssl(&["ca", "-config", "ca.cnf", "-revoke", &format!("{name}.pem"), "-crl_reason", "keyCompromise"]);
    }

    /// `openssl ca -gencrl` into a new file, renamed over `file`: the reader sees the old
    /// list or the new one, never half of one.
    fn publish_crl(&self, file: &str) {
        let tmp = format!(".{file}.tmp");
        self.openssl(&["ca", "-config", "ca.cnf", "-gencrl", "-out", &tmp]);
        fs::rename(self.path(&tmp), self.path(file)).unwrap();
    }

    fn client(&self, certs: &Certs, port: u16, name: &str) -> MqttClient {
        MqttClient::tls(
            port,
            MqttVersion::V311,
            ClientTls {
                cafile: certs.ca.clone(),
                cert: Some(self.path(&format!("{name}.pem"))),
                key: Some(self.path(&format!("{name}.key"))),
            },
        )
    }
}

fn revoked_handshakes(admin: &str) -> f64 {
    metric_sum(admin, "harbormaster_tls_handshakes_total", &[("outcome", "revoked")])
}

/// `openssl s_client -tls1_3` as device `name` ([`s_client_session`]).
fn s_client(port: u16, certs: &Certs, ca: &DeviceCa, name: &str, sess: &Path, save: bool, client_id: &str) -> String {
    let (cert, key) = (ca.path(&format!("{name}.pem")), ca.path(&format!("{name}.key")));
    s_client_session(port, "-tls1_3", &certs.ca, &cert, &key, sess, save, client_id)
}

#[test]
fn a_revoked_device_is_refused_and_a_revocation_applies_on_the_fly() {
    let certs = Certs::new();
    let ca = DeviceCa::new(certs.dir.path());
    ca.device("device-1");
    ca.device("device-2");
    ca.revoke("device-1");
    ca.publish_crl("fleet.crl");

    let broker = Mosquitto::start();
    let dir = tempfile::Builder::new().prefix("hm-crl-").tempdir().unwrap();
    let config = dir.path().join("harbormaster.toml");
    fs::write(
        &config,
        format!(
            r#"
[[listener]]
name = "devices"
bind = "127.0.0.1:0"
pool = "brokers"
[listener.tls]
certs = [{{ cert = {cert}, key = {key} }}]
client_ca = {client_ca}
client_crl = {crl}
client_auth = "required"

[pool.brokers]
backends = ["{broker}"]

[admin]
bind = "127.0.0.1:0"
"#,
            cert = toml_path(&certs.server_cert),
            key = toml_path(&certs.server_key),
            client_ca = toml_path(&ca.path("fleet-ca.pem")),
            crl = toml_path(&ca.path("fleet.crl")),
            broker = broker.addr(),
        ),
    )
    .unwrap();
    let out = harbormaster(&["check", "--config", config.to_str().unwrap()]);
    assert!(out.status.success() && !output_text(&out).contains("warning"), "{}", output_text(&out));
    let hm = Harbormaster::start_with_file(dir, config.clone());
    let (port, admin) = (hm.port("devices"), hm.admin_addr());

    // The revoked device: refused at the handshake, told why, never at the broker.
    let out = ca.client(&certs, port, "device-1").publish("dev-1", "fleet/t", "x");
    assert!(!out.status.success(), "a revoked device published:\n{}", output_text(&out));
    // (The start-up probe's connection is a tls_handshake close too, without a certificate.)
    let revoked_line = || {
        hm.connection_logs().into_iter().find(|l| {
            l.get("close_reason").map(String::as_str) == Some("tls_handshake")
                && l.get("detail").is_some_and(|d| d.starts_with("client certificate revoked"))
        })
    };
    assert!(wait_until(WAIT, || revoked_line().is_some()), "{}", hm.log());
    assert!(wait_until(WAIT, || revoked_handshakes(&admin) == 1.0), "{}", http_get(&admin, "/metrics").1);
    assert!(!broker.has_client("dev-1"), "{}", broker.log());

    // The other device gets in; it keeps a subscription open and saves a TLS session.
    let device_2 = ca.client(&certs, port, "device-2");
    device_2.publish_ok("dev-2", "fleet/t", "x");
    assert!(broker.wait_for_client("dev-2", 1), "{}", broker.log());
    let sub = device_2.subscribe("dev-2-sub", "fleet/keep", 2);
    assert!(broker.wait_subscribed("dev-2-sub"), "{}", broker.log());
    let sess = certs.dir.path().join("device-2.session");
    let text = s_client(port, &certs, &ca, "device-2", &sess, true, "dev-2-ossl-1");
    assert!(text.contains("New, TLSv1.3"), "{text}");
    assert!(broker.wait_for_client("dev-2-ossl-1", 1), "{}", broker.log());
    // Its ticket resumes while nothing changed.
    let text = s_client(port, &certs, &ca, "device-2", &sess, false, "dev-2-ossl-2");
    assert!(text.contains("Reused, TLSv1.3"), "{text}");
    assert!(broker.wait_for_client("dev-2-ossl-2", 1), "{}", broker.log());
    let publisher = MqttClient::plain(broker.port, MqttVersion::V311);
    publisher.publish_ok("pub-1", "fleet/keep", "before");
    assert!(sub.wait_for_message("before"), "{:?}", sub.messages());

    // Revoke it too and publish the list: the file watch reloads it.
    let reloads = || metric_sum(&admin, "harbormaster_config_reloads_total", &[("outcome", "ok")]);
    let before = reloads();
    ca.revoke("device-2");
    ca.publish_crl("fleet.crl");
    assert!(wait_until(WAIT, || reloads() > before), "no reload after the list changed:\n{}", hm.log());

    // New connections of device-2 are refused, with or without its ticket from before.
    let out = device_2.publish("dev-2-after", "fleet/t", "x");
    assert!(!out.status.success(), "a revoked device published after the reload:\n{}", output_text(&out));
    assert!(wait_until(WAIT, || revoked_handshakes(&admin) == 2.0), "{}", http_get(&admin, "/metrics").1);
    let text = s_client(port, &certs, &ca, "device-2", &sess, false, "dev-2-ossl-3");
    assert!(!text.contains("Reused,"), "the ticket from before the revocation resumed:\n{text}");
    assert!(wait_until(WAIT, || revoked_handshakes(&admin) == 3.0), "{text}\n{}", hm.log());
    assert!(!broker.has_client("dev-2-after") && !broker.has_client("dev-2-ossl-3"), "{}", broker.log());

    // The session established before the revocation is left alone: it still gets messages.
    publisher.publish_ok("pub-2", "fleet/keep", "after");
    assert!(sub.wait_for_message("after"), "{:?}\n{}", sub.messages(), hm.log());
    let (status, messages) = sub.finish();
    assert!(status.is_some_and(|s| s.success()), "mosquitto_sub: {status:?}");
    assert_eq!(messages, ["before", "after"]);
    assert_eq!(broker.connection_count("dev-2-sub"), 1, "the subscriber reconnected");
}

#[test]
fn check_names_a_broken_revocation_list_and_warns_about_readable_keys() {
    let certs = Certs::new();
    let ca = DeviceCa::new(certs.dir.path());
    ca.publish_crl("fleet.crl");
    let config = certs.dir.path().join("harbormaster.toml");
    let write_config = |crl: &str| {
        fs::write(
            &config,
            format!(
                "[[listener]]\nname = \"devices\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[listener.tls]\n\
                 certs = [{{ cert = {}, key = \"server.key\" }}]\nclient_ca = {}\nclient_crl = {crl}\n\
                 client_auth = \"required\"\n\n[pool.p]\nbackends = [\"127.0.0.1:1\"]\n",
                toml_path(&certs.server_cert),
                toml_path(&ca.path("fleet-ca.pem")),
            ),
        )
        .unwrap();
    };
    let check = || {
        let out = harbormaster(&["check", "--config", config.to_str().unwrap()]);
        (out.status.success(), output_text(&out))
    };

    // A good list, in PEM and (converted by openssl) DER, one file or a list.
    ca.openssl(&["crl", "-in", "fleet.crl", "-outform", "DER", "-out", "fleet.crl.der"]);
    for crl in [toml_path(&ca.path("fleet.crl")), format!("[{}]", toml_path(&ca.path("fleet.crl.der")))] {
        write_config(&crl);
        let (ok, text) = check();
        assert!(ok && !text.contains("warning"), "{crl}: {text}");
    }

    // A list cut short and a missing one: each named by its key and file.
    let pem = fs::read_to_string(ca.path("fleet.crl")).unwrap();
    fs::write(ca.path("cut.crl"), &pem[..pem.len() / 2]).unwrap();
    write_config(&format!("[{}, {}]", toml_path(&ca.path("fleet.crl")), toml_path(&ca.path("cut.crl"))));
    let (ok, text) = check();
    assert!(!ok && text.contains("listener[0].tls.client_crl[1]: ") && text.contains("cut.crl"), "{text}");
    write_config(&toml_path(&ca.path("missing.crl")));
    let (ok, text) = check();
    assert!(!ok && text.contains("listener[0].tls.client_crl: ") && text.contains("missing.crl"), "{text}");

    // The server's private key readable by every user: a warning naming the file.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&certs.server_key, fs::Permissions::from_mode(0o644)).unwrap();
    write_config(&toml_path(&ca.path("fleet.crl")));
    let (ok, text) = check();
    assert!(ok, "{text}");
    let key = certs.server_key.display().to_string();
    assert!(
        text.contains("warning: listener[0].tls.certs[0].key: ")
            && text.contains(&format!("{key} can be read by every user of the machine (mode 644)")),
        "{text}"
    );
    fs::set_permissions(&certs.server_key, fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, text) = check();
    assert!(ok && !text.contains("warning"), "{text}");
}
