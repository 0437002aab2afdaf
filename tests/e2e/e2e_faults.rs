//! Faults against the real binary and real mosquitto brokers: a broker killed under its
//! clients (and restarted), a black-hole broker address, a broker that never answers the
//! CONNECT, brokers that accept and then close or reset before answering, harbormaster killed
//! with SIGKILL and restarted, and two instances listing the same brokers in different orders.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use crate::support::mqtt::{self, MqttVersion};
use crate::support::{self, *};
use serde_json::Value;

/// A keep-alive HTTP/1.1 client for many `/route` lookups over one connection.
struct RouteClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RouteClient {
    fn new(admin: u16) -> RouteClient {
        let s = TcpStream::connect(("127.0.0.1", admin)).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_nodelay(true).unwrap();
        RouteClient { reader: BufReader::new(s.try_clone().unwrap()), writer: s }
    }

    /// `preference` of `/route?client_id=ID`.
    fn preference(&mut self, client_id: &str) -> Vec<String> {
        write!(self.writer, "GET /route?client_id={client_id} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        // The server writes head and body as two segments: acknowledge at once rather than
        // after the delayed-ACK timer, or each lookup takes 40 ms.
        socket2::SockRef::from(&self.writer).set_tcp_quickack(true).unwrap();
        let mut status = String::new();
        self.reader.read_line(&mut status).unwrap();
        assert!(status.contains(" 200 "), "{client_id}: {status}");
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body).unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        v["preference"].as_array().unwrap().iter().map(|b| b.as_str().unwrap().to_string()).collect()
    }
}

/// Connects `client_id` through harbormaster and reads its CONNACK.
fn mqtt_connect(port: u16, client_id: &str) -> TcpStream {
    let (s, connack) = support::mqtt_connect(port, MqttVersion::V311, client_id);
    assert_eq!(connack, [0x20, 2, 0, 0], "{client_id}");
    s
}

#[test]
fn a_killed_broker_closes_its_clients_they_reconnect_to_their_next_broker_and_come_back() {
    let (mut m0, m1, m2) = (Mosquitto::start(), Mosquitto::start(), Mosquitto::start());
    let brokers = [("m0", m0.addr()), ("m1", m1.addr()), ("m2", m2.addr())];
    let hm = Harbormaster::start(&one_pool_config(0, 0, &brokers, ""));
    let (port, admin) = (hm.port("mqtt"), hm.admin_port());
    let mut routes = RouteClient::new(admin);
    // Client-ids whose first choice is m0, with their second choices.
    let ids: Vec<(String, String)> = (0..200)
        .map(|i| format!("victim-{i}"))
        .filter_map(|id| {
            let p = routes.preference(&id);
            (p[0] == "m0").then(|| (id, p[1].clone()))
        })
        .take(4)
        .collect();
    assert_eq!(ids.len(), 4);
    let mut conns: Vec<TcpStream> = ids.iter().map(|(id, _)| mqtt_connect(port, id)).collect();
    for (id, _) in &ids {
        assert!(m0.wait_for_client(id, 1));
    }

    m0.stop();
    // Closed promptly towards the client: EOF (or reset), no hang until a keep-alive.
    for (s, (id, _)) in conns.iter_mut().zip(&ids) {
        let (_, closed) = mqtt::read_until_close(s, WAIT);
        assert!(closed, "{id}: still open after its broker died");
    }
    // The client, having seen the close, closes its side (as MQTT clients do).
    drop(conns);
    // ... and towards the broker: each connection logged its end.
    for (id, _) in &ids {
        let done = wait_until(WAIT, || {
            hm.connection_logs().iter().any(|m| m.get("client_id") == Some(id) && m.get("broker").is_some())
        });
        assert!(done, "{id}: no end-of-connection line\n{}", hm.log());
    }
    // Reconnecting, each lands on its own next broker.
    let live = [("m1", &m1), ("m2", &m2)];
    for (id, next) in &ids {
        let _s = mqtt_connect(port, id);
        assert_eq!(landed_on(&live, id), next, "{id}");
    }
    // When it returns (same address), new connections go back to it.
    m0.restart();
    for (id, _) in &ids {
        let before = m0.connection_count(id);
        let _s = mqtt_connect(port, id);
        assert!(m0.wait_for_client(id, before + 1), "{id} did not go back to m0\n{}", hm.log());
    }
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a connect to it
/// never completes.
fn black_hole() -> (socket2::Socket, Vec<TcpStream>, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let mut fill = Vec::new();
    for _ in 0..16 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(c) => fill.push(c),
            Err(_) => return (s, fill, addr),
        }
    }
    panic!("the accept queue of {addr} never filled");
}

