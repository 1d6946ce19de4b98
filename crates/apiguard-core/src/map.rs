//! A keyed map with a hard cap and one eviction rule, shared by every
//! registry of per-key state (buckets, breakers, hosts).
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use apiguard_core::map::BoundedMap;
//!
//! // At most two keys; keys past the cap share the overflow counter.
//! let hits: BoundedMap<&str, AtomicU32> = BoundedMap::new(2, AtomicU32::new(0));
//! // An entry is idle when dropping it changes nothing: here, a zero count.
//! let mut idle = |_: &&str, c: &AtomicU32| c.load(Ordering::Relaxed) == 0;
//! for key in ["a", "b", "c"] {
//!     let slot = hits.get_or_insert_with(&key, || AtomicU32::new(0), Some(&mut idle));
//!     slot.fetch_add(1, Ordering::Relaxed);
//! }
//! assert_eq!(hits.len(), 2);
//! assert!(hits.get(&"c").is_none());
//! assert_eq!(hits.overflow().load(Ordering::Relaxed), 1); // "c" landed here
//! ```

use std::borrow::Borrow;
use std::fmt;
use std::hash::Hash;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use dashmap::mapref::one::Ref;

use crate::clock::{Clock, Nanos};

/// foldhash with a per-map random seed: keys are often chosen by clients
/// (addresses, API keys, hosts), so the seed keeps collisions
/// unpredictable, and it hashes a key several times faster than std's
/// SipHash (the `scale` bench).
type Hasher = foldhash::fast::RandomState;

/// Growth sweeps start once the map holds this many entries.
const MIN_SWEEP_LEN: usize = 64;

/// At the cap, the next sweep waits this long (ns) per entry the last one
/// kept, so a map where new keys keep asking for room spends a bounded
/// share of its time sweeping (a sweep costs well under 1 µs per entry).
const SWEEP_SPACING_PER_ENTRY: Nanos = 1_000;

/// The "is this entry idle" question a sweep asks of every entry: `true`
/// when dropping it changes nothing a caller can see (a full bucket, a
/// closed breaker with an empty window), and never for an entry still in
/// use or referenced elsewhere.
pub type Idle<'a, K, V> = &'a mut dyn FnMut(&K, &V) -> bool;

/// A concurrent map of at most `max_keys` entries, with one eviction rule.
///
/// # Eviction
///
/// When a new key arrives, the map may first be *swept*: every entry the
/// caller's idle test accepts is dropped. A sweep runs when the map has
/// grown to twice what the last sweep left (and at least 64 entries), or
/// when it is at `max_keys`; at the cap, sweeps are spaced by 1 µs (read
/// on the map's [`Clock`]) per entry the last one kept, so a flood of new
/// keys does not turn into a sweep per key. There is no background task.
///
/// If the map is still at `max_keys`, the new key is not tracked: it gets
/// the single *overflow entry*, shared by every untracked key, until a
/// sweep makes room. So memory stays bounded, tracked entries are never
/// dropped while in use, and untracked keys are held together to the
/// overflow entry's own limit — nothing is lost or admitted twice.
///
/// `len()` never exceeds `max_keys`, even while threads insert at once: a
/// slot is counted before its entry is inserted.
///
/// # Concurrency
///
/// Sharded (`DashMap`): a read of a tracked key takes one shard's read
/// lock and no atomic write, so concurrent readers stay cheap. A closure
/// given to the map (the idle test, `make`) runs under a shard lock: it
/// must not use the same map.
pub struct BoundedMap<K, V> {
    map: DashMap<K, V, Hasher>,
    overflow: V,
    max_keys: usize,
    /// Entries plus insertions in flight; a slot is taken here before an
    /// insert, so this bounds the map at every instant.
    count: AtomicUsize,
    /// A growth sweep runs once `count` reaches this.
    sweep_at_len: AtomicUsize,
    clock: Clock,
    /// At the cap, no sweep before this instant (spacing).
    sweep_not_before: AtomicU64,
    sweeping: AtomicBool,
}

/// A reference to a map's entry, or to its overflow entry. Holds a read
/// lock on the entry's shard: keep it short.
pub struct Slot<'a, K, V> {
    inner: SlotRef<'a, K, V>,
}

