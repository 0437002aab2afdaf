//! `harbormaster demo`: harbormaster in front of three MQTT brokers, in one process, with
//! nothing to install. Owns the demo brokers (rumqttd on loopback, each behind a small "door"
//! that reads the PROXY v2 header harbormaster sends, records who arrived and passes the rest
//! on), the demo certificates (rcgen, in a temporary folder), the config (TOML written to that
//! folder and loaded like any other) and the periodic table. Nothing else calls it.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use harbormaster::admin::log;
use harbormaster::app::{self, Handles};
use harbormaster::control::config::{self, LogFormat};
use harbormaster::proxy::proxy_header::{PP2_SUBTYPE_SSL_CN, PP2_TYPE_CLIENT_ID, PP2_TYPE_SSL};
use ppp::PartialResult;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The pool's name in the demo config.
const POOL: &str = "demo";
/// How many brokers the demo runs.
const BROKERS: usize = 3;
/// The client certificate's subject CN.
const CLIENT_CN: &str = "demo-device";
/// The client-id of the printed `mosquitto_sub`.
const SUB_ID: &str = "demo-sub";
/// How many departed clients each table row remembers.
const RECENT: usize = 5;
/// Upper bound for an embedded broker to accept connections, and for a door to read the PROXY
/// header.
const STARTUP: Duration = Duration::from_secs(10);
/// The log filter unless `--log-level` or the environment says otherwise: the table is the
/// demo's output; rumqttd logs every connection at info and harbormaster every close.
const DEFAULT_LOG: &str = "warn,rumqttd=off";

#[derive(clap::Args)]
pub struct Args {
    /// Port of the MQTT-over-TLS listener on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 8883)]
    port: u16,
    /// Port of the admin server on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 9090)]
    admin_port: u16,
    /// How often the broker table is printed ("5s", "500ms", "1m").
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Whether clients must present a certificate.
    #[arg(long, default_value = "optional", value_parser = ["none", "optional", "required"])]
    client_auth: String,
    /// Log level or tracing filter; logs go to stderr. Default "warn,rumqttd=off".
    #[arg(long)]
    log_level: Option<String>,
}

/// Runs the demo until SIGINT/SIGTERM. Exit 0 after a clean stop, 1 when it cannot start.
pub fn main(args: Args) -> ExitCode {
    if args.interval.is_zero() {
        eprintln!("--interval must be more than 0");
        return ExitCode::from(2);
    }
    let (hm_log, rust_log) = (std::env::var("HARBORMASTER_LOG").ok(), std::env::var("RUST_LOG").ok());
    let filter =
        match log::choose_filter(args.log_level.as_deref(), hm_log.as_deref(), rust_log.as_deref(), DEFAULT_LOG) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        };
    let _flush_logs = log::init(LogFormat::Text, &filter.directive);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args));
    // The embedded brokers' threads have no stop; they end with the process.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("harbormaster demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("harbormaster-demo-").tempdir().context("temporary folder")?;
    let certs = DemoCerts::write(dir.path()).context("demo certificates")?;
    let mut brokers = Vec::new();
    for i in 0..BROKERS {
        brokers.push(DemoBroker::start(i).await.with_context(|| format!("broker-{i}"))?);
    }
    let config_path = dir.path().join("harbormaster.toml");
    std::fs::write(&config_path, demo_config(&args, &certs, &brokers)).context("writing the demo config")?;
    let loaded = config::load(&config_path).map_err(|p| anyhow::anyhow!("invalid demo config:\n{p}"))?;

    // Client-ids for the printed commands. The demo brokers are independent (not a cluster),
    // so the publisher gets a client-id that lands on the subscriber's broker.
    let pool = loaded.snapshot.pool(POOL).context("demo pool")?.clone();
    let first = |id: &str| pool.ranking(id.as_bytes()).first().map(|b| b.name.clone()).unwrap_or_default();
    let sub_broker = first(SUB_ID);
    let pub_id = std::iter::once("demo-pub".to_string())
        .chain((2..).map(|n| format!("demo-pub-{n}")))
        .find(|id| first(id) == sub_broker)
        .expect("some client-id lands on every broker");

    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<Handles>();
    let intro = Intro { dir: dir.path(), config: &config_path, certs: &certs, brokers: &brokers, args: &args };
    let on_started = |h: &Handles| {
        intro.print(h, &pub_id, &sub_broker);
        let _ = started_tx.send(h.clone());
    };
    let stopping = CancellationToken::new();
    let shutdown = async {
        app::shutdown_signal().await;
        stopping.cancel();
        println!("\nstopping: no new connections; open ones get 2s to finish");
    };
    let seen: Vec<(String, Arc<Mutex<Seen>>)> = brokers.iter().map(|b| (b.name.clone(), b.seen.clone())).collect();
    let interval = args.interval;
    let table_stop = stopping.clone();
    let table = tokio::spawn(async move {
        let Ok(handles) = started_rx.await else { return };
        let start = Instant::now();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            tokio::select! {
                biased;
                _ = table_stop.cancelled() => return,
                _ = tick.tick() => print!("{}", table(&handles, &seen, start.elapsed())),
            }
        }
    });
    let result = app::run_with(loaded, shutdown, on_started).await;
    table.abort();
    result.map_err(|e| {
        let e = format!("{e:#}");
        if e.contains("in use") {
            anyhow::anyhow!("{e}\n(choose other ports with --port and --admin-port; 0 picks a free one)")
        } else {
            anyhow::anyhow!(e)
        }
    })?;
    println!("stopped; removing {}", dir.path().display());
    drop(dir);
    Ok(())
}