#[test]
fn a_black_hole_broker_times_out_and_clients_fail_over() {
    let m1 = Mosquitto::start();
    let (_hole, _fill, hole_addr) = black_hole();
    let brokers = [("hole", hole_addr.to_string()), ("m1", m1.addr())];
    let hm = Harbormaster::start(&one_pool_config(0, 0, &brokers, "backend_connect_timeout = \"300ms\""));
    let (port, admin) = (hm.port("mqtt"), hm.admin_port());
    let mut routes = RouteClient::new(admin);
    let id = (0..100).map(|i| format!("hole-{i}")).find(|id| routes.preference(id)[0] == "hole").unwrap();
    let s = mqtt_connect(port, &id);
    assert!(m1.wait_for_client(&id, 1));
    // Its line is written when it ends.
    drop(s);
    let line = hm.wait_connection_log("client_id", &id).expect("no log line");
    assert_eq!(line.get("broker").map(String::as_str), Some("m1"), "{line:?}");
    let detail = line.get("detail").cloned().unwrap_or_default();
    assert!(detail.contains("failed over") && detail.contains("hole: timed out"), "{detail}");
}

/// A broker that accepts TCP and reads, but never answers: a hung process.
fn hung_broker() -> (SocketAddr, std::sync::mpsc::Receiver<Vec<u8>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut got = vec![0u8; 4096];
                let n = s.read(&mut got).unwrap_or(0);
                got.truncate(n);
                let _ = tx.send(got);
                // Hold the connection open, silent, until harbormaster gives up on it.
                let _ = s.read(&mut [0u8; 1]);
            });
        }
    });
    (addr, rx)
}

#[test]
fn a_broker_that_never_answers_the_connect_times_out_and_clients_fail_over() {
    let m1 = Mosquitto::start();
    let (hung_addr, got) = hung_broker();
    let brokers = [("hung", hung_addr.to_string()), ("m1", m1.addr())];
    let hm = Harbormaster::start(&one_pool_config(0, 0, &brokers, "backend_connack_timeout = \"400ms\""));
    let (port, admin) = (hm.port("mqtt"), hm.admin_port());
    let mut routes = RouteClient::new(admin);
    let id = (0..100).map(|i| format!("hung-{i}")).find(|id| routes.preference(id)[0] == "hung").unwrap();
    // The client gets m1's CONNACK, only m1's: the hung broker's connection gave nothing back.
    let s = mqtt_connect(port, &id);
    assert!(m1.wait_for_client(&id, 1));
    // The hung broker did get the CONNECT first.
    let first = got.recv_timeout(WAIT).expect("the hung broker got nothing");
    assert_eq!(first.first(), Some(&0x10), "{first:?}");
    assert!(first.windows(id.len()).any(|w| w == id.as_bytes()), "{first:?}");
    drop(s);
    let line = hm.wait_connection_log("client_id", &id).expect("no log line");
    assert_eq!(line.get("broker").map(String::as_str), Some("m1"), "{line:?}");
    let detail = line.get("detail").cloned().unwrap_or_default();
    assert!(detail.contains("failed over") && detail.contains("hung: no answer to CONNECT within 400ms"), "{detail}");
    let timeouts = metric_sum(
        &addr(admin),
        "harbormaster_broker_connect_attempts_total",
        &[("pool", "brokers"), ("broker", "hung"), ("outcome", "connack_timeout")],
    );
    assert_eq!(timeouts, 1.0);
}

#[test]
fn a_hung_only_broker_gets_its_client_a_server_unavailable_connack() {
    let (hung_addr, _got) = hung_broker();
    let brokers = [("hung", hung_addr.to_string())];
    let hm = Harbormaster::start(&one_pool_config(0, 0, &brokers, "backend_connack_timeout = \"300ms\""));
    let port = hm.port("mqtt");
    let (_s, connack) = support::mqtt_connect(port, MqttVersion::V5, "alone");
    assert_eq!(connack, [0x20, 3, 0, 0x88, 0], "CONNACK 5.0 server unavailable");
}

/// How a [`hanging_up_broker`] ends each connection it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HangUp {
    /// A FIN at once; what harbormaster sends is read (so the close stays a FIN).
    Close,
    /// An abortive close at once (SO_LINGER 0): a reset, which may reach harbormaster before
    /// or after it wrote the CONNECT.
    Reset,
    /// The CONNECT read, then an abortive close: a reset while harbormaster waits for the
    /// answer.
    ResetAfterConnect,
}

impl HangUp {
    /// The `outcome` of `broker_connect_attempts_total` for a dial to such a broker.
    fn outcome(self) -> &'static str {
        match self {
            HangUp::Close => "closed",
            HangUp::Reset | HangUp::ResetAfterConnect => "reset",
        }
    }
}

