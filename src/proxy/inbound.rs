//! Inbound PROXY v1/v2 headers from an outer load balancer (`accept_proxy = true`): parsing with
//! `ppp`, incremental (incomplete input is not an error). Pure: no I/O.
//!
//! The caller reads into a buffer and calls [`parse`] until it returns `Some`; the header is
//! then `buf[..len]` and the rest belongs to the client's stream (TLS or MQTT). A v1 header is
//! at most 107 bytes, a v2 header at most 16 + 65535, so the caller's buffer is bounded.
//!
//! Addresses are reported only for what HAProxy itself honours: v1 `TCP4`/`TCP6`, v2 command
//! PROXY with family INET/INET6 and transport STREAM. LOCAL (the LB's health checks), v1
//! `UNKNOWN`, AF_UNSPEC, AF_UNIX and DGRAM give `addrs: None`: the connection is accepted and
//! the TCP peer stays the client's address.

use std::net::SocketAddr;

use ppp::v1;
use ppp::v2;
use ppp::PartialResult;

/// What an outer load balancer told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// Length of the header in bytes; what follows belongs to the client's stream.
    pub len: usize,
    /// Client source and destination, `None` for LOCAL / UNKNOWN (health checks of the LB):
    /// then the TCP peer address stays the client's address.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("invalid PROXY header: {0}")]
    Invalid(String),
}

/// The longest v1 header (including CRLF).
pub const V1_MAX_LEN: usize = 107;
/// The longest v2 header.
pub const V2_MAX_LEN: usize = 16 + u16::MAX as usize;

/// What a v1 header starts with. "PROXY" alone is not enough to commit to v1.
const V1_PREFIX: &[u8] = b"PROXY ";

/// `Ok(None)`: more bytes needed.
pub fn parse(buf: &[u8]) -> Result<Option<Inbound>, InboundError> {
    let sig = v2::PROTOCOL_PREFIX;
    if buf.len() < sig.len().max(V1_PREFIX.len()) && (sig.starts_with(buf) || V1_PREFIX.starts_with(buf)) {
        // Covers the empty buffer too.
        return Ok(None);
    }
    if buf.starts_with(sig) {
        parse_v2(buf)
    } else if buf.starts_with(V1_PREFIX) {
        parse_v1(buf)
    } else {
        Err(InboundError::NotProxy)
    }
}

fn parse_v2(buf: &[u8]) -> Result<Option<Inbound>, InboundError> {
    let result = v2::Header::try_from(buf);
    if result.is_incomplete() {
        return Ok(None);
    }
    let header = result.map_err(|e| InboundError::Invalid(e.to_string()))?;
    let addrs = match (header.command, header.protocol, header.addresses) {
        (v2::Command::Proxy, v2::Protocol::Stream, v2::Addresses::IPv4(a)) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        (v2::Command::Proxy, v2::Protocol::Stream, v2::Addresses::IPv6(a)) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        _ => None,
    };
    Ok(Some(Inbound { len: header.len(), addrs }))
}

