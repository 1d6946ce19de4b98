//! [`GuardLayer`]: the three patterns composed in the order a client needs.
//!
//! Outermost first:
//!
//! ```text
//! total timeout → retry → circuit breaker → rate limit → attempt timeout → transport
//! ```
//!
//! - **Retry outside the breaker**: every attempt is seen by the breaker. A
//!   request the open breaker refuses (or a probe in flight) is not an
//!   attempt: it waits for the breaker's next change, woken by the breaker,
//!   within its total timeout and `max_wait`, spending no retry and no
//!   budget; a next probe past both is refused at once.
//! - **Rate limit inside retry**: every request that leaves the process,
//!   retries included, spends a token — the remote's quota counts them all.
//! - **Breaker before the limiter**: a call the breaker refuses spends no
//!   token.
//! - **Attempt timeout innermost**: it covers the network call only, not the
//!   wait for a token.
//! - **Total timeout outermost**: it bounds everything, waits and retries
//!   included.
//!
//! Each part is optional. Breakers and buckets are per host by default (the
//! URI's authority, or the `Host` header): one failing host does not open
//! the circuit for another, and each host's quota is its own.
//!
//! Adaptive pacing is on by default ([`GuardLayerBuilder::adaptive`]): a
//! host that answers `429` (or `503` with `Retry-After`, or quota fields
//! saying nothing is left) is paused for every request and then paced at
//! what it lets through, in place of its bucket; see [`pace`](crate::pace).
//!
//! # How it runs
//!
//! The parts are not stacked as separate tower layers: [`Guard`] runs them
//! in one service with one future per request. Stacked, each layer would
//! wrap the next one's future in its own (a future of a kilobyte, moved up
//! through every layer) and tower's `Retry` would clone the whole service
//! below it into every request (a dozen reference counts written per call,
//! each a cache line that every core's calls fight over). Here:
//!
//! - the success path touches the host's breaker and bucket once each, and
//!   keeps its state inline; waiting for a token, a backoff or a ready
//!   service moves that state to the heap only then;
//! - each service keeps handles on the breaker and bucket of the host it
//!   called last, so a client calling one host again and again does no
//!   registry lookup (a breaker the registry has since let go of is
//!   noticed, and the registry asked again);
//! - only a request that may be retried keeps the layer's shared state;
//! - one timer serves both timeouts, registered only when the request
//!   first has to wait.
//!
//! The composed behaviour is the order above; `benches/stack.rs` measures
//! what it costs next to tower's and tower-resilience's stacks.
//!
//! # Where things are
//!
//! One concern per file, each using only those listed before it: `scope`
//! (which host a request belongs to), `admission` (the shared registries,
//! and the breaker and bucket decisions), `timer` (both timeouts),
//! `future` ([`GuardFuture`], the per-request state machine), `box_err`
//! (the inner service with its error boxed), `service` ([`Guard`]),
//! `layer` ([`GuardLayer`]), `inspect` ([`HostState`], one host's state
//! by its name) and `builder` ([`GuardLayerBuilder`], which
//! makes the registries the layer holds).

mod admission;
mod box_err;
mod builder;
mod future;
mod inspect;
mod layer;
mod scope;
mod service;
#[cfg(test)]
mod tests;
mod timer;

pub(crate) use admission::Deferred;
// Named in `Guard`'s future type (`GuardFuture<BoxErr<S>, B>`), so it
// stays public, but no user needs to name it: hidden from the docs.
#[doc(hidden)]
pub use box_err::{BoxErr, BoxErrFuture};
pub use builder::GuardLayerBuilder;
pub use future::GuardFuture;
pub use inspect::{HostState, NotAHost};
pub use layer::GuardLayer;
pub use scope::{HostScope, Scope};
pub use service::Guard;
