//! How well Redis answers: the round-trip estimate that sets the decision
//! timeout, the offset between Redis `TIME` and our clock that turns a
//! caller's deadline into Redis terms, and the small breaker that decides
//! when decisions leave Redis for the failure policy and when they return.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use apiguard_core::Nanos;
use apiguard_core::clock::{duration_to_nanos, nanos_to_duration};

/// Where a [`RedisLimiter`](crate::RedisLimiter)'s decisions come from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// Redis decides (a decision it misses is still refused or admitted
    /// by the failure policy, one at a time).
    Redis,
    /// Redis missed [`FAILURES_TO_LEAVE`] answers in a row over at least
    /// one timeout: the failure policy decides every request at once, and
    /// a probe in the background (one at a time,
    /// [`probe_every`](crate::RedisLimiterBuilder::probe_every) after the
    /// last one failed) asks Redis again. The first answer brings the
    /// limiter back.
    Fallback,
}

/// A snapshot of a limiter's view of Redis, from
/// [`RedisLimiter::health`](crate::RedisLimiter::health).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// Who decides now.
    pub mode: Mode,
    /// The timeout the next decision gets.
    pub timeout: Duration,
    /// The smoothed round trip of recent decisions (`None` before the
    /// first answer).
    pub rtt: Option<Duration>,
    /// How many instances share the limit, as far as this one knows (the
    /// larger of [`instances`](crate::RedisLimiterBuilder::instances) and
    /// the count Redis' register of live instances last gave); `None`
    /// when neither is known, in which case the local share refuses.
    pub instances: Option<u32>,
    /// Decisions in a row Redis did not answer in time.
    pub failures_in_a_row: u32,
    /// On a Redis Cluster, how many masters the slot map names (`Some(0)`
    /// until it is first read); `None` on one node.
    pub shards: Option<u32>,
    /// On a Redis Cluster, how many of those masters missed enough
    /// decisions that the failure policy decides their keys now.
    pub shards_away: u32,
}

/// Decisions in a row Redis must miss (over at least one timeout) before
/// the limiter leaves it for the failure policy.
pub const FAILURES_TO_LEAVE: u32 = 3;

/// The shortest decision timeout, whatever the round trip: a loaded
/// machine delays replies by a few scheduler slices (a few ms each), and
/// a miss costs a refusal, so the timeout stays well above that.
pub const DEFAULT_TIMEOUT_FLOOR: Duration = Duration::from_millis(20);

/// The longest decision timeout, and the one used before the first round
/// trip is measured.
pub const DEFAULT_TIMEOUT_CEILING: Duration = Duration::from_millis(200);

/// While in [`Mode::Fallback`], how long after a failed probe the next one
/// goes.
pub const DEFAULT_PROBE_EVERY: Duration = Duration::from_millis(10);

/// The Redis-to-local clock offset is the best (largest) sample of the
/// current and the previous epoch of this length, so a step of Redis'
/// clock is forgotten within two epochs.
const OFFSET_EPOCH: Nanos = 10_000_000_000;

/// How the timeout is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeoutRule {
    /// The measured round trip (`srtt + 4 × rttvar`, as TCP sets its
    /// retransmission timeout), clamped to these bounds.
    Adaptive { floor: Nanos, ceiling: Nanos },
    /// Always this.
    Fixed(Nanos),
}

/// Shared by every clone of a limiter; every field is an atomic read or
/// update, and racing updates only lose a sample.
#[derive(Debug)]
pub(crate) struct Monitor {
    rule: TimeoutRule,
    probe_every: Nanos,
    /// Smoothed round trip and its mean deviation, ns (0: no sample yet).
    srtt: AtomicU64,
    rttvar: AtomicU64,
    timeout: AtomicU64,
    /// Lower bounds of `redis_time - local_time`, ns, per epoch.
    offset_cur: AtomicI64,
    offset_prev: AtomicI64,
    offset_epoch: AtomicU64,
    away: AtomicBool,
    failures: AtomicU32,
    /// Local time of the first miss since the last answer (0: none).
    first_failure: AtomicU64,
    /// Local time from which the next probe may go (while away).
    next_probe: AtomicU64,
    /// A probe is in flight.
    probing: AtomicBool,
    /// Instances Redis' register counted last (0: not known).
    learned_instances: AtomicU32,
    hint_instances: u32,
}

/// What a miss did to the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Miss {
    /// Still in Redis mode.
    Stay,
    /// This miss made the limiter leave Redis.
    Left,
    /// Already away.
    Away,
}

const NO_OFFSET: i64 = i64::MIN;

