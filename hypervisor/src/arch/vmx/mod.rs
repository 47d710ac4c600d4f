//! Intel VMX: capabilities, the per-CPU VMCS, guest entry and the VM-exit handlers.

pub mod apic_guard;
pub mod capabilities;
pub mod exits;
pub mod guest_reset;
pub mod init_sipi;
pub mod ioapic_guard;
pub mod launch;
pub mod nic_guard;
pub mod pci_guard;
pub mod platform;
pub mod realmode;
pub mod vcpu;
