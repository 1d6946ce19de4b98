//! Breaker recovery loses nothing it could have saved: requests refused by
//! an open circuit (or a probe in flight) wait for the breaker's next
//! change instead of burning retries, are let go at a bounded pace when it
//! closes, and hangs trip it as fast as errors do.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiguard::breaker::{CircuitBreaker, State};
use apiguard::{ErrorKind, GuardLayer, GuardedClient, RetryPolicy};
use apiguard_suite::{Behavior, Upstream};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;
use tower::{Layer, ServiceExt, service_fn};

fn get() -> Request<Full<Bytes>> {
    Request::get("http://api.test/")
        .body(Full::default())
        .unwrap()
}

fn host() -> Option<http::uri::Authority> {
    Some("api.test".parse().unwrap())
}

fn status(code: u16) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .body(Full::default())
        .unwrap()
}

/// When each transition to `Closed` happened, on tokio's clock.
fn closes() -> (
    Arc<Mutex<Vec<Instant>>>,
    impl Fn(&apiguard::breaker::Transition) + Send + Sync,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook_seen = seen.clone();
    let hook = move |t: &apiguard::breaker::Transition| {
        if t.to == State::Closed {
            hook_seen.lock().unwrap().push(Instant::now());
        }
    };
    (seen, hook)
}

/// An upstream whose first `failures` calls answer 500 at once and whose
/// later calls answer 200 after `latency`; records when each call came.
#[allow(clippy::type_complexity)]
fn failing_then_slow_ok(
    failures: u32,
    latency: Duration,
) -> (
    impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + 'static,
    Arc<Mutex<Vec<Instant>>>,
) {
    let calls = Arc::new(AtomicU32::new(0));
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let seen = arrivals.clone();
    let svc = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        seen.lock().unwrap().push(Instant::now());
        async move {
            if n < failures {
                return Ok::<_, Infallible>(status(500));
            }
            tokio::time::sleep(latency).await;
            Ok(status(200))
        }
    });
    (svc, arrivals)
}

/// The reproduction: one failure opens the circuit for 500 ms; the
/// upstream is back (200 after 20 ms) from then on; five requests arrive
/// 50 ms apart. Before waiters followed the probe, four of them finished a
/// whole recovery timeout after the close, and with `max_retries(1)` three
/// failed without reaching the upstream again.
/// Sends five requests through `svc`, at 0, 50, …, 200 ms; asserts each is
/// answered `200` and says when each finished.
async fn five_staggered_oks<S>(svc: S) -> Vec<Instant>
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>>
        + Clone
        + Send
        + 'static,
    S::Error: std::fmt::Display,
    S::Future: Send,
{
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..5u64 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(started + Duration::from_millis(50 * i)).await;
            let res = svc.oneshot(get()).await;
            (
                res.map(|r| r.status()).map_err(|e| e.to_string()),
                Instant::now(),
            )
        }));
    }
    let mut finished = Vec::new();
    for t in tasks {
        let (res, at) = t.await.unwrap();
        assert_eq!(res, Ok(StatusCode::OK));
        finished.push(at);
    }
    finished
}

#[tokio::test(start_paused = true)]
async fn every_request_finishes_soon_after_the_breaker_closes() {
    let (closed_at, hook) = closes();
    let layer = GuardLayer::builder()
        .retry(
            RetryPolicy::builder()
                .max_retries(1)
                .base_delay(Duration::from_millis(10))
                .max_delay(Duration::from_millis(10))
                .no_budget(),
        )
        .circuit_breaker(
            CircuitBreaker::builder()
                .failure_threshold(1)
                .recovery_timeout(Duration::from_millis(500))
                .on_transition(hook),
        )
        .build()
        .unwrap();
    let (up, arrivals) = failing_then_slow_ok(1, Duration::from_millis(20));
    let svc = layer.layer(up);
    let finished = five_staggered_oks(svc).await;
    let closed_at = closed_at.lock().unwrap().clone();
    assert_eq!(closed_at.len(), 1, "one close");
    for at in finished {
        assert!(
            at <= closed_at[0] + Duration::from_millis(150),
            "finished {:?} after the close",
            at - closed_at[0]
        );
    }
    // The failure, the probe, and one call for each of the four others:
    // nothing was spent on the open circuit.
    assert_eq!(arrivals.lock().unwrap().len(), 6);
}

