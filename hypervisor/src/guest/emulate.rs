//! Emulating the guest instruction that touched a trapped MMIO page.

use core::fmt;

use super::decode::{decode_mmio, DecodeError, InstructionBytes, MmioInstruction, MmioOp};
use super::fetch::{fetch_instruction, FetchError};
use super::memory::GuestMemory;
use super::paging_walk::{translate, PagingMode, WalkError};
use super::state::{AccessKind, AccessWidth, CpuMode, GprOperand, GuestCpuState};
use crate::addr::{GuestPhysAddr, PAGE_SIZE};

/// A device model behind a trapped MMIO range. Accesses arrive with the guest's width; the
/// value of a read is truncated to that width by the emulator.
pub trait MmioHandler {
    fn read(&mut self, gpa: GuestPhysAddr, width: AccessWidth) -> u64;
    fn write(&mut self, gpa: GuestPhysAddr, width: AccessWidth, value: u64);
}

impl<H: MmioHandler + ?Sized> MmioHandler for &mut H {
    fn read(&mut self, gpa: GuestPhysAddr, width: AccessWidth) -> u64 {
        (**self).read(gpa, width)
    }
    fn write(&mut self, gpa: GuestPhysAddr, width: AccessWidth, value: u64) {
        (**self).write(gpa, width, value)
    }
}

/// Direction of an emulated MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioDirection {
    Read,
    Write,
}

/// What [`emulate_mmio`] did, for logging and statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmulatedAccess {
    pub direction: MmioDirection,
    pub gpa: GuestPhysAddr,
    pub width: AccessWidth,
    /// The value written to the device, or the value the device returned (truncated to
    /// `width`, before any sign or zero extension into the register).
    pub value: u64,
    /// The destination register of a load (its new full value is in the CPU state).
    pub dest: Option<GprOperand>,
    /// The instruction, decoded.
    pub instruction: MmioInstruction,
    /// Guest linear address of the memory operand.
    pub gla: u64,
    /// RIP before and after.
    pub old_rip: u64,
    pub new_rip: u64,
}

impl fmt::Display for MmioDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MmioDirection::Read => "read",
            MmioDirection::Write => "write",
        })
    }
}

/// One log line: `rip 0x…: write 32-bit 0x1 at 0xfebc3818 [89 87 18 38 00 00]`, plus the
/// destination register for loads.
impl fmt::Display for EmulatedAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rip {:#x}: {} {} {:#x} at {} [{}]",
            self.old_rip, self.direction, self.width, self.value, self.gpa, self.instruction.bytes
        )?;
        if let Some(dest) = self.dest {
            write!(f, " into {dest}")?;
        }
        Ok(())
    }
}

/// Why an MMIO access could not be emulated. The guest's state is unchanged in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulationError {
    /// The EPT violation was an instruction fetch: the guest executes from a trapped page.
    FetchFromMmio { gpa: GuestPhysAddr, rip: u64 },
    /// The instruction bytes could not be read.
    Fetch(FetchError),
    /// The instruction is not a supported MMIO access.
    Decode { rip: u64, source: DecodeError },
    /// The instruction stores but the exit reported a read, or the other way round.
    DirectionMismatch {
        rip: u64,
        exit_access: AccessKind,
        bytes: InstructionBytes,
    },
    /// The operand's linear address is not canonical (would be #GP or #SS).
    NonCanonicalOperand { rip: u64, gla: u64 },
    /// The operand spans two pages; split MMIO accesses are not emulated.
    CrossesPage {
        rip: u64,
        gla: u64,
        width: AccessWidth,
    },
    /// The operand's linear address does not translate.
    OperandWalk { rip: u64, source: WalkError },
    /// The operand translates to another guest-physical address than the one that faulted:
    /// the guest changed its page tables or code under us, or the decode is wrong.
    GpaMismatch {
        rip: u64,
        gla: u64,
        faulting: GuestPhysAddr,
        translated: GuestPhysAddr,
    },
}

impl fmt::Display for EmulationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmulationError::FetchFromMmio { gpa, rip } => write!(
                f,
                "guest at rip {rip:#x} fetches instructions from trapped MMIO at {gpa}"
            ),
            EmulationError::Fetch(e) => write!(f, "{e}"),
            EmulationError::Decode { rip, source } => write!(f, "at rip {rip:#x}: {source}"),
            EmulationError::DirectionMismatch {
                rip,
                exit_access,
                bytes,
            } => write!(
                f,
                "at rip {rip:#x}: instruction [{bytes}] does not perform the {exit_access} \
                 the EPT violation reported"
            ),
            EmulationError::NonCanonicalOperand { rip, gla } => write!(
                f,
                "at rip {rip:#x}: memory operand address {gla:#x} is not canonical"
            ),
            EmulationError::CrossesPage { rip, gla, width } => write!(
                f,
                "at rip {rip:#x}: {width} MMIO access at linear {gla:#x} crosses a page boundary"
            ),
            EmulationError::OperandWalk { rip, source } => {
                write!(f, "at rip {rip:#x}: memory operand: {source}")
            }
            EmulationError::GpaMismatch {
                rip,
                gla,
                faulting,
                translated,
            } => write!(
                f,
                "at rip {rip:#x}: memory operand at linear {gla:#x} translates to {translated}, \
                 not the faulting {faulting}"
            ),
        }
    }
}

