//! Harness for end-to-end tests: real processes on ephemeral loopback ports.
//!
//! Every peer (mosquitto, HAProxy, RabbitMQ, harbormaster itself) runs as a child process in
//! its own temporary directory, on ports taken from the kernel (`127.0.0.1:0`), and is killed
//! when its handle is dropped. Nothing here skips: a missing peer binary is a test failure.
//!
//! Harbormaster binds port 0 itself and says where in its log ("listening", "admin server
//! listening"): [`Harbormaster::port`] and [`Harbormaster::admin_addr`] read it back, so no
//! port is ever chosen before it is bound. [`free_port`] remains for the peers that cannot
//! report theirs (mosquitto, HAProxy, RabbitMQ) and for configs that must name a port ahead of
//! time (a reload that moves a listener, a broker address that must stay dead).
//!
//! All the tests run in one process: the peers that load the machine most (a RabbitMQ node,
//! the storms) take the one [`heavy`] slot, so two of them never starve each other on a
//! small machine.
//!
//! Every wait has an upper bound (no test can hang forever) and no assertion is made on
//! wall-clock time.
#![allow(dead_code)]

pub mod fake_dns;
pub mod fake_kube;
pub mod mqtt;
pub mod prometheus;
pub mod tls;

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub use mqtt::MqttVersion;

/// Upper bound for "this should happen soon" waits. Generous: CI has 2 cores.
pub const WAIT: Duration = Duration::from_secs(30);
/// Upper bound for a whole client command (mosquitto_pub, mosquitto_sub, harbormaster check).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for a RabbitMQ node to boot.
pub const RABBIT_BOOT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------
// Ports, waiting, processes
// ---------------------------------------------------------------------------------------------

/// A free TCP port on 127.0.0.1: bind port 0, read the port, drop the listener. For a peer that
/// cannot report the port it bound (mosquitto, HAProxy, RabbitMQ; their starts retry on a fresh
/// port if another process took it meanwhile) and a config that must name one ahead;
/// harbormaster itself binds port 0 and says where ([`Harbormaster::port`]).
///
/// Ports handed out earlier in this test process are never handed out again, so two peers of
/// the test binary never race for the same port.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("could not find a free port");
}

/// `127.0.0.1:PORT`.
pub fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// An HTTP/1.1 answer: status, `Content-Type` and body.
#[derive(Debug)]
pub struct Http {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// One `GET path` over a fresh connection to `addr` (`IP:PORT`), reads bounded by `timeout`:
/// the answer, or why there was none (the tests of readiness expect refusals and resets).
pub fn try_http_get(addr: &str, path: &str, timeout: Duration) -> io::Result<Http> {
    let sa: SocketAddr = addr.parse().expect("IP:port");
    let mut s = TcpStream::connect_timeout(&sa, timeout.min(Duration::from_secs(5)))?;
    s.set_read_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) =
        text.split_once("\r\n\r\n").ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, text.clone()))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, head.to_string()))?;
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    Ok(Http { status, content_type, body: body.to_string() })
}

/// [`try_http_get`] that must be answered (within [`WAIT`]).
pub fn http_request(addr: &str, path: &str) -> Http {
    try_http_get(addr, path, WAIT).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// One `GET path` to `addr` (`IP:PORT`): the status and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let r = http_request(addr, path);
    (r.status, r.body)
}

/// A TCP connection to 127.0.0.1:`port`, its reads bounded by [`WAIT`]: a raw client's.
pub fn tcp_client(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect :{port}: {e}"));
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// A raw MQTT client: a [`tcp_client`] that sent a CONNECT for `client_id`, and the CONNACK
/// it got back.
pub fn mqtt_connect(port: u16, version: MqttVersion, client_id: &str) -> (TcpStream, Vec<u8>) {
    let mut s = tcp_client(port);
    let ack = mqtt::connect_and_read_connack(&mut s, version, client_id)
        .unwrap_or_else(|e| panic!("{client_id}: CONNECT to :{port}: {e}"));
    (s, ack)
}

/// A session through 127.0.0.1:`port`: [`mqtt_connect`], its CONNACK required to accept it.
pub fn mqtt_session(port: u16, version: MqttVersion, client_id: &str) -> TcpStream {
    let (s, ack) = mqtt_connect(port, version, client_id);
    assert!(mqtt::connack_accepted(&ack), "{client_id}: CONNACK {ack:?} from :{port}");
    s
}

/// The one slot of the heavy work: a RabbitMQ node (Erlang takes a core to boot) or a test
/// that storms harbormaster with hundreds of connections. Held until dropped; the other tests
/// run beside the holder, but two heavy ones never run at once and time each other out.
pub struct Heavy(());

/// Waits for the [`Heavy`] slot (a test takes it first thing, before its peers start).
pub fn heavy() -> Heavy {
    let (lock, freed) = &HEAVY;
    let mut taken = lock.lock().unwrap_or_else(|e| e.into_inner());
    while *taken {
        taken = freed.wait(taken).unwrap_or_else(|e| e.into_inner());
    }
    *taken = true;
    Heavy(())
}

static HEAVY: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

impl Drop for Heavy {
    fn drop(&mut self) {
        let (lock, freed) = &HEAVY;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = false;
        freed.notify_one();
    }
}

/// The sum of the samples of `name` in the admin server's `/metrics` whose labels include
/// every `(label, value)` of `labels`; 0 when there are none.
pub fn metric_sum(admin: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum_in(&metrics_text(admin), name, labels)
}

/// The admin server's `/metrics` (`IP:PORT`), for reading several metrics of one scrape.
pub fn metrics_text(admin: &str) -> String {
    let (status, text) = http_get(admin, "/metrics");
    assert_eq!(status, 200, "/metrics: {text}");
    text
}

/// [`metric_sum`] over the text of one scrape.
pub fn metric_sum_in(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let labels = match series.strip_prefix(name)? {
                "" => "",
                rest => rest.strip_prefix('{')?.strip_suffix('}')?,
            };
            let have: Vec<&str> = labels.split(',').collect();
            wanted.iter().all(|w| have.contains(&w.as_str())).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A finished command's stdout and stderr, as text.
pub fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes. Returns the last result.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// True once a TCP connect to 127.0.0.1:port succeeds.
pub fn port_accepts(port: u16) -> bool {
    let sa: SocketAddr = addr(port).parse().unwrap();
    match TcpStream::connect_timeout(&sa, Duration::from_secs(1)) {
        Ok(s) => {
            let _ = s.shutdown(Shutdown::Both);
            true
        }
        Err(_) => false,
    }
}

/// Finds `program` in PATH or the sbin directories (apt puts daemons in /usr/sbin, which a
/// non-login shell may not have in PATH). Panics with an install hint when it is missing:
/// tests fail, never skip, when a peer is missing.
pub fn require_program(program: &str) -> PathBuf {
    let p = Path::new(program);
    if p.is_absolute() {
        assert!(p.exists(), "{program} is missing: run scripts/test (it installs mosquitto, haproxy, rabbitmq-server)");
        return p.to_path_buf();
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path.split(':').map(PathBuf::from).chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "{program} is missing: run scripts/test (it installs mosquitto, mosquitto-clients, \
         haproxy, rabbitmq-server, openssl, tshark)"
    );
}

/// Runs a command with an upper bound on its run time; on timeout the child is killed and
/// the output so far returned with a failing status. Output is always captured.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let out_t = thread::spawn(move || read_all(out));
    let err_t = thread::spawn(move || read_all(err));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() }
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = r.read_to_end(&mut buf);
    buf
}

