//! Host tests of the whole path: page walks in every paging mode, instruction fetch across
//! pages, decoding and emulation of every supported form in 64-, 32- and 16-bit code, and
//! every refusal. Instruction bytes are hand-assembled; the comment on each gives the
//! assembly.

use super::paging_walk::PagingMode;
use super::state::bits::*;
use super::testing::{FakeGuestMemory, MmioRecord, RecordingMmio};
use super::*;
use crate::addr::GuestPhysAddr;

/// Boxed in the tests: 48 pages do not fit many times on a test thread's stack.
type Mem = FakeGuestMemory<48>;

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;

/// Where the test page tables come from.
const TABLES: u64 = 0x10_0000;

/// Builds PAE / 4-level / 5-level page tables in fake memory, allocating table pages
/// upwards from `TABLES`.
struct Tables8 {
    root: u64,
    next: u64,
    levels: u32,
}

impl Tables8 {
    fn new(mem: &mut Mem, levels: u32) -> Self {
        mem.map(GuestPhysAddr(TABLES), 4096).unwrap();
        Self {
            root: TABLES,
            next: TABLES + 0x1000,
            levels,
        }
    }

    fn alloc(&mut self, mem: &mut Mem) -> u64 {
        let t = self.next;
        self.next += 0x1000;
        mem.map(GuestPhysAddr(t), 4096).unwrap();
        t
    }

    /// Maps `la` → `pa` with a leaf at `leaf_shift` (12, 21 or 30) carrying `flags`;
    /// intermediate entries get P|RW|US.
    fn map(&mut self, mem: &mut Mem, la: u64, pa: u64, leaf_shift: u32, flags: u64) {
        let shifts: &[u32] = match self.levels {
            3 => &[30, 21, 12],
            4 => &[39, 30, 21, 12],
            _ => &[48, 39, 30, 21, 12],
        };
        let mut table = self.root;
        for &shift in shifts {
            let index_mask = if self.levels == 3 && shift == 30 {
                3
            } else {
                0x1ff
            };
            let slot = GuestPhysAddr(table + ((la >> shift) & index_mask) * 8);
            if shift == leaf_shift {
                let ps = if shift == 12 { 0 } else { PS };
                mem.load_u64(slot, pa | flags | ps).unwrap();
                return;
            }
            let entry = mem.read_u64(slot).unwrap();
            table = if entry & P != 0 {
                entry & 0x000f_ffff_ffff_f000
            } else {
                let t = self.alloc(mem);
                // PAE PDPTEs have no R/W or U/S bits (those are reserved there).
                let f = if self.levels == 3 && shift == 30 {
                    P
                } else {
                    P | RW | US
                };
                mem.load_u64(slot, t | f).unwrap();
                t
            };
        }
    }
}

/// 32-bit paging tables (4-byte entries): PD at `TABLES`.
fn map32(mem: &mut Mem, next: &mut u64, la: u64, pa: u64, large: bool, flags: u32) {
    mem.map(GuestPhysAddr(TABLES), 4096).unwrap();
    let slot = GuestPhysAddr(TABLES + ((la >> 22) & 0x3ff) * 4);
    if large {
        mem.load_u32(
            slot,
            (pa as u32) | (((pa >> 32) as u32 & 0xff) << 13) | flags | PS as u32,
        )
        .unwrap();
        return;
    }
    let pde = mem.read_u32(slot).unwrap();
    let pt = if pde & 1 != 0 {
        u64::from(pde & 0xffff_f000)
    } else {
        let t = *next;
        *next += 0x1000;
        mem.map(GuestPhysAddr(t), 4096).unwrap();
        mem.load_u32(slot, t as u32 | 7).unwrap();
        t
    };
    mem.load_u32(
        GuestPhysAddr(pt + ((la >> 12) & 0x3ff) * 4),
        pa as u32 | flags,
    )
    .unwrap();
}

