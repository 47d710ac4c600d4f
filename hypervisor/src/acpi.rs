//! ACPI table access for Ally: find the RSDP, walk the XSDT/RSDT, read the FADT's PM1
//! control blocks (to notice the guest powering off), list the MCFG's memory-mapped PCI
//! configuration windows, and hide the DPI cores from the guest by removing their MADT
//! entries in place.
//!
//! All access goes through [`PhysMemory`] so the logic is tested on the host. References
//! are to the ACPI 6.5 specification.

use core::fmt;

/// Physical memory as Ally sees it (identity-mapped on hardware, a byte array in tests).
pub trait PhysMemory {
    /// Fills `buf` from physical address `pa`.
    fn read(&self, pa: u64, buf: &mut [u8]);
    /// Writes `buf` at physical address `pa`.
    fn write(&mut self, pa: u64, buf: &[u8]);
}

/// Tables longer than this are treated as corrupt (the largest real MADTs are tens of KiB).
pub const MAX_TABLE_LEN: u32 = 1 << 20;

/// Errors of this module.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AcpiError {
    /// No "RSD PTR " signature in the EBDA's first KiB or in 0xE0000..0xFFFFF.
    NoRsdp,
    /// An RSDP was found but its checksum (or extended checksum) is wrong.
    BadRsdpChecksum { pa: u64 },
    /// A table's bytes do not sum to zero.
    BadChecksum { signature: [u8; 4], pa: u64 },
    /// A table's length field is shorter than its fixed part or implausibly large.
    BadLength {
        signature: [u8; 4],
        pa: u64,
        len: u32,
    },
    /// The root table (XSDT or RSDT) does not carry the expected signature.
    BadRootTable { pa: u64 },
    /// No table with this signature is listed in the root table.
    TableNotFound { signature: [u8; 4] },
    /// A MADT entry is too short or runs past the end of the table.
    BadMadtEntry { offset: u32, kind: u8, len: u8 },
    /// More processors than [`MAX_CPUS`] in the MADT.
    TooManyCpus,
    /// No MP floating pointer with a configuration table (the machine has none, or uses a
    /// default configuration).
    NoMpTable,
    /// The MP floating pointer or configuration table has a bad checksum.
    BadMpChecksum { pa: u64 },
    /// The MP configuration table is malformed (bad signature, length or entry).
    BadMpTable { pa: u64, offset: u32 },
    /// The boot processor cannot be hidden.
    HideBootProcessor { apic_id: u32 },
    /// An MCFG allocation is cut short by the table's end, or its bus range is empty.
    BadMcfgEntry { offset: u32 },
    /// More MCFG allocations than [`MAX_MCFG_ALLOCATIONS`].
    TooManyMcfgAllocations,
}

/// Formats a signature as text, with non-printable bytes as '?'.
struct Sig([u8; 4]);

impl fmt::Display for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            let c = if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '?'
            };
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AcpiError::NoRsdp => f.write_str(
                "no ACPI RSDP found (searched the first KiB of the EBDA and 0xE0000-0xFFFFF)",
            ),
            AcpiError::BadRsdpChecksum { pa } => {
                write!(f, "the ACPI RSDP at {pa:#x} has a bad checksum")
            }
            AcpiError::BadChecksum { signature, pa } => {
                write!(
                    f,
                    "ACPI table {} at {pa:#x} has a bad checksum",
                    Sig(signature)
                )
            }
            AcpiError::BadLength { signature, pa, len } => write!(
                f,
                "ACPI table {} at {pa:#x} has an impossible length {len}",
                Sig(signature)
            ),
            AcpiError::BadRootTable { pa } => {
                write!(
                    f,
                    "the ACPI root table at {pa:#x} is neither an XSDT nor an RSDT"
                )
            }
            AcpiError::TableNotFound { signature } => {
                write!(f, "ACPI table {} not found", Sig(signature))
            }
            AcpiError::BadMadtEntry { offset, kind, len } => write!(
                f,
                "MADT entry of type {kind} at offset {offset} has a bad length {len}"
            ),
            AcpiError::TooManyCpus => {
                write!(f, "the MADT lists more than {MAX_CPUS} processors")
            }
            AcpiError::NoMpTable => f.write_str("no MP configuration table found"),
            AcpiError::BadMpChecksum { pa } => {
                write!(f, "the MP structure at {pa:#x} has a bad checksum")
            }
            AcpiError::BadMpTable { pa, offset } => write!(
                f,
                "the MP configuration table at {pa:#x} is malformed at offset {offset}"
            ),
            AcpiError::HideBootProcessor { apic_id } => write!(
                f,
                "APIC ID {apic_id} is the boot processor and cannot be hidden"
            ),
            AcpiError::BadMcfgEntry { offset } => write!(
                f,
                "the MCFG allocation at offset {offset} is truncated or has an empty bus range"
            ),
            AcpiError::TooManyMcfgAllocations => write!(
                f,
                "the MCFG lists more than {MAX_MCFG_ALLOCATIONS} configuration windows"
            ),
        }
    }
}

/// The Root System Description Pointer (ACPI 6.5, 5.2.5.3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Rsdp {
    pub pa: u64,
    pub revision: u8,
    pub oem_id: [u8; 6],
    pub rsdt: u32,
    /// The XSDT address (revision >= 2 and non-zero).
    pub xsdt: Option<u64>,
}

/// The RSDP signature.
pub const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
const RSDP_V1_LEN: usize = 20;
const RSDP_V2_LEN: u32 = 36;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// The byte sum of `[pa, pa+len)`, read in chunks.
/// Makes the `len` bytes at `pa` sum to zero again after an in-place edit, through the
/// checksum byte at offset `at`; returns the new checksum.
fn rewrite_checksum(mem: &mut impl PhysMemory, pa: u64, len: u64, at: u64) -> u8 {
    mem.write(pa + at, &[0]);
    let checksum = 0u8.wrapping_sub(byte_sum(&*mem, pa, len));
    mem.write(pa + at, &[checksum]);
    checksum
}

fn byte_sum(mem: &impl PhysMemory, pa: u64, len: u64) -> u8 {
    let mut buf = [0u8; 256];
    let mut sum = 0u8;
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        mem.read(pa + off, &mut buf[..n]);
        sum = buf[..n].iter().fold(sum, |s, &b| s.wrapping_add(b));
        off += n as u64;
    }
    sum
}

/// Checks the RSDP candidate at `pa`: `Some(Ok)` valid, `Some(Err)` right signature but
/// bad checksum, `None` no signature.
fn check_rsdp(mem: &impl PhysMemory, pa: u64) -> Option<Result<Rsdp, AcpiError>> {
    let mut b = [0u8; RSDP_V2_LEN as usize];
    mem.read(pa, &mut b);
    if &b[..8] != RSDP_SIGNATURE {
        return None;
    }
    let bad = Some(Err(AcpiError::BadRsdpChecksum { pa }));
    if b[..RSDP_V1_LEN].iter().fold(0u8, |s, &x| s.wrapping_add(x)) != 0 {
        return bad;
    }
    let revision = b[15];
    let mut xsdt = None;
    if revision >= 2 {
        // The extended checksum covers `length` bytes (36 for ACPI 2.0+ RSDPs).
        let len = le32(&b, 20);
        if !(RSDP_V2_LEN..=4096).contains(&len) || byte_sum(mem, pa, u64::from(len)) != 0 {
            return bad;
        }
        xsdt = Some(le64(&b, 24)).filter(|&x| x != 0);
    }
    let mut oem_id = [0u8; 6];
    oem_id.copy_from_slice(&b[9..15]);
    Some(Ok(Rsdp {
        pa,
        revision,
        oem_id,
        rsdt: le32(&b, 16),
        xsdt,
    }))
}

/// Finds the RSDP the way the OS does on BIOS systems (ACPI 6.5, 5.2.5.1): on 16-byte
/// boundaries in the first KiB of the EBDA (segment at 40:0Eh), then in 0xE0000..0xFFFFF.
/// Candidates with a bad checksum are skipped; if no valid one exists the first bad one
/// is reported.
pub fn find_rsdp(mem: &impl PhysMemory) -> Result<Rsdp, AcpiError> {
    let mut seg = [0u8; 2];
    mem.read(0x40E, &mut seg);
    let ebda = u64::from(u16::from_le_bytes(seg)) << 4;
    let mut first_bad = None;
    let ebda_range = if ebda != 0 { ebda..ebda + 1024 } else { 0..0 };
    for pa in ebda_range
        .step_by(16)
        .chain((0xE0000..0x10_0000).step_by(16))
    {
        match check_rsdp(mem, pa) {
            Some(Ok(rsdp)) => return Ok(rsdp),
            Some(Err(e)) => {
                first_bad.get_or_insert(e);
            }
            None => {}
        }
    }
    Err(first_bad.unwrap_or(AcpiError::NoRsdp))
}

/// The common header of every system description table (ACPI 6.5, 5.2.6, Table 5.4).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(C)]
pub struct SdtHeader {
    pub signature: [u8; 4],
    pub length: u32,
    pub revision: u8,
    pub checksum: u8,
    pub oem_id: [u8; 6],
    pub oem_table_id: [u8; 8],
    pub oem_revision: u32,
    pub creator_id: u32,
    pub creator_revision: u32,
}

/// Size of [`SdtHeader`].
pub const SDT_HEADER_LEN: usize = 36;
const _: () = assert!(core::mem::size_of::<SdtHeader>() == SDT_HEADER_LEN);

impl SdtHeader {
    fn parse(b: &[u8; SDT_HEADER_LEN]) -> Self {
        let arr = |at: usize| [b[at], b[at + 1], b[at + 2], b[at + 3]];
        let mut oem_id = [0; 6];
        oem_id.copy_from_slice(&b[10..16]);
        let mut oem_table_id = [0; 8];
        oem_table_id.copy_from_slice(&b[16..24]);
        Self {
            signature: arr(0),
            length: le32(b, 4),
            revision: b[8],
            checksum: b[9],
            oem_id,
            oem_table_id,
            oem_revision: le32(b, 24),
            creator_id: le32(b, 28),
            creator_revision: le32(b, 32),
        }
    }
}

