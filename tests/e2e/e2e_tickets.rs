//! TLS session tickets across replicas (`[listener.tls] ticket_keys`): a ticket one
//! harbormaster issued resumes on another that reads the same key file, and only there. Judged
//! by a rustls client (`handshake_kind`) and by `openssl s_client -sess_out/-sess_in`
//! ("Reused"), with the resumed connection's PROXY v2 header parsed by ppp: it still names
//! the client certificate the session was made with.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::support::mqtt::{self, MqttVersion};
use crate::support::tls::{self, ClientTlsChoice};
use crate::support::*;
use rustls::{ClientConfig, HandshakeKind};

const SSL: u8 = 0x20;
const SSL_CN: u8 = 0x22;
const CLIENT_ID: u8 = 0xE1;
const CLIENT_SSL: u8 = 0x01;
const CERT_CONN: u8 = 0x02;
const CERT_SESS: u8 = 0x04;

/// A key file as the docs say to make one: `openssl rand -base64 48`, one key per line.
fn write_keys(path: &Path, count: usize) -> Vec<String> {
    let keys: Vec<String> = (0..count)
        .map(|_| {
            let out =
                run_with_timeout(Command::new(require_program("openssl")).args(["rand", "-base64", "48"]), CMD_TIMEOUT);
            assert!(out.status.success(), "{}", output_text(&out));
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        })
        .collect();
    set_keys(path, &keys);
    keys
}

fn set_keys(path: &Path, keys: &[String]) {
    std::fs::write(path, format!("# session ticket keys: the first encrypts, all decrypt\n{}\n", keys.join("\n")))
        .unwrap();
}

/// One replica: a TLS listener named `listener` (client certificate optional) in front of
/// `backend` with PROXY v2 (SSL and client-id TLVs), and an admin port.
struct Replica {
    hm: Harbormaster,
    port: u16,
    admin: String,
}

fn replica(certs: &Certs, listener: &str, keys: Option<&Path>, backend: &str, proxy_protocol: &str) -> Replica {
    let ticket_keys = keys.map(|k| format!("ticket_keys = {}\n", toml_path(k))).unwrap_or_default();
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "{listener}"
bind = "127.0.0.1:0"
pool = "brokers"
{tls}{ticket_keys}
[pool.brokers]
backends = ["{backend}"]
proxy_protocol = "{proxy_protocol}"
tlvs = ["ssl", "client_id"]

[admin]
bind = "127.0.0.1:0"
"#,
        tls = certs.listener_tls_toml("optional"),
    ));
    let (port, admin) = (hm.port(listener), hm.admin_addr());
    Replica { hm, port, admin }
}

/// A TLS connection with `config` (whose session cache carries tickets from one connection to
/// the next), CONNECT → CONNACK; the handshake kind. Reading the CONNACK also reads the ticket
/// the server sent after its handshake.
fn session(r: &Replica, config: &Arc<ClientConfig>, client_id: &str) -> HandshakeKind {
    let mut s = tls::connect_tls(r.port, "localhost", config.clone(), None)
        .unwrap_or_else(|e| panic!("{client_id}: TLS to {}: {e}\n{}", r.port, r.hm.log()));
    let ack = mqtt::connect_and_read_connack(&mut s, MqttVersion::V311, client_id)
        .unwrap_or_else(|e| panic!("{client_id}: {e}\n{}", r.hm.log()));
    assert!(mqtt::connack_accepted(&ack), "{client_id}: {}", hex(&ack));
    let kind = s.conn.handshake_kind().expect("handshake done");
    let _ = s.write_all(&mqtt::disconnect());
    s.conn.send_close_notify();
    let _ = s.flush();
    kind
}

