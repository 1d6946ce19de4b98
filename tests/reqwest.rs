//! The guard as a reqwest middleware (`apiguard-reqwest`) behaves as
//! `GuardedClient` does: each scenario runs through both, built from the
//! same settings, against its own real loopback upstream, and both must
//! give the same results.
//!
//! These run in real time over real sockets, so they assert counts and
//! lower bounds on waits the server asked for, never how fast anything is.

use std::sync::atomic::Ordering;
use std::time::Duration;

use apiguard::breaker::State;
use apiguard::client::GuardedClientBuilder;
use apiguard::{CircuitOpen, GuardedClient, HostState, RateLimited, RetriesExhausted};
use apiguard_reqwest::GuardMiddleware;
use apiguard_suite::{Behavior, Upstream};
use bytes::Bytes;
use http_body_util::Full;
use reqwest_middleware::ClientWithMiddleware;

/// One host's state, by name, from one of the clients.
type Inspect = Box<dyn Fn(&str) -> HostState>;

/// One of the two front doors to the same guard.
#[derive(Clone)]
enum Client {
    Guarded(Box<GuardedClient>),
    Reqwest(ClientWithMiddleware),
}

/// How a request ended, in terms both clients share.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Status(u16),
    CircuitOpen,
    RateLimited,
    Other(String),
}

impl Client {
    /// A `GuardedClient` and a reqwest client with the middleware, both
    /// from `settings`.
    fn both(settings: GuardedClientBuilder) -> [Client; 2] {
        let guarded = settings.clone().build().unwrap();
        let reqwest = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(GuardMiddleware::new(settings).unwrap())
            .build();
        [Client::Guarded(Box::new(guarded)), Client::Reqwest(reqwest)]
    }

    /// Both clients, each with its inspection call (the middleware's from
    /// a handle kept beside it: the chain owns the middleware).
    fn inspected(settings: GuardedClientBuilder) -> [(Client, Inspect); 2] {
        let guarded = settings.clone().build().unwrap();
        let middleware = GuardMiddleware::new(settings).unwrap();
        let handle = middleware.clone();
        let reqwest = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(middleware)
            .build();
        let g = guarded.clone();
        [
            (
                Client::Guarded(Box::new(guarded)),
                Box::new(move |h: &str| g.host(h).unwrap()),
            ),
            (
                Client::Reqwest(reqwest),
                Box::new(move |h: &str| handle.host(h).unwrap()),
            ),
        ]
    }

    fn name(&self) -> &'static str {
        match self {
            Client::Guarded(_) => "GuardedClient",
            Client::Reqwest(_) => "reqwest + GuardMiddleware",
        }
    }

    async fn get(&self, url: &str) -> Got {
        match self {
            Client::Guarded(c) => match c.get(url).await {
                Ok(res) => Got::Status(res.status().as_u16()),
                Err(e) if e.is_circuit_open() => Got::CircuitOpen,
                Err(e) if e.is_rate_limited() => Got::RateLimited,
                Err(e) => Got::Other(e.to_string()),
            },
            Client::Reqwest(c) => match c.get(url).send().await {
                Ok(res) => Got::Status(res.status().as_u16()),
                Err(reqwest_middleware::Error::Middleware(e)) => {
                    // The refusal itself, or the last attempt's when retries
                    // ran out (as `GuardedClient`'s kinds are).
                    let cause = match e.downcast_ref::<RetriesExhausted>() {
                        Some(r) => &**r.last_error(),
                        None => e.as_ref(),
                    };
                    if cause.is::<CircuitOpen>() {
                        Got::CircuitOpen
                    } else if cause.is::<RateLimited>() {
                        Got::RateLimited
                    } else {
                        Got::Other(e.to_string())
                    }
                }
                Err(e) => Got::Other(e.to_string()),
            },
        }
    }
}

fn settings() -> GuardedClientBuilder {
    GuardedClient::builder()
        .base_delay(Duration::from_millis(20))
        .attempt_timeout(Duration::from_secs(2))
        .total_timeout(Duration::from_secs(10))
}

const TASKS: usize = 8;
const EACH: usize = 5;

