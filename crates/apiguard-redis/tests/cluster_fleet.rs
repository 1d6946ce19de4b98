//! Several OS processes (the crate's `apiguard-redis-fleet` binary) share
//! keys spread over the three masters of a real Redis Cluster: each key
//! admits within 1% of `burst + rate × span` and never more; when a master
//! is killed (SIGKILL) mid-run, its keys stay within the documented bound,
//! the other keys within 1%, no process restarts, and the killed master's
//! keys come back to Redis by themselves after its replica's promotion.
//!
//! `APIGUARD_CLUSTER_RUN_MS` lengthens the runs to measure by hand.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::cluster::{RedisCluster, unix_us};

const LIMIT: u64 = 100;
const BURST: u64 = 10;
const PROCESSES: usize = 3;
/// Each process decides once a millisecond, in turn over the keys: with
/// six keys, each key sees 5× its rate from the three processes.
const EVERY_US: u64 = 1000;

fn run_ms(default: u64) -> u64 {
    std::env::var("APIGUARD_CLUSTER_RUN_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Two key names per master.
fn keys(c: &RedisCluster) -> HashMap<u16, Vec<String>> {
    let mut out: HashMap<u16, Vec<String>> = HashMap::new();
    let masters = c.master_ports();
    for i in 0.. {
        let name = format!("k{i}");
        let v = out.entry(c.master_of(&name)).or_default();
        if v.len() < 2 {
            v.push(name);
        }
        if masters
            .iter()
            .all(|m| out.get(m).is_some_and(|v| v.len() == 2))
        {
            return out;
        }
    }
    unreachable!()
}

#[derive(Debug, Default)]
struct Report {
    /// key → (unix µs, decided_by) of every admission.
    admitted: HashMap<String, Vec<(u64, String)>>,
    /// key → when a decision was Redis' again after one that was not.
    returns: HashMap<String, Vec<u64>>,
    counts: HashMap<String, (u64, u64)>,
    first: u64,
    last: u64,
}

fn spawn(
    c: &RedisCluster,
    prefix: &str,
    keys: &[String],
    run_ms: u64,
    at: u64,
    extra: &[&str],
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_apiguard-redis-fleet"))
        .arg(format!("cluster={}", c.seeds().join(",")))
        .arg(format!("keys={}", keys.join(",")))
        .arg(format!("prefix={prefix}"))
        .arg(format!("limit={LIMIT}"))
        .arg(format!("burst={BURST}"))
        .arg(format!("run_ms={run_ms}"))
        .arg(format!("every_us={EVERY_US}"))
        .arg(format!("start_at_us={at}"))
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
            ["A", t, by, k] => r
                .admitted
                .entry((*k).to_owned())
                .or_default()
                .push((t.parse().unwrap(), (*by).to_owned())),
            ["R", t, k] => r
                .returns
                .entry((*k).to_owned())
                .or_default()
                .push(t.parse().unwrap()),
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
            ["H", ..] => {}
            _ => panic!("unexpected line {line:?}"),
        }
    }
    r
}

/// `burst + rate × span`, from the first decision of any process to the
/// last of any.
fn bound(reports: &[Report]) -> f64 {
    let first = reports.iter().map(|r| r.first).min().unwrap();
    let last = reports.iter().map(|r| r.last).max().unwrap();
    BURST as f64 + LIMIT as f64 * (last - first) as f64 / 1e6
}

fn admitted(reports: &[Report], key: &str) -> Vec<(u64, String)> {
    reports
        .iter()
        .flat_map(|r| r.admitted.get(key).into_iter().flatten().cloned())
        .collect()
}

fn run(
    c: &RedisCluster,
    prefix: &str,
    run_ms: u64,
    extra: &[&str],
) -> (Vec<String>, u64, Vec<Child>) {
    let keys: Vec<String> = {
        let mut k: Vec<String> = keys(c).into_values().flatten().collect();
        k.sort();
        k
    };
    let at = unix_us() + 1_500_000;
    let children = (0..PROCESSES)
        .map(|_| spawn(c, prefix, &keys, run_ms, at, extra))
        .collect();
    (keys, at, children)
}

