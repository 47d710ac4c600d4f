//! A lock-free single-producer/single-consumer ring in caller-provided memory.
//!
//! Why not `heapless::spsc::Queue`: it owns its storage inline with a compile-time capacity and
//! keeps the head and tail indices next to each other, so the two cores would bounce one cache
//! line on every operation. This ring (a) takes its header and slots from memory the caller
//! places (DPI memory, shared by an OS core and a DPI core), with the capacity chosen at run
//! time; (b) puts the producer's and the consumer's index on separate cache lines; (c) caches
//! the other side's index locally so the shared line is only read when the ring looks full or
//! empty; and (d) publishes a whole batch with one `Release` store ([`Producer::push_slice`],
//! [`Consumer::pop_into`]). Items are `Copy`, so nothing needs dropping when a ring is
//! abandoned.
//!
//! Indices are free-running `u32`s; a slot is `index & (capacity - 1)`, the fill level
//! `tail - head` (wrapping), which is exact for capacities up to 2^31.

use super::doorbell::CachePadded;
use core::cell::UnsafeCell;
use core::fmt;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicU32, Ordering};

/// Why a ring could not be set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// The slot array's length is not a power of two (or is zero).
    CapacityNotPowerOfTwo(usize),
    /// The slot array is longer than 2^31 entries.
    CapacityTooLarge(usize),
    /// The header's indices describe an impossible fill level (corrupt shared memory).
    CorruptIndices { head: u32, tail: u32 },
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CapacityNotPowerOfTwo(n) => {
                write!(f, "ring capacity {n} is not a non-zero power of two")
            }
            Self::CapacityTooLarge(n) => write!(f, "ring capacity {n} exceeds 2^31 slots"),
            Self::CorruptIndices { head, tail } => write!(
                f,
                "ring header holds head {head} and tail {tail}: more items than slots"
            ),
        }
    }
}

/// The shared control block: consumer index and producer index, each on its own cache line.
#[derive(Debug, Default)]
#[repr(C)]
pub struct SpscHeader {
    /// Next index the consumer will read; written only by the consumer.
    head: CachePadded<AtomicU32>,
    /// Next index the producer will write; written only by the producer.
    tail: CachePadded<AtomicU32>,
}

const _: () = assert!(core::mem::size_of::<SpscHeader>() == 128);

impl SpscHeader {
    /// An empty ring's header.
    pub const fn new() -> Self {
        Self {
            head: CachePadded(AtomicU32::new(0)),
            tail: CachePadded(AtomicU32::new(0)),
        }
    }
}

/// One slot. `repr(transparent)` so a slot array has exactly `size_of::<T>()` stride.
#[repr(transparent)]
pub struct Slot<T>(UnsafeCell<MaybeUninit<T>>);

impl<T> Slot<T> {
    /// An empty slot.
    pub const fn new() -> Self {
        Self(UnsafeCell::new(MaybeUninit::uninit()))
    }
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: a slot is written only by the single producer while it is outside [head, tail) and
// read only by the single consumer while it is inside; the Release/Acquire pair on the indices
// orders those accesses, so sharing `&Slot<T>` between the two threads is sound for `T: Send`.
unsafe impl<T: Send> Sync for Slot<T> {}

/// Convenience storage with a compile-time capacity, e.g. for a `static` in DPI memory.
#[repr(C)]
pub struct SpscStorage<T, const N: usize> {
    pub header: SpscHeader,
    pub slots: [Slot<T>; N],
}

impl<T: Copy + Send, const N: usize> SpscStorage<T, N> {
    /// Empty storage.
    pub const fn new() -> Self {
        Self {
            header: SpscHeader::new(),
            slots: [const { Slot::new() }; N],
        }
    }