fn long_mode_cpu(levels: u32) -> GuestCpuState {
    GuestCpuState {
        cr0: CR0_PE | CR0_PG | CR0_WP,
        cr3: TABLES,
        cr4: CR4_PAE | if levels == 5 { CR4_LA57 } else { 0 },
        efer: EFER_LME | EFER_LMA | EFER_NXE,
        cs_access_rights: AR_L | 0x9b,
        ss_access_rights: 0x93,
        rflags: 2,
        max_phys_addr_bits: 46,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// Page walks
// ---------------------------------------------------------------------------------------

#[test]
fn four_level_walk_with_4k_2m_1g_pages() {
    let mut mem = Box::new(Mem::new());
    let mut t = Tables8::new(&mut mem, 4);
    t.map(
        &mut mem,
        0x0000_7f00_1234_5000,
        0x3_4567_8000,
        12,
        P | RW | US,
    );
    t.map(&mut mem, 0xffff_8000_0020_0000, 0x4000_0000, 21, P | RW);
    t.map(&mut mem, 0xffff_ff80_4000_0000, 0x1_c000_0000, 30, P | RW);
    let cpu = long_mode_cpu(4);
    let tr = |la| translate(&cpu, la, AccessKind::Read, &*mem);
    assert_eq!(tr(0x0000_7f00_1234_5abc), Ok(GuestPhysAddr(0x3_4567_8abc)));
    assert_eq!(
        tr(0xffff_8000_003f_fff8),
        Ok(GuestPhysAddr(0x4000_0000 + 0x1f_fff8))
    );
    assert_eq!(
        tr(0xffff_ff80_7edc_ba98),
        Ok(GuestPhysAddr(0x1_c000_0000 + 0x3edc_ba98))
    );
    assert_eq!(PagingMode::of(&cpu), PagingMode::Level4);
    // A PCID in CR3 bits 11:0 (CR4.PCIDE, as Linux uses with PTI) is not part of the address.
    let mut pcid = cpu;
    pcid.cr3 |= 0x805;
    assert_eq!(
        translate(&pcid, 0x0000_7f00_1234_5abc, AccessKind::Read, &*mem),
        Ok(GuestPhysAddr(0x3_4567_8abc))
    );
}

#[test]
fn five_level_walk() {
    let mut mem = Box::new(Mem::new());
    let mut t = Tables8::new(&mut mem, 5);
    // Bit 56 set: only reachable with LA57.
    let la = 0xff10_0000_dead_b000;
    t.map(&mut mem, la, 0x7_7777_7000, 12, P | RW);
    t.map(&mut mem, 0x00ff_ffff_ffe0_0000, 0x20_0000, 21, P);
    let cpu = long_mode_cpu(5);
    assert_eq!(PagingMode::of(&cpu), PagingMode::Level5);
    assert_eq!(
        translate(&cpu, la | 0x123, AccessKind::Write, &*mem),
        Ok(GuestPhysAddr(0x7_7777_7123))
    );
    assert_eq!(
        translate(&cpu, 0x00ff_ffff_ffe1_0000, AccessKind::Read, &*mem),
        Ok(GuestPhysAddr(0x21_0000))
    );
    // 57-bit canonical: bits 63:56 must equal bit 56.
    assert_eq!(
        translate(&cpu, 0x0100_0000_0000_0000, AccessKind::Read, &*mem),
        Err(WalkError::NonCanonical {
            gla: 0x0100_0000_0000_0000
        })
    );
}

#[test]
fn pae_walk_with_2m_and_4k_pages() {
    let mut mem = Box::new(Mem::new());
    let mut t = Tables8::new(&mut mem, 3);
    t.map(&mut mem, 0xc020_0000, 0x1_2340_0000, 21, P | RW);
    t.map(&mut mem, 0x0804_8000, 0x0060_1000, 12, P | RW | US);
    let cpu = GuestCpuState {
        cr0: CR0_PE | CR0_PG,
        cr3: TABLES,
        cr4: CR4_PAE,
        cs_access_rights: AR_DB,
        max_phys_addr_bits: 36,
        ..Default::default()
    };
    assert_eq!(PagingMode::of(&cpu), PagingMode::Pae);
    assert_eq!(
        translate(&cpu, 0xc03f_0004, AccessKind::Read, &*mem),
        Ok(GuestPhysAddr(0x1_235f_0004))
    );
    assert_eq!(
        translate(&cpu, 0x0804_8010, AccessKind::Fetch, &*mem),
        Ok(GuestPhysAddr(0x0060_1010))
    );
    // Upper 32 bits of the linear address are ignored outside IA-32e mode.
    assert_eq!(
        translate(&cpu, 0xffff_ffff_0804_8010, AccessKind::Read, &*mem),
        Ok(GuestPhysAddr(0x0060_1010))
    );
    // A PAE PDPTE with R/W set has a reserved bit set (Table 4-8).
    let pdpte = GuestPhysAddr(TABLES + 3 * 8);
    let v = mem.read_u64(pdpte).unwrap();
    mem.load_u64(pdpte, v | RW).unwrap();
    assert!(matches!(
        translate(&cpu, 0xc020_0000, AccessKind::Read, &*mem),
        Err(WalkError::ReservedBit {
            level: PagingLevel::Pdpt,
            ..
        })
    ));
    // XD in a PAE PDE without EFER.NXE is reserved.
    mem.load_u64(pdpte, v).unwrap();
    let pd = v & 0xffff_f000;
    let pde = GuestPhysAddr(pd + 8);
    let e = mem.read_u64(pde).unwrap();
    mem.load_u64(pde, e | XD).unwrap();
    assert!(matches!(
        translate(&cpu, 0xc020_0000, AccessKind::Read, &*mem),
        Err(WalkError::ReservedBit {
            level: PagingLevel::Pd,
            ..
        })
    ));
    // Bits above MAXPHYADDR (36) are reserved.
    mem.load_u64(pde, e | (1 << 40)).unwrap();
    assert!(matches!(
        translate(&cpu, 0xc020_0000, AccessKind::Read, &*mem),
        Err(WalkError::ReservedBit { .. })
    ));
}

#[test]
fn thirty_two_bit_walk_with_4m_pse36_and_4k_pages() {
    let mut mem = Box::new(Mem::new());
    let mut next = TABLES + 0x1000;
    map32(&mut mem, &mut next, 0x8040_0000, 0x3_0080_0000, true, 0x3);
    map32(&mut mem, &mut next, 0x0000_1000, 0x0000_5000, false, 0x7);
    let mut cpu = GuestCpuState {
        cr0: CR0_PE | CR0_PG,
        cr3: TABLES,
        cr4: CR4_PSE,
        cs_access_rights: AR_DB,
        max_phys_addr_bits: 40,
        ..Default::default()
    };
    assert_eq!(PagingMode::of(&cpu), PagingMode::Bits32);
    assert_eq!(
        translate(&cpu, 0x8076_5432, AccessKind::Write, &*mem),
        Ok(GuestPhysAddr(0x3_00b6_5432))
    );
    assert_eq!(
        translate(&cpu, 0x1ffc, AccessKind::Read, &*mem),
        Ok(GuestPhysAddr(0x5ffc))
    );
    // PSE-36 bits above MAXPHYADDR are reserved.
    cpu.max_phys_addr_bits = 33;
    assert!(matches!(
        translate(&cpu, 0x8040_0000, AccessKind::Read, &*mem),
        Err(WalkError::ReservedBit {
            level: PagingLevel::Pd,
            ..
        })
    ));
    // Without CR4.PSE the PS bit is ignored and the PDE points to a page table.
    cpu.max_phys_addr_bits = 40;
    cpu.cr4 = 0;
    assert!(matches!(
        translate(&cpu, 0x8040_0000, AccessKind::Read, &*mem),
        Err(WalkError::EntryUnreadable { .. }) | Err(WalkError::NotPresent { .. })
    ));
}

#[test]
fn no_paging_is_identity_on_32_bits() {
    let mem = Box::new(Mem::new());
    let cpu = GuestCpuState::default();
    assert_eq!(PagingMode::of(&cpu), PagingMode::None);
    assert_eq!(
        translate(&cpu, 0x1_000f_fff0, AccessKind::Read, &*mem),
        Ok(GuestPhysAddr(0x000f_fff0))
    );
}

#[test]
fn not_present_at_every_level_is_reported() {
    let mut mem = Box::new(Mem::new());
    let mut t = Tables8::new(&mut mem, 4);
    let la = 0xffff_8000_0000_1000u64;
    t.map(&mut mem, la, 0x9000, 12, P | RW);
    let cpu = long_mode_cpu(4);
    assert!(translate(&cpu, la, AccessKind::Read, &*mem).is_ok());
    // Walk the chain and clear P at each level, deepest first.
    let mut slots = [0u64; 4];
    let mut table = TABLES;
    for (i, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
        slots[i] = table + ((la >> shift) & 0x1ff) * 8;
        table = mem.read_u64(GuestPhysAddr(slots[i])).unwrap() & 0x000f_ffff_ffff_f000;
    }
    let levels = [
        PagingLevel::Pml4,
        PagingLevel::Pdpt,
        PagingLevel::Pd,
        PagingLevel::Pt,
    ];
    for i in (0..4).rev() {
        let slot = GuestPhysAddr(slots[i]);
        let v = mem.read_u64(slot).unwrap();
        mem.load_u64(slot, v & !P).unwrap();
        assert_eq!(
            translate(&cpu, la, AccessKind::Read, &*mem),
            Err(WalkError::NotPresent {
                gla: la,
                level: levels[i],
                entry: v & !P
            })
        );
        mem.load_u64(slot, v).unwrap();
    }
    // A page table outside guest RAM.
    let pt = mem.read_u64(GuestPhysAddr(slots[2])).unwrap() & 0x000f_ffff_ffff_f000;
    mem.unmap_page(GuestPhysAddr(pt));
    assert!(matches!(
        translate(&cpu, la, AccessKind::Read, &*mem),
        Err(WalkError::EntryUnreadable {
            level: PagingLevel::Pt,
            ..
        })
    ));
}

#[test]
fn reserved_bits_in_ia32e_entries() {
    let mut mem = Box::new(Mem::new());
    let mut t = Tables8::new(&mut mem, 4);
    let la = 0x4000_0000u64;
    t.map(&mut mem, la, 0x20_0000, 21, P | RW);
    let mut cpu = long_mode_cpu(4);
    let pml4e = GuestPhysAddr(TABLES);
    let v = mem.read_u64(pml4e).unwrap();
    // PS in a PML4E.
    mem.load_u64(pml4e, v | PS).unwrap();
    assert!(matches!(
        translate(&cpu, la, AccessKind::Read, &*mem),
        Err(WalkError::ReservedBit {
            level: PagingLevel::Pml4,
            ..
        })
    ));
    mem.load_u64(pml4e, v).unwrap();
    // Bit 13 of a 2 MiB PDE.
    let pdpt = v & 0x000f_ffff_ffff_f000;
    let pd = mem.read_u64(GuestPhysAddr(pdpt + 8)).unwrap() & 0x000f_ffff_ffff_f000;
    let pde = GuestPhysAddr(pd);
    let e = mem.read_u64(pde).unwrap();
    mem.load_u64(pde, e | (1 << 13)).unwrap();
    assert!(matches!(
        translate(&cpu, la, AccessKind::Read, &*mem),
        Err(WalkError::ReservedBit {
            level: PagingLevel::Pd,
            ..
        })
    ));
    // XD without EFER.NXE.
    mem.load_u64(pde, e | XD).unwrap();
    assert!(translate(&cpu, la, AccessKind::Read, &*mem).is_ok());
    cpu.efer &= !EFER_NXE;
    assert!(matches!(
        translate(&cpu, la, AccessKind::Read, &*mem),
        Err(WalkError::ReservedBit { .. })
    ));
    // Bits 62:52 are ignored in IA-32e entries; bits MAXPHYADDR..51 are not.
    cpu.efer |= EFER_NXE;
    mem.load_u64(pde, e | (0x7ff << 52)).unwrap();
    assert!(translate(&cpu, la, AccessKind::Read, &*mem).is_ok());
    mem.load_u64(pde, e | (1 << 47)).unwrap();
    assert!(matches!(
        translate(&cpu, la, AccessKind::Read, &*mem),
        Err(WalkError::ReservedBit { .. })
    ));
    // Bits 29:13 of a 1 GiB PDPTE.
    let mut mem2 = Box::new(Mem::new());
    let mut t2 = Tables8::new(&mut mem2, 4);
    t2.map(&mut mem2, 0x8000_0000, 0x4000_0000 | (1 << 20), 30, P);
    assert!(matches!(
        translate(&cpu, 0x8000_0000, AccessKind::Read, &*mem2),
        Err(WalkError::ReservedBit {
            level: PagingLevel::Pdpt,
            ..
        })
    ));
}

#[test]
fn access_rights() {
    let mut mem = Box::new(Mem::new());
    let mut t = Tables8::new(&mut mem, 4);
    let ro_kernel = 0xffff_8000_0000_0000u64;
    let user_rw = 0x0000_0000_0040_0000u64;
    let nx_kernel = 0xffff_8000_0020_0000u64;
    t.map(&mut mem, ro_kernel, 0x1000, 12, P);
    t.map(&mut mem, user_rw, 0x2000, 12, P | RW | US);
    t.map(&mut mem, nx_kernel, 0x3000, 12, P | RW | XD);
    let mut cpu = long_mode_cpu(4);
    let denied =
        |r: Result<GuestPhysAddr, WalkError>| matches!(r, Err(WalkError::Protection { .. }));

    // CR0.WP decides whether the supervisor may write read-only pages.
    assert!(denied(translate(&cpu, ro_kernel, AccessKind::Write, &*mem)));
    cpu.cr0 &= !CR0_WP;
    assert!(translate(&cpu, ro_kernel, AccessKind::Write, &*mem).is_ok());
    // XD pages do not execute.
    assert!(translate(&cpu, nx_kernel, AccessKind::Read, &*mem).is_ok());
    assert!(denied(translate(&cpu, nx_kernel, AccessKind::Fetch, &*mem)));
    // SMEP / SMAP.
    assert!(translate(&cpu, user_rw, AccessKind::Fetch, &*mem).is_ok());
    cpu.cr4 |= CR4_SMEP;
    assert!(denied(translate(&cpu, user_rw, AccessKind::Fetch, &*mem)));
    assert!(translate(&cpu, user_rw, AccessKind::Read, &*mem).is_ok());
    cpu.cr4 |= CR4_SMAP;
    assert!(denied(translate(&cpu, user_rw, AccessKind::Read, &*mem)));
    cpu.rflags |= RFLAGS_AC;
    assert!(translate(&cpu, user_rw, AccessKind::Write, &*mem).is_ok());
    // CPL 3 reaches only user pages, and writes only writable ones.
    cpu.ss_access_rights = 0xf3;
    assert!(translate(&cpu, user_rw, AccessKind::Write, &*mem).is_ok());
    assert!(translate(&cpu, user_rw, AccessKind::Fetch, &*mem).is_ok());
    assert!(denied(translate(&cpu, ro_kernel, AccessKind::Read, &*mem)));
}

// ---------------------------------------------------------------------------------------
// Emulation in 64-bit mode
// ---------------------------------------------------------------------------------------

const CODE_LA: u64 = 0xffff_ffff_8100_0ff0;
const CODE_GPA: u64 = 0x0020_0ff0;
const MMIO_LA: u64 = 0xffff_c900_0010_0000;
const MMIO_GPA: u64 = 0xfebc_0000;
const DATA_LA: u64 = 0xffff_8880_0060_0000;
const DATA_GPA: u64 = 0x0060_0000;
const LOW_LA: u64 = 0xffff_8880_0009_0000;
const LOW_GPA: u64 = 0x0009_0000;

/// A 64-bit guest whose code page at `CODE_LA` holds `code` and whose MMIO page at `MMIO_LA`
/// maps to `MMIO_GPA` (not RAM). The page after the code page is mapped elsewhere so that
/// instructions may straddle the boundary.
fn guest64(code: &[u8]) -> (GuestCpuState, Box<Mem>) {
    let mut mem = Box::new(Mem::new());
    let mut t = Tables8::new(&mut mem, 4);
    t.map(&mut mem, CODE_LA & !0xfff, CODE_GPA & !0xfff, 12, P);
    t.map(&mut mem, (CODE_LA & !0xfff) + 0x1000, 0x0050_0000, 12, P);
    for page in 0..4 {
        t.map(
            &mut mem,
            MMIO_LA + page * 0x1000,
            MMIO_GPA + page * 0x1000,
            12,
            P | RW | XD,
        );
    }
    mem.map(GuestPhysAddr(0x0050_0000), 4096).unwrap();
    // Kernel data in RAM, and a page of the first MiB, for the follow-on loads.
    t.map(&mut mem, DATA_LA, DATA_GPA, 12, P | RW | XD);
    mem.map(GuestPhysAddr(DATA_GPA), 4096).unwrap();
    t.map(&mut mem, LOW_LA, LOW_GPA, 12, P | RW | XD);
    mem.map(GuestPhysAddr(LOW_GPA), 4096).unwrap();
    load_code(&mut mem, CODE_LA, CODE_GPA, 0x0050_0000, code);
    let mut cpu = long_mode_cpu(4);
    cpu.rip = CODE_LA;
    (cpu, mem)
}

/// Stores `code` at linear `la` of a page at `first_gpa` whose successor is `second_gpa`.
fn load_code(mem: &mut Mem, la: u64, first_gpa: u64, second_gpa: u64, code: &[u8]) {
    let in_first = ((0x1000 - (la & 0xfff)) as usize).min(code.len());
    mem.load(GuestPhysAddr(first_gpa), &code[..in_first])
        .unwrap();
    mem.load(GuestPhysAddr(second_gpa), &code[in_first..])
        .unwrap();
}

fn emulate(
    cpu: &mut GuestCpuState,
    mem: &Mem,
    gpa: u64,
    access: AccessKind,
    read_value: u64,
) -> (Result<EmulatedAccess, EmulationError>, RecordingMmio) {
    let mut dev = RecordingMmio::new(read_value);
    let r = emulate_mmio(cpu, GuestPhysAddr(gpa), access, mem, &mut dev);
    (r, dev)
}

fn write_record(gpa: u64, width: AccessWidth, v: u64) -> MmioRecord {
    MmioRecord {
        gpa: GuestPhysAddr(gpa),
        width,
        written: Some(v),
    }
}

fn read_record(gpa: u64, width: AccessWidth) -> MmioRecord {
    MmioRecord {
        gpa: GuestPhysAddr(gpa),
        width,
        written: None,
    }
}

#[test]
fn store_register_64() {
    // mov [rdi+0x3818], eax — the e1000 TDT write
    let (mut cpu, mem) = guest64(&[0x89, 0x87, 0x18, 0x38, 0x00, 0x00]);
    cpu.regs.rdi = MMIO_LA;
    cpu.regs.rax = 0xffff_ffff_0000_0123;
    let (r, dev) = emulate(&mut cpu, &mem, MMIO_GPA + 0x3818, AccessKind::Write, 0);
    let a = r.unwrap();
    assert_eq!(a.direction, MmioDirection::Write);
    assert_eq!(
        (a.width, a.value, a.dest),
        (AccessWidth::Dword, 0x123, None)
    );
    assert_eq!(a.gla, MMIO_LA + 0x3818);
    assert_eq!(
        dev.log.as_slice(),
        &[write_record(MMIO_GPA + 0x3818, AccessWidth::Dword, 0x123)]
    );
    assert_eq!(cpu.rip, CODE_LA + 6);
    assert_eq!((a.old_rip, a.new_rip), (CODE_LA, CODE_LA + 6));
    assert_eq!(
        message(&a).as_str(),
        "rip 0xffffffff81000ff0: write 32-bit 0x123 at 0xfebc3818 [89 87 18 38 00 00]"
    );
}

#[test]
fn store_all_widths_and_high_byte_registers_64() {
    let cases: &[(&[u8], AccessWidth, u64)] = &[
        // mov [rbx], ah
        (&[0x88, 0x23], AccessWidth::Byte, 0x77),
        // mov [rbx], spl (REX makes reg 4 SPL, not AH)
        (&[0x40, 0x88, 0x23], AccessWidth::Byte, 0x44),
        // mov [rbx], r12w
        (&[0x66, 0x44, 0x89, 0x23], AccessWidth::Word, 0xc0c0),
        // mov [rbx], r9d
        (&[0x44, 0x89, 0x0b], AccessWidth::Dword, 0x9999_0009),
        // mov [rbx], rcx
        (
            &[0x48, 0x89, 0x0b],
            AccessWidth::Qword,
            0x8877_6655_4433_2211,
        ),
    ];
    for (code, width, value) in cases {
        let (mut cpu, mem) = guest64(code);
        cpu.regs.rax = 0x1122_3344_5566_7788;
        cpu.regs.rsp = 0x44;
        cpu.regs.r12 = 0xc0c0;
        cpu.regs.r9 = 0x9999_0009;
        cpu.regs.rcx = 0x8877_6655_4433_2211;
        cpu.regs.rbx = MMIO_LA + 0x10;
        let (r, dev) = emulate(&mut cpu, &mem, MMIO_GPA + 0x10, AccessKind::Write, 0);
        let a = r.unwrap_or_else(|e| panic!("{code:02x?}: {e}"));
        assert_eq!((a.width, a.value), (*width, *value), "{code:02x?}");
        assert_eq!(
            dev.log.as_slice(),
            &[write_record(MMIO_GPA + 0x10, *width, *value)]
        );
        assert_eq!(cpu.rip, CODE_LA + code.len() as u64);
    }
}

#[test]
fn store_immediates_64() {
    let cases: &[(&[u8], AccessWidth, u64)] = &[
        // mov byte [rbx], 0x5a
        (&[0xc6, 0x03, 0x5a], AccessWidth::Byte, 0x5a),
        // mov word [rbx], 0x1234
        (&[0x66, 0xc7, 0x03, 0x34, 0x12], AccessWidth::Word, 0x1234),
        // mov dword [rbx], 0xdeadbeef
        (
            &[0xc7, 0x03, 0xef, 0xbe, 0xad, 0xde],
            AccessWidth::Dword,
            0xdead_beef,
        ),
        // mov qword [rbx], -2 (imm32 sign-extended)
        (
            &[0x48, 0xc7, 0x03, 0xfe, 0xff, 0xff, 0xff],
            AccessWidth::Qword,
            u64::MAX - 1,
        ),
    ];
    for (code, width, value) in cases {
        let (mut cpu, mem) = guest64(code);
        cpu.regs.rbx = MMIO_LA + 0x100;
        let (r, dev) = emulate(&mut cpu, &mem, MMIO_GPA + 0x100, AccessKind::Write, 0);
        r.unwrap_or_else(|e| panic!("{code:02x?}: {e}"));
        assert_eq!(
            dev.log.as_slice(),
            &[write_record(MMIO_GPA + 0x100, *width, *value)]
        );
    }
}

#[test]
fn loads_with_merge_zero_and_sign_extension_64() {
    const OLD: u64 = 0x1111_2222_3333_4444;
    // (code, width, device value, register after, which register)
    type Pick = fn(&GuestRegisters) -> u64;
    let cases: &[(&[u8], AccessWidth, u64, u64, Pick)] = &[
        // mov al, [rbx]: merges
        (
            &[0x8a, 0x03],
            AccessWidth::Byte,
            0xf0,
            0x1111_2222_3333_44f0,
            |r| r.rax,
        ),
        // mov ah, [rbx]: bits 15:8
        (
            &[0x8a, 0x23],
            AccessWidth::Byte,
            0xf0,
            0x1111_2222_3333_f044,
            |r| r.rax,
        ),
        // mov spl, [rbx] (REX)
        (
            &[0x40, 0x8a, 0x23],
            AccessWidth::Byte,
            0xf0,
            0x1111_2222_3333_44f0,
            |r| r.rsp,
        ),
        // mov dx, [rbx]: merges
        (
            &[0x66, 0x8b, 0x13],
            AccessWidth::Word,
            0xbeef,
            0x1111_2222_3333_beef,
            |r| r.rdx,
        ),
        // mov eax, [rbx]: zero-extends
        (
            &[0x8b, 0x03],
            AccessWidth::Dword,
            0x8000_0001,
            0x8000_0001,
            |r| r.rax,
        ),
        // mov r15, [rbx]
        (
            &[0x4c, 0x8b, 0x3b],
            AccessWidth::Qword,
            0x0123_4567_89ab_cdef,
            0x0123_4567_89ab_cdef,
            |r| r.r15,
        ),
        // movzx eax, byte [rbx]
        (&[0x0f, 0xb6, 0x03], AccessWidth::Byte, 0x80, 0x80, |r| {
            r.rax
        }),
        // movzx r8, word [rbx]
        (
            &[0x4c, 0x0f, 0xb7, 0x03],
            AccessWidth::Word,
            0x8001,
            0x8001,
            |r| r.r8,
        ),
        // movzx ax, byte [rbx]: 16-bit destination merges
        (
            &[0x66, 0x0f, 0xb6, 0x03],
            AccessWidth::Byte,
            0x80,
            0x1111_2222_3333_0080,
            |r| r.rax,
        ),
        // movsx rax, byte [rbx]
        (
            &[0x48, 0x0f, 0xbe, 0x03],
            AccessWidth::Byte,
            0x80,
            0xffff_ffff_ffff_ff80,
            |r| r.rax,
        ),
        // movsx ecx, word [rbx]: sign-extends to 32, zero-extends to 64
        (
            &[0x0f, 0xbf, 0x0b],
            AccessWidth::Word,
            0x8000,
            0x0000_0000_ffff_8000,
            |r| r.rcx,
        ),
        // movsx ax, byte [rbx]
        (
            &[0x66, 0x0f, 0xbe, 0x03],
            AccessWidth::Byte,
            0xff,
            0x1111_2222_3333_ffff,
            |r| r.rax,
        ),
        // movsxd rdx, dword [rbx]
        (
            &[0x48, 0x63, 0x13],
            AccessWidth::Dword,
            0x8000_0000,
            0xffff_ffff_8000_0000,
            |r| r.rdx,
        ),
    ];
    for (code, width, device, after, pick) in cases {
        let (mut cpu, mem) = guest64(code);
        cpu.regs.rax = OLD;
        cpu.regs.rcx = OLD;
        cpu.regs.rdx = OLD;
        cpu.regs.rsp = OLD;
        cpu.regs.r8 = OLD;
        cpu.regs.r15 = OLD;
        cpu.regs.rbx = MMIO_LA + 0x20;
        // The device returns garbage above the width; the emulator must drop it.
        let noisy = device | (0xdead_0000_0000_0000 & !width.mask());
        let (r, dev) = emulate(&mut cpu, &mem, MMIO_GPA + 0x20, AccessKind::Read, noisy);
        let a = r.unwrap_or_else(|e| panic!("{code:02x?}: {e}"));
        assert_eq!(a.direction, MmioDirection::Read);
        assert_eq!((a.width, a.value), (*width, *device), "{code:02x?}");
        assert_eq!(pick(&cpu.regs), *after, "{code:02x?}");
        assert_eq!(dev.log.as_slice(), &[read_record(MMIO_GPA + 0x20, *width)]);
        assert_eq!(cpu.rip, CODE_LA + code.len() as u64);
        assert_eq!(cpu.regs.rbx, MMIO_LA + 0x20, "base register untouched");
    }
    // The log line names the destination register.
    let (mut cpu, mem) = guest64(&[0x44, 0x8b, 0x0b]); // mov r9d, [rbx]
    cpu.regs.rbx = MMIO_LA;
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA, AccessKind::Read, 0x42);
    assert!(message(&r.unwrap()).ends_with("read 32-bit 0x42 at 0xfebc0000 [44 8b 0b] into r9d"));
}

#[test]
fn sib_rip_relative_moffs_and_segments_64() {
    // mov r9d, [r10 + r11*4 + 8]
    let (mut cpu, mem) = guest64(&[0x47, 0x8b, 0x4c, 0x9a, 0x08]);
    cpu.regs.r10 = MMIO_LA;
    cpu.regs.r11 = 0x100;
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA + 0x408, AccessKind::Read, 7);
    r.unwrap();
    assert_eq!(cpu.regs.r9, 7);

    // mov rax, [rip + disp32] with the target on the MMIO page
    let next = CODE_LA + 7;
    let mut code = [0x48, 0x8b, 0x05, 0, 0, 0, 0];
    // The displacement must fit in 32 bits: map an MMIO page close to the code.
    let near_mmio_la = CODE_LA & !0xfff_ffff; // 0xffff_ffff_8000_0000
    let disp = (near_mmio_la + 0x40).wrapping_sub(next) as i64;
    assert!(i32::try_from(disp).is_ok());
    code[3..7].copy_from_slice(&(disp as i32).to_le_bytes());
    let (mut cpu, mut mem) = guest64(&code);
    let mut t = Tables8 {
        root: TABLES,
        next: TABLES + 0x10_000,
        levels: 4,
    };
    t.map(&mut mem, near_mmio_la, MMIO_GPA, 12, P | RW);
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA + 0x40, AccessKind::Read, 0x55);
    let a = r.unwrap();
    assert!(a.instruction.mem.rip_relative);
    assert_eq!((cpu.regs.rax, a.gla), (0x55, near_mmio_la + 0x40));

    // mov eax, [moffs64]; mov [moffs64], rax; mov al, [moffs64]
    let mut code = [0xa1, 0, 0, 0, 0, 0, 0, 0, 0];
    code[1..].copy_from_slice(&(MMIO_LA + 8).to_le_bytes());
    let (mut cpu, mem) = guest64(&code);
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA + 8, AccessKind::Read, 0xabcd_0123);
    assert_eq!(r.unwrap().instruction.len, 9);
    assert_eq!((cpu.regs.rax, cpu.rip), (0xabcd_0123, CODE_LA + 9));
    let mut code = [0x48, 0xa3, 0, 0, 0, 0, 0, 0, 0, 0];
    code[2..].copy_from_slice(&(MMIO_LA + 8).to_le_bytes());
    let (mut cpu, mem) = guest64(&code);
    cpu.regs.rax = 0x1234_5678_9abc_def0;
    let (r, dev) = emulate(&mut cpu, &mem, MMIO_GPA + 8, AccessKind::Write, 0);
    r.unwrap();
    assert_eq!(
        dev.log.as_slice(),
        &[write_record(
            MMIO_GPA + 8,
            AccessWidth::Qword,
            0x1234_5678_9abc_def0
        )]
    );
    let mut code = [0xa0, 0, 0, 0, 0, 0, 0, 0, 0];
    code[1..].copy_from_slice(&(MMIO_LA + 3).to_le_bytes());
    let (mut cpu, mem) = guest64(&code);
    cpu.regs.rax = u64::MAX;
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA + 3, AccessKind::Read, 0x12);
    r.unwrap();
    assert_eq!(cpu.regs.rax, 0xffff_ffff_ffff_ff12);

    // fs: and gs: overrides use their bases; ds: is ignored in 64-bit mode.
    for (prefix, fs, gs) in [(0x64u8, MMIO_LA, 0), (0x65, 0, MMIO_LA), (0x3e, 0, 0)] {
        // <prefix> mov eax, [rbx + 0x30]
        let (mut cpu, mem) = guest64(&[prefix, 0x8b, 0x43, 0x30]);
        cpu.segment_bases.fs = fs;
        cpu.segment_bases.gs = gs;
        cpu.segment_bases.ds = 0x5000; // must be ignored
        cpu.regs.rbx = if prefix == 0x3e { MMIO_LA } else { 0 };
        let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA + 0x30, AccessKind::Read, 1);
        r.unwrap_or_else(|e| panic!("prefix {prefix:#x}: {e}"));
    }

    // 67: 32-bit address size in 64-bit mode truncates the effective address.
    let (mut cpu, mut mem) = guest64(&[0x67, 0x8b, 0x03]); // mov eax, [ebx]
    let mut t = Tables8 {
        root: TABLES,
        next: TABLES + 0x10_000,
        levels: 4,
    };
    t.map(&mut mem, 0xfebc_0000, MMIO_GPA, 12, P | RW);
    cpu.regs.rbx = 0xffff_ffff_febc_0010;
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA + 0x10, AccessKind::Read, 1);
    assert_eq!(r.unwrap().instruction.mem.address_bits, 32);

    // 67 with RIP-relative is EIP-relative: the target wraps at 4 GiB.
    // mov eax, [eip + disp32] where eip + 7 + disp32 = 0x1_febc_0020
    let disp = (0xfebc_0020u64.wrapping_sub((CODE_LA + 7) & 0xffff_ffff)) as u32;
    let mut code = [0x67, 0x8b, 0x05, 0, 0, 0, 0];
    code[3..].copy_from_slice(&disp.to_le_bytes());
    let (mut cpu, mut mem) = guest64(&code);
    let mut t = Tables8 {
        root: TABLES,
        next: TABLES + 0x10_000,
        levels: 4,
    };
    t.map(&mut mem, 0xfebc_0000, MMIO_GPA, 12, P | RW);
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA + 0x20, AccessKind::Read, 0x3c);
    let a = r.unwrap();
    assert!(a.instruction.mem.rip_relative);
    assert_eq!((a.gla, cpu.regs.rax), (0xfebc_0020, 0x3c));
}

