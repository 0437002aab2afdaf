//! Kubernetes discovery against a fake API server (tests/e2e/support/fake_kube.rs): a kube
//! `Client` over plain HTTP on an ephemeral loopback port, the real watcher + reflector. Pods
//! become ready, not ready, terminating, removed; a pod's IP changes under the same name;
//! slices split and merge; BOOKMARKs, a watch that ends, and `410 Gone` (which makes the
//! watcher list again) — the published members are checked at every step.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::fake_kube::{endpoint_slice, FakeKube, SliceEndpoint as Ep};
use harbormaster::control::discovery::kubernetes::start_with_client;
use harbormaster::control::discovery::{Discovery, Members};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const NS: &str = "mqtt";
const SERVICE: &str = "hivemq";
const PORTS: &[(&str, u16)] = &[("mqtt", 1883), ("metrics", 9399)];

fn client(fake: &FakeKube) -> kube::Client {
    let config = kube::Config::new(fake.url().parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

/// `name@ip:port`, with ` (draining)` for a draining member.
fn show(m: &Option<Members>) -> Option<Vec<String>> {
    m.as_ref().map(|m| {
        m.iter().map(|m| format!("{}@{}{}", m.name, m.addr, if m.draining { " (draining)" } else { "" })).collect()
    })
}

async fn wait_for(rx: &mut watch::Receiver<Option<Members>>, want: &[&str]) {
    let deadline = Instant::now() + WAIT;
    loop {
        if show(&rx.borrow_and_update()).is_some_and(|n| n == want) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, rx.changed()).await.is_err() {
            panic!("members never became {want:?}; last: {:?}", show(&rx.borrow()));
        }
    }
}

/// Records every published member set, for checks of what was never published.
fn record(d: &Discovery) -> Arc<Mutex<Vec<Vec<String>>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (mut rx, s) = (d.rx.clone(), seen.clone());
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            if let Some(m) = show(&rx.borrow_and_update()) {
                s.lock().unwrap().push(m);
            }
        }
    });
    seen
}

