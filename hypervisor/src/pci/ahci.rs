//! The firmware's AHCI controllers across the guest's reboot.
//!
//! Ally reboots the guest without running the BIOS again (`guest_reset`): the BIOS's disk
//! driver, which the boot stub and the guest's boot loader call through INT 13h, must find its
//! controller as it left it. An IDE controller keeps no such state, but an AHCI controller
//! (q35's ICH9) does: its ports' command list and received-FIS bases point into the BIOS's
//! memory, and the OS's driver moved them into its own, then stopped the ports on its way
//! down; the OS may also have moved its register window (Linux moved q35's ABAR from
//! 0xFEBF1000 to 0xFEC02000 under Ally). A PC's reset puts the controller back through the
//! BIOS's POST; Ally records what the BIOS left before the guest's first instruction (its
//! BARs, decoding, MSI, and every port's registers) and puts it back at each reset (seen
//! under QEMU q35 without this: SeaBIOS's INT 13h read waits out its timeout on the old
//! window and returns AH=01h).
//!
//! Register layout and the port stop/start sequence: Serial ATA AHCI 1.3.1, 3.1 (generic host
//! control), 3.3 (port registers) and 10.1.2 (a port is idle once PxCMD.CR and PxCMD.FR read
//! zero after ST and FRE are cleared). The logic is plain Rust over [`Mmio`] and
//! [`ConfigSpace`]; the tests run it against a software controller.

use super::msi::walk_capabilities;
use super::{functions, ConfigSpace, COMMAND_BUS_MASTER, COMMAND_IO, COMMAND_MEMORY, REG_BAR0};
use super::{REG_CLASS, REG_COMMAND};
use crate::cmdline::PciAddress;

/// 32-bit memory-mapped register access (the controller's ABAR).
pub trait Mmio {
    fn read32(&self, address: u64) -> u32;
    fn write32(&self, address: u64, value: u32);
}

/// Class code 01h (mass storage), subclass 06h (SATA), programming interface 01h (AHCI 1.0;
/// AHCI 1.3.1, 2.1.2).
const CLASS_AHCI: u32 = 0x01_06_01;
/// The Command register bits a reset returns to the firmware's: decoding, bus mastering and
/// INTx disable (PCI Local Bus 3.0, 6.2.2).
const RESTORED_COMMAND: u16 = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | (1 << 10);
/// ABAR is BAR5 (AHCI 1.3.1, 2.1.11).
const REG_ABAR: u8 = REG_BAR0 + 5 * 4;

// Generic host control (3.1).
const GHC: u64 = 0x04;
const GHC_HR: u32 = 1 << 0;
const GHC_IE: u32 = 1 << 1;
const GHC_AE: u32 = 1 << 31;
const IS: u64 = 0x08;
const PI: u64 = 0x0C;

// Port registers (3.3), at 100h + 80h * port.
const PORT_BASE: u64 = 0x100;
const PORT_STRIDE: u64 = 0x80;
const PX_CLB: u64 = 0x00;
const PX_CLBU: u64 = 0x04;
const PX_FB: u64 = 0x08;
const PX_FBU: u64 = 0x0C;
const PX_IS: u64 = 0x10;
const PX_IE: u64 = 0x14;
const PX_CMD: u64 = 0x18;
const PX_TFD: u64 = 0x20;
const PX_SERR: u64 = 0x30;
const CMD_ST: u32 = 1 << 0;
const CMD_FRE: u32 = 1 << 4;
/// PxCMD's read-write configuration: spin-up, power-on, port multiplier attached, automatic
/// partial-to-slumber, ATAPI, drive LED on ATAPI, aggressive link power management.
const CMD_CONFIG: u32 = (1 << 1) | (1 << 2) | (1 << 17) | (1 << 23) | (0xF << 24);
const TFD_BSY: u32 = 1 << 7;
const TFD_DRQ: u32 = 1 << 3;

/// Reads allowed for the HBA reset to finish (1 s in the specification) or a device to
/// leave BSY/DRQ; a read takes a microsecond or more on real hardware, far longer under an
/// emulator.
pub const POLLS: u32 = 1_000_000;

/// One port's registers as the firmware left them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PortState {
    clb: u32,
    clbu: u32,
    fb: u32,
    fbu: u32,
    ie: u32,
    /// PxCMD's [`CMD_CONFIG`] bits.
    config: u32,
    /// PxCMD's ST and FRE.
    running: u32,
}

