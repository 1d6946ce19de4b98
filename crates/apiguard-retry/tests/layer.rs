//! Layer behaviour on paused time: delays, caps, deadline, budget,
//! `Retry-After`, refusals, idempotency, errors, cancellation, readiness.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiguard_core::{BoxError, BudgetExhausted, CircuitOpen, RateLimited, RetriesExhausted};
use apiguard_retry::{IDEMPOTENCY_KEY, Jitter, RetryBudget, RetryLayer, RetryPolicy};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

type Res = Response<Full<Bytes>>;
type Answer = dyn Fn(usize) -> Result<Res, BoxError> + Send + Sync;

const MS: Duration = Duration::from_millis(1);

/// An inner service that answers by script and logs when it was called.
#[derive(Clone)]
struct Scripted {
    log: Arc<Mutex<Vec<Instant>>>,
    answer: Arc<Answer>,
}

impl Scripted {
    fn new(answer: impl Fn(usize) -> Result<Res, BoxError> + Send + Sync + 'static) -> Self {
        Self {
            log: Arc::default(),
            answer: Arc::new(answer),
        }
    }

    fn calls(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Time between consecutive calls.
    fn gaps(&self) -> Vec<Duration> {
        let log = self.log.lock().unwrap();
        log.windows(2).map(|w| w[1] - w[0]).collect()
    }

    fn clear(&self) {
        self.log.lock().unwrap().clear();
    }
}

impl Service<Request<Full<Bytes>>> for Scripted {
    type Response = Res;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Res, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        let n = {
            let mut log = self.log.lock().unwrap();
            log.push(Instant::now());
            log.len() - 1
        };
        std::future::ready((self.answer)(n))
    }
}

fn status(code: u16) -> Result<Res, BoxError> {
    Ok(Response::builder()
        .status(code)
        .body(Full::new(Bytes::new()))
        .unwrap())
}

fn status_with(code: u16, name: &str, value: &str) -> Result<Res, BoxError> {
    Ok(Response::builder()
        .status(code)
        .header(name, value)
        .body(Full::new(Bytes::new()))
        .unwrap())
}

fn io_err(kind: io::ErrorKind) -> Result<Res, BoxError> {
    Err(Box::new(io::Error::from(kind)))
}

fn get() -> Request<Full<Bytes>> {
    Request::get("http://example.test/")
        .body(Full::new(Bytes::from_static(b"hi")))
        .unwrap()
}

fn request(method: Method) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri("http://example.test/")
        .body(Full::new(Bytes::from_static(b"hi")))
        .unwrap()
}

/// Deterministic defaults: no jitter, no budget, 100 ms base.
fn policy() -> apiguard_retry::RetryPolicyBuilder {
    RetryPolicy::builder()
        .jitter(Jitter::None)
        .no_budget()
        .base_delay(100 * MS)
}

async fn send(
    policy: RetryPolicy,
    inner: &Scripted,
    req: Request<Full<Bytes>>,
) -> Result<Res, BoxError> {
    RetryLayer::new(policy)
        .layer(inner.clone())
        .oneshot(req)
        .await
}

#[tokio::test(start_paused = true)]
async fn delays_double_then_cap_at_max_delay() {
    let inner = Scripted::new(|_| status(503));
    let p = policy().max_retries(5).max_delay(250 * MS).build().unwrap();
    let res = send(p, &inner, get()).await.unwrap();
    assert_eq!(res.status(), 503, "the last response comes back");
    assert_eq!(inner.calls(), 6);
    assert_eq!(
        inner.gaps(),
        [100, 200, 250, 250, 250].map(|ms| ms * MS).to_vec()
    );
}

