//! Intel VT-d in-memory structures and registers (Intel Virtualization Technology for
//! Directed I/O Architecture Specification, rev. 4.1): the legacy-mode root and context
//! tables that pick a domain per requester, second-level page tables that translate the
//! domain's DMA, interrupt-remapping table entries, the remapping unit's register offsets
//! and a decoder for its fault records.
//!
//! Nothing here touches hardware; the wiring writes these values to memory and to the
//! registers of the units the DMAR lists.

use super::table::{EntryFormat, Tables, ADDR_MASK};
use super::{DmaAccess, IommuError, PageSizes, PagingLevels, SourceId};
use crate::addr::HostPhysAddr;
use crate::paging::{FrameAllocator, TableMemory};
use core::fmt;

/// A root-table entry, legacy mode (VT-d 9.1): the context table of one bus.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(C)]
pub struct RootEntry {
    /// Present (bit 0) and context-table pointer (bits 63:12).
    pub lo: u64,
    /// Reserved in legacy mode.
    pub hi: u64,
}

const _: () = assert!(core::mem::size_of::<RootEntry>() == 16);

impl RootEntry {
    const PRESENT: u64 = 1;

    pub const fn new(context_table: HostPhysAddr) -> Self {
        Self {
            lo: (context_table.0 & ADDR_MASK) | Self::PRESENT,
            hi: 0,
        }
    }
    pub const fn present(&self) -> bool {
        self.lo & Self::PRESENT != 0
    }
    pub const fn context_table(&self) -> HostPhysAddr {
        HostPhysAddr(self.lo & ADDR_MASK)
    }
}

/// The context entry's TT field (VT-d 9.3, legacy mode).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TranslationType {
    /// 00b: untranslated requests go through the second-level tables; ATS translation
    /// requests are blocked. What Ally uses.
    Untranslated = 0,
    /// 01b: as above, and device-TLB translation requests are answered.
    UntranslatedAndTranslated = 1,
    /// 10b: requests pass untranslated (needs ECAP.PT). Never for a guest's devices.
    PassThrough = 2,
}

/// A context entry, legacy mode (VT-d 9.3): the domain and page tables of one device.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(C)]
pub struct ContextEntry {
    /// Present (bit 0), Fault Processing Disable (bit 1), TT (bits 3:2), second-level
    /// page-table pointer (bits 63:12).
    pub lo: u64,
    /// AW (bits 2:0), domain identifier (bits 23:8).
    pub hi: u64,
}

const _: () = assert!(core::mem::size_of::<ContextEntry>() == 16);

impl ContextEntry {
    const PRESENT: u64 = 1 << 0;
    const FPD: u64 = 1 << 1;

    /// A present entry translating through `tables` in domain `domain`. Domain 0 is
    /// reserved when CAP.CM is set (caching mode, as QEMU's `caching-mode=on`), and the
    /// domain must be below [`Cap::domain_count`].
    pub const fn new(
        tables: HostPhysAddr,
        levels: PagingLevels,
        domain: u16,
        tt: TranslationType,
    ) -> Self {
        let aw = match levels {
            PagingLevels::Three => 1,
            PagingLevels::Four => 2,
        };
        Self {
            lo: (tables.0 & ADDR_MASK) | ((tt as u64) << 2) | Self::PRESENT,
            hi: aw | ((domain as u64) << 8),
        }
    }
    pub const fn present(&self) -> bool {
        self.lo & Self::PRESENT != 0
    }
    /// Faults of this device are not recorded (Ally never sets it: faults are evidence).
    pub const fn fault_processing_disabled(&self) -> bool {
        self.lo & Self::FPD != 0
    }
    /// TT; `None` for the reserved encoding 11b.
    pub const fn translation_type(&self) -> Option<TranslationType> {
        match (self.lo >> 2) & 3 {
            0 => Some(TranslationType::Untranslated),
            1 => Some(TranslationType::UntranslatedAndTranslated),
            2 => Some(TranslationType::PassThrough),
            _ => None,
        }
    }
    pub const fn second_level_root(&self) -> HostPhysAddr {
        HostPhysAddr(self.lo & ADDR_MASK)
    }
    /// AW; `None` for 5-level and reserved encodings, which Ally does not build.
    pub const fn levels(&self) -> Option<PagingLevels> {
        match self.hi & 7 {
            1 => Some(PagingLevels::Three),
            2 => Some(PagingLevels::Four),
            _ => None,
        }
    }
    pub const fn domain_id(&self) -> u16 {
        (self.hi >> 8) as u16
    }
}

/// The root table and the context tables under it (VT-d 3.4.2, 9.1, 9.3): one 4 KiB frame
/// of 256 root entries, one per bus, each pointing at a frame of 256 context entries, one
/// per device/function.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RootTable {
    root: HostPhysAddr,
}

impl RootTable {
    pub fn new(alloc: &mut impl FrameAllocator) -> Result<Self, IommuError> {
        let root = alloc
            .allocate_zeroed_frame()
            .ok_or(IommuError::OutOfFrames)?;
        Ok(Self { root })
    }

    /// The frame for RTADDR_REG ([`rtaddr`]).
    pub fn root(&self) -> HostPhysAddr {
        self.root
    }

    /// Points `device` at `entry`, creating its bus's context table. The high half is
    /// written before the low half, which holds Present; after changing a live entry the
    /// caller invalidates the context cache and the IOTLB.
    pub fn set_context<M: TableMemory + FrameAllocator>(
        &mut self,
        device: SourceId,
        entry: ContextEntry,
        mem: &mut M,
    ) -> Result<(), IommuError> {
        let bus = usize::from(device.bus());
        let root = RootEntry {
            lo: mem.table(self.root)[2 * bus],
            hi: mem.table(self.root)[2 * bus + 1],
        };
        let table = if root.present() {
            root.context_table()
        } else {
            let t = mem.allocate_zeroed_frame().ok_or(IommuError::OutOfFrames)?;
            let new = RootEntry::new(t);
            let r = mem.table(self.root);
            r[2 * bus + 1] = new.hi;
            r[2 * bus] = new.lo;
            t
        };
        let slot = 2 * usize::from(device.devfn());
        let c = mem.table(table);
        c[slot + 1] = entry.hi;
        c[slot] = entry.lo;
        Ok(())
    }

