//! Where the MQTT packets of a relayed byte stream begin and end, read from their fixed headers
//! as the bytes pass, without buffering a packet: what lets a planned close (a drain, a broker
//! removed) put a DISCONNECT between two packets instead of inside one. Also the DISCONNECT
//! packets such a close writes.

/// Position in one direction's MQTT stream, in 4 bytes: the top 4 bits say what the next byte
/// is (0: packet body, or at a boundary when no body byte is left; 1–4: that byte of the
/// Remaining Length; 15: given up), the low 28 bits the body bytes still to come, or the
/// Remaining Length read so far. 28 bits hold the largest Remaining Length MQTT allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Boundary(u32);

const VALUE: u32 = (1 << 28) - 1;
const BROKEN: u32 = 15 << 28;

/// The largest Remaining Length: four bytes of 7 bits.
pub const MAX_REMAINING: u32 = VALUE;

impl Boundary {
    /// At the start of a stream: the first byte is a packet's first byte.
    pub const START: Boundary = Boundary(0);

    fn phase(self) -> u32 {
        self.0 >> 28
    }

    /// Advances over `bytes`, the next bytes of the stream. Body bytes are skipped in one
    /// step; only fixed headers are read byte by byte. Bytes that cannot be MQTT (packet type
    /// 0, a fifth Remaining Length byte) make the tracker give up for good.
    pub fn advance(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            let (phase, value) = (self.phase(), self.0 & VALUE);
            match phase {
                0 if value > 0 => {
                    let skip = value.min(u32::try_from(bytes.len() - i).unwrap_or(u32::MAX));
                    self.0 -= skip;
                    i += skip as usize;
                }
                // A packet's first byte: type and flags. Type 0 is reserved.
                0 => {
                    self.0 = if bytes[i] >> 4 == 0 { BROKEN } else { 1 << 28 };
                    i += 1;
                }
                1..=4 => {
                    let b = bytes[i];
                    let value = value | (u32::from(b & 0x7f) << (7 * (phase - 1)));
                    self.0 = match (b & 0x80 != 0, phase) {
                        (true, 4) => BROKEN,
                        (true, _) => ((phase + 1) << 28) | value,
                        // The body follows; a packet without one ends here.
                        (false, _) => value,
                    };
                    i += 1;
                }
                _ => return,
            }
        }
    }

    /// How many more bytes of the stream end the current packet: 0 at a boundary, the body
    /// left while in one, 1 while in a fixed header (its length is not known yet). `None`
    /// once the tracker has given up.
    pub fn to_boundary(self) -> Option<usize> {
        match self.phase() {
            0 => Some((self.0 & VALUE) as usize),
            1..=4 => Some(1),
            _ => None,
        }
    }

    pub fn at_boundary(self) -> bool {
        self.0 == 0
    }
}

/// A DISCONNECT written by a planned close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// To an MQTT 5 client: 0x8B, server shutting down (the process drains).
    ShuttingDown,
    /// To an MQTT 5 client: 0x9C, use another server (its broker left or is drained).
    UseAnotherServer,
    /// To the broker, on the client's behalf: a normal disconnection, so that the broker does
    /// not publish the client's Will. The same two bytes in 3.1, 3.1.1 and 5.0 (a 5.0
    /// DISCONNECT without a reason code means 0x00).
    Normal,
}

impl Disconnect {
    /// The packet's bytes.
    pub fn packet(self) -> &'static [u8] {
        match self {
            Disconnect::ShuttingDown => &[0xE0, 0x02, 0x8B, 0x00],
            Disconnect::UseAnotherServer => &[0xE0, 0x02, 0x9C, 0x00],
            Disconnect::Normal => &[0xE0, 0x00],
        }
    }

    /// Who it is written to.
    pub fn to(self) -> Side {
        match self {
            Disconnect::ShuttingDown | Disconnect::UseAnotherServer => Side::Client,
            Disconnect::Normal => Side::Broker,
        }
    }

    /// Its reason code as the log and the `reason_code` metric label write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Disconnect::ShuttingDown => "0x8B",
            Disconnect::UseAnotherServer => "0x9C",
            Disconnect::Normal => "0x00",
        }
    }

    /// Its reason code.
    pub fn reason_code(self) -> u8 {
        match self {
            Disconnect::ShuttingDown => 0x8B,
            Disconnect::UseAnotherServer => 0x9C,
            Disconnect::Normal => 0x00,
        }
    }
}

