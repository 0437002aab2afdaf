//! rustls clients for tests that need control over TLS (cipher suite, version, a PROXY header
//! before the handshake) or async I/O (tokio-rustls).

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::aws_lc_rs as provider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned, SupportedCipherSuite};

use super::Certs;

/// Which TLS the client offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientTlsChoice {
    /// rustls defaults (TLS 1.3 and 1.2, all suites)
    Default,
    /// TLS 1.3 with TLS_AES_128_GCM_SHA256 only
    Tls13Aes128,
    /// TLS 1.2 with ECDHE-ECDSA-AES128-GCM-SHA256 only
    Tls12EcdsaAes128,
}

/// A rustls client config trusting the test CA; with the test client certificate when
/// `with_cert`.
pub fn client_config(certs: &Certs, with_cert: bool, choice: ClientTlsChoice) -> Arc<ClientConfig> {
    let mut p = provider::default_provider();
    let (suites, versions): (Vec<SupportedCipherSuite>, Vec<&'static rustls::SupportedProtocolVersion>) = match choice {
        ClientTlsChoice::Default => (p.cipher_suites.clone(), vec![&rustls::version::TLS13, &rustls::version::TLS12]),
        ClientTlsChoice::Tls13Aes128 => {
            (vec![provider::cipher_suite::TLS13_AES_128_GCM_SHA256], vec![&rustls::version::TLS13])
        }
        ClientTlsChoice::Tls12EcdsaAes128 => {
            (vec![provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256], vec![&rustls::version::TLS12])
        }
    };
    p.cipher_suites = suites;
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(certs.ca_der.clone())).expect("add CA");
    let builder = ClientConfig::builder_with_provider(Arc::new(p))
        .with_protocol_versions(&versions)
        .expect("protocol versions")
        .with_root_certificates(roots);
    let cfg = if with_cert {
        builder
            .with_client_auth_cert(
                vec![CertificateDer::from(certs.client_cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certs.client_key_der.clone())),
            )
            .expect("client cert")
    } else {
        builder.with_no_client_auth()
    };
    Arc::new(cfg)
}

pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// Connects to 127.0.0.1:port, optionally writes `preamble` (a PROXY header) in clear, then
/// does a TLS handshake with SNI `sni`. The handshake is completed before returning.
pub fn connect_tls(
    port: u16,
    sni: &str,
    config: Arc<ClientConfig>,
    preamble: Option<&[u8]>,
) -> std::io::Result<TlsStream> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(super::WAIT))?;
    tcp.set_write_timeout(Some(super::WAIT))?;
    if let Some(pre) = preamble {
        tcp.write_all(pre)?;
    }
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    let conn = ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// Sets the read timeout of the TCP socket under a TLS stream.
pub fn set_read_timeout(s: &TlsStream, t: Duration) {
    s.sock.set_read_timeout(Some(t)).unwrap();
}

/// The IANA name of the negotiated cipher suite, as OpenSSL spells TLS 1.3 suites
/// (`TLS_AES_128_GCM_SHA256`).
pub fn negotiated_suite(s: &TlsStream) -> String {
    let suite = s.conn.negotiated_cipher_suite().expect("handshake done");
    format!("{:?}", suite.suite())
}

/// tokio-rustls connector for the same config.
pub fn tokio_connector(config: Arc<ClientConfig>) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(config)
}

pub fn server_name(sni: &str) -> ServerName<'static> {
    ServerName::try_from(sni.to_string()).expect("server name")
}
