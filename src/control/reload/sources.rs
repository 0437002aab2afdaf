//! What starts a reload or a rebuild, as one stream of typed [`Trigger`]s: SIGHUP; a change in
//! the folder of the config file or of a certificate, key, CA, CRL or ticket key file it
//! references (folders, not files: Kubernetes swaps ConfigMap and Secret contents through a
//! `..data` symlink), debounced; and the members each discovery task publishes, one entry per
//! pool. Sources only notice: the applier reads, validates and swaps. They follow the applied
//! config ([`Sources::follow`]): the folders it references are watched, its discovered pools
//! have a discovery task.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::control::discovery::{self, DiscoverySpec, Members};

/// File events closer together than this are one change: an editor's or kubelet's burst of
/// writes and renames is read once, when it is over.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Why the configuration is to be applied again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP: read the config file again.
    Sighup,
    /// A watched file changed (debounced): read the config file again.
    Files,
    /// A discovery task published new members for `pool`.
    Discovered { pool: String, members: Members },
}

impl Trigger {
    /// How the reload log names it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Trigger::Sighup => "SIGHUP",
            Trigger::Files => "file change",
            Trigger::Discovered { .. } => "discovery",
        }
    }
}

/// Every source of triggers of the process.
pub struct Sources {
    hup: Option<Signal>,
    files: Option<FileWatch>,
    file_events: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    /// When the debounced file change is due, if one is.
    pending: Option<Instant>,
    discovery: Discoveries,
}

impl Sources {
    /// Installs the SIGHUP handler at once (before it, SIGHUP would end the process); watches
    /// files only when there is a config file (`watch_files`).
    pub fn new(watch_files: bool) -> Sources {
        let hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload by SIGHUP disabled");
                None
            }
        };
        let (tx, file_events) = mpsc::unbounded_channel();
        let files = match watch_files.then(|| FileWatch::new(tx)) {
            Some(Ok(w)) => Some(w),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot watch the config's folders; reload by SIGHUP only");
                None
            }
            None => None,
        };
        Sources { hup, files, file_events, pending: None, discovery: Discoveries::default() }
    }

    /// Watches the folders of `files` (the config file and those it references), and runs a
    /// discovery task for each pool of `discovery`: new pools get one, pools gone or whose
    /// spec changed lose theirs (a changed one is started anew). A discovery task replaced
    /// here is never heard from again.
    pub fn follow(&mut self, files: &[PathBuf], discovery: &BTreeMap<String, DiscoverySpec>) {
        if let Some(w) = &mut self.files {
            w.set(files);
        }
        self.discovery.reconcile(discovery);
    }

    /// The next trigger. Cancel-safe: a trigger is only taken when it is returned.
    pub async fn next(&mut self) -> Trigger {
        loop {
            tokio::select! {
                _ = next_signal(&mut self.hup) => {
                    tracing::info!(target: "harbormaster::reload", "SIGHUP received");
                    // The reload reads the files anyway.
                    self.pending = None;
                    return Trigger::Sighup;
                }
                Some(event) = self.file_events.recv() => {
                    if self.files.as_ref().is_some_and(|w| w.relevant(&event)) {
                        self.pending = Some(Instant::now() + DEBOUNCE);
                    }
                }
                _ = tokio::time::sleep_until(self.pending.unwrap_or_else(Instant::now)), if self.pending.is_some() => {
                    self.pending = None;
                    return Trigger::Files;
                }
                (pool, members) = self.discovery.next() => return Trigger::Discovered { pool, members },
            }
        }
    }
}

