//! Cost of peeking at a client's first packet: this runs once per accepted connection, on the
//! hot path between TLS handshake and backend selection.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use harbormaster::proxy::mqtt::{peek_connect, Peek};

const MAX_LEN: usize = 64 * 1024;

fn put_bin(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).expect("field fits in u16");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Wraps a CONNECT body in its fixed header (remaining length < 128 here).
fn packet(body: Vec<u8>) -> Vec<u8> {
    let len = u8::try_from(body.len()).expect("short CONNECT");
    assert!(len < 128);
    [vec![0x10, len], body].concat()
}

/// What most device fleets send: 3.1.1, clean session, a ~24-byte client id, credentials.
fn connect_v311() -> Vec<u8> {
    let mut body = Vec::new();
    put_bin(&mut body, b"MQTT");
    body.extend_from_slice(&[4, 0xc2, 0, 60]);
    put_bin(&mut body, b"sensor-7f3a9c21-eu-west1");
    put_bin(&mut body, b"fleet-ingest");
    put_bin(&mut body, b"s3cr3t-t0ken-value");
    packet(body)
}

/// 5.0 with session expiry, receive maximum and one user property.
fn connect_v5() -> Vec<u8> {
    let mut props = vec![0x11, 0, 0, 0x0e, 0x10, 0x21, 0, 100, 0x26];
    put_bin(&mut props, b"region");
    put_bin(&mut props, b"eu-west-1");
    let mut body = Vec::new();
    put_bin(&mut body, b"MQTT");
    body.extend_from_slice(&[5, 0xc2, 0, 60]);
    body.push(u8::try_from(props.len()).expect("short property list"));
    body.extend_from_slice(&props);
    put_bin(&mut body, b"sensor-7f3a9c21-eu-west1");
    put_bin(&mut body, b"fleet-ingest");
    put_bin(&mut body, b"s3cr3t-t0ken-value");
    packet(body)
}

fn bench_peek(c: &mut Criterion) {
    let mut group = c.benchmark_group("peek_connect");
    for (name, bytes) in [("v3.1.1", connect_v311()), ("v5.0_properties", connect_v5())] {
        // Guard against benchmarking an error path.
        assert!(matches!(
            peek_connect(&bytes, MAX_LEN),
            Ok(Peek::Complete { len, .. }) if len == bytes.len()
        ));
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(name, |b| b.iter(|| peek_connect(black_box(&bytes), black_box(MAX_LEN))));
    }
    group.finish();
}

criterion_group!(benches, bench_peek);
criterion_main!(benches);