/// (a) A server that admits 10 requests a second and answers the rest
/// `429` with `Retry-After`: 8 tasks send 5 requests each, one after the
/// other.
async fn rate_limited(client: Client) -> (Vec<Got>, u64, u64) {
    let up = Upstream::start(Behavior::Limit {
        per_sec: 10,
        http_date: false,
    })
    .await
    .unwrap();
    let url = format!("{}/", up.url());
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let (client, url) = (client.clone(), url.clone());
        set.spawn(async move {
            let mut got = Vec::new();
            for _ in 0..EACH {
                got.push(client.get(&url).await);
            }
            got
        });
    }
    let mut got = Vec::new();
    while let Some(r) = set.join_next().await {
        got.extend(r.unwrap());
    }
    let stats = up.stats();
    (
        got,
        stats.ok.load(Ordering::SeqCst),
        stats.too_many.load(Ordering::SeqCst),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_clients_lose_no_request_to_a_rate_limited_server_and_are_refused_a_few_times() {
    for client in Client::both(settings().max_retries(4)) {
        let name = client.name();
        let (got, ok, too_many) = rate_limited(client).await;
        assert_eq!(got, vec![Got::Status(200); TASKS * EACH], "{name}");
        assert_eq!(ok, 40, "{name}: the server served every request once");
        // The first window's overflow is refused; after it the host is
        // paused until the advertised reset and then paced below it (6 or
        // 7 refusals for either client when this was written).
        assert!(
            (1..=12).contains(&too_many),
            "{name}: {too_many} refusals for 40 requests"
        );
    }
}

// The comparison that makes the test above mean something: without
// pacing, each task waits out its own `Retry-After` and they all come back
// together at the next window (21 refusals when this was written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pacing_the_middleware_is_refused_far_more_often() {
    let [_, client] = Client::both(settings().max_retries(10).adaptive(false));
    let (got, _, too_many) = rate_limited(client).await;
    assert_eq!(got, vec![Got::Status(200); TASKS * EACH]);
    assert!(too_many >= 15, "only {too_many} refusals for 40 requests");
}

/// (b) An outage of `503`s: what each call got, and how many reached the
/// server, while it fails and once it has recovered.
async fn outage(client: Client) -> (Vec<Got>, u64, Vec<Got>, u64) {
    let up = Upstream::start(Behavior::Status(503)).await.unwrap();
    let url = format!("{}/", up.url());
    let mut failing = Vec::new();
    for _ in 0..5 {
        failing.push(client.get(&url).await);
    }
    let seen_failing = up.requests();
    up.set(Behavior::Ok);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let mut recovered = Vec::new();
    for _ in 0..3 {
        recovered.push(client.get(&url).await);
    }
    (failing, seen_failing, recovered, up.requests())
}

#[tokio::test]
async fn both_breakers_open_after_the_same_failures_and_close_after_recovery() {
    let settings = settings()
        .max_retries(0)
        .failure_threshold(3)
        .recovery_timeout(Duration::from_millis(300))
        // Shorter than the open period: refused at once, not waited out.
        .max_wait(Duration::from_millis(100));
    let mut results = Vec::new();
    for client in Client::both(settings) {
        let name = client.name();
        let (failing, seen, recovered, total) = outage(client).await;
        assert_eq!(
            failing,
            [
                vec![Got::Status(503); 3],
                vec![Got::CircuitOpen, Got::CircuitOpen]
            ]
            .concat(),
            "{name}"
        );
        assert_eq!(seen, 3, "{name}: the open breaker spared the server");
        assert_eq!(recovered, vec![Got::Status(200); 3], "{name}");
        assert_eq!(total, 6, "{name}");
        results.push((failing, seen, recovered, total));
    }
    assert_eq!(results[0], results[1]);
}

/// (b') The same outage with retries on: the breaker opens inside the
/// first call's retries and ends them, so the server sees the three
/// failures that opened it and nothing more while it is open.
#[tokio::test]
async fn an_open_breaker_ends_the_retries_of_both_clients() {
    let settings = settings()
        .max_retries(4)
        .failure_threshold(3)
        .recovery_timeout(Duration::from_secs(5))
        // Shorter than the open period: refused at once, not waited out.
        .max_wait(Duration::from_millis(100));
    for (client, inspect) in Client::inspected(settings) {
        let name = client.name();
        let up = Upstream::start(Behavior::Status(503)).await.unwrap();
        let url = format!("{}/", up.url());
        let host = up.addr().to_string();
        assert_eq!(inspect(&host).breaker, Some(State::Closed), "{name}");
        let mut got = Vec::new();
        for _ in 0..6 {
            got.push(client.get(&url).await);
        }
        assert_eq!(got, vec![Got::CircuitOpen; 6], "{name}");
        assert_eq!(
            up.requests(),
            3,
            "{name}: the open breaker spared the server"
        );
        // One call names the host and shows its breaker open; another
        // host's is untouched.
        assert_eq!(inspect(&host).breaker, Some(State::Open), "{name}");
        assert_eq!(inspect(&url).breaker, Some(State::Open), "{name}: by URL");
        assert_eq!(
            inspect("other.example:80").breaker,
            Some(State::Closed),
            "{name}"
        );
    }
}

