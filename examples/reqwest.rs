//! A `reqwest` client with apiguard's guard, as a `reqwest-middleware`
//! middleware, against two local servers it starts itself.
//!
//! ```text
//! cargo run --example reqwest
//! ```
//!
//! First a server that admits 5 requests a second and answers `429` with
//! `Retry-After` past that: 12 requests sent at once all succeed, the
//! client pausing and pacing itself after the first refusals. Then a
//! server in an outage (`503`): the host's breaker opens after 3 failures
//! and refuses at once with `CircuitOpen`, sparing the server.

use std::time::Duration;

use tokio::time::Instant;

use apiguard::{CircuitOpen, GuardedClient};
use apiguard_reqwest::GuardMiddleware;
use apiguard_suite::{Behavior, Upstream};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // The settings of a `GuardedClient`; the reqwest client gets the same
    // guard.
    let settings = GuardedClient::builder().max_retries(4);
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(GuardMiddleware::new(settings)?)
        .build();

    let limited = Upstream::start(Behavior::Limit {
        per_sec: 5,
        http_date: false,
    })
    .await?;
    let url = format!("{}/", limited.url());
    println!("12 requests at once to a server that admits 5 a second:");
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..12 {
        let (client, url) = (client.clone(), url.clone());
        set.spawn(async move { (i, client.get(&url).send().await) });
    }
    while let Some(joined) = set.join_next().await {
        let (i, result) = joined?;
        match result {
            Ok(res) => println!("  #{i:<2} {} after {:.1?}", res.status(), start.elapsed()),
            Err(e) => println!("  #{i:<2} failed: {e}"),
        }
    }
    let stats = limited.stats();
    println!(
        "  the server answered {} OK and {} 429s",
        stats.ok.load(std::sync::atomic::Ordering::Relaxed),
        stats.too_many.load(std::sync::atomic::Ordering::Relaxed),
    );

    // Retries off for the outage, to show the breaker alone: each `503`
    // is one failure, and the fourth request is refused without being sent.
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(GuardMiddleware::new(
            GuardedClient::builder()
                .max_retries(0)
                .failure_threshold(3)
                .recovery_timeout(Duration::from_secs(5))
                .max_wait(Duration::from_secs(1)),
        )?)
        .build();
    let down = Upstream::start(Behavior::Status(503)).await?;
    let url = format!("{}/", down.url());
    println!("a server in an outage (503):");
    for i in 0..5 {
        match client.get(&url).send().await {
            Ok(res) => println!("  #{i} {}", res.status()),
            Err(reqwest_middleware::Error::Middleware(e)) if e.is::<CircuitOpen>() => {
                println!("  #{i} refused by the host's breaker: {e}")
            }
            Err(e) => println!("  #{i} failed: {e}"),
        }
    }
    println!(
        "  the server saw {} requests: the breaker refused the rest",
        down.requests()
    );
    Ok(())
}
