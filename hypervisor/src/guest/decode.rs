//! Decoding the instruction that caused an MMIO EPT violation and classifying it into the
//! few memory-access forms Ally emulates.
//!
//! Decoding is done by iced-x86 (decoder only, `no_std`). Its tables are built lazily on the
//! first decode and live on the heap, so the image linking this crate must provide a global
//! allocator, and should call [`warm_up`] during initialisation so that the first EPT
//! violation does not allocate.
//!
//! Supported (SDM Vol. 2B, MOV/MOVZX/MOVSX/MOVSXD):
//! - `MOV r/m, reg` (88, 89), `MOV reg, r/m` (8A, 8B), `MOV r/m, imm` (C6 /0, C7 /0),
//! - `MOV AL/AX/EAX/RAX, moffs` and back (A0–A3),
//! - `MOVZX`/`MOVSX` (0F B6/B7/BE/BF) and `MOVSXD` (63) loads,
//!
//! with widths 1/2/4/8, any REX, SIB, RIP-relative, segment-override and 16/32/64-bit
//! address-size encoding. Everything else is refused with an error naming the mnemonic.

use core::fmt;

/// The decoder's mnemonic type, re-exported so that callers need not depend on iced-x86.
pub use iced_x86::Mnemonic;
use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, OpKind, Register};

use super::fetch::MAX_INSTRUCTION_LEN;
use super::state::{AccessWidth, CpuMode, GprOperand, GprPart, GuestRegisters, SegmentReg};

/// Raw instruction bytes, kept for error messages.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct InstructionBytes {
    bytes: [u8; MAX_INSTRUCTION_LEN],
    len: u8,
}

impl InstructionBytes {
    /// Up to the first 15 bytes of `b`.
    pub fn new(b: &[u8]) -> Self {
        let len = b.len().min(MAX_INSTRUCTION_LEN);
        let mut bytes = [0; MAX_INSTRUCTION_LEN];
        bytes[..len].copy_from_slice(&b[..len]);
        Self {
            bytes,
            len: len as u8,
        }
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl fmt::Display for InstructionBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for InstructionBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{self}]")
    }
}

/// Formats a `Debug` value in lower case (iced's mnemonic names are `Movzx`, … ).
struct Lower<T>(T);

impl<T: fmt::Debug> fmt::Display for Lower<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct LowerWriter<'a, 'b>(&'a mut fmt::Formatter<'b>);
        impl fmt::Write for LowerWriter<'_, '_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                for c in s.chars() {
                    fmt::Write::write_char(self.0, c.to_ascii_lowercase())?;
                }
                Ok(())
            }
        }
        fmt::write(&mut LowerWriter(f), format_args!("{:?}", self.0))
    }
}

/// Why an instruction cannot be emulated as an MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the instruction does.
    Truncated { bytes: InstructionBytes },
    /// Not a valid instruction in this mode.
    Invalid {
        bytes: InstructionBytes,
        mode: CpuMode,
    },
    /// A valid instruction that is not one of the supported MOV forms.
    Unsupported {
        mnemonic: Mnemonic,
        bytes: InstructionBytes,
    },
    /// A supported mnemonic whose operands do not include memory (it cannot have faulted).
    NoMemoryOperand {
        mnemonic: Mnemonic,
        bytes: InstructionBytes,
    },
    /// LOCK on a MOV is #UD on hardware; refused rather than emulated.
    LockPrefix {
        mnemonic: Mnemonic,
        bytes: InstructionBytes,
    },
    /// The decoder reported a register or form this module does not map (an internal
    /// inconsistency, reported rather than guessed at).
    UnexpectedOperand {
        mnemonic: Mnemonic,
        bytes: InstructionBytes,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated { bytes } => {
                write!(f, "instruction bytes [{bytes}] end inside the instruction")
            }
            DecodeError::Invalid { bytes, mode } => write!(
                f,
                "bytes [{bytes}] are not a valid {}-bit instruction",
                mode.bits()
            ),
            DecodeError::Unsupported { mnemonic, bytes } => write!(
                f,
                "instruction `{}` [{bytes}] is not an emulated MMIO access (those are MOV \
                 between memory and a general register or an immediate, MOVZX, MOVSX, MOVSXD)",
                Lower(mnemonic)
            ),
            DecodeError::NoMemoryOperand { mnemonic, bytes } => write!(
                f,
                "instruction `{}` [{bytes}] has no memory operand",
                Lower(mnemonic)
            ),
            DecodeError::LockPrefix { mnemonic, bytes } => write!(
                f,
                "instruction `{}` [{bytes}] has a LOCK prefix",
                Lower(mnemonic)
            ),
            DecodeError::UnexpectedOperand { mnemonic, bytes } => write!(
                f,
                "instruction `{}` [{bytes}] has an operand the emulator does not map",
                Lower(mnemonic)
            ),
        }
    }
}

