//! One breaker per key, with bounded memory.

use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use apiguard_core::map::BoundedMap;
use apiguard_core::{InvalidConfig, KeyExtractor};
use http::Request;
use http::uri::Authority;

use crate::breaker::{CircuitBreaker, CircuitBreakerBuilder, Hook, State, Transition};

/// Keys HTTP requests by the authority (`host[:port]`) of their URI, or
/// their `Host` header when the URI has none: one breaker per upstream on a
/// client. Every request has a key: those with neither share the breaker
/// of the key `None`.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostKey;

impl<B> KeyExtractor<Request<B>> for HostKey {
    type Key = Option<Authority>;
    #[inline]
    fn extract(&self, req: &Request<B>) -> Option<Option<Authority>> {
        Some(host_of(req))
    }
}

/// The authority of `req`'s URI, or of its `Host` header.
fn host_of<B>(req: &Request<B>) -> Option<Authority> {
    if let Some(a) = req.uri().authority() {
        return Some(a.clone());
    }
    let host = req.headers().get(http::header::HOST)?;
    Authority::try_from(host.as_bytes()).ok()
}

/// Keys HTTP requests by their path: one breaker per route on a server
/// whose routes have no path parameters. (With parameters, key by axum's
/// `MatchedPath` in a closure instead, or every id gets its own breaker.)
#[derive(Debug, Clone, Copy, Default)]
pub struct PathKey;

impl<B> KeyExtractor<Request<B>> for PathKey {
    type Key = String;
    fn extract(&self, req: &Request<B>) -> Option<String> {
        Some(req.uri().path().to_owned())
    }
}

/// A registry of breakers, one per key, all built from one template.
///
/// Memory stays bounded without a background task. The breakers live in a
/// [`BoundedMap`], whose one eviction rule this is: a breaker that is
/// closed, has counted no failure, has no trip to back off from and is not
/// in use is the same as a fresh one, so such breakers are the idle
/// entries, dropped as the map is used (a sweep every time the map has
/// doubled since the last one, and when it reaches `max_keys`). A breaker
/// that is in use, or remembers anything, is never dropped. At `max_keys`
/// with nothing idle, a new key gets no breaker of its own: every such key
/// shares one *overflow breaker*, built from the template, until sweeps
/// make room. `len()` never exceeds `max_keys`.
///
/// Every breaker calls the template's
/// [`on_transition`](CircuitBreakerBuilder::on_transition) hook, which does
/// not know the key; [`on_transition`](Self::on_transition) adds a hook that
/// does; the overflow breaker has no key and calls the template's hook
/// and the one [`on_overflow_transition`](Self::on_overflow_transition)
/// adds.
///
/// Cloning is cheap and clones share the registry.
pub struct KeyedBreakers<K> {
    inner: Arc<Registry<K>>,
}

type KeyedHook<K> = Arc<dyn Fn(&K, &Transition) + Send + Sync + 'static>;
type HookSlot<K> = Arc<RwLock<Option<KeyedHook<K>>>>;
type Attach<K> = Box<dyn Fn(&K, &CircuitBreaker) + Send + Sync + 'static>;
type Namer<K> = Box<dyn Fn(&K) -> Arc<str> + Send + Sync + 'static>;

struct Registry<K> {
    map: BoundedMap<K, CircuitBreaker>,
    template: CircuitBreakerBuilder,
    /// The key-aware hooks, composed into one.
    hook: HookSlot<K>,
    /// Set by the first `on_transition`: gives a breaker a hook that calls
    /// `hook` with its key. Until then breakers get nothing, so a registry
    /// without a hook does no work for it.
    attach: OnceLock<Attach<K>>,
    /// Set by `name_breakers`: each breaker's name, from its key.
    namer: OnceLock<Namer<K>>,
}

