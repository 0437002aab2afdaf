//! The data plane: listeners and the per-connection pipeline, written top to bottom in
//! [`connection`]. Everything here reads only the current immutable [`snapshot::Snapshot`].

pub mod admission;
pub mod balance;
pub mod boundary;
pub mod broker;
pub mod budget;
pub mod connection;
pub mod hold;
pub mod identity;
pub mod inbound;
pub mod listener;
pub mod mqtt;
pub mod prefixed;
pub mod proxy_header;
pub mod registry;
pub mod relay;
pub mod rewrite;
pub mod routing;
pub mod runtimes;
pub mod snapshot;
pub mod stream;
pub mod tls_stream;
pub mod websocket;
