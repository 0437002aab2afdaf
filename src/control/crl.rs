//! Client certificate revocation lists (`client_crl`): reading the files (PEM with any number of
//! `X509 CRL` blocks, or one DER list), the checks `check` reports before a handshake would
//! meet them, and a digest of what they revoke for the session-ticket context. The lists
//! themselves are judged by rustls' client verifier (tls.rs), with its defaults: every
//! certificate of the client's chain is looked up in its issuer's list, a certificate whose
//! issuer has no list is refused, and a list past its `nextUpdate` still counts.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use sha2::{Digest, Sha256};

use super::config::{relative, OneOrMany};
use super::tls::TlsProblems;

/// OID of the issuingDistributionPoint extension: a list that covers part of its issuer's
/// certificates (partitioned lists) may share its issuer with others.
const IDP: &str = "2.5.29.28";

/// The lists of a listener, ready for the verifier, and what they revoke.
#[derive(Default)]
pub struct Crls {
    pub lists: Vec<CertificateRevocationListDer<'static>>,
    /// Issuer → revoked serial numbers, over every list: the ticket context hashes it, so
    /// a revocation voids the tickets issued before it (rustls restores a resumed session's
    /// client certificate without verifying it again). Re-issuing a list that revokes the
    /// same certificates leaves it, and so the tickets, as it was.
    revoked: BTreeMap<Vec<u8>, Vec<Vec<u8>>>,
}

impl Crls {
    /// A digest of the revoked certificates, issuer by issuer; empty without lists.
    pub fn revoked_digest(&self) -> Vec<u8> {
        if self.lists.is_empty() {
            return Vec::new();
        }
        let mut h = Sha256::new();
        for (issuer, serials) in &self.revoked {
            h.update((issuer.len() as u64).to_be_bytes());
            h.update(issuer);
            h.update((serials.len() as u64).to_be_bytes());
            for s in serials {
                h.update((s.len() as u64).to_be_bytes());
                h.update(s);
            }
        }
        h.finalize().to_vec()
    }
}

/// The lists of one file: PEM (`-----BEGIN X509 CRL-----`, one or more) or a single DER list.
fn read_file(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Ok(vec![CertificateRevocationListDer::from(bytes)]);
    }
    let lists = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if lists.is_empty() {
        return Err(format!("{}: no X509 CRL in it (a PEM list starts with -----BEGIN X509 CRL-----)", path.display()));
    }
    Ok(lists)
}

/// A distinguished name for people: its CN, or the whole name.
fn display_name(name: &x509_parser::x509::X509Name<'_>) -> String {
    name.iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(|cn| format!("CN={cn}"))
        .unwrap_or_else(|| name.to_string())
}

/// Reads and checks the `client_crl` files against the client CAs `cas` (already in `roots`).
/// Problems: a file that cannot be read, that holds no list, a list rustls refuses, or two
/// whole lists from one issuer (rustls would use only the first). Warnings: a list past its
/// `nextUpdate`, and a client CA without a list (the certificates it signs are refused).
pub fn load(
    files: &OneOrMany,
    base: &Path,
    cas: &[CertificateDer<'static>],
    roots: &Arc<RootCertStore>,
    problems: &mut TlsProblems,
    warnings: &mut TlsProblems,
) -> Crls {
    let mut crls = Crls::default();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    // Issuers with a list covering all their certificates, and the file it came from.
    let mut whole: BTreeMap<Vec<u8>, String> = BTreeMap::new();
    for (i, file) in files.files.iter().enumerate() {
        let at = files.key("client_crl", i);
        let path = relative(base, file);
        let lists = match read_file(&path) {
            Ok(l) => l,
            Err(e) => {
                problems.push((at, e));
                continue;
            }
        };
        for (n, der) in lists.into_iter().enumerate() {
            let which =
                if n == 0 { path.display().to_string() } else { format!("{} (list {})", path.display(), n + 1) };
            // rustls' own parser decides what it accepts; a list it would refuse at every
            // start is named here with its file.
            let accepted = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .with_crls([der.clone()])
                .build();
            if let Err(e) = accepted {
                problems.push((at.clone(), format!("{which}: not a usable certificate revocation list: {e}")));
                continue;
            }
            let Ok((_, list)) = x509_parser::parse_x509_crl(&der) else {
                problems.push((at.clone(), format!("{which}: not a certificate revocation list")));
                continue;
            };
            let issuer = list.issuer().as_raw().to_vec();
            let name = display_name(list.issuer());
            let partitioned = list.extensions().iter().any(|e| e.oid.to_id_string() == IDP);
            if !partitioned {
                if let Some(first) = whole.get(&issuer) {
                    problems.push((
                        at.clone(),
                        format!(
                            "{which}: a second list from {name} (the first is in {first}); only one would be \
                             used: keep the newest"
                        ),
                    ));
                    continue;
                }
                whole.insert(issuer.clone(), which.clone());
            }
            if let Some(next) = list.next_update() {
                if next.timestamp() < now {
                    warnings.push((
                        at.clone(),
                        format!(
                            "{which}: the list from {name} was due to be replaced on {next} ({} days ago); it still \
                             revokes what it lists, but nothing revoked since: publish a fresh one",
                            (now - next.timestamp()) / 86_400
                        ),
                    ));
                }
            }
            let serials = crls.revoked.entry(issuer).or_default();
            serials.extend(list.iter_revoked_certificates().map(|r| r.raw_serial().to_vec()));
            crls.lists.push(der);
        }
    }
    for serials in crls.revoked.values_mut() {
        serials.sort();
        serials.dedup();
    }
    if !crls.lists.is_empty() {
        for ca in cas {
            let Ok((_, cert)) = x509_parser::parse_x509_certificate(ca) else { continue };
            if !crls.revoked.contains_key(cert.subject().as_raw()) {
                warnings.push((
                    "client_crl".into(),
                    format!(
                        "no list from client CA {}: every certificate it signs is refused (its revocation status \
                         is unknown); add its list, even an empty one",
                        display_name(cert.subject())
                    ),
                ));
            }
        }
    }
    crls
}
