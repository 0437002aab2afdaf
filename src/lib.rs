//! Harbormaster: an MQTT-aware, TLS-terminating load balancer.
//!
//! Per connection it accepts TCP (optionally behind a PROXY v1/v2 sending load balancer),
//! terminates TLS with rustls, peeks the MQTT CONNECT, picks a broker by consistent
//! (rendezvous) hashing of the client-id, sends the broker a PROXY v2 header with the client's
//! address and TLS identity, forwards the CONNECT and relays bytes both ways.
//!
//! # Layout
//! - [`proxy`]: the data plane. Listeners, the per-connection pipeline
//!   (TLS → CONNECT peek → broker choice → dial → PROXY header → relay) and the pure pieces it
//!   is built from. Reads only an immutable [`proxy::snapshot::Snapshot`]; never files, DNS or
//!   Kubernetes.
//! - [`control`]: the control plane. Config parsing and validation, building snapshots
//!   (certificates, resolved broker addresses), hot reload, discovery, health checks, paced
//!   closing of connections on drain. Never touches a client socket.
//! - [`admin`]: the operator's view: the admin HTTP server (`/healthz`, `/readyz`, `/metrics`,
//!   `/backends`, `/route`), the readiness latch, route lookup, logging setup, every metric.
//! - [`app`]: wiring: config → snapshot → admin server → listeners → reload loop → signals →
//!   drain.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod control;
pub mod proxy;
