//! The applier: turns a trigger into a new snapshot and swaps it in. A reload reads and
//! validates the config file ([`config::load`], exactly what `harbormaster check` runs); a
//! discovery update rebuilds its pool from the file's settings and the members found. Either
//! way each broker gets the state of its pool and identity ([`BrokerStates`]), new listeners are
//! bound before anything changes, the snapshot is stored where connections read it and sent to
//! whoever follows swaps (health checking), and the clients of removed brokers are closed at
//! `close_rate` when their pool says `on_backend_removed = "close"`. In a discovered pool that
//! holds (`on_backend_restart = "hold"`), a broker discovery no longer lists stays in the pool
//! as a *departed* member (drained: its place kept in every key's order, never dialled) until
//! `hold_timeout` after it went away, so that its clients can wait for it to come back under
//! the same identity; then the pool is rebuilt without it. An invalid config is
//! logged with every problem and counted; the running snapshot stays. What only the control
//! plane uses ([`Applied`]: discovery, removal policies, process limits, admin and log
//! settings) is kept here, beside the snapshot.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;

use super::sources::Trigger;
use crate::admin::metrics::Metrics;
use crate::control::brokers::BrokerStates;
use crate::control::config::{self, AdminSettings, Loaded, LogFormat, OnRemoved, ProcessLimits};
use crate::control::discovery::{DiscoverySpec, Members};
use crate::control::drain;
use crate::proxy::balance::{Backend, Pool};
use crate::proxy::listener::ListenerSet;
use crate::proxy::registry::{CloseCause, ConnHandle, Registry};
use crate::proxy::snapshot::Snapshot;

/// The control settings of the applied config: what the process itself uses, beside the
/// snapshot connections read.
pub struct Applied {
    /// The pools as the file has them: the settings discovery updates build on.
    pools: HashMap<String, Arc<Pool>>,
    source: Option<PathBuf>,
    files: Vec<PathBuf>,
    discovery: BTreeMap<String, DiscoverySpec>,
    on_removed: BTreeMap<String, OnRemoved>,
    process: ProcessLimits,
    admin: AdminSettings,
    log: (LogFormat, String),
}

impl Applied {
    /// Takes what it needs from `loaded` (before its snapshot is moved into place).
    pub fn of(loaded: &Loaded) -> Applied {
        Applied {
            pools: loaded.snapshot.pools.iter().map(|p| (p.name.clone(), p.clone())).collect(),
            source: loaded.source.clone(),
            files: loaded.files.clone(),
            discovery: loaded.discovery.iter().cloned().collect(),
            on_removed: loaded.on_removed.clone(),
            process: loaded.process,
            admin: loaded.admin.clone(),
            log: (loaded.log.format, loaded.log.level.clone()),
        }
    }

    /// The file the config was read from; `None` when it came from elsewhere (no reloads).
    pub fn source_file(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// The config file, if there is one, and every file it references: what a reload reads.
    pub fn files(&self) -> Vec<PathBuf> {
        self.source.iter().chain(&self.files).cloned().collect()
    }

    /// The pools whose brokers come from discovery, and how.
    pub fn discovery(&self) -> &BTreeMap<String, DiscoverySpec> {
        &self.discovery
    }

    pub fn process(&self) -> ProcessLimits {
        self.process
    }
}

/// Where a snapshot goes once applied: where connections read it, and to whoever follows
/// swaps.
pub struct Published {
    pub current: Arc<ArcSwap<Snapshot>>,
    pub swaps: watch::Sender<Arc<Snapshot>>,
}

impl Published {
    fn store(&self, snapshot: Arc<Snapshot>) {
        self.current.store(snapshot.clone());
        self.swaps.send_replace(snapshot);
    }
}

/// Fingerprints of the files of the applied config and of the last rejected one: a file
/// event that changes neither is not a reload.
#[derive(Default)]
struct Prints {
    applied: Option<u64>,
    rejected: Option<u64>,
}

/// Builds and swaps snapshots, one trigger at a time. Built once the first snapshot is
/// current and the listeners are bound; [`Applier::stop`] hands the listeners back.
pub struct Applier {
    published: Published,
    applied: Applied,
    /// Each broker's state by pool and identity, for the snapshots to come.
    brokers: BrokerStates,
    /// The last members each discovered pool's source found (for the spec applied).
    members: HashMap<String, Members>,
    /// When the first departed member of a discovered pool that holds is due to leave it: the
    /// pool is rebuilt then ([`Applier::expire_departed`]).
    departures: BTreeMap<String, Instant>,
    listeners: ListenerSet,
    /// The process's connection cap, shared with the listeners.
    limit: Arc<Semaphore>,
    evictions: Evictions,
    prints: Prints,
    metrics: Arc<Metrics>,
}

impl Applier {
    /// An applier of what follows `applied`, whose snapshot `published` holds.
    pub fn new(
        applied: Applied,
        published: Published,
        metrics: Arc<Metrics>,
        conns: Arc<Registry>,
        listeners: ListenerSet,
        limit: Arc<Semaphore>,
    ) -> Applier {
        let brokers = BrokerStates::of(&published.current.load());
        let prints =
            Prints { applied: applied.source.as_deref().map(|s| fingerprint(s, &applied.files)), rejected: None };
        let evictions = Evictions {
            conns,
            current: published.current.clone(),
            by_pool: HashMap::new(),
            stop: CancellationToken::new(),
        };
        Applier {
            published,
            applied,
            brokers,
            members: HashMap::new(),
            departures: BTreeMap::new(),
            listeners,
            limit,
            evictions,
            prints,
            metrics,
        }
    }

    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    /// Stops pending closes and returns the listeners (still accepting) for the drain to close.
    pub fn stop(self) -> ListenerSet {
        self.evictions.stop.cancel();
        self.listeners
    }

