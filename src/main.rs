//! The `harbormaster` command: `run`, `check` and `route` over one TOML config file, `demo`,
//! and `certs`.

mod certs;
mod demo;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use harbormaster::admin::{log, metrics, route};
use harbormaster::control::config::{self, LogFormat};

/// mimalloc instead of glibc malloc: measured in benches/compare (docs/benchmarks.md, M1).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "harbormaster", version, about = "MQTT-aware, TLS-terminating load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Try it: harbormaster with TLS in front of three embedded MQTT brokers, demo
    /// certificates, ready-to-paste mosquitto commands and a live table. Ctrl-C stops.
    Demo(demo::Args),
    /// Make certificates of your own for a TLS listener: a CA, a server certificate for the
    /// names devices connect to and, with --device, device certificates.
    Certs(certs::Args),
    /// Run the load balancer.
    Run {
        #[arg(long, short, default_value = "config/harbormaster.toml")]
        config: PathBuf,
        /// Log format; overrides the config's `[log] format`.
        #[arg(long, value_parser = ["text", "json"])]
        log_format: Option<String>,
        /// Log level or tracing filter ("debug", "harbormaster=debug,rustls=warn"); overrides
        /// HARBORMASTER_LOG, then RUST_LOG, then the config's `[log] level`.
        #[arg(long)]
        log_level: Option<String>,
    },
    /// Validate a config; print every problem with its key path.
    Check {
        #[arg(long, short, default_value = "config/harbormaster.toml")]
        config: PathBuf,
    },
    /// Print the broker a client-id goes to, then the rest of its preference order.
    Route {
        #[arg(long, short, default_value = "config/harbormaster.toml")]
        config: PathBuf,
        #[arg(long)]
        client_id: String,
        /// The pool to look in; defaults to the only pool, or the first listener's pool.
        #[arg(long)]
        pool: Option<String>,
    },
}

/// Exit code for an invalid config (EX_USAGE), so orchestrators can tell it from a crash.
const EXIT_INVALID_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo::main(args),
        Command::Certs(args) => certs::main(args),
        Command::Check { config } => match config::load(&config) {
            Ok(loaded) => {
                for w in &loaded.warnings {
                    eprintln!("warning: {w}");
                }
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(problems) => {
                for p in &problems.0 {
                    eprintln!("{p}");
                }
                ExitCode::from(1)
            }
        },
        Command::Route { config, client_id, pool } => {
            let loaded = match config::load(&config) {
                Ok(l) => l,
                Err(problems) => {
                    eprintln!("{problems}");
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
            };
            // The same lookup as the admin server's /route.
            let found = match route::lookup(&loaded.snapshot, client_id.as_bytes(), pool.as_deref()) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            // Written without println! so that `| head -1` closing the pipe is not a panic.
            let mut out = std::io::stdout().lock();
            for b in found.preference {
                if writeln!(out, "{}", b.name).is_err() {
                    break;
                }
            }
            ExitCode::SUCCESS
        }
        Command::Run { config, log_format, log_level } => {
            let loaded = match config::load(&config) {
                Ok(l) => l,
                Err(problems) => {
                    eprintln!("invalid config {}:\n{problems}", config.display());
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
            };
            let format = match log_format.as_deref() {
                Some("json") => LogFormat::Json,
                Some(_) => LogFormat::Text,
                None => loaded.log.format,
            };
            let (hm_log, rust_log) = (std::env::var("HARBORMASTER_LOG").ok(), std::env::var("RUST_LOG").ok());
            let filter = match log::choose_filter(
                log_level.as_deref(),
                hm_log.as_deref(),
                rust_log.as_deref(),
                &loaded.log.level,
            ) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
            };
            // Declared before the runtime so that it is dropped after it: the queued lines,
            // down to "drained; exiting" or "fatal", are written before the process exits.
            let _flush_logs = log::init(format, &filter.directive);
            for ignored in &filter.ignored {
                tracing::warn!("{ignored}");
            }
            // HARBORMASTER_WORKER_THREADS: runtime worker threads (default: one per core); the
            // benchmarks pin the proxy to one core with one worker.
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            match std::env::var("HARBORMASTER_WORKER_THREADS").map(|v| v.parse::<usize>()) {
                Ok(Ok(n)) if n > 0 => {
                    builder.worker_threads(n);
                }
                Ok(_) => {
                    eprintln!("HARBORMASTER_WORKER_THREADS must be a positive integer");
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
                Err(_) => {}
            }
            let runtime = match builder.enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            tracing::info!(
                config = %config.display(),
                version = metrics::VERSION,
                commit = metrics::GIT_COMMIT,
                log_filter = %filter.directive,
                log_filter_from = filter.source,
                "starting"
            );
            match runtime.block_on(harbormaster::app::run(loaded, harbormaster::app::shutdown_signal(), |_| {})) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "fatal");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
