//! Effective memory types from the MTRRs (SDM Vol. 3A 12.11, "Memory Type Range Registers";
//! 11.11 in older editions), so that Ally's identity EPT gives every guest-physical page
//! the type the firmware configured: EPT memory types replace the MTRRs for the guest.
//!
//! Ally reads IA32_MTRRCAP, IA32_MTRR_DEF_TYPE, the 11 fixed-range MTRRs and the variable
//! pairs on hardware and hands the raw values to [`MtrrState::from_msrs`].
//! [`MtrrState::memory_type`] answers "what type does this whole range have", returning
//! `None` when the range is not uniform so the caller maps it with smaller pages.

use crate::addr::{PhysRange, PAGE_SIZE};
use crate::paging::MemoryType;
use core::fmt;
use heapless::Vec;

/// IA32_MTRRCAP.
pub const IA32_MTRRCAP: u32 = 0xFE;
/// IA32_MTRR_DEF_TYPE.
pub const IA32_MTRR_DEF_TYPE: u32 = 0x2FF;
/// IA32_MTRR_PHYSBASE0; PHYSBASEn is `0x200 + 2n`, PHYSMASKn is `0x201 + 2n`.
pub const IA32_MTRR_PHYSBASE0: u32 = 0x200;
/// The fixed-range MTRRs in the order [`MtrrState::from_msrs`] expects them
/// (SDM Vol. 3A 12.11.2.2, Table 12-9): FIX64K_00000, FIX16K_80000, FIX16K_A0000,
/// FIX4K_C0000 .. FIX4K_F8000.
pub const FIXED_MTRR_MSRS: [u32; 11] = [
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26A, 0x26B, 0x26C, 0x26D, 0x26E, 0x26F,
];
/// Most variable-range MTRRs kept (CPUs have 8 to 10; VCNT could claim up to 255).
pub const MAX_VARIABLE_MTRRS: usize = 32;

/// The fixed ranges cover [0, 1 MiB).
const FIXED_END: u64 = 0x10_0000;

/// Errors of this module.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MtrrError {
    /// A memory type encoding that is reserved (2, 3, 7..=255) in an MTRR in use.
    InvalidType { msr: u32, raw: u8 },
    /// The number of variable pairs given differs from IA32_MTRRCAP.VCNT.
    CountMismatch { vcnt: usize, given: usize },
    /// More variable MTRRs than Ally keeps.
    TooManyVariable { count: usize },
}

impl fmt::Display for MtrrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MtrrError::InvalidType { msr, raw } => write!(
                f,
                "MTRR MSR {msr:#x} holds the reserved memory type {raw} (firmware bug)"
            ),
            MtrrError::CountMismatch { vcnt, given } => write!(
                f,
                "IA32_MTRRCAP reports {vcnt} variable MTRRs but {given} were read"
            ),
            MtrrError::TooManyVariable { count } => write!(
                f,
                "{count} variable MTRRs exceed the {MAX_VARIABLE_MTRRS} Ally supports"
            ),
        }
    }
}

/// One enabled variable-range MTRR (SDM Vol. 3A 12.11.2.3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct VariableMtrr {
    /// PHYSBASE bits 51:12.
    pub base: u64,
    /// PHYSMASK bits 51:12: an address matches when `addr & mask == base & mask`.
    pub mask: u64,
    pub memtype: MemoryType,
}

/// How a variable MTRR relates to an aligned power-of-two block.
enum Cover {
    None,
    Partial,
    Full,
}

impl VariableMtrr {
    /// Classifies the block `[start, start + 2^order)` (`start` aligned to it).
    fn covers(&self, start: u64, order: u32) -> Cover {
        let low = if order >= 64 {
            u64::MAX
        } else {
            (1u64 << order) - 1
        };
        if (start & self.mask & !low) != (self.base & self.mask & !low) {
            Cover::None
        } else if self.mask & low == 0 {
            Cover::Full
        } else {
            Cover::Partial
        }
    }
}

/// The MTRR configuration of a CPU.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct MtrrState {
    /// IA32_MTRR_DEF_TYPE.E: with MTRRs disabled all memory is UC.
    enabled: bool,
    /// FE and MTRRCAP.FIX: the fixed ranges apply below 1 MiB.
    fixed_enabled: bool,
    default_type: MemoryType,
    /// One type per fixed sub-range byte, in MSR order (88 entries).
    fixed: [MemoryType; 88],
    variable: Vec<VariableMtrr, MAX_VARIABLE_MTRRS>,
}

