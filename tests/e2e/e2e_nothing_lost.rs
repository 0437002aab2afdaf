//! Nothing acknowledged is lost: QoS 1 publishers and subscribers through harbormaster to real,
//! persistent mosquitto brokers, while each broker is stopped (SIGTERM) and restarted and
//! harbormaster's config is reloaded (SIGHUP, a broker added). Every message whose PUBACK
//! reached its publisher reaches its subscriber; duplicates are allowed (QoS 1 is
//! at-least-once) and counted.
//!
//! Plain mosquitto brokers are not clustered, so a publisher and its subscriber must share a
//! broker: their client-ids are chosen so that both have the same first broker, before and
//! after the reload, and the pool has `backend_attempts = 1`, so that while its broker is down
//! a client is refused (CONNACK "server unavailable") and retries, as a device does while its
//! home broker restarts, instead of failing over to a broker its partner is not on.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::mqtt::{self, ConnectOptions, MqttVersion, Packet};
use crate::support::*;

const V: MqttVersion = MqttVersion::V311;
/// Upper bound for the whole test; every wait below is bounded by it.
const RUN_BOUND: Duration = Duration::from_secs(60);
/// Upper bound for one expected answer (CONNACK, SUBACK, PUBACK) before the client gives up
/// on the connection and reconnects.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Socket read timeout: short, so a client notices "stop" quickly. A timeout never loses a
/// byte (see `Conn::next`).
const POLL: Duration = Duration::from_millis(200);
/// Pause between two connection attempts while a client's broker is away.
const RETRY: Duration = Duration::from_millis(50);
/// Pause between two messages of a publisher, so publishing spans the disruptions.
const PACE: Duration = Duration::from_millis(1);
/// Messages every publisher gets acknowledged between two disruptions (and before the first,
/// and after the last).
const STEP: usize = 300;
const KEEP_ALIVE: u16 = 30;
/// mosquitto's default `max_inflight_messages`: QoS 1 messages it sends a client before
/// waiting for PUBACKs. Anything beyond it waiting for a subscriber is queued in the broker.
const MOSQUITTO_INFLIGHT: usize = 20;

/// Set when a client thread panics, so the main thread fails at once instead of waiting for
/// progress that will not come.
static CLIENT_FAILED: AtomicBool = AtomicBool::new(false);

struct FailureFlag;

impl Drop for FailureFlag {
    fn drop(&mut self) {
        if thread::panicking() {
            CLIENT_FAILED.store(true, Ordering::SeqCst);
        }
    }
}

/// Waits like `wait_until`, bounded by the run's deadline; panics if a client thread did.
fn wait_for(deadline: Instant, bound: Duration, mut f: impl FnMut() -> bool) -> bool {
    let bound = bound.min(deadline.saturating_duration_since(Instant::now()));
    let done = wait_until(bound, || CLIENT_FAILED.load(Ordering::SeqCst) || f());
    assert!(!CLIENT_FAILED.load(Ordering::SeqCst), "a client thread panicked (message above)");
    done
}

/// One publisher/subscriber pair and what each side saw.
struct Pair {
    broker: String,
    pub_id: String,
    sub_id: String,
    topic: String,
    /// Numbers whose PUBACK reached the publisher.
    acked: Mutex<BTreeSet<u64>>,
    /// Numbers sent at least once (acknowledged or not).
    sent: AtomicU64,
    /// Number → times the subscriber received it.
    received: Mutex<BTreeMap<u64, usize>>,
    subscribed: AtomicBool,
    /// The subscriber is away: it neither reads nor reconnects, so its broker queues its
    /// messages (`max_queued_messages 0`: no limit).
    away: AtomicBool,
    /// Acknowledged messages the subscriber had not received when its broker stopped: they
    /// were the broker's to keep across the restart (up to `MOSQUITTO_INFLIGHT` of them sent
    /// and unread in a socket, the rest only in the broker's queue).
    held_at_stop: AtomicUsize,
    /// PUBLISHes received with DUP set: resent by the broker after a reconnect.
    dup_flagged: AtomicUsize,
    /// Accepted connections after the first one.
    pub_reconnects: AtomicUsize,
    sub_reconnects: AtomicUsize,
    /// Reconnections of the subscriber whose CONNACK said "session present".
    sub_sessions_resumed: AtomicUsize,
    /// Connection attempts refused (CONNACK return code != 0) or failed, both clients.
    refused: AtomicUsize,
}

