//! Active health checks: each pool with `health = { ... }` has its brokers probed every
//! `interval` (a TCP connect; PROXY header + MQTT CONNECT expecting CONNACK 0; or an HTTP GET
//! of the broker's own readiness endpoint expecting a status); `rise`
//! passes in a row bring a broker up, `fall` failures (probes and failed dials) mark it down.
//! Results land on each broker's shared state ([`crate::proxy::broker`]), which every snapshot
//! listing the broker sees. Never touches a client socket or the hash order.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::admin::metrics::Metrics;
use crate::proxy::balance::{Backend, CheckKind, HealthSpec, HttpCheck, Pool, ProxyProtocol};
use crate::proxy::broker::{report_transition, Transition};
use crate::proxy::proxy_header::{self, HeaderInput};
use crate::proxy::snapshot::Snapshot;

/// Keep-alive announced in the probe's CONNECT; the probe disconnects long before.
const PROBE_KEEP_ALIVE_SECS: u16 = 60;

/// Prefix of the probe's client-id. With 13 hex digits after it the id is 23 bytes, the
/// longest every MQTT 3.1.1 broker must accept.
const PROBE_ID_PREFIX: &str = "hm-health-";

/// MQTT DISCONNECT.
const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// Probes every health-checked pool of the applied snapshot until `stop` is cancelled. Told of
/// each swap through `swaps`: pools that appear get a checker, pools that disappear (or lose
/// `health`) lose theirs, and a changed `health` restarts the pool's checker.
pub async fn run(mut swaps: watch::Receiver<Arc<Snapshot>>, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut checkers: HashMap<String, (HealthSpec, CancellationToken, JoinHandle<()>)> = HashMap::new();
    loop {
        let snap = swaps.borrow_and_update().clone();
        let wanted: HashMap<&str, HealthSpec> =
            snap.pools.iter().filter_map(|p| p.health.clone().map(|h| (p.name.as_str(), h))).collect();
        checkers.retain(|name, (spec, token, _)| {
            let keep = wanted.get(name.as_str()) == Some(spec);
            if !keep {
                token.cancel();
            }
            keep
        });
        for (name, spec) in wanted {
            if !checkers.contains_key(name) {
                let token = stop.child_token();
                let task = tokio::spawn(check_pool(name.to_string(), swaps.clone(), metrics.clone(), token.clone()));
                checkers.insert(name.to_string(), (spec, token, task));
            }
        }
        drop(snap);
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = swaps.changed() => if changed.is_err() {
                // No more swaps: keep checking the last snapshot until stopped.
                stop.cancelled().await;
                break;
            },
        }
    }
    for (_, (_, token, task)) in checkers {
        token.cancel();
        let _ = task.await;
    }
}

/// The checker of one pool: a round of probes (all brokers at once) every `interval`, each
/// round on the pool as it is in the latest snapshot. A round in flight while a new snapshot
/// is swapped in still counts: the old snapshot's brokers share their state with the new
/// one's of the same identity.
async fn check_pool(
    name: String,
    swaps: watch::Receiver<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let Some(interval) = swaps.borrow().pool(&name).and_then(|p| p.health.as_ref()).map(|h| h.interval) else {
        return;
    };
    // Validation keeps it above 0; `interval` panics on 0.
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut labelled: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let Some(pool) = swaps.borrow().pool(&name).cloned() else { break };
        let Some(spec) = pool.health.clone() else { break };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = round(&pool, &spec, &metrics) => {}
        }
        // Forget the gauges of brokers that left the pool.
        for gone in labelled.iter().filter(|n| !pool.backends.iter().any(|b| &&b.name == n)) {
            let _ = metrics.broker_healthy.remove_label_values(&[&name, gone]);
        }
        labelled = pool.backends.iter().map(|b| b.name.clone()).collect();
    }
    for b in &labelled {
        let _ = metrics.broker_healthy.remove_label_values(&[&name, b]);
    }
}