/// Start and size of fixed sub-range `i` (0..88) (SDM Vol. 3A 12.11.2.2).
const fn fixed_subrange(i: usize) -> (u64, u64) {
    let i = i as u64;
    match i {
        0..=7 => (i * 0x1_0000, 0x1_0000),
        8..=23 => (0x8_0000 + (i - 8) * 0x4000, 0x4000),
        _ => (0xC_0000 + (i - 24) * 0x1000, 0x1000),
    }
}

fn decode_type(msr: u32, raw: u8) -> Result<MemoryType, MtrrError> {
    MemoryType::from_raw(raw).ok_or(MtrrError::InvalidType { msr, raw })
}

/// The type of memory matched by several variable MTRRs (SDM Vol. 3A 12.11.4.1):
/// UC wins; WT and WB together give WT; identical types give that type; any other mix is
/// undefined, for which Ally uses UC.
fn combine(a: MemoryType, b: MemoryType) -> MemoryType {
    use MemoryType::*;
    match (a, b) {
        (x, y) if x == y => x,
        (Uncacheable, _) | (_, Uncacheable) => Uncacheable,
        (WriteThrough, WriteBack) | (WriteBack, WriteThrough) => WriteThrough,
        _ => Uncacheable,
    }
}

/// Bounds the refinement of blocks that variable MTRRs with non-contiguous masks cover
/// partially; past it the answer is "not uniform" and the caller uses 4 KiB pages.
const REFINE_BUDGET: u32 = 4096;

impl MtrrState {
    /// Builds the state from raw MSR values: IA32_MTRRCAP, IA32_MTRR_DEF_TYPE, the fixed
    /// MTRRs in [`FIXED_MTRR_MSRS`] order, and `(PHYSBASEn, PHYSMASKn)` for n in
    /// 0..VCNT. Reserved type encodings in MTRRs that take effect are errors.
    pub fn from_msrs(
        cap: u64,
        def_type: u64,
        fixed: &[u64; 11],
        variable: &[(u64, u64)],
    ) -> Result<Self, MtrrError> {
        let vcnt = (cap & 0xFF) as usize;
        if variable.len() != vcnt {
            return Err(MtrrError::CountMismatch {
                vcnt,
                given: variable.len(),
            });
        }
        if vcnt > MAX_VARIABLE_MTRRS {
            return Err(MtrrError::TooManyVariable { count: vcnt });
        }
        let enabled = def_type & (1 << 11) != 0;
        let fixed_enabled = enabled && def_type & (1 << 10) != 0 && cap & (1 << 8) != 0;
        let mut state = Self {
            enabled,
            fixed_enabled,
            default_type: MemoryType::Uncacheable,
            fixed: [MemoryType::Uncacheable; 88],
            variable: Vec::new(),
        };
        if !enabled {
            return Ok(state);
        }
        state.default_type = decode_type(IA32_MTRR_DEF_TYPE, def_type as u8)?;
        if fixed_enabled {
            for (i, t) in state.fixed.iter_mut().enumerate() {
                let msr = FIXED_MTRR_MSRS[i / 8];
                *t = decode_type(msr, (fixed[i / 8] >> ((i % 8) * 8)) as u8)?;
            }
        }
        for (n, &(base, mask)) in variable.iter().enumerate() {
            // PHYSMASK.V, bit 11.
            if mask & (1 << 11) == 0 {
                continue;
            }
            let msr = IA32_MTRR_PHYSBASE0 + 2 * n as u32;
            let v = VariableMtrr {
                base: base & !0xFFF,
                mask: mask & !0xFFF,
                memtype: decode_type(msr, base as u8)?,
            };
            // Cannot fail: at most MAX_VARIABLE_MTRRS pairs were accepted above.
            let _ = state.variable.push(v);
        }
        Ok(state)
    }

    /// A state giving every address `memtype` (for CPUs without MTRRs, and tests).
    pub fn uniform(memtype: MemoryType) -> Self {
        Self {
            enabled: true,
            fixed_enabled: false,
            default_type: memtype,
            fixed: [memtype; 88],
            variable: Vec::new(),
        }
    }

