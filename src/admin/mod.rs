//! Operator-facing surface: the admin HTTP server (`/healthz`, `/readyz`, `/metrics`,
//! `/backends`, `/route`, the status page `/` and `/status.json`, and the token-guarded drain
//! and enable of a broker), the readiness latch, route lookup shared with `harbormaster route`,
//! logging setup, and the metric handles every other module updates, in one place.

pub mod auth;
pub mod http;
pub mod log;
pub mod metrics;
pub mod ready;
pub mod route;
pub mod status;