/// A failed probe sends the waiters back to wait for the next one; when it
/// succeeds they all go, each having spent none of its retries.
#[tokio::test(start_paused = true)]
async fn waiters_follow_a_failed_probe_to_the_next_one() {
    let (closed_at, hook) = closes();
    let layer = GuardLayer::builder()
        .retry(RetryPolicy::builder().max_retries(0))
        .circuit_breaker(
            CircuitBreaker::builder()
                .failure_threshold(1)
                .recovery_timeout(Duration::from_millis(500))
                .on_transition(hook),
        )
        .total_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    // The call that trips it and the first probe fail.
    let (up, arrivals) = failing_then_slow_ok(2, Duration::from_millis(20));
    let svc = layer.layer(up);
    let first = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(first.status(), 500);
    let mut waiting = Vec::new();
    for _ in 0..10 {
        waiting.push(tokio::spawn(svc.clone().oneshot(get())));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut probe_failures = 0;
    let mut finished = Vec::new();
    for w in waiting {
        match w.await.unwrap() {
            Ok(res) if res.status() == 200 => finished.push(Instant::now()),
            // Whoever became the failing probe gets its 500 (no retries).
            Ok(res) if res.status() == 500 => probe_failures += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(probe_failures, 1);
    assert_eq!(finished.len(), 9);
    let closed_at = closed_at.lock().unwrap()[0];
    // Closed by the second probe, a recovery timeout after the first.
    assert!(closed_at >= Instant::now() - Duration::from_secs(5));
    assert_eq!(arrivals.lock().unwrap().len(), 2 + 9);
}

/// The backlog gathered while the circuit was open is let go at a bounded
/// pace, oldest first, not in one instant.
#[tokio::test(start_paused = true)]
async fn the_backlog_is_released_at_a_bounded_pace() {
    let layer = GuardLayer::builder()
        .circuit_breaker(
            CircuitBreaker::builder()
                .failure_threshold(1)
                .recovery_timeout(Duration::from_secs(2)),
        )
        .total_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let (up, arrivals) = failing_then_slow_ok(1, Duration::from_millis(5));
    let svc = layer.layer(up);
    assert_eq!(svc.clone().oneshot(get()).await.unwrap().status(), 500);
    // 100 requests over the 2 s the circuit is open: 50 a second.
    let mut waiting = Vec::new();
    for _ in 0..100 {
        waiting.push(tokio::spawn(svc.clone().oneshot(get())));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap().status(), 200);
    }
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 101);
    // They gathered at 5 per 100 ms and leave at that rate, plus one for
    // the probe and one for rounding.
    let peak = arrivals
        .iter()
        .map(|t| {
            arrivals
                .iter()
                .filter(|u| **u >= *t && **u < *t + Duration::from_millis(100))
                .count()
        })
        .max()
        .unwrap();
    assert!(peak <= 7, "{peak} calls in one 100 ms window");
}

/// A request dropped while it waits for the breaker leaves nothing behind:
/// no waiter entry, no probe slot.
#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_it_waits_for_the_breaker_leaves_nothing() {
    let layer = GuardLayer::builder()
        .circuit_breaker(
            CircuitBreaker::builder()
                .failure_threshold(1)
                .recovery_timeout(Duration::from_secs(1)),
        )
        .total_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let (up, arrivals) = failing_then_slow_ok(1, Duration::ZERO);
    let svc = layer.layer(up);
    assert_eq!(svc.clone().oneshot(get()).await.unwrap().status(), 500);
    let breaker = layer.breakers().unwrap().peek(&host()).unwrap();
    let waiting = tokio::spawn(svc.clone().oneshot(get()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(breaker.stats().waiters, 1);
    waiting.abort();
    let _ = waiting.await;
    assert_eq!(breaker.stats().waiters, 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The next call is the probe: nothing holds the slot.
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), 200);
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(arrivals.lock().unwrap().len(), 2);
}

/// A next probe later than the request's deadline is not waited for: the
/// refusal comes at once.
#[tokio::test(start_paused = true)]
async fn a_probe_after_the_deadline_is_refused_at_once() {
    let layer = GuardLayer::builder()
        .circuit_breaker(
            CircuitBreaker::builder()
                .failure_threshold(1)
                .recovery_timeout(Duration::from_secs(30)),
        )
        .total_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let (up, _) = failing_then_slow_ok(1, Duration::ZERO);
    let svc = layer.layer(up);
    assert_eq!(svc.clone().oneshot(get()).await.unwrap().status(), 500);
    let before = Instant::now();
    let err = svc.oneshot(get()).await.unwrap_err();
    assert!(err.is::<apiguard::CircuitOpen>(), "{err}");
    assert_eq!(before.elapsed(), Duration::ZERO);
}

// --- over real sockets --------------------------------------------------

/// A client for the upstream: one failure in five trips, 300 ms open.
fn client(up: &Upstream) -> GuardedClient {
    GuardedClient::builder()
        .base_url(up.url())
        .max_retries(3)
        .circuit_breaker(
            CircuitBreaker::builder()
                .failure_threshold(5)
                .recovery_timeout(Duration::from_millis(300)),
        )
        .attempt_timeout(Duration::from_millis(200))
        .total_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// Requests sent while the upstream misbehaves (`fault`) and after it is
/// healthy again all succeed, and the misbehaving upstream sees few calls.
///
/// `most` bounds the calls the upstream sees during the outage: the few
/// that trip the breaker (all 20 for a hang: every one is sent before the
/// first attempt times out, and the retries of the first to time out may
/// beat the trip) and a probe or two; no retry after the trip.
async fn outage_loses_nothing(fault: Behavior, most: u64) {
    let up = Upstream::start(Behavior::Ok).await.unwrap();
    let client = client(&up);
    up.set(fault.clone());
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move { c.get("/").await }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The breaker has opened by now: the waiters wait for it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = up.requests();
    up.set(Behavior::Ok);
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(res) if res.status() == 200 => ok += 1,
            Ok(res) => panic!("{fault:?}: status {}", res.status()),
            Err(e) => panic!("{fault:?}: {e} ({:?})", e.kind()),
        }
    }
    assert_eq!(ok, 20, "{fault:?}");
    // The raw faults count connections; a handful of calls tripped it.
    assert!(
        during <= most,
        "{fault:?}: {during} calls during the outage"
    );
}

