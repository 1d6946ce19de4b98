//! Decisions per second of `RedisLimiter` from 1, 4 and 8 client processes
//! over 10 000 keys, against one redis-server and against a Redis Cluster
//! of three masters (and three replicas), with leases off and on; printed
//! as decisions per second and as ratios cluster / single node.
//!
//! Each client is this bench re-run as a child process
//! (`APIGUARD_CLUSTER_BENCH_CHILD`): a current-thread runtime keeping
//! [`IN_FLIGHT`] decisions in flight on keys drawn at random from the
//! 10 000, for [`RUN`]. All clients of a case start together; the case's
//! figure is the sum of their decisions over the time they ran.
//!
//! The servers run on the same machine as the clients, so on a machine of
//! few cores the cluster's three masters share the cores with the clients
//! and with each other: the ratios say what the cluster costs per
//! decision here, not how a cluster on its own hosts scales.
//!
//! Needs `redis-server` and `redis-cli`. Run:
//! `cargo bench -p apiguard-benches --bench redis_cluster`; the figures
//! are also written to `target/apiguard-bench/redis_cluster.json`.

#[allow(unused_macros, unused_imports)]
#[path = "../crates/apiguard-redis/tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apiguard_redis::{Quota, RedisLimiter};

const KEYS: u64 = 10_000;
const IN_FLIGHT: usize = 32;
const RUN: Duration = Duration::from_secs(2);
const PROCESSES: [usize; 3] = [1, 4, 8];
const CHILD: &str = "APIGUARD_CLUSTER_BENCH_CHILD";

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// One client: `target` is `single=<url>` or `cluster=<seed,seed,…>`.
fn child(spec: &str) {
    let mut target = "";
    let mut lease = false;
    let mut start_at = 0u64;
    let mut seed = 1u64;
    for part in spec.split(' ') {
        match part.split_once('=') {
            Some(("target", v)) => target = v,
            Some(("lease", v)) => lease = v == "on",
            Some(("start_at", v)) => start_at = v.parse().unwrap(),
            Some(("seed", v)) => seed = v.parse().unwrap(),
            _ => {}
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // A limit no key reaches: every decision is a full round trip (or
        // a lease), none a refusal.
        let mut b =
            RedisLimiter::builder(Quota::per_second(100_000).with_burst(1_000)).prefix("bench:");
        if lease {
            b = b.lease(50, Duration::from_secs(1));
        }
        let limiter = match target.split_once('=') {
            Some(("single", url)) => b.connect(url).await.unwrap(),
            Some(("cluster", seeds)) => {
                let seeds: Vec<&str> = seeds.split(',').collect();
                b.connect_cluster(&seeds).await.unwrap()
            }
            _ => panic!("bad target {target:?}"),
        };
        let now = unix_us();
        if start_at > now {
            tokio::time::sleep(Duration::from_micros(start_at - now)).await;
        }
        let first = unix_us();
        let end = first + RUN.as_micros() as u64;
        let tasks: Vec<_> = (0..IN_FLIGHT)
            .map(|t| {
                let limiter = limiter.clone();
                let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ t as u64 | 1;
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while unix_us() < end {
                        // xorshift: a key drawn at random from the 10 000.
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let d = limiter.decide(&(x % KEYS), 1, Duration::ZERO).await;
                        n += u64::from(d.allowed);
                    }
                    n
                })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        let last = unix_us();
        println!("DONE {total} {first} {last}");
    });
}

fn case(target: &str, lease: bool, processes: usize) -> f64 {
    let exe = std::env::current_exe().unwrap();
    let start_at = unix_us() + 1_000_000;
    let children: Vec<_> = (0..processes)
        .map(|i| {
            Command::new(&exe)
                .env(
                    CHILD,
                    format!(
                        "target={target} lease={} start_at={start_at} seed={}",
                        if lease { "on" } else { "off" },
                        i + 1
                    ),
                )
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let (mut total, mut first, mut last) = (0u64, u64::MAX, 0u64);
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.starts_with("DONE ")).unwrap();
        let p: Vec<u64> = line[5..].split(' ').map(|v| v.parse().unwrap()).collect();
        total += p[0];
        first = first.min(p[1]);
        last = last.max(p[2]);
    }
    total as f64 / ((last - first) as f64 / 1e6)
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD) {
        child(&spec);
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some(single) = common::RedisServer::start() else {
        return;
    };
    let Some(cluster) = common::cluster::RedisCluster::start() else {
        return;
    };
    let targets = [
        ("single", format!("single={}", single.url())),
        ("cluster", format!("cluster={}", cluster.seeds().join(","))),
    ];
    let mut json = String::from("[");
    println!(
        "redis_cluster: decisions/s over {KEYS} keys, {IN_FLIGHT} in flight per process, {RUN:?} per case"
    );
    println!("| leases | processes | single node | cluster (3 masters) | cluster / single |");
    println!("|---|---|---|---|---|");
    for lease in [false, true] {
        for p in PROCESSES {
            let s = case(&targets[0].1, lease, p);
            let c = case(&targets[1].1, lease, p);
            let on = if lease { "on" } else { "off" };
            println!("| {on} | {p} | {s:.0} | {c:.0} | {:.2} |", c / s);
            let _ = write!(
                json,
                "{}{{\"leases\":\"{on}\",\"processes\":{p},\"single\":{s:.0},\"cluster\":{c:.0},\"ratio\":{:.3}}}",
                if json.len() > 1 { "," } else { "" },
                c / s
            );
        }
    }
    json.push(']');
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/apiguard-bench");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("redis_cluster.json"), json);
    }
}