impl<K> Clone for KeyedBreakers<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<K> fmt::Debug for KeyedBreakers<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBreakers")
            .field("max_keys", &self.inner.map.max_keys())
            .field("len", &self.inner.map.len())
            .field("template", &self.inner.template)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone> KeyedBreakers<K> {
    /// A registry of at most `max_keys` breakers built from `template`.
    /// Refuses a template that does not build, and `max_keys = 0`.
    pub fn new(template: CircuitBreakerBuilder, max_keys: usize) -> Result<Self, InvalidConfig> {
        if max_keys == 0 {
            return Err(InvalidConfig::new("max_keys", "must be at least 1"));
        }
        let overflow = template.build_shared()?;
        Ok(Self {
            inner: Arc::new(Registry {
                map: BoundedMap::new(max_keys, overflow.clone())
                    .with_clock(overflow.clock().clone()),
                template,
                hook: Arc::new(RwLock::new(None)),
                attach: OnceLock::new(),
                namer: OnceLock::new(),
            }),
        })
    }

    /// Names each breaker after its key in its `tracing` events (the
    /// `breaker` field): `name(key)`, after the template's name and a `/`
    /// when it has one, called once per breaker, when it is made. Set once; a later call
    /// does nothing. Breakers made before keep their name.
    ///
    /// ```
    /// use apiguard_breaker::{CircuitBreaker, KeyedBreakers};
    ///
    /// let breakers = KeyedBreakers::<String>::new(CircuitBreaker::builder(), 1_000)?
    ///     .name_breakers(|key| format!("payments/{key}").into());
    /// # Ok::<(), apiguard_core::InvalidConfig>(())
    /// ```
    pub fn name_breakers(self, name: impl Fn(&K) -> Arc<str> + Send + Sync + 'static) -> Self
    where
        K: 'static,
    {
        let _ = self.inner.namer.set(Box::new(name));
        self
    }

    /// Adds a hook called with the key on every transition of every
    /// breaker of the registry — those it holds now and those it makes
    /// later — after the template's own hook, on the thread that made the
    /// transition. Hooks added earlier still run, first.
    ///
    /// Clones share the registry, so the hook applies to all of them. Keep
    /// it short and do not use this registry from it: it may run inside a
    /// call, under a lock of the registry's map. The breaker of a key the
    /// registry reclaims and makes again gets the hook again.
    pub fn on_transition(self, f: impl Fn(&K, &Transition) + Send + Sync + 'static) -> Self
    where
        K: Send + Sync + 'static,
    {
        let reg = &*self.inner;
        {
            let mut slot = reg.hook.write().unwrap_or_else(PoisonError::into_inner);
            let f: KeyedHook<K> = match slot.take() {
                None => Arc::new(f),
                Some(earlier) => Arc::new(move |k: &K, t: &Transition| {
                    earlier(k, t);
                    f(k, t);
                }),
            };
            *slot = Some(f);
        }
        let slot = reg.hook.clone();
        let _ = reg
            .attach
            .set(Box::new(move |key: &K, breaker: &CircuitBreaker| {
                breaker.attach_registry_hook(|| keyed_hook(slot.clone(), key.clone()))
            }));
        // A breaker made from now on gets the hook in `with`; one made
        // before is found here (the map's locks order the two).
        if let Some(attach) = reg.attach.get() {
            reg.map.for_each(|k, b| attach(k, b));
        }
        self
    }

    /// Adds a hook called on every transition of the shared overflow
    /// breaker (which has no key, so [`on_transition`](Self::on_transition)
    /// does not reach it), after the template's own hook. Only the first
    /// such hook is kept: a registry has one overflow breaker, and one
    /// place to report it.
    pub fn on_overflow_transition(self, f: impl Fn(&Transition) + Send + Sync + 'static) -> Self {
        self.overflow().attach_registry_hook(|| Arc::new(f));
        self
    }

    /// The breaker of `key`, created if need be (the shared overflow
    /// breaker if the registry is full of breakers in use).
    pub fn get(&self, key: K) -> CircuitBreaker {
        self.with(&key, CircuitBreaker::clone)
    }

    /// The breaker of `key`, if it has one.
    pub fn peek(&self, key: &K) -> Option<CircuitBreaker> {
        self.inner.map.get(key).map(|b| CircuitBreaker::clone(&b))
    }

    /// The state of `key`'s breaker; a key without one reads as closed
    /// (even while the overflow breaker it would share is open).
    pub fn state(&self, key: &K) -> State {
        self.inner.map.get(key).map_or(State::Closed, |b| b.state())
    }

    /// How many breakers the registry holds.
    pub fn len(&self) -> usize {
        self.inner.map.len()
    }

    /// The breaker keys share when the registry is full.
    pub fn overflow(&self) -> &CircuitBreaker {
        self.inner.map.overflow()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.inner.map.is_empty()
    }

    /// The cap on the number of breakers.
    pub fn max_keys(&self) -> usize {
        self.inner.map.max_keys()
    }

    /// Runs `f` on `key`'s breaker without cloning its handle.
    ///
    /// `f` runs under a read lock of the map's shard: a transition hook that
    /// writes to this registry could deadlock.
    pub(crate) fn with<R>(&self, key: &K, f: impl FnOnce(&CircuitBreaker) -> R) -> R {
        let reg = &*self.inner;
        if let Some(b) = reg.map.get(key) {
            return f(&b);
        }
        let b = reg.map.get_or_insert_with(
            key,
            || {
                // The template was checked in `new`.
                let name = reg
                    .namer
                    .get()
                    .map(|name| reg.template.sub_name(&name(key)));
                let built = match name {
                    Some(name) => reg.template.build_named(Some(name)),
                    None => reg.template.build_shared(),
                };
                built.unwrap_or_else(|_| unreachable!())
            },
            Some(&mut |_, b: &CircuitBreaker| b.is_idle()),
        );
        if !b.is_overflow()
            && let Some(attach) = reg.attach.get()
        {
            attach(key, &b);
        }
        f(&b)
    }
}

/// The breaker-level hook that passes `key` to the registry's hooks as they
/// are at the time of the transition.
fn keyed_hook<K: Send + Sync + 'static>(slot: HookSlot<K>, key: K) -> Hook {
    Arc::new(move |t: &Transition| {
        // Cloned out so that a hook adding a hook does not deadlock.
        let hook = slot.read().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(hook) = hook {
            hook(&key, t);
        }
    })
}