impl Monitor {
    pub(crate) fn new(rule: TimeoutRule, probe_every: Duration, hint_instances: u32) -> Self {
        let timeout = match rule {
            TimeoutRule::Adaptive { ceiling, .. } => ceiling,
            TimeoutRule::Fixed(t) => t,
        };
        Self {
            rule,
            probe_every: duration_to_nanos(probe_every),
            srtt: AtomicU64::new(0),
            rttvar: AtomicU64::new(0),
            timeout: AtomicU64::new(timeout),
            offset_cur: AtomicI64::new(NO_OFFSET),
            offset_prev: AtomicI64::new(NO_OFFSET),
            offset_epoch: AtomicU64::new(0),
            away: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            first_failure: AtomicU64::new(0),
            next_probe: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            learned_instances: AtomicU32::new(0),
            hint_instances,
        }
    }

    pub(crate) fn has_rtt(&self) -> bool {
        self.srtt.load(Ordering::Relaxed) != 0
    }

    pub(crate) fn timeout(&self) -> Nanos {
        self.timeout.load(Ordering::Relaxed)
    }

    pub(crate) fn is_away(&self) -> bool {
        self.away.load(Ordering::Relaxed)
    }

    /// Whether a probe should go now (while away): one at a time, the
    /// next one `probe_every` after the last one failed.
    pub(crate) fn take_probe(&self, now: Nanos) -> bool {
        now >= self.next_probe.load(Ordering::Relaxed)
            && !self.probing.load(Ordering::Relaxed)
            && !self.probing.swap(true, Ordering::Acquire)
    }

    /// The probe in flight ended (its answer, if any, already went through
    /// [`answered`](Self::answered) or [`missed`](Self::missed)).
    pub(crate) fn probe_done(&self, now: Nanos) {
        self.next_probe
            .store(now.saturating_add(self.probe_every), Ordering::Relaxed);
        self.probing.store(false, Ordering::Release);
    }

    /// The Redis time (µs) matching local time `local` (ns of the system
    /// clock), never later than the true one; `None` before any sample.
    pub(crate) fn to_redis_us(&self, local: Nanos) -> Option<u64> {
        let offset = self
            .offset_cur
            .load(Ordering::Relaxed)
            .max(self.offset_prev.load(Ordering::Relaxed));
        if offset == NO_OFFSET {
            return None;
        }
        let t = i128::from(local) + i128::from(offset);
        u64::try_from(t / 1000).ok().filter(|&us| us > 0)
    }

    /// A reply came: Redis read `redis_us` on its clock somewhere between
    /// `sent` and `received` (system clock, ns).
    pub(crate) fn sample(&self, sent: Nanos, received: Nanos, redis_us: i64) {
        // The script ran no later than `received`, so this is a lower bound
        // of the offset: deadlines made with it are early, never late.
        let offset = i128::from(redis_us) * 1000 - i128::from(received);
        if let Ok(offset) = i64::try_from(offset) {
            let epoch = self.offset_epoch.load(Ordering::Relaxed);
            if received >= epoch.saturating_add(OFFSET_EPOCH)
                && self
                    .offset_epoch
                    .compare_exchange(epoch, received, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                let cur = self.offset_cur.swap(offset, Ordering::Relaxed);
                self.offset_prev.store(cur, Ordering::Relaxed);
            } else {
                self.offset_cur.fetch_max(offset, Ordering::Relaxed);
            }
        }
        self.rtt(received.saturating_sub(sent));
    }

    fn rtt(&self, rtt: Nanos) {
        let srtt = self.srtt.load(Ordering::Relaxed);
        let (srtt, rttvar) = if srtt == 0 {
            (rtt.max(1), rtt / 2)
        } else {
            let var = self.rttvar.load(Ordering::Relaxed);
            let dev = srtt.abs_diff(rtt);
            ((srtt * 7 + rtt) / 8, (var * 3 + dev) / 4)
        };
        self.srtt.store(srtt, Ordering::Relaxed);
        self.rttvar.store(rttvar, Ordering::Relaxed);
        if let TimeoutRule::Adaptive { floor, ceiling } = self.rule {
            let t = srtt.saturating_add(rttvar.saturating_mul(4));
            self.timeout
                .store(t.clamp(floor, ceiling), Ordering::Relaxed);
        }
        metrics::histogram!("apiguard_redis_rtt_seconds").record(nanos_to_duration(rtt));
    }

