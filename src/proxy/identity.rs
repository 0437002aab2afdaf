//! The TLS identity of a client connection as brokers expect to read it: protocol version and
//! cipher in OpenSSL/IANA spelling, SNI, ALPN, and the verified client certificate's subject CN,
//! algorithms and SHA-256 fingerprint. Built once per connection after the handshake.
//!
//! Spelling matters more than it seems: brokers compare these strings with what OpenSSL would
//! report (RabbitMQ shows `ssl=false` for rustls' own `TLSv1_3` / `TLS13_AES_128_GCM_SHA256`),
//! so nothing here uses rustls' `Debug` names.
//!
//! `key_alg` follows HAProxy's `ssl_sock_get_pkey_algo()` (what `proxy-v2-options cert-key`
//! sends): `"RSA"`/`"EC"`/`"DSA"` followed by `EVP_PKEY_bits()`, e.g. `"EC256"`, `"RSA2048"`.
//! HAProxy sends nothing for Ed25519/Ed448 keys; we send `"ED25519"` / `"ED448"` (the OpenSSL
//! names) rather than leave the sub-TLV out. `sig_alg` uses OpenSSL long names
//! (`"sha256WithRSAEncryption"`), where HAProxy's `cert-sig` sends `OBJ_nid2sn()` short names
//! (`"RSA-SHA256"`; identical for ECDSA: `"ecdsa-with-SHA256"`). Note that HAProxy describes its
//! *own* server certificate in SIG_ALG/KEY_ALG (`SSL_get_certificate`); we describe the client's.

use rustls::{CipherSuite, ProtocolVersion};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use x509_parser::asn1_rs::{Oid, Tag};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use super::rewrite::{char_problem, CharProblem};

/// What the TLS layer learned about a client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsInfo {
    /// "TLSv1.2" or "TLSv1.3".
    pub version: &'static str,
    /// OpenSSL/IANA spelling, e.g. "TLS_AES_128_GCM_SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256".
    pub cipher: &'static str,
    /// Server name the client asked for.
    pub sni: Option<String>,
    /// Negotiated ALPN protocol.
    pub alpn: Option<Vec<u8>>,
    /// The client certificate, when one was presented (and so verified: rustls refuses the
    /// handshake otherwise), on this connection or, when `resumed`, on the one that made the
    /// session ticket.
    pub client_cert: Option<ClientCert>,
    /// The handshake resumed a session (a ticket) instead of authenticating afresh.
    pub resumed: bool,
}

/// Facts from the client's end-entity certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// Subject common name (the first, as OpenSSL-based brokers read it) in UTF-8, when the
    /// subject has one that is safe to pass on.
    pub cn: Option<String>,
    /// The subject's CN when it is not passed on, and why.
    pub cn_refused: Option<RefusedCn>,
    /// The issuer's common name, decoded like `cn`, for routing rules (`cert_issuer_cn`).
    pub issuer_cn: Option<String>,
    /// SHA-256 of the DER certificate.
    pub sha256: [u8; 32],
    /// Signature algorithm in OpenSSL spelling, e.g. "ecdsa-with-SHA256", "sha256WithRSAEncryption".
    pub sig_alg: Option<String>,
    /// Key algorithm as HAProxy spells it, e.g. "EC256", "RSA2048".
    pub key_alg: Option<String>,
}

/// Why a certificate's CN is not passed on to brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CnRefusal {
    /// It holds a control character (C0, DEL, C1) or a line/paragraph separator.
    ControlCharacter,
    /// It holds a Unicode non-character (U+FDD0–U+FDEF, U+xFFFE, U+xFFFF), which brokers
    /// refuse in the strings they read as they do control characters.
    NonCharacter,
    /// Its bytes are not a valid string of its ASN.1 type, or the type is not one a CN can
    /// have.
    Undecodable,
}

impl CnRefusal {
    /// The metric label and log field value.
    pub fn as_str(self) -> &'static str {
        match self {
            CnRefusal::ControlCharacter => "control_character",
            CnRefusal::NonCharacter => "noncharacter",
            CnRefusal::Undecodable => "undecodable",
        }
    }
}

/// A CN that is not passed on: why, and what it was, escaped and bounded for a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedCn {
    pub reason: CnRefusal,
    /// The decoded text with every control character and non-character escaped
    /// (`admin\0.attacker`, `dev-\u{fdd0}`), or for
    /// an undecodable CN its ASN.1 tag and bytes in hex; at most [`SHOWN_CN_MAX`] characters.
    pub shown: String,
}

/// Longest rendering of a refused CN in a log line.
pub const SHOWN_CN_MAX: usize = 200;

impl TlsInfo {
    /// Read the facts off a finished server-side rustls connection.
    pub fn from_connection(conn: &rustls::ServerConnection) -> TlsInfo {
        TlsInfo::from_common(conn, conn.server_name())
    }