impl Pair {
    fn new(broker: &str, pub_id: String, sub_id: String, topic: String) -> Pair {
        Pair {
            broker: broker.to_string(),
            pub_id,
            sub_id,
            topic,
            acked: Mutex::default(),
            sent: AtomicU64::new(0),
            received: Mutex::default(),
            subscribed: AtomicBool::new(false),
            away: AtomicBool::new(false),
            held_at_stop: AtomicUsize::new(0),
            dup_flagged: AtomicUsize::new(0),
            pub_reconnects: AtomicUsize::new(0),
            sub_reconnects: AtomicUsize::new(0),
            sub_sessions_resumed: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        }
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Acknowledged numbers the subscriber has not received (yet).
    fn missing(&self) -> Vec<u64> {
        let received = self.received.lock().unwrap();
        self.acked.lock().unwrap().iter().filter(|n| !received.contains_key(n)).copied().collect()
    }
}

/// An MQTT connection through harbormaster that reads whole packets into its own buffer: a
/// read timeout in the middle of a packet keeps the bytes read so far, so a short timeout is
/// just "nothing complete yet", never a lost or misframed byte.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.s.write_all(bytes)
    }

    /// The next packet; `None` when none completed within the read timeout.
    fn next(&mut self) -> io::Result<Option<Packet>> {
        loop {
            if let Some((p, used)) = mqtt::parse_packet(&self.buf) {
                self.buf.drain(..used);
                return Ok(Some(p));
            }
            let mut chunk = [0u8; 8192];
            match self.s.read(&mut chunk) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed")),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads until a packet of `kind` (with packet id `id` when given) arrives; `on_other`
    /// sees every other packet. Fails after `ANSWER_TIMEOUT`.
    fn wait_for(
        &mut self,
        kind: u8,
        id: Option<u16>,
        mut on_other: impl FnMut(&mut Conn, Packet),
    ) -> io::Result<Packet> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            match self.next()? {
                Some(p) if p.kind() == kind && id.is_none_or(|id| packet_id(&p) == id) => return Ok(p),
                Some(p) => on_other(self, p),
                None if Instant::now() >= deadline => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no packet of type {kind}")))
                }
                None => {}
            }
        }
    }
}

/// The packet id of a PUBACK/SUBACK (first two bytes of the body) or of a QoS 1/2 PUBLISH
/// (after the topic).
fn packet_id(p: &Packet) -> u16 {
    let b = &p.body;
    let at = if p.kind() == 3 { 2 + u16::from_be_bytes([b[0], b[1]]) as usize } else { 0 };
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// One attempt: TCP to harbormaster, CONNECT (clean session 0), CONNACK. The connection and
/// the CONNACK's session-present flag when it was accepted.
fn try_connect(port: u16, client_id: &str) -> io::Result<(Conn, bool)> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(POLL))?;
    s.set_nodelay(true)?;
    let mut c = Conn { s, buf: Vec::new() };
    let opts = ConnectOptions { keep_alive: KEEP_ALIVE, clean: false, ..Default::default() };
    c.send(&mqtt::connect_with(V, client_id, &opts))?;
    let connack = c.wait_for(2, None, |_, p| panic!("{client_id}: {} before CONNACK", hex(&p.bytes())))?;
    match connack.body[..] {
        [flags, 0] => Ok((c, flags & 1 == 1)),
        _ => Err(io::Error::other(format!("CONNACK {}", hex(&connack.bytes())))),
    }
}