/// What the instruction does with its memory operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioOp {
    /// Memory → register. `sign_extend` for MOVSX/MOVSXD; otherwise a narrower value is
    /// zero-extended (MOVZX) before the register write.
    Load { dest: GprOperand, sign_extend: bool },
    /// Register → memory.
    StoreReg { src: GprOperand },
    /// Immediate → memory; `value` is already sign-extended and truncated to the width.
    StoreImm { value: u64 },
}

/// The memory operand: `segment:[base + index * scale + displacement]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemOperand {
    /// Effective segment (override prefix, else SS for an rBP/rSP base, else DS).
    pub segment: SegmentReg,
    pub base: Option<GprOperand>,
    pub index: Option<GprOperand>,
    /// 1, 2, 4 or 8.
    pub scale: u8,
    /// The displacement; for RIP/EIP-relative operands the absolute target (iced adds the
    /// next instruction's address).
    pub displacement: u64,
    pub rip_relative: bool,
    /// Address size in bits: 16, 32 or 64 (SDM Vol. 1 3.6.1, prefix 67).
    pub address_bits: u32,
}

impl MemOperand {
    /// The effective address (offset within the segment), truncated to the address size.
    pub fn effective_address(&self, regs: &GuestRegisters) -> u64 {
        let mut ea = self.displacement;
        if let Some(base) = self.base {
            ea = ea.wrapping_add(regs.read(base));
        }
        if let Some(index) = self.index {
            ea = ea.wrapping_add(regs.read(index).wrapping_mul(u64::from(self.scale)));
        }
        match self.address_bits {
            16 => ea & 0xffff,
            32 => ea & 0xffff_ffff,
            _ => ea,
        }
    }
}

/// A decoded, supported MMIO instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioInstruction {
    pub op: MmioOp,
    /// Width of the memory access.
    pub width: AccessWidth,
    pub mem: MemOperand,
    /// Instruction length in bytes (1–15).
    pub len: usize,
    pub mnemonic: Mnemonic,
    pub bytes: InstructionBytes,
}

/// Builds the decoder's lazily initialised tables now (they allocate on first use). Call it
/// once during Ally's initialisation, after the heap exists and before any guest runs.
pub fn warm_up() {
    // `mov eax, [rbx]`; the result does not matter, only that the tables get built.
    let _ = decode_mmio(&[0x8b, 0x03], CpuMode::Bits64, 0);
}

/// Maps an iced register to a general-purpose register operand.
fn gpr(reg: Register) -> Option<GprOperand> {
    let r = reg as u32;
    let rel = |first: Register| r - first as u32;
    let (index, part) = if (Register::AL as u32..=Register::BL as u32).contains(&r) {
        (rel(Register::AL), GprPart::Low8)
    } else if (Register::AH as u32..=Register::BH as u32).contains(&r) {
        (rel(Register::AH), GprPart::High8)
    } else if (Register::SPL as u32..=Register::R15L as u32).contains(&r) {
        (rel(Register::SPL) + 4, GprPart::Low8)
    } else if (Register::AX as u32..=Register::R15W as u32).contains(&r) {
        (rel(Register::AX), GprPart::Word)
    } else if (Register::EAX as u32..=Register::R15D as u32).contains(&r) {
        (rel(Register::EAX), GprPart::Dword)
    } else if (Register::RAX as u32..=Register::R15 as u32).contains(&r) {
        (rel(Register::RAX), GprPart::Qword)
    } else {
        return None;
    };
    GprOperand::new(index as u8, part)
}

