//! The client identity that reaches the broker, judged by real peers: client certificates made
//! by `openssl` with every ASN.1 string type a CN can have (and CNs holding NUL, CR/LF or a
//! Unicode non-character), and one made with a 1,000-character CN, go through harbormaster to
//! HAProxy 2.6 (`accept-proxy`, a strict PROXY v2 validator) in front of mosquitto. HAProxy shows the AUTHORITY and
//! UNIQUE_ID TLVs it parsed; tshark, capturing on loopback, decodes the SSL sub-TLVs (the CN)
//! and the others that neither HAProxy 2.6 nor RabbitMQ 3.10 shows.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

const ALL_TLVS: &str = r#"["alpn", "authority", "unique_id", "ssl", "crc32c", "cert_sha256", "client_id"]"#;

fn openssl(dir: &Path, args: &[&str]) {
    let out = run_with_timeout(Command::new(require_program("openssl")).args(args).current_dir(dir), CMD_TIMEOUT);
    assert!(out.status.success(), "openssl {args:?}:\n{}", output_text(&out));
}

/// How the CN of an OpenSSL-made certificate is written.
struct CnSpec {
    /// File stem.
    name: &'static str,
    /// The `-subj` CN, as UTF-8.
    subj: &'static str,
    /// `string_mask` for `openssl req`: which ASN.1 string type OpenSSL picks for the CN.
    mask: &'static str,
    /// Done to the DER of the CN value afterwards, where OpenSSL cannot be told to write it:
    /// a new ASN.1 tag, and bytes replaced (same length, so no length changes).
    patch: Option<Patch>,
}

/// A new ASN.1 tag for the CN value, and (from, to) byte replacements in it.
type Patch = (Option<u8>, &'static [(u8, u8)]);

/// An OpenSSL CA in `dir` (ca.pem, ca.key).
fn openssl_ca(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=identity test CA",
            "-days",
            "30",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A client certificate signed by the CA in `dir`: `openssl req -x509` writes the CN in the
/// type `string_mask` picks; when the spec says so its DER is patched, and `openssl x509
/// -x509toreq` + `openssl x509 -req` re-sign it. Returns (cert, key).
fn openssl_client(dir: &Path, spec: &CnSpec) -> (PathBuf, PathBuf) {
    let cnf = format!("{}.cnf", spec.name);
    fs::write(dir.join(&cnf), format!("[req]\ndistinguished_name = dn\nstring_mask = {}\n[dn]\n", spec.mask)).unwrap();
    let (key, selfsigned, csr, cert) =
        [".key", ".self.pem", ".csr", ".pem"].map(|ext| format!("{}{ext}", spec.name)).into();
    let subj = format!("/CN={}", spec.subj);
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &selfsigned,
            "-subj",
            &subj,
            "-utf8",
            "-config",
            &cnf,
            "-days",
            "30",
        ],
    );
    if let Some((tag, bytes)) = spec.patch {
        let pem = fs::read(dir.join(&selfsigned)).unwrap();
        let mut der = CertificateDer::from_pem_slice(&pem).unwrap().to_vec();
        // Issuer and subject are the same name here: patch every CN (the issuer is replaced
        // when the CA signs). A CN attribute is OID 2.5.4.3, then the string's tag and length.
        const CN_OID: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
        let mut patched = 0;
        let mut i = 0;
        while i + CN_OID.len() + 2 <= der.len() {
            if der[i..i + CN_OID.len()] == CN_OID {
                let at = i + CN_OID.len();
                if let Some(t) = tag {
                    der[at] = t;
                }
                let len = der[at + 1] as usize;
                for b in &mut der[at + 2..at + 2 + len] {
                    if let Some((_, to)) = bytes.iter().find(|(from, _)| from == b) {
                        *b = *to;
                    }
                }
                patched += 1;
                i = at;
            }
            i += 1;
        }
        assert_eq!(patched, 2, "{}: CN attributes found", spec.name);
        let b64 = base64_lines(&der);
        fs::write(dir.join(&selfsigned), format!("-----BEGIN CERTIFICATE-----\n{b64}-----END CERTIFICATE-----\n"))
            .unwrap();
    }
    openssl(dir, &["x509", "-x509toreq", "-in", &selfsigned, "-signkey", &key, "-out", &csr]);
    fs::write(dir.join("client.ext"), "extendedKeyUsage = clientAuth\nkeyUsage = digitalSignature\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            "client.ext",
            "-out",
            &cert,
        ],
    );
    (dir.join(cert), dir.join(key))
}

