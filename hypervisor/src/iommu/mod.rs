//! DMA protection (IOMMU), the hardware-independent half: the firmware's description of the
//! remapping hardware (Intel's ACPI DMAR, [`dmar`]; AMD's ACPI IVRS, [`ivrs`]), the in-memory
//! structures each IOMMU reads ([`vtd`], [`amdvi`]) and, here, what a DMA domain may reach.
//!
//! The EPT keeps the guest's CPUs out of Ally's and the DPI partition's memory; a device the
//! guest programs is not bound by the EPT, so without an IOMMU a descriptor address is enough
//! to read or overwrite Ally. [`DmaDomainPlan`] computes the ranges a domain's I/O page tables
//! map, identity (device address = host-physical address, as the EPT is an identity map):
//! the guest's RAM and the firmware's reserved-memory requirements, never a protected byte.
//! The page tables are built through [`crate::paging::TableMemory`] and
//! [`crate::paging::FrameAllocator`], so all of it is tested on the host.

pub mod amd_remap;
pub mod amd_unit;
pub mod amdvi;
pub mod dmar;
pub mod interrupts;
pub mod intremap;
pub mod ivrs;
pub mod remapping;
mod table;
pub mod vtd;
pub mod vtd_remap;

use crate::acpi::{AcpiTable, PhysMemory};
use crate::addr::{HostPhysAddr, PhysRange, PAGE_SIZE};
use crate::cmdline::PciAddress;
use crate::paging::{FrameAllocator, TableMemory};
use core::fmt;

/// A PCI requester ID (bus in bits 15:8, device in 7:3, function in 2:0): VT-d's source-id
/// (VT-d 3.4.1) and AMD-Vi's DeviceID (AMD IOMMU 2.2.1) are both this number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SourceId(pub u16);

impl SourceId {
    /// The requester ID of `bus:device.function`; `device` is taken modulo 32 and
    /// `function` modulo 8.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Self(((bus as u16) << 8) | (((device & 0x1F) as u16) << 3) | (function & 7) as u16)
    }
    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub const fn device(self) -> u8 {
        ((self.0 >> 3) & 0x1F) as u8
    }
    pub const fn function(self) -> u8 {
        (self.0 & 7) as u8
    }
    /// Device and function as one byte (the low half of the requester ID).
    pub const fn devfn(self) -> u8 {
        self.0 as u8
    }
}

/// A PCI function's requester ID.
impl From<PciAddress> for SourceId {
    fn from(a: PciAddress) -> Self {
        SourceId::new(a.bus, a.device, a.function)
    }
}

/// The PCI function a requester ID names.
impl From<SourceId> for PciAddress {
    fn from(id: SourceId) -> Self {
        PciAddress {
            bus: id.bus(),
            device: id.device(),
            function: id.function(),
        }
    }
}

impl fmt::Debug for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SourceId({self})")
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{}",
            self.bus(),
            self.device(),
            self.function()
        )
    }
}

/// How many levels an I/O page table has, which fixes the device address width: VT-d's
/// AGAW (VT-d 3.6, context-entry AW field) and AMD-Vi's DTE Mode field (AMD IOMMU 2.2.3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PagingLevels {
    /// 39-bit device addresses.
    Three,
    /// 48-bit device addresses.
    Four,
}

impl PagingLevels {
    pub const fn count(self) -> u32 {
        match self {
            PagingLevels::Three => 3,
            PagingLevels::Four => 4,
        }
    }
    /// Device-address width in bits (12 + 9 per level).
    pub const fn address_width(self) -> u32 {
        12 + 9 * self.count()
    }
    /// The first device address the tables cannot map.
    pub const fn limit(self) -> u64 {
        1 << self.address_width()
    }
}

/// Large pages the hardware walks. VT-d reports them in CAP.SLLPS (VT-d 11.4.2); AMD-Vi
/// walks a leaf at any level (AMD IOMMU 2.2.3, NextLevel = 0).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PageSizes {
    pub two_mib: bool,
    pub one_gib: bool,
}

impl PageSizes {
    /// 4 KiB pages only.
    pub const SMALL: PageSizes = PageSizes {
        two_mib: false,
        one_gib: false,
    };
    /// 4 KiB, 2 MiB and 1 GiB pages.
    pub const ALL: PageSizes = PageSizes {
        two_mib: true,
        one_gib: true,
    };
}

/// What a device may do through a mapping.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DmaAccess {
    ReadOnly,
    ReadWrite,
}

impl DmaAccess {
    pub const fn writable(self) -> bool {
        matches!(self, DmaAccess::ReadWrite)
    }
}

/// What one device address maps to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DmaTranslation {
    pub hpa: HostPhysAddr,
    pub access: DmaAccess,
    /// Size of the page holding the address: 4 KiB, 2 MiB or 1 GiB.
    pub page_size: u64,
}

