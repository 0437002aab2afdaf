//! The CONNECT parser on arbitrary bytes: never panics; a complete CONNECT lies within the
//! buffer and within the size limit, only a 3.x CONNECT can carry the bridge bit, and its
//! client-id and username are valid MQTT UTF-8 strings (well-formed, no U+0000).

// The parser module itself, not the crate: it is pure, and this keeps the instrumented build
// to seconds.
#[allow(dead_code)]
#[path = "../../src/proxy/mqtt.rs"]
mod mqtt;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(mqtt::Peek::Complete { len, connect }) = mqtt::peek_connect(data, 4096) {
            assert!(len <= data.len() && len <= 4096 + 5);
            assert!(!(connect.bridge && connect.version == mqtt::MqttVersion::V5));
            let valid = |s: &[u8]| std::str::from_utf8(s).is_ok_and(|s| !s.contains('\0'));
            assert!(valid(connect.client_id) && connect.username.is_none_or(valid));
        }
    });
}