/// A table located in physical memory, header read and checksum verified.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AcpiTable {
    pub pa: u64,
    pub header: SdtHeader,
}

impl AcpiTable {
    /// Reads and verifies the table at `pa`; `min_len` is its fixed part.
    pub fn load(mem: &impl PhysMemory, pa: u64, min_len: u32) -> Result<Self, AcpiError> {
        let mut b = [0u8; SDT_HEADER_LEN];
        mem.read(pa, &mut b);
        let header = SdtHeader::parse(&b);
        let (signature, len) = (header.signature, header.length);
        if len < min_len.max(SDT_HEADER_LEN as u32) || len > MAX_TABLE_LEN {
            return Err(AcpiError::BadLength { signature, pa, len });
        }
        if byte_sum(mem, pa, u64::from(len)) != 0 {
            return Err(AcpiError::BadChecksum { signature, pa });
        }
        Ok(Self { pa, header })
    }

    pub fn len(&self) -> u32 {
        self.header.length
    }

    pub fn is_empty(&self) -> bool {
        self.header.length == 0
    }
}

/// Finds the table with `signature` listed in the XSDT (or, without a usable XSDT, the
/// RSDT). Listed tables with that signature but a bad checksum or length are skipped in
/// favour of a valid one; if none is valid the first problem is reported.
pub fn find_table(
    mem: &impl PhysMemory,
    rsdp: &Rsdp,
    signature: &[u8; 4],
) -> Result<AcpiTable, AcpiError> {
    let (root, entry_size) = match rsdp.xsdt.map(|pa| AcpiTable::load(mem, pa, 36)) {
        Some(Ok(xsdt)) if &xsdt.header.signature == b"XSDT" => (xsdt, 8),
        // A broken XSDT with no RSDT to fall back on.
        Some(Err(e)) if rsdp.rsdt == 0 => return Err(e),
        Some(Ok(xsdt)) if rsdp.rsdt == 0 => return Err(AcpiError::BadRootTable { pa: xsdt.pa }),
        _ => {
            let rsdt = AcpiTable::load(mem, u64::from(rsdp.rsdt), 36)?;
            if &rsdt.header.signature != b"RSDT" {
                return Err(AcpiError::BadRootTable { pa: rsdt.pa });
            }
            (rsdt, 4)
        }
    };
    let count = (root.len() as usize - SDT_HEADER_LEN) / entry_size;
    let mut first_bad = None;
    for i in 0..count {
        let mut b = [0u8; 8];
        mem.read(
            root.pa + (SDT_HEADER_LEN + i * entry_size) as u64,
            &mut b[..entry_size],
        );
        let pa = le64(&b, 0);
        if pa == 0 {
            continue;
        }
        let mut sig = [0u8; 4];
        mem.read(pa, &mut sig);
        if &sig != signature {
            continue;
        }
        match AcpiTable::load(mem, pa, 0) {
            Ok(t) => return Ok(t),
            Err(e) => {
                first_bad.get_or_insert(e);
            }
        }
    }
    Err(first_bad.unwrap_or(AcpiError::TableNotFound {
        signature: *signature,
    }))
}

/// Where a fixed-hardware register lives.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RegisterBlock {
    /// System I/O space.
    Io(u16),
    /// System memory space.
    Memory(u64),
    /// PCI configuration space of bus 0 (ACPI 6.5 5.2.3.2: device in address bits 47:32,
    /// function in 31:16, register offset in 15:0).
    PciConfig {
        device: u8,
        function: u8,
        offset: u16,
    },
}

impl RegisterBlock {
    /// The I/O port, if the register is in I/O space.
    pub fn io_port(self) -> Option<u16> {
        match self {
            RegisterBlock::Io(port) => Some(port),
            _ => None,
        }
    }
}

/// The FADT's RESET_REG and the value that resets the machine when written there
/// (ACPI 6.5 4.8.4.6; Table 5.9: RESET_REG at offset 116, RESET_VALUE at 128, valid when
/// the RESET_REG_SUP flag, bit 10 of the flags at offset 112, is set).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ResetRegister {
    pub block: RegisterBlock,
    pub value: u8,
}

/// The FADT's sleep-control registers: what the guest writes to power off.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct SleepControl {
    /// PM1a_CNT (X_PM1a_CNT_BLK when non-zero, else PM1a_CNT_BLK).
    pub pm1a: Option<RegisterBlock>,
    /// PM1b_CNT, present on few machines.
    pub pm1b: Option<RegisterBlock>,
    /// SLEEP_CONTROL_REG of hardware-reduced ACPI (FADT 5.0+), if given.
    pub sleep_control_reg: Option<RegisterBlock>,
    /// PM1a/PM1b_EVT_BLK: the status register (WAK_STS) is their first two bytes.
    pub pm1a_status: Option<RegisterBlock>,
    pub pm1b_status: Option<RegisterBlock>,
    /// SLEEP_STATUS_REG of hardware-reduced ACPI (WAK_STS is its bit 7).
    pub sleep_status_reg: Option<RegisterBlock>,
    /// RESET_REG, when the FADT says it is supported.
    pub reset: Option<ResetRegister>,
    /// The DSDT's physical address (X_DSDT when non-zero, else DSDT).
    pub dsdt: Option<u64>,
}

impl SleepControl {
    /// The PM1a/PM1b control blocks that are I/O ports (the usual case on PCs).
    pub fn pm1_io_ports(&self) -> [Option<u16>; 2] {
        [
            self.pm1a.and_then(RegisterBlock::io_port),
            self.pm1b.and_then(RegisterBlock::io_port),
        ]
    }

    /// Sleep, status or reset registers that are neither I/O ports nor (for the reset
    /// register) bus 0's configuration space: Ally cannot guard them.
    pub fn unguardable(&self) -> Option<(&'static str, RegisterBlock)> {
        let blocks = [
            ("PM1a_CNT", self.pm1a),
            ("PM1b_CNT", self.pm1b),
            ("SLEEP_CONTROL_REG", self.sleep_control_reg),
            ("PM1a_EVT", self.pm1a_status),
            ("PM1b_EVT", self.pm1b_status),
            ("SLEEP_STATUS_REG", self.sleep_status_reg),
        ];
        let reset = self
            .reset
            .map(|r| r.block)
            .filter(|b| matches!(b, RegisterBlock::Memory(_)));
        blocks
            .into_iter()
            .find_map(|(name, b)| b.filter(|b| b.io_port().is_none()).map(|b| (name, b)))
            .or(reset.map(|b| ("RESET_REG", b)))
    }
}

/// The SLP_TYPa/SLP_TYPb values of the sleep states S0..S5 as the DSDT's `\_Sx` package
/// objects give them (ACPI 6.5 7.4.2); `None` for a state the DSDT does not define.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct SleepTypes(pub [Option<(u8, u8)>; 6]);

impl SleepTypes {
    /// The state whose SLP_TYPa (`b == false`) or SLP_TYPb value is `typ`.
    pub fn state_of(&self, typ: u8, b: bool) -> Option<u8> {
        self.0
            .iter()
            .position(|t| t.is_some_and(|(ta, tb)| if b { tb } else { ta } == typ))
            .map(|s| s as u8)
    }
}

/// Finds the `\_S0_`..`\_S5_` objects in a definition block's AML: `NameOp` (0x08), an
/// optional root prefix, the name, `PackageOp` (0x12), PkgLength, NumElements, then the
/// SLP_TYPa and SLP_TYPb values as ZeroOp/OneOp/BytePrefix constants (ACPI 6.5 20.2.5.1,
/// 20.2.3, 20.2.5.4). A state defined some other way (a method) is left undefined: Ally
/// treats its sleep requests as unknown.
pub fn dsdt_sleep_types(mem: &impl PhysMemory, table: &AcpiTable) -> SleepTypes {
    const CHUNK: usize = 4096;
    const LOOKAHEAD: usize = 16;
    let mut types = SleepTypes::default();
    let len = table.len() as usize;
    let mut buf = [0u8; CHUNK + LOOKAHEAD];
    let mut at = SDT_HEADER_LEN;
    while at < len {
        let n = (len - at).min(buf.len());
        buf[n..].fill(0);
        mem.read(table.pa + at as u64, &mut buf[..n]);
        for i in 0..(len - at).min(CHUNK) {
            if let Some((state, a, b)) = sleep_package(&buf[i..]) {
                types.0[usize::from(state)].get_or_insert((a, b));
            }
        }
        at += CHUNK;
    }
    types
}

/// Parses `Name(_Sx_, Package(){a, b, ...})` at the start of `aml`.
fn sleep_package(aml: &[u8]) -> Option<(u8, u8, u8)> {
    let (&op, rest) = aml.split_first()?;
    if op != 0x08 {
        return None;
    }
    let rest = rest.strip_prefix(b"\\").unwrap_or(rest);
    let state = match rest.get(..4)? {
        [b'_', b'S', d @ b'0'..=b'5', b'_'] => d - b'0',
        _ => return None,
    };
    let rest = rest[4..].strip_prefix(&[0x12])?;
    // PkgLength: bits 7:6 of the lead byte count the bytes that follow it.
    let pkg_len_bytes = 1 + usize::from(rest.first()? >> 6);
    let rest = rest.get(pkg_len_bytes..)?;
    let (&count, mut rest) = rest.split_first()?;
    let mut constant = || -> Option<u8> {
        let (&op, tail) = rest.split_first()?;
        let (v, tail) = match op {
            0x00 => (0, tail),
            0x01 => (1, tail),
            0x0A => (*tail.first()?, &tail[1..]),
            _ => return None,
        };
        rest = tail;
        Some(v)
    };
    let a = constant()?;
    let b = if count >= 2 { constant()? } else { a };
    Some((state, a, b & 0b111)).filter(|_| a <= 0b111)
}

