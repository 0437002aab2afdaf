//! A raw MQTT client: builds the few packets the tests need and reads packets back, over any
//! `Read + Write` (a `TcpStream` or a rustls `StreamOwned`).

use std::io::{self, Read, Write};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MqttVersion {
    /// 3.1, protocol name "MQIsdp", level 3
    V31,
    /// 3.1.1, "MQTT", level 4
    V311,
    /// 5.0, "MQTT", level 5
    V5,
}

impl MqttVersion {
    pub const ALL: [MqttVersion; 3] = [MqttVersion::V31, MqttVersion::V311, MqttVersion::V5];

    /// The `-V` argument of mosquitto_pub/sub.
    pub fn mosquitto_arg(self) -> &'static str {
        match self {
            MqttVersion::V31 => "mqttv31",
            MqttVersion::V311 => "mqttv311",
            MqttVersion::V5 => "mqttv5",
        }
    }

    pub fn level(self) -> u8 {
        match self {
            MqttVersion::V31 => 3,
            MqttVersion::V311 => 4,
            MqttVersion::V5 => 5,
        }
    }

    pub fn is_v5(self) -> bool {
        self == MqttVersion::V5
    }

    /// The CONNACK harbormaster answers when no broker is reachable: 3.x `20 02 00 03`
    /// (server unavailable), 5.0 `20 03 00 88 00`.
    pub fn connack_server_unavailable(self) -> Vec<u8> {
        self.connack(0x03, 0x88)
    }

    /// 3.x `20 02 00 02` (identifier rejected), 5.0 `20 03 00 85 00`.
    pub fn connack_identifier_rejected(self) -> Vec<u8> {
        self.connack(0x02, 0x85)
    }

    /// A successful CONNACK without session present: 3.x `20 02 00 00`.
    pub fn connack(self, rc3: u8, rc5: u8) -> Vec<u8> {
        if self.is_v5() {
            vec![0x20, 0x03, 0x00, rc5, 0x00]
        } else {
            vec![0x20, 0x02, 0x00, rc3]
        }
    }
}

/// Appends an MQTT variable byte integer.
pub fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// Options of a CONNECT beyond version and client-id.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    pub keep_alive: u16,
    pub clean: bool,
    /// Raw protocol level to send instead of the version's (e.g. 6 for "unsupported").
    pub level_override: Option<u8>,
}

/// A clean-session CONNECT with keep-alive 60.
pub fn connect(version: MqttVersion, client_id: &str) -> Vec<u8> {
    connect_with(version, client_id, &ConnectOptions { keep_alive: 60, clean: true, ..Default::default() })
}

pub fn connect_with(version: MqttVersion, client_id: &str, o: &ConnectOptions) -> Vec<u8> {
    let mut body = Vec::new();
    match version {
        MqttVersion::V31 => put_str(&mut body, b"MQIsdp"),
        _ => put_str(&mut body, b"MQTT"),
    }
    body.push(o.level_override.unwrap_or(version.level()));
    let mut flags = 0u8;
    if o.clean {
        flags |= 0x02;
    }
    if o.password.is_some() {
        flags |= 0x40;
    }
    if o.username.is_some() {
        flags |= 0x80;
    }
    body.push(flags);
    body.extend_from_slice(&o.keep_alive.to_be_bytes());
    if version.is_v5() {
        put_varint(&mut body, 0); // no properties
    }
    put_str(&mut body, client_id.as_bytes());
    if let Some(u) = &o.username {
        put_str(&mut body, u.as_bytes());
    }
    if let Some(p) = &o.password {
        put_str(&mut body, p);
    }
    packet(0x10, &body)
}

/// A QoS 0 PUBLISH.
pub fn publish_qos0(version: MqttVersion, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, topic.as_bytes());
    if version.is_v5() {
        put_varint(&mut body, 0);
    }
    body.extend_from_slice(payload);
    packet(0x30, &body)
}

/// A QoS 1 PUBLISH with a packet id (answered by PUBACK `40 02 PID` in 3.x).
pub fn publish_qos1(version: MqttVersion, packet_id: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, topic.as_bytes());
    body.extend_from_slice(&packet_id.to_be_bytes());
    if version.is_v5() {
        put_varint(&mut body, 0);
    }
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

/// SUBSCRIBE to one topic filter at QoS 0.
pub fn subscribe(version: MqttVersion, packet_id: u16, filter: &str) -> Vec<u8> {
    subscribe_qos(version, packet_id, filter, 0)
}

/// SUBSCRIBE to one topic filter at `qos` (0, 1 or 2).
pub fn subscribe_qos(version: MqttVersion, packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&packet_id.to_be_bytes());
    if version.is_v5() {
        put_varint(&mut body, 0);
    }
    put_str(&mut body, filter.as_bytes());
    body.push(qos);
    packet(0x82, &body)
}

