//! The registry under a flood of keys.

use apiguard_ratelimit::KeyedLimiter;

#[test]
fn a_million_keys_through_ten_thousand_slots_keep_memory_bounded_and_limits_intact() {
    // Slow refill: no bucket fills up again during the test, the worst case
    // for reclaiming.
    let limiter = KeyedLimiter::from_rate(5, 1.0 / 60.0)
        .unwrap()
        .with_max_keys(10_000);
    let victim = u64::MAX;
    for _ in 0..3 {
        limiter.try_acquire(&victim, 1).unwrap();
    }
    for key in 0..1_000_000u64 {
        let _ = limiter.try_acquire(&key, 1);
        if key % 100_000 == 0 {
            assert!(limiter.len() <= 10_000);
        }
    }
    assert!(limiter.len() <= 10_000, "len {}", limiter.len());
    // The flood neither evicted nor reset the victim: two tokens left.
    assert!(limiter.contains(&victim));
    limiter.try_acquire(&victim, 2).unwrap();
    assert!(limiter.try_acquire(&victim, 1).is_err());
}

#[test]
fn idle_keys_are_reclaimed_without_a_background_task() {
    let manual = apiguard_core::ManualClock::new();
    let limiter = KeyedLimiter::from_rate(1, 1000.0)
        .unwrap()
        .with_max_keys(10_000)
        .with_clock(manual.clock());
    for round in 0..50u64 {
        for key in 0..1000u64 {
            limiter.try_acquire(&(round * 1000 + key), 1).unwrap();
        }
        // Every bucket is full again a millisecond later.
        manual.advance(std::time::Duration::from_millis(1));
    }
    // 50 000 distinct keys went through, every one admitted (none fell
    // to the shared overflow bucket), and the map stayed small.
    assert!(limiter.len() <= 2_000, "len {}", limiter.len());
}
