//! Wiring: a loaded config becomes the admin server, bound listeners and accept loops, health
//! checks and the reload loop; then wait for a shutdown signal and drain: not ready at once,
//! stop accepting after `drain_delay`, close live connections evenly over `drain_timeout`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::admin::http::{self as admin_http, AdminState};
use crate::admin::metrics::Metrics;
use crate::admin::ready::Readiness;
use crate::control::config::Loaded;
use crate::control::rebalance::Rebalancer;
use crate::control::reload::{self, Reloader};
use crate::control::{drain, health, memory};
use crate::proxy::connection::Shared;
use crate::proxy::listener::ListenerSet;
use crate::proxy::snapshot::Snapshot;

/// What a running process exposes to whoever started it (tests, embedders): the bound
/// addresses, and the state the admin server reads.
#[derive(Clone)]
pub struct Handles {
    /// Each listener's name and bound address (tests bind port 0).
    pub listeners: Vec<(String, SocketAddr)>,
    /// The admin server's address; `None` when it is not running.
    pub admin: Option<SocketAddr>,
    /// The snapshot the data plane and the admin server read.
    pub current: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
}

/// Run until `shutdown` resolves, then drain. Returns once every connection has ended.
/// `on_bound` receives the bound address of each listener (tests bind port 0).
pub async fn run(
    loaded: Loaded,
    shutdown: impl Future<Output = ()>,
    on_bound: impl FnOnce(Vec<(String, SocketAddr)>),
) -> anyhow::Result<()> {
    run_with(loaded, shutdown, |h| on_bound(h.listeners.clone())).await
}

/// [`run`], handing `on_started` the [`Handles`] once the admin server and every listener are
/// up. Readiness turns false the moment `shutdown` resolves, before anything else happens.
/// A config loaded from a file ([`Loaded::source`]) is reloaded on SIGHUP and when it or a
/// file it references changes; discovery runs for the pools that have it.
pub async fn run_with(
    loaded: Loaded,
    shutdown: impl Future<Output = ()>,
    on_started: impl FnOnce(&Handles),
) -> anyhow::Result<()> {
    for w in &loaded.warnings {
        tracing::warn!(key = %w.path, "{}", w.message);
    }
    let metrics = Arc::new(Metrics::new());
    let hard_stop = CancellationToken::new();
    let stop_accepting = CancellationToken::new();
    let shared = Arc::new(Shared::new(metrics.clone(), hard_stop.clone()));
    // Every connection's task, on whichever runtime it runs.
    let tracker = shared.tracker.clone();
    let limit = Arc::new(Semaphore::new(loaded.process.max_connections));
    let applied = reload::Applied::of(&loaded);
    let initial_process = loaded.process;
    let current = Arc::new(ArcSwap::from_pointee(loaded.snapshot));
    // Health checking is told of every snapshot swap.
    let (swaps, swapped) = watch::channel(current.load_full());
    let readiness = Arc::new(Readiness::new());
    readiness.set_snapshot_loaded();
    metrics.config_applied();
    // The admin server comes up before the listeners: probes see "starting", not nothing.
    let admin_stop = CancellationToken::new();
    let _stop_admin_on_error = admin_stop.clone().drop_guard();
    let rebalancer = Arc::new(Rebalancer::new(current.clone(), shared.conns.clone(), metrics.clone()));
    let admin_state = Arc::new(AdminState {
        current: current.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        tokens: crate::admin::auth::Tokens::new(loaded.admin.token_file.clone()),
        conns: shared.conns.clone(),
        rebalancer: rebalancer.clone(),
    });
    let admin = admin_http::start(&loaded.admin, admin_state, admin_stop.clone()).await?;

    let mut listeners =
        ListenerSet::new(current.clone(), shared.clone(), limit.clone(), tracker.clone(), stop_accepting.clone());
    let snapshot = current.load_full();
    let prepared = listeners.prepare(&snapshot).await.map_err(anyhow::Error::msg)?;
    listeners.commit(&snapshot, prepared).await;
    readiness.set_listeners_bound();
    let bound = listeners.addrs();
    // Installs the SIGHUP handler before anyone learns we are up.
    let reloader =
        Reloader::new(applied, current.clone(), swaps, metrics.clone(), shared.conns.clone(), listeners, limit);
    on_started(&Handles {
        listeners: bound,
        admin: admin.as_ref().map(|(addr, _)| *addr),
        current: current.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
    });
    let stop_health = CancellationToken::new();
    let health = tokio::spawn(health::run(swapped, metrics.clone(), stop_health.clone()));
    let stop_reload = CancellationToken::new();
    let reloading = tokio::spawn(reloader.run(stop_reload.clone()));
    let stop_memory = CancellationToken::new();
    let _stop_memory = stop_memory.clone().drop_guard();
    tokio::spawn(memory::run(shared.clone(), stop_memory));
    let stop_rebalance = CancellationToken::new();
    let _stop_rebalance = stop_rebalance.clone().drop_guard();
    tokio::spawn(rebalancer.run(stop_rebalance.clone()));

    shutdown.await;
    // Not ready from this moment on, so load balancers stop sending new clients.
    readiness.set_draining();
    metrics.draining.set(1);
    // The drain runs on the configuration as it is now: no more reloads or discovery.
    stop_reload.cancel();
    // Nothing is moved home while the process drains: every connection is leaving.
    stop_rebalance.cancel();
    let stopped = reloading.await;
    let limits = stopped.as_ref().map_or(initial_process, |s| s.process);
    if !limits.drain_delay.is_zero() {
        // Kubernetes removes the endpoint a little after readiness fails; clients routed here
        // meanwhile are still served.
        tracing::info!(drain_delay = ?limits.drain_delay, "not ready; accepting until drain_delay has passed");
        tokio::time::sleep(limits.drain_delay).await;
    }
    // Stop accepting: the accept loops drop their sockets, so new connections are refused by
    // the kernel while live ones carry on. Nothing new is routed, so health checking ends too.
    match stopped {
        Ok(mut s) => s.listeners.close_all().await,
        Err(e) => tracing::error!(error = %e, "reload task failed"),
    }
    stop_accepting.cancel();
    stop_health.cancel();
    let _ = health.await;
    tracker.close();
    // Close what is left evenly over drain_timeout, oldest first, so that the clients'
    // reconnects arrive as a steady trickle at the other replicas instead of one storm.
    let live = shared.conns.len();
    tracing::info!(live, drain_timeout = ?limits.drain_timeout, "draining: closing live connections evenly over drain_timeout");
    let closed = drain::paced_close(&shared.conns, limits.drain_timeout, &tracker).await;
    hard_stop.cancel();
    tracker.wait().await;
    tracing::info!(closed, "drained; exiting");
    admin_stop.cancel();
    if let Some((_, task)) = admin {
        let _ = task.await;
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
