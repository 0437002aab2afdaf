//! The life of one client connection, top to bottom as docs/architecture.md tells it:
//! PROXY header from an outer load balancer (optional) → admission (per-source rate, a
//! handshake token) → TLS handshake (optional) → CONNECT (its client-id admitted unless
//! flapping) → route → first bytes (PROXY header to the broker, the CONNECT and what was
//! pipelined) → dial with failover, or first a hold for a restarting first choice
//! (`on_backend_restart = "hold"`) → relay → one log line.
//!
//! Setting up is one per-connection context, `Setup`, with a method per step; each returns
//! what the next step needs, or `Refused`: the close reason, the detail for the log line and
//! what the client is told. `Setup::refuse` is the one place a refusal is carried out: an
//! MQTT-correct CONNACK where the protocol allows, a polite close, the log's facts. Nothing is
//! written to a broker before the dial, so a refused connection never reaches one.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout_at;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::admission::{self, Admission};
use super::balance::{
    key_hash, Backend, BackendTransport, EmptyKey, HashKey, Hold, PlannedCloseWill, Pool, ProxyProtocol,
};
use super::boundary::{Boundary, Disconnect};
use super::broker::{self, Transition};
use super::budget::{OverBudget, SetupBudget, SetupCharge};
use super::hold::{HoldOutcome, Holds};
use super::identity::TlsInfo;
use super::inbound;
use super::mqtt::{self, Connect, ConnectError, MqttVersion, Peek, Refusal, StringField};
use super::prefixed::Prefixed;
use super::proxy_header::{self, HeaderInput};
use super::registry::{CloseCause, Leaving, Registration, Registry};
use super::relay::{self, Ended};
use super::rewrite;
use super::routing;
use super::runtimes;
use super::snapshot::{canonical_ip, ListenerSpec, RefusalStyle, Snapshot};
use super::stream::{Client, Counted, Direction};
use super::tls_stream::TlsServerStream;
use super::websocket::{self, Accepted, FrameError, UpgradeRefusal, WsStream};
use crate::admin::metrics::Metrics;

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
    /// Every connection's task, wherever it runs: shutting down waits for them.
    pub tracker: TaskTracker,
    /// The runtime accept loops and setup run on ([`runtimes`]), if not the current one.
    pub setup: Option<tokio::runtime::Handle>,
    /// Where a connection moves once it has relayed for [`runtimes::SETTLE`]: the runtime
    /// the process was started on, when there is a setup runtime apart from it.
    relay: Option<tokio::runtime::Handle>,
    /// Bytes held for TLS handshakes and CONNECTs by connections in setup
    /// (`limits.max_setup_bytes`).
    pub setup_bytes: SetupBudget,
    /// Connections held for their restarting broker, by pool (`hold_max`).
    pub holds: Holds,
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
        let setup = runtimes::setup_runtime();
        let relay = tokio::runtime::Handle::try_current().ok().filter(|_| setup.is_some());
        let setup_bytes = SetupBudget::new(metrics.setup_bytes.clone());
        Shared {
            metrics,
            hard_stop,
            conns,
            admission,
            tracker: TaskTracker::new(),
            setup,
            relay,
            setup_bytes,
            holds: Holds::default(),
            prefix,
            next_id: AtomicU64::new(1),
        }
    }

    fn conn_id(&self) -> String {
        format!("{:016x}-{:x}", self.prefix, self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

/// Why a connection ended; the `close_reason` of the log line and the `reason` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    UntrustedProxy,
    BadProxyHeader,
    TlsHandshake,
    Timeout,
    ClientClosed,
    NotConnect,
    Malformed,
    /// The client's CONNECT is over `max_connect_packet`, or over its pool's
    /// `backend_max_packet_size`.
    TooLarge,
    UnsupportedProtocol,
    EmptyClientId,
    NoBroker,
    NoPool,
    Drained,
    BrokerRemoved,
    /// Its broker was drained through the admin server: moved away like a removed broker's.
    BrokerDrained,
    /// Moved back to its first choice, which is in rotation again (rebalancing).
    Rebalanced,
    /// A WebSocket upgrade request refused with an HTTP status.
    BadUpgrade,
    /// A WebSocket client's frames broke RFC 6455 before the CONNECT was read.
    WebSocketProtocol,
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
    /// The pool's `connect` policy cannot rewrite this CONNECT (no verified certificate for
    /// `cert_cn`, a username MQTT cannot carry, a result over `max_connect_packet` or the
    /// pool's `backend_max_packet_size`).
    ConnectRewrite,
    /// The connection's task ended without an outcome: it panicked (a bug). Counted and
    /// logged like every other end, and other connections are unaffected.
    Internal,
    Relayed(Ended),
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::UntrustedProxy => "untrusted_proxy",
            CloseReason::BadProxyHeader => "bad_proxy_header",
            CloseReason::TlsHandshake => "tls_handshake",
            CloseReason::Timeout => "connect_timeout",
            CloseReason::ClientClosed => "client_closed_early",
            CloseReason::NotConnect => "not_connect",
            CloseReason::Malformed => "malformed_connect",
            CloseReason::TooLarge => "connect_too_large",
            CloseReason::UnsupportedProtocol => "unsupported_protocol",
            CloseReason::EmptyClientId => "empty_client_id_rejected",
            CloseReason::NoBroker => "no_broker_available",
            CloseReason::NoPool => "no_pool",
            CloseReason::Drained => "drained",
            CloseReason::BrokerRemoved => "broker_removed",
            CloseReason::BrokerDrained => "broker_drained",
            CloseReason::Rebalanced => "rebalanced",
            CloseReason::BadUpgrade => "bad_websocket_upgrade",
            CloseReason::WebSocketProtocol => "websocket_protocol",
            CloseReason::MaxConnections => "max_connections",
            CloseReason::ListenerMaxConnections => "listener_max_connections",
            CloseReason::HandshakeQueueFull => "handshake_queue_full",
            CloseReason::HandshakeQueueTimeout => "handshake_queue_timeout",
            CloseReason::SourceRate => "per_source_rate",
            CloseReason::SetupBytes => "max_setup_bytes",
            CloseReason::Flapping => "flapping",
            CloseReason::ConnectRewrite => "connect_rewrite_refused",
            CloseReason::Internal => "internal_error",
            CloseReason::Relayed(Ended::Clean) => "closed",
            CloseReason::Relayed(Ended::ClientError) => "client_error",
            CloseReason::Relayed(Ended::BrokerError) => "broker_error",
            CloseReason::Relayed(Ended::HalfCloseTimeout) => "half_close_timeout",
        }
    }

    /// Whether the connection was refused before relaying (`connections_refused_total`):
    /// every end but a relay's and a close by the control plane.
    pub fn refused(self) -> bool {
        !matches!(
            self,
            CloseReason::Relayed(_)
                | CloseReason::Drained
                | CloseReason::BrokerRemoved
                | CloseReason::BrokerDrained
                | CloseReason::Rebalanced
        )
    }
}

/// How one dial of a broker ended: the `outcome` label of `broker_connect_attempts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialOutcome {
    /// The broker answered the CONNECT.
    Ok,
    Refused,
    /// The TCP connect took longer than `backend_connect_timeout` (or the kernel's).
    Timeout,
    /// No byte in answer to the CONNECT within `backend_connack_timeout`.
    ConnackTimeout,
    /// The broker closed the connection (FIN) before its first byte.
    Closed,
    /// Reset by the broker (a broken pipe is a write after the reset was received).
    Reset,
    Error,
}

impl DialOutcome {
    /// The outcome of a failed connect, write or peek.
    fn of(e: &io::Error) -> DialOutcome {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => DialOutcome::Refused,
            io::ErrorKind::TimedOut => DialOutcome::Timeout,
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => {
                DialOutcome::Reset
            }
            _ => DialOutcome::Error,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DialOutcome::Ok => "ok",
            DialOutcome::Refused => "refused",
            DialOutcome::Timeout => "timeout",
            DialOutcome::ConnackTimeout => "connack_timeout",
            DialOutcome::Closed => "closed",
            DialOutcome::Reset => "reset",
            DialOutcome::Error => "error",
        }
    }
}

/// How a TLS handshake failed: the `outcome` label of `tls_handshakes_total` (completed ones
/// are `ok`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Not done within `connect_timeout`.
    Timeout,
    /// Refused by rustls, or no room in the setup budget.
    Error,
    /// The client certificate is in a revocation list of `client_crl`.
    Revoked,
}

impl HandshakeFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Error => "error",
            HandshakeFailure::Revoked => "revoked",
        }
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
    /// The client speaks MQTT over WebSocket.
    websocket: bool,
    /// The pool the connection was routed to, and by which rule (boxed: the facts live in
    /// every connection's task).
    routed: Option<Box<Routed>>,
    broker: Option<String>,
    up: u64,
    down: u64,
    detail: Option<String>,
    /// The CONNACK code a refusal sent, for the `connack` metric label.
    connack: Option<u8>,
    /// The DISCONNECTs a planned close wrote: to the client, to the broker.
    disconnect_sent: Option<Disconnect>,
    broker_disconnect_sent: Option<Disconnect>,
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
    reason: Option<CloseReason>,
    /// Where the client's stream stands in its MQTT packets once the bytes pipelined behind
    /// the CONNECT were sent with it (they may end inside a packet); the relay follows on
    /// from there. Kept here, where it fits in padding, rather than in `Established`.
    up_at: Boundary,
    /// Handed on to the connection's task on another runtime ([`Accounting::carry`]): this
    /// one neither counts nor logs the end.
    carried: bool,
}

/// What of a connection's accounting goes with it to the relay runtime, and where its relay
/// stopped. Boxed on the way: an async function's arguments stay in its task for good, and
/// this is a few hundred bytes the task holds anyway once unpacked.
struct Carried {
    conn_id: String,
    started: Instant,
    facts: Facts,
    parked: relay::Parked,
}

impl<'a> Accounting<'a> {
    #[allow(clippy::ptr_arg)] // kept as a thin `&String`, see `listener`
    fn open(shared: &'a Shared, listener: &'a String, peer: SocketAddr) -> Accounting<'a> {
        let started = Instant::now();
        shared.metrics.connection_opened(listener);
        Accounting {
            metrics: &shared.metrics,
            listener,
            conn_id: shared.conn_id(),
            started,
            facts: Facts { client_addr: Some(peer), ..Facts::default() },
            reason: None,
            up_at: Boundary::START,
            carried: false,
        }
    }

    /// Hands the accounting on to the connection's next task, which [`Self::resume`]s it.
    fn carry(mut self, parked: relay::Parked) -> Box<Carried> {
        self.carried = true;
        let (conn_id, facts) = (std::mem::take(&mut self.conn_id), std::mem::take(&mut self.facts));
        Box::new(Carried { conn_id, started: self.started, facts, parked })
    }

    #[allow(clippy::ptr_arg)] // kept as a thin `&String`, see `listener`
    fn resume(shared: &'a Shared, listener: &'a String, c: Carried) -> Accounting<'a> {
        Accounting {
            metrics: &shared.metrics,
            listener,
            conn_id: c.conn_id,
            started: c.started,
            facts: c.facts,
            reason: None,
            up_at: Boundary::START,
            carried: false,
        }
    }
}

