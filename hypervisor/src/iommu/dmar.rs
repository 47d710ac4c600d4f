//! The ACPI DMA Remapping Reporting table, DMAR (Intel Virtualization Technology for
//! Directed I/O Architecture Specification, rev. 4.1, chapter 8): where the remapping
//! hardware units are, which devices each one translates, and the memory some devices
//! must keep reaching (RMRRs).
//!
//! The table comes from firmware Ally does not trust to be well formed: every structure
//! and device-scope length is checked against its container before a byte of it is read
//! (through the bounds-checked reader of the parent module), lists are bounded, and every
//! problem is an error naming the structure and its offset, never a panic.

use super::{SourceId, TableReader};
use crate::acpi::{find_table, AcpiError, AcpiTable, PhysMemory, Rsdp};
use crate::addr::{HostPhysAddr, PhysRange};
use core::fmt;

/// The DMAR's signature.
pub const DMAR_SIGNATURE: [u8; 4] = *b"DMAR";
/// Offset of the first remapping structure: the 36-byte header, Host Address Width, Flags
/// and 10 reserved bytes (VT-d 8.1, Table 8-1).
pub const DMAR_STRUCTURES_OFFSET: u32 = 48;

/// Most remapping hardware units kept (real servers have one or two per socket).
pub const MAX_DRHD: usize = 16;
/// Most reserved-memory regions kept.
pub const MAX_RMRR: usize = 32;
/// Most ATSR structures kept (one per PCI segment).
pub const MAX_ATSR: usize = 8;
/// Most RHSA structures kept (one per unit).
pub const MAX_RHSA: usize = MAX_DRHD;
/// Most ANDD structures kept.
pub const MAX_ANDD: usize = 16;
/// Most device scopes kept, over all structures (QEMU lists every PCI device of the
/// machine in its unit's scope).
pub const MAX_DEVICE_SCOPES: usize = 256;
/// Most hops in a device scope's path (bridges between the start bus and the device).
pub const MAX_PATH_LEN: usize = 8;
/// Longest ANDD object name kept, in bytes.
pub const MAX_ANDD_NAME: usize = 64;

/// Remapping structure types (VT-d 8.2, Table 8-2).
pub const TYPE_DRHD: u16 = 0;
pub const TYPE_RMRR: u16 = 1;
pub const TYPE_ATSR: u16 = 2;
pub const TYPE_RHSA: u16 = 3;
pub const TYPE_ANDD: u16 = 4;
pub const TYPE_SATC: u16 = 5;
pub const TYPE_SIDP: u16 = 6;

/// The short name the specification gives a remapping structure type.
pub const fn structure_name(kind: u16) -> &'static str {
    match kind {
        TYPE_DRHD => "DRHD",
        TYPE_RMRR => "RMRR",
        TYPE_ATSR => "ATSR",
        TYPE_RHSA => "RHSA",
        TYPE_ANDD => "ANDD",
        TYPE_SATC => "SATC",
        TYPE_SIDP => "SIDP",
        _ => "reserved-type structure",
    }
}

/// The fixed part of each structure type this parser reads; other types need only their
/// 4-byte type and length, to be skipped.
const fn min_len(kind: u16) -> u16 {
    match kind {
        TYPE_DRHD => 16,
        TYPE_RMRR => 24,
        TYPE_ATSR => 8,
        TYPE_RHSA => 20,
        TYPE_ANDD => 8,
        _ => 4,
    }
}

/// What is wrong with a device scope.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ScopeProblem {
    /// Fewer than the 6 bytes of a scope header are left in the structure.
    Truncated { left: u32 },
    /// The scope's length is below 6 or leaves half a path entry.
    BadLength { len: u8 },
    /// The scope's length runs past its structure's end.
    PastEnd { len: u8, left: u32 },
    /// The scope has no path entry (VT-d 8.3.1: at least one is required).
    NoPath,
    /// More hops than [`MAX_PATH_LEN`].
    PathTooLong { hops: u32 },
}

/// Errors of the DMAR parser.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DmarError {
    /// Locating or loading the table failed.
    Acpi(AcpiError),
    /// The table given is not a DMAR.
    NotDmar { signature: [u8; 4] },
    /// The table is shorter than its fixed part.
    TableTooShort { len: u32 },
    /// Host Address Width + 1 exceeds 64 bits.
    BadHostAddressWidth { haw: u8 },
    /// A structure's type and length do not fit before the table's end.
    TruncatedStructure { offset: u32, table_len: u32 },
    /// A structure's length is below its fixed part (0 included).
    BadStructureLength {
        kind: u16,
        offset: u32,
        len: u16,
        min: u16,
    },
    /// A structure runs past the table's end.
    StructurePastEnd {
        kind: u16,
        offset: u32,
        len: u16,
        table_len: u32,
    },
    /// A device scope is malformed.
    BadScope {
        kind: u16,
        structure: u32,
        offset: u32,
        problem: ScopeProblem,
    },
    /// An RMRR's limit is below its base, or at the top of the address space.
    BadRmrr { offset: u32, base: u64, limit: u64 },
    /// An ANDD's object name is longer than [`MAX_ANDD_NAME`].
    AnddNameTooLong { offset: u32, len: u32 },
    /// More items of a kind than this parser keeps.
    TooMany { what: &'static str, max: usize },
}

impl From<AcpiError> for DmarError {
    fn from(e: AcpiError) -> Self {
        DmarError::Acpi(e)
    }
}

impl fmt::Display for ScopeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ScopeProblem::Truncated { left } => write!(
                f,
                "is cut short: {left} bytes left in the structure, a scope needs 6"
            ),
            ScopeProblem::BadLength { len } => {
                write!(f, "has length {len} (6 plus 2 per path entry expected)")
            }
            ScopeProblem::PastEnd { len, left } => write!(
                f,
                "has length {len}, past the end of its structure ({left} bytes left)"
            ),
            ScopeProblem::NoPath => f.write_str("has no path entry"),
            ScopeProblem::PathTooLong { hops } => {
                write!(f, "has a path of {hops} hops (at most {MAX_PATH_LEN} kept)")
            }
        }
    }
}