    /// Read the facts off a finished connection's common state and the SNI it was given (what
    /// the unbuffered API, [`super::tls_stream`], exposes).
    pub fn from_common(conn: &rustls::CommonState, sni: Option<&str>) -> TlsInfo {
        TlsInfo {
            version: conn.protocol_version().map_or("", openssl_version_name),
            cipher: conn.negotiated_cipher_suite().map_or("", |s| openssl_cipher_name(s.suite())),
            sni: sni.map(str::to_owned),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            client_cert: conn
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|der| ClientCert::from_der(der.as_ref())),
            resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        }
    }
}

/// `SSL_get_version()` spelling of a protocol version; `""` for anything else.
pub fn openssl_version_name(version: ProtocolVersion) -> &'static str {
    match version {
        ProtocolVersion::TLSv1_3 => "TLSv1.3",
        ProtocolVersion::TLSv1_2 => "TLSv1.2",
        // rustls never negotiates these; listed so a future provider can't leak Debug names.
        ProtocolVersion::TLSv1_1 => "TLSv1.1",
        ProtocolVersion::TLSv1_0 => "TLSv1",
        _ => "",
    }
}

/// `SSL_CIPHER_get_name()` spelling of a cipher suite (what HAProxy's `ssl-cipher` sends).
///
/// TLS 1.3 suites are named by their IANA names in OpenSSL too. Every suite rustls 0.23 with
/// aws-lc-rs can negotiate is mapped (plus the ECDHE CBC/CCM ones other providers offer); any
/// other suite falls back to its IANA name, and a suite without a known name to `""` (the
/// CIPHER sub-TLV is then left out).
pub fn openssl_cipher_name(suite: CipherSuite) -> &'static str {
    match suite {
        // TLS 1.3: OpenSSL uses the IANA names; rustls' variants say "TLS13_".
        CipherSuite::TLS13_AES_128_GCM_SHA256 => "TLS_AES_128_GCM_SHA256",
        CipherSuite::TLS13_AES_256_GCM_SHA384 => "TLS_AES_256_GCM_SHA384",
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => "TLS_CHACHA20_POLY1305_SHA256",
        CipherSuite::TLS13_AES_128_CCM_SHA256 => "TLS_AES_128_CCM_SHA256",
        CipherSuite::TLS13_AES_128_CCM_8_SHA256 => "TLS_AES_128_CCM_8_SHA256",
        // TLS 1.2, the six aws-lc-rs suites.
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => "ECDHE-ECDSA-AES256-GCM-SHA384",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-ECDSA-CHACHA20-POLY1305",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => "ECDHE-RSA-AES128-GCM-SHA256",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => "ECDHE-RSA-AES256-GCM-SHA384",
        CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-RSA-CHACHA20-POLY1305",
        // TLS 1.2 suites of other providers (names from `openssl ciphers -stdname`).
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA => "ECDHE-ECDSA-AES128-SHA",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA => "ECDHE-ECDSA-AES256-SHA",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA => "ECDHE-RSA-AES128-SHA",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA => "ECDHE-RSA-AES256-SHA",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256 => "ECDHE-ECDSA-AES128-SHA256",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384 => "ECDHE-ECDSA-AES256-SHA384",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256 => "ECDHE-RSA-AES128-SHA256",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384 => "ECDHE-RSA-AES256-SHA384",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_CCM => "ECDHE-ECDSA-AES128-CCM",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_CCM => "ECDHE-ECDSA-AES256-CCM",
        // rustls names TLS 1.2-and-older suites exactly as IANA does ("TLS_ECDHE_..."); only
        // its TLS 1.3 names differ, and those are all mapped above.
        other => match other.as_str() {
            Some(name) if !name.starts_with("TLS13_") => name,
            _ => "",
        },
    }
}

impl ClientCert {
    /// Parse a DER end-entity certificate; never fails: unknown fields are left `None`.
    pub fn from_der(der: &[u8]) -> ClientCert {
        let sha256: [u8; 32] = Sha256::digest(der).into();
        let mut out = ClientCert { cn: None, cn_refused: None, issuer_cn: None, sha256, sig_alg: None, key_alg: None };
        // Trailing bytes after the certificate are ignored: the fingerprint still covers them,
        // which is what a peer hashing the same bytes would get.
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return out;
        };
        if let Some(attr) = cert.subject().iter_common_name().next() {
            let value = attr.attr_value();
            match decode_cn(value.tag(), value.data) {
                Ok(cn) => out.cn = Some(cn),
                Err(refused) => out.cn_refused = Some(refused),
            }
        }
        if let Some(attr) = cert.issuer().iter_common_name().next() {
            out.issuer_cn = decode_cn(attr.attr_value().tag(), attr.attr_value().data).ok();
        }
        // The TBS copy of the algorithm, as HAProxy reads it (X509_get0_tbs_sigalg).
        out.sig_alg = sig_alg_name(&cert.tbs_certificate.signature.algorithm).map(str::to_owned);
        out.key_alg = key_alg_name(&cert);
        out
    }
}