impl Drop for Accounting<'_> {
    fn drop(&mut self) {
        if self.carried {
            return;
        }
        let reason = self.reason.take().unwrap_or_else(|| {
            let what = if std::thread::panicking() { "panicked" } else { "was dropped" };
            self.facts.detail = Some(format!("the connection's task {what}"));
            CloseReason::Internal
        });
        self.metrics.connection_closed(self.listener, reason, self.facts.connack);
        log_end(self.listener, &self.conn_id, &self.facts, reason, self.started.elapsed());
    }
}

/// Keeps a broker's active-connection count right however the connection ends.
struct ActiveGuard(Arc<Backend>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
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

    /// Moves both sockets to the current runtime (the relay runtime).
    fn rehome(&mut self) -> io::Result<()> {
        self.client.rehome()?;
        super::stream::rehome(&mut self.upstream)
    }
}

/// The close reason of a close on purpose.
fn closed(cause: CloseCause) -> CloseReason {
    match cause {
        CloseCause::Drain => CloseReason::Drained,
        CloseCause::BrokerRemoved => CloseReason::BrokerRemoved,
        CloseCause::BrokerDrained => CloseReason::BrokerDrained,
        CloseCause::Rebalance => CloseReason::Rebalanced,
    }
}

/// Handle one accepted connection to its end, then log it. `conn` is its entry in
/// `shared.conns`, through which the control plane may close it; `held` (its place under the
/// connection limits) is dropped at the end.
pub async fn handle<H: Send + 'static>(
    shared: Arc<Shared>,
    snapshot: Arc<Snapshot>,
    spec: Arc<ListenerSpec>,
    tcp: TcpStream,
    peer: SocketAddr,
    conn: Registration,
    held: H,
) {
    let mut acct = Accounting::open(&shared, &spec.name, peer);
    // Setting up (PROXY header, TLS handshake, CONNECT, dialing) needs several times the state
    // relaying does; boxed, that state is freed before the connection idles instead of staying
    // part of this task for its whole life. Two selects rather than one around both phases
    // keep copies of arguments and captures out of the relaying task: an idle connection's
    // task is ~1 KB (`tests::connection_task_size` says why every 128 B counts).
    let setup = tokio::select! {
        r = Box::pin(setup(&shared, &snapshot, &spec, tcp, peer, &mut acct)) => r,
        cause = conn.closed() => Err(closed(cause)),
    };
    let reason = match setup {
        Ok((mut est, key_hash)) => {
            conn.set_backend(&est.backend().state, key_hash);
            let (from, sent_before) = (relay::Parked::start(acct.up_at), acct.facts.up);
            let settle = shared.relay.is_some().then_some(runtimes::SETTLE);
            match relay_phase(&shared, &snapshot, &spec, &mut est, &mut acct, &conn, from, sent_before, settle).await {
                Ok(reason) => reason,
                Err(parked) => {
                    // Settled: on to the relay runtime, where the rest of its life runs
                    // ahead of every setup (the `runtimes` module says why).
                    shared.metrics.connection_settled(&spec.name);
                    let carried = acct.carry(parked);
                    let Some(rt) = shared.relay.clone() else { return };
                    let tracker = shared.tracker.clone();
                    tracker.spawn_on(settled(shared, snapshot, spec, est, carried, conn, held), &rt);
                    return;
                }
            }
        }
        Err(reason) => reason,
    };
    acct.reason = Some(reason);
    drop(conn);
    drop(held);
    drop(acct);
}

/// The rest of a settled connection's life, on the relay runtime: its sockets registered
/// here, the relay goes on from where it was parked, to the end and the log line.
async fn settled<H: Send>(
    shared: Arc<Shared>,
    snapshot: Arc<Snapshot>,
    spec: Arc<ListenerSpec>,
    mut est: Established,
    carried: Box<Carried>,
    conn: Registration,
    held: H,
) {
    let parked = carried.parked;
    let mut acct = Accounting::resume(&shared, &spec.name, *carried);
    let reason = match est.rehome() {
        Ok(()) => relay_phase(&shared, &snapshot, &spec, &mut est, &mut acct, &conn, parked, 0, None)
            .await
            .unwrap_or(CloseReason::Internal),
        Err(e) => {
            acct.facts.detail = Some(format!("cannot register the connection with the relay runtime: {e}"));
            CloseReason::Internal
        }
    };
    // The broker's count goes down before the log line says the connection ended.
    drop(est);
    acct.reason = Some(reason);
    drop(conn);
    drop(held);
    drop(acct);
}

/// Relays `est` from `from` until it ends or is closed on purpose, and says why it ended.
/// With `settle`, once it has relayed that long with nothing under way it stops instead:
/// `Err` with where it stopped, its bytes so far added to `acct`. `sent_before`: bytes
/// written to the broker before relaying (the CONNECT and what came with it), not yet counted.
#[allow(clippy::too_many_arguments)]
async fn relay_phase(
    shared: &Shared,
    snapshot: &Snapshot,
    spec: &ListenerSpec,
    est: &mut Established,
    acct: &mut Accounting<'_>,
    conn: &Registration,
    from: relay::Parked,
    sent_before: u64,
    settle: Option<Duration>,
) -> Result<CloseReason, relay::Parked> {
    let m = &shared.metrics;
    // Counting bytes as they flow so long-lived connections move the counters.
    let up = m.relayed_bytes(&spec.name, Direction::ClientToBroker);
    let down = m.relayed_bytes(&spec.name, Direction::BrokerToClient);
    up.inc_by(sent_before);
    let mut client = Counted::new(&mut est.client, up);
    let mut upstream = Counted::new(&mut est.upstream, down);
    let linger = snapshot.limits.half_close_timeout;
    let relay = relay::resume(&mut client, &mut upstream, from, linger);
    // What a close on purpose sends, decided now (4 bytes) rather than keeping what it
    // is decided from in the task.
    let suppress = snapshot.pool(&spec.pool).is_some_and(|p| p.planned_close_will == PlannedCloseWill::Suppress);
    let plans =
        [Leaving::ShuttingDown, Leaving::Moved].map(|leaving| planned_disconnects(leaving, &acct.facts, suppress));
    let closing = std::pin::pin!(conn.closed());
    // Boxed: a connection that does not settle (on the relay runtime) carries 8 bytes for it.
    let settle = settle.map(|d| Box::pin(tokio::time::sleep(d)));
    let (cause, (ended, totals, err), sent) = match relay_until_closed(relay, closing, plans, settle).await {
        Ok(end) => end,
        Err((parked, totals)) => {
            acct.facts.up += totals.up;
            acct.facts.down += totals.down;
            return Err(parked);
        }
    };
    acct.facts.up += totals.up;
    acct.facts.down += totals.down;
    // A planned close that found no packet boundary in time says so here too.
    if let Some(e) = err {
        if let Some(f) = FrameError::of(&e) {
            m.websocket_protocol_error(&spec.name, f.code);
        }
        acct.facts.detail = Some(e.to_string());
    }
    Ok(match cause {
        None => CloseReason::Relayed(ended),
        Some(cause) => {
            (acct.facts.disconnect_sent, acct.facts.broker_disconnect_sent) = sent;
            for d in [sent.0, sent.1].into_iter().flatten() {
                m.planned_disconnect(&spec.name, d);
            }
            closed(cause)
        }
    })
}

/// The relay's end, how it ended and what a planned close wrote.
type RelayEnd =
    (Option<CloseCause>, (Ended, relay::Totals, Option<io::Error>), (Option<Disconnect>, Option<Disconnect>));

/// Relays until the relay ends (no cause) or `closed` resolves: then the close on purpose,
/// with the DISCONNECTs `plans` gives for its [`Leaving`] (shutting down, moved) at packet
/// boundaries, or at once when there are none to write. Resolves to the cause, the relay's end
/// and the DISCONNECTs written (to the client, to the broker); or, once `settle` has passed
/// and the relay can be parked ([`relay::Relay::park`]), to `Err` with where it stopped and
/// its bytes so far. A plain function returning one future that holds the relay beside the
/// wait for the close, as a `select!` would: the planned close adds no second copy of either
/// to the connection's task.
fn relay_until_closed<'r, C, B, K>(
    mut relay: relay::Relay<'r, C, B>,
    mut closed: Pin<&'r mut K>,
    plans: [(Option<Disconnect>, Option<Disconnect>); 2],
    mut settle: Option<Pin<Box<tokio::time::Sleep>>>,
) -> impl Future<Output = Result<RelayEnd, (relay::Parked, relay::Totals)>> + 'r
where
    C: AsyncRead + relay::WriteLast + Unpin + ?Sized,
    B: AsyncRead + relay::WriteLast + Unpin + ?Sized,
    K: Future<Output = CloseCause>,
{
    let mut cause = None;
    std::future::poll_fn(move |cx| {
        if cause.is_none() {
            if let Poll::Ready(c) = closed.as_mut().poll(cx) {
                cause = Some(c);
                settle = None;
                let (to_client, to_broker) = match c.leaving() {
                    Leaving::ShuttingDown => plans[0],
                    Leaving::Moved => plans[1],
                };
                if !relay.plan(to_client, to_broker, PLANNED_CLOSE_WAIT) {
                    return Poll::Ready(Ok((cause, (Ended::Clean, relay.totals(), None), (None, None))));
                }
            }
        }
        // The relay's state is as its last poll left it (pending): parked there, nothing is
        // lost, and what arrived since waits in the sockets for the relay to go on elsewhere.
        if let Some(t) = &mut settle {
            if t.as_mut().poll(cx).is_ready() {
                if let Some(parked) = relay.park() {
                    return Poll::Ready(Err((parked, relay.totals())));
                }
                t.as_mut().reset(tokio::time::Instant::now() + runtimes::SETTLE_RETRY);
                let _ = t.as_mut().poll(cx);
            }
        }
        let out = ready!(Pin::new(&mut relay).poll(cx));
        Poll::Ready(Ok((cause, out, relay.sent())))
    })
}

/// How often a held connection dials its broker again while the broker is marked up but
/// refuses (health checks have not marked it down yet, or the pool has none).
const HOLD_RETRY: Duration = Duration::from_secs(1);

/// What a held client may send behind its CONNECT and still be watched for leaving.
const HOLD_READ_MAX: usize = 16 * 1024;

