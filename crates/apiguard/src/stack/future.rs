//! Future types.
//!
//! [`GuardFuture`] is one request's state machine: an attempt in flight,
//! waiting for a token, a backoff, an open breaker or a ready service, and
//! asking [`admission`](super::admission) again before each later attempt.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use apiguard_core::{BoxError, Nanos};
use apiguard_retry::future::Wait;
use apiguard_retry::{RetryState, TryCloneBody};
use http::Request;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::admission::{Admission, Call, Hold, Shared};
use super::timer::{Armed, Timer, elapsed};
use crate::recovery::BreakerWait;

/// The parts of a request's state that only a wait or a retry needs; kept on
/// the heap so the success path moves a small future.
pub(super) struct Slow<B> {
    /// The request of the attempt being admitted or waited for.
    next: Option<Request<B>>,
    hold: Option<Hold>,
    token: Option<Pin<Box<Sleep>>>,
    backoff: Option<Pin<Box<Wait>>>,
    /// Waiting for the host's breaker to let the attempt through.
    breaker: Option<BreakerWait>,
    /// When the request first waited for a breaker: its place in the
    /// breaker's backlog.
    queued_at: Option<Nanos>,
    /// The attempt already took a new slot once for waking late: it keeps
    /// the next one however late it wakes, so a starved runtime cannot
    /// starve the request.
    relaid: bool,
}

impl<B> Slow<B> {
    fn empty() -> Self {
        Self {
            next: None,
            hold: None,
            token: None,
            backoff: None,
            breaker: None,
            queued_at: None,
            relaid: false,
        }
    }

    /// `req` waits for the token (or paced slot) `hold`, due after `wait`.
    pub(super) fn token(req: Request<B>, hold: Hold, wait: std::time::Duration) -> Box<Self> {
        Box::new(Self {
            next: Some(req),
            hold: Some(hold),
            token: Some(Box::pin(tokio::time::sleep(wait))),
            ..Self::empty()
        })
    }

    /// `req` waits for its host's breaker, in the backlog since `queued_at`.
    pub(super) fn breaker(
        req: Request<B>,
        wait: BreakerWait,
        queued_at: Option<Nanos>,
    ) -> Box<Self> {
        Box::new(Self {
            next: Some(req),
            breaker: Some(wait),
            queued_at,
            ..Self::empty()
        })
    }
}

pin_project! {
    #[project = StepProj]
    pub(super) enum Step<F> {
        // An attempt is in flight.
        Called { #[pin] fut: F },
        // Waiting for the token of the attempt in `slow.next`.
        Token,
        // Waiting out the backoff before the next attempt.
        Backoff,
        // Waiting for the host's breaker to change (`slow.breaker`).
        Recovering,
        // Admitting `slow.next` (after a backoff).
        Admit,
        // Waiting for the service to be ready for `slow.next`.
        Calling,
        // Refused before any attempt, for good.
        Failed { err: Option<BoxError> },
        Done,
    }
}

pin_project! {
    /// Response future of [`Guard`](super::Guard): one request through
    /// retry, breaker and rate limit.
    ///
    /// Dropping it gives back a token it was waiting for, releases its
    /// breaker permit unrecorded, and refunds a retry it had drawn from the
    /// budget but not yet made.
    #[project = GuardFutureProj]
    pub struct GuardFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        pub(super) step: Step<S::Future>,
        // Kept only by a request that may be retried.
        pub(super) shared: Option<Arc<Shared>>,
        // The service for attempts after the first.
        pub(super) svc: Option<S>,
        pub(super) retry: RetryState,
        // The copy kept for retries.
        pub(super) stored: Option<Request<B>>,
        pub(super) permit: Option<Call>,
        pub(super) slow: Option<Box<Slow<B>>>,
        // The one timer of both timeouts, armed for the earlier deadline.
        pub(super) timer: Timer,
    }
}

impl<S, B> fmt::Debug for GuardFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardFuture")
            .field("attempts", &self.retry.attempts())
            .finish_non_exhaustive()
    }
}