    /// Reads, validates and applies the config file (on SIGHUP or a file change); on any
    /// problem the running snapshot stays.
    pub async fn reload(&mut self, trigger: &Trigger) {
        let Some(path) = self.applied.source.clone() else {
            tracing::warn!(target: "harbormaster::reload", trigger = trigger.as_str(), "no config file to reload");
            return;
        };
        match config::load(&path) {
            Err(problems) => {
                let lines: Vec<String> = problems.0.iter().map(|p| p.to_string()).collect();
                let print = xxhash_rust::xxh3::xxh3_64(lines.join("\n").as_bytes());
                if *trigger == Trigger::Files && self.prints.rejected == Some(print) {
                    return;
                }
                self.prints.rejected = Some(print);
                self.reject(&path, trigger, &lines);
            }
            Ok(loaded) => {
                let print = fingerprint(&path, &loaded.files);
                // Unchanged since applied, and nothing rejected since: not a reload.
                if *trigger == Trigger::Files && self.prints.applied == Some(print) && self.prints.rejected.is_none() {
                    tracing::debug!(target: "harbormaster::reload", config = %path.display(), "files unchanged; nothing to reload");
                    return;
                }
                for w in &loaded.warnings {
                    tracing::warn!(target: "harbormaster::reload", key = %w.path, "{}", w.message);
                }
                match self.apply(loaded).await {
                    Ok(changes) => {
                        self.prints.applied = Some(print);
                        self.prints.rejected = None;
                        self.metrics.config_reloaded(true);
                        tracing::info!(
                            target: "harbormaster::reload",
                            config = %path.display(),
                            trigger = trigger.as_str(),
                            changes = %if changes.is_empty() { "none".to_string() } else { changes.join("; ") },
                            "config reloaded"
                        );
                    }
                    Err(problem) => {
                        self.prints.rejected = Some(print);
                        self.reject(&path, trigger, &[problem]);
                    }
                }
            }
        }
    }

    fn reject(&self, path: &Path, trigger: &Trigger, problems: &[String]) {
        self.metrics.config_reloaded(false);
        tracing::error!(
            target: "harbormaster::reload",
            config = %path.display(),
            trigger = trigger.as_str(),
            problems = problems.len(),
            "config reload rejected; the running configuration stays"
        );
        for p in problems {
            tracing::error!(target: "harbormaster::reload", problem = %p, "invalid config");
        }
    }

