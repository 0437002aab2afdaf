//! The client side of a session: TCP (optionally from one of several local source addresses),
//! TLS with rustls (CA, client certificate, SNI, cipher choice, no resumption unless asked),
//! the WebSocket upgrade when asked (`--websocket`, then MQTT in frames: ws.rs),
//! CONNECT → CONNACK, and the small reads and writes of a held session. Every step runs under
//! the session's deadline and a failure is reported by kind.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{bail, Context as _};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::TlsConnector;

use crate::mqtt::{self, Version};
use crate::ws::{self, WsClient};

/// The options every client mode shares.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientOpts {
    /// Address of the proxy (or broker) to load: IP:port on loopback for our benchmarks.
    #[arg(long, default_value = "127.0.0.1:8883")]
    pub target: SocketAddr,
    /// Speak TLS (otherwise plain MQTT over TCP).
    #[arg(long)]
    pub tls: bool,
    /// PEM bundle of CAs that sign the server certificate.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM) to present.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Server name sent as SNI and verified against the certificate.
    #[arg(long, default_value = "localhost")]
    pub sni: String,
    /// Do not verify the server certificate at all (saves the generator two signature checks
    /// per handshake; the server does the same work either way).
    #[arg(long)]
    pub insecure: bool,
    /// Offer only these cipher suites (rustls names, e.g. TLS13_AES_128_GCM_SHA256).
    #[arg(long, value_delimiter = ',')]
    pub cipher: Vec<String>,
    /// Offer only these key exchange groups (e.g. X25519, secp256r1, X25519MLKEM768).
    #[arg(long, value_delimiter = ',')]
    pub kx: Vec<String>,
    /// ALPN protocols to offer.
    #[arg(long, value_delimiter = ',')]
    pub alpn: Vec<String>,
    /// Allow TLS session resumption (off: every handshake is a full one).
    #[arg(long)]
    pub resume: bool,
    /// MQTT version of the CONNECT: 3.1, 3.1.1 or 5.
    #[arg(long = "mqtt", default_value = "3.1.1", value_parser = Version::parse)]
    pub version: Version,
    /// Client-id pattern; {n} is the session number.
    #[arg(long, default_value = "dev-{n}")]
    pub client_id: String,
    /// First session number.
    #[arg(long, default_value_t = 0)]
    pub first_id: u64,
    /// Keep-alive in seconds, sent in CONNECT and used as the PINGREQ interval of held sessions.
    #[arg(long, default_value_t = 60)]
    pub keep_alive: u16,
    /// Local source addresses (comma-separated, e.g. 127.0.0.1,127.0.0.2) used in turn, to go
    /// past one address's ephemeral ports.
    #[arg(long, value_delimiter = ',')]
    pub source: Vec<IpAddr>,
    /// MQTT over WebSocket: after TCP (+ TLS) an HTTP/1.1 upgrade to PATH (default /mqtt,
    /// subprotocol `mqtt`, `Host` the --sni name), the 101 and its Sec-WebSocket-Accept
    /// checked, then MQTT in masked binary frames.
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "/mqtt")]
    pub websocket: Option<String>,
    /// Deadline for TCP connect + TLS (+ WebSocket upgrade) + CONNECT → CONNACK.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Why a session could not be opened (or ended early).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fail {
    ConnectRefused,
    ConnectTimeout,
    Connect,
    TlsTimeout,
    Tls,
    UpgradeTimeout,
    Upgrade,
    UpgradeRefused,
    ConnackTimeout,
    Closed,
    Refused,
    Io,
}

impl Fail {
    pub fn as_str(self) -> &'static str {
        match self {
            Fail::ConnectRefused => "tcp_refused",
            Fail::ConnectTimeout => "tcp_timeout",
            Fail::Connect => "tcp_error",
            Fail::TlsTimeout => "tls_timeout",
            Fail::Tls => "tls_error",
            Fail::UpgradeTimeout => "ws_upgrade_timeout",
            Fail::Upgrade => "ws_upgrade_error",
            Fail::UpgradeRefused => "ws_upgrade_refused",
            Fail::ConnackTimeout => "connack_timeout",
            Fail::Closed => "closed_before_connack",
            Fail::Refused => "connack_refused",
            Fail::Io => "io_error",
        }
    }
}

/// A connection to the target, plain or TLS, and either carrying WebSocket frames.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Ws(Box<WsClient<Stream>>),
}