impl fmt::Display for DmarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DmarError::Acpi(e) => write!(f, "DMAR: {e}"),
            DmarError::NotDmar { signature } => write!(
                f,
                "DMAR: the table given has signature {:?}",
                core::str::from_utf8(&signature).unwrap_or("????")
            ),
            DmarError::TableTooShort { len } => write!(
                f,
                "DMAR: table length {len} is shorter than its {DMAR_STRUCTURES_OFFSET}-byte fixed part"
            ),
            DmarError::BadHostAddressWidth { haw } => {
                write!(f, "DMAR: host address width {} bits is impossible", u32::from(haw) + 1)
            }
            DmarError::TruncatedStructure { offset, table_len } => write!(
                f,
                "DMAR: structure at offset {offset:#x} is cut short by the table's end at {table_len:#x}"
            ),
            DmarError::BadStructureLength {
                kind,
                offset,
                len,
                min,
            } => write!(
                f,
                "DMAR: {} (type {kind}) at offset {offset:#x} has length {len}, below its minimum {min}",
                structure_name(kind)
            ),
            DmarError::StructurePastEnd {
                kind,
                offset,
                len,
                table_len,
            } => write!(
                f,
                "DMAR: {} (type {kind}) at offset {offset:#x} has length {len}, past the table's end at {table_len:#x}",
                structure_name(kind)
            ),
            DmarError::BadScope {
                kind,
                structure,
                offset,
                problem,
            } => write!(
                f,
                "DMAR: device scope at offset {offset:#x} of the {} at offset {structure:#x} {problem}",
                structure_name(kind)
            ),
            DmarError::BadRmrr {
                offset,
                base,
                limit,
            } => write!(
                f,
                "DMAR: RMRR at offset {offset:#x} has base {base:#x} and limit {limit:#x}"
            ),
            DmarError::AnddNameTooLong { offset, len } => write!(
                f,
                "DMAR: ANDD at offset {offset:#x} has a {len}-byte object name (at most {MAX_ANDD_NAME} kept)"
            ),
            DmarError::TooMany { what, max } => {
                write!(f, "DMAR: more than {max} {what} (the most Ally keeps)")
            }
        }
    }
}

/// The DMAR's flags (VT-d 8.1, Table 8-1).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct DmarFlags(pub u8);

impl DmarFlags {
    /// The platform supports interrupt remapping.
    pub const INTR_REMAP: u8 = 1 << 0;
    /// Firmware asks the OS not to enable x2APIC mode.
    pub const X2APIC_OPT_OUT: u8 = 1 << 1;
    /// Firmware set up DMA protection the OS may rely on until it takes over
    /// (platform opt-in for kernel DMA protection).
    pub const DMA_CTRL_PLATFORM_OPT_IN: u8 = 1 << 2;

    pub const fn intr_remap(self) -> bool {
        self.0 & Self::INTR_REMAP != 0
    }
    pub const fn x2apic_opt_out(self) -> bool {
        self.0 & Self::X2APIC_OPT_OUT != 0
    }
    pub const fn dma_ctrl_platform_opt_in(self) -> bool {
        self.0 & Self::DMA_CTRL_PLATFORM_OPT_IN != 0
    }
}

/// Device scope types (VT-d 8.3.1, Table 8-4).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DeviceScopeKind {
    PciEndpoint,
    /// A PCI-PCI bridge and every device below it.
    PciSubHierarchy,
    /// An I/O APIC; the enumeration ID is its I/O APIC ID.
    IoApic,
    /// An HPET capable of MSI; the enumeration ID is its HPET number.
    MsiCapableHpet,
    /// An ACPI namespace device; the enumeration ID is its ANDD device number.
    AcpiNamespaceDevice,
    /// A type the specification reserves, kept as read.
    Reserved(u8),
}

impl DeviceScopeKind {
    pub const fn from_raw(raw: u8) -> Self {
        match raw {
            1 => DeviceScopeKind::PciEndpoint,
            2 => DeviceScopeKind::PciSubHierarchy,
            3 => DeviceScopeKind::IoApic,
            4 => DeviceScopeKind::MsiCapableHpet,
            5 => DeviceScopeKind::AcpiNamespaceDevice,
            r => DeviceScopeKind::Reserved(r),
        }
    }
}

impl fmt::Display for DeviceScopeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceScopeKind::PciEndpoint => f.write_str("PCI endpoint"),
            DeviceScopeKind::PciSubHierarchy => f.write_str("PCI sub-hierarchy"),
            DeviceScopeKind::IoApic => f.write_str("I/O APIC"),
            DeviceScopeKind::MsiCapableHpet => f.write_str("HPET"),
            DeviceScopeKind::AcpiNamespaceDevice => f.write_str("ACPI namespace device"),
            DeviceScopeKind::Reserved(r) => write!(f, "reserved scope type {r}"),
        }
    }
}

/// One hop of a device scope's path.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PciPathEntry {
    pub device: u8,
    pub function: u8,
}

/// A device scope (VT-d 8.3.1): the device(s) a structure applies to, as a path of
/// device/function hops from a start bus.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct DeviceScope {
    pub kind: DeviceScopeKind,
    /// I/O APIC ID, HPET number or ANDD device number; 0 for PCI scopes.
    pub enumeration_id: u8,
    pub start_bus: u8,
    pub path: heapless::Vec<PciPathEntry, MAX_PATH_LEN>,
}

impl DeviceScope {
    /// The source-id of the scope's device (for an I/O APIC or HPET, the requester ID its
    /// interrupt messages carry, which interrupt remapping verifies). Each hop but the last
    /// is a bridge whose secondary bus number `secondary_bus` reads from configuration
    /// space (VT-d 8.3.2); `None` when that read fails or the path is empty.
    pub fn source_id(
        &self,
        mut secondary_bus: impl FnMut(SourceId) -> Option<u8>,
    ) -> Option<SourceId> {
        let (last, bridges) = self.path.split_last()?;
        let mut bus = self.start_bus;
        for hop in bridges {
            bus = secondary_bus(SourceId::new(bus, hop.device, hop.function))?;
        }
        Some(SourceId::new(bus, last.device, last.function))
    }
}

impl fmt::Display for DeviceScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        match self.kind {
            DeviceScopeKind::IoApic
            | DeviceScopeKind::MsiCapableHpet
            | DeviceScopeKind::AcpiNamespaceDevice => write!(f, " {}", self.enumeration_id)?,
            _ => {}
        }
        write!(f, " at {:02x}:", self.start_bus)?;
        for (i, hop) in self.path.iter().enumerate() {
            let sep = if i == 0 { "" } else { "/" };
            write!(f, "{sep}{:02x}.{}", hop.device, hop.function)?;
        }
        Ok(())
    }
}

