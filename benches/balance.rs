//! Broker choice: the first `backend_attempts` brokers of a client-id's preference order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use harbormaster::proxy::balance::{Backend, EmptyKey, HashKey, PlannedCloseWill, Pool, ProxyProtocol};

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
        backend_attempts: 3,
        planned_close_will: PlannedCloseWill::Keep,
        close_rate: 100,
        health: None,
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

criterion_group!(benches, choose);
criterion_main!(benches);
