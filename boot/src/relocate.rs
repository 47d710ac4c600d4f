//! Moving Ally into its reserved region.
//!
//! GRUB loads the image at 2 MiB (boot/linker.ld), inside RAM the guest will want. Ally builds
//! its own page tables in the region — an identity map of physical memory (for guest memory,
//! ACPI tables and devices) plus the higher half mapped onto the region — copies the image there
//! and switches CR3 in one step. Code, stack and data keep their virtual addresses; only their
//! backing moves.

use crate::entry::KERNEL_VMA;
use crate::frames::FramePool;
use ally_hypervisor::addr::{HostPhysAddr, PhysRange, LARGE_PAGE_SIZE};
use ally_hypervisor::arch::instructions;
use ally_hypervisor::paging::{HostPageFlags, HostPageTables, PagingError};

extern "C" {
    static __image_phys_start: u8;
    static __image_phys_end: u8;
}

/// The physical range GRUB loaded the image into.
pub fn loaded_image() -> PhysRange {
    // SAFETY: only the addresses of the linker symbols are used (both are physical).
    unsafe {
        PhysRange {
            start: &__image_phys_start as *const u8 as u64,
            end: &__image_phys_end as *const u8 as u64,
        }
    }
}

/// Bytes the image occupies in the region (2 MiB pages).
pub fn image_span() -> u64 {
    loaded_image().len().div_ceil(LARGE_PAGE_SIZE) * LARGE_PAGE_SIZE
}

/// Copies the image to `new_base` and switches to page tables built from `frames`:
/// identity for `[0, identity_limit)`, higher half onto `new_base`.
///
/// # Safety
/// `new_base` is 2 MiB-aligned free RAM of at least `image_span()` bytes that does not
/// overlap the loaded image; `frames` lies in Ally's region outside that span.
pub unsafe fn relocate(
    new_base: u64,
    identity_limit: u64,
    frames: &mut FramePool,
) -> Result<(), PagingError> {
    let image = loaded_image();
    let mut tables = HostPageTables::new(frames)?;
    // The first 2 MiB stay executable: the application processors' trampoline runs there
    // (identity-mapped) while it switches to Ally's page tables. All other physical memory
    // is data only.
    tables.map(
        0,
        HostPhysAddr(0),
        LARGE_PAGE_SIZE,
        HostPageFlags::KERNEL_CODE_DATA,
        frames,
    )?;
    tables.map(
        LARGE_PAGE_SIZE,
        HostPhysAddr(LARGE_PAGE_SIZE),
        identity_limit - LARGE_PAGE_SIZE,
        HostPageFlags::KERNEL_DATA,
        frames,
    )?;
    tables.map(
        KERNEL_VMA + image.start,
        HostPhysAddr(new_base),
        image_span(),
        HostPageFlags::KERNEL_CODE_DATA,
        frames,
    )?;
    // SAFETY: both ranges are identity-mapped now; the new tables map the same virtual
    // addresses onto the copy, so execution continues seamlessly after CR3 is loaded.
    unsafe {
        instructions::copy_then_load_cr3(image.start, new_base, image.len(), tables.root().0)
    };
    Ok(())
}