/// The SSL TLV of the PROXY v2 header the backend got for `client_id`, parsed by ppp:
/// (client flags, verify, CN).
fn ssl_tlv(backend: &RecordingBackend, client_id: &str) -> (u8, u32, Option<String>) {
    let mut found = None;
    let ok = wait_until(WAIT, || {
        found = backend.received().into_iter().find_map(|bytes| {
            let len = 16 + u16::from_be_bytes([*bytes.get(14)?, *bytes.get(15)?]) as usize;
            let header = ppp::v2::Header::try_from(bytes.get(..len)?).ok()?;
            let tlvs: Vec<(u8, Vec<u8>)> =
                header.tlvs().filter_map(Result::ok).map(|t| (t.kind, t.value.to_vec())).collect();
            let id = tlvs.iter().find(|(k, _)| *k == CLIENT_ID)?;
            (id.1 == client_id.as_bytes()).then(|| tlvs.iter().find(|(k, _)| *k == SSL).map(|(_, v)| v.clone()))?
        });
        found.is_some()
    });
    assert!(ok, "no PROXY v2 header with an SSL TLV for {client_id}");
    let v = found.unwrap();
    let verify = u32::from_be_bytes(v[1..5].try_into().unwrap());
    let (mut rest, mut cn) = (&v[5..], None);
    while rest.len() >= 3 {
        let len = u16::from_be_bytes([rest[1], rest[2]]) as usize;
        if rest[0] == SSL_CN {
            cn = Some(String::from_utf8(rest[3..3 + len].to_vec()).unwrap());
        }
        rest = &rest[3 + len..];
    }
    (v[0], verify, cn)
}

fn resumed_count(r: &Replica, listener: &str) -> f64 {
    metric_sum(&r.admin, "harbormaster_tls_resumed_total", &[("listener", listener)])
}

