//! The server side of the load run (`scripts/load`): the axum server stack
//! (`server_layer` with a `KeyedLimiter` keyed by `X-Forwarded-For`) that
//! counts its answers and prints, once a second, its resident memory, the
//! keys it tracks and the responses by status.
//!
//! ```text
//! cargo run --release --example load -- --addr 127.0.0.1:8089 \
//!     --capacity 10 --refill 1 --max-keys 100000 --seconds 45
//! ```
//!
//! Each line it prints is `t=… rss_kb=… keys=… ok=… limited=… other=…`, so
//! a script can read it; it exits after `--seconds`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use apiguard::BoxError;
use apiguard::ratelimit::KeyedLimiter;
use apiguard::ratelimit::extract::ForwardedFor;
use apiguard::server::server_layer;
use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use clap::Parser;

/// A rate-limited axum server that reports what it did.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    addr: SocketAddr,
    /// Requests a client may make at once.
    #[arg(long, default_value_t = 10)]
    capacity: u32,
    /// Requests per second a client may make after that.
    #[arg(long, default_value_t = 1.0)]
    refill: f64,
    /// Most client keys tracked at once.
    #[arg(long, default_value_t = 100_000)]
    max_keys: usize,
    /// How long to serve before exiting.
    #[arg(long, default_value_t = 45)]
    seconds: u64,
}

#[derive(Debug, Default)]
struct Counts {
    ok: AtomicU64,
    limited: AtomicU64,
    other: AtomicU64,
}

async fn count(counts: Arc<Counts>, req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let counter = match res.status().as_u16() {
        200 => &counts.ok,
        429 => &counts.limited,
        _ => &counts.other,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    res
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let limiter = KeyedLimiter::from_rate(args.capacity, args.refill)?.with_max_keys(args.max_keys);
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    let app = Router::new()
        .route("/", get(|| async { "ok\n" }))
        // One trusted proxy (the load generator plays it).
        .layer(server_layer(
            limiter.clone(),
            ForwardedFor::x_forwarded_for(1),
        ))
        .layer(middleware::from_fn(move |req, next| {
            count(c.clone(), req, next)
        }));
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    println!(
        "listening on {} capacity={} refill={} max_keys={}",
        args.addr, args.capacity, args.refill, args.max_keys
    );
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    );
    let report = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        for t in 0..=args.seconds {
            tick.tick().await;
            let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
            println!(
                "t={t} rss_kb={} keys={} ok={} limited={} other={}",
                rss_kb(),
                limiter.len(),
                l(&counts.ok),
                l(&counts.limited),
                l(&counts.other),
            );
        }
    };
    tokio::select! {
        r = server => r?,
        () = report => {}
    }
    Ok(())
}
