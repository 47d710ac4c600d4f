//! Just enough of an AHCI host bus adapter driver to run single ATA DMA commands on one port,
//! polled, for the DMA attack (issue 14): the in-memory structures of AHCI 1.3.1 chapter 4, the
//! port registers of chapter 3.3, the H2D Register FIS of Serial ATA 3.x 10.5.5 and the ATA
//! commands of ATA8-ACS. The guest's kernel loads no AHCI driver, so the attacker owns the
//! controller; it never leaves a command running or a port pointed at its memory.

use std::fmt;
use std::time::{Duration, Instant};

use crate::sys::{DmaPage, PhysMap, PAGE};

/// PCI class code of an AHCI 1.0 SATA controller (base 01h mass storage, sub 06h SATA,
/// programming interface 01h AHCI; AHCI 1.3.1 2.1.2).
pub const CLASS_AHCI: u32 = 0x01_06_01;

/// The ABAR is BAR 5 (AHCI 1.3.1 2.1.11).
pub const ABAR_BAR: usize = 5;

/// Bytes of one sector (the transfer unit of the commands below).
pub const SECTOR: usize = 512;

// --- Generic host control (AHCI 1.3.1 3.1) ----------------------------------------------------

const GHC: usize = 0x04;
const PI: usize = 0x0c;
/// GHC.AE: AHCI enable (3.1.2); without it the port registers are not the AHCI ones.
const GHC_AE: u32 = 1 << 31;
/// GHC.IE: the HBA raises its interrupt (3.1.2).
const GHC_IE: u32 = 1 << 1;
/// PxIE.DHRE: interrupt on a D2H register FIS, i.e. a command's completion (3.3.6).
const IE_DHRE: u32 = 1 << 0;

// --- Port registers (AHCI 1.3.1 3.3), offsets within a port's 0x80 bytes ----------------------

const PORT_BASE: usize = 0x100;
const PORT_SIZE: usize = 0x80;
const PX_CLB: usize = 0x00;
const PX_CLBU: usize = 0x04;
const PX_FB: usize = 0x08;
const PX_FBU: usize = 0x0c;
const PX_IS: usize = 0x10;
const PX_IE: usize = 0x14;
const PX_CMD: usize = 0x18;
const PX_TFD: usize = 0x20;
const PX_SSTS: usize = 0x28;
const PX_SERR: usize = 0x30;
const PX_CI: usize = 0x38;

/// PxCMD bits (3.3.7): ST (start), FRE (FIS receive enable), FR and CR (their running states).
const CMD_ST: u32 = 1 << 0;
const CMD_FRE: u32 = 1 << 4;
const CMD_FR: u32 = 1 << 14;
const CMD_CR: u32 = 1 << 15;

/// PxIS error bits (3.3.5): task file error, host bus fatal, host bus data, interface fatal,
/// interface non-fatal, overflow.
pub const IS_TFES: u32 = 1 << 30;
pub const IS_HBFS: u32 = 1 << 29;
pub const IS_HBDS: u32 = 1 << 28;
pub const IS_IFS: u32 = 1 << 27;
pub const IS_INFS: u32 = 1 << 26;
pub const IS_OFS: u32 = 1 << 24;
/// The errors that end a command (the "fatal" ones of 6.1.1 and the task file error).
const IS_ERRORS: u32 = IS_TFES | IS_HBFS | IS_HBDS | IS_IFS | IS_INFS | IS_OFS;

/// PxTFD.STS bits (3.3.8, the ATA status register): ERR, DRQ, BSY.
const TFD_ERR: u32 = 1 << 0;
const TFD_DRQ: u32 = 1 << 3;
const TFD_BSY: u32 = 1 << 7;

/// PxSSTS.DET = 3: device present and PHY communication established (3.3.10).
const SSTS_DET_PRESENT: u32 = 3;

/// PxCMD.CR and FR must clear within 500 ms of ST/FRE being cleared (10.1.2, 10.3.2).
const STOP_WAIT: Duration = Duration::from_millis(500);
/// A one-sector command completes in microseconds on real disks and in milliseconds under
/// emulation; a command still issued after this is reported as a timeout.
const COMMAND_WAIT: Duration = Duration::from_secs(5);

// --- ATA commands (ATA8-ACS 7.x) ---------------------------------------------------------------