/// Where a structure's device scopes are in [`Dmar::scopes`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ScopeSpan {
    start: u16,
    len: u16,
}

impl ScopeSpan {
    pub const fn len(self) -> usize {
        self.len as usize
    }
    pub const fn is_empty(self) -> bool {
        self.len == 0
    }
}

/// A DMA Remapping Hardware Unit Definition (VT-d 8.3, Table 8-3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Drhd {
    /// Offset of the structure in the table, for messages.
    pub offset: u32,
    pub flags: u8,
    /// Size of the register set: 2^size 4 KiB pages (VT-d rev. 3.0 and later).
    pub size: u8,
    pub segment: u16,
    pub register_base: HostPhysAddr,
    pub scopes: ScopeSpan,
}

impl Drhd {
    /// INCLUDE_PCI_ALL: the unit translates every PCI device of its segment that no other
    /// unit lists; such a unit comes last for its segment (VT-d 8.3).
    pub const INCLUDE_PCI_ALL: u8 = 1 << 0;

    pub const fn include_pci_all(&self) -> bool {
        self.flags & Self::INCLUDE_PCI_ALL != 0
    }

    /// Length of the unit's register set in bytes.
    pub const fn register_set_len(&self) -> u64 {
        4096 << (self.size & 0xF)
    }
}

/// A Reserved Memory Region Reporting structure (VT-d 8.4, Table 8-5): memory the listed
/// devices use behind the OS's back, which their domain must map identity.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Rmrr {
    pub offset: u32,
    pub segment: u16,
    pub base: u64,
    /// Last byte of the region (inclusive).
    pub limit: u64,
    pub scopes: ScopeSpan,
}

impl Rmrr {
    /// The region as a half-open range (the parser made sure `limit + 1` exists).
    pub const fn range(&self) -> PhysRange {
        PhysRange {
            start: self.base,
            end: self.limit.wrapping_add(1),
        }
    }
}

/// A Root Port ATS Capability Reporting structure (VT-d 8.5, Table 8-6).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Atsr {
    pub offset: u32,
    pub flags: u8,
    pub segment: u16,
    pub scopes: ScopeSpan,
}

impl Atsr {
    /// ALL_PORTS: every root port of the segment supports ATS.
    pub const ALL_PORTS: u8 = 1 << 0;

    pub const fn all_ports(&self) -> bool {
        self.flags & Self::ALL_PORTS != 0
    }
}

/// A Remapping Hardware Static Affinity structure (VT-d 8.6, Table 8-7): the NUMA node of
/// a unit.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Rhsa {
    pub offset: u32,
    pub register_base: HostPhysAddr,
    pub proximity_domain: u32,
}

/// An ACPI Name-space Device Declaration (VT-d 8.7, Table 8-8): names the ACPI device an
/// ACPI-namespace device scope refers to by number.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Andd {
    pub offset: u32,
    pub device_number: u8,
    name: heapless::Vec<u8, MAX_ANDD_NAME>,
}

impl Andd {
    /// The object's fully qualified name (e.g. `\_SB.PCI0.I2C0`), without its NUL.
    pub fn name(&self) -> &[u8] {
        &self.name
    }
}

/// A parsed DMAR.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Dmar {
    /// Host Address Width field: the platform's DMA addresses have `haw + 1` bits.
    pub haw: u8,
    pub flags: DmarFlags,
    pub units: heapless::Vec<Drhd, MAX_DRHD>,
    pub reserved_memory: heapless::Vec<Rmrr, MAX_RMRR>,
    pub ats_ports: heapless::Vec<Atsr, MAX_ATSR>,
    pub affinities: heapless::Vec<Rhsa, MAX_RHSA>,
    pub namespace_devices: heapless::Vec<Andd, MAX_ANDD>,
    /// Structures of other types (SATC, SIDP, reserved), skipped by their length.
    pub skipped: u32,
    scopes: heapless::Vec<DeviceScope, MAX_DEVICE_SCOPES>,
}

