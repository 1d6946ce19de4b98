use std::fmt;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use apiguard_core::BoxError;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::body::{CloneBodies, ReplayBodies, ReplayBody, TryCloneBody};
use crate::future::ResponseFuture;
use crate::policy::RetryPolicy;

/// Retries requests to `S` by a [`RetryPolicy`], boxing its errors.
///
/// It works as tower's [`Retry`](tower::retry::Retry) does with the same
/// policy (which implements tower's `Policy`), with a cheaper success path:
/// the policy's settings are shared without a reference count (see
/// [`RetryPolicyBuilder::build`](crate::RetryPolicyBuilder::build)), and a
/// response that ends retrying is recognised in line.
///
/// `M` says what happens to request bodies: [`CloneBodies`] (the default)
/// or [`ReplayBodies`] (see [`RetryLayer`](crate::RetryLayer)).
///
/// # Clone
///
/// Like tower's, each request's future keeps a clone of the inner service
/// (for the retries), so `S` must be `Clone`; wrap it in tower's `Buffer`
/// if it is not. Clones share the policy's configuration and budget.
pub struct Retry<S, M = CloneBodies> {
    inner: S,
    policy: RetryPolicy,
    _mode: PhantomData<fn() -> M>,
}

impl<S> Retry<S, CloneBodies> {
    /// Retries requests to `inner` by `policy`, cloning request bodies.
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        Self::with_mode(inner, policy)
    }
}

impl<S, M> Retry<S, M> {
    pub(crate) fn with_mode(inner: S, policy: RetryPolicy) -> Self {
        Self {
            inner,
            policy,
            _mode: PhantomData,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Takes the inner service out.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

impl<S: Clone, M> Clone for Retry<S, M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
            _mode: PhantomData,
        }
    }
}

impl<S: fmt::Debug, M> fmt::Debug for Retry<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}

impl<S, B, R> Service<Request<B>> for Retry<S, CloneBodies>
where
    S: Service<Request<B>, Response = Response<R>> + Clone,
    S::Error: Into<BoxError>,
    B: TryCloneBody,
{
    type Response = Response<R>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, R>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        ResponseFuture::start(&mut self.inner, &self.policy, req)
    }
}

impl<S, B, R> Service<Request<B>> for Retry<S, ReplayBodies>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<R>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
{
    type Response = Response<R>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReplayBody<B>, R>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let max = self.policy.max_replay_bytes();
        ResponseFuture::start(
            &mut self.inner,
            &self.policy,
            req.map(|b| ReplayBody::new(b, max)),
        )
    }
}
