//! MQTT over WebSocket (RFC 6455, MQTT §6) on a listener with `websocket`: the upgrade
//! request checked and answered ([`parse_upgrade`]), the client's frames decoded
//! ([`Decoder`]) and [`WsStream`], the client's stream seen through its frames, which the
//! CONNECT is read from and the relay relays as it does a raw MQTT stream.
//!
//! Nothing is buffered while a session is idle, as in the raw relay: frames are decoded in
//! place in the buffer the caller reads into (headers go through 14 bytes of state, payloads
//! are unmasked where they land), and frames towards the client are built in a buffer that
//! exists only until it is written. Control frames are answered here: a ping gets its pong, a
//! close frame reads as the end of the stream, and the end of the stream written to the client
//! is a close frame then the FIN.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::prefixed::Prefixed;
use super::relay::WriteLast;

/// The largest upgrade request read; beyond it the answer is 431.
pub const MAX_UPGRADE: usize = 8 * 1024;
/// Header fields an upgrade request may have.
const MAX_HEADERS: usize = 48;
/// The largest frame built towards the client (one TLS record of plaintext).
const MAX_FRAME_OUT: usize = 16 * 1024;

/// A listener's `websocket` settings.
#[derive(Debug, Clone)]
pub struct WebSocketSpec {
    /// The request path upgrades are accepted on (the query string is not compared).
    pub path: String,
    /// The `Origin` values accepted, lowercased; empty: any. A request without `Origin`
    /// (not a browser) is accepted either way.
    pub origins: Vec<String>,
}

/// Why an upgrade request was refused: its HTTP status, and the `outcome` label of
/// `websocket_upgrades_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeRefusal {
    /// 400: not a well-formed WebSocket upgrade (method, version, headers, key, subprotocol).
    BadRequest,
    /// 403: an `Origin` not in `origins`.
    Forbidden,
    /// 404: another path.
    NotFound,
    /// 408: not complete within `connect_timeout`.
    Timeout,
    /// 426: a WebSocket version other than 13.
    UnsupportedVersion,
    /// 431: a request over 8 KiB or with too many header fields.
    TooLarge,
}

impl UpgradeRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeRefusal::BadRequest => "bad_request",
            UpgradeRefusal::Forbidden => "forbidden_origin",
            UpgradeRefusal::NotFound => "not_found",
            UpgradeRefusal::Timeout => "timeout",
            UpgradeRefusal::UnsupportedVersion => "unsupported_version",
            UpgradeRefusal::TooLarge => "too_large",
        }
    }

    /// The whole HTTP response, which closes the connection.
    pub fn response(self) -> &'static [u8] {
        match self {
            UpgradeRefusal::BadRequest => {
                b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            }
            UpgradeRefusal::Forbidden => b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            UpgradeRefusal::NotFound => b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            UpgradeRefusal::Timeout => {
                b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            }
            UpgradeRefusal::UnsupportedVersion => b"HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            UpgradeRefusal::TooLarge => b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        }
    }
}

/// A refused upgrade request: the answer and what the log line says.
#[derive(Debug)]
pub struct UpgradeError {
    pub refusal: UpgradeRefusal,
    pub detail: String,
}

fn refused(refusal: UpgradeRefusal, detail: impl Into<String>) -> UpgradeError {
    UpgradeError { refusal, detail: detail.into() }
}