/// An AHCI controller as the firmware left it.
#[derive(Debug, Clone)]
pub struct FirmwareAhci {
    pub function: PciAddress,
    pub abar: u64,
    /// The configuration Command register's [`RESTORED_COMMAND`] bits.
    command: u16,
    /// The six BARs as the firmware programmed them.
    bars: [u32; 6],
    /// The MSI capability's offset and whether the firmware left MSI enabled.
    msi: Option<(u8, bool)>,
    ghc_ie: bool,
    /// Ports implemented (PI).
    pub implemented: u32,
    ports: [PortState; 32],
}

/// What a restore did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    pub ports: u32,
    /// Ports left with their command engine stopped: the HBA reset did not finish (all
    /// ports), or the device stayed busy.
    pub stuck: u32,
}

fn port_register(abar: u64, port: u32, register: u64) -> u64 {
    abar + PORT_BASE + PORT_STRIDE * u64::from(port) + register
}

impl FirmwareAhci {
    /// Every AHCI controller on the bus with its register window decoded, as it is now.
    pub fn record_all<const N: usize>(
        cs: &impl ConfigSpace,
        mmio: &impl Mmio,
    ) -> heapless::Vec<FirmwareAhci, N> {
        let mut found = heapless::Vec::new();
        for f in functions(cs) {
            if cs.read32(f.address, REG_CLASS) >> 8 != CLASS_AHCI {
                continue;
            }
            if let Some(controller) = Self::record(cs, mmio, f.address) {
                // More controllers than room: the rest are left as the guest leaves them.
                let _ = found.push(controller);
            }
        }
        found
    }

    fn record(cs: &impl ConfigSpace, mmio: &impl Mmio, function: PciAddress) -> Option<Self> {
        let command = cs.read32(function, REG_COMMAND) as u16;
        let low = cs.read32(function, REG_ABAR);
        // A 32-bit memory BAR (ABAR may not be 64-bit on ICH parts; a 64-bit one would use
        // BAR5 and a sixth BAR that does not exist).
        let abar = u64::from(low & !0xF);
        if low & 1 != 0 || abar == 0 || command & COMMAND_MEMORY == 0 {
            return None;
        }
        let msi = walk_capabilities(cs, function).msi.map(|cap| {
            let enabled = cs.read32(function, cap.offset) & (1 << 16) != 0;
            (cap.offset, enabled)
        });
        let implemented = mmio.read32(abar + PI);
        let mut ports = [PortState::default(); 32];
        for port in (0..32).filter(|p| implemented & (1 << p) != 0) {
            let reg = |r| mmio.read32(port_register(abar, port, r));
            ports[port as usize] = PortState {
                clb: reg(PX_CLB),
                clbu: reg(PX_CLBU),
                fb: reg(PX_FB),
                fbu: reg(PX_FBU),
                ie: reg(PX_IE),
                config: reg(PX_CMD) & CMD_CONFIG,
                running: reg(PX_CMD) & (CMD_ST | CMD_FRE),
            };
        }
        Some(Self {
            function,
            abar,
            command: command & RESTORED_COMMAND,
            bars: core::array::from_fn(|i| cs.read32(function, REG_BAR0 + 4 * i as u8)),
            msi,
            ghc_ie: mmio.read32(abar + GHC) & GHC_IE != 0,
            implemented,
            ports,
        })
    }

