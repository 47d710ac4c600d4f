//! The vendor-neutral guards: what Ally does with the guest's accesses to the devices it
//! filters (local APIC, I/O APICs, PCI configuration, the NIC's trapped registers) and the
//! INIT/SIPI emulation. The VMX and SVM exit handlers call them with the decoded access; they
//! reach hardware only through `crate::arch` (port I/O, the real APIC).

pub mod apic;
pub mod init_sipi;
pub mod ioapic;
pub mod nic;
pub mod pci_config;