/// What a mapping call built, for the log.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct MapStats {
    pub pages_4k: u64,
    pub pages_2m: u64,
    pub pages_1g: u64,
    /// Page-table frames allocated.
    pub tables: u64,
}

impl MapStats {
    fn add(&mut self, other: MapStats) {
        self.pages_4k += other.pages_4k;
        self.pages_2m += other.pages_2m;
        self.pages_1g += other.pages_1g;
        self.tables += other.tables;
    }
}

/// An I/O page table that maps device addresses to the same host-physical addresses
/// ([`vtd::IommuPageTables`], [`amdvi::IoPageTables`]).
pub trait DmaPageTables {
    /// The root table's frame (VT-d: the context entry's SLPTPTR; AMD-Vi: the DTE's Page
    /// Table Root Pointer).
    fn root(&self) -> HostPhysAddr;
    /// Device addresses the tables can hold.
    fn levels(&self) -> PagingLevels;
    /// Maps `range` (4 KiB-aligned) to itself with the largest pages the hardware allows,
    /// replacing earlier mappings there. A failure part-way leaves the pages before it mapped.
    fn map_identity<M: TableMemory + FrameAllocator>(
        &mut self,
        range: PhysRange,
        access: DmaAccess,
        mem: &mut M,
    ) -> Result<MapStats, IommuError>;
    /// What `iova` maps to, or `None` when a device access there faults.
    fn translate(&self, iova: u64, mem: &mut impl TableMemory) -> Option<DmaTranslation>;
}

/// Errors of the page-table builders and of [`DmaDomainPlan`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IommuError {
    /// The frame allocator is exhausted.
    OutOfFrames,
    /// An address that must be a multiple of 4 KiB is not.
    Unaligned { what: &'static str, value: u64 },
    /// A range ends before it starts.
    Inverted {
        what: &'static str,
        range: PhysRange,
    },
    /// A range reaches past the last device address the tables can hold.
    AboveAddressWidth { range: PhysRange, width: u32 },
    /// A firmware reserved-memory range (VT-d RMRR, AMD-Vi IVMD) shares a page with memory
    /// the guest's devices must never reach.
    ReservedOverlapsProtected {
        reserved: PhysRange,
        protected: PhysRange,
    },
    /// More ranges than a plan holds.
    TooManyRanges { what: &'static str, max: usize },
}

impl fmt::Display for IommuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            IommuError::OutOfFrames => f.write_str("out of frames for I/O page tables"),
            IommuError::Unaligned { what, value } => {
                write!(f, "{what} {value:#x} is not a multiple of 4 KiB")
            }
            IommuError::Inverted { what, range } => {
                write!(
                    f,
                    "{what} {:#x}..{:#x} ends before it starts",
                    range.start, range.end
                )
            }
            IommuError::AboveAddressWidth { range, width } => write!(
                f,
                "DMA range {range} reaches past the {width}-bit device address space"
            ),
            IommuError::ReservedOverlapsProtected {
                reserved,
                protected,
            } => write!(
                f,
                "firmware reserved-memory range {reserved} (RMRR/IVMD) overlaps protected \
                 memory {protected}: refusing to let devices reach it"
            ),
            IommuError::TooManyRanges { what, max } => {
                write!(f, "more than {max} {what} ranges")
            }
        }
    }
}

/// Most ranges a [`DmaDomainPlan`] holds: the E820 regions ([`crate::memmap::MAX_REGIONS`]),
/// reserved-memory ranges, and the pieces protected ranges cut out of them.
pub const MAX_PLAN_RANGES: usize = 256;
/// Most protected ranges a plan takes.
pub const MAX_PROTECTED_RANGES: usize = 32;

type Ranges = heapless::Vec<PhysRange, MAX_PLAN_RANGES>;

/// The ranges one DMA domain's I/O page tables map identity: sorted, disjoint, not
/// adjacent, 4 KiB-aligned.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct DmaDomainPlan {
    ranges: Ranges,
}

impl DmaDomainPlan {
    /// The guest's domain: its RAM as its E820 describes it, plus every reserved-memory
    /// range the firmware requires (VT-d RMRRs, AMD-Vi IVMD unity and exclusion ranges,
    /// which devices use behind the OS's back: USB legacy emulation, management engines),
    /// minus every `protected` byte (Ally's region, the DPI memory).
    ///
    /// Device access is per 4 KiB page, so RAM and reserved ranges grow to whole pages and
    /// a page holding any protected byte is never mapped, even when the RAM list claims it.
    /// A reserved range sharing a page with a protected range is refused: honouring it would
    /// open protected memory, ignoring it would break the device that needs it, and the
    /// operator must decide.
    pub fn guest(
        guest_ram: &[PhysRange],
        protected: &[PhysRange],
        reserved: &[PhysRange],
    ) -> Result<Self, IommuError> {
        let protected = normalized(protected, "protected", MAX_PROTECTED_RANGES)?;
        for &r in reserved {
            let Some(pages) = outward(r, "reserved-memory range")? else {
                continue;
            };
            if let Some(&p) = protected.iter().find(|p| p.overlaps(&pages)) {
                return Err(IommuError::ReservedOverlapsProtected {
                    reserved: r,
                    protected: p,
                });
            }
        }
        let mut all = Ranges::new();
        for &r in guest_ram.iter().chain(reserved) {
            if let Some(pages) = outward(r, "guest RAM or reserved range")? {
                push(&mut all, pages, "DMA")?;
            }
        }
        let all = merge(all);
        let mut ranges = Ranges::new();
        for r in all {
            subtract_into(&mut ranges, r, &protected)?;
        }
        Ok(Self { ranges })
    }

