//! The layers in front of real HTTP servers and clients on loopback.
#![cfg(not(loom))]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiguard_core::RejectionResponseLayer;
use apiguard_core::headers::{RATELIMIT, RATELIMIT_POLICY};
use apiguard_ratelimit::{
    HeaderKey, KeyedLimiter, KeyedRateLimitLayer, RateLimitLayer, TokenBucket,
};
use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http::header::{HeaderName, RETRY_AFTER};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get_with_key(client: &HttpClient, addr: SocketAddr, key: &str) -> Response<Incoming> {
    let req = Request::get(format!("http://{addr}/"))
        .header("x-api-key", key)
        .body(Empty::new())
        .unwrap();
    client.request(req).await.unwrap()
}

#[tokio::test]
async fn axum_server_answers_exactly_capacity_successes_then_429_per_key() {
    const N: usize = 5;
    const K: usize = 4;
    // Refills once a minute: nothing comes back during the test.
    let limiter = KeyedLimiter::from_rate(N as u32, 1.0 / 60.0).unwrap();
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        ServiceBuilder::new()
            .layer(RejectionResponseLayer::new().other_errors_as_500())
            .layer(KeyedRateLimitLayer::new(
                limiter,
                HeaderKey::new(HeaderName::from_static("x-api-key")),
            )),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let client = client();
    let requests = (0..N + K).map(|_| {
        let client = client.clone();
        tokio::spawn(async move { get_with_key(&client, addr, "alice").await })
    });
    let mut ok = 0;
    let mut limited = 0;
    for r in requests.collect::<Vec<_>>() {
        let res = r.await.unwrap();
        match res.status() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited += 1;
                let retry_after: u64 = res.headers()[RETRY_AFTER]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(retry_after >= 1);
                assert_eq!(res.headers()[RATELIMIT_POLICY], "\"default\";q=5;w=300");
                assert!(res.headers().contains_key(RATELIMIT));
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((ok, limited), (N, K));

    // Another key has a bucket of its own.
    let res = get_with_key(&client, addr, "bob").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ok");
}

#[tokio::test]
async fn axum_server_without_the_key_answers_500_not_200() {
    let limiter = KeyedLimiter::from_rate(5, 1.0).unwrap();
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        ServiceBuilder::new()
            .layer(RejectionResponseLayer::new().other_errors_as_500())
            .layer(KeyedRateLimitLayer::new(
                limiter,
                HeaderKey::new(HeaderName::from_static("x-api-key")),
            )),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let req = Request::get(format!("http://{addr}/"))
        .body(Empty::new())
        .unwrap();
    let res = client().request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn peer_ip_reads_axum_connect_info() {
    use apiguard_ratelimit::PeerIp;
    let limiter = KeyedLimiter::from_rate(2, 1.0 / 60.0).unwrap();
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        ServiceBuilder::new()
            .layer(RejectionResponseLayer::new().other_errors_as_500())
            .layer(KeyedRateLimitLayer::new(limiter.clone(), PeerIp)),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    let client = client();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(get_with_key(&client, addr, "ignored").await.status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert!(limiter.contains(&"127.0.0.1".parse().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_client_through_the_layer_waits_and_the_server_sees_at_most_the_rate() {
    const BURST: usize = 5;
    const RATE: f64 = 50.0;
    const REQUESTS: usize = 30;

    // A plain hyper server that records when each request arrives.
    let arrivals = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = arrivals.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    seen.lock().unwrap().push(Instant::now());
                    async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });

    let bucket = TokenBucket::from_rate(BURST as u32, RATE).unwrap();
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(bucket))
        .service(client());
    let start = Instant::now();
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let svc = svc.clone();
            let req = Request::get(format!("http://{addr}/"))
                .body(Empty::new())
                .unwrap();
            tokio::spawn(async move { svc.oneshot(req).await })
        })
        .collect();
    for t in tasks {
        let res = t
            .await
            .unwrap()
            .expect("the client layer waits, it never refuses");
        assert_eq!(res.status(), StatusCode::OK);
    }
    let elapsed = start.elapsed();
    let min = Duration::from_secs_f64((REQUESTS - BURST) as f64 / RATE);
    assert!(
        elapsed + Duration::from_millis(25) >= min,
        "took {elapsed:?}, expected ≥ {min:?}"
    );

    let mut at = arrivals.lock().unwrap().clone();
    assert_eq!(at.len(), REQUESTS);
    at.sort();
    // In every window the server saw no more than burst + rate × window
    // (plus a little slack for loopback jitter bunching two sends).
    const SLACK: f64 = 2.0;
    for i in 0..at.len() {
        for j in i..at.len() {
            let window = (at[j] - at[i]).as_secs_f64();
            let count = (j - i + 1) as f64;
            assert!(
                count <= BURST as f64 + RATE * window + SLACK,
                "{count} requests within {window:.3} s"
            );
        }
    }
}