    /// The context entry of `device`, when its bus has a context table.
    pub fn context(&self, device: SourceId, mem: &mut impl TableMemory) -> Option<ContextEntry> {
        let bus = usize::from(device.bus());
        let root = RootEntry {
            lo: mem.table(self.root)[2 * bus],
            hi: mem.table(self.root)[2 * bus + 1],
        };
        if !root.present() {
            return None;
        }
        let slot = 2 * usize::from(device.devfn());
        let c = mem.table(root.context_table());
        Some(ContextEntry {
            lo: c[slot],
            hi: c[slot + 1],
        })
    }
}

/// A second-level paging entry (VT-d 9.8, Tables 9-31..9-36 in rev. 4 numbering).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(transparent)]
pub struct SlPte(pub u64);

const _: () = assert!(core::mem::size_of::<SlPte>() == 8);

impl SlPte {
    pub const READ: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
    /// PS in a level-2 (2 MiB) or level-3 (1 GiB) entry: the entry maps a page.
    pub const PAGE_SIZE: u64 = 1 << 7;

    /// Present: any of R and W set (X, bit 2, is only used with PASID execute requests,
    /// which Ally's legacy-mode tables do not serve).
    pub const fn present(self) -> bool {
        self.0 & (Self::READ | Self::WRITE) != 0
    }
    pub const fn readable(self) -> bool {
        self.0 & Self::READ != 0
    }
    pub const fn writable(self) -> bool {
        self.0 & Self::WRITE != 0
    }
    pub const fn large(self) -> bool {
        self.0 & Self::PAGE_SIZE != 0
    }
    pub const fn address(self) -> HostPhysAddr {
        HostPhysAddr(self.0 & ADDR_MASK)
    }
}

/// The second-level entry encoding for the shared builder.
pub struct SecondLevel;

impl EntryFormat for SecondLevel {
    fn is_present(entry: u64) -> bool {
        SlPte(entry).present()
    }
    fn is_leaf(entry: u64, level: u32) -> bool {
        level == 1 || SlPte(entry).large()
    }
    fn table_entry(table: HostPhysAddr, _level: u32) -> u64 {
        // Permissions are ANDed along the walk: tables grant both and the leaf decides.
        (table.0 & ADDR_MASK) | SlPte::READ | SlPte::WRITE
    }
    fn leaf_entry(addr: u64, level: u32, access: DmaAccess) -> u64 {
        let write = if access.writable() { SlPte::WRITE } else { 0 };
        let large = if level > 1 { SlPte::PAGE_SIZE } else { 0 };
        (addr & ADDR_MASK) | SlPte::READ | write | large
    }
    fn access(entry: u64) -> DmaAccess {
        if SlPte(entry).writable() {
            DmaAccess::ReadWrite
        } else {
            DmaAccess::ReadOnly
        }
    }
}

/// A domain's second-level page tables, identity-mapping what a
/// [`super::DmaDomainPlan`] allows: 3 levels (39-bit AGAW) or 4 (48-bit), with 2 MiB and
/// 1 GiB pages where CAP.SLLPS has them ([`Cap::second_level_page_sizes`]).
pub type IommuPageTables = Tables<SecondLevel>;

impl IommuPageTables {
    /// The context entry that makes `domain` translate through these tables.
    pub fn context_entry(&self, domain: u16) -> ContextEntry {
        ContextEntry::new(
            self.root,
            self.levels,
            domain,
            TranslationType::Untranslated,
        )
    }
}

/// IRTE delivery modes (VT-d 9.10, DLM; the MSI encodings).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DeliveryMode {
    Fixed = 0,
    LowestPriority = 1,
    Smi = 2,
    Nmi = 4,
    Init = 5,
    ExtInt = 7,
}

/// Where a remapped interrupt goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IrteDestination {
    /// xAPIC mode: an 8-bit APIC ID (physical) or logical destination, held in
    /// DST bits 15:8.
    XApic(u8),
    /// x2APIC mode (IRTA.EIME set): a 32-bit APIC ID or logical ID.
    X2Apic(u32),
}

/// Which requests may use an IRTE (VT-d 9.10, SVT/SQ/SID).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SourceValidation {
    /// SVT 00b: any requester (only for sources that cannot be identified).
    None,
    /// SVT 01b: the requester ID must equal `sid`, compared under the SQ mask
    /// (0: all 16 bits; 1, 2, 3: ignore function bit 2, bits 2:1, bits 2:0).
    RequesterId { sid: SourceId, sq: u8 },
    /// SVT 10b: the requester's bus must lie in `[first, last]` (devices behind a
    /// PCIe-to-PCI bridge).
    Bus { first: u8, last: u8 },
}

/// An interrupt-remapping table entry in remappable format (VT-d 9.10, Table 9-37 in
/// rev. 4 numbering).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(C)]
pub struct Irte {
    /// P (0), FPD (1), DM (2), RH (3), TM (4), DLM (7:5), IM (15, 0 = remapped),
    /// V (23:16), DST (63:32).
    pub lo: u64,
    /// SID (15:0), SQ (17:16), SVT (19:18).
    pub hi: u64,
}

const _: () = assert!(core::mem::size_of::<Irte>() == 16);

impl Irte {
    const PRESENT: u64 = 1 << 0;
    const DM_LOGICAL: u64 = 1 << 2;
    const TM_LEVEL: u64 = 1 << 4;

