//! Outbound PROXY protocol headers (v1 and v2 with TLVs) that tell a broker who the client is.
//! Built with `ppp`'s v2 builder; the nested SSL TLV, CRC32C and the header budget are ours.
//! Pure functions: no I/O.

use std::net::SocketAddr;

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
    pub dropped: Vec<Tlv>,
}

/// PROXY v2, command PROXY, with the chosen TLVs, within `max_header_bytes`.
pub fn encode_v2(input: &HeaderInput<'_>, tlvs: &[Tlv], max_header_bytes: usize) -> Encoded {
    let _ = (input, tlvs, max_header_bytes);
    todo!()
}

/// PROXY v1 text header.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let _ = (src, dst);
    todo!()
}
