//! The status page: `GET /` on the admin port serves one self-contained HTML page
//! (`status.html`: inline CSS and script, nothing loaded from elsewhere), and `GET
//! /status.json` the aggregates it refreshes from every few seconds, together with `/route` for
//! its client-id box. Read-only: nothing here changes state.
//!
//! The page runs under a strict Content-Security-Policy: no source but the page's own inline
//! `<style>` and `<script>`, allowed by their SHA-256 hashes (computed once from the page as
//! served, so they can never go stale), and `fetch` to this origin only.
//!
//! `/status.json` reads only aggregates — the snapshot's listeners, pools and per-broker
//! counters, and the metric families' per-label sums — never the list of connections, so it
//! costs the same with a million connections as with one, and stays small with 100 brokers.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use prometheus::proto::{MetricFamily, MetricType};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::http::AdminState;
use super::log::rfc3339;
use super::metrics::{GIT_COMMIT, VERSION};
use super::route;

/// The page, as served.
pub const PAGE: &str = include_str!("status.html");

/// When the admin server started (about when the process did: it starts first), for the
/// uptime the page shows.
static STARTED: OnceLock<Instant> = OnceLock::new();
static CSP: OnceLock<String> = OnceLock::new();

/// Notes the start time and computes the page's Content-Security-Policy, so the first request
/// finds both ready.
pub fn init() {
    STARTED.get_or_init(Instant::now);
    csp();
}

/// The Content-Security-Policy of the page: only its own inline style and script (by hash),
/// `fetch` to this origin, nothing else, and no framing.
pub fn csp() -> &'static str {
    CSP.get_or_init(|| {
        format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'none'; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hash_of(element(PAGE, "script")),
            hash_of(element(PAGE, "style")),
        )
    })
}

/// The text between `<tag>` and `</tag>` of the one such element of `page`, as a browser
/// hashes it for CSP.
fn element<'a>(page: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let start = page.find(&open).map(|i| i + open.len()).expect("the page has the element");
    let end = page[start..].find(&format!("</{tag}>")).expect("the element is closed") + start;
    &page[start..end]
}

fn hash_of(text: &str) -> String {
    format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes())))
}

/// The body of `/status.json`.
pub fn json(state: &AdminState) -> Value {
    let snap = state.current.load();
    let ready = state.readiness.check(&snap);
    let families = state.metrics.registry.gather();
    let m = &state.metrics;

    let accepted = sums(&families, "harbormaster_connections_accepted_total", &["listener"]);
    let active = sums(&families, "harbormaster_connections_active", &["listener"]);
    let refused = sums(&families, "harbormaster_connections_refused_total", &["listener", "reason"]);
    let handshakes = sums(&families, "harbormaster_tls_handshakes_total", &["listener"]);
    let routed = sums(&families, "harbormaster_connections_routed_total", &["pool"]);
    let away = sums(&families, "harbormaster_connections_away_from_home", &["pool"]);
    let has_away = families.iter().any(|f| f.name() == "harbormaster_connections_away_from_home");
    let one = |map: &BTreeMap<Vec<String>, f64>, key: &str| map.get(&vec![key.to_string()]).copied().unwrap_or(0.0);

    let listeners: Vec<Value> = snap
        .listeners
        .iter()
        .map(|l| {
            let mut by_reason = Map::new();
            for (labels, n) in refused.iter().filter(|(k, _)| k[0] == l.name) {
                by_reason.insert(labels[1].clone(), json!(*n as u64));
            }
            json!({
                "name": l.name,
                "bind": l.bind.to_string(),
                "pool": l.pool,
                "tls": l.tls.is_some(),
                "active": one(&active, &l.name) as i64,
                "accepted": one(&accepted, &l.name) as u64,
                "tls_handshakes": one(&handshakes, &l.name) as u64,
                "refused": by_reason,
            })
        })
        .collect();

    let pools: Vec<Value> = snap
        .pools
        .iter()
        .map(|p| {
            let brokers: Vec<Value> = p.backends.iter().map(|b| super::http::broker_json(b)).collect();
            json!({
                "name": p.name,
                "hash_key": route::hash_key_name(p.hash_key),
                "health_checked": p.health.is_some(),
                "routed": one(&routed, &p.name) as u64,
                "away_from_home": has_away.then(|| one(&away, &p.name) as i64),
                "brokers": brokers,
            })
        })
        .collect();

    let reloads = sums(&families, "harbormaster_config_reloads_total", &["outcome"]);
    let last_applied = m.config_last_success.get();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    json!({
        "version": VERSION,
        "commit": GIT_COMMIT,
        "now_ms": now.as_millis() as u64,
        "uptime_seconds": STARTED.get_or_init(Instant::now).elapsed().as_secs(),
        "ready": ready.is_ok(),
        "ready_reason": ready.err(),
        "draining": m.draining.get() == 1,
        "config": {
            // The initial load is generation 1; each applied reload adds one.
            "generation": 1 + one(&reloads, "ok") as u64,
            "reloads_rejected": one(&reloads, "error") as u64,
            "last_reload_ok": m.config_last_successful.get() == 1,
            "last_applied_at": (last_applied > 0.0)
                .then(|| rfc3339(UNIX_EPOCH + std::time::Duration::from_secs_f64(last_applied))),
        },
        "listeners": listeners,
        "pools": pools,
    })
}

/// The counter or gauge family `name`, summed by the values of the labels `by` (in that
/// order); histograms and absent families give nothing.
fn sums(families: &[MetricFamily], name: &str, by: &[&str]) -> BTreeMap<Vec<String>, f64> {
    let mut out = BTreeMap::new();
    for f in families.iter().filter(|f| f.name() == name) {
        for m in f.get_metric() {
            let value = match f.get_field_type() {
                MetricType::COUNTER => m.get_counter().get_value(),
                MetricType::GAUGE => m.get_gauge().get_value(),
                _ => continue,
            };
            let key: Vec<String> = by
                .iter()
                .map(|l| {
                    m.get_label().iter().find(|p| p.name() == *l).map(|p| p.value().to_string()).unwrap_or_default()
                })
                .collect();
            *out.entry(key).or_insert(0.0) += value;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_self_contained() {
        // Nothing loaded from elsewhere: no src/href attributes, no URL but this origin's.
        for needle in ["src=", "href=", "http://", "https://", "//cdn", "@import", "url("] {
            assert!(!PAGE.contains(needle), "the page refers to something outside it: {needle}");
        }
        assert_eq!(PAGE.matches("<script>").count(), 1);
        assert_eq!(PAGE.matches("<style>").count(), 1);
        // Built with textContent only: names from the config are never parsed as HTML.
        assert!(!PAGE.contains("innerHTML"));
    }

    #[test]
    fn the_policy_allows_exactly_the_inline_script_and_style() {
        let csp = csp();
        assert!(csp.starts_with("default-src 'none'; "), "{csp}");
        let script = element(PAGE, "script");
        let expected = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(script.as_bytes()));
        assert!(csp.contains(&format!("script-src 'sha256-{expected}';")), "{csp}");
        assert!(script.contains("fetch(\"/status.json\""));
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(element("a<style>x</style>b", "style"), "x");
    }
}