/// Emulates the instruction at the guest's RIP, which caused an EPT violation of kind
/// `access` at guest-physical `gpa` on a page that `handler` models:
///
/// 1. fetches the instruction through the guest's page tables and decodes it;
/// 2. checks it is a supported MOV form in the exit's direction, computes its operand's
///    linear address and checks that it translates to `gpa`;
/// 3. performs the access through `handler`, writes a load's result to the destination
///    register (x86 merge/zero-extend rules, MOVZX/MOVSX extension);
/// 4. advances RIP by the instruction length (IP wraps at 16 bits in 16-bit code, EIP at 32
///    bits in 32-bit code).
///
/// On error nothing is changed: neither the CPU state nor the device has been touched.
/// The caller writes `cpu.rip` (and `cpu.regs.rsp`, which a load may target) back to the
/// VMCS.
pub fn emulate_mmio<M, H>(
    cpu: &mut GuestCpuState,
    gpa: GuestPhysAddr,
    access: AccessKind,
    mem: &M,
    handler: &mut H,
) -> Result<EmulatedAccess, EmulationError>
where
    M: GuestMemory + ?Sized,
    H: MmioHandler + ?Sized,
{
    let rip = cpu.rip;
    if access == AccessKind::Fetch {
        return Err(EmulationError::FetchFromMmio { gpa, rip });
    }
    let mode = cpu.mode();
    let fetched = fetch_instruction(cpu, mem).map_err(EmulationError::Fetch)?;
    let instruction = decode_mmio(fetched.bytes(), mode, rip).map_err(|source| {
        match (source, fetched.truncated_by) {
            // The instruction runs into a page that does not translate.
            (DecodeError::Truncated { .. }, Some(e)) => EmulationError::Fetch(e),
            _ => EmulationError::Decode { rip, source },
        }
    })?;

    let direction = match instruction.op {
        MmioOp::Load { .. } => MmioDirection::Read,
        MmioOp::StoreReg { .. } | MmioOp::StoreImm { .. } => MmioDirection::Write,
    };
    let expected = match direction {
        MmioDirection::Read => AccessKind::Read,
        MmioDirection::Write => AccessKind::Write,
    };
    if access != expected {
        return Err(EmulationError::DirectionMismatch {
            rip,
            exit_access: access,
            bytes: instruction.bytes,
        });
    }

    let gla = operand_linear_address(cpu, &instruction)?;
    let width = instruction.width;
    if gla % PAGE_SIZE + width.bytes() > PAGE_SIZE {
        return Err(EmulationError::CrossesPage { rip, gla, width });
    }
    let translated = translate(cpu, gla, expected, mem)
        .map_err(|source| EmulationError::OperandWalk { rip, source })?;
    if translated != gpa {
        return Err(EmulationError::GpaMismatch {
            rip,
            gla,
            faulting: gpa,
            translated,
        });
    }

    let (value, dest) = match instruction.op {
        MmioOp::Load { dest, sign_extend } => {
            let raw = handler.read(gpa, width) & width.mask();
            let extended = if sign_extend {
                width.sign_extend(raw)
            } else {
                raw
            };
            cpu.regs.write(dest, extended);
            (raw, Some(dest))
        }
        MmioOp::StoreReg { src } => {
            let v = cpu.regs.read(src) & width.mask();
            handler.write(gpa, width, v);
            (v, None)
        }
        MmioOp::StoreImm { value } => {
            let v = value & width.mask();
            handler.write(gpa, width, v);
            (v, None)
        }
    };

    let next = rip.wrapping_add(instruction.len as u64);
    cpu.rip = match mode {
        CpuMode::Bits64 => next,
        CpuMode::Bits32 => next & 0xffff_ffff,
        CpuMode::Bits16 => next & 0xffff,
    };
    Ok(EmulatedAccess {
        direction,
        gpa,
        width,
        value,
        dest,
        instruction,
        gla,
        old_rip: rip,
        new_rip: cpu.rip,
    })
}

/// Segment base + effective address; 32-bit wrap outside 64-bit mode, canonical check in
/// it (SDM Vol. 3A 3.4.4, Vol. 1 3.3.7.1).
pub(super) fn operand_linear_address(
    cpu: &GuestCpuState,
    instruction: &MmioInstruction,
) -> Result<u64, EmulationError> {
    let mem = &instruction.mem;
    let mut ea = mem.effective_address(&cpu.regs);
    if mem.rip_relative && mem.address_bits == 32 {
        // EIP-relative (67 prefix in 64-bit mode): the target wraps at 4 GiB.
        ea &= 0xffff_ffff;
    }
    let la = cpu.segment_base(mem.segment).wrapping_add(ea);
    if cpu.mode() != CpuMode::Bits64 {
        return Ok(la & 0xffff_ffff);
    }
    let bits = PagingMode::of(cpu).linear_bits().max(48);
    let shift = 64 - bits;
    if (((la << shift) as i64) >> shift) as u64 != la {
        return Err(EmulationError::NonCanonicalOperand {
            rip: cpu.rip,
            gla: la,
        });
    }
    Ok(la)
}