/// Waits until the recorder's latest entry is `now`; returns how many entries it has.
async fn recorded_up_to(seen: &Mutex<Vec<Vec<String>>>, now: &[&str]) -> usize {
    eventually("the recorder caught up", || seen.lock().unwrap().last().is_some_and(|l| l == now)).await;
    seen.lock().unwrap().len()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn slice(name: &str, eps: &[Ep]) -> serde_json::Value {
    endpoint_slice(name, SERVICE, PORTS, eps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slices_are_followed_through_every_change() {
    let fake = FakeKube::start();
    fake.apply(NS, slice("hivemq-a", &[Ep::ready("hivemq-0", "10.0.0.10"), Ep::not_ready("hivemq-1", "10.0.0.11")]));
    // Another Service in the namespace, and the same Service name in another namespace.
    fake.apply(NS, endpoint_slice("other-a", "other", PORTS, &[Ep::ready("other-0", "10.0.9.9")]));
    fake.apply("default", slice("hivemq-x", &[Ep::ready("hivemq-x-0", "10.0.8.8")]));
    let listed_rv = fake.resource_version();

    let stop = CancellationToken::new();
    let mut d = start_with_client(client(&fake), "brokers", NS, SERVICE, "mqtt", stop.clone());
    let seen = record(&d);

    // Initial list: only the ready pod of this Service.
    wait_for(&mut d.rx, &["hivemq-0@10.0.0.10:1883"]).await;
    eventually("a watch is open", || fake.open_watches() == 1).await;
    let reqs = fake.requests();
    assert!(!reqs[0].watch && reqs[0].namespace == NS, "{reqs:#?}");
    assert_eq!(reqs[0].query.get("labelSelector").map(String::as_str), Some("kubernetes.io/service-name=hivemq"));
    let w = reqs.iter().find(|r| r.watch).expect("a watch request");
    assert_eq!(w.query.get("resourceVersion"), Some(&listed_rv.to_string()), "watch from the list's version");
    assert_eq!(w.query.get("labelSelector").map(String::as_str), Some("kubernetes.io/service-name=hivemq"));
    assert_eq!(w.query.get("allowWatchBookmarks").map(String::as_str), Some("true"));

    // Ready.
    fake.apply(NS, slice("hivemq-a", &[Ep::ready("hivemq-0", "10.0.0.10"), Ep::ready("hivemq-1", "10.0.0.11")]));
    wait_for(&mut d.rx, &["hivemq-0@10.0.0.10:1883", "hivemq-1@10.0.0.11:1883"]).await;

    // Bookmarks change nothing; then not ready.
    fake.bookmark();
    fake.apply(NS, slice("hivemq-a", &[Ep::ready("hivemq-0", "10.0.0.10"), Ep::not_ready("hivemq-1", "10.0.0.11")]));
    wait_for(&mut d.rx, &["hivemq-0@10.0.0.10:1883"]).await;
    fake.apply(NS, slice("hivemq-a", &[Ep::ready("hivemq-0", "10.0.0.10"), Ep::ready("hivemq-1", "10.0.0.11")]));
    wait_for(&mut d.rx, &["hivemq-0@10.0.0.10:1883", "hivemq-1@10.0.0.11:1883"]).await;

    // Terminating (still serving): draining.
    fake.apply(NS, slice("hivemq-a", &[Ep::terminating("hivemq-0", "10.0.0.10"), Ep::ready("hivemq-1", "10.0.0.11")]));
    wait_for(&mut d.rx, &["hivemq-0@10.0.0.10:1883 (draining)", "hivemq-1@10.0.0.11:1883"]).await;

    // Removed.
    fake.apply(NS, slice("hivemq-a", &[Ep::ready("hivemq-1", "10.0.0.11")]));
    wait_for(&mut d.rx, &["hivemq-1@10.0.0.11:1883"]).await;

    // The StatefulSet pod comes back under its name with a new IP.
    fake.apply(NS, slice("hivemq-a", &[Ep::not_ready("hivemq-0", "10.0.0.20"), Ep::ready("hivemq-1", "10.0.0.11")]));
    fake.bookmark();
    fake.apply(NS, slice("hivemq-a", &[Ep::ready("hivemq-0", "10.0.0.20"), Ep::ready("hivemq-1", "10.0.0.11")]));
    wait_for(&mut d.rx, &["hivemq-0@10.0.0.20:1883", "hivemq-1@10.0.0.11:1883"]).await;

    // Split: a second slice with a new pod.
    fake.apply(NS, slice("hivemq-b", &[Ep::ready("hivemq-2", "10.0.0.12")]));
    let three = ["hivemq-0@10.0.0.20:1883", "hivemq-1@10.0.0.11:1883", "hivemq-2@10.0.0.12:1883"];
    wait_for(&mut d.rx, &three).await;

    // hivemq-1 moves from slice a to slice b: listed twice for a while, never missing.
    let mark = recorded_up_to(&seen, &three).await;
    fake.apply(NS, slice("hivemq-b", &[Ep::ready("hivemq-1", "10.0.0.11"), Ep::ready("hivemq-2", "10.0.0.12")]));
    fake.apply(NS, slice("hivemq-a", &[Ep::ready("hivemq-0", "10.0.0.20")]));
    fake.apply(
        NS,
        slice(
            "hivemq-b",
            &[
                Ep::ready("hivemq-1", "10.0.0.11"),
                Ep::ready("hivemq-2", "10.0.0.12"),
                Ep::ready("hivemq-3", "10.0.0.13"),
            ],
        ),
    );
    let four =
        ["hivemq-0@10.0.0.20:1883", "hivemq-1@10.0.0.11:1883", "hivemq-2@10.0.0.12:1883", "hivemq-3@10.0.0.13:1883"];
    wait_for(&mut d.rx, &four).await;
    eventually("the recorder saw it", || seen.lock().unwrap().len() > mark).await;
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen[mark..], [four.map(String::from).to_vec()], "the move itself published nothing");
    }

    // Merge: everything back into slice a, slice b deleted.
    let mark = recorded_up_to(&seen, &four).await;
    fake.apply(
        NS,
        slice(
            "hivemq-a",
            &[
                Ep::ready("hivemq-0", "10.0.0.20"),
                Ep::ready("hivemq-1", "10.0.0.11"),
                Ep::ready("hivemq-2", "10.0.0.12"),
                Ep::ready("hivemq-3", "10.0.0.13"),
            ],
        ),
    );
    fake.delete(NS, "hivemq-b");
    fake.apply(NS, slice("hivemq-c", &[Ep::not_ready("hivemq-4", "10.0.0.14")]));
    fake.apply(NS, slice("hivemq-c", &[Ep::ready("hivemq-4", "10.0.0.14")]));
    let five = [&four[..], &["hivemq-4@10.0.0.14:1883"]].concat();
    wait_for(&mut d.rx, &five).await;
    eventually("the recorder saw it", || seen.lock().unwrap().len() > mark).await;
    assert_eq!(seen.lock().unwrap()[mark..], [five.iter().map(|s| s.to_string()).collect::<Vec<_>>()]);

    // A watch that ends normally is resumed from its resourceVersion: no new list, and a
    // change made meanwhile arrives from history.
    let lists = fake.list_count();
    fake.end_watches();
    fake.delete(NS, "hivemq-c");
    wait_for(&mut d.rx, &four).await;
    eventually("the watch is resumed", || fake.open_watches() == 1).await;
    assert_eq!(fake.list_count(), lists, "resuming needs no list");

    // 410 Gone on the open watch: the watcher lists again, and sees what changed meanwhile.
    fake.expire_watches();
    fake.delete(NS, "hivemq-a");
    fake.apply(NS, slice("hivemq-d", &[Ep::ready("hivemq-0", "10.0.0.20"), Ep::ready("hivemq-5", "10.0.0.15")]));
    wait_for(&mut d.rx, &["hivemq-0@10.0.0.20:1883", "hivemq-5@10.0.0.15:1883"]).await;
    eventually("listed again after 410", || fake.list_count() > lists).await;

    // A resumed watch from a compacted version gets 410 too, and lists again.
    eventually("the watch is open again", || fake.open_watches() == 1).await;
    let lists = fake.list_count();
    fake.compact();
    fake.end_watches();
    fake.apply(NS, slice("hivemq-d", &[Ep::ready("hivemq-5", "10.0.0.15")]));
    wait_for(&mut d.rx, &["hivemq-5@10.0.0.15:1883"]).await;
    eventually("listed again after a compacted resume", || fake.list_count() > lists).await;

    // Every slice gone: an empty pool, published as such.
    fake.delete(NS, "hivemq-d");
    wait_for(&mut d.rx, &[]).await;

    // Cancel: the watch is closed.
    stop.cancel();
    eventually("the watch is closed", || fake.open_watches() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_is_found_by_number_and_a_missing_one_leaves_the_slice_out() {
    let fake = FakeKube::start();
    fake.apply(NS, slice("hivemq-a", &[Ep::ready("hivemq-0", "10.0.0.10")]));
    fake.apply(NS, endpoint_slice("hivemq-b", SERVICE, &[("http", 8080)], &[Ep::ready("hivemq-1", "10.0.0.11")]));
    let stop = CancellationToken::new();
    let mut by_number = start_with_client(client(&fake), "n", NS, SERVICE, "9399", stop.clone());
    let mut by_name = start_with_client(client(&fake), "m", NS, SERVICE, "mqtt", stop.clone());
    wait_for(&mut by_number.rx, &["hivemq-0@10.0.0.10:9399"]).await;
    wait_for(&mut by_name.rx, &["hivemq-0@10.0.0.10:1883"]).await;
    // The slice gets the port: its endpoint joins.
    fake.apply(NS, slice("hivemq-b", &[Ep::ready("hivemq-1", "10.0.0.11")]));
    wait_for(&mut by_name.rx, &["hivemq-0@10.0.0.10:1883", "hivemq-1@10.0.0.11:1883"]).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_without_a_pod_are_named_by_address() {
    let fake = FakeKube::start();
    let no_pod = Ep { pod: None, ..Ep::ready("x", "10.0.0.30") };
    fake.apply(NS, slice("hivemq-a", &[no_pod, Ep::ready("hivemq-0", "10.0.0.10")]));
    let stop = CancellationToken::new();
    let mut d = start_with_client(client(&fake), "brokers", NS, SERVICE, "mqtt", stop.clone());
    wait_for(&mut d.rx, &["10.0.0.30:1883@10.0.0.30:1883", "hivemq-0@10.0.0.10:1883"]).await;
    stop.cancel();
}

/// The real client's TLS stack (rustls with aws-lc-rs, no ring) builds and fails cleanly
/// against an https URL where nothing listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_client_builds_on_aws_lc_rs() {
    let port = support::free_port();
    let config = kube::Config::new(format!("https://127.0.0.1:{port}").parse().unwrap());
    let client = kube::Client::try_from(config).expect("TLS client");
    let api: kube::Api<k8s_openapi::api::discovery::v1::EndpointSlice> = kube::Api::namespaced(client, NS);
    let err = api.list(&Default::default()).await.expect_err("nothing listens there");
    assert!(format!("{err:?}").to_lowercase().contains("connect"), "{err:?}");
}