/// Waits for a child with an upper bound. `None` if it is still running at the deadline.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `openssl s_client` (`version`: `-tls1_3`, `-tls1_2`) to `port` as the client of `cert` and
/// `key`, saving its session to `sess` (`save`) or offering it, with a CONNECT for
/// `client_id` and a DISCONNECT on stdin; the output says "New," or "Reused," and how it ended.
#[allow(dead_code, clippy::too_many_arguments)]
pub fn s_client_session(
    port: u16,
    version: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
    sess: &Path,
    save: bool,
    client_id: &str,
) -> String {
    let mut cmd = Command::new(require_program("openssl"));
    cmd.args(["s_client", version, "-connect", &format!("127.0.0.1:{port}"), "-servername", "localhost", "-ign_eof"])
        .arg("-CAfile")
        .arg(ca)
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .arg(if save { "-sess_out" } else { "-sess_in" })
        .arg(sess)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("openssl s_client");
    let mut input = mqtt::connect(mqtt::MqttVersion::V311, client_id);
    input.extend(mqtt::disconnect());
    child.stdin.take().unwrap().write_all(&input).unwrap();
    if wait_child(&mut child, CMD_TIMEOUT).is_none() {
        let _ = child.kill();
    }
    output_text(&child.wait_with_output().unwrap())
}

/// Sends a signal (`TERM`, `KILL`, ...) to a pid, or to a process group when `pid` is negative.
pub fn send_signal(pid: i64, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn read_file_lossy(path: &Path) -> String {
    fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A spawned peer: its own process group, output in a log file, killed (the whole group) on
/// drop. On a panicking test the tail of its log is printed.
struct Proc {
    name: String,
    child: Child,
    log_path: PathBuf,
    done: bool,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log_path: &Path) -> Proc {
        let log = File::create(log_path).expect("create log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        Proc { name: name.to_string(), child, log_path: log_path.to_path_buf(), done: false }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    fn kill(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        // The whole group: daemons that fork (beam.smp under the rabbitmq-server script).
        send_signal(-(self.child.id() as i64), "KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "----- {} output ({}), last lines -----\n{}\n-----",
                self.name,
                self.log_path.display(),
                tail(&read_file_lossy(&self.log_path), 80)
            );
        }
        self.kill();
    }
}

/// A TOML basic string for a path or any text.
pub fn toml_str(s: impl AsRef<str>) -> String {
    let mut out = String::from("\"");
    for c in s.as_ref().chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `toml_str` of a path.
pub fn toml_path(p: &Path) -> String {
    toml_str(p.to_str().expect("utf-8 path"))
}

/// A broker's address for the config helpers: a mosquitto of this suite, or an address.
pub trait BrokerAddr {
    fn broker_addr(&self) -> String;
}

impl BrokerAddr for String {
    fn broker_addr(&self) -> String {
        self.clone()
    }
}

impl BrokerAddr for Mosquitto {
    fn broker_addr(&self) -> String {
        self.addr()
    }
}

impl<T: BrokerAddr + ?Sized> BrokerAddr for &T {
    fn broker_addr(&self) -> String {
        (**self).broker_addr()
    }
}

/// A pool's `backends` as named entries: `{ name = "m0", address = "127.0.0.1:…" }, …`.
pub fn named_backends<B: BrokerAddr>(brokers: &[(&str, B)]) -> String {
    brokers
        .iter()
        .map(|(name, b)| format!("{{ name = {}, address = {} }}", toml_str(name), toml_str(b.broker_addr())))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A pool's `backends` named `{prefix}0`, `{prefix}1`… in the order of `brokers`.
pub fn numbered_backends(prefix: &str, brokers: &[Mosquitto]) -> String {
    let names: Vec<String> = (0..brokers.len()).map(|i| format!("{prefix}{i}")).collect();
    let named: Vec<(&str, &Mosquitto)> = names.iter().map(String::as_str).zip(brokers).collect();
    named_backends(&named)
}

/// One plain listener "mqtt" on `port` for one pool "brokers" of the named `brokers` (plus
/// the `pool_extra` keys), and the admin server on `admin`.
pub fn one_pool_config<B: BrokerAddr>(port: u16, admin: u16, brokers: &[(&str, B)], pool_extra: &str) -> String {
    format!(
        r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:{port}"
pool = "brokers"

[pool.brokers]
backends = [{list}]
{pool_extra}

[admin]
bind = "127.0.0.1:{admin}"
"#,
        list = named_backends(brokers)
    )
}

/// The broker (by name) whose mosquitto logged `client_id`, waiting for it to appear.
pub fn landed_on<'a>(brokers: &'a [(&'a str, &'a Mosquitto)], client_id: &str) -> &'a str {
    let mut found = Vec::new();
    wait_until(WAIT, || {
        found = brokers.iter().filter(|(_, m)| m.has_client(client_id)).map(|(n, _)| *n).collect();
        !found.is_empty()
    });
    assert_eq!(found.len(), 1, "{client_id:?} connected to {found:?}");
    found[0]
}

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A CA, a server certificate for `localhost` + 127.0.0.1 and a client certificate, all
/// ECDSA P-256, written as PEM files into a temporary directory.
pub struct Certs {
    pub dir: TempDir,
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub client_cn: String,
    pub ca_der: Vec<u8>,
    pub client_cert_der: Vec<u8>,
    /// PKCS#8
    pub client_key_der: Vec<u8>,
}

impl Certs {
    /// Certificates with client CN `device-001`.
    pub fn new() -> Certs {
        Certs::with_client_cn("device-001")
    }

    pub fn with_client_cn(client_cn: &str) -> Certs {
        use rcgen::{
            BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::Builder::new().prefix("hm-certs-").tempdir().unwrap();

        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "harbormaster test CA");
        ca_params.distinguished_name = dn;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, &ca_key);

        let server_key = KeyPair::generate().unwrap();
        let mut server_params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "localhost");
        server_params.distinguished_name = dn;
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.use_authority_key_identifier_extension = true;
        let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, client_cn);
        client_params.distinguished_name = dn;
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        client_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client_params.use_authority_key_identifier_extension = true;
        let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();

        let write = |name: &str, text: String| {
            let p = dir.path().join(name);
            fs::write(&p, text).unwrap();
            if name.ends_with(".key") {
                // As key tools write them: a group- or world-readable key is warned about.
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
            }
            p
        };
        Certs {
            ca: write("ca.pem", ca_cert.pem()),
            ca_key: write("ca.key", ca_key.serialize_pem()),
            server_cert: write("server.pem", server_cert.pem()),
            server_key: write("server.key", server_key.serialize_pem()),
            client_cert: write("client.pem", client_cert.pem()),
            client_key: write("client.key", client_key.serialize_pem()),
            client_cn: client_cn.to_string(),
            ca_der: ca_cert.der().to_vec(),
            client_cert_der: client_cert.der().to_vec(),
            client_key_der: client_key.serialize_der(),
            dir,
        }
    }

    /// A `[listener.tls]` section (to follow a `[[listener]]` table) with absolute paths.
    pub fn listener_tls_toml(&self, client_auth: &str) -> String {
        format!(
            "[listener.tls]\ncerts = [{{ cert = {}, key = {} }}]\nclient_ca = {}\nclient_auth = {}\n",
            toml_path(&self.server_cert),
            toml_path(&self.server_key),
            toml_path(&self.ca),
            toml_str(client_auth)
        )
    }

    /// Client TLS options for mosquitto_pub/sub; `with_cert` adds the client certificate.
    pub fn client_tls(&self, with_cert: bool) -> ClientTls {
        ClientTls {
            cafile: self.ca.clone(),
            cert: with_cert.then(|| self.client_cert.clone()),
            key: with_cert.then(|| self.client_key.clone()),
        }
    }
}

