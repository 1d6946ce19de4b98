//! Adaptive pacing: a send rate learned from what a server says.
//!
//! A [`Pacer`] is a token bucket (the same GCRA word as [`TokenBucket`])
//! whose emission interval can change at any time, plus a *paused until*
//! instant. A client keeps one per host once that host has pushed back:
//!
//! - **Throttled** (`429`, or `503` with `Retry-After`): every request to
//!   the host, waiting or new, is held until the server's hint (bounded by
//!   [`PaceConfig::max_pause`]) or, without one, a short pause of about one
//!   interval of the new pace, doubled for each throttle in a row that no
//!   success separated. The pace drops multiplicatively.
//! - **Delivered** (any other response): the pace grows back, never above
//!   the ceiling (a configured rate limit, and the quota the server
//!   published).
//! - **Published** (`RateLimit` / `RateLimit-Policy` / `X-RateLimit-*`, read
//!   by [`PaceHint::from_headers`]): a quota and its window set the pace
//!   directly; nothing left with a reset time pauses until the reset.
//!
//! # The control law, and why AIMD
//!
//! The AWS SDKs' adaptive mode drives its bucket with CUBIC: on a throttle
//! the rate drops to 0.7× the measured send rate, then follows a cubic
//! curve back to, and past, the rate of the last throttle. Google's SRE
//! client throttling drops requests at random in proportion to recent
//! refusals, and gRPC's retry throttling stops *retries* when a token
//! count falls; both refuse work, which a client that must not lose
//! requests cannot do, so the pacer waits instead.
//!
//! The pacer uses CUBIC too, but cut from a measured rate and scaled to it:
//!
//! - **Decrease** to [`DECREASE`] (0.9) × the lower of the current pace and
//!   the rate the server *delivered* over about the last second (never
//!   from before the previous throttle). A server that refuses is at its
//!   limit, so what it let through just before is its rate — one throttle
//!   is enough to learn a limit, where a fixed 0.7 of the send rate needs
//!   several and then sits 30% under it. A cut is never deeper than half
//!   the pace, so one noisy window cannot collapse it.
//! - **Increase** along CUBIC's curve back to the rate of the cut
//!   (`w_max`, the cut pace / 0.9): `w_max · (1 + C·(t − K)³)` with
//!   `C` = [`CUBIC_C`] (0.03 of `w_max` per s³) and
//!   `K = ∛((1 − 0.9) / C)` ≈ 1.5 s. Concave first (back near the limit in
//!   a second and a half, then a plateau there), convex after: a limit
//!   that went up, or went away, is found again in a few seconds, where a
//!   linear AIMD increase small enough to sit near the limit takes tens of
//!   seconds to double. Scaling `C` by `w_max` (AWS uses an absolute 0.4
//!   requests/s³) makes the timing the same at 1 and at 10 000 requests a
//!   second. Against nginx at 20/s with a burst of 5, a throttle comes
//!   every four seconds or so: about 1–3% of requests, at over 90% of the
//!   limit on average.
//! - **Slow start** when no limit is known (no rate limit configured, no
//!   quota published): the first throttle creates the pacer at
//!   [`START_RATE`], which grows fourfold a second (bounded by twice what
//!   gets through) until the next throttle measures the server.
//!
//! A throttle that answers a request admitted before the last cut says
//! nothing new (TCP cuts once per window for the same reason): it may
//! lengthen the pause to its own hint, but it does not cut the pace again.
//! Without this rule the requests already queued at the old pace would
//! cut it again and again after one refusal.
//!
//! [`TokenBucket`]: crate::TokenBucket

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use apiguard_core::clock::{duration_to_nanos, nanos_to_duration};
use apiguard_core::headers::{
    RATELIMIT, RATELIMIT_POLICY, parse_ratelimit, parse_ratelimit_policy, parse_x_ratelimit,
};
use apiguard_core::{Clock, InvalidConfig, Nanos, RateLimited};
use http::HeaderMap;

use crate::gcra::{self, Rate};
use crate::limiter::Reservation;
use crate::sync::{AtomicU64, Ordering};

/// The factor a throttle multiplies the pace by (β of AIMD).
pub const DECREASE: f64 = 0.9;
/// CUBIC's scale, as a fraction of `w_max` per second cubed.
pub const CUBIC_C: f64 = 0.03;
/// The pace a pacer starts at when no limit is known, in requests per
/// second; it grows fourfold a second until the server's next throttle.
pub const START_RATE: f64 = 10.0;
/// The slowest pace by default: one request every two seconds (the AWS
/// SDKs' minimum fill rate too).
pub const DEFAULT_FLOOR: f64 = 0.5;
/// The longest pause by default.
pub const DEFAULT_MAX_PAUSE: Duration = Duration::from_secs(60);
/// Lateness a paced waiter may have without losing its slot (see
/// [`Pacer::missed`]).
pub const MISSED_SLACK: Duration = Duration::from_millis(10);
const MISSED_SLACK_NS: Nanos = 10_000_000;