impl Dmar {
    /// Finds the DMAR through the RSDP and parses it; `Ok(None)` when the machine has none
    /// (no VT-d, or firmware left it disabled). The table is returned too, so the caller
    /// can hide it from the guest with [`crate::acpi::hide_table`].
    pub fn find(
        mem: &impl PhysMemory,
        rsdp: &Rsdp,
    ) -> Result<Option<(AcpiTable, Dmar)>, DmarError> {
        match find_table(mem, rsdp, &DMAR_SIGNATURE) {
            Ok(table) => Ok(Some((table, Dmar::parse(mem, &table)?))),
            Err(AcpiError::TableNotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Parses `table` (loaded and checksummed by [`AcpiTable::load`] or [`find_table`]).
    pub fn parse(mem: &impl PhysMemory, table: &AcpiTable) -> Result<Self, DmarError> {
        if table.header.signature != DMAR_SIGNATURE {
            return Err(DmarError::NotDmar {
                signature: table.header.signature,
            });
        }
        let rd = TableReader::new(mem, table);
        let table_len = rd.len;
        let too_short = DmarError::TableTooShort { len: table_len };
        if table_len < DMAR_STRUCTURES_OFFSET {
            return Err(too_short);
        }
        let mut dmar = Dmar {
            haw: rd.u8(36).ok_or(too_short)?,
            flags: DmarFlags(rd.u8(37).ok_or(too_short)?),
            ..Dmar::default()
        };
        if dmar.haw >= 64 {
            return Err(DmarError::BadHostAddressWidth { haw: dmar.haw });
        }
        let mut offset = DMAR_STRUCTURES_OFFSET;
        while offset < table_len {
            let truncated = DmarError::TruncatedStructure { offset, table_len };
            let kind = rd.u16(offset).ok_or(truncated)?;
            let len = rd.u16(offset + 2).ok_or(truncated)?;
            let min = min_len(kind);
            if len < min {
                return Err(DmarError::BadStructureLength {
                    kind,
                    offset,
                    len,
                    min,
                });
            }
            let end = offset + u32::from(len);
            if end > table_len {
                return Err(DmarError::StructurePastEnd {
                    kind,
                    offset,
                    len,
                    table_len,
                });
            }
            let s = Structure {
                rd,
                kind,
                offset,
                end,
            };
            dmar.parse_structure(&s)?;
            offset = end;
        }
        Ok(dmar)
    }

    fn parse_structure<M: PhysMemory>(&mut self, s: &Structure<'_, M>) -> Result<(), DmarError> {
        let offset = s.offset;
        match s.kind {
            TYPE_DRHD => {
                let drhd = Drhd {
                    offset,
                    flags: s.u8(4)?,
                    size: s.u8(5)?,
                    segment: s.u16(6)?,
                    register_base: HostPhysAddr(s.u64(8)?),
                    scopes: self.parse_scopes(s, 16)?,
                };
                push(&mut self.units, drhd, "remapping hardware units (DRHD)")
            }
            TYPE_RMRR => {
                let (base, limit) = (s.u64(8)?, s.u64(16)?);
                if limit < base || limit == u64::MAX {
                    return Err(DmarError::BadRmrr {
                        offset,
                        base,
                        limit,
                    });
                }
                let rmrr = Rmrr {
                    offset,
                    segment: s.u16(6)?,
                    base,
                    limit,
                    scopes: self.parse_scopes(s, 24)?,
                };
                push(
                    &mut self.reserved_memory,
                    rmrr,
                    "reserved memory regions (RMRR)",
                )
            }
            TYPE_ATSR => {
                let atsr = Atsr {
                    offset,
                    flags: s.u8(4)?,
                    segment: s.u16(6)?,
                    scopes: self.parse_scopes(s, 8)?,
                };
                push(&mut self.ats_ports, atsr, "ATS reporting structures (ATSR)")
            }
            TYPE_RHSA => {
                let rhsa = Rhsa {
                    offset,
                    register_base: HostPhysAddr(s.u64(8)?),
                    proximity_domain: s.u32(16)?,
                };
                push(&mut self.affinities, rhsa, "affinity structures (RHSA)")
            }
            TYPE_ANDD => {
                let mut name = heapless::Vec::new();
                for at in offset + 8..s.end {
                    let b = s.u8(at - offset)?;
                    if b == 0 {
                        break;
                    }
                    name.push(b).map_err(|_| DmarError::AnddNameTooLong {
                        offset,
                        len: s.end - offset - 8,
                    })?;
                }
                let andd = Andd {
                    offset,
                    device_number: s.u8(7)?,
                    name,
                };
                push(
                    &mut self.namespace_devices,
                    andd,
                    "namespace device declarations (ANDD)",
                )
            }
            _ => {
                self.skipped += 1;
                Ok(())
            }
        }
    }

    /// Parses the device scopes from `first` (relative to the structure) to its end.
    fn parse_scopes<M: PhysMemory>(
        &mut self,
        s: &Structure<'_, M>,
        first: u32,
    ) -> Result<ScopeSpan, DmarError> {
        let start = self.scopes.len();
        let mut at = s.offset + first;
        while at < s.end {
            let left = s.end - at;
            let bad = |problem| DmarError::BadScope {
                kind: s.kind,
                structure: s.offset,
                offset: at,
                problem,
            };
            if left < 6 {
                return Err(bad(ScopeProblem::Truncated { left }));
            }
            let kind = s.u8(at - s.offset)?;
            let len = s.u8(at - s.offset + 1)?;
            if len < 6 || len % 2 != 0 {
                return Err(bad(ScopeProblem::BadLength { len }));
            }
            if u32::from(len) > left {
                return Err(bad(ScopeProblem::PastEnd { len, left }));
            }
            let hops = u32::from(len - 6) / 2;
            if hops == 0 {
                return Err(bad(ScopeProblem::NoPath));
            }
            let mut path = heapless::Vec::new();
            for hop in 0..hops {
                let p = at - s.offset + 6 + 2 * hop;
                let entry = PciPathEntry {
                    device: s.u8(p)?,
                    function: s.u8(p + 1)?,
                };
                path.push(entry)
                    .map_err(|_| bad(ScopeProblem::PathTooLong { hops }))?;
            }
            let scope = DeviceScope {
                kind: DeviceScopeKind::from_raw(kind),
                enumeration_id: s.u8(at - s.offset + 4)?,
                start_bus: s.u8(at - s.offset + 5)?,
                path,
            };
            push(&mut self.scopes, scope, "device scopes")?;
            at += u32::from(len);
        }
        Ok(ScopeSpan {
            // Both fit: the pool holds at most MAX_DEVICE_SCOPES entries.
            start: start as u16,
            len: (self.scopes.len() - start) as u16,
        })
    }

    /// Width of the platform's DMA addresses in bits.
    pub fn host_address_width(&self) -> u32 {
        u32::from(self.haw) + 1
    }

    /// The device scopes of a structure.
    pub fn scopes(&self, span: ScopeSpan) -> &[DeviceScope] {
        let start = usize::from(span.start);
        self.scopes
            .get(start..start + usize::from(span.len))
            .unwrap_or(&[])
    }

    /// The regions every RMRR reserves, for [`super::DmaDomainPlan::guest`].
    pub fn reserved_ranges(&self) -> impl Iterator<Item = PhysRange> + '_ {
        self.reserved_memory.iter().map(Rmrr::range)
    }
}

fn push<T, const N: usize>(
    v: &mut heapless::Vec<T, N>,
    item: T,
    what: &'static str,
) -> Result<(), DmarError> {
    v.push(item)
        .map_err(|_| DmarError::TooMany { what, max: N })
}

/// One remapping structure whose length the parser checked: reads relative to its start
/// and inside its length.
struct Structure<'a, M: PhysMemory> {
    rd: TableReader<'a, M>,
    kind: u16,
    offset: u32,
    end: u32,
}

impl<M: PhysMemory> Structure<'_, M> {
    fn fail(&self) -> DmarError {
        DmarError::StructurePastEnd {
            kind: self.kind,
            offset: self.offset,
            len: (self.end - self.offset) as u16,
            table_len: self.rd.len,
        }
    }

    fn at(&self, rel: u32, size: u32) -> Result<u32, DmarError> {
        let abs = self.offset.checked_add(rel).ok_or_else(|| self.fail())?;
        if abs.checked_add(size).is_none_or(|e| e > self.end) {
            return Err(self.fail());
        }
        Ok(abs)
    }

