//! A real Prometheus (Debian `prometheus`) for the tests of the alert rules and the dashboard:
//! started in its own temporary directory on a free loopback port, scraping the one target it
//! is given every second and evaluating its rule file every second; killed on drop. Queries go
//! through its HTTP API with a small HTTP/1.0 client (HTTP/1.0: the answer is never chunked).

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use super::{addr, free_port, read_file_lossy, require_program, tail, wait_until, Proc, WAIT};

pub struct Prometheus {
    pub port: u16,
    dir: TempDir,
    proc: Proc,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`IP:PORT`, path `/metrics`) every second with the
    /// rule file `rules` (copied as it is), and waits until it is ready.
    pub fn start(target: &str, rules: &str) -> Prometheus {
        let bin = require_program("prometheus");
        let dir = tempfile::Builder::new().prefix("hm-prometheus-").tempdir().unwrap();
        fs::write(dir.path().join("rules.yml"), rules).unwrap();
        fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [rules.yml]\n\
                 scrape_configs:\n  - job_name: harbormaster\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let mut last = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let log = dir.path().join(format!("prometheus-{attempt}.log"));
            let mut cmd = Command::new(&bin);
            cmd.current_dir(dir.path())
                .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"));
            let mut proc = Proc::spawn("prometheus", cmd, &log);
            let ready = wait_until(WAIT, || {
                proc.exited().is_none() && http10_get(&addr(port), "/-/ready").is_some_and(|(s, _)| s == 200)
            });
            if ready {
                return Prometheus { port, dir, proc };
            }
            last = tail(&read_file_lossy(&log), 40);
            proc.kill();
        }
        panic!("prometheus did not start:\n{last}");
    }

    pub fn addr(&self) -> String {
        addr(self.port)
    }

    /// `GET /api/v1/PATH` (path and query already encoded): the whole JSON answer, whatever
    /// its status (an expression that does not parse is a 400 with `"status":"error"`).
    pub fn api(&self, path_and_query: &str) -> Value {
        let (status, body) = http10_get(&self.addr(), &format!("/api/v1/{path_and_query}"))
            .unwrap_or_else(|| panic!("prometheus did not answer /api/v1/{path_and_query}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/api/v1/{path_and_query}: {status}: {e}: {body}"))
    }

    /// An instant query: the JSON answer (`status`, `data.result`, or `error`).
    pub fn query(&self, expr: &str) -> Value {
        self.api(&format!("query?query={}", percent_encode(expr)))
    }

    /// The log so far, for failure messages.
    pub fn log(&self) -> String {
        let mut out = String::new();
        for e in fs::read_dir(self.dir.path()).unwrap().flatten() {
            if e.file_name().to_string_lossy().ends_with(".log") {
                out.push_str(&read_file_lossy(&e.path()));
            }
        }
        tail(&out, 60)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// Every byte but the unreserved ones percent-encoded: a PromQL expression as a query value.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One HTTP/1.0 `GET` (no chunked answer, the server closes): status and body, or `None` when
/// nothing answered.
pub fn http10_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(WAIT)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}