/// A published quota faster than this (requests per second) is not
/// believed.
pub const MAX_RATE: f64 = 1e7;

/// A throttle's pause without a hint is clamped to this range, before it
/// doubles for throttles in a row.
const MIN_PAUSE: Nanos = 50_000_000;
const MAX_UNHINTED_PAUSE: Nanos = 1_000_000_000;
/// A measurement window shorter than this says too little.
const MIN_WINDOW: Nanos = 200_000_000;
/// Delivery is measured over about the last second: long enough to hold a
/// few requests, short enough to describe the server now rather than the
/// client's quieter past.
const TRAIL: Nanos = 1_000_000_000;
/// Marks of the delivered count are kept this far apart.
const MARK_EVERY: Nanos = 250_000_000;
const MARKS: usize = 6;
/// Growth is recomputed at most this often.
const STEP_EVERY: Nanos = 100_000_000;
/// Pace changes smaller than this fraction are not applied.
const EPSILON: f64 = 0.001;

/// The settings of a [`Pacer`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PaceConfig {
    capacity: u32,
    ceiling: Option<f64>,
    floor: f64,
    max_pause: Duration,
}

impl PaceConfig {
    /// A pacer with a burst of `capacity` requests that never paces above
    /// `ceiling` (a configured rate limit, requests per second), or
    /// without a ceiling.
    ///
    /// Refuses a zero capacity and a ceiling that is not a finite number
    /// above zero.
    pub fn new(capacity: u32, ceiling: Option<f64>) -> Result<Self, InvalidConfig> {
        if capacity == 0 {
            return Err(InvalidConfig::new("capacity", "must be at least 1"));
        }
        if let Some(c) = ceiling
            && !(c.is_finite() && c > 0.0)
        {
            return Err(InvalidConfig::new(
                "rate_limit",
                "must be a finite number above zero",
            ));
        }
        Ok(Self {
            capacity,
            ceiling: ceiling.map(|c| c.min(MAX_RATE)),
            floor: DEFAULT_FLOOR.min(ceiling.unwrap_or(f64::MAX)),
            max_pause: DEFAULT_MAX_PAUSE,
        })
    }

    /// The slowest pace (default [`DEFAULT_FLOOR`], or the ceiling when
    /// that is lower). Refuses a floor that is not a finite number above
    /// zero.
    pub fn floor(mut self, per_sec: f64) -> Result<Self, InvalidConfig> {
        if !(per_sec.is_finite() && per_sec > 0.0) {
            return Err(InvalidConfig::new(
                "floor",
                "must be a finite number above zero",
            ));
        }
        self.floor = per_sec.min(self.ceiling.unwrap_or(f64::MAX)).min(MAX_RATE);
        Ok(self)
    }

    /// The longest a host is paused, whatever it asks (default
    /// [`DEFAULT_MAX_PAUSE`]).
    pub fn max_pause(mut self, d: Duration) -> Self {
        self.max_pause = d;
        self
    }

    /// The burst size.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The configured ceiling, if any.
    pub fn ceiling(&self) -> Option<f64> {
        self.ceiling
    }

    /// The slowest pace.
    pub fn floor_rate(&self) -> f64 {
        self.floor
    }

    /// The longest pause.
    pub fn max_pause_duration(&self) -> Duration {
        self.max_pause
    }

    fn clamp_rate(&self, rate: f64, published: f64) -> f64 {
        let top = self.ceiling.unwrap_or(MAX_RATE).min(published);
        rate.min(top).max(self.floor)
    }

    fn clamp_pause(&self, d: Duration) -> Nanos {
        duration_to_nanos(d.min(self.max_pause))
    }
}

/// What a response's quota fields ask of the pace, already bounded: see
/// [`PaceHint::from_headers`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PaceHint {
    /// Nothing is left: pause this long (at most the configured maximum).
    pub pause: Option<Duration>,
    /// The published quota as a rate, requests per second (at least the
    /// floor, at most [`MAX_RATE`]).
    pub rate: Option<f64>,
}

impl PaceHint {
    /// Whether the response said nothing the pacer can use.
    pub fn is_empty(&self) -> bool {
        self.pause.is_none() && self.rate.is_none()
    }

