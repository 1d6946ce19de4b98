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
//!   hyper server that answers at once.
//!
//! Server and load generator each get a runtime with one worker thread
//! (this is a 2-core machine; each side gets one). Each case runs
//! `WARMUP` then `MEASURE`; cases are interleaved over `ROUNDS` rounds and
//! the best round is kept (other work on the machine only ever slows a
//! round down). Throughput is answers per second; p50/p99 are the latency
//! of one request, from sending it to having read its body, from all
//! requests of the kept round (a sorted vector, no histogram needed at
//! this size). Only 127.0.0.1 is ever contacted, and every run stops by
//! itself.
//!
//! Run: `cargo bench -p apiguard-benches --bench http`. Writes
//! `target/apiguard-bench/http.json` for `scripts/bench-table`.

mod support;

use std::convert::Infallible;
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
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::time::Instant;

const CONNECTIONS: usize = 64;
const CLIENT_TASKS: usize = 32;
const WARMUP: Duration = Duration::from_millis(500);
const MEASURE: Duration = Duration::from_secs(3);
const ROUNDS: usize = 2;

struct Outcome {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
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

/// Runs `per_task` on `tasks` tasks until `WARMUP + MEASURE` is over; each
/// call is one request; only requests started after the warm-up count.
fn drive<F, Fut>(rt: &Runtime, tasks: usize, per_task: F) -> Outcome
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Box<dyn FnMut() -> ReqFuture + Send>> + Send + 'static,
{
    let setups: Vec<Fut> = (0..tasks).map(&per_task).collect();
    rt.block_on(async move {
        let start = Instant::now();
        let measure_from = start + WARMUP;
        let end = measure_from + MEASURE;
        let handles: Vec<_> = setups
            .into_iter()
            .map(|setup| {
                tokio::spawn(async move {
                    let mut send = setup.await;
                    let mut lat = Vec::with_capacity(1 << 16);
                    loop {
                        let t0 = Instant::now();
                        if t0 >= end {
                            break;
                        }
                        send().await;
                        if t0 >= measure_from {
                            lat.push(t0.elapsed().as_nanos() as u64);
                        }
                    }
                    lat
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.unwrap());
        }
        outcome(all, MEASURE)
    })
}

type ReqFuture = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// One HTTP/1.1 connection to `addr`, sending `GET /` and reading the body.
async fn connection(addr: SocketAddr) -> Box<dyn FnMut() -> ReqFuture + Send> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let sender = std::sync::Arc::new(tokio::sync::Mutex::new(sender));
    Box::new(move || {
        let sender = sender.clone();
        Box::pin(async move {
            let mut s = sender.lock().await;
            s.ready().await.unwrap();
            let req = Request::get("/")
                .header("host", "127.0.0.1")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let res = s.send_request(req).await.unwrap();
            assert!(res.status().is_success(), "status {}", res.status());
            res.into_body().collect().await.unwrap();
        })
    })
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
    let ours = KeyedLimiter::new(support::BURST, support::BURST as f64)
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

/// A hyper server answering `ok` at once, for the client cases.
fn serve_hyper(rt: &Runtime) -> SocketAddr {
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                stream.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    })
}

struct Row {
    section: &'static str,
    setup: String,
    name: &'static str,
    best: Outcome,
}

fn keep_best(slot: &mut Option<Outcome>, o: Outcome) {
    if slot.as_ref().is_none_or(|b| o.rps > b.rps) {
        *slot = Some(o);
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects a section.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wants = |s: &str| filter.as_deref().is_none_or(|f| s.contains(f));
    let server_rt = runtime();
    let client_rt = runtime();
    let mut rows = Vec::new();

    if wants("server") {
        let addrs: Vec<_> = servers()
            .into_iter()
            .map(|(name, app)| (name, serve_axum(&server_rt, app)))
            .collect();
        let mut best: Vec<Option<Outcome>> = addrs.iter().map(|_| None).collect();
        for round in 0..ROUNDS {
            for (i, (name, addr)) in addrs.iter().enumerate() {
                let addr = *addr;
                let o = drive(&client_rt, CONNECTIONS, |_| connection(addr));
                println!(
                    "server round {round} {name:<32} {:>9.0} req/s  p50 {:>6.0} µs  p99 {:>6.0} µs",
                    o.rps, o.p50_us, o.p99_us
                );
                keep_best(&mut best[i], o);
            }
        }
        for ((name, _), b) in addrs.into_iter().zip(best) {
            rows.push(Row {
                section: "server",
                setup: format!("{CONNECTIONS} keep-alive connections, GET / → \"ok\""),
                name,
                best: b.unwrap(),
            });
        }
    }

    if wants("client") {
        let addr = serve_hyper(&server_rt);
        let base = format!("http://{addr}");
        let uri: http::Uri = format!("{base}/").parse().unwrap();
        let bare = client_rt
            .block_on(async { Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>() });
        let guarded = client_rt.block_on(async {
            GuardedClient::builder()
                .base_url(base.clone())
                .rate_limit(support::BURST, support::BURST as f64)
                .build()
                .unwrap()
        });
        let mut best: [Option<Outcome>; 2] = [None, None];
        for round in 0..ROUNDS {
            let o = drive(&client_rt, CLIENT_TASKS, |_| {
                let client = bare.clone();
                let uri = uri.clone();
                async move {
                    Box::new(move || {
                        let client = client.clone();
                        let mut req = Request::new(Full::new(Bytes::new()));
                        *req.uri_mut() = uri.clone();
                        Box::pin(async move {
                            let res = client.request(req).await.unwrap();
                            res.into_body().collect().await.unwrap();
                        }) as ReqFuture
                    }) as Box<dyn FnMut() -> ReqFuture + Send>
                }
            });
            println!(
                "client round {round} {:<32} {:>9.0} req/s  p50 {:>6.0} µs  p99 {:>6.0} µs",
                "hyper_util client", o.rps, o.p50_us, o.p99_us
            );
            keep_best(&mut best[0], o);
            let o = drive(&client_rt, CLIENT_TASKS, |_| {
                let client = guarded.clone();
                async move {
                    Box::new(move || {
                        let client = client.clone();
                        Box::pin(async move {
                            let res = client.get("/").await.unwrap();
                            res.into_body().collect().await.unwrap();
                        }) as ReqFuture
                    }) as Box<dyn FnMut() -> ReqFuture + Send>
                }
            });
            println!(
                "client round {round} {:<32} {:>9.0} req/s  p50 {:>6.0} µs  p99 {:>6.0} µs",
                "GuardedClient", o.rps, o.p50_us, o.p99_us
            );
            keep_best(&mut best[1], o);
        }
        let setup = format!("{CLIENT_TASKS} tasks sharing one client, bare hyper server");
        let [a, b] = best;
        rows.push(Row {
            section: "client",
            setup: setup.clone(),
            name: "hyper_util client",
            best: a.unwrap(),
        });
        rows.push(Row {
            section: "client",
            setup,
            name: "GuardedClient",
            best: b.unwrap(),
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
    drop(server_rt);
}
