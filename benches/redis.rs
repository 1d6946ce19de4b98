//! Shared rate limiting on Redis: what one decision costs, against the
//! plainest shared limiter there is (a fixed window: `INCR` + `EXPIRE NX` in
//! one pipelined round trip) and against a bare `PING` (the round trip
//! itself), all on the same loopback redis-server in the same run.
//!
//! `baseline_minimal_lua_gcra` is the plainest GCRA script (see
//! [`MINIMAL_GCRA_LUA`]): the like-for-like contender, since a fixed window
//! is a different (and coarser) limit.
//!
//! - `redis_sequential`: one connection, one decision at a time — the
//!   latency of a decision (time per element) and decisions/s.
//! - `redis_concurrent`: 32 decisions in flight on one multiplexed
//!   connection (what many request tasks sharing a limiter do) — throughput.
//!
//! - `redis_overhead`: what our decision adds around the round trip (the
//!   boxed call and the armed timeout), without the network.
//!
//! `apiguard_gcra_lease8` is the same limiter leasing 8 extra tokens per
//! round trip (`RedisLimiterBuilder::lease`), for one hot key.
//!
//! The bench starts its own `redis-server` on a free loopback port and
//! skips, with a message, when the binary is not on `PATH`.
//!
//! Run: `cargo bench -p apiguard-benches --bench redis`

use std::future::Future;
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use apiguard_redis::{DecidedBy, FailurePolicy, Quota, RedisLimiter};
use criterion::{Criterion, Throughput};
use redis::aio::ConnectionManager;
use tokio::runtime::Runtime;
use tokio::time::Instant;

const IN_FLIGHT: usize = 32;

/// Decisions that fell to the failure policy: any makes the figures suspect.
static FALLBACKS: AtomicU64 = AtomicU64::new(0);

