//! Kubernetes discovery: watches the `discovery.k8s.io/v1` EndpointSlices of one Service
//! (watcher + reflector; kube's default backoff after errors, a fresh list at once after
//! `410 Gone`) and publishes their merged endpoints.
//! Ready endpoints take traffic, serving-but-terminating ones drain, the rest are left out; a
//! broker is named by its pod (`targetRef.name`) so a restarted StatefulSet pod keeps its
//! clients. [`merge`] is the pure part. Knows nothing of snapshots or sockets.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::utils::Backoff;
use kube::runtime::{reflector, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{publish, Discovery, DiscoverySpec, Member, Members};

/// The label the EndpointSlice controller puts on every slice of a Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Pause before trying again to build a client (no kubeconfig yet, unreadable token).
const CLIENT_RETRY: Duration = Duration::from_secs(10);

/// After a `410 Gone` the watcher lists again at once, at most once in this long; a further
/// 410 within it waits for the backoff like any error, so an API server that expires every
/// watch is not listed in a tight loop.
const RELIST_AT_ONCE_EVERY: Duration = Duration::from_secs(10);

/// What one Kubernetes pool watches.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub pool: String,
    pub namespace: String,
    pub service: String,
    /// The port's name, or its number.
    pub port: String,
}

/// Builds a client (a kubeconfig, else the pod's ServiceAccount) and follows the slices
/// until `stop` is cancelled or nobody listens.
pub(super) async fn run(t: Target, tx: watch::Sender<Option<Members>>, stop: CancellationToken) {
    let client = loop {
        let attempt = tokio::select! {
            c = Client::try_default() => c,
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
        };
        match attempt {
            Ok(c) => break c,
            Err(e) => warn!(
                pool = %t.pool, error = %e, retry_in = ?CLIENT_RETRY,
                "Kubernetes discovery has no client (neither in-cluster nor a kubeconfig)"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(CLIENT_RETRY) => {}
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
        }
    };
    follow(client, t, tx, stop).await;
}

/// Like [`super::start`] for a Kubernetes pool, with a client the caller built (tests point
/// one at a fake API server).
pub fn start_with_client(
    client: Client,
    pool: &str,
    namespace: &str,
    service: &str,
    port: &str,
    stop: CancellationToken,
) -> Discovery {
    let (tx, rx) = watch::channel(None);
    let t = Target {
        pool: pool.to_string(),
        namespace: namespace.to_string(),
        service: service.to_string(),
        port: port.to_string(),
    };
    tokio::spawn(follow(client, t, tx, stop));
    let spec = DiscoverySpec::Kubernetes {
        namespace: namespace.to_string(),
        service: service.to_string(),
        port: port.to_string(),
    };
    Discovery { pool: pool.to_string(), spec, rx }
}

/// The watch loop: after every complete (re)list and every change, merge the store's slices
/// and publish the result if it changed.
///
/// The backoff is applied here rather than with kube's `default_backoff()`, which pauses
/// after every error the watcher reports, `410 Gone` included. A 410 is the API server saying
/// our resourceVersion is gone (history compacted, or the server restarted and its watch cache
/// starts afresh): the watcher's next step is a fresh list, and pausing before it only leaves
/// the pool on its old members longer. After an API server restart that pause came on top of
/// the retries made while it was down, and was the longest of them (13–22 s measured).
async fn follow(client: Client, t: Target, tx: watch::Sender<Option<Members>>, stop: CancellationToken) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &t.namespace);
    let config = watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={}", t.service));
    let (store, writer) = reflector::store();
    let mut events = pin!(reflector(writer, watcher(api, config)));
    let mut backoff = watcher::DefaultBackoff::default();
    let mut relisted_at: Option<Instant> = None;
    let port = PortRef::parse(&t.port);
    let mut last_notes = Vec::new();
    info!(pool = %t.pool, namespace = %t.namespace, service = %t.service, port = %t.port, "watching EndpointSlices");
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
        };
        let pause = match event {
            Some(Ok(event)) => {
                backoff.reset();
                if let watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_) = event {
                    let slices = store.state();
                    let merged = merge(slices.iter().map(|s| &**s), &port);
                    if merged.notes != last_notes {
                        for note in &merged.notes {
                            warn!(pool = %t.pool, service = %t.service, "{note}");
                        }
                        last_notes = merged.notes;
                    }
                    publish(&t.pool, &tx, merged.members);
                }
                None
            }
            Some(Err(watcher::Error::WatchError(status))) if status.code == 410 => {
                if relisted_at.is_some_and(|at| at.elapsed() < RELIST_AT_ONCE_EVERY) {
                    debug!(pool = %t.pool, "EndpointSlice watch expired (410 Gone) again; listing after the backoff");
                    backoff.next()
                } else {
                    debug!(pool = %t.pool, "EndpointSlice watch expired (410 Gone); listing again at once");
                    relisted_at = Some(Instant::now());
                    None
                }
            }
            Some(Err(e)) => {
                let pause = backoff.next();
                warn!(
                    pool = %t.pool, namespace = %t.namespace, service = %t.service, error = %e, retry_in = ?pause,
                    "EndpointSlice watch failed; keeping the last members, retrying with backoff"
                );
                pause
            }
            None => {
                warn!(pool = %t.pool, "EndpointSlice watch ended");
                return;
            }
        };
        if let Some(pause) = pause {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
            }
        }
    }
}

