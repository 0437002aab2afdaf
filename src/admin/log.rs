//! Logging setup: `key=value` text or JSON lines on stderr, the choice of filter, and the
//! writer between the two.
//!
//! No thread of the process ever waits for stderr. Each event is formatted on the thread that
//! logs it and handed, whole, to a bounded in-memory queue; one thread of its own writes the
//! queue to stderr, a line per `write`. When stderr is slow or not read at all (a pipe whose
//! reader stalled), the queue fills and further lines are dropped and counted
//! ([`dropped_lines`], exported as `harbormaster_log_lines_dropped_total`) rather than
//! stopping the runtime's workers. Dropping the [`Flush`] guard that [`init`] returns writes
//! what is queued, waiting at most [`FLUSH_TIMEOUT`] for the sink.
//!
//! A JSON line is one object per event with stable top-level names: `ts` (RFC 3339, UTC,
//! microseconds), `level` (lowercase), `target`, `msg`, then every field of the event under
//! its own name (`conn_id`, `client_addr`, `client_id`, `broker`, `close_reason`, ...).
//! Numbers and booleans stay JSON numbers and booleans. Events from libraries that use the
//! `log` crate (rustls) get their `log.target` as `target`. Span fields are not written (the
//! data plane logs flat events).

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
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

/// Bytes of formatted lines waiting for stderr at most; beyond it lines are dropped. About
/// 2,500 JSON connection lines: a burst rides out a short stall of the sink, and a sink slower
/// than the log rate loses lines instead of slowing connections down.
pub const QUEUE_BYTES: usize = 1 << 20;
/// How long dropping the [`Flush`] guard waits for the queue to reach the sink. A sink that
/// takes longer (a reader that stopped reading) costs the rest of the queue, not a hung exit.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The drop counter of the installed writer, read by the metrics at scrape time.
static INSTALLED: OnceLock<Arc<AtomicU64>> = OnceLock::new();

/// Log lines dropped so far because the queue to stderr was full (or stderr failed).
pub fn dropped_lines() -> u64 {
    INSTALLED.get().map_or(0, |d| d.load(Ordering::Relaxed))
}

/// Installs the global subscriber: logs go to stderr, through the non-blocking queue, in
/// `format`, filtered by `directive` (already validated by [`choose_filter`]). Keep the
/// returned guard until the end of `main`: dropping it flushes the queue.
pub fn init(format: LogFormat, directive: &str) -> Flush {
    let (writer, flush) = non_blocking(io::stderr(), QUEUE_BYTES);
    let _ = INSTALLED.set(writer.dropped_counter());
    let filter = EnvFilter::try_new(directive).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.event_format(JsonLines).try_init(),
    };
    flush
}

/// Starts the writer thread for `sink` with a queue of `capacity` bytes: the returned
/// [`Lines`] is the subscriber's writer, the [`Flush`] guard ends the thread.
pub fn non_blocking<W: Write + Send + 'static>(sink: W, capacity: usize) -> (Lines, Flush) {
    let queue = Arc::new(Queue {
        state: Mutex::new(State::default()),
        ready: Condvar::new(),
        capacity,
        dropped: Arc::new(AtomicU64::new(0)),
    });
    let (done_tx, done) = mpsc::channel();
    let q = queue.clone();
    let spawned = std::thread::Builder::new().name("log-writer".into()).spawn(move || {
        q.write_out(sink);
        let _ = done_tx.send(());
    });
    if spawned.is_err() {
        // No thread, no stderr: every line is counted as dropped.
        queue.lock().closed = true;
    }
    (Lines(queue.clone()), Flush { queue, done })
}

struct Queue {
    state: Mutex<State>,
    /// Signalled when a line is queued or the queue is closed.
    ready: Condvar,
    capacity: usize,
    dropped: Arc<AtomicU64>,
}