/// Resolves on the next SIGHUP; never without a handler.
async fn next_signal(hup: &mut Option<Signal>) {
    match hup {
        Some(s) => {
            if s.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// The running discovery tasks, by pool: their members read as one stream.
#[derive(Default)]
struct Discoveries {
    running: HashMap<String, Running>,
}

/// A running discovery task and the receiver of its members.
struct Running {
    spec: DiscoverySpec,
    stop: CancellationToken,
    rx: watch::Receiver<Option<Members>>,
    /// Its task has ended (nothing more will come): no longer waited on.
    ended: bool,
}

impl Discoveries {
    /// Starts, stops and restarts discovery tasks to match `wanted`.
    fn reconcile(&mut self, wanted: &BTreeMap<String, DiscoverySpec>) {
        self.running.retain(|pool, d| {
            let keep = wanted.get(pool) == Some(&d.spec);
            if !keep {
                tracing::info!(target: "harbormaster::reload", pool = %pool, "discovery stopped");
                d.stop.cancel();
            }
            keep
        });
        for (pool, spec) in wanted {
            if self.running.contains_key(pool) {
                continue;
            }
            let stop = CancellationToken::new();
            let d = discovery::start(pool, spec, stop.clone());
            tracing::info!(target: "harbormaster::reload", pool = %pool, spec = ?spec, "discovery started");
            self.running.insert(pool.clone(), Running { spec: spec.clone(), stop, rx: d.rx, ended: false });
        }
    }

    /// The next members any task publishes, with its pool. Cancel-safe (a watch channel's
    /// `changed` is); pending while no task runs.
    async fn next(&mut self) -> (String, Members) {
        loop {
            let waiting: Vec<_> = self
                .running
                .iter_mut()
                .filter(|(_, d)| !d.ended)
                .map(|(pool, d)| Box::pin(async move { (pool.clone(), d.rx.changed().await.is_ok()) }))
                .collect();
            if waiting.is_empty() {
                return std::future::pending().await;
            }
            let ((pool, alive), _, _) = futures::future::select_all(waiting).await;
            let Some(d) = self.running.get_mut(&pool) else { continue };
            if !alive {
                d.ended = true;
                continue;
            }
            if let Some(members) = d.rx.borrow_and_update().clone() {
                return (pool, members);
            }
        }
    }
}

/// Dropping the sources stops every discovery task.
impl Drop for Discoveries {
    fn drop(&mut self) {
        for d in self.running.values() {
            d.stop.cancel();
        }
    }
}

/// Folder watches for the config file and the files it references.
struct FileWatch {
    watcher: RecommendedWatcher,
    dirs: BTreeSet<PathBuf>,
    /// Paths whose change matters, as written and with symlinks resolved.
    names: HashSet<PathBuf>,
}

impl FileWatch {
    fn new(tx: mpsc::UnboundedSender<notify::Result<notify::Event>>) -> notify::Result<FileWatch> {
        let watcher = notify::recommended_watcher(move |event| {
            let _ = tx.send(event);
        })?;
        Ok(FileWatch { watcher, dirs: BTreeSet::new(), names: HashSet::new() })
    }

    /// Watches the folders of `paths` (and of their symlink targets), and only those.
    fn set(&mut self, paths: &[PathBuf]) {
        let mut names = HashSet::new();
        let mut dirs = BTreeSet::new();
        for p in paths {
            let Ok(abs) = std::path::absolute(p) else { continue };
            let resolved = std::fs::canonicalize(&abs).ok();
            for n in std::iter::once(abs).chain(resolved) {
                if let Some(dir) = n.parent() {
                    dirs.insert(dir.to_path_buf());
                }
                names.insert(n);
            }
        }
        for gone in self.dirs.difference(&dirs) {
            let _ = self.watcher.unwatch(gone);
        }
        for dir in dirs.difference(&self.dirs) {
            if let Err(e) = self.watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(target: "harbormaster::reload", dir = %dir.display(), error = %e, "cannot watch folder");
            }
        }
        self.dirs = dirs;
        self.names = names;
    }

    /// Whether an event may change what the config reads: a write, create, rename or removal
    /// of a watched file, or of Kubernetes' `..data` link and `..TIMESTAMP` folders. Reads
    /// (our own included) are not.
    fn relevant(&self, event: &notify::Result<notify::Event>) -> bool {
        let Ok(event) = event else { return true };
        if event.need_rescan() {
            return true;
        }
        match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return false,
            _ => {}
        }
        event
            .paths
            .iter()
            .any(|p| self.names.contains(p) || p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("..")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::discovery::Member;
    use std::sync::Arc;

    #[tokio::test]
    async fn file_events_matter_for_watched_files_and_kubernetes_links_only() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("harbormaster.toml");
        std::fs::write(&cfg, "").unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut w = FileWatch::new(tx).unwrap();
        w.set(std::slice::from_ref(&cfg));
        let ev = |kind: EventKind, name: &str| Ok(notify::Event::new(kind).add_path(dir.path().join(name)));
        let modify = EventKind::Modify(notify::event::ModifyKind::Any);
        assert!(w.relevant(&ev(modify, "harbormaster.toml")));
        assert!(w.relevant(&ev(EventKind::Create(notify::event::CreateKind::Any), "..data")));
        assert!(!w.relevant(&ev(modify, "harbormaster.log")), "a log file beside the config");
        assert!(!w.relevant(&ev(EventKind::Access(AccessKind::Open(AccessMode::Any)), "harbormaster.toml")));
        assert!(w.relevant(&ev(EventKind::Access(AccessKind::Close(AccessMode::Write)), "harbormaster.toml")));
    }

    #[tokio::test]
    async fn discovery_members_come_as_one_stream_and_a_replaced_task_is_not_heard() {
        let mut d = Discoveries::default();
        let spec = |port| DiscoverySpec::Dns {
            name: "x".into(),
            port: Some(port),
            interval: Duration::from_secs(60),
            resolver: None,
        };
        let (tx_p, rx_p) = watch::channel(None);
        let (tx_q, rx_q) = watch::channel(None);
        let running = |spec, rx| Running { spec, stop: CancellationToken::new(), rx, ended: false };
        d.running.insert("p".into(), running(spec(1), rx_p));
        d.running.insert("q".into(), running(spec(2), rx_q));
        let members = |port: u16| Arc::new(vec![Member::from_addr(([127, 0, 0, 1], port).into())]);

        tx_q.send_replace(Some(members(20)));
        assert_eq!(d.next().await, ("q".to_string(), members(20)));
        tx_p.send_replace(Some(members(10)));
        assert_eq!(d.next().await, ("p".to_string(), members(10)));

        // p leaves the config: its task is stopped, and what it still publishes is never read.
        let old_p = d.running["p"].stop.clone();
        d.reconcile(&[("q".to_string(), spec(2))].into());
        assert!(old_p.is_cancelled());
        tx_p.send_replace(Some(members(11)));
        drop(tx_q);
        let quiet = tokio::time::timeout(Duration::from_millis(100), d.next()).await;
        assert!(quiet.is_err(), "{quiet:?}");
        assert!(d.running["q"].ended, "a task that ended is no longer waited on");
    }
}
