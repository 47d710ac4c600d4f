//! The thin layer that touches real x86 hardware. Everything here runs only on bare metal;
//! it builds on the host so that `cargo clippy` sees it, but host tests never call it.

pub mod apic;
pub mod descriptors;
pub mod instructions;
pub mod logger;
pub mod pci_ports;
pub mod serial;
pub mod svm;
pub mod vmx;
