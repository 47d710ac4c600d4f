//! AMD-Vi in-memory structures and registers (AMD I/O Virtualization Technology (IOMMU)
//! Specification, 48882 rev. 3.x): the device table entry that puts a device in a domain
//! and routes its interrupts, host I/O page tables, the basic-format interrupt-remapping
//! entry, the MMIO register offsets and a decoder for event-log entries.
//!
//! Nothing here touches hardware; the wiring writes these values to memory and to the
//! registers of the IOMMUs the IVRS lists.

use super::ivrs::DteSetting;
use super::table::{EntryFormat, Tables, ADDR_MASK};
use super::{DmaAccess, PagingLevels, SourceId};
use crate::addr::HostPhysAddr;
use core::fmt;

/// What the IOMMU does with a device's fixed and arbitrated interrupts (DTE IntCtl).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IntCtl {
    /// 00b: abort them.
    Abort = 0,
    /// 01b: forward them unmapped. Never for a guest's devices: an MSI could target
    /// any APIC with any vector.
    Forward = 1,
    /// 10b: remap them through the interrupt table.
    Remap = 2,
}

/// A device table entry (48882 2.2.2.1, Figure 7 / Table 7): 256 bits, four quadwords.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(C)]
pub struct DeviceTableEntry {
    pub data: [u64; 4],
}

const _: () = assert!(core::mem::size_of::<DeviceTableEntry>() == 32);

impl DeviceTableEntry {
    // Quadword 0.
    const V: u64 = 1 << 0;
    const TV: u64 = 1 << 1;
    const MODE_SHIFT: u32 = 9;
    const IR: u64 = 1 << 61;
    const IW: u64 = 1 << 62;
    // Quadword 1 (entry bits 127:64).
    const EX: u64 = 1 << 39;
    const SYS_MGT_SHIFT: u32 = 40;
    // Quadword 2 (entry bits 191:128).
    const IV: u64 = 1 << 0;
    const INT_TAB_LEN_SHIFT: u32 = 1;
    const INT_TABLE_MASK: u64 = 0x000F_FFFF_FFFF_FFC0;
    const INIT_PASS: u64 = 1 << 56;
    const EINT_PASS: u64 = 1 << 57;
    const NMI_PASS: u64 = 1 << 58;
    const INT_CTL_SHIFT: u32 = 60;
    const LINT0_PASS: u64 = 1 << 62;
    const LINT1_PASS: u64 = 1 << 63;

    /// A valid entry that lets nothing through: translation information valid with
    /// Mode 0 and neither IR nor IW blocks all DMA, and a valid interrupt map with
    /// IntCtl = abort and no pass bits blocks every interrupt. For devices no domain
    /// claims.
    pub const fn blocked() -> Self {
        Self {
            data: [Self::V | Self::TV, 0, Self::IV, 0],
        }
    }

    /// A valid entry translating through `tables` (`levels` deep) in `domain`, with
    /// read and write permitted subject to the tables. Interrupts stay blocked until
    /// [`DeviceTableEntry::with_interrupt_table`].
    pub const fn translated(tables: HostPhysAddr, levels: PagingLevels, domain: u16) -> Self {
        let mode = levels.count() as u64;
        Self {
            data: [
                Self::V
                    | Self::TV
                    | (mode << Self::MODE_SHIFT)
                    | (tables.0 & ADDR_MASK)
                    | Self::IR
                    | Self::IW,
                domain as u64,
                Self::IV,
                0,
            ],
        }
    }

    /// The entry with interrupts handled by `ctl` through the table at `table`
    /// (128-byte aligned) of 2^`len_log2` entries (`len_log2` up to 11).
    pub const fn with_interrupt_table(
        mut self,
        table: HostPhysAddr,
        len_log2: u8,
        ctl: IntCtl,
    ) -> Self {
        let q = &mut self.data[2];
        *q &=
            !(Self::INT_TABLE_MASK | (0xF << Self::INT_TAB_LEN_SHIFT) | (3 << Self::INT_CTL_SHIFT));
        *q |= Self::IV
            | (table.0 & Self::INT_TABLE_MASK)
            | (((len_log2 & 0xF) as u64) << Self::INT_TAB_LEN_SHIFT)
            | ((ctl as u64) << Self::INT_CTL_SHIFT);
        self
    }

