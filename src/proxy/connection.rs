//! The life of one client connection, top to bottom:
//! PROXY header from an outer load balancer (optional) → admission (per-source rate, a
//! handshake token) → TLS handshake (optional) → CONNECT peek → flapping check → broker choice → dial with failover → PROXY header to the broker → CONNECT and
//! pipelined bytes → relay → one log line. Refusals answer with an MQTT-correct CONNACK where
//! the protocol allows and never write anything to a broker.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::admission::{self, Admission};
use super::balance::{Backend, EmptyKey, HashKey, Pool, ProxyProtocol};
use super::broker::{self, Transition};
use super::budget::{OverBudget, SetupBudget, SetupCharge};
use super::identity::TlsInfo;
use super::inbound;
use super::mqtt::{self, ConnectError, MqttVersion, Peek, Refusal, StringField};
use super::proxy_header::{self, HeaderInput};
use super::registry::{CloseCause, Registration, Registry};
use super::relay::{self, Ended, WriteLast};
use super::snapshot::{ListenerSpec, Snapshot};
use super::tls_stream::TlsServerStream;
use super::turns::Turns;
use crate::admin::metrics::{connack_label, dial_error_outcome, CountReads, Metrics, DIAL_CLOSED};

/// State shared by every connection of the process.
pub struct Shared {
    pub metrics: Arc<Metrics>,
    /// Cancelled when the drain period is over: live connections are closed.
    pub hard_stop: CancellationToken,
    /// Every live connection, for the control plane to close one at a time (children of
    /// `hard_stop`).
    pub conns: Arc<Registry>,
    /// Handshake token bucket, per-source buckets, flapping client-ids.
    pub admission: Admission,
    /// Turns for TLS handshake steps while established connections have traffic.
    pub turns: Turns,
    /// Bytes held for TLS handshakes and CONNECTs by connections in setup
    /// (`limits.max_setup_bytes`).
    pub setup_bytes: SetupBudget,
    prefix: u64,
    next_id: AtomicU64,
}

impl Shared {
    pub fn new(metrics: Arc<Metrics>, hard_stop: CancellationToken) -> Shared {
        // A per-process prefix keeps connection ids unique across replicas and restarts, so
        // the UNIQUE_ID a broker logs identifies one connection fleet-wide.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let prefix =
            xxhash_rust::xxh3::xxh3_64(&[nanos.to_le_bytes(), u64::from(std::process::id()).to_le_bytes()].concat());
        let conns = Arc::new(Registry::new(hard_stop.clone()));
        let admission = Admission::new(metrics.handshake_queue.clone());
        let workers = tokio::runtime::Handle::try_current().map(|h| h.metrics().num_workers()).unwrap_or(1);
        let turns = Turns::new(workers);
        let setup_bytes = SetupBudget::new(metrics.setup_bytes.clone());
        Shared { metrics, hard_stop, conns, admission, turns, setup_bytes, prefix, next_id: AtomicU64::new(1) }
    }

    fn conn_id(&self) -> String {
        format!("{:016x}-{:x}", self.prefix, self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

/// Why a connection ended; the `close_reason` of the log line and the `reason` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    UntrustedProxy,
    BadProxyHeader,
    TlsHandshake,
    Timeout,
    ClientClosed,
    NotConnect,
    Malformed,
    TooLarge,
    UnsupportedProtocol,
    EmptyClientId,
    NoBroker,
    NoPool,
    Drained,
    BrokerRemoved,
    /// `limits.max_connections` reached: closed at accept.
    MaxConnections,
    /// The listener's `max_connections` reached: closed at accept.
    ListenerMaxConnections,
    HandshakeQueueFull,
    HandshakeQueueTimeout,
    /// `per_source_rate` exceeded by the client's address: closed before TLS.
    SourceRate,
    /// Connections in setup hold `limits.max_setup_bytes`: no room for this one's CONNECT.
    SetupBytes,
    /// The client-id reconnects too often: CONNACK "connection rate exceeded".
    Flapping,
    /// The connection's task ended without an outcome: it panicked (a bug). Counted and
    /// logged like every other end, and other connections are unaffected.
    Internal,
    Relayed(Ended),
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UntrustedProxy => "untrusted_proxy",
            Reason::BadProxyHeader => "bad_proxy_header",
            Reason::TlsHandshake => "tls_handshake",
            Reason::Timeout => "connect_timeout",
            Reason::ClientClosed => "client_closed_early",
            Reason::NotConnect => "not_connect",
            Reason::Malformed => "malformed_connect",
            Reason::TooLarge => "connect_too_large",
            Reason::UnsupportedProtocol => "unsupported_protocol",
            Reason::EmptyClientId => "empty_client_id_rejected",
            Reason::NoBroker => "no_broker_available",
            Reason::NoPool => "no_pool",
            Reason::Drained => "drained",
            Reason::BrokerRemoved => "broker_removed",
            Reason::MaxConnections => "max_connections",
            Reason::ListenerMaxConnections => "listener_max_connections",
            Reason::HandshakeQueueFull => "handshake_queue_full",
            Reason::HandshakeQueueTimeout => "handshake_queue_timeout",
            Reason::SourceRate => "per_source_rate",
            Reason::SetupBytes => "max_setup_bytes",
            Reason::Flapping => "flapping",
            Reason::Internal => "internal_error",
            Reason::Relayed(Ended::Clean) => "closed",
            Reason::Relayed(Ended::ClientError) => "client_error",
            Reason::Relayed(Ended::BrokerError) => "broker_error",
            Reason::Relayed(Ended::HalfCloseTimeout) => "half_close_timeout",
        }
    }

