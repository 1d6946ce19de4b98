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

/// The values of `name`'s series whose labels include every one of `labels`.
fn values<'a>(
    entries: &'a Entries,
    name: &'a str,
    labels: &'a [(&str, &str)],
) -> impl Iterator<Item = &'a DebugValue> {
    entries
        .iter()
        .filter(move |(key, ..)| key.key().name() == name)
        .filter(move |(key, ..)| {
            labels
                .iter()
                .all(|(k, v)| key.key().labels().any(|l| l.key() == *k && l.value() == *v))
        })
        .map(|(.., value)| value)
}

/// The sum of `name`'s counters with all of `labels`.
fn counter_with(entries: &Entries, name: &str, labels: &[(&str, &str)]) -> u64 {
    values(entries, name, labels)
        .map(|value| match value {
            DebugValue::Counter(n) => *n,
            _ => 0,
        })
        .sum()
}

fn counter(entries: &Entries, name: &str, label: Option<(&str, &str)>) -> u64 {
    counter_with(entries, name, label.as_slice())
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
    let gauge = host_gauge(&snap, "apiguard_host_pace", &host);
    let rate = gauge.expect("a pace gauge for the throttled host");
    assert!(
        rate > 0.0 && rate <= apiguard::ratelimit::pace::START_RATE,
        "{rate}"
    );
}

/// The gauge `name` labelled `host`, if it was set.
fn host_gauge(entries: &Entries, name: &str, host: &str) -> Option<f64> {
    entries.iter().find_map(|(key, _, _, value)| {
        let labelled = key
            .key()
            .labels()
            .any(|l| l.key() == "host" && l.value() == host);
        match value {
            DebugValue::Gauge(g) if key.key().name() == name && labelled => Some(g.into_inner()),
            _ => None,
        }
    })
}

/// Two hosts, one in an outage: its breaker's state and transitions carry
/// its host (and the reason), the healthy host's breaker records nothing,
/// and every metric comes with its description.
#[test]
fn breaker_state_and_transitions_are_labelled_by_host_and_described() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let (down, up) = metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let down = Upstream::start(Behavior::Status(503)).await.unwrap();
            let up = Upstream::start(Behavior::Ok).await.unwrap();
            let client = GuardedClient::builder()
                .max_retries(0)
                .failure_threshold(2)
                .recovery_timeout(Duration::from_secs(600))
                .build()
                .unwrap();
            for _ in 0..3 {
                let _ = client.get(&format!("{}/", down.url())).await;
                let res = client.get(&format!("{}/", up.url())).await.unwrap();
                assert_eq!(res.status(), 200);
            }
            (down.addr().to_string(), up.addr().to_string())
        })
    });
    let snap = snap.snapshot().into_vec();
    assert_eq!(
        host_gauge(&snap, "apiguard_breaker_state", &down),
        Some(2.0),
        "the failing host's breaker is open"
    );
    assert_eq!(
        host_gauge(&snap, "apiguard_breaker_state", &up),
        None,
        "the healthy host's breaker never moved"
    );
    let opened = snap
        .iter()
        .filter(|(key, ..)| key.key().name() == "apiguard_breaker_transitions_total")
        .filter(|(key, ..)| {
            let has = |k: &str, v: &str| key.key().labels().any(|l| l.key() == k && l.value() == v);
            has("host", &down) && has("to", "open") && has("reason", "consecutive_failures")
        })
        .count();
    assert_eq!(
        opened, 1,
        "one transition to open, labelled with host and reason"
    );
    assert!(
        snap.iter()
            .filter(|(key, ..)| key.key().name() == "apiguard_breaker_transitions_total")
            .all(|(key, ..)| key.key().labels().any(|l| l.key() == "host")),
        "no unlabelled transition series"
    );
    for name in [
        "apiguard_requests_total",
        "apiguard_breaker_state",
        "apiguard_breaker_transitions_total",
    ] {
        let described = snap
            .iter()
            .any(|(key, _, desc, _)| key.key().name() == name && desc.is_some());
        assert!(described, "{name} has a description");
    }
}

/// What a Prometheus scrape shows after a host's outage and another's
/// `429`: each host's breaker state and pace under its own `host` label,
/// with `# HELP` lines (the exposition format, rendered by the Prometheus
/// exporter the demo's `--prometheus` serves).
#[test]
fn a_prometheus_scrape_shows_each_hosts_breaker_state_and_pace() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let (down, busy) = metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let down = Upstream::start(Behavior::Status(503)).await.unwrap();
            let busy = Upstream::start(Behavior::Status(429)).await.unwrap();
            let client = GuardedClient::builder()
                .max_retries(0)
                .failure_threshold(1)
                .recovery_timeout(Duration::from_secs(600))
                .build()
                .unwrap();
            let _ = client.get(&format!("{}/", down.url())).await;
            let _ = client.get(&format!("{}/", busy.url())).await;
            (down.addr().to_string(), busy.addr().to_string())
        })
    });
    let scrape = handle.render();
    assert!(
        scrape.contains(&format!("apiguard_breaker_state{{host=\"{down}\"}} 2")),
        "{scrape}"
    );
    let pace = scrape
        .lines()
        .find(|l| l.starts_with(&format!("apiguard_host_pace{{host=\"{busy}\"}}")))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(pace.is_some_and(|p| p > 0.0), "{scrape}");
    assert!(
        scrape.contains("# HELP apiguard_breaker_state "),
        "{scrape}"
    );
    assert!(
        !scrape.contains(&format!("apiguard_host_pace{{host=\"{down}\"}}")),
        "the failing host was not paced: {scrape}"
    );
}