/// Probes every broker of `pool` once, concurrently, and applies the results.
async fn round(pool: &Arc<Pool>, spec: &HealthSpec, metrics: &Metrics) {
    let mut probes = JoinSet::new();
    for (i, b) in pool.backends.iter().enumerate() {
        let (pool, addr, check, timeout) = (pool.clone(), b.addr, spec.check.clone(), spec.timeout);
        probes.spawn(async move { (i, probe(&pool, &check, addr, timeout).await) });
    }
    while let Some(done) = probes.join_next().await {
        let Ok((i, result)) = done else { continue };
        let b = &pool.backends[i];
        apply(pool, spec, b, result, metrics);
    }
}

/// Feeds one probe result into the broker's state (shared with every snapshot that lists the
/// broker, so a result is never lost to a swap); reports a transition.
fn apply(pool: &Pool, spec: &HealthSpec, b: &Backend, result: Result<(), String>, metrics: &Metrics) {
    let check = check_name(&spec.check);
    match result {
        Ok(()) => {
            if b.record_success(spec.rise) {
                let reason = format!("{} {check} checks passed in a row", spec.rise);
                report_transition(metrics, &pool.name, b, Transition::Up, &reason);
            }
        }
        Err(e) => {
            tracing::debug!(target: "harbormaster::health", pool = %pool.name, broker = %b.name, error = %e, "{check} check failed");
            if b.record_failure(spec.fall) {
                let reason = format!("{} failures in a row, last: {check} check: {e}", b.failure_streak());
                report_transition(metrics, &pool.name, b, Transition::Down, &reason);
            }
        }
    }
    metrics.set_broker_healthy(&pool.name, &b.name, b.is_healthy());
}

fn check_name(kind: &CheckKind) -> &'static str {
    match kind {
        CheckKind::Tcp => "tcp",
        CheckKind::Mqtt => "mqtt",
        CheckKind::Http(_) => "http",
    }
}

/// One probe of the broker at `addr`, all of it within `timeout`. `Err` says what failed.
pub async fn probe(pool: &Pool, kind: &CheckKind, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        // An HTTP check asks the broker's own HTTP port, on the broker's address.
        let target = match kind {
            CheckKind::Http(http) => SocketAddr::new(addr.ip(), http.port),
            CheckKind::Tcp | CheckKind::Mqtt => addr,
        };
        let stream = TcpStream::connect(target).await.map_err(|e| format!("connect: {e}"))?;
        match kind {
            CheckKind::Tcp => Ok(()),
            CheckKind::Mqtt => mqtt_probe(pool, stream).await,
            CheckKind::Http(http) => http_probe(http, stream, target).await,
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// PROXY header (command PROXY, the probe socket's own addresses, the pool's TLVs and budget)
/// when the pool sends one, CONNECT, CONNACK 0 expected, then DISCONNECT.
async fn mqtt_probe(pool: &Pool, mut stream: TcpStream) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let client_id = probe_client_id();
    let mut out = match pool.proxy_protocol {
        ProxyProtocol::None => Vec::new(),
        ProxyProtocol::V1 | ProxyProtocol::V2 => {
            let src = stream.local_addr().map_err(|e| format!("local address: {e}"))?;
            let dst = stream.peer_addr().map_err(|e| format!("peer address: {e}"))?;
            if pool.proxy_protocol == ProxyProtocol::V1 {
                proxy_header::encode_v1(src, dst)
            } else {
                let id = client_id.as_bytes();
                let input = HeaderInput { src, dst, tls: None, unique_id: id, client_id: id };
                proxy_header::encode_v2(&input, &pool.tlvs, pool.max_header_bytes).bytes
            }
        }
    };
    out.extend_from_slice(&connect_packet(&client_id));
    stream.write_all(&out).await.map_err(|e| format!("sending CONNECT: {e}"))?;
    let mut ack = [0u8; 4];
    stream.read_exact(&mut ack).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "closed before CONNACK".to_string(),
        _ => format!("reading CONNACK: {e}"),
    })?;
    check_connack(&ack)?;
    let _ = stream.write_all(&DISCONNECT).await;
    let _ = stream.shutdown().await;
    Ok(())
}

