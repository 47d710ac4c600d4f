//! Cache-line-sized doorbells.

use core::sync::atomic::{AtomicU64, Ordering};

/// Size of a cache line on every x86 CPU Ally targets.
pub const CACHE_LINE: usize = 64;

/// Pads and aligns `T` to its own cache line so that two values written by different cores
/// never share a line (no false sharing between the producer's and the consumer's index).
#[derive(Debug, Default)]
#[repr(C, align(64))]
pub struct CachePadded<T>(pub T);

impl<T> core::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A doorbell: a monotonically increasing sequence number alone on its cache line.
///
/// The ringing side (OS core) publishes its data first and then calls [`Doorbell::ring`]
/// (`Release`); the watching side (DPI core) calls [`DoorbellWatcher::poll`] (`Acquire`) and, if
/// it returns non-zero, re-reads the published data. Because the sequence only grows, a ring can
/// never be "consumed twice" and two rings between polls merge into one wake-up, never zero.
#[derive(Debug, Default)]
#[repr(C, align(64))]
pub struct Doorbell {
    seq: AtomicU64,
    /// Time stamp counter at the latest ring, for the watcher's wake-up latency.
    rung_at: AtomicU64,
}

const _: () = assert!(core::mem::size_of::<Doorbell>() == CACHE_LINE);
const _: () = assert!(core::mem::align_of::<Doorbell>() == CACHE_LINE);

impl Doorbell {
    /// A doorbell that has never rung.
    pub const fn new() -> Self {
        Self {
            seq: AtomicU64::new(0),
            rung_at: AtomicU64::new(0),
        }
    }

    /// Ring once. Everything the caller wrote before is visible to a watcher that sees this ring.
    #[inline]
    pub fn ring(&self) {
        self.rung_at.store(timestamp(), Ordering::Relaxed);
        self.seq.fetch_add(1, Ordering::Release);
    }

    /// The time stamp counter at the latest ring (0 before the first).
    #[inline]
    pub fn rung_at(&self) -> u64 {
        self.rung_at.load(Ordering::Relaxed)
    }

    /// The current sequence number (how many times the doorbell has rung in total).
    #[inline]
    pub fn sequence(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }
}

/// The time stamp counter (RDTSC; invariant on the CPUs Ally targets, and shared by all cores).
#[inline]
pub fn timestamp() -> u64 {
    // SAFETY: RDTSC has no preconditions in ring 0 or (CR4.TSD clear) in user mode.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Wake-up latency statistics: time stamp counter ticks from a ring to the watcher seeing it.
///
/// The least sample is kept as `u64::MAX` until the first one (so [`WakeLatency::record`]
/// needs no first-sample test); [`WakeLatency::min`] reports 0 before any sample, as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct WakeLatency {
    // `samples` and `total` are not neighbours (`repr(C)` keeps the order): as neighbours the two adds in `record`
    // became one vector add (six instructions instead of two).
    samples: u64,
    min: u64,
    max: u64,
    total: u64,
}

