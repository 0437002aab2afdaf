//! The inbound PROXY v1/v2 parser on arbitrary bytes: never panics; a parsed header lies
//! within the buffer.

// The parser module itself, not the crate: it is pure, and this keeps the instrumented build
// to seconds.
#[allow(dead_code)]
#[path = "../../src/proxy/inbound.rs"]
mod inbound;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(Some(h)) = inbound::parse(data) {
            assert!(h.len <= data.len());
        }
    });
}