    /// The enabled variable MTRRs.
    pub fn variable(&self) -> &[VariableMtrr] {
        &self.variable
    }

    /// The memory type of the 4 KiB page holding `addr`.
    pub fn type_at(&self, addr: u64) -> MemoryType {
        let page = addr & !(PAGE_SIZE - 1);
        // A 4 KiB block is never partially covered (masks have no bits below 12), and
        // fixed sub-ranges are at least 4 KiB.
        let mut budget = REFINE_BUDGET;
        self.block_type(page, 12, &mut budget)
            .unwrap_or(MemoryType::Uncacheable)
    }

    /// The single memory type of all of `range` (widened to whole 4 KiB pages), or `None`
    /// when the range mixes types (or is empty).
    pub fn memory_type(&self, range: PhysRange) -> Option<MemoryType> {
        if range.is_empty() {
            return None;
        }
        // u128 so that a range ending at 2^64 needs no special case.
        let page = u128::from(PAGE_SIZE);
        let end = (u128::from(range.end) + page - 1) & !(page - 1);
        let mut at = u128::from(range.start) & !(page - 1);
        let mut budget = REFINE_BUDGET;
        let mut result: Option<MemoryType> = None;
        // Decompose into maximal aligned power-of-two blocks.
        while at < end {
            // `at` < 2^64 inside the loop.
            let align_order = if at == 0 {
                63
            } else {
                (at as u64).trailing_zeros()
            };
            let size_order = (127 - (end - at).leading_zeros()).min(63);
            let order = align_order.min(size_order);
            let t = self.block_type(at as u64, order, &mut budget)?;
            if result.is_some_and(|r| r != t) {
                return None;
            }
            result = Some(t);
            at += 1u128 << order;
        }
        result
    }

