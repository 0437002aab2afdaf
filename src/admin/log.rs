//! Logging setup: `key=value` text or JSON lines on stderr, and the choice of filter.
//!
//! A JSON line is one object per event with stable top-level names: `ts` (RFC 3339, UTC,
//! microseconds), `level` (lowercase), `target`, `msg`, then every field of the event under
//! its own name (`conn_id`, `client_addr`, `client_id`, `broker`, `close_reason`, ...).
//! Numbers and booleans stay JSON numbers and booleans. Events from libraries that use the
//! `log` crate (rustls) get their `log.target` as `target`. Span fields are not written (the
//! data plane logs flat events).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::control::config::LogFormat;

/// The filter in force and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterChoice {
    pub directive: String,
    /// "--log-level", "HARBORMASTER_LOG", "RUST_LOG" or "config".
    pub source: &'static str,
    /// Environment settings that were set but not valid filters, to warn about once logging
    /// is up.
    pub ignored: Vec<String>,
}

/// Picks the log filter. Precedence, highest first: the `--log-level` flag, then the
/// `HARBORMASTER_LOG` and `RUST_LOG` environment variables, then the config's `[log] level`.
/// An invalid flag is an error; an invalid environment variable is skipped (and reported in
/// `ignored`); empty values count as unset.
pub fn choose_filter(
    flag: Option<&str>,
    harbormaster_log: Option<&str>,
    rust_log: Option<&str>,
    config: &str,
) -> Result<FilterChoice, String> {
    let mut ignored = Vec::new();
    if let Some(f) = flag {
        if EnvFilter::try_new(f).is_err() {
            return Err(format!("--log-level {f:?} is not a valid level or filter"));
        }
        return Ok(FilterChoice { directive: f.to_string(), source: "--log-level", ignored });
    }
    for (name, value) in [("HARBORMASTER_LOG", harbormaster_log), ("RUST_LOG", rust_log)] {
        let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else { continue };
        if EnvFilter::try_new(v).is_ok() {
            return Ok(FilterChoice { directive: v.to_string(), source: name, ignored });
        }
        ignored.push(format!("{name}={v:?} is not a valid filter; ignored"));
    }
    Ok(FilterChoice { directive: config.to_string(), source: "config", ignored })
}

/// Installs the global subscriber: logs go to stderr in `format`, filtered by `directive`
/// (already validated by [`choose_filter`]).
pub fn init(format: LogFormat, directive: &str) {
    let filter = EnvFilter::try_new(directive).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.event_format(JsonLines).try_init(),
    };
}

/// The JSON-lines event format (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        writer.write_str(&json_line(SystemTime::now(), event))?;
        writer.write_char('\n')
    }
}

/// Names the line itself uses; an event field with one of them is written as `field_NAME`.
const RESERVED: [&str; 4] = ["ts", "level", "target", "msg"];

/// One event as a JSON object (no newline).
pub fn json_line(at: SystemTime, event: &Event<'_>) -> String {
    let meta = event.metadata();
    let mut fields = Fields::default();
    event.record(&mut fields);
    let mut out = String::with_capacity(256);
    out.push_str("{\"ts\":");
    push_str(&mut out, &rfc3339(at));
    out.push_str(",\"level\":");
    push_str(&mut out, &meta.level().as_str().to_ascii_lowercase());
    out.push_str(",\"target\":");
    push_str(&mut out, fields.log_target.as_deref().unwrap_or(meta.target()));
    out.push_str(",\"msg\":");
    push_str(&mut out, fields.msg.as_deref().unwrap_or(""));
    for (name, value) in &fields.fields {
        out.push(',');
        push_str(&mut out, name);
        out.push(':');
        out.push_str(&value.to_string());
    }
    out.push('}');
    out
}

fn push_str(out: &mut String, s: &str) {
    out.push_str(&Value::from(s).to_string());
}

