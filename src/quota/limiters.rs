//! The two kinds of limiter, keyed: GCRA rate limiters that can reserve a
//! cell in the future (so a request that fits its `max_wait` is sure of its
//! turn when it wakes), and in-flight counters.
//!
//! Each keeps a key's state in a cell of its own (a `Mutex<u64>` for a
//! rate, an `AtomicU64` for a cap), found through shards behind plain
//! mutexes. A caller connection keeps the cells of its last request's keys
//! (the quota module's `KeyMemo`), so a keep-alive caller's request takes
//! no shard lock and hashes nothing: it locks (or counts in) its cells.
//! A request that several rate limits apply to locks their cells in the
//! integration's order of limits, the same for every request, so two
//! requests never wait on each other's locks in a cycle; no cell is locked
//! while a shard is.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SHARDS: usize = 16;
/// A shard this large is swept (cells that nobody holds and that are back
/// to their initial state dropped) before a new key goes in.
const SWEEP_AT: usize = 4096;

/// A key as a limiter keeps it: its 64-bit hash under the limiter's own
/// random hash key, so finding a cell allocates nothing. Two keys that
/// hash alike would share one allowance: with 10^5 live keys in a limiter,
/// about one chance in 10^9.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Key(u64);

/// The map's hasher: keys are hashes already.
#[derive(Default)]
pub(super) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Shard<C> = HashMap<u64, Arc<C>, BuildHasherDefault<Prehashed>>;

/// Keys of one limiter, each with a cell of state `C` (its `Default`: the
/// initial state).
pub(super) struct Keyed<C> {
    hasher: ahash::RandomState,
    shards: Box<[Mutex<Shard<C>>]>,
}

impl<C: Default> Keyed<C> {
    pub(super) fn new() -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect();
        Self { hasher: ahash::RandomState::new(), shards }
    }

    pub(super) fn key(&self, key: &[u8]) -> Key {
        Key(self.hasher.hash_one(key))
    }

    /// `key`'s cell, shared with every holder of the same key (a new key
    /// starts in the initial state). A full shard first drops the cells
    /// that only it holds and that `stale` says equal the initial state by
    /// now: a cell someone holds stays, so one key never has two cells.
    pub(super) fn cell(&self, key: Key, stale: impl Fn(&mut C) -> bool) -> Arc<C> {
        // Middle bits: the map itself places entries by the low bits and
        // tells them apart by the top ones.
        let i = ((key.0 >> 32) as usize) % SHARDS;
        // A panic while a shard is held cannot leave it half-written (an
        // insert or a sweep of whole entries): a poisoned lock is used as
        // it is.
        let mut map = self.shards[i].lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= SWEEP_AT && !map.contains_key(&key.0) {
            // `get_mut`: only the map holds the cell, and nobody can take
            // it from the map without this lock.
            map.retain(|_, c| Arc::get_mut(c).is_none_or(|c| !stale(c)));
        }
        map.entry(key.0).or_default().clone()
    }
}

/// GCRA arithmetic in nanoseconds since the limiter's epoch. The state of
/// a key is its theoretical arrival time (TAT): when the allowance would
/// be whole again. A request at `t` conforms from `max(TAT, t) + T - τ` on
/// (T: one request's share of the period; τ: the burst, `burst × T`); a
/// request admitted at `s` moves TAT to `max(TAT, s) + T`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Gcra {
    interval: u64,
    tolerance: u64,
}

impl Gcra {
    /// `requests` per `period`, bursts of `burst`, kept by each of
    /// `instances` for its share (`1/instances` of the rate, of the burst).
    pub(super) fn new(requests: u32, period: Duration, burst: u32, instances: u32) -> Self {
        let instances = u64::from(instances.max(1));
        let shared = period.as_nanos().saturating_mul(u128::from(instances)) / u128::from(requests.max(1));
        let interval = shared.clamp(1, u128::from(u64::MAX / 4)) as u64;
        let burst = (u64::from(burst.max(1)) / instances).max(1);
        Self { interval, tolerance: interval.saturating_mul(burst) }
    }

    /// How long a request at `now` must wait for its cell.
    pub(super) fn wait(&self, tat: u64, now: u64) -> u64 {
        tat.max(now).saturating_add(self.interval).saturating_sub(self.tolerance).saturating_sub(now)
    }

    /// The state after admitting a request at `at`.
    pub(super) fn admit(&self, tat: u64, at: u64) -> u64 {
        tat.max(at).saturating_add(self.interval)
    }

    /// A state that is no different from a fresh key at `now`.
    pub(super) fn is_stale(tat: u64, now: u64) -> bool {
        tat <= now
    }

    /// One request's share of the period (the time one cell takes to come back).
    #[cfg(test)]
    pub(super) fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval)
    }
}

