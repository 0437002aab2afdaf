//! Hot reload and discovery updates: [`sources`] turn SIGHUP, file changes and discovery's
//! members into typed [`Trigger`]s; the [`applier`] turns each trigger into a new snapshot and
//! swaps it in. The loop here only connects the two, one trigger at a time, and after a reload
//! has the sources follow the applied config (its files, its discovered pools).

pub mod applier;
pub mod sources;

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

pub use self::applier::Applied;
use self::applier::{Applier, Published};
use self::sources::{Sources, Trigger};
use super::config::ProcessLimits;
use crate::admin::metrics::Metrics;
use crate::proxy::listener::ListenerSet;
use crate::proxy::registry::Registry;
use crate::proxy::snapshot::Snapshot;

/// The reload loop: its sources and its applier.
pub struct Reloader {
    sources: Sources,
    applier: Applier,
}

/// What the reload loop hands back when it stops.
pub struct Stopped {
    /// The running listeners, still accepting, for the drain to close.
    pub listeners: ListenerSet,
    /// The process limits of the config applied last: the drain follows them.
    pub process: ProcessLimits,
}

impl Reloader {
    /// Built once the first snapshot is current (`current`, and the value of `swaps`) and the
    /// listeners are bound. Installs the SIGHUP handler at once (before it, SIGHUP would end
    /// the process).
    pub fn new(
        applied: Applied,
        current: Arc<ArcSwap<Snapshot>>,
        swaps: watch::Sender<Arc<Snapshot>>,
        metrics: Arc<Metrics>,
        conns: Arc<Registry>,
        listeners: ListenerSet,
        limit: Arc<Semaphore>,
    ) -> Reloader {
        let sources = Sources::new(applied.source_file().is_some());
        let applier = Applier::new(applied, Published { current, swaps }, metrics, conns, listeners, limit);
        Reloader { sources, applier }
    }

    /// Runs until `stop` is cancelled: reloads on SIGHUP and file changes, rebuilds pools on
    /// discovery updates. Stops discovery and pending closes on the way out.
    pub async fn run(mut self, stop: CancellationToken) -> Stopped {
        self.follow();
        loop {
            let departure = self.applier.next_departure();
            let trigger = tokio::select! {
                _ = stop.cancelled() => break,
                t = self.sources.next() => t,
                // Departed members of discovered pools that hold leave once their time is up.
                _ = sleep_until(departure), if departure.is_some() => {
                    self.applier.expire_departed();
                    continue;
                }
            };
            match trigger {
                Trigger::Discovered { pool, members } => self.applier.discovered(&pool, members),
                reload => {
                    self.applier.reload(&reload).await;
                    // Whatever the outcome: symlink targets may have moved (Kubernetes' `..data`
                    // swap), and an applied config may reference other files and pools.
                    self.follow();
                }
            }
        }
        // Dropping the sources stops discovery.
        drop(self.sources);
        let process = self.applier.applied().process();
        Stopped { listeners: self.applier.stop(), process }
    }

    fn follow(&mut self) {
        let applied = self.applier.applied();
        self.sources.follow(&applied.files(), applied.discovery());
    }
}

/// Sleeps until `at` (forever without one; the `select!` branch is disabled then anyway).
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}