    /// A present, remapped-format entry.
    pub const fn remapped(
        vector: u8,
        destination: IrteDestination,
        logical: bool,
        level_triggered: bool,
        delivery: DeliveryMode,
        source: SourceValidation,
    ) -> Self {
        let dst = match destination {
            IrteDestination::XApic(id) => (id as u64) << 8,
            IrteDestination::X2Apic(id) => id as u64,
        };
        let mut lo =
            Self::PRESENT | ((delivery as u64) << 5) | ((vector as u64) << 16) | (dst << 32);
        if logical {
            lo |= Self::DM_LOGICAL;
        }
        if level_triggered {
            lo |= Self::TM_LEVEL;
        }
        let hi = match source {
            SourceValidation::None => 0,
            SourceValidation::RequesterId { sid, sq } => {
                (1 << 18) | (((sq & 3) as u64) << 16) | sid.0 as u64
            }
            SourceValidation::Bus { first, last } => {
                (2 << 18) | ((first as u64) << 8) | last as u64
            }
        };
        Self { lo, hi }
    }

    pub const fn present(&self) -> bool {
        self.lo & Self::PRESENT != 0
    }
    pub const fn vector(&self) -> u8 {
        (self.lo >> 16) as u8
    }
    pub const fn logical(&self) -> bool {
        self.lo & Self::DM_LOGICAL != 0
    }
    pub const fn level_triggered(&self) -> bool {
        self.lo & Self::TM_LEVEL != 0
    }
    /// DLM (bits 7:5), raw.
    pub const fn delivery_mode(&self) -> u8 {
        ((self.lo >> 5) & 7) as u8
    }
    /// DST (bits 63:32), raw: the xAPIC ID sits in its bits 15:8.
    pub const fn destination(&self) -> u32 {
        (self.lo >> 32) as u32
    }
    /// SVT (bits 83:82 of the entry), raw.
    pub const fn source_validation_type(&self) -> u8 {
        ((self.hi >> 18) & 3) as u8
    }
    pub const fn source_id(&self) -> u16 {
        self.hi as u16
    }
    pub const fn source_qualifier(&self) -> u8 {
        ((self.hi >> 16) & 3) as u8
    }
}

/// Register offsets of a remapping unit (VT-d 11.4, Table 11-1 in rev. 4 numbering).
pub mod regs {
    /// Version (32-bit).
    pub const VER: usize = 0x000;
    /// Capability (64-bit), see [`super::Cap`].
    pub const CAP: usize = 0x008;
    /// Extended capability (64-bit), see [`super::Ecap`].
    pub const ECAP: usize = 0x010;
    /// Global command (32-bit, write).
    pub const GCMD: usize = 0x018;
    /// Global status (32-bit, read).
    pub const GSTS: usize = 0x01C;
    /// Root table address (64-bit), see [`super::rtaddr`].
    pub const RTADDR: usize = 0x020;
    /// Context command (64-bit).
    pub const CCMD: usize = 0x028;
    /// Fault status (32-bit).
    pub const FSTS: usize = 0x034;
    /// Fault event control (32-bit).
    pub const FECTL: usize = 0x038;
    /// Fault event data, address, upper address (32-bit each).
    pub const FEDATA: usize = 0x03C;
    pub const FEADDR: usize = 0x040;
    pub const FEUADDR: usize = 0x044;
    /// Advanced fault log (64-bit).
    pub const AFLOG: usize = 0x058;
    /// Protected memory enable (32-bit): firmware's protected ranges, which must be off
    /// once translation is on.
    pub const PMEN: usize = 0x064;
    /// Invalidation queue head, tail, address (64-bit each).
    pub const IQH: usize = 0x080;
    pub const IQT: usize = 0x088;
    pub const IQA: usize = 0x090;
    /// Invalidation completion status (32-bit).
    pub const ICS: usize = 0x09C;
    /// Invalidation event control, data, address, upper address (32-bit each).
    pub const IECTL: usize = 0x0A0;
    pub const IEDATA: usize = 0x0A4;
    pub const IEADDR: usize = 0x0A8;
    pub const IEUADDR: usize = 0x0AC;
    /// Invalidation queue error record (64-bit).
    pub const IQERCD: usize = 0x0B0;
    /// Interrupt remapping table address (64-bit), see [`super::irta`].
    pub const IRTA: usize = 0x0B8;

    /// GCMD / GSTS bits (VT-d 11.4.4, 11.4.5): command in GCMD, the state it reaches in
    /// GSTS at the same position.
    pub const GCMD_TE: u32 = 1 << 31;
    pub const GCMD_SRTP: u32 = 1 << 30;
    pub const GCMD_WBF: u32 = 1 << 27;
    pub const GCMD_QIE: u32 = 1 << 26;
    pub const GCMD_IRE: u32 = 1 << 25;
    pub const GCMD_SIRTP: u32 = 1 << 24;
    pub const GCMD_CFI: u32 = 1 << 23;
    pub const GSTS_TES: u32 = GCMD_TE;
    pub const GSTS_RTPS: u32 = GCMD_SRTP;
    pub const GSTS_WBFS: u32 = GCMD_WBF;
    pub const GSTS_QIES: u32 = GCMD_QIE;
    pub const GSTS_IRES: u32 = GCMD_IRE;
    pub const GSTS_IRTPS: u32 = GCMD_SIRTP;
    pub const GSTS_CFIS: u32 = GCMD_CFI;

    /// CCMD (VT-d 11.4.7): ICC starts an invalidation and clears when done; CIRG 01b
    /// is a global one.
    pub const CCMD_ICC: u64 = 1 << 63;
    pub const CCMD_GLOBAL: u64 = 1 << 61;

