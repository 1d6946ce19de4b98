//! `RedisLimiter` behind the rate-limit layers of `apiguard-ratelimit`.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use apiguard_core::{BoxError, Quota, RateLimited};
use apiguard_ratelimit::extract::HeaderKey;
use apiguard_ratelimit::{KeyedRateLimitLayer, RateLimitLayer};
use apiguard_redis::{FailurePolicy, RedisLimiter};
use http::{HeaderName, Request};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

async fn limiter(url: &str, burst: u64) -> RedisLimiter {
    RedisLimiter::builder(Quota::per_minute(1).with_burst(burst))
        .timeout(Duration::from_millis(500))
        .on_redis_failure(FailurePolicy::fail_closed())
        .connect(url)
        .await
        .unwrap()
}

fn request(user: &str) -> Request<()> {
    Request::builder().header("x-user", user).body(()).unwrap()
}

#[tokio::test]
async fn keyed_layer_limits_each_header_key_through_redis() {
    let server = redis_or_skip!();
    let l = limiter(&server.url(), 2).await;
    let mut svc = ServiceBuilder::new()
        .layer(KeyedRateLimitLayer::new(
            l,
            HeaderKey::new(HeaderName::from_static("x-user")),
        ))
        .service(service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>("ok")
        }));
    for _ in 0..2 {
        let r = svc.ready().await.unwrap().call(request("ann")).await;
        assert_eq!(r.unwrap(), "ok");
    }
    let err: BoxError = svc
        .ready()
        .await
        .unwrap()
        .call(request("ann"))
        .await
        .unwrap_err();
    let refused = err.downcast_ref::<RateLimited>().expect("a RateLimited");
    assert!(refused.retry_after().unwrap() > Duration::from_secs(50));
    // Another key has its own bucket.
    let r = svc.ready().await.unwrap().call(request("bob")).await;
    assert_eq!(r.unwrap(), "ok");
}

#[tokio::test]
async fn unkeyed_layer_shares_one_redis_bucket_across_clones() {
    let server = redis_or_skip!();
    let l = limiter(&server.url(), 3).await;
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(l).max_wait(Duration::ZERO))
        .service(service_fn(|_req: ()| async { Ok::<_, Infallible>(()) }));
    let mut admitted = 0;
    for _ in 0..6 {
        admitted += usize::from(svc.clone().oneshot(()).await.is_ok());
    }
    assert_eq!(admitted, 3);
}