    /// The uniform type of the aligned block `[start, start + 2^order)`, if uniform.
    fn block_type(&self, start: u64, order: u32, budget: &mut u32) -> Option<MemoryType> {
        if !self.enabled {
            return Some(MemoryType::Uncacheable);
        }
        let size = 1u64 << order;
        if self.fixed_enabled && start < FIXED_END {
            if start + size > FIXED_END {
                // Straddles 1 MiB: the fixed part and the variable part must agree.
                let low = self.block_type(start, order - 1, budget)?;
                let high = self.block_type(start + size / 2, order - 1, budget)?;
                return (low == high).then_some(low);
            }
            let mut t = None;
            for i in 0..88 {
                let (s, len) = fixed_subrange(i);
                if s < start + size && start < s + len {
                    if t.is_some_and(|t| t != self.fixed[i]) {
                        return None;
                    }
                    t = Some(self.fixed[i]);
                }
            }
            return t;
        }
        let mut matched: Option<MemoryType> = None;
        let mut partial = false;
        for v in &self.variable {
            match v.covers(start, order) {
                Cover::None => {}
                Cover::Full => {
                    matched = Some(matched.map_or(v.memtype, |m| combine(m, v.memtype)));
                }
                Cover::Partial => partial = true,
            }
        }
        if partial {
            // Some addresses match more MTRRs than others: compare the halves.
            if *budget == 0 || order <= 12 {
                return None;
            }
            *budget -= 1;
            let low = self.block_type(start, order - 1, budget)?;
            let high = self.block_type(start + size / 2, order - 1, budget)?;
            return (low == high).then_some(low);
        }
        Some(matched.unwrap_or(self.default_type))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MemoryType::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const E: u64 = 1 << 11;
    const FE: u64 = 1 << 10;
    const FIX: u64 = 1 << 8;

    fn r(start: u64, end: u64) -> PhysRange {
        PhysRange { start, end }
    }

    /// A variable pair for `[base, base+size)` (size a power of two), 36-bit MAXPHYADDR.
    fn var(base: u64, size: u64, t: MemoryType) -> (u64, u64) {
        let phys_mask = (1u64 << 36) - 1;
        (
            base | t as u64,
            (!(size - 1) & phys_mask & !0xFFF) | (1 << 11),
        )
    }

    /// SeaBIOS-like fixed ranges: WB below 640 KiB, UC for the VGA hole, WP for ROMs.
    fn bios_fixed() -> [u64; 11] {
        let all = |t: MemoryType| u64::from_le_bytes([t as u8; 8]);
        let mut f = [0; 11];
        f[0] = all(WriteBack); // 0 - 512K
        f[1] = all(WriteBack); // 512K - 640K
        f[2] = all(Uncacheable); // A0000 - BFFFF
        for x in &mut f[3..] {
            *x = all(WriteProtected); // C0000 - FFFFF
        }
        f
    }

    /// Typical: default UC; WB for 0-2 GiB; UC hole for 3.5 GiB-4 GiB is implicit.
    fn typical() -> MtrrState {
        MtrrState::from_msrs(
            FIX | 8,
            E | FE | Uncacheable as u64,
            &bios_fixed(),
            &[
                var(0, 2 * GIB, WriteBack),
                var(2 * GIB, GIB, WriteBack),
                var(0xC000_0000, 256 * MIB, WriteBack),
                var(0x1_0000_0000, 4 * GIB, WriteBack),
                var(0xD000_0000, 2 * MIB, WriteCombining), // framebuffer
                (0, 0),
                (0, 0),
                (0, 0),
            ],
        )
        .unwrap()
    }

    #[test]
    fn fixed_ranges_below_1m() {
        let m = typical();
        assert_eq!(m.type_at(0x1000), WriteBack);
        assert_eq!(m.type_at(0x9_F000), WriteBack);
        assert_eq!(m.type_at(0xA_0000), Uncacheable);
        assert_eq!(m.type_at(0xF_F000), WriteProtected);
        assert_eq!(m.memory_type(r(0, 0xA_0000)), Some(WriteBack));
        assert_eq!(m.memory_type(r(0, 0x10_0000)), None);
        assert_eq!(m.memory_type(r(0xC_0000, 0x10_0000)), Some(WriteProtected));
        // The first 2 MiB mixes fixed WB/UC/WP with variable WB: not uniform.
        assert_eq!(m.memory_type(r(0, 2 * MIB)), None);
        // A 4K page inside a 16K sub-range.
        assert_eq!(m.memory_type(r(0xA_1000, 0xA_2000)), Some(Uncacheable));
    }

    #[test]
    fn variable_ranges_and_default() {
        let m = typical();
        assert_eq!(m.memory_type(r(2 * MIB, 4 * MIB)), Some(WriteBack));
        assert_eq!(m.memory_type(r(MIB, 2 * GIB)), Some(WriteBack));
        assert_eq!(m.memory_type(r(0xC000_0000, 0xD000_0000)), Some(WriteBack));
        // 3.25-4 GiB: no MTRR matches, default UC (MMIO).
        assert_eq!(
            m.memory_type(r(0xD020_0000, 0xD040_0000)),
            Some(Uncacheable)
        );
        assert_eq!(
            m.memory_type(r(0xFEC0_0000, 0xFEE0_0000)),
            Some(Uncacheable)
        );
        // WC framebuffer inside the default-UC hole.
        assert_eq!(
            m.memory_type(r(0xD000_0000, 0xD020_0000)),
            Some(WriteCombining)
        );
        assert_eq!(m.memory_type(r(0xD000_0000, 0xD040_0000)), None);
        // RAM above 4 GiB.
        assert_eq!(m.memory_type(r(4 * GIB, 8 * GIB)), Some(WriteBack));
        assert_eq!(m.memory_type(r(8 * GIB - 2 * MIB, 8 * GIB + 2 * MIB)), None);
        // Across the end of the 3 GiB..3.25 GiB WB range into default UC.
        assert_eq!(m.memory_type(r(0xCFE0_0000, 0xD000_0000)), Some(WriteBack));
        assert_eq!(m.type_at(0xCFFF_F000), WriteBack);
        assert_eq!(m.type_at(0xD020_0000), Uncacheable);
    }

    #[test]
    fn unaligned_and_empty_ranges() {
        let m = typical();
        // Widened to whole pages.
        assert_eq!(m.memory_type(r(0x20_0123, 0x20_0124)), Some(WriteBack));
        assert_eq!(m.memory_type(r(5, 5)), None);
        assert_eq!(m.memory_type(r(u64::MAX - 10, u64::MAX)), Some(Uncacheable));
    }

    #[test]
    fn overlap_precedence() {
        // UC inside WB wins; WT inside WB gives WT; WC inside WB is undefined -> UC.
        let m = MtrrState::from_msrs(
            3,
            E | WriteBack as u64,
            &[0; 11],
            &[
                var(0, GIB, WriteBack),
                var(0x1000_0000, 2 * MIB, Uncacheable),
                var(0x1000_0000, 4 * MIB, WriteThrough),
            ],
        )
        .unwrap();
        assert_eq!(
            m.memory_type(r(0x1000_0000, 0x1020_0000)),
            Some(Uncacheable)
        );
        assert_eq!(
            m.memory_type(r(0x1020_0000, 0x1040_0000)),
            Some(WriteThrough)
        );
        assert_eq!(m.memory_type(r(0x1040_0000, 0x1060_0000)), Some(WriteBack));
        let m = MtrrState::from_msrs(
            2,
            E | WriteBack as u64,
            &[0; 11],
            &[var(0, GIB, WriteBack), var(0, 2 * MIB, WriteCombining)],
        )
        .unwrap();
        assert_eq!(m.type_at(0), Uncacheable);
        assert_eq!(combine(WriteProtected, WriteThrough), Uncacheable);
        assert_eq!(combine(WriteBack, WriteBack), WriteBack);
    }

    #[test]
    fn partial_cover_with_same_type_is_uniform() {
        // Default WB and a WB MTRR over 4 KiB inside a 2 MiB block: still uniform.
        let m = MtrrState::from_msrs(
            1,
            E | WriteBack as u64,
            &[0; 11],
            &[var(0x20_3000, 0x1000, WriteBack)],
        )
        .unwrap();
        assert_eq!(m.memory_type(r(2 * MIB, 4 * MIB)), Some(WriteBack));
        // A UC 4 KiB page inside: not uniform; the page itself is UC.
        let m = MtrrState::from_msrs(
            1,
            E | WriteBack as u64,
            &[0; 11],
            &[var(0x20_3000, 0x1000, Uncacheable)],
        )
        .unwrap();
        assert_eq!(m.memory_type(r(2 * MIB, 4 * MIB)), None);
        assert_eq!(m.type_at(0x20_3000), Uncacheable);
        assert_eq!(m.type_at(0x20_4000), WriteBack);
    }

    #[test]
    fn non_contiguous_mask_is_handled() {
        // Bits 35:22 and 20 compared, bit 21 and 19:12 free: with base 0 this matches
        // [0, 1 MiB) and [2 MiB, 3 MiB).
        let mask = (((1u64 << 36) - 1) & !((1 << 22) - 1)) | (1 << 20) | (1 << 11);
        let m = MtrrState::from_msrs(
            1,
            E | WriteBack as u64,
            &[0; 11],
            &[(Uncacheable as u64, mask)],
        )
        .unwrap();
        assert_eq!(m.memory_type(r(0, MIB)), Some(Uncacheable));
        assert_eq!(m.memory_type(r(MIB, 2 * MIB)), Some(WriteBack));
        assert_eq!(m.memory_type(r(2 * MIB, 3 * MIB)), Some(Uncacheable));
        assert_eq!(m.memory_type(r(3 * MIB, 4 * MIB)), Some(WriteBack));
        assert_eq!(m.memory_type(r(0, 2 * MIB)), None);
        assert_eq!(m.memory_type(r(4 * MIB, 8 * MIB)), Some(WriteBack));
        assert_eq!(m.type_at(0x20_5000), Uncacheable);
    }

    #[test]
    fn disabled_and_uniform() {
        let m = MtrrState::from_msrs(FIX | 1, WriteBack as u64, &[0xFFFF; 11], &[(7, E)]).unwrap();
        // E clear: everything UC, and garbage in unused MTRRs is not an error.
        assert_eq!(m.memory_type(r(0, 4 * GIB)), Some(Uncacheable));
        let m = MtrrState::uniform(WriteBack);
        assert_eq!(m.memory_type(r(0, 64 * GIB)), Some(WriteBack));
        assert_eq!(m.type_at(0xA_0000), WriteBack);
        // Fixed ranges disabled (FE clear): below 1 MiB uses the variable ranges.
        let m = MtrrState::from_msrs(
            FIX | 1,
            E | Uncacheable as u64,
            &bios_fixed(),
            &[var(0, GIB, WriteBack)],
        )
        .unwrap();
        assert_eq!(m.type_at(0xA_0000), WriteBack);
        // FIX not in MTRRCAP: the same.
        let m = MtrrState::from_msrs(
            1,
            E | FE | Uncacheable as u64,
            &bios_fixed(),
            &[var(0, GIB, WriteBack)],
        )
        .unwrap();
        assert_eq!(m.type_at(0xA_0000), WriteBack);
        // Disabled variable pairs are ignored.
        let m = MtrrState::from_msrs(
            1,
            E | Uncacheable as u64,
            &[0; 11],
            &[(WriteBack as u64, 0xF_FFFF_F000)],
        )
        .unwrap();
        assert!(m.variable().is_empty());
        assert_eq!(m.type_at(0), Uncacheable);
    }

    #[test]
    fn bad_msr_values() {
        assert_eq!(
            MtrrState::from_msrs(0, E | 2, &[0; 11], &[]),
            Err(MtrrError::InvalidType {
                msr: IA32_MTRR_DEF_TYPE,
                raw: 2
            })
        );
        let mut fixed = bios_fixed();
        fixed[4] = 0x0606_0606_0706_0606;
        assert_eq!(
            MtrrState::from_msrs(FIX, E | FE, &fixed, &[]),
            Err(MtrrError::InvalidType { msr: 0x269, raw: 7 })
        );
        assert_eq!(
            MtrrState::from_msrs(2, E, &[0; 11], &[(0, 0), (3, E)]),
            Err(MtrrError::InvalidType { msr: 0x202, raw: 3 })
        );
        assert_eq!(
            MtrrState::from_msrs(8, E, &[0; 11], &[]),
            Err(MtrrError::CountMismatch { vcnt: 8, given: 0 })
        );
        let many = [(0u64, 0u64); 40];
        assert_eq!(
            MtrrState::from_msrs(40, E, &[0; 11], &many),
            Err(MtrrError::TooManyVariable { count: 40 })
        );
        assert_eq!(
            MtrrError::InvalidType { msr: 0x269, raw: 7 }.to_string(),
            "MTRR MSR 0x269 holds the reserved memory type 7 (firmware bug)"
        );
    }

    #[test]
    fn fixed_subranges_tile_the_first_mib() {
        let mut next = 0;
        for i in 0..88 {
            let (s, len) = fixed_subrange(i);
            assert_eq!(s, next);
            next = s + len;
        }
        assert_eq!(next, FIXED_END);
    }

    /// The SDM's rules applied to one address, independently of `block_type`.
    fn naive_type(m: &MtrrState, addr: u64) -> MemoryType {
        if !m.enabled {
            return Uncacheable;
        }
        if m.fixed_enabled && addr < FIXED_END {
            let i = (0..88)
                .find(|&i| {
                    let (s, len) = fixed_subrange(i);
                    (s..s + len).contains(&addr)
                })
                .unwrap();
            return m.fixed[i];
        }
        m.variable
            .iter()
            .filter(|v| addr & v.mask == v.base & v.mask)
            .map(|v| v.memtype)
            .reduce(combine)
            .unwrap_or(m.default_type)
    }

    /// memory_type agrees with a page-by-page evaluation of the SDM's rules.
    #[test]
    fn memory_type_matches_page_walk() {
        let m = typical();
        let mut seed = 0xDEAD_BEEF_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..400 {
            // Around the WB / UC / WC boundaries near 3.25 GiB, and around 1 MiB.
            let base = if i % 2 == 0 { 0xCFC0_0000 } else { 0 };
            let start = (base + (next() % 0x80_0000)) & !0xFFF;
            let len = (1 + next() % 0x300) * 0x1000;
            let range = r(start, start + len);
            let pages: std::vec::Vec<_> = (start..start + len)
                .step_by(0x1000)
                .map(|a| naive_type(&m, a))
                .collect();
            let uniform = pages.iter().all(|&t| t == pages[0]);
            assert_eq!(m.memory_type(range), uniform.then_some(pages[0]), "{range}");
            assert_eq!(m.type_at(start), pages[0]);
        }
    }
}
