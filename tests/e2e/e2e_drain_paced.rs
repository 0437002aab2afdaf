//! SIGTERM with 200 idle MQTT connections: not ready at once, still accepting during
//! `drain_delay`, then no new connection; the 200 are closed spread over `drain_timeout`
//! (oldest first), not all at once at its end; the process exits 0.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::mqtt::{self, MqttVersion};
use crate::support::*;

const CLIENTS: usize = 200;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(4);

/// The HTTP status of GET `path` on the admin server, if it answered.
fn status(admin: &str, path: &str) -> Option<u16> {
    try_http_get(admin, path, WAIT).ok().map(|r| r.status)
}

#[test]
fn sigterm_closes_200_idle_connections_spread_over_the_drain_window() {
    let _heavy = heavy();
    let m = Mosquitto::start();
    let limits = format!("\n[limits]\ndrain_delay = \"3s\"\ndrain_timeout = \"{}s\"\n", DRAIN_TIMEOUT.as_secs());
    let mut hm = Harbormaster::start(&(one_pool_config(0, 0, &[("m", &m)], "") + &limits));
    let (port, admin) = (hm.port("mqtt"), hm.admin_addr());

    // 200 idle clients, opened in order; each thread reports when its connection is closed.
    let (tx, rx) = mpsc::channel::<(usize, Instant)>();
    let mut threads = Vec::new();
    for i in 0..CLIENTS {
        let (mut s, ack) = mqtt_connect(port, MqttVersion::V311, &format!("idle-{i:03}"));
        assert!(mqtt::connack_accepted(&ack), "client {i}: {ack:?}");
        let tx = tx.clone();
        threads.push(thread::spawn(move || {
            let (_, closed) = mqtt::read_until_close(&mut s, CMD_TIMEOUT);
            if closed {
                let _ = tx.send((i, Instant::now()));
            }
        }));
    }
    drop(tx);
    assert!(m.wait_for_client(&format!("idle-{:03}", CLIENTS - 1), 1));

    hm.sigterm();
    // Not ready at once, while the listener still accepts for drain_delay.
    let mut seen_not_ready_accepting = false;
    wait_until(WAIT, || {
        seen_not_ready_accepting = status(&admin, "/readyz") == Some(503) && port_accepts(port);
        seen_not_ready_accepting || !port_accepts(port)
    });
    assert!(seen_not_ready_accepting, "never saw not-ready while still accepting:\n{}", hm.log());

    // Then no new connection, while the drain is still going on.
    assert!(wait_until(WAIT, || !port_accepts(port)), "still accepting after drain_delay:\n{}", hm.log());
    let closed_before_refusal = rx.try_iter().collect::<Vec<_>>();
    assert!(
        closed_before_refusal.len() < CLIENTS / 2,
        "{} connections were closed before accepting stopped",
        closed_before_refusal.len()
    );
    assert!(hm.wait_exit(Duration::ZERO).is_none(), "exited before draining");

    let mut closes: Vec<(usize, Instant)> = closed_before_refusal;
    closes.extend(rx.iter());
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(closes.len(), CLIENTS, "not every connection was closed:\n{}", hm.log());
    let status = hm.wait_exit(CMD_TIMEOUT).unwrap_or_else(|| panic!("no exit after the drain:\n{}", hm.log()));
    assert!(status.success(), "exit status {status:?}:\n{}", hm.log());

    // Spread over the window, not one burst: the first and last close are at least 40% of
    // the window apart.
    closes.sort_by_key(|(_, at)| *at);
    let (first, last) = (closes[0].1, closes[CLIENTS - 1].1);
    let spread = last - first;
    assert!(spread >= DRAIN_TIMEOUT * 2 / 5, "closes spread over {spread:?} only");
    // Not all crowded at either end: half of them are closed well before the last one.
    let mid = closes[CLIENTS / 2].1;
    assert!(last - mid >= DRAIN_TIMEOUT / 5, "second half closed within {:?}", last - mid);
    // Oldest first: the first half opened is, on average, closed before the second half.
    let rank = |range: std::ops::Range<usize>| {
        closes.iter().enumerate().filter(|(_, (i, _))| range.contains(i)).map(|(r, _)| r).sum::<usize>()
    };
    assert!(rank(0..CLIENTS / 2) < rank(CLIENTS / 2..CLIENTS), "not closed oldest first");

    let drained =
        hm.connection_logs().iter().filter(|l| l.get("close_reason").map(String::as_str) == Some("drained")).count();
    assert_eq!(drained, CLIENTS, "{}", hm.log());
}