/// Connects, retrying every `RETRY` while the broker is away (harbormaster answers "server
/// unavailable", `backend_attempts = 1`). `None` once `stop` is set.
fn connect_retrying(
    port: u16,
    client_id: &str,
    pair: &Pair,
    stop: &AtomicBool,
    deadline: Instant,
) -> Option<(Conn, bool)> {
    loop {
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        match try_connect(port, client_id) {
            Ok(c) => return Some(c),
            Err(e) => {
                pair.refused.fetch_add(1, Ordering::SeqCst);
                assert!(Instant::now() < deadline, "{client_id}: still not connected at the run's bound: {e}");
                thread::sleep(RETRY);
            }
        }
    }
}

/// A subscriber with a persistent session: subscribes (QoS 1) when the broker has no session
/// for it, acknowledges and records every PUBLISH, reconnects after any error or close.
fn run_subscriber(port: u16, pair: &Pair, stop: &AtomicBool, deadline: Instant) {
    let id = pair.sub_id.as_str();
    let mut connections = 0usize;
    loop {
        while pair.away.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(10));
        }
        let Some((mut c, session_present)) = connect_retrying(port, id, pair, stop, deadline) else {
            return;
        };
        connections += 1;
        if connections > 1 {
            pair.sub_reconnects.fetch_add(1, Ordering::SeqCst);
            if session_present {
                pair.sub_sessions_resumed.fetch_add(1, Ordering::SeqCst);
            }
        }
        if let Err(e) = subscriber_session(&mut c, pair, session_present, stop) {
            eprintln!("{id}: connection lost ({e}); reconnecting");
            continue;
        }
        let _ = c.send(&mqtt::disconnect());
        return;
    }
}

/// One connection of a subscriber; `Ok` when told to stop.
fn subscriber_session(c: &mut Conn, pair: &Pair, session_present: bool, stop: &AtomicBool) -> io::Result<()> {
    // A PUBLISH may come before the SUBACK (mosquitto delivers as soon as the subscription is
    // in place): handled like any other.
    let handle = |c: &mut Conn, p: Packet| -> io::Result<()> {
        match p.kind() {
            3 => {
                let (topic, payload) = p.publish_topic_payload(V);
                assert_eq!(topic, pair.topic, "{}: PUBLISH on another pair's topic", pair.sub_id);
                let n: u64 = std::str::from_utf8(&payload).ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
                    panic!("{}: unexpected payload {}", pair.sub_id, hex(&payload));
                });
                assert_eq!((p.first >> 1) & 3, 1, "{}: PUBLISH not QoS 1: {}", pair.sub_id, hex(&p.bytes()));
                if p.first & 0x08 != 0 {
                    pair.dup_flagged.fetch_add(1, Ordering::SeqCst);
                }
                // Recorded before the PUBACK, as an application consumes before acknowledging:
                // what the broker may forget is already here.
                *pair.received.lock().unwrap().entry(n).or_insert(0) += 1;
                c.send(&mqtt::puback(packet_id(&p)))
            }
            13 => Ok(()),
            _ => panic!("{}: unexpected packet {}", pair.sub_id, hex(&p.bytes())),
        }
    };
    if !session_present {
        c.send(&mqtt::subscribe_qos(V, 1, &pair.topic, 1))?;
        let mut failed = None;
        let suback = c.wait_for(9, Some(1), |c, p| {
            if let Err(e) = handle(c, p) {
                failed.get_or_insert(e);
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        assert_eq!(suback.body[2..], [1], "{}: SUBACK {}", pair.sub_id, hex(&suback.bytes()));
        pair.subscribed.store(true, Ordering::SeqCst);
    }
    let mut last_sent = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if pair.away.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        match c.next()? {
            Some(p) => {
                handle(c, p)?;
                last_sent = Instant::now();
            }
            None if last_sent.elapsed() > Duration::from_secs(u64::from(KEEP_ALIVE) / 3) => {
                c.send(&mqtt::pingreq())?;
                last_sent = Instant::now();
            }
            None => {}
        }
    }
    Ok(())
}

/// A publisher with a persistent session, stop-and-wait: PUBLISH number n (QoS 1), wait for
/// its PUBACK, record n as acknowledged, next. After an error it reconnects and resends the
/// same message (same packet id, DUP set). Stops, between two messages, when told.
fn run_publisher(port: u16, pair: &Pair, stop: &AtomicBool, deadline: Instant) {
    let id = pair.pub_id.as_str();
    let never = AtomicBool::new(false);
    let mut conn: Option<Conn> = None;
    let mut connections = 0usize;
    let mut packet_id: u16 = 0;
    let mut n: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        packet_id = packet_id.checked_add(1).unwrap_or(1);
        let payload = n.to_string();
        pair.sent.store(n + 1, Ordering::SeqCst);
        let mut resend = false;
        loop {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => {
                    // A message in flight is always finished: `never` instead of `stop`.
                    let (c, _) = connect_retrying(port, id, pair, &never, deadline).unwrap();
                    connections += 1;
                    if connections > 1 {
                        pair.pub_reconnects.fetch_add(1, Ordering::SeqCst);
                    }
                    conn.insert(c)
                }
            };
            let mut publish = mqtt::publish_qos1(V, packet_id, &pair.topic, payload.as_bytes());
            if resend {
                publish[0] |= 0x08; // DUP
            }
            let outcome = c.send(&publish).and_then(|()| {
                c.wait_for(4, Some(packet_id), |_, p| panic!("{id}: unexpected packet {}", hex(&p.bytes())))
            });
            match outcome {
                Ok(_) => break,
                Err(e) => {
                    eprintln!("{id}: message {n} not acknowledged ({e}); reconnecting to resend it");
                    conn = None;
                    resend = true;
                }
            }
        }
        pair.acked.lock().unwrap().insert(n);
        n += 1;
        thread::sleep(PACE);
    }
    if let Some(mut c) = conn {
        let _ = c.send(&mqtt::disconnect());
    }
}

