use std::time::Duration;

use apiguard_core::HttpClassifier;
use tower_layer::Layer;

use crate::breaker::CircuitBreaker;
use crate::hold::{NoHold, RetryAfterHold};
use crate::keyed::KeyedBreakers;
use crate::service::{CircuitBreakerService, KeyedCircuitBreakerService};

/// Guards services with a [`CircuitBreaker`].
///
/// Every service the layer makes, and every clone of those, shares the one
/// breaker. Outcomes are classified by `C` (default [`HttpClassifier`]:
/// transport errors and `5xx` are failures, `4xx` and `429` are ignored); a
/// `503` with `Retry-After` also holds the breaker open for as long as it
/// asks, up to five minutes (`H`, default [`RetryAfterHold`]; turn it off
/// with [`no_hold_open`](Self::no_hold_open), which non-HTTP services need).
///
/// # Under a retry layer
///
/// By default a refused call fails at once with [`CircuitOpen`], whose
/// `retry_after` names the next probe — what a server answering `503`
/// wants. A client stacking `RetryLayer` on top does better with
/// [`wait_for_recovery`](Self::wait_for_recovery): the refusal then comes
/// only once the breaker is worth asking again (it closed and this call's
/// turn in the backlog came, or its open period ended), woken by the
/// breaker itself, and names no wait, so the retry asks again at once. An
/// apiguard `RetryPolicy` spends no attempt and no budget on such a
/// refusal; bound the whole by its `deadline`.
///
/// Put a timeout for each call *below* the breaker (`ServiceBuilder`'s
/// later layer), so that a hanging call ends in an error the breaker counts
/// as a failure. A timeout above it drops the call, which counts as
/// cancelled, and hangs would never open the circuit.
///
/// [`CircuitOpen`]: apiguard_core::CircuitOpen
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer<C = HttpClassifier, H = RetryAfterHold> {
    breaker: CircuitBreaker,
    classifier: C,
    hold: H,
    max_wait: Duration,
}

impl CircuitBreakerLayer {
    /// A layer over `breaker` with the HTTP defaults.
    pub fn new(breaker: CircuitBreaker) -> Self {
        Self {
            breaker,
            classifier: HttpClassifier::new(),
            hold: RetryAfterHold::default(),
            max_wait: Duration::ZERO,
        }
    }
}

impl<C, H> CircuitBreakerLayer<C, H> {
    /// Decides what counts as a failure: any
    /// [`Classify`](apiguard_core::Classify), closures included.
    pub fn classifier<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2, H> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier,
            hold: self.hold,
            max_wait: self.max_wait,
        }
    }

    /// Decides when a response holds the breaker open (see
    /// [`HoldOpen`](crate::HoldOpen)).
    pub fn hold_open<H2>(self, hold: H2) -> CircuitBreakerLayer<C, H2> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier: self.classifier,
            hold,
            max_wait: self.max_wait,
        }
    }

    /// No response holds the breaker open; only the counts decide.
    pub fn no_hold_open(self) -> CircuitBreakerLayer<C, NoHold> {
        self.hold_open(NoHold)
    }

    /// The breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// Holds a refusal back for up to `max` until the breaker is worth
    /// asking again ([`CircuitBreaker::recovered`]), then refuses with a
    /// `CircuitOpen` naming no wait, for a retry layer above to ask again
    /// at once (see [Under a retry layer](Self#under-a-retry-layer)). A
    /// refusal whose next probe is further than `max` away, or that names
    /// none (forced open), comes at once; so does every refusal with the
    /// default, `Duration::ZERO`. The wait takes no permit and no probe
    /// slot, and a dropped future leaves nothing behind.
    pub fn wait_for_recovery(mut self, max: Duration) -> Self {
        self.max_wait = max;
        self
    }
}

impl<S, C: Clone, H: Clone> Layer<S> for CircuitBreakerLayer<C, H> {
    type Service = CircuitBreakerService<S, C, H>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService::new(
            inner,
            self.breaker.clone(),
            self.classifier.clone(),
            self.hold.clone(),
        )
        .waiting(self.max_wait)
    }
}

/// Guards services with one breaker per key, extracted from each request
/// by `X` (see [`KeyExtractor`](crate::KeyExtractor)): one per upstream host
/// on a client, one per route on a server.
///
/// The breakers live in a [`KeyedBreakers`] registry shared by every service
/// the layer makes. Classification, holding and
/// [`wait_for_recovery`](Self::wait_for_recovery) work as in
/// [`CircuitBreakerLayer`].
#[derive(Debug, Clone)]
pub struct KeyedCircuitBreakerLayer<K, X, C = HttpClassifier, H = RetryAfterHold> {
    breakers: KeyedBreakers<K>,
    extractor: X,
    classifier: C,
    hold: H,
    max_wait: Duration,
}

impl<K, X> KeyedCircuitBreakerLayer<K, X> {
    /// A layer over `breakers`, keyed by `extractor`, with the HTTP defaults.
    pub fn new(breakers: KeyedBreakers<K>, extractor: X) -> Self {
        Self {
            breakers,
            extractor,
            classifier: HttpClassifier::new(),
            hold: RetryAfterHold::default(),
            max_wait: Duration::ZERO,
        }
    }
}

impl<K, X, C, H> KeyedCircuitBreakerLayer<K, X, C, H> {
    /// Decides what counts as a failure.
    pub fn classifier<C2>(self, classifier: C2) -> KeyedCircuitBreakerLayer<K, X, C2, H> {
        KeyedCircuitBreakerLayer {
            breakers: self.breakers,
            extractor: self.extractor,
            classifier,
            hold: self.hold,
            max_wait: self.max_wait,
        }
    }

    /// Decides when a response holds its key's breaker open.
    pub fn hold_open<H2>(self, hold: H2) -> KeyedCircuitBreakerLayer<K, X, C, H2> {
        KeyedCircuitBreakerLayer {
            breakers: self.breakers,
            extractor: self.extractor,
            classifier: self.classifier,
            hold,
            max_wait: self.max_wait,
        }
    }

    /// No response holds a breaker open.
    pub fn no_hold_open(self) -> KeyedCircuitBreakerLayer<K, X, C, NoHold> {
        self.hold_open(NoHold)
    }

    /// The registry.
    pub fn breakers(&self) -> &KeyedBreakers<K> {
        &self.breakers
    }

    /// Holds a refusal back for up to `max` until its key's breaker is
    /// worth asking again, as
    /// [`CircuitBreakerLayer::wait_for_recovery`] does.
    pub fn wait_for_recovery(mut self, max: Duration) -> Self {
        self.max_wait = max;
        self
    }
}

impl<S, K, X: Clone, C: Clone, H: Clone> Layer<S> for KeyedCircuitBreakerLayer<K, X, C, H> {
    type Service = KeyedCircuitBreakerService<S, K, X, C, H>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedCircuitBreakerService::new(
            inner,
            self.breakers.clone(),
            self.extractor.clone(),
            self.classifier.clone(),
            self.hold.clone(),
        )
        .waiting(self.max_wait)
    }
}
