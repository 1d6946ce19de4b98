//! Every configuration error every builder can return, one test each: bad
//! settings are refused when built, with the field named, never a panic
//! later inside a request.
//!
//! The list comes from `grep -rn 'InvalidConfig::new' crates/*/src`; the
//! Redis builders are checked in `apiguard-redis`'s own tests (this package
//! does not depend on it).

use std::time::Duration;

use apiguard::breaker::{CircuitBreaker, CircuitBreakerBuilder, KeyedBreakers, SlidingWindow};
use apiguard::core::{InvalidConfig, Quota};
use apiguard::retry::Backoff;
use apiguard::{
    GuardLayer, GuardedClient, Jitter, KeyedLimiter, RetryBudget, RetryPolicy, TokenBucket,
};

/// Asserts `r` failed on `field`, with a reason that mentions `words`.
#[track_caller]
fn refused<T>(r: Result<T, InvalidConfig>, field: &str, words: &str) {
    let Err(e) = r else {
        panic!("expected `{field}` to be refused");
    };
    assert_eq!(e.field(), field, "{e}");
    assert!(e.reason().contains(words), "{e}");
    // The message names the field, so a log line alone says what to fix.
    assert!(e.to_string().contains(field), "{e}");
}

// --- rate limit: TokenBucket, KeyedLimiter (and set_quota) -------------

#[test]
fn a_bucket_of_zero_tokens_is_refused() {
    refused(TokenBucket::from_rate(0, 1.0), "capacity", "at least 1");
    refused(
        KeyedLimiter::<u32>::from_rate(0, 1.0),
        "capacity",
        "at least 1",
    );
}

#[test]
fn a_zero_negative_nan_or_infinite_refill_is_refused() {
    for r in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0] {
        refused(TokenBucket::from_rate(1, r), "refill_per_sec", "finite");
        refused(
            KeyedLimiter::<u32>::from_rate(1, r),
            "refill_per_sec",
            "finite",
        );
    }
}

#[test]
fn a_refill_too_slow_or_too_fast_to_represent_is_refused() {
    // One token per 200 years, and 1e11 tokens a second (under 1 ns each).
    for r in [1.0 / (200.0 * 365.25 * 86_400.0), 1e11] {
        refused(TokenBucket::from_rate(1, r), "refill_per_sec", "between");
    }
}

#[test]
fn a_bucket_that_takes_years_to_refill_is_refused() {
    // u32::MAX tokens at one an hour: half a million years.
    refused(
        TokenBucket::from_rate(u32::MAX, 1.0 / 3600.0),
        "capacity",
        "4 years",
    );
}

#[test]
fn a_bad_per_key_quota_is_refused_and_changes_nothing() {
    let limiter = KeyedLimiter::<u32>::from_rate(5, 1.0).unwrap();
    refused(
        limiter.set_quota(7, Quota::from_rate(0, 1.0)),
        "capacity",
        "at least 1",
    );
    refused(
        limiter.set_quota(7, Quota::from_rate(1, f64::NAN)),
        "refill_per_sec",
        "finite",
    );
    assert_eq!(limiter.quota_of(&7), limiter.quota_of(&8));
}

// --- circuit breaker ----------------------------------------------------

fn breaker() -> CircuitBreakerBuilder {
    CircuitBreaker::builder()
}

#[test]
fn a_zero_failure_threshold_is_refused() {
    refused(
        breaker().failure_threshold(0).build(),
        "failure_threshold",
        "at least 1",
    );
}

#[test]
fn a_zero_recovery_timeout_is_refused() {
    refused(
        breaker().recovery_timeout(Duration::ZERO).build(),
        "recovery_timeout",
        "positive",
    );
}

#[test]
fn a_success_threshold_outside_1_to_65535_is_refused() {
    for n in [0, 65_536, u32::MAX] {
        refused(
            breaker().success_threshold(n).build(),
            "success_threshold",
            "between 1 and 65535",
        );
    }
    breaker().success_threshold(65_535).build().unwrap();
}

#[test]
fn half_open_probes_outside_1_to_65535_are_refused() {
    for n in [0, 65_536] {
        refused(
            breaker().half_open_probes(n).build(),
            "half_open_probes",
            "between 1 and 65535",
        );
    }
}

