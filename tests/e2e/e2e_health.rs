//! Health checking against real brokers: a mosquitto broker stopped behind harbormaster is
//! marked down by the active check (mqtt or tcp) after `fall` failed probes, its clients go to
//! their own second choice (per `harbormaster route`) without a failed dial, and come back once
//! it is started again on the same port and `rise` probes passed. Failed dials count toward
//! `fall` only in pools with active checks (brokers `b0`, `b1`… are support's [`Mosquitto`], which
//! starts again on its port after a stop, its log spanning every run). The mqtt probe's PROXY v1/v2 header is accepted by
//! HAProxy (`accept-proxy`) and RabbitMQ (which rejects the LOCAL command).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use crate::support::*;
use tempfile::TempDir;

/// Stops `b` (SIGKILL) and waits until its port refuses connections.
fn stop(b: &mut Mosquitto) {
    b.stop();
    assert!(wait_until(WAIT, || !port_accepts(b.port)), "mosquitto :{} still accepts after stop", b.port);
}

/// Connections of harbormaster's mqtt probes.
fn probe_count(b: &Mosquitto) -> usize {
    b.connections().iter().filter(|c| c.client_id.starts_with("hm-health-")).count()
}

/// The health transition log lines (`broker health changed`), as key=value maps.
fn transitions(hm: &Harbormaster) -> Vec<BTreeMap<String, String>> {
    hm.log().lines().filter(|l| l.contains("broker health changed")).map(parse_kv_line).collect()
}

fn transitions_of(hm: &Harbormaster, pool: &str, broker: &str, state: &str) -> Vec<BTreeMap<String, String>> {
    transitions(hm)
        .into_iter()
        .filter(|t| t.get("pool").map(String::as_str) == Some(pool))
        .filter(|t| t.get("broker").map(String::as_str) == Some(broker))
        .filter(|t| t.get("state").map(String::as_str) == Some(state))
        .collect()
}

/// Waits for the `n`-th transition of `broker` in `pool` to `state` and returns it.
fn wait_transition(hm: &Harbormaster, pool: &str, broker: &str, state: &str, n: usize) -> BTreeMap<String, String> {
    let mut found = Vec::new();
    let ok = wait_until(WAIT, || {
        found = transitions_of(hm, pool, broker, state);
        found.len() >= n
    });
    assert!(ok, "no transition #{n} of {pool}/{broker} to {state}; transitions: {:#?}", transitions(hm));
    found.swap_remove(n - 1)
}

/// Client-ids (`prefix-N`) whose first choice in `pool` is `broker`, per `harbormaster route`,
/// with their whole preference order.
fn ids_first_on(hm: &Harbormaster, pool: &str, prefix: &str, broker: &str, n: usize) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for i in 0..1000 {
        let id = format!("{prefix}-{i}");
        let order = hm.route_in(&id, pool);
        if order[0] == broker {
            out.push((id, order));
            if out.len() == n {
                return out;
            }
        }
    }
    panic!("fewer than {n} of 1000 client-ids route to {broker} first");
}

/// Publishes once as `client_id` through `port` and returns harbormaster's log line of that
/// connection (the `nth` connection of this client-id, counting from 1).
fn publish_through(hm: &Harbormaster, port: u16, client_id: &str, nth: usize) -> BTreeMap<String, String> {
    MqttClient::plain(port, MqttVersion::V311).publish_ok(client_id, "health/test", "hello");
    let mut lines = Vec::new();
    let ok = wait_until(WAIT, || {
        lines = hm
            .connection_logs()
            .into_iter()
            .filter(|m| m.get("client_id").map(String::as_str) == Some(client_id))
            .collect();
        lines.len() >= nth
    });
    assert!(ok, "no connection log #{nth} for {client_id}");
    lines.swap_remove(nth - 1)
}

fn get<'a>(line: &'a BTreeMap<String, String>, key: &str) -> &'a str {
    line.get(key).map(String::as_str).unwrap_or("")
}