/// How long a planned close waits for packet boundaries (a peer may have stalled in the middle
/// of a packet) before it closes without its DISCONNECTs.
const PLANNED_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The DISCONNECTs of a planned close: an MQTT 5 client is told why (0x8B when the process
/// shuts down, 0x9C when it is moved to another broker); older versions have no DISCONNECT
/// from the server and are closed plainly. With `planned_close_will = "suppress"` the broker
/// gets a normal DISCONNECT on the client's behalf, so it does not publish the Will.
fn planned_disconnects(
    leaving: Leaving,
    facts: &Facts,
    suppress_will: bool,
) -> (Option<Disconnect>, Option<Disconnect>) {
    // Untouched frames have no MQTT packet boundaries to follow: a plain close.
    if facts.routed.as_ref().is_some_and(|r| r.backend_websocket) {
        return (None, None);
    }
    let to_client = match (facts.mqtt_version, leaving) {
        (Some(MqttVersion::V5), Leaving::ShuttingDown) => Some(Disconnect::ShuttingDown),
        (Some(MqttVersion::V5), Leaving::Moved) => Some(Disconnect::UseAnotherServer),
        _ => None,
    };
    let to_broker = (suppress_will && facts.mqtt_version.is_some()).then_some(Disconnect::Normal);
    (to_client, to_broker)
}

/// A connection closed at accept (a connection limit), before any other work: counted and
/// logged like every other connection end.
pub fn refused_at_accept(shared: &Shared, listener: &str, peer: SocketAddr, reason: CloseReason) {
    let facts = Facts { client_addr: Some(peer), ..Facts::default() };
    shared.metrics.closed_at_accept(listener, reason);
    log_end(listener, &shared.conn_id(), &facts, reason, Duration::ZERO);
}

/// Every connection's one log line.
fn log_end(listener: &str, conn_id: &str, facts: &Facts, reason: CloseReason, duration: Duration) {
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
        transport = if facts.websocket { "websocket" } else { "mqtt" },
        backend_transport = match (&facts.broker, facts.routed.as_ref().is_some_and(|r| r.backend_websocket)) {
            (None, _) => "",
            (Some(_), false) => "mqtt",
            (Some(_), true) => "websocket",
        },
        route = %RouteField(facts.routed.as_ref().and_then(|r| r.rule)),
        pool = facts.routed.as_ref().map_or("", |r| r.pool.name.as_str()),
        connect_rewrite = facts.routed.as_ref().and_then(|r| r.rewrite.as_deref()).unwrap_or(""),
        broker = facts.broker.as_deref().unwrap_or(""),
        bytes_in = facts.up,
        bytes_out = facts.down,
        duration = ?duration,
        close_reason = reason.as_str(),
        disconnect_sent = facts.disconnect_sent.map(Disconnect::as_str).unwrap_or(""),
        broker_disconnect_sent = facts.broker_disconnect_sent.map(Disconnect::as_str).unwrap_or(""),
        held_ms = facts.routed.as_ref().and_then(|r| r.held).map_or(0, |(ms, _)| ms),
        hold_outcome = facts.routed.as_ref().and_then(|r| r.held).map(|(_, o)| o.as_str()).unwrap_or(""),
        detail = facts.detail.as_deref().unwrap_or(""),
        "connection closed"
    );
}

/// Where the route step sent a connection: the pool, and the index of the listener's rule that
/// picked it (`None`: the listener's own `pool`).
struct Routed {
    rule: Option<u16>,
    /// The snapshot's pool itself (a reference count, not a copy of its name).
    pool: Arc<Pool>,
    /// What the pool's `connect` policy changed in the CONNECT (never the password).
    rewrite: Option<String>,
    /// How long the connection was held for its restarting broker (ms) and how that ended.
    held: Option<(u32, HoldOutcome)>,
    /// The broker is spoken to over a WebSocket of its own, the client's frames relayed
    /// untouched (`backend_transport = "websocket"`).
    backend_websocket: bool,
}

/// The log's `route`: `route[N]`, the rule of the listener that picked the pool, or empty when
/// the listener's own `pool` took the connection. Written without allocating.
struct RouteField(Option<u16>);

impl std::fmt::Display for RouteField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(i) => write!(f, "route[{i}]"),
            None => Ok(()),
        }
    }
}

/// Sets up one accepted connection: an established connection and the hash of the routing key
/// that chose its broker (if one did), or why it ended.
async fn setup(
    shared: &Shared,
    snap: &Snapshot,
    spec: &ListenerSpec,
    tcp: TcpStream,
    peer: SocketAddr,
    acct: &mut Accounting<'_>,
) -> Result<(Established, Option<u64>), CloseReason> {
    let Some(pool) = snap.pool(&spec.pool) else {
        return Err(CloseReason::NoPool);
    };
    // TCP_NODELAY comes from the listening socket (listener::bind). The listener's own
    // address is the destination unless it was bound to a wildcard or port 0: no system call.
    let dst = if spec.bind.port() != 0 && !spec.bind.ip().is_unspecified() {
        spec.bind
    } else {
        tcp.local_addr().unwrap_or(spec.bind)
    };
    let setup = Setup {
        shared,
        snap,
        spec,
        pool,
        conn_id: &acct.conn_id,
        started: acct.started,
        deadline: tokio::time::Instant::from_std(acct.started + snap.limits.connect_timeout),
        src: peer,
        dst,
        tls: None,
        key_hash: None,
        assigned: None,
        broker_answer: Vec::new(),
        ws_client: None,
        facts: &mut acct.facts,
        up_at: &mut acct.up_at,
    };
    setup.run(tcp).await
}

/// One connection's setup: what its steps read, what they learn on the way, and the facts
/// they leave for its log line. Lives in the boxed setup future, never in the relaying task.
struct Setup<'a> {
    shared: &'a Shared,
    snap: &'a Snapshot,
    spec: &'a ListenerSpec,
    pool: &'a Arc<Pool>,
    conn_id: &'a str,
    started: Instant,
    /// `connect_timeout` after accept: the TLS handshake and the CONNECT share it.
    deadline: tokio::time::Instant,
    /// The client's address and the address it connected to; an inbound PROXY header's
    /// replace the socket's.
    src: SocketAddr,
    dst: SocketAddr,
    /// The client's TLS identity, from the handshake until the first bytes are assembled.
    tls: Option<TlsInfo>,
    /// The hash of the routing key, once routed by one.
    key_hash: Option<u64>,
    /// The client-id harbormaster generated for an MQTT 5 client that sent none
    /// (`empty_client_id = "assign"`).
    assigned: Option<String>,
    /// With an assigned client-id: the broker's first packet, read whole by the dial that
    /// succeeded, for the CONNACK to carry the id.
    broker_answer: Vec<u8>,
    /// A WebSocket client's subprotocol and credentials (`Cookie`, `Authorization`), for a
    /// pool that opens WebSockets to its brokers.
    ws_client: Option<WsClient>,
    facts: &'a mut Facts,
    /// Where the client's stream stands in its MQTT packets after the bytes sent with the
    /// CONNECT, for the relay.
    up_at: &'a mut Boundary,
}

/// Why a setup step stopped the connection: its close reason, the detail for the log line and
/// what the client is told.
struct Refused {
    reason: CloseReason,
    detail: Option<String>,
    answer: Answer,
}

/// What a refused client is told before the close.
enum Answer {
    /// Nothing: the connection is dropped (before MQTT, TLS having sent its own alert; or the
    /// client is gone or out of time).
    Close,
    /// The CONNACK for `refusal`, when the client's version is known and has one for it, then
    /// a polite close.
    Connack { version: Option<MqttVersion>, refusal: Refusal },
    /// The HTTP response of a refused WebSocket upgrade, then a polite close.
    Http(UpgradeRefusal),
}

impl Refused {
    /// Closed without a word.
    fn close(reason: CloseReason) -> Refused {
        Refused { reason, detail: None, answer: Answer::Close }
    }

    /// Answered with the CONNACK for `refusal` in `version` where there is one, then closed
    /// politely.
    fn connack(reason: CloseReason, version: Option<MqttVersion>, refusal: Refusal) -> Refused {
        Refused { reason, detail: None, answer: Answer::Connack { version, refusal } }
    }

    /// A refusal for want of a broker (none answered; a flapping client-id): the CONNACK for
    /// `refusal`, or with `refusal = "close"` on the listener a polite close without one, for
    /// the client libraries that take "server unavailable" as final and stop reconnecting.
    fn unavailable(reason: CloseReason, style: RefusalStyle, version: MqttVersion, refusal: Refusal) -> Refused {
        let version = match style {
            RefusalStyle::Connack => Some(version),
            RefusalStyle::Close => None,
        };
        Refused::connack(reason, version, refusal)
    }

    fn detail(self, detail: impl Into<String>) -> Refused {
        Refused { detail: Some(detail.into()), ..self }
    }
}

/// The largest CONNECT a pool's brokers are sent, and whether it is theirs
/// (`backend_max_packet_size`) or the process's (`limits.max_connect_packet`).
struct ConnectLimit {
    bytes: usize,
    brokers: bool,
}

impl ConnectLimit {
    /// The limit, for a refusal's detail.
    fn describe(&self, pool: &str) -> String {
        if self.brokers {
            format!("the brokers' Maximum Packet Size of {} bytes (pool {pool:?} backend_max_packet_size)", self.bytes)
        } else {
            format!("limits.max_connect_packet ({} bytes)", self.bytes)
        }
    }
}

/// The first bytes of a raw MQTT client on a listener with `websocket`, read to tell it from
/// an upgrade request, and their charge to the setup budget: the CONNECT buffer's start.
struct FirstRead {
    buf: Vec<u8>,
    charge: SetupCharge,
}

/// A WebSocket client's upgrade facts a broker's WebSocket listener is told.
struct WsClient {
    subprotocol: Option<&'static str>,
    credentials: Vec<u8>,
}

/// What every broker tried is sent first, in one write: PROXY header, CONNECT and what the
/// client pipelined behind it (while held, too). Charged to the setup budget while they are
/// held.
struct FirstBytes {
    bytes: Vec<u8>,
    /// With `backend_transport = "websocket"`: the upgrade to ask each broker for, and the
    /// client's frames sent once it is granted (`bytes` is then the PROXY header alone).
    ws: Option<WsFirst>,
    charge: SetupCharge,
}

/// The broker side of `backend_transport = "websocket"`.
struct WsFirst {
    path: String,
    subprotocol: Option<&'static str>,
    /// `X-Forwarded-For`, `Forwarded` and the client's credentials, as header lines.
    fields: Vec<u8>,
    /// The client's bytes as they came: its frames, masked.
    frames: Vec<u8>,
}

impl FirstBytes {
    fn held(&self) -> usize {
        self.bytes.capacity() + self.ws.as_ref().map_or(0, |w| w.fields.capacity() + w.frames.capacity())
    }
}

/// The brokers to try, best first, and the routing key's first choice whatever its state (for
/// a pool that holds connections for a restarting broker; `None` otherwise, and for clients
/// without a routing key).
struct Route<'a> {
    candidates: Vec<&'a Arc<Backend>>,
    home: Option<&'a Arc<Backend>>,
}

impl<'a> Setup<'a> {
    /// The steps in order; a refusal, at whichever step, is carried out by [`Self::refuse`].
    /// Also returns the hash of the routing key, if one chose the broker.
    async fn run(mut self, tcp: TcpStream) -> Result<(Established, Option<u64>), CloseReason> {
        let client = match self.open(tcp).await {
            Ok(client) => client,
            Err(refused) => return Err(self.refuse(None, refused).await),
        };
        let (mut client, first) = self.upgrade(client).await;
        let first = match first {
            Ok(first) => first,
            Err(refused) => return Err(self.refuse(Some(&mut client), refused).await),
        };
        match self.reach_broker(&mut client, first).await {
            Ok((upstream, active)) => Ok((Established { client, upstream, _active: active }, self.key_hash)),
            Err(refused) => Err(self.refuse(Some(&mut client), refused).await),
        }
    }