    /// The DPI NIC's domain: exactly `dpi` (its rings and buffers), which must be
    /// 4 KiB-aligned, because rounding out would hand the NIC whatever shares the page.
    pub fn dpi_device(dpi: &[PhysRange]) -> Result<Self, IommuError> {
        let mut all = Ranges::new();
        for &r in dpi {
            if r.end < r.start {
                return Err(IommuError::Inverted {
                    what: "DPI range",
                    range: r,
                });
            }
            for (what, value) in [("DPI range start", r.start), ("DPI range end", r.end)] {
                if value % PAGE_SIZE != 0 {
                    return Err(IommuError::Unaligned { what, value });
                }
            }
            if !r.is_empty() {
                push(&mut all, r, "DPI")?;
            }
        }
        Ok(Self { ranges: merge(all) })
    }

    /// The mapped ranges, sorted and disjoint.
    pub fn ranges(&self) -> &[PhysRange] {
        &self.ranges
    }

    /// Whether the plan maps `addr`.
    pub fn contains(&self, addr: u64) -> bool {
        self.ranges.iter().any(|r| r.contains(addr))
    }

    /// Maps every range of the plan into `tables`, read-write.
    pub fn map_into<T: DmaPageTables, M: TableMemory + FrameAllocator>(
        &self,
        tables: &mut T,
        mem: &mut M,
    ) -> Result<MapStats, IommuError> {
        let mut stats = MapStats::default();
        for &r in &self.ranges {
            stats.add(tables.map_identity(r, DmaAccess::ReadWrite, mem)?);
        }
        Ok(stats)
    }
}

/// `r` grown to whole 4 KiB pages; `None` when empty.
fn outward(r: PhysRange, what: &'static str) -> Result<Option<PhysRange>, IommuError> {
    if r.end < r.start {
        return Err(IommuError::Inverted { what, range: r });
    }
    if r.is_empty() {
        return Ok(None);
    }
    let end =
        HostPhysAddr(r.end)
            .checked_align_up(PAGE_SIZE)
            .ok_or(IommuError::AboveAddressWidth {
                range: r,
                width: 64,
            })?;
    Ok(Some(PhysRange {
        start: r.start & !(PAGE_SIZE - 1),
        end: end.0,
    }))
}

fn push(v: &mut Ranges, r: PhysRange, what: &'static str) -> Result<(), IommuError> {
    v.push(r).map_err(|_| IommuError::TooManyRanges {
        what,
        max: MAX_PLAN_RANGES,
    })
}

/// Sorts and merges overlapping or adjacent ranges.
fn merge(mut v: Ranges) -> Ranges {
    v.sort_unstable_by_key(|r| r.start);
    let mut out = Ranges::new();
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            // `out` never holds more ranges than `v`.
            _ => out.push(r).unwrap_or(()),
        }
    }
    out
}

/// The protected ranges grown to whole pages, sorted and merged.
fn normalized(ranges: &[PhysRange], what: &'static str, max: usize) -> Result<Ranges, IommuError> {
    if ranges.len() > max {
        return Err(IommuError::TooManyRanges { what, max });
    }
    let mut v = Ranges::new();
    for &r in ranges {
        if let Some(pages) = outward(r, what)? {
            push(&mut v, pages, what)?;
        }
    }
    Ok(merge(v))
}

/// Appends the parts of `r` outside every range of `cut` (sorted, disjoint) to `out`.
fn subtract_into(out: &mut Ranges, r: PhysRange, cut: &[PhysRange]) -> Result<(), IommuError> {
    let mut start = r.start;
    for c in cut.iter().filter(|c| c.overlaps(&r)) {
        if c.start > start {
            push(
                out,
                PhysRange {
                    start,
                    end: c.start,
                },
                "DMA",
            )?;
        }
        start = start.max(c.end);
    }
    if start < r.end {
        push(out, PhysRange { start, end: r.end }, "DMA")?;
    }
    Ok(())
}

/// Bounds-checked reads inside one ACPI table: every read names its offset and returns
/// `None` past the table's end, so a parser cannot be led outside the table.
struct TableReader<'a, M: PhysMemory> {
    mem: &'a M,
    pa: u64,
    len: u32,
}