/// The whole cycle for one check kind: three brokers, clients of b0 on b0; b0 stopped →
/// marked down by the check → its clients on their second choice without a failed dial; b0
/// started again on the same port → marked up → its clients back on b0.
fn stop_and_start_a_broker(check: &str) {
    let mut brokers = Mosquitto::start_n(3);
    let config = format!(
        r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "brokers"

[pool.brokers]
backends = [{backends}]
proxy_protocol = "none"
backend_connect_timeout = "2s"
backend_attempts = 3
health = {{ check = "{check}", interval = "200ms", timeout = "200ms", rise = 2, fall = 2 }}

[limits]
drain_timeout = "1s"
"#,
        backends = numbered_backends("b", &brokers)
    );
    let hm = Harbormaster::start(&config);
    let port = hm.port("mqtt");
    let clients = ids_first_on(&hm, "brokers", &format!("{check}-dev"), "b0", 3);

    // Healthy: every client on its first choice.
    for (id, _) in &clients {
        let line = publish_through(&hm, port, id, 1);
        assert_eq!(get(&line, "broker"), "b0", "{line:?}");
        assert_eq!(brokers[0].connection_count(id), 1);
    }
    if check == "mqtt" {
        assert!(wait_until(WAIT, || brokers.iter().all(|b| probe_count(b) >= 2)), "mqtt probes reach every broker");
    }

    // b0 stops: after `fall` failed probes it is marked down, by the check.
    stop(&mut brokers[0]);
    let down = wait_transition(&hm, "brokers", "b0", "down", 1);
    let reason = get(&down, "reason");
    assert!(reason.contains(&format!("{check} check")), "marked down by the {check} check: {down:?}");
    assert!(reason.starts_with("2 failures in a row"), "after fall = 2 failures: {down:?}");

    // Its clients go to their own second choice, without trying b0 first.
    for (id, order) in &clients {
        let line = publish_through(&hm, port, id, 2);
        assert_eq!(get(&line, "broker"), order[1], "{id} goes to its second choice {order:?}: {line:?}");
        assert!(!get(&line, "detail").contains("failed over"), "b0 was skipped, not dialled: {line:?}");
        assert_eq!(get(&line, "close_reason"), "closed", "{line:?}");
        let second = &brokers[order[1]["b".len()..].parse::<usize>().unwrap()];
        assert_eq!(second.connection_count(id), 1, "{id} on {}", order[1]);
    }
    assert!(!brokers[0].is_running(), "b0 stayed stopped");

    // b0 starts again on the same port: after `rise` passed probes it is up, its clients back.
    brokers[0].restart();
    let up = wait_transition(&hm, "brokers", "b0", "up", 1);
    assert!(get(&up, "reason").starts_with(&format!("2 {check} checks passed")), "{up:?}");
    for (id, _) in &clients {
        let line = publish_through(&hm, port, id, 3);
        assert_eq!(get(&line, "broker"), "b0", "{line:?}");
        assert!(!get(&line, "detail").contains("failed over"), "{line:?}");
        assert_eq!(brokers[0].connection_count(id), 2, "{id} connected to b0 before and after");
    }

    // One transition each way.
    assert_eq!(transitions_of(&hm, "brokers", "b0", "down").len(), 1, "{:#?}", transitions(&hm));
    assert_eq!(transitions_of(&hm, "brokers", "b0", "up").len(), 1, "{:#?}", transitions(&hm));
}

#[test]
fn mqtt_check_moves_a_stopped_brokers_clients_to_their_second_choice_and_back() {
    stop_and_start_a_broker("mqtt");
}

#[test]
fn tcp_check_moves_a_stopped_brokers_clients_to_their_second_choice_and_back() {
    stop_and_start_a_broker("tcp");
}

/// Two pools over the same brokers: "checked" has active checks (probing hourly, so only
/// failed dials can change anything during the test), "plain" has none. With b0 stopped,
/// failed dials mark it down in "checked" after `fall` of them, and never in "plain".
#[test]
fn failed_dials_mark_a_broker_down_only_in_a_pool_with_active_checks() {
    let mut brokers = Mosquitto::start_n(3);
    let config = format!(
        r#"
[[listener]]
name = "checked"
bind = "127.0.0.1:0"
pool = "checked"

[[listener]]
name = "plain"
bind = "127.0.0.1:0"
pool = "plain"

[pool.checked]
backends = [{backends}]
health = {{ check = "tcp", interval = "1h", timeout = "1s", rise = 1, fall = 2 }}

[pool.plain]
backends = [{backends}]

[limits]
drain_timeout = "1s"
"#,
        backends = numbered_backends("b", &brokers)
    );
    let hm = Harbormaster::start(&config);
    let (checked_port, plain_port) = (hm.port("checked"), hm.port("plain"));
    let clients = ids_first_on(&hm, "checked", "passive-dev", "b0", 4);
    for (id, order) in &clients {
        assert_eq!(&hm.route_in(id, "plain"), order, "same brokers, same order");
    }
    stop(&mut brokers[0]);

    // "plain": every client of b0 fails over by dialling b0 first; b0 is never marked down.
    for (id, order) in &clients {
        let line = publish_through(&hm, plain_port, id, 1);
        assert_eq!(get(&line, "broker"), order[1], "{line:?}");
        assert!(get(&line, "detail").starts_with("failed over: b0:"), "{line:?}");
    }
    assert!(transitions_of(&hm, "plain", "b0", "down").is_empty(), "{:#?}", transitions(&hm));

    // "checked": the first two clients fail over (dials 1 and 2 fail, the second marks b0
    // down); the others skip b0 without dialling it.
    for (i, (id, order)) in clients.iter().enumerate() {
        let line = publish_through(&hm, checked_port, id, 2);
        assert_eq!(get(&line, "broker"), order[1], "{line:?}");
        let failed_over = get(&line, "detail").starts_with("failed over: b0:");
        assert_eq!(failed_over, i < 2, "client #{i}: {line:?}");
    }
    let down = wait_transition(&hm, "checked", "b0", "down", 1);
    assert!(get(&down, "reason").starts_with("2 failures in a row, last: dial:"), "{down:?}");
    assert_eq!(transitions(&hm).len(), 1, "{:#?}", transitions(&hm));
}