#[derive(Default)]
struct State {
    lines: VecDeque<Vec<u8>>,
    /// Bytes in `lines`.
    bytes: usize,
    /// No more lines are taken; the writer thread ends once `lines` is empty.
    closed: bool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves the queue consistent (push and pop only).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues one whole line, or counts it dropped. Never waits for the sink: the lock is
    /// only ever held to push or pop.
    fn push(&self, line: Vec<u8>) {
        let mut s = self.lock();
        if s.closed || s.bytes + line.len() > self.capacity {
            drop(s);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        s.bytes += line.len();
        s.lines.push_back(line);
        drop(s);
        self.ready.notify_one();
    }

    /// The writer thread: each line in one `write_all` (a line of up to `PIPE_BUF` bytes
    /// reaches a pipe whole), until the queue is closed and empty.
    fn write_out<W: Write>(&self, mut sink: W) {
        loop {
            let line = {
                let mut s = self.lock();
                loop {
                    if let Some(line) = s.lines.pop_front() {
                        s.bytes -= line.len();
                        break line;
                    }
                    if s.closed {
                        let _ = sink.flush();
                        return;
                    }
                    s = self.ready.wait(s).unwrap_or_else(PoisonError::into_inner);
                }
            };
            if sink.write_all(&line).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The subscriber's writer ([`MakeWriter`]): each event gets a [`Line`].
#[derive(Clone)]
pub struct Lines(Arc<Queue>);

impl Lines {
    /// The count of lines this writer dropped.
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.0.dropped.clone()
    }
}

impl<'a> MakeWriter<'a> for Lines {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { queue: self.0.clone(), buf: Vec::new() }
    }
}

/// One event's bytes, collected over however many `write` calls the formatter makes and
/// queued as one piece when it is dropped, so that lines never interleave.
pub struct Line {
    queue: Arc<Queue>,
    buf: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.queue.push(std::mem::take(&mut self.buf));
        }
    }
}

/// Flushes the log queue when dropped: no line is taken after that, the queued ones are
/// written, waiting at most [`FLUSH_TIMEOUT`].
#[must_use = "dropping the guard ends logging"]
pub struct Flush {
    queue: Arc<Queue>,
    done: mpsc::Receiver<()>,
}

impl Flush {
    fn close(&self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        self.close();
        let _ = self.done.recv_timeout(FLUSH_TIMEOUT);
    }
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

    /// A sink that takes nothing until opened, like a pipe nobody reads.
    #[derive(Clone, Default)]
    struct Gated {
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
        out: Buf,
    }

    impl Gated {
        fn open(&self) {
            *self.open.0.lock().unwrap() = true;
            self.open.1.notify_all();
        }
    }

    impl io::Write for Gated {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.open;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.out.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn log_lines(lines: &Lines, n: usize) {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("info"))
            .event_format(JsonLines)
            .with_writer(lines.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..n {
                tracing::info!(i, pad = "x".repeat(100), "line");
            }
        });
    }

    #[test]
    fn a_stalled_sink_never_blocks_the_logger_and_drops_are_counted() {
        let sink = Gated::default();
        let (lines, flush) = non_blocking(sink.clone(), 16 * 1024);
        // Would hang here if a log call waited for the sink.
        log_lines(&lines, 1000);
        let dropped = lines.dropped_counter().load(Ordering::Relaxed);
        assert!(dropped > 500 && dropped < 1000, "dropped {dropped}");
        sink.open();
        drop(flush);
        let text = String::from_utf8(sink.out.0.lock().unwrap().clone()).unwrap();
        let written: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a whole JSON line")).collect();
        assert_eq!(written.len() as u64 + dropped, 1000);
        // What was kept is whole lines in the order they were logged, starting with the
        // first: the writer may free room while it waits on the sink, so later lines can
        // follow a gap, never overtake.
        let kept: Vec<u64> = written.iter().map(|l| l["i"].as_u64().expect("a line number")).collect();
        assert_eq!(kept.first(), Some(&0), "{kept:?}");
        assert!(kept.windows(2).all(|w| w[0] < w[1]), "{kept:?}");
    }

    #[test]
    fn dropping_the_guard_writes_every_queued_line() {
        let out = Buf::default();
        let (lines, flush) = non_blocking(out.clone(), 1 << 20);
        log_lines(&lines, 500);
        drop(flush);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 500);
        assert_eq!(lines.dropped_counter().load(Ordering::Relaxed), 0);
        // After the flush, lines are no longer taken, and are counted.
        log_lines(&lines, 1);
        assert_eq!(lines.dropped_counter().load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_sink_that_fails_counts_its_lines_as_dropped() {
        struct Broken;
        impl io::Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (lines, flush) = non_blocking(Broken, 1 << 20);
        log_lines(&lines, 10);
        drop(flush);
        assert_eq!(lines.dropped_counter().load(Ordering::Relaxed), 10);
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
