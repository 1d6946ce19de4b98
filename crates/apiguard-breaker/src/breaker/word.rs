//! The state word: one `AtomicU64` that every transition swaps.

use super::*;

// The state word. Bits 0..3 are the mode; the rest depends on it:
// - Closed, ForcedOpen, Disabled: an epoch, unique to this period;
// - Open: the instant (in clock nanos, 61 bits = 73 years) probing may start;
// - HalfOpen: probes in flight (bits 3..19), probe successes (19..35), and
//   the epoch (35..64) that the probe permits carry.
// Every transition is one compare-and-swap of this word, so exactly one
// thread makes it, and a permit from an earlier period finds a different
// word and records nothing.
pub(super) const MODE_MASK: u64 = 0b111;
pub(super) const CLOSED: u64 = 0;
pub(super) const OPEN: u64 = 1;
pub(super) const HALF_OPEN: u64 = 2;
pub(super) const FORCED_OPEN: u64 = 3;
pub(super) const DISABLED: u64 = 4;
pub(super) const PAYLOAD_MAX: u64 = u64::MAX >> 3;
pub(super) const INFLIGHT_SHIFT: u32 = 3;
pub(super) const SUCCESS_SHIFT: u32 = 19;
pub(super) const EPOCH_SHIFT: u32 = 35;
pub(super) const U16: u64 = 0xffff;
/// The shortest wait named to a call refused while a probe is in flight.
pub(super) const MIN_PROBE_HINT: Nanos = 10_000_000;

pub(super) const fn closed(epoch: u64) -> u64 {
    (epoch & PAYLOAD_MAX) << 3 | CLOSED
}
pub(super) const fn open(until: Nanos) -> u64 {
    let until = if until > PAYLOAD_MAX {
        PAYLOAD_MAX
    } else {
        until
    };
    until << 3 | OPEN
}
pub(super) const fn half_open(epoch: u64, in_flight: u64, successes: u64) -> u64 {
    (epoch << EPOCH_SHIFT)
        | (successes << SUCCESS_SHIFT)
        | (in_flight << INFLIGHT_SHIFT)
        | HALF_OPEN
}
pub(super) const fn mode(w: u64) -> u64 {
    w & MODE_MASK
}
pub(super) const fn payload(w: u64) -> u64 {
    w >> 3
}
pub(super) const fn in_flight(w: u64) -> u64 {
    (w >> INFLIGHT_SHIFT) & U16
}
pub(super) const fn successes(w: u64) -> u64 {
    (w >> SUCCESS_SHIFT) & U16
}
pub(super) const fn ho_epoch(w: u64) -> u64 {
    w >> EPOCH_SHIFT
}

pub(super) fn state_of(w: u64) -> State {
    match mode(w) {
        CLOSED => State::Closed,
        OPEN => State::Open,
        HALF_OPEN => State::HalfOpen,
        FORCED_OPEN => State::ForcedOpen,
        _ => State::Disabled,
    }
}
