//! The GCRA decision as a Lua script, and the integer units it works in.
//!
//! # Units
//!
//! Redis runs Lua 5.1, whose numbers are doubles: integers are exact up to
//! 2^53. Time comes from Redis `TIME` in microseconds (about 1.8·10^15 today,
//! well inside that range), so no instance's clock takes part in a decision.
//!
//! One token's emission interval, `window / limit` microseconds, is rarely a
//! whole number (3 per second is 333 333.3… µs). Rounding it would change the
//! rate, so the script counts in *ticks* of `1 / l` microseconds, where
//! `window_us / limit` reduced to lowest terms is `w / l`: one token is
//! exactly `w` ticks. The theoretical arrival time (TAT) is stored as whole
//! microseconds plus a remainder in ticks (`"<tat_us>:<ticks>"`), and all
//! arithmetic is done relative to `now`, where magnitudes stay below 2^52.
//!
//! # One key, one round trip
//!
//! The script reads and writes only `KEYS[1]` (cluster-safe) and answers in
//! the same call. Its key expires when the bucket is full again (`PX` = time
//! to refill, rounded up to the millisecond), so idle keys cost no memory.

use std::time::Duration;

use apiguard_core::InvalidConfig;

/// The decision script. `KEYS[1]` is the bucket; `ARGV` is `w` (ticks per
/// token), `l` (ticks per microsecond), `tol` (burst tolerance in ticks:
/// capacity × `w`), `cost` (tokens), then four that are usually zero and
/// may be left off from the end (an absent one is zero): `deadline` (Redis
/// time in microseconds after which the caller no longer waits for the
/// answer; 0 for none), `max_wait` (microseconds), `lease` (extra tokens to
/// take, if they are there now, for the caller to hand out locally) and
/// `debit` (tokens the caller admitted on its own while Redis was away, to
/// take from the bucket now, never below empty).
///
/// Returns `{allowed, remaining, wait_us, reset_us, leased, now_us}`: on
/// admission `wait_us` is how long the caller must wait for its (reserved)
/// tokens; on refusal it is how long until they would be there, and
/// nothing but the debit was written. `reset_us` is the time until the
/// bucket is full again; `leased` the extra tokens taken (only when `cost`
/// was available now); `now_us` Redis `TIME`. A script that runs after its
/// deadline answers `allowed = -1` and touches nothing: the caller has
/// already decided without it, so it must not spend a token.
///
/// # Cost in Redis
///
/// The script runs on Redis' one thread, so its cost bounds a fleet's
/// decisions per second. Lua function calls are the dear part, so it makes
/// few: numbers come from strings by arithmetic coercion (`s + 0`, not
/// `tonumber`), `floor(x)` is `x - x % 1` and `ceil(x)` is `x + (-x) % 1`
/// (exact for the non-negative integers-over-integers here: Lua 5.1's `%`
/// is `a - floor(a / b) * b`), the write is in line rather than a closure
/// made per call, and the usually-zero arguments are not sent.
pub(crate) const GCRA_LUA: &str = r#"
local w = ARGV[1] + 0
local l = ARGV[2] + 0
local tol = ARGV[3] + 0
local cost = ARGV[4] + 0
local deadline = ARGV[5]
deadline = deadline and deadline + 0 or 0
local max_wait = ARGV[6]
max_wait = max_wait and max_wait * l or 0
local lease = ARGV[7]
lease = lease and lease + 0 or 0
local debit = ARGV[8]
debit = debit and debit + 0 or 0
-- Before Redis 5 a script must opt in to effect replication to write after
-- reading TIME. From Redis 7 on (which alone sets REDIS_VERSION_NUM) the
-- call is a no-op; skipping it saves a call into Redis per decision.
if redis.REDIS_VERSION_NUM == nil and redis.replicate_commands ~= nil then redis.replicate_commands() end
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
if deadline > 0 and now > deadline then
  return {-1, 0, 0, 0, 0, now}
end
-- d: the stored TAT relative to now, in ticks (0 when the bucket is full).
local d = 0
local v = redis.call('GET', KEYS[1])
if v then
  local us, fr = string.match(v, '^(%d+):(%d+)$')
  if us then
    local diff = us - now
    if diff >= 0 then
      -- A TAT this far ahead only comes from Redis' clock jumping back;
      -- the cap keeps the arithmetic exact.
      local cap = 2251799813685248 / l
      cap = cap - cap % 1
      if diff > cap then diff = cap end
      fr = fr + 0
      if fr >= l then fr = l - 1 end
      d = diff * l + fr
    end
  end
end
local debited = false
if debit > 0 and d < tol then
  local nd = d + debit * w
  if nd > tol then nd = tol end
  d = nd
  debited = true
end
local new_d = d + cost * w
local wait = new_d - tol
if wait < 0 then wait = 0 end
local allowed = 1
local leased = 0
if wait > max_wait then
  -- Refused: nothing but the debit is written.
  allowed = 0
  new_d = d
elseif lease > 0 and cost > 0 and wait == 0 then
  leased = (tol - new_d) / w
  leased = leased - leased % 1
  if leased > lease then leased = lease end
  if leased > 0 then new_d = new_d + leased * w else leased = 0 end