/// The ATA commands the attack issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtaCommand {
    /// IDENTIFY DEVICE (ECh, PIO data-in: 512 bytes to memory).
    Identify,
    /// READ DMA EXT (25h): sectors from the disk into memory (the device writes memory).
    ReadDmaExt,
    /// WRITE DMA EXT (35h): sectors from memory to the disk (the device reads memory).
    WriteDmaExt,
}

impl AtaCommand {
    pub fn opcode(self) -> u8 {
        match self {
            AtaCommand::Identify => 0xec,
            AtaCommand::ReadDmaExt => 0x25,
            AtaCommand::WriteDmaExt => 0x35,
        }
    }

    /// Whether the HBA reads memory and sends it to the device (the command header's W bit).
    pub fn to_device(self) -> bool {
        self == AtaCommand::WriteDmaExt
    }
}

// --- In-memory structures (AHCI 1.3.1 chapter 4) ----------------------------------------------

/// The layout of the one page that holds a port's structures and the data buffers: the command
/// list (1 KiB-aligned, 32 headers of 32 bytes, 4.2.2), the received-FIS area (256-byte
/// aligned, 256 bytes, 4.2.1), the command table of slot 0 (128-byte aligned: 64 bytes of
/// command FIS, 16 of ATAPI command, 48 reserved, then the PRDT, 4.2.3) and two sector
/// buffers. One page keeps them physically contiguous without a kernel driver.
pub mod layout {
    pub const COMMAND_LIST: usize = 0x000;
    pub const RECEIVED_FIS: usize = 0x400;
    pub const COMMAND_TABLE: usize = 0x500;
    pub const PRDT: usize = COMMAND_TABLE + 0x80;
    pub const BUFFER_A: usize = 0x800;
    pub const BUFFER_B: usize = 0xa00;
    pub const END: usize = 0xc00;
}

/// Command header DW0 (4.2.2): CFL (FIS length in dwords, bits 4:0), W (bit 6), PRDTL (bits
/// 31:16). A, P, R, B, C and PMP stay 0: one non-ATAPI, non-prefetched command on the device
/// behind the port itself.
pub fn command_header_dw0(fis_dwords: u32, to_device: bool, prdt_entries: u16) -> u32 {
    (fis_dwords & 0x1f) | (u32::from(to_device) << 6) | (u32::from(prdt_entries) << 16)
}

/// The 32 bytes of a command header (4.2.2): DW0, PRDBC = 0 (the HBA writes the bytes it
/// transferred there), CTBA/CTBAU (the command table, 128-byte aligned), reserved.
pub fn command_header(to_device: bool, prdt_entries: u16, table: u64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..4].copy_from_slice(&command_header_dw0(5, to_device, prdt_entries).to_le_bytes());
    h[8..12].copy_from_slice(&(table as u32).to_le_bytes());
    h[12..16].copy_from_slice(&((table >> 32) as u32).to_le_bytes());
    h
}

/// One PRDT entry (4.2.3.3): DBA/DBAU (word-aligned: bit 0 reserved), DW2 reserved, DW3 DBC =
/// byte count - 1 (bit 0 must be 1: an even count), I (bit 31, interrupt on completion) clear.
pub fn prdt_entry(address: u64, bytes: u32) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[0..4].copy_from_slice(&(address as u32 & !1).to_le_bytes());
    e[4..8].copy_from_slice(&((address >> 32) as u32).to_le_bytes());
    e[12..16].copy_from_slice(&(((bytes.max(2) - 1) & 0x3f_ffff) | 1).to_le_bytes());
    e
}

/// The 20-byte H2D Register FIS (Serial ATA 3.x 10.5.5) of a 48-bit command: type 27h, C bit
/// (a command, not a control update), LBA 47:0 over bytes 4-6 and 8-10, the device register
/// with the LBA bit (6), the count over bytes 12-13.
pub fn h2d_fis(command: AtaCommand, lba: u64, count: u16) -> [u8; 20] {
    let mut f = [0u8; 20];
    f[0] = 0x27;
    f[1] = 0x80;
    f[2] = command.opcode();
    let l = lba.to_le_bytes();
    f[4..7].copy_from_slice(&l[0..3]);
    f[7] = if command == AtaCommand::Identify {
        0
    } else {
        0x40
    };
    f[8..11].copy_from_slice(&l[3..6]);
    f[12..14].copy_from_slice(&count.to_le_bytes());
    f
}

