//! Broker choice: the first `backend_attempts` brokers of a client-id's preference order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use harbormaster::proxy::balance::{Backend, EmptyKey, HashKey, PlannedCloseWill, Pool, ProxyProtocol, Rebalance};

fn pool(n: usize) -> Pool {
    Pool {
        name: "bench".into(),
        connect: Default::default(),
        backends: (0..n)
            .map(|i| {
                let name = format!("hivemq-{i}.hivemq.mqtt.svc.cluster.local:1883");
                Arc::new(Backend::new(name, SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8], 1883))))
            })
            .collect(),
        hash_key: HashKey::ClientId,
        empty_key: EmptyKey::LeastConnections,
        proxy_protocol: ProxyProtocol::V2,
        tlvs: vec![],
        max_header_bytes: 500,
        backend_connect_timeout: Duration::from_secs(2),
        backend_connack_timeout: Duration::from_secs(10),
        backend_max_packet_size: None,
        backend_attempts: 3,
        planned_close_will: PlannedCloseWill::Keep,
        close_rate: 100,
        rebalance: Rebalance::Off,
        rebalance_rate: 20,
        health: None,
        hold: None,
        backend_transport: Default::default(),
    }
}

fn choose(c: &mut Criterion) {
    let mut g = c.benchmark_group("broker_choice");
    for n in [3usize, 10, 100] {
        let p = pool(n);
        let key = b"vehicle-7f3a9c2e-0042-4b1d";
        g.bench_with_input(BenchmarkId::new("top3", n), &p, |b, p| {
            b.iter(|| p.preference(std::hint::black_box(key), 3).len())
        });
        g.bench_with_input(BenchmarkId::new("top1", n), &p, |b, p| {
            b.iter(|| p.preference(std::hint::black_box(key), 1).len())
        });
    }
    g.finish();
}

/// The rebalancer's survey of one tick: 100,000 connections routed by a key, each scored
/// against every broker of its pool, a third of them away from home.
fn survey(c: &mut Criterion) {
    use harbormaster::control::rebalance;
    use harbormaster::proxy::balance::key_hash;
    use harbormaster::proxy::registry::Registry;

    let mut g = c.benchmark_group("rebalance_survey");
    g.sample_size(10);
    for n in [3usize, 10] {
        let p = Arc::new(pool(n));
        let conns = Arc::new(Registry::new(Default::default()));
        let regs: Vec<_> = (0..100_000)
            .map(|i| {
                let reg = conns.register();
                let h = key_hash(format!("vehicle-{i:08}").as_bytes());
                let on = if i % 3 == 0 { &p.backends[i % n] } else { p.home(h).unwrap() };
                reg.set_backend(&on.state, Some(h));
                reg
            })
            .collect();
        let pools = vec![p.clone()];
        g.bench_function(BenchmarkId::new("100k_connections", n), |b| {
            b.iter(|| rebalance::survey(&pools, &conns.routed_by_key())[0].away.len())
        });
        drop(regs);
    }
    g.finish();
}

criterion_group!(benches, choose, survey);
criterion_main!(benches);