/// Which of a slice's ports the brokers listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    Name(String),
    Number(u16),
}

impl PortRef {
    /// A number when `s` is one (Kubernetes port names always contain a letter), else a name.
    pub fn parse(s: &str) -> PortRef {
        match s.parse::<u16>() {
            Ok(n) => PortRef::Number(n),
            Err(_) => PortRef::Name(s.to_string()),
        }
    }

    /// The TCP port of `slice` this refers to. By name, the slice must list it; by number, a
    /// slice that lists ports must list it (or an unrestricted one), and one without ports
    /// is taken at its word.
    fn resolve(&self, slice: &EndpointSlice) -> Option<u16> {
        let ports = slice.ports.as_deref().unwrap_or_default();
        let tcp = |p: &&k8s_openapi::api::discovery::v1::EndpointPort| p.protocol.as_deref().unwrap_or("TCP") == "TCP";
        match self {
            PortRef::Name(name) => ports
                .iter()
                .filter(tcp)
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| p.port)
                .and_then(|n| u16::try_from(n).ok()),
            PortRef::Number(n) => {
                let listed =
                    ports.is_empty() || ports.iter().filter(tcp).any(|p| p.port.is_none_or(|p| p == i32::from(*n)));
                listed.then_some(*n)
            }
        }
    }
}

impl std::fmt::Display for PortRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortRef::Name(n) => write!(f, "{n:?}"),
            PortRef::Number(n) => write!(f, "{n}"),
        }
    }
}

/// The merged view of a Service's slices.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Sorted by name; names and addresses unique.
    pub members: Vec<Member>,
    /// Why some slices or endpoints were left out (missing port, unsupported address type).
    pub notes: Vec<String>,
}

/// One endpoint that may take traffic, before deduplication.
struct Candidate {
    member: Member,
    /// The slice's `metadata.resourceVersion` as a number, when it is one.
    slice_version: Option<u64>,
}

/// Merges every slice of a Service into its members.
///
/// - An endpoint takes traffic when ready and not terminating; when serving and terminating
///   it is a draining member; otherwise it is left out. Unset conditions read as Kubernetes
///   documents them: ready and serving unless said otherwise, not terminating.
/// - Its address is its first one, with the slice's port chosen by `port`.
/// - Its name is its pod's name (`targetRef.name`), else `IP:port`.
/// - While slices are being updated the same endpoint may appear twice, and a pod that got a
///   new IP may appear under its old and new address: each name and each address is kept
///   once, preferring a non-draining entry, then the entry from the newer slice, then the
///   lower address, so every replica picks the same.
pub fn merge<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>, port: &PortRef) -> Merged {
    let mut notes = Vec::new();
    let mut candidates = Vec::new();
    for slice in slices {
        let slice_name = slice.metadata.name.as_deref().unwrap_or("?");
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            notes.push(format!(
                "EndpointSlice {slice_name}: address type {} is not supported; left out",
                slice.address_type
            ));
            continue;
        }
        let Some(port_number) = port.resolve(slice) else {
            if !slice.endpoints.is_empty() {
                let offered: Vec<String> = slice
                    .ports
                    .as_deref()
                    .unwrap_or_default()
                    .iter()
                    .map(|p| {
                        format!(
                            "{}={}/{}",
                            p.name.as_deref().unwrap_or(""),
                            p.port.map(|n| n.to_string()).unwrap_or_else(|| "*".into()),
                            p.protocol.as_deref().unwrap_or("TCP")
                        )
                    })
                    .collect();
                notes.push(format!(
                    "EndpointSlice {slice_name} has no TCP port {port} (it lists [{}]); its endpoints are left out",
                    offered.join(", ")
                ));
            }
            continue;
        };
        let slice_version = slice.metadata.resource_version.as_deref().and_then(|v| v.parse::<u64>().ok());
        for ep in &slice.endpoints {
            let Some(draining) = traffic(ep.conditions.as_ref()) else { continue };
            let Some(first) = ep.addresses.first() else { continue };
            let Ok(ip) = first.parse::<IpAddr>() else {
                notes.push(format!("EndpointSlice {slice_name}: {first:?} is not an IP address; left out"));
                continue;
            };
            let addr = SocketAddr::new(ip, port_number);
            let name = ep
                .target_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| addr.to_string());
            candidates.push(Candidate { member: Member { name, addr, draining }, slice_version });
        }
    }
    // Best first: taking traffic, newer slice, then a fixed order.
    candidates.sort_by(|a, b| {
        (a.member.draining, std::cmp::Reverse(a.slice_version), &a.member.name, a.member.addr).cmp(&(
            b.member.draining,
            std::cmp::Reverse(b.slice_version),
            &b.member.name,
            b.member.addr,
        ))
    });
    let (mut names, mut addrs) = (HashSet::new(), HashSet::new());
    let mut members = Vec::new();
    for c in candidates {
        if names.contains(&c.member.name) || addrs.contains(&c.member.addr) {
            continue;
        }
        names.insert(c.member.name.clone());
        addrs.insert(c.member.addr);
        members.push(c.member);
    }
    members.sort();
    Merged { members, notes }
}