impl Default for Certs {
    fn default() -> Self {
        Certs::new()
    }
}

// ---------------------------------------------------------------------------------------------
// mosquitto
// ---------------------------------------------------------------------------------------------

/// A mosquitto 2.0 broker on a free loopback port, logging everything to a file.
pub struct Mosquitto {
    pub port: u16,
    dir: TempDir,
    log_path: PathBuf,
    conf_path: PathBuf,
    proc: Option<Proc>,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Mosquitto::start_with("persistence false\n")
    }

    /// `n` brokers, each on a port of its own.
    pub fn start_n(n: usize) -> Vec<Mosquitto> {
        (0..n).map(|_| Mosquitto::start()).collect()
    }

    /// Sessions and queued QoS 1/2 messages survive a [`Mosquitto::restart`]: saved to disk
    /// when it stops (SIGTERM), loaded when it starts. No limit on queued messages, so a
    /// subscriber that is away loses nothing.
    pub fn start_persistent() -> Mosquitto {
        Mosquitto::start_with("persistence true\npersistence_location ./\nmax_queued_messages 0\n")
    }

    /// A broker whose config also has the lines `extra` (e.g. a bridge's `connection`
    /// section, which must come last).
    pub fn start_with(extra: &str) -> Mosquitto {
        let dir = tempfile::Builder::new().prefix("hm-mosq-").tempdir().unwrap();
        let log_path = dir.path().join("mosquitto.log");
        let conf_path = dir.path().join("mosquitto.conf");
        let mut m = Mosquitto { port: 0, dir, log_path, conf_path, proc: None };
        let mut last_err = String::new();
        for _attempt in 0..3 {
            m.port = free_port();
            let _ = fs::remove_file(&m.log_path);
            // `user root`: as root, mosquitto would otherwise drop privileges to the user
            // `mosquitto` and could no longer write its log file in our tempdir.
            let conf = format!(
                "user root\n\
                 listener {port} 127.0.0.1\n\
                 allow_anonymous true\n\
                 log_dest file {log}\n\
                 log_type all\n\
                 connection_messages true\n\
                 log_timestamp true\n\
                 {extra}",
                port = m.port,
                log = m.log_path.display()
            );
            fs::write(&m.conf_path, conf).unwrap();
            match m.spawn() {
                Ok(()) => return m,
                Err(e) => last_err = e,
            }
        }
        panic!("mosquitto did not start:\n{last_err}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let bin = require_program("mosquitto");
        let runs_before = self.log().matches(" running\n").count();
        let mut cmd = Command::new(&bin);
        cmd.arg("-c").arg(&self.conf_path).current_dir(self.dir.path());
        let stdout = self.dir.path().join("stdout.log");
        let mut proc = Proc::spawn("mosquitto", cmd, &stdout);
        let up = wait_until(WAIT, || {
            proc.exited().is_none() && self.log().matches(" running\n").count() > runs_before && port_accepts(self.port)
        });
        if up {
            self.proc = Some(proc);
            return Ok(());
        }
        proc.kill();
        Err(format!("{}\n{}", read_file_lossy(&stdout), self.log()))
    }

    /// Stops it with SIGTERM, as a rolling update does: a persistent broker saves its state.
    pub fn stop_graceful(&mut self) {
        if let Some(mut p) = self.proc.take() {
            send_signal(p.pid() as i64, "TERM");
            if wait_child(&mut p.child, WAIT).is_none() {
                panic!("mosquitto :{} ignored SIGTERM", self.port);
            }
            p.done = true;
        }
    }

    /// Starts it again, same port and config, after [`Mosquitto::stop`] or
    /// [`Mosquitto::stop_graceful`].
    pub fn restart(&mut self) {
        assert!(self.proc.is_none(), "mosquitto :{} is still running", self.port);
        // The port may be briefly held by the old process's sockets; a few tries.
        let mut last_err = String::new();
        for _ in 0..5 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last_err = e,
            }
            thread::sleep(Duration::from_millis(200));
        }
        panic!("mosquitto :{} did not restart:\n{last_err}", self.port);
    }

    pub fn addr(&self) -> String {
        addr(self.port)
    }

    pub fn log(&self) -> String {
        read_file_lossy(&self.log_path)
    }

    /// Every client-id that connected, in order, with its protocol tag (`p1` = 3.1, `p2` =
    /// 3.1.1, `p5` = 5.0), parsed from lines like
    /// `1795489146: New client connected from 127.0.0.1:55390 as dev-abc (p5, c1, k60).`
    pub fn connections(&self) -> Vec<MosquittoConnection> {
        parse_mosquitto_connections(&self.log())
    }

    /// How many times `client_id` connected to this broker.
    pub fn connection_count(&self, client_id: &str) -> usize {
        self.connections().iter().filter(|c| c.client_id == client_id).count()
    }

    pub fn has_client(&self, client_id: &str) -> bool {
        self.connection_count(client_id) > 0
    }

    /// Waits until `client_id` has connected at least `n` times in total.
    pub fn wait_for_client(&self, client_id: &str, n: usize) -> bool {
        wait_until(WAIT, || self.connection_count(client_id) >= n)
    }

    /// Waits until the broker has answered a SUBSCRIBE of `client_id` (its subscription is
    /// in place from then on: mosquitto is single-threaded).
    pub fn wait_subscribed(&self, client_id: &str) -> bool {
        let needle = format!("Sending SUBACK to {client_id}\n");
        wait_until(WAIT, || self.log().contains(&needle))
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.proc.as_mut() {
            Some(p) => p.exited().is_none(),
            None => false,
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("----- mosquitto :{} log, last lines -----\n{}\n-----", self.port, tail(&self.log(), 60));
        }
        self.stop();
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MosquittoConnection {
    /// `127.0.0.1:55390`
    pub from: String,
    pub client_id: String,
    /// `p1`, `p2` or `p5`
    pub protocol: String,
}

pub fn parse_mosquitto_connections(log: &str) -> Vec<MosquittoConnection> {
    const MARK: &str = "New client connected from ";
    let mut out = Vec::new();
    for line in log.lines() {
        let Some(i) = line.find(MARK) else { continue };
        let rest = &line[i + MARK.len()..];
        let Some((from, rest)) = rest.split_once(" as ") else {
            continue;
        };
        // The client-id may itself contain spaces: the protocol block is the last " (".
        let Some(j) = rest.rfind(" (") else { continue };
        let client_id = &rest[..j];
        let protocol = rest[j + 2..].split([',', ')']).next().unwrap_or("").to_string();
        out.push(MosquittoConnection { from: from.to_string(), client_id: client_id.to_string(), protocol });
    }
    out
}

/// mosquitto's protocol tag for a version, as in its connection log line.
pub fn mosquitto_protocol_tag(v: MqttVersion) -> &'static str {
    match v {
        MqttVersion::V31 => "p1",
        MqttVersion::V311 => "p2",
        MqttVersion::V5 => "p5",
    }
}

// ---------------------------------------------------------------------------------------------
// HAProxy
// ---------------------------------------------------------------------------------------------

