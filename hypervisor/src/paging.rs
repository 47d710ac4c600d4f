//! Builders for Ally's own 4-level page tables and for the guest's EPT (Intel) or nested page
//! tables (AMD NPT, APM Vol. 2 15.25).
//!
//! Both walk the same 4-level, 9-bits-per-level structure (PML4 -> PDPT -> PD -> PT) and
//! use 2 MiB pages (PS, bit 7, in a PD entry) wherever the virtual/guest address, the
//! physical address and the remaining length allow, 4 KiB pages otherwise. Tables are
//! reached through [`TableMemory`] and new ones come from [`FrameAllocator`], which Ally
//! implements on hardware and the tests fake. Nothing here flushes TLBs: after changing
//! live tables the caller issues INVLPG / a CR3 reload (host) or INVEPT (EPT).
//!
//! Running out of frames is an error, never a panic; a `map` that fails part-way leaves the
//! pages before the failure mapped and the rest untouched.

use crate::addr::{GuestPhysAddr, HostPhysAddr, PhysRange, LARGE_PAGE_SIZE, PAGE_SIZE};
use core::fmt;

/// Entries per table.
pub const ENTRIES: usize = 512;
/// Physical addresses must lie below 2^52 (the architectural MAXPHYADDR limit).
pub const MAX_PHYS: u64 = 1 << 52;
/// Guest-physical addresses must lie below 2^48 (4-level EPT walk).
pub const MAX_GUEST_PHYS: u64 = 1 << 48;

/// Address bits 51:12 of a table entry.
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// PS: the entry maps a 2 MiB page (PD) — same bit in both formats.
const LARGE: u64 = 1 << 7;

/// Hands out zeroed 4 KiB frames for new tables.
pub trait FrameAllocator {
    /// A 4 KiB-aligned frame filled with zeros, or `None` when memory is exhausted.
    fn allocate_zeroed_frame(&mut self) -> Option<HostPhysAddr>;
}

/// Access to page-table frames.
pub trait TableMemory {
    /// The table stored in `frame` (a frame returned by the allocator or the root).
    fn table(&mut self, frame: HostPhysAddr) -> &mut [u64; ENTRIES];
}

/// Memory types: MTRR / PAT encodings, also used in EPT entries bits 5:3
/// (SDM Vol. 3A 12.3 Table 12-2 / 11.3; Vol. 3C 28.3.7, 29.3.7 in recent editions).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum MemoryType {
    Uncacheable = 0,
    WriteCombining = 1,
    WriteThrough = 4,
    WriteProtected = 5,
    WriteBack = 6,
}

/// The name Ally's EPT code uses for [`MemoryType`].
pub type EptMemoryType = MemoryType;

impl MemoryType {
    /// The type for an encoding; `None` for the reserved encodings 2, 3 and 7..=255.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(MemoryType::Uncacheable),
            1 => Some(MemoryType::WriteCombining),
            4 => Some(MemoryType::WriteThrough),
            5 => Some(MemoryType::WriteProtected),
            6 => Some(MemoryType::WriteBack),
            _ => None,
        }
    }

    pub const fn to_raw(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for MemoryType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemoryType::Uncacheable => "UC",
            MemoryType::WriteCombining => "WC",
            MemoryType::WriteThrough => "WT",
            MemoryType::WriteProtected => "WP",
            MemoryType::WriteBack => "WB",
        })
    }
}

/// Errors of this module.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PagingError {
    /// The frame allocator is exhausted.
    OutOfFrames,
    /// An address or length is not a multiple of 4 KiB.
    Unaligned { what: &'static str, value: u64 },
    /// A zero-length mapping was requested.
    ZeroLength,
    /// The range wraps or leaves the addressable space of its kind.
    OutOfRange {
        what: &'static str,
        start: u64,
        len: u64,
    },
    /// A host virtual range is not canonical (or crosses the non-canonical hole).
    NonCanonical { virt: u64, len: u64 },
    /// EPT permissions that the CPU treats as a misconfiguration, or none at all.
    BadPermissions { perms: EptPermissions },
    /// The address is not mapped.
    NotMapped { addr: u64 },
    /// A 1 GiB page (not built by this module) is in the way.
    HugePage { addr: u64 },
}

impl fmt::Display for PagingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PagingError::OutOfFrames => f.write_str("out of page-table frames"),
            PagingError::Unaligned { what, value } => {
                write!(f, "{what} {value:#x} is not a multiple of 4 KiB")
            }
            PagingError::ZeroLength => f.write_str("mapping of length 0"),
            PagingError::OutOfRange { what, start, len } => write!(
                f,
                "{what} range at {start:#x} of {len:#x} bytes is outside the addressable space"
            ),
            PagingError::NonCanonical { virt, len } => write!(
                f,
                "virtual range at {virt:#x} of {len:#x} bytes is not canonical"
            ),
            PagingError::BadPermissions { perms } => write!(
                f,
                "EPT permissions {perms} are invalid (write requires read; use unmap for none)"
            ),
            PagingError::NotMapped { addr } => write!(f, "address {addr:#x} is not mapped"),
            PagingError::HugePage { addr } => {
                write!(
                    f,
                    "address {addr:#x} lies in a 1 GiB page this builder cannot split"
                )
            }
        }
    }
}

/// The two entry formats.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    /// IA-32e paging (SDM Vol. 3A 4.5, Tables 4-14..4-20).
    Host,
    /// EPT (SDM Vol. 3C 28.3.2, Tables 28-1..28-6).
    Ept,
    /// AMD nested page tables: the IA-32e format, with U/S set in every entry because
    /// nested-page-table walks are user accesses (APM Vol. 2 15.25.5).
    Npt,
}

impl Format {
    fn is_present(self, entry: u64) -> bool {
        match self {
            // P, bit 0.
            Format::Host | Format::Npt => entry & 1 != 0,
            // Any of R/W/X (bits 2:0); an entry with all three clear is not present.
            Format::Ept => entry & 0b111 != 0,
        }
    }

    /// A non-leaf entry pointing at `table`. Permissions are ANDed along the walk, so
    /// intermediate entries grant everything and the leaf decides.
    fn table_entry(self, table: HostPhysAddr) -> u64 {
        match self {
            // P | R/W; supervisor only; NX clear.
            Format::Host => table.0 | 0b11,
            // P | R/W | U/S (APM 15.25.5).
            Format::Npt => table.0 | 0b111,
            // R | W | X; memory type bits are reserved (0) in non-leaf EPT entries.
            Format::Ept => table.0 | 0b111,
        }
    }

    /// The 4 KiB entry for page `i` of the 2 MiB page `large`.
    fn split_entry(self, large: u64, i: u64) -> u64 {
        let base = (large & ADDR_MASK & !(LARGE_PAGE_SIZE - 1)) + i * PAGE_SIZE;
        let attrs = match self {
            Format::Host | Format::Npt => {
                // The PAT bit is bit 12 in a 2 MiB entry and bit 7 in a 4 KiB entry.
                let pat = if large & (1 << 12) != 0 { LARGE } else { 0 };
                (large & !ADDR_MASK & !LARGE) | pat
            }
            Format::Ept => large & !ADDR_MASK & !LARGE,
        };
        base | attrs
    }
}

fn index(addr: u64, level: u32) -> usize {
    ((addr >> (12 + 9 * level)) & 0x1FF) as usize
}

/// Shared 4-level walker over a root table.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Tables {
    root: HostPhysAddr,
}

impl Tables {
    /// Removes the 4 KiB guest page at `gpa` (rounded down), first splitting the 2 MiB page
    /// that holds it; shared by the EPT and the nested page tables.
    fn unmap_page<M: TableMemory + FrameAllocator>(
        &mut self,
        format: Format,
        gpa: GuestPhysAddr,
        mem: &mut M,
    ) -> Result<(), PagingError> {
        let addr = gpa.align_down(PAGE_SIZE).0;
        if addr >= MAX_GUEST_PHYS || self.lookup(format, mem, addr).is_none() {
            return Err(PagingError::NotMapped { addr });
        }
        let pt = self.pt(format, mem, addr)?;
        mem.table(pt)[index(addr, 0)] = 0;
        Ok(())
    }