enum SlotRef<'a, K, V> {
    Tracked(Ref<'a, K, V>),
    Overflow(&'a V),
}

impl<K, V> Slot<'_, K, V> {
    /// Whether this is the overflow entry (the key is not tracked).
    #[inline]
    pub fn is_overflow(&self) -> bool {
        matches!(self.inner, SlotRef::Overflow(_))
    }
}

impl<K: Hash + Eq, V> Deref for Slot<'_, K, V> {
    type Target = V;

    #[inline]
    fn deref(&self) -> &V {
        match &self.inner {
            SlotRef::Tracked(r) => r.value(),
            SlotRef::Overflow(v) => v,
        }
    }
}

impl<K: Hash + Eq, V: fmt::Debug> fmt::Debug for Slot<'_, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("overflow", &self.is_overflow())
            .field("value", &**self)
            .finish()
    }
}

impl<K, V> fmt::Debug for BoundedMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedMap")
            .field("len", &self.count.load(Ordering::Relaxed))
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq, V> BoundedMap<K, V> {
    /// An empty map of at most `max_keys` entries (`0`: every key shares
    /// `overflow`).
    pub fn new(max_keys: usize, overflow: V) -> Self {
        Self {
            map: DashMap::with_hasher(Hasher::default()),
            overflow,
            max_keys,
            count: AtomicUsize::new(0),
            sweep_at_len: AtomicUsize::new(MIN_SWEEP_LEN),
            clock: Clock::system(),
            sweep_not_before: AtomicU64::new(0),
            sweeping: AtomicBool::new(false),
        }
    }

    /// Spaces sweeps at the cap on `clock` (a
    /// [`ManualClock`](crate::ManualClock) in tests) instead of the system
    /// clock.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The entry of `key`, if it is tracked.
    #[inline]
    pub fn get<Q>(&self, key: &Q) -> Option<Slot<'_, K, V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key).map(|r| Slot {
            inner: SlotRef::Tracked(r),
        })
    }

    /// The entry of `key`, inserted from `make` if there is room (after a
    /// sweep by `idle`, when one is due), else the overflow entry.
    ///
    /// `idle: None` says no entry can be idle now (the caller knows, say,
    /// that no bucket can have refilled yet): no sweep runs.
    pub fn get_or_insert_with<Q>(
        &self,
        key: &Q,
        make: impl FnOnce() -> V,
        idle: Option<Idle<'_, K, V>>,
    ) -> Slot<'_, K, V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(found) = self.get(key) {
            return found;
        }
        if let Some(idle) = idle
            && self.sweep_due()
        {
            self.sweep(idle);
        }
        if !self.take_slot() {
            // Another thread may have inserted it meanwhile.
            if let Some(found) = self.get(key) {
                return found;
            }
            return Slot {
                inner: SlotRef::Overflow(&self.overflow),
            };
        }
        let tracked = match self.map.entry(key.to_owned()) {
            Entry::Occupied(entry) => {
                self.count.fetch_sub(1, Ordering::Relaxed);
                entry.into_ref().downgrade()
            }
            // `make` runs under the shard's write lock, so whatever it sets
            // up is in place before anyone else sees the entry.
            Entry::Vacant(entry) => entry.insert(make()).downgrade(),
        };
        Slot {
            inner: SlotRef::Tracked(tracked),
        }
    }

    /// Counts a slot for a new entry, unless the map is at its cap.
    fn take_slot(&self) -> bool {
        self.count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max_keys).then_some(n + 1)
            })
            .is_ok()
    }

    fn sweep_due(&self) -> bool {
        let len = self.count.load(Ordering::Relaxed);
        if len >= self.max_keys {
            self.clock.now() >= self.sweep_not_before.load(Ordering::Relaxed)
        } else {
            len >= self.sweep_at_len.load(Ordering::Relaxed)
        }
    }

    /// Drops every entry `idle` accepts, unless another sweep is running;
    /// returns how many went.
    pub fn sweep(&self, idle: Idle<'_, K, V>) -> usize {
        if self.sweeping.swap(true, Ordering::Acquire) {
            return 0;
        }
        let mut removed = 0;
        self.map.retain(|k, v| {
            let drop = idle(k, v);
            removed += usize::from(drop);
            !drop
        });
        let left = self.count.fetch_sub(removed, Ordering::Relaxed) - removed;
        self.sweep_at_len
            .store((2 * left).max(MIN_SWEEP_LEN), Ordering::Relaxed);
        self.sweep_not_before.store(
            self.clock
                .now()
                .saturating_add(left as u64 * SWEEP_SPACING_PER_ENTRY),
            Ordering::Relaxed,
        );
        self.sweeping.store(false, Ordering::Release);
        removed
    }

    /// Removes `key`'s entry, returning it.
    pub fn remove<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (_, v) = self.map.remove(key)?;
        self.count.fetch_sub(1, Ordering::Relaxed);
        Some(v)
    }

    /// Removes every entry (the overflow entry stays as it is).
    pub fn clear(&self) {
        let mut removed = 0;
        self.map.retain(|_, _| {
            removed += 1;
            false
        });
        self.count.fetch_sub(removed, Ordering::Relaxed);
    }

    /// Whether `key` is tracked.
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.contains_key(key)
    }

    /// Calls `f` on every tracked entry (each shard read-locked in turn).
    pub fn for_each(&self, mut f: impl FnMut(&K, &V)) {
        for e in self.map.iter() {
            f(e.key(), e.value());
        }
    }
}

