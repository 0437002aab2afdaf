//! The control plane: turns the TOML file into a validated, immutable [`Snapshot`] for the data
//! plane (reading certificates, resolving broker names). It never touches a client socket.
//!
//! [`Snapshot`]: crate::proxy::snapshot::Snapshot

pub mod config;
pub mod discovery;
pub mod health;
pub mod tls;