impl<S, B> GuardFuture<S, B>
where
    S: Service<Request<B>>,
    B: TryCloneBody,
{
    /// The future of a request refused before its first attempt: retried
    /// if the policy says so, else failed with `err`.
    pub(super) fn refused<R>(
        timer: Timer,
        shared: Option<Arc<Shared>>,
        svc: Option<S>,
        retry: RetryState,
        stored: Option<Request<B>>,
        permit: Option<Call>,
        err: BoxError,
    ) -> Self
    where
        S: Service<Request<B>, Response = http::Response<R>>,
    {
        let mut fut = GuardFuture {
            timer,
            step: Step::Done,
            shared,
            svc,
            retry,
            stored,
            permit,
            slow: None,
        };
        if let Some(Err(err)) = fut.after_attempt::<R>(Err(err)) {
            fut.step = Step::Failed { err: Some(err) };
        }
        fut
    }

    /// An attempt ended in `result` (refused before it was made, or
    /// answered): `Some(result)` to return it, `None` when a retry is
    /// scheduled (the step is then `Backoff`).
    fn after_attempt<R>(
        &mut self,
        result: Result<http::Response<R>, BoxError>,
    ) -> Option<Result<http::Response<R>, BoxError>> {
        let mut result = result;
        let scheduled = schedule(
            self.shared.as_deref(),
            &mut self.retry,
            self.stored.as_ref(),
            &mut self.slow,
            &mut result,
        );
        if scheduled {
            self.step = Step::Backoff;
            None
        } else {
            Some(result)
        }
    }
}

/// The copy of `req` kept for retries, if the policy may retry it.
#[inline]
pub(super) fn copy_for_retry<B: TryCloneBody>(
    shared: &Shared,
    req: &Request<B>,
) -> Option<Request<B>> {
    shared.retry.as_ref().and_then(|p| p.copy_request(req))
}

/// The shared state of a request past its first attempt (which only a
/// request that may be retried, or one that waited, reaches).
fn later(shared: &Option<Arc<Shared>>) -> &Shared {
    shared
        .as_deref()
        .unwrap_or_else(|| unreachable!("a later attempt keeps the shared state"))
}

/// The request of the attempt being admitted.
fn next_of<B>(slow: &Option<Box<Slow<B>>>) -> &Request<B> {
    slow.as_ref()
        .and_then(|s| s.next.as_ref())
        .unwrap_or_else(|| unreachable!("an attempt being admitted has its request"))
}

fn slow_of<B>(slow: &mut Option<Box<Slow<B>>>) -> &mut Slow<B> {
    slow.get_or_insert_with(|| Box::new(Slow::empty()))
}

/// Asks the retry policy about `result`; on a retry, puts the backoff and a
/// fresh copy of the request in `slow` and says `true`.
fn schedule<B: TryCloneBody, R>(
    shared: Option<&Shared>,
    state: &mut RetryState,
    stored: Option<&Request<B>>,
    slow: &mut Option<Box<Slow<B>>>,
    result: &mut Result<http::Response<R>, BoxError>,
) -> bool {
    let (Some(policy), Some(stored)) = (shared.and_then(|s| s.retry.as_ref()), stored) else {
        return false;
    };
    let Some(wait) = policy.on_result(state, stored, result) else {
        return false;
    };
    // A copy made before has been copied again, so this one works too.
    let Some(next) = policy.copy_request(stored) else {
        return false;
    };
    let slow = slow_of(slow);
    slow.next = Some(next);
    slow.backoff = Some(Box::pin(wait));
    true
}

const POLLED_AFTER_DONE: &str = "GuardFuture polled after it completed";

/// What one step of [`GuardFuture::poll`] leads to.
enum Flow<R> {
    /// The step changed: poll the new one.
    Again,
    /// An attempt ended, or was refused: the retry policy decides.
    Attempted(Result<http::Response<R>, BoxError>),
    /// `poll` returns this.
    Return(Poll<Result<http::Response<R>, BoxError>>),
}