#[test]
fn instruction_straddling_a_page_boundary() {
    // mov dword [rbx + 0x11223344], 0x55667788: 10 bytes from 0x...ff8 → 8 + 2 bytes.
    let code = [0xc7, 0x83, 0x44, 0x33, 0x22, 0x11, 0x88, 0x77, 0x66, 0x55];
    let (mut cpu, mut mem) = guest64(&[]);
    cpu.rip = (CODE_LA & !0xfff) + 0xff8;
    load_code(
        &mut mem,
        cpu.rip,
        (CODE_GPA & !0xfff) + 0xff8,
        0x0050_0000,
        &code,
    );
    cpu.regs.rbx = MMIO_LA.wrapping_sub(0x1122_3344) + 0x18;
    let (r, dev) = emulate(&mut cpu, &mem, MMIO_GPA + 0x18, AccessKind::Write, 0);
    let a = r.unwrap();
    assert_eq!(a.instruction.len, 10);
    assert_eq!(
        dev.log.as_slice(),
        &[write_record(
            MMIO_GPA + 0x18,
            AccessWidth::Dword,
            0x5566_7788
        )]
    );
    assert_eq!(cpu.rip, (CODE_LA & !0xfff) + 0x1002);
}

#[test]
fn fetch_stops_at_an_unmapped_page_only_when_needed() {
    let mut mem = Box::new(Mem::new());
    let mut t = Tables8::new(&mut mem, 4);
    let page = 0x40_0000u64;
    t.map(&mut mem, page, 0x20_0000, 12, P);
    t.map(&mut mem, MMIO_LA, MMIO_GPA, 12, P | RW);
    let mut cpu = long_mode_cpu(4);
    cpu.regs.rbx = MMIO_LA;
    // mov [rbx], eax (2 bytes) ending exactly at the page end: fine.
    cpu.rip = page + 0xffe;
    mem.load(GuestPhysAddr(0x20_0ffe), &[0x89, 0x03]).unwrap();
    let f = fetch_instruction(&cpu, &*mem).unwrap();
    assert_eq!(f.bytes(), &[0x89, 0x03]);
    assert!(matches!(
        f.truncated_by,
        Some(FetchError::Walk(WalkError::NotPresent { .. }))
    ));
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA, AccessKind::Write, 0);
    r.unwrap();
    // mov [rbx+0x10], eax (3 bytes) running into the unmapped page: the fetch error.
    cpu.rip = page + 0xffe;
    mem.load(GuestPhysAddr(0x20_0ffe), &[0x89, 0x43]).unwrap();
    let (r, dev) = emulate(&mut cpu, &mem, MMIO_GPA + 0x10, AccessKind::Write, 0);
    assert!(matches!(
        r,
        Err(EmulationError::Fetch(FetchError::Walk(
            WalkError::NotPresent { gla: 0x40_1000, .. }
        )))
    ));
    assert!(dev.log.is_empty());
    assert_eq!(cpu.rip, page + 0xffe);
    // RIP itself on an unmapped page.
    cpu.rip = 0x80_0000;
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA, AccessKind::Write, 0);
    assert!(matches!(r, Err(EmulationError::Fetch(FetchError::Walk(_)))));
    // RIP on a page that translates to something that is not RAM (executing from MMIO).
    cpu.rip = MMIO_LA;
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA, AccessKind::Write, 0);
    assert!(matches!(
        r,
        Err(EmulationError::Fetch(FetchError::Memory { .. }))
    ));
}

