//! `sink`: a backend that stands in for a broker so no broker is the bottleneck. It takes a
//! PROXY v1/v2 header or none (parsed with harbormaster's own inbound parser), answers CONNECT
//! with CONNACK and PINGREQ with PINGRESP, discards PUBLISH, and echoes a PUBLISH with RETAIN
//! set. An idle connection holds no buffer: reads go through one per-thread buffer.
//!
//! On its `--ws-listen` addresses it is a WebSocket backend (what a proxy that tunnels the
//! upgrade, such as HAProxy in HTTP mode, needs behind it): after the PROXY header the upgrade
//! request is checked and answered with harbormaster's own parser, the client's frames are
//! decoded in place with harbormaster's own decoder, and the answers leave as binary frames; a
//! ping gets its pong, a close frame its close frame.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use harbormaster::proxy::inbound::{self, InboundError};
use harbormaster::proxy::websocket::{self as hmws, Decoder, WebSocketSpec};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};

use crate::mqtt::{Scanner, Seen};
use crate::stats::{self, Count};

#[derive(clap::Args, Debug)]
pub struct SinkOpts {
    /// Addresses to listen on (comma-separated).
    #[arg(long, default_value = "127.0.0.1:1884", value_delimiter = ',')]
    pub listen: Vec<SocketAddr>,
    /// Addresses that speak MQTT over WebSocket (comma-separated): the PROXY header as on
    /// --listen, then the upgrade, then MQTT in frames.
    #[arg(long, value_delimiter = ',')]
    pub ws_listen: Vec<SocketAddr>,
    /// The path the WebSocket listeners accept upgrades on.
    #[arg(long, default_value = "/mqtt")]
    pub ws_path: String,
    /// PROXY header: "auto" (v1, v2 or none), "required" or "none".
    #[arg(long, default_value = "auto", value_parser = ["auto", "required", "none"])]
    pub proxy: String,
    /// Exit after this long even without a signal.
    #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
    pub max_time: Duration,
    /// Print a progress line every second.
    #[arg(long)]
    pub progress: bool,
}

#[derive(Default)]
struct SinkStats {
    accepted: Count,
    open: Count,
    proxy_v1: Count,
    proxy_v2: Count,
    no_proxy: Count,
    ws_upgrades: Count,
    bad: Count,
    connects: Count,
    pings: Count,
    publishes: Count,
    echoed: Count,
    bytes: Count,
}

impl SinkStats {
    fn add(&self, now: Seen, before: Seen) {
        self.connects.add(now.connects - before.connects);
        self.pings.add(now.pings - before.pings);
        self.publishes.add(now.publishes - before.publishes);
        self.echoed.add(now.echoed - before.echoed);
        self.bytes.add(now.bytes - before.bytes);
    }

    fn to_json(&self) -> Value {
        json!({
            "accepted": self.accepted.get(),
            "open": self.open.get(),
            "proxy_v1": self.proxy_v1.get(),
            "proxy_v2": self.proxy_v2.get(),
            "no_proxy": self.no_proxy.get(),
            "ws_upgrades": self.ws_upgrades.get(),
            "bad_streams": self.bad.get(),
            "connects": self.connects.get(),
            "pings": self.pings.get(),
            "publishes": self.publishes.get(),
            "echoed": self.echoed.get(),
            "bytes": self.bytes.get(),
        })
    }
}

thread_local! {
    static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; 64 * 1024].into_boxed_slice());
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Auto,
    Required,
    None,
}

enum Step {
    Data,
    Again,
    End,
}

pub async fn run(o: SinkOpts) -> anyhow::Result<Value> {
    let mode = match o.proxy.as_str() {
        "required" => Mode::Required,
        "none" => Mode::None,
        _ => Mode::Auto,
    };
    let st = Arc::new(SinkStats::default());
    let spec = Arc::new(WebSocketSpec { path: o.ws_path.clone(), origins: Vec::new() });
    let addrs = o.listen.iter().map(|a| (a, None)).chain(o.ws_listen.iter().map(|a| (a, Some(spec.clone()))));
    for (addr, ws) in addrs {
        let l = harbormaster::proxy::listener::bind(*addr)?;
        let kind = if ws.is_some() { "WebSocket " } else { "" };
        eprintln!("harbormaster-bench: sink listening ({kind}MQTT) on {}", l.local_addr()?);
        let st = st.clone();
        tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        st.accepted.inc();
                        tokio::spawn(conn(s, st.clone(), mode, ws.clone()));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let end = tokio::time::sleep(o.max_time);
    tokio::pin!(end);
    let progress = stats::progress_wanted(o.progress);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = &mut end => break,
            _ = tick.tick() => if progress {
                stats::progress(&format!(
                    "sink: open {} accepted {} connects {} pings {} publishes {} MB {:.1}",
                    st.open.get(), st.accepted.get(), st.connects.get(), st.pings.get(), st.publishes.get(),
                    st.bytes.get() as f64 / 1e6
                ));
            },
        }
    }
    if progress {
        stats::progress_done();
    }
    Ok(json!({ "mode": "sink", "sink": st.to_json() }))
}

/// Where a WebSocket connection is.
enum Ws {
    /// A raw MQTT listener.
    Raw,
    /// Reading the upgrade request (the bytes so far).
    Upgrade(Arc<WebSocketSpec>, Vec<u8>),
    /// Upgraded: the client's frames.
    Frames(Box<Decoder>),
}

