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
    histogram: WakeHistogram,
}

impl Default for WakeLatency {
    fn default() -> Self {
        Self {
            samples: 0,
            total: 0,
            min: u64::MAX,
            max: 0,
            histogram: WakeHistogram::default(),
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
        self.histogram.add(ticks);
    }

    /// How the samples spread: a mean hides whether one long stall or many slow wake-ups
    /// made it (one 40 ms host hiccup among 800 doorbells adds 50 µs to their mean).
    pub fn histogram(&self) -> &WakeHistogram {
        &self.histogram
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

/// Buckets of a [`WakeHistogram`].
pub const WAKE_BUCKETS: usize = 28;

/// Bucket 0 of a [`WakeHistogram`] holds the samples under `1 << WAKE_BUCKET_SHIFT` ticks
/// (0.1 µs at 2.4 GHz); bucket k ≥ 1 those in `[2^(SHIFT+k-1), 2^(SHIFT+k))`, the last one
/// everything above as well (from 2^34 ticks, seconds).
pub const WAKE_BUCKET_SHIFT: u32 = 8;

/// Wake-up latencies by powers of two: a running count per bucket, so that the counts at two
/// instants give the spread between them ([`WakeHistogram::since`]) and its quantiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WakeHistogram {
    counts: [u64; WAKE_BUCKETS],
}

impl WakeHistogram {
    /// A histogram with these bucket counts.
    pub const fn from_counts(counts: [u64; WAKE_BUCKETS]) -> Self {
        Self { counts }
    }

    /// The bucket counts.
    pub fn counts(&self) -> &[u64; WAKE_BUCKETS] {
        &self.counts
    }

    /// The bucket that holds `ticks`: its bit length above the shift (a count of leading
    /// zeros and a compare in the DPI loop).
    #[inline]
    pub fn bucket(ticks: u64) -> usize {
        let bits = u64::BITS - (ticks >> WAKE_BUCKET_SHIFT).leading_zeros();
        (bits as usize).min(WAKE_BUCKETS - 1)
    }

    /// The ticks bucket `k` covers, `[low, high)`; the last bucket's `high` is nominal (twice
    /// its `low`), as it also holds everything above.
    pub fn bucket_range(k: usize) -> (u64, u64) {
        if k == 0 {
            (0, 1 << WAKE_BUCKET_SHIFT)
        } else {
            let low = 1u64 << (WAKE_BUCKET_SHIFT as usize + k - 1);
            (low, low * 2)
        }
    }

    /// Count one sample.
    #[inline]
    pub fn add(&mut self, ticks: u64) {
        self.counts[Self::bucket(ticks)] += 1;
    }

    /// Samples counted.
    pub fn samples(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The samples counted after `earlier` (a reading of the same running histogram).
    pub fn since(&self, earlier: &Self) -> Self {
        let mut counts = [0; WAKE_BUCKETS];
        for (k, count) in counts.iter_mut().enumerate() {
            *count = self.counts[k].saturating_sub(earlier.counts[k]);
        }
        Self { counts }
    }

    /// The `per_mille`/1000 quantile in ticks (500: the median), placed linearly inside its
    /// bucket by rank (the middle of the rank's share), so within a factor of two of the true value; 0 without samples.
    pub fn quantile(&self, per_mille: u64) -> u64 {
        let samples = self.samples();
        if samples == 0 {
            return 0;
        }
        // The rank of the quantile sample, 1-based: ceil(samples * q), at least 1.
        let rank = (u128::from(samples) * u128::from(per_mille.min(1000)))
            .div_ceil(1000)
            .max(1);
        let mut below = 0u128;
        for (k, &count) in self.counts.iter().enumerate() {
            let count = u128::from(count);
            if count > 0 && below + count >= rank {
                let (low, high) = Self::bucket_range(k);
                let span = u128::from(high - low);
                // The middle of the rank's share of the bucket: never its upper bound.
                let offset = span * (2 * (rank - below) - 1) / (2 * count);
                return low + u64::try_from(offset).unwrap_or(u64::MAX - low);
            }
            below += count;
        }
        Self::bucket_range(WAKE_BUCKETS - 1).1
    }

    /// Reads the form [`core::fmt::Display`] writes (bucket counts from bucket 0, separated
    /// by commas, the trailing empty ones left out); `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let mut counts = [0; WAKE_BUCKETS];
        if text.is_empty() {
            return Some(Self { counts });
        }
        let mut fields = text.split(',');
        for count in counts.iter_mut() {
            match fields.next() {
                Some(field) => *count = field.parse().ok()?,
                None => break,
            }
        }
        match fields.next() {
            Some(_) => None,
            None => Some(Self { counts }),
        }
    }
}

impl core::fmt::Display for WakeHistogram {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let used = self
            .counts
            .iter()
            .rposition(|&count| count > 0)
            .map_or(0, |last| last + 1);
        for (k, count) in self.counts[..used].iter().enumerate() {
            if k > 0 {
                f.write_str(",")?;
            }
            write!(f, "{count}")?;
        }
        Ok(())
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
    fn wake_histogram_buckets_by_powers_of_two() {
        let shift = WAKE_BUCKET_SHIFT;
        assert_eq!(WakeHistogram::bucket(0), 0);
        assert_eq!(WakeHistogram::bucket((1 << shift) - 1), 0);
        assert_eq!(WakeHistogram::bucket(1 << shift), 1);
        assert_eq!(WakeHistogram::bucket((2 << shift) - 1), 1);
        assert_eq!(WakeHistogram::bucket(2 << shift), 2);
        assert_eq!(WakeHistogram::bucket(u64::MAX), WAKE_BUCKETS - 1);
        for k in 0..WAKE_BUCKETS - 1 {
            let (low, high) = WakeHistogram::bucket_range(k);
            assert_eq!(WakeHistogram::bucket(low), k);
            assert_eq!(WakeHistogram::bucket(high - 1), k);
            assert_eq!(WakeHistogram::bucket(high), k + 1);
        }
    }

    #[test]
    fn wake_histogram_median_ignores_one_long_stall() {
        let mut latency = WakeLatency::default();
        let db = Doorbell::new();
        db.ring();
        for _ in 0..99 {
            latency.record(&db);
            db.ring();
        }
        let quick = *latency.histogram();
        assert_eq!(quick.samples(), 99);
        let mut stalled = quick;
        stalled.add(1 << 30);
        // The stall moves the mean by ~10 million ticks and the median not at all.
        assert_eq!(stalled.quantile(500), quick.quantile(500));
        assert!(stalled.quantile(1000) >= 1 << 30);
        assert!(quick.quantile(500) < 1 << 20, "{quick:?}");
    }

    #[test]
    fn wake_histogram_quantiles_between_two_readings() {
        let mut running = WakeHistogram::default();
        for _ in 0..10 {
            running.add(300); // bucket 1: [256, 512)
        }
        let earlier = running;
        for _ in 0..30 {
            running.add(5000); // bucket 5: [4096, 8192)
        }
        running.add(300);
        let phase = running.since(&earlier);
        assert_eq!(phase.samples(), 31);
        assert_eq!(phase.counts()[1], 1);
        assert_eq!(phase.counts()[5], 30);
        let median = phase.quantile(500);
        assert!((4096..8192).contains(&median), "{median}");
        assert!(phase.quantile(10) < 512);
        assert_eq!(WakeHistogram::default().quantile(500), 0);
    }

    #[test]
    fn wake_histogram_text_round_trips() {
        let mut histogram = WakeHistogram::default();
        assert_eq!(histogram.to_string(), "");
        assert_eq!(WakeHistogram::parse(""), Some(histogram));
        histogram.add(10);
        histogram.add(3000);
        histogram.add(3000);
        let text = histogram.to_string();
        assert_eq!(text, "1,0,0,0,2");
        assert_eq!(WakeHistogram::parse(&text), Some(histogram));
        assert_eq!(WakeHistogram::parse("1,x"), None);
        assert_eq!(
            WakeHistogram::parse(&["1"; WAKE_BUCKETS + 1].join(",")),
            None
        );
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
