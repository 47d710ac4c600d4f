//! Emulating, in the exit of a trapped MMIO write, the short stretch of instructions up to the
//! driver's next access to a trapped register, so that the pair costs one VM exit, not two.
//!
//! Drivers flush a posted MMIO write by reading a register of the same device right after
//! it. Linux's e1000 does `ew32(IMC, ~0); E1000_WRITE_FLUSH()` in its interrupt handler and
//! `ew32(IMS, mask); E1000_WRITE_FLUSH()` when its poll ends: two of the five exits of every
//! guest interrupt are those STATUS reads. Between the write and the read the compiler puts
//! only a reload of `hw->hw_addr` from RAM and, at times, an `add` of the register's offset
//! (Debian 6.1's e1000.ko, `e1000_intr`):
//!
//! ```text
//! mov %edx,0xd8(%rax)      ; IMC: the trapped write, emulated by the exit
//! mov 0xe08(%rbx),%rax     ; RAM load of hw_addr
//! add $0x8,%rax            ; + STATUS
//! mov (%rax),%eax          ; the flush read: a trapped read
//! ```
//!
//! [`emulate_follow_on`] runs exactly that shape and nothing else: up to
//! [`MAX_FOLLOW_ON`] instructions, each a load from guest RAM (any MOV/MOVZX/MOVSX form the
//! MMIO decoder knows), `ADD r64, imm` or `LEA r64, m`, ending in a load from a trapped
//! register. It works on a copy of the CPU state and commits only when the stretch ends in
//! that trapped load; any other instruction, a load that is not plain RAM above 1 MiB, a
//! page-walk failure or a page crossing leaves the guest exactly as the first exit left it,
//! and the guest runs the instructions itself. The result is architecturally what the CPU
//! would have done (SDM Vol. 2A ADD: CF, OF, SF, ZF, AF, PF), minus accessed-bit updates in
//! the guest's page tables, which the MMIO path already skips.
//!
//! The caller decides whether it may run at all: only in 64-bit mode, without RFLAGS.TF and
//! without enabled debug breakpoints (DR7), where an instruction boundary is observable.

use iced_x86::{Code, Decoder, DecoderOptions, OpKind, Register};

use super::decode::{decode_mmio, MmioOp};
use super::emulate::{emulate_mmio, operand_linear_address, EmulatedAccess, MmioHandler};
use super::fetch::fetch_instruction;
use super::memory::GuestMemory;
use super::paging_walk::translate;
use super::state::{AccessKind, CpuMode, GprOperand, GprPart, GuestCpuState};
use crate::addr::{GuestPhysAddr, PAGE_SIZE};

/// Instructions emulated after the trapped write, the final trapped load included.
pub const MAX_FOLLOW_ON: usize = 4;

/// RAM loads below this address are not emulated: the first MiB holds legacy device windows
/// (VGA) whose reads have side effects.
const LOWEST_RAM_LOAD: u64 = 0x10_0000;

/// RFLAGS bits ADD writes (SDM Vol. 1 3.4.3.1).
const CF: u64 = 1 << 0;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;
const ARITHMETIC_FLAGS: u64 = CF | PF | AF | ZF | SF | OF;

/// RFLAGS.TF: single-stepping makes every instruction boundary a debug exception.
pub const RFLAGS_TF: u64 = 1 << 8;

/// Emulates the instructions after a trapped write up to and including the next load from a
/// trapped register (see the module doc). `trapped` gives the handler for a guest-physical
/// address on a trapped page, or `None` for any other address. Returns that load when the
/// stretch was emulated and committed to `cpu`; `None` leaves `cpu` untouched.
pub fn emulate_follow_on<M, H, F>(
    cpu: &mut GuestCpuState,
    mem: &M,
    mut trapped: F,
) -> Option<EmulatedAccess>
where
    M: GuestMemory + ?Sized,
    H: MmioHandler,
    F: FnMut(GuestPhysAddr) -> Option<H>,
{
    if cpu.mode() != CpuMode::Bits64 || cpu.rflags & RFLAGS_TF != 0 {
        return None;
    }
    let mut next = *cpu;
    for _ in 0..MAX_FOLLOW_ON {
        let fetched = fetch_instruction(&next, mem).ok()?;
        let bytes = fetched.bytes();
        if let Ok(load) = decode_mmio(bytes, CpuMode::Bits64, next.rip) {
            let MmioOp::Load { dest, sign_extend } = load.op else {
                return None;
            };
            let gla = operand_linear_address(&next, &load).ok()?;
            let width = load.width;
            if gla % PAGE_SIZE + width.bytes() > PAGE_SIZE {
                return None;
            }
            let gpa = translate(&next, gla, AccessKind::Read, mem).ok()?;
            if let Some(mut handler) = trapped(gpa) {
                let done =
                    emulate_mmio(&mut next, gpa, AccessKind::Read, mem, &mut handler).ok()?;
                *cpu = next;
                return Some(done);
            }
            // Plain RAM only, naturally aligned (one access, as the CPU's would be).
            if gpa.0 < LOWEST_RAM_LOAD || !gpa.0.is_multiple_of(width.bytes()) {
                return None;
            }
            let mut buf = [0u8; 8];
            let n = width.bytes() as usize;
            mem.read(gpa, &mut buf[..n]).ok()?;
            let raw = u64::from_le_bytes(buf);
            let value = if sign_extend {
                width.sign_extend(raw)
            } else {
                raw
            };
            next.regs.write(dest, value);
            next.rip = next.rip.wrapping_add(load.len as u64);
            continue;
        }
        let mut decoder = Decoder::with_ip(64, bytes, next.rip, DecoderOptions::NONE);
        let instr = decoder.decode();
        if instr.is_invalid() || instr.has_lock_prefix() {
            return None;
        }
        match instr.code() {
            Code::Add_rm64_imm8 | Code::Add_rm64_imm32 if instr.op0_kind() == OpKind::Register => {
                let reg = qword_register(instr.op0_register())?;
                let imm = instr.immediate(1);
                let old = next.regs.read(reg);
                let (sum, flags) = add64_flags(old, imm);
                next.regs.write(reg, sum);
                next.rflags = (next.rflags & !ARITHMETIC_FLAGS) | flags;
            }
            Code::Lea_r64_m => {
                let reg = qword_register(instr.op0_register())?;
                let ea = lea_address(&instr, &next)?;
                next.regs.write(reg, ea);
            }
            _ => return None,
        }
        next.rip = next.rip.wrapping_add(instr.len() as u64);
    }
    None
}