/// The value of a ready `$poll`; when it is pending, returns from the step
/// what a pending wait means (see [`GuardFuture::waiting`]).
macro_rules! wait {
    ($this:ident, $cx:ident, $poll:expr) => {
        match $poll {
            Poll::Ready(v) => v,
            Poll::Pending => return Self::waiting($this, $cx),
        }
    };
}

type Proj<'a, S, B> = GuardFutureProj<'a, S, B>;

impl<S, B, R> GuardFuture<S, B>
where
    S: Service<Request<B>, Response = http::Response<R>>,
    S::Error: Into<BoxError>,
    B: TryCloneBody,
{
    /// While waiting (for a token, a backoff, a ready service), only the
    /// total deadline can pass: it ends the request.
    fn waiting(this: &mut Proj<'_, S, B>, cx: &mut Context<'_>) -> Flow<R> {
        if this.timer.poll_elapsed(cx).is_some() {
            this.step.set(Step::Done);
            *this.permit = None;
            *this.slow = None;
            return Flow::Return(Poll::Ready(Err(elapsed())));
        }
        Flow::Return(Poll::Pending)
    }

    /// An attempt is in flight: its answer, or a timeout.
    fn poll_called(this: &mut Proj<'_, S, B>, cx: &mut Context<'_>) -> Flow<R> {
        let StepProj::Called { fut } = this.step.as_mut().project() else {
            unreachable!("polled as called")
        };
        if let Poll::Ready(result) = fut.poll(cx) {
            let mut result = result.map_err(Into::into);
            if let Some(call) = this.permit.take() {
                call.record(&mut result);
            }
            return Flow::Attempted(result);
        }
        match this.timer.poll_elapsed(cx) {
            None => Flow::Return(Poll::Pending),
            Some(Armed::Attempt) => {
                // This attempt timed out; the request goes on.
                this.step.set(Step::Done);
                let mut result = Err(elapsed());
                if let Some(call) = this.permit.take() {
                    call.record(&mut result);
                }
                Flow::Attempted(result)
            }
            Some(_) => {
                this.step.set(Step::Done);
                if let Some(call) = this.permit.take()
                    && this.timer.attempt_unbounded
                {
                    // With no attempt timeout, this is how a hang ends: the
                    // breaker counts it as a failure.
                    call.record(&mut Err::<http::Response<R>, _>(elapsed()));
                }
                *this.slow = None;
                Flow::Return(Poll::Ready(Err(elapsed())))
            }
        }
    }

    /// Waiting for the token (or paced slot) of the next attempt.
    fn poll_token(this: &mut Proj<'_, S, B>, cx: &mut Context<'_>) -> Flow<R> {
        let slow = slow_of(this.slow);
        if let Some(sleep) = slow.token.as_mut() {
            wait!(this, cx, sleep.as_mut().poll(cx));
        }
        let slow = slow_of(this.slow);
        slow.token = None;
        if let Some(mut hold) = slow.hold.take() {
            if hold.stale(!slow.relaid) {
                slow.relaid = true;
                // Held by a pause that began while it waited, or late for
                // its slot: admitted again (the slot goes back, the
                // breaker's ticket unrecorded).
                drop(hold);
                *this.permit = None;
                this.step.set(Step::Admit);
                return Flow::Again;
            }
            hold.spent = true;
        }
        this.step.set(Step::Calling);
        Flow::Again
    }

    /// Waiting out the backoff before the next attempt.
    fn poll_backoff(this: &mut Proj<'_, S, B>, cx: &mut Context<'_>) -> Flow<R> {
        let slow = slow_of(this.slow);
        if let Some(wait) = slow.backoff.as_mut() {
            wait!(this, cx, wait.as_mut().poll(cx));
        }
        slow_of(this.slow).backoff = None;
        this.step.set(Step::Admit);
        Flow::Again
    }

    /// Waiting for the host's breaker to change.
    fn poll_recovering(this: &mut Proj<'_, S, B>, cx: &mut Context<'_>) -> Flow<R> {
        let slow = slow_of(this.slow);
        let waited = match slow.breaker.as_mut() {
            Some(wait) => wait!(this, cx, wait.poll(cx)),
            None => Ok(()),
        };
        let slow = slow_of(this.slow);
        slow.breaker = None;
        if let Err(open) = waited {
            // `max_wait` ran out: the request ends here, as one that waited
            // too long for a token does.
            slow.next = None;
            this.step.set(Step::Done);
            return Flow::Return(Poll::Ready(Err(Box::new(open))));
        }
        this.step.set(Step::Admit);
        Flow::Again
    }

    /// Asks the breaker and the bucket again, for the next attempt.
    fn admit(this: &mut Proj<'_, S, B>) -> Flow<R> {
        match later(this.shared).admit_again(next_of(this.slow), this.permit) {
            Admission::Go => {
                this.step.set(Step::Calling);
                Flow::Again
            }
            Admission::Open(open, breaker) => {
                let shared = later(this.shared);
                let slow = slow_of(this.slow);
                match BreakerWait::start(
                    &breaker,
                    open,
                    &mut slow.queued_at,
                    shared.max_wait,
                    this.timer.total_end,
                ) {
                    Some(wait) => {
                        slow.breaker = Some(wait);
                        this.step.set(Step::Recovering);
                        Flow::Again
                    }
                    None => {
                        slow.next = None;
                        Flow::Attempted(Err(Box::new(open)))
                    }
                }
            }
            Admission::Wait(wait, hold) => {
                let slow = slow_of(this.slow);
                slow.hold = Some(hold);
                slow.token = Some(Box::pin(tokio::time::sleep(wait)));
                this.step.set(Step::Token);
                Flow::Again
            }
            Admission::Refused(err) => {
                slow_of(this.slow).next = None;
                Flow::Attempted(Err(err))
            }
        }
    }

    /// Waiting for the service to be ready, then sending the attempt.
    fn poll_calling(this: &mut Proj<'_, S, B>, cx: &mut Context<'_>) -> Flow<R> {
        let svc = this
            .svc
            .as_mut()
            .unwrap_or_else(|| unreachable!("a later attempt has its service"));
        match wait!(this, cx, svc.poll_ready(cx)) {
            Ok(()) => {
                let req = slow_of(this.slow)
                    .next
                    .take()
                    .unwrap_or_else(|| unreachable!("an admitted attempt has its request"));
                let fut = svc.call(req);
                this.step.set(Step::Called { fut });
                let attempt_timeout = later(this.shared).attempt_timeout;
                if attempt_timeout.is_some() {
                    this.timer.attempt_started(attempt_timeout, Instant::now());
                }
                Flow::Again
            }
            Err(e) => {
                this.permit.take();
                slow_of(this.slow).next = None;
                Flow::Attempted(Err(e.into()))
            }
        }
    }
}

