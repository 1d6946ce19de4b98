//! [`ClientStats`]: what a client did, counted as it goes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use apiguard_core::clock::{Nanos, nanos_to_duration};

use super::error::{ClientError, ErrorKind, KINDS};

/// Counts of what a [`GuardedClient`](super::GuardedClient) did: [`GuardedClient::stats`](super::GuardedClient::stats).
///
/// `failed` is the sum of `rate_limited`, `circuit_open`,
/// `budget_exhausted`, `timeouts`, `transport` and `error_status`;
/// `retries_exhausted` counts the failed requests whose retries ran out,
/// whatever the last attempt's error was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Requests that finished (either way).
    pub requests: u64,
    /// Requests that failed: an error, or a final `429` or `5xx` response
    /// (returned as `Ok` unless the client was built with
    /// [`error_for_status`](super::GuardedClientBuilder::error_for_status)).
    pub failed: u64,
    /// ... of which refused for rate limiting (the last attempt, when
    /// retries ran out).
    pub rate_limited: u64,
    /// ... of which refused by an open circuit (likewise).
    pub circuit_open: u64,
    /// ... of which the retry budget refused to retry.
    pub budget_exhausted: u64,
    /// ... of which timed out.
    pub timeouts: u64,
    /// ... of which failed in the transport.
    pub transport: u64,
    /// ... of which ended in a final `429` or `5xx` response, or, with
    /// `error_for_status`, any `4xx`/`5xx`.
    pub error_status: u64,
    /// Failed requests that were retried until the retries (or the
    /// deadline) ran out.
    pub retries_exhausted: u64,
    /// Attempts that went out on the network (first tries and retries).
    pub attempts: u64,
    /// ... of which were retries.
    pub retries: u64,
    /// Time requests spent in total.
    pub request_time: Duration,
    /// Time attempts spent on the network.
    pub attempt_time: Duration,
}

impl ClientStats {
    /// Time requests spent waiting (for tokens, for backoff, for the circuit)
    /// rather than on the network.
    pub fn waiting(&self) -> Duration {
        self.request_time.saturating_sub(self.attempt_time)
    }
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) requests: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) by_kind: [AtomicU64; KINDS],
    pub(super) retries_exhausted: AtomicU64,
    pub(super) attempts: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) request_nanos: AtomicU64,
    pub(super) attempt_nanos: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> ClientStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClientStats {
            requests: l(&self.requests),
            failed: l(&self.failed),
            rate_limited: l(&self.by_kind[ErrorKind::RateLimited as usize]),
            circuit_open: l(&self.by_kind[ErrorKind::CircuitOpen as usize]),
            budget_exhausted: l(&self.by_kind[ErrorKind::BudgetExhausted as usize]),
            timeouts: l(&self.by_kind[ErrorKind::Timeout as usize]),
            transport: l(&self.by_kind[ErrorKind::Transport as usize]),
            error_status: l(&self.by_kind[ErrorKind::Status as usize]),
            retries_exhausted: l(&self.retries_exhausted),
            attempts: l(&self.attempts),
            retries: l(&self.retries),
            request_time: nanos_to_duration(l(&self.request_nanos)),
            attempt_time: nanos_to_duration(l(&self.attempt_nanos)),
        }
    }

    /// Counts a finished request: `elapsed` in the stack, ending in
    /// `result`, a final `429` or `5xx` when `failed_status`.
    pub(super) fn record<T>(
        &self,
        elapsed: Nanos,
        result: &Result<T, ClientError>,
        failed_status: bool,
    ) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.request_nanos.fetch_add(elapsed, Ordering::Relaxed);
        if failed_status {
            self.failed.fetch_add(1, Ordering::Relaxed);
            self.by_kind[ErrorKind::Status as usize].fetch_add(1, Ordering::Relaxed);
        }
        if let Err(err) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            self.by_kind[err.kind() as usize].fetch_add(1, Ordering::Relaxed);
            if err.retries_exhausted() {
                self.retries_exhausted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
