//! Several OS processes (the crate's `apiguard-redis-fleet` binary), each a
//! limiter with the builder's defaults, share one key on a real
//! redis-server while both cores are kept busy: together they stay within
//! the limit, and when Redis is paused each failure policy admits no more
//! than its documented share and every process comes back to Redis by
//! itself.
//!
//! Durations are short for CI; `APIGUARD_FLEET_RUN_MS` and
//! `APIGUARD_FLEET_PAUSE_MS` lengthen them to measure by hand.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const LIMIT: u64 = 50;
const BURST: u64 = 10;
/// Each process decides once a millisecond: 20× the whole limit.
const EVERY_US: u64 = 1000;

fn env_ms(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Spinning threads, one per core, until dropped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn both_cores() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..2)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What one process reported.
#[derive(Debug, Default)]
struct Report {
    /// (unix µs, decided_by) of every admission.
    admitted: Vec<(u64, String)>,
    /// When a decision was Redis' again after one that was not.
    returns: Vec<u64>,
    /// decided_by → (admitted, refused).
    counts: HashMap<String, (u64, u64)>,
    first: u64,
    last: u64,
    /// The health line at the end.
    health: String,
}

fn spawn(url: &str, prefix: &str, run_ms: u64, start_at: u64, extra: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_apiguard-redis-fleet"))
        .arg(format!("url={url}"))
        .arg(format!("prefix={prefix}"))
        .arg("key=shared")
        .arg(format!("limit={LIMIT}"))
        .arg(format!("burst={BURST}"))
        .arg(format!("run_ms={run_ms}"))
        .arg(format!("every_us={EVERY_US}"))
        .arg(format!("start_at_us={start_at}"))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the fleet binary runs")
}

fn collect(child: Child) -> Report {
    let out = child.wait_with_output().expect("the fleet member ends");
    assert!(
        out.status.success(),
        "a fleet member failed: {:?}",
        out.status
    );
    let mut r = Report::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let p: Vec<&str> = line.split_whitespace().collect();
        match p.as_slice() {
            ["A", t, by] => r.admitted.push((t.parse().unwrap(), (*by).to_owned())),
            ["R", t] => r.returns.push(t.parse().unwrap()),
            ["N", by, yes, no] => {
                r.counts.insert(
                    (*by).to_owned(),
                    (yes.parse().unwrap(), no.parse().unwrap()),
                );
            }
            ["SPAN", a, b] => {
                r.first = a.parse().unwrap();
                r.last = b.parse().unwrap();
            }
            ["H", ..] => r.health = line[2..].to_owned(),
            _ => panic!("unexpected line {line:?}"),
        }
    }
    r
}

/// `burst + rate × span`, span from the first decision of any process to
/// the last decision of any.
fn bound(reports: &[Report]) -> f64 {
    let first = reports.iter().map(|r| r.first).min().unwrap();
    let last = reports.iter().map(|r| r.last).max().unwrap();
    BURST as f64 + LIMIT as f64 * (last - first) as f64 / 1e6
}

/// Processes start together a moment from now, after connecting.
fn start_at() -> u64 {
    unix_us() + 1_000_000
}

fn shared_key_under_load(processes: usize) {
    let server = redis_or_skip!();
    let run_ms = env_ms("APIGUARD_FLEET_RUN_MS", 2500);
    let _load = Load::both_cores();
    let at = start_at();
    let children: Vec<Child> = (0..processes)
        .map(|_| spawn(&server.url(), "load:", run_ms, at, &[]))
        .collect();
    let reports: Vec<Report> = children.into_iter().map(collect).collect();

    let total: usize = reports.iter().map(|r| r.admitted.len()).sum();
    let by_redis: usize = reports
        .iter()
        .flat_map(|r| &r.admitted)
        .filter(|(_, by)| by == "redis")
        .count();
    let bound = bound(&reports);
    let mut decided: HashMap<&str, u64> = HashMap::new();
    for r in &reports {
        for (by, (yes, no)) in &r.counts {
            *decided.entry(by.as_str()).or_default() += yes + no;
        }
    }
    eprintln!(
        "{processes} processes, {run_ms} ms, cores busy: admitted {total} ({by_redis} by redis) \
         of burst + rate × span = {bound:.1} ({:.2}%); decisions by {decided:?}; health {:?}",
        100.0 * total as f64 / bound,
        reports
            .iter()
            .map(|r| r.health.as_str())
            .collect::<Vec<_>>()
    );
    // Tolerance: 1% of the bound. Admissions without Redis only happen
    // after Redis missed three decisions in a row over a whole timeout,
    // and then start from an empty local bucket.
    assert!(
        (total as f64) <= bound * 1.01,
        "admitted {total}, more than 1% over {bound:.1}"
    );
    // Demand is 20× the limit per process, so the limit must be used.
    assert!(
        (total as f64) >= bound * 0.9,
        "admitted {total}, under 90% of {bound:.1}"
    );
    assert!(reports.iter().all(|r| !r.admitted.is_empty()));
}

#[test]
fn two_processes_with_default_settings_stay_within_the_limit_under_load() {
    shared_key_under_load(2);
}

