//! Memory under abuse, against the real binary with a real mosquitto behind it: connections
//! still reading their CONNECT hold no more than `limits.max_setup_bytes` together (beyond it
//! they are refused: CONNACK 0x97 for 5.0, a plain close for 3.1.1), an established session
//! keeps working throughout, and after a storm (silent connections, or large incomplete
//! CONNECTs) the process's resident memory comes back to within 8 MiB of its baseline. On a
//! TLS listener, incomplete handshake records count against the same budget.
//!
//! Memory is read from /proc/PID/status (VmRSS). Waits are bounded polls, never timing
//! assertions.

use crate::support;

use std::io::{self, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::mqtt::{self, put_varint, MqttVersion};
use crate::support::*;

/// Size of the large CONNECTs: under the default `max_connect_packet` (262,144).
const BIG: usize = 262_000;
/// How close to its baseline the resident memory must come back after a storm.
const RSS_SLACK_KIB: u64 = 8 * 1024;
/// How long it may take to get there.
const RSS_RETURN: Duration = Duration::from_secs(60);

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

/// A valid CONNECT of exactly `len` bytes (16 KiB to 2 MiB): a will and credentials carry
/// the bulk, as a client with large fields would send them.
fn big_connect(version: MqttVersion, len: usize) -> Vec<u8> {
    let mut head = Vec::new();
    put_bytes(&mut head, if version == MqttVersion::V31 { b"MQIsdp" } else { b"MQTT" });
    head.push(version.level());
    head.push(0x02 | 0x04 | 0x40 | 0x80); // clean, will (QoS 0), password, username
    head.extend_from_slice(&60u16.to_be_bytes());
    if version.is_v5() {
        head.push(0); // CONNECT properties
    }
    put_bytes(&mut head, b"big");
    if version.is_v5() {
        head.push(0); // will properties
    }
    // Fixed header: 1 byte + a 3-byte remaining length; then four length-prefixed fields.
    let fill = len - 4 - head.len() - 4 * 2;
    let mut body = head;
    for i in 0..4 {
        let n = fill / 4 + usize::from(i < fill % 4);
        assert!(n <= usize::from(u16::MAX));
        put_bytes(&mut body, &vec![b'a' + i as u8; n]);
    }
    let mut out = vec![0x10];
    put_varint(&mut out, body.len());
    out.extend_from_slice(&body);
    assert_eq!(out.len(), len);
    out
}

/// Opens `n` connections and sends each all but the last byte of a `len`-byte CONNECT,
/// versions alternating as `versions` lists them. Returns each socket with its version and
/// whether harbormaster took all the bytes (false: it closed the connection first).
fn incomplete_connects(
    port: u16,
    n: usize,
    len: usize,
    versions: &[MqttVersion],
) -> Vec<(TcpStream, MqttVersion, bool)> {
    let packets: Vec<Vec<u8>> = versions.iter().map(|v| big_connect(*v, len)).collect();
    all_but_last_bytes(port, n, &packets).into_iter().map(|(s, i, took_all)| (s, versions[i], took_all)).collect()
}

/// Opens `n` connections and sends each all but the last byte of one of `messages` (in
/// turn). Returns each socket with the index of its message and whether harbormaster took all
/// the bytes (false: it closed the connection first).
fn all_but_last_bytes(port: u16, n: usize, messages: &[Vec<u8>]) -> Vec<(TcpStream, usize, bool)> {
    let mut conns: Vec<(TcpStream, usize, usize, Option<bool>)> = (0..n)
        .map(|i| {
            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_nonblocking(true).unwrap();
            (s, i % messages.len(), 0, None)
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    while conns.iter().any(|c| c.3.is_none()) {
        assert!(Instant::now() < deadline, "harbormaster neither took nor refused the bytes in time");
        for (s, m, sent, done) in conns.iter_mut().filter(|c| c.3.is_none()) {
            let bytes = &messages[*m][..messages[*m].len() - 1];
            match s.write(&bytes[*sent..]) {
                Ok(k) => *sent += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => *done = Some(false),
            }
            if *sent == bytes.len() {
                *done = Some(true);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    conns
        .into_iter()
        .map(|(s, m, _, done)| {
            s.set_nonblocking(false).unwrap();
            (s, m, done == Some(true))
        })
        .collect()
}

/// An MQTT 3.1.1 session through harbormaster, subscribed to its own topic: each round trip
/// publishes a message and reads it back from the broker.
struct Session<S = TcpStream> {
    s: S,
    round: usize,
}

impl Session {
    fn open(port: u16, client_id: &str) -> Session {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        Session::over(s, client_id)
    }
}

impl<S: io::Read + Write> Session<S> {
    fn over(mut s: S, client_id: &str) -> Session<S> {
        let connack = mqtt::connect_and_read_connack(&mut s, MqttVersion::V311, client_id).unwrap();
        assert!(mqtt::connack_accepted(&connack), "{connack:?}");
        s.write_all(&mqtt::subscribe(MqttVersion::V311, 1, "steady/t")).unwrap();
        mqtt::read_until_kind(&mut s, 9).expect("SUBACK");
        Session { s, round: 0 }
    }

    fn round_trip(&mut self, what: &str) {
        self.round += 1;
        let msg = format!("{what} ({})", self.round);
        self.s.write_all(&mqtt::publish_qos0(MqttVersion::V311, "steady/t", msg.as_bytes())).unwrap();
        loop {
            let p = mqtt::read_until_kind(&mut self.s, 3).unwrap_or_else(|e| panic!("{what}: the session broke: {e}"));
            if p.publish_topic_payload(MqttVersion::V311).1 == msg.as_bytes() {
                return;
            }
        }
    }
}

fn gauge(admin: u16, name: &str) -> f64 {
    metric_sum(&addr(admin), name, &[])
}

/// Waits (bounded) for the resident memory to come back within [`RSS_SLACK_KIB`] of
/// `baseline`; returns the last reading.
fn rss_back(pid: u32, baseline: u64) -> (bool, u64) {
    let mut rss = 0;
    let back = wait_until(RSS_RETURN, || {
        rss = vm_rss_kib(pid);
        rss <= baseline + RSS_SLACK_KIB
    });
    (back, rss)
}

/// A harbormaster in front of `broker`, its baseline taken after a few sessions went through
/// (so the code and buffers of a normal connection are already in memory).
fn warmed_up(broker: &Mosquitto, limits: &str) -> (Harbormaster, u16, u16, u64) {
    let config = one_pool_config(0, 0, &[("m0", broker)], "") + "\n[limits]\n" + limits;
    let hm = Harbormaster::start(&config);
    let (port, admin) = (hm.port("mqtt"), hm.admin_port());
    let client = MqttClient::plain(port, MqttVersion::V311);
    for i in 0..3 {
        client.publish_ok(&format!("warm-up-{i}"), "warm/t", "hello");
    }
    let mut s = Session::open(port, "warm-up-session");
    s.round_trip("warm-up");
    drop(s);
    assert!(wait_until(WAIT, || gauge(admin, "harbormaster_connections_active") == 0.0));
    std::thread::sleep(Duration::from_secs(1));
    let baseline = vm_rss_kib(hm.pid());
    (hm, port, admin, baseline)
}

/// Connections that send all but the last byte of 262,000-byte CONNECTs: together they hold
/// no more than `max_setup_bytes`; the others are refused (5.0: CONNACK 0x97; 3.1.1: closed),
/// logged and counted, while an established session and new small CONNECTs are served.
#[test]
fn incomplete_connects_stay_within_max_setup_bytes() {
    let _heavy = heavy();
    const MAX_SETUP: usize = 16 * 1024 * 1024;
    const ATTACKERS: usize = 300;
    let broker = Mosquitto::start();
    let (hm, port, admin, baseline) =
        warmed_up(&broker, &format!("connect_timeout = \"60s\"\nmax_setup_bytes = {MAX_SETUP}\n"));
    let mut steady = Session::open(port, "steady");
    steady.round_trip("before");

    let conns = incomplete_connects(port, ATTACKERS, BIG, &[MqttVersion::V5, MqttVersion::V311]);
    steady.round_trip("during");
    // Settled once every attacker still open holds its whole CONNECT and the others are gone
    // (the steady session is the one other open connection).
    let settled = wait_until(WAIT, || {
        let held = gauge(admin, "harbormaster_setup_bytes") as usize;
        let active = gauge(admin, "harbormaster_connections_active") as usize;
        held.is_multiple_of(BIG) && active == 1 + held / BIG
    });
    let held = gauge(admin, "harbormaster_setup_bytes") as usize;
    assert!(settled, "{held} setup bytes, {} connections", gauge(admin, "harbormaster_connections_active"));
    let peak = vm_rss_kib(hm.pid());
    println!("VmRSS: baseline {baseline} KiB, {ATTACKERS} incomplete CONNECTs {peak} KiB; setup bytes {held}");
    assert!(held <= MAX_SETUP, "setup_bytes {held} over max_setup_bytes {MAX_SETUP}");
    // Without the budget all 300 would be buffered: ~75 MiB.
    assert!(
        peak < baseline + (MAX_SETUP / 1024) as u64 + 16 * 1024,
        "VmRSS {peak} KiB with max_setup_bytes {MAX_SETUP}, baseline {baseline} KiB"
    );

    // A device with a small CONNECT still gets in: large buffers use only half the budget.
    MqttClient::plain(port, MqttVersion::V311).publish_ok("small-device", "steady/other", "hi");

    // Each connection was either buffered whole (within half the budget) or refused the way
    // its version understands.
    let mut open = 0;
    let mut refused = [0, 0];
    for (mut s, version, took_all) in conns {
        let (got, closed) = mqtt::read_until_close(&mut s, Duration::from_millis(200));
        if !closed {
            assert!(took_all && got.is_empty(), "{version:?}: open, yet got {got:?}");
            open += 1;
            continue;
        }
        if version == MqttVersion::V5 {
            assert_eq!(got, [0x20, 3, 0, 0x97, 0], "5.0: CONNACK quota exceeded");
            refused[0] += 1;
        } else {
            assert!(got.is_empty(), "3.1.1 has no code for it: a plain close, got {got:?}");
            refused[1] += 1;
        }
    }
    println!("{open} buffered whole, refused: {} (5.0), {} (3.1.1)", refused[0], refused[1]);
    assert!(open >= 1 && open * BIG <= MAX_SETUP / 2, "{open} connections buffered whole");
    assert!(refused[0] > 0 && refused[1] > 0, "{refused:?}");
    let refusals = |connack| {
        metric_sum(
            &addr(admin),
            "harbormaster_connections_refused_total",
            &[("reason", "max_setup_bytes"), ("connack", connack)],
        )
    };
    assert!(wait_until(WAIT, || refusals("0x97") == refused[0] as f64), "{}", refusals("0x97"));
    assert!(wait_until(WAIT, || refusals("none") == refused[1] as f64), "{}", refusals("none"));
    let line = hm.wait_connection_log("close_reason", "max_setup_bytes").expect("a log line");
    assert!(line.get("detail").is_some_and(|d| d.contains("max_setup_bytes")), "{line:?}");

    // The charges of closed connections are given back.
    assert!(wait_until(WAIT, || gauge(admin, "harbormaster_setup_bytes") == 0.0));
    steady.round_trip("after");
}

/// On a TLS listener: connections that send a handshake record header announcing 16 KiB and
/// all but the last byte of the record. rustls waits for the whole record, so each holds the
/// bytes in its receive buffer: together they hold no more than `max_setup_bytes`, the others
/// are closed, logged and counted like refused CONNECTs, while an established TLS session and a
/// new real TLS client (mosquitto_pub with a client certificate) are served.
#[test]
fn incomplete_tls_records_stay_within_max_setup_bytes() {
    let _heavy = heavy();
    const MAX_SETUP: usize = 4 * 1024 * 1024;
    const ATTACKERS: usize = 400;
    // A handshake record of the largest plaintext length; never completed, its content is
    // never looked at.
    let mut record = vec![0x16, 0x03, 0x01, 0x40, 0x00];
    record.resize(5 + 16 * 1024, 0);
    let certs = Certs::new();
    let broker = Mosquitto::start();
    let config = format!(
        "[[listener]]\nname = \"mqtts\"\nbind = \"127.0.0.1:0\"\npool = \"brokers\"\n{tls}\n\
         [pool.brokers]\nbackends = [{brokers}]\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [limits]\nconnect_timeout = \"60s\"\nmax_setup_bytes = {MAX_SETUP}\n",
        tls = certs.listener_tls_toml("optional"),
        brokers = named_backends(&[("m0", &broker)]),
    );
    let hm = Harbormaster::start(&config);
    let (port, admin) = (hm.port("mqtts"), hm.admin_port());
    let device = MqttClient::tls(port, MqttVersion::V311, certs.client_tls(true));
    device.publish_ok("warm-up", "warm/t", "hello");
    let tls = support::tls::connect_tls(
        port,
        "localhost",
        support::tls::client_config(&certs, true, support::tls::ClientTlsChoice::Default),
        None,
    )
    .expect("TLS session");
    let mut steady = Session::over(tls, "steady");
    steady.round_trip("before");
    assert!(wait_until(WAIT, || gauge(admin, "harbormaster_connections_active") == 1.0));
    let baseline = vm_rss_kib(hm.pid());

    let conns = all_but_last_bytes(port, ATTACKERS, std::slice::from_ref(&record));
    steady.round_trip("during");
    let refusals = || {
        metric_sum(&addr(admin), "harbormaster_connections_refused_total", &[("reason", "max_setup_bytes")]) as usize
    };
    // Settled once every attacker is either held open or refused; the setup bytes held never
    // exceed the budget meanwhile.
    let mut most = 0;
    let settled = wait_until(WAIT, || {
        let held = gauge(admin, "harbormaster_setup_bytes") as usize;
        most = most.max(held);
        let active = gauge(admin, "harbormaster_connections_active") as usize;
        active.saturating_sub(1) + refusals() == ATTACKERS
    });
    let held = gauge(admin, "harbormaster_setup_bytes") as usize;
    most = most.max(held);
    let active = gauge(admin, "harbormaster_connections_active") as usize;
    assert!(settled, "{held} setup bytes, {active} connections, {} refused", refusals());
    let peak = vm_rss_kib(hm.pid());
    println!(
        "VmRSS: baseline {baseline} KiB, {ATTACKERS} incomplete TLS records {peak} KiB; setup bytes {held} \
         (most seen {most}), {} held open, {} refused",
        active - 1,
        refusals()
    );
    assert!(most <= MAX_SETUP, "setup_bytes {most} over max_setup_bytes {MAX_SETUP}");
    assert!(held >= (active - 1) * (record.len() - 1), "every open attacker's bytes are charged: {held}");
    assert!(refusals() > 0, "without a budget for TLS buffers every attacker is held");
    assert!((active - 1) * (record.len() - 1) <= MAX_SETUP / 2, "{} attackers held", active - 1);

    // A device's handshake (a few KiB with its certificate) fits the half left for small
    // buffers.
    device.publish_ok("during-attack", "steady/other", "hi");

    let mut open = 0;
    let mut closed = 0;
    for (mut s, _, took_all) in conns {
        let (got, was_closed) = mqtt::read_until_close(&mut s, Duration::from_millis(200));
        if was_closed {
            closed += 1;
        } else {
            assert!(took_all && got.is_empty(), "open, yet got {got:?}");
            open += 1;
        }
    }
    println!("{open} held open, {closed} closed");
    assert_eq!(closed, refusals());
    let line = hm.wait_connection_log("close_reason", "max_setup_bytes").expect("a log line");
    assert!(line.get("detail").is_some_and(|d| d.contains("TLS handshake")), "{line:?}");

    // The charges of closed connections are given back.
    assert!(wait_until(WAIT, || gauge(admin, "harbormaster_setup_bytes") == 0.0));
    steady.round_trip("after");
    device.publish_ok("after-attack", "steady/other", "hi");
}

/// 4,000 connections that never speak, then close: the memory comes back.
#[test]
fn memory_returns_after_a_storm_of_silent_connections() {
    let _heavy = heavy();
    const SILENT: usize = 4_000;
    let broker = Mosquitto::start();
    let (hm, port, admin, baseline) = warmed_up(&broker, "connect_timeout = \"60s\"\n");
    let conns: Vec<TcpStream> = (0..SILENT).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    assert!(
        wait_until(WAIT, || gauge(admin, "harbormaster_connections_active") == SILENT as f64),
        "{} active",
        gauge(admin, "harbormaster_connections_active")
    );
    let peak = vm_rss_kib(hm.pid());
    drop(conns);
    assert!(wait_until(WAIT, || gauge(admin, "harbormaster_connections_active") == 0.0));
    let (back, rss) = rss_back(hm.pid(), baseline);
    println!("VmRSS: baseline {baseline} KiB, {SILENT} silent connections {peak} KiB, after {rss} KiB");
    assert!(back, "VmRSS {rss} KiB {RSS_RETURN:?} after the storm, baseline {baseline} KiB (peak {peak} KiB)");
    MqttClient::plain(port, MqttVersion::V311).publish_ok("after-storm", "steady/t", "hi");
}

/// Large incomplete CONNECTs, all within the default budget, then closed: the memory their
/// buffers took comes back.
#[test]
fn memory_returns_after_a_storm_of_large_incomplete_connects() {
    let _heavy = heavy();
    const LARGE: usize = 100; // ~25 MiB: under half the default max_setup_bytes
    let broker = Mosquitto::start();
    let (hm, port, admin, baseline) = warmed_up(&broker, "connect_timeout = \"60s\"\n");
    let conns = incomplete_connects(port, LARGE, BIG, &[MqttVersion::V311, MqttVersion::V5]);
    assert!(conns.iter().all(|c| c.2), "every CONNECT fits the default budget");
    let mut held = 0;
    let all_read = wait_until(WAIT, || {
        held = gauge(admin, "harbormaster_setup_bytes") as usize;
        held == LARGE * BIG
    });
    assert!(all_read, "{held} setup bytes");
    let peak = vm_rss_kib(hm.pid());
    drop(conns);
    assert!(wait_until(WAIT, || gauge(admin, "harbormaster_connections_active") == 0.0));
    let (back, rss) = rss_back(hm.pid(), baseline);
    println!("VmRSS: baseline {baseline} KiB, {LARGE} large CONNECTs {peak} KiB, after {rss} KiB");
    assert!(back, "VmRSS {rss} KiB {RSS_RETURN:?} after the storm, baseline {baseline} KiB (peak {peak} KiB)");
    MqttClient::plain(port, MqttVersion::V311).publish_ok("after-storm", "steady/t", "hi");
}
