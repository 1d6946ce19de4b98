//! apiguard for reqwest: the guard of [`apiguard::GuardedClient`] as a
//! [`reqwest_middleware::Middleware`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # let url = format!("http://{}/", listener.local_addr()?);
//! # let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
//! # tokio::spawn(async move { axum::serve(listener, app).await });
//! use apiguard::{GuardedClient, Quota};
//! use apiguard_reqwest::GuardMiddleware;
//!
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(GuardMiddleware::new(GuardedClient::builder().rate_limit(Quota::from_rate(10, 5.0)))?)
//!     .build();
//!
//! // `url` is a server on loopback that answers "ok".
//! let res = client.get(&url).send().await?;
//! assert_eq!(res.text().await?, "ok");
//! # Ok(()) }
//! ```
//!
//! [`GuardMiddleware::new`] takes the settings of a `GuardedClient`
//! ([`GuardedClient::builder`](apiguard::GuardedClient::builder)) and gives
//! the reqwest client the same guard, with the same defaults: per-host
//! rate limit with adaptive pacing learned from `429`s, per-host circuit
//! breaker, retry with exponential backoff and jitter that honours
//! `Retry-After`, a retry budget, and attempt and total timeouts. It is
//! not a second implementation: the middleware runs apiguard's
//! [`GuardLayer`](apiguard::GuardLayer) with the rest of the middleware
//! chain (and reqwest's client at its end) as the service each attempt is
//! sent to. Everything the facade's docs say of `GuardedClient` holds
//! here; [`GuardMiddleware::from_layer`] takes a `GuardLayer` built by
//! hand instead.
//!
//! # Where it goes in the chain
//!
//! Each attempt runs the middleware added after this one, and reqwest's
//! client: put what should see every attempt (`reqwest-tracing`'s span, an
//! authentication header) after it, and do not add `reqwest-retry` as
//! well — the guard retries.
//!
//! # Which requests are retried
//!
//! Those of an idempotent method (`GET`, `HEAD`, `PUT`, `DELETE`, …) or with
//! an `Idempotency-Key` header, and any request that provably never left
//! (connection refused), as with `GuardedClient`. The body must be in
//! memory to be sent again (bytes, a string, `json`, `form`): it is copied
//! for each retry. A streaming body (`Body::wrap_stream`, a file) is sent
//! once and its request never retried; it still goes through the limit, the
//! breaker and the timeouts.
//!
//! # Errors
//!
//! A reqwest error stays `reqwest_middleware::Error::Reqwest`. A request
//! the guard refused or gave up on returns
//! `reqwest_middleware::Error::Middleware`, holding the apiguard refusal
//! itself, found with `anyhow`'s `downcast_ref`:
//! [`RateLimited`](apiguard::RateLimited) (no token within `max_wait`),
//! [`CircuitOpen`](apiguard::CircuitOpen) (the host's breaker is open),
//! [`BudgetExhausted`](apiguard::BudgetExhausted),
//! [`RetriesExhausted`](apiguard::RetriesExhausted) (with the attempts
//! made and the last attempt's error), or tower's `Elapsed` (a timeout).
//! Each refusal says how long to wait (`retry_after()`).
//!
//! ```
//! use apiguard::CircuitOpen;
//!
//! fn is_circuit_open(err: &reqwest_middleware::Error) -> bool {
//!     matches!(err, reqwest_middleware::Error::Middleware(e) if e.is::<CircuitOpen>())
//! }
//! ```
//!
//! A response is returned as it is, whatever its status, once the
//! retries are over (call `error_for_status` to make an error of it).
//!
//! # Extensions
//!
//! The middleware chain's `Extensions` are copied into each attempt; the
//! caller's are replaced by those of the attempt whose response it
//! receives.

#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod error;
mod middleware;
mod next;

pub use middleware::GuardMiddleware;
