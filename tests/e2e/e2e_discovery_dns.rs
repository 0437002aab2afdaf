//! DNS discovery against a DNS server the test controls (tests/e2e/support/fake_dns.rs, UDP on an
//! ephemeral loopback port): members follow A/AAAA and SRV answers, sorted, deduplicated and
//! named `IP:port`; the last good answer stays while the server fails (SERVFAIL, NXDOMAIN,
//! silence); failures never make discovery ask faster than its interval.

use std::time::{Duration, Instant};

use crate::support::fake_dns::{DnsMode, FakeDns};
use harbormaster::control::discovery::{self, Discovery, DiscoverySpec, Members};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const INTERVAL: Duration = Duration::from_millis(200);
const WAIT: Duration = Duration::from_secs(30);

fn start(dns: &FakeDns, name: &str, port: Option<u16>, stop: &CancellationToken) -> Discovery {
    let spec = DiscoverySpec::Dns { name: name.into(), port, interval: INTERVAL, resolver: Some(dns.addr) };
    discovery::start("brokers", &spec, stop.clone())
}

fn names(m: &Option<Members>) -> Option<Vec<String>> {
    m.as_ref().map(|m| m.iter().map(|m| m.name.clone()).collect())
}

/// Waits until the published members are named `want`; returns them.
async fn wait_for(rx: &mut watch::Receiver<Option<Members>>, want: &[&str]) -> Members {
    let deadline = Instant::now() + WAIT;
    loop {
        {
            let now = rx.borrow_and_update();
            if names(&now).is_some_and(|n| n == want) {
                return now.clone().unwrap();
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, rx.changed()).await.is_err() {
            panic!("members never became {want:?}; last: {:?}", names(&rx.borrow()));
        }
    }
}

/// Waits until the server has seen `n` more queries than `from`.
async fn wait_queries(dns: &FakeDns, from: usize, n: usize) {
    let deadline = Instant::now() + WAIT;
    while dns.query_count() < from + n {
        assert!(Instant::now() < deadline, "only {} of {n} more queries arrived", dns.query_count() - from);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_are_followed_sorted_and_deduplicated() {
    let dns = FakeDns::start();
    dns.set_addrs("brokers.test", &["127.0.0.3", "127.0.0.2", "127.0.0.3"]);
    let stop = CancellationToken::new();
    let mut d = start(&dns, "brokers.test.", Some(1883), &stop);
    let m = wait_for(&mut d.rx, &["127.0.0.2:1883", "127.0.0.3:1883"]).await;
    assert_eq!(m[0].addr, "127.0.0.2:1883".parse().unwrap());
    assert!(m.iter().all(|m| !m.draining));

    dns.set_addrs("brokers.test", &["127.0.0.4", "127.0.0.2"]);
    wait_for(&mut d.rx, &["127.0.0.2:1883", "127.0.0.4:1883"]).await;
    dns.set_addrs("brokers.test", &["127.0.0.4"]);
    wait_for(&mut d.rx, &["127.0.0.4:1883"]).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aaaa_records_when_there_are_no_a_records() {
    let dns = FakeDns::start();
    dns.set_addrs("v6.brokers.test", &["::2", "::1"]);
    let stop = CancellationToken::new();
    let mut d = start(&dns, "v6.brokers.test.", Some(8883), &stop);
    wait_for(&mut d.rx, &["[::1]:8883", "[::2]:8883"]).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_the_targets_addresses_and_the_srv_ports() {
    let dns = FakeDns::start();
    dns.set_srv("_mqtt._tcp.brokers.test", &[("b0.brokers.test.", 1883), ("b1.brokers.test.", 1884)]);
    dns.set_addrs("b0.brokers.test", &["127.0.0.2"]);
    dns.set_addrs("b1.brokers.test", &["127.0.0.3"]);
    let stop = CancellationToken::new();
    let mut d = start(&dns, "_mqtt._tcp.brokers.test.", None, &stop);
    wait_for(&mut d.rx, &["127.0.0.2:1883", "127.0.0.3:1884"]).await;

    // A new target, and one target moved to another address.
    dns.set_srv(
        "_mqtt._tcp.brokers.test",
        &[("b0.brokers.test.", 1883), ("b1.brokers.test.", 1884), ("b2.brokers.test.", 1883)],
    );
    dns.set_addrs("b2.brokers.test", &["127.0.0.4"]);
    dns.set_addrs("b1.brokers.test", &["127.0.0.5"]);
    wait_for(&mut d.rx, &["127.0.0.2:1883", "127.0.0.4:1883", "127.0.0.5:1884"]).await;

    // A target without addresses is left out; the others stay.
    dns.set_addrs("b2.brokers.test", &[]);
    wait_for(&mut d.rx, &["127.0.0.2:1883", "127.0.0.5:1884"]).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_good_answer_stays_while_the_server_fails() {
    let dns = FakeDns::start();
    dns.set_addrs("brokers.test", &["127.0.0.2", "127.0.0.3"]);
    let stop = CancellationToken::new();
    let mut d = start(&dns, "brokers.test.", Some(1883), &stop);
    let good = wait_for(&mut d.rx, &["127.0.0.2:1883", "127.0.0.3:1883"]).await;

    for what in ["SERVFAIL", "NXDOMAIN", "no answer"] {
        match what {
            "SERVFAIL" => dns.set_mode(DnsMode::ServFail),
            "NXDOMAIN" => dns.remove("brokers.test"),
            _ => dns.set_mode(DnsMode::Silent),
        }
        let q = dns.query_count();
        // Several rounds fail...
        wait_queries(&dns, q, 3).await;
        assert!(!d.rx.has_changed().unwrap(), "{what}: something was published");
        assert_eq!(d.rx.borrow().as_ref().unwrap(), &good, "{what}: the last good answer must stay");
        // ...and the next good answer is followed.
        dns.set_mode(DnsMode::Answer);
        dns.set_addrs("brokers.test", &["127.0.0.2", "127.0.0.3"]);
        wait_queries(&dns, dns.query_count(), 2).await;
        assert_eq!(d.rx.borrow().as_ref().unwrap(), &good);
    }
    dns.set_addrs("brokers.test", &["127.0.0.9"]);
    wait_for(&mut d.rx, &["127.0.0.9:1883"]).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_published_until_a_first_answer() {
    let dns = FakeDns::start();
    dns.set_mode(DnsMode::ServFail);
    let stop = CancellationToken::new();
    let mut d = start(&dns, "brokers.test.", Some(1883), &stop);
    wait_queries(&dns, 0, 3).await;
    assert!(d.rx.borrow().is_none(), "no answer yet: None");
    dns.set_addrs("brokers.test", &["127.0.0.2"]);
    dns.set_mode(DnsMode::Answer);
    wait_for(&mut d.rx, &["127.0.0.2:1883"]).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_never_make_it_ask_faster_than_the_interval() {
    let dns = FakeDns::start();
    dns.set_addrs("brokers.test", &["127.0.0.2"]);
    let stop = CancellationToken::new();
    let mut d = start(&dns, "brokers.test.", Some(1883), &stop);
    wait_for(&mut d.rx, &["127.0.0.2:1883"]).await;

    dns.set_mode(DnsMode::ServFail);
    let (q0, t0) = (dns.query_count(), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (queries, rounds) = (dns.query_count() - q0, t0.elapsed().as_secs_f64() / INTERVAL.as_secs_f64());
    // A failed round asks for A, then AAAA, each at most twice: an upper bound only, so a
    // slow machine can never fail it.
    assert!(
        queries as f64 <= 4.0 * (rounds + 1.0),
        "{queries} queries in {rounds:.1} intervals: {:?}",
        &dns.queries()[q0..]
    );
    assert!(queries >= 1, "lookups go on while failing");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_the_lookups() {
    let dns = FakeDns::start();
    dns.set_addrs("brokers.test", &["127.0.0.2"]);
    let stop = CancellationToken::new();
    let mut d = start(&dns, "brokers.test.", Some(1883), &stop);
    wait_for(&mut d.rx, &["127.0.0.2:1883"]).await;
    stop.cancel();
    tokio::time::sleep(INTERVAL * 2).await;
    let q = dns.query_count();
    tokio::time::sleep(INTERVAL * 5).await;
    assert_eq!(dns.query_count(), q, "no lookups after cancel");
    // The sender is gone with the task.
    assert!(d.rx.changed().await.is_err());
}