    /// Reset the ring and hand out its two ends; the `&mut` borrow guarantees there is exactly
    /// one producer and one consumer.
    pub fn split(&mut self) -> Result<(Producer<'_, T>, Consumer<'_, T>), QueueError> {
        SpscRing::split(&mut self.header, &mut self.slots)
    }
}

impl<T: Copy + Send, const N: usize> Default for SpscStorage<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Constructors for the two ends of a ring.
pub struct SpscRing;

fn check_capacity(len: usize) -> Result<u32, QueueError> {
    if len == 0 || !len.is_power_of_two() {
        return Err(QueueError::CapacityNotPowerOfTwo(len));
    }
    if len > 1 << 31 {
        return Err(QueueError::CapacityTooLarge(len));
    }
    // Fits: checked above.
    Ok((len - 1) as u32)
}

impl SpscRing {
    /// Reset `header` to empty and return both ends. Safe: the exclusive borrows guarantee no
    /// other producer or consumer exists for their lifetime.
    pub fn split<'a, T: Copy + Send>(
        header: &'a mut SpscHeader,
        slots: &'a mut [Slot<T>],
    ) -> Result<(Producer<'a, T>, Consumer<'a, T>), QueueError> {
        let mask = check_capacity(slots.len())?;
        *header = SpscHeader::new();
        let (header, slots): (&'a SpscHeader, &'a [Slot<T>]) = (header, slots);
        Ok((
            Producer {
                hdr: header,
                slots,
                mask,
                tail: 0,
                head_cache: 0,
            },
            Consumer {
                hdr: header,
                slots,
                mask,
                head: 0,
                tail_cache: 0,
            },
        ))
    }

    /// Attach the producer end of a ring that lives in shared memory (e.g. the OS core's side),
    /// continuing from the indices in the header.
    ///
    /// # Safety
    /// While the returned producer lives, no other producer may exist for this ring, and
    /// `slots` must be the same slot array every consumer of this header uses.
    pub unsafe fn attach_producer<'a, T: Copy + Send>(
        header: &'a SpscHeader,
        slots: &'a [Slot<T>],
    ) -> Result<Producer<'a, T>, QueueError> {
        let mask = check_capacity(slots.len())?;
        let (head, tail) = (
            header.head.load(Ordering::Acquire),
            header.tail.load(Ordering::Acquire),
        );
        if tail.wrapping_sub(head) > mask + 1 {
            return Err(QueueError::CorruptIndices { head, tail });
        }
        Ok(Producer {
            hdr: header,
            slots,
            mask,
            tail,
            head_cache: head,
        })
    }

    /// Attach the consumer end of a ring that lives in shared memory.
    ///
    /// # Safety
    /// While the returned consumer lives, no other consumer may exist for this ring, and
    /// `slots` must be the same slot array the producer uses.
    pub unsafe fn attach_consumer<'a, T: Copy + Send>(
        header: &'a SpscHeader,
        slots: &'a [Slot<T>],
    ) -> Result<Consumer<'a, T>, QueueError> {
        let mask = check_capacity(slots.len())?;
        let (head, tail) = (
            header.head.load(Ordering::Acquire),
            header.tail.load(Ordering::Acquire),
        );
        if tail.wrapping_sub(head) > mask + 1 {
            return Err(QueueError::CorruptIndices { head, tail });
        }
        Ok(Consumer {
            hdr: header,
            slots,
            mask,
            head,
            tail_cache: tail,
        })
    }
}

/// The producing end.
pub struct Producer<'a, T> {
    hdr: &'a SpscHeader,
    slots: &'a [Slot<T>],
    mask: u32,
    tail: u32,
    head_cache: u32,
}

// SAFETY: the producer only touches slots it owns (outside [head, tail)) and its own index; it
// may move to another thread as long as `T` may.
unsafe impl<T: Send> Send for Producer<'_, T> {}

