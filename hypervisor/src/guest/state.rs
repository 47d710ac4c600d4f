//! The guest CPU state that instruction fetch, page walks and MMIO emulation need.

use core::fmt;

/// The guest's general-purpose registers in x86 encoding order (SDM Vol. 2A 2.1.5, Table
/// 2-2: the register number in ModRM/SIB/REX is the field index here). The VM-exit stub
/// saves the registers in exactly this order, so the layout is fixed.
///
/// `rsp` is a placeholder in the stub's save area: the guest's RSP lives in the VMCS guest
/// RSP field (SDM Vol. 3C 25.4.1). The exit handler copies it in before calling
/// [`crate::guest::emulate::emulate_mmio`] and copies it back afterwards, because a load
/// can target RSP like any other register.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegisters {
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rbx: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

const _: () = assert!(core::mem::size_of::<GuestRegisters>() == 16 * 8);

impl GuestRegisters {
    /// The register with x86 number `index` (0 = RAX … 15 = R15), or `None` past 15.
    pub fn get(&self, index: u8) -> Option<u64> {
        Some(match index {
            0 => self.rax,
            1 => self.rcx,
            2 => self.rdx,
            3 => self.rbx,
            4 => self.rsp,
            5 => self.rbp,
            6 => self.rsi,
            7 => self.rdi,
            8 => self.r8,
            9 => self.r9,
            10 => self.r10,
            11 => self.r11,
            12 => self.r12,
            13 => self.r13,
            14 => self.r14,
            15 => self.r15,
            _ => return None,
        })
    }

    /// A mutable reference to register number `index`, or `None` past 15.
    pub fn get_mut(&mut self, index: u8) -> Option<&mut u64> {
        Some(match index {
            0 => &mut self.rax,
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            4 => &mut self.rsp,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            15 => &mut self.r15,
            _ => return None,
        })
    }

    /// Reads a register operand (`AH` is bits 15:8 of RAX, and so on).
    pub fn read(&self, op: GprOperand) -> u64 {
        // `GprOperand` can only be built with index <= 15.
        let full = self.get(op.index).unwrap_or(0);
        match op.part {
            GprPart::Low8 => full & 0xff,
            GprPart::High8 => (full >> 8) & 0xff,
            GprPart::Word => full & 0xffff,
            GprPart::Dword => full & 0xffff_ffff,
            GprPart::Qword => full,
        }
    }

    /// Writes a register operand with x86 semantics (SDM Vol. 1 3.4.1.1): a 32-bit write
    /// zero-extends into bits 63:32; 8- and 16-bit writes leave the other bits unchanged;
    /// `AH`/`CH`/`DH`/`BH` write bits 15:8.
    pub fn write(&mut self, op: GprOperand, value: u64) {
        let Some(reg) = self.get_mut(op.index) else {
            return;
        };
        *reg = match op.part {
            GprPart::Low8 => (*reg & !0xff) | (value & 0xff),
            GprPart::High8 => (*reg & !0xff00) | ((value & 0xff) << 8),
            GprPart::Word => (*reg & !0xffff) | (value & 0xffff),
            GprPart::Dword => value & 0xffff_ffff,
            GprPart::Qword => value,
        };
    }
}

/// Which part of a general-purpose register an operand names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GprPart {
    /// Bits 7:0 (`AL`, `SPL`, `R8L`, …).
    Low8,
    /// Bits 15:8 of registers 0–3 (`AH`, `CH`, `DH`, `BH`), only encodable without REX.
    High8,
    /// Bits 15:0.
    Word,
    /// Bits 31:0; a write zero-extends to 64 bits.
    Dword,
    /// All 64 bits.
    Qword,
}

/// A general-purpose register operand: register number plus the part accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GprOperand {
    index: u8,
    part: GprPart,
}

impl GprOperand {
    /// `None` when `index > 15`, or for `High8` when `index > 3` (only AH/CH/DH/BH exist).
    pub const fn new(index: u8, part: GprPart) -> Option<Self> {
        let valid = match part {
            GprPart::High8 => index <= 3,
            _ => index <= 15,
        };
        if valid {
            Some(Self { index, part })
        } else {
            None
        }
    }
    /// The x86 register number (0 = RAX … 15 = R15).
    pub const fn index(self) -> u8 {
        self.index
    }
    pub const fn part(self) -> GprPart {
        self.part
    }
    /// Width of the operand.
    pub const fn width(self) -> AccessWidth {
        match self.part {
            GprPart::Low8 | GprPart::High8 => AccessWidth::Byte,
            GprPart::Word => AccessWidth::Word,
            GprPart::Dword => AccessWidth::Dword,
            GprPart::Qword => AccessWidth::Qword,
        }
    }
}

