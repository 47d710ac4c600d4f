//! The guest as Ally sees it at an EPT violation: its CPU state, its memory, its page
//! tables, and the one instruction that touched a page Ally keeps unmapped.
//!
//! The flow for an EPT violation on a trapped MMIO page (SDM Vol. 3C 28.3.3.2) is
//! [`emulate::emulate_mmio`]: fetch the faulting instruction through the guest's own page
//! tables ([`fetch`], [`paging_walk`]), decode it ([`decode`], iced-x86), check that its memory
//! operand really is the faulting guest-physical address, perform the access through an
//! [`emulate::MmioHandler`], write loads back to the destination register and advance RIP.
//!
//! Nothing here touches hardware or allocates; every input is guest-controlled and is
//! validated without panicking. (iced-x86 allocates its decoder tables once, on first use:
//! call [`decode::warm_up`] at initialisation, after the heap exists.)
//!
//! Use from the EPT-violation exit handler:
//!
//! 1. Fill a [`GuestCpuState`]: `regs` from the exit stub's save area with `regs.rsp` from
//!    VMCS guest RSP; `rip`, `rflags`, `cr0`, `cr3`, `cr4`, `efer` (guest IA32_EFER), the CS
//!    selector/base/access rights, SS access rights and the ES/SS/DS/FS/GS bases from the
//!    guest-state area; `max_phys_addr_bits` from the CPUID leaf the guest sees. CR0 and
//!    CR4 are the VMCS guest fields (what the processor walks the guest's tables with), not
//!    the read shadows.
//! 2. The access kind from the exit qualification:
//!    [`AccessKind::from_ept_violation_qualification`] (SDM 28.2.1, Table 28-7).
//! 3. Call [`emulate_mmio`] with the guest-physical-address field. On `Ok`, write `cpu.rip`
//!    and `cpu.regs.rsp` back to the VMCS and the other registers to the save area, then
//!    resume; on `Err`, report it (its `Display` names the reason) and stop the guest.

pub mod decode;
pub mod emulate;
pub mod fetch;
pub mod follow_on;
pub mod memory;
pub mod paging_walk;
pub mod state;
pub mod testing;

#[cfg(test)]
mod tests;

pub use decode::{
    decode_mmio, warm_up, DecodeError, InstructionBytes, MemOperand, MmioInstruction, MmioOp,
    Mnemonic,
};
pub use emulate::{emulate_mmio, EmulatedAccess, EmulationError, MmioDirection, MmioHandler};
pub use fetch::{fetch_instruction, FetchError, FetchedInstruction, MAX_INSTRUCTION_LEN};
pub use follow_on::{emulate_follow_on, MAX_FOLLOW_ON};
pub use memory::{GuestMemError, GuestMemory};
pub use paging_walk::{translate, PagingLevel, PagingMode, WalkError};
pub use state::{
    AccessKind, AccessWidth, CpuMode, GprOperand, GprPart, GuestCpuState, GuestRegisters,
    SegmentBases, SegmentReg,
};