    fn new(alloc: &mut impl FrameAllocator) -> Result<Self, PagingError> {
        let root = alloc
            .allocate_zeroed_frame()
            .ok_or(PagingError::OutOfFrames)?;
        Ok(Self { root })
    }

    /// The next-level table under `table[idx]`, creating it when `create`.
    fn next_table<M: TableMemory + FrameAllocator>(
        fmt: Format,
        mem: &mut M,
        table: HostPhysAddr,
        idx: usize,
        addr: u64,
    ) -> Result<HostPhysAddr, PagingError> {
        let entry = mem.table(table)[idx];
        if fmt.is_present(entry) {
            if entry & LARGE != 0 {
                return Err(PagingError::HugePage { addr });
            }
            return Ok(HostPhysAddr(entry & ADDR_MASK));
        }
        let new = mem
            .allocate_zeroed_frame()
            .ok_or(PagingError::OutOfFrames)?;
        mem.table(table)[idx] = fmt.table_entry(new);
        Ok(new)
    }

    /// The PD covering `addr`, creating the PDPT and PD as needed.
    fn pd<M: TableMemory + FrameAllocator>(
        &self,
        fmt: Format,
        mem: &mut M,
        addr: u64,
    ) -> Result<HostPhysAddr, PagingError> {
        let pdpt = Self::next_table(fmt, mem, self.root, index(addr, 3), addr)?;
        Self::next_table(fmt, mem, pdpt, index(addr, 2), addr)
    }

    /// The PT covering `addr`, creating tables and splitting a 2 MiB page as needed.
    fn pt<M: TableMemory + FrameAllocator>(
        &self,
        fmt: Format,
        mem: &mut M,
        addr: u64,
    ) -> Result<HostPhysAddr, PagingError> {
        let pd = self.pd(fmt, mem, addr)?;
        let idx = index(addr, 1);
        let entry = mem.table(pd)[idx];
        if fmt.is_present(entry) && entry & LARGE != 0 {
            // Fill the new table completely before the PD entry switches to it, so a
            // concurrent walk sees either the old 2 MiB page or the equivalent 4 KiB pages.
            let pt = mem
                .allocate_zeroed_frame()
                .ok_or(PagingError::OutOfFrames)?;
            let t = mem.table(pt);
            for (i, e) in t.iter_mut().enumerate() {
                *e = fmt.split_entry(entry, i as u64);
            }
            mem.table(pd)[idx] = fmt.table_entry(pt);
            return Ok(pt);
        }
        Self::next_table(fmt, mem, pd, idx, addr)
    }

    /// Maps `[addr, addr+len)` to `[phys, phys+len)` with `leaf(phys, large)` entries.
    fn map<M: TableMemory + FrameAllocator>(
        &self,
        fmt: Format,
        mem: &mut M,
        addr: u64,
        phys: u64,
        len: u64,
        leaf: impl Fn(u64, bool) -> u64,
    ) -> Result<(), PagingError> {
        let mut off = 0;
        while off < len {
            let (va, pa) = (addr + off, phys + off);
            if va % LARGE_PAGE_SIZE == 0
                && pa % LARGE_PAGE_SIZE == 0
                && len - off >= LARGE_PAGE_SIZE
            {
                let pd = self.pd(fmt, mem, va)?;
                let idx = index(va, 1);
                let entry = mem.table(pd)[idx];
                if fmt.is_present(entry) && entry & LARGE == 0 {
                    // A page table already exists here: fill it rather than orphan it.
                    let pt = mem.table(HostPhysAddr(entry & ADDR_MASK));
                    for (i, e) in pt.iter_mut().enumerate() {
                        *e = leaf(pa + i as u64 * PAGE_SIZE, false);
                    }
                } else {
                    mem.table(pd)[idx] = leaf(pa, true);
                }
                off += LARGE_PAGE_SIZE;
            } else {
                let pt = self.pt(fmt, mem, va)?;
                mem.table(pt)[index(va, 0)] = leaf(pa, false);
                off += PAGE_SIZE;
            }
        }
        Ok(())
    }

    /// The leaf entry for `addr` and whether it is a 2 MiB page.
    fn lookup(&self, fmt: Format, mem: &mut impl TableMemory, addr: u64) -> Option<(u64, bool)> {
        let mut table = self.root;
        for level in (0..4).rev() {
            let entry = mem.table(table)[index(addr, level)];
            if !fmt.is_present(entry) {
                return None;
            }
            if level == 0 {
                return Some((entry, false));
            }
            if entry & LARGE != 0 {
                // 2 MiB (level 1) or a foreign 1 GiB page (level 2).
                return (level == 1).then_some((entry, true));
            }
            table = HostPhysAddr(entry & ADDR_MASK);
        }
        None
    }

    /// The physical address for `addr`, the leaf entry, and whether it is a 2 MiB page.
    fn translate(
        &self,
        fmt: Format,
        mem: &mut impl TableMemory,
        addr: u64,
    ) -> Option<(u64, u64, bool)> {
        let (entry, large) = self.lookup(fmt, mem, addr)?;
        let page = if large { LARGE_PAGE_SIZE } else { PAGE_SIZE };
        let base = entry & ADDR_MASK & !(page - 1);
        Some((base + (addr & (page - 1)), entry, large))
    }
}

fn check_common(
    what: &'static str,
    addr: u64,
    phys: u64,
    len: u64,
    max_last: u64,
) -> Result<(), PagingError> {
    for (name, v) in [(what, addr), ("physical address", phys), ("length", len)] {
        if v % PAGE_SIZE != 0 {
            return Err(PagingError::Unaligned {
                what: name,
                value: v,
            });
        }
    }
    if len == 0 {
        return Err(PagingError::ZeroLength);
    }
    // Compare last bytes, so that a range ending exactly at 2^64 is representable.
    if addr.checked_add(len - 1).is_none_or(|last| last > max_last) {
        return Err(PagingError::OutOfRange {
            what,
            start: addr,
            len,
        });
    }
    if phys
        .checked_add(len - 1)
        .is_none_or(|last| last > MAX_PHYS - 1)
    {
        return Err(PagingError::OutOfRange {
            what: "physical address",
            start: phys,
            len,
        });
    }
    Ok(())
}

/// Cacheability of a host mapping, through the PWT/PCD bits with the power-on PAT
/// (SDM Vol. 3A 13.12.4, Table 13-12: PAT0=WB, PAT1=WT, PAT2=UC-, PAT3=UC). Ally does
/// not reprogram IA32_PAT.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum HostCache {
    #[default]
    WriteBack,
    WriteThrough,
    /// UC-: uncached, but MTRR WC may still combine.
    UncachedMinus,
    /// Strong UC, for device registers.
    Uncached,
}

impl HostCache {
    /// PWT (bit 3) and PCD (bit 4).
    const fn bits(self) -> u64 {
        match self {
            HostCache::WriteBack => 0,
            HostCache::WriteThrough => 1 << 3,
            HostCache::UncachedMinus => 1 << 4,
            HostCache::Uncached => (1 << 3) | (1 << 4),
        }
    }

    const fn from_bits(entry: u64) -> Self {
        match (entry >> 3) & 0b11 {
            0 => HostCache::WriteBack,
            1 => HostCache::WriteThrough,
            2 => HostCache::UncachedMinus,
            _ => HostCache::Uncached,
        }
    }
}

/// Attributes of a host mapping.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct HostPageFlags {
    pub writable: bool,
    /// Sets XD (bit 63); the caller must have enabled IA32_EFER.NXE.
    pub no_execute: bool,
    pub cache: HostCache,
}

const HOST_NX: u64 = 1 << 63;

impl HostPageFlags {
    /// Writable, not executable, write-back: Ally's data, stacks, heap.
    pub const KERNEL_DATA: HostPageFlags = HostPageFlags {
        writable: true,
        no_execute: true,
        cache: HostCache::WriteBack,
    };
    /// Writable and executable, write-back (an image mapped as one span).
    pub const KERNEL_CODE_DATA: HostPageFlags = HostPageFlags {
        writable: true,
        no_execute: false,
        cache: HostCache::WriteBack,
    };
    /// Read-only and executable, write-back: Ally's code.
    pub const KERNEL_CODE: HostPageFlags = HostPageFlags {
        writable: false,
        no_execute: false,
        cache: HostCache::WriteBack,
    };
    /// Writable, not executable, strong UC: device registers.
    pub const MMIO: HostPageFlags = HostPageFlags {
        writable: true,
        no_execute: true,
        cache: HostCache::Uncached,
    };