/// The samples of `name` whose labels include every one of `labels`.
fn histogram_samples(entries: &Entries, name: &str, labels: &[(&str, &str)]) -> usize {
    values(entries, name, labels)
        .map(|value| match value {
            DebugValue::Histogram(samples) => samples.len(),
            _ => 0,
        })
        .sum()
}

/// Each attempt on the network is one `http.client.request.duration`
/// sample with OpenTelemetry's attributes: a retried `503` is two samples
/// whose `error.type` is the status, a `200` one without an error, a
/// refused connection two with `error.type = connect`; and the metric is
/// described in seconds.
#[test]
fn each_attempt_is_an_opentelemetry_http_client_duration_sample() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let (failing_port, ok_port, closed_port) = metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let failing = Upstream::start(Behavior::Status(503)).await.unwrap();
            let ok = Upstream::start(Behavior::Ok).await.unwrap();
            // A port nobody listens on: bound, then let go.
            let closed = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let client = GuardedClient::builder()
                .max_retries(1)
                .base_delay(Duration::from_millis(1))
                .failure_threshold(10)
                .build()
                .unwrap();
            let res = client.get(&format!("{}/", failing.url())).await.unwrap();
            assert_eq!(res.status(), 503);
            let res = client.get(&format!("{}/", ok.url())).await.unwrap();
            assert_eq!(res.status(), 200);
            let err = client.get(&format!("http://{closed}/")).await.unwrap_err();
            assert!(!err.is_circuit_open(), "{err}");
            (
                failing.addr().port().to_string(),
                ok.addr().port().to_string(),
                closed.port().to_string(),
            )
        })
    });
    let snap = snap.snapshot().into_vec();
    let name = "http.client.request.duration";
    let host = ("server.address", "127.0.0.1");
    let get = ("http.request.method", "GET");
    assert_eq!(
        histogram_samples(
            &snap,
            name,
            &[
                get,
                host,
                ("server.port", &failing_port),
                ("http.response.status_code", "503"),
                ("error.type", "503"),
            ]
        ),
        2,
        "{snap:#?}"
    );
    assert_eq!(
        histogram_samples(
            &snap,
            name,
            &[
                get,
                host,
                ("server.port", &ok_port),
                ("http.response.status_code", "200"),
                ("error.type", ""),
            ]
        ),
        1
    );
    assert_eq!(
        histogram_samples(
            &snap,
            name,
            &[
                get,
                host,
                ("server.port", &closed_port),
                ("http.response.status_code", ""),
                ("error.type", "connect"),
            ]
        ),
        2
    );
    assert_eq!(histogram_samples(&snap, name, &[]), 5);
    let described = snap
        .iter()
        .find(|(key, ..)| key.key().name() == name)
        .map(|(_, unit, desc, _)| (*unit, desc.is_some()));
    assert_eq!(described, Some((Some(metrics::Unit::Seconds), true)));
}

/// Hosts past `max_hosts`, while every host breaker is in use, share the
/// overflow breaker: its transitions are recorded under `host="other"`,
/// and the named host's series stay its own.
#[test]
fn the_overflow_breaker_of_a_full_host_registry_is_labelled_other() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let named = metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let first = Upstream::start(Behavior::Status(503)).await.unwrap();
            let second = Upstream::start(Behavior::Status(503)).await.unwrap();
            let client = GuardedClient::builder()
                .max_retries(0)
                .failure_threshold(2)
                .recovery_timeout(Duration::from_secs(600))
                .max_hosts(1)
                .build()
                .unwrap();
            // The first host's breaker holds a failure: it is in use, the
            // registry is full, and the second host gets the overflow one.
            let res = client.get(&format!("{}/", first.url())).await.unwrap();
            assert_eq!(res.status(), 503);
            for _ in 0..2 {
                let res = client.get(&format!("{}/", second.url())).await.unwrap();
                assert_eq!(res.status(), 503);
            }
            assert!(
                client
                    .get(&format!("{}/", second.url()))
                    .await
                    .unwrap_err()
                    .is_circuit_open()
            );
            first.addr().to_string()
        })
    });
    let snap = snap.snapshot().into_vec();
    let opened = |host: &str| {
        counter_with(
            &snap,
            "apiguard_breaker_transitions_total",
            &[("host", host), ("to", "open")],
        )
    };
    assert_eq!(opened("other"), 1, "{snap:#?}");
    assert_eq!(opened(&named), 0);
    assert_eq!(
        host_gauge(&snap, "apiguard_breaker_state", "other"),
        Some(2.0)
    );
}
