//! Allocations per request: each layer alone, the composed stack, and the
//! alternatives, counted by a global allocator that counts only while a
//! measured loop runs on this thread.
//!
//! Targets: the rate limit and breaker layers allocate nothing per request;
//! the stack allocates nothing beyond the copy of the request that retry
//! keeps for a second attempt (`request copy for retry`).
//!
//! Each case makes 1 000 warm-up calls (buckets, breakers and budget slots
//! exist by then), then counts 10 000 calls whose requests were built
//! before counting started. Two requests: `empty` (static URI, no header:
//! its copy allocates nothing) and `typical` (parsed URI, four headers, a
//! 1 KiB body: its copy allocates the header map).
//!
//! To find out which allocation and where, run the binary under
//! `valgrind --tool=dhat` (or `heaptrack`): the sites with 10 000-odd
//! allocations are the per-request ones.
//!
//! Run: `cargo bench -p apiguard-benches --bench alloc`. Writes
//! `target/apiguard-bench/alloc.json` for `scripts/bench-table`.

mod support;

use std::alloc::System;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use support::{Noop, Req, Res, one};
use tower::retry::Policy;
use tower::{Layer, Service};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const WARMUP: usize = 1_000;
const CALLS: usize = 10_000;

struct Row {
    name: String,
    allocs: f64,
    bytes: f64,
}

/// Counts what `f` allocates while it handles each of `inputs` (every
/// thread counts, and this process runs only this one meanwhile).
fn count<T>(inputs: Vec<T>, mut f: impl FnMut(T)) -> (f64, f64) {
    let n = inputs.len() as f64;
    let region = Region::new(GLOBAL);
    for x in inputs {
        f(x);
    }
    let stats = region.change();
    let allocs = (stats.allocations + stats.reallocations) as f64 / n;
    let bytes = (stats.bytes_allocated + stats.bytes_reallocated.max(0) as usize) as f64 / n;
    (allocs, bytes)
}

fn empty() -> Req {
    support::request()
}

fn typical() -> Req {
    Request::post("http://api.example.com/v1/orders?page=2")
        .header("user-agent", "apiguard-bench/0.1")
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("idempotency-key", "5b1c7e0e-8c1f-4c52-9d8e-0f1a2b3c4d5e")
        .body(Full::new(Bytes::from(vec![b'x'; 1024])))
        .unwrap()
}

fn case<S>(rows: &mut Vec<Row>, name: &str, mut svc: S, make: fn() -> Req)
where
    S: Service<Req, Response = Res>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..WARMUP {
        one(&mut svc, make());
    }
    let reqs: Vec<Req> = (0..CALLS).map(|_| make()).collect();
    let (allocs, bytes) = count(reqs, |r| one(&mut svc, r));
    push(rows, name, allocs, bytes);
}

fn push(rows: &mut Vec<Row>, name: &str, allocs: f64, bytes: f64) {
    println!("{name:<50} {allocs:>6.2} allocs/request {bytes:>8.0} bytes/request");
    rows.push(Row {
        name: name.to_owned(),
        allocs,
        bytes,
    });
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // we need: either way, run once.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut rows = Vec::new();

    for (label, make) in [("empty", empty as fn() -> Req), ("typical", typical)] {
        println!("-- {label} request");
        let suffix = |s: &str| {
            if label == "empty" {
                s.to_owned()
            } else {
                format!("{s} [{label} request]")
            }
        };
        let mut policy = apiguard::RetryPolicy::builder().build().unwrap();
        let reqs: Vec<Req> = (0..CALLS).map(|_| make()).collect();
        let (a, b) = count(reqs, |r| {
            let copy =
                <apiguard::RetryPolicy as Policy<Req, Res, apiguard::BoxError>>::clone_request(
                    &mut policy,
                    &r,
                );
            std::hint::black_box((copy, r));
        });
        push(&mut rows, &suffix("request copy for retry"), a, b);
        case(&mut rows, &suffix("bare"), Noop, make);
        if label == "empty" {
            case(
                &mut rows,
                "apiguard RateLimitLayer",
                support::plain_rate_limit().layer(Noop),
                make,
            );
            case(
                &mut rows,
                "apiguard CircuitBreakerLayer",
                support::plain_breaker().layer(Noop),
                make,
            );
            case(
                &mut rows,
                "apiguard RetryLayer",
                support::plain_retry().layer(Noop),
                make,
            );
        }
        let l = support::guard_rate_limit_only().layer(Noop);
        case(
            &mut rows,
            &suffix("apiguard rate limit (per host)"),
            l,
            make,
        );
        let l = support::guard_breaker_only().layer(Noop);
        case(&mut rows, &suffix("apiguard breaker (per host)"), l, make);
        let l = support::guard_retry_only().layer(Noop);
        case(&mut rows, &suffix("apiguard retry (GuardLayer)"), l, make);
        case(
            &mut rows,
            &suffix("apiguard GuardLayer"),
            support::guard().layer(Noop),
            make,
        );
        let l = support::guard_with_timeouts().layer(Noop);
        case(
            &mut rows,
            &suffix("apiguard GuardLayer + timeouts"),
            l,
            make,
        );
        case(
            &mut rows,
            &suffix("tower RateLimit + Retry"),
            support::tower_stack(Noop),
            make,
        );

        let mut tr = support::tower_resilience_stack();
        for _ in 0..WARMUP {
            one(&mut tr, Arc::new(make()));
        }
        let reqs: Vec<Arc<Req>> = (0..CALLS).map(|_| Arc::new(make())).collect();
        let (a, b) = count(reqs, |r| one(&mut tr, r));
        push(&mut rows, &suffix("tower-resilience stack"), a, b);
    }

    let json = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"name\":{:?},\"allocs\":{},\"bytes\":{}}}",
                r.name, r.allocs, r.bytes
            )
        })
        .collect::<Vec<_>>()
        .join(",\n  ");
    support::write_result("alloc.json", &format!("{{\"rows\":[\n  {json}\n]}}\n"));
}
