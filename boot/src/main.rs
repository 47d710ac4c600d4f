//! Ally's bootable image: GRUB's multiboot2 entry, Ally's own memory and page tables, then the
//! boot CPU becomes the first VMX guest CPU and boots the first hard disk.
//!
//! Start-up order (each step reports a precise error on COM2 and stops before any guest runs):
//! 1. `entry.rs`: 32-bit entry, long mode, temporary page tables, `ally_main`.
//! 2. Options and the firmware memory map from the multiboot2 information.
//! 3. Reserve Ally's region at the top of a RAM range; copy the image there and switch to
//!    Ally's own page tables (`relocate.rs`), so the guest can have all the RAM it sees.
//! 4. GDT/TSS/IDT, VMX checks, the real-mode stubs, the guest's filtered map and the EPT.
//! 5. VMLAUNCH into real mode at the boot stub, which loads the MBR as the BIOS would.
#![no_std]
#![no_main]

extern crate alloc;

mod backend;
mod clock;
mod cpus;
mod entry;
mod frames;
mod heap;
mod iommu;
mod nic;
mod relocate;
mod rules;
mod smp;
mod start;

use ally_hypervisor::arch::{instructions::halt_forever, logger};
use log::error;

/// Ally's heap, in its reserved region (initialised by `start` after relocation). The
/// linked-list allocator replaces a hand-written one; the DPI engine allocates at start-up.
#[global_allocator]
static HEAP: heap::AllyHeap = heap::AllyHeap::empty();

/// Called by `entry.rs` in long mode on the boot stack.
#[no_mangle]
extern "C" fn ally_main(magic: u32, boot_info: u32) -> ! {
    // SAFETY: COM2 is Ally's management port; the guest's accesses to it are intercepted.
    unsafe { logger::init(log::LevelFilter::Info) };
    log::info!(
        "Ally {} starting on the boot CPU",
        env!("CARGO_PKG_VERSION")
    );
    match start::start(magic, boot_info) {
        Ok(never) => match never {},
        Err(e) => {
            error!("ALLY fatal reason=\"{e}\"");
            error!("Ally stopped before starting any guest");
            halt_forever()
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // Running out of heap panics with Rust's "memory allocation of N bytes failed": say which
    // heap and what to change.
    let mut message: heapless::String<64> = heapless::String::new();
    let _ = core::fmt::write(&mut message, format_args!("{}", info.message()));
    if heap::is_out_of_heap(&message) {
        match HEAP.usage() {
            Some(u) => logger::emergency_write(format_args!(
                "\nALLY fatal reason=\"out of heap: {} ({} of {} bytes in use, peak {}); \
                 raise heap=\" cpu={}\n",
                info.message(),
                u.used,
                u.size,
                u.peak,
                logger::cpu_id()
            )),
            None => logger::emergency_write(format_args!(
                "\nALLY fatal reason=\"out of heap: {}; raise heap=\" cpu={}\n",
                info.message(),
                logger::cpu_id()
            )),
        }
        halt_forever()
    }
    logger::emergency_write(format_args!(
        "\nALLY fatal reason=panic cpu={} {}\n",
        logger::cpu_id(),
        info
    ));
    halt_forever()
}