/// After a server's `429`s, each client shows the host paced, by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_clients_show_a_pushing_back_host_as_paced() {
    for (client, inspect) in Client::inspected(settings().max_retries(10)) {
        let name = client.name();
        let up = Upstream::start(Behavior::Limit {
            per_sec: 10,
            http_date: false,
        })
        .await
        .unwrap();
        let (url, host) = (format!("{}/", up.url()), up.addr().to_string());
        assert_eq!(inspect(&host).pace, None, "{name}: paced before any 429");
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..30 {
            let (client, url) = (client.clone(), url.clone());
            set.spawn(async move { client.get(&url).await });
        }
        while let Some(got) = set.join_next().await {
            assert_eq!(got.unwrap(), Got::Status(200), "{name}");
        }
        assert!(
            up.stats().too_many.load(Ordering::SeqCst) > 0,
            "{name}: the server never pushed back"
        );
        let pace = inspect(&host).pace;
        assert!(pace.is_some_and(|p| p > 0.0), "{name}: {pace:?}");
    }
}

/// (c) The first answer is `503` with `Retry-After: 1`: the retry goes out
/// no sooner than a second later.
async fn retry_after(client: Client) -> (Got, Vec<Duration>) {
    let up = Upstream::start(Behavior::Ok).await.unwrap();
    up.set_for(
        Behavior::RetryAfter {
            status: 503,
            wait: Duration::from_secs(1),
            http_date: false,
        },
        1,
        Behavior::Ok,
    );
    let got = client.get(&format!("{}/", up.url())).await;
    (got, up.stats().arrivals())
}

#[tokio::test]
async fn both_clients_wait_out_retry_after_before_retrying() {
    for client in Client::both(settings()) {
        let name = client.name();
        let (got, arrivals) = retry_after(client).await;
        assert_eq!(got, Got::Status(200), "{name}");
        assert_eq!(arrivals.len(), 2, "{name}: one retry");
        let waited = arrivals[1] - arrivals[0];
        assert!(
            waited >= Duration::from_secs(1),
            "{name}: retried after {waited:?}, before the advertised second"
        );
    }
}

fn guarded_reqwest(settings: GuardedClientBuilder) -> ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(GuardMiddleware::new(settings).unwrap())
        .build()
}

#[tokio::test]
async fn an_in_memory_body_is_sent_again_intact_on_retry() {
    let up = Upstream::start(Behavior::Ok).await.unwrap();
    up.set_for(Behavior::Status(503), 1, Behavior::Ok);
    let client = guarded_reqwest(settings());
    let body = vec![7u8; 10_000];
    let res = client
        .put(format!("{}/", up.url()))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let sum = apiguard_suite::upstream::checksum(&body);
    assert_eq!(up.stats().bodies(), vec![(10_000, sum); 2]);
}

#[tokio::test]
async fn a_streaming_body_is_sent_once_and_not_retried() {
    let up = Upstream::start(Behavior::Status(503)).await.unwrap();
    let client = guarded_reqwest(settings().failure_threshold(100));
    let body = reqwest::Body::wrap(Full::new(Bytes::from_static(b"streamed")));
    let res = client
        .put(format!("{}/", up.url()))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(up.requests(), 1);
    // The same request with its body in memory is retried.
    client
        .put(format!("{}/", up.url()))
        .body("in memory")
        .send()
        .await
        .unwrap();
    assert_eq!(up.requests(), 1 + 4);
}

#[tokio::test]
async fn a_post_is_not_retried_unless_it_has_an_idempotency_key() {
    let up = Upstream::start(Behavior::Status(503)).await.unwrap();
    let client = guarded_reqwest(settings().failure_threshold(100));
    let url = format!("{}/", up.url());
    let res = client.post(&url).body("x").send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(up.requests(), 1);
    client
        .post(&url)
        .header("idempotency-key", "k-1")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(up.requests(), 1 + 4);
}

#[tokio::test]
async fn the_response_keeps_its_url_and_a_dead_port_is_a_reqwest_error_inside_retries_exhausted() {
    let up = Upstream::start(Behavior::Ok).await.unwrap();
    let client = guarded_reqwest(settings().max_retries(2));
    let url = format!("{}/path?q=1", up.url());
    let res = client.get(&url).send().await.unwrap();
    assert_eq!(res.url().as_str(), url);

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let err = client
        .get(format!("http://{dead}/"))
        .send()
        .await
        .unwrap_err();
    let reqwest_middleware::Error::Middleware(e) = &err else {
        panic!("not the guard's error: {err:?}");
    };
    let exhausted = e
        .downcast_ref::<RetriesExhausted>()
        .expect("retries ran out");
    assert_eq!(exhausted.attempts(), 3);
    let last = exhausted
        .last_error()
        .downcast_ref::<reqwest_middleware::Error>()
        .expect("the last attempt's error is reqwest's");
    assert!(last.is_connect(), "{last:?}");
}
