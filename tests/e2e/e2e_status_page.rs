//! The status page (`GET /` on the admin port) in a real browser: headless Chromium (Debian
//! `chromium`) loads it from harbormaster in front of three mosquitto brokers and runs its
//! script; the assertions read the rendered DOM (`--dump-dom`): every broker with its state and
//! a non-zero connection count, the client-id box's answer (from `/route`), the numbers
//! following clients that connect, a killed broker shown as down. A screenshot of the last state is written for docs/status-page.png.
//!
//! `--virtual-time-budget` lets the page's timers and fetches run to completion before the
//! DOM is printed, so nothing here waits on the wall clock; every retry has a bound.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

/// One headless Chromium run against `url` with `args`, in a profile of its own.
fn chromium(url: &str, args: &[&str]) -> String {
    let bin = require_program("chromium");
    let profile = tempfile::Builder::new().prefix("hm-chromium-").tempdir().unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--virtual-time-budget=8000"])
        .args(args)
        .arg(url);
    let out = run_with_timeout(&mut cmd, CMD_TIMEOUT);
    assert!(out.status.success(), "chromium {args:?} {url} failed ({:?}):\n{}", out.status, output_text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page as rendered after its script ran.
fn rendered(admin: &str) -> String {
    chromium(&format!("http://{admin}/"), &["--dump-dom"])
}

/// Every broker row of the rendered page: `pool/identity` → (state, connections now).
fn broker_rows(dom: &str) -> BTreeMap<String, (String, u64)> {
    let mut rows = BTreeMap::new();
    for part in dom.split("<tr data-broker=\"").skip(1) {
        let row = &part[..part.find("</tr>").unwrap_or(part.len())];
        let name = row[..row.find('"').unwrap()].to_string();
        let state = attr(row, "data-state").unwrap_or_default();
        let active = cell(row, "num broker-active").map(|t| t.replace(',', "").parse().unwrap()).unwrap_or(0);
        rows.insert(name, (state, active));
    }
    rows
}

fn attr(html: &str, name: &str) -> Option<String> {
    let start = html.find(&format!("{name}=\""))? + name.len() + 2;
    Some(html[start..start + html[start..].find('"')?].to_string())
}

/// The text of the first element with exactly `class`.
fn cell(html: &str, class: &str) -> Option<String> {
    let start = html.find(&format!("class=\"{class}\">"))? + class.len() + 9;
    Some(html[start..start + html[start..].find('<')?].to_string())
}

/// The header's total of connections now.
fn total_active(dom: &str) -> Option<u64> {
    let start = dom.find("id=\"total-active\">")? + 18;
    dom[start..start + dom[start..].find('<')?].replace(',', "").parse().ok()
}

/// Renders until `ok` holds for the DOM (a bounded number of browser runs).
fn rendered_until(admin: &str, what: &str, mut ok: impl FnMut(&str) -> bool) -> String {
    let mut dom = String::new();
    for _ in 0..10 {
        dom = rendered(admin);
        if ok(&dom) {
            return dom;
        }
    }
    panic!("the page never showed {what}:\n{dom}");
}

fn screenshot_path() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png")
}

#[test]
fn the_status_page_shows_every_broker_and_follows_connections_and_health() {
    let mut brokers = [Mosquitto::start(), Mosquitto::start(), Mosquitto::start()];
    let named: Vec<(&str, &Mosquitto)> = vec![("m0", &brokers[0]), ("m1", &brokers[1]), ("m2", &brokers[2])];
    let config = one_pool_config(
        0,
        0,
        &named,
        r#"health = { check = "mqtt", interval = "300ms", timeout = "300ms", rise = 1, fall = 1 }"#,
    );
    drop(named);
    let hm = Harbormaster::start(&config);
    let admin = hm.admin_addr();

    // The page and its policy as served.
    let page = http_request(&admin, "/");
    assert_eq!((page.status, page.content_type.as_str()), (200, "text/html; charset=utf-8"));

    // Two sessions held on each broker, found through the routing table.
    let mut held = Vec::new();
    for broker in ["m0", "m1", "m2"] {
        let ids: Vec<String> = (0..200)
            .map(|i| format!("page-{i}"))
            .filter(|id| hm.route(id).first().map(String::as_str) == Some(broker))
            .take(2)
            .collect();
        assert_eq!(ids.len(), 2, "client-ids for {broker}");
        for id in ids {
            let (s, ack) = mqtt_connect(hm.port("mqtt"), MqttVersion::V311, &id);
            assert_eq!(ack.get(3), Some(&0), "{id}: {ack:?}");
            held.push(s);
        }
    }

    let dom = rendered_until(&admin, "every broker up with its connections", |dom| {
        let rows = broker_rows(dom);
        ["m0", "m1", "m2"].iter().all(|b| rows.get(&format!("brokers/{b}")).is_some_and(|(s, n)| s == "up" && *n == 2))
    });
    assert_eq!(total_active(&dom), Some(6), "{dom}");
    assert!(dom.contains("data-listener=\"mqtt\""), "the listener row: {dom}");
    assert!(cell(&dom, "pill ok").is_some(), "ready shown: {dom}");

    // The client-id box, through the page's own link to an answer (/#client_id=ID).
    let dom = chromium(&format!("http://{admin}/#client_id=page-route%2F1"), &["--dump-dom"]);
    let expected = hm.route("page-route/1");
    let answer = &dom[dom.find("id=\"route-answer\"").expect("the answer box")..];
    assert!(
        answer.contains(&format!("page-route/1 → <b>{} (", expected[0])),
        "/route's answer for page-route/1 ({expected:?}) not shown:\n{dom}"
    );

    // More clients: the numbers follow.
    for i in 0..3 {
        let (s, _) = mqtt_connect(hm.port("mqtt"), MqttVersion::V311, &format!("page-more-{i}"));
        held.push(s);
    }
    rendered_until(&admin, "9 connections", |dom| {
        total_active(dom) == Some(9) && broker_rows(dom).values().map(|(_, n)| n).sum::<u64>() == 9
    });

    // A broker dies: health checks mark it down, and so does the page.
    brokers[0].stop();
    let dom = rendered_until(&admin, "m0 down", |dom| {
        let rows = broker_rows(dom);
        rows.get("brokers/m0").is_some_and(|(s, _)| s == "down")
            && rows.get("brokers/m1").is_some_and(|(s, _)| s == "up")
            && rows.get("brokers/m2").is_some_and(|(s, _)| s == "up")
    });
    assert!(dom.contains("class=\"state down\">down<"), "{dom}");

    let shot = screenshot_path();
    let _ = std::fs::remove_file(&shot);
    // With a client-id looked up, so the picture shows every part of the page.
    chromium(
        &format!("http://{admin}/#client_id=truck-0042"),
        &[&format!("--screenshot={}", shot.display()), "--window-size=1400,900"],
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", shot.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG: {}", shot.display());
    eprintln!("status page screenshot: {}", shot.display());
    drop(held);
}