/// SLP_EN in PM1x_CNT (ACPI 6.5, 4.8.3.2.1, Table 4.13): writing 1 enters the sleep state
/// selected by SLP_TYP (bits 12:10) — S5, power-off, when the guest shuts down.
pub const PM1_CNT_SLP_EN: u32 = 1 << 13;
/// SLP_EN in the hardware-reduced SLEEP_CONTROL_REG (ACPI 6.5, 4.8.3.7, Table 4.19).
pub const SLEEP_CONTROL_SLP_EN: u8 = 1 << 5;

/// Whether a value written to PM1a/PM1b_CNT requests a sleep state, whatever SLP_TYP is.
pub const fn is_pm1_sleep_request(value: u32) -> bool {
    value & PM1_CNT_SLP_EN != 0
}

/// SLP_TYP (bits 12:10) of a PM1x_CNT value, for the log (the S-state mapping is in the
/// DSDT's \_Sx objects).
pub const fn pm1_sleep_type(value: u32) -> u8 {
    ((value >> 10) & 0b111) as u8
}

/// A Generic Address Structure (ACPI 6.5, 5.2.3.2) as a register block.
fn gas_block(b: &[u8], at: usize) -> Option<RegisterBlock> {
    let address = le64(b, at + 4);
    if address == 0 {
        return None;
    }
    match b[at] {
        0 => Some(RegisterBlock::Memory(address)),
        1 => u16::try_from(address).ok().map(RegisterBlock::Io),
        2 => Some(RegisterBlock::PciConfig {
            device: (address >> 32) as u8,
            function: (address >> 16) as u8,
            offset: address as u16,
        }),
        _ => None,
    }
}

/// Reads the sleep-control registers from the FADT (signature "FACP"; ACPI 6.5, 5.2.9,
/// Table 5.9: PM1a_CNT_BLK at offset 64, PM1b_CNT_BLK at 68, X_PM1a_CNT_BLK at 172,
/// X_PM1b_CNT_BLK at 184, SLEEP_CONTROL_REG at 244). The 64-bit X_ fields take precedence
/// when non-zero, as the specification requires of OSPM.
pub fn fadt_sleep_control(
    mem: &impl PhysMemory,
    fadt: &AcpiTable,
) -> Result<SleepControl, AcpiError> {
    let len = fadt.len();
    if &fadt.header.signature != b"FACP" || len < 72 {
        return Err(AcpiError::BadLength {
            signature: fadt.header.signature,
            pa: fadt.pa,
            len,
        });
    }
    let mut b = [0u8; 276];
    let n = (len as usize).min(b.len());
    mem.read(fadt.pa, &mut b[..n]);
    let legacy = |at: usize| {
        let port = le32(&b, at);
        u16::try_from(port)
            .ok()
            .filter(|&p| p != 0)
            .map(RegisterBlock::Io)
    };
    let extended = |at: usize| {
        if n >= at + 12 {
            gas_block(&b, at)
        } else {
            None
        }
    };
    let flags = if n >= 116 { le32(&b, 112) } else { 0 };
    const RESET_REG_SUP: u32 = 1 << 10;
    let reset = (n >= 129 && flags & RESET_REG_SUP != 0)
        .then(|| gas_block(&b, 116))
        .flatten()
        .map(|block| ResetRegister {
            block,
            value: b[128],
        });
    let x_dsdt = if n >= 148 { le64(&b, 140) } else { 0 };
    let dsdt = if x_dsdt != 0 {
        Some(x_dsdt)
    } else {
        Some(u64::from(le32(&b, 40))).filter(|&a| a != 0)
    };
    Ok(SleepControl {
        pm1a: extended(172).or_else(|| legacy(64)),
        pm1b: extended(184).or_else(|| legacy(68)),
        sleep_control_reg: extended(244),
        pm1a_status: extended(148).or_else(|| legacy(56)),
        pm1b_status: extended(160).or_else(|| legacy(60)),
        sleep_status_reg: extended(256),
        reset,
        dsdt,
    })
}

/// Entry types of the MADT (ACPI 6.5, 5.2.12, Table 5.21).
pub const MADT_LOCAL_APIC: u8 = 0;
pub const MADT_LOCAL_X2APIC: u8 = 9;
pub const MADT_IO_APIC: u8 = 1;
/// The MADT's fixed part: header, local interrupt controller address, flags.
pub const MADT_ENTRIES_OFFSET: u32 = 44;

/// One MADT entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MadtEntry {
    /// Processor Local APIC (5.2.12.2).
    LocalApic { uid: u8, apic_id: u8, flags: u32 },
    /// Processor Local x2APIC (5.2.12.12).
    LocalX2Apic {
        x2apic_id: u32,
        flags: u32,
        uid: u32,
    },
    /// I/O APIC (5.2.12.3).
    IoApic { id: u8, address: u32, gsi_base: u32 },
    /// Any other entry.
    Other { kind: u8 },
}

impl MadtEntry {
    /// The APIC ID of a processor entry.
    pub fn apic_id(&self) -> Option<u32> {
        match *self {
            MadtEntry::LocalApic { apic_id, .. } => Some(u32::from(apic_id)),
            MadtEntry::LocalX2Apic { x2apic_id, .. } => Some(x2apic_id),
            MadtEntry::IoApic { .. } | MadtEntry::Other { .. } => None,
        }
    }
}

/// Iterator over MADT entries: `(offset in the table, length, entry)`. A malformed entry
/// yields one error and ends the iteration.
pub struct MadtEntries<'a, M: PhysMemory> {
    mem: &'a M,
    pa: u64,
    offset: u32,
    end: u32,
    done: bool,
}

/// The entries of `madt` (signature "APIC").
pub fn madt_entries<'a, M: PhysMemory>(mem: &'a M, madt: &AcpiTable) -> MadtEntries<'a, M> {
    MadtEntries {
        mem,
        pa: madt.pa,
        offset: MADT_ENTRIES_OFFSET,
        end: madt.len(),
        done: madt.len() < MADT_ENTRIES_OFFSET,
    }
}

/// Reads the entry at `offset` of the table at `pa` into `buf` and decodes it.
fn read_madt_entry(
    mem: &impl PhysMemory,
    pa: u64,
    offset: u32,
    end: u32,
    buf: &mut [u8; 256],
) -> Result<(u8, MadtEntry), AcpiError> {
    let mut hdr = [0u8; 2];
    let bad = |kind, len| AcpiError::BadMadtEntry { offset, kind, len };
    let room = end - offset;
    mem.read(pa + u64::from(offset), &mut hdr[..room.min(2) as usize]);
    if room < 2 {
        return Err(bad(hdr[0], room as u8));
    }
    let (kind, len) = (hdr[0], hdr[1]);
    let min = match kind {
        MADT_LOCAL_APIC => 8,
        MADT_LOCAL_X2APIC => 16,
        MADT_IO_APIC => 12,
        _ => 2,
    };
    if len < min || u32::from(len) > end - offset {
        return Err(bad(kind, len));
    }
    let e = &mut buf[..usize::from(len)];
    mem.read(pa + u64::from(offset), e);
    let entry = match kind {
        MADT_LOCAL_APIC => MadtEntry::LocalApic {
            uid: e[2],
            apic_id: e[3],
            flags: le32(e, 4),
        },
        MADT_LOCAL_X2APIC => MadtEntry::LocalX2Apic {
            x2apic_id: le32(e, 4),
            flags: le32(e, 8),
            uid: le32(e, 12),
        },
        MADT_IO_APIC => MadtEntry::IoApic {
            id: e[2],
            address: le32(e, 4),
            gsi_base: le32(e, 8),
        },
        kind => MadtEntry::Other { kind },
    };
    Ok((len, entry))
}

