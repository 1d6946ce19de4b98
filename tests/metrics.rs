//! The `metrics` feature: what `GuardedClient` and `MetricsLayer` record.

use std::time::Duration;

use apiguard::GuardedClient;
use apiguard::metrics::MetricsLayer;
use apiguard_suite::{Behavior, Upstream};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::{Layer, ServiceExt, service_fn};

type Entries = Vec<(
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

fn counter(entries: &Entries, name: &str, label: Option<(&str, &str)>) -> u64 {
    entries
        .iter()
        .filter(|(key, ..)| key.key().name() == name)
        .filter(|(key, ..)| {
            label.is_none_or(|(k, v)| key.key().labels().any(|l| l.key() == k && l.value() == v))
        })
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => *n,
            _ => 0,
        })
        .sum()
}

#[test]
fn guarded_client_counts_requests_attempts_retries_and_transitions() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let up = Upstream::start(Behavior::Status(503)).await.unwrap();
            let client = GuardedClient::builder()
                .base_url(up.url())
                .max_retries(1)
                .base_delay(Duration::from_millis(1))
                .failure_threshold(2)
                .recovery_timeout(Duration::from_secs(600))
                .build()
                .unwrap();
            // First request: 503, retried once, 503 again: the circuit opens.
            let res = client.get("/").await.unwrap();
            assert_eq!(res.status(), 503);
            // Second: refused by the open circuit (its wait does not fit).
            assert!(client.get("/").await.unwrap_err().is_circuit_open());
        });
    });
    let snap = snap.snapshot().into_vec();
    // The final 503 is handed back, and counted as what it is.
    assert_eq!(
        counter(&snap, "apiguard_requests_total", Some(("outcome", "ok"))),
        0
    );
    assert_eq!(
        counter(
            &snap,
            "apiguard_requests_total",
            Some(("outcome", "error_status"))
        ),
        1
    );
    assert_eq!(
        counter(
            &snap,
            "apiguard_requests_total",
            Some(("outcome", "circuit_open"))
        ),
        1
    );
    assert_eq!(counter(&snap, "apiguard_attempts_total", None), 2);
    assert_eq!(counter(&snap, "apiguard_retries_total", None), 1);
    assert_eq!(
        counter(
            &snap,
            "apiguard_breaker_transitions_total",
            Some(("to", "open"))
        ),
        1
    );
}

#[test]
fn metrics_layer_labels_outcomes() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let svc = MetricsLayer::new().layer(service_fn(|fail: bool| async move {
                if fail {
                    Err::<(), apiguard::BoxError>(Box::new(apiguard::RateLimited::new(
                        Duration::from_secs(1),
                    )))
                } else {
                    Ok(())
                }
            }));
            svc.clone().oneshot(false).await.unwrap();
            svc.clone().oneshot(true).await.unwrap_err();
        });
    });
    let snap = snap.snapshot().into_vec();
    assert_eq!(
        counter(&snap, "apiguard_requests_total", Some(("outcome", "ok"))),
        1
    );
    assert_eq!(
        counter(
            &snap,
            "apiguard_requests_total",
            Some(("outcome", "rate_limited"))
        ),
        1
    );
}

#[test]
fn a_throttled_host_gets_a_pace_gauge_labelled_by_host() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let host = metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let up = Upstream::start(Behavior::Status(429)).await.unwrap();
            let client = GuardedClient::builder()
                .base_url(up.url())
                .max_retries(0)
                .build()
                .unwrap();
            let res = client.get("/").await.unwrap();
            assert_eq!(res.status(), 429);
            up.url().trim_start_matches("http://").to_owned()
        })
    });
    let snap = snap.snapshot().into_vec();
    let gauge = snap.iter().find_map(|(key, _, _, value)| {
        let labelled = key
            .key()
            .labels()
            .any(|l| l.key() == "host" && l.value() == host);
        match value {
            DebugValue::Gauge(g) if key.key().name() == "apiguard_host_pace" && labelled => {
                Some(g.into_inner())
            }
            _ => None,
        }
    });
    let rate = gauge.expect("a pace gauge for the throttled host");
    assert!(
        rate > 0.0 && rate <= apiguard::ratelimit::pace::START_RATE,
        "{rate}"
    );
}