/// One connection's state between reads.
struct Conn {
    /// The PROXY header's bytes so far; `None` once it is read (or not expected).
    pre: Option<Vec<u8>>,
    ws: Ws,
    sc: Scanner,
    /// The MQTT answers of a WebSocket connection, before they are framed.
    mq: Vec<u8>,
    out: Vec<u8>,
    /// Close once `out` is written: a close frame or a refused upgrade.
    finish: bool,
}

const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PONG: u8 = 0xA;

async fn conn(mut s: TcpStream, st: Arc<SinkStats>, mode: Mode, ws: Option<Arc<WebSocketSpec>>) {
    st.open.inc();
    let _ = s.set_nodelay(true);
    let mut c = Conn {
        pre: if mode == Mode::None { None } else { Some(Vec::new()) },
        ws: ws.map_or(Ws::Raw, |spec| Ws::Upgrade(spec, Vec::new())),
        sc: Scanner::default(),
        mq: Vec::new(),
        out: Vec::new(),
        finish: false,
    };
    loop {
        if s.readable().await.is_err() {
            break;
        }
        let before = c.sc.seen;
        let step = BUF.with(|b| {
            let mut b = b.borrow_mut();
            match s.try_read(&mut b[..]) {
                Ok(0) => Step::End,
                Ok(n) => process(&mut b[..n], &mut c, &st, mode),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Again,
                Err(_) => Step::End,
            }
        });
        st.add(c.sc.seen, before);
        match step {
            Step::End => break,
            Step::Again => continue,
            Step::Data => {}
        }
        if !c.out.is_empty() {
            if s.write_all(&c.out).await.is_err() {
                break;
            }
            c.out.clear();
            if c.out.capacity() > 4096 {
                c.out = Vec::new();
            }
        }
        if c.finish {
            let _ = s.shutdown().await;
            break;
        }
        // Over WebSocket the client's close frame ends the session, not its DISCONNECT.
        if c.sc.disconnected && matches!(c.ws, Ws::Raw) {
            break;
        }
    }
    st.open.dec();
}

/// The PROXY header (when expected), then the stream.
fn process(data: &mut [u8], c: &mut Conn, st: &SinkStats, mode: Mode) -> Step {
    let Some(mut p) = c.pre.take() else {
        return stream(data, c, st);
    };
    if !p.is_empty() {
        p.extend_from_slice(data);
    }
    let parsed = inbound::parse(if p.is_empty() { data } else { &p });
    match parsed {
        Ok(None) => {
            if p.is_empty() {
                p.extend_from_slice(data);
            }
            if p.len() > inbound::V2_MAX_LEN {
                st.bad.inc();
                return Step::End;
            }
            c.pre = Some(p);
            Step::Data
        }
        Ok(Some(h)) => {
            let joined: &mut [u8] = if p.is_empty() { data } else { &mut p };
            if joined.first() == Some(&b'P') {
                st.proxy_v1.inc();
            } else {
                st.proxy_v2.inc();
            }
            stream(&mut joined[h.len..], c, st)
        }
        Err(InboundError::NotProxy) if mode == Mode::Auto => {
            st.no_proxy.inc();
            stream(if p.is_empty() { data } else { &mut p }, c, st)
        }
        Err(_) => {
            st.bad.inc();
            Step::End
        }
    }
}

/// The bytes after the PROXY header: MQTT, or the upgrade request and then frames.
fn stream(data: &mut [u8], c: &mut Conn, st: &SinkStats) -> Step {
    let feed = |sc: &mut Scanner, out: &mut Vec<u8>, d: &[u8]| match sc.feed(d, out) {
        Ok(()) => Step::Data,
        Err(_) => {
            st.bad.inc();
            Step::End
        }
    };
    let dec = match &mut c.ws {
        Ws::Raw => return feed(&mut c.sc, &mut c.out, data),
        Ws::Upgrade(spec, req) => {
            req.extend_from_slice(data);
            match hmws::parse_upgrade(req, spec) {
                Ok(None) => return Step::Data,
                Err(e) => {
                    st.bad.inc();
                    c.out.extend_from_slice(e.refusal.response());
                    c.finish = true;
                    return Step::Data;
                }
                Ok(Some(a)) => {
                    st.ws_upgrades.inc();
                    c.out.extend_from_slice(&a.response);
                    let mut rest = req.split_off(a.head_len);
                    c.ws = Ws::Frames(Box::new(Decoder::new(u64::MAX)));
                    return if rest.is_empty() { Step::Data } else { stream(&mut rest, c, st) };
                }
            }
        }
        Ws::Frames(dec) => dec,
    };
    let n = match dec.decode(data) {
        Ok(n) => n,
        Err(e) => {
            st.bad.inc();
            hmws::frame_header(OP_CLOSE, 2, &mut c.out);
            c.out.extend_from_slice(&e.code.to_be_bytes());
            c.finish = true;
            return Step::Data;
        }
    };
    if let Some(p) = dec.pong.take() {
        hmws::frame_header(OP_PONG, p.len(), &mut c.out);
        c.out.extend_from_slice(&p);
    }
    let closed = dec.closed;
    let step = feed(&mut c.sc, &mut c.mq, &data[..n]);
    if !c.mq.is_empty() {
        hmws::frame_header(OP_BINARY, c.mq.len(), &mut c.out);
        c.out.extend_from_slice(&c.mq);
        c.mq.clear();
        if c.mq.capacity() > 4096 {
            c.mq = Vec::new();
        }
    }
    if let Some(code) = closed {
        hmws::frame_header(OP_CLOSE, 2, &mut c.out);
        c.out.extend_from_slice(&code.to_be_bytes());
        c.finish = true;
    }
    step
}