    /// Puts the controller back as recorded: the firmware's decoding and MSI state, an HBA
    /// reset (10.4.3: every port's engines stop and its registers return to their reset
    /// values, as at the platform's reset), then each implemented port's bases, interrupt
    /// enables and configuration, its FIS receive and, once the device is neither busy nor
    /// requesting data (3.3.7: ST is set only then), its command engine, as recorded; then
    /// the global interrupt enable.
    pub fn restore(&self, cs: &impl ConfigSpace, mmio: &impl Mmio) -> Restored {
        // The register windows first, where the firmware put them, with decoding off while
        // they move (PCI Local Bus 3.0, 6.2.5.1); the guest may also have turned it off.
        // The Command dword's upper half is the Status register, whose error bits clear on
        // a written one: written as zero.
        let kept = cs.read32(self.function, REG_COMMAND) & 0xFFFF & !u32::from(RESTORED_COMMAND);
        cs.write32(self.function, REG_COMMAND, kept);
        for (i, &bar) in self.bars.iter().enumerate() {
            cs.write32(self.function, REG_BAR0 + 4 * i as u8, bar);
        }
        cs.write32(self.function, REG_COMMAND, kept | u32::from(self.command));
        if let Some((offset, enabled)) = self.msi {
            let control = cs.read32(self.function, offset);
            let control = (control & !(1 << 16)) | (u32::from(enabled) << 16);
            cs.write32(self.function, offset, control);
        }
        let mut restored = Restored::default();
        mmio.write32(self.abar + GHC, mmio.read32(self.abar + GHC) | GHC_HR);
        if !poll(mmio, self.abar + GHC, GHC_HR) {
            restored.stuck = self.implemented;
            return restored;
        }
        // AE before any other register is touched (3.1.2).
        mmio.write32(self.abar + GHC, GHC_AE);
        for port in (0..32).filter(|p| self.implemented & (1 << p) != 0) {
            let state = self.ports[port as usize];
            let reg = |r| port_register(self.abar, port, r);
            mmio.write32(reg(PX_CLB), state.clb);
            mmio.write32(reg(PX_CLBU), state.clbu);
            mmio.write32(reg(PX_FB), state.fb);
            mmio.write32(reg(PX_FBU), state.fbu);
            mmio.write32(reg(PX_SERR), u32::MAX);
            mmio.write32(reg(PX_IS), u32::MAX);
            mmio.write32(reg(PX_IE), state.ie);
            let mut cmd = (mmio.read32(reg(PX_CMD)) & !CMD_CONFIG) | state.config;
            mmio.write32(reg(PX_CMD), cmd);
            if state.running & CMD_FRE != 0 {
                cmd |= CMD_FRE;
                mmio.write32(reg(PX_CMD), cmd);
            }
            if state.running & CMD_ST != 0 {
                if !poll(mmio, reg(PX_TFD), TFD_BSY | TFD_DRQ) {
                    restored.stuck |= 1 << port;
                    continue;
                }
                mmio.write32(reg(PX_CMD), cmd | CMD_ST);
            }
            restored.ports += 1;
        }
        if self.ghc_ie {
            mmio.write32(self.abar + GHC, GHC_AE | GHC_IE);
        }
        mmio.write32(self.abar + IS, u32::MAX);
        restored
    }
}

