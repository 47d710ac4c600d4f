//! The ACPI I/O Virtualization Reporting Structure, IVRS (AMD I/O Virtualization Technology
//! (IOMMU) Specification, 48882 rev. 3.x, section 5.2): where each AMD-Vi IOMMU is, which
//! devices it translates and with which device-table settings, and the memory ranges
//! devices must keep reaching (IVMD unity and exclusion ranges).
//!
//! Same discipline as the DMAR parser: every block and device-entry length is checked
//! against its container before it is read, lists are bounded, errors name the block and
//! offset, and nothing panics on malformed input.

use super::{SourceId, TableReader};
use crate::acpi::{find_table, AcpiError, AcpiTable, PhysMemory, Rsdp};
use crate::addr::{HostPhysAddr, PhysRange};
use core::fmt;

/// The IVRS's signature.
pub const IVRS_SIGNATURE: [u8; 4] = *b"IVRS";
/// Offset of the first IVDB block: the 36-byte header, IVinfo and 8 reserved bytes
/// (48882 5.2.1, Table 96).
pub const IVRS_BLOCKS_OFFSET: u32 = 48;

/// Most IVHD blocks kept (firmware often describes each IOMMU three times, as types 10h,
/// 11h and 40h).
pub const MAX_IVHD: usize = 32;
/// Most IVMD blocks kept.
pub const MAX_IVMD: usize = 32;
/// Most IVHD device entries kept, over all IVHD blocks.
pub const MAX_IVHD_ENTRIES: usize = 512;
/// Longest ACPI UID kept in an ACPI HID device entry, in bytes.
pub const MAX_UID_LEN: usize = 16;

/// IVDB block types (48882 5.2.2 and 5.2.3).
pub const IVHD_TYPE_10: u8 = 0x10;
pub const IVHD_TYPE_11: u8 = 0x11;
pub const IVHD_TYPE_40: u8 = 0x40;
pub const IVMD_TYPE_ALL: u8 = 0x20;
pub const IVMD_TYPE_DEVICE: u8 = 0x21;
pub const IVMD_TYPE_RANGE: u8 = 0x22;

/// IVHD device entry types (48882 5.2.2.2, Table 98 in rev. 3.x numbering).
pub const ENTRY_PAD4: u8 = 0x00;
pub const ENTRY_ALL: u8 = 0x01;
pub const ENTRY_SELECT: u8 = 0x02;
pub const ENTRY_RANGE_START: u8 = 0x03;
pub const ENTRY_RANGE_END: u8 = 0x04;
pub const ENTRY_PAD8: u8 = 0x40;
pub const ENTRY_ALIAS_SELECT: u8 = 0x42;
pub const ENTRY_ALIAS_RANGE_START: u8 = 0x43;
pub const ENTRY_EXT_SELECT: u8 = 0x46;
pub const ENTRY_EXT_RANGE_START: u8 = 0x47;
pub const ENTRY_SPECIAL: u8 = 0x48;
pub const ENTRY_ACPI_HID: u8 = 0xF0;

/// The name of an IVDB block type, for messages.
pub const fn block_name(kind: u8) -> &'static str {
    match kind {
        IVHD_TYPE_10 => "IVHD type 10h",
        IVHD_TYPE_11 => "IVHD type 11h",
        IVHD_TYPE_40 => "IVHD type 40h",
        IVMD_TYPE_ALL => "IVMD type 20h",
        IVMD_TYPE_DEVICE => "IVMD type 21h",
        IVMD_TYPE_RANGE => "IVMD type 22h",
        _ => "reserved-type block",
    }
}

/// The fixed part of each block type this parser reads.
const fn min_len(kind: u8) -> u16 {
    match kind {
        IVHD_TYPE_10 => 24,
        IVHD_TYPE_11 | IVHD_TYPE_40 => 40,
        IVMD_TYPE_ALL | IVMD_TYPE_DEVICE | IVMD_TYPE_RANGE => 32,
        _ => 4,
    }
}

/// What is wrong with an IVHD device entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EntryProblem {
    /// The entry needs `needed` bytes, `left` remain in its IVHD.
    Truncated { needed: u32, left: u32 },
    /// A variable-length type other than ACPI HID: its length cannot be known.
    UnknownVariableLength,
    /// An End of Range entry without a start before it.
    UnpairedRangeEnd,
    /// A start of range not closed by an End of Range in the same IVHD.
    UnterminatedRange,
    /// An End of Range whose DeviceID is below its start's.
    InvertedRange { first: SourceId, last: SourceId },
    /// An ACPI UID longer than [`MAX_UID_LEN`].
    UidTooLong { len: u8 },
}

/// Errors of the IVRS parser.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IvrsError {
    /// Locating or loading the table failed.
    Acpi(AcpiError),
    /// The table given is not an IVRS.
    NotIvrs { signature: [u8; 4] },
    /// The table is shorter than its fixed part.
    TableTooShort { len: u32 },
    /// A block's type, flags and length do not fit before the table's end.
    TruncatedBlock { offset: u32, table_len: u32 },
    /// A block's length is below its fixed part (0 included).
    BadBlockLength {
        kind: u8,
        offset: u32,
        len: u16,
        min: u16,
    },
    /// A block runs past the table's end.
    BlockPastEnd {
        kind: u8,
        offset: u32,
        len: u16,
        table_len: u32,
    },
    /// An IVHD device entry is malformed.
    BadEntry {
        ivhd: u32,
        offset: u32,
        kind: u8,
        problem: EntryProblem,
    },
    /// An IVMD's range wraps around the address space.
    BadIvmd {
        offset: u32,
        start: u64,
        length: u64,
    },
    /// More items of a kind than this parser keeps.
    TooMany { what: &'static str, max: usize },
}

impl From<AcpiError> for IvrsError {
    fn from(e: AcpiError) -> Self {
        IvrsError::Acpi(e)
    }
}

impl fmt::Display for EntryProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EntryProblem::Truncated { needed, left } => {
                write!(f, "needs {needed} bytes but {left} are left in its IVHD")
            }
            EntryProblem::UnknownVariableLength => {
                f.write_str("has a variable-length type this parser cannot size")
            }
            EntryProblem::UnpairedRangeEnd => f.write_str("ends a range that was never started"),
            EntryProblem::UnterminatedRange => {
                f.write_str("starts a range that no End of Range closes")
            }
            EntryProblem::InvertedRange { first, last } => {
                write!(f, "ends at {last}, before its start {first}")
            }
            EntryProblem::UidTooLong { len } => {
                write!(f, "has a {len}-byte ACPI UID (at most {MAX_UID_LEN} kept)")
            }
        }
    }
}

impl fmt::Display for IvrsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            IvrsError::Acpi(e) => write!(f, "IVRS: {e}"),
            IvrsError::NotIvrs { signature } => write!(
                f,
                "IVRS: the table given has signature {:?}",
                core::str::from_utf8(&signature).unwrap_or("????")
            ),
            IvrsError::TableTooShort { len } => write!(
                f,
                "IVRS: table length {len} is shorter than its {IVRS_BLOCKS_OFFSET}-byte fixed part"
            ),
            IvrsError::TruncatedBlock { offset, table_len } => write!(
                f,
                "IVRS: block at offset {offset:#x} is cut short by the table's end at {table_len:#x}"
            ),
            IvrsError::BadBlockLength {
                kind,
                offset,
                len,
                min,
            } => write!(
                f,
                "IVRS: {} ({kind:#04x}) at offset {offset:#x} has length {len}, below its minimum {min}",
                block_name(kind)
            ),
            IvrsError::BlockPastEnd {
                kind,
                offset,
                len,
                table_len,
            } => write!(
                f,
                "IVRS: {} ({kind:#04x}) at offset {offset:#x} has length {len}, past the table's end at {table_len:#x}",
                block_name(kind)
            ),
            IvrsError::BadEntry {
                ivhd,
                offset,
                kind,
                problem,
            } => write!(
                f,
                "IVRS: device entry of type {kind:#04x} at offset {offset:#x} in the IVHD at offset {ivhd:#x} {problem}"
            ),
            IvrsError::BadIvmd {
                offset,
                start,
                length,
            } => write!(
                f,
                "IVRS: IVMD at offset {offset:#x} with start {start:#x} and length {length:#x} wraps around"
            ),
            IvrsError::TooMany { what, max } => {
                write!(f, "IVRS: more than {max} {what} (the most Ally keeps)")
            }
        }
    }
}