// Not derived: a derive would require `M: Copy`, but only the reference is copied.
impl<M: PhysMemory> Clone for TableReader<'_, M> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<M: PhysMemory> Copy for TableReader<'_, M> {}

impl<'a, M: PhysMemory> TableReader<'a, M> {
    fn new(mem: &'a M, table: &AcpiTable) -> Self {
        Self {
            mem,
            pa: table.pa,
            len: table.len(),
        }
    }

    fn array<const N: usize>(&self, off: u32) -> Option<[u8; N]> {
        let end = off.checked_add(u32::try_from(N).ok()?)?;
        if end > self.len {
            return None;
        }
        let mut b = [0u8; N];
        self.mem.read(self.pa.checked_add(u64::from(off))?, &mut b);
        Some(b)
    }

    fn u8(&self, off: u32) -> Option<u8> {
        self.array::<1>(off).map(|b| b[0])
    }

    fn u16(&self, off: u32) -> Option<u16> {
        self.array(off).map(u16::from_le_bytes)
    }

    fn u32(&self, off: u32) -> Option<u32> {
        self.array(off).map(u32::from_le_bytes)
    }

    fn u64(&self, off: u32) -> Option<u64> {
        self.array(off).map(u64::from_le_bytes)
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Fakes shared by the IOMMU tests: physical memory holding ACPI tables, page-table
    //! frames, a unit's register file and the memory it reads.

    use crate::acpi::PhysMemory;
    use crate::addr::{HostPhysAddr, PAGE_SIZE};
    use crate::iommu::interrupts::IommuMemory;
    use crate::iommu::remapping::UnitRegisters;
    use crate::paging::{FrameAllocator, TableMemory, ENTRIES};
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// A unit's 64-bit registers in a map; `on_write` sees each write once it is stored
    /// (where a fake carries out what the write starts).
    pub struct FakeRegisters {
        regs: Mutex<HashMap<usize, u64>>,
        on_write: Box<dyn Fn(usize, u64) + Send + Sync>,
    }

    impl FakeRegisters {
        pub fn leak(on_write: impl Fn(usize, u64) + Send + Sync + 'static) -> &'static Self {
            Box::leak(Box::new(Self {
                regs: Mutex::new(HashMap::new()),
                on_write: Box::new(on_write),
            }))
        }
    }

    impl UnitRegisters for &'static FakeRegisters {
        fn read32(&self, o: usize) -> u32 {
            self.read64(o) as u32
        }
        fn write32(&self, o: usize, v: u32) {
            self.write64(o, u64::from(v))
        }
        fn read64(&self, o: usize) -> u64 {
            *self.regs.lock().unwrap().get(&o).unwrap_or(&0)
        }
        fn write64(&self, o: usize, v: u64) {
            self.regs.lock().unwrap().insert(o, v);
            (self.on_write)(o, v);
        }
    }

    /// A unit with a one-page command ring (AMD-Vi's command buffer, VT-d's invalidation
    /// queue) of `entry_bytes` entries: when `tail_register` is written, `run` carries out
    /// each entry from where the unit stopped up to the new tail (it gets the entry's byte
    /// offset).
    pub fn ring_unit(
        tail_register: usize,
        entry_bytes: u64,
        run: impl Fn(u64) + Send + Sync + 'static,
    ) -> &'static FakeRegisters {
        let head = Mutex::new(0u64);
        FakeRegisters::leak(move |o, tail| {
            if o != tail_register {
                return;
            }
            let mut head = head.lock().unwrap();
            while *head != tail {
                run(*head);
                *head = (*head + entry_bytes) % PAGE_SIZE;
            }
        })
    }

    /// `n` zeroed words the fake unit reads, at their host address.
    pub fn leaked_words<T: Default>(n: usize) -> IommuMemory<T> {
        let words: &'static [T] = Vec::leak((0..n).map(|_| T::default()).collect());
        IommuMemory {
            phys: HostPhysAddr(words.as_ptr() as u64),
            words,
        }
    }

    /// Physical memory `[base, base + bytes.len())`; reads elsewhere return 0xFF like
    /// an unclaimed bus. With a window set, a read outside it panics: the parsers' tests
    /// use that to prove they never read outside the table.
    pub struct FakePhys {
        pub base: u64,
        pub bytes: std::vec::Vec<u8>,
        pub window: std::cell::Cell<Option<(u64, u64)>>,
    }

    impl FakePhys {
        pub fn new(base: u64, size: usize) -> Self {
            Self {
                base,
                bytes: vec![0; size],
                window: std::cell::Cell::new(None),
            }
        }
        pub fn put(&mut self, pa: u64, data: &[u8]) {
            let at = (pa - self.base) as usize;
            self.bytes[at..at + data.len()].copy_from_slice(data);
        }
    }