    fn leaf(self, phys: u64, large: bool) -> u64 {
        let mut e = phys | 1 | self.cache.bits();
        if self.writable {
            e |= 1 << 1;
        }
        if self.no_execute {
            e |= HOST_NX;
        }
        if large {
            e |= LARGE;
        }
        e
    }

    fn from_entry(e: u64) -> Self {
        Self {
            writable: e & (1 << 1) != 0,
            no_execute: e & HOST_NX != 0,
            cache: HostCache::from_bits(e),
        }
    }
}

/// Ally's own IA-32e 4-level page tables (SDM Vol. 3A 4.5).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HostPageTables {
    tables: Tables,
}

impl HostPageTables {
    /// Allocates an empty PML4.
    pub fn new(alloc: &mut impl FrameAllocator) -> Result<Self, PagingError> {
        Ok(Self {
            tables: Tables::new(alloc)?,
        })
    }

    /// The PML4's frame, for CR3 (PCID 0, PWT/PCD clear).
    pub fn root(&self) -> HostPhysAddr {
        self.tables.root
    }

    /// Maps `[virt, virt+len)` to `[phys, phys+len)`, replacing earlier mappings there.
    /// All three must be 4 KiB multiples and the virtual range canonical.
    pub fn map<M: TableMemory + FrameAllocator>(
        &mut self,
        virt: u64,
        phys: HostPhysAddr,
        len: u64,
        flags: HostPageFlags,
        mem: &mut M,
    ) -> Result<(), PagingError> {
        // Any 64-bit range; canonicality is checked below.
        check_common("virtual address", virt, phys.0, len, u64::MAX)?;
        // Canonical: bits 63:47 all equal, for the first and the last byte alike.
        let canonical = |v: u64| ((v as i64) << 16 >> 16) as u64 == v;
        let last = virt + (len - 1);
        if !canonical(virt) || !canonical(last) || (virt >> 47) != (last >> 47) {
            return Err(PagingError::NonCanonical { virt, len });
        }
        self.tables
            .map(Format::Host, mem, virt, phys.0, len, |pa, large| {
                flags.leaf(pa, large)
            })
    }

    /// The physical address and attributes `virt` maps to.
    pub fn translate(
        &self,
        virt: u64,
        mem: &mut impl TableMemory,
    ) -> Option<(HostPhysAddr, HostPageFlags)> {
        let (pa, entry, _) = self.tables.translate(Format::Host, mem, virt)?;
        Some((HostPhysAddr(pa), HostPageFlags::from_entry(entry)))
    }
}

/// EPT access rights of a mapping.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct EptPermissions {
    pub read: bool,
    pub write: bool,
    pub execute: bool,
}

impl EptPermissions {
    /// Read, write and execute.
    pub const ALL: EptPermissions = EptPermissions {
        read: true,
        write: true,
        execute: true,
    };
    pub const RWX: EptPermissions = EptPermissions {
        read: true,
        write: true,
        execute: true,
    };
    pub const RW: EptPermissions = EptPermissions {
        read: true,
        write: true,
        execute: false,
    };
    pub const R: EptPermissions = EptPermissions {
        read: true,
        write: false,
        execute: false,
    };

    const fn bits(self) -> u64 {
        (self.read as u64) | ((self.write as u64) << 1) | ((self.execute as u64) << 2)
    }

    const fn from_bits(e: u64) -> Self {
        Self {
            read: e & 1 != 0,
            write: e & 2 != 0,
            execute: e & 4 != 0,
        }
    }
}

impl fmt::Display for EptPermissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |b, ch| if b { ch } else { '-' };
        write!(
            f,
            "{}{}{}",
            c(self.read, 'r'),
            c(self.write, 'w'),
            c(self.execute, 'x')
        )
    }
}

/// What a guest-physical address maps to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EptTranslation {
    pub hpa: HostPhysAddr,
    pub perms: EptPermissions,
    pub memtype: MemoryType,
    /// Mapped by a 2 MiB page.
    pub large: bool,
}

/// What [`Ept::map_identity`] built.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct IdentityMapStats {
    pub large_pages: u64,
    pub small_pages: u64,
    /// 4 KiB pages left unmapped because they lie in a hidden range.
    pub hidden_pages: u64,
}

/// The guest's EPT (SDM Vol. 3C 28.3.2, Tables 28-1..28-6).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Ept {
    tables: Tables,
}

impl Ept {
    /// Allocates an empty EPT PML4.
    pub fn new(alloc: &mut impl FrameAllocator) -> Result<Self, PagingError> {
        Ok(Self {
            tables: Tables::new(alloc)?,
        })
    }

    /// The EPT PML4's frame.
    pub fn root(&self) -> HostPhysAddr {
        self.tables.root
    }

    /// The EPT pointer for the VMCS (SDM Vol. 3C 24.6.11, "Extended-Page-Table Pointer"):
    /// bits 2:0 = 6 (write-back paging-structure accesses), bits 5:3 = 3 (page-walk length
    /// 4, minus 1), bit 6 = 0 (no accessed/dirty flags), bits 51:12 = the PML4.
    pub fn eptp(&self) -> u64 {
        self.tables.root.0 | MemoryType::WriteBack as u64 | (3 << 3)
    }

    /// Maps `[gpa, gpa+len)` to `[hpa, hpa+len)`, replacing earlier mappings there.
    /// Leaf entries carry `memtype` in bits 5:3 with "ignore PAT" (bit 6) clear, so the
    /// guest's PAT still combines with it. Write-without-read is refused (an EPT
    /// misconfiguration, SDM 28.3.3.1), as are no permissions at all (use
    /// [`Ept::unmap_page`]). Execute-only needs the CPU's execute-only capability
    /// (IA32_VMX_EPT_VPID_CAP bit 0), which the caller checks.
    pub fn map<M: TableMemory + FrameAllocator>(
        &mut self,
        gpa: GuestPhysAddr,
        hpa: HostPhysAddr,
        len: u64,
        perms: EptPermissions,
        memtype: MemoryType,
        mem: &mut M,
    ) -> Result<(), PagingError> {
        check_common(
            "guest-physical address",
            gpa.0,
            hpa.0,
            len,
            MAX_GUEST_PHYS - 1,
        )?;
        if perms.bits() == 0 || (perms.write && !perms.read) {
            return Err(PagingError::BadPermissions { perms });
        }
        let attrs = perms.bits() | (u64::from(memtype.to_raw()) << 3);
        self.tables
            .map(Format::Ept, mem, gpa.0, hpa.0, len, |pa, large| {
                pa | attrs | if large { LARGE } else { 0 }
            })
    }

    /// Removes the 4 KiB page at `gpa` (rounded down), first splitting the 2 MiB page that
    /// holds it into 512 4 KiB entries. The caller must INVEPT afterwards.
    pub fn unmap_page<M: TableMemory + FrameAllocator>(
        &mut self,
        gpa: GuestPhysAddr,
        mem: &mut M,
    ) -> Result<(), PagingError> {
        self.tables.unmap_page(Format::Ept, gpa, mem)
    }

    /// Identity-maps guest-physical `[0, limit)` except the `hidden` ranges, which stay
    /// unmapped. Each 2 MiB page that touches no hidden range and for which
    /// `memtype_of` returns a type (e.g. [`crate::mtrr::MtrrState::memory_type`]) becomes
    /// one large page; the others are mapped page by page, a 4 KiB page with no single
    /// type getting UC. `limit` must be 4 KiB-aligned. Returns the page counts for the log.
    pub fn map_identity<M: TableMemory + FrameAllocator>(
        &mut self,
        limit: u64,
        hidden: &[PhysRange],
        perms: EptPermissions,
        memtype_of: impl Fn(PhysRange) -> Option<MemoryType>,
        mem: &mut M,
    ) -> Result<IdentityMapStats, PagingError> {
        identity_map(limit, hidden, memtype_of, |at, len, t| {
            self.map(GuestPhysAddr(at), HostPhysAddr(at), len, perms, t, mem)
        })
    }