/// The IVinfo field (48882 5.2.1, Table 96): what every IOMMU of the system supports.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct IvInfo(pub u32);

impl IvInfo {
    /// EFRSup: IVHD types 11h/40h carry an image of the Extended Feature Register.
    pub const fn efr_sup(self) -> bool {
        self.0 & 1 != 0
    }
    /// DMA remap support: firmware protected memory from DMA before handing over
    /// (pre-boot DMA protection).
    pub const fn dma_remap(self) -> bool {
        self.0 & 2 != 0
    }
    /// GVAsize: guest virtual address width in bits (encoded 2 = 48, 3 = 57); 0 when not
    /// reported.
    pub const fn guest_va_bits(self) -> u32 {
        match (self.0 >> 5) & 7 {
            2 => 48,
            3 => 57,
            _ => 0,
        }
    }
    /// PAsize: physical address width in bits.
    pub const fn pa_bits(self) -> u32 {
        (self.0 >> 8) & 0x7F
    }
    /// VAsize: device (I/O) virtual address width in bits.
    pub const fn va_bits(self) -> u32 {
        (self.0 >> 15) & 0x7F
    }
    /// HTAtsResv: the HyperTransport ATS address range is reserved.
    pub const fn ht_ats_reserved(self) -> bool {
        self.0 & (1 << 22) != 0
    }
}

/// The DTE-setting byte of an IVHD device entry (48882 5.2.2.2, Table 99): device-table
/// bits firmware asks the OS to set for the device(s).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct DteSetting(pub u8);

impl DteSetting {
    pub const fn init_pass(self) -> bool {
        self.0 & 0x01 != 0
    }
    pub const fn ext_int_pass(self) -> bool {
        self.0 & 0x02 != 0
    }
    pub const fn nmi_pass(self) -> bool {
        self.0 & 0x04 != 0
    }
    /// SysMgt (bits 5:4): what system-management messages the device may send.
    pub const fn sys_mgt(self) -> u8 {
        (self.0 >> 4) & 3
    }
    pub const fn lint0_pass(self) -> bool {
        self.0 & 0x40 != 0
    }
    pub const fn lint1_pass(self) -> bool {
        self.0 & 0x80 != 0
    }
}

/// What a special-device entry names (48882 Table 99, Variety).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SpecialVariety {
    IoApic,
    Hpet,
    Reserved(u8),
}

impl SpecialVariety {
    pub const fn from_raw(raw: u8) -> Self {
        match raw {
            1 => SpecialVariety::IoApic,
            2 => SpecialVariety::Hpet,
            r => SpecialVariety::Reserved(r),
        }
    }
}

/// The UID of an ACPI HID device entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AcpiUid {
    None,
    Integer(u64),
    /// Characters (`len` of `bytes`), without a terminating NUL.
    String {
        bytes: [u8; MAX_UID_LEN],
        len: u8,
    },
}

impl AcpiUid {
    /// The UID's characters, for the string form.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            AcpiUid::String { bytes, len } => bytes.get(..usize::from(*len)).unwrap_or(&[]),
            _ => &[],
        }
    }
}

/// One IVHD device entry (48882 5.2.2.2).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IvhdEntry {
    /// Type 01h: the setting applies to every device.
    All { dte: DteSetting },
    /// Type 02h.
    Select { device: SourceId, dte: DteSetting },
    /// Type 03h, closed by the next [`IvhdEntry::RangeEnd`].
    RangeStart { device: SourceId, dte: DteSetting },
    /// Type 04h.
    RangeEnd { device: SourceId },
    /// Type 42h: the device's requests carry `alias` as their requester ID.
    AliasSelect {
        device: SourceId,
        dte: DteSetting,
        alias: SourceId,
    },
    /// Type 43h: every device of the range uses `alias` (devices behind a PCIe-to-PCI
    /// bridge).
    AliasRangeStart {
        device: SourceId,
        dte: DteSetting,
        alias: SourceId,
    },
    /// Type 46h, with the extended DTE setting (bit 28: ATS disabled).
    ExtSelect {
        device: SourceId,
        dte: DteSetting,
        ext: u32,
    },
    /// Type 47h.
    ExtRangeStart {
        device: SourceId,
        dte: DteSetting,
        ext: u32,
    },
    /// Type 48h: an I/O APIC or HPET (with its APIC ID or HPET number as `handle`) and
    /// the requester ID its interrupt messages carry.
    Special {
        variety: SpecialVariety,
        handle: u8,
        device: SourceId,
        dte: DteSetting,
    },
    /// Type F0h: a platform device named by ACPI HID/CID/UID.
    AcpiHid {
        device: SourceId,
        dte: DteSetting,
        hid: [u8; 8],
        cid: [u8; 8],
        uid: AcpiUid,
    },
}

/// Where an IVHD's entries are in [`Ivrs::entries`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct EntrySpan {
    start: u16,
    len: u16,
}

impl EntrySpan {
    pub const fn len(self) -> usize {
        self.len as usize
    }
    pub const fn is_empty(self) -> bool {
        self.len == 0
    }
}

/// An I/O Virtualization Hardware Definition block (48882 5.2.2.1, Tables 97/100).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Ivhd {
    pub offset: u32,
    /// 10h, 11h or 40h.
    pub kind: u8,
    /// HtTunEn, PassPW, ResPassPW, Isoc, IotlbSup, Coherent; for type 10h also PrefSup
    /// (bit 6) and PPRSup (bit 7).
    pub flags: u8,
    /// The IOMMU's own requester ID.
    pub device: SourceId,
    /// Offset of the IOMMU's capability block in its configuration space.
    pub capability_offset: u16,
    pub base: HostPhysAddr,
    pub segment: u16,
    /// IOMMU Info: MSI number (bits 4:0) and UnitID (bits 12:8).
    pub info: u16,
    /// Type 10h: IOMMU Feature Reporting; types 11h/40h: IOMMU Attributes.
    pub features: u32,
    /// Types 11h/40h: the Extended Feature Register's value.
    pub efr: Option<u64>,
    /// Types 11h/40h: the Extended Feature 2 Register's value.
    pub efr2: Option<u64>,
    pub entries: EntrySpan,
}

impl Ivhd {
    pub const fn msi_number(&self) -> u8 {
        (self.info & 0x1F) as u8
    }
    pub const fn unit_id(&self) -> u8 {
        ((self.info >> 8) & 0x1F) as u8
    }
}

/// Which devices an IVMD applies to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IvmdDevices {
    /// Type 20h.
    All,
    /// Type 21h.
    One(SourceId),
    /// Type 22h, inclusive.
    Range(SourceId, SourceId),
}