impl Stream {
    /// The TLS handshake resumed a session from a ticket (`--resume`).
    pub fn resumed(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(s) => s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            Stream::Ws(s) => s.get_ref().resumed(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Ws(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Ws(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Ws(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Ws(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts any server certificate (`--insecure`).
#[derive(Debug)]
struct NoVerify(Vec<SignatureScheme>);

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
        self.0.clone()
    }
}

fn tls_config(o: &ClientOpts) -> anyhow::Result<rustls::ClientConfig> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if !o.cipher.is_empty() {
        provider.cipher_suites.retain(|s| o.cipher.iter().any(|c| format!("{:?}", s.suite()) == *c));
        if provider.cipher_suites.is_empty() {
            bail!("none of the cipher suites {:?} is known to rustls", o.cipher);
        }
    }
    if !o.kx.is_empty() {
        provider.kx_groups.retain(|g| o.kx.iter().any(|k| format!("{:?}", g.name()) == *k));
        if provider.kx_groups.is_empty() {
            bail!("none of the key exchange groups {:?} is known to rustls", o.kx);
        }
    }
    let schemes = provider.signature_verification_algorithms.supported_schemes();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?;
    let builder = if o.insecure {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(schemes)))
    } else {
        let Some(ca) = &o.ca else { bail!("--tls needs --ca (or --insecure)") };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("{}", ca.display()))? {
            roots.add(c.with_context(|| format!("{}", ca.display()))?)?;
        }
        builder.with_root_certificates(roots)
    };
    let mut cfg = match (&o.cert, &o.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("{}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("{}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = o.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    if !o.resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Ok(cfg)
}

/// Everything needed to open sessions against one target.
pub struct Client {
    pub o: ClientOpts,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    id_parts: (String, String),
    next_source: AtomicUsize,
}

impl Client {
    pub fn new(o: ClientOpts) -> anyhow::Result<Client> {
        let tls = if o.tls {
            let name = ServerName::try_from(o.sni.clone()).context("--sni")?;
            Some((TlsConnector::from(Arc::new(tls_config(&o)?)), name))
        } else {
            None
        };
        let id_parts = match o.client_id.split_once("{n}") {
            Some((a, b)) => (a.to_string(), b.to_string()),
            None => (o.client_id.clone(), String::new()),
        };
        Ok(Client { o, tls, id_parts, next_source: AtomicUsize::new(0) })
    }

    /// The client-id of session `n`.
    pub fn client_id(&self, n: u64) -> String {
        if self.o.client_id.contains("{n}") {
            format!("{}{}{}", self.id_parts.0, n, self.id_parts.1)
        } else {
            self.o.client_id.clone()
        }
    }

    async fn tcp(&self) -> io::Result<TcpStream> {
        if self.o.source.is_empty() {
            return TcpStream::connect(self.o.target).await;
        }
        let i = self.next_source.fetch_add(1, Ordering::Relaxed) % self.o.source.len();
        let ip = self.o.source[i];
        let sock = if ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        sock.set_reuseaddr(true)?;
        sock.bind(SocketAddr::new(ip, 0))?;
        sock.connect(self.o.target).await
    }

    /// TCP, then TLS if configured, then the WebSocket upgrade if configured, before
    /// `deadline`.
    pub async fn connect(&self, deadline: Instant) -> Result<Stream, Fail> {
        let s = self.connect_tls(deadline).await?;
        let Some(path) = &self.o.websocket else { return Ok(s) };
        match timeout_at(deadline, ws::upgrade(s, path, &self.o.sni)).await {
            Err(_) => Err(Fail::UpgradeTimeout),
            Ok(Err(e)) if e.get_ref().is_some_and(|i| i.is::<ws::UpgradeRefused>()) => Err(Fail::UpgradeRefused),
            Ok(Err(_)) => Err(Fail::Upgrade),
            Ok(Ok(w)) => Ok(Stream::Ws(Box::new(w))),
        }
    }

    async fn connect_tls(&self, deadline: Instant) -> Result<Stream, Fail> {
        let tcp = match timeout_at(deadline, self.tcp()).await {
            Err(_) => return Err(Fail::ConnectTimeout),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => return Err(Fail::ConnectRefused),
            Ok(Err(_)) => return Err(Fail::Connect),
            Ok(Ok(t)) => t,
        };
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Stream::Plain(tcp)),
            Some((connector, name)) => match timeout_at(deadline, connector.connect(name.clone(), tcp)).await {
                Err(_) => Err(Fail::TlsTimeout),
                Ok(Err(_)) => Err(Fail::Tls),
                Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s))),
            },
        }
    }

    /// Connect and complete CONNECT → CONNACK for session `n`.
    pub async fn open(&self, n: u64) -> Result<Stream, Fail> {
        let deadline = Instant::now() + self.o.timeout;
        let mut s = self.connect(deadline).await?;
        let packet = mqtt::connect(self.o.version, self.client_id(n).as_bytes(), self.o.keep_alive);
        match timeout_at(deadline, async {
            s.write_all(&packet).await?;
            s.flush().await?;
            read_connack(&mut s).await
        })
        .await
        {
            Err(_) => Err(Fail::ConnackTimeout),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Fail::Closed),
            Ok(Err(_)) => Err(Fail::Io),
            Ok(Ok(0)) => Ok(s),
            Ok(Ok(_)) => Err(Fail::Refused),
        }
    }
}

/// Read one packet's fixed header; returns (first byte, remaining length).
pub async fn read_header<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<(u8, usize)> {
    let mut h = [0u8; 5];
    s.read_exact(&mut h[..2]).await?;
    let mut n = 2;
    loop {
        match mqtt::varint(&h[1..n]) {
            Ok(Some((rem, _))) => return Ok((h[0], rem)),
            Ok(None) => {
                s.read_exact(&mut h[n..n + 1]).await?;
                n += 1;
            }
            Err(()) => return Err(io::Error::new(io::ErrorKind::InvalidData, "bad remaining length")),
        }
    }
}

/// Read a CONNACK; returns its return code (3.x) or reason code (5.0).
async fn read_connack<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<u8> {
    let (first, rem) = read_header(s).await?;
    if first != 0x20 || !(2..=256).contains(&rem) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a CONNACK"));
    }
    let mut body = [0u8; 256];
    s.read_exact(&mut body[..rem]).await?;
    Ok(body[1])
}

/// Skip `n` bytes of the stream.
pub async fn skip<S: AsyncRead + Unpin>(s: &mut S, mut n: usize) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    while n > 0 {
        let k = n.min(buf.len());
        s.read_exact(&mut buf[..k]).await?;
        n -= k;
    }
    Ok(())
}

/// One PINGREQ → PINGRESP round trip, skipping anything else the server sends.
pub async fn ping<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<()> {
    s.write_all(&mqtt::PINGREQ).await?;
    s.flush().await?;
    loop {
        let (first, rem) = read_header(s).await?;
        if first == 0xD0 {
            return Ok(());
        }
        skip(s, rem).await?;
    }
}
