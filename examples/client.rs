//! `GuardedClient` against a URL given on the command line.
//!
//! ```text
//! cargo run --example client -- http://127.0.0.1:8080/health --requests 20
//! ```
//!
//! Sends the requests at once through a client that waits for tokens,
//! retries with backoff (honouring `Retry-After`) and trips a per-host
//! circuit breaker, then prints each outcome and the client's counters.

use std::time::Duration;

use apiguard::GuardedClient;
use clap::Parser;
use http_body_util::BodyExt;

/// GuardedClient against a URL: rate limited, retried, circuit broken.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The URL to GET.
    url: String,
    /// How many requests to send (all at once).
    #[arg(long, default_value_t = 10)]
    requests: usize,
    /// Requests allowed at once, per host.
    #[arg(long, default_value_t = 5)]
    burst: u32,
    /// Requests per second after the burst, per host.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// Retries after the first attempt.
    #[arg(long, default_value_t = 3)]
    retries: u32,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args = Args::parse();
    let client = GuardedClient::builder()
        .rate_limit(apiguard::Quota::from_rate(args.burst, args.rate))
        .max_retries(args.retries)
        .failure_threshold(5)
        .recovery_timeout(Duration::from_secs(5))
        .attempt_timeout(Duration::from_secs(5))
        .total_timeout(Duration::from_secs(30))
        .build()?;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..args.requests {
        let (client, url) = (client.clone(), args.url.clone());
        set.spawn(async move {
            let outcome = match client.get(&url).await {
                Ok(res) => {
                    let status = res.status();
                    let len = res.into_body().collect().await.map(|b| b.to_bytes().len());
                    format!("{status} ({} bytes)", len.unwrap_or(0))
                }
                Err(e) => format!("error: {:?}: {e}", e.kind()),
            };
            (i, outcome)
        });
    }
    let mut outcomes = Vec::new();
    while let Some(r) = set.join_next().await {
        outcomes.push(r?);
    }
    outcomes.sort();
    for (i, outcome) in outcomes {
        println!("request {i:>3}: {outcome}");
    }
    let s = client.stats();
    println!(
        "\n{} requests, {} failed, {} attempts ({} retries), {:.2} s spent waiting",
        s.requests,
        s.failed,
        s.attempts,
        s.retries,
        s.waiting().as_secs_f64()
    );
    Ok(())
}
