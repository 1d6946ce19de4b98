//! The composed stack end to end: `GuardLayer`'s order, `GuardedClient`
//! against local upstreams that misbehave, the server recipe in axum, and
//! the demo in its short mode.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use apiguard::breaker::CircuitBreaker;
use apiguard::ratelimit::KeyedLimiter;
use apiguard::ratelimit::extract::ForwardedFor;
use apiguard::server::server_layer;
use apiguard::{ErrorKind, GuardLayer, GuardedClient, RetryPolicy};
use apiguard_suite::{Behavior, Upstream};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt, service_fn};

fn host_key() -> Option<http::uri::Authority> {
    Some("api.test".parse().unwrap())
}

fn get() -> Request<Full<Bytes>> {
    Request::get("http://api.test/")
        .body(Full::default())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_retried_attempt_spends_a_token() {
    let layer = GuardLayer::builder()
        .retry(
            RetryPolicy::builder()
                .max_retries(3)
                .base_delay(Duration::from_millis(10)),
        )
        .circuit_breaker(CircuitBreaker::builder().failure_threshold(10))
        .rate_limit(apiguard::Quota::from_rate(10, 1.0))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let svc = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            let status = if n == 0 { 503 } else { 200 };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    }));
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let limiter = layer.limiter().unwrap();
    // Two attempts left the stack, two tokens are gone (1/s refill, paused).
    assert_eq!(limiter.available(&host_key()).floor(), 8.0);
}

#[tokio::test(start_paused = true)]
async fn an_attempt_refused_by_the_breaker_spends_no_token() {
    let layer = GuardLayer::builder()
        .circuit_breaker(CircuitBreaker::builder().failure_threshold(1))
        .rate_limit(apiguard::Quota::from_rate(10, 1.0))
        // The next probe (30 s away) is past what a request may wait: the
        // refusal comes at once.
        .max_wait(Duration::from_secs(1))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let svc = layer.layer(service_fn(move |_req: Request<Full<Bytes>>| {
        seen.fetch_add(1, Ordering::SeqCst);
        async {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(500)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    }));
    // One failure opens this host's circuit; it cost one token.
    let res = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.status(), 500);
    let limiter = layer.limiter().unwrap();
    assert_eq!(limiter.available(&host_key()).floor(), 9.0);
    for _ in 0..5 {
        let err = svc.clone().oneshot(get()).await.unwrap_err();
        assert!(err.is::<apiguard::CircuitOpen>(), "{err}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(limiter.available(&host_key()).floor(), 9.0);
}

/// `max_wait` bounds a request's waits for its host's open circuit across
/// all its attempts, even under a retry policy of the user's own whose
/// `max_local_wait` is longer: a circuit open for longer than `max_wait` is
/// a refusal at once, not a wait for the next probe.
#[tokio::test]
async fn max_wait_ends_the_retries_of_a_layer_built_by_hand() {
    let up = Upstream::start(Behavior::Status(503)).await.unwrap();
    let layer = GuardLayer::builder()
        .retry(
            RetryPolicy::builder()
                .max_retries(4)
                .base_delay(Duration::from_millis(5))
                // Longer than the open period: only `max_wait` can stop
                // the wait for the probe.
                .max_retry_after(Duration::from_secs(60))
                .max_local_wait(Duration::from_secs(60)),
        )
        .circuit_breaker(
            CircuitBreaker::builder()
                .failure_threshold(3)
                .recovery_timeout(Duration::from_secs(5)),
        )
        .max_wait(Duration::from_millis(100))
        .build()
        .unwrap();
    let svc = layer.layer(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    let url = format!("{}/", up.url());
    let started = tokio::time::Instant::now();
    for i in 0..6 {
        let req = Request::get(&url).body(Full::default()).unwrap();
        let err = svc.clone().oneshot(req).await.unwrap_err();
        assert!(err.is::<apiguard::CircuitOpen>(), "request {i}: {err}");
    }
    assert_eq!(up.requests(), 3, "only the calls that opened the circuit");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a request waited for the probe: {:?}",
        started.elapsed()
    );
}

#[test]
fn invalid_combinations_are_refused_with_a_reason() {
    let err = GuardLayer::builder()
        .total_timeout(Duration::from_secs(1))
        .attempt_timeout(Duration::from_secs(2))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "attempt_timeout");
    assert!(
        err.reason().contains("longer than the total timeout"),
        "{err}"
    );

    let err = GuardLayer::builder()
        .attempt_timeout(Duration::from_secs(2))
        .circuit_breaker(CircuitBreaker::builder().failure_rate(0.5).sliding_window(
            apiguard::breaker::SlidingWindow::Time {
                span: Duration::from_secs(3),
                buckets: 3,
            },
        ))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "circuit_breaker");
    assert!(err.reason().contains("twice the attempt timeout"), "{err}");

    let err = GuardLayer::builder()
        .rate_limit(apiguard::Quota::from_rate(0, 1.0))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "capacity");
    let err = GuardedClient::builder()
        .base_url("not a url")
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "base_url");
}