#[test]
fn a_zero_half_open_timeout_is_refused() {
    refused(
        breaker().half_open_timeout(Duration::ZERO).build(),
        "half_open_timeout",
        "positive",
    );
}

#[test]
fn a_failure_rate_outside_0_to_1_is_refused() {
    for r in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
        refused(breaker().failure_rate(r).build(), "failure_rate", "(0, 1]");
    }
    breaker().failure_rate(1.0).build().unwrap();
}

#[test]
fn a_slow_call_rule_with_zero_threshold_or_bad_rate_is_refused() {
    refused(
        breaker().slow_call(Duration::ZERO, 0.5).build(),
        "slow_call",
        "threshold must be positive",
    );
    for r in [0.0, 2.0, f64::NAN] {
        refused(
            breaker().slow_call(Duration::from_secs(1), r).build(),
            "slow_call",
            "(0, 1]",
        );
    }
}

#[test]
fn a_count_window_outside_1_to_1048575_is_refused() {
    for n in [0, 1_048_576] {
        refused(
            breaker()
                .failure_rate(0.5)
                .sliding_window(SlidingWindow::Count(n))
                .build(),
            "sliding_window",
            "count window",
        );
    }
}

#[test]
fn a_time_window_without_span_or_with_bad_buckets_is_refused() {
    for (span, buckets) in [
        (Duration::ZERO, 10),
        (Duration::from_secs(10), 0),
        (Duration::from_secs(10), 4097),
        // More buckets than nanoseconds in the span.
        (Duration::from_nanos(5), 10),
    ] {
        refused(
            breaker()
                .failure_rate(0.5)
                .sliding_window(SlidingWindow::Time { span, buckets })
                .build(),
            "sliding_window",
            "time window",
        );
    }
}

#[test]
fn zero_minimum_calls_is_refused() {
    refused(
        breaker().failure_rate(0.5).minimum_calls(0).build(),
        "minimum_calls",
        "at least 1",
    );
}

#[test]
fn a_backoff_multiplier_below_one_or_nan_is_refused() {
    for m in [0.5, 0.0, -2.0, f64::NAN] {
        refused(
            breaker().backoff_multiplier(m).build(),
            "backoff_multiplier",
            "at least 1",
        );
    }
}

#[test]
fn a_breaker_jitter_outside_0_to_1_is_refused() {
    for j in [-0.1, 1.1, f64::NAN] {
        refused(breaker().jitter(j).build(), "jitter", "[0, 1]");
    }
}

#[test]
fn a_max_recovery_timeout_below_the_recovery_timeout_is_refused() {
    refused(
        breaker()
            .recovery_timeout(Duration::from_secs(10))
            .max_recovery_timeout(Duration::from_secs(5))
            .build(),
        "max_recovery_timeout",
        "below recovery_timeout",
    );
}

#[test]
fn a_keyed_breaker_registry_of_zero_keys_or_a_bad_template_is_refused() {
    refused(
        KeyedBreakers::<u32>::new(breaker(), 0),
        "max_keys",
        "at least 1",
    );
    refused(
        KeyedBreakers::<u32>::new(breaker().failure_threshold(0), 10),
        "failure_threshold",
        "at least 1",
    );
}

// --- retry: Backoff, RetryPolicy, RetryBudget ---------------------------

#[test]
fn a_max_delay_shorter_than_the_base_is_refused() {
    refused(
        Backoff::new(Duration::from_secs(2), Duration::from_secs(1), Jitter::None),
        "max_delay",
        "base_delay",
    );
    refused(
        RetryPolicy::builder()
            .base_delay(Duration::from_secs(2))
            .max_delay(Duration::from_secs(1))
            .build(),
        "max_delay",
        "base_delay",
    );
}

#[test]
fn a_proportional_jitter_outside_0_to_1_is_refused() {
    for f in [-0.1, 1.5, f64::NAN] {
        refused(
            RetryPolicy::builder()
                .jitter(Jitter::Proportional(f))
                .build(),
            "jitter",
            "[0, 1]",
        );
        refused(
            Backoff::new(
                Duration::from_millis(1),
                Duration::from_secs(1),
                Jitter::Proportional(f),
            ),
            "jitter",
            "[0, 1]",
        );
    }
}

