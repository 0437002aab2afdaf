//! The CONNECT rewrite of a pool's `connect` policy, for brokers that read no PROXY header: the
//! username replaced by the client's verified identity (`cert_cn`, or a template such as
//! `{cert_cn}@{sni}`), the password dropped, and (MQTT 5) User Properties named
//! `harbormaster-…` carrying the connection's facts. A pure function over a complete CONNECT
//! that [`super::mqtt::peek_connect`] accepted: the fields it changes are re-encoded (flags,
//! property length, remaining length) and every other byte is copied as it came.
//!
//! Also the two halves of `empty_client_id = "assign"`, as pure functions of the same kind:
//! [`set_client_id`] puts the id harbormaster generated into an MQTT 5 CONNECT, and
//! [`assign_in_connack`] adds it to the broker's CONNACK as Assigned Client Identifier.

// Runs on client bytes: every access checked, as in the CONNECT parser.
#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::fmt::Write as _;
use std::net::SocketAddr;

use super::mqtt::MqttVersion;

const FLAG_WILL: u8 = 0x04;
const FLAG_PASSWORD: u8 = 0x40;
const FLAG_USERNAME: u8 = 0x80;
/// MQTT 5.0 User Property identifier.
const USER_PROPERTY: u8 = 0x26;
/// The prefix of the User Properties harbormaster adds; a client's own ones with it are
/// removed, so that a client cannot forge them.
pub const PROPERTY_PREFIX: &str = "harbormaster-";
/// The largest remaining length MQTT can express.
const MAX_REMAINING: usize = 268_435_455;

/// A pool's `connect` policy, compiled at load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// `None`: the client's username is kept (`"keep"`).
    pub username: Option<Template>,
    /// `password = "drop"`.
    pub drop_password: bool,
    /// The facts added as User Properties to MQTT 5 CONNECTs, in order.
    pub user_properties: Vec<Fact>,
}

impl Policy {
    /// Whether the policy changes nothing in a CONNECT of `version`.
    pub fn is_identity(&self, version: MqttVersion) -> bool {
        self.username.is_none()
            && !self.drop_password
            && (self.user_properties.is_empty() || version != MqttVersion::V5)
    }
}

/// A username template: text and facts (`"cert_cn"` is the template `{cert_cn}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(pub Vec<Piece>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Fact(Fact),
}

/// A fact of the connection a template or a User Property can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fact {
    /// The verified client certificate's subject CN.
    CertCn,
    /// The verified client certificate's issuer CN.
    CertIssuerCn,
    /// SHA-256 of the client certificate, lowercase hex.
    CertSha256,
    /// The TLS server name.
    Sni,
    /// The negotiated ALPN protocol.
    Alpn,
    /// "TLSv1.2" or "TLSv1.3".
    TlsVersion,
    /// The client's address, `IP:port` (after an inbound PROXY header).
    ClientAddress,
    /// The CONNECT's client-id.
    ClientId,
    /// The CONNECT's username as the client sent it.
    Username,
}

impl Fact {
    pub const ALL: [Fact; 9] = [
        Fact::CertCn,
        Fact::CertIssuerCn,
        Fact::CertSha256,
        Fact::Sni,
        Fact::Alpn,
        Fact::TlsVersion,
        Fact::ClientAddress,
        Fact::ClientId,
        Fact::Username,
    ];

