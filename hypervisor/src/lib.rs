//! Ally's hypervisor core.
//!
//! Hardware-independent logic (memory-map filtering, EPT/NPT building, option parsing, exit
//! decoding, the exit policy in `vcpu` over a small `GuestCpu` trait) is plain Rust that is
//! unit-tested on the host. The modules under `arch` touch real hardware (`arch::vmx` and
//! `arch::svm` are the two backends); the `guards` reach it only through `arch`.
#![cfg_attr(not(test), no_std)]

pub mod acpi;
pub mod addr;
pub mod arch;
pub mod cmdline;
pub mod control_regs;
pub mod exit;
pub mod guards;
pub mod guest;
pub mod guest_reset;
pub mod int15;
pub mod iommu;
pub mod ioport;
pub mod ipi;
pub mod log_limit;
pub mod memmap;
pub mod msr;
pub mod mtrr;
pub mod paging;
pub mod pci;
pub mod platform;
pub mod realmode;
pub mod record_ring;
pub mod reset;
pub mod sleep;
pub mod startup;
pub mod topology;
pub mod vcpu;