/// Largest response head an HTTP check reads (hyper's smallest read buffer): a readiness
/// answer is a status line and a few headers. The body is never read.
const HTTP_MAX_HEAD: usize = 8 * 1024;

/// `GET path` over HTTP/1.1 on `stream` (hyper's client connection, no pool, no redirects),
/// passing when the status is the expected one. Only the response head is read, within
/// [`HTTP_MAX_HEAD`]; the connection is dropped after it.
async fn http_probe(http: &HttpCheck, stream: TcpStream, target: SocketAddr) -> Result<(), String> {
    use http_body_util::Empty;
    use hyper::body::Bytes;

    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(HTTP_MAX_HEAD)
        .handshake::<_, Empty<Bytes>>(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    // The connection's task lives as long as the probe: dropped with it on timeout.
    let conn = async move {
        let _ = conn.await;
        std::future::pending::<()>().await
    };
    let mut request = hyper::Request::get(&http.path)
        .header(hyper::header::HOST, target.to_string())
        .header(hyper::header::USER_AGENT, concat!("harbormaster/", env!("CARGO_PKG_VERSION")))
        .header(hyper::header::CONNECTION, "close");
    if let Some(auth) = &http.authorization {
        request = request.header(hyper::header::AUTHORIZATION, auth);
    }
    let request = request.body(Empty::<Bytes>::new()).map_err(|e| format!("HTTP request: {e}"))?;
    let response = tokio::select! {
        r = sender.send_request(request) => r.map_err(|e| format!("HTTP: {e}"))?,
        _ = conn => unreachable!("the connection future never ends"),
    };
    let status = response.status().as_u16();
    if status == http.status {
        Ok(())
    } else {
        Err(format!("HTTP status {status} from {}, expected {}", http.path, http.status))
    }
}

/// A fresh client-id per probe (`hm-health-` + 13 hex digits, 23 bytes): two replicas'
/// probes never take over each other's session.
fn probe_client_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let seed = [nanos, u64::from(std::process::id()), COUNTER.fetch_add(1, Ordering::Relaxed)];
    let bytes: Vec<u8> = seed.iter().flat_map(|v| v.to_le_bytes()).collect();
    format!("{PROBE_ID_PREFIX}{:013x}", xxhash_rust::xxh3::xxh3_64(&bytes) >> 12)
}

