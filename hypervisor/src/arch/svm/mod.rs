//! AMD SVM (AMD64 Architecture Programmer's Manual Vol. 2, ch. 15): the VMCB, capabilities,
//! guest entry, the permission maps, the vCPU and the #VMEXIT dispatcher, which hands every
//! guarded access to the vendor-neutral policy in `crate::vcpu`.

pub mod capabilities;
pub mod exits;
pub mod launch;
pub mod permission_maps;
pub mod vcpu;
pub mod vmcb;
