//! The `harbormaster` command: `run`, `check` and `route` over one TOML config file.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use harbormaster::control::config::{self, LogFormat};

#[derive(Parser)]
#[command(name = "harbormaster", version, about = "MQTT-aware, TLS-terminating load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the load balancer.
    Run {
        #[arg(long, short, default_value = "config/harbormaster.toml")]
        config: PathBuf,
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
        Command::Check { config } => match config::load(&config) {
            Ok(_) => {
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
            let snap = &loaded.snapshot;
            let name = pool.or_else(|| {
                if snap.pools.len() == 1 {
                    Some(snap.pools[0].name.clone())
                } else {
                    snap.listeners.first().map(|l| l.pool.clone())
                }
            });
            let Some(p) = name.as_deref().and_then(|n| snap.pool(n)) else {
                eprintln!("no pool {:?}", name.unwrap_or_default());
                return ExitCode::from(2);
            };
            // Written without println! so that `| head -1` closing the pipe is not a panic.
            let mut out = std::io::stdout().lock();
            for b in p.ranking(client_id.as_bytes()) {
                if writeln!(out, "{}", b.name).is_err() {
                    break;
                }
            }
            ExitCode::SUCCESS
        }
        Command::Run { config } => {
            let loaded = match config::load(&config) {
                Ok(l) => l,
                Err(problems) => {
                    eprintln!("invalid config {}:\n{problems}", config.display());
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
            };
            init_logging(loaded.log.format, &loaded.log.level);
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            tracing::info!(config = %config.display(), version = env!("CARGO_PKG_VERSION"), "starting");
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

/// Logs go to stderr; `HARBORMASTER_LOG` (an EnvFilter) overrides the config's level.
fn init_logging(format: LogFormat, level: &str) {
    let filter = std::env::var("HARBORMASTER_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(false).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