#[test]
fn a_ticket_resumes_on_every_replica_sharing_the_key_file_and_nowhere_else() {
    let certs = Certs::new();
    let backend = RecordingBackend::start();
    let keys = certs.dir.path().join("ticket-keys");
    let written = write_keys(&keys, 1);
    let b = backend.addr();
    let a = replica(&certs, "mqtts", Some(&keys), &b, "v2");
    let shared = replica(&certs, "mqtts", Some(&keys), &b, "v2");
    let own_key = replica(&certs, "mqtts", None, &b, "v2");
    let other_listener = replica(&certs, "devices", Some(&keys), &b, "v2");

    for (choice, tag) in [(ClientTlsChoice::Tls13Aes128, "13"), (ClientTlsChoice::Tls12EcdsaAes128, "12")] {
        // Each pair with a fresh client (a fresh session cache): the first connection is a
        // full handshake and leaves a ticket, the second offers it.
        let pair = |first: &Replica, second: &Replica, what: &str| {
            let client = tls::client_config(&certs, true, choice);
            let id = format!("tk-{tag}-{what}");
            assert_eq!(session(first, &client, &format!("{id}-1")), HandshakeKind::Full, "{id}");
            session(second, &client, &format!("{id}-2"))
        };
        let before = resumed_count(&shared, "mqtts");
        assert_eq!(pair(&a, &shared, "shared"), HandshakeKind::Resumed, "TLS {tag}: another replica, same keys");
        assert_eq!(resumed_count(&shared, "mqtts"), before + 1.0);
        assert_eq!(pair(&own_key, &own_key, "local"), HandshakeKind::Resumed, "TLS {tag}: the process's own key");
        assert_eq!(pair(&a, &own_key, "unshared"), HandshakeKind::Full, "TLS {tag}: a replica without the keys");
        assert_eq!(pair(&a, &other_listener, "listener"), HandshakeKind::Full, "TLS {tag}: another listener");

        // The resumed connection still tells the broker who the client is: the certificate
        // from the session, flagged as the session's (CERT_SESS), not this connection's.
        let (flags, verify, cn) = ssl_tlv(&backend, &format!("tk-{tag}-shared-2"));
        assert_eq!(flags, CLIENT_SSL | CERT_SESS, "TLS {tag}");
        assert_eq!((verify, cn.as_deref()), (0, Some("device-001")), "TLS {tag}");
        let (flags, verify, cn) = ssl_tlv(&backend, &format!("tk-{tag}-shared-1"));
        assert_eq!(flags, CLIENT_SSL | CERT_CONN | CERT_SESS, "TLS {tag}");
        assert_eq!((verify, cn.as_deref()), (0, Some("device-001")), "TLS {tag}");
        let log = shared.hm.wait_connection_log("client_id", &format!("tk-{tag}-shared-2")).expect("log line");
        assert_eq!(log.get("tls_resumed").map(String::as_str), Some("true"), "{log:?}");
    }

    // Rotation, as docs/operations.md says: add the new key second, then move it first, then
    // drop the old one. Every replica reloads on the file change.
    let client = tls::client_config(&certs, true, ClientTlsChoice::Tls13Aes128);
    let reloads = |r: &Replica| metric_sum(&r.admin, "harbormaster_config_reloads_total", &[("outcome", "ok")]);
    let rotate = |keys_now: &[String]| {
        let (ra, rs) = (reloads(&a), reloads(&shared));
        set_keys(&keys, keys_now);
        for (r, n) in [(&a, ra), (&shared, rs)] {
            assert!(wait_until(WAIT, || reloads(r) > n), "no reload after the key file changed:\n{}", r.hm.log());
        }
    };
    // A second device keeps a ticket of the old key to the end.
    let stale = tls::client_config(&certs, true, ClientTlsChoice::Tls13Aes128);
    assert_eq!(session(&a, &client, "rot-1"), HandshakeKind::Full);
    let new_key = write_keys(&certs.dir.path().join("scratch"), 1).remove(0);
    rotate(&[written[0].clone(), new_key.clone()]);
    assert_eq!(session(&shared, &client, "rot-2"), HandshakeKind::Resumed, "a ticket from before opens");
    assert_eq!(session(&shared, &stale, "stale-1"), HandshakeKind::Full);
    rotate(&[new_key.clone(), written[0].clone()]);
    assert_eq!(session(&a, &client, "rot-3"), HandshakeKind::Resumed, "an old-key ticket opens after the swap");
    assert_eq!(session(&shared, &client, "rot-4"), HandshakeKind::Resumed, "a new-key ticket opens");
    rotate(std::slice::from_ref(&new_key));
    assert_eq!(session(&a, &client, "rot-5"), HandshakeKind::Resumed, "the new key alone");
    assert_eq!(session(&a, &stale, "stale-2"), HandshakeKind::Full, "a dropped key's ticket does not open");
}

