//! Wiring: a loaded config becomes bound listeners and accept loops; then wait for a shutdown
//! signal and drain: stop accepting at once, let live connections run up to `drain_timeout`,
//! then close them.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::http::{self as admin_http, AdminState};
use crate::admin::metrics::Metrics;
use crate::admin::ready::Readiness;
use crate::control::config::Loaded;
use crate::control::health;
use crate::proxy::connection::Shared;
use crate::proxy::listener;
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
pub async fn run_with(
    loaded: Loaded,
    shutdown: impl Future<Output = ()>,
    on_started: impl FnOnce(&Handles),
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let hard_stop = CancellationToken::new();
    let stop_accepting = CancellationToken::new();
    let tracker = TaskTracker::new();
    let shared = Arc::new(Shared::new(metrics.clone(), hard_stop.clone()));
    let limits = loaded.snapshot.limits.clone();
    let limit = Arc::new(Semaphore::new(limits.max_connections));
    let current = Arc::new(ArcSwap::from_pointee(loaded.snapshot));
    let readiness = Arc::new(Readiness::new());
    readiness.set_snapshot_loaded();
    metrics.config_applied();
    // The admin server comes up before the listeners: probes see "starting", not nothing.
    let admin_stop = CancellationToken::new();
    let _stop_admin_on_error = admin_stop.clone().drop_guard();
    let admin_state =
        Arc::new(AdminState { current: current.clone(), metrics: metrics.clone(), readiness: readiness.clone() });
    let admin = admin_http::start(&loaded.admin, admin_state, admin_stop.clone()).await?;

    let snapshot = current.load_full();
    let mut bound = Vec::new();
    let mut accept_loops = Vec::new();
    for spec in &snapshot.listeners {
        let l = listener::bind(spec.bind)
            .map_err(|e| anyhow::anyhow!("listener {:?}: cannot bind {}: {e}", spec.name, spec.bind))?;
        let addr = l.local_addr()?;
        tracing::info!(listener = %spec.name, addr = %addr, tls = spec.tls.is_some(), pool = %spec.pool, "listening");
        bound.push((spec.name.clone(), addr));
        accept_loops.push(tokio::spawn(listener::serve(
            l,
            spec.clone(),
            current.clone(),
            shared.clone(),
            limit.clone(),
            tracker.clone(),
            stop_accepting.clone(),
        )));
    }
    readiness.set_listeners_bound();
    on_started(&Handles {
        listeners: bound,
        admin: admin.as_ref().map(|(addr, _)| *addr),
        current: current.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
    });
    let stop_health = CancellationToken::new();
    let health = tokio::spawn(health::run(current.clone(), metrics.clone(), stop_health.clone()));

    shutdown.await;
    // Not ready from this moment on, so load balancers stop sending new clients.
    readiness.set_draining();
    metrics.draining.set(1);
    // Stop accepting at once: the accept loops drop their sockets, so new connections are
    // refused by the kernel while live ones carry on. Nothing new is routed, so health
    // checking ends too.
    stop_accepting.cancel();
    stop_health.cancel();
    let _ = health.await;
    for l in accept_loops {
        let _ = l.await;
    }
    tracker.close();
    let live = tracker.len();
    tracing::info!(live, drain_timeout = ?limits.drain_timeout, "draining");
    if tokio::time::timeout(limits.drain_timeout, tracker.wait()).await.is_err() {
        tracing::info!(live = tracker.len(), "drain timeout reached; closing remaining connections");
        hard_stop.cancel();
        tracker.wait().await;
    }
    tracing::info!("drained; exiting");
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