    /// The client's stream, from a client admitted: read PROXY header, admit, handshake.
    async fn open(&mut self, mut tcp: TcpStream) -> Result<Client, Refused> {
        let pre = self.read_proxy_header(&mut tcp).await?;
        self.admit().await?;
        self.handshake(Prefixed::new(pre, tcp)).await
    }

    /// A broker that answered the CONNECT: read CONNECT, admit its client-id, route, first
    /// bytes, dial.
    async fn reach_broker(
        &mut self,
        client: &mut Client,
        first: Option<FirstRead>,
    ) -> Result<(TcpStream, ActiveGuard), Refused> {
        let (buf, charge) = self.read_connect(client, first).await?;
        let Ok(Peek::Complete { connect, len }) = mqtt::peek_connect(&buf, self.snap.limits.max_connect_packet) else {
            return Err(Refused::close(CloseReason::Malformed)); // unreachable: read_connect returned a complete packet
        };
        self.note_connect(&connect, len);
        self.admit_client_id(&connect)?;
        let route = self.route(&connect)?;
        let version = connect.version;
        let frames = self.client_frames(client, version)?;
        // Bytes pipelined behind the CONNECT go to the broker with it, and may end inside a
        // packet: the relay's tracking of the client's packets starts after them.
        self.up_at.advance(&buf[len..]);
        let first = self.first_bytes(&connect, &buf, len, charge, frames)?;
        drop(buf);
        let dialled = self.dial(route, first, version, client).await?;
        self.answer_assigned(client).await?;
        Ok(dialled)
    }