end
if new_d > d or debited then
  local us = new_d / l
  us = us - us % 1
  local fr = new_d - us * l
  if fr < 0 then us = us - 1; fr = fr + l end
  if fr >= l then us = us + 1; fr = fr - l end
  local ttl = new_d / (l * 1000)
  ttl = ttl + (-ttl) % 1
  if ttl < 1 then ttl = 1 end
  -- '%d' formats through a C long (64 bits on every Redis platform), exact
  -- below 2^53 and cheaper than '%.0f'; ttl (ms) is far below 10^14, so
  -- Redis' own number-to-string conversion keeps it whole.
  redis.call('SET', KEYS[1], string.format('%d:%d', now + us, fr), 'PX', ttl)
end
local remaining = 0
if tol > new_d then
  remaining = (tol - new_d) / w
  remaining = remaining - remaining % 1
end
local wait_us = wait / l
wait_us = wait_us + (-wait_us) % 1
local reset_us = new_d / l
reset_us = reset_us + (-reset_us) % 1
return {allowed, remaining, wait_us, reset_us, leased, now}
"#;

/// The script that keeps the register of live instances: `KEYS[1]` is a
/// sorted set of instance ids scored by the Redis time of their last
/// heartbeat; `ARGV` is this instance's id and how long (µs) an instance
/// counts as live after its last heartbeat. Returns how many are live,
/// this one included.
pub(crate) const HEARTBEAT_LUA: &str = r#"
if redis.REDIS_VERSION_NUM == nil and redis.replicate_commands ~= nil then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local live = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - live)
redis.call('PEXPIRE', KEYS[1], math.ceil(live / 1000) * 2)
return redis.call('ZCARD', KEYS[1])
"#;

/// Every quantity the script multiplies stays below this (2^50), so sums of
/// a few of them stay exact in a double.
const EXACT_LIMIT: u128 = 1 << 50;

/// A quota in the script's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Units {
    /// Ticks per token.
    pub(crate) w: u64,
    /// Ticks per microsecond.
    pub(crate) l: u64,
    /// Burst tolerance in ticks (capacity × `w`).
    pub(crate) tol: u64,
    /// The largest `max_wait` (µs) the script can take exactly.
    pub(crate) max_wait_us: u64,
}

impl Units {
    /// `limit` tokens per `window`, bursts of up to `burst` tokens.
    pub(crate) fn new(limit: u64, window: Duration, burst: u64) -> Result<Self, InvalidConfig> {
        if limit == 0 {
            return Err(InvalidConfig::new("limit", "must be at least 1"));
        }
        if burst == 0 {
            return Err(InvalidConfig::new("burst", "must be at least 1"));
        }
        let window_us = window.as_micros();
        if window_us == 0 {
            return Err(InvalidConfig::new("window", "must be at least 1 µs"));
        }
        let g = gcd(window_us, u128::from(limit));
        let w = window_us / g;
        let l = u128::from(limit) / g;
        let tol = w * u128::from(burst);
        if tol > EXACT_LIMIT {
            return Err(InvalidConfig::new(
                "burst",
                "burst × (window / limit) is beyond the script's exact integer range (2^50 ticks)",
            ));
        }
        // `l` divides `limit` (< 2^64) and `w`, `tol` were bounded above.
        Ok(Self {
            w: w as u64,
            l: l as u64,
            tol: tol as u64,
            max_wait_us: (EXACT_LIMIT / l) as u64,
        })
    }

    /// `max_wait` in whole microseconds, clamped to what the script takes.
    pub(crate) fn max_wait_us(&self, max_wait: Duration) -> u64 {
        let us = max_wait.as_micros();
        if us > u128::from(self.max_wait_us) {
            self.max_wait_us
        } else {
            us as u64
        }
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_exact_for_rates_that_are_not_whole_microseconds() {
        // 3 per second: one token is 1_000_000 / 3 µs, i.e. 1_000_000 ticks of 1/3 µs.
        let u = Units::new(3, Duration::from_secs(1), 3).unwrap();
        assert_eq!((u.w, u.l, u.tol), (1_000_000, 3, 3_000_000));
    }

    #[test]
    fn units_reduce_to_lowest_terms() {
        let u = Units::new(100, Duration::from_secs(1), 10).unwrap();
        assert_eq!((u.w, u.l, u.tol), (10_000, 1, 100_000));
    }

    #[test]
    fn zero_limit_burst_or_window_is_refused() {
        assert_eq!(
            Units::new(0, Duration::from_secs(1), 1)
                .unwrap_err()
                .field(),
            "limit"
        );
        assert_eq!(
            Units::new(1, Duration::from_secs(1), 0)
                .unwrap_err()
                .field(),
            "burst"
        );
        assert_eq!(
            Units::new(1, Duration::from_nanos(999), 1)
                .unwrap_err()
                .field(),
            "window"
        );
    }

    #[test]
    fn quotas_beyond_exact_range_are_refused() {
        // One token a year with a burst of a billion: 3e13 µs × 1e9.
        let err = Units::new(1, Duration::from_secs(31_536_000), 1_000_000_000).unwrap_err();
        assert_eq!(err.field(), "burst");
    }

    #[test]
    fn max_wait_is_clamped_to_the_exact_range() {
        let u = Units::new(1_000_000, Duration::from_secs(1), 1).unwrap();
        assert_eq!(u.l, 1);
        assert_eq!(u.max_wait_us(Duration::MAX), 1 << 50);
        assert_eq!(u.max_wait_us(Duration::from_millis(3)), 3_000);
    }
}
