use std::fmt;
use std::marker::PhantomData;

use tower_layer::Layer;

use crate::body::{CloneBodies, ReplayBodies};
use crate::policy::RetryPolicy;
use crate::service::Retry;

/// Retries requests by a [`RetryPolicy`]; makes [`Retry`] services.
///
/// `RetryLayer::new(policy)` clones request bodies (any body that is
/// `Clone`, such as `Full<Bytes>`); `.replay_bodies()` wraps streaming
/// bodies (hyper's `Incoming`, axum's `Body`, boxed bodies) in a
/// [`ReplayBody`](crate::ReplayBody) instead. A streaming body under
/// `RetryLayer::new` is a compile error that says "cannot be copied for a
/// retry" and points here:
///
/// ```compile_fail,E0277
/// # use std::convert::Infallible;
/// # use apiguard_retry::{RetryLayer, RetryPolicy};
/// # use bytes::Bytes;
/// # use http_body_util::combinators::UnsyncBoxBody;
/// # use tower::{Layer, Service, service_fn};
/// type Streaming = UnsyncBoxBody<Bytes, Infallible>;
/// let inner = service_fn(|_req: http::Request<Streaming>| async {
///     Ok::<_, Infallible>(http::Response::new(()))
/// });
/// let mut svc = RetryLayer::new(RetryPolicy::builder().build().unwrap()).layer(inner);
/// let _ = Service::call(&mut svc, http::Request::new(Streaming::default()));
/// ```
///
/// and this compiles (the inner service sees the recording wrapper):
///
/// ```
/// # use std::convert::Infallible;
/// # use apiguard_retry::{ReplayBody, RetryLayer, RetryPolicy};
/// # use bytes::Bytes;
/// # use http_body_util::combinators::UnsyncBoxBody;
/// # use tower::{Layer, Service, service_fn};
/// type Streaming = UnsyncBoxBody<Bytes, Infallible>;
/// let inner = service_fn(|_req: http::Request<ReplayBody<Streaming>>| async {
///     Ok::<_, Infallible>(http::Response::new(()))
/// });
/// let policy = RetryPolicy::builder().build().unwrap();
/// let mut svc = RetryLayer::new(policy).replay_bodies().layer(inner);
/// let _ = Service::call(&mut svc, http::Request::new(Streaming::default()));
/// ```
///
/// (Through a method such as `svc.oneshot(req)` the compiler only says
/// that `Retry<…>: Service<_>` is not satisfied; the body is the reason.)
///
/// Every service built from one layer shares the policy's
/// [`RetryBudget`](crate::RetryBudget).
pub struct RetryLayer<M = CloneBodies> {
    policy: RetryPolicy,
    _mode: PhantomData<fn() -> M>,
}

impl RetryLayer<CloneBodies> {
    /// A layer that retries by `policy`, cloning request bodies.
    pub const fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            _mode: PhantomData,
        }
    }

    /// Replays streaming request bodies instead of cloning them: each body
    /// is wrapped in a [`ReplayBody`](crate::ReplayBody) that keeps up to
    /// the policy's `max_replay_bytes`.
    pub fn replay_bodies(self) -> RetryLayer<ReplayBodies> {
        RetryLayer {
            policy: self.policy,
            _mode: PhantomData,
        }
    }
}

impl<M> RetryLayer<M> {
    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

impl<M> Clone for RetryLayer<M> {
    fn clone(&self) -> Self {
        Self {
            policy: self.policy.clone(),
            _mode: PhantomData,
        }
    }
}

impl<M> fmt::Debug for RetryLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("policy", &self.policy)
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}

impl<S, M> Layer<S> for RetryLayer<M> {
    type Service = Retry<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::with_mode(inner, self.policy.clone())
    }
}