/// An I/O Virtualization Memory Definition block (48882 5.2.3, Table 101).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Ivmd {
    pub offset: u32,
    pub devices: IvmdDevices,
    pub flags: u8,
    pub start: u64,
    pub length: u64,
}

impl Ivmd {
    pub const UNITY: u8 = 1 << 0;
    pub const READ: u8 = 1 << 1;
    pub const WRITE: u8 = 1 << 2;
    pub const EXCLUSION: u8 = 1 << 3;

    /// Unity: device addresses in the range map to the same physical addresses.
    pub const fn unity(&self) -> bool {
        self.flags & Self::UNITY != 0
    }
    pub const fn read(&self) -> bool {
        self.flags & Self::READ != 0
    }
    pub const fn write(&self) -> bool {
        self.flags & Self::WRITE != 0
    }
    /// Exclusion range: the IOMMU lets accesses through untranslated.
    pub const fn exclusion(&self) -> bool {
        self.flags & Self::EXCLUSION != 0
    }
    /// Whether the devices' domain must map the range identity: unity ranges, and
    /// exclusion ranges, which Ally maps rather than programming the exclusion registers
    /// (as Linux does), so that one mechanism covers both.
    pub const fn requires_identity_map(&self) -> bool {
        self.unity() || self.exclusion()
    }
    /// The range (the parser made sure it does not wrap).
    pub const fn range(&self) -> PhysRange {
        PhysRange {
            start: self.start,
            end: self.start.wrapping_add(self.length),
        }
    }
}

/// A run of PCI devices with the same settings, from [`Ivrs::device_ranges`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DeviceRange {
    pub first: SourceId,
    /// Inclusive.
    pub last: SourceId,
    pub dte: DteSetting,
    pub alias: Option<SourceId>,
    pub ext: u32,
}

/// A parsed IVRS.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Ivrs {
    pub info: IvInfo,
    pub units: heapless::Vec<Ivhd, MAX_IVHD>,
    pub memory: heapless::Vec<Ivmd, MAX_IVMD>,
    /// Blocks of other types, skipped by their length.
    pub skipped: u32,
    entries: heapless::Vec<IvhdEntry, MAX_IVHD_ENTRIES>,
}

impl Ivrs {
    /// Finds the IVRS through the RSDP and parses it; `Ok(None)` when the machine has
    /// none. The table is returned too, for [`crate::acpi::hide_table`].
    pub fn find(
        mem: &impl PhysMemory,
        rsdp: &Rsdp,
    ) -> Result<Option<(AcpiTable, Ivrs)>, IvrsError> {
        match find_table(mem, rsdp, &IVRS_SIGNATURE) {
            Ok(table) => Ok(Some((table, Ivrs::parse(mem, &table)?))),
            Err(AcpiError::TableNotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Parses `table` (loaded and checksummed by [`AcpiTable::load`] or [`find_table`]).
    pub fn parse(mem: &impl PhysMemory, table: &AcpiTable) -> Result<Self, IvrsError> {
        if table.header.signature != IVRS_SIGNATURE {
            return Err(IvrsError::NotIvrs {
                signature: table.header.signature,
            });
        }
        let rd = TableReader::new(mem, table);
        let table_len = rd.len;
        if table_len < IVRS_BLOCKS_OFFSET {
            return Err(IvrsError::TableTooShort { len: table_len });
        }
        let mut ivrs = Ivrs {
            info: IvInfo(
                rd.u32(36)
                    .ok_or(IvrsError::TableTooShort { len: table_len })?,
            ),
            ..Ivrs::default()
        };
        let mut offset = IVRS_BLOCKS_OFFSET;
        while offset < table_len {
            let truncated = IvrsError::TruncatedBlock { offset, table_len };
            let kind = rd.u8(offset).ok_or(truncated)?;
            let len = rd.u16(offset + 2).ok_or(truncated)?;
            let min = min_len(kind);
            if len < min {
                return Err(IvrsError::BadBlockLength {
                    kind,
                    offset,
                    len,
                    min,
                });
            }
            let end = offset + u32::from(len);
            if end > table_len {
                return Err(IvrsError::BlockPastEnd {
                    kind,
                    offset,
                    len,
                    table_len,
                });
            }
            let b = Block {
                rd,
                kind,
                offset,
                end,
            };
            match kind {
                IVHD_TYPE_10 | IVHD_TYPE_11 | IVHD_TYPE_40 => ivrs.parse_ivhd(&b)?,
                IVMD_TYPE_ALL | IVMD_TYPE_DEVICE | IVMD_TYPE_RANGE => ivrs.parse_ivmd(&b)?,
                _ => ivrs.skipped += 1,
            }
            offset = end;
        }
        Ok(ivrs)
    }

    fn parse_ivhd<M: PhysMemory>(&mut self, b: &Block<'_, M>) -> Result<(), IvrsError> {
        let extended = b.kind != IVHD_TYPE_10;
        let first_entry = if extended { 40 } else { 24 };
        let mut ivhd = Ivhd {
            offset: b.offset,
            kind: b.kind,
            flags: b.u8(1)?,
            device: SourceId(b.u16(4)?),
            capability_offset: b.u16(6)?,
            base: HostPhysAddr(b.u64(8)?),
            segment: b.u16(16)?,
            info: b.u16(18)?,
            features: b.u32(20)?,
            efr: None,
            efr2: None,
            entries: EntrySpan::default(),
        };
        if extended {
            ivhd.efr = Some(b.u64(24)?);
            ivhd.efr2 = Some(b.u64(32)?);
        }
        ivhd.entries = self.parse_entries(b, first_entry)?;
        push(&mut self.units, ivhd, "IOMMU definitions (IVHD)")
    }

    fn parse_entries<M: PhysMemory>(
        &mut self,
        b: &Block<'_, M>,
        first: u32,
    ) -> Result<EntrySpan, IvrsError> {
        let start = self.entries.len();
        let mut at = b.offset + first;
        // The offset, type and DeviceID of an open start-of-range entry.
        let mut open: Option<(u32, u8, SourceId)> = None;
        while at < b.end {
            let rel = at - b.offset;
            let kind = b.u8(rel)?;
            let left = b.end - at;
            let bad = |offset, kind, problem| IvrsError::BadEntry {
                ivhd: b.offset,
                offset,
                kind,
                problem,
            };
            let len = match kind {
                0x00..=0x3F => 4,
                0x40..=0x7F => 8,
                ENTRY_ACPI_HID if left >= 22 => 22 + u32::from(b.u8(rel + 21)?),
                ENTRY_ACPI_HID => 22,
                _ => return Err(bad(at, kind, EntryProblem::UnknownVariableLength)),
            };
            if len > left {
                return Err(bad(at, kind, EntryProblem::Truncated { needed: len, left }));
            }
            let device = SourceId(b.u16(rel + 1)?);
            let dte = DteSetting(b.u8(rel + 3)?);
            let entry = match kind {
                ENTRY_ALL => Some(IvhdEntry::All { dte }),
                ENTRY_SELECT => Some(IvhdEntry::Select { device, dte }),
                ENTRY_RANGE_START => Some(IvhdEntry::RangeStart { device, dte }),
                ENTRY_RANGE_END => Some(IvhdEntry::RangeEnd { device }),
                ENTRY_ALIAS_SELECT => Some(IvhdEntry::AliasSelect {
                    device,
                    dte,
                    alias: SourceId(b.u16(rel + 5)?),
                }),
                ENTRY_ALIAS_RANGE_START => Some(IvhdEntry::AliasRangeStart {
                    device,
                    dte,
                    alias: SourceId(b.u16(rel + 5)?),
                }),
                ENTRY_EXT_SELECT => Some(IvhdEntry::ExtSelect {
                    device,
                    dte,
                    ext: b.u32(rel + 4)?,
                }),
                ENTRY_EXT_RANGE_START => Some(IvhdEntry::ExtRangeStart {
                    device,
                    dte,
                    ext: b.u32(rel + 4)?,
                }),
                ENTRY_SPECIAL => Some(IvhdEntry::Special {
                    variety: SpecialVariety::from_raw(b.u8(rel + 7)?),
                    handle: b.u8(rel + 4)?,
                    device: SourceId(b.u16(rel + 5)?),
                    dte,
                }),
                ENTRY_ACPI_HID => Some(IvhdEntry::AcpiHid {
                    device,
                    dte,
                    hid: b.array(rel + 4)?,
                    cid: b.array(rel + 12)?,
                    uid: parse_uid(b, rel).map_err(|p| bad(at, kind, p))?,
                }),
                // Padding and reserved fixed-length types.
                _ => None,
            };
            match entry {
                Some(
                    IvhdEntry::RangeStart { device, .. }
                    | IvhdEntry::AliasRangeStart { device, .. }
                    | IvhdEntry::ExtRangeStart { device, .. },
                ) => {
                    if let Some((o, k, _)) = open {
                        return Err(bad(o, k, EntryProblem::UnterminatedRange));
                    }
                    open = Some((at, kind, device));
                }
                Some(IvhdEntry::RangeEnd { device: last }) => match open.take() {
                    None => return Err(bad(at, kind, EntryProblem::UnpairedRangeEnd)),
                    Some((_, _, first)) if last < first => {
                        return Err(bad(at, kind, EntryProblem::InvertedRange { first, last }))
                    }
                    Some(_) => {}
                },
                _ => {}
            }
            if let Some(e) = entry {
                push(&mut self.entries, e, "IVHD device entries")?;
            }
            at += len;
        }
        if let Some((o, kind, _)) = open {
            return Err(IvrsError::BadEntry {
                ivhd: b.offset,
                offset: o,
                kind,
                problem: EntryProblem::UnterminatedRange,
            });
        }
        Ok(EntrySpan {
            // Both fit: the pool holds at most MAX_IVHD_ENTRIES entries.
            start: start as u16,
            len: (self.entries.len() - start) as u16,
        })
    }

    fn parse_ivmd<M: PhysMemory>(&mut self, b: &Block<'_, M>) -> Result<(), IvrsError> {
        let device = SourceId(b.u16(4)?);
        let devices = match b.kind {
            IVMD_TYPE_ALL => IvmdDevices::All,
            IVMD_TYPE_DEVICE => IvmdDevices::One(device),
            _ => IvmdDevices::Range(device, SourceId(b.u16(6)?)),
        };
        let (start, length) = (b.u64(16)?, b.u64(24)?);
        if start.checked_add(length).is_none() {
            return Err(IvrsError::BadIvmd {
                offset: b.offset,
                start,
                length,
            });
        }
        let ivmd = Ivmd {
            offset: b.offset,
            devices,
            flags: b.u8(1)?,
            start,
            length,
        };
        push(&mut self.memory, ivmd, "memory definitions (IVMD)")
    }

    /// The device entries of an IVHD.
    pub fn entries(&self, span: EntrySpan) -> &[IvhdEntry] {
        let start = usize::from(span.start);
        self.entries
            .get(start..start + usize::from(span.len))
            .unwrap_or(&[])
    }

    /// The IVHD type an OS uses: the highest one present. Firmware describes each IOMMU
    /// once per type it supports, and an OS takes the blocks of the newest type it knows
    /// (Linux takes the highest up to 40h), ignoring the others.
    pub fn preferred_type(&self) -> Option<u8> {
        self.units.iter().map(|u| u.kind).max()
    }

    /// The IVHDs of [`Ivrs::preferred_type`]: one per IOMMU.
    pub fn preferred_units(&self) -> impl Iterator<Item = &Ivhd> + '_ {
        let kind = self.preferred_type();
        self.units.iter().filter(move |u| Some(u.kind) == kind)
    }

    /// The PCI devices an IVHD covers, with their settings: ranges closed, selects as
    /// one-device ranges. Special and ACPI HID entries are not PCI ranges and are left out.
    pub fn device_ranges(&self, ivhd: &Ivhd) -> DeviceRanges<'_> {
        DeviceRanges {
            entries: self.entries(ivhd.entries).iter(),
        }
    }

    /// The ranges IVMDs oblige the domains of their devices to map identity, for
    /// [`super::DmaDomainPlan::guest`].
    pub fn reserved_ranges(&self) -> impl Iterator<Item = PhysRange> + '_ {
        self.memory
            .iter()
            .filter(|m| m.requires_identity_map())
            .map(Ivmd::range)
    }
}