    fn refused(self) -> bool {
        !matches!(self, Reason::Relayed(_) | Reason::Drained | Reason::BrokerRemoved)
    }
}

/// What the end-of-connection log line says.
#[derive(Default)]
struct Facts {
    client_addr: Option<SocketAddr>,
    sni: Option<String>,
    tls_version: Option<&'static str>,
    tls_resumed: bool,
    client_id: Option<String>,
    mqtt_version: Option<MqttVersion>,
    /// The CONNECT came from a broker's bridge (protocol level with the bridge bit).
    bridge: bool,
    broker: Option<String>,
    up: u64,
    down: u64,
    detail: Option<String>,
    /// The CONNACK code a refusal sent, for the `connack` metric label.
    connack: Option<u8>,
}

/// A connection's place in `connections_active` and its end — the close counters and its one
/// log line — kept in a guard, so that a connection whose task panics is still counted and
/// logged (as `internal_error`) and leaves the gauge exact.
struct Accounting<'a> {
    metrics: &'a Metrics,
    /// The listener's name (a `&String`: half the size of a `&str` in every connection's task).
    listener: &'a String,
    conn_id: String,
    started: Instant,
    facts: Facts,
    /// Set when the connection ends normally.
    reason: Option<Reason>,
}

impl<'a> Accounting<'a> {
    #[allow(clippy::ptr_arg)] // kept as a thin `&String`, see `listener`
    fn open(shared: &'a Shared, listener: &'a String, peer: SocketAddr) -> Accounting<'a> {
        let started = Instant::now();
        shared.metrics.active.with_label_values(&[listener]).inc();
        Accounting {
            metrics: &shared.metrics,
            listener,
            conn_id: shared.conn_id(),
            started,
            facts: Facts { client_addr: Some(peer), ..Facts::default() },
            reason: None,
        }
    }
}

impl Drop for Accounting<'_> {
    fn drop(&mut self) {
        self.metrics.active.with_label_values(&[self.listener]).dec();
        let reason = self.reason.take().unwrap_or_else(|| {
            let what = if std::thread::panicking() { "panicked" } else { "was dropped" };
            self.facts.detail = Some(format!("the connection's task {what}"));
            Reason::Internal
        });
        ended(self.metrics, self.listener, &self.conn_id, &self.facts, reason, self.started.elapsed());
    }
}

