//! The config loader on arbitrary text: never panics (every problem is reported, not thrown).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = harbormaster::control::config::load_str(text, std::path::Path::new("/nonexistent"));
        }
    });
}
