//! Configuration mechanism #1 as each OS core sees it (PCI Local Bus 3.0 3.2.2.3.2).
//!
//! The hardware's CONFIG_ADDRESS latch is one for the machine. If the guest wrote it
//! directly, one core's 0xCF8 could land between another core's 0xCF8 and 0xCFC, so that a
//! data access Ally judged for one register reached another. Ally therefore owns the latch:
//! each vCPU keeps the CONFIG_ADDRESS its guest wrote, and every data-port access selects it
//! on the hardware and performs the access as one locked pair (`arch::vmx::pci_guard`).
//!
//! Only a dword access at 0xCF8 is CONFIG_ADDRESS. Other accesses to 0xCF8-0xCFB are plain
//! I/O: 0xCF9 is the reset control register (judged by `crate::reset`), and 0xCF8/0xCFA are
//! configuration mechanism #2's CSE and forward registers (PCI 2.0 3.7.4.1.2), which would map
//! configuration space into ports 0xC000-0xCFFF behind every guard: Ally drops those writes.
//! A data access that does not fit in the dword at 0xCFC is refused.
//!
//! With a function's guards in place, two more registers would move a function out from
//! under them, so their writes are refused on every function: a bridge's bus numbers
//! (primary, secondary, subordinate at 0x18-0x1A of a type 1 or type 2 header: renumbering
//! would give a guarded function a bus number its guard does not know), and the host
//! bridge's memory-decode block at 0x60-0x67 of 00:00.0 (Q35's PCIEXBAR, which moves or
//! disables the ECAM window; i440FX's DRAM row boundaries).

use super::ConfigAddress;
use crate::cmdline::PciAddress;

const RESET_CONTROL_PORT: u16 = 0xCF9;

/// What an access to ports 0xCF8-0xCFF is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigPortAccess {
    /// A dword at 0xCF8: the vCPU's CONFIG_ADDRESS.
    Address,
    /// A data access at `byte` (0-3) of the dword CONFIG_ADDRESS selects.
    Data { byte: u8 },
    /// Plain I/O at 0xCF8-0xCFB: of a write, only the reset control byte reaches the
    /// hardware; reads return all ones.
    Legacy { reset_control: Option<u8> },
    /// An access that spans the address and data ports or runs past 0xCFF.
    Refused,
}

/// Classifies the guest's access to `port` (within 0xCF8-0xCFF) of `size` bytes.
pub fn classify(port: u16, size: u8, is_in: bool, value: u32) -> ConfigPortAccess {
    let end = u32::from(port) + u32::from(size);
    if port >= ConfigAddress::DATA_PORT {
        return if end <= u32::from(ConfigAddress::DATA_PORT) + 4 {
            ConfigPortAccess::Data {
                byte: (port - ConfigAddress::DATA_PORT) as u8,
            }
        } else {
            ConfigPortAccess::Refused
        };
    }
    if end > u32::from(ConfigAddress::DATA_PORT) {
        return ConfigPortAccess::Refused;
    }
    if port == ConfigAddress::PORT && size == 4 {
        return ConfigPortAccess::Address;
    }
    let reset_control = (!is_in)
        .then(|| crate::ioport::PortWrite::new(port, size, value).byte_at(RESET_CONTROL_PORT))
        .flatten();
    ConfigPortAccess::Legacy { reset_control }
}

/// A register whose write Ally refuses on every function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtectedRegister {
    BridgeBusNumbers,
    HostBridgeDecode,
    /// An AMD-Vi IOMMU's capability block (48882 3.2: its base address, range and
    /// miscellaneous registers): writable before the firmware locks it, and the base names
    /// the register window Ally keeps out of the guest's reach.
    IommuCapability,
}

/// The AMD-Vi IOMMUs' PCI functions and the offsets of their capability blocks, set once
/// before the guest runs.
static IOMMU_CAPABILITIES: spin::Once<heapless::Vec<(PciAddress, u8), 8>> = spin::Once::new();

/// Bytes of an IOMMU capability block (48882 3.2.1-3.2.7: header, base low and high, range,
/// miscellaneous 0 and 1).
const IOMMU_CAPABILITY_BYTES: u8 = 0x18;

/// Protects the capability blocks of `iommus` (function, capability offset) from the guest's
/// writes. Once, before the guest runs.
pub fn protect_iommu_capabilities(iommus: heapless::Vec<(PciAddress, u8), 8>) {
    IOMMU_CAPABILITIES.call_once(|| iommus);
}

impl ProtectedRegister {
    pub fn name(self) -> &'static str {
        match self {
            ProtectedRegister::BridgeBusNumbers => "bridge-bus-numbers",
            ProtectedRegister::HostBridgeDecode => "host-bridge-decode",
            ProtectedRegister::IommuCapability => "iommu-capability",
        }
    }
}