fn base64_lines(der: &[u8]) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    text.as_bytes().chunks(64).map(|l| format!("{}\n", String::from_utf8_lossy(l))).collect()
}

/// The ASN.1 tag of the subject CN of a PEM certificate, as OpenSSL reads it back.
fn cn_type(dir: &Path, cert: &Path) -> String {
    let out = run_with_timeout(
        Command::new(require_program("openssl")).args(["asn1parse", "-in"]).arg(cert).current_dir(dir),
        CMD_TIMEOUT,
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // The last commonName is the subject's; the line after it holds its value.
    let lines: Vec<&str> = text.lines().collect();
    let at = lines.iter().rposition(|l| l.ends_with(":commonName")).expect("a CN");
    let value = lines[at + 1];
    value.split("prim:").nth(1).unwrap_or("").split_whitespace().next().unwrap_or("").to_string()
}

/// harbormaster with a TLS listener whose client CA is `client_ca`, in front of HAProxy.
fn start(certs: &Certs, client_ca: &Path, haproxy: &Haproxy) -> (Harbormaster, u16) {
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "mqtts"
bind = "127.0.0.1:0"
pool = "pods"
[listener.tls]
certs = [{{ cert = {cert}, key = {key} }}]
client_ca = {ca}
client_auth = "required"

[pool.pods]
backends = ["{haproxy}"]
proxy_protocol = "v2"
tlvs = {ALL_TLVS}
max_header_bytes = 500

[admin]
bind = "127.0.0.1:0"
"#,
        cert = toml_path(&certs.server_cert),
        key = toml_path(&certs.server_key),
        ca = toml_path(client_ca),
        haproxy = haproxy.addr(),
    ));
    let port = hm.port("mqtts");
    (hm, port)
}

/// mosquitto_pub with this certificate through harbormaster: it must reach mosquitto; returns
/// harbormaster's connection log line.
fn publish_through(
    hm: &Harbormaster,
    m: &Mosquitto,
    port: u16,
    certs: &Certs,
    cert: &Path,
    key: &Path,
    id: &str,
) -> std::collections::BTreeMap<String, String> {
    let tls = ClientTls { cafile: certs.ca.clone(), cert: Some(cert.to_path_buf()), key: Some(key.to_path_buf()) };
    MqttClient::tls(port, MqttVersion::V311, tls).publish_ok(id, "identity/t", id);
    assert!(m.wait_for_client(id, 1), "{id} never reached mosquitto:\n{}", m.log());
    hm.wait_connection_log("client_id", id).unwrap_or_else(|| panic!("no connection log for {id}:\n{}", hm.log()))
}

