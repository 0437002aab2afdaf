//! A small fake Kubernetes API server for discovery tests: list and watch of
//! `discovery.k8s.io/v1` EndpointSlices per namespace, with label selectors, rising
//! resourceVersions, BOOKMARK events, compaction (`410 Gone`) that forces a watcher to list
//! again, and restarts: every connection cut, a few refused, and resumed watches expired.
//! HTTP/1.1 over plain TCP on an ephemeral loopback port (hyper 1), on its own thread and
//! runtime, so sync and async tests can use it alike. Every request is recorded.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const PREFIX: &str = "/apis/discovery.k8s.io/v1/namespaces/";

/// One request the server saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeRequest {
    pub namespace: String,
    pub watch: bool,
    /// Decoded query parameters.
    pub query: BTreeMap<String, String>,
}

/// One open watch: where its events go, and what it selects.
struct Watch {
    namespace: String,
    selector: String,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct Store {
    /// The last resourceVersion handed out.
    rv: u64,
    /// Watches from a resourceVersion below this get `410 Gone`.
    compacted: u64,
    /// (namespace, name) → object.
    objects: BTreeMap<(String, String), Value>,
    /// Every change: (resourceVersion, namespace, type, object).
    history: Vec<(u64, String, &'static str, Value)>,
    watches: Vec<Watch>,
    requests: Vec<KubeRequest>,
    /// Connections still to be refused (closed as soon as accepted).
    refuse: usize,
    /// Connections refused so far.
    refused: usize,
    /// When each watch from a compacted resourceVersion was answered `410 Gone`.
    expired: Vec<Instant>,
}

impl Store {
    fn emit(&mut self, namespace: &str, kind: &'static str, object: Value) {
        let rv = self.rv;
        self.history.push((rv, namespace.to_string(), kind, object.clone()));
        let line = event_line(kind, &object);
        self.watches.retain(|w| {
            if w.namespace != namespace || !selects(&w.selector, &object) {
                return !w.tx.is_closed();
            }
            w.tx.send(line.clone()).is_ok()
        });
    }
}

/// The fake API server; stopped when dropped.
pub struct FakeKube {
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    /// Cancelled to cut every connection open now; replaced for the ones after.
    conns: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl FakeKube {
    pub fn start() -> FakeKube {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let store = Arc::new(Mutex::new(Store { rv: 100, ..Store::default() }));
        let stop = CancellationToken::new();
        let conns = Arc::new(Mutex::new(CancellationToken::new()));
        let (s, c, st) = (store.clone(), conns.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(serve(listener, s, c, st));
        });
        FakeKube { addr, store, conns, stop, thread: Some(thread) }
    }

    /// `http://127.0.0.1:PORT`, for `kube::Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces an object (an EndpointSlice as JSON) in `namespace`; it gets the
    /// next resourceVersion. Returns that version.
    pub fn apply(&self, namespace: &str, mut object: Value) -> u64 {
        let mut s = self.store.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let name = object["metadata"]["name"].as_str().expect("metadata.name").to_string();
        object["metadata"]["namespace"] = json!(namespace);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = (namespace.to_string(), name);
        let kind = if s.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        s.objects.insert(key, object.clone());
        s.emit(namespace, kind, object);
        rv
    }

    /// Deletes an object; a no-op when it does not exist.
    pub fn delete(&self, namespace: &str, name: &str) {
        let mut s = self.store.lock().unwrap();
        let Some(mut object) = s.objects.remove(&(namespace.to_string(), name.to_string())) else { return };
        s.rv += 1;
        object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        s.emit(namespace, "DELETED", object);
    }

    /// Sends a BOOKMARK with the current resourceVersion to every open watch.
    pub fn bookmark(&self) {
        let mut s = self.store.lock().unwrap();
        let line = event_line(
            "BOOKMARK",
            &json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": { "resourceVersion": s.rv.to_string() },
            }),
        );
        s.watches.retain(|w| w.tx.send(line.clone()).is_ok());
    }

    /// Compacts history: the resourceVersion moves on (as other objects' writes move it in
    /// a real cluster) and a watch from any older one gets `410 Gone`.
    pub fn compact(&self) {
        let mut s = self.store.lock().unwrap();
        s.rv += 1;
        s.compacted = s.rv;
    }

    /// Ends every open watch normally (as the apiserver does at `timeoutSeconds`): a watcher
    /// resumes from its last resourceVersion.
    pub fn end_watches(&self) {
        self.store.lock().unwrap().watches.clear();
    }

    /// Compacts, then sends `410 Gone` on every open watch and ends it: the watcher must
    /// list again.
    pub fn expire_watches(&self) {
        self.compact();
        let mut s = self.store.lock().unwrap();
        let line = event_line("ERROR", &gone());
        for w in s.watches.drain(..) {
            let _ = w.tx.send(line.clone());
        }
    }

    /// A restart of the API server: every connection is cut mid-stream (no clean end of a
    /// watch), the next `refuse` connections are closed as soon as they are accepted (the
    /// server is not up yet; as a load balancer in front of it answers), and the history is
    /// compacted, as a restarted apiserver's watch cache starts at the current
    /// resourceVersion: a resumed watch gets an ERROR event with a `410 Gone` Status, reason
    /// "Expired", and the watcher must list again.
    pub fn restart(&self, refuse: usize) {
        // The server is down (refusing, history compacted) before the connections are cut:
        // a watcher reconnecting at once must meet the restarted server, not the old one.
        {
            let mut s = self.store.lock().unwrap();
            s.rv += 1;
            s.compacted = s.rv;
            s.watches.clear();
            s.refuse = refuse;
        }
        let old = std::mem::take(&mut *self.conns.lock().unwrap());
        old.cancel();
    }