    impl PhysMemory for FakePhys {
        fn read(&self, pa: u64, buf: &mut [u8]) {
            if let Some((start, end)) = self.window.get() {
                let last = pa + buf.len() as u64;
                assert!(
                    start <= pa && last <= end,
                    "read of [{pa:#x}, {last:#x}) outside [{start:#x}, {end:#x})"
                );
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = pa
                    .checked_add(i as u64)
                    .and_then(|a| a.checked_sub(self.base))
                    .and_then(|o| self.bytes.get(o as usize).copied())
                    .unwrap_or(0xFF);
            }
        }
        fn write(&mut self, pa: u64, buf: &[u8]) {
            self.put(pa, buf);
        }
    }

    /// An ACPI table: 36-byte header (signature, length, revision 1, checksum, QEMU's
    /// "BOCHS " / "BXPC    " ids) followed by `body`, with a correct checksum.
    pub fn acpi_table(sig: &[u8; 4], body: &[u8]) -> std::vec::Vec<u8> {
        let mut t = std::vec::Vec::new();
        t.extend_from_slice(sig);
        t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
        t.push(1); // revision
        t.push(0); // checksum, fixed below
        t.extend_from_slice(b"BOCHS "); // OEM ID
        t.extend_from_slice(b"BXPC    "); // OEM table ID
        t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
        t.extend_from_slice(b"BXPC"); // creator ID
        t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
        t.extend_from_slice(body);
        fix_checksum(&mut t);
        t
    }

    /// A BIOS area holding `table` at 0xF_1000, found through an ACPI 1.0 RSDP (at
    /// 0xF_5000) and an RSDT (at 0xF_0800), as `find_rsdp` and `find_table` look for them.
    pub fn firmware_with(table: &[u8]) -> (FakePhys, crate::acpi::Rsdp) {
        let mut mem = FakePhys::new(0, 0x10_0000);
        let (table_pa, rsdt_pa) = (0xf_1000u64, 0xf_0800u64);
        mem.put(table_pa, table);
        mem.put(
            rsdt_pa,
            &acpi_table(b"RSDT", &(table_pa as u32).to_le_bytes()),
        );
        let mut rsdp = b"RSD PTR \0BOCHS \0".to_vec();
        rsdp.extend_from_slice(&(rsdt_pa as u32).to_le_bytes());
        let sum = rsdp.iter().fold(0u8, |s, &b| s.wrapping_add(b));
        rsdp[8] = 0u8.wrapping_sub(sum);
        mem.put(0xf_5000, &rsdp);
        let rsdp = crate::acpi::find_rsdp(&mem).expect("the RSDP just written");
        (mem, rsdp)
    }

    /// Makes the table's bytes sum to zero again through byte 9.
    pub fn fix_checksum(t: &mut [u8]) {
        t[9] = 0;
        let sum = t.iter().fold(0u8, |s, &b| s.wrapping_add(b));
        t[9] = 0u8.wrapping_sub(sum);
    }

    /// Page-table frames numbered from 0x4000_0000, at most `limit` of them.
    pub struct FakeFrames {
        pub frames: HashMap<u64, Box<[u64; ENTRIES]>>,
        next: u64,
        limit: usize,
    }

    impl FakeFrames {
        pub fn new(limit: usize) -> Self {
            Self {
                frames: HashMap::new(),
                next: 0x4000_0000,
                limit,
            }
        }
    }

    impl FrameAllocator for FakeFrames {
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