    /// The config spelling, also the User Property's name after `harbormaster-`.
    pub fn as_str(self) -> &'static str {
        match self {
            Fact::CertCn => "cert_cn",
            Fact::CertIssuerCn => "cert_issuer_cn",
            Fact::CertSha256 => "cert_sha256",
            Fact::Sni => "sni",
            Fact::Alpn => "alpn",
            Fact::TlsVersion => "tls_version",
            Fact::ClientAddress => "client_address",
            Fact::ClientId => "client_id",
            Fact::Username => "username",
        }
    }

    pub fn parse(s: &str) -> Option<Fact> {
        Fact::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

impl Template {
    /// `"cert_cn"` or a template with `{fact}` placeholders; no other braces.
    pub fn parse(s: &str) -> Result<Template, String> {
        if s == "cert_cn" {
            return Ok(Template(vec![Piece::Fact(Fact::CertCn)]));
        }
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        let mut pieces = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    pieces.push(Piece::Text(rest.to_string()));
                    break;
                }
                Some(i) => {
                    let (text, tail) = rest.split_at(i);
                    if !text.is_empty() {
                        pieces.push(Piece::Text(text.to_string()));
                    }
                    let Some(inner) = tail.strip_prefix('{') else {
                        return Err(format!("{s:?}: a '}}' without its '{{'"));
                    };
                    let Some(end) = inner.find('}') else {
                        return Err(format!("{s:?}: a '{{' without its '}}'"));
                    };
                    let (name, after) = inner.split_at(end);
                    let fact = Fact::parse(name).ok_or_else(|| {
                        let names: Vec<&str> = Fact::ALL.iter().map(|f| f.as_str()).collect();
                        format!("{s:?}: unknown placeholder {{{name}}}; one of {}", names.join(", "))
                    })?;
                    pieces.push(Piece::Fact(fact));
                    rest = after.get(1..).unwrap_or_default();
                }
            }
        }
        for p in &pieces {
            if let Piece::Text(t) = p {
                if let Some(problem) = string_problem(t) {
                    return Err(format!("{s:?}: the text {problem}, which brokers refuse in a username"));
                }
            }
        }
        Ok(Template(pieces))
    }

    /// The config spelling, for the log line.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Fact(f) => {
                    let _ = write!(out, "{{{}}}", f.as_str());
                }
            }
        }
        out
    }
}

/// What the connection knows, borrowed from its setup.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub cert_cn: Option<&'a str>,
    pub cert_issuer_cn: Option<&'a str>,
    pub cert_sha256: Option<&'a [u8; 32]>,
    pub sni: Option<&'a str>,
    pub alpn: Option<&'a [u8]>,
    pub tls_version: Option<&'a str>,
    pub client_address: SocketAddr,
    pub client_id: &'a [u8],
    pub username: Option<&'a [u8]>,
}

impl Facts<'_> {
    /// Appends the fact's value to `out`; false when the connection does not have it.
    fn put(&self, fact: Fact, out: &mut Vec<u8>) -> bool {
        let bytes: &[u8] = match fact {
            Fact::CertCn => self.cert_cn.map(str::as_bytes).unwrap_or_default(),
            Fact::CertIssuerCn => self.cert_issuer_cn.map(str::as_bytes).unwrap_or_default(),
            Fact::Sni => self.sni.map(str::as_bytes).unwrap_or_default(),
            Fact::Alpn => self.alpn.unwrap_or_default(),
            Fact::TlsVersion => self.tls_version.map(str::as_bytes).unwrap_or_default(),
            Fact::ClientId => self.client_id,
            Fact::Username => self.username.unwrap_or_default(),
            Fact::CertSha256 => {
                let Some(sha) = self.cert_sha256 else { return false };
                for b in sha {
                    let _ = write!(HexOut(out), "{b:02x}");
                }
                return true;
            }
            Fact::ClientAddress => {
                let _ = write!(HexOut(out), "{}", self.client_address);
                return true;
            }
        };
        let present = match fact {
            Fact::CertCn => self.cert_cn.is_some(),
            Fact::CertIssuerCn => self.cert_issuer_cn.is_some(),
            Fact::Sni => self.sni.is_some(),
            Fact::Alpn => self.alpn.is_some(),
            Fact::TlsVersion => self.tls_version.is_some(),
            Fact::Username => self.username.is_some(),
            _ => true,
        };
        out.extend_from_slice(bytes);
        present
    }
}

