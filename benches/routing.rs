//! Routing rules: the pool a connection's facts pick among tens of `[[listener.route]]` rules,
//! as the route step evaluates them once per connection.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use harbormaster::proxy::routing::{first_match, Conditions, RouteInput, RouteRule};

/// `n` rules of every kind, tenants by SNI, by SNI suffix, by username, by client-id prefix,
/// by certificate issuer and by source network, none of which the benchmark's connection
/// matches until the last: the worst case, every rule evaluated.
fn rules(n: usize) -> Vec<RouteRule> {
    (0..n)
        .map(|i| {
            let when = match i % 6 {
                0 => Conditions { sni: Some(format!("tenant-{i}.mqtt.example.com")), ..Default::default() },
                1 => Conditions { sni_suffix: Some(format!(".region-{i}.example.com")), ..Default::default() },
                2 => Conditions {
                    username: Some(format!("tenant-{i}").into_bytes()),
                    alpn: Some(b"mqtt".to_vec()),
                    ..Default::default()
                },
                3 => Conditions { client_id_prefix: Some(format!("fleet-{i}-").into_bytes()), ..Default::default() },
                4 => Conditions { cert_issuer_cn: Some(format!("Tenant {i} Device CA")), ..Default::default() },
                _ => Conditions {
                    source: vec![format!("10.{i}.0.0/16").parse().unwrap(), format!("fd00:{i}::/32").parse().unwrap()],
                    ..Default::default()
                },
            };
            RouteRule { pool: format!("pool-{i}"), when }
        })
        .collect()
}

fn route(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_rules");
    let input = RouteInput {
        sni: Some("mqtt.example.com"),
        alpn: Some(b"mqtt"),
        cert_cn: Some("vehicle-7f3a9c2e-0042-4b1d"),
        cert_issuer_cn: Some("Fleet Device CA"),
        username: Some(b"vehicle-7f3a9c2e"),
        client_id: b"vehicle-7f3a9c2e-0042-4b1d",
        source: Some("192.0.2.17".parse().unwrap()),
    };
    for n in [10usize, 50, 100] {
        let mut r = rules(n);
        // The last rule matches: every one before it is evaluated.
        r.last_mut().unwrap().when = Conditions { sni_suffix: Some("example.com".into()), ..Default::default() };
        g.bench_with_input(BenchmarkId::new("last_of", n), &r, |b, r| {
            b.iter(|| first_match(r, std::hint::black_box(&input)).map(|(i, _)| i))
        });
    }
    g.finish();
}

criterion_group!(benches, route);
criterion_main!(benches);