/// Iterator of [`Ivrs::device_ranges`].
pub struct DeviceRanges<'a> {
    entries: core::slice::Iter<'a, IvhdEntry>,
}

impl Iterator for DeviceRanges<'_> {
    type Item = DeviceRange;

    fn next(&mut self) -> Option<DeviceRange> {
        let one = |first: SourceId, dte, alias, ext| DeviceRange {
            first,
            last: first,
            dte,
            alias,
            ext,
        };
        let mut open: Option<DeviceRange> = None;
        for e in self.entries.by_ref() {
            match *e {
                IvhdEntry::All { dte } => {
                    return Some(DeviceRange {
                        first: SourceId(0),
                        last: SourceId(0xFFFF),
                        dte,
                        alias: None,
                        ext: 0,
                    })
                }
                IvhdEntry::Select { device, dte } => return Some(one(device, dte, None, 0)),
                IvhdEntry::AliasSelect { device, dte, alias } => {
                    return Some(one(device, dte, Some(alias), 0))
                }
                IvhdEntry::ExtSelect { device, dte, ext } => {
                    return Some(one(device, dte, None, ext))
                }
                IvhdEntry::RangeStart { device, dte } => open = Some(one(device, dte, None, 0)),
                IvhdEntry::AliasRangeStart { device, dte, alias } => {
                    open = Some(one(device, dte, Some(alias), 0))
                }
                IvhdEntry::ExtRangeStart { device, dte, ext } => {
                    open = Some(one(device, dte, None, ext))
                }
                IvhdEntry::RangeEnd { device } => {
                    if let Some(mut r) = open.take() {
                        r.last = device;
                        return Some(r);
                    }
                }
                IvhdEntry::Special { .. } | IvhdEntry::AcpiHid { .. } => {}
            }
        }
        None
    }
}

fn parse_uid<M: PhysMemory>(b: &Block<'_, M>, rel: u32) -> Result<AcpiUid, EntryProblem> {
    let fail = EntryProblem::Truncated {
        needed: 22,
        left: b.end - b.offset - rel,
    };
    let format = b.u8(rel + 20).map_err(|_| fail)?;
    let len = b.u8(rel + 21).map_err(|_| fail)?;
    let mut bytes = [0u8; MAX_UID_LEN];
    if usize::from(len) > MAX_UID_LEN {
        return Err(EntryProblem::UidTooLong { len });
    }
    for (i, byte) in bytes.iter_mut().take(usize::from(len)).enumerate() {
        *byte = b.u8(rel + 22 + i as u32).map_err(|_| fail)?;
    }
    Ok(match format {
        0 => AcpiUid::None,
        1 => {
            let mut v = [0u8; 8];
            let n = usize::from(len).min(8);
            v[..n].copy_from_slice(&bytes[..n]);
            AcpiUid::Integer(u64::from_le_bytes(v))
        }
        _ => {
            // A terminating NUL is not part of the UID.
            let len = bytes[..usize::from(len)]
                .iter()
                .position(|&c| c == 0)
                .map_or(len, |p| p as u8);
            AcpiUid::String { bytes, len }
        }
    })
}

