//! The README's axum quick start over real loopback sockets: a client within
//! its limit gets `200`, one past it `429`, and nobody a `500`.

#![cfg(feature = "axum")]

use std::net::SocketAddr;
use std::time::Duration;

use apiguard::ratelimit::{KeyedLimiter, KeyedRateLimitLayer, extract::PeerIp};
use apiguard::server::server_layer;
use apiguard::{CircuitOpen, RejectionResponseLayer};
use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http::{Request, StatusCode, header::RETRY_AFTER};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::ServiceBuilder;

/// Serves `app` on a loopback port, with or without `ConnectInfo`.
async fn serve(app: Router, connect_info: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        if connect_info {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
        } else {
            axum::serve(listener, app).await
        }
    });
    addr
}

/// The statuses of `n` GETs of `path`, one after another.
async fn statuses(addr: SocketAddr, path: &str, n: usize) -> Vec<StatusCode> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let req = Request::get(format!("http://{addr}{path}"))
            .body(Empty::new())
            .unwrap();
        out.push(client.request(req).await.unwrap().status());
    }
    out
}

#[tokio::test]
async fn the_quick_start_answers_200_then_429_and_never_500() {
    // As in the README: 20 at once per client IP, then 10 a second.
    let app = Router::new()
        .route("/", get(|| async { "hello" }))
        .layer(server_layer(
            KeyedLimiter::from_rate(20, 10.0).unwrap(),
            PeerIp,
        ));
    let addr = serve(app, true).await;
    // The bucket starts full, so the first 20 pass however slow the
    // machine; requests sent one after another outrun a refill of 10 a
    // second long before 200 of them, so a 429 comes.
    let got = statuses(addr, "/", 200).await;
    assert!(got[..20].iter().all(|s| *s == StatusCode::OK), "{got:?}");
    let first_refusal = got.iter().position(|s| *s == StatusCode::TOO_MANY_REQUESTS);
    assert!(first_refusal.is_some(), "{got:?}");
    assert!(
        got.iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::TOO_MANY_REQUESTS),
        "{got:?}"
    );
}

#[tokio::test]
async fn rejection_layer_goes_straight_into_router_layer() {
    // Built by hand: the keyed layer under `RejectionResponseLayer::new()`,
    // with no `HandleErrorLayer` and no `other_errors_as_500()`. (Each
    // `Router::layer` must be infallible on its own, so the two go in as one.)
    let app = Router::new().route("/", get(|| async { "hello" })).layer(
        ServiceBuilder::new()
            .layer(RejectionResponseLayer::new())
            .layer(KeyedRateLimitLayer::new(
                KeyedLimiter::from_rate(1, 0.001).unwrap(),
                PeerIp,
            )),
    );
    let addr = serve(app, true).await;
    assert_eq!(
        statuses(addr, "/", 2).await,
        [StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]
    );
}

#[tokio::test]
async fn a_handler_returns_a_refusal_as_its_response() {
    // `CircuitOpen` is an axum response on its own (the `axum` feature).
    let app = Router::new().route(
        "/report",
        get(|| async { Err::<String, _>(CircuitOpen::new(Some(Duration::from_secs(7)))) }),
    );
    let addr = serve(app, false).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let res = client
        .request(
            Request::get(format!("http://{addr}/report"))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()[RETRY_AFTER], "7");
}

#[tokio::test]
async fn serving_without_connect_info_is_a_loud_500_or_the_shared_bucket_you_chose() {
    // The set-up mistake: no `ConnectInfo`. Every request is a 500 (and the
    // log says what to fix), never a silent pass.
    let app = Router::new()
        .route("/", get(|| async { "hello" }))
        .layer(server_layer(
            KeyedLimiter::from_rate(20, 10.0).unwrap(),
            PeerIp,
        ));
    let addr = serve(app, false).await;
    assert_eq!(
        statuses(addr, "/", 2).await,
        [StatusCode::INTERNAL_SERVER_ERROR; 2]
    );
    let hint = apiguard::ratelimit::KeyExtractor::<Request<()>>::missing_key(&PeerIp)
        .hint()
        .unwrap();
    assert!(
        hint.contains("into_make_service_with_connect_info"),
        "{hint}"
    );

    // Chosen on purpose: keyless requests share one bucket.
    let app = Router::new().route("/", get(|| async { "hello" })).layer(
        ServiceBuilder::new()
            .layer(RejectionResponseLayer::new())
            .layer(
                KeyedRateLimitLayer::new(KeyedLimiter::from_rate(2, 0.001).unwrap(), PeerIp)
                    .missing_key_shares(std::net::IpAddr::from([0, 0, 0, 0])),
            ),
    );
    let addr = serve(app, false).await;
    assert_eq!(
        statuses(addr, "/", 3).await,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
}
