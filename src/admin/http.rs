//! The admin HTTP server: hyper 1, HTTP/1.1, on its own listener (`[admin] bind`). A plain
//! match on the path: `/healthz`, `/readyz`, `/metrics`, `/backends`, `/route`. It reads the
//! snapshot the data plane runs on, the readiness latch and the metrics registry; it never
//! touches client connections, and nothing it serves carries secrets.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::log::rfc3339;
use super::metrics::Metrics;
use super::ready::Readiness;
use super::route::{self, RouteError};
use crate::control::config::AdminSettings;
use crate::proxy::snapshot::Snapshot;

/// Admin connections served at once; more wait in the backlog. Probes and scrapes are few.
const MAX_CONNECTIONS: usize = 64;
/// A client has this long to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// What `/` and unknown paths list.
const ENDPOINTS: [&str; 5] = ["/healthz", "/readyz", "/metrics", "/backends", "/route?client_id=ID[&pool=NAME]"];

/// What the admin server reads: the data plane's current snapshot, readiness and metrics.
pub struct AdminState {
    pub current: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
}

/// Binds the admin listener and spawns the server, which runs until `stop` is cancelled.
/// `Ok(None)` when it is disabled, or when the *default* address is taken (logged as a
/// warning: the data plane still runs); a configured address that cannot be bound is an error.
pub async fn start(
    settings: &AdminSettings,
    state: Arc<AdminState>,
    stop: CancellationToken,
) -> anyhow::Result<Option<(SocketAddr, JoinHandle<()>)>> {
    if !settings.enabled {
        tracing::info!("admin server disabled ([admin] enabled = false)");
        return Ok(None);
    }
    let listener = match TcpListener::bind(settings.bind).await {
        Ok(l) => l,
        Err(e) if settings.bind_is_default => {
            tracing::warn!(
                bind = %settings.bind,
                error = %e,
                "admin server not started: its default address is taken; set [admin] bind, or enabled = false"
            );
            return Ok(None);
        }
        Err(e) => anyhow::bail!("admin.bind: cannot bind {}: {e}", settings.bind),
    };
    let addr = listener.local_addr()?;
    tracing::info!(addr = %addr, "admin server listening");
    Ok(Some((addr, tokio::spawn(serve(listener, state, stop)))))
}

/// Serves admin requests on `listener` until `stop` is cancelled; open admin connections are
/// closed then too.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let conns = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.cancelled() => break,
        };
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let state = state.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &req)) }
            });
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
            drop(permit);
        });
    }
    conns.close();
    conns.wait().await;
}

/// The router: one response per request, from the request line alone (bodies are ignored).
pub fn respond<B>(state: &AdminState, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({ "error": "only GET and HEAD are served" }));
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/healthz" => json_response(StatusCode::OK, &json!({ "status": "alive" })),
        "/readyz" => readyz(state),
        "/metrics" => metrics(state),
        "/backends" => backends(state),
        "/route" => route(state, req.uri().query().unwrap_or("")),
        "/" => json_response(StatusCode::OK, &json!({ "endpoints": ENDPOINTS })),
        _ => json_response(StatusCode::NOT_FOUND, &json!({ "error": "not found", "endpoints": ENDPOINTS })),
    }
}

fn readyz(state: &AdminState) -> Response<Full<Bytes>> {
    let snap = state.current.load();
    match state.readiness.check(&snap) {
        Ok(()) => json_response(StatusCode::OK, &json!({ "ready": true })),
        Err(reason) => json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({ "ready": false, "reason": reason })),
    }
}

