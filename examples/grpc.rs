//! A tonic client behind `GuardLayer` in gRPC mode, against a tonic health
//! server on loopback that is down for its first three calls (trailers-only
//! `UNAVAILABLE`). Runs on its own: `cargo run --example grpc`.
//!
//! The guard retries `Check` (named idempotent) with gRPC's rules, and its
//! breaker reads `grpc-status`, so the outage is seen although every answer
//! is HTTP 200.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use apiguard::breaker::CircuitBreaker;
use apiguard::grpc::{APPLICATION_GRPC, Code, GRPC_STATUS, GrpcTrailersLayer};
use apiguard::retry::{ReplayBody, RetryPolicyBuilder};
use apiguard::{BoxError, GuardLayer};
use http::{Request, Response};
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceBuilder;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The server: tonic-health, down for its first three calls.
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let outage = tower::util::MapResponseLayer::new(move |res: Response<Body>| {
        if seen.fetch_add(1, Ordering::SeqCst) < 3 {
            let mut down = Response::new(Body::empty());
            down.headers_mut()
                .insert(http::header::CONTENT_TYPE, APPLICATION_GRPC);
            down.headers_mut()
                .insert(GRPC_STATUS, Code::Unavailable.to_header_value());
            return down;
        }
        res
    });
    tokio::spawn(
        Server::builder()
            .layer(outage)
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );

    // The client: the guard in gRPC mode in front of a tonic Channel.
    let guard = GuardLayer::builder()
        .grpc(true)
        .total_timeout(Duration::from_secs(10))
        .retry(
            RetryPolicyBuilder::grpc()
                .max_retries(4)
                .base_delay(Duration::from_millis(50))
                .grpc_idempotent_methods(["grpc.health.v1.Health/Check"]),
        )
        .circuit_breaker(CircuitBreaker::builder().failure_threshold(5))
        .build()?;
    let origin: http::Uri = format!("http://{addr}").parse()?;
    let channel = Endpoint::from(origin.clone()).connect_lazy();
    let svc = ServiceBuilder::new()
        .layer(GrpcTrailersLayer::new())
        .map_request(|r: Request<Body>| r.map(|b| ReplayBody::new(b, 64 * 1024)))
        .layer(guard)
        .map_request(|r: Request<ReplayBody<Body>>| r.map(Body::new))
        .service(channel);
    let mut client = HealthClient::with_origin(svc, origin);

    let res = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    println!(
        "health: {:?} after {} calls (3 UNAVAILABLE answers retried)",
        res.into_inner().status(),
        calls.load(Ordering::SeqCst)
    );
    Ok(())
}
