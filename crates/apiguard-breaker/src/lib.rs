//! A circuit breaker for tower services.
//!
//! ```
//! use std::time::Duration;
//! use apiguard_breaker::{CircuitBreaker, CircuitBreakerLayer};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! # use std::convert::Infallible;
//! # use http::{Request, Response, StatusCode};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), apiguard_core::BoxError> {
//! let breaker = CircuitBreaker::builder()
//!     .failure_threshold(5) // 5 failures in a row open it…
//!     .recovery_timeout(Duration::from_secs(30)) // …for 30 s, then it probes
//!     .success_threshold(2) // 2 good probes close it
//!     .build()?;
//!
//! let upstream = tower::service_fn(|_req: Request<()>| async {
//!     let mut res = Response::new(());
//!     *res.status_mut() = StatusCode::BAD_GATEWAY;
//!     Ok::<_, Infallible>(res)
//! });
//! let mut svc = ServiceBuilder::new()
//!     .layer(CircuitBreakerLayer::new(breaker.clone()))
//!     .service(upstream);
//!
//! for _ in 0..5 {
//!     let res = svc.ready().await?.call(Request::new(())).await?;
//!     assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
//! }
//! // Open: refused at once, without touching the upstream.
//! let err = svc.ready().await?.call(Request::new(())).await.unwrap_err();
//! let open = err.downcast_ref::<apiguard_core::CircuitOpen>().unwrap();
//! assert!(open.retry_after().unwrap() <= Duration::from_secs(30));
//! # Ok(())
//! # }
//! ```
//!
//! # The state machine
//!
//! A [`CircuitBreaker`] is **closed** while the dependency behaves: calls
//! pass and their outcomes are counted. It **opens** after
//! `failure_threshold` consecutive failures, or when the failure rate or
//! slow-call rate over a sliding window (the last *n* calls, or the last *t*
//! of time) reaches its threshold once the window holds `minimum_calls`.
//! Open, it refuses every call with [`CircuitOpen`], whose `retry_after` is
//! the time until it probes again. After the recovery timeout it is
//! **half-open**: at most `half_open_probes` calls pass at once;
//! `success_threshold` successes close it, one failure reopens it. Each
//! reopening without a close in between can lengthen the open time
//! (`backoff_multiplier`, capped by `max_recovery_timeout`, with optional
//! `jitter`). [`hold_open_for`](CircuitBreaker::hold_open_for) keeps it open
//! for a server-given time; `force_open`, `disable` and `reset` are the
//! operator's levers. Every transition emits a `tracing` event and calls the
//! [`on_transition`](CircuitBreakerBuilder::on_transition) hook.
//!
//! # Waiting for recovery
//!
//! A refused caller that can wait should not sleep a fixed time:
//! [`CircuitBreaker::recovered`] completes when the breaker is worth asking
//! again, woken by the breaker's own transitions — the probe closing it, a
//! failed probe reopening it (the waiter then waits for the new probe
//! time), a reset. When the circuit closes, the waiters are let go oldest
//! first at the rate they gathered, over at most
//! [`slow_start`](CircuitBreakerBuilder::slow_start), so the recovering
//! dependency does not get the whole backlog at once.
//! [`CircuitBreakerLayer::wait_for_recovery`] does this for a layer under a
//! retry layer. The waiters live in a list the breaker touches only on
//! transitions: the closed path stays one atomic load.
//!
//! # Cost
//!
//! The state is one atomic word; every transition is one compare-and-swap
//! of it, so exactly one thread makes each. A closed breaker admits a call
//! with one atomic load and records a success with one more (a failure with
//! an atomic increment); the windows add a few atomic updates, never a lock
//! or an allocation. The clock is read only when a window or the slow-call
//! trip needs it.
//!
//! # Clone
//!
//! A [`CircuitBreaker`] is a handle: clones, the layers and every service
//! they make share one breaker. [`KeyedBreakers`] is shared the same way.
//!
//! # Cancellation
//!
//! A call whose [`Permit`] (or [`OwnedPermit`]) is dropped without an outcome — a response
//! future dropped mid-flight, a timeout above the layer — counts as neither
//! success nor failure, and gives back its half-open probe slot, so a
//! cancelled probe never wedges the breaker half-open. A probe that never
//! ends at all (a hung call with no timeout, a leaked permit) is given up on
//! after [`half_open_timeout`](CircuitBreakerBuilder::half_open_timeout):
//! the breaker reopens as if it had failed. A dropped
//! [`Recovered`](future::Recovered) leaves the waiter list; waiting never
//! holds a permit or a probe slot.
//!
//! # Errors
//!
//! The layers return [`BoxError`](apiguard_core::BoxError): a refusal is a
//! [`CircuitOpen`] (`err.is::<CircuitOpen>()`), anything else is the inner
//! service's error. With `apiguard_core::RejectionResponseLayer` a server
//! answers a refusal with `503` and `Retry-After`.

#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod breaker;
pub mod error;
pub mod future;
mod hold;
mod keyed;
mod layer;
mod recovered;
mod service;
mod sync;
mod waiters;
mod window;

pub use apiguard_core::{CircuitOpen, KeyExtractor};
// For apiguard's facade; see `CircuitBreaker::try_acquire_ticket`.
#[doc(hidden)]
pub use breaker::Ticket;
pub use breaker::{
    CircuitBreaker, CircuitBreakerBuilder, OwnedPermit, Permit, Reason, SlidingWindow, State,
    Stats, Transition,
};
pub use error::CallError;
pub use hold::{HoldOpen, NoHold, RetryAfterHold};
pub use keyed::{HostKey, KeyedBreakers, PathKey};
pub use layer::{CircuitBreakerLayer, KeyedCircuitBreakerLayer};
pub use service::{CircuitBreakerService, KeyedCircuitBreakerService};
