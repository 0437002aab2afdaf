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

use crate::admin::metrics::Metrics;
use crate::control::config::Loaded;
use crate::proxy::connection::Shared;
use crate::proxy::listener;

/// Run until `shutdown` resolves, then drain. Returns once every connection has ended.
/// `on_bound` receives the bound address of each listener (tests bind port 0).
pub async fn run(
    loaded: Loaded,
    shutdown: impl Future<Output = ()>,
    on_bound: impl FnOnce(Vec<(String, SocketAddr)>),
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let hard_stop = CancellationToken::new();
    let stop_accepting = CancellationToken::new();
    let tracker = TaskTracker::new();
    let shared = Arc::new(Shared::new(metrics.clone(), hard_stop.clone()));
    let limits = loaded.snapshot.limits.clone();
    let limit = Arc::new(Semaphore::new(limits.max_connections));
    let current = Arc::new(ArcSwap::from_pointee(loaded.snapshot));

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
    on_bound(bound);

    shutdown.await;
    // Stop accepting at once: the accept loops drop their sockets, so new connections are
    // refused by the kernel while live ones carry on.
    stop_accepting.cancel();
    for l in accept_loops {
        let _ = l.await;
    }
    metrics.draining.set(1);
    tracker.close();
    let live = tracker.len();
    tracing::info!(live, drain_timeout = ?limits.drain_timeout, "draining");
    if tokio::time::timeout(limits.drain_timeout, tracker.wait()).await.is_err() {
        tracing::info!(live = tracker.len(), "drain timeout reached; closing remaining connections");
        hard_stop.cancel();
        tracker.wait().await;
    }
    tracing::info!("drained; exiting");
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