#[test]
fn cn_of_every_string_type_reaches_the_broker_as_utf8_and_control_characters_never() {
    let m = Mosquitto::start();
    let h = Haproxy::start(m.port);
    let wire = Tshark::start(h.port);
    let certs = Certs::new();
    let dir = tempfile::Builder::new().prefix("hm-identity-").tempdir().unwrap();
    let d = dir.path();
    openssl_ca(d);
    let (hm, port) = start(&certs, &d.join("ca.pem"), &h);
    let admin = hm.admin_port();

    // (spec, ASN.1 type as OpenSSL reads it back, what the broker must get)
    // VisibleString is left to the unit tests: OpenSSL 3.0 refuses to load a certificate whose
    // CN is one (`openssl x509` and mosquitto_pub alike), so no OpenSSL client presents it.
    let good: [(CnSpec, &str, &str); 6] = [
        (
            CnSpec { name: "printable", subj: "device-printable", mask: "default", patch: None },
            "PRINTABLESTRING",
            "device-printable",
        ),
        (CnSpec { name: "utf8", subj: "Gerät-utf8-✓", mask: "utf8only", patch: None }, "UTF8STRING", "Gerät-utf8-✓"),
        // string_mask "default" writes Latin-1 text as T61String, wider text as BMPString.
        (CnSpec { name: "t61", subj: "Gerät-t61", mask: "default", patch: None }, "T61STRING", "Gerät-t61"),
        (CnSpec { name: "bmp", subj: "Gerät-Ω-bmp", mask: "default", patch: None }, "BMPSTRING", "Gerät-Ω-bmp"),
        // OpenSSL writes a CN only as one of the four DirectoryString types; the others are
        // re-tagged. IA5String shares UTF-8's bytes for ASCII text.
        (
            CnSpec { name: "ia5", subj: "dev@ia5", mask: "utf8only", patch: Some((Some(0x16), &[])) },
            "IA5STRING",
            "dev@ia5",
        ),
        // UTF-32BE of U+1F69A U+1F69B is the BMPString of U+0001 U+F69A U+0001 U+F69B.
        (
            CnSpec {
                name: "universal",
                subj: "\u{1}\u{f69a}\u{1}\u{f69b}",
                mask: "MASK:0x800",
                patch: Some((Some(0x1c), &[])),
            },
            "UNIVERSALSTRING",
            "🚚🚛",
        ),
    ];
    for (i, (spec, asn1_type, want)) in good.iter().enumerate() {
        let (cert, key) = openssl_client(d, spec);
        assert_eq!(cn_type(d, &cert), *asn1_type, "{}", spec.name);
        let id = format!("cn-{}", spec.name);
        let log = publish_through(&hm, &m, port, &certs, &cert, &key, &id);
        let conn_id = &log["conn_id"];
        let header = wire
            .wait_for_unique_id(conn_id)
            .unwrap_or_else(|| panic!("{id}: no header with unique id {conn_id} on the wire: {:?}", wire.headers()));
        assert_eq!(
            header.get(0x22).map(|cn| String::from_utf8_lossy(cn).into_owned()).as_deref(),
            Some(*want),
            "{id}: CN sub-TLV ({i}) in {header:?}"
        );
        // HAProxy accepted and parsed the same header.
        let line = h
            .wait_for_line(|l| l.unique_id == *conn_id)
            .unwrap_or_else(|| panic!("HAProxy never logged {conn_id}:\n{}", h.log()));
        assert_eq!(line.authority, "localhost", "{line:?}");
    }
    assert_eq!(metric_sum(&addr(admin), "harbormaster_tls_client_cn_refused_total", &[]), 0.0);

    // NUL in a UTF8String, CR LF in a BMPString, the non-character U+FDD0 in a BMPString (from
    // U+FD23, patched): the connection goes on, without the CN.
    let evil: [(CnSpec, &str, &str); 3] = [
        (
            CnSpec { name: "nul", subj: "admin#.attacker", mask: "utf8only", patch: Some((None, &[(b'#', 0)])) },
            "admin\\0.attacker",
            "control_character",
        ),
        (
            CnSpec {
                name: "crlf",
                subj: "user#ro%t-x",
                mask: "MASK:0x800",
                patch: Some((None, &[(b'#', b'\r'), (b'%', b'\n')])),
            },
            "user\\rro\\nt-x",
            "control_character",
        ),
        (
            CnSpec { name: "nonchar", subj: "dev-\u{fd23}", mask: "MASK:0x800", patch: Some((None, &[(0x23, 0xd0)])) },
            "dev-\\u{fdd0}",
            "noncharacter",
        ),
    ];
    for (spec, shown, reason) in &evil {
        let (cert, key) = openssl_client(d, spec);
        let id = format!("cn-{}", spec.name);
        let log = publish_through(&hm, &m, port, &certs, &cert, &key, &id);
        let conn_id = &log["conn_id"];
        let header = wire
            .wait_for_unique_id(conn_id)
            .unwrap_or_else(|| panic!("{id}: no header with unique id {conn_id}: {:?}", wire.headers()));
        assert_eq!(header.get(0x22), None, "{id}: a CN brokers refuse was sent: {header:?}");
        // The rest of the SSL TLV still says a verified certificate was presented.
        let ssl = header.get(0x20).expect("SSL TLV");
        assert_eq!((ssl[0], &ssl[1..5]), (0x07, &[0u8, 0, 0, 0][..]), "{header:?}");
        assert!(header.get(0x21).is_some() && header.get(0xE0).is_some(), "{header:?}");
        // One warning, escaped, naming the connection.
        let warning = hm
            .log()
            .lines()
            .map(parse_kv_line)
            .find(|l| l.get("conn_id") == Some(conn_id) && l.contains_key("cn"))
            .unwrap_or_else(|| panic!("no warning for {conn_id}:\n{}", hm.log()));
        assert_eq!(warning.get("reason").map(String::as_str), Some(*reason), "{warning:?}");
        assert_eq!(warning.get("cn").map(String::as_str), Some(*shown), "{warning:?}");
    }
    assert!(!hm.log().contains('\0'), "a NUL reached harbormaster's log");
    let refused = |reason| metric_sum(&addr(admin), "harbormaster_tls_client_cn_refused_total", &[("reason", reason)]);
    assert_eq!((refused("control_character"), refused("noncharacter")), (2.0, 1.0));
}

