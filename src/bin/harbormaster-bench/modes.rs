//! The load modes: `idle` (open N sessions and hold them, bursts on SIGUSR1), `storm` (full
//! sessions in a closed or open loop), `ping` (PINGREQ → PINGRESP latency) and `bulk`
//! (PUBLISH throughput one way). Each returns its report as JSON; every loop is bounded in
//! count and time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Semaphore};
use tokio::time::{sleep, sleep_until, timeout, Instant};

use crate::client::{self, Client, ClientOpts, Stream};
use crate::mqtt;
use crate::stats::{self, Count, Failures, Latencies, Phase};

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------------------------
// idle

#[derive(clap::Args, Debug)]
pub struct IdleOpts {
    /// Sessions to open and hold.
    pub sessions: u64,
    #[command(flatten)]
    pub client: ClientOpts,
    /// Sessions opened per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Sessions being set up at once, at most.
    #[arg(long, default_value_t = 256)]
    pub open_concurrency: usize,
    /// Hold at most this long after the last session is opened, then close them all and
    /// report (SIGINT / SIGTERM end it earlier).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// Bytes of payload of the burst every session carries on SIGUSR1: one PUBLISH that the
    /// sink sends back, so the burst crosses the proxy both ways.
    #[arg(long, default_value_t = 65536)]
    pub burst: usize,
    /// Sessions bursting at once.
    #[arg(long, default_value_t = 32)]
    pub burst_concurrency: usize,
    /// Print a progress line every second.
    #[arg(long)]
    pub progress: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ctl {
    Hold,
    Burst(u64),
    Stop,
}

#[derive(Default)]
struct IdleStats {
    held: Count,
    failed: Failures,
    dropped: Count,
    pings: Count,
    pongs: Count,
    bursts_ok: Count,
    bursts_failed: Count,
    latency: Latencies,
}

enum End {
    Dropped,
    Stop,
}

pub async fn idle(o: IdleOpts) -> anyhow::Result<Value> {
    let c = Arc::new(Client::new(o.client.clone())?);
    let st = Arc::new(IdleStats::default());
    let (ctl, ctl_rx) = watch::channel(Ctl::Hold);
    let open_sem = Arc::new(Semaphore::new(o.open_concurrency.max(1)));
    let burst_sem = Arc::new(Semaphore::new(o.burst_concurrency.max(1)));
    let burst_packet = Arc::new(mqtt::publish(b"bench/burst", o.burst, true));
    let tracker = tokio_util::task::TaskTracker::new();
    let phase = Phase::start();
    let n = o.sessions;
    let rate = o.rate.max(0.001);
    let opener = {
        let (c, st, tracker) = (c.clone(), st.clone(), tracker.clone());
        let (burst_sem, burst_packet) = (burst_sem.clone(), burst_packet.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            for i in 0..n {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                if due > Instant::now() {
                    sleep_until(due).await;
                }
                let Ok(permit) = open_sem.clone().acquire_owned().await else { return };
                let id = c.o.first_id + i;
                let (c, st, ctl) = (c.clone(), st.clone(), ctl_rx.clone());
                let (burst_sem, burst_packet) = (burst_sem.clone(), burst_packet.clone());
                tracker.spawn(async move {
                    let t0 = Instant::now();
                    let r = c.open(id).await;
                    drop(permit);
                    match r {
                        Ok(s) => {
                            st.latency.record(t0.elapsed());
                            hold(&c, s, &st, ctl, &burst_sem, &burst_packet).await
                        }
                        Err(f) => st.failed.add(f.as_str()),
                    }
                });
            }
        })
    };

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let progress = stats::progress_wanted(o.progress);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut ready_at: Option<Instant> = None;
    let mut open_seconds = 0.0;
    let mut round = 0u64;
    // (round, sessions asked to burst, bursts ok + sessions dropped before the round); a
    // failed burst drops its session, so ok + dropped reaches the count asked.
    let mut burst: Option<(u64, u64, u64)> = None;
    let mut bursts = Vec::new();
    let mut last_progress = Instant::now();
    loop {
        let hold_end = ready_at.map(|t| t + o.hold).unwrap_or_else(|| Instant::now() + o.hold + o.client.timeout);
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = sleep_until(hold_end) => break,
            _ = usr1.recv() => {
                if burst.is_none() {
                    round += 1;
                    burst = Some((round, st.held.get(), st.bursts_ok.get() + st.dropped.get()));
                    let _ = ctl.send(Ctl::Burst(round));
                    eprintln!("harbormaster-bench: burst {round}: {} sessions, {} bytes each", st.held.get(), o.burst);
                }
            }
            _ = tick.tick() => {}
        }
        let (held, failed) = (st.held.get(), st.failed.total());
        if ready_at.is_none() && held + st.dropped.get() + failed >= n {
            ready_at = Some(Instant::now());
            open_seconds = secs(phase.elapsed());
            eprintln!("harbormaster-bench: ready: {held} sessions held, {failed} failed");
        }
        if let Some((r, asked, before)) = burst {
            if st.bursts_ok.get() + st.dropped.get() - before >= asked {
                eprintln!(
                    "harbormaster-bench: burst-done {r}: {} ok, {} failed",
                    st.bursts_ok.get(),
                    st.bursts_failed.get()
                );
                bursts.push(json!({ "round": r, "sessions": asked }));
                burst = None;
                let _ = ctl.send(Ctl::Hold);
            }
        }
        if progress && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            stats::progress(&format!(
                "idle: held {held}/{n} failed {failed} dropped {} pings {}/{}",
                st.dropped.get(),
                st.pongs.get(),
                st.pings.get()
            ));
        }
    }
    if progress {
        stats::progress_done();
    }
    opener.abort();
    let held_at_end = st.held.get();
    let _ = ctl.send(Ctl::Stop);
    tracker.close();
    let _ = timeout(Duration::from_secs(10), tracker.wait()).await;
    Ok(json!({
        "mode": "idle",
        "sessions": n,
        "held_at_end": held_at_end,
        "failed": st.failed.total(),
        "failures": st.failed.to_json(),
        "dropped": st.dropped.get(),
        "open_seconds": open_seconds,
        "pings_sent": st.pings.get(),
        "pings_answered": st.pongs.get(),
        "bursts_ok": st.bursts_ok.get(),
        "bursts_failed": st.bursts_failed.get(),
        "burst_rounds": bursts,
        "connack_latency": st.latency.summary(0),
        "generator_cpu": phase.cpu_utilisation(),
    }))
}

