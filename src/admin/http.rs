//! The admin HTTP server: hyper 1, HTTP/1.1, on its own listener (`[admin] bind`). A plain
//! match on the path: `/healthz`, `/readyz`, `/metrics`, `/backends`, `/route`, the status
//! page `/` and its `/status.json` ([`super::status`]), and the mutating
//! `POST /backends/{pool}/{broker}/drain|enable` and `POST /pools/{pool}/rebalance`, which need
//! a bearer token of `[admin] token_file` ([`super::auth`]). It reads the snapshot the data
//! plane runs on, the readiness latch and the metrics registry; it writes only a broker's admin
//! state, and the closes of a drain or a rebalance go through the control plane's paced
//! closers. Nothing it serves carries secrets.
//!
//! Probes must be answered whatever else connects. A connection has [`HEADER_READ_TIMEOUT`]
//! to send a complete request head (from connect, and again after each response on a kept-alive
//! connection), and is closed after [`IDLE_TIMEOUT`] without a byte either way (a client that
//! stopped reading its response). At most [`MAX_CONNECTIONS`] are open: every new connection
//! is accepted at once, and at the cap the connection that has been idle longest is closed to
//! make room. Refusing new connections instead would let whoever holds the cap shut the
//! kubelet's probes out; shedding the stalest one keeps the newest connection, the probe that
//! just arrived, served.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY,
    WWW_AUTHENTICATE, X_CONTENT_TYPE_OPTIONS,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::auth::{Tokens, Verdict};
use super::log::rfc3339;
use super::metrics::Metrics;
use super::ready::Readiness;
use super::route::{self, RouteError};
use super::status;
use crate::control::config::AdminSettings;
use crate::control::drain;
use crate::control::rebalance::Rebalancer;
use crate::proxy::registry::Registry;
use crate::proxy::snapshot::Snapshot;

/// Admin connections open at once. Probes and scrapes need a handful; the cap bounds what
/// idle connections cost (a task and a socket each).
pub const MAX_CONNECTIONS: usize = 256;
/// A client has this long to send a complete request head, from connect or from the end of
/// the previous response. The kubelet and Prometheus send theirs at once.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that moves no byte either way for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one warning per this long about admin connections shed or timed out (each one is
/// logged at debug and counted).
const WARN_EVERY: Duration = Duration::from_secs(10);
/// What unknown paths list.
const ENDPOINTS: [&str; 10] = [
    "/ (status page)",
    "/status.json",
    "/healthz",
    "/readyz",
    "/metrics",
    "/backends",
    "/route?client_id=ID[&pool=NAME|&listener=NAME&sni=..&alpn=..&cert_cn=..&cert_issuer_cn=..&username=..&source=IP]",
    "POST /backends/POOL/BROKER/drain",
    "POST /backends/POOL/BROKER/enable",
    "POST /pools/POOL/rebalance",
];

/// The admin server's connection limits; [`Limits::default`] is what `harbormaster run` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// What the admin server reads: the data plane's current snapshot, readiness and metrics;
/// and what its mutating endpoints need: the tokens, the live connections a drain moves, and
/// the rebalancer that runs a rebalance round.
pub struct AdminState {
    pub current: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub tokens: Tokens,
    pub conns: Arc<Registry>,
    pub rebalancer: Arc<Rebalancer>,
}

/// Binds the admin listener and spawns the server, which runs until `stop` is cancelled.
/// `Ok(None)` when it is disabled, or when the *default* address is taken (logged as a
/// warning: the data plane still runs); a configured address that cannot be bound is an error.
pub async fn start(
    settings: &AdminSettings,
    state: Arc<AdminState>,
    stop: CancellationToken,
) -> anyhow::Result<Option<(SocketAddr, JoinHandle<()>)>> {
    if !settings.enabled {
        tracing::info!("admin server disabled ([admin] enabled = false)");
        return Ok(None);
    }
    let listener = match TcpListener::bind(settings.bind).await {
        Ok(l) => l,
        Err(e) if settings.bind_is_default => {
            tracing::warn!(
                bind = %settings.bind,
                error = %e,
                "admin server not started: its default address is taken; set [admin] bind, or enabled = false"
            );
            return Ok(None);
        }
        Err(e) => anyhow::bail!("admin.bind: cannot bind {}: {e}", settings.bind),
    };
    let addr = listener.local_addr()?;
    status::init();
    let limits = Limits::default();
    tracing::info!(
        addr = %addr,
        max_connections = limits.max_connections,
        header_read_timeout = ?limits.header_read_timeout,
        idle_timeout = ?limits.idle_timeout,
        "admin server listening"
    );
    Ok(Some((addr, tokio::spawn(serve(listener, state, stop, limits)))))
}

