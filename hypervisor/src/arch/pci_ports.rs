//! PCI configuration mechanism #1 (ports 0xCF8/0xCFC, PCI Local Bus 3.0 3.2.2.3.2), for
//! Ally's own start-up scan; the guest's accesses go through `guards::nic`.

use crate::arch::instructions::{inl, outl};
use crate::cmdline::PciAddress;
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
