//! Keyed (per-host) breakers sharing their open signal through a real
//! redis-server.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use apiguard_breaker::{
    CircuitBreaker, CircuitBreakerBuilder, HostKey, KeyedBreakers, KeyedCircuitBreakerLayer, State,
};
use apiguard_core::{BoxError, CircuitOpen};
use apiguard_redis::{SIGNAL_INDEX_SUFFIX, SharedBreakerSignal, SignalKey};
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use tokio::time::{Instant, sleep};
use tower::{Layer, ServiceExt, service_fn};

const POLL: Duration = Duration::from_millis(50);
const RECOVERY: Duration = Duration::from_millis(600);
/// Scheduling slack on a busy 2-core CI machine.
const MARGIN: Duration = Duration::from_millis(500);

type Host = Option<Authority>;

fn host(h: &str) -> Host {
    Some(h.parse().unwrap())
}

fn template() -> CircuitBreakerBuilder {
    CircuitBreaker::builder()
        .failure_threshold(2)
        .recovery_timeout(RECOVERY)
        .success_threshold(1)
        .jitter(0.0)
}

async fn signal(url: &str) -> SharedBreakerSignal {
    SharedBreakerSignal::builder()
        .poll_every(POLL)
        .connect(url)
        .await
        .expect("signal connects")
}

/// One instance of a client: per-host breakers in front of an upstream
/// that counts its calls and fails while unhealthy.
struct Instance {
    signal: SharedBreakerSignal,
    breakers: KeyedBreakers<Host>,
    calls: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
}

impl Instance {
    async fn new(url: &str) -> Self {
        let signal = signal(url).await;
        let breakers = KeyedBreakers::new(template(), 64).unwrap();
        signal.follow_keyed(&breakers);
        Self {
            signal,
            breakers,
            calls: Arc::default(),
            healthy: Arc::new(AtomicBool::new(true)),
        }
    }

