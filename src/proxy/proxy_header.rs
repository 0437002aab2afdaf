//! Outbound PROXY protocol headers (v1 and v2 with TLVs) that tell a broker who the client is.
//! Built with `ppp`'s v2 builder; the nested SSL TLV, CRC32C and the header budget are ours.
//! Pure functions: no I/O.
//!
//! # v2 layout
//! Command is always PROXY (RabbitMQ and Mosquitto 2.1 reject LOCAL), transport STREAM. The
//! address family is never AF_UNSPEC (RabbitMQ rejects it): v4/v4 (counting IPv4-mapped IPv6
//! as v4) goes as AF_INET, anything else as AF_INET6 with the IPv4 side mapped (`::ffff:a.b.c.d`).
//!
//! TLVs, when chosen in `tlvs` and there is something to say, in this order:
//! - `ALPN` 0x01: negotiated ALPN.
//! - `AUTHORITY` 0x02: the SNI; left out (and reported dropped) over 255 bytes, which HAProxy
//!   rejects.
//! - `UNIQUE_ID` 0x05: the connection id; left out (and reported dropped) over 128 bytes, the
//!   spec's limit, which HAProxy enforces. Truncating would make a different id.
//! - `SSL` 0x20: client flags `PP2_CLIENT_SSL`, plus `CERT_SESS` with a client certificate and
//!   `CERT_CONN` when it was presented on this connection rather than on the one that made
//!   the resumed session (HAProxy's meaning of the two); `verify` 0 with a certificate (rustls
//!   only finishes a handshake whose certificate verified), else [`VERIFY_NO_CLIENT_CERT`];
//!   sub-TLVs VERSION 0x21, CN 0x22 (with a certificate CN), CIPHER 0x23, SIG_ALG 0x24 and
//!   KEY_ALG 0x25 (with a certificate).
//! - custom 0xE0: SHA-256 of the client certificate (32 raw bytes).
//! - custom 0xE1: the MQTT client-id (left out when empty).
//! - `CRC32C` 0x03, last: CRC32C of the whole header computed with this field zeroed.
//!
//! Without `input.tls` (a plain listener) the TLS-derived TLVs (ALPN, AUTHORITY, SSL, 0xE0) are
//! left out.
//!
//! # Budget
//! Receivers cap the header (Mosquitto 2.1: 500 bytes, nginx: ~107). Within
//! `max_header_bytes`, the parts of the header are kept in this order of importance, each one
//! when it fits in the room the parts before it left; a part that does not fit is dropped
//! alone and the walk goes on, so smaller parts after it still go out:
//! 1. [`Tlv::Crc32c`]
//! 2. [`Tlv::Ssl`]: client flags, verify, VERSION and CIPHER
//! 3. the CN sub-TLV of [`Tlv::Ssl`] (whole or not at all: a CN is never cut)
//! 4. [`Tlv::Authority`]
//! 5. the SIG_ALG and KEY_ALG sub-TLVs of [`Tlv::Ssl`]
//! 6. [`Tlv::Alpn`]
//! 7. [`Tlv::UniqueId`]
//! 8. [`Tlv::CertSha256`]
//! 9. [`Tlv::ClientId`]
//!
//! Parts of the SSL TLV left out are reported as `Tlv::Ssl`, once. The CN sub-TLV goes only
//! with the rest of the SSL TLV, which then still says a certificate was verified: a broker
//! that takes the CN for the user sees no name rather than a wrong one.
//!
//! The address block is never dropped: a budget below 28 (IPv4) / 52 (IPv6) bytes yields the
//! bare header, over budget. The budget is also capped at the format's own limit, 16 + 65535.

use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ppp::v2::{Addresses, Builder, Command, IPv4, IPv6, Protocol, TypeLengthValue, Version, WriteToHeader, Writer};

use super::identity::TlsInfo;

/// The TLVs a pool can choose to send (config `tlvs = [...]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tlv {
    /// PP2_TYPE_ALPN (0x01)
    Alpn,
    /// PP2_TYPE_AUTHORITY (0x02): the SNI.
    Authority,
    /// PP2_TYPE_UNIQUE_ID (0x05): the connection id.
    UniqueId,
    /// PP2_TYPE_SSL (0x20) with sub-TLVs VERSION, CN, CIPHER, SIG_ALG, KEY_ALG.
    Ssl,
    /// PP2_TYPE_CRC32C (0x03).
    Crc32c,
    /// Custom 0xE0: SHA-256 of the client certificate (32 raw bytes).
    CertSha256,
    /// Custom 0xE1: the MQTT client-id.
    ClientId,
}

impl Tlv {
    /// The `tlv` label of `harbormaster_proxy_tlv_dropped_total`: the variant's name in lower
    /// case, without the config key's underscores (`uniqueid`, `certsha256`, `clientid`).
    pub fn as_str(self) -> &'static str {
        match self {
            Tlv::Alpn => "alpn",
            Tlv::Authority => "authority",
            Tlv::UniqueId => "uniqueid",
            Tlv::Ssl => "ssl",
            Tlv::Crc32c => "crc32c",
            Tlv::CertSha256 => "certsha256",
            Tlv::ClientId => "clientid",
        }
    }
}

/// Everything a header can carry about one connection.
#[derive(Debug, Clone, Copy)]
pub struct HeaderInput<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub tls: Option<&'a TlsInfo>,
    pub unique_id: &'a [u8],
    pub client_id: &'a [u8],
}

/// An encoded header and the TLVs the budget made us leave out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    /// Chosen TLVs that were not sent (in full): first those over a receiver's per-TLV limit
    /// (AUTHORITY > 255, UNIQUE_ID > 128 bytes), then those the budget left out, least
    /// important first. A TLV with nothing to say (no SNI, no certificate...) is absent, not
    /// dropped.
    pub dropped: Vec<Tlv>,
}

