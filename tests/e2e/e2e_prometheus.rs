//! The alert rules (`deploy/prometheus/harbormaster-rules.yml`) and the Grafana dashboard
//! (`deploy/grafana/harbormaster-dashboard.json`) against a real Prometheus scraping a
//! harbormaster in front of real mosquitto brokers, with traffic: plain and TLS sessions held
//! open, a failed TLS handshake, and a listener whose pool's only broker is dead and whose
//! PROXY header budget is too small for its TLVs (refusals, failed dials, dropped TLVs).
//!
//! Every dashboard query and every alert expression is evaluated through Prometheus' HTTP API
//! and must parse and return a series; then a mosquitto is killed and `HarbormasterBrokerDown`
//! must be seen firing. Prometheus loads a copy of the rules file whose `for:` durations are
//! all `0s`, so an alert fires at the first evaluation that sees its condition instead of
//! minutes later. Every wait polls with a generous deadline.

use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::prometheus::Prometheus;
use crate::support::*;

/// Alerts whose label values this traffic never produces (a full `max_setup_bytes` budget, a
/// `connect_timeout` close): their expression, without its threshold, is evaluated without
/// label matchers, which requires the metric and the expression's shape to yield a series.
const LABEL_VALUES_NOT_PRODUCED: &[&str] = &["HarbormasterSetupMemoryFull", "HarbormasterConnectTimeouts"];

/// Grafana's variables in the dashboard's queries, as the test fills them in.
const VARIABLES: &[(&str, &str)] = &[("$__rate_interval", "1m"), ("$instance", ".+")];

/// Generous: Prometheus scrapes and evaluates every second, a rate needs two samples.
const SERIES_WAIT: Duration = Duration::from_secs(90);

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The rules file with every `for:` set to `0s`.
fn rules_without_for(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("for:") {
            out.push_str(&line[..line.len() - trimmed.len()]);
            out.push_str("for: 0s");
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// Every `expr` string anywhere in the dashboard (panel targets and annotations).
fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| exprs(i, out)),
        _ => {}
    }
}

/// The expression without its last top-level comparison (`== 0`, `> 0.05`, `< 14 * 86400`):
/// what the alert compares against its threshold. `None` when it has none.
fn without_threshold(expr: &str) -> Option<String> {
    let b = expr.as_bytes();
    let (mut depth, mut quote, mut cut) = (0i32, None::<u8>, None);
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match quote {
            Some(q) => {
                if c == b'\\' {
                    i += 1;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                b'"' | b'\'' | b'`' => quote = Some(c),
                b'(' | b'{' | b'[' => depth += 1,
                b')' | b'}' | b']' => depth -= 1,
                b'=' | b'!' if depth == 0 && b.get(i + 1) == Some(&b'=') => {
                    cut = Some(i);
                    i += 1;
                }
                b'>' | b'<' if depth == 0 => {
                    cut = Some(i);
                    if b.get(i + 1) == Some(&b'=') {
                        i += 1;
                    }
                }
                _ => {}
            },
        }
        i += 1;
    }
    cut.map(|at| expr[..at].trim().to_string())
}

