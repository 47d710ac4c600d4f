//! The guest's reboot. A PC resets the whole machine when its OS reboots (keyboard
//! controller, port 0xCF9 or 0x92, a triple fault: `crate::reset`); under Ally that would take
//! the DPI partition down with it. Ally resets the guest's platform instead and boots it again
//! the way it booted it the first time:
//!
//! 1. every other OS core gets an INIT, as the reset line would give it, and waits for the
//!    next boot's SIPI;
//! 2. the NIC resets as the guest sees it (its CTRL.RST to the DPI partition: the guest's old
//!    rings are abandoned, nothing Ally accepted from them is lost, the real device keeps
//!    Ally's rings and its link); the AHCI controllers get the state the BIOS left them in, as
//!    its disk driver expects it (`pci::ahci`);
//! 3. the interrupt hardware is put back as the BIOS handed it over: the I/O APIC entries the
//!    firmware left, the 8259s (vector bases 08h/70h and the firmware's masks) and the PIT's
//!    18.2 Hz tick, this CPU's local APIC in virtual-wire mode with nothing in service;
//! 4. conventional memory (below 640 KiB: the IVT with Ally's INT 15h hook, the BIOS data
//!    area, the EBDA, Ally's real-mode stubs) returns to its state at the first boot;
//! 5. the boot CPU restarts in Ally's real-mode boot stub, which loads the MBR again.
//!
//! Memory above 640 KiB is not cleared (a PC's warm reset does not clear it either); the BIOS
//! is not run again, so its tables (ACPI, MP, E820 through the INT 15h hook) stay Ally's
//! filtered ones.

use crate::arch::apic::LocalApic;
use crate::arch::instructions::{self, copy_physical, inb, outb};
use crate::arch::pci_ports::{IdentityMmio, PortConfigSpace};
use crate::guards::init_sipi;
use crate::pci::ahci::FirmwareAhci;
use crate::platform::platform;
use crate::reset::ResetSource;
use crate::vcpu::StopReason;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use log::{info, warn};
use spin::Once;

/// Conventional memory, as restored at each reset: `[0, 640 KiB)`.
pub const LOW_MEMORY_BYTES: usize = 0xA_0000;

/// A guest that resets this often is stopped: it is in a reset loop.
pub const MAX_GUEST_RESETS: u64 = 64;

/// What a reset restores, recorded just before the guest's first instruction.
struct BootState {
    low_memory: &'static [u8],
    pic_masks: [u8; 2],
    ahci: heapless::Vec<FirmwareAhci, MAX_AHCI>,
}

/// AHCI controllers whose firmware state a reset restores.
const MAX_AHCI: usize = 4;

static BOOT_STATE: Once<BootState> = Once::new();
static RESETS: AtomicU64 = AtomicU64::new(0);
/// A reset an application processor asked for, for the boot CPU to carry out (0: none,
/// else [`ResetSource`] index + 1).
static DEFERRED: AtomicU8 = AtomicU8::new(0);

const SOURCES: [ResetSource; 4] = [
    ResetSource::Keyboard,
    ResetSource::ResetControl,
    ResetSource::FastReset,
    ResetSource::TripleFault,
];

/// Records conventional memory and the 8259 masks as the guest's first boot finds them, into
/// `buffer` (at least [`LOW_MEMORY_BYTES`]).
///
/// # Safety
/// Call once, on the boot CPU, just before the guest first runs: `[0, 640 KiB)` is
/// identity-mapped RAM nothing writes meanwhile, and `buffer` is Ally's, for ever.
pub unsafe fn record_boot_state(buffer: &'static mut [u8]) {
    let copy = &mut buffer[..LOW_MEMORY_BYTES];
    // SAFETY: guaranteed by the caller.
    unsafe { copy_physical(0, copy.as_mut_ptr() as u64, LOW_MEMORY_BYTES as u64) };
    // SAFETY: reading the 8259 interrupt mask registers (OCW1) has no side effect.
    let pic_masks = unsafe { [inb(0x21), inb(0xA1)] };
    let ahci = FirmwareAhci::record_all(&PortConfigSpace, &IdentityMmio);
    for c in &ahci {
        info!(
            "guest reset state recorded: AHCI {} at {:#x}, ports {:#x}",
            c.function, c.abar, c.implemented
        );
    }
    BOOT_STATE.call_once(|| BootState {
        low_memory: copy,
        pic_masks,
        ahci,
    });
    info!(
        "guest reset state recorded: 640 KiB of conventional memory, 8259 masks {pic_masks:02x?}"
    );
}

/// An application processor's reset request: the boot CPU carries it out at its next exit
/// (the caller then makes this vCPU wait for the next boot's SIPI).
pub fn defer_to_boot_cpu(source: ResetSource) {
    let index = SOURCES.iter().position(|&s| s == source).unwrap_or(0) as u8;
    DEFERRED.store(index + 1, Ordering::Release);
    info!("ALLY guest-reset-deferred source={source}");
}

/// At every exit of CPU `apic_id`: a reset an application processor asked for, taken by the
/// boot CPU. One relaxed load when none is pending.
#[inline]
pub fn take_deferred(apic_id: u32) -> Option<ResetSource> {
    if DEFERRED.load(Ordering::Relaxed) == 0 || apic_id != platform().boot_cpu {
        return None;
    }
    let index = DEFERRED.swap(0, Ordering::Acquire);
    SOURCES.get(usize::from(index).checked_sub(1)?).copied()
}