/// Serves admin requests on `listener` until `stop` is cancelled; open admin connections are
/// closed then too.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken, limits: Limits) {
    let table = Arc::new(Table::new(limits.max_connections.max(1)));
    let tasks = TaskTracker::new();
    let warn = Arc::new(Warn::default());
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let (id, conn, shed) = table.admit(peer);
        if let Some(victim) = shed {
            state.metrics.admin_connections_shed.inc();
            tracing::debug!(
                peer = %victim.peer,
                idle_for = ?table.idle_for(&victim),
                "admin connection closed to make room (connection cap)"
            );
            warn.note(End::Shed, limits);
            victim.shed.cancel();
        }
        state.metrics.admin_connections_active.inc();
        let (state, stop, table, warn) = (state.clone(), stop.clone(), table.clone(), warn.clone());
        tasks.spawn(async move {
            let end = serve_connection(tcp, &state, &conn, &table, &stop, limits).await;
            table.remove(id);
            state.metrics.admin_connections_active.dec();
            match end {
                End::HeaderTimeout | End::IdleTimeout => {
                    let label = if matches!(end, End::HeaderTimeout) { "header" } else { "idle" };
                    state.metrics.admin_connection_timed_out(label);
                    tracing::debug!(peer = %peer, timeout = label, "admin connection timed out");
                    warn.note(end, limits);
                }
                End::Done | End::Shed | End::Stopped => {}
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// How an admin connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client closed, or a request could not be parsed (hyper answered it).
    Done,
    HeaderTimeout,
    IdleTimeout,
    Shed,
    Stopped,
}

async fn serve_connection(
    tcp: TcpStream,
    state: &Arc<AdminState>,
    conn: &Arc<Entry>,
    table: &Table,
    stop: &CancellationToken,
    limits: Limits,
) -> End {
    let service_state = state.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let state = service_state.clone();
        async move { Ok::<_, Infallible>(respond(&state, &req)) }
    });
    let io = Tracked { io: tcp, conn: conn.clone(), epoch: table.epoch };
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let served = builder.serve_connection(TokioIo::new(io), service);
    tokio::select! {
        r = served => match r {
            Err(e) if e.is_timeout() => End::HeaderTimeout,
            _ => End::Done,
        },
        _ = idle(&conn.last_active, table.epoch, limits.idle_timeout) => End::IdleTimeout,
        _ = conn.shed.cancelled() => End::Shed,
        _ = stop.cancelled() => End::Stopped,
    }
}