async fn decide(l: &RedisLimiter) {
    let d = l.decide("k", 1, Duration::ZERO).await;
    if !matches!(d.decided_by, DecidedBy::Redis | DecidedBy::Lease) {
        FALLBACKS.fetch_add(1, Ordering::Relaxed);
    }
    black_box(d);
}

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let server = Self { child, port };
        for _ in 0..500 {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() {
                    return Some(server);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The baseline: a fixed window of 60 s, counted with `INCR`, its expiry
/// set by the first request of the window. Admits while the count is under
/// `limit`.
async fn fixed_window(mut con: ConnectionManager, key: &str, limit: u64) -> bool {
    let key = format!("fw:{key}");
    let (count,): (u64,) = redis::pipe()
        .cmd("INCR")
        .arg(&key)
        .cmd("EXPIRE")
        .arg(&key)
        .arg(60)
        .arg("NX")
        .ignore()
        .query_async(&mut con)
        .await
        .expect("INCR");
    count <= limit
}

/// The plainest GCRA a Lua script can do, for a like-for-like row: Redis
/// `TIME`, the stored theoretical arrival time as whole microseconds, one
/// `SET PX`. What ours adds over it: exact tick arithmetic for rates that do
/// not divide a microsecond, waits (reservations), leases, debits and a
/// deadline after which the script leaves the bucket alone.
const MINIMAL_GCRA_LUA: &str = r#"
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > tolerance then return 0 end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return 1
"#;

/// One decision of [`MINIMAL_GCRA_LUA`], at a rate that never refuses.
async fn minimal_gcra(mut con: ConnectionManager, script: &redis::Script) -> bool {
    let allowed: i64 = script
        .key("gcra:k")
        .arg(1)
        .arg(1_000_000_000u64)
        .invoke_async(&mut con)
        .await
        .expect("EVALSHA");
    allowed == 1
}

async fn ping(mut con: ConnectionManager) {
    let () = redis::cmd("PING")
        .query_async::<String>(&mut con)
        .await
        .map(|_| ())
        .expect("PING");
}

/// Drives all of `futs` to completion together on this task.
async fn join_all<F: Future>(futs: impl IntoIterator<Item = F>) {
    let mut futs: Vec<Option<Pin<Box<F>>>> = futs.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut left = futs.len();
    std::future::poll_fn(|cx| {
        for slot in futs.iter_mut() {
            if let Some(f) = slot
                && f.as_mut().poll(cx).is_ready()
            {
                *slot = None;
                left -= 1;
            }
        }
        if left == 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

struct Fixture {
    rt: Runtime,
    admit: RedisLimiter,
    lease: RedisLimiter,
    refuse: RedisLimiter,
    con: ConnectionManager,
    minimal: redis::Script,
}

fn fixture(url: &str) -> Fixture {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (admit, lease, refuse, con) = rt.block_on(async {
        let builder = |limit, window| {
            RedisLimiter::builder(Quota::new(limit, window))
                // Long enough that no decision here falls to the policy.
                .timeout(Duration::from_secs(1))
                .on_redis_failure(FailurePolicy::fail_closed())
        };
        // Never runs out: every decision writes the key.
        let admit = builder(1_000_000_000, Duration::from_secs(1))
            .connect(url)
            .await
            .unwrap();
        // The same limit, leasing 8 tokens per round trip (for 50 ms).
        let lease = builder(1_000_000_000, Duration::from_secs(1))
            .prefix("lease:")
            .lease(8, Duration::from_millis(50))
            .connect(url)
            .await
            .unwrap();
        // One token an hour: after the first, every decision is a refusal
        // (no write).
        let refuse = builder(1, Duration::from_secs(3600))
            .prefix("refuse:")
            .connect(url)
            .await
            .unwrap();
        let con = redis::Client::open(url)
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap();
        assert_eq!(
            admit.decide("k", 1, Duration::ZERO).await.decided_by,
            DecidedBy::Redis
        );
        refuse.decide("k", 1, Duration::ZERO).await;
        let d = refuse.decide("k", 1, Duration::ZERO).await;
        assert!(!d.allowed && d.decided_by == DecidedBy::Redis);
        (admit, lease, refuse, con)
    });
    Fixture {
        rt,
        admit,
        lease,
        refuse,
        con,
        minimal: redis::Script::new(MINIMAL_GCRA_LUA),
    }
}

fn sequential(c: &mut Criterion, f: &Fixture) {
    let mut g = c.benchmark_group("redis_sequential");
    g.throughput(Throughput::Elements(1));
    g.bench_function("apiguard_gcra_admit", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    decide(&f.admit).await;
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("apiguard_gcra_lease8", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    decide(&f.lease).await;
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("apiguard_gcra_refuse", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    decide(&f.refuse).await;
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("baseline_incr_expire", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(fixed_window(f.con.clone(), "k", u64::MAX).await);
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("baseline_minimal_lua_gcra", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(minimal_gcra(f.con.clone(), &f.minimal).await);
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("floor_ping", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    ping(f.con.clone()).await;
                }
                start.elapsed()
            })
        })
    });
    g.finish();
}

fn concurrent(c: &mut Criterion, f: &Fixture) {
    let mut g = c.benchmark_group("redis_concurrent");
    g.throughput(Throughput::Elements(IN_FLIGHT as u64));
    g.bench_function("apiguard_gcra_admit", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    join_all((0..IN_FLIGHT).map(|_| decide(&f.admit))).await;
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("apiguard_gcra_lease8", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    join_all((0..IN_FLIGHT).map(|_| decide(&f.lease))).await;
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("baseline_incr_expire", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    join_all((0..IN_FLIGHT).map(|_| fixed_window(f.con.clone(), "k", u64::MAX)))
                        .await;
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("baseline_minimal_lua_gcra", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    join_all((0..IN_FLIGHT).map(|_| minimal_gcra(f.con.clone(), &f.minimal))).await;
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("floor_ping", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    join_all((0..IN_FLIGHT).map(|_| ping(f.con.clone()))).await;
                }
                start.elapsed()
            })
        })
    });
    g.finish();
}

/// What a decision adds around the round trip, without the network: the
/// boxed call (the `redis` crate's futures borrow the connection, so the
/// call must be boxed to be stored) and the armed timeout timer.
fn overhead(c: &mut Criterion, f: &Fixture) {
    let mut g = c.benchmark_group("redis_overhead");
    g.throughput(Throughput::Elements(1));
    g.bench_function("box_and_timeout_timer", |b| {
        b.iter_custom(|iters| {
            f.rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    let call: Pin<Box<dyn Future<Output = u64> + Send>> =
                        Box::pin(async move { black_box(i) });
                    let timer = tokio::time::sleep(Duration::from_millis(5));
                    let mut timer = std::pin::pin!(timer);
                    // Poll the timer once, as a decision does while waiting.
                    std::future::poll_fn(|cx| {
                        let _ = timer.as_mut().poll(cx);
                        Poll::Ready(())
                    })
                    .await;
                    black_box(call.await);
                }
                start.elapsed()
            })
        })
    });
    g.finish();
}

fn main() {
    let present = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    if !present {
        eprintln!("redis bench skipped: redis-server is not on PATH");
        return;
    }
    let Some(server) = Server::start() else {
        eprintln!("redis bench skipped: redis-server did not start");
        return;
    };
    let f = fixture(&server.url());
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    sequential(&mut c, &f);
    concurrent(&mut c, &f);
    overhead(&mut c, &f);
    c.final_summary();
    let fallbacks = FALLBACKS.load(Ordering::Relaxed);
    if fallbacks > 0 {
        eprintln!("warning: {fallbacks} decisions fell to the failure policy; figures are suspect");
    }
}
