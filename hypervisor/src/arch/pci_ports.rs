//! PCI configuration mechanism #1 (ports 0xCF8/0xCFC, PCI Local Bus 3.0 3.2.2.3.2), for
//! Ally's own start-up scan; the guest's accesses go through `guards::nic`. And device
//! registers in memory space, through Ally's identity map.

use crate::arch::instructions::{inl, outl};
use crate::cmdline::PciAddress;
use crate::pci::ahci::Mmio;
use crate::pci::{ConfigAddress, ConfigSpace};

/// Configuration space through the I/O ports. Only used before the guest runs (the address
/// latch is shared with it afterwards).
pub struct PortConfigSpace;

impl ConfigSpace for PortConfigSpace {
    fn read32(&self, function: PciAddress, register: u8) -> u32 {
        // SAFETY: configuration mechanism #1 exists on every PC chipset; Ally is alone on the
        // machine while it scans.
        unsafe {
            outl(
                ConfigAddress::PORT,
                ConfigAddress::new(function, register).0,
            );
            inl(ConfigAddress::DATA_PORT)
        }
    }

    fn write32(&self, function: PciAddress, register: u8, value: u32) {
        // SAFETY: as for `read32`.
        unsafe {
            outl(
                ConfigAddress::PORT,
                ConfigAddress::new(function, register).0,
            );
            outl(ConfigAddress::DATA_PORT, value);
        }
    }
}

/// Device registers at their physical addresses (Ally's page tables map the physical address
/// space one to one, and the MTRRs make device ranges uncacheable).
pub struct IdentityMmio;

impl Mmio for IdentityMmio {
    fn read32(&self, address: u64) -> u32 {
        // SAFETY: the caller's address is a register of a device Ally found decoding it
        // (a BAR read from its configuration space); an aligned 32-bit read is how such
        // registers are accessed.
        unsafe { (address as *const u32).read_volatile() }
    }

    fn write32(&self, address: u64, value: u32) {
        // SAFETY: as for `read32`.
        unsafe { (address as *mut u32).write_volatile(value) }
    }
}