/// Resolves once `last_active` is `timeout` old.
async fn idle(last_active: &AtomicU64, epoch: Instant, timeout: Duration) {
    loop {
        let deadline = epoch + Duration::from_millis(last_active.load(Ordering::Relaxed)) + timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// One open admin connection, as the accept loop sees it.
struct Entry {
    peer: SocketAddr,
    /// Milliseconds from the table's epoch to the last byte read or written.
    last_active: AtomicU64,
    /// Cancelled to close the connection at once.
    shed: CancellationToken,
}

/// The open admin connections, so that the accept loop can find the one idle longest.
struct Table {
    epoch: Instant,
    max: usize,
    inner: Mutex<TableInner>,
}

#[derive(Default)]
struct TableInner {
    next_id: u64,
    conns: HashMap<u64, Arc<Entry>>,
}

impl Table {
    fn new(max: usize) -> Table {
        Table { epoch: Instant::now(), max, inner: Mutex::default() }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn idle_for(&self, e: &Entry) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(e.last_active.load(Ordering::Relaxed)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TableInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enters a new connection from `peer`: its id and entry (active now), and at the cap the
    /// entry idle longest, taken out of the table for the caller to close.
    fn admit(&self, peer: SocketAddr) -> (u64, Arc<Entry>, Option<Arc<Entry>>) {
        let mut t = self.lock();
        let shed = if t.conns.len() >= self.max {
            let oldest = t.conns.iter().min_by_key(|(_, e)| e.last_active.load(Ordering::Relaxed)).map(|(id, _)| *id);
            oldest.and_then(|id| t.conns.remove(&id))
        } else {
            None
        };
        t.next_id += 1;
        let id = t.next_id;
        let entry =
            Arc::new(Entry { peer, last_active: AtomicU64::new(self.now_ms()), shed: CancellationToken::new() });
        t.conns.insert(id, entry.clone());
        (id, entry, shed)
    }

    /// A connection has ended (a shed one is gone already).
    fn remove(&self, id: u64) {
        self.lock().conns.remove(&id);
    }
}

/// A TCP stream that notes when bytes last moved, for the idle timeout and for shedding.
struct Tracked {
    io: TcpStream,
    conn: Arc<Entry>,
    epoch: Instant,
}

impl Tracked {
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.conn.last_active.store(ms, Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, b);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The rate-limited warning about admin connections cut short: the counts since the last one.
#[derive(Default)]
struct Warn {
    state: Mutex<WarnState>,
}

#[derive(Default)]
struct WarnState {
    last: Option<Instant>,
    shed: u64,
    header_timeouts: u64,
    idle_timeouts: u64,
}

impl Warn {
    fn note(&self, end: End, limits: Limits) {
        let mut w = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match end {
            End::Shed => w.shed += 1,
            End::HeaderTimeout => w.header_timeouts += 1,
            End::IdleTimeout => w.idle_timeouts += 1,
            End::Done | End::Stopped => return,
        }
        if w.last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        w.last = Some(Instant::now());
        let (shed, header, idle) =
            (std::mem::take(&mut w.shed), std::mem::take(&mut w.header_timeouts), std::mem::take(&mut w.idle_timeouts));
        drop(w);
        tracing::warn!(
            shed,
            header_timeouts = header,
            idle_timeouts = idle,
            max_connections = limits.max_connections,
            "admin connections cut short (counts since the last such warning; more in debug)"
        );
    }
}

/// The router: one response per request, from the request line alone (bodies are ignored).
pub fn respond<B>(state: &AdminState, req: &Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let target = mutation(path).map(Target::Broker).or_else(|| rebalance_path(path).map(Target::Rebalance));
    if let Some(target) = target {
        if req.method() != Method::POST {
            let mut r = json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({ "error": "only POST is served here" }));
            r.headers_mut().insert(ALLOW, HeaderValue::from_static("POST"));
            return r;
        }
        if let Some(refused) = unauthorized(state, req) {
            return refused;
        }
        return match target {
            Target::Broker(target) => mutate(state, target),
            Target::Rebalance(pool) => rebalance(state, pool),
        };
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({ "error": "only GET and HEAD are served" }));
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/healthz" => json_response(StatusCode::OK, &json!({ "status": "alive" })),
        "/readyz" => readyz(state),
        "/metrics" => metrics(state),
        "/backends" => backends(state),
        "/route" => route(state, req.uri().query().unwrap_or("")),
        "/" => status_page(),
        "/status.json" => json_response(StatusCode::OK, &status::json(state)),
        _ => json_response(StatusCode::NOT_FOUND, &json!({ "error": "not found", "endpoints": ENDPOINTS })),
    }
}

fn readyz(state: &AdminState) -> Response<Full<Bytes>> {
    let snap = state.current.load();
    match state.readiness.check(&snap) {
        Ok(()) => json_response(StatusCode::OK, &json!({ "ready": true })),
        Err(reason) => json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({ "ready": false, "reason": reason })),
    }
}

fn metrics(state: &AdminState) -> Response<Full<Bytes>> {
    let snap = state.current.load();
    let ready = state.readiness.check(&snap).is_ok();
    let body = state.metrics.scrape(&snap, ready);
    response(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", body)
}

/// One broker as `/backends` and `/status.json` show it: identity, address, health, drain and
/// admin state, connection counts and last error.
pub(super) fn broker_json(b: &crate::proxy::balance::Backend) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    json!({
        "identity": b.name,
        "address": b.addr.to_string(),
        "healthy": b.healthy.load(Relaxed),
        "draining": b.is_draining(),
        "admin_state": b.admin_state().as_str(),
        "admin_state_since": b.admin_state().since.map(rfc3339),
        "active": b.active.load(Relaxed),
        "total": b.total.load(Relaxed),
        "last_error": b.last_error().map(|(at, e)| json!({ "at": rfc3339(at), "error": e })),
    })
}

fn backends(state: &AdminState) -> Response<Full<Bytes>> {
    let snap = state.current.load();
    let pools: Vec<Value> = snap
        .pools
        .iter()
        .map(|p| {
            let brokers: Vec<Value> = p.backends.iter().map(|b| broker_json(b)).collect();
            json!({
                "name": p.name,
                "hash_key": route::hash_key_name(p.hash_key),
                "empty_client_id": route::empty_key_name(p.empty_key),
                "backend_transport": p.backend_transport.as_str(),
                "backend_attempts": p.backend_attempts,
                "brokers": brokers,
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "pools": pools }))
}

/// What an operator asks of one broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Drain,
    Enable,
}

/// A mutating path: `/backends/{pool}/{broker}/drain` or `.../enable`.
fn mutation(path: &str) -> Option<(&str, &str, Action)> {
    let mut parts = path.strip_prefix("/backends/")?.split('/');
    let (pool, broker, action) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || pool.is_empty() || broker.is_empty() {
        return None;
    }
    let action = match action {
        "drain" => Action::Drain,
        "enable" => Action::Enable,
        _ => return None,
    };
    Some((pool, broker, action))
}

/// A mutating request: one broker's drain or enable, or a pool's rebalance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target<'a> {
    Broker((&'a str, &'a str, Action)),
    Rebalance(&'a str),
}

/// The pool of `/pools/{pool}/rebalance`.
fn rebalance_path(path: &str) -> Option<&str> {
    let pool = path.strip_prefix("/pools/")?.strip_suffix("/rebalance")?;
    (!pool.is_empty() && !pool.contains('/')).then_some(pool)
}

/// The bearer token check of every mutating request: the refusal to send, if any (403
/// without a token file, 401 without a valid token, 503 when the file cannot be read).
fn unauthorized<B>(state: &AdminState, req: &Request<B>) -> Option<Response<Full<Bytes>>> {
    match state.tokens.check(req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes)) {
        Verdict::Allowed => None,
        Verdict::NoTokenFile => Some(json_response(
            StatusCode::FORBIDDEN,
            &json!({ "error": "mutating endpoints are off: set [admin] token_file to a file of bearer tokens, one a line, and restart" }),
        )),
        Verdict::Unauthorized => {
            let mut r = json_response(
                StatusCode::UNAUTHORIZED,
                &json!({ "error": "a token of [admin] token_file is required: Authorization: Bearer <token>" }),
            );
            r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Some(r)
        }
        Verdict::Unreadable(reason) => {
            tracing::warn!(error = %reason, "admin token file unreadable: mutating request refused");
            Some(json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({ "error": format!("the token file cannot be read: {reason}") }),
            ))
        }
    }
}