    /// Reads the quota fields of a response:
    ///
    /// - `RateLimit: "p";r=0;t=T` (IETF) or `X-RateLimit-Remaining: 0` with
    ///   `X-RateLimit-Reset` (delay seconds or a Unix time): pause for the
    ///   longest such reset;
    /// - `RateLimit-Policy: "p";q=Q;w=W` (IETF): pace at `Q / W`, the
    ///   strictest policy when there are several.
    ///
    /// A pause is cut to `config`'s maximum; a rate below its floor is
    /// raised to the floor; a quota of zero, a window of zero or a rate
    /// above [`MAX_RATE`] is ignored, as is every field that does not
    /// parse. Never fails, never panics.
    pub fn from_headers(headers: &HeaderMap, now: SystemTime, config: &PaceConfig) -> Self {
        let mut pause: Option<Duration> = None;
        if headers.contains_key(RATELIMIT) {
            for item in parse_ratelimit(headers.get_all(RATELIMIT)) {
                if item.remaining == 0
                    && let Some(t) = item.reset
                {
                    pause = pause.max(Some(t));
                }
            }
        }
        if let Some(x) = parse_x_ratelimit(headers, now)
            && x.remaining == Some(0)
            && let Some(t) = x.reset
        {
            pause = pause.max(Some(t));
        }
        let mut rate: Option<f64> = None;
        if headers.contains_key(RATELIMIT_POLICY) {
            for p in parse_ratelimit_policy(headers.get_all(RATELIMIT_POLICY)) {
                let Some(w) = p.window.filter(|w| !w.is_zero()) else {
                    continue;
                };
                if p.quota == 0 {
                    continue;
                }
                let r = p.quota as f64 / w.as_secs_f64();
                if r.is_finite() && r <= MAX_RATE {
                    rate = Some(rate.map_or(r, |old: f64| old.min(r)));
                }
            }
        }
        Self {
            pause: pause.map(|p| p.min(config.max_pause)),
            rate: rate.map(|r| r.max(config.floor)),
        }
    }
}

/// Why a pace changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PaceReason {
    /// The server refused a request (`429`, or `503` with `Retry-After`).
    Throttled,
    /// The server published a quota.
    Quota,
    /// The server said nothing is left until a reset.
    Exhausted,
    /// Requests went through: the pace grows back.
    Recovering,
}

impl PaceReason {
    /// A short lowercase name, for logs and labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            PaceReason::Throttled => "throttled",
            PaceReason::Quota => "quota",
            PaceReason::Exhausted => "exhausted",
            PaceReason::Recovering => "recovering",
        }
    }
}

/// A change of a [`Pacer`]'s pace or pause.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PaceChange {
    /// The pace before, requests per second.
    pub old_rate: f64,
    /// The pace after.
    pub new_rate: f64,
    /// The pause this change began or lengthened (zero when none).
    pub pause: Duration,
    /// Why.
    pub reason: PaceReason,
}

/// A host's adaptive pace: see the [module docs](self).
///
/// # Clone
///
/// A clone is a handle to the same pacer.
#[derive(Clone)]
pub struct Pacer {
    inner: Arc<Inner>,
}

/// Aligned like [`TokenBucket`](crate::TokenBucket)'s state, for the same
/// reason: the words every decision writes get their own cache lines.
#[repr(align(128))]
struct Inner {
    /// The GCRA word, in plain nanoseconds.
    tat: AtomicU64,
    /// Nanoseconds per request at the current pace.
    interval: AtomicU64,
    paused_until: AtomicU64,
    /// Responses that were not throttles.
    delivered: AtomicU64,
    /// Before this instant a success does not look at the control state.
    next_step: AtomicU64,
    /// Cuts so far: a slot reserved before the last one is void.
    cuts: AtomicU64,
    config: PaceConfig,
    clock: Clock,
    control: Mutex<Control>,
}

/// The slow-moving state, touched under a lock only by responses of a
/// paced host (at most once per [`STEP_EVERY`] for successes).
struct Control {
    rate: f64,
    /// The pace growth starts from, and when it starts.
    anchor: f64,
    grow_from: Nanos,
    /// Doubling (no measured limit yet) rather than linear growth.
    probing: bool,
    /// The server's published quota as a rate (`f64::INFINITY` if none).
    published: f64,
    /// When the current measurement window began (the last throttle or
    /// exhaustion: the server's bucket was empty then), and `delivered`
    /// then.
    window: Option<(Nanos, u64)>,
    /// Throttles in a row with no success between them.
    strikes: u32,
    /// `(time, delivered)` marks of the last second or so, a ring.
    marks: [(Nanos, u64); MARKS],
    next_mark: usize,
}

impl Control {
    fn mark(&mut self, now: Nanos, delivered: u64) {
        let last = self.marks[(self.next_mark + MARKS - 1) % MARKS];
        if last.1 != u64::MAX && now.saturating_sub(last.0) < MARK_EVERY {
            return;
        }
        self.marks[self.next_mark] = (now, delivered);
        self.next_mark = (self.next_mark + 1) % MARKS;
    }

