//! `harbormaster check` and `harbormaster route`: the shipped configs, generated ones with
//! relative paths, and the routing properties the docs promise.

use std::fs;
use std::path::{Path, PathBuf};

use crate::support::*;

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn check(path: &Path) -> std::process::Output {
    harbormaster(&["check", "--config", path.to_str().unwrap()])
}

#[test]
fn check_accepts_the_reference_config() {
    let path = config_dir().join("harbormaster.toml");
    assert!(path.is_file(), "{} is missing", path.display());
    let out = check(&path);
    assert!(out.status.success(), "check rejected {}:\n{}", path.display(), output_text(&out));
}

#[test]
fn check_rejects_every_invalid_config() {
    let dir = config_dir().join("invalid");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "expected at least 3 invalid configs in {}, found {files:?}", dir.display());
    for f in &files {
        let out = check(f);
        let text = output_text(&out);
        assert!(!out.status.success(), "check accepted the invalid {}:\n{text}", f.display());
        assert!(out.status.code().is_some(), "check crashed on {} ({:?}):\n{text}", f.display(), out.status);
        assert!(!text.trim().is_empty(), "check printed no problem for {}", f.display());
        assert!(!text.contains("panicked"), "check panicked on {}:\n{text}", f.display());
    }
}

/// A config beside freshly generated certificates, naming them by relative path.
fn write_relative_config(certs: &Certs, pool_extra: &str) -> PathBuf {
    let path = certs.dir.path().join("hm.toml");
    fs::write(
        &path,
        format!(
            r#"
[[listener]]
name = "mqtts"
bind = "127.0.0.1:0"
pool = "brokers"
[listener.tls]
certs = [{{ cert = "server.pem", key = "server.key" }}]
client_ca = "ca.pem"
client_auth = "required"

[pool.brokers]
backends = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
{pool_extra}
"#
        ),
    )
    .unwrap();
    path
}

#[test]
fn check_resolves_relative_paths_against_the_config_file() {
    let certs = Certs::new();
    let path = write_relative_config(&certs, "");
    // run from another directory: relative paths must not depend on the working directory
    let mut cmd = std::process::Command::new(harbormaster_bin());
    cmd.args(["check", "--config", path.to_str().unwrap()]).current_dir("/");
    let out = run_with_timeout(&mut cmd, CMD_TIMEOUT);
    assert!(out.status.success(), "{}", output_text(&out));

    // the same file moved elsewhere no longer finds its certificates
    let elsewhere = tempfile::tempdir().unwrap();
    let moved = elsewhere.path().join("hm.toml");
    fs::copy(&path, &moved).unwrap();
    let out = check(&moved);
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(output_text(&out).contains("server.pem"), "{}", output_text(&out));
}

#[test]
fn check_reports_every_problem_with_its_key_path() {
    let certs = Certs::new();
    let path = write_relative_config(&certs, "backend_attempts = 0\nmax_header_bytes = 20\n");
    let out = check(&path);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let attempts = lines.iter().position(|l| l.contains("backend_attempts"));
    let header = lines.iter().position(|l| l.contains("max_header_bytes"));
    assert!(
        attempts.is_some() && header.is_some() && attempts != header,
        "each problem on its own line with its key:\n{text}"
    );

    let path = write_relative_config(&certs, "hash_key = \"shoe_size\"\n");
    let out = check(&path);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("hash_key"), "{text}");
}

fn route_lines(config: &Path, id: &str) -> Vec<String> {
    route(config, id, None)
}

fn write_pool_config(dir: &Path, name: &str, backends: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let list: Vec<String> = backends.iter().map(toml_str).collect();
    fs::write(
        &path,
        format!(
            r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "brokers"

[pool.brokers]
backends = [{}]
"#,
            list.join(", ")
        ),
    )
    .unwrap();
    path
}

#[test]
fn route_is_a_stable_order_independent_consistent_hash() {
    let dir = tempfile::tempdir().unwrap();
    let b = ["127.0.0.1:6001", "127.0.0.1:6002", "127.0.0.1:6003"];
    let abc = write_pool_config(dir.path(), "abc.toml", &b);
    let cba = write_pool_config(dir.path(), "cba.toml", &[b[2], b[1], b[0]]);
    let ab = write_pool_config(dir.path(), "ab.toml", &[b[0], b[1]]);
    let mut firsts = std::collections::BTreeSet::new();
    for i in 0..30 {
        let id = format!("device-{i}");
        let r = route_lines(&abc, &id);
        let mut sorted = r.clone();
        sorted.sort();
        assert_eq!(sorted, b.to_vec(), "every broker once: {r:?}");
        assert_eq!(r, route_lines(&abc, &id), "same answer twice");
        assert_eq!(r, route_lines(&cba, &id), "backend order must not matter");
        // removing broker 3 moves only its own clients, in their preference order
        let without: Vec<String> = r.iter().filter(|x| *x != b[2]).cloned().collect();
        assert_eq!(route_lines(&ab, &id), without, "{id}");
        firsts.insert(r[0].clone());
    }
    assert_eq!(firsts.len(), 3, "30 ids never reached some broker: {firsts:?}");

    // --pool picks the pool
    let two = dir.path().join("two.toml");
    fs::write(
        &two,
        r#"
[[listener]]
name = "mqtt"
bind = "127.0.0.1:0"
pool = "brokers"

[[listener]]
name = "other"
bind = "127.0.0.1:0"
pool = "second"

[pool.brokers]
backends = ["127.0.0.1:6001", "127.0.0.1:6002", "127.0.0.1:6003"]

[pool.second]
backends = ["127.0.0.1:7001", "127.0.0.1:7002"]
"#,
    )
    .unwrap();
    let r = route(&two, "device-1", Some("second"));
    let mut sorted = r.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["127.0.0.1:7001", "127.0.0.1:7002"]);
    assert_eq!(route(&two, "device-1", Some("brokers")), route_lines(&abc, "device-1"));
    let out = harbormaster(&["route", "--config", two.to_str().unwrap(), "--client-id", "x", "--pool", "no-such-pool"]);
    assert!(!out.status.success(), "{}", output_text(&out));
}