    /// IOTLB invalidate register, at ECAP.IRO * 16 + 8 (VT-d 11.4.8.1): IVT starts,
    /// IIRG 01b is global, DR/DW drain reads and writes first.
    pub const IOTLB_IVT: u64 = 1 << 63;
    pub const IOTLB_GLOBAL: u64 = 1 << 60;
    pub const IOTLB_DR: u64 = 1 << 49;
    pub const IOTLB_DW: u64 = 1 << 48;

    /// FSTS (VT-d 11.4.9.1): primary fault overflow, primary pending fault, invalidation
    /// queue error, invalidation completion error, invalidation time-out error; FRI in
    /// bits 15:8 indexes the first fault record to read.
    pub const FSTS_PFO: u32 = 1 << 0;
    pub const FSTS_PPF: u32 = 1 << 1;
    pub const FSTS_IQE: u32 = 1 << 4;
    pub const FSTS_ICE: u32 = 1 << 5;
    pub const FSTS_ITE: u32 = 1 << 6;

    /// FECTL (VT-d 11.4.9.2): interrupt mask and interrupt pending.
    pub const FECTL_IM: u32 = 1 << 31;
    pub const FECTL_IP: u32 = 1 << 30;

    /// PMEN (VT-d 11.4.11.1): enable protected memory, and its status.
    pub const PMEN_EPM: u32 = 1 << 31;
    pub const PMEN_PRS: u32 = 1 << 0;
}

/// RTADDR_REG for a legacy-mode root table (TTM = 00b; VT-d 11.4.6).
pub const fn rtaddr(root: HostPhysAddr) -> u64 {
    root.0 & ADDR_MASK
}

/// IRTA_REG (VT-d 11.4.10.1): a table of 2^(`size` + 1) entries at `table`, with EIME set
/// for x2APIC destinations. `size` is 0..=15 (2..=65536 entries).
pub const fn irta(table: HostPhysAddr, size: u8, x2apic: bool) -> u64 {
    (table.0 & ADDR_MASK) | ((x2apic as u64) << 11) | (size & 0xF) as u64
}

/// IQA_REG (VT-d 11.4.8.3): a queue of 2^`qs` 4 KiB pages at `queue`, 128-bit descriptors.
pub const fn iqa(queue: HostPhysAddr, qs: u8) -> u64 {
    (queue.0 & ADDR_MASK) | (qs & 7) as u64
}

/// FSTS.FRI: the fault record the unit wrote first.
pub const fn fault_record_index(fsts: u32) -> u32 {
    (fsts >> 8) & 0xFF
}

/// The capability register (VT-d 11.4.2).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Cap(pub u64);

impl Cap {
    /// Domain IDs supported: 2^(4 + 2 * ND).
    pub const fn domain_count(self) -> u32 {
        1 << (4 + 2 * (self.0 & 7) as u32)
    }
    /// RWBF: the unit needs a write-buffer flush after table updates.
    pub const fn required_write_buffer_flush(self) -> bool {
        self.0 & (1 << 4) != 0
    }
    /// PLMR / PHMR: protected low / high memory regions exist.
    pub const fn protected_low_memory(self) -> bool {
        self.0 & (1 << 5) != 0
    }
    pub const fn protected_high_memory(self) -> bool {
        self.0 & (1 << 6) != 0
    }
    /// CM: not-present entries may be cached (emulated units such as QEMU's with
    /// caching-mode=on), so every new mapping needs an invalidation too.
    pub const fn caching_mode(self) -> bool {
        self.0 & (1 << 7) != 0
    }
    /// SAGAW (bits 12:8): supported adjusted guest address widths.
    pub const fn supports(self, levels: PagingLevels) -> bool {
        let bit = match levels {
            PagingLevels::Three => 1,
            PagingLevels::Four => 2,
        };
        (self.0 >> 8) & (1 << bit) != 0
    }
    /// MGAW (bits 21:16) + 1: widest DMA address the unit translates.
    pub const fn max_guest_address_width(self) -> u32 {
        ((self.0 >> 16) & 0x3F) as u32 + 1
    }
    /// FRO (bits 33:24) * 16: offset of the first fault-recording register.
    pub const fn fault_recording_offset(self) -> usize {
        (((self.0 >> 24) & 0x3FF) * 16) as usize
    }
    /// SLLPS (bits 37:34): 2 MiB (bit 34) and 1 GiB (bit 35) second-level pages.
    pub const fn second_level_page_sizes(self) -> PageSizes {
        PageSizes {
            two_mib: self.0 & (1 << 34) != 0,
            one_gib: self.0 & (1 << 35) != 0,
        }
    }
    /// PSI: page-selective IOTLB invalidation.
    pub const fn page_selective_invalidation(self) -> bool {
        self.0 & (1 << 39) != 0
    }
    /// NFR (bits 47:40) + 1: number of fault-recording registers.
    pub const fn fault_recording_count(self) -> usize {
        (((self.0 >> 40) & 0xFF) + 1) as usize
    }

    /// The fewest levels that reach `max_addr` (exclusive end of what must be mapped)
    /// and that the unit supports, within MGAW; `None` when none does.
    pub fn levels_for(self, max_addr: u64) -> Option<PagingLevels> {
        let mgaw = self.max_guest_address_width().min(63);
        if max_addr > 1u64 << mgaw {
            return None;
        }
        [PagingLevels::Three, PagingLevels::Four]
            .into_iter()
            .find(|&l| self.supports(l) && max_addr <= l.limit())
    }

    /// Offset of fault-recording register `index` (128 bits each).
    pub const fn fault_record_offset(self, index: usize) -> usize {
        self.fault_recording_offset() + 16 * index
    }
}

/// The extended capability register (VT-d 11.4.3).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Ecap(pub u64);