/// The user-addressable sectors from IDENTIFY DEVICE data (ATA8-ACS 7.16.7): words 100-103
/// when the 48-bit feature set is supported (word 83 bit 10), else words 60-61.
pub fn identify_sectors(data: &[u8]) -> Option<u64> {
    let word = |i: usize| -> Option<u64> {
        data.get(2 * i..2 * i + 2)
            .map(|b| u64::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let lba48 = (word(83)? & (1 << 10)) != 0;
    let n = if lba48 {
        (0..4).try_fold(0u64, |acc, k| Some(acc | word(100 + k)? << (16 * k)))?
    } else {
        word(60)? | word(61)? << 16
    };
    (n > 0).then_some(n)
}

/// How one command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// PxCI cleared without an error bit: `bytes` is the header's PRDBC.
    Done { bytes: u32, tfd: u32 },
    /// An error bit in PxIS (6.1.1: task file error, host bus or interface error).
    Error { is: u32, tfd: u32, bytes: u32 },
    /// Still issued after [`COMMAND_WAIT`].
    Timeout { is: u32, tfd: u32, ci: u32 },
}

impl Completion {
    pub fn ok(&self) -> bool {
        matches!(self, Completion::Done { tfd, .. } if tfd & TFD_ERR == 0)
    }

    /// The bytes the HBA says it moved (PRDBC).
    pub fn bytes(&self) -> u32 {
        match *self {
            Completion::Done { bytes, .. } | Completion::Error { bytes, .. } => bytes,
            Completion::Timeout { .. } => 0,
        }
    }

    /// One marker word: `ok`, the error bits joined by `+` (e.g. `tfes+hbfs`), `tfd_err`
    /// (the device set ERR without a PxIS error) or `timeout`.
    pub fn status(&self) -> String {
        match *self {
            Completion::Done { tfd, .. } if tfd & TFD_ERR != 0 => "tfd_err".into(),
            Completion::Done { .. } => "ok".into(),
            Completion::Error { is, .. } => error_names(is),
            Completion::Timeout { .. } => "timeout".into(),
        }
    }

    /// The raw registers of a failed command: `is=0x..:tfd=0x..[:ci=0x..]` (PxTFD bits 15:8 are
    /// the ATA error register, 7:0 the status).
    pub fn registers(&self) -> String {
        match *self {
            Completion::Done { tfd, .. } => format!("tfd={tfd:#x}"),
            Completion::Error { is, tfd, .. } => format!("is={is:#x}:tfd={tfd:#x}"),
            Completion::Timeout { is, tfd, ci } => format!("is={is:#x}:tfd={tfd:#x}:ci={ci:#x}"),
        }
    }
}

/// The PxIS error bits of `is` by name, `+`-joined.
pub fn error_names(is: u32) -> String {
    let names: Vec<&str> = [
        (IS_TFES, "tfes"),
        (IS_HBFS, "hbfs"),
        (IS_HBDS, "hbds"),
        (IS_IFS, "ifs"),
        (IS_INFS, "infs"),
        (IS_OFS, "ofs"),
    ]
    .into_iter()
    .filter(|(bit, _)| is & bit != 0)
    .map(|(_, n)| n)
    .collect();
    if names.is_empty() {
        "error".into()
    } else {
        names.join("+")
    }
}

/// Why a port could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortError {
    NotImplemented {
        pi: u32,
    },
    NoDevice {
        ssts: u32,
    },
    /// CR or FR did not clear within 500 ms of ST or FRE being cleared (10.1.2 step 3: the
    /// HBA is hung; a port or HBA reset would be next, which the attack does not do).
    WouldNotStop {
        cmd: u32,
    },
    /// BSY or DRQ stayed set after FIS reception was enabled (10.3.1: ST must not be set).
    Busy {
        tfd: u32,
    },
}

impl fmt::Display for PortError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortError::NotImplemented { pi } => write!(f, "port_not_implemented_pi{pi:#x}"),
            PortError::NoDevice { ssts } => write!(f, "no_device_ssts{ssts:#x}"),
            PortError::WouldNotStop { cmd } => write!(f, "port_would_not_stop_cmd{cmd:#x}"),
            PortError::Busy { tfd } => write!(f, "device_busy_tfd{tfd:#x}"),
        }
    }
}

/// Waits until `done()` or `limit` passed; whether it became true.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if done() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The port registers as the attack found them, put back when it is done (the firmware's
/// command list and FIS area; the attacker's page must never stay in them).
#[derive(Debug, Clone, Copy)]
struct Saved {
    clb: u32,
    clbu: u32,
    fb: u32,
    fbu: u32,
    ie: u32,
}