impl Default for WakeLatency {
    fn default() -> Self {
        Self {
            samples: 0,
            total: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

impl WakeLatency {
    /// Record the latency of the ring `db` last had, seen now. Inline: it runs once per
    /// doorbell in the DPI loop. The total is a plain add: a u64 of TSC ticks does not
    /// overflow in centuries (wrapping, never a panic). Min and max change rarely once
    /// samples accumulate, so they are a predicted compare each instead of a conditional
    /// move and a store.
    #[inline]
    pub fn record(&mut self, db: &Doorbell) {
        let ticks = timestamp().saturating_sub(db.rung_at());
        if ticks < self.min {
            self.min = ticks;
        }
        if ticks > self.max {
            self.max = ticks;
        }
        self.total = self.total.wrapping_add(ticks);
        self.samples += 1;
    }

    /// Samples recorded.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Sum of all samples, ticks.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Least sample, ticks (0 before the first).
    pub fn min(&self) -> u64 {
        if self.samples == 0 {
            0
        } else {
            self.min
        }
    }

    /// Greatest sample, ticks (0 before the first).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Mean ticks per sample.
    pub fn mean(&self) -> u64 {
        self.total.checked_div(self.samples).unwrap_or(0)
    }
}

/// The consuming side's memory of the last sequence number it acted on.
#[derive(Debug, Clone, Copy, Default)]
pub struct DoorbellWatcher {
    seen: u64,
}

impl DoorbellWatcher {
    /// A watcher that treats every ring so far as already handled.
    pub fn new(db: &Doorbell) -> Self {
        Self {
            seen: db.sequence(),
        }
    }

    /// Whether the doorbell rang since the last [`DoorbellWatcher::poll`] (without consuming).
    #[inline]
    pub fn pending(&self, db: &Doorbell) -> bool {
        db.sequence() != self.seen
    }

    /// Number of rings since the previous call (0 when nothing happened). After a non-zero
    /// result the caller sees every write the ringer made before its latest ring.
    #[inline]
    pub fn poll(&mut self, db: &Doorbell) -> u64 {
        let now = db.sequence();
        let n = now.wrapping_sub(self.seen);
        self.seen = now;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn wake_latency_measures_from_the_latest_ring() {
        let db = Doorbell::new();
        let mut latency = WakeLatency::default();
        db.ring();
        std::thread::sleep(std::time::Duration::from_millis(2));
        latency.record(&db);
        db.ring();
        latency.record(&db);
        assert_eq!(latency.samples(), 2);
        // The first sample waited ~2 ms, the second almost nothing.
        assert!(latency.max() > 100 * latency.min().max(1), "{latency:?}");
        assert!(latency.min() <= latency.max());
        assert_eq!(latency.mean(), latency.total() / 2);
    }

    #[test]
    fn wake_latency_is_zero_before_the_first_sample() {
        let latency = WakeLatency::default();
        assert_eq!(
            (
                latency.samples(),
                latency.total(),
                latency.min(),
                latency.max()
            ),
            (0, 0, 0, 0)
        );
        assert_eq!(latency.mean(), 0);
    }

    #[test]
    fn rings_accumulate_and_are_consumed_once() {
        let db = Doorbell::new();
        let mut w = DoorbellWatcher::new(&db);
        assert_eq!(w.poll(&db), 0);
        db.ring();
        db.ring();
        assert_eq!(w.poll(&db), 2);
        assert_eq!(w.poll(&db), 0);
        db.ring();
        assert_eq!(w.poll(&db), 1);
    }

    #[test]
    fn doorbell_and_padding_are_one_line_each() {
        assert_eq!(core::mem::size_of::<CachePadded<u32>>(), 64);
        assert_eq!(core::mem::align_of::<CachePadded<u8>>(), 64);
    }

    /// The producer publishes a value then rings; every time the watcher sees a ring it must
    /// see a value at least as new as the one published before that ring (no lost update).
    #[test]
    fn ring_publishes_prior_writes_across_threads() {
        const N: u32 = 200_000;
        let db = Arc::new(Doorbell::new());
        let val = Arc::new(AtomicU32::new(0));
        let (db2, val2) = (db.clone(), val.clone());
        let mut w = DoorbellWatcher::new(&db);
        let prod = std::thread::spawn(move || {
            for i in 1..=N {
                val2.store(i, Ordering::Relaxed);
                db2.ring();
            }
        });
        let mut total = 0u64;
        let mut last = 0u32;
        while total < u64::from(N) {
            let n = w.poll(&db);
            if n != 0 {
                total += n;
                let v = val.load(Ordering::Relaxed);
                // After `total` rings, at least value `total` was published.
                assert!(u64::from(v) >= total, "saw value {v} after {total} rings");
                assert!(v >= last);
                last = v;
            } else {
                std::hint::spin_loop();
            }
        }
        prod.join().unwrap();
        assert_eq!(total, u64::from(N));
        assert_eq!(w.poll(&db), 0);
    }
}
