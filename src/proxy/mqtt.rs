//! MQTT CONNECT peeking: a pure, panic-free parser over the bytes a client sent first, and the
//! CONNACK packets harbormaster answers with when it refuses a connection itself.
//! It owns no I/O; the connection pipeline feeds it bytes until it answers `Complete`.

// This code runs on unauthenticated bytes straight off the wire, so a panic or an overflow here
// would be a remotely triggerable crash. These restriction lints keep every access checked; the
// tests opt back out.
#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

/// MQTT protocol version, from the CONNECT's protocol name and level (its low seven bits: the
/// high bit marks a bridge, see [`Connect::bridge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MqttVersion {
    /// Protocol name "MQIsdp", level 3.
    V31,
    /// Protocol name "MQTT", level 4.
    V311,
    /// Protocol name "MQTT", level 5.
    V5,
}

impl MqttVersion {
    /// Label used in logs and metrics: "3.1", "3.1.1", "5.0".
    pub fn as_str(self) -> &'static str {
        match self {
            MqttVersion::V31 => "3.1",
            MqttVersion::V311 => "3.1.1",
            MqttVersion::V5 => "5.0",
        }
    }
}

/// The fields of a CONNECT that routing and logging need, borrowed from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect<'a> {
    pub version: MqttVersion,
    /// Client identifier bytes, checked to be a valid MQTT UTF-8 string; routing hashes them
    /// as sent.
    pub client_id: &'a [u8],
    pub username: Option<&'a [u8]>,
    pub clean_session: bool,
    pub keep_alive: u16,
    /// The protocol level carried the bridge bit (0x80): a broker bridging to the broker behind
    /// us (mosquitto's `try_private`, VerneMQ's and EMQX's bridges), which 3.1 and 3.1.1 allow
    /// as 0x83 and 0x84. The level byte is relayed as sent, so the broker sees the bridge too
    /// and keeps its loop detection.
    pub bridge: bool,
}

/// Result of looking at the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek<'a> {
    /// More bytes are needed; not an error.
    Incomplete,
    /// A whole CONNECT; `len` is its length in bytes including the fixed header. Bytes after
    /// `len` are whatever the client pipelined behind it.
    Complete { connect: Connect<'a>, len: usize },
}

/// Why a first packet cannot be accepted. `version` is set when the bytes got far enough to
/// know it, so that a 5.0 client can be told why with a CONNACK reason code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("first packet is not CONNECT (packet type {0})")]
    NotConnect(u8),
    #[error("malformed CONNECT: {reason}")]
    Malformed { reason: &'static str, version: Option<MqttVersion> },
    #[error("CONNECT of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize, version: Option<MqttVersion> },
    #[error("unsupported protocol (level {level})")]
    UnsupportedProtocol { level: u8 },
    /// A UTF-8 string field is not a valid MQTT UTF-8 string (3.1.1 §1.5.3, 5.0 §1.5.4):
    /// not well-formed UTF-8, or it contains U+0000. Brokers may close without a CONNACK on
    /// such a CONNECT, so it is refused here rather than forwarded.
    #[error("malformed CONNECT: {field} {problem}")]
    BadString { field: StringField, problem: &'static str, version: MqttVersion },
}

/// The CONNECT's UTF-8 string fields that are checked. Property values are skipped unread, so
/// they are the broker's to judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StringField {
    ClientId,
    WillTopic,
    Username,
}

impl std::fmt::Display for StringField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StringField::ClientId => "client identifier",
            StringField::WillTopic => "will topic",
            StringField::Username => "username",
        })
    }
}

/// CONNECT is packet type 1, and its four flag bits are reserved and must be zero.
const CONNECT_FIXED_HEADER: u8 = 0x10;

// Connect flags (MQTT 3.1.1 §3.1.2.3, 5.0 §3.1.2.3).
const FLAG_RESERVED: u8 = 0x01;
const FLAG_CLEAN_SESSION: u8 = 0x02;
const FLAG_WILL: u8 = 0x04;
const FLAG_WILL_QOS: u8 = 0x18;
const FLAG_WILL_RETAIN: u8 = 0x20;
const FLAG_PASSWORD: u8 = 0x40;
const FLAG_USERNAME: u8 = 0x80;

/// The smallest CONNECT: 3.1.1 with an empty client-id and no optional field (fixed header 2,
/// protocol name 6, level 1, flags 1, keep-alive 2, client-id length 2).
pub const MIN_CONNECT_LEN: usize = 14;
/// The largest packet MQTT can express: a remaining length of 268,435,455 and its fixed header.
pub const MAX_PACKET_LEN: usize = 268_435_460;

/// Look at `buf` (the bytes received so far). `max_len` bounds the whole packet.
pub fn peek_connect(buf: &[u8], max_len: usize) -> Result<Peek<'_>, ConnectError> {
    let Some((&first, rest)) = buf.split_first() else {
        return Ok(Peek::Incomplete);
    };
    // The packet type alone tells a non-MQTT (or non-CONNECT-first) client apart: answer on the
    // first byte instead of waiting for bytes that may never come.
    let packet_type = first.wrapping_shr(4);
    if packet_type != 1 {
        return Err(ConnectError::NotConnect(packet_type));
    }
    if first != CONNECT_FIXED_HEADER {
        return Err(malformed("reserved fixed-header flags are set", None));
    }

    let (remaining, varint_len) = match var_int(rest) {
        VarInt::Done { value, len } => (value, len),
        VarInt::Incomplete => return Ok(Peek::Incomplete),
        VarInt::TooLong => return Err(malformed("remaining length is longer than 4 bytes", None)),
    };
    // `remaining` < 2^28, so these cannot overflow a 32- or 64-bit usize; saturating keeps the
    // arithmetic total anyway, and a saturated length is simply too large.
    let remaining = usize::try_from(remaining).unwrap_or(usize::MAX);
    let len = remaining.saturating_add(varint_len).saturating_add(1);

    // The received part of the body, cut at the packet's end so that pipelined bytes behind it
    // can never be read as part of this CONNECT.
    let body = rest.get(varint_len..).unwrap_or_default();
    let body = body.get(..remaining).unwrap_or(body);
    let mut cur = Cursor { bytes: body, pos: 0, end: remaining };

    if len > max_len {
        // Refuse before buffering the rest; name the version only if it is already readable so a
        // 5.0 client can get a "packet too large" reason code.
        let version = protocol(&mut cur).ok().map(|(version, _)| version);
        return Err(ConnectError::TooLarge { len, max: max_len, version });
    }

    let (version, bridge) = match protocol(&mut cur) {
        Ok(protocol) => protocol,
        Err(stop) => return stop.into_result(None),
    };
    match fields(&mut cur, version, bridge) {
        Ok(connect) => Ok(Peek::Complete { connect, len }),
        Err(stop) => stop.into_result(Some(version)),
    }
}

/// The length of the whole packet whose first bytes are `buf`, as its fixed header announces
/// it; `None` until the fixed header is complete (or when it is not a valid one). The CONNECT
/// buffer grows towards it, never past it.
pub fn announced_len(buf: &[u8]) -> Option<usize> {
    let (_, rest) = buf.split_first()?;
    match var_int(rest) {
        VarInt::Done { value, len } => usize::try_from(value).ok()?.checked_add(len)?.checked_add(1),
        VarInt::Incomplete | VarInt::TooLong => None,
    }
}

/// The MQTT version of the CONNECT whose first bytes are `buf`, as soon as its protocol name
/// and level are here: a connection refused before its CONNECT is complete can still get a
/// CONNACK its client understands.
pub fn version(buf: &[u8]) -> Option<MqttVersion> {
    let (&first, rest) = buf.split_first()?;
    if first != CONNECT_FIXED_HEADER {
        return None;
    }
    let VarInt::Done { value, len } = var_int(rest) else {
        return None;
    };
    let remaining = usize::try_from(value).ok()?;
    let body = rest.get(len..).unwrap_or_default();
    let body = body.get(..remaining).unwrap_or(body);
    protocol(&mut Cursor { bytes: body, pos: 0, end: remaining }).ok().map(|(v, _)| v)
}

fn malformed(reason: &'static str, version: Option<MqttVersion>) -> ConnectError {
    ConnectError::Malformed { reason, version }
}