    /// What `gpa` maps to, or `None` when unmapped.
    pub fn translate(
        &self,
        gpa: GuestPhysAddr,
        mem: &mut impl TableMemory,
    ) -> Option<EptTranslation> {
        if gpa.0 >= MAX_GUEST_PHYS {
            return None;
        }
        let (hpa, entry, large) = self.tables.translate(Format::Ept, mem, gpa.0)?;
        Some(EptTranslation {
            hpa: HostPhysAddr(hpa),
            perms: EptPermissions::from_bits(entry),
            // Leaf entries are only written by `map` with a valid type.
            memtype: MemoryType::from_raw(((entry >> 3) & 0b111) as u8)
                .unwrap_or(MemoryType::Uncacheable),
            large,
        })
    }
}

/// The identity map of guest-physical `[0, limit)` both [`Ept::map_identity`] and
/// [`Npt::map_identity`] build, through `map(address, length, type)`.
fn identity_map(
    limit: u64,
    hidden: &[PhysRange],
    memtype_of: impl Fn(PhysRange) -> Option<MemoryType>,
    mut map: impl FnMut(u64, u64, MemoryType) -> Result<(), PagingError>,
) -> Result<IdentityMapStats, PagingError> {
    if !limit.is_multiple_of(PAGE_SIZE) {
        return Err(PagingError::Unaligned {
            what: "identity-map limit",
            value: limit,
        });
    }
    if limit > MAX_GUEST_PHYS {
        return Err(PagingError::OutOfRange {
            what: "guest-physical address",
            start: 0,
            len: limit,
        });
    }
    let mut stats = IdentityMapStats::default();
    let hides = |r: &PhysRange| hidden.iter().any(|h| h.overlaps(r));
    let mut at = 0;
    while at < limit {
        let large = PhysRange {
            start: at,
            end: (at + LARGE_PAGE_SIZE).min(limit),
        };
        let whole = large.len() == LARGE_PAGE_SIZE && !hides(&large);
        if let Some(t) = memtype_of(large).filter(|_| whole) {
            map(at, LARGE_PAGE_SIZE, t)?;
            stats.large_pages += 1;
        } else {
            for page in (large.start..large.end).step_by(PAGE_SIZE as usize) {
                let small = PhysRange {
                    start: page,
                    end: page + PAGE_SIZE,
                };
                if hides(&small) {
                    stats.hidden_pages += 1;
                    continue;
                }
                map(
                    page,
                    PAGE_SIZE,
                    memtype_of(small).unwrap_or(MemoryType::Uncacheable),
                )?;
                stats.small_pages += 1;
            }
        }
        at = large.end;
    }
    Ok(stats)
}

/// Nested-page-table entry bits (IA-32e format, SDM Vol. 3A 4.5 / APM Vol. 2 5.3-5.4).
const NPT_PRESENT: u64 = 1 << 0;
const NPT_WRITABLE: u64 = 1 << 1;
/// U/S: required in every nested entry, table and leaf, since nested walks are user
/// accesses (APM Vol. 2 15.25.5); a supervisor-only entry faults (#NPF with U set).
const NPT_USER: u64 = 1 << 2;
const NPT_PWT: u64 = 1 << 3;
const NPT_PCD: u64 = 1 << 4;

/// The PWT/PCD bits for `memtype` in a nested leaf. The nested entry's PAT index selects an
/// entry of the host's PAT (APM 15.25.8), which Ally leaves at its power-on value (PAT0 WB,
/// PAT1 WT, PAT2 UC-, PAT3 UC), so: UC -> PCD|PWT (PAT3), WT -> PWT (PAT1), everything
/// else -> WB (PAT0). Unlike an EPT memory type, the nested type is *combined* with the
/// host's MTRRs (and the guest's PAT), not substituted for them, so WB lets the MTRR type
/// (WC, WP, UC...) through; WC and WP ranges therefore get WB here and take their type from
/// the firmware's MTRRs.
const fn npt_cache_bits(memtype: MemoryType) -> u64 {
    match memtype {
        MemoryType::Uncacheable => NPT_PCD | NPT_PWT,
        MemoryType::WriteThrough => NPT_PWT,
        MemoryType::WriteBack | MemoryType::WriteCombining | MemoryType::WriteProtected => 0,
    }
}

/// What a guest-physical address maps to in the nested page tables.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct NptTranslation {
    pub hpa: HostPhysAddr,
    pub writable: bool,
    /// The PWT/PCD choice of the leaf ([`HostCache`], read against the power-on PAT).
    pub cache: HostCache,
    /// Mapped by a 2 MiB page.
    pub large: bool,
}

/// The guest's nested page tables under AMD SVM (APM Vol. 2 15.25): 4-level IA-32e tables
/// walked with the host's paging rules, every entry P, U/S and (for tables) R/W, reached
/// through the VMCB's N_CR3.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Npt {
    tables: Tables,
}

impl Npt {
    /// Allocates an empty nested PML4.
    pub fn new(alloc: &mut impl FrameAllocator) -> Result<Self, PagingError> {
        Ok(Self {
            tables: Tables::new(alloc)?,
        })
    }

    /// The nested PML4's frame.
    pub fn root(&self) -> HostPhysAddr {
        self.tables.root
    }

    /// The VMCB's N_CR3 (APM 15.25.4: a CR3 value for the nested walk): the PML4's address
    /// with PWT and PCD clear, i.e. write-back table accesses.
    pub fn ncr3(&self) -> u64 {
        self.tables.root.0
    }

    /// Maps `[gpa, gpa+len)` to `[hpa, hpa+len)`, replacing earlier mappings there; readable
    /// and executable, writable when `writable`, with the PWT/PCD bits for `memtype`
    /// (see [`npt_cache_bits`]: UC and WT are expressed, the other types are left to the
    /// MTRRs).
    pub fn map<M: TableMemory + FrameAllocator>(
        &mut self,
        gpa: GuestPhysAddr,
        hpa: HostPhysAddr,
        len: u64,
        writable: bool,
        memtype: MemoryType,
        mem: &mut M,
    ) -> Result<(), PagingError> {
        check_common(
            "guest-physical address",
            gpa.0,
            hpa.0,
            len,
            MAX_GUEST_PHYS - 1,
        )?;
        let mut attrs = NPT_PRESENT | NPT_USER | npt_cache_bits(memtype);
        if writable {
            attrs |= NPT_WRITABLE;
        }
        self.tables
            .map(Format::Npt, mem, gpa.0, hpa.0, len, |pa, large| {
                pa | attrs | if large { LARGE } else { 0 }
            })
    }

    /// Removes the 4 KiB page at `gpa` (rounded down), first splitting the 2 MiB page that
    /// holds it. The caller must flush the guest's TLB entries afterwards (VMCB TLB_CONTROL).
    pub fn unmap_page<M: TableMemory + FrameAllocator>(
        &mut self,
        gpa: GuestPhysAddr,
        mem: &mut M,
    ) -> Result<(), PagingError> {
        self.tables.unmap_page(Format::Npt, gpa, mem)
    }

    /// Identity-maps guest-physical `[0, limit)`, writable, except the `hidden` ranges, as
    /// [`Ept::map_identity`] does.
    pub fn map_identity<M: TableMemory + FrameAllocator>(
        &mut self,
        limit: u64,
        hidden: &[PhysRange],
        memtype_of: impl Fn(PhysRange) -> Option<MemoryType>,
        mem: &mut M,
    ) -> Result<IdentityMapStats, PagingError> {
        identity_map(limit, hidden, memtype_of, |at, len, t| {
            self.map(GuestPhysAddr(at), HostPhysAddr(at), len, true, t, mem)
        })
    }

    /// What `gpa` maps to, or `None` when unmapped.
    pub fn translate(
        &self,
        gpa: GuestPhysAddr,
        mem: &mut impl TableMemory,
    ) -> Option<NptTranslation> {
        if gpa.0 >= MAX_GUEST_PHYS {
            return None;
        }
        let (hpa, entry, large) = self.tables.translate(Format::Npt, mem, gpa.0)?;
        Some(NptTranslation {
            hpa: HostPhysAddr(hpa),
            writable: entry & NPT_WRITABLE != 0,
            cache: HostCache::from_bits(entry),
            large,
        })
    }
}