// ---------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------

fn refused(code: &[u8], access: AccessKind, gpa: u64) -> EmulationError {
    let (mut cpu, mem) = guest64(code);
    cpu.regs.rbx = MMIO_LA;
    cpu.regs.rsi = MMIO_LA;
    cpu.regs.rdi = MMIO_LA;
    cpu.regs.rcx = 4;
    let before = cpu;
    let (r, dev) = emulate(&mut cpu, &mem, gpa, access, 0);
    assert!(dev.log.is_empty(), "{code:02x?} reached the device");
    assert_eq!(cpu, before, "{code:02x?} changed the guest state");
    r.expect_err("must be refused")
}

fn message(e: &impl core::fmt::Display) -> heapless::String<256> {
    let mut s = heapless::String::new();
    core::fmt::write(&mut s, format_args!("{e}")).unwrap();
    s
}

#[test]
fn unsupported_instructions_are_refused_by_name() {
    let cases: &[(&[u8], &str)] = &[
        (&[0xf3, 0xa5], "`movsd`"),               // rep movsd
        (&[0xab], "`stosd`"),                     // stosd
        (&[0xf0, 0x01, 0x03], "`add`"),           // lock add [rbx], eax
        (&[0x01, 0x03], "`add`"),                 // add [rbx], eax (read-modify-write)
        (&[0x87, 0x03], "`xchg`"),                // xchg [rbx], eax
        (&[0xc5, 0xfe, 0x6f, 0x03], "`vmovdqu`"), // vmovdqu ymm0, [rbx]
        (&[0x0f, 0x10, 0x03], "`movups`"),        // movups xmm0, [rbx]
        (&[0xff, 0x33], "`push`"),                // push qword [rbx]
        (&[0x0f, 0xc3, 0x03], "`movnti`"),
        (&[0x8e, 0x1b], "`mov`"), // mov ds, [rbx]: a segment register, not a GPR
        (&[0x8c, 0x1b], "`mov`"), // mov [rbx], ds        // movnti [rbx], eax
    ];
    for (code, name) in cases {
        let e = refused(code, AccessKind::Write, MMIO_GPA);
        let m = message(&e);
        assert!(
            matches!(
                e,
                EmulationError::Decode {
                    source: DecodeError::Unsupported { .. },
                    ..
                }
            ),
            "{code:02x?}: {m}"
        );
        assert!(m.contains(name), "{code:02x?}: {m}");
    }
    // Invalid encodings and bytes that run out.
    assert!(matches!(
        refused(&[0x0f, 0x0b], AccessKind::Write, MMIO_GPA), // ud2 is valid: unsupported
        EmulationError::Decode {
            source: DecodeError::Unsupported { .. },
            ..
        }
    ));
    assert!(matches!(
        refused(&[0x06], AccessKind::Write, MMIO_GPA), // push es: invalid in 64-bit mode
        EmulationError::Decode {
            source: DecodeError::Invalid { .. },
            ..
        }
    ));
    // A MOV without a memory operand cannot have faulted.
    assert!(matches!(
        refused(&[0x89, 0xc3], AccessKind::Write, MMIO_GPA), // mov ebx, eax
        EmulationError::Decode {
            source: DecodeError::NoMemoryOperand { .. },
            ..
        }
    ));
}