impl<M: PhysMemory> Iterator for MadtEntries<'_, M> {
    type Item = Result<(u32, u8, MadtEntry), AcpiError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.offset >= self.end {
            return None;
        }
        let mut buf = [0u8; 256];
        match read_madt_entry(self.mem, self.pa, self.offset, self.end, &mut buf) {
            Ok((len, entry)) => {
                let at = self.offset;
                self.offset += u32::from(len);
                Some(Ok((at, len, entry)))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Removes the Local APIC (type 0) and Local x2APIC (type 9) entries whose APIC ID is in
/// `apic_ids` from the MADT in place: later entries move down, the length shrinks, the
/// freed tail is zeroed and the checksum is fixed. The whole table is validated before
/// anything is written. Returns the number of entries removed; `madt` is updated.
pub fn remove_madt_cpus(
    mem: &mut impl PhysMemory,
    madt: &mut AcpiTable,
    apic_ids: &[u32],
) -> Result<usize, AcpiError> {
    if &madt.header.signature != b"APIC" || madt.len() < MADT_ENTRIES_OFFSET {
        return Err(AcpiError::BadLength {
            signature: madt.header.signature,
            pa: madt.pa,
            len: madt.len(),
        });
    }
    for e in madt_entries(&*mem, madt) {
        e?;
    }
    let (pa, end) = (madt.pa, madt.len());
    let mut buf = [0u8; 256];
    let (mut src, mut dst, mut removed) = (MADT_ENTRIES_OFFSET, MADT_ENTRIES_OFFSET, 0);
    while src < end {
        let (len, entry) = read_madt_entry(&*mem, pa, src, end, &mut buf)?;
        let hide = entry.apic_id().is_some_and(|id| apic_ids.contains(&id));
        if hide {
            removed += 1;
        } else {
            if dst != src {
                // `buf` holds the entry; moving down never overwrites unread entries.
                mem.write(pa + u64::from(dst), &buf[..usize::from(len)]);
            }
            dst += u32::from(len);
        }
        src += u32::from(len);
    }
    if removed == 0 {
        return Ok(0);
    }
    // Zero the freed tail so stale entries cannot be mistaken for live ones.
    let zeros = [0u8; 256];
    let mut at = dst;
    while at < end {
        let n = (end - at).min(zeros.len() as u32);
        mem.write(pa + u64::from(at), &zeros[..n as usize]);
        at += n;
    }
    mem.write(pa + 4, &dst.to_le_bytes());
    let checksum = rewrite_checksum(mem, pa, u64::from(dst), 9);
    madt.header.length = dst;
    madt.header.checksum = checksum;
    Ok(removed)
}

/// The signature a hidden table gets: none the ACPI specification or an OS knows, so OSPM
/// ignores the table (ACPI 6.5 5.2.6: unknown signatures are skipped).
pub const HIDDEN_SIGNATURE: [u8; 4] = *b"ALY_";

/// Hides `table` from the OS in place: its signature becomes [`HIDDEN_SIGNATURE`] and its
/// checksum is fixed, so that lookups by signature no longer find it while the root table's
/// list stays as the firmware built it. `table` is updated.
pub fn hide_table(mem: &mut impl PhysMemory, table: &mut AcpiTable) {
    let pa = table.pa;
    mem.write(pa, &HIDDEN_SIGNATURE);
    let checksum = rewrite_checksum(mem, pa, u64::from(table.len()), 9);
    table.header.signature = HIDDEN_SIGNATURE;
    table.header.checksum = checksum;
}

/// Most processors [`madt_processors`] returns.
pub const MAX_CPUS: usize = 256;

/// A processor listed in the MADT.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MadtProcessor {
    pub apic_id: u32,
    /// ACPI processor UID.
    pub uid: u32,
    /// Local APIC flags bit 0: usable now.
    pub enabled: bool,
    /// Bit 1: may be enabled later (hot-plug); meaningful when not enabled.
    pub online_capable: bool,
    /// From a Local x2APIC entry.
    pub x2apic: bool,
}

/// The processors the MADT lists (Local APIC and Local x2APIC entries), in table order,
/// without duplicates (an APIC ID given by both entry types is listed once).
pub fn madt_processors(
    mem: &impl PhysMemory,
    madt: &AcpiTable,
) -> Result<heapless::Vec<MadtProcessor, MAX_CPUS>, AcpiError> {
    let mut cpus: heapless::Vec<MadtProcessor, MAX_CPUS> = heapless::Vec::new();
    for item in madt_entries(mem, madt) {
        let (_, _, entry) = item?;
        let cpu = match entry {
            MadtEntry::LocalApic {
                uid,
                apic_id,
                flags,
            } => MadtProcessor {
                apic_id: u32::from(apic_id),
                uid: u32::from(uid),
                enabled: flags & 1 != 0,
                online_capable: flags & 2 != 0,
                x2apic: false,
            },
            MadtEntry::LocalX2Apic {
                x2apic_id,
                flags,
                uid,
            } => MadtProcessor {
                apic_id: x2apic_id,
                uid,
                enabled: flags & 1 != 0,
                online_capable: flags & 2 != 0,
                x2apic: true,
            },
            MadtEntry::IoApic { .. } | MadtEntry::Other { .. } => continue,
        };
        if cpus.iter().any(|c| c.apic_id == cpu.apic_id) {
            continue;
        }
        cpus.push(cpu).map_err(|_| AcpiError::TooManyCpus)?;
    }
    Ok(cpus)
}

// Intel MultiProcessor Specification 1.4: the legacy processor list that ACPI superseded.
// Ally hides the DPI cores there too, for guests that read it.

/// The MP floating pointer signature.
pub const MP_FLOATING_SIGNATURE: &[u8; 4] = b"_MP_";
/// The MP configuration table signature.
pub const MP_CONFIG_SIGNATURE: &[u8; 4] = b"PCMP";
/// Size of the MP configuration table header (MP spec 4.2, Table 4-2).
const MP_HEADER_LEN: u32 = 44;

/// The MP configuration table of a machine.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MpTable {
    /// The floating pointer structure.
    pub floating_pa: u64,
    /// The configuration table.
    pub pa: u64,
    pub base_len: u16,
    pub entry_count: u16,
    pub ext_len: u16,
}

/// Finds the MP floating pointer (MP spec 4.1: the first KiB of the EBDA, else the last KiB
/// of base memory, then 0xF0000..0xFFFFF, on 16-byte boundaries) and its configuration
/// table, with checksums verified.
pub fn find_mp_table(mem: &impl PhysMemory) -> Result<MpTable, AcpiError> {
    let mut w = [0u8; 2];
    mem.read(0x40E, &mut w);
    let ebda = u64::from(u16::from_le_bytes(w)) << 4;
    mem.read(0x413, &mut w);
    let base_kib = u64::from(u16::from_le_bytes(w));
    let first = if ebda != 0 {
        ebda..ebda + 1024
    } else if (1..=640).contains(&base_kib) {
        (base_kib - 1) * 1024..base_kib * 1024
    } else {
        0..0
    };
    let mut first_bad = None;
    for pa in first.step_by(16).chain((0xF_0000..0x10_0000).step_by(16)) {
        let mut fp = [0u8; 16];
        mem.read(pa, &mut fp);
        if &fp[..4] != MP_FLOATING_SIGNATURE {
            continue;
        }
        if fp[8] != 1 || fp.iter().fold(0u8, |s, &b| s.wrapping_add(b)) != 0 {
            first_bad.get_or_insert(AcpiError::BadMpChecksum { pa });
            continue;
        }
        let table = u64::from(le32(&fp, 4));
        // A zero pointer (with feature byte 1 set) means a default configuration.
        if table == 0 {
            continue;
        }
        return load_mp_table(mem, pa, table);
    }
    Err(first_bad.unwrap_or(AcpiError::NoMpTable))
}

fn load_mp_table(mem: &impl PhysMemory, floating_pa: u64, pa: u64) -> Result<MpTable, AcpiError> {
    let mut h = [0u8; MP_HEADER_LEN as usize];
    mem.read(pa, &mut h);
    let base_len = u16::from_le_bytes([h[4], h[5]]);
    if &h[..4] != MP_CONFIG_SIGNATURE || u32::from(base_len) < MP_HEADER_LEN {
        return Err(AcpiError::BadMpTable { pa, offset: 0 });
    }
    if byte_sum(mem, pa, u64::from(base_len)) != 0 {
        return Err(AcpiError::BadMpChecksum { pa });
    }
    Ok(MpTable {
        floating_pa,
        pa,
        base_len,
        entry_count: u16::from_le_bytes([h[34], h[35]]),
        ext_len: u16::from_le_bytes([h[40], h[41]]),
    })
}

/// Length of a base-table entry by type (MP spec 4.3, Table 4-3).
fn mp_entry_len(kind: u8) -> Option<u32> {
    match kind {
        0 => Some(20),
        1..=4 => Some(8),
        _ => None,
    }
}

/// Removes the processor entries (type 0) whose local APIC ID is in `apic_ids` from the MP
/// configuration table in place: later entries and the extended table move down, the
/// base length, entry count and checksum are fixed, the freed tail is zeroed. Refuses to
/// hide the boot processor. Returns the number removed; `table` is updated.
pub fn remove_mp_cpus(
    mem: &mut impl PhysMemory,
    table: &mut MpTable,
    apic_ids: &[u32],
) -> Result<usize, AcpiError> {
    let (pa, base_len) = (table.pa, u32::from(table.base_len));
    // Validate every entry first so nothing is written to a table we cannot parse.
    let mut off = MP_HEADER_LEN;
    for _ in 0..table.entry_count {
        let mut e = [0u8; 20];
        mem.read(
            pa + u64::from(off),
            &mut e[..base_len.saturating_sub(off).min(20) as usize],
        );
        let len = mp_entry_len(e[0])
            .filter(|&l| off + l <= base_len)
            .ok_or(AcpiError::BadMpTable { pa, offset: off })?;
        // CPU flags bit 1: BP.
        if e[0] == 0 && e[3] & 2 != 0 && apic_ids.contains(&u32::from(e[1])) {
            return Err(AcpiError::HideBootProcessor {
                apic_id: u32::from(e[1]),
            });
        }
        off += len;
    }
    if off != base_len {
        return Err(AcpiError::BadMpTable { pa, offset: off });
    }
    let (mut src, mut dst, mut removed) = (MP_HEADER_LEN, MP_HEADER_LEN, 0u16);
    while src < base_len {
        let mut e = [0u8; 20];
        mem.read(pa + u64::from(src), &mut e[..1]);
        // Validated above.
        let len = mp_entry_len(e[0]).unwrap_or(8);
        mem.read(pa + u64::from(src), &mut e[..len as usize]);
        if e[0] == 0 && apic_ids.contains(&u32::from(e[1])) {
            removed += 1;
        } else {
            if dst != src {
                mem.write(pa + u64::from(dst), &e[..len as usize]);
            }
            dst += len;
        }
        src += len;
    }
    if removed == 0 {
        return Ok(0);
    }
    // The extended table follows the base table directly: move it down too. Its own
    // checksum covers only its bytes, so it stays valid.
    let ext_len = u32::from(table.ext_len);
    let mut buf = [0u8; 256];
    let mut moved = 0;
    while moved < ext_len {
        let n = (ext_len - moved).min(buf.len() as u32);
        mem.read(pa + u64::from(base_len + moved), &mut buf[..n as usize]);
        mem.write(pa + u64::from(dst + moved), &buf[..n as usize]);
        moved += n;
    }
    let zeros = [0u8; 256];
    let mut at = dst + ext_len;
    while at < base_len + ext_len {
        let n = (base_len + ext_len - at).min(zeros.len() as u32);
        mem.write(pa + u64::from(at), &zeros[..n as usize]);
        at += n;
    }
    let new_count = table.entry_count - removed;
    mem.write(pa + 4, &(dst as u16).to_le_bytes());
    mem.write(pa + 34, &new_count.to_le_bytes());
    rewrite_checksum(mem, pa, u64::from(dst), 7);
    table.base_len = dst as u16;
    table.entry_count = new_count;
    Ok(usize::from(removed))
}

