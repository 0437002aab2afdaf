//! The certificates shipped in `config/certs/` so that the example config runs as it is. Their
//! private keys are in the repository, so anyone can impersonate a server that serves them or
//! get a client certificate that a listener trusting their CA accepts. This module knows their
//! SHA-256 fingerprints (the files are embedded at build time) and words the warning given at
//! every load (`run`, reload, `check`) for a listener that serves or trusts one of them. It does
//! not read files: the TLS loader hands it the certificates it read.

use std::sync::LazyLock;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

/// The shipped certificate files, by their path in the repository.
const SHIPPED: [(&str, &str); 3] = [
    ("config/certs/ca.pem", include_str!("../../config/certs/ca.pem")),
    ("config/certs/server.pem", include_str!("../../config/certs/server.pem")),
    ("config/certs/device-001.pem", include_str!("../../config/certs/device-001.pem")),
];

/// SHA-256 of every certificate in the shipped files (DER), with the file it is in.
static FINGERPRINTS: LazyLock<Vec<([u8; 32], &'static str)>> = LazyLock::new(|| {
    SHIPPED
        .iter()
        .flat_map(|(file, pem)| {
            CertificateDer::pem_slice_iter(pem.as_bytes()).flatten().map(|der| (Sha256::digest(&der).into(), *file))
        })
        .collect()
});

/// The shipped file a DER certificate is, if it is one of them.
pub fn shipped(der: &[u8]) -> Option<&'static str> {
    let print: [u8; 32] = Sha256::digest(der).into();
    FINGERPRINTS.iter().find(|(p, _)| *p == print).map(|(_, file)| *file)
}

/// A warning when a served chain holds a shipped certificate.
pub fn served(chain: &[CertificateDer<'_>]) -> Option<String> {
    let file = chain.iter().find_map(|c| shipped(c))?;
    Some(format!(
        "serves the demo certificate {file}, whose private key is published with harbormaster: \
         anyone can impersonate this server. Make your own: harbormaster certs --out DIR --name HOST"
    ))
}

/// A warning when a client CA bundle holds a shipped certificate.
pub fn trusted(bundle: &[CertificateDer<'_>]) -> Option<String> {
    let file = bundle.iter().find_map(|c| shipped(c))?;
    Some(format!(
        "trusts the demo certificate {file}, whose private key is published with harbormaster: \
         anyone can make a client certificate this listener accepts. Make your own CA: \
         harbormaster certs --out DIR --name HOST"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_file_holds_a_certificate() {
        assert_eq!(FINGERPRINTS.len(), SHIPPED.len());
        for (file, pem) in SHIPPED {
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(shipped(&der), Some(file));
        }
    }

    #[test]
    fn other_certificates_are_not_the_demo_set() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(shipped(cert.der()), None);
        assert_eq!(served(&[cert.der().clone()]), None);
        assert_eq!(trusted(&[cert.der().clone()]), None);
        let ca = CertificateDer::from_pem_slice(SHIPPED[0].1.as_bytes()).unwrap();
        let warning = trusted(&[cert.der().clone(), ca]).unwrap();
        assert!(warning.contains("config/certs/ca.pem"), "{warning}");
    }
}
