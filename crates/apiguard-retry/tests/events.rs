//! The retry events, alone in their own test binary.
//!
//! tracing caches each callsite's interest the first time the callsite is
//! hit. A test thread-locally subscribed (`set_default`) while other tests
//! hit the same callsites in parallel, with no subscriber, can find the
//! interest cached as "never" and see no event at all. Here no other test
//! runs beside it.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apiguard_retry::{Jitter, RetryLayer, RetryPolicy};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, ServiceExt, service_fn};
use tracing_subscriber::layer::SubscriberExt;

/// Records every event's fields as `name=value` text.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={:?} ", f.name(), v));
            }
        }
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }
}

#[tokio::test(start_paused = true)]
async fn each_retry_emits_an_event_with_attempt_reason_and_wait() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    // 503, 503, then 200.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let inner = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(if n < 2 { 503 } else { 200 })
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
        }
    });
    let policy = RetryPolicy::builder()
        .jitter(Jitter::None)
        .no_budget()
        .base_delay(Duration::from_millis(100))
        .build()
        .unwrap();
    let req = Request::get("http://example.test/")
        .body(Full::new(Bytes::from_static(b"hi")))
        .unwrap();
    let res = RetryLayer::new(policy)
        .layer(inner)
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let events: Vec<String> = capture
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.contains("message=retrying"))
        .cloned()
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events[0].contains("attempt=2 reason=status 503 wait_ms=100"),
        "{}",
        events[0]
    );
    assert!(
        events[1].contains("attempt=3 reason=status 503 wait_ms=200"),
        "{}",
        events[1]
    );
}