/// Why reading stopped short of a whole CONNECT.
#[derive(Debug)]
enum Stop {
    /// The bytes so far are a valid prefix; wait for more.
    Incomplete,
    /// The bytes so far already violate the protocol.
    Malformed(&'static str),
    /// Protocol name and level are known and not one we speak; carries the level byte.
    Unsupported(u8),
    /// A whole UTF-8 string field is here and is not a valid MQTT UTF-8 string.
    BadString(StringField, &'static str),
}

impl Stop {
    fn into_result<'a>(self, version: Option<MqttVersion>) -> Result<Peek<'a>, ConnectError> {
        match self {
            Stop::Incomplete => Ok(Peek::Incomplete),
            Stop::Malformed(reason) => Err(malformed(reason, version)),
            Stop::Unsupported(level) => Err(ConnectError::UnsupportedProtocol { level }),
            Stop::BadString(field, problem) => match version {
                Some(version) => Err(ConnectError::BadString { field, problem, version }),
                // Strings are checked only after the protocol level: not reached.
                None => Err(malformed(problem, None)),
            },
        }
    }
}

/// A Variable Byte Integer (MQTT 5.0 §1.5.5), as far as the bytes go.
enum VarInt {
    Done {
        value: u32,
        len: usize,
    },
    Incomplete,
    /// The fourth byte has its continuation bit set: a fifth byte is never valid.
    TooLong,
}

fn var_int(bytes: &[u8]) -> VarInt {
    // (shift, encoded length) per byte: a table rather than arithmetic keeps this obviously
    // overflow-free.
    const STEPS: [(u32, usize); 4] = [(0, 1), (7, 2), (14, 3), (21, 4)];
    let mut value: u32 = 0;
    for (&byte, &(shift, len)) in bytes.iter().zip(STEPS.iter()) {
        value |= u32::from(byte & 0x7f).wrapping_shl(shift);
        if byte & 0x80 == 0 {
            return VarInt::Done { value, len };
        }
    }
    if bytes.len() >= STEPS.len() {
        VarInt::TooLong
    } else {
        VarInt::Incomplete
    }
}

/// Reads the packet body. `bytes` is the part of the body received so far (never past the
/// packet's end) and `end` the body length the fixed header declared. A field that would cross
/// `end` is malformed at once, however few bytes have arrived; one within `end` but beyond
/// `bytes` is merely incomplete.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Stop> {
        let next = match self.pos.checked_add(n) {
            Some(next) if next <= self.end => next,
            _ => return Err(Stop::Malformed(what)),
        };
        let out = self.bytes.get(self.pos..next).ok_or(Stop::Incomplete)?;
        self.pos = next;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Stop> {
        // `take` returned exactly N bytes, so the conversion cannot fail; mapping the impossible
        // case to Malformed keeps the code free of panics without an unwrap.
        <[u8; N]>::try_from(self.take(N, what)?).map_err(|_| Stop::Malformed(what))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, Stop> {
        let [byte] = self.array::<1>(what)?;
        Ok(byte)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, Stop> {
        self.array::<2>(what).map(u16::from_be_bytes)
    }

    /// Two-byte length followed by that many bytes: both UTF-8 strings and binary data.
    fn binary(&mut self, what: &'static str) -> Result<&'a [u8], Stop> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }

    /// A UTF-8 string: checked as soon as all of it is here, so the verdict comes as early as
    /// any other and never changes with more bytes.
    fn string(&mut self, what: &'static str, field: StringField) -> Result<&'a [u8], Stop> {
        let bytes = self.binary(what)?;
        mqtt_string(bytes).map_err(|problem| Stop::BadString(field, problem))?;
        Ok(bytes)
    }

    fn var_int(&mut self, what: &'static str) -> Result<usize, Stop> {
        let rest = self.bytes.get(self.pos..).unwrap_or_default();
        match var_int(rest) {
            VarInt::Done { value, len } => {
                // `rest` never extends past `end`, so the integer's bytes are inside the packet.
                self.take(len, what)?;
                usize::try_from(value).map_err(|_| Stop::Malformed(what))
            }
            VarInt::TooLong => Err(Stop::Malformed(what)),
            // All of the packet is here and the integer is still unterminated: it runs past the
            // packet's end.
            VarInt::Incomplete if self.pos.saturating_add(rest.len()) >= self.end => Err(Stop::Malformed(what)),
            VarInt::Incomplete => Err(Stop::Incomplete),
        }
    }

    /// MQTT 5.0 property list: only its length matters here, the contents are skipped.
    fn skip_properties(&mut self, what: &'static str) -> Result<(), Stop> {
        let len = self.var_int(what)?;
        self.take(len, what).map(drop)
    }
}

/// MQTT UTF-8 string rules that a broker must enforce (3.1.1 [MQTT-1.5.3-1], [MQTT-1.5.3-2];
/// 5.0 [MQTT-1.5.4-1], [MQTT-1.5.4-2]): well-formed UTF-8 (which excludes the surrogates
/// U+D800..U+DFFF) and no U+0000. Control characters and non-characters are only "should not"
/// and are left to the broker.
fn mqtt_string(bytes: &[u8]) -> Result<(), &'static str> {
    match std::str::from_utf8(bytes) {
        Err(_) => Err("is not well-formed UTF-8"),
        Ok(s) if s.contains('\0') => Err("contains U+0000"),
        Ok(_) => Ok(()),
    }
}

/// Bit 7 of the protocol level: set by bridges (3.1 and 3.1.1 only; 5.0 has no such bit and
/// gives bridges subscription options instead).
const LEVEL_BRIDGE: u8 = 0x80;

/// Protocol name and level, and whether the level carries the bridge bit. UnsupportedProtocol is
/// decided only once both are here, so the CONNACK can carry a meaningful level; a known name
/// with a missing level is just malformed.
fn protocol(cur: &mut Cursor<'_>) -> Result<(MqttVersion, bool), Stop> {
    let name = cur.binary("protocol name runs past the end of the packet")?;
    let level = match cur.u8("packet ends before the protocol level") {
        Ok(level) => level,
        // The packet ends right after the name: there is no level byte to report.
        Err(Stop::Malformed(reason)) => {
            return Err(match name {
                b"MQTT" | b"MQIsdp" => Stop::Malformed(reason),
                _ => Stop::Unsupported(0),
            });
        }
        Err(stop) => return Err(stop),
    };
    // As mosquitto reads it: the low seven bits are the version, the high bit a bridge of 3.1
    // or 3.1.1. 5.0 defines no bridge bit and no peer sends 0x85; mosquitto 2.0 refuses it too.
    let bridge = level & LEVEL_BRIDGE != 0;
    match (name, level & !LEVEL_BRIDGE, bridge) {
        (b"MQIsdp", 3, _) => Ok((MqttVersion::V31, bridge)),
        (b"MQTT", 4, _) => Ok((MqttVersion::V311, bridge)),
        (b"MQTT", 5, false) => Ok((MqttVersion::V5, false)),
        _ => Err(Stop::Unsupported(level)),
    }
}

/// Everything after the protocol level: flags, keep-alive, (5.0) properties, and the payload.
fn fields<'a>(cur: &mut Cursor<'a>, version: MqttVersion, bridge: bool) -> Result<Connect<'a>, Stop> {
    let flags = cur.u8("packet ends before the connect flags")?;
    // The flags are checked as soon as they arrive, before waiting for the payload.
    if flags & FLAG_RESERVED != 0 {
        return Err(Stop::Malformed("reserved connect flag is set"));
    }
    let will = flags & FLAG_WILL != 0;
    if will && flags & FLAG_WILL_QOS == FLAG_WILL_QOS {
        return Err(Stop::Malformed("will QoS is 3"));
    }
    if !will && flags & (FLAG_WILL_QOS | FLAG_WILL_RETAIN) != 0 {
        return Err(Stop::Malformed("will QoS or retain set without a will"));
    }
    let username_flag = flags & FLAG_USERNAME != 0;
    let password_flag = flags & FLAG_PASSWORD != 0;
    // 5.0 allows a password alone (e.g. a token); 3.x does not.
    if password_flag && !username_flag && version != MqttVersion::V5 {
        return Err(Stop::Malformed("password without a username"));
    }

    let keep_alive = cur.u16("packet ends inside the keep-alive")?;
    if version == MqttVersion::V5 {
        cur.skip_properties("CONNECT properties run past the end of the packet")?;
    }
    let client_id = cur.string("client identifier runs past the end of the packet", StringField::ClientId)?;
    if will {
        if version == MqttVersion::V5 {
            cur.skip_properties("will properties run past the end of the packet")?;
        }
        cur.string("will topic runs past the end of the packet", StringField::WillTopic)?;
        cur.binary("will payload runs past the end of the packet")?;
    }
    let username = if username_flag {
        Some(cur.string("username runs past the end of the packet", StringField::Username)?)
    } else {
        None
    };
    if password_flag {
        cur.binary("password runs past the end of the packet")?;
    }
    // Decidable without the trailing bytes themselves: the declared length says they exist.
    if cur.pos != cur.end {
        return Err(Stop::Malformed("bytes after the last CONNECT field"));
    }

    Ok(Connect { version, client_id, username, clean_session: flags & FLAG_CLEAN_SESSION != 0, keep_alive, bridge })
}

/// What harbormaster refuses a connection for, when the protocol lets it say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 3.x return code 3, 5.0 reason 0x88.
    ServerUnavailable,
    /// 3.x return code 1, 5.0 reason 0x84.
    UnsupportedProtocol,
    /// 3.x return code 2, 5.0 reason 0x85.
    ClientIdRejected,
    /// 5.0 only: reason 0x81.
    Malformed,
    /// 5.0 only: reason 0x95.
    PacketTooLarge,
    /// 3.x return code 3 (server unavailable), 5.0 reason 0x9F (connection rate exceeded).
    RateExceeded,
    /// 5.0 only: reason 0x97 (quota exceeded).
    QuotaExceeded,
    /// 3.x return code 4, 5.0 reason 0x86 (bad user name or password).
    BadCredentials,
}

/// The CONNACK for `refusal` in the client's `version`, or `None` where that version has no
/// code for it (3.x has none for Malformed/PacketTooLarge/QuotaExceeded: the connection is just
/// closed).
pub fn connack(version: MqttVersion, refusal: Refusal) -> Option<&'static [u8]> {
    // 3.x: type 2, remaining length 2, session-present 0, return code.
    // 5.0: type 2, remaining length 3, session-present 0, reason code, empty property list.
    match (version, refusal) {
        (MqttVersion::V31 | MqttVersion::V311, Refusal::ServerUnavailable | Refusal::RateExceeded) => {
            Some(&[0x20, 0x02, 0x00, 0x03])
        }
        (MqttVersion::V31 | MqttVersion::V311, Refusal::UnsupportedProtocol) => Some(&[0x20, 0x02, 0x00, 0x01]),
        (MqttVersion::V31 | MqttVersion::V311, Refusal::ClientIdRejected) => Some(&[0x20, 0x02, 0x00, 0x02]),
        (MqttVersion::V31 | MqttVersion::V311, Refusal::BadCredentials) => Some(&[0x20, 0x02, 0x00, 0x04]),
        (
            MqttVersion::V31 | MqttVersion::V311,
            Refusal::Malformed | Refusal::PacketTooLarge | Refusal::QuotaExceeded,
        ) => None,
        (MqttVersion::V5, Refusal::ServerUnavailable) => Some(&[0x20, 0x03, 0x00, 0x88, 0x00]),
        (MqttVersion::V5, Refusal::UnsupportedProtocol) => Some(&[0x20, 0x03, 0x00, 0x84, 0x00]),
        (MqttVersion::V5, Refusal::ClientIdRejected) => Some(&[0x20, 0x03, 0x00, 0x85, 0x00]),
        (MqttVersion::V5, Refusal::Malformed) => Some(&[0x20, 0x03, 0x00, 0x81, 0x00]),
        (MqttVersion::V5, Refusal::PacketTooLarge) => Some(&[0x20, 0x03, 0x00, 0x95, 0x00]),
        (MqttVersion::V5, Refusal::RateExceeded) => Some(&[0x20, 0x03, 0x00, 0x9F, 0x00]),
        (MqttVersion::V5, Refusal::QuotaExceeded) => Some(&[0x20, 0x03, 0x00, 0x97, 0x00]),
        (MqttVersion::V5, Refusal::BadCredentials) => Some(&[0x20, 0x03, 0x00, 0x86, 0x00]),
    }
}

