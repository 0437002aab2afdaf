//! `harbormaster-bench`: an MQTT-over-TLS load generator and a backend sink, for benchmarking
//! harbormaster (or any MQTT proxy or broker) on loopback or your own deployment.
//!
//! Modes: `idle N` (hold N sessions; SIGUSR1 makes each carry a burst), `storm` (full
//! sessions, closed loop `--concurrency` or open loop `--rate`), `ping` (PINGREQ → PINGRESP
//! latency), `bulk` (PUBLISH throughput) and `sink` (the backend: PROXY v1/v2 or none,
//! CONNACK, PINGRESP, PUBLISH discarded). The client modes speak MQTT over WebSocket with
//! `--websocket [PATH]`, and the sink takes it too on its `--ws-listen` addresses. Reports go
//! to stdout, readable or `--json`; events ("ready", "burst-done") and progress lines go to
//! stderr; `--plot FILE.png` also draws the report's latencies as a picture. One
//! current-thread runtime by default, so the generator's CPU can be pinned to one core with
//! taskset.

mod client;
mod modes;
mod mqtt;
mod plot;
mod sink;
mod stats;
mod ws;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "harbormaster-bench",
    version,
    about = "MQTT-over-TLS (and over WebSocket) load generator and backend sink"
)]
struct Cli {
    /// Print the report as one JSON object.
    #[arg(long, global = true)]
    json: bool,
    /// Runtime threads (1: a current-thread runtime).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    /// Also write the report's latencies as a chart (PNG) to this file, e.g. beside the JSON.
    #[arg(long, global = true, value_name = "FILE.png")]
    plot: Option<std::path::PathBuf>,
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
    /// A backend: PROXY v1/v2 or none, CONNACK, PINGRESP, PUBLISH discarded (RETAIN: echoed);
    /// on --ws-listen addresses the same after a WebSocket upgrade, in frames.
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
            if let Some(path) = &cli.plot {
                if let Err(e) = plot::write(&v, path) {
                    eprintln!("harbormaster-bench: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                eprintln!("harbormaster-bench: wrote {}", path.display());
            }
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