/// Nanoseconds since `epoch`, never 0 (0 is a fresh key's TAT: it is in
/// the past from the first request on).
pub(super) fn nanos_since(epoch: Instant, now: Instant) -> u64 {
    (now.saturating_duration_since(epoch).as_nanos() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard at `SWEEP_AT` keys drops the cells nobody else holds that
    /// are back to the initial state before it takes a new key (not for a
    /// key it has); a held cell stays whatever its state, and its key
    /// finds that same cell again.
    #[test]
    fn a_full_shard_drops_idle_unheld_cells_before_a_new_one() {
        use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
        let keyed = Keyed::<AtomicU64>::new();
        let len = || keyed.shards[0].lock().unwrap().len();
        let idle = |c: &mut AtomicU64| *c.get_mut() == 0;
        // Keys below 2^32 all fall in shard 0.
        let mut held = Vec::new();
        for n in 0..SWEEP_AT as u64 {
            let cell = keyed.cell(Key(n), idle);
            match n {
                7 => cell.store(5, SeqCst),
                3 | 11 => held.push(cell),
                _ => {}
            }
        }
        assert_eq!(len(), SWEEP_AT);
        keyed.cell(Key(9), idle).store(1, SeqCst);
        assert_eq!(len(), SWEEP_AT, "a known key sweeps nothing");
        let new = keyed.cell(Key(SWEEP_AT as u64), idle);
        // 7 and 9 are busy, 3 and 11 held, and the new one.
        assert_eq!(len(), 5, "only the busy, the held and the new key are left");
        assert!(Arc::ptr_eq(&keyed.cell(Key(3), idle), &held[0]), "a held key keeps its cell");
        assert_eq!(keyed.cell(Key(7), idle).load(SeqCst), 5);
        assert_eq!(new.load(SeqCst), 0);
    }

    /// One key through `g`: whether each request at the given millisecond
    /// is admitted at once.
    fn run(g: &Gcra, at_ms: &[u64]) -> Vec<bool> {
        let mut tat = 0;
        at_ms
            .iter()
            .map(|ms| {
                let now = ms * 1_000_000 + 1;
                let ok = g.wait(tat, now) == 0;
                if ok {
                    tat = g.admit(tat, now);
                }
                ok
            })
            .collect()
    }

    #[test]
    fn five_per_second_with_a_burst_of_five() {
        let g = Gcra::new(5, Duration::from_secs(1), 5, 1);
        // Five at once, the sixth refused; one more every 200 ms.
        assert_eq!(run(&g, &[0, 0, 0, 0, 0, 0]), [true, true, true, true, true, false]);
        let mut at: Vec<u64> = vec![0; 5];
        at.extend([100, 200, 300, 400, 1000, 1000, 1000, 1000]);
        assert_eq!(run(&g, &at)[5..], [false, true, false, true, true, true, true, false]);
    }

    #[test]
    fn a_three_second_flood_gets_the_burst_plus_the_rate() {
        let g = Gcra::new(5, Duration::from_secs(1), 5, 1);
        let every_ms: Vec<u64> = (0..=3000).collect();
        assert_eq!(run(&g, &every_ms).iter().filter(|ok| **ok).count(), 5 + 14 + 1);
    }

    #[test]
    fn a_reservation_waits_exactly_for_its_cell() {
        let g = Gcra::new(5, Duration::from_secs(1), 5, 1);
        let mut tat = 0;
        for _ in 0..5 {
            tat = g.admit(tat, 1);
        }
        // The next ones wait 200, 400, 600 ms: reserving moves the TAT on.
        for k in 1..=3u64 {
            let w = g.wait(tat, 1);
            assert_eq!(w, k * 200_000_000);
            tat = g.admit(tat, 1 + w);
        }
    }

    #[test]
    fn instances_share_the_quota() {
        // 6 per second over 3 instances: 2 per second each, burst 6 → 2.
        let g = Gcra::new(6, Duration::from_secs(1), 6, 3);
        assert_eq!(g.interval(), Duration::from_millis(500));
        assert_eq!(run(&g, &[0, 0, 0, 499, 500]), [true, true, false, false, true]);
    }

    /// Against governor's GCRA (a differential oracle): the same quota
    /// admits the same requests of a pseudo-random schedule.
    #[test]
    fn agrees_with_governor() {
        use governor::clock::{Clock, FakeRelativeClock};
        use governor::{Quota, RateLimiter};
        use std::num::NonZeroU32;
        for (requests, period_ms, burst) in [(5u32, 1000u64, 5u32), (100, 10_000, 10), (3, 900, 1), (50, 1000, 50)] {
            let clock = FakeRelativeClock::default();
            let quota = Quota::with_period(Duration::from_millis(period_ms) / requests)
                .unwrap()
                .allow_burst(NonZeroU32::new(burst).unwrap());
            let theirs = RateLimiter::direct_with_clock(quota, clock.clone());
            let ours = Gcra::new(requests, Duration::from_millis(period_ms), burst, 1);
            let mut tat = 0;
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut elapsed = Duration::ZERO;
            for _ in 0..2000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let step = Duration::from_micros(x % (2 * period_ms * 1000 / u64::from(requests)));
                clock.advance(step);
                elapsed += step;
                let now = elapsed.as_nanos() as u64 + 1;
                let ok = ours.wait(tat, now) == 0;
                if ok {
                    tat = ours.admit(tat, now);
                }
                assert_eq!(
                    ok,
                    theirs.check().is_ok(),
                    "quota {requests}/{period_ms}ms burst {burst} at {:?}",
                    clock.now()
                );
            }
        }
    }
}
