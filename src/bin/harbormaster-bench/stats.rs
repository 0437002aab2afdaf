//! Counters shared by a mode's tasks, latency samples and their percentiles, failures by kind,
//! the process's own CPU time (to tell when the generator itself is the bottleneck), and the
//! progress line.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Latency samples are kept up to this many (a bound on memory); later ones are counted only.
const MAX_SAMPLES: usize = 5_000_000;

#[derive(Default)]
pub struct Latencies {
    nanos: Mutex<Vec<u64>>,
}

impl Latencies {
    pub fn record(&self, d: Duration) {
        let mut v = self.nanos.lock().unwrap();
        if v.len() < MAX_SAMPLES {
            v.push(d.as_nanos() as u64);
        }
    }

    /// Count, mean and percentiles in microseconds, and `cdf_points` points of the CDF.
    pub fn summary(&self, cdf_points: usize) -> Value {
        let mut v = self.nanos.lock().unwrap().clone();
        if v.is_empty() {
            return json!({ "count": 0 });
        }
        v.sort_unstable();
        let n = v.len();
        let us = |x: u64| (x as f64 / 1000.0 * 10.0).round() / 10.0;
        let at = |q: f64| us(v[((q * n as f64).ceil() as usize).clamp(1, n) - 1]);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64 / 1000.0;
        let mut cdf = Vec::new();
        if cdf_points > 0 {
            for i in 1..=cdf_points {
                let q = i as f64 / cdf_points as f64;
                cdf.push(json!([at(q), q]));
            }
        }
        json!({
            "count": n,
            "min_us": us(v[0]),
            "mean_us": (mean * 10.0).round() / 10.0,
            "p50_us": at(0.50),
            "p90_us": at(0.90),
            "p99_us": at(0.99),
            "p999_us": at(0.999),
            "max_us": us(v[n - 1]),
            "cdf": cdf,
        })
    }
}

/// Failures by kind.
#[derive(Default)]
pub struct Failures {
    by_kind: Mutex<BTreeMap<&'static str, u64>>,
    total: AtomicU64,
}

impl Failures {
    pub fn add(&self, kind: &'static str) {
        *self.by_kind.lock().unwrap().entry(kind).or_default() += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
    }
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
    pub fn to_json(&self) -> Value {
        json!(self.by_kind.lock().unwrap().clone())
    }
}

/// A plain counter.
#[derive(Default)]
pub struct Count(AtomicU64);

impl Count {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// This process's CPU seconds (user + system) from /proc/self/stat.
pub fn self_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may contain spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line; 12 and 13 after the name.
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    // USER_HZ is 100 on every Linux architecture we run on.
    100.0
}

/// Wall clock and CPU of a measured phase: the generator's own utilisation.
pub struct Phase {
    start: Instant,
    cpu: f64,
}

impl Phase {
    pub fn start() -> Phase {
        Phase { start: Instant::now(), cpu: self_cpu_seconds() }
    }
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
    /// Fraction of one core this process used since the start.
    pub fn cpu_utilisation(&self) -> f64 {
        let wall = self.start.elapsed().as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        ((self_cpu_seconds() - self.cpu) / wall * 100.0).round() / 100.0
    }
}

/// Whether to print a progress line: asked for, or stderr is a terminal.
pub fn progress_wanted(flag: bool) -> bool {
    flag || std::io::stderr().is_terminal()
}

/// Print one progress line (overwritten in place on a terminal).
pub fn progress(line: &str) {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K{line}");
    } else {
        eprintln!("{line}");
    }
}

/// End a progress line on a terminal.
pub fn progress_done() {
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_1_to_1000() {
        let l = Latencies::default();
        for i in 1..=1000u64 {
            l.record(Duration::from_micros(i));
        }
        let s = l.summary(4);
        assert_eq!(s["count"], 1000);
        assert_eq!(s["p50_us"], 500.0);
        assert_eq!(s["p99_us"], 990.0);
        assert_eq!(s["p999_us"], 999.0);
        assert_eq!(s["max_us"], 1000.0);
        assert_eq!(s["cdf"].as_array().unwrap().len(), 4);
    }

    #[test]
    fn own_cpu_is_readable() {
        assert!(self_cpu_seconds() >= 0.0);
    }
}
