//! [`GuardMiddleware`]: the guard in a reqwest-middleware chain.

use apiguard::client::GuardedClientBuilder;
use apiguard::{GuardLayer, HostState, InvalidConfig, NotAHost};
use http::Extensions;
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next, Result};
use tower::ServiceExt;
use tower_layer::Layer;

use crate::body::GuardBody;
use crate::error::from_guard;
use crate::next::{ChainExtensions, NextService};

/// A `reqwest_middleware::Middleware` that sends every request through the
/// same guard as [`apiguard::GuardedClient`]: per-host rate limit and
/// adaptive pacing, per-host circuit breaker, retry with backoff,
/// `Retry-After` and a retry budget, attempt and total timeouts.
///
/// See [the crate docs](crate) for an example and the errors it returns.
///
/// # Clone
///
/// Clones share the breakers, buckets, pacers and retry budget, as the
/// clones of a `GuardedClient` do. So does a middleware made with
/// [`from_layer`](Self::from_layer) from a `GuardedClient`'s
/// [`layer`](apiguard::GuardedClient::layer): the two clients then count as
/// one towards each host.
#[derive(Clone, Debug)]
pub struct GuardMiddleware {
    layer: GuardLayer,
}

impl GuardMiddleware {
    /// The guard a `GuardedClient` built from `settings` would have, with
    /// the same defaults (3 retries, a breaker per host opening after 5
    /// failures, adaptive pacing, a 10 s attempt and a 60 s total timeout).
    /// `base_url`, `default_header` and `error_for_status` belong to the
    /// client and are not used: reqwest has its own
    /// (`ClientBuilder::default_headers`, `Response::error_for_status`).
    ///
    /// Refused with the setting's name when a setting is invalid.
    pub fn new(settings: GuardedClientBuilder) -> std::result::Result<Self, InvalidConfig> {
        Ok(Self::from_layer(settings.build_layer()?))
    }

    /// Uses `layer` as it is: one built with [`GuardLayer::builder`]
    /// (where every part is off until set), or a clone of another
    /// client's, to share its state.
    pub fn from_layer(layer: GuardLayer) -> Self {
        Self { layer }
    }

    /// The guard, to inspect its breakers, buckets and pacers.
    pub fn layer(&self) -> &GuardLayer {
        &self.layer
    }

    /// One host's breaker state, tokens and pace, by its name
    /// (`"api.example.com"`, `"127.0.0.1:8080"`, or a URL): see
    /// [`GuardLayer::host`].
    pub fn host(&self, host: &str) -> std::result::Result<HostState, NotAHost> {
        self.layer.host(host)
    }
}

#[async_trait::async_trait]
impl Middleware for GuardMiddleware {
    async fn handle(
        &self,
        req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> Result<Response> {
        let mut req = http::Request::try_from(req)?.map(GuardBody);
        // Each attempt runs the rest of the chain with its own copy; the
        // caller gets the one of the attempt whose response it receives.
        req.extensions_mut()
            .insert(ChainExtensions(extensions.clone()));
        match self.layer.layer(NextService { next }).oneshot(req).await {
            Ok(mut res) => {
                if let Some(ChainExtensions(ext)) = res.extensions_mut().remove() {
                    *extensions = ext;
                }
                Ok(Response::from(res))
            }
            Err(err) => Err(from_guard(err)),
        }
    }
}
