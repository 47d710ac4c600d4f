//! Guest linear → guest-physical translation through the guest's own page tables
//! (SDM Vol. 3A ch. 4): no paging, 32-bit paging (with 4 MiB pages), PAE paging, 4-level and
//! 5-level paging (with 2 MiB and 1 GiB pages).
//!
//! The walk reads the guest's paging structures and checks present bits, reserved bits and
//! access rights (R/W, U/S, XD, SMEP, SMAP; SDM 4.6) the way the processor would. It does not
//! set accessed/dirty bits: the processor already did so for the access that faulted.
//! Protection keys (CR4.PKE/PKS) and CET shadow-stack rules are not checked. For PAE paging
//! the four PDPTEs are read from memory at CR3, not from the processor's PDPTE registers
//! (SDM 4.4.1): they differ only if the guest rewrote its PDPT without reloading CR3.

use core::fmt;

use super::memory::{GuestMemError, GuestMemory};
use super::state::{bits, AccessKind, GuestCpuState};
use crate::addr::GuestPhysAddr;

/// Paging-entry bits (SDM Vol. 3A 4.3–4.5, Tables 4-4 to 4-20).
const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;

/// The paging mode the guest is in (SDM Vol. 3A 4.1.1, Table 4-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingMode {
    /// CR0.PG = 0: linear addresses are physical.
    None,
    /// CR0.PG = 1, CR4.PAE = 0.
    Bits32,
    /// CR0.PG = 1, CR4.PAE = 1, EFER.LMA = 0.
    Pae,
    /// CR0.PG = 1, CR4.PAE = 1, EFER.LMA = 1, CR4.LA57 = 0.
    Level4,
    /// CR0.PG = 1, CR4.PAE = 1, EFER.LMA = 1, CR4.LA57 = 1.
    Level5,
}

impl PagingMode {
    pub fn of(cpu: &GuestCpuState) -> Self {
        if cpu.cr0 & bits::CR0_PG == 0 {
            PagingMode::None
        } else if cpu.cr4 & bits::CR4_PAE == 0 {
            PagingMode::Bits32
        } else if cpu.efer & bits::EFER_LMA == 0 {
            PagingMode::Pae
        } else if cpu.cr4 & bits::CR4_LA57 == 0 {
            PagingMode::Level4
        } else {
            PagingMode::Level5
        }
    }

    /// Number of significant linear-address bits: 32 outside IA-32e paging, 48 or 57 in it.
    pub const fn linear_bits(self) -> u32 {
        match self {
            PagingMode::None | PagingMode::Bits32 | PagingMode::Pae => 32,
            PagingMode::Level4 => 48,
            PagingMode::Level5 => 57,
        }
    }
}

/// A level of the paging hierarchy, named after the entry read there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingLevel {
    Pml5,
    Pml4,
    Pdpt,
    Pd,
    Pt,
}

impl fmt::Display for PagingLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PagingLevel::Pml5 => "PML5E",
            PagingLevel::Pml4 => "PML4E",
            PagingLevel::Pdpt => "PDPTE",
            PagingLevel::Pd => "PDE",
            PagingLevel::Pt => "PTE",
        })
    }
}

