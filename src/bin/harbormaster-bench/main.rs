//! `harbormaster-bench`: an MQTT-over-TLS load generator and a backend sink, for benchmarking
//! harbormaster (or any MQTT proxy or broker) on loopback or your own deployment.
//!
//! Modes: `idle N` (hold N sessions; SIGUSR1 makes each carry a burst), `storm` (full
//! sessions, closed loop `--concurrency` or open loop `--rate`), `ping` (PINGREQ → PINGRESP
//! latency), `bulk` (PUBLISH throughput) and `sink` (the backend: PROXY v1/v2 or none,
//! CONNACK, PINGRESP, PUBLISH discarded). Reports go to stdout, readable or `--json`; events
//! ("ready", "burst-done") and progress lines go to stderr. One current-thread runtime by
//! default, so the generator's CPU can be pinned to one core with taskset.

mod client;
mod modes;
mod mqtt;
mod sink;
mod stats;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::Value;

#[derive(Parser)]
#[command(name = "harbormaster-bench", version, about = "MQTT-over-TLS load generator and backend sink")]
struct Cli {
    /// Print the report as one JSON object.
    #[arg(long, global = true)]
    json: bool,
    /// Runtime threads (1: a current-thread runtime).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Open N sessions at --rate and hold them, pinging at the keep-alive. SIGUSR1: every
    /// session carries one --burst (echoed by the sink); SIGINT/SIGTERM or --hold: close and
    /// report. Prints "ready" and "burst-done" events on stderr.
    Idle(modes::IdleOpts),
    /// Full sessions (connect, TLS, CONNECT → CONNACK, DISCONNECT) for --duration, closed loop
    /// (--concurrency) or open loop (--rate).
    Storm(modes::StormOpts),
    /// PINGREQ → PINGRESP round trips: latency percentiles and CDF.
    Ping(modes::PingOpts),
    /// PUBLISH a stream of payloads one way for --duration: MB/s.
    Bulk(modes::BulkOpts),
    /// A backend: PROXY v1/v2 or none, CONNACK, PINGRESP, PUBLISH discarded (RETAIN: echoed).
    Sink(sink::SinkOpts),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut b = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cli.threads);
        b
    };
    let rt = match b.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("harbormaster-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = rt.block_on(async {
        match cli.mode {
            Mode::Idle(o) => modes::idle(o).await,
            Mode::Storm(o) => modes::storm(o).await,
            Mode::Ping(o) => modes::ping(o).await,
            Mode::Bulk(o) => modes::bulk(o).await,
            Mode::Sink(o) => sink::run(o).await,
        }
    });
    // Held sessions are not waited for beyond the modes' own bounds.
    rt.shutdown_background();
    match report {
        Ok(v) => {
            if cli.json {
                println!("{v}");
            } else {
                print_summary(&v, 0);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("harbormaster-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A readable summary: one "key: value" line per field, latency objects on one line, the CDF
/// left out.
fn print_summary(v: &Value, indent: usize) {
    let Value::Object(map) = v else { return };
    let pad = " ".repeat(indent);
    for (k, val) in map {
        match val {
            Value::Object(m) if m.contains_key("p50_us") => println!(
                "{pad}{k}: n={} p50={}µs p90={}µs p99={}µs p99.9={}µs max={}µs",
                m["count"], m["p50_us"], m["p90_us"], m["p99_us"], m["p999_us"], m["max_us"]
            ),
            Value::Object(m) if m.is_empty() => println!("{pad}{k}: none"),
            Value::Object(_) => {
                println!("{pad}{k}:");
                print_summary(val, indent + 2);
            }
            Value::Null => {}
            Value::Array(a) if a.is_empty() => {}
            other => println!("{pad}{k}: {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use harbormaster::admin::metrics::Metrics;
    use harbormaster::proxy::connection::{handle, Shared};
    use tokio_util::sync::CancellationToken;

    /// What one connection's task holds for its whole life beyond its sockets and TLS state:
    /// the future of `connection::handle` (setup is boxed, so this is mostly the relay phase).
    /// tokio's task cell adds ~110 B of header and trailer and is 128-byte aligned, which the
    /// allocator serves from the next size class up: with the listener's 24 B connection-limit
    /// guard, the 976 B future measured keeps the task in the 1,280 B class; 1,248 B took the
    /// 1,536 B class and 1,440 B the 1,792 B one, 256 B more per connection each
    /// (docs/benchmarks.md, M1).
    #[tokio::test]
    async fn connection_task_size() {
        let cfg = "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n[pool.p]\nbackends = [\"127.0.0.1:1\"]\n[admin]\nenabled = false\n";
        let loaded = harbormaster::control::config::load_str(cfg, std::path::Path::new(".")).expect("config");
        let snapshot = Arc::new(loaded.snapshot);
        let spec = snapshot.listeners[0].clone();
        let shared = Arc::new(Shared::new(Arc::new(Metrics::new()), CancellationToken::new()));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let peer = c.local_addr().unwrap();
        let conn = shared.conns.register();
        let guard = [0u8; 24];
        let fut = handle(shared.clone(), snapshot, spec, c, peer, conn, guard);
        let size = std::mem::size_of_val(&fut);
        eprintln!("connection task future: {size} bytes");
        // Unoptimized builds (the test suite's) lay futures out larger: 1,016 B for 976 B.
        let limit = if cfg!(debug_assertions) { 1040 } else { 1000 };
        assert!(size <= limit, "{size} > {limit}");
    }
}