/// HAProxy 2.6 in TCP mode, `bind 127.0.0.1:PORT accept-proxy`, in front of one backend. It
/// logs one line per connection (at connect time: `option logasap`) to its stdout, captured
/// into a file:
/// `HMLOG %[src]:%[src_port] %[dst]:%[dst_port] %[fc_pp_authority] %[fc_pp_unique_id] %[fc_rcvd_proxy]`
pub struct Haproxy {
    pub port: u16,
    pub backend_port: u16,
    dir: TempDir,
    log_path: PathBuf,
    proc: Option<Proc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaproxyLogLine {
    pub src: String,
    pub src_port: String,
    pub dst: String,
    pub dst_port: String,
    /// `-` when absent
    pub authority: String,
    /// `-` when absent
    pub unique_id: String,
    /// `1` when a PROXY header was received
    pub rcvd_proxy: String,
}

impl Haproxy {
    pub fn start(backend_port: u16) -> Haproxy {
        let bin = require_program("haproxy");
        let dir = tempfile::Builder::new().prefix("hm-haproxy-").tempdir().unwrap();
        let log_path = dir.path().join("haproxy.log");
        let mut last_err = String::new();
        for _attempt in 0..3 {
            let port = free_port();
            let cfg = format!(
                "global\n\
                 \x20   log stdout format raw local0\n\
                 defaults\n\
                 \x20   mode tcp\n\
                 \x20   log global\n\
                 \x20   option logasap\n\
                 \x20   timeout connect 5s\n\
                 \x20   timeout client 300s\n\
                 \x20   timeout server 300s\n\
                 frontend fe\n\
                 \x20   bind 127.0.0.1:{port} accept-proxy\n\
                 \x20   log-format \"HMLOG %[src]:%[src_port] %[dst]:%[dst_port] %[fc_pp_authority] %[fc_pp_unique_id] %[fc_rcvd_proxy]\"\n\
                 \x20   default_backend be\n\
                 backend be\n\
                 \x20   server s1 127.0.0.1:{backend_port}\n"
            );
            let cfg_path = dir.path().join("haproxy.cfg");
            fs::write(&cfg_path, cfg).unwrap();
            let mut cmd = Command::new(&bin);
            cmd.arg("-db").arg("-f").arg(&cfg_path).current_dir(dir.path());
            let mut proc = Proc::spawn("haproxy", cmd, &log_path);
            // A readiness probe without a PROXY header is refused by accept-proxy; it shows up
            // in the log as an error line, never as an HMLOG line.
            let up = wait_until(WAIT, || proc.exited().is_none() && port_accepts(port));
            if up {
                return Haproxy { port, backend_port, dir, log_path, proc: Some(proc) };
            }
            last_err = read_file_lossy(&log_path);
            proc.kill();
        }
        panic!("haproxy did not start:\n{last_err}");
    }

    pub fn addr(&self) -> String {
        addr(self.port)
    }

    pub fn log(&self) -> String {
        read_file_lossy(&self.log_path)
    }

    pub fn log_lines(&self) -> Vec<HaproxyLogLine> {
        parse_haproxy_log(&self.log())
    }

