//! The server side of TLS (`src/proxy/tls_stream.rs`) on arbitrary client bytes: never panics,
//! and a refused handshake is an error, never a connection.
//!
//! The first input byte chooses how the rest arrives: bit 0 — from the first byte of the
//! connection, or after a real handshake with a rustls client (then the bytes stand for the
//! client's next records); bits 1–3 — how many bytes each socket read returns (1 up to all at
//! once), so records are cut at every place. The server is set up like a listener: a
//! certificate resolver that notes the SNI, ALPN, session tickets and optional client
//! certificates (a TLS 1.2 client's Certificate message is plaintext, so the fuzzer reaches
//! certificate parsing too).

// The stream and the modules it uses, not the crate: they need only tokio, rustls, socket2 and
// prometheus (the setup budget's gauge), which keeps the instrumented build small.
#[allow(dead_code)]
#[path = "../../src/proxy/boundary.rs"]
mod boundary;
#[allow(dead_code)]
#[path = "../../src/proxy/budget.rs"]
mod budget;
#[allow(dead_code)]
#[path = "../../src/proxy/relay.rs"]
mod relay;
#[allow(dead_code)]
#[path = "../../src/proxy/tls_stream.rs"]
mod tls_stream;

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use tls_stream::TlsServerStream;

/// Bytes per socket read, chosen by bits 1–3 of the first input byte.
const CHUNKS: [usize; 8] = [1, 2, 5, 16, 100, 512, 4096, usize::MAX];

#[derive(Debug)]
struct Resolver(Arc<CertifiedKey>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        tls_stream::note_server_name(&hello);
        Some(self.0.clone())
    }
}

struct Setup {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    rt: tokio::runtime::Runtime,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = provider.key_provider.load_private_key(der).unwrap();
        let certified = CertifiedKey::new(vec![cert.der().clone()], signing);
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .allow_unauthenticated()
            .build()
            .unwrap();
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(Arc::new(certified))));
        server.alpn_protocols = vec![b"mqtt".to_vec()];
        server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().unwrap();
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"mqtt".to_vec()];
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Setup { server: Arc::new(server), client: Arc::new(client), rt }
    })
}

/// A client that sends `input` in reads of at most `chunk` bytes, then EOF, and takes
/// whatever the server writes.
struct Client<'a> {
    input: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Client<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let n = self.input.len().min(self.chunk).min(buf.remaining());
        buf.put_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Client<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl relay::WriteLast for Client<'_> {}

/// Reads until the end or an error, then answers and closes, as the relay would.
async fn serve<IO: AsyncRead + relay::WriteLast + Unpin>(mut s: TlsServerStream<IO>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
    let _ = s.write_all(b"answer").await;
    let _ = s.shutdown().await;
}

fn raw(setup: &Setup, input: &[u8], chunk: usize) {
    setup.rt.block_on(async {
        let io = Client { input, chunk };
        // With input this short (no Finished can be forged) a handshake never completes.
        if let Ok(s) = TlsServerStream::accept(setup.server.clone(), io, None).await {
            assert!(s.common().protocol_version().is_some());
            serve(s).await;
        }
    });
}

/// A real handshake over a pipe, then `input` as the client's next bytes on the wire.
fn after_handshake(setup: &Setup, input: &[u8], chunk: usize) {
    setup.rt.block_on(async {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(setup.client.clone());
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let (s, c) = tokio::join!(TlsServerStream::accept(setup.server.clone(), a, None), connector.connect(name, b));
        let (s, mut c) = (s.expect("handshake"), c.expect("client handshake"));
        assert_eq!(s.server_name(), Some("localhost"));
        let io = c.get_mut().0;
        let feed = async {
            for part in input.chunks(chunk.min(input.len().max(1))) {
                if io.write_all(part).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let _ = io.shutdown().await;
            // Drain what the server sends so its writes never wait.
            let mut sink = [0u8; 4096];
            while let Ok(n) = io.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        tokio::join!(serve(s), feed);
    });
}

fn main() {
    setup();
    afl::fuzz!(|data: &[u8]| {
        let setup = setup();
        let Some((&mode, input)) = data.split_first() else { return };
        let chunk = CHUNKS[usize::from(mode >> 1) & 7];
        if mode & 1 == 0 {
            raw(setup, input, chunk);
        } else {
            after_handshake(setup, input, chunk);
        }
    });
}