    /// Applies a validated config: binds new listeners (failing here rejects the reload, with
    /// nothing changed), swaps the snapshot, closes listeners that went away, follows
    /// `max_connections`. Returns a description of what changed.
    async fn apply(&mut self, loaded: Loaded) -> Result<Vec<String>, String> {
        let old = self.published.current.load_full();
        let next = Applied::of(&loaded);
        let mut snap = loaded.snapshot;
        let mut pools = Vec::with_capacity(snap.pools.len());
        for p in &snap.pools {
            let backends = match next.discovery.get(&p.name) {
                Some(spec) => {
                    // Members found by the source as applied; a changed source is waited for.
                    let members = self
                        .members
                        .get(&p.name)
                        .filter(|_| self.applied.discovery.get(&p.name) == Some(spec))
                        .cloned();
                    match (members, old.pool(&p.name)) {
                        (Some(members), before) => {
                            let found = self.backends_from_members(&p.name, &members);
                            self.with_departed(p, before.map(|b| &**b), found)
                        }
                        // Until the (new) source answers, the pool keeps the brokers it has.
                        (None, Some(before)) => before.backends.clone(),
                        (None, None) => self.continued(p),
                    }
                }
                None => self.continued(p),
            };
            let mut pool = Pool::clone(p);
            pool.backends = backends;
            pools.push(Arc::new(pool));
        }
        snap.pools = pools;
        let prepared = self.listeners.prepare(&snap).await?;

        let mut changes = describe(&old, &snap);
        if next.admin != self.applied.admin {
            tracing::warn!(target: "harbormaster::reload", "[admin] changed: takes effect at the next restart");
            changes.push("[admin] changed (needs a restart)".into());
        }
        if next.log != self.applied.log {
            tracing::warn!(target: "harbormaster::reload", "[log] changed: takes effect at the next restart");
            changes.push("[log] changed (needs a restart)".into());
        }
        self.resize_limit(next.process.max_connections);
        // A pool that is gone entirely: its brokers leave under the policy it had.
        let mut policies = next.on_removed.clone();
        for (pool, policy) in &self.applied.on_removed {
            policies.entry(pool.clone()).or_insert(*policy);
        }
        let before = std::mem::replace(&mut self.applied, next);
        // Members belong to the source that found them: a pool whose source changed (or that
        // is no longer discovered) waits for the new one.
        let applied = &self.applied;
        self.members
            .retain(|pool, _| applied.discovery.get(pool).is_some_and(|s| before.discovery.get(pool) == Some(s)));
        let snap = self.swap(&old, snap, &policies);
        self.listeners.commit(&snap, prepared).await;
        Ok(changes)
    }

    /// Makes `new` current, closes removed brokers' connections where the pool's policy (in
    /// `policies`) says so.
    fn swap(&mut self, old: &Snapshot, new: Snapshot, policies: &BTreeMap<String, OnRemoved>) -> Arc<Snapshot> {
        // Nothing would bring back a broker marked down in a pool without checks (it had them
        // before this reload): its brokers start over as up.
        for p in new.pools.iter().filter(|p| p.health.is_none()) {
            p.backends.iter().for_each(|b| b.forget_health());
        }
        let new = Arc::new(new);
        self.published.store(new.clone());
        for p in &old.pools {
            let kept: HashSet<&str> =
                new.pool(&p.name).map(|n| n.backends.iter().map(|b| b.name.as_str()).collect()).unwrap_or_default();
            let removed: Vec<&Arc<Backend>> = p.backends.iter().filter(|b| !kept.contains(b.name.as_str())).collect();
            if removed.is_empty() {
                continue;
            }
            match policies.get(&p.name).copied().unwrap_or(OnRemoved::Keep) {
                OnRemoved::Keep => {}
                OnRemoved::Close { rate } => self.evictions.evict(&p.name, &removed, rate),
            }
        }
        self.brokers.forget_unused();
        new
    }

    /// A discovery task published new members for `pool`: rebuild that pool, swap.
    pub fn discovered(&mut self, pool: &str, members: Members) {
        let Some(settings) = self.applied.pools.get(pool).cloned() else { return };
        if !self.applied.discovery.contains_key(pool) {
            return;
        }
        self.members.insert(pool.to_string(), members.clone());
        let old = self.published.current.load_full();
        let mut rebuilt = Pool::clone(&settings);
        let found = self.backends_from_members(pool, &members);
        rebuilt.backends = self.with_departed(&settings, old.pool(pool).map(|p| &**p), found);
        let rebuilt = Arc::new(rebuilt);
        let mut snap = Snapshot::clone(&old);
        snap.pools = old.pools.iter().map(|p| if p.name == pool { rebuilt.clone() } else { p.clone() }).collect();
        let policies = self.applied.on_removed.clone();
        self.swap(&old, snap, &policies);
        self.metrics.discovery_updated(pool);
    }

    /// When the next departed member is due to leave its pool, if any.
    pub fn next_departure(&self) -> Option<Instant> {
        self.departures.values().min().copied()
    }