    /// Waits for a log line matching `pred` and returns it.
    pub fn wait_for_line(&self, mut pred: impl FnMut(&HaproxyLogLine) -> bool) -> Option<HaproxyLogLine> {
        let mut found = None;
        wait_until(WAIT, || {
            found = self.log_lines().into_iter().find(|l| pred(l));
            found.is_some()
        });
        found
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn parse_haproxy_log(log: &str) -> Vec<HaproxyLogLine> {
    let mut out = Vec::new();
    for line in log.lines() {
        let Some(i) = line.find("HMLOG ") else {
            continue;
        };
        let f: Vec<&str> = line[i + 6..].split_whitespace().collect();
        if f.len() < 5 {
            continue;
        }
        let (src, src_port) = f[0].rsplit_once(':').unwrap_or((f[0], ""));
        let (dst, dst_port) = f[1].rsplit_once(':').unwrap_or((f[1], ""));
        out.push(HaproxyLogLine {
            src: src.to_string(),
            src_port: src_port.to_string(),
            dst: dst.to_string(),
            dst_port: dst_port.to_string(),
            authority: f[2].to_string(),
            unique_id: f[3].to_string(),
            rcvd_proxy: f[4].to_string(),
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ
// ---------------------------------------------------------------------------------------------

/// RabbitMQ 3.10 with the MQTT plugin, `mqtt.proxy_protocol = true`, on a free port, all its
/// state in a tempdir. The AMQP listener is off.
pub struct Rabbit {
    pub port: u16,
    /// The management plugin's HTTP port ([`Rabbit::start_with_management`]).
    pub management_port: Option<u16>,
    /// The web MQTT plugin's WebSocket port, path `/ws`, PROXY header required
    /// ([`Rabbit::start_with_web_mqtt`]).
    pub web_port: Option<u16>,
    pub node: String,
    dir: TempDir,
    env: Vec<(String, String)>,
    proc: Option<Proc>,
    /// Dropped after the node is stopped (fields drop after `Drop::drop`).
    _heavy: Heavy,
}

const RABBIT_SBIN: &str = "/usr/lib/rabbitmq/bin";

impl Rabbit {
    pub fn start() -> Rabbit {
        Rabbit::start_with(false, false)
    }

    /// With the web MQTT plugin too: MQTT over WebSocket on `web_port`, path `/ws`, behind a
    /// PROXY header (`web_mqtt.proxy_protocol = true`); and the management plugin.
    pub fn start_with_web_mqtt() -> Rabbit {
        Rabbit::start_with(true, true)
    }

    /// With the management plugin on `management_port` too (its HTTP API: `/api/health/...`,
    /// user `guest`/`guest` from loopback).
    pub fn start_with_management() -> Rabbit {
        Rabbit::start_with(true, false)
    }

    fn start_with(management: bool, web_mqtt: bool) -> Rabbit {
        // Its ports come from `free_port`: something else may bind one before RabbitMQ does.
        // A boot that fails on a taken port is tried again, with new ports.
        for _ in 0..2 {
            if let Some(rabbit) = Rabbit::boot(management, web_mqtt, true) {
                return rabbit;
            }
        }
        Rabbit::boot(management, web_mqtt, false).expect("a boot that may not retry panics instead")
    }

    /// One boot; `None` when it failed on a taken port and `retry` allows another.
    fn boot(management: bool, web_mqtt: bool, retry: bool) -> Option<Rabbit> {
        // The /usr/sbin wrappers `su` to the rabbitmq user and drop the environment; the real
        // scripts are in /usr/lib/rabbitmq/bin and run fine as root.
        let server = require_program(&format!("{RABBIT_SBIN}/rabbitmq-server"));
        require_program(&format!("{RABBIT_SBIN}/rabbitmqctl"));
        let heavy = heavy();
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = tempfile::Builder::new().prefix("hm-rabbit-").tempdir().unwrap();
        let d = dir.path();
        for sub in ["mnesia", "log", "home"] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        let port = free_port();
        let dist_port = free_port();
        let management_port = management.then(free_port);
        let web_port = web_mqtt.then(free_port);
        let web_conf = match web_port {
            Some(p) => {
                format!("web_mqtt.tcp.port = {p}\nweb_mqtt.tcp.ip = 127.0.0.1\nweb_mqtt.proxy_protocol = true\n")
            }
            None => String::new(),
        };
        let node = format!("hm{}x{}@localhost", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let management_conf = match management_port {
            Some(p) => format!("management.tcp.port = {p}\nmanagement.tcp.ip = 127.0.0.1\n"),
            None => String::new(),
        };
        fs::write(
            d.join("rabbitmq.conf"),
            format!(
                "listeners.tcp = none\n\
                 mqtt.listeners.tcp.1 = 127.0.0.1:{port}\n\
                 mqtt.proxy_protocol = true\n\
                 mqtt.allow_anonymous = true\n\
                 log.console = true\n\
                 log.console.level = info\n\
                 {management_conf}{web_conf}"
            ),
        )
        .unwrap();
        let plugins = match (management, web_mqtt) {
            (_, true) => "[rabbitmq_mqtt,rabbitmq_management,rabbitmq_web_mqtt].\n",
            (true, false) => "[rabbitmq_mqtt,rabbitmq_management].\n",
            (false, false) => "[rabbitmq_mqtt].\n",
        };
        fs::write(d.join("enabled_plugins"), plugins).unwrap();
        fs::write(d.join("rabbitmq-env.conf"), "").unwrap();
        let p = |sub: &str| d.join(sub).to_str().unwrap().to_string();
        let env: Vec<(String, String)> = vec![
            ("HOME".into(), p("home")),
            ("RABBITMQ_NODENAME".into(), node.clone()),
            ("RABBITMQ_MNESIA_BASE".into(), p("mnesia")),
            ("RABBITMQ_LOG_BASE".into(), p("log")),
            ("RABBITMQ_CONFIG_FILE".into(), p("rabbitmq.conf")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE".into(), p("enabled_plugins")),
            ("RABBITMQ_CONF_ENV_FILE".into(), p("rabbitmq-env.conf")),
            ("RABBITMQ_PID_FILE".into(), p("rabbit.pid")),
            ("RABBITMQ_DIST_PORT".into(), dist_port.to_string()),
        ];
        let mut cmd = Command::new(server);
        cmd.current_dir(d).envs(env.iter().map(|(k, v)| (k, v)));
        let proc = Proc::spawn("rabbitmq-server", cmd, &d.join("server.out"));
        let rabbit = Rabbit { port, management_port, web_port, node, dir, env, proc: Some(proc), _heavy: heavy };
        // `rabbitmqctl wait PIDFILE` waits for the pid file, the node and its applications
        // (`await_startup` fails at once while the node is not up yet).
        let pid_file = rabbit.dir.path().join("rabbit.pid");
        let out = rabbit.ctl(
            &["wait", pid_file.to_str().unwrap(), "--timeout", &RABBIT_BOOT.as_secs().to_string()],
            RABBIT_BOOT + Duration::from_secs(10),
        );
        // The management listener starts with its plugin, after the node: on a loaded machine
        // that takes a boot's time of its own.
        let step = if !out.status.success() {
            Some("rabbitmqctl wait")
        } else if !wait_until(WAIT, || port_accepts(rabbit.port)) {
            Some("MQTT listener")
        } else if !management_port.is_none_or(|p| wait_until(RABBIT_BOOT, || port_accepts(p))) {
            Some("management listener")
        } else if !web_port.is_none_or(|p| wait_until(RABBIT_BOOT, || port_accepts(p))) {
            Some("web MQTT listener")
        } else if !rabbit.ctl(&["await_startup", "--timeout", "60"], Duration::from_secs(90)).status.success() {
            Some("rabbitmqctl await_startup")
        } else {
            None
        };
        if let Some(step) = step {
            if retry && rabbit.server_output().contains("eaddrinuse") {
                eprintln!("RabbitMQ did not start ({step}): a port was taken; again with new ports");
                return None;
            }
            panic!(
                "RabbitMQ did not start ({step}):\nrabbitmqctl wait: {}\n{}\nserver output:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                tail(&rabbit.server_output(), 80)
            );
        }
        Some(rabbit)
    }

    pub fn addr(&self) -> String {
        addr(self.port)
    }

    pub fn server_output(&self) -> String {
        read_file_lossy(&self.dir.path().join("server.out"))
    }

    /// Runs `rabbitmqctl -n NODE ARGS` with this node's environment.
    pub fn ctl(&self, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = Command::new(format!("{RABBIT_SBIN}/rabbitmqctl"));
        cmd.arg("-n")
            .arg(&self.node)
            .args(args)
            .current_dir(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        run_with_timeout(&mut cmd, timeout)
    }

    /// `rabbitmqctl list_mqtt_connections client_id peer_host peer_port ssl ssl_protocol
    /// ssl_cipher ssl_key_exchange ssl_hash --formatter json`, parsed. Looks like
    /// `[{"client_id":"x","peer_host":[127,0,0,1],"peer_port":4444,"ssl":true,
    /// "ssl_protocol":"tlsv1.3","ssl_cipher":"aes_256_gcm","ssl_key_exchange":"any",
    /// "ssl_hash":"aead"}]` (`"undefined"` for the ssl_* fields without TLS).
    pub fn list_mqtt_connections(&self) -> Vec<serde_json::Value> {
        let out = self.ctl(
            &[
                "list_mqtt_connections",
                "client_id",
                "peer_host",
                "peer_port",
                "ssl",
                "ssl_protocol",
                "ssl_cipher",
                "ssl_key_exchange",
                "ssl_hash",
                "--formatter",
                "json",
                "--quiet",
            ],
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "list_mqtt_connections failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let start = text.find('[').unwrap_or_else(|| panic!("list_mqtt_connections printed no JSON array: {text}"));
        let v: serde_json::Value = serde_json::from_str(text[start..].trim())
            .unwrap_or_else(|e| panic!("list_mqtt_connections JSON ({e}): {text}"));
        v.as_array().cloned().unwrap_or_default()
    }

    /// The connection row of `client_id`, waiting for it to appear.
    pub fn wait_for_connection(&self, client_id: &str) -> Option<serde_json::Value> {
        let mut found = None;
        wait_until(WAIT, || {
            found = self.list_mqtt_connections().into_iter().find(|c| c["client_id"] == client_id);
            found.is_some()
        });
        found
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = self.ctl(&["stop"], Duration::from_secs(60));
            let _ = wait_child(&mut p.child, Duration::from_secs(30));
            p.kill();
        }
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        self.stop();
    }
}

/// RabbitMQ prints `peer_host` as a list of octets (`[127,0,0,1]`); turns it (or a string)
/// into the usual text form.
pub fn rabbit_peer_host(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(octets) if octets.len() == 4 => {
            octets.iter().map(|o| o.to_string()).collect::<Vec<_>>().join(".")
        }
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// harbormaster
// ---------------------------------------------------------------------------------------------

/// Path of the binary under test.
pub fn harbormaster_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_harbormaster"))
}

/// Runs `harbormaster ARGS` to completion (bounded) and returns its output.
pub fn harbormaster(args: &[&str]) -> Output {
    let mut cmd = Command::new(harbormaster_bin());
    cmd.args(args).env_remove("RUST_LOG").env_remove("HARBORMASTER_LOG");
    run_with_timeout(&mut cmd, CMD_TIMEOUT)
}

/// `harbormaster route --config CONFIG --client-id ID [--pool POOL]`: the brokers in
/// preference order (first = where the id goes).
pub fn route(config: &Path, client_id: &str, pool: Option<&str>) -> Vec<String> {
    let mut args = vec!["route", "--config", config.to_str().unwrap(), "--client-id", client_id];
    if let Some(pool) = pool {
        args.push("--pool");
        args.push(pool);
    }
    let out = harbormaster(&args);
    assert!(
        out.status.success(),
        "harbormaster route {client_id} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty(), "harbormaster route printed nothing");
    lines
}

/// The running load balancer.
pub struct Harbormaster {
    pub dir: TempDir,
    pub config_path: PathBuf,
    log_path: PathBuf,
    proc: Option<Proc>,
    exit: Option<ExitStatus>,
}

impl Harbormaster {
    /// Writes `config_toml` to a tempdir and runs `harbormaster run --config PATH`; waits
    /// until every listener and the admin server it names are bound. Bind them to port 0 and
    /// read the ports back with [`Harbormaster::port`] and [`Harbormaster::admin_addr`].
    pub fn start(config_toml: &str) -> Harbormaster {
        let dir = tempfile::Builder::new().prefix("hm-lb-").tempdir().unwrap();
        let config_path = dir.path().join("harbormaster.toml");
        fs::write(&config_path, config_toml).unwrap();
        Harbormaster::start_with_file(dir, config_path)
    }

    /// Like `start`, with the config file already written at `config_path` (e.g. beside
    /// certificates it names by relative path).
    pub fn start_with_file(dir: TempDir, config_path: PathBuf) -> Harbormaster {
        Harbormaster::start_with_env(dir, config_path, &[])
    }

    /// Like `start_with_file`, with extra environment variables (e.g. `KUBECONFIG`).
    pub fn start_with_env(dir: TempDir, config_path: PathBuf, env: &[(&str, &str)]) -> Harbormaster {
        let text = fs::read_to_string(&config_path).unwrap();
        let (listeners, admin) = config_binds(&text);
        assert!(!listeners.is_empty(), "config has no listeners:\n{text}");
        let log_path = dir.path().join("harbormaster.log");
        let mut cmd = Command::new(harbormaster_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .env_remove("HARBORMASTER_LOG")
            .env("NO_COLOR", "1")
            // The setup threads at normal priority: on this machine every test's processes
            // share one scheduling group, where setup threads at `SCHED_IDLE` would wait for
            // any busy peer (a RabbitMQ booting). e2e_settle runs the default and checks it.
            .env("HARBORMASTER_SETUP_PRIORITY", "normal")
            .envs(env.iter().copied())
            .current_dir(dir.path());
        // HM_TEST_LOG=debug (or a tracing filter) raises harbormaster's log level in tests.
        if let Ok(level) = std::env::var("HM_TEST_LOG") {
            cmd.env("HARBORMASTER_LOG", level);
        }
        let mut proc = Proc::spawn("harbormaster", cmd, &log_path);
        let up = wait_until(WAIT, || {
            if proc.exited().is_some() {
                return false;
            }
            // Bound, then one connection to each: the tests that count connections expect
            // these probes, and wait until they have ended.
            let bound = Bound::from_log(&read_file_lossy(&log_path));
            let accepts = |a: &String| port_accepts(port_of(a));
            listeners.iter().all(|l| bound.listeners.get(l).is_some_and(accepts))
                && (!admin || bound.admin.as_ref().is_some_and(accepts))
        });
        if !up {
            let status = proc.exited();
            panic!(
                "harbormaster did not bind {listeners:?}{} (exit: {status:?}):\n{}\nconfig:\n{text}",
                if admin { " and the admin server" } else { "" },
                read_file_lossy(&log_path)
            );
        }
        Harbormaster { dir, config_path, log_path, proc: Some(proc), exit: None }
    }

    /// Where listener `name` is bound now (`127.0.0.1:PORT`), as harbormaster logged it; after
    /// a reload that moved it, the new address.
    pub fn addr(&self, name: &str) -> String {
        let log = self.log();
        Bound::from_log(&log)
            .listeners
            .remove(name)
            .unwrap_or_else(|| panic!("no \"listening\" line for listener {name:?}:\n{log}"))
    }

    /// The port of listener `name` ([`Harbormaster::addr`]).
    pub fn port(&self, name: &str) -> u16 {
        port_of(&self.addr(name))
    }

    /// Where the admin server is bound (`127.0.0.1:PORT`), as harbormaster logged it.
    pub fn admin_addr(&self) -> String {
        let log = self.log();
        Bound::from_log(&log).admin.unwrap_or_else(|| panic!("no \"admin server listening\" line:\n{log}"))
    }

    /// The port of the admin server ([`Harbormaster::admin_addr`]).
    pub fn admin_port(&self) -> u16 {
        port_of(&self.admin_addr())
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("harbormaster not running").pid()
    }

    pub fn log(&self) -> String {
        read_file_lossy(&self.log_path)
    }

    /// The first line of `harbormaster route` for `client_id` on this config.
    pub fn route(&self, client_id: &str) -> Vec<String> {
        route(&self.config_path, client_id, None)
    }

    pub fn route_in(&self, client_id: &str, pool: &str) -> Vec<String> {
        route(&self.config_path, client_id, Some(pool))
    }

    /// The end-of-connection log lines (those with a `conn_id` and a `close_reason`),
    /// as key=value maps.
    pub fn connection_logs(&self) -> Vec<BTreeMap<String, String>> {
        self.log()
            .lines()
            .map(parse_kv_line)
            .filter(|m| m.contains_key("conn_id") && m.contains_key("close_reason"))
            .collect()
    }

    /// Waits for an end-of-connection log line with `key` = `value`, returns it.
    pub fn wait_connection_log(&self, key: &str, value: &str) -> Option<BTreeMap<String, String>> {
        let mut found = None;
        wait_until(WAIT, || {
            found = self.connection_logs().into_iter().find(|m| m.get(key).map(String::as_str) == Some(value));
            found.is_some()
        });
        found
    }

    pub fn sigterm(&self) {
        send_signal(self.pid() as i64, "TERM");
    }

    /// SIGHUP: reload the config.
    pub fn sighup(&self) {
        send_signal(self.pid() as i64, "HUP");
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.exit {
            return Some(s);
        }
        let p = self.proc.as_mut().expect("harbormaster not running");
        let s = wait_child(&mut p.child, timeout);
        if s.is_some() {
            p.done = true;
            self.exit = s;
        }
        s
    }
}

impl Drop for Harbormaster {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// The listeners a config names, and whether it gives the admin server an address (only
/// then is the admin server waited for: the default address may be taken by another test).
pub fn config_binds(config: &str) -> (Vec<String>, bool) {
    let v: toml::Value = toml::from_str(config).unwrap_or_else(|e| panic!("config is not TOML ({e}):\n{config}"));
    let listeners = v
        .get("listener")
        .and_then(|l| l.as_array())
        .map(|l| l.iter().filter_map(|l| Some(l.get("name")?.as_str()?.to_string())).collect())
        .unwrap_or_default();
    let admin = v
        .get("admin")
        .is_some_and(|a| a.get("bind").is_some() && a.get("enabled").and_then(|e| e.as_bool()).unwrap_or(true));
    (listeners, admin)
}

/// The addresses a harbormaster process reported binding, from its log (text or JSON): the
/// last "listening" line of each listener, and the "admin server listening" line.
#[derive(Debug, Default)]
pub struct Bound {
    pub listeners: BTreeMap<String, String>,
    pub admin: Option<String>,
}

impl Bound {
    pub fn from_log(log: &str) -> Bound {
        let mut bound = Bound::default();
        for line in log.lines() {
            let fields = parse_kv_line(line);
            let Some(addr) = fields.get("addr") else { continue };
            if is_event(line, &fields, "admin server listening") {
                bound.admin = Some(addr.clone());
            } else if let Some(name) = fields.get("listener").filter(|_| is_event(line, &fields, "listening")) {
                bound.listeners.insert(name.clone(), addr.clone());
            }
        }
        bound
    }
}

/// Whether a log line is the event `message`: JSON carries it as a field, text prints it
/// between the target and the fields.
fn is_event(line: &str, fields: &BTreeMap<String, String>, message: &str) -> bool {
    match fields.get("msg").or_else(|| fields.get("message")) {
        Some(m) => m == message,
        None => strip_ansi(line).contains(&format!(": {message} ")),
    }
}

/// The port of `IP:PORT`.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or_else(|| panic!("not IP:PORT: {addr}"))
}

/// Removes ANSI escape sequences.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Parses the `key=value` fields of a text log line (values may be double-quoted with
/// backslash escapes). Words without `=` are ignored. A JSON log line (`{...}`) is also
/// accepted: its flat string/number fields and those of a nested `fields` object.
pub fn parse_kv_line(line: &str) -> BTreeMap<String, String> {
    let line = strip_ansi(line);
    let mut map = BTreeMap::new();
    let trimmed = line.trim();
    if trimmed.starts_with('{') {
        if let Ok(serde_json::Value::Object(obj)) = serde_json::from_str(trimmed) {
            let mut put = |o: &serde_json::Map<String, serde_json::Value>| {
                for (k, v) in o {
                    let s = match v {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Object(_) => continue,
                        other => other.to_string(),
                    };
                    map.insert(k.clone(), s);
                }
            };
            put(&obj);
            if let Some(serde_json::Value::Object(f)) = obj.get("fields") {
                put(f);
            }
            return map;
        }
    }
    let b: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && b[i].is_whitespace() {
            i += 1;
        }
        let start = i;
        while i < b.len() && !b[i].is_whitespace() && b[i] != '=' && b[i] != '"' {
            i += 1;
        }
        if i < b.len() && b[i] == '=' && i > start {
            let key: String = b[start..i].iter().collect();
            i += 1;
            let mut val = String::new();
            if i < b.len() && b[i] == '"' {
                i += 1;
                while i < b.len() && b[i] != '"' {
                    if b[i] == '\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    val.push(b[i]);
                    i += 1;
                }
                i += 1;
            } else {
                while i < b.len() && !b[i].is_whitespace() {
                    val.push(b[i]);
                    i += 1;
                }
            }
            map.insert(key, val);
        } else {
            // skip a word (possibly quoted) without '='
            if i < b.len() && b[i] == '"' {
                i += 1;
                while i < b.len() && b[i] != '"' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < b.len() && !b[i].is_whitespace() {
                    i += 1;
                }
            }
        }
    }
    map
}

// ---------------------------------------------------------------------------------------------
// mosquitto_pub / mosquitto_sub
// ---------------------------------------------------------------------------------------------

/// TLS options for the mosquitto clients.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub cafile: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Where and how mosquitto_pub/sub connect. For TLS use host `localhost` (the server
/// certificate names `localhost` and 127.0.0.1; `localhost` also makes the client send SNI).
#[derive(Debug, Clone)]
pub struct MqttClient {
    pub host: String,
    pub port: u16,
    pub version: MqttVersion,
    pub tls: Option<ClientTls>,
}

impl MqttClient {
    pub fn plain(port: u16, version: MqttVersion) -> MqttClient {
        MqttClient { host: "127.0.0.1".into(), port, version, tls: None }
    }

    pub fn tls(port: u16, version: MqttVersion, tls: ClientTls) -> MqttClient {
        MqttClient { host: "localhost".into(), port, version, tls: Some(tls) }
    }

    fn args(&self, client_id: &str) -> Vec<String> {
        let mut a = vec![
            "-h".to_string(),
            self.host.clone(),
            "-p".into(),
            self.port.to_string(),
            "-V".into(),
            self.version.mosquitto_arg().into(),
            "-i".into(),
            client_id.into(),
        ];
        if let Some(t) = &self.tls {
            a.push("--cafile".into());
            a.push(t.cafile.to_str().unwrap().into());
            if let (Some(c), Some(k)) = (&t.cert, &t.key) {
                a.push("--cert".into());
                a.push(c.to_str().unwrap().into());
                a.push("--key".into());
                a.push(k.to_str().unwrap().into());
            }
        }
        a
    }

    /// `mosquitto_pub -t TOPIC -m MSG` (QoS 0), bounded.
    pub fn publish(&self, client_id: &str, topic: &str, msg: &str) -> Output {
        self.publish_qos(client_id, topic, msg, 0)
    }

    pub fn publish_qos(&self, client_id: &str, topic: &str, msg: &str, qos: u8) -> Output {
        let bin = require_program("mosquitto_pub");
        let mut cmd = Command::new(bin);
        cmd.args(self.args(client_id)).args(["-t", topic, "-m", msg, "-q", &qos.to_string()]);
        run_with_timeout(&mut cmd, CMD_TIMEOUT)
    }

    /// Publishes and asserts mosquitto_pub succeeded.
    pub fn publish_ok(&self, client_id: &str, topic: &str, msg: &str) {
        let out = self.publish(client_id, topic, msg);
        assert!(
            out.status.success(),
            "mosquitto_pub -V {} -i {client_id} to {}:{} failed ({:?}): {}{}",
            self.version.mosquitto_arg(),
            self.host,
            self.port,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts `mosquitto_sub -C count -W timeout -t TOPIC` in the background.
    pub fn subscribe(&self, client_id: &str, topic: &str, count: usize) -> Subscriber {
        let bin = require_program("mosquitto_sub");
        let mut cmd = Command::new(bin);
        cmd.args(self.args(client_id)).args([
            "-t",
            topic,
            "-C",
            &count.to_string(),
            "-W",
            &CMD_TIMEOUT.as_secs().to_string(),
        ]);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let mut child = cmd.spawn().expect("spawn mosquitto_sub");
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (o, e) = (stdout.clone(), stderr.clone());
        let threads = vec![thread::spawn(move || pump(out, o)), thread::spawn(move || pump(err, e))];
        Subscriber { client_id: client_id.to_string(), child, stdout, stderr, threads }
    }
}

fn pump(mut r: impl Read, into: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => into.lock().unwrap().extend_from_slice(&buf[..n]),
        }
    }
}

/// A running mosquitto_sub; killed on drop.
pub struct Subscriber {
    pub client_id: String,
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Subscriber {
    /// Received messages so far (one per line).
    pub fn messages(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).lines().map(str::to_string).collect()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits (bounded) until `msg` was received.
    pub fn wait_for_message(&self, msg: &str) -> bool {
        wait_until(WAIT, || self.messages().iter().any(|m| m == msg))
    }

    /// Waits (bounded) for the process to end (after `-C count` messages), returns the
    /// messages it printed and its exit status.
    pub fn finish(mut self) -> (Option<ExitStatus>, Vec<String>) {
        let status = wait_child(&mut self.child, CMD_TIMEOUT + Duration::from_secs(5));
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (status, self.messages())
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "----- mosquitto_sub {} stdout/stderr -----\n{:?}\n{}\n-----",
                self.client_id,
                self.messages(),
                self.stderr()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// A test-owned TCP backend that records what it receives
// ---------------------------------------------------------------------------------------------

/// A TCP server that accepts every connection and records the bytes each one sent. For refusal
/// tests ("nothing reached the backend") and exact PROXY header checks. Its only answer is one
/// 3.1.1 CONNACK "accepted" once the first bytes arrived, so harbormaster, which waits for a
/// broker's first answer (`backend_connack_timeout`), takes it for a live broker.
type Recording = Arc<Mutex<Vec<u8>>>;

pub struct RecordingBackend {
    pub port: u16,
    conns: Arc<Mutex<Vec<Recording>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl RecordingBackend {
    pub fn start() -> RecordingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let conns: Arc<Mutex<Vec<Recording>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, s) = (conns.clone(), stop.clone());
        thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        let rec = Arc::new(Mutex::new(Vec::new()));
                        c.lock().unwrap().push(rec.clone());
                        let s2 = s.clone();
                        thread::spawn(move || {
                            stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                            let mut buf = [0u8; 65536];
                            let mut answered = false;
                            while !s2.load(Ordering::SeqCst) {
                                match stream.read(&mut buf) {
                                    Ok(0) => return,
                                    Ok(n) => {
                                        rec.lock().unwrap().extend_from_slice(&buf[..n]);
                                        if !answered {
                                            answered = true;
                                            let _ = stream.write_all(&[0x20, 2, 0, 0]);
                                        }
                                    }
                                    Err(e)
                                        if e.kind() == io::ErrorKind::WouldBlock
                                            || e.kind() == io::ErrorKind::TimedOut => {}
                                    Err(_) => return,
                                }
                            }
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(20)),
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        RecordingBackend { port, conns, stop }
    }

    pub fn addr(&self) -> String {
        addr(self.port)
    }

    pub fn connection_count(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// All bytes received, over all connections.
    pub fn total_bytes(&self) -> usize {
        self.conns.lock().unwrap().iter().map(|c| c.lock().unwrap().len()).sum()
    }

    pub fn received(&self) -> Vec<Vec<u8>> {
        self.conns.lock().unwrap().iter().map(|c| c.lock().unwrap().clone()).collect()
    }
}

impl Drop for RecordingBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64*), for bulk transfers.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 of a byte slice, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex of a byte slice, space separated (`20 02 00 03`), for assertion messages.
pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// Writes all bytes, ignoring errors (for tests that expect the peer to have closed).
pub fn write_ignoring_errors(s: &mut TcpStream, data: &[u8]) {
    let _ = s.write_all(data);
    let _ = s.flush();
}

// ---------------------------------------------------------------------------------------------
// PROXY v2 headers built by the test (an oracle independent of harbormaster's encoder)
// ---------------------------------------------------------------------------------------------

/// The SSL TLV (0x20) value: client flags, verify result, then sub-TLVs
/// (0x21 version, 0x22 CN, 0x23 cipher, ...).
pub fn pp2_ssl_value(client_flags: u8, verify: u32, sub: &[(u8, &[u8])]) -> Vec<u8> {
    let mut v = vec![client_flags];
    v.extend_from_slice(&verify.to_be_bytes());
    for (t, val) in sub {
        v.push(*t);
        v.extend_from_slice(&(val.len() as u16).to_be_bytes());
        v.extend_from_slice(val);
    }
    v
}

/// A PROXY v2 PROXY/STREAM header from `src` to `dst` with the given TLVs, built with ppp;
/// with `crc32c` a CRC32C TLV (0x03) is appended and filled in.
pub fn proxy_v2_header(src: SocketAddr, dst: SocketAddr, tlvs: &[(u8, Vec<u8>)], crc32c: bool) -> Vec<u8> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    let mut b = Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst));
    for (t, v) in tlvs {
        b = b.write_tlv(*t, v.as_slice()).unwrap();
    }
    if crc32c {
        b = b.write_tlv(0x03u8, [0u8; 4].as_slice()).unwrap();
    }
    let mut h = b.build().unwrap();
    if crc32c {
        let crc = crc32c::crc32c(&h);
        let n = h.len();
        h[n - 4..].copy_from_slice(&crc.to_be_bytes());
    }
    h
}

/// Publishes `msg` every half second (QoS 0) until `sub` has received it; for subscribers
/// whose SUBSCRIBE the test cannot observe (RabbitMQ). Returns whether it arrived.
pub fn publish_until_received(client: &MqttClient, client_id: &str, topic: &str, msg: &str, sub: &Subscriber) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        client.publish_ok(client_id, topic, msg);
        if wait_until(Duration::from_millis(500), || sub.messages().iter().any(|m| m == msg)) {
            return true;
        }
    }
    false
}

// ---------------------------------------------------------------------------------------------
// tshark: an independent decoder of the PROXY v2 headers on the wire
// ---------------------------------------------------------------------------------------------

/// `tshark` capturing on loopback the TCP segments sent to `port`, decoding PROXY v2 headers
/// with its own dissector (heuristic, so nothing to configure). Neither RabbitMQ 3.10 nor
/// HAProxy 2.6 shows the SSL sub-TLVs (CN, algorithms) of a header they accepted; tshark does.
/// Killed on drop.
pub struct Tshark {
    proc: Option<Proc>,
    out_path: PathBuf,
    _dir: TempDir,
}

/// One PROXY v2 header as tshark decoded it: every TLV it listed, sub-TLVs of the SSL TLV
/// included, in wire order (tshark 4.0 lists no TLV after the custom ones: no CRC32C).
#[derive(Debug, Clone)]
pub struct DecodedHeader {
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

impl DecodedHeader {
    pub fn get(&self, kind: u8) -> Option<&[u8]> {
        self.tlvs.iter().find(|(k, _)| *k == kind).map(|(_, v)| v.as_slice())
    }

    pub fn kinds(&self) -> Vec<u8> {
        self.tlvs.iter().map(|(k, _)| *k).collect()
    }
}

impl Tshark {
    pub fn start(port: u16) -> Tshark {
        let bin = require_program("tshark");
        let dir = tempfile::Builder::new().prefix("hm-tshark-").tempdir().unwrap();
        let out_path = dir.path().join("fields.txt");
        let err_path = dir.path().join("stderr.txt");
        let mut cmd = Command::new(bin);
        cmd.args(["-i", "lo", "-f", &format!("tcp dst port {port}"), "-l", "-n", "-T", "fields"])
            .args(["-e", "proxy.v2.tlv.type", "-e", "proxy.v2.tlv.value"])
            .args(["-E", "separator=|", "-E", "occurrence=a", "-E", "aggregator=,"])
            .stdout(Stdio::from(File::create(&out_path).unwrap()))
            .stderr(Stdio::from(File::create(&err_path).unwrap()))
            .stdin(Stdio::null())
            .process_group(0);
        let child = cmd.spawn().expect("spawn tshark");
        let mut proc = Proc { name: "tshark".into(), child, log_path: err_path.clone(), done: false };
        let up = wait_until(WAIT, || proc.exited().is_none() && read_file_lossy(&err_path).contains("Capturing on"));
        assert!(up, "tshark did not start capturing:\n{}", read_file_lossy(&err_path));
        Tshark { proc: Some(proc), out_path, _dir: dir }
    }

    /// Every PROXY v2 header captured so far.
    pub fn headers(&self) -> Vec<DecodedHeader> {
        let text = read_file_lossy(&self.out_path);
        let mut out = Vec::new();
        for line in text.lines() {
            let Some((types, values)) = line.split_once('|') else { continue };
            if types.trim().is_empty() {
                continue;
            }
            let kinds = types.split(',').map(|t| u8::from_str_radix(t.trim().trim_start_matches("0x"), 16));
            let values = values.split(',').map(|v| {
                (0..v.len() / 2).map(|i| u8::from_str_radix(&v[2 * i..2 * i + 2], 16)).collect::<Result<Vec<u8>, _>>()
            });
            let tlvs: Option<Vec<(u8, Vec<u8>)>> = kinds.zip(values).map(|(k, v)| Some((k.ok()?, v.ok()?))).collect();
            if let Some(tlvs) = tlvs {
                out.push(DecodedHeader { tlvs });
            }
        }
        out
    }

    /// Waits for the header whose UNIQUE_ID TLV is `unique_id` (harbormaster's `conn_id`).
    pub fn wait_for_unique_id(&self, unique_id: &str) -> Option<DecodedHeader> {
        let mut found = None;
        wait_until(WAIT, || {
            found = self.headers().into_iter().find(|h| h.get(0x05) == Some(unique_id.as_bytes()));
            found.is_some()
        });
        found
    }
}

impl Drop for Tshark {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}