#[test]
fn a_retryable_code_that_is_not_an_http_status_is_refused() {
    for code in [0, 99, 600, 1000] {
        refused(
            RetryPolicy::builder()
                .retryable_status_codes([503, code])
                .build(),
            "retryable_status_codes",
            &code.to_string(),
        );
    }
}

#[test]
fn a_zero_deadline_is_refused() {
    refused(
        RetryPolicy::builder().deadline(Duration::ZERO).build(),
        "deadline",
        "more than zero",
    );
}

#[test]
fn a_budget_ttl_of_zero_or_over_an_hour_is_refused() {
    for ttl in [Duration::ZERO, Duration::from_secs(3601)] {
        refused(RetryBudget::new(ttl, 10, 0.2), "ttl", "one hour");
    }
    RetryBudget::new(Duration::from_secs(3600), 10, 0.2).unwrap();
}

#[test]
fn a_budget_ratio_outside_0_to_1000_is_refused() {
    for r in [-0.1, 1000.5, f64::NAN, f64::INFINITY] {
        refused(
            RetryBudget::new(Duration::from_secs(10), 10, r),
            "retry_ratio",
            "[0, 1000]",
        );
    }
}

// --- the facade: GuardLayer and GuardedClient ----------------------------

#[test]
fn an_attempt_timeout_longer_than_the_total_is_refused() {
    refused(
        GuardLayer::builder()
            .total_timeout(Duration::from_secs(1))
            .attempt_timeout(Duration::from_secs(2))
            .build(),
        "attempt_timeout",
        "longer than the total timeout",
    );
    refused(
        GuardedClient::builder()
            .total_timeout(Duration::from_secs(1))
            .attempt_timeout(Duration::from_secs(2))
            .build(),
        "attempt_timeout",
        "longer than the total timeout",
    );
}

#[test]
fn zero_timeouts_are_refused() {
    refused(
        GuardLayer::builder()
            .attempt_timeout(Duration::ZERO)
            .build(),
        "attempt_timeout",
        "longer than zero",
    );
    refused(
        GuardLayer::builder().total_timeout(Duration::ZERO).build(),
        "total_timeout",
        "longer than zero",
    );
}

#[test]
fn zero_max_hosts_is_refused() {
    refused(
        GuardLayer::builder().max_hosts(0).build(),
        "max_hosts",
        "at least 1",
    );
}

#[test]
fn a_breaker_window_shorter_than_two_attempt_timeouts_is_refused() {
    refused(
        GuardLayer::builder()
            .attempt_timeout(Duration::from_secs(2))
            .circuit_breaker(
                breaker()
                    .failure_rate(0.5)
                    .sliding_window(SlidingWindow::Time {
                        span: Duration::from_secs(3),
                        buckets: 3,
                    }),
            )
            .build(),
        "circuit_breaker",
        "twice the attempt timeout",
    );
}

#[test]
fn the_facade_passes_on_the_parts_errors() {
    refused(
        GuardLayer::builder()
            .rate_limit(apiguard::Quota::from_rate(0, 1.0))
            .build(),
        "capacity",
        "at least 1",
    );
    refused(
        GuardLayer::builder()
            .rate_limit(apiguard::Quota::from_rate(1, -1.0))
            .build(),
        "refill_per_sec",
        "finite",
    );
    refused(
        GuardLayer::builder()
            .circuit_breaker(breaker().failure_threshold(0))
            .build(),
        "failure_threshold",
        "at least 1",
    );
    refused(
        GuardedClient::builder().failure_threshold(0).build(),
        "failure_threshold",
        "at least 1",
    );
    refused(
        GuardedClient::builder()
            .base_delay(Duration::from_secs(120))
            .build(),
        "max_delay",
        "base_delay",
    );
}

#[test]
fn a_base_url_that_is_not_an_absolute_url_is_refused() {
    refused(
        GuardedClient::builder().base_url("not a url").build(),
        "base_url",
        "is not a URL",
    );
    refused(
        GuardedClient::builder().base_url("/relative/only").build(),
        "base_url",
        "needs a scheme and a host",
    );
}

/// A total timeout under the default attempt timeout (10 s) caps the
/// default instead of being refused; an explicit attempt timeout longer
/// than the total is still refused (above).
#[test]
fn a_short_total_timeout_alone_is_accepted() {
    GuardedClient::builder()
        .total_timeout(Duration::from_secs(2))
        .build()
        .expect("only the total timeout was set");
}