    impl TableMemory for FakeFrames {
        fn table(&mut self, frame: HostPhysAddr) -> &mut [u64; ENTRIES] {
            self.frames.get_mut(&frame.0).expect("not a table frame")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::FakeFrames;
    use super::*;

    const MIB: u64 = 1 << 20;

    fn r(start: u64, end: u64) -> PhysRange {
        PhysRange { start, end }
    }

    #[test]
    fn source_id_fields() {
        let s = SourceId::new(0xff, 0x1f, 7);
        assert_eq!(s.0, 0xffff);
        assert_eq!((s.bus(), s.device(), s.function()), (0xff, 0x1f, 7));
        assert_eq!(SourceId::new(0, 0x14, 0), SourceId(0xa0));
        assert_eq!(SourceId::new(0, 0x14, 0).devfn(), 0xa0);
        assert_eq!(format!("{}", SourceId::new(2, 3, 1)), "02:03.1");
        assert_eq!(format!("{:?}", SourceId(0x10)), "SourceId(00:02.0)");
    }

    #[test]
    fn paging_levels() {
        assert_eq!(PagingLevels::Three.address_width(), 39);
        assert_eq!(PagingLevels::Four.address_width(), 48);
        assert_eq!(PagingLevels::Four.limit(), 1 << 48);
        assert_eq!(PagingLevels::Three.count(), 3);
        assert!(DmaAccess::ReadWrite.writable() && !DmaAccess::ReadOnly.writable());
    }

    #[test]
    fn guest_plan_subtracts_protected_and_adds_reserved() {
        // A 4 GiB guest: low RAM, RAM up to the PCI hole, RAM above 4 GiB; Ally's region
        // at 3 GiB - 64 MiB and the DPI memory right below it.
        let ram = [r(0, 0x9fc00), r(MIB, 3072 * MIB), r(4096 * MIB, 5120 * MIB)];
        let protected = [
            r(3008 * MIB, 3040 * MIB),         // DPI memory
            r(3040 * MIB, 3072 * MIB - 4096),  // Ally, not ending on a 2 MiB boundary
            r(4200 * MIB + 1, 4200 * MIB + 2), // a single byte
        ];
        // An RMRR in E820-reserved memory (a USB controller's buffer).
        let reserved = [r(0xe_0000, 0xf_0000 - 1)];
        let plan = DmaDomainPlan::guest(&ram, &protected, &reserved).unwrap();
        assert_eq!(
            plan.ranges(),
            &[
                // 0x9fc00 grows to its page's end; the RMRR grows to whole pages.
                r(0, 0xa0000),
                r(0xe_0000, 0xf_0000),
                r(MIB, 3008 * MIB),
                // Ally ends one page short of 3 GiB: that RAM page stays mapped.
                r(3072 * MIB - 4096, 3072 * MIB),
                // The page holding the single protected byte is cut out.
                r(4096 * MIB, 4200 * MIB),
                r(4200 * MIB + 4096, 5120 * MIB),
            ]
        );
        assert!(!plan.contains(3072 * MIB - 4097));
        assert!(plan.contains(0xe_fff0));
    }

    #[test]
    fn guest_plan_keeps_the_page_after_a_protected_range() {
        let plan =
            DmaDomainPlan::guest(&[r(0, 8 * MIB)], &[r(2 * MIB, 3 * MIB - 4096)], &[]).unwrap();
        assert_eq!(plan.ranges(), &[r(0, 2 * MIB), r(3 * MIB - 4096, 8 * MIB)]);
    }

    #[test]
    fn guest_plan_never_maps_protected_bytes_the_ram_list_claims() {
        // The RAM list covers everything, the protected ranges overlap each other and
        // one is unaligned at both ends.
        let protected = [
            r(10 * MIB + 100, 12 * MIB + 5),
            r(11 * MIB, 16 * MIB),
            r(0, 1),
        ];
        let plan = DmaDomainPlan::guest(&[r(0, 64 * MIB)], &protected, &[]).unwrap();
        assert_eq!(plan.ranges(), &[r(4096, 10 * MIB), r(16 * MIB, 64 * MIB)]);
        for p in protected {
            for a in [p.start, p.end - 1] {
                assert!(!plan.contains(a), "{a:#x}");
            }
        }
    }

    #[test]
    fn reserved_range_overlapping_protected_is_refused() {
        let ally = r(64 * MIB, 96 * MIB);
        // The RMRR ends in the page before Ally's first byte but shares no byte with it.
        let ok = DmaDomainPlan::guest(&[], &[ally], &[r(60 * MIB, 64 * MIB)]);
        assert!(ok.is_ok());
        // One byte into Ally's region.
        let e = DmaDomainPlan::guest(&[], &[ally], &[r(60 * MIB, 64 * MIB + 1)]).unwrap_err();
        assert_eq!(
            e,
            IommuError::ReservedOverlapsProtected {
                reserved: r(60 * MIB, 64 * MIB + 1),
                protected: ally,
            }
        );
        assert!(e.to_string().contains("overlaps protected memory"));
        // No byte in common, but the same 4 KiB page: mapping the RMRR would expose it.
        let page = r(200 * MIB + 0x10, 200 * MIB + 0x20);
        let e = DmaDomainPlan::guest(&[], &[page], &[r(200 * MIB + 0x800, 200 * MIB + 0x900)]);
        assert!(matches!(
            e,
            Err(IommuError::ReservedOverlapsProtected { .. })
        ));
    }

    #[test]
    fn bad_ranges_are_errors() {
        let inverted = r(0x2000, 0x1000);
        assert!(matches!(
            DmaDomainPlan::guest(&[inverted], &[], &[]),
            Err(IommuError::Inverted { .. })
        ));
        assert!(matches!(
            DmaDomainPlan::guest(&[], &[inverted], &[]),
            Err(IommuError::Inverted { .. })
        ));
        assert!(matches!(
            DmaDomainPlan::guest(&[r(u64::MAX - 10, u64::MAX)], &[], &[]),
            Err(IommuError::AboveAddressWidth { .. })
        ));
        let many = [r(0, 4096); MAX_PROTECTED_RANGES + 1];
        assert_eq!(
            DmaDomainPlan::guest(&[], &many, &[]),
            Err(IommuError::TooManyRanges {
                what: "protected",
                max: MAX_PROTECTED_RANGES
            })
        );
        let many: std::vec::Vec<_> = (0..=MAX_PLAN_RANGES as u64)
            .map(|i| r(i * 0x2000, i * 0x2000 + 0x1000))
            .collect();
        assert!(matches!(
            DmaDomainPlan::guest(&many, &[], &[]),
            Err(IommuError::TooManyRanges { what: "DMA", .. })
        ));
        // Empty ranges are ignored.
        let plan = DmaDomainPlan::guest(&[r(5, 5)], &[r(7, 7)], &[r(9, 9)]).unwrap();
        assert!(plan.ranges().is_empty());
    }

    #[test]
    fn dpi_plan_is_exactly_the_dpi_ranges() {
        let plan = DmaDomainPlan::dpi_device(&[
            r(0x2000_0000, 0x2010_0000),
            r(0x1000_0000, 0x1000_1000),
            r(0x2010_0000, 0x2020_0000),
            r(0x3000, 0x3000),
        ])
        .unwrap();
        assert_eq!(
            plan.ranges(),
            &[r(0x1000_0000, 0x1000_1000), r(0x2000_0000, 0x2020_0000)]
        );
        assert_eq!(
            DmaDomainPlan::dpi_device(&[r(0x1000, 0x1800)]),
            Err(IommuError::Unaligned {
                what: "DPI range end",
                value: 0x1800
            })
        );
        assert!(matches!(
            DmaDomainPlan::dpi_device(&[r(0x2000, 0x1000)]),
            Err(IommuError::Inverted { .. })
        ));
    }

    #[test]
    fn errors_read_well() {
        let cases = [
            (IommuError::OutOfFrames, "out of frames for I/O page tables"),
            (
                IommuError::Unaligned {
                    what: "DPI range end",
                    value: 0x1800,
                },
                "DPI range end 0x1800 is not a multiple of 4 KiB",
            ),
            (
                IommuError::Inverted {
                    what: "protected",
                    range: r(2, 1),
                },
                "protected 0x2..0x1 ends before it starts",
            ),
            (
                IommuError::AboveAddressWidth {
                    range: r(0, 1 << 40),
                    width: 39,
                },
                "DMA range [0x0, 0x10000000000) reaches past the 39-bit device address space",
            ),
            (
                IommuError::TooManyRanges {
                    what: "DMA",
                    max: 256,
                },
                "more than 256 DMA ranges",
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
        }
    }

    /// A leaf of an I/O page table, read from the raw entries by the tests' own walker:
    /// device address, size, target address, writable.
    type Leaf = (u64, u64, u64, bool);

    /// Every leaf under `table` (at `level`, covering device addresses from `base`),
    /// decoded with `present`, `leaf` and `writable` for the vendor's format.
    fn walk(
        m: &mut FakeFrames,
        table: u64,
        level: u32,
        base: u64,
        fmt: &dyn Fn(u64, u32) -> Option<(bool, bool)>,
        out: &mut std::vec::Vec<Leaf>,
    ) {
        let size = PAGE_SIZE << (9 * (level - 1));
        for i in 0..512u64 {
            let e = m.table(HostPhysAddr(table))[i as usize];
            let Some((leaf, writable)) = fmt(e, level) else {
                continue;
            };
            let addr = e & 0x000F_FFFF_FFFF_F000;
            if leaf {
                out.push((base + i * size, size, addr, writable));
            } else {
                walk(m, addr, level - 1, base + i * size, fmt, out);
            }
        }
    }

    /// VT-d second-level entries (VT-d 9.8): present if R or W, a leaf at level 1 or
    /// with PS (bit 7).
    fn vtd_entry(e: u64, level: u32) -> Option<(bool, bool)> {
        (e & 3 != 0).then_some((level == 1 || e & (1 << 7) != 0, e & 2 != 0))
    }

    /// Proves the tables map exactly the plan, identity, writable, and no protected byte:
    /// every leaf is checked, and the leaves (disjoint, being a tree's) add up to the plan.
    fn assert_maps_exactly(leaves: &[Leaf], plan: &DmaDomainPlan, protected: &[PhysRange]) {
        for &(iova, size, hpa, writable) in leaves {
            let page = r(iova, iova + size);
            assert_eq!(hpa, iova, "not identity at {iova:#x}");
            assert!(writable);
            for p in protected {
                assert!(!p.overlaps(&page), "{page} maps protected {p}");
            }
            assert!(
                plan.ranges()
                    .iter()
                    .any(|r| r.start <= page.start && page.end <= r.end),
                "{page} is outside the plan"
            );
        }
        let mapped: u64 = leaves.iter().map(|l| l.1).sum();
        let planned: u64 = plan.ranges().iter().map(|r| r.len()).sum();
        assert_eq!(mapped, planned);
    }

    /// A 6 GiB guest around Ally's region, with unaligned protected ranges and an RMRR.
    fn layout() -> ([PhysRange; 4], [PhysRange; 3], [PhysRange; 1]) {
        let ram = [
            r(0, 0x9fc00),
            r(MIB, 3 * GIB),
            r(4 * GIB, 7 * GIB),
            r(7 * GIB, 7 * GIB + 3 * MIB + 0x234),
        ];
        let protected = [
            r(GIB + 4 * MIB, GIB + 68 * MIB), // DPI memory, 2 MiB-aligned
            r(GIB + 68 * MIB, GIB + 99 * MIB + 0x10), // Ally, ending mid-page
            r(5 * GIB + 0x1234, 5 * GIB + 0x1235), // one byte
        ];
        let rmrr = [r(0xe_8000, 0xf_0000)];
        (ram, protected, rmrr)
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn vtd_tables_map_the_guest_plan_and_no_protected_byte() {
        let (ram, protected, rmrr) = layout();
        let plan = DmaDomainPlan::guest(&ram, &protected, &rmrr).unwrap();
        for (levels, sizes) in [
            (PagingLevels::Four, PageSizes::ALL),
            (PagingLevels::Three, PageSizes::ALL),
            (
                PagingLevels::Four,
                PageSizes {
                    two_mib: true,
                    one_gib: false,
                },
            ),
        ] {
            let mut m = FakeFrames::new(4096);
            let mut t = vtd::IommuPageTables::new(levels, sizes, &mut m).unwrap();
            let stats = plan.map_into(&mut t, &mut m).unwrap();
            // Aligned stretches use the largest pages the unit has.
            if sizes.one_gib {
                // [2 GiB, 3 GiB) and [4 GiB, 5 GiB) and [6 GiB, 7 GiB).
                assert_eq!(stats.pages_1g, 3);
            } else {
                assert_eq!(stats.pages_1g, 0);
            }
            assert!(stats.pages_2m > 500);
            let mut leaves = std::vec::Vec::new();
            walk(
                &mut m,
                t.root().0,
                levels.count(),
                0,
                &vtd_entry,
                &mut leaves,
            );
            assert_maps_exactly(&leaves, &plan, &protected);
            // The RMRR is honoured and the partial last RAM page is mapped whole.
            assert!(t.translate(0xe_8000, &mut m).is_some());
            assert!(t.translate(7 * GIB + 3 * MIB + 0xfff, &mut m).is_some());
            assert!(t.translate(5 * GIB + 0x1000, &mut m).is_none());
        }
    }

    #[test]
    fn vtd_tables_map_only_the_dpi_ranges() {
        let dpi = [
            r(GIB + 4 * MIB, GIB + 68 * MIB),
            r(GIB + 80 * MIB, GIB + 80 * MIB + 0x3000),
        ];
        let plan = DmaDomainPlan::dpi_device(&dpi).unwrap();
        let mut m = FakeFrames::new(64);
        let mut t = vtd::IommuPageTables::new(PagingLevels::Three, PageSizes::ALL, &mut m).unwrap();
        let stats = plan.map_into(&mut t, &mut m).unwrap();
        assert_eq!((stats.pages_2m, stats.pages_4k), (32, 3));
        let mut leaves = std::vec::Vec::new();
        walk(&mut m, t.root().0, 3, 0, &vtd_entry, &mut leaves);
        // Everything that is not DPI memory is protected from the NIC.
        let outside = [
            r(0, GIB + 4 * MIB),
            r(GIB + 68 * MIB, GIB + 80 * MIB),
            r(GIB + 80 * MIB + 0x3000, u64::MAX),
        ];
        assert_maps_exactly(&leaves, &plan, &outside);
    }

    /// AMD-Vi I/O page-table entries (48882 2.2.3): present if PR, a leaf at level 1 or
    /// with NextLevel 0 (or 7).
    fn amd_entry(e: u64, level: u32) -> Option<(bool, bool)> {
        let next = (e >> 9) & 7;
        (e & 1 != 0).then_some((level == 1 || next == 0 || next == 7, e & (1 << 62) != 0))
    }

    #[test]
    fn amd_tables_map_the_guest_plan_and_no_protected_byte() {
        let (ram, protected, rmrr) = layout();
        let plan = DmaDomainPlan::guest(&ram, &protected, &rmrr).unwrap();
        for levels in [PagingLevels::Three, PagingLevels::Four] {
            let mut m = FakeFrames::new(4096);
            let mut t = amdvi::IoPageTables::new(levels, PageSizes::ALL, &mut m).unwrap();
            let stats = plan.map_into(&mut t, &mut m).unwrap();
            assert_eq!(stats.pages_1g, 3);
            let mut leaves = std::vec::Vec::new();
            walk(
                &mut m,
                t.root().0,
                levels.count(),
                0,
                &amd_entry,
                &mut leaves,
            );
            assert_maps_exactly(&leaves, &plan, &protected);
            assert!(t.translate(0xe_8000, &mut m).is_some());
        }
    }
}