    /// One request to `host` through the keyed breaker layer.
    async fn call(&self, host: &str) -> Result<StatusCode, BoxError> {
        let (calls, healthy) = (self.calls.clone(), self.healthy.clone());
        let upstream = service_fn(move |_req: Request<()>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let status = if healthy.load(Ordering::SeqCst) {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            async move {
                let mut res = Response::new(());
                *res.status_mut() = status;
                Ok::<_, Infallible>(res)
            }
        });
        let svc = KeyedCircuitBreakerLayer::new(self.breakers.clone(), HostKey).layer(upstream);
        let req = Request::builder()
            .uri(format!("http://{host}/v1/thing"))
            .body(())
            .unwrap();
        svc.oneshot(req).await.map(|r| r.status())
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn state(&self, h: &str) -> State {
        self.breakers.state(&host(h))
    }

    /// Waits until `h`'s breaker is open; fails past `within`.
    async fn opens_within(&self, h: &str, within: Duration) {
        let start = Instant::now();
        while self.state(h) != State::Open {
            assert!(
                start.elapsed() <= within,
                "{h} not open after {:?}",
                start.elapsed()
            );
            sleep(Duration::from_millis(5)).await;
        }
    }
}

fn refused(r: Result<StatusCode, BoxError>) -> bool {
    r.is_err_and(|e| e.is::<CircuitOpen>())
}

#[tokio::test]
async fn a_host_tripping_on_one_instance_is_refused_on_another_without_calling_it() {
    let server = redis_or_skip!();
    let url = server.url();
    let (a, b) = (Instance::new(&url).await, Instance::new(&url).await);

    a.healthy.store(false, Ordering::SeqCst);
    for _ in 0..2 {
        assert_eq!(
            a.call("api.example.com").await.unwrap(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    let tripped = Instant::now();
    assert_eq!(a.state("api.example.com"), State::Open);
    assert_eq!(a.calls(), 2);

    // B has never called api.example.com; it learns within a poll.
    b.opens_within("api.example.com", POLL + MARGIN).await;
    assert!(refused(b.call("api.example.com").await));
    assert_eq!(b.calls(), 0, "B refused without calling the upstream");
    let held = b.breakers.peek(&host("api.example.com")).unwrap();
    assert_eq!(held.stats().consecutive_failures, 0);
    assert!(held.stats().retry_after.unwrap() <= RECOVERY);
    // Another host on B is not affected.
    assert_eq!(b.call("other.example.com").await.unwrap(), StatusCode::OK);
    assert_eq!(b.calls(), 1);
    assert_eq!(b.state("other.example.com"), State::Closed);
    // The index in Redis names the open host, in Redis' milliseconds.
    let index = format!("apiguard:cb:{SIGNAL_INDEX_SUFFIX}");
    let mut con = server.client();
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(&index)
        .arg("api.example.com")
        .query(&mut con)
        .unwrap();
    assert!(score.is_some(), "api.example.com in the index");

    // After the open period both probe, succeed and close.
    a.healthy.store(true, Ordering::SeqCst);
    sleep((RECOVERY + Duration::from_millis(100)).saturating_sub(tripped.elapsed())).await;
    for i in [&a, &b] {
        assert_eq!(i.call("api.example.com").await.unwrap(), StatusCode::OK);
        assert_eq!(i.state("api.example.com"), State::Closed);
    }
    assert_eq!(b.calls(), 2);
    // No late poll reopens them, B's hold was not published again, and the
    // index is gone with the last hold.
    sleep(POLL * 3).await;
    assert_eq!(b.state("api.example.com"), State::Closed);
    assert_eq!(a.state("api.example.com"), State::Closed);
    assert_eq!(a.signal.open_for("api.example.com").await.unwrap(), None);
    let exists: i64 = redis::cmd("EXISTS").arg(&index).query(&mut con).unwrap();
    assert_eq!(exists, 0, "the index expires with its longest hold");
}

#[tokio::test]
async fn an_instance_does_not_hold_itself_open_on_its_own_keyed_signal() {
    let server = redis_or_skip!();
    let a = Instance::new(&server.url()).await;
    a.healthy.store(false, Ordering::SeqCst);
    for _ in 0..2 {
        a.call("self.example.com").await.unwrap();
    }
    assert_eq!(a.state("self.example.com"), State::Open);
    sleep(RECOVERY + Duration::from_millis(50)).await;
    a.healthy.store(true, Ordering::SeqCst);
    assert_eq!(a.call("self.example.com").await.unwrap(), StatusCode::OK);
    sleep(POLL * 3).await;
    assert_eq!(a.state("self.example.com"), State::Closed);
    assert_eq!(a.calls(), 3);
}

#[tokio::test]
async fn keyed_and_bound_breakers_share_one_signal() {
    let server = redis_or_skip!();
    let url = server.url();
    let keyed = Instance::new(&url).await;
    let sb = signal(&url).await;
    let bound = sb.bind("api.example.com", template()).unwrap();

    // A bound breaker's trip reaches the registry…
    for _ in 0..2 {
        bound.try_acquire().unwrap().failure();
    }
    keyed.opens_within("api.example.com", POLL + MARGIN).await;
    assert!(refused(keyed.call("api.example.com").await));
    assert_eq!(keyed.calls(), 0);

    // …and a registry's trip reaches a bound breaker.
    let other = sb.bind("b.example.com", template()).unwrap();
    keyed.healthy.store(false, Ordering::SeqCst);
    for _ in 0..2 {
        keyed.call("b.example.com").await.unwrap();
    }
    let start = Instant::now();
    while other.state() != State::Open {
        assert!(start.elapsed() <= POLL + MARGIN, "bound breaker not held");
        sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_lingering_keyed_signal_holds_at_most_max_hold_once() {
    let server = redis_or_skip!();
    let url = server.url();
    let publisher = signal(&url).await;
    let follower = SharedBreakerSignal::builder()
        .poll_every(POLL)
        .max_hold(Duration::from_millis(200))
        .connect(&url)
        .await
        .unwrap();
    let breakers = KeyedBreakers::<String>::new(template(), 8).unwrap();
    follower.follow_keyed(&breakers);
    // Someone publishes an hour for a key this registry has no breaker for.
    publisher
        .publish("long", Duration::from_secs(3600))
        .await
        .unwrap();
    let start = Instant::now();
    while breakers.state(&"long".to_owned()) != State::Open {
        assert!(start.elapsed() <= POLL + MARGIN, "not held");
        sleep(Duration::from_millis(5)).await;
    }
    let b = breakers.peek(&"long".to_owned()).unwrap();
    let hold = b.stats().retry_after.unwrap();
    assert!(hold <= Duration::from_millis(200), "held {hold:?}");
    // Still in the index, but applied once: the breaker probes and closes.
    sleep(Duration::from_millis(300)).await;
    b.try_acquire().expect("probe after max_hold").success();
    sleep(POLL * 3).await;
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test]
async fn a_dead_redis_stops_neither_keyed_trips_nor_recovery_and_signals_resume() {
    let mut server = redis_or_skip!();
    let url = server.url();
    let (a, b) = (Instance::new(&url).await, Instance::new(&url).await);

    server.kill();
    b.healthy.store(false, Ordering::SeqCst);
    for _ in 0..2 {
        b.call("flaky.example.com").await.unwrap();
    }
    assert!(refused(b.call("flaky.example.com").await));
    sleep(RECOVERY + Duration::from_millis(50)).await;
    b.healthy.store(true, Ordering::SeqCst);
    assert_eq!(b.call("flaky.example.com").await.unwrap(), StatusCode::OK);
    assert_eq!(b.state("flaky.example.com"), State::Closed);
    assert_eq!(a.state("flaky.example.com"), State::Closed);

    server.restart();
    let start = Instant::now();
    while a.signal.open_for("flaky.example.com").await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "no reconnect");
        sleep(Duration::from_millis(20)).await;
    }
    a.healthy.store(false, Ordering::SeqCst);
    for _ in 0..2 {
        a.call("flaky.example.com").await.unwrap();
    }
    b.opens_within("flaky.example.com", POLL + MARGIN + Duration::from_secs(1))
        .await;
}

#[test]
fn signal_keys_read_back_what_they_write() {
    fn text(k: &impl SignalKey) -> String {
        let mut s = String::new();
        k.write_signal_key(&mut s);
        s
    }
    let h = host("API.Example.com:8443");
    assert_eq!(text(&h), "api.example.com:8443");
    assert_eq!(Host::from_signal_key(&text(&h)), Some(h));
    assert_eq!(text(&None::<Authority>), "");
    assert_eq!(Host::from_signal_key(""), Some(None));
    assert_eq!(Host::from_signal_key("not a host"), None);
    assert_eq!(String::from_signal_key("k"), Some("k".to_owned()));
}
