//! The composed stack on its success path: what a request that succeeds at
//! once pays for passing `GuardLayer` (retry → per-host breaker → per-host
//! rate limit), next to its parts alone, tower's own `RateLimit` + `Retry`,
//! and tower-resilience's rate limiter + circuit breaker + retry stacked in
//! the same order — all around the same no-op service.
//!
//! Groups, one question each:
//! - `stack`: one call (`ready` + `call` + the response) from one task,
//!   polled in place with a no-op waker. `bare` is the no-op service alone;
//!   every contender builds its request inside the loop, so subtract `bare`
//!   (or `bare_arc` for tower-resilience, whose request is an
//!   `Arc<Request<_>>`) to get a layer's overhead.
//!   `apiguard_{rate_limit,breaker,retry}` are the stack's parts one at a
//!   time, built by `GuardLayer` itself (per-host, with the same wrappers),
//!   so their overheads add up to what the stack should cost;
//!   `plain_*` are the pattern crates' unkeyed layers, and
//!   `apiguard_stack_global` is `GuardLayer` with `per_host(false)` (one
//!   breaker and one bucket for all hosts, like tower-resilience's).
//! - `stack_tasks`: the same calls from 1, 2 and 8 tokio tasks on a
//!   multi-threaded runtime with one worker per core, each task on its own
//!   clone of the service (clones share one limiter, one breaker registry,
//!   one budget). One iteration is one call per task; criterion's
//!   throughput is calls per second for the whole runtime. On a machine
//!   with `c` cores, per-core time is `time × min(tasks, c) / tasks`; equal
//!   per-core times at 1 and 8 tasks mean no hidden lock. In the plain
//!   cases every task calls the same host, so every call writes that
//!   host's bucket (or its breaker's reference count): a cache line the
//!   cores must pass around, by design of a shared limit. The `*_hosts`
//!   cases give each task a host of its own, so that nothing but a hidden
//!   lock or a shared counter could make them slow down.
//!
//! tower's `RateLimit` is not `Clone` and keeps its limit per instance, so
//! it is not in `stack_tasks`.
//!
//! - `paired` (printed first, written to
//!   `target/apiguard-bench/stack_paired.json`): the one-third target again,
//!   with `bare`, `apiguard_stack`, `bare_arc` and `tower_resilience_stack`
//!   run in short turns over 21 rounds and the median round's ratio of
//!   overheads kept, so that a drift of the machine's speed between
//!   criterion's cases cannot decide it. Then the same for `stack_tasks`
//!   (`stack_tasks_paired.json`): per round, each case's per-core time at
//!   8 tasks over 1 task, alone and over `bare`'s in that round.
//!
//! Run: `cargo bench -p apiguard-benches --bench stack`
//! (`APIGUARD_FUTURE_SIZES=1` prints the response futures' sizes instead).

mod support;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use support::{Noop, NoopArc, one, request};
use tower::{Layer, Service, ServiceExt};

fn configure(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30);
}

fn single_task(c: &mut Criterion) {
    // tower's RateLimit and the timeouts hold tokio `Sleep`s.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("stack");
    configure(&mut g);
    g.throughput(Throughput::Elements(1));

    g.bench_function("bare", |b| {
        let mut svc = Noop;
        b.iter(|| one(&mut svc, request()))
    });
    g.bench_function("apiguard_stack", |b| {
        let mut svc = support::guard().layer(Noop);
        b.iter(|| one(&mut svc, request()))
    });
    g.bench_function("apiguard_stack_global", |b| {
        let mut svc = support::guard_global().layer(Noop);
        b.iter(|| one(&mut svc, request()))
    });
    g.bench_function("apiguard_stack_timeouts", |b| {
        let mut svc = support::guard_with_timeouts().layer(Noop);
        b.iter(|| one(&mut svc, request()))
    });
    g.bench_function("apiguard_rate_limit", |b| {
        let mut svc = support::guard_rate_limit_only().layer(Noop);
        b.iter(|| one(&mut svc, request()))
    });
    g.bench_function("apiguard_breaker", |b| {
        let mut svc = support::guard_breaker_only().layer(Noop);
        b.iter(|| one(&mut svc, request()))
    });
    g.bench_function("apiguard_retry", |b| {
        let mut svc = support::guard_retry_only().layer(Noop);
        b.iter(|| one(&mut svc, request()))
    });
    g.bench_function("plain_rate_limit", |b| {
        let mut svc = support::plain_rate_limit().layer(Noop);
        b.iter(|| one(&mut svc, request()))
    });
    g.bench_function("plain_breaker", |b| {
        let mut svc = support::plain_breaker().layer(Noop);
        b.iter(|| one(&mut svc, request()))
    });
    g.bench_function("plain_retry", |b| {
        let mut svc = support::plain_retry().layer(Noop);
        b.iter(|| one(&mut svc, request()))
    });
    g.bench_function("tower_stack", |b| {
        let mut svc = support::tower_stack(Noop);
        b.iter(|| one(&mut svc, request()))
    });
    g.bench_function("bare_arc", |b| {
        let mut svc = NoopArc;
        b.iter(|| one(&mut svc, Arc::new(request())))
    });
    g.bench_function("tower_resilience_stack", |b| {
        let mut svc = support::tower_resilience_stack();
        b.iter(|| one(&mut svc, Arc::new(request())))
    });
    g.finish();
}

