//! Loopback HTTP: what the stack costs where users feel it.
//!
//! - `server`: an axum app answering `GET /` with `ok`, bare, behind
//!   apiguard's `server_layer` (per-IP `KeyedRateLimitLayer` under
//!   `RejectionResponseLayer`), and behind `tower_governor`'s per-IP
//!   `GovernorLayer`. Both limiters are set so nothing is refused (a burst
//!   of 10⁹ refilled at 10⁹/s) and key by the peer IP — every connection
//!   comes from 127.0.0.1, so all of them hit one bucket, the contended
//!   case. The load generator is in process: `CONNECTIONS` hyper HTTP/1.1
//!   connections, each sending its next request when the last answer is
//!   read (closed loop).
//! - `client`: `GuardedClient` (retry, per-host breaker and rate limit,
//!   both timeouts) against a bare `hyper_util` legacy client with the same
//!   connector, `CLIENT_TASKS` tasks sharing one client, against a bare
//!   hyper server that answers at once; and the bare client behind tower's
//!   `Timeout` (60 s, `GuardedClient`'s default total timeout), to tell the
//!   cost of a timer per request from the rest of the guard.
//!
//! The side under test gets a runtime with one worker thread and the
//! other side two, so the side under test is the bottleneck (on a 2-core
//! machine, three busy threads share two cores). Each case runs `WARMUP`
//! then `MEASURE` (0.5 s, 2 s); cases are interleaved over `ROUNDS` (5)
//! rounds and the round with the median throughput is kept (a busy machine
//! moves single rounds by tens of percent either way). Throughput is
//! answers per second; p50/p99 are the latency of one request, from
//! sending it to having read its body, over all requests of the kept round
//! (a sorted vector, no histogram needed at this size). Only 127.0.0.1 is
//! ever contacted, and every run stops by itself.
//!
//! Run: `cargo bench -p apiguard-benches --bench http`. Writes
//! `target/apiguard-bench/http.json` for `scripts/bench-table`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use apiguard::GuardedClient;
use apiguard::ratelimit::KeyedLimiter;
use apiguard::ratelimit::extract::PeerIp;
use apiguard::server::server_layer;
use axum::Router;
use axum::routing::get;
use axum::serve::ListenerExt;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::time::Instant;
use tower::ServiceExt;

const CONNECTIONS: usize = 64;
const CLIENT_TASKS: usize = 32;
const WARMUP: Duration = Duration::from_millis(500);
const MEASURE: Duration = Duration::from_secs(2);
const ROUNDS: usize = 5;

struct Outcome {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

fn runtime(workers: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

/// Latencies (ns) of every request, and the run's length, into an outcome.
fn outcome(mut lat: Vec<u64>, spent: Duration) -> Outcome {
    lat.sort_unstable();
    let pct = |p: f64| {
        let i = ((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1));
        lat.get(i).copied().unwrap_or(0) as f64 / 1000.0
    };
    Outcome {
        rps: lat.len() as f64 / spent.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

/// When a task starts counting its requests, and when it stops sending.
#[derive(Clone, Copy)]
struct Window {
    measure_from: Instant,
    end: Instant,
}

impl Window {
    /// Times `send` in a closed loop until the window ends; returns the
    /// latencies (ns) of the requests started after the warm-up.
    async fn run<F: Future<Output = ()>>(self, mut send: impl FnMut() -> F) -> Vec<u64> {
        let mut lat = Vec::with_capacity(1 << 16);
        loop {
            let t0 = Instant::now();
            if t0 >= self.end {
                return lat;
            }
            send().await;
            if t0 >= self.measure_from {
                lat.push(t0.elapsed().as_nanos() as u64);
            }
        }
    }
}

/// Runs `tasks` tasks made by `task` on `rt` for `WARMUP + MEASURE`.
fn drive<F, Fut>(rt: &Runtime, tasks: usize, task: F) -> Outcome
where
    F: Fn(Window) -> Fut,
    Fut: Future<Output = Vec<u64>> + Send + 'static,
{
    rt.block_on(async {
        let start = Instant::now();
        let w = Window {
            measure_from: start + WARMUP,
            end: start + WARMUP + MEASURE,
        };
        let handles: Vec<_> = (0..tasks).map(|_| tokio::spawn(task(w))).collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.unwrap());
        }
        outcome(all, MEASURE)
    })
}

/// One HTTP/1.1 connection to `addr`, sending `GET /` and reading the body,
/// in a closed loop.
async fn connection(addr: SocketAddr, w: Window) -> Vec<u64> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    // The loop of `Window::run`, written out: each request borrows the
    // connection mutably.
    let mut lat = Vec::with_capacity(1 << 16);
    loop {
        let t0 = Instant::now();
        if t0 >= w.end {
            return lat;
        }
        let req = Request::get("/")
            .header("host", "127.0.0.1")
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender.ready().await.unwrap();
        let res = sender.send_request(req).await.unwrap();
        assert!(res.status().is_success(), "status {}", res.status());
        res.into_body().collect().await.unwrap();
        if t0 >= w.measure_from {
            lat.push(t0.elapsed().as_nanos() as u64);
        }
    }
}

/// Serves `app` on 127.0.0.1 from `rt`; returns its address.
fn serve_axum(rt: &Runtime, app: Router) -> SocketAddr {
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .unwrap();
        });
        addr
    })
}

fn app() -> Router {
    Router::new().route("/", get(|| async { "ok" }))
}

