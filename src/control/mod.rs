//! The control plane: turns the TOML file into a validated, immutable [`Snapshot`] for the data
//! plane (reading certificates, resolving broker names), rebuilds it on reload and discovery
//! updates, and paces the closing of connections. It never touches a client socket.
//!
//! [`Snapshot`]: crate::proxy::snapshot::Snapshot

pub mod brokers;
pub mod config;
pub mod crl;
pub mod demo_certs;
pub mod discovery;
pub mod drain;
pub mod health;
pub mod memory;
pub mod rebalance;
pub mod reload;
pub mod tickets;
pub mod tls;