impl Ecap {
    /// C: page walks snoop the CPU caches; without it tables need a cache flush.
    pub const fn coherent(self) -> bool {
        self.0 & (1 << 0) != 0
    }
    /// QI: queued invalidation.
    pub const fn queued_invalidation(self) -> bool {
        self.0 & (1 << 1) != 0
    }
    /// DT: device-TLBs.
    pub const fn device_tlb(self) -> bool {
        self.0 & (1 << 2) != 0
    }
    /// IR: interrupt remapping.
    pub const fn interrupt_remapping(self) -> bool {
        self.0 & (1 << 3) != 0
    }
    /// EIM: x2APIC destinations in IRTEs.
    pub const fn extended_interrupt_mode(self) -> bool {
        self.0 & (1 << 4) != 0
    }
    /// PT: pass-through translation type.
    pub const fn pass_through(self) -> bool {
        self.0 & (1 << 6) != 0
    }
    /// SC: snoop control.
    pub const fn snoop_control(self) -> bool {
        self.0 & (1 << 7) != 0
    }
    /// IRO (bits 17:8) * 16: offset of the IOTLB registers (IVA, then IOTLB at +8).
    pub const fn iotlb_offset(self) -> usize {
        (((self.0 >> 8) & 0x3FF) * 16) as usize
    }
    /// SMTS: scalable-mode translation (Ally uses legacy mode).
    pub const fn scalable_mode(self) -> bool {
        self.0 & (1 << 43) != 0
    }
}

/// Whether a faulting request read or wrote.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultAccess {
    Read,
    Write,
}

/// A primary fault record (VT-d 11.4.14): which device did what where, and why the unit
/// blocked it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FaultRecord {
    pub source: SourceId,
    pub reason: u8,
    /// The page address of the request (bits 63:12 of FI), or for an interrupt-remapping
    /// fault the interrupt index in its bits 63:48.
    pub address: u64,
    pub access: FaultAccess,
    /// The PASID, when the request carried one.
    pub pasid: Option<u32>,
    pub privileged: bool,
    pub execute: bool,
}

impl FaultRecord {
    /// Decodes the record's low and high quadwords; `None` unless F (bit 127) is set.
    pub const fn decode(lo: u64, hi: u64) -> Option<Self> {
        if hi & (1 << 63) == 0 {
            return None;
        }
        let pasid = if hi & (1 << 31) != 0 {
            Some(((hi >> 40) & 0xF_FFFF) as u32)
        } else {
            None
        };
        Some(Self {
            source: SourceId(hi as u16),
            reason: (hi >> 32) as u8,
            address: lo & !0xFFF,
            // T1 (bit 126): 0 write, 1 read.
            access: if hi & (1 << 62) != 0 {
                FaultAccess::Read
            } else {
                FaultAccess::Write
            },
            pasid,
            privileged: hi & (1 << 29) != 0,
            execute: hi & (1 << 30) != 0,
        })
    }

    /// Whether the fault came from interrupt remapping (reasons 20h..2Fh).
    pub const fn is_interrupt_fault(&self) -> bool {
        self.reason >= 0x20 && self.reason < 0x30
    }
}

/// What a fault reason means (VT-d Appendix A, "Non-Recoverable Fault Reason Encodings"),
/// for the legacy-mode translation and interrupt-remapping reasons Ally can cause.
pub const fn fault_reason_name(reason: u8) -> &'static str {
    match reason {
        0x01 => "root entry not present",
        0x02 => "context entry not present",
        0x03 => "invalid context entry",
        0x04 => "address beyond the domain's address width",
        0x05 => "write to a page without write permission",
        0x06 => "read from a page without read permission",
        0x07 => "error accessing a second-level paging entry",
        0x08 => "error accessing the root table",
        0x09 => "error accessing a context table",
        0x0A => "reserved bits set in a root entry",
        0x0B => "reserved bits set in a context entry",
        0x0C => "reserved bits set in a second-level paging entry",
        0x0D => "translation request blocked by the context entry's translation type",
        0x20 => "reserved bits set in an interrupt request",
        0x21 => "interrupt index beyond the remapping table",
        0x22 => "interrupt-remapping entry not present",
        0x23 => "error accessing the interrupt-remapping table",
        0x24 => "reserved bits set in an interrupt-remapping entry",
        0x25 => "compatibility-format interrupt blocked",
        0x26 => "interrupt blocked by source-id validation",
        _ => "reserved or scalable-mode fault reason",
    }
}