    /// With an assigned client-id: the broker's first packet, read whole by the dial, goes to
    /// the client now, a successful CONNACK with Assigned Client Identifier added. The relay
    /// then starts on the broker's stream after it, at a packet boundary.
    async fn answer_assigned(&mut self, client: &mut Client) -> Result<(), Refused> {
        let Some(id) = self.assigned.as_deref() else {
            return Ok(());
        };
        let answer = std::mem::take(&mut self.broker_answer);
        let out = match rewrite::assign_in_connack(&answer, id.as_bytes(), MAX_BROKER_ANSWER + 64) {
            Ok(Some(patched)) => patched,
            Ok(None) => answer,
            Err(e) => return Err(Refused::close(CloseReason::Relayed(Ended::BrokerError)).detail(e.to_string())),
        };
        let written = tokio::time::timeout_at(self.deadline.max(tokio::time::Instant::now() + ANSWER_WRITE), async {
            client.write_all(&out).await?;
            client.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {
                // Counted as relayed here rather than in the relaying task, which it would grow.
                self.facts.down = out.len() as u64;
                let m = &self.shared.metrics;
                m.relayed_bytes(&self.spec.name, Direction::BrokerToClient).inc_by(self.facts.down);
                Ok(())
            }
            Ok(Err(e)) => {
                Err(Refused::close(CloseReason::Relayed(Ended::ClientError)).detail(format!("writing CONNACK: {e}")))
            }
            Err(_) => Err(Refused::close(CloseReason::Relayed(Ended::ClientError)).detail("writing CONNACK timed out")),
        }
    }

    /// With `backend_transport = "websocket"`, the client's frames as they came, relayed
    /// untouched from now on; such a pool serves only WebSocket clients. A pool that unwraps
    /// frames frees what was kept of them.
    fn client_frames(&mut self, client: &mut Client, version: MqttVersion) -> Result<Option<Vec<u8>>, Refused> {
        let pool = self.pool;
        let ws = matches!(pool.backend_transport, BackendTransport::WebSocket { .. });
        let unavailable = |detail: String| {
            Refused::unavailable(CloseReason::NoBroker, self.spec.refusal, version, Refusal::ServerUnavailable)
                .detail(detail)
        };
        match (client, ws) {
            (Client::Ws(stream), false) => {
                stream.stop_recording();
                Ok(None)
            }
            (_, false) => Ok(None),
            (Client::Ws(stream), true) => match stream.take_raw() {
                Some(frames) => {
                    if let Some(r) = self.facts.routed.as_mut() {
                        r.backend_websocket = true;
                    }
                    Ok(Some(frames))
                }
                None => Err(unavailable(format!(
                    "pool {:?} relays frames untouched, and this client's frames before the CONNECT were over {} bytes",
                    pool.name,
                    raw_cap(&self.snap.limits)
                ))),
            },
            (_, true) => Err(unavailable(format!(
                "pool {:?} has backend_transport = \"websocket\": it serves only MQTT over WebSocket clients",
                pool.name
            ))),
        }
    }

    /// The one place a refusal is carried out: its detail goes to the log line, and the client
    /// (once there is one to answer) is told what the refusal says, then closed. The step that
    /// refused has returned by then, so its CONNECT buffer and that buffer's charge to the setup
    /// budget are gone before the (bounded) polite close.
    async fn refuse(&mut self, client: Option<&mut Client>, refused: Refused) -> CloseReason {
        self.facts.detail = refused.detail;
        // No broker took a client whose frames were to be relayed untouched: harbormaster
        // answers it itself, in frames.
        let mut client = client;
        if let Some(Client::Ws(ws)) = client.as_deref_mut() {
            ws.resume_frames();
        }
        match (client, refused.answer) {
            (Some(client), Answer::Connack { version, refusal }) => {
                self.facts.connack = answer(client, version, refusal).await;
            }
            (Some(client), Answer::Http(refusal)) => {
                answer_http(client, refusal).await;
            }
            // A WebSocket client is owed a close frame whatever ended it (one already sent for
            // a protocol error is not sent again).
            (Some(client @ Client::Ws(_)), Answer::Close) => close_politely(client).await,
            _ => {}
        }
        refused.reason
    }

    /// PROXY header from an outer load balancer (`accept_proxy`): only from a trusted proxy;
    /// the addresses it carries become the client's. Returns the bytes read past it.
    async fn read_proxy_header(&mut self, tcp: &mut TcpStream) -> Result<Vec<u8>, Refused> {
        if !self.spec.accept_proxy {
            return Ok(Vec::new());
        }
        let peer = self.src.ip();
        if !self.spec.trusts(peer) {
            let detail = format!("PROXY header expected from a trusted proxy, {peer} is not one");
            return Err(Refused::close(CloseReason::UntrustedProxy).detail(detail));
        }
        match timeout_at(self.deadline, read_inbound(tcp)).await {
            Err(_) => Err(Refused::close(CloseReason::Timeout)),
            Ok(Err(e)) => Err(Refused::close(CloseReason::BadProxyHeader).detail(e.to_string())),
            Ok(Ok((header, rest))) => {
                if let Some((s, d)) = header.addrs {
                    self.src = s;
                    self.dst = d;
                    self.facts.client_addr = Some(s);
                }
                Ok(rest)
            }
        }
    }

    /// Admission: the client's address (after PROXY decoding) within its rate, then a
    /// handshake token; both refusals close before any TLS work.
    async fn admit(&self) -> Result<(), Refused> {
        let lim = &self.snap.limits.admission;
        let ip = self.src.ip();
        if !self.shared.admission.source_allowed(lim, canonical_ip(ip), Instant::now()) {
            let detail = format!("more than {} new connections per second from {ip}", lim.per_source_rate);
            return Err(Refused::close(CloseReason::SourceRate).detail(detail));
        }
        if self.spec.tls.is_some() {
            match timeout_at(self.deadline, self.shared.admission.handshake(lim)).await {
                Err(_) => return Err(Refused::close(CloseReason::Timeout)),
                Ok(Err(admission::Refused::HandshakeQueueFull)) => {
                    return Err(Refused::close(CloseReason::HandshakeQueueFull))
                }
                Ok(Err(admission::Refused::HandshakeQueueTimeout)) => {
                    return Err(Refused::close(CloseReason::HandshakeQueueTimeout))
                }
                Ok(Ok(())) => {}
            }
        }
        Ok(())
    }

    /// The TLS handshake on a TLS listener, its receive buffer charged to the setup budget
    /// until the CONNECT is complete; the identity facts are read once. A plain listener's
    /// stream passes as it is.
    async fn handshake(&mut self, stream: Prefixed<TcpStream>) -> Result<Client, Refused> {
        let Some(cfg) = &self.spec.tls else {
            return Ok(Client::Plain(stream));
        };
        let (m, listener) = (&self.shared.metrics, &self.spec.name);
        let handshake = Instant::now();
        let charge = Some((self.shared.setup_bytes.charge(), self.snap.limits.max_setup_bytes));
        let accept = TlsServerStream::accept(cfg.clone(), stream, charge);
        let tls = match timeout_at(self.deadline, accept).await {
            Err(_) => {
                m.tls_handshake_failed(listener, HandshakeFailure::Timeout);
                return Err(Refused::close(CloseReason::Timeout));
            }
            Ok(Err(e)) if OverBudget::is(&e) => {
                m.tls_handshake_failed(listener, HandshakeFailure::Error);
                let detail = self.over_budget("no room for the TLS handshake");
                return Err(Refused::close(CloseReason::SetupBytes).detail(detail));
            }
            Ok(Err(e)) => {
                let (failure, detail) = handshake_failure(&e);
                m.tls_handshake_failed(listener, failure);
                return Err(Refused::close(CloseReason::TlsHandshake).detail(detail));
            }
            Ok(Ok(tls)) => tls,
        };
        let elapsed = handshake.elapsed().as_secs_f64();
        let info = TlsInfo::from_common(tls.common(), tls.server_name());
        m.tls_handshake_done(listener, info.version, elapsed, info.resumed);
        if let Some(refused) = info.client_cert.as_ref().and_then(|c| c.cn_refused.as_ref()) {
            m.client_cn_refused(listener, refused.reason);
            // Escaped and bounded: the CN is the client's text, and must not forge log lines.
            tracing::warn!(
                target: "harbormaster::connection",
                conn_id = %self.conn_id,
                listener = %listener,
                reason = refused.reason.as_str(),
                cn = %refused.shown,
                "client certificate CN not passed on to the broker"
            );
        }
        self.facts.tls_resumed = info.resumed;
        self.facts.sni = info.sni.clone();
        self.facts.tls_version = Some(info.version);
        self.tls = Some(info);
        Ok(Client::Tls(Box::new(tls)))
    }

    /// MQTT over WebSocket (a listener with `websocket`): an HTTP upgrade request is told
    /// apart from a CONNECT by ALPN when the client sent one the listener knows (`mqtt`,
    /// `http/1.1`), otherwise by the first byte (an HTTP method's letter; a CONNECT's is 0x10). An
    /// acceptable upgrade is answered (101) and the client's stream is then read through its
    /// frames; a raw client's first bytes go on to `read_connect`, charged as they are. A
    /// listener without `websocket` reads nothing here. The client comes back whatever
    /// happens, for the refusal's answer.
    async fn upgrade(&mut self, mut client: Client) -> (Client, Result<Option<FirstRead>, Refused>) {
        let Some(ws) = &self.spec.websocket else {
            return (client, Ok(None));
        };
        let alpn = self.tls.as_ref().and_then(|t| t.alpn.as_deref());
        if alpn == Some(b"mqtt") {
            return (client, Ok(None));
        }
        let (m, listener) = (&self.shared.metrics, &self.spec.name);
        let limit = self.snap.limits.max_setup_bytes;
        let mut charge = self.shared.setup_bytes.charge();
        if !charge.grow_to(FIRST_READ, limit) {
            let detail = self.over_budget("no room for the first bytes");
            return (client, Err(Refused::close(CloseReason::SetupBytes).detail(detail)));
        }
        let mut buf = Vec::with_capacity(FIRST_READ);
        let http = alpn == Some(b"http/1.1");
        let accepted = loop {
            // An HTTP method's first letter: never a CONNECT's first byte (0x10).
            if http || buf.first().is_some_and(u8::is_ascii_uppercase) {
                match websocket::parse_upgrade(&buf, ws) {
                    Ok(Some(a)) => break a,
                    Ok(None) => {}
                    Err(e) => {
                        m.websocket_upgrade(listener, Some(e.refusal));
                        let refused = Refused {
                            reason: CloseReason::BadUpgrade,
                            detail: Some(e.detail),
                            answer: Answer::Http(e.refusal),
                        };
                        return (client, Err(refused));
                    }
                }
            } else if !buf.is_empty() {
                // Raw MQTT: the bytes read are the CONNECT's first.
                return (client, Ok(Some(FirstRead { buf, charge })));
            }
            if buf.len() == buf.capacity() {
                let to = (buf.capacity() * 2).min(websocket::MAX_UPGRADE);
                if !charge.grow_to(to, limit) {
                    let detail = self.over_budget("no room for the upgrade request");
                    return (client, Err(Refused::close(CloseReason::SetupBytes).detail(detail)));
                }
                buf.reserve_exact(to - buf.len());
            }
            match timeout_at(self.deadline, client.read_buf(&mut buf)).await {
                Err(_) if buf.is_empty() => return (client, Err(Refused::close(CloseReason::Timeout))),
                Err(_) => {
                    m.websocket_upgrade(listener, Some(UpgradeRefusal::Timeout));
                    let detail = "upgrade request not complete within connect_timeout";
                    let refused = Refused {
                        reason: CloseReason::Timeout,
                        detail: Some(detail.into()),
                        answer: Answer::Http(UpgradeRefusal::Timeout),
                    };
                    return (client, Err(refused));
                }
                Ok(Ok(0)) => {
                    let detail = if buf.is_empty() {
                        "closed before sending anything"
                    } else {
                        "closed during the upgrade request"
                    };
                    return (client, Err(Refused::close(CloseReason::ClientClosed).detail(detail)));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) if OverBudget::is(&e) => {
                    let detail = self.over_budget("no room for the TLS stream");
                    return (client, Err(Refused::close(CloseReason::SetupBytes).detail(detail)));
                }
                Ok(Err(e)) => return (client, Err(Refused::close(CloseReason::ClientClosed).detail(e.to_string()))),
            }
        };
        let sent = timeout_at(self.deadline, async {
            client.write_all(&accepted.response).await?;
            client.flush().await
        })
        .await;
        match sent {
            Err(_) => return (client, Err(Refused::close(CloseReason::Timeout))),
            Ok(Err(e)) => return (client, Err(Refused::close(CloseReason::ClientClosed).detail(e.to_string()))),
            Ok(Ok(())) => {}
        }
        m.websocket_upgrade(listener, None);
        self.facts.websocket = true;
        // The client's first frames, if they came with the request; the request itself is
        // freed with its charge.
        let pre = buf[accepted.head_len..].to_vec();
        drop(buf);
        drop(charge);
        let max = self.snap.limits.max_connect_packet as u64;
        let mut ws = Box::new(WsStream::new(client, pre, max));
        // The pool is not known before the CONNECT: when one may relay frames untouched, the
        // frames it is read from are kept as they come.
        if self.snap.pools.iter().any(|p| p.backend_transport != BackendTransport::Mqtt) {
            ws.record(raw_cap(&self.snap.limits));
            let Accepted { subprotocol, credentials, .. } = accepted;
            self.ws_client = Some(WsClient { subprotocol, credentials });
        }
        (Client::Ws(ws), Ok(None))
    }

    /// Read until a whole CONNECT is buffered, with whatever was pipelined behind it. The
    /// buffer comes with its charge to the process's setup budget, held until the CONNECT has
    /// been written to a broker.
    async fn read_connect(
        &mut self,
        client: &mut Client,
        first: Option<FirstRead>,
    ) -> Result<(Vec<u8>, SetupCharge), Refused> {
        let (buf, mut charge) = match first {
            Some(FirstRead { buf, charge }) => (buf, charge),
            None => (Vec::new(), self.shared.setup_bytes.charge()),
        };
        let read = timeout_at(self.deadline, read_until_connect(client, &self.snap.limits, &mut charge, buf)).await;
        match read {
            Err(_) => Err(Refused::close(CloseReason::Timeout)),
            Ok(Ok(buf)) => {
                client.end_setup();
                Ok((buf, charge))
            }
            Ok(Err(ReadFail::WebSocket(e))) => {
                self.shared.metrics.websocket_protocol_error(&self.spec.name, e.code);
                Err(Refused::close(CloseReason::WebSocketProtocol).detail(e.to_string()))
            }
            Ok(Err(ReadFail::Closed(detail))) => Err(Refused::close(CloseReason::ClientClosed).detail(detail)),
            Ok(Err(ReadFail::Budget(version))) => {
                // The buffer is gone; so is its charge before the (bounded) polite close.
                let held = charge.held();
                drop(charge);
                self.facts.mqtt_version = version;
                let detail = self.over_budget(&format!("this one held {held}"));
                Err(Refused::connack(CloseReason::SetupBytes, version, Refusal::QuotaExceeded).detail(detail))
            }
            Ok(Err(ReadFail::Mqtt(e))) => Err(refusal_for(&e).detail(e.to_string())),
        }
    }

    /// The CONNECT's facts for the log line and its metrics.
    fn note_connect(&mut self, connect: &Connect<'_>, len: usize) {
        self.facts.mqtt_version = Some(connect.version);
        self.facts.bridge = connect.bridge;
        self.facts.client_id = Some(String::from_utf8_lossy(connect.client_id).into_owned());
        let since_accept = self.started.elapsed().as_secs_f64();
        self.shared.metrics.connect_read(&self.spec.name, connect.version, len, since_accept);
    }

    /// A client-id that reconnects in a loop is refused for a while: counted per listener and
    /// verified certificate, so a client without one cannot get a device with one refused.
    fn admit_client_id(&self, connect: &Connect<'_>) -> Result<(), Refused> {
        let cert_sha256 = self.tls.as_ref().and_then(|t| t.client_cert.as_ref()).map(|c| &c.sha256);
        let who = admission::Claimant { listener: &self.spec.name, cert_sha256 };
        if self.shared.admission.connect_allowed(&self.snap.limits.admission, who, connect.client_id, Instant::now()) {
            return Ok(());
        }
        let detail = match cert_sha256 {
            Some(_) => "client-id reconnecting too often with this client certificate (flapping)",
            None => "client-id reconnecting too often without a client certificate on this listener (flapping)",
        };
        let refused =
            Refused::unavailable(CloseReason::Flapping, self.spec.refusal, connect.version, Refusal::RateExceeded);
        Err(refused.detail(detail))
    }

    /// Notes how long the connection was held for its broker and how that ended (for its log
    /// line). Kept with the routing facts, boxed: holding is rare, the facts live in every task.
    fn note_held(&mut self, ms: u32, outcome: HoldOutcome) {
        if let Some(routed) = self.facts.routed.as_mut() {
            routed.held = Some((ms, outcome));
        }
    }

    /// The brokers to try, best first: the pool of the first routing rule that matches (the
    /// listener's own otherwise), then in it the routing key's rendezvous order, or what
    /// `empty_client_id` says for a client without a key; and, in a pool that holds, the key's
    /// first choice. Remembers the key's hash: rebalancing finds the connection's home by it.
    fn route(&mut self, connect: &Connect<'_>) -> Result<Route<'a>, Refused> {
        let rule = if self.spec.routes.is_empty() { None } else { self.pick_pool(connect)? };
        self.facts.routed = Some(Box::new(Routed {
            rule,
            pool: Arc::clone(self.pool),
            rewrite: None,
            held: None,
            backend_websocket: false,
        }));
        let pool = self.pool;
        let key: Option<&[u8]> = match pool.hash_key {
            HashKey::ClientId => Some(connect.client_id),
            HashKey::Username => connect.username,
            HashKey::CertCn => {
                self.tls.as_ref().and_then(|t| t.client_cert.as_ref()).and_then(|c| c.cn.as_deref()).map(str::as_bytes)
            }
        }
        .filter(|k| !k.is_empty());
        let source_key;
        let key = match (key, pool.empty_key) {
            (None, EmptyKey::SourceAddress) => {
                source_key = canonical_ip(self.src.ip()).to_string();
                Some(source_key.as_bytes())
            }
            // Only MQTT 5 can tell the client its id; the assigned id is the routing key, so a
            // resume with it finds the broker that holds the session.
            (None, EmptyKey::Assign) if connect.version == MqttVersion::V5 && connect.client_id.is_empty() => {
                let id = assigned_client_id();
                self.facts.client_id = Some(id.clone());
                Some(self.assigned.insert(id).as_bytes())
            }
            // A 3.1/3.1.1 client cannot learn an assigned id (no CONNACK properties): routed by
            // its address instead, the same broker from every replica.
            (None, EmptyKey::Assign) => {
                source_key = canonical_ip(self.src.ip()).to_string();
                Some(source_key.as_bytes())
            }
            (key, _) => key,
        };
        let home = key.filter(|_| pool.hold.is_some()).and_then(|k| pool.preference(k, 1).first().copied());
        self.key_hash = key.map(key_hash);
        let candidates = match self.key_hash {
            Some(h) => pool.candidates_by_hash(h, pool.backend_attempts),
            None => match pool.empty_key {
                EmptyKey::Reject => {
                    let refused =
                        Refused::connack(CloseReason::EmptyClientId, Some(connect.version), Refusal::ClientIdRejected);
                    return Err(refused.detail("no routing key and empty_client_id = reject"));
                }
                // `source_address` and `assign` always have a key: the client's address, or
                // the assigned id, above.
                EmptyKey::LeastConnections | EmptyKey::SourceAddress | EmptyKey::Assign => {
                    pool.least_connections(pool.backend_attempts)
                }
            },
        };
        Ok(Route { candidates, home })
    }

    /// The listener's routing rules, evaluated once, now that every fact they read is known:
    /// the first that matches names the pool. Returns the index of the rule that matched.
    fn pick_pool(&mut self, connect: &Connect<'_>) -> Result<Option<u16>, Refused> {
        let tls = self.tls.as_ref();
        let cert = tls.and_then(|t| t.client_cert.as_ref());
        let input = routing::RouteInput {
            sni: tls.and_then(|t| t.sni.as_deref()),
            alpn: tls.and_then(|t| t.alpn.as_deref()),
            cert_cn: cert.and_then(|c| c.cn.as_deref()),
            cert_issuer_cn: cert.and_then(|c| c.issuer_cn.as_deref()),
            username: connect.username,
            client_id: connect.client_id,
            source: Some(self.src.ip()),
        };
        let spec: &'a ListenerSpec = self.spec;
        let Some((i, rule)) = routing::first_match(&spec.routes, &input) else {
            return Ok(None);
        };
        match self.snap.pool(&rule.pool) {
            Some(pool) => {
                self.pool = pool;
                Ok(u16::try_from(i).ok())
            }
            None => Err(Refused::close(CloseReason::NoPool).detail(format!("route[{i}]: no pool {:?}", rule.pool))),
        }
    }

    /// The CONNECT (`packet`) as the pool's `connect` policy rewrites it, or `None` when the
    /// policy changes nothing; a CONNECT it cannot rewrite is refused before any broker sees it.
    fn rewrite_connect(&mut self, connect: &Connect<'_>, packet: &[u8]) -> Result<Option<Vec<u8>>, Refused> {
        let policy = &self.pool.connect;
        if policy.is_identity(connect.version) {
            return Ok(None);
        }
        let tls = self.tls.as_ref();
        let cert = tls.and_then(|t| t.client_cert.as_ref());
        let facts = rewrite::Facts {
            cert_cn: cert.and_then(|c| c.cn.as_deref()),
            cert_issuer_cn: cert.and_then(|c| c.issuer_cn.as_deref()),
            cert_sha256: cert.map(|c| &c.sha256),
            sni: tls.and_then(|t| t.sni.as_deref()),
            alpn: tls.and_then(|t| t.alpn.as_deref()),
            tls_version: tls.map(|t| t.version),
            client_address: self.src,
            client_id: self.assigned.as_deref().map_or(connect.client_id, str::as_bytes),
            username: connect.username,
        };
        let limit = self.connect_limit();
        match rewrite::rewrite(packet, connect.version, policy, &facts, limit.bytes) {
            Ok(None) => Ok(None),
            Ok(Some(r)) => {
                if let Some(routed) = self.facts.routed.as_mut() {
                    routed.rewrite = Some(r.summary);
                }
                Ok(Some(r.packet))
            }
            Err(e) => Err(self.rewrite_refused(e, connect.version, packet.len(), &limit)),
        }
    }

    /// The largest CONNECT the pool's brokers are sent: `limits.max_connect_packet`, or the
    /// pool's `backend_max_packet_size` when that is not larger. A broker declares its Maximum
    /// Packet Size only in its CONNACK, after the CONNECT: too late to go by.
    fn connect_limit(&self) -> ConnectLimit {
        let max_connect_packet = self.snap.limits.max_connect_packet;
        match self.pool.backend_max_packet_size {
            Some(brokers) if brokers <= max_connect_packet => ConnectLimit { bytes: brokers, brokers: true },
            _ => ConnectLimit { bytes: max_connect_packet, brokers: false },
        }
    }

    /// The refusal of a CONNECT that the pool's changes (its `connect` policy, an assigned
    /// client-id) cannot be made to, before any broker sees it: a fact the username needs and
    /// the connection lacks, or a username or User Property value MQTT cannot carry or brokers
    /// refuse, is "bad user name or password"; a result over the limit is "packet too large"
    /// (3.x has no such CONNACK: a close). The client's own CONNECT (`sent` bytes) already
    /// over the limit is `connect_too_large`, not the rewrite's doing.
    fn rewrite_refused(
        &self,
        e: rewrite::RewriteError,
        version: MqttVersion,
        sent: usize,
        limit: &ConnectLimit,
    ) -> Refused {
        use rewrite::RewriteError as E;
        let (reason, refusal, detail) = match e {
            E::Missing(rewrite::Fact::CertCn) => {
                // A certificate whose CN was not passed on (identity.rs) is not "no CN": say so.
                let why = self.tls.as_ref().and_then(|t| t.client_cert.as_ref()).and_then(|c| c.cn_refused.as_ref());
                let detail = match why {
                    Some(r) => format!("{e}: the client certificate's CN is not passed on ({})", r.reason.as_str()),
                    None => e.to_string(),
                };
                (CloseReason::ConnectRewrite, Refusal::BadCredentials, detail)
            }
            E::Missing(_) | E::BadUsername(_) | E::BadProperty(..) => {
                (CloseReason::ConnectRewrite, Refusal::BadCredentials, e.to_string())
            }
            E::TooLarge { len, max } if max == limit.bytes => {
                let limit = limit.describe(&self.pool.name);
                if sent > max {
                    let detail = format!("the CONNECT of {sent} bytes (rewritten: {len}) exceeds {limit}");
                    (CloseReason::TooLarge, Refusal::PacketTooLarge, detail)
                } else {
                    let detail = format!("the rewritten CONNECT of {len} bytes exceeds {limit}");
                    (CloseReason::ConnectRewrite, Refusal::PacketTooLarge, detail)
                }
            }
            E::TooLarge { .. } => (CloseReason::ConnectRewrite, Refusal::PacketTooLarge, e.to_string()),
            E::Malformed(_) => (CloseReason::Malformed, Refusal::Malformed, e.to_string()),
        };
        Refused::connack(reason, Some(version), refusal).detail(detail)
    }

    /// PROXY header, then the CONNECT (rewritten by the pool's `connect` policy) and whatever
    /// was pipelined behind it (`buf[len..]`): the same bytes for every broker tried. They take
    /// the CONNECT buffer's place in the setup budget.
    fn first_bytes(
        &mut self,
        connect: &Connect<'_>,
        buf: &[u8],
        len: usize,
        charge: SetupCharge,
        frames: Option<Vec<u8>>,
    ) -> Result<FirstBytes, Refused> {
        let (packet, pipelined) = buf.split_at(len);
        let mut rewritten = self.rewrite_connect(connect, packet)?;
        let limit = self.connect_limit();
        if let Some(id) = &self.assigned {
            let max = limit.bytes;
            match rewrite::set_client_id(rewritten.as_deref().unwrap_or(packet), connect.version, id.as_bytes(), max) {
                Ok(p) => rewritten = Some(p),
                Err(e) => return Err(self.rewrite_refused(e, connect.version, packet.len(), &limit)),
            }
            if let Some(routed) = self.facts.routed.as_mut() {
                let summary = routed.rewrite.get_or_insert_with(String::new);
                rewrite::sep(summary);
                summary.push_str("client_id assigned");
            }
        }
        if rewritten.is_none() && packet.len() > limit.bytes {
            // The client's own CONNECT, over the brokers' limit (it is within
            // max_connect_packet, or it would not have been read): refused here, since a
            // broker closes on it without a CONNACK, which would be a failed dial of every
            // candidate (and count against them in passive health) and end as "server
            // unavailable".
            let detail = format!("the CONNECT of {} bytes exceeds {}", packet.len(), limit.describe(&self.pool.name));
            return Err(
                Refused::connack(CloseReason::TooLarge, Some(connect.version), Refusal::PacketTooLarge).detail(detail)
            );
        }
        let packet = rewritten.as_deref().unwrap_or(packet);
        let pool = self.pool;
        let mut first = match pool.proxy_protocol {
            ProxyProtocol::None => Vec::new(),
            ProxyProtocol::V1 => proxy_header::encode_v1(self.src, self.dst),
            ProxyProtocol::V2 => {
                let input = HeaderInput {
                    src: self.src,
                    dst: self.dst,
                    tls: self.tls.as_ref(),
                    unique_id: self.conn_id.as_bytes(),
                    client_id: self.assigned.as_deref().map_or(connect.client_id, str::as_bytes),
                };
                let enc = proxy_header::encode_v2(&input, &pool.tlvs, pool.max_header_bytes);
                for t in &enc.dropped {
                    self.shared.metrics.proxy_tlv_dropped(&pool.name, *t);
                }
                enc.bytes
            }
        };
        let ws = match (frames, &pool.backend_transport) {
            (Some(frames), BackendTransport::WebSocket { path }) => {
                self.facts.up = frames.len() as u64;
                let client = self.ws_client.take();
                let mut fields = forwarding_fields(self.src, self.spec.tls.is_some());
                if let Some(c) = &client {
                    fields.extend_from_slice(&c.credentials);
                }
                Some(WsFirst { path: path.clone(), subprotocol: client.and_then(|c| c.subprotocol), fields, frames })
            }
            _ => {
                first.reserve_exact(packet.len() + pipelined.len());
                first.extend_from_slice(packet);
                first.extend_from_slice(pipelined);
                self.facts.up = buf.len() as u64;
                None
            }
        };
        let mut first = FirstBytes { bytes: first, ws, charge };
        // Already decided on: the copy is charged whatever the total.
        first.charge.set(first.held());
        // Nothing after this reads the identity.
        self.tls = None;
        Ok(first)
    }

    /// Dial the candidates in preference order until a broker answers the CONNECT; the
    /// connection is then counted on that broker. In a pool that holds, the key's first choice
    /// comes first, and is waited for while it restarts ([`Self::hold`]). `version` is the
    /// client's, for the CONNACK when none answers.
    async fn dial(
        &mut self,
        route: Route<'a>,
        mut first: FirstBytes,
        version: MqttVersion,
        client: &mut Client,
    ) -> Result<(TcpStream, ActiveGuard), Refused> {
        let (m, pool) = (&self.shared.metrics, self.pool);
        let mut errors = Vec::new();
        let mut candidates = route.candidates;
        let mut broker = None;
        if let (Some(hold), Some(home)) = (pool.hold, route.home) {
            broker = self.hold(hold, home, &mut candidates, &mut first, client, &mut errors).await?;
        }
        if broker.is_none() {
            for b in candidates {
                if let Some(s) = self.try_dial(b, &first, &mut errors).await {
                    broker = Some((b.clone(), s));
                    break;
                }
            }
        }
        drop(first);
        let Some((backend, (upstream, early))) = broker else {
            let refused =
                Refused::unavailable(CloseReason::NoBroker, self.spec.refusal, version, Refusal::ServerUnavailable);
            return Err(refused.detail(errors.join("; ")));
        };
        if !errors.is_empty() {
            // Dials that failed while the connection was held for its broker are no failover
            // when that broker took it in the end.
            if self.facts.routed.as_ref().and_then(|r| r.held).is_some_and(|(_, o)| o == HoldOutcome::Home) {
                self.facts.detail = Some(format!("held for its broker: {}", errors.join("; ")));
            } else {
                self.facts.detail = Some(format!("failed over: {}", errors.join("; ")));
                m.failed_over(&pool.name);
            }
        }
        if self.assigned.is_some() {
            // The broker's first packet, read whole: it reaches the client with the assigned
            // client-id added (`answer_assigned`).
            self.broker_answer = early;
        } else if !early.is_empty() {
            // The broker's first frames came with its 101: the client's, untouched.
            let wrote = tokio::time::timeout(pool.backend_connack_timeout, async {
                client.write_all(&early).await?;
                client.flush().await
            })
            .await;
            if !matches!(wrote, Ok(Ok(()))) {
                return Err(Refused::close(CloseReason::ClientClosed).detail("the client left as its broker answered"));
            }
        }
        backend.active.fetch_add(1, Ordering::Relaxed);
        backend.total.fetch_add(1, Ordering::Relaxed);
        let active = ActiveGuard(backend);
        let backend = &active.0;
        self.facts.broker = Some(backend.name.clone());
        m.connection_routed(&pool.name, &backend.name, pool.proxy_protocol, self.started.elapsed().as_secs_f64());
        Ok((upstream, active))
    }

    /// One dial of `b`, recorded (outcome metric, passive health, last error); a failure's
    /// text joins `errors`.
    async fn try_dial(
        &self,
        b: &Backend,
        first: &FirstBytes,
        errors: &mut Vec<String>,
    ) -> Option<(TcpStream, Vec<u8>)> {
        let (m, pool) = (&self.shared.metrics, self.pool);
        match attempt(m, pool, b, first, self.assigned.is_some()).await {
            Ok(s) => {
                m.dial_attempt(&pool.name, &b.name, DialOutcome::Ok);
                b.record_dial(true, pool.passive_fall());
                Some(s)
            }
            Err((outcome, error)) => {
                m.dial_attempt(&pool.name, &b.name, outcome);
                b.set_last_error(&error);
                if b.record_dial(false, pool.passive_fall()) {
                    marked_down(m, pool, b, &error);
                }
                errors.push(format!("{}: {error}", b.name));
                None
            }
        }
    }

    /// `on_backend_restart = "hold"`: the key's first choice, `home`, is dialled first and, while
    /// it restarts, waited for instead of failing over — until `hold_timeout` after it went
    /// down or away (marked down, or drained by discovery), or after the failed dial of a
    /// broker still marked up. Returns the broker that answered, or `None` to fail over to the
    /// other `candidates` (from which `home` is then gone). The wait sleeps on the broker's
    /// wake-up (marked up, back in rotation) and on the client: a client that leaves ends it,
    /// bytes it sends meanwhile join `first`. A broker marked up that still refuses (its checks
    /// have not seen it down yet, or the pool has none) is dialled again every [`HOLD_RETRY`].
    async fn hold(
        &mut self,
        hold: Hold,
        home: &'a Arc<Backend>,
        candidates: &mut Vec<&'a Arc<Backend>>,
        first: &mut FirstBytes,
        client: &mut Client,
        errors: &mut Vec<String>,
    ) -> Result<Option<(Arc<Backend>, (TcpStream, Vec<u8>))>, Refused> {
        let (m, pool) = (&self.shared.metrics, self.pool);
        let until = match home.away_since() {
            Some(since) => since + hold.timeout,
            None if home.usable() => {
                candidates.retain(|c| !Arc::ptr_eq(c, home));
                if let Some(s) = self.try_dial(home, first, errors).await {
                    return Ok(Some((home.clone(), s)));
                }
                // Probably restarting; if this dial marked it down, that is when it went.
                home.away_since().unwrap_or_else(Instant::now) + hold.timeout
            }
            // Drained by an operator: its clients move.
            None => return Ok(None),
        };
        candidates.retain(|c| !Arc::ptr_eq(c, home));
        if until <= Instant::now() {
            return Ok(None);
        }
        let Some(place) = self.shared.holds.enter(m, &pool.name, hold.max) else {
            self.note_held(0, HoldOutcome::OverCap);
            return Ok(None);
        };
        // Until the hold ends (a drain may drop this future while it waits): closed.
        self.note_held(0, HoldOutcome::Closed);
        let began = Instant::now();
        let mut scratch = [0u8; 256];
        // Bytes a client sends while held (it may pipeline behind its CONNECT) are read, up to a
        // bound, so that its leaving is seen; past the bound it is no longer watched.
        let mut watching = true;
        let mut dialled = false;
        let ended = loop {
            let back = home.back();
            tokio::pin!(back);
            back.as_mut().enable();
            if home.usable() && !dialled {
                if let Some(s) = self.try_dial(home, first, errors).await {
                    break Ok(Some((home.clone(), s)));
                }
                dialled = true;
            }
            let now = Instant::now();
            if now >= until {
                break Ok(None);
            }
            let wake = if home.usable() { until.min(now + HOLD_RETRY) } else { until };
            tokio::select! {
                _ = back => dialled = false,
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => dialled = false,
                read = client.read(&mut scratch), if watching => match read {
                    Ok(0) | Err(_) => {
                        break Err(Refused::close(CloseReason::ClientClosed)
                            .detail(format!("the client left while held for {}", home.name)));
                    }
                    Ok(n) => {
                        let more = &scratch[..n];
                        self.up_at.advance(more);
                        self.facts.up += n as u64;
                        // Untouched frames follow the client's first ones.
                        let to = match first.ws.as_mut() {
                            Some(ws) => &mut ws.frames,
                            None => &mut first.bytes,
                        };
                        to.extend_from_slice(more);
                        watching = to.len() < HOLD_READ_MAX;
                        first.charge.set(first.held());
                    }
                },
            }
        };
        let outcome = match &ended {
            Ok(Some(_)) => HoldOutcome::Home,
            Ok(None) => HoldOutcome::Failover,
            Err(_) => HoldOutcome::Closed,
        };
        let held_ms = u32::try_from(began.elapsed().as_millis()).unwrap_or(u32::MAX);
        self.note_held(held_ms, outcome);
        place.end(outcome);
        ended
    }

    /// The log's detail of a connection closed because setup buffers hold `max_setup_bytes`.
    fn over_budget(&self, what: &str) -> String {
        format!(
            "connections in setup hold {} bytes; max_setup_bytes is {} ({what})",
            self.shared.setup_bytes.used(),
            self.snap.limits.max_setup_bytes
        )
    }
}

/// The `tls_handshakes_total` outcome and the log's detail of a failed handshake. A client
/// certificate found in a revocation list is told apart (outcome `revoked`): an operator
/// watching a revoked device knocking sees it, and a surge of them is not mistaken for
/// scanners or broken clients. A status the lists cannot establish is named as such.
fn handshake_failure(e: &io::Error) -> (HandshakeFailure, String) {
    use rustls::{CertificateError, Error};
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(CertificateError::Revoked)) => (
            HandshakeFailure::Revoked,
            "client certificate revoked: it is listed in the listener's client_crl".to_string(),
        ),
        Some(Error::InvalidCertificate(CertificateError::UnknownRevocationStatus)) => (
            HandshakeFailure::Error,
            "client certificate refused: its revocation status is unknown (no list from its issuer in client_crl)"
                .to_string(),
        ),
        _ => (HandshakeFailure::Error, e.to_string()),
    }
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
    /// A WebSocket client's frames broke the protocol (its close frame is sent).
    WebSocket(FrameError),
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
/// The buffer is charged to `charge` before it is allocated or grown; `buf` holds the bytes
/// already read (and charged) when the first bytes told raw MQTT from WebSocket.
async fn read_until_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    limits: &super::snapshot::Limits,
    charge: &mut SetupCharge,
    mut buf: Vec<u8>,
) -> Result<Vec<u8>, ReadFail> {
    if buf.capacity() == 0 {
        if !charge.grow_to(FIRST_READ, limits.max_setup_bytes) {
            return Err(ReadFail::Budget(None));
        }
        buf = Vec::with_capacity(FIRST_READ);
    }
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
            Err(e) => match FrameError::of(&e) {
                Some(f) => return Err(ReadFail::WebSocket(f)),
                None => return Err(ReadFail::Closed(e.to_string())),
            },
        }
    }
}

