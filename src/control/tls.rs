//! Builds the rustls server configuration of a TLS listener from its config section: loads the
//! cert/key pairs and the client CA bundle, picks a certificate by SNI (names taken from each
//! certificate's subject alternative names), and sets client authentication.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::config::{relative, ClientAuth, RawTls};

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
fn dns_names(der: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
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

/// Build the server config, or every problem found.
pub fn server_config(t: &RawTls, base: &Path) -> Result<rustls::ServerConfig, TlsProblems> {
    let mut problems = TlsProblems::new();
    let provider = provider();
    let mut keys = Vec::new();
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
        let key = match PrivateKeyDer::from_pem_file(&key_path) {
            Ok(k) => k,
            Err(e) => {
                problems.push((format!("certs[{i}].key"), format!("{}: {e}", key_path.display())));
                continue;
            }
        };
        match CertifiedKey::from_der(chain, key, &provider) {
            Ok(ck) => keys.push(Arc::new(ck)),
            Err(e) => problems.push((format!("certs[{i}]"), format!("key does not fit the certificate: {e}"))),
        }
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
            match CertificateDer::pem_file_iter(&ca_path).and_then(|it| it.collect::<Result<Vec<_>, _>>()) {
                Ok(certs) if certs.is_empty() => {
                    problems.push(("client_ca".into(), format!("no certificate in {}", ca_path.display())))
                }
                Ok(certs) => {
                    for c in certs {
                        if let Err(e) = roots.add(c) {
                            problems.push(("client_ca".into(), format!("{}: {e}", ca_path.display())));
                        }
                    }
                }
                Err(e) => problems.push(("client_ca".into(), format!("{}: {e}", ca_path.display()))),
            }
            if roots.is_empty() {
                None
            } else {
                let b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
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
    if !problems.is_empty() {
        return Err(problems);
    }

    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    for k in &keys {
        for name in dns_names(&k.cert[0]) {
            // The first pair naming a host wins, like the order of `certs` suggests.
            match name.strip_prefix("*.") {
                Some(parent) => wildcard.entry(parent.to_string()).or_insert_with(|| k.clone()),
                None => exact.entry(name).or_insert_with(|| k.clone()),
            };
        }
    }
    let resolver = SniResolver { exact, wildcard, default: keys[0].clone() };

    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| vec![(String::new(), e.to_string())])?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = t.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    // Session tickets make a reconnect storm's resumed TLS 1.2 handshakes several times
    // cheaper; the ticket key rotates and lives only in this process.
    match rustls::crypto::aws_lc_rs::Ticketer::new() {
        Ok(t) => cfg.ticketer = t,
        Err(e) => return Err(vec![(String::new(), format!("session tickets: {e}"))]),
    }
    Ok(cfg)
}
