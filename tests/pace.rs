//! Pacing learned from the server: a real nginx `limit_req` (when nginx is
//! installed; under `CI` it must be) and the project's own `server_layer`,
//! which answers `429` with `Retry-After` and the IETF `RateLimit` fields.
//!
//! These talk over real sockets in real time, so they assert counts (lost
//! requests, refusals), never durations; each runs in a few seconds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use apiguard::GuardedClient;
use apiguard::ratelimit::KeyedLimiter;
use apiguard::ratelimit::extract::ForwardedFor;
use apiguard::server::server_layer;
use apiguard_suite::nginx::{LimitReq, Nginx, load};
use http::{HeaderName, HeaderValue, StatusCode};

const NGINX: LimitReq = LimitReq { rate: 20, burst: 5 };
const TASKS: usize = 8;
const REQUESTS: usize = 80;

async fn against_nginx(limit: Option<(u32, f64)>, adaptive: bool) -> Option<(u64, u64)> {
    let nginx = Nginx::start(NGINX)?;
    let mut b = GuardedClient::builder()
        .base_url(nginx.url())
        .adaptive(adaptive);
    if let Some((c, r)) = limit {
        b = b.rate_limit(apiguard::Quota::from_rate(c, r));
    }
    let client = b.build().unwrap();
    let run = load(&client, TASKS, REQUESTS).await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let (_, refused) = nginx.statuses();
    Some((run.lost, refused))
}

// A fixed client 50% over nginx's rate has about a third of its requests
// refused (26 of 80); paced, a handful.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_limit_set_too_high_learns_nginxs_limit() {
    let Some((lost, refused)) = against_nginx(Some((5, 30.0)), true).await else {
        return;
    };
    assert_eq!(lost, 0);
    assert!(refused <= 12, "nginx refused {refused} of {REQUESTS}");
}

// With no client limit a fixed client floods nginx (hundreds of refusals
// and lost requests); paced, it loses none and is refused a few times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_limit_learns_nginxs_limit() {
    let Some((lost, refused)) = against_nginx(None, true).await else {
        return;
    };
    assert_eq!(lost, 0);
    assert!(refused <= 16, "nginx refused {refused} of {REQUESTS}");
}

// The comparison that makes the two tests above mean something.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pacing_nginx_refuses_a_third_of_a_too_fast_client() {
    let Some((_, refused)) = against_nginx(Some((5, 30.0)), false).await else {
        return;
    };
    assert!(refused >= 15, "nginx refused only {refused} of {REQUESTS}");
}

/// Serves `server_layer` (capacity 10, 20 a second, one key for all) and
/// counts the `429`s it sends.
async fn limited_app() -> (SocketAddr, Arc<AtomicU64>) {
    use axum::{Router, routing::get};
    let refused = Arc::new(AtomicU64::new(0));
    let seen = refused.clone();
    let limiter = KeyedLimiter::from_rate(10, 20.0).unwrap();
    let app: Router = Router::new()
        .route("/", get(|| async { "hi" }))
        .layer(server_layer(limiter, ForwardedFor::x_forwarded_for(1)))
        .layer(axum::middleware::map_response(
            move |res: axum::response::Response| {
                let seen = seen.clone();
                async move {
                    if res.status() == StatusCode::TOO_MANY_REQUESTS {
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                    res
                }
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    (addr, refused)
}

// The server publishes its policy (`q=10;w=1`) and the reset with its
// first `429`: from then on the client paces at the policy and is not
// refused again, bar the requests already in flight with the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_first_refusal_the_client_stays_under_server_layers_limit() {
    let (addr, refused) = limited_app().await;
    let client = GuardedClient::builder()
        .base_url(format!("http://{addr}"))
        .default_header(
            HeaderName::from_static("x-forwarded-for"),
            HeaderValue::from_static("203.0.113.7"),
        )
        .build()
        .unwrap();
    let run = load(&client, 4, 40).await;
    assert_eq!(run.lost, 0);
    let refused = refused.load(Ordering::Relaxed);
    assert!(
        (1..=4).contains(&refused),
        "server_layer refused {refused}: the first refusal and those in flight with it"
    );
    let host = Some(addr.to_string().parse().unwrap());
    let rate = client.layer().paces().unwrap().rate(&host).unwrap();
    assert!(rate <= 10.0 + 1e-6, "paced at {rate}/s, above the policy");
}