    /// The entry with the pass-through and system-management bits the IVHD device
    /// entry asks for (48882 5.2.2.2, Table 99).
    pub const fn with_ivhd_setting(mut self, dte: DteSetting) -> Self {
        let mut q2 = self.data[2]
            & !(Self::INIT_PASS
                | Self::EINT_PASS
                | Self::NMI_PASS
                | Self::LINT0_PASS
                | Self::LINT1_PASS);
        if dte.init_pass() {
            q2 |= Self::INIT_PASS;
        }
        if dte.ext_int_pass() {
            q2 |= Self::EINT_PASS;
        }
        if dte.nmi_pass() {
            q2 |= Self::NMI_PASS;
        }
        if dte.lint0_pass() {
            q2 |= Self::LINT0_PASS;
        }
        if dte.lint1_pass() {
            q2 |= Self::LINT1_PASS;
        }
        self.data[2] = q2;
        self.data[1] = (self.data[1] & !(3 << Self::SYS_MGT_SHIFT))
            | ((dte.sys_mgt() as u64) << Self::SYS_MGT_SHIFT);
        self
    }

    /// The entry with EX (exclusion ranges apply to the device) set or clear.
    pub const fn with_exclusion(mut self, allowed: bool) -> Self {
        if allowed {
            self.data[1] |= Self::EX;
        } else {
            self.data[1] &= !Self::EX;
        }
        self
    }

    pub const fn valid(&self) -> bool {
        self.data[0] & Self::V != 0
    }
    pub const fn translation_valid(&self) -> bool {
        self.data[0] & Self::TV != 0
    }
    /// Mode: page-table levels, 0 for translation disabled.
    pub const fn mode(&self) -> u8 {
        ((self.data[0] >> Self::MODE_SHIFT) & 7) as u8
    }
    pub const fn page_table_root(&self) -> HostPhysAddr {
        HostPhysAddr(self.data[0] & ADDR_MASK)
    }
    pub const fn read_permitted(&self) -> bool {
        self.data[0] & Self::IR != 0
    }
    pub const fn write_permitted(&self) -> bool {
        self.data[0] & Self::IW != 0
    }
    pub const fn domain_id(&self) -> u16 {
        self.data[1] as u16
    }
    pub const fn exclusion(&self) -> bool {
        self.data[1] & Self::EX != 0
    }
    pub const fn sys_mgt(&self) -> u8 {
        ((self.data[1] >> Self::SYS_MGT_SHIFT) & 3) as u8
    }
    pub const fn interrupt_map_valid(&self) -> bool {
        self.data[2] & Self::IV != 0
    }
    pub const fn int_tab_len(&self) -> u8 {
        ((self.data[2] >> Self::INT_TAB_LEN_SHIFT) & 0xF) as u8
    }
    pub const fn interrupt_table(&self) -> HostPhysAddr {
        HostPhysAddr(self.data[2] & Self::INT_TABLE_MASK)
    }
    /// IntCtl; `None` for the reserved encoding 11b.
    pub const fn int_ctl(&self) -> Option<IntCtl> {
        match (self.data[2] >> Self::INT_CTL_SHIFT) & 3 {
            0 => Some(IntCtl::Abort),
            1 => Some(IntCtl::Forward),
            2 => Some(IntCtl::Remap),
            _ => None,
        }
    }
    pub const fn init_pass(&self) -> bool {
        self.data[2] & Self::INIT_PASS != 0
    }
    pub const fn eint_pass(&self) -> bool {
        self.data[2] & Self::EINT_PASS != 0
    }
    pub const fn nmi_pass(&self) -> bool {
        self.data[2] & Self::NMI_PASS != 0
    }
    pub const fn lint0_pass(&self) -> bool {
        self.data[2] & Self::LINT0_PASS != 0
    }
    pub const fn lint1_pass(&self) -> bool {
        self.data[2] & Self::LINT1_PASS != 0
    }
}

/// An I/O page-table entry (48882 2.2.3, Figures 9-11 / Tables 14-15).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(transparent)]
pub struct IoPte(pub u64);

const _: () = assert!(core::mem::size_of::<IoPte>() == 8);

impl IoPte {
    pub const PRESENT: u64 = 1 << 0;
    /// FC: force the coherent attribute on the upstream request.
    pub const FORCE_COHERENT: u64 = 1 << 60;
    pub const READ: u64 = 1 << 61;
    pub const WRITE: u64 = 1 << 62;