/// `STACK_COUNT=<case>` makes exactly 1 000 000 calls of one case of the
/// `stack` group and exits, so that `valgrind --tool=callgrind` counts what
/// a call executes (instructions repeat on a busy machine; times do not).
/// Cases: `bare`, `apiguard_stack`, `apiguard_stack_global`, `bare_arc`,
/// `tower_resilience_stack`. A case's total minus its bare case's, divided
/// by 1 000 000, is its overhead per call.
fn count(who: &str) {
    const N: u32 = 1_000_000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    match who {
        "bare" => (0..N).for_each(|_| one(&mut Noop, request())),
        "apiguard_stack" => {
            let mut svc = support::guard().layer(Noop);
            (0..N).for_each(|_| one(&mut svc, request()))
        }
        "apiguard_stack_global" => {
            let mut svc = support::guard_global().layer(Noop);
            (0..N).for_each(|_| one(&mut svc, request()))
        }
        "bare_arc" => (0..N).for_each(|_| one(&mut NoopArc, Arc::new(request()))),
        "tower_resilience_stack" => {
            let mut svc = support::tower_resilience_stack();
            (0..N).for_each(|_| one(&mut svc, Arc::new(request())))
        }
        other => panic!("STACK_COUNT: no case {other:?}"),
    }
}