pub const PP2_TYPE_ALPN: u8 = 0x01;
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
pub const PP2_TYPE_CRC32C: u8 = 0x03;
pub const PP2_TYPE_UNIQUE_ID: u8 = 0x05;
pub const PP2_TYPE_SSL: u8 = 0x20;
pub const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
pub const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
pub const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
pub const PP2_SUBTYPE_SSL_SIG_ALG: u8 = 0x24;
pub const PP2_SUBTYPE_SSL_KEY_ALG: u8 = 0x25;
/// Custom: SHA-256 of the client certificate.
pub const PP2_TYPE_CERT_SHA256: u8 = 0xE0;
/// Custom: MQTT client-id.
pub const PP2_TYPE_CLIENT_ID: u8 = 0xE1;

pub const PP2_CLIENT_SSL: u8 = 0x01;
pub const PP2_CLIENT_CERT_CONN: u8 = 0x02;
pub const PP2_CLIENT_CERT_SESS: u8 = 0x04;

/// `verify` when the client presented a certificate (rustls verified it, or the handshake
/// would have failed).
pub const VERIFY_OK: u32 = 0;
/// `verify` without a client certificate. The spec says verify is "zero if the client presented
/// a certificate and it was successfully verified, and non-zero otherwise"; HAProxy 2.x instead
/// leaves it 0 without a certificate (its `tlv_ssl` is memset and only set when a cert was
/// used). We follow the spec so that a receiver testing `verify == 0` (ranch/RabbitMQ reports
/// it as `verified`) never takes an anonymous client for an authenticated one.
pub const VERIFY_NO_CLIENT_CERT: u32 = 1;

/// HAProxy rejects a longer AUTHORITY.
pub const MAX_AUTHORITY_LEN: usize = 255;
/// The spec's (and HAProxy's) UNIQUE_ID limit.
pub const MAX_UNIQUE_ID_LEN: usize = 128;
/// Fixed part of a v2 header: signature, version/command, family/protocol, length.
pub const V2_FIXED_LEN: usize = 16;
/// The largest v2 header the 16-bit length field allows.
pub const V2_MAX_LEN: usize = V2_FIXED_LEN + u16::MAX as usize;

/// Encoded size of a TLV with a `len`-byte value.
const fn tlv_len(len: usize) -> usize {
    3 + len
}

fn opt_tlv_len(value: Option<&[u8]>) -> usize {
    value.map_or(0, |v| tlv_len(v.len()))
}

fn non_empty(s: &str) -> Option<&[u8]> {
    (!s.is_empty()).then_some(s.as_bytes())
}

fn write_tlv(w: &mut Writer, kind: u8, value: Option<&[u8]>) -> io::Result<()> {
    if let Some(value) = value {
        TypeLengthValue::new(kind, value).write_to(w)?;
    }
    Ok(())
}

/// The PP2_TYPE_SSL value, borrowed from the `TlsInfo`.
struct Ssl<'a> {
    client: u8,
    verify: u32,
    version: Option<&'a [u8]>,
    cn: Option<&'a [u8]>,
    cipher: Option<&'a [u8]>,
    sig_alg: Option<&'a [u8]>,
    key_alg: Option<&'a [u8]>,
}

impl<'a> Ssl<'a> {
    fn new(tls: &'a TlsInfo) -> Self {
        let cert = tls.client_cert.as_ref();
        Ssl {
            client: match (cert.is_some(), tls.resumed) {
                (false, _) => PP2_CLIENT_SSL,
                (true, false) => PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS,
                (true, true) => PP2_CLIENT_SSL | PP2_CLIENT_CERT_SESS,
            },
            verify: if cert.is_some() { VERIFY_OK } else { VERIFY_NO_CLIENT_CERT },
            version: non_empty(tls.version),
            cn: cert.and_then(|c| c.cn.as_deref()).and_then(non_empty),
            cipher: non_empty(tls.cipher),
            sig_alg: cert.and_then(|c| c.sig_alg.as_deref()).and_then(non_empty),
            key_alg: cert.and_then(|c| c.key_alg.as_deref()).and_then(non_empty),
        }
    }

    /// Length of the SSL value (client + verify + sub-TLVs).
    fn value_len(&self) -> usize {
        self.core_len() + opt_tlv_len(self.cn) + self.sig_key_len()
    }

    /// Length of the SSL value without CN, SIG_ALG and KEY_ALG.
    fn core_len(&self) -> usize {
        5 + opt_tlv_len(self.version) + opt_tlv_len(self.cipher)
    }

    fn sig_key_len(&self) -> usize {
        opt_tlv_len(self.sig_alg) + opt_tlv_len(self.key_alg)
    }

    fn write(&self, w: &mut Writer) -> io::Result<()> {
        // ppp has no nested-TLV support: write the outer type/length by hand, then the
        // sub-TLVs with its TLV writer.
        PP2_TYPE_SSL.write_to(w)?;
        (self.value_len() as u16).write_to(w)?;
        self.client.write_to(w)?;
        self.verify.write_to(w)?;
        for (kind, value) in [
            (PP2_SUBTYPE_SSL_VERSION, self.version),
            (PP2_SUBTYPE_SSL_CN, self.cn),
            (PP2_SUBTYPE_SSL_CIPHER, self.cipher),
            (PP2_SUBTYPE_SSL_SIG_ALG, self.sig_alg),
            (PP2_SUBTYPE_SSL_KEY_ALG, self.key_alg),
        ] {
            write_tlv(w, kind, value)?;
        }
        Ok(())
    }
}

/// The IPv4 address behind an IPv4 or IPv4-mapped IPv6 socket address.
fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Both addresses in one family: IPv4 when both are (or map to) IPv4, else IPv6.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    match (normalize(src), normalize(dst)) {
        (s @ SocketAddr::V4(_), d @ SocketAddr::V4(_)) => (s, d),
        (s, d) => {
            (SocketAddr::new(IpAddr::V6(to_v6(s.ip())), s.port()), SocketAddr::new(IpAddr::V6(to_v6(d.ip())), d.port()))
        }
    }
}