    /// Redis answered in time. Returns whether this brought the limiter
    /// back from [`Mode::Fallback`].
    pub(crate) fn answered(&self) -> bool {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.first_failure.store(0, Ordering::Relaxed);
        }
        self.away.load(Ordering::Relaxed) && self.away.swap(false, Ordering::AcqRel)
    }

    /// Redis missed a decision (no answer in time, an error, or an answer
    /// that came after the caller's deadline).
    pub(crate) fn missed(&self, now: Nanos) -> Miss {
        if self.away.load(Ordering::Relaxed) {
            return Miss::Away;
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let first = match self.first_failure.compare_exchange(
            0,
            now.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => now,
            Err(first) => first,
        };
        // Several misses at the same moment (one stall of this process
        // timing out every decision in flight) are one event, not several:
        // leaving also takes a timeout's worth of silence.
        if failures >= FAILURES_TO_LEAVE
            && now.saturating_sub(first) >= self.timeout()
            && !self.away.swap(true, Ordering::AcqRel)
        {
            self.next_probe
                .store(now.saturating_add(self.probe_every), Ordering::Relaxed);
            return Miss::Left;
        }
        if self.is_away() {
            Miss::Away
        } else {
            Miss::Stay
        }
    }

    pub(crate) fn failures_in_a_row(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    pub(crate) fn set_learned_instances(&self, n: u32) {
        self.learned_instances.store(n, Ordering::Relaxed);
    }

    /// How many instances share the limit (0: unknown).
    pub(crate) fn instances(&self) -> u32 {
        self.hint_instances
            .max(self.learned_instances.load(Ordering::Relaxed))
    }

    pub(crate) fn health(&self) -> Health {
        let srtt = self.srtt.load(Ordering::Relaxed);
        let n = self.instances();
        Health {
            mode: if self.is_away() {
                Mode::Fallback
            } else {
                Mode::Redis
            },
            timeout: nanos_to_duration(self.timeout()),
            rtt: (srtt != 0).then(|| nanos_to_duration(srtt)),
            instances: (n != 0).then_some(n),
            failures_in_a_row: self.failures_in_a_row(),
            shards: None,
            shards_away: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;

    fn adaptive() -> Monitor {
        Monitor::new(
            TimeoutRule::Adaptive {
                floor: duration_to_nanos(DEFAULT_TIMEOUT_FLOOR),
                ceiling: duration_to_nanos(DEFAULT_TIMEOUT_CEILING),
            },
            DEFAULT_PROBE_EVERY,
            0,
        )
    }

    #[test]
    fn the_timeout_follows_the_round_trip_within_its_bounds() {
        let m = adaptive();
        assert_eq!(m.timeout(), 200 * MS, "the ceiling before any sample");
        for _ in 0..50 {
            m.sample(0, MS / 2, 1);
        }
        assert_eq!(m.timeout(), 20 * MS, "a fast Redis gets the floor");
        for _ in 0..50 {
            m.sample(0, 30 * MS, 1);
        }
        let t = m.timeout();
        assert!(t > 30 * MS && t < 60 * MS, "{t}");
        for _ in 0..50 {
            m.sample(0, 900 * MS, 1);
        }
        assert_eq!(m.timeout(), 200 * MS, "never past the ceiling");
    }

    #[test]
    fn one_stall_does_not_leave_redis_but_a_timeout_of_silence_does() {
        let m = adaptive();
        m.sample(0, MS, 1);
        let t = m.timeout();
        // Ten decisions in flight all time out at one moment.
        for _ in 0..10 {
            assert_eq!(m.missed(100 * MS), Miss::Stay);
        }
        assert!(!m.answered(), "an answer resets the count");
        assert_eq!(m.missed(200 * MS), Miss::Stay);
        assert_eq!(m.missed(200 * MS + t / 2), Miss::Stay);
        assert_eq!(m.missed(200 * MS + t), Miss::Left);
        assert_eq!(m.missed(200 * MS + t + 1), Miss::Away);
        assert_eq!(m.health().mode, Mode::Fallback);
        // One probe at a time, the next one an interval after a failure;
        // the first answer brings it back.
        let now = 200 * MS + t;
        assert!(!m.take_probe(now), "the first probe waits one interval");
        assert!(m.take_probe(now + 10 * MS));
        assert!(!m.take_probe(now + 50 * MS), "one probe in flight");
        m.probe_done(now + 60 * MS);
        assert!(!m.take_probe(now + 65 * MS));
        assert!(m.take_probe(now + 70 * MS));
        assert!(m.answered());
        m.probe_done(now + 71 * MS);
        assert_eq!(m.health().mode, Mode::Redis);
        assert_eq!(m.failures_in_a_row(), 0);
    }

    #[test]
    fn deadlines_in_redis_time_are_never_late() {
        let m = adaptive();
        assert_eq!(m.to_redis_us(5 * MS), None);
        // Redis read 1_000_000 µs while we were between 10 and 12 ms.
        m.sample(10 * MS, 12 * MS, 1_000_000);
        // So Redis time = local + (1 s - 12 ms) at the latest estimate.
        assert_eq!(m.to_redis_us(12 * MS), Some(1_000_000));
        assert_eq!(m.to_redis_us(20 * MS), Some(1_008_000));
        // A faster sample tightens the bound.
        m.sample(30 * MS, 30 * MS + 100_000, 1_018_500);
        assert_eq!(m.to_redis_us(30 * MS + 100_000), Some(1_018_500));
    }

    #[test]
    fn the_share_uses_the_larger_of_hint_and_register() {
        let m = Monitor::new(TimeoutRule::Fixed(MS), DEFAULT_PROBE_EVERY, 2);
        assert_eq!(m.instances(), 2);
        m.set_learned_instances(5);
        assert_eq!(m.health().instances, Some(5));
        m.set_learned_instances(1);
        assert_eq!(m.instances(), 2);
    }
}