/// A broker that accepts TCP connections and hangs up on each before sending a byte: an
/// overloaded broker shedding connections, or a port that is not an MQTT broker.
fn hanging_up_broker(how: HangUp) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            match how {
                HangUp::Reset => {
                    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
                    drop(s);
                }
                HangUp::ResetAfterConnect => {
                    std::thread::spawn(move || {
                        let _ = s.set_read_timeout(Some(WAIT));
                        let _ = s.read(&mut [0u8; 4096]);
                        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
                    });
                }
                HangUp::Close => {
                    let _ = s.shutdown(Shutdown::Write);
                    std::thread::spawn(move || {
                        let _ = s.set_read_timeout(Some(WAIT));
                        let _ = std::io::copy(&mut s, &mut std::io::sink());
                    });
                }
            }
        }
    });
    addr
}

/// A broker that accepts and then closes or resets before answering is a failed dial: the
/// client fails over to its next broker (a real mosquitto) and gets that broker's CONNACK,
/// the attempt is counted with an outcome saying what happened, and passive health counts it
/// (`fall = 1` with hourly TCP probes, which such a broker passes: only the failed dial can
/// mark it down). A broker that resets at once may fail the TCP probe too, so it is tried
/// without probes below.
#[test]
fn a_broker_that_closes_or_resets_before_answering_is_a_failed_dial_and_clients_fail_over() {
    let m1 = Mosquitto::start();
    for how in [HangUp::Close, HangUp::ResetAfterConnect] {
        let brokers = [("faulty", hanging_up_broker(how).to_string()), ("m1", m1.addr())];
        let health = "health = { check = \"tcp\", interval = \"1h\", timeout = \"1s\", rise = 1, fall = 1 }";
        let hm = Harbormaster::start(&one_pool_config(0, 0, &brokers, health));
        let (port, admin) = (hm.port("mqtt"), hm.admin_port());
        // The first round of probes (at start) has passed: from now on only dials count.
        let probed = wait_until(WAIT, || {
            let (_, text) = http_get(&addr(admin), "/metrics");
            text.lines().any(|l| l.starts_with("harbormaster_broker_healthy{") && l.contains("broker=\"faulty\""))
        });
        assert!(probed, "{how:?}: the first probe never ended\n{}", hm.log());
        let mut routes = RouteClient::new(admin);
        let prefix = format!("{how:?}-").to_lowercase();
        let id = (0..100).map(|i| format!("{prefix}{i}")).find(|id| routes.preference(id)[0] == "faulty").unwrap();
        // mqtt_connect asserts the CONNACK "accepted": mosquitto's, the only broker to answer.
        let s = mqtt_connect(port, &id);
        assert!(m1.wait_for_client(&id, 1), "{how:?}: {id} never reached m1");
        drop(s);
        let line = hm.wait_connection_log("client_id", &id).expect("no log line");
        assert_eq!(line.get("broker").map(String::as_str), Some("m1"), "{how:?}: {line:?}");
        let detail = line.get("detail").cloned().unwrap_or_default();
        assert!(detail.starts_with("failed over: faulty: "), "{how:?}: {detail}");
        let attempts = |outcome: &str| {
            metric_sum(
                &addr(admin),
                "harbormaster_broker_connect_attempts_total",
                &[("pool", "brokers"), ("broker", "faulty"), ("outcome", outcome)],
            )
        };
        assert_eq!((attempts(how.outcome()), attempts("ok")), (1.0, 0.0), "{how:?}: {}", hm.log());
        let failovers = metric_sum(&addr(admin), "harbormaster_failovers_total", &[("pool", "brokers")]);
        assert_eq!(failovers, 1.0, "{how:?}");
        // Passive health: the failed dial marked the broker down.
        let down = metric_sum(
            &addr(admin),
            "harbormaster_broker_health_transitions_total",
            &[("pool", "brokers"), ("broker", "faulty"), ("state", "down")],
        );
        assert_eq!(down, 1.0, "{how:?}: not marked down\n{}", hm.log());
        let (status, body) = http_get(&addr(admin), "/backends");
        assert_eq!(status, 200, "{body}");
        let pools: Value = serde_json::from_str(&body).unwrap();
        let faulty = pools["pools"][0]["brokers"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["identity"] == "faulty"))
            .cloned()
            .unwrap_or_else(|| panic!("no broker faulty in /backends: {body}"));
        assert_eq!(faulty["healthy"], false, "{how:?}: {faulty}");
        let error = faulty["last_error"]["error"].as_str().unwrap_or_default();
        let said = match how {
            HangUp::Close => "closed the connection before answering CONNECT",
            HangUp::Reset | HangUp::ResetAfterConnect => "Connection reset by peer",
        };
        assert!(error.contains(said), "{how:?}: {faulty}");
        assert!(hm.log().contains("1 failures in a row, last: dial: "), "{how:?}:\n{}", hm.log());
    }
}