impl fmt::Display for FaultRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_interrupt_fault() {
            write!(
                f,
                "interrupt-remapping fault from {} index {}",
                self.source,
                self.address >> 48
            )?;
        } else {
            let access = match self.access {
                FaultAccess::Read => "read",
                FaultAccess::Write => "write",
            };
            write!(
                f,
                "DMA {access} fault from {} at {:#x}",
                self.source, self.address
            )?;
        }
        if let Some(p) = self.pasid {
            write!(f, " pasid={p:#x}")?;
        }
        write!(
            f,
            ": reason={:#04x} {}",
            self.reason,
            fault_reason_name(self.reason)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::FakeFrames;
    use super::*;
    use crate::addr::PhysRange;
    use crate::addr::PAGE_SIZE;
    use crate::iommu::{DmaPageTables, MapStats};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn r(start: u64, end: u64) -> PhysRange {
        PhysRange { start, end }
    }

    #[test]
    fn root_and_context_entries() {
        let root = RootEntry::new(HostPhysAddr(0x1234_5000));
        assert_eq!((root.lo, root.hi), (0x1234_5001, 0));
        assert!(root.present() && !RootEntry::default().present());
        assert_eq!(root.context_table(), HostPhysAddr(0x1234_5000));

        let c = ContextEntry::new(
            HostPhysAddr(0xabc_d000),
            PagingLevels::Four,
            0x1234,
            TranslationType::Untranslated,
        );
        // P, TT 00b, SLPTPTR; AW 010b (48-bit), DID in bits 23:8.
        assert_eq!((c.lo, c.hi), (0xabc_d001, 0x12_3402));
        assert!(c.present() && !c.fault_processing_disabled());
        assert_eq!(c.translation_type(), Some(TranslationType::Untranslated));
        assert_eq!(c.levels(), Some(PagingLevels::Four));
        assert_eq!(c.domain_id(), 0x1234);
        assert_eq!(c.second_level_root(), HostPhysAddr(0xabc_d000));
        let c3 = ContextEntry::new(
            HostPhysAddr(0x1000),
            PagingLevels::Three,
            1,
            TranslationType::PassThrough,
        );
        assert_eq!((c3.lo & 0xF, c3.hi & 7), (0b1001, 1));
        assert_eq!(c3.translation_type(), Some(TranslationType::PassThrough));
        let odd = ContextEntry { lo: 0b1111, hi: 3 };
        assert!(odd.fault_processing_disabled());
        assert_eq!((odd.translation_type(), odd.levels()), (None, None));
        let dev_tlb = ContextEntry { lo: 0b0101, hi: 0 };
        assert_eq!(
            dev_tlb.translation_type(),
            Some(TranslationType::UntranslatedAndTranslated)
        );
    }

    #[test]
    fn root_table_points_devices_at_domains() {
        let mut m = FakeFrames::new(10);
        let mut rt = RootTable::new(&mut m).unwrap();
        let nic = SourceId::new(3, 0, 0);
        assert_eq!(rt.context(nic, &mut m), None);
        let tables = IommuPageTables::new(PagingLevels::Three, PageSizes::ALL, &mut m).unwrap();
        let entry = tables.context_entry(7);
        rt.set_context(nic, entry, &mut m).unwrap();
        rt.set_context(SourceId::new(3, 0, 1), entry, &mut m)
            .unwrap();
        assert_eq!(rt.context(nic, &mut m), Some(entry));
        // Same bus, one context table: root + page-table root + one context table.
        assert_eq!(m.frames.len(), 3);
        // A device on the same bus without an entry reads as not present.
        let other = rt.context(SourceId::new(3, 1, 0), &mut m).unwrap();
        assert!(!other.present());
        // Raw layout: root entry for bus 3 at words 6..8, context entry at 2 * devfn.
        let root = m.table(rt.root())[6];
        assert_eq!(root & 1, 1);
        let ctx = m.table(HostPhysAddr(root & !0xFFF))[0];
        assert_eq!(ctx, entry.lo);
        assert_eq!(entry.second_level_root(), tables.root());
        assert_eq!(entry.levels(), Some(PagingLevels::Three));
        assert_eq!(rtaddr(rt.root()), rt.root().0);
        // No frame for a new bus's context table.
        let mut full = FakeFrames::new(1);
        let mut rt = RootTable::new(&mut full).unwrap();
        assert_eq!(
            rt.set_context(nic, entry, &mut full),
            Err(IommuError::OutOfFrames)
        );
        assert!(RootTable::new(&mut full).is_err());
    }

    #[test]
    fn large_pages_when_aligned_and_supported() {
        for (sizes, expect) in [
            (
                PageSizes::ALL,
                MapStats {
                    pages_1g: 1,
                    pages_2m: 1,
                    pages_4k: 1,
                    tables: 3,
                },
            ),
            (
                PageSizes {
                    two_mib: true,
                    one_gib: false,
                },
                MapStats {
                    pages_2m: 513,
                    pages_4k: 1,
                    tables: 4,
                    ..MapStats::default()
                },
            ),
        ] {
            let mut m = FakeFrames::new(100);
            let mut t = IommuPageTables::new(PagingLevels::Four, sizes, &mut m).unwrap();
            // [1 GiB, 2 GiB + 2 MiB + 4 KiB)
            let stats = t
                .map_identity(
                    r(GIB, 2 * GIB + 2 * MIB + PAGE_SIZE),
                    DmaAccess::ReadWrite,
                    &mut m,
                )
                .unwrap();
            assert_eq!(stats, expect);
            let tr = t.translate(GIB + 0x1234, &mut m).unwrap();
            assert_eq!(tr.hpa, HostPhysAddr(GIB + 0x1234));
            assert_eq!(tr.access, DmaAccess::ReadWrite);
            assert_eq!(tr.page_size, if sizes.one_gib { GIB } else { 2 * MIB });
            assert_eq!(
                t.translate(2 * GIB + 2 * MIB, &mut m).unwrap().page_size,
                PAGE_SIZE
            );
            assert_eq!(t.translate(2 * GIB + 2 * MIB + PAGE_SIZE, &mut m), None);
            assert_eq!(t.translate(GIB - 1, &mut m), None);
        }
        // 4 KiB pages only: 2 MiB needs one page table of 512 entries.
        let mut m = FakeFrames::new(100);
        let mut t = IommuPageTables::new(PagingLevels::Three, PageSizes::SMALL, &mut m).unwrap();
        let stats = t
            .map_identity(r(0, 2 * MIB), DmaAccess::ReadOnly, &mut m)
            .unwrap();
        assert_eq!((stats.pages_4k, stats.tables), (512, 2));
        let tr = t.translate(0x1000, &mut m).unwrap();
        assert_eq!((tr.access, tr.page_size), (DmaAccess::ReadOnly, PAGE_SIZE));
        // The raw leaf: R, no W, no PS. Three levels: the root is the 1 GiB-entry table.
        let pd = SlPte(m.table(t.root())[0]).address();
        let pt = SlPte(m.table(pd)[0]).address();
        assert_eq!(m.table(pt)[1], 0x1000 | SlPte::READ);
        assert_eq!(m.table(t.root())[0] & 0xFFF, SlPte::READ | SlPte::WRITE);
    }

    #[test]
    fn remapping_inside_a_large_page_splits_it() {
        let mut m = FakeFrames::new(100);
        let mut t = IommuPageTables::new(PagingLevels::Four, PageSizes::ALL, &mut m).unwrap();
        t.map_identity(r(0, GIB), DmaAccess::ReadWrite, &mut m)
            .unwrap();
        let stats = t
            .map_identity(
                r(4 * MIB + PAGE_SIZE, 4 * MIB + 2 * PAGE_SIZE),
                DmaAccess::ReadOnly,
                &mut m,
            )
            .unwrap();
        // The 1 GiB page became 512 2 MiB pages, one of which became 512 4 KiB pages.
        assert_eq!((stats.tables, stats.pages_4k), (2, 1));
        let at = |a, m: &mut FakeFrames| t.translate(a, m).unwrap();
        assert_eq!(at(4 * MIB + PAGE_SIZE, &mut m).access, DmaAccess::ReadOnly);
        assert_eq!(at(4 * MIB, &mut m).access, DmaAccess::ReadWrite);
        assert_eq!(at(4 * MIB, &mut m).page_size, PAGE_SIZE);
        assert_eq!(at(6 * MIB, &mut m).page_size, 2 * MIB);
        assert_eq!(at(GIB - 1, &mut m).hpa, HostPhysAddr(GIB - 1));
    }

    #[test]
    fn a_large_mapping_fills_an_existing_table() {
        let mut m = FakeFrames::new(100);
        let mut t = IommuPageTables::new(PagingLevels::Three, PageSizes::ALL, &mut m).unwrap();
        t.map_identity(r(0, PAGE_SIZE), DmaAccess::ReadOnly, &mut m)
            .unwrap();
        let frames = m.frames.len();
        let stats = t
            .map_identity(r(0, 2 * MIB), DmaAccess::ReadWrite, &mut m)
            .unwrap();
        // No new table, no orphaned one: the page table was filled.
        assert_eq!(m.frames.len(), frames);
        assert_eq!((stats.pages_4k, stats.pages_2m), (512, 0));
        assert_eq!(t.translate(0, &mut m).unwrap().access, DmaAccess::ReadWrite);
    }

    #[test]
    fn bad_ranges_are_errors() {
        let mut m = FakeFrames::new(3);
        let mut t = IommuPageTables::new(PagingLevels::Three, PageSizes::ALL, &mut m).unwrap();
        assert_eq!(t.levels(), PagingLevels::Three);
        let rw = DmaAccess::ReadWrite;
        assert_eq!(
            t.map_identity(r(0x1800, 0x3000), rw, &mut m),
            Err(IommuError::Unaligned {
                what: "DMA range start",
                value: 0x1800
            })
        );
        assert!(matches!(
            t.map_identity(r(0x1000, 0x2800), rw, &mut m),
            Err(IommuError::Unaligned { .. })
        ));
        assert!(matches!(
            t.map_identity(r(0x3000, 0x1000), rw, &mut m),
            Err(IommuError::Inverted { .. })
        ));
        assert_eq!(
            t.map_identity(r(0, (1 << 39) + PAGE_SIZE), rw, &mut m),
            Err(IommuError::AboveAddressWidth {
                range: r(0, (1 << 39) + PAGE_SIZE),
                width: 39
            })
        );
        assert_eq!(
            t.map_identity(r(0x5000, 0x5000), rw, &mut m),
            Ok(MapStats::default())
        );
        // Root + 2 frames: a PD and a PT, then nothing for a second PT.
        t.map_identity(r(0, PAGE_SIZE), rw, &mut m).unwrap();
        assert_eq!(
            t.map_identity(r(2 * MIB, 2 * MIB + PAGE_SIZE), rw, &mut m),
            Err(IommuError::OutOfFrames)
        );
        assert_eq!(t.translate(1 << 39, &mut m), None);
        let mut none = FakeFrames::new(0);
        assert!(IommuPageTables::new(PagingLevels::Four, PageSizes::ALL, &mut none).is_err());
    }

    #[test]
    fn interrupt_remapping_entries() {
        // Vector 0x31 to xAPIC 2, fixed, edge, physical, only from the I/O APIC's SID.
        let e = Irte::remapped(
            0x31,
            IrteDestination::XApic(2),
            false,
            false,
            DeliveryMode::Fixed,
            SourceValidation::RequesterId {
                sid: SourceId::new(0xff, 0, 0),
                sq: 0,
            },
        );
        assert_eq!(e.lo, 0x0000_0200_0031_0001);
        assert_eq!(e.hi, (1 << 18) | 0xff00);
        assert!(e.present() && !e.logical() && !e.level_triggered());
        assert_eq!(
            (e.vector(), e.destination(), e.delivery_mode()),
            (0x31, 0x200, 0)
        );
        assert_eq!(
            (
                e.source_validation_type(),
                e.source_id(),
                e.source_qualifier()
            ),
            (1, 0xff00, 0)
        );
        // x2APIC 0x1_0000 logical, level, lowest priority, devices behind a bridge on
        // buses 4..=6.
        let e = Irte::remapped(
            0xec,
            IrteDestination::X2Apic(0x1_0000),
            true,
            true,
            DeliveryMode::LowestPriority,
            SourceValidation::Bus { first: 4, last: 6 },
        );
        assert_eq!(e.lo, (0x1_0000 << 32) | (0xec << 16) | (1 << 5) | 0b10101);
        assert_eq!(e.hi, (2 << 18) | 0x0406);
        assert!(e.logical() && e.level_triggered());
        let e = Irte::remapped(
            2,
            IrteDestination::XApic(0),
            false,
            false,
            DeliveryMode::Nmi,
            SourceValidation::None,
        );
        assert_eq!((e.delivery_mode(), e.hi), (4, 0));
        assert!(!Irte::default().present());
        for (mode, raw) in [
            (DeliveryMode::Smi, 2),
            (DeliveryMode::Init, 5),
            (DeliveryMode::ExtInt, 7),
        ] {
            assert_eq!(mode as u8, raw);
        }
    }

    #[test]
    fn register_values() {
        assert_eq!(irta(HostPhysAddr(0x7000_0000), 7, true), 0x7000_0807);
        assert_eq!(irta(HostPhysAddr(0x7000_0000), 15, false), 0x7000_000f);
        assert_eq!(iqa(HostPhysAddr(0x7100_0000), 0), 0x7100_0000);
        assert_eq!(fault_record_index(0x0302), 3);
        assert_eq!(regs::CCMD_ICC | regs::CCMD_GLOBAL, 0xa000_0000_0000_0000);
        assert_eq!(regs::IOTLB_IVT | regs::IOTLB_GLOBAL, 0x9000_0000_0000_0000);
        assert_eq!(regs::GSTS_TES, regs::GCMD_TE);
        assert_eq!((regs::IRTA, regs::IQA, regs::FSTS), (0xb8, 0x90, 0x34));
    }

    #[test]
    fn capabilities() {
        // Shaped like QEMU's intel-iommu (aw-bits=48): ND 6, SAGAW 39|48, MGAW 48,
        // FRO 0x220, SLLPS 2 MiB|1 GiB, PSI, one fault record.
        let cap = Cap(6 | (0b110 << 8) | (47 << 16) | ((0x220 / 16) << 24) | (3 << 34) | (1 << 39));
        assert_eq!(cap.domain_count(), 65536);
        assert!(cap.supports(PagingLevels::Three) && cap.supports(PagingLevels::Four));
        assert_eq!(cap.max_guest_address_width(), 48);
        assert_eq!(cap.fault_recording_offset(), 0x220);
        assert_eq!(cap.fault_recording_count(), 1);
        assert_eq!(cap.fault_record_offset(2), 0x240);
        assert_eq!(cap.second_level_page_sizes(), PageSizes::ALL);
        assert!(cap.page_selective_invalidation() && !cap.caching_mode());
        assert!(!cap.required_write_buffer_flush());
        assert!(!cap.protected_low_memory() && !cap.protected_high_memory());
        assert_eq!(cap.levels_for(1 << 30), Some(PagingLevels::Three));
        assert_eq!(cap.levels_for((1 << 39) + 1), Some(PagingLevels::Four));
        assert_eq!(cap.levels_for((1 << 48) + 1), None);
        // A 4-level-only unit with a 39-bit MGAW cannot map beyond 2^39.
        let narrow = Cap((0b100 << 8) | (38 << 16) | (1 << 7) | 0b1110000);
        assert_eq!(narrow.levels_for(1 << 30), Some(PagingLevels::Four));
        assert_eq!(narrow.levels_for((1 << 39) + 1), None);
        assert!(narrow.caching_mode() && narrow.required_write_buffer_flush());
        assert!(narrow.protected_low_memory() && narrow.protected_high_memory());
        assert_eq!(narrow.second_level_page_sizes(), PageSizes::SMALL);

        // QI, IR, EIM, PT, IRO 0xf0.
        let ecap = Ecap(0b101_1010 | ((0xf0 / 16) << 8));
        assert!(ecap.queued_invalidation() && ecap.interrupt_remapping());
        assert!(ecap.extended_interrupt_mode() && ecap.pass_through());
        assert!(!ecap.coherent() && !ecap.device_tlb() && !ecap.snoop_control());
        assert!(!ecap.scalable_mode() && Ecap(1 << 43).scalable_mode());
        assert!(Ecap(0x85).coherent() && Ecap(0x85).device_tlb() && Ecap(0x85).snoop_control());
        assert_eq!(ecap.iotlb_offset(), 0xf0);
    }

    #[test]
    fn fault_records_read_well() {
        // F, T1 = 0 (write), reason 5, source 00:02.0, page 0x1234_5000.
        let hi = (1 << 63) | (0x05 << 32) | 0x0010;
        let f = FaultRecord::decode(0x1234_5678, hi).unwrap();
        assert_eq!(f.source, SourceId::new(0, 2, 0));
        assert_eq!(
            (f.reason, f.address, f.access),
            (5, 0x1234_5000, FaultAccess::Write)
        );
        assert_eq!((f.pasid, f.privileged, f.execute), (None, false, false));
        assert_eq!(
            f.to_string(),
            "DMA write fault from 00:02.0 at 0x12345000: \
             reason=0x05 write to a page without write permission"
        );
        // A read with a PASID, privileged, executing.
        let hi = (1 << 63) | (1 << 62) | (0x2a << 40) | (0x06 << 32) | (7 << 29) | 0x0300;
        let f = FaultRecord::decode(0x8000_0000, hi).unwrap();
        assert_eq!((f.access, f.pasid), (FaultAccess::Read, Some(0x2a)));
        assert!(f.privileged && f.execute);
        assert_eq!(
            f.to_string(),
            "DMA read fault from 03:00.0 at 0x80000000 pasid=0x2a: \
             reason=0x06 read from a page without read permission"
        );
        // An interrupt-remapping fault: the index is in FI bits 63:48.
        let f = FaultRecord::decode(5 << 48, (1 << 63) | (0x22 << 32) | 0xff00).unwrap();
        assert!(f.is_interrupt_fault());
        assert_eq!(
            f.to_string(),
            "interrupt-remapping fault from ff:00.0 index 5: \
             reason=0x22 interrupt-remapping entry not present"
        );
        assert_eq!(FaultRecord::decode(0x1000, 0x05 << 32), None);
        for (reason, name) in [
            (0x01, "root entry not present"),
            (0x02, "context entry not present"),
            (0x04, "address beyond the domain's address width"),
            (
                0x0d,
                "translation request blocked by the context entry's translation type",
            ),
            (0x26, "interrupt blocked by source-id validation"),
            (0x31, "reserved or scalable-mode fault reason"),
        ] {
            assert_eq!(fault_reason_name(reason), name);
        }
    }
}