/// `fmt::Write` into a byte vector.
struct HexOut<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for HexOut<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Why a CONNECT cannot be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// The username needs a fact the connection lacks (no verified certificate for `cert_cn`).
    #[error("the username needs {{{}}}, which this connection does not have", .0.as_str())]
    Missing(Fact),
    /// The new username is not a string MQTT can carry, or brokers take.
    #[error("the new username {0}")]
    BadUsername(&'static str),
    /// A fact's value is not a string a User Property can carry, or brokers take.
    #[error("the User Property {PROPERTY_PREFIX}{fact} {problem}", fact = .0.as_str(), problem = .1)]
    BadProperty(Fact, &'static str),
    /// The rewritten CONNECT is larger than allowed.
    #[error("the rewritten CONNECT of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    /// The CONNECT's properties are not well formed.
    #[error("malformed CONNECT: {0}")]
    Malformed(&'static str),
}

/// A rewritten CONNECT and, for the log line, what was changed (never the password).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    pub packet: Vec<u8>,
    pub summary: String,
}

/// Where the fields of a complete CONNECT are.
struct Layout<'a> {
    /// Protocol name and level, as sent.
    protocol: &'a [u8],
    flags: u8,
    keep_alive: &'a [u8],
    /// (5.0) the CONNECT properties, without their length.
    properties: Option<&'a [u8]>,
    /// Client-id with its length prefix.
    client_id: &'a [u8],
    /// Will properties (5.0), topic and payload, as sent; empty without a Will.
    will: &'a [u8],
    /// Username and password with their length prefixes, when present.
    username: Option<&'a [u8]>,
    password: Option<&'a [u8]>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RewriteError> {
        let end = self.pos.checked_add(n).ok_or(RewriteError::Malformed("length overflow"))?;
        let out = self.bytes.get(self.pos..end).ok_or(RewriteError::Malformed("field runs past the packet"))?;
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, RewriteError> {
        self.take(1)?.first().copied().ok_or(RewriteError::Malformed("field runs past the packet"))
    }

    /// A two-byte length and its bytes; returns them with the prefix.
    fn prefixed(&mut self) -> Result<&'a [u8], RewriteError> {
        let start = self.pos;
        let len = self.take(2)?;
        let n = usize::from(u16::from_be_bytes([len.first().copied().unwrap_or(0), len.get(1).copied().unwrap_or(0)]));
        self.take(n)?;
        self.bytes.get(start..self.pos).ok_or(RewriteError::Malformed("field runs past the packet"))
    }

    fn var_int(&mut self) -> Result<usize, RewriteError> {
        let mut value: usize = 0;
        for shift in [0u32, 7, 14, 21] {
            let b = self.u8()?;
            value |= usize::from(b & 0x7f).wrapping_shl(shift);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(RewriteError::Malformed("variable byte integer longer than 4 bytes"))
    }
}

fn layout(packet: &[u8], version: MqttVersion) -> Result<Layout<'_>, RewriteError> {
    let mut r = Reader { bytes: packet, pos: 0 };
    r.u8()?; // 0x10
    let remaining = r.var_int()?;
    if r.pos.checked_add(remaining) != Some(packet.len()) {
        return Err(RewriteError::Malformed("remaining length is not the packet's"));
    }
    let start = r.pos;
    r.prefixed()?; // protocol name
    r.u8()?; // level
    let protocol = packet.get(start..r.pos).unwrap_or_default();
    let flags = r.u8()?;
    let keep_alive = r.take(2)?;
    let properties = if version == MqttVersion::V5 {
        let n = r.var_int()?;
        Some(r.take(n)?)
    } else {
        None
    };
    let client_id = r.prefixed()?;
    let will_start = r.pos;
    if flags & FLAG_WILL != 0 {
        if version == MqttVersion::V5 {
            let n = r.var_int()?;
            r.take(n)?;
        }
        r.prefixed()?;
        r.prefixed()?;
    }
    let will = packet.get(will_start..r.pos).unwrap_or_default();
    let username = if flags & FLAG_USERNAME != 0 { Some(r.prefixed()?) } else { None };
    let password = if flags & FLAG_PASSWORD != 0 { Some(r.prefixed()?) } else { None };
    if r.pos != packet.len() {
        return Err(RewriteError::Malformed("bytes after the last CONNECT field"));
    }
    Ok(Layout { protocol, flags, keep_alive, properties, client_id, will, username, password })
}

/// Copies the CONNECT properties `props` to `out`, leaving out User Properties whose name
/// starts with [`PROPERTY_PREFIX`].
fn copy_properties(props: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
    let mut r = Reader { bytes: props, pos: 0 };
    while r.pos < props.len() {
        let start = r.pos;
        let id = r.var_int()?;
        let forged = match id {
            // Byte: request problem / response information.
            0x17 | 0x19 => r.take(1).map(|_| false)?,
            // Two-byte integer: receive maximum, topic alias maximum.
            0x21 | 0x22 => r.take(2).map(|_| false)?,
            // Four-byte integer: session expiry interval, maximum packet size.
            0x11 | 0x27 => r.take(4).map(|_| false)?,
            // UTF-8 string / binary data: authentication method and data.
            0x15 | 0x16 => r.prefixed().map(|_| false)?,
            0x26 => {
                let name = r.prefixed()?;
                r.prefixed()?;
                name.get(2..).is_some_and(|n| n.starts_with(PROPERTY_PREFIX.as_bytes()))
            }
            _ => return Err(RewriteError::Malformed("a property a CONNECT cannot carry")),
        };
        if !forged {
            out.extend_from_slice(props.get(start..r.pos).unwrap_or_default());
        }
    }
    Ok(())
}