/// The guest's nested paging, whichever the CPU has: Intel's EPT or AMD's nested page
/// tables. Start-up and the BAR-move path edit it without caring which.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum GuestPaging {
    Ept(Ept),
    Npt(Npt),
}

impl GuestPaging {
    /// What the VMCS (EPTP) or the VMCB (N_CR3) points at.
    pub fn root_pointer(&self) -> u64 {
        match self {
            GuestPaging::Ept(ept) => ept.eptp(),
            GuestPaging::Npt(npt) => npt.ncr3(),
        }
    }

    /// Maps `[gpa, gpa+len)` to `[hpa, hpa+len)` readable and writable, executable when
    /// `execute` (NPT has no execute-only or non-executable choice per entry here: its leaves
    /// are always executable), with `memtype`.
    pub fn map<M: TableMemory + FrameAllocator>(
        &mut self,
        gpa: GuestPhysAddr,
        hpa: HostPhysAddr,
        len: u64,
        execute: bool,
        memtype: MemoryType,
        mem: &mut M,
    ) -> Result<(), PagingError> {
        match self {
            GuestPaging::Ept(ept) => ept.map(
                gpa,
                hpa,
                len,
                EptPermissions {
                    read: true,
                    write: true,
                    execute,
                },
                memtype,
                mem,
            ),
            GuestPaging::Npt(npt) => npt.map(gpa, hpa, len, true, memtype, mem),
        }
    }

    /// Maps `[gpa, gpa+len)` to `[hpa, hpa+len)` readable only (not executable under EPT):
    /// reads reach the hardware, every write faults to Ally.
    pub fn map_read_only<M: TableMemory + FrameAllocator>(
        &mut self,
        gpa: GuestPhysAddr,
        hpa: HostPhysAddr,
        len: u64,
        memtype: MemoryType,
        mem: &mut M,
    ) -> Result<(), PagingError> {
        match self {
            GuestPaging::Ept(ept) => ept.map(
                gpa,
                hpa,
                len,
                EptPermissions {
                    read: true,
                    write: false,
                    execute: false,
                },
                memtype,
                mem,
            ),
            GuestPaging::Npt(npt) => npt.map(gpa, hpa, len, false, memtype, mem),
        }
    }

    /// Removes the 4 KiB page at `gpa`; the caller flushes the guest's translations.
    pub fn unmap_page<M: TableMemory + FrameAllocator>(
        &mut self,
        gpa: GuestPhysAddr,
        mem: &mut M,
    ) -> Result<(), PagingError> {
        match self {
            GuestPaging::Ept(ept) => ept.unmap_page(gpa, mem),
            GuestPaging::Npt(npt) => npt.unmap_page(gpa, mem),
        }
    }