#[test]
fn processes_sharing_keys_over_three_masters_admit_within_one_percent() {
    let c = cluster_or_skip!();
    let (keys, _, children) = run(&c, "steady:", run_ms(4000), &[]);
    let reports: Vec<Report> = children.into_iter().map(collect).collect();
    let bound = bound(&reports);
    let mut ratios = Vec::new();
    for k in &keys {
        let a = admitted(&reports, k);
        assert!(a.iter().all(|(_, by)| by == "redis"), "{k}: {a:?}");
        let n = a.len() as f64;
        ratios.push(format!(
            "{k} (master {}): {:.2}%",
            c.master_of(k),
            100.0 * n / bound
        ));
        assert!(n <= bound, "{k}: admitted {n}, over {bound:.1}");
        assert!(
            n >= bound * 0.99,
            "{k}: admitted {n}, under 99% of {bound:.1}"
        );
    }
    eprintln!(
        "{PROCESSES} processes, {} keys, bound {bound:.1} per key: {ratios:?}",
        keys.len()
    );
}

/// The documented bound for a key whose master fails over, with the
/// default policy (the local share): replication is asynchronous, so the
/// promoted replica may lack the last writes and grant up to one burst
/// again; tokens admitted by the local share are debited from the shared
/// bucket when Redis decides again.
fn failover(policy: &str) {
    let mut c = cluster_or_skip!();
    let run = run_ms(6000);
    let (keys, at, children) = run_with_policy(&c, policy, run);
    let by_master = keys_by_master(&c, &keys);
    let victim = *by_master.keys().min().unwrap();
    let slot = c.keyslot(&by_master[&victim][0]);
    std::thread::sleep(Duration::from_micros(
        (at + 1_500_000).saturating_sub(unix_us()),
    ));
    let killed = unix_us();
    c.kill(victim);
    let (promoted, _) = c.wait_promoted(slot, victim, Duration::from_secs(15));
    let reports: Vec<Report> = children.into_iter().map(collect).collect();
    let bound = bound(&reports);

    let mut lines = Vec::new();
    for k in &keys {
        let a = admitted(&reports, k);
        let n = a.len() as f64;
        let policy_admitted = a.iter().filter(|(_, by)| by != "redis").count();
        if by_master[&victim].contains(k) {
            // Back on Redis in every process, after the kill.
            let backs: Vec<u64> = reports
                .iter()
                .map(|r| {
                    *r.returns
                        .get(k)
                        .and_then(|v| v.iter().find(|&&t| t > killed))
                        .unwrap_or_else(|| panic!("{k}: a process never came back to redis"))
                })
                .collect();
            let back = *backs.iter().max().unwrap();
            lines.push(format!(
                "{k} (killed master): {:.2}% of the bound, {policy_admitted} by the policy; \
                 back on redis {:.0} ms after the kill, {:+.0} ms after the promotion was seen ({:.0} ms)",
                100.0 * n / bound,
                (back - killed) as f64 / 1e3,
                (back as f64 - promoted as f64) / 1e3,
                (promoted - killed) as f64 / 1e3,
            ));
            match policy {
                "closed" => assert_eq!(
                    policy_admitted, 0,
                    "{k}: fail closed admitted without redis"
                ),
                _ => assert!(
                    n <= bound + BURST as f64,
                    "{k}: admitted {n}, over the documented {:.1}",
                    bound + BURST as f64
                ),
            }
            assert!(n <= bound + BURST as f64);
        } else {
            lines.push(format!("{k}: {:.2}%", 100.0 * n / bound));
            assert!(n <= bound, "{k}: admitted {n}, over {bound:.1}");
            assert!(
                n >= bound * 0.99,
                "{k}: admitted {n}, under 99% of {bound:.1}"
            );
        }
    }
    eprintln!(
        "policy {policy}, bound {bound:.1} per key:\n  {}",
        lines.join("\n  ")
    );
}

fn run_with_policy(c: &RedisCluster, policy: &str, run_ms: u64) -> (Vec<String>, u64, Vec<Child>) {
    let arg = format!("policy={policy}");
    run(
        c,
        &format!("failover-{policy}:"),
        run_ms,
        &[arg.as_str(), "instances=3"],
    )
}

fn keys_by_master(c: &RedisCluster, keys: &[String]) -> HashMap<u16, Vec<String>> {
    let mut out: HashMap<u16, Vec<String>> = HashMap::new();
    for k in keys {
        out.entry(c.master_of(k)).or_default().push(k.clone());
    }
    out
}

#[test]
fn a_killed_master_costs_at_most_the_local_share_and_one_burst_and_nobody_restarts() {
    failover("local");
}

#[test]
fn a_killed_master_under_fail_closed_admits_nothing_without_redis() {
    failover("closed");
}