fn segment(reg: Register) -> Option<SegmentReg> {
    Some(match reg {
        Register::ES => SegmentReg::Es,
        Register::CS => SegmentReg::Cs,
        Register::SS => SegmentReg::Ss,
        Register::DS => SegmentReg::Ds,
        Register::FS => SegmentReg::Fs,
        Register::GS => SegmentReg::Gs,
        _ => return None,
    })
}

/// Address size from the legacy prefixes (SDM Vol. 2A 2.1.1, 2.2.1): the mode's default,
/// switched by a 67 prefix (64 → 32, 32 → 16, 16 → 32).
fn address_bits(bytes: &[u8], mode: CpuMode) -> u32 {
    let mut has_67 = false;
    for &b in bytes {
        match b {
            0x67 => has_67 = true,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0xf0 | 0xf2 | 0xf3 => {}
            0x40..=0x4f if mode == CpuMode::Bits64 => {}
            _ => break,
        }
    }
    match (mode, has_67) {
        (CpuMode::Bits64, false) => 64,
        (CpuMode::Bits64, true) | (CpuMode::Bits32, false) | (CpuMode::Bits16, true) => 32,
        (CpuMode::Bits32, true) | (CpuMode::Bits16, false) => 16,
    }
}

/// The kind of each supported instruction: (is a load, memory width, sign-extending load,
/// store of an immediate).
fn classify(code: Code) -> Option<(bool, AccessWidth, bool, bool)> {
    use AccessWidth::{Byte, Dword, Qword, Word};
    Some(match code {
        Code::Mov_rm8_r8 | Code::Mov_moffs8_AL => (false, Byte, false, false),
        Code::Mov_rm16_r16 | Code::Mov_moffs16_AX => (false, Word, false, false),
        Code::Mov_rm32_r32 | Code::Mov_moffs32_EAX => (false, Dword, false, false),
        Code::Mov_rm64_r64 | Code::Mov_moffs64_RAX => (false, Qword, false, false),
        Code::Mov_rm8_imm8 => (false, Byte, false, true),
        Code::Mov_rm16_imm16 => (false, Word, false, true),
        Code::Mov_rm32_imm32 => (false, Dword, false, true),
        Code::Mov_rm64_imm32 => (false, Qword, false, true),
        Code::Mov_r8_rm8 | Code::Mov_AL_moffs8 => (true, Byte, false, false),
        Code::Mov_r16_rm16 | Code::Mov_AX_moffs16 => (true, Word, false, false),
        Code::Mov_r32_rm32 | Code::Mov_EAX_moffs32 => (true, Dword, false, false),
        Code::Mov_r64_rm64 | Code::Mov_RAX_moffs64 => (true, Qword, false, false),
        Code::Movzx_r16_rm8 | Code::Movzx_r32_rm8 | Code::Movzx_r64_rm8 => {
            (true, Byte, false, false)
        }
        Code::Movzx_r16_rm16 | Code::Movzx_r32_rm16 | Code::Movzx_r64_rm16 => {
            (true, Word, false, false)
        }
        Code::Movsx_r16_rm8 | Code::Movsx_r32_rm8 | Code::Movsx_r64_rm8 => {
            (true, Byte, true, false)
        }
        Code::Movsx_r16_rm16 | Code::Movsx_r32_rm16 | Code::Movsx_r64_rm16 => {
            (true, Word, true, false)
        }
        Code::Movsxd_r16_rm16 => (true, Word, true, false),
        Code::Movsxd_r32_rm32 | Code::Movsxd_r64_rm32 => (true, Dword, true, false),
        _ => return None,
    })
}

