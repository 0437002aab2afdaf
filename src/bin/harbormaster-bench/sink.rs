//! `sink`: a backend that stands in for a broker so no broker is the bottleneck. It takes a
//! PROXY v1/v2 header or none (parsed with harbormaster's own inbound parser), answers CONNECT
//! with CONNACK and PINGREQ with PINGRESP, discards PUBLISH, and echoes a PUBLISH with RETAIN
//! set. An idle connection holds no buffer: reads go through one per-thread buffer.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use harbormaster::proxy::inbound::{self, InboundError};
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
    for addr in &o.listen {
        let l = harbormaster::proxy::listener::bind(*addr)?;
        eprintln!("harbormaster-bench: sink listening on {}", l.local_addr()?);
        let st = st.clone();
        tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        st.accepted.inc();
                        tokio::spawn(conn(s, st.clone(), mode));
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

async fn conn(mut s: TcpStream, st: Arc<SinkStats>, mode: Mode) {
    st.open.inc();
    let _ = s.set_nodelay(true);
    let mut pre: Option<Vec<u8>> = if mode == Mode::None { None } else { Some(Vec::new()) };
    let mut sc = Scanner::default();
    let mut out = Vec::new();
    loop {
        if s.readable().await.is_err() {
            break;
        }
        let before = sc.seen;
        let step = BUF.with(|b| {
            let mut b = b.borrow_mut();
            match s.try_read(&mut b[..]) {
                Ok(0) => Step::End,
                Ok(n) => process(&b[..n], &mut pre, &mut sc, &mut out, &st, mode),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Again,
                Err(_) => Step::End,
            }
        });
        st.add(sc.seen, before);
        match step {
            Step::End => break,
            Step::Again => continue,
            Step::Data => {}
        }
        if !out.is_empty() {
            if s.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
            if out.capacity() > 4096 {
                out = Vec::new();
            }
        }
        if sc.disconnected {
            break;
        }
    }
    st.open.dec();
}

fn process(
    data: &[u8],
    pre: &mut Option<Vec<u8>>,
    sc: &mut Scanner,
    out: &mut Vec<u8>,
    st: &SinkStats,
    mode: Mode,
) -> Step {
    let feed = |sc: &mut Scanner, out: &mut Vec<u8>, d: &[u8]| match sc.feed(d, out) {
        Ok(()) => Step::Data,
        Err(_) => {
            st.bad.inc();
            Step::End
        }
    };
    let Some(mut p) = pre.take() else {
        return feed(sc, out, data);
    };
    if !p.is_empty() {
        p.extend_from_slice(data);
    }
    let joined: &[u8] = if p.is_empty() { data } else { &p };
    match inbound::parse(joined) {
        Ok(None) => {
            if p.is_empty() {
                p.extend_from_slice(data);
            }
            if p.len() > inbound::V2_MAX_LEN {
                st.bad.inc();
                return Step::End;
            }
            *pre = Some(p);
            Step::Data
        }
        Ok(Some(h)) => {
            if joined.first() == Some(&b'P') {
                st.proxy_v1.inc();
            } else {
                st.proxy_v2.inc();
            }
            feed(sc, out, &joined[h.len..])
        }
        Err(InboundError::NotProxy) if mode == Mode::Auto => {
            st.no_proxy.inc();
            feed(sc, out, joined)
        }
        Err(_) => {
            st.bad.inc();
            Step::End
        }
    }
}
