//! Ally's heap: the linked-list allocator behind a lock, with its high-water mark kept so that
//! the boot log can show what loading the rules took, and its state for the out-of-heap report.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};
use linked_list_allocator::Heap;

/// The global allocator (see [`crate::HEAP`]).
pub struct AllyHeap {
    heap: spin::Mutex<Heap>,
    /// Most bytes in use at once since [`AllyHeap::init`].
    peak: AtomicUsize,
}

/// A snapshot of the heap's use, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct HeapUsage {
    pub size: usize,
    pub used: usize,
    pub peak: usize,
}

impl AllyHeap {
    pub const fn empty() -> AllyHeap {
        AllyHeap {
            heap: spin::Mutex::new(Heap::empty()),
            peak: AtomicUsize::new(0),
        }
    }

    /// Gives the allocator its memory.
    ///
    /// # Safety
    /// `[start, start + size)` must be mapped, writable memory that nothing else uses, for
    /// ever; called once.
    pub unsafe fn init(&self, start: *mut u8, size: usize) {
        // SAFETY: guaranteed by the caller.
        unsafe { self.heap.lock().init(start, size) };
    }

    /// The heap's use now; `None` when the heap's lock is held (e.g. by the code that
    /// panicked).
    pub fn usage(&self) -> Option<HeapUsage> {
        let heap = self.heap.try_lock()?;
        Some(HeapUsage {
            size: heap.size(),
            used: heap.used(),
            peak: self.peak.load(Ordering::Relaxed),
        })
    }
}

// SAFETY: allocation and deallocation go to the linked-list heap under its lock, which
// returns blocks of the requested layout inside the memory given to `init`, or null.
unsafe impl GlobalAlloc for AllyHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut heap = self.heap.lock();
        match heap.allocate_first_fit(layout) {
            Ok(block) => {
                self.peak.fetch_max(heap.used(), Ordering::Relaxed);
                block.as_ptr()
            }
            Err(()) => core::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(block) = NonNull::new(ptr) {
            // SAFETY: the caller passes a block this allocator returned, with its layout.
            unsafe { self.heap.lock().deallocate(block, layout) };
        }
    }
}

/// Whether a panic message is Rust's report of a failed allocation (the default allocation
/// error handler panics with "memory allocation of N bytes failed").
pub fn is_out_of_heap(message: &str) -> bool {
    message.starts_with("memory allocation of ")
}