/// The refusal of a first packet that cannot be accepted: its reason, and the CONNACK if any.
fn refusal_for(e: &ConnectError) -> Refused {
    let (reason, version, refusal) = match *e {
        ConnectError::NotConnect(_) => (CloseReason::NotConnect, None, Refusal::Malformed),
        ConnectError::Malformed { version, .. } => (CloseReason::Malformed, version, Refusal::Malformed),
        ConnectError::TooLarge { version, .. } => (CloseReason::TooLarge, version, Refusal::PacketTooLarge),
        // Refused before any broker is dialled: a broker may close without a CONNACK on such
        // strings, and that close would count against it in passive health.
        ConnectError::BadString { field: StringField::ClientId, version, .. } => {
            (CloseReason::Malformed, Some(version), Refusal::ClientIdRejected)
        }
        ConnectError::BadString { version, .. } => (CloseReason::Malformed, Some(version), Refusal::Malformed),
        // A level-5 CONNECT with a wrong name (or with the bridge bit, which 5.0 lacks) reads
        // the 5.0 CONNACK layout; every other level gets the 3.x one, as Mosquitto answers: a
        // client of an unknown version is most likely to understand the oldest, simplest CONNACK.
        ConnectError::UnsupportedProtocol { level } => {
            let v = if level & 0x7f == 5 { MqttVersion::V5 } else { MqttVersion::V311 };
            (CloseReason::UnsupportedProtocol, Some(v), Refusal::UnsupportedProtocol)
        }
    };
    // Without a version there is no CONNACK to send, whatever the refusal: a polite close.
    Refused::connack(reason, version, refusal)
}

