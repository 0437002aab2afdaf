//! PROXY header encoding cost per connection: v2 with every TLV and a client certificate (the
//! worst case a pool can configure), and v1.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use harbormaster::proxy::identity::{ClientCert, TlsInfo};
use harbormaster::proxy::proxy_header::{encode_v1, encode_v2, HeaderInput, Tlv};

fn bench(c: &mut Criterion) {
    let tls = TlsInfo {
        version: "TLSv1.3",
        cipher: "TLS_AES_128_GCM_SHA256",
        sni: Some("mqtt.broker.example.com".into()),
        alpn: Some(b"mqtt".to_vec()),
        client_cert: Some(ClientCert {
            cn: Some("device-0123456789".into()),
            cn_refused: None,
            issuer_cn: None,
            sha256: [0x5a; 32],
            sig_alg: Some("ecdsa-with-SHA256".into()),
            key_alg: Some("EC256".into()),
        }),
        resumed: false,
    };
    let src: SocketAddr = "[2001:db8::17]:51000".parse().unwrap();
    let dst: SocketAddr = "[2001:db8::1:5]:1883".parse().unwrap();
    let input = HeaderInput {
        src,
        dst,
        tls: Some(&tls),
        unique_id: b"01HZX3K6Q2N8W5T0R7Y9B4C1DE",
        client_id: b"factory-7/line-3/sensor-0042",
    };
    let all = [Tlv::Alpn, Tlv::Authority, Tlv::UniqueId, Tlv::Ssl, Tlv::CertSha256, Tlv::ClientId, Tlv::Crc32c];

    c.bench_function("encode_v2_all_tlvs_client_cert", |b| {
        b.iter(|| encode_v2(black_box(&input), black_box(&all), black_box(500)))
    });
    c.bench_function("encode_v2_budget_107", |b| {
        b.iter(|| encode_v2(black_box(&input), black_box(&all), black_box(107)))
    });
    c.bench_function("encode_v1", |b| b.iter(|| encode_v1(black_box(src), black_box(dst))));
}

criterion_group!(benches, bench);
criterion_main!(benches);
