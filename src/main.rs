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

// mimalloc's `void mi_collect(bool force)` (mimalloc.h), from the library the allocator above
// links; the mimalloc crate does not wrap it.
extern "C" {
    fn mi_collect(force: bool);
}

/// Returns the calling thread's free memory to the system: frees the thread heap's empty
/// pages and purges free memory at once (`force`) rather than after mimalloc's purge delay,
/// which only a later allocation would act on. Runs on each runtime worker once per reclaim
/// round (harbormaster::control::memory); after 4,000 silent connections closed it took the
/// resident memory from ~12–20 MB above the baseline back to within 1–2 MB
/// (architecture.md, *Memory after a storm*).
fn give_back_memory() {
    // SAFETY: mi_collect takes no pointers and is thread-safe: it only touches the calling
    // thread's own heap and the arenas' shared free lists, under mimalloc's own locks.
    unsafe { mi_collect(true) }
}

/// No transparent huge pages for this process. mimalloc asks for them on its arenas, and with
/// them a storm's freed memory stays resident: a purge of part of a 2 MiB page splits it, and
/// the kernel's khugepaged later collapses the remains into full huge pages again. Measured
/// after 4,000 silent connections closed: 5 MB above the baseline with them, 1.4 MB without,
/// and a 4 MB smaller baseline (architecture.md, *Memory after a storm*).
fn no_transparent_huge_pages() {
    // SAFETY: prctl(PR_SET_THP_DISABLE) takes integers only and sets a flag of this process.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r != 0 {
        eprintln!("warning: cannot turn transparent huge pages off: {}", std::io::Error::last_os_error());
    }
}

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
    /// Print the broker a client-id goes to, then the rest of its preference order. With
    /// routing rules, the pool is the one the listener's rules pick for the facts given
    /// (which rule matched is printed on stderr).
    Route {
        #[arg(long, short, default_value = "config/harbormaster.toml")]
        config: PathBuf,
        #[arg(long)]
        client_id: String,
        /// The pool to look in, whatever the rules say; defaults to the pool the listener's
        /// rules pick, or its `pool`.
        #[arg(long)]
        pool: Option<String>,
        #[command(flatten)]
        facts: RouteFacts,
    },
}

/// What a connection would offer a listener's routing rules.
#[derive(clap::Args)]
struct RouteFacts {
    /// The listener the client connects to; defaults to the first.
    #[arg(long)]
    listener: Option<String>,
    /// The server name the client sends (SNI).
    #[arg(long)]
    sni: Option<String>,
    /// The ALPN protocol negotiated.
    #[arg(long)]
    alpn: Option<String>,
    /// The client certificate's subject CN.
    #[arg(long)]
    cert_cn: Option<String>,
    /// The client certificate's issuer CN.
    #[arg(long)]
    cert_issuer_cn: Option<String>,
    /// The CONNECT's username.
    #[arg(long)]
    username: Option<String>,
    /// The client's address.
    #[arg(long)]
    source: Option<std::net::IpAddr>,
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
        Command::Route { config, client_id, pool, facts } => {
            let loaded = match config::load(&config) {
                Ok(l) => l,
                Err(problems) => {
                    eprintln!("{problems}");
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
            };
            // The same lookup as the admin server's /route.
            let query = route::Query {
                listener: facts.listener,
                pool,
                sni: facts.sni,
                alpn: facts.alpn,
                cert_cn: facts.cert_cn,
                cert_issuer_cn: facts.cert_issuer_cn,
                username: facts.username,
                source: facts.source,
            };
            let found = match route::lookup_query(&loaded.snapshot, client_id.as_bytes(), &query) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            // The rule on stderr: stdout stays the list of brokers, one a line.
            if let Some(m) = &found.matched {
                eprintln!("{m}: pool {:?}", found.pool.name);
            }
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
            no_transparent_huge_pages();
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
            // HARBORMASTER_WORKER_THREADS: worker threads of each runtime (default: one per
            // core); the benchmarks pin the proxy to one core with one worker each.
            let workers = match std::env::var("HARBORMASTER_WORKER_THREADS").map(|v| v.parse::<usize>()) {
                Ok(Ok(n)) if n > 0 => Some(n),
                Ok(_) => {
                    eprintln!("HARBORMASTER_WORKER_THREADS must be a positive integer");
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
                Err(_) => None,
            };
            // HARBORMASTER_SETUP_PRIORITY: "idle" (default) or "normal", the setup threads'
            // scheduling (docs/operations.md, sizing for a reconnect storm).
            let lower = match std::env::var("HARBORMASTER_SETUP_PRIORITY").as_deref() {
                Err(_) | Ok("idle") => true,
                Ok("normal") => false,
                Ok(other) => {
                    eprintln!("HARBORMASTER_SETUP_PRIORITY must be \"idle\" or \"normal\", not {other:?}");
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
            };
            // Two runtimes (harbormaster::proxy::runtimes): connections are accepted and set
            // up on "hm-setup" threads at the lowest scheduling priority, and relayed, once
            // settled, on the runtime the rest of the process runs on.
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder
                .thread_name("hm-relay")
                .on_thread_park(|| harbormaster::control::memory::worker_parked(give_back_memory));
            let mut setup_builder = tokio::runtime::Builder::new_multi_thread();
            setup_builder
                .thread_name("hm-setup")
                .on_thread_start(move || {
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    if !lower {
                        return;
                    }
                    if let Err(e) = harbormaster::proxy::runtimes::lower_priority() {
                        WARNED.call_once(|| {
                            tracing::warn!(error = %e, "cannot lower the setup threads' priority; established connections are not served ahead of setups")
                        });
                    }
                })
                .on_thread_park(|| harbormaster::control::memory::worker_parked(give_back_memory));
            if let Some(n) = workers {
                builder.worker_threads(n);
                setup_builder.worker_threads(n);
            }
            let (runtime, setup_runtime) = match (builder.enable_all().build(), setup_builder.enable_all().build()) {
                (Ok(r), Ok(s)) => (r, s),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            harbormaster::proxy::runtimes::set_setup_runtime(setup_runtime.handle().clone());
            tracing::info!(
                config = %config.display(),
                version = metrics::VERSION,
                commit = metrics::GIT_COMMIT,
                log_filter = %filter.directive,
                log_filter_from = filter.source,
                "starting"
            );
            let ran = runtime.block_on(harbormaster::app::run(loaded, harbormaster::app::shutdown_signal(), |_| {}));
            // Every connection has ended (the drain waited for them): nothing left to run there.
            setup_runtime.shutdown_background();
            match ran {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "fatal");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