/// `harbormaster-bench storm --resume` against one replica: the generator's count of resumed
/// sessions and the replica's `tls_resumed_total` agree, and are most of the sessions.
#[test]
fn the_load_generator_counts_resumed_sessions_as_harbormaster_does() {
    let certs = Certs::new();
    let backend = RecordingBackend::start();
    let keys = certs.dir.path().join("ticket-keys");
    write_keys(&keys, 1);
    let r = replica(&certs, "mqtts", Some(&keys), &backend.addr(), "v2");
    let storm = |resume: bool| -> serde_json::Value {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_harbormaster-bench"));
        cmd.args(["storm", "--target", &format!("127.0.0.1:{}", r.port), "--tls", "--sni", "localhost"])
            .args(["--concurrency", "2", "--duration", "300ms", "--json"])
            .arg("--ca")
            .arg(&certs.ca);
        if resume {
            cmd.arg("--resume");
        }
        let out = run_with_timeout(&mut cmd, CMD_TIMEOUT);
        assert!(out.status.success(), "{}", output_text(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", output_text(&out)))
    };
    let full = storm(false);
    assert_eq!(full["failed"], 0, "{full}");
    assert_eq!(full["tls_resumed"], 0, "{full}");
    assert_eq!(resumed_count(&r, "mqtts"), 0.0);
    let resumed = storm(true);
    assert_eq!(resumed["failed"], 0, "{resumed}");
    let (ok, n) = (resumed["ok"].as_u64().unwrap(), resumed["tls_resumed"].as_u64().unwrap());
    // Each of the two loops' first session is a full handshake; every later one offers the
    // ticket the one before it got.
    assert!(ok >= 4 && n + 2 >= ok, "{resumed}");
    assert_eq!(resumed_count(&r, "mqtts"), n as f64, "{resumed}");
}

/// `openssl s_client` as the test device ([`s_client_session`]).
fn s_client(port: u16, certs: &Certs, version: &str, sess: &Path, first: bool, client_id: &str) -> String {
    s_client_session(port, version, &certs.ca, &certs.client_cert, &certs.client_key, sess, first, client_id)
}

#[test]
fn openssl_resumes_across_replicas_in_front_of_mosquitto() {
    let certs = Certs::new();
    let m = Mosquitto::start();
    let keys = certs.dir.path().join("ticket-keys");
    write_keys(&keys, 2);
    let a = replica(&certs, "mqtts", Some(&keys), &m.addr(), "none");
    let b = replica(&certs, "mqtts", Some(&keys), &m.addr(), "none");
    let other = replica(&certs, "other", Some(&keys), &m.addr(), "none");
    for (flag, version) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
        let sess: PathBuf = certs.dir.path().join(format!("session{flag}"));
        let id = format!("ossl{flag}");
        let text = s_client(a.port, &certs, flag, &sess, true, &format!("{id}-a"));
        assert!(text.contains(&format!("New, {version}, Cipher is")), "{text}");
        assert!(m.wait_for_client(&format!("{id}-a"), 1), "{}", m.log());
        let text = s_client(b.port, &certs, flag, &sess, false, &format!("{id}-b"));
        assert!(text.contains(&format!("Reused, {version}, Cipher is")), "{version} on the other replica:\n{text}");
        assert!(m.wait_for_client(&format!("{id}-b"), 1), "{}", m.log());
        let text = s_client(other.port, &certs, flag, &sess, false, &format!("{id}-o"));
        assert!(text.contains(&format!("New, {version}, Cipher is")), "{version} on another listener:\n{text}");
        assert!(m.wait_for_client(&format!("{id}-o"), 1), "{}", m.log());
    }
}

#[test]
fn check_names_a_bad_key_file_and_warns_about_an_exposed_one() {
    let certs = Certs::new();
    let keys = certs.dir.path().join("ticket-keys");
    std::fs::write(&keys, "# too short\nc2hvcnQ=\n").unwrap();
    let config = certs.dir.path().join("harbormaster.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nname = \"mqtts\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n{}ticket_keys = {}\n\n[pool.p]\nbackends = [\"127.0.0.1:1\"]\n",
            certs.listener_tls_toml("optional"),
            toml_path(&keys)
        ),
    )
    .unwrap();
    let out = harbormaster(&["check", "--config", config.to_str().unwrap()]);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("ticket_keys") && text.contains("ticket-keys: line 2: a key needs at least 32"), "{text}");
    std::fs::remove_file(&keys).unwrap();
    let out = harbormaster(&["check", "--config", config.to_str().unwrap()]);
    let text = output_text(&out);
    assert!(!out.status.success() && text.contains("ticket-keys"), "{text}");

    // A good file passes; readable by every user, with a warning.
    use std::os::unix::fs::PermissionsExt;
    write_keys(&keys, 1);
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = harbormaster(&["check", "--config", config.to_str().unwrap()]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("warning: listener[0].tls.ticket_keys:") && text.contains("(mode 644)"), "{text}");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = harbormaster(&["check", "--config", config.to_str().unwrap()]);
    let text = output_text(&out);
    assert!(out.status.success() && !text.contains("warning"), "{text}");
}
