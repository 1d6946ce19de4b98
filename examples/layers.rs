//! The three layers by hand with `ServiceBuilder`, next to tower's own
//! `TimeoutLayer` and `ConcurrencyLimitLayer`, against a local upstream.
//!
//! ```text
//! cargo run --example layers
//! ```

use std::time::Duration;

use apiguard::breaker::CircuitBreaker;
use apiguard::{CircuitBreakerLayer, RateLimitLayer, RetryLayer, RetryPolicy, TokenBucket};
use apiguard_suite::{Behavior, Upstream};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::limit::ConcurrencyLimitLayer;
use tower::timeout::TimeoutLayer;
use tower::{ServiceBuilder, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), apiguard::BoxError> {
    // 503 with `Retry-After: 1` for a moment, then healthy.
    let upstream = Upstream::start(Behavior::RetryAfter {
        status: 503,
        wait: Duration::from_secs(1),
        http_date: false,
    })
    .await?;
    let breaker = CircuitBreaker::builder()
        .failure_threshold(5)
        .recovery_timeout(Duration::from_secs(2))
        .build()?;
    let transport = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(10)))
        .layer(RetryLayer::new(
            RetryPolicy::builder().max_retries(3).build()?,
        ))
        .layer(CircuitBreakerLayer::new(breaker.clone()))
        .layer(RateLimitLayer::new(TokenBucket::from_rate(5, 5.0)?))
        .layer(ConcurrencyLimitLayer::new(4))
        .layer(TimeoutLayer::new(Duration::from_secs(2)))
        .service(transport);

    let healer = upstream.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        healer.set(Behavior::Ok);
    });
    let started = tokio::time::Instant::now();
    let req = Request::get(format!("{}/", upstream.url())).body(Full::default())?;
    let res = svc.clone().oneshot(req).await?;
    println!(
        "first request: {} after {:.1} s (the 503's Retry-After was honoured)",
        res.status(),
        started.elapsed().as_secs_f64()
    );
    for i in 0..8 {
        let req = Request::get(format!("{}/", upstream.url())).body(Full::default())?;
        let t = tokio::time::Instant::now();
        let res = svc.clone().oneshot(req).await?;
        println!(
            "request {i}: {} in {:>4} ms (past the burst of 5, each waits for its token)",
            res.status(),
            t.elapsed().as_millis()
        );
    }
    println!(
        "upstream saw {} calls; breaker is {:?}",
        upstream.requests(),
        breaker.state()
    );
    Ok(())
}
