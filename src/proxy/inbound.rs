//! Inbound PROXY v1/v2 headers from an outer load balancer (`accept_proxy = true`): parsing with
//! `ppp`, incremental (incomplete input is not an error). Pure: no I/O.

use std::net::SocketAddr;

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

/// `Ok(None)`: more bytes needed.
pub fn parse(buf: &[u8]) -> Result<Option<Inbound>, InboundError> {
    let _ = buf;
    todo!()
}
