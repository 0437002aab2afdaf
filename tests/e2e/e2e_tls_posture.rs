//! TLS posture of the real binary, judged by OpenSSL: an OCSP response made by `openssl ocsp`
//! is stapled and verified by `openssl s_client -status`; a certificate close to its expiry
//! starts with a warning giving the days left and shows in /metrics; an expired certificate, a
//! key that does not fit its certificate and unreadable files stop `check` and `run` with the
//! file named.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::support::*;

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = run_with_timeout(Command::new(require_program("openssl")).args(args).current_dir(dir), CMD_TIMEOUT);
    let text = output_text(&out);
    assert!(out.status.success(), "openssl {args:?}:\n{text}");
    text
}

/// An OpenSSL-made CA, a server certificate for `localhost` valid for 5 days, and an OCSP
/// response from the CA saying it is good.
fn openssl_pki(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=posture CA", "-days", "30"]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
    openssl(dir, &csr);
    fs::write(dir.join("san.ext"), "subjectAltName = DNS:localhost\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "5",
            "-extfile",
            "san.ext",
        ],
    );
    let serial = openssl(dir, &["x509", "-in", "server.pem", "-noout", "-serial"]);
    let serial = serial.trim().trim_start_matches("serial=");
    // The CA's database: one valid certificate (the expiry column is not consulted here).
    fs::write(dir.join("index.txt"), format!("V\t300101000000Z\t\t{serial}\tunknown\t/CN=localhost\n")).unwrap();
    openssl(dir, &["ocsp", "-issuer", "ca.pem", "-cert", "server.pem", "-no_nonce", "-reqout", "req.der"]);
    openssl(
        dir,
        &[
            "ocsp",
            "-index",
            "index.txt",
            "-rsigner",
            "ca.pem",
            "-rkey",
            "ca.key",
            "-CA",
            "ca.pem",
            "-reqin",
            "req.der",
            "-respout",
            "ocsp.der",
            "-ndays",
            "1",
        ],
    );
}

#[test]
fn openssl_gets_the_stapled_ocsp_response_and_a_soon_expiring_certificate_is_announced() {
    let dir = tempfile::tempdir().unwrap();
    openssl_pki(dir.path());
    let config = dir.path().join("hm.toml");
    fs::write(
        &config,
        r#"
[[listener]]
name = "mqtts"
bind = "127.0.0.1:0"
pool = "brokers"
[listener.tls]
certs = [{ cert = "server.pem", key = "server.key", ocsp = "ocsp.der" }]

[pool.brokers]
backends = ["127.0.0.1:1"]

[admin]
bind = "127.0.0.1:0"
"#,
    )
    .unwrap();

    // `check` passes, with the warning.
    let out = harbormaster(&["check", "--config", config.to_str().unwrap()]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    // Valid for 5 days from its making: 5 whole days left within the same second, 4 after.
    let days_left =
        |t: &str| t.contains("certificate expires in 4 days") || t.contains("certificate expires in 5 days");
    assert!(text.contains("warning: listener[0].tls.certs[0].cert:") && days_left(&text), "{text}");

    let hm = Harbormaster::start_with_file(dir, config.clone());
    let (port, admin) = (hm.port("mqtts"), hm.admin_port());
    assert!(wait_until(WAIT, || days_left(&hm.log())), "no expiry warning at start:\n{}", hm.log());

    // A real TLS client asks for the certificate status and verifies what it gets, with TLS
    // 1.3 and 1.2 (whose handshake ends with the server's Finished).
    let ca = config.parent().unwrap().join("ca.pem");
    for (flag, version) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
        let mut s_client = Command::new(require_program("openssl"));
        s_client
            .args(["s_client", flag, "-connect", &format!("127.0.0.1:{port}"), "-servername", "localhost", "-status"])
            .arg("-CAfile")
            .arg(&ca)
            .stdin(Stdio::null());
        let out = run_with_timeout(&mut s_client, CMD_TIMEOUT);
        let text = output_text(&out);
        assert!(
            text.contains("OCSP Response Status: successful (0x0)"),
            "{version}: no stapled OCSP response:\n{text}"
        );
        assert!(text.contains("Cert Status: good"), "{text}");
        assert!(text.contains(&format!("New, {version}, Cipher is")), "{text}");
        assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    }

    // The expiry is a metric: alert on it rather than on the log line.
    let (_, metrics) = http_get(&addr(admin), "/metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("harbormaster_tls_certificate_expiry_seconds{"))
        .unwrap_or_else(|| panic!("no expiry metric:\n{metrics}"));
    assert!(line.contains(r#"cert="server.pem""#) && line.contains(r#"listener="mqtts""#), "{line}");
    let value: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((4 * 86_400..=5 * 86_400).contains(&(value - now)), "{line}");
}

/// A self-signed certificate for `localhost`, valid over the period given (days from now).
fn dated_cert(dir: &Path, name: &str, from_days: i64, to_days: i64) {
    let now = time::OffsetDateTime::now_utc();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = now + time::Duration::days(from_days);
    params.not_after = now + time::Duration::days(to_days);
    let cert = params.self_signed(&key).unwrap();
    fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

fn tls_config(dir: &Path, cert: &str, key: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{cert}-{key}.toml"));
    fs::write(
        &path,
        format!(
            r#"
[[listener]]
name = "mqtts"
bind = "127.0.0.1:0"
pool = "brokers"
[listener.tls]
certs = [{{ cert = "{cert}", key = "{key}" }}]

[pool.brokers]
backends = ["127.0.0.1:1"]
"#
        ),
    )
    .unwrap();
    path
}

#[test]
fn an_expired_certificate_a_foreign_key_and_missing_files_stop_check_and_run() {
    let dir = tempfile::tempdir().unwrap();
    dated_cert(dir.path(), "expired", -400, -3);
    dated_cert(dir.path(), "good", -1, 400);
    let cases = [
        (tls_config(dir.path(), "expired.pem", "expired.key"), "expired.pem: certificate expired on"),
        (tls_config(dir.path(), "good.pem", "expired.key"), "expired.key does not fit the certificate"),
        (tls_config(dir.path(), "missing.pem", "good.key"), "missing.pem"),
        (tls_config(dir.path(), "good.pem", "missing.key"), "missing.key"),
    ];
    for (config, want) in &cases {
        let out = harbormaster(&["check", "--config", config.to_str().unwrap()]);
        let text = output_text(&out);
        assert!(!out.status.success(), "check accepted {}:\n{text}", config.display());
        assert!(text.contains("listener[0].tls.certs[0]") && text.contains(want), "{want:?} not in:\n{text}");
        // `run` refuses to start, with the same words, and the exit code for an invalid config.
        let out = harbormaster(&["run", "--config", config.to_str().unwrap()]);
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(64), "{text}");
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    // The expired certificate's message says how long ago.
    let out = harbormaster(&["check", "--config", cases[0].0.to_str().unwrap()]);
    assert!(output_text(&out).contains("(3 days ago)"), "{}", output_text(&out));
}
