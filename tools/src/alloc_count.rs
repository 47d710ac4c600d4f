//! Counting global allocator: lets `rules compile` report how much heap Ally needs to load a
//! blob (the DPI core's heap may be a bump allocator that never frees, so the total matters).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// The system allocator plus three counters.
pub struct Counting;

static TOTAL: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    TOTAL.fetch_add(n, Relaxed);
    let live = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(live, Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is System's; the counters have no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: `ptr` came from this allocator (i.e. System) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size);
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: forwarded unchanged; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Counters at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    total: usize,
    live: usize,
}

/// Starts a measurement (resets the peak to the current live size).
pub fn start() -> Snapshot {
    let live = LIVE.load(Relaxed);
    PEAK.store(live, Relaxed);
    Snapshot {
        total: TOTAL.load(Relaxed),
        live,
    }
}

/// (bytes allocated in total, peak live bytes above the start) since `s`.
pub fn since(s: Snapshot) -> (usize, usize) {
    (
        TOTAL.load(Relaxed) - s.total,
        PEAK.load(Relaxed).saturating_sub(s.live),
    )
}

/// Live heap bytes now (allocated and not yet freed, by every thread).
pub fn live() -> usize {
    LIVE.load(Relaxed)
}