/// Waits, for at most [`POLLS`] reads, until `register` has none of `bits` set.
fn poll(mmio: &impl Mmio, register: u64, bits: u32) -> bool {
    (0..POLLS).any(|_| mmio.read32(register) & bits == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::REG_ID;
    use core::cell::RefCell;
    use std::collections::HashMap;

    const AT: PciAddress = PciAddress {
        bus: 0,
        device: 0x1F,
        function: 2,
    };
    const ABAR: u64 = 0xFEBD_1000;

    /// A configuration space with one ICH9 AHCI function and no capabilities but MSI.
    struct Bus(RefCell<HashMap<u8, u32>>);

    impl Bus {
        fn new() -> Self {
            let regs = HashMap::from([
                (REG_ID, 0x2922_8086),
                // Capabilities list, memory + bus master on.
                (REG_COMMAND, 0x0010_0007),
                (REG_CLASS, 0x0106_0102),
                (REG_ABAR, ABAR as u32),
                (0x34, 0x80),
                // MSI, 64-bit, disabled.
                (0x80, 0x0080_0005),
            ]);
            Bus(RefCell::new(regs))
        }
    }

    /// The ICH9 LPC bridge at function 0, multi-function, so that function 2 is probed.
    const LPC: PciAddress = PciAddress { function: 0, ..AT };

    impl ConfigSpace for Bus {
        fn read32(&self, f: PciAddress, reg: u8) -> u32 {
            match (f, reg) {
                (LPC, REG_ID) => 0x2918_8086,
                (LPC, crate::pci::REG_HEADER_TYPE) => 0x0080_0000,
                (f, REG_ID) if f != AT => u32::MAX,
                (f, _) if f != AT => 0,
                _ => *self.0.borrow().get(&reg).unwrap_or(&0),
            }
        }
        fn write32(&self, f: PciAddress, reg: u8, value: u32) {
            assert_eq!(f, AT);
            self.0.borrow_mut().insert(reg, value);
        }
    }

    const CMD_CR: u32 = 1 << 15;
    const CMD_FR: u32 = 1 << 14;
    const CMD_SUD_POD: u32 = (1 << 1) | (1 << 2);

    /// How the software controller misbehaves.
    #[derive(Default, Clone, Copy, PartialEq)]
    enum Fault {
        #[default]
        None,
        /// GHC.HR never clears.
        ResetHangs,
        /// The device stays busy after its reset.
        DeviceBusy,
    }

    /// A controller whose engines follow ST and FRE (CR, FR), whose HBA reset returns the
    /// port registers to their reset values (bases zeroed, to see them rewritten) and the
    /// device to its power-on signature (TFD 7Fh until FIS receive is on), whose status
    /// registers clear on written ones, and which records a base written while an engine ran
    /// and ST set while the device was busy.
    #[derive(Default)]
    struct Controller {
        regs: RefCell<HashMap<u64, u32>>,
        fault: Fault,
        misuse: RefCell<Vec<String>>,
    }

    impl Controller {
        fn get(&self, a: u64) -> u32 {
            *self.regs.borrow().get(&a).unwrap_or(&0)
        }
        fn set(&self, a: u64, v: u32) {
            self.regs.borrow_mut().insert(a, v);
        }
    }

    impl Mmio for Controller {
        fn read32(&self, a: u64) -> u32 {
            self.get(a)
        }
        fn write32(&self, a: u64, value: u32) {
            let offset = a - ABAR;
            if offset >= PORT_BASE {
                let reg = (offset - PORT_BASE) % PORT_STRIDE;
                let base = a - reg;
                let cmd = self.get(base + PX_CMD);
                if reg < PX_IS && cmd & (CMD_CR | CMD_FR) != 0 {
                    self.misuse
                        .borrow_mut()
                        .push(format!("base {offset:#x} while running"));
                }
                match reg {
                    PX_CMD => {
                        let mut v = value & !(CMD_CR | CMD_FR);
                        if value & CMD_FRE != 0 {
                            v |= CMD_FR;
                            if self.fault != Fault::DeviceBusy {
                                self.set(base + PX_TFD, 0x50);
                            }
                        }
                        if value & CMD_ST != 0 {
                            if self.get(base + PX_TFD) & (TFD_BSY | TFD_DRQ) != 0 {
                                self.misuse
                                    .borrow_mut()
                                    .push(format!("ST at {offset:#x} while busy"));
                            }
                            v |= CMD_CR;
                        }
                        self.set(a, v);
                    }
                    PX_IS | PX_SERR => self.set(a, self.get(a) & !value),
                    _ => self.set(a, value),
                }
            } else if offset == IS {
                self.set(a, self.get(a) & !value);
            } else if offset == GHC && value & GHC_HR != 0 {
                if self.fault == Fault::ResetHangs {
                    self.set(a, self.get(a) | GHC_HR);
                    return;
                }
                self.set(a, GHC_AE);
                for p in 0..32u32 {
                    for r in [PX_CLB, PX_CLBU, PX_FB, PX_FBU, PX_IS, PX_IE, PX_SERR] {
                        self.set(port(p, r), 0);
                    }
                    self.set(port(p, PX_CMD), CMD_SUD_POD);
                    self.set(port(p, PX_TFD), 0x7F);
                }
            } else {
                self.set(a, value);
            }
        }
    }

    fn port(p: u32, r: u64) -> u64 {
        port_register(ABAR, p, r)
    }

    /// What SeaBIOS leaves: AHCI enabled, interrupts off, port 0 with its lists in the
    /// BIOS's memory and both engines running; port 1 implemented, idle.
    fn firmware_controller(fault: Fault) -> Controller {
        let c = Controller {
            fault,
            ..Controller::default()
        };
        c.write32(ABAR + GHC, 1 << 31);
        c.write32(ABAR + PI, 0b11);
        c.write32(port(0, PX_CLB), 0x7FFB_F000);
        c.write32(port(0, PX_FB), 0x7FFB_E000);
        c.write32(port(0, PX_CMD), CMD_SUD_POD | CMD_FRE);
        c.write32(port(0, PX_CMD), CMD_SUD_POD | CMD_FRE | CMD_ST);
        c.write32(port(1, PX_CMD), CMD_SUD_POD);
        c
    }

    /// What Linux's ahci driver leaves at reboot: its own lists, interrupts and MSI on,
    /// port 0 stopped with status pending; or, before its shutdown, still running.
    fn linux_took_over(c: &Controller, bus: &Bus, running: bool) {
        c.write32(port(0, PX_CMD), CMD_SUD_POD);
        c.write32(port(0, PX_CLB), 0x3F00_0000);
        c.write32(port(0, PX_CLBU), 1);
        c.write32(port(0, PX_FB), 0x3F00_1000);
        c.write32(port(0, PX_IE), 0x7DC0_007F);
        c.write32(port(1, PX_IE), 0x7DC0_007F);
        if running {
            c.write32(port(0, PX_CMD), CMD_SUD_POD | CMD_FRE | CMD_ST);
        }
        c.set(port(0, PX_IS), 0x1);
        c.set(port(0, PX_SERR), 0x0400_0000);
        c.write32(ABAR + GHC, (1 << 31) | GHC_IE);
        bus.write32(AT, 0x80, 0x0081_0005);
        bus.write32(AT, REG_COMMAND, 0x0010_0406);
        // Linux moved the window (the fake controller stays at ABAR: only the register says).
        bus.write32(AT, REG_ABAR, 0xFEC0_2000);
        c.misuse.borrow_mut().clear();
    }

    #[test]
    fn a_reboot_gets_the_firmwares_ports_back() {
        let bus = Bus::new();
        let c = firmware_controller(Fault::None);
        let recorded = FirmwareAhci::record_all::<4>(&bus, &c);
        assert_eq!(recorded.len(), 1);
        assert_eq!((recorded[0].function, recorded[0].abar), (AT, ABAR));
        for running in [false, true] {
            linux_took_over(&c, &bus, running);
            let r = recorded[0].restore(&bus, &c);
            assert_eq!(r, Restored { ports: 2, stuck: 0 });
            assert_eq!(c.read32(port(0, PX_CLB)), 0x7FFB_F000);
            assert_eq!(c.read32(port(0, PX_CLBU)), 0);
            assert_eq!(c.read32(port(0, PX_FB)), 0x7FFB_E000);
            assert_eq!(c.read32(port(0, PX_IE)), 0);
            assert_eq!(c.read32(port(1, PX_IE)), 0);
            assert_eq!(
                c.read32(port(0, PX_CMD)),
                CMD_SUD_POD | CMD_ST | CMD_FRE | CMD_CR | CMD_FR
            );
            assert_eq!(c.read32(port(1, PX_CMD)), CMD_SUD_POD);
            assert_eq!(c.read32(ABAR + GHC), 1 << 31, "interrupts off again");
            assert_eq!(bus.read32(AT, 0x80) & (1 << 16), 0, "MSI off again");
            assert_eq!(bus.read32(AT, REG_COMMAND) & 0xFFFF, 0x0007);
            assert_eq!(
                bus.read32(AT, REG_ABAR),
                ABAR as u32,
                "the window back in place"
            );
            assert!(c.misuse.borrow().is_empty(), "{:?}", c.misuse.borrow());
        }
    }

    #[test]
    fn a_controller_or_device_that_stays_busy_is_reported() {
        let bus = Bus::new();
        let hangs = firmware_controller(Fault::ResetHangs);
        let recorded = FirmwareAhci::record_all::<4>(&bus, &hangs);
        linux_took_over(&hangs, &bus, true);
        let r = recorded[0].restore(&bus, &hangs);
        assert_eq!(
            r,
            Restored {
                ports: 0,
                stuck: 0b11
            }
        );
        assert_eq!(hangs.read32(port(0, PX_CLB)), 0x3F00_0000, "not rewritten");

        let busy = firmware_controller(Fault::DeviceBusy);
        linux_took_over(&busy, &bus, false);
        let r = recorded[0].restore(&bus, &busy);
        // Port 0's command engine stays off; port 1 needed none.
        assert_eq!(
            r,
            Restored {
                ports: 1,
                stuck: 0b1
            }
        );
        assert_eq!(busy.read32(port(0, PX_CMD)) & CMD_ST, 0);
        assert!(
            busy.misuse.borrow().is_empty(),
            "{:?}",
            busy.misuse.borrow()
        );
    }

    #[test]
    fn functions_other_than_ahci_and_undecoded_windows_are_not_recorded() {
        let bus = Bus::new();
        let c = firmware_controller(Fault::None);
        bus.write32(AT, REG_CLASS, 0x0101_8002); // IDE
        assert!(FirmwareAhci::record_all::<4>(&bus, &c).is_empty());
        bus.write32(AT, REG_CLASS, 0x0106_0102);
        bus.write32(AT, REG_COMMAND, 0x0010_0005); // memory decoding off
        assert!(FirmwareAhci::record_all::<4>(&bus, &c).is_empty());
    }
}