fn servers() -> Vec<(&'static str, Router)> {
    let ours = KeyedLimiter::from_rate(support::BURST, support::BURST as f64)
        .unwrap()
        .with_max_keys(100_000);
    let governor = tower_governor::governor::GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(support::BURST)
        .finish()
        .unwrap();
    vec![
        ("bare axum", app()),
        (
            "axum + apiguard server_layer",
            app().layer(server_layer(ours, PeerIp)),
        ),
        (
            "axum + tower_governor",
            app().layer(tower_governor::GovernorLayer::new(governor)),
        ),
    ]
}

struct Row {
    section: &'static str,
    setup: String,
    name: &'static str,
    best: Outcome,
}

/// The round with the median throughput.
fn median(mut rounds: Vec<Outcome>) -> Outcome {
    rounds.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    rounds.swap_remove(rounds.len() / 2)
}

fn print(section: &str, round: usize, name: &str, o: &Outcome) {
    println!(
        "{section} round {round} {name:<32} {:>9.0} req/s  p50 {:>6.0} µs  p99 {:>6.0} µs",
        o.rps, o.p50_us, o.p99_us
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects a section.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wants = |s: &str| filter.as_deref().is_none_or(|f| s.contains(f));
    let mut rows = Vec::new();

    if wants("server") {
        // The server under test gets one worker, the load generator two, so
        // the server is the bottleneck and its overhead shows.
        let server_rt = runtime(1);
        let load_rt = runtime(2);
        let addrs: Vec<_> = servers()
            .into_iter()
            .map(|(name, app)| (name, serve_axum(&server_rt, app)))
            .collect();
        let mut runs: Vec<Vec<Outcome>> = addrs.iter().map(|_| Vec::new()).collect();
        for round in 0..ROUNDS {
            for (i, (name, addr)) in addrs.iter().enumerate() {
                let addr = *addr;
                let o = drive(&load_rt, CONNECTIONS, |w| connection(addr, w));
                print("server", round, name, &o);
                runs[i].push(o);
            }
        }
        for ((name, _), r) in addrs.into_iter().zip(runs) {
            rows.push(Row {
                section: "server",
                setup: format!(
                    "{CONNECTIONS} keep-alive connections, GET / → \"ok\", server on 1 worker, load on 2"
                ),
                name,
                best: median(r),
            });
        }
    }

    if wants("client") {
        // The client under test gets one worker, the server two.
        let server_rt = runtime(2);
        let client_rt = runtime(1);
        let addr = support::serve_hyper(&server_rt);
        let base = format!("http://{addr}");
        let uri: http::Uri = format!("{base}/").parse().unwrap();
        let bare = client_rt
            .block_on(async { Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>() });
        let guarded = client_rt.block_on(async {
            GuardedClient::builder()
                .base_url(base.clone())
                .rate_limit(apiguard::Quota::from_rate(
                    support::BURST,
                    support::BURST as f64,
                ))
                .build()
                .unwrap()
        });
        let mut runs: [Vec<Outcome>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        for round in 0..ROUNDS {
            let o = drive(&client_rt, CLIENT_TASKS, |w| {
                let client = bare.clone();
                let uri = uri.clone();
                async move {
                    w.run(|| {
                        let mut req = Request::new(Full::new(Bytes::new()));
                        *req.uri_mut() = uri.clone();
                        let res = client.request(req);
                        async move {
                            res.await.unwrap().into_body().collect().await.unwrap();
                        }
                    })
                    .await
                }
            });
            print("client", round, "hyper_util client", &o);
            runs[0].push(o);
            let o = drive(&client_rt, CLIENT_TASKS, |w| {
                let client = guarded.clone();
                async move {
                    w.run(|| async {
                        let res = client.get("/").await.unwrap();
                        res.into_body().collect().await.unwrap();
                    })
                    .await
                }
            });
            print("client", round, "GuardedClient", &o);
            runs[1].push(o);
            let o = drive(&client_rt, CLIENT_TASKS, |w| {
                let client = tower::timeout::Timeout::new(bare.clone(), Duration::from_secs(60));
                let uri = uri.clone();
                async move {
                    w.run(|| {
                        let mut req = Request::new(Full::new(Bytes::new()));
                        *req.uri_mut() = uri.clone();
                        let res = client.clone().oneshot(req);
                        async move {
                            res.await.unwrap().into_body().collect().await.unwrap();
                        }
                    })
                    .await
                }
            });
            print("client", round, "hyper_util client + tower Timeout", &o);
            runs[2].push(o);
        }
        let setup =
            format!("{CLIENT_TASKS} tasks sharing one client on 1 worker, bare hyper server on 2");
        let [a, b, c] = runs;
        rows.push(Row {
            section: "client",
            setup: setup.clone(),
            name: "hyper_util client",
            best: median(a),
        });
        rows.push(Row {
            section: "client",
            setup: setup.clone(),
            name: "GuardedClient",
            best: median(b),
        });
        rows.push(Row {
            section: "client",
            setup,
            name: "hyper_util client + tower Timeout",
            best: median(c),
        });
    }

    let json = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"section\":{:?},\"setup\":{:?},\"name\":{:?},\"rps\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1}}}",
                r.section, r.setup, r.name, r.best.rps, r.best.p50_us, r.best.p99_us
            )
        })
        .collect::<Vec<_>>()
        .join(",\n  ");
    if !rows.is_empty() {
        support::write_result("http.json", &format!("{{\"rows\":[\n  {json}\n]}}\n"));
    }
}