/// MQTT 3.1.1 CONNECT with clean session, no will, no credentials.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02];
    body.extend_from_slice(&PROBE_KEEP_ALIVE_SECS.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    // The body is at most 12 + 23 bytes: a one-byte remaining length.
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// `Ok` for an MQTT 3.1.1 CONNACK with return code 0.
fn check_connack(ack: &[u8; 4]) -> Result<(), String> {
    if ack[0] != 0x20 || ack[1] != 0x02 {
        return Err(format!("expected a CONNACK, got {:02x} {:02x}", ack[0], ack[1]));
    }
    match ack[3] {
        0 => Ok(()),
        1 => Err("CONNACK return code 1 (unacceptable protocol version)".into()),
        2 => Err("CONNACK return code 2 (identifier rejected)".into()),
        3 => Err("CONNACK return code 3 (server unavailable)".into()),
        4 => Err("CONNACK return code 4 (bad user name or password)".into()),
        5 => Err("CONNACK return code 5 (not authorized)".into()),
        rc => Err(format!("CONNACK return code {rc}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::balance::{EmptyKey, HashKey};
    use crate::proxy::mqtt::{self, MqttVersion, Peek};
    use crate::proxy::proxy_header::Tlv;
    use crate::proxy::snapshot::Limits;
    use tokio::net::TcpListener;

    fn pool_with(addrs: &[SocketAddr], proxy_protocol: ProxyProtocol, health: Option<HealthSpec>) -> Pool {
        let names: Vec<(String, SocketAddr)> = addrs.iter().enumerate().map(|(i, a)| (format!("b{i}"), *a)).collect();
        named_pool("p", &names, proxy_protocol, health)
    }

    fn named_pool(
        name: &str,
        brokers: &[(String, SocketAddr)],
        proxy_protocol: ProxyProtocol,
        health: Option<HealthSpec>,
    ) -> Pool {
        Pool {
            name: name.into(),
            connect: Default::default(),
            backends: brokers.iter().map(|(n, a)| Arc::new(Backend::new(n.clone(), *a))).collect(),
            hash_key: HashKey::ClientId,
            empty_key: EmptyKey::LeastConnections,
            proxy_protocol,
            tlvs: vec![Tlv::UniqueId, Tlv::Crc32c, Tlv::ClientId],
            max_header_bytes: 500,
            backend_connect_timeout: Duration::from_secs(1),
            backend_connack_timeout: Duration::from_secs(1),
            backend_max_packet_size: None,
            backend_attempts: 3,
            planned_close_will: crate::proxy::balance::PlannedCloseWill::Keep,
            close_rate: 100,
            rebalance: crate::proxy::balance::Rebalance::Off,
            rebalance_rate: 20,
            health,
            hold: None,
            backend_transport: crate::proxy::balance::BackendTransport::Mqtt,
        }
    }

    fn snapshot(pools: Vec<Pool>) -> Snapshot {
        Snapshot {
            listeners: vec![],
            pools: pools.into_iter().map(Arc::new).collect(),
            limits: Limits {
                connect_timeout: Duration::from_secs(1),
                max_connect_packet: 1024,
                max_setup_bytes: 1 << 20,
                half_close_timeout: Duration::from_secs(1),
                admission: Default::default(),
            },
        }
    }

    fn spec(check: CheckKind, rise: u32, fall: u32) -> HealthSpec {
        HealthSpec { check, interval: Duration::from_millis(50), timeout: Duration::from_millis(500), rise, fall }
    }

    /// An HTTP server that answers every request with `response` and sends each request head
    /// it read on the channel.
    async fn http_server(response: Vec<u8>) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (tx, response) = (tx.clone(), response.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                    let _ = s.write_all(&response).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        (addr, rx)
    }

    fn http(port: u16, path: &str, status: u16, authorization: Option<&str>) -> CheckKind {
        let authorization = authorization.map(str::to_string);
        CheckKind::Http(Arc::new(HttpCheck { port, path: path.into(), status, authorization }))
    }

    #[tokio::test]
    async fn http_check_gets_the_path_on_the_brokers_address_and_wants_the_status() {
        let (addr, mut seen) = http_server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()).await;
        let p = pool_with(&[], ProxyProtocol::V2, None);
        // The broker's MQTT port is elsewhere: the check asks `port` on the broker's IP.
        let broker = SocketAddr::new(addr.ip(), 1);
        let ok = http(addr.port(), "/api/v1/health/readiness?x=1", 200, Some("Basic Z3Vlc3Q6Z3Vlc3Q="));
        assert_eq!(probe(&p, &ok, broker, Duration::from_secs(5)).await, Ok(()));
        let head = seen.recv().await.unwrap();
        assert!(head.starts_with("GET /api/v1/health/readiness?x=1 HTTP/1.1\r\n"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains(&format!("host: {addr}\r\n")), "{head}");
        assert!(lower.contains("authorization: basic z3vlc3q6z3vlc3q=\r\n"), "{head}");
        // No PROXY header, whatever the pool sends to MQTT.
        assert!(!head.starts_with("PROXY"));
        // Another expected status fails, saying what came.
        let err = probe(&p, &http(addr.port(), "/", 204, None), broker, Duration::from_secs(5)).await.unwrap_err();
        assert!(err.contains("200") && err.contains("204"), "{err}");
    }

    #[tokio::test]
    async fn http_check_fails_on_other_statuses_non_http_and_oversized_heads() {
        let p = pool_with(&[], ProxyProtocol::None, None);
        let t = Duration::from_secs(5);
        let (addr, _seen) =
            http_server(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n".to_vec()).await;
        let err = probe(&p, &http(addr.port(), "/", 200, None), addr, t).await.unwrap_err();
        assert!(err.contains("503"), "{err}");
        // Expecting 503 (a node that must be in maintenance, say) passes on it.
        assert_eq!(probe(&p, &http(addr.port(), "/", 503, None), addr, t).await, Ok(()));
        let (addr, _seen) = http_server(b"\x20\x02\x00\x00".to_vec()).await;
        assert!(probe(&p, &http(addr.port(), "/", 200, None), addr, t).await.is_err());
        // A head past the bound is not read to its end.
        let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b"x-filler: 0123456789abcdef\r\n".as_slice(), 4096).flatten());
        huge.extend_from_slice(b"content-length: 0\r\n\r\n");
        let (addr, _seen) = http_server(huge).await;
        assert!(probe(&p, &http(addr.port(), "/", 200, None), addr, t).await.is_err());
        let down = closed_port().await;
        let err = probe(&p, &http(down.port(), "/", 200, None), down, t).await.unwrap_err();
        assert!(err.starts_with("connect:"), "{err}");
    }

    /// A port nothing listens on.
    async fn closed_port() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    /// What a fake broker saw of one probe connection.
    #[derive(Debug, Default, Clone)]
    struct Seen {
        bytes: Vec<u8>,
        peer: Option<SocketAddr>,
        local: Option<SocketAddr>,
    }

    /// A fake broker: reads until a CONNECT (after an optional PROXY header of `header_len`
    /// bytes, found by parsing) is complete, answers `connack`, then records everything the
    /// probe sent until it closes.
    async fn fake_broker(connack: Option<[u8; 4]>) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Seen>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, peer)) = l.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut seen = Seen { peer: Some(peer), local: s.local_addr().ok(), ..Seen::default() };
                    let mut buf = [0u8; 1024];
                    let mut answered = false;
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        seen.bytes.extend_from_slice(&buf[..n]);
                        if !answered && connect_in(&seen.bytes).is_some() {
                            answered = true;
                            // Without an answer the probe must time out.
                            if let Some(a) = connack {
                                s.write_all(&a).await.unwrap();
                            }
                        }
                    }
                    let _ = tx.send(seen);
                });
            }
        });
        (addr, rx)
    }

    /// The CONNECT after whatever PROXY header precedes it: (client-id, where it starts, its
    /// length).
    fn connect_in(bytes: &[u8]) -> Option<(String, usize, usize)> {
        let start = header_len(bytes)?;
        match mqtt::peek_connect(&bytes[start..], 1024) {
            Ok(Peek::Complete { connect, len }) => {
                assert_eq!(connect.version, MqttVersion::V311);
                Some((String::from_utf8(connect.client_id.to_vec()).unwrap(), start, len))
            }
            _ => None,
        }
    }

    fn header_len(bytes: &[u8]) -> Option<usize> {
        if bytes.starts_with(b"PROXY ") {
            return bytes.windows(2).position(|w| w == b"\r\n").map(|i| i + 2);
        }
        if bytes.starts_with(b"\r\n\r\n\0\r\nQUIT\n") && bytes.len() >= 16 {
            return Some(16 + u16::from_be_bytes([bytes[14], bytes[15]]) as usize);
        }
        if bytes.first() == Some(&0x10) {
            return Some(0);
        }
        None
    }

    #[tokio::test]
    async fn tcp_check_passes_on_a_listening_port_and_fails_on_a_closed_one() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = l.local_addr().unwrap();
        let down = closed_port().await;
        let p = pool_with(&[up, down], ProxyProtocol::None, None);
        assert_eq!(probe(&p, &CheckKind::Tcp, up, Duration::from_secs(5)).await, Ok(()));
        let err = probe(&p, &CheckKind::Tcp, down, Duration::from_secs(5)).await.unwrap_err();
        assert!(err.starts_with("connect:"), "{err}");
    }

    #[tokio::test]
    async fn mqtt_check_sends_connect_then_disconnect_and_accepts_connack_0() {
        let (addr, mut seen) = fake_broker(Some([0x20, 0x02, 0x00, 0x00])).await;
        let p = pool_with(&[addr], ProxyProtocol::None, None);
        assert_eq!(probe(&p, &CheckKind::Mqtt, addr, Duration::from_secs(5)).await, Ok(()));
        let seen = seen.recv().await.unwrap();
        let (client_id, start, len) = connect_in(&seen.bytes).unwrap();
        assert_eq!(start, 0, "no PROXY header with proxy_protocol = none");
        assert!(client_id.starts_with(PROBE_ID_PREFIX) && client_id.len() == 23, "{client_id}");
        assert_eq!(seen.bytes[start + 9] & 0x02, 0x02, "clean session");
        assert_eq!(&seen.bytes[start + len..], &DISCONNECT, "DISCONNECT after the CONNACK, then close");
    }

    #[tokio::test]
    async fn mqtt_check_sends_the_pools_proxy_header_with_the_probe_socket_addresses() {
        let (addr, mut seen) = fake_broker(Some([0x20, 0x02, 0x00, 0x00])).await;
        let p = pool_with(&[addr], ProxyProtocol::V2, None);
        assert_eq!(probe(&p, &CheckKind::Mqtt, addr, Duration::from_secs(5)).await, Ok(()));
        let seen = seen.recv().await.unwrap();
        let header = match ppp::v2::Header::try_from(&seen.bytes[..]) {
            Ok(h) => h,
            Err(e) => panic!("not a PROXY v2 header: {e:?}"),
        };
        assert_eq!(header.command, ppp::v2::Command::Proxy, "never LOCAL: RabbitMQ and Mosquitto 2.1 reject it");
        match header.addresses {
            ppp::v2::Addresses::IPv4(a) => {
                let peer = seen.peer.unwrap();
                assert_eq!((a.source_address, a.source_port), (ip4(peer), peer.port()));
                let local = seen.local.unwrap();
                assert_eq!((a.destination_address, a.destination_port), (ip4(local), local.port()));
            }
            other => panic!("{other:?}"),
        }
        let (client_id, start, _) = connect_in(&seen.bytes).unwrap();
        assert_eq!(start, header.len());
        let tlvs: Vec<_> = header.tlvs().map(|t| t.unwrap()).collect();
        assert!(tlvs.iter().any(|t| t.kind == proxy_header::PP2_TYPE_CLIENT_ID && t.value == client_id.as_bytes()));

        let (addr, mut seen) = fake_broker(Some([0x20, 0x02, 0x00, 0x00])).await;
        let p = pool_with(&[addr], ProxyProtocol::V1, None);
        assert_eq!(probe(&p, &CheckKind::Mqtt, addr, Duration::from_secs(5)).await, Ok(()));
        let seen = seen.recv().await.unwrap();
        let peer = seen.peer.unwrap();
        let want = format!("PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n", peer.port(), addr.port());
        assert!(seen.bytes.starts_with(want.as_bytes()), "{:?}", String::from_utf8_lossy(&seen.bytes));
    }

    fn ip4(a: SocketAddr) -> std::net::Ipv4Addr {
        match a.ip() {
            std::net::IpAddr::V4(v4) => v4,
            other => panic!("{other}"),
        }
    }

    #[tokio::test]
    async fn mqtt_check_fails_on_refusal_silence_and_non_mqtt() {
        let (addr, _seen) = fake_broker(Some([0x20, 0x02, 0x00, 0x05])).await;
        let p = pool_with(&[addr], ProxyProtocol::None, None);
        let err = probe(&p, &CheckKind::Mqtt, addr, Duration::from_secs(5)).await.unwrap_err();
        assert!(err.contains("return code 5"), "{err}");

        let (addr, _seen) = fake_broker(None).await;
        let err = probe(&p, &CheckKind::Mqtt, addr, Duration::from_millis(300)).await.unwrap_err();
        assert!(err.starts_with("no answer within"), "{err}");

        let (addr, _seen) = fake_broker(Some(*b"HTTP")).await;
        let err = probe(&p, &CheckKind::Mqtt, addr, Duration::from_secs(5)).await.unwrap_err();
        assert!(err.starts_with("expected a CONNACK"), "{err}");

        // A TCP server that closes at once.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
        let err = probe(&p, &CheckKind::Mqtt, addr, Duration::from_secs(5)).await.unwrap_err();
        assert!(err.contains("CONNACK") || err.contains("CONNECT"), "{err}");
    }

    #[test]
    fn probe_connect_is_a_valid_clean_session_311_connect() {
        let id = probe_client_id();
        assert_ne!(id, probe_client_id(), "a fresh id per probe");
        let packet = connect_packet(&id);
        let Ok(Peek::Complete { connect, len }) = mqtt::peek_connect(&packet, 1024) else { panic!("{packet:02x?}") };
        assert_eq!(len, packet.len());
        assert_eq!(connect.version, MqttVersion::V311);
        assert_eq!(connect.client_id, id.as_bytes());
        assert_eq!(connect.username, None);
        assert_eq!(packet[9], 0x02, "clean session only");
    }

    /// Polls `f` (every 20 ms, at most `WAIT`) until it holds.
    async fn eventually(mut f: impl FnMut() -> bool) -> bool {
        const WAIT: Duration = Duration::from_secs(20);
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f()
    }

    #[tokio::test]
    async fn checker_marks_a_dead_broker_down_and_brings_it_back() {
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        let dead_addr = closed_port().await;
        let s =
            snapshot(vec![pool_with(&[live_addr, dead_addr], ProxyProtocol::None, Some(spec(CheckKind::Tcp, 2, 2)))]);
        let (_swaps, current) = watch::channel(Arc::new(s));
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(current.clone(), metrics.clone(), stop.clone()));

        let backend = |i: usize| current.borrow().pools[0].backends[i].clone();
        assert!(eventually(|| !backend(1).is_healthy()).await, "dead broker never marked down");
        assert!(backend(0).is_healthy());
        let gauge = |b: &str| metrics.value("broker_healthy", &[("pool", "p"), ("broker", b)]);
        assert!(eventually(|| gauge("b1") == 0.0 && gauge("b0") == 1.0).await);
        let transitions = |b: &str, state: &str| {
            metrics.value("broker_health_transitions_total", &[("pool", "p"), ("broker", b), ("state", state)])
        };
        assert_eq!(transitions("b1", "down"), 1.0);

        // The broker comes back on its port.
        let back = TcpListener::bind(dead_addr).await.unwrap();
        assert!(eventually(|| backend(1).is_healthy()).await, "broker never came back");
        assert_eq!(transitions("b1", "up"), 1.0);
        assert_eq!(transitions("b0", "down"), 0.0);

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("checker stops").unwrap();
        drop((live, back));
    }

    #[tokio::test]
    async fn checker_follows_snapshot_swaps() {
        let dead_addr = closed_port().await;
        let s = snapshot(vec![pool_with(&[dead_addr], ProxyProtocol::None, None)]);
        let (swaps, current) = watch::channel(Arc::new(s));
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(current.clone(), metrics.clone(), stop.clone()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(current.borrow().pools[0].backends[0].is_healthy(), "no checks without health");

        // A reload adds health checks to the pool.
        let new = snapshot(vec![pool_with(&[dead_addr], ProxyProtocol::None, Some(spec(CheckKind::Tcp, 1, 1)))]);
        swaps.send_replace(Arc::new(new));
        assert!(eventually(|| !current.borrow().pools[0].backends[0].is_healthy()).await);

        // And takes them away again: the checker of the pool ends, its gauge goes.
        swaps.send_replace(Arc::new(snapshot(vec![pool_with(&[dead_addr], ProxyProtocol::None, None)])));
        assert!(eventually(|| metrics.render().lines().all(|l| !l.starts_with("harbormaster_broker_healthy{"))).await);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("checker stops").unwrap();
    }
}