/// `Some(false)`: takes traffic; `Some(true)`: draining; `None`: left out.
fn traffic(c: Option<&k8s_openapi::api::discovery::v1::EndpointConditions>) -> Option<bool> {
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    match (ready, serving, terminating) {
        (_, true, true) => Some(true),
        (true, _, false) => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// An endpoint: `(pod, ip, ready, serving, terminating)`; `None` leaves a condition unset.
    type Ep<'a> = (Option<&'a str>, &'a str, Option<bool>, Option<bool>, Option<bool>);

    fn slice(name: &str, rv: &str, ports: Value, eps: &[Ep]) -> EndpointSlice {
        let endpoints: Vec<Value> = eps
            .iter()
            .map(|(pod, ip, ready, serving, terminating)| {
                let mut e = json!({
                    "addresses": [ip],
                    "conditions": { "ready": ready, "serving": serving, "terminating": terminating },
                });
                if let Some(pod) = pod {
                    e["targetRef"] = json!({ "kind": "Pod", "namespace": "mqtt", "name": pod });
                }
                e
            })
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": "mqtt",
                "resourceVersion": rv,
                "labels": { SERVICE_NAME_LABEL: "hivemq" },
            },
            "addressType": if eps.iter().any(|e| e.1.contains(':')) { "IPv6" } else { "IPv4" },
            "ports": ports,
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn mqtt_port() -> Value {
        json!([{ "name": "mqtt", "port": 1883, "protocol": "TCP" }, { "name": "metrics", "port": 9399 }])
    }

    fn ready(pod: &'static str, ip: &'static str) -> Ep<'static> {
        (Some(pod), ip, Some(true), Some(true), Some(false))
    }

    fn members(slices: &[EndpointSlice], port: &str) -> Vec<(String, String, bool)> {
        merge(slices, &PortRef::parse(port))
            .members
            .into_iter()
            .map(|m| (m.name, m.addr.to_string(), m.draining))
            .collect()
    }

    fn m(name: &str, addr: &str, draining: bool) -> (String, String, bool) {
        (name.to_string(), addr.to_string(), draining)
    }

    #[test]
    fn conditions_decide_traffic_draining_or_nothing() {
        let s = slice(
            "hivemq-a",
            "10",
            mqtt_port(),
            &[
                ready("hivemq-0", "10.0.0.10"),
                (Some("hivemq-1"), "10.0.0.11", Some(false), Some(false), Some(false)), // starting
                (Some("hivemq-2"), "10.0.0.12", Some(false), Some(true), Some(true)),   // terminating, serving
                (Some("hivemq-3"), "10.0.0.13", Some(false), Some(false), Some(true)),  // terminating, done
                (Some("hivemq-4"), "10.0.0.14", None, None, None),                      // all unset: ready
                (Some("hivemq-5"), "10.0.0.15", Some(false), None, None),               // not ready, serving unset
                (Some("hivemq-6"), "10.0.0.16", Some(true), Some(true), Some(true)),    // contradictory: drain
            ],
        );
        assert_eq!(
            members(&[s], "mqtt"),
            [
                m("hivemq-0", "10.0.0.10:1883", false),
                m("hivemq-2", "10.0.0.12:1883", true),
                m("hivemq-4", "10.0.0.14:1883", false),
                m("hivemq-6", "10.0.0.16:1883", true),
            ]
        );
    }

    #[test]
    fn conditions_absent_altogether_mean_ready() {
        let mut s = slice("a", "1", mqtt_port(), &[ready("hivemq-0", "10.0.0.10")]);
        s.endpoints[0].conditions = None;
        assert_eq!(members(&[s], "mqtt"), [m("hivemq-0", "10.0.0.10:1883", false)]);
    }

    #[test]
    fn the_name_is_the_pod_else_the_address() {
        let s = slice(
            "a",
            "1",
            mqtt_port(),
            &[ready("hivemq-0", "10.0.0.10"), (None, "10.0.0.99", Some(true), Some(true), Some(false))],
        );
        assert_eq!(
            members(&[s], "mqtt"),
            [m("10.0.0.99:1883", "10.0.0.99:1883", false), m("hivemq-0", "10.0.0.10:1883", false)]
        );
    }

    #[test]
    fn all_slices_of_the_service_are_merged_and_sorted() {
        let a = slice("hivemq-a", "10", mqtt_port(), &[ready("hivemq-2", "10.0.0.12"), ready("hivemq-0", "10.0.0.10")]);
        let b = slice("hivemq-b", "11", mqtt_port(), &[ready("hivemq-1", "10.0.0.11")]);
        let want = [
            m("hivemq-0", "10.0.0.10:1883", false),
            m("hivemq-1", "10.0.0.11:1883", false),
            m("hivemq-2", "10.0.0.12:1883", false),
        ];
        assert_eq!(members(&[a.clone(), b.clone()], "mqtt"), want);
        assert_eq!(members(&[b, a], "mqtt"), want, "slice order does not matter");
    }

    #[test]
    fn duplicates_while_slices_are_updated_count_once() {
        // hivemq-1 moves from slice a to slice b: for a while both list it.
        let a = slice("hivemq-a", "10", mqtt_port(), &[ready("hivemq-0", "10.0.0.10"), ready("hivemq-1", "10.0.0.11")]);
        let b = slice("hivemq-b", "12", mqtt_port(), &[ready("hivemq-1", "10.0.0.11"), ready("hivemq-2", "10.0.0.12")]);
        assert_eq!(
            members(&[a, b], "mqtt"),
            [
                m("hivemq-0", "10.0.0.10:1883", false),
                m("hivemq-1", "10.0.0.11:1883", false),
                m("hivemq-2", "10.0.0.12:1883", false)
            ]
        );
    }

    #[test]
    fn a_duplicate_that_takes_traffic_beats_a_draining_one() {
        let old = (Some("hivemq-1"), "10.0.0.11", Some(false), Some(true), Some(true));
        // The draining copy is in the newer slice; the ready copy still wins.
        let a = slice("hivemq-a", "10", mqtt_port(), &[ready("hivemq-1", "10.0.0.11")]);
        let b = slice("hivemq-b", "20", mqtt_port(), &[old]);
        assert_eq!(members(&[a.clone(), b.clone()], "mqtt"), [m("hivemq-1", "10.0.0.11:1883", false)]);
        assert_eq!(members(&[b, a], "mqtt"), [m("hivemq-1", "10.0.0.11:1883", false)]);
    }

    #[test]
    fn a_pod_whose_ip_changed_is_named_once_with_its_live_address() {
        // StatefulSet pod hivemq-0 restarted: the old IP lingers, terminating, in one slice
        // while the new one is ready in another.
        let old = slice(
            "hivemq-a",
            "30",
            mqtt_port(),
            &[(Some("hivemq-0"), "10.0.0.10", Some(false), Some(true), Some(true))],
        );
        let new = slice("hivemq-b", "31", mqtt_port(), &[ready("hivemq-0", "10.0.0.50")]);
        assert_eq!(members(&[old.clone(), new.clone()], "mqtt"), [m("hivemq-0", "10.0.0.50:1883", false)]);
        // Both ready for a moment (the old slice not yet updated): the newer slice wins.
        let stale = slice("hivemq-a", "30", mqtt_port(), &[ready("hivemq-0", "10.0.0.10")]);
        assert_eq!(members(&[stale.clone(), new.clone()], "mqtt"), [m("hivemq-0", "10.0.0.50:1883", false)]);
        assert_eq!(members(&[new, stale], "mqtt"), [m("hivemq-0", "10.0.0.50:1883", false)]);
    }

    #[test]
    fn an_address_reused_by_a_new_pod_is_kept_once() {
        let a = slice("hivemq-a", "5", mqtt_port(), &[ready("hivemq-0", "10.0.0.10")]);
        let b = slice("hivemq-b", "6", mqtt_port(), &[ready("hivemq-7", "10.0.0.10")]);
        assert_eq!(members(&[a, b], "mqtt"), [m("hivemq-7", "10.0.0.10:1883", false)]);
    }

    #[test]
    fn the_port_is_chosen_by_name_or_number() {
        let s = slice("a", "1", mqtt_port(), &[ready("hivemq-0", "10.0.0.10")]);
        assert_eq!(members(std::slice::from_ref(&s), "metrics"), [m("hivemq-0", "10.0.0.10:9399", false)]);
        assert_eq!(members(std::slice::from_ref(&s), "1883"), [m("hivemq-0", "10.0.0.10:1883", false)]);
        let merged = merge([&s], &PortRef::parse("8883"));
        assert!(merged.members.is_empty());
        assert_eq!(merged.notes.len(), 1);
        // A slice without ports is taken at its word for a number, never for a name.
        let bare = slice("b", "1", json!(null), &[ready("hivemq-0", "10.0.0.10")]);
        assert_eq!(members(std::slice::from_ref(&bare), "1883"), [m("hivemq-0", "10.0.0.10:1883", false)]);
        assert!(members(&[bare], "mqtt").is_empty());
        // UDP ports do not count.
        let udp = slice(
            "c",
            "1",
            json!([{ "name": "mqtt", "port": 1883, "protocol": "UDP" }]),
            &[ready("hivemq-0", "10.0.0.10")],
        );
        assert!(members(&[udp], "mqtt").is_empty());
    }

    #[test]
    fn a_slice_missing_the_port_is_left_out_with_a_note() {
        let good = slice("hivemq-a", "1", mqtt_port(), &[ready("hivemq-0", "10.0.0.10")]);
        let other =
            slice("hivemq-b", "2", json!([{ "name": "http", "port": 8080 }]), &[ready("hivemq-1", "10.0.0.11")]);
        let empty = slice("hivemq-c", "3", json!([]), &[]);
        let merged = merge([&good, &other, &empty], &PortRef::parse("mqtt"));
        assert_eq!(merged.members.len(), 1);
        assert_eq!(merged.members[0].name, "hivemq-0");
        assert_eq!(merged.notes.len(), 1, "{:?}", merged.notes);
        assert!(
            merged.notes[0].contains("hivemq-b") && merged.notes[0].contains("http=8080/TCP"),
            "{:?}",
            merged.notes
        );
    }

    #[test]
    fn ipv6_and_fqdn_slices() {
        let v6 = slice("v6", "1", mqtt_port(), &[ready("hivemq-0", "fd00::10")]);
        assert_eq!(members(&[v6], "mqtt"), [m("hivemq-0", "[fd00::10]:1883", false)]);
        let mut fqdn = slice("f", "1", mqtt_port(), &[ready("hivemq-0", "10.0.0.10")]);
        fqdn.address_type = "FQDN".into();
        let merged = merge([&fqdn], &PortRef::parse("mqtt"));
        assert!(merged.members.is_empty());
        assert!(merged.notes[0].contains("FQDN"));
    }

    #[test]
    fn only_the_first_address_of_an_endpoint_is_used() {
        let mut s = slice("a", "1", mqtt_port(), &[ready("hivemq-0", "10.0.0.10")]);
        s.endpoints[0].addresses.push("10.0.0.11".into());
        assert_eq!(members(&[s], "mqtt"), [m("hivemq-0", "10.0.0.10:1883", false)]);
    }

    #[test]
    fn no_slices_no_members() {
        assert_eq!(merge([], &PortRef::parse("mqtt")), Merged::default());
    }

    #[test]
    fn port_refs_parse() {
        assert_eq!(PortRef::parse("mqtt"), PortRef::Name("mqtt".into()));
        assert_eq!(PortRef::parse("1883"), PortRef::Number(1883));
        assert_eq!(PortRef::parse("mqtt-tls").to_string(), "\"mqtt-tls\"");
    }
}