/// A CN attribute's value (its ASN.1 tag and content bytes) as UTF-8, or why it must not be
/// passed on.
pub fn decode_cn(tag: Tag, data: &[u8]) -> Result<String, RefusedCn> {
    let undecodable = || RefusedCn { reason: CnRefusal::Undecodable, shown: shown_bytes(tag, data) };
    let text = match tag {
        Tag::Utf8String => String::from_utf8(data.to_vec()).map_err(|_| undecodable())?,
        // 7-bit types. OpenSSL does not hold PrintableString to its small alphabet on reading,
        // and neither do we: a broker would see the same bytes.
        Tag::PrintableString | Tag::Ia5String | Tag::VisibleString | Tag::NumericString => {
            if !data.is_ascii() {
                return Err(undecodable());
            }
            data.iter().map(|&b| char::from(b)).collect()
        }
        // T.61 as Latin-1, as OpenSSL's ASN1_STRING_to_UTF8 does.
        Tag::TeletexString => data.iter().map(|&b| char::from(b)).collect(),
        Tag::BmpString => {
            if !data.len().is_multiple_of(2) {
                return Err(undecodable());
            }
            let units = data.chunks_exact(2).map(|u| u16::from_be_bytes([u[0], u[1]]));
            char::decode_utf16(units).collect::<Result<String, _>>().map_err(|_| undecodable())?
        }
        Tag::UniversalString => {
            if !data.len().is_multiple_of(4) {
                return Err(undecodable());
            }
            data.chunks_exact(4)
                .map(|u| char::from_u32(u32::from_be_bytes([u[0], u[1], u[2], u[3]])))
                .collect::<Option<String>>()
                .ok_or_else(undecodable)?
        }
        _ => return Err(undecodable()),
    };
    if let Some(reason) = text.chars().find_map(cn_problem) {
        // `escape_debug` escapes non-characters too (`\u{fdd0}`): not printable.
        let shown: String = text.chars().flat_map(char::escape_debug).take(SHOWN_CN_MAX).collect();
        return Err(RefusedCn { reason, shown });
    }
    Ok(text)
}

/// Why `c` keeps a CN from brokers: a character they refuse in any string harbormaster passes
/// on ([`char_problem`], the CONNECT rewrite's rule), or a line/paragraph separator, which
/// breaks a line or a log record in what reads the CN.
fn cn_problem(c: char) -> Option<CnRefusal> {
    match char_problem(c) {
        Some(CharProblem::NonCharacter) => Some(CnRefusal::NonCharacter),
        Some(CharProblem::Nul | CharProblem::Control) => Some(CnRefusal::ControlCharacter),
        None if c == '\u{2028}' || c == '\u{2029}' => Some(CnRefusal::ControlCharacter),
        None => None,
    }
}