/// Why a guest linear address does not translate. Each is what the processor would turn
/// into a #PF (or #GP for a non-canonical address); Ally reports it instead of injecting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The address is not canonical for the paging mode (SDM Vol. 1 3.3.7.1).
    NonCanonical { gla: u64 },
    /// An entry on the walk has P = 0.
    NotPresent {
        gla: u64,
        level: PagingLevel,
        entry: u64,
    },
    /// An entry has a reserved bit set (SDM 4.3–4.5).
    ReservedBit {
        gla: u64,
        level: PagingLevel,
        entry: u64,
    },
    /// The translation exists but does not allow the access (SDM 4.6).
    Protection {
        gla: u64,
        access: AccessKind,
        reason: &'static str,
    },
    /// A paging-structure entry lies outside guest RAM.
    EntryUnreadable {
        gla: u64,
        level: PagingLevel,
        source: GuestMemError,
    },
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalkError::NonCanonical { gla } => {
                write!(f, "guest linear address {gla:#x} is not canonical")
            }
            WalkError::NotPresent { gla, level, entry } => write!(
                f,
                "guest linear address {gla:#x}: {level} {entry:#x} is not present"
            ),
            WalkError::ReservedBit { gla, level, entry } => write!(
                f,
                "guest linear address {gla:#x}: {level} {entry:#x} has a reserved bit set"
            ),
            WalkError::Protection {
                gla,
                access,
                reason,
            } => write!(
                f,
                "guest linear address {gla:#x}: {access} not allowed ({reason})"
            ),
            WalkError::EntryUnreadable { gla, level, source } => write!(
                f,
                "guest linear address {gla:#x}: cannot read its {level}: {source}"
            ),
        }
    }
}

/// Rights accumulated over the walk (SDM 4.6: R/W and U/S are ANDed, XD ORed).
struct Rights {
    writable: bool,
    user: bool,
    no_exec: bool,
}

impl Rights {
    fn new() -> Self {
        Self {
            writable: true,
            user: true,
            no_exec: false,
        }
    }
    fn add(&mut self, entry: u64, has_xd: bool) {
        self.writable &= entry & RW != 0;
        self.user &= entry & US != 0;
        self.no_exec |= has_xd && entry & XD != 0;
    }
}

/// Translates guest linear address `gla` for an access of kind `access` by the guest's
/// current CPL. Outside IA-32e paging only the low 32 bits of `gla` are used.
pub fn translate<M: GuestMemory + ?Sized>(
    cpu: &GuestCpuState,
    gla: u64,
    access: AccessKind,
    mem: &M,
) -> Result<GuestPhysAddr, WalkError> {
    let mode = PagingMode::of(cpu);
    match mode {
        PagingMode::None => Ok(GuestPhysAddr(gla & 0xffff_ffff)),
        PagingMode::Bits32 => walk_32bit(cpu, gla & 0xffff_ffff, access, mem),
        PagingMode::Pae | PagingMode::Level4 | PagingMode::Level5 => {
            walk_64bit_entries(cpu, mode, gla, access, mem)
        }
    }
}

/// Mask of physical-address bits `[maxphyaddr-1 : low]`.
fn addr_mask(maxphyaddr: u32, low: u32) -> u64 {
    ((1u64 << maxphyaddr) - 1) & !((1u64 << low) - 1)
}

fn maxphyaddr(cpu: &GuestCpuState) -> u32 {
    match cpu.max_phys_addr_bits {
        m @ 32..=52 => u32::from(m),
        _ => 52,
    }
}

fn read_entry<M: GuestMemory + ?Sized>(
    mem: &M,
    gpa: u64,
    wide: bool,
    gla: u64,
    level: PagingLevel,
) -> Result<u64, WalkError> {
    let gpa = GuestPhysAddr(gpa);
    let r = if wide {
        mem.read_u64(gpa)
    } else {
        mem.read_u32(gpa).map(u64::from)
    };
    r.map_err(|source| WalkError::EntryUnreadable { gla, level, source })
}

