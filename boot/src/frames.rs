//! Ally's physical page allocator: a bump allocator over the frame pool inside Ally's
//! reserved region. Frames are never freed (page tables, VMCS and bitmaps live forever).

use ally_hypervisor::addr::{HostPhysAddr, PhysRange, PAGE_SIZE};

pub struct FramePool {
    next: u64,
    end: u64,
}

impl FramePool {
    /// A pool over `range` (4 KiB-aligned, identity-mapped).
    pub const fn new(range: PhysRange) -> Self {
        Self {
            next: range.start,
            end: range.end,
        }
    }

    /// The next zeroed 4 KiB frame, or `None` when the pool is used up.
    pub fn allocate_zeroed(&mut self) -> Option<HostPhysAddr> {
        if self.next + PAGE_SIZE > self.end {
            return None;
        }
        let frame = self.next;
        self.next += PAGE_SIZE;
        // SAFETY: the frame lies in Ally's reserved region, which is identity-mapped and
        // handed out once by this allocator.
        unsafe { core::ptr::write_bytes(frame as *mut u8, 0, PAGE_SIZE as usize) };
        Some(HostPhysAddr(frame))
    }

    /// `count` zeroed frames at consecutive addresses (the SVM permission maps span several
    /// pages); returns the first one's address.
    pub fn allocate_contiguous(&mut self, count: usize) -> Option<u64> {
        let first = self.allocate_zeroed()?;
        for i in 1..count as u64 {
            // A bump allocator hands out consecutive frames.
            let next = self.allocate_zeroed()?;
            debug_assert_eq!(next.0, first.0 + i * PAGE_SIZE);
        }
        Some(first.0)
    }

    /// Bytes still available.
    pub fn remaining(&self) -> u64 {
        self.end - self.next
    }
}

impl ally_hypervisor::paging::FrameAllocator for FramePool {
    fn allocate_zeroed_frame(&mut self) -> Option<HostPhysAddr> {
        self.allocate_zeroed()
    }
}

impl ally_hypervisor::paging::TableMemory for FramePool {
    fn table(&mut self, frame: HostPhysAddr) -> &mut [u64; ally_hypervisor::paging::ENTRIES] {
        // SAFETY: table frames come from this pool (Ally's region), are 4 KiB-aligned and
        // identity-mapped, and are only reached through the page-table builders, one at a
        // time (`&mut self`).
        unsafe { &mut *(frame.0 as *mut [u64; ally_hypervisor::paging::ENTRIES]) }
    }
}