/// PUBACK `40 02 PID`: acknowledges a QoS 1 PUBLISH (3.x; also valid 5.0, reason "success"
/// implied).
pub fn puback(packet_id: u16) -> Vec<u8> {
    let [hi, lo] = packet_id.to_be_bytes();
    vec![0x40, 0x02, hi, lo]
}

pub fn pingreq() -> Vec<u8> {
    vec![0xC0, 0x00]
}

pub fn disconnect() -> Vec<u8> {
    vec![0xE0, 0x00]
}

/// One packet read back: the first byte and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub first: u8,
    pub body: Vec<u8>,
}

impl Packet {
    pub fn kind(&self) -> u8 {
        self.first >> 4
    }

    /// The packet's full bytes as on the wire.
    pub fn bytes(&self) -> Vec<u8> {
        packet(self.first, &self.body)
    }

    /// Topic and payload of a PUBLISH (QoS 0 or 1).
    pub fn publish_topic_payload(&self, version: MqttVersion) -> (String, Vec<u8>) {
        assert_eq!(self.kind(), 3, "not a PUBLISH: {:02x?}", self.bytes());
        let b = &self.body;
        let tl = u16::from_be_bytes([b[0], b[1]]) as usize;
        let topic = String::from_utf8_lossy(&b[2..2 + tl]).into_owned();
        let mut i = 2 + tl;
        if (self.first >> 1) & 3 > 0 {
            i += 2;
        }
        if version.is_v5() {
            let (plen, used) = get_varint(&b[i..]).expect("a complete property length");
            i += used + plen;
        }
        (topic, b[i..].to_vec())
    }
}

/// A variable byte integer at the start of `b`: its value and its length; `None` while it is
/// incomplete. Panics past 4 bytes (malformed).
fn get_varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut n = 0usize;
    let mut mult = 1usize;
    for (i, byte) in b.iter().enumerate() {
        assert!(i < 4, "malformed variable byte integer: {}", super::hex(&b[..5]));
        n += (*byte as usize & 0x7f) * mult;
        if byte & 0x80 == 0 {
            return Some((n, i + 1));
        }
        mult *= 128;
    }
    None
}

/// A complete packet at the start of `buf` and its length on the wire; `None` while it is
/// incomplete (for clients that keep their own receive buffer).
pub fn parse_packet(buf: &[u8]) -> Option<(Packet, usize)> {
    let (len, used) = get_varint(buf.get(1..)?)?;
    let end = 1 + used + len;
    let body = buf.get(1 + used..end)?.to_vec();
    Some((Packet { first: buf[0], body }, end))
}

/// Reads one packet. `Ok(None)` on a clean EOF before its first byte.
pub fn read_packet(r: &mut impl Read) -> io::Result<Option<Packet>> {
    let mut first = [0u8; 1];
    if r.read(&mut first)? == 0 {
        return Ok(None);
    }
    let mut len = 0usize;
    let mut mult = 1usize;
    for _ in 0..4 {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)?;
        len += (b[0] as usize & 0x7f) * mult;
        if b[0] & 0x80 == 0 {
            break;
        }
        mult *= 128;
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(Packet { first: first[0], body }))
}

/// Reads packets until one of `kind` arrives (skipping others, e.g. PUBLISHes), bounded by
/// the stream's read timeout.
pub fn read_until_kind(r: &mut impl Read, kind: u8) -> io::Result<Packet> {
    for _ in 0..10_000 {
        match read_packet(r)? {
            Some(p) if p.kind() == kind => return Ok(p),
            Some(_) => continue,
            None => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("closed before packet type {kind}")))
            }
        }
    }
    Err(io::Error::other("too many packets"))
}

/// Reads whatever the peer sends until it closes (EOF or reset) or `timeout`-bound read
/// timeout fires. Returns the bytes and whether the peer closed.
pub fn read_until_close(s: &mut std::net::TcpStream, timeout: Duration) -> (Vec<u8>, bool) {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
                return (out, false)
            }
            // reset: closed
            Err(_) => return (out, true),
        }
    }
}

/// CONNECT, then read the CONNACK; returns the CONNACK's bytes.
pub fn connect_and_read_connack<S: Read + Write>(
    s: &mut S,
    version: MqttVersion,
    client_id: &str,
) -> io::Result<Vec<u8>> {
    send_and_read_connack(s, &connect(version, client_id))
}

/// Writes `bytes` (a CONNECT, and whatever is pipelined behind it) in one write, then reads
/// the first packet back, the CONNACK; returns its bytes.
pub fn send_and_read_connack<S: Read + Write>(s: &mut S, bytes: &[u8]) -> io::Result<Vec<u8>> {
    s.write_all(bytes)?;
    s.flush()?;
    match read_packet(s)? {
        Some(p) => Ok(p.bytes()),
        None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before CONNACK")),
    }
}

/// True when a CONNACK's bytes say "accepted".
pub fn connack_accepted(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && bytes[0] == 0x20 && bytes[3] == 0x00
}