#[test]
fn mismatches_are_refused() {
    // mov [rbx], eax — but the exit says read
    assert!(matches!(
        refused(&[0x89, 0x03], AccessKind::Read, MMIO_GPA),
        EmulationError::DirectionMismatch { .. }
    ));
    // mov eax, [rbx] — but the exit says write
    assert!(matches!(
        refused(&[0x8b, 0x03], AccessKind::Write, MMIO_GPA),
        EmulationError::DirectionMismatch { .. }
    ));
    // The operand translates elsewhere than the faulting GPA.
    let e = refused(&[0x8b, 0x03], AccessKind::Read, MMIO_GPA + 0x1000);
    assert_eq!(
        e,
        EmulationError::GpaMismatch {
            rip: CODE_LA,
            gla: MMIO_LA,
            faulting: GuestPhysAddr(MMIO_GPA + 0x1000),
            translated: GuestPhysAddr(MMIO_GPA),
        }
    );
    assert!(message(&e).contains("not the faulting 0xfebc1000"));
    // Fetch from MMIO.
    assert!(matches!(
        refused(&[0x90], AccessKind::Fetch, MMIO_GPA),
        EmulationError::FetchFromMmio { .. }
    ));
    // An access that crosses a page: mov eax, [rbx + 0xffe]
    assert!(matches!(
        refused(
            &[0x8b, 0x83, 0xfe, 0x0f, 0, 0],
            AccessKind::Read,
            MMIO_GPA + 0xffe
        ),
        EmulationError::CrossesPage { .. }
    ));
    // Non-canonical operand: mov eax, [rbx + rcx] with rbx + rcx = 0x0000_8000_0000_0000
    let (mut cpu, mem) = guest64(&[0x8b, 0x04, 0x0b]);
    cpu.regs.rbx = 0x0000_7fff_ffff_fffc;
    cpu.regs.rcx = 4;
    let (r, dev) = emulate(&mut cpu, &mem, MMIO_GPA, AccessKind::Read, 0);
    assert!(matches!(r, Err(EmulationError::NonCanonicalOperand { .. })));
    assert!(dev.log.is_empty());
    // Operand page not mapped.
    let (mut cpu, mem) = guest64(&[0x8b, 0x03]);
    cpu.regs.rbx = 0x7000_0000;
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA, AccessKind::Read, 0);
    assert!(matches!(
        r,
        Err(EmulationError::OperandWalk {
            source: WalkError::NotPresent { .. },
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------
// 32-bit protected mode (PAE and 32-bit paging)
// ---------------------------------------------------------------------------------------

const CODE32: u64 = 0xc010_0000;
/// Linear address of `MMIO_GPA` in the 32-bit guests; a large page maps it.
const MMIO32: u64 = 0xf83c_0000;

fn guest32(code: &[u8], pae: bool) -> (GuestCpuState, Box<Mem>) {
    let mut mem = Box::new(Mem::new());
    if pae {
        let mut t = Tables8::new(&mut mem, 3);
        t.map(&mut mem, CODE32, 0x0030_0000, 12, P);
        t.map(&mut mem, 0xf820_0000, 0xfea0_0000, 21, P | RW);
    } else {
        let mut next = TABLES + 0x1000;
        map32(&mut mem, &mut next, CODE32, 0x0030_0000, false, 0x1);
        map32(&mut mem, &mut next, 0xf800_0000, 0xfe80_0000, true, 0x3);
    }
    mem.load(GuestPhysAddr(0x0030_0000), code).unwrap();
    let cpu = GuestCpuState {
        cr0: CR0_PE | CR0_PG | CR0_WP,
        cr3: TABLES,
        cr4: if pae { CR4_PAE } else { CR4_PSE },
        cs_access_rights: AR_DB | 0x9b,
        ss_access_rights: 0x93,
        rip: CODE32,
        max_phys_addr_bits: 36,
        ..Default::default()
    };
    (cpu, mem)
}

#[test]
fn forms_in_32_bit_mode() {
    for pae in [true, false] {
        // mov [edi+0x2818], eax
        let (mut cpu, mem) = guest32(&[0x89, 0x87, 0x18, 0x28, 0, 0], pae);
        cpu.regs.rdi = MMIO32;
        cpu.regs.rax = 0xaaaa_bbbb_0000_0010;
        let (r, dev) = emulate(&mut cpu, &mem, MMIO_GPA + 0x2818, AccessKind::Write, 0);
        r.unwrap();
        assert_eq!(
            dev.log.as_slice(),
            &[write_record(MMIO_GPA + 0x2818, AccessWidth::Dword, 0x10)]
        );
        assert_eq!(cpu.rip, CODE32 + 6);

        // mov ax, [ebx] (66 = 16-bit operand)
        let (mut cpu, mem) = guest32(&[0x66, 0x8b, 0x03], pae);
        cpu.regs.rbx = MMIO32 + 2;
        cpu.regs.rax = 0xffff_ffff;
        let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA + 2, AccessKind::Read, 0x1234);
        assert_eq!(r.unwrap().width, AccessWidth::Word);
        assert_eq!(cpu.regs.rax, 0xffff_1234);

        // mov [moffs32], eax
        let mut code = [0xa3, 0, 0, 0, 0];
        code[1..].copy_from_slice(&((MMIO32 + 0xc0) as u32).to_le_bytes());
        let (mut cpu, mem) = guest32(&code, pae);
        cpu.regs.rax = 0x4321;
        let (r, dev) = emulate(&mut cpu, &mem, MMIO_GPA + 0xc0, AccessKind::Write, 0);
        assert_eq!(r.unwrap().instruction.len, 5);
        assert_eq!(
            dev.log.as_slice(),
            &[write_record(MMIO_GPA + 0xc0, AccessWidth::Dword, 0x4321)]
        );

        // 16-bit addressing in 32-bit code: mov eax, [bx+si+4] (67 8b 40 04), with a DS base.
        let (mut cpu, mem) = guest32(&[0x67, 0x8b, 0x40, 0x04], pae);
        cpu.segment_bases.ds = MMIO32;
        cpu.regs.rbx = 0x1_0100; // only BX = 0x0100 counts
        cpu.regs.rsi = 0xfff0; // bx + si + 4 = 0x10_0f4 wraps to 0x00f4
        let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA + 0xf4, AccessKind::Read, 0x77);
        assert_eq!(r.unwrap().instruction.mem.address_bits, 16);
        assert_eq!(cpu.regs.rax, 0x77);

        // es: override with a nonzero ES base: es mov byte [ebx], 0x01
        let (mut cpu, mem) = guest32(&[0x26, 0xc6, 0x03, 0x01], pae);
        cpu.segment_bases.es = 0x1000_0000;
        cpu.regs.rbx = MMIO32 - 0x1000_0000 + 5;
        let (r, dev) = emulate(&mut cpu, &mem, MMIO_GPA + 5, AccessKind::Write, 0);
        r.unwrap();
        assert_eq!(
            dev.log.as_slice(),
            &[write_record(MMIO_GPA + 5, AccessWidth::Byte, 1)]
        );

        // Linear addresses wrap at 4 GiB: ds base 0xffff_f000 + 0xf800_1000.
        let (mut cpu, mem) = guest32(&[0x8b, 0x03], pae);
        cpu.segment_bases.ds = 0xffff_f000;
        cpu.regs.rbx = MMIO32 + 0x1000 + 0x44;
        let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA + 0x44, AccessKind::Read, 9);
        assert_eq!(r.unwrap().gla, MMIO32 + 0x44);

        // A REX byte is DEC in 32-bit mode: 48 8b 03 is `dec eax`, refused by name.
        let (mut cpu, mem) = guest32(&[0x48, 0x8b, 0x03], pae);
        let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA, AccessKind::Read, 0);
        assert!(message(&r.unwrap_err()).contains("`dec`"));
    }
}

