//! One member of a fleet sharing a Redis limit, for the multi-process tests
//! (`tests/fleet.rs`) and for measuring by hand.
//!
//! ```text
//! apiguard-redis-fleet url=redis://127.0.0.1:6379/ key=k limit=50 burst=10 \
//!     run_ms=5000 every_us=1000 start_at_us=<unix µs> [policy=local|closed|open] \
//!     [instances=N] [prefix=p]
//! apiguard-redis-fleet cluster=redis://127.0.0.1:7000/,redis://127.0.0.1:7001/ \
//!     keys=a,b,c ...
//! ```
//!
//! `cluster=` (comma-separated seed nodes) connects to a Redis Cluster
//! instead of `url=`; `keys=` (comma-separated) decides for several keys in
//! turn, one per tick, and then adds the key to the `A` and `R` lines.
//!
//! Connects with the builder's defaults (only what is given above is set),
//! waits until `start_at_us` (wall clock, so several processes start
//! together), then decides once every `every_us` for `run_ms`, one decision
//! at a time. It prints, one per line:
//!
//! - `A <unix µs> <decided_by>` for every admission;
//! - `R <unix µs>` when a decision is Redis' again after one that was not;
//! - `N <label> <admitted> <refused>` per `decided_by` at the end;
//! - `SPAN <first µs> <last µs>`: when the first decision started and the
//!   last one ended;
//! - `H timeout_us=… rtt_us=… instances=…`: its [`RedisLimiter::health`]
//!   at the end.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apiguard_redis::{DecidedBy, FailurePolicy, Quota, RedisLimiter};

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

struct Args {
    url: String,
    cluster: Vec<String>,
    keys: Vec<String>,
    key: String,
    limit: u64,
    burst: u64,
    run: Duration,
    every: Duration,
    start_at_us: u64,
    policy: Option<FailurePolicy>,
    instances: Option<u32>,
    prefix: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        url: String::new(),
        cluster: Vec::new(),
        keys: Vec::new(),
        key: "fleet".into(),
        limit: 50,
        burst: 10,
        run: Duration::from_secs(5),
        every: Duration::from_millis(1),
        start_at_us: 0,
        policy: None,
        instances: None,
        prefix: None,
    };
    for arg in std::env::args().skip(1) {
        let (k, v) = arg
            .split_once('=')
            .ok_or_else(|| format!("expected key=value, got {arg:?}"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{k}: {e}"));
        match k {
            "url" => a.url = v.into(),
            "cluster" => a.cluster = v.split(',').map(str::to_owned).collect(),
            "keys" => a.keys = v.split(',').map(str::to_owned).collect(),
            "key" => a.key = v.into(),
            "limit" => a.limit = num(v)?,
            "burst" => a.burst = num(v)?,
            "run_ms" => a.run = Duration::from_millis(num(v)?),
            "every_us" => a.every = Duration::from_micros(num(v)?),
            "start_at_us" => a.start_at_us = num(v)?,
            "instances" => a.instances = Some(num(v)? as u32),
            "prefix" => a.prefix = Some(v.into()),
            "policy" => {
                a.policy = Some(match v {
                    "local" => FailurePolicy::local_share(),
                    "closed" => FailurePolicy::fail_closed(),
                    "open" => FailurePolicy::admit_all(),
                    _ => return Err(format!("unknown policy {v:?}")),
                })
            }
            _ => return Err(format!("unknown argument {k:?}")),
        }
    }
    if a.url.is_empty() && a.cluster.is_empty() {
        return Err("url= or cluster= is required".into());
    }
    Ok(a)
}

async fn run(a: Args) -> Result<String, String> {
    let mut b = RedisLimiter::builder(Quota::per_second(a.limit).with_burst(a.burst));
    if let Some(p) = a.policy {
        b = b.on_redis_failure(p);
    }
    if let Some(n) = a.instances {
        b = b.instances(n);
    }
    if let Some(p) = a.prefix {
        b = b.prefix(p);
    }
    let l = if a.cluster.is_empty() {
        b.connect(&a.url).await
    } else {
        b.connect_cluster(&a.cluster).await
    }
    .map_err(|e| e.to_string())?;
    let multi = !a.keys.is_empty();
    let keys = if multi {
        a.keys.clone()
    } else {
        vec![a.key.clone()]
    };

    let now = unix_us();
    if a.start_at_us > now {
        tokio::time::sleep(Duration::from_micros(a.start_at_us - now)).await;
    }
    let mut out = String::new();
    let mut counts: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
    let mut tick = tokio::time::interval(a.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let first = unix_us();
    let end = first + a.run.as_micros() as u64;
    let mut last = first;
    let mut was_redis = vec![true; keys.len()];
    let mut turn = 0;
    while last < end {
        tick.tick().await;
        let k = turn % keys.len();
        turn += 1;
        let d = l.decide(keys[k].as_str(), 1, Duration::ZERO).await;
        last = unix_us();
        let label = d.decided_by.label();
        let c = counts.entry(label).or_default();
        let key = if multi { keys[k].as_str() } else { "" };
        let sep = if multi { " " } else { "" };
        if d.allowed {
            c.0 += 1;
            let _ = writeln!(out, "A {last} {label}{sep}{key}");
        } else {
            c.1 += 1;
        }
        let is_redis = d.decided_by == DecidedBy::Redis;
        if is_redis && !was_redis[k] {
            let _ = writeln!(out, "R {last}{sep}{key}");
        }
        was_redis[k] = is_redis;
    }
    for (label, (yes, no)) in counts {
        let _ = writeln!(out, "N {label} {yes} {no}");
    }
    let _ = writeln!(out, "SPAN {first} {last}");
    let h = l.health();
    let _ = writeln!(
        out,
        "H timeout_us={} rtt_us={} instances={}",
        h.timeout.as_micros(),
        h.rtt.map_or(0, |d| d.as_micros()),
        h.instances.unwrap_or(0)
    );
    Ok(out)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("apiguard-redis-fleet: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("apiguard-redis-fleet: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("apiguard-redis-fleet: {e}");
            ExitCode::FAILURE
        }
    }
}