/// A 64-bit general register as an operand of the register file.
fn qword_register(reg: Register) -> Option<GprOperand> {
    let r = reg as u32;
    if !(Register::RAX as u32..=Register::R15 as u32).contains(&r) {
        return None;
    }
    GprOperand::new((r - Register::RAX as u32) as u8, GprPart::Qword)
}

/// LEA's effective address: base + index × scale + displacement (RIP-relative: iced's
/// displacement is already the absolute target), 64-bit address size only.
fn lea_address(instr: &iced_x86::Instruction, cpu: &GuestCpuState) -> Option<u64> {
    let mut ea = instr.memory_displacement64();
    if instr.is_ip_rel_memory_operand() {
        return Some(ea);
    }
    // A 67 prefix (32-bit addresses) is refused: the base and index would be 32-bit names.
    match instr.memory_base() {
        Register::None => {}
        base => ea = ea.wrapping_add(cpu.regs.read(qword_register(base)?)),
    }
    match instr.memory_index() {
        Register::None => {}
        index => {
            let scale = u64::from(instr.memory_index_scale());
            ea = ea.wrapping_add(cpu.regs.read(qword_register(index)?).wrapping_mul(scale));
        }
    }
    Some(ea)
}

/// `a + b` and the arithmetic flags ADD sets (SDM Vol. 2A ADD; Vol. 1 3.4.3.1).
fn add64_flags(a: u64, b: u64) -> (u64, u64) {
    let (sum, carry) = a.overflowing_add(b);
    let mut flags = 0;
    if carry {
        flags |= CF;
    }
    // Signed overflow: both operands have the same sign and the sum's differs.
    if (!(a ^ b) & (a ^ sum)) >> 63 != 0 {
        flags |= OF;
    }
    if sum >> 63 != 0 {
        flags |= SF;
    }
    if sum == 0 {
        flags |= ZF;
    }
    // Carry out of bit 3.
    if (a ^ b ^ sum) & 0x10 != 0 {
        flags |= AF;
    }
    // Even number of set bits in the low byte.
    if (sum as u8).count_ones().is_multiple_of(2) {
        flags |= PF;
    }
    (sum, flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_flags_match_the_sdm() {
        // 0x8 + 0x8 = 0x10: AF (carry out of bit 3); PF clear (one bit set).
        assert_eq!(add64_flags(8, 8), (0x10, AF));
        // Zero result with carry: CF, ZF, PF (zero has even parity), AF (0xf + 1 carries).
        assert_eq!(add64_flags(u64::MAX, 1), (0, CF | ZF | PF | AF));
        // Signed overflow into the sign bit.
        assert_eq!(
            add64_flags(0x7fff_ffff_ffff_ffff, 1),
            (1 << 63, OF | SF | AF | PF)
        );
        // Negative + negative overflowing to positive: CF and OF.
        assert_eq!(add64_flags(1 << 63, 1 << 63), (0, CF | OF | ZF | PF));
        // A kernel pointer plus a register offset: SF stays, no carry; 0x...c008 low byte 0x08.
        let (sum, flags) = add64_flags(0xffff_c900_0010_c000, 8);
        assert_eq!(sum, 0xffff_c900_0010_c008);
        assert_eq!(flags, SF);
        // Low byte 0x03 has two bits set: PF.
        assert_eq!(add64_flags(1, 2), (3, PF));
    }
}