    /// Connections refused so far by [`FakeKube::restart`].
    pub fn refused(&self) -> usize {
        self.store.lock().unwrap().refused
    }

    /// When each watch from a compacted resourceVersion was answered `410 Gone`.
    pub fn expired(&self) -> Vec<Instant> {
        self.store.lock().unwrap().expired.clone()
    }

    /// Open watch streams right now.
    pub fn open_watches(&self) -> usize {
        let mut s = self.store.lock().unwrap();
        s.watches.retain(|w| !w.tx.is_closed());
        s.watches.len()
    }

    pub fn requests(&self) -> Vec<KubeRequest> {
        self.store.lock().unwrap().requests.clone()
    }

    /// How many list (not watch) requests arrived.
    pub fn list_count(&self) -> usize {
        self.store.lock().unwrap().requests.iter().filter(|r| !r.watch).count()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store.lock().unwrap().rv
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn gone() -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "too old resource version",
        "reason": "Expired",
        "code": 410,
    })
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

/// Whether `object`'s labels satisfy a selector: comma-separated `k=v`, `k==v`, `k!=v`, `k`,
/// `!k`.
pub fn selects(selector: &str, object: &Value) -> bool {
    let labels = &object["metadata"]["labels"];
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    selector.split(',').map(str::trim).filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            label(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            label(k.trim()) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            label(k.trim()).is_none()
        } else {
            label(term).is_some()
        }
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed())
        .unwrap()
}

async fn serve(
    listener: std::net::TcpListener,
    store: Arc<Mutex<Store>>,
    conns: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return,
        };
        let Ok((tcp, _)) = accepted else { continue };
        {
            let mut s = store.lock().unwrap();
            if s.refuse > 0 {
                s.refuse -= 1;
                s.refused += 1;
                drop(tcp);
                continue;
            }
        }
        let (store, stop, cut) = (store.clone(), stop.clone(), conns.lock().unwrap().clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let store = store.clone();
                async move { Ok::<_, Infallible>(handle(req, &store)) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service);
            // Biased: a cut wins over a watch that ends at the same moment, so the client sees
            // a connection lost mid-stream, not a watch that ended cleanly.
            tokio::select! {
                biased;
                _ = cut.cancelled() => {}
                _ = stop.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

fn handle(req: Request<Incoming>, store: &Mutex<Store>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query());
    let namespace = match path.strip_prefix(PREFIX).and_then(|rest| rest.strip_suffix("/endpointslices")) {
        Some(ns) if req.method() == hyper::Method::GET && !ns.contains('/') => ns.to_string(),
        _ => {
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                         "message": format!("the fake API serves only endpointslices, not {path}") }),
            )
        }
    };
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
    let mut s = store.lock().unwrap();
    s.requests.push(KubeRequest { namespace: namespace.clone(), watch, query: query.clone() });
    let matching = |s: &Store| -> Vec<Value> {
        s.objects
            .iter()
            .filter(|((ns, _), o)| *ns == namespace && selects(&selector, o))
            .map(|(_, o)| o.clone())
            .collect()
    };
    if !watch {
        let items = matching(&s);
        return json_response(
            StatusCode::OK,
            &json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSliceList",
                "metadata": { "resourceVersion": s.rv.to_string() },
                "items": items,
            }),
        );
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let from = query.get("resourceVersion").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    if from == 0 {
        // "Any version": the current objects as ADDED, then changes.
        for o in matching(&s) {
            let _ = tx.send(event_line("ADDED", &o));
        }
        s.watches.push(Watch { namespace, selector, tx });
    } else if from < s.compacted {
        // The apiserver answers an expired watch with 200 and an ERROR event.
        s.expired.push(Instant::now());
        let _ = tx.send(event_line("ERROR", &gone()));
        drop(tx);
    } else {
        for (rv, ns, kind, o) in &s.history {
            if *rv > from && *ns == namespace && selects(&selector, o) {
                let _ = tx.send(event_line(kind, o));
            }
        }
        s.watches.push(Watch { namespace, selector, tx });
    }
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(line)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}

/// An EndpointSlice of `service` as JSON: `ports` as `(name, port)`, endpoints as
/// `(pod, ip, ready, serving, terminating)` (`pod` `None`: no targetRef).
pub fn endpoint_slice(name: &str, service: &str, ports: &[(&str, u16)], endpoints: &[SliceEndpoint]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": ports.iter().map(|(n, p)| json!({ "name": n, "port": p, "protocol": "TCP" })).collect::<Vec<_>>(),
        "endpoints": endpoints.iter().map(SliceEndpoint::to_json).collect::<Vec<_>>(),
    })
}

/// One endpoint of [`endpoint_slice`].
#[derive(Debug, Clone)]
pub struct SliceEndpoint {
    pub pod: Option<String>,
    pub ip: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl SliceEndpoint {
    pub fn ready(pod: &str, ip: &str) -> SliceEndpoint {
        SliceEndpoint { pod: Some(pod.into()), ip: ip.into(), ready: true, serving: true, terminating: false }
    }

    pub fn not_ready(pod: &str, ip: &str) -> SliceEndpoint {
        SliceEndpoint { ready: false, serving: false, ..SliceEndpoint::ready(pod, ip) }
    }

    pub fn terminating(pod: &str, ip: &str) -> SliceEndpoint {
        SliceEndpoint { ready: false, serving: true, terminating: true, ..SliceEndpoint::ready(pod, ip) }
    }

    fn to_json(&self) -> Value {
        let mut e = json!({
            "addresses": [self.ip],
            "conditions": { "ready": self.ready, "serving": self.serving, "terminating": self.terminating },
        });
        if let Some(pod) = &self.pod {
            e["targetRef"] = json!({ "kind": "Pod", "namespace": "mqtt", "name": pod });
        }
        e
    }
}
