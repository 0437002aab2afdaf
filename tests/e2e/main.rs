//! The end-to-end tests, one binary: each module holds the tests of one area, and `support`
//! the harness they share (real peers on loopback, harbormaster started on port 0 with its
//! bound addresses read back from its log). One binary links the harness and the crate once
//! instead of once per area; `cargo test --test e2e e2e_reload::` runs one area.

mod support;

mod e2e_admin;
mod e2e_admin_drain;
mod e2e_admission;
mod e2e_assign;
mod e2e_bad_input;
mod e2e_certs;
mod e2e_cli;
mod e2e_connect_rewrite;
mod e2e_demo;
mod e2e_discovery;
mod e2e_discovery_dns;
mod e2e_discovery_kube;
mod e2e_drain;
mod e2e_drain_paced;
mod e2e_faults;
mod e2e_haproxy;
mod e2e_health;
mod e2e_hold;
mod e2e_identity;
mod e2e_memory;
mod e2e_mosquitto;
mod e2e_nothing_lost;
mod e2e_peers;
mod e2e_planned_close;
mod e2e_prometheus;
mod e2e_rabbitmq;
mod e2e_rebalance;
mod e2e_refusals;
mod e2e_relay;
mod e2e_reload;
mod e2e_revocation;
mod e2e_routing;
mod e2e_settle;
mod e2e_status_page;
mod e2e_tickets;
mod e2e_tls_posture;
mod e2e_websocket;