/// Answer a refusal the way the client's MQTT version understands, then close politely.
/// Returns the CONNACK code sent, if any.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    version: Option<MqttVersion>,
    refusal: Refusal,
) -> Option<u8> {
    let packet = version.and_then(|v| mqtt::connack(v, refusal));
    if let Some(packet) = packet {
        let _ = stream.write_all(packet).await;
    }
    close_politely(stream).await;
    // Both CONNACK layouts carry the return/reason code in their fourth byte.
    packet.and_then(|p| p.get(3).copied())
}

/// Answer a refused WebSocket upgrade with its HTTP status, then close politely (as
/// [`answer`] does).
async fn answer_http<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, refusal: UpgradeRefusal) {
    let _ = stream.write_all(refusal.response()).await;
    close_politely(stream).await;
}

/// Flush, shut the write side down, then read what the client still sends until it closes,
/// so the close is a FIN after our answer and not a reset that could destroy it; bounded in
/// time and bytes.
async fn close_politely<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
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
}

/// Failed dials marked a broker down (passive health checking); the checker's probes bring
/// it back.
fn marked_down(m: &Metrics, pool: &Pool, b: &Backend, error: &str) {
    let reason = format!("{} failures in a row, last: dial: {error}", b.failure_streak());
    broker::report_transition(m, &pool.name, b, Transition::Down, &reason);
}