fn parse_v1(buf: &[u8]) -> Result<Option<Inbound>, InboundError> {
    let result = v1::Header::try_from(buf);
    if result.is_incomplete() {
        return Ok(None);
    }
    let header = match result {
        Ok(header) => header,
        // ppp validates the destination port as soon as the field separator before it has
        // arrived, so "... 51000 " (port not yet received) reads as an invalid port. Until the
        // CR arrives (and within v1's length) that can still become a valid header.
        Err(v1::BinaryParseError::Parse(v1::ParseError::InvalidDestinationPort(_)))
            if buf.len() < V1_MAX_LEN && !buf.contains(&b'\r') =>
        {
            return Ok(None)
        }
        Err(e) => return Err(InboundError::Invalid(e.to_string())),
    };
    let addrs = match header.addresses {
        v1::Addresses::Tcp4(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        v1::Addresses::Tcp6(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        v1::Addresses::Unknown => None,
    };
    Ok(Some(Inbound { len: header.header.len(), addrs }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Builder, Command, Protocol, Type, Version};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Every strict prefix needs more bytes; the whole header parses to `want`.
    fn assert_incremental(header: &[u8], want: Option<(SocketAddr, SocketAddr)>) {
        for n in 0..header.len() {
            assert_eq!(parse(&header[..n]), Ok(None), "prefix of {n} bytes of {:?}", String::from_utf8_lossy(header));
        }
        let got = parse(header).unwrap().unwrap();
        assert_eq!(got, Inbound { len: header.len(), addrs: want });
        // What follows the header is not part of it.
        let mut with_payload = header.to_vec();
        with_payload.extend_from_slice(&[0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', b'\r']);
        assert_eq!(parse(&with_payload).unwrap().unwrap().len, header.len());
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        assert_incremental(
            b"PROXY TCP4 192.0.2.10 10.0.0.5 51000 1883\r\n",
            Some((addr("192.0.2.10:51000"), addr("10.0.0.5:1883"))),
        );
        assert_incremental(
            b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 8883\r\n",
            Some((addr("[2001:db8::1]:40000"), addr("[2001:db8::2]:8883"))),
        );
        assert_incremental(b"PROXY UNKNOWN\r\n", None);
        assert_incremental(
            b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
            None,
        );
        assert_incremental(
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
            Some((
                addr("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
                addr("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
            )),
        );
    }

    #[test]
    fn v1_from_our_encoder() {
        use crate::proxy::proxy_header::encode_v1;
        let (s, d) = (addr("198.51.100.7:5555"), addr("[2001:db8::9]:1883"));
        let line = encode_v1(s, d);
        let mapped = addr("[::ffff:198.51.100.7]:5555");
        assert_incremental(&line, Some((mapped, d)));
    }

    #[test]
    fn v2_ipv4_ipv6_with_tlvs() {
        let h = Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            (addr("192.0.2.10:51000"), addr("10.0.0.5:1883")),
        )
        .write_tlv(Type::Authority, b"broker.example")
        .unwrap()
        .write_tlv(Type::NoOp, &[0; 7])
        .unwrap()
        .build()
        .unwrap();
        assert_incremental(&h, Some((addr("192.0.2.10:51000"), addr("10.0.0.5:1883"))));

        let h = Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            (addr("[2001:db8::1]:40000"), addr("[2001:db8::2]:8883")),
        )
        .build()
        .unwrap();
        assert_incremental(&h, Some((addr("[2001:db8::1]:40000"), addr("[2001:db8::2]:8883"))));
    }

    #[test]
    fn v2_from_our_encoder() {
        use crate::proxy::proxy_header::{encode_v2, HeaderInput, Tlv};
        let (s, d) = (addr("[2001:db8::1]:40000"), addr("[2001:db8::2]:8883"));
        let enc = encode_v2(
            &HeaderInput { src: s, dst: d, tls: None, unique_id: b"id-1", client_id: b"cid" },
            &[Tlv::UniqueId, Tlv::ClientId, Tlv::Crc32c],
            500,
        );
        assert_incremental(&enc.bytes, Some((s, d)));
    }

    #[test]
    fn v2_local_unspec_unix_dgram_have_no_addresses() {
        let local = Builder::with_addresses(
            Version::Two | Command::Local,
            Protocol::Stream,
            (addr("192.0.2.10:51000"), addr("10.0.0.5:1883")),
        )
        .build()
        .unwrap();
        assert_incremental(&local, None);

        let unspec = Builder::new(Version::Two | Command::Proxy, 0x00).build().unwrap();
        assert_eq!(unspec.len(), 16);
        assert_incremental(&unspec, None);

        let local_unspec = Builder::new(Version::Two | Command::Local, 0x00).build().unwrap();
        assert_incremental(&local_unspec, None);

        let unix =
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, v2::Unix::new([1; 108], [2; 108]))
                .build()
                .unwrap();
        assert_incremental(&unix, None);

        let dgram = Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Datagram,
            (addr("192.0.2.10:51000"), addr("10.0.0.5:1883")),
        )
        .build()
        .unwrap();
        assert_incremental(&dgram, None);
    }

    #[test]
    fn garbage_is_not_proxy() {
        for bytes in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..], // TLS ClientHello
            &[0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T'][..], // MQTT CONNECT
            &b"PROXYTCP4"[..],
            &b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n"[..],
            &b"\r\n\r\n\0\r\nQUIX\n"[..],
            &b"\r\nX"[..],
            &b"Q"[..],
        ] {
            assert_eq!(parse(bytes), Err(InboundError::NotProxy), "{bytes:?}");
        }
    }

    #[test]
    fn malformed_headers_are_invalid() {
        let mut bad_version = v2::PROTOCOL_PREFIX.to_vec();
        bad_version.extend([0x11, 0x11, 0, 12]);
        bad_version.extend([0; 12]);
        let mut bad_command = v2::PROTOCOL_PREFIX.to_vec();
        bad_command.extend([0x2F, 0x11, 0, 12]);
        bad_command.extend([0; 12]);
        let mut short_addresses = v2::PROTOCOL_PREFIX.to_vec();
        short_addresses.extend([0x21, 0x21, 0, 12]);
        short_addresses.extend([0; 12]);
        let too_long_v1 = [b"PROXY UNKNOWN ".as_slice(), &[b'a'; 100]].concat();
        for bytes in [
            &bad_version[..],
            &bad_command[..],
            &short_addresses[..],
            &b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"[..],
            &b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n"[..],
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n"[..],
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n"[..],
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX"[..],
            &too_long_v1[..],
        ] {
            assert!(
                matches!(parse(bytes), Err(InboundError::Invalid(_))),
                "{:?} -> {:?}",
                String::from_utf8_lossy(bytes),
                parse(bytes)
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_input_never_panics(bytes in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..300)) {
            if let Ok(Some(inbound)) = parse(&bytes) {
                proptest::prop_assert!(inbound.len <= bytes.len());
            }
        }

        #[test]
        fn arbitrary_tail_after_a_signature_never_panics(
            v2_sig in proptest::arbitrary::any::<bool>(),
            tail in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..300),
        ) {
            let mut bytes = if v2_sig { v2::PROTOCOL_PREFIX.to_vec() } else { b"PROXY ".to_vec() };
            bytes.extend(tail);
            if let Ok(Some(inbound)) = parse(&bytes) {
                proptest::prop_assert!(inbound.len <= bytes.len());
            }
        }

        #[test]
        fn any_valid_header_parses_incrementally(
            src in proptest::arbitrary::any::<SocketAddr>(),
            dst in proptest::arbitrary::any::<SocketAddr>(),
            v1 in proptest::arbitrary::any::<bool>(),
        ) {
            use crate::proxy::proxy_header::{encode_v1, encode_v2, HeaderInput, Tlv};
            let header = if v1 {
                encode_v1(src, dst)
            } else {
                encode_v2(
                    &HeaderInput { src, dst, tls: None, unique_id: b"u", client_id: b"c" },
                    &[Tlv::UniqueId, Tlv::ClientId, Tlv::Crc32c],
                    500,
                ).bytes
            };
            for n in 0..header.len() {
                proptest::prop_assert_eq!(parse(&header[..n]), Ok(None));
            }
            let got = parse(&header).unwrap().unwrap();
            proptest::prop_assert_eq!(got.len, header.len());
            let (s, d) = got.addrs.unwrap();
            proptest::prop_assert_eq!(s.port(), src.port());
            proptest::prop_assert_eq!(d.port(), dst.port());
        }
    }
}
