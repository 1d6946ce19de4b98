//! The questions a `GuardedClient` caller asks of an error and of the stats,
//! answered truthfully, against local upstreams over loopback.

use std::error::Error;
use std::time::Duration;

use apiguard::{CircuitOpen, ClientStats, ErrorKind, GuardedClient};
use apiguard_suite::{Behavior, Upstream};
use http::StatusCode;

fn client(up: &Upstream) -> apiguard::client::GuardedClientBuilder {
    GuardedClient::builder()
        .base_url(up.url())
        .base_delay(Duration::from_millis(1))
}

/// `failed` is the sum of its parts.
fn assert_adds_up(s: &ClientStats) {
    let parts = s.rate_limited
        + s.circuit_open
        + s.budget_exhausted
        + s.timeouts
        + s.transport
        + s.error_status;
    assert_eq!(s.failed, parts, "{s:?}");
}

/// The names of the errors down `err`'s `source()` chain, until one is `T`
/// (`None` when none is).
fn chain_to<T: Error + 'static>(err: &(dyn Error + 'static)) -> Result<Vec<String>, Vec<String>> {
    let mut link = Some(err);
    let mut chain = Vec::new();
    while let Some(e) = link {
        chain.push(e.to_string());
        if e.is::<T>() {
            return Ok(chain);
        }
        link = e.source();
    }
    Err(chain)
}

#[tokio::test]
async fn a_retry_the_open_circuit_refuses_answers_as_an_open_circuit() {
    let up = Upstream::start(Behavior::Status(503)).await.unwrap();
    // Two 503s open the circuit for a minute; the retry that follows is
    // refused by it before it is sent. That refusal spent no attempt, and
    // its wait is longer than the client would sit out, so it is the answer.
    let c = client(&up)
        .max_retries(2)
        .failure_threshold(2)
        .recovery_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let err = c.get("/").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CircuitOpen, "{err:?}");
    assert!(err.is_circuit_open());
    assert!(!err.is_rate_limited());
    assert!(!err.retries_exhausted(), "{err:?}");
    assert!(err.cause().is::<CircuitOpen>(), "{err:?}");
    let wait = err.retry_after().expect("the breaker's wait");
    assert!(wait > Duration::from_secs(50), "{wait:?}");
    assert!(err.to_string().contains("circuit open"), "{err}");
    let chain = chain_to::<CircuitOpen>(&err);
    assert!(chain.is_ok(), "no CircuitOpen down {chain:?}");
    assert_eq!(up.requests(), 2);

    let s = c.stats();
    assert_eq!((s.requests, s.failed, s.circuit_open), (1, 1, 1), "{s:?}");
    assert_eq!(s.retries_exhausted, 0, "{s:?}");
    assert_adds_up(&s);

    // The next request is refused before it is sent: the same answers.
    let err = c.get("/").await.unwrap_err();
    assert!(err.is_circuit_open() && !err.retries_exhausted(), "{err:?}");
    assert!(err.retry_after().unwrap() > Duration::from_secs(50));
    assert_eq!(up.requests(), 2);
    assert_adds_up(&c.stats());
}

#[tokio::test]
async fn retries_that_run_out_answer_with_their_last_cause() {
    // Every attempt hangs past its timeout; the breaker never opens.
    let up = Upstream::start(Behavior::Slow(Duration::from_secs(5)))
        .await
        .unwrap();
    let c = client(&up)
        .max_retries(2)
        .failure_threshold(100)
        .attempt_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let err = c.get("/").await.unwrap_err();
    assert!(err.retries_exhausted(), "{err:?}");
    assert_eq!(err.attempts(), Some(3), "{err:?}");
    // The kind is the last attempt's, not "retries exhausted".
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    assert!(err.is_timeout() && !err.is_circuit_open() && !err.is_rate_limited());
    let chain = chain_to::<tower::timeout::error::Elapsed>(&err);
    assert!(chain.is_ok(), "no Elapsed down {chain:?}");
    assert_eq!(up.requests(), 3);

    let s = c.stats();
    assert_eq!((s.requests, s.failed, s.timeouts), (1, 1, 1), "{s:?}");
    assert_eq!(s.retries_exhausted, 1, "{s:?}");
    assert_adds_up(&s);
}

#[tokio::test]
async fn a_final_503_is_returned_but_counted_as_failed() {
    let up = Upstream::start(Behavior::Status(503)).await.unwrap();
    let c = client(&up)
        .max_retries(2)
        .failure_threshold(100)
        .build()
        .unwrap();
    let res = c.get("/").await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(up.requests(), 3, "retried, then handed back");
    let s = c.stats();
    assert_eq!((s.requests, s.failed, s.error_status), (1, 1, 1), "{s:?}");
    assert_eq!((s.attempts, s.retries), (3, 2), "{s:?}");
    assert_adds_up(&s);

    // A 200 is not a failure.
    up.set(Behavior::Ok);
    assert_eq!(c.get("/").await.unwrap().status(), StatusCode::OK);
    let s = c.stats();
    assert_eq!((s.requests, s.failed), (2, 1), "{s:?}");
}

#[tokio::test]
async fn error_for_status_turns_a_final_429_into_an_error_with_its_wait() {
    let up = Upstream::start(Behavior::RetryAfter {
        status: 429,
        wait: Duration::from_secs(20),
        http_date: false,
    })
    .await
    .unwrap();
    // A 20 s hint is longer than the client waits out: no retry, the 429
    // is final at once.
    for error_for_status in [false, true] {
        let c = client(&up)
            .error_for_status(error_for_status)
            .build()
            .unwrap();
        let out = c.get("/").await;
        if error_for_status {
            let err = out.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Status, "{err:?}");
            assert_eq!(err.status(), Some(StatusCode::TOO_MANY_REQUESTS));
            assert_eq!(err.retry_after(), Some(Duration::from_secs(20)));
            assert!(
                !err.is_rate_limited(),
                "the server refused, not our limiter"
            );
            assert!(err.to_string().contains("429"), "{err}");
        } else {
            assert_eq!(out.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
        }
        let s = c.stats();
        assert_eq!(
            (s.failed, s.error_status),
            (1, 1),
            "{error_for_status}: {s:?}"
        );
        assert_adds_up(&s);
    }
}

#[tokio::test]
async fn a_404_fails_only_when_the_caller_asked_for_errors() {
    let up = Upstream::start(Behavior::Status(404)).await.unwrap();
    let c = client(&up).build().unwrap();
    assert_eq!(c.get("/").await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(c.stats().failed, 0, "a 404 is an answer");

    let c = client(&up).error_for_status(true).build().unwrap();
    let err = c.get("/").await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
    assert_eq!(err.retry_after(), None);
    let s = c.stats();
    assert_eq!((s.failed, s.error_status), (1, 1), "{s:?}");
    assert_adds_up(&s);
}
