//! The few MQTT packets the load generator writes and reads, and the streaming packet scanner
//! of the sink: it answers CONNECT and PINGREQ, skips PUBLISH payloads without buffering them,
//! and sends back (echoes) a PUBLISH whose RETAIN flag is set, which is how the generator's
//! bursts travel both ways through a proxy. Pure: no I/O.

/// The MQTT version a CONNECT announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V31,
    V311,
    V5,
}

impl Version {
    pub fn parse(s: &str) -> Result<Version, String> {
        match s {
            "3.1" | "31" => Ok(Version::V31),
            "3.1.1" | "311" | "4" => Ok(Version::V311),
            "5" | "5.0" => Ok(Version::V5),
            _ => Err(format!("unknown MQTT version {s:?}: use 3.1, 3.1.1 or 5")),
        }
    }
}

pub const PINGREQ: [u8; 2] = [0xC0, 0x00];
pub const PINGRESP: [u8; 2] = [0xD0, 0x00];
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
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

/// A CONNECT with a clean session, the client-id and the keep-alive, nothing else.
pub fn connect(version: Version, client_id: &[u8], keep_alive: u16) -> Vec<u8> {
    let mut body = Vec::with_capacity(32 + client_id.len());
    let (name, level): (&[u8], u8) = match version {
        Version::V31 => (b"MQIsdp", 3),
        Version::V311 => (b"MQTT", 4),
        Version::V5 => (b"MQTT", 5),
    };
    put_str(&mut body, name);
    body.push(level);
    body.push(0x02); // clean session / clean start
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if version == Version::V5 {
        body.push(0); // no properties
    }
    put_str(&mut body, client_id);
    let mut p = Vec::with_capacity(body.len() + 5);
    p.push(0x10);
    put_varint(&mut p, body.len());
    p.extend_from_slice(&body);
    p
}

/// A QoS 0 PUBLISH of `payload_len` bytes; `echo` sets RETAIN, which asks the sink to send
/// the packet back.
pub fn publish(topic: &[u8], payload_len: usize, echo: bool) -> Vec<u8> {
    let rem = 2 + topic.len() + payload_len;
    let mut p = Vec::with_capacity(rem + 5);
    p.push(if echo { 0x31 } else { 0x30 });
    put_varint(&mut p, rem);
    put_str(&mut p, topic);
    p.extend((0..payload_len).map(|i| (i % 251) as u8));
    p
}

/// Decode a remaining-length varint from `b` (the bytes after the first header byte).
/// `Ok(None)`: more bytes needed; `Err`: more than 4 bytes.
pub fn varint(b: &[u8]) -> Result<Option<(usize, usize)>, ()> {
    let mut n = 0usize;
    for (i, &x) in b.iter().enumerate().take(4) {
        n |= ((x & 0x7F) as usize) << (7 * i);
        if x & 0x80 == 0 {
            return Ok(Some((n, i + 1)));
        }
    }
    if b.len() >= 4 {
        Err(())
    } else {
        Ok(None)
    }
}

/// The CONNACK of a successful CONNECT whose protocol level is `level`.
pub fn connack_ok(level: u8) -> &'static [u8] {
    if level == 5 {
        &[0x20, 0x03, 0x00, 0x00, 0x00]
    } else {
        &[0x20, 0x02, 0x00, 0x00]
    }
}

/// Largest packet the sink buffers whole (a CONNECT or an echoed PUBLISH).
pub const MAX_COLLECT: usize = 1 << 20;

/// What the sink counts.
#[derive(Debug, Default, Clone, Copy)]
pub struct Seen {
    pub connects: u64,
    pub pings: u64,
    pub publishes: u64,
    pub echoed: u64,
    pub bytes: u64,
}

#[derive(Debug)]
enum St {
    /// Reading the fixed header: first byte and up to 4 length bytes.
    Header { b: [u8; 5], n: u8 },
    /// Discarding the rest of a packet.
    Skip { left: usize },
    /// Buffering a whole packet (CONNECT, echoed PUBLISH).
    Collect { first: u8, rem: usize, body: Vec<u8> },
}

/// Streaming scanner of a client's MQTT bytes.
#[derive(Debug)]
pub struct Scanner {
    st: St,
    pub seen: Seen,
    pub disconnected: bool,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner { st: St::Header { b: [0; 5], n: 0 }, seen: Seen::default(), disconnected: false }
    }
}