fn put_var_int(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Appends `value` with its two-byte length; false when it is longer than 65,535 bytes.
fn put_prefixed(out: &mut Vec<u8>, value: &[u8]) -> bool {
    let Ok(len) = u16::try_from(value.len()) else {
        return false;
    };
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(value);
    true
}

/// The CONNECT `packet` (exactly one complete CONNECT of `version`) rewritten by `policy` with
/// the connection's `facts`, or `None` when the policy changes nothing for it. The result is
/// at most `max_len` bytes.
pub fn rewrite(
    packet: &[u8],
    version: MqttVersion,
    policy: &Policy,
    facts: &Facts<'_>,
    max_len: usize,
) -> Result<Option<Rewritten>, RewriteError> {
    if policy.is_identity(version) {
        return Ok(None);
    }
    let l = layout(packet, version)?;
    let mut summary = String::new();

    // The username's new value, with its length prefix.
    let mut username: Option<Vec<u8>> = l.username.map(<[u8]>::to_vec);
    if let Some(t) = &policy.username {
        let mut value = Vec::new();
        for p in &t.0 {
            match p {
                Piece::Text(s) => value.extend_from_slice(s.as_bytes()),
                Piece::Fact(f) => {
                    if !facts.put(*f, &mut value) {
                        return Err(RewriteError::Missing(*f));
                    }
                }
            }
        }
        match std::str::from_utf8(&value) {
            Err(_) => return Err(RewriteError::BadUsername("is not UTF-8")),
            Ok(s) => {
                if let Some(problem) = string_problem(s) {
                    return Err(RewriteError::BadUsername(problem));
                }
                let _ = write!(summary, "username={s:?} ({})", t.describe());
            }
        }
        let mut prefixed = Vec::with_capacity(value.len().saturating_add(2));
        if !put_prefixed(&mut prefixed, &value) {
            return Err(RewriteError::BadUsername("is longer than 65535 bytes"));
        }
        username = Some(prefixed);
    }
    let password = if policy.drop_password {
        if l.password.is_some() {
            sep(&mut summary);
            summary.push_str("password dropped");
        }
        None
    } else {
        l.password
    };

    let mut flags = l.flags & !(FLAG_USERNAME | FLAG_PASSWORD);
    if username.is_some() {
        flags |= FLAG_USERNAME;
    }
    if password.is_some() {
        flags |= FLAG_PASSWORD;
    }

    let mut body = Vec::with_capacity(packet.len().saturating_add(256));
    body.extend_from_slice(l.protocol);
    body.push(flags);
    body.extend_from_slice(l.keep_alive);
    if let Some(props) = l.properties {
        let mut new = Vec::with_capacity(props.len().saturating_add(128));
        if policy.user_properties.is_empty() {
            new.extend_from_slice(props);
        } else {
            copy_properties(props, &mut new)?;
            let mut added = Vec::new();
            for f in &policy.user_properties {
                let mut value = Vec::new();
                if !facts.put(*f, &mut value) {
                    continue;
                }
                match std::str::from_utf8(&value) {
                    Err(_) => return Err(RewriteError::BadProperty(*f, "is not UTF-8")),
                    Ok(s) => {
                        if let Some(problem) = string_problem(s) {
                            return Err(RewriteError::BadProperty(*f, problem));
                        }
                    }
                }
                new.push(USER_PROPERTY);
                let name = format!("{PROPERTY_PREFIX}{}", f.as_str());
                put_prefixed(&mut new, name.as_bytes());
                if !put_prefixed(&mut new, &value) {
                    return Err(RewriteError::TooLarge { len: value.len(), max: usize::from(u16::MAX) });
                }
                added.push(f.as_str());
            }
            sep(&mut summary);
            let _ = write!(summary, "user_properties={}", added.join("+"));
        }
        put_var_int(&mut body, new.len());
        body.extend_from_slice(&new);
    }
    body.extend_from_slice(l.client_id);
    body.extend_from_slice(l.will);
    if let Some(u) = &username {
        body.extend_from_slice(u);
    }
    if let Some(p) = password {
        body.extend_from_slice(p);
    }

    Ok(Some(Rewritten { packet: connect_packet(&body, max_len)?, summary }))
}

/// A CONNECT's fixed header put before `body` (everything after the remaining length): at
/// most `max_len` bytes in all, and a body MQTT's remaining length can express.
fn connect_packet(body: &[u8], max_len: usize) -> Result<Vec<u8>, RewriteError> {
    if body.len() > MAX_REMAINING {
        return Err(RewriteError::TooLarge { len: body.len(), max: MAX_REMAINING });
    }
    let mut out = Vec::with_capacity(body.len().saturating_add(5));
    out.push(0x10);
    put_var_int(&mut out, body.len());
    out.extend_from_slice(body);
    if out.len() > max_len {
        return Err(RewriteError::TooLarge { len: out.len(), max: max_len });
    }
    Ok(out)
}

/// The CONNECT `packet` (one complete CONNECT of `version`, perhaps already rewritten) with
/// its client-id replaced by `id`; every other byte as it came, the remaining length
/// re-encoded. At most `max_len` bytes.
pub fn set_client_id(packet: &[u8], version: MqttVersion, id: &[u8], max_len: usize) -> Result<Vec<u8>, RewriteError> {
    let l = layout(packet, version)?;
    let mut body = Vec::with_capacity(packet.len().saturating_add(id.len()));
    body.extend_from_slice(l.protocol);
    body.push(l.flags);
    body.extend_from_slice(l.keep_alive);
    if let Some(props) = l.properties {
        put_var_int(&mut body, props.len());
        body.extend_from_slice(props);
    }
    if !put_prefixed(&mut body, id) {
        return Err(RewriteError::TooLarge { len: id.len(), max: usize::from(u16::MAX) });
    }
    body.extend_from_slice(l.will);
    if let Some(u) = l.username {
        body.extend_from_slice(u);
    }
    if let Some(p) = l.password {
        body.extend_from_slice(p);
    }
    connect_packet(&body, max_len)
}

/// MQTT 5.0 Assigned Client Identifier.
pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;

/// Why a broker's first packet cannot carry an assigned client-id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnackError {
    #[error("malformed CONNACK: {0}")]
    Malformed(&'static str),
    #[error("the CONNACK with the assigned client-id would be {len} bytes, over {max}")]
    TooLarge { len: usize, max: usize },
}

/// The broker's first packet, `packet` (exactly one whole MQTT 5 packet), with Assigned
/// Client Identifier `id` added when it is a successful CONNACK without one; `None` when it
/// is to be passed on as it is (a refusal, an AUTH exchange, a CONNACK that already names an
/// id). Flags, reason code and every property are copied as they came; the property length
/// and remaining length are re-encoded. The result is at most `max_len` bytes (the client's
/// Maximum Packet Size, when it gave one).
pub fn assign_in_connack(packet: &[u8], id: &[u8], max_len: usize) -> Result<Option<Vec<u8>>, ConnackError> {
    let bad = ConnackError::Malformed;
    let mut r = Reader { bytes: packet, pos: 0 };
    let kind = r.u8().map_err(|_| bad("empty"))?;
    if kind != 0x20 {
        return Ok(None);
    }
    let remaining = r.var_int().map_err(|_| bad("remaining length"))?;
    if r.pos.checked_add(remaining) != Some(packet.len()) {
        return Err(bad("remaining length is not the packet's"));
    }
    let ack_flags = r.u8().map_err(|_| bad("no acknowledge flags"))?;
    let code = r.u8().map_err(|_| bad("no reason code"))?;
    if code >= 0x80 {
        return Ok(None);
    }
    // A success CONNACK of two bytes (no property length) is read as one without properties.
    let props = if r.pos == packet.len() {
        &[][..]
    } else {
        let n = r.var_int().map_err(|_| bad("property length"))?;
        let props = r.take(n).map_err(|_| bad("properties run past the packet"))?;
        if r.pos != packet.len() {
            return Err(bad("bytes after the properties"));
        }
        props
    };
    let mut p = Reader { bytes: props, pos: 0 };
    while p.pos < props.len() {
        let id = p.var_int().map_err(|_| bad("property identifier"))?;
        let field = match id {
            // Byte: maximum QoS, retain / wildcard / subscription identifier / shared
            // subscription available.
            0x24 | 0x25 | 0x28 | 0x29 | 0x2A => p.take(1).map(|_| ()),
            // Two-byte integer: receive maximum, topic alias maximum, server keep alive.
            0x21 | 0x22 | 0x13 => p.take(2).map(|_| ()),
            // Four-byte integer: session expiry interval, maximum packet size.
            0x11 | 0x27 => p.take(4).map(|_| ()),
            // UTF-8 string / binary data: reason string, response information, server
            // reference, authentication method and data.
            0x1F | 0x1A | 0x1C | 0x15 | 0x16 => p.prefixed().map(|_| ()),
            0x26 => p.prefixed().and_then(|_| p.prefixed()).map(|_| ()),
            0x12 => return Ok(None),
            _ => return Err(bad("a property a CONNACK cannot carry")),
        };
        field.map_err(|_| bad("a property runs past the properties"))?;
    }
    let mut new_props = Vec::with_capacity(props.len().saturating_add(id.len()).saturating_add(3));
    new_props.extend_from_slice(props);
    new_props.push(ASSIGNED_CLIENT_IDENTIFIER);
    if !put_prefixed(&mut new_props, id) {
        return Err(ConnackError::TooLarge { len: id.len(), max: usize::from(u16::MAX) });
    }
    let mut body = Vec::with_capacity(new_props.len().saturating_add(6));
    body.push(ack_flags);
    body.push(code);
    put_var_int(&mut body, new_props.len());
    body.extend_from_slice(&new_props);
    if body.len() > MAX_REMAINING {
        return Err(ConnackError::TooLarge { len: body.len(), max: MAX_REMAINING });
    }
    let mut out = Vec::with_capacity(body.len().saturating_add(5));
    out.push(0x20);
    put_var_int(&mut out, body.len());
    out.extend_from_slice(&body);
    if out.len() > max_len {
        return Err(ConnackError::TooLarge { len: out.len(), max: max_len });
    }
    Ok(Some(out))
}

/// A character brokers refuse in the strings harbormaster passes on (see [`char_problem`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CharProblem {
    Nul,
    /// U+0001–U+001F, U+007F–U+009F.
    Control,
    /// U+FDD0–U+FDEF, and the last two code points of every plane (U+xFFFE, U+xFFFF).
    NonCharacter,
}