/// One form in 32- or 16-bit code, operand `[ebx]`/`[bx]` or a moffs, register AL/AX/EAX.
struct Form {
    code: &'static [u8],
    /// Append the operand address as a moffs (4 bytes in 32-bit code, 2 in 16-bit code).
    moffs: bool,
    width: AccessWidth,
    /// `Some(value the device must see)` for stores, `None` for loads.
    stored: Option<u64>,
    /// RAX afterwards (loads).
    rax_after: u64,
}

const RAX0: u64 = 0x1111_2222_3333_4444;
const DEVICE: u64 = 0xf1f2_8384;

const fn store(code: &'static [u8], moffs: bool, width: AccessWidth, v: u64) -> Form {
    Form {
        code,
        moffs,
        width,
        stored: Some(v),
        rax_after: RAX0,
    }
}

const fn load(code: &'static [u8], moffs: bool, width: AccessWidth, rax_after: u64) -> Form {
    Form {
        code,
        moffs,
        width,
        stored: None,
        rax_after,
    }
}

/// A guest built for some code bytes.
type Guest = (GuestCpuState, Box<Mem>);

/// Runs every form in `forms` against a guest whose operand address is `la` and whose
/// faulting address is `gpa`; `setup` builds the guest for the code bytes.
fn run_forms(
    forms: &[Form],
    moffs_bytes: usize,
    la: u64,
    gpa: u64,
    setup: &dyn Fn(&[u8]) -> Guest,
) {
    for f in forms {
        let mut code = std::vec::Vec::from(f.code);
        if f.moffs {
            code.extend_from_slice(&la.to_le_bytes()[..moffs_bytes]);
        }
        let (mut cpu, mem) = setup(&code);
        cpu.regs.rax = RAX0;
        cpu.regs.rbx = la;
        cpu.regs.rdi = la;
        let access = if f.stored.is_some() {
            AccessKind::Write
        } else {
            AccessKind::Read
        };
        let noisy = DEVICE | 0xdead_0000_0000_0000;
        let (r, dev) = emulate(&mut cpu, &mem, gpa, access, noisy);
        let a = r.unwrap_or_else(|e| panic!("{:02x?}: {e}", f.code));
        assert_eq!(a.width, f.width, "{:02x?}", f.code);
        assert_eq!(a.instruction.len, code.len(), "{:02x?}", f.code);
        match f.stored {
            Some(v) => assert_eq!(dev.log.as_slice(), &[write_record(gpa, f.width, v)]),
            None => {
                assert_eq!(dev.log.as_slice(), &[read_record(gpa, f.width)]);
                assert_eq!(a.value, DEVICE & f.width.mask());
            }
        }
        assert_eq!(cpu.regs.rax, f.rax_after, "{:02x?}", f.code);
    }
}

#[test]
fn every_form_in_32_bit_code() {
    use AccessWidth::{Byte, Dword, Word};
    let forms = [
        store(&[0x88, 0x03], false, Byte, 0x44), // mov [ebx], al
        store(&[0x66, 0x89, 0x03], false, Word, 0x4444), // mov [ebx], ax
        store(&[0x89, 0x03], false, Dword, 0x3333_4444), // mov [ebx], eax
        store(&[0xc6, 0x03, 0x5a], false, Byte, 0x5a), // mov byte [ebx], 0x5a
        store(&[0x66, 0xc7, 0x03, 0x34, 0x12], false, Word, 0x1234), // mov word [ebx], 0x1234
        store(
            &[0xc7, 0x03, 0x78, 0x56, 0x34, 0x12],
            false,
            Dword,
            0x1234_5678,
        ),
        store(&[0xa2], true, Byte, 0x44), // mov [moffs32], al
        store(&[0x66, 0xa3], true, Word, 0x4444), // mov [moffs32], ax
        store(&[0xa3], true, Dword, 0x3333_4444), // mov [moffs32], eax
        load(&[0x8a, 0x03], false, Byte, 0x1111_2222_3333_4484), // mov al, [ebx]
        load(&[0x66, 0x8b, 0x03], false, Word, 0x1111_2222_3333_8384), // mov ax, [ebx]
        load(&[0x8b, 0x03], false, Dword, 0xf1f2_8384), // mov eax, [ebx]
        load(&[0x0f, 0xb6, 0x03], false, Byte, 0x84), // movzx eax, byte [ebx]
        load(&[0x0f, 0xb7, 0x03], false, Word, 0x8384), // movzx eax, word [ebx]
        load(
            &[0x66, 0x0f, 0xb6, 0x03],
            false,
            Byte,
            0x1111_2222_3333_0084,
        ), // movzx ax, byte
        load(&[0x0f, 0xbe, 0x03], false, Byte, 0xffff_ff84), // movsx eax, byte [ebx]
        load(&[0x0f, 0xbf, 0x03], false, Word, 0xffff_8384), // movsx eax, word [ebx]
        load(
            &[0x66, 0x0f, 0xbe, 0x03],
            false,
            Byte,
            0x1111_2222_3333_ff84,
        ), // movsx ax, byte
        load(&[0xa0], true, Byte, 0x1111_2222_3333_4484), // mov al, [moffs32]
        load(&[0x66, 0xa1], true, Word, 0x1111_2222_3333_8384), // mov ax, [moffs32]
        load(&[0xa1], true, Dword, 0xf1f2_8384), // mov eax, [moffs32]
    ];
    for pae in [true, false] {
        run_forms(&forms, 4, MMIO32 + 0x40, MMIO_GPA + 0x40, &|code| {
            guest32(code, pae)
        });
    }
}

