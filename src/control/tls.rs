//! Builds the rustls server configuration of a TLS listener from its config section: loads the
//! cert/key pairs (with an optional OCSP response to staple) and the client CA bundle, picks a
//! certificate by SNI (names taken from each certificate's subject alternative names), and sets
//! client authentication, with revocation lists (crl.rs). Every file problem, a key that does not fit its certificate and an
//! expired certificate are load errors (a reload keeps the running config); a certificate close
//! to its expiry is a warning at every load.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::config::{relative, ClientAuth, RawTls};
use super::{demo_certs, tickets};

/// Problems as (key path below `tls`, message).
pub type TlsProblems = Vec<(String, String)>;

/// Chooses a certificate by SNI: exact name, then `*.parent` wildcard, then the first pair.
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // The connection's SNI for its log line and the PROXY v2 AUTHORITY TLV: the name
        // rustls read, however many records the ClientHello took.
        crate::proxy::tls_stream::note_server_name(&hello);
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(parent) {
                return Some(k.clone());
            }
        }
        Some(self.default.clone())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// DNS names a certificate is valid for (subject alternative names).
fn dns_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::DNSName(n) => Some(n.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// A certificate expiring within this many days is logged as a warning at every load.
const EXPIRY_WARNING_DAYS: i64 = 30;

const DAY: i64 = 86_400;

/// Where a certificate stands on its validity period at `now` (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Validity {
    Valid,
    /// Valid, but for fewer than [`EXPIRY_WARNING_DAYS`] more days (rounded down).
    ExpiresSoon {
        days_left: i64,
    },
    Expired {
        days_ago: i64,
    },
    NotYetValid {
        days: i64,
    },
}

fn validity(not_before: i64, not_after: i64, now: i64) -> Validity {
    if now > not_after {
        Validity::Expired { days_ago: (now - not_after) / DAY }
    } else if now < not_before {
        Validity::NotYetValid { days: (not_before - now) / DAY }
    } else if not_after - now < EXPIRY_WARNING_DAYS * DAY {
        Validity::ExpiresSoon { days_left: (not_after - now) / DAY }
    } else {
        Validity::Valid
    }
}

/// A listener's TLS: the rustls config, for each certificate file its leaf's expiry, and
/// warnings (key path below `tls`, message) for the operator.
pub struct Built {
    pub config: rustls::ServerConfig,
    pub cert_expiry: Vec<(String, i64)>,
    pub warnings: TlsProblems,
}

/// Reads the leaf once: checks its validity period (an expired certificate is a problem, one
/// close to its end or not valid yet a warning) and returns its `notAfter` (Unix seconds) and
/// the DNS names it serves.
fn inspect_leaf(
    der: &CertificateDer<'_>,
    path: &Path,
    at: &str,
    problems: &mut TlsProblems,
    warnings: &mut TlsProblems,
) -> Option<(i64, Vec<String>)> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        problems.push((at.to_string(), format!("{}: the first certificate cannot be parsed", path.display())));
        return None;
    };
    let v = cert.validity();
    let (not_before, not_after) = (v.not_before.timestamp(), v.not_after.timestamp());
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    match validity(not_before, not_after, now) {
        Validity::Valid => {}
        Validity::Expired { days_ago } => problems.push((
            at.to_string(),
            format!("{}: certificate expired on {} ({days_ago} days ago)", path.display(), v.not_after),
        )),
        Validity::ExpiresSoon { days_left } => warnings.push((
            at.to_string(),
            format!("{}: certificate expires in {days_left} days, on {}", path.display(), v.not_after),
        )),
        Validity::NotYetValid { days } => warnings.push((
            at.to_string(),
            format!(
                "{}: certificate is not valid before {} ({days} days from now): check the clock",
                path.display(),
                v.not_before
            ),
        )),
    }
    Some((not_after, dns_names(&cert)))
}

/// Who besides this process can read a secret file, as (mode, who, chmod to fix it); `None`
/// when no one. The others' read bit always counts. The group's counts when this process owns
/// the file, so that the group can only be other users; not when the process reads it
/// through that group (a Kubernetes Secret mounted root:fsGroup with mode 0440, a key
/// root:harbormaster 0640 on a host).
pub fn readers(path: &Path) -> Option<(u32, &'static str, &'static str)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.mode() & 0o777;
    exposure(mode, meta.uid() == rustix::process::geteuid().as_raw()).map(|(who, fix)| (mode, who, fix))
}

/// [`readers`] on a mode: who can read the file and the chmod that stops it.
fn exposure(mode: u32, owned_by_us: bool) -> Option<(&'static str, &'static str)> {
    let group = owned_by_us && mode & 0o040 != 0;
    match (mode & 0o004 != 0, group) {
        (true, true) => Some(("every user of the machine", "go-r")),
        (true, false) => Some(("every user of the machine", "o-r")),
        (false, true) => Some(("the users of its group", "g-r")),
        (false, false) => None,
    }
}

