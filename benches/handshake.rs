//! A full TLS 1.3 server handshake in memory (no sockets), with harbormaster's own rustls
//! server config (`control::tls::server_config`: SNI resolver, optional client certificates,
//! session tickets) and an ECDSA P-256 certificate: the floor under M2's CPU per new session.
//! Only the server's calls are timed (the client runs in the same loop, untimed). The client
//! offers TLS13_AES_128_GCM_SHA256 and X25519, like the load generator in benches/compare.
//!
//! `cargo bench --bench handshake`

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use harbormaster::control::config::{ClientAuth, RawCert, RawTls};
use harbormaster::control::tls::server_config;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::aws_lc_rs as provider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, ServerConfig, ServerConnection, SignatureScheme};

/// The client does not verify: its cost is not measured, and it keeps the loop short.
#[derive(Debug)]
struct NoVerify;

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

/// harbormaster's server config for a fresh CA and a `localhost` certificate made with `alg`.
fn server(alg: &'static rcgen::SignatureAlgorithm) -> Arc<ServerConfig> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.distinguished_name.push(DnType::CommonName, "bench CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, &ca_key);
    let key = KeyPair::generate_for(alg).unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
    fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
    fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
    let raw = RawTls {
        certs: vec![RawCert { cert: "server.pem".into(), key: "server.key".into(), ocsp: None }],
        client_ca: Some("ca.pem".into()),
        client_crl: Default::default(),
        client_auth: ClientAuth::Optional,
        alpn: vec![],
        ticket_keys: None,
    };
    Arc::new(server_config(&raw, "mqtts", dir.path()).expect("server config").config)
}

fn client() -> Arc<ClientConfig> {
    let mut p = provider::default_provider();
    p.cipher_suites = vec![provider::cipher_suite::TLS13_AES_128_GCM_SHA256];
    p.kx_groups = vec![provider::kx_group::X25519];
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(p))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify))
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// One full handshake; returns the time spent in the server's calls.
fn handshake(server_cfg: &Arc<ServerConfig>, client_cfg: &Arc<ClientConfig>) -> Duration {
    let mut c = ClientConnection::new(client_cfg.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
    let t = Instant::now();
    let mut s = ServerConnection::new(server_cfg.clone()).unwrap();
    let mut spent = t.elapsed();
    let (mut to_server, mut to_client) = (Vec::with_capacity(4096), Vec::with_capacity(4096));
    for _ in 0..16 {
        to_server.clear();
        while c.wants_write() {
            c.write_tls(&mut to_server).unwrap();
        }
        let t = Instant::now();
        let mut rd = &to_server[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().unwrap();
        }
        to_client.clear();
        while s.wants_write() {
            s.write_tls(&mut to_client).unwrap();
        }
        spent += t.elapsed();
        let mut rd = &to_client[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
        }
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            break;
        }
    }
    assert!(!s.is_handshaking(), "handshake did not finish");
    let t = Instant::now();
    drop(s);
    spent + t.elapsed()
}

fn bench(c: &mut Criterion) {
    let client_cfg = client();
    let mut g = c.benchmark_group("handshake");
    for (name, alg) in [("ecdsa_p256", &rcgen::PKCS_ECDSA_P256_SHA256), ("rsa_2048", &rcgen::PKCS_RSA_SHA256)] {
        let server_cfg = server(alg);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| (0..iters).map(|_| handshake(&server_cfg, &client_cfg)).sum());
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