    pub const fn present(self) -> bool {
        self.0 & Self::PRESENT != 0
    }
    /// Next Level (bits 11:9): the level of the table this entry points at; 0 in a leaf
    /// of the default page size of its level, 7 in a leaf of another size.
    pub const fn next_level(self) -> u8 {
        ((self.0 >> 9) & 7) as u8
    }
    pub const fn readable(self) -> bool {
        self.0 & Self::READ != 0
    }
    pub const fn writable(self) -> bool {
        self.0 & Self::WRITE != 0
    }
    pub const fn address(self) -> HostPhysAddr {
        HostPhysAddr(self.0 & ADDR_MASK)
    }
}

/// The I/O page-table entry encoding for the shared builder.
pub struct HostIo;

impl EntryFormat for HostIo {
    fn is_present(entry: u64) -> bool {
        IoPte(entry).present()
    }
    fn is_leaf(entry: u64, level: u32) -> bool {
        level == 1 || matches!(IoPte(entry).next_level(), 0 | 7)
    }
    fn table_entry(table: HostPhysAddr, level: u32) -> u64 {
        // Permissions are ANDed along the walk: tables grant both and the leaf decides.
        (table.0 & ADDR_MASK)
            | (u64::from(level - 1) << 9)
            | IoPte::PRESENT
            | IoPte::READ
            | IoPte::WRITE
    }
    fn leaf_entry(addr: u64, _level: u32, access: DmaAccess) -> u64 {
        let write = if access.writable() { IoPte::WRITE } else { 0 };
        (addr & ADDR_MASK) | IoPte::PRESENT | IoPte::FORCE_COHERENT | IoPte::READ | write
    }
    fn access(entry: u64) -> DmaAccess {
        if IoPte(entry).writable() {
            DmaAccess::ReadWrite
        } else {
            DmaAccess::ReadOnly
        }
    }
}

/// A domain's host I/O page tables, identity-mapping what a [`super::DmaDomainPlan`]
/// allows: 3 levels (39-bit) or 4 (48-bit); leaves of 2 MiB and 1 GiB are NextLevel-0
/// entries at levels 2 and 3, which every AMD-Vi IOMMU walks.
pub type IoPageTables = Tables<HostIo>;

impl IoPageTables {
    /// The device table entry that makes a device translate through these tables in
    /// `domain`.
    pub fn device_table_entry(&self, domain: u16) -> DeviceTableEntry {
        DeviceTableEntry::translated(self.root, self.levels, domain)
    }
}

/// Interrupt types a basic-format IRTE delivers. The other message types (SMI, NMI,
/// INIT, ExtINT) are not remapped: the DTE's pass bits let them through or block them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IrteIntType {
    Fixed = 0,
    Arbitrated = 1,
}

/// An interrupt-remapping table entry, basic 32-bit format (48882 2.2.5.1, Figure 15 /
/// Table 21), as used while the control register's GAEn is clear.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(transparent)]
pub struct Irte(pub u32);

const _: () = assert!(core::mem::size_of::<Irte>() == 4);

impl Irte {
    const REMAP_EN: u32 = 1 << 0;
    const SUP_IOPF: u32 = 1 << 1;
    const DM: u32 = 1 << 6;
    const GUEST_MODE: u32 = 1 << 7;

    /// An entry remapping to `vector` at APIC `destination` (physical, or logical when
    /// `logical`). GuestMode stays 0: basic format. `suppress_faults` sets SupIOPF, which
    /// keeps faults on this entry out of the event log.
    pub const fn remapped(
        vector: u8,
        destination: u8,
        logical: bool,
        int_type: IrteIntType,
        suppress_faults: bool,
    ) -> Self {
        let mut v = Self::REMAP_EN
            | ((int_type as u32) << 2)
            | ((destination as u32) << 8)
            | ((vector as u32) << 16);
        if logical {
            v |= Self::DM;
        }
        if suppress_faults {
            v |= Self::SUP_IOPF;
        }
        Self(v)
    }