/// The local APIC IDs of the processor entries in the MP table, and whether each is the
/// boot processor.
pub fn mp_processors(
    mem: &impl PhysMemory,
    table: &MpTable,
) -> Result<heapless::Vec<(u32, bool), MAX_CPUS>, AcpiError> {
    let mut cpus = heapless::Vec::new();
    let mut off = MP_HEADER_LEN;
    let base_len = u32::from(table.base_len);
    for _ in 0..table.entry_count {
        let mut e = [0u8; 4];
        mem.read(
            table.pa + u64::from(off),
            &mut e[..base_len.saturating_sub(off).min(4) as usize],
        );
        let len =
            mp_entry_len(e[0])
                .filter(|&l| off + l <= base_len)
                .ok_or(AcpiError::BadMpTable {
                    pa: table.pa,
                    offset: off,
                })?;
        if e[0] == 0 {
            cpus.push((u32::from(e[1]), e[3] & 2 != 0))
                .map_err(|_| AcpiError::TooManyCpus)?;
        }
        off += len;
    }
    Ok(cpus)
}

/// The MCFG's fixed part: header and 8 reserved bytes (PCI Firmware 3.0, 4.1.2, Table 4-2).
pub const MCFG_ENTRIES_OFFSET: u32 = 44;
const MCFG_ENTRY_LEN: u32 = 16;
/// Configuration windows Ally keeps (one per PCI segment group on real machines).
pub const MAX_MCFG_ALLOCATIONS: usize = 16;

/// One MCFG allocation: the memory-mapped configuration window (ECAM) of a segment group's
/// buses (PCI Firmware 3.0, 4.1.2, Table 4-3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct McfgAllocation {
    /// Where bus 0 of the segment would be. The window itself starts at bus `start_bus`,
    /// as Linux and FreeBSD read it.
    pub base: u64,
    pub segment: u16,
    pub start_bus: u8,
    pub end_bus: u8,
}

impl McfgAllocation {
    /// The physical range `[start, end)` that decodes configuration accesses: 1 MiB per bus.
    pub fn window(&self) -> (u64, u64) {
        let start = self.base + (u64::from(self.start_bus) << 20);
        (start, self.base + ((u64::from(self.end_bus) + 1) << 20))
    }
}