#[test]
fn every_form_in_16_bit_code() {
    use AccessWidth::{Byte, Dword, Word};
    let forms = [
        store(&[0x88, 0x07], false, Byte, 0x44),   // mov [bx], al
        store(&[0x89, 0x07], false, Word, 0x4444), // mov [bx], ax
        store(&[0x66, 0x89, 0x07], false, Dword, 0x3333_4444), // mov [bx], eax
        store(&[0xc6, 0x07, 0x5a], false, Byte, 0x5a), // mov byte [bx], 0x5a
        store(&[0xc7, 0x07, 0x34, 0x12], false, Word, 0x1234), // mov word [bx], 0x1234
        store(
            &[0x66, 0xc7, 0x07, 0x78, 0x56, 0x34, 0x12],
            false,
            Dword,
            0x1234_5678,
        ),
        store(&[0xa2], true, Byte, 0x44),   // mov [moffs16], al
        store(&[0xa3], true, Word, 0x4444), // mov [moffs16], ax
        store(&[0x66, 0xa3], true, Dword, 0x3333_4444), // mov [moffs16], eax
        load(&[0x8a, 0x07], false, Byte, 0x1111_2222_3333_4484), // mov al, [bx]
        load(&[0x8b, 0x07], false, Word, 0x1111_2222_3333_8384), // mov ax, [bx]
        load(&[0x66, 0x8b, 0x07], false, Dword, 0xf1f2_8384), // mov eax, [bx]
        load(&[0x0f, 0xb6, 0x07], false, Byte, 0x1111_2222_3333_0084), // movzx ax, byte [bx]
        load(&[0x66, 0x0f, 0xb6, 0x07], false, Byte, 0x84), // movzx eax, byte [bx]
        load(&[0x66, 0x0f, 0xb7, 0x07], false, Word, 0x8384), // movzx eax, word [bx]
        load(&[0x0f, 0xbe, 0x07], false, Byte, 0x1111_2222_3333_ff84), // movsx ax, byte [bx]
        load(&[0x66, 0x0f, 0xbf, 0x07], false, Word, 0xffff_8384), // movsx eax, word [bx]
        load(&[0xa0], true, Byte, 0x1111_2222_3333_4484), // mov al, [moffs16]
        load(&[0xa1], true, Word, 0x1111_2222_3333_8384), // mov ax, [moffs16]
        load(&[0x66, 0xa1], true, Dword, 0xf1f2_8384), // mov eax, [moffs16]
    ];
    // DS base is MMIO_GPA in these guests, so offset 0x40 is MMIO_GPA + 0x40.
    run_forms(&forms, 2, 0x40, MMIO_GPA + 0x40, &|code| {
        guest16(code, 0x100)
    });
}

#[test]
fn eip_wraps_at_32_bits() {
    // Code at linear 0xffff_fffe (paging off, CS base 0): mov [ebx], al is 2 bytes.
    let mut mem = Box::new(Mem::new());
    mem.load(GuestPhysAddr(0xffff_fffe), &[0x88, 0x03]).unwrap();
    let mut cpu = GuestCpuState {
        cr0: CR0_PE,
        cs_access_rights: AR_DB | 0x9b,
        rip: 0xffff_fffe,
        ..Default::default()
    };
    cpu.regs.rbx = MMIO_GPA;
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA, AccessKind::Write, 0);
    r.unwrap();
    assert_eq!(cpu.rip, 0);
}

// ---------------------------------------------------------------------------------------
// 16-bit code (real mode, unrestricted guest)
// ---------------------------------------------------------------------------------------

fn guest16(code: &[u8], ip: u64) -> (GuestCpuState, Box<Mem>) {
    let mut mem = Box::new(Mem::new());
    let cs_base = 0x0009_0000u64;
    load_code(
        &mut mem,
        cs_base + ip,
        cs_base + ip,
        (cs_base + ip + 0x1000) & !0xfff,
        code,
    );
    let cpu = GuestCpuState {
        cs_selector: 0x9000,
        cs_base,
        cs_access_rights: 0x93,
        rip: ip,
        rflags: 2,
        segment_bases: SegmentBases {
            // "Unreal" DS reaching the MMIO BAR; SS elsewhere.
            ds: MMIO_GPA,
            ss: MMIO_GPA + 0x1000,
            ..Default::default()
        },
        ..Default::default()
    };
    (cpu, mem)
}

#[test]
fn forms_in_16_bit_mode() {
    // mov [bx+0x10], ax
    let (mut cpu, mem) = guest16(&[0x89, 0x47, 0x10], 0x100);
    cpu.regs.rbx = 0x20;
    cpu.regs.rax = 0xdead_beef;
    let (r, dev) = emulate(&mut cpu, &mem, MMIO_GPA + 0x30, AccessKind::Write, 0);
    assert_eq!(r.unwrap().instruction.mem.address_bits, 16);
    assert_eq!(
        dev.log.as_slice(),
        &[write_record(MMIO_GPA + 0x30, AccessWidth::Word, 0xbeef)]
    );
    assert_eq!(cpu.rip, 0x103);

    // mov eax, [bx] (66 prefix)
    let (mut cpu, mem) = guest16(&[0x66, 0x8b, 0x07], 0x100);
    cpu.regs.rbx = 0x8;
    cpu.regs.rax = 0xffff_ffff_ffff_ffff;
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA + 8, AccessKind::Read, 0x1234_5678);
    assert_eq!(r.unwrap().width, AccessWidth::Dword);
    assert_eq!(cpu.regs.rax, 0x1234_5678);

    // mov al, [0x0008] (moffs16)
    let (mut cpu, mem) = guest16(&[0xa0, 0x08, 0x00], 0x100);
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA + 8, AccessKind::Read, 0x42);
    assert_eq!(r.unwrap().instruction.len, 3);
    assert_eq!(cpu.regs.rax & 0xff, 0x42);

    // mov word [di], 0x1234
    let (mut cpu, mem) = guest16(&[0xc7, 0x05, 0x34, 0x12], 0x100);
    cpu.regs.rdi = 0x40;
    let (r, dev) = emulate(&mut cpu, &mem, MMIO_GPA + 0x40, AccessKind::Write, 0);
    r.unwrap();
    assert_eq!(
        dev.log.as_slice(),
        &[write_record(MMIO_GPA + 0x40, AccessWidth::Word, 0x1234)]
    );

    // movzx eax, word [si]
    let (mut cpu, mem) = guest16(&[0x66, 0x0f, 0xb7, 0x04], 0x100);
    cpu.regs.rsi = 0x2;
    cpu.regs.rax = u64::MAX;
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA + 2, AccessKind::Read, 0xf00d);
    r.unwrap();
    assert_eq!(cpu.regs.rax, 0xf00d);

    // mov ax, [bp+2]: BP-based operands default to SS.
    let (mut cpu, mem) = guest16(&[0x8b, 0x46, 0x02], 0x100);
    cpu.regs.rbp = 0x10;
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA + 0x1012, AccessKind::Read, 0x99);
    assert_eq!(r.unwrap().instruction.mem.segment, SegmentReg::Ss);

    // mov ecx, [ebx] with 67: 32-bit addressing in 16-bit code.
    let (mut cpu, mem) = guest16(&[0x67, 0x66, 0x8b, 0x0b], 0x100);
    cpu.regs.rbx = 0x0001_0004;
    let (r, _) = emulate(
        &mut cpu,
        &mem,
        MMIO_GPA + 0x1_0004,
        AccessKind::Read,
        0xcafe_f00d,
    );
    assert_eq!(r.unwrap().instruction.mem.address_bits, 32);
    assert_eq!(cpu.regs.rcx, 0xcafe_f00d);

    // 16-bit effective addresses wrap: [bx+si] = 0xfff0 + 0x20 → 0x0010.
    let (mut cpu, mem) = guest16(&[0x8a, 0x20], 0x100); // mov ah, [bx+si]
    cpu.regs.rbx = 0xfff0;
    cpu.regs.rsi = 0x20;
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA + 0x10, AccessKind::Read, 0xab);
    r.unwrap();
    assert_eq!(cpu.regs.rax, 0xab00);
}

#[test]
fn ip_wraps_at_16_bits() {
    // mov [bx], al at IP 0xfffe (2 bytes) → IP 0x0000; a 3-byte one → 0x0001.
    let (mut cpu, mem) = guest16(&[0x88, 0x07], 0xfffe);
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA, AccessKind::Write, 0);
    r.unwrap();
    assert_eq!(cpu.rip, 0);
    let (mut cpu, mem) = guest16(&[0x88, 0x47, 0x01], 0xfffe);
    let (r, _) = emulate(&mut cpu, &mem, MMIO_GPA + 1, AccessKind::Write, 0);
    r.unwrap();
    assert_eq!(cpu.rip, 1);
}

#[test]
fn virtual_8086_mode_is_16_bit_cpl_3() {
    let (mut cpu, mem) = guest16(&[0x89, 0x07], 0x100); // mov [bx], ax
    cpu.cr0 = CR0_PE;
    cpu.rflags |= RFLAGS_VM;
    cpu.cs_access_rights = AR_DB | 0xf3; // ignored in v8086 mode
    assert_eq!((cpu.mode(), cpu.cpl()), (CpuMode::Bits16, 3));
    let (r, dev) = emulate(&mut cpu, &mem, MMIO_GPA, AccessKind::Write, 0);
    r.unwrap();
    assert_eq!(dev.log[0].width, AccessWidth::Word);
}

#[test]
fn error_messages_name_the_problem() {
    let e = refused(&[0xf3, 0xa5], AccessKind::Write, MMIO_GPA);
    assert_eq!(
        message(&e).as_str(),
        "at rip 0xffffffff81000ff0: instruction `movsd` [f3 a5] is not an emulated MMIO \
         access (those are MOV between memory and a general register or an immediate, MOVZX, \
         MOVSX, MOVSXD)"
    );
    let w = WalkError::NotPresent {
        gla: 0x1000,
        level: PagingLevel::Pdpt,
        entry: 0x2,
    };
    assert_eq!(
        message(&w).as_str(),
        "guest linear address 0x1000: PDPTE 0x2 is not present"
    );
}