/// An accepted upgrade request.
#[derive(Debug)]
pub struct Accepted {
    /// The request's length: bytes after it are the client's first frames.
    pub head_len: usize,
    /// The 101 response.
    pub response: Vec<u8>,
    /// The subprotocol chosen, if the client offered any.
    pub subprotocol: Option<&'static str>,
    /// The request's `Cookie` and `Authorization` fields, as `Name: value\r\n` lines: what a
    /// broker's WebSocket listener may authenticate by (`backend_transport = "websocket"`).
    /// Bounded by [`MAX_UPGRADE`] with the request.
    pub credentials: Vec<u8>,
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Parse and check an upgrade request as RFC 6455 §4.2.1 asks: `Ok(None)` while it is
/// incomplete (the caller reads on, up to [`MAX_UPGRADE`] bytes), the 101 response when it
/// is acceptable, or the refusal.
pub fn parse_upgrade(buf: &[u8], spec: &WebSocketSpec) -> Result<Option<Accepted>, UpgradeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_UPGRADE => {
            return Err(refused(UpgradeRefusal::TooLarge, format!("upgrade request over {MAX_UPGRADE} bytes")))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refused(UpgradeRefusal::TooLarge, format!("more than {MAX_HEADERS} header fields")))
        }
        Err(e) => return Err(refused(UpgradeRefusal::BadRequest, format!("malformed HTTP request: {e}"))),
    };
    if req.method != Some("GET") {
        return Err(refused(UpgradeRefusal::BadRequest, format!("method {:?}, not GET", req.method.unwrap_or(""))));
    }
    if req.version != Some(1) {
        return Err(refused(UpgradeRefusal::BadRequest, "not HTTP/1.1"));
    }
    let path = req.path.unwrap_or("");
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if path != spec.path {
        return Err(refused(
            UpgradeRefusal::NotFound,
            format!("path {:?}, not {:?}", path.escape_debug().to_string(), spec.path),
        ));
    }
    let (mut host, mut upgrade, mut connection, mut version, mut key, mut origin) =
        (false, false, false, None, None, None);
    let (mut mqtt, mut mqttv31, mut offered) = (false, false, false);
    let mut credentials = Vec::new();
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("cookie") || name.eq_ignore_ascii_case("authorization") {
            credentials.extend_from_slice(name.as_bytes());
            credentials.extend_from_slice(b": ");
            credentials.extend_from_slice(h.value.trim_ascii());
            credentials.extend_from_slice(b"\r\n");
        }
        if name.eq_ignore_ascii_case("host") {
            host = true;
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= has_token(h.value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection |= has_token(h.value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version = Some(h.value);
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if key.is_some() {
                return Err(refused(UpgradeRefusal::BadRequest, "two Sec-WebSocket-Key fields"));
            }
            key = Some(h.value);
        } else if name.eq_ignore_ascii_case("origin") {
            origin = Some(h.value);
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            offered = true;
            mqtt |= has_token(h.value, "mqtt");
            mqttv31 |= has_token(h.value, "mqttv3.1");
        }
    }
    if !host {
        return Err(refused(UpgradeRefusal::BadRequest, "no Host field"));
    }
    if !upgrade || !connection {
        return Err(refused(
            UpgradeRefusal::BadRequest,
            "not a WebSocket upgrade (Upgrade: websocket, Connection: Upgrade)",
        ));
    }
    match version {
        None => return Err(refused(UpgradeRefusal::BadRequest, "no Sec-WebSocket-Version field")),
        Some(v) if v.trim_ascii() != b"13" => {
            let v = String::from_utf8_lossy(v).escape_debug().to_string();
            return Err(refused(UpgradeRefusal::UnsupportedVersion, format!("WebSocket version {v:?}, not 13")));
        }
        Some(_) => {}
    }
    let Some(key) = key else {
        return Err(refused(UpgradeRefusal::BadRequest, "no Sec-WebSocket-Key field"));
    };
    let key = key.trim_ascii();
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(k) if k.len() == 16 => {}
        _ => return Err(refused(UpgradeRefusal::BadRequest, "Sec-WebSocket-Key is not 16 bytes in base64")),
    }
    if let (Some(origin), false) = (origin, spec.origins.is_empty()) {
        let o = String::from_utf8_lossy(origin.trim_ascii()).to_ascii_lowercase();
        if !spec.origins.contains(&o) {
            return Err(refused(
                UpgradeRefusal::Forbidden,
                format!("origin {:?} not in origins", o.escape_debug().to_string()),
            ));
        }
    }
    let subprotocol = match (offered, mqtt, mqttv31) {
        (false, _, _) => None,
        (true, true, _) => Some("mqtt"),
        (true, false, true) => Some("mqttv3.1"),
        (true, false, false) => {
            return Err(refused(UpgradeRefusal::BadRequest, "no MQTT subprotocol offered (mqtt, mqttv3.1)"))
        }
    };
    let mut response = Vec::with_capacity(160);
    response.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    response.extend_from_slice(accept_key(key).as_bytes());
    if let Some(p) = subprotocol {
        response.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        response.extend_from_slice(p.as_bytes());
    }
    response.extend_from_slice(b"\r\n\r\n");
    Ok(Some(Accepted { head_len, response, subprotocol, credentials }))
}