/// The allocations of `mcfg` (signature "MCFG").
pub fn mcfg_allocations(
    mem: &impl PhysMemory,
    mcfg: &AcpiTable,
) -> Result<heapless::Vec<McfgAllocation, MAX_MCFG_ALLOCATIONS>, AcpiError> {
    let mut allocations = heapless::Vec::new();
    let mut offset = MCFG_ENTRIES_OFFSET;
    while offset < mcfg.len() {
        if mcfg.len() - offset < MCFG_ENTRY_LEN {
            return Err(AcpiError::BadMcfgEntry { offset });
        }
        let mut e = [0u8; MCFG_ENTRY_LEN as usize];
        mem.read(mcfg.pa + u64::from(offset), &mut e);
        let allocation = McfgAllocation {
            base: le64(&e, 0),
            segment: u16::from_le_bytes([e[8], e[9]]),
            start_bus: e[10],
            end_bus: e[11],
        };
        if allocation.end_bus < allocation.start_bus
            || allocation.base.checked_add(256 << 20).is_none()
        {
            return Err(AcpiError::BadMcfgEntry { offset });
        }
        allocations
            .push(allocation)
            .map_err(|_| AcpiError::TooManyMcfgAllocations)?;
        offset += MCFG_ENTRY_LEN;
    }
    Ok(allocations)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first 16 MiB of physical memory.
    struct FakeMem(std::vec::Vec<u8>);

    impl FakeMem {
        fn new() -> Self {
            Self(vec![0; 16 << 20])
        }
        fn put(&mut self, pa: u64, bytes: &[u8]) {
            self.0[pa as usize..pa as usize + bytes.len()].copy_from_slice(bytes);
        }
    }

    impl PhysMemory for FakeMem {
        fn read(&self, pa: u64, buf: &mut [u8]) {
            buf.copy_from_slice(&self.0[pa as usize..pa as usize + buf.len()]);
        }
        fn write(&mut self, pa: u64, buf: &[u8]) {
            self.put(pa, buf);
        }
    }

    fn fix_checksum(bytes: &mut [u8], at: usize) {
        bytes[at] = 0;
        let sum = bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b));
        bytes[at] = 0u8.wrapping_sub(sum);
    }

    fn table(sig: &[u8; 4], body: &[u8]) -> std::vec::Vec<u8> {
        let mut t = std::vec::Vec::new();
        t.extend_from_slice(sig);
        t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
        t.push(1); // revision
        t.push(0); // checksum
        t.extend_from_slice(b"ALLYTS");
        t.extend_from_slice(b"TESTTABL");
        t.extend_from_slice(&[0; 12]);
        t.extend_from_slice(body);
        fix_checksum(&mut t, 9);
        t
    }

    fn rsdp(rev: u8, rsdt: u32, xsdt: u64) -> std::vec::Vec<u8> {
        let mut r = std::vec::Vec::new();
        r.extend_from_slice(RSDP_SIGNATURE);
        r.push(0);
        r.extend_from_slice(b"BOCHS ");
        r.push(rev);
        r.extend_from_slice(&rsdt.to_le_bytes());
        if rev >= 2 {
            r.extend_from_slice(&36u32.to_le_bytes());
            r.extend_from_slice(&xsdt.to_le_bytes());
            r.extend_from_slice(&[0; 4]);
            fix_checksum(&mut r[..20], 8);
            fix_checksum(&mut r, 32);
        } else {
            fix_checksum(&mut r, 8);
        }
        r
    }

    fn lapic(uid: u8, id: u8) -> [u8; 8] {
        [0, 8, uid, id, 1, 0, 0, 0]
    }

    fn x2apic(id: u32, uid: u32) -> std::vec::Vec<u8> {
        let mut e = vec![9, 16, 0, 0];
        e.extend_from_slice(&id.to_le_bytes());
        e.extend_from_slice(&1u32.to_le_bytes());
        e.extend_from_slice(&uid.to_le_bytes());
        e
    }

    fn madt_body(entries: &[&[u8]]) -> std::vec::Vec<u8> {
        let mut b = std::vec::Vec::new();
        b.extend_from_slice(&0xFEE0_0000u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        for e in entries {
            b.extend_from_slice(e);
        }
        b
    }

    fn fadt_body(pm1a: u32, pm1b: u32, x_pm1a: Option<(u8, u64)>) -> std::vec::Vec<u8> {
        let mut b = vec![0u8; 276 - 36];
        b[64 - 36..68 - 36].copy_from_slice(&pm1a.to_le_bytes());
        b[68 - 36..72 - 36].copy_from_slice(&pm1b.to_le_bytes());
        if let Some((space, addr)) = x_pm1a {
            b[172 - 36] = space;
            b[172 - 36 + 1] = 16;
            b[172 - 36 + 4..172 - 36 + 12].copy_from_slice(&addr.to_le_bytes());
        }
        b
    }

    const MADT_PA: u64 = 0xFE_1000;
    const FADT_PA: u64 = 0xFE_2000;
    const XSDT_PA: u64 = 0xFE_3000;
    const RSDT_PA: u64 = 0xFE_4000;

    /// A machine like Bochs: RSDP in the BIOS area, RSDT and XSDT listing FACP and APIC.
    fn machine(entries: &[&[u8]]) -> FakeMem {
        let mut m = FakeMem::new();
        m.put(0xF_6A10, &rsdp(2, RSDT_PA as u32, XSDT_PA));
        let mut xsdt_body = std::vec::Vec::new();
        for pa in [FADT_PA, MADT_PA] {
            xsdt_body.extend_from_slice(&pa.to_le_bytes());
        }
        m.put(XSDT_PA, &table(b"XSDT", &xsdt_body));
        let mut rsdt_body = std::vec::Vec::new();
        for pa in [FADT_PA, MADT_PA] {
            rsdt_body.extend_from_slice(&(pa as u32).to_le_bytes());
        }
        m.put(RSDT_PA, &table(b"RSDT", &rsdt_body));
        m.put(FADT_PA, &table(b"FACP", &fadt_body(0xB004, 0, None)));
        m.put(MADT_PA, &table(b"APIC", &madt_body(entries)));
        m
    }

    fn four_cpus() -> FakeMem {
        let ioapic = [1u8, 12, 0, 0, 0, 0, 0xC0, 0xFE, 0, 0, 0, 0];
        machine(&[
            &lapic(0, 0),
            &lapic(1, 1),
            &ioapic,
            &lapic(2, 2),
            &lapic(3, 3),
            &x2apic(0x100, 4),
        ])
    }

    #[test]
    fn finds_rsdp_in_bios_area() {
        let m = four_cpus();
        let r = find_rsdp(&m).unwrap();
        assert_eq!(r.pa, 0xF_6A10);
        assert_eq!(r.revision, 2);
        assert_eq!(&r.oem_id, b"BOCHS ");
        assert_eq!(r.rsdt, RSDT_PA as u32);
        assert_eq!(r.xsdt, Some(XSDT_PA));
    }

    #[test]
    fn finds_rsdp_in_ebda_first() {
        let mut m = four_cpus();
        m.put(0x40E, &0x9FC0u16.to_le_bytes());
        m.put(0x9_FC00 + 0x40, &rsdp(0, 0x1234_0000, 0));
        let r = find_rsdp(&m).unwrap();
        assert_eq!(r.pa, 0x9_FC40);
        assert_eq!(r.xsdt, None);
        // Beyond the first KiB of the EBDA it is not searched: the BIOS-area one wins.
        let mut m = four_cpus();
        m.put(0x40E, &0x9FC0u16.to_le_bytes());
        m.put(0x9_FC00 + 0x400, &rsdp(0, 0x1234_0000, 0));
        assert_eq!(find_rsdp(&m).unwrap().pa, 0xF_6A10);
    }

    #[test]
    fn rsdp_errors() {
        let m = FakeMem::new();
        assert_eq!(find_rsdp(&m), Err(AcpiError::NoRsdp));
        // Bad first checksum.
        let mut m = FakeMem::new();
        let mut r = rsdp(2, 0x1000, 0x2000);
        r[8] ^= 1;
        m.put(0xE_0000, &r);
        assert_eq!(
            find_rsdp(&m),
            Err(AcpiError::BadRsdpChecksum { pa: 0xE_0000 })
        );
        // Bad extended checksum only.
        let mut m = FakeMem::new();
        let mut r = rsdp(2, 0x1000, 0x2000);
        r[32] ^= 1;
        m.put(0xE_0000, &r);
        assert_eq!(
            find_rsdp(&m),
            Err(AcpiError::BadRsdpChecksum { pa: 0xE_0000 })
        );
        // A bad candidate followed by a good one: the good one is used.
        m.put(0xE_0100, &rsdp(0, 0x3000, 0));
        assert_eq!(find_rsdp(&m).unwrap().pa, 0xE_0100);
        // Signature not on a 16-byte boundary is not found.
        let mut m = FakeMem::new();
        m.put(0xE_0008, &rsdp(0, 0x3000, 0));
        assert_eq!(find_rsdp(&m), Err(AcpiError::NoRsdp));
        assert_eq!(
            AcpiError::NoRsdp.to_string(),
            "no ACPI RSDP found (searched the first KiB of the EBDA and 0xE0000-0xFFFFF)"
        );
    }

    #[test]
    fn finds_tables_via_xsdt_and_rsdt() {
        let m = four_cpus();
        let r = find_rsdp(&m).unwrap();
        let madt = find_table(&m, &r, b"APIC").unwrap();
        assert_eq!(madt.pa, MADT_PA);
        assert_eq!(&madt.header.oem_id, b"ALLYTS");
        assert_eq!(find_table(&m, &r, b"FACP").unwrap().pa, FADT_PA);
        assert_eq!(
            find_table(&m, &r, b"HPET"),
            Err(AcpiError::TableNotFound {
                signature: *b"HPET"
            })
        );
        assert_eq!(
            AcpiError::TableNotFound {
                signature: *b"HPET"
            }
            .to_string(),
            "ACPI table HPET not found"
        );
        // Without the XSDT (ACPI 1.0 RSDP), the RSDT is used.
        let r1 = Rsdp { xsdt: None, ..r };
        assert_eq!(find_table(&m, &r1, b"APIC").unwrap().pa, MADT_PA);
        // A corrupt XSDT falls back to the RSDT.
        let mut m2 = four_cpus();
        m2.0[XSDT_PA as usize + 40] ^= 0xFF;
        assert_eq!(find_table(&m2, &r, b"APIC").unwrap().pa, MADT_PA);
        // ... unless there is none.
        let r_no_rsdt = Rsdp { rsdt: 0, ..r };
        assert_eq!(
            find_table(&m2, &r_no_rsdt, b"APIC"),
            Err(AcpiError::BadChecksum {
                signature: *b"XSDT",
                pa: XSDT_PA
            })
        );
    }

    #[test]
    fn bad_table_checksum_and_length() {
        let mut m = four_cpus();
        m.0[MADT_PA as usize + 50] ^= 0x01;
        let r = find_rsdp(&m).unwrap();
        assert_eq!(
            find_table(&m, &r, b"APIC"),
            Err(AcpiError::BadChecksum {
                signature: *b"APIC",
                pa: MADT_PA
            })
        );
        let mut m = four_cpus();
        m.put(MADT_PA + 4, &0xFFFF_FFFFu32.to_le_bytes());
        assert!(matches!(
            find_table(&m, &r, b"APIC"),
            Err(AcpiError::BadLength {
                len: 0xFFFF_FFFF,
                ..
            })
        ));
        let mut m = four_cpus();
        m.put(MADT_PA + 4, &10u32.to_le_bytes());
        assert!(matches!(
            find_table(&m, &r, b"APIC"),
            Err(AcpiError::BadLength { len: 10, .. })
        ));
    }

    #[test]
    fn fadt_pm1_ports() {
        let m = four_cpus();
        let r = find_rsdp(&m).unwrap();
        let fadt = find_table(&m, &r, b"FACP").unwrap();
        let sc = fadt_sleep_control(&m, &fadt).unwrap();
        assert_eq!(sc.pm1a, Some(RegisterBlock::Io(0xB004)));
        assert_eq!(sc.pm1b, None);
        assert_eq!(sc.sleep_control_reg, None);
        assert_eq!(sc.pm1_io_ports(), [Some(0xB004), None]);

        // X_PM1a_CNT_BLK takes precedence; an MMIO one is not an I/O port.
        let mut m = FakeMem::new();
        m.put(
            FADT_PA,
            &table(b"FACP", &fadt_body(0x604, 0x608, Some((1, 0x1804)))),
        );
        let fadt = AcpiTable::load(&m, FADT_PA, 0).unwrap();
        let sc = fadt_sleep_control(&m, &fadt).unwrap();
        assert_eq!(sc.pm1_io_ports(), [Some(0x1804), Some(0x608)]);
        m.put(
            FADT_PA,
            &table(b"FACP", &fadt_body(0x604, 0, Some((0, 0xFED0_0004)))),
        );
        let fadt = AcpiTable::load(&m, FADT_PA, 0).unwrap();
        let sc = fadt_sleep_control(&m, &fadt).unwrap();
        assert_eq!(sc.pm1a, Some(RegisterBlock::Memory(0xFED0_0004)));
        assert_eq!(sc.pm1_io_ports(), [None, None]);

        // An ACPI 1.0 FADT (116 bytes) has no X_ fields.
        let mut m = FakeMem::new();
        m.put(
            FADT_PA,
            &table(b"FACP", &fadt_body(0x404, 0, None)[..116 - 36]),
        );
        let fadt = AcpiTable::load(&m, FADT_PA, 0).unwrap();
        assert_eq!(
            fadt_sleep_control(&m, &fadt).unwrap().pm1_io_ports(),
            [Some(0x404), None]
        );
        // Too short, or not a FADT.
        m.put(FADT_PA, &table(b"FACP", &[0; 20]));
        let fadt = AcpiTable::load(&m, FADT_PA, 0).unwrap();
        assert!(fadt_sleep_control(&m, &fadt).is_err());
        let madt = AcpiTable::load(&four_cpus(), MADT_PA, 0).unwrap();
        assert!(fadt_sleep_control(&four_cpus(), &madt).is_err());
    }

    #[test]
    fn slp_en_detection() {
        // S5 on QEMU/Bochs: SLP_TYP=0, SLP_EN; S5 elsewhere: SLP_TYP=5|7.
        assert!(is_pm1_sleep_request(0x2000));
        assert!(is_pm1_sleep_request(0x3C01));
        assert_eq!(pm1_sleep_type(0x3C01), 7);
        assert!(!is_pm1_sleep_request(0x1C01));
        assert!(!is_pm1_sleep_request(0x0001));
    }

    fn apic_ids(m: &FakeMem, madt: &AcpiTable) -> std::vec::Vec<u32> {
        madt_entries(m, madt)
            .map(|e| e.unwrap())
            .filter_map(|(_, _, e)| e.apic_id())
            .collect()
    }

    #[test]
    fn madt_iteration() {
        let m = four_cpus();
        let madt = AcpiTable::load(&m, MADT_PA, 0).unwrap();
        let entries: std::vec::Vec<_> = madt_entries(&m, &madt).map(|e| e.unwrap()).collect();
        assert_eq!(entries.len(), 6);
        assert_eq!(
            entries[0],
            (
                44,
                8,
                MadtEntry::LocalApic {
                    uid: 0,
                    apic_id: 0,
                    flags: 1
                }
            )
        );
        assert_eq!(
            entries[2],
            (
                60,
                12,
                MadtEntry::IoApic {
                    id: 0,
                    address: 0xFEC0_0000,
                    gsi_base: 0
                }
            )
        );
        assert_eq!(
            entries[5].2,
            MadtEntry::LocalX2Apic {
                x2apic_id: 0x100,
                flags: 1,
                uid: 4
            }
        );
        assert_eq!(apic_ids(&m, &madt), [0, 1, 2, 3, 0x100]);
    }

    #[test]
    fn madt_remove_cpus_in_place() {
        let mut m = four_cpus();
        let r = find_rsdp(&m).unwrap();
        let mut madt = find_table(&m, &r, b"APIC").unwrap();
        let old_len = madt.len();
        let removed = remove_madt_cpus(&mut m, &mut madt, &[1, 3, 0x100, 77]).unwrap();
        assert_eq!(removed, 3);
        assert_eq!(madt.len(), old_len - 8 - 8 - 16);
        // The table still verifies (length and checksum) and lists what remains, in order.
        let again = find_table(&m, &r, b"APIC").unwrap();
        assert_eq!(again, madt);
        assert_eq!(apic_ids(&m, &again), [0, 2]);
        let kinds: std::vec::Vec<_> = madt_entries(&m, &again).map(|e| e.unwrap().2).collect();
        assert!(matches!(kinds[1], MadtEntry::IoApic { .. }));
        // The freed tail is zeroed.
        let tail = &m.0
            [(MADT_PA + u64::from(madt.len())) as usize..(MADT_PA + u64::from(old_len)) as usize];
        assert!(tail.iter().all(|&b| b == 0));
        // The local APIC address and flags are kept.
        assert_eq!(le32(&m.0, MADT_PA as usize + 36), 0xFEE0_0000);
        // Removing nothing changes nothing.
        let snapshot = m.0.clone();
        assert_eq!(remove_madt_cpus(&mut m, &mut madt, &[9]).unwrap(), 0);
        assert_eq!(m.0, snapshot);
    }

    #[test]
    fn madt_malformed_entries_are_refused_before_writing() {
        // Second entry claims 40 bytes but only 8 remain.
        let mut bad = lapic(1, 1);
        bad[1] = 40;
        let mut m = machine(&[&lapic(0, 0), &lapic(2, 2), &bad]);
        let mut madt = AcpiTable::load(&m, MADT_PA, 0).unwrap();
        let snapshot = m.0.clone();
        assert_eq!(
            remove_madt_cpus(&mut m, &mut madt, &[0]),
            Err(AcpiError::BadMadtEntry {
                offset: 60,
                kind: 0,
                len: 40
            })
        );
        assert_eq!(m.0, snapshot);
        // A zero-length entry would loop forever if accepted.
        let mut m = machine(&[&lapic(0, 0), &[7, 0, 0, 0]]);
        let madt = AcpiTable::load(&m, MADT_PA, 0).unwrap();
        let items: std::vec::Vec<_> = madt_entries(&m, &madt).collect();
        assert_eq!(items.len(), 2);
        assert!(items[1].is_err());
        let mut madt2 = madt;
        assert!(remove_madt_cpus(&mut m, &mut madt2, &[0]).is_err());
        // An x2APIC entry shorter than 16 bytes.
        let short = [9u8, 8, 0, 0, 1, 0, 0, 0];
        let m = machine(&[&short]);
        let madt = AcpiTable::load(&m, MADT_PA, 0).unwrap();
        assert!(madt_entries(&m, &madt).next().unwrap().is_err());
        // A trailing single byte.
        let m = machine(&[&lapic(0, 0), &[0]]);
        let madt = AcpiTable::load(&m, MADT_PA, 0).unwrap();
        assert!(madt_entries(&m, &madt).nth(1).unwrap().is_err());
    }

    #[test]
    fn madt_processor_list() {
        let mut disabled = lapic(5, 5);
        disabled[4] = 2; // online-capable, not enabled
        let m = machine(&[
            &lapic(0, 0),
            &lapic(1, 1),
            &disabled,
            &x2apic(1, 1), // duplicate of APIC ID 1
            &x2apic(0x300, 9),
        ]);
        let madt = AcpiTable::load(&m, MADT_PA, 0).unwrap();
        let cpus = madt_processors(&m, &madt).unwrap();
        let ids: std::vec::Vec<_> = cpus.iter().map(|c| c.apic_id).collect();
        assert_eq!(ids, [0, 1, 5, 0x300]);
        assert!(!cpus[2].enabled && cpus[2].online_capable);
        assert!(cpus[3].x2apic && cpus[3].enabled && cpus[3].uid == 9);
        assert_eq!(cpus.iter().filter(|c| c.enabled).count(), 3);
    }

    /// An MP floating pointer at `fp_pa` and a configuration table at `pa` with the given
    /// entries and an extended table.
    fn mp_machine(fp_pa: u64, pa: u64, entries: &[&[u8]], ext: &[u8]) -> FakeMem {
        let mut m = FakeMem::new();
        let mut fp = std::vec::Vec::new();
        fp.extend_from_slice(MP_FLOATING_SIGNATURE);
        fp.extend_from_slice(&(pa as u32).to_le_bytes());
        fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
        fix_checksum(&mut fp, 10);
        m.put(fp_pa, &fp);
        let body_len: usize = entries.iter().map(|e| e.len()).sum();
        let mut t = std::vec::Vec::new();
        t.extend_from_slice(MP_CONFIG_SIGNATURE);
        t.extend_from_slice(&((44 + body_len) as u16).to_le_bytes());
        t.extend_from_slice(&[4, 0]);
        t.extend_from_slice(b"BOCHSCPU0.1         ");
        t.extend_from_slice(&[0; 6]);
        t.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        t.extend_from_slice(&0xFEE0_0000u32.to_le_bytes());
        t.extend_from_slice(&(ext.len() as u16).to_le_bytes());
        t.push(0u8.wrapping_sub(ext.iter().fold(0u8, |s, &b| s.wrapping_add(b))));
        t.push(0);
        assert_eq!(t.len(), 44);
        for e in entries {
            t.extend_from_slice(e);
        }
        fix_checksum(&mut t, 7);
        t.extend_from_slice(ext);
        m.put(pa, &t);
        m
    }

    fn mp_cpu(id: u8, bp: bool) -> [u8; 20] {
        let mut e = [0u8; 20];
        e[1] = id;
        e[2] = 0x14;
        e[3] = 1 | if bp { 2 } else { 0 };
        e
    }

    #[test]
    fn mp_table_hiding() {
        let bus = [1u8, 0, b'I', b'S', b'A', b' ', b' ', b' '];
        let ioapic = [2u8, 4, 0x11, 1, 0, 0, 0xC0, 0xFE];
        let ext = [
            128u8, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,
        ];
        let mut m = mp_machine(
            0xF_5B00,
            0xF_5B10,
            &[
                &mp_cpu(0, true),
                &mp_cpu(1, false),
                &mp_cpu(2, false),
                &bus,
                &ioapic,
            ],
            &ext,
        );
        let mut t = find_mp_table(&m).unwrap();
        assert_eq!((t.floating_pa, t.pa), (0xF_5B00, 0xF_5B10));
        assert_eq!((t.entry_count, t.base_len, t.ext_len), (5, 44 + 76, 20));
        assert_eq!(
            mp_processors(&m, &t).unwrap().as_slice(),
            &[(0, true), (1, false), (2, false)]
        );
        assert_eq!(
            remove_mp_cpus(&mut m, &mut t, &[0]),
            Err(AcpiError::HideBootProcessor { apic_id: 0 })
        );
        assert_eq!(remove_mp_cpus(&mut m, &mut t, &[1, 7]).unwrap(), 1);
        // The table reloads with valid checksums and the extended table follows it.
        let again = find_mp_table(&m).unwrap();
        assert_eq!(again, t);
        assert_eq!((t.entry_count, t.base_len), (4, 44 + 56));
        assert_eq!(
            mp_processors(&m, &again).unwrap().as_slice(),
            &[(0, true), (2, false)]
        );
        let ext_at = (t.pa + u64::from(t.base_len)) as usize;
        assert_eq!(&m.0[ext_at..ext_at + 20], &ext);
        assert!(m.0[ext_at + 20..ext_at + 40].iter().all(|&b| b == 0));
        assert_eq!(remove_mp_cpus(&mut m, &mut t, &[9]).unwrap(), 0);
    }

    #[test]
    fn mp_table_search_and_errors() {
        assert_eq!(find_mp_table(&FakeMem::new()), Err(AcpiError::NoMpTable));
        // In the last KiB of base memory when there is no EBDA.
        let mut m = mp_machine(0x9_FC00, 0x9_FC10, &[&mp_cpu(0, true)], &[]);
        m.put(0x413, &640u16.to_le_bytes());
        assert_eq!(find_mp_table(&m).unwrap().pa, 0x9_FC10);
        // Bad floating-pointer checksum.
        let mut m = mp_machine(0xF_0000, 0xF_0010, &[&mp_cpu(0, true)], &[]);
        m.0[0xF_0000 + 11] ^= 1;
        assert_eq!(
            find_mp_table(&m),
            Err(AcpiError::BadMpChecksum { pa: 0xF_0000 })
        );
        // Bad table checksum.
        let mut m = mp_machine(0xF_0000, 0xF_0010, &[&mp_cpu(0, true)], &[]);
        m.0[0xF_0010 + 50] ^= 1;
        assert_eq!(
            find_mp_table(&m),
            Err(AcpiError::BadMpChecksum { pa: 0xF_0010 })
        );
        // An unknown entry type: nothing is written.
        let mut m = mp_machine(
            0xF_0000,
            0xF_0010,
            &[&mp_cpu(0, true), &mp_cpu(1, false), &[9u8; 8]],
            &[],
        );
        let mut t = find_mp_table(&m).unwrap();
        let before = m.0.clone();
        assert_eq!(
            remove_mp_cpus(&mut m, &mut t, &[1]),
            Err(AcpiError::BadMpTable {
                pa: 0xF_0010,
                offset: 84
            })
        );
        assert_eq!(m.0, before);
        // Entry count larger than the entries present.
        let mut m = mp_machine(0xF_0000, 0xF_0010, &[&mp_cpu(0, true)], &[]);
        let mut t = find_mp_table(&m).unwrap();
        t.entry_count = 3;
        assert!(remove_mp_cpus(&mut m, &mut t, &[1]).is_err());
        assert!(mp_processors(&m, &t).is_err());
    }

    #[test]
    fn header_layout() {
        let t = table(b"APIC", &[]);
        let h = SdtHeader::parse(t[..36].try_into().unwrap());
        assert_eq!(&h.signature, b"APIC");
        assert_eq!(h.length, 36);
        assert_eq!(&h.oem_table_id, b"TESTTABL");
    }

    fn mcfg_entry(base: u64, segment: u16, start: u8, end: u8) -> std::vec::Vec<u8> {
        let mut e = base.to_le_bytes().to_vec();
        e.extend_from_slice(&segment.to_le_bytes());
        e.extend_from_slice(&[start, end, 0, 0, 0, 0]);
        e
    }

    #[test]
    fn mcfg_allocations_are_parsed() {
        const MCFG_PA: u64 = 0xFE_5000;
        let mut body = vec![0u8; 8];
        body.extend(mcfg_entry(0xB000_0000, 0, 0, 0xFF));
        body.extend(mcfg_entry(0x40_0000_0000, 1, 0x80, 0x83));
        let mut m = FakeMem::new();
        m.put(MCFG_PA, &table(b"MCFG", &body));
        let mcfg = AcpiTable::load(&m, MCFG_PA, MCFG_ENTRIES_OFFSET).unwrap();
        let a = mcfg_allocations(&m, &mcfg).unwrap();
        assert_eq!(
            a[..],
            [
                McfgAllocation {
                    base: 0xB000_0000,
                    segment: 0,
                    start_bus: 0,
                    end_bus: 0xFF
                },
                McfgAllocation {
                    base: 0x40_0000_0000,
                    segment: 1,
                    start_bus: 0x80,
                    end_bus: 0x83
                }
            ]
        );
        assert_eq!(a[0].window(), (0xB000_0000, 0xC000_0000));
        // Hidden: no longer found by its signature, still a valid table.
        let mut mcfg = mcfg;
        hide_table(&mut m, &mut mcfg);
        assert_eq!(&mcfg.header.signature, &HIDDEN_SIGNATURE);
        assert!(AcpiTable::load(&m, MCFG_PA, MCFG_ENTRIES_OFFSET).is_ok());
        let mut sig = [0u8; 4];
        m.read(MCFG_PA, &mut sig);
        assert_eq!(&sig, b"ALY_");
        // The base is bus 0's: bus 0x80 starts 128 MiB in.
        assert_eq!(a[1].window(), (0x40_0800_0000, 0x40_0840_0000));

        // No allocations at all.
        m.put(MCFG_PA, &table(b"MCFG", &[0; 8]));
        let mcfg = AcpiTable::load(&m, MCFG_PA, 44).unwrap();
        assert!(mcfg_allocations(&m, &mcfg).unwrap().is_empty());
        // A truncated entry, and an empty bus range.
        let mut short = vec![0u8; 8];
        short.extend(&mcfg_entry(0xB000_0000, 0, 0, 0xFF)[..12]);
        m.put(MCFG_PA, &table(b"MCFG", &short));
        let mcfg = AcpiTable::load(&m, MCFG_PA, 44).unwrap();
        let e = mcfg_allocations(&m, &mcfg).unwrap_err();
        assert_eq!(e, AcpiError::BadMcfgEntry { offset: 44 });
        assert_eq!(
            e.to_string(),
            "the MCFG allocation at offset 44 is truncated or has an empty bus range"
        );
        let mut backwards = vec![0u8; 8];
        backwards.extend(mcfg_entry(0xB000_0000, 0, 4, 3));
        m.put(MCFG_PA, &table(b"MCFG", &backwards));
        let mcfg = AcpiTable::load(&m, MCFG_PA, 44).unwrap();
        assert!(mcfg_allocations(&m, &mcfg).is_err());
        // Too many.
        let mut many = vec![0u8; 8];
        for i in 0..=MAX_MCFG_ALLOCATIONS as u16 {
            many.extend(mcfg_entry(0xB000_0000, i, 0, 0));
        }
        m.put(MCFG_PA, &table(b"MCFG", &many));
        let mcfg = AcpiTable::load(&m, MCFG_PA, 44).unwrap();
        assert_eq!(
            mcfg_allocations(&m, &mcfg),
            Err(AcpiError::TooManyMcfgAllocations)
        );
    }

    const DSDT_PA: u64 = 0xFE_6000;

    #[test]
    fn dsdt_sleep_packages() {
        // Bochs' and SeaBIOS' forms: Name(\_S3_, Package(0x04){One, One, Zero, Zero}),
        // Name(_S5_, Package(2){Zero, Zero}), BytePrefix constants, a long PkgLength, and a
        // method-defined \_S4 (not a package: left undefined).
        let mut aml = vec![0x10, 0x05, b'\\', b'_', b'S', b'B', b'_']; // some unrelated AML
        aml.extend([
            0x08, b'\\', b'_', b'S', b'3', b'_', 0x12, 0x06, 0x04, 0x01, 0x01, 0x00, 0x00,
        ]);
        aml.extend([0x14, 0x06, b'_', b'S', b'4', b'_', 0x00, 0xA4]);
        aml.extend([
            0x08, b'_', b'S', b'1', b'_', 0x12, 0x45, 0x00, 0x02, 0x0A, 0x07, 0x0A, 0x03,
        ]);
        aml.extend([0x08, b'_', b'S', b'5', b'_', 0x12, 0x04, 0x02, 0x00, 0x00]);
        // A second \_S5 later does not override the first.
        aml.extend([0x08, b'_', b'S', b'5', b'_', 0x12, 0x04, 0x02, 0x0A, 0x05]);
        let mut m = FakeMem::new();
        m.put(DSDT_PA, &table(b"DSDT", &aml));
        let dsdt = AcpiTable::load(&m, DSDT_PA, 0).unwrap();
        let t = dsdt_sleep_types(&m, &dsdt);
        assert_eq!(
            t,
            SleepTypes([None, Some((7, 3)), None, Some((1, 1)), None, Some((0, 0))])
        );
        assert_eq!(t.state_of(0, false), Some(5));
        assert_eq!(t.state_of(1, false), Some(3));
        assert_eq!(t.state_of(3, true), Some(1));
        assert_eq!(t.state_of(2, false), None);
        // A package whose first element is no constant is not a sleep package.
        assert_eq!(
            sleep_package(&[0x08, b'_', b'S', b'3', b'_', 0x12, 0x04, 0x02, 0x70]),
            None
        );
        assert_eq!(sleep_package(&[0x08, b'_', b'S', b'3']), None);
    }

    #[test]
    fn dsdt_scan_crosses_chunk_boundaries() {
        let mut aml = vec![0xA3; 4096 - 36 - 3];
        aml.extend([
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x04, 0x02, 0x0A, 0x05, 0x0A, 0x05,
        ]);
        let mut m = FakeMem::new();
        m.put(DSDT_PA, &table(b"DSDT", &aml));
        let dsdt = AcpiTable::load(&m, DSDT_PA, 0).unwrap();
        assert_eq!(dsdt_sleep_types(&m, &dsdt).0[5], Some((5, 5)));
    }

    #[test]
    fn fadt_reset_status_and_dsdt() {
        let mut body = fadt_body(0xB004, 0, None);
        body[40 - 36..44 - 36].copy_from_slice(&0x7FE_0040u32.to_le_bytes());
        body[56 - 36..60 - 36].copy_from_slice(&0xB000u32.to_le_bytes());
        body[112 - 36..116 - 36].copy_from_slice(&(1u32 << 10).to_le_bytes());
        body[116 - 36] = 1; // I/O
        body[116 - 36 + 1] = 8;
        body[116 - 36 + 4..116 - 36 + 12].copy_from_slice(&0xCF9u64.to_le_bytes());
        body[128 - 36] = 0x06;
        let mut m = FakeMem::new();
        m.put(FADT_PA, &table(b"FACP", &body));
        let fadt = AcpiTable::load(&m, FADT_PA, 0).unwrap();
        let sc = fadt_sleep_control(&m, &fadt).unwrap();
        assert_eq!(
            sc.reset,
            Some(ResetRegister {
                block: RegisterBlock::Io(0xCF9),
                value: 6
            })
        );
        assert_eq!(sc.pm1a_status, Some(RegisterBlock::Io(0xB000)));
        assert_eq!(sc.dsdt, Some(0x7FE_0040));
        assert_eq!(sc.unguardable(), None);

        // Without RESET_REG_SUP the register is ignored; a memory-space one is unguardable,
        // as is a PM1 block in memory; a PCI-configuration reset register is guardable.
        body[113 - 36] = 0;
        m.put(FADT_PA, &table(b"FACP", &body));
        let fadt = AcpiTable::load(&m, FADT_PA, 0).unwrap();
        assert_eq!(fadt_sleep_control(&m, &fadt).unwrap().reset, None);
        body[113 - 36] = 1 << 2;
        body[116 - 36] = 0; // memory
        body[116 - 36 + 4..116 - 36 + 12].copy_from_slice(&0xFED0_0000u64.to_le_bytes());
        m.put(FADT_PA, &table(b"FACP", &body));
        let fadt = AcpiTable::load(&m, FADT_PA, 0).unwrap();
        let sc = fadt_sleep_control(&m, &fadt).unwrap();
        assert_eq!(
            sc.unguardable(),
            Some(("RESET_REG", RegisterBlock::Memory(0xFED0_0000)))
        );
        body[116 - 36] = 2; // PCI configuration: device 0x1f, function 0, offset 0xac
        body[116 - 36 + 4..116 - 36 + 12].copy_from_slice(&0x1F_0000_00ACu64.to_le_bytes());
        m.put(FADT_PA, &table(b"FACP", &body));
        let fadt = AcpiTable::load(&m, FADT_PA, 0).unwrap();
        let sc = fadt_sleep_control(&m, &fadt).unwrap();
        assert_eq!(
            sc.reset.map(|r| r.block),
            Some(RegisterBlock::PciConfig {
                device: 0x1F,
                function: 0,
                offset: 0xAC
            })
        );
        assert_eq!(sc.unguardable(), None);
        let x = fadt_body(0x604, 0, Some((0, 0xFED0_0004)));
        m.put(FADT_PA, &table(b"FACP", &x));
        let fadt = AcpiTable::load(&m, FADT_PA, 0).unwrap();
        assert_eq!(
            fadt_sleep_control(&m, &fadt).unwrap().unguardable(),
            Some(("PM1a_CNT", RegisterBlock::Memory(0xFED0_0004)))
        );
    }
}