/// One rebalance round of `pool` now, whatever its `rebalance` (the token is checked): its
/// connections away from home are moved back, paced ([`Rebalancer::start_round`]). 404 for
/// an unknown pool.
fn rebalance(state: &AdminState, pool: &str) -> Response<Full<Bytes>> {
    let Some(round) = state.rebalancer.start_round(pool) else {
        return json_response(StatusCode::NOT_FOUND, &json!({ "error": format!("no pool {pool:?}") }));
    };
    tracing::info!(
        target: "harbormaster::admin",
        pool, away_from_home = round.away, moving = round.moving, rate = round.rate,
        already_running = round.already_running, "rebalance requested"
    );
    json_response(
        StatusCode::OK,
        &json!({
            "pool": pool,
            "away_from_home": round.away,
            "moving": if round.already_running { 0 } else { round.moving },
            "rate": round.rate,
            "already_running": round.already_running,
        }),
    )
}

/// A drain or an enable, once the token is checked; 404 for an unknown pool or broker.
fn mutate(state: &AdminState, (pool, broker, action): (&str, &str, Action)) -> Response<Full<Bytes>> {
    let snap = state.current.load();
    let Some(p) = snap.pool(pool) else {
        return json_response(StatusCode::NOT_FOUND, &json!({ "error": format!("no pool {pool:?}") }));
    };
    let Some(b) = p.backends.iter().find(|b| b.name == broker) else {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({ "error": format!("no broker {broker:?} in pool {pool:?}") }),
        );
    };
    let (after, changed) = match action {
        Action::Drain => b.admin_drain(),
        Action::Enable => b.admin_enable(),
    };
    let since = after.since.map(rfc3339);
    let mut body = json!({
        "pool": pool,
        "broker": broker,
        "action": if action == Action::Drain { "drain" } else { "enable" },
        "changed": changed,
        "admin_state": after.as_str(),
        "since": since,
    });
    match action {
        Action::Drain => {
            // Only the call that drained it moves the connections: a repeated drain finds
            // them being moved already.
            let moving = if changed { state.conns.relayed_to(&b.state).len() } else { 0 };
            body["connections_to_move"] = json!(moving);
            body["close_rate"] = json!(p.close_rate);
            if changed {
                tracing::info!(
                    target: "harbormaster::admin",
                    pool, broker, connections = moving, close_rate = p.close_rate,
                    "broker drained: no new connections, its connections are moved away"
                );
                let (conns, broker_state, rate, pool, name) =
                    (state.conns.clone(), b.state.clone(), p.close_rate, pool.to_string(), broker.to_string());
                tokio::spawn(async move {
                    let closed = drain::evacuate(conns, broker_state, rate).await;
                    tracing::info!(target: "harbormaster::admin", pool, broker = name, closed, "drained broker's connections moved");
                });
            }
        }
        Action::Enable => {
            if changed {
                tracing::info!(target: "harbormaster::admin", pool, broker, "broker enabled: back in rotation");
            }
        }
    }
    json_response(StatusCode::OK, &body)
}

fn route(state: &AdminState, query: &str) -> Response<Full<Bytes>> {
    let Some(key) = query_param(query, "client_id") else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({ "error": "client_id is required: /route?client_id=ID[&pool=NAME]" }),
        );
    };
    let text = |name: &str| query_param(query, name).map(|p| String::from_utf8_lossy(&p).into_owned());
    let source = match text("source").map(|s| s.parse::<std::net::IpAddr>()) {
        None => None,
        Some(Ok(ip)) => Some(ip),
        Some(Err(_)) => {
            return json_response(StatusCode::BAD_REQUEST, &json!({ "error": "source must be an IP address" }));
        }
    };
    let q = route::Query {
        listener: text("listener"),
        pool: text("pool"),
        sni: text("sni"),
        alpn: text("alpn"),
        cert_cn: text("cert_cn"),
        cert_issuer_cn: text("cert_issuer_cn"),
        username: text("username"),
        source,
    };
    let snap = state.current.load();
    match route::lookup_query(&snap, &key, &q) {
        Ok(r) => {
            let now = r.now();
            json_response(
                StatusCode::OK,
                &json!({
                    "client_id": String::from_utf8_lossy(&key),
                    "listener": r.matched.as_ref().map(|m| m.listener.as_str()),
                    "rule": r.matched.as_ref().and_then(|m| m.rule).map(|i| format!("route[{i}]")),
                    "rule_match": r.matched.as_ref().filter(|m| m.rule.is_some()).map(|m| m.conditions.as_str()),
                    "pool": r.pool.name,
                    "hash_key": route::hash_key_name(r.pool.hash_key),
                    "backend_transport": r.pool.backend_transport.as_str(),
                    "broker": now.map(|b| b.name.as_str()),
                    "address": now.map(|b| b.addr.to_string()),
                    "preference": r.preference.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
                    "candidates": r.candidates.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
                }),
            )
        }
        Err(e) => {
            let status = match e {
                RouteError::NoPool(_) | RouteError::NoListener(_) | RouteError::NoDefaultPool => StatusCode::NOT_FOUND,
                RouteError::EmptyKey { .. } => StatusCode::BAD_REQUEST,
                RouteError::NoBrokers(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            json_response(status, &json!({ "error": e.to_string() }))
        }
    }
}

/// The status page, under its Content-Security-Policy: a browser runs its inline script and
/// style and nothing else.
fn status_page() -> Response<Full<Bytes>> {
    let mut r = response(StatusCode::OK, "text/html; charset=utf-8", status::PAGE.to_string());
    let h = r.headers_mut();
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(status::csp()));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    response(status, "application/json", format!("{body}\n"))
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The value of `name` in an `application/x-www-form-urlencoded` query, percent-decoded
/// (`+` is a space; a literal `+` is `%2B`). The first occurrence wins.
pub fn query_param(query: &str, name: &str) -> Option<Vec<u8>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (form_decode(k) == name.as_bytes()).then(|| form_decode(v))
    })
}