impl<S, B, R> Future for GuardFuture<S, B>
where
    S: Service<Request<B>, Response = http::Response<R>>,
    S::Error: Into<BoxError>,
    B: TryCloneBody,
{
    type Output = Result<http::Response<R>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let flow = match this.step.as_mut().project() {
                StepProj::Called { .. } => Self::poll_called(&mut this, cx),
                StepProj::Token => Self::poll_token(&mut this, cx),
                StepProj::Backoff => Self::poll_backoff(&mut this, cx),
                StepProj::Recovering => Self::poll_recovering(&mut this, cx),
                StepProj::Admit => Self::admit(&mut this),
                StepProj::Calling => Self::poll_calling(&mut this, cx),
                StepProj::Failed { err } => {
                    let err = err.take().expect(POLLED_AFTER_DONE);
                    this.step.set(Step::Done);
                    return Poll::Ready(Err(err));
                }
                StepProj::Done => panic!("{POLLED_AFTER_DONE}"),
            };
            let mut result = match flow {
                Flow::Again => continue,
                Flow::Return(poll) => return poll,
                Flow::Attempted(result) => result,
            };
            if schedule(
                this.shared.as_deref(),
                this.retry,
                this.stored.as_ref(),
                this.slow,
                &mut result,
            ) {
                this.timer.between_attempts();
                this.step.set(Step::Backoff);
                continue;
            }
            this.step.set(Step::Done);
            return Poll::Ready(result);
        }
    }
}