/// With only brokers that hang up before answering, the client gets CONNACK "server
/// unavailable" (3.1.1: return code 3; 5.0: 0x88) after all were tried, and each attempt
/// is counted as a failed dial.
#[test]
fn brokers_that_only_close_or_reset_get_their_client_a_server_unavailable_connack() {
    let brokers = [
        ("closes", hanging_up_broker(HangUp::Close).to_string()),
        ("resets", hanging_up_broker(HangUp::Reset).to_string()),
        ("resets-late", hanging_up_broker(HangUp::ResetAfterConnect).to_string()),
    ];
    let hm = Harbormaster::start(&one_pool_config(0, 0, &brokers, ""));
    let (port, admin) = (hm.port("mqtt"), hm.admin_port());
    for (version, want) in [(MqttVersion::V311, vec![0x20, 2, 0, 3]), (MqttVersion::V5, vec![0x20, 3, 0, 0x88, 0])] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let id = format!("stranded-{}", version.mosquitto_arg());
        let connack = mqtt::connect_and_read_connack(&mut s, version, &id).unwrap();
        assert_eq!(connack, want, "{id}\n{}", hm.log());
        let line = hm.wait_connection_log("client_id", &id).expect("no log line");
        assert_eq!(line.get("close_reason").map(String::as_str), Some("no_broker_available"), "{line:?}");
    }
    for (broker, outcome) in [("closes", "closed"), ("resets", "reset"), ("resets-late", "reset")] {
        let n = metric_sum(
            &addr(admin),
            "harbormaster_broker_connect_attempts_total",
            &[("pool", "brokers"), ("broker", broker), ("outcome", outcome)],
        );
        assert_eq!(n, 2.0, "{broker}: {}", hm.log());
    }
}

#[test]
fn after_sigkill_and_restart_clients_land_on_the_same_brokers() {
    let (m0, m1, m2) = (Mosquitto::start(), Mosquitto::start(), Mosquitto::start());
    let all = [("m0", &m0), ("m1", &m1), ("m2", &m2)];
    let brokers = [("m0", m0.addr()), ("m1", m1.addr()), ("m2", m2.addr())];
    // The restarted process must come back on the same port: chosen ahead.
    let (port, admin) = (free_port(), free_port());
    let text = one_pool_config(port, admin, &brokers, "");
    let ids: Vec<String> = (0..12).map(|i| format!("sticky-{i}")).collect();

    let hm = Harbormaster::start(&text);
    let mut before = Vec::new();
    for id in &ids {
        let s = mqtt_connect(port, id);
        before.push(landed_on(&all, id).to_string());
        drop(s);
    }
    send_signal(i64::from(hm.pid()), "KILL");
    assert!(wait_until(WAIT, || !port_accepts(port)), "still accepting after SIGKILL");
    drop(hm);

    let _hm = Harbormaster::start(&text);
    for (id, was) in ids.iter().zip(&before) {
        let n = all.iter().map(|(_, m)| m.connection_count(id)).sum::<usize>();
        let s = mqtt_connect(port, id);
        let now = wait_until(WAIT, || all.iter().map(|(_, m)| m.connection_count(id)).sum::<usize>() > n);
        assert!(now, "{id}: reconnect not seen by any broker");
        let on: Vec<&str> = all.iter().filter(|(_, m)| m.connection_count(id) >= 2).map(|(n, _)| *n).collect();
        assert_eq!(on, [was.as_str()], "{id}");
        drop(s);
    }
    assert_eq!(before.iter().collect::<std::collections::HashSet<_>>().len(), 3, "ids spread: {before:?}");
}

#[test]
fn two_instances_with_brokers_in_different_orders_route_10000_ids_identically() {
    let n: usize = std::env::var("HM_ROUTE_IDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    // Routing never dials: these addresses need no broker behind them.
    let brokers: Vec<(String, String)> =
        (0..10).map(|i| (format!("b{i}"), format!("127.0.0.1:{}", 20_000 + i))).collect();
    let forward: Vec<(&str, String)> = brokers.iter().map(|(n, a)| (n.as_str(), a.clone())).collect();
    let mut shuffled = forward.clone();
    shuffled.reverse();
    shuffled.swap(2, 7);
    let one = Harbormaster::start(&one_pool_config(0, 0, &forward, ""));
    let two = Harbormaster::start(&one_pool_config(0, 0, &shuffled, ""));
    let (mut r1, mut r2) = (RouteClient::new(one.admin_port()), RouteClient::new(two.admin_port()));
    let mut firsts = std::collections::HashMap::new();
    for i in 0..n {
        let id = format!("device-{i:05}");
        let (x, y) = (r1.preference(&id), r2.preference(&id));
        assert_eq!(x, y, "{id}");
        *firsts.entry(x[0].clone()).or_insert(0usize) += 1;
    }
    assert_eq!(firsts.len(), 10, "every broker gets ids: {firsts:?}");
}