    pub const fn remap_enabled(self) -> bool {
        self.0 & Self::REMAP_EN != 0
    }
    pub const fn suppress_faults(self) -> bool {
        self.0 & Self::SUP_IOPF != 0
    }
    /// IntType (bits 4:2), raw.
    pub const fn int_type(self) -> u8 {
        ((self.0 >> 2) & 7) as u8
    }
    pub const fn logical(self) -> bool {
        self.0 & Self::DM != 0
    }
    pub const fn guest_mode(self) -> bool {
        self.0 & Self::GUEST_MODE != 0
    }
    pub const fn destination(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub const fn vector(self) -> u8 {
        (self.0 >> 16) as u8
    }
}

/// MMIO register offsets of an IOMMU (48882 3.4, Table 29 and on).
pub mod regs {
    /// Device table base address: base in bits 51:12, size in 4 KiB pages minus one in
    /// bits 8:0 (see [`super::device_table_base`]).
    pub const DEV_TABLE_BASE: usize = 0x0000;
    /// Command buffer base address: base, ComLen in bits 59:56 ([`super::ring_base`]).
    pub const CMD_BUF_BASE: usize = 0x0008;
    /// Event log base address: base, EventLen in bits 59:56 ([`super::ring_base`]).
    pub const EVENT_LOG_BASE: usize = 0x0010;
    /// Control register (64-bit).
    pub const CONTROL: usize = 0x0018;
    /// Exclusion range base (ExEn bit 0, Allow bit 1) and limit.
    pub const EXCLUSION_BASE: usize = 0x0020;
    pub const EXCLUSION_LIMIT: usize = 0x0028;
    /// Extended feature register.
    pub const EXT_FEATURES: usize = 0x0030;
    /// PPR log base address.
    pub const PPR_LOG_BASE: usize = 0x0038;
    /// Command buffer and event log head and tail pointers (byte offsets, bits 18:4).
    pub const CMD_BUF_HEAD: usize = 0x2000;
    pub const CMD_BUF_TAIL: usize = 0x2008;
    pub const EVENT_LOG_HEAD: usize = 0x2010;
    pub const EVENT_LOG_TAIL: usize = 0x2018;
    /// Status register.
    pub const STATUS: usize = 0x2020;

    /// Control register bits (48882 3.4.5).
    pub const CONTROL_IOMMU_EN: u64 = 1 << 0;
    pub const CONTROL_HT_TUN_EN: u64 = 1 << 1;
    pub const CONTROL_EVENT_LOG_EN: u64 = 1 << 2;
    pub const CONTROL_EVENT_INT_EN: u64 = 1 << 3;
    pub const CONTROL_COM_WAIT_INT_EN: u64 = 1 << 4;
    pub const CONTROL_PASS_PW: u64 = 1 << 8;
    pub const CONTROL_RES_PASS_PW: u64 = 1 << 9;
    pub const CONTROL_COHERENT: u64 = 1 << 10;
    pub const CONTROL_ISOC: u64 = 1 << 11;
    pub const CONTROL_CMD_BUF_EN: u64 = 1 << 12;
    pub const CONTROL_PPR_LOG_EN: u64 = 1 << 13;
    pub const CONTROL_PPR_INT_EN: u64 = 1 << 14;
    pub const CONTROL_PPR_EN: u64 = 1 << 15;
    pub const CONTROL_GT_EN: u64 = 1 << 16;
    /// GAEn: guest virtual APIC mode; must stay clear for the basic-format [`super::Irte`].
    pub const CONTROL_GA_EN: u64 = 1 << 17;