/// The `connack` label of a refusal in `harbormaster_connections_refused_total`: the code of
/// the CONNACK sent (return code in 3.x, reason code in 5.0: the fourth byte of either
/// [`connack`] layout), in hex as the MQTT specifications write them, or "none" when the
/// connection was closed without one.
pub fn connack_label(code: Option<u8>) -> &'static str {
    match code {
        None => "none",
        Some(0x01) => "0x01",
        Some(0x02) => "0x02",
        Some(0x03) => "0x03",
        Some(0x04) => "0x04",
        Some(0x05) => "0x05",
        Some(0x81) => "0x81",
        Some(0x84) => "0x84",
        Some(0x85) => "0x85",
        Some(0x86) => "0x86",
        Some(0x88) => "0x88",
        Some(0x95) => "0x95",
        Some(0x97) => "0x97",
        Some(0x9F) => "0x9f",
        Some(_) => "other",
    }
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use std::sync::Arc;

    /// Generous limit for tests that are not about the size limit.
    const MAX: usize = 1 << 20;
    /// A PINGREQ, as a client might pipeline it right behind its CONNECT.
    const PINGREQ: [u8; 2] = [0xc0, 0x00];

    // ---------------------------------------------------------------------------------------
    // A test-side encoder, independent of the parser, used by the tables and the proptests.
    // ---------------------------------------------------------------------------------------

    fn put_var_int(out: &mut Vec<u8>, mut value: usize, min_len: usize) {
        let mut written = 0;
        loop {
            let mut byte = (value % 128) as u8;
            value /= 128;
            written += 1;
            let more = value > 0 || written < min_len;
            if more {
                byte |= 0x80;
            }
            out.push(byte);
            if !more {
                return;
            }
        }
    }

    fn put_bin(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&u16::try_from(bytes.len()).unwrap().to_be_bytes());
        out.extend_from_slice(bytes);
    }

    /// A 5.0 property, enough variety to exercise every value encoding.
    #[derive(Debug, Clone)]
    enum Prop {
        U8(u8, u8),
        U16(u8, u16),
        U32(u8, u32),
        Str(u8, Vec<u8>),
        User(Vec<u8>, Vec<u8>),
    }

    fn encode_props(props: &[Prop]) -> Vec<u8> {
        let mut out = Vec::new();
        for prop in props {
            match prop {
                Prop::U8(id, v) => out.extend_from_slice(&[*id, *v]),
                Prop::U16(id, v) => {
                    out.push(*id);
                    out.extend_from_slice(&v.to_be_bytes());
                }
                Prop::U32(id, v) => {
                    out.push(*id);
                    out.extend_from_slice(&v.to_be_bytes());
                }
                Prop::Str(id, v) => {
                    out.push(*id);
                    put_bin(&mut out, v);
                }
                Prop::User(k, v) => {
                    out.push(0x26);
                    put_bin(&mut out, k);
                    put_bin(&mut out, v);
                }
            }
        }
        out
    }

    #[derive(Debug, Clone)]
    struct Will {
        qos: u8,
        retain: bool,
        props: Vec<Prop>,
        topic: Vec<u8>,
        payload: Vec<u8>,
    }

    #[derive(Debug, Clone)]
    struct Packet {
        version: MqttVersion,
        clean: bool,
        keep_alive: u16,
        props: Vec<Prop>,
        client_id: Vec<u8>,
        will: Option<Will>,
        username: Option<Vec<u8>>,
        password: Option<Vec<u8>>,
        /// Minimum bytes for the remaining length: non-minimal encodings are accepted.
        len_bytes: usize,
        /// The bridge bit on the protocol level (3.x only).
        bridge: bool,
    }

    impl Packet {
        fn new(version: MqttVersion, client_id: &[u8]) -> Self {
            Packet {
                version,
                clean: true,
                keep_alive: 60,
                props: Vec::new(),
                client_id: client_id.to_vec(),
                will: None,
                username: None,
                password: None,
                len_bytes: 1,
                bridge: false,
            }
        }

        fn encode(&self) -> Vec<u8> {
            let mut body = Vec::new();
            let (name, level): (&[u8], u8) = match self.version {
                MqttVersion::V31 => (b"MQIsdp", 3),
                MqttVersion::V311 => (b"MQTT", 4),
                MqttVersion::V5 => (b"MQTT", 5),
            };
            put_bin(&mut body, name);
            body.push(if self.bridge { level | 0x80 } else { level });
            let mut flags = 0u8;
            if self.clean {
                flags |= 0x02;
            }
            if let Some(will) = &self.will {
                flags |= 0x04 | will.qos << 3;
                if will.retain {
                    flags |= 0x20;
                }
            }
            if self.password.is_some() {
                flags |= 0x40;
            }
            if self.username.is_some() {
                flags |= 0x80;
            }
            body.push(flags);
            body.extend_from_slice(&self.keep_alive.to_be_bytes());
            let v5 = self.version == MqttVersion::V5;
            if v5 {
                let props = encode_props(&self.props);
                put_var_int(&mut body, props.len(), 1);
                body.extend_from_slice(&props);
            }
            put_bin(&mut body, &self.client_id);
            if let Some(will) = &self.will {
                if v5 {
                    let props = encode_props(&will.props);
                    put_var_int(&mut body, props.len(), 1);
                    body.extend_from_slice(&props);
                }
                put_bin(&mut body, &will.topic);
                put_bin(&mut body, &will.payload);
            }
            if let Some(username) = &self.username {
                put_bin(&mut body, username);
            }
            if let Some(password) = &self.password {
                put_bin(&mut body, password);
            }
            let mut out = vec![0x10];
            put_var_int(&mut out, body.len(), self.len_bytes);
            out.extend_from_slice(&body);
            out
        }

        fn expected(&self) -> Connect<'_> {
            Connect {
                version: self.version,
                client_id: &self.client_id,
                username: self.username.as_deref(),
                clean_session: self.clean,
                keep_alive: self.keep_alive,
                bridge: self.bridge,
            }
        }
    }

    fn complete(connect: Connect<'_>, len: usize) -> Result<Peek<'_>, ConnectError> {
        Ok(Peek::Complete { connect, len })
    }

    fn bad(reason: &'static str, version: Option<MqttVersion>) -> ConnectError {
        ConnectError::Malformed { reason, version }
    }

    // ---------------------------------------------------------------------------------------
    // Known-good packets: hand-written bytes, so the encoder above is checked as well.
    // ---------------------------------------------------------------------------------------

    /// (name, bytes, expected fields)
    fn valid_table() -> Vec<(&'static str, Vec<u8>, Connect<'static>)> {
        let mut table = vec![
            (
                "3.1.1 minimal, empty client id",
                [&[0x10, 12, 0, 4][..], b"MQTT", &[4, 0x02, 0, 60, 0, 0]].concat(),
                Connect {
                    version: MqttVersion::V311,
                    client_id: b"",
                    username: None,
                    clean_session: true,
                    keep_alive: 60,
                    bridge: false,
                },
            ),
            (
                // The example from mqttbytes' own test suite.
                "3.1.1 will + username + password",
                [
                    &[0x10, 39, 0, 4][..],
                    b"MQTT",
                    &[4, 0b1100_1110, 0, 10, 0, 4],
                    b"test",
                    &[0, 2],
                    b"/a",
                    &[0, 7],
                    b"offline",
                    &[0, 4],
                    b"rumq",
                    &[0, 2],
                    b"mq",
                ]
                .concat(),
                Connect {
                    version: MqttVersion::V311,
                    client_id: b"test",
                    username: Some(b"rumq"),
                    clean_session: true,
                    keep_alive: 10,
                    bridge: false,
                },
            ),
            (
                "3.1 username + password, persistent session",
                [
                    &[0x10, 31, 0, 6][..],
                    b"MQIsdp",
                    &[3, 0xc0, 0x01, 0x2c, 0, 5],
                    b"hello",
                    &[0, 4],
                    b"user",
                    &[0, 4],
                    b"pass",
                ]
                .concat(),
                Connect {
                    version: MqttVersion::V31,
                    client_id: b"hello",
                    username: Some(b"user"),
                    clean_session: false,
                    keep_alive: 300,
                    bridge: false,
                },
            ),
            (
                "3.1 will QoS 2, no credentials",
                [&[0x10, 27, 0, 6][..], b"MQIsdp", &[3, 0x16, 0, 0, 0, 2], b"id", &[0, 3], b"t/x", &[0, 4], b"gone"]
                    .concat(),
                Connect {
                    version: MqttVersion::V31,
                    client_id: b"id",
                    username: None,
                    clean_session: true,
                    keep_alive: 0,
                    bridge: false,
                },
            ),
            (
                "5.0 properties, user property, will properties, all credentials",
                [
                    &[0x10, 0x44, 0, 4][..],
                    b"MQTT",
                    &[5, 0xee, 0, 30],
                    // properties: session expiry 3600, receive maximum 20, user property k=v
                    &[15, 0x11, 0, 0, 0x0e, 0x10, 0x21, 0, 20, 0x26, 0, 1, b'k', 0, 1, b'v'],
                    &[0, 3],
                    b"cid",
                    // will properties: delay 5, payload format 1, user property wk=wv
                    &[16, 0x18, 0, 0, 0, 5, 0x01, 1, 0x26, 0, 2, b'w', b'k', 0, 2, b'w', b'v'],
                    &[0, 3],
                    b"a/b",
                    &[0, 2],
                    b"by",
                    &[0, 4],
                    b"user",
                    &[0, 3, 1, 2, 3],
                ]
                .concat(),
                Connect {
                    version: MqttVersion::V5,
                    client_id: b"cid",
                    username: Some(b"user"),
                    clean_session: true,
                    keep_alive: 30,
                    bridge: false,
                },
            ),
            (
                "5.0 no properties, password without username",
                [&[0x10, 23, 0, 4][..], b"MQTT", &[5, 0x40, 0, 5, 0, 0, 3], b"abc", &[0, 5], b"token"].concat(),
                Connect {
                    version: MqttVersion::V5,
                    client_id: b"abc",
                    username: None,
                    clean_session: false,
                    keep_alive: 5,
                    bridge: false,
                },
            ),
            (
                "3.1.1 non-minimal remaining length, non-ASCII client id",
                [&[0x10, 0x8e, 0x80, 0x00, 0, 4][..], b"MQTT", &[4, 0, 0, 1, 0, 2, 0xc3, 0xa9]].concat(),
                Connect {
                    version: MqttVersion::V311,
                    client_id: "é".as_bytes(),
                    username: None,
                    clean_session: false,
                    keep_alive: 1,
                    bridge: false,
                },
            ),
            (
                // As a mosquitto bridge with `try_private true` sends it: level 0x84, a will on
                // its state topic, no clean session.
                "3.1.1 bridge (level 0x84)",
                [
                    &[0x10, 47, 0, 4][..],
                    b"MQTT",
                    &[0x84, 0x2c, 0, 60, 0, 15],
                    b"edge.core-link0",
                    &[0, 15],
                    b"$SYS/link/state",
                    &[0, 1],
                    b"0",
                ]
                .concat(),
                Connect {
                    version: MqttVersion::V311,
                    client_id: b"edge.core-link0",
                    username: None,
                    clean_session: false,
                    keep_alive: 60,
                    bridge: true,
                },
            ),
            (
                "3.1 bridge (level 0x83)",
                [&[0x10, 18, 0, 6][..], b"MQIsdp", &[0x83, 0x02, 0, 60, 0, 4], b"edge"].concat(),
                Connect {
                    version: MqttVersion::V31,
                    client_id: b"edge",
                    username: None,
                    clean_session: true,
                    keep_alive: 60,
                    bridge: true,
                },
            ),
        ];
        // A packet whose remaining length needs two bytes.
        let long_id = vec![b'x'; 300];
        let mut long = Packet::new(MqttVersion::V5, &long_id);
        long.props = vec![Prop::User(b"key".to_vec(), vec![b'v'; 200])];
        long.username = Some(b"u".to_vec());
        table.push((
            "5.0 two-byte remaining length",
            long.encode(),
            Connect {
                version: MqttVersion::V5,
                client_id: long_id.leak(),
                username: Some(b"u"),
                clean_session: true,
                keep_alive: 60,
                bridge: false,
            },
        ));
        table
    }

    #[test]
    fn valid_packets_parse() {
        for (name, bytes, expected) in valid_table() {
            let len = bytes.len();
            assert_eq!(peek_connect(&bytes, MAX), complete(expected.clone(), len), "{name}");
            // Exactly at the limit is allowed.
            assert_eq!(peek_connect(&bytes, len), complete(expected.clone(), len), "{name}");
            // Pipelined bytes after the CONNECT are left alone.
            let mut pipelined = bytes.clone();
            pipelined.extend_from_slice(&PINGREQ);
            pipelined.extend_from_slice(&bytes);
            assert_eq!(peek_connect(&pipelined, MAX), complete(expected, len), "{name}");
        }
    }

    #[test]
    fn every_truncation_is_incomplete() {
        for (name, bytes, _) in valid_table() {
            for cut in 0..bytes.len() {
                assert_eq!(peek_connect(&bytes[..cut], MAX), Ok(Peek::Incomplete), "{name} @{cut}");
            }
        }
    }

    #[test]
    fn encoder_matches_hand_written_bytes() {
        let table = valid_table();
        let mut p = Packet::new(MqttVersion::V311, b"test");
        p.keep_alive = 10;
        p.will =
            Some(Will { qos: 1, retain: false, props: vec![], topic: b"/a".to_vec(), payload: b"offline".to_vec() });
        p.username = Some(b"rumq".to_vec());
        p.password = Some(b"mq".to_vec());
        assert_eq!(p.encode(), table[1].1);

        let mut p = Packet::new(MqttVersion::V5, b"cid");
        p.keep_alive = 30;
        p.props = vec![Prop::U32(0x11, 3600), Prop::U16(0x21, 20), Prop::User(b"k".to_vec(), b"v".to_vec())];
        p.will = Some(Will {
            qos: 1,
            retain: true,
            props: vec![Prop::U32(0x18, 5), Prop::U8(0x01, 1), Prop::User(b"wk".to_vec(), b"wv".to_vec())],
            topic: b"a/b".to_vec(),
            payload: b"by".to_vec(),
        });
        p.username = Some(b"user".to_vec());
        p.password = Some(vec![1, 2, 3]);
        assert_eq!(p.encode(), table[4].1);
    }

    // ---------------------------------------------------------------------------------------
    // Errors, and how early they are decided.
    // ---------------------------------------------------------------------------------------

    /// A valid 3.1.1 CONNECT with the given flags, used to derive the flag error cases.
    fn v311_with_flags(flags: u8) -> Vec<u8> {
        [&[0x10, 14, 0, 4][..], b"MQTT", &[4, flags, 0, 60, 0, 2], b"id"].concat()
    }

    #[test]
    fn error_cases() {
        use MqttVersion::*;
        let v311 = Some(V311);
        let cases: Vec<(&str, Vec<u8>, Result<Peek<'static>, ConnectError>)> = vec![
            ("PUBLISH first", vec![0x30], Err(ConnectError::NotConnect(3))),
            ("CONNACK first", vec![0x20, 2, 0, 0], Err(ConnectError::NotConnect(2))),
            ("type 0", vec![0x00, 0x00], Err(ConnectError::NotConnect(0))),
            ("type 15", vec![0xf0], Err(ConnectError::NotConnect(15))),
            (
                // Content type 22 happens to be packet type 1 with flags 6.
                "TLS ClientHello",
                vec![0x16, 0x03, 0x01],
                Err(bad("reserved fixed-header flags are set", None)),
            ),
            ("HTTP", b"GET / HTTP/1.1".to_vec(), Err(ConnectError::NotConnect(4))),
            ("header flags", vec![0x12], Err(bad("reserved fixed-header flags are set", None))),
            ("header flags 0x1f", vec![0x1f], Err(bad("reserved fixed-header flags are set", None))),
            (
                "5-byte remaining length",
                vec![0x10, 0xff, 0xff, 0xff, 0x80],
                Err(bad("remaining length is longer than 4 bytes", None)),
            ),
            ("remaining length 0", vec![0x10, 0x00], Err(bad("protocol name runs past the end of the packet", None))),
            (
                "protocol name longer than the packet",
                vec![0x10, 0x05, 0x00, 0x04, b'M'],
                Err(bad("protocol name runs past the end of the packet", None)),
            ),
            (
                "known name, packet ends before level",
                [&[0x10, 6, 0, 4][..], b"MQTT"].concat(),
                Err(bad("packet ends before the protocol level", None)),
            ),
            (
                "unknown name, packet ends before level",
                [&[0x10, 6, 0, 4][..], b"MQTX"].concat(),
                Err(ConnectError::UnsupportedProtocol { level: 0 }),
            ),
            (
                "MQTT level 3",
                [&[0x10, 10, 0, 4][..], b"MQTT", &[3, 2, 0, 0, 0, 0]].concat(),
                Err(ConnectError::UnsupportedProtocol { level: 3 }),
            ),
            (
                "MQTT level 6",
                [&[0x10, 7, 0, 4][..], b"MQTT", &[6]].concat(),
                Err(ConnectError::UnsupportedProtocol { level: 6 }),
            ),
            (
                "MQIsdp level 4",
                [&[0x10, 9, 0, 6][..], b"MQIsdp", &[4]].concat(),
                Err(ConnectError::UnsupportedProtocol { level: 4 }),
            ),
            (
                "lower-case name",
                [&[0x10, 7, 0, 4][..], b"mqtt", &[4]].concat(),
                Err(ConnectError::UnsupportedProtocol { level: 4 }),
            ),
            ("empty name", vec![0x10, 3, 0, 0, 4], Err(ConnectError::UnsupportedProtocol { level: 4 })),
            ("reserved connect flag", v311_with_flags(0x03), Err(bad("reserved connect flag is set", v311))),
            ("will QoS 3", v311_with_flags(0x1c), Err(bad("will QoS is 3", v311))),
            ("will QoS without will", v311_with_flags(0x08), Err(bad("will QoS or retain set without a will", v311))),
            (
                "will retain without will",
                v311_with_flags(0x20),
                Err(bad("will QoS or retain set without a will", v311)),
            ),
            ("3.1.1 password without username", v311_with_flags(0x40), Err(bad("password without a username", v311))),
            (
                "3.1 password without username",
                [&[0x10, 16, 0, 6][..], b"MQIsdp", &[3, 0x40, 0, 0, 0, 2], b"id"].concat(),
                Err(bad("password without a username", Some(V31))),
            ),
            (
                "packet ends before flags",
                [&[0x10, 7, 0, 4][..], b"MQTT", &[4]].concat(),
                Err(bad("packet ends before the connect flags", v311)),
            ),
            (
                "packet ends inside keep-alive",
                [&[0x10, 9, 0, 4][..], b"MQTT", &[4, 2, 0]].concat(),
                Err(bad("packet ends inside the keep-alive", v311)),
            ),
            (
                "client id longer than the packet",
                [&[0x10, 14, 0, 4][..], b"MQTT", &[4, 2, 0, 60, 0, 3], b"id"].concat(),
                Err(bad("client identifier runs past the end of the packet", v311)),
            ),
            (
                "username flag, no username",
                v311_with_flags(0x80),
                Err(bad("username runs past the end of the packet", v311)),
            ),
            ("will flag, no will", v311_with_flags(0x04), Err(bad("will topic runs past the end of the packet", v311))),
            (
                "trailing byte",
                [&[0x10, 15, 0, 4][..], b"MQTT", &[4, 2, 0, 60, 0, 2], b"id", &[0]].concat(),
                Err(bad("bytes after the last CONNECT field", v311)),
            ),
            (
                "5.0 properties longer than the packet",
                [&[0x10, 14, 0, 4][..], b"MQTT", &[5, 2, 0, 60, 5, 0, 0, 0]].concat(),
                Err(bad("CONNECT properties run past the end of the packet", Some(V5))),
            ),
            (
                "5.0 property length varint runs past the packet",
                [&[0x10, 11, 0, 4][..], b"MQTT", &[5, 2, 0, 60, 0x80]].concat(),
                Err(bad("CONNECT properties run past the end of the packet", Some(V5))),
            ),
            (
                "5.0 property length of 5 bytes",
                [&[0x10, 20, 0, 4][..], b"MQTT", &[5, 2, 0, 60, 0x80, 0x80, 0x80, 0x80]].concat(),
                Err(bad("CONNECT properties run past the end of the packet", Some(V5))),
            ),
            (
                "5.0 will properties longer than the packet",
                [&[0x10, 16, 0, 4][..], b"MQTT", &[5, 6, 0, 60, 0, 0, 1, b'i', 9]].concat(),
                Err(bad("will properties run past the end of the packet", Some(V5))),
            ),
            (
                "5.0 will payload longer than the packet",
                [&[0x10, 22, 0, 4][..], b"MQTT", &[5, 6, 0, 60, 0, 0, 1, b'i', 0, 0, 1, b't', 0, 9]].concat(),
                Err(bad("will payload runs past the end of the packet", Some(V5))),
            ),
        ];
        for (name, bytes, expected) in cases {
            assert_eq!(peek_connect(&bytes, MAX), expected, "{name}");
            // Errors are final: more bytes (here, pipelined data) never change the verdict.
            let mut longer = bytes.clone();
            longer.extend_from_slice(&[0u8; 64]);
            assert_eq!(peek_connect(&longer, MAX), expected, "{name} + more bytes");
        }
    }

    /// The protocol level's high bit marks a 3.x bridge: the low bits still decide the version,
    /// and only the levels a bridge can send pass.
    #[test]
    fn bridge_levels() {
        let with_level = |name: &[u8], level: u8| {
            let mut body = [&[0, name.len() as u8][..], name, &[level, 0x02, 0, 60, 0, 2], b"id"].concat();
            let mut bytes = vec![0x10, body.len() as u8];
            bytes.append(&mut body);
            bytes
        };
        let accepted = |bytes: &[u8]| match peek_connect(bytes, MAX) {
            Ok(Peek::Complete { connect, len }) if len == bytes.len() => Some((connect.version, connect.bridge)),
            _ => None,
        };
        assert_eq!(accepted(&with_level(b"MQTT", 0x84)), Some((MqttVersion::V311, true)));
        assert_eq!(accepted(&with_level(b"MQIsdp", 0x83)), Some((MqttVersion::V31, true)));
        assert_eq!(accepted(&with_level(b"MQTT", 4)), Some((MqttVersion::V311, false)));
        assert_eq!(accepted(&with_level(b"MQIsdp", 3)), Some((MqttVersion::V31, false)));
        // 5.0 defines no bridge bit; the other levels are unknown with or without it; the bit
        // does not make a level fit the other protocol name.
        for (name, level) in [
            (&b"MQTT"[..], 0x85),
            (b"MQTT", 0x82),
            (b"MQTT", 0x83),
            (b"MQTT", 0x80),
            (b"MQTT", 0xff),
            (b"MQIsdp", 0x84),
            (b"MQIsdp", 0x85),
            (b"MQIsdp", 0x82),
        ] {
            let bytes = with_level(name, level);
            assert_eq!(
                peek_connect(&bytes, MAX),
                Err(ConnectError::UnsupportedProtocol { level }),
                "{} level {level:#04x}",
                String::from_utf8_lossy(name)
            );
        }
        // A bridge CONNECT too large is refused with its version known.
        let bytes = with_level(b"MQTT", 0x84);
        assert_eq!(
            peek_connect(&bytes, bytes.len() - 1),
            Err(ConnectError::TooLarge { len: bytes.len(), max: bytes.len() - 1, version: Some(MqttVersion::V311) })
        );
    }

    #[test]
    fn errors_are_decided_as_early_as_possible() {
        // The type nibble alone.
        assert_eq!(peek_connect(&[0x82], MAX), Err(ConnectError::NotConnect(8)));
        // Four continuation bytes: no fifth byte needed to know it is malformed.
        assert_eq!(
            peek_connect(&[0x10, 0x80, 0x80, 0x80, 0x80], MAX),
            Err(bad("remaining length is longer than 4 bytes", None))
        );
        // Bad flags are reported before the payload arrives.
        let flags_bad = v311_with_flags(0x01);
        assert_eq!(
            peek_connect(&flags_bad[..10], MAX),
            Err(bad("reserved connect flag is set", Some(MqttVersion::V311)))
        );
        assert_eq!(peek_connect(&flags_bad[..9], MAX), Ok(Peek::Incomplete));
        // A client id longer than the declared packet is malformed before its bytes arrive.
        let long_id = [&[0x10, 100, 0, 4][..], b"MQTT", &[4, 2, 0, 60, 0, 99]].concat();
        assert_eq!(
            peek_connect(&long_id, MAX),
            Err(bad("client identifier runs past the end of the packet", Some(MqttVersion::V311)))
        );
        // Unsupported protocol waits for the level byte...
        let v6 = [&[0x10, 20, 0, 4][..], b"MQTT"].concat();
        assert_eq!(peek_connect(&v6, MAX), Ok(Peek::Incomplete));
        assert_eq!(peek_connect(&[&v6[..], &[6]].concat(), MAX), Err(ConnectError::UnsupportedProtocol { level: 6 }));
        // ...also when the name is wrong, so that the level can be reported.
        let wrong = [&[0x10, 20, 0, 5][..], b"HELLO"].concat();
        assert_eq!(peek_connect(&wrong, MAX), Ok(Peek::Incomplete));
        assert_eq!(
            peek_connect(&[&wrong[..], &[4]].concat(), MAX),
            Err(ConnectError::UnsupportedProtocol { level: 4 })
        );
        // Trailing bytes inside the packet are known from the declared length alone.
        let trailing = [&[0x10, 30, 0, 4][..], b"MQTT", &[4, 2, 0, 60, 0, 2], b"id"].concat();
        assert_eq!(
            peek_connect(&trailing, MAX),
            Err(bad("bytes after the last CONNECT field", Some(MqttVersion::V311)))
        );
    }

    /// Not valid MQTT UTF-8 strings, with the problem reported.
    const BAD_STRINGS: [(&[u8], &str); 7] = [
        (b"bad-\xc3\x28", "is not well-formed UTF-8"),
        (b"\x80", "is not well-formed UTF-8"),
        (b"tail-\xe2\x82", "is not well-formed UTF-8"),
        // An encoded surrogate (U+D800) and an overlong NUL: ill-formed UTF-8.
        (b"\xed\xa0\x80", "is not well-formed UTF-8"),
        (b"\xc0\x80", "is not well-formed UTF-8"),
        (b"a\0b", "contains U+0000"),
        (b"\0", "contains U+0000"),
    ];

    /// A CONNECT of `version` with a will and a username, one of whose strings is `bad`.
    fn with_bad_string(version: MqttVersion, field: StringField, bad: &[u8]) -> Packet {
        let mut p = Packet::new(version, b"id");
        p.will = Some(Will { qos: 1, retain: false, props: vec![], topic: b"t/x".to_vec(), payload: b"bye".to_vec() });
        p.username = Some(b"user".to_vec());
        p.password = Some(b"pw".to_vec());
        match field {
            StringField::ClientId => p.client_id = bad.to_vec(),
            StringField::WillTopic => p.will.as_mut().unwrap().topic = bad.to_vec(),
            StringField::Username => p.username = Some(bad.to_vec()),
        }
        p
    }

    /// Byte offset just past `field` in `p.encode()`: where the verdict can first be given.
    fn end_of(p: &Packet, field: StringField) -> usize {
        let mut cut = p.clone();
        cut.password = None;
        if field != StringField::Username {
            cut.username = None;
        }
        if field == StringField::ClientId {
            cut.will = None;
        } else if field == StringField::WillTopic {
            cut.will.as_mut().unwrap().payload.clear();
        }
        let header = if p.encode().len() - 2 < 128 { 2 } else { 3 };
        // The trimmed packet's body is a prefix of the whole body, up to trailing fields
        // (and the will payload's two length bytes when the will topic is the field).
        let trailing = usize::from(field == StringField::WillTopic) * 2;
        let cut_bytes = cut.encode();
        let cut_header = if cut_bytes.len() - 2 < 128 { 2 } else { 3 };
        cut_bytes.len() - cut_header + header - trailing
    }

    #[test]
    fn invalid_strings_are_refused_as_soon_as_they_are_complete() {
        for version in [MqttVersion::V31, MqttVersion::V311, MqttVersion::V5] {
            for field in [StringField::ClientId, StringField::WillTopic, StringField::Username] {
                for (bad, problem) in BAD_STRINGS {
                    let p = with_bad_string(version, field, bad);
                    let bytes = p.encode();
                    let error = ConnectError::BadString { field, problem, version };
                    let expected = Err(error.clone());
                    let what = format!("{version:?} {field} {bad:02x?}");
                    assert_eq!(peek_connect(&bytes, MAX), expected, "{what}");
                    // Decided once the field is whole, and not a byte earlier.
                    let end = end_of(&p, field);
                    assert_eq!(peek_connect(&bytes[..end], MAX), expected, "{what} at its end");
                    assert_eq!(peek_connect(&bytes[..end - 1], MAX), Ok(Peek::Incomplete), "{what} before its end");
                    // More bytes never change it.
                    let mut longer = bytes.clone();
                    longer.extend_from_slice(&PINGREQ);
                    assert_eq!(peek_connect(&longer, MAX), expected, "{what} + more");
                    // The message names the field for the log's detail.
                    let message = error.to_string();
                    assert!(message.contains(&field.to_string()) && message.contains(problem), "{message}");
                }
            }
        }
    }

    #[test]
    fn valid_mqtt_strings_and_binary_fields_are_accepted() {
        // Multi-byte characters, U+FFFF (a non-character: "should not", not "must not") and
        // control characters other than U+0000 are valid MQTT strings.
        for s in ["é", "日本", "\u{10FFFF}", "\u{FFFF}", "a\u{1}b\u{7f}"] {
            for field in [StringField::ClientId, StringField::WillTopic, StringField::Username] {
                let p = with_bad_string(MqttVersion::V5, field, s.as_bytes());
                let bytes = p.encode();
                assert_eq!(peek_connect(&bytes, MAX), complete(p.expected(), bytes.len()), "{s:?} as {field}");
            }
        }
        // Password and will payload are binary data, and 5.0 property values are skipped
        // unread: none of them is checked.
        let mut p = Packet::new(MqttVersion::V5, b"id");
        p.props = vec![Prop::Str(0x15, b"\xff\0".to_vec()), Prop::User(b"\0".to_vec(), b"\xc3\x28".to_vec())];
        p.will = Some(Will {
            qos: 0,
            retain: false,
            props: vec![Prop::Str(0x03, b"\xff".to_vec())],
            topic: b"t".to_vec(),
            payload: b"\xff\0".to_vec(),
        });
        p.username = Some(b"u".to_vec());
        p.password = Some(b"\xff\0\xc3".to_vec());
        let bytes = p.encode();
        assert_eq!(peek_connect(&bytes, MAX), complete(p.expected(), bytes.len()));
    }

    #[test]
    fn the_first_bad_string_is_reported() {
        // A bad client-id and a bad username: the client-id comes first on the wire.
        let mut p = with_bad_string(MqttVersion::V311, StringField::ClientId, b"\0");
        p.username = Some(b"\xff".to_vec());
        assert_eq!(
            peek_connect(&p.encode(), MAX),
            Err(ConnectError::BadString {
                field: StringField::ClientId,
                problem: "contains U+0000",
                version: MqttVersion::V311
            })
        );
        // A bad string before a field that runs past the packet: the string is reported.
        let bytes = [&[0x10, 16, 0, 4][..], b"MQTT", &[4, 0x82, 0, 60, 0, 1, 0xff, 0, 9]].concat();
        assert_eq!(
            peek_connect(&bytes, MAX),
            Err(ConnectError::BadString {
                field: StringField::ClientId,
                problem: "is not well-formed UTF-8",
                version: MqttVersion::V311
            })
        );
    }

    #[test]
    fn too_large() {
        let mut p = Packet::new(MqttVersion::V5, &[b'c'; 200]);
        p.username = Some(b"someone".to_vec());
        let bytes = p.encode();
        let len = bytes.len();
        let too_large = |version| Err(ConnectError::TooLarge { len, max: len - 1, version });
        // As soon as the remaining length is complete, before the version is known.
        assert_eq!(peek_connect(&bytes[..2], len - 1), Ok(Peek::Incomplete));
        assert_eq!(peek_connect(&bytes[..3], len - 1), too_large(None));
        // The protocol name is there, the level is not.
        assert_eq!(peek_connect(&bytes[..9], len - 1), too_large(None));
        // Name and level are in the buffer: the version is reported for the CONNACK.
        assert_eq!(peek_connect(&bytes[..10], len - 1), too_large(Some(MqttVersion::V5)));
        assert_eq!(peek_connect(&bytes, len - 1), too_large(Some(MqttVersion::V5)));
        // An unsupported protocol does not name a version.
        assert_eq!(
            peek_connect(&[0x10, 0x7f, 0, 4, b'M', b'Q', b'T', b'T', 9], 10),
            Err(ConnectError::TooLarge { len: 129, max: 10, version: None })
        );
        // A maximal remaining length does not overflow anything.
        assert_eq!(
            peek_connect(&[0x10, 0xff, 0xff, 0xff, 0x7f], MAX),
            Err(ConnectError::TooLarge { len: 268_435_455 + 5, max: MAX, version: None })
        );
        assert_eq!(peek_connect(&[0x10, 0xff, 0xff, 0xff, 0x7f], usize::MAX), Ok(Peek::Incomplete));
        // Zero limit: everything is too large.
        assert!(matches!(peek_connect(&bytes, 0), Err(ConnectError::TooLarge { .. })));
    }

    /// The version is known from the protocol level on, and the announced length from the end
    /// of the fixed header on, at every truncation point; neither looks past them.
    #[test]
    fn version_and_announced_length_of_a_prefix() {
        for v in [MqttVersion::V31, MqttVersion::V311, MqttVersion::V5] {
            let mut p = Packet::new(v, b"prefix-client");
            p.username = Some(vec![b'u'; 300]);
            p.len_bytes = 2;
            let bytes = p.encode();
            // Fixed header (1 + 2), name (2 + 4 or 6), level (1).
            let header = 3;
            let level_at = header + 2 + if v == MqttVersion::V31 { 6 } else { 4 };
            for cut in 0..=bytes.len() {
                let prefix = &bytes[..cut];
                assert_eq!(announced_len(prefix), (cut >= header).then_some(bytes.len()), "{v:?} cut {cut}");
                assert_eq!(version(prefix), (cut > level_at).then_some(v), "{v:?} cut {cut}");
            }
        }
        assert_eq!(version(&[0x30, 0x05, 0, 4, b'M', b'Q', b'T', b'T', 4]), None, "not a CONNECT");
        assert_eq!(version(&[0x10, 0x07, 0, 4, b'M', b'Q', b'T', b'T', 9]), None, "unknown level");
        assert_eq!(announced_len(&[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]), None, "5-byte remaining length");
    }

    #[test]
    fn empty_input_is_incomplete() {
        assert_eq!(peek_connect(&[], MAX), Ok(Peek::Incomplete));
        assert_eq!(peek_connect(&[0x10], MAX), Ok(Peek::Incomplete));
        assert_eq!(peek_connect(&[0x10, 0x80, 0x80, 0x80], MAX), Ok(Peek::Incomplete));
    }

    #[test]
    fn the_smallest_connect_is_min_connect_len_bytes() {
        let smallest = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 0];
        assert_eq!(smallest.len(), MIN_CONNECT_LEN);
        let Ok(Peek::Complete { len, connect }) = peek_connect(&smallest, MIN_CONNECT_LEN) else { panic!() };
        assert_eq!((len, connect.version, connect.client_id), (MIN_CONNECT_LEN, MqttVersion::V311, &b""[..]));
    }

    #[test]
    fn connack_labels_are_a_fixed_vocabulary() {
        assert_eq!(connack_label(None), "none");
        assert_eq!(connack_label(Some(3)), "0x03");
        assert_eq!(connack_label(Some(0x88)), "0x88");
        assert_eq!(connack_label(Some(0x42)), "other");
        // Every CONNACK harbormaster sends has a label of its own.
        use MqttVersion::*;
        use Refusal::*;
        for v in [V31, V311, V5] {
            let all = [ServerUnavailable, UnsupportedProtocol, ClientIdRejected, Malformed, PacketTooLarge];
            for r in all.into_iter().chain([RateExceeded, QuotaExceeded]) {
                if let Some(p) = connack(v, r) {
                    assert_ne!(connack_label(p.get(3).copied()), "other", "{v:?} {r:?}");
                }
            }
        }
    }

    #[test]
    fn connack_bytes() {
        use MqttVersion::*;
        use Refusal::*;
        for v in [V31, V311] {
            assert_eq!(connack(v, ServerUnavailable), Some(&[0x20, 2, 0, 3][..]));
            assert_eq!(connack(v, UnsupportedProtocol), Some(&[0x20, 2, 0, 1][..]));
            assert_eq!(connack(v, ClientIdRejected), Some(&[0x20, 2, 0, 2][..]));
            assert_eq!(connack(v, Malformed), None);
            assert_eq!(connack(v, PacketTooLarge), None);
            assert_eq!(connack(v, RateExceeded), Some(&[0x20, 2, 0, 3][..]));
            assert_eq!(connack(v, QuotaExceeded), None);
        }
        assert_eq!(connack(V5, QuotaExceeded), Some(&[0x20, 3, 0, 0x97, 0][..]));
        assert_eq!(connack(V5, RateExceeded), Some(&[0x20, 3, 0, 0x9F, 0][..]));
        assert_eq!(connack(V5, ServerUnavailable), Some(&[0x20, 3, 0, 0x88, 0][..]));
        assert_eq!(connack(V5, UnsupportedProtocol), Some(&[0x20, 3, 0, 0x84, 0][..]));
        assert_eq!(connack(V5, ClientIdRejected), Some(&[0x20, 3, 0, 0x85, 0][..]));
        assert_eq!(connack(V5, Malformed), Some(&[0x20, 3, 0, 0x81, 0][..]));
        assert_eq!(connack(V5, PacketTooLarge), Some(&[0x20, 3, 0, 0x95, 0][..]));
    }

    #[test]
    fn connacks_decode_with_independent_libraries() {
        use mqtt_proto::v3::{ConnectReturnCode as Rc, Packet as P3};
        use mqtt_proto::v5::{ConnectReasonCode as Rc5, Packet as P5};
        for (refusal, rc) in [
            (Refusal::ServerUnavailable, Rc::ServerUnavailable),
            (Refusal::UnsupportedProtocol, Rc::UnacceptableProtocolVersion),
            (Refusal::ClientIdRejected, Rc::IdentifierRejected),
            (Refusal::RateExceeded, Rc::ServerUnavailable),
        ] {
            let bytes = connack(MqttVersion::V311, refusal).unwrap();
            match P3::decode(bytes).unwrap() {
                Some(P3::Connack(c)) => assert_eq!((c.session_present, c.code), (false, rc)),
                other => panic!("{other:?}"),
            }
        }
        for (refusal, rc) in [
            (Refusal::ServerUnavailable, Rc5::ServerUnavailable),
            (Refusal::UnsupportedProtocol, Rc5::UnsupportedProtocolVersion),
            (Refusal::ClientIdRejected, Rc5::ClientIdentifierNotValid),
            (Refusal::Malformed, Rc5::MalformedPacket),
            (Refusal::PacketTooLarge, Rc5::PacketTooLarge),
            (Refusal::RateExceeded, Rc5::ConnectionRateExceeded),
            (Refusal::QuotaExceeded, Rc5::QuotaExceeded),
        ] {
            let bytes = connack(MqttVersion::V5, refusal).unwrap();
            match P5::decode(bytes).unwrap() {
                Some(P5::Connack(c)) => assert_eq!((c.session_present, c.reason_code), (false, rc)),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn version_labels() {
        assert_eq!(MqttVersion::V31.as_str(), "3.1");
        assert_eq!(MqttVersion::V311.as_str(), "3.1.1");
        assert_eq!(MqttVersion::V5.as_str(), "5.0");
    }

    // ---------------------------------------------------------------------------------------
    // Property tests.
    // ---------------------------------------------------------------------------------------

    fn small_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..=max)
    }

    /// Printable-ish text including non-ASCII, as independent decoders insist on UTF-8.
    fn text(max: usize) -> impl Strategy<Value = String> {
        prop::collection::vec(prop::char::range(' ', '\u{3ff}'), 0..=max).prop_map(|chars| chars.into_iter().collect())
    }

    /// A valid topic name (no wildcards), as mqtt-proto validates will topics.
    fn topic() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,3}"
    }

    /// Any valid MQTT UTF-8 string: every character but U+0000.
    fn mqtt_text(max: usize) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<char>().prop_filter("U+0000", |c| *c != '\0'), 0..=max)
            .prop_map(|chars| chars.into_iter().collect::<String>().into_bytes())
    }

    /// A UTF-8 string field (client-id, username): any valid MQTT string, or one the
    /// independent decoders accept too.
    fn string_leaf(max: usize, utf8: bool) -> BoxedStrategy<Vec<u8>> {
        if utf8 {
            text(max).prop_map(String::into_bytes).boxed()
        } else {
            mqtt_text(max).boxed()
        }
    }

    /// Binary fields and property contents: raw bytes (our parser must not care) or UTF-8 (so
    /// the independent decoders accept them too).
    fn leaf(max: usize, utf8: bool) -> BoxedStrategy<Vec<u8>> {
        if utf8 {
            text(max).prop_map(String::into_bytes).boxed()
        } else {
            small_bytes(max).boxed()
        }
    }

    fn user_props(utf8: bool) -> impl Strategy<Value = Vec<Prop>> {
        prop::collection::vec((leaf(8, utf8), leaf(24, utf8)), 0..3)
            .prop_map(|kvs| kvs.into_iter().map(|(k, v)| Prop::User(k, v)).collect())
    }

    /// CONNECT properties: each at most once (duplicates are a protocol error), plus user
    /// properties.
    fn connect_props(utf8: bool) -> impl Strategy<Value = Vec<Prop>> {
        (
            prop::option::of(any::<u32>()),
            prop::option::of(1u16..),
            prop::option::of(0u8..2),
            prop::option::of(leaf(12, utf8)),
            user_props(utf8),
        )
            .prop_map(|(expiry, receive_max, problem_info, auth_method, users)| {
                let mut props = Vec::new();
                props.extend(expiry.map(|v| Prop::U32(0x11, v)));
                props.extend(receive_max.map(|v| Prop::U16(0x21, v)));
                props.extend(problem_info.map(|v| Prop::U8(0x17, v)));
                // mqttbytes' order, so that its re-encoding can reproduce ours.
                props.extend(users);
                props.extend(auth_method.map(|v| Prop::Str(0x15, v)));
                props
            })
    }

    fn will_props(utf8: bool) -> impl Strategy<Value = Vec<Prop>> {
        (
            prop::option::of(any::<u32>()),
            prop::option::of(any::<u32>()),
            prop::option::of(leaf(12, utf8)),
            user_props(utf8),
        )
            .prop_map(|(delay, expiry, content_type, users)| {
                let mut props = Vec::new();
                props.extend(delay.map(|v| Prop::U32(0x18, v)));
                props.extend(expiry.map(|v| Prop::U32(0x02, v)));
                props.extend(content_type.map(|v| Prop::Str(0x03, v)));
                props.extend(users);
                props
            })
    }

    fn will_strategy(utf8: bool) -> impl Strategy<Value = Will> {
        let topic = if utf8 { topic().prop_map(String::into_bytes).boxed() } else { mqtt_text(20).boxed() };
        (0u8..3, any::<bool>(), will_props(utf8), topic, small_bytes(60))
            .prop_map(|(qos, retain, props, topic, payload)| Will { qos, retain, props, topic, payload })
    }

    fn packet_strategy_of(utf8: bool) -> impl Strategy<Value = Packet> {
        (
            prop_oneof![Just(MqttVersion::V31), Just(MqttVersion::V311), Just(MqttVersion::V5)],
            any::<bool>(),
            any::<u16>(),
            connect_props(utf8),
            // Mostly short ids, sometimes long enough for a multi-byte remaining length.
            prop_oneof![4 => string_leaf(30, utf8), 1 => string_leaf(400, utf8)],
            prop::option::of(will_strategy(utf8)),
            prop::option::of(string_leaf(20, utf8)),
            prop::option::of(leaf(20, utf8)),
            prop_oneof![3 => Just(1usize), 1 => 1usize..=4],
            prop::bool::weighted(0.2),
        )
            .prop_map(
                |(version, clean, keep_alive, props, client_id, will, username, password, len_bytes, bridge)| {
                    // 5.0 has no bridge bit.
                    let bridge = bridge && version != MqttVersion::V5;
                    let mut p = Packet {
                        version,
                        clean,
                        keep_alive,
                        props,
                        client_id,
                        will,
                        username,
                        password,
                        len_bytes,
                        bridge,
                    };
                    // 3.x has no password without a username.
                    if p.version != MqttVersion::V5 && p.username.is_none() {
                        p.password = None;
                    }
                    p
                },
            )
    }

    fn packet_strategy() -> impl Strategy<Value = Packet> {
        packet_strategy_of(false)
    }

    /// A valid packet (optionally followed by pipelined bytes) with a few random edits: inputs
    /// that reach deep into the parser, unlike uniformly random bytes.
    fn mutated_packet_of(utf8: bool) -> impl Strategy<Value = Vec<u8>> {
        (packet_strategy_of(utf8), small_bytes(8), prop::collection::vec((any::<Index>(), any::<u8>(), 0u8..4), 0..4))
            .prop_map(|(p, tail, edits)| {
                let mut bytes = p.encode();
                bytes.extend_from_slice(&tail);
                for (at, byte, kind) in edits {
                    if bytes.is_empty() {
                        break;
                    }
                    let i = at.index(bytes.len());
                    match kind {
                        0 => bytes[i] = byte,
                        1 => bytes.insert(i, byte),
                        2 => {
                            bytes.remove(i);
                        }
                        _ => bytes[i] ^= 1 << (byte % 8),
                    }
                }
                bytes
            })
    }

    fn mutated_packet() -> impl Strategy<Value = Vec<u8>> {
        mutated_packet_of(false)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in small_bytes(512), max in any::<usize>()) {
            let _ = peek_connect(&bytes, max);
            let _ = peek_connect(&bytes, MAX);
        }

        #[test]
        fn connect_like_bytes_never_panic(
            level in prop_oneof![Just(3u8), Just(4), Just(5), any::<u8>()],
            rest in small_bytes(300),
            declared in prop_oneof![Just(None), (0usize..400).prop_map(Some)],
        ) {
            // A plausible header over random contents, with a right or random remaining length.
            let mut body = [&[0, 4][..], b"MQTT", &[level]].concat();
            body.extend_from_slice(&rest);
            let mut bytes = vec![0x10];
            put_var_int(&mut bytes, declared.unwrap_or(body.len()), 1);
            bytes.extend_from_slice(&body);
            let _ = peek_connect(&bytes, MAX);
        }

        #[test]
        fn mutated_packets_never_panic(bytes in mutated_packet(), max in 0usize..600) {
            let _ = peek_connect(&bytes, max);
            let _ = peek_connect(&bytes, MAX);
        }

        #[test]
        fn random_connects_round_trip(p in packet_strategy(), tail in small_bytes(16)) {
            let bytes = p.encode();
            let len = bytes.len();
            prop_assert_eq!(peek_connect(&bytes, MAX), complete(p.expected(), len));
            let mut pipelined = bytes.clone();
            pipelined.extend_from_slice(&tail);
            prop_assert_eq!(peek_connect(&pipelined, MAX), complete(p.expected(), len));
            prop_assert_eq!(peek_connect(&bytes, len), complete(p.expected(), len));
            prop_assert_eq!(
                peek_connect(&bytes, len - 1),
                Err(ConnectError::TooLarge { len, max: len - 1, version: Some(p.version) })
            );
        }

        #[test]
        fn every_prefix_of_a_valid_connect_is_incomplete(p in packet_strategy()) {
            let bytes = p.encode();
            for cut in 0..bytes.len() {
                prop_assert_eq!(peek_connect(&bytes[..cut], MAX), Ok(Peek::Incomplete), "cut {}", cut);
            }
        }

        /// Decisions never change when more bytes arrive: an error on a prefix is the error on
        /// the whole input (only TooLarge may learn the version later), a Complete stays the
        /// same Complete, and a Complete on the whole means every shorter prefix was Incomplete.
        #[test]
        fn decisions_are_stable_as_bytes_arrive(bytes in mutated_packet(), cut in any::<Index>()) {
            let cut = cut.index(bytes.len() + 1);
            let whole = peek_connect(&bytes, MAX);
            let prefix = peek_connect(&bytes[..cut], MAX);
            match (&prefix, &whole) {
                (Ok(Peek::Incomplete), _) => {}
                (
                    Err(ConnectError::TooLarge { len, max, version: None }),
                    Err(ConnectError::TooLarge { len: len2, max: max2, .. }),
                ) => prop_assert_eq!((len, max), (len2, max2)),
                _ => prop_assert_eq!(&prefix, &whole),
            }
            if let Ok(Peek::Complete { len, .. }) = whole {
                if cut < len {
                    prop_assert_eq!(prefix, Ok(Peek::Incomplete));
                }
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Differential tests against two independent MQTT codecs: mqttbytes (3.1.1 and 5.0) and
    // mqtt-proto (3.1, 3.1.1 and 5.0). Their `bytes` types are only ever inferred, as that
    // crate is not a dependency of ours.
    // ---------------------------------------------------------------------------------------

    /// The fields an independent decoder found, in our terms, plus the raw connect flags so that
    /// the rules we enforce and it does not can be told apart.
    #[derive(Debug)]
    struct LibConnect {
        version: MqttVersion,
        client_id: Vec<u8>,
        username: Option<Vec<u8>>,
        clean_session: bool,
        keep_alive: u16,
        len: usize,
        flags: u8,
    }

    fn ours(bytes: &[u8]) -> (Connect<'_>, usize) {
        match peek_connect(bytes, MAX) {
            Ok(Peek::Complete { connect, len }) => (connect, len),
            other => panic!("expected a CONNECT, got {other:?} for {bytes:02x?}"),
        }
    }

    /// Checks that we decode `bytes` as the library did. Where the library is laxer than the
    /// spec in ways we are not (password without username in 3.x, will retain without a will),
    /// our Malformed is the right answer.
    fn agree(lib: &LibConnect, bytes: &[u8]) -> Result<(), TestCaseError> {
        match peek_connect(bytes, MAX) {
            Ok(Peek::Complete { connect, len }) => {
                prop_assert_eq!(len, lib.len);
                prop_assert_eq!(connect.version, lib.version);
                prop_assert_eq!(connect.client_id, &lib.client_id[..]);
                prop_assert_eq!(connect.username, lib.username.as_deref());
                prop_assert_eq!(connect.clean_session, lib.clean_session);
                prop_assert_eq!(connect.keep_alive, lib.keep_alive);
            }
            Err(ConnectError::Malformed { reason: "password without a username", .. })
                if lib.version != MqttVersion::V5 && lib.flags & 0xc0 == 0x40 => {}
            Err(ConnectError::Malformed { reason: "will QoS or retain set without a will", .. })
                if lib.flags & 0x24 == 0x20 => {}
            // Rust strings hold only well-formed UTF-8, but U+0000 is one of their characters.
            Err(ConnectError::BadString { problem: "contains U+0000", .. }) if bytes.contains(&0) => {}
            other => prop_assert!(false, "library decoded {:?}, we said {:?}", lib, other),
        }
        Ok(())
    }

    fn bytes_collect<B: FromIterator<u8>>(bytes: &[u8]) -> B {
        bytes.iter().copied().collect()
    }

    /// mqttbytes' framing reads fields past their declared lengths in places (e.g. property
    /// lists) and accepts some flag combinations the spec forbids, so its verdict only counts
    /// when re-encoding its result reproduces the input exactly: then the input is canonical and
    /// unambiguous.
    fn mqttbytes_decode(bytes: &[u8]) -> Option<LibConnect> {
        let canonical = |len: usize, out: &[u8]| bytes.get(..len) == Some(out);
        // Flags sit after the fixed header and the 7 bytes of protocol name and level.
        let flags = |out: &[u8]| {
            let header_len = 2 + out.iter().skip(1).take_while(|b| *b & 0x80 != 0).count();
            out.get(header_len + 7).copied()
        };
        if let Ok(mqttbytes::v4::Packet::Connect(c)) = mqttbytes::v4::read(&mut bytes_collect(bytes), MAX) {
            // The v4 module also accepts level 5 and then ignores the properties.
            if c.protocol == mqttbytes::Protocol::V4 {
                let mut out = Default::default();
                c.write(&mut out).ok()?;
                let out: Vec<u8> = out.to_vec();
                let flags = flags(&out)?;
                return canonical(out.len(), &out).then(|| LibConnect {
                    version: MqttVersion::V311,
                    client_id: c.client_id.into_bytes(),
                    username: c.login.map(|l| l.username.into_bytes()).filter(|u| !u.is_empty()),
                    clean_session: c.clean_session,
                    keep_alive: c.keep_alive,
                    len: out.len(),
                    flags,
                });
            }
        }
        if let Ok(mqttbytes::v5::Packet::Connect(c)) = mqttbytes::v5::read(&mut bytes_collect(bytes), MAX) {
            if c.protocol == mqttbytes::Protocol::V5 {
                let mut out = Default::default();
                c.write(&mut out).ok()?;
                let out: Vec<u8> = out.to_vec();
                let flags = flags(&out)?;
                return canonical(out.len(), &out).then(|| LibConnect {
                    version: MqttVersion::V5,
                    client_id: c.client_id.into_bytes(),
                    username: c.login.map(|l| l.username.into_bytes()).filter(|u| !u.is_empty()),
                    clean_session: c.clean_session,
                    keep_alive: c.keep_alive,
                    len: out.len(),
                    flags,
                });
            }
        }
        None
    }

    /// mqtt-proto is strict about property lists, but its stream decoder reads past the end of
    /// the packet; so it is given exactly the packet's body and must consume all of it.
    fn mqtt_proto_decode(bytes: &[u8]) -> Option<LibConnect> {
        let header = mqtt_proto::v3::Header::decode(bytes).ok()?;
        if header.typ != mqtt_proto::v3::PacketType::Connect {
            return None;
        }
        // Despite its name, `total_len` holds the byte count of the remaining-length integer.
        let header_len = 1 + header.total_len as usize;
        let len = header_len + header.remaining_len as usize;
        let body = bytes.get(header_len..len)?;
        let mut offset = 0;
        match mqtt_proto::v3::Connect::decode(body, &mut offset) {
            Ok(c) if offset == body.len() => {
                let (version, flags_at) = match c.protocol {
                    mqtt_proto::Protocol::V310 => (MqttVersion::V31, 9),
                    _ => (MqttVersion::V311, 7),
                };
                Some(LibConnect {
                    version,
                    client_id: c.client_id.as_bytes().to_vec(),
                    username: c.username.map(|u| u.as_bytes().to_vec()),
                    clean_session: c.clean_session,
                    keep_alive: c.keep_alive,
                    len,
                    flags: *body.get(flags_at)?,
                })
            }
            Err(mqtt_proto::Error::UnexpectedProtocol(mqtt_proto::Protocol::V500)) => {
                let header = mqtt_proto::v5::Header::decode(bytes).ok()?;
                let mut offset = 0;
                let c = mqtt_proto::v5::Connect::decode(body, &mut offset, header).ok()?;
                (offset == body.len()).then(|| LibConnect {
                    version: MqttVersion::V5,
                    client_id: c.client_id.as_bytes().to_vec(),
                    username: c.username.map(|u| u.as_bytes().to_vec()),
                    clean_session: c.clean_start,
                    keep_alive: c.keep_alive,
                    len,
                    flags: body.get(7).copied().unwrap_or_default(),
                })
            }
            _ => None,
        }
    }

    fn mqttbytes_qos(q: u8) -> mqttbytes::QoS {
        mqttbytes::qos(q).unwrap()
    }

    fn mqtt_proto_qos(q: u8) -> mqtt_proto::QoS {
        mqtt_proto::QoS::from_u8(q).unwrap()
    }

    fn string_pairs() -> impl Strategy<Value = Vec<(String, String)>> {
        prop::collection::vec((text(8), text(24)), 0..3)
    }

    fn expect_fields(
        bytes: &[u8],
        version: MqttVersion,
        client_id: &str,
        username: Option<&str>,
        clean_session: bool,
        keep_alive: u16,
    ) -> Result<(), TestCaseError> {
        let (c, len) = ours(bytes);
        prop_assert_eq!(len, bytes.len());
        prop_assert_eq!(
            c,
            Connect {
                version,
                client_id: client_id.as_bytes(),
                username: username.map(str::as_bytes),
                clean_session,
                keep_alive,
                bridge: false,
            }
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn agrees_with_mqttbytes_v4_encoder(
            client_id in text(30),
            keep_alive in any::<u16>(),
            clean in any::<bool>(),
            will in prop::option::of((topic(), small_bytes(40), 0u8..3, any::<bool>())),
            // mqttbytes leaves an empty username off the wire, so only non-empty ones here.
            login in prop::option::of(("[a-zA-Z0-9]{1,16}", text(16))),
        ) {
            let connect = mqttbytes::v4::Connect {
                protocol: mqttbytes::Protocol::V4,
                keep_alive,
                client_id: client_id.clone(),
                clean_session: clean,
                last_will: will.map(|(t, m, q, r)| mqttbytes::v4::LastWill::new(t, m, mqttbytes_qos(q), r)),
                login: login.clone().map(|(u, p)| mqttbytes::v4::Login::new(u, p)),
            };
            let mut out = Default::default();
            connect.write(&mut out).unwrap();
            let bytes: Vec<u8> = out.to_vec();
            let username = login.as_ref().map(|(u, _)| u.as_str());
            expect_fields(&bytes, MqttVersion::V311, &client_id, username, clean, keep_alive)?;
        }

        #[test]
        fn agrees_with_mqttbytes_v5_encoder(
            client_id in text(30),
            keep_alive in any::<u16>(),
            clean in any::<bool>(),
            props in prop::option::of((prop::option::of(any::<u32>()), prop::option::of(1u16..), string_pairs())),
            will in prop::option::of((topic(), small_bytes(40), 0u8..3, any::<bool>(), prop::option::of(any::<u32>()), string_pairs())),
            login in prop::option::of(("[a-zA-Z0-9]{1,16}", text(16))),
        ) {
            let connect = mqttbytes::v5::Connect {
                protocol: mqttbytes::Protocol::V5,
                keep_alive,
                client_id: client_id.clone(),
                clean_session: clean,
                last_will: will.map(|(t, m, q, r, delay, users)| {
                    let mut will = mqttbytes::v5::LastWill::new(t, m, mqttbytes_qos(q), r);
                    will.properties = Some(mqttbytes::v5::WillProperties {
                        delay_interval: delay,
                        payload_format_indicator: None,
                        message_expiry_interval: None,
                        content_type: None,
                        response_topic: None,
                        correlation_data: None,
                        user_properties: users,
                    });
                    will
                }),
                login: login.clone().map(|(u, p)| mqttbytes::v5::Login::new(u, p)),
                properties: props.map(|(expiry, receive_max, users)| mqttbytes::v5::ConnectProperties {
                    session_expiry_interval: expiry,
                    receive_maximum: receive_max,
                    max_packet_size: None,
                    topic_alias_max: None,
                    request_response_info: None,
                    request_problem_info: None,
                    user_properties: users,
                    authentication_method: None,
                    authentication_data: None,
                }),
            };
            let mut out = Default::default();
            connect.write(&mut out).unwrap();
            let bytes: Vec<u8> = out.to_vec();
            let username = login.as_ref().map(|(u, _)| u.as_str());
            expect_fields(&bytes, MqttVersion::V5, &client_id, username, clean, keep_alive)?;
        }

        #[test]
        fn agrees_with_mqtt_proto_v3_encoder(
            v31 in any::<bool>(),
            client_id in text(30),
            keep_alive in any::<u16>(),
            clean in any::<bool>(),
            will in prop::option::of((topic(), small_bytes(40), 0u8..3, any::<bool>())),
            login in prop::option::of((text(16), prop::option::of(small_bytes(16)))),
        ) {
            let protocol = if v31 { mqtt_proto::Protocol::V310 } else { mqtt_proto::Protocol::V311 };
            let connect = mqtt_proto::v3::Connect {
                protocol,
                clean_session: clean,
                keep_alive,
                client_id: Arc::from(client_id.as_str()),
                last_will: will.map(|(t, m, q, r)| mqtt_proto::v3::LastWill {
                    qos: mqtt_proto_qos(q),
                    retain: r,
                    topic_name: mqtt_proto::TopicName::try_from(t.as_str()).unwrap(),
                    message: m.into(),
                }),
                username: login.as_ref().map(|(u, _)| Arc::from(u.as_str())),
                password: login.as_ref().and_then(|(_, p)| p.clone()).map(Into::into),
            };
            let encoded = mqtt_proto::v3::Packet::Connect(connect).encode().unwrap();
            let bytes: &[u8] = encoded.as_ref();
            let version = if v31 { MqttVersion::V31 } else { MqttVersion::V311 };
            let username = login.as_ref().map(|(u, _)| u.as_str());
            expect_fields(bytes, version, &client_id, username, clean, keep_alive)?;
        }

        #[test]
        fn agrees_with_mqtt_proto_v5_encoder(
            client_id in text(30),
            keep_alive in any::<u16>(),
            clean in any::<bool>(),
            expiry in prop::option::of(any::<u32>()),
            receive_max in prop::option::of(1u16..),
            users in string_pairs(),
            will in prop::option::of((topic(), small_bytes(40), 0u8..3, any::<bool>(), prop::option::of(any::<u32>()), string_pairs())),
            username in prop::option::of(text(16)),
            password in prop::option::of(small_bytes(16)),
        ) {
            let user_property = |(name, value): (String, String)| mqtt_proto::v5::UserProperty {
                name: Arc::from(name.as_str()),
                value: Arc::from(value.as_str()),
            };
            let connect = mqtt_proto::v5::Connect {
                protocol: mqtt_proto::Protocol::V500,
                clean_start: clean,
                keep_alive,
                properties: mqtt_proto::v5::ConnectProperties {
                    session_expiry_interval: expiry,
                    receive_max,
                    user_properties: users.into_iter().map(user_property).collect(),
                    ..Default::default()
                },
                client_id: Arc::from(client_id.as_str()),
                last_will: will.map(|(t, m, q, r, delay, users)| mqtt_proto::v5::LastWill {
                    qos: mqtt_proto_qos(q),
                    retain: r,
                    topic_name: mqtt_proto::TopicName::try_from(t.as_str()).unwrap(),
                    payload: m.into(),
                    properties: mqtt_proto::v5::WillProperties {
                        delay_interval: delay,
                        user_properties: users.into_iter().map(user_property).collect(),
                        ..Default::default()
                    },
                }),
                username: username.as_deref().map(Arc::from),
                // 5.0 allows a password without a username.
                password: password.map(Into::into),
            };
            let encoded = mqtt_proto::v5::Packet::Connect(connect).encode().unwrap();
            let bytes: &[u8] = encoded.as_ref();
            expect_fields(bytes, MqttVersion::V5, &client_id, username.as_deref(), clean, keep_alive)?;
        }

        /// Whenever an independent decoder accepts a whole CONNECT, we agree with it.
        #[test]
        fn agrees_with_libraries_on_fuzzed_input(
            bytes in prop_oneof![
                2 => mutated_packet_of(true),
                1 => mutated_packet_of(false),
                1 => small_bytes(64),
            ],
        ) {
            let _ = peek_connect(&bytes, MAX);
            if let Some(lib) = mqtt_proto_decode(&bytes) {
                agree(&lib, &bytes)?;
            }
            if let Some(lib) = mqttbytes_decode(&bytes) {
                agree(&lib, &bytes)?;
            }
        }
    }

    /// The fuzzed differential above is only worth something if the libraries accept a good
    /// share of the inputs, malformed edits included; check that on a fixed seed.
    #[test]
    fn fuzzed_differential_is_not_vacuous() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = mutated_packet_of(true);
        let (mut proto_accepted, mut mqttbytes_accepted, mut edited_accepted) = (0, 0, 0);
        let runs = 2000;
        for _ in 0..runs {
            let bytes = strategy.new_tree(&mut runner).unwrap().current();
            if let Some(lib) = mqtt_proto_decode(&bytes) {
                agree(&lib, &bytes).unwrap();
                proto_accepted += 1;
                if !matches!(peek_connect(&bytes, MAX), Ok(Peek::Complete { .. })) {
                    edited_accepted += 1;
                }
            }
            if let Some(lib) = mqttbytes_decode(&bytes) {
                agree(&lib, &bytes).unwrap();
                mqttbytes_accepted += 1;
            }
        }
        eprintln!(
            "of {runs}: mqtt-proto accepted {proto_accepted} ({edited_accepted} of them rejected \
             by our stricter rules), mqttbytes {mqttbytes_accepted}"
        );
        assert!(proto_accepted > runs / 5, "mqtt-proto accepted only {proto_accepted}");
        assert!(mqttbytes_accepted > runs / 10, "mqttbytes accepted only {mqttbytes_accepted}");
    }

    #[test]
    fn libraries_are_laxer_where_we_follow_the_spec() {
        // Will retain without a will: forbidden by 3.1.1 [MQTT-3.1.2-15] and 5.0
        // [MQTT-3.1.2-13]; mqtt-proto only checks the QoS bits.
        for bytes in
            [v311_with_flags(0x22), [&[0x10, 15, 0, 4][..], b"MQTT", &[5, 0x22, 0, 60, 0, 0, 2], b"id"].concat()]
        {
            let lib = mqtt_proto_decode(&bytes).expect("mqtt-proto accepts retain without will");
            assert!(matches!(
                peek_connect(&bytes, MAX),
                Err(ConnectError::Malformed { reason: "will QoS or retain set without a will", .. })
            ));
            agree(&lib, &bytes).unwrap();
        }
        // Password without username in 3.1.1 [MQTT-3.1.2-22]: both libraries decode it.
        let bytes = [&[0x10, 18, 0, 4][..], b"MQTT", &[4, 0x42, 0, 60, 0, 2], b"id", &[0, 2], b"pw"].concat();
        for lib in [mqtt_proto_decode(&bytes), mqttbytes_decode(&bytes)] {
            let lib = lib.expect("library accepts a password without a username");
            assert!(matches!(
                peek_connect(&bytes, MAX),
                Err(ConnectError::Malformed { reason: "password without a username", .. })
            ));
            agree(&lib, &bytes).unwrap();
        }
        // Trailing bytes inside the packet: mqttbytes ignores them (so its re-encoding differs
        // and the differential skips it); mqtt-proto, given the exact body, leaves them unread.
        let bytes = [&[0x10, 15, 0, 4][..], b"MQTT", &[4, 2, 0, 60, 0, 2], b"id", &[0]].concat();
        assert!(mqtt_proto_decode(&bytes).is_none());
        assert!(mqttbytes_decode(&bytes).is_none());
        assert!(mqttbytes::v4::read(&mut bytes_collect(&bytes), MAX).is_ok());
    }

    #[test]
    fn mqtt_proto_decodes_3_1() {
        // mqtt-proto speaks 3.1 (mqttbytes does not): check on the hand-written 3.1 packet.
        let (_, bytes, expected) = valid_table().swap_remove(2);
        assert_eq!(expected.version, MqttVersion::V31);
        let lib = mqtt_proto_decode(&bytes).expect("mqtt-proto decodes 3.1");
        agree(&lib, &bytes).unwrap();
        assert!(mqttbytes_decode(&bytes).is_none());
    }
}
