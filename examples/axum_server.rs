//! The server stack in axum: a per-client rate limit answering `429`, and a
//! circuit breaker around a call to a dependency answering `503`.
//!
//! ```text
//! cargo run --example axum_server [-- --addr 127.0.0.1:3000]
//! curl -i http://127.0.0.1:3000/        # 429 with Retry-After past 5 at once
//! curl -i http://127.0.0.1:3000/report  # 503 with Retry-After once the
//!                                       # dependency has failed 3 times
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use apiguard::BoxError;
use apiguard::breaker::{CallError, CircuitBreaker};
use apiguard::ratelimit::KeyedLimiter;
use apiguard::ratelimit::extract::PeerIp;
use apiguard::server::server_layer;
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Parser;
use http::StatusCode;

/// The apiguard server stack in axum.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
}

/// A dependency that always fails, to show the breaker.
async fn flaky_dependency() -> Result<String, std::io::Error> {
    Err(std::io::Error::other("the reporting service is down"))
}

async fn report(State(breaker): State<CircuitBreaker>) -> Result<String, Response> {
    match breaker.call(flaky_dependency()).await {
        Ok(body) => Ok(body),
        // Open: the refusal is its own response, `503` + `Retry-After`.
        Err(CallError::Open(open)) => Err(open.into_response()),
        Err(CallError::Inner(e)) => {
            Err((StatusCode::BAD_GATEWAY, format!("{e}\n")).into_response())
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let breaker = CircuitBreaker::builder()
        .failure_threshold(3)
        .recovery_timeout(Duration::from_secs(10))
        .build()?;
    // 5 requests at once per client address, then 1 a second.
    let limiter = KeyedLimiter::from_rate(5, 1.0)?.with_max_keys(100_000);
    let app = Router::new()
        .route("/", get(|| async { "hello\n" }))
        .route("/report", get(report))
        .with_state(breaker)
        .layer(server_layer(limiter, PeerIp));
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
