//! The pace-change and breaker-transition events, alone in their own test binary (tracing caches
//! a callsite's interest the first time it is hit: a thread-local
//! subscriber beside parallel tests can miss events).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use apiguard::GuardLayer;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{Layer, ServiceExt, service_fn};
use tracing_subscriber::layer::SubscriberExt;

/// One event's fields: name, and the value with its kind.
type Fields = Vec<(String, String)>;

/// The value of an event's field `name` (empty when it has none).
fn field(e: &Fields, name: &str) -> String {
    e.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Fields>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Visit(Fields);
        impl tracing::field::Visit for Visit {
            fn record_f64(&mut self, f: &tracing::field::Field, v: f64) {
                self.0.push((f.name().into(), format!("f64:{v}")));
            }
            fn record_u64(&mut self, f: &tracing::field::Field, v: u64) {
                self.0.push((f.name().into(), format!("u64:{v}")));
            }
            fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
                self.0.push((f.name().into(), format!("str:{v}")));
            }
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                self.0.push((f.name().into(), format!("debug:{v:?}")));
            }
        }
        let target = event.metadata().target();
        if target != "apiguard::pace" && target != "apiguard::breaker" {
            return;
        }
        let mut v = Visit(vec![("target".into(), target.into())]);
        event.record(&mut v);
        self.0.lock().unwrap().push(v.0);
    }
}

#[tokio::test(start_paused = true)]
async fn a_throttle_emits_a_pace_event_with_host_rates_pause_and_reason() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let up = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut res = Response::new(Full::<Bytes>::default());
            if n == 0 {
                *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                res.headers_mut()
                    .insert(http::header::RETRY_AFTER, "2".parse().unwrap());
            }
            Ok::<_, Infallible>(res)
        }
    });
    let layer = GuardLayer::builder()
        .rate_limit(apiguard::Quota::from_rate(5, 30.0))
        .build()
        .unwrap();
    let svc = layer.layer(up);
    let req = || {
        Request::get("http://api.test/")
            .body(Full::default())
            .unwrap()
    };
    svc.clone().oneshot(req()).await.unwrap();
    svc.oneshot(req()).await.unwrap();
    let events = capture.0.lock().unwrap().clone();
    let throttle = events
        .iter()
        .find(|e| field(e, "reason") == "str:throttled")
        .expect("a throttled event");
    assert_eq!(field(throttle, "host"), "debug:api.test");
    assert_eq!(field(throttle, "old_rate"), "f64:30");
    let new_rate: f64 = field(throttle, "new_rate")
        .strip_prefix("f64:")
        .and_then(|v| v.parse().ok())
        .expect("new_rate is an f64");
    assert!((new_rate - 27.0).abs() < 0.01, "{new_rate}");
    assert_eq!(field(throttle, "pause_ms"), "u64:2000");
}

/// A per-host breaker's transition event names its host (not the
/// template's empty name), its reason, and how long it stays open in
/// numeric milliseconds.
#[tokio::test(start_paused = true)]
async fn a_host_breaker_transition_event_names_the_host_and_reason() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let up = service_fn(|_req: Request<Full<Bytes>>| async {
        let mut res = Response::new(Full::<Bytes>::default());
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        Ok::<_, Infallible>(res)
    });
    let layer = GuardLayer::builder()
        .circuit_breaker(
            apiguard::CircuitBreaker::builder()
                .failure_threshold(1)
                .recovery_timeout(std::time::Duration::from_secs(30)),
        )
        .build()
        .unwrap();
    let res = layer
        .layer(up)
        .oneshot(
            Request::get("http://down.test:8080/")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let events = capture.0.lock().unwrap().clone();
    let opened = events
        .iter()
        .find(|e| field(e, "target") == "apiguard::breaker" && field(e, "to") == "debug:Open")
        .expect("a transition to open");
    assert_eq!(field(opened, "breaker"), "str:down.test:8080");
    assert_eq!(field(opened, "reason"), "debug:ConsecutiveFailures");
    assert_eq!(field(opened, "open_for_ms"), "u64:30000");
}