impl CharProblem {
    pub fn describe(self) -> &'static str {
        match self {
            CharProblem::Nul => "contains U+0000",
            CharProblem::Control => "holds a control character",
            CharProblem::NonCharacter => "holds a Unicode non-character",
        }
    }
}

/// Whether brokers refuse `c` in a string harbormaster passes on: U+0000 is forbidden (MQTT
/// 3.1.1 §1.5.3, 5.0 §1.5.4), and control characters and Unicode non-characters are ones a
/// receiver may treat as a malformed packet. Mosquitto 2.0 does, in a username and in a User
/// Property alike: it closes the connection without a CONNACK, which would be a failed dial of
/// every broker tried. The certificate CN of the PROXY v2 SSL TLV is held to the same
/// characters (identity.rs).
pub fn char_problem(c: char) -> Option<CharProblem> {
    let n = u32::from(c);
    if c == '\0' {
        Some(CharProblem::Nul)
    } else if c.is_control() {
        Some(CharProblem::Control)
    } else if (0xFDD0..=0xFDEF).contains(&n) || n & 0xFFFE == 0xFFFE {
        Some(CharProblem::NonCharacter)
    } else {
        None
    }
}

/// Why `s` is not a string harbormaster may put into a CONNECT (its first character brokers
/// refuse, [`char_problem`]), or `None`.
pub fn string_problem(s: &str) -> Option<&'static str> {
    s.chars().find_map(char_problem).map(CharProblem::describe)
}

/// Separates a rewrite summary's next item from those before it.
pub fn sep(s: &mut String) {
    if !s.is_empty() {
        s.push_str(", ");
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
mod tests;
