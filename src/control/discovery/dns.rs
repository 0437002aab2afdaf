//! DNS discovery: resolves a (headless Service) name every `interval` and publishes the
//! addresses as members named `IP:port`. A/AAAA with the configured port; SRV (target hosts
//! resolved to addresses, the SRV port) when no port is configured. A failed lookup keeps the
//! last good answer. Owns the resolver; knows nothing of snapshots or sockets.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{publish, Member, Members};

/// Upper bound for one round of lookups (an SRV answer and its targets), whatever the
/// resolver's own timeouts add up to.
const ROUND_TIMEOUT: Duration = Duration::from_secs(30);

/// While lookups fail the pause between rounds doubles, up to this many intervals: a failing
/// DNS server is not asked faster than the interval, and soon less often.
const MAX_BACKOFF_INTERVALS: u32 = 4;

/// What one DNS pool resolves.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub pool: String,
    pub name: String,
    /// `None`: SRV.
    pub port: Option<u16>,
    pub interval: Duration,
    /// A specific server instead of the system configuration.
    pub server: Option<SocketAddr>,
}

/// Resolves `t.name` every `t.interval` (longer while lookups fail) until `stop` is cancelled
/// or nobody listens.
pub(super) async fn run(t: Target, tx: watch::Sender<Option<Members>>, stop: CancellationToken) {
    let mut resolver = None;
    let mut failures = 0u32;
    let mut last_error = String::new();
    loop {
        let round = async {
            if resolver.is_none() {
                resolver = Some(build_resolver(t.server, t.interval).map_err(|e| format!("resolver setup: {e}"))?);
            }
            let r = resolver.as_ref().expect("just built");
            // Every round asks the server: `interval` is the refresh period, not the TTL.
            r.clear_cache();
            match tokio::time::timeout(ROUND_TIMEOUT, lookup(r, &t.name, t.port)).await {
                Ok(answer) => answer,
                Err(_) => Err(format!("no answer within {ROUND_TIMEOUT:?}")),
            }
        };
        let answer = tokio::select! {
            a = round => a,
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
        };
        match answer {
            Ok(members) => {
                if failures > 0 {
                    info!(pool = %t.pool, name = %t.name, failures, "DNS discovery answers again");
                }
                failures = 0;
                last_error.clear();
                publish(&t.pool, &tx, members);
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let kept = tx.borrow().as_ref().map(|m| m.len());
                if e != last_error {
                    warn!(
                        pool = %t.pool, name = %t.name, error = %e, failures, kept_members = ?kept,
                        "DNS discovery lookup failed; keeping the last good answer"
                    );
                } else {
                    debug!(pool = %t.pool, name = %t.name, error = %e, failures, "DNS discovery lookup failed again");
                }
                last_error = e;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause(t.interval, failures)) => {}
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
        }
    }
}

/// The pause before the next round after `failures` failed rounds in a row.
fn pause(interval: Duration, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1)).min(MAX_BACKOFF_INTERVALS);
    interval.saturating_mul(factor)
}

/// The system resolver (/etc/resolv.conf) or one server (UDP, TCP on truncation). Lookups
/// prefer A records and fall back to AAAA when there are none, so a dual-stack pod counts
/// once. A query waits at most the interval (1 s to 5 s) and is sent at most twice: the next
/// round is the real retry.
fn build_resolver(server: Option<SocketAddr>, interval: Duration) -> Result<TokioResolver, String> {
    let mut builder = match server {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            Resolver::builder_with_config(ResolverConfig::from_name_servers(vec![ns]), TokioRuntimeProvider::default())
        }
        None => TokioResolver::builder_tokio().map_err(|e| e.to_string())?,
    };
    let opts = builder.options_mut();
    opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
    opts.timeout = interval.clamp(Duration::from_secs(1), Duration::from_secs(5));
    opts.attempts = 1;
    builder.build().map_err(|e| e.to_string())
}

/// One round: the members `name` stands for now, or why that is unknown.
async fn lookup(r: &TokioResolver, name: &str, port: Option<u16>) -> Result<Vec<Member>, String> {
    let addrs = match port {
        Some(port) => {
            let ips = r.lookup_ip(name).await.map_err(|e| e.to_string())?;
            ips.iter().map(|ip| SocketAddr::new(ip, port)).collect::<Vec<_>>()
        }
        None => {
            let srv = r.srv_lookup(name).await.map_err(|e| e.to_string())?;
            let targets: Vec<_> = srv
                .answers()
                .iter()
                .filter_map(|rec| match &rec.data {
                    // A target of "." means "no service here".
                    RData::SRV(s) if !s.target.is_root() => Some((s.target.clone(), s.port)),
                    _ => None,
                })
                .collect();
            let resolved = futures::future::join_all(targets.iter().map(|(t, _)| r.lookup_ip(t.clone()))).await;
            let mut addrs = Vec::new();
            for ((target, port), ips) in targets.iter().zip(resolved) {
                match ips {
                    Ok(ips) => addrs.extend(ips.iter().map(|ip| SocketAddr::new(ip, *port))),
                    // A target without addresses is left out; any other failure fails the
                    // round, so a flaky server never shrinks the pool.
                    Err(e) if e.is_no_records_found() => {
                        warn!(name, target = %target, "SRV target has no A/AAAA records; left out")
                    }
                    Err(e) => return Err(format!("SRV target {target}: {e}")),
                }
            }
            addrs
        }
    };
    if addrs.is_empty() {
        return Err("the answer names no address".into());
    }
    Ok(addrs.into_iter().map(Member::from_addr).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_stretch_the_pause_up_to_four_intervals() {
        let i = Duration::from_millis(200);
        let got: Vec<u128> = (0..7).map(|f| pause(i, f).as_millis()).collect();
        assert_eq!(got, [200, 200, 400, 800, 800, 800, 800]);
        assert_eq!(pause(i, u32::MAX), Duration::from_millis(800));
    }
}