impl<K, V> BoundedMap<K, V> {
    /// The entry untracked keys share.
    #[inline]
    pub fn overflow(&self) -> &V {
        &self.overflow
    }

    /// Tracked entries (never more than `max_keys`).
    pub fn len(&self) -> usize {
        // The slot count, not `DashMap::len`: that one adds up its shards
        // one after the other, so while a sweep frees slots and new keys
        // take them it can read more than the map ever held at once.
        self.count.load(Ordering::Relaxed)
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cap on tracked entries.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    use proptest::prelude::*;

    type Map = BoundedMap<u32, AtomicU32>;

    fn zero_is_idle(_: &u32, v: &AtomicU32) -> bool {
        v.load(Ordering::Relaxed) == 0
    }

    fn hit(map: &Map, key: u32) -> bool {
        let slot = map.get_or_insert_with(&key, || AtomicU32::new(0), Some(&mut zero_is_idle));
        slot.fetch_add(1, Ordering::Relaxed);
        slot.is_overflow()
    }

    #[test]
    fn keys_past_the_cap_share_the_overflow_entry() {
        let map = Map::new(3, AtomicU32::new(0));
        for k in 0..3 {
            assert!(!hit(&map, k));
        }
        assert!(hit(&map, 3));
        assert!(hit(&map, 4));
        assert_eq!(map.len(), 3);
        assert_eq!(map.overflow().load(Ordering::Relaxed), 2);
        // Tracked keys keep their entries.
        for k in 0..3 {
            assert!(!hit(&map, k));
            assert_eq!(map.get(&k).unwrap().load(Ordering::Relaxed), 2);
        }
    }

    #[test]
    fn a_sweep_drops_only_idle_entries() {
        let map = Map::new(4, AtomicU32::new(0));
        for k in 0..4 {
            hit(&map, k);
        }
        map.get(&1).unwrap().store(0, Ordering::Relaxed);
        map.get(&3).unwrap().store(0, Ordering::Relaxed);
        // The map is full: the next new key sweeps the two idle ones out.
        assert!(!hit(&map, 9));
        assert_eq!(map.len(), 3);
        assert!(map.contains_key(&0) && map.contains_key(&2) && map.contains_key(&9));
        assert!(!map.contains_key(&1) && !map.contains_key(&3));
    }

    #[test]
    fn an_entry_in_use_is_never_dropped() {
        // Entries held elsewhere (an `Arc` count above one) are not idle.
        let map: BoundedMap<u32, Arc<()>> = BoundedMap::new(2, Arc::new(()));
        let mut idle = |_: &u32, v: &Arc<()>| Arc::strong_count(v) == 1;
        let held = Arc::clone(&map.get_or_insert_with(&0, || Arc::new(()), Some(&mut idle)));
        drop(map.get_or_insert_with(&1, || Arc::new(()), Some(&mut idle)));
        // Full: the sweep drops 1 (held by nobody), never 0.
        let two = map.get_or_insert_with(&2, || Arc::new(()), Some(&mut idle));
        assert!(!two.is_overflow());
        drop(two);
        assert!(map.contains_key(&0));
        assert!(!map.contains_key(&1));
        drop(held);
    }

    #[test]
    fn sweeps_at_the_cap_are_spaced_by_what_they_kept() {
        let clock = crate::ManualClock::new();
        let map = Map::new(2, AtomicU32::new(0)).with_clock(clock.clock());
        hit(&map, 0);
        hit(&map, 1);
        // Full of busy entries: this sweep keeps both and spaces the next.
        assert!(hit(&map, 2));
        map.get(&0).unwrap().store(0, Ordering::Relaxed);
        assert!(hit(&map, 3), "no sweep within 2 µs of the last");
        clock.advance(std::time::Duration::from_micros(2));
        assert!(!hit(&map, 4), "the idle entry made room");
        assert!(!map.contains_key(&0));
    }

    #[test]
    fn no_idle_test_means_no_sweep() {
        let map = Map::new(1, AtomicU32::new(0));
        drop(map.get_or_insert_with(&0, || AtomicU32::new(0), None));
        assert!(
            map.get_or_insert_with(&1, || AtomicU32::new(0), None)
                .is_overflow()
        );
        assert!(map.contains_key(&0));
    }

    #[test]
    fn the_map_sweeps_itself_as_it_grows() {
        let map = Map::new(1_000_000, AtomicU32::new(0));
        for k in 0..10_000 {
            // Every entry is idle again as soon as it is made.
            drop(map.get_or_insert_with(&k, || AtomicU32::new(0), Some(&mut zero_is_idle)));
        }
        assert!(map.len() <= 2 * MIN_SWEEP_LEN, "len {}", map.len());
    }

    #[test]
    fn zero_max_keys_tracks_nothing() {
        let map = Map::new(0, AtomicU32::new(0));
        assert!(hit(&map, 1));
        assert!(map.is_empty());
    }

    #[test]
    fn remove_and_clear_free_slots() {
        let map = Map::new(2, AtomicU32::new(0));
        hit(&map, 1);
        hit(&map, 2);
        assert_eq!(map.remove(&1).unwrap().load(Ordering::Relaxed), 1);
        assert!(!hit(&map, 3));
        map.clear();
        assert!(map.is_empty());
        assert!(!hit(&map, 4));
    }

    #[test]
    fn concurrent_inserts_never_pass_the_cap() {
        let map = Arc::new(Map::new(50, AtomicU32::new(0)));
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let map = map.clone();
                std::thread::spawn(move || {
                    for k in 0..1_000 {
                        hit(&map, t * 1_000 + k);
                        assert!(map.len() <= 50);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut tracked = 0;
        let mut counted = 0;
        map.for_each(|_, v| {
            tracked += 1;
            counted += v.load(Ordering::Relaxed);
        });
        assert_eq!(tracked, map.len());
        // Every request counted once, tracked or in the overflow entry.
        assert_eq!(counted + map.overflow().load(Ordering::Relaxed), 4_000);
    }

    proptest! {
        /// Whatever the order of keys and of entries turning idle, the map
        /// stays within its cap, keeps every busy entry it tracked, and
        /// loses no count.
        #[test]
        fn bounded_and_nothing_lost(
            cap in 0usize..8,
            ops in proptest::collection::vec((0u32..20, any::<bool>()), 0..200),
        ) {
            let map = Map::new(cap, AtomicU32::new(0));
            let mut total = 0u32;
            let mut dropped = 0u32;
            for (key, release) in ops {
                let before: Vec<u32> = {
                    let mut busy = Vec::new();
                    map.for_each(|k, v| if v.load(Ordering::Relaxed) > 0 { busy.push(*k) });
                    busy
                };
                let slot = map.get_or_insert_with(&key, || AtomicU32::new(0), Some(&mut zero_is_idle));
                slot.fetch_add(1, Ordering::Relaxed);
                total += 1;
                drop(slot);
                for k in before {
                    prop_assert!(map.contains_key(&k), "busy key {} dropped", k);
                }
                if release {
                    // The caller is done with this key: its count is settled.
                    if let Some(s) = map.get(&key) {
                        dropped += s.swap(0, Ordering::Relaxed);
                    }
                }
                prop_assert!(map.len() <= cap);
            }
            let mut left = 0;
            map.for_each(|_, v| left += v.load(Ordering::Relaxed));
            prop_assert_eq!(left + dropped + map.overflow().load(Ordering::Relaxed), total);
        }
    }
}