impl fmt::Display for GprOperand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const LEGACY: [&str; 8] = ["ax", "cx", "dx", "bx", "sp", "bp", "si", "di"];
        const BYTE: [&str; 8] = ["al", "cl", "dl", "bl", "spl", "bpl", "sil", "dil"];
        const HIGH: [&str; 4] = ["ah", "ch", "dh", "bh"];
        let i = self.index as usize;
        match (self.part, i) {
            (GprPart::High8, _) => f.write_str(HIGH[i & 3]),
            (GprPart::Low8, 0..=7) => f.write_str(BYTE[i]),
            (GprPart::Low8, _) => write!(f, "r{i}b"),
            (GprPart::Word, 0..=7) => f.write_str(LEGACY[i]),
            (GprPart::Word, _) => write!(f, "r{i}w"),
            (GprPart::Dword, 0..=7) => write!(f, "e{}", LEGACY[i]),
            (GprPart::Dword, _) => write!(f, "r{i}d"),
            (GprPart::Qword, 0..=7) => write!(f, "r{}", LEGACY[i]),
            (GprPart::Qword, _) => write!(f, "r{i}"),
        }
    }
}

/// Width of a memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AccessWidth {
    Byte = 1,
    Word = 2,
    Dword = 4,
    Qword = 8,
}

impl AccessWidth {
    /// Width in bytes.
    pub const fn bytes(self) -> u64 {
        self as u64
    }
    /// Mask of the low `bytes() * 8` bits.
    pub const fn mask(self) -> u64 {
        match self {
            AccessWidth::Byte => 0xff,
            AccessWidth::Word => 0xffff,
            AccessWidth::Dword => 0xffff_ffff,
            AccessWidth::Qword => u64::MAX,
        }
    }
    /// `value` truncated to this width and sign-extended to 64 bits.
    pub const fn sign_extend(self, value: u64) -> u64 {
        match self {
            AccessWidth::Byte => value as u8 as i8 as i64 as u64,
            AccessWidth::Word => value as u16 as i16 as i64 as u64,
            AccessWidth::Dword => value as u32 as i32 as i64 as u64,
            AccessWidth::Qword => value,
        }
    }
}

impl fmt::Display for AccessWidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-bit", self.bytes() * 8)
    }
}

/// What a memory access does; the EPT-violation exit qualification reports the same three
/// kinds (SDM Vol. 3C 28.2.1, Table 28-7, bits 0–2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    Read,
    Write,
    Fetch,
}

impl AccessKind {
    /// The access an EPT violation reports in its exit qualification (SDM Vol. 3C 28.2.1,
    /// Table 28-7): instruction fetch if bit 2, else data write if bit 1, else data read if
    /// bit 0. `None` when none of the three bits is set.
    pub const fn from_ept_violation_qualification(qualification: u64) -> Option<Self> {
        if qualification & (1 << 2) != 0 {
            Some(AccessKind::Fetch)
        } else if qualification & (1 << 1) != 0 {
            Some(AccessKind::Write)
        } else if qualification & 1 != 0 {
            Some(AccessKind::Read)
        } else {
            None
        }
    }
}

impl fmt::Display for AccessKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccessKind::Read => "read",
            AccessKind::Write => "write",
            AccessKind::Fetch => "instruction fetch",
        })
    }
}

/// The code size the guest executes in (SDM Vol. 3A 5.2.1 and Vol. 1 3.6.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    /// Real mode, virtual-8086 mode or a 16-bit protected-mode code segment.
    Bits16,
    /// A 32-bit code segment (protected mode or IA-32e compatibility mode).
    Bits32,
    /// IA-32e 64-bit mode (EFER.LMA = 1 and CS.L = 1).
    Bits64,
}

