//! The layers' behaviour, with tower-test mocks and paused time.

use std::time::Duration;

use apiguard_breaker::{
    CircuitBreaker, CircuitBreakerLayer, HostKey, KeyedBreakers, KeyedCircuitBreakerLayer, State,
};
use apiguard_core::{BoxError, CircuitOpen, HttpClassifier, Outcome};
use http::{Request, Response, StatusCode};
use tokio::time::advance;
use tokio_test::{assert_pending, assert_ready, assert_ready_ok, task};
use tower::Layer;
use tower_test::mock;

type Req = Request<()>;
type Res = Response<()>;

fn breaker(failures: u32) -> CircuitBreaker {
    CircuitBreaker::builder()
        .failure_threshold(failures)
        .recovery_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn status(code: u16) -> Res {
    Response::builder().status(code).body(()).unwrap()
}

/// Sends one request through `svc` and answers it with `code`.
async fn exchange<S>(
    svc: &mut tower_test::mock::Spawn<S>,
    handle: &mut mock::Handle<Req, Res>,
    res: Res,
) -> Result<Res, BoxError>
where
    S: tower::Service<Req, Response = Res, Error = BoxError>,
{
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(Request::new(()));
    let (_, send) = handle
        .next_request()
        .await
        .expect("reached the inner service");
    send.send_response(res);
    fut.await
}

fn is_open(r: &Result<Res, BoxError>) -> bool {
    matches!(r, Err(e) if e.is::<CircuitOpen>())
}

#[tokio::test(start_paused = true)]
async fn server_errors_open_it_and_open_refuses_without_calling_inner() {
    let b = breaker(3);
    let (mut svc, mut handle) = mock::spawn_layer(CircuitBreakerLayer::new(b.clone()));
    for _ in 0..3 {
        let res = exchange(&mut svc, &mut handle, status(500)).await.unwrap();
        assert_eq!(res.status(), 500);
    }
    assert_eq!(b.state(), State::Open);
    assert_ready_ok!(svc.poll_ready());
    let err = svc.call(Request::new(())).await.unwrap_err();
    let open = err.downcast_ref::<CircuitOpen>().unwrap();
    assert_eq!(open.retry_after(), Some(Duration::from_secs(10)));
    assert_pending!(task::spawn(handle.next_request()).poll());
}

#[tokio::test(start_paused = true)]
async fn client_errors_and_429_never_trip_by_default() {
    let b = breaker(2);
    let (mut svc, mut handle) = mock::spawn_layer(CircuitBreakerLayer::new(b.clone()));
    for code in [404, 400, 429, 429, 401, 429] {
        exchange(&mut svc, &mut handle, status(code)).await.unwrap();
    }
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.stats().consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn too_many_requests_can_be_made_to_count() {
    let b = breaker(2);
    let layer = CircuitBreakerLayer::new(b.clone())
        .classifier(HttpClassifier::new().too_many_requests_is_failure(true));
    let (mut svc, mut handle) = mock::spawn_layer(layer);
    exchange(&mut svc, &mut handle, status(429)).await.unwrap();
    exchange(&mut svc, &mut handle, status(429)).await.unwrap();
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn transport_errors_are_failures() {
    let b = breaker(1);
    let (mut svc, mut handle): (_, mock::Handle<Req, Res>) =
        mock::spawn_layer(CircuitBreakerLayer::new(b.clone()));
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(Request::new(()));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    assert!(fut.await.unwrap_err().is::<std::io::Error>());
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn closure_classifiers_decide_what_fails() {
    let b = breaker(1);
    let layer =
        CircuitBreakerLayer::new(b.clone()).classifier(|r: &Result<Res, BoxError>| match r {
            Ok(res) if res.status() == StatusCode::IM_A_TEAPOT => Outcome::Failure,
            _ => Outcome::Success,
        });
    let (mut svc, mut handle) = mock::spawn_layer(layer);
    exchange(&mut svc, &mut handle, status(500)).await.unwrap();
    assert_eq!(b.state(), State::Closed);
    exchange(&mut svc, &mut handle, status(418)).await.unwrap();
    assert_eq!(b.state(), State::Open);
}

fn unavailable(retry_after: &str) -> Res {
    Response::builder()
        .status(503)
        .header("retry-after", retry_after)
        .body(())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn service_unavailable_with_retry_after_holds_it_open_that_long() {
    let b = breaker(5);
    let (mut svc, mut handle) = mock::spawn_layer(CircuitBreakerLayer::new(b.clone()));
    exchange(&mut svc, &mut handle, unavailable("120"))
        .await
        .unwrap();
    assert_eq!(b.state(), State::Open);
    assert_ready_ok!(svc.poll_ready());
    let err = svc.call(Request::new(())).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<CircuitOpen>().unwrap().retry_after(),
        Some(Duration::from_secs(120))
    );
    advance(Duration::from_secs(120)).await;
    let res = exchange(&mut svc, &mut handle, status(200)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn hold_is_capped_and_can_be_turned_off() {
    let b = breaker(5);
    let layer = CircuitBreakerLayer::new(b.clone()).hold_open(
        apiguard_breaker::RetryAfterHold::new(Duration::from_secs(60)),
    );
    let (mut svc, mut handle) = mock::spawn_layer(layer);
    exchange(&mut svc, &mut handle, unavailable("86400"))
        .await
        .unwrap();
    assert_eq!(b.stats().retry_after, Some(Duration::from_secs(60)));

    let b = breaker(5);
    let (mut svc, mut handle) =
        mock::spawn_layer(CircuitBreakerLayer::new(b.clone()).no_hold_open());
    exchange(&mut svc, &mut handle, unavailable("120"))
        .await
        .unwrap();
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.stats().consecutive_failures, 1);
}

#[tokio::test(start_paused = true)]
async fn half_open_lets_exactly_n_of_n_plus_one_calls_through() {
    let b = CircuitBreaker::builder()
        .failure_threshold(1)
        .recovery_timeout(Duration::from_secs(1))
        .half_open_probes(2)
        .success_threshold(2)
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_layer(CircuitBreakerLayer::new(b.clone()));
    exchange(&mut svc, &mut handle, status(500)).await.unwrap();
    advance(Duration::from_secs(1)).await;

    let mut futs = Vec::new();
    for _ in 0..3 {
        assert_ready_ok!(svc.poll_ready());
        futs.push(task::spawn(svc.call(Request::new(()))));
    }
    let third = assert_ready!(futs[2].poll());
    assert!(is_open(&third), "the third call is refused while probing");
    let mut sends = Vec::new();
    for _ in 0..2 {
        sends.push(handle.next_request().await.unwrap().1);
    }
    assert_pending!(task::spawn(handle.next_request()).poll());
    for s in sends {
        s.send_response(status(200));
    }
    for f in &mut futs[..2] {
        assert_eq!(assert_ready!(f.poll()).unwrap().status(), 200);
    }
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn dropped_probe_future_releases_its_slot() {
    let b = CircuitBreaker::builder()
        .failure_threshold(1)
        .recovery_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_layer(CircuitBreakerLayer::new(b.clone()));
    exchange(&mut svc, &mut handle, status(500)).await.unwrap();
    advance(Duration::from_secs(1)).await;

    assert_ready_ok!(svc.poll_ready());
    let mut probe = task::spawn(svc.call(Request::new(())));
    assert_pending!(probe.poll());
    let _never_answered = handle.next_request().await.unwrap();
    assert_eq!(b.stats().probes_in_flight, 1);
    drop(probe); // cancelled mid-flight: neither success nor failure

    assert_eq!(b.state(), State::HalfOpen);
    assert_eq!(b.stats().probes_in_flight, 0);
    let res = exchange(&mut svc, &mut handle, status(200)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_breaker() {
    let b = breaker(4);
    let layer = CircuitBreakerLayer::new(b.clone());
    let (inner, mut handle) = mock::pair::<Req, Res>();
    let svc = layer.layer(inner);
    let mut clones: Vec<_> = (0..4).map(|_| mock::Spawn::new(svc.clone())).collect();
    for c in &mut clones {
        exchange(c, &mut handle, status(502)).await.unwrap();
    }
    assert_eq!(b.state(), State::Open);
    let mut fresh = mock::Spawn::new(svc.clone());
    assert_ready_ok!(fresh.poll_ready());
    assert!(is_open(&fresh.call(Request::new(())).await));
}

fn to(host: &str) -> Req {
    Request::builder()
        .uri(format!("http://{host}/x"))
        .body(())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn keyed_breakers_trip_per_host() {
    let breakers = KeyedBreakers::new(
        CircuitBreaker::builder()
            .failure_threshold(2)
            .recovery_timeout(Duration::from_secs(5)),
        100,
    )
    .unwrap();
    let layer = KeyedCircuitBreakerLayer::new(breakers.clone(), HostKey);
    let (mut svc, mut handle) = mock::spawn_layer(layer);
    for _ in 0..2 {
        assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(to("bad.example"));
        handle
            .next_request()
            .await
            .unwrap()
            .1
            .send_response(status(500));
        fut.await.unwrap();
    }
    assert_ready_ok!(svc.poll_ready());
    assert!(is_open(&svc.call(to("bad.example")).await));

    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(to("good.example"));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.uri().host(), Some("good.example"));
    send.send_response(status(200));
    assert_eq!(fut.await.unwrap().status(), 200);

    let bad = "bad.example".parse().unwrap();
    assert_eq!(breakers.state(&Some(bad)), State::Open);
}

#[tokio::test(start_paused = true)]
async fn keyed_layer_lets_a_request_without_a_key_through_unguarded() {
    let breakers = KeyedBreakers::new(CircuitBreaker::builder().failure_threshold(1), 100).unwrap();
    // Keyed by a header; requests without it name no breaker.
    let route = |req: &Req| {
        req.headers()
            .get("x-route")
            .map(|v| v.to_str().unwrap_or("").to_owned())
    };
    let layer = KeyedCircuitBreakerLayer::new(breakers.clone(), route);
    let (mut svc, mut handle) = mock::spawn_layer(layer);
    // Failures of keyless requests trip nothing: each one reaches the
    // upstream, and no breaker is made for them.
    for _ in 0..3 {
        let res = exchange(&mut svc, &mut handle, status(500)).await.unwrap();
        assert_eq!(res.status(), 500);
    }
    assert!(breakers.is_empty());
    // A keyed request still gets its breaker, which trips on one failure.
    let keyed = || Request::builder().header("x-route", "a").body(()).unwrap();
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(keyed());
    handle
        .next_request()
        .await
        .unwrap()
        .1
        .send_response(status(500));
    fut.await.unwrap();
    assert_ready_ok!(svc.poll_ready());
    assert!(is_open(&svc.call(keyed()).await));
    assert_eq!(breakers.state(&"a".to_owned()), State::Open);
}

#[tokio::test(start_paused = true)]
async fn keyed_registry_stays_bounded_and_keeps_tripped_breakers() {
    let breakers = KeyedBreakers::new(CircuitBreaker::builder().failure_threshold(1), 8).unwrap();
    breakers.get(0u32).try_acquire().unwrap().failure();
    assert_eq!(breakers.state(&0), State::Open);
    for key in 1..1000u32 {
        breakers.get(key).try_acquire().unwrap().success();
        assert!(breakers.len() <= 8, "{} breakers held", breakers.len());
    }
    assert_eq!(breakers.state(&0), State::Open, "a tripped breaker is kept");
}

#[tokio::test(start_paused = true)]
async fn keyed_registry_reclaims_idle_breakers_before_the_cap() {
    let breakers = KeyedBreakers::new(CircuitBreaker::builder(), 1_000_000).unwrap();
    for key in 0..10_000u32 {
        breakers.get(key).try_acquire().unwrap().success();
    }
    assert!(breakers.len() <= 200, "{} breakers held", breakers.len());
}

#[test]
fn keyed_registry_refuses_bad_configuration() {
    let e = KeyedBreakers::<u32>::new(CircuitBreaker::builder(), 0).unwrap_err();
    assert_eq!(e.field(), "max_keys");
    let e =
        KeyedBreakers::<u32>::new(CircuitBreaker::builder().failure_threshold(0), 10).unwrap_err();
    assert_eq!(e.field(), "failure_threshold");
}

/// With `wait_for_recovery`, a refusal comes only once the breaker is worth
/// asking again — here when its open period ends — and names no wait.
#[tokio::test(start_paused = true)]
async fn a_waiting_layer_refuses_only_when_the_breaker_is_worth_asking_again() {
    let b = breaker(1);
    let (mut svc, mut handle) = mock::spawn_layer::<Req, Res, _>(
        CircuitBreakerLayer::new(b.clone()).wait_for_recovery(Duration::from_secs(30)),
    );
    exchange(&mut svc, &mut handle, status(500)).await.unwrap();
    assert_eq!(b.state(), State::Open);
    assert_ready_ok!(svc.poll_ready());
    let mut refused = task::spawn(svc.call(Request::new(())));
    assert_pending!(refused.poll());
    assert_eq!(b.stats().waiters, 1);
    advance(Duration::from_millis(9_999)).await;
    assert_pending!(refused.poll());
    advance(Duration::from_millis(1)).await;
    let err = assert_ready!(refused.poll()).unwrap_err();
    let open = err.downcast_ref::<CircuitOpen>().expect("a refusal");
    assert_eq!(open.retry_after(), Some(Duration::ZERO));
    assert_eq!(b.stats().waiters, 0);
}

/// A next probe further away than the wait allowed is refused at once, and
/// so is every refusal of a keyed layer without `wait_for_recovery`.
#[tokio::test(start_paused = true)]
async fn a_waiting_layer_does_not_wait_past_its_bound() {
    let breakers = KeyedBreakers::new(
        CircuitBreaker::builder()
            .failure_threshold(1)
            .recovery_timeout(Duration::from_secs(10)),
        16,
    )
    .unwrap();
    let (mut svc, mut handle) = mock::spawn_layer::<Req, Res, _>(
        KeyedCircuitBreakerLayer::new(breakers.clone(), HostKey)
            .wait_for_recovery(Duration::from_secs(5)),
    );
    exchange(&mut svc, &mut handle, status(500)).await.unwrap();
    assert_ready_ok!(svc.poll_ready());
    let mut refused = task::spawn(svc.call(Request::new(())));
    let err = assert_ready!(refused.poll()).unwrap_err();
    assert!(err.is::<CircuitOpen>());
    // Five seconds on, the probe is five away: worth waiting for.
    advance(Duration::from_secs(5)).await;
    assert_ready_ok!(svc.poll_ready());
    let mut waiting = task::spawn(svc.call(Request::new(())));
    assert_pending!(waiting.poll());
    drop(waiting);
    assert_eq!(breakers.peek(&None).unwrap().stats().waiters, 0);
}
