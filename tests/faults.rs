//! `GuardedClient` against an upstream that fails in every way a network
//! peer can: reset before answering, accept then close, hang, drip, 503
//! storms, malformed `Retry-After`, close in the middle of the request
//! body. Real sockets on loopback, so real time: waits are short and the
//! bounds have margins for a loaded two-core machine.
//!
//! What must hold whatever the fault: the client returns within its total
//! timeout, never panics, names the failure (`ClientError::kind`), and a
//! body that reaches the upstream reaches it whole (the upstream checksums
//! each body it receives in full; PUT is idempotent, so it is retried).

use std::time::Duration;

use apiguard::breaker::State;
use apiguard::{ErrorKind, GuardedClient};
use apiguard_suite::upstream::checksum;
use apiguard_suite::{Behavior, Upstream};
use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::time::Instant;

/// Slack on every real-time bound: scheduling on a busy CI machine.
const SLACK: Duration = Duration::from_millis(400);

/// A body no two tests share, reproducible from `seed`.
fn body(len: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// A client with short timeouts and quick retries.
fn client(up: &Upstream) -> apiguard::client::GuardedClientBuilder {
    GuardedClient::builder()
        .base_url(up.url())
        .max_retries(3)
        .base_delay(Duration::from_millis(10))
        .attempt_timeout(Duration::from_millis(300))
        .total_timeout(Duration::from_millis(1_500))
}

/// Every body the upstream received in full is exactly `sent`.
#[track_caller]
fn only_whole_copies_of(up: &Upstream, sent: &Bytes) -> usize {
    let bodies = up.stats().bodies();
    for (len, sum) in &bodies {
        assert_eq!(
            (*len, *sum),
            (sent.len(), checksum(sent)),
            "the upstream received a body that differs from the one sent"
        );
    }
    bodies.len()
}

#[tokio::test]
async fn a_reset_before_the_response_is_retried_and_the_body_arrives_once_whole() {
    let up = Upstream::start(Behavior::Ok).await.unwrap();
    up.set_for(Behavior::Reset, 2, Behavior::Ok);
    let c = client(&up).build().unwrap();
    let sent = body(64 * 1024, 1);
    let res = c.put("/doc", sent.clone()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        up.stats().dropped.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    assert_eq!(only_whole_copies_of(&up, &sent), 1);
    assert_eq!(c.stats().retries, 2);
}

#[tokio::test]
async fn resets_on_every_attempt_end_in_retries_exhausted_with_no_partial_body() {
    let up = Upstream::start(Behavior::Reset).await.unwrap();
    let c = client(&up).build().unwrap();
    let sent = body(64 * 1024, 2);
    let started = Instant::now();
    let err = c.put("/doc", sent.clone()).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(1_500) + SLACK);
    assert_eq!(err.kind(), ErrorKind::Transport, "{err:?}");
    assert!(err.retries_exhausted(), "{err:?}");
    assert_eq!(err.attempts(), Some(4));
    assert_eq!(only_whole_copies_of(&up, &sent), 0);
}

#[tokio::test]
async fn accept_then_close_is_a_transport_failure_that_is_retried() {
    let up = Upstream::start(Behavior::Ok).await.unwrap();
    up.set_for(Behavior::AcceptClose, 2, Behavior::Ok);
    let c = client(&up).build().unwrap();
    let sent = body(10_000, 3);
    let res = c.put("/doc", sent.clone()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(only_whole_copies_of(&up, &sent), 1);

    up.set(Behavior::AcceptClose);
    let c = client(&up).max_retries(0).build().unwrap();
    let err = c.put("/doc", sent.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transport, "{err:?}");
    assert_eq!(only_whole_copies_of(&up, &sent), 1, "nothing more arrived");
}

#[tokio::test]
async fn a_close_in_the_middle_of_the_request_body_never_delivers_a_truncated_body() {
    let up = Upstream::start(Behavior::Ok).await.unwrap();
    up.set_for(Behavior::CloseMidBody, 2, Behavior::Ok);
    let c = client(&up).build().unwrap();
    // Larger than loopback's socket buffers, so the close lands mid-send.
    let sent = body(4 * 1024 * 1024, 4);
    let res = c.put("/upload", sent.clone()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(only_whole_copies_of(&up, &sent), 1);
    assert!(c.stats().retries >= 2, "{:?}", c.stats());

    // Always closing: a classified error, and still no partial body.
    up.set(Behavior::CloseMidBody);
    let err = c.put("/upload", sent.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transport, "{err:?}");
    assert!(err.retries_exhausted(), "{err:?}");
    assert_eq!(only_whole_copies_of(&up, &sent), 1);
}

#[tokio::test]
async fn a_hanging_upstream_is_abandoned_at_the_total_timeout() {
    let up = Upstream::start(Behavior::Hang).await.unwrap();
    let total = Duration::from_millis(700);
    let c = client(&up)
        .max_retries(10)
        .attempt_timeout(Duration::from_millis(200))
        .total_timeout(total)
        .build()
        .unwrap();
    let started = Instant::now();
    let err = c.put("/doc", body(1000, 5)).await.unwrap_err();
    let took = started.elapsed();
    assert!(took < total + SLACK, "took {took:?}");
    // The deadline ends it: either the total timeout fires, or retry sees
    // the next attempt cannot finish in time and stops with the last error,
    // an attempt timeout. A timeout either way.
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    assert!(up.requests() >= 2, "the attempt timeout let it retry");
}

#[tokio::test]
async fn a_slow_response_head_times_out_per_attempt_then_succeeds() {
    let up = Upstream::start(Behavior::Ok).await.unwrap();
    up.set_for(Behavior::Slow(Duration::from_secs(5)), 1, Behavior::Ok);
    let c = client(&up).build().unwrap();
    let started = Instant::now();
    let res = c.put("/doc", body(100, 6)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(started.elapsed() < Duration::from_millis(300) + SLACK);
    assert_eq!(c.stats().retries, 1);
}

#[tokio::test]
async fn a_dripping_body_is_handed_over_at_its_head_and_arrives_whole() {
    // The deadline covers the wait for the response head; the body is the
    // caller's to read (and to bound), as with any hyper response.
    let up = Upstream::start(Behavior::Drip {
        delay: Duration::from_millis(40),
        chunks: 20,
    })
    .await
    .unwrap();
    let c = client(&up)
        .total_timeout(Duration::from_millis(500))
        .attempt_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let started = Instant::now();
    let res = c.get("/stream").await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(200) + SLACK);
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], &[b'.'; 20][..]);
    assert!(started.elapsed() >= Duration::from_millis(20 * 40));
}

#[tokio::test]
async fn malformed_retry_after_values_fall_back_to_backoff() {
    let up = Upstream::start(Behavior::Ok).await.unwrap();
    let c = client(&up).failure_threshold(1000).build().unwrap();
    for raw in [
        "soon",
        "-1",
        "1.5",
        "0x10",
        "",
        "  ",
        "Mon, 99 Foo 2024 25:61:61 GMT",
    ] {
        let before = up.requests();
        up.set(Behavior::RawRetryAfter(raw.to_owned()));
        let started = Instant::now();
        let res = c.put("/doc", body(100, 7)).await.unwrap();
        // Read as no hint: the normal backoff (10, 20, 40 ms and jitter),
        // all retries used, the last 503 handed back.
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{raw:?}");
        assert_eq!(up.requests() - before, 4, "{raw:?}");
        assert!(
            started.elapsed() < Duration::from_millis(300) + SLACK,
            "{raw:?}"
        );
    }
}

#[tokio::test]
async fn a_503_storm_opens_the_circuit_and_every_request_gets_an_answer() {
    let up = Upstream::start(Behavior::Status(503)).await.unwrap();
    let c = client(&up)
        .failure_threshold(5)
        .recovery_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let sent = body(2000, 8);
    // Eight callers, fifty requests each, one after another.
    let mut set = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..8 {
        let (c, sent) = (c.clone(), sent.clone());
        set.spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..25 {
                seen.push(c.put("/doc", sent.clone()).await.map(|r| r.status()));
            }
            seen
        });
    }
    let (mut unavailable, mut open) = (0, 0);
    while let Some(r) = set.join_next().await {
        for r in r.expect("no panic") {
            match r {
                Ok(StatusCode::SERVICE_UNAVAILABLE) => unavailable += 1,
                // Refused at once, or after retries whose last attempt
                // was refused: the kind is the cause either way.
                Err(e) if e.is_circuit_open() => open += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert!(started.elapsed() < Duration::from_millis(1_500) + SLACK);
    assert_eq!(unavailable + open, 200);
    assert!(open >= 150, "{unavailable} answered 503, {open} refused");
    // The open circuit spared the upstream almost all of the storm.
    assert!(up.requests() < 60, "{} upstream calls", up.requests());
    assert_eq!(only_whole_copies_of(&up, &sent) as u64, up.requests());
    let breakers = c.layer().breakers().unwrap();
    let host = Some(up.addr().to_string().parse().unwrap());
    assert_eq!(breakers.state(&host), State::Open);
}

/// Sends `n` PUTs, `concurrency` at a time; returns how many ended `200`.
async fn burst(c: &GuardedClient, n: usize, concurrency: usize, sent: &Bytes) -> usize {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (c, sent, next) = (c.clone(), sent.clone(), next.clone());
        set.spawn(async move {
            let mut ok = 0;
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                if let Ok(res) = c.put("/doc", sent.clone()).await
                    && res.status() == StatusCode::OK
                {
                    ok += 1;
                }
            }
            ok
        });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        ok += r.expect("no panic");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_total_outage_with_the_default_budget_amplifies_load_at_most_1_3_times() {
    // The breaker is kept out of the way (it would spare the upstream almost
    // everything): this measures the retry budget alone, its default of 20 %
    // of requests plus a reserve of 10/s over 10 s (100 retries). 3000
    // requests in about a second make the reserve a small part: the bound
    // is (3000 + 0.2 * 3000 + 100 + 10/s) / 3000 ≈ 1.24.
    let up = Upstream::start(Behavior::Status(503)).await.unwrap();
    let c = GuardedClient::builder()
        .base_url(up.url())
        .base_delay(Duration::from_millis(1))
        .failure_threshold(u32::MAX)
        .build()
        .unwrap();
    let requests = 3000;
    let ok = burst(&c, requests, 32, &body(256, 9)).await;
    assert_eq!(ok, 0);
    let stats = c.stats();
    let amplification = up.requests() as f64 / requests as f64;
    println!(
        "outage, budget only: {requests} requests, {} upstream calls, amplification {amplification:.3}",
        up.requests(),
    );
    assert_eq!(stats.requests, requests as u64);
    assert!(amplification > 1.1, "retries did happen: {amplification}");
    assert!(amplification <= 1.3, "amplification {amplification}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_the_breaker_closes_within_one_recovery_timeout_and_throughput_returns() {
    let recovery = Duration::from_millis(500);
    let up = Upstream::start(Behavior::Status(503)).await.unwrap();
    let c = GuardedClient::builder()
        .base_url(up.url())
        .base_delay(Duration::from_millis(1))
        .recovery_timeout(recovery)
        .attempt_timeout(Duration::from_millis(300))
        .total_timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    // The outage, with the default breaker and budget: 1000 requests.
    let requests = 1000;
    let sent = body(256, 10);
    assert_eq!(burst(&c, requests, 16, &sent).await, 0);
    let amplification = up.requests() as f64 / requests as f64;
    println!(
        "outage, default client: {requests} requests, {} upstream calls, amplification {amplification:.3}",
        up.requests()
    );
    assert!(amplification <= 1.3, "amplification {amplification}");

    // Recovery: from the moment the upstream heals, the next probe is at
    // most one recovery timeout away; one success closes the circuit.
    up.set(Behavior::Ok);
    let healed = Instant::now();
    let back = loop {
        if let Ok(res) = c.put("/doc", sent.clone()).await
            && res.status() == StatusCode::OK
        {
            break healed.elapsed();
        }
        assert!(healed.elapsed() < recovery + SLACK, "still failing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!("throughput back {back:?} after the upstream healed");
    let host = Some(up.addr().to_string().parse().unwrap());
    assert_eq!(c.layer().breakers().unwrap().state(&host), State::Closed);
    let started = Instant::now();
    assert_eq!(burst(&c, 200, 16, &sent).await, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(only_whole_copies_of(&up, &sent) >= 201);
}