/// One port of the HBA, owned by the attack: its structures in `page`, stopped and restored to
/// the firmware's pointers when dropped.
#[derive(Debug)]
pub struct Port<'a> {
    abar: &'a PhysMap,
    base: usize,
    page: DmaPage,
    saved: Saved,
}

impl<'a> Port<'a> {
    fn reg(&self, offset: usize) -> u32 {
        self.abar.read32(self.base + offset)
    }

    fn set(&self, offset: usize, value: u32) {
        self.abar.write32(self.base + offset, value)
    }

    /// Takes port `n`: checks it is implemented (PI, 3.1.4) with a device attached (PxSSTS.DET
    /// = 3), stops it (10.3.2), points its command list and FIS area at a fresh locked page,
    /// clears its errors and starts it (10.3.1) with interrupts off (the attack polls).
    pub fn open(abar: &'a PhysMap, n: usize) -> Result<Port<'a>, String> {
        let ghc = abar.read32(GHC);
        if ghc & GHC_AE == 0 {
            abar.write32(GHC, ghc | GHC_AE);
        }
        let pi = abar.read32(PI);
        if n >= 32 || pi & (1 << n) == 0 {
            return Err(PortError::NotImplemented { pi }.to_string());
        }
        let base = PORT_BASE + n * PORT_SIZE;
        let ssts = abar.read32(base + PX_SSTS);
        if ssts & 0xf != SSTS_DET_PRESENT {
            return Err(PortError::NoDevice { ssts }.to_string());
        }
        let page = DmaPage::new().map_err(|e| e.to_string())?;
        let saved = Saved {
            clb: abar.read32(base + PX_CLB),
            clbu: abar.read32(base + PX_CLBU),
            fb: abar.read32(base + PX_FB),
            fbu: abar.read32(base + PX_FBU),
            ie: abar.read32(base + PX_IE),
        };
        let port = Port {
            abar,
            base,
            page,
            saved,
        };
        // From here on `port`'s Drop stops the port and restores the firmware's pointers.
        port.stop().map_err(|e| e.to_string())?;
        port.start().map_err(|e| e.to_string())?;
        Ok(port)
    }

    /// The physical address of `offset` in the attack's page.
    pub fn phys(&self, offset: usize) -> u64 {
        self.page.phys + offset as u64
    }

    /// The page's bytes (the sector buffers; the HBA writes them: read them with
    /// [`Port::read_buffer`]).
    pub fn page(&self) -> &DmaPage {
        &self.page
    }

    /// Clears ST and waits for CR, then clears FRE and waits for FR (10.3.2).
    fn stop(&self) -> Result<(), PortError> {
        let cmd = self.reg(PX_CMD);
        if cmd & CMD_ST != 0 {
            self.set(PX_CMD, cmd & !CMD_ST);
        }
        if !wait_until(STOP_WAIT, || self.reg(PX_CMD) & CMD_CR == 0) {
            return Err(PortError::WouldNotStop {
                cmd: self.reg(PX_CMD),
            });
        }
        let cmd = self.reg(PX_CMD);
        if cmd & CMD_FRE != 0 {
            self.set(PX_CMD, cmd & !CMD_FRE);
        }
        if !wait_until(STOP_WAIT, || self.reg(PX_CMD) & CMD_FR == 0) {
            return Err(PortError::WouldNotStop {
                cmd: self.reg(PX_CMD),
            });
        }
        Ok(())
    }

    /// Points the port at the attack's page and starts it (10.3.1: FRE first, ST only once
    /// BSY and DRQ are clear).
    fn start(&self) -> Result<(), PortError> {
        // The structures only: a restart after an error keeps the sector buffers.
        self.page.bytes()[..layout::BUFFER_A].fill(0);
        let clb = self.phys(layout::COMMAND_LIST);
        let fb = self.phys(layout::RECEIVED_FIS);
        self.set(PX_CLB, clb as u32);
        self.set(PX_CLBU, (clb >> 32) as u32);
        self.set(PX_FB, fb as u32);
        self.set(PX_FBU, (fb >> 32) as u32);
        self.set(PX_IE, 0);
        // Both are write-1-to-clear (3.3.5, 3.3.12).
        self.set(PX_SERR, u32::MAX);
        self.set(PX_IS, u32::MAX);
        self.set(PX_CMD, self.reg(PX_CMD) | CMD_FRE);
        if !wait_until(STOP_WAIT, || self.reg(PX_TFD) & (TFD_BSY | TFD_DRQ) == 0) {
            return Err(PortError::Busy {
                tfd: self.reg(PX_TFD),
            });
        }
        self.set(PX_CMD, self.reg(PX_CMD) | CMD_ST);
        Ok(())
    }

    /// Runs `command` in slot 0 with one PRDT entry of `count` sectors at physical `data`,
    /// polled (5.3: the HBA fetches the header, sends the FIS, moves the data, clears PxCI).
    /// After an error the port is restarted (6.2.2.1: ST cleared, errors cleared, ST set), so
    /// the next command finds it idle.
    pub fn command(&self, command: AtaCommand, lba: u64, count: u16, data: u64) -> Completion {
        let page = self.page.bytes();
        let bytes = u32::from(count.max(1)) * SECTOR as u32;
        let table = self.phys(layout::COMMAND_TABLE);
        page[layout::COMMAND_LIST..layout::COMMAND_LIST + 32].copy_from_slice(&command_header(
            command.to_device(),
            1,
            table,
        ));
        page[layout::COMMAND_TABLE..layout::PRDT].fill(0);
        page[layout::COMMAND_TABLE..layout::COMMAND_TABLE + 20]
            .copy_from_slice(&h2d_fis(command, lba, count));
        page[layout::PRDT..layout::PRDT + 16].copy_from_slice(&prdt_entry(data, bytes));
        self.set(PX_IS, u32::MAX);
        // The MMIO store is an asm statement the compiler may not move the stores above past.
        self.set(PX_CI, 1);
        let finished = wait_until(COMMAND_WAIT, || {
            self.reg(PX_CI) & 1 == 0 || self.reg(PX_IS) & IS_ERRORS != 0
        });
        let (is, tfd, ci) = (self.reg(PX_IS), self.reg(PX_TFD), self.reg(PX_CI));
        let prdbc = u32::from_le_bytes(
            self.page
                .read_volatile(layout::COMMAND_LIST + 4, 4)
                .try_into()
                .unwrap_or([0; 4]),
        );
        let done = if !finished {
            Completion::Timeout { is, tfd, ci }
        } else if is & IS_ERRORS != 0 {
            Completion::Error {
                is,
                tfd,
                bytes: prdbc,
            }
        } else {
            Completion::Done { bytes: prdbc, tfd }
        };
        if !done.ok() {
            let _ = self.stop().and_then(|()| self.start());
        }
        done
    }

    /// Turns the port's completion interrupt on (PxIE.DHRE, the D2H register FIS, 3.3.6) and
    /// the HBA's interrupt enable (GHC.IE, 3.1.2), or both off again.
    pub fn interrupts(&self, on: bool) {
        let ghc = self.abar.read32(GHC);
        if on {
            self.set(PX_IE, IE_DHRE);
            self.abar.write32(GHC, ghc | GHC_IE);
        } else {
            self.abar.write32(GHC, ghc & !GHC_IE);
            self.set(PX_IE, 0);
        }
    }

    /// `len` bytes of the page at `offset`, read volatile (the HBA wrote them).
    pub fn read_buffer(&self, offset: usize, len: usize) -> Vec<u8> {
        self.page.read_volatile(offset, len)
    }
}

impl Drop for Port<'_> {
    /// Stops the port and gives the firmware its command list and FIS area back (the port stays
    /// stopped): the attack's page is unmapped right after, and no HBA may point into it.
    fn drop(&mut self) {
        let _ = self.stop();
        self.set(PX_CLB, self.saved.clb);
        self.set(PX_CLBU, self.saved.clbu);
        self.set(PX_FB, self.saved.fb);
        self.set(PX_FBU, self.saved.fbu);
        self.set(PX_IE, self.saved.ie);
        self.set(PX_SERR, u32::MAX);
        self.set(PX_IS, u32::MAX);
    }
}