/// The upgrade request harbormaster sends a broker's WebSocket listener
/// (`backend_transport = "websocket"`): `path`, `Host` the broker's address, a fresh `key`,
/// the subprotocol the client chose, then `extra` (whole `Name: value\r\n` lines: the
/// forwarding fields and the client's credentials).
pub fn broker_request(path: &str, host: &str, key: &str, subprotocol: Option<&str>, extra: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(200 + extra.len());
    for part in [
        "GET ",
        path,
        " HTTP/1.1\r\nHost: ",
        host,
        "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ",
        key,
        "\r\nSec-WebSocket-Version: 13\r\n",
    ] {
        r.extend_from_slice(part.as_bytes());
    }
    if let Some(p) = subprotocol {
        r.extend_from_slice(b"Sec-WebSocket-Protocol: ");
        r.extend_from_slice(p.as_bytes());
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(extra);
    r.extend_from_slice(b"\r\n");
    r
}

/// Check a broker's answer to [`broker_request`]: `Ok(None)` while incomplete (the caller
/// reads on, up to [`MAX_UPGRADE`] bytes), the answer's length once it is an acceptable 101
/// (the right `Sec-WebSocket-Accept` for `key`, the subprotocol asked for), or why not.
pub fn check_broker_response(buf: &[u8], key: &str, subprotocol: Option<&str>) -> Result<Option<usize>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_UPGRADE => {
            return Err(format!("upgrade answer over {MAX_UPGRADE} bytes"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed upgrade answer: {e}")),
    };
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        let reason = resp.reason.unwrap_or("").escape_debug().to_string();
        return Err(format!("answered the WebSocket upgrade with {code} {reason}"));
    }
    let field =
        |name: &str| resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value.trim_ascii());
    if !field("upgrade").is_some_and(|v| has_token(v, "websocket")) {
        return Err("101 without Upgrade: websocket".into());
    }
    if field("sec-websocket-accept") != Some(accept_key(key.as_bytes()).as_bytes()) {
        return Err("101 with a wrong Sec-WebSocket-Accept".into());
    }
    let chosen = field("sec-websocket-protocol");
    if chosen != subprotocol.map(str::as_bytes) {
        let chosen = chosen.map(|c| String::from_utf8_lossy(c).escape_debug().to_string());
        return Err(format!("chose subprotocol {chosen:?}, the client's is {subprotocol:?}"));
    }
    Ok(Some(len))
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes in base64.
pub fn fresh_key() -> String {
    let mut k = [0u8; 16];
    // The key only has to differ per connection; a failed draw still gives a valid key.
    let _ = aws_lc_rs::rand::fill(&mut k);
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`: base64(SHA-1(key + the RFC's GUID)).
pub fn accept_key(key: &[u8]) -> String {
    use aws_lc_rs::digest;
    let mut ctx = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

/// A client's frames broke RFC 6455: the close code sent and what the log says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameError {
    pub code: u16,
    pub what: &'static str,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebSocket: {} (close {})", self.what, self.code)
    }
}

impl std::error::Error for FrameError {}

impl FrameError {
    /// The frame error an I/O error of a [`WsStream`] carries, if any.
    pub fn of(e: &io::Error) -> Option<FrameError> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<FrameError>()).copied()
    }
}

const fn err(code: u16, what: &'static str) -> FrameError {
    FrameError { code, what }
}

/// Close codes (RFC 6455 §7.4.1).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_PROTOCOL: u16 = 1002;
const CLOSE_UNSUPPORTED: u16 = 1003;
const CLOSE_INVALID: u16 = 1007;
const CLOSE_TOO_BIG: u16 = 1009;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Decodes a client's frames into the MQTT bytes they carry, in place. Data frames' payloads
/// (binary, continuation) are the stream; control frames (≤ 125 bytes) are collected and acted
/// on: a ping leaves a pong to send, a close ends the stream.
#[derive(Debug)]
pub struct Decoder {
    /// A frame header being read: at most 2 + 8 (length) + 4 (mask) bytes.
    hdr: [u8; 14],
    hdr_len: u8,
    in_payload: bool,
    /// The frame's opcode (data frames: 0).
    ctl: u8,
    left: u64,
    mask: [u8; 4],
    mask_at: u8,
    /// A fragmented data message is under way (its last frame not yet seen).
    in_message: bool,
    /// The largest data frame accepted (the CONNECT's limit while setting up).
    pub max_payload: u64,
    /// A control frame's payload, while it arrives.
    ctl_payload: Vec<u8>,
    /// The payload of the last ping not answered yet (RFC 6455 §5.5.3 allows answering only
    /// the most recent).
    pub pong: Option<Vec<u8>>,
    /// The close frame's status code (1000 when it had none): nothing after it is read.
    pub closed: Option<u16>,
}

impl Decoder {
    pub fn new(max_payload: u64) -> Decoder {
        Decoder {
            hdr: [0; 14],
            hdr_len: 0,
            in_payload: false,
            ctl: 0,
            left: 0,
            mask: [0; 4],
            mask_at: 0,
            in_message: false,
            max_payload,
            ctl_payload: Vec::new(),
            pong: None,
            closed: None,
        }
    }

    /// The length of the header begun in `hdr`, once its first two bytes are there.
    fn header_len(&self) -> usize {
        if self.hdr_len < 2 {
            return 2;
        }
        let ext = match self.hdr[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if self.hdr[1] & 0x80 != 0 { 4 } else { 0 }
    }

    /// Decode `data` (bytes as read from the client) in place: the MQTT bytes it carries are
    /// moved to its front and their count returned. Bytes after a close frame are ignored.
    pub fn decode(&mut self, data: &mut [u8]) -> Result<usize, FrameError> {
        let (mut r, mut w) = (0usize, 0usize);
        while r < data.len() && self.closed.is_none() {
            if !self.in_payload {
                while (self.hdr_len as usize) < self.header_len() && r < data.len() {
                    self.hdr[self.hdr_len as usize] = data[r];
                    self.hdr_len += 1;
                    r += 1;
                    // Refused as soon as the second byte says it: an unmasked client frame.
                    if self.hdr_len == 2 && self.hdr[1] & 0x80 == 0 {
                        return Err(err(CLOSE_PROTOCOL, "unmasked client frame"));
                    }
                }
                if (self.hdr_len as usize) < self.header_len() {
                    break;
                }
                self.start_frame()?;
                if self.left == 0 {
                    self.end_frame()?;
                }
                continue;
            }
            let n = self.left.min((data.len() - r) as u64) as usize;
            let at = self.mask_at as usize;
            if self.ctl == 0 {
                // Moved over the headers before it (`w <= r`), then unmasked a word at a
                // time: a byte-wise loop here was most of a bulk transfer's CPU.
                if w < r {
                    data.copy_within(r..r + n, w);
                }
                apply_mask(&mut data[w..w + n], self.mask, at);
                w += n;
            } else {
                self.ctl_payload.extend(data[r..r + n].iter().enumerate().map(|(i, b)| b ^ self.mask[(at + i) & 3]));
            }
            self.mask_at = ((at + n) & 3) as u8;
            self.left -= n as u64;
            r += n;
            if self.left == 0 {
                self.end_frame()?;
            }
        }
        Ok(w)
    }

    /// A whole header is in `hdr`: check it and start its payload.
    fn start_frame(&mut self) -> Result<(), FrameError> {
        let h = &self.hdr;
        let fin = h[0] & 0x80 != 0;
        if h[0] & 0x70 != 0 {
            return Err(err(CLOSE_PROTOCOL, "reserved bits set (no extension was negotiated)"));
        }
        let op = h[0] & 0x0f;
        let (len, mask_at) = match h[1] & 0x7f {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => (u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]), 10),
            n => (u64::from(n), 2),
        };
        if len >> 63 != 0 {
            return Err(err(CLOSE_PROTOCOL, "frame length with its most significant bit set"));
        }
        self.mask = [h[mask_at], h[mask_at + 1], h[mask_at + 2], h[mask_at + 3]];
        match op {
            OP_CONTINUATION | OP_BINARY => {
                if op == OP_CONTINUATION && !self.in_message {
                    return Err(err(CLOSE_PROTOCOL, "continuation frame outside a message"));
                }
                if op == OP_BINARY && self.in_message {
                    return Err(err(CLOSE_PROTOCOL, "new message inside a fragmented one"));
                }
                if len > self.max_payload {
                    return Err(err(CLOSE_TOO_BIG, "frame larger than max_connect_packet before the CONNECT"));
                }
                self.in_message = !fin;
                self.ctl = 0;
            }
            OP_TEXT => return Err(err(CLOSE_UNSUPPORTED, "text frame (MQTT travels in binary frames)")),
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin {
                    return Err(err(CLOSE_PROTOCOL, "fragmented control frame"));
                }
                if len > 125 {
                    return Err(err(CLOSE_PROTOCOL, "control frame over 125 bytes"));
                }
                self.ctl = op;
                self.ctl_payload = Vec::with_capacity(len as usize);
            }
            _ => return Err(err(CLOSE_PROTOCOL, "reserved opcode")),
        }
        self.left = len;
        self.mask_at = 0;
        self.hdr_len = 0;
        self.in_payload = true;
        Ok(())
    }

    /// The frame's payload is all there: act on a control frame.
    fn end_frame(&mut self) -> Result<(), FrameError> {
        self.in_payload = false;
        let payload = std::mem::take(&mut self.ctl_payload);
        match self.ctl {
            OP_PING => self.pong = Some(payload),
            OP_CLOSE => {
                self.closed = Some(match payload.len() {
                    0 => CLOSE_NORMAL,
                    1 => return Err(err(CLOSE_PROTOCOL, "close frame with a one-byte payload")),
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
                        if !valid {
                            return Err(err(CLOSE_PROTOCOL, "close frame with an invalid status code"));
                        }
                        if std::str::from_utf8(&payload[2..]).is_err() {
                            return Err(err(CLOSE_INVALID, "close reason not UTF-8"));
                        }
                        code
                    }
                })
            }
            _ => {}
        }
        self.ctl = 0;
        Ok(())
    }

    /// Whether anything is held beyond the decoder itself (a control frame in flight, a pong
    /// to send).
    pub fn holds_buffers(&self) -> bool {
        self.ctl_payload.capacity() > 0 || self.pong.is_some()
    }
}

/// XOR `data` with the masking key `mask` (RFC 6455 §5.3), starting at key byte `at`: unmasks
/// a payload, or masks one (the XOR is its own inverse). Eight bytes at a time.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], at: usize) {
    let k = [mask[at & 3], mask[(at + 1) & 3], mask[(at + 2) & 3], mask[(at + 3) & 3]];
    let word = u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]);
    let mut words = data.chunks_exact_mut(8);
    for c in &mut words {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    // The tail starts at a multiple of 8 bytes: at `k[0]` again.
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= k[i & 3];
    }
}

/// Appends an unmasked frame header (FIN set) for a payload of `len` bytes.
pub fn frame_header(op: u8, len: usize, out: &mut Vec<u8>) {
    out.push(0x80 | op);
    if len < 126 {
        out.push(len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// The client's stream seen through its WebSocket frames: reads yield the MQTT bytes the
/// client's frames carry, writes leave as binary frames, the end of the stream is a close
/// frame (echoing the client's code when it closed first) then the FIN. Pings are answered
/// here, between whole frames. A protocol error is answered with its close frame, then read
/// as an error ([`FrameError::of`]).
pub struct WsStream<S> {
    /// With the bytes read past the upgrade request: the first frames, decoded first.
    inner: Prefixed<S>,
    dec: Decoder,
    /// Whole frames on their way to the client; allocated only while they are.
    out: Vec<u8>,
    /// Within `out`, which holds at most a frame of [`MAX_FRAME_OUT`] bytes and a pong.
    out_pos: u32,
    close_sent: bool,
    /// Bytes pass untouched both ways ([`Self::take_raw`]).
    passthrough: bool,
    failed: Option<FrameError>,
    /// The client's bytes as they come, from [`Self::record`] on (boxed: most sessions never
    /// keep any).
    raw: Option<Box<Recording>>,
}

/// The client's bytes as they came (frames, masked), kept during setup for a pool that relays
/// them untouched (`backend_transport = "websocket"`); up to `cap` bytes.
struct Recording {
    bytes: Vec<u8>,
    cap: usize,
    /// Over `cap`: no longer kept, and none are handed back.
    overflow: bool,
}

impl<S> WsStream<S> {
    /// `pre`: bytes read past the upgrade request. `max_payload`: the largest data frame
    /// accepted until [`Self::end_setup`].
    pub fn new(inner: S, pre: Vec<u8>, max_payload: u64) -> WsStream<S> {
        WsStream {
            inner: Prefixed::new(pre, inner),
            dec: Decoder::new(max_payload),
            out: Vec::new(),
            out_pos: 0,
            close_sent: false,
            passthrough: false,
            failed: None,
            raw: None,
        }
    }

    /// Keep the client's bytes as they come, up to `cap` bytes (past it they are no longer
    /// kept, and [`Self::into_raw`] has none).
    pub fn record(&mut self, cap: usize) {
        self.raw = Some(Box::new(Recording { bytes: Vec::new(), cap, overflow: false }));
    }

    /// The bytes kept are not needed (the pool unwraps frames): freed.
    pub fn stop_recording(&mut self) {
        self.raw = None;
    }

    /// Every byte the client sent past the upgrade request as it came (kept ones, then those
    /// read but not decoded yet), or `None` when they were not all kept; from then on the
    /// stream passes bytes through both ways untouched (frames already begun towards the
    /// client are finished first). A pong not yet begun is dropped: the client's pings are
    /// among the bytes returned, for the broker to answer.
    pub fn take_raw(&mut self) -> Option<Vec<u8>> {
        let rec = self.raw.take().filter(|r| !r.overflow)?;
        let mut raw = rec.bytes;
        raw.append(&mut self.inner.take_unread());
        self.dec.pong = None;
        self.passthrough = true;
        Some(raw)
    }

    /// Back to frames after [`Self::take_raw`], for a refusal before any broker took the
    /// client: its CONNACK and close frame must be framed.
    pub fn resume_frames(&mut self) {
        self.passthrough = false;
    }

    fn keep_raw(&mut self, bytes: &[u8]) {
        let Some(rec) = self.raw.as_mut().filter(|r| !r.overflow) else {
            return;
        };
        if rec.bytes.len() + bytes.len() > rec.cap {
            rec.overflow = true;
            rec.bytes = Vec::new();
            return;
        }
        rec.bytes.extend_from_slice(bytes);
    }

    pub fn inner_mut(&mut self) -> &mut S {
        self.inner.get_mut()
    }

    /// The CONNECT is read: data frames of any size from now on.
    pub fn end_setup(&mut self) {
        self.dec.max_payload = u64::MAX;
    }

    /// Whether the stream holds any buffer (for the idle-memory tests).
    pub fn holds_buffers(&self) -> bool {
        self.out.capacity() > 0 || self.inner.has_unread() || self.raw.is_some() || self.dec.holds_buffers()
    }

    fn push_close(&mut self, code: u16) {
        frame_header(OP_CLOSE, 2, &mut self.out);
        self.out.extend_from_slice(&code.to_be_bytes());
        self.close_sent = true;
    }
}

impl<S: AsyncWrite + WriteLast + Unpin> WsStream<S> {
    /// Write out the frames in `out`; `last` when the end of the stream follows at once.
    fn poll_drain(&mut self, cx: &mut Context<'_>, last: bool) -> Poll<io::Result<()>> {
        while (self.out_pos as usize) < self.out.len() {
            let rest = &self.out[self.out_pos as usize..];
            let inner = Pin::new(&mut self.inner);
            let n = ready!(if last { inner.poll_write_last(cx, rest) } else { inner.poll_write(cx, rest) })?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n as u32;
        }
        if self.out.capacity() > 0 {
            self.out = Vec::new();
            self.out_pos = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// A pong owed goes out with the next frames.
    fn take_pong(&mut self) {
        if let Some(payload) = self.dec.pong.take() {
            if !self.close_sent {
                frame_header(OP_PONG, payload.len(), &mut self.out);
                self.out.extend_from_slice(&payload);
            }
        }
    }

    /// Frames `buf` (up to [`MAX_FRAME_OUT`] bytes of it) into `out`; returns the bytes taken.
    fn frame(&mut self, buf: &[u8]) -> usize {
        self.take_pong();
        let n = buf.len().min(MAX_FRAME_OUT);
        self.out.reserve_exact(n + 4);
        frame_header(OP_BINARY, n, &mut self.out);
        self.out.extend_from_slice(&buf[..n]);
        n
    }

    /// Send what the client is owed by now: a pong, or the close frame of a protocol error.
    /// Pending writes are left for the next poll (their waker is registered).
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.take_pong();
        ready!(self.poll_drain(cx, false))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + WriteLast + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.passthrough {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        loop {
            if let Some(e) = this.failed {
                // The close frame goes first, bounded by the caller's deadline or linger.
                ready!(this.poll_answer(cx))?;
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
            if this.dec.pong.is_some() || (this.out_pos as usize) < this.out.len() {
                if let Poll::Ready(Err(e)) = this.poll_answer(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            if this.dec.closed.is_some() {
                return Poll::Ready(Ok(()));
            }
            let dst = buf.initialize_unfilled();
            if dst.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(dst);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                // The TCP (or TLS) stream ended without a close frame: the end all the same.
                return Poll::Ready(Ok(()));
            }
            this.keep_raw(&dst[..n]);
            match this.dec.decode(&mut dst[..n]) {
                Ok(0) => {}
                Ok(k) => {
                    buf.advance(k);
                    if this.dec.pong.is_some() {
                        // Answered now if the socket takes it; otherwise at the next poll.
                        let _ = this.poll_answer(cx);
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) => {
                    this.failed = Some(e);
                    if !this.close_sent {
                        this.push_close(e.code);
                    }
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + WriteLast + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(this.poll_drain(cx, false))?;
        if this.passthrough {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = this.frame(buf);
        // Started at once; what the socket does not take now goes at the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx, false) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx, false))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent && !this.passthrough {
            this.push_close(this.dec.closed.unwrap_or(CLOSE_NORMAL));
        }
        ready!(this.poll_drain(cx, true))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + WriteLast + Unpin> WriteLast for WsStream<S> {
    /// Framed but held: the close frame and the FIN of the shutdown that follows leave with
    /// it.
    fn poll_write_last(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(this.poll_drain(cx, false))?;
        if this.passthrough {
            return Pin::new(&mut this.inner).poll_write_last(cx, buf);
        }
        Poll::Ready(Ok(this.frame(buf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn spec() -> WebSocketSpec {
        WebSocketSpec { path: "/mqtt".into(), origins: vec!["https://app.example".into()] }
    }

    const GOOD: &str = "GET /mqtt?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqttv3.1, mqtt\r\n\r\n";

    /// A masked client frame.
    pub(crate) fn masked(op: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut f = Vec::new();
        frame_header(op, payload.len(), &mut f);
        if !fin {
            f[0] &= 0x7f;
        }
        f[1] |= 0x80;
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    #[test]
    fn the_rfc_example_key() {
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn accepts_a_good_upgrade_and_prefers_mqtt() {
        let a = parse_upgrade(GOOD.as_bytes(), &spec()).unwrap().unwrap();
        assert_eq!(a.head_len, GOOD.len());
        assert_eq!(a.subprotocol, Some("mqtt"));
        let r = String::from_utf8(a.response).unwrap();
        assert!(r.starts_with("HTTP/1.1 101 "), "{r}");
        assert!(r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{r}");
        assert!(r.contains("Sec-WebSocket-Protocol: mqtt\r\n"), "{r}");
        let old = GOOD.replace("mqttv3.1, mqtt", "mqttv3.1");
        assert_eq!(parse_upgrade(old.as_bytes(), &spec()).unwrap().unwrap().subprotocol, Some("mqttv3.1"));
        let none = GOOD.replace("Sec-WebSocket-Protocol: mqttv3.1, mqtt\r\n", "");
        assert_eq!(parse_upgrade(none.as_bytes(), &spec()).unwrap().unwrap().subprotocol, None);
    }

    #[test]
    fn incomplete_requests_ask_for_more_up_to_the_limit() {
        assert!(parse_upgrade(&GOOD.as_bytes()[..40], &spec()).unwrap().is_none());
        let mut big = b"GET /mqtt HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_UPGRADE, b'a');
        assert_eq!(parse_upgrade(&big, &spec()).unwrap_err().refusal, UpgradeRefusal::TooLarge);
    }

    #[test]
    fn refuses_what_rfc_6455_refuses() {
        let cases: &[(&str, &str, UpgradeRefusal)] = &[
            ("GET /mqtt", "POST /mqtt", UpgradeRefusal::BadRequest),
            ("HTTP/1.1\r\nHost", "HTTP/1.0\r\nHost", UpgradeRefusal::BadRequest),
            ("GET /mqtt?x=1", "GET /other", UpgradeRefusal::NotFound),
            ("Host: h\r\n", "", UpgradeRefusal::BadRequest),
            ("Upgrade: websocket", "Upgrade: h2c", UpgradeRefusal::BadRequest),
            ("keep-alive, Upgrade", "keep-alive", UpgradeRefusal::BadRequest),
            ("Version: 13", "Version: 8", UpgradeRefusal::UnsupportedVersion),
            ("Sec-WebSocket-Version: 13\r\n", "", UpgradeRefusal::BadRequest),
            ("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ=", UpgradeRefusal::BadRequest),
            ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "", UpgradeRefusal::BadRequest),
            ("mqttv3.1, mqtt", "graphql-ws", UpgradeRefusal::BadRequest),
            ("Host: h\r\n", "Host: h\r\nOrigin: https://evil.example\r\n", UpgradeRefusal::Forbidden),
            ("GET /mqtt", "GET\x01/mqtt", UpgradeRefusal::BadRequest),
        ];
        for (from, to, want) in cases {
            let req = GOOD.replacen(from, to, 1);
            let got = parse_upgrade(req.as_bytes(), &spec()).unwrap_err();
            assert_eq!(got.refusal, *want, "{from:?} -> {to:?}: {}", got.detail);
        }
        let ok = GOOD.replacen("Host: h\r\n", "Host: h\r\nOrigin: HTTPS://app.example\r\n", 1);
        assert!(parse_upgrade(ok.as_bytes(), &spec()).unwrap().is_some());
    }

    #[test]
    fn decodes_frames_of_any_shape() {
        let connect = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00";
        let mut wire = masked(OP_BINARY, false, &connect[..5], [1, 2, 3, 4]);
        wire.extend(masked(OP_PING, true, b"hi", [9, 9, 9, 9]));
        wire.extend(masked(OP_CONTINUATION, true, &connect[5..], [5, 6, 7, 8]));
        wire.extend(masked(OP_BINARY, true, b"\xc0\x00\xc0\x00", [0xff, 0, 0xff, 0]));
        // Every split of the bytes into two reads decodes to the same stream.
        for split in 0..wire.len() {
            let mut d = Decoder::new(1024);
            let (mut a, mut b) = (wire[..split].to_vec(), wire[split..].to_vec());
            let na = d.decode(&mut a).unwrap();
            let nb = d.decode(&mut b).unwrap();
            let got = [&a[..na], &b[..nb]].concat();
            assert_eq!(got, [&connect[..], b"\xc0\x00\xc0\x00"].concat(), "split at {split}");
            assert_eq!(d.pong.as_deref(), Some(&b"hi"[..]));
        }
    }

    #[test]
    fn apply_mask_is_the_bytewise_xor_at_every_offset_and_length() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for at in 0..8 {
            for len in 0..40 {
                let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
                let mut got = data.clone();
                apply_mask(&mut got, mask, at);
                let want: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ mask[(at + i) & 3]).collect();
                assert_eq!(got, want, "at {at}, len {len}");
            }
        }
    }

    #[test]
    fn payloads_split_anywhere_unmask_behind_their_headers() {
        // Several frames in one read (payloads move over the headers before them), with
        // odd lengths, cut at every point (payloads resume mid-key).
        let payloads: [&[u8]; 3] = [&[7; 13], &[0xa5; 300], b"0123456789abcdefg"];
        let mut wire = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            wire.extend(masked(OP_BINARY, true, p, [i as u8 + 1, 0x9c, 0x3e, 0x71]));
        }
        let want = payloads.concat();
        for split in 0..wire.len() {
            let mut d = Decoder::new(1024);
            let (mut a, mut b) = (wire[..split].to_vec(), wire[split..].to_vec());
            let n = d.decode(&mut a).unwrap();
            let mut got = a[..n].to_vec();
            let n = d.decode(&mut b).unwrap();
            got.extend_from_slice(&b[..n]);
            assert_eq!(got, want, "split at {split}");
        }
    }

    #[test]
    fn refuses_bad_frames_with_their_close_codes() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (vec![0x82, 0x02, 1, 2], 1002),                        // unmasked
            (masked(OP_TEXT, true, b"x", [1; 4]), 1003),           // text
            (masked(OP_CONTINUATION, true, b"x", [1; 4]), 1002),   // continuation first
            (masked(0x3, true, b"x", [1; 4]), 1002),               // reserved opcode
            (masked(OP_PING, false, b"x", [1; 4]), 1002),          // fragmented control
            (masked(OP_PING, true, &[0; 126], [1; 4]), 1002),      // big control
            (masked(OP_BINARY, true, &[0; 2000], [1; 4]), 1009),   // over max
            (masked(OP_CLOSE, true, b"x", [1; 4]), 1002),          // one-byte close
            (masked(OP_CLOSE, true, &[0x03, 0xed], [1; 4]), 1002), // 1005 on the wire
            ([vec![0xc2], masked(OP_BINARY, true, b"x", [1; 4])[1..].to_vec()].concat(), 1002), // RSV1
            ([masked(OP_BINARY, false, b"x", [1; 4]), masked(OP_BINARY, true, b"y", [1; 4])].concat(), 1002),
            (vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0], 1002), // 64-bit length, MSB set
        ];
        for (mut wire, code) in cases {
            let got = Decoder::new(1024).decode(&mut wire).unwrap_err();
            assert_eq!(got.code, code, "{got}");
        }
    }

    #[test]
    fn a_close_frame_ends_the_stream() {
        let mut d = Decoder::new(1024);
        let mut wire = masked(OP_BINARY, true, b"ab", [1; 4]);
        wire.extend(masked(OP_CLOSE, true, &[0x03, 0xe8, b'o', b'k'], [2; 4]));
        wire.extend(masked(OP_BINARY, true, b"after", [1; 4]));
        assert_eq!(d.decode(&mut wire).unwrap(), 2);
        assert_eq!(d.closed, Some(1000));
    }

    #[tokio::test]
    async fn a_stream_relays_through_frames_and_answers_pings() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let pre = masked(OP_BINARY, true, b"\x10\x00", [3; 4]);
        let mut ws = WsStream::new(ours, pre, 1024);
        let mut got = [0u8; 64];
        let n = ws.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"\x10\x00");
        assert!(!ws.holds_buffers(), "the bytes read past the upgrade are freed");
        theirs.write_all(&masked(OP_PING, true, b"p", [4; 4])).await.unwrap();
        theirs.write_all(&masked(OP_BINARY, true, b"\xc0\x00", [5; 4])).await.unwrap();
        let n = ws.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"\xc0\x00");
        ws.write_all(b"\xd0\x00").await.unwrap();
        ws.flush().await.unwrap();
        assert!(!ws.holds_buffers(), "nothing held once written");
        let mut answer = [0u8; 7];
        theirs.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, [0x8a, 0x01, b'p', 0x82, 0x02, 0xd0, 0x00], "the pong, then the data");
        // The client's close reads as the end; the shutdown echoes its code.
        theirs.write_all(&masked(OP_CLOSE, true, &[0x0f, 0xa0], [6; 4])).await.unwrap();
        assert_eq!(ws.read(&mut got).await.unwrap(), 0);
        ws.shutdown().await.unwrap();
        let mut rest = Vec::new();
        theirs.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, [0x88, 0x02, 0x0f, 0xa0]);
    }

    /// Kept bytes come back as they were sent (masked, with the ping), then the stream passes
    /// bytes through untouched both ways.
    #[tokio::test]
    async fn a_recorded_stream_hands_its_bytes_back_then_passes_through() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let first = masked(OP_BINARY, true, b"\x10\x00", [3; 4]);
        let ping = masked(OP_PING, true, b"p", [4; 4]);
        let mut ws = WsStream::new(ours, [first.clone(), ping.clone()].concat(), 1024);
        ws.record(4096);
        let mut got = [0u8; 2];
        ws.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x10\x00");
        assert_eq!(ws.take_raw().unwrap(), [first, ping].concat(), "kept and not yet decoded, as sent");
        theirs.write_all(b"\x82\x02ab").await.unwrap();
        let mut got = [0u8; 4];
        ws.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x82\x02ab", "read untouched");
        ws.write_all(b"\x82\x02cd").await.unwrap();
        ws.shutdown().await.unwrap();
        let mut rest = Vec::new();
        theirs.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"\x82\x02cd", "written untouched, and no close frame of ours");
    }

    #[tokio::test]
    async fn bytes_over_the_recording_cap_are_not_handed_back() {
        let (ours, _theirs) = tokio::io::duplex(1 << 16);
        let mut ws = WsStream::new(ours, masked(OP_BINARY, true, &[0x10; 40], [3; 4]), 1024);
        ws.record(16);
        ws.read_exact(&mut [0u8; 40]).await.unwrap();
        assert_eq!(ws.take_raw(), None);
        assert!(!ws.holds_buffers(), "nothing kept once over the cap");
    }

    #[test]
    fn a_broker_upgrade_is_asked_for_and_its_answer_checked() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let req = broker_request("/ws", "127.0.0.1:15675", key, Some("mqtt"), b"X-Forwarded-For: 192.0.2.1\r\n");
        let req = String::from_utf8(req).unwrap();
        assert!(req.starts_with("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:15675\r\n"), "{req}");
        for line in [
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol: mqtt",
            "X-Forwarded-For: 192.0.2.1",
        ] {
            assert!(req.contains(&format!("{line}\r\n")), "{line}: {req}");
        }
        assert!(req.ends_with("\r\n\r\n"));
        let ok = "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nsec-websocket-protocol: mqtt\r\n\r\n";
        assert_eq!(check_broker_response(ok.as_bytes(), key, Some("mqtt")), Ok(Some(ok.len())));
        assert_eq!(check_broker_response(&ok.as_bytes()[..40], key, Some("mqtt")), Ok(None));
        let e = check_broker_response(ok.as_bytes(), key, None).unwrap_err();
        assert!(e.contains("subprotocol"), "{e}");
        let e = check_broker_response(ok.replace("s3pP", "x3pP").as_bytes(), key, Some("mqtt")).unwrap_err();
        assert!(e.contains("Sec-WebSocket-Accept"), "{e}");
        let e = check_broker_response(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", key, None).unwrap_err();
        assert!(e.contains("404"), "{e}");
        assert_ne!(fresh_key(), fresh_key());
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(fresh_key()).unwrap().len(), 16);
    }

    #[test]
    fn the_clients_credentials_are_kept_for_the_broker() {
        let req =
            GOOD.replacen("Host: h\r\n", "Host: h\r\nCookie: a=1\r\nAuthorization: Bearer t\r\nCookie: b=2\r\n", 1);
        let a = parse_upgrade(req.as_bytes(), &spec()).unwrap().unwrap();
        assert_eq!(a.credentials, b"Cookie: a=1\r\nAuthorization: Bearer t\r\nCookie: b=2\r\n");
        assert!(parse_upgrade(GOOD.as_bytes(), &spec()).unwrap().unwrap().credentials.is_empty());
    }

    /// What a WebSocket session holds beyond a raw one while idle: its boxed `WsStream`
    /// (docs/architecture.md, *Memory of an idle connection*).
    #[test]
    fn an_idle_session_holds_only_the_frame_state() {
        let size = std::mem::size_of::<WsStream<crate::proxy::stream::Client>>();
        eprintln!("WsStream<Client>: {size} bytes");
        assert!(size <= 256, "{size}");
    }

    #[tokio::test]
    async fn a_protocol_error_is_answered_with_its_close_frame() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let mut ws = WsStream::new(ours, Vec::new(), 1024);
        theirs.write_all(&[0x82, 0x01, 0x10]).await.unwrap();
        let e = ws.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(FrameError::of(&e).map(|f| f.code), Some(1002));
        drop(ws);
        let mut rest = Vec::new();
        theirs.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, [0x88, 0x02, 0x03, 0xea]);
    }
}