fn push<T, const N: usize>(
    v: &mut heapless::Vec<T, N>,
    item: T,
    what: &'static str,
) -> Result<(), IvrsError> {
    v.push(item)
        .map_err(|_| IvrsError::TooMany { what, max: N })
}

/// One block whose length the parser checked: reads relative to its start and inside it.
struct Block<'a, M: PhysMemory> {
    rd: TableReader<'a, M>,
    kind: u8,
    offset: u32,
    end: u32,
}

impl<M: PhysMemory> Block<'_, M> {
    fn fail(&self) -> IvrsError {
        IvrsError::BlockPastEnd {
            kind: self.kind,
            offset: self.offset,
            len: (self.end - self.offset) as u16,
            table_len: self.rd.len,
        }
    }

    fn array<const N: usize>(&self, rel: u32) -> Result<[u8; N], IvrsError> {
        let abs = self.offset.checked_add(rel).ok_or_else(|| self.fail())?;
        if abs.checked_add(N as u32).is_none_or(|e| e > self.end) {
            return Err(self.fail());
        }
        self.rd.array(abs).ok_or_else(|| self.fail())
    }

    fn u8(&self, rel: u32) -> Result<u8, IvrsError> {
        self.array::<1>(rel).map(|b| b[0])
    }
    fn u16(&self, rel: u32) -> Result<u16, IvrsError> {
        self.array(rel).map(u16::from_le_bytes)
    }
    fn u32(&self, rel: u32) -> Result<u32, IvrsError> {
        self.array(rel).map(u32::from_le_bytes)
    }
    fn u64(&self, rel: u32) -> Result<u64, IvrsError> {
        self.array(rel).map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{acpi_table, fix_checksum, FakePhys};
    use super::*;

    const TABLE_PA: u64 = 0x7ffd_0000;

    /// The table in memory, loaded; from then on a read outside it panics.
    fn load(bytes: &[u8]) -> (FakePhys, AcpiTable) {
        let mut mem = FakePhys::new(TABLE_PA, 0x1_0000);
        mem.put(TABLE_PA, bytes);
        let table = AcpiTable::load(&mem, TABLE_PA, 0).unwrap();
        mem.window
            .set(Some((TABLE_PA, TABLE_PA + u64::from(table.len()))));
        (mem, table)
    }

    fn parse_body(body: &[u8]) -> Result<Ivrs, IvrsError> {
        let (mem, table) = load(&acpi_table(b"IVRS", body));
        Ivrs::parse(&mem, &table)
    }

    fn sid(bus: u8, device: u8, function: u8) -> SourceId {
        SourceId::new(bus, device, function)
    }

    /// The IVRS of QEMU 7.2 for `-machine q35 -device amd-iommu` under TCG (interrupt
    /// remapping defaults to on without an in-kernel irqchip), with a VGA card at 00:01.0,
    /// a NIC at 00:02.0 and the IOMMU's PCI function at 00:03.0 (hw/i386/acpi-build.c,
    /// build_amd_iommu): one IVHD of type 10h only, a Select entry per device of bus 0,
    /// and the I/O APIC as a special device at 00:14.0, where Linux expects the AMD
    /// southbridge's.
    const QEMU_BODY: [u8; 72] = [
        0x00, 0x28, 0x00, 0x00, // IVinfo: PAsize 40; VAsize, GVAsize 0; EFRSup clear
        0, 0, 0, 0, 0, 0, 0, 0, // Reserved
        // IVHD at offset 48
        0x10, // Type 10h
        0xd1, // Flags: HtTunEn | IotlbSup | PrefSup | PPRSup
        0x3c, 0x00, // Length 60 = 24 + 7 * 4 + 8
        0x18, 0x00, // DeviceID 00:03.0
        0x40, 0x00, // Capability offset 0x40
        0x00, 0x00, 0xd8, 0xfe, 0x00, 0x00, 0x00, 0x00, // Base 0xfed80000
        0x00, 0x00, // PCI segment 0
        0x00, 0x00, // IOMMU info
        // Feature reporting: GTSup | GASup. QEMU also ORs in HATS (48 << 30) and GATS
        // (48 << 28), which lie above bit 31 and vanish from the 4-byte field.
        0x44, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, // Select 00:00.0, DTE setting 0
        0x02, 0x08, 0x00, 0x00, // Select 00:01.0
        0x02, 0x10, 0x00, 0x00, // Select 00:02.0
        0x02, 0x18, 0x00, 0x00, // Select 00:03.0 (the IOMMU itself)
        0x02, 0xf8, 0x00, 0x00, // Select 00:1f.0
        0x02, 0xfa, 0x00, 0x00, // Select 00:1f.2
        0x02, 0xfb, 0x00, 0x00, // Select 00:1f.3
        0x48, 0x00, 0x00, // Special device, reserved
        0x00, // DTE setting
        0x00, // Handle: I/O APIC ID 0
        0xa0, 0x00, // DeviceID 00:14.0
        0x01, // Variety: I/O APIC
    ];

    /// A server-like IVRS: the same IOMMU as types 10h and 40h, every device-entry type,
    /// every IVMD type, and a block type this parser does not know.
    const SERVER_BODY: &[u8] = &[
        0x43, 0x30, 0x20, 0x00, // IVinfo: EFRSup | DMA remap | GVA 48 | PA 48 | VA 64
        0, 0, 0, 0, 0, 0, 0, 0, // Reserved
        // IVHD type 10h at 48
        0x10, 0x00, 0x1c, 0x00, // Type 10h, flags 0, length 28
        0x02, 0x00, 0x40, 0x00, // DeviceID 00:00.2, capability offset 0x40
        0x00, 0x00, 0x20, 0xfd, 0x00, 0x00, 0x00, 0x00, // Base 0xfd200000
        0x00, 0x00, 0x04, 0x00, // Segment 0, info: MSI number 4
        0x00, 0x00, 0x00, 0x00, // Feature reporting
        0x01, 0x00, 0x00, 0x00, // All devices, DTE setting 0
        // IVHD type 40h at 76
        0x40, 0x30, 0xae, 0x00, // Type 40h, flags IotlbSup | Coherent, length 174
        0x02, 0x00, 0x40, 0x00, // DeviceID 00:00.2, capability offset 0x40
        0x00, 0x00, 0x20, 0xfd, 0x00, 0x00, 0x00, 0x00, // Base 0xfd200000
        0x00, 0x00, 0x04, 0x03, // Segment 0, info: MSI number 4, UnitID 3
        0x00, 0x00, 0x00, 0x00, // IOMMU attributes
        0xfa, 0x4a, 0x25, 0xa2, 0xef, 0x77, 0x65, 0x24, // EFR image 0x246577efa2254afa
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // EFR2 image
        0x02, 0x02, 0x00, 0x00, // at 116: Select 00:00.2
        0x03, 0x00, 0x01, 0x07, // at 120: Start of range 01:00.0, INITPass|EIntPass|NMIPass
        0x04, 0xff, 0x01, 0x00, // at 124: End of range 01:1f.7
        0x42, 0x00, 0x02, 0x00, 0x00, 0x41, 0x00, 0x00, // Alias select 02:00.0 as 00:08.1
        0x43, 0x00, 0x03, 0x00, 0x00, 0x09, 0x00, 0x00, // Alias range from 03:00.0 as 00:01.1
        0x04, 0xff, 0x03, 0x00, // ... to 03:1f.7
        0x46, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x10, // Ext select 04:00.0, ATS disabled
        0x47, 0x00, 0x05, 0xc0, 0x00, 0x00, 0x00, 0x00, // Ext range from 05:00.0, LINT0/1
        0x04, 0xff, 0x05, 0x00, // ... to 05:1f.7
        0x00, 0x00, 0x00, 0x00, // 4-byte padding
        0x05, 0x00, 0x00, 0x00, // Reserved 4-byte type
        0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 8-byte padding
        0x48, 0x00, 0x00, 0xd7, 0x21, 0xa0, 0x00, 0x01, // I/O APIC 0x21 at 00:14.0
        0x48, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x00, 0x02, // HPET 0 at 00:14.0
        0xf0, 0xa5, 0x00, 0x40, // ACPI HID device 00:14.5, Lint0Pass
        b'A', b'M', b'D', b'I', b'0', b'0', b'2', b'0', // HID
        0, 0, 0, 0, 0, 0, 0, 0, // CID
        0x02, 0x05, b'I', b'D', b'0', b'0', 0x00, // UID: string "ID00" and its NUL
        0xf0, 0xa6, 0x00, 0x00, // ACPI HID device 00:14.6
        b'A', b'M', b'D', b'I', b'0', b'0', b'4', b'0', // HID
        b'P', b'N', b'P', b'0', b'C', b'0', b'F', b'0', // CID
        0x01, 0x01, 0x07, // UID: integer 7
        // IVMD type 20h at 250: unity, read, write for every device
        0x20, 0x07, 0x20, 0x00, // Type, flags, length 32
        0x00, 0x00, 0x00, 0x00, // DeviceID, auxiliary data
        0, 0, 0, 0, 0, 0, 0, 0, // Reserved
        0x00, 0x00, 0x00, 0x7b, 0x00, 0x00, 0x00, 0x00, // Start 0x7b000000
        0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, // Length 1 MiB
        // IVMD type 21h at 282: an exclusion range for 00:14.0
        0x21, 0x0e, 0x20, 0x00, // Type, flags read|write|exclusion, length 32
        0xa0, 0x00, 0x00, 0x00, // DeviceID 00:14.0
        0, 0, 0, 0, 0, 0, 0, 0, // Reserved
        0x00, 0x00, 0x00, 0x7c, 0x00, 0x00, 0x00, 0x00, // Start 0x7c000000
        0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // Length 8 KiB
        // IVMD type 22h at 314: unity read-only for 05:00.0..05:1f.7
        0x22, 0x03, 0x20, 0x00, // Type, flags unity|read, length 32
        0x00, 0x05, 0xff, 0x05, // First 05:00.0, last 05:1f.7
        0, 0, 0, 0, 0, 0, 0, 0, // Reserved
        0x00, 0x00, 0x00, 0x7d, 0x00, 0x00, 0x00, 0x00, // Start 0x7d000000
        0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // Length 4 KiB
        // IVMD type 20h at 346: neither unity nor exclusion
        0x20, 0x00, 0x20, 0x00, // Type, flags 0, length 32
        0x00, 0x00, 0x00, 0x00, // DeviceID, auxiliary data
        0, 0, 0, 0, 0, 0, 0, 0, // Reserved
        0x00, 0x00, 0x00, 0x7e, 0x00, 0x00, 0x00, 0x00, // Start 0x7e000000
        0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // Length 4 KiB
        // A reserved block type at 378, skipped by length
        0x50, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn qemu_amd_iommu_ivrs() {
        let ivrs = parse_body(&QEMU_BODY).unwrap();
        assert_eq!(ivrs.info.pa_bits(), 40);
        assert_eq!(ivrs.info.va_bits(), 0);
        assert!(!ivrs.info.efr_sup() && !ivrs.info.dma_remap());
        assert_eq!(ivrs.units.len(), 1);
        let unit = ivrs.units[0];
        assert_eq!(
            (unit.offset, unit.kind, unit.flags),
            (48, IVHD_TYPE_10, 0xd1)
        );
        assert_eq!(unit.device, sid(0, 3, 0));
        assert_eq!(unit.capability_offset, 0x40);
        assert_eq!(unit.base, HostPhysAddr(0xfed8_0000));
        assert_eq!((unit.segment, unit.msi_number(), unit.unit_id()), (0, 0, 0));
        assert_eq!(unit.features, 0x44);
        assert_eq!((unit.efr, unit.efr2), (None, None));
        assert_eq!(ivrs.preferred_type(), Some(IVHD_TYPE_10));
        assert_eq!(ivrs.preferred_units().count(), 1);
        let entries = ivrs.entries(unit.entries);
        assert_eq!(entries.len(), 8);
        assert_eq!(
            entries[7],
            IvhdEntry::Special {
                variety: SpecialVariety::IoApic,
                handle: 0,
                device: sid(0, 0x14, 0),
                dte: DteSetting(0)
            }
        );
        let devices: std::vec::Vec<_> = ivrs
            .device_ranges(&unit)
            .map(|r| {
                assert_eq!((r.first, r.alias, r.dte), (r.last, None, DteSetting(0)));
                r.first.to_string()
            })
            .collect();
        assert_eq!(
            devices,
            ["00:00.0", "00:01.0", "00:02.0", "00:03.0", "00:1f.0", "00:1f.2", "00:1f.3"]
        );
        assert!(ivrs.memory.is_empty() && ivrs.reserved_ranges().count() == 0);
    }

    #[test]
    fn every_entry_and_block_type() {
        let ivrs = parse_body(SERVER_BODY).unwrap();
        let info = ivrs.info;
        assert!(info.efr_sup() && info.dma_remap() && !info.ht_ats_reserved());
        assert_eq!(
            (info.guest_va_bits(), info.pa_bits(), info.va_bits()),
            (48, 48, 64)
        );
        assert_eq!(ivrs.units.len(), 2);
        assert_eq!(ivrs.skipped, 1);
        // Firmware describes the IOMMU twice; the type-40h block is the one to use.
        assert_eq!(ivrs.preferred_type(), Some(IVHD_TYPE_40));
        let units: std::vec::Vec<_> = ivrs.preferred_units().collect();
        assert_eq!(units.len(), 1);
        let unit = *units[0];
        assert_eq!((unit.offset, unit.flags), (76, 0x30));
        assert_eq!((unit.msi_number(), unit.unit_id()), (4, 3));
        assert_eq!(unit.efr, Some(0x2465_77ef_a225_4afa));
        assert_eq!(unit.efr2, Some(0));

        let old = ivrs.units[0];
        assert_eq!(
            ivrs.device_ranges(&old).collect::<std::vec::Vec<_>>(),
            [DeviceRange {
                first: SourceId(0),
                last: SourceId(0xffff),
                dte: DteSetting(0),
                alias: None,
                ext: 0
            }]
        );

        let ranges: std::vec::Vec<_> = ivrs.device_ranges(&unit).collect();
        let range = |first, last, dte, alias, ext| DeviceRange {
            first,
            last,
            dte: DteSetting(dte),
            alias,
            ext,
        };
        assert_eq!(
            ranges,
            [
                range(sid(0, 0, 2), sid(0, 0, 2), 0, None, 0),
                range(sid(1, 0, 0), sid(1, 0x1f, 7), 7, None, 0),
                range(sid(2, 0, 0), sid(2, 0, 0), 0, Some(sid(0, 8, 1)), 0),
                range(sid(3, 0, 0), sid(3, 0x1f, 7), 0, Some(sid(0, 1, 1)), 0),
                range(sid(4, 0, 0), sid(4, 0, 0), 0, None, 0x1000_0000),
                range(sid(5, 0, 0), sid(5, 0x1f, 7), 0xc0, None, 0),
            ]
        );
        let dte = DteSetting(7);
        assert!(dte.init_pass() && dte.ext_int_pass() && dte.nmi_pass());
        assert!(!dte.lint0_pass() && !dte.lint1_pass() && dte.sys_mgt() == 0);
        let dte = DteSetting(0xf0);
        assert!(dte.lint0_pass() && dte.lint1_pass() && dte.sys_mgt() == 3);

        let entries = ivrs.entries(unit.entries);
        // Padding and the reserved 4-byte type are not kept.
        assert_eq!(entries.len(), 13);
        assert_eq!(
            entries[9],
            IvhdEntry::Special {
                variety: SpecialVariety::IoApic,
                handle: 0x21,
                device: sid(0, 0x14, 0),
                dte: DteSetting(0xd7)
            }
        );
        assert_eq!(
            entries[10],
            IvhdEntry::Special {
                variety: SpecialVariety::Hpet,
                handle: 0,
                device: sid(0, 0x14, 0),
                dte: DteSetting(0)
            }
        );
        match entries[11] {
            IvhdEntry::AcpiHid {
                device,
                dte,
                hid,
                cid,
                uid,
            } => {
                assert_eq!((device, dte), (sid(0, 0x14, 5), DteSetting(0x40)));
                assert_eq!((&hid, cid), (b"AMDI0020", [0; 8]));
                assert_eq!(uid.as_bytes(), b"ID00");
            }
            e => panic!("{e:?}"),
        }
        match entries[12] {
            IvhdEntry::AcpiHid { hid, cid, uid, .. } => {
                assert_eq!((&hid, &cid), (b"AMDI0040", b"PNP0C0F0"));
                assert_eq!(uid, AcpiUid::Integer(7));
                assert_eq!(uid.as_bytes(), b"");
            }
            e => panic!("{e:?}"),
        }

        let m = &ivrs.memory;
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].devices, IvmdDevices::All);
        assert!(m[0].unity() && m[0].read() && m[0].write() && !m[0].exclusion());
        assert_eq!(m[1].devices, IvmdDevices::One(sid(0, 0x14, 0)));
        assert!(m[1].exclusion() && !m[1].unity());
        assert_eq!(
            m[2].devices,
            IvmdDevices::Range(sid(5, 0, 0), sid(5, 0x1f, 7))
        );
        assert!(m[2].unity() && m[2].read() && !m[2].write());
        assert!(!m[3].requires_identity_map());
        assert_eq!(m[3].offset, 346);
        let r = |start, end| PhysRange { start, end };
        assert_eq!(
            ivrs.reserved_ranges().collect::<std::vec::Vec<_>>(),
            [
                r(0x7b00_0000, 0x7b10_0000),
                r(0x7c00_0000, 0x7c00_2000),
                r(0x7d00_0000, 0x7d00_1000),
            ]
        );
        let far = EntrySpan {
            start: 500,
            len: 20,
        };
        assert!(ivrs.entries(far).is_empty() && far.len() == 20 && !far.is_empty());
    }

    #[test]
    fn names() {
        assert_eq!(block_name(IVMD_TYPE_RANGE), "IVMD type 22h");
        assert_eq!(block_name(0x99), "reserved-type block");
        assert_eq!(SpecialVariety::from_raw(9), SpecialVariety::Reserved(9));
        assert_eq!(AcpiUid::None.as_bytes(), b"");
    }

    /// An IVHD of type 10h holding `entries`, with its length field set to 24 +
    /// `entries.len()` + `extra_len` (a negative value cuts it short).
    fn ivhd10(entries: &[u8], extra_len: i32) -> std::vec::Vec<u8> {
        let mut body = vec![0x00, 0x28, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0];
        let len = (24 + entries.len() as i32 + extra_len) as u16;
        body.extend_from_slice(&[0x10, 0x00]);
        body.extend_from_slice(&len.to_le_bytes());
        body.extend_from_slice(&[0x10, 0x00, 0x40, 0x00]); // DeviceID 00:02.0, cap 0x40
        body.extend_from_slice(&0xfed8_0000u64.to_le_bytes());
        body.extend_from_slice(&[0; 8]); // segment, info, features
        body.extend_from_slice(entries);
        body
    }

    fn entry_problem(body: &[u8]) -> (u32, u8, EntryProblem) {
        match parse_body(body) {
            Err(IvrsError::BadEntry {
                ivhd: 48,
                offset,
                kind,
                problem,
            }) => (offset, kind, problem),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_blocks_are_errors() {
        // A block header cut by the table's end.
        let mut body = ivhd10(&[0x01, 0, 0, 0], 0);
        body.extend_from_slice(&[0x20, 0x00]);
        assert_eq!(
            parse_body(&body),
            Err(IvrsError::TruncatedBlock {
                offset: 76,
                table_len: 78
            })
        );
        // Length 0.
        let e = parse_body(&ivhd10(&[], -24)).unwrap_err();
        assert_eq!(
            e,
            IvrsError::BadBlockLength {
                kind: IVHD_TYPE_10,
                offset: 48,
                len: 0,
                min: 24
            }
        );
        assert_eq!(
            e.to_string(),
            "IVRS: IVHD type 10h (0x10) at offset 0x30 has length 0, below its minimum 24"
        );
        // A type-40h block with a type-10h-sized header.
        let mut short40 = ivhd10(&[], 0);
        short40[12] = IVHD_TYPE_40;
        assert!(matches!(
            parse_body(&short40),
            Err(IvrsError::BadBlockLength { min: 40, .. })
        ));
        // Length past the table's end.
        let e = parse_body(&ivhd10(&[0x01, 0, 0, 0], 4)).unwrap_err();
        assert_eq!(
            e,
            IvrsError::BlockPastEnd {
                kind: IVHD_TYPE_10,
                offset: 48,
                len: 32,
                table_len: 76
            }
        );
        assert!(e.to_string().contains("past the table's end at 0x4c"));
        assert_eq!(
            parse_body(&[0; 8]),
            Err(IvrsError::TableTooShort { len: 44 })
        );
        // An IVMD that wraps around.
        let mut ivmd = vec![0x00, 0x28, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0];
        ivmd.extend_from_slice(&[0x20, 0x07, 0x20, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        ivmd.extend_from_slice(&(u64::MAX - 0xfff).to_le_bytes());
        ivmd.extend_from_slice(&0x2000u64.to_le_bytes());
        let e = parse_body(&ivmd).unwrap_err();
        assert_eq!(
            e,
            IvrsError::BadIvmd {
                offset: 48,
                start: u64::MAX - 0xfff,
                length: 0x2000
            }
        );
        assert!(e.to_string().contains("wraps around"));
    }

    #[test]
    fn malformed_entries_are_errors() {
        // An 8-byte alias entry with 6 bytes left in its IVHD: past the block's end
        // although inside the table.
        let alias = [0x42, 0x00, 0x02, 0x00, 0x00, 0x41, 0x00, 0x00];
        let mut body = ivhd10(&alias, -2);
        body.extend_from_slice(&[0, 0]);
        assert_eq!(
            entry_problem(&body),
            (72, 0x42, EntryProblem::Truncated { needed: 8, left: 6 })
        );
        let e = parse_body(&body).unwrap_err();
        assert_eq!(
            e.to_string(),
            "IVRS: device entry of type 0x42 at offset 0x48 in the IVHD at offset 0x30 \
             needs 8 bytes but 6 are left in its IVHD"
        );
        // An ACPI HID entry whose UID runs past the block, and one cut before its UID
        // length.
        let mut hid = vec![0xf0, 0xa5, 0x00, 0x00];
        hid.extend_from_slice(b"AMDI0020");
        hid.extend_from_slice(&[0; 8]);
        hid.extend_from_slice(&[0x02, 0x09, b'I', b'D']);
        assert_eq!(
            entry_problem(&ivhd10(&hid, 0)),
            (
                72,
                0xf0,
                EntryProblem::Truncated {
                    needed: 31,
                    left: 24
                }
            )
        );
        assert_eq!(
            entry_problem(&ivhd10(&hid[..12], 0)),
            (
                72,
                0xf0,
                EntryProblem::Truncated {
                    needed: 22,
                    left: 12
                }
            )
        );
        // A UID longer than kept.
        let mut long = hid[..22].to_vec();
        long[21] = 17;
        long.extend_from_slice(&[b'x'; 17]);
        assert_eq!(
            entry_problem(&ivhd10(&long, 0)),
            (72, 0xf0, EntryProblem::UidTooLong { len: 17 })
        );
        // A variable-length type other than F0h.
        assert_eq!(
            entry_problem(&ivhd10(&[0x80, 0, 0, 0], 0)),
            (72, 0x80, EntryProblem::UnknownVariableLength)
        );
        // Ranges: an end without a start, a start without an end, two starts, inverted.
        assert_eq!(
            entry_problem(&ivhd10(&[0x04, 0xff, 0x01, 0x00], 0)),
            (72, 0x04, EntryProblem::UnpairedRangeEnd)
        );
        assert_eq!(
            entry_problem(&ivhd10(&[0x02, 0, 0, 0, 0x03, 0x00, 0x01, 0x00], 0)),
            (76, 0x03, EntryProblem::UnterminatedRange)
        );
        let two = [
            0x47, 0x00, 0x01, 0x00, 0, 0, 0, 0, // Ext range start 01:00.0
            0x03, 0x00, 0x02, 0x00, // Range start 02:00.0
            0x04, 0xff, 0x02, 0x00, // End 02:1f.7
        ];
        assert_eq!(
            entry_problem(&ivhd10(&two, 0)),
            (72, 0x47, EntryProblem::UnterminatedRange)
        );
        let inverted = [0x03, 0x00, 0x02, 0x00, 0x04, 0xff, 0x01, 0x00];
        let (offset, kind, problem) = entry_problem(&ivhd10(&inverted, 0));
        assert_eq!((offset, kind), (76, 0x04));
        assert_eq!(
            problem,
            EntryProblem::InvertedRange {
                first: sid(2, 0, 0),
                last: sid(1, 0x1f, 7)
            }
        );
        assert_eq!(
            problem.to_string(),
            "ends at 01:1f.7, before its start 02:00.0"
        );
    }

    #[test]
    fn too_many_entries_is_an_error() {
        let entries: std::vec::Vec<u8> = (0..=MAX_IVHD_ENTRIES as u16)
            .flat_map(|d| {
                let [lo, hi] = d.to_le_bytes();
                [0x02, lo, hi, 0x00]
            })
            .collect();
        let e = parse_body(&ivhd10(&entries, 0)).unwrap_err();
        assert_eq!(
            e,
            IvrsError::TooMany {
                what: "IVHD device entries",
                max: MAX_IVHD_ENTRIES
            }
        );
        assert_eq!(
            e.to_string(),
            "IVRS: more than 512 IVHD device entries (the most Ally keeps)"
        );
    }

    #[test]
    fn not_an_ivrs() {
        let (mem, table) = load(&acpi_table(b"DMAR", &QEMU_BODY));
        let e = Ivrs::parse(&mem, &table).unwrap_err();
        assert_eq!(
            e,
            IvrsError::NotIvrs {
                signature: *b"DMAR"
            }
        );
        assert_eq!(
            e.to_string(),
            "IVRS: the table given has signature \"DMAR\""
        );
    }

    #[test]
    fn found_through_the_rsdp() {
        let (mut mem, rsdp) =
            super::super::testutil::firmware_with(&acpi_table(b"IVRS", &QEMU_BODY));
        let ivrs_pa = 0xf_1000;
        let (table, ivrs) = Ivrs::find(&mem, &rsdp).unwrap().unwrap();
        assert_eq!(table.pa, ivrs_pa);
        assert_eq!(ivrs.units[0].base, HostPhysAddr(0xfed8_0000));
        mem.put(ivrs_pa, b"XXXX");
        assert_eq!(Ivrs::find(&mem, &rsdp), Ok(None));
        let mut bad = acpi_table(b"IVRS", &QEMU_BODY);
        bad[20] ^= 1;
        mem.put(ivrs_pa, &bad);
        assert!(matches!(
            Ivrs::find(&mem, &rsdp),
            Err(IvrsError::Acpi(AcpiError::BadChecksum { .. }))
        ));
    }

    /// Random corruption and every truncation of a rich table: the parser returns an
    /// answer, never panics, and never reads outside the table (`load` sets the window).
    #[test]
    fn corrupted_tables_never_panic() {
        let good = acpi_table(b"IVRS", SERVER_BODY);
        let mut seed = 0x0fed_cba9_8765_4321u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut errors = 0;
        for _ in 0..3000 {
            let mut t = good.clone();
            for _ in 0..1 + next() % 4 {
                let at = 36 + (next() as usize) % (t.len() - 36);
                t[at] = next() as u8;
            }
            fix_checksum(&mut t);
            let (mem, table) = load(&t);
            match Ivrs::parse(&mem, &table) {
                Ok(ivrs) => {
                    for u in &ivrs.units {
                        assert!(ivrs.device_ranges(u).all(|r| r.first <= r.last));
                    }
                }
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    errors += 1;
                }
            }
        }
        assert!(errors > 0);
        for len in 36..good.len() as u32 {
            let mut t = good.clone();
            t.truncate(len as usize);
            t[4..8].copy_from_slice(&len.to_le_bytes());
            fix_checksum(&mut t);
            let (mem, table) = load(&t);
            if let Err(e) = Ivrs::parse(&mem, &table) {
                assert!(!e.to_string().is_empty());
            }
        }
    }

    #[test]
    fn reserved_ranges_feed_the_guest_plan() {
        use super::super::{DmaDomainPlan, IommuError};
        let ivrs = parse_body(SERVER_BODY).unwrap();
        let reserved: std::vec::Vec<_> = ivrs.reserved_ranges().collect();
        let ram = [PhysRange {
            start: 0,
            end: 0x7000_0000,
        }];
        let plan = DmaDomainPlan::guest(&ram, &[], &reserved).unwrap();
        assert!(plan.contains(0x7c00_1fff) && !plan.contains(0x7e00_0000));
        // Ally placed where firmware wants an exclusion range: refused.
        let ally = PhysRange {
            start: 0x7c00_1000,
            end: 0x7c40_0000,
        };
        assert_eq!(
            DmaDomainPlan::guest(&ram, &[ally], &reserved),
            Err(IommuError::ReservedOverlapsProtected {
                reserved: PhysRange {
                    start: 0x7c00_0000,
                    end: 0x7c00_2000
                },
                protected: ally
            })
        );
    }
}