/// Whether port `n` is stopped: no command list or FIS receive running (PxCMD ST, CR, FRE,
/// FR all clear).
pub fn port_idle(abar: &PhysMap, n: usize) -> bool {
    abar.read32(PORT_BASE + n * PORT_SIZE + PX_CMD) & (CMD_ST | CMD_CR | CMD_FRE | CMD_FR) == 0
}

// The port's structures fit the page with the alignments chapter 4 asks for, checked when
// the attacker is compiled.
const _: () = assert!(
    layout::END <= PAGE
        && layout::COMMAND_LIST.is_multiple_of(1024)
        && layout::RECEIVED_FIS.is_multiple_of(256)
        && layout::COMMAND_TABLE.is_multiple_of(128)
        && layout::PRDT + 16 <= layout::BUFFER_A
        && layout::BUFFER_A.is_multiple_of(2)
        && layout::BUFFER_B >= layout::BUFFER_A + SECTOR
        && layout::END >= layout::BUFFER_B + SECTOR
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_headers() {
        // CFL 5 dwords, W for WRITE DMA EXT, one PRDT entry.
        assert_eq!(command_header_dw0(5, true, 1), 0x0001_0045);
        assert_eq!(command_header_dw0(5, false, 1), 0x0001_0005);
        let h = command_header(false, 1, 0x1_2345_6780);
        assert_eq!(&h[0..4], &[0x05, 0, 1, 0]);
        assert_eq!(&h[4..8], &[0; 4], "PRDBC starts at 0");
        assert_eq!(&h[8..12], &0x2345_6780u32.to_le_bytes());
        assert_eq!(&h[12..16], &1u32.to_le_bytes());
    }

    #[test]
    fn prdt_entries_hold_count_minus_one() {
        let e = prdt_entry(0x3860_0001, 512);
        assert_eq!(&e[0..4], &0x3860_0000u32.to_le_bytes(), "word-aligned");
        assert_eq!(&e[12..16], &511u32.to_le_bytes());
        assert_eq!(&prdt_entry(0x1000, 4096)[12..16], &4095u32.to_le_bytes());
    }

    #[test]
    fn h2d_fis_for_48_bit_commands() {
        let f = h2d_fis(AtaCommand::ReadDmaExt, 0x0000_1234_5678_9abc, 1);
        assert_eq!(f[0], 0x27);
        assert_eq!(f[1], 0x80, "C bit: a command");
        assert_eq!(f[2], 0x25);
        assert_eq!(&f[4..7], &[0xbc, 0x9a, 0x78]);
        assert_eq!(f[7], 0x40, "LBA mode");
        assert_eq!(&f[8..11], &[0x56, 0x34, 0x12]);
        assert_eq!(&f[12..14], &[1, 0]);
        assert_eq!(h2d_fis(AtaCommand::WriteDmaExt, 0, 1)[2], 0x35);
        let id = h2d_fis(AtaCommand::Identify, 0, 0);
        assert_eq!((id[2], id[7]), (0xec, 0));
        assert!(AtaCommand::WriteDmaExt.to_device());
        assert!(!AtaCommand::ReadDmaExt.to_device());
    }

    #[test]
    fn sectors_from_identify_data() {
        let mut d = [0u8; 512];
        // 28-bit only: words 60-61.
        d[120..124].copy_from_slice(&131_072u32.to_le_bytes());
        assert_eq!(identify_sectors(&d), Some(131_072));
        // 48-bit: word 83 bit 10, words 100-103.
        d[166..168].copy_from_slice(&(1u16 << 10).to_le_bytes());
        d[200..208].copy_from_slice(&0x1_0000_0000u64.to_le_bytes());
        assert_eq!(identify_sectors(&d), Some(0x1_0000_0000));
        assert_eq!(identify_sectors(&[0u8; 512]), None);
        assert_eq!(identify_sectors(&[0u8; 100]), None);
    }

    #[test]
    fn completions_name_their_errors() {
        let ok = Completion::Done {
            bytes: 512,
            tfd: 0x50,
        };
        assert!(ok.ok());
        assert_eq!(ok.status(), "ok");
        let err = Completion::Error {
            is: IS_TFES | IS_HBFS | 1,
            tfd: 0x0451,
            bytes: 0,
        };
        assert!(!err.ok());
        assert_eq!(err.status(), "tfes+hbfs");
        assert_eq!(err.registers(), "is=0x60000001:tfd=0x451");
        let t = Completion::Timeout {
            is: 0,
            tfd: 0x80,
            ci: 1,
        };
        assert_eq!(t.status(), "timeout");
        assert_eq!(t.bytes(), 0);
        let device_err = Completion::Done {
            bytes: 0,
            tfd: 0x51,
        };
        assert!(!device_err.ok());
        assert_eq!(device_err.status(), "tfd_err");
        assert_eq!(error_names(0), "error");
    }
}