impl CpuMode {
    /// The bitness iced-x86 and the address-size rules use.
    pub const fn bits(self) -> u32 {
        match self {
            CpuMode::Bits16 => 16,
            CpuMode::Bits32 => 32,
            CpuMode::Bits64 => 64,
        }
    }
}

/// A segment register, named as the instruction names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentReg {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
}

impl fmt::Display for SegmentReg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SegmentReg::Es => "es",
            SegmentReg::Cs => "cs",
            SegmentReg::Ss => "ss",
            SegmentReg::Ds => "ds",
            SegmentReg::Fs => "fs",
            SegmentReg::Gs => "gs",
        })
    }
}

/// Bases of the data segments, as the VMCS guest-state area holds them (SDM Vol. 3C 25.4.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentBases {
    pub es: u64,
    pub ss: u64,
    pub ds: u64,
    pub fs: u64,
    pub gs: u64,
}

/// Control-register and flag bits used here (SDM Vol. 3A 2.5, 2.2.1; Vol. 1 3.4.3).
pub mod bits {
    pub const CR0_PE: u64 = 1 << 0;
    pub const CR0_WP: u64 = 1 << 16;
    pub const CR0_PG: u64 = 1 << 31;
    pub const CR4_PSE: u64 = 1 << 4;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const CR4_LA57: u64 = 1 << 12;
    pub const CR4_SMEP: u64 = 1 << 20;
    pub const CR4_SMAP: u64 = 1 << 21;
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;
    pub const EFER_NXE: u64 = 1 << 11;
    pub const RFLAGS_VM: u64 = 1 << 17;
    pub const RFLAGS_AC: u64 = 1 << 18;
    /// VMCS segment access-rights format (SDM Vol. 3C 25.4.1, Table 25-2).
    pub const AR_DPL_SHIFT: u32 = 5;
    pub const AR_L: u32 = 1 << 13;
    pub const AR_DB: u32 = 1 << 14;
}

/// Everything about the guest CPU that instruction fetch, page walks and MMIO emulation
/// read. The exit handler fills it from the VMCS guest-state area and the saved registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestCpuState {
    pub regs: GuestRegisters,
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// IA32_EFER as the guest sees it (VMCS guest IA32_EFER).
    pub efer: u64,
    pub cs_selector: u16,
    pub cs_base: u64,
    /// CS access rights in VMCS format (type, S, DPL, P, L, D/B, G; Table 25-2).
    pub cs_access_rights: u32,
    /// SS access rights in VMCS format: SS.DPL is the CPL (SDM Vol. 3A 5.5).
    pub ss_access_rights: u32,
    pub segment_bases: SegmentBases,
    /// The guest's MAXPHYADDR (`CPUID.80000008H:EAX[7:0]`), for reserved-bit checks in
    /// paging entries. Values outside 32..=52 are treated as 52 (no extra checks).
    pub max_phys_addr_bits: u8,
}

impl GuestCpuState {
    /// The code size: 64-bit when EFER.LMA and CS.L, 16-bit in virtual-8086 mode, otherwise
    /// CS.D decides (SDM Vol. 3A 5.2.1; Vol. 3C 27.3.1.2 for real mode under unrestricted
    /// guest, where CS.D is 0 unless the guest loaded a 32-bit descriptor).
    pub fn mode(&self) -> CpuMode {
        if self.efer & bits::EFER_LMA != 0 && self.cs_access_rights & bits::AR_L != 0 {
            CpuMode::Bits64
        } else if self.rflags & bits::RFLAGS_VM != 0 {
            CpuMode::Bits16
        } else if self.cs_access_rights & bits::AR_DB != 0 {
            CpuMode::Bits32
        } else {
            CpuMode::Bits16
        }
    }

    /// The current privilege level: SS.DPL, or 3 in virtual-8086 mode, or 0 in real mode.
    pub fn cpl(&self) -> u8 {
        if self.cr0 & bits::CR0_PE == 0 {
            0
        } else if self.rflags & bits::RFLAGS_VM != 0 {
            3
        } else {
            ((self.ss_access_rights >> bits::AR_DPL_SHIFT) & 3) as u8
        }
    }

