//! [`GuardLayer`]: a small holder of the shared state, and the services it
//! makes.

use std::fmt;
use std::sync::Arc;

use apiguard_breaker::KeyedBreakers;
use apiguard_retry::RetryPolicy;
use tower_layer::Layer;

use super::admission::Shared;
use super::scope::HostScope;
use super::service::Guard;
use crate::hosts::HostLimits;
use crate::pace::HostPaces;

/// The composed client stack (see the [module docs](super)).
///
/// Cloning the layer, and every service it makes, shares the breakers, the
/// buckets and the retry budget.
#[derive(Clone)]
pub struct GuardLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for GuardLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &*self.shared;
        f.debug_struct("GuardLayer")
            .field("total_timeout", &s.total_timeout)
            .field("retry", &s.retry)
            .field("breakers", &s.breakers)
            .field("limiter", &s.limiter)
            .field("paces", &s.paces)
            .field("max_wait", &s.max_wait)
            .field("attempt_timeout", &s.attempt_timeout)
            .field("scope", &s.scope)
            .finish()
    }
}

impl GuardLayer {
    pub(super) fn from_shared(shared: Shared) -> Self {
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The per-host breakers, for inspection.
    pub fn breakers(&self) -> Option<&KeyedBreakers<HostScope>> {
        self.shared.breakers.as_ref()
    }

    /// The per-host buckets, for inspection.
    pub fn limiter(&self) -> Option<&HostLimits> {
        self.shared.limiter.as_ref()
    }

    /// The per-host pacers, for inspection (`None` when not adaptive).
    pub fn paces(&self) -> Option<&HostPaces> {
        self.shared.paces.as_ref()
    }

    /// The retry policy.
    pub fn retry_policy(&self) -> Option<&RetryPolicy> {
        self.shared.retry.as_ref()
    }

    /// Whether each host has its own breaker and bucket.
    pub(super) fn per_host(&self) -> bool {
        self.shared.scope.per_host
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard::new(self.shared.clone(), inner)
    }
}