impl<T: Copy + Send> Producer<'_, T> {
    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.mask as usize + 1
    }

    /// Free slots as of now (refreshes the cached consumer index).
    pub fn free(&mut self) -> usize {
        self.head_cache = self.hdr.head.load(Ordering::Acquire);
        self.capacity() - self.tail.wrapping_sub(self.head_cache) as usize
    }

    #[inline]
    fn room(&mut self, want: u32) -> u32 {
        let cap = self.mask + 1;
        let mut free = cap - self.tail.wrapping_sub(self.head_cache);
        if free < want {
            self.head_cache = self.hdr.head.load(Ordering::Acquire);
            free = cap - self.tail.wrapping_sub(self.head_cache);
        }
        free
    }

    #[inline]
    fn write_slot(&mut self, idx: u32, v: T) {
        let slot = &self.slots[(idx & self.mask) as usize];
        // SAFETY: `idx` is in [tail, head + capacity), a slot the consumer does not read until
        // the Release store of the new tail below, and only this producer writes slots.
        unsafe { (*slot.0.get()).write(v) };
    }

    /// Append one item; gives it back when the ring is full.
    #[inline]
    pub fn push(&mut self, v: T) -> Result<(), T> {
        if self.room(1) == 0 {
            return Err(v);
        }
        self.write_slot(self.tail, v);
        self.tail = self.tail.wrapping_add(1);
        self.hdr.tail.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// Append as many items of `vs` as fit, publishing them with a single store; returns how
    /// many were taken.
    pub fn push_slice(&mut self, vs: &[T]) -> usize {
        let n = (self.room(vs.len().min(u32::MAX as usize) as u32) as usize).min(vs.len());
        for (i, v) in vs[..n].iter().enumerate() {
            self.write_slot(self.tail.wrapping_add(i as u32), *v);
        }
        if n != 0 {
            self.tail = self.tail.wrapping_add(n as u32);
            self.hdr.tail.store(self.tail, Ordering::Release);
        }
        n
    }
}

/// The consuming end.
pub struct Consumer<'a, T> {
    hdr: &'a SpscHeader,
    slots: &'a [Slot<T>],
    mask: u32,
    head: u32,
    tail_cache: u32,
}

// SAFETY: see `Producer`; the consumer only reads slots in [head, tail).
unsafe impl<T: Send> Send for Consumer<'_, T> {}