/// A warning when others than this process can read a private key: whoever reads it can
/// pose as this server to every device.
fn exposed_key(path: &Path) -> Option<String> {
    readers(path).map(|(mode, who, fix)| {
        format!(
            "{} can be read by {who} (mode {mode:o}); whoever reads this private key can pose as this \
             server: chmod {fix}",
            path.display()
        )
    })
}

/// Build the server config of listener `listener`, or every problem found.
pub fn server_config(t: &RawTls, listener: &str, base: &Path) -> Result<Built, TlsProblems> {
    let mut problems = TlsProblems::new();
    let provider = provider();
    let mut keys = Vec::new();
    let mut cert_expiry = Vec::new();
    let mut warnings = TlsProblems::new();
    if t.certs.is_empty() {
        problems.push(("certs".into(), "at least one { cert, key } pair is required".into()));
    }
    for (i, pair) in t.certs.iter().enumerate() {
        let cert_path = relative(base, &pair.cert);
        let key_path = relative(base, &pair.key);
        let chain: Result<Vec<CertificateDer<'static>>, _> =
            CertificateDer::pem_file_iter(&cert_path).and_then(|it| it.collect());
        let chain = match chain {
            Ok(c) if !c.is_empty() => c,
            Ok(_) => {
                problems.push((format!("certs[{i}].cert"), format!("no certificate in {}", cert_path.display())));
                continue;
            }
            Err(e) => {
                problems.push((format!("certs[{i}].cert"), format!("{}: {e}", cert_path.display())));
                continue;
            }
        };
        if let Some(w) = demo_certs::served(&chain) {
            warnings.push((format!("certs[{i}].cert"), format!("{}: {w}", cert_path.display())));
        }
        let Some((not_after, names)) =
            inspect_leaf(&chain[0], &cert_path, &format!("certs[{i}].cert"), &mut problems, &mut warnings)
        else {
            continue;
        };
        let key = match PrivateKeyDer::from_pem_file(&key_path) {
            Ok(k) => {
                warnings.extend(exposed_key(&key_path).map(|w| (format!("certs[{i}].key"), w)));
                k
            }
            Err(e) => {
                problems.push((format!("certs[{i}].key"), format!("{}: {e}", key_path.display())));
                continue;
            }
        };
        // An OCSP response is stapled as is: rustls does not look into it, so an empty file is
        // the one mistake caught here. Refreshing the file and reloading staples the new one.
        let ocsp = match &pair.ocsp {
            None => None,
            Some(p) => {
                let ocsp_path = relative(base, p);
                match std::fs::read(&ocsp_path) {
                    Ok(b) if b.is_empty() => {
                        problems.push((format!("certs[{i}].ocsp"), format!("{} is empty", ocsp_path.display())));
                        continue;
                    }
                    Ok(b) => Some(b),
                    Err(e) => {
                        problems.push((format!("certs[{i}].ocsp"), format!("{}: {e}", ocsp_path.display())));
                        continue;
                    }
                }
            }
        };
        match CertifiedKey::from_der(chain, key, &provider) {
            Ok(mut ck) => {
                ck.ocsp = ocsp;
                keys.push((Arc::new(ck), names));
                cert_expiry.push((pair.cert.clone(), not_after));
            }
            Err(e) => problems.push((
                format!("certs[{i}]"),
                format!("the key in {} does not fit the certificate: {e}", key_path.display()),
            )),
        }
    }

    // What session tickets are bound to: the listener, its client_auth, its client CAs and
    // the certificates its revocation lists revoke.
    let mut context = tickets::context(listener, t.client_auth, std::iter::empty(), &[]);
    if t.client_auth == ClientAuth::None && !t.client_crl.files.is_empty() {
        warnings.push((
            "client_crl".into(),
            "set but client_auth is \"none\": no client certificate is asked for, so none is checked".into(),
        ));
    }
    let verifier = match (t.client_auth, &t.client_ca) {
        (ClientAuth::None, _) => None,
        (_, None) => {
            problems.push(("client_ca".into(), "client_auth optional/required needs a client_ca bundle".into()));
            None
        }
        (auth, Some(ca)) => {
            let ca_path = relative(base, ca);
            let mut roots = RootCertStore::empty();
            let mut cas = Vec::new();
            match CertificateDer::pem_file_iter(&ca_path).and_then(|it| it.collect::<Result<Vec<_>, _>>()) {
                Ok(certs) if certs.is_empty() => {
                    problems.push(("client_ca".into(), format!("no certificate in {}", ca_path.display())))
                }
                Ok(certs) => {
                    if let Some(w) = demo_certs::trusted(&certs) {
                        warnings.push(("client_ca".into(), format!("{}: {w}", ca_path.display())));
                    }
                    for c in &certs {
                        if let Err(e) = roots.add(c.clone()) {
                            problems.push(("client_ca".into(), format!("{}: {e}", ca_path.display())));
                        }
                    }
                    cas = certs;
                }
                Err(e) => problems.push(("client_ca".into(), format!("{}: {e}", ca_path.display()))),
            }
            let roots = Arc::new(roots);
            let crls = super::crl::load(&t.client_crl, base, &cas, &roots, &mut problems, &mut warnings);
            if !cas.is_empty() {
                let revoked = crls.revoked_digest();
                context = tickets::context(listener, auth, cas.iter().map(|c| c.as_ref()), &revoked);
            }
            if roots.is_empty() {
                None
            } else {
                // With lists, rustls' defaults are the policy (crl.rs, docs/configuration.md):
                // the whole chain is checked, a certificate whose issuer has no list is
                // refused, and a list past its nextUpdate still counts.
                let b = WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).with_crls(crls.lists);
                let b = if auth == ClientAuth::Optional { b.allow_unauthenticated() } else { b };
                match b.build() {
                    Ok(v) => Some(v),
                    Err(e) => {
                        problems.push(("client_ca".into(), e.to_string()));
                        None
                    }
                }
            }
        }
    };
    // The key file is read with the other files, so its problems are reported with theirs.
    let ticketer = match &t.ticket_keys {
        None => tickets::local(context).map_err(|e| (String::new(), format!("session tickets: {e}"))),
        Some(p) => {
            let path = relative(base, p);
            warnings.extend(tickets::exposed(&path).map(|w| ("ticket_keys".to_string(), w)));
            tickets::from_file(&path, context).map_err(|e| ("ticket_keys".to_string(), e))
        }
    };
    let ticketer = match ticketer {
        Ok(t) if problems.is_empty() => t,
        Ok(_) => return Err(problems),
        Err(p) => {
            problems.push(p);
            return Err(problems);
        }
    };

    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    for (k, names) in &keys {
        for name in names.iter().cloned() {
            // The first pair naming a host wins, like the order of `certs` suggests.
            match name.strip_prefix("*.") {
                Some(parent) => wildcard.entry(parent.to_string()).or_insert_with(|| k.clone()),
                None => exact.entry(name).or_insert_with(|| k.clone()),
            };
        }
    }
    let resolver = SniResolver { exact, wildcard, default: keys[0].0.clone() };

    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| vec![(String::new(), e.to_string())])?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = t.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    // Session tickets make a reconnect storm's resumed handshakes cheaper (TLS 1.2's several
    // times: no key exchange; TLS 1.3's by the signature and the certificate). The key is
    // this process's own, or `ticket_keys` shared by the replicas (tickets.rs). TLS 1.3: one
    // ticket per handshake rather than rustls' two — a device resumes once per reconnect and
    // gets a fresh ticket each time — 2.5% less CPU per new session (docs/benchmarks.md).
    cfg.ticketer = ticketer;
    cfg.send_tls13_tickets = 1;
    Ok(Built { config: cfg, cert_expiry, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::config::{OneOrMany, RawCert};
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    use rustls::{ClientConfig, ClientConnection, ServerConnection};
    use rustls_pki_types::{PrivatePkcs8KeyDer, ServerName};

    /// A private key as key tools write it: readable by its owner alone.
    fn write_key(path: &Path, key: &KeyPair) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// A CA, server pairs written to `dir`, and a client certificate, all from rcgen.
    struct Files {
        dir: tempfile::TempDir,
        ca: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    impl Files {
        fn new() -> Files {
            Files::with_ca("test CA")
        }

        fn with_ca(ca_name: &str) -> Files {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, ca_name);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
            Files { dir, ca: cert.der().clone(), issuer: Issuer::new(params, key) }
        }

        /// Writes NAME.pem / NAME.key for `sans`, returns the certificate.
        fn leaf(
            &self,
            name: &str,
            alg: &'static rcgen::SignatureAlgorithm,
            sans: &[&str],
            client: bool,
        ) -> (CertificateDer<'static>, KeyPair) {
            let key = KeyPair::generate_for(alg).unwrap();
            let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages =
                vec![if client { ExtendedKeyUsagePurpose::ClientAuth } else { ExtendedKeyUsagePurpose::ServerAuth }];
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            std::fs::write(self.dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            write_key(&self.dir.path().join(format!("{name}.key")), &key);
            (cert.der().clone(), key)
        }

        /// Writes NAME.pem / NAME.key, a server certificate valid over the given period.
        fn leaf_dated(&self, name: &str, not_before: time::OffsetDateTime, not_after: time::OffsetDateTime) {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::new(vec![format!("{name}.example")]).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            (params.not_before, params.not_after) = (not_before, not_after);
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            std::fs::write(self.dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            write_key(&self.dir.path().join(format!("{name}.key")), &key);
        }

        /// Writes NAME.pem / NAME.key, a client certificate with serial number `serial`.
        fn device(&self, name: &str, serial: u64) -> (CertificateDer<'static>, KeyPair) {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params.serial_number = Some(rcgen::SerialNumber::from(serial));
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            std::fs::write(self.dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            (cert.der().clone(), key)
        }

        /// Writes `file`, a list of this CA revoking `serials` (PEM or DER), due for renewal
        /// `next_days` from now (negative: overdue); `number` is its CRL number.
        fn crl(&self, file: &str, serials: &[u64], next_days: i64, number: u64, pem: bool) {
            let now = time::OffsetDateTime::now_utc();
            let params = rcgen::CertificateRevocationListParams {
                this_update: now - time::Duration::days(60),
                next_update: now + time::Duration::days(next_days),
                crl_number: rcgen::SerialNumber::from(number),
                issuing_distribution_point: None,
                revoked_certs: serials
                    .iter()
                    .map(|s| rcgen::RevokedCertParams {
                        serial_number: rcgen::SerialNumber::from(*s),
                        revocation_time: now - time::Duration::days(1),
                        reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                        invalidity_date: None,
                    })
                    .collect(),
                key_identifier_method: rcgen::KeyIdMethod::Sha256,
            };
            let crl = params.signed_by(&self.issuer).unwrap();
            let path = self.dir.path().join(file);
            if pem {
                std::fs::write(path, crl.pem().unwrap()).unwrap();
            } else {
                std::fs::write(path, crl.der()).unwrap();
            }
        }

        fn raw(&self, names: &[&str], auth: ClientAuth) -> RawTls {
            RawTls {
                certs: names
                    .iter()
                    .map(|n| RawCert { cert: format!("{n}.pem"), key: format!("{n}.key"), ocsp: None })
                    .collect(),
                client_ca: Some("ca.pem".into()),
                client_crl: Default::default(),
                client_auth: auth,
                alpn: vec![],
                ticket_keys: None,
            }
        }
    }

    /// In-memory handshake; returns the server side or the first error either side saw.
    fn handshake(
        server: rustls::ServerConfig,
        files: &Files,
        sni: &str,
        versions: &[&'static rustls::SupportedProtocolVersion],
        client_cert: Option<(CertificateDer<'static>, &KeyPair)>,
    ) -> Result<ServerConnection, rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots.add(files.ca.clone()).unwrap();
        let b = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots);
        let cfg = match client_cert {
            Some((der, key)) => {
                b.with_client_auth_cert(vec![der], PrivatePkcs8KeyDer::from(key.serialize_der()).into()).unwrap()
            }
            None => b.with_no_client_auth(),
        };
        let mut c = ClientConnection::new(Arc::new(cfg), ServerName::try_from(sni.to_string()).unwrap()).unwrap();
        let mut s = ServerConnection::new(Arc::new(server)).unwrap();
        // TLS 1.3 client auth is judged by the server after the client's last flight.
        pump(&mut c, &mut s, |c, s| !c.is_handshaking() && !s.is_handshaking())?;
        Ok(s)
    }

    /// Flights back and forth between `c` and `s` until `done`; the first error either side
    /// saw (the server's after the client's, so a refusal reads as the client received it).
    fn pump(
        c: &mut ClientConnection,
        s: &mut ServerConnection,
        done: impl Fn(&ClientConnection, &ServerConnection) -> bool,
    ) -> Result<(), rustls::Error> {
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut buf.as_slice()).unwrap();
            let server_result = s.process_new_packets().map(|_| ());
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
            server_result?;
            if done(c, s) {
                return Ok(());
            }
        }
        panic!("handshake stalled");
    }

    /// Accepts any server certificate and remembers it: the tests ask which one was served,
    /// including for names no certificate matches.
    #[derive(Debug)]
    struct Record(
        std::sync::Mutex<Option<CertificateDer<'static>>>,
        Arc<rustls::crypto::CryptoProvider>,
        /// The stapled OCSP response, empty without one.
        std::sync::Mutex<Vec<u8>>,
    );

    impl rustls::client::danger::ServerCertVerifier for Record {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            ocsp: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            *self.0.lock().unwrap() = Some(end_entity.clone().into_owned());
            *self.2.lock().unwrap() = ocsp.to_vec();
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, &self.1.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, &self.1.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.1.signature_verification_algorithms.supported_schemes()
        }
    }

    /// A handshake with a client that accepts any certificate and records what the server
    /// sent: its certificate and its stapled OCSP response (empty without one).
    fn served(
        server: rustls::ServerConfig,
        sni: &str,
        version: Option<&'static rustls::SupportedProtocolVersion>,
    ) -> (CertificateDer<'static>, Vec<u8>) {
        let record = Arc::new(Record(std::sync::Mutex::new(None), provider(), std::sync::Mutex::default()));
        let b = ClientConfig::builder_with_provider(provider());
        let b = match version {
            Some(v) => b.with_protocol_versions(&[v]),
            None => b.with_safe_default_protocol_versions(),
        };
        let cfg = b.unwrap().dangerous().with_custom_certificate_verifier(record.clone()).with_no_client_auth();
        let mut c = ClientConnection::new(Arc::new(cfg), ServerName::try_from(sni.to_string()).unwrap()).unwrap();
        let mut s = ServerConnection::new(Arc::new(server)).unwrap();
        while c.is_handshaking() || s.is_handshaking() {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets().unwrap();
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets().unwrap();
        }
        let cert = record.0.lock().unwrap().clone().expect("the server sent a certificate");
        let ocsp = record.2.lock().unwrap().clone();
        (cert, ocsp)
    }

    #[test]
    fn the_certificate_is_chosen_by_sni_with_a_fallback_to_the_first() {
        let f = Files::new();
        let (a, _) = f.leaf("a", &rcgen::PKCS_ECDSA_P256_SHA256, &["a.example"], false);
        let (b, _) = f.leaf("b", &rcgen::PKCS_RSA_SHA256, &["b.example", "*.fleet.example"], false);
        let raw = f.raw(&["a", "b"], ClientAuth::None);
        let served = |sni: &str| served(server_config(&raw, "mqtts", f.dir.path()).unwrap().config, sni, None).0;
        assert_eq!(served("a.example"), a);
        assert_eq!(served("b.example"), b, "RSA pair chosen by its exact name");
        assert_eq!(served("truck-1.fleet.example"), b, "wildcard");
        assert_eq!(served("unknown.example"), a, "unknown names get the first pair");
    }

    #[test]
    fn tls_1_2_and_1_3_are_both_offered() {
        let f = Files::new();
        f.leaf("a", &rcgen::PKCS_ECDSA_P256_SHA256, &["a.example"], false);
        let raw = f.raw(&["a"], ClientAuth::None);
        for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let s = handshake(server_config(&raw, "mqtts", f.dir.path()).unwrap().config, &f, "a.example", &[v], None)
                .unwrap();
            assert_eq!(s.protocol_version(), Some(v.version));
        }
    }

    #[test]
    fn client_auth_modes() {
        let f = Files::new();
        f.leaf("a", &rcgen::PKCS_ECDSA_P256_SHA256, &["a.example"], false);
        let (dev, dev_key) = f.leaf("device-1", &rcgen::PKCS_ECDSA_P256_SHA256, &[], true);
        let v13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let with = |auth, cert: bool| {
            let cfg = server_config(&f.raw(&["a"], auth), "mqtts", f.dir.path()).unwrap().config;
            handshake(cfg, &f, "a.example", v13, cert.then(|| (dev.clone(), &dev_key)))
        };
        // required: no certificate, no session.
        assert!(with(ClientAuth::Required, false).is_err());
        let s = with(ClientAuth::Required, true).unwrap();
        assert!(s.peer_certificates().is_some());
        // optional: both work; the certificate is seen when sent.
        assert!(with(ClientAuth::Optional, false).unwrap().peer_certificates().is_none());
        assert!(with(ClientAuth::Optional, true).unwrap().peer_certificates().is_some());
        // none: the server never asks, so a client certificate is never sent.
        assert!(with(ClientAuth::None, true).unwrap().peer_certificates().is_none());
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused() {
        let f = Files::new();
        f.leaf("a", &rcgen::PKCS_ECDSA_P256_SHA256, &["a.example"], false);
        let other = Files::new();
        let (dev, dev_key) = other.leaf("intruder", &rcgen::PKCS_ECDSA_P256_SHA256, &[], true);
        let cfg = server_config(&f.raw(&["a"], ClientAuth::Optional), "mqtts", f.dir.path()).unwrap().config;
        let v13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        assert!(handshake(cfg, &f, "a.example", v13, Some((dev, &dev_key))).is_err());
    }

    #[test]
    fn validity_periods() {
        let now = 1_800_000_000;
        assert_eq!(validity(now - DAY, now + 365 * DAY, now), Validity::Valid);
        assert_eq!(validity(now - DAY, now + 10 * DAY + 5, now), Validity::ExpiresSoon { days_left: 10 });
        assert_eq!(validity(now - DAY, now + 30 * DAY, now), Validity::Valid);
        assert_eq!(validity(now - 400 * DAY, now - 3 * DAY - 1, now), Validity::Expired { days_ago: 3 });
        assert_eq!(validity(now + 2 * DAY + 1, now + 400 * DAY, now), Validity::NotYetValid { days: 2 });
    }

    #[test]
    fn an_expired_certificate_is_a_load_error_one_close_to_expiry_loads_with_its_date() {
        let f = Files::new();
        let now = time::OffsetDateTime::now_utc();
        f.leaf_dated("old", now - time::Duration::days(400), now - time::Duration::days(3));
        // Half a day past whole days: the count is the same however long the test takes.
        let soon = now + time::Duration::days(10) + time::Duration::hours(12);
        f.leaf_dated("soon", now - time::Duration::days(80), soon);
        let errs =
            server_config(&f.raw(&["old"], ClientAuth::None), "mqtts", f.dir.path()).err().expect("expired loads");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].0, "certs[0].cert");
        assert!(
            errs[0].1.contains("old.pem: certificate expired on") && errs[0].1.contains("(3 days ago)"),
            "{errs:?}"
        );
        let built = server_config(&f.raw(&["soon"], ClientAuth::None), "mqtts", f.dir.path()).unwrap();
        assert_eq!(built.warnings.len(), 1, "{:?}", built.warnings);
        assert_eq!(built.warnings[0].0, "certs[0].cert");
        assert!(built.warnings[0].1.contains("soon.pem: certificate expires in 10 days, on "), "{:?}", built.warnings);
        assert_eq!(built.cert_expiry, vec![("soon.pem".to_string(), soon.unix_timestamp())]);
    }

    #[test]
    fn a_key_that_does_not_fit_and_unreadable_files_are_load_errors_naming_the_file() {
        let f = Files::new();
        f.leaf("a", &rcgen::PKCS_ECDSA_P256_SHA256, &["a.example"], false);
        f.leaf("b", &rcgen::PKCS_ECDSA_P256_SHA256, &["b.example"], false);
        let mut raw = f.raw(&["a"], ClientAuth::None);
        raw.certs[0].key = "b.key".into();
        let errs = server_config(&raw, "mqtts", f.dir.path()).err().expect("a foreign key loads");
        assert_eq!(errs[0].0, "certs[0]");
        assert!(errs[0].1.contains("b.key does not fit the certificate"), "{errs:?}");

        let mut raw = f.raw(&["a"], ClientAuth::None);
        raw.certs[0].key = "missing.key".into();
        raw.certs[0].cert = "a.pem".into();
        let errs = server_config(&raw, "mqtts", f.dir.path()).err().expect("a missing key loads");
        assert_eq!(errs[0].0, "certs[0].key");
        assert!(errs[0].1.contains("missing.key"), "{errs:?}");

        let mut raw = f.raw(&["a"], ClientAuth::None);
        raw.certs[0].ocsp = Some("missing.der".into());
        let errs = server_config(&raw, "mqtts", f.dir.path()).err().expect("a missing OCSP file loads");
        assert_eq!(errs[0].0, "certs[0].ocsp");
        std::fs::write(f.dir.path().join("empty.der"), b"").unwrap();
        raw.certs[0].ocsp = Some("empty.der".into());
        let errs = server_config(&raw, "mqtts", f.dir.path()).err().expect("an empty OCSP file loads");
        assert!(errs[0].1.ends_with("empty.der is empty"), "{errs:?}");

        // A bad ticket key file is reported together with the other files' problems.
        let mut raw = f.raw(&["a"], ClientAuth::None);
        raw.certs[0].key = "missing.key".into();
        raw.ticket_keys = Some("missing-ticket-keys".into());
        let errs = server_config(&raw, "mqtts", f.dir.path()).err().expect("a missing key file loads");
        let paths: Vec<&str> = errs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(paths, ["certs[0].key", "ticket_keys"], "{errs:?}");
        assert!(errs[1].1.contains("missing-ticket-keys"), "{errs:?}");
    }

    #[test]
    fn the_ocsp_response_is_stapled_with_tls_1_2_and_1_3() {
        let f = Files::new();
        f.leaf("a", &rcgen::PKCS_ECDSA_P256_SHA256, &["a.example"], false);
        // OCSPResponse { responseStatus: successful }: rustls staples the bytes as they are.
        let response = [0x30, 0x03, 0x0a, 0x01, 0x00];
        std::fs::write(f.dir.path().join("a.ocsp.der"), response).unwrap();
        let mut raw = f.raw(&["a"], ClientAuth::None);
        for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
            assert_eq!(served(server_config(&raw, "mqtts", f.dir.path()).unwrap().config, "a.example", Some(v)).1, b"");
        }
        raw.certs[0].ocsp = Some("a.ocsp.der".into());
        for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let (_, ocsp) = served(server_config(&raw, "mqtts", f.dir.path()).unwrap().config, "a.example", Some(v));
            assert_eq!(ocsp, response, "{v:?}");
        }
    }

    /// A full handshake with `client` (its session cache keeps the ticket the server sends),
    /// then the server's ticket delivered; the client's error, or whether it resumed.
    fn session(
        server: rustls::ServerConfig,
        client: &Arc<ClientConfig>,
    ) -> Result<rustls::HandshakeKind, rustls::Error> {
        let mut c = ClientConnection::new(client.clone(), ServerName::try_from("a.example").unwrap()).unwrap();
        let mut s = ServerConnection::new(Arc::new(server)).unwrap();
        pump(&mut c, &mut s, |c, s| !c.is_handshaking() && !s.is_handshaking() && !s.wants_write())?;
        Ok(s.handshake_kind().unwrap())
    }

    fn device_client(f: &Files, dev: &CertificateDer<'static>, key: &KeyPair) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(f.ca.clone()).unwrap();
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![dev.clone()], PrivatePkcs8KeyDer::from(key.serialize_der()).into())
            .unwrap();
        Arc::new(cfg)
    }

    fn with_crls(f: &Files, auth: ClientAuth, files: &[&str]) -> RawTls {
        let mut raw = f.raw(&["a"], auth);
        raw.client_crl = OneOrMany { files: files.iter().map(|s| s.to_string()).collect(), is_list: true };
        raw
    }

    fn revoked_alert(e: &rustls::Error) -> bool {
        matches!(e, rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked))
    }

    #[test]
    fn a_revoked_client_certificate_is_refused_the_others_pass_pem_or_der() {
        let f = Files::new();
        f.leaf("a", &rcgen::PKCS_ECDSA_P256_SHA256, &["a.example"], false);
        let (d1, k1) = f.device("device-1", 1);
        let (d2, k2) = f.device("device-2", 2);
        f.crl("ca.crl.pem", &[1], 30, 1, true);
        f.crl("ca.crl.der", &[1], 30, 1, false);
        let v13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        for file in ["ca.crl.pem", "ca.crl.der"] {
            for auth in [ClientAuth::Required, ClientAuth::Optional] {
                let built = server_config(&with_crls(&f, auth, &[file]), "mqtts", f.dir.path()).unwrap();
                assert!(built.warnings.is_empty(), "{:?}", built.warnings);
                let refused = handshake(built.config.clone(), &f, "a.example", v13, Some((d1.clone(), &k1)));
                assert!(refused.as_ref().is_err_and(revoked_alert), "{file} {auth:?}: {:?}", refused.err());
                let ok = handshake(built.config.clone(), &f, "a.example", v13, Some((d2.clone(), &k2))).unwrap();
                assert!(ok.peer_certificates().is_some(), "{file} {auth:?}");
            }
        }
        // The server's own error is what the connection log and metric tell apart.
        let cfg =
            server_config(&with_crls(&f, ClientAuth::Required, &["ca.crl.pem"]), "mqtts", f.dir.path()).unwrap().config;
        let mut c =
            ClientConnection::new(device_client(&f, &d1, &k1), ServerName::try_from("a.example").unwrap()).unwrap();
        let mut s = ServerConnection::new(Arc::new(cfg)).unwrap();
        let mut server_error = None;
        for _ in 0..5 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut buf.as_slice()).unwrap();
            if let Err(e) = s.process_new_packets() {
                server_error = Some(e);
                break;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets().unwrap();
        }
        assert_eq!(server_error, Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)));
    }

    #[test]
    fn a_ticket_from_before_a_revocation_does_not_resume_a_reissued_list_keeps_tickets() {
        let f = Files::new();
        f.leaf("a", &rcgen::PKCS_ECDSA_P256_SHA256, &["a.example"], false);
        let (d1, k1) = f.device("device-1", 1);
        f.crl("none-revoked.crl", &[], 30, 1, true);
        f.crl("none-revoked-again.crl", &[], 45, 2, true);
        f.crl("one-revoked.crl", &[1], 30, 3, true);
        let cfg = |file: &str| {
            server_config(&with_crls(&f, ClientAuth::Required, &[file]), "mqtts", f.dir.path()).unwrap().config
        };
        let client = device_client(&f, &d1, &k1);
        assert_eq!(session(cfg("none-revoked.crl"), &client).unwrap(), rustls::HandshakeKind::Full);
        // The same revocations in a list issued later (another number, another date): a
        // reload of it leaves the tickets as they were.
        assert_eq!(session(cfg("none-revoked-again.crl"), &client).unwrap(), rustls::HandshakeKind::Resumed);
        // Revoked since its ticket was issued: no resumption, a full handshake, refused.
        let refused = session(cfg("one-revoked.crl"), &client);
        assert!(refused.as_ref().is_err_and(revoked_alert), "{refused:?}");
    }

    #[test]
    fn bad_revocation_lists_are_load_errors_naming_the_file() {
        let f = Files::new();
        f.leaf("a", &rcgen::PKCS_ECDSA_P256_SHA256, &["a.example"], false);
        f.crl("good.crl", &[1], 30, 1, true);
        f.crl("same-issuer.crl", &[2], 30, 2, false);
        std::fs::write(f.dir.path().join("garbage.crl"), b"\x30\x03\x02\x01\x01").unwrap();
        std::fs::write(f.dir.path().join("empty.crl"), b"").unwrap();
        std::fs::write(f.dir.path().join("cert-not-crl.pem"), std::fs::read(f.dir.path().join("a.pem")).unwrap())
            .unwrap();
        let raw = with_crls(
            &f,
            ClientAuth::Required,
            &["good.crl", "missing.crl", "garbage.crl", "empty.crl", "cert-not-crl.pem", "same-issuer.crl"],
        );
        let errs = server_config(&raw, "mqtts", f.dir.path()).err().expect("bad lists load");
        let got: Vec<String> = errs.iter().map(|(k, m)| format!("{k}: {m}")).collect();
        for (i, want) in [
            (1, "missing.crl: No such file"),
            (2, "garbage.crl: not a usable certificate revocation list"),
            (3, "empty.crl is empty"),
            (4, "cert-not-crl.pem: no X509 CRL in it"),
            (5, "same-issuer.crl: a second list from CN=test CA (the first is in"),
        ] {
            let key = format!("client_crl[{i}]: ");
            assert!(got.iter().any(|g| g.starts_with(&key) && g.contains(want)), "{key}{want} not in {got:#?}");
        }
        assert_eq!(got.len(), 5, "{got:#?}");
        // One file, written as a string: the problem is at `client_crl` itself.
        let mut raw = f.raw(&["a"], ClientAuth::Required);
        raw.client_crl = OneOrMany { files: vec!["garbage.crl".into()], is_list: false };
        let errs = server_config(&raw, "mqtts", f.dir.path()).err().expect("a bad list loads");
        assert_eq!(errs[0].0, "client_crl", "{errs:?}");
    }

    #[test]
    fn an_overdue_list_still_revokes_and_is_warned_about_so_is_a_ca_without_a_list() {
        let f = Files::new();
        f.leaf("a", &rcgen::PKCS_ECDSA_P256_SHA256, &["a.example"], false);
        let (d1, k1) = f.device("device-1", 1);
        let (d2, k2) = f.device("device-2", 2);
        f.crl("overdue.crl", &[1], -3, 1, true);
        let built =
            server_config(&with_crls(&f, ClientAuth::Required, &["overdue.crl"]), "mqtts", f.dir.path()).unwrap();
        assert_eq!(built.warnings.len(), 1, "{:?}", built.warnings);
        assert_eq!(built.warnings[0].0, "client_crl[0]");
        assert!(built.warnings[0].1.contains("overdue.crl: the list from CN=test CA was due to be replaced on"));
        assert!(built.warnings[0].1.contains("(3 days ago)"), "{:?}", built.warnings);
        let v13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let refused = handshake(built.config.clone(), &f, "a.example", v13, Some((d1, &k1)));
        assert!(refused.as_ref().is_err_and(revoked_alert), "{:?}", refused.err());
        assert!(handshake(built.config, &f, "a.example", v13, Some((d2.clone(), &k2))).is_ok());

        // A second client CA without a list: its devices cannot be checked, so they are refused.
        let other = Files::with_ca("other CA");
        let (od, ok) = other.device("other-device", 1);
        let bundle = format!(
            "{}{}",
            std::fs::read_to_string(f.dir.path().join("ca.pem")).unwrap(),
            std::fs::read_to_string(other.dir.path().join("ca.pem")).unwrap()
        );
        std::fs::write(f.dir.path().join("two-cas.pem"), bundle).unwrap();
        f.crl("current.crl", &[], 30, 2, true);
        let mut raw = with_crls(&f, ClientAuth::Required, &["current.crl"]);
        raw.client_ca = Some("two-cas.pem".into());
        let built = server_config(&raw, "mqtts", f.dir.path()).unwrap();
        assert_eq!(built.warnings.len(), 1, "{:?}", built.warnings);
        assert_eq!(built.warnings[0].0, "client_crl");
        assert!(
            built.warnings[0]
                .1
                .starts_with("no list from client CA CN=other CA: every certificate it signs is refused"),
            "{:?}",
            built.warnings
        );
        assert!(handshake(built.config.clone(), &f, "a.example", v13, Some((d2, &k2))).is_ok());
        let unknown = handshake(built.config, &f, "a.example", v13, Some((od, &ok)));
        assert!(unknown.is_err(), "a device of a CA without a list got in");

        // Lists on a listener that asks for no certificate do nothing: said so.
        let built = server_config(&with_crls(&f, ClientAuth::None, &["current.crl"]), "mqtts", f.dir.path()).unwrap();
        assert_eq!(built.warnings.len(), 1, "{:?}", built.warnings);
        assert!(built.warnings[0].1.contains("client_auth is \"none\""), "{:?}", built.warnings);
    }

    #[test]
    fn a_private_key_others_can_read_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let f = Files::new();
        f.leaf("a", &rcgen::PKCS_ECDSA_P256_SHA256, &["a.example"], false);
        let key = f.dir.path().join("a.key");
        let raw = f.raw(&["a"], ClientAuth::None);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let built = server_config(&raw, "mqtts", f.dir.path()).unwrap();
        assert_eq!(built.warnings.len(), 1, "{:?}", built.warnings);
        assert_eq!(built.warnings[0].0, "certs[0].key");
        assert!(
            built.warnings[0].1.contains("a.key can be read by every user of the machine (mode 644)")
                && built.warnings[0].1.ends_with("chmod go-r"),
            "{:?}",
            built.warnings
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(server_config(&raw, "mqtts", f.dir.path()).unwrap().warnings.is_empty());
        // The CA bundle is public: no warning however readable.
        std::fs::set_permissions(f.dir.path().join("ca.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let raw = f.raw(&["a"], ClientAuth::Required);
        assert!(server_config(&raw, "mqtts", f.dir.path()).unwrap().warnings.is_empty());
    }

    #[test]
    fn who_can_read_a_secret() {
        assert_eq!(exposure(0o600, true), None);
        assert_eq!(exposure(0o400, false), None);
        assert_eq!(exposure(0o644, true), Some(("every user of the machine", "go-r")));
        assert_eq!(exposure(0o604, false), Some(("every user of the machine", "o-r")));
        assert_eq!(exposure(0o640, true), Some(("the users of its group", "g-r")));
        // Read through its group: a Kubernetes Secret (root:fsGroup, defaultMode 0440), or a
        // host's root:harbormaster 0640.
        assert_eq!(exposure(0o440, false), None);
        assert_eq!(exposure(0o640, false), None);
    }
}
