//! Holding new connections for a restarting broker (`on_backend_restart = "hold"`) against
//! real mosquitto brokers: in a rolling restart of three brokers, 300 reconnecting clients
//! each wait for their own broker and go home, so every client is interrupted once, by its
//! own broker's restart, and no client is ever served by another broker; with the default
//! (`"failover"`) clients of the first brokers restarted are moved again when the broker they
//! moved to restarts. A broker left down past `hold_timeout` sends its held clients to their
//! second choice. A Kubernetes pod that terminates, leaves its EndpointSlice and comes back
//! under its name gets its held clients back. Which broker served a client is read from the
//! brokers' own logs (mosquitto names every client-id that connects).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::support::fake_kube::{endpoint_slice, FakeKube, SliceEndpoint as Ep};
use crate::support::mqtt::{self, MqttVersion};
use crate::support::*;

/// Reconnecting MQTT clients on their own runtime: each connects, waits for its CONNACK, holds
/// the connection until the broker side closes it, and connects again at once (a refused or
/// failed attempt after a short pause), as devices do.
struct Fleet {
    /// The clients run on it; dropped with the fleet.
    _rt: tokio::runtime::Runtime,
    stop: CancellationToken,
    /// CONNACKs that accepted, over all clients.
    accepted: Arc<AtomicU64>,
    /// Attempts that got no accepting CONNACK (refused, closed, timed out).
    failed: Arc<AtomicU64>,
}