    /// The host-physical address `gpa` maps to, or `None` when it is absent.
    pub fn translate(
        &self,
        gpa: GuestPhysAddr,
        mem: &mut impl TableMemory,
    ) -> Option<HostPhysAddr> {
        match self {
            GuestPaging::Ept(ept) => ept.translate(gpa, mem).map(|t| t.hpa),
            GuestPaging::Npt(npt) => npt.translate(gpa, mem).map(|t| t.hpa),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const MIB: u64 = 1 << 20;

    /// Frames numbered from 0x1000_0000, at most `limit` of them.
    struct FakeMem {
        frames: HashMap<u64, Box<[u64; ENTRIES]>>,
        next: u64,
        limit: usize,
    }

    impl FakeMem {
        fn new(limit: usize) -> Self {
            Self {
                frames: HashMap::new(),
                next: 0x1000_0000,
                limit,
            }
        }
    }

    impl FrameAllocator for FakeMem {
        fn allocate_zeroed_frame(&mut self) -> Option<HostPhysAddr> {
            if self.frames.len() >= self.limit {
                return None;
            }
            let f = self.next;
            self.next += PAGE_SIZE;
            self.frames.insert(f, Box::new([0; ENTRIES]));
            Some(HostPhysAddr(f))
        }
    }

    impl TableMemory for FakeMem {
        fn table(&mut self, frame: HostPhysAddr) -> &mut [u64; ENTRIES] {
            self.frames.get_mut(&frame.0).expect("not a table frame")
        }
    }

    fn gpa(a: u64) -> GuestPhysAddr {
        GuestPhysAddr(a)
    }
    fn hpa(a: u64) -> HostPhysAddr {
        HostPhysAddr(a)
    }

    #[test]
    fn ept_identity_map_uses_large_pages() {
        let mut m = FakeMem::new(100);
        let mut ept = Ept::new(&mut m).unwrap();
        ept.map(
            gpa(0),
            hpa(0),
            1 << 30,
            EptPermissions::RWX,
            MemoryType::WriteBack,
            &mut m,
        )
        .unwrap();
        // PML4 + PDPT + PD: 512 large entries, no PTs.
        assert_eq!(m.frames.len(), 3);
        let t = ept.translate(gpa(0x1234_5678), &mut m).unwrap();
        assert_eq!(
            t,
            EptTranslation {
                hpa: hpa(0x1234_5678),
                perms: EptPermissions::RWX,
                memtype: MemoryType::WriteBack,
                large: true
            }
        );
        assert_eq!(ept.translate(gpa(1 << 30), &mut m), None);
        // The raw leaf: RWX | WB << 3 | PS, ignore-PAT clear.
        let pdpt = m.table(ept.root())[0] & ADDR_MASK;
        let pd = m.table(hpa(pdpt))[0] & ADDR_MASK;
        assert_eq!(
            m.table(hpa(pd))[9],
            (9 * 2 * MIB) | 0b111 | (6 << 3) | (1 << 7)
        );
        assert_eq!(m.table(ept.root())[0] & 0xFFF, 0b111);
    }

    #[test]
    fn ept_unaligned_ranges_use_4k_pages() {
        let mut m = FakeMem::new(100);
        let mut ept = Ept::new(&mut m).unwrap();
        // 1 MiB .. 5 MiB + 8 KiB to a host range offset by 64 MiB.
        let len = 4 * MIB + 0x2000;
        ept.map(
            gpa(MIB),
            hpa(65 * MIB),
            len,
            EptPermissions::RW,
            MemoryType::Uncacheable,
            &mut m,
        )
        .unwrap();
        for a in (MIB..MIB + len).step_by(0x1000) {
            let t = ept.translate(gpa(a + 0x10), &mut m).unwrap();
            assert_eq!(t.hpa, hpa(a + 64 * MIB + 0x10));
            assert_eq!(t.perms, EptPermissions::RW);
            assert_eq!(t.memtype, MemoryType::Uncacheable);
            // 2 MiB .. 4 MiB is aligned on both sides: one large page.
            assert_eq!(t.large, (2 * MIB..4 * MIB).contains(&a));
        }
        assert_eq!(ept.translate(gpa(MIB - 1), &mut m), None);
        assert_eq!(ept.translate(gpa(MIB + len), &mut m), None);
        // Host range misaligned with respect to 2 MiB: 4 KiB pages throughout.
        ept.map(
            gpa(64 * MIB),
            hpa(0x1000),
            2 * MIB,
            EptPermissions::R,
            MemoryType::WriteBack,
            &mut m,
        )
        .unwrap();
        assert!(!ept.translate(gpa(64 * MIB), &mut m).unwrap().large);
    }

    #[test]
    fn ept_unmap_splits_large_page() {
        let mut m = FakeMem::new(100);
        let mut ept = Ept::new(&mut m).unwrap();
        ept.map(
            gpa(0),
            hpa(0),
            8 * MIB,
            EptPermissions::RWX,
            MemoryType::WriteBack,
            &mut m,
        )
        .unwrap();
        let frames = m.frames.len();
        ept.unmap_page(gpa(0x30_5123), &mut m).unwrap();
        assert_eq!(m.frames.len(), frames + 1, "one PT for the split");
        assert_eq!(ept.translate(gpa(0x30_5000), &mut m), None);
        // The other 511 pages of that 2 MiB page keep their mapping and attributes.
        for a in (2 * MIB..4 * MIB)
            .step_by(0x1000)
            .filter(|&a| a != 0x30_5000)
        {
            let t = ept.translate(gpa(a), &mut m).unwrap();
            assert_eq!(t.hpa, hpa(a));
            assert_eq!(t.perms, EptPermissions::RWX);
            assert_eq!(t.memtype, MemoryType::WriteBack);
            assert!(!t.large);
        }
        // Neighbouring 2 MiB pages are untouched.
        assert!(ept.translate(gpa(4 * MIB), &mut m).unwrap().large);
        // Unmapping again, or unmapping what was never mapped, is an error.
        assert_eq!(
            ept.unmap_page(gpa(0x30_5000), &mut m),
            Err(PagingError::NotMapped { addr: 0x30_5000 })
        );
        assert_eq!(
            ept.unmap_page(gpa(1 << 40), &mut m),
            Err(PagingError::NotMapped { addr: 1 << 40 })
        );
        assert!(ept.unmap_page(gpa(u64::MAX), &mut m).is_err());
        // Mapping the hole again restores it as a 4 KiB page.
        ept.map(
            gpa(0x30_5000),
            hpa(0x30_5000),
            0x1000,
            EptPermissions::R,
            MemoryType::Uncacheable,
            &mut m,
        )
        .unwrap();
        let t = ept.translate(gpa(0x30_5000), &mut m).unwrap();
        assert_eq!(
            (t.perms, t.memtype),
            (EptPermissions::R, MemoryType::Uncacheable)
        );
    }

    #[test]
    fn ept_remap_large_over_existing_pt() {
        let mut m = FakeMem::new(100);
        let mut ept = Ept::new(&mut m).unwrap();
        ept.map(
            gpa(0),
            hpa(0),
            0x1000,
            EptPermissions::R,
            MemoryType::WriteBack,
            &mut m,
        )
        .unwrap();
        let frames = m.frames.len();
        ept.map(
            gpa(0),
            hpa(0x4000_0000),
            2 * MIB,
            EptPermissions::RWX,
            MemoryType::WriteBack,
            &mut m,
        )
        .unwrap();
        assert_eq!(
            m.frames.len(),
            frames,
            "existing PT reused, nothing allocated"
        );
        let t = ept.translate(gpa(0x1F_F000), &mut m).unwrap();
        assert_eq!(t.hpa, hpa(0x401F_F000));
        assert_eq!(t.perms, EptPermissions::RWX);
    }

    #[test]
    fn out_of_frames_is_an_error() {
        let mut m = FakeMem::new(0);
        assert_eq!(Ept::new(&mut m), Err(PagingError::OutOfFrames));
        let mut m = FakeMem::new(3);
        let mut ept = Ept::new(&mut m).unwrap();
        ept.map(
            gpa(0),
            hpa(0),
            4 * MIB,
            EptPermissions::RWX,
            MemoryType::WriteBack,
            &mut m,
        )
        .unwrap();
        // Splitting needs a 4th frame.
        assert_eq!(
            ept.unmap_page(gpa(0x1000), &mut m),
            Err(PagingError::OutOfFrames)
        );
        // Nothing changed: still a large mapping.
        assert!(ept.translate(gpa(0x1000), &mut m).unwrap().large);
        // A 4 KiB map elsewhere needs new tables too.
        assert_eq!(
            ept.map(
                gpa(1 << 40),
                hpa(0),
                0x1000,
                EptPermissions::R,
                MemoryType::WriteBack,
                &mut m
            ),
            Err(PagingError::OutOfFrames)
        );
        let mut m = FakeMem::new(1);
        let mut host = HostPageTables::new(&mut m).unwrap();
        assert_eq!(
            host.map(0, hpa(0), 0x1000, HostPageFlags::default(), &mut m),
            Err(PagingError::OutOfFrames)
        );
    }

    #[test]
    fn ept_argument_checks() {
        let mut m = FakeMem::new(10);
        let mut ept = Ept::new(&mut m).unwrap();
        let wb = MemoryType::WriteBack;
        assert_eq!(
            ept.map(gpa(0x800), hpa(0), 0x1000, EptPermissions::R, wb, &mut m),
            Err(PagingError::Unaligned {
                what: "guest-physical address",
                value: 0x800
            })
        );
        assert!(matches!(
            ept.map(gpa(0), hpa(0x10), 0x1000, EptPermissions::R, wb, &mut m),
            Err(PagingError::Unaligned { .. })
        ));
        assert!(matches!(
            ept.map(gpa(0), hpa(0), 0x1001, EptPermissions::R, wb, &mut m),
            Err(PagingError::Unaligned { .. })
        ));
        assert_eq!(
            ept.map(gpa(0), hpa(0), 0, EptPermissions::R, wb, &mut m),
            Err(PagingError::ZeroLength)
        );
        assert!(matches!(
            ept.map(
                gpa(MAX_GUEST_PHYS - 0x1000),
                hpa(0),
                0x2000,
                EptPermissions::R,
                wb,
                &mut m
            ),
            Err(PagingError::OutOfRange { .. })
        ));
        assert!(matches!(
            ept.map(
                gpa(0),
                hpa(MAX_PHYS - 0x1000),
                0x2000,
                EptPermissions::R,
                wb,
                &mut m
            ),
            Err(PagingError::OutOfRange { .. })
        ));
        let w_only = EptPermissions {
            read: false,
            write: true,
            execute: false,
        };
        assert_eq!(
            ept.map(gpa(0), hpa(0), 0x1000, w_only, wb, &mut m),
            Err(PagingError::BadPermissions { perms: w_only })
        );
        assert!(ept
            .map(
                gpa(0),
                hpa(0),
                0x1000,
                EptPermissions::default(),
                wb,
                &mut m
            )
            .is_err());
        assert_eq!(
            PagingError::BadPermissions { perms: w_only }.to_string(),
            "EPT permissions -w- are invalid (write requires read; use unmap for none)"
        );
        assert_eq!(m.frames.len(), 1, "rejected calls allocate nothing");
    }

    #[test]
    fn eptp_encoding() {
        let mut m = FakeMem::new(1);
        let ept = Ept::new(&mut m).unwrap();
        assert_eq!(ept.eptp(), 0x1000_0000 | 0x1E);
    }

    #[test]
    fn memory_type_encodings() {
        for raw in 0..=255u8 {
            match MemoryType::from_raw(raw) {
                Some(t) => assert_eq!(t.to_raw(), raw),
                None => assert!(matches!(raw, 2 | 3 | 7..)),
            }
        }
        assert_eq!(MemoryType::WriteBack.to_string(), "WB");
    }

    #[test]
    fn host_map_and_translate() {
        let mut m = FakeMem::new(100);
        let mut host = HostPageTables::new(&mut m).unwrap();
        let rw_nx = HostPageFlags {
            writable: true,
            no_execute: true,
            cache: HostCache::WriteBack,
        };
        // Higher-half kernel mapping: 6 MiB at 0xffff_8000_0000_0000 -> 16 MiB.
        let base = 0xFFFF_8000_0000_0000;
        host.map(base, hpa(16 * MIB), 6 * MIB, rw_nx, &mut m)
            .unwrap();
        assert_eq!(
            host.translate(base + 0x12345, &mut m),
            Some((hpa(16 * MIB + 0x12345), rw_nx))
        );
        assert_eq!(
            host.translate(base + 5 * MIB, &mut m),
            Some((hpa(21 * MIB), rw_nx))
        );
        assert_eq!(host.translate(base + 6 * MIB, &mut m), None);
        // Uncached MMIO page, read-only, executable.
        let mmio = HostPageFlags {
            writable: false,
            no_execute: false,
            cache: HostCache::Uncached,
        };
        host.map(0xFEBC_0000, hpa(0xFEBC_0000), 0x2_0000, mmio, &mut m)
            .unwrap();
        assert_eq!(
            host.translate(0xFEBC_1FFF, &mut m),
            Some((hpa(0xFEBC_1FFF), mmio))
        );
        // Raw leaf bits: P | PWT | PCD, no R/W, no NX.
        let (entry, large) = host
            .tables
            .lookup(Format::Host, &mut m, 0xFEBC_0000)
            .unwrap();
        assert!(!large);
        assert_eq!(entry & 0xFFF, 0b1_1001);
        let (entry, large) = host.tables.lookup(Format::Host, &mut m, base).unwrap();
        assert!(large);
        assert_eq!(entry, (16 * MIB) | HOST_NX | 0b1000_0011);
        // Intermediate entries: present + writable, supervisor.
        assert_eq!(m.table(host.root())[256] & 0xFFF, 0b11);
    }

    #[test]
    fn host_remap_4k_inside_large_page_splits() {
        let mut m = FakeMem::new(100);
        let mut host = HostPageTables::new(&mut m).unwrap();
        let wt = HostPageFlags {
            writable: true,
            no_execute: false,
            cache: HostCache::WriteThrough,
        };
        host.map(0, hpa(0), 4 * MIB, wt, &mut m).unwrap();
        let guard = HostPageFlags::default(); // read-only
        host.map(0x20_3000, hpa(0x20_3000), 0x1000, guard, &mut m)
            .unwrap();
        assert_eq!(
            host.translate(0x20_3000, &mut m),
            Some((hpa(0x20_3000), guard))
        );
        assert_eq!(
            host.translate(0x20_4000, &mut m),
            Some((hpa(0x20_4000), wt))
        );
        assert_eq!(
            host.translate(0x3F_F000, &mut m),
            Some((hpa(0x3F_F000), wt))
        );
        assert!(host.tables.lookup(Format::Host, &mut m, 0).unwrap().1);
    }

    #[test]
    fn host_split_moves_pat_bit() {
        // A 2 MiB entry with PAT (bit 12) set splits into 4 KiB entries with PAT in bit 7.
        let large = 0x20_0000 | (1 << 12) | LARGE | 0b11;
        let small = Format::Host.split_entry(large, 3);
        assert_eq!(small, 0x20_3000 | LARGE | 0b11);
        assert_eq!(
            Format::Ept.split_entry(0x20_0000 | LARGE | 0x37, 1),
            0x20_1000 | 0x37
        );
    }

    #[test]
    fn host_canonical_checks() {
        let mut m = FakeMem::new(10);
        let mut host = HostPageTables::new(&mut m).unwrap();
        let f = HostPageFlags::default();
        assert_eq!(
            host.map(0x0000_8000_0000_0000, hpa(0), 0x1000, f, &mut m),
            Err(PagingError::NonCanonical {
                virt: 0x0000_8000_0000_0000,
                len: 0x1000
            })
        );
        // Crossing from the lower half into the hole.
        assert!(host
            .map(0x0000_7FFF_FFFF_F000, hpa(0), 0x2000, f, &mut m)
            .is_err());
        assert!(host
            .map(0x0000_7FFF_FFFF_F000, hpa(0), 0x1000, f, &mut m)
            .is_ok());
        assert!(host
            .map(0xFFFF_FFFF_FFFF_F000, hpa(0), 0x1000, f, &mut m)
            .is_ok());
        assert!(matches!(
            host.map(0xFFFF_FFFF_FFFF_F000, hpa(0), 0x2000, f, &mut m),
            Err(PagingError::OutOfRange { .. })
        ));
    }

    #[test]
    fn identity_map_with_hidden_region_and_types() {
        let mut m = FakeMem::new(1000);
        let mut ept = Ept::new(&mut m).unwrap();
        // 64 MiB guest space; Ally hides [33 MiB + 12 KiB, 40 MiB); VGA hole UC; the rest WB.
        let hidden = [PhysRange {
            start: 33 * MIB + 0x3000,
            end: 40 * MIB,
        }];
        let vga = PhysRange {
            start: 0xA_0000,
            end: 0xC_0000,
        };
        let memtype_of = |r: PhysRange| {
            if r.overlaps(&vga) {
                (r.start >= vga.start && r.end <= vga.end).then_some(MemoryType::Uncacheable)
            } else {
                Some(MemoryType::WriteBack)
            }
        };
        let stats = ept
            .map_identity(64 * MIB, &hidden, EptPermissions::ALL, memtype_of, &mut m)
            .unwrap();
        // [0, 2M) and [32M, 34M) are split; [34M, 40M) is hidden entirely.
        assert_eq!(stats.large_pages, 32 - 2 - 3);
        assert_eq!(stats.small_pages, 512 + 256 + 3);
        assert_eq!(stats.hidden_pages, 256 - 3 + 3 * 512);
        let mut t = |a| ept.translate(gpa(a), &mut m);
        assert_eq!(t(0xB_8000).unwrap().memtype, MemoryType::Uncacheable);
        assert_eq!(t(0x9_F000).unwrap().memtype, MemoryType::WriteBack);
        assert!(!t(0x9_F000).unwrap().large);
        assert_eq!(t(33 * MIB + 0x2FFF).unwrap().hpa, hpa(33 * MIB + 0x2FFF));
        assert_eq!(t(33 * MIB + 0x3000), None);
        assert_eq!(t(39 * MIB), None);
        assert!(t(40 * MIB).unwrap().large);
        assert_eq!(t(64 * MIB), None);
        // A limit that is not a 2 MiB multiple ends with 4 KiB pages.
        let mut m = FakeMem::new(100);
        let mut ept = Ept::new(&mut m).unwrap();
        let stats = ept
            .map_identity(
                2 * MIB + 0x5000,
                &[],
                EptPermissions::ALL,
                |_| Some(MemoryType::WriteBack),
                &mut m,
            )
            .unwrap();
        assert_eq!((stats.large_pages, stats.small_pages), (1, 5));
        assert!(ept
            .map_identity(0x1234, &[], EptPermissions::ALL, |_| None, &mut m)
            .is_err());
    }

    /// Random maps and unmaps against a page-granular model.
    #[test]
    fn ept_matches_model() {
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut m = FakeMem::new(10_000);
        let mut ept = Ept::new(&mut m).unwrap();
        // Model over 16 MiB: page -> (hpa, perms).
        let mut model: HashMap<u64, (u64, EptPermissions)> = HashMap::new();
        let perms = [EptPermissions::R, EptPermissions::RW, EptPermissions::RWX];
        for _ in 0..300 {
            let page = next() % 4096;
            if next() % 3 == 0 {
                let r = ept.unmap_page(gpa(page * PAGE_SIZE), &mut m);
                assert_eq!(r.is_ok(), model.remove(&page).is_some());
            } else {
                let npages = 1 + next() % 1100;
                let npages = npages.min(4096 - page);
                // Same 2 MiB phase or not, at random.
                let host_page = if next() % 2 == 0 {
                    page + 8192
                } else {
                    page + 8193
                };
                let p = perms[(next() % 3) as usize];
                ept.map(
                    gpa(page * PAGE_SIZE),
                    hpa(host_page * PAGE_SIZE),
                    npages * PAGE_SIZE,
                    p,
                    MemoryType::WriteBack,
                    &mut m,
                )
                .unwrap();
                for i in 0..npages {
                    model.insert(page + i, ((host_page + i) * PAGE_SIZE, p));
                }
            }
        }
        for page in 0..4096 {
            let got = ept
                .translate(gpa(page * PAGE_SIZE + 7), &mut m)
                .map(|t| (t.hpa.0 - 7, t.perms));
            assert_eq!(got, model.get(&page).copied(), "page {page:#x}");
        }
    }

    /// Every entry on the nested walk of `addr`, root first.
    fn npt_walk(npt: &Npt, m: &mut FakeMem, addr: u64) -> Vec<u64> {
        let mut entries = Vec::new();
        let mut table = npt.root();
        for level in (0..4).rev() {
            let e = m.table(table)[index(addr, level)];
            entries.push(e);
            if e & 1 == 0 || level == 0 || e & LARGE != 0 {
                break;
            }
            table = HostPhysAddr(e & ADDR_MASK);
        }
        entries
    }

    #[test]
    fn npt_identity_map_with_hidden_range() {
        let mut m = FakeMem::new(1000);
        let mut npt = Npt::new(&mut m).unwrap();
        assert_eq!(npt.ncr3(), npt.root().0);
        let hidden = [PhysRange {
            start: 33 * MIB + 0x3000,
            end: 40 * MIB,
        }];
        let vga = PhysRange {
            start: 0xA_0000,
            end: 0xC_0000,
        };
        let memtype_of = |r: PhysRange| {
            if r.overlaps(&vga) {
                (r.start >= vga.start && r.end <= vga.end).then_some(MemoryType::Uncacheable)
            } else {
                Some(MemoryType::WriteBack)
            }
        };
        let stats = npt
            .map_identity(64 * MIB, &hidden, memtype_of, &mut m)
            .unwrap();
        // The same shape as the EPT's (identity_map_with_hidden_region_and_types).
        assert_eq!(stats.large_pages, 32 - 2 - 3);
        assert_eq!(stats.small_pages, 512 + 256 + 3);
        assert_eq!(stats.hidden_pages, 256 - 3 + 3 * 512);
        let mut t = |a| npt.translate(gpa(a), &mut m);
        let vga_page = t(0xB_8123).unwrap();
        assert_eq!(vga_page.hpa, hpa(0xB_8123));
        assert_eq!(vga_page.cache, HostCache::Uncached);
        assert!(vga_page.writable && !vga_page.large);
        assert_eq!(t(0x9_F000).unwrap().cache, HostCache::WriteBack);
        assert_eq!(t(33 * MIB + 0x2FFF).unwrap().hpa, hpa(33 * MIB + 0x2FFF));
        assert_eq!(t(33 * MIB + 0x3000), None);
        assert_eq!(t(39 * MIB), None);
        let big = t(40 * MIB + 0x12_3456).unwrap();
        assert!(big.large);
        assert_eq!(big.hpa, hpa(40 * MIB + 0x12_3456));
        assert_eq!(t(64 * MIB), None);
        assert_eq!(t(1 << 48), None);
        assert!(npt.map_identity(0x1234, &[], |_| None, &mut m).is_err());
        assert!(npt.map_identity(1 << 49, &[], |_| None, &mut m).is_err());
    }

    #[test]
    fn npt_entries_are_user_at_every_level() {
        let mut m = FakeMem::new(100);
        let mut npt = Npt::new(&mut m).unwrap();
        npt.map(
            gpa(0),
            hpa(0x4000_0000),
            4 * MIB,
            true,
            MemoryType::WriteBack,
            &mut m,
        )
        .unwrap();
        npt.map(
            gpa(8 * MIB + 0x5000),
            hpa(0x7000),
            0x1000,
            false,
            MemoryType::WriteThrough,
            &mut m,
        )
        .unwrap();
        // PML4E, PDPTE, PDE (2 MiB leaf): P, R/W, U/S everywhere.
        let walk = npt_walk(&npt, &mut m, MIB);
        assert_eq!(walk.len(), 3);
        for e in &walk {
            assert_eq!(e & 0b111, 0b111, "{e:#x}");
        }
        assert_eq!(walk[2] & LARGE, LARGE);
        // Down to a read-only 4 KiB leaf: tables P|RW|US, the leaf P|US with PWT.
        let walk = npt_walk(&npt, &mut m, 8 * MIB + 0x5000);
        assert_eq!(walk.len(), 4);
        for e in &walk[..3] {
            assert_eq!(e & 0b111, 0b111, "{e:#x}");
            assert_eq!(e & (NPT_PWT | NPT_PCD), 0, "tables are write-back");
        }
        assert_eq!(walk[3], 0x7000 | NPT_PRESENT | NPT_USER | NPT_PWT);
        let t = npt.translate(gpa(8 * MIB + 0x5FFF), &mut m).unwrap();
        assert_eq!(t.hpa, hpa(0x7FFF));
        assert!(!t.writable);
        assert_eq!(t.cache, HostCache::WriteThrough);
        // Argument checks are shared with the EPT.
        assert!(npt
            .map(
                gpa(0x123),
                hpa(0),
                0x1000,
                true,
                MemoryType::WriteBack,
                &mut m
            )
            .is_err());
        assert!(npt
            .map(
                gpa(1 << 48),
                hpa(0),
                0x1000,
                true,
                MemoryType::WriteBack,
                &mut m
            )
            .is_err());
    }

    #[test]
    fn npt_unmap_splits_large_page() {
        let mut m = FakeMem::new(100);
        let mut npt = Npt::new(&mut m).unwrap();
        npt.map(
            gpa(0),
            hpa(0),
            8 * MIB,
            true,
            MemoryType::Uncacheable,
            &mut m,
        )
        .unwrap();
        let frames = m.frames.len();
        npt.unmap_page(gpa(0x30_5123), &mut m).unwrap();
        assert_eq!(m.frames.len(), frames + 1, "one PT for the split");
        assert_eq!(npt.translate(gpa(0x30_5000), &mut m), None);
        for a in (2 * MIB..4 * MIB)
            .step_by(0x1000)
            .filter(|&a| a != 0x30_5000)
        {
            let t = npt.translate(gpa(a), &mut m).unwrap();
            assert_eq!(t.hpa, hpa(a));
            assert!(t.writable && !t.large);
            assert_eq!(t.cache, HostCache::Uncached);
        }
        // The new PT and its leaves keep U/S.
        let walk = npt_walk(&npt, &mut m, 0x30_6000);
        assert_eq!(walk.len(), 4);
        assert!(walk.iter().all(|e| e & NPT_USER != 0));
        assert!(npt.translate(gpa(4 * MIB), &mut m).unwrap().large);
        assert_eq!(
            npt.unmap_page(gpa(0x30_5000), &mut m),
            Err(PagingError::NotMapped { addr: 0x30_5000 })
        );
        assert!(npt.unmap_page(gpa(u64::MAX), &mut m).is_err());
    }

    #[test]
    fn npt_cache_bits_follow_the_power_on_pat() {
        assert_eq!(npt_cache_bits(MemoryType::WriteBack), 0);
        assert_eq!(npt_cache_bits(MemoryType::WriteThrough), NPT_PWT);
        assert_eq!(npt_cache_bits(MemoryType::Uncacheable), NPT_PWT | NPT_PCD);
        // Left to the MTRRs.
        assert_eq!(npt_cache_bits(MemoryType::WriteCombining), 0);
        assert_eq!(npt_cache_bits(MemoryType::WriteProtected), 0);
    }

    #[test]
    fn guest_paging_edits_either_format_alike() {
        for npt in [false, true] {
            let mut mem = FakeMem::new(64);
            let mut paging = if npt {
                GuestPaging::Npt(Npt::new(&mut mem).unwrap())
            } else {
                GuestPaging::Ept(Ept::new(&mut mem).unwrap())
            };
            let root = match paging {
                GuestPaging::Ept(e) => e.eptp() & !0xFFF,
                GuestPaging::Npt(n) => n.ncr3() & !0xFFF,
            };
            assert_eq!(paging.root_pointer() & !0xFFF, root);
            paging
                .map(
                    gpa(0),
                    hpa(0),
                    2 * MIB,
                    true,
                    MemoryType::WriteBack,
                    &mut mem,
                )
                .unwrap();
            assert_eq!(paging.translate(gpa(0x1234), &mut mem), Some(hpa(0x1234)));
            paging.unmap_page(gpa(0x1234), &mut mem).unwrap();
            assert_eq!(paging.translate(gpa(0x1234), &mut mem), None);
            assert_eq!(paging.translate(gpa(0x2234), &mut mem), Some(hpa(0x2234)));
            // Read-only: still translated (the write permission is the builders' to test).
            paging
                .map_read_only(
                    gpa(0x3000),
                    hpa(0x3000),
                    0x1000,
                    MemoryType::Uncacheable,
                    &mut mem,
                )
                .unwrap();
            assert_eq!(paging.translate(gpa(0x3004), &mut mem), Some(hpa(0x3004)));
            // A page moved elsewhere, as a BAR move does.
            paging
                .map(
                    gpa(0x1000),
                    hpa(0xFEB0_1000),
                    0x1000,
                    false,
                    MemoryType::Uncacheable,
                    &mut mem,
                )
                .unwrap();
            assert_eq!(
                paging.translate(gpa(0x1010), &mut mem),
                Some(hpa(0xFEB0_1010))
            );
        }
    }
}