#[derive(Default)]
struct Fields {
    msg: Option<String>,
    /// The target of an event that came through the `log` crate.
    log_target: Option<String>,
    fields: Vec<(String, Value)>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        if name == "message" {
            self.msg = Some(match value {
                Value::String(s) => s,
                other => other.to_string(),
            });
        } else if name == "log.target" {
            self.log_target = value.as_str().map(str::to_string);
        } else if name.starts_with("log.") {
            // log.module_path, log.file, log.line: source locations, not facts.
        } else if RESERVED.contains(&name) {
            self.fields.push((format!("field_{name}"), value));
        } else {
            self.fields.push((name.to_string(), value));
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
}

/// RFC 3339 in UTC with microseconds: `2025-11-24T03:10:00.123456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z", s / 3600, s % 3600 / 60, s % 60, d.subsec_micros())
}

/// (year, month, day) of a count of days since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at = |s: u64, us: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(s) + Duration::from_micros(us));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 1), "2000-02-29T00:00:00.000001Z");
        assert_eq!(at(1_700_000_000, 500_000), "2023-11-14T22:13:20.500000Z");
        assert_eq!(at(4_102_444_799, 999_999), "2099-12-31T23:59:59.999999Z");
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn capture(f: impl FnOnce()) -> Vec<serde_json::Map<String, Value>> {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("trace"))
            .event_format(JsonLines)
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| match serde_json::from_str(l) {
                Ok(Value::Object(o)) => o,
                other => panic!("not a JSON object: {l} ({other:?})"),
            })
            .collect()
    }

    #[test]
    fn json_lines_have_stable_top_level_fields() {
        let lines = capture(|| {
            tracing::info!(
                target: "harbormaster::connection",
                conn_id = %"0123-1",
                client_id = "dev \"7\"\n",
                bytes_in = 42u64,
                ok = true,
                duration = ?Duration::from_millis(3),
                msg = "a field named msg",
                "connection closed"
            );
            tracing::warn!(error = %io::Error::other("boom"), "accept failed");
        });
        assert_eq!(lines.len(), 2);
        let l = &lines[0];
        let keys: Vec<&str> = l.keys().map(String::as_str).collect();
        for k in ["ts", "level", "target", "msg", "conn_id", "client_id", "bytes_in", "ok", "duration", "field_msg"] {
            assert!(keys.contains(&k), "{k} missing in {l:?}");
        }
        assert_eq!(l["level"], "info");
        assert_eq!(l["target"], "harbormaster::connection");
        assert_eq!(l["msg"], "connection closed");
        assert_eq!(l["conn_id"], "0123-1");
        assert_eq!(l["client_id"], "dev \"7\"\n");
        assert_eq!(l["bytes_in"], 42);
        assert_eq!(l["ok"], true);
        assert_eq!(l["duration"], "3ms");
        assert_eq!(l["field_msg"], "a field named msg");
        let ts = l["ts"].as_str().unwrap();
        assert!(ts.len() == 27 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
        assert_eq!(lines[1]["level"], "warn");
        assert_eq!(lines[1]["error"], "boom");
    }

    #[test]
    fn filter_precedence_is_flag_then_env_then_config() {
        let c = |flag, hm, rust| choose_filter(flag, hm, rust, "info").unwrap();
        assert_eq!(c(Some("debug"), Some("warn"), Some("error")).source, "--log-level");
        let got = c(None, Some("warn"), Some("error"));
        assert_eq!((got.directive.as_str(), got.source), ("warn", "HARBORMASTER_LOG"));
        let got = c(None, None, Some("harbormaster=debug"));
        assert_eq!((got.directive.as_str(), got.source), ("harbormaster=debug", "RUST_LOG"));
        let got = c(None, Some(""), None);
        assert_eq!((got.directive.as_str(), got.source, got.ignored.len()), ("info", "config", 0));
        let got = c(None, Some("=bogus=["), Some("debug"));
        assert_eq!((got.directive.as_str(), got.source, got.ignored.len()), ("debug", "RUST_LOG", 1));
        assert!(choose_filter(Some("=bogus=["), None, None, "info").is_err());
    }
}