#[tokio::test]
async fn an_outage_of_503s_loses_nothing() {
    outage_loses_nothing(Behavior::Status(503), 12).await;
}

#[tokio::test]
async fn an_outage_of_resets_loses_nothing() {
    outage_loses_nothing(Behavior::Reset, 12).await;
}

#[tokio::test]
async fn a_hanging_outage_loses_nothing() {
    outage_loses_nothing(Behavior::Hang, 26).await;
}

/// Attempt timeouts are failures: a hanging upstream opens the circuit
/// after `failure_threshold` of them, and later requests wait instead of
/// burning attempts on hangs.
#[tokio::test]
async fn hangs_trip_the_breaker_like_errors() {
    let up = Upstream::start(Behavior::Hang).await.unwrap();
    let client = GuardedClient::builder()
        .base_url(up.url())
        .max_retries(0)
        .circuit_breaker(
            CircuitBreaker::builder()
                .failure_threshold(3)
                .recovery_timeout(Duration::from_secs(30)),
        )
        .attempt_timeout(Duration::from_millis(50))
        .total_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    for _ in 0..3 {
        let err = client.get("/").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    }
    // Open now: refused at once (its next probe is past the deadline).
    let err = client.get("/").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CircuitOpen, "{err}");
    assert_eq!(up.requests(), 3);
}

// --- the layers stacked by hand -------------------------------------------

/// The reproduction again, with `RetryLayer` over `CircuitBreakerLayer`
/// (waiting for recovery) over a timeout, stacked by hand.
#[tokio::test(start_paused = true)]
async fn stacked_by_hand_every_request_finishes_soon_after_the_close() {
    use apiguard::{CircuitBreakerLayer, RetryLayer};
    use tower::ServiceBuilder;

    let (closed_at, hook) = closes();
    let breaker = CircuitBreaker::builder()
        .failure_threshold(1)
        .recovery_timeout(Duration::from_millis(500))
        .on_transition(hook)
        .build()
        .unwrap();
    let policy = RetryPolicy::builder()
        .max_retries(1)
        .base_delay(Duration::from_millis(10))
        .max_delay(Duration::from_millis(10))
        .deadline(Duration::from_secs(5))
        .no_budget()
        .build()
        .unwrap();
    let (up, arrivals) = failing_then_slow_ok(1, Duration::from_millis(20));
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new(policy))
        .layer(CircuitBreakerLayer::new(breaker).wait_for_recovery(Duration::from_secs(5)))
        .timeout(Duration::from_secs(1))
        .service(up);
    let finished = five_staggered_oks(svc).await;
    let closed_at = closed_at.lock().unwrap()[0];
    for at in finished {
        assert!(
            at <= closed_at + Duration::from_millis(150),
            "{:?}",
            at - closed_at
        );
    }
    assert_eq!(arrivals.lock().unwrap().len(), 6);
}

/// A timeout below the breaker turns a hang into a failure it counts: a
/// hanging upstream opens the circuit after `failure_threshold` timeouts.
#[tokio::test(start_paused = true)]
async fn stacked_by_hand_a_timeout_below_the_breaker_counts_hangs() {
    use apiguard::CircuitBreakerLayer;
    use tower::ServiceBuilder;

    let breaker = CircuitBreaker::builder()
        .failure_threshold(2)
        .recovery_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let hang = service_fn(move |_req: Request<Full<Bytes>>| {
        seen.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>()
    });
    let svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone()))
        .timeout(Duration::from_millis(100))
        .service(hang);
    for _ in 0..2 {
        let err = svc.clone().oneshot(get()).await.unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    }
    assert_eq!(breaker.state(), State::Open);
    let err = svc.oneshot(get()).await.unwrap_err();
    assert!(err.is::<apiguard::CircuitOpen>(), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
