//! MQTT CONNECT peeking: a pure, panic-free parser over the bytes a client sent first, and the
//! CONNACK packets harbormaster answers with when it refuses a connection itself.
//! It owns no I/O; the connection pipeline feeds it bytes until it answers `Complete`.

/// MQTT protocol version, from the CONNECT's protocol name and level.
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
    /// Raw client identifier bytes (MQTT says UTF-8; routing hashes the bytes as sent).
    pub client_id: &'a [u8],
    pub username: Option<&'a [u8]>,
    pub clean_session: bool,
    pub keep_alive: u16,
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
}

/// Look at `buf` (the bytes received so far). `max_len` bounds the whole packet.
pub fn peek_connect(buf: &[u8], max_len: usize) -> Result<Peek<'_>, ConnectError> {
    let _ = (buf, max_len);
    todo!()
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
}

/// The CONNACK for `refusal` in the client's `version`, or `None` where that version has no
/// code for it (3.x has none for Malformed/PacketTooLarge: the connection is just closed).
pub fn connack(version: MqttVersion, refusal: Refusal) -> Option<&'static [u8]> {
    let _ = (version, refusal);
    todo!()
}