    fn u8(&self, rel: u32) -> Result<u8, DmarError> {
        self.rd.u8(self.at(rel, 1)?).ok_or_else(|| self.fail())
    }
    fn u16(&self, rel: u32) -> Result<u16, DmarError> {
        self.rd.u16(self.at(rel, 2)?).ok_or_else(|| self.fail())
    }
    fn u32(&self, rel: u32) -> Result<u32, DmarError> {
        self.rd.u32(self.at(rel, 4)?).ok_or_else(|| self.fail())
    }
    fn u64(&self, rel: u32) -> Result<u64, DmarError> {
        self.rd.u64(self.at(rel, 8)?).ok_or_else(|| self.fail())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{acpi_table, fix_checksum, FakePhys};
    use super::*;

    const TABLE_PA: u64 = 0x7ffe_0000;

    /// The table in memory, loaded; from then on a read outside it panics.
    fn load(bytes: &[u8]) -> (FakePhys, AcpiTable) {
        let mut mem = FakePhys::new(TABLE_PA, 0x1_0000);
        mem.put(TABLE_PA, bytes);
        let table = AcpiTable::load(&mem, TABLE_PA, 0).unwrap();
        mem.window
            .set(Some((TABLE_PA, TABLE_PA + u64::from(table.len()))));
        (mem, table)
    }

    fn parse_body(body: &[u8]) -> Result<Dmar, DmarError> {
        let (mem, table) = load(&acpi_table(b"DMAR", body));
        Dmar::parse(&mem, &table)
    }

    /// The DMAR of QEMU 7.2 for `-machine q35 -device intel-iommu,intremap=on` with a VGA
    /// card at 00:01.0 and a NIC at 00:02.0 (hw/i386/acpi-build.c, build_dmar_q35). Since
    /// QEMU 6.1 the unit lists every PCI device instead of setting INCLUDE_PCI_ALL, so
    /// that buses with bypass_iommu can be left out.
    const QEMU_Q35_BODY: [u8; 84] = [
        38,   // Host Address Width: aw-bits 39, minus one
        0x01, // Flags: INTR_REMAP (intremap=on)
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // Reserved
        // DRHD at offset 48
        0x00, 0x00, // Type 0: DRHD
        0x48, 0x00, // Length: 16 + 8 (I/O APIC) + 6 * 8 (PCI devices) = 72
        0x00, // Flags: INCLUDE_PCI_ALL clear
        0x00, // Reserved (Size: one 4 KiB page)
        0x00, 0x00, // Segment 0
        0x00, 0x00, 0xd9, 0xfe, 0x00, 0x00, 0x00, 0x00, // Register base 0xfed90000
        // Scope: the I/O APIC, on Q35_PSEUDO_BUS_PLATFORM at Q35_PSEUDO_DEVFN_IOAPIC
        0x03, 0x08, // Type 3: I/O APIC, length 8
        0x00, 0x00, // Reserved
        0x00, // Enumeration ID: I/O APIC ID 0
        0xff, // Start bus 0xff
        0x00, 0x00, // Path: device 0, function 0
        // Scopes: the PCI endpoints of bus 0, one hop each
        0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 00:00.0 host bridge
        0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, // 00:01.0 VGA
        0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, // 00:02.0 NIC
        0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x1f, 0x00, // 00:1f.0 LPC
        0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x1f, 0x02, // 00:1f.2 SATA
        0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x1f, 0x03, // 00:1f.3 SMBus
    ];

    /// A two-socket-server-like DMAR with every structure type.
    const SERVER_BODY: &[u8] = &[
        45,   // Host Address Width: 46 bits
        0x05, // Flags: INTR_REMAP | DMA_CTRL_PLATFORM_OPT_IN
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // Reserved
        // DRHD at 48: the graphics unit
        0x00, 0x00, // Type 0: DRHD
        0x22, 0x00, // Length 34 = 16 + 8 + 10
        0x00, // Flags: none
        0x00, // Size: one page
        0x00, 0x00, // Segment 0
        0x00, 0x10, 0xd9, 0xfe, 0x00, 0x00, 0x00, 0x00, // Register base 0xfed91000
        0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, // Endpoint 00:02.0
        0x01, 0x0a, 0x00, 0x00, 0x00, 0x00, // Endpoint, length 10, bus 0 ...
        0x1c, 0x04, 0x00, 0x00, // ... path 1c.4 (a root port) then 00.0 behind it
        // DRHD at 82: everything else
        0x00, 0x00, // Type 0: DRHD
        0x28, 0x00, // Length 40 = 16 + 3 * 8
        0x01, // Flags: INCLUDE_PCI_ALL
        0x01, // Size: two pages
        0x00, 0x00, // Segment 0
        0x00, 0x00, 0xd9, 0xfe, 0x00, 0x00, 0x00, 0x00, // Register base 0xfed90000
        0x03, 0x08, 0x00, 0x00, 0x08, 0xf0, 0x1f, 0x00, // I/O APIC 8 at f0:1f.0
        0x04, 0x08, 0x00, 0x00, 0x00, 0x00, 0x1f, 0x07, // HPET 0 at 00:1f.7
        0x05, 0x08, 0x00, 0x00, 0x01, 0x00, 0x15, 0x01, // ACPI device 1 at 00:15.1
        // RMRR at 122: the USB controller's legacy-emulation buffer
        0x01, 0x00, // Type 1: RMRR
        0x20, 0x00, // Length 32 = 24 + 8
        0x00, 0x00, // Reserved
        0x00, 0x00, // Segment 0
        0x00, 0x00, 0x7e, 0x7b, 0x00, 0x00, 0x00, 0x00, // Base 0x7b7e0000
        0xff, 0xff, 0x7e, 0x7b, 0x00, 0x00, 0x00, 0x00, // Limit 0x7b7effff
        0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, // Endpoint 00:14.0
        // ATSR at 154
        0x02, 0x00, // Type 2: ATSR
        0x10, 0x00, // Length 16 = 8 + 8
        0x00, // Flags: ALL_PORTS clear
        0x00, // Reserved
        0x00, 0x00, // Segment 0
        0x02, 0x08, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, // Sub-hierarchy under 00:01.0
        // RHSA at 170
        0x03, 0x00, // Type 3: RHSA
        0x14, 0x00, // Length 20
        0x00, 0x00, 0x00, 0x00, // Reserved
        0x00, 0x00, 0xd9, 0xfe, 0x00, 0x00, 0x00, 0x00, // Register base 0xfed90000
        0x01, 0x00, 0x00, 0x00, // Proximity domain 1
        // ANDD at 190
        0x04, 0x00, // Type 4: ANDD
        0x17, 0x00, // Length 23 = 8 + 15
        0x00, 0x00, 0x00, // Reserved
        0x01, // ACPI device number 1
        b'\\', b'_', b'S', b'B', b'.', b'P', b'C', b'I', b'0', b'.', b'U', b'A', b'R', b'1',
        0x00, // Object name, NUL-terminated
        // SATC at 213: not parsed, skipped by length
        0x05, 0x00, // Type 5: SATC
        0x10, 0x00, // Length 16
        0x01, 0x00, 0x00, 0x00, // Flags ATC_REQUIRED, reserved, segment 0
        0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, // Endpoint 00:02.0
        // A reserved structure type at 229, skipped by length
        0x40, 0x00, // Type 0x40
        0x1b, 0x00, // Length 27
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // Body
    ];

    fn scope(kind: DeviceScopeKind, id: u8, bus: u8, path: &[(u8, u8)]) -> DeviceScope {
        DeviceScope {
            kind,
            enumeration_id: id,
            start_bus: bus,
            path: path
                .iter()
                .map(|&(device, function)| PciPathEntry { device, function })
                .collect(),
        }
    }

    #[test]
    fn qemu_q35_dmar() {
        let dmar = parse_body(&QEMU_Q35_BODY).unwrap();
        assert_eq!(dmar.host_address_width(), 39);
        assert!(dmar.flags.intr_remap());
        assert!(!dmar.flags.x2apic_opt_out() && !dmar.flags.dma_ctrl_platform_opt_in());
        assert_eq!(dmar.units.len(), 1);
        let unit = dmar.units[0];
        assert_eq!(unit.offset, 48);
        assert_eq!(unit.register_base, HostPhysAddr(0xfed9_0000));
        assert_eq!(unit.register_set_len(), 4096);
        assert_eq!(unit.segment, 0);
        assert!(!unit.include_pci_all());
        let scopes = dmar.scopes(unit.scopes);
        assert_eq!(scopes.len(), 7);
        assert_eq!(
            scopes[0],
            scope(DeviceScopeKind::IoApic, 0, 0xff, &[(0, 0)])
        );
        assert_eq!(scopes[0].to_string(), "I/O APIC 0 at ff:00.0");
        assert_eq!(
            scopes[0].source_id(|_| None),
            Some(SourceId::new(0xff, 0, 0))
        );
        let endpoints: std::vec::Vec<_> = scopes[1..]
            .iter()
            .map(|s| {
                assert_eq!(s.kind, DeviceScopeKind::PciEndpoint);
                s.source_id(|_| None).unwrap().to_string()
            })
            .collect();
        assert_eq!(
            endpoints,
            ["00:00.0", "00:01.0", "00:02.0", "00:1f.0", "00:1f.2", "00:1f.3"]
        );
        assert!(dmar.reserved_memory.is_empty() && dmar.ats_ports.is_empty());
        assert_eq!(dmar.reserved_ranges().count(), 0);
        assert_eq!(dmar.skipped, 0);
    }

    #[test]
    fn every_structure_type() {
        let dmar = parse_body(SERVER_BODY).unwrap();
        assert_eq!(dmar.host_address_width(), 46);
        assert!(dmar.flags.intr_remap() && dmar.flags.dma_ctrl_platform_opt_in());

        let [gfx, rest] = [dmar.units[0], dmar.units[1]];
        assert_eq!((gfx.offset, rest.offset), (48, 82));
        assert_eq!(gfx.register_base, HostPhysAddr(0xfed9_1000));
        assert!(!gfx.include_pci_all() && rest.include_pci_all());
        assert_eq!(rest.register_set_len(), 8192);
        assert_eq!(
            dmar.scopes(gfx.scopes),
            &[
                scope(DeviceScopeKind::PciEndpoint, 0, 0, &[(2, 0)]),
                scope(DeviceScopeKind::PciEndpoint, 0, 0, &[(0x1c, 4), (0, 0)]),
            ]
        );
        // The second hop's bus is the root port's secondary bus, read from its config.
        let behind = &dmar.scopes(gfx.scopes)[1];
        assert_eq!(behind.to_string(), "PCI endpoint at 00:1c.4/00.0");
        let mut asked = None;
        let sid = behind.source_id(|bridge| {
            asked = Some(bridge);
            Some(3)
        });
        assert_eq!(asked, Some(SourceId::new(0, 0x1c, 4)));
        assert_eq!(sid, Some(SourceId::new(3, 0, 0)));
        assert_eq!(behind.source_id(|_| None), None);

        let rest_scopes = dmar.scopes(rest.scopes);
        assert_eq!(
            rest_scopes,
            &[
                scope(DeviceScopeKind::IoApic, 8, 0xf0, &[(0x1f, 0)]),
                scope(DeviceScopeKind::MsiCapableHpet, 0, 0, &[(0x1f, 7)]),
                scope(DeviceScopeKind::AcpiNamespaceDevice, 1, 0, &[(0x15, 1)]),
            ]
        );
        assert_eq!(rest_scopes[1].to_string(), "HPET 0 at 00:1f.7");
        assert_eq!(
            rest_scopes[2].to_string(),
            "ACPI namespace device 1 at 00:15.1"
        );

        let rmrr = dmar.reserved_memory[0];
        assert_eq!((rmrr.offset, rmrr.segment), (122, 0));
        assert_eq!(
            rmrr.range(),
            PhysRange {
                start: 0x7b7e_0000,
                end: 0x7b7f_0000
            }
        );
        assert_eq!(
            dmar.scopes(rmrr.scopes),
            &[scope(DeviceScopeKind::PciEndpoint, 0, 0, &[(0x14, 0)])]
        );
        assert_eq!(
            dmar.reserved_ranges().collect::<std::vec::Vec<_>>(),
            [rmrr.range()]
        );

        let atsr = dmar.ats_ports[0];
        assert!(!atsr.all_ports());
        assert_eq!(
            dmar.scopes(atsr.scopes)[0].to_string(),
            "PCI sub-hierarchy at 00:01.0"
        );

        assert_eq!(
            dmar.affinities.as_slice(),
            &[Rhsa {
                offset: 170,
                register_base: HostPhysAddr(0xfed9_0000),
                proximity_domain: 1
            }]
        );
        let andd = &dmar.namespace_devices[0];
        assert_eq!((andd.offset, andd.device_number), (190, 1));
        assert_eq!(andd.name(), b"\\_SB.PCI0.UAR1");
        // SATC and the reserved type.
        assert_eq!(dmar.skipped, 2);
        // A scope span from another DMAR cannot reach outside this one's pool.
        let far = ScopeSpan {
            start: 250,
            len: 10,
        };
        assert!(dmar.scopes(far).is_empty() && !far.is_empty() && far.len() == 10);
    }

    #[test]
    fn scope_kinds_and_names() {
        assert_eq!(DeviceScopeKind::from_raw(9), DeviceScopeKind::Reserved(9));
        assert_eq!(
            DeviceScopeKind::Reserved(9).to_string(),
            "reserved scope type 9"
        );
        assert_eq!(structure_name(TYPE_SIDP), "SIDP");
        assert_eq!(structure_name(77), "reserved-type structure");
        let s = scope(DeviceScopeKind::Reserved(9), 0, 1, &[(2, 3)]);
        assert_eq!(s.to_string(), "reserved scope type 9 at 01:02.3");
        let empty = scope(DeviceScopeKind::PciEndpoint, 0, 0, &[]);
        assert_eq!(empty.source_id(|_| Some(1)), None);
    }

    /// A minimal DMAR: one INCLUDE_PCI_ALL unit with an I/O APIC scope, then `extra`.
    fn minimal(extra: &[u8]) -> std::vec::Vec<u8> {
        let mut body = vec![
            38, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // HAW, flags, reserved
            0x00, 0x00, 0x18, 0x00, // DRHD, length 24
            0x01, 0x00, 0x00, 0x00, // INCLUDE_PCI_ALL, size, segment 0
            0x00, 0x00, 0xd9, 0xfe, 0, 0, 0, 0, // Register base
            0x03, 0x08, 0x00, 0x00, 0x00, 0xff, 0x00, 0x00, // I/O APIC 0 at ff:00.0
        ];
        body.extend_from_slice(extra);
        body
    }

    #[test]
    fn minimal_table_parses() {
        let dmar = parse_body(&minimal(&[])).unwrap();
        assert_eq!(dmar.units.len(), 1);
        assert_eq!(dmar.scopes(dmar.units[0].scopes).len(), 1);
    }

    #[test]
    fn malformed_structures_are_errors() {
        // A structure header cut by the table's end (2 of its 4 bytes).
        assert_eq!(
            parse_body(&minimal(&[0x01, 0x00])),
            Err(DmarError::TruncatedStructure {
                offset: 72,
                table_len: 74
            })
        );
        // Length 0: an endless loop in a naive parser.
        let e = parse_body(&minimal(&[0x01, 0x00, 0x00, 0x00])).unwrap_err();
        assert_eq!(
            e,
            DmarError::BadStructureLength {
                kind: TYPE_RMRR,
                offset: 72,
                len: 0,
                min: 24
            }
        );
        assert_eq!(
            e.to_string(),
            "DMAR: RMRR (type 1) at offset 0x48 has length 0, below its minimum 24"
        );
        // Length 2 on an unknown type is below even the type-and-length header.
        assert!(matches!(
            parse_body(&minimal(&[0x30, 0x00, 0x02, 0x00])),
            Err(DmarError::BadStructureLength { min: 4, .. })
        ));
        // Length past the table's end.
        let mut rhsa = vec![0x03, 0x00, 0x20, 0x00];
        rhsa.extend_from_slice(&[0; 16]);
        let e = parse_body(&minimal(&rhsa)).unwrap_err();
        assert_eq!(
            e,
            DmarError::StructurePastEnd {
                kind: TYPE_RHSA,
                offset: 72,
                len: 32,
                table_len: 92
            }
        );
        assert_eq!(
            e.to_string(),
            "DMAR: RHSA (type 3) at offset 0x48 has length 32, past the table's end at 0x5c"
        );
        // The table itself shorter than its fixed part.
        assert_eq!(
            parse_body(&[38, 0, 0, 0]),
            Err(DmarError::TableTooShort { len: 40 })
        );
        let mut bad_haw = minimal(&[]);
        bad_haw[0] = 64;
        assert_eq!(
            parse_body(&bad_haw),
            Err(DmarError::BadHostAddressWidth { haw: 64 })
        );
    }

    /// The minimal DMAR with its unit's scope replaced by `scope_bytes` and the unit's
    /// length set to `len`.
    fn with_scope(len: u16, scope_bytes: &[u8]) -> std::vec::Vec<u8> {
        let mut body = minimal(&[]);
        body.truncate(12 + 16);
        body[14..16].copy_from_slice(&len.to_le_bytes());
        body.extend_from_slice(scope_bytes);
        body
    }

    fn scope_problem(body: &[u8]) -> ScopeProblem {
        match parse_body(body) {
            Err(DmarError::BadScope {
                kind: TYPE_DRHD,
                structure: 48,
                offset: 64,
                problem,
            }) => problem,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_scopes_are_errors() {
        // Scope length 10 in a structure with 8 bytes left for it: past the structure's
        // end although inside the table (a table-level check would miss it).
        let mut bytes = vec![0x01, 0x0a, 0, 0, 0, 0, 0x02, 0x00, 0x00, 0x00];
        let body = with_scope(24, &bytes);
        assert_eq!(
            scope_problem(&body),
            ScopeProblem::PastEnd { len: 10, left: 8 }
        );
        let e = parse_body(&body).unwrap_err();
        assert_eq!(
            e.to_string(),
            "DMAR: device scope at offset 0x40 of the DRHD at offset 0x30 has length 10, \
             past the end of its structure (8 bytes left)"
        );
        // Scope length 0, odd, and without a path.
        bytes[1] = 0;
        assert_eq!(
            scope_problem(&with_scope(26, &bytes)),
            ScopeProblem::BadLength { len: 0 }
        );
        bytes[1] = 7;
        assert_eq!(
            scope_problem(&with_scope(26, &bytes)),
            ScopeProblem::BadLength { len: 7 }
        );
        bytes[1] = 6;
        assert_eq!(
            scope_problem(&with_scope(22, &bytes[..6])),
            ScopeProblem::NoPath
        );
        // Three bytes left in the structure: not even a scope header.
        assert_eq!(
            scope_problem(&with_scope(19, &[0x01, 0x08, 0x00])),
            ScopeProblem::Truncated { left: 3 }
        );
        // Nine hops.
        let mut deep = vec![0x01, 6 + 18, 0, 0, 0, 0];
        deep.extend_from_slice(&[0x01; 18]);
        assert_eq!(
            scope_problem(&with_scope(16 + 24, &deep)),
            ScopeProblem::PathTooLong { hops: 9 }
        );
    }

    #[test]
    fn bad_rmrr_and_andd_are_errors() {
        let mut rmrr = vec![0x01, 0x00, 0x18, 0x00, 0, 0, 0, 0];
        rmrr.extend_from_slice(&0x2000u64.to_le_bytes()); // base
        rmrr.extend_from_slice(&0x1fffu64.to_le_bytes()); // limit below base
        assert_eq!(
            parse_body(&minimal(&rmrr)),
            Err(DmarError::BadRmrr {
                offset: 72,
                base: 0x2000,
                limit: 0x1fff
            })
        );
        rmrr[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            parse_body(&minimal(&rmrr)),
            Err(DmarError::BadRmrr { .. })
        ));
        let mut andd = vec![0x04, 0x00, 8 + 65, 0x00, 0, 0, 0, 0x02];
        andd.extend_from_slice(&[b'A'; 65]);
        assert_eq!(
            parse_body(&minimal(&andd)),
            Err(DmarError::AnddNameTooLong {
                offset: 72,
                len: 65
            })
        );
        // No NUL: the name runs to the structure's end.
        andd.truncate(8 + 64);
        andd[2] = 8 + 64;
        let dmar = parse_body(&minimal(&andd)).unwrap();
        assert_eq!(dmar.namespace_devices[0].name(), &[b'A'; 64][..]);
    }

    #[test]
    fn too_many_units_is_an_error() {
        let mut body = vec![38, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        for i in 0..=MAX_DRHD as u8 {
            body.extend_from_slice(&[0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00]);
            body.extend_from_slice(&(0xfed0_0000u64 + (u64::from(i) << 12)).to_le_bytes());
        }
        let e = parse_body(&body).unwrap_err();
        assert_eq!(
            e,
            DmarError::TooMany {
                what: "remapping hardware units (DRHD)",
                max: MAX_DRHD
            }
        );
        assert_eq!(
            e.to_string(),
            "DMAR: more than 16 remapping hardware units (DRHD) (the most Ally keeps)"
        );
    }

    #[test]
    fn not_a_dmar() {
        let (mem, table) = load(&acpi_table(b"APIC", &QEMU_Q35_BODY));
        let e = Dmar::parse(&mem, &table).unwrap_err();
        assert_eq!(
            e,
            DmarError::NotDmar {
                signature: *b"APIC"
            }
        );
        assert_eq!(
            e.to_string(),
            "DMAR: the table given has signature \"APIC\""
        );
    }

    #[test]
    fn found_through_the_rsdp_and_hidden() {
        use crate::acpi::hide_table;
        // RSDP (ACPI 1.0) in the BIOS area -> RSDT -> DMAR.
        let (mut mem, rsdp) =
            super::super::testutil::firmware_with(&acpi_table(b"DMAR", &QEMU_Q35_BODY));
        let dmar_pa = 0xf_1000;

        let (mut table, dmar) = Dmar::find(&mem, &rsdp).unwrap().unwrap();
        assert_eq!(table.pa, dmar_pa);
        assert_eq!(dmar.units[0].register_base, HostPhysAddr(0xfed9_0000));
        // Once hidden the guest (and a second lookup) no longer finds it.
        hide_table(&mut mem, &mut table);
        assert_eq!(Dmar::find(&mem, &rsdp), Ok(None));
        // A DMAR with a bad checksum is an error, not "no DMAR".
        let mut bad = acpi_table(b"DMAR", &QEMU_Q35_BODY);
        bad[9] ^= 1;
        mem.put(dmar_pa, &bad);
        assert!(matches!(
            Dmar::find(&mem, &rsdp),
            Err(DmarError::Acpi(AcpiError::BadChecksum { .. }))
        ));
    }

    /// Random corruption and every truncation of a rich table: the parser returns an
    /// answer, never panics, and never reads outside the table (`load` sets the window).
    #[test]
    fn corrupted_tables_never_panic() {
        let good = acpi_table(b"DMAR", SERVER_BODY);
        let mut seed = 0x1234_5678_9abc_def0u64;
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
            if let Err(e) = Dmar::parse(&mem, &table) {
                assert!(!e.to_string().is_empty());
                errors += 1;
            }
        }
        assert!(errors > 0);
        for len in 36..good.len() as u32 {
            let mut t = good.clone();
            t.truncate(len as usize);
            t[4..8].copy_from_slice(&len.to_le_bytes());
            fix_checksum(&mut t);
            let (mem, table) = load(&t);
            match Dmar::parse(&mem, &table) {
                Ok(d) => assert!(d.units.iter().all(|u| u.offset + 16 <= len)),
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
    }

    #[test]
    fn rmrrs_feed_the_guest_plan() {
        use super::super::{DmaDomainPlan, IommuError};
        let dmar = parse_body(SERVER_BODY).unwrap();
        let reserved: std::vec::Vec<_> = dmar.reserved_ranges().collect();
        let ram = [PhysRange {
            start: 0,
            end: 0x7000_0000,
        }];
        // The RMRR lies outside the RAM list and is mapped all the same.
        let plan = DmaDomainPlan::guest(&ram, &[], &reserved).unwrap();
        assert!(plan.contains(0x7b7e_0000) && plan.contains(0x7b7e_ffff));
        assert!(!plan.contains(0x7b7f_0000));
        let ally = PhysRange {
            start: 0x7b00_0000,
            end: 0x7b80_0000,
        };
        assert!(matches!(
            DmaDomainPlan::guest(&ram, &[ally], &reserved),
            Err(IommuError::ReservedOverlapsProtected { .. })
        ));
    }
}
