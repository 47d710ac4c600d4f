//! AMD SVM (AMD64 Architecture Programmer's Manual Vol. 2, ch. 15): the VMCB, capabilities,
//! guest entry and the permission maps. The hardware-facing pieces of Ally's SVM backend;
//! the exit handlers are still VMX-only.

pub mod capabilities;
pub mod launch;
pub mod permission_maps;
pub mod vmcb;
