//! The calls waiting for a breaker to let them through again, and how they
//! are woken.
//!
//! A refused call that chooses to wait registers here (through
//! [`Recovered`](crate::future::Recovered)). The breaker touches this list
//! only when it changes state — never on the closed path — and then:
//!
//! - on a close, it *releases* the backlog: each waiter gets the instant it
//!   may go, oldest first, spread so that the recovering dependency sees the
//!   queue at a bounded pace (see [`release`](Waiters::release));
//! - on any other change, it wakes every waiter, which looks at the new
//!   state and waits on (a new probe time, a probe in flight) or goes.
//!
//! The list is a `BTreeMap` behind a mutex: waiting is the slow path, and
//! the order of the keys (when each call started waiting) is the order of
//! the release.

use std::collections::BTreeMap;
use std::task::Waker;

use apiguard_core::Nanos;

use crate::sync::Mutex;

/// A waiter's place: when it started waiting, then a sequence number.
pub(crate) type Key = (Nanos, u64);

/// How much faster than it gathered the backlog is let go, as a fraction:
/// 1/1 replays it at the rate the waiters arrived, so with the new calls
/// arriving meanwhile the dependency sees about twice its usual rate. Every
/// waiter then waits about as long as the oldest one (the time the circuit
/// was open), which the oldest has to anyway: with equal deadlines, going
/// faster would save no request.
const SPREAD_NUM: u128 = 1;
const SPREAD_DEN: u128 = 1;

#[derive(Debug, Default)]
pub(crate) struct Waiters {
    list: Mutex<List>,
}

#[derive(Debug, Default)]
struct List {
    next_seq: u64,
    entries: BTreeMap<Key, Entry>,
}

#[derive(Debug)]
struct Entry {
    waker: Option<Waker>,
    /// Set by a close: when this waiter may go.
    release_at: Option<Nanos>,
}

impl Waiters {
    fn lock(&self) -> impl std::ops::DerefMut<Target = List> + '_ {
        // A panic while the list is held cannot leave it inconsistent (every
        // change is a single map operation), so a poisoned lock is used as is.
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a waiter that started waiting at `queued_at`.
    pub(crate) fn register(&self, queued_at: Nanos, waker: &Waker) -> Key {
        let mut list = self.lock();
        let key = (queued_at, list.next_seq);
        list.next_seq += 1;
        list.entries.insert(
            key,
            Entry {
                waker: Some(waker.clone()),
                release_at: None,
            },
        );
        key
    }

    /// The instant the waiter at `key` was released for, if a close has
    /// released it (its entry is then gone); otherwise keeps `waker` to wake.
    pub(crate) fn poll(&self, key: Key, waker: &Waker) -> Option<Nanos> {
        let mut list = self.lock();
        let entry = list.entries.get_mut(&key)?;
        if let Some(at) = entry.release_at {
            list.entries.remove(&key);
            return Some(at);
        }
        match &mut entry.waker {
            Some(w) if w.will_wake(waker) => {}
            slot => *slot = Some(waker.clone()),
        }
        None
    }

    /// Forgets the waiter at `key` (it went, or gave up).
    pub(crate) fn remove(&self, key: Key) {
        self.lock().entries.remove(&key);
    }

    /// How many calls are waiting.
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Wakes every waiter not yet released, to look at the breaker again.
    pub(crate) fn wake_all(&self) {
        let wakers: Vec<Waker> = {
            let mut list = self.lock();
            if list.entries.is_empty() {
                return;
            }
            list.entries
                .values_mut()
                .filter(|e| e.release_at.is_none())
                .filter_map(|e| e.waker.take())
                .collect()
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// The breaker closed at `now`: lets the backlog go, oldest first,
    /// evenly over the time it took to gather (at its average arrival
    /// rate, so a burst of arrivals is not replayed as a burst), and over
    /// at most `max`. The first goes at once.
    pub(crate) fn release(&self, now: Nanos, max: Nanos) {
        let wakers: Vec<Waker> = {
            let mut list = self.lock();
            let mut pending = list
                .entries
                .iter()
                .filter(|(_, e)| e.release_at.is_none())
                .map(|(k, _)| k.0);
            let Some(first) = pending.next() else {
                return;
            };
            let (last, n) = pending.fold((first, 1u128), |(_, n), at| (at, n + 1));
            let span = u128::from(last.saturating_sub(first));
            let spread = (span * SPREAD_NUM / SPREAD_DEN).min(u128::from(max));
            list.entries
                .values_mut()
                .filter(|e| e.release_at.is_none())
                .enumerate()
                .filter_map(|(i, e)| {
                    let offset = u64::try_from(spread * i as u128 / n).unwrap_or(u64::MAX);
                    e.release_at = Some(now.saturating_add(offset));
                    e.waker.take()
                })
                .collect()
        };
        wakers.into_iter().for_each(Waker::wake);
    }
}