/// A 1,000-character CN cannot fit a 500-byte header; it alone is left out: HAProxy still
/// gets the SNI and the connection id, and the certificate fingerprint still goes out.
#[test]
fn a_long_cn_costs_only_the_cn() {
    let m = Mosquitto::start();
    let h = Haproxy::start(m.port);
    let wire = Tshark::start(h.port);
    let certs = Certs::with_client_cn(&"c".repeat(1000));
    let (hm, port) = start(&certs, &certs.ca, &h);
    let admin = hm.admin_port();

    let log = publish_through(&hm, &m, port, &certs, &certs.client_cert, &certs.client_key, "long-cn");
    let conn_id = &log["conn_id"];
    let line = h
        .wait_for_line(|l| l.unique_id == *conn_id)
        .unwrap_or_else(|| panic!("HAProxy never logged unique id {conn_id}:\n{}", h.log()));
    assert_eq!(line.authority, "localhost", "{line:?}");
    let header = wire.wait_for_unique_id(conn_id).unwrap_or_else(|| panic!("not on the wire: {:?}", wire.headers()));
    eprintln!("long CN header on the wire: {:?}", header.kinds());
    assert_eq!(header.kinds(), [0x02, 0x05, 0x20, 0x21, 0x23, 0x24, 0x25, 0xE0, 0xE1], "{header:?}");
    assert_eq!(header.get(0xE0).map(hex), Some(hex(&sha256_bytes(&certs.client_cert_der))));
    assert_eq!(header.get(0xE1), Some(&b"long-cn"[..]));
    assert_eq!(metric_sum(&addr(admin), "harbormaster_proxy_tlv_dropped_total", &[("tlv", "ssl")]), 1.0);
    for tlv in ["clientid", "certsha256", "uniqueid", "authority", "alpn", "crc32c"] {
        assert_eq!(metric_sum(&addr(admin), "harbormaster_proxy_tlv_dropped_total", &[("tlv", tlv)]), 0.0, "{tlv}");
    }
}

fn sha256_bytes(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(data).to_vec()
}