/// `expr` with every label matcher list (`{...}`) removed.
fn without_matchers(expr: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in expr.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// Polls `expr` until it returns at least one series; panics if it does not parse. `Ok` with
/// the series, `Err` with the last answer when the deadline passed without one.
fn wait_series(prom: &Prometheus, expr: &str) -> Result<Vec<Value>, Value> {
    let deadline = Instant::now() + SERIES_WAIT;
    loop {
        let answer = prom.query(expr);
        assert_eq!(answer["status"], "success", "query does not evaluate: {expr}\n{answer}");
        let result = answer["data"]["result"].as_array().cloned().unwrap_or_default();
        if !result.is_empty() {
            return Ok(result);
        }
        if Instant::now() >= deadline {
            return Err(answer);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The alerting rules Prometheus loaded: (name, query, health, lastError) each.
fn alerting_rules(prom: &Prometheus) -> Vec<(String, String, String, String)> {
    let rules = prom.api("rules?type=alert");
    assert_eq!(rules["status"], "success", "{rules}");
    let mut out = Vec::new();
    for g in rules["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            out.push((s("name"), s("query"), s("health"), s("lastError")));
        }
    }
    out
}

/// The alerts Prometheus holds now with `alertname` and the `broker` label, and their state.
fn alert_states(prom: &Prometheus, alertname: &str) -> Vec<(String, String)> {
    let alerts = prom.api("alerts");
    assert_eq!(alerts["status"], "success", "{alerts}");
    alerts["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["labels"]["alertname"] == alertname)
        .map(|a| {
            (a["labels"]["broker"].as_str().unwrap_or_default().to_string(), a["state"].as_str().unwrap().to_string())
        })
        .collect()
}

#[test]
fn dashboard_queries_and_alert_rules_evaluate_and_a_dead_broker_fires() {
    let certs = Certs::new();
    let mut brokers = [Mosquitto::start(), Mosquitto::start(), Mosquitto::start()];
    let dead = addr(free_port());
    let named: Vec<(&str, &Mosquitto)> = vec![("m0", &brokers[0]), ("m1", &brokers[1]), ("m2", &brokers[2])];
    let config = format!(
        r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "brokers"

[[listener]]
name = "mqtts"
bind = "127.0.0.1:0"
pool = "brokers"
{tls}
[[listener]]
name = "edge"
bind = "127.0.0.1:0"
pool = "far"

[pool.brokers]
backends = [{list}]
health = {{ check = "mqtt", interval = "300ms", timeout = "300ms", rise = 1, fall = 1 }}

[[listener]]
name = "spare"
bind = "127.0.0.1:0"
pool = "near"

[pool.far]
backends = [{{ name = "gone", address = {dead} }}]
proxy_protocol = "v2"
max_header_bytes = 52

[pool.near]
backends = [{{ name = "gone", address = {dead} }}, {{ name = "m2", address = {m2} }}]
backend_attempts = 2
on_backend_restart = "hold"
hold_timeout = "1s"

[admin]
bind = "127.0.0.1:0"
"#,
        tls = certs.listener_tls_toml("optional"),
        list = named_backends(&named),
        dead = toml_str(&dead),
        m2 = toml_str(brokers[2].addr()),
    );
    drop(named);
    let hm = Harbormaster::start(&config);
    let admin = hm.admin_addr();

    // Traffic: sessions held open on both listeners, TLS sessions, a failed handshake, and
    // refusals with dropped TLVs on "edge".
    let mut held = Vec::new();
    for i in 0..9 {
        let (s, ack) = mqtt_connect(hm.port("mqtt"), MqttVersion::V311, &format!("prom-held-{i}"));
        assert_eq!(ack.get(3), Some(&0), "CONNACK of prom-held-{i}: {ack:?}");
        held.push(s);
    }
    let tls = MqttClient::tls(hm.port("mqtts"), MqttVersion::V5, certs.client_tls(true));
    for i in 0..3 {
        tls.publish_ok(&format!("prom-tls-{i}"), "prom/t", "hello");
    }
    let mut not_tls = TcpStream::connect(hm.addr("mqtts")).unwrap();
    not_tls.write_all(&mqtt::connect(MqttVersion::V311, "not-tls")).unwrap();
    drop(not_tls);
    for i in 0..3 {
        let (_s, ack) = mqtt_connect(hm.port("edge"), MqttVersion::V311, &format!("prom-refused-{i}-a-long-client-id"));
        assert_eq!(ack.get(3), Some(&3), "edge must refuse with server unavailable: {ack:?}");
    }
    // A failover: a client whose first choice in "near" is the dead broker.
    let first_dead = (0..64)
        .map(|i| format!("prom-failover-{i}"))
        .find(|id| hm.route_in(id, "near").first().map(String::as_str) == Some("gone"))
        .expect("some client-id prefers the dead broker");
    let (failed_over, ack) = mqtt_connect(hm.port("spare"), MqttVersion::V311, &first_dead);
    assert_eq!(ack.get(3), Some(&0), "{first_dead} must fail over to m2: {ack:?}");
    held.push(failed_over);
    assert!(
        wait_until(WAIT, || metric_sum(&admin, "harbormaster_proxy_tlv_dropped_total", &[]) > 0.0
            && metric_sum(&admin, "harbormaster_tls_handshakes_total", &[("outcome", "ok")]) >= 3.0),
        "traffic not counted:\n{}",
        metrics_text(&admin)
    );

    let rules_text = fs::read_to_string(repo_file("deploy/prometheus/harbormaster-rules.yml")).unwrap();
    let prom = Prometheus::start(&admin, &rules_without_for(&rules_text));

    // Scraped.
    let up = wait_series(&prom, "up{job=\"harbormaster\"} == 1");
    assert!(up.is_ok(), "harbormaster never scraped: {up:?}\n{}", prom.log());

    // Every alert of the file loaded, and evaluated without error, before anything failed.
    let alert_count = rules_text.lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    let mut rules = Vec::new();
    let evaluated = wait_until(SERIES_WAIT, || {
        rules = alerting_rules(&prom);
        rules.len() == alert_count && rules.iter().all(|(_, _, health, _)| health != "unknown")
    });
    assert!(evaluated, "expected {alert_count} evaluated alerting rules, Prometheus has {rules:#?}\n{}", prom.log());
    for (name, query, health, error) in &rules {
        assert_eq!(health, "ok", "{name}: {query}: {error}");
    }
    assert!(
        alert_states(&prom, "HarbormasterBrokerDown").is_empty(),
        "a broker down before any was killed: {:?}",
        alert_states(&prom, "HarbormasterBrokerDown")
    );

    // A broker dies: health checks mark it down, the alert fires.
    brokers[0].stop();
    let mut states = Vec::new();
    let fired = wait_until(SERIES_WAIT, || {
        states = alert_states(&prom, "HarbormasterBrokerDown");
        states.contains(&("m0".to_string(), "firing".to_string()))
    });
    assert!(fired, "HarbormasterBrokerDown not firing for m0: {states:?}\n{}", prom.log());
    assert_eq!(states.len(), 1, "only m0 is down: {states:?}");

    // Every alert expression without its threshold returns a series.
    for (name, query, _, _) in &rules {
        let bare = without_threshold(query).unwrap_or_else(|| panic!("{name} has no threshold comparison: {query}"));
        let probe = if LABEL_VALUES_NOT_PRODUCED.contains(&name.as_str()) { without_matchers(&bare) } else { bare };
        if let Err(last) = wait_series(&prom, &probe) {
            panic!("{name}: no series for {probe}\n(rule: {query})\nlast answer: {last}");
        }
    }

    // Every dashboard query returns a series.
    let dashboard: Value =
        serde_json::from_str(&fs::read_to_string(repo_file("deploy/grafana/harbormaster-dashboard.json")).unwrap())
            .expect("the dashboard parses");
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    assert!(queries.len() >= 20, "expected the dashboard's queries, found {}", queries.len());
    for q in &queries {
        let mut expr = q.clone();
        for (var, value) in VARIABLES {
            expr = expr.replace(var, value);
        }
        assert!(!expr.contains('$'), "a Grafana variable the test does not fill in: {q}");
        if let Err(last) = wait_series(&prom, &expr) {
            panic!("dashboard query returns no series: {expr}\nlast answer: {last}");
        }
    }
    drop(held);
}

#[test]
fn threshold_and_matchers_are_cut_where_the_rules_need_it() {
    assert_eq!(
        without_threshold("max by (pool) (harbormaster_broker_healthy) == 0").unwrap(),
        "max by (pool) (harbormaster_broker_healthy)"
    );
    assert_eq!(
        without_threshold("(harbormaster_ready unless on (instance) harbormaster_draining == 1) == 0").unwrap(),
        "(harbormaster_ready unless on (instance) harbormaster_draining == 1)"
    );
    assert_eq!(
        without_threshold("min by (listener, cert) (x) - time() < 14 * 86400").unwrap(),
        "min by (listener, cert) (x) - time()"
    );
    assert_eq!(
        without_threshold("sum(rate(x{outcome!~\"ok|revoked\", a=\">\"}[5m])) / sum(rate(x[5m])) > 0.2").unwrap(),
        "sum(rate(x{outcome!~\"ok|revoked\", a=\">\"}[5m])) / sum(rate(x[5m]))"
    );
    assert_eq!(without_threshold("sum(x)"), None);
    assert_eq!(without_matchers("sum(rate(x{reason=\"a\"}[5m]))"), "sum(rate(x[5m]))");
    assert_eq!(rules_without_for("  - alert: A\n    for: 5m\n"), "  - alert: A\n    for: 0s\n");
}
