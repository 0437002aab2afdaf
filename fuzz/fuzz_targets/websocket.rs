//! The WebSocket upgrade parser and frame decoder (`src/proxy/websocket.rs`) on arbitrary
//! client bytes: never panic; an accepted request lies within the buffer and its response is
//! a 101; the decoder yields no more bytes than it was given, and the same bytes cut into
//! reads at any place decode to the same stream and the same end.
//!
//! The first input byte chooses: bit 0 — the upgrade parser or the decoder; bits 1–4 — the
//! size of each read the decoder is given (1 up to 16 bytes; 0: all at once).

// The module and the three it uses, not the crate: it needs only tokio, httparse, base64 and
// aws-lc-rs, which keeps the instrumented build small.
#[allow(dead_code)]
#[path = "../../src/proxy/boundary.rs"]
mod boundary;
#[allow(dead_code)]
#[path = "../../src/proxy/prefixed.rs"]
mod prefixed;
#[allow(dead_code)]
#[path = "../../src/proxy/relay.rs"]
mod relay;
#[allow(dead_code)]
#[path = "../../src/proxy/websocket.rs"]
mod websocket;

use websocket::{parse_upgrade, Decoder, WebSocketSpec};

/// Decodes `data` in reads of `step` bytes (all at once for 0): the stream, and how it ended.
fn decode(data: &[u8], step: usize) -> (Vec<u8>, Result<Option<u16>, u16>) {
    let mut d = Decoder::new(1 << 16);
    let mut out = Vec::new();
    let step = if step == 0 { data.len().max(1) } else { step };
    for chunk in data.chunks(step) {
        let mut buf = chunk.to_vec();
        match d.decode(&mut buf) {
            Ok(n) => {
                assert!(n <= buf.len());
                out.extend_from_slice(&buf[..n]);
            }
            Err(e) => return (out, Err(e.code)),
        }
    }
    (out, Ok(d.closed))
}

fn main() {
    let spec = WebSocketSpec { path: "/mqtt".into(), origins: vec!["https://app.example".into()] };
    afl::fuzz!(|data: &[u8]| {
        let Some((&mode, data)) = data.split_first() else { return };
        if mode & 1 == 0 {
            if let Ok(Some(a)) = parse_upgrade(data, &spec) {
                assert!(a.head_len <= data.len());
                assert!(a.response.starts_with(b"HTTP/1.1 101 "));
            }
            return;
        }
        let step = usize::from((mode >> 1) & 0x0f);
        let (whole, end) = decode(data, 0);
        let (cut, cut_end) = decode(data, step);
        assert!(whole.len() <= data.len());
        // An error ends a stream where its frame breaks the rules, whichever read it was in:
        // the bytes before it are the same.
        match (end, cut_end) {
            (Ok(a), Ok(b)) => assert_eq!((a, &whole), (b, &cut)),
            (Err(a), Err(b)) => assert_eq!(a, b),
            (a, b) => panic!("{a:?} vs {b:?}"),
        }
    });
}
