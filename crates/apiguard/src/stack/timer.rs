//! The one timer of a request's two timeouts (per attempt and total).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use apiguard_core::BoxError;
use tokio::time::{Instant, Sleep};

use super::admission::Shared;

/// Which deadline the timer is armed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Armed {
    Off,
    Attempt,
    Total,
}

/// The timer of a request's two timeouts. The tokio timer itself is made
/// (on the heap) only when the request first has to wait: a request that
/// completes at once never registers one.
pub(super) struct Timer {
    sleep: Option<Pin<Box<Sleep>>>,
    armed: Armed,
    deadline: Option<Instant>,
    /// The request's total deadline.
    pub(super) total_end: Option<Instant>,
    /// No attempt timeout: the total deadline is what ends a hung attempt.
    pub(super) attempt_unbounded: bool,
}

impl Timer {
    /// The timer of a new request, armed for its first attempt if that
    /// starts now (`attempting`), else for the total deadline.
    #[inline]
    pub(super) fn start(shared: &Shared, attempting: bool) -> Self {
        let mut timer = Timer {
            sleep: None,
            armed: Armed::Off,
            deadline: None,
            total_end: None,
            attempt_unbounded: false,
        };
        if shared.total_timeout.is_none() && shared.attempt_timeout.is_none() {
            return timer;
        }
        let now = Instant::now();
        timer.total_end = shared.total_timeout.map(|d| now + d);
        timer.attempt_unbounded = shared.attempt_timeout.is_none();
        if attempting {
            timer.attempt_started(shared.attempt_timeout, now);
        } else {
            timer.between_attempts();
        }
        timer
    }

    fn arm(&mut self, deadline: Instant, armed: Armed) {
        if let Some(sleep) = &mut self.sleep {
            sleep.as_mut().reset(deadline);
        }
        self.deadline = Some(deadline);
        self.armed = armed;
    }

    /// An attempt starts at `now`: the earlier of its deadline and the
    /// total one.
    pub(super) fn attempt_started(&mut self, attempt_timeout: Option<Duration>, now: Instant) {
        match (attempt_timeout.map(|d| now + d), self.total_end) {
            (Some(a), Some(t)) if a < t => self.arm(a, Armed::Attempt),
            (Some(a), None) => self.arm(a, Armed::Attempt),
            (_, Some(t)) => self.arm(t, Armed::Total),
            (None, None) => self.armed = Armed::Off,
        }
    }

    /// Between attempts only the total deadline runs.
    pub(super) fn between_attempts(&mut self) {
        match self.total_end {
            Some(t) if self.armed != Armed::Total => self.arm(t, Armed::Total),
            Some(_) => {}
            None => self.armed = Armed::Off,
        }
    }

    /// Which deadline passed, if one did. Called when the request would
    /// wait: registers the timer.
    #[inline]
    pub(super) fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Option<Armed> {
        if self.armed == Armed::Off {
            return None;
        }
        let deadline = self.deadline?;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Some(std::mem::replace(&mut self.armed, Armed::Off)),
            Poll::Pending => None,
        }
    }
}

pub(super) fn elapsed() -> BoxError {
    Box::new(tower::timeout::error::Elapsed::new())
}