    /// Rebuilds the discovered pools whose departed members are due to leave, from their last
    /// members.
    pub fn expire_departed(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self.departures.iter().filter(|(_, at)| **at <= now).map(|(p, _)| p.clone()).collect();
        for pool in due {
            self.departures.remove(&pool);
            if let Some(members) = self.members.get(&pool).cloned() {
                self.discovered(&pool, members);
            }
        }
    }

    /// `found` (the brokers of a discovered pool's members), plus, in a pool that holds, the
    /// brokers of `before` that discovery no longer lists and that went away (drained or
    /// marked down) less than `hold_timeout` ago: departed members, drained so they keep
    /// their place in every key's order and are never dialled. Notes when the first of them
    /// is due to leave.
    fn with_departed(
        &mut self,
        settings: &Pool,
        before: Option<&Pool>,
        mut found: Vec<Arc<Backend>>,
    ) -> Vec<Arc<Backend>> {
        self.departures.remove(&settings.name);
        let (Some(hold), Some(before)) = (settings.hold, before) else { return found };
        let now = Instant::now();
        let mut due: Option<Instant> = None;
        for b in &before.backends {
            if found.iter().any(|f| f.name == b.name) {
                continue;
            }
            // Drained from now on, unless it already went away (terminating, or marked down).
            b.set_draining(true);
            let Some(leaves) = b.away_since().map(|since| since + hold.timeout).filter(|at| *at > now) else {
                continue;
            };
            due = Some(due.map_or(leaves, |d| d.min(leaves)));
            found.push(Arc::new(Backend::with_state(b.name.clone(), b.addr, b.state.clone())));
        }
        if let Some(due) = due {
            self.departures.insert(settings.name.clone(), due);
        }
        found
    }

    /// Brokers for discovered members, continuing the state of the same identities.
    fn backends_from_members(&mut self, pool: &str, members: &Members) -> Vec<Arc<Backend>> {
        members.iter().map(|m| self.brokers.backend(pool, &m.name, m.addr, m.draining)).collect()
    }

    /// `p`'s brokers (as loaded) rebuilt to continue the state of the same identities.
    fn continued(&mut self, p: &Pool) -> Vec<Arc<Backend>> {
        p.backends.iter().map(|b| self.brokers.backend(&p.name, &b.name, b.addr, false)).collect()
    }

    /// Follows a changed `max_connections`: more permits at once; fewer as connections end.
    fn resize_limit(&self, max: usize) {
        let before = self.applied.process.max_connections;
        if max > before {
            self.limit.add_permits(max - before);
        } else if max < before {
            let fewer = before - max;
            let now = self.limit.forget_permits(fewer);
            if now < fewer {
                let (limit, rest) = (self.limit.clone(), u32::try_from(fewer - now).unwrap_or(u32::MAX));
                tokio::spawn(async move {
                    if let Ok(p) = limit.acquire_many_owned(rest).await {
                        p.forget();
                    }
                });
            }
        }
    }
}

/// Closing the connections of brokers that left their pool: one closer task per pool.
struct Evictions {
    conns: Arc<Registry>,
    /// The closers skip a connection whose broker is back in the current snapshot.
    current: Arc<ArcSwap<Snapshot>>,
    by_pool: HashMap<String, Evictor>,
    /// Parent of the closers.
    stop: CancellationToken,
}

/// The closer of one pool's removed brokers' connections.
struct Evictor {
    tx: mpsc::UnboundedSender<Vec<Arc<ConnHandle>>>,
    rate: Arc<AtomicU32>,
}

impl Evictions {
    /// Closes the connections to `removed` brokers of `pool` at `rate` per second.
    fn evict(&mut self, pool: &str, removed: &[&Arc<Backend>], rate: u32) {
        let mut victims: Vec<Arc<ConnHandle>> = removed.iter().flat_map(|b| self.conns.relayed_to(&b.state)).collect();
        if victims.is_empty() {
            return;
        }
        victims.sort_unstable_by_key(|h| h.id());
        let names: Vec<&str> = removed.iter().map(|b| b.name.as_str()).collect();
        tracing::info!(
            target: "harbormaster::reload",
            pool,
            brokers = %names.join(","),
            connections = victims.len(),
            close_rate = rate,
            "closing the connections of removed brokers"
        );
        let evictor = self.by_pool.entry(pool.to_string()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let rate = Arc::new(AtomicU32::new(rate));
            tokio::spawn(evictor(
                pool.to_string(),
                rx,
                rate.clone(),
                self.conns.clone(),
                self.current.clone(),
                self.stop.child_token(),
            ));
            Evictor { tx, rate }
        });
        evictor.rate.store(rate, Ordering::Relaxed);
        let _ = evictor.tx.send(victims);
    }
}

