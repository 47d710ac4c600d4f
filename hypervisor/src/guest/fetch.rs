//! Fetching the guest's current instruction bytes through its page tables.
//!
//! The VM-exit instruction-length field is not valid for EPT violations (SDM Vol. 3C
//! 27.2.5), so Ally reads up to the architectural maximum of 15 bytes (SDM Vol. 2A 2.3.11)
//! from CS.base + RIP. The bytes may straddle a page boundary: each page is translated on
//! its own, and a second page that does not translate only matters if the instruction
//! really extends into it.

use core::fmt;

use super::memory::{GuestMemError, GuestMemory};
use super::paging_walk::{translate, WalkError};
use super::state::{AccessKind, CpuMode, GuestCpuState};
use crate::addr::{GuestPhysAddr, PAGE_SIZE};

/// Longest legal x86 instruction (SDM Vol. 2A 2.3.11).
pub const MAX_INSTRUCTION_LEN: usize = 15;

/// Why the instruction bytes could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchError {
    /// CS.base + RIP does not translate.
    Walk(WalkError),
    /// It translates to something that is not guest RAM (the guest executes from MMIO or
    /// from memory hidden from it).
    Memory {
        gla: u64,
        gpa: GuestPhysAddr,
        source: GuestMemError,
    },
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Walk(e) => write!(f, "instruction fetch: {e}"),
            FetchError::Memory { gla, gpa, source } => write!(
                f,
                "instruction fetch at linear {gla:#x} (guest-physical {gpa}): {source}"
            ),
        }
    }
}

/// The bytes at the guest's RIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchedInstruction {
    bytes: [u8; MAX_INSTRUCTION_LEN],
    len: usize,
    /// Linear address of the first byte.
    pub gla: u64,
    /// Why fewer than 15 bytes were read, when the read stopped at a page that does not
    /// translate. It becomes the error if the instruction turns out to be longer.
    pub truncated_by: Option<FetchError>,
}

impl FetchedInstruction {
    /// The bytes read (15, or fewer when `truncated_by` is set).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The linear address of the next instruction: CS.base + RIP, truncated to 32 bits outside
/// 64-bit mode (SDM Vol. 3A 3.4; in 64-bit mode the CS base is 0).
pub fn instruction_linear_address(cpu: &GuestCpuState) -> u64 {
    match cpu.mode() {
        CpuMode::Bits64 => cpu.rip,
        CpuMode::Bits32 | CpuMode::Bits16 => cpu.cs_base.wrapping_add(cpu.rip) & 0xffff_ffff,
    }
}

/// Reads up to [`MAX_INSTRUCTION_LEN`] bytes at the guest's CS.base + RIP.
pub fn fetch_instruction<M: GuestMemory + ?Sized>(
    cpu: &GuestCpuState,
    mem: &M,
) -> Result<FetchedInstruction, FetchError> {
    let gla = instruction_linear_address(cpu);
    let mut out = FetchedInstruction {
        bytes: [0; MAX_INSTRUCTION_LEN],
        len: 0,
        gla,
        truncated_by: None,
    };
    while out.len < MAX_INSTRUCTION_LEN {
        let addr = if cpu.mode() == CpuMode::Bits64 {
            gla.wrapping_add(out.len as u64)
        } else {
            gla.wrapping_add(out.len as u64) & 0xffff_ffff
        };
        let in_page = (PAGE_SIZE - addr % PAGE_SIZE) as usize;
        let n = in_page.min(MAX_INSTRUCTION_LEN - out.len);
        let piece = translate(cpu, addr, AccessKind::Fetch, mem)
            .map_err(FetchError::Walk)
            .and_then(|gpa| {
                mem.read(gpa, &mut out.bytes[out.len..out.len + n])
                    .map_err(|source| FetchError::Memory {
                        gla: addr,
                        gpa,
                        source,
                    })
            });
        match piece {
            Ok(()) => out.len += n,
            // The first byte must be readable; later pages only if the decoder needs them.
            Err(e) if out.len == 0 => return Err(e),
            Err(e) => {
                out.truncated_by = Some(e);
                break;
            }
        }
    }
    Ok(out)
}