impl Fleet {
    fn start(port: u16, ids: &[String]) -> Fleet {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let stop = CancellationToken::new();
        let (accepted, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        for id in ids {
            let (id, stop, accepted, failed) = (id.clone(), stop.clone(), accepted.clone(), failed.clone());
            rt.spawn(async move {
                while !stop.is_cancelled() {
                    if session(port, &id, &stop, &accepted).await {
                        continue;
                    }
                    failed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        Fleet { _rt: rt, stop, accepted, failed }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One connection of client `id`: true when it was accepted (and has ended since), false when
/// no accepting CONNACK came.
async fn session(port: u16, id: &str, stop: &CancellationToken, accepted: &AtomicU64) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return false };
    if s.write_all(&mqtt::connect(MqttVersion::V311, id)).await.is_err() {
        return false;
    }
    // A held client waits for its CONNACK like any client; MQTT clients typically give it 30 s.
    let mut ack = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut ack)).await {
        Ok(Ok(_)) if mqtt::connack_accepted(&ack) => {}
        _ => return false,
    }
    accepted.fetch_add(1, Ordering::Relaxed);
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            r = s.read(&mut buf) => if !matches!(r, Ok(n) if n > 0) { return true },
            _ = stop.cancelled() => {
                let _ = s.write_all(&mqtt::disconnect()).await;
                return true;
            }
        }
    }
}

/// Per client-id, how many times it connected to each broker (by name).
type Served = BTreeMap<String, BTreeMap<String, usize>>;

/// [`Served`], from the brokers' logs.
fn served(brokers: &[(&str, &Mosquitto)]) -> Served {
    let mut out = Served::new();
    for (name, m) in brokers {
        for c in m.connections() {
            *out.entry(c.client_id).or_default().entry(name.to_string()).or_default() += 1;
        }
    }
    out
}

/// Three brokers (`m0`, `m1`, `m2`) behind one pool with tcp checks and `pool_extra`, `n`
/// clients connected; then each broker in turn is killed and started again on its port: with
/// `hold`, once the clients it had are all held; without, once they have all reconnected
/// elsewhere. Returns each client's connections per broker, each client's home (where it was
/// served with every broker up) and the metrics text at the end.
fn rolling_restart(n: usize, pool_extra: &str, hold: bool) -> (Served, BTreeMap<String, String>, String) {
    let mut ms = [Mosquitto::start(), Mosquitto::start(), Mosquitto::start()];
    let names = ["m0", "m1", "m2"];
    let health = "health = { check = \"tcp\", interval = \"200ms\", timeout = \"200ms\", rise = 1, fall = 1 }";
    let brokers: Vec<(&str, &Mosquitto)> = names.iter().copied().zip(ms.iter()).collect();
    let hm = Harbormaster::start(&one_pool_config(0, 0, &brokers, &format!("{health}\n{pool_extra}")));
    let admin = hm.admin_addr();
    let metric = |name: &str, labels: &[(&str, &str)]| metric_sum(&admin, name, labels);
    let ids: Vec<String> = (0..n).map(|i| format!("roll-{i:03}")).collect();
    let fleet = Fleet::start(hm.port("mqtt"), &ids);
    assert!(wait_until(WAIT * 2, || fleet.accepted() == n as u64), "{} of {n} connected", fleet.accepted());
    let at_start = served(&brokers);
    assert_eq!(at_start.len(), n, "every client connected once");
    let home: BTreeMap<String, String> =
        at_start.iter().map(|(id, by)| (id.clone(), by.keys().next().unwrap().clone())).collect();
    drop(brokers);
    for (i, name) in names.iter().enumerate() {
        let before = fleet.accepted();
        let victims = metric("harbormaster_broker_connections_active", &[("broker", name)]);
        assert!(victims > 0.0, "{name} has clients");
        ms[i].stop();
        if hold {
            let held = wait_until(WAIT * 2, || metric("harbormaster_connections_held", &[]) == victims);
            assert!(held, "{victims} clients of {name} held: {}", metric("harbormaster_connections_held", &[]));
        } else {
            let moved = wait_until(WAIT * 2, || fleet.accepted() == before + victims as u64);
            assert!(moved, "{victims} clients of {name} reconnected elsewhere");
        }
        ms[i].restart();
        let settled = wait_until(WAIT * 2, || {
            fleet.accepted() == before + victims as u64 && metric("harbormaster_connections_held", &[]) == 0.0
        });
        assert!(
            settled,
            "after {name}'s restart: {} accepted, {before} before, {victims} to reconnect",
            fleet.accepted()
        );
    }
    let brokers: Vec<(&str, &Mosquitto)> = names.iter().copied().zip(ms.iter()).collect();
    let out = served(&brokers);
    let total: usize = out.values().flat_map(|by| by.values()).sum();
    assert_eq!(total as u64, fleet.accepted(), "the brokers logged every accepted connection");
    eprintln!("attempts without an accepting CONNACK: {}", fleet.failed.load(Ordering::Relaxed));
    let metrics = metrics_text(&admin);
    drop(fleet);
    (out, home, metrics)
}

/// With `hold`, each restarting broker's clients wait for it: none is ever served elsewhere,
/// each is interrupted once in the whole rollout, every hold ends at home.
#[test]
fn rolling_restart_with_hold_moves_no_client() {
    let _heavy = heavy();
    let n = 300;
    let (served, home, metrics) = rolling_restart(n, "on_backend_restart = \"hold\"\nhold_timeout = \"20s\"", true);
    for (id, by) in &served {
        assert_eq!(by.keys().collect::<Vec<_>>(), [&home[id]], "{id} was served by {by:?}, home {}", home[id]);
        assert_eq!(by[&home[id]], 2, "{id} interrupted once: {by:?}");
    }
    let holds =
        |outcome| metric_sum_in(&metrics, "harbormaster_holds_total", &[("pool", "brokers"), ("outcome", outcome)]);
    assert_eq!(holds("home"), n as f64, "{metrics}");
    assert_eq!(holds("failover") + holds("over_cap") + holds("closed"), 0.0, "{metrics}");
    assert_eq!(metric_sum_in(&metrics, "harbormaster_failovers_total", &[]), 0.0);
}

/// The default, `failover`: a restarting broker's clients move at once to their second
/// choice, and those whose second choice restarts later are moved again.
#[test]
fn rolling_restart_with_failover_moves_some_clients_twice() {
    let _heavy = heavy();
    let n = 300;
    let (served, home, _) = rolling_restart(n, "", false);
    let moved: Vec<&String> =
        served.iter().filter(|(id, by)| by.keys().any(|b| *b != home[*id])).map(|(id, _)| id).collect();
    assert!(!moved.is_empty(), "some clients moved to another broker");
    let twice = served.values().filter(|by| by.values().sum::<usize>() >= 3).count();
    assert!(twice > 0, "some clients were interrupted twice or more");
}

/// A broker left down: its held clients wait out `hold_timeout`, then fail over to their own
/// second choice; the outcome is counted and on their log lines.
#[test]
fn held_clients_fail_over_once_the_hold_timeout_passes() {
    let mut ms = [Mosquitto::start(), Mosquitto::start(), Mosquitto::start()];
    let names = ["m0", "m1", "m2"];
    let health = "health = { check = \"tcp\", interval = \"200ms\", timeout = \"200ms\", rise = 1, fall = 1 }";
    let extra = format!("{health}\non_backend_restart = \"hold\"\nhold_timeout = \"2s\"");
    let brokers: Vec<(&str, &Mosquitto)> = names.iter().copied().zip(ms.iter()).collect();
    let hm = Harbormaster::start(&one_pool_config(0, 0, &brokers, &extra));
    let ids: Vec<String> = (0..30).map(|i| format!("stay-{i:02}")).collect();
    let fleet = Fleet::start(hm.port("mqtt"), &ids);
    assert!(wait_until(WAIT, || fleet.accepted() == 30));
    let home: BTreeMap<String, String> =
        served(&brokers).into_iter().map(|(id, by)| (id, by.into_keys().next().unwrap())).collect();
    drop(brokers);
    let own: Vec<&String> = home.iter().filter(|(_, h)| *h == "m0").map(|(id, _)| id).collect();
    assert!(!own.is_empty());
    ms[0].stop();
    // Each of m0's clients reconnects, is held, and after hold_timeout is served elsewhere.
    let brokers: Vec<(&str, &Mosquitto)> = names.iter().copied().zip(ms.iter()).collect();
    let moved = wait_until(WAIT * 2, || {
        let s = served(&brokers);
        own.iter().all(|id| s[*id].keys().any(|b| b != "m0"))
    });
    assert!(moved, "m0's clients failed over: {:?}", served(&brokers));
    let admin = hm.admin_addr();
    let holds = |outcome| metric_sum(&admin, "harbormaster_holds_total", &[("pool", "brokers"), ("outcome", outcome)]);
    assert!(holds("failover") >= 1.0, "{}", metrics_text(&admin));
    assert_eq!(holds("home"), 0.0);
    assert_eq!(holds("over_cap") + holds("closed"), 0.0);
    // A connection's line is written when it ends.
    drop(fleet);
    let line = hm.wait_connection_log("hold_outcome", "failover").expect("a log line of a held client");
    assert!(line["held_ms"].parse::<u64>().is_ok(), "{line:?}");
    assert!(own.iter().any(|id| line["client_id"] == **id), "{line:?}");
}

/// A StatefulSet pod restart seen through EndpointSlices: the pod terminates, its broker stops,
/// it leaves the slice (a departed member, kept for `hold_timeout`), then starts again and is
/// listed ready under the same name. Its clients wait in harbormaster throughout and go home.
#[test]
fn a_pod_that_leaves_its_endpoint_slice_and_returns_gets_its_held_clients_back() {
    let fake = FakeKube::start();
    let mut ms = [Mosquitto::start(), Mosquitto::start()];
    let names = ["hivemq-0", "hivemq-1"];
    // One slice per pod, so each broker keeps its own port on 127.0.0.1.
    let ports = [ms[0].port, ms[1].port];
    let slice = |i: usize, eps: &[Ep]| endpoint_slice(&format!("hivemq-{i}"), "hivemq", &[("mqtt", ports[i])], eps);
    fake.apply("mqtt", slice(0, &[Ep::ready(names[0], "127.0.0.1")]));
    fake.apply("mqtt", slice(1, &[Ep::ready(names[1], "127.0.0.1")]));
    let dir = tempfile::Builder::new().prefix("hm-lb-").tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: mqtt\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            fake.url()
        ),
    )
    .unwrap();
    let config_path = dir.path().join("harbormaster.toml");
    let config = "[[listener]]\nname = \"mqtt\"\nbind = \"127.0.0.1:0\"\npool = \"brokers\"\n\n\
        [pool.brokers]\nkubernetes = { namespace = \"mqtt\", service = \"hivemq\", port = \"mqtt\" }\n\
        on_backend_restart = \"hold\"\nhold_timeout = \"20s\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n";
    std::fs::write(&config_path, config).unwrap();
    let hm = Harbormaster::start_with_env(dir, config_path, &[("KUBECONFIG", kubeconfig.to_str().unwrap())]);
    let admin = hm.admin_addr();
    let metric = |name: &str, labels: &[(&str, &str)]| metric_sum(&admin, name, labels);

    let n = 40;
    let ids: Vec<String> = (0..n).map(|i| format!("pod-dev-{i:02}")).collect();
    let fleet = Fleet::start(hm.port("mqtt"), &ids);
    assert!(wait_until(WAIT, || fleet.accepted() == n as u64), "{} of {n} connected", fleet.accepted());
    let brokers: Vec<(&str, &Mosquitto)> = names.iter().copied().zip(ms.iter()).collect();
    let home: BTreeMap<String, String> =
        served(&brokers).into_iter().map(|(id, by)| (id, by.into_keys().next().unwrap())).collect();
    drop(brokers);
    let victims = home.values().filter(|h| *h == names[1]).count();
    assert!(victims > 0 && victims < n, "both pods have clients: {home:?}");

    // Terminating, then gone from the slice, then stopped: its clients reconnect after it left
    // the pool, and are held for the departed pod.
    for eps in [vec![Ep::terminating(names[1], "127.0.0.1")], vec![]] {
        let updates = metric("harbormaster_discovery_updates_total", &[]);
        fake.apply("mqtt", slice(1, &eps));
        assert!(wait_until(WAIT, || metric("harbormaster_discovery_updates_total", &[]) > updates));
    }
    ms[1].stop();
    let held = wait_until(WAIT, || metric("harbormaster_connections_held", &[]) == victims as f64);
    assert!(held, "{victims} clients of {} held: {}", names[1], metric("harbormaster_connections_held", &[]));
    assert_eq!(metric("harbormaster_holds_total", &[]), 0.0, "no hold has ended");

    // Back, ready, under its name: its clients go home.
    ms[1].restart();
    fake.apply("mqtt", slice(1, &[Ep::ready(names[1], "127.0.0.1")]));
    let settled = wait_until(WAIT, || {
        fleet.accepted() == (n + victims) as u64 && metric("harbormaster_connections_held", &[]) == 0.0
    });
    assert!(settled, "{} accepted, {victims} to come back", fleet.accepted());
    let brokers: Vec<(&str, &Mosquitto)> = names.iter().copied().zip(ms.iter()).collect();
    for (id, by) in served(&brokers) {
        assert_eq!(by.keys().collect::<Vec<_>>(), [&home[&id]], "{id} was served by {by:?}");
    }
    assert_eq!(metric("harbormaster_holds_total", &[("outcome", "home")]), victims as f64);
    assert_eq!(metric("harbormaster_failovers_total", &[]), 0.0);
    drop(fleet);
}