    /// Status register bits (48882 3.4.13).
    pub const STATUS_EVENT_OVERFLOW: u64 = 1 << 0;
    pub const STATUS_EVENT_LOG_INT: u64 = 1 << 1;
    pub const STATUS_COM_WAIT_INT: u64 = 1 << 2;
    pub const STATUS_EVENT_LOG_RUN: u64 = 1 << 3;
    pub const STATUS_CMD_BUF_RUN: u64 = 1 << 4;
}

/// Bytes per device table entry, command and event-log entry.
pub const DTE_SIZE: u64 = 32;
pub const COMMAND_SIZE: u64 = 16;
pub const EVENT_SIZE: u64 = 16;

/// The device table base register for a table of `entries` DTEs at `base` (a multiple of
/// 128 entries, up to 65536: a whole number of 4 KiB pages, at most 512).
pub const fn device_table_base(base: HostPhysAddr, entries: u32) -> u64 {
    let pages = (entries as u64 * DTE_SIZE).div_ceil(4096);
    (base.0 & ADDR_MASK) | (pages.saturating_sub(1) & 0x1FF)
}

/// The command buffer or event log base register for a ring of 2^`len_log2` 16-byte
/// entries at `base` (`len_log2` 8..=15).
pub const fn ring_base(base: HostPhysAddr, len_log2: u8) -> u64 {
    (base.0 & ADDR_MASK) | (((len_log2 & 0xF) as u64) << 56)
}

/// Event codes (48882 2.5, Table 45 and on).
pub const EVENT_ILLEGAL_DEV_TABLE_ENTRY: u8 = 0x1;
pub const EVENT_IO_PAGE_FAULT: u8 = 0x2;
pub const EVENT_DEV_TAB_HARDWARE_ERROR: u8 = 0x3;
pub const EVENT_PAGE_TAB_HARDWARE_ERROR: u8 = 0x4;
pub const EVENT_ILLEGAL_COMMAND_ERROR: u8 = 0x5;
pub const EVENT_COMMAND_HARDWARE_ERROR: u8 = 0x6;
pub const EVENT_IOTLB_INV_TIMEOUT: u8 = 0x7;
pub const EVENT_INVALID_DEVICE_REQUEST: u8 = 0x8;
pub const EVENT_INVALID_PPR_REQUEST: u8 = 0x9;
pub const EVENT_COUNTER_ZERO: u8 = 0xA;
pub const EVENT_RMP_PAGE_FAULT: u8 = 0xD;
pub const EVENT_RMP_HARDWARE_ERROR: u8 = 0xE;

/// The specification's name of an event code.
pub const fn event_name(code: u8) -> &'static str {
    match code {
        EVENT_ILLEGAL_DEV_TABLE_ENTRY => "ILLEGAL_DEV_TABLE_ENTRY",
        EVENT_IO_PAGE_FAULT => "IO_PAGE_FAULT",
        EVENT_DEV_TAB_HARDWARE_ERROR => "DEV_TAB_HARDWARE_ERROR",
        EVENT_PAGE_TAB_HARDWARE_ERROR => "PAGE_TAB_HARDWARE_ERROR",
        EVENT_ILLEGAL_COMMAND_ERROR => "ILLEGAL_COMMAND_ERROR",
        EVENT_COMMAND_HARDWARE_ERROR => "COMMAND_HARDWARE_ERROR",
        EVENT_IOTLB_INV_TIMEOUT => "IOTLB_INV_TIMEOUT",
        EVENT_INVALID_DEVICE_REQUEST => "INVALID_DEVICE_REQUEST",
        EVENT_INVALID_PPR_REQUEST => "INVALID_PPR_REQUEST",
        EVENT_COUNTER_ZERO => "EVENT_COUNTER_ZERO",
        EVENT_RMP_PAGE_FAULT => "RMP_PAGE_FAULT",
        EVENT_RMP_HARDWARE_ERROR => "RMP_HW_ERROR",
        _ => "UNKNOWN_EVENT",
    }
}

/// An event-log entry (48882 2.5): 128 bits, read as four little-endian doublewords.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Event {
    pub code: u8,
    /// The requester (bits 15:0 of the first doubleword).
    pub device: SourceId,
    /// Bits 31:16 of the first doubleword: the domain ID or PASID, by event type.
    pub tag: u16,
    /// Bits 27:16 of the second doubleword.
    pub flags: u16,
    /// The faulting address, or the address of the entry or command at fault.
    pub address: u64,
}

impl Event {
    /// IO_PAGE_FAULT / INVALID_DEVICE_REQUEST flag bits (48882 Table 47): interrupt
    /// request, page present, write, permission violation, reserved bit set,
    /// translation request.
    pub const FLAG_INTERRUPT: u16 = 1 << 3;
    pub const FLAG_PRESENT: u16 = 1 << 4;
    pub const FLAG_WRITE: u16 = 1 << 5;
    pub const FLAG_PERMISSION: u16 = 1 << 6;
    pub const FLAG_RESERVED_BIT: u16 = 1 << 7;
    pub const FLAG_TRANSLATION: u16 = 1 << 8;

    pub const fn decode(raw: [u32; 4]) -> Self {
        Self {
            code: (raw[1] >> 28) as u8,
            device: SourceId(raw[0] as u16),
            tag: (raw[0] >> 16) as u16,
            flags: ((raw[1] >> 16) & 0xFFF) as u16,
            address: raw[2] as u64 | ((raw[3] as u64) << 32),
        }
    }