fn shown_bytes(tag: Tag, data: &[u8]) -> String {
    let mut s = format!("{tag} ");
    for b in data.iter().take((SHOWN_CN_MAX - s.len()) / 2) {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// OpenSSL long name (`OBJ_nid2ln`) of a certificate signature algorithm, except where OpenSSL's
/// long name is unhelpful ("rsassaPss") and the short name is the common one ("RSASSA-PSS").
fn sig_alg_name(oid: &Oid<'_>) -> Option<&'static str> {
    Some(match oid.to_id_string().as_str() {
        "1.2.840.10045.4.1" => "ecdsa-with-SHA1",
        "1.2.840.10045.4.3.1" => "ecdsa-with-SHA224",
        "1.2.840.10045.4.3.2" => "ecdsa-with-SHA256",
        "1.2.840.10045.4.3.3" => "ecdsa-with-SHA384",
        "1.2.840.10045.4.3.4" => "ecdsa-with-SHA512",
        "1.2.840.113549.1.1.5" => "sha1WithRSAEncryption",
        "1.2.840.113549.1.1.14" => "sha224WithRSAEncryption",
        "1.2.840.113549.1.1.11" => "sha256WithRSAEncryption",
        "1.2.840.113549.1.1.12" => "sha384WithRSAEncryption",
        "1.2.840.113549.1.1.13" => "sha512WithRSAEncryption",
        "1.2.840.113549.1.1.10" => "RSASSA-PSS",
        "1.3.101.112" => "ED25519",
        "1.3.101.113" => "ED448",
        "2.16.840.1.101.3.4.3.2" => "dsa_with_SHA256",
        _ => return None,
    })
}

/// HAProxy's key algorithm spelling: type + `EVP_PKEY_bits()`.
fn key_alg_name(cert: &X509Certificate<'_>) -> Option<String> {
    let spki = cert.public_key();
    match spki.algorithm.algorithm.to_id_string().as_str() {
        // rsaEncryption, and RSASSA-PSS keys (HAProxy sends nothing for those; "RSA<bits>" is
        // the closest honest answer).
        "1.2.840.113549.1.1.1" | "1.2.840.113549.1.1.10" => {
            let modulus = match spki.parsed() {
                Ok(PublicKey::RSA(rsa)) => rsa.modulus,
                // PSS keys are not parsed by x509-parser; the key is still RSAPublicKey DER.
                _ => x509_parser::public_key::RSAPublicKey::from_der(&spki.subject_public_key.data).ok()?.1.modulus,
            };
            let bits = big_endian_bits(modulus);
            (bits > 0).then(|| format!("RSA{bits}"))
        }
        "1.2.840.10045.2.1" => {
            // EVP_PKEY_bits of an EC key is the bit length of the group order, which the curve
            // OID gives directly (the point size would say 528 for P-521).
            let curve =
                spki.algorithm.parameters.as_ref().and_then(|p| Oid::try_from(p).ok()).map(|oid| oid.to_id_string());
            let bits = match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") | Some("1.3.132.0.10") => 256,
                Some("1.3.132.0.34") => 384,
                Some("1.3.132.0.35") => 521,
                Some("1.3.132.0.33") => 224,
                Some("1.2.840.10045.3.1.1") => 192,
                _ => match spki.parsed() {
                    Ok(PublicKey::EC(point)) => point.key_size(),
                    _ => 0,
                },
            };
            (bits > 0).then(|| format!("EC{bits}"))
        }
        "1.3.101.112" => Some("ED25519".to_owned()),
        "1.3.101.113" => Some("ED448".to_owned()),
        _ => None,
    }
}

/// Bit length of a big-endian unsigned integer (leading zero bytes ignored).
fn big_endian_bits(bytes: &[u8]) -> usize {
    let significant = match bytes.iter().position(|&b| b != 0) {
        Some(i) => &bytes[i..],
        None => return 0,
    };
    (significant.len() - 1) * 8 + (8 - significant[0].leading_zeros() as usize)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    use rustls::crypto::{aws_lc_rs, CryptoProvider};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::server::WebPkiClientVerifier;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
    use std::sync::Arc;

    /// A CA and certificates signed by it, for handshake tests.
    pub(crate) struct Pki {
        pub ca: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    pub(crate) struct Leaf {
        pub der: CertificateDer<'static>,
        pub key: KeyPair,
    }

    impl Pki {
        pub(crate) fn new() -> Pki {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, "test CA");
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().unwrap();
            let ca = params.self_signed(&key).unwrap().der().clone();
            Pki { ca, issuer: Issuer::new(params, key) }
        }

        pub(crate) fn leaf(
            &self,
            alg: &'static rcgen::SignatureAlgorithm,
            cn: Option<&str>,
            sans: &[&str],
            client: bool,
        ) -> Leaf {
            let key = KeyPair::generate_for(alg).unwrap();
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            let mut params = CertificateParams::new(sans).unwrap();
            // rcgen's default subject has a CN ("rcgen self signed cert").
            params.distinguished_name = rcgen::DistinguishedName::new();
            if let Some(cn) = cn {
                params.distinguished_name.push(DnType::CommonName, cn);
            }
            params.extended_key_usages =
                vec![if client { ExtendedKeyUsagePurpose::ClientAuth } else { ExtendedKeyUsagePurpose::ServerAuth }];
            let der = params.signed_by(&key, &self.issuer).unwrap().der().clone();
            Leaf { der, key }
        }
    }

    fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
    }

    fn provider(suites: Option<Vec<rustls::SupportedCipherSuite>>) -> Arc<CryptoProvider> {
        let mut p = aws_lc_rs::default_provider();
        if let Some(suites) = suites {
            p.cipher_suites = suites;
        }
        Arc::new(p)
    }

    /// Runs an in-memory handshake and returns the server side.
    fn handshake(
        pki: &Pki,
        server: &Leaf,
        client: Option<&Leaf>,
        version: &'static rustls::SupportedProtocolVersion,
        suites: Option<Vec<rustls::SupportedCipherSuite>>,
    ) -> ServerConnection {
        let provider = provider(suites);
        let mut roots = RootCertStore::empty();
        roots.add(pki.ca.clone()).unwrap();
        let roots = Arc::new(roots);

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .allow_unauthenticated()
            .build()
            .unwrap();
        let mut server_cfg = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![server.der.clone()], key_der(&server.key))
            .unwrap();
        server_cfg.alpn_protocols = vec![b"mqtt".to_vec()];

        let client_builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots);
        let mut client_cfg = match client {
            Some(leaf) => client_builder.with_client_auth_cert(vec![leaf.der.clone()], key_der(&leaf.key)).unwrap(),
            None => client_builder.with_no_client_auth(),
        };
        client_cfg.alpn_protocols = vec![b"mqtt".to_vec()];

        let mut s = ServerConnection::new(Arc::new(server_cfg)).unwrap();
        let mut c =
            ClientConnection::new(Arc::new(client_cfg), ServerName::try_from("broker.example").unwrap()).unwrap();
        for _ in 0..20 {
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                s.read_tls(&mut buf.as_slice()).unwrap();
                s.process_new_packets().unwrap();
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                c.read_tls(&mut buf.as_slice()).unwrap();
                c.process_new_packets().unwrap();
            }
        }
        assert!(!s.is_handshaking() && !c.is_handshaking(), "handshake stalled");
        s
    }

    #[test]
    fn tls13_with_client_cert() {
        let pki = Pki::new();
        let server = pki.leaf(&rcgen::PKCS_ECDSA_P256_SHA256, None, &["broker.example"], false);
        let client = pki.leaf(&rcgen::PKCS_ECDSA_P256_SHA256, Some("device-42"), &[], true);
        let conn = handshake(&pki, &server, Some(&client), &rustls::version::TLS13, None);
        let info = TlsInfo::from_connection(&conn);
        assert_eq!(info.version, "TLSv1.3");
        assert!(
            ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"].contains(&info.cipher),
            "{}",
            info.cipher
        );
        assert_eq!(info.sni.as_deref(), Some("broker.example"));
        assert_eq!(info.alpn.as_deref(), Some(&b"mqtt"[..]));
        let cert = info.client_cert.expect("client cert");
        assert_eq!(cert.cn.as_deref(), Some("device-42"));
        assert_eq!(cert.sha256, <[u8; 32]>::from(Sha256::digest(&client.der)));
        assert_eq!(cert.sig_alg.as_deref(), Some("ecdsa-with-SHA256"));
        assert_eq!(cert.key_alg.as_deref(), Some("EC256"));
    }

    #[test]
    fn tls13_without_client_cert() {
        let pki = Pki::new();
        let server = pki.leaf(&rcgen::PKCS_ECDSA_P256_SHA256, None, &["broker.example"], false);
        let conn = handshake(&pki, &server, None, &rustls::version::TLS13, None);
        let info = TlsInfo::from_connection(&conn);
        assert_eq!(info.version, "TLSv1.3");
        assert!(info.cipher.starts_with("TLS_"), "{}", info.cipher);
        assert_eq!(info.client_cert, None);
    }

    #[test]
    fn tls12_with_and_without_client_cert() {
        let pki = Pki::new();
        let server = pki.leaf(&rcgen::PKCS_ECDSA_P256_SHA256, None, &["broker.example"], false);
        let client = pki.leaf(&rcgen::PKCS_ECDSA_P384_SHA384, Some("device-7"), &[], true);

        let conn = handshake(&pki, &server, Some(&client), &rustls::version::TLS12, None);
        let info = TlsInfo::from_connection(&conn);
        assert_eq!(info.version, "TLSv1.2");
        assert!(info.cipher.starts_with("ECDHE-ECDSA-"), "{}", info.cipher);
        let cert = info.client_cert.expect("client cert");
        assert_eq!(cert.cn.as_deref(), Some("device-7"));
        // Signed by the P-256 CA, but the key is P-384.
        assert_eq!(cert.sig_alg.as_deref(), Some("ecdsa-with-SHA256"));
        assert_eq!(cert.key_alg.as_deref(), Some("EC384"));

        let conn = handshake(&pki, &server, None, &rustls::version::TLS12, None);
        let info = TlsInfo::from_connection(&conn);
        assert_eq!(info.version, "TLSv1.2");
        assert_eq!(info.client_cert, None);
        assert_eq!(info.sni.as_deref(), Some("broker.example"));
    }

    /// Every suite aws-lc-rs can negotiate, negotiated for real, reads back in OpenSSL spelling.
    #[test]
    fn every_negotiable_suite_has_its_openssl_name() {
        use aws_lc_rs::cipher_suite as cs;
        let pki = Pki::new();
        let ecdsa = pki.leaf(&rcgen::PKCS_ECDSA_P256_SHA256, None, &["broker.example"], false);
        let rsa = pki.leaf(&rcgen::PKCS_RSA_SHA256, None, &["broker.example"], false);
        let v13 = &rustls::version::TLS13;
        let v12 = &rustls::version::TLS12;
        let cases = [
            (cs::TLS13_AES_128_GCM_SHA256, v13, &ecdsa, "TLS_AES_128_GCM_SHA256"),
            (cs::TLS13_AES_256_GCM_SHA384, v13, &ecdsa, "TLS_AES_256_GCM_SHA384"),
            (cs::TLS13_CHACHA20_POLY1305_SHA256, v13, &ecdsa, "TLS_CHACHA20_POLY1305_SHA256"),
            (cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, v12, &ecdsa, "ECDHE-ECDSA-AES128-GCM-SHA256"),
            (cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, v12, &ecdsa, "ECDHE-ECDSA-AES256-GCM-SHA384"),
            (cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, v12, &ecdsa, "ECDHE-ECDSA-CHACHA20-POLY1305"),
            (cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, v12, &rsa, "ECDHE-RSA-AES128-GCM-SHA256"),
            (cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, v12, &rsa, "ECDHE-RSA-AES256-GCM-SHA384"),
            (cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256, v12, &rsa, "ECDHE-RSA-CHACHA20-POLY1305"),
        ];
        // The table covers the provider completely.
        assert_eq!(cases.len(), aws_lc_rs::ALL_CIPHER_SUITES.len());
        for (suite, version, server, want) in cases {
            let conn = handshake(&pki, server, None, version, Some(vec![suite]));
            let info = TlsInfo::from_connection(&conn);
            assert_eq!(info.cipher, want, "{:?}", suite.suite());
            assert_eq!(openssl_cipher_name(suite.suite()), want);
        }
    }

    #[test]
    fn cipher_and_version_names_never_use_rustls_debug_spelling() {
        for suite in aws_lc_rs::ALL_CIPHER_SUITES {
            let name = openssl_cipher_name(suite.suite());
            assert!(!name.is_empty());
            assert!(!name.starts_with("TLS13_"), "{name}");
            assert_ne!(name, format!("{:?}", suite.suite()));
        }
        assert_eq!(openssl_version_name(ProtocolVersion::TLSv1_3), "TLSv1.3");
        assert_eq!(openssl_version_name(ProtocolVersion::TLSv1_2), "TLSv1.2");
        assert_eq!(openssl_version_name(ProtocolVersion::Unknown(0x7f1c)), "");
        // Fallbacks: IANA name for unmapped TLS 1.2 suites, "" for unknown values.
        assert_eq!(
            openssl_cipher_name(CipherSuite::TLS_RSA_WITH_AES_128_GCM_SHA256),
            "TLS_RSA_WITH_AES_128_GCM_SHA256"
        );
        assert_eq!(openssl_cipher_name(CipherSuite::Unknown(0xfafa)), "");
        assert_eq!(openssl_cipher_name(CipherSuite::TLS13_AES_128_CCM_SHA256), "TLS_AES_128_CCM_SHA256");
    }

    #[test]
    fn from_der_ecdsa_p256_with_cn() {
        let pki = Pki::new();
        let leaf = pki.leaf(&rcgen::PKCS_ECDSA_P256_SHA256, Some("sensor-1"), &[], true);
        let cert = ClientCert::from_der(&leaf.der);
        assert_eq!(cert.cn.as_deref(), Some("sensor-1"));
        assert_eq!(cert.sig_alg.as_deref(), Some("ecdsa-with-SHA256"));
        assert_eq!(cert.key_alg.as_deref(), Some("EC256"));
        assert_eq!(cert.sha256, <[u8; 32]>::from(Sha256::digest(&leaf.der)));
    }

    #[test]
    fn from_der_rsa_2048() {
        // The CA is ECDSA; self-sign so the signature algorithm is RSA too.
        let key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "rsa-device");
        let der = params.self_signed(&key).unwrap().der().clone();
        let cert = ClientCert::from_der(&der);
        assert_eq!(cert.cn.as_deref(), Some("rsa-device"));
        assert_eq!(cert.sig_alg.as_deref(), Some("sha256WithRSAEncryption"));
        assert_eq!(cert.key_alg.as_deref(), Some("RSA2048"));
    }

    #[test]
    fn from_der_ed25519_and_no_cn() {
        let pki = Pki::new();
        let leaf = pki.leaf(&rcgen::PKCS_ED25519, None, &["a.example"], true);
        let cert = ClientCert::from_der(&leaf.der);
        assert_eq!(cert.cn, None);
        assert_eq!(cert.key_alg.as_deref(), Some("ED25519"));
        // Signed by the ECDSA P-256 CA.
        assert_eq!(cert.sig_alg.as_deref(), Some("ecdsa-with-SHA256"));

        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "ed");
        let der = params.self_signed(&key).unwrap().der().clone();
        let cert = ClientCert::from_der(&der);
        assert_eq!(cert.sig_alg.as_deref(), Some("ED25519"));
        assert_eq!(cert.cn.as_deref(), Some("ed"));
    }

    #[test]
    fn from_der_garbage_does_not_panic() {
        for der in [&b""[..], &b"\x30"[..], &b"\x30\x82\xff\xff"[..], &b"not a certificate at all"[..], &[0u8; 64][..]]
        {
            let cert = ClientCert::from_der(der);
            assert_eq!(cert.cn, None);
            assert_eq!(cert.sig_alg, None);
            assert_eq!(cert.key_alg, None);
            assert_eq!(cert.sha256, <[u8; 32]>::from(Sha256::digest(der)));
        }
        // Every truncation of a real certificate.
        let pki = Pki::new();
        let leaf = pki.leaf(&rcgen::PKCS_ECDSA_P256_SHA256, Some("x"), &[], true);
        for n in 0..leaf.der.len() {
            let cert = ClientCert::from_der(&leaf.der[..n]);
            assert_eq!(cert.cn, None, "truncated at {n}");
        }
    }

    /// Every string type a CN can have, decoded to the same UTF-8.
    #[test]
    fn cn_of_every_string_type_is_decoded_to_utf8() {
        let utf16 = |s: &str| s.encode_utf16().flat_map(u16::to_be_bytes).collect::<Vec<u8>>();
        let utf32 = |s: &str| s.chars().flat_map(|c| u32::from(c).to_be_bytes()).collect::<Vec<u8>>();
        let cases: Vec<(Tag, Vec<u8>, &str)> = vec![
            (Tag::Utf8String, "Gerät-7 ✓".as_bytes().to_vec(), "Gerät-7 ✓"),
            (Tag::PrintableString, b"device-001".to_vec(), "device-001"),
            (Tag::Ia5String, b"dev@example.com".to_vec(), "dev@example.com"),
            (Tag::VisibleString, b"visible~device".to_vec(), "visible~device"),
            (Tag::NumericString, b"0042 17".to_vec(), "0042 17"),
            // T.61 as Latin-1: 0xE4 is ä, 0xDF is ß.
            (Tag::TeletexString, b"Stra\xdfe-\xe4".to_vec(), "Straße-ä"),
            (Tag::BmpString, utf16("Gerät-Ω"), "Gerät-Ω"),
            // Outside the BMP: a surrogate pair.
            (Tag::BmpString, utf16("truck-🚚"), "truck-🚚"),
            (Tag::UniversalString, utf32("Gerät-🚚"), "Gerät-🚚"),
        ];
        for (tag, bytes, want) in cases {
            assert_eq!(decode_cn(tag, &bytes).as_deref(), Ok(want), "{tag}");
        }
    }

    #[test]
    fn cn_with_a_control_character_is_refused_in_every_string_type() {
        let utf16 = |s: &str| s.encode_utf16().flat_map(u16::to_be_bytes).collect::<Vec<u8>>();
        let utf32 = |s: &str| s.chars().flat_map(|c| u32::from(c).to_be_bytes()).collect::<Vec<u8>>();
        let evil = ["admin\0.attacker", "admin\r\nuser=root", "a\tb", "del\x7f", "c1\u{85}", "ls\u{2028}x"];
        for text in evil {
            let mut encodings = vec![
                (Tag::Utf8String, text.as_bytes().to_vec()),
                (Tag::BmpString, utf16(text)),
                (Tag::UniversalString, utf32(text)),
            ];
            if text.is_ascii() {
                for tag in [Tag::PrintableString, Tag::Ia5String, Tag::VisibleString, Tag::TeletexString] {
                    encodings.push((tag, text.as_bytes().to_vec()));
                }
            }
            for (tag, bytes) in encodings {
                let refused = decode_cn(tag, &bytes).expect_err(text);
                assert_eq!(refused.reason, CnRefusal::ControlCharacter, "{tag} {text:?}");
                assert!(!refused.shown.chars().any(char::is_control), "{:?}", refused.shown);
            }
        }
        // Latin-1 bytes 0x80..0x9F are C1 controls.
        let refused = decode_cn(Tag::TeletexString, b"a\x9bb").unwrap_err();
        assert_eq!(refused.reason, CnRefusal::ControlCharacter);
        assert_eq!(decode_cn(Tag::Utf8String, b"admin\0.attacker").unwrap_err().shown, "admin\\0.attacker");
    }

    /// Unicode non-characters (U+FDD0–U+FDEF and the last two code points of every plane) are
    /// refused as brokers refuse them in a CONNECT; their neighbours pass.
    #[test]
    fn cn_with_a_noncharacter_is_refused_in_every_unicode_string_type() {
        let utf16 = |s: &str| s.encode_utf16().flat_map(u16::to_be_bytes).collect::<Vec<u8>>();
        let utf32 = |s: &str| s.chars().flat_map(|c| u32::from(c).to_be_bytes()).collect::<Vec<u8>>();
        let cases = [
            ("a\u{fdd0}", Some(CnRefusal::NonCharacter)),
            ("a\u{fdef}", Some(CnRefusal::NonCharacter)),
            ("a\u{fffe}", Some(CnRefusal::NonCharacter)),
            ("a\u{ffff}", Some(CnRefusal::NonCharacter)),
            ("a\u{1fffe}", Some(CnRefusal::NonCharacter)),
            ("a\u{10ffff}", Some(CnRefusal::NonCharacter)),
            ("a\u{7}", Some(CnRefusal::ControlCharacter)),
            ("a\u{fdcf}", None),
            ("a\u{fdf0}", None),
            ("a\u{fffd}", None),
            ("a\u{1fffd}", None),
            ("device-42", None),
        ];
        for (text, want) in cases {
            for (tag, bytes) in [
                (Tag::Utf8String, text.as_bytes().to_vec()),
                (Tag::BmpString, utf16(text)),
                (Tag::UniversalString, utf32(text)),
            ] {
                let got = decode_cn(tag, &bytes);
                assert_eq!(got.as_ref().err().map(|r| r.reason), want, "{tag} {text:?}");
                if let Ok(cn) = got {
                    assert_eq!(cn, text);
                }
            }
        }
        let refused = decode_cn(Tag::Utf8String, "dev-\u{fdd0}".as_bytes()).unwrap_err();
        assert_eq!(refused.shown, "dev-\\u{fdd0}", "escaped for the log line");
        assert_eq!(CnRefusal::NonCharacter.as_str(), "noncharacter");
    }

    #[test]
    fn undecodable_cn_is_refused() {
        let cases: [(Tag, &[u8]); 8] = [
            (Tag::Utf8String, b"\xff\xfe"),
            (Tag::PrintableString, b"caf\xc3\xa9"),
            (Tag::Ia5String, b"\x80"),
            (Tag::BmpString, b"\x00a\x00"),
            // A lone high surrogate.
            (Tag::BmpString, b"\xd8\x00\x00a"),
            (Tag::UniversalString, b"\x00\x00\x00a\x00"),
            (Tag::UniversalString, b"\x00\x11\x00\x00"),
            (Tag::OctetString, b"device"),
        ];
        for (tag, bytes) in cases {
            let refused = decode_cn(tag, bytes).expect_err("undecodable");
            assert_eq!(refused.reason, CnRefusal::Undecodable, "{tag}");
            assert!(refused.shown.len() <= SHOWN_CN_MAX);
        }
        // Long garbage is shown bounded.
        let long = vec![0xffu8; 10_000];
        assert!(decode_cn(Tag::Utf8String, &long).unwrap_err().shown.len() <= SHOWN_CN_MAX);
        let long = "\0".repeat(10_000);
        assert!(decode_cn(Tag::Utf8String, long.as_bytes()).unwrap_err().shown.chars().count() <= SHOWN_CN_MAX);
    }

    /// Through a whole certificate: the string types rcgen can write, and a NUL.
    #[test]
    fn from_der_decodes_cn_string_types_and_refuses_controls() {
        use rcgen::string::{BmpString, TeletexString, UniversalString};
        use rcgen::DnValue;
        let pki = Pki::new();
        let with_cn = |value: DnValue| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, value);
            ClientCert::from_der(params.signed_by(&key, &pki.issuer).unwrap().der())
        };
        let cert = with_cn(DnValue::BmpString(BmpString::try_from("Gerät-Ω").unwrap()));
        assert_eq!((cert.cn.as_deref(), cert.cn_refused), (Some("Gerät-Ω"), None));
        let cert = with_cn(DnValue::UniversalString(UniversalString::try_from("truck-🚚").unwrap()));
        assert_eq!(cert.cn.as_deref(), Some("truck-🚚"));
        let cert = with_cn(DnValue::TeletexString(TeletexString::try_from("teletex-1").unwrap()));
        assert_eq!(cert.cn.as_deref(), Some("teletex-1"));
        let cert = with_cn(DnValue::Utf8String("admin\0.attacker".into()));
        assert_eq!(cert.cn, None);
        let refused = cert.cn_refused.expect("refused");
        assert_eq!(refused.reason, CnRefusal::ControlCharacter);
        assert_eq!(refused.shown, "admin\\0.attacker");
    }

    #[test]
    fn bit_length() {
        assert_eq!(big_endian_bits(&[]), 0);
        assert_eq!(big_endian_bits(&[0, 0]), 0);
        assert_eq!(big_endian_bits(&[1]), 1);
        assert_eq!(big_endian_bits(&[0, 0x80, 0]), 16);
        assert_eq!(big_endian_bits(&[0x7f, 0xff]), 15);
    }

    proptest::proptest! {
        #[test]
        fn from_der_never_panics(der in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..512)) {
            let cert = ClientCert::from_der(&der);
            proptest::prop_assert_eq!(cert.sha256, <[u8; 32]>::from(Sha256::digest(&der)));
        }
    }
}