fn form_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::config::load_str;
    use http_body_util::BodyExt;
    use std::path::Path;
    use std::sync::atomic::Ordering;

    const CONFIG: &str = r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "brokers"

[pool.brokers]
backends = [
  { name = "b0", address = "127.0.0.1:1" },
  { name = "b1", address = "127.0.0.1:2" },
  { name = "b2", address = "127.0.0.1:3" },
]

[pool.other]
backends = ["127.0.0.1:4"]
"#;

    fn state() -> AdminState {
        let loaded = load_str(CONFIG, Path::new(".")).unwrap();
        let current = Arc::new(ArcSwap::from_pointee(loaded.snapshot));
        let metrics = Arc::new(Metrics::new());
        let conns = Arc::new(Registry::new(CancellationToken::new()));
        AdminState {
            rebalancer: Arc::new(Rebalancer::new(current.clone(), conns.clone(), metrics.clone())),
            current,
            metrics,
            readiness: Arc::new(Readiness::new()),
            tokens: Tokens::new(None),
            conns,
        }
    }

    fn ready(state: &AdminState) {
        state.readiness.set_snapshot_loaded();
        state.readiness.set_listeners_bound();
    }

    fn call(state: &AdminState, method: Method, uri: &str) -> (StatusCode, String, String) {
        let req = Request::builder().method(method).uri(uri).body(()).unwrap();
        let resp = respond(state, &req);
        let status = resp.status();
        let ct = resp.headers().get(CONTENT_TYPE).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let body = futures_body(resp.into_body());
        (status, ct, body)
    }

    fn futures_body(body: Full<Bytes>) -> String {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let bytes = rt.block_on(body.collect()).unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn get(state: &AdminState, uri: &str) -> (StatusCode, Value) {
        let (status, ct, body) = call(state, Method::GET, uri);
        assert_eq!(ct, "application/json", "{uri}");
        assert!(body.ends_with('\n') && !body.trim_end().contains('\n'), "one line: {body:?}");
        (status, serde_json::from_str(&body).unwrap())
    }

    fn post(state: &AdminState, uri: &str, auth: Option<&str>) -> (StatusCode, Value, Option<String>) {
        let mut req = Request::builder().method(Method::POST).uri(uri);
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a);
        }
        let resp = respond(state, &req.body(()).unwrap());
        let status = resp.status();
        let challenge = resp.headers().get(WWW_AUTHENTICATE).map(|v| v.to_str().unwrap().to_string());
        (status, serde_json::from_str(&futures_body(resp.into_body())).unwrap(), challenge)
    }

    #[test]
    fn mutating_paths_name_a_pool_a_broker_and_an_action() {
        assert_eq!(mutation("/backends/p/b/drain"), Some(("p", "b", Action::Drain)));
        assert_eq!(mutation("/backends/p/10.0.0.1:1883/enable"), Some(("p", "10.0.0.1:1883", Action::Enable)));
        for path in ["/backends", "/backends/p/b", "/backends/p/b/stop", "/backends//b/drain", "/backends/p/b/drain/x"]
        {
            assert_eq!(mutation(path), None, "{path}");
        }
    }

    #[test]
    fn drain_and_enable_need_a_token_and_a_known_broker() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _in_runtime = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "t0k3n\n").unwrap();
        let path = "/backends/other/127.0.0.1:4/drain";

        let s = state();
        let (status, body, _) = post(&s, path, Some("Bearer t0k3n"));
        assert_eq!(status, StatusCode::FORBIDDEN, "no token file");
        assert!(body["error"].as_str().unwrap().contains("[admin] token_file"));
        assert_eq!(call(&s, Method::GET, path).0, StatusCode::METHOD_NOT_ALLOWED);

        let s = AdminState { tokens: Tokens::new(Some(file)), ..state() };
        for auth in [None, Some("Bearer nope"), Some("Basic t0k3n")] {
            let (status, _, challenge) = post(&s, path, auth);
            assert_eq!((status, challenge.as_deref()), (StatusCode::UNAUTHORIZED, Some("Bearer")), "{auth:?}");
        }
        for unknown in ["/backends/nope/127.0.0.1:4/drain", "/backends/other/127.0.0.1:9/enable"] {
            assert_eq!(post(&s, unknown, Some("Bearer t0k3n")).0, StatusCode::NOT_FOUND, "{unknown}");
        }
        let broker = s.current.load().pool("other").unwrap().backends[0].clone();
        assert!(broker.in_rotation(), "refused requests change nothing");
        let (status, body, _) = post(&s, path, Some("Bearer t0k3n"));
        assert_eq!(status, StatusCode::OK);
        assert_eq!((body["admin_state"].as_str(), body["changed"].as_bool()), (Some("drained"), Some(true)));
        assert_eq!(body["connections_to_move"], 0);
        assert!(!broker.in_rotation());
        let (_, backends) = get(&s, "/backends");
        let listed = &backends["pools"][1]["brokers"][0];
        assert_eq!((listed["admin_state"].as_str(), &listed["admin_state_since"]), (Some("drained"), &body["since"]));
        let (status, body, _) = post(&s, "/backends/other/127.0.0.1:4/enable", Some("Bearer t0k3n"));
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["admin_state"], "enabled");
        assert!(broker.in_rotation());
    }

    #[test]
    fn rebalance_needs_a_token_and_a_known_pool() {
        assert_eq!(rebalance_path("/pools/p/rebalance"), Some("p"));
        for path in
            ["/pools//rebalance", "/pools/p/q/rebalance", "/pools/p", "/pools/p/rebalance/x", "/pool/p/rebalance"]
        {
            assert_eq!(rebalance_path(path), None, "{path}");
        }
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _in_runtime = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "t0k3n\n").unwrap();
        let path = "/pools/brokers/rebalance";

        let s = state();
        assert_eq!(post(&s, path, Some("Bearer t0k3n")).0, StatusCode::FORBIDDEN, "no token file");
        let (status, _, _) = call(&s, Method::GET, path);
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

        let s = AdminState { tokens: Tokens::new(Some(file)), ..state() };
        let (status, _, challenge) = post(&s, path, Some("Bearer nope"));
        assert_eq!((status, challenge.as_deref()), (StatusCode::UNAUTHORIZED, Some("Bearer")));
        assert_eq!(post(&s, "/pools/nope/rebalance", Some("Bearer t0k3n")).0, StatusCode::NOT_FOUND);
        let (status, body, _) = post(&s, path, Some("Bearer t0k3n"));
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            json!({ "pool": "brokers", "away_from_home": 0, "moving": 0, "rate": 100, "already_running": false })
        );
    }

    #[test]
    fn healthz_is_always_200() {
        let s = state();
        assert_eq!(get(&s, "/healthz").0, StatusCode::OK);
        s.readiness.set_draining();
        assert_eq!(get(&s, "/healthz").0, StatusCode::OK);
    }

    #[test]
    fn readyz_follows_startup_health_and_draining() {
        let s = state();
        let (status, body) = get(&s, "/readyz");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["ready"], false);
        assert!(body["reason"].as_str().unwrap().starts_with("starting"), "{body}");
        ready(&s);
        assert_eq!(get(&s, "/readyz"), (StatusCode::OK, json!({ "ready": true })));

        let snap = s.current.load_full();
        for b in &snap.pool("brokers").unwrap().backends {
            b.healthy.store(false, Ordering::Relaxed);
        }
        let (status, body) = get(&s, "/readyz");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body["reason"].as_str().unwrap().contains("\"brokers\""), "{body}");
        snap.pool("brokers").unwrap().backends[2].healthy.store(true, Ordering::Relaxed);
        assert_eq!(get(&s, "/readyz").0, StatusCode::OK);

        s.readiness.set_draining();
        let (status, body) = get(&s, "/readyz");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body["reason"].as_str().unwrap().starts_with("draining"), "{body}");
    }

    #[test]
    fn metrics_is_prometheus_text_with_scrape_time_gauges() {
        let s = state();
        ready(&s);
        s.current.load().pool("brokers").unwrap().backends[1].active.store(7, Ordering::Relaxed);
        let (status, ct, body) = call(&s, Method::GET, "/metrics");
        assert_eq!(status, StatusCode::OK);
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        assert!(body.contains("# TYPE harbormaster_accept_errors_total counter"), "{body}");
        assert!(body.contains("harbormaster_ready 1"), "{body}");
        assert!(body.contains("harbormaster_broker_connections_active{broker=\"b1\",pool=\"brokers\"} 7"), "{body}");
        assert!(body.contains("harbormaster_build_info{"), "{body}");
        s.readiness.set_draining();
        assert!(call(&s, Method::GET, "/metrics").2.contains("harbormaster_ready 0"));
    }

    #[test]
    fn the_status_page_and_its_aggregates() {
        let s = state();
        ready(&s);
        let req = Request::builder().uri("/").body(()).unwrap();
        let resp = respond(&s, &req);
        assert_eq!(resp.status(), StatusCode::OK);
        let h = resp.headers();
        assert_eq!(h[CONTENT_TYPE], "text/html; charset=utf-8");
        let csp = h[CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.starts_with("default-src 'none'; script-src 'sha256-"), "{csp}");
        assert_eq!(h[X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert!(futures_body(resp.into_body()).starts_with("<!DOCTYPE html>"));

        let snap = s.current.load_full();
        snap.pool("brokers").unwrap().backends[2].active.store(4, Ordering::Relaxed);
        snap.pool("brokers").unwrap().backends[0].healthy.store(false, Ordering::Relaxed);
        s.metrics.connections_accepted("mqtt").inc_by(3);
        s.metrics.connection_opened("mqtt");
        s.metrics.closed_at_accept("mqtt", crate::proxy::connection::CloseReason::MaxConnections);
        s.metrics.config_applied();
        let (status, body) = get(&s, "/status.json");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["ready"], true);
        assert_eq!(body["draining"], false);
        assert_eq!(body["config"]["generation"], 1);
        assert_eq!(body["config"]["last_reload_ok"], true);
        let l = &body["listeners"][0];
        assert_eq!(
            (l["name"].as_str(), l["accepted"].as_u64(), l["tls"].as_bool()),
            (Some("mqtt"), Some(3), Some(false))
        );
        assert_eq!(l["refused"], json!({ "max_connections": 1 }));
        let pool = body["pools"].as_array().unwrap().iter().find(|p| p["name"] == "brokers").unwrap();
        assert_eq!(pool["away_from_home"], Value::Null, "no such metric yet: {pool}");
        let brokers = pool["brokers"].as_array().unwrap();
        assert_eq!((brokers[0]["healthy"].clone(), brokers[2]["active"].clone()), (json!(false), json!(4)));
    }

    #[test]
    fn backends_lists_every_broker_with_its_state() {
        let s = state();
        let snap = s.current.load_full();
        let b1 = &snap.pool("brokers").unwrap().backends[1];
        b1.active.store(2, Ordering::Relaxed);
        b1.total.store(5, Ordering::Relaxed);
        b1.healthy.store(false, Ordering::Relaxed);
        b1.set_last_error("Connection refused (os error 111)");
        let (status, body) = get(&s, "/backends");
        assert_eq!(status, StatusCode::OK);
        let pools = body["pools"].as_array().unwrap();
        assert_eq!(pools.len(), 2);
        let brokers = pools.iter().find(|p| p["name"] == "brokers").unwrap();
        assert_eq!(brokers["hash_key"], "client_id");
        assert_eq!(brokers["brokers"].as_array().unwrap().len(), 3);
        let b = &brokers["brokers"][1];
        assert_eq!(b["identity"], "b1");
        assert_eq!(b["address"], "127.0.0.1:2");
        assert_eq!((b["healthy"].clone(), b["draining"].clone()), (json!(false), json!(false)));
        assert_eq!((b["active"].clone(), b["total"].clone()), (json!(2), json!(5)));
        assert_eq!(b["last_error"]["error"], "Connection refused (os error 111)");
        assert!(b["last_error"]["at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(brokers["brokers"][0]["last_error"], Value::Null);
    }

    #[test]
    fn route_uses_the_pools_ranking() {
        let s = state();
        let snap = s.current.load_full();
        let pool = snap.pool("brokers").unwrap();
        for id in ["device-1", "truck 7/a", "ü+x"] {
            let encoded: String =
                id.bytes()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == b'-' {
                            (c as char).to_string()
                        } else {
                            format!("%{c:02X}")
                        }
                    })
                    .collect();
            let (status, body) = get(&s, &format!("/route?client_id={encoded}"));
            assert_eq!(status, StatusCode::OK, "{body}");
            let want: Vec<&str> = pool.ranking(id.as_bytes()).iter().map(|b| b.name.as_str()).collect();
            assert_eq!(body["client_id"], id);
            assert_eq!(body["pool"], "brokers");
            assert_eq!(body["backend_transport"], "mqtt");
            assert_eq!(body["preference"], json!(want));
            assert_eq!(body["broker"], want[0]);
            assert_eq!(body["candidates"], json!(want));
        }
        // A down first choice: `broker` is where the data plane sends the client now.
        let first = pool.ranking(b"device-1")[0].clone();
        first.healthy.store(false, Ordering::Relaxed);
        let (_, body) = get(&s, "/route?client_id=device-1");
        assert_eq!(body["preference"][0], first.name.as_str());
        assert_eq!(body["broker"], body["preference"][1]);

        let (status, body) = get(&s, "/route?pool=other&client_id=x");
        assert_eq!(
            (status, body["pool"].clone(), body["broker"].clone()),
            (StatusCode::OK, json!("other"), json!("127.0.0.1:4"))
        );
        assert_eq!(get(&s, "/route?client_id=x&pool=nope").0, StatusCode::NOT_FOUND);
        assert_eq!(get(&s, "/route").0, StatusCode::BAD_REQUEST);
        let (status, body) = get(&s, "/route?client_id=");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body["error"].as_str().unwrap().contains("least_connections"), "{body}");
    }

    #[test]
    fn unknown_paths_and_methods_are_refused() {
        let s = state();
        assert_eq!(get(&s, "/nope").0, StatusCode::NOT_FOUND);
        let req = Request::builder().method(Method::POST).uri("/readyz").body(()).unwrap();
        let resp = respond(&s, &req);
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[ALLOW], "GET, HEAD");
        assert_eq!(call(&s, Method::HEAD, "/healthz").0, StatusCode::OK);
    }

    #[test]
    fn query_params_are_form_decoded() {
        assert_eq!(query_param("client_id=a%2Fb+c%2B&pool=p", "client_id").unwrap(), b"a/b c+");
        assert_eq!(query_param("pool=p&client_id=", "client_id").unwrap(), b"");
        assert_eq!(query_param("client_id", "client_id").unwrap(), b"");
        assert_eq!(query_param("pool=p", "client_id"), None);
        assert_eq!(query_param("client_id=100%&x", "client_id").unwrap(), b"100%");
        assert_eq!(query_param("client_id=%zz%4", "client_id").unwrap(), b"%zz%4");
        assert_eq!(query_param("client_id=%C3%BC", "client_id").unwrap(), "ü".as_bytes());
    }

    /// The server on 127.0.0.1:0 with `limits`, until the returned token is cancelled.
    async fn serving(limits: Limits) -> (Arc<AdminState>, SocketAddr, CancellationToken) {
        let s = Arc::new(state());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, s.clone(), stop.clone(), limits));
        (s, addr, stop)
    }

    async fn healthz(addr: SocketAddr) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut out)).await.unwrap().unwrap();
        out
    }

    /// Polls `f` for up to 10 s.
    async fn eventually(f: impl Fn() -> bool) -> bool {
        for _ in 0..500 {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f()
    }

    /// Reads until EOF (or a reset); what was read.
    async fn until_closed(c: &mut tokio::net::TcpStream) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got)).await.expect("still open");
        got
    }

    #[tokio::test]
    async fn at_the_cap_the_connection_idle_longest_makes_room() {
        use tokio::io::AsyncWriteExt;
        let limits = Limits { max_connections: 4, ..Limits::default() };
        let (s, addr, stop) = serving(limits).await;
        let mut idle = Vec::new();
        for i in 0..4 {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            if i == 1 {
                c.write_all(b"GET /healthz HTTP/1.1\r\nHo").await.unwrap();
            }
            idle.push(c);
            // Distinct activity times, so the order of shedding is known.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = healthz(addr).await;
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(until_closed(&mut idle[0]).await.is_empty());
        assert_eq!(s.metrics.admin_connections_shed.get(), 1);
        // Full again; half a request head does not keep a connection from being next.
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(healthz(addr).await.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(until_closed(&mut idle[1]).await.is_empty());
        assert_eq!(s.metrics.admin_connections_shed.get(), 2);
        assert!(eventually(|| s.metrics.admin_connections_active.get() == 3).await);
        stop.cancel();
    }

    #[tokio::test]
    async fn half_a_request_head_times_out_with_a_408() {
        use tokio::io::AsyncWriteExt;
        let limits = Limits { header_read_timeout: Duration::from_millis(200), ..Limits::default() };
        let (s, addr, stop) = serving(limits).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let got = String::from_utf8(until_closed(&mut c).await).unwrap();
        assert!(got.is_empty() || got.starts_with("HTTP/1.1 408"), "{got}");
        let counted = || s.metrics.value("admin_connections_timed_out_total", &[("timeout", "header")]);
        assert!(eventually(|| counted() == 1.0).await);
        assert_eq!(s.metrics.admin_connections_active.get(), 0);
        stop.cancel();
    }

    #[tokio::test]
    async fn a_connection_that_moves_nothing_is_closed_after_the_idle_timeout() {
        let limits = Limits { idle_timeout: Duration::from_millis(200), ..Limits::default() };
        let (s, addr, stop) = serving(limits).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(until_closed(&mut c).await.is_empty());
        let counted = || s.metrics.value("admin_connections_timed_out_total", &[("timeout", "idle")]);
        assert!(eventually(|| counted() == 1.0).await);
        stop.cancel();
    }

    #[tokio::test]
    async fn the_server_answers_over_tcp_and_stops() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let s = Arc::new(state());
        ready(&s);
        let stop = CancellationToken::new();
        let settings = AdminSettings {
            enabled: true,
            bind: "127.0.0.1:0".parse().unwrap(),
            bind_is_default: false,
            token_file: None,
        };
        let (addr, task) = start(&settings, s, stop.clone()).await.unwrap().unwrap();
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("{\"ready\":true}\n"), "{out}");
        // A kept-alive connection does not keep the server from stopping.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0);
        let disabled = AdminSettings { enabled: false, ..settings };
        assert!(start(&disabled, Arc::new(state()), CancellationToken::new()).await.unwrap().is_none());
    }
}
