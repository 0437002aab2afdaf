//! Routing rules: the pool a connection's facts pick among tens of `[[listener.route]]` rules,
//! as the route step evaluates them once per connection; and the CONNECT rewrite of a pool's
//! `connect` policy, done once per connection in the first-bytes step.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use harbormaster::proxy::mqtt::MqttVersion;
use harbormaster::proxy::rewrite::{rewrite, Fact, Facts, Policy, Template};
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

/// A 5.0 CONNECT as mosquitto_pub sends it with a username, a password, session expiry and a
/// user property, rewritten with the CN as username, the password dropped and three User
/// Properties added.
fn connect_rewrite(c: &mut Criterion) {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0xC2, 0, 60];
    let props = [0x11, 0, 0, 0x0e, 0x10, 0x26, 0, 4, b'z', b'o', b'n', b'e', 0, 2, b'e', b'u'];
    body.push(props.len() as u8);
    body.extend_from_slice(&props);
    for field in [&b"vehicle-7f3a9c2e-0042-4b1d"[..], b"fleet-user", b"s3cr3t-t0ken"] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field);
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    let policy = Policy {
        username: Some(Template::parse("cert_cn").unwrap()),
        drop_password: true,
        user_properties: vec![Fact::ClientAddress, Fact::CertSha256, Fact::Sni],
    };
    let sha = [0x5a; 32];
    let facts = Facts {
        cert_cn: Some("vehicle-7f3a9c2e"),
        cert_issuer_cn: Some("Fleet Device CA"),
        cert_sha256: Some(&sha),
        sni: Some("mqtt.example.com"),
        alpn: Some(b"mqtt"),
        tls_version: Some("TLSv1.3"),
        client_address: "192.0.2.17:50312".parse().unwrap(),
        client_id: b"vehicle-7f3a9c2e-0042-4b1d",
        username: Some(b"fleet-user"),
    };
    c.bench_function("connect_rewrite/v5.0_cn_drop_3_props", |b| {
        b.iter(|| rewrite(std::hint::black_box(&packet), MqttVersion::V5, &policy, &facts, 1 << 20).unwrap().unwrap())
    });
}

criterion_group!(benches, route, connect_rewrite);
criterion_main!(benches);