/// A client whose broker is down is refused and retries; it never moves to another broker,
/// which would separate it from its partner.
fn config(brokers: &[(&str, &Mosquitto)]) -> String {
    one_pool_config(0, 0, brokers, "backend_attempts = 1")
}

/// The first `n` ids `PREFIX-I` whose first broker is `broker` under both configs.
fn ids_staying_on(before: &Path, after: &Path, broker: &str, prefix: &str, n: usize) -> Vec<String> {
    let mut found = Vec::new();
    for i in 0..300 {
        let id = format!("{prefix}-{i}");
        if route(before, &id, None)[0] == broker && route(after, &id, None)[0] == broker {
            found.push(id);
            if found.len() == n {
                return found;
            }
        }
    }
    panic!("fewer than {n} of 300 ids {prefix}-* stay on {broker} across the reload");
}

/// `preference` of `GET /route?client_id=ID` on the admin server.
fn admin_route(admin: u16, client_id: &str) -> Vec<String> {
    let (_, body) = http_get(&addr(admin), &format!("/route?client_id={client_id}"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("/route ({e}): {body}"));
    v["preference"].as_array().unwrap().iter().map(|b| b.as_str().unwrap().to_string()).collect()
}

fn figures(pairs: &[Arc<Pair>]) -> String {
    pairs
        .iter()
        .map(|p| {
            let received = p.received.lock().unwrap();
            let total: usize = received.values().sum();
            format!(
                "{} on {}: acked {} received {} (distinct {}, duplicates {}, DUP-flagged {}) held by the \
                 stopped broker {} reconnects pub {} sub {} (session resumed {}) refused/failed attempts {}",
                p.topic,
                p.broker,
                p.acked_count(),
                total,
                received.len(),
                total - received.len(),
                p.dup_flagged.load(Ordering::SeqCst),
                p.held_at_stop.load(Ordering::SeqCst),
                p.pub_reconnects.load(Ordering::SeqCst),
                p.sub_reconnects.load(Ordering::SeqCst),
                p.sub_sessions_resumed.load(Ordering::SeqCst),
                p.refused.load(Ordering::SeqCst),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until every publisher of `pairs` on `broker` (`None`: all) has `step` more
/// acknowledged messages than now.
fn wait_progress(pairs: &[Arc<Pair>], broker: Option<&str>, step: usize, deadline: Instant, stage: &str) {
    let mine = |p: &Pair| broker.is_none_or(|b| p.broker == b);
    let targets: Vec<usize> = pairs.iter().map(|p| p.acked_count() + step).collect();
    let done =
        wait_for(deadline, RUN_BOUND, || pairs.iter().zip(&targets).all(|(p, t)| !mine(p) || p.acked_count() >= *t));
    assert!(done, "publishers made no progress {stage}:\n{}", figures(pairs));
}

/// Stops `broker` as a rolling update does (SIGTERM: a persistent mosquitto saves its sessions
/// and their queued and in-flight messages) with messages waiting for its subscribers, and
/// starts it again on the same address.
///
/// Its subscribers go away first, so that acknowledged messages pile up on the broker (the
/// first up to its in-flight window, sent but not yet acknowledged, the rest queued); they
/// stay away until the restarted broker has queued more for their restored sessions.
fn restart_with_messages_waiting(broker: &mut Mosquitto, name: &str, pairs: &[Arc<Pair>], deadline: Instant) {
    let mine: Vec<&Arc<Pair>> = pairs.iter().filter(|p| p.broker == name).collect();
    for p in &mine {
        p.away.store(true, Ordering::SeqCst);
    }
    wait_progress(pairs, Some(name), STEP / 3, deadline, &format!("while {name}'s subscribers were away"));
    broker.stop_graceful();
    for p in &mine {
        p.held_at_stop.fetch_add(p.missing().len(), Ordering::SeqCst);
    }
    thread::sleep(Duration::from_millis(300));
    broker.restart();
    wait_progress(pairs, Some(name), STEP / 3, deadline, &format!("after {name} restarted"));
    for p in &mine {
        p.away.store(false, Ordering::SeqCst);
    }
}

#[test]
fn every_acknowledged_qos1_message_arrives_across_broker_restarts_and_a_reload() {
    let _heavy = heavy();
    let deadline = Instant::now() + RUN_BOUND;
    let (mut a, mut b, c) =
        (Mosquitto::start_persistent(), Mosquitto::start_persistent(), Mosquitto::start_persistent());
    let dir = tempfile::Builder::new().prefix("hm-lb-").tempdir().unwrap();
    let config_path = dir.path().join("harbormaster.toml");
    fs::write(&config_path, config(&[("a", &a), ("b", &b)])).unwrap();
    // The reloaded config, kept outside the watched folder until it is swapped in.
    let staging = tempfile::Builder::new().prefix("hm-next-").tempdir().unwrap();
    let next_path = staging.path().join("harbormaster.toml");
    fs::write(&next_path, config(&[("a", &a), ("b", &b), ("c", &c)])).unwrap();

    // Two pairs per broker, each id on the same broker before and after broker c is added.
    let mut pairs = Vec::new();
    for broker in ["a", "b"] {
        let pubs = ids_staying_on(&config_path, &next_path, broker, &format!("nl-pub-{broker}"), 2);
        let subs = ids_staying_on(&config_path, &next_path, broker, &format!("nl-sub-{broker}"), 2);
        for (pub_id, sub_id) in pubs.into_iter().zip(subs) {
            let topic = format!("nl/{}", pairs.len());
            pairs.push(Arc::new(Pair::new(broker, pub_id, sub_id, topic)));
        }
    }
    let hm = Harbormaster::start_with_file(dir, config_path.clone());
    let (port, admin) = (hm.port("mqtt"), hm.admin_port());

    let stop_subs = Arc::new(AtomicBool::new(false));
    let stop_pubs = Arc::new(AtomicBool::new(false));
    let spawn = |pair: &Arc<Pair>, stop: &Arc<AtomicBool>, f: fn(u16, &Pair, &AtomicBool, Instant)| {
        let (pair, stop) = (pair.clone(), stop.clone());
        thread::spawn(move || {
            let _flag = FailureFlag;
            f(port, &pair, &stop, deadline)
        })
    };
    let subscribers: Vec<_> = pairs.iter().map(|p| spawn(p, &stop_subs, run_subscriber)).collect();
    // Publishing starts once every subscription is in place: a message published before would
    // be acknowledged and delivered to nobody.
    let subscribed = wait_for(deadline, WAIT, || pairs.iter().all(|p| p.subscribed.load(Ordering::SeqCst)));
    assert!(subscribed, "subscribers not subscribed:\n{}\n{}", figures(&pairs), hm.log());
    for p in &pairs {
        let home = if p.broker == "a" { &a } else { &b };
        assert!(home.has_client(&p.sub_id), "{} is not on {}", p.sub_id, p.broker);
    }
    let publishers: Vec<_> = pairs.iter().map(|p| spawn(p, &stop_pubs, run_publisher)).collect();
    wait_progress(&pairs, None, STEP, deadline, "before the first disruption");

    // 1. Broker a restarts with messages waiting for its subscribers.
    restart_with_messages_waiting(&mut a, "a", &pairs, deadline);
    wait_progress(&pairs, None, STEP, deadline, "after a restarted");

    // 2. Reload with broker c added. The file is swapped in whole (rename), so the folder
    //    watcher never reads half of it; SIGHUP as well, and either may apply it first.
    let swap = config_path.with_file_name(".harbormaster.toml.new");
    fs::copy(&next_path, &swap).unwrap();
    fs::rename(&swap, &config_path).unwrap();
    hm.sighup();
    let reloaded = wait_until(WAIT, || admin_route(admin, &pairs[0].pub_id).len() == 3);
    assert!(reloaded, "broker c never appeared in /route:\n{}", hm.log());
    assert!(hm.log().contains("config reloaded"), "{}", hm.log());
    for p in &pairs {
        for id in [&p.pub_id, &p.sub_id] {
            assert_eq!(admin_route(admin, id)[0], p.broker, "{id} would move after the reload");
        }
    }
    wait_progress(&pairs, None, STEP, deadline, "after the reload");

    // 3. Broker b restarts the same way.
    restart_with_messages_waiting(&mut b, "b", &pairs, deadline);
    wait_progress(&pairs, None, STEP, deadline, "after b restarted");

    stop_pubs.store(true, Ordering::SeqCst);
    for t in publishers {
        t.join().expect("a publisher failed");
    }
    let all_arrived = wait_for(deadline, WAIT, || pairs.iter().all(|p| p.missing().is_empty()));
    stop_subs.store(true, Ordering::SeqCst);
    for t in subscribers {
        t.join().expect("a subscriber failed");
    }

    let report = figures(&pairs);
    eprintln!("{report}");
    for p in &pairs {
        let missing = p.missing();
        assert!(
            all_arrived && missing.is_empty(),
            "{}: {} acknowledged messages never reached {}: {:?}\n{report}",
            p.topic,
            missing.len(),
            p.sub_id,
            &missing[..missing.len().min(50)]
        );
        let sent = p.sent.load(Ordering::SeqCst);
        let received = p.received.lock().unwrap();
        assert!(received.keys().all(|n| *n < sent), "{}: received a number never published\n{report}", p.topic);
        // The run disrupted every client, and the broker kept each subscriber's session.
        assert!(p.pub_reconnects.load(Ordering::SeqCst) >= 1, "{} never reconnected\n{report}", p.pub_id);
        assert!(p.sub_reconnects.load(Ordering::SeqCst) >= 1, "{} never reconnected\n{report}", p.sub_id);
        assert!(
            p.sub_sessions_resumed.load(Ordering::SeqCst) >= 1,
            "{}: its broker lost its session across the restart\n{report}",
            p.sub_id
        );
        // More acknowledged messages were waiting when the broker stopped than it ever has in
        // flight: some were only in its queue, so they came back from its persistence file.
        assert!(
            p.held_at_stop.load(Ordering::SeqCst) > MOSQUITTO_INFLIGHT,
            "{}: too few messages waiting at the restart\n{report}",
            p.topic
        );
    }
    // Nobody was sent to the added broker.
    assert!(c.connections().iter().all(|x| !x.client_id.starts_with("nl-")), "{:?}", c.connections());
}
