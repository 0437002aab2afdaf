//! A tiny authoritative DNS server on an ephemeral loopback UDP port, for discovery tests: the
//! test sets the A/AAAA/SRV answers per name and can make the server fail (SERVFAIL) or go
//! silent. Messages are parsed and built with hickory-proto (re-exported by hickory-resolver);
//! the server runs on its own thread, so sync and async tests can use it alike.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use hickory_resolver::proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, SRV};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};

/// How the server treats queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsMode {
    /// Answer from the records set (NXDOMAIN for unknown names).
    Answer,
    /// Answer every query with SERVFAIL.
    ServFail,
    /// Read queries and never answer.
    Silent,
}

#[derive(Default)]
struct Zone {
    /// Lowercase name without the trailing dot → records.
    records: HashMap<String, Vec<RData>>,
    mode: Option<DnsMode>,
    queries: Vec<(String, RecordType)>,
}

/// The server; stopped when dropped.
pub struct FakeDns {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl FakeDns {
    pub fn start() -> FakeDns {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind UDP 127.0.0.1:0");
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = socket.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (z, s) = (zone.clone(), stop.clone());
        let thread = thread::spawn(move || serve(socket, z, s));
        FakeDns { addr, zone, stop, thread: Some(thread) }
    }

    /// `"127.0.0.1:PORT"`, for a config's `resolver = ...`.
    pub fn resolver(&self) -> String {
        self.addr.to_string()
    }

    /// Sets the address records of `name` (A for IPv4, AAAA for IPv6 addresses); replaces
    /// whatever it had. No addresses: the name exists with no records.
    pub fn set_addrs(&self, name: &str, ips: &[&str]) {
        let data = ips
            .iter()
            .map(|ip| match IpAddr::from_str(ip).expect("an IP address") {
                IpAddr::V4(v4) => RData::A(A(v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
            })
            .collect();
        self.zone.lock().unwrap().records.insert(key(name), data);
    }

    /// Sets the SRV records of `name`: `(target, port)`; replaces whatever it had.
    pub fn set_srv(&self, name: &str, targets: &[(&str, u16)]) {
        let data = targets
            .iter()
            .map(|(target, port)| RData::SRV(SRV::new(10, 10, *port, Name::from_ascii(target).expect("a DNS name"))))
            .collect();
        self.zone.lock().unwrap().records.insert(key(name), data);
    }

    /// Forgets `name`: NXDOMAIN from now on.
    pub fn remove(&self, name: &str) {
        self.zone.lock().unwrap().records.remove(&key(name));
    }

    pub fn set_mode(&self, mode: DnsMode) {
        self.zone.lock().unwrap().mode = Some(mode);
    }

    /// How many queries arrived so far (answered or not).
    pub fn query_count(&self) -> usize {
        self.zone.lock().unwrap().queries.len()
    }

    /// The queries so far: `(name, type)`.
    pub fn queries(&self) -> Vec<(String, RecordType)> {
        self.zone.lock().unwrap().queries.clone()
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(socket: UdpSocket, zone: Arc<Mutex<Zone>>, stop: Arc<AtomicBool>) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else { continue };
        let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
        if let Some(reply) = answer(&query, &zone) {
            let _ = socket.send_to(&reply.to_vec().expect("encode DNS reply"), peer);
        }
    }
}

fn answer(query: &Message, zone: &Mutex<Zone>) -> Option<Message> {
    let mut zone = zone.lock().unwrap();
    let q = query.queries.first()?.clone();
    zone.queries.push((q.name().to_ascii(), q.query_type()));
    let mode = zone.mode.unwrap_or(DnsMode::Answer);
    if mode == DnsMode::Silent {
        return None;
    }
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.message_type = MessageType::Response;
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(q.clone());
    if mode == DnsMode::ServFail {
        reply.metadata.response_code = ResponseCode::ServFail;
        return Some(reply);
    }
    match zone.records.get(&key(&q.name().to_ascii())) {
        None => reply.metadata.response_code = ResponseCode::NXDomain,
        Some(records) => {
            for data in records.iter().filter(|d| d.record_type() == q.query_type()) {
                reply.add_answer(Record::from_rdata(q.name().clone(), 0, data.clone()));
            }
        }
    }
    Some(reply)
}
