//! Layer behaviour on tower-test mocks and paused time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use apiguard_core::{BoxError, RateLimited};
use apiguard_ratelimit::error::MissingKey;
use apiguard_ratelimit::{KeyedLimiter, KeyedRateLimitLayer, RateLimitLayer, TokenBucket};
use http::Request;
use tokio::time::{Instant, advance};
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Service, ServiceExt, service_fn};
use tower_test::mock;

fn counting() -> (
    Arc<AtomicUsize>,
    impl Service<u32, Response = (), Error = BoxError, Future: Send> + Clone + Send,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = service_fn(move |_req: u32| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, BoxError>(()) }
    });
    (calls, svc)
}

fn rate_limited(err: &BoxError) -> &RateLimited {
    err.downcast_ref::<RateLimited>()
        .unwrap_or_else(|| panic!("expected RateLimited, got {err}"))
}

#[tokio::test(start_paused = true)]
async fn waits_for_tokens_by_default_and_never_refuses() {
    let bucket = TokenBucket::from_rate(2, 10.0).unwrap();
    let (calls, svc) = counting();
    let mut svc = RateLimitLayer::new(bucket).layer_svc(svc);
    let start = Instant::now();
    for i in 0..6 {
        svc.ready().await.unwrap().call(i).await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    // 2 at once, then 4 more at 10/s.
    assert_eq!(start.elapsed(), Duration::from_millis(400));
}

#[tokio::test(start_paused = true)]
async fn max_wait_zero_refuses_at_once_with_the_wait_and_quota() {
    let bucket = TokenBucket::from_rate(2, 1.0).unwrap();
    let (calls, svc) = counting();
    let mut svc = RateLimitLayer::new(bucket)
        .max_wait(Duration::ZERO)
        .layer_svc(svc);
    svc.ready().await.unwrap().call(0).await.unwrap();
    svc.ready().await.unwrap().call(0).await.unwrap();
    let err = svc.ready().await.unwrap().call(0).await.unwrap_err();
    let limited = rate_limited(&err);
    assert_eq!(limited.retry_after(), Some(Duration::from_secs(1)));
    assert_eq!(limited.policy().unwrap().limit, 2);
    assert_eq!(limited.policy().unwrap().window, Duration::from_secs(2));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_wait_longer_than_max_wait_is_refused_and_reserves_nothing() {
    let bucket = TokenBucket::from_rate(1, 1.0).unwrap();
    let (_calls, svc) = counting();
    let mut svc = RateLimitLayer::new(bucket.clone())
        .max_wait(Duration::from_millis(500))
        .layer_svc(svc);
    svc.ready().await.unwrap().call(0).await.unwrap();
    let err = svc.ready().await.unwrap().call(0).await.unwrap_err();
    assert_eq!(
        rate_limited(&err).retry_after(),
        Some(Duration::from_secs(1))
    );
    advance(Duration::from_millis(600)).await;
    // 400 ms left: within max_wait now, and nothing was reserved before.
    let start = Instant::now();
    svc.ready().await.unwrap().call(0).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(400));
}

#[tokio::test(start_paused = true)]
async fn per_request_cost_is_charged() {
    let bucket = TokenBucket::from_rate(10, 1.0).unwrap();
    let (calls, svc) = counting();
    let mut svc = RateLimitLayer::new(bucket.clone())
        .max_wait(Duration::ZERO)
        .cost(|req: &u32| *req)
        .layer_svc(svc);
    svc.ready().await.unwrap().call(7).await.unwrap();
    assert!(svc.ready().await.unwrap().call(4).await.is_err());
    svc.ready().await.unwrap().call(3).await.unwrap();
    // More than the capacity can never pass: refused, not left hanging.
    let err = svc.ready().await.unwrap().call(11).await.unwrap_err();
    assert_eq!(rate_limited(&err).retry_after(), Some(Duration::MAX));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn sixty_four_clones_share_one_limit() {
    let bucket = TokenBucket::from_rate(10, 1.0).unwrap();
    let (calls, svc) = counting();
    let svc = RateLimitLayer::new(bucket)
        .max_wait(Duration::ZERO)
        .layer_svc(svc);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut clone = svc.clone();
        tasks.push(tokio::spawn(async move {
            clone.ready().await.unwrap().call(i).await.is_ok()
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 10);
    assert_eq!(calls.load(Ordering::SeqCst), 10);
}

#[tokio::test(start_paused = true)]
async fn services_from_one_layer_share_one_limit() {
    let layer =
        RateLimitLayer::new(TokenBucket::from_rate(3, 1.0).unwrap()).max_wait(Duration::ZERO);
    let (_c, a) = counting();
    let (_d, b) = counting();
    let mut a = layer.layer_svc(a);
    let mut b = layer.layer_svc(b);
    a.ready().await.unwrap().call(0).await.unwrap();
    b.ready().await.unwrap().call(0).await.unwrap();
    a.ready().await.unwrap().call(0).await.unwrap();
    assert!(b.ready().await.unwrap().call(0).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn poll_ready_forwards_to_the_inner_service_and_the_decision_is_in_call() {
    let bucket = TokenBucket::from_rate(1, 1.0).unwrap();
    let (mut svc, mut handle) = mock::spawn_layer::<u32, (), _>(
        RateLimitLayer::new(bucket.clone()).max_wait(Duration::ZERO),
    );
    handle.allow(0);
    assert_pending!(svc.poll_ready());
    assert_eq!(bucket.available(), 1.0, "no token spent while not ready");
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(1);
    assert_eq!(bucket.available(), 0.0, "the token is taken in call");
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, 1);
    send.send_response(());
    fut.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_waiting_request_drives_readiness_of_its_own_clone() {
    let bucket = TokenBucket::from_rate(1, 1.0).unwrap();
    let (mut svc, mut handle) = mock::spawn_layer::<u32, (), _>(RateLimitLayer::new(bucket));
    handle.allow(2);
    assert_ready_ok!(svc.poll_ready());
    let first = svc.call(1);
    assert_ready_ok!(svc.poll_ready());
    let second = tokio::spawn(svc.into_inner().call(2));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(());
    first.await.unwrap();
    // The second request waits a second for its token, then is sent.
    let start = Instant::now();
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, 2);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    send.send_response(());
    second.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiting_request_gives_its_token_back() {
    let bucket = TokenBucket::from_rate(1, 1.0).unwrap();
    let (calls, svc) = counting();
    let mut svc = RateLimitLayer::new(bucket.clone()).layer_svc(svc);
    svc.ready().await.unwrap().call(0).await.unwrap();
    let waiting = svc.ready().await.unwrap().call(1);
    assert!(bucket.available() < 1e-9);
    drop(waiting);
    advance(Duration::from_secs(1)).await;
    assert_eq!(
        bucket.available(),
        1.0,
        "the dropped request's token is back"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn keyed_layer_refuses_by_default_and_keeps_keys_apart() {
    let limiter = KeyedLimiter::from_rate(2, 1.0).unwrap();
    let extractor = |req: &Request<()>| {
        req.headers()
            .get("x-user")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let inner = service_fn(|_req: Request<()>| async { Ok::<_, BoxError>("ok") });
    let mut svc = KeyedRateLimitLayer::new(limiter.clone(), extractor).layer_svc(inner);
    let req = |user: &str| Request::builder().header("x-user", user).body(()).unwrap();
    for _ in 0..2 {
        svc.ready().await.unwrap().call(req("a")).await.unwrap();
    }
    let err = svc.ready().await.unwrap().call(req("a")).await.unwrap_err();
    assert_eq!(
        rate_limited(&err).retry_after(),
        Some(Duration::from_secs(1))
    );
    svc.ready().await.unwrap().call(req("b")).await.unwrap();
    assert_eq!(limiter.len(), 2);

    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap_err();
    assert!(err.is::<MissingKey>(), "{err}");
}

#[tokio::test(start_paused = true)]
async fn missing_key_fails_as_a_set_up_error_by_default_and_as_400_when_asked() {
    use apiguard_ratelimit::HeaderKey;
    use http::HeaderName;
    let limiter = KeyedLimiter::from_rate(5, 1.0).unwrap();
    let inner = service_fn(|_req: Request<()>| async { Ok::<_, BoxError>(()) });
    let by_key = HeaderKey::new(HeaderName::from_static("x-api-key"));

    let mut svc = KeyedRateLimitLayer::new(limiter.clone(), by_key.clone()).layer_svc(inner);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap_err();
    let missing = err.downcast_ref::<MissingKey>().unwrap();
    assert!(!missing.is_bad_request());
    assert!(
        missing.hint().unwrap().contains("missing_key_as_400"),
        "{missing}"
    );

    let mut svc = KeyedRateLimitLayer::new(limiter.clone(), by_key)
        .missing_key_as_400()
        .layer_svc(inner);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap_err();
    assert!(err.downcast_ref::<MissingKey>().unwrap().is_bad_request());
    assert!(
        limiter.is_empty(),
        "a refused keyless request spends nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn keyless_requests_can_share_one_bucket() {
    let limiter = KeyedLimiter::from_rate(2, 1.0).unwrap();
    let (calls, inner) = counting();
    let inner = inner.map_request(|_req: Request<()>| 0u32);
    let by_user = |r: &Request<()>| r.headers().get("x-user").map(|v| v.as_bytes().to_vec());
    let mut svc = KeyedRateLimitLayer::new(limiter.clone(), by_user)
        .missing_key_shares(b"anonymous".to_vec())
        .layer_svc(inner);
    for _ in 0..2 {
        svc.ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
    }
    // The third keyless request finds the shared bucket empty...
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap_err();
    rate_limited(&err);
    // ...while a request with a key of its own has its own bucket.
    let keyed = Request::builder().header("x-user", "a").body(()).unwrap();
    svc.ready().await.unwrap().call(keyed).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(limiter.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn keyed_layer_can_wait_per_key() {
    let limiter = KeyedLimiter::from_rate(1, 2.0).unwrap();
    let inner = service_fn(|_req: Request<()>| async { Ok::<_, BoxError>(()) });
    let mut svc = KeyedRateLimitLayer::new(limiter, |_: &Request<()>| Some(1u8))
        .max_wait(Duration::from_secs(1))
        .layer_svc(inner);
    let start = Instant::now();
    for _ in 0..3 {
        svc.ready()
            .await
            .unwrap()
            .call(Request::new(()))
            .await
            .unwrap();
    }
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}

/// `Layer::layer` without importing the trait in every test.
trait LayerExt<S>: tower::Layer<S> {
    fn layer_svc(&self, inner: S) -> Self::Service {
        self.layer(inner)
    }
}
impl<S, L: tower::Layer<S>> LayerExt<S> for L {}