    /// Requests per second the server let through lately: since the
    /// oldest mark of the last [`TRAIL`] (or the newest older one), but
    /// never from before the last throttle, when its bucket was empty.
    fn delivery(&self, now: Nanos, delivered: u64) -> Option<f64> {
        let floor = self.window.map_or(0, |(t, _)| t);
        let mut best: Option<(Nanos, u64)> = self.window;
        for &(t, d) in &self.marks {
            if d == u64::MAX || t < floor || t > now {
                continue;
            }
            best = match best {
                None => Some((t, d)),
                Some((bt, _)) if bt < now.saturating_sub(TRAIL) && t > bt => Some((t, d)),
                Some((bt, _)) if t < bt && t >= now.saturating_sub(TRAIL) => Some((t, d)),
                keep => keep,
            };
        }
        let (start, before) = best?;
        let span = now.saturating_sub(start);
        (span >= MIN_WINDOW).then(|| delivered.saturating_sub(before) as f64 * 1e9 / span as f64)
    }
}

impl fmt::Debug for Pacer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pacer")
            .field("rate", &self.rate())
            .field("paused_until", &self.paused_until())
            .field("capacity", &self.inner.config.capacity)
            .finish()
    }
}

fn interval_of(rate: f64) -> Nanos {
    let ns = 1e9 / rate;
    if ns.is_finite() && ns >= 1.0 {
        ns.ceil().min(u64::MAX as f64 / 4.0) as Nanos
    } else {
        1
    }
}