/// 32-bit paging (SDM 4.3): CR3 → PDE (→ 4 MiB page if CR4.PSE and PS) → PTE.
fn walk_32bit<M: GuestMemory + ?Sized>(
    cpu: &GuestCpuState,
    gla: u64,
    access: AccessKind,
    mem: &M,
) -> Result<GuestPhysAddr, WalkError> {
    let m = maxphyaddr(cpu).min(40);
    let mut rights = Rights::new();
    let pde_addr = (cpu.cr3 & 0xffff_f000) | (((gla >> 22) & 0x3ff) * 4);
    let pde = read_entry(mem, pde_addr, false, gla, PagingLevel::Pd)?;
    if pde & P == 0 {
        return Err(WalkError::NotPresent {
            gla,
            level: PagingLevel::Pd,
            entry: pde,
        });
    }
    rights.add(pde, false);
    if pde & PS != 0 && cpu.cr4 & bits::CR4_PSE != 0 {
        // 4 MiB page (Table 4-4): bits 20:13 hold PA bits 39:32 (PSE-36); bit 21 and PA
        // bits at or above MAXPHYADDR are reserved.
        let valid_high = (1u64 << (m - 32)) - 1;
        let reserved = (1u64 << 21) | ((0xff & !valid_high) << 13);
        if pde & reserved != 0 {
            return Err(WalkError::ReservedBit {
                gla,
                level: PagingLevel::Pd,
                entry: pde,
            });
        }
        let pa = (pde & 0xffc0_0000) | (((pde >> 13) & 0xff) << 32) | (gla & 0x3f_ffff);
        check_rights(cpu, gla, access, &rights)?;
        return Ok(GuestPhysAddr(pa));
    }
    let pte_addr = (pde & 0xffff_f000) | (((gla >> 12) & 0x3ff) * 4);
    let pte = read_entry(mem, pte_addr, false, gla, PagingLevel::Pt)?;
    if pte & P == 0 {
        return Err(WalkError::NotPresent {
            gla,
            level: PagingLevel::Pt,
            entry: pte,
        });
    }
    rights.add(pte, false);
    check_rights(cpu, gla, access, &rights)?;
    Ok(GuestPhysAddr((pte & 0xffff_f000) | (gla & 0xfff)))
}