/// Decodes the instruction at the start of `bytes`, executing in `mode` at `rip`, and
/// classifies it as a supported MMIO access.
pub fn decode_mmio(bytes: &[u8], mode: CpuMode, rip: u64) -> Result<MmioInstruction, DecodeError> {
    let raw = InstructionBytes::new(bytes);
    let bytes = raw.as_slice();
    let mut decoder = Decoder::with_ip(mode.bits(), bytes, rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    match decoder.last_error() {
        DecoderError::None => {}
        DecoderError::NoMoreBytes => return Err(DecodeError::Truncated { bytes: raw }),
        _ => return Err(DecodeError::Invalid { bytes: raw, mode }),
    }
    if instr.is_invalid() {
        return Err(DecodeError::Invalid { bytes: raw, mode });
    }
    let len = instr.len();
    let raw = InstructionBytes::new(&bytes[..len.min(bytes.len())]);
    let mnemonic = instr.mnemonic();
    let unexpected = DecodeError::UnexpectedOperand {
        mnemonic,
        bytes: raw,
    };
    let Some((is_load, width, sign_extend, is_imm)) = classify(instr.code()) else {
        return Err(DecodeError::Unsupported {
            mnemonic,
            bytes: raw,
        });
    };
    if instr.has_lock_prefix() {
        return Err(DecodeError::LockPrefix {
            mnemonic,
            bytes: raw,
        });
    }
    let (mem_op, other_op) = if is_load { (1, 0) } else { (0, 1) };
    if instr.op_count() != 2 || instr.op_kind(mem_op) != OpKind::Memory {
        return Err(DecodeError::NoMemoryOperand {
            mnemonic,
            bytes: raw,
        });
    }

    let op = if is_imm {
        let imm = instr.try_immediate(other_op).map_err(|_| unexpected)?;
        MmioOp::StoreImm {
            value: imm & width.mask(),
        }
    } else {
        let reg = gpr(instr.op_register(other_op)).ok_or(unexpected)?;
        if is_load {
            MmioOp::Load {
                dest: reg,
                sign_extend,
            }
        } else {
            MmioOp::StoreReg { src: reg }
        }
    };

    let optional_gpr = |r: Register| match r {
        Register::None => Ok(None),
        r => gpr(r).map(Some).ok_or(unexpected),
    };
    let rip_relative = instr.is_ip_rel_memory_operand();
    let mem = MemOperand {
        segment: segment(instr.memory_segment()).ok_or(unexpected)?,
        base: if rip_relative {
            None
        } else {
            optional_gpr(instr.memory_base())?
        },
        index: optional_gpr(instr.memory_index())?,
        scale: instr.memory_index_scale() as u8,
        displacement: instr.memory_displacement64(),
        rip_relative,
        address_bits: address_bits(bytes, mode),
    };
    Ok(MmioInstruction {
        op,
        width,
        mem,
        len,
        mnemonic,
        bytes: raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(i: u8, p: GprPart) -> GprOperand {
        GprOperand::new(i, p).unwrap()
    }

    #[test]
    fn register_mapping_covers_every_gpr_name() {
        assert_eq!(gpr(Register::AL), Some(op(0, GprPart::Low8)));
        assert_eq!(gpr(Register::BL), Some(op(3, GprPart::Low8)));
        assert_eq!(gpr(Register::AH), Some(op(0, GprPart::High8)));
        assert_eq!(gpr(Register::BH), Some(op(3, GprPart::High8)));
        assert_eq!(gpr(Register::SPL), Some(op(4, GprPart::Low8)));
        assert_eq!(gpr(Register::R15L), Some(op(15, GprPart::Low8)));
        assert_eq!(gpr(Register::SI), Some(op(6, GprPart::Word)));
        assert_eq!(gpr(Register::R13D), Some(op(13, GprPart::Dword)));
        assert_eq!(gpr(Register::RSP), Some(op(4, GprPart::Qword)));
        assert_eq!(gpr(Register::R15), Some(op(15, GprPart::Qword)));
        assert_eq!(gpr(Register::RIP), None);
        assert_eq!(gpr(Register::None), None);
        assert_eq!(gpr(Register::XMM0), None);
    }

    #[test]
    fn address_size_prefix_rules() {
        assert_eq!(address_bits(&[0x8b, 0x03], CpuMode::Bits64), 64);
        assert_eq!(address_bits(&[0x67, 0x8b, 0x03], CpuMode::Bits64), 32);
        assert_eq!(address_bits(&[0x64, 0x67, 0x48, 0x8b], CpuMode::Bits64), 32);
        assert_eq!(address_bits(&[0x8b, 0x03], CpuMode::Bits32), 32);
        assert_eq!(address_bits(&[0x67, 0x8b, 0x07], CpuMode::Bits32), 16);
        assert_eq!(address_bits(&[0x8b, 0x07], CpuMode::Bits16), 16);
        assert_eq!(address_bits(&[0x66, 0x67, 0x8b, 0x03], CpuMode::Bits16), 32);
        // 0x67 after the opcode is not a prefix.
        assert_eq!(address_bits(&[0x8b, 0x67], CpuMode::Bits16), 16);
    }

    /// Random prefix + MOV-family opcode + random ModRM/SIB/displacement bytes in every mode:
    /// whatever decodes must have a length within the bytes, base/index registers of the
    /// address size found by the prefix scan, and a width that matches its register operand.
    #[test]
    fn random_mov_encodings_are_consistent() {
        const PREFIXES: [u8; 11] = [
            0x66, 0x67, 0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65, 0xf2, 0xf3, 0x48,
        ];
        const OPCODES: [&[u8]; 13] = [
            &[0x88],
            &[0x89],
            &[0x8a],
            &[0x8b],
            &[0xc6],
            &[0xc7],
            &[0xa0],
            &[0xa3],
            &[0x0f, 0xb6],
            &[0x0f, 0xb7],
            &[0x0f, 0xbe],
            &[0x0f, 0xbf],
            &[0x63],
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut decoded = 0;
        for _ in 0..20_000 {
            let mut buf = [0u8; MAX_INSTRUCTION_LEN];
            let mut n = 0;
            for _ in 0..(next() % 4) {
                let p = PREFIXES[(next() % PREFIXES.len() as u64) as usize];
                // Any REX (40-4f) in place of the fixed 48 half the time.
                buf[n] = if p == 0x48 {
                    0x40 | (next() as u8 & 0xf)
                } else {
                    p
                };
                n += 1;
            }
            let op = OPCODES[(next() % OPCODES.len() as u64) as usize];
            buf[n..n + op.len()].copy_from_slice(op);
            n += op.len();
            for b in buf[n..].iter_mut() {
                *b = next() as u8;
            }
            for mode in [CpuMode::Bits16, CpuMode::Bits32, CpuMode::Bits64] {
                let Ok(i) = decode_mmio(&buf, mode, next()) else {
                    continue;
                };
                decoded += 1;
                assert!(i.len >= n && i.len <= MAX_INSTRUCTION_LEN, "{:?}", i.bytes);
                for r in [i.mem.base, i.mem.index].into_iter().flatten() {
                    assert_eq!(
                        r.width().bytes() * 8,
                        u64::from(i.mem.address_bits),
                        "{:?} in {mode:?}",
                        i.bytes
                    );
                }
                match i.op {
                    MmioOp::Load { dest, .. } => assert!(dest.width() >= i.width),
                    MmioOp::StoreReg { src } => assert_eq!(src.width(), i.width),
                    MmioOp::StoreImm { value } => assert_eq!(value & !i.width.mask(), 0),
                }
            }
        }
        assert!(decoded > 20_000, "only {decoded} decoded");
    }

    #[test]
    fn mnemonic_names_are_lower_case() {
        let e = decode_mmio(&[0xa5], CpuMode::Bits64, 0).unwrap_err();
        let mut s = heapless::String::<160>::new();
        core::fmt::write(&mut s, format_args!("{e}")).unwrap();
        assert!(s.starts_with("instruction `movsd` [a5] is not"), "{s}");
    }
}
