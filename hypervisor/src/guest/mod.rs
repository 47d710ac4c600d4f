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
//! validated without panicking.

pub mod decode;
pub mod emulate;
pub mod fetch;
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
pub use memory::{GuestMemError, GuestMemory};
pub use paging_walk::{translate, PagingLevel, PagingMode, WalkError};
pub use state::{
    AccessKind, AccessWidth, CpuMode, GprOperand, GprPart, GuestCpuState, GuestRegisters,
    SegmentBases, SegmentReg,
};
