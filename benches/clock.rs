//! What one clock read costs: the default `apiguard_core::Clock` (the TSC
//! through quanta where the kernel trusts it, `Instant` elsewhere) next to
//! `std::time::Instant` and `tokio::time::Instant`.
//!
//! Run: `cargo bench -p apiguard-benches --bench clock`.

use std::hint::black_box;
use std::time::Duration;

use apiguard_core::Clock;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn clock(c: &mut Criterion) {
    let mut g = c.benchmark_group("clock");
    g.throughput(Throughput::Elements(1))
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    let ours = Clock::system();
    g.bench_function("apiguard_clock", |b| b.iter(|| black_box(ours.now())));
    // The comparison this bench exists for; nothing else reads it.
    #[allow(clippy::disallowed_types)]
    g.bench_function("std_instant", |b| {
        b.iter(|| black_box(std::time::Instant::now()))
    });
    g.bench_function("tokio_instant", |b| {
        b.iter(|| black_box(tokio::time::Instant::now()))
    });
    g.finish();
}

criterion_group!(benches, clock);
criterion_main!(benches);