fn client(up: &Upstream) -> apiguard::client::GuardedClientBuilder {
    GuardedClient::builder()
        .base_url(up.url())
        .base_delay(Duration::from_millis(20))
        .attempt_timeout(Duration::from_secs(2))
        .total_timeout(Duration::from_secs(5))
}

#[tokio::test]
async fn guarded_client_waits_out_429s_and_loses_nothing() {
    // The upstream admits 5 a second and answers 429 + Retry-After past that.
    let up = Upstream::start(Behavior::Limit {
        per_sec: 5,
        http_date: false,
    })
    .await
    .unwrap();
    let c = client(&up).max_retries(4).build().unwrap();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let c = c.clone();
        set.spawn(async move { c.get("/").await.map(|r| r.status()) });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap().unwrap(), StatusCode::OK);
    }
    // The three over the first window waited for the next one.
    assert!(up.stats().too_many.load(Ordering::SeqCst) >= 3);
    assert_eq!(up.stats().ok.load(Ordering::SeqCst), 8);
}

#[tokio::test]
async fn guarded_client_never_exceeds_its_rate() {
    let up = Upstream::start(Behavior::Ok).await.unwrap();
    // 4 at once, then 4 a second: 12 requests take about 2 s.
    let c = client(&up)
        .rate_limit(apiguard::Quota::from_rate(4, 4.0))
        .build()
        .unwrap();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let c = c.clone();
        set.spawn(async move { c.get("/").await.map(|r| r.status()) });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(
            r.unwrap().unwrap(),
            StatusCode::OK,
            "no request is refused or lost"
        );
    }
    // In any one second: at most the burst plus one second of refill (and
    // one more for a token landing right on the window's edge).
    let peak = up.stats().peak(Duration::from_secs(1));
    assert!(peak <= 4 + 4 + 1, "peak {peak} per second");
    assert_eq!(up.requests(), 12);
}

#[tokio::test]
async fn one_failing_host_does_not_open_the_circuit_for_another() {
    let bad = Upstream::start(Behavior::Status(500)).await.unwrap();
    let good = Upstream::start(Behavior::Ok).await.unwrap();
    let c = GuardedClient::builder()
        .max_retries(0)
        .failure_threshold(3)
        .recovery_timeout(Duration::from_secs(30))
        // Not worth waiting 30 s for the next probe: refused at once.
        .max_wait(Duration::from_secs(1))
        .build()
        .unwrap();
    for _ in 0..3 {
        let res = c.get(&format!("{}/", bad.url())).await.unwrap();
        assert_eq!(res.status(), 500);
    }
    let err = c.get(&format!("{}/", bad.url())).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CircuitOpen);
    assert!(err.retry_after().unwrap() > Duration::from_secs(25));
    assert_eq!(bad.requests(), 3, "the open circuit spared the bad host");
    for _ in 0..5 {
        let res = c.get(&format!("{}/", good.url())).await.unwrap();
        assert_eq!(res.status(), 200);
    }
}

