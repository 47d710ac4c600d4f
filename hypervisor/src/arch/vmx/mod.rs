//! Intel VMX: capabilities, the per-CPU VMCS, guest entry and the VM-exit handlers.

pub mod capabilities;
pub mod exits;
pub mod launch;
pub mod vcpu;