/// Spins allowed for the other OS cores to leave the guest (each takes its INIT at its next
/// VM exit, which the VMX-preemption timer bounds).
const WAIT_SPINS: u64 = 200_000_000;

/// What [`reset_platform`] did, for the report once the boot CPU's state is reset too.
#[derive(Debug, Clone, Copy)]
pub struct Restart {
    pub count: u64,
    pub source: ResetSource,
    /// OS cores sent an INIT, and whether all of them left the guest in time.
    pub others: usize,
    pub others_stopped: bool,
    /// Interrupts taken to drain the local APIC.
    pub drained: u32,
}

impl Restart {
    /// `ALLY guest-restarted`: the backend has put the boot CPU back in the boot stub.
    pub fn report(&self) {
        info!(
            "ALLY guest-restarted count={} source={} other-os-cores={} stopped={} interrupt-windows={}",
            self.count, self.source, self.others, self.others_stopped, self.drained
        );
    }
}

/// Steps 1-4 of the reset (the module's list) on the boot CPU `apic_id`; the backend then
/// restarts its vCPU in the boot stub (step 5) and calls [`Restart::report`].
pub fn reset_platform(
    apic_id: u32,
    source: ResetSource,
    guest_rip: u64,
) -> Result<Restart, StopReason> {
    let count = RESETS.fetch_add(1, Ordering::Relaxed) + 1;
    if count > MAX_GUEST_RESETS {
        return Err(StopReason::GuestRequested(
            "the guest reset more than 64 times (a reset loop)",
        ));
    }
    let boot = BOOT_STATE.get().ok_or(StopReason::GuestRequested(
        "the guest reset before Ally recorded its boot state",
    ))?;
    let p = platform();
    info!("ALLY guest-reset source={source} count={count} rip={guest_rip:#x}");

    // 1. The other OS cores.
    let others = init_sipi::init_all_but(apic_id);
    let mut spins = 0u64;
    while !init_sipi::all_but_waiting(apic_id) && spins < WAIT_SPINS {
        spins += 1;
        core::hint::spin_loop();
    }
    let others_stopped = init_sipi::all_but_waiting(apic_id);
    // A request another OS core made meanwhile (say, its triple fault while it was stopped)
    // is part of this reset, not the next one.
    DEFERRED.store(0, Ordering::Release);
    if !others_stopped {
        warn!("ALLY guest-reset: an OS core did not leave the guest; restarting anyway");
    }

    // 2. The NIC.
    if let Some(nic) = &p.nic {
        nic.platform_reset();
    }
    // The BIOS's disk controllers. Ally's configuration accesses change the address latch at
    // 0xCF8, which no guest CPU is using now; the restarted guest writes it before its next
    // data access.
    for controller in &boot.ahci {
        let restored = controller.restore(&PortConfigSpace, &IdentityMmio);
        if restored.stuck != 0 {
            warn!(
                "ALLY guest-reset-ahci function={} ports={} stuck={:#x}: a port did not start again; the BIOS may not read from it",
                controller.function, restored.ports, restored.stuck
            );
        } else {
            info!(
                "ALLY guest-reset-ahci function={} ports={} restored to the firmware's state",
                controller.function, restored.ports
            );
        }
    }

    // 3. Interrupt hardware as the BIOS handed it over. Local sources masked and in-service
    //    interrupts ended first (their EOIs clear the I/O APIC's remote IRRs while the entries
    //    still hold the old vectors), then the I/O APIC, then whatever the old guest's devices
    //    left requested is taken here, in VMX root, by Ally's handlers (acknowledged and
    //    dropped): in real mode its vectors would land on IVT entries that are not handlers.
    let apic = LocalApic::current();
    apic.quiesce();
    for ioapic in p.ioapics {
        ioapic.restore_firmware_entries();
    }
    let mut drained = 0;
    while !apic.nothing_requested() && drained < 256 {
        // SAFETY: in VMX root Ally's IDT handles every vector (stray ones are acknowledged
        // and dropped); LINT0 is masked, so no 8259 vector (which would alias an exception)
        // can arrive.
        unsafe { instructions::take_pending_interrupts() };
        drained += 1;
    }
    // SAFETY: the 8259s and the PIT are the guest's; a reset would reinitialise them and the
    // restarted guest reprograms them. ICW1-ICW4 then OCW1 (8259A datasheet); PIT channel 0,
    // lobyte/hibyte, mode 3, count 0 = 65536 (the BIOS's 18.2 Hz tick).
    unsafe {
        for (command, data, base, cascade, mask) in [
            (0x20, 0x21, 0x08, 0x04, boot.pic_masks[0]),
            (0xA0, 0xA1, 0x70, 0x02, boot.pic_masks[1]),
        ] {
            outb(command, 0x11);
            outb(data, base);
            outb(data, cascade);
            outb(data, 0x01);
            outb(data, mask);
        }
        outb(0x43, 0x36);
        outb(0x40, 0);
        outb(0x40, 0);
    }
    apic.enable_virtual_wire();

    // 4. Conventional memory.
    // SAFETY: `[0, 640 KiB)` is identity-mapped guest RAM; no other OS core runs the guest
    // (they wait for a SIPI) and the DPI partition never uses it.
    unsafe { copy_physical(boot.low_memory.as_ptr() as u64, 0, LOW_MEMORY_BYTES as u64) };

    // 5. The boot CPU at Ally's boot stub, as at the first boot.
    Ok(Restart {
        count,
        source,
        others,
        others_stopped,
        drained,
    })
}
