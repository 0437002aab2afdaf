//! `harbormaster demo` end to end, as a newcomer uses it: start the real binary on free ports,
//! run the mosquitto_sub and mosquitto_pub command lines it prints (real clients, TLS with the
//! printed certificates), check the message arrives, that the table names the clients on the
//! broker the running process routes them to, then Ctrl-C (SIGINT): exit 0 and the temporary
//! folder is gone.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

/// The demo binary, its stdout collected line by line; killed on drop.
struct Demo {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
}

impl Demo {
    fn start(args: &[&str]) -> Demo {
        let mut child = Command::new(harbormaster_bin())
            .arg("demo")
            .args(args)
            // As the other e2e tests run harbormaster (support's `Harbormaster::start_with_env`).
            .env("HARBORMASTER_SETUP_PRIORITY", "normal")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn harbormaster demo");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (out, lines) = (child.stdout.take().unwrap(), stdout.clone());
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let (mut err, text) = (child.stderr.take().unwrap(), stderr.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                text.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Demo { child, stdout, stderr }
    }

    fn lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// The first printed line that contains `needle`, trimmed, waiting for it.
    fn wait_line(&self, needle: &str) -> String {
        let mut found = None;
        wait_until(WAIT, || {
            found = self.lines().iter().find(|l| l.contains(needle)).map(|l| l.trim().to_string());
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no line with {needle:?} in the demo's output:\n{}", self.output()))
    }

    /// The rows of the last complete table: (broker, connected, routed, client-ids).
    fn last_table(&self) -> Vec<(String, u64, u64, String)> {
        let lines = self.lines();
        let Some(head) = lines.iter().rposition(|l| l.starts_with('[') && l.contains("connected")) else {
            return Vec::new();
        };
        let rows: Vec<(String, u64, u64, String)> = lines[head + 1..]
            .iter()
            .take(3)
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let broker = words.next()?.to_string();
                let connected = words.next()?.parse().ok()?;
                let routed = words.next()?.parse().ok()?;
                Some((broker, connected, routed, words.collect::<Vec<_>>().join(" ")))
            })
            .collect();
        if rows.len() == 3 {
            rows
        } else {
            Vec::new()
        }
    }

    /// Waits for a table row that satisfies `pred`; returns it.
    fn wait_row(&self, what: &str, pred: impl Fn(&(String, u64, u64, String)) -> bool) -> (String, u64, u64, String) {
        let mut found = None;
        wait_until(WAIT, || {
            found = self.last_table().into_iter().find(&pred);
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no table row with {what}:\n{}", self.output()))
    }

    fn output(&self) -> String {
        format!("--- stdout ---\n{}\n--- stderr ---\n{}", self.lines().join("\n"), self.stderr.lock().unwrap())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.output());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value after `label` on a printed line such as `  certificates    /tmp/x   (...)`.
fn field(line: &str, label: &str) -> String {
    line.trim()
        .strip_prefix(label)
        .unwrap_or_else(|| panic!("{line:?} lacks {label:?}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A child process killed when the test ends, passed or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A printed command line run by a shell, as a user pastes it.
fn shell(line: &str) -> Command {
    require_program("mosquitto_sub");
    let mut c = Command::new("sh");
    c.arg("-c").arg(line);
    c
}

#[test]
fn demo_runs_printed_commands_shows_the_table_and_stops_on_sigint() {
    let demo = Demo::start(&["--port", "0", "--admin-port", "0", "--interval", "300ms"]);
    let sub_line = demo.wait_line("mosquitto_sub ");
    let pub_line = demo.wait_line("mosquitto_pub ");
    let admin = field(&demo.wait_line("status page"), "status page");
    let admin = admin.trim_start_matches("http://").trim_end_matches('/').to_string();
    let certs = PathBuf::from(field(&demo.wait_line("certificates"), "certificates"));
    for f in ["ca.pem", "client.pem", "client.key"] {
        assert!(certs.join(f).is_file(), "{} is missing", certs.join(f).display());
        assert!(sub_line.contains(certs.join(f).to_str().unwrap()), "{sub_line} does not use {f}");
    }
    assert!(sub_line.contains("-i demo-sub"), "{sub_line}");
    let pub_id = pub_line.split_whitespace().skip_while(|w| *w != "-i").nth(1).expect("pub -i").to_string();

    // The table starts empty.
    let empty = demo.wait_row("no clients", |r| r.0 == "broker-0" && r.1 == 0);
    assert_eq!(empty.3, "-");

    // Where the running process routes the two client-ids.
    let route: serde_json::Value =
        serde_json::from_str(&http_get(&admin, "/route?client_id=demo-sub").1).expect("/route is JSON");
    let broker = route["broker"].as_str().expect("broker").to_string();
    let route_pub: serde_json::Value =
        serde_json::from_str(&http_get(&admin, &format!("/route?client_id={pub_id}")).1).expect("/route is JSON");
    assert_eq!(route_pub["broker"], route["broker"], "the printed client-ids must share a broker");
    // The printed `harbormaster route` agrees with the running process.
    let route_line = demo.wait_line(" route --config ");
    let out = run_with_timeout(&mut shell(&route_line), CMD_TIMEOUT);
    assert!(out.status.success(), "{route_line}: {}", String::from_utf8_lossy(&out.stderr));
    let order: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    let truck: serde_json::Value =
        serde_json::from_str(&http_get(&admin, "/route?client_id=truck-42").1).expect("/route is JSON");
    assert_eq!(order.len(), 3, "{order:?}");
    assert_eq!(truck["broker"].as_str(), Some(order[0].as_str()), "{route_line}");

    // The printed subscriber, exactly as printed, plus "stop after one message".
    let mut sub = Killed(
        shell(&format!("exec {sub_line} -C 1 -W 60"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mosquitto_sub"),
    );
    let row = demo.wait_row("demo-sub connected", |r| r.3.contains("demo-sub [CN demo-device]") && r.1 >= 1);
    assert_eq!(row.0, broker, "the table shows demo-sub on another broker than /route: {row:?}");

    // The printed publisher, exactly as printed; again until the subscriber has it (its
    // SUBSCRIBE may still be on its way when the table shows it connected).
    let deadline = Instant::now() + WAIT;
    let status = loop {
        let out = run_with_timeout(&mut shell(&pub_line), CMD_TIMEOUT);
        assert!(out.status.success(), "{pub_line}: {:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
        if let Some(status) = wait_child(&mut sub.0, Duration::from_millis(500)) {
            break status;
        }
        assert!(Instant::now() < deadline, "mosquitto_sub got no message");
    };
    let mut received = String::new();
    sub.0.stdout.take().unwrap().read_to_string(&mut received).unwrap();
    assert!(status.success(), "mosquitto_sub: {status:?} {received}");
    assert_eq!(received.trim(), "demo/hello hello through harbormaster");

    // The printed WebSocket publisher (paho-mqtt over wss:// on the same port), exactly as
    // printed, to a subscriber as before.
    let ws_line = demo.wait_line("python3 -c ");
    assert!(ws_line.contains("transport=\"websockets\""), "{ws_line}");
    let mut sub = Killed(
        shell(&format!("exec {sub_line} -C 1 -W 60"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mosquitto_sub"),
    );
    let deadline = Instant::now() + WAIT;
    let status = loop {
        let out = run_with_timeout(&mut shell(&ws_line), CMD_TIMEOUT);
        assert!(out.status.success(), "{ws_line}: {:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
        assert!(out.stderr.is_empty(), "{ws_line}: {}", String::from_utf8_lossy(&out.stderr));
        if let Some(status) = wait_child(&mut sub.0, Duration::from_millis(500)) {
            break status;
        }
        assert!(Instant::now() < deadline, "mosquitto_sub got no message over WebSocket");
    };
    let mut received = String::new();
    sub.0.stdout.take().unwrap().read_to_string(&mut received).unwrap();
    assert!(status.success(), "mosquitto_sub: {status:?} {received}");
    assert_eq!(received.trim(), "demo/hello hello over WebSocket");

    // Both clients have come and gone through the same broker's door.
    // A client's end reaches the table when its connection's task has ended: wait for both.
    let row = demo.wait_row("both clients left, nothing connected any more", |r| {
        r.3.contains("left:") && r.3.contains(&pub_id) && r.2 >= 2 && r.1 == 0
    });
    assert_eq!(row.0, broker, "{row:?}");
    assert!(row.3.contains("demo-sub"), "{row:?}");

    // Ctrl-C.
    let mut demo = demo;
    send_signal(demo.child.id() as i64, "INT");
    let status = wait_child(&mut demo.child, WAIT).expect("demo still running 30 s after SIGINT");
    assert!(status.success(), "exit status after SIGINT: {status:?}\n{}", demo.output());
    wait_until(Duration::from_secs(5), || demo.lines().iter().any(|l| l.starts_with("stopped")));
    assert!(demo.lines().iter().any(|l| l.starts_with("stopped")), "{}", demo.output());
    assert!(!certs.exists(), "{} was not removed", certs.display());
}

#[test]
fn demo_on_a_taken_port_says_which_flag_to_change() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let mut demo = Demo::start(&["--port", &port, "--admin-port", "0"]);
    let status = wait_child(&mut demo.child, WAIT).expect("demo should stop");
    assert_eq!(status.code(), Some(1), "{}", demo.output());
    wait_until(Duration::from_secs(5), || demo.stderr.lock().unwrap().contains("--port"));
    assert!(demo.stderr.lock().unwrap().contains("--port"), "{}", demo.output());
}