/// PAE, 4-level and 5-level paging: 8-byte entries, 9 index bits per level (2 for the PAE
/// PDPT), large pages at the PDPTE (1 GiB, IA-32e only) and PDE (2 MiB) levels.
fn walk_64bit_entries<M: GuestMemory + ?Sized>(
    cpu: &GuestCpuState,
    mode: PagingMode,
    gla: u64,
    access: AccessKind,
    mem: &M,
) -> Result<GuestPhysAddr, WalkError> {
    let m = maxphyaddr(cpu);
    let nxe = cpu.efer & bits::EFER_NXE != 0;
    let ia32e = matches!(mode, PagingMode::Level4 | PagingMode::Level5);
    let gla = if ia32e {
        // Canonical: bits 63:N-1 all equal (SDM Vol. 1 3.3.7.1).
        let shift = 64 - mode.linear_bits();
        if (((gla << shift) as i64) >> shift) as u64 != gla {
            return Err(WalkError::NonCanonical { gla });
        }
        gla
    } else {
        gla & 0xffff_ffff
    };
    // Bits above MAXPHYADDR are reserved in every entry; IA-32e entries end at bit 51
    // (62:52 ignored or protection key), PAE entries reserve 62:M (Tables 4-8 to 4-11).
    let high_reserved = if ia32e {
        addr_mask(52, m)
    } else {
        !addr_mask(m, 0) & !XD
    };
    let xd_reserved = if nxe { 0 } else { XD };
    let mut rights = Rights::new();

    let (levels, mut table): (&[PagingLevel], u64) = match mode {
        PagingMode::Pae => (
            &[PagingLevel::Pdpt, PagingLevel::Pd, PagingLevel::Pt],
            cpu.cr3 & 0xffff_ffe0,
        ),
        PagingMode::Level4 => (
            &[
                PagingLevel::Pml4,
                PagingLevel::Pdpt,
                PagingLevel::Pd,
                PagingLevel::Pt,
            ],
            cpu.cr3 & addr_mask(m, 12),
        ),
        _ => (
            &[
                PagingLevel::Pml5,
                PagingLevel::Pml4,
                PagingLevel::Pdpt,
                PagingLevel::Pd,
                PagingLevel::Pt,
            ],
            cpu.cr3 & addr_mask(m, 12),
        ),
    };

    for &level in levels {
        let shift: u32 = match level {
            PagingLevel::Pml5 => 48,
            PagingLevel::Pml4 => 39,
            PagingLevel::Pdpt => 30,
            PagingLevel::Pd => 21,
            PagingLevel::Pt => 12,
        };
        let index_mask = if mode == PagingMode::Pae && level == PagingLevel::Pdpt {
            0x3
        } else {
            0x1ff
        };
        let entry_addr = table + ((gla >> shift) & index_mask) * 8;
        let entry = read_entry(mem, entry_addr, true, gla, level)?;
        if entry & P == 0 {
            return Err(WalkError::NotPresent { gla, level, entry });
        }
        let pae_pdpte = mode == PagingMode::Pae && level == PagingLevel::Pdpt;
        let large =
            !pae_pdpte && entry & PS != 0 && matches!(level, PagingLevel::Pdpt | PagingLevel::Pd);
        let mut reserved = high_reserved;
        if pae_pdpte {
            // PAE PDPTE (Table 4-8): bits 2:1 and 8:5 reserved; no XD, no R/W, no U/S.
            reserved |= 0b1_1110_0110 | XD;
        } else {
            reserved |= xd_reserved;
            match level {
                // PS is reserved in PML5Es and PML4Es (Tables 4-14, 4-15).
                PagingLevel::Pml5 | PagingLevel::Pml4 => reserved |= PS,
                // 1 GiB page: bits 29:13 reserved (Table 4-16).
                PagingLevel::Pdpt if large => reserved |= addr_mask(30, 13),
                // 2 MiB page: bits 20:13 reserved (Tables 4-9, 4-18).
                PagingLevel::Pd if large => reserved |= addr_mask(21, 13),
                _ => {}
            }
        }
        if entry & reserved != 0 {
            return Err(WalkError::ReservedBit { gla, level, entry });
        }
        if !pae_pdpte {
            rights.add(entry, nxe);
        }
        if large || level == PagingLevel::Pt {
            let page_bits = shift;
            let pa = (entry & addr_mask(m, page_bits)) | (gla & ((1u64 << page_bits) - 1));
            check_rights(cpu, gla, access, &rights)?;
            return Ok(GuestPhysAddr(pa));
        }
        table = entry & addr_mask(m, 12);
    }
    // Every level list ends with Pt, which returns above.
    Err(WalkError::NotPresent {
        gla,
        level: PagingLevel::Pt,
        entry: 0,
    })
}

/// Access-rights rules of SDM Vol. 3A 4.6.1 (SMEP, SMAP, WP, XD).
fn check_rights(
    cpu: &GuestCpuState,
    gla: u64,
    access: AccessKind,
    r: &Rights,
) -> Result<(), WalkError> {
    let deny = |reason| {
        Err(WalkError::Protection {
            gla,
            access,
            reason,
        })
    };
    let user_mode = cpu.cpl() == 3;
    if user_mode && !r.user {
        return deny("supervisor-mode page accessed from CPL 3");
    }
    match access {
        AccessKind::Fetch => {
            if r.no_exec {
                return deny("execute-disable page");
            }
            if !user_mode && r.user && cpu.cr4 & bits::CR4_SMEP != 0 {
                return deny("SMEP: supervisor fetch from a user page");
            }
        }
        AccessKind::Read | AccessKind::Write => {
            if !user_mode
                && r.user
                && cpu.cr4 & bits::CR4_SMAP != 0
                && cpu.rflags & bits::RFLAGS_AC == 0
            {
                return deny("SMAP: supervisor data access to a user page with RFLAGS.AC=0");
            }
            if access == AccessKind::Write
                && !r.writable
                && (user_mode || cpu.cr0 & bits::CR0_WP != 0)
            {
                return deny("read-only page");
            }
        }
    }
    Ok(())
}