/// Closes the connections of one pool's removed brokers, batch after batch, at the pool's
/// `close_rate`. A connection whose broker is back in the pool (same identity, so the same
/// state) is left alone.
async fn evictor(
    pool: String,
    mut rx: mpsc::UnboundedReceiver<Vec<Arc<ConnHandle>>>,
    rate: Arc<AtomicU32>,
    conns: Arc<Registry>,
    current: Arc<ArcSwap<Snapshot>>,
    stop: CancellationToken,
) {
    loop {
        let batch = tokio::select! {
            b = rx.recv() => match b {
                Some(b) => b,
                None => return,
            },
            _ = stop.cancelled() => return,
        };
        let still_removed = |h: &ConnHandle| {
            let snap = current.load();
            snap.pool(&pool).is_none_or(|p| !p.backends.iter().any(|b| h.is_relayed_to(&b.state)))
        };
        let closed = tokio::select! {
            n = drain::close_at_rate(&conns, &batch, rate.load(Ordering::Relaxed), CloseCause::BrokerRemoved, still_removed) => n,
            _ = stop.cancelled() => return,
        };
        tracing::info!(target: "harbormaster::reload", pool = %pool, closed, "closed the connections of removed brokers");
    }
}

/// One line per kind of change between two snapshots.
fn describe(old: &Snapshot, new: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for l in &new.listeners {
        match old.listener(&l.name) {
            None => out.push(format!("listener {:?} added on {}", l.name, l.bind)),
            Some(o) if o.bind != l.bind => out.push(format!("listener {:?} moved {} -> {}", l.name, o.bind, l.bind)),
            Some(_) => {}
        }
    }
    for l in old.listeners.iter().filter(|l| new.listener(&l.name).is_none()) {
        out.push(format!("listener {:?} removed", l.name));
    }
    for p in &new.pools {
        let Some(o) = old.pool(&p.name) else {
            out.push(format!("pool {:?} added", p.name));
            continue;
        };
        let before: BTreeSet<&str> = o.backends.iter().map(|b| b.name.as_str()).collect();
        let after: BTreeSet<&str> = p.backends.iter().map(|b| b.name.as_str()).collect();
        let added: Vec<&str> = after.difference(&before).copied().collect();
        let removed: Vec<&str> = before.difference(&after).copied().collect();
        if !added.is_empty() {
            out.push(format!("pool {:?}: brokers added {}", p.name, added.join(",")));
        }
        if !removed.is_empty() {
            out.push(format!("pool {:?}: brokers removed {}", p.name, removed.join(",")));
        }
    }
    for p in old.pools.iter().filter(|p| new.pool(&p.name).is_none()) {
        out.push(format!("pool {:?} removed", p.name));
    }
    out
}