// ---------------------------------------------------------------------------------------
// Follow-on emulation: the flush read after a trapped write, in the same exit
// ---------------------------------------------------------------------------------------

/// A handler for the test's MMIO pages, sharing one recording device (the follow-on tests
/// trap the first two of the four pages).
struct SharedMmio<'a>(&'a core::cell::RefCell<RecordingMmio>);

impl MmioHandler for SharedMmio<'_> {
    fn read(&mut self, gpa: GuestPhysAddr, width: AccessWidth) -> u64 {
        self.0.borrow_mut().read(gpa, width)
    }
    fn write(&mut self, gpa: GuestPhysAddr, width: AccessWidth, value: u64) {
        self.0.borrow_mut().write(gpa, width, value)
    }
}

/// Emulates the trapped write at RIP (at `gpa`), then the follow-on stretch; returns the
/// follow-on result and the device's log.
fn write_then_follow_on(
    cpu: &mut GuestCpuState,
    mem: &Mem,
    gpa: u64,
    status: u64,
) -> (Option<EmulatedAccess>, heapless::Vec<MmioRecord, 16>) {
    let dev = core::cell::RefCell::new(RecordingMmio::new(status));
    let write = emulate_mmio(
        cpu,
        GuestPhysAddr(gpa),
        AccessKind::Write,
        mem,
        &mut SharedMmio(&dev),
    );
    assert!(write.is_ok(), "{write:?}");
    let fused = emulate_follow_on(cpu, mem, |gpa: GuestPhysAddr| {
        (gpa.0 & !0x1fff == MMIO_GPA).then_some(SharedMmio(&dev))
    });
    let log = dev.borrow().log.clone();
    (fused, log)
}

/// Debian 6.1 e1000.ko, `e1000_intr`: `ew32(IMC, ~0); E1000_WRITE_FLUSH();`
const IMC_THEN_FLUSH: [u8; 19] = [
    0x89, 0x90, 0xd8, 0x00, 0x00, 0x00, // mov %edx,0xd8(%rax)
    0x48, 0x8b, 0x83, 0x08, 0x0e, 0x00, 0x00, // mov 0xe08(%rbx),%rax
    0x48, 0x83, 0xc0, 0x08, // add $0x8,%rax
    0x8b, 0x00, // mov (%rax),%eax
];

fn e1000_guest(code: &[u8]) -> (GuestCpuState, Box<Mem>) {
    let (mut cpu, mut mem) = guest64(code);
    // `adapter` in rbx, `hw->hw_addr` at adapter + 0xe08, the register page in rax.
    cpu.regs.rbx = DATA_LA;
    cpu.regs.rax = MMIO_LA;
    cpu.regs.rdx = 0xffff_ffff;
    mem.load_u64(GuestPhysAddr(DATA_GPA + 0xe08), MMIO_LA)
        .unwrap();
    (cpu, mem)
}

#[test]
fn imc_write_and_its_status_flush_take_one_exit() {
    let (mut cpu, mem) = e1000_guest(&IMC_THEN_FLUSH);
    cpu.rflags = 2 | CF_ZF_FOR_TEST;
    let (fused, log) = write_then_follow_on(&mut cpu, &mem, MMIO_GPA + 0xd8, 0xdead_0080_0000_0283);
    let read = fused.expect("the flush read is emulated in the same exit");
    assert_eq!(read.gpa, GuestPhysAddr(MMIO_GPA + 8));
    assert_eq!((read.width, read.value), (AccessWidth::Dword, 0x0000_0283));
    assert_eq!(
        log.as_slice(),
        &[
            write_record(MMIO_GPA + 0xd8, AccessWidth::Dword, 0xffff_ffff),
            read_record(MMIO_GPA + 8, AccessWidth::Dword)
        ]
    );
    // EAX got STATUS (the 32-bit load zero-extends into RAX), RIP is past all four
    // instructions, and the flags are those of `add $8` on the kernel pointer: SF only.
    assert_eq!(cpu.regs.rax, 0x283);
    assert_eq!(cpu.rip, CODE_LA + IMC_THEN_FLUSH.len() as u64);
    assert_eq!(cpu.rflags, 2 | (1 << 7));
}

/// CF and ZF set before the stretch, to see ADD replace them.
const CF_ZF_FOR_TEST: u64 = 1 | (1 << 6);

#[test]
fn ims_write_and_its_flush_through_another_base_register() {
    // Debian 6.1 e1000.ko, `e1000_clean`: `ew32(IMS, ...)`; `mov 0x1d8(%r15),%rax`;
    // `mov 0x8(%rax),%eax` (no ADD: the flags stay as they were).
    let code = [
        0x89, 0x90, 0xd0, 0x00, 0x00, 0x00, // mov %edx,0xd0(%rax)
        0x49, 0x8b, 0x87, 0xd8, 0x01, 0x00, 0x00, // mov 0x1d8(%r15),%rax
        0x8b, 0x40, 0x08, // mov 0x8(%rax),%eax
    ];
    let (mut cpu, mut mem) = e1000_guest(&code);
    cpu.regs.r15 = DATA_LA;
    mem.load_u64(GuestPhysAddr(DATA_GPA + 0x1d8), MMIO_LA)
        .unwrap();
    cpu.rflags = 2 | CF_ZF_FOR_TEST;
    let (fused, log) = write_then_follow_on(&mut cpu, &mem, MMIO_GPA + 0xd0, 0x80080783);
    assert_eq!(fused.map(|r| r.gpa), Some(GuestPhysAddr(MMIO_GPA + 8)));
    assert_eq!(log.len(), 2);
    assert_eq!(cpu.regs.rax, 0x8008_0783);
    assert_eq!(cpu.rip, CODE_LA + code.len() as u64);
    assert_eq!(cpu.rflags, 2 | CF_ZF_FOR_TEST);
}

#[test]
fn follow_on_leaves_the_guest_as_the_write_left_it_when_the_stretch_is_not_a_flush() {
    // Each case: the instructions after the trapped `mov %edx,0xd8(%rax)`, and a setup.
    type Setup = fn(&mut GuestCpuState, &mut Mem);
    let nothing: Setup = |_, _| {};
    let cases: &[(&str, &[u8], Setup)] = &[
        // The flush read is not next: a conditional jump first.
        ("jcc", &[0x74, 0x02, 0x8b, 0x00], nothing),
        // A RAM store is never emulated.
        (
            "store",
            &[0x48, 0x89, 0x83, 0x08, 0x0e, 0x00, 0x00, 0x8b, 0x00],
            nothing,
        ),
        // Loads from an address that is neither trapped nor RAM (an untrapped device page).
        ("device", &[0x8b, 0x81, 0x00, 0x00, 0x00, 0x00], |cpu, _| {
            cpu.regs.rcx = MMIO_LA + 0x3000
        }),
        // From the first MiB (legacy device windows live there).
        ("low", &[0x48, 0x8b, 0x01, 0x8b, 0x00], |cpu, _| {
            cpu.regs.rcx = LOW_LA
        }),
        // A misaligned RAM load.
        (
            "misaligned",
            &[0x48, 0x8b, 0x83, 0x09, 0x0e, 0x00, 0x00, 0x8b, 0x00],
            nothing,
        ),
        // More RAM loads than the window allows before the flush.
        (
            "too-long",
            &[
                0x48, 0x8b, 0x83, 0x08, 0x0e, 0x00, 0x00, // mov 0xe08(%rbx),%rax
                0x48, 0x8b, 0x83, 0x08, 0x0e, 0x00, 0x00, 0x48, 0x8b, 0x83, 0x08, 0x0e, 0x00, 0x00,
                0x48, 0x8b, 0x83, 0x08, 0x0e, 0x00, 0x00, 0x8b, 0x00,
            ],
            nothing,
        ),
        // Single-stepping: every instruction boundary is observable.
        ("tf", &IMC_THEN_FLUSH[6..], |cpu, _| cpu.rflags |= 1 << 8),
        // The data page vanished from the guest's tables.
        ("walk", &IMC_THEN_FLUSH[6..], |cpu, _| {
            cpu.regs.rbx = 0xffff_8880_0070_0000
        }),
        // A locked ADD.
        ("lock", &[0xf0, 0x48, 0x83, 0xc0, 0x08, 0x8b, 0x00], nothing),
    ];
    for (name, tail, setup) in cases {
        let mut code = IMC_THEN_FLUSH[..6].to_vec();
        code.extend_from_slice(tail);
        let (mut cpu, mut mem) = e1000_guest(&code);
        setup(&mut cpu, &mut mem);
        let dev = core::cell::RefCell::new(RecordingMmio::new(0x283));
        emulate_mmio(
            &mut cpu,
            GuestPhysAddr(MMIO_GPA + 0xd8),
            AccessKind::Write,
            &*mem,
            &mut SharedMmio(&dev),
        )
        .unwrap();
        let after_write = cpu;
        let fused = emulate_follow_on(&mut cpu, &*mem, |gpa: GuestPhysAddr| {
            (gpa.0 & !0x1fff == MMIO_GPA).then_some(SharedMmio(&dev))
        });
        assert!(fused.is_none(), "{name}: {fused:?}");
        assert_eq!(cpu, after_write, "{name}: the CPU state changed");
        assert_eq!(dev.borrow().log.len(), 1, "{name}: the device saw more");
    }
}

#[test]
fn follow_on_runs_only_in_64_bit_mode() {
    let (mut cpu, mem) = e1000_guest(&IMC_THEN_FLUSH);
    cpu.rip += 6;
    cpu.cs_access_rights = AR_DB | 0x9b;
    let before = cpu;
    let none = emulate_follow_on(&mut cpu, &*mem, |_| None::<RecordingMmio>);
    assert!(none.is_none());
    assert_eq!(cpu, before);
}