fn v2_addresses(src: SocketAddr, dst: SocketAddr) -> Addresses {
    match same_family(src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => Addresses::IPv4(IPv4::new(*s.ip(), *d.ip(), s.port(), d.port())),
        (s, d) => Addresses::IPv6(IPv6::new(to_v6(s.ip()), to_v6(d.ip()), s.port(), d.port())),
    }
}

/// PROXY v2, command PROXY, with the chosen TLVs, within `max_header_bytes`.
pub fn encode_v2(input: &HeaderInput<'_>, tlvs: &[Tlv], max_header_bytes: usize) -> Encoded {
    let addresses = v2_addresses(input.src, input.dst);
    let base = V2_FIXED_LEN + addresses.len();
    let budget = max_header_bytes.min(V2_MAX_LEN);
    let chosen = |t: Tlv| tlvs.contains(&t);
    let tls = input.tls;
    let cert = tls.and_then(|t| t.client_cert.as_ref());
    let mut dropped = Vec::new();

    // What there is to send.
    let mut alpn = tls.and_then(|t| t.alpn.as_deref()).filter(|a| chosen(Tlv::Alpn) && !a.is_empty());
    let mut authority = tls.and_then(|t| t.sni.as_deref()).and_then(non_empty).filter(|_| chosen(Tlv::Authority));
    if authority.is_some_and(|a| a.len() > MAX_AUTHORITY_LEN) {
        authority = None;
        dropped.push(Tlv::Authority);
    }
    let mut unique_id = Some(input.unique_id).filter(|u| chosen(Tlv::UniqueId) && !u.is_empty());
    if unique_id.is_some_and(|u| u.len() > MAX_UNIQUE_ID_LEN) {
        unique_id = None;
        dropped.push(Tlv::UniqueId);
    }
    let mut ssl = tls.filter(|_| chosen(Tlv::Ssl)).map(Ssl::new);
    let mut cert_sha = cert.map(|c| &c.sha256[..]).filter(|_| chosen(Tlv::CertSha256));
    let mut client_id = Some(input.client_id).filter(|c| chosen(Tlv::ClientId) && !c.is_empty());
    let mut crc = chosen(Tlv::Crc32c);

    // The budget: every part, most important first, is kept when it fits in the room the
    // parts before it left, and dropped alone when it does not; a long CN costs the CN, not
    // the client-id, fingerprint and SNI behind it.
    let room_at_start = budget.saturating_sub(base);
    let mut room = room_at_start;
    let mut take = |len: usize| {
        let fits = len <= room;
        if fits {
            room -= len;
        }
        fits
    };
    let mut budget_dropped = Vec::new();
    fn keep(v: &mut Option<&[u8]>, t: Tlv, take: &mut impl FnMut(usize) -> bool, dropped: &mut Vec<Tlv>) {
        if v.is_some_and(|value| !take(tlv_len(value.len()))) {
            *v = None;
            dropped.push(t);
        }
    }
    // 1. CRC32C.
    if crc && !take(tlv_len(4)) {
        crc = false;
        budget_dropped.push(Tlv::Crc32c);
    }
    // 2. SSL: client flags, verify, VERSION and CIPHER.
    if ssl.as_ref().is_some_and(|s| !take(tlv_len(s.core_len()))) {
        ssl = None;
        budget_dropped.push(Tlv::Ssl);
    }
    // 3. The CN sub-TLV: sent whole or not at all, never cut.
    if let Some(s) = ssl.as_mut() {
        if s.cn.is_some_and(|cn| !take(tlv_len(cn.len()))) {
            s.cn = None;
            budget_dropped.push(Tlv::Ssl);
        }
    }
    // 4. AUTHORITY.
    keep(&mut authority, Tlv::Authority, &mut take, &mut budget_dropped);
    // 5. SIG_ALG and KEY_ALG, together.
    if let Some(s) = ssl.as_mut() {
        if s.sig_key_len() > 0 && !take(s.sig_key_len()) {
            s.sig_alg = None;
            s.key_alg = None;
            budget_dropped.push(Tlv::Ssl);
        }
    }
    // 6.-9.
    keep(&mut alpn, Tlv::Alpn, &mut take, &mut budget_dropped);
    keep(&mut unique_id, Tlv::UniqueId, &mut take, &mut budget_dropped);
    keep(&mut cert_sha, Tlv::CertSha256, &mut take, &mut budget_dropped);
    keep(&mut client_id, Tlv::ClientId, &mut take, &mut budget_dropped);
    let total = base + (room_at_start - room);
    // Reported least important first, the SSL TLV once however many of its parts went.
    for t in budget_dropped.into_iter().rev() {
        if !dropped.contains(&t) {
            dropped.push(t);
        }
    }

    let build = || -> io::Result<Vec<u8>> {
        // ppp's builder writes the fixed part and the address block into a buffer sized for
        // the whole header: the only allocation. The TLVs go in through ppp's `Writer` rather
        // than the builder, which is passed by value on every call and, at ~270 bytes (its
        // address enum has a Unix variant), costs more to move than the TLV costs to write.
        let fixed = Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addresses)
            .reserve_capacity(total - base)
            .build()?;
        let mut w = Writer::from(fixed);
        write_tlv(&mut w, PP2_TYPE_ALPN, alpn)?;
        write_tlv(&mut w, PP2_TYPE_AUTHORITY, authority)?;
        write_tlv(&mut w, PP2_TYPE_UNIQUE_ID, unique_id)?;
        if let Some(s) = &ssl {
            s.write(&mut w)?;
        }
        write_tlv(&mut w, PP2_TYPE_CERT_SHA256, cert_sha)?;
        write_tlv(&mut w, PP2_TYPE_CLIENT_ID, client_id)?;
        if crc {
            write_tlv(&mut w, PP2_TYPE_CRC32C, Some(&[0; 4]))?;
        }
        let mut bytes = w.finish();
        let payload_len =
            u16::try_from(bytes.len() - V2_FIXED_LEN).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        bytes[14..16].copy_from_slice(&payload_len.to_be_bytes());
        if crc {
            // The checksum field is the last 4 bytes and still zero, as the spec requires for
            // the computation.
            let sum = crc32c::crc32c(&bytes);
            let at = bytes.len() - 4;
            bytes[at..].copy_from_slice(&sum.to_be_bytes());
        }
        Ok(bytes)
    };
    let bytes = match build() {
        Ok(bytes) => {
            debug_assert_eq!(bytes.len(), total);
            bytes
        }
        // Unreachable: every length was checked against the 16-bit limits above. Should ppp
        // ever refuse anyway, an address-only header still tells the broker who the client is.
        Err(_) => {
            dropped = tlvs.to_vec();
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addresses)
                .build()
                .unwrap_or_default()
        }
    };
    Encoded { bytes, dropped }
}