/// The demo's certificates: a CA, a server certificate for localhost and 127.0.0.1, and a
/// client certificate with CN `demo-device`, all ECDSA P-256 PEM files.
struct DemoCerts {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl DemoCerts {
    fn write(dir: &Path) -> anyhow::Result<DemoCerts> {
        use rcgen::{
            BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let named = |sans: Vec<String>, cn: &str| -> anyhow::Result<CertificateParams> {
            let mut p = CertificateParams::new(sans)?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, cn);
            p.distinguished_name = dn;
            Ok(p)
        };
        let ca_key = KeyPair::generate()?;
        let mut ca = named(Vec::new(), "harbormaster demo CA")?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, &ca_key);

        let leaf = |sans: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| -> anyhow::Result<(String, String)> {
            let key = KeyPair::generate()?;
            let mut p = named(sans, cn)?;
            p.extended_key_usages = vec![usage];
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.use_authority_key_identifier_extension = true;
            Ok((p.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
        };
        let (server_pem, server_key) =
            leaf(vec!["localhost".into(), "127.0.0.1".into()], "localhost", ExtendedKeyUsagePurpose::ServerAuth)?;
        let (client_pem, client_key) = leaf(Vec::new(), CLIENT_CN, ExtendedKeyUsagePurpose::ClientAuth)?;

        let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
            if name.ends_with(".key") {
                // Private keys readable by their owner alone, as the config check expects.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("chmod 600 {}", p.display()))?;
            }
            Ok(p)
        };
        Ok(DemoCerts {
            ca: write("ca.pem", &ca_cert.pem())?,
            server_cert: write("server.pem", &server_pem)?,
            server_key: write("server.key", &server_key)?,
            client_cert: write("client.pem", &client_pem)?,
            client_key: write("client.key", &client_key)?,
        })
    }
}

/// The demo config: one TLS listener, the three brokers as one pool with PROXY v2 (read by the
/// doors), a short drain so Ctrl-C is quick, the admin server.
fn demo_config(args: &Args, certs: &DemoCerts, brokers: &[DemoBroker]) -> String {
    let path = |p: &Path| toml_string(&p.display().to_string());
    let backends: Vec<String> =
        brokers.iter().map(|b| format!("{{ name = {}, address = \"{}\" }}", toml_string(&b.name), b.door)).collect();
    format!(
        "# Written by `harbormaster demo`; removed when it stops.\n\
         [[listener]]\n\
         name = \"mqtts\"\n\
         bind = \"127.0.0.1:{port}\"\n\
         pool = \"{POOL}\"\n\
         # MQTT over WebSocket on the same port, told apart from raw MQTT by its first bytes.\n\
         websocket = {{ path = \"/mqtt\" }}\n\
         [listener.tls]\n\
         certs = [{{ cert = {cert}, key = {key} }}]\n\
         client_ca = {ca}\n\
         client_auth = \"{client_auth}\"\n\
         \n\
         [pool.{POOL}]\n\
         # Each demo broker sits behind a door that reads this header and shows it in the table.\n\
         backends = [{backends}]\n\
         proxy_protocol = \"v2\"\n\
         \n\
         [limits]\n\
         drain_timeout = \"2s\"\n\
         \n\
         [admin]\n\
         bind = \"127.0.0.1:{admin_port}\"\n",
        port = args.port,
        cert = path(&certs.server_cert),
        key = path(&certs.server_key),
        ca = path(&certs.ca),
        client_auth = args.client_auth,
        backends = backends.join(", "),
        admin_port = args.admin_port,
    )
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A word for a POSIX shell, quoted only when it needs to be.
fn shell_word(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

// ---------------------------------------------------------------------------------------------
// Brokers and their doors
// ---------------------------------------------------------------------------------------------

/// One embedded broker: rumqttd (MQTT 3.1.1) on a loopback port, and in front of it the door
/// harbormaster dials.
struct DemoBroker {
    name: String,
    /// Where rumqttd listens.
    mqtt: SocketAddr,
    /// Where the door listens: the address in the pool.
    door: SocketAddr,
    seen: Arc<Mutex<Seen>>,
}

impl DemoBroker {
    async fn start(i: usize) -> anyhow::Result<DemoBroker> {
        let name = format!("broker-{i}");
        // rumqttd binds its own listener and reports no address, so it gets a port that was
        // free a moment ago, and the demo waits until it accepts.
        let mqtt = StdListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut broker = rumqttd::Broker::new(rumqttd_config(i, &name, mqtt));
        std::thread::Builder::new().name(name.clone()).spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "demo broker stopped");
            }
        })?;
        let deadline = Instant::now() + STARTUP;
        while TcpStream::connect(mqtt).await.is_err() {
            if Instant::now() > deadline {
                bail!("rumqttd did not accept connections on {mqtt} within {STARTUP:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let door = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        tokio::spawn(serve_door(listener, mqtt, seen.clone()));
        Ok(DemoBroker { name, mqtt, door, seen })
    }
}

fn rumqttd_config(id: usize, name: &str, listen: SocketAddr) -> rumqttd::Config {
    // The values of rumqttd's own example config.
    let server = rumqttd::ServerSettings {
        name: name.to_string(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 20_480,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    rumqttd::Config {
        id,
        router: rumqttd::RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 104_857_600,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some([("1".to_string(), server)].into_iter().collect()),
        ..Default::default()
    }
}

/// Who a door let in: the facts harbormaster's PROXY v2 header gave.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Arrival {
    client_id: String,
    cert_cn: Option<String>,
}

/// What one door has seen: connections open now, and the last few that closed.
#[derive(Debug, Default)]
struct Seen {
    now: BTreeMap<u64, Arrival>,
    left: VecDeque<Arrival>,
    next: u64,
}

impl Seen {
    fn arrive(&mut self, a: Arrival) -> u64 {
        self.next += 1;
        self.now.insert(self.next, a);
        self.next
    }

    fn leave(&mut self, id: u64) {
        if let Some(a) = self.now.remove(&id) {
            self.left.retain(|l| l != &a);
            self.left.push_front(a);
            self.left.truncate(RECENT);
        }
    }
}

async fn serve_door(listener: TcpListener, broker: SocketAddr, seen: Arc<Mutex<Seen>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let seen = seen.clone();
                tokio::spawn(async move {
                    if let Err(e) = pass(stream, broker, seen).await {
                        tracing::warn!(error = %e, broker = %broker, "demo door");
                    }
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Reads the PROXY v2 header, records the client, relays everything after it to rumqttd.
async fn pass(mut inbound: TcpStream, broker: SocketAddr, seen: Arc<Mutex<Seen>>) -> io::Result<()> {
    let Some((arrival, rest)) = tokio::time::timeout(STARTUP, read_header(&mut inbound))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no PROXY header"))??
    else {
        return Ok(());
    };
    let mut outbound = TcpStream::connect(broker).await?;
    outbound.write_all(&rest).await?;
    let id = seen.lock().unwrap_or_else(PoisonError::into_inner).arrive(arrival);
    let relayed = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
    seen.lock().unwrap_or_else(PoisonError::into_inner).leave(id);
    relayed.map(|_| ())
}

/// `None`: closed before a whole header arrived. Otherwise the arrival and the bytes after
/// the header (the CONNECT).
async fn read_header(s: &mut TcpStream) -> io::Result<Option<(Arrival, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let parsed = ppp::v2::Header::try_from(buf.as_slice());
        if !parsed.is_incomplete() {
            let header = parsed.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = header.len();
            let arrival = arrival(&header);
            return Ok(Some((arrival, buf[len..].to_vec())));
        }
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(None);
        }
    }
}

fn arrival(header: &ppp::v2::Header<'_>) -> Arrival {
    let mut a = Arrival { client_id: String::new(), cert_cn: None };
    for tlv in header.tlvs().flatten() {
        match tlv.kind {
            PP2_TYPE_CLIENT_ID => a.client_id = String::from_utf8_lossy(&tlv.value).into_owned(),
            PP2_TYPE_SSL => a.cert_cn = ssl_cn(&tlv.value),
            _ => {}
        }
    }
    a
}

/// The CN sub-TLV of a PP2_TYPE_SSL value: client flags (1 byte) and verify (4), then
/// sub-TLVs of type (1), length (2, big-endian) and value.
fn ssl_cn(value: &[u8]) -> Option<String> {
    let mut rest = value.get(5..)?;
    while rest.len() >= 3 {
        let (kind, len) = (rest[0], u16::from_be_bytes([rest[1], rest[2]]) as usize);
        let v = rest.get(3..3 + len)?;
        if kind == PP2_SUBTYPE_SSL_CN {
            return Some(String::from_utf8_lossy(v).into_owned());
        }
        rest = &rest[3 + len..];
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

struct Intro<'a> {
    dir: &'a Path,
    config: &'a Path,
    certs: &'a DemoCerts,
    brokers: &'a [DemoBroker],
    args: &'a Args,
}

impl Intro<'_> {
    fn print(&self, h: &Handles, pub_id: &str, sub_broker: &str) {
        let Some((_, mqtts)) = h.listeners.first() else { return };
        let c = self.certs;
        let client = |id: &str| {
            let mut words = vec![
                "-h".to_string(),
                "localhost".into(),
                "-p".into(),
                mqtts.port().to_string(),
                "--cafile".into(),
                c.ca.display().to_string(),
            ];
            if self.args.client_auth != "none" {
                words.extend(["--cert".into(), c.client_cert.display().to_string()]);
                words.extend(["--key".into(), c.client_key.display().to_string()]);
            }
            words.extend(["-i".into(), id.to_string()]);
            words.iter().map(|w| shell_word(w)).collect::<Vec<_>>().join(" ")
        };
        let mut out = String::new();
        out.push_str(&format!(
            "harbormaster demo: {} MQTT 3.1.1 brokers (rumqttd, in this process) behind harbormaster\n\n",
            self.brokers.len()
        ));
        for b in self.brokers {
            out.push_str(&format!("  {:<9} rumqttd on {}, reached through {}\n", b.name, b.mqtt, b.door));
        }
        out.push_str(&format!("  MQTT over TLS   {mqtts}   (client certificate: {})\n", self.args.client_auth));
        out.push_str(&format!("  and WebSocket   wss://localhost:{}/mqtt   (the same port)\n", mqtts.port()));
        if let Some(admin) = h.admin {
            out.push_str(&format!("  status page     http://{admin}/   (and healthz readyz metrics backends route)\n"));
        }
        out.push_str(&format!(
            "  certificates    {}   (ca.pem; client.pem + client.key, CN {CLIENT_CN})\n",
            self.dir.display()
        ));
        out.push_str(&format!("  config          {}\n\n", self.config.display()));
        out.push_str("Subscribe, in a second terminal:\n");
        out.push_str(&format!("  mosquitto_sub {} -t 'demo/#' -v\n", client(SUB_ID)));
        out.push_str("Publish, in a third:\n");
        out.push_str(&format!("  mosquitto_pub {} -t demo/hello -m 'hello through harbormaster'\n", client(pub_id)));
        out.push_str("or over WebSocket, on the same port (paho-mqtt 2: pip install paho-mqtt):\n");
        out.push_str(&format!(
            "  python3 -c {}\n\n",
            shell_word(&websocket_publish(mqtts.port(), c, &self.args.client_auth, pub_id))
        ));
        out.push_str(&format!(
            "{SUB_ID} and {pub_id} both hash to {sub_broker}. The demo brokers are not a cluster: a \
             subscriber sees only\nwhat is published through its own broker. Any client-id always lands \
             on the same broker; ask where one goes:\n"
        ));
        if let Some(admin) = h.admin {
            out.push_str(&format!("  curl -s 'http://{admin}/route?client_id=truck-42'\n"));
        }
        let me = std::env::current_exe().map_or_else(|_| "harbormaster".to_string(), |p| p.display().to_string());
        out.push_str(&format!(
            "  {} route --config {} --client-id truck-42\n",
            shell_word(&me),
            shell_word(&self.config.display().to_string())
        ));
        if !in_path("mosquitto_sub") {
            out.push_str(
                "\nmosquitto_sub and mosquitto_pub are not installed: `apt-get install mosquitto-clients` \
                 (Debian, Ubuntu) or `brew install mosquitto` (macOS).\n",
            );
        }
        out.push_str(&format!(
            "\nEvery {} a table: each broker, the connections harbormaster relays to it now and in all, and\n\
             the client-ids its door read from harbormaster's PROXY v2 header. Ctrl-C stops.\n",
            humantime::format_duration(self.args.interval)
        ));
        print!("{out}");
    }
}

/// A one-line Python program that publishes to the demo over WebSocket with paho-mqtt 2, as
/// `client_id`, with the demo's CA (and client certificate when the listener asks for one).
/// A `Client` rather than `publish.single`, which prints a spurious "not connected" line as
/// its WebSocket closes.
fn websocket_publish(port: u16, c: &DemoCerts, client_auth: &str, client_id: &str) -> String {
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let mut tls = format!("ca_certs={}", q(&c.ca));
    if client_auth != "none" {
        tls.push_str(&format!(", certfile={}, keyfile={}", q(&c.client_cert), q(&c.client_key)));
    }
    format!(
        "import paho.mqtt.client as m; c = m.Client(m.CallbackAPIVersion.VERSION2, client_id=\"{client_id}\", \
         transport=\"websockets\"); c.tls_set({tls}); c.connect(\"localhost\", {port}); c.loop_start(); \
         c.publish(\"demo/hello\", \"hello over WebSocket\", qos=1).wait_for_publish(); c.disconnect(); \
         c.loop_stop()"
    )
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// The table: one row per broker, counters from the running snapshot, client-ids from the
/// broker's door.
fn table(h: &Handles, seen: &[(String, Arc<Mutex<Seen>>)], elapsed: Duration) -> String {
    let snapshot = h.current.load();
    let pool = snapshot.pool(POOL);
    let when = format!("[{}s]", elapsed.as_secs());
    let mut out = format!(
        "\n{when:<7} {:<10} {:>9} {:>7}  client-ids at the broker now; recently left\n",
        "broker", "connected", "routed"
    );
    for (name, seen) in seen {
        let backend = pool.and_then(|p| p.backends.iter().find(|b| &b.name == name));
        let (active, total) = backend.map_or((0, 0), |b| (b.active.load(Relaxed), b.total.load(Relaxed)));
        let seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
        let label = |a: &Arrival| match &a.cert_cn {
            Some(cn) => format!("{} [CN {cn}]", or_dash(&a.client_id)),
            None => or_dash(&a.client_id).to_string(),
        };
        let mut ids = seen.now.values().map(label).collect::<Vec<_>>().join(", ");
        if !seen.left.is_empty() {
            let left = seen.left.iter().map(label).collect::<Vec<_>>().join(", ");
            ids = if ids.is_empty() { format!("left: {left}") } else { format!("{ids}; left: {left}") };
        }
        if ids.is_empty() {
            ids.push('-');
        }
        out.push_str(&format!("{:<7} {name:<10} {active:>9} {total:>7}  {ids}\n", ""));
    }
    out
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "(empty client-id)"
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(shell_word("/tmp/harbormaster-demo-x1/ca.pem"), "/tmp/harbormaster-demo-x1/ca.pem");
        assert_eq!(shell_word("demo/#"), "'demo/#'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn ssl_cn_is_read_from_the_sub_tlvs() {
        // flags, verify, VERSION "TLSv1.3", CN "demo-device"
        let mut v = vec![0x07, 0, 0, 0, 0, 0x21, 0, 7];
        v.extend_from_slice(b"TLSv1.3");
        v.extend_from_slice(&[0x22, 0, 11]);
        v.extend_from_slice(b"demo-device");
        assert_eq!(ssl_cn(&v).as_deref(), Some("demo-device"));
        assert_eq!(ssl_cn(&v[..5]), None);
        assert_eq!(ssl_cn(&v[..v.len() - 1]), None, "truncated");
    }

    #[test]
    fn seen_keeps_the_last_few_departures_once() {
        let mut s = Seen::default();
        let a = |id: &str| Arrival { client_id: id.into(), cert_cn: None };
        let first = s.arrive(a("x"));
        s.leave(first);
        let again = s.arrive(a("x"));
        s.leave(again);
        assert_eq!(s.left.len(), 1);
        for i in 0..10 {
            let n = s.arrive(a(&i.to_string()));
            s.leave(n);
        }
        assert_eq!(s.left.len(), RECENT);
        assert_eq!(s.left[0].client_id, "9");
        assert!(s.now.is_empty());
    }
}
