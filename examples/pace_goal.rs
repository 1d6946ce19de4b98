//! Issue 12's goal, measured: a real nginx `limit_req` (20 r/s, burst 5,
//! `nodelay`, `429` without `Retry-After`), 16 tasks sending 600 GETs
//! through `GuardedClient`, with the client's limit set 50% too high
//! (`rate_limit(5, 30.0)`) and with no client limit at all.
//!
//! ```text
//! cargo run --release --example pace_goal              # adaptive (default)
//! cargo run --release --example pace_goal -- --fixed   # adaptive(false), for comparison
//! ```
//!
//! Prints, per case: requests lost, the 429s nginx sent (from its access
//! log) as a share of requests, successful requests per second against
//! the 20/s nginx allows, and the p50/p99 latency of successful requests.

use std::time::Duration;

use apiguard::GuardedClient;
use apiguard_suite::nginx::{LimitReq, Nginx, load};

const TASKS: usize = 16;
const REQUESTS: usize = 600;
const LIMIT: LimitReq = LimitReq { rate: 20, burst: 5 };

#[tokio::main]
async fn main() {
    // `RUST_LOG=apiguard::pace=debug` shows every change of the pace.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let adaptive = !std::env::args().any(|a| a == "--fixed");
    println!(
        "nginx limit_req {} r/s burst {} nodelay; {TASKS} tasks, {REQUESTS} GETs; adaptive({adaptive})",
        LIMIT.rate, LIMIT.burst
    );
    println!(
        "{:<22} {:>5} {:>6} {:>8} {:>8} {:>9} {:>9} {:>9}",
        "client limit", "lost", "429s", "429 %", "ok/s", "of 20/s", "p50", "p99"
    );
    let only_none = std::env::args().any(|a| a == "--none");
    for (name, limit) in [("rate_limit(5, 30.0)", Some((5, 30.0))), ("none", None)] {
        if only_none && limit.is_some() {
            continue;
        }
        let Some(nginx) = Nginx::start(LIMIT) else {
            return;
        };
        let mut b = GuardedClient::builder()
            .base_url(nginx.url())
            .adaptive(adaptive);
        if let Some((c, r)) = limit {
            b = b.rate_limit(apiguard::Quota::from_rate(c, r));
        }
        let client = b.build().expect("valid client");
        let run = load(&client, TASKS, REQUESTS).await;
        // Let nginx write its last log lines.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, refused) = nginx.statuses();
        println!(
            "{:<22} {:>5} {:>6} {:>7.1}% {:>8.2} {:>8.1}% {:>9.1?} {:>9.1?}",
            name,
            run.lost,
            refused,
            100.0 * refused as f64 / REQUESTS as f64,
            run.ok_per_sec(),
            100.0 * run.ok_per_sec() / f64::from(LIMIT.rate),
            run.latency(0.5),
            run.latency(0.99),
        );
    }
}