/// The mqtt probe through HAProxy `accept-proxy` (v1 and v2 headers): HAProxy accepts the
/// header and passes the probe's CONNECT to the mosquitto behind it. With that mosquitto
/// stopped, HAProxy still accepts TCP, so only the mqtt check sees the broker is gone.
#[test]
fn mqtt_check_speaks_proxy_v1_and_v2_to_haproxy_and_sees_through_it() {
    let mut behind = Mosquitto::start();
    let (h1, h2) = (Haproxy::start(behind.port), Haproxy::start(behind.port));
    let pool = |name: &str, version: &str, haproxy: &Haproxy| {
        format!(
            "[pool.{name}]\nbackends = [{{ name = \"haproxy\", address = {} }}]\nproxy_protocol = \"{version}\"\n\
             health = {{ check = \"mqtt\", interval = \"200ms\", timeout = \"200ms\", rise = 1, fall = 1 }}\n",
            toml_str(haproxy.addr())
        )
    };
    let config = format!(
        "[[listener]]\nname = \"mqtt\"\nbind = \"127.0.0.1:0\"\npool = \"v1\"\n\n{}\n{}\n[limits]\ndrain_timeout = \"1s\"\n",
        pool("v1", "v1", &h1),
        pool("v2", "v2", &h2)
    );
    let hm = Harbormaster::start(&config);

    // Probes pass through both HAProxies (each logs the header it received) to mosquitto.
    for h in [&h1, &h2] {
        let got = h.wait_for_line(|l| l.rcvd_proxy == "1" && l.src == "127.0.0.1");
        assert!(got.is_some(), "HAProxy :{} accepted no PROXY header:\n{}", h.port, h.log());
    }
    assert!(wait_until(WAIT, || probe_count(&behind) >= 6), "probes reached mosquitto through HAProxy");
    assert!(transitions(&hm).is_empty(), "every probe passed: {:#?}", transitions(&hm));

    // mosquitto gone, HAProxy still there: the mqtt check marks the broker down in both pools.
    stop(&mut behind);
    for pool in ["v1", "v2"] {
        let down = wait_transition(&hm, pool, "haproxy", "down", 1);
        assert!(get(&down, "reason").contains("mqtt check"), "{down:?}");
    }
    behind.restart();
    for pool in ["v1", "v2"] {
        wait_transition(&hm, pool, "haproxy", "up", 1);
    }
}

/// RabbitMQ with `mqtt.proxy_protocol = true` rejects a v2 LOCAL header and a missing one; the
/// probe's PROXY-command header with TLVs gets a CONNACK 0 (with fall = 1, a single refused
/// probe would mark it down).
#[test]
fn mqtt_check_with_proxy_v2_is_accepted_by_rabbitmq() {
    let rabbit = Rabbit::start();
    let config = format!(
        r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "rabbit"

[pool.rabbit]
backends = [{{ name = "rabbit", address = {addr} }}]
proxy_protocol = "v2"
health = {{ check = "mqtt", interval = "300ms", timeout = "300ms", rise = 1, fall = 1 }}

[limits]
drain_timeout = "1s"
"#,
        addr = toml_str(rabbit.addr())
    );
    let hm = Harbormaster::start(&config);
    let port = hm.port("mqtt");
    // `accepting MQTT connection <0.763.0> (127.0.0.1:55198 -> 127.0.0.1:35199, client id:
    // hm-health-7515823071aa2)`: the addresses are those of the probe's PROXY header.
    let probes = || {
        let out = rabbit.server_output();
        out.lines().filter(|l| l.contains("accepting MQTT connection") && l.contains("client id: hm-health-")).count()
    };
    assert!(wait_until(WAIT, || probes() >= 3), "RabbitMQ saw no probe:\n{}", rabbit.server_output());
    assert!(transitions(&hm).is_empty(), "every probe was accepted: {:#?}", transitions(&hm));

    // And a client routed through the same pool is accepted too (the data plane's header).
    let line = publish_through(&hm, port, "rabbit-client", 1);
    assert_eq!(get(&line, "broker"), "rabbit", "{line:?}");
}