impl Pacer {
    /// A pacer created at `now` by a first signal: its pace starts at the
    /// ceiling, or at [`START_RATE`] (growing by slow start) when there is
    /// none; its bucket is full.
    pub fn new(config: PaceConfig, clock: Clock) -> Self {
        let now = clock.now();
        let (rate, probing) = match config.ceiling {
            Some(c) => (c, false),
            None => (START_RATE.max(config.floor), true),
        };
        Self {
            inner: Arc::new(Inner {
                tat: AtomicU64::new(now),
                interval: AtomicU64::new(interval_of(rate)),
                paused_until: AtomicU64::new(0),
                delivered: AtomicU64::new(0),
                next_step: AtomicU64::new(0),
                cuts: AtomicU64::new(0),
                config,
                clock,
                control: Mutex::new(Control {
                    rate,
                    anchor: rate,
                    grow_from: now,
                    probing,
                    published: f64::INFINITY,
                    window: None,
                    strikes: 0,
                    marks: [(0, u64::MAX); MARKS],
                    next_mark: 0,
                }),
            }),
        }
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.inner
            .control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    #[inline]
    fn gcra_rate(&self) -> Rate {
        Rate::paced(
            self.inner.config.capacity,
            self.inner.interval.load(Ordering::Relaxed),
        )
    }

    /// The clock this pacer reads.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// How many handles (clones) of this pacer exist, this one included:
    /// a registry holding the only one may let it go.
    // Hidden: for the registries of apiguard's facade (`HostLimits`,
    // `HostPaces`), which let go of what nobody else holds. Not covered by
    // semver.
    #[doc(hidden)]
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// The settings.
    pub fn config(&self) -> &PaceConfig {
        &self.inner.config
    }

    /// How many times the pace was cut. Read it *before* reserving a slot:
    /// when the count has moved by the time the slot is due, the slot was
    /// laid out at the old pace and voided by the cut, and must be
    /// reserved again (the cut restarted the timeline at the pause's end,
    /// so the queue of waiters is spaced at the new pace rather than sent
    /// at the old one into a server that just refused).
    #[inline]
    pub fn cuts(&self) -> u64 {
        self.inner.cuts.load(Ordering::Acquire)
    }

    /// The time between two requests at the current pace.
    pub fn interval(&self) -> Duration {
        nanos_to_duration(self.inner.interval.load(Ordering::Relaxed))
    }

    /// Whether a slot due at `due` and taken up at `now` was missed: its
    /// waiter woke more than one interval late, and more than
    /// [`MISSED_SLACK`] (timers fire on a millisecond wheel), because the
    /// runtime was busy. Sent now, it would go out together with the
    /// requests of the slots after it, as a burst; it should take a new
    /// slot instead.
    #[inline]
    pub fn missed(&self, due: Nanos, now: Nanos) -> bool {
        let late = now.saturating_sub(due);
        late > MISSED_SLACK_NS && late > self.inner.interval.load(Ordering::Relaxed)
    }

    /// The current pace, requests per second.
    pub fn rate(&self) -> f64 {
        1e9 / self.inner.interval.load(Ordering::Relaxed) as f64
    }

    /// The instant (on the pacer's clock) until which the host is paused;
    /// in the past when it is not.
    pub fn paused_until(&self) -> Nanos {
        self.inner.paused_until.load(Ordering::Relaxed)
    }

    /// Whether the host is paused at `now`.
    #[inline]
    pub fn is_paused_at(&self, now: Nanos) -> bool {
        now < self.paused_until()
    }

    /// Reserves `cost` requests' slots if they come within `max_wait` of
    /// `now`: the grant's wait covers the pause and the pace.
    #[inline]
    pub fn reserve_at(
        &self,
        cost: u32,
        max_wait: Duration,
        now: Nanos,
    ) -> Result<Reservation, RateLimited> {
        gcra::reserve(&self.inner.tat, &self.gcra_rate(), cost, max_wait, now)
    }

    /// [`reserve_at`](Self::reserve_at) now.
    #[inline]
    pub fn reserve(&self, cost: u32, max_wait: Duration) -> Result<Reservation, RateLimited> {
        self.reserve_at(cost, max_wait, self.inner.clock.now())
    }

    /// Gives back a reservation that will not be used, if none was made
    /// after it. Returns whether it did.
    pub fn cancel(&self, reservation: &Reservation) -> bool {
        gcra::cancel(&self.inner.tat, &self.gcra_rate(), reservation)
    }

    /// Pauses until `end`, after which the bucket starts empty: the first
    /// request goes at `end`, the next one interval later.
    fn pause_until(&self, end: Nanos, interval: Nanos) {
        let i = &*self.inner;
        i.paused_until.fetch_max(end, Ordering::Relaxed);
        let burst = u64::from(i.config.capacity - 1).saturating_mul(interval);
        i.tat
            .fetch_max(end.saturating_add(burst), Ordering::Relaxed);
    }

    fn set_rate(&self, c: &mut Control, rate: f64) -> Nanos {
        c.rate = rate;
        let interval = interval_of(rate);
        self.inner.interval.store(interval, Ordering::Relaxed);
        interval
    }

    /// The server refused at `now` a request admitted at `admitted`
    /// (zero if unknown: before any cut), with a wait `hint` if it gave
    /// one: pause, and cut the pace (see the module docs).
    pub fn throttled(
        &self,
        hint: Option<Duration>,
        admitted: Nanos,
        now: Nanos,
    ) -> Option<PaceChange> {
        let cfg = &self.inner.config;
        let mut c = self.control();
        let old = c.rate;
        let delivered = self.inner.delivered.load(Ordering::Relaxed);
        if c.window.is_some_and(|(cut, _)| admitted < cut) {
            // An answer to a request admitted before the last cut.
            let end = now.saturating_add(cfg.clamp_pause(hint?));
            if end <= self.paused_until() {
                return None;
            }
            self.pause_until(end, self.inner.interval.load(Ordering::Relaxed));
            return Some(PaceChange {
                old_rate: old,
                new_rate: old,
                pause: nanos_to_duration(end - now),
                reason: PaceReason::Throttled,
            });
        }
        c.strikes = if c.window.is_some_and(|(_, before)| before == delivered) {
            c.strikes.saturating_add(1)
        } else {
            0
        };
        let measured = c.delivery(now, delivered);
        let base = match measured {
            // Slow start runs ahead of what gets through: trust the
            // measurement, unless nothing got through at all.
            Some(m) if c.probing && m > 0.0 => old.min(m),
            Some(m) => old.min(m).max(old * 0.5),
            None => old,
        };
        if measured.is_some() {
            c.probing = false;
        }
        let new = cfg.clamp_rate(base * DECREASE, c.published);
        let interval = self.set_rate(&mut c, new);
        let pause = match hint {
            Some(h) => cfg.clamp_pause(h),
            None => {
                let base = interval.clamp(MIN_PAUSE, MAX_UNHINTED_PAUSE);
                let doubled = base.saturating_mul(1 << c.strikes.min(16));
                doubled.min(cfg.clamp_pause(Duration::MAX))
            }
        };
        let end = now.saturating_add(pause);
        self.pause_until(end, interval);
        // The timeline restarts at the pause's end: every slot reserved
        // before is void (see `cuts`).
        let burst = u64::from(cfg.capacity - 1).saturating_mul(interval);
        self.inner
            .tat
            .store(end.saturating_add(burst), Ordering::Relaxed);
        self.inner.cuts.fetch_add(1, Ordering::Release);
        c.anchor = new;
        c.grow_from = end;
        c.window = Some((now, delivered));
        c.marks = [(0, u64::MAX); MARKS];
        Some(PaceChange {
            old_rate: old,
            new_rate: new,
            pause: nanos_to_duration(pause),
            reason: PaceReason::Throttled,
        })
    }

    /// A request went through at `now`: counts it, and every
    /// tenth of a second lets the pace grow back. Lock-free unless it is time
    /// to grow, and then it skips the step if another thread holds the
    /// lock.
    #[inline]
    pub fn delivered(&self, now: Nanos) -> Option<PaceChange> {
        let i = &*self.inner;
        i.delivered.fetch_add(1, Ordering::Relaxed);
        if now < i.next_step.load(Ordering::Relaxed) {
            return None;
        }
        self.grow(now)
    }

    #[cold]
    fn grow(&self, now: Nanos) -> Option<PaceChange> {
        let i = &*self.inner;
        let mut c = match i.control.try_lock() {
            Ok(c) => c,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        i.next_step
            .store(now.saturating_add(STEP_EVERY), Ordering::Relaxed);
        let delivered = i.delivered.load(Ordering::Relaxed);
        c.mark(now, delivered);
        if now <= c.grow_from {
            return None;
        }
        let secs = (now - c.grow_from) as f64 / 1e9;
        let mut target = if c.probing {
            c.anchor * (2.0 * secs.min(32.0)).exp2()
        } else {
            // K = ∛((1 − β) / C): the curve starts at the cut pace.
            let k = ((1.0 - DECREASE) / CUBIC_C).cbrt();
            let w_max = c.anchor / DECREASE;
            w_max * (1.0 + CUBIC_C * (secs.min(3600.0) - k).powi(3))
        };
        // Never more than twice what got through lately (the AWS SDKs'
        // bound too): a pace that requests are not using, because they
        // queue or because the caller is quiet, must not build up.
        if let Some(m) = c.delivery(now, delivered) {
            target = target.min((2.0 * m).max(c.rate));
        }
        let new = i.config.clamp_rate(target, c.published);
        let old = c.rate;
        if (new - old).abs() <= old * EPSILON {
            return None;
        }
        self.set_rate(&mut c, new);
        Some(PaceChange {
            old_rate: old,
            new_rate: new,
            pause: Duration::ZERO,
            reason: PaceReason::Recovering,
        })
    }

    /// Applies what a response published at `now` (see
    /// [`PaceHint::from_headers`]): a quota sets the pace (and caps its
    /// growth), nothing left pauses until the reset. Returns the change,
    /// if there was one.
    pub fn published(&self, hint: &PaceHint, now: Nanos) -> Option<PaceChange> {
        if hint.is_empty() {
            return None;
        }
        let cfg = &self.inner.config;
        let mut c = self.control();
        let old = c.rate;
        let mut change = None;
        if let Some(q) = hint.rate.filter(|q| q.is_finite() && *q > 0.0) {
            c.published = q;
            let new = cfg.clamp_rate(q, q);
            if (new - old).abs() > old * EPSILON {
                self.set_rate(&mut c, new);
                c.anchor = new;
                c.grow_from = now;
                c.probing = false;
                change = Some(PaceChange {
                    old_rate: old,
                    new_rate: new,
                    pause: Duration::ZERO,
                    reason: PaceReason::Quota,
                });
            }
        }
        if let Some(p) = hint.pause {
            let end = now.saturating_add(cfg.clamp_pause(p));
            if end > self.paused_until() {
                self.pause_until(end, self.inner.interval.load(Ordering::Relaxed));
                c.grow_from = c.grow_from.max(end);
                if c.window.is_none() {
                    let delivered = self.inner.delivered.load(Ordering::Relaxed);
                    c.window = Some((now, delivered));
                }
                change = Some(PaceChange {
                    old_rate: old,
                    new_rate: c.rate,
                    pause: nanos_to_duration(end - now),
                    reason: PaceReason::Exhausted,
                });
            }
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiguard_core::ManualClock;
    use http::HeaderValue;

    const MS: Nanos = 1_000_000;
    const SEC: Nanos = 1_000 * MS;

    fn pacer(capacity: u32, ceiling: Option<f64>) -> (Pacer, ManualClock) {
        let manual = ManualClock::new();
        manual.set(100 * SEC);
        let p = Pacer::new(PaceConfig::new(capacity, ceiling).unwrap(), manual.clock());
        (p, manual)
    }

    fn wait(p: &Pacer, now: Nanos) -> Duration {
        p.reserve_at(1, Duration::MAX, now).unwrap().grant().wait
    }

    #[test]
    fn a_slot_is_missed_only_beyond_an_interval_and_the_timer_slack() {
        let (p, clock) = pacer(1, Some(1000.0));
        let now = clock.clock().now();
        // 1 ms interval: lateness under the 10 ms slack keeps the slot.
        assert!(!p.missed(now, now + 5 * MS));
        assert!(p.missed(now, now + 11 * MS));
        let (slow, _) = pacer(1, Some(20.0));
        assert!(!slow.missed(now, now + 40 * MS));
        assert!(slow.missed(now, now + 60 * MS));
    }

    #[test]
    fn bad_settings_are_refused() {
        assert_eq!(PaceConfig::new(0, None).unwrap_err().field(), "capacity");
        for r in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(
                PaceConfig::new(1, Some(r)).unwrap_err().field(),
                "rate_limit"
            );
            assert!(PaceConfig::new(1, None).unwrap().floor(r).is_err());
        }
    }

    #[test]
    fn a_throttle_pauses_every_request_then_paces_from_an_empty_bucket() {
        let (p, clock) = pacer(5, Some(30.0));
        let now = clock.clock().now();
        let change = p.throttled(Some(Duration::from_secs(2)), now, now).unwrap();
        assert_eq!(change.reason, PaceReason::Throttled);
        assert_eq!(change.old_rate, 30.0);
        assert!((change.new_rate - 27.0).abs() < 0.01);
        assert_eq!(change.pause, Duration::from_secs(2));
        assert!(p.is_paused_at(now + SEC));
        // The first request goes when the pause ends, the next one
        // interval later: no burst into a server that just refused.
        assert_eq!(wait(&p, now), Duration::from_secs(2));
        let second = wait(&p, now);
        assert!(second > Duration::from_secs(2) && second < Duration::from_millis(2040));
    }

    #[test]
    fn one_throttle_after_a_measured_window_learns_the_servers_rate() {
        let (p, clock) = pacer(5, Some(30.0));
        let mut now = clock.clock().now();
        p.throttled(None, now, now).unwrap();
        // The server let 20 requests a second through for two seconds.
        for _ in 0..40 {
            now += 50 * MS;
            p.delivered(now);
        }
        let change = p.throttled(None, now, now).unwrap();
        assert!(
            (change.new_rate - 18.0).abs() < 0.5,
            "0.9 x the delivered 20/s, got {}",
            change.new_rate
        );
    }

    #[test]
    fn throttles_of_requests_admitted_before_the_cut_do_not_cut_again() {
        let (p, clock) = pacer(1, Some(10.0));
        let now = clock.clock().now();
        p.throttled(Some(Duration::from_secs(1)), now, now).unwrap();
        let rate = p.rate();
        assert!(p.throttled(None, now - MS, now + MS).is_none());
        assert!(p.throttled(None, 0, now + 2 * SEC).is_none());
        // A longer hint lengthens the pause, at the same pace.
        let c = p
            .throttled(Some(Duration::from_secs(3)), now - MS, now + MS)
            .unwrap();
        assert_eq!(c.new_rate, c.old_rate);
        assert_eq!(p.rate(), rate);
        assert!(p.is_paused_at(now + 3 * SEC));
    }

    #[test]
    fn unhinted_pauses_double_while_nothing_gets_through() {
        let (p, clock) = pacer(1, Some(1.0));
        let mut now = clock.clock().now();
        let mut pauses = Vec::new();
        for _ in 0..4 {
            let c = p.throttled(None, now, now).unwrap();
            pauses.push(c.pause);
            now += duration_to_nanos(c.pause);
        }
        assert!(pauses.windows(2).all(|w| w[1] == w[0] * 2), "{pauses:?}");
        // The pace never goes below the floor.
        assert!(p.rate() >= DEFAULT_FLOOR * 0.999);
    }

    #[test]
    fn successes_raise_the_pace_back_but_never_above_the_ceiling() {
        let (p, clock) = pacer(1, Some(20.0));
        let mut now = clock.clock().now();
        p.throttled(None, now, now).unwrap();
        let low = p.rate();
        for _ in 0..600 {
            now += 50 * MS;
            p.delivered(now);
        }
        assert!(p.rate() > low);
        assert!(p.rate() <= 20.0 * 1.0001, "{}", p.rate());
    }

    #[test]
    fn without_a_ceiling_the_pace_starts_low_and_doubles() {
        let (p, clock) = pacer(1, None);
        let now = clock.clock().now();
        p.throttled(None, now, now).unwrap();
        let start = p.rate();
        assert!((start - START_RATE * DECREASE).abs() < 0.01);
        let later = now + 3 * SEC;
        p.delivered(later);
        assert!(p.rate() > start * 5.0, "{}", p.rate());
    }

    #[test]
    fn a_published_quota_sets_the_pace_and_caps_growth() {
        let (p, clock) = pacer(1, Some(100.0));
        let now = clock.clock().now();
        let hint = PaceHint {
            pause: None,
            rate: Some(5.0),
        };
        let c = p.published(&hint, now).unwrap();
        assert_eq!(
            (c.old_rate, c.new_rate, c.reason),
            (100.0, 5.0, PaceReason::Quota)
        );
        for k in 1..100 {
            p.delivered(now + k * 200 * MS);
        }
        assert!((p.rate() - 5.0).abs() < 0.01);
        // The same quota again changes nothing.
        assert!(p.published(&hint, now).is_none());
        let c = p
            .published(
                &PaceHint {
                    pause: Some(Duration::from_secs(4)),
                    rate: None,
                },
                now,
            )
            .unwrap();
        assert_eq!(c.reason, PaceReason::Exhausted);
        assert!(p.is_paused_at(now + 3 * SEC));
        assert!(!p.is_paused_at(now + 4 * SEC));
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hints_are_read_from_every_family() {
        let cfg = PaceConfig::new(1, None).unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let h = headers(&[
            ("ratelimit", "\"a\";r=0;t=3, \"b\";r=5;t=60"),
            ("ratelimit-policy", "\"a\";q=10;w=1, \"b\";q=6000;w=3600"),
        ]);
        let hint = PaceHint::from_headers(&h, now, &cfg);
        assert_eq!(hint.pause, Some(Duration::from_secs(3)));
        assert!((hint.rate.unwrap() - 6000.0 / 3600.0).abs() < 1e-9);
        let h = headers(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "2000000007"),
        ]);
        let hint = PaceHint::from_headers(&h, now, &cfg);
        assert_eq!(hint.pause, Some(Duration::from_secs(7)));
        assert_eq!(hint.rate, None);
    }

    #[test]
    fn hostile_hints_are_bounded_or_ignored() {
        let cfg = PaceConfig::new(1, None)
            .unwrap()
            .max_pause(Duration::from_secs(10));
        let now = SystemTime::UNIX_EPOCH;
        let h = headers(&[
            ("ratelimit", "\"a\";r=0;t=999999999999999"),
            (
                "ratelimit-policy",
                "\"z\";q=0;w=1, \"w\";q=5;w=0, \"v\";q=1;w=999999999",
            ),
            ("x-ratelimit-remaining", "-1"),
            ("x-ratelimit-reset", "nan"),
        ]);
        let hint = PaceHint::from_headers(&h, now, &cfg);
        assert_eq!(hint.pause, Some(Duration::from_secs(10)));
        assert_eq!(hint.rate, Some(DEFAULT_FLOOR));
        let h = headers(&[("ratelimit-policy", "\"a\";q=999999999999999;w=1")]);
        assert!(PaceHint::from_headers(&h, now, &cfg).is_empty());
    }

    fn field() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            // Plausible values, hostile numbers, and noise.
            "[0-9]{1,22}",
            "-[0-9]{1,5}",
            "[0-9]{1,3}\\.[0-9]{0,12}",
            "\"[a-z]{0,3}\";r=-?[0-9]{1,17};t=-?[0-9]{1,17}",
            "\"[a-z]{0,3}\";q=-?[0-9]{1,17};w=-?[0-9]{1,17}",
            "[ -~]{0,40}",
        ]
    }