/// PROXY v1 text header.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    // Worst case (TCP6, two full IPv6 addresses) is 104 bytes, within v1's 107.
    let mut line = String::with_capacity(107);
    let _ = write!(line, "PROXY {proto} {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port());
    line.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::identity::ClientCert;
    use ppp::v2::{Header, Type};
    use std::net::{Ipv4Addr, SocketAddrV6};

    const ALL: [Tlv; 7] =
        [Tlv::Alpn, Tlv::Authority, Tlv::UniqueId, Tlv::Ssl, Tlv::Crc32c, Tlv::CertSha256, Tlv::ClientId];

    fn tls_with_cert() -> TlsInfo {
        TlsInfo {
            version: "TLSv1.3",
            cipher: "TLS_AES_128_GCM_SHA256",
            sni: Some("broker.example".into()),
            alpn: Some(b"mqtt".to_vec()),
            client_cert: Some(ClientCert {
                cn: Some("device-42".into()),
                cn_refused: None,
                issuer_cn: None,
                sha256: [0xAB; 32],
                sig_alg: Some("ecdsa-with-SHA256".into()),
                key_alg: Some("EC256".into()),
            }),
            resumed: false,
        }
    }

    fn input<'a>(tls: Option<&'a TlsInfo>) -> HeaderInput<'a> {
        HeaderInput {
            src: "192.0.2.10:51000".parse().unwrap(),
            dst: "10.0.0.5:1883".parse().unwrap(),
            tls,
            unique_id: b"conn-0001",
            client_id: b"sensor/17",
        }
    }

    /// Top-level TLVs as (type, value), parsed by ppp.
    fn tlvs_of(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let header = Header::try_from(bytes).expect("ppp parses our header");
        assert_eq!(header.len(), bytes.len());
        header
            .tlvs()
            .map(|t| {
                let t = t.expect("well-formed TLV");
                (t.kind, t.value.to_vec())
            })
            .collect()
    }

    fn find(tlvs: &[(u8, Vec<u8>)], kind: u8) -> Option<Vec<u8>> {
        tlvs.iter().find(|(k, _)| *k == kind).map(|(_, v)| v.clone())
    }

    /// The SSL value parsed by hand: (client, verify, sub-TLVs).
    fn parse_ssl(value: &[u8]) -> (u8, u32, Vec<(u8, Vec<u8>)>) {
        assert!(value.len() >= 5);
        let client = value[0];
        let verify = u32::from_be_bytes(value[1..5].try_into().unwrap());
        let mut subs = Vec::new();
        let mut rest = &value[5..];
        while !rest.is_empty() {
            assert!(rest.len() >= 3, "truncated sub-TLV");
            let len = u16::from_be_bytes([rest[1], rest[2]]) as usize;
            assert!(rest.len() >= 3 + len, "sub-TLV overflows SSL value");
            subs.push((rest[0], rest[3..3 + len].to_vec()));
            rest = &rest[3 + len..];
        }
        (client, verify, subs)
    }

    /// Recomputes the CRC32C independently: zero the field, checksum, compare.
    fn assert_crc_ok(bytes: &[u8]) {
        let header = Header::try_from(bytes).unwrap();
        let tlv_start = bytes.len() - header.tlv_bytes().len();
        let mut off = tlv_start;
        let mut field = None;
        while off < bytes.len() {
            let len = u16::from_be_bytes([bytes[off + 1], bytes[off + 2]]) as usize;
            if bytes[off] == PP2_TYPE_CRC32C {
                assert_eq!(len, 4);
                field = Some(off + 3);
            }
            off += 3 + len;
        }
        let field = field.expect("CRC32C TLV present");
        let mut zeroed = bytes.to_vec();
        let sent = u32::from_be_bytes(zeroed[field..field + 4].try_into().unwrap());
        zeroed[field..field + 4].fill(0);
        assert_eq!(sent, crc32c::crc32c(&zeroed));
    }

    /// The metric label of each TLV is its name in lower case, as it always was.
    #[test]
    fn tlv_labels_are_their_names_in_lower_case() {
        for t in ALL {
            assert_eq!(t.as_str(), format!("{t:?}").to_lowercase());
        }
    }

    #[test]
    fn full_header_round_trips_through_ppp() {
        let tls = tls_with_cert();
        let enc = encode_v2(&input(Some(&tls)), &ALL, 500);
        assert!(enc.dropped.is_empty(), "{:?}", enc.dropped);

        let header = Header::try_from(enc.bytes.as_slice()).unwrap();
        assert_eq!(header.command, ppp::v2::Command::Proxy);
        assert_eq!(header.protocol, ppp::v2::Protocol::Stream);
        assert_eq!(header.addresses, Addresses::IPv4(IPv4::new([192, 0, 2, 10], [10, 0, 0, 5], 51000, 1883)));
        assert_eq!(enc.bytes[12], 0x21);
        assert_eq!(enc.bytes[13], 0x11);

        let tlvs = tlvs_of(&enc.bytes);
        let kinds: Vec<u8> = tlvs.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [0x01, 0x02, 0x05, 0x20, 0xE0, 0xE1, 0x03]);
        assert_eq!(find(&tlvs, Type::ALPN.into()).unwrap(), b"mqtt");
        assert_eq!(find(&tlvs, Type::Authority.into()).unwrap(), b"broker.example");
        assert_eq!(find(&tlvs, Type::UniqueId.into()).unwrap(), b"conn-0001");
        assert_eq!(find(&tlvs, 0xE0).unwrap(), [0xAB; 32]);
        assert_eq!(find(&tlvs, 0xE1).unwrap(), b"sensor/17");

        let (client, verify, subs) = parse_ssl(&find(&tlvs, Type::SSL.into()).unwrap());
        assert_eq!(client, 0x07);
        assert_eq!(verify, 0);
        assert_eq!(
            subs,
            vec![
                (0x21, b"TLSv1.3".to_vec()),
                (0x22, b"device-42".to_vec()),
                (0x23, b"TLS_AES_128_GCM_SHA256".to_vec()),
                (0x24, b"ecdsa-with-SHA256".to_vec()),
                (0x25, b"EC256".to_vec()),
            ]
        );
        assert_crc_ok(&enc.bytes);
    }

    #[test]
    fn ssl_without_client_cert() {
        let mut tls = tls_with_cert();
        tls.client_cert = None;
        let enc = encode_v2(&input(Some(&tls)), &ALL, 500);
        let tlvs = tlvs_of(&enc.bytes);
        let (client, verify, subs) = parse_ssl(&find(&tlvs, PP2_TYPE_SSL).unwrap());
        assert_eq!(client, PP2_CLIENT_SSL);
        assert_eq!(verify, VERIFY_NO_CLIENT_CERT);
        let kinds: Vec<u8> = subs.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [0x21, 0x23]);
        assert_eq!(find(&tlvs, 0xE0), None);
        assert!(enc.dropped.is_empty());
        assert_crc_ok(&enc.bytes);
    }

    #[test]
    fn resumed_session_says_certificate_of_the_session_not_of_this_connection() {
        let mut tls = tls_with_cert();
        tls.resumed = true;
        let enc = encode_v2(&input(Some(&tls)), &ALL, 500);
        let tlvs = tlvs_of(&enc.bytes);
        let (client, verify, subs) = parse_ssl(&find(&tlvs, PP2_TYPE_SSL).unwrap());
        assert_eq!(client, PP2_CLIENT_SSL | PP2_CLIENT_CERT_SESS);
        assert_eq!(verify, VERIFY_OK);
        assert_eq!(find(&subs, PP2_SUBTYPE_SSL_CN).unwrap(), b"device-42");
        assert_eq!(find(&tlvs, 0xE0).unwrap(), [0xAB; 32]);
        // Without a certificate a resumed session looks like a new one.
        tls.client_cert = None;
        let enc = encode_v2(&input(Some(&tls)), &ALL, 500);
        let (client, verify, _) = parse_ssl(&find(&tlvs_of(&enc.bytes), PP2_TYPE_SSL).unwrap());
        assert_eq!((client, verify), (PP2_CLIENT_SSL, VERIFY_NO_CLIENT_CERT));
    }

    /// A CN as the certificate decodes it (identity.rs) goes into the CN sub-TLV only when brokers
    /// accept its characters; otherwise the rest of the SSL TLV still goes, without a name.
    #[test]
    fn a_cn_brokers_refuse_leaves_only_the_cn_out() {
        use crate::proxy::identity::{decode_cn, CnRefusal};
        use x509_parser::asn1_rs::Tag;
        let cases: [(&str, Option<CnRefusal>); 6] = [
            ("device-42", None),
            ("dev-\u{fdcf}-\u{fdf0}-\u{fffd}", None),
            ("dev-\u{fdd0}", Some(CnRefusal::NonCharacter)),
            ("dev-\u{fffe}", Some(CnRefusal::NonCharacter)),
            ("dev-\u{10ffff}", Some(CnRefusal::NonCharacter)),
            ("dev-\u{1b}[0m", Some(CnRefusal::ControlCharacter)),
        ];
        for (text, refused) in cases {
            let decoded = decode_cn(Tag::Utf8String, text.as_bytes());
            assert_eq!(decoded.as_ref().err().map(|r| r.reason), refused, "{text:?}");
            let mut tls = tls_with_cert();
            let cert = tls.client_cert.as_mut().unwrap();
            (cert.cn, cert.cn_refused) = (decoded.as_ref().ok().cloned(), decoded.err());
            let enc = encode_v2(&input(Some(&tls)), &ALL, 500);
            let (client, verify, subs) = parse_ssl(&find(&tlvs_of(&enc.bytes), PP2_TYPE_SSL).unwrap());
            assert_eq!(
                (client, verify),
                (PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS, VERIFY_OK),
                "{text:?}"
            );
            let want = refused.is_none().then(|| text.as_bytes().to_vec());
            assert_eq!(find(&subs, PP2_SUBTYPE_SSL_CN), want, "{text:?}");
            assert!(enc.dropped.is_empty(), "left out, not dropped for room: {:?}", enc.dropped);
        }
    }

    #[test]
    fn plain_listener_omits_tls_tlvs() {
        let enc = encode_v2(&input(None), &ALL, 500);
        let kinds: Vec<u8> = tlvs_of(&enc.bytes).iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [0x05, 0xE1, 0x03]);
        assert!(enc.dropped.is_empty());
        assert_crc_ok(&enc.bytes);
    }

    #[test]
    fn no_tlvs_is_a_bare_header() {
        let tls = tls_with_cert();
        let enc = encode_v2(&input(Some(&tls)), &[], 500);
        assert_eq!(enc.bytes.len(), 28);
        assert!(tlvs_of(&enc.bytes).is_empty());
        // Only what is chosen goes out.
        let enc = encode_v2(&input(Some(&tls)), &[Tlv::Authority], 500);
        assert_eq!(tlvs_of(&enc.bytes), vec![(PP2_TYPE_AUTHORITY, b"broker.example".to_vec())]);
    }

    #[test]
    fn empty_values_are_absent_not_dropped() {
        let tls = TlsInfo { version: "TLSv1.2", cipher: "ECDHE-RSA-AES128-GCM-SHA256", ..TlsInfo::default() };
        let mut inp = input(Some(&tls));
        inp.unique_id = b"";
        inp.client_id = b"";
        let enc = encode_v2(&inp, &ALL, 500);
        let kinds: Vec<u8> = tlvs_of(&enc.bytes).iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [0x20, 0x03]);
        assert!(enc.dropped.is_empty());
    }

    #[test]
    fn per_tlv_limits() {
        let mut tls = tls_with_cert();
        tls.sni = Some("a".repeat(256));
        let mut inp = input(Some(&tls));
        let long_id = [b'u'; 129];
        inp.unique_id = &long_id;
        let enc = encode_v2(&inp, &ALL, V2_MAX_LEN);
        assert_eq!(enc.dropped, [Tlv::Authority, Tlv::UniqueId]);
        let tlvs = tlvs_of(&enc.bytes);
        assert_eq!(find(&tlvs, PP2_TYPE_AUTHORITY), None);
        assert_eq!(find(&tlvs, PP2_TYPE_UNIQUE_ID), None);

        // Exactly at the limits is fine.
        tls.sni = Some("a".repeat(255));
        let mut inp = input(Some(&tls));
        let id = [b'u'; 128];
        inp.unique_id = &id;
        let enc = encode_v2(&inp, &ALL, V2_MAX_LEN);
        assert!(enc.dropped.is_empty());
        assert_eq!(find(&tlvs_of(&enc.bytes), PP2_TYPE_UNIQUE_ID).unwrap().len(), 128);
    }

    #[test]
    fn budget_drops_in_documented_order() {
        let mut tls = tls_with_cert();
        tls.sni = Some("s".repeat(200));
        tls.client_cert.as_mut().unwrap().cn = Some("c".repeat(120));
        let long_client_id = vec![b'x'; 300];
        let mut inp = input(Some(&tls));
        inp.client_id = &long_client_id;
        let enc = encode_v2(&inp, &ALL, 500);
        assert!(enc.bytes.len() <= 500, "{}", enc.bytes.len());
        // 28 + ALPN 7 + AUTHORITY 203 + UNIQUE_ID 12 + SSL (3+5+10+123+25+20+8) + E0 35 + CRC 7
        // = 486 after dropping the client-id alone.
        assert_eq!(enc.dropped, [Tlv::ClientId]);
        assert_crc_ok(&enc.bytes);

        // Every budget: each part kept exactly when it fits after the more important ones.
        let mut most_dropped = 0;
        for budget in (0..=520).rev() {
            let enc = encode_v2(&inp, &ALL, budget);
            let header = Header::try_from(enc.bytes.as_slice()).expect("valid header");
            assert_eq!(header.len(), enc.bytes.len());
            assert!(enc.bytes.len() <= budget.max(28), "budget {budget}");
            assert_kept_greedily(&inp, &ALL, budget, &enc);
            if find(&tlvs_of(&enc.bytes), PP2_TYPE_CRC32C).is_some() {
                assert_crc_ok(&enc.bytes);
            }
            most_dropped = most_dropped.max(enc.dropped.len());
        }
        // Down to the bare header.
        assert_eq!(most_dropped, 7);
    }

    /// The parts of a header in the budget's order of importance, with their encoded sizes.
    fn parts(bytes: &[u8]) -> Vec<(&'static str, usize)> {
        let tlvs = tlvs_of(bytes);
        let size = |kind: u8| find(&tlvs, kind).map(|v| tlv_len(v.len()));
        let ssl = find(&tlvs, PP2_TYPE_SSL).map(|v| parse_ssl(&v).2);
        let sub = |kinds: &[u8]| {
            ssl.as_ref().map(|subs| {
                subs.iter().filter(|(k, _)| kinds.contains(k)).map(|(_, v)| tlv_len(v.len())).sum::<usize>()
            })
        };
        let all = [
            ("crc32c", size(PP2_TYPE_CRC32C)),
            ("ssl", sub(&[PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CIPHER]).map(|n: usize| tlv_len(5 + n))),
            ("cn", sub(&[PP2_SUBTYPE_SSL_CN]).filter(|n| *n > 0)),
            ("authority", size(PP2_TYPE_AUTHORITY)),
            ("sig_key", sub(&[PP2_SUBTYPE_SSL_SIG_ALG, PP2_SUBTYPE_SSL_KEY_ALG]).filter(|n| *n > 0)),
            ("alpn", size(PP2_TYPE_ALPN)),
            ("unique_id", size(PP2_TYPE_UNIQUE_ID)),
            ("cert_sha256", size(PP2_TYPE_CERT_SHA256)),
            ("client_id", size(PP2_TYPE_CLIENT_ID)),
        ];
        all.into_iter().filter_map(|(name, n)| n.map(|n| (name, n))).collect()
    }

    /// Drop only what does not fit: walking the parts of the unbounded header in order of
    /// importance, each is in `enc` exactly when it fits beside the ones kept before it (the
    /// CN and SIG/KEY only with the rest of the SSL TLV).
    fn assert_kept_greedily(inp: &HeaderInput<'_>, chosen: &[Tlv], budget: usize, enc: &Encoded) {
        let full = encode_v2(inp, chosen, V2_MAX_LEN);
        let kept = parts(&enc.bytes);
        let base = V2_FIXED_LEN + v2_addresses(inp.src, inp.dst).len();
        let mut used = base;
        let mut ssl_kept = false;
        for (name, n) in parts(&full.bytes) {
            if matches!(name, "cn" | "sig_key") && !ssl_kept {
                assert!(!kept.iter().any(|(k, _)| *k == name), "{name} without SSL, budget {budget}");
                continue;
            }
            let fits = used + n <= budget;
            let is_kept = kept.iter().any(|(k, m)| *k == name && *m == n);
            assert_eq!(is_kept, fits, "{name} ({n} bytes, {used} used), budget {budget}: kept {kept:?}");
            if is_kept {
                used += n;
                ssl_kept |= name == "ssl";
            }
        }
        assert_eq!(used.max(base), enc.bytes.len().max(base), "budget {budget}");
    }

    /// A CN longer than the whole budget costs the CN alone: every other TLV still fits and
    /// goes out.
    #[test]
    fn a_long_cn_costs_only_the_cn() {
        let mut tls = tls_with_cert();
        tls.client_cert.as_mut().unwrap().cn = Some("c".repeat(1000));
        let inp = input(Some(&tls));
        let enc = encode_v2(&inp, &ALL, 500);
        assert_eq!(enc.dropped, [Tlv::Ssl]);
        let tlvs = tlvs_of(&enc.bytes);
        let kinds: Vec<u8> = tlvs.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [0x01, 0x02, 0x05, 0x20, 0xE0, 0xE1, 0x03]);
        assert_eq!(find(&tlvs, PP2_TYPE_AUTHORITY).unwrap(), b"broker.example");
        assert_eq!(find(&tlvs, PP2_TYPE_UNIQUE_ID).unwrap(), b"conn-0001");
        assert_eq!(find(&tlvs, PP2_TYPE_CERT_SHA256).unwrap(), [0xAB; 32]);
        assert_eq!(find(&tlvs, PP2_TYPE_CLIENT_ID).unwrap(), b"sensor/17");
        let (client, verify, subs) = parse_ssl(&find(&tlvs, PP2_TYPE_SSL).unwrap());
        assert_eq!((client, verify), (0x07, VERIFY_OK));
        let sub_kinds: Vec<u8> = subs.iter().map(|(k, _)| *k).collect();
        assert_eq!(sub_kinds, [0x21, 0x23, 0x24, 0x25]);
        // 28 + ALPN 7 + AUTHORITY 17 + UNIQUE_ID 12 + SSL (3+5+10+25+20+8) + E0 35 + E1 12 + CRC 7.
        assert_eq!(enc.bytes.len(), 189);
        assert_crc_ok(&enc.bytes);
        assert_kept_greedily(&inp, &ALL, 500, &enc);
    }

    #[test]
    fn ssl_sig_key_dropped_before_authority() {
        let tls = tls_with_cert();
        let inp = input(Some(&tls));
        let full = encode_v2(&inp, &ALL, 500).bytes.len();
        // Without E1 (12), E0 (35), UNIQUE_ID (12), ALPN (7) and SIG/KEY (20+8).
        let budget = full - 12 - 35 - 12 - 7 - 28;
        let enc = encode_v2(&inp, &ALL, budget);
        assert_eq!(enc.bytes.len(), budget);
        assert_eq!(enc.dropped, [Tlv::ClientId, Tlv::CertSha256, Tlv::UniqueId, Tlv::Alpn, Tlv::Ssl]);
        let tlvs = tlvs_of(&enc.bytes);
        assert!(find(&tlvs, PP2_TYPE_AUTHORITY).is_some());
        let (client, verify, subs) = parse_ssl(&find(&tlvs, PP2_TYPE_SSL).unwrap());
        assert_eq!((client, verify), (0x07, 0));
        let kinds: Vec<u8> = subs.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [0x21, 0x22, 0x23]);
        assert_crc_ok(&enc.bytes);

        // One byte less: AUTHORITY goes; SSL is not reported twice.
        let enc = encode_v2(&inp, &ALL, budget - 1);
        assert_eq!(enc.dropped.last(), Some(&Tlv::Authority));
        assert_eq!(enc.dropped.iter().filter(|t| **t == Tlv::Ssl).count(), 1);
        assert!(find(&tlvs_of(&enc.bytes), PP2_TYPE_SSL).is_some());
    }

    #[test]
    fn tiny_budget_still_valid() {
        let tls = tls_with_cert();
        let mut inp = input(Some(&tls));
        inp.src = "[2001:db8::1]:40000".parse().unwrap();
        inp.dst = "[2001:db8::2]:8883".parse().unwrap();
        let enc = encode_v2(&inp, &ALL, 107);
        assert!(enc.bytes.len() <= 107);
        let header = Header::try_from(enc.bytes.as_slice()).unwrap();
        assert_eq!(header.len(), enc.bytes.len());
        assert!(matches!(header.addresses, Addresses::IPv6(_)));
        // 52 + ALPN 7 + AUTHORITY 17 + UNIQUE_ID 12 + SSL 83 + E0 35 + E1 12 + CRC 7 = 225.
        // Kept in order of importance while they fit in 107: CRC32C (59), the SSL TLV's flags,
        // verify, version and cipher (102); nothing else fits in the 5 bytes left.
        assert_eq!(enc.bytes.len(), 102);
        assert_eq!(enc.dropped, [Tlv::ClientId, Tlv::CertSha256, Tlv::UniqueId, Tlv::Alpn, Tlv::Ssl, Tlv::Authority,]);
        assert_crc_ok(&enc.bytes);

        // Below the address block: bare header, over budget but valid.
        let enc = encode_v2(&inp, &ALL, 10);
        assert_eq!(enc.bytes.len(), 52);
        assert!(tlvs_of(&enc.bytes).is_empty());
    }

    #[test]
    fn oversized_values_are_capped_by_the_format_limit() {
        let tls = tls_with_cert();
        let huge = vec![b'z'; 70_000];
        let mut inp = input(Some(&tls));
        inp.client_id = &huge;
        let enc = encode_v2(&inp, &ALL, usize::MAX);
        assert_eq!(enc.dropped, [Tlv::ClientId]);
        assert!(enc.bytes.len() <= V2_MAX_LEN);
        assert_crc_ok(&enc.bytes);

        // A client-id that exactly fills the 16-bit length.
        let without = encode_v2(&inp, &[Tlv::Crc32c], usize::MAX).bytes.len();
        let fill = vec![b'z'; V2_MAX_LEN - without - 3];
        inp.client_id = &fill;
        let enc = encode_v2(&inp, &[Tlv::ClientId, Tlv::Crc32c], usize::MAX);
        assert!(enc.dropped.is_empty());
        assert_eq!(enc.bytes.len(), V2_MAX_LEN);
        assert_crc_ok(&enc.bytes);
    }

    #[test]
    fn mixed_families_map_to_ipv6() {
        let src: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::5]:1883".parse().unwrap();
        let enc = encode_v2(&HeaderInput { src, dst, tls: None, unique_id: b"", client_id: b"" }, &[], 500);
        let header = Header::try_from(enc.bytes.as_slice()).unwrap();
        assert_eq!(
            header.addresses,
            Addresses::IPv6(IPv6::new(
                Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped(),
                "2001:db8::5".parse::<Ipv6Addr>().unwrap(),
                1000,
                1883
            ))
        );
        assert_eq!(enc.bytes[13], 0x21);
        // And the other way round.
        let enc = encode_v2(&HeaderInput { src: dst, dst: src, tls: None, unique_id: b"", client_id: b"" }, &[], 500);
        assert_eq!(enc.bytes.len(), 52);
    }

    #[test]
    fn v4_mapped_pairs_go_as_ipv4() {
        let mapped =
            |ip: [u8; 4], port| SocketAddr::V6(SocketAddrV6::new(Ipv4Addr::from(ip).to_ipv6_mapped(), port, 0, 0));
        for (src, dst) in [
            (mapped([198, 51, 100, 7], 5555), mapped([10, 1, 2, 3], 1883)),
            (mapped([198, 51, 100, 7], 5555), "10.1.2.3:1883".parse().unwrap()),
        ] {
            let enc = encode_v2(&HeaderInput { src, dst, tls: None, unique_id: b"", client_id: b"" }, &[], 500);
            let header = Header::try_from(enc.bytes.as_slice()).unwrap();
            assert_eq!(header.addresses, Addresses::IPv4(IPv4::new([198, 51, 100, 7], [10, 1, 2, 3], 5555, 1883)));
            assert_eq!(encode_v1(src, dst), b"PROXY TCP4 198.51.100.7 10.1.2.3 5555 1883\r\n");
        }
    }

    #[test]
    fn v1_format() {
        let v4 = encode_v1("192.0.2.10:51000".parse().unwrap(), "10.0.0.5:1883".parse().unwrap());
        assert_eq!(v4, b"PROXY TCP4 192.0.2.10 10.0.0.5 51000 1883\r\n");
        let v6 = encode_v1("[2001:db8::1]:40000".parse().unwrap(), "[2001:db8::2]:8883".parse().unwrap());
        assert_eq!(v6, b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 8883\r\n");
        let mixed = encode_v1("192.0.2.10:51000".parse().unwrap(), "[2001:db8::2]:8883".parse().unwrap());
        assert_eq!(mixed, b"PROXY TCP6 ::ffff:192.0.2.10 2001:db8::2 51000 8883\r\n");
        let worst = encode_v1(
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".parse().unwrap(),
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".parse().unwrap(),
        );
        assert!(worst.len() <= 107);
        // ppp reads back what we wrote.
        for line in [v4, v6, mixed, worst] {
            let h = ppp::v1::Header::try_from(line.as_slice()).unwrap();
            assert_eq!(h.header.len(), line.len());
        }
    }

    proptest::proptest! {
        #[test]
        fn any_input_gives_a_valid_header_within_budget(
            src_v6 in proptest::arbitrary::any::<bool>(),
            dst_v6 in proptest::arbitrary::any::<bool>(),
            sni_len in 0usize..400,
            cn_len in 0usize..300,
            uid_len in 0usize..200,
            cid_len in 0usize..600,
            with_cert in proptest::arbitrary::any::<bool>(),
            with_tls in proptest::arbitrary::any::<bool>(),
            budget in 0usize..1200,
            mask in 0u8..128,
        ) {
            let src: SocketAddr = if src_v6 { "[2001:db8::1]:1".parse().unwrap() } else { "1.2.3.4:1".parse().unwrap() };
            let dst: SocketAddr = if dst_v6 { "[2001:db8::2]:2".parse().unwrap() } else { "5.6.7.8:2".parse().unwrap() };
            let mut tls = tls_with_cert();
            tls.sni = Some("s".repeat(sni_len));
            if with_cert {
                tls.client_cert.as_mut().unwrap().cn = Some("c".repeat(cn_len));
            } else {
                tls.client_cert = None;
            }
            let uid = vec![b'u'; uid_len];
            let cid = vec![b'c'; cid_len];
            let chosen: Vec<Tlv> = ALL.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, t)| *t).collect();
            let inp = HeaderInput { src, dst, tls: with_tls.then_some(&tls), unique_id: &uid, client_id: &cid };
            let enc = encode_v2(&inp, &chosen, budget);
            let base = if src_v6 || dst_v6 { 52 } else { 28 };
            proptest::prop_assert!(enc.bytes.len() <= budget.max(base));
            let header = Header::try_from(enc.bytes.as_slice()).unwrap();
            proptest::prop_assert_eq!(header.len(), enc.bytes.len());
            for t in header.tlvs() {
                let t = t.unwrap();
                let kind_of = |c: &Tlv| match c {
                    Tlv::Alpn => 0x01,
                    Tlv::Authority => 0x02,
                    Tlv::Crc32c => 0x03,
                    Tlv::UniqueId => 0x05,
                    Tlv::Ssl => 0x20,
                    Tlv::CertSha256 => 0xE0,
                    Tlv::ClientId => 0xE1,
                };
                let was_chosen = chosen.iter().any(|c| kind_of(c) == t.kind);
                proptest::prop_assert!(was_chosen);
                if t.kind == PP2_TYPE_SSL { parse_ssl(&t.value); }
                if t.kind == PP2_TYPE_AUTHORITY { proptest::prop_assert!(t.value.len() <= 255); }
                if t.kind == PP2_TYPE_UNIQUE_ID { proptest::prop_assert!(t.value.len() <= 128); }
                if t.kind == PP2_TYPE_CRC32C { assert_crc_ok(&enc.bytes); }
            }
            for d in &enc.dropped {
                proptest::prop_assert!(chosen.contains(d));
            }
            assert_kept_greedily(&inp, &chosen, budget, &enc);
        }
    }
}