#[tokio::test]
async fn guarded_client_classifies_its_errors() {
    // A port nobody listens on: connection refused, retried, then exhausted.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let c = GuardedClient::builder()
        .base_url(format!("http://{dead}"))
        .max_retries(2)
        .base_delay(Duration::from_millis(5))
        .build()
        .unwrap();
    let err = c.get("/").await.unwrap_err();
    // The kind is the last attempt's; that retries ran out is said apart.
    assert_eq!(err.kind(), ErrorKind::Transport, "{err:?}");
    assert!(err.retries_exhausted(), "{err:?}");
    assert_eq!(err.attempts(), Some(3));
    assert_eq!(c.stats().attempts, 3);
    assert_eq!(c.stats().retries, 2);

    // A hanging upstream: the attempt timeout fires, a relative path without
    // a base URL is refused before anything is sent.
    let hang = Upstream::start(Behavior::Hang).await.unwrap();
    let c = client(&hang)
        .max_retries(0)
        .attempt_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let err = c.get("/").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    let err = GuardedClient::builder()
        .build()
        .unwrap()
        .get("/x")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);
}

#[tokio::test]
async fn guarded_client_probes_and_closes_after_recovery() {
    let up = Upstream::start(Behavior::Status(503)).await.unwrap();
    let c = client(&up)
        .max_retries(0)
        .failure_threshold(2)
        .recovery_timeout(Duration::from_millis(300))
        // Shorter than the open period: refused at once, not waited out.
        .max_wait(Duration::from_millis(100))
        .build()
        .unwrap();
    for _ in 0..2 {
        assert_eq!(c.get("/").await.unwrap().status(), 503);
    }
    assert!(c.get("/").await.unwrap_err().is_circuit_open());
    up.set(Behavior::Ok);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(c.get("/").await.unwrap().status(), 200);
    assert_eq!(c.get("/").await.unwrap().status(), 200);
    assert_eq!(up.requests(), 4);
}

#[tokio::test]
async fn server_recipe_limits_each_client_address_on_its_own() {
    use axum::{Router, routing::get};
    let limiter = KeyedLimiter::from_rate(5, 0.001).unwrap();
    let app: Router = Router::new()
        .route("/", get(|| async { "hi" }))
        .layer(server_layer(limiter, ForwardedFor::x_forwarded_for(1)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let send = |ip: &'static str| {
        let client = client.clone();
        async move {
            let req = Request::get(format!("http://{addr}/"))
                .header("x-forwarded-for", ip)
                .body(Empty::new())
                .unwrap();
            let res = client.request(req).await.unwrap();
            let (parts, body) = res.into_parts();
            let _ = body.collect().await;
            parts
        }
    };
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..9 {
        set.spawn(send("203.0.113.7"));
    }
    let (mut ok, mut limited) = (0, 0);
    while let Some(parts) = set.join_next().await {
        let parts = parts.unwrap();
        match parts.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited += 1;
                let ra: u64 = parts.headers["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(ra >= 1);
                assert_eq!(
                    parts.headers["ratelimit-policy"]
                        .to_str()
                        .unwrap()
                        .split(';')
                        .next(),
                    Some("\"default\"")
                );
                assert!(parts.headers["ratelimit"].to_str().unwrap().contains("r=0"));
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, limited), (5, 4));
    for _ in 0..5 {
        assert_eq!(send("198.51.100.9").await.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn the_demo_runs_in_its_short_mode() {
    let report = apiguard_suite::demo::run(apiguard_suite::demo::Config {
        duration: Duration::from_millis(2_500),
        rate: 20.0,
        limit: 10,
        progress: false,
    })
    .await
    .unwrap();
    for side in [&report.naive, &report.guarded] {
        assert!(side.issued >= 40, "{side:?}");
        assert_eq!(
            side.succeeded + side.lost,
            side.issued,
            "every request accounted for"
        );
    }
    assert_eq!(report.burst.len(), 2);
    assert!(report.burst[0].ok >= 10 && report.burst[0].ok <= 11);
    assert_eq!(report.burst[0].ok + report.burst[0].too_many, 40);
    assert_eq!(report.burst[1].ok, 5);
    assert!(report.table().contains("requests issued"));
    let svg = std::env::temp_dir().join(format!("apiguard-demo-{}.svg", std::process::id()));
    report.plot(&svg).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"));
    let _ = std::fs::remove_file(svg);
}