/// One broker: TCP connect within `backend_connect_timeout`, then `first` (PROXY header and
/// CONNECT), then its first byte within `backend_connack_timeout`. Peeking, not reading,
/// leaves the answer (CONNACK, or an AUTH exchange) to the relay, so the broker's bytes reach
/// the client untouched; a close or reset before any byte is a failed dial like a refused
/// connect (a broker that accepts and drops connections: overloaded, or not speaking MQTT).
/// With `backend_transport = "websocket"` the upgrade request follows the PROXY header, and
/// the broker's 101 is read and checked before the client's frames are sent (its other
/// answers are failed dials); bytes that came with the 101 are returned, for the client.
/// Nothing has been sent to the client yet, so a broker that fails any step can be replaced
/// by the next. The error is an outcome of `broker_connect_attempts_total` and a text for
/// logs.
///
/// With `whole` (an assigned client-id to add to the CONNACK) the broker's first packet is read
/// whole instead of peeked, up to [`MAX_BROKER_ANSWER`] bytes and within the same time, and
/// returned; one that is larger or cut short is a failed dial.
async fn attempt(
    m: &Metrics,
    pool: &Pool,
    b: &Backend,
    first: &FirstBytes,
    whole: bool,
) -> Result<(TcpStream, Vec<u8>), (DialOutcome, String)> {
    let key = first.ws.as_ref().map(|_| websocket::fresh_key());
    let upgrade;
    let head: &[u8] = match (&first.ws, &key) {
        (Some(ws), Some(key)) => {
            let mut h = first.bytes.clone();
            let host = b.addr.to_string();
            h.extend(websocket::broker_request(&ws.path, &host, key, ws.subprotocol, &ws.fields));
            upgrade = h;
            &upgrade
        }
        _ => &first.bytes,
    };
    let dial = Instant::now();
    let (mut s, sent) = match tokio::time::timeout(pool.backend_connect_timeout, connect_sending(b.addr, head)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err((DialOutcome::of(&e), e.to_string())),
        Err(_) => return Err((DialOutcome::Timeout, "timed out".to_string())),
    };
    let elapsed = dial.elapsed().as_secs_f64();
    m.broker_connected(&pool.name, &b.name, elapsed);
    let answered = tokio::time::timeout(pool.backend_connack_timeout, async {
        s.write_all(&head[sent..]).await.map_err(|e| (DialOutcome::of(&e), format!("writing CONNECT: {e}")))?;
        let mut early = Vec::new();
        if let (Some(ws), Some(key)) = (&first.ws, &key) {
            early = read_upgrade_answer(&mut s, key, ws.subprotocol).await?;
            s.write_all(&ws.frames)
                .await
                .map_err(|e| (DialOutcome::of(&e), format!("writing the client's frames: {e}")))?;
            if !early.is_empty() {
                return Ok((1, early));
            }
        }
        let n =
            s.peek(&mut [0u8; 1]).await.map_err(|e| (DialOutcome::of(&e), format!("before answering CONNECT: {e}")))?;
        Ok((n, early))
    })
    .await;
    match answered {
        Ok(Ok((0, _))) => Err((DialOutcome::Closed, "closed the connection before answering CONNECT".to_string())),
        Ok(Ok(_)) if whole => {
            let read = tokio::time::timeout(pool.backend_connack_timeout, read_packet(&mut s)).await;
            match read {
                Ok(Ok(answer)) => Ok((s, answer)),
                Ok(Err(e)) => Err((DialOutcome::of(&e), format!("reading the answer to CONNECT: {e}"))),
                Err(_) => Err((
                    DialOutcome::ConnackTimeout,
                    format!("the answer to CONNECT not whole within {:?}", pool.backend_connack_timeout),
                )),
            }
        }
        Ok(Ok((_, early))) => Ok((s, early)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err((
            DialOutcome::ConnackTimeout,
            format!("no answer to CONNECT within {:?}", pool.backend_connack_timeout),
        )),
    }
}

/// The largest first packet from a broker read whole (a CONNACK is a few dozen bytes; its
/// Reason String and User Properties may add some).
const MAX_BROKER_ANSWER: usize = 16 * 1024;

/// How long the CONNACK with an assigned client-id may take to reach a client at least, when
/// little of `connect_timeout` is left.
const ANSWER_WRITE: Duration = Duration::from_secs(5);

/// One whole MQTT packet from `s`, of at most [`MAX_BROKER_ANSWER`] bytes; nothing past it is
/// read, so the relay starts at the broker's next packet.
async fn read_packet(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(64);
    // The fixed header: type byte and a remaining length of up to 4 bytes, read a byte at a
    // time so that nothing beyond the packet is taken.
    loop {
        if let Some(total) = mqtt::announced_len(&buf) {
            if total > MAX_BROKER_ANSWER {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a first packet of {total} bytes, over {MAX_BROKER_ANSWER}"),
                ));
            }
            let start = buf.len();
            buf.resize(total, 0);
            s.read_exact(&mut buf[start..]).await?;
            return Ok(buf);
        }
        if buf.len() >= 5 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not an MQTT fixed header"));
        }
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte).await?;
        buf.push(byte[0]);
    }
}

/// A client-id for an MQTT 5 client that sent none: `hm-` and 128 random bits in 26 base32
/// characters (`[a-z2-7]`), 29 characters in all. Random rather than counted, so replicas
/// need no coordination: two ids collide with probability 2^-64 only after ~2^64 of them.
pub fn assigned_client_id() -> String {
    let mut bits = [0u8; 16];
    // The system's random source failing is not something to serve connections on.
    #[allow(clippy::expect_used)]
    aws_lc_rs::rand::fill(&mut bits).expect("the system random source");
    encode_assigned(&bits)
}

fn encode_assigned(bits: &[u8; 16]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let n = u128::from_be_bytes(*bits);
    let mut out = String::with_capacity(29);
    out.push_str("hm-");
    for i in (0..26).rev() {
        out.push(ALPHABET[((n >> (i * 5)) & 31) as usize] as char);
    }
    out
}

/// Read a broker's answer to the upgrade request (bounded by [`websocket::MAX_UPGRADE`]);
/// returns the bytes that came after it. Anything but an acceptable 101 is a failed dial.
async fn read_upgrade_answer(
    s: &mut TcpStream,
    key: &str,
    subprotocol: Option<&str>,
) -> Result<Vec<u8>, (DialOutcome, String)> {
    let mut buf = Vec::with_capacity(512);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve_exact((buf.capacity() * 2).min(websocket::MAX_UPGRADE) - buf.len());
        }
        match s.read_buf(&mut buf).await {
            Ok(0) => return Err((DialOutcome::Closed, "closed the connection before answering the upgrade".into())),
            Ok(_) => {}
            Err(e) => return Err((DialOutcome::of(&e), format!("before answering the upgrade: {e}"))),
        }
        match websocket::check_broker_response(&buf, key, subprotocol) {
            Ok(None) => {}
            Ok(Some(len)) => return Ok(buf.split_off(len)),
            Err(e) => return Err((DialOutcome::Error, e)),
        }
    }
}

/// `X-Forwarded-For` and `Forwarded` (RFC 7239) for a broker's WebSocket listener: the
/// client's address (after an inbound PROXY header), and whether it came over TLS.
fn forwarding_fields(client: SocketAddr, tls: bool) -> Vec<u8> {
    let ip = canonical_ip(client.ip());
    let node = match ip {
        std::net::IpAddr::V4(v4) => format!("{v4}:{}", client.port()),
        std::net::IpAddr::V6(v6) => format!("[{v6}]:{}", client.port()),
    };
    let proto = if tls { "https" } else { "http" };
    format!("X-Forwarded-For: {ip}\r\nForwarded: for=\"{node}\";proto={proto}\r\n").into_bytes()
}

/// What a WebSocket client may send before its CONNECT is read, kept for a pool that relays
/// frames untouched: the CONNECT's limit twice over (frames of any shape), plus room for
/// control frames.
fn raw_cap(limits: &super::snapshot::Limits) -> usize {
    limits.max_connect_packet.saturating_mul(2).saturating_add(4096)
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
            assert_eq!(s.metrics.value("connections_active", &[("listener", "l")]), 1.0);
            tokio::task::yield_now().await;
            if acct.reason.is_none() {
                panic!("a bug in the connection's task");
            }
        });
        assert!(task.await.unwrap_err().is_panic());
        let m = &shared.metrics;
        assert_eq!(m.value("connections_active", &[("listener", "l")]), 0.0);
        assert_eq!(m.value("connections_closed_total", &[("listener", "l"), ("reason", "internal_error")]), 1.0);
        let refused = [("listener", "l"), ("reason", "internal_error"), ("connack", "none")];
        assert_eq!(m.value("connections_refused_total", &refused), 1.0);
    }

    /// What one connection's task holds for its whole life beyond its sockets and TLS state:
    /// the future of [`settled`], on the relay runtime (on the setup runtime, [`handle`]'s
    /// lives for [`runtimes::SETTLE`] at most; setup is boxed). tokio's task cell adds ~110 B
    /// of header and trailer and is 128-byte aligned, which the allocator serves from the next
    /// size class up: with the listener's 24 B connection-limit guard, a 968 B future keeps the
    /// task in the 1,280 B class; 1,248 B took the 1,536 B class and 1,440 B the 1,792 B one,
    /// 256 B more per connection each (docs/benchmarks.md, M1).
    #[tokio::test]
    async fn connection_task_size() {
        let cfg = "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pool.p]\nbackends = [\"127.0.0.1:1\"]\n[admin]\nenabled = false\n";
        let loaded = crate::control::config::load_str(cfg, std::path::Path::new(".")).expect("config");
        let snapshot = Arc::new(loaded.snapshot);
        let spec = snapshot.listeners[0].clone();
        let shared = Arc::new(Shared::new(Arc::new(Metrics::new()), CancellationToken::new()));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let peer = c.local_addr().unwrap();
        let conn = shared.conns.register();
        let guard = [0u8; 24];
        let fut = handle(shared.clone(), snapshot, spec, c, peer, conn, guard);
        let setting_up = std::mem::size_of_val(&fut);
        fn output_size<F, A, B, C, D, E, G, H, R>(_: &F) -> usize
        where
            F: Fn(A, B, C, D, E, G, H) -> R,
        {
            std::mem::size_of::<R>()
        }
        let settled = output_size(&settled::<[u8; 24]>);
        eprintln!("connection task future: {setting_up} bytes while setting up, {settled} bytes settled");
        // Unoptimized builds (the test suite's) lay futures out larger: 1,008 B for 968 B.
        let limit = if cfg!(debug_assertions) { 1040 } else { 1000 };
        assert!(settled <= limit, "{settled} > {limit}");
        // The library without a setup runtime keeps connections on this one: bounded too.
        assert!(setting_up <= limit + 128, "{setting_up} > {limit} + 128");
    }

    #[test]
    fn assigned_client_ids_have_the_documented_form() {
        assert_eq!(encode_assigned(&[0; 16]), format!("hm-{}", "a".repeat(26)));
        // 130 bits of characters for 128: the first carries 3.
        assert_eq!(encode_assigned(&[0xff; 16]), format!("hm-h{}", "7".repeat(25)));
        let (a, b) = (assigned_client_id(), assigned_client_id());
        assert_ne!(a, b);
        for id in [a, b] {
            assert_eq!(id.len(), 29);
            assert!(id[3..].bytes().all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c)), "{id}");
        }
    }

    #[test]
    fn dial_errors_map_to_outcomes() {
        let of = |kind: io::ErrorKind| DialOutcome::of(&io::Error::from(kind)).as_str();
        assert_eq!(of(io::ErrorKind::ConnectionRefused), "refused");
        assert_eq!(of(io::ErrorKind::TimedOut), "timeout");
        assert_eq!(of(io::ErrorKind::ConnectionReset), "reset");
        assert_eq!(of(io::ErrorKind::BrokenPipe), "reset");
        assert_eq!(DialOutcome::of(&io::Error::other("x")).as_str(), "error");
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
