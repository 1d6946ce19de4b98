//! How much a breaker recovery loses: the scenario of issue 13.
//!
//! A chaos upstream of our own (real TCP on loopback) fails for `--outage`
//! seconds in the middle of a `--seconds` run while a `GuardedClient`
//! offers `--rate` requests a second (`max_retries(3)`,
//! `failure_threshold(5)`, `recovery_timeout(1s)`, `attempt_timeout(500ms)`,
//! `total_timeout(5s)`, no rate limit). Every request issued during the
//! outage has a deadline that ends after the upstream is back, so every one
//! of them could succeed.
//!
//! ```text
//! cargo run --release --example recovery -- --mode 503 --mode reset --mode hang --naive
//! ```
//!
//! For each outage mode it prints one line: requests lost (not `200`) of
//! those offered, the upstream calls made during the outage, and the most
//! upstream calls in any 100 ms window from the end of the outage on (the
//! offered rate is `rate / 10` per 100 ms). `--naive` adds, for each mode,
//! a plain retry loop with the same timeouts (4 attempts of at most 500 ms
//! each within 5 s, exponential backoff from 100 ms) and no breaker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use apiguard::GuardedClient;
use apiguard::breaker::CircuitBreaker;
use apiguard_suite::{Behavior, Upstream};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

/// Measures what a breaker recovery loses against a chaos upstream.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// What the upstream does during the outage (repeat for several runs).
    #[arg(long, value_enum, default_values_t = [Mode::S503, Mode::Reset, Mode::Hang])]
    mode: Vec<Mode>,
    /// Length of the run, in seconds.
    #[arg(long, default_value_t = 12.0)]
    seconds: f64,
    /// Length of the outage (centred in the run), in seconds.
    #[arg(long, default_value_t = 3.0)]
    outage: f64,
    /// Requests offered per second, evenly spaced.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Also run a plain retry loop with the same timeouts, no breaker.
    #[arg(long)]
    naive: bool,
    /// Also print the upstream calls per 10 ms from the outage's end on.
    #[arg(long)]
    timeline: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// `503` with no `Retry-After`.
    #[value(name = "503")]
    S503,
    /// The connection is reset (RST) without an answer.
    Reset,
    /// The request is never answered.
    Hang,
}

impl Mode {
    fn behavior(self) -> Behavior {
        match self {
            Mode::S503 => Behavior::Status(503),
            Mode::Reset => Behavior::Reset,
            Mode::Hang => Behavior::Hang,
        }
    }
}

/// What one run saw.
struct Outcome {
    offered: u64,
    lost: u64,
    during: usize,
    worst_after: usize,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    println!(
        "# {} s run, {} s outage, {} req/s offered ({} per 100 ms)",
        args.seconds,
        args.outage,
        args.rate,
        f64::from(args.rate) / 10.0
    );
    println!("client   mode   lost/offered  outage_calls  worst_100ms_after_recovery");
    for &mode in &args.mode {
        let o = run(&args, mode, false).await;
        print(&o, "guarded", mode);
        if args.naive {
            let o = run(&args, mode, true).await;
            print(&o, "naive", mode);
        }
    }
}

fn print(o: &Outcome, client: &str, mode: Mode) {
    let mode = match mode {
        Mode::S503 => "503",
        Mode::Reset => "reset",
        Mode::Hang => "hang",
    };
    println!(
        "{client:<8} {mode:<6} {:>4}/{:<8} {:>12}  {:>26}",
        o.lost, o.offered, o.during, o.worst_after
    );
}

async fn run(args: &Args, mode: Mode, naive: bool) -> Outcome {
    let up = Upstream::start(Behavior::Ok)
        .await
        .expect("bind the upstream");
    let run = Duration::from_secs_f64(args.seconds);
    let outage = Duration::from_secs_f64(args.outage);
    let outage_start = (run - outage) / 2;
    let outage_end = outage_start + outage;
    let started = Instant::now();
    let timeline = args.timeline;
    let guarded = GuardedClient::builder()
        .base_url(up.url())
        .max_retries(3)
        .circuit_breaker(
            CircuitBreaker::builder()
                .failure_threshold(5)
                .recovery_timeout(Duration::from_secs(1))
                .on_transition(move |t| {
                    if timeline {
                        println!(
                            "# {:>6.3} s {:?} -> {:?} ({:?})",
                            started.elapsed().as_secs_f64(),
                            t.from,
                            t.to,
                            t.reason
                        );
                    }
                }),
        )
        .attempt_timeout(Duration::from_millis(500))
        .total_timeout(Duration::from_secs(5))
        .build()
        .expect("a valid client");
    let plain: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let lost = Arc::new(AtomicU64::new(0));
    let chaos = {
        let up = up.clone();
        let behavior = mode.behavior();
        tokio::spawn(async move {
            tokio::time::sleep_until(started + outage_start).await;
            up.set(behavior);
            tokio::time::sleep_until(started + outage_end).await;
            up.set(Behavior::Ok);
        })
    };
    let offered = (args.seconds * f64::from(args.rate)).round() as u64;
    let spacing = Duration::from_secs(1) / args.rate;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..offered {
        tokio::time::sleep_until(started + spacing * u32::try_from(i).unwrap_or(u32::MAX)).await;
        let lost = lost.clone();
        if naive {
            let plain = plain.clone();
            let url = format!("{}/", up.url());
            tasks.spawn(async move {
                if !naive_get(&plain, &url).await {
                    lost.fetch_add(1, Ordering::Relaxed);
                }
            });
        } else {
            let c = guarded.clone();
            tasks.spawn(async move {
                match c.get("/").await {
                    Ok(res) if res.status() == 200 => {}
                    _ => {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    let _ = chaos.await;
    let arrivals = up.stats().arrivals();
    let during = arrivals
        .iter()
        .filter(|t| **t >= outage_start && **t < outage_end)
        .count();
    let window = Duration::from_millis(100);
    if args.timeline {
        let buckets: Vec<usize> = (0..150)
            .map(|i| {
                let from = outage_end + window / 10 * i;
                arrivals
                    .iter()
                    .filter(|t| **t >= from && **t < from + window / 10)
                    .count()
            })
            .collect();
        println!("# calls per 10 ms from the outage's end: {buckets:?}");
    }
    let worst_after = arrivals
        .iter()
        .filter(|t| **t >= outage_end)
        .map(|t| {
            arrivals
                .iter()
                .filter(|u| **u >= *t && **u < *t + window)
                .count()
        })
        .max()
        .unwrap_or(0);
    Outcome {
        offered,
        lost: lost.load(Ordering::Relaxed),
        during,
        worst_after,
    }
}

/// A plain retry loop: 4 attempts of at most 500 ms, backoff 100 ms · 2ⁿ,
/// all within 5 s. Whether it got a `200`.
async fn naive_get(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: &str,
) -> bool {
    let attempts = async {
        for attempt in 0..4u32 {
            let req = http::Request::get(url)
                .body(Empty::new())
                .expect("a valid request");
            if let Ok(Ok(res)) =
                tokio::time::timeout(Duration::from_millis(500), client.request(req)).await
                && res.status() == 200
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100) * 2u32.pow(attempt)).await;
        }
        false
    };
    tokio::time::timeout(Duration::from_secs(5), attempts)
        .await
        .unwrap_or(false)
}
