//! The rate-limit demo: a local server that answers `429` past its quota,
//! a client that waits for tokens, and one that does not.
//!
//! ```text
//! cargo run --release --example ratelimit [-- --requests 30 --burst 5 --rate 10]
//! ```
//!
//! The server is axum with `KeyedRateLimitLayer` (one bucket per
//! `x-client-id`, refusing at once) under `RejectionResponseLayer` (refusal →
//! `429` with `Retry-After` and the `RateLimit` fields). Two clients send the
//! same number of requests at once:
//!
//! - *patient* goes through `RateLimitLayer` with a bucket one token smaller
//!   than the server's, so it waits for its turn and is never refused (the
//!   spare token absorbs network jitter);
//! - *naive* just sends: the server admits its burst and refuses the rest.
//!
//! Needs nothing outside the process; exits 0 after a few seconds.

use std::time::Duration;

use apiguard_core::RejectionResponseLayer;
use apiguard_core::headers::{RATELIMIT, RATELIMIT_POLICY};
use apiguard_ratelimit::{
    HeaderKey, KeyedLimiter, KeyedRateLimitLayer, RateLimitLayer, TokenBucket,
};
use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use clap::Parser;
use http::header::{HeaderName, RETRY_AFTER};
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

#[derive(Parser, Debug)]
#[command(about = "apiguard rate limiting: a waiting client and a naive one against a 429 server")]
struct Args {
    /// Requests each client sends, all at once.
    #[arg(long, default_value_t = 30)]
    requests: usize,
    /// The server's burst per client.
    #[arg(long, default_value_t = 5)]
    burst: u32,
    /// The server's refill rate per client, requests per second.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
}

#[derive(Default)]
struct Tally {
    ok: usize,
    limited: usize,
    other: usize,
    sample_429: Option<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args = Args::parse();
    if args.burst < 2 {
        return Err("--burst must be at least 2 (the patient client keeps one token spare)".into());
    }

    // The server: one bucket per client id, refusals become 429.
    let limiter = KeyedLimiter::from_rate(args.burst, args.rate)?.with_max_keys(10_000);
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        ServiceBuilder::new()
            .layer(RejectionResponseLayer::new())
            .layer(KeyedRateLimitLayer::new(
                limiter,
                HeaderKey::new(HeaderName::from_static("x-client-id")),
            )),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    println!("apiguard rate-limit demo");
    println!(
        "server  http://{addr}/  {} requests at once, then {}/s per client (429 beyond)",
        args.burst, args.rate
    );
    println!();

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let request = move |id: &'static str| {
        Request::get(format!("http://{addr}/"))
            .header("x-client-id", id)
            .body(Empty::new())
            .expect("valid request")
    };

    // The patient client waits on its own bucket before each request.
    let bucket = TokenBucket::from_rate(args.burst - 1, args.rate)?;
    let patient_svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(bucket))
        .service(client.clone());
    let patient = {
        let n = args.requests;
        tokio::spawn(async move {
            let start = Instant::now();
            let sends: Vec<_> = (0..n)
                .map(|_| tokio::spawn(patient_svc.clone().oneshot(request("patient"))))
                .collect();
            let mut tally = Tally::default();
            for send in sends {
                match send.await.expect("task").map(|r| r.status()) {
                    Ok(status) => record(&mut tally, status, None),
                    Err(_) => tally.other += 1,
                }
            }
            (tally, start.elapsed())
        })
    };

    // The naive client sends everything at once.
    let naive = {
        let n = args.requests;
        tokio::spawn(async move {
            let start = Instant::now();
            let sends: Vec<_> = (0..n)
                .map(|_| {
                    let client = client.clone();
                    tokio::spawn(async move { client.request(request("naive")).await })
                })
                .collect();
            let mut tally = Tally::default();
            for send in sends {
                match send.await.expect("task") {
                    Ok(res) => {
                        let headers = describe_429(res.headers());
                        record(&mut tally, res.status(), Some(headers));
                    }
                    Err(_) => tally.other += 1,
                }
            }
            (tally, start.elapsed())
        })
    };

    let (patient, patient_time) = patient.await?;
    let (naive, naive_time) = naive.await?;

    println!(
        "{:<34} {:>5} {:>5} {:>5} {:>6} {:>8}",
        "client", "sent", "200", "429", "failed", "time"
    );
    for (name, t, time) in [
        ("patient (RateLimitLayer, waits)", &patient, patient_time),
        ("naive (no limiter)", &naive, naive_time),
    ] {
        println!(
            "{:<34} {:>5} {:>5} {:>5} {:>6} {:>7.2}s",
            name,
            args.requests,
            t.ok,
            t.limited,
            t.other,
            time.as_secs_f64()
        );
    }
    println!();
    if let Some(sample) = &naive.sample_429 {
        println!("a 429 the naive client got: {sample}");
    }
    let expected = Duration::from_secs_f64(
        args.requests.saturating_sub(args.burst as usize - 1) as f64 / args.rate,
    );
    println!(
        "the patient client spread its requests over {:.2}s (rate-limited schedule: {:.2}s) and was refused {} times",
        patient_time.as_secs_f64(),
        expected.as_secs_f64(),
        patient.limited
    );
    Ok(())
}

fn record(tally: &mut Tally, status: StatusCode, headers: Option<String>) {
    match status {
        StatusCode::OK => tally.ok += 1,
        StatusCode::TOO_MANY_REQUESTS => {
            tally.limited += 1;
            if tally.sample_429.is_none() {
                tally.sample_429 = headers;
            }
        }
        _ => tally.other += 1,
    }
}

fn describe_429(headers: &http::HeaderMap) -> String {
    let show = |name: &http::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    format!(
        "Retry-After: {}, RateLimit-Policy: {}, RateLimit: {}",
        show(&RETRY_AFTER),
        show(&RATELIMIT_POLICY),
        show(&RATELIMIT)
    )
}
