use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use apiguard_breaker::{CircuitBreaker, State};
use apiguard_core::BoxError;
use apiguard_retry::RetryPolicy;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;
use tower::{ServiceExt, service_fn};
use tower_layer::Layer;
use tower_service::Service;

use super::*;

fn get(host: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{host}/"))
        .body(Full::default())
        .unwrap()
}

fn key(host: &str) -> HostScope {
    Some(host.parse().unwrap())
}

fn no_delay() -> apiguard_retry::RetryPolicyBuilder {
    RetryPolicy::builder()
        .base_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(1))
        .no_budget()
}

/// An upstream whose first `hangs` calls never answer; later ones
/// answer 200. Counts the calls.
#[allow(clippy::type_complexity)]
fn hanging_then_ok(
    hangs: u32,
) -> (
    impl Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Send,
    > + Clone,
    Arc<AtomicU32>,
) {
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let svc = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < hangs {
                std::future::pending::<()>().await;
            }
            Ok::<_, Infallible>(Response::new(Full::default()))
        }
    });
    (svc, calls)
}

/// One request to `host` through `svc`, once it is ready.
async fn send<S>(svc: &mut S, host: &str) -> Result<S::Response, BoxError>
where
    S: Service<Request<Full<Bytes>>, Error = BoxError>,
{
    svc.ready().await?.call(get(host)).await
}

/// Retry without delay, under both timeouts (milliseconds).
fn with_timeouts(attempt: u64, total: u64) -> GuardLayer {
    GuardLayer::builder()
        .retry(no_delay())
        .attempt_timeout(Duration::from_millis(attempt))
        .total_timeout(Duration::from_millis(total))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_hung_attempt_times_out_and_the_retry_answers() {
    let (up, calls) = hanging_then_ok(1);
    let svc = with_timeouts(100, 1000).layer(up);
    let started = Instant::now();
    let res = svc.oneshot(get("a.example")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(100), "{took:?}");
    assert!(took < Duration::from_millis(200), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn the_total_timeout_ends_a_request_whose_attempts_all_hang() {
    let (up, calls) = hanging_then_ok(u32::MAX);
    let svc = with_timeouts(300, 500).layer(up);
    let started = Instant::now();
    let err = svc.oneshot(get("a.example")).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    // One attempt timed out at 300 ms, the second was cut at 500 ms.
    assert_eq!(started.elapsed(), Duration::from_millis(500));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn with_no_attempt_timeout_the_total_timeout_counts_a_hang_as_a_failure() {
    let layer = GuardLayer::builder()
        .circuit_breaker(
            CircuitBreaker::builder()
                .failure_threshold(2)
                .recovery_timeout(Duration::from_secs(60)),
        )
        .total_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let (up, calls) = hanging_then_ok(u32::MAX);
    let mut svc = layer.layer(up);
    for _ in 0..2 {
        let err = send(&mut svc, "a.example").await.unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    }
    let breakers = layer.breakers().unwrap();
    assert_eq!(breakers.state(&key("a.example")), State::Open);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_it_waits_for_a_token_gives_it_back() {
    let layer = GuardLayer::builder()
        .rate_limit(apiguard_core::Quota::from_rate(1, 1.0))
        .max_wait(Duration::from_secs(5))
        .build()
        .unwrap();
    let (up, calls) = hanging_then_ok(0);
    let mut svc = layer.layer(up);
    send(&mut svc, "a.example").await.unwrap();
    // The bucket is empty: the next request reserves the token due in a
    // second, and is dropped while it waits.
    let waiting = svc.ready().await.unwrap().call(get("a.example"));
    drop(waiting);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // A second later that token is there at once; had the dropped
    // request kept it, this one would wait another second (the paused
    // clock would jump ahead).
    tokio::time::advance(Duration::from_secs(1)).await;
    let before = Instant::now();
    send(&mut svc, "a.example").await.unwrap();
    assert_eq!(before.elapsed(), Duration::ZERO);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_probe_dropped_in_flight_frees_its_slot() {
    let layer = GuardLayer::builder()
        .circuit_breaker(
            CircuitBreaker::builder()
                .failure_threshold(1)
                .recovery_timeout(Duration::from_secs(1)),
        )
        .build()
        .unwrap();
    let breakers = layer.breakers().unwrap().clone();
    // The first call fails, then the upstream hangs until told not to.
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let up = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            match n {
                0 => {}
                1 => std::future::pending::<()>().await,
                _ => {}
            }
            let status = if n == 0 { 500 } else { 200 };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let mut svc = layer.layer(up);
    send(&mut svc, "a.example").await.unwrap();
    assert_eq!(breakers.state(&key("a.example")), State::Open);
    tokio::time::advance(Duration::from_secs(1)).await;
    // The probe hangs; its caller gives up on it.
    let probe = svc.ready().await.unwrap().call(get("a.example"));
    let gave_up = tokio::time::timeout(Duration::from_millis(10), probe).await;
    assert!(gave_up.is_err());
    // Its slot is free at once: the next call is the new probe, and
    // its success closes the circuit.
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(get("a.example"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(breakers.state(&key("a.example")), State::Closed);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_host_a_service_holds_keeps_its_breaker_and_new_hosts_share_the_overflow() {
    let layer = GuardLayer::builder()
        .circuit_breaker(CircuitBreaker::builder().failure_threshold(1))
        .max_hosts(1)
        .build()
        .unwrap();
    let failing = service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
    });
    let mut svc = layer.layer(failing);
    let breakers = layer.breakers().unwrap();
    // `svc` holds a.example's breaker, which its failure opened: the
    // one-host registry keeps it, and b.example gets the overflow breaker.
    send(&mut svc, "a.example").await.unwrap();
    assert_eq!(breakers.state(&key("a.example")), State::Open);
    breakers.get(key("b.example"));
    assert!(breakers.peek(&key("b.example")).is_none());
    assert_eq!(breakers.len(), 1);
    assert_eq!(breakers.state(&key("a.example")), State::Open);
}