    proptest::proptest! {
        #[test]
        fn any_headers_give_a_bounded_hint_and_a_bounded_pace(
            values in proptest::collection::vec(field(), 6),
            max_pause_s in 0u64..100_000,
            ceiling in proptest::option::of(0.01f64..1e6),
        ) {
            let names = [
                "ratelimit",
                "ratelimit-policy",
                "x-ratelimit-limit",
                "x-ratelimit-remaining",
                "x-ratelimit-reset",
                "ratelimit-reset",
            ];
            let mut h = HeaderMap::new();
            for (name, v) in names.iter().zip(&values) {
                if let Ok(v) = HeaderValue::from_str(v) {
                    h.append(*name, v);
                }
            }
            let max_pause = Duration::from_secs(max_pause_s);
            let cfg = PaceConfig::new(3, ceiling).unwrap().max_pause(max_pause);
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
            let hint = PaceHint::from_headers(&h, now, &cfg);
            if let Some(p) = hint.pause {
                proptest::prop_assert!(p <= max_pause);
            }
            if let Some(r) = hint.rate {
                proptest::prop_assert!(r.is_finite() && r >= cfg.floor_rate() && r <= MAX_RATE);
            }
            // Applied to a pacer, it keeps the pace within floor and
            // ceiling and the pause within the maximum.
            let manual = ManualClock::new();
            manual.set(SEC);
            let p = Pacer::new(cfg, manual.clock());
            p.published(&hint, SEC);
            p.throttled(hint.pause, SEC, SEC);
            let rate = p.rate();
            let top = ceiling.unwrap_or(MAX_RATE);
            proptest::prop_assert!(rate <= top * 1.000_001 + 1e-9, "{} > {}", rate, top);
            proptest::prop_assert!(rate >= cfg.floor_rate() * 0.999_999, "{}", rate);
            proptest::prop_assert!(p.paused_until() <= SEC + duration_to_nanos(max_pause));
        }
    }
}