#[test]
fn four_processes_with_default_settings_stay_within_the_limit_under_load() {
    shared_key_under_load(4);
}

/// Two processes, both cores busy; Redis is stopped a moment after they
/// start and continued `pause` later.
fn paused(server: &common::RedisServer, policy: &str) -> (Vec<Report>, u64, u64) {
    let pause_ms = env_ms("APIGUARD_FLEET_PAUSE_MS", 1000);
    let run_ms = pause_ms + 1500;
    let _load = Load::both_cores();
    let at = start_at();
    let extra = [format!("policy={policy}")];
    let children: Vec<Child> = (0..2)
        .map(|_| spawn(&server.url(), "pause:", run_ms, at, &extra))
        .collect();
    let stop_at = at + 500_000;
    std::thread::sleep(Duration::from_micros(stop_at.saturating_sub(unix_us())));
    let stopped = unix_us();
    server.signal("STOP");
    std::thread::sleep(Duration::from_millis(pause_ms));
    let continued = unix_us();
    server.signal("CONT");
    let reports: Vec<Report> = children.into_iter().map(collect).collect();

    for (i, r) in reports.iter().enumerate() {
        let back = r.returns.iter().find(|&&t| t >= continued);
        eprintln!(
            "policy {policy}, process {i}: {:?}; back on redis {} after SIGCONT",
            r.counts,
            back.map_or("never".to_owned(), |t| format!(
                "{:.1} ms",
                (t - continued) as f64 / 1e3
            )),
        );
        // Every process comes back to Redis by itself, and stays there.
        assert!(back.is_some(), "process {i} never came back to redis");
        let last_redis = r.counts.get("redis").map_or(0, |c| c.0 + c.1);
        assert!(last_redis > 0);
    }
    (reports, stopped, continued)
}

fn admitted_without_redis(reports: &[Report]) -> Vec<(u64, String)> {
    reports
        .iter()
        .flat_map(|r| r.admitted.iter().cloned())
        .filter(|(_, by)| by != "redis")
        .collect()
}

#[test]
fn local_share_admits_at_most_the_rate_while_redis_is_paused() {
    let server = redis_or_skip!();
    let (reports, stopped, continued) = paused(&server, "local");
    let away = admitted_without_redis(&reports);
    let pause_s = (continued - stopped) as f64 / 1e6;
    // Documented share: each of n instances at most limit / n per second,
    // starting empty, so the two together at most the rate over the pause
    // (plus one token each for the time a probe takes to come back).
    let share = LIMIT as f64 * pause_s + 2.0;
    eprintln!(
        "local share: {} admitted without redis, share {share:.1}",
        away.len()
    );
    assert!(away.iter().all(|(_, by)| by == "fallback"), "{away:?}");
    assert!(away.len() as f64 <= share, "{} > {share:.1}", away.len());
    assert!(
        !away.is_empty(),
        "the local share admitted nothing while redis was away"
    );
    // Tokens admitted locally are taken from the shared bucket on return,
    // so over the whole run the fleet stays within burst + rate × span,
    // give or take 1% and one token per process.
    let total: usize = reports.iter().map(|r| r.admitted.len()).sum();
    let bound = bound(&reports);
    eprintln!("local share: {total} admitted in all, bound {bound:.1}");
    assert!(total as f64 <= bound * 1.01 + 2.0, "{total} > {bound:.1}");
}

#[test]
fn fail_closed_admits_nothing_while_redis_is_paused() {
    let server = redis_or_skip!();
    let (reports, _, continued) = paused(&server, "closed");
    let away = admitted_without_redis(&reports);
    assert!(away.is_empty(), "{away:?}");
    // The scripts queued in the stopped Redis ran after their deadlines and
    // spent nothing: the burst saved up during the pause is all there for
    // the first 100 ms back (10 tokens, plus 5 the rate adds).
    let back = reports
        .iter()
        .filter_map(|r| r.returns.iter().find(|&&t| t >= continued))
        .min()
        .copied()
        .expect("back on redis");
    let first_100ms = reports
        .iter()
        .flat_map(|r| &r.admitted)
        .filter(|(t, by)| by == "redis" && *t >= back && *t < back + 100_000)
        .count();
    eprintln!("fail closed: {first_100ms} admitted by redis in the first 100 ms back");
    assert!(first_100ms as u64 >= BURST, "{first_100ms}");
    let refused: u64 = reports
        .iter()
        .map(|r| r.counts.get("closed").map_or(0, |c| c.1))
        .sum();
    assert!(refused > 0, "nothing was refused for want of redis");
}

#[test]
fn admit_all_admits_everything_while_redis_is_paused() {
    let server = redis_or_skip!();
    let (reports, stopped, continued) = paused(&server, "open");
    // Its documented share is everything: no decision while away is refused.
    let refused_open: u64 = reports
        .iter()
        .map(|r| r.counts.get("open").map_or(0, |c| c.1))
        .sum();
    assert_eq!(refused_open, 0);
    let during = admitted_without_redis(&reports)
        .into_iter()
        .filter(|(t, _)| *t >= stopped && *t <= continued)
        .count();
    eprintln!("admit all: {during} admitted without redis during the pause");
    assert!(during > 0);
}