async fn hold(
    c: &Client,
    mut s: Stream,
    st: &IdleStats,
    mut ctl: watch::Receiver<Ctl>,
    burst_sem: &Semaphore,
    packet: &[u8],
) {
    st.held.inc();
    let ka = Duration::from_secs(u64::from(c.o.keep_alive.max(1)));
    let mut next_ping = Instant::now() + ka;
    let mut rd = [0u8; 16];
    let mut burst_seen = 0u64;
    let end = loop {
        tokio::select! {
            r = s.read(&mut rd) => match r {
                Ok(0) | Err(_) => break End::Dropped,
                Ok(k) => st.pongs.add((k / 2) as u64),
            },
            _ = sleep_until(next_ping) => {
                next_ping += ka;
                if s.write_all(&mqtt::PINGREQ).await.is_err() {
                    break End::Dropped;
                }
                st.pings.inc();
            }
            ch = ctl.changed() => {
                if ch.is_err() {
                    break End::Stop;
                }
                let cmd = *ctl.borrow_and_update();
                match cmd {
                    Ctl::Stop => break End::Stop,
                    Ctl::Burst(r) if r > burst_seen => {
                        burst_seen = r;
                        let _permit = burst_sem.acquire().await;
                        match Box::pin(burst(&mut s, packet)).await {
                            Ok(()) => st.bursts_ok.inc(),
                            Err(_) => {
                                st.bursts_failed.inc();
                                break End::Dropped;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    };
    st.held.dec();
    match end {
        End::Dropped => st.dropped.inc(),
        End::Stop => {
            let _ = timeout(Duration::from_secs(2), async {
                s.write_all(&mqtt::DISCONNECT).await?;
                s.shutdown().await
            })
            .await;
        }
    }
}

/// Send one echo PUBLISH and read it back, writing and reading at once.
async fn burst(s: &mut Stream, packet: &[u8]) -> std::io::Result<()> {
    let (mut r, mut w) = tokio::io::split(s);
    let write = async {
        w.write_all(packet).await?;
        w.flush().await
    };
    let read = async {
        loop {
            let (first, rem) = client::read_header(&mut r).await?;
            client::skip(&mut r, rem).await?;
            if first & 0xF0 == 0x30 {
                return Ok(());
            }
        }
    };
    timeout(Duration::from_secs(30), async { tokio::try_join!(write, read).map(|_| ()) })
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

// ---------------------------------------------------------------------------------------------
// storm

#[derive(clap::Args, Debug)]
pub struct StormOpts {
    #[command(flatten)]
    pub client: ClientOpts,
    /// Closed loop: this many sessions in flight, each followed at once by the next.
    #[arg(long, conflicts_with = "rate")]
    pub concurrency: Option<usize>,
    /// Open loop: new sessions per second, whatever the target answers.
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long new sessions are started.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Open loop: sessions in flight at most (file descriptors are finite); arrivals beyond it
    /// are counted as shed by the generator.
    #[arg(long, default_value_t = 8000)]
    pub max_inflight: u64,
    /// Print a progress line every second.
    #[arg(long)]
    pub progress: bool,
}

#[derive(Default)]
struct StormStats {
    ok: Count,
    ok_in_window: Count,
    failed: Failures,
    shed: Count,
    inflight: Count,
    /// Sessions whose TLS handshake resumed a session (with `--resume`).
    resumed: Count,
    latency: Latencies,
}

/// One full session: connect, TLS, CONNECT → CONNACK, DISCONNECT, close. Whether its TLS
/// handshake resumed a session.
async fn full_session(c: &Client, id: u64) -> Result<bool, client::Fail> {
    let mut s = c.open(id).await?;
    let resumed = s.resumed();
    let _ = timeout(Duration::from_secs(2), async {
        s.write_all(&mqtt::DISCONNECT).await?;
        s.shutdown().await
    })
    .await;
    Ok(resumed)
}

pub async fn storm(o: StormOpts) -> anyhow::Result<Value> {
    if o.concurrency.is_none() == o.rate.is_none() {
        anyhow::bail!("storm needs --concurrency C (closed loop) or --rate R (open loop)");
    }
    let c = Arc::new(Client::new(o.client.clone())?);
    let st = Arc::new(StormStats::default());
    let next = Arc::new(AtomicU64::new(c.o.first_id));
    let phase = Phase::start();
    let start = Instant::now();
    let end = start + o.duration;
    let tracker = tokio_util::task::TaskTracker::new();
    let progress = stats::progress_wanted(o.progress);
    let ticker = {
        let st = st.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                sleep(Duration::from_secs(1)).await;
                if progress {
                    let ok = st.ok.get();
                    stats::progress(&format!(
                        "storm: {} sessions/s, ok {ok} failed {} shed {} in flight {}",
                        ok - last,
                        st.failed.total(),
                        st.shed.get(),
                        st.inflight.get()
                    ));
                    last = ok;
                }
            }
        })
    };
    let record = move |st: &StormStats, t0: Instant, r: Result<bool, client::Fail>| match r {
        Ok(resumed) => {
            let now = Instant::now();
            if resumed {
                st.resumed.inc();
            }
            st.latency.record(now - t0);
            st.ok.inc();
            if now <= end {
                st.ok_in_window.inc();
            }
        }
        Err(f) => st.failed.add(f.as_str()),
    };
    if let Some(conc) = o.concurrency {
        for _ in 0..conc.max(1) {
            let (c, st, next) = (c.clone(), st.clone(), next.clone());
            tracker.spawn(async move {
                while Instant::now() < end {
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    let t0 = Instant::now();
                    st.inflight.inc();
                    let r = full_session(&c, id).await;
                    st.inflight.dec();
                    record(&st, t0, r);
                }
            });
        }
    } else {
        let rate = o.rate.unwrap_or(1.0).max(0.001);
        let mut issued = 0u64;
        while Instant::now() < end {
            let due = (start.elapsed().as_secs_f64() * rate) as u64;
            while issued < due {
                let t0 = start + Duration::from_secs_f64(issued as f64 / rate);
                issued += 1;
                if st.inflight.get() >= o.max_inflight {
                    st.shed.inc();
                    continue;
                }
                let (c, st) = (c.clone(), st.clone());
                let id = next.fetch_add(1, Ordering::Relaxed);
                st.inflight.inc();
                tracker.spawn(async move {
                    let r = full_session(&c, id).await;
                    st.inflight.dec();
                    // Latency from the intended start: no coordinated omission.
                    record(&st, t0, r);
                });
            }
            sleep(Duration::from_millis(1)).await;
        }
    }
    tracker.close();
    let _ = timeout(o.client.timeout + Duration::from_secs(3), tracker.wait()).await;
    ticker.abort();
    if progress {
        stats::progress_done();
    }
    let window = o.duration.as_secs_f64();
    let attempted = st.ok.get() + st.failed.total();
    Ok(json!({
        "mode": "storm",
        "loop": if o.concurrency.is_some() { "closed" } else { "open" },
        "concurrency": o.concurrency,
        "offered_rate": o.rate,
        "duration_s": window,
        "elapsed_s": secs(phase.elapsed()),
        "attempted": attempted,
        "ok": st.ok.get(),
        "ok_in_window": st.ok_in_window.get(),
        "sessions_per_s": (st.ok_in_window.get() as f64 / window * 10.0).round() / 10.0,
        "failed": st.failed.total(),
        "failures": st.failed.to_json(),
        "shed_by_generator": st.shed.get(),
        "tls_resumed": st.resumed.get(),
        "connack_latency": st.latency.summary(0),
        "generator_cpu": phase.cpu_utilisation(),
    }))
}

// ---------------------------------------------------------------------------------------------
// ping

#[derive(clap::Args, Debug)]
pub struct PingOpts {
    #[command(flatten)]
    pub client: ClientOpts,
    /// Sessions pinging at once.
    #[arg(long, default_value_t = 1)]
    pub sessions: u64,
    /// Round trips measured per session.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Round trips per session before measuring.
    #[arg(long, default_value_t = 200)]
    pub warmup: u64,
    /// Pause between round trips of a session.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Points of the latency CDF in the JSON report.
    #[arg(long, default_value_t = 200)]
    pub cdf_points: usize,
    /// Print a progress line every second.
    #[arg(long)]
    pub progress: bool,
}

pub async fn ping(o: PingOpts) -> anyhow::Result<Value> {
    let c = Arc::new(Client::new(o.client.clone())?);
    let lat = Arc::new(Latencies::default());
    let failed = Arc::new(Failures::default());
    let done = Arc::new(Count::default());
    let mut sessions = Vec::new();
    for i in 0..o.sessions {
        match c.open(c.o.first_id + i).await {
            Ok(s) => sessions.push(s),
            Err(f) => failed.add(f.as_str()),
        }
    }
    let phase = Phase::start();
    let tracker = tokio_util::task::TaskTracker::new();
    let limit = Duration::from_secs(600);
    for mut s in sessions {
        let (lat, failed, done) = (lat.clone(), failed.clone(), done.clone());
        let (count, warmup, interval) = (o.count, o.warmup, o.interval);
        tracker.spawn(async move {
            let r = timeout(limit, async {
                for i in 0..warmup + count {
                    let t0 = Instant::now();
                    client::ping(&mut s).await?;
                    if i >= warmup {
                        lat.record(t0.elapsed());
                        done.inc();
                    }
                    if !interval.is_zero() {
                        sleep(interval).await;
                    }
                }
                s.write_all(&mqtt::DISCONNECT).await?;
                s.shutdown().await
            })
            .await;
            if !matches!(r, Ok(Ok(()))) {
                failed.add("ping_failed");
            }
        });
    }
    tracker.close();
    let progress = stats::progress_wanted(o.progress);
    while timeout(Duration::from_secs(1), tracker.wait()).await.is_err() {
        if progress {
            stats::progress(&format!("ping: {} round trips", done.get()));
        }
    }
    if progress {
        stats::progress_done();
    }
    Ok(json!({
        "mode": "ping",
        "sessions": o.sessions,
        "round_trips": done.get(),
        "failed": failed.total(),
        "failures": failed.to_json(),
        "latency": lat.summary(o.cdf_points),
        "elapsed_s": secs(phase.elapsed()),
        "generator_cpu": phase.cpu_utilisation(),
    }))
}

// ---------------------------------------------------------------------------------------------
// bulk

#[derive(clap::Args, Debug)]
pub struct BulkOpts {
    #[command(flatten)]
    pub client: ClientOpts,
    /// Payload bytes of each PUBLISH.
    #[arg(long, default_value_t = 65536)]
    pub size: usize,
    /// How long to publish.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Sessions publishing at once.
    #[arg(long, default_value_t = 1)]
    pub sessions: u64,
    /// Print a progress line every second.
    #[arg(long)]
    pub progress: bool,
}

pub async fn bulk(o: BulkOpts) -> anyhow::Result<Value> {
    let c = Arc::new(Client::new(o.client.clone())?);
    let packet = Arc::new(mqtt::publish(b"bench/bulk", o.size, false));
    let bytes = Arc::new(Count::default());
    let failed = Arc::new(Failures::default());
    let mut sessions = Vec::new();
    for i in 0..o.sessions {
        match c.open(c.o.first_id + i).await {
            Ok(s) => sessions.push(s),
            Err(f) => failed.add(f.as_str()),
        }
    }
    let phase = Phase::start();
    let end = Instant::now() + o.duration;
    let tracker = tokio_util::task::TaskTracker::new();
    for mut s in sessions {
        let (packet, bytes, failed) = (packet.clone(), bytes.clone(), failed.clone());
        tracker.spawn(async move {
            let r = timeout(o.duration + Duration::from_secs(60), async {
                while Instant::now() < end {
                    s.write_all(&packet).await?;
                    bytes.add(packet.len() as u64);
                }
                // The sink answers the PINGREQ after everything before it: all delivered.
                client::ping(&mut s).await?;
                s.write_all(&mqtt::DISCONNECT).await?;
                s.shutdown().await
            })
            .await;
            if !matches!(r, Ok(Ok(()))) {
                failed.add("bulk_failed");
            }
        });
    }
    tracker.close();
    let progress = stats::progress_wanted(o.progress);
    let mut last = 0;
    while timeout(Duration::from_secs(1), tracker.wait()).await.is_err() {
        if progress {
            let b = bytes.get();
            stats::progress(&format!("bulk: {:.1} MB/s", (b - last) as f64 / 1e6));
            last = b;
        }
    }
    if progress {
        stats::progress_done();
    }
    let elapsed = phase.elapsed().as_secs_f64();
    Ok(json!({
        "mode": "bulk",
        "sessions": o.sessions,
        "payload_bytes": o.size,
        "bytes": bytes.get(),
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        "mb_per_s": (bytes.get() as f64 / elapsed / 1e6 * 10.0).round() / 10.0,
        "failed": failed.total(),
        "failures": failed.to_json(),
        "generator_cpu": phase.cpu_utilisation(),
    }))
}
