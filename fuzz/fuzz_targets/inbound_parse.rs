//! The inbound PROXY v1/v2 parser on arbitrary bytes: never panics; a parsed header lies
//! within the buffer.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(Some(h)) = harbormaster::proxy::inbound::parse(data) {
            assert!(h.len <= data.len());
        }
    });
}