#[tokio::test(start_paused = true)]
async fn jitter_modes_keep_their_bounds_over_many_draws() {
    // tokio's timer ticks in whole milliseconds.
    let slack = MS;
    for (jitter, seed) in [
        (Jitter::Full, 1),
        (Jitter::Equal, 2),
        (Jitter::Proportional(0.5), 3),
        (Jitter::Decorrelated, 4),
    ] {
        let p = policy()
            .jitter(jitter)
            .seed(seed)
            .max_retries(3)
            .max_delay(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut firsts = Vec::new();
        for _ in 0..200 {
            let inner = Scripted::new(|_| status(503));
            send(p.clone(), &inner, get()).await.unwrap();
            let gaps = inner.gaps();
            assert_eq!(gaps.len(), 3);
            let mut prev = 100 * MS;
            for (i, gap) in gaps.iter().copied().enumerate() {
                let d = 100 * MS * (1 << i);
                let (lo, hi) = match jitter {
                    Jitter::Full => (Duration::ZERO, d),
                    Jitter::Equal => (d / 2, d),
                    Jitter::Proportional(_) => (d / 2, d * 3 / 2),
                    Jitter::Decorrelated => (100 * MS, prev * 3),
                    Jitter::None => unreachable!(),
                };
                assert!(
                    gap >= lo && gap <= hi + slack,
                    "{jitter:?} retry {}: {gap:?} not in [{lo:?}, {hi:?}]",
                    i + 1
                );
                prev = gap;
            }
            firsts.push(gaps[0]);
        }
        let min = firsts.iter().min().unwrap();
        let max = firsts.iter().max().unwrap();
        assert!(*max - *min > 30 * MS, "{jitter:?} actually spreads delays");
    }
}

#[tokio::test(start_paused = true)]
async fn deadline_stops_retrying() {
    let p = policy()
        .max_retries(10)
        .base_delay(300 * MS)
        .deadline(Duration::from_secs(1))
        .build()
        .unwrap();
    // Attempts at 0, 300 ms, 900 ms; the next would start at 2.1 s.
    let inner = Scripted::new(|_| status(503));
    let start = Instant::now();
    let res = send(p.clone(), &inner, get()).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(inner.calls(), 3);
    assert!(start.elapsed() < Duration::from_secs(1));

    let inner = Scripted::new(|_| io_err(io::ErrorKind::ConnectionReset));
    let err = send(p, &inner, get()).await.unwrap_err();
    let exhausted = err.downcast_ref::<RetriesExhausted>().unwrap();
    assert_eq!(exhausted.attempts(), 3);
}

#[tokio::test(start_paused = true)]
async fn budget_stops_a_retry_storm() {
    // 1000 requests over 10 s against a server that always fails. Without
    // a budget that is 4000 attempts; with 20 % + 1/s it must stay near
    // 1 + 0.2 attempts per request.
    let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.2).unwrap();
    let p = policy()
        .max_retries(3)
        .base_delay(MS)
        .budget(budget)
        .build()
        .unwrap();
    let inner = Scripted::new(|_| status(503));
    let svc = RetryLayer::new(p).layer(inner.clone());
    let requests = 1000;
    for _ in 0..requests {
        let res = svc.clone().oneshot(get()).await.unwrap();
        assert_eq!(res.status(), 503);
        tokio::time::sleep(10 * MS).await;
    }
    let per_request = inner.calls() as f64 / requests as f64;
    eprintln!("storm: {per_request} attempts per request");
    assert!(
        (1.15..=1.35).contains(&per_request),
        "{per_request} attempts per request"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_are_waited_for() {
    let inner = Scripted::new(|n| match n {
        0 => status_with(503, "retry-after", "3"),
        _ => status(200),
    });
    let res = send(policy().build().unwrap(), &inner, get())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(inner.gaps(), [Duration::from_secs(3)]);
}

#[tokio::test(start_paused = true)]
async fn ratelimit_reset_is_honoured() {
    let inner = Scripted::new(|n| match n {
        0 => status_with(429, "ratelimit", "\"default\";r=0;t=4"),
        _ => status(200),
    });
    let res = send(policy().build().unwrap(), &inner, get())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(inner.gaps(), [Duration::from_secs(4)]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_beyond_the_cap_returns_the_response_at_once() {
    let inner = Scripted::new(|_| status_with(503, "retry-after", "3600"));
    let p = policy()
        .max_retry_after(Duration::from_secs(10))
        .build()
        .unwrap();
    let start = Instant::now();
    let res = send(p, &inner, get()).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "3600");
    assert_eq!(inner.calls(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn retry_after_beyond_the_deadline_returns_the_response_at_once() {
    let inner = Scripted::new(|_| status_with(429, "retry-after", "5"));
    let p = policy().deadline(Duration::from_secs(2)).build().unwrap();
    let start = Instant::now();
    let res = send(p, &inner, get()).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(inner.calls(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn post_without_idempotency_key_is_not_retried() {
    let inner = Scripted::new(|_| status(503));
    let res = send(policy().build().unwrap(), &inner, request(Method::POST))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(inner.calls(), 1);
    let inner = Scripted::new(|_| io_err(io::ErrorKind::ConnectionReset));
    let err = send(policy().build().unwrap(), &inner, request(Method::PATCH))
        .await
        .unwrap_err();
    assert!(err.is::<io::Error>(), "returned as it is: {err}");
    assert_eq!(inner.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn post_with_idempotency_key_is_retried() {
    let inner = Scripted::new(|n| if n == 0 { status(503) } else { status(201) });
    let mut req = request(Method::POST);
    req.headers_mut()
        .insert(IDEMPOTENCY_KEY, "8e03978e-40d5".parse().unwrap());
    let res = send(policy().build().unwrap(), &inner, req).await.unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(inner.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn put_is_retried() {
    let inner = Scripted::new(|n| if n == 0 { status(502) } else { status(200) });
    let res = send(policy().build().unwrap(), &inner, request(Method::PUT))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(inner.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn opting_in_retries_post() {
    let inner = Scripted::new(|n| if n == 0 { status(503) } else { status(200) });
    let p = policy().retry_non_idempotent(true).build().unwrap();
    let res = send(p, &inner, request(Method::POST)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(inner.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn refused_connection_is_retried_even_for_post() {
    let inner = Scripted::new(|n| {
        if n < 2 {
            io_err(io::ErrorKind::ConnectionRefused)
        } else {
            status(200)
        }
    });
    let res = send(policy().build().unwrap(), &inner, request(Method::POST))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(inner.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn transient_errors_end_in_retries_exhausted_with_the_last_error() {
    let inner = Scripted::new(|_| io_err(io::ErrorKind::ConnectionReset));
    let p = policy().max_retries(2).build().unwrap();
    let err = send(p, &inner, get()).await.unwrap_err();
    let exhausted = err.downcast_ref::<RetriesExhausted>().unwrap();
    assert_eq!(exhausted.attempts(), 3);
    let last = std::error::Error::source(exhausted).unwrap();
    assert_eq!(
        last.downcast_ref::<io::Error>().unwrap().kind(),
        io::ErrorKind::ConnectionReset
    );
    assert_eq!(inner.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn timeouts_are_retried() {
    let inner = Scripted::new(|n| {
        if n == 0 {
            Err(Box::new(tower::timeout::error::Elapsed::new()))
        } else {
            status(200)
        }
    });
    let res = send(policy().build().unwrap(), &inner, get())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(inner.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn unknown_errors_and_other_statuses_are_not_retried() {
    let inner = Scripted::new(|_| Err("bad request body".into()));
    let err = send(policy().build().unwrap(), &inner, get())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "bad request body");
    assert_eq!(inner.calls(), 1);
    for code in [200, 404, 501] {
        let inner = Scripted::new(move |_| status(code));
        let res = send(policy().build().unwrap(), &inner, get())
            .await
            .unwrap();
        assert_eq!(res.status(), code);
        assert_eq!(inner.calls(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn inner_rate_limit_refusal_is_waited_out() {
    let inner = Scripted::new(|n| {
        if n == 0 {
            Err(Box::new(RateLimited::new(Duration::from_secs(2))))
        } else {
            status(200)
        }
    });
    // Refused calls never left, so even a POST may be retried.
    let res = send(policy().build().unwrap(), &inner, request(Method::POST))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(inner.gaps(), [Duration::from_secs(2)]);
}

#[tokio::test(start_paused = true)]
async fn waiting_out_an_inner_refusal_spends_no_budget() {
    // An empty budget: no floor, no ratio.
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.0).unwrap();
    let p = policy().budget(budget.clone()).build().unwrap();
    let inner = Scripted::new(|n| {
        if n == 0 {
            Err(Box::new(CircuitOpen::new(Some(Duration::from_secs(1)))))
        } else {
            status(200)
        }
    });
    let res = send(p, &inner, get()).await.unwrap();
    assert_eq!(res.status(), 200, "the refused call was retried anyway");
    assert_eq!(inner.gaps(), [Duration::from_secs(1)]);
    assert_eq!(budget.available(), 0.0);
}

#[tokio::test(start_paused = true)]
async fn refusals_that_do_not_fit_are_returned_at_once_as_they_are() {
    let p = policy()
        .max_retry_after(Duration::from_secs(10))
        .build()
        .unwrap();
    let cases: [Arc<Answer>; 3] = [
        Arc::new(|_| Err(Box::new(CircuitOpen::new(None)))),
        Arc::new(|_| Err(Box::new(CircuitOpen::new(Some(Duration::from_secs(60)))))),
        Arc::new(|_| Err(Box::new(RateLimited::new(Duration::from_secs(3600))))),
    ];
    for answer in cases {
        let inner = Scripted {
            log: Arc::default(),
            answer,
        };
        let start = Instant::now();
        let err = send(p.clone(), &inner, get()).await.unwrap_err();
        assert!(err.is::<CircuitOpen>() || err.is::<RateLimited>(), "{err}");
        assert_eq!(inner.calls(), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}

#[tokio::test(start_paused = true)]
async fn spent_budget_returns_the_response_or_budget_exhausted() {
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.0).unwrap();
    let p = policy().budget(budget).build().unwrap();
    let inner = Scripted::new(|_| status(503));
    let res = send(p.clone(), &inner, get()).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(inner.calls(), 1);
    let inner = Scripted::new(|_| io_err(io::ErrorKind::ConnectionReset));
    let err = send(p, &inner, get()).await.unwrap_err();
    assert!(err.is::<BudgetExhausted>(), "{err}");
    assert_eq!(inner.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropped_request_gives_its_retry_back_to_the_budget() {
    let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.0).unwrap();
    assert_eq!(budget.available(), 10.0);
    let p = policy()
        .base_delay(Duration::from_secs(1))
        .budget(budget.clone())
        .build()
        .unwrap();
    let inner = Scripted::new(|_| status(503));
    let mut svc = RetryLayer::new(p).layer(inner.clone());
    let fut = svc.ready().await.unwrap().call(get());
    let mut fut = Box::pin(fut);
    // Poll once: the first attempt fails and the retry is waiting.
    assert!(futures_poll_once(fut.as_mut()).await.is_none());
    assert_eq!(inner.calls(), 1);
    assert_eq!(budget.available(), 9.0, "the retry was withdrawn");
    drop(fut);
    assert_eq!(budget.available(), 10.0, "and given back, once");
    // A retry that does happen stays charged.
    let inner = Scripted::new(|n| if n == 0 { status(503) } else { status(200) });
    let mut svc = RetryLayer::new(policy().budget(budget.clone()).build().unwrap()).layer(inner);
    svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(budget.available(), 9.0);
}

async fn futures_poll_once<F: std::future::Future + Unpin>(mut f: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_budget() {
    let p = policy()
        .base_delay(MS)
        .budget(RetryBudget::new(Duration::from_secs(10), 0, 0.5).unwrap())
        .build()
        .unwrap();
    let inner = Scripted::new(|_| status(503));
    let layer = RetryLayer::new(p);
    // Ten services, as a server makes per connection: ten requests buy five
    // retries in all, not five each.
    for _ in 0..10 {
        layer.layer(inner.clone()).oneshot(get()).await.unwrap();
    }
    assert!(inner.calls() <= 15, "{} attempts", inner.calls());
    let budget = layer.policy().budget().unwrap();
    assert!(budget.available() < 1.0);
}

#[tokio::test(start_paused = true)]
async fn zero_max_retries_sends_once() {
    let inner = Scripted::new(|_| status(503));
    let res = send(policy().max_retries(0).build().unwrap(), &inner, get())
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(inner.calls(), 1);
    inner.clear();
}

#[tokio::test(start_paused = true)]
async fn readiness_is_the_inner_services() {
    let layer = RetryLayer::new(policy().base_delay(MS).build().unwrap());
    let (mut svc, mut handle) =
        tower_test::mock::spawn_layer::<Request<Full<Bytes>>, Res, _>(layer);
    handle.allow(0);
    tokio_test::assert_pending!(svc.poll_ready());
    handle.allow(1);
    tokio_test::assert_ready_ok!(svc.poll_ready());
    let fut = tokio::spawn(svc.call(get()));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.uri(), "http://example.test/");
    send.send_response(status(503).unwrap());
    // The retry waits for the inner service to be ready again.
    tokio::time::sleep(10 * MS).await;
    assert!(handle.poll_request().is_pending());
    handle.allow(1);
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(status(200).unwrap());
    assert_eq!(fut.await.unwrap().unwrap().status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn run_returns_the_first_success() {
    let p = policy().build().unwrap();
    let out: Result<u32, RetriesExhausted<&str>> = p
        .run(|attempt| async move {
            if attempt < 3 {
                Err("flaky")
            } else {
                Ok(attempt)
            }
        })
        .await;
    assert_eq!(out.unwrap(), 3);
}

#[tokio::test(start_paused = true)]
async fn run_exhausts_with_the_attempt_count_and_last_error() {
    let p = policy().max_retries(4).build().unwrap();
    let start = Instant::now();
    let out: Result<(), _> = p.run(|attempt| async move { Err(attempt) }).await;
    let err = out.unwrap_err();
    assert_eq!(err.attempts(), 5);
    assert_eq!(*err.last_error(), 5);
    // 100 + 200 + 400 + 800 ms of backoff.
    assert_eq!(start.elapsed(), 1500 * MS);
}

#[tokio::test(start_paused = true)]
async fn run_waits_out_refusals_and_stops_on_ones_that_do_not_fit() {
    let p = policy()
        .max_retry_after(Duration::from_secs(5))
        .build()
        .unwrap();
    let start = Instant::now();
    let out = p
        .run(|attempt| async move {
            if attempt == 1 {
                Err::<u32, BoxError>(Box::new(RateLimited::new(Duration::from_secs(2))))
            } else {
                Ok(attempt)
            }
        })
        .await;
    assert_eq!(out.unwrap(), 2);
    assert_eq!(start.elapsed(), Duration::from_secs(2));

    let out = p
        .run(|_| async { Err::<(), _>(CircuitOpen::new(Some(Duration::from_secs(30)))) })
        .await;
    let err = out.unwrap_err();
    assert_eq!(err.attempts(), 1);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
}

#[tokio::test(start_paused = true)]
async fn run_classified_can_retry_ok_values() {
    let p = policy().build().unwrap();
    let out = p
        .run_classified(
            |r: &Result<u16, ()>| match r {
                Ok(503) => apiguard_core::Outcome::Failure,
                _ => apiguard_core::Outcome::Success,
            },
            |attempt| async move { Ok(if attempt < 2 { 503 } else { 200 }) },
        )
        .await;
    assert_eq!(out.unwrap(), 200);
}
