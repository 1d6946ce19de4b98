//! What the limiter tells metrics: who decided and how often, the round
//! trips, the misses, and when it left Redis and came back.

mod common;

use std::time::Duration;

use apiguard_redis::{DecidedBy, FailurePolicy, Mode, Quota, RedisLimiter};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

type Entries = Vec<(
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

fn value(entries: &Entries, name: &str, label: Option<(&str, &str)>) -> f64 {
    entries
        .iter()
        .filter(|(key, ..)| key.key().name() == name)
        .filter(|(key, ..)| {
            label.is_none_or(|(k, v)| key.key().labels().any(|l| l.key() == k && l.value() == v))
        })
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => *n as f64,
            DebugValue::Gauge(g) => g.into_inner(),
            DebugValue::Histogram(h) => h.len() as f64,
        })
        .sum()
}

#[test]
fn decisions_round_trips_misses_and_mode_changes_are_counted() {
    let Some(server) = common::RedisServer::start() else {
        return;
    };
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let mut fallback_refusals = 0;
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = RedisLimiter::builder(Quota::per_second(100))
                .timeout(Duration::from_millis(30))
                .on_redis_failure(FailurePolicy::fail_closed())
                .connect(&server.url())
                .await
                .unwrap();
            for _ in 0..3 {
                assert_eq!(
                    l.decide("m", 1, Duration::ZERO).await.decided_by,
                    DecidedBy::Redis
                );
            }
            server.signal("STOP");
            while l.health().mode == Mode::Redis {
                l.decide("m", 1, Duration::ZERO).await;
            }
            for _ in 0..5 {
                let d = l.decide("m", 1, Duration::ZERO).await;
                assert!(!d.allowed);
                fallback_refusals += 1;
            }
            server.signal("CONT");
            while l.decide("m", 1, Duration::ZERO).await.decided_by != DecidedBy::Redis {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    });
    let snap = snap.snapshot().into_vec();
    let decisions = |by: &str| {
        value(
            &snap,
            "apiguard_redis_decisions_total",
            Some(("decided_by", by)),
        )
    };
    assert!(decisions("redis") >= 4.0);
    assert!(decisions("closed") >= f64::from(fallback_refusals) + 3.0);
    assert_eq!(
        value(
            &snap,
            "apiguard_redis_decisions_total",
            Some(("outcome", "refused"))
        ),
        decisions("closed"),
        "only the policy refused"
    );
    assert!(
        value(
            &snap,
            "apiguard_redis_failures_total",
            Some(("reason", "timeout"))
        ) >= 3.0
    );
    assert!(value(&snap, "apiguard_redis_rtt_seconds", None) >= 4.0);
    for to in ["fallback", "redis"] {
        assert_eq!(
            value(&snap, "apiguard_redis_mode_changes_total", Some(("to", to))),
            1.0,
            "{to}"
        );
    }
    assert_eq!(value(&snap, "apiguard_redis_fallback", None), 0.0);
}