/// A hash of the config file and the files it references (path and contents, or the error
/// reading them).
fn fingerprint(source: &Path, files: &[PathBuf]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for p in std::iter::once(source).chain(files.iter().map(PathBuf::as_path)) {
        h.update(p.as_os_str().as_encoded_bytes());
        match std::fs::read(p) {
            Ok(bytes) => {
                h.update(&(bytes.len() as u64).to_le_bytes());
                h.update(&bytes);
            }
            Err(e) => h.update(e.to_string().as_bytes()),
        }
    }
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::discovery;
    use std::time::Duration;

    fn snap(text: &str) -> Snapshot {
        config::load_str(text, Path::new(".")).unwrap().snapshot
    }

    const BASE: &str = r#"
[[listener]]
name = "a"
bind = "127.0.0.1:0"
pool = "p"

[pool.p]
backends = ["127.0.0.1:1", { name = "b2", address = "127.0.0.1:2" }]
"#;

    /// An applier on `text` (no file behind it), its snapshot and its connection registry.
    async fn reloader(text: &str) -> (Applier, Arc<ArcSwap<Snapshot>>, Arc<Registry>) {
        let loaded = config::load_str(text, Path::new(".")).unwrap();
        let metrics = Arc::new(Metrics::new());
        let shared = Arc::new(crate::proxy::connection::Shared::new(metrics.clone(), CancellationToken::new()));
        let limit = Arc::new(Semaphore::new(loaded.process.max_connections));
        let applied = Applied::of(&loaded);
        let current = Arc::new(ArcSwap::from_pointee(loaded.snapshot));
        let tracker = tokio_util::task::TaskTracker::new();
        let mut listeners =
            ListenerSet::new(current.clone(), shared.clone(), limit.clone(), tracker, CancellationToken::new());
        let snap = current.load_full();
        let prepared = listeners.prepare(&snap).await.unwrap();
        listeners.commit(&snap, prepared).await;
        let published = Published { current: current.clone(), swaps: watch::channel(snap).0 };
        let r = Applier::new(applied, published, metrics, shared.conns.clone(), listeners, limit);
        (r, current, shared.conns.clone())
    }

    fn broker(snap: &Snapshot, name: &str) -> Arc<Backend> {
        snap.pool("p").unwrap().backends.iter().find(|b| b.name == name).unwrap().clone()
    }

    #[tokio::test]
    async fn a_reload_continues_counters_and_health_by_identity() {
        let text = format!("{BASE}health = {{ check = \"tcp\" }}\n");
        let (mut r, current, _) = reloader(&text).await;
        let before = current.load_full();
        let b2 = broker(&before, "b2");
        // A connection relayed to b2 is in flight; b2 was marked down.
        b2.active.fetch_add(1, Ordering::Relaxed);
        b2.total.fetch_add(1, Ordering::Relaxed);
        for _ in 0..3 {
            b2.record_failure(3);
        }
        assert!(!b2.is_healthy());

        // b2 moves to another address under the same name; 127.0.0.1:1 leaves; b3 arrives.
        let next = text.replace("\"127.0.0.1:1\", ", "").replace(
            "address = \"127.0.0.1:2\" }",
            "address = \"127.0.0.1:5\" }, { name = \"b3\", address = \"127.0.0.1:3\" }",
        );
        let changes = r.apply(config::load_str(&next, Path::new(".")).unwrap()).await.unwrap();
        assert!(changes.iter().any(|c| c.contains("brokers removed 127.0.0.1:1")), "{changes:?}");
        let after = current.load_full();
        let b2_now = broker(&after, "b2");
        assert!(!Arc::ptr_eq(&b2, &b2_now), "a new snapshot has new brokers");
        assert_eq!(b2_now.addr, "127.0.0.1:5".parse().unwrap());
        assert!(Arc::ptr_eq(&b2.state, &b2_now.state), "same identity, same state");
        assert!(!b2_now.is_healthy(), "health carried over");
        assert!(broker(&after, "b3").is_healthy());
        // The in-flight connection's guard ends: least-connections sees it on the new broker.
        b2.active.fetch_sub(1, Ordering::Relaxed);
        assert_eq!(b2_now.active.load(Ordering::Relaxed), 0);
        assert_eq!(b2_now.total.load(Ordering::Relaxed), 1);
        assert_eq!(r.listeners.addrs().len(), 1, "the unchanged listener kept its socket");
    }

    #[tokio::test]
    async fn health_follows_pool_and_identity_and_resets_when_nothing_holds_it() {
        let cfg = |p: &str, q: Option<&str>, health: &str| {
            let mut text = format!("[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n[pool.p]\nbackends = [{p}]\n{health}\n");
            if let Some(q) = q {
                text.push_str(&format!("\n[pool.q]\nbackends = [{q}]\n{health}\n"));
            }
            text
        };
        let at = |name: &str, port: u16| format!("{{ name = \"{name}\", address = \"127.0.0.1:{port}\" }}, ");
        let health = "health = { check = \"tcp\", rise = 2, fall = 1 }";
        let (mut r, current, _) =
            reloader(&cfg(&(at("b0", 1) + &at("b1", 2) + &at("b2", 3)), Some(&at("b0", 1)), health)).await;
        let get = |pool: &str, name: &str| {
            current.load().pool(pool).unwrap().backends.iter().find(|b| b.name == name).unwrap().clone()
        };
        // p: b0 up, b1 down, b2 down and one success into its rise; q: b0 down.
        assert!(get("p", "b1").record_failure(1));
        assert!(get("p", "b2").record_failure(1));
        assert!(!get("p", "b2").record_success(2));
        assert!(get("q", "b0").record_failure(1));

        // b1 keeps its identity under a new address (a pod with a new IP), b2 is as it was, b0
        // is gone, b3 is new; q is gone, then back with a broker named like the one that was
        // down in it.
        let next = cfg(&(at("b3", 4) + &at("b2", 3) + &at("b1", 20)), None, health);
        r.apply(config::load_str(&next, Path::new(".")).unwrap()).await.unwrap();
        assert!(!get("p", "b1").is_healthy(), "down state follows the identity, whatever the address");
        assert!(!get("p", "b2").is_healthy());
        assert!(get("p", "b2").record_success(2), "its rise streak came along too");
        assert!(get("p", "b3").is_healthy(), "a new broker starts healthy");
        let next = cfg(&(at("b3", 4) + &at("b2", 3) + &at("b1", 20)), Some(&at("b0", 1)), health);
        r.apply(config::load_str(&next, Path::new(".")).unwrap()).await.unwrap();
        assert!(get("q", "b0").is_healthy(), "nothing held q's b0 in between: it starts afresh");

        // A pool without health checks starts its brokers over as up: nothing would bring one
        // back.
        let plain = cfg(&(at("b1", 20) + &at("b2", 3)), None, "");
        r.apply(config::load_str(&plain, Path::new(".")).unwrap()).await.unwrap();
        assert!(current.load().pools[0].backends.iter().all(|b| b.is_healthy()));
    }

    #[tokio::test]
    async fn a_broker_back_while_a_connection_holds_it_continues_its_state() {
        let text = format!("{BASE}health = {{ check = \"tcp\", fall = 1 }}\n");
        let (mut r, current, conns) = reloader(&text).await;
        let b2 = broker(&current.load(), "b2");
        let conn = conns.register();
        conn.set_backend(&b2.state, None);
        assert!(b2.record_failure(1));
        drop(b2);
        let without = text.replace(", { name = \"b2\", address = \"127.0.0.1:2\" }", "");
        r.apply(config::load_str(&without, Path::new(".")).unwrap()).await.unwrap();
        r.apply(config::load_str(&text, Path::new(".")).unwrap()).await.unwrap();
        let back = broker(&current.load(), "b2");
        assert!(conn.is_relayed_to(&back.state), "the connection kept it");
        assert!(!back.is_healthy());
    }

    #[tokio::test]
    async fn discovery_updates_rebuild_the_pool_and_close_removed_brokers_connections() {
        let text = BASE.replace(
            "backends = [\"127.0.0.1:1\", { name = \"b2\", address = \"127.0.0.1:2\" }]",
            "backends = [\"127.0.0.1:1\"]\non_backend_removed = \"close\"\nclose_rate = 1000",
        );
        let (mut r, current, conns) = reloader(&text).await;
        let spec =
            DiscoverySpec::Dns { name: "x".into(), port: Some(1), interval: Duration::from_secs(1), resolver: None };
        r.applied.discovery.insert("p".into(), spec);
        let member = |name: &str, port: u16, draining: bool| discovery::Member {
            name: name.into(),
            addr: ([127, 0, 0, 1], port).into(),
            draining,
        };

        r.discovered("p", Arc::new(vec![member("pod-0", 10, false), member("pod-1", 11, false)]));
        let snap = current.load_full();
        let names: Vec<&str> = snap.pool("p").unwrap().backends.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["pod-0", "pod-1"]);
        let pod1 = broker(&snap, "pod-1");
        let on_pod1 = conns.register();
        on_pod1.set_backend(&pod1.state, None);
        let on_pod0 = conns.register();
        on_pod0.set_backend(&broker(&snap, "pod-0").state, None);

        // Members for a pool that is not discovered are not applied.
        r.discovered("q", Arc::new(vec![]));
        assert!(Arc::ptr_eq(&current.load_full(), &snap));

        // pod-0 terminating (draining), pod-1 gone: its connection is closed, pod-0's stays.
        r.discovered("p", Arc::new(vec![member("pod-0", 10, true)]));
        let snap = current.load_full();
        assert!(broker(&snap, "pod-0").is_draining());
        let cause = tokio::time::timeout(Duration::from_secs(10), on_pod1.closed()).await.expect("closed");
        assert_eq!(cause, crate::proxy::registry::CloseCause::BrokerRemoved);
        tokio::task::yield_now().await;
        assert!(tokio::time::timeout(Duration::from_millis(50), on_pod0.closed()).await.is_err());
        assert_eq!(r.metrics.value("discovery_updates_total", &[("pool", "p")]), 2.0);
    }

    #[tokio::test]
    async fn a_departed_broker_of_a_pool_that_holds_keeps_its_place_until_hold_timeout() {
        let text = BASE.replace(
            "backends = [\"127.0.0.1:1\", { name = \"b2\", address = \"127.0.0.1:2\" }]",
            "backends = [\"127.0.0.1:1\"]\non_backend_restart = \"hold\"\nhold_timeout = \"200ms\"",
        );
        let (mut r, current, _) = reloader(&text).await;
        let spec =
            DiscoverySpec::Dns { name: "x".into(), port: Some(1), interval: Duration::from_secs(1), resolver: None };
        r.applied.discovery.insert("p".into(), spec);
        let member = |name: &str, port: u16| discovery::Member {
            name: name.into(),
            addr: ([127, 0, 0, 1], port).into(),
            draining: false,
        };
        let names =
            |snap: &Snapshot| snap.pool("p").unwrap().backends.iter().map(|b| b.name.clone()).collect::<Vec<_>>();

        r.discovered("p", Arc::new(vec![member("pod-0", 10), member("pod-1", 11)]));
        // The broker the file had departs like any other.
        assert_eq!(names(&current.load()), ["pod-0", "pod-1", "127.0.0.1:1"]);
        tokio::time::sleep_until(tokio::time::Instant::from_std(r.next_departure().expect("due"))).await;
        r.expire_departed();
        assert_eq!(names(&current.load()), ["pod-0", "pod-1"]);
        let pod1 = broker(&current.load(), "pod-1");
        assert_eq!(r.next_departure(), None);

        // pod-1 restarts: gone from discovery, kept as a departed member, never a candidate.
        r.discovered("p", Arc::new(vec![member("pod-0", 10)]));
        let snap = current.load_full();
        assert_eq!(names(&snap), ["pod-0", "pod-1"]);
        let departed = broker(&snap, "pod-1");
        assert!(Arc::ptr_eq(&departed.state, &pod1.state) && !departed.in_rotation());
        assert!(departed.away_since().is_some(), "what held connections measure hold_timeout from");
        let pool = snap.pool("p").unwrap();
        assert!((0..200).all(|i| pool.candidates(format!("k{i}").as_bytes(), 2).iter().all(|b| b.name == "pod-0")));
        let due = r.next_departure().expect("a departure is due");
        // Another update before it is due keeps it.
        r.discovered("p", Arc::new(vec![member("pod-0", 10)]));
        assert_eq!(names(&current.load()), ["pod-0", "pod-1"]);
        assert_eq!(r.next_departure(), Some(due), "measured from when it went away, not from the update");

        // Back under the same identity (a new address): the same state, in rotation again.
        r.discovered("p", Arc::new(vec![member("pod-0", 10), member("pod-1", 12)]));
        let back = broker(&current.load(), "pod-1");
        assert!(Arc::ptr_eq(&back.state, &pod1.state) && back.in_rotation() && back.away_since().is_none());
        assert_eq!(r.next_departure(), None);

        // Gone again and not back within hold_timeout: the pool is rebuilt without it.
        r.discovered("p", Arc::new(vec![member("pod-0", 10)]));
        let due = r.next_departure().expect("due");
        r.expire_departed();
        assert_eq!(names(&current.load()), ["pod-0", "pod-1"], "not due yet");
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        r.expire_departed();
        assert_eq!(names(&current.load()), ["pod-0"]);
        assert_eq!(r.next_departure(), None);
    }

    #[test]
    fn describe_names_listeners_and_brokers_that_changed() {
        let old = snap(BASE);
        let new = snap(&BASE.replace("\"127.0.0.1:1\", ", "").replace("name = \"a\"", "name = \"c\""));
        let d = describe(&old, &new);
        assert!(d.contains(&"listener \"c\" added on 127.0.0.1:0".to_string()), "{d:?}");
        assert!(d.contains(&"listener \"a\" removed".to_string()), "{d:?}");
        assert!(d.contains(&"pool \"p\": brokers removed 127.0.0.1:1".to_string()), "{d:?}");
        assert!(describe(&old, &snap(BASE)).is_empty());
    }

    #[test]
    fn fingerprint_follows_contents() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "one").unwrap();
        std::fs::write(&b, "two").unwrap();
        let first = fingerprint(&a, std::slice::from_ref(&b));
        assert_eq!(first, fingerprint(&a, std::slice::from_ref(&b)));
        std::fs::write(&b, "three").unwrap();
        assert_ne!(first, fingerprint(&a, std::slice::from_ref(&b)));
        std::fs::remove_file(&b).unwrap();
        assert_ne!(first, fingerprint(&a, &[b]));
    }
}
