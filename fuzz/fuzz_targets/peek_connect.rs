//! The CONNECT parser on arbitrary bytes: never panics; a complete CONNECT lies within the
//! buffer and within the size limit.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(harbormaster::proxy::mqtt::Peek::Complete { len, .. }) =
            harbormaster::proxy::mqtt::peek_connect(data, 4096)
        {
            assert!(len <= data.len() && len <= 4096 + 5);
        }
    });
}