/// `python3 -m http.server` serving a folder: a real HTTP server whose answer for a path is
/// 200 while the file exists and 404 once it is removed.
struct HttpServer {
    port: u16,
    dir: TempDir,
    child: Child,
}

impl HttpServer {
    fn start() -> HttpServer {
        let python = require_program("python3");
        let dir = tempfile::Builder::new().prefix("hm-health-http-").tempdir().unwrap();
        let port = free_port();
        let child = Command::new(python)
            .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        assert!(wait_until(WAIT, || port_accepts(port)), "python3 -m http.server did not listen on {port}");
        HttpServer { port, dir, child }
    }

    fn set_ready(&self, ready: bool) {
        let file = self.dir.path().join("ready");
        if ready {
            fs::write(file, "ok\n").unwrap();
        } else {
            fs::remove_file(file).unwrap();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `check = "http"` follows the broker's own readiness endpoint, not its MQTT port: the
/// broker (mosquitto) keeps running while its "readiness" (a file served by a real HTTP
/// server) goes away and comes back; the broker is marked down on the 404 and up again on the
/// 200.
#[test]
fn http_check_follows_a_readiness_endpoint_down_and_up() {
    let mut broker = Mosquitto::start();
    let http = HttpServer::start();
    http.set_ready(true);
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "p"

[pool.p]
backends = [{backends}]
proxy_protocol = "none"
health = {{ check = "http", port = {port}, path = "/ready", interval = "300ms", timeout = "300ms", rise = 1, fall = 1 }}

[admin]
bind = "127.0.0.1:0"
"#,
        backends = named_backends(&[("m", &broker)]),
        port = http.port
    ));
    let (port, admin) = (hm.port("mqtt"), hm.admin_addr());
    let healthy = || metric_sum(&admin, "harbormaster_broker_healthy", &[("pool", "p"), ("broker", "m")]);
    assert!(wait_until(WAIT, || healthy() == 1.0), "{}", metrics_text(&admin));
    let line = publish_through(&hm, port, "ready-1", 1);
    assert_eq!(get(&line, "broker"), "m", "{line:?}");

    http.set_ready(false);
    let down = wait_transition(&hm, "p", "m", "down", 1);
    assert!(get(&down, "reason").contains("http check: HTTP status 404 from /ready, expected 200"), "{down:?}");
    assert!(broker.is_running(), "the broker itself kept running");
    assert!(wait_until(WAIT, || healthy() == 0.0), "{}", metrics_text(&admin));

    http.set_ready(true);
    let up = wait_transition(&hm, "p", "m", "up", 1);
    assert!(get(&up, "reason").contains("http checks passed"), "{up:?}");
    let line = publish_through(&hm, port, "ready-2", 1);
    assert_eq!(get(&line, "broker"), "m", "{line:?}");
}

/// RabbitMQ's management plugin as the readiness endpoint: `/api/health/checks/alarms` (200
/// while the node has no resource alarm) wants a user, so the pool with `basic_auth` sees the
/// broker up and routes to it, and the pool without is refused 401 and marks it down.
#[test]
fn http_check_reads_rabbitmq_management_health() {
    let rabbit = Rabbit::start_with_management();
    let management = rabbit.management_port.unwrap();
    let hm = Harbormaster::start(&format!(
        r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "checked"

[pool.checked]
backends = [{{ name = "rabbit", address = {addr} }}]
proxy_protocol = "v2"
health = {{ check = "http", port = {management}, path = "/api/health/checks/alarms", basic_auth = "guest:guest", interval = "300ms", timeout = "300ms", rise = 1, fall = 1 }}

[pool.anonymous]
backends = [{{ name = "rabbit", address = {addr} }}]
proxy_protocol = "v2"
health = {{ check = "http", port = {management}, path = "/api/health/checks/alarms", interval = "300ms", timeout = "300ms", rise = 1, fall = 1 }}

[admin]
bind = "127.0.0.1:0"
"#,
        addr = toml_str(rabbit.addr())
    ));
    let down = wait_transition(&hm, "anonymous", "rabbit", "down", 1);
    assert!(get(&down, "reason").contains("HTTP status 401"), "{down:?}");
    // Rounds of the authenticated pool's probes passed meanwhile: it never went down.
    let admin = hm.admin_addr();
    let healthy = |pool| metric_sum(&admin, "harbormaster_broker_healthy", &[("pool", pool), ("broker", "rabbit")]);
    assert!(wait_until(WAIT, || healthy("checked") == 1.0 && healthy("anonymous") == 0.0), "{}", metrics_text(&admin));
    assert!(transitions_of(&hm, "checked", "rabbit", "down").is_empty(), "{:#?}", transitions(&hm));
    let line = publish_through(&hm, hm.port("mqtt"), "rabbit-http-checked", 1);
    assert_eq!(get(&line, "broker"), "rabbit", "{line:?}");
}