    /// The base the guest's segment register `seg` adds to an effective address. In 64-bit
    /// mode ES/CS/SS/DS have base 0 (SDM Vol. 3A 3.4.4).
    pub fn segment_base(&self, seg: SegmentReg) -> u64 {
        let long = self.mode() == CpuMode::Bits64;
        match seg {
            SegmentReg::Fs => self.segment_bases.fs,
            SegmentReg::Gs => self.segment_bases.gs,
            _ if long => 0,
            SegmentReg::Es => self.segment_bases.es,
            SegmentReg::Cs => self.cs_base,
            SegmentReg::Ss => self.segment_bases.ss,
            SegmentReg::Ds => self.segment_bases.ds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_writes_follow_x86_rules() {
        let mut r = GuestRegisters {
            rax: 0x1111_2222_3333_4444,
            ..Default::default()
        };
        let op = |i, p| GprOperand::new(i, p).unwrap();
        r.write(op(0, GprPart::Low8), 0xaa);
        assert_eq!(r.rax, 0x1111_2222_3333_44aa);
        r.write(op(0, GprPart::High8), 0x1bb);
        assert_eq!(r.rax, 0x1111_2222_3333_bbaa);
        r.write(op(0, GprPart::Word), 0xcccc_dddd);
        assert_eq!(r.rax, 0x1111_2222_3333_dddd);
        r.write(op(0, GprPart::Dword), 0xffff_eeee_ffff_ffff);
        assert_eq!(r.rax, 0x0000_0000_ffff_ffff);
        r.write(op(0, GprPart::Qword), 0x8000_0000_0000_0001);
        assert_eq!(r.rax, 0x8000_0000_0000_0001);
        r.write(op(15, GprPart::Low8), 0x7f);
        assert_eq!(r.r15, 0x7f);
        assert_eq!(r.read(op(0, GprPart::High8)), 0);
        assert_eq!(r.read(op(15, GprPart::Low8)), 0x7f);
    }

    #[test]
    fn operand_validation_and_names() {
        assert!(GprOperand::new(4, GprPart::High8).is_none());
        assert!(GprOperand::new(16, GprPart::Qword).is_none());
        let name = |i, p| {
            let mut s = heapless::String::<8>::new();
            core::fmt::write(&mut s, format_args!("{}", GprOperand::new(i, p).unwrap())).unwrap();
            s
        };
        assert_eq!(name(3, GprPart::High8), "bh");
        assert_eq!(name(6, GprPart::Low8), "sil");
        assert_eq!(name(9, GprPart::Word), "r9w");
        assert_eq!(name(4, GprPart::Dword), "esp");
        assert_eq!(name(0, GprPart::Qword), "rax");
        assert_eq!(name(12, GprPart::Qword), "r12");
    }

    #[test]
    fn access_kind_from_exit_qualification() {
        let k = AccessKind::from_ept_violation_qualification;
        // Read, with GLA valid and "translated access" (bits 7, 8) and EPT rights bits 3-5.
        assert_eq!(k(0x181 | 0x38), Some(AccessKind::Read));
        // Read and write both set (a read-modify-write access) count as a write.
        assert_eq!(k(0x183), Some(AccessKind::Write));
        assert_eq!(k(0x184), Some(AccessKind::Fetch));
        assert_eq!(k(0x180), None);
    }

    #[test]
    fn mode_and_segment_bases() {
        let mut s = GuestCpuState {
            cs_base: 0x1000,
            segment_bases: SegmentBases {
                ds: 0x2000,
                fs: 0x3000,
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(s.mode(), CpuMode::Bits16);
        assert_eq!(s.segment_base(SegmentReg::Ds), 0x2000);
        s.cs_access_rights = bits::AR_DB;
        s.cr0 = bits::CR0_PE;
        assert_eq!(s.mode(), CpuMode::Bits32);
        s.efer = bits::EFER_LMA;
        assert_eq!(s.mode(), CpuMode::Bits32, "compatibility mode without CS.L");
        s.cs_access_rights = bits::AR_L;
        assert_eq!(s.mode(), CpuMode::Bits64);
        assert_eq!(s.segment_base(SegmentReg::Ds), 0);
        assert_eq!(s.segment_base(SegmentReg::Cs), 0);
        assert_eq!(s.segment_base(SegmentReg::Fs), 0x3000);
        s.ss_access_rights = 3 << bits::AR_DPL_SHIFT;
        assert_eq!(s.cpl(), 3);
    }
}