fn metrics(state: &AdminState) -> Response<Full<Bytes>> {
    let snap = state.current.load();
    let ready = state.readiness.check(&snap).is_ok();
    let body = state.metrics.scrape(&snap, ready);
    response(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", body)
}

fn backends(state: &AdminState) -> Response<Full<Bytes>> {
    use std::sync::atomic::Ordering::Relaxed;
    let snap = state.current.load();
    let pools: Vec<Value> = snap
        .pools
        .iter()
        .map(|p| {
            let brokers: Vec<Value> = p
                .backends
                .iter()
                .map(|b| {
                    json!({
                        "identity": b.name,
                        "address": b.addr.to_string(),
                        "healthy": b.healthy.load(Relaxed),
                        "draining": b.is_draining(),
                        "active": b.stats.active.load(Relaxed),
                        "total": b.stats.total.load(Relaxed),
                        "last_error": b.last_error().map(|(at, e)| json!({ "at": rfc3339(at), "error": e })),
                    })
                })
                .collect();
            json!({
                "name": p.name,
                "hash_key": route::hash_key_name(p.hash_key),
                "empty_client_id": route::empty_key_name(p.empty_key),
                "backend_attempts": p.backend_attempts,
                "brokers": brokers,
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "pools": pools }))
}

fn route(state: &AdminState, query: &str) -> Response<Full<Bytes>> {
    let Some(key) = query_param(query, "client_id") else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({ "error": "client_id is required: /route?client_id=ID[&pool=NAME]" }),
        );
    };
    let pool = query_param(query, "pool").map(|p| String::from_utf8_lossy(&p).into_owned());
    let snap = state.current.load();
    match route::lookup(&snap, &key, pool.as_deref()) {
        Ok(r) => {
            let now = r.now();
            json_response(
                StatusCode::OK,
                &json!({
                    "client_id": String::from_utf8_lossy(&key),
                    "pool": r.pool.name,
                    "hash_key": route::hash_key_name(r.pool.hash_key),
                    "broker": now.map(|b| b.name.as_str()),
                    "address": now.map(|b| b.addr.to_string()),
                    "preference": r.preference.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
                    "candidates": r.candidates.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
                }),
            )
        }
        Err(e) => {
            let status = match e {
                RouteError::NoPool(_) | RouteError::NoDefaultPool => StatusCode::NOT_FOUND,
                RouteError::EmptyKey { .. } => StatusCode::BAD_REQUEST,
                RouteError::NoBrokers(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            json_response(status, &json!({ "error": e.to_string() }))
        }
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    response(status, "application/json", format!("{body}\n"))
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The value of `name` in an `application/x-www-form-urlencoded` query, percent-decoded
/// (`+` is a space; a literal `+` is `%2B`). The first occurrence wins.
pub fn query_param(query: &str, name: &str) -> Option<Vec<u8>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (form_decode(k) == name.as_bytes()).then(|| form_decode(v))
    })
}

fn form_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::config::load_str;
    use http_body_util::BodyExt;
    use std::path::Path;
    use std::sync::atomic::Ordering;

    const CONFIG: &str = r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "brokers"

[pool.brokers]
backends = [
  { name = "b0", address = "127.0.0.1:1" },
  { name = "b1", address = "127.0.0.1:2" },
  { name = "b2", address = "127.0.0.1:3" },
]

[pool.other]
backends = ["127.0.0.1:4"]
"#;

    fn state() -> AdminState {
        let loaded = load_str(CONFIG, Path::new(".")).unwrap();
        AdminState {
            current: Arc::new(ArcSwap::from_pointee(loaded.snapshot)),
            metrics: Arc::new(Metrics::new()),
            readiness: Arc::new(Readiness::new()),
        }
    }

    fn ready(state: &AdminState) {
        state.readiness.set_snapshot_loaded();
        state.readiness.set_listeners_bound();
    }

    fn call(state: &AdminState, method: Method, uri: &str) -> (StatusCode, String, String) {
        let req = Request::builder().method(method).uri(uri).body(()).unwrap();
        let resp = respond(state, &req);
        let status = resp.status();
        let ct = resp.headers().get(CONTENT_TYPE).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let body = futures_body(resp.into_body());
        (status, ct, body)
    }

    fn futures_body(body: Full<Bytes>) -> String {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let bytes = rt.block_on(body.collect()).unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn get(state: &AdminState, uri: &str) -> (StatusCode, Value) {
        let (status, ct, body) = call(state, Method::GET, uri);
        assert_eq!(ct, "application/json", "{uri}");
        assert!(body.ends_with('\n') && !body.trim_end().contains('\n'), "one line: {body:?}");
        (status, serde_json::from_str(&body).unwrap())
    }

    #[test]
    fn healthz_is_always_200() {
        let s = state();
        assert_eq!(get(&s, "/healthz").0, StatusCode::OK);
        s.readiness.set_draining();
        assert_eq!(get(&s, "/healthz").0, StatusCode::OK);
    }

    #[test]
    fn readyz_follows_startup_health_and_draining() {
        let s = state();
        let (status, body) = get(&s, "/readyz");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["ready"], false);
        assert!(body["reason"].as_str().unwrap().starts_with("starting"), "{body}");
        ready(&s);
        assert_eq!(get(&s, "/readyz"), (StatusCode::OK, json!({ "ready": true })));

        let snap = s.current.load_full();
        for b in &snap.pool("brokers").unwrap().backends {
            b.healthy.store(false, Ordering::Relaxed);
        }
        let (status, body) = get(&s, "/readyz");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body["reason"].as_str().unwrap().contains("\"brokers\""), "{body}");
        snap.pool("brokers").unwrap().backends[2].healthy.store(true, Ordering::Relaxed);
        assert_eq!(get(&s, "/readyz").0, StatusCode::OK);

        s.readiness.set_draining();
        let (status, body) = get(&s, "/readyz");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body["reason"].as_str().unwrap().starts_with("draining"), "{body}");
    }

    #[test]
    fn metrics_is_prometheus_text_with_scrape_time_gauges() {
        let s = state();
        ready(&s);
        s.current.load().pool("brokers").unwrap().backends[1].stats.active.store(7, Ordering::Relaxed);
        let (status, ct, body) = call(&s, Method::GET, "/metrics");
        assert_eq!(status, StatusCode::OK);
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        assert!(body.contains("# TYPE harbormaster_accept_errors_total counter"), "{body}");
        assert!(body.contains("harbormaster_ready 1"), "{body}");
        assert!(body.contains("harbormaster_broker_connections_active{broker=\"b1\",pool=\"brokers\"} 7"), "{body}");
        assert!(body.contains("harbormaster_build_info{"), "{body}");
        s.readiness.set_draining();
        assert!(call(&s, Method::GET, "/metrics").2.contains("harbormaster_ready 0"));
    }

    #[test]
    fn backends_lists_every_broker_with_its_state() {
        let s = state();
        let snap = s.current.load_full();
        let b1 = &snap.pool("brokers").unwrap().backends[1];
        b1.stats.active.store(2, Ordering::Relaxed);
        b1.stats.total.store(5, Ordering::Relaxed);
        b1.healthy.store(false, Ordering::Relaxed);
        b1.set_last_error("Connection refused (os error 111)");
        let (status, body) = get(&s, "/backends");
        assert_eq!(status, StatusCode::OK);
        let pools = body["pools"].as_array().unwrap();
        assert_eq!(pools.len(), 2);
        let brokers = pools.iter().find(|p| p["name"] == "brokers").unwrap();
        assert_eq!(brokers["hash_key"], "client_id");
        assert_eq!(brokers["brokers"].as_array().unwrap().len(), 3);
        let b = &brokers["brokers"][1];
        assert_eq!(b["identity"], "b1");
        assert_eq!(b["address"], "127.0.0.1:2");
        assert_eq!((b["healthy"].clone(), b["draining"].clone()), (json!(false), json!(false)));
        assert_eq!((b["active"].clone(), b["total"].clone()), (json!(2), json!(5)));
        assert_eq!(b["last_error"]["error"], "Connection refused (os error 111)");
        assert!(b["last_error"]["at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(brokers["brokers"][0]["last_error"], Value::Null);
    }

    #[test]
    fn route_uses_the_pools_ranking() {
        let s = state();
        let snap = s.current.load_full();
        let pool = snap.pool("brokers").unwrap();
        for id in ["device-1", "truck 7/a", "ü+x"] {
            let encoded: String =
                id.bytes()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == b'-' {
                            (c as char).to_string()
                        } else {
                            format!("%{c:02X}")
                        }
                    })
                    .collect();
            let (status, body) = get(&s, &format!("/route?client_id={encoded}"));
            assert_eq!(status, StatusCode::OK, "{body}");
            let want: Vec<&str> = pool.ranking(id.as_bytes()).iter().map(|b| b.name.as_str()).collect();
            assert_eq!(body["client_id"], id);
            assert_eq!(body["pool"], "brokers");
            assert_eq!(body["preference"], json!(want));
            assert_eq!(body["broker"], want[0]);
            assert_eq!(body["candidates"], json!(want));
        }
        // A down first choice: `broker` is where the data plane sends the client now.
        let first = pool.ranking(b"device-1")[0].clone();
        first.healthy.store(false, Ordering::Relaxed);
        let (_, body) = get(&s, "/route?client_id=device-1");
        assert_eq!(body["preference"][0], first.name.as_str());
        assert_eq!(body["broker"], body["preference"][1]);

        let (status, body) = get(&s, "/route?pool=other&client_id=x");
        assert_eq!(
            (status, body["pool"].clone(), body["broker"].clone()),
            (StatusCode::OK, json!("other"), json!("127.0.0.1:4"))
        );
        assert_eq!(get(&s, "/route?client_id=x&pool=nope").0, StatusCode::NOT_FOUND);
        assert_eq!(get(&s, "/route").0, StatusCode::BAD_REQUEST);
        let (status, body) = get(&s, "/route?client_id=");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body["error"].as_str().unwrap().contains("least_connections"), "{body}");
    }

    #[test]
    fn unknown_paths_and_methods_are_refused() {
        let s = state();
        assert_eq!(get(&s, "/nope").0, StatusCode::NOT_FOUND);
        let req = Request::builder().method(Method::POST).uri("/readyz").body(()).unwrap();
        let resp = respond(&s, &req);
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[ALLOW], "GET, HEAD");
        assert_eq!(call(&s, Method::HEAD, "/healthz").0, StatusCode::OK);
    }

    #[test]
    fn query_params_are_form_decoded() {
        assert_eq!(query_param("client_id=a%2Fb+c%2B&pool=p", "client_id").unwrap(), b"a/b c+");
        assert_eq!(query_param("pool=p&client_id=", "client_id").unwrap(), b"");
        assert_eq!(query_param("client_id", "client_id").unwrap(), b"");
        assert_eq!(query_param("pool=p", "client_id"), None);
        assert_eq!(query_param("client_id=100%&x", "client_id").unwrap(), b"100%");
        assert_eq!(query_param("client_id=%zz%4", "client_id").unwrap(), b"%zz%4");
        assert_eq!(query_param("client_id=%C3%BC", "client_id").unwrap(), "ü".as_bytes());
    }

    #[tokio::test]
    async fn the_server_answers_over_tcp_and_stops() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let s = Arc::new(state());
        ready(&s);
        let stop = CancellationToken::new();
        let settings = AdminSettings { enabled: true, bind: "127.0.0.1:0".parse().unwrap(), bind_is_default: false };
        let (addr, task) = start(&settings, s, stop.clone()).await.unwrap().unwrap();
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("{\"ready\":true}\n"), "{out}");
        // A kept-alive connection does not keep the server from stopping.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0);
        let disabled = AdminSettings { enabled: false, ..settings };
        assert!(start(&disabled, Arc::new(state()), CancellationToken::new()).await.unwrap().is_none());
    }
}
