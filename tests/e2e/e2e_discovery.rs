//! Discovery end to end: the harbormaster binary with a dynamic pool, real mosquitto brokers on
//! several loopback addresses (127.0.0.2, .3, .4) sharing one port, and a DNS server or a
//! Kubernetes API server the test controls. Clients go where a static pool with the same
//! broker identities would send them (`harbormaster route` on that static config); brokers
//! that leave lose only their own clients, which come back when they return; a draining pod
//! takes no new clients but keeps its established ones; a pod that comes back under its name
//! with a new IP gets its clients back.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::fake_dns::{DnsMode, FakeDns};
use crate::support::fake_kube::{endpoint_slice, FakeKube, SliceEndpoint as Ep};
use crate::support::*;
use tempfile::TempDir;

/// A mosquitto 2.0 broker listening on `ip:port` only.
struct Broker {
    ip: String,
    port: u16,
    dir: TempDir,
    child: Child,
}

impl Broker {
    fn start(ip: &str, port: u16) -> Broker {
        let bin = require_program("mosquitto");
        let dir = tempfile::Builder::new().prefix("hm-disc-mosq-").tempdir().unwrap();
        let log = dir.path().join("mosquitto.log");
        let conf = dir.path().join("mosquitto.conf");
        // `user root`: as root, mosquitto would otherwise switch to the user `mosquitto`,
        // which cannot write into our tempdir.
        fs::write(
            &conf,
            format!(
                "user root\nlistener {port} {ip}\nallow_anonymous true\npersistence false\n\
                 log_dest file {}\nlog_type all\nconnection_messages true\nlog_timestamp true\n",
                log.display()
            ),
        )
        .unwrap();
        let out = fs::File::create(dir.path().join("stdout.log")).unwrap();
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .process_group(0)
            .spawn()
            .expect("spawn mosquitto");
        let sa: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let up = wait_until(WAIT, || {
            child.try_wait().unwrap().is_none()
                && fs::read_to_string(&log).unwrap_or_default().contains("running")
                && std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(1)).is_ok()
        });
        assert!(up, "mosquitto on {ip}:{port} did not start: {}", fs::read_to_string(&log).unwrap_or_default());
        Broker { ip: ip.to_string(), port, dir, child }
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    fn connection_count(&self, client_id: &str) -> usize {
        parse_mosquitto_connections(&self.log()).iter().filter(|c| c.client_id == client_id).count()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        send_signal(-(self.child.id() as i64), "KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config with one listener "mqtt" (on a port of the kernel's choosing) and `pool` as the body
/// of `[pool.brokers]`.
fn config(pool: &str) -> String {
    format!(
        "[[listener]]\nname = \"mqtt\"\nbind = \"127.0.0.1:0\"\npool = \"brokers\"\n\n\
         [pool.brokers]\n{pool}\nbackend_connect_timeout = \"2s\"\n\n[limits]\ndrain_timeout = \"1s\"\n"
    )
}

/// A static pool with the given `(identity, address)` brokers, for `harbormaster route`.
struct Reference {
    _dir: TempDir,
    path: PathBuf,
}

impl Reference {
    fn new(brokers: &[(&str, &str)]) -> Reference {
        let dir = tempfile::Builder::new().prefix("hm-disc-ref-").tempdir().unwrap();
        let path = dir.path().join("reference.toml");
        let list: Vec<String> = brokers
            .iter()
            .map(|(name, addr)| format!("{{ name = {}, address = {} }}", toml_str(name), toml_str(addr)))
            .collect();
        fs::write(&path, config(&format!("backends = [{}]", list.join(", ")))).unwrap();
        Reference { _dir: dir, path }
    }

    /// The broker identity `client_id` goes to first.
    fn first(&self, client_id: &str) -> String {
        route(&self.path, client_id, Some("brokers"))[0].clone()
    }
}

/// Publishes once as `client_id` through harbormaster and returns the broker identity its
/// connection log line names.
fn publish_through(hm: &Harbormaster, port: u16, client_id: &str) -> String {
    let before =
        hm.connection_logs().iter().filter(|m| m.get("client_id").map(String::as_str) == Some(client_id)).count();
    MqttClient::plain(port, MqttVersion::V311).publish_ok(client_id, "discovery/test", "hello");
    let mut broker = String::new();
    let ok = wait_until(WAIT, || {
        let lines: Vec<_> = hm
            .connection_logs()
            .into_iter()
            .filter(|m| m.get("client_id").map(String::as_str) == Some(client_id))
            .collect();
        if lines.len() > before {
            broker = lines[before].get("broker").cloned().unwrap_or_default();
            true
        } else {
            false
        }
    });
    assert!(ok, "no connection log line for {client_id}:\n{}", hm.log());
    broker
}

/// Waits until harbormaster logged a membership change whose text contains `needle`.
fn wait_membership(hm: &Harbormaster, needle: &str) {
    let ok = wait_until(WAIT, || {
        hm.log()
            .lines()
            .any(|l| (l.contains("pool membership changed") || l.contains("first members")) && l.contains(needle))
    });
    assert!(ok, "no membership change with {needle:?}:\n{}", hm.log());
}

/// Waits until harbormaster forwards clients (the first members reached the data plane).
fn wait_serving(port: u16) {
    let client = MqttClient::plain(port, MqttVersion::V311);
    let ok = wait_until(WAIT, || client.publish("warm-up", "discovery/warm-up", "x").status.success());
    assert!(ok, "harbormaster never forwarded a client");
}

/// Waits until a publish as `client_id` lands on `want`: a discovery update reaches the data
/// plane shortly after it is logged.
fn wait_routed(hm: &Harbormaster, port: u16, client_id: &str, want: &str) {
    let mut got = String::new();
    let ok = wait_until(WAIT, || {
        got = publish_through(hm, port, client_id);
        got == want
    });
    assert!(ok, "{client_id} went to {got}, not {want}");
}

#[test]
fn a_dns_pool_follows_its_answers() {
    let dns = FakeDns::start();
    let bport = free_port();
    let b2 = Broker::start("127.0.0.2", bport);
    let b3 = Broker::start("127.0.0.3", bport);
    dns.set_addrs("brokers.test", &["127.0.0.3", "127.0.0.2"]);
    let hm = Harbormaster::start(&config(&format!(
        "dns = {{ name = \"brokers.test.\", resolver = \"{}\", interval = \"200ms\", port = {bport} }}",
        dns.resolver()
    )));
    let port = hm.port("mqtt");
    wait_membership(&hm, &b2.addr());
    wait_serving(port);

    // Identities are `IP:port`: routing equals a static pool of the same addresses.
    let reference = Reference::new(&[(&b2.addr(), &b2.addr()), (&b3.addr(), &b3.addr())]);
    let ids: Vec<String> = (0..12).map(|i| format!("dns-dev-{i}")).collect();
    let mut on = std::collections::BTreeMap::<String, Vec<String>>::new();
    for id in &ids {
        let want = reference.first(id);
        assert_eq!(publish_through(&hm, port, id), want, "{id}");
        on.entry(want).or_default().push(id.clone());
    }
    assert_eq!(on.len(), 2, "both brokers get clients: {on:?}");
    for id in &on[&b2.addr()] {
        assert_eq!(b2.connection_count(id), 1, "{id} reached 127.0.0.2");
    }
    for id in &on[&b3.addr()] {
        assert_eq!(b3.connection_count(id), 1, "{id} reached 127.0.0.3");
    }

    // 127.0.0.3 leaves the answer: its clients move to 127.0.0.2, the others stay.
    dns.set_addrs("brokers.test", &["127.0.0.2"]);
    wait_membership(&hm, &format!("removed={}", b3.addr()));
    for id in &on[&b3.addr()] {
        wait_routed(&hm, port, id, &b2.addr());
    }
    for id in &on[&b2.addr()] {
        assert_eq!(publish_through(&hm, port, id), b2.addr(), "{id} stays");
    }

    // The DNS server fails: the last good answer stays in use.
    dns.set_mode(DnsMode::ServFail);
    let q = dns.query_count();
    assert!(wait_until(WAIT, || dns.query_count() >= q + 3));
    for id in ids.iter().take(3) {
        assert_eq!(publish_through(&hm, port, id), b2.addr(), "{id} while DNS fails");
    }
    assert!(hm.log().contains("keeping the last good answer"), "{}", hm.log());

    // 127.0.0.3 is back: exactly its clients return.
    dns.set_addrs("brokers.test", &["127.0.0.2", "127.0.0.3"]);
    dns.set_mode(DnsMode::Answer);
    wait_membership(&hm, &format!("added={}", b3.addr()));
    for id in &on[&b3.addr()] {
        wait_routed(&hm, port, id, &b3.addr());
    }
    for id in &on[&b2.addr()] {
        assert_eq!(publish_through(&hm, port, id), b2.addr(), "{id} stays");
    }
}

fn kubeconfig(dir: &TempDir, server: &str) -> PathBuf {
    let path = dir.path().join("kubeconfig");
    fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: mqtt\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_kubernetes_pool_follows_its_endpoint_slices() {
    let fake = FakeKube::start();
    let bport = free_port();
    let a = Broker::start("127.0.0.2", bport);
    let b = Broker::start("127.0.0.3", bport);
    let ports = [("mqtt", bport)];
    let slice = |eps: &[Ep]| endpoint_slice("hivemq-abc", "hivemq", &ports, eps);
    fake.apply("mqtt", slice(&[Ep::ready("hivemq-0", "127.0.0.2"), Ep::ready("hivemq-1", "127.0.0.3")]));

    let dir = tempfile::Builder::new().prefix("hm-lb-").tempdir().unwrap();
    let kc = kubeconfig(&dir, &fake.url());
    let config_path = dir.path().join("harbormaster.toml");
    fs::write(&config_path, config("kubernetes = { namespace = \"mqtt\", service = \"hivemq\", port = \"mqtt\" }"))
        .unwrap();
    let hm = Harbormaster::start_with_env(dir, config_path, &[("KUBECONFIG", kc.to_str().unwrap())]);
    let port = hm.port("mqtt");
    wait_membership(&hm, "hivemq-1");
    wait_serving(port);

    // Identities are pod names: routing equals a static pool of brokers named so.
    let reference = Reference::new(&[("hivemq-0", &a.addr()), ("hivemq-1", &b.addr())]);
    let ids: Vec<String> = (0..12).map(|i| format!("kube-dev-{i}")).collect();
    let mut on = std::collections::BTreeMap::<String, Vec<String>>::new();
    for id in &ids {
        let want = reference.first(id);
        assert_eq!(publish_through(&hm, port, id), want, "{id}");
        on.entry(want).or_default().push(id.clone());
    }
    assert_eq!(on.len(), 2, "both pods get clients: {on:?}");
    let (on_0, on_1) = (on["hivemq-0"].clone(), on["hivemq-1"].clone());

    // A client of hivemq-1 stays connected through harbormaster while hivemq-1 drains.
    let sub_id = on_1[0].clone();
    let sub = MqttClient::plain(port, MqttVersion::V311).subscribe(&sub_id, "drain/test", 2);
    let suback = format!("Sending SUBACK to {sub_id}\n");
    assert!(wait_until(WAIT, || b.log().contains(&suback)), "the subscriber reached hivemq-1");

    // hivemq-1 terminates (still serving): new clients go elsewhere.
    fake.apply("mqtt", slice(&[Ep::ready("hivemq-0", "127.0.0.2"), Ep::terminating("hivemq-1", "127.0.0.3")]));
    wait_membership(&hm, &format!("hivemq-1={} (draining)", b.addr()));
    for id in &on_1[1..] {
        wait_routed(&hm, port, id, "hivemq-0");
    }
    for id in &on_0 {
        assert_eq!(publish_through(&hm, port, id), "hivemq-0", "{id} stays");
    }
    // ...but the established subscriber still receives what is published on hivemq-1.
    let direct = MqttClient { host: "127.0.0.3".into(), port: bport, version: MqttVersion::V311, tls: None };
    direct.publish_ok("direct-pub-1", "drain/test", "while-draining");
    assert!(sub.wait_for_message("while-draining"), "the draining broker's client lost its connection");

    // hivemq-1 restarts with a new IP under the same name: its clients come back to it.
    let b_new = Broker::start("127.0.0.4", bport);
    fake.apply("mqtt", slice(&[Ep::ready("hivemq-0", "127.0.0.2")]));
    fake.bookmark();
    fake.apply("mqtt", slice(&[Ep::ready("hivemq-0", "127.0.0.2"), Ep::ready("hivemq-1", "127.0.0.4")]));
    wait_membership(&hm, &format!("hivemq-1={}", b_new.addr()));
    for id in &on_1[1..] {
        wait_routed(&hm, port, id, "hivemq-1");
        assert!(b_new.connection_count(id) >= 1, "{id} reached hivemq-1 at its new address");
    }
    for id in &on_0 {
        assert_eq!(publish_through(&hm, port, id), "hivemq-0", "{id} stays");
    }

    // The API server expires the watch: harbormaster lists again and keeps following.
    let lists = fake.list_count();
    fake.expire_watches();
    fake.apply("mqtt", slice(&[Ep::ready("hivemq-1", "127.0.0.4")]));
    wait_membership(&hm, "removed=hivemq-0");
    assert!(fake.list_count() > lists, "listed again after 410 Gone");
    for id in &on_0 {
        wait_routed(&hm, port, id, "hivemq-1");
    }
}

/// The identities `/backends` lists for the pool "brokers".
fn backends_identities(admin: u16) -> Vec<String> {
    let (status, body) = http_get(&addr(admin), "/backends");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pool = v["pools"].as_array().unwrap().iter().find(|p| p["name"] == "brokers").cloned().unwrap();
    pool["brokers"].as_array().unwrap().iter().map(|b| b["identity"].as_str().unwrap().to_string()).collect()
}

/// An API server restart: watches cut, the server away for a few attempts, then every resumed
/// watch answered `410 Gone` ("Expired") because its watch cache starts afresh. A change made
/// meanwhile reaches routing as soon as the server answers again: a 410 means "list again",
/// and the list is made at once rather than after a backoff pause.
#[test]
fn a_kubernetes_pool_catches_up_at_once_after_the_api_server_restarts() {
    let fake = FakeKube::start();
    let bport = free_port();
    let _a = Broker::start("127.0.0.2", bport);
    let b = Broker::start("127.0.0.3", bport);
    let ports = [("mqtt", bport)];
    let slice = |eps: &[Ep]| endpoint_slice("hivemq-abc", "hivemq", &ports, eps);
    fake.apply("mqtt", slice(&[Ep::ready("hivemq-0", "127.0.0.2")]));

    let dir = tempfile::Builder::new().prefix("hm-lb-").tempdir().unwrap();
    let kc = kubeconfig(&dir, &fake.url());
    let config_path = dir.path().join("harbormaster.toml");
    fs::write(
        &config_path,
        format!(
            "{}\n[admin]\nbind = \"127.0.0.1:0\"\n",
            config("kubernetes = { namespace = \"mqtt\", service = \"hivemq\", port = \"mqtt\" }")
        ),
    )
    .unwrap();
    let hm = Harbormaster::start_with_env(dir, config_path, &[("KUBECONFIG", kc.to_str().unwrap())]);
    let (port, admin) = (hm.port("mqtt"), hm.admin_port());
    wait_membership(&hm, "hivemq-0");
    assert!(wait_until(WAIT, || backends_identities(admin) == ["hivemq-0"]), "{:?}", backends_identities(admin));
    assert!(wait_until(WAIT, || fake.open_watches() == 1), "no watch open");

    // The restart; hivemq-1 joins while the server is away.
    fake.restart(3);
    fake.apply("mqtt", slice(&[Ep::ready("hivemq-0", "127.0.0.2"), Ep::ready("hivemq-1", "127.0.0.3")]));

    // The attempts made while the server is away follow kube's backoff (0.8 s doubling, with
    // jitter): the first answer, the 410, comes some 5 to 25 s later.
    assert!(wait_until(Duration::from_secs(90), || !fake.expired().is_empty()), "no resumed watch got 410 Gone");
    let mut joined = None;
    assert!(
        wait_until(Duration::from_secs(90), || {
            joined = Some(Instant::now());
            backends_identities(admin).contains(&"hivemq-1".to_string())
        }),
        "hivemq-1 never reached the routing after the restart:\n{}",
        hm.log()
    );
    assert_eq!(fake.refused(), 3, "the restart refused the attempts it was meant to");
    // The behaviour under test is a duration, so this asserts one, as a generous ceiling: after
    // the 410 a fresh list, a snapshot rebuild and this poll take well under a second here.
    // Pausing for the backoff instead (kube's default after any error) waited at least 6.4 s
    // after this many failed attempts, 13-22 s as measured against a real API server.
    let lag = joined.unwrap().duration_since(fake.expired()[0]);
    eprintln!("hivemq-1 reached the routing {lag:?} after the 410");
    assert!(lag < Duration::from_secs(5), "hivemq-1 reached the routing {lag:?} after the 410:\n{}", hm.log());

    // Clients follow: one that hivemq-1 wins lands there.
    let reference = Reference::new(&[("hivemq-0", "127.0.0.2:1"), ("hivemq-1", "127.0.0.3:1")]);
    let id = (0..64).map(|i| format!("kube-restart-{i}")).find(|id| reference.first(id) == "hivemq-1").unwrap();
    wait_routed(&hm, port, &id, "hivemq-1");
    assert!(b.connection_count(&id) >= 1, "{id} reached hivemq-1");
}
