//! The readiness latch behind `/readyz`: ready once the first snapshot is loaded and every
//! listener is bound, as long as every pool has a healthy broker, until draining starts.
//! The startup steps and draining are one-way flags set by `app`; broker health is read from
//! the current snapshot on every check, so it follows health checks without being told.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::proxy::snapshot::Snapshot;

/// Startup progress and draining, shared by `app` (which sets them) and the admin server.
#[derive(Debug, Default)]
pub struct Readiness {
    snapshot_loaded: AtomicBool,
    listeners_bound: AtomicBool,
    draining: AtomicBool,
}

impl Readiness {
    pub fn new() -> Readiness {
        Readiness::default()
    }

    /// The first configuration snapshot is in place.
    pub fn set_snapshot_loaded(&self) {
        self.snapshot_loaded.store(true, Ordering::SeqCst);
    }

    /// Every listener of the snapshot is bound and accepting.
    pub fn set_listeners_bound(&self) {
        self.listeners_bound.store(true, Ordering::SeqCst);
    }

    /// Shutdown has begun: not ready from now on, for good.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// `Ok` when ready; otherwise the first reason why not, as one line.
    pub fn check(&self, snapshot: &Snapshot) -> Result<(), String> {
        if self.is_draining() {
            return Err("draining: shutting down, no new connections".into());
        }
        if !self.snapshot_loaded.load(Ordering::SeqCst) {
            return Err("starting: no configuration snapshot loaded yet".into());
        }
        if !self.listeners_bound.load(Ordering::SeqCst) {
            return Err("starting: listeners not bound yet".into());
        }
        for pool in &snapshot.pools {
            if pool.backends.is_empty() {
                return Err(format!("pool {:?} has no brokers", pool.name));
            }
            if !pool.backends.iter().any(|b| b.healthy.load(Ordering::Relaxed)) {
                return Err(format!("pool {:?}: none of its {} brokers is healthy", pool.name, pool.backends.len()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::config::load_str;
    use std::path::Path;

    fn snapshot() -> Snapshot {
        let text = r#"
[[listener]]
name = "a"
bind = "127.0.0.1:0"
pool = "a"

[pool.a]
backends = ["127.0.0.1:1", "127.0.0.1:2"]

[pool.b]
backends = ["127.0.0.1:3"]
"#;
        load_str(text, Path::new(".")).unwrap().snapshot
    }

    #[test]
    fn starting_then_ready_then_unhealthy_pool_then_back_then_draining() {
        let snap = snapshot();
        let r = Readiness::new();
        assert!(r.check(&snap).unwrap_err().starts_with("starting: no configuration snapshot"));
        r.set_snapshot_loaded();
        assert!(r.check(&snap).unwrap_err().starts_with("starting: listeners not bound"));
        r.set_listeners_bound();
        assert_eq!(r.check(&snap), Ok(()));

        let a = snap.pool("a").unwrap();
        a.backends[0].healthy.store(false, Ordering::Relaxed);
        assert_eq!(r.check(&snap), Ok(()), "one healthy broker is enough");
        a.backends[1].healthy.store(false, Ordering::Relaxed);
        assert_eq!(r.check(&snap), Err("pool \"a\": none of its 2 brokers is healthy".into()));
        a.backends[1].healthy.store(true, Ordering::Relaxed);
        assert_eq!(r.check(&snap), Ok(()));

        r.set_draining();
        assert!(r.check(&snap).unwrap_err().starts_with("draining"));
        assert!(r.is_draining());
    }

    #[test]
    fn draining_wins_over_everything() {
        let snap = snapshot();
        let r = Readiness::new();
        r.set_draining();
        assert!(r.check(&snap).unwrap_err().starts_with("draining"));
    }
}