/// Runs `tasks` tasks on `rt`, each making `iters` calls through its own
/// clone of `svc`; returns the wall time until the last one is done.
fn run_tasks<S, R>(
    rt: &tokio::runtime::Runtime,
    tasks: usize,
    iters: u64,
    svc: &S,
    make: fn(usize) -> R,
) -> Duration
where
    S: Service<R> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    S::Response: Send,
    R: Send + 'static,
{
    rt.block_on(async {
        let start = tokio::time::Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|task| {
                let mut svc = svc.clone();
                tokio::spawn(async move {
                    for _ in 0..iters {
                        let ready = svc.ready().await.unwrap();
                        black_box(ready.call(make(task)).await.unwrap());
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        start.elapsed()
    })
}

fn bench_tasks<S, R>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    name: &str,
    tasks: usize,
    svc: S,
    make: fn(usize) -> R,
) where
    S: Service<R> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    S::Response: Send,
    R: Send + 'static,
{
    g.bench_with_input(BenchmarkId::new(name, tasks), &tasks, |b, &t| {
        b.iter_custom(|iters| run_tasks(rt, t, iters, &svc, make))
    });
}

/// A multi-threaded runtime with one worker per core, and the core count.
fn per_core_runtime() -> (tokio::runtime::Runtime, usize) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()
        .unwrap();
    (rt, cores)
}

fn tasks(c: &mut Criterion) {
    let (rt, _) = per_core_runtime();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("stack_tasks");
    configure(&mut g);
    for t in [1usize, 2, 8] {
        g.throughput(Throughput::Elements(t as u64));
        let same = |_: usize| request();
        bench_tasks(&mut g, &rt, "bare", t, Noop, same);
        bench_tasks(
            &mut g,
            &rt,
            "apiguard_stack",
            t,
            support::guard().layer(Noop),
            same,
        );
        let rl = support::guard_rate_limit_only().layer(Noop);
        bench_tasks(&mut g, &rt, "apiguard_rate_limit", t, rl, same);
        let cb = support::guard_breaker_only().layer(Noop);
        bench_tasks(&mut g, &rt, "apiguard_breaker", t, cb, same);
        let rl = support::guard_rate_limit_only().layer(Noop);
        bench_tasks(&mut g, &rt, "apiguard_rate_limit_hosts", t, rl, request_to);
        let cb = support::guard_breaker_only().layer(Noop);
        bench_tasks(&mut g, &rt, "apiguard_breaker_hosts", t, cb, request_to);
        let tr = support::tower_resilience_stack();
        bench_tasks(&mut g, &rt, "tower_resilience_stack", t, tr, |_| {
            Arc::new(request())
        });
    }
    g.finish();
}

/// The request of task `task`, to a host of its own (eight hosts, then
/// they repeat).
fn request_to(task: usize) -> support::Req {
    const HOSTS: [&str; 8] = [
        "http://h0.example/v1/items",
        "http://h1.example/v1/items",
        "http://h2.example/v1/items",
        "http://h3.example/v1/items",
        "http://h4.example/v1/items",
        "http://h5.example/v1/items",
        "http://h6.example/v1/items",
        "http://h7.example/v1/items",
    ];
    support::request_for(HOSTS[task % HOSTS.len()])
}

criterion_group!(benches, single_task, tasks);

/// With `APIGUARD_FUTURE_SIZES=1`: the size of each stack's response
/// future, which every layer moves into its own future (a large one shows
/// up as `memmove` in a profile).
fn future_sizes() {
    fn size<S: Service<support::Req>>(_: &S) -> usize {
        std::mem::size_of::<S::Future>()
    }
    let rows = [
        ("apiguard_stack", size(&support::guard().layer(Noop))),
        (
            "apiguard_stack_timeouts",
            size(&support::guard_with_timeouts().layer(Noop)),
        ),
        (
            "apiguard_rate_limit",
            size(&support::guard_rate_limit_only().layer(Noop)),
        ),
        (
            "apiguard_breaker",
            size(&support::guard_breaker_only().layer(Noop)),
        ),
        (
            "apiguard_retry",
            size(&support::guard_retry_only().layer(Noop)),
        ),
        (
            "plain_rate_limit",
            size(&support::plain_rate_limit().layer(Noop)),
        ),
        ("plain_breaker", size(&support::plain_breaker().layer(Noop))),
        ("plain_retry", size(&support::plain_retry().layer(Noop))),
        ("request", std::mem::size_of::<support::Req>()),
    ];
    for (name, bytes) in rows {
        println!("{name:<24} {bytes:>5} bytes");
    }
}

/// Calls per contender per round of [`paired`].
const PAIRED_CALLS: u32 = 100_000;
/// Rounds of [`paired`].
const PAIRED_ROUNDS: usize = 21;

/// Nanoseconds per call of `calls` calls through `svc`.
fn per_call<S, R>(svc: &mut S, make: impl Fn() -> R, calls: u32) -> f64
where
    S: Service<R>,
    S::Error: std::fmt::Debug,
{
    let t = tokio::time::Instant::now();
    for _ in 0..calls {
        one(svc, make());
    }
    t.elapsed().as_nanos() as f64 / f64::from(calls)
}

/// The one-third target, measured so that a machine whose speed drifts
/// (a shared VM) cannot decide it: the four cases it needs run one after
/// another in short turns, round after round, and each round gives its own
/// ratio of overheads; the median round's ratio is the figure. Criterion's
/// per-case medians, taken minutes apart, are in the table beside it.
fn paired() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut bare = Noop;
    let mut bare_arc = NoopArc;
    let mut ours = support::guard().layer(Noop);
    let mut theirs = support::tower_resilience_stack();
    let mut rows = Vec::with_capacity(PAIRED_ROUNDS);
    for round in 0..=PAIRED_ROUNDS {
        let b = per_call(&mut bare, request, PAIRED_CALLS);
        let o = per_call(&mut ours, request, PAIRED_CALLS);
        let ba = per_call(&mut bare_arc, || Arc::new(request()), PAIRED_CALLS);
        let t = per_call(&mut theirs, || Arc::new(request()), PAIRED_CALLS);
        // Round 0 warms up.
        if round > 0 {
            rows.push((o - b, t - ba));
        }
    }
    rows.sort_by(|x, y| (x.0 / x.1).total_cmp(&(y.0 / y.1)));
    let (o, t) = rows[rows.len() / 2];
    let lo = rows[0].0 / rows[0].1;
    let hi = rows[rows.len() - 1].0 / rows[rows.len() - 1].1;
    println!(
        "paired: GuardLayer overhead {o:.1} ns, tower-resilience {t:.1} ns, ratio {:.3} (rounds: {lo:.3} .. {hi:.3})",
        o / t
    );
    support::write_result(
        "stack_paired.json",
        &format!(
            "{{\"rounds\":{},\"calls\":{},\"ours_ns\":{o:.2},\"theirs_ns\":{t:.2},\"ratio\":{:.4},\"min\":{lo:.4},\"max\":{hi:.4}}}",
            rows.len(),
            PAIRED_CALLS,
            o / t
        ),
    );
}

/// Iterations per task per turn of [`paired_tasks`].
const TASK_ITERS: u64 = 20_000;

type Run<'a> = Box<dyn Fn(usize) -> Duration + 'a>;

/// A case of [`paired_tasks`]: `svc` cloned into each task.
fn case<S>(rt: &tokio::runtime::Runtime, svc: S, make: fn(usize) -> support::Req) -> Run<'_>
where
    S: Service<support::Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    S::Response: Send,
{
    Box::new(move |tasks| run_tasks(rt, tasks, TASK_ITERS, &svc, make))
}

/// The per-core question of `stack_tasks`, interleaved like [`paired`]:
/// each round runs every case at 1 and at 8 tasks in short turns, and
/// gives each case its ratio of per-core time at 8 tasks to 1 task, and
/// that ratio over `bare`'s in the same round (the runtime's own cost of
/// juggling eight tasks is not the layer's). The median round of each is
/// kept.
fn paired_tasks() {
    let (rt, cores) = per_core_runtime();
    let _guard = rt.enter();
    let same = |_: usize| request();
    let cases: Vec<(&str, Run<'_>)> = vec![
        ("bare", case(&rt, Noop, same)),
        (
            "apiguard_rate_limit",
            case(&rt, support::guard_rate_limit_only().layer(Noop), same),
        ),
        (
            "apiguard_breaker",
            case(&rt, support::guard_breaker_only().layer(Noop), same),
        ),
        (
            "apiguard_rate_limit_hosts",
            case(
                &rt,
                support::guard_rate_limit_only().layer(Noop),
                request_to,
            ),
        ),
        (
            "apiguard_breaker_hosts",
            case(&rt, support::guard_breaker_only().layer(Noop), request_to),
        ),
        (
            "apiguard_stack",
            case(&rt, support::guard().layer(Noop), same),
        ),
    ];
    // Per-core ns per call.
    let per_core = |run: &Run<'_>, tasks: usize| {
        let d = run(tasks).as_nanos() as f64;
        d * tasks.min(cores) as f64 / (tasks as f64 * TASK_ITERS as f64)
    };
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut relative: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..=PAIRED_ROUNDS {
        let r: Vec<f64> = cases
            .iter()
            .map(|(_, run)| per_core(run, 8) / per_core(run, 1))
            .collect();
        // Round 0 warms up.
        if round > 0 {
            for (i, x) in r.iter().enumerate() {
                ratios[i].push(*x);
                relative[i].push(x / r[0]);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let mut json = Vec::new();
    for (i, (name, _)) in cases.iter().enumerate() {
        let (r, lo, hi) = median(&mut ratios[i]);
        let (rel, rlo, rhi) = median(&mut relative[i]);
        println!(
            "paired tasks: {name:<26} per core, 8 tasks / 1 task {r:.3} ({lo:.2} .. {hi:.2}); over bare's {rel:.3} ({rlo:.2} .. {rhi:.2})"
        );
        json.push(format!(
            "{{\"who\":{name:?},\"ratio\":{r:.4},\"min\":{lo:.4},\"max\":{hi:.4},\"relative\":{rel:.4},\"relative_min\":{rlo:.4},\"relative_max\":{rhi:.4}}}"
        ));
    }
    support::write_result(
        "stack_tasks_paired.json",
        &format!(
            "{{\"cores\":{cores},\"rounds\":{PAIRED_ROUNDS},\"iters\":{TASK_ITERS},\"cases\":[{}]}}",
            json.join(",")
        ),
    );
}

fn main() {
    if std::env::var_os("APIGUARD_FUTURE_SIZES").is_some() {
        future_sizes();
        return;
    }
    if let Some(who) = std::env::var_os("STACK_COUNT") {
        count(&who.to_string_lossy());
        return;
    }
    // A criterion filter that names other cases skips the paired rounds.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter
        .as_deref()
        .is_none_or(|f| "stack_paired".contains(f) || f.contains("paired"))
    {
        paired();
        paired_tasks();
    }
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}