/// The side a DISCONNECT is written to: the `to` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Broker,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Broker => "broker",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet of type `first >> 4` with `body` bytes of body, encoded as MQTT encodes it.
    fn packet(first: u8, body: usize) -> Vec<u8> {
        let mut p = vec![first];
        let mut n = body;
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            p.push(b);
            if n == 0 {
                break;
            }
        }
        p.resize(p.len() + body, 0xA5);
        p
    }

    fn after(bytes: &[u8]) -> Boundary {
        let mut b = Boundary::START;
        b.advance(bytes);
        b
    }

    /// Packets of every Remaining Length size (0, 1–4 length bytes, the largest allowed),
    /// cut into two chunks at every position of their fixed header and around it: the tracker
    /// is at a boundary exactly where a packet ends, and says how far the next one is.
    #[test]
    fn boundaries_at_every_split_of_the_fixed_header() {
        for body in [0usize, 1, 2, 127, 128, 300, 16_383, 16_384, 2_097_151, 2_097_152] {
            let p = packet(0x30, body);
            let header = p.len() - body;
            for cut in 0..=(header + 2).min(p.len()) {
                let mut b = Boundary::START;
                b.advance(&p[..cut]);
                assert_eq!(b.at_boundary(), cut == 0 || cut == p.len(), "body {body}, cut {cut}");
                if cut >= header {
                    assert_eq!(b.to_boundary(), Some(p.len() - cut), "body {body}, cut {cut}");
                } else if cut > 0 {
                    assert_eq!(b.to_boundary(), Some(1), "in the fixed header: one byte at a time");
                }
                b.advance(&p[cut..]);
                assert!(b.at_boundary(), "body {body}, cut {cut}");
            }
        }
    }

    /// The largest Remaining Length (0xFF 0xFF 0xFF 0x7F) is followed exactly.
    #[test]
    fn the_largest_remaining_length() {
        let b = after(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]);
        assert_eq!(b.to_boundary(), Some(MAX_REMAINING as usize));
        assert_eq!(MAX_REMAINING, 268_435_455);
    }

    /// A stream of many packets fed one byte at a time stops at a boundary exactly where each
    /// packet ends; fed in chunks of every size, it is where the byte-by-byte feed was at the
    /// end of each chunk.
    #[test]
    fn many_packets_in_chunks_of_every_size() {
        let packets: Vec<Vec<u8>> =
            [(0x10, 20), (0x20, 2), (0xC0, 0), (0x32, 200), (0xD0, 0), (0x30, 20_000), (0xE0, 0)]
                .iter()
                .map(|&(t, n)| packet(t, n))
                .collect();
        let stream: Vec<u8> = packets.concat();
        let mut ends = Vec::new();
        let mut at = 0;
        for p in &packets {
            at += p.len();
            ends.push(at);
        }
        let mut b = Boundary::START;
        let mut states = vec![b];
        for byte in &stream {
            b.advance(std::slice::from_ref(byte));
            states.push(b);
        }
        let seen: Vec<usize> = (1..states.len()).filter(|&i| states[i].at_boundary()).collect();
        assert_eq!(seen, ends);
        for chunk in [2, 3, 5, 7, 64, 1000, stream.len()] {
            let mut b = Boundary::START;
            for (i, c) in stream.chunks(chunk).enumerate() {
                b.advance(c);
                let pos = (i * chunk + c.len()).min(stream.len());
                assert_eq!(b, states[pos], "chunk {chunk}, at {pos}");
            }
        }
    }

    /// Bytes that cannot be MQTT make the tracker give up, for good: a planned close then
    /// falls back to a plain close.
    #[test]
    fn malformed_lengths_give_up() {
        for bad in [&[0x30, 0xFF, 0xFF, 0xFF, 0xFF][..], &[0x30, 0x80, 0x80, 0x80, 0x80, 0x01], &[0x00], &[0x0F, 0x00]]
        {
            let mut b = after(bad);
            assert_eq!(b.to_boundary(), None, "{bad:02x?}");
            b.advance(&packet(0xC0, 0));
            assert_eq!(b.to_boundary(), None, "given up for good");
            assert!(!b.at_boundary());
        }
        // Nothing is ever read past the chunk given, whatever it holds.
        let mut b = Boundary::START;
        b.advance(&[]);
        assert!(b.at_boundary());
    }

    /// Arbitrary bytes never panic, and the tracker's answer stays within what one packet can
    /// span.
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u32 = 0x1234_5678;
        for _ in 0..2_000 {
            let mut b = Boundary::START;
            let mut chunk = [0u8; 37];
            for _ in 0..20 {
                for byte in chunk.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    *byte = x as u8;
                }
                b.advance(&chunk[..(x as usize % 38)]);
                if let Some(n) = b.to_boundary() {
                    assert!(n <= MAX_REMAINING as usize);
                }
            }
        }
    }

    #[test]
    fn disconnect_packets_are_what_they_say() {
        for d in [Disconnect::ShuttingDown, Disconnect::UseAnotherServer, Disconnect::Normal] {
            let p = d.packet();
            assert!(after(p).at_boundary(), "one whole packet");
            assert_eq!(p[0], 0xE0);
            assert_eq!(p.get(2).copied().unwrap_or(0), d.reason_code());
            assert_eq!(d.as_str(), format!("0x{:02X}", d.reason_code()));
        }
    }
}