/// Keeps a broker's active-connection count right however the connection ends.
struct ActiveGuard(Arc<Backend>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream that first yields bytes already read (what followed an inbound PROXY header).
pub struct Prefixed<S> {
    pre: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(pre: Vec<u8>, inner: S) -> Self {
        Prefixed { pre, pos: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.pre.len() {
            let n = buf.remaining().min(self.pre.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.pre[start..start + n]);
            self.pos += n;
            if self.pos == self.pre.len() {
                // Free it: an idle connection should hold nothing it no longer needs.
                self.pre = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: WriteLast + Unpin> WriteLast for Prefixed<S> {
    fn poll_write_last(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_last(cx, buf)
    }
}

/// The client side of a connection once set up: plain, or TLS (boxed: rustls' state is large,
/// and plain connections should not carry room for it).
pub enum Client {
    Plain(Prefixed<TcpStream>),
    Tls(Box<TlsServerStream<Prefixed<TcpStream>>>),
}

impl AsyncRead for Client {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Client {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_flush(cx),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl WriteLast for Client {
    fn poll_write_last(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_write_last(cx, buf),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_write_last(cx, buf),
        }
    }
}

/// A connection ready to relay: the client, the broker it was routed to, and the guard that
/// counts it on that broker.
struct Established {
    client: Client,
    upstream: TcpStream,
    _active: ActiveGuard,
}

impl Established {
    fn backend(&self) -> &Arc<Backend> {
        &self._active.0
    }
}

/// Handle one accepted connection to its end, then log it. `conn` is its entry in
/// `shared.conns`, through which the control plane may close it; `held` (its place under the
/// connection limits) is dropped at the end.
pub async fn handle<H: Send>(
    shared: Arc<Shared>,
    snapshot: Arc<Snapshot>,
    spec: Arc<ListenerSpec>,
    tcp: TcpStream,
    peer: SocketAddr,
    conn: Registration,
    held: H,
) {
    let mut acct = Accounting::open(&shared, &spec.name, peer);
    let m = &shared.metrics;
    let closed = |cause| match cause {
        CloseCause::Drain => Reason::Drained,
        CloseCause::BrokerRemoved => Reason::BrokerRemoved,
    };
    // Setting up (PROXY header, TLS handshake, CONNECT, dialing) needs several times the state
    // relaying does; boxed, that state is freed before the connection idles instead of staying
    // part of this task for its whole life. Two selects rather than one around both phases, and
    // the relay awaited here rather than in a function of its own, keep copies of arguments and
    // captures out of the relaying task: an idle connection's task is ~1 KB (the size test in
    // harbormaster-bench says why every 128 B counts).
    let setup = tokio::select! {
        r = Box::pin(setup(&shared, &snapshot, &spec, tcp, peer, &acct.conn_id, acct.started, &mut acct.facts)) => r,
        cause = conn.closed() => Err(closed(cause)),
    };
    let reason = match setup {
        Ok(mut est) => {
            conn.set_backend(&est.backend().state);
            // Relay until both sides are done, counting bytes as they flow so long-lived
            // connections move the counters.
            let up = m.bytes.with_label_values(&[&spec.name, "client_to_broker"]);
            let down = m.bytes.with_label_values(&[&spec.name, "broker_to_client"]);
            up.inc_by(acct.facts.up);
            let relaying = Instant::now();
            let turns = &shared.turns;
            let mut client = CountReads::new(&mut est.client, up);
            let mut upstream = CountReads::new(&mut est.upstream, down);
            let linger = snapshot.limits.half_close_timeout;
            tokio::select! {
                (ended, totals, err) = relay::relay(&mut client, &mut upstream, linger, || turns.note_traffic(relaying)) => {
                    acct.facts.up += totals.up;
                    acct.facts.down = totals.down;
                    if let Some(e) = err {
                        acct.facts.detail = Some(e.to_string());
                    }
                    Reason::Relayed(ended)
                }
                cause = conn.closed() => closed(cause),
            }
        }
        Err(reason) => reason,
    };
    acct.reason = Some(reason);
    drop(conn);
    drop(held);
    drop(acct);
}

/// A connection closed at accept (a connection limit), before any other work: counted and
/// logged like every other connection end.
pub fn refused_at_accept(shared: &Shared, listener: &str, peer: SocketAddr, reason: Reason) {
    let facts = Facts { client_addr: Some(peer), ..Facts::default() };
    ended(&shared.metrics, listener, &shared.conn_id(), &facts, reason, Duration::ZERO);
}

/// Every connection's end: the refusal and close counters, and its one log line.
fn ended(m: &Metrics, listener: &str, conn_id: &str, facts: &Facts, reason: Reason, duration: Duration) {
    if reason.refused() {
        m.refused.with_label_values(&[listener, reason.as_str(), connack_label(facts.connack)]).inc();
    }
    m.closed.with_label_values(&[listener, reason.as_str()]).inc();
    tracing::info!(
        target: "harbormaster::connection",
        conn_id = %conn_id,
        client_addr = %facts.client_addr.map(|a| a.to_string()).unwrap_or_default(),
        listener = %listener,
        sni = facts.sni.as_deref().unwrap_or(""),
        tls_version = facts.tls_version.unwrap_or(""),
        tls_resumed = facts.tls_resumed,
        client_id = facts.client_id.as_deref().unwrap_or(""),
        mqtt_version = facts.mqtt_version.map(MqttVersion::as_str).unwrap_or(""),
        bridge = facts.bridge,
        broker = facts.broker.as_deref().unwrap_or(""),
        bytes_in = facts.up,
        bytes_out = facts.down,
        duration = ?duration,
        close_reason = reason.as_str(),
        detail = facts.detail.as_deref().unwrap_or(""),
        "connection closed"
    );
}

#[allow(clippy::too_many_arguments)]
async fn setup(
    shared: &Shared,
    snap: &Snapshot,
    spec: &ListenerSpec,
    mut tcp: TcpStream,
    peer: SocketAddr,
    conn_id: &str,
    started: Instant,
    facts: &mut Facts,
) -> Result<Established, Reason> {
    let deadline = tokio::time::Instant::from_std(started + snap.limits.connect_timeout);
    let Some(pool) = snap.pool(&spec.pool) else {
        return Err(Reason::NoPool);
    };
    // TCP_NODELAY comes from the listening socket (listener::bind). The listener's own
    // address is the destination unless it was bound to a wildcard or port 0: no system call.
    let mut dst = if spec.bind.port() != 0 && !spec.bind.ip().is_unspecified() {
        spec.bind
    } else {
        tcp.local_addr().unwrap_or(spec.bind)
    };
    let mut src = peer;

    // 1. PROXY header from an outer load balancer.
    let mut pre = Vec::new();
    if spec.accept_proxy {
        if !spec.trusts(peer.ip()) {
            facts.detail = Some(format!("PROXY header expected from a trusted proxy, {} is not one", peer.ip()));
            return Err(Reason::UntrustedProxy);
        }
        match tokio::time::timeout_at(deadline, read_inbound(&mut tcp)).await {
            Err(_) => return Err(Reason::Timeout),
            Ok(Err(e)) => {
                facts.detail = Some(e.to_string());
                return Err(Reason::BadProxyHeader);
            }
            Ok(Ok((header, rest))) => {
                if let Some((s, d)) = header.addrs {
                    src = s;
                    dst = d;
                    facts.client_addr = Some(s);
                }
                pre = rest;
            }
        }
    }
    let stream = Prefixed::new(pre, tcp);

    // 2. Admission: the client's address (after PROXY decoding) within its rate, then a
    // handshake token; both refusals close before any TLS work.
    let lim = &snap.limits.admission;
    if !shared.admission.source_allowed(lim, super::snapshot::canonical_ip(src.ip()), Instant::now()) {
        facts.detail = Some(format!("more than {} new connections per second from {}", lim.per_source_rate, src.ip()));
        return Err(Reason::SourceRate);
    }
    if spec.tls.is_some() {
        match tokio::time::timeout_at(deadline, shared.admission.handshake(lim)).await {
            Err(_) => return Err(Reason::Timeout),
            Ok(Err(admission::Refused::HandshakeQueueFull)) => return Err(Reason::HandshakeQueueFull),
            Ok(Err(admission::Refused::HandshakeQueueTimeout)) => return Err(Reason::HandshakeQueueTimeout),
            Ok(Ok(())) => {}
        }
    }

    // 3. TLS.
    match &spec.tls {
        None => {
            let client = Client::Plain(stream);
            serve(shared, &spec.name, pool, snap, client, None, src, dst, conn_id, deadline, started, facts).await
        }
        Some(cfg) => {
            let handshake = Instant::now();
            // The receive buffer is charged to the setup budget until the CONNECT is complete.
            let charge = Some((shared.setup_bytes.charge(), snap.limits.max_setup_bytes));
            let tls = match tokio::time::timeout_at(
                deadline,
                TlsServerStream::accept(cfg.clone(), stream, Some(&shared.turns), charge),
            )
            .await
            {
                Err(_) => {
                    shared.metrics.tls_handshakes.with_label_values(&[&spec.name, "timeout", "none"]).inc();
                    return Err(Reason::Timeout);
                }
                Ok(Err(e)) if OverBudget::is(&e) => {
                    shared.metrics.tls_handshakes.with_label_values(&[&spec.name, "error", "none"]).inc();
                    facts.detail = Some(over_budget_detail(shared, snap, "no room for the TLS handshake"));
                    return Err(Reason::SetupBytes);
                }
                Ok(Err(e)) => {
                    let (outcome, detail) = handshake_failure(&e);
                    shared.metrics.tls_handshakes.with_label_values(&[&spec.name, outcome, "none"]).inc();
                    facts.detail = Some(detail);
                    return Err(Reason::TlsHandshake);
                }
                Ok(Ok(tls)) => tls,
            };
            let elapsed = handshake.elapsed().as_secs_f64();
            shared.metrics.tls_handshake_seconds.with_label_values(&[&spec.name]).observe(elapsed);
            let info = TlsInfo::from_common(tls.common(), tls.server_name());
            shared.metrics.tls_handshakes.with_label_values(&[&spec.name, "ok", info.version]).inc();
            if info.resumed {
                shared.metrics.tls_resumed.with_label_values(&[&spec.name]).inc();
            }
            if let Some(refused) = info.client_cert.as_ref().and_then(|c| c.cn_refused.as_ref()) {
                shared.metrics.cn_refused.with_label_values(&[&spec.name, refused.reason.as_str()]).inc();
                // Escaped and bounded: the CN is the client's text, and must not forge log lines.
                tracing::warn!(
                    target: "harbormaster::connection",
                    conn_id = %conn_id,
                    listener = %spec.name,
                    reason = refused.reason.as_str(),
                    cn = %refused.shown,
                    "client certificate CN not passed on to the broker"
                );
            }
            facts.tls_resumed = info.resumed;
            facts.sni = info.sni.clone();
            facts.tls_version = Some(info.version);
            let client = Client::Tls(Box::new(tls));
            serve(shared, &spec.name, pool, snap, client, Some(info), src, dst, conn_id, deadline, started, facts).await
        }
    }
}

/// The `tls_handshakes_total` outcome and the log's detail of a failed handshake. A client
/// certificate found in a revocation list is told apart (outcome `revoked`): an operator
/// watching a revoked device knocking sees it, and a surge of them is not mistaken for
/// scanners or broken clients. A status the lists cannot establish is named as such.
fn handshake_failure(e: &io::Error) -> (&'static str, String) {
    use rustls::{CertificateError, Error};
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(CertificateError::Revoked)) => {
            ("revoked", "client certificate revoked: it is listed in the listener's client_crl".to_string())
        }
        Some(Error::InvalidCertificate(CertificateError::UnknownRevocationStatus)) => (
            "error",
            "client certificate refused: its revocation status is unknown (no list from its issuer in client_crl)"
                .to_string(),
        ),
        _ => ("error", e.to_string()),
    }
}

/// The log's detail of a connection closed because setup buffers hold `max_setup_bytes`.
fn over_budget_detail(shared: &Shared, snap: &Snapshot, what: &str) -> String {
    format!(
        "connections in setup hold {} bytes; max_setup_bytes is {} ({what})",
        shared.setup_bytes.used(),
        snap.limits.max_setup_bytes
    )
}

/// Read an inbound PROXY header; returns it and the bytes read past it.
async fn read_inbound(tcp: &mut TcpStream) -> io::Result<(inbound::Inbound, Vec<u8>)> {
    let mut buf = Vec::with_capacity(256);
    loop {
        if tcp.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the PROXY header ended"));
        }
        match inbound::parse(&buf) {
            Ok(None) => {}
            Ok(Some(h)) => {
                let rest = buf.split_off(h.len);
                return Ok((h, rest));
            }
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// Why no CONNECT could be read.
enum ReadFail {
    Mqtt(ConnectError),
    Closed(String),
    /// No room in `limits.max_setup_bytes` for the buffer to grow; the version if the bytes
    /// so far tell it.
    Budget(Option<MqttVersion>),
}

/// The CONNECT buffer's first size: a device's whole CONNECT fits.
const FIRST_READ: usize = 512;

/// The CONNECT buffer's next size when it is full: twice the bytes received, but never past
/// the packet's announced length, so the buffer holds at most twice what the client sent and
/// an announced length alone reserves nothing.
fn next_capacity(buf: &[u8]) -> usize {
    let doubled = buf.len().saturating_mul(2).max(FIRST_READ);
    match mqtt::announced_len(buf) {
        Some(total) if total > buf.len() => doubled.min(total),
        _ => doubled,
    }
}

/// Read until a whole CONNECT is buffered. Returns the buffer (CONNECT + anything pipelined).
/// The buffer is charged to `charge` before it is allocated or grown.
async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    limits: &super::snapshot::Limits,
    charge: &mut SetupCharge,
) -> Result<Vec<u8>, ReadFail> {
    if !charge.grow_to(FIRST_READ, limits.max_setup_bytes) {
        return Err(ReadFail::Budget(None));
    }
    let mut buf = Vec::with_capacity(FIRST_READ);
    loop {
        match mqtt::peek_connect(&buf, limits.max_connect_packet) {
            Ok(Peek::Complete { .. }) => return Ok(buf),
            Ok(Peek::Incomplete) => {}
            Err(e) => return Err(ReadFail::Mqtt(e)),
        }
        if buf.len() == buf.capacity() {
            let to = next_capacity(&buf);
            if !charge.grow_to(to, limits.max_setup_bytes) {
                return Err(ReadFail::Budget(mqtt::version(&buf)));
            }
            buf.reserve_exact(to - buf.len());
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) => return Err(ReadFail::Closed("closed before CONNECT was complete".into())),
            Ok(_) => {}
            // A TLS stream's buffer (an incomplete record) had no room to grow.
            Err(e) if OverBudget::is(&e) => return Err(ReadFail::Budget(mqtt::version(&buf))),
            Err(e) => return Err(ReadFail::Closed(e.to_string())),
        }
    }
}

/// The reason, and the CONNACK (if any) for a first packet that cannot be accepted.
fn refusal_for(e: &ConnectError) -> (Reason, Option<(MqttVersion, Refusal)>) {
    match *e {
        ConnectError::NotConnect(_) => (Reason::NotConnect, None),
        ConnectError::Malformed { version, .. } => (Reason::Malformed, version.map(|v| (v, Refusal::Malformed))),
        ConnectError::TooLarge { version, .. } => (Reason::TooLarge, version.map(|v| (v, Refusal::PacketTooLarge))),
        // Refused before any broker is dialled: a broker may close without a CONNACK on such
        // strings, and that close would count against it in passive health.
        ConnectError::BadString { field: StringField::ClientId, version, .. } => {
            (Reason::Malformed, Some((version, Refusal::ClientIdRejected)))
        }
        ConnectError::BadString { version, .. } => (Reason::Malformed, Some((version, Refusal::Malformed))),
        // A level-5 CONNECT with a wrong name (or with the bridge bit, which 5.0 lacks) reads
        // the 5.0 CONNACK layout; every other level gets the 3.x one, as Mosquitto answers: a
        // client of an unknown version is most likely to understand the oldest, simplest CONNACK.
        ConnectError::UnsupportedProtocol { level } => {
            let v = if level & 0x7f == 5 { MqttVersion::V5 } else { MqttVersion::V311 };
            (Reason::UnsupportedProtocol, Some((v, Refusal::UnsupportedProtocol)))
        }
    }
}

/// Answer a refusal the way the client's MQTT version understands, then close politely.
/// Returns the CONNACK code sent, if any.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    version: Option<MqttVersion>,
    refusal: Refusal,
) -> Option<u8> {
    let packet = version.and_then(|v| mqtt::connack(v, refusal));
    if let Some(packet) = packet {
        let _ = stream.write_all(packet).await;
    }
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
    // Read what the client still sends until it closes, so the close is a FIN after our
    // CONNACK and not a reset that could destroy it; bounded in time and bytes.
    let mut sink = [0u8; 512];
    let mut left = 64 * 1024usize;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 || n >= left {
                break;
            }
            left -= n;
        }
    })
    .await;
    // Both CONNACK layouts carry the return/reason code in their fourth byte.
    packet.and_then(|p| p.get(3).copied())
}

/// Failed dials marked a broker down (passive health checking); the checker's probes bring
/// it back.
fn marked_down(m: &Metrics, pool: &Pool, b: &Backend, error: &str) {
    let reason = format!("{} failures in a row, last: dial: {error}", b.failure_streak());
    broker::report_transition(m, &pool.name, b, Transition::Down, &reason);
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    shared: &Shared,
    listener: &str,
    pool: &Pool,
    snap: &Snapshot,
    mut stream: Client,
    tls: Option<TlsInfo>,
    src: SocketAddr,
    dst: SocketAddr,
    conn_id: &str,
    deadline: tokio::time::Instant,
    started: Instant,
    facts: &mut Facts,
) -> Result<Established, Reason> {
    // 4. CONNECT, its buffer charged to the process's setup budget until it has been
    // written to a broker.
    let mut charge = shared.setup_bytes.charge();
    let read = tokio::time::timeout_at(deadline, read_connect(&mut stream, &snap.limits, &mut charge)).await;
    let buf = match read {
        Err(_) => return Err(Reason::Timeout),
        Ok(Ok(buf)) => {
            if let Client::Tls(tls) = &mut stream {
                tls.end_setup();
            }
            buf
        }
        Ok(Err(ReadFail::Closed(detail))) => {
            facts.detail = Some(detail);
            return Err(Reason::ClientClosed);
        }
        Ok(Err(ReadFail::Budget(version))) => {
            // The buffer is gone; so is its charge before the (bounded) polite close.
            let held = charge.held();
            drop(charge);
            facts.detail = Some(over_budget_detail(shared, snap, &format!("this one held {held}")));
            facts.mqtt_version = version;
            facts.connack = refuse(&mut stream, version, Refusal::QuotaExceeded).await;
            return Err(Reason::SetupBytes);
        }
        Ok(Err(ReadFail::Mqtt(e))) => {
            drop(charge); // the buffer is gone
            facts.detail = Some(e.to_string());
            let (reason, answer) = refusal_for(&e);
            facts.connack = match answer {
                Some((v, r)) => refuse(&mut stream, Some(v), r).await,
                None => refuse(&mut stream, None, Refusal::Malformed).await,
            };
            return Err(reason);
        }
    };
    let Ok(Peek::Complete { connect, len }) = mqtt::peek_connect(&buf, snap.limits.max_connect_packet) else {
        return Err(Reason::Malformed); // unreachable: read_connect returned a complete packet
    };
    let version = connect.version;
    facts.mqtt_version = Some(version);
    facts.bridge = connect.bridge;
    facts.client_id = Some(String::from_utf8_lossy(connect.client_id).into_owned());
    shared.metrics.connect_bytes.with_label_values(&[version.as_str()]).observe(len as f64);
    shared.metrics.connects.with_label_values(&[listener, version.as_str()]).inc();
    let elapsed = started.elapsed().as_secs_f64();
    shared.metrics.accept_to_connect_seconds.with_label_values(&[listener]).observe(elapsed);

    // 5. A client-id that reconnects in a loop is refused for a while: counted per listener
    // and verified certificate, so a client without one cannot get a device with one refused.
    let cert_sha256 = tls.as_ref().and_then(|t| t.client_cert.as_ref()).map(|c| &c.sha256);
    let who = admission::Claimant { listener, cert_sha256 };
    if !shared.admission.connect_allowed(&snap.limits.admission, who, connect.client_id, Instant::now()) {
        facts.detail = Some(match cert_sha256 {
            Some(_) => "client-id reconnecting too often with this client certificate (flapping)".into(),
            None => "client-id reconnecting too often without a client certificate on this listener (flapping)".into(),
        });
        facts.connack = refuse(&mut stream, Some(version), Refusal::RateExceeded).await;
        return Err(Reason::Flapping);
    }

    // 6. Choose brokers.
    let key: Option<&[u8]> = match pool.hash_key {
        HashKey::ClientId => Some(connect.client_id),
        HashKey::Username => connect.username,
        HashKey::CertCn => {
            tls.as_ref().and_then(|t| t.client_cert.as_ref()).and_then(|c| c.cn.as_deref()).map(str::as_bytes)
        }
    }
    .filter(|k| !k.is_empty());
    let source_key;
    let candidates: Vec<&Arc<Backend>> = match key {
        Some(k) => pool.candidates(k, pool.backend_attempts),
        None => match pool.empty_key {
            EmptyKey::Reject => {
                facts.detail = Some("no routing key and empty_client_id = reject".into());
                facts.connack = refuse(&mut stream, Some(version), Refusal::ClientIdRejected).await;
                return Err(Reason::EmptyClientId);
            }
            EmptyKey::LeastConnections => pool.least_connections(pool.backend_attempts),
            EmptyKey::SourceAddress => {
                source_key = super::snapshot::canonical_ip(src.ip()).to_string();
                pool.candidates(source_key.as_bytes(), pool.backend_attempts)
            }
        },
    };

    // 7. PROXY header, then the CONNECT and whatever was pipelined, in one write: the same
    // bytes for every broker tried.
    let mut first = match pool.proxy_protocol {
        ProxyProtocol::None => Vec::new(),
        ProxyProtocol::V1 => proxy_header::encode_v1(src, dst),
        ProxyProtocol::V2 => {
            let input = HeaderInput {
                src,
                dst,
                tls: tls.as_ref(),
                unique_id: conn_id.as_bytes(),
                client_id: connect.client_id,
            };
            let enc = proxy_header::encode_v2(&input, &pool.tlvs, pool.max_header_bytes);
            for t in &enc.dropped {
                shared.metrics.tlv_dropped.with_label_values(&[&pool.name, &format!("{t:?}").to_lowercase()]).inc();
            }
            enc.bytes
        }
    };
    first.reserve_exact(buf.len());
    first.extend_from_slice(&buf);
    facts.up = buf.len() as u64;
    drop(buf);
    // Already decided on: the copy is charged whatever the total.
    charge.set(first.capacity());
    drop(tls);

    // 8. Dial, in preference order, until a broker answers.
    let mut broker = None;
    let mut errors = Vec::new();
    for b in candidates {
        match attempt(shared, pool, b, &first).await {
            Ok(s) => {
                shared.metrics.broker_attempts.with_label_values(&[&pool.name, &b.name, "ok"]).inc();
                b.record_dial(true, pool.passive_fall());
                broker = Some((b.clone(), s));
                break;
            }
            Err((outcome, error)) => {
                shared.metrics.broker_attempts.with_label_values(&[&pool.name, &b.name, outcome]).inc();
                b.set_last_error(&error);
                if b.record_dial(false, pool.passive_fall()) {
                    marked_down(&shared.metrics, pool, b, &error);
                }
                errors.push(format!("{}: {error}", b.name));
            }
        }
    }
    drop(first);
    drop(charge);
    let Some((backend, upstream)) = broker else {
        facts.detail = Some(errors.join("; "));
        facts.connack = refuse(&mut stream, Some(version), Refusal::ServerUnavailable).await;
        return Err(Reason::NoBroker);
    };
    if !errors.is_empty() {
        facts.detail = Some(format!("failed over: {}", errors.join("; ")));
        shared.metrics.failovers.with_label_values(&[&pool.name]).inc();
    }
    backend.active.fetch_add(1, Ordering::Relaxed);
    backend.total.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(backend.clone());
    facts.broker = Some(backend.name.clone());
    shared.metrics.routed.with_label_values(&[&pool.name, &backend.name]).inc();
    match pool.proxy_protocol {
        ProxyProtocol::None => {}
        ProxyProtocol::V1 => shared.metrics.proxy_headers.with_label_values(&[&pool.name, "v1"]).inc(),
        ProxyProtocol::V2 => shared.metrics.proxy_headers.with_label_values(&[&pool.name, "v2"]).inc(),
    }
    shared.metrics.setup_seconds.observe(started.elapsed().as_secs_f64());

    Ok(Established { client: stream, upstream, _active })
}

/// One broker: TCP connect within `backend_connect_timeout`, then `first` (PROXY header and
/// CONNECT), then its first byte within `backend_connack_timeout`. Peeking, not reading,
/// leaves the answer (CONNACK, or an AUTH exchange) to the relay, so the broker's bytes reach
/// the client untouched; a close or reset before any byte is a failed dial like a refused
/// connect (a broker that accepts and drops connections: overloaded, or not speaking MQTT).
/// Nothing has been sent to the client yet, so a broker that fails any step can be replaced
/// by the next. The error is an outcome label of `broker_connect_attempts_total` and a text
/// for logs.
async fn attempt(shared: &Shared, pool: &Pool, b: &Backend, first: &[u8]) -> Result<TcpStream, (&'static str, String)> {
    let dial = Instant::now();
    let (mut s, sent) = match tokio::time::timeout(pool.backend_connect_timeout, connect_sending(b.addr, first)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err((dial_error_outcome(&e), e.to_string())),
        Err(_) => return Err(("timeout", "timed out".to_string())),
    };
    let elapsed = dial.elapsed().as_secs_f64();
    shared.metrics.broker_connect_seconds.with_label_values(&[&pool.name, &b.name]).observe(elapsed);
    let answered = tokio::time::timeout(pool.backend_connack_timeout, async {
        s.write_all(&first[sent..]).await.map_err(|e| (dial_error_outcome(&e), format!("writing CONNECT: {e}")))?;
        s.peek(&mut [0u8; 1]).await.map_err(|e| (dial_error_outcome(&e), format!("before answering CONNECT: {e}")))
    })
    .await;
    match answered {
        Ok(Ok(0)) => Err((DIAL_CLOSED, "closed the connection before answering CONNECT".to_string())),
        Ok(Ok(_)) => Ok(s),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(("connack_timeout", format!("no answer to CONNECT within {:?}", pool.backend_connack_timeout))),
    }
}

/// TCP connect to `addr` (no Nagle) that sends what it can of `first` at once when the
/// connection is already up, as it is on return from `connect` for a broker on the same host:
/// that spares a wait for writability and an `SO_ERROR` query per connection. Otherwise it
/// waits for the connection like `TcpStream::connect`. Returns the stream and how many bytes
/// of `first` it sent.
async fn connect_sending(addr: SocketAddr, first: &[u8]) -> io::Result<(TcpStream, usize)> {
    use std::io::Write;
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking().cloexec(),
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_tcp_nodelay(true)?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let std = std::net::TcpStream::from(sock);
    // A socket still connecting refuses the send with EAGAIN; a refused connection reports
    // its error here.
    let sent = match (&std).write(first) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    let stream = TcpStream::from_std(std)?;
    if sent == 0 {
        stream.writable().await?;
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    Ok((stream, sent))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    fn listener(backlog: i32) -> TcpListener {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        s.listen(backlog).unwrap();
        s.into()
    }

    /// A connection's task that panics (a bug) leaves the gauge exact and is counted as closed,
    /// like every other end.
    #[tokio::test]
    async fn a_connection_task_that_panics_is_still_counted() {
        let shared = Arc::new(Shared::new(Arc::new(Metrics::new()), CancellationToken::new()));
        let s = shared.clone();
        let task = tokio::spawn(async move {
            let name = "l".to_string();
            let acct = Accounting::open(&s, &name, "127.0.0.1:1".parse().unwrap());
            assert_eq!(s.metrics.active.with_label_values(&["l"]).get(), 1);
            tokio::task::yield_now().await;
            if acct.reason.is_none() {
                panic!("a bug in the connection's task");
            }
        });
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(shared.metrics.active.with_label_values(&["l"]).get(), 0);
        assert_eq!(shared.metrics.closed.with_label_values(&["l", "internal_error"]).get(), 1);
        assert_eq!(shared.metrics.refused.with_label_values(&["l", "internal_error", "none"]).get(), 1);
    }

    #[tokio::test]
    async fn connect_sending_sends_at_once_on_a_connection_already_up() {
        let l = listener(16);
        let (s, sent) = connect_sending(l.local_addr().unwrap(), b"hello").await.unwrap();
        assert_eq!(sent, 5, "loopback connections are up when connect returns");
        assert!(s.nodelay().unwrap());
        let mut got = [0u8; 5];
        l.accept().unwrap().0.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
    }

    /// With the listener's accept queue full the SYN is dropped, so the connection is still
    /// being set up when `connect` returns: nothing is sent then, and the connection completes
    /// once the queue has room (the SYN is sent again after a second).
    #[tokio::test]
    async fn connect_sending_waits_for_a_connection_still_being_set_up() {
        let l = listener(0);
        let addr = l.local_addr().unwrap();
        let _queued = std::net::TcpStream::connect(addr).unwrap();
        let (mut s, sent) = {
            let dial = tokio::spawn(async move { connect_sending(addr, b"hello").await });
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(!dial.is_finished(), "the connection cannot be up while the queue is full");
            let first = l.accept().unwrap().0;
            let r = dial.await.unwrap().unwrap();
            drop(first);
            r
        };
        assert_eq!(sent, 0);
        s.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        l.accept().unwrap().0.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
    }

    #[tokio::test]
    async fn connect_sending_reports_a_refused_connection() {
        let addr = listener(1).local_addr().unwrap(); // dropped: nothing listens there
        let e = connect_sending(addr, b"hello").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }
}
