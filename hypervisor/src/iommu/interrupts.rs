//! Interrupt remapping as the guards see it, whatever the IOMMU: once Ally has turned
//! remapping on, every interrupt a device sends goes through a table Ally owns, and the
//! guards that already filter the guest's interrupt programming (the I/O APICs'
//! redirection entries, the MSI registers) fill that table instead of handing the
//! device a message it could aim anywhere.
//!
//! The guest never sees the difference: it reads back what it wrote, and the device holds
//! a message that only names a table entry (VT-d: a handle in remappable format; AMD-Vi: an
//! index in the data, the address fixed). A bus master the guest programs to write to
//! 0xFEEx_xxxx by DMA then raises at most the interrupts of the entries Ally wrote for that
//! very device (the entry checks the requester), never an NMI, INIT or SMI at a DPI core.

use crate::addr::HostPhysAddr;
use crate::cmdline::PciAddress;
use core::sync::atomic::{AtomicU64, Ordering};

/// Memory an IOMMU reads (a remapping table, a command buffer, an invalidation queue):
/// atomics in Ally's identity-mapped memory, and where they lie.
pub struct IommuMemory<T: 'static> {
    pub words: &'static [T],
    pub phys: HostPhysAddr,
}

impl<T> Clone for IommuMemory<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for IommuMemory<T> {}

/// An MSI as the device is to send it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Message {
    pub address: u32,
    /// Message Data (16 bits).
    pub data: u16,
}

/// What the guards ask of the remapping hardware.
pub trait InterruptRemapping: Sync {
    /// Pin `pin` of the I/O APIC at `ioapic_base` was given `rte` (compatibility format,
    /// its destination already filtered off the DPI cores). Writes the pin's table entry
    /// (none while it is masked, or for a delivery mode a device may not use) and returns
    /// the redirection entry the I/O APIC gets.
    fn ioapic_entry(&self, ioapic_base: u64, pin: u8, rte: u64) -> u64;

    /// The function at `function` was given the MSI `message` (its destination filtered;
    /// `None`: not an interrupt address). Writes its table entries and returns the message
    /// the device gets: one that reaches only those entries.
    fn msi(&self, function: PciAddress, message: Option<Message>) -> Message;

    /// The IOMMU's name in reports (`vt-d`, `amd-vi`).
    fn kind(&self) -> &'static str;
}

static REMAPPING: spin::Once<&'static dyn InterruptRemapping> = spin::Once::new();

/// Turns the guards over to `remapping` (once, before the guest runs).
pub fn install(remapping: &'static dyn InterruptRemapping) {
    REMAPPING.call_once(|| remapping);
}

/// The remapping the guards use, once installed.
pub fn remapping() -> Option<&'static dyn InterruptRemapping> {
    REMAPPING.get().copied()
}

/// What the remapping did, for the power-off report.
#[derive(Default)]
pub struct RemapCounters {
    /// Table entries written for a guest's I/O APIC pin or MSI.
    pub entries: AtomicU64,
    /// Interrupts given no entry: a delivery mode no device may send (SMI, INIT, and on
    /// AMD-Vi NMI and ExtINT, which its basic entries cannot express), or an MSI address
    /// outside the interrupt window.
    pub refused: AtomicU64,
    /// An I/O APIC pin took a table slot another unmasked pin held (AMD-Vi indexes the
    /// I/O APIC's table by vector: two pins with one vector share a slot).
    pub conflicts: AtomicU64,
    /// Invalidations sent, and those the hardware did not confirm in time.
    pub invalidations: AtomicU64,
    pub invalidation_timeouts: AtomicU64,
}

pub static COUNTERS: RemapCounters = RemapCounters {
    entries: AtomicU64::new(0),
    refused: AtomicU64::new(0),
    conflicts: AtomicU64::new(0),
    invalidations: AtomicU64::new(0),
    invalidation_timeouts: AtomicU64::new(0),
};

/// Counts one invalidation and waits, boundedly, until `done` (the completion store or wait
/// status the IOMMU writes when it has carried the invalidation out); counts a timeout.
pub fn await_invalidation(done: impl Fn() -> bool) -> bool {
    COUNTERS.invalidations.fetch_add(1, Ordering::Relaxed);
    let seen = (0..super::remapping::POLLS).any(|_| {
        let seen = done();
        core::hint::spin_loop();
        seen
    });
    if !seen {
        COUNTERS
            .invalidation_timeouts
            .fetch_add(1, Ordering::Relaxed);
    }
    seen
}

/// The power-off line, when remapping is on.
pub fn report() {
    let Some(r) = remapping() else {
        return;
    };
    let c = &COUNTERS;
    log::info!(
        "ALLY intremap kind={} entries={} refused={} conflicts={} invalidations={} invalidation-timeouts={}",
        r.kind(),
        c.entries.load(Ordering::Relaxed),
        c.refused.load(Ordering::Relaxed),
        c.conflicts.load(Ordering::Relaxed),
        c.invalidations.load(Ordering::Relaxed),
        c.invalidation_timeouts.load(Ordering::Relaxed)
    );
}