impl<T: Copy + Send> Consumer<'_, T> {
    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.mask as usize + 1
    }

    /// Items waiting as of now.
    pub fn len(&mut self) -> usize {
        self.tail_cache = self.hdr.tail.load(Ordering::Acquire);
        self.tail_cache.wrapping_sub(self.head) as usize
    }

    /// Whether the ring is empty as of now.
    pub fn is_empty(&mut self) -> bool {
        self.len() == 0
    }

    #[inline]
    fn avail(&mut self, want: u32) -> u32 {
        let mut n = self.tail_cache.wrapping_sub(self.head);
        if n < want {
            self.tail_cache = self.hdr.tail.load(Ordering::Acquire);
            n = self.tail_cache.wrapping_sub(self.head);
        }
        n
    }

    #[inline]
    fn read_slot(&self, idx: u32) -> T {
        let slot = &self.slots[(idx & self.mask) as usize];
        // SAFETY: `idx` is in [head, tail): the producer initialised this slot and published it
        // with the Release store of tail that our Acquire load observed; it will not rewrite it
        // until our Release store of the new head.
        unsafe { (*slot.0.get()).assume_init() }
    }

    /// Take the oldest item.
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        if self.avail(1) == 0 {
            return None;
        }
        let v = self.read_slot(self.head);
        self.head = self.head.wrapping_add(1);
        self.hdr.head.store(self.head, Ordering::Release);
        Some(v)
    }

    /// Take up to `out.len()` items in order, releasing their slots with a single store;
    /// returns how many were taken.
    pub fn pop_into(&mut self, out: &mut [T]) -> usize {
        let n = (self.avail(out.len().min(u32::MAX as usize) as u32) as usize).min(out.len());
        for (i, o) in out[..n].iter_mut().enumerate() {
            *o = self.read_slot(self.head.wrapping_add(i as u32));
        }
        if n != 0 {
            self.head = self.head.wrapping_add(n as u32);
            self.hdr.head.store(self.head, Ordering::Release);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_capacities() {
        let mut h = SpscHeader::new();
        let mut s: [Slot<u32>; 3] = Default::default();
        assert_eq!(
            SpscRing::split(&mut h, &mut s).err(),
            Some(QueueError::CapacityNotPowerOfTwo(3))
        );
        let mut e: [Slot<u32>; 0] = [];
        assert!(SpscRing::split(&mut h, &mut e).is_err());
    }

    #[test]
    fn fifo_full_empty_wraparound() {
        let mut st = SpscStorage::<u64, 4>::new();
        let (mut p, mut c) = st.split().unwrap();
        assert_eq!(c.pop(), None);
        for round in 0..10u64 {
            for i in 0..4 {
                p.push(round * 10 + i).unwrap();
            }
            assert_eq!(p.push(99), Err(99));
            assert_eq!(c.len(), 4);
            for i in 0..4 {
                assert_eq!(c.pop(), Some(round * 10 + i));
            }
            assert_eq!(c.pop(), None);
        }
    }

    #[test]
    fn batches_are_partial_when_full() {
        let mut st = SpscStorage::<u32, 8>::new();
        let (mut p, mut c) = st.split().unwrap();
        assert_eq!(p.push_slice(&[1, 2, 3, 4, 5, 6]), 6);
        assert_eq!(p.push_slice(&[7, 8, 9, 10]), 2);
        let mut out = [0u32; 5];
        assert_eq!(c.pop_into(&mut out), 5);
        assert_eq!(out, [1, 2, 3, 4, 5]);
        assert_eq!(p.free(), 5);
        assert_eq!(c.pop_into(&mut out), 3);
        assert_eq!(&out[..3], &[6, 7, 8]);
        assert_eq!(c.pop_into(&mut out), 0);
    }

    #[test]
    fn attach_continues_from_shared_indices_and_checks_them() {
        let mut st = SpscStorage::<u32, 4>::new();
        {
            let (mut p, _c) = st.split().unwrap();
            p.push(5).unwrap();
            p.push(6).unwrap();
        }
        // SAFETY: no other producer or consumer exists for `st` in this scope.
        let mut c = unsafe { SpscRing::attach_consumer(&st.header, &st.slots) }.unwrap();
        assert_eq!(c.pop(), Some(5));
        // SAFETY: as above; one producer and one consumer.
        let mut p = unsafe { SpscRing::attach_producer(&st.header, &st.slots) }.unwrap();
        p.push(7).unwrap();
        assert_eq!(c.pop(), Some(6));
        assert_eq!(c.pop(), Some(7));
        // End both borrows of `st` before corrupting its header.
        let _ = (c, p);
        st.header.tail.0.store(100, Ordering::Relaxed);
        // SAFETY: as above.
        let bad = unsafe { SpscRing::attach_consumer(&st.header, &st.slots) };
        assert_eq!(
            bad.err(),
            Some(QueueError::CorruptIndices { head: 3, tail: 100 })
        );
    }

    #[test]
    fn indices_wrap_past_u32_max() {
        let st = SpscStorage::<u32, 4>::new();
        st.header.head.0.store(u32::MAX - 1, Ordering::Relaxed);
        st.header.tail.0.store(u32::MAX - 1, Ordering::Relaxed);
        // SAFETY: sole producer and consumer.
        let mut p = unsafe { SpscRing::attach_producer(&st.header, &st.slots) }.unwrap();
        // SAFETY: sole producer and consumer.
        let mut c = unsafe { SpscRing::attach_consumer(&st.header, &st.slots) }.unwrap();
        for i in 0..20u32 {
            p.push(i).unwrap();
            p.push(i + 100).unwrap();
            assert_eq!(c.pop(), Some(i));
            assert_eq!(c.pop(), Some(i + 100));
        }
    }
}