impl Scanner {
    /// Consume `data`, appending answers to `out`. `Err` on a malformed stream.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
        self.seen.bytes += data.len() as u64;
        while !data.is_empty() {
            match &mut self.st {
                St::Header { b, n } => {
                    b[*n as usize] = data[0];
                    *n += 1;
                    data = &data[1..];
                    if *n < 2 {
                        continue;
                    }
                    let (rem, _) = match varint(&b[1..*n as usize]) {
                        Ok(Some(x)) => x,
                        Ok(None) => continue,
                        Err(()) => return Err("bad remaining length"),
                    };
                    let first = b[0];
                    self.st = self.begin(first, rem, out)?;
                }
                St::Skip { left } => {
                    let k = (*left).min(data.len());
                    *left -= k;
                    data = &data[k..];
                    if *left == 0 {
                        self.st = St::Header { b: [0; 5], n: 0 };
                    }
                }
                St::Collect { first, rem, body } => {
                    let k = (*rem - body.len()).min(data.len());
                    body.extend_from_slice(&data[..k]);
                    data = &data[k..];
                    if body.len() == *rem {
                        let (first, body) = (*first, std::mem::take(body));
                        self.st = St::Header { b: [0; 5], n: 0 };
                        self.complete(first, &body, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn begin(&mut self, first: u8, rem: usize, out: &mut Vec<u8>) -> Result<St, &'static str> {
        let collect = match first >> 4 {
            1 => true,
            3 => {
                self.seen.publishes += 1;
                first & 0x01 != 0
            }
            12 => {
                self.seen.pings += 1;
                out.extend_from_slice(&PINGRESP);
                false
            }
            14 => {
                self.disconnected = true;
                false
            }
            _ => false,
        };
        if collect && rem > MAX_COLLECT {
            return Err("packet too large to buffer");
        }
        Ok(if rem == 0 {
            St::Header { b: [0; 5], n: 0 }
        } else if collect {
            St::Collect { first, rem, body: Vec::with_capacity(rem) }
        } else {
            St::Skip { left: rem }
        })
    }

    fn complete(&mut self, first: u8, body: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
        match first >> 4 {
            1 => {
                self.seen.connects += 1;
                let name_len =
                    body.get(..2).map(|l| u16::from_be_bytes([l[0], l[1]]) as usize).ok_or("short CONNECT")?;
                let level = *body.get(2 + name_len).ok_or("short CONNECT")?;
                out.extend_from_slice(connack_ok(level));
            }
            3 => {
                self.seen.echoed += 1;
                out.push(first);
                put_varint(out, body.len());
                out.extend_from_slice(body);
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scanner_answers_connect_ping_and_echo_at_every_split() {
        let mut stream = connect(Version::V5, b"dev-1", 30);
        stream.extend_from_slice(&publish(b"t", 300, false));
        stream.extend_from_slice(&PINGREQ);
        let echo = publish(b"e", 200, true);
        stream.extend_from_slice(&echo);
        stream.extend_from_slice(&DISCONNECT);
        let mut want = connack_ok(5).to_vec();
        want.extend_from_slice(&PINGRESP);
        want.extend_from_slice(&echo);
        for split in 0..stream.len() {
            let mut s = Scanner::default();
            let mut out = Vec::new();
            s.feed(&stream[..split], &mut out).unwrap();
            s.feed(&stream[split..], &mut out).unwrap();
            assert_eq!(out, want, "split at {split}");
            assert!(s.disconnected);
            assert_eq!((s.seen.connects, s.seen.pings, s.seen.publishes, s.seen.echoed), (1, 1, 2, 1));
        }
    }

    #[test]
    fn connect_levels() {
        for (v, level) in [(Version::V31, 3u8), (Version::V311, 4), (Version::V5, 5)] {
            let p = connect(v, b"x", 60);
            let mut s = Scanner::default();
            let mut out = Vec::new();
            s.feed(&p, &mut out).unwrap();
            assert_eq!(out, connack_ok(level));
        }
    }

    #[test]
    fn varint_bounds() {
        assert_eq!(varint(&[0x00]), Ok(Some((0, 1))));
        assert_eq!(varint(&[0xFF, 0x7F]), Ok(Some((16383, 2))));
        assert_eq!(varint(&[0x80]), Ok(None));
        assert_eq!(varint(&[0x80, 0x80, 0x80, 0x80]), Err(()));
        let mut b = Vec::new();
        put_varint(&mut b, 70_000);
        assert_eq!(varint(&b), Ok(Some((70_000, 3))));
    }
}
