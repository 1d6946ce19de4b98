//! What `apiguard-reqwest` adds to a reqwest client, on loopback.
//!
//! One hyper server answers `GET /` with `ok` at once (its own runtime,
//! two workers). The same `reqwest::Client` sends the requests three ways:
//!
//! - `bare_reqwest`: `client.get(url).send()` and read the body;
//! - `empty_middleware`: through a `reqwest_middleware::ClientWithMiddleware`
//!   with no middleware, what the middleware convention itself costs;
//! - `guard_middleware`: through `GuardMiddleware` with the settings a user
//!   would start from: the default `GuardedClient` settings (retry with its
//!   budget, a per-host breaker, both timeouts) plus a per-host rate limit
//!   that never refuses (a burst of 10⁹ refilled at 10⁹/s), so every part
//!   of the guard is on the path and nothing but its cost is measured.
//!
//! Groups: `reqwest_sequential` (one request after the other, the latency a
//! single caller pays) and `reqwest_concurrent` (`TASKS` tasks sharing the
//! client, `iters` requests in all). The client runs on a current-thread
//! runtime. The figure worth reading is the ratio `guard_middleware /
//! bare_reqwest` (printed by `scripts/bench-table`): loopback round trips
//! move by tens of percent with the machine's load, their ratio far less.
//!
//! Run: `cargo bench -p apiguard-benches --bench reqwest`.

use std::time::Duration;

use apiguard::{GuardedClient, Quota};
use apiguard_reqwest::GuardMiddleware;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use reqwest_middleware::ClientWithMiddleware;
use tokio::time::Instant;

mod support;

use support::serve_hyper;

/// Concurrent tasks in `reqwest_concurrent`.
const TASKS: u64 = 16;

/// The three ways to send the same request.
#[derive(Clone)]
enum Contender {
    Bare(reqwest::Client),
    Middleware(ClientWithMiddleware),
}

impl Contender {
    async fn get(&self, url: &str) {
        let res = match self {
            Contender::Bare(c) => c.get(url).send().await.unwrap(),
            Contender::Middleware(c) => c.get(url).send().await.unwrap(),
        };
        assert!(res.status().is_success());
        let body = res.bytes().await.unwrap();
        assert_eq!(&body[..], b"ok");
    }
}

fn contenders(client: &reqwest::Client) -> Vec<(&'static str, Contender)> {
    let settings = GuardedClient::builder().rate_limit(Quota::from_rate(1_000_000_000, 1e9));
    let guard = GuardMiddleware::new(settings).unwrap();
    vec![
        ("bare_reqwest", Contender::Bare(client.clone())),
        (
            "empty_middleware",
            Contender::Middleware(reqwest_middleware::ClientBuilder::new(client.clone()).build()),
        ),
        (
            "guard_middleware",
            Contender::Middleware(
                reqwest_middleware::ClientBuilder::new(client.clone())
                    .with(guard)
                    .build(),
            ),
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("http://{}/", serve_hyper(&server_rt));
    let client = rt.block_on(async { reqwest::Client::builder().build().unwrap() });
    let contenders = rt.block_on(async { contenders(&client) });

    let mut g = c.benchmark_group("reqwest_sequential");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    for (name, who) in &contenders {
        g.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        who.get(&url).await;
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("reqwest_concurrent");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    for (name, who) in &contenders {
        g.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    let mut set = tokio::task::JoinSet::new();
                    for t in 0..TASKS {
                        // `iters` requests in all, spread over the tasks.
                        let n = iters / TASKS + u64::from(t < iters % TASKS);
                        let (who, url) = (who.clone(), url.clone());
                        set.spawn(async move {
                            for _ in 0..n {
                                who.get(&url).await;
                            }
                        });
                    }
                    while let Some(r) = set.join_next().await {
                        r.unwrap();
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