    pub const fn name(&self) -> &'static str {
        event_name(self.code)
    }

    const fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        match self.code {
            EVENT_IO_PAGE_FAULT
            | EVENT_INVALID_DEVICE_REQUEST
            | EVENT_ILLEGAL_DEV_TABLE_ENTRY
            | EVENT_DEV_TAB_HARDWARE_ERROR
            | EVENT_PAGE_TAB_HARDWARE_ERROR
            | EVENT_IOTLB_INV_TIMEOUT => write!(f, " device={}", self.device)?,
            _ => {}
        }
        if matches!(
            self.code,
            EVENT_IO_PAGE_FAULT | EVENT_PAGE_TAB_HARDWARE_ERROR | EVENT_INVALID_DEVICE_REQUEST
        ) {
            write!(f, " domain/pasid={:#x}", self.tag)?;
        }
        write!(f, " address={:#x}", self.address)?;
        if matches!(
            self.code,
            EVENT_IO_PAGE_FAULT | EVENT_INVALID_DEVICE_REQUEST | EVENT_ILLEGAL_DEV_TABLE_ENTRY
        ) {
            let what = if self.has(Self::FLAG_INTERRUPT) {
                "interrupt"
            } else if self.has(Self::FLAG_WRITE) {
                "write"
            } else {
                "read"
            };
            write!(f, " {what}")?;
            for (flag, text) in [
                (Self::FLAG_PRESENT, "page present"),
                (Self::FLAG_PERMISSION, "permission denied"),
                (Self::FLAG_RESERVED_BIT, "reserved bit set"),
                (Self::FLAG_TRANSLATION, "translation request"),
            ] {
                if self.has(flag) {
                    write!(f, ", {text}")?;
                }
            }
            if self.code == EVENT_IO_PAGE_FAULT && !self.has(Self::FLAG_PRESENT) {
                f.write_str(", not mapped")?;
            }
        } else if self.flags != 0 {
            write!(f, " flags={:#x}", self.flags)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::FakeFrames;
    use super::*;
    use crate::addr::PhysRange;
    use crate::addr::PAGE_SIZE;
    use crate::iommu::{DmaPageTables, IommuError, MapStats, PageSizes};
    use crate::paging::TableMemory;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn r(start: u64, end: u64) -> PhysRange {
        PhysRange { start, end }
    }

    #[test]
    fn device_table_entries() {
        let b = DeviceTableEntry::blocked();
        assert_eq!(b.data, [0b11, 0, 1, 0]);
        assert!(b.valid() && b.translation_valid() && b.interrupt_map_valid());
        assert_eq!(b.mode(), 0);
        assert!(!b.read_permitted() && !b.write_permitted());
        assert_eq!(b.int_ctl(), Some(IntCtl::Abort));
        assert!(!DeviceTableEntry::default().valid());

        let e = DeviceTableEntry::translated(HostPhysAddr(0x1234_5000), PagingLevels::Four, 0x42);
        // V, TV, Mode 4, root, IR, IW; DomainID; IV.
        assert_eq!(e.data[0], 0x6000_0000_1234_5803);
        assert_eq!((e.data[1], e.data[2], e.data[3]), (0x42, 1, 0));
        assert_eq!(e.mode(), 4);
        assert_eq!(e.page_table_root(), HostPhysAddr(0x1234_5000));
        assert!(e.read_permitted() && e.write_permitted());
        assert_eq!(e.domain_id(), 0x42);

        let e = e
            .with_interrupt_table(HostPhysAddr(0x7000_0080), 8, IntCtl::Remap)
            .with_ivhd_setting(DteSetting(0xf7))
            .with_exclusion(true);
        assert_eq!(e.interrupt_table(), HostPhysAddr(0x7000_0080));
        assert_eq!((e.int_tab_len(), e.int_ctl()), (8, Some(IntCtl::Remap)));
        assert!(e.init_pass() && e.eint_pass() && e.nmi_pass());
        assert!(e.lint0_pass() && e.lint1_pass());
        assert_eq!(e.sys_mgt(), 3);
        assert!(e.exclusion());
        // Raw quadword 2: LINT1/LINT0, IntCtl 10b, NMI/EInt/Init, table, IntTabLen 8, IV.
        assert_eq!(e.data[2], 0xe700_0000_7000_0091);
        assert_eq!(e.data[1], 0x42 | (1 << 39) | (3 << 40));
        // Settings are replaced, not accumulated.
        let e = e
            .with_ivhd_setting(DteSetting(0))
            .with_exclusion(false)
            .with_interrupt_table(HostPhysAddr(0x100), 1, IntCtl::Forward);
        assert!(!e.init_pass() && !e.lint1_pass() && !e.exclusion() && e.sys_mgt() == 0);
        assert_eq!(e.data[2], (1 << 60) | 0x100 | (1 << 1) | 1);
        assert_eq!(e.int_ctl(), Some(IntCtl::Forward));
        let reserved = DeviceTableEntry {
            data: [0, 0, 3 << 60, 0],
        };
        assert_eq!(reserved.int_ctl(), None);
    }

    #[test]
    fn io_page_tables_use_next_level_and_large_pages() {
        let mut m = FakeFrames::new(100);
        let mut t = IoPageTables::new(PagingLevels::Four, PageSizes::ALL, &mut m).unwrap();
        let stats = t
            .map_identity(
                r(GIB - 2 * MIB - PAGE_SIZE, 2 * GIB),
                DmaAccess::ReadWrite,
                &mut m,
            )
            .unwrap();
        assert_eq!(
            stats,
            MapStats {
                pages_4k: 1,
                pages_2m: 1,
                pages_1g: 1,
                tables: 3
            }
        );
        // Level 4 -> level 3 table: NextLevel 3, PR, IR, IW.
        let l4 = IoPte(m.table(t.root())[0]);
        assert_eq!((l4.next_level(), l4.present()), (3, true));
        assert!(l4.readable() && l4.writable());
        let l3 = l4.address();
        // The 1 GiB leaf at level 3: NextLevel 0, FC, IR, IW.
        let gib = IoPte(m.table(l3)[1]);
        assert_eq!(
            gib.0,
            GIB | IoPte::PRESENT | IoPte::FORCE_COHERENT | IoPte::READ | IoPte::WRITE
        );
        assert_eq!(gib.next_level(), 0);
        let l2 = IoPte(m.table(l3)[0]);
        assert_eq!(l2.next_level(), 2);
        let tr = t.translate(GIB - 2 * MIB, &mut m).unwrap();
        assert_eq!(
            (tr.page_size, tr.hpa),
            (2 * MIB, HostPhysAddr(GIB - 2 * MIB))
        );
        let tr = t.translate(GIB - 2 * MIB - 1, &mut m).unwrap();
        assert_eq!(tr.page_size, PAGE_SIZE);
        assert_eq!(t.translate(GIB - 2 * MIB - PAGE_SIZE - 1, &mut m), None);
        assert_eq!(t.levels(), PagingLevels::Four);

        let dte = t.device_table_entry(9);
        assert_eq!(
            (dte.page_table_root(), dte.mode(), dte.domain_id()),
            (t.root(), 4, 9)
        );

        // Read-only inside the 1 GiB page splits it.
        t.map_identity(r(GIB, GIB + PAGE_SIZE), DmaAccess::ReadOnly, &mut m)
            .unwrap();
        assert_eq!(
            t.translate(GIB, &mut m).unwrap().access,
            DmaAccess::ReadOnly
        );
        assert_eq!(
            t.translate(GIB + PAGE_SIZE, &mut m).unwrap().access,
            DmaAccess::ReadWrite
        );
        // A leaf with NextLevel 7 (another page size) is still a leaf to the walker.
        assert!(HostIo::is_leaf(7 << 9 | 1, 2));
        assert!(!HostIo::is_leaf(1 << 9 | 1, 2));
    }

    #[test]
    fn io_page_table_errors() {
        let mut m = FakeFrames::new(1);
        let mut t = IoPageTables::new(PagingLevels::Three, PageSizes::ALL, &mut m).unwrap();
        assert_eq!(
            t.map_identity(r(0, PAGE_SIZE), DmaAccess::ReadWrite, &mut m),
            Err(IommuError::OutOfFrames)
        );
        assert!(matches!(
            t.map_identity(
                r(1 << 39, (1 << 39) + PAGE_SIZE),
                DmaAccess::ReadWrite,
                &mut m
            ),
            Err(IommuError::AboveAddressWidth { width: 39, .. })
        ));
        assert!(IoPageTables::new(PagingLevels::Three, PageSizes::ALL, &mut m).is_err());
    }

    #[test]
    fn interrupt_remapping_entries() {
        let e = Irte::remapped(0x31, 2, false, IrteIntType::Fixed, false);
        assert_eq!(e.0, 0x0031_0201);
        assert!(e.remap_enabled() && !e.logical() && !e.guest_mode() && !e.suppress_faults());
        assert_eq!((e.vector(), e.destination(), e.int_type()), (0x31, 2, 0));
        let e = Irte::remapped(0xec, 0x0f, true, IrteIntType::Arbitrated, true);
        assert_eq!(e.0, 0x00ec_0f47);
        assert!(e.logical() && e.suppress_faults());
        assert_eq!(e.int_type(), 1);
        assert!(!Irte::default().remap_enabled());
    }

    #[test]
    fn register_values() {
        // 65536 devices: 2 MiB of DTEs, 512 pages.
        assert_eq!(
            device_table_base(HostPhysAddr(0x7000_0000), 65536),
            0x7000_01ff
        );
        assert_eq!(
            device_table_base(HostPhysAddr(0x7000_0000), 128),
            0x7000_0000
        );
        // 256 commands (4 KiB).
        assert_eq!(
            ring_base(HostPhysAddr(0x7100_0000), 8),
            0x0800_0000_7100_0000
        );
        assert_eq!(
            regs::CONTROL_IOMMU_EN | regs::CONTROL_EVENT_LOG_EN | regs::CONTROL_CMD_BUF_EN,
            0x1005
        );
        assert_eq!((regs::STATUS, regs::EVENT_LOG_TAIL), (0x2020, 0x2018));
        assert_eq!(COMMAND_SIZE, EVENT_SIZE);
    }

    #[test]
    fn events_read_well() {
        // IO_PAGE_FAULT from 00:02.0 in domain 1: a write to an unmapped page.
        let e = Event::decode([0x0001_0010, 0x2020_0000, 0x1234_5000, 0]);
        assert_eq!(e.code, EVENT_IO_PAGE_FAULT);
        assert_eq!(
            (e.device, e.tag, e.flags),
            (SourceId::new(0, 2, 0), 1, 0x20)
        );
        assert_eq!(
            e.to_string(),
            "IO_PAGE_FAULT device=00:02.0 domain/pasid=0x1 address=0x12345000 write, not mapped"
        );
        // A read of a present page without permission, above 4 GiB.
        let e = Event::decode([0x0000_0300, 0x2050_0000, 0x0000_1000, 0x1]);
        assert_eq!(
            e.to_string(),
            "IO_PAGE_FAULT device=03:00.0 domain/pasid=0x0 address=0x100001000 read, \
             page present, permission denied"
        );
        // An interrupt request with a reserved bit set in the DTE.
        let e = Event::decode([0x0000_00a0, 0x1088_0000, 0xfee0_0000, 0]);
        assert_eq!(
            e.to_string(),
            "ILLEGAL_DEV_TABLE_ENTRY device=00:14.0 address=0xfee00000 interrupt, reserved bit set"
        );
        let e = Event::decode([0, 0x5000_0000, 0x7100_0040, 0]);
        assert_eq!(e.to_string(), "ILLEGAL_COMMAND_ERROR address=0x71000040");
        let e = Event::decode([0, 0x6003_0000, 0x7100_0040, 0]);
        assert_eq!(
            e.to_string(),
            "COMMAND_HARDWARE_ERROR address=0x71000040 flags=0x3"
        );
        let e = Event::decode([0x0005_0010, 0x8120_0000, 0x2000, 0]);
        assert_eq!(
            e.to_string(),
            "INVALID_DEVICE_REQUEST device=00:02.0 domain/pasid=0x5 address=0x2000 write, \
             translation request"
        );
        for (code, name) in [
            (EVENT_DEV_TAB_HARDWARE_ERROR, "DEV_TAB_HARDWARE_ERROR"),
            (EVENT_PAGE_TAB_HARDWARE_ERROR, "PAGE_TAB_HARDWARE_ERROR"),
            (EVENT_IOTLB_INV_TIMEOUT, "IOTLB_INV_TIMEOUT"),
            (EVENT_INVALID_PPR_REQUEST, "INVALID_PPR_REQUEST"),
            (EVENT_COUNTER_ZERO, "EVENT_COUNTER_ZERO"),
            (EVENT_RMP_PAGE_FAULT, "RMP_PAGE_FAULT"),
            (EVENT_RMP_HARDWARE_ERROR, "RMP_HW_ERROR"),
            (0xB, "UNKNOWN_EVENT"),
        ] {
            assert_eq!(event_name(code), name);
        }
        let e = Event::decode([0x0001_0010, 0x4000_0000, 0x9000, 0]);
        assert_eq!(
            e.to_string(),
            "PAGE_TAB_HARDWARE_ERROR device=00:02.0 domain/pasid=0x1 address=0x9000"
        );
    }
}