/// Whether a write of `size` bytes at `offset` of `function` touches a protected register.
/// `header_type` reads the function's header type (offset 0x0E), only when the write touches
/// the bus-number bytes.
pub fn protected_write(
    function: PciAddress,
    offset: u8,
    size: u8,
    header_type: impl FnOnce() -> u8,
) -> Option<ProtectedRegister> {
    let touches = |first: u8, count: u8| {
        let (a, b) = (u16::from(offset), u16::from(offset) + u16::from(size));
        a < u16::from(first) + u16::from(count) && u16::from(first) < b
    };
    let host_bridge = PciAddress {
        bus: 0,
        device: 0,
        function: 0,
    };
    if function == host_bridge && touches(0x60, 8) {
        return Some(ProtectedRegister::HostBridgeDecode);
    }
    if touches(0x18, 3) && matches!(header_type() & 0x7F, 1 | 2) {
        return Some(ProtectedRegister::BridgeBusNumbers);
    }
    if IOMMU_CAPABILITIES.get().is_some_and(|l| {
        l.iter()
            .any(|&(f, at)| f == function && touches(at, IOMMU_CAPABILITY_BYTES))
    }) {
        return Some(ProtectedRegister::IommuCapability);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_iommus_capability_block_is_protected_and_its_other_registers_are_not() {
        let iommu = PciAddress {
            bus: 0,
            device: 1,
            function: 0,
        };
        let mut list = heapless::Vec::new();
        let _ = list.push((iommu, 0x40));
        protect_iommu_capabilities(list);
        let header = || 0u8;
        for (offset, size) in [(0x44, 4), (0x48, 4), (0x40, 1), (0x57, 1), (0x3E, 4)] {
            assert_eq!(
                protected_write(iommu, offset, size, header),
                Some(ProtectedRegister::IommuCapability),
                "{offset:#x}/{size}"
            );
        }
        for (offset, size) in [(0x04, 2), (0x58, 4), (0x3C, 2)] {
            assert_eq!(
                protected_write(iommu, offset, size, header),
                None,
                "{offset:#x}"
            );
        }
        let other = PciAddress {
            bus: 0,
            device: 2,
            function: 0,
        };
        assert_eq!(protected_write(other, 0x44, 4, header), None);
    }

    #[test]
    fn only_a_dword_at_cf8_is_the_address() {
        assert_eq!(
            classify(0xCF8, 4, false, 0x8000_1014),
            ConfigPortAccess::Address
        );
        assert_eq!(classify(0xCF8, 4, true, 0), ConfigPortAccess::Address);
        // Mechanism #2's CSE (byte at 0xCF8) and forward register (0xCFA): no reset byte.
        assert_eq!(
            classify(0xCF8, 1, false, 0xF0),
            ConfigPortAccess::Legacy {
                reset_control: None
            }
        );
        assert_eq!(
            classify(0xCFA, 2, false, 0x0101),
            ConfigPortAccess::Legacy {
                reset_control: None
            }
        );
        // A word at 0xCF8 carries a reset-control byte.
        assert_eq!(
            classify(0xCF8, 2, false, 0x0200),
            ConfigPortAccess::Legacy {
                reset_control: Some(0x02)
            }
        );
        assert_eq!(
            classify(0xCF9, 1, true, 0),
            ConfigPortAccess::Legacy {
                reset_control: None
            }
        );
    }

    #[test]
    fn data_accesses_stay_within_the_data_dword() {
        assert_eq!(
            classify(0xCFC, 4, true, 0),
            ConfigPortAccess::Data { byte: 0 }
        );
        assert_eq!(
            classify(0xCFE, 2, false, 0),
            ConfigPortAccess::Data { byte: 2 }
        );
        assert_eq!(
            classify(0xCFF, 1, false, 0),
            ConfigPortAccess::Data { byte: 3 }
        );
        // Misaligned: past 0xCFF, or across the address and data ports.
        assert_eq!(classify(0xCFD, 4, false, 0), ConfigPortAccess::Refused);
        assert_eq!(classify(0xCFF, 2, true, 0), ConfigPortAccess::Refused);
        assert_eq!(classify(0xCFB, 2, false, 0), ConfigPortAccess::Refused);
        assert_eq!(classify(0xCF9, 4, false, 0), ConfigPortAccess::Refused);
    }

    #[test]
    fn protected_registers() {
        let f = |bus, device, function| PciAddress {
            bus,
            device,
            function,
        };
        let bridge = || 0x01;
        let multifunction_bridge = || 0x81;
        let cardbus = || 0x02;
        let endpoint = || 0x80;
        // Secondary/subordinate bus numbers of a PCI-PCI bridge, by dword, word and byte.
        for (offset, size) in [(0x18, 4), (0x19, 1), (0x1A, 2), (0x16, 4)] {
            assert_eq!(
                protected_write(f(0, 0x1E, 0), offset, size, bridge),
                Some(ProtectedRegister::BridgeBusNumbers),
                "{offset:#x}/{size}"
            );
        }
        assert_eq!(
            protected_write(f(0, 1, 0), 0x18, 4, multifunction_bridge),
            Some(ProtectedRegister::BridgeBusNumbers)
        );
        assert_eq!(
            protected_write(f(2, 0, 0), 0x19, 1, cardbus),
            Some(ProtectedRegister::BridgeBusNumbers)
        );
        // The secondary latency timer (0x1B) and endpoints' BAR2 are not.
        assert_eq!(protected_write(f(0, 1, 0), 0x1B, 1, bridge), None);
        assert_eq!(protected_write(f(0, 3, 0), 0x18, 4, endpoint), None);
        // The header type is read only when the bus-number bytes are touched.
        assert_eq!(
            protected_write(f(0, 3, 0), 0x10, 4, || panic!("read needlessly")),
            None
        );
        // PCIEXBAR / DRB on the host bridge, not on other functions.
        for (offset, size) in [(0x60, 4), (0x64, 4), (0x67, 1), (0x5E, 4)] {
            assert_eq!(
                protected_write(f(0, 0, 0), offset, size, endpoint),
                Some(ProtectedRegister::HostBridgeDecode),
                "{offset:#x}/{size}"
            );
        }
        assert_eq!(protected_write(f(0, 0, 0), 0x68, 4, endpoint), None);
        assert_eq!(protected_write(f(0, 1, 0), 0x60, 4, endpoint), None);
    }
}
